"""MRIQC-style image quality metrics (IQMs): the formulas, on arrays.

The definitions follow MRIQC's anatomical IQMs (Esteban et al. 2017, PLoS ONE
12:e0184661; ``mriqc.qc.anatomical``), re-implemented here from the formulas.
Every metric is recorded with MRIQC's name and an ``iqm_`` prefix (``iqm_cjv``,
``iqm_snr_wm``, ``iqm_summary_bg_mad``, ...; ``IQM_DIRECTIONS`` says which side
is bad, ``IQM_TITLES`` and ``IQM_CAUSES`` how the report names it). Where MRIQC
relies on tools we do not have (FSL FAST, AFNI 3dFWHMx) or on a choice that does
not carry over to arbitrary intensity scales, the function's docstring says what
differs. Functions take arrays and masks and return numbers; no file is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats

TISSUES: tuple[str, ...] = ("csf", "gm", "wm")
SUMMARY_LABELS: tuple[str, ...] = ("bg", "csf", "gm", "wm")
SUMMARY_STATS: tuple[str, ...] = ("mean", "median", "stdv", "mad", "k", "p05", "p95", "n")
AXES: tuple[str, ...] = ("x", "y", "z")

#: Standard deviation of a Rayleigh distribution whose Gaussian parameter is 1:
#: air noise in a magnitude image has std sigma * sqrt((4 - pi) / 2) (MRIQC's
#: ``DIETRICH_FACTOR`` = 1 / sqrt(2 / (4 - pi))).
DIETRICH_FACTOR = math.sqrt((4.0 - math.pi) / 2.0)
#: Fewer voxels than this in a region make its statistics undefined.
MIN_REGION_VOXELS = 100
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
IQM_TITLES: dict[str, str]
#: The likely cause of a metric on its bad side, in plain words, for flag reasons.
IQM_CAUSES: dict[str, str]
IQM_DIRECTIONS, IQM_TITLES, IQM_CAUSES = _metric_table()
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


def image_top(data: np.ndarray) -> float:
    """The 99.95th percentile of the whole image: the maximum of :func:`wm2max`."""
    return float(np.percentile(np.asarray(data, dtype=np.float32), 99.95))


def wm2max(data: np.ndarray, wm: np.ndarray, *, top: float | None = None) -> float:
    """White-matter-to-maximum intensity ratio (MRIQC ``wm2max``), dimensionless.

    ``median(wm) / p99.95(data)`` over the whole image ``data`` (``top``: that
    percentile, :func:`image_top`, when already known). Around 0.6-0.8 for a
    clean T1w; low values mean long bright tails (vessels, fat, spikes). Higher
    is better (recorded as such, although values near 1 are unusual).
    """
    w = np.asarray(wm, dtype=np.float64).ravel()
    if w.size == 0:
        return math.nan
    return _ratio(float(np.median(w)), image_top(data) if top is None else top)


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
