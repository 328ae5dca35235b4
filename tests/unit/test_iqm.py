"""MRIQC-style image quality metrics: formulas on phantoms, the subject stage on real anatomy."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriaudit import iqm, preprocess, records, template

# Standard deviation of Rayleigh noise whose Gaussian sigma is 1.
RAYLEIGH_STD = math.sqrt((4 - math.pi) / 2)


def _rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of ``signal`` plus complex Gaussian noise of std ``sigma`` per channel."""
    real = signal + sigma * rng.standard_normal(signal.shape)
    imag = sigma * rng.standard_normal(signal.shape)
    return np.sqrt(real**2 + imag**2).astype(np.float32)


def _ball(shape: tuple[int, ...], radius: float, centre: tuple[float, ...] | None = None):
    centre = centre or tuple((n - 1) / 2 for n in shape)
    grid = np.indices(shape, dtype=np.float32)
    dist2 = sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True))
    return dist2 <= radius**2


# --------------------------------------------------------------------------- formulas


def test_snr_and_snr_dietrich_match_the_closed_form():
    rng = np.random.default_rng(1)
    mu, sigma = 100.0, 5.0
    wm = mu + sigma * rng.standard_normal(50_000)
    air = _rician(np.zeros(200_000), sigma, rng)
    assert iqm.snr(wm) == pytest.approx(mu / sigma, rel=0.05)
    # Dietrich: the air's Rayleigh spread corrected back to the Gaussian sigma.
    assert iqm.air_sigma(air) == pytest.approx(sigma * RAYLEIGH_STD, rel=0.05)
    assert iqm.snr_dietrich(wm, sigma_air=iqm.air_sigma(air)) == pytest.approx(mu / sigma, rel=0.05)
    # Twice the noise, half the SNR.
    assert iqm.snr(mu + 2 * sigma * rng.standard_normal(50_000)) == pytest.approx(
        mu / (2 * sigma), rel=0.05
    )


def test_snr_uses_the_sample_standard_deviation():
    values = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    # median 3, sample std sqrt(2.5)
    assert iqm.snr(values) == pytest.approx(3.0 / math.sqrt(2.5))
    assert math.isnan(iqm.snr(np.array([4.0])))
    assert math.isnan(iqm.snr(np.full(10, 4.0)))


def test_cnr_matches_the_closed_form():
    rng = np.random.default_rng(2)
    sigma = 4.0
    wm = 100 + sigma * rng.standard_normal(50_000)
    gm = 70 + sigma * rng.standard_normal(50_000)
    air = _rician(np.zeros(200_000), sigma, rng)
    expected = 30.0 / math.sqrt((sigma * RAYLEIGH_STD) ** 2 + 2 * sigma**2)
    assert iqm.cnr(wm, gm, air) == pytest.approx(expected, rel=0.05)


def test_cjv_formula():
    wm = np.array([1.0, 2.0, 3.0, 4.0, 5.0])  # median 3, MAD 1
    gm = np.array([10.0, 12.0, 14.0])  # median 12, MAD 2
    scale = 1.482602218505602  # MAD -> Gaussian sigma
    assert iqm.cjv(wm, gm) == pytest.approx((1 + 2) * scale / 9)
    assert iqm.cjv(gm, wm) == pytest.approx(iqm.cjv(wm, gm))
    rng = np.random.default_rng(3)
    noisy = iqm.cjv(100 + 5 * rng.standard_normal(20_000), 70 + 5 * rng.standard_normal(20_000))
    assert noisy == pytest.approx(10 / 30, rel=0.05)
    assert iqm.cjv(wm, wm + 0.0) == math.inf


def test_summary_stats():
    values = np.arange(1, 101, dtype=np.float64)
    result = iqm.summary_stats(values)
    assert result["n"] == 100
    assert result["mean"] == pytest.approx(50.5)
    assert result["median"] == pytest.approx(50.5)
    assert result["stdv"] == pytest.approx(np.std(values))
    assert result["p05"] == pytest.approx(np.percentile(values, 5))
    assert result["p95"] == pytest.approx(np.percentile(values, 95))
    assert result["mad"] == pytest.approx(25 * 1.482602218505602)
    assert result["k"] == pytest.approx(-1.2, abs=0.01)  # uniform: excess kurtosis -6/5
    assert set(result) == set(iqm.SUMMARY_STATS)
    assert math.isnan(iqm.summary_stats(np.array([1.0]))["mean"])


