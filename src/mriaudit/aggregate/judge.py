"""Judging each subject against the cohort: scores, hard findings, flags.

``robust_z`` standardises the model's ``anomaly_raw`` against the reference
subjects (the model alone, kept for comparison); ``_judge`` computes the audit
score (``mriaudit.audit``), the cohort's duplicate images and protocol
deviations, and every row's flag, reasons and notes under the ``flag`` settings
(``flag_settings``; defaults ``DEFAULT_FLAG``).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

import numpy as np
import pandas as pd

from mriaudit import audit, paths, robust
from mriaudit.aggregate.reasons import (
    _STATUS_PREFIX,
    AUDIT_REASON,
    CONTRAST_FINDINGS,
    FLAGGING_FINDINGS,
    NOTE_FINDINGS,
    _component_reason,
    _drivers,
    _finding_reason,
    _top_region_text,
    contrast_reasons,
    flagged_otherwise,
    iqm_causes,
    iqm_tables,
)
from mriaudit.aggregate.rows import _as_float, _fmt, _numeric, contrast_column
from mriaudit.records import FAILED, NO_SERIES, OK

log = logging.getLogger(__name__)


DEFAULT_FLAG: dict[str, float] = {"audit_z": 3.0, "component_z": 2.0, "fp_budget": 0.05}

#: Fewest subjects a robust z (or a cohort mode) is computed over.
MIN_COHORT = audit.MIN_COHORT

#: Relative tolerance around the cohort mode for protocol parameters.
PROTOCOL_TOLERANCE = 0.10
#: A protocol value shared by at least this fraction of the cohort is a protocol
#: of its own (multi-site cohort), not a deviation.
RARE_SHARE = 0.2


def flag_settings(flag: dict[str, Any] | None) -> dict[str, float]:
    """The ``flag`` config with defaults filled in (audit_z, component_z, fp_budget)."""
    settings = dict(DEFAULT_FLAG)
    for key, value in (flag or {}).items():
        if key in settings and value is not None:
            settings[key] = float(value)
    return settings


def robust_z(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Robust z of ``values`` (n,) against the entries selected by ``reference`` (n,) bool.

    ``z = (x - median_ref) / scale`` with the scale of ``robust.location_scale``
    (1.4826 * MAD, or the mean absolute deviation when more than half the
    reference values tie). Returns ``(z, median, scale)``; z is NaN everywhere
    when the reference has fewer than ``MIN_COHORT`` finite values or no
    spread, and NaN where ``values`` is.
    """
    x = np.asarray(values, dtype=float)
    ref = x[np.asarray(reference, dtype=bool) & np.isfinite(x)]
    if ref.size < MIN_COHORT:
        return np.full(x.shape, np.nan), math.nan, math.nan
    median, scale = robust.location_scale(ref)
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
            found[i] = [str(frame.at[j, "folder"]) for j in members if j != i]
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


def present_contrasts(extras: list[dict[str, Any]]) -> set[str]:
    """The contrasts beside the T1w that at least one subject has a series of: a cohort
    of T1w only says nothing of T2w or FLAIR, per subject or in its columns."""
    return {
        contrast
        for extra in extras
        for contrast, entry in extra.get("contrasts", {}).items()
        if entry.get("status") != NO_SERIES and not entry.get("skipped")
    }


def _contrast_frame(frame: pd.DataFrame, contrast: str) -> pd.DataFrame:
    """``contrast``'s measures that its audit judges (``audit.CONTRAST_MEASURES``), named
    as the T1w's (``iqm_snr_total``, ``anomaly_raw``), beside the T1w's ``hdr_*`` (the
    scanner groups: the contrast was acquired in the same session)."""
    columns = {c: frame[c] for c in frame.columns if c.startswith("hdr_")}
    for name in audit.CONTRAST_MEASURES:
        if contrast_column(contrast, name) in frame:
            columns[name] = frame[contrast_column(contrast, name)]
    return pd.DataFrame(columns, index=frame.index)


