"""``cohort/stages.tsv``: each subject's status per stage, its first problem, the prescreen.

The model and cohort rules start from this table instead of the subjects'
files; its ``prescreen`` column keeps subjects the audit already flags without
the model (a hard finding, or an audit score of IQMs, artefact measures and
registration at the threshold) out of the model's reference.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriaudit import paths
from mriaudit.aggregate.judge import _audit, flag_settings
from mriaudit.aggregate.reasons import AUDIT_REASON, FLAGGING_FINDINGS
from mriaudit.aggregate.rows import (
    IO_THREADS,
    METRIC_PREFIXES,
    _first_problem,
    _plain,
    _read_record,
)
from mriaudit.records import OK
from mriaudit.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)


def write_stage_table(
    out_dir: Path, bids_ids: Sequence[str], *, out_tsv: Path, flag: dict[str, Any] | None = None
) -> pd.DataFrame:
    """The status of each ``paths.PREPROCESS_STAGES`` record of each subject, and its first problem.

    One row per subject: ``bids_id``, a column per stage (``ok``,
    ``failed``, ``no_series``, or ``missing``), ``status``, ``failed_stage``
    and ``reason`` of the first stage that is not ok, and ``prescreen``: why
    the audit without the model already flags the subject (a hard finding, or
    an audit score of its IQMs, artefact measures and registration at or above
    the threshold of ``flag``), empty otherwise. Such a subject does not train
    the normative model: a noisy, ghosted or folded image is not normal
    anatomy, and a reference made of them widens what the model calls normal.
    The model and cohort rules start from this table instead of the subjects' files.
    """
    stages = paths.PREPROCESS_STAGES

    def row(bids_id: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        loaded = {s: _read_record(paths.record(out_dir, bids_id, s), s) for s in stages}
        status, reason, stage = _first_problem(loaded)
        cells = {s: (r or {}).get("status", "missing") for s, r in loaded.items()}
        metrics: dict[str, Any] = {}
        findings: list[str] = []
        for record in loaded.values():
            metrics.update((record or {}).get("metrics") or {})
            findings += [str(code) for code in (record or {}).get("findings") or []]
        table_row = {
            "bids_id": bids_id,
            **cells,
            "status": status,
            "failed_stage": stage,
            "reason": reason,
        }
        return table_row, metrics, findings

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        loaded_rows = list(pool.map(row, bids_ids))
    columns = ["bids_id", *stages, "status", "failed_stage", "reason"]
    frame = pd.DataFrame([r for r, _, _ in loaded_rows], columns=columns)
    frame["prescreen"], frame["scanner_group"] = _prescreen(frame, loaded_rows, flag_settings(flag))
    write_tsv(frame, Path(out_tsv))
    log.info(
        "%d subjects, %d ok after %s", len(frame), int((frame["status"] == OK).sum()), stages[-1]
    )
    return frame


def read_prescreen(stage_table: Path) -> dict[str, str]:
    """``{bids_id: reason}`` of the rows of ``stages.tsv`` whose ``prescreen`` is set."""
    frame = read_tsv(stage_table, text=True)
    if "prescreen" not in frame:
        return {}
    return {s: r for s, r in zip(frame["bids_id"], frame["prescreen"], strict=True) if r}


def read_scanner_groups(stage_table: Path) -> dict[str, str]:
    """``{bids_id: scanner group}`` of ``stages.tsv`` (empty for a scan without headers)."""
    frame = read_tsv(stage_table, text=True)
    if "scanner_group" not in frame:
        return {}
    return dict(zip(frame["bids_id"], frame["scanner_group"], strict=True))


def _prescreen(
    frame: pd.DataFrame,
    loaded_rows: list[tuple[dict[str, Any], dict[str, Any], list[str]]],
    settings: dict[str, float],
) -> tuple[list[str], list[str]]:
    """Per row, why the audit without the model flags it ("" when it does not), and the
    row's scanner group (``audit.scanner_groups``)."""
    metrics = pd.DataFrame(
        [
            {k: _plain(v) for k, v in m.items() if k.startswith(METRIC_PREFIXES)}
            for _, m, _ in loaded_rows
        ],
        index=frame.index,
    )
    ok = frame["status"].to_numpy(dtype=str) == OK
    hard_reasons = [
        next((FLAGGING_FINDINGS[c] for c in codes if c in FLAGGING_FINDINGS), "")
        for _, _, codes in loaded_rows
    ]
    hard = np.array([bool(r) for r in hard_reasons], dtype=bool) | ~ok
    result = _audit(metrics, ok, hard, settings)
    reasons = []
    for i in range(len(frame)):
        if not ok[i]:
            reasons.append(f"status {frame.at[i, 'status']}")
        elif hard_reasons[i]:
            reasons.append(hard_reasons[i])
        elif np.isfinite(result.score[i]) and result.score[i] >= result.threshold:
            reasons.append(f"{AUDIT_REASON}{result.score[i]:.1f} without the model")
        else:
            reasons.append("")
    return reasons, list(result.groups)
