"""A contrast onto its subject's T1w (rigid, cross-modal), and whether the two belong together.

Mattes mutual information drives a rigid registration of the bias-corrected
contrast to the bias-corrected T1w on a 2 mm grid (a T2 and a T1 of one head
differ in intensity, not in shape). Whether they show one head is judged by the
alignment of their edges once registered (``gradient_alignment``: the mean
squared cosine between the two images' intensity gradients where both have
edges, the normalised gradient field of Haber and Modersitzki), on the
contrast's own grid with the T1w brought to its resolution
(``_check_on_contrast_grid``), as its share above the alignment of the T1w
shifted by a few millimetres (chance). It ignores which tissue is bright, so it serves
T1w against T2w, FLAIR or PD alike; a rigid transform cannot make another
person's brain fit, so their edges stay apart. Mutual information does not tell
the two apart (normalised, 1.01-1.21 for one head and 1.005-1.13 for two).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ants
import numpy as np
from scipy import ndimage as ndi

from mriaudit.preprocess.images import ants_image

#: Grid (mm) of the co-registration and of its check.
COREG_GRID_MM = 2.0
#: The T1w shifted this far (mm) along each axis gives the alignment of edges by chance.
NULL_SHIFT_MM = 8.0
#: Below this alignment gain (the share of ``gradient_alignment`` above chance) a contrast
#: does not belong with the subject's T1w. On the real scans of ../shared (N4, this
#: registration and check): one head (BraTS and TCGA glioma T1 with their T2 and
#: FLAIR, 1 mm skull-stripped and 5.5 mm slices with skull; Chris Rorden's T1 and PD)
#: 0.42-0.62; two heads (9 pairs of different people: T2 or FLAIR, 1 mm or 5.5 mm,
#: with or without skull) 0.005-0.13. The demo's 3D T2w and FLAIR of its own head at
#: 3 mm 0.21-0.36, its 2D T2 0.26-0.40. The raw alignment separates neither: it rises
#: with resolution and SNR (one head 0.54-0.82, two heads 0.41-0.73). niivue's
#: register_T2w is left out: it matches Chris Rorden's T1 better than the T1 it
#: ships with, and its provenance is undocumented.
MIN_ALIGNMENT_GAIN = 0.17


@dataclass(frozen=True)
class Coregistration:
    """The rigid transform (ANTs ``.mat``, T1w points to the contrast's points, LPS mm)
    and the check's figures."""

    transform: Path
    alignment: float
    gain: float
    overlap: float


def _coarse(image: ants.ANTsImage) -> ants.ANTsImage:
    """``image`` resampled to ``COREG_GRID_MM`` (linear), anti-aliased first."""
    spacing = np.asarray(image.spacing, dtype=float)
    sigma = np.sqrt(np.clip(COREG_GRID_MM**2 - spacing**2, 0, None)) / 2.355
    if np.any(sigma > 0):
        image = ants.smooth_image(image, list(sigma), sigma_in_physical_coordinates=True)
    return ants.resample_image(image, (COREG_GRID_MM,) * 3, use_voxels=False, interp_type=0)


def foreground(data: np.ndarray) -> np.ndarray:
    """Voxels of the head (or of a skull-stripped brain): above the 10th percentile of the
    positive values, holes filled. (X, Y, Z) bool."""
    positive = data[data > 0]
    if positive.size == 0:
        return np.zeros(data.shape, dtype=bool)
    return ndi.binary_fill_holes(data > np.percentile(positive, 10))


def gradient_alignment(
    first: np.ndarray, second: np.ndarray, mask: np.ndarray, *, axes: Sequence[int] = (0, 1, 2)
) -> float:
    """Mean squared cosine (0-1, higher = edges agree) of the angle between the gradients
    of two same-grid images along ``axes``, over the voxels of ``mask`` where both
    gradients are above their median there; NaN when fewer than 100 such voxels."""
    inside = np.asarray(mask, dtype=bool)
    if inside.sum() < 100:
        return float("nan")
    a = np.stack([np.gradient(np.asarray(first, dtype=np.float64), axis=i) for i in axes])
    b = np.stack([np.gradient(np.asarray(second, dtype=np.float64), axis=i) for i in axes])
    norm_a, norm_b = np.sqrt((a * a).sum(0)), np.sqrt((b * b).sum(0))
    edges = (
        inside
        & (norm_a > np.median(norm_a[inside]))
        & (norm_b > np.median(norm_b[inside]))
        & (norm_a > 0)
        & (norm_b > 0)
    )
    if edges.sum() < 100:
        return float("nan")
    cosine = (a * b).sum(0)[edges] / (norm_a[edges] * norm_b[edges])
    return float(np.mean(cosine**2))


def _smoothed(image: ants.ANTsImage, sigma_mm: np.ndarray) -> ants.ANTsImage:
    if not np.any(sigma_mm > 0):
        return image
    return ants.smooth_image(image, list(sigma_mm), sigma_in_physical_coordinates=True)


def _check_on_contrast_grid(
    moving: ants.ANTsImage, t1: ants.ANTsImage, transform: Path
) -> tuple[float, float, float]:
    """``(alignment, gain, overlap)`` of a co-registered pair, on the contrast's own grid.

    The contrast's grid is coarsened to at least ``COREG_GRID_MM`` per axis, and the
    T1w blurred to its in-plane voxel and resampled onto it: both then show the
    anatomy at the contrast's resolution, so a 2D series of thick slices is not
    judged by the T1w's finer detail. Gradients run along the axes whose voxel is
    at most 1.5 times the finest (across thick slices, partial volume decides).
    How well edges align by chance depends on the images (noise, resolution,
    skull): ``gain`` is the alignment's share above chance, ``(a - a0) / (1 - a0)``
    with ``a0`` the mean alignment with the T1w shifted ``NULL_SHIFT_MM`` along
    each axis either way.
    """
    own = np.asarray(moving.spacing, dtype=float)
    spacing = np.maximum(own, COREG_GRID_MM)
    contrast = _smoothed(moving, np.sqrt(spacing**2 - own**2) / 2.355)
    contrast = ants.resample_image(contrast, tuple(spacing), use_voxels=False, interp_type=0)
    finest = float(spacing.min())
    t1_spacing = np.asarray(t1.spacing, dtype=float)
    blurred = _smoothed(t1, np.sqrt(np.clip(finest**2 - t1_spacing**2, 0, None)) / 2.355)
    # The transform maps T1w points to the contrast's: the contrast's grid needs its inverse.
    t1_there = ants.apply_transforms(contrast, blurred, [str(transform)], whichtoinvert=[True])
    contrast_data, t1_data = contrast.numpy(), t1_there.numpy()
    axes = [i for i in range(3) if spacing[i] <= 1.5 * finest]
    contrast_head = foreground(contrast_data)

    def alignment(t1_image: np.ndarray) -> float:
        both = foreground(t1_image) & contrast_head
        return gradient_alignment(contrast_data, t1_image, both, axes=axes)

    aligned = alignment(t1_data)
    chance = np.nanmean(
        [
            alignment(np.roll(t1_data, sign * max(1, round(NULL_SHIFT_MM / spacing[axis])), axis))
            for axis in range(3)
            for sign in (1, -1)
        ]
    )
    gain = (aligned - chance) / (1.0 - chance) if chance < 1 else float("nan")
    t1_head = foreground(t1_data)
    overlap = float((t1_head & contrast_head).sum() / max(int(t1_head.sum()), 1))
    return aligned, float(gain), overlap


def coregister(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    t1: np.ndarray,
    t1_affine: np.ndarray,
    *,
    workdir: Path,
) -> Coregistration:
    """Rigid registration of ``moving`` (a contrast, (X, Y, Z), its RAS+ ``moving_affine``)
    to the subject's ``t1`` (its own grid and affine) on a 2 mm grid, inside
    ``ants_environment`` (whose folder is ``workdir``). Returns the transform and the
    check's figures (``_check_on_contrast_grid``): ``alignment`` (``gradient_alignment``,
    0-1), its ``gain`` above chance and ``overlap`` (the fraction of the T1w's head, on the contrast's grid, that
    the contrast covers: a skull-stripped contrast covers less)."""
    moving_image, t1_image = ants_image(moving, moving_affine), ants_image(t1, t1_affine)
    result = ants.registration(
        _coarse(t1_image),
        _coarse(moving_image),
        "Rigid",
        aff_metric="mattes",
        aff_sampling=32,
        aff_random_sampling_rate=0.2,
        outprefix=str(workdir / "coreg_"),
    )
    transform = Path(result["fwdtransforms"][0])
    alignment, gain, overlap = _check_on_contrast_grid(moving_image, t1_image, transform)
    return Coregistration(transform, alignment, gain, overlap)


def to_template(
    moving: np.ndarray,
    moving_affine: np.ndarray,
    *,
    to_t1w: Path,
    t1w_to_template: Path,
    template: ants.ANTsImage,
) -> np.ndarray:
    """``moving`` (native grid) resampled onto the ``template`` grid (linear) through the
    T1w's template transform and then the contrast's rigid one: a template point goes
    to the T1w (``t1w_to_template`` maps template points to T1w points), then to the
    contrast (``to_t1w`` maps T1w points to the contrast's). (X, Y, Z) of the template."""
    image = ants_image(moving, moving_affine)
    # ANTs applies the last transform of the list to a point first.
    moved = ants.apply_transforms(
        template, image, transformlist=[str(to_t1w), str(t1w_to_template)], interpolator="linear"
    )
    return moved.numpy()
