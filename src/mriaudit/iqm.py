"""MRIQC-style image quality metrics (IQMs) of the native T1-weighted image.

The definitions follow MRIQC's anatomical IQMs (Esteban et al. 2017, PLoS ONE
12:e0184661; ``mriqc.qc.anatomical``), re-implemented here from the formulas.
Every metric is recorded with MRIQC's name and an ``iqm_`` prefix (``iqm_cjv``,
``iqm_snr_wm``, ``iqm_summary_bg_mad``, ...). Where MRIQC relies on tools we do
not have (FSL FAST, AFNI 3dFWHMx) or on a choice that does not carry over to
arbitrary intensity scales, the docstring of the function says what differs.

The subject-level entry point :func:`iqm_subject` works on the native grid:

- arrays are put in the closest RAS orientation (a pure permutation/flip of the
  voxel axes, no resampling), as MRIQC conforms its input to RAS, so ``x`` is
  always left-right, ``y`` posterior-anterior and ``z`` inferior-superior;
- tissues: the MNI152 tissue priors are warped to the native grid (only the
  box around the brain) with the inverse of the registration affine and refined
  by a three-class Gaussian mixture on the bias-corrected intensities inside the
  warped brain mask, with the priors as spatial weights and a light
  neighbourhood smoothing of the posteriors (a cheap stand-in for FAST's Markov
  random field); the posteriors are the partial-volume maps. An affine that
  scales the template brain implausibly (typically a whole head fitted to the
  brain-only template) or puts it outside the head mask gives no segmentation;
- air: more than 4 mm outside the head mask, outside the zero-filled frame, and
  above MRIQC's glabella-inion level (MNI z = -14 mm; without a registration,
  90 mm below the top of the head), so the face, neck and shoulders, which
  carry signal, wrap-around and eye-motion ghosts, do not count as background
  (MRIQC's "hat" mask);
- artefacts: air voxels far above the air noise level and away from the head.

Metrics that need the tissue classes are NaN (``null`` in the record's JSON)
when no usable segmentation exists (failed registration, non-brain image); the
others are always computed and the record carries a warning with the reason.
Likewise the background metrics when there is no air (zero-filled background).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import ants
import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from scipy import stats

from mriaudit import records, template
from mriaudit.artefacts import artefact_metrics
from mriaudit.intensity import finite

log = logging.getLogger(__name__)

STAGE = "iqm"
TISSUES: tuple[str, ...] = ("csf", "gm", "wm")
SUMMARY_LABELS: tuple[str, ...] = ("bg", "csf", "gm", "wm")
SUMMARY_STATS: tuple[str, ...] = ("mean", "median", "stdv", "mad", "k", "p05", "p95", "n")
AXES: tuple[str, ...] = ("x", "y", "z")

#: Standard deviation of a Rayleigh distribution whose Gaussian parameter is 1:
#: air noise in a magnitude image has std sigma * sqrt((4 - pi) / 2) (MRIQC's
#: ``DIETRICH_FACTOR`` = 1 / sqrt(2 / (4 - pi))).
DIETRICH_FACTOR = math.sqrt((4.0 - math.pi) / 2.0)
#: MRIQC's glabella (0, 90, -14) and inion (0, -120, -14) share this MNI height (mm).
HAT_MNI_Z_MM = -14.0
#: Without a registration, the same level is taken this far below the top of the head (mm).
HAT_BELOW_VERTEX_MM = 90.0
#: Air starts this far outside the head mask (mm), clear of the skin's partial volume.
HEAD_MARGIN_MM = 4.0
#: Partial-volume threshold for a tissue's summary mask (MRIQC: 0.85).
PV_THRESHOLD = 0.85
#: Summary masks are eroded when every voxel side is below this (mm), as in MRIQC.
ERODE_BELOW_MM = 1.9
#: Artefact voxels: robust z-score above this in air (MRIQC: 10) ...
ARTIFACT_ZSCORE = 10.0
#: ... and farther from the head than this fraction of the largest air distance (MRIQC: 0.10).
ARTIFACT_NEAR_HEAD = 0.10
#: Fewer voxels than this in a region make its statistics undefined.
MIN_REGION_VOXELS = 100
#: Plausible volume of the warped brain mask relative to the template's (the affine's
#: scaling): outside it the registration is not usable (typically the whole head was
#: fitted to the template brain).
BRAIN_VOLUME_RATIO = (0.5, 1.6)
#: Share of the warped brain mask that must fall inside the head mask.
MIN_BRAIN_IN_HEAD = 0.8
#: Weight of the template priors against a flat prior in the tissue mixture.
PRIOR_WEIGHT = 0.5

_LOWER_IS_BETTER = -1
_HIGHER_IS_BETTER = 1
_DESCRIPTIVE = 0


def _metric_table() -> tuple[dict[str, int], dict[str, str], dict[str, str]]:
    """Direction, short label and likely cause (when on its bad side) of every metric.

    Covers what this stage and N4 record.
    """
    names = {"csf": "CSF", "gm": "GM", "wm": "WM", "total": "total", "bg": "background"}
    directions: dict[str, int] = {}
    labels: dict[str, str] = {}
    causes: dict[str, str] = {}

    def add(name: str, direction: int, label: str, cause: str = "") -> None:
        directions[f"iqm_{name}"] = direction
        labels[f"iqm_{name}"] = label
        if cause:
            causes[f"iqm_{name}"] = cause

    add("cjv", _LOWER_IS_BETTER, "CJV", "noise, motion or residual bias")
    add("cnr", _HIGHER_IS_BETTER, "CNR", "noise or weak grey/white contrast")
    add("efc", _LOWER_IS_BETTER, "EFC", "ghosting or blur")
    add("fber", _HIGHER_IS_BETTER, "FBER", "signal in the air: ghosts, wrap-around or noise")
    # A low WM-to-max ratio means bright outliers (vessels, fat, spikes) or a contrast
    # where WM is not bright; a high one is what a clean T1w looks like.
    add("wm2max", _HIGHER_IS_BETTER, "WM-to-max ratio", "bright outliers or not a T1w contrast")
    add("qi_1", _LOWER_IS_BETTER, "QI1 (air artefacts)", "ghosts, wrap-around or spikes in the air")
    # Native-space artefact measures (mriaudit.artefacts), not MRIQC metrics.
    add("ghost_ratio", _LOWER_IS_BETTER, "Ghost ratio", "ghosting along the phase-encode direction")
    add("edge_anatomy", _LOWER_IS_BETTER, "Anatomy at both FOV edges", "wrap-around")
    add("bg_peak", _LOWER_IS_BETTER, "Air spectrum peak (log10)", "stripes from a k-space spike")
    for tissue in (*TISSUES, "total"):
        add(f"snr_{tissue}", _HIGHER_IS_BETTER, f"SNR ({names[tissue]})", "noisy image")
    for tissue in (*TISSUES, "total"):
        add(f"snrd_{tissue}", _HIGHER_IS_BETTER, f"SNR Dietrich ({names[tissue]})", "noisy image")
    for axis in (*AXES, "avg"):
        add(f"fwhm_{axis}", _LOWER_IS_BETTER, f"FWHM {axis} (mm)", "blur: motion or smoothing")
    for tissue in TISSUES:
        # Tissue fractions describe anatomy (age, atrophy), not image quality.
        add(f"icvs_{tissue}", _DESCRIPTIVE, f"ICV fraction ({names[tissue]})")
    for tissue in TISSUES:
        add(f"rpve_{tissue}", _LOWER_IS_BETTER, f"rPVE ({names[tissue]})", "blurred tissue borders")
    for tissue in TISSUES:
        # Low overlap with the template means a failed registration or segmentation,
        # or anatomy far from the template (large lesion, non-brain image).
        add(
            f"tpm_overlap_{tissue}",
            _HIGHER_IS_BETTER,
            f"TPM overlap ({names[tissue]})",
            "misregistration, failed segmentation or atypical anatomy",
        )
    for label in SUMMARY_LABELS:
        for stat in SUMMARY_STATS:
            add(f"summary_{label}_{stat}", _DESCRIPTIVE, f"{names[label]} {stat}")
    for axis in AXES:
        add(f"size_{axis}", _DESCRIPTIVE, f"Size {axis} (voxels)")
    for axis in AXES:
        add(f"spacing_{axis}", _DESCRIPTIVE, f"Spacing {axis} (mm)")
    # Recorded by the N4 stage: the field's spread is a quality problem, its median
    # depends on N4's arbitrary normalisation.
    add("inu_med", _DESCRIPTIVE, "INU median")
    add("inu_range", _LOWER_IS_BETTER, "INU range (p95-p5)", "strong intensity non-uniformity")
    # The same field inside white matter only: the head mask's scalp and fat confound N4.
    add(
        "inu_wm_range",
        _LOWER_IS_BETTER,
        "INU range in WM (p95-p5)",
        "strong intensity non-uniformity",
    )
    return directions, labels, causes


#: Every metric name (``iqm_`` prefix) mapped to +1 (higher is better), -1 (lower is
#: better) or 0 (descriptive, never flagged). Includes the N4 stage's ``iqm_inu_*``.
IQM_DIRECTIONS: dict[str, int]
#: Short human-readable name of every metric in :data:`IQM_DIRECTIONS`.
IQM_LABELS: dict[str, str]
#: The likely cause of a metric on its bad side, in plain words, for flag reasons.
IQM_CAUSES: dict[str, str]
IQM_DIRECTIONS, IQM_LABELS, IQM_CAUSES = _metric_table()
#: Metrics this stage writes (all of IQM_DIRECTIONS except the N4 stage's).
IQM_NAMES: tuple[str, ...] = tuple(
    n for n in IQM_DIRECTIONS if n not in ("iqm_inu_med", "iqm_inu_range")
)


# --------------------------------------------------------------------------- statistics


def summary_stats(values: np.ndarray) -> dict[str, float]:
    """MRIQC's summary statistics of the intensities in one region.

    ``values``: 1-D intensities (any unit). Returns ``mean``, ``median``,
    ``stdv`` (population standard deviation), ``mad`` (median absolute deviation
    scaled by 1.4826 to estimate a Gaussian sigma), ``k`` (excess kurtosis,
    Fisher), ``p05``, ``p95`` (percentiles) in the image's units and ``n`` (voxel
    count). Descriptive: no direction. Fewer than 2 values give NaN statistics.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        return dict.fromkeys(SUMMARY_STATS[:-1], math.nan) | {"n": float(x.size)}
    p05, median, p95 = np.percentile(x, [5, 50, 95])
    stdv = float(x.std())
    kurtosis = float(stats.kurtosis(x)) if stdv > 0 else math.nan
    return {
        "mean": float(x.mean()),
        "median": float(median),
        "stdv": stdv,
        "mad": float(stats.median_abs_deviation(x, scale="normal")),
        "k": kurtosis,
        "p05": float(p05),
        "p95": float(p95),
        "n": float(x.size),
    }