def _textured_head(rng: np.random.Generator) -> np.ndarray:
    shape = (48, 48, 48)
    head = _ball(shape, 16)
    texture = ndi.gaussian_filter(rng.standard_normal(shape), 1.5)
    return np.where(head, 100 + 40 * texture, 0.0).astype(np.float32)


def test_efc_is_higher_for_ghosted_and_blurred_images():
    rng = np.random.default_rng(4)
    clean = _textured_head(rng)
    ghosted = clean + 0.25 * np.roll(clean, 24, axis=1)
    blurred = ndi.gaussian_filter(clean, 2.0)
    base = iqm.efc(clean)
    assert 0 < base < 1
    assert iqm.efc(ghosted) > base + 0.01
    assert iqm.efc(blurred) > base + 0.01
    # The maximum entropy, one for a flat image.
    assert iqm.efc(np.full((10, 10, 10), 7.0)) == pytest.approx(1.0)
    # Zero-filled padding outside the frame does not count.
    padded = np.pad(clean, 8)
    frame = np.pad(np.zeros(clean.shape, dtype=bool), 8, constant_values=True)
    assert iqm.efc(padded, frame) == pytest.approx(base)


def test_fber_closed_form_and_zero_filled_air():
    rng = np.random.default_rng(5)
    shape = (40, 40, 40)
    head = _ball(shape, 12)
    data = np.where(head, 100.0, _rician(np.zeros(shape), 2.0, rng))
    air_median = np.median(data[~head])
    assert iqm.fber(data, head) == pytest.approx(100.0**2 / air_median**2)
    assert iqm.fber(data, head) > iqm.fber(data * 1.0 + 5.0 * ~head, head)
    assert math.isnan(iqm.fber(np.where(head, 100.0, 0.0), head))


def test_qi_1_is_zero_for_pure_noise_and_catches_a_ghost():
    rng = np.random.default_rng(6)
    shape = (64, 64, 64)
    spacing = (2.0, 2.0, 2.0)
    head = _ball(shape, 12)
    signal = np.where(head, 100.0, 0.0)
    noisy = _rician(signal, 3.0, rng)
    distance = iqm.distance_mm(head, spacing)
    air = distance > iqm.HEAD_MARGIN_MM
    artifacts = iqm.artifact_mask(noisy, air, distance)
    assert iqm.qi_1(air & ~artifacts, artifacts) < 1e-3

    # A phase-encoding ghost at 30 % of the head's signal, half a FOV away.
    ghosted = _rician(signal + 0.3 * np.roll(signal, 32, axis=1), 3.0, rng)
    artifacts = iqm.artifact_mask(ghosted, air, distance)
    ghost = np.roll(head, 32, axis=1) & air
    assert iqm.qi_1(air & ~artifacts, artifacts) > 0.01
    assert np.count_nonzero(artifacts & ghost) > 0.8 * np.count_nonzero(artifacts)
    assert math.isnan(iqm.qi_1(np.zeros(3, bool), np.zeros(3, bool)))


@pytest.mark.parametrize("kernel_mm", [4.0, 7.0])
def test_fwhm_recovers_gaussian_smoothing(kernel_mm):
    rng = np.random.default_rng(7)
    spacing = (1.0, 1.25, 2.0)
    noise = rng.standard_normal((80, 72, 48)).astype(np.float32)
    smooth = ndi.gaussian_filter(noise, [kernel_mm / 2.3548 / s for s in spacing])
    mask = np.zeros(smooth.shape, dtype=bool)
    mask[8:-8, 8:-8, 6:-6] = True
    for value in iqm.fwhm(smooth, mask, spacing):
        assert value == pytest.approx(kernel_mm, rel=0.10)
    # Smoothing more raises the estimate on every axis.
    smoother = ndi.gaussian_filter(smooth, 1.0)
    assert all(
        b > a
        for a, b in zip(
            iqm.fwhm(smooth, mask, spacing), iqm.fwhm(smoother, mask, spacing), strict=True
        )
    )


def test_frame_mask_finds_padding_not_noise_zeros():
    rng = np.random.default_rng(8)
    data = rng.integers(0, 3, size=(40, 40, 40)).astype(np.float32)  # many isolated zeros
    assert not iqm.frame_mask(data).any()
    data[:, :, :6] = 0  # zero-filled slab at the border
    data[18:22, 18:22, 18:22] = 0  # zero hole inside: not the frame
    frame = iqm.frame_mask(data)
    assert frame[:, :, :5].all()
    assert not frame[19:21, 19:21, 19:21].any()
    assert not frame[:, :, 10:].any()


