"""Reading the per-subject stage records into one row per subject.

``read_subject_records`` loads every stage record of a subject
(``paths.record``), ``read_contrast_records`` those of its other contrasts
(``paths.contrast_record``); ``_subject_row`` merges them into its row (status,
reason and stage of the first problem, findings, metrics with
``METRIC_PREFIXES``, and per contrast its ``contrast_column`` cells).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriaudit import cohort, paths
from mriaudit.records import FAILED, OK, STATUSES, _jsonable

#: Metric columns copied from the records into scores.tsv, in this order.
METRIC_PREFIXES: tuple[str, ...] = ("anomaly_", "iqm_", "hdr_", "reg_", "conv_", "n4_")

#: Threads reading records and writing subject JSONs (file-system bound).
IO_THREADS = 8


def _read_record(path: Path, stage: str) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        return {"stage": stage, "status": FAILED, "reason": f"unreadable {stage} record: {error}"}
    if not isinstance(record, dict):
        return {"stage": stage, "status": FAILED, "reason": f"{stage} record is not a JSON object"}
    return record


def read_subject_records(out_dir: Path, bids_id: str) -> dict[str, dict[str, Any] | None]:
    """The record of every stage in ``paths.STAGES`` order (None where absent)."""
    return {
        stage: _read_record(paths.record(out_dir, bids_id, stage), stage) for stage in paths.STAGES
    }


def read_contrast_records(
    out_dir: Path, bids_id: str, *, contrasts: Sequence[str] = paths.EXTRA_CONTRASTS
) -> dict[str, dict[str, Any]]:
    """The record of each of ``contrasts`` (the ones audited beside the T1w) by contrast,
    with the record of its model's score stage under ``"score"`` (None where it was not
    scored); a contrast without a record (``paths.contrast_record``) is left out."""
    found = {}
    for contrast in contrasts:
        record = _read_record(paths.contrast_record(out_dir, bids_id, contrast), contrast)
        if record is not None:
            score = paths.contrast_score_record(out_dir, bids_id, contrast)
            found[contrast] = {**record, "score": _read_record(score, "score")}
    return found


def _contrast_score(record: dict[str, Any]) -> dict[str, Any]:
    """What a contrast's model said of the subject: its raw score (NaN unless ``ok``),
    whether the subject trained that model, its most anomalous regions."""
    score = record.get("score") or {}
    raw = (score.get("metrics") or {}).get("anomaly_raw") if score.get("status") == OK else None
    regions = score.get("top_regions")
    return {
        "anomaly_raw": _as_float(raw),
        "in_reference": bool(score.get("in_reference", False)),
        "top_regions": regions if isinstance(regions, list) else [],
    }


def contrast_column(contrast: str, name: str) -> str:
    """A contrast's column in scores.tsv: ``t2w_status``, ``flair_coreg_alignment``."""
    return f"{contrast.lower()}_{name}"


def _contrast_cells(contrast: str, record: dict[str, Any]) -> dict[str, Any]:
    """A contrast's status, reason and metrics as row cells (``contrast_column`` names)."""
    cells = {
        contrast_column(contrast, "status"): record.get("status", FAILED),
        contrast_column(contrast, "reason"): str(record.get("reason") or ""),
    }
    for key, value in (record.get("metrics") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            cells[contrast_column(contrast, key)] = value
    cells[contrast_column(contrast, "anomaly_raw")] = _contrast_score(record)["anomaly_raw"]
    return cells


def _first_problem(records: dict[str, dict[str, Any] | None]) -> tuple[str, str, str]:
    """``(status, reason, stage)`` of the first record that is not ok, else ``(ok, "", "")``."""
    for stage, record in records.items():
        if record is None:
            return FAILED, f"no {stage} record (the stage did not run)", stage
        status = record.get("status", FAILED)
        if status != OK:
            status = status if status in STATUSES else FAILED
            reason = str(record.get("reason") or f"{stage} ended {status}")
            return status, reason, stage
    return OK, "", ""


def _plain(value: Any) -> Any:
    """A record value as a table cell: scalars stay, lists and dicts become JSON."""
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return value


def _subject_row(
    subject: cohort.Subject,
    records: dict[str, dict[str, Any] | None],
    contrasts: dict[str, dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One scores.tsv row (before cohort statistics) and the extras for the subject JSON;
    ``contrasts``: the records of the contrasts beside the T1w (``read_contrast_records``)."""
    contrasts = contrasts or {}
    status, reason, failed_stage = _first_problem(records)
    metrics: dict[str, Any] = {}
    findings: list[str] = []
    for record in records.values():
        if not record:
            continue
        if isinstance(record.get("metrics"), dict):
            metrics.update(record["metrics"])
        for code in record.get("findings") or []:
            if code not in findings:
                findings.append(str(code))
    score = records.get("score") or {}
    raw = metrics.get("anomaly_raw") if score.get("status") == OK else None
    row: dict[str, Any] = {
        "folder": subject.folder,
        "bids_id": subject.bids_id,
        "status": status,
        "reason": reason,
        "anomaly_raw": _as_float(raw),
        "failed_stage": failed_stage,
        "in_reference": bool(score.get("in_reference", False)),
        "fold": score.get("fold"),
    }
    for key, value in metrics.items():
        # anomaly_raw is already in the row, and only when the score stage is ok.
        if key.startswith(METRIC_PREFIXES) and key not in row:
            row[key] = _plain(value)
    for contrast, record in contrasts.items():
        row.update(_contrast_cells(contrast, record))
    top_regions = score.get("top_regions") if isinstance(score.get("top_regions"), list) else []
    detail = {
        "metrics": metrics,
        "warnings": {
            stage: record.get("warnings", [])
            for stage, record in records.items()
            if record and record.get("warnings")
        },
        # Each stage's record without its metrics: they are merged above, and
        # repeating them would double the file for nothing.
        "records": {
            stage: None if record is None else {k: v for k, v in record.items() if k != "metrics"}
            for stage, record in records.items()
        },
        "contrasts": contrasts,
    }
    extra = {
        "findings": findings,
        "top_regions": top_regions,
        # Each contrast's status, reason and findings: its flag reasons and notes.
        "contrasts": {
            contrast: {
                "status": record.get("status", FAILED),
                "reason": str(record.get("reason") or ""),
                "skipped": bool(record.get("skipped")),
                "findings": [str(code) for code in record.get("findings") or []],
                "metrics": record.get("metrics") or {},
                "registration": str(record.get("registration") or ""),
                **_contrast_score(record),
            }
            for contrast, record in contrasts.items()
        },
        # Only findings need the metrics again (the counts in their reasons).
        "metrics": metrics if findings else {},
        # The subject JSON's bulk, kept as text until it is written: 100,000 subjects'
        # records as dicts would hold gigabytes (see aggregate.scores.aggregate_cohort).
        "detail": compact_json(detail),
    }
    return row, extra


#: The detail of a subject without records (a folder that was never processed).
EMPTY_DETAIL = '{"metrics": {}, "warnings": {}, "records": {}}'


def compact_json(data: dict[str, Any]) -> str:
    """One-line JSON by the C encoder; values strict JSON cannot hold (NaN from a
    hand-edited record, numpy scalars) converted as records are (``records.write_json``)."""
    try:
        return json.dumps(data, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):
        return json.dumps(_jsonable(data), allow_nan=False, ensure_ascii=False)


def _as_float(value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def _numeric(frame: pd.DataFrame, column: str) -> np.ndarray:
    if column not in frame:
        return np.full(len(frame), np.nan)
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)


def _fmt(value: float) -> str:
    return f"{value:.4g}"
