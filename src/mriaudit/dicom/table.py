"""The series table: one row per DICOM series (``sub-<id>_series.tsv``).

``_series_row`` turns a series and its geometry into the row a curator reads
(``SERIES_COLUMNS``): headers, geometry, the contrast class and the evidence
for it (``mriaudit.series.classify``), head coverage, and later its verdict;
``write_series_table`` writes the rows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from mriaudit import series as series_class
from mriaudit.dicom.geometry import _Geometry, orientation_label
from mriaudit.dicom.scan import _Series, _text
from mriaudit.tables import write_tsv

#: Columns of the series table (``sub-<id>_series.tsv``), one row per series or NIfTI file.
SERIES_COLUMNS: tuple[str, ...] = (
    "kind",
    "series_uid",
    "series_number",
    "path",
    "modality",
    "description",
    "protocol",
    "sequence_name",
    "scanning_sequence",
    "sequence_variant",
    "pulse_sequence",
    "image_type",
    "original",
    "localizer",
    "contrast",
    "post_contrast",
    "contrast_evidence",
    "coverage_mm",
    "core_skew",
    "acquisition",
    "rows",
    "cols",
    "n_slices",
    "pixel_spacing_row",
    "pixel_spacing_col",
    "slice_thickness",
    "slice_spacing",
    "orientation",
    "n_files",
    "n_unreadable",
    "transfer_syntax",
    "manufacturer",
    "model",
    "field_strength",
    "tr",
    "te",
    "ti",
    "flip_angle",
    "missing_slices",
    "duplicate_slices",
    "verdict",
    "reason",
)

_LOCALIZER = re.compile(
    r"localizer|localiser|scout|survey|3.?plane|aahead|(?<![a-z])loc(?![a-z])", re.IGNORECASE
)


def _common_folder(files: list[str]) -> str:
    folders = [str(Path(f).parent) for f in files]
    if not folders:
        return ""
    common = os.path.commonpath(folders)
    return "" if common == "." else common


def _series_row(series: _Series, geometry: _Geometry, rules: dict[str, Any]) -> dict[str, Any]:
    """One row of the series table (selection verdict filled in later)."""
    header = series.header
    image_type = header["image_type"]
    original = image_type[0] if image_type and image_type[0] in ("ORIGINAL", "DERIVED") else ""
    names = " ".join([header["description"], header["protocol"]])
    localizer = "LOCALIZER" in image_type or bool(_LOCALIZER.search(names))
    spacing = geometry.gaps.spacing or header["spacing_between_slices"] or header["slice_thickness"]
    thickness = header["slice_thickness"]
    acquisition = header["acquisition"] if header["acquisition"] in ("2D", "3D") else ""
    if not acquisition and (thickness or spacing):
        thin = max(thickness or 0.0, spacing or 0.0) <= rules["max_slice_thickness_3d"]
        acquisition = "3D" if thin else "2D"
    pixel_spacing = geometry.pixel_spacing
    row = {
        "kind": "dicom",
        "series_uid": series.uid,
        "series_number": header["series_number"],
        "path": _common_folder(series.files),
        "modality": header["modality"],
        "description": header["description"],
        "protocol": header["protocol"],
        "sequence_name": header["sequence_name"],
        "scanning_sequence": header["scanning_sequence"],
        "sequence_variant": header["sequence_variant"],
        "pulse_sequence": header["pulse_sequence"],
        "contrast_agent": header["contrast_agent"],
        "image_type": "\\".join(image_type),
        "original": original,
        "localizer": localizer,
        "acquisition": acquisition,
        "rows": None if geometry.shape is None else geometry.shape[0],
        "cols": None if geometry.shape is None else geometry.shape[1],
        "n_slices": geometry.n_slices,
        "pixel_spacing_row": None if pixel_spacing is None else pixel_spacing[0],
        "pixel_spacing_col": None if pixel_spacing is None else pixel_spacing[1],
        "slice_thickness": thickness,
        "slice_spacing": spacing,
        "orientation": "" if geometry.normal is None else orientation_label(geometry.normal),
        "n_files": len(series.files),
        "n_unreadable": len(series.unusable),
        "transfer_syntax": header["transfer_syntax"],
        "manufacturer": header["manufacturer"],
        "model": header["model"],
        "field_strength": header["field_strength"],
        "tr": header["tr"],
        "te": header["te"],
        "ti": header["ti"],
        "flip_angle": header["flip_angle"],
        "missing_slices": geometry.gaps.missing,
        "duplicate_slices": geometry.gaps.duplicates,
        "verdict": "",
        "reason": "",
    }
    return _classified(row)


def _coverage_mm(row: dict[str, Any]) -> float | None:
    """The smallest extent (mm) of the box a series' slices span."""
    extents = [
        (row.get("rows") or 0) * (row.get("pixel_spacing_row") or 0.0),
        (row.get("cols") or 0) * (row.get("pixel_spacing_col") or 0.0),
        (row.get("n_slices") or 0) * (row.get("slice_spacing") or 0.0),
    ]
    return round(min(extents), 1) if all(e > 0 for e in extents) else None


def _classified(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its header class (``class``, and the table's ``contrast``,
    ``post_contrast``, ``contrast_evidence``) and ``coverage_mm``."""
    kind = series_class.classify(row)
    row.update(
        {
            "class": kind,
            "contrast": kind.contrast,
            "post_contrast": kind.post_contrast,
            "contrast_evidence": kind.why,
            "coverage_mm": _coverage_mm(row),
        }
    )
    return row


def write_series_table(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the series table (``SERIES_COLUMNS``, one row per series) in the project's
    TSV dialect (``mriaudit.tables``); header strings lose control characters."""
    cleaned = [{k: _text(v) if isinstance(v, str) else v for k, v in row.items()} for row in rows]
    write_tsv(cleaned, path, columns=SERIES_COLUMNS, digits=6)