def test_distance_mm_is_close_to_the_exact_transform():
    shape = (60, 50, 40)
    spacing = (1.0, 1.0, 1.5)
    mask = _ball(shape, 10)
    exact = ndi.distance_transform_edt(~mask, sampling=spacing)
    approx = iqm.distance_mm(mask, spacing, step_mm=2.0)
    assert approx.shape == shape
    assert np.max(np.abs(approx - exact)) < 2.5
    assert np.all(approx[mask] == 0)


def test_partial_volume_metrics():
    crisp = np.zeros((10, 10, 10), dtype=np.float32)
    crisp[:5] = 1.0
    half = np.full((10, 10, 10), 0.5, dtype=np.float32)
    assert iqm.rpve(crisp) == 0.0
    assert iqm.rpve(half) == pytest.approx(1.0)
    assert iqm.rpve(ndi.gaussian_filter(crisp, 1.0)) > 0.05
    assert math.isnan(iqm.rpve(np.zeros(5)))
    assert iqm.fuzzy_jaccard(crisp, crisp) == pytest.approx(1.0)
    assert iqm.fuzzy_jaccard(crisp, 1 - crisp) == 0.0
    assert iqm.fuzzy_jaccard(crisp, half) == pytest.approx(250 / 750)
    fractions = iqm.volume_fractions({"csf": crisp * 0.2, "gm": crisp * 0.3, "wm": crisp * 0.5})
    assert fractions == pytest.approx({"csf": 0.2, "gm": 0.3, "wm": 0.5})


def test_segment_tissues_recovers_classes_under_noise():
    rng = np.random.default_rng(9)
    shape = (40, 40, 40)
    truth = np.zeros(shape, dtype=int)  # 0 csf, 1 gm, 2 wm, as nested shells
    truth[_ball(shape, 16)] = 1
    truth[_ball(shape, 10)] = 2
    truth[_ball(shape, 4)] = 0
    brain = _ball(shape, 18)
    means = np.array([30.0, 70.0, 100.0])
    data = (means[truth] + 6.0 * rng.standard_normal(shape)).astype(np.float32)
    onehot = np.stack([(truth == k) & brain for k in range(3)]).astype(np.float32)
    priors = np.stack([ndi.gaussian_filter(p, 2.0) for p in onehot]) + 0.05
    posteriors, fit = iqm.segment_tissues(data, brain, priors)
    assert posteriors.shape == (3, *shape)
    assert np.all(posteriors[:, ~brain] == 0)
    np.testing.assert_allclose(posteriors[:, brain].sum(axis=0), 1.0, atol=1e-4)
    labels = posteriors.argmax(axis=0)
    assert np.mean(labels[brain] == truth[brain]) > 0.95
    np.testing.assert_allclose(fit["means"], means, rtol=0.05)
    with pytest.raises(ValueError, match="brain voxels"):
        iqm.segment_tissues(data, np.zeros(shape, dtype=bool), priors)


def test_directions_and_labels_cover_every_metric():
    assert set(iqm.IQM_DIRECTIONS) == set(iqm.IQM_TITLES)
    assert set(iqm.IQM_NAMES) | {"iqm_inu_med", "iqm_inu_range"} == set(iqm.IQM_DIRECTIONS)
    assert set(iqm.IQM_DIRECTIONS.values()) <= {-1, 0, 1}
    expected = {
        "iqm_cjv": -1,
        "iqm_cnr": 1,
        "iqm_snr_wm": 1,
        "iqm_snrd_total": 1,
        "iqm_efc": -1,
        "iqm_fber": 1,
        "iqm_qi_1": -1,
        "iqm_fwhm_avg": -1,
        "iqm_rpve_gm": -1,
        "iqm_tpm_overlap_wm": 1,
        "iqm_inu_range": -1,
        "iqm_size_x": 0,
        "iqm_spacing_z": 0,
        "iqm_summary_wm_mean": 0,
        "iqm_icvs_csf": 0,
        "iqm_ghost_ratio": -1,
        "iqm_edge_anatomy": -1,
        "iqm_bg_peak": -1,
        "iqm_inu_wm_range": -1,
    }
    assert {name: iqm.IQM_DIRECTIONS[name] for name in expected} == expected
    assert iqm.IQM_TITLES["iqm_snr_wm"] == "SNR (WM)"
    assert iqm.IQM_TITLES["iqm_efc"] == "EFC"
    # Every metric that can be flagged says what its bad side usually means; descriptive ones don't.
    flaggable = {name for name, direction in iqm.IQM_DIRECTIONS.items() if direction}
    assert set(iqm.IQM_CAUSES) == flaggable
    assert iqm.IQM_CAUSES["iqm_efc"] == "ghosting or blur"
    singles, snrs, fwhms, tissue_maps, summaries, geometry = 6, 8, 4, 3 * 3, 4 * 8, 6
    artefacts, wm_bias = 3, 1  # mriaudit.artefacts; N4's field inside white matter
    assert len(iqm.IQM_NAMES) == (
        singles + snrs + fwhms + tissue_maps + summaries + geometry + artefacts + wm_bias
    )