def _contrast_audit(
    contrast: str,
    frame: pd.DataFrame,
    extras: list[dict[str, Any]],
    settings: dict[str, float],
) -> tuple[np.ndarray, np.ndarray]:
    """The audit of ``contrast`` beside the T1w, as the T1w's: its IQMs, its model's score
    and its template similarity fused into its own audit score (``audit.audit_scores``
    over the subjects whose contrast is ok, those with a hard contrast finding out of
    the pool). A subject at its threshold gets the reason in its ``contrast_flags``
    ("T2w: audit score 6.1 (threshold 3.0) driven by ..."). Returns the model's robust z
    against its reference subjects, as the T1w's ``anomaly_score``, and the audit score,
    each (n,)."""
    entries = [extra.get("contrasts", {}).get(contrast, {}) for extra in extras]
    raw = np.array([_as_float(e.get("anomaly_raw")) for e in entries])
    status = np.array([str(e.get("status", "")) for e in entries])
    in_reference = np.array([bool(e.get("in_reference")) for e in entries])
    reference = reference_mask(status, in_reference, np.isfinite(raw))
    z, _, _ = robust_z(raw, reference)
    usable = (status == OK) & ~np.array([bool(e.get("skipped")) for e in entries])
    hard = np.array([bool(set(e.get("findings") or []) & set(CONTRAST_FINDINGS)) for e in entries])
    result = _audit(_contrast_frame(frame, contrast), usable, hard, settings)
    _, titles = iqm_tables()
    # The T1w's words for a low white-matter-to-maximum ratio name the T1w.
    causes = iqm_causes() | {"wm2max": f"bright outliers or not a {contrast} contrast"}
    for i, extra in enumerate(extras):
        if not (np.isfinite(result.score[i]) and result.score[i] >= result.threshold):
            continue
        region = _top_region_text(entries[i].get("top_regions") or [])
        drivers = []
        for column, value in _drivers(result, i, component_z=settings["component_z"]):
            words = _component_reason(column, value, titles, causes)
            drivers.append(f"{words} at {region}" if column == "anomaly_raw" and region else words)
        text = f"{contrast}: {AUDIT_REASON}{result.score[i]:.1f} (threshold {result.threshold:.1f})"
        extra["contrast_flags"].append(
            text + (" driven by " + " and ".join(drivers) if drivers else "")
        )
    return np.where(np.isfinite(raw), z, np.nan), result.score


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
    present = present_contrasts(extras)
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
        contrast_flags: list[str] = []
        for contrast, entry in extra.get("contrasts", {}).items():
            if contrast not in present:
                continue
            flags, contrast_notes = contrast_reasons(contrast, entry)
            contrast_flags += flags
            notes += contrast_notes
            extra["findings"] += [f"{code}: {contrast}" for code in entry["findings"]]
        extra["findings"] = extra["findings"] + deviations[i]
        extra["findings"] += ["duplicate_image"] if duplicates[i] else []
        extra["notes"] = notes
        extra["flag_reasons"] = reasons
        extra["contrast_flags"] = contrast_flags
    # A hard finding of the T1w keeps the subject out of the audit score's pool; one of
    # another contrast says nothing of its T1w, so it flags the subject after the audit.
    hard = np.array([bool(extra["flag_reasons"]) for extra in extras], dtype=bool)
    contrast_scores = {
        contrast: _contrast_audit(contrast, frame, extras, settings) for contrast in present
    }
    result = _audit(frame, ok, hard, settings)
    _, titles = iqm_tables()
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
        extra["audit_drivers"] = [_component_reason(c, v, titles, causes) for c, v in drivers]
        if np.isfinite(result.score[i]) and result.score[i] >= result.threshold:
            # The audit score is the first reason of an ok subject it flags.
            text = f"{AUDIT_REASON}{result.score[i]:.1f} (threshold {result.threshold:.1f})"
            if drivers:
                text += " driven by " + " and ".join(extra["audit_drivers"])
            extra["flag_reasons"].insert(0, text)
        extra["flag_reasons"] += extra.pop("contrast_flags")
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
    for contrast, (z, audit_score) in contrast_scores.items():
        frame[contrast_column(contrast, "anomaly_score")] = z
        frame[contrast_column(contrast, "audit_score")] = audit_score
    absent = [
        column
        for contrast in paths.EXTRA_CONTRASTS
        if contrast not in present
        for column in frame.columns
        if column.startswith(contrast_column(contrast, ""))
    ]
    frame = frame.drop(columns=absent)
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
