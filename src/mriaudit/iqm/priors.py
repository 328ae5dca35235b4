"""The tissue maps of the IQMs: the MNI152 tissue priors warped to the native grid.

The priors are warped (only the box around the brain) with the inverse of the
registration affine and weight the mixture of ``mriaudit.iqm.tissues``. An
affine that scales the template brain implausibly (typically a whole head
fitted to the brain-only template) or puts it outside the head mask gives no
segmentation (``SegmentationUnavailable``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np

from mriaudit import template
from mriaudit.iqm.grid import Grid
from mriaudit.iqm.metrics import TISSUES
from mriaudit.iqm.tissues import SegmentationUnavailable, segment_tissues

#: Plausible volume of the warped brain mask relative to the template's (the affine's
#: scaling): outside it the registration is not usable (typically the whole head was
#: fitted to the template brain).
BRAIN_VOLUME_RATIO = (0.5, 1.6)
#: Share of the warped brain mask that must fall inside the head mask.
MIN_BRAIN_IN_HEAD = 0.8


@lru_cache(maxsize=2)
def _ants_priors(resolution: int) -> tuple[ants.ANTsImage, ...]:
    maps = template.load_tissue_priors(resolution=resolution)
    out = []
    for name in TISSUES:
        img = nib.Nifti1Image(np.asarray(maps[name].dataobj, dtype=np.float32), maps[name].affine)
        img.header.set_xyzt_units("mm", "sec")
        out.append(ants.from_nibabel_nifti(img))
    return tuple(out)


@lru_cache(maxsize=2)
def _template_brain(resolution: int) -> tuple[np.ndarray, float]:
    """The template brain mask's bounding-box corners (4, 8), MNI RAS mm (homogeneous), and volume (mL)."""
    mask = template.load_brain_mask(resolution=resolution)
    inside = np.asarray(mask.dataobj) > 0
    volume_ml = np.count_nonzero(inside) * abs(np.linalg.det(mask.affine[:3, :3])) / 1000.0
    index = np.nonzero(inside)
    low = [int(i.min()) for i in index]
    high = [int(i.max()) for i in index]
    corners = np.array(
        [
            [a, b, c, 1.0]
            for a in (low[0], high[0])
            for b in (low[1], high[1])
            for c in (low[2], high[2])
        ]
    ).T
    return mask.affine @ corners, float(volume_ml)


def _brain_box(
    vox_to_mni: np.ndarray, shape: tuple[int, ...], spacing: Sequence[float], resolution: int
) -> tuple[slice, ...]:
    """Canonical-grid box holding the warped template brain (plus 5 mm), clipped to the grid.

    Raises ``SegmentationUnavailable`` when the affine scales the brain implausibly
    or puts it outside the field of view.
    """
    corners, template_ml = _template_brain(resolution)
    # mm^3 of native space per mm^3 of MNI space: the warped brain's volume ratio.
    ratio = float(np.prod(spacing)) / abs(float(np.linalg.det(vox_to_mni[:3, :3])))
    if not BRAIN_VOLUME_RATIO[0] <= ratio <= BRAIN_VOLUME_RATIO[1]:
        message = (
            f"the registration scales the template brain to {ratio * template_ml:.0f} mL "
            f"({ratio:.2f} x the template's): not a usable alignment"
        )
        raise SegmentationUnavailable(message)
    corners = np.linalg.inv(vox_to_mni) @ corners
    margin = [math.ceil(5.0 / s) for s in spacing]
    box = []
    for axis, n in enumerate(shape):
        start = max(0, math.floor(corners[axis].min()) - margin[axis])
        stop = min(n, math.ceil(corners[axis].max()) + margin[axis] + 1)
        if stop - start < 2:
            message = "the warped template brain lies outside the field of view"
            raise SegmentationUnavailable(message)
        box.append(slice(start, stop))
    return tuple(box)


def tissue_maps(
    grid: Grid,
    data: np.ndarray,
    head: np.ndarray,
    transform: Path,
    vox_to_mni: np.ndarray,
    resolution: int,
) -> tuple[tuple[slice, ...], dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Tissue maps inside the brain's box of the canonical grid.

    Returns the box, the partial-volume maps and the warped template priors per
    tissue (each of the box's shape) and the mixture's fit. Raises
    ``SegmentationUnavailable`` when the warped brain is implausible.
    """
    box = _brain_box(vox_to_mni, data.shape, grid.spacing, resolution)
    reference = grid.reference(box)
    templates = _ants_priors(resolution)
    # One (K, X, Y, Z) array filled in place: large temporaries cost more than the arithmetic.
    priors = np.empty((len(templates), *(b.stop - b.start for b in box)), dtype=np.float32)
    for k, prior in enumerate(templates):
        moved = ants.apply_transforms(
            fixed=reference,
            moving=prior,
            transformlist=[str(transform)],
            whichtoinvert=[True],
            interpolator="linear",
        )
        np.clip(grid.canonical(moved.numpy()), 0.0, 1.0, out=priors[k])
    brain_prob = priors.sum(axis=0)
    brain = brain_prob > 0.5
    n_brain = int(np.count_nonzero(brain))
    volume_ml = n_brain * float(np.prod(grid.spacing)) / 1000.0
    if n_brain == 0:
        message = "the warped brain mask is empty"
        raise SegmentationUnavailable(message)
    head_box = head[box]
    in_head = np.count_nonzero(brain & head_box) / n_brain
    if in_head < MIN_BRAIN_IN_HEAD:
        message = f"only {in_head:.0%} of the warped brain mask lies inside the head mask"
        raise SegmentationUnavailable(message)
    brain &= head_box
    priors /= np.maximum(brain_prob, 1e-6)
    priors[:, ~brain] = 0.0
    try:
        posteriors, fit = segment_tissues(data[box], brain, priors)
    except ValueError as error:
        raise SegmentationUnavailable(str(error)) from error
    fit["brain_volume_ml"] = round(volume_ml, 1)
    pvms = dict(zip(TISSUES, posteriors, strict=True))
    tpms = dict(zip(TISSUES, priors, strict=True))
    return box, pvms, tpms, fit
