"""The cohort's tables: scores.tsv, exclusions.tsv, subjects.tsv and sub-<id>_scores.json.

``aggregate_cohort`` lists the subjects of ``input_dir``, reads their rows
(``rows``), judges them (``judge``) and writes the cohort's tables in the
project's TSV dialect (``mriaudit.tables``) plus each subject's JSON (its row,
evidence and the images that exist); ``read_scores`` reads scores.tsv back.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriaudit import bids_input, cohort, files, paths
from mriaudit.aggregate.judge import _judge, flag_settings
from mriaudit.aggregate.reasons import _top_region_text
from mriaudit.aggregate.rows import (
    EMPTY_DETAIL,
    IO_THREADS,
    METRIC_PREFIXES,
    _as_float,
    _subject_row,
    compact_json,
    contrast_column,
    read_contrast_records,
    read_subject_records,
)
from mriaudit.records import FAILED, OK
from mriaudit.tables import read_tsv, validate, write_tsv

log = logging.getLogger(__name__)


_STRING_COLUMNS = (
    "folder",
    "bids_id",
    "status",
    "reason",
    "failed_stage",
    "flag_reasons",
    "findings",
    "notes",
    "scanner_group",
    "session",
    "run",
)
_BOOL_COLUMNS = ("flagged", "in_reference")
#: Columns of the BIDS root's participants.tsv travel into scores.tsv under this prefix.
PARTICIPANT_PREFIX = "participant_"
_BASE_COLUMNS = (
    "folder",
    "bids_id",
    "status",
    "reason",
    "audit_score",
    "anomaly_score",
    "anomaly_raw",
    "flagged",
    "flag_reasons",
    "findings",
    "notes",
    "failed_stage",
    "in_reference",
    "fold",
    "scanner_group",
    "session",
    "run",
)


def _ordered_columns(frame: pd.DataFrame, *, with_labels: bool) -> list[str]:
    columns = list(_BASE_COLUMNS)
    for prefix in METRIC_PREFIXES:
        columns += [c for c in frame.columns if c.startswith(prefix) and c not in columns]
    for contrast in paths.EXTRA_CONTRASTS:
        prefix = contrast_column(contrast, "")
        columns += [c for c in frame.columns if c.startswith(prefix) and c not in columns]
    columns += [c for c in frame.columns if c.startswith(PARTICIPANT_PREFIX)]
    if with_labels:
        columns.append("truth")
    return columns


def read_scores(path: Path) -> pd.DataFrame:
    """scores.tsv as written by ``aggregate_cohort``, validated by ``schemas/scores.schema.yaml``.

    Text columns are str ("" when empty), booleans bool, numbers float; a
    table that does not match its schema raises ``ValueError`` naming the
    column and rows (a hand-edited or truncated file).
    """
    frame = read_tsv(path, text_columns=_STRING_COLUMNS, bool_columns=_BOOL_COLUMNS)
    return validate(frame, "scores", source=f"scores table {str(path)!r}")


def aggregate_cohort(
    input_dir: Path,
    out_dir: Path,
    *,
    labels_path: str | None,
    flag: dict[str, Any],
    out_scores: Path,
    out_exclusions: Path,
    out_subjects: Path,
    resolution: int,
    contrasts: Sequence[str] = paths.EXTRA_CONTRASTS,
) -> pd.DataFrame:
    """Merge every subject's records into scores.tsv, exclusions.tsv and subjects.tsv.

    ``resolution`` is the template grid (mm) of the registered images, whose names
    the subject JSON's ``images`` manifest lists (what :func:`subject_image` reads).
    ``contrasts``: those audited beside the T1w (config ``contrasts``); a record of
    another, left by an earlier run, is not read.

    One row per first-level folder of ``input_dir`` (folders with a naming
    problem included, as ``failed``), sorted flagged first then by
    ``anomaly_score`` descending. Also writes ``paths.subject_scores(out_dir,
    bids_id)`` for every processed subject. Returns the table (``flagged`` and
    ``in_reference`` as bool; the files write ``true``/``false``).
    """
    settings = flag_settings(flag)
    subjects = cohort.list_subjects(input_dir, cache_dir=paths.index_cache(out_dir))
    labels = cohort.read_labels(labels_path) if labels_path else None
    rows: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []

    def load(subject: cohort.Subject) -> tuple[dict[str, Any], dict[str, Any]] | None:
        if subject.problem:
            return None
        # Each subject's records become its row and compact extras at once, so the
        # records of 100,000 subjects are never all in memory together.
        return _subject_row(
            subject,
            read_subject_records(out_dir, subject.bids_id),
            read_contrast_records(out_dir, subject.bids_id, contrasts=contrasts),
        )

    # Tens of thousands of small files: threads overlap the file system's latency.
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        loaded = list(pool.map(load, subjects))
    for subject, row_extra in zip(subjects, loaded, strict=True):
        if row_extra is None:
            rows.append(
                {
                    "folder": subject.folder,
                    "bids_id": subject.bids_id,
                    "status": FAILED,
                    "reason": subject.problem,
                    "failed_stage": "cohort",
                    "anomaly_raw": math.nan,
                    "in_reference": False,
                }
            )
            extras.append(
                {"detail": EMPTY_DETAIL, "metrics": {}, "findings": [], "top_regions": []}
            )
            continue
        rows.append(row_extra[0])
        extras.append(row_extra[1])
    del loaded
    frame = pd.DataFrame(rows, columns=None if rows else list(_BASE_COLUMNS))
    if labels is not None:
        unknown = sorted(set(labels) - {s.folder for s in subjects})
        if unknown:
            log.warning(
                "%d labelled subjects are not in input_dir, e.g. %s", len(unknown), unknown[:3]
            )
        frame["truth"] = pd.array([labels.get(s.folder) for s in subjects], dtype="Int64")
    frame["session"] = [s.session for s in subjects]
    frame["run"] = [s.run for s in subjects]
    for column, values in participant_columns(input_dir, subjects).items():
        frame[column] = values
    frame, summary = _judge(frame, extras, settings)
    frame = frame.reindex(columns=_ordered_columns(frame, with_labels=labels is not None))
    order = np.lexsort(
        (
            frame["folder"].to_numpy(dtype=str),
            -np.nan_to_num(frame["audit_score"].to_numpy(dtype=float), nan=-np.inf),
            ~frame["flagged"].to_numpy(dtype=bool),
        )
    )
    frame = frame.iloc[order].reset_index(drop=True)
    extras = [extras[i] for i in order]
    write_tsv(frame, out_scores)
    write_tsv(_exclusions(frame, extras), out_exclusions)
    write_tsv(
        pd.DataFrame(
            {
                "folder": [s.folder for s in subjects],
                "entry": [s.entry for s in subjects],
                "bids_id": [s.bids_id for s in subjects],
                "problem": [s.problem for s in subjects],
            }
        ),
        out_subjects,
    )
    processed = {s.folder for s in subjects if s.processed}

    def write_subject(item: tuple[dict[str, Any], dict[str, Any]]) -> None:
        row, extra = item
        if row["folder"] in processed:
            path = paths.subject_scores(out_dir, row["bids_id"])
            data = _subject_json(row, extra, summary)
            # The manifest of what exists, relative to the output folder.
            data["images"] = {
                name: image.relative_to(out_dir).as_posix()
                for name, image in paths.subject_images(
                    out_dir, row["bids_id"], res=resolution
                ).items()
                if image.is_file()
            }
            # The record-level detail is spliced in as the text it was kept as.
            text = compact_json(data)[:-1] + ", " + extra["detail"][1:]
            files.write_text(path, text + "\n")

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        list(pool.map(write_subject, zip(frame.to_dict("records"), extras, strict=True)))
    n_flagged = int(frame["flagged"].sum())
    log.info(
        "aggregated %d subjects: %d ok, %d flagged (audit threshold %.2f)",
        len(frame),
        int((frame["status"] == OK).sum()),
        n_flagged,
        summary["audit_threshold"],
    )
    return frame


def participant_columns(input_dir: Path, subjects: list[cohort.Subject]) -> dict[str, list[Any]]:
    """``participants.tsv``'s columns (age, sex, site, ...) for each unit, by its subject,
    as ``participant_<column>`` (names reduced to letters, digits and ``_``); numbers
    where a whole column parses as numbers. None when input_dir is no BIDS root or
    has no such file; describing only: no column enters a score."""
    if not cohort.is_bids_root(input_dir):
        return {}
    table = bids_input.read_participants(input_dir)
    columns = {}
    for name in table.columns:
        values = table[name]
        numbers = pd.to_numeric(values, errors="coerce")
        if numbers.notna().sum() == values.notna().sum():
            values = numbers
        column = PARTICIPANT_PREFIX + re.sub(r"[^A-Za-z0-9_]", "_", str(name))
        lookup = values.to_dict()
        columns[column] = [lookup.get(s.subject) for s in subjects]
    return columns


def subject_image(out_dir: Path, bids_id: str, name: str) -> Path | None:
    """The image ``name`` (a key of ``paths.subject_images``) of a scan as its subject JSON
    lists it, or None when the scan has none (or no JSON): readers need not know the grid."""
    try:
        images = json.loads(paths.subject_scores(out_dir, bids_id).read_text())["images"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    relative = images.get(name) if isinstance(images, dict) else None
    return Path(out_dir) / relative if isinstance(relative, str) else None


def _exclusions(frame: pd.DataFrame, extras: list[dict[str, Any]]) -> pd.DataFrame:
    """Flagged subjects with their reasons and the evidence behind them."""
    flagged = frame["flagged"].to_numpy(dtype=bool)
    table = pd.DataFrame(
        {
            "folder": frame["folder"],
            "bids_id": frame["bids_id"],
            "status": frame["status"],
            "reasons": frame["flag_reasons"],
            "audit_score": frame["audit_score"],
            "anomaly_score": frame["anomaly_score"],
            "findings": frame["findings"],
            "iqm_outliers": ["; ".join(e["iqm_outliers"]) for e in extras],
            "top_region": [_top_region_text(e["top_regions"]) for e in extras],
        }
    )
    if "truth" in frame:
        table["truth"] = frame["truth"]
    return table[flagged].reset_index(drop=True)


def _finite(value: Any) -> float | None:
    number = _as_float(value)
    return number if math.isfinite(number) else None


def _subject_json(
    row: dict[str, Any], extra: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    """Everything known about one subject but its records: its row, lists and IQM z-scores.

    The writer adds the record-level detail kept by ``rows._subject_row``:
    ``metrics`` merges every stage's metrics (later stages win on a shared
    name), ``warnings`` per stage, ``records`` keeps each stage's status,
    reason, findings, warnings, timing and extras, and ``contrasts`` the record of
    each contrast beside the T1w.
    """
    data = {
        "folder": row["folder"],
        "bids_id": row["bids_id"],
        "status": row["status"],
        "reason": row["reason"],
        "failed_stage": row["failed_stage"],
        "flagged": bool(row["flagged"]),
        "flag_reasons": extra["flag_reasons"],
        "findings": extra["findings"],
        "notes": extra["notes"],
        "anomaly_raw": _finite(row["anomaly_raw"]),
        "anomaly_score": _finite(row["anomaly_score"]),
        "audit_score": _finite(row["audit_score"]),
        "scanner_group": row["scanner_group"],
        "audit_drivers": extra["audit_drivers"],
        "in_reference": bool(row["in_reference"]),
        "fold": None if _finite(row.get("fold")) is None else int(row["fold"]),
        "top_regions": extra["top_regions"],
        "iqm_z": extra["iqm_z"],
        "iqm_outliers": extra["iqm_outliers"],
        "cohort": {k: _finite(v) if isinstance(v, float) else v for k, v in summary.items()},
    }
    if "truth" in row:
        value = row["truth"]
        data["truth"] = None if pd.isna(value) else int(value)
    return data
