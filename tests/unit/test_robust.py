"""The one robust location and scale."""

from __future__ import annotations

import numpy as np
import pytest

from mriaudit import robust


def test_mad_sd_estimates_a_normal_sd_whole_or_along_an_axis():
    rng = np.random.default_rng(0)
    sample = rng.normal(5.0, 2.0, size=(4, 20000)).astype(np.float32)
    assert robust.mad_sd(sample[0]) == pytest.approx(2.0, rel=0.03)
    along = robust.mad_sd(sample, axis=1)
    assert along.shape == (4,) and along.dtype == np.float32
    assert np.allclose(along, 2.0, rtol=0.03)
    # An outlier moves it by one rank, not by its size.
    spiked = np.append(sample[0], 1e9)
    assert robust.mad_sd(spiked) == pytest.approx(robust.mad_sd(sample[0]), rel=1e-3)


def test_location_scale_falls_back_when_most_values_tie():
    assert robust.location_scale(np.array([1.0, 2.0, 3.0, 4.0, 100.0])) == (3.0, 1.4826)
    median, scale = robust.location_scale(np.array([0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0]))
    assert median == 0.0 and scale == pytest.approx(robust.MEAN_AD_TO_SD * 3 / 7)
    assert robust.location_scale(np.full(6, 2.5)) == (2.5, 0.0)