def _ratio(numerator: float, denominator: float) -> float:
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator <= 0:
        return math.nan
    return float(numerator / denominator)


def snr(values: np.ndarray) -> float:
    """Signal-to-noise ratio inside one tissue (MRIQC ``snr``), dimensionless.

    ``SNR = median(v) / (std(v) * sqrt(n / (n - 1)))`` for the ``n`` intensities
    ``v`` of the tissue (the sample standard deviation). Measures signal over the
    spread within the tissue, which mixes noise with residual bias and anatomy.
    Higher is better.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size < 2:
        return math.nan
    return _ratio(float(np.median(x)), float(x.std(ddof=1)))


def air_sigma(air: np.ndarray) -> float:
    """Spread of the air (background) intensities, image units.

    MRIQC's ``snr_dietrich`` prefers the air's normalised MAD and falls back to
    its standard deviation when the MAD is at most 1.0 intensity unit (meant for
    integer data quantised to 0/1). Our images may be float with any scale, so
    the MAD is used whenever it is positive and the standard deviation otherwise.
    For Rayleigh noise the normalised MAD is within 2 % of the standard deviation.
    Returns NaN for fewer than 2 values or a flat background.
    """
    return _noise_spread(summary_stats(air))


def _noise_spread(air_stats: Mapping[str, float]) -> float:
    """:func:`air_sigma` from the air's :func:`summary_stats`."""
    if air_stats["mad"] > 0:
        return float(air_stats["mad"])
    return float(air_stats["stdv"]) if air_stats["stdv"] > 0 else math.nan


