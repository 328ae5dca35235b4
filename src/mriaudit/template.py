"""The MNI152 template (ICBM 2009a symmetric) that ships with nilearn.

Nothing is downloaded: nilearn bundles the 1 mm T1 template, its grey- and
white-matter probability maps and derives the brain mask from them. The 2 mm
grid is nilearn's: every other 1 mm voxel, starting at the same corner. Its
images are taken as that subsample of the 1 mm ones, which is what nilearn's
cubic-spline resampling returns there (a spline interpolates its samples)
without the second of spline filtering per image that it costs. Images are
cached per process.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import nibabel as nib
import numpy as np
from nilearn import datasets, image

RESOLUTIONS = (1, 2)


def _check(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        message = f"template resolution must be one of {RESOLUTIONS} mm, got {resolution!r}"
        raise ValueError(message)


def _on_grid(load: Callable[..., nib.Nifti1Image], resolution: int) -> nib.Nifti1Image:
    """nilearn image ``load(resolution=...)``; at 2 mm, the 1 mm image's every other voxel."""
    fine = load(resolution=1)
    if resolution == 1:
        return fine
    data = np.asarray(fine.dataobj)[::2, ::2, ::2]
    return nib.Nifti1Image(data, fine.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))


def _as_float32(img: nib.Nifti1Image) -> nib.Nifti1Image:
    data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
    out = nib.Nifti1Image(data, img.affine)
    out.header.set_xyzt_units("mm")
    return out


@lru_cache(maxsize=4)
def load_template(*, resolution: int = 2) -> nib.Nifti1Image:
    """T1 template with head, float32 in [0, 1]; shape (99, 117, 95) at 2 mm, (197, 233, 189) at 1 mm."""
    _check(resolution)
    return _as_float32(_on_grid(datasets.load_mni152_template, resolution))


@lru_cache(maxsize=4)
def load_brain_mask(*, resolution: int = 2) -> nib.Nifti1Image:
    """Brain mask on the template grid, uint8 {0, 1}."""
    _check(resolution)
    mask = _on_grid(datasets.load_mni152_brain_mask, resolution)
    data = (np.asarray(mask.get_fdata()) > 0.5).astype(np.uint8)
    return nib.Nifti1Image(data, load_template(resolution=resolution).affine)


@lru_cache(maxsize=4)
def load_tissue_priors(*, resolution: int = 2) -> dict[str, nib.Nifti1Image]:
    """Tissue probability maps ``csf``, ``gm``, ``wm`` on the template grid, float32 in [0, 1].

    nilearn ships GM and WM; CSF is what remains of the brain mask, so the
    three maps sum to one inside the brain and to zero outside.
    """
    _check(resolution)
    target = load_template(resolution=resolution)
    gm = image.resample_to_img(
        _on_grid(datasets.load_mni152_gm_template, resolution), target, interpolation="linear"
    )
    wm = image.resample_to_img(
        _on_grid(datasets.load_mni152_wm_template, resolution), target, interpolation="linear"
    )
    brain = load_brain_mask(resolution=resolution).get_fdata() > 0
    gm_data = np.clip(gm.get_fdata(), 0, 1) * brain
    wm_data = np.clip(wm.get_fdata(), 0, 1) * brain
    total = gm_data + wm_data
    excess = np.where(total > 1, total, 1.0)
    gm_data, wm_data = gm_data / excess, wm_data / excess
    csf_data = np.clip(1.0 - gm_data - wm_data, 0, 1) * brain
    return {
        name: nib.Nifti1Image(data.astype(np.float32), target.affine)
        for name, data in (("csf", csf_data), ("gm", gm_data), ("wm", wm_data))
    }
