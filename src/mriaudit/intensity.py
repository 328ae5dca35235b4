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
