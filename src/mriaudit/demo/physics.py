"""Acquisition grid and MR physics of the demo's renderer.

``Grid`` is a 3D T1 acquisition grid (sagittal or axial, sometimes oblique)
fitted around the head and sampled in one ``map_coordinates`` pass
(``_sample``); the physics on top: contrast look-up tables (T1, T2 and FLAIR), a
Legendre bias field, motion ghosting along the phase-encode axis, a k-space
spike, wrap-around, Rician noise, and the stored integer scaling.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from mriaudit.demo.anatomy import Anatomy, _rotation, _template

# Intensity of white matter on the working scale; noise and scaling refer to it.
_WM = 0.85
# Working-scale value that maps to 95 % of the stored range (headroom for bias and noise).
_FULL_SCALE = 1.6


@dataclass(frozen=True)
class Grid:
    """A slice stack in scanner LPS mm; voxel (k, r, c) = slice, row, column.

    ``row_dir`` is the first ImageOrientationPatient triplet (direction of
    increasing column index), ``col_dir`` the second (increasing row index),
    slices advance along their cross product.
    """

    origin: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    pixel_mm: float
    slice_mm: float
    shape: tuple[int, int, int]

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    def affine(self) -> np.ndarray:
        """(4, 4) from (k, r, c, 1) to LPS mm."""
        out = np.eye(4)
        out[:3, 0] = self.normal * self.slice_mm
        out[:3, 1] = self.col_dir * self.pixel_mm
        out[:3, 2] = self.row_dir * self.pixel_mm
        out[:3, 3] = self.origin
        return out

    def positions(self) -> np.ndarray:
        """ImagePositionPatient of every slice, (n_slices, 3) mm."""
        return self.origin + np.arange(self.shape[0])[:, None] * self.slice_mm * self.normal

    def orientation(self) -> np.ndarray:
        return np.concatenate([self.row_dir, self.col_dir])

    def cropped(self, axis: int, start: int, length: int) -> Grid:
        """The same grid restricted to ``length`` voxels from ``start`` along axis 1 (rows) or 2."""
        step = self.col_dir if axis == 1 else self.row_dir
        shape = list(self.shape)
        shape[axis] = length
        return replace(self, origin=self.origin + start * self.pixel_mm * step, shape=tuple(shape))


_BASE_AXES = {
    # Sagittal: columns run anterior->posterior, rows superior->inferior.
    "sagittal": (np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    "coronal": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])),
    # Axial: columns run right->left, rows anterior->posterior.
    "axial": (np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])),
}


def _axes(orientation: str, tilt_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """Orientation triplets, tilted about the left-right axis (an oblique plan); rounded for DS."""
    tilt = _rotation(np.array([tilt_deg, 0.0, 0.0]))
    row, col = (tilt @ v for v in _BASE_AXES[orientation])
    row = np.round(row, 6)
    col = col - (col @ row) / (row @ row) * row
    return row / np.linalg.norm(row), np.round(col / np.linalg.norm(col), 6)


def _fit_grid(
    anatomy: Anatomy,
    *,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    pixel_mm: float,
    slice_mm: float,
    margins_mm: np.ndarray,
) -> Grid:
    """Grid covering the posed head plus ``margins_mm`` (slice, row, column axes) on each side."""
    _, template_affine = _template()
    points = anatomy.head_points @ template_affine[:3, :3].T + template_affine[:3, 3]
    scanner = anatomy.scanner_from_template_lps(points * [-1, -1, 1])
    normal = np.cross(row_dir, col_dir)
    axes = (normal, col_dir, row_dir)
    spacing = (slice_mm, pixel_mm, pixel_mm)
    start = np.zeros(3)
    shape = []
    for i, (axis, step) in enumerate(zip(axes, spacing, strict=True)):
        proj = scanner @ axis
        extent = proj.max() - proj.min() + 2 * margins_mm[i]
        n = int(np.ceil(extent / step / 2) * 2)
        start[i] = (proj.max() + proj.min()) / 2 - (n - 1) * step / 2
        shape.append(n)
    origin = np.round(start[0] * normal + start[1] * col_dir + start[2] * row_dir, 4)
    return Grid(origin, row_dir, col_dir, pixel_mm, slice_mm, (shape[0], shape[1], shape[2]))


def _interp_matrix(n: int, knots: np.ndarray) -> np.ndarray:
    """(n, len(knots)) linear interpolation weights from knot positions to 0..n-1."""
    eye = np.eye(len(knots))
    return np.stack([np.interp(np.arange(n), knots, eye[j]) for j in range(len(knots))], axis=1)


def _sample(volume: np.ndarray, anatomy: Anatomy, grid: Grid, *, step: int = 4) -> np.ndarray:
    """Resample ``volume`` (template grid) onto ``grid``: float32 (slices, rows, columns).

    Pose, scale, deformation and acquisition grid are composed into one set of
    template coordinates. The deformation is evaluated on every ``step``-th voxel
    and the coordinates are interpolated linearly in between, which is exact for
    the affine part and costs three small matrix products instead of three
    full-size interpolations.
    """
    knots = [np.unique(np.r_[np.arange(0, n, step), n - 1]).astype(float) for n in grid.shape]
    kk, rr, cc = np.meshgrid(*knots, indexing="ij")
    voxels = np.stack([kk, rr, cc, np.ones_like(kk)]).reshape(4, -1)
    to_template = anatomy.template_index_affine() @ grid.affine()
    coarse = (to_template @ voxels)[:3]
    for i in range(3):
        coarse[i] += ndimage.map_coordinates(
            anatomy.displacement[i], coarse / anatomy.grid_step, order=1, mode="nearest"
        )
    coarse = coarse.reshape(3, *kk.shape).astype(np.float32)
    wk, wr, wc = (
        _interp_matrix(n, k).astype(np.float32) for n, k in zip(grid.shape, knots, strict=True)
    )
    (na, nb, nc), (nk, nr, ncol) = coarse.shape[1:], grid.shape
    coords = np.empty((3, *grid.shape), dtype=np.float32)
    for i in range(3):
        # One 2D matrix product per axis (batched matmul is far slower).
        cols = (coarse[i].reshape(na * nb, nc) @ wc.T).reshape(na, nb, ncol)
        rows = (wr @ cols.transpose(1, 0, 2).reshape(nb, na * ncol)).reshape(nr, na, ncol)
        coords[i] = (wk @ rows.transpose(1, 0, 2).reshape(na, nr * ncol)).reshape(nk, nr, ncol)
    return ndimage.map_coordinates(volume, coords, order=1, cval=0.0, output=np.float32)


def _contrast_lut(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Monotone intensity map (x, y) on the working scale: gamma plus tissue-level jitter."""
    x = np.array([0.0, 0.1, 0.2, 0.45, 0.65, 0.87, 1.0, 2.0])
    y = x ** rng.uniform(0.85, 1.2)
    y[2:6] += rng.uniform(-0.03, 0.03, size=4)
    y[-1] = y[-2] + (x[-1] - x[-2])
    return x, np.maximum.accumulate(y)


