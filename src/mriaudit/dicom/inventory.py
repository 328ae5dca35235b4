"""The inventory stage: which series of a subject is audited, and what its headers say.

``inventory_subject`` scans the folder (``scan``), summarises every series
(``geometry``, ``table``), selects the audited series (``mriaudit.series``;
NIfTI files through ``nifti`` when no DICOM T1 is usable), writes the series
table and returns the stage record: ``hdr_*`` metrics, findings (missing or
duplicated slices, mixed geometry, unreadable files, 2D-only, selection notes)
and the chosen files for ``convert``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

from mriaudit import series as series_class
from mriaudit import sources
from mriaudit.contrasts import select as contrast_select
from mriaudit.dicom.geometry import _Geometry, _series_geometry, _slice_positions
from mriaudit.dicom.nifti import _looks, _nifti_row, _no_nifti_reason, choose_nifti
from mriaudit.dicom.scan import _plural, _Scan, _scan_folder, _Series
from mriaudit.dicom.table import _series_row, write_series_table
from mriaudit.records import (
    NO_SERIES,
    OK,
    StageError,
    make_record,
    run_stage,
)
from mriaudit.series import Selection, resolve_rules, select_series

log = logging.getLogger(__name__)


#: Header-audit findings, in the order they are reported.
FINDINGS: tuple[str, ...] = (
    "2d_only",
    "derived_only",
    "post_contrast_only",
    "repeat_series",
    "missing_slices",
    "duplicate_slices",
    "nonuniform_spacing",
    "mixed_orientation",
    "mixed_dimensions",
    "inconsistent_rescale",
    "unreadable_files",
)

#: Findings of the selection itself: notes on what was audited, never a flag.
SELECTION_FINDINGS: tuple[str, ...] = FINDINGS[:4]

METRIC_KEYS: tuple[str, ...] = (
    "hdr_manufacturer",
    "hdr_model",
    "hdr_field_strength",
    "hdr_tr",
    "hdr_te",
    "hdr_ti",
    "hdr_flip_angle",
    "hdr_voxel_x",
    "hdr_voxel_y",
    "hdr_voxel_z",
    "hdr_dim_x",
    "hdr_dim_y",
    "hdr_dim_z",
    "hdr_acquisition",
    "hdr_orientation",
    "hdr_series_description",
    "hdr_n_series",
    "hdr_n_files",
    "hdr_n_unreadable",
    "hdr_n_non_dicom",
    "hdr_missing_slices",
    "hdr_duplicate_slices",
    "hdr_phi_tags",
)


def _no_series_reason(scan: _Scan, rows: list[dict[str, Any]]) -> str:
    """A short, human-readable reason why a subject has no usable T1 series."""
    if scan.n_files == 0:
        # An archive that cannot be opened is not an empty folder: say what failed.
        return (
            f"no readable files: {'; '.join(scan.problems)}" if scan.problems else "folder is empty"
        )
    if not rows:
        parts = []
        if scan.non_dicom:
            parts.append(_plural(len(scan.non_dicom), "non-DICOM file"))
        if scan.unreadable:
            parts.append(_plural(len(scan.unreadable), "unreadable file"))
        detail = f" ({', '.join(parts)})" if parts else ""
        readable = "readable " if scan.unreadable else ""
        return f"no {readable}DICOM or NIfTI files{detail}"
    if all(r["localizer"] for r in rows):
        return (
            "only a localizer series" if len(rows) == 1 else f"only localizer series ({len(rows)})"
        )
    reasons = Counter(r["reason"].split(" (")[0].split(", ")[0] for r in rows)
    summary = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
    reason = f"no usable T1-weighted series among {len(rows)} series ({summary})"
    return reason[:300]


def _base_metrics(scan: _Scan, n_series: int) -> dict[str, Any]:
    metrics: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    metrics.update(
        hdr_n_series=n_series,
        hdr_n_files=scan.n_files,
        hdr_n_unreadable=len(scan.unreadable),
        hdr_n_non_dicom=len(scan.non_dicom),
        hdr_phi_tags=",".join(sorted(scan.phi_tags)),
    )
    return metrics


def _row_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The ``hdr_*`` acquisition metrics of the audited row (mm, ms, degrees, tesla)."""
    return {
        "hdr_manufacturer": row.get("manufacturer") or None,
        "hdr_model": row.get("model") or None,
        "hdr_field_strength": row.get("field_strength"),
        "hdr_tr": row.get("tr"),
        "hdr_te": row.get("te"),
        "hdr_ti": row.get("ti"),
        "hdr_flip_angle": row.get("flip_angle"),
        "hdr_voxel_x": row.get("pixel_spacing_col"),
        "hdr_voxel_y": row.get("pixel_spacing_row"),
        "hdr_voxel_z": row.get("slice_spacing"),
        "hdr_dim_x": row.get("cols"),
        "hdr_dim_y": row.get("rows"),
        "hdr_dim_z": row.get("n_slices"),
        "hdr_acquisition": row.get("acquisition") or None,
        "hdr_orientation": row.get("orientation") or None,
        "hdr_series_description": row.get("description") or None,
    }