def snr_dietrich(values: np.ndarray, *, sigma_air: float) -> float:
    """Dietrich's air-based SNR of one tissue (MRIQC ``snrd``), dimensionless.

    ``SNRd = median(v) / (sigma_air * sqrt(2 / (4 - pi)))``: the air of a
    magnitude image is Rayleigh distributed, its spread ``sigma_air`` (see
    :func:`air_sigma`) times ``sqrt(2 / (4 - pi))`` is the sigma of the
    underlying Gaussian noise. Higher is better.
    """
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return math.nan
    return _ratio(float(np.median(x)) * DIETRICH_FACTOR, sigma_air)


def cnr(wm: np.ndarray, gm: np.ndarray, air: np.ndarray) -> float:
    """Contrast-to-noise ratio between WM and GM (MRIQC ``cnr``), dimensionless.

    ``CNR = |median(wm) - median(gm)| / sqrt(std(air)^2 + std(wm)^2 + std(gm)^2)``
    with population standard deviations of the intensities of each region.
    Higher is better.
    """
    w = np.asarray(wm, dtype=np.float64).ravel()
    g = np.asarray(gm, dtype=np.float64).ravel()
    a = np.asarray(air, dtype=np.float64).ravel()
    if min(w.size, g.size, a.size) < 2:
        return math.nan
    spread = math.sqrt(a.var() + w.var() + g.var())
    return _ratio(abs(float(np.median(w)) - float(np.median(g))), spread)


def cjv(wm: np.ndarray, gm: np.ndarray) -> float:
    """Coefficient of joint variation of WM and GM (MRIQC ``cjv``), dimensionless.

    ``CJV = (mad(wm) + mad(gm)) / |median(wm) - median(gm)|`` with normalised
    MADs (MRIQC passes median and MAD). Rises with noise, bias and motion
    (Ganzetti et al. 2016). Lower is better.
    """
    w = np.asarray(wm, dtype=np.float64).ravel()
    g = np.asarray(gm, dtype=np.float64).ravel()
    if min(w.size, g.size) < 2:
        return math.nan
    spread = float(stats.median_abs_deviation(w, scale="normal")) + float(
        stats.median_abs_deviation(g, scale="normal")
    )
    contrast = abs(float(np.median(w)) - float(np.median(g)))
    if contrast == 0:
        return math.inf if spread > 0 else math.nan
    return spread / contrast


def wm2max(data: np.ndarray, wm: np.ndarray) -> float:
    """White-matter-to-maximum intensity ratio (MRIQC ``wm2max``), dimensionless.

    ``median(wm) / p99.95(data)`` over the whole image ``data``. Around 0.6-0.8
    for a clean T1w; low values mean long bright tails (vessels, fat, spikes).
    Higher is better (recorded as such, although values near 1 are unusual).
    """
    w = np.asarray(wm, dtype=np.float64).ravel()
    if w.size == 0:
        return math.nan
    top = float(np.percentile(np.asarray(data, dtype=np.float32), 99.95))
    return _ratio(float(np.median(w)), top)


#: Voxels per chunk of the EFC sums.
_EFC_CHUNK = 1 << 20


def efc(data: np.ndarray, frame: np.ndarray | None = None) -> float:
    """Entropy focus criterion (MRIQC ``efc``, Atkinson et al. 1997), dimensionless in [0, 1].

    With ``x`` the non-negative intensities outside ``frame`` (zero-filled
    padding, optional), ``N`` their count and ``B = sqrt(sum x^2)``:
    ``EFC = sum (x/B) ln(x/B) / (sqrt(N) ln(1/sqrt(N)))``, the image entropy
    normalised by its maximum (all voxels equal). Ghosting and blurring spread
    energy over more voxels and raise it. Lower is better.
    """
    x = np.asarray(data)
    if frame is not None and np.any(frame):
        x = x[~np.asarray(frame, dtype=bool)]
    n = x.size
    # Zero voxels add nothing to the sum (0 * ln(0 + 1e-16) = 0): keep the positive ones.
    x = x[x > 0]
    # sum (x/B) ln(x/B) = (sum x ln x - ln B sum x) / B, so one pass gets the three
    # sums, in float64 over chunks of a million voxels (no image-sized float64 copy).
    sum_x = sum_x2 = sum_x_log_x = 0.0
    for start in range(0, x.size, _EFC_CHUNK):
        chunk = x[start : start + _EFC_CHUNK].astype(np.float64)
        sum_x += float(chunk.sum())
        sum_x2 += float(np.dot(chunk, chunk))
        sum_x_log_x += float(np.dot(chunk, np.log(chunk)))
    energy = math.sqrt(sum_x2)
    if n < 2 or energy == 0:
        return math.nan
    efc_max = math.sqrt(n) * math.log(1.0 / math.sqrt(n))
    entropy = (sum_x_log_x - math.log(energy) * sum_x) / energy
    return entropy / efc_max