# --------------------------------------------------------------------------- subject stage


def _to_ants(img: nib.Nifti1Image) -> ants.ANTsImage:
    """ANTs copy of a (cached, so not to be modified) nibabel image."""
    copy = nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), img.affine)
    copy.header.set_xyzt_units("mm", "sec")
    return ants.from_nibabel_nifti(copy)


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)
    return path


def _head_mask(data: np.ndarray, fraction: float) -> np.ndarray:
    """Largest component above ``fraction`` of the 99th percentile, closed and filled."""
    mask = data > fraction * np.percentile(data, 99)
    mask = ndi.binary_closing(mask, iterations=2)
    labels, count = ndi.label(mask)
    sizes = ndi.sum(mask, labels, range(1, count + 1))
    return ndi.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


@pytest.fixture(scope="module")
def template_subject(tmp_path_factory):
    """The 2 mm MNI template on a 3 mm native grid in PSL voxel order, shifted by 6 mm.

    Returns (folder, noiseless data, native affine, head mask path, transform path).
    The transform is the exact ANTs affine (MNI -> native points) of that shift.
    """
    folder = tmp_path_factory.mktemp("iqm_template")
    mni_ants = _to_ants(template.load_template(resolution=2))
    resampled = ants.resample_image(mni_ants, (3.0, 3.0, 3.0), use_voxels=False, interp_type=0)
    ras = ants.to_nibabel_nifti(resampled)
    signal = np.asarray(ras.get_fdata(dtype=np.float32)) * 1000.0
    shift_ras = np.array([6.0, -4.0, 3.0])
    affine = ras.affine.copy()
    affine[:3, 3] += shift_ras
    # Store in another voxel order (P, S, L): the stage must not depend on it.
    to_psl = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(("P", "S", "L"))
    )
    native = nib.orientations.apply_orientation(signal, to_psl)
    native_affine = affine @ nib.orientations.inv_ornt_aff(to_psl, signal.shape)
    head = _head_mask(native, 0.05).astype(np.uint8)
    head_path = _save(head, native_affine, folder / "head.nii.gz")
    transform = ants.create_ants_transform(
        transform_type="AffineTransform",
        dimension=3,
        matrix=np.eye(3),
        translation=(-shift_ras[0], -shift_ras[1], shift_ras[2]),  # LPS
    )
    transform_path = folder / "native_to_mni.mat"
    ants.write_transform(transform, str(transform_path))
    return folder, native, native_affine, head_path, transform_path, signal.shape


def _noisy_subject(template_subject, sigma: float, name: str) -> Path:
    folder, native, affine, *_ = template_subject
    rng = np.random.default_rng(int(sigma))
    return _save(_rician(native, sigma, rng), affine, folder / f"{name}.nii.gz")


def _metrics(record: dict) -> dict:
    assert record["status"] == records.OK, record
    return record["metrics"]


def test_iqm_subject_on_the_template(template_subject, tmp_path):
    _, _, _, head_path, transform_path, ras_shape = template_subject
    image = _noisy_subject(template_subject, 15.0, "noise15")
    record_path = tmp_path / "sub-01_desc-iqm_qc.json"
    record = iqm.iqm_subject(
        image, image, head_path, transform_path, record_path=record_path, upstream=[]
    )
    assert json.loads(record_path.read_text())["status"] == records.OK
    metrics = _metrics(record)
    assert record["warnings"] == []
    assert set(metrics) == set(iqm.IQM_NAMES)
    missing = [name for name, value in metrics.items() if value is None or not math.isfinite(value)]
    assert missing == []
    assert [metrics[f"iqm_size_{a}"] for a in "xyz"] == list(ras_shape)
    assert [metrics[f"iqm_spacing_{a}"] for a in "xyz"] == pytest.approx([3.0, 3.0, 3.0])
    # An exact transform: the tissue maps agree with the template's.
    assert metrics["iqm_tpm_overlap_wm"] > 0.5
    assert metrics["iqm_tpm_overlap_gm"] > 0.4
    assert metrics["iqm_summary_wm_median"] > metrics["iqm_summary_gm_median"]
    assert metrics["iqm_summary_gm_median"] > metrics["iqm_summary_csf_median"]
    assert metrics["iqm_icvs_csf"] + metrics["iqm_icvs_gm"] + metrics["iqm_icvs_wm"] == (
        pytest.approx(1.0)
    )
    assert metrics["iqm_qi_1"] < 0.01
    # Air of a magnitude image with sigma 15: Rayleigh with std 15 * 0.655.
    assert metrics["iqm_summary_bg_stdv"] == pytest.approx(15 * RAYLEIGH_STD, rel=0.15)


