"""Reading the per-subject stage records into one row per subject.

``read_subject_records`` loads every stage record of a subject
(``paths.record``); ``_subject_row`` merges them into its row (status, reason
and stage of the first problem, findings, metrics with ``METRIC_PREFIXES``).
"""

from __future__ import annotations

import json
import math
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
    subject: cohort.Subject, records: dict[str, dict[str, Any] | None]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One scores.tsv row (before cohort statistics) and the extras for the subject JSON."""
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
    }
    extra = {
        "findings": findings,
        "top_regions": top_regions,
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