def fber(data: np.ndarray, head: np.ndarray, frame: np.ndarray | None = None) -> float:
    """Foreground-to-background energy ratio (MRIQC ``fber``), dimensionless.

    ``FBER = median(|x|^2 in head) / median(|x|^2 outside head and frame)``.
    Higher is better. MRIQC returns -1 when the background median is zero
    (zero-filled air); here that is NaN, so it is never mistaken for a value.
    """
    x = np.asarray(data, dtype=np.float32)
    head = np.asarray(head, dtype=bool)
    air = ~head
    if frame is not None:
        air &= ~np.asarray(frame, dtype=bool)
    if not head.any() or not air.any():
        return math.nan
    fg = float(np.median(np.abs(x[head]))) ** 2
    bg = float(np.median(np.abs(x[air]))) ** 2
    return _ratio(fg, bg)


def qi_1(air: np.ndarray, artifacts: np.ndarray) -> float:
    """Mortamet's quality index 1 (MRIQC ``qi_1``), fraction in [0, 1].

    ``QI1 = n_artefact / (n_air + n_artefact)`` with ``air`` the clean
    background and ``artifacts`` the artefact voxels found in it (disjoint
    boolean masks, see :func:`artifact_mask`). Lower is better.
    """
    n_air = int(np.count_nonzero(air))
    n_art = int(np.count_nonzero(artifacts))
    if n_air + n_art == 0:
        return math.nan
    return n_art / (n_air + n_art)


def fwhm(data: np.ndarray, mask: np.ndarray, spacing_mm: Sequence[float]) -> tuple[float, ...]:
    """Smoothness of the image along each axis, in mm (AFNI 3dFWHMx, classic method).

    ``data`` (X, Y, Z) intensities, ``mask`` boolean of the same shape,
    ``spacing_mm`` the voxel sides. For each axis the lag-1 autocorrelation is
    ``rho = 1 - var(first differences) / (2 var(data))`` over voxel pairs inside
    ``mask``; a Gaussian-smoothed white noise has ``rho = exp(-1 / (4 s^2))``
    with ``s`` the kernel's sigma in voxels, hence
    ``FWHM = spacing * sqrt(-2 ln 2 / ln rho)``: the FWHM of the Gaussian kernel
    that would make white noise this smooth. MRIQC divides 3dFWHMx's mm by the
    voxel size (voxel units); mm are kept here so resolutions compare. Returns
    ``(fwhm_x, fwhm_y, fwhm_z)``; NaN for an axis without enough pairs or with
    ``rho`` outside (0, 1). Higher means blurrier: lower is better.
    """
    x = np.asarray(data, dtype=np.float32)
    m = np.asarray(mask, dtype=bool)
    if x.ndim != 3 or x.shape != m.shape:
        message = f"fwhm needs 3-D data and mask of one shape, got {x.shape} and {m.shape}"
        raise ValueError(message)
    values = x[m].astype(np.float64)
    if values.size < MIN_REGION_VOXELS:
        return (math.nan, math.nan, math.nan)
    variance = float(values.var())
    result = []
    for axis, spacing in enumerate(spacing_mm):
        upper = [slice(None)] * 3
        lower = [slice(None)] * 3
        upper[axis] = slice(1, None)
        lower[axis] = slice(None, -1)
        pairs = m[tuple(upper)] & m[tuple(lower)]
        if np.count_nonzero(pairs) < MIN_REGION_VOXELS or variance <= 0:
            result.append(math.nan)
            continue
        diff = (x[tuple(upper)] - x[tuple(lower)])[pairs].astype(np.float64)
        rho = 1.0 - float(diff.var()) / (2.0 * variance)
        if not 0.0 < rho < 1.0:
            result.append(math.nan)
            continue
        result.append(float(spacing) * math.sqrt(-2.0 * math.log(2.0) / math.log(rho)))
    return tuple(result)


def field_range(raw: np.ndarray, corrected: np.ndarray) -> float:
    """p95 - p5 of the bias field ``raw / corrected`` over its median (voxels (n,) of one
    tissue); NaN with fewer than ``MIN_REGION_VOXELS`` usable voxels."""
    usable = (np.asarray(corrected) > 0) & np.isfinite(raw)
    if np.count_nonzero(usable) < MIN_REGION_VOXELS:
        return math.nan
    field = np.asarray(raw, dtype=np.float64)[usable] / np.asarray(corrected, np.float64)[usable]
    p5, p50, p95 = np.percentile(field, [5, 50, 95])
    return float((p95 - p5) / p50) if p50 > 0 else math.nan


