"""Images between nibabel and ANTs: geometry, loading, saving, ANTs' environment.

Images are read with nibabel and handed to ANTs with the geometry nibabel
reports (RAS+ affine turned into ITK's LPS origin, spacing and direction), and
written back with nibabel, so a corrected image keeps its input's grid, affine
and header exactly and a registered image lies on the template grid.
``ants_environment`` pins ANTs' threads, random seed and temporary folder.
A :class:`Handoff` keeps the images one process's stages read and write, so
that a later stage of the same job takes them from memory instead of reading
the gzip file back.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import ants
import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from mriaudit import chain, records
from mriaudit.intensity import finite

log = logging.getLogger(__name__)


# ANTs seeds its sampling from the clock unless told; a fixed seed makes runs
# repeatable (exactly with one thread, to ~1e-4 mm with more: ITK's parallel sums).
RANDOM_SEED = 20240


def ants_image(data: np.ndarray, affine: np.ndarray) -> ants.ANTsImage:
    """An ANTs image of ``data`` (3D, voxel order kept) placed by a nibabel RAS+ ``affine``.

    ITK works in LPS: the first two rows of the affine change sign. A sheared
    affine (rare) is projected onto the nearest rotation, since ITK's direction
    must be orthonormal.
    """
    to_lps = np.diag([-1.0, -1.0, 1.0])
    linear = to_lps @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        left, _, right = np.linalg.svd(direction)
        direction = left @ right
        log.warning("sheared affine: direction projected onto the nearest rotation for ANTs")
    return ants.from_numpy(
        np.ascontiguousarray(data, dtype=np.float32),
        origin=tuple(float(v) for v in to_lps @ np.asarray(affine, dtype=np.float64)[:3, 3]),
        spacing=tuple(float(v) for v in spacing),
        direction=direction,
    )


def physical_points(image: ants.ANTsImage, indices: np.ndarray) -> np.ndarray:
    """LPS mm coordinates (3, N) of voxel ``indices`` (3, N) of an ANTs image."""
    indices = np.asarray(indices, dtype=np.float64)
    if indices.ndim != 2 or indices.shape[0] != 3:
        message = f"voxel indices must have shape (3, N), got {indices.shape}"
        raise ValueError(message)
    linear = np.asarray(image.direction) * np.asarray(image.spacing)
    return np.asarray(image.origin)[:, None] + linear @ indices


@contextmanager
def ants_environment(*, threads: int) -> Iterator[Path]:
    """Run ANTs with ``threads`` threads, a fixed seed and a private temporary folder.

    ants.registration writes its transforms (and temporaries) under the
    process's temporary folder and never deletes them: the folder given to ANTs
    (as TMPDIR and ``tempfile.tempdir``) is yielded and removed on exit, and the
    previous settings are restored. ITK reads its thread count once, when it
    first starts its thread pool, so the first call in a process sets it.
    """
    names = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "ANTS_RANDOM_SEED", "TMPDIR")
    saved_environ = {name: os.environ.get(name) for name in names}
    saved_tempdir = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="mriaudit-ants-") as folder:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))
        os.environ["ANTS_RANDOM_SEED"] = str(RANDOM_SEED)
        os.environ["TMPDIR"] = folder
        tempfile.tempdir = folder
        try:
            yield Path(folder)
        finally:
            tempfile.tempdir = saved_tempdir
            for name, value in saved_environ.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


class Kept(NamedTuple):
    """An image as its file holds it: ``image`` (header and affine as a reader of
    the file gets them) and ``data`` (3D, in the file's data type, read-only)."""

    image: nib.Nifti1Image
    data: np.ndarray


class Handoff:
    """Images in memory by the path of their file: what the stages of one process
    read (:func:`load_volume`) and write (:func:`save_like`), for the stages after
    them. Each is what reading its file gives (data and affine alike, arrays
    read-only), so a stage computes the same from memory as from the file.
    """

    def __init__(self) -> None:
        self._kept: dict[Path, Kept] = {}

    def keep(self, path: str | Path, image: nib.Nifti1Image, data: np.ndarray) -> Kept:
        data = np.asarray(data)
        data.flags.writeable = False  # shared by the stages that read it
        kept = self._kept[Path(path)] = Kept(image, data)
        return kept

    def get(self, path: str | Path) -> Kept | None:
        return self._kept.get(Path(path))

    def __contains__(self, path: object) -> bool:
        return isinstance(path, (str, Path)) and Path(path) in self._kept


def load_volume(
    path: Path, *, handoff: Handoff | None = None
) -> tuple[nib.Nifti1Image, np.ndarray]:
    """The NIfTI image and its 3D data as float32 (non-finite values set to 0).

    A 4D image with several volumes gives its first volume (logged). Unreadable
    files and images that are not 3D raise ``records.StageError``. With a
    ``handoff``, an image kept there is taken from memory, and one read from its
    file is kept there.
    """
    kept = handoff.get(path) if handoff is not None else None
    if kept is not None:
        return kept.image, finite(kept.data.astype(np.float32, copy=False))
    image, data = _read_volume(path)
    if handoff is not None:
        data = handoff.keep(path, image, data).data
    return image, data


def _read_volume(path: Path) -> tuple[nib.Nifti1Image, np.ndarray]:
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float32))
    except Exception as error:
        reason = f"cannot read {Path(path).name}: {type(error).__name__}: {error}"
        raise records.StageError(reason) from error
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 4:
        log.warning("%s has %d volumes: using the first", Path(path).name, data.shape[3])
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        reason = f"{Path(path).name} is not a 3D image (shape {data.shape})"
        raise records.StageError(reason)
    return image, finite(data)


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (column norms of the affine)."""
    sizes = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def save_like(
    data: np.ndarray,
    reference: nib.Nifti1Image,
    path: Path,
    *,
    dtype: type,
    handoff: Handoff | None = None,
) -> None:
    """Write ``data`` with the grid, affine and header of ``reference`` (no intensity scaling).

    With a ``handoff``, the image is kept there as a reader of the file would get it,
    and, in ``chain.run_chain``'s child, the file is compressed and written by its
    parent (on the other core) while the stages go on.
    """
    header = reference.header.copy()
    header.set_data_dtype(dtype)
    stored = np.asarray(data).astype(dtype, copy=False)
    image = nib.Nifti1Image(stored, reference.affine, header)
    image.header.set_slope_inter(1.0, 0.0)
    _save(image, path, background=handoff is not None)
    if handoff is not None:
        # The affine a reader gets is the header's (its float32 fields), as written.
        as_read = nib.Nifti1Image(stored, image.header.get_best_affine(), image.header)
        handoff.keep(path, as_read, stored)


def save_on_template(
    data: np.ndarray, affine: np.ndarray, path: Path, *, dtype: type, background: bool = False
) -> None:
    """Write an image on the template grid, labelled as MNI152 space (``background``: see
    :func:`save_like`)."""
    image = nib.Nifti1Image(np.asarray(data).astype(dtype), affine)
    image.header.set_sform(affine, code="mni")
    image.header.set_qform(affine, code="mni")
    image.header.set_xyzt_units("mm")
    _save(image, path, background=background)


def _save(image: nib.Nifti1Image, path: Path, *, background: bool) -> None:
    """``nib.save``; with ``background``, a ``.nii.gz`` is compressed and written by the
    parent of ``chain.run_chain``'s child (where there is one) while the stages go on:
    the same file, with nibabel's compression level."""
    path = Path(path)
    if background and chain.writes_in_background() and path.name.endswith(".gz"):
        chain.write_gzip_in_background(path, image.to_stream, level=Opener.default_compresslevel)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
