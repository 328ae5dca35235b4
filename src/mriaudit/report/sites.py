"""The report's group views: how subjects, flags and scores fall over groups of rows.

Before excluding thirty scans from one scanner, a curator checks whether that
scanner is different rather than its scans bad. Each scanner-and-protocol
group (``scores.tsv`` column ``scanner_group``, from the headers:
``audit.scanner_groups``) gets its size, status counts, flagged rate and the
spread of its audit scores; a group flagged more often than the rest of the
cohort, beyond what chance explains, is called out as a possible batch effect.

The same view groups the rows by any other column: :func:`participant_views`
draws one per ``participant_*`` column of a BIDS input's ``participants.tsv``
(site, sex, age in decades, other measures in quartile bands).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

from mriaudit.aggregate.scores import PARTICIPANT_PREFIX

#: Family-wise error rate of the batch-effect call-outs (one-sided Fisher exact test per
#: group against the rest of the cohort, Bonferroni over the groups).
ALPHA = 0.05
#: Name shown for rows without scanner headers (NIfTI input, unreadable folders).
NO_HEADERS = "no scanner headers (NIfTI or unreadable)"
#: Name shown for rows whose participants.tsv cell is empty (or ``n/a``, or no row).
NOT_GIVEN = "not given"
#: A numeric column with at most this many distinct values groups by value; one with more,
#: and any age column, groups by bands.
MAX_CATEGORIES = 12
#: A column that would make more groups than this (free text, identifiers) gets no view.
MAX_GROUPS = 30
#: An age column: ``age``, ``age_at_scan``, ``scan_age``, ``AgeAtScan``, ``ScanAge``; not
#: ``stage`` or ``dosage``.
AGE_NAME = re.compile(r"(?i:(?:^|_)age)|(?<=[a-z0-9])Age")


@dataclass
class Group:
    """One row of a group view. ``strip`` holds each scored subject's audit score
    as a position in [0, 1] (``score_position``) and whether it is flagged."""

    name: str
    n: int
    n_ok: int
    n_flagged: int
    median_score: float
    quartiles: tuple[float, float]
    strip: list[tuple[float, bool]] = field(default_factory=list)
    p_value: float = math.nan

    @property
    def flagged_rate(self) -> float:
        return self.n_flagged / self.n if self.n else math.nan


def score_position(score: np.ndarray, top: float) -> np.ndarray:
    """Audit scores (n,) on a log1p scale from 0 to ``top`` as positions in [0, 1]:
    scores of 1-5 stay apart while a failed registration at 300 fits."""
    scale = math.log1p(max(top, 1.0))
    return np.clip(np.log1p(np.clip(score, 0.0, None)) / scale, 0.0, 1.0)


@dataclass
class GroupView:
    """The groups of one grouping ``column`` (shown as ``title``), the batch-effect
    sentences and where the flag threshold sits on the strips' scale
    (``score_position``)."""

    groups: list[Group]
    notes: list[str]
    threshold_position: float
    column: str = "scanner_group"
    title: str = "scanner group"


def group_view(
    frame: pd.DataFrame,
    column: str,
    *,
    threshold: float,
    alpha: float = ALPHA,
    missing_name: str = NOT_GIVEN,
    title: str | None = None,
    label: str | None = None,
) -> GroupView:
    """The rows of a ``scores.tsv`` frame grouped by the text of ``column`` (empty cells,
    or no such column: ``missing_name``), largest group first, with their call-outs.

    ``title`` heads the view (default ``column``); ``label`` names the column in the
    call-outs ("site X is flagged more often than the rest"), None for the scanner wording.
    """
    names = _text(frame[column]) if column in frame else pd.Series("", index=frame.index)
    names = names.where(names != "", missing_name)
    return _view(
        frame,
        names,
        threshold=threshold,
        alpha=alpha,
        column=column,
        title=title or column,
        label=label,
    )


def scanner_view(frame: pd.DataFrame, *, threshold: float, alpha: float = ALPHA) -> GroupView:
    """:func:`group_view` of the ``scanner_group`` column (rows without headers:
    ``NO_HEADERS``), with the scanner wording of :func:`batch_effect_notes`."""
    return group_view(
        frame,
        "scanner_group",
        threshold=threshold,
        alpha=alpha,
        missing_name=NO_HEADERS,
        title="scanner group",
    )


def scanner_groups(frame: pd.DataFrame) -> list[Group]:
    """The scanner groups of a ``scores.tsv`` frame, largest first (:func:`group_rows`)."""
    return scanner_view(frame, threshold=math.nan).groups


def participant_views(
    frame: pd.DataFrame, *, threshold: float, alpha: float = ALPHA
) -> list[tuple[str, GroupView]]:
    """``(title, view)`` per ``participant_*`` column of a ``scores.tsv`` frame, in column order.

    Text, or numbers with at most ``MAX_CATEGORIES`` distinct values, group by value
    (numbers in their order, text largest group first); an age column groups by decade
    ("20\u201329" (en dash), title "age (bands)") and other numbers by quartile band, named by the
    range of its values ("title (bands)"). Empty cells form ``NOT_GIVEN``, last. A column
    with a single group, more than ``MAX_GROUPS`` groups, or one row per group gets no view.
    """
    views = []
    for column in frame.columns:
        if not (isinstance(column, str) and column.startswith(PARTICIPANT_PREFIX)):
            continue
        name = column.removeprefix(PARTICIPANT_PREFIX)
        grouping = participant_grouping(frame[column], name)
        if grouping is None:
            continue
        names, order, banded = grouping
        counts = names.value_counts()
        if not 1 < len(counts) <= MAX_GROUPS or counts.max() == 1:
            continue
        title = f"{name} (bands)" if banded else name
        view = _view(
            frame,
            names,
            threshold=threshold,
            alpha=alpha,
            column=column,
            title=title,
            label=name,
            order=order,
        )
        views.append((title, view))
    return views


def participant_grouping(values: pd.Series, name: str) -> tuple[pd.Series, list[str], bool] | None:
    """Each row's group name for one participants.tsv column called ``name``, the groups'
    order (``NOT_GIVEN`` last) and whether they are bands; None for an empty column."""
    text = _text(values)
    missing = text == ""
    if missing.all():
        return None
    numbers = pd.to_numeric(values.where(~missing), errors="coerce")
    numeric = bool((numbers.notna() == ~missing).all()) and not pd.api.types.is_bool_dtype(values)
    if not numeric:
        counts = text[~missing].value_counts()
        order = sorted(counts.index, key=lambda value: (-counts[value], value))
        return text.where(~missing, NOT_GIVEN), [*order, NOT_GIVEN], False
    given = numbers[~missing].astype(float)
    distinct = np.unique(given.to_numpy())
    if AGE_NAME.search(name):
        low = np.floor(given / 10) * 10
        labels = low.map(_decade)
        order = [_decade(x) for x in np.unique(low.to_numpy())]
        banded = True
    elif len(distinct) <= MAX_CATEGORIES:
        labels = given.map(_number)
        order = [_number(x) for x in distinct]
        banded = False
    else:
        bins = pd.qcut(given, 4, labels=False, duplicates="drop")
        labels = pd.Series("", index=given.index)
        order = []
        for band in sorted(bins.unique()):
            member = bins == band
            low, high = given[member].min(), given[member].max()
            label = _number(low) if low == high else f"{_number(low)}\u2013{_number(high)}"
            labels[member] = label
            order.append(label)
        banded = True
    names = pd.Series(NOT_GIVEN, index=values.index, dtype=object)
    names[~missing] = labels
    return names, [*order, NOT_GIVEN], banded


def _text(values: pd.Series) -> pd.Series:
    """Cells as stripped text; NaN, None and BIDS ``n/a`` as ""."""
    text = values.astype(object).where(values.notna(), "").astype(str).str.strip()
    return text.where(text.str.lower() != "n/a", "")


def _decade(low: float) -> str:
    """The age band from ``low`` to ``low + 9`` years: ``20\u201329`` (en dash)."""
    return f"{_number(low)}\u2013{_number(low + 9)}"


def _number(value: float) -> str:
    """A group's number: ``42`` for a whole number, else four significant digits."""
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