def volume_fractions(pvms: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Intracranial volume fractions (MRIQC ``icvs_*``), each in [0, 1].

    ``pvms``: partial-volume (or probability) map per tissue, same shape.
    ``icvs_k = sum(pv_k) / sum_j sum(pv_j)``. Descriptive (anatomy): no direction.
    """
    volumes = {name: float(np.sum(pv, dtype=np.float64)) for name, pv in pvms.items()}
    total = sum(volumes.values())
    return {name: _ratio(volume, total) for name, volume in volumes.items()}


def rpve(pv: np.ndarray) -> float:
    """Residual partial-volume error of one tissue (MRIQC ``rpve_*``), fraction in [0, 0.5].

    ``rPVE = sum min(p, 1 - p) / sum p`` over the tissue's partial-volume map
    ``p``: the share of the tissue's volume held by voxels that are not clearly
    it or not it. MRIQC's formula trims the map at its 2nd/98th percentiles and
    divides by the number of non-zero voxels while counting the zero voxels of
    the whole field of view, which ties its value to the FOV size; this version
    keeps its intent (blur, noise and low resolution make tissue boundaries
    fuzzy) without that dependence. Lower is better.
    """
    p = np.asarray(pv, dtype=np.float32)
    p = np.minimum(p[p > 0], 1.0)
    total = float(p.sum(dtype=np.float64))
    if total <= 0:
        return math.nan
    return float(np.minimum(p, 1.0 - p).sum(dtype=np.float64)) / total


def fuzzy_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Fuzzy Jaccard overlap ``sum min(a, b) / sum max(a, b)`` of two maps in [0, 1].

    MRIQC's ``tpm_overlap_*`` is this overlap between the subject's tissue maps
    and the template's tissue probability maps. Higher is better.
    """
    x = np.asarray(a, dtype=np.float32)
    y = np.asarray(b, dtype=np.float32)
    union = float(np.maximum(x, y).sum(dtype=np.float64))
    return _ratio(float(np.minimum(x, y).sum(dtype=np.float64)), union)


# --------------------------------------------------------------------------- masks


def frame_mask(data: np.ndarray, *, min_voxels: int = 500) -> np.ndarray:
    """Zero-filled frame of the field of view (MRIQC's ``rotmask``), boolean (X, Y, Z).

    Voxels <= 0 that, after an opening with an 18-connected element (dropping
    isolated zeros of the air noise), belong to a component touching the border
    of the volume: padding from reslicing, rotation or defacing. Fewer than
    ``min_voxels`` such voxels give an empty mask.
    """
    zero = ~(np.asarray(data) > 0)
    faces = [np.take(zero, index, axis=axis) for axis in range(3) for index in (0, -1)]
    if np.count_nonzero(zero) < min_voxels or not any(face.any() for face in faces):
        return np.zeros(zero.shape, dtype=bool)
    # Opening, with the outside counted as zero so padding at the border survives.
    structure = ndi.generate_binary_structure(3, 2)
    eroded = ndi.binary_erosion(zero, structure=structure, border_value=1)
    opened = ndi.binary_dilation(eroded, structure=structure) & zero
    labels, count = ndi.label(opened)
    if count == 0:
        return np.zeros(zero.shape, dtype=bool)
    border = np.zeros(count + 1, dtype=bool)
    for axis in range(3):
        for index in (0, -1):
            border[np.unique(np.take(labels, index, axis=axis))] = True
    border[0] = False
    frame = border[labels]
    if np.count_nonzero(frame) < min_voxels:
        return np.zeros(zero.shape, dtype=bool)
    return frame


def distance_mm(
    mask: np.ndarray, spacing_mm: Sequence[float], *, step_mm: float = 2.0
) -> np.ndarray:
    """Approximate distance (mm) of every voxel to ``mask``, float32 of ``mask``'s shape.

    The exact Euclidean transform of a 1 mm head takes seconds; it is computed on
    a grid about ``step_mm`` coarse (blocks that touch the mask count as mask),
    so distances are accurate to about ``step_mm``. An empty mask gives +inf.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.full(m.shape, np.inf, dtype=np.float32)
    factors = [max(1, int(step_mm // s)) for s in spacing_mm]
    padded = np.pad(m, [(0, (-n) % f) for n, f in zip(m.shape, factors, strict=True)])
    blocks: list[int] = []
    for n, f in zip(padded.shape, factors, strict=True):
        blocks += [n // f, f]
    coarse = padded.reshape(blocks).any(axis=(1, 3, 5))
    sampling = [s * f for s, f in zip(spacing_mm, factors, strict=True)]
    dist = ndi.distance_transform_edt(~coarse, sampling=sampling).astype(np.float32)
    for axis, f in enumerate(factors):
        dist = np.repeat(dist, f, axis=axis)
    return dist[: m.shape[0], : m.shape[1], : m.shape[2]]


def artifact_mask(
    data: np.ndarray,
    air: np.ndarray,
    head_distance_mm: np.ndarray,
    *,
    zscore: float = ARTIFACT_ZSCORE,
    near: float = ARTIFACT_NEAR_HEAD,
) -> np.ndarray:
    """Artefact voxels in the air (MRIQC ``artifact_mask``, Mortamet et al. 2009), boolean.

    Inside ``air`` the positive intensities give a robust location (median) and
    spread (normalised MAD, or std when the MAD is 0); air voxels whose robust
    z-score exceeds ``zscore`` and whose distance to the head
    (``head_distance_mm``, see :func:`distance_mm`) is at least ``near`` times
    the largest such distance in the air are candidates, and a 6-connected
    opening keeps only clusters (ghosts, wrap-around, spikes), not single noisy
    voxels. All arrays share one 3-D shape.
    """
    x = np.asarray(data, dtype=np.float32)
    air = np.asarray(air, dtype=bool)
    values = x[air]
    values = values[values > 0].astype(np.float64)
    if values.size < MIN_REGION_VOXELS:
        return np.zeros(x.shape, dtype=bool)
    location = float(np.median(values))
    spread = float(stats.median_abs_deviation(values, scale="normal")) or float(values.std())
    if spread <= 0:
        return np.zeros(x.shape, dtype=bool)
    candidates = air & (x > location + zscore * spread)
    if not candidates.any():
        return candidates
    reach = float(head_distance_mm[air].max())
    candidates &= head_distance_mm >= near * reach
    opened = ndi.binary_opening(candidates, structure=ndi.generate_binary_structure(3, 1))
    return opened & air


def tissue_masks(
    pvms: Mapping[str, np.ndarray], spacing_mm: Sequence[float]
) -> dict[str, np.ndarray]:
    """Summary masks ``pv > 0.85``, eroded (18-connected) when all voxel sides < 1.9 mm, as MRIQC."""
    erode = all(s < ERODE_BELOW_MM for s in spacing_mm)
    structure = ndi.generate_binary_structure(3, 2)
    out = {}
    for name, pv in pvms.items():
        mask = np.asarray(pv) > PV_THRESHOLD
        out[name] = ndi.binary_erosion(mask, structure=structure) if erode else mask
    return out


# --------------------------------------------------------------------------- tissues


def _bbox(mask: np.ndarray, *, margin: int = 2) -> tuple[slice, ...]:
    index = np.nonzero(mask)
    return tuple(
        slice(max(0, int(i.min()) - margin), min(n, int(i.max()) + margin + 1))
        for i, n in zip(index, mask.shape, strict=True)
    )


def _posteriors(
    x: np.ndarray,
    weights: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
) -> np.ndarray:
    """Class posteriors (N, K) of intensities ``x`` (N,) under Gaussians with voxel weights (N, K).

    Computed in ``x``'s precision, in place where possible (float32 for a whole brain).
    """
    dtype = x.dtype
    log_p = x[:, None] - np.asarray(mean, dtype=dtype)
    np.square(log_p, out=log_p)
    log_p *= np.asarray(-0.5 / var, dtype=dtype)
    log_p += np.asarray(-0.5 * np.log(var), dtype=dtype)
    log_p += np.log(weights + dtype.type(1e-12))
    log_p -= log_p.max(axis=1, keepdims=True)
    np.exp(log_p, out=log_p)
    log_p /= log_p.sum(axis=1, keepdims=True)
    return log_p


def segment_tissues(
    data: np.ndarray,
    brain: np.ndarray,
    priors: np.ndarray,
    *,
    prior_weight: float = PRIOR_WEIGHT,
    iterations: int = 25,
    spatial_rounds: int = 2,
    smoothing_vox: float = 1.0,
    sample: int = 100_000,
    seed: int = 0,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Three-class tissue posteriors from intensities and spatial priors.

    ``data`` (X, Y, Z) intensities, ``brain`` boolean (X, Y, Z), ``priors``
    (K, X, Y, Z) prior probabilities (CSF, GM, WM). A Gaussian mixture is fitted
    by EM on up to ``sample`` brain voxels (fixed ``seed``), each voxel's class
    weights being ``prior_weight * prior + (1 - prior_weight) * proportion``.
    Then ``spatial_rounds`` times the posteriors are smoothed with a Gaussian of
    ``smoothing_vox`` voxels and multiply the weights, which removes isolated
    noise labels like a Markov random field would. Returns the posteriors
    (K, X, Y, Z) float32, zero outside ``brain``, and the fitted ``means``,
    ``sds`` (image units) and ``proportions``. Raises ``ValueError`` when the
    brain holds too few voxels or no contrast.
    """
    if iterations < 1:
        message = f"iterations must be at least 1, got {iterations}"
        raise ValueError(message)
    brain = np.asarray(brain, dtype=bool)
    n_classes = priors.shape[0]
    if np.count_nonzero(brain) < n_classes * MIN_REGION_VOXELS:
        message = f"only {np.count_nonzero(brain)} brain voxels to segment"
        raise ValueError(message)
    box = _bbox(brain)
    inside = brain[box]
    # float32 for the whole brain (millions of voxels), float64 for the EM sample.
    x = np.asarray(data, dtype=np.float32)[box][inside]
    prior = np.stack([np.asarray(p, dtype=np.float32)[box][inside] for p in priors], axis=1)
    np.clip(prior, 0.0, None, out=prior)
    prior /= np.maximum(prior.sum(axis=1, keepdims=True), np.float32(1e-12))
    scale = float(x.std(dtype=np.float64))
    if not scale > 0:
        message = "no intensity contrast inside the brain mask"
        raise ValueError(message)

    rng = np.random.default_rng(seed)
    pick = rng.choice(x.size, size=sample, replace=False) if x.size > sample else slice(None)
    xs, ps = x[pick].astype(np.float64), prior[pick].astype(np.float64)
    resp = ps
    floor = (1e-3 * scale) ** 2
    mean = np.zeros(n_classes)
    for _ in range(iterations):
        total = np.maximum(resp.sum(axis=0), 1e-12)
        new_mean = (resp * xs[:, None]).sum(axis=0) / total
        var = np.maximum((resp * (xs[:, None] - new_mean) ** 2).sum(axis=0) / total, floor)
        proportion = total / total.sum()
        converged = np.max(np.abs(new_mean - mean)) < 1e-3 * scale
        mean = new_mean
        if converged:
            break
        resp = _posteriors(xs, prior_weight * ps + (1 - prior_weight) * proportion, mean, var)

    weights = prior_weight * prior + ((1 - prior_weight) * proportion).astype(np.float32)
    post = _posteriors(x, weights, mean, var)
    volume = np.zeros((n_classes, *inside.shape), dtype=np.float32)
    for _ in range(spatial_rounds):
        for k in range(n_classes):
            volume[k].fill(0.0)
            volume[k][inside] = post[:, k]
            volume[k] = ndi.gaussian_filter(volume[k], smoothing_vox)
        neighbours = np.stack([volume[k][inside] for k in range(n_classes)], axis=1)
        neighbours += np.float32(1e-3)
        neighbours *= weights
        post = _posteriors(x, neighbours, mean, var)

    out = np.zeros((n_classes, *brain.shape), dtype=np.float32)
    for k in range(n_classes):
        out[k][box][inside] = post[:, k]
    fit = {"means": mean.tolist(), "sds": np.sqrt(var).tolist(), "proportions": proportion.tolist()}
    return out, fit


# --------------------------------------------------------------------------- subject


class SegmentationUnavailable(Exception):
    """No usable tissue classes for this subject; the message says why."""


def _itk_threads(threads: int) -> None:
    # ANTs reads the thread count from the environment (as ants.set_ants_deterministic does).
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(max(1, int(threads)))


def _ras_affine(img: ants.ANTsImage) -> np.ndarray:
    """Voxel index -> RAS mm affine of an ANTs image (ITK is LPS)."""
    direction = np.asarray(img.direction, dtype=np.float64).reshape(3, 3)
    lps = np.eye(4)
    lps[:3, :3] = direction * np.asarray(img.spacing, dtype=np.float64)
    lps[:3, 3] = img.origin
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


@dataclass(frozen=True)
class _Grid:
    """The native grid and its closest-RAS ("canonical") voxel order."""

    image: ants.ANTsImage
    ornt: np.ndarray
    affine: np.ndarray  # canonical voxel -> RAS mm
    spacing: tuple[float, float, float]  # canonical axes, mm

    @classmethod
    def of(cls, image: ants.ANTsImage) -> _Grid:
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


def _point_affine(tx: ants.ANTsTransform) -> np.ndarray:
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
        native_to_mni = np.linalg.inv(_point_affine(tx))
    except (RuntimeError, ValueError, np.linalg.LinAlgError) as error:
        return None, f"unreadable registration transform: {error}".strip().splitlines()[0]
    # ANTs maps fixed (MNI) points to moving (native) points, both in LPS.
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine = flip @ native_to_mni @ flip
    if not np.all(np.isfinite(affine)):
        return None, "registration transform is not finite"
    return affine, ""


def _hat_mask(
    shape: tuple[int, ...],
    *,
    vox_to_mni: np.ndarray | None,
    head: np.ndarray,
    spacing_mm: Sequence[float],
) -> np.ndarray:
    """Voxels above MRIQC's glabella-inion level, boolean (canonical RAS grid).

    With a registration, voxels whose MNI height is at least -14 mm. Without
    one, the level is taken 90 mm below the top of the head mask along the
    canonical superior axis (about where MNI z = -14 mm lies on an adult head).
    """
    if vox_to_mni is not None:
        row = vox_to_mni[2]
        # The (X, Y) plane's height first, so only one pass touches the whole volume.
        plane = (
            row[3]
            + row[0] * np.arange(shape[0], dtype=np.float64)[:, None]
            + row[1] * np.arange(shape[1], dtype=np.float64)[None, :]
        ).astype(np.float32)
        rise = (row[2] * np.arange(shape[2], dtype=np.float64)).astype(np.float32)
        return np.greater_equal(plane[:, :, None], np.float32(HAT_MNI_Z_MM) - rise[None, None, :])
    slices = np.nonzero(head.any(axis=(0, 1)))[0]
    top = int(slices.max()) if slices.size else shape[2] - 1
    level = top - HAT_BELOW_VERTEX_MM / spacing_mm[2]
    index = np.arange(shape[2])[None, None, :]
    return np.broadcast_to(index >= level, shape).copy()


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


def _stat_metrics(name: str, result: Mapping[str, float] | None) -> dict[str, float]:
    return {
        f"iqm_summary_{name}_{stat}": (result[stat] if result else math.nan)
        for stat in SUMMARY_STATS
    }


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


def _tissues(
    grid: _Grid,
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


def compute_iqms(
    raw_image: Path,
    n4_image: Path,
    head_mask: Path,
    transform: Path,
    *,
    resolution: int = 2,
) -> tuple[dict[str, float], list[str], dict[str, Any]]:
    """Every IQM of one subject: (metrics named ``iqm_*``, warnings, details).

    Images as in :func:`iqm_subject`. Metrics that cannot be computed are NaN
    and a warning says why. Raises ``records.StageError`` when the images
    cannot be read, differ in grid or hold no signal.
    """
    timings: dict[str, float] = {}
    last = [time.perf_counter()]

    def lap(section: str) -> None:
        now = time.perf_counter()
        timings[section] = round(now - last[0], 3)
        last[0] = now

    warnings: list[str] = []
    raw_img = _load(raw_image, "converted")
    n4_img = _load(n4_image, "bias-corrected")
    mask_img = _load(head_mask, "head mask")
    if not raw_img.shape == n4_img.shape == mask_img.shape:
        message = (
            f"grids differ: raw {raw_img.shape}, n4 {n4_img.shape}, head mask {mask_img.shape}"
        )
        raise records.StageError(message)
    grid = _Grid.of(raw_img)
    spacing = grid.spacing
    raw = grid.canonical(raw_img.numpy())
    data = grid.canonical(finite(n4_img.numpy().astype(np.float32), inf_to_zero=False))
    np.clip(data, 0.0, None, out=data)
    head = grid.canonical(mask_img.numpy() > 0)
    if not np.any(data > 0):
        message = "the bias-corrected image holds no signal"
        raise records.StageError(message)
    if not head.any():
        message = "the head mask is empty"
        raise records.StageError(message)
    shape = data.shape
    lap("load")

    metrics: dict[str, float] = dict.fromkeys(IQM_NAMES, math.nan)
    for axis, n, s in zip(AXES, shape, spacing, strict=True):
        metrics[f"iqm_size_{axis}"] = int(n)
        metrics[f"iqm_spacing_{axis}"] = round(s, 6)

    # Background: air above the glabella-inion level, clear of the head and the frame.
    frame = frame_mask(finite(raw, inf_to_zero=False))
    vox_to_mni, transform_problem = _read_transform(Path(transform))
    if vox_to_mni is not None:
        vox_to_mni = vox_to_mni @ grid.affine
    head_distance = distance_mm(head, spacing)
    air = _hat_mask(shape, vox_to_mni=vox_to_mni, head=head, spacing_mm=spacing)
    air &= (head_distance > HEAD_MARGIN_MM) & ~frame
    artifacts = artifact_mask(data, air, head_distance)
    del head_distance
    air &= ~artifacts
    metrics["iqm_qi_1"] = qi_1(air, artifacts)
    metrics["iqm_efc"] = efc(data, frame)
    metrics["iqm_fber"] = fber(data, head, frame)
    metrics.update(artefact_metrics(data, head, frame=frame))
    if not math.isfinite(metrics["iqm_fber"]):
        warnings.append("FBER undefined: the air outside the head is zero-filled")
    details: dict[str, Any] = {
        "air_voxels": int(np.count_nonzero(air)),
        "artifact_voxels": int(np.count_nonzero(artifacts)),
        "frame_voxels": int(np.count_nonzero(frame)),
        "hat": "registration" if vox_to_mni is not None else "head top - 90 mm",
    }
    del artifacts, frame
    (bg_mask,) = tissue_masks({"bg": air}, spacing).values()
    del air
    air_values = data[bg_mask] if np.count_nonzero(bg_mask) >= MIN_REGION_VOXELS else None
    if air_values is None:
        warnings.append(
            f"too little air background ({np.count_nonzero(bg_mask)} voxels): "
            "background metrics undefined"
        )
    del bg_mask
    air_stats = summary_stats(air_values) if air_values is not None else None
    metrics.update(_stat_metrics("bg", air_stats))
    details["timings_s"] = timings
    lap("background")

    # Smoothness inside the head, two voxels away from its edge (the skin/air step
    # would dominate the differences).
    head_box = _bbox(head)
    inner = np.zeros(shape, dtype=bool)
    inner[head_box] = ndi.binary_erosion(
        head[head_box], structure=ndi.generate_binary_structure(3, 2), iterations=2
    )
    for axis, value in zip(AXES, fwhm(data, inner, spacing), strict=True):
        metrics[f"iqm_fwhm_{axis}"] = value
    del inner
    metrics["iqm_fwhm_avg"] = float(np.mean([metrics[f"iqm_fwhm_{a}"] for a in AXES]))
    lap("fwhm")

    try:
        if vox_to_mni is None:
            raise SegmentationUnavailable(transform_problem)
        box, pvms, tpms, fit = _tissues(grid, data, head, Path(transform), vox_to_mni, resolution)
        masks = tissue_masks(pvms, spacing)
        values = {name: data[box][masks[name]] for name in TISSUES}
        small = [name for name in TISSUES if values[name].size < MIN_REGION_VOXELS]
        if small:
            message = f"too few confident voxels for {', '.join(small)}"
            raise SegmentationUnavailable(message)
    except SegmentationUnavailable as error:
        warnings.append(f"no tissue segmentation: {error}; tissue-based metrics undefined")
        log.warning("no tissue segmentation: %s", error)
        lap("tissues")
        return metrics, warnings, details
    details["segmentation"] = fit
    lap("tissues")

    for name in TISSUES:
        metrics.update(_stat_metrics(name, summary_stats(values[name])))
        metrics[f"iqm_snr_{name}"] = snr(values[name])
    metrics["iqm_snr_total"] = float(np.mean([metrics[f"iqm_snr_{n}"] for n in TISSUES]))
    if air_values is not None and air_stats is not None:
        sigma = _noise_spread(air_stats)
        for name in TISSUES:
            metrics[f"iqm_snrd_{name}"] = snr_dietrich(values[name], sigma_air=sigma)
        metrics["iqm_snrd_total"] = float(np.mean([metrics[f"iqm_snrd_{n}"] for n in TISSUES]))
        metrics["iqm_cnr"] = cnr(values["wm"], values["gm"], air_values)
    metrics["iqm_cjv"] = cjv(values["wm"], values["gm"])
    metrics["iqm_inu_wm_range"] = field_range(raw[box][masks["wm"]], values["wm"])
    del raw
    metrics["iqm_wm2max"] = wm2max(data, values["wm"])
    for name, fraction in volume_fractions(pvms).items():
        metrics[f"iqm_icvs_{name}"] = fraction
    for name in TISSUES:
        metrics[f"iqm_rpve_{name}"] = rpve(pvms[name])
        metrics[f"iqm_tpm_overlap_{name}"] = fuzzy_jaccard(pvms[name], tpms[name])
    lap("tissue_metrics")
    return metrics, warnings, details


def iqm_subject(
    raw_image: Path,
    n4_image: Path,
    head_mask: Path,
    transform: Path,
    *,
    record_path: Path,
    upstream: Sequence[Path],
    resolution: int = 2,
    threads: int = 1,
) -> dict:
    """Stage ``iqm``: MRIQC-style metrics of one subject, written to its status record.

    ``raw_image``: the converted native T1w (any orientation); ``n4_image``: its
    bias-corrected version on the same grid; ``head_mask``: uint8 head mask on
    that grid; ``transform``: ANTs affine ``.mat`` from the registration
    (fixed = MNI152 template, moving = native image); ``resolution``: template
    grid (mm) whose tissue priors are warped; ``threads``: ITK threads. The
    record's ``metrics`` hold every name in ``IQM_NAMES`` (``None`` where
    undefined, with a warning saying why); ``details`` hold mask sizes and the
    tissue mixture's fit. A scan that cannot be read ends as a ``failed``
    record. Returns the record.
    """
    _itk_threads(threads)

    def work() -> dict[str, Any]:
        metrics, warnings, details = compute_iqms(
            Path(raw_image),
            Path(n4_image),
            Path(head_mask),
            Path(transform),
            resolution=resolution,
        )
        return records.make_record(STAGE, metrics=metrics, warnings=warnings, details=details)

    return records.run_stage(STAGE, work, record_path=record_path, upstream=upstream)
