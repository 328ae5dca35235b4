"""Native-space measures of artefacts that live outside the brain.

Ghosts, wrap-around and k-space spikes put signal into the air around the
head and along the phase-encode direction, where a brain-masked model never
looks. These measures work on the image's own grid (voxel axes as stored, so
whichever in-plane axis was phase-encoded is among them), on the head mask
and the scanner's zero-filled frame, and are recorded as IQMs:

- ``ghost_ratio``: the strongest ghost band. A periodic phase error on every
  k-th phase-encode line replicates the head shifted by multiples of N/k
  along that axis. For each axis and k in ``GHOST_PERIODS`` the bands are the
  head mask shifted by j*N/k (circularly, as the Fourier transform wraps),
  outside the dilated head; the measure is the mean of the air in the band
  minus the mean of the other air, over the median head signal (after the
  ghost-to-signal ratio of MRIQC's EPI metrics, generalised to N/k).
- ``edge_anatomy``: anatomy at both ends of one axis of the field of view.
  A head that folds over (phase field of view too small) touches both ends
  of the phase axis; a neck or a cut nose touches one end only, so the
  smaller of the two end slabs' head fractions is taken, the largest over axes.
- ``bg_peak``: periodic structure in the air. A k-space spike adds one plane
  wave to the whole volume; in the air it is a single peak of the power
  spectrum far above its neighbourhood. The log power is whitened by its own
  local mean (``WHITEN_BINS``), since real backgrounds are coloured noise
  (interpolation, parallel imaging) whose smooth spectrum is no artefact;
  the measure is the strongest whitened peak above ``MIN_FREQUENCY``, in
  log10 units; NaN for zero-filled air.

All take float arrays (X, Y, Z) in any intensity unit and bool masks of the
same shape, and return dimensionless floats (NaN when undefined).
"""

from __future__ import annotations

import math

import numpy as np
from scipy import fft, ndimage

#: Phase-error periods whose ghosts are measured (N/2 is the classic Nyquist ghost).
GHOST_PERIODS = (2, 3, 4, 5, 6)
#: The air this far (voxels of the half-resolution grid) from the head is not used
#: for ghosts: blur, Gibbs ringing and the scalp's edge live there.
GHOST_CLEARANCE = 3
#: Fewest air voxels (half-resolution grid) a ghost band must hold to be measured.
MIN_BAND_VOXELS = 200
#: Thickness of the end slabs of the field of view for edge_anatomy (fraction of the axis).
EDGE_SLAB = 0.02
#: Lowest spatial frequency (cycles per voxel, on any axis) searched for a spike.
MIN_FREQUENCY = 0.06
#: Air further than this (voxels) from the head enters the spike spectrum.
SPIKE_CLEARANCE = 4
#: Side (frequency bins) of the box whose mean log power whitens the air's spectrum.
WHITEN_BINS = 5


def ghost_ratio(data: np.ndarray, head: np.ndarray, *, frame: np.ndarray | None = None) -> float:
    """Strongest ghost band's excess mean over the other air, per median head signal.

    ``data`` (X, Y, Z) float, ``head`` bool, ``frame`` bool (zero-filled frame,
    excluded). Computed on a half-resolution grid (ghosts are head-sized).
    """
    small = np.asarray(data, dtype=np.float32)[::2, ::2, ::2]
    head_small = np.asarray(head, dtype=bool)[::2, ::2, ::2]
    if not head_small.any():
        return math.nan
    usable = ~ndimage.binary_dilation(head_small, iterations=GHOST_CLEARANCE)
    if frame is not None:
        usable &= ~np.asarray(frame, dtype=bool)[::2, ::2, ::2]
    signal = float(np.median(small[head_small]))
    if usable.sum() < 2 * MIN_BAND_VOXELS or signal <= 0:
        return math.nan
    best = -math.inf
    for axis in range(3):
        n = small.shape[axis]
        bands = []
        for period in GHOST_PERIODS:
            shifts = {round(j * n / period) % n for j in range(1, period)}
            bands.append(
                [
                    np.roll(head_small, shift, axis=axis) & usable
                    for shift in sorted(shifts)
                    if shift
                ]
            )
        ghost_any = np.zeros_like(usable)
        for group in bands:
            for band in group:
                ghost_any |= band
        clean = usable & ~ghost_any
        if clean.sum() < MIN_BAND_VOXELS:
            clean = usable
        baseline = float(small[clean].mean())
        for group in bands:
            for band in group:
                if band.sum() >= MIN_BAND_VOXELS:
                    best = max(best, (float(small[band].mean()) - baseline) / signal)
    return best if math.isfinite(best) else math.nan