def _view(
    frame: pd.DataFrame,
    names: pd.Series,
    *,
    threshold: float,
    alpha: float,
    column: str,
    title: str,
    label: str | None,
    order: list[str] | None = None,
) -> GroupView:
    """The :func:`group_rows` of ``names``, their notes and the threshold's position."""
    groups = group_rows(frame, names, order=order)
    score = pd.to_numeric(frame["audit_score"], errors="coerce").to_numpy(dtype=float)
    finite = score[np.isfinite(score)]
    top = float(finite.max()) if finite.size else 1.0
    position = (
        float(score_position(np.array([threshold]), top)[0]) if math.isfinite(threshold) else 1.0
    )
    notes = batch_effect_notes(groups, alpha=alpha, label=label)
    return GroupView(groups, notes, position, column=column, title=title)


def group_rows(
    frame: pd.DataFrame, names: pd.Series, *, order: list[str] | None = None
) -> list[Group]:
    """The groups of a ``scores.tsv`` frame by each row's group name ``names``, in
    ``order`` (names not in it after, largest first) or largest first.

    Every row counts towards its group's size and flags (a failed or unreadable
    scan of a scanner is that scanner's too); scores and their strip come from
    the rows with a finite ``audit_score``. ``p_value``: one-sided Fisher exact
    test that the group is flagged more often than the other rows, Bonferroni
    corrected over the groups (NaN with a single group).
    """
    if frame.empty:
        return []
    names = names.astype(str)
    flagged = frame["flagged"].astype(bool).to_numpy()
    ok = (frame["status"].astype(str) == "ok").to_numpy()
    score = pd.to_numeric(frame["audit_score"], errors="coerce").to_numpy(dtype=float)
    finite = np.isfinite(score)
    top = float(score[finite].max()) if finite.any() else 1.0
    position = score_position(np.where(finite, score, 0.0), top)
    groups = []
    unique = names.unique().tolist()
    for name in unique:
        member = (names == name).to_numpy()
        scored = member & finite
        values = score[scored]
        inside, outside = member, ~member
        p_value = math.nan
        if len(unique) > 1:
            table = [
                [int((flagged & inside).sum()), int((~flagged & inside).sum())],
                [int((flagged & outside).sum()), int((~flagged & outside).sum())],
            ]
            p_value = min(
                1.0, float(stats.fisher_exact(table, alternative="greater")[1]) * len(unique)
            )
        groups.append(
            Group(
                name=name,
                n=int(member.sum()),
                n_ok=int((member & ok).sum()),
                n_flagged=int((member & flagged).sum()),
                median_score=float(np.median(values)) if values.size else math.nan,
                quartiles=(
                    (float(np.quantile(values, 0.25)), float(np.quantile(values, 0.75)))
                    if values.size
                    else (math.nan, math.nan)
                ),
                strip=[
                    (float(p), bool(f))
                    for p, f in zip(position[scored], flagged[scored], strict=True)
                ],
                p_value=p_value,
            )
        )
    rank = {name: i for i, name in enumerate(order or [])}
    groups.sort(key=lambda g: (rank.get(g.name, len(rank)), -g.n, g.name))
    return groups


