"""The MNI152 template (ICBM 2009a symmetric) that ships with nilearn.

Nothing is downloaded: nilearn's package bundles the 1 mm T1 template and its
grey- and white-matter probability maps. They are read here from nilearn's
data folder, as nilearn reads them (each scaled by its maximum), without
importing nilearn (its datasets module costs a second per process, and every
stage loads the template). The brain mask is the T1 above 0.2 of its maximum,
as nilearn's ``load_mni152_brain_mask``. The 2 mm grid is nilearn's: every
other 1 mm voxel, starting at the same corner, and its images are that
subsample of the 1 mm ones, which is what nilearn's cubic-spline resampling
returns there (a spline interpolates its samples). A test checks both against
nilearn itself. Images are cached per process.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

RESOLUTIONS = (1, 2)
#: nilearn's brain-mask threshold on the scaled T1 template.
BRAIN_THRESHOLD = 0.2
_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def _check(resolution: int) -> None:
    if resolution not in RESOLUTIONS:
        message = f"template resolution must be one of {RESOLUTIONS} mm, got {resolution!r}"
        raise ValueError(message)


def _data_folder() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        message = "nilearn is not installed: it provides the MNI152 template"
        raise FileNotFoundError(message)
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@lru_cache(maxsize=8)
def _scaled(name: str, resolution: int) -> nib.Nifti1Image:
    """nilearn's image ``name`` divided by its maximum, float32; at 2 mm every other voxel."""
    path = _data_folder() / _FILES[name]
    if not path.is_file():
        message = f"nilearn's MNI152 file {path.name} is missing from {path.parent}"
        raise FileNotFoundError(message)
    image = nib.load(path)
    data = np.asarray(image.dataobj, dtype=np.float32)
    data /= data.max()
    affine = np.asarray(image.affine, dtype=float)
    if resolution == 2:
        data = np.ascontiguousarray(data[::2, ::2, ::2])
        affine = affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    out = nib.Nifti1Image(data, affine)
    out.header.set_xyzt_units("mm")
    return out


@lru_cache(maxsize=4)
def load_template(*, resolution: int = 2) -> nib.Nifti1Image:
    """T1 template with head, float32 in [0, 1]; shape (99, 117, 95) at 2 mm, (197, 233, 189) at 1 mm."""
    _check(resolution)
    return _scaled("t1", resolution)


@lru_cache(maxsize=4)
def load_brain_mask(*, resolution: int = 2) -> nib.Nifti1Image:
    """Brain mask on the template grid, uint8 {0, 1}."""
    _check(resolution)
    template = load_template(resolution=resolution)
    data = (np.asarray(template.dataobj) > BRAIN_THRESHOLD).astype(np.uint8)
    return nib.Nifti1Image(data, template.affine)


@lru_cache(maxsize=4)
def load_tissue_priors(*, resolution: int = 2) -> dict[str, nib.Nifti1Image]:
    """Tissue probability maps ``csf``, ``gm``, ``wm`` on the template grid, float32 in [0, 1].

    nilearn ships GM and WM; CSF is what remains of the brain mask, so the
    three maps sum to one inside the brain and to zero outside.
    """
    _check(resolution)
    target = load_template(resolution=resolution)
    gm, wm = _scaled("gm", resolution), _scaled("wm", resolution)
    for name, image in (("gm", gm), ("wm", wm)):
        if image.shape != target.shape or not np.allclose(image.affine, target.affine):
            message = f"nilearn's {name} map is not on the T1 template's grid"
            raise ValueError(message)
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
