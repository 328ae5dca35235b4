"""The native grid of the IQMs: the subject's images on it, and its registration to MNI.

Arrays are put in the closest RAS orientation (a pure permutation/flip of the
voxel axes, no resampling), as MRIQC conforms its input to RAS, so ``x`` is
always left-right, ``y`` posterior-anterior and ``z`` inferior-superior. The
grid is the converted image's as ITK reads it, since the tissue priors are
warped onto it with ANTs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ants
import nibabel as nib
import numpy as np

from mriaudit import records
from mriaudit.intensity import finite

if TYPE_CHECKING:
    from mriaudit.preprocess.images import Handoff


def _ras_affine(img: ants.ANTsImage) -> np.ndarray:
    """Voxel index -> RAS mm affine of an ANTs image (ITK is LPS)."""
    direction = np.asarray(img.direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.spacing, dtype=np.float64)
    lps[:3, 3] = img.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@dataclass(frozen=True)
class Grid:
    """The native grid and its closest-RAS ("canonical") voxel order."""

    image: ants.ANTsImage
    ornt: np.ndarray
    affine: np.ndarray  # canonical voxel -> RAS mm
    spacing: tuple[float, float, float]  # canonical axes, mm

    @classmethod
    def of(cls, image: ants.ANTsImage) -> Grid:
        native_affine = _ras_affine(image)
        ornt = nib.orientations.io_orientation(native_affine)
        shape = tuple(int(n) for n in image.shape)
        affine = native_affine @ nib.orientations.inv_ornt_aff(ornt, shape)
        native_spacing = np.asarray(image.spacing, dtype=np.float64)
        spacing = tuple(float(s) for s in native_spacing[np.argsort(ornt[:, 0])])
        return cls(image=image, ornt=ornt, affine=affine, spacing=spacing)

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """A native-ordered array (or a crop of one) in canonical voxel order."""
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, self.ornt))

    def reference(self, box: tuple[slice, ...]) -> ants.ANTsImage:
        """Empty ANTs image covering the canonical ``box`` of the native grid."""
        lower = np.zeros(3)
        shape = [0, 0, 0]
        for axis, (target, flip) in enumerate(self.ornt.astype(int)):
            size = int(self.image.shape[axis])
            start, stop = box[target].start, box[target].stop
            lower[axis] = start if flip > 0 else size - stop
            shape[axis] = stop - start
        direction = np.asarray(self.image.direction, dtype=np.float64).reshape(3, 3)
        spacing = np.asarray(self.image.spacing, dtype=np.float64)
        origin = np.asarray(self.image.origin, dtype=np.float64) + direction @ (spacing * lower)
        return ants.from_numpy(
            np.zeros(shape, dtype=np.float32),
            origin=tuple(float(v) for v in origin),
            spacing=tuple(float(v) for v in spacing),
            direction=direction,
        )


def _load(path: Path, what: str) -> ants.ANTsImage:
    try:
        img = ants.image_read(str(path))
    except (RuntimeError, ValueError, OSError) as error:
        message = f"cannot read the {what} image: {error}".strip().splitlines()[0]
        raise records.StageError(message) from error
    if img.dimension != 3:
        message = f"the {what} image is {img.dimension}-D, expected 3-D"
        raise records.StageError(message)
    return img


def _array(path: Path, what: str, handoff: Handoff | None) -> np.ndarray:
    """The data of the image at ``path``: kept in ``handoff`` (as the file holds it), or read."""
    kept = handoff.get(path) if handoff is not None else None
    if kept is None:
        return _load(path, what).numpy()
    if kept.data.ndim != 3:
        message = f"the {what} image is {kept.data.ndim}-D, expected 3-D"
        raise records.StageError(message)
    return kept.data


def native_arrays(
    raw_image: Path, n4_image: Path, head_mask: Path, handoff: Handoff | None
) -> tuple[Grid, np.ndarray, np.ndarray, np.ndarray]:
    """The grid (as ITK reads the converted image) and the converted image, the bias-
    corrected one (clipped at 0) and the head mask on its canonical axes."""
    raw_img = _load(raw_image, "converted")
    n4 = _array(n4_image, "bias-corrected", handoff)
    mask = _array(head_mask, "head mask", handoff)
    if not tuple(raw_img.shape) == n4.shape == mask.shape:
        message = f"grids differ: raw {raw_img.shape}, n4 {n4.shape}, head mask {mask.shape}"
        raise records.StageError(message)
    grid = Grid.of(raw_img)
    raw = grid.canonical(raw_img.numpy())
    data = grid.canonical(finite(n4.astype(np.float32, copy=False), inf_to_zero=False))
    if np.shares_memory(data, n4):  # the kept image is read-only, and shared
        data = data.copy()
    np.clip(data, 0.0, None, out=data)
    head = grid.canonical(mask > 0)
    if not np.any(data > 0):
        message = "the bias-corrected image holds no signal"
        raise records.StageError(message)
    if not head.any():
        message = "the head mask is empty"
        raise records.StageError(message)
    return grid, raw, data, head


def point_affine(tx: ants.ANTsTransform) -> np.ndarray:
    """4x4 matrix of a linear ANTs transform's point mapping (LPS mm -> LPS mm)."""
    origin = np.asarray(tx.apply_to_point((0.0, 0.0, 0.0)), dtype=np.float64)
    matrix = np.eye(4)
    for axis in range(3):
        unit = [0.0, 0.0, 0.0]
        unit[axis] = 1.0
        matrix[:3, axis] = np.asarray(tx.apply_to_point(tuple(unit))) - origin
    matrix[:3, 3] = origin
    return matrix


def _read_transform(path: Path) -> tuple[np.ndarray | None, str]:
    """Native RAS mm -> MNI RAS mm affine from the registration's ``.mat``, or (None, why)."""
    if not path.is_file() or path.stat().st_size == 0:
        return None, "no registration transform (registration failed or skipped)"
    try:
        tx = ants.read_transform(str(path))
        native_to_mni = np.linalg.inv(point_affine(tx))
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as error:
        return None, f"unreadable registration transform: {error}".strip().splitlines()[0]
    # ANTs maps fixed (MNI) points to moving (native) points, both in LPS.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = flip @ native_to_mni @ flip
    if not np.all(np.isfinite(affine)):
        return None, "registration transform is not finite"
    return affine, ""


def registration_affine(transform: Path, grid: Grid) -> tuple[np.ndarray | None, str]:
    """Canonical voxel -> MNI RAS mm affine from the registration's ``.mat``, or (None, why)."""
    vox_to_mni, problem = _read_transform(Path(transform))
    return (vox_to_mni @ grid.affine if vox_to_mni is not None else None), problem