def test_noise_lowers_snr_and_cnr_and_raises_cjv(template_subject, tmp_path):
    _, _, _, head_path, transform_path, _ = template_subject
    results = []
    for sigma in (10.0, 30.0, 60.0):
        image = _noisy_subject(template_subject, sigma, f"noise{int(sigma)}")
        record = iqm.iqm_subject(
            image,
            image,
            head_path,
            transform_path,
            record_path=tmp_path / f"{int(sigma)}.json",
            upstream=[],
        )
        results.append(_metrics(record))
    for name in ("iqm_snr_wm", "iqm_snr_gm", "iqm_snr_total", "iqm_snrd_wm", "iqm_cnr", "iqm_fber"):
        values = [m[name] for m in results]
        assert values[0] > values[1] > values[2], (name, values)
    for name in ("iqm_cjv", "iqm_efc", "iqm_summary_bg_stdv"):
        values = [m[name] for m in results]
        assert values[0] < values[1] < values[2], (name, values)


def test_without_registration_the_other_metrics_remain(template_subject, tmp_path):
    _, _, _, head_path, _, _ = template_subject
    image = _noisy_subject(template_subject, 15.0, "noreg")
    missing = tmp_path / "xfm.mat"  # a failed registration leaves no transform
    record = iqm.iqm_subject(
        image, image, head_path, missing, record_path=tmp_path / "r.json", upstream=[]
    )
    metrics = _metrics(record)
    assert any("no tissue segmentation" in w for w in record["warnings"])
    kept = ["iqm_efc", "iqm_fber", "iqm_qi_1", "iqm_fwhm_avg", "iqm_size_x", "iqm_spacing_z"]
    kept += [f"iqm_summary_bg_{stat}" for stat in iqm.SUMMARY_STATS]
    assert all(math.isfinite(metrics[name]) for name in kept)
    undefined = ("iqm_cjv", "iqm_snr_wm", "iqm_cnr", "iqm_rpve_gm", "iqm_summary_wm_mean")
    assert all(math.isnan(metrics[name]) for name in undefined)
    # The record on disk is valid JSON with nulls for the undefined metrics.
    written = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert set(written) == set(iqm.IQM_NAMES)
    assert all(written[name] is None for name in undefined)


def test_a_transform_that_misses_the_head_gives_no_segmentation(template_subject, tmp_path):
    _, _, _, head_path, _, _ = template_subject
    image = _noisy_subject(template_subject, 15.0, "offset")
    far = ants.create_ants_transform(
        transform_type="AffineTransform", dimension=3, matrix=np.eye(3), translation=(0, 0, 400)
    )
    far_path = tmp_path / "far.mat"
    ants.write_transform(far, str(far_path))
    record = iqm.iqm_subject(
        image, image, head_path, far_path, record_path=tmp_path / "r.json", upstream=[]
    )
    metrics = _metrics(record)
    assert any("no tissue segmentation" in w for w in record["warnings"])
    assert math.isnan(metrics["iqm_snr_wm"])
    assert math.isfinite(metrics["iqm_efc"])


def test_unreadable_or_mismatched_images_fail_with_a_reason(template_subject, tmp_path):
    _, native, affine, head_path, transform_path, _ = template_subject
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    record = iqm.iqm_subject(
        broken, broken, head_path, transform_path, record_path=tmp_path / "a.json", upstream=[]
    )
    assert record["status"] == records.FAILED
    assert "cannot read" in record["reason"]
    small = _save(native[::2, ::2, ::2].copy(), affine, tmp_path / "small.nii.gz")
    record = iqm.iqm_subject(
        small, small, head_path, transform_path, record_path=tmp_path / "b.json", upstream=[]
    )
    assert record["status"] == records.FAILED
    assert "grids differ" in record["reason"]


def test_upstream_failure_skips_the_stage(template_subject, tmp_path):
    _, _, _, head_path, transform_path, _ = template_subject
    upstream = tmp_path / "register.json"
    records.write_json(upstream, records.make_record("register", status="failed", reason="boom"))
    record = iqm.iqm_subject(
        head_path,
        head_path,
        head_path,
        transform_path,
        record_path=tmp_path / "r.json",
        upstream=[upstream],
    )
    assert record["status"] == records.FAILED
    assert record["reason"] == "boom"
    assert record["metrics"] == {}