# T1 working scale -> T2-like: CSF bright, grey above white matter, fat and bone moderate.
_T2_LUT = (
    np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.6, 0.8, 0.95, 2.0]),
    np.array([0.0, 0.05, 0.5, 0.95, 0.8, 0.62, 0.42, 0.45, 0.45]),
)


def _t2_lut(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``_T2_LUT`` with per-subject tissue-level jitter: the 3D T2 of a T2w cohort."""
    x, y = _T2_LUT
    return x, y * np.r_[1.0, 1.0, rng.uniform(0.95, 1.05, size=y.size - 2)]


# T1 working scale -> FLAIR: CSF suppressed (dark), grey above white matter, and what is
# brighter than white matter in the T1 scale (a hyperintense lesion) bright.
_FLAIR_LUT = (
    np.array([0.0, 0.05, 0.1, 0.2, 0.35, 0.6, 0.8, 0.95, 1.03, 2.0]),
    np.array([0.0, 0.05, 0.15, 0.12, 0.4, 0.75, 0.55, 0.6, 1.3, 1.3]),
)


def _flair_lut(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``_FLAIR_LUT`` with per-subject tissue-level jitter."""
    x, y = _FLAIR_LUT
    return x, y * np.r_[1.0, 1.0, rng.uniform(0.95, 1.05, size=y.size - 2)]


def _legendre(n: int) -> np.ndarray:
    """(3, n) Legendre polynomials of degree 0..2 on [-1, 1]."""
    x = np.linspace(-1.0, 1.0, n)
    return np.stack([np.ones(n), x, 1.5 * x**2 - 0.5])


def _bias_field(amplitude: float, coef: np.ndarray, *, head: np.ndarray) -> np.ndarray:
    """Smooth multiplicative field on the grid of ``head`` (bool, slices x rows x columns).

    ``coef`` (3, 3, 3) weighs products of Legendre polynomials of degree 0..2 per
    axis. The field spans [1 - amplitude, 1 + amplitude] inside the head (float32);
    outside it may reach further, floored at 0.2.
    """
    coef = coef.copy()
    coef[0, 0, 0] = 0.0
    pk, pr, pc = (_legendre(n) for n in head.shape)
    field_ = np.einsum("abc,ak,br,cs->krs", coef, pk, pr, pc, optimize=True).astype(np.float32)
    field_ -= np.median(field_[head])
    field_ *= amplitude / np.abs(field_[head]).max()
    return np.maximum(1.0 + field_, 0.2)


def _ghosting(signal: np.ndarray, axis: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Periodic phase errors on phase-encode lines: shifted replicas along ``axis``."""
    period = int(rng.integers(3, 6))
    phase = rng.uniform(0.6, 1.0)
    kspace = np.fft.fft(signal, axis=axis)
    lines = np.arange(signal.shape[axis]) % period == rng.integers(period)
    modulation = np.where(lines, np.exp(1j * phase), 1.0)
    shape = [1, 1, 1]
    shape[axis] = -1
    out = np.fft.ifft(kspace * modulation.reshape(shape), axis=axis).astype(np.complex64)
    return (
        out,
        f"motion ghosting: phase errors on every {period}th phase-encode line ({phase:.1f} rad)",
    )


def _spike(signal: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """A k-space spike pair: herringbone stripes over the whole volume."""
    freqs = rng.uniform(0.12, 0.3, size=2) * rng.choice([-1, 1], size=2)
    freq_k = rng.uniform(-0.05, 0.05)
    amplitude = rng.uniform(0.12, 0.2) * _WM
    waves = [
        np.exp(2j * np.pi * f * np.arange(n))
        for f, n in zip((freq_k, *freqs), signal.shape, strict=True)
    ]
    plane = waves[0][:, None, None] * waves[1][None, :, None] * waves[2][None, None, :]
    stripes = amplitude * np.real(plane * np.exp(1j * rng.uniform(0, 2 * np.pi)))
    note = f"k-space spike: stripes of amplitude {amplitude / _WM:.0%} of white matter"
    return (signal + stripes.astype(np.float32)), note


def _fold(signal: np.ndarray, axis: int, keep: float) -> tuple[np.ndarray, int]:
    """Wrap-around: shrink the field of view along ``axis`` to ``keep`` and alias the rest in."""
    n = signal.shape[axis]
    length = int(round(n * keep / 2) * 2)
    start = (n - length) // 2
    out_shape = list(signal.shape)
    out_shape[axis] = length
    out = np.zeros(out_shape, dtype=signal.dtype)
    for i in range(n):
        target = [slice(None)] * 3
        target[axis] = (i - start) % length
        source = [slice(None)] * 3
        source[axis] = i
        out[tuple(target)] += signal[tuple(source)]
    return out, start


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of ``sigma`` per channel."""
    real = np.real(signal).astype(np.float32) + sigma * rng.standard_normal(
        signal.shape, dtype=np.float32
    )
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    if np.iscomplexobj(signal):
        imag += np.imag(signal).astype(np.float32)
    return np.sqrt(real**2 + imag**2)


@dataclass(frozen=True)
class Scaling:
    """Stored = (value - intercept) / slope in uint16 with ``bits_stored`` bits."""

    slope: float
    intercept: float
    gain: float
    bits_stored: int

    def store(self, image: np.ndarray) -> np.ndarray:
        top = 2**self.bits_stored - 1
        stored = np.rint((image * self.gain - self.intercept) / self.slope)
        return np.clip(stored, 0, top).astype(np.uint16)


def _draw_scaling(rng: np.random.Generator, bits_stored: int) -> Scaling:
    slope = 1.0 if rng.random() < 0.5 else float(f"{rng.uniform(0.25, 4.0):.5g}")
    intercept = 0.0 if rng.random() < 0.8 else round(float(rng.uniform(-10.0, 10.0)), 2)
    gain = 0.95 * (2**bits_stored - 1) * slope / _FULL_SCALE
    return Scaling(slope=slope, intercept=intercept, gain=gain, bits_stored=bits_stored)
