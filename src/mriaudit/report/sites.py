"""The report's scanner view: how subjects, flags and scores fall over scanner groups.

Before excluding thirty scans from one scanner, a curator checks whether that
scanner is different rather than its scans bad. Each scanner-and-protocol
group (``scores.tsv`` column ``scanner_group``, from the headers:
``audit.scanner_groups``) gets its size, status counts, flagged rate and the
spread of its audit scores; a group flagged more often than the rest of the
cohort, beyond what chance explains, is called out as a possible batch effect.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

#: Family-wise error rate of the batch-effect call-outs (one-sided Fisher exact test per
#: group against the rest of the cohort, Bonferroni over the groups).
ALPHA = 0.05
#: Name shown for rows without scanner headers (NIfTI input, unreadable folders).
NO_HEADERS = "no scanner headers (NIfTI or unreadable)"


@dataclass
class ScannerGroup:
    """One row of the scanner view. ``strip`` holds each scored subject's audit score
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
class ScannerView:
    """The scanner groups, the batch-effect sentences and where the flag threshold
    sits on the strips' scale (``score_position``)."""

    groups: list[ScannerGroup]
    notes: list[str]
    threshold_position: float


def scanner_view(frame: pd.DataFrame, *, threshold: float, alpha: float = ALPHA) -> ScannerView:
    """:func:`scanner_groups` and :func:`batch_effect_notes` of a ``scores.tsv`` frame, with
    the flag ``threshold`` placed on the strips' scale."""
    groups = scanner_groups(frame)
    score = pd.to_numeric(frame["audit_score"], errors="coerce").to_numpy(dtype=float)
    finite = score[np.isfinite(score)]
    top = float(finite.max()) if finite.size else 1.0
    position = (
        float(score_position(np.array([threshold]), top)[0]) if math.isfinite(threshold) else 1.0
    )
    return ScannerView(groups, batch_effect_notes(groups, alpha=alpha), position)


def scanner_groups(frame: pd.DataFrame) -> list[ScannerGroup]:
    """The scanner groups of a ``scores.tsv`` frame, largest first.

    Every row counts towards its group's size and flags (a failed or unreadable
    scan of a scanner is that scanner's too); scores and their strip come from
    the rows with a finite ``audit_score``. ``p_value``: one-sided Fisher exact
    test that the group is flagged more often than the other rows, Bonferroni
    corrected over the groups (NaN with a single group).
    """
    if frame.empty:
        return []
    names = (
        frame["scanner_group"].fillna("").astype(str)
        if "scanner_group" in frame
        else pd.Series([""] * len(frame), index=frame.index)
    )
    names = names.where(names.str.strip() != "", NO_HEADERS)
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
            ScannerGroup(
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
    groups.sort(key=lambda g: (-g.n, g.name))
    return groups


def batch_effect_notes(groups: list[ScannerGroup], *, alpha: float = ALPHA) -> list[str]:
    """A sentence per group flagged more often than the rest of the cohort (corrected
    ``p_value`` below ``alpha``), naming the rates and the test."""
    total = sum(g.n for g in groups)
    total_flagged = sum(g.n_flagged for g in groups)
    notes = []
    for group in groups:
        if not (group.p_value < alpha):
            continue
        rest, rest_flagged = total - group.n, total_flagged - group.n_flagged
        notes.append(
            f"Possible batch effect: {group.name}: {group.n_flagged} of {group.n} flagged "
            f"({100 * group.flagged_rate:.0f} %) against {rest_flagged} of {rest} "
            f"({100 * rest_flagged / rest:.0f} %) in the other groups (one-sided Fisher exact "
            f"test, p = {group.p_value:.2g} after Bonferroni over {len(groups)} groups). "
            "Check whether this scanner's scans are bad or only different before excluding them."
        )
    return notes
