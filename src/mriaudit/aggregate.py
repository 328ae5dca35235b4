"""Cohort aggregation: one row per subject folder, robust z-scores, flags and reasons.

Reads the status records of every per-subject stage (``paths.record``), merges
them into one row per first-level folder of ``input_dir`` and judges each
subject against the cohort:

- ``anomaly_score`` is the robust z of the model's ``anomaly_raw`` against the
  reference subjects: ``(raw - median_ref) / (1.4826 * MAD_ref)`` over subjects
  that are ``ok`` and ``in_reference`` (higher = more anomalous; NaN when not
  scored): the model alone, kept for comparison.
- ``audit_score`` fuses the model, every IQM, the artefact measures and the
  registration similarity into one calibrated outlier score, standardised per
  scanner group where groups differ (``mriaudit.audit``); ``scanner_group`` is
  the group key from the headers.

Flag rules (config ``flag``; defaults in ``DEFAULT_FLAG``):

- hard findings: status ``failed`` / ``no_series`` (with the stage's reason),
  header findings that make the series unreliable (missing or duplicate slices,
  mixed orientation or dimensions, non-uniform spacing, inconsistent rescale,
  unreadable files), ``registration_failed``, ``header_orientation`` and an
  image identical to another subject's;
- ``audit_score >= max(audit_z, fp_budget point)`` (see ``audit.audit_threshold``),
  the reason naming the components whose evidence is at least ``component_z``.

Reported but not flagged (column ``notes``, and ``findings``):

- ``2d_only``: the audited series is the 2D fallback; it is usable and the
  IQMs and the anomaly model still judge it, so it is a note for the curator;
- ``derived_only``, ``post_contrast_only``, ``repeat_series``: what the series
  selection had to settle for or choose between (``mriaudit.series``); the image
  is judged like any other;
- ``not_scored``: the anomaly model gave no score; the other checks still ran;
- protocol deviations from the cohort mode (field strength, manufacturer,
  TR/TE/TI, flip angle, voxel size): multi-site cohorts mix protocols on purpose,
  and whether the image itself is fine is judged by the IQMs and the model.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriaudit import audit, cohort, paths
from mriaudit.records import FAILED, NO_SERIES, OK, STATUSES, write_json
from mriaudit.tables import read_tsv, write_tsv

log = logging.getLogger(__name__)

DEFAULT_FLAG: dict[str, float] = {"audit_z": 3.0, "component_z": 2.0, "fp_budget": 0.05}

#: Metric columns copied from the records into scores.tsv, in this order.
METRIC_PREFIXES: tuple[str, ...] = ("anomaly_", "iqm_", "hdr_", "reg_", "conv_", "n4_")

#: Threads reading records and writing subject JSONs (file-system bound).
IO_THREADS = 8

#: Fewest subjects a robust z (or a cohort mode) is computed over.
MIN_COHORT = audit.MIN_COHORT

#: Relative tolerance around the cohort mode for protocol parameters.
PROTOCOL_TOLERANCE = 0.10
#: A protocol value shared by at least this fraction of the cohort is a protocol
#: of its own (multi-site cohort), not a deviation.
RARE_SHARE = 0.2

#: Findings that flag the subject, with their plain reason.
FLAGGING_FINDINGS: dict[str, str] = {
    "missing_slices": "missing slices in the series",
    "duplicate_slices": "duplicate slices in the series",
    "nonuniform_spacing": "non-uniform slice spacing",
    "mixed_orientation": "slices with mixed orientations",
    "mixed_dimensions": "slices with mixed matrix sizes",
    "inconsistent_rescale": "inconsistent intensity rescaling across slices",
    "unreadable_files": "unreadable files in the subject folder",
    "registration_failed": "registration to the MNI152 template failed",
    # The header's patient position disagrees with the anatomy: every tool that trusts the
    # header (left/right included) reads this scan wrongly.
    "header_orientation": "header orientation disagrees with the anatomy (wrong patient position?)",
}
#: Findings reported as notes only (see the module docstring for why).
NOTE_FINDINGS: dict[str, str] = {
    "2d_only": "only a 2D T1-weighted series was available (thick slices); it was audited instead",
    "derived_only": (
        "only a derived T1 copy (DERIVED/SECONDARY, e.g. re-created from NIfTI) was available;"
        " it was audited"
    ),
    "post_contrast_only": "only a post-contrast T1 was available; it was audited",
    "repeat_series": "repeat T1 acquisitions: the best was audited (see the series table)",
    "not_scored": "not scored by the anomaly model",
}

# Counts that make a finding's reason concrete.
_FINDING_COUNTS: dict[str, str] = {
    "missing_slices": "hdr_missing_slices",
    "duplicate_slices": "hdr_duplicate_slices",
    "unreadable_files": "hdr_n_unreadable",
}

_STATUS_PREFIX = {FAILED: "failed", NO_SERIES: "no usable T1-weighted series"}

_STRING_COLUMNS = (
    "subject",
    "label",
    "status",
    "reason",
    "failed_stage",
    "flag_reasons",
    "findings",
    "notes",
    "scanner_group",
)
_BOOL_COLUMNS = ("flagged", "in_reference")
_BASE_COLUMNS = (
    "subject",
    "label",
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
)


def flag_settings(flag: dict[str, Any] | None) -> dict[str, float]:
    """The ``flag`` config with defaults filled in (audit_z, component_z, fp_budget)."""
    settings = dict(DEFAULT_FLAG)
    for key, value in (flag or {}).items():
        if key in settings and value is not None:
            settings[key] = float(value)
    return settings


def iqm_tables() -> tuple[dict[str, int], dict[str, str]]:
    """IQM directions (+1 higher is better, -1 lower is better, 0 descriptive) and labels.

    Keys are MRIQC names without the ``iqm_`` prefix, as ``mriaudit.iqm`` defines them.
    """
    # Imported here: mriaudit.iqm imports ANTsPy, which the cohort steps need for nothing else.
    from mriaudit.iqm import IQM_DIRECTIONS, IQM_LABELS

    directions = {_strip_iqm(k): int(v) for k, v in IQM_DIRECTIONS.items()}
    labels = {_strip_iqm(k): str(v) for k, v in IQM_LABELS.items()}
    return directions, labels


def _strip_iqm(name: str) -> str:
    return name[4:] if name.startswith("iqm_") else name


def iqm_label(column: str, labels: dict[str, str]) -> str:
    """Human-readable name of an ``iqm_*`` column (``iqm_snr_wm`` -> ``SNR (WM)``)."""
    return labels.get(_strip_iqm(column), _strip_iqm(column))


def robust_z(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z of ``values`` (n,) against the entries selected by ``reference`` (n,) bool.

    ``z = (x - median_ref) / scale`` with the scale of ``audit.location_scale``
    (1.4826 * MAD, or the mean absolute deviation when more than half the
    reference values tie). Returns ``(z, median, scale)``; z is NaN everywhere
    when the reference has fewer than ``MIN_COHORT`` finite values or no
    spread, and NaN where ``values`` is.
    """
    x = np.asarray(values, dtype=float)
    ref = x[np.asarray(reference, dtype=bool) & np.isfinite(x)]
    if ref.size < MIN_COHORT:
        return np.full(x.shape, np.nan), math.nan, math.nan
    median, scale = audit.location_scale(ref)
    if scale <= 0:
        return np.full(x.shape, np.nan), median, 0.0
    return (x - median) / scale, median, scale


