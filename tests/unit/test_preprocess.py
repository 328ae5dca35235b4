"""preprocess: head mask, N4 bias correction and affine registration to MNI152.

The images are the nilearn MNI152 template (real anatomy, skull-stripped) on its
2 mm grid, given a synthetic skull and scalp so that it looks like a head, and
moved, biased, re-oriented or replaced by noise as each test needs.
"""

from __future__ import annotations

import faulthandler
import gzip
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import ants
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mriaudit import chain, paths, preprocess, records, template

PAD = 8  # voxels of background around the template brain (16 mm at 2 mm)
TO_LPS = np.diag([-1.0, -1.0, 1.0])


# ---------------------------------------------------------------------------
# Synthetic images


def _padded_template() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Template T1, brain mask and WM prior on the 2 mm grid grown by PAD voxels; and its affine."""
    tpl = template.load_template(resolution=2)
    affine = tpl.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, PAD)
    pad = ((PAD, PAD),) * 3
    brain = np.pad(template.load_brain_mask(resolution=2).get_fdata() > 0, pad)
    wm = np.pad(template.load_tissue_priors(resolution=2)["wm"].get_fdata(), pad)
    return np.pad(tpl.get_fdata(dtype=np.float32), pad), brain, wm, affine


@pytest.fixture(scope="module")
def head() -> dict[str, np.ndarray]:
    """A T1-like head: template brain, dark skull (2-6 mm) and bright scalp (6-10 mm out).

    Background holds faint Rician-like noise. Keys: data, affine, brain, wm
    (white-matter probability), head (true head extent).
    """
    t1, brain, wm, affine = _padded_template()
    distance = ndi.distance_transform_edt(~brain, sampling=2.0)
    skull = (distance > 2) & (distance <= 6)
    scalp = (distance > 6) & (distance <= 10)
    data = 1000.0 * t1
    data[skull] = 60.0
    data[scalp] = 800.0
    rng = np.random.default_rng(0)
    noise = np.hypot(rng.normal(0, 15, data.shape), rng.normal(0, 15, data.shape))
    data = np.where(distance <= 10, data + rng.normal(0, 10, data.shape), noise)
    return {
        "data": data.astype(np.float32),
        "affine": affine,
        "brain": brain,
        "wm": wm,
        "head": distance <= 10,
    }


def _rigid(
    angles_deg: tuple[float, float, float], shift_mm: tuple[float, float, float]
) -> np.ndarray:
    """4x4 rotation about x, y, z (in that order) followed by a shift, RAS mm."""
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx
    matrix[:3, 3] = shift_mm
    return matrix


def _moved(data: np.ndarray, affine: np.ndarray, motion: np.ndarray) -> np.ndarray:
    """Image on the same grid whose content at world point y is ``data`` at ``motion @ y``."""
    voxels = np.indices(data.shape).reshape(3, -1)
    world = affine[:3, :3] @ voxels + affine[:3, 3:4]
    source = np.linalg.inv(affine) @ motion @ np.vstack([world, np.ones(world.shape[1])])
    moved = ndi.map_coordinates(data, source[:3], order=1, mode="constant", cval=0.0)
    return moved.reshape(data.shape).astype(np.float32)


def _reoriented(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Same image, voxel axes permuted and flipped, affine adjusted (same world content)."""
    orientation = np.array(
        [[2, -1], [0, 1], [1, -1]]
    )  # axis 0 -> 2 flipped, 1 -> 0, 2 -> 1 flipped
    new_data = nib.orientations.apply_orientation(data, orientation)
    new_affine = affine @ nib.orientations.inv_ornt_aff(orientation, data.shape)
    return np.ascontiguousarray(new_data), new_affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _ok_record(folder: Path, stage: str = "convert") -> Path:
    path = folder / f"{stage}.json"
    records.write_json(path, records.make_record(stage))
    return path


def _bias_correct(folder: Path, source: Path, *, threads: int = 1) -> dict:
    """The N4 stage on ``source``: ``n4.nii.gz``, ``head.nii.gz`` and ``n4.json`` in ``folder``."""
    return preprocess.bias_correct_subject(
        source,
        out_image=folder / "n4.nii.gz",
        out_mask=folder / "head.nii.gz",
        record_path=folder / "n4.json",
        upstream=[_ok_record(folder)],
        threads=threads,
    )


def _register(folder: Path, image: Path, upstream: Path) -> tuple[dict, dict[str, Path]]:
    outputs = {
        "out_image": folder / "reg.nii.gz",
        "out_mask": folder / "brain.nii.gz",
        "out_transform": folder / "xfm.mat",
    }
    record = preprocess.register_subject(
        image,
        **outputs,
        record_path=folder / "register.json",
        upstream=[upstream],
        threads=2,
        resolution=2,
    )
    return record, outputs


def _landmarks_lps() -> np.ndarray:
    """Template-space landmarks (LPS mm): brain centre and points 40 mm away on each axis."""
    brain = template.load_brain_mask(resolution=2)
    centre = brain.affine[:3, :3] @ np.argwhere(brain.get_fdata() > 0).mean(axis=0)
    centre += brain.affine[:3, 3]
    offsets = np.vstack([np.zeros(3), 40 * np.eye(3), -40 * np.eye(3)])
    return (TO_LPS @ (centre + offsets).T).T


def _map(transform: Path, points_lps: np.ndarray) -> np.ndarray:
    tx = ants.read_transform(str(transform))
    return np.array([tx.apply_to_point(tuple(p)) for p in points_lps])


# ---------------------------------------------------------------------------
# Pure helpers


