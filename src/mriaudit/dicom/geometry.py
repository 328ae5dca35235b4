"""Slice geometry of a DICOM series: orientation, spacing, gaps and duplicates.

``_series_geometry`` summarises a ``scan._Series``: its slice normal and
orientation label, matrix and pixel spacing, the slice positions along the
normal and what is wrong with them (``SliceGaps``: missing, duplicated or
non-uniformly spaced slices, per volume of a multi-echo or 4D series), mixed
orientations or matrix sizes and inconsistent rescaling.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mriaudit.dicom.scan import _Series, _Slice

_POSITION_TOLERANCE_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-3
# A slice normal more than 25 degrees from every axis is called oblique.
_OBLIQUE_COS = float(np.cos(np.radians(25.0)))


@dataclass(frozen=True)
class SliceGaps:
    """Slice positions along the normal, summarised.

    ``spacing`` is the median step between distinct positions (mm, None with
    fewer than two); ``missing`` counts the positions absent from gaps that are
    whole multiples of it; ``duplicates`` counts positions seen more than once
    (extra copies); ``nonuniform`` is True when some step is not a whole
    multiple of the median spacing within tolerance.
    """

    n_unique: int
    spacing: float | None
    missing: int
    duplicates: int
    nonuniform: bool


def slice_gaps(distances: Sequence[float] | np.ndarray, *, tolerance_mm: float = 0.01) -> SliceGaps:
    """Audit slice positions (mm along the slice normal, any order).

    Positions closer than ``tolerance_mm`` are the same slice. A step of about
    k times the median spacing means k - 1 missing slices; a step that is not
    within max(0.02 mm, 2 %) of a whole multiple of the median makes the
    spacing non-uniform. Slices missing at either end cannot be seen.
    """
    ordered = np.sort(np.asarray(distances, dtype=float))
    if ordered.size == 0:
        return SliceGaps(0, None, 0, 0, False)
    steps = np.diff(ordered)
    duplicates = int(np.sum(steps <= tolerance_mm))
    steps = steps[steps > tolerance_mm]
    if steps.size == 0:
        return SliceGaps(1, None, 0, duplicates, False)
    spacing = round(float(np.median(steps)), 5)  # positions carry float noise
    multiples = np.maximum(np.rint(steps / spacing), 1.0)
    missing = int(np.sum(multiples - 1.0))
    residual = np.abs(steps - multiples * spacing)
    nonuniform = bool(np.any(residual > max(0.02, 0.02 * spacing)))
    return SliceGaps(int(steps.size + 1), spacing, missing, duplicates, nonuniform)


def orientation_label(normal: Sequence[float] | np.ndarray) -> str:
    """``axial``, ``sagittal`` or ``coronal`` after the axis nearest the slice normal.

    ``oblique`` when the normal is more than 25 degrees from every axis. The
    normal may be in LPS (DICOM) or RAS (NIfTI): only absolute components count.
    """
    vector = np.abs(np.asarray(normal, dtype=float))
    norm = float(np.linalg.norm(vector))
    if norm == 0 or not np.isfinite(norm):
        return ""
    vector /= norm
    axis = int(np.argmax(vector))
    if vector[axis] < _OBLIQUE_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass(frozen=True)
class _Geometry:
    orientation: tuple[float, ...] | None
    normal: np.ndarray | None
    shape: tuple[int, int] | None
    pixel_spacing: tuple[float, ...] | None
    n_slices: int
    gaps: SliceGaps
    mixed_orientation: bool
    mixed_dimensions: bool
    inconsistent_rescale: bool


def _most_common(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return Counter(known).most_common(1)[0][0] if known else None


def _series_geometry(series: _Series) -> _Geometry:
    """Slice grid of a series: main orientation, in-plane size, and the slice-position audit."""
    slices = series.slices
    rounded = [None if s.orientation is None else tuple(np.round(s.orientation, 3)) for s in slices]
    main_key = _most_common(rounded)
    main = next(
        (s.orientation for s, r in zip(slices, rounded, strict=True) if r == main_key), None
    )
    mixed_orientation = main is not None and any(
        s.orientation is not None
        and float(np.max(np.abs(np.subtract(s.orientation, main)))) > _ORIENTATION_TOLERANCE
        for s in slices
    )
    shapes = {s.shape for s in slices if s.shape is not None}
    spacings = {tuple(np.round(s.pixel_spacing, 3)) for s in slices if s.pixel_spacing}
    rescales = {(round(a, 6), round(b, 6)) for a, b in (s.rescale for s in slices)}
    normal = None
    gaps = SliceGaps(0, None, 0, 0, False)
    if main is not None:
        normal = np.cross(main[:3], main[3:])
        normal = normal / (np.linalg.norm(normal) or 1.0)
        on_grid = [
            s
            for s, r in zip(slices, rounded, strict=True)
            if r == main_key and s.position is not None
        ]
        gaps = _volume_aware_gaps(on_grid, normal)
    n_slices = gaps.n_unique if gaps.n_unique else len(slices)
    return _Geometry(
        orientation=main,
        normal=normal,
        shape=_most_common([s.shape for s in slices]),
        pixel_spacing=_most_common([s.pixel_spacing for s in slices]),
        n_slices=n_slices,
        gaps=gaps,
        mixed_orientation=mixed_orientation,
        mixed_dimensions=len(shapes) > 1 or len(spacings) > 1,
        inconsistent_rescale=len(rescales) > 1,
    )


def _volume_aware_gaps(slices: list[_Slice], normal: np.ndarray) -> SliceGaps:
    """``slice_gaps`` where each echo, time point or acquisition is its own volume.

    Positions repeated across volumes are not duplicates; repeated within one are.
    """
    distances = np.array([float(np.dot(s.position, normal)) for s in slices])
    if distances.size == 0:
        return SliceGaps(0, None, 0, 0, False)
    overall = slice_gaps(distances, tolerance_mm=_POSITION_TOLERANCE_MM)
    volumes = sorted({s.volume for s in slices})
    if len(volumes) < 2:
        return overall
    duplicates = 0
    for volume in volumes:
        group = distances[[s.volume == volume for s in slices]]
        duplicates += slice_gaps(group, tolerance_mm=_POSITION_TOLERANCE_MM).duplicates
    return SliceGaps(
        overall.n_unique, overall.spacing, overall.missing, duplicates, overall.nonuniform
    )


def _slice_positions(series: _Series, normal: np.ndarray, skip: set[str]) -> list[float]:
    """Distinct slice positions (mm along ``normal``, ascending) of the files kept for conversion."""
    distances = sorted(
        float(np.dot(s.position, normal))
        for s in series.slices
        if s.position is not None and s.file not in skip
    )
    distinct = [
        d
        for i, d in enumerate(distances)
        if i == 0 or d - distances[i - 1] > _POSITION_TOLERANCE_MM
    ]
    return [round(d, 4) for d in distinct]
