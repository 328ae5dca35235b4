"""3D filters in torch on any device, equal to ``scipy.ndimage``'s where the maps use them.

Each filter works on the last three axes of a float32 tensor (X, Y, Z); leading
axes are a batch. They replace scipy on the scoring path so that a GPU worker
keeps a subject's maps on the GPU; on the CPU they are faster than scipy too.

- :func:`gaussian_filter` is ``ndimage.gaussian_filter`` (mode ``reflect``, any
  ``truncate``): per axis, the 1D Gaussian with its reflected borders folded
  into an (n, n) matrix, applied as one matrix product. It differs from scipy
  only by float32 rounding (scipy sums in float64): a few 1e-8 for values of
  order 1.
- :func:`maximum_filter` and :func:`minimum_filter` are ``ndimage``'s with a
  cubic window and mode ``reflect``, exactly: reflected voxels always lie inside
  the window already, so the window is simply cut at the border.
- :func:`median_filter` is ``ndimage.median_filter`` with a cubic window and
  mode ``constant`` (0 outside), exactly (a selection, no arithmetic), and can
  be evaluated at the voxels of a mask only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

#: Voxels per block of the median filter on the CPU: its (size^3, block) values stay in
#: the cache while they are selected. A GPU takes every voxel at once.
MEDIAN_BLOCK_CPU = 32768


def _reflect(index: np.ndarray, n: int) -> np.ndarray:
    """Indices of ``ndimage``'s ``reflect`` mode (d c b a | a b c d | d c b a) inside [0, n)."""
    index = np.mod(index, 2 * n)
    return np.where(index >= n, 2 * n - 1 - index, index)


@lru_cache(maxsize=64)
def gaussian_matrix(n: int, sigma: float, truncate: float) -> np.ndarray:
    """The (n, n) matrix of ``ndimage.gaussian_filter1d`` on a line of ``n`` samples.

    The kernel is scipy's (radius ``int(truncate * sigma + 0.5)``, weights
    ``exp(-x^2 / (2 sigma^2))`` normalised to sum 1), the borders its
    ``reflect`` mode; float64. ``sigma`` 0 gives the identity.
    """
    if sigma <= 0:
        return np.eye(n)
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 / (sigma * sigma) * offsets.astype(float) ** 2)
    weights /= weights.sum()
    matrix = np.zeros((n, n))
    rows = np.arange(n)
    for offset, weight in zip(offsets, weights, strict=True):
        np.add.at(matrix, (rows, _reflect(rows + offset, n)), weight)
    return matrix


@lru_cache(maxsize=64)
def _gaussian_matrix_tensor(
    n: int, sigma: float, truncate: float, device: torch.device
) -> torch.Tensor:
    return torch.from_numpy(gaussian_matrix(n, sigma, truncate).astype(np.float32)).to(device)


