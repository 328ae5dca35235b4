"""The IQMs' masks on the native grid: the zero-filled frame, air, artefacts, tissues.

Air is more than ``HEAD_MARGIN_MM`` outside the head mask, outside the
zero-filled frame (``frame_mask``) and above MRIQC's glabella-inion level
(``hat_mask``), so the face, neck and shoulders, which carry signal, wrap-around
and eye-motion ghosts, do not count as background (MRIQC's "hat" mask);
artefacts are air voxels far above the air noise level and away from the head
(``artifact_mask``); tissue masks are the posteriors above ``PV_THRESHOLD``,
eroded at the brain's base.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from mriaudit.iqm.metrics import MIN_REGION_VOXELS

#: MRIQC's glabella (0, 90, -14) and inion (0, -120, -14) share this MNI height (mm).
HAT_MNI_Z_MM = -14.0
#: Without a registration, the same level is taken this far below the top of the head (mm).
HAT_BELOW_VERTEX_MM = 90.0
#: Air starts this far outside the head mask (mm), clear of the skin's partial volume.
HEAD_MARGIN_MM = 4.0
#: Partial-volume threshold for a tissue's summary mask (MRIQC: 0.85).
PV_THRESHOLD = 0.85
#: Summary masks are eroded when every voxel side is below this (mm), as in MRIQC.
ERODE_BELOW_MM = 1.9
#: Artefact voxels: robust z-score above this in air (MRIQC: 10) ...
ARTIFACT_ZSCORE = 10.0
#: ... and farther from the head than this fraction of the largest air distance (MRIQC: 0.10).
ARTIFACT_NEAR_HEAD = 0.10


def frame_mask(data: np.ndarray, *, min_voxels: int = 500) -> np.ndarray:
    """Zero-filled frame of the field of view (MRIQC's ``rotmask``), boolean (X, Y, Z).

    Voxels <= 0 that, after an opening with an 18-connected element (dropping
    isolated zeros of the air noise), belong to a component touching the border
    of the volume: padding from reslicing, rotation or defacing. Fewer than
    ``min_voxels`` such voxels give an empty mask.
    """
    zero = ~(np.asarray(data) > 0)
    faces = [np.take(zero, index, axis=axis) for axis in range(3) for index in (0, -1)]
    if np.count_nonzero(zero) < min_voxels or not any(face.any() for face in faces):
        return np.zeros(zero.shape, dtype=bool)
    # Opening, with the outside counted as zero so padding at the border survives.
    structure = ndi.generate_binary_structure(3, 2)
    eroded = ndi.binary_erosion(zero, structure=structure, border_value=1)
    opened = ndi.binary_dilation(eroded, structure=structure) & zero
    labels, count = ndi.label(opened)
    if count == 0:
        return np.zeros(zero.shape, dtype=bool)
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(3):
        for index in (0, -1):
            border[np.unique(np.take(labels, index, axis=axis))] = True
    border[0] = False
    frame = border[labels]
    if np.count_nonzero(frame) < min_voxels:
        return np.zeros(zero.shape, dtype=bool)
    return frame


def hat_mask(
    shape: tuple[int, ...],
    *,
    vox_to_mni: np.ndarray | None,
    head: np.ndarray,
    spacing_mm: Sequence[float],
) -> np.ndarray:
    """Voxels above MRIQC's glabella-inion level, boolean (canonical RAS grid).

    With a registration, voxels whose MNI height is at least -14 mm. Without
    one, the level is taken 90 mm below the top of the head mask along the
    canonical superior axis (about where MNI z = -14 mm lies on an adult head).
    """
    if vox_to_mni is not None:
        row = vox_to_mni[2]
        # The (X, Y) plane's height first, so only one pass touches the whole volume.
        plane = (
            row[3]
            + row[0] * np.arange(shape[0], dtype=np.float64)[:, None]
            + row[1] * np.arange(shape[1], dtype=np.float64)[None, :]
        ).astype(np.float32)
        rise = (row[2] * np.arange(shape[2], dtype=np.float64)).astype(np.float32)
        return np.greater_equal(plane[:, :, None], np.float32(HAT_MNI_Z_MM) - rise[None, None, :])
    slices = np.nonzero(head.any(axis=(0, 1)))[0]
    top = int(slices.max()) if slices.size else shape[2] - 1
    level = top - HAT_BELOW_VERTEX_MM / spacing_mm[2]
    index = np.arange(shape[2])[None, None, :]
    return np.broadcast_to(index >= level, shape).copy()


def distance_mm(
    mask: np.ndarray, spacing_mm: Sequence[float], *, step_mm: float = 2.0
) -> np.ndarray:
    """Approximate distance (mm) of every voxel to ``mask``, float32 of ``mask``'s shape.

    The exact Euclidean transform of a 1 mm head takes seconds; it is computed on
    a grid about ``step_mm`` coarse (blocks that touch the mask count as mask),
    so distances are accurate to about ``step_mm``. An empty mask gives +inf.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.full(m.shape, np.inf, dtype=np.float32)
    factors = [max(1, int(step_mm // s)) for s in spacing_mm]
    padded = np.pad(m, [(0, (-n) % f) for n, f in zip(m.shape, factors, strict=True)])
    blocks: list[int] = []
    for n, f in zip(padded.shape, factors, strict=True):
        blocks += [n // f, f]
    coarse = padded.reshape(blocks).any(axis=(1, 3, 5))
    sampling = [s * f for s, f in zip(spacing_mm, factors, strict=True)]
    dist = ndi.distance_transform_edt(~coarse, sampling=sampling).astype(np.float32)
    for axis, f in enumerate(factors):
        dist = np.repeat(dist, f, axis=axis)
    return dist[: m.shape[0], : m.shape[1], : m.shape[2]]


def artifact_mask(
    data: np.ndarray,
    air: np.ndarray,
    head_distance_mm: np.ndarray,
    *,
    zscore: float = ARTIFACT_ZSCORE,
    near: float = ARTIFACT_NEAR_HEAD,
) -> np.ndarray:
    """Artefact voxels in the air (MRIQC ``artifact_mask``, Mortamet et al. 2009), boolean.

    Inside ``air`` the positive intensities give a robust location (median) and
    spread (normalised MAD, or std when the MAD is 0); air voxels whose robust
    z-score exceeds ``zscore`` and whose distance to the head
    (``head_distance_mm``, see :func:`distance_mm`) is at least ``near`` times
    the largest such distance in the air are candidates, and a 6-connected
    opening keeps only clusters (ghosts, wrap-around, spikes), not single noisy
    voxels. All arrays share one 3-D shape.
    """
    x = np.asarray(data, dtype=np.float32)
    air = np.asarray(air, dtype=bool)
    values = x[air]
    values = values[values > 0].astype(np.float64)
    if values.size < MIN_REGION_VOXELS:
        return np.zeros(x.shape, dtype=bool)
    location = float(np.median(values))
    spread = float(stats.median_abs_deviation(values, scale="normal")) or float(values.std())
    if spread <= 0:
        return np.zeros(x.shape, dtype=bool)
    candidates = air & (x > location + zscore * spread)
    if not candidates.any():
        return candidates
    reach = float(head_distance_mm[air].max())
    candidates &= head_distance_mm >= near * reach
    opened = ndi.binary_opening(candidates, structure=ndi.generate_binary_structure(3, 1))
    return opened & air


def tissue_masks(
    pvms: Mapping[str, np.ndarray], spacing_mm: Sequence[float]
) -> dict[str, np.ndarray]:
    """Summary masks ``pv > 0.85``, eroded (18-connected) when all voxel sides < 1.9 mm, as MRIQC."""
    erode = all(s < ERODE_BELOW_MM for s in spacing_mm)
    structure = ndi.generate_binary_structure(3, 2)
    out = {}
    for name, pv in pvms.items():
        mask = np.asarray(pv) > PV_THRESHOLD
        out[name] = ndi.binary_erosion(mask, structure=structure) if erode else mask
    return out


# --------------------------------------------------------------------------- tissues
