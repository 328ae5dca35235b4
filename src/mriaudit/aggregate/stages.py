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

from mriaudit import audit, paths
from mriaudit.aggregate.judge import _audit, flag_settings
from mriaudit.aggregate.reasons import AUDIT_REASON, CONTRAST_FINDINGS, FLAGGING_FINDINGS
from mriaudit.aggregate.rows import (
    IO_THREADS,
    METRIC_PREFIXES,
    _first_problem,
    _plain,
    _read_record,
    contrast_column,
)
from mriaudit.records import OK
from mriaudit.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)


def write_stage_table(
    out_dir: Path,
    bids_ids: Sequence[str],
    *,
    out_tsv: Path,
    flag: dict[str, Any] | None = None,
    contrasts: Sequence[str] = (),
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
    Each of ``contrasts`` (those beside the T1w) gets its own ``<contrast>_prescreen``
    (``t2w_prescreen``): its hard findings, or its audit score without its model
    (``audit.CONTRAST_MEASURES``) at the threshold; a ghosted T2w does not train the
    T2w's model.
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
    settings = flag_settings(flag)
    frame["prescreen"], frame["scanner_group"] = _prescreen(frame, loaded_rows, settings)
    hdr = pd.DataFrame(
        [{k: _plain(v) for k, v in m.items() if k.startswith("hdr_")} for _, m, _ in loaded_rows],
        index=frame.index,
    )
    for contrast in contrasts:
        frame[contrast_column(contrast, "prescreen")] = _contrast_prescreen(
            out_dir, list(frame["bids_id"]), contrast, hdr, settings
        )
    write_tsv(frame, Path(out_tsv))
    log.info(
        "%d subjects, %d ok after %s", len(frame), int((frame["status"] == OK).sum()), stages[-1]
    )
    return frame


def read_prescreen(stage_table: Path, *, contrast: str = "T1w") -> dict[str, str]:
    """``{bids_id: reason}`` of the rows of ``stages.tsv`` whose ``prescreen`` is set.

    For another ``contrast`` than the T1w: those whose ``<contrast>_prescreen`` is, and
    those the T1w's keeps out for its status or a hard finding (the contrast reaches the
    template through the T1w's registration), not for the T1w's audit score: a noisy T1w
    says nothing of its T2w, and a small cohort would be left without a reference.
    """
    frame = read_tsv(stage_table, text=True)
    found: dict[str, str] = {}
    own = contrast_column(contrast, "prescreen")
    if contrast != "T1w" and own in frame:
        found = {
            s: f"{contrast}: {r}" for s, r in zip(frame["bids_id"], frame[own], strict=True) if r
        }
    if "prescreen" in frame:
        for subject, reason in zip(frame["bids_id"], frame["prescreen"], strict=True):
            if not reason or subject in found:
                continue
            if contrast == "T1w" or not reason.startswith(AUDIT_REASON):
                found[subject] = reason
    return found


def read_scanner_groups(stage_table: Path) -> dict[str, str]:
    """``{bids_id: scanner group}`` of ``stages.tsv`` (empty for a scan without headers)."""
    frame = read_tsv(stage_table, text=True)
    if "scanner_group" not in frame:
        return {}
    return dict(zip(frame["bids_id"], frame["scanner_group"], strict=True))


def _contrast_prescreen(
    out_dir: Path,
    bids_ids: list[str],
    contrast: str,
    hdr: pd.DataFrame,
    settings: dict[str, float],
) -> list[str]:
    """Per subject, why the audit of ``contrast`` without its model flags it ("" when it
    does not, or when the subject has no such image)."""

    def read(bids_id: str) -> dict[str, Any] | None:
        return _read_record(paths.contrast_record(out_dir, bids_id, contrast), contrast)

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        loaded = list(pool.map(read, bids_ids))
    measures = [name for name in audit.CONTRAST_MEASURES if name != "anomaly_raw"]
    metrics = pd.DataFrame(
        [
            {name: _plain(((r or {}).get("metrics") or {}).get(name)) for name in measures}
            for r in loaded
        ],
        index=hdr.index,
    )
    ok = np.array([(r or {}).get("status") == OK for r in loaded], dtype=bool)
    hard_reasons = [
        next(
            (
                CONTRAST_FINDINGS[c]
                for c in (r or {}).get("findings") or []
                if c in CONTRAST_FINDINGS
            ),
            "",
        )
        for r in loaded
    ]
    hard = np.array([bool(reason) for reason in hard_reasons], dtype=bool)
    result = _audit(pd.concat([hdr, metrics], axis=1), ok, hard | ~ok, settings)
    return _prescreen_reasons(result, ok, hard_reasons, [""] * len(loaded))


def _prescreen_reasons(
    result: audit.AuditResult, ok: np.ndarray, hard_reasons: list[str], not_ok: list[str]
) -> list[str]:
    """Per row: ``not_ok``'s reason when not ok, else its hard finding, else the audit
    score without the model at its threshold, else ""."""
    reasons = []
    for i, hard_reason in enumerate(hard_reasons):
        if not ok[i]:
            reasons.append(not_ok[i])
        elif hard_reason:
            reasons.append(hard_reason)
        elif np.isfinite(result.score[i]) and result.score[i] >= result.threshold:
            reasons.append(f"{AUDIT_REASON}{result.score[i]:.1f} without the model")
        else:
            reasons.append("")
    return reasons


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
    not_ok = [f"status {status}" for status in frame["status"]]
    return _prescreen_reasons(result, ok, hard_reasons, not_ok), list(result.groups)