def test_otsu_threshold_splits_two_modes():
    rng = np.random.default_rng(1)
    sample = np.concatenate([rng.normal(10, 2, 5000), rng.normal(100, 10, 2000)])
    assert 20 < preprocess.otsu_threshold(sample) < 80
    assert preprocess.otsu_threshold(np.full(10, 3.0)) == 3.0
    with pytest.raises(ValueError, match="finite"):
        preprocess.otsu_threshold(np.array([np.nan]))


def test_head_mask_covers_head_and_not_background(head):
    mask = preprocess.head_mask(head["data"], spacing_mm=(2.0, 2.0, 2.0))
    truth = head["head"]
    assert mask.dtype == bool and mask.shape == truth.shape
    # The dark skull between brain and scalp belongs to the head.
    assert mask[truth].mean() > 0.99
    far = ndi.distance_transform_edt(~truth, sampling=2.0) > 4
    assert mask[far].mean() < 0.01


def test_head_mask_handles_anisotropic_and_empty_images(head):
    thick = head["data"][:, :, ::3]  # 6 mm "slices"
    mask = preprocess.head_mask(thick, spacing_mm=(2.0, 2.0, 6.0))
    truth = head["head"][:, :, ::3]
    assert mask[truth].mean() > 0.97 and mask[~truth].mean() < 0.05
    assert not preprocess.head_mask(np.zeros((20, 20, 20)), spacing_mm=(1, 1, 1)).any()
    assert not preprocess.head_mask(np.full((20, 20, 20), 7.0), spacing_mm=(1, 1, 1)).any()
    with pytest.raises(ValueError, match="spacing"):
        preprocess.head_mask(np.zeros((4, 4, 4)), spacing_mm=(1, 0, 1))
    with pytest.raises(ValueError, match="3D"):
        preprocess.head_mask(np.zeros((4, 4)), spacing_mm=(1, 1, 1))


def test_block_sample_and_upsample_reproduce_a_linear_field():
    shape = (31, 20, 17)
    i, j, k = np.indices(shape)
    ramp = 0.5 * i - 0.25 * j + 0.1 * k + 3
    samples, inside = preprocess.block_sample(ramp, (3, 4, 1))
    assert samples.shape == (11, 5, 17) and inside.all()
    # Block j is sampled at voxel j * factor + (factor - 1) // 2.
    assert samples[0, 0, 0] == pytest.approx(0.5 * 1 - 0.25 * 1 + 0.1 * 0 + 3)
    assert samples[2, 3, 5] == ramp[7, 13, 5]
    back = preprocess.block_upsample(samples, (3, 4, 1), shape)
    # Exact between the outermost sampled voxels (the last block is padded by repetition).
    assert np.allclose(back[1:28, 1:18], ramp[1:28, 1:18])


def test_block_sample_leaves_out_voxels_outside_the_mask():
    data = np.arange(8.0).reshape(2, 2, 2)
    mask = np.ones((2, 2, 2), dtype=bool)
    mask[0, 0, 0] = False
    samples, inside = preprocess.block_sample(data, (2, 2, 2), mask=mask)
    assert samples.shape == (1, 1, 1) and samples.item() == 0.0 and not inside.item()
    samples, inside = preprocess.block_sample(data, (1, 2, 2), mask=mask)
    assert samples.ravel().tolist() == [0.0, 4.0] and inside.ravel().tolist() == [False, True]


def test_bias_field_stats_follow_mriqc_definitions():
    field = np.linspace(0.5, 1.5, 1001).reshape(7, 11, 13)
    mask = np.ones(field.shape, dtype=bool)
    stats = preprocess.bias_field_stats(field, mask)
    assert stats["iqm_inu_med"] == pytest.approx(1.0)
    assert stats["n4_p05"] == pytest.approx(0.55)
    assert stats["n4_p95"] == pytest.approx(1.45)
    assert stats["iqm_inu_range"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="mask"):
        preprocess.bias_field_stats(field, ~mask)


def test_similarity_helpers():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(30, 30, 30))
    mask = np.ones(a.shape, dtype=bool)
    assert preprocess.masked_correlation(a, 3 * a + 1, mask) == pytest.approx(1.0)
    assert preprocess.masked_correlation(a, -a, mask) == pytest.approx(-1.0)
    assert np.isnan(preprocess.masked_correlation(a, np.ones_like(a), mask))
    b = rng.normal(size=a.shape)
    assert preprocess.mutual_information(a, a**2) > 5 * preprocess.mutual_information(a, b)
    assert preprocess.mutual_information(a, np.zeros_like(a)) == 0.0
    assert preprocess.is_flat(np.zeros((5, 5, 5)))
    assert preprocess.is_flat(np.full((5, 5, 5), np.nan))
    assert not preprocess.is_flat(a)
    assert preprocess.affine_scale(np.diag([2.0, 1.0, 0.5, 1.0])) == pytest.approx(1.0)


def test_registration_problems_thresholds():
    assert preprocess.registration_problems(similarity=0.55, scale=0.8) == []
    assert "low similarity" in preprocess.registration_problems(similarity=0.1, scale=0.8)[0]
    assert (
        "opposite contrast to T1w"
        in preprocess.registration_problems(similarity=-0.5, scale=0.8)[0]
    )
    assert "scale" in preprocess.registration_problems(similarity=0.55, scale=0.4)[0]
    assert "scale" in preprocess.registration_problems(similarity=0.55, scale=1.9)[0]
    assert "constant" in preprocess.registration_problems(similarity=np.nan, scale=1.0)[0]


def test_registration_problems_of_a_t2():
    def problems(similarity: float) -> list[str]:
        return preprocess.registration_problems(similarity=similarity, scale=0.8, contrast="T2w")

    assert problems(0.25) == []
    assert "low similarity" in problems(0.1)[0]
    assert "opposite contrast to T2w" in problems(-0.45)[0]
    with pytest.raises(ValueError, match="unknown contrast 'PD'"):
        preprocess.contrast_check("PD")