def reference_mask(status: np.ndarray, in_reference: np.ndarray, scored: np.ndarray) -> np.ndarray:
    """Subjects the anomaly score is standardised against, (n,) bool.

    The ``ok``, scored, ``in_reference`` subjects; when there are fewer than
    ``MIN_COHORT`` of them (e.g. a reused checkpoint whose reference is not in
    this cohort) every ``ok`` scored subject, so the cohort is its own reference.
    """
    usable = (np.asarray(status) == OK) & np.asarray(scored, dtype=bool)
    reference = usable & np.asarray(in_reference, dtype=bool)
    if reference.sum() < MIN_COHORT:
        if usable.sum() >= MIN_COHORT:
            log.warning(
                "only %d reference subjects are scored; standardising against all %d scored subjects",
                int(reference.sum()),
                int(usable.sum()),
            )
        return usable
    return reference


#: Prefix of the flag reason the audit score gives (the other reasons are hard findings).
AUDIT_REASON = "audit score "


def flagged_otherwise(flag_reasons: Sequence[str]) -> np.ndarray:
    """(n,) bool: the ``flag_reasons`` of scores.tsv hold a hard finding (a reason besides the audit score's)."""
    return np.array(
        [
            any(part and not part.startswith(AUDIT_REASON) for part in str(text).split("; "))
            for text in flag_reasons
        ],
        dtype=bool,
    )