# --------------------------------------------------------------------------- real brain


@dataclass(frozen=True)
class RealBrain:
    """A real 1 mm T1 (with face and neck) in canonical RAS order, and its affine to MNI."""

    data: np.ndarray
    affine: np.ndarray
    head_path: Path
    transform: Path
    folder: Path


@pytest.fixture(scope="module")
def real_brain(shared_data, tmp_path_factory) -> RealBrain:
    folder = tmp_path_factory.mktemp("real_brain")
    source = shared_data / "nifti" / "niivue" / "otsu_T1.nii.gz"
    img = nib.as_closest_canonical(nib.load(source))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    head_path = _save(_head_mask(data, 0.15).astype(np.uint8), img.affine, folder / "head.nii.gz")
    # Affine registration of a 2 mm copy (the transform lives in mm, so it holds for
    # the 1 mm grid); the template is brain only, so its brain mask guides the metric.
    mni = _to_ants(template.load_template(resolution=2))
    brain = _to_ants(template.load_brain_mask(resolution=2))
    moving = ants.resample_image(ants.image_read(str(source)), (2.0, 2.0, 2.0), interp_type=0)
    # One ITK thread, as the rules run it: on all cores the registration can converge
    # elsewhere when the machine is busy (a CI run lost the CSF segmentation that way).
    with preprocess.ants_environment(threads=1):
        registration = ants.registration(
            fixed=mni,
            moving=moving,
            type_of_transform="Affine",
            mask=ants.iMath(brain, "MD", 4),
            random_seed=1,
            outprefix=str(folder / "reg_"),
        )
    transform = Path(registration["fwdtransforms"][0])
    return RealBrain(data, img.affine, head_path, transform, folder)


def _strictly_increasing(results: list[dict], name: str) -> None:
    values = [m[name] for m in results]
    assert all(a < b for a, b in itertools.pairwise(values)), (name, values)


def _strictly_decreasing(results: list[dict], name: str) -> None:
    values = [m[name] for m in results]
    assert all(a > b for a, b in itertools.pairwise(values)), (name, values)


@pytest.mark.shared
def test_real_brain_noise_is_monotonic(real_brain, tmp_path):
    """Rician noise of sigma 0, 6 and 15 (the image's WM is about 100)."""
    results = []
    for sigma in (0.0, 6.0, 15.0):
        data = real_brain.data
        noisy = _rician(data, sigma, np.random.default_rng(11)) if sigma else data
        image = _save(noisy, real_brain.affine, tmp_path / f"t1_{int(sigma)}.nii.gz")
        metrics, warnings, details = iqm.compute_iqms(
            image, image, real_brain.head_path, real_brain.transform
        )
        assert warnings == [], warnings
        assert 900 < details["segmentation"]["brain_volume_ml"] < 2000
        results.append(metrics)
    base = results[0]
    assert base["iqm_tpm_overlap_wm"] > 0.4
    assert base["iqm_summary_wm_median"] > base["iqm_summary_gm_median"]
    assert base["iqm_summary_gm_median"] > base["iqm_summary_csf_median"]
    assert 2 < base["iqm_fwhm_avg"] < 6
    for name in ("iqm_snr_wm", "iqm_snr_gm", "iqm_snr_total", "iqm_snrd_wm", "iqm_cnr"):
        _strictly_decreasing(results, name)
    for name in ("iqm_cjv", "iqm_summary_bg_stdv", "iqm_rpve_wm"):
        _strictly_increasing(results, name)


