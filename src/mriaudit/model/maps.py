"""Voxel anomaly maps and subject summaries: the map maths of scoring, in torch.

A subject's raw map combines, per voxel of the brain crop (X, Y, Z),

- the tolerant intensity residual: the distance of ``x(p)`` to the range of
  ``x_hat`` over p's (2t+1)^3 neighbourhood (normalised intensity units), and
- the structural term ``1 - SSIM(x, x_hat)`` (local 3D SSIM, Gaussian window),

then each term becomes a robust z against the reference subjects' maps at that
voxel (:func:`calibrated_map`), median filtered and kept inside the eroded
template brain mask. Focal (peaks of the smoothed map) and diffuse (its mean)
summaries make the subject's score. Higher map values and scores are more
anomalous.

Functions take torch tensors (on any device; leading axes are a batch of
subjects) or numpy arrays (then they return numpy arrays, on the CPU), so
training's calibration and scoring compute the maps with one code. The filters
are :mod:`mriaudit.model.filters`: equal to scipy's up to float32 rounding.
Connected regions (:func:`top_regions`) are found on the CPU, on the final map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from mriaudit.model import filters
from mriaudit.model.data import BrainGrid
from mriaudit.robust import MAD_TO_SD, mad_sd

#: Constants of SSIM for intensities of order 1 (normalised units).
SSIM_C1, SSIM_C2 = 0.01**2, 0.03**2
#: Gaussian window of the local SSIM, in sigmas (the focal summaries use scipy's 4.0).
SSIM_TRUNCATE = 2.5
#: Smallest spread of a subject's own smoothed map for the focal contrast (map units,
#: robust SD), under any model's own floor (:func:`contrast_floors`) and for checkpoints
#: without one: T1w maps spread 0.06-0.6, so only an almost empty map reaches it.
CONTRAST_FLOOR = 0.05


def _tensor(value: np.ndarray | torch.Tensor) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))


def _like(value: torch.Tensor, reference: Any) -> np.ndarray | torch.Tensor:
    """``value`` as ``reference`` came: a numpy array for a numpy array."""
    return value if isinstance(reference, torch.Tensor) else value.cpu().numpy()


def tolerant_residual(
    volume: np.ndarray | torch.Tensor, recon: np.ndarray | torch.Tensor, *, tolerance: int
) -> np.ndarray | torch.Tensor:
    """Distance (..., X, Y, Z) of each voxel of ``volume`` to the range of ``recon`` over
    its (2 * ``tolerance`` + 1)^3 window, in intensity units; ``|x - x_hat|`` for
    ``tolerance`` 0. An edge displaced by up to ``tolerance`` voxels leaves no residual."""
    x, x_hat = _tensor(volume).float(), _tensor(recon).float()
    if tolerance <= 0:
        return _like((x - x_hat).abs(), volume)
    size = 2 * tolerance + 1
    high = filters.maximum_filter(x_hat, size=size)
    low = filters.minimum_filter(x_hat, size=size)
    residual = (x - high).clamp_min(0.0) + (low - x).clamp_min(0.0)
    return _like(residual, volume)


def local_ssim(
    a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor, *, sigma: float
) -> np.ndarray | torch.Tensor:
    """Local SSIM (..., X, Y, Z) of two volumes of intensities in [0, ~1.5], with a
    Gaussian window of ``sigma`` voxels (truncated at :data:`SSIM_TRUNCATE` sigmas,
    borders reflected). Unitless, at most 1."""
    x, y = _tensor(a).float(), _tensor(b).float()
    moments = filters.gaussian_filter(
        torch.stack([x, y, x * x, y * y, x * y]), sigma=sigma, truncate=SSIM_TRUNCATE
    )
    mu_a, mu_b, aa, bb, ab = moments.unbind(0)
    var_a = aa - mu_a * mu_a
    var_b = bb - mu_b * mu_b
    cov = ab - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + SSIM_C1) * (2 * cov + SSIM_C2)
    denominator = (mu_a**2 + mu_b**2 + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return _like(numerator / denominator, a)


def raw_map(
    volume: np.ndarray | torch.Tensor, recon: np.ndarray | torch.Tensor, *, scoring: dict[str, Any]
) -> np.ndarray | torch.Tensor:
    """Uncalibrated anomaly terms (..., 2, X, Y, Z), float32, >= 0: the tolerant
    intensity residual (``scoring["tolerance"]``) and ``1 - SSIM``
    (``scoring["ssim_sigma"]``), clipped to [0, 2]."""
    x, x_hat = _tensor(volume).float(), _tensor(recon).float()
    residual = tolerant_residual(x, x_hat, tolerance=int(scoring.get("tolerance", 0)))
    ssim = local_ssim(x, x_hat, sigma=float(scoring["ssim_sigma"]))
    structure = (1.0 - ssim).clamp(0.0, 2.0)
    return _like(torch.stack([residual, structure], dim=-4), volume)


def scoring_mask(grid: BrainGrid, *, erode_voxels: int) -> np.ndarray:
    """Eroded template brain mask on the crop (bool, X, Y, Z)."""
    mask = grid.crop_mask
    if erode_voxels > 0:
        mask = ndimage.binary_erosion(mask, iterations=erode_voxels, border_value=1)
    return mask


def calibration_stats(maps: Sequence[np.ndarray], mask: np.ndarray, *, floor: float) -> dict:
    """Voxelwise median and robust spread of the raw terms of reference subjects.

    ``maps`` are (2, X, Y, Z) each. The spread (1.4826 * MAD) is smoothed
    (sigma 1.5 voxels: few subjects make it noisy) and floored, per term, at
    ``floor`` times the term's standard deviation over all subjects and voxels
    inside ``mask``; the median is smoothed with sigma 0.5. Returns
    ``{"median", "spread"}``, float16 tensors (2, X, Y, Z).
    """
    stack = np.stack(maps, axis=0).astype(np.float32)
    median = np.median(stack, axis=0)
    spread = filters.gaussian_filter(torch.from_numpy(mad_sd(stack, axis=0)), sigma=1.5).numpy()
    median = filters.gaussian_filter(torch.from_numpy(median), sigma=0.5).numpy()
    for term in range(spread.shape[0]):
        # The tolerant residual is zero at most voxels, so a voxel's own spread can
        # be ~0; the floor is a fraction of the term's spread over the whole brain.
        values = stack[:, term][:, mask]
        base = float(np.std(values)) if values.size else 1.0
        spread[term] = np.maximum(spread[term], max(floor * base, 1e-3))
    return {
        "median": torch.from_numpy(median.astype(np.float16)),
        "spread": torch.from_numpy(spread.astype(np.float16)),
    }


def calibrated_map(
    raw: np.ndarray | torch.Tensor,
    calibration: dict,
    mask: np.ndarray | torch.Tensor,
    *,
    scoring: dict[str, Any],
) -> np.ndarray | torch.Tensor:
    """Anomaly map (..., X, Y, Z) of raw terms (..., 2, X, Y, Z), >= 0, zero outside ``mask``.

    Each term becomes a robust z against the reference at that voxel
    (``calibration["median"]``, ``["spread"]``: (2, X, Y, Z)); only the excess
    counts. Then ``z_residual + ssim_weight * z_structure`` is median filtered
    (``scoring["median_size"]``^3, 0 outside the mask). Units: robust standard
    deviations.
    """
    terms = _tensor(raw).float()
    inside = _tensor(mask).to(device=terms.device, dtype=torch.bool)
    median = calibration["median"].to(device=terms.device, dtype=torch.float32)
    spread = calibration["spread"].to(device=terms.device, dtype=torch.float32)
    z = ((terms - median) / spread).clamp_min(0.0)
    value = z[..., 0, :, :, :] + float(scoring["ssim_weight"]) * z[..., 1, :, :, :]
    value = torch.where(inside, value, 0.0)
    size = int(scoring["median_size"])
    if size > 1:
        value = filters.median_filter(value, size=size, mask=inside)
    return _like(value, raw)


def focal_sigmas(scoring: dict[str, Any]) -> list[float]:
    """The focal scales of a checkpoint's scoring (one ``focal_sigma`` in older ones)."""
    sigmas = scoring.get("focal_sigmas")
    return [float(s) for s in sigmas] if sigmas else [float(scoring["focal_sigma"])]