def _audit(
    frame: pd.DataFrame, usable: np.ndarray, hard: np.ndarray, settings: dict[str, float]
) -> audit.AuditResult:
    return audit.audit_scores(
        frame,
        usable=usable,
        hard=hard,
        audit_z=settings["audit_z"],
        fp_budget=settings["fp_budget"],
    )


def table_threshold(frame: pd.DataFrame, *, flag: dict[str, Any]) -> float:
    """The audit threshold that aggregate used, recomputed from a scores.tsv table."""
    settings = flag_settings(flag)
    usable = frame["status"].to_numpy(dtype=str) == OK
    hard = flagged_otherwise(frame["flag_reasons"].fillna("").astype(str).tolist())
    return _audit(frame, usable, hard, settings).threshold


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


def read_subject_records(out_dir: Path, label: str) -> dict[str, dict[str, Any] | None]:
    """The record of every stage in ``paths.STAGES`` order (None where absent)."""
    return {
        stage: _read_record(paths.record(out_dir, label, stage), stage) for stage in paths.STAGES
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
        "subject": subject.folder,
        "label": subject.label,
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
    extra = {
        "records": records,
        "metrics": metrics,
        "findings": findings,
        "top_regions": top_regions,
    }
    return row, extra


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


def _numeric_deviation(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Which entries of ``values`` (n,) deviate from the cohort mode, and the mode.

    The mode is the value with the most neighbours within ``PROTOCOL_TOLERANCE``
    (relative); a value deviates when it is outside that tolerance of the mode
    and shared (within tolerance) by less than ``RARE_SHARE`` of the cohort.
    NaN never deviates. O(n log n).
    """
    deviates = np.zeros(values.shape, dtype=bool)
    finite = np.isfinite(values)
    x = values[finite]
    if x.size < MIN_COHORT:
        return deviates, math.nan
    ordered = np.sort(x)
    width = PROTOCOL_TOLERANCE * np.abs(x)
    counts = np.searchsorted(ordered, x + width, "right") - np.searchsorted(
        ordered, x - width, "left"
    )
    # Most neighbours wins; ties go to the smallest value, so the mode is deterministic.
    mode = float(x[np.lexsort((x, -counts))[0]])
    far = np.abs(x - mode) > PROTOCOL_TOLERANCE * abs(mode) + 1e-9
    deviates[finite] = far & (counts / x.size < RARE_SHARE)
    return deviates, mode


def _vendor_key(value: Any) -> str:
    words = re.findall(r"[A-Za-z0-9]+", str(value)) if isinstance(value, str) else []
    return words[0].upper() if words else ""


def duplicate_images(frame: pd.DataFrame) -> list[list[str]]:
    """For every row, the other subjects whose converted image has the same voxel data.

    Compares ``conv_data_sha256`` (see ``dicom.check_image``) of the rows whose
    status is ok: the same scan under two subject names, whatever its headers.
    """
    found: list[list[str]] = [[] for _ in range(len(frame))]
    if "conv_data_sha256" not in frame:
        return found
    ok = (frame["status"] == OK).to_numpy()
    digests = frame["conv_data_sha256"].fillna("").astype(str).to_numpy()
    groups: dict[str, list[int]] = {}
    for i in np.flatnonzero(ok & (digests != "")):
        groups.setdefault(digests[i], []).append(int(i))
    for members in groups.values():
        for i in members if len(members) > 1 else []:
            found[i] = [str(frame.at[j, "subject"]) for j in members if j != i]
    return found


def protocol_deviations(frame: pd.DataFrame) -> list[list[str]]:
    """``protocol_deviation: ...`` findings of every row of ``frame`` (hdr_* columns).

    Compares field strength (T), manufacturer, TR/TE/TI (ms), flip angle (deg)
    and the sorted voxel size (mm) with the cohort mode (see ``_numeric_deviation``).
    """
    found: list[list[str]] = [[] for _ in range(len(frame))]
    numeric = (
        ("hdr_field_strength", "field strength", "T"),
        ("hdr_tr", "TR", "ms"),
        ("hdr_te", "TE", "ms"),
        ("hdr_ti", "TI", "ms"),
        ("hdr_flip_angle", "flip angle", "deg"),
    )
    for column, name, unit in numeric:
        values = _numeric(frame, column)
        deviates, mode = _numeric_deviation(values)
        for i in np.flatnonzero(deviates):
            text = f"protocol_deviation: {name} {_fmt(values[i])} vs cohort {_fmt(mode)} {unit}"
            found[i].append(text)
    # Sorted voxel sizes: dcm2niix keeps the acquisition's voxel order, so the same
    # protocol acquired sagittally or axially permutes x, y, z.
    voxels = np.sort(
        np.stack([_numeric(frame, f"hdr_voxel_{axis}") for axis in "xyz"], axis=1), axis=1
    )
    results = [_numeric_deviation(voxels[:, k]) for k in range(3)]
    voxel_deviates = np.any([deviates for deviates, _ in results], axis=0)
    voxel_mode = "x".join(_fmt(mode) for _, mode in results)
    for i in np.flatnonzero(voxel_deviates):
        size = "x".join(_fmt(v) for v in voxels[i])
        found[i].append(f"protocol_deviation: voxel {size} vs cohort {voxel_mode} mm")
    if "hdr_manufacturer" in frame:
        vendors = frame["hdr_manufacturer"].tolist()
        keys = [_vendor_key(v) for v in vendors]
        present = [k for k in keys if k]
        if len(present) >= MIN_COHORT:
            counts = pd.Series(present).value_counts()
            mode_key = str(counts.index[0])
            mode_name = next(str(v) for v, k in zip(vendors, keys, strict=True) if k == mode_key)
            for i, key in enumerate(keys):
                if key and key != mode_key and counts[key] / len(present) < RARE_SHARE:
                    found[i].append(
                        f"protocol_deviation: manufacturer {vendors[i]} vs cohort {mode_name}"
                    )
    return found


def _finding_reason(code: str, metrics: dict[str, Any]) -> str:
    reason = FLAGGING_FINDINGS[code]
    count = _as_float(metrics.get(_FINDING_COUNTS.get(code, "")))
    if math.isfinite(count) and count > 0:
        reason = f"{reason} ({int(count)})"
    if code == "registration_failed":
        similarity = _as_float(metrics.get("reg_similarity"))
        if math.isfinite(similarity):
            reason = f"{reason} (similarity {similarity:.2f})"
    return reason


def iqm_causes() -> dict[str, str]:
    """Likely cause of each IQM on its bad side (keys without the ``iqm_`` prefix)."""
    from mriaudit.iqm import IQM_CAUSES

    return {_strip_iqm(k): str(v) for k, v in IQM_CAUSES.items()}


def _iqm_reason(column: str, z: float, labels: dict[str, str], causes: dict[str, str]) -> str:
    """``EFC 4.2 robust SD above the cohort (ghosting or blur)``."""
    side = "below" if z < 0 else "above"
    cause = causes.get(_strip_iqm(column))
    suffix = f" ({cause})" if cause else ""
    return f"{iqm_label(column, labels)} {abs(z):.1f} robust SD {side} the cohort{suffix}"


def _top_region_text(regions: list[Any]) -> str:
    if not regions or not isinstance(regions[0], dict):
        return ""
    region = regions[0]
    centre = region.get("centroid_mm")
    text = ""
    if isinstance(centre, (list, tuple)) and len(centre) == 3:
        text = "(" + ", ".join(f"{_as_float(c):.0f}" for c in centre) + ") mm"
    volume = _as_float(region.get("volume_ml"))
    if math.isfinite(volume):
        text = f"{text}, {volume:.2g} ml" if text else f"{volume:.2g} ml"
    return text


def _ordered_columns(frame: pd.DataFrame, *, with_labels: bool) -> list[str]:
    columns = list(_BASE_COLUMNS)
    for prefix in METRIC_PREFIXES:
        columns += [c for c in frame.columns if c.startswith(prefix) and c not in columns]
    if with_labels:
        columns.append("true_label")
    return columns


def read_scores(path: Path) -> pd.DataFrame:
    """scores.tsv as written by ``aggregate_cohort``: text columns as str, booleans as bool."""
    return read_tsv(path, text_columns=_STRING_COLUMNS, bool_columns=_BOOL_COLUMNS)


def write_stage_table(
    out_dir: Path, labels: Sequence[str], *, out_tsv: Path, flag: dict[str, Any] | None = None
) -> pd.DataFrame:
    """The status of each ``paths.PREPROCESS_STAGES`` record of each subject, and its first problem.

    One row per label: ``subject`` (label), a column per stage (``ok``,
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

    def row(label: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        loaded = {s: _read_record(paths.record(out_dir, label, s), s) for s in stages}
        status, reason, stage = _first_problem(loaded)
        cells = {s: (r or {}).get("status", "missing") for s, r in loaded.items()}
        metrics: dict[str, Any] = {}
        findings: list[str] = []
        for record in loaded.values():
            metrics.update((record or {}).get("metrics") or {})
            findings += [str(code) for code in (record or {}).get("findings") or []]
        table_row = {
            "subject": label,
            **cells,
            "status": status,
            "failed_stage": stage,
            "reason": reason,
        }
        return table_row, metrics, findings

    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        loaded_rows = list(pool.map(row, labels))
    columns = ["subject", *stages, "status", "failed_stage", "reason", "prescreen"]
    frame = pd.DataFrame([r for r, _, _ in loaded_rows], columns=columns[:-1])
    frame["prescreen"] = _prescreen(frame, loaded_rows, flag_settings(flag))
    write_tsv(frame, Path(out_tsv))
    log.info(
        "%d subjects, %d ok after %s", len(frame), int((frame["status"] == OK).sum()), stages[-1]
    )
    return frame


def read_prescreen(stage_table: Path) -> dict[str, str]:
    """``{subject label: reason}`` of the rows of ``stages.tsv`` whose ``prescreen`` is set."""
    frame = read_tsv(stage_table, text=True)
    if "prescreen" not in frame:
        return {}
    return {s: r for s, r in zip(frame["subject"], frame["prescreen"], strict=True) if r}


def _prescreen(
    frame: pd.DataFrame,
    loaded_rows: list[tuple[dict[str, Any], dict[str, Any], list[str]]],
    settings: dict[str, float],
) -> list[str]:
    """Per row, why the audit without the model flags it ("" when it does not)."""
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
    return reasons


def aggregate_cohort(
    input_dir: Path,
    out_dir: Path,
    *,
    labels_path: str | None,
    flag: dict[str, Any],
    out_scores: Path,
    out_exclusions: Path,
    out_subjects: Path,
) -> pd.DataFrame:
    """Merge every subject's records into scores.tsv, exclusions.tsv and subjects.tsv.

    One row per first-level folder of ``input_dir`` (folders with a naming
    problem included, as ``failed``), sorted flagged first then by
    ``anomaly_score`` descending. Also writes ``paths.subject_scores(out_dir,
    label)`` for every processed subject. Returns the table (``flagged`` and
    ``in_reference`` as bool; the files write ``true``/``false``).
    """
    settings = flag_settings(flag)
    subjects = cohort.list_subjects(input_dir)
    labels = cohort.read_labels(labels_path) if labels_path else None
    rows: list[dict[str, Any]] = []
    extras: list[dict[str, Any]] = []
    # Tens of thousands of small files: threads overlap the file system's latency.
    with ThreadPoolExecutor(max_workers=IO_THREADS) as pool:
        loaded = list(
            pool.map(
                lambda s: read_subject_records(out_dir, s.label) if s.processed else {}, subjects
            )
        )
    for subject, subject_records in zip(subjects, loaded, strict=True):
        if subject.problem:
            rows.append(
                {
                    "subject": subject.folder,
                    "label": subject.label,
                    "status": FAILED,
                    "reason": subject.problem,
                    "failed_stage": "cohort",
                    "anomaly_raw": math.nan,
                    "in_reference": False,
                }
            )
            extras.append({"records": {}, "metrics": {}, "findings": [], "top_regions": []})
            continue
        row, extra = _subject_row(subject, subject_records)
        rows.append(row)
        extras.append(extra)
    frame = pd.DataFrame(rows, columns=None if rows else list(_BASE_COLUMNS))
    if labels is not None:
        unknown = sorted(set(labels) - {s.folder for s in subjects})
        if unknown:
            log.warning(
                "%d labelled subjects are not in input_dir, e.g. %s", len(unknown), unknown[:3]
            )
        frame["true_label"] = pd.array([labels.get(s.folder) for s in subjects], dtype="Int64")
    frame, summary = _judge(frame, extras, settings)
    frame = frame.reindex(columns=_ordered_columns(frame, with_labels=labels is not None))
    order = np.lexsort(
        (
            frame["subject"].to_numpy(dtype=str),
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
                "folder": [s.entry for s in subjects],
                "label": [s.label for s in subjects],
                "problem": [s.problem for s in subjects],
            }
        ),
        out_subjects,
    )
    processed = {s.folder for s in subjects if s.processed}

    def write_subject(item: tuple[dict[str, Any], dict[str, Any]]) -> None:
        row, extra = item
        if row["subject"] in processed:
            path = paths.subject_scores(out_dir, row["label"])
            data = _subject_json(row, extra, summary)
            # The manifest of what exists, relative to the output folder.
            data["images"] = {
                name: image.relative_to(out_dir).as_posix()
                for name, image in paths.subject_images(out_dir, row["label"]).items()
                if image.is_file()
            }
            _write_compact_json(path, data)

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


def _judge(
    frame: pd.DataFrame, extras: list[dict[str, Any]], settings: dict[str, float]
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Add anomaly_score, audit_score, scanner_group, flagged, flag_reasons, findings and notes."""
    status = frame["status"].to_numpy(dtype=str)
    ok = status == OK
    raw = _numeric(frame, "anomaly_raw")
    scored = ok & np.isfinite(raw)
    in_reference = frame["in_reference"].fillna(False).to_numpy(dtype=bool)
    reference = reference_mask(status, in_reference, scored)
    z, median, scale = robust_z(raw, reference)
    score = np.where(scored, z, np.nan)
    deviations = protocol_deviations(frame)
    duplicates = duplicate_images(frame)
    for i, extra in enumerate(extras):
        reasons: list[str] = []
        notes: list[str] = []
        if status[i] != OK:
            stage = frame.at[i, "failed_stage"]
            if stage == "cohort":
                prefix = "not processed"
            else:
                prefix = _STATUS_PREFIX.get(status[i], status[i])
                prefix += f" at {stage}" if stage and status[i] == FAILED else ""
            reasons.append(f"{prefix}: {frame.at[i, 'reason']}")
        for code in extra["findings"]:
            if code in FLAGGING_FINDINGS:
                reasons.append(_finding_reason(code, extra["metrics"]))
            elif code in NOTE_FINDINGS:
                notes.append(NOTE_FINDINGS[code])
        if duplicates[i]:
            reasons.append(f"identical image data to {', '.join(duplicates[i])}")
        extra["findings"] = extra["findings"] + deviations[i]
        extra["findings"] += ["duplicate_image"] if duplicates[i] else []
        extra["notes"] = notes
        extra["flag_reasons"] = reasons
    hard = np.array([bool(extra["flag_reasons"]) for extra in extras], dtype=bool)
    result = _audit(frame, ok, hard, settings)
    _, labels = iqm_tables()
    causes = iqm_causes()
    flagged, reasons_col, findings_col, notes_col = [], [], [], []
    for i, extra in enumerate(extras):
        drivers = _drivers(result, i, component_z=settings["component_z"])
        extra["iqm_z"] = {
            column: round(float(result.z[i, j]), 3)
            for j, column in enumerate(result.columns)
            if column.startswith("iqm_") and math.isfinite(result.z[i, j])
        }
        extra["iqm_outliers"] = [f"{c} z={v:.1f}" for c, v in drivers if c.startswith("iqm_")]
        extra["audit_drivers"] = [_component_reason(c, v, labels, causes) for c, v in drivers]
        if np.isfinite(result.score[i]) and result.score[i] >= result.threshold:
            # The audit score is the first reason of an ok subject it flags.
            text = f"{AUDIT_REASON}{result.score[i]:.1f} (threshold {result.threshold:.1f})"
            if drivers:
                text += " driven by " + " and ".join(extra["audit_drivers"])
            extra["flag_reasons"].insert(0, text)
        flagged.append(bool(extra["flag_reasons"]))
        reasons_col.append("; ".join(extra["flag_reasons"]))
        findings_col.append("; ".join(extra["findings"]))
        notes_col.append("; ".join(extra["notes"]))
    frame["anomaly_score"] = score
    frame["audit_score"] = result.score
    frame["scanner_group"] = result.groups
    frame["flagged"] = np.array(flagged, dtype=bool)
    frame["flag_reasons"] = reasons_col
    frame["findings"] = findings_col
    frame["notes"] = notes_col
    summary = {
        "n_subjects": len(frame),
        "flag": settings,
        "audit_threshold": result.threshold,
        "audit_pool_n": int(result.pool.sum()),
        "reference_n": int(reference.sum()),
        "reference_median": median,
        "reference_scale": scale,
    }
    if not np.isfinite(score).any() and scored.any():
        log.warning(
            "anomaly scores not standardised: %d reference subjects (need %d with some spread)",
            int(reference.sum()),
            MIN_COHORT,
        )
    return frame, summary


def _drivers(result: audit.AuditResult, row: int, *, component_z: float) -> list[tuple[str, float]]:
    """The worst member of each family whose evidence is at least ``component_z``, worst first:
    ``[(column, signed z)]``."""
    found = []
    for f, family in enumerate(audit.FAMILY_NAMES):
        if result.families[row, f] < component_z:
            continue
        members = [
            j for j, c in enumerate(result.columns) if audit.feature_columns([c])[c][0] == family
        ]
        worst = max(members, key=lambda j: result.bad[row, j])
        found.append((result.columns[worst], float(result.z[row, worst]), result.families[row, f]))
    found.sort(key=lambda item: -item[2])
    return [(column, z) for column, z, _ in found]


def _component_reason(column: str, z: float, labels: dict[str, str], causes: dict[str, str]) -> str:
    """``CJV 4.2 robust SD above the cohort (noise, ...)``; the model: ``model anomaly 4.2 ...``."""
    if column == "anomaly_raw":
        return f"model anomaly {z:.1f} robust SD above the cohort"
    if column == "reg_similarity":
        return f"template similarity {abs(z):.1f} robust SD below the cohort (wrong contrast or misregistration)"
    return _iqm_reason(column, z, labels, causes)


def _exclusions(frame: pd.DataFrame, extras: list[dict[str, Any]]) -> pd.DataFrame:
    """Flagged subjects with their reasons and the evidence behind them."""
    flagged = frame["flagged"].to_numpy(dtype=bool)
    table = pd.DataFrame(
        {
            "subject": frame["subject"],
            "label": frame["label"],
            "status": frame["status"],
            "reasons": frame["flag_reasons"],
            "audit_score": frame["audit_score"],
            "anomaly_score": frame["anomaly_score"],
            "findings": frame["findings"],
            "iqm_outliers": ["; ".join(e["iqm_outliers"]) for e in extras],
            "top_region": [_top_region_text(e["top_regions"]) for e in extras],
        }
    )
    if "true_label" in frame:
        table["true_label"] = frame["true_label"]
    return table[flagged].reset_index(drop=True)


def _write_compact_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic one-line JSON via the C encoder (records.write_json indents, ~10x slower).

    Values strict JSON cannot hold (NaN from a hand-edited record, numpy
    scalars) fall back to ``records.write_json``, which converts them.
    """
    try:
        text = json.dumps(data, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError):
        write_json(path, data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _finite(value: Any) -> float | None:
    number = _as_float(value)
    return number if math.isfinite(number) else None


def _subject_json(
    row: dict[str, Any], extra: dict[str, Any], summary: dict[str, Any]
) -> dict[str, Any]:
    """Everything known about one subject: its row, lists, IQM z-scores and all records.

    ``metrics`` merges every stage's metrics (later stages win on a shared
    name); ``records`` keeps each stage's status, reason, findings, warnings,
    timing and extras.
    """
    data = {
        "subject": row["subject"],
        "label": row["label"],
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
        "metrics": extra["metrics"],
        "warnings": {
            stage: record.get("warnings", [])
            for stage, record in extra["records"].items()
            if record and record.get("warnings")
        },
        "cohort": {k: _finite(v) if isinstance(v, float) else v for k, v in summary.items()},
        # Each stage's record without its metrics: they are merged above, and
        # repeating them would double the file for nothing.
        "records": {
            stage: None if record is None else {k: v for k, v in record.items() if k != "metrics"}
            for stage, record in extra["records"].items()
        },
    }
    if "true_label" in row:
        value = row["true_label"]
        data["true_label"] = None if pd.isna(value) else int(value)
    return data
