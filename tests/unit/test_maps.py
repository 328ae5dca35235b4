"""The torch map maths equal the scipy implementation they replaced, within stated tolerances.

The reference here is the scoring code as it was before it moved to torch
(scipy.ndimage filters, numpy), kept verbatim in this file. Tolerances:

- max/min and median filters, the calibrated map from one raw map, and the
  regions of one map: exactly equal (selections and the same float32 operations).
- Gaussian filters: float32 rounding, at most 1e-6 of the volume's largest value
  (scipy sums in float64 and rounds; the torch matrices sum in float32).
- local SSIM: its variances are differences of Gaussian moments (``E[a^2] -
  E[a]^2``), where float32 loses digits in flat regions: scipy's float32 SSIM is
  itself up to ~2e-4 off exact arithmetic. The torch SSIM is held to the same
  accuracy (at most twice scipy's error against a float64 computation) and to
  5e-4 of scipy's.
- maps end to end: the SSIM difference divided by the calibration's spread
  (times the SSIM weight) bounds the map difference (the z is linear, the
  median 1-Lipschitz); subject metrics agree to 1e-4 relative.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
import torch
from scipy import ndimage

from mriaudit.intensity import normalize_intensity
from mriaudit.model import filters, maps
from mriaudit.model.data import brain_grid
from mriaudit.model.score import DEFAULT_SCORING
from mriaudit.robust import mad_sd
from mriaudit.template import load_template

SCORING = dict(DEFAULT_SCORING)
LESION_VOXEL = (30, 40, 45)  # on the crop: left white matter


# --- the scipy reference (the scoring code before torch) -----------------------------


def ref_local_ssim(a: np.ndarray, b: np.ndarray, *, sigma: float, dtype=np.float32) -> np.ndarray:
    c1, c2 = 0.01**2, 0.03**2
    a = a.astype(dtype)
    b = b.astype(dtype)

    def blur(v: np.ndarray) -> np.ndarray:
        return ndimage.gaussian_filter(v, sigma, truncate=2.5)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a * mu_a
    var_b = blur(b * b) - mu_b * mu_b
    cov = blur(a * b) - mu_a * mu_b
    numerator = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    denominator = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return numerator / denominator


def ref_tolerant_residual(volume: np.ndarray, recon: np.ndarray, *, tolerance: int) -> np.ndarray:
    if tolerance <= 0:
        return np.abs(volume - recon)
    size = 2 * tolerance + 1
    high = ndimage.maximum_filter(recon, size=size)
    low = ndimage.minimum_filter(recon, size=size)
    return np.maximum(volume - high, 0.0) + np.maximum(low - volume, 0.0)


def ref_raw_map(volume: np.ndarray, recon: np.ndarray, *, scoring: dict[str, Any]) -> np.ndarray:
    residual = ref_tolerant_residual(volume, recon, tolerance=int(scoring.get("tolerance", 0)))
    structure = np.clip(1.0 - ref_local_ssim(volume, recon, sigma=scoring["ssim_sigma"]), 0.0, 2.0)
    return np.stack([residual, structure]).astype(np.float32)


def ref_calibration_stats(maps_: Sequence[np.ndarray], mask: np.ndarray, *, floor: float) -> dict:
    stack = np.stack(maps_, axis=0).astype(np.float32)
    median = np.median(stack, axis=0)
    spread = mad_sd(stack, axis=0)
    spread = ndimage.gaussian_filter(spread, (0, 1.5, 1.5, 1.5))
    median = ndimage.gaussian_filter(median, (0, 0.5, 0.5, 0.5))
    for term in range(spread.shape[0]):
        values = stack[:, term][:, mask]
        base = float(np.std(values)) if values.size else 1.0
        spread[term] = np.maximum(spread[term], max(floor * base, 1e-3))
    return {
        "median": torch.from_numpy(median.astype(np.float16)),
        "spread": torch.from_numpy(spread.astype(np.float16)),
    }


def ref_calibrated_map(raw, calibration, mask, *, scoring) -> np.ndarray:
    median = calibration["median"].float().numpy()
    spread = calibration["spread"].float().numpy()
    z = np.maximum((raw - median) / spread, 0.0)
    value = z[0] + float(scoring["ssim_weight"]) * z[1]
    value = np.where(mask, value, 0.0).astype(np.float32)
    size = int(scoring["median_size"])
    if size > 1:
        value = ndimage.median_filter(value, size=size, mode="constant")
    value[~mask] = 0.0
    return value


def ref_focal_and_diffuse(anomaly, mask, *, sigmas, relative=False, floors=None):
    floors = floors or [maps.CONTRAST_FLOOR] * len(sigmas)
    focals = []
    for sigma, floor in zip(sigmas, floors, strict=True):
        values = (ndimage.gaussian_filter(anomaly, sigma) if sigma > 0 else anomaly)[mask]
        peak = float(values.max())
        if relative:
            centre = float(np.median(values))
            spread = mad_sd(values)
            peak = (peak - centre) / max(spread, floor)
        focals.append(peak)
    return focals, float(anomaly[mask].mean())


def ref_top_regions(anomaly, mask, *, affine, offset, percentile, count=3):
    inside = anomaly[mask]
    if inside.size == 0:
        return []
    threshold = max(float(np.percentile(inside, percentile)), 1e-6)
    labels, n = ndimage.label((anomaly > threshold) & mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    mass = ndimage.sum_labels(anomaly, labels, index)
    sizes = ndimage.sum_labels(np.ones_like(anomaly), labels, index)
    peaks = ndimage.maximum(anomaly, labels, index)
    centres = ndimage.center_of_mass(anomaly, labels, index)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    regions = []
    for i in np.argsort(-np.asarray(mass))[:count]:
        voxel = np.asarray(centres[i], dtype=float) + np.asarray(offset, dtype=float)
        centre = affine[:3, :3] @ voxel + affine[:3, 3]
        regions.append(
            {
                "centroid_mm": [round(float(c), 1) for c in centre],
                "volume_ml": round(float(sizes[i]) * voxel_ml, 3),
                "peak": round(float(peaks[i]), 4),
                "mass": round(float(mass[i]), 3),
            }
        )
    return regions


# --- realistic arrays ------------------------------------------------------------------


def _head(rng: np.random.Generator, *, blob: bool = False) -> np.ndarray:
    """A demo-like head on the 2 mm crop, normalised as scoring sees it: the template
    under a smooth deformation (about a voxel) with Rician noise; ``blob`` plants a
    bright 8 mm sphere in the white matter."""
    grid = brain_grid(2)
    data = np.asarray(load_template(resolution=2).get_fdata(), dtype=np.float32)
    coords = np.indices(data.shape, dtype=np.float32)
    for axis in range(3):
        coarse = rng.normal(0.0, 0.7, (4, 5, 4))
        coords[axis] += ndimage.zoom(coarse, np.array(data.shape) / coarse.shape, order=1)
    image = ndimage.map_coordinates(data, coords, order=1).astype(np.float32)
    if blob:
        centre = np.array(LESION_VOXEL) + np.array([a for a, _ in grid.crop])
        distance = np.linalg.norm((np.indices(data.shape).T - centre).T, axis=0) * 2.0
        weight = np.clip(8.0 - distance + 0.5, 0.0, 1.0)
        image = image * (1 - weight) + 1.6 * np.median(image[grid.mask]) * weight
    sigma = 0.02 * np.percentile(image, 99)
    image = np.sqrt(
        (image + rng.normal(0, sigma, data.shape)) ** 2 + rng.normal(0, sigma, data.shape) ** 2
    )
    return normalize_intensity(image.astype(np.float32), grid.mask)[grid.index]


@pytest.fixture(scope="module")
def cohort() -> dict[str, Any]:
    """An atlas (the undeformed template: a reconstruction that is off by about a voxel),
    three normal heads, a calibration from their raw maps, and a head with a blob."""
    rng = np.random.default_rng(3)
    grid = brain_grid(2)
    template = np.asarray(load_template(resolution=2).get_fdata(), dtype=np.float32)
    atlas = normalize_intensity(template, grid.mask)[grid.index]
    mask = maps.scoring_mask(grid, erode_voxels=int(SCORING["erode_voxels"]))
    normals = [_head(rng) for _ in range(3)]
    raws = [maps.raw_map(v, atlas, scoring=SCORING) for v in normals]
    calibration = maps.calibration_stats(raws, mask, floor=float(SCORING["spread_floor"]))
    return {
        "grid": grid,
        "atlas": atlas,
        "mask": mask,
        "normals": normals,
        "raws": raws,
        "calibration": calibration,
        "lesion": _head(rng, blob=True),
    }


# --- filters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "sigma", "truncate"),
    [
        ((80, 96, 78), 1.0, 2.5),  # the SSIM window
        ((80, 96, 78), 3.0, 4.0),  # the focal scales
        ((80, 96, 78), 4.5, 4.0),
        ((80, 96, 78), 6.0, 4.0),
        ((20, 24, 18), (1.5, 0.0, 0.5), 4.0),  # per axis, one left alone
        ((5, 7, 3), 6.0, 4.0),  # a window wider than the volume: reflected again and again
    ],
)
def test_gaussian_filter_equals_scipy_to_float32_rounding(shape, sigma, truncate):
    rng = np.random.default_rng(0)
    volume = np.abs(ndimage.gaussian_filter(rng.normal(size=shape), 1.0)).astype(np.float32)
    expected = ndimage.gaussian_filter(volume, sigma, truncate=truncate)
    got = filters.gaussian_filter(torch.from_numpy(volume), sigma=sigma, truncate=truncate)
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-6 * volume.max())
    batch = torch.from_numpy(np.stack([volume, 2 * volume]))
    batched = filters.gaussian_filter(batch, sigma=sigma, truncate=truncate).numpy()
    np.testing.assert_allclose(batched[1], 2 * expected, rtol=0, atol=2e-6 * volume.max())


@pytest.mark.parametrize("size", [1, 3, 5])
def test_max_and_min_filters_equal_scipy_exactly(size):
    """ndimage's ``reflect`` border puts only voxels of the window itself into it, so
    cutting the window at the border is the same filter."""
    rng = np.random.default_rng(1)
    volume = np.round(rng.normal(size=(17, 12, 9)), 1).astype(np.float32)  # with ties
    tensor = torch.from_numpy(volume)
    maxed = filters.maximum_filter(tensor, size=size).numpy()
    mined = filters.minimum_filter(tensor, size=size).numpy()
    np.testing.assert_array_equal(maxed, ndimage.maximum_filter(volume, size=size))
    np.testing.assert_array_equal(mined, ndimage.minimum_filter(volume, size=size))


@pytest.mark.parametrize("size", [3, 5])
def test_median_filter_equals_scipy_exactly(size):
    rng = np.random.default_rng(2)
    volume = np.clip(rng.normal(size=(2, 21, 16, 11)), 0, None).astype(np.float32)  # many zeros
    mask = rng.random(volume.shape[1:]) > 0.3
    full = filters.median_filter(torch.from_numpy(volume), size=size).numpy()
    inside = filters.median_filter(
        torch.from_numpy(volume), size=size, mask=torch.from_numpy(mask)
    ).numpy()
    for i in range(2):
        expected = ndimage.median_filter(volume[i], size=size, mode="constant")
        np.testing.assert_array_equal(full[i], expected)
        np.testing.assert_array_equal(inside[i], np.where(mask, expected, 0.0))


def test_median_of_an_even_count_is_refused():
    with pytest.raises(ValueError, match="odd"):
        filters.median_of([torch.zeros(3)] * 4)


# --- maps ------------------------------------------------------------------------------


def test_raw_map_equals_scipy(cohort):
    volume, atlas = cohort["lesion"], cohort["atlas"]
    got = maps.raw_map(volume, atlas, scoring=SCORING)
    expected = ref_raw_map(volume, atlas, scoring=SCORING)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_array_equal(got[0], expected[0])  # the tolerant residual
    exact = ref_local_ssim(volume, atlas, sigma=SCORING["ssim_sigma"], dtype=np.float64)
    scipy_error = np.abs(1.0 - exact - expected[1]).max()
    torch_error = np.abs(1.0 - exact - got[1]).max()
    assert torch_error <= 2 * scipy_error
    np.testing.assert_allclose(got[1], expected[1], rtol=0, atol=5e-4)


def test_calibration_stats_equal_scipy_to_float16(cohort):
    got = cohort["calibration"]
    expected = ref_calibration_stats(cohort["raws"], cohort["mask"], floor=SCORING["spread_floor"])
    for key in ("median", "spread"):
        assert got[key].dtype == torch.float16 and got[key].shape == expected[key].shape
        # float16 keeps 11 bits: a float32 rounding can move the last one.
        np.testing.assert_allclose(got[key].float(), expected[key].float(), rtol=1e-3, atol=1e-7)


def test_calibrated_map_equals_scipy_exactly_on_one_raw_map(cohort):
    raw = ref_raw_map(cohort["lesion"], cohort["atlas"], scoring=SCORING)
    calibration, mask = cohort["calibration"], cohort["mask"]
    expected = ref_calibrated_map(raw, calibration, mask, scoring=SCORING)
    np.testing.assert_array_equal(
        maps.calibrated_map(raw, calibration, mask, scoring=SCORING), expected
    )
    batch = torch.from_numpy(np.stack([raw, raw]))
    batched = maps.calibrated_map(batch, calibration, torch.from_numpy(mask), scoring=SCORING)
    np.testing.assert_array_equal(batched[1].numpy(), expected)


@pytest.mark.parametrize("relative", [False, True])
def test_summaries_equal_numpy(cohort, relative):
    raw = ref_raw_map(cohort["lesion"], cohort["atlas"], scoring=SCORING)
    anomaly = ref_calibrated_map(raw, cohort["calibration"], cohort["mask"], scoring=SCORING)
    sigmas = [0.0, *SCORING["focal_sigmas"]]
    focal, diffuse = maps.focal_and_diffuse(
        anomaly, cohort["mask"], sigmas=sigmas, relative=relative
    )
    ref_focal, ref_diffuse = ref_focal_and_diffuse(
        anomaly, cohort["mask"], sigmas=sigmas, relative=relative
    )
    np.testing.assert_allclose(focal, ref_focal, rtol=1e-5)
    assert diffuse == pytest.approx(ref_diffuse, rel=1e-6)
    batched, diffuses = maps.summaries(
        torch.from_numpy(np.stack([anomaly, anomaly])),
        torch.from_numpy(cohort["mask"]),
        sigmas=sigmas,
        relative=relative,
    )
    assert batched.shape == (2, len(sigmas)) and diffuses.shape == (2,)
    np.testing.assert_allclose(batched[1].numpy(), focal, rtol=1e-6)
    # A model's own floors replace CONTRAST_FLOOR where they are higher.
    floors = [1.0] * len(sigmas)
    floored, _ = maps.focal_and_diffuse(
        anomaly, cohort["mask"], sigmas=sigmas, relative=relative, floors=floors
    )
    ref_floored, _ = ref_focal_and_diffuse(
        anomaly, cohort["mask"], sigmas=sigmas, relative=relative, floors=floors
    )
    np.testing.assert_allclose(floored, ref_floored, rtol=1e-5)
    if relative:
        assert max(floored) < max(focal)


def test_map_spreads_are_the_contrast_denominator(cohort):
    raw = ref_raw_map(cohort["lesion"], cohort["atlas"], scoring=SCORING)
    anomaly = ref_calibrated_map(raw, cohort["calibration"], cohort["mask"], scoring=SCORING)
    sigmas = [0.0, 2.0]
    expected = [
        mad_sd((ndimage.gaussian_filter(anomaly, s) if s > 0 else anomaly)[cohort["mask"]])
        for s in sigmas
    ]
    np.testing.assert_allclose(
        maps.map_spreads(anomaly, cohort["mask"], sigmas=sigmas), expected, rtol=1e-5
    )


def test_contrast_floors_keep_an_almost_empty_normal_map_below_a_lesion():
    """A map the model reconstructs unusually well is almost empty: its ordinary peak over
    its own tiny spread rivalled a lesion's contrast under the fixed floor (the demo's
    FLAIR). The model's floor, half its reference maps' median spread, ranks them."""
    rng = np.random.default_rng(3)
    shape, mask = (24, 24, 24), np.ones((24, 24, 24), bool)
    sigmas = [1.5]
    references = [
        np.abs(8.0 * ndimage.gaussian_filter(rng.normal(0.0, 1.0, shape), 1.0)).astype(np.float32)
        for _ in range(6)
    ]
    spreads = [maps.map_spreads(m, mask, sigmas=sigmas) for m in references]
    floors = maps.contrast_floors(spreads, fraction=0.5)
    assert floors[0] == pytest.approx(0.5 * np.median(spreads), rel=1e-9)
    assert floors[0] > maps.CONTRAST_FLOOR

    def ball(radius):
        return np.linalg.norm(np.indices(shape) - 12, axis=0) <= radius

    empty = np.zeros(shape, np.float32)
    empty[ball(2)] = 1.5  # one ordinary residual, nothing else
    lesion = references[0].copy()
    lesion[ball(3)] += 3.0

    def contrast(anomaly, floors):
        return maps.focal_and_diffuse(anomaly, mask, sigmas=sigmas, relative=True, floors=floors)

    assert contrast(empty, None)[0][0] > contrast(lesion, None)[0][0]
    assert contrast(empty, floors)[0][0] < contrast(lesion, floors)[0][0]
    # The absolute floor stays under a model's floor; bad input says what it needs.
    assert maps.contrast_floors([[0.001]], fraction=0.5) == [maps.CONTRAST_FLOOR]
    with pytest.raises(ValueError, match="subjects, scales"):
        maps.contrast_floors([], fraction=0.5)


def test_subject_metrics_and_map_equal_the_scipy_scoring(cohort):
    """End to end, from a volume and its reconstruction to the subject's metrics."""
    calibration = dict(cohort["calibration"], focal=[[1.0, 0.5]] * 3, diffuse=[0.3, 0.1])
    mask = cohort["mask"]
    for volume in [*cohort["normals"][:1], cohort["lesion"]]:
        raw = ref_raw_map(volume, cohort["atlas"], scoring=SCORING)
        expected = ref_calibrated_map(raw, calibration, mask, scoring=SCORING)
        got = maps.calibrated_map(
            maps.raw_map(volume, cohort["atlas"], scoring=SCORING),
            calibration,
            mask,
            scoring=SCORING,
        )
        # The SSIM's 5e-4 through the z of the structural term bounds the map's difference.
        spread = float(calibration["spread"][1].float().min())
        bound = SCORING["ssim_weight"] * 5e-4 / spread
        assert np.abs(got - expected).max() <= bound
        assert np.mean(np.abs(got - expected)[mask] <= 1e-3) > 0.99
        relative = SCORING["focal_summary"] == "contrast"
        sigmas = SCORING["focal_sigmas"]
        ref = ref_focal_and_diffuse(expected, mask, sigmas=sigmas, relative=relative)
        new = maps.subject_summaries(got, mask, scoring=SCORING)
        np.testing.assert_allclose(new[0], ref[0], rtol=1e-4)
        assert new[1] == pytest.approx(ref[1], rel=1e-4)
        assert maps.subject_score(*new, calibration) == pytest.approx(
            maps.subject_score(*ref, calibration), rel=1e-4
        )
    # The blob is what stands out.
    peak = np.unravel_index(np.argmax(got), got.shape)
    assert np.linalg.norm(np.subtract(peak, LESION_VOXEL)) <= 4


def test_top_regions_equal_ndimage_exactly(cohort):
    raw = ref_raw_map(cohort["lesion"], cohort["atlas"], scoring=SCORING)
    anomaly = ref_calibrated_map(raw, cohort["calibration"], cohort["mask"], scoring=SCORING)
    grid = cohort["grid"]
    for percentile in (99.5, 95.0):
        options = {
            "affine": grid.affine,
            "offset": [a for a, _ in grid.crop],
            "percentile": percentile,
            "count": 5,
        }
        regions = maps.top_regions(anomaly, cohort["mask"], **options)
        assert regions == ref_top_regions(anomaly, cohort["mask"], **options)
        assert len(regions) == 5