def test_registration_problems_of_a_flair_leave_its_correlation_alone():
    # Neither sign of its correlation with the T1 template says a FLAIR is wrong.
    for similarity in (-0.4, 0.0, 0.2, np.nan):
        assert (
            preprocess.registration_problems(
                similarity=similarity, scale=0.8, information=0.14, contrast="FLAIR"
            )
            == []
        )
    problems = preprocess.registration_problems(
        similarity=np.nan, scale=1.9, information=0.01, contrast="FLAIR"
    )
    assert "no anatomy" in problems[0] and "scale" in problems[1] and len(problems) == 2


def test_similarity_mask_leaves_out_the_brain_rim_for_t2():
    # A ball of radius 20 mm on a 2 mm grid: the T2 check keeps the ball of 14 mm.
    grid = np.indices((31, 31, 31)) - 15
    ball = (grid**2).sum(axis=0) <= 10**2
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    assert np.array_equal(preprocess.similarity_mask(ball, affine, contrast="T1w"), ball)
    inner = preprocess.similarity_mask(ball, affine, contrast="T2w")
    radius_vox = np.sqrt((grid[:, inner] ** 2).sum(axis=0))
    assert inner.sum() > 0 and np.all(inner <= ball)
    assert 12.0 <= 2.0 * radius_vox.max() <= 14.5


def test_ants_image_keeps_nibabel_geometry():
    affine = _rigid((20.0, -5.0, 35.0), (-90.0, 12.0, 40.0)) @ np.diag([0.9, 1.1, 3.0, 1.0])
    data, affine = _reoriented(np.zeros((6, 7, 8), dtype=np.float32), affine)
    image = preprocess.ants_image(data, affine)
    for index in [(0, 0, 0), (5, 1, 3), (2, 6, 7)]:
        expected = TO_LPS @ (affine[:3, :3] @ np.array(index) + affine[:3, 3])
        point = ants.transform_index_to_physical_point(image, index)
        assert np.allclose(point, expected, atol=1e-3)
        ours = preprocess.physical_points(image, np.array(index, dtype=float)[:, None])
        assert np.allclose(ours[:, 0], expected, atol=1e-3)
    with pytest.raises(ValueError, match="shape"):
        preprocess.physical_points(image, np.zeros(3))
    assert image.shape == data.shape


def test_load_volume_squeezes_and_rejects(tmp_path):
    affine = np.diag([1.0, 2.0, 3.0, 1.0])
    four = np.stack([np.full((4, 5, 6), v, np.float32) for v in (1.0, 2.0)], axis=-1)
    four[0, 0, 0, 0] = np.nan
    image, data = preprocess.load_volume(_save(tmp_path / "4d.nii.gz", four, affine))
    assert data.shape == (4, 5, 6) and data.dtype == np.float32
    assert data[0, 0, 0] == 0.0 and data[1, 1, 1] == 1.0  # first volume, NaN set to 0
    assert preprocess.voxel_sizes(image.affine) == (1.0, 2.0, 3.0)
    single = _save(tmp_path / "single.nii.gz", four[..., :1], affine)
    assert preprocess.load_volume(single)[1].shape == (4, 5, 6)
    with pytest.raises(records.StageError, match="not a 3D image"):
        preprocess.load_volume(_save(tmp_path / "2d.nii.gz", four[:, :, 0, 0], affine))
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(records.StageError, match=r"cannot read broken\.nii\.gz"):
        preprocess.load_volume(broken)


def test_candidate_centres_see_past_a_long_neck(head):
    # Grow the field of view 80 mm downwards and fill it with a bright neck.
    data = np.pad(head["data"], ((0, 0), (0, 0), (40, 0)))
    affine = head["affine"].copy()
    affine[:3, 3] -= affine[:3, :3] @ np.array([0, 0, 40])
    brain = np.pad(head["brain"], ((0, 0), (0, 0), (40, 0)))
    centre = np.argwhere(brain).mean(axis=0)
    i, j = np.indices(data.shape[:2])
    neck = (i - centre[0]) ** 2 + (j - centre[1] - 5) ** 2 < 25**2
    data[..., :50][neck] = 700.0
    brain_centre = TO_LPS @ (affine[:3, :3] @ centre + affine[:3, 3])
    brain_points = np.argwhere(brain)
    brain_top_to_centre = 2.0 * (brain_points[:, 2].max() - centre[2])

    centres = preprocess.candidate_centres(
        preprocess.ants_image(data, affine), brain_top_to_centre_mm=brain_top_to_centre
    )

    assert set(centres) == {"com", "top", "mid"}
    assert np.linalg.norm(centres["top"] - brain_centre) < 10.0
    # The intensity centre of mass sinks towards the neck; "mid" lies between.
    assert centres["com"][2] < brain_centre[2] - 15.0
    assert centres["com"][2] < centres["mid"][2] < centres["top"][2]


# ---------------------------------------------------------------------------
# N4


def _log_bias(shape: tuple[int, ...]) -> np.ndarray:
    """A smooth log bias field: about 1.5x from one side of the head to the other."""
    x, y, z = np.indices(shape) / max(shape)
    return 0.8 * (x - 0.5) - 0.6 * (z - 0.5) + 1.2 * (y - 0.5) ** 2


def _true_inu_range(head: dict[str, np.ndarray]) -> float:
    log_bias = _log_bias(head["data"].shape)[head["head"]]
    field = np.exp(log_bias - log_bias.mean())
    return float(np.percentile(field, 95) - np.percentile(field, 5))