def edge_anatomy(head: np.ndarray, *, frame: np.ndarray | None = None) -> float:
    """Largest over axes of the smaller head fraction of the two end slabs of that axis.

    ``head`` (X, Y, Z) bool; ``frame`` (bool) voxels are not counted as field of
    view. 0 for a head with air on at least one end of every axis; near 1 for a
    head folded over along an axis.
    """
    mask = np.asarray(head, dtype=bool)
    inside = np.ones_like(mask) if frame is None else ~np.asarray(frame, dtype=bool)
    worst = 0.0
    for axis in range(3):
        n = mask.shape[axis]
        width = max(2, round(EDGE_SLAB * n))
        if 2 * width >= n:
            continue
        fractions = []
        for part in (slice(0, width), slice(n - width, n)):
            index = [slice(None)] * 3
            index[axis] = part
            area = inside[tuple(index)].sum()
            fractions.append(mask[tuple(index)].sum() / area if area else 0.0)
        worst = max(worst, float(min(fractions)))
    return worst


def bg_peak(
    data: np.ndarray, head: np.ndarray, *, frame: np.ndarray | None = None, workers: int = 1
) -> float:
    """The strongest whitened peak of the air's power spectrum, log10 (spikes; see module).

    ``data`` (X, Y, Z) float, ``head`` bool, ``frame`` bool. NaN when the air is
    zero-filled (no noise floor) or too small.
    """
    values = np.asarray(data, dtype=np.float32)
    air = ~ndimage.binary_dilation(np.asarray(head, dtype=bool), iterations=SPIKE_CLEARANCE)
    if frame is not None:
        air &= ~np.asarray(frame, dtype=bool)
    if air.sum() < 1000:
        return math.nan
    # The mean, not the median: a Rician air's mean-median gap would add the mask's own spectrum.
    level = float(values[air].mean())
    centred = np.where(air, values - level, 0.0).astype(np.float32)
    power = np.abs(fft.rfftn(centred, workers=workers)) ** 2
    if float(np.median(power)) <= 0:
        return math.nan
    log_power = np.log10(np.maximum(power, np.finfo(np.float32).tiny))
    del power
    whitened = log_power - ndimage.uniform_filter(log_power, WHITEN_BINS, mode="wrap")
    # Frequencies of the rfftn axes (the last one is half-sized).
    low = np.ones(whitened.shape, dtype=bool)
    for axis, n in enumerate(values.shape):
        freq = np.abs(fft.rfftfreq(n) if axis == 2 else fft.fftfreq(n))
        shape = [1, 1, 1]
        shape[axis] = -1
        low &= (freq < MIN_FREQUENCY).reshape(shape)
    return float(whitened[~low].max()) if (~low).any() else math.nan


def artefact_metrics(
    data: np.ndarray, head: np.ndarray, *, frame: np.ndarray | None = None, workers: int = 1
) -> dict[str, float]:
    """The three measures as ``iqm_*`` metrics (see the module docstring)."""
    return {
        "iqm_ghost_ratio": ghost_ratio(data, head, frame=frame),
        "iqm_edge_anatomy": edge_anatomy(head, frame=frame),
        "iqm_bg_peak": bg_peak(data, head, frame=frame, workers=workers),
    }