def _median(values: torch.Tensor) -> torch.Tensor:
    """``np.median`` of ``values`` (N, M) along M: the mean of the two middle values
    for an even M, in the values' dtype."""
    m = values.shape[-1]
    low = values.kthvalue((m + 1) // 2, dim=-1).values
    if m % 2:
        return low
    return (low + values.kthvalue(m // 2 + 1, dim=-1).values) / 2


def _smoothed(maps: torch.Tensor, inside: torch.Tensor, sigma: float) -> torch.Tensor:
    """Values (N, M) inside the mask of maps (N, X, Y, Z) smoothed with ``sigma`` voxels."""
    smoothed = filters.gaussian_filter(maps, sigma=sigma) if sigma > 0 else maps
    return smoothed[:, inside]


def _centre_spread(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Median and robust SD (1.4826 * MAD) of values (N, M) along M, float64."""
    centre = _median(values)
    spread = MAD_TO_SD * _median((values - centre[:, None]).abs()).double()
    return centre.double(), spread


def _flat_maps(anomaly: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if not bool(mask.any()):
        message = "the scoring mask is empty"
        raise ValueError(message)
    maps = anomaly.reshape(-1, *anomaly.shape[-3:])
    return maps, mask.to(device=maps.device, dtype=torch.bool)


def summaries(
    anomaly: torch.Tensor,
    mask: torch.Tensor,
    *,
    sigmas: Sequence[float],
    relative: bool = False,
    floors: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal and diffuse summaries of maps (..., X, Y, Z) inside ``mask`` (bool, X, Y, Z).

    Returns ``focal`` (..., len(sigmas)) and ``diffuse`` (...), float64, on the
    maps' device; see :func:`focal_and_diffuse`. ``floors``: the smallest spread of
    the focal contrast per scale (map units; :data:`CONTRAST_FLOOR` when None).
    """
    lead = anomaly.shape[:-3]
    maps, inside = _flat_maps(anomaly, mask)
    floors = [CONTRAST_FLOOR] * len(sigmas) if floors is None else floors
    focal = []
    for sigma, floor in zip(sigmas, floors, strict=True):
        values = _smoothed(maps, inside, sigma)
        peak = values.amax(dim=1).double()
        if relative:
            centre, spread = _centre_spread(values)
            peak = (peak - centre) / spread.clamp_min(float(floor))
        focal.append(peak)
    inside_values = maps[:, inside]
    diffuse = inside_values.sum(dim=1, dtype=torch.float64) / inside_values.shape[1]
    return torch.stack(focal, dim=1).reshape(*lead, len(sigmas)), diffuse.reshape(lead)


def map_spreads(
    anomaly: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, *, sigmas: Sequence[float]
) -> list[float]:
    """Robust SD (1.4826 * MAD, map units) of one map (X, Y, Z) inside ``mask`` smoothed
    at each focal scale: the denominator of the focal contrast before its floor."""
    maps, inside = _flat_maps(_tensor(anomaly).float(), _tensor(mask))
    return [float(_centre_spread(_smoothed(maps, inside, s))[1][0]) for s in sigmas]


def contrast_floors(spreads: Sequence[Sequence[float]], *, fraction: float) -> list[float]:
    """A model's floor of the focal contrast's spread per scale: ``fraction`` of the median
    spread (:func:`map_spreads`) of its reference maps (rows: subjects; columns: scales),
    and at least :data:`CONTRAST_FLOOR`.

    A map almost empty everywhere (a subject the model reconstructs unusually well)
    would otherwise divide an ordinary peak by a near-zero spread; which maps come out
    near empty depends on the contrast (T1w maps spread 0.06-0.6, FLAIR's down to 0.03).
    """
    table = np.asarray(spreads, dtype=float)
    if table.ndim != 2 or table.shape[0] == 0:
        message = f"contrast floors need spreads of shape (subjects, scales), got {table.shape}"
        raise ValueError(message)
    return [max(CONTRAST_FLOOR, fraction * float(m)) for m in np.median(table, axis=0)]


def focal_and_diffuse(
    anomaly: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    *,
    sigmas: Sequence[float],
    relative: bool = False,
    floors: Sequence[float] | None = None,
) -> tuple[list[float], float]:
    """Summaries of one map (X, Y, Z) inside ``mask`` (higher = more anomalous).

    ``focal``: per scale, the peak of the map smoothed with a Gaussian of that
    many voxels (0: unsmoothed; truncated at 4 sigmas, borders reflected), the
    upper tail that a lesion raises; the scale that matches the lesion's size
    gives its strongest evidence. ``relative``: the peak's contrast instead,
    ``(peak - median) / max(1.4826 * MAD, floor)`` of the smoothed map inside
    ``mask`` (unitless; ``floors`` per scale, :data:`CONTRAST_FLOOR` by default),
    which a map raised everywhere (an unusual head) does not raise. ``diffuse``:
    the mean of the map, which noise, ghosting or a wrong contrast raise everywhere
    while their peaks stay ordinary.
    """
    focal, diffuse = summaries(
        _tensor(anomaly).float(), _tensor(mask), sigmas=sigmas, relative=relative, floors=floors
    )
    return [float(v) for v in focal.tolist()], float(diffuse)


def subject_summaries(
    anomaly: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    *,
    scoring: dict[str, Any],
    floors: Sequence[float] | None = None,
) -> tuple[list[float], float]:
    """:func:`focal_and_diffuse` as a checkpoint's ``scoring`` asks for it, with its
    calibration's ``floors``."""
    relative = scoring.get("focal_summary", "peak") == "contrast"
    return focal_and_diffuse(
        anomaly, mask, sigmas=focal_sigmas(scoring), relative=relative, floors=floors
    )


def robust_scale(values: Sequence[float]) -> list[float]:
    """``[median, scale]`` of reference values; the scale (1.4826 * MAD) is floored
    at 10 % of the median so a handful of similar subjects cannot make it ~0."""
    values = np.asarray(values, dtype=float)
    median = float(np.median(values))
    mad = mad_sd(values)
    return [median, max(mad, 0.1 * abs(median), 1e-6)]


def subject_score(focals: Sequence[float], diffuse: float, calibration: dict[str, Any]) -> float:
    """``anomaly_raw``: the largest of the focal (one per scale) and diffuse summaries
    as robust z against the out-of-fold reference subjects of the model's calibration
    (``calibration["focal"]``: one ``[median, scale]`` per scale, or one pair)."""
    pairs = calibration["focal"]
    pairs = pairs if isinstance(pairs[0], (list, tuple)) else [pairs]
    z = [(f - m) / s for f, (m, s) in zip(focals, pairs, strict=True)]
    z.append((diffuse - calibration["diffuse"][0]) / calibration["diffuse"][1])
    return float(max(z))


def top_regions(
    anomaly: np.ndarray,
    mask: np.ndarray,
    *,
    affine: np.ndarray,
    offset: Sequence[int],
    percentile: float,
    count: int = 3,
) -> list[dict[str, Any]]:
    """The ``count`` connected regions of highest summed anomaly (CPU, numpy arrays).

    Regions are 26-connected voxels inside ``mask`` above the ``percentile`` of
    the map inside the mask (and above 0). Each has ``centroid_mm`` (anomaly-
    weighted, MNI mm [x, y, z]), ``volume_ml``, ``peak`` (map units) and
    ``mass`` (sum of the map over the region, voxels x map units). ``offset``
    is the crop origin on the template grid (voxels).
    """
    inside = anomaly[mask]
    if inside.size == 0:
        return []
    threshold = max(float(np.percentile(inside, percentile)), 1e-6)
    labels, n = ndimage.label((anomaly > threshold) & mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return []
    # Sums over the labelled voxels only (in the array's order, as ndimage's would be).
    where = labels > 0
    label = labels[where]
    values = anomaly[where].astype(np.float64)
    mass = np.bincount(label, weights=values, minlength=n + 1)[1:]
    sizes = np.bincount(label, minlength=n + 1)[1:]
    peaks = np.full(n + 1, -np.inf)
    np.maximum.at(peaks, label, values)
    coordinates = np.nonzero(where)
    centres = (
        np.stack(
            [np.bincount(label, weights=values * c, minlength=n + 1)[1:] for c in coordinates],
            axis=1,
        )
        / mass[:, None]
    )
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    regions = []
    for i in np.argsort(-mass)[:count]:
        voxel = centres[i] + np.asarray(offset, dtype=float)
        centre = affine[:3, :3] @ voxel + affine[:3, 3]
        regions.append(
            {
                "centroid_mm": [round(float(c), 1) for c in centre],
                "volume_ml": round(float(sizes[i]) * voxel_ml, 3),
                "peak": round(float(peaks[i + 1]), 4),
                "mass": round(float(mass[i]), 3),
            }
        )
    return regions