def test_n4_removes_a_multiplicative_bias_and_keeps_geometry(head, tmp_path):
    data, affine = head["data"], head["affine"]
    bias = np.exp(_log_bias(data.shape)).astype(np.float32)
    # An oblique, permuted voxel order: the output must keep it exactly.
    oblique = _rigid((0.0, 12.0, -8.0), (3.0, -4.0, 5.0)) @ affine
    biased, biased_affine = _reoriented(data * bias, oblique)
    wm, _ = _reoriented(head["wm"] > 0.9, oblique)
    source = _save(tmp_path / "T1w.nii.gz", biased, biased_affine)
    out, mask_path = tmp_path / "n4.nii.gz", tmp_path / "head.nii.gz"

    record = _bias_correct(tmp_path, source, threads=2)

    assert record["status"] == "ok", record
    corrected, head_mask = nib.load(str(out)), nib.load(str(mask_path))
    for image in (corrected, head_mask):
        assert image.shape == biased.shape
        assert np.allclose(image.affine, biased_affine, atol=1e-5)
    assert corrected.get_data_dtype() == np.float32
    assert head_mask.get_data_dtype() == np.uint8

    def cv(values: np.ndarray) -> float:
        return float(values[wm].std() / values[wm].mean())

    before, after = cv(biased), cv(corrected.get_fdata())
    assert after < 0.5 * before, (before, after)
    # The field N4 found (input / output) follows the one applied.
    inside = _reoriented(head["head"], oblique)[0]
    found = np.log(biased[inside] / corrected.get_fdata()[inside])
    applied = _reoriented(_log_bias(data.shape), oblique)[0][inside]
    assert np.corrcoef(found, applied)[0, 1] > 0.75
    # The corrected image keeps the intensity level of the input.
    assert np.median(corrected.get_fdata()[wm]) == pytest.approx(np.median(biased[wm]), rel=0.15)
    metrics = record["metrics"]
    assert metrics["iqm_inu_range"] == pytest.approx(metrics["n4_p95"] - metrics["n4_p05"])
    assert 0.5 * _true_inu_range(head) < metrics["iqm_inu_range"] < 1.5 * _true_inu_range(head)
    assert 0.9 < metrics["iqm_inu_med"] < 1.1
    assert head_mask.get_fdata()[inside].mean() > 0.99


def test_n4_of_an_unbiased_image_finds_a_flat_field(head, tmp_path):
    # On a 4 mm grid to stay quick; the head has no bias at all.
    coarse = ndi.zoom(head["data"], 0.5, order=1)
    affine = head["affine"] @ np.diag([2.0, 2.0, 2.0, 1.0])
    source = _save(tmp_path / "T1w.nii.gz", coarse.astype(np.float32), affine)
    record = _bias_correct(tmp_path, source)
    assert record["status"] == "ok"
    # N4 takes some anatomy for bias, but far less than a real bias field.
    assert record["metrics"]["iqm_inu_range"] < 0.5 * _true_inu_range(head)


def test_n4_of_an_empty_image_fails_with_a_reason(tmp_path):
    source = _save(tmp_path / "T1w.nii.gz", np.zeros((30, 30, 30), np.float32), np.eye(4))
    out = tmp_path / "n4.nii.gz"
    record = _bias_correct(tmp_path, source)
    assert record["status"] == "failed"
    assert "empty" in record["reason"]
    assert not out.exists()  # no image-shaped placeholder
    assert records.read_record(tmp_path / "n4.json")["status"] == "failed"

    # The registration that depends on it is skipped with the same reason.
    skipped, outputs = _register(tmp_path, out, tmp_path / "n4.json")
    assert skipped["status"] == "failed" and skipped.get("skipped")
    assert not any(path.exists() for path in outputs.values())


# ---------------------------------------------------------------------------
# Registration


MOTION = _rigid((10.0, -4.0, 6.0), (8.0, -5.0, 6.0))


@pytest.fixture(scope="module")
def moved_head(head, tmp_path_factory) -> dict:
    """The head moved by ~12 degrees and ~11 mm, registered once for several tests.

    The process's temporary folder is pointed at an empty ``scratch`` folder
    during the run, to see what ANTs leaves there.
    """
    folder = tmp_path_factory.mktemp("moved")
    data = _moved(head["data"], head["affine"], MOTION)
    source = _save(folder / "n4.nii.gz", data, head["affine"])
    upstream = _ok_record(folder, "n4")
    scratch = folder / "scratch"
    scratch.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tempfile, "tempdir", str(scratch))
        patch.setenv("TMPDIR", str(scratch))
        patch.delenv("ANTS_RANDOM_SEED", raising=False)
        record, outputs = _register(folder, source, upstream)
        left = sorted(scratch.iterdir())
        settings = (tempfile.tempdir, os.environ.get("TMPDIR"), os.environ.get("ANTS_RANDOM_SEED"))
    return {
        "data": data,
        "source": source,
        "record": record,
        "left_in_tmp": left,
        "settings_after": settings,
        "scratch": str(scratch),
        **outputs,
    }