def _series_findings(
    scan: _Scan, series: _Series, geometry: _Geometry, *, notes: Sequence[str]
) -> tuple[list[str], int]:
    """Header-audit findings of the chosen series and its count of unreadable files.

    Files that could not be read at all have no known series: they count for the
    chosen series when they sit in one of its folders.
    """
    folders = {str(Path(f).parent) for f in series.files}
    unreadable = set(series.unusable) | {
        f for f in scan.unreadable if str(Path(f).parent) in folders
    }
    present = {
        **{name: name in notes for name in SELECTION_FINDINGS},
        "missing_slices": geometry.gaps.missing > 0,
        "duplicate_slices": geometry.gaps.duplicates > 0,
        "nonuniform_spacing": geometry.gaps.nonuniform,
        "mixed_orientation": geometry.mixed_orientation,
        "mixed_dimensions": geometry.mixed_dimensions,
        "inconsistent_rescale": geometry.inconsistent_rescale,
        "unreadable_files": bool(unreadable),
    }
    return [name for name in FINDINGS if present[name]], len(unreadable)


def _dicom_selected(
    series: _Series, row: dict[str, Any], geometry: _Geometry, why: str
) -> dict[str, Any]:
    """What ``convert`` needs of a chosen DICOM series: its readable files, and where a gap
    is, the slice positions to put the absent slices back at (as zeros)."""
    truncated = set(series.unusable)
    selected = {
        "kind": "dicom",
        "series_uid": row["series_uid"],
        "files": sorted(f for f in series.files if f not in truncated),
        "description": row["description"],
        "why": why,
    }
    if geometry.gaps.missing and not geometry.gaps.nonuniform and geometry.normal is not None:
        selected["slice_normal_lps"] = [float(v) for v in geometry.normal]
        selected["slice_positions_mm"] = _slice_positions(series, geometry.normal, truncated)
        selected["slice_spacing_mm"] = geometry.gaps.spacing
    return selected


def _dicom_record(
    scan: _Scan,
    rows: list[dict[str, Any]],
    geometries: dict[str, _Geometry],
    selection: Selection,
    warnings_: list[str],
) -> dict[str, Any]:
    uid = str(selection.uid)
    series = scan.series[uid]
    row = next(r for r in rows if r["series_uid"] == uid)
    findings, n_unreadable = _series_findings(
        scan, series, geometries[uid], notes=selection.findings
    )
    metrics = _base_metrics(scan, len(rows))
    metrics.update(_row_metrics(row))
    metrics.update(
        hdr_missing_slices=row["missing_slices"], hdr_duplicate_slices=row["duplicate_slices"]
    )
    if n_unreadable:
        warnings_.append(f"{_plural(n_unreadable, 'unreadable file')} next to the audited series")
    why = selection.verdicts[uid][1]
    log.info(
        "selected series %s (%s): %s, %d slices; findings: %s",
        row["series_number"],
        row["description"],
        why,
        row["n_slices"],
        ", ".join(findings) or "none",
    )
    selected = _dicom_selected(series, row, geometries[uid], why)
    return make_record(
        "inventory",
        status=OK,
        findings=findings,
        metrics=metrics,
        warnings=warnings_,
        selected=selected,
    )