@pytest.mark.shared
def test_real_brain_bias_field_is_monotonic(real_brain, tmp_path):
    """A smooth multiplicative field exp(s * ramp) at s = 0.3, 0.6, 0.9, through the N4 stage.

    The brain is first N4-corrected, so that the added field is its only bias. The
    ramp (a linear gradient plus a cross term over the field of view) spans about
    -1.6..1.6. N4 removes most of a field; what it leaves in the image raises CJV
    (computed, as MRIQC does, on the corrected image), and the estimated field's
    spread raises ``inu_range``. Both level off beyond s = 0.9 on this brain.
    """

    def n4(data: np.ndarray, name: str) -> tuple[Path, Path, dict]:
        raw = _save(data, real_brain.affine, tmp_path / f"{name}.nii.gz")
        corrected, mask = tmp_path / f"{name}_n4.nii.gz", tmp_path / f"{name}_mask.nii.gz"
        record = preprocess.bias_correct_subject(
            raw,
            out_image=corrected,
            out_mask=mask,
            record_path=tmp_path / f"{name}.json",
            upstream=[],
        )
        assert record["status"] == records.OK, record
        return corrected, mask, record["metrics"]

    flat_path, _, _ = n4(real_brain.data, "original")
    flat = np.asarray(nib.load(flat_path).get_fdata(dtype=np.float32))
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in flat.shape], indexing="ij")
    ramp = 0.7 * x + 0.5 * z + 0.4 * y * z
    results = []
    for strength in (0.3, 0.6, 0.9):
        name = f"bias{int(strength * 10)}"
        biased = (flat * np.exp(strength * ramp)).astype(np.float32)
        corrected, mask, n4_metrics = n4(biased, name)
        raw = tmp_path / f"{name}.nii.gz"
        metrics, warnings, _ = iqm.compute_iqms(raw, corrected, mask, real_brain.transform)
        assert warnings == [], warnings
        results.append({**metrics, **n4_metrics})
    _strictly_increasing(results, "iqm_inu_range")
    _strictly_increasing(results, "iqm_inu_wm_range")
    _strictly_increasing(results, "iqm_cjv")
    _strictly_decreasing(results, "iqm_cnr")


def _nyquist_ghost(data: np.ndarray, phase_rad: float, *, axis: int) -> np.ndarray:
    """Magnitude image whose odd phase-encode lines carry a phase error ``phase_rad``.

    That is the N/2 (Nyquist) ghost: a copy shifted by half the field of view with
    amplitude ``|sin(phase_rad / 2)|`` of the object, and the object scaled by
    ``|cos(phase_rad / 2)|``.
    """
    kspace = np.fft.fft(data, axis=axis)
    odd = [slice(None)] * data.ndim
    odd[axis] = slice(1, None, 2)
    kspace[tuple(odd)] *= np.exp(1j * phase_rad)
    return np.abs(np.fft.ifft(kspace, axis=axis)).astype(np.float32)


@pytest.mark.shared
def test_real_brain_ghosting_is_monotonic(real_brain, tmp_path):
    """N/2 ghosts along anterior-posterior with phase errors of 0.6, 0.9 and 1.2 rad.

    The field of view is padded to 518 mm along A-P (noise sigma 2 in the new air),
    so that the half-FOV ghost lands in the air instead of on the head: that is where
    ``qi_1`` looks for it. Ghost amplitudes are 0.30, 0.43 and 0.56 of the object.
    (Padded to only 358 mm, the ghost partly overlaps the head, and at 1.0 rad the head
    mask takes it in: qi_1 then falls again. A limit of QI1, not of this implementation.)
    """
    pad = 140
    padded = np.pad(real_brain.data, [(0, 0), (pad, pad), (0, 0)])
    affine = real_brain.affine.copy()
    affine[:3, 3] -= affine[:3, 1] * pad
    clean = _rician(padded, 2.0, np.random.default_rng(5))
    results = []
    for phase in (0.0, 0.6, 0.9, 1.2):
        ghosted = _nyquist_ghost(clean, phase, axis=1) if phase else clean
        image = _save(ghosted, affine, tmp_path / f"ghost{int(phase * 10)}.nii.gz")
        head = preprocess.head_mask(ghosted, spacing_mm=(1.0, 1.0, 1.0)).astype(np.uint8)
        head_path = _save(head, affine, tmp_path / f"head{int(phase * 10)}.nii.gz")
        metrics, warnings, _ = iqm.compute_iqms(image, image, head_path, real_brain.transform)
        assert warnings == [], warnings
        results.append(metrics)
    assert results[0]["iqm_qi_1"] < 1e-3
    assert results[-1]["iqm_qi_1"] > 0.05
    _strictly_increasing(results, "iqm_efc")
    _strictly_increasing(results, "iqm_qi_1")
    _strictly_decreasing(results, "iqm_fber")
    # The ghost band shifted by N/2 along the phase axis holds the ghost (mriaudit.artefacts).
    _strictly_increasing(results, "iqm_ghost_ratio")
    assert results[1]["iqm_ghost_ratio"] > 5 * max(results[0]["iqm_ghost_ratio"], 0.01)