def _per_axis(sigma: float | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(sigma, (int, float)):
        return (float(sigma),) * 3
    values = tuple(float(s) for s in sigma)
    if len(values) != 3:
        message = f"sigma needs one value or three (X, Y, Z), got {values}"
        raise ValueError(message)
    return values


def gaussian_filter(
    volume: torch.Tensor, *, sigma: float | Sequence[float], truncate: float = 4.0
) -> torch.Tensor:
    """Gaussian smoothing of ``volume`` (..., X, Y, Z) over its last three axes.

    ``sigma`` in voxels (one value, or one per axis; 0 leaves an axis alone),
    ``truncate`` in sigmas (scipy's default 4.0), mode ``reflect`` as
    ``ndimage.gaussian_filter``. Returns a new tensor of ``volume``'s shape and
    dtype (float32 expected).
    """
    size_x, size_y, size_z = volume.shape[-3:]
    lead = volume.shape[:-3]
    sx, sy, sz = _per_axis(sigma)
    out = volume.reshape(-1, size_x, size_y, size_z)
    if sx > 0:
        matrix = _gaussian_matrix_tensor(size_x, sx, truncate, volume.device).to(volume.dtype)
        out = torch.matmul(matrix, out.reshape(-1, size_x, size_y * size_z))
    if sy > 0:
        matrix = _gaussian_matrix_tensor(size_y, sy, truncate, volume.device).to(volume.dtype)
        out = torch.matmul(matrix, out.reshape(-1, size_y, size_z))
    if sz > 0:
        matrix = _gaussian_matrix_tensor(size_z, sz, truncate, volume.device).to(volume.dtype)
        out = torch.matmul(out.reshape(-1, size_z), matrix.T)
    if not (sx > 0 or sy > 0 or sz > 0):
        return volume.clone()
    return out.reshape(*lead, size_x, size_y, size_z)


def _extreme(volume: torch.Tensor, *, size: int, op) -> torch.Tensor:
    if size % 2 != 1 or size < 1:
        message = f"the window must have an odd size, got {size}"
        raise ValueError(message)
    out = volume
    for _ in range(size // 2):  # a 3-window applied t times is a (2t + 1)-window
        for axis in range(volume.dim() - 3, volume.dim()):
            n = out.shape[axis]
            if n < 2:
                continue
            source, out = out, out.clone()
            head = out.narrow(axis, 0, n - 1)
            op(head, source.narrow(axis, 1, n - 1), out=head)
            tail = out.narrow(axis, 1, n - 1)
            op(tail, source.narrow(axis, 0, n - 1), out=tail)
    return out.clone() if out is volume else out


def maximum_filter(volume: torch.Tensor, *, size: int) -> torch.Tensor:
    """Largest value of each voxel's ``size``^3 window (..., X, Y, Z), as
    ``ndimage.maximum_filter(size=size)`` (mode ``reflect``), exactly."""
    return _extreme(volume, size=size, op=torch.maximum)


def minimum_filter(volume: torch.Tensor, *, size: int) -> torch.Tensor:
    """Smallest value of each voxel's ``size``^3 window, as ``ndimage.minimum_filter``."""
    return _extreme(volume, size=size, op=torch.minimum)


def median_of(values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Elementwise median of an odd number of tensors of one shape, without sorting.

    Forgetful selection: of the first ``n // 2 + 2`` values the smallest and the
    largest cannot be the median, so both are dropped and the next value comes
    in, until one is left. About ``n^2 / 2`` elementwise min/max operations, all
    vectorised over the tensors' elements.
    """
    if len(values) % 2 != 1:
        message = f"the median of {len(values)} values is not one of them: use an odd count"
        raise ValueError(message)
    keep = min(len(values), len(values) // 2 + 2)
    pool, rest = list(values[:keep]), list(values[keep:])
    while len(pool) > 1:
        low, larger = pool[0], []
        for value in pool[1:]:  # the smallest moves to `low`
            larger.append(torch.maximum(low, value))
            low = torch.minimum(low, value)
        high, middle = larger[0], []
        for value in larger[1:]:  # and the largest of the rest to `high`
            middle.append(torch.minimum(high, value))
            high = torch.maximum(high, value)
        pool = middle
        if rest:
            pool.append(rest.pop(0))
    return pool[0]


def median_filter(
    volume: torch.Tensor, *, size: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Median of each voxel's ``size``^3 window (..., X, Y, Z), 0 outside the volume,
    as ``ndimage.median_filter(size=size, mode="constant")``, exactly.

    With ``mask`` (bool, X, Y, Z) only the voxels inside it are filtered and the
    others are 0 (a map kept inside a mask needs no more). Works in blocks of
    voxels on the CPU (:data:`MEDIAN_BLOCK_CPU`), at once on a GPU.
    """
    if size == 1:
        return volume.clone() if mask is None else torch.where(mask, volume, 0.0)
    if size % 2 != 1 or size < 1:
        message = f"the window must have an odd size, got {size}"
        raise ValueError(message)
    half = size // 2
    shape = volume.shape[-3:]
    flat = volume.reshape(-1, *shape)
    padded = F.pad(flat, (half,) * 6).reshape(flat.shape[0], -1)
    py, pz = shape[1] + 2 * half, shape[2] + 2 * half
    within = mask if mask is not None else torch.ones(shape, dtype=torch.bool)
    voxels = torch.nonzero(within.to(volume.device).reshape(-1)).reshape(-1)
    # The voxels' flat index in the padded volume, and each window offset's.
    vx, rem = voxels // (shape[1] * shape[2]), voxels % (shape[1] * shape[2])
    vy, vz = rem // shape[2], rem % shape[2]
    centre = (vx + half) * (py * pz) + (vy + half) * pz + (vz + half)
    steps = torch.arange(-half, half + 1, device=volume.device)
    offsets = (
        steps[:, None, None] * (py * pz) + steps[None, :, None] * pz + steps[None, None, :]
    ).reshape(-1)
    block = voxels.numel() if volume.device.type != "cpu" else MEDIAN_BLOCK_CPU
    values = torch.empty(flat.shape[0], voxels.numel(), dtype=volume.dtype, device=volume.device)
    for start in range(0, voxels.numel(), block):
        index = offsets[:, None] + centre[None, start : start + block]
        window = padded[:, index]  # (batch, size^3, block)
        values[:, start : start + block] = median_of(window.unbind(1))
    out = torch.zeros_like(flat).reshape(flat.shape[0], -1)
    out[:, voxels] = values
    return out.reshape(volume.shape)
