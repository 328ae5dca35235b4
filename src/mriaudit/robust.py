"""The project's robust location and scale: median and MAD as a standard deviation.

Every robust z of the audit (``mriaudit.audit``, ``mriaudit.aggregate``) and of
the model (voxelwise calibration, focal contrast, subject-score calibration)
uses these. ``MAD_TO_SD`` turns a median absolute deviation into an SD for
normal data. The IQM formulas of ``mriaudit.iqm.metrics`` follow MRIQC and use
``scipy.stats.median_abs_deviation`` (scale "normal") as part of a metric's
definition, not as the audit's scale.
"""

from __future__ import annotations

import numpy as np

#: MAD and mean absolute deviation of a normal distribution, as multiples of its SD.
MAD_TO_SD = 1.4826
MEAN_AD_TO_SD = 1.2533


def mad_sd(values: np.ndarray, *, axis: int | None = None) -> np.ndarray | float:
    """``MAD_TO_SD * median(|x - median(x)|)`` of ``values`` over ``axis`` (all values
    when None, returned as a float; else an array without that axis)."""
    x = np.asarray(values)  # the caller's precision: float32 maps stay float32
    if axis is None:
        centre = float(np.median(x))
        return MAD_TO_SD * float(np.median(np.abs(x - centre)))
    centre = np.median(x, axis=axis, keepdims=True)
    return MAD_TO_SD * np.median(np.abs(x - centre), axis=axis)


def location_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD-based SD of ``values`` (n,): ``1.4826 * MAD`` (an SD for normal
    data), or the mean absolute deviation scaled to an SD when more than half the
    values tie (MAD 0). 0 for constant values."""
    median = float(np.median(values))
    deviation = np.abs(values - median)
    scale = MAD_TO_SD * float(np.median(deviation))
    if scale <= 0:
        scale = MEAN_AD_TO_SD * float(np.mean(deviation))
    return median, scale