def _nifti_record(
    scan: _Scan,
    rules: dict[str, Any],
    warnings_: list[str],
    dicom_rows: list[dict[str, Any]],
    rows: list[dict[str, Any]],
) -> dict[str, Any]:
    unreadable = [r["path"] for r in rows if r["n_unreadable"]]
    scan.unreadable.extend(unreadable)
    index, why = choose_nifti(rows)
    metrics = _base_metrics(scan, len(dicom_rows) + len(rows))
    if index is None:
        reason = _no_nifti_reason(rows)
        return make_record(
            "inventory", status=NO_SERIES, reason=reason, metrics=metrics, warnings=warnings_
        )
    row = rows[index]
    row.update(verdict="selected", reason=why)
    if _looks(row) == "T2w":
        warnings_.append(
            f"{Path(row['path']).name}: its intensities look T2-weighted (CSF brighter than"
            " white matter), not like the T1w audited"
        )
    metrics.update(_row_metrics(row))
    metrics.update(hdr_missing_slices=0, hdr_duplicate_slices=0)
    if not metrics["hdr_series_description"]:
        metrics["hdr_series_description"] = Path(row["path"]).name
    findings = []
    if (
        max(row["pixel_spacing_col"], row["pixel_spacing_row"], row["slice_thickness"])
        > rules["max_slice_thickness_3d"]
    ):
        findings.append("2d_only")
    if unreadable:
        findings.append("unreadable_files")
    log.info("NIfTI subject: %s", why)
    selected = {"kind": "nifti", "files": [row["path"]], "description": why}
    return make_record(
        "inventory",
        status=OK,
        findings=findings,
        metrics=metrics,
        warnings=warnings_,
        selected=selected,
    )


def _inventory(
    subject_dir: Path,
    series_table: Path,
    rules: dict[str, Any],
    *,
    only: Collection[str] = (),
    name: str = "",
    contrasts: Sequence[str] = (),
) -> dict[str, Any]:
    if not (subject_dir.is_dir() or sources.is_subject_archive(subject_dir)):
        message = f"subject folder not found: {subject_dir.name}"
        raise StageError(message)
    rules = resolve_rules(rules)
    scan = _scan_folder(subject_dir, only=only)
    warnings_ = list(scan.problems)
    log.info(
        "%d files: %d DICOM series, %d NIfTI, %d non-DICOM, %d unreadable",
        scan.n_files,
        len(scan.series),
        len(scan.nifti),
        len(scan.non_dicom),
        len(scan.unreadable),
    )
    geometries = {uid: _series_geometry(s) for uid, s in scan.series.items()}
    rows = [_series_row(scan.series[uid], geometries[uid], rules) for uid in scan.series]
    rows.sort(key=lambda r: (r["series_number"] is None, r["series_number"] or 0, r["series_uid"]))
    chosen = series_class.chosen_series(rules, name or sources.archive_stem(subject_dir.name))
    # The user's choice that names no usable series ends the subject with its own reason.
    choice_problem = ""
    if chosen is not None:
        selection, choice_problem = series_class.select_chosen(rows, chosen)
    else:
        selection = select_series(rows, rules)
    for row in rows:
        row["verdict"], row["reason"] = selection.verdicts[row["series_uid"]]
    nifti_rows: list[dict[str, Any]] | None = None

    def read_nifti_rows() -> list[dict[str, Any]]:
        nonlocal nifti_rows
        if nifti_rows is None:
            nifti_rows = [_nifti_row(subject_dir, rel, rules) for rel in scan.nifti]
        return nifti_rows

    if selection.uid is not None:
        if scan.nifti:
            warnings_.append(f"{_plural(len(scan.nifti), 'NIfTI file')} ignored: DICOM audited")
        record = _dicom_record(scan, rows, geometries, selection, warnings_)
    elif scan.nifti and not choice_problem:
        if rows:
            warnings_.append("no usable DICOM T1 series: audited a NIfTI file instead")
        record = _nifti_record(scan, rules, warnings_, rows, read_nifti_rows())
    else:
        reason = choice_problem or _no_series_reason(scan, rows)
        log.warning("no series: %s", reason)
        record = make_record(
            "inventory",
            status=NO_SERIES,
            reason=reason,
            metrics=_base_metrics(scan, len(rows)),
            warnings=warnings_,
        )
    # A subject without a T1w still has its other contrasts audited (on their own).
    if record["status"] in (OK, NO_SERIES) and contrasts:
        record["contrasts"] = {}
        for contrast in contrasts:
            try:
                found = _contrast_selection(
                    subject_dir, scan, rows, geometries, read_nifti_rows, rules, contrast
                )
            except Exception as error:  # another contrast's problem never costs the T1
                log.exception("%s selection failed", contrast)
                reason = f"{contrast} selection failed: {type(error).__name__}: {error}"
                found = {"reason": reason[:300], "failed": True}
            record["contrasts"][contrast] = found
    write_series_table(rows + (nifti_rows or []), series_table)
    return record