def test_registration_recovers_a_known_rigid_motion(moved_head):
    record = moved_head["record"]
    assert record["status"] == "ok" and record["findings"] == [], record
    tpl = template.load_template(resolution=2)
    registered = nib.load(str(moved_head["out_image"]))
    assert registered.shape == tpl.shape
    assert np.allclose(registered.affine, tpl.affine)
    assert registered.get_data_dtype() == np.float32
    brain = template.load_brain_mask(resolution=2).get_fdata() > 0
    assert preprocess.masked_correlation(registered.get_fdata(), tpl.get_fdata(), brain) > 0.95
    assert record["metrics"]["reg_similarity"] > 0.95
    assert record["metrics"]["reg_scale"] == pytest.approx(1.0, abs=0.05)
    # The transform maps template points onto where the motion put them.
    landmarks = _landmarks_lps()
    inverse = np.linalg.inv(MOTION)
    expected = np.array(
        [TO_LPS @ (inverse[:3, :3] @ TO_LPS @ p + inverse[:3, 3]) for p in landmarks]
    )
    error = np.linalg.norm(_map(moved_head["out_transform"], landmarks) - expected, axis=1)
    assert error.max() < 2.0, error
    mask = nib.load(str(moved_head["out_mask"]))
    assert mask.get_data_dtype() == np.uint8
    assert np.array_equal(mask.get_fdata() > 0, brain)


def test_registration_ignores_the_voxel_order(moved_head, tmp_path):
    data, affine = _reoriented(moved_head["data"], nib.load(str(moved_head["source"])).affine)
    source = _save(tmp_path / "n4.nii.gz", data, affine)
    record, outputs = _register(tmp_path, source, _ok_record(tmp_path, "n4"))
    assert record["status"] == "ok" and record["findings"] == []
    assert record["metrics"]["reg_similarity"] == pytest.approx(
        moved_head["record"]["metrics"]["reg_similarity"], abs=0.01
    )
    landmarks = _landmarks_lps()
    difference = _map(outputs["out_transform"], landmarks) - _map(
        moved_head["out_transform"], landmarks
    )
    assert np.linalg.norm(difference, axis=1).max() < 1.0
    first = nib.load(str(moved_head["out_image"])).get_fdata()
    second = nib.load(str(outputs["out_image"])).get_fdata()
    assert np.corrcoef(first.ravel(), second.ravel())[0, 1] > 0.99


def test_a_header_turned_by_a_wrong_patient_position_is_found_and_undone(moved_head, tmp_path):
    # Supine scanned, prone entered: the header turns the head 180 degrees about S-I.
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ nib.load(str(moved_head["source"])).affine
    source = _save(tmp_path / "n4.nii.gz", moved_head["data"], affine)
    record, outputs = _register(tmp_path, source, _ok_record(tmp_path, "n4"))
    assert record["status"] == "ok"
    assert record["findings"] == ["header_orientation"], record
    assert "180 degrees about the superior axis" in record["warnings"][0]
    assert record["metrics"]["reg_similarity"] > 0.95
    first = nib.load(str(moved_head["out_image"])).get_fdata()
    second = nib.load(str(outputs["out_image"])).get_fdata()
    assert np.corrcoef(first.ravel(), second.ravel())[0, 1] > 0.99