def batch_effect_notes(
    groups: list[Group], *, alpha: float = ALPHA, label: str | None = None
) -> list[str]:
    """A sentence per group flagged more often than the rest of the cohort (corrected
    ``p_value`` below ``alpha``), naming the rates and the test. ``label`` names the
    grouping column ("site X is flagged more often than the rest"); None: scanner groups."""
    total = sum(g.n for g in groups)
    total_flagged = sum(g.n_flagged for g in groups)
    notes = []
    for group in groups:
        if not (group.p_value < alpha):
            continue
        rest, rest_flagged = total - group.n, total_flagged - group.n_flagged
        evidence = (
            f"{group.n_flagged} of {group.n} flagged ({100 * group.flagged_rate:.0f} %) "
            f"against {rest_flagged} of {rest} ({100 * rest_flagged / rest:.0f} %) in the other "
            f"groups (one-sided Fisher exact test, p = {group.p_value:.2g} after Bonferroni "
            f"over {len(groups)} groups)."
        )
        if label is None:
            notes.append(
                f"Possible batch effect: {group.name}: {evidence} Check whether this "
                "scanner's scans are bad or only different before excluding them."
            )
        else:
            notes.append(
                f"{label} {group.name} is flagged more often than the rest: {evidence} "
                "Check whether these scans are bad or only different before excluding them."
            )
    return notes