def _contrast_selection(
    subject_dir: Path,
    scan: _Scan,
    rows: list[dict[str, Any]],
    geometries: dict[str, _Geometry],
    read_nifti_rows: Callable[[], list[dict[str, Any]]],
    rules: dict[str, Any],
    contrast: str,
) -> dict[str, Any]:
    """``{"selected": ...}`` (what ``convert`` takes) of the subject's ``contrast`` series, or
    ``{"reason": ...}`` why it has none. DICOM first, then NIfTI files (by name); the chosen
    row's verdict in the series table says it is audited as ``contrast``."""
    index, why = contrast_select.choose_dicom(rows, contrast, rules)
    if index is not None:
        row = rows[index]
        row["verdict"], row["reason"] = "selected", f"audited as {contrast}: {why}"
        series = scan.series[row["series_uid"]]
        return {"selected": _dicom_selected(series, row, geometries[row["series_uid"]], why)}
    if not scan.nifti:
        return {"reason": why}
    nifti_rows = read_nifti_rows()
    index, nifti_why = contrast_select.choose_nifti(nifti_rows, contrast)
    if index is None:
        return {"reason": why if rows else nifti_why}
    row = nifti_rows[index]
    row["verdict"], row["reason"] = "selected", f"audited as {contrast}: {nifti_why}"
    return {"selected": {"kind": "nifti", "files": [row["path"]], "description": nifti_why}}


def inventory_subject(
    subject_dir: Path,
    *,
    series_table: Path,
    record_path: Path,
    rules: dict,
    only: Collection[str] = (),
    name: str = "",
    contrasts: Sequence[str] = (),
) -> dict:
    """List the subject's series, choose the audited one and audit its headers.

    Writes ``series_table`` (TSV, ``SERIES_COLUMNS``) and the ``inventory``
    record, whose ``metrics`` hold the ``hdr_*`` columns (voxel sizes in mm,
    dims in voxels as columns x rows x slices, TR/TE/TI in ms, flip angle in
    degrees, field strength in T; None when unknown), whose ``findings`` are
    codes from ``FINDINGS`` (each one is a reason to flag the subject), and
    whose ``selected`` names the files to convert (paths relative to
    ``subject_dir``). ``rules`` is the ``series`` config (missing keys take
    ``series.DEFAULT_RULES``). Status ``no_series`` when nothing usable is found.
    ``only`` restricts the inventory to those files (a BIDS run's own; relative to
    ``subject_dir``); ``name`` is the unit's name in the ``series.choose`` config
    (default: the folder's or archive's name). ``contrasts`` (``T2w``, ``FLAIR``) are
    selected too, with or without a T1: the record's ``contrasts`` maps each to
    ``{"selected": ...}`` or ``{"reason": ...}`` (``mriaudit.contrasts.select``; with
    ``"failed": true`` where the selection itself broke, which costs the T1 nothing).
    """
    subject_dir, series_table = Path(subject_dir), Path(series_table)
    record = run_stage(
        "inventory",
        lambda: _inventory(
            subject_dir, series_table, rules, only=only, name=name, contrasts=contrasts
        ),
        record_path=record_path,
    )
    if not series_table.exists():
        write_series_table([], series_table)
    return record
