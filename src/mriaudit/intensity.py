"""Intensity normalisation shared by the model and the report."""

from __future__ import annotations

import numpy as np


def finite(data: np.ndarray, *, inf_to_zero: bool = True) -> np.ndarray:
    """``data`` with NaN set to 0 and infinities to 0 (or, without ``inf_to_zero``, to
    the dtype's extremes, as ``np.nan_to_num`` does).

    Returns ``data`` itself when every value is finite: the check is one pass,
    while ``np.nan_to_num`` always makes a copy (half a second for a 1 mm head).
    """
    data = np.asarray(data)
    if np.isfinite(data).all():
        return data
    if inf_to_zero:
        return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    return np.nan_to_num(data)


def normalize_intensity(
    data: np.ndarray,
    mask: np.ndarray,
    *,
    lower_percentile: float = 1.0,
    upper_percentile: float = 99.0,
) -> np.ndarray:
    """Map the robust intensity range inside ``mask`` to [0, 1].

    ``data`` and ``mask`` share one shape (any dimensionality). The given
    percentiles of the voxels inside the mask map to 0 and 1; values outside are
    clipped to [0, 1.5] above (so bright lesions keep some headroom) and 0 below.
    Voxels outside the mask are set to 0. Returns float32 of ``data``'s shape.
    A mask with no voxels or a flat image raises ``ValueError``.
    """
    if data.shape != mask.shape:
        message = f"data shape {data.shape} and mask shape {mask.shape} differ"
        raise ValueError(message)
    inside = np.asarray(data, dtype=np.float32)[mask > 0]
    inside = inside[np.isfinite(inside)]
    if inside.size == 0:
        message = "the mask selects no finite voxel: cannot normalise intensities"
        raise ValueError(message)
    low, high = np.percentile(inside, [lower_percentile, upper_percentile])
    if not high > low:
        message = (
            f"flat image inside the mask (p{lower_percentile}={low}, p{upper_percentile}={high})"
        )
        raise ValueError(message)
    scaled = (np.nan_to_num(np.asarray(data, dtype=np.float32)) - low) / (high - low)
    scaled = np.clip(scaled, 0.0, 1.5)
    scaled[mask <= 0] = 0.0
    return scaled.astype(np.float32)


#: Percentiles of the histogram landmarks (inside a mask) that
#: ``standardize_histogram`` aligns, after Nyul and Udupa's standardisation.
LANDMARK_PERCENTILES: tuple[float, ...] = (1, 2, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99)


def histogram_landmarks(data: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``LANDMARK_PERCENTILES`` of ``data`` inside ``mask`` (float64, ascending)."""
    return np.percentile(np.asarray(data, dtype=np.float64)[mask > 0], LANDMARK_PERCENTILES)


def standardize_histogram(
    data: np.ndarray, mask: np.ndarray, *, reference: np.ndarray
) -> np.ndarray:
    """Map ``data``'s histogram landmarks inside ``mask`` onto ``reference``'s.

    Piecewise linear between the landmarks (``histogram_landmarks``), extended
    beyond the end ones with the end segments' slopes, so values outside the
    usual range (a bright lesion) keep their distance from it. This removes
    global differences in tissue contrast between scanners and protocols, which
    a normative model would otherwise score as anomalies, while a lesion, a few
    per cent of the brain, barely moves the landmarks. Output as
    ``normalize_intensity``: float32, clipped to [0, 1.5], 0 outside ``mask``.
    """
    reference = np.asarray(reference, dtype=np.float64)
    if reference.shape != (len(LANDMARK_PERCENTILES),) or np.any(np.diff(reference) < 0):
        message = (
            f"reference landmarks must be {len(LANDMARK_PERCENTILES)} ascending values, "
            f"got {reference.tolist()}"
        )
        raise ValueError(message)
    values = np.asarray(data, dtype=np.float64)
    # Tied landmarks (a flat stretch of the histogram) are spread by a hair so
    # the map stays a function; a tied end segment extends with slope 1.
    own = histogram_landmarks(values, mask) + 1e-9 * np.arange(reference.size)
    mapped = np.interp(values, own, reference)
    low_slope, high_slope = (
        (ref_b - ref_a) / (own_b - own_a) if own_b - own_a > 1e-6 else 1.0
        for ref_a, ref_b, own_a, own_b in (
            (reference[0], reference[1], own[0], own[1]),
            (reference[-2], reference[-1], own[-2], own[-1]),
        )
    )
    mapped = np.where(values < own[0], reference[0] + (values - own[0]) * low_slope, mapped)
    mapped = np.where(values > own[-1], reference[-1] + (values - own[-1]) * high_slope, mapped)
    mapped = np.clip(mapped, 0.0, 1.5)
    mapped[np.asarray(mask) <= 0] = 0.0
    return mapped.astype(np.float32)