def test_images_kept_in_memory_give_the_same_iqms(template_subject):
    """The preprocess job hands the IQMs the N4 image and head mask in memory: the same
    metrics as from their files, and the kept (shared, read-only) arrays untouched."""
    _, _, _, head_path, transform_path, _ = template_subject
    image = _noisy_subject(template_subject, 20.0, "kept20")
    from_files, warnings, _ = iqm.compute_iqms(image, image, head_path, transform_path)
    handoff = preprocess.Handoff()
    _, n4 = preprocess.load_volume(image, handoff=handoff)
    mask = handoff.keep(head_path, nib.load(head_path), np.asarray(nib.load(head_path).dataobj))
    before = n4.copy()
    kept, kept_warnings, _ = iqm.compute_iqms(
        image, image, head_path, transform_path, handoff=handoff
    )
    assert kept_warnings == warnings
    assert kept.keys() == from_files.keys()
    for name, value in from_files.items():
        assert kept[name] == pytest.approx(value, rel=1e-9, nan_ok=True), name
    np.testing.assert_array_equal(n4, before)
    assert not n4.flags.writeable and not mask.data.flags.writeable
    handoff.keep(head_path, nib.load(head_path), np.zeros((3, 3, 3), np.uint8))
    with pytest.raises(records.StageError, match="grids differ"):
        iqm.compute_iqms(image, image, head_path, transform_path, handoff=handoff)


#: The IQMs beside a registration, as the preprocess job runs them: in run_chain's child
#: (a fresh process, whose stages fork), the native measures in a child of their own.
NATIVE_BESIDE = """
import json, os, signal, sys
from pathlib import Path
import nibabel as nib, numpy as np
from mriaudit import chain, iqm, preprocess, records
from mriaudit.iqm import beside as iqm_beside

image, head, transform, folder = map(Path, sys.argv[1:5])


def run_iqm(name, break_native="", fail_after_start=False):
    handoff = preprocess.Handoff()
    native = iqm.NativeMeasures(image, image, head, handoff=handoff)

    def n4():  # keeps its images, as the N4 stage does, and starts the native measures
        preprocess.load_volume(image, handoff=handoff)
        handoff.keep(head, nib.load(head), np.asarray(nib.load(head).dataobj))
        if break_native == "raise":
            iqm_beside.native_measures = lambda *args: 1 / 0
        elif break_native == "crash":
            iqm_beside.native_measures = lambda *args: os.kill(os.getpid(), signal.SIGSEGV)
        native.start()
        if fail_after_start:  # the IQM stage is skipped: its started child is waited for
            raise records.StageError("no head")
        return records.make_record("n4")

    n4_record, iqm_record = folder / f"{name}_n4.json", folder / f"{name}_iqm.json"
    steps = [
        chain.Step("n4", lambda: records.run_stage("n4", n4, record_path=n4_record), n4_record),
        chain.Step(
            "iqm",
            lambda: iqm.iqm_subject(
                image, image, head, transform, record_path=iqm_record, upstream=[n4_record],
                handoff=handoff, beside=native,
            ),
            iqm_record,
        ),
    ]
    return chain.run_chain(steps)["iqm"]


beside = run_iqm("beside")
broken = run_iqm("broken", break_native="raise")
crashed = run_iqm("crashed", break_native="crash")
skipped = run_iqm("skipped", fail_after_start=True)
metrics, warnings, _ = iqm.compute_iqms(image, image, head, transform)
print(json.dumps({"beside": beside, "broken": broken, "crashed": crashed, "skipped": skipped,
                  "here": metrics, "warnings": warnings}))
"""


def test_native_measures_beside_the_registration_equal_those_computed_in_line(
    template_subject, tmp_path
):
    _, _, _, head_path, transform_path, _ = template_subject
    image = _noisy_subject(template_subject, 25.0, "beside25")
    package = str(Path(iqm.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([package, os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-c", NATIVE_BESIDE, str(image), str(head_path)]
    command += [str(transform_path), str(tmp_path)]
    result = json.loads(
        subprocess.run(command, check=True, env=env, capture_output=True, text=True).stdout
    )
    beside, here = result["beside"], result["here"]
    assert beside["status"] == "ok" and beside["warnings"] == result["warnings"]
    assert beside["details"]["beside_registration"]["cpu_s"] > 0  # it did run in a child
    for name, value in here.items():
        assert beside["metrics"][name] == pytest.approx(value, rel=1e-9, nan_ok=True), name
    broken = result["broken"]
    assert broken["status"] == "failed"
    assert broken["reason"] == "iqm: ZeroDivisionError: division by zero"
    crashed = result["crashed"]
    assert crashed["status"] == "failed"
    assert crashed["reason"] == "iqm: crashed (killed by SIGSEGV) beside the registration"
    skipped = result["skipped"]
    assert skipped["status"] == "failed" and skipped["skipped"] and skipped["reason"] == "no head"
