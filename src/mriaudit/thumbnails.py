"""Small pictures of every subject for the report: three planes side by side.

Two per subject, written by the stages that have the images at hand:

- ``native``: the converted image as acquired, in its whole field of view, air
  included (convert stage). Ghosts along the phase-encode direction, wrap-around,
  spikes and a face folded onto the occiput live outside the brain; a curator
  checks them here, where the registered image has cut them away.
- ``anomaly``: the registered image on the template grid with the voxel anomaly
  map over it (score stage), through the map's strongest voxel.

Each is one WebP of ``3 * size`` x ``size`` pixels (axial | coronal | sagittal,
neurological convention: the subject's left on the left, anterior and superior
up), a few kB, so a 1,000-subject report holds every subject's pictures inline.
Intensities are windowed robustly (percentiles of the whole volume), so a
bright spike or a dark background does not wash the picture out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image
from scipy import ndimage

from mriaudit import files

log = logging.getLogger(__name__)

#: Pixels of each plane's longer side.
SIZE = 128
#: Intensity window of a picture, as percentiles of the volume's voxels.
WINDOW_PERCENTILES = (0.5, 99.5)
#: Anomaly map values drawn: from ``MAP_FLOOR`` (transparent) to ``MAP_FULL`` (opaque), map units.
MAP_FLOOR, MAP_FULL = 2.0, 6.0
#: WebP quality (0-100): 60 keeps ghosts and edges visible at about 6 kB per picture.
QUALITY = 60


def _plane(volume: np.ndarray, zooms: tuple[float, ...], axis: int, index: int) -> np.ndarray:
    """One plane of a RAS-ordered volume, display-oriented (rows top-down), and its spacing."""
    plane = np.take(volume, index, axis=axis)
    spacing = [z for i, z in enumerate(zooms[:3]) if i != axis]
    # (first, second) RAS axes left; show the second axis upwards and the first left to right.
    return plane.T[::-1], (spacing[1], spacing[0])


def _fit(plane: np.ndarray, spacing: tuple[float, float], *, size: int, order: int) -> np.ndarray:
    """``plane`` (2D) resampled to square pixels, its longer physical side ``size``
    pixels, centred on a ``size`` x ``size`` canvas of zeros."""
    extent = np.array(plane.shape, dtype=float) * np.array(spacing)
    shape = np.maximum(1, np.round(extent * size / extent.max()).astype(int))
    scaled = ndimage.zoom(
        plane, shape / np.array(plane.shape), order=order, grid_mode=True, mode="nearest"
    )
    scaled = scaled[: shape[0], : shape[1]]
    canvas = np.zeros((size, size), dtype=scaled.dtype)
    top, left = (size - scaled.shape[0]) // 2, (size - scaled.shape[1]) // 2
    canvas[top : top + scaled.shape[0], left : left + scaled.shape[1]] = scaled
    return canvas


def _window(volume: np.ndarray) -> tuple[float, float]:
    finite = volume[np.isfinite(volume)]
    if finite.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(finite, WINDOW_PERCENTILES)
    return float(low), float(high if high > low else low + 1.0)


def _grey(planes: list[np.ndarray], low: float, high: float) -> np.ndarray:
    strip = np.concatenate(planes, axis=1)
    return (np.clip((np.nan_to_num(strip, nan=low) - low) / (high - low), 0, 1) * 255).astype(
        np.uint8
    )


def native_picture(image: nib.Nifti1Image, *, size: int = SIZE) -> np.ndarray:
    """Three mid-planes of the whole field of view, (size, 3 * size) uint8.

    ``image`` is any 3D NIfTI (its voxel order is brought to RAS first, so the
    planes are axial, coronal and sagittal whatever the acquisition). The
    planes cross the centre of the field of view, not of the head: what is in
    the air is shown as acquired.
    """
    canonical = nib.as_closest_canonical(image)
    volume = np.asarray(canonical.dataobj, dtype=np.float32)
    zooms = tuple(float(z) for z in canonical.header.get_zooms()[:3])
    low, high = _window(volume)
    planes = [
        _fit(*_plane(volume, zooms, axis, volume.shape[axis] // 2), size=size, order=1)
        for axis in (2, 1, 0)
    ]
    return _grey(planes, low, high)


def anomaly_picture(
    image: np.ndarray,
    anomaly: np.ndarray | None,
    *,
    zooms: tuple[float, float, float],
    size: int = SIZE,
) -> np.ndarray:
    """The registered image with the anomaly map over it, (size, 3 * size, 3) uint8.

    ``image`` and ``anomaly`` are (X, Y, Z) arrays on the template grid (RAS);
    the planes cross the map's maximum (the grid's centre without a map).
    Map values from ``MAP_FLOOR`` to ``MAP_FULL`` blend from transparent to
    opaque, dark red to yellow.
    """
    volume = np.asarray(image, dtype=np.float32)
    if anomaly is not None and np.isfinite(anomaly).any() and np.nanmax(anomaly) > 0:
        centre = np.unravel_index(int(np.nanargmax(anomaly)), anomaly.shape)
    else:
        centre = tuple(n // 2 for n in volume.shape)
    low, high = _window(volume[volume > 0] if (volume > 0).any() else volume)
    grey = _grey(
        [
            _fit(*_plane(volume, zooms, axis, centre[axis]), size=size, order=1)
            for axis in (2, 1, 0)
        ],
        low,
        high,
    ).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if anomaly is not None:
        values = np.concatenate(
            [
                _fit(*_plane(np.nan_to_num(anomaly), zooms, axis, centre[axis]), size=size, order=1)
                for axis in (2, 1, 0)
            ],
            axis=1,
        )
        alpha = np.clip((values - MAP_FLOOR) / (MAP_FULL - MAP_FLOOR), 0, 1)[..., None]
        # Dark red (255, 0, 0) at the floor to yellow (255, 255, 0) at full strength.
        heat = np.stack(
            [np.full_like(values, 255.0), 255.0 * alpha[..., 0], np.zeros_like(values)], -1
        )
        rgb = rgb * (1 - alpha) + heat * alpha
    return np.clip(rgb, 0, 255).astype(np.uint8)


def save_picture(picture: np.ndarray, path: str | Path) -> Path:
    """Write a picture (grey (H, W) or RGB (H, W, 3) uint8) as WebP, atomically."""
    with files.atomic_path(path) as tmp:
        Image.fromarray(picture).save(tmp, format="WEBP", quality=QUALITY, method=6)
    return Path(path)


def write_native_thumbnail(image_path: str | Path, out_path: str | Path) -> Path:
    """The native picture of the NIfTI at ``image_path``, saved to ``out_path``."""
    return save_picture(native_picture(nib.load(image_path)), out_path)


def write_anomaly_thumbnail(
    image_path: str | Path, anomaly: np.ndarray | None, out_path: str | Path
) -> Path:
    """The registered image at ``image_path`` with ``anomaly`` (its grid, or None) over it."""
    image = nib.as_closest_canonical(nib.load(image_path))
    if anomaly is not None:
        anomaly = np.asarray(
            nib.as_closest_canonical(nib.Nifti1Image(anomaly, nib.load(image_path).affine)).dataobj
        )
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return save_picture(
        anomaly_picture(np.asarray(image.dataobj, dtype=np.float32), anomaly, zooms=zooms),
        out_path,
    )


def try_draw(write: Callable[..., Path], *args: Any) -> list[str]:
    """``write(*args)``, where a picture that cannot be drawn is a warning, not the stage's
    failure: the stage's images and record are its results, the picture only shows them.
    Returns the warnings (empty when drawn)."""
    try:
        write(*args)
    except Exception as error:  # an odd geometry, a codec: say so, keep the stage's result
        warning = f"no report picture: {type(error).__name__}: {error}"[:300]
        log.warning("%s", warning)
        return [warning]
    return []