@pytest.mark.parametrize("kind", ["empty", "noise"])
def test_a_hopeless_image_is_a_finding_not_a_crash(kind, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setenv("TMPDIR", str(scratch))
    rng = np.random.default_rng(3)
    data = np.zeros((48, 48, 40), np.float32) if kind == "empty" else rng.random((48, 48, 40))
    affine = np.diag([3.0, 3.0, 3.5, 1.0])
    affine[:3, 3] = [-70, -90, -60]
    source = _save(tmp_path / "n4.nii.gz", data.astype(np.float32), affine)

    record, outputs = _register(tmp_path, source, _ok_record(tmp_path, "n4"))

    assert record["status"] == "ok"
    assert "registration_failed" in record["findings"]
    assert any(line.startswith("registration_failed: ") for line in record["warnings"])
    tpl = template.load_template(resolution=2)
    assert nib.load(str(outputs["out_image"])).shape == tpl.shape
    assert ants.read_transform(str(outputs["out_transform"])).type == "AffineTransform"
    if kind == "empty":
        assert "empty" in record["warnings"][0]
        assert record["metrics"]["reg_similarity"] is None
    # ANTs' temporaries went into a private folder that is gone; settings are restored.
    assert list(scratch.iterdir()) == []
    assert tempfile.tempdir == str(scratch)


def test_registration_leaves_no_temporary_files(moved_head):
    assert moved_head["left_in_tmp"] == []
    assert moved_head["settings_after"] == (moved_head["scratch"], moved_head["scratch"], None)
    assert moved_head["out_transform"].stat().st_size > 0


@pytest.mark.shared
@pytest.mark.parametrize(
    "scan",
    [
        "nifti/niivue/otsu_T1.nii.gz",  # 3D T1, 1 mm, with face and neck
        # 2D sagittal T1 of a prone patient (4.8 mm slices, voxel axes P, S, R)
        "dicom/dcm_qa_decubitus/Ref_regenerated/t1_fl2d_sag_20220407151756.nii",
    ],
)
def test_real_brain_is_bias_corrected_and_registered(scan, shared_data, tmp_path):
    source = shared_data / scan
    n4_image, n4_record = tmp_path / "n4.nii.gz", tmp_path / "n4.json"
    record = _bias_correct(tmp_path, source, threads=2)
    assert record["status"] == "ok"
    assert np.allclose(nib.load(str(n4_image)).affine, nib.load(str(source)).affine)
    assert 0.05 < record["metrics"]["iqm_inu_range"] < 1.0
    record, _ = _register(tmp_path, n4_image, n4_record)
    assert record["status"] == "ok" and record["findings"] == [], record
    assert record["metrics"]["reg_similarity"] > preprocess.CONTRAST_CHECKS["T1w"].min_similarity
    low, high = preprocess.SCALE_RANGE
    assert low < record["metrics"]["reg_scale"] < high


# ---------------------------------------------------------------------------
# A real brain: accuracy, orientation invariance and bias removal

#: Rotations up to 15 degrees and shifts up to 10 mm (about x, y, z; RAS mm).
REAL_MOTION = _rigid((12.0, -15.0, 9.0), (10.0, -7.0, 9.0))
REAL_PAD = 24  # voxels of air added around the real head, so the motion keeps it in view


@pytest.fixture(scope="module")
def real_head(shared_data, tmp_path_factory) -> dict:
    """otsu_T1 (1 mm, with face and neck), padded, N4-corrected and registered once."""
    folder = tmp_path_factory.mktemp("real_head")
    img = nib.as_closest_canonical(nib.load(shared_data / "nifti" / "niivue" / "otsu_T1.nii.gz"))
    data = np.pad(img.get_fdata(dtype=np.float32), REAL_PAD)
    affine = img.affine.copy()
    affine[:3, 3] -= affine[:3, :3] @ np.full(3, REAL_PAD)
    raw = _save(folder / "raw.nii.gz", data, affine)
    n4_image, n4_record = folder / "n4.nii.gz", folder / "n4.json"
    record = _bias_correct(folder, raw, threads=2)
    assert record["status"] == "ok", record
    registered, outputs = _register(folder, n4_image, n4_record)
    assert registered["status"] == "ok" and registered["findings"] == [], registered
    corrected = nib.load(str(n4_image)).get_fdata(dtype=np.float32)
    return {"data": corrected, "affine": affine, "folder": folder, **outputs}


def _register_copy(folder: Path, data: np.ndarray, affine: np.ndarray) -> tuple[dict, dict]:
    folder.mkdir()
    source = _save(folder / "n4.nii.gz", data, affine)
    return _register(folder, source, _ok_record(folder, "n4"))


@pytest.mark.shared
def test_real_brain_moved_rigidly_comes_back_within_a_millimetre(real_head, tmp_path):
    moved = _moved(real_head["data"], real_head["affine"], REAL_MOTION)
    record, outputs = _register_copy(tmp_path / "moved", moved, real_head["affine"])
    assert record["status"] == "ok" and record["findings"] == [], record
    # Where the template's landmarks land in the moved head, against where the
    # motion put the points the unmoved head's registration found.
    landmarks = _landmarks_lps()
    found = _map(outputs["out_transform"], landmarks)
    unmoved = _map(real_head["out_transform"], landmarks)
    inverse = np.linalg.inv(REAL_MOTION)
    expected = np.array([TO_LPS @ (inverse[:3, :3] @ TO_LPS @ p + inverse[:3, 3]) for p in unmoved])
    error = np.linalg.norm(found - expected, axis=1)
    assert error.mean() < 1.0 and error.max() < 2.0, error


@pytest.mark.shared
def test_real_brain_registers_alike_in_four_orientations(real_head, tmp_path):
    """Stored axial (as read), sagittal and coronal; and with a prone-flipped header."""
    data, affine = real_head["data"], real_head["affine"]
    variants = {}
    for name, axes in {"sagittal": ("A", "S", "L"), "coronal": ("L", "S", "P")}.items():
        turn = nib.orientations.ornt_transform(
            nib.orientations.io_orientation(affine), nib.orientations.axcodes2ornt(axes)
        )
        variants[name] = (
            np.ascontiguousarray(nib.orientations.apply_orientation(data, turn)),
            affine @ nib.orientations.inv_ornt_aff(turn, data.shape),
        )
    # A supine head whose header says prone: the anatomy is turned 180 degrees about S-I.
    variants["prone"] = (data, np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine)
    brain = template.load_brain_mask(resolution=2).get_fdata() > 0
    images = {"axial": nib.load(str(real_head["out_image"])).get_fdata()}
    for name, (variant, variant_affine) in variants.items():
        record, outputs = _register_copy(tmp_path / name, variant, variant_affine)
        expected = ["header_orientation"] if name == "prone" else []
        assert record["status"] == "ok" and record["findings"] == expected, (name, record)
        images[name] = nib.load(str(outputs["out_image"])).get_fdata()
    for name, image in images.items():
        correlation = preprocess.masked_correlation(images["axial"], image, brain)
        assert correlation > 0.98, (name, correlation)


def _white_matter(real_head: dict, shape: tuple[int, ...]) -> np.ndarray:
    """Confident white matter: the template's WM prior > 0.98 carried onto the head, eroded."""
    prior = template.load_tissue_priors(resolution=2)["wm"]
    fixed = ants.image_read(str(real_head["folder"] / "n4.nii.gz"))
    moving = preprocess.ants_image(prior.get_fdata(dtype=np.float32), prior.affine)
    warped = ants.apply_transforms(
        fixed=fixed,
        moving=moving,
        transformlist=[str(real_head["out_transform"])],
        whichtoinvert=[True],
    ).numpy()
    assert warped.shape == shape
    return ndi.binary_erosion(warped > 0.98)


@pytest.mark.shared
def test_n4_takes_a_20_percent_bias_off_a_real_brain(real_head, tmp_path):
    """A linear field from -20 % to +20 % across the white matter: N4 brings its CV back.

    Within 10 % of the unbiased image's coefficient of variation (the image is
    itself N4-corrected first, so the added field is its only bias).
    """
    data, affine = real_head["data"], real_head["affine"]
    wm = _white_matter(real_head, data.shape)
    assert wm.sum() > 40_000  # 40 mL or more of confident white matter at 1 mm

    def wm_cv(image: np.ndarray) -> float:
        values = image[wm]
        return float(values.std() / values.mean())

    direction = np.array([0.8, 0.5, 0.33]) / np.linalg.norm([0.8, 0.5, 0.33])
    along = np.tensordot(direction, np.indices(data.shape, dtype=np.float32), axes=1)
    low, high = along[wm].min(), along[wm].max()
    field = 1.0 + 0.2 * np.clip(2 * (along - low) / (high - low) - 1, -1, 1)
    biased = _save(tmp_path / "biased.nii.gz", (data * field).astype(np.float32), affine)
    record = _bias_correct(tmp_path, biased, threads=2)
    assert record["status"] == "ok", record
    corrected = nib.load(str(tmp_path / "n4.nii.gz")).get_fdata(dtype=np.float32)
    unbiased, with_bias, after = wm_cv(data), wm_cv(data * field), wm_cv(corrected)
    assert with_bias > 1.3 * unbiased, (unbiased, with_bias)
    assert abs(after - unbiased) <= 0.1 * unbiased, (unbiased, with_bias, after)


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_fill_holes_equals_scipys(fraction):
    rng = np.random.default_rng(int(fraction * 10))
    mask = rng.random((12, 15, 9)) < fraction
    mask[4:9, 4:9, 3:7] = True
    mask[6, 6, 5] = False  # an enclosed hole
    filled = preprocess.fill_holes(mask)
    np.testing.assert_array_equal(filled, ndi.binary_fill_holes(mask))
    assert filled[6, 6, 5]


def _block_sample_by_padding(data, factors, mask=None):
    """``block_sample`` as first written: pad by repetition, then a strided slice."""
    values = np.asarray(data, dtype=np.float64)
    inside = np.ones(values.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    pad = [(0, (-size) % factor) for size, factor in zip(values.shape, factors, strict=True)]
    take = tuple(slice((factor - 1) // 2, None, factor) for factor in factors)
    sampled_inside = np.pad(inside, pad, mode="edge")[take]
    return np.where(sampled_inside, np.pad(values, pad, mode="edge")[take], 0.0), sampled_inside


@pytest.mark.parametrize("factors", [(1, 1, 1), (2, 3, 4), (6, 6, 2), (7, 5, 9)])
def test_block_sample_equals_padding_by_repetition(factors):
    rng = np.random.default_rng(sum(factors))
    data = np.asfortranarray(rng.normal(size=(13, 17, 8)).astype(np.float32))
    mask = rng.random(data.shape) < 0.6
    for given in (None, mask):
        values, inside = preprocess.block_sample(data, factors, mask=given)
        expected_values, expected_inside = _block_sample_by_padding(data, factors, given)
        assert values.dtype == np.float64 and inside.dtype == bool
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(inside, expected_inside)


def test_is_flat_is_the_same_in_any_memory_order():
    rng = np.random.default_rng(3)
    for data in (
        rng.normal(size=(120, 90, 110)).astype(np.float32),
        np.full((120, 90, 110), 7.0, np.float32),
        np.where(rng.random((120, 90, 110)) < 0.002, 1.0, 0.0).astype(np.float32),
    ):
        verdict = preprocess.is_flat(data)
        assert preprocess.is_flat(np.asfortranarray(data)) == verdict
        assert preprocess.is_flat(data.transpose(2, 0, 1).copy().transpose(1, 2, 0)) == verdict


# ---------------------------------------------------------------------------
# The preprocess job: its stages in one process, images handed on in memory


@pytest.mark.parametrize("sform", [True, False])
def test_handoff_keeps_what_the_file_holds(head, sform, tmp_path):
    affine = _rigid((10.0, -4.0, 7.0), (3.0, -2.0, 5.0)) @ head["affine"]
    reference = nib.Nifti1Image(head["data"], affine)
    if not sform:  # the affine from the qform only, as some converters write it
        reference.header.set_sform(None, code=0)
    raw = tmp_path / "raw.nii.gz"
    nib.save(reference, str(raw))
    handoff = preprocess.Handoff()
    image, data = preprocess.load_volume(raw, handoff=handoff)
    assert raw in handoff and not data.flags.writeable
    corrected = np.asfortranarray(data * 1.5)
    out, mask = tmp_path / "n4.nii.gz", tmp_path / "mask.nii.gz"
    preprocess.save_like(corrected, image, out, dtype=np.float32, handoff=handoff)
    preprocess.save_like(data > 300, image, mask, dtype=np.uint8, handoff=handoff)
    for path in (raw, out, mask):
        kept, on_disk = handoff.get(path), nib.load(str(path))
        assert kept is not None and not kept.data.flags.writeable
        np.testing.assert_array_equal(kept.image.affine, on_disk.affine)
        assert kept.data.dtype == on_disk.get_data_dtype()
        np.testing.assert_array_equal(kept.data, np.asanyarray(on_disk.dataobj))
        from_memory = preprocess.load_volume(path, handoff=handoff)
        from_file = preprocess.load_volume(path)
        np.testing.assert_array_equal(from_memory[0].affine, from_file[0].affine)
        np.testing.assert_array_equal(from_memory[1], from_file[1])
        assert from_memory[1].dtype == from_file[1].dtype == np.float32


def _handing_stage(
    name: str, image: Path, upstream: list[Path], then=None, first=None, folder: Path | None = None
) -> chain.Step:
    """A stage of a chain that hands ``image`` (gzip, its name as content) to the parent,
    calling ``first`` before and ``then`` after; its record in ``folder`` (default: the
    image's)."""
    record_path = (folder or image.parent) / f"{name}.json"

    def work() -> dict:
        if first is not None:
            first()
        chain.write_gzip_in_background(
            image, lambda stream: stream.write(name.encode() * 1000), level=1
        )
        if then is not None:
            then()
        return records.make_record(name)

    return chain.Step(
        name,
        lambda: records.run_stage(
            name, work, record_path=record_path, image_outputs=[image], upstream=upstream
        ),
        record_path,
        (image,),
    )


def _segfault() -> None:
    faulthandler.disable()  # pytest's handler would print every module of the child
    os.kill(os.getpid(), signal.SIGSEGV)


def test_a_crash_in_a_chain_costs_its_stage_and_the_ones_after_it(tmp_path):
    images = [tmp_path / f"{name}.nii.gz" for name in ("a", "b", "c")]
    images[1].write_bytes(b"stale, from an earlier run")
    first = _handing_stage("n4", images[0], [])
    second = _handing_stage("register", images[1], [first.record_path], then=_segfault)
    third = _handing_stage("iqm", images[2], [second.record_path])
    done = chain.run_chain([first, second, third], isolate=True)
    assert done["n4"]["status"] == "ok" and done["n4"]["cpu_s"] >= 0
    # Handed to the parent before the crash: written all the same, as gzip.
    assert gzip.decompress(images[0].read_bytes()) == b"n4" * 1000
    assert done["register"]["status"] == "failed"
    assert done["register"]["reason"] == "register: crashed (killed by SIGSEGV)"
    assert not images[1].exists(), "the crashed stage keeps no image, stale or handed over"
    assert done["iqm"]["status"] == "failed" and done["iqm"]["skipped"]
    assert not images[2].exists()
    for step in (first, second, third):
        assert records.read_record(step.record_path) == done[step.name]


def test_a_file_the_parent_cannot_write_fails_its_stage(tmp_path):
    folder = tmp_path / "anat"
    unwritable, later = folder / "a.nii.gz", tmp_path / "b.nii.gz"

    def block() -> None:  # after run_stage made the folder: the parent cannot write there
        folder.rmdir()
        folder.write_text("a file where the folder was")

    first = _handing_stage("n4", unwritable, [], first=block, folder=tmp_path)
    second = _handing_stage("register", later, [first.record_path])
    done = chain.run_chain([first, second], isolate=True)
    assert done["n4"]["status"] == "failed"
    assert done["n4"]["reason"].startswith("n4: cannot write a.nii.gz: "), done["n4"]
    assert done["register"]["status"] == "failed" and done["register"]["skipped"]
    assert done["register"]["reason"] == done["n4"]["reason"]
    assert not later.exists()
    assert records.read_record(tmp_path / "n4.json") == done["n4"]


#: The preprocess job as a rule's script runs it: a fresh process (whose stages fork,
#: and whose ITK runs on one thread, so that two runs can be compared closely).
PREPROCESS_JOB = """
import sys
from pathlib import Path
from mriaudit.subject import preprocess_subject
preprocess_subject(
    Path(sys.argv[1]), out_dir=Path(sys.argv[2]), bids_id="mprage", rules={},
    in_memory=sys.argv[3] == "memory",
)
"""


@pytest.fixture(scope="module")
def mprage_runs(shared_data, tmp_path_factory) -> dict[bool, tuple[Path, dict]]:
    """The preprocess job on the 1 mm MPRAGE of ../shared/data (what the bench measures),
    with its images handed on in memory (True: as the rule runs it, the files written by
    the job's parent) and read back from their files (False)."""
    source = shared_data / "dicom" / "dcm_qa_asl" / "In" / "T1"
    package = str(Path(preprocess.__file__).resolve().parents[2])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([package, os.environ.get("PYTHONPATH", "")]),
        "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": "1",
    }
    runs = {}
    for in_memory in (True, False):
        out = tmp_path_factory.mktemp(f"mprage_in_memory_{in_memory}")
        how = "memory" if in_memory else "files"
        command = [sys.executable, "-c", PREPROCESS_JOB, str(source), str(out), how]
        subprocess.run(command, check=True, env=env, capture_output=True)
        stages = paths.PREPROCESS_STAGES
        runs[in_memory] = (
            out,
            {s: records.read_record(paths.record(out, "mprage", s)) for s in stages},
        )
    return runs


@pytest.mark.shared
def test_images_in_memory_give_the_preprocess_outputs_of_reading_files(mprage_runs):
    """Same images (grid, values within float tolerance, masks), transform and records."""
    (memory, in_memory), (disk, from_files) = mprage_runs[True], mprage_runs[False]
    for stage, record in from_files.items():
        assert record["status"] == "ok", record
        other = in_memory[stage]
        assert {k: other.get(k) for k in ("status", "findings", "warnings")} == {
            k: record.get(k) for k in ("status", "findings", "warnings")
        }, stage
        assert other["metrics"].keys() == record["metrics"].keys(), stage
        for name, value in record["metrics"].items():
            if isinstance(value, float) or isinstance(other["metrics"][name], float):
                assert other["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name
            else:
                assert other["metrics"][name] == value, name
    images = {
        "T1w": (paths.t1w, 0.0),
        "n4": (paths.n4, 1e-4),
        "head_mask": (paths.head_mask, 0.0),
        "preproc": (lambda out, sub: paths.preproc(out, sub, res=2), 1e-4),
        "brain_mask": (lambda out, sub: paths.brain_mask(out, sub, res=2), 0.0),
    }
    for name, (path_of, tolerance) in images.items():
        ours, theirs = nib.load(path_of(memory, "mprage")), nib.load(path_of(disk, "mprage"))
        assert ours.shape == theirs.shape and ours.get_data_dtype() == theirs.get_data_dtype()
        np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-6, err_msg=name)
        a, b = ours.get_fdata(dtype=np.float32), theirs.get_fdata(dtype=np.float32)
        if tolerance:  # intensities: relative to the image's range
            assert np.abs(a - b).max() <= tolerance * np.abs(b).max(), name
        else:  # masks: the same voxels
            assert np.count_nonzero(a != b) <= 1e-5 * b.size, name
    ours = ants.read_transform(str(paths.transform(memory, "mprage"))).parameters
    theirs = ants.read_transform(str(paths.transform(disk, "mprage"))).parameters
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
