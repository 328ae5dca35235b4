"""The normative anomaly model on tiny synthetic cohorts made from the MNI152 template.

Each synthetic subject is the 2 mm template under a smooth random deformation
(about 1-2 mm), a gamma change, a global scale and Rician noise; the lesioned
subject carries a bright 10 mm sphere in the white matter. Training runs on
the real template grid with few slices and epochs, so the whole file takes
well under a minute on two CPU cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import ndimage

from mriaudit import paths
from mriaudit.model import resolve_device, score_subject, train_cohort
from mriaudit.model.data import (
    assign_folds,
    brain_grid,
    fold_count,
    group_count,
    reference_problem,
)
from mriaudit.model.maps import focal_and_diffuse, subject_score, top_regions
from mriaudit.model.score import score_cohort
from mriaudit.model.scorer import load_checkpoint
from mriaudit.model.train import TrainOptions
from mriaudit.records import read_record
from mriaudit.template import load_template

LESION_MM = np.array([-28.0, -18.0, 28.0])  # left centrum semiovale, white matter
LESION_RADIUS_MM = 10.0
NORMALS = [f"n{i:02d}" for i in range(6)]
CHECKPOINT_KEYS = {
    "status",
    "state_dicts",
    "fold_assignment",
    "architecture",
    "normalisation",
    "resolution",
    "scoring",
    "calibration",
}
SIDECAR_KEYS = {
    "status",
    "torch_version",
    "device",
    "data_hash",
    "config",
    "seed",
    "training_time_s",
    "fold_final_loss",
    "n_reference",
}
# Short training for tests: the real grid, fewer slices per epoch.
FAST = TrainOptions(slices_per_subject=24)


def _synthetic(rng: np.random.Generator, *, lesion: bool = False) -> np.ndarray:
    """A subject on the 2 mm template grid, float32 in scanner-like units."""
    template = load_template(resolution=2)
    data = np.asarray(template.get_fdata(), dtype=np.float32)
    shape = data.shape
    coords = np.indices(shape, dtype=np.float32)
    for axis in range(3):
        coarse = rng.normal(0.0, 0.7, (4, 5, 4))
        coords[axis] += ndimage.zoom(coarse, np.array(shape) / coarse.shape, order=1)
    image = ndimage.map_coordinates(data, coords, order=1).astype(np.float32)
    if lesion:
        centre = np.linalg.solve(template.affine[:3, :3], LESION_MM - template.affine[:3, 3])
        distance = np.linalg.norm((np.indices(shape).T - centre).T, axis=0) * 2.0
        weight = np.clip(LESION_RADIUS_MM - distance + 0.5, 0.0, 1.0)
        bright = 1.6 * np.median(image[image > 0.1])
        image = image * (1 - weight) + bright * weight
    image = np.clip(image, 0, None) ** rng.uniform(0.9, 1.1) * rng.uniform(400, 1200)
    sigma = 0.02 * np.percentile(image, 99)
    image = np.sqrt((image + rng.normal(0, sigma, shape)) ** 2 + rng.normal(0, sigma, shape) ** 2)
    return image.astype(np.float32)


def _write_subject(
    root: Path, label: str, image: np.ndarray | None, record: dict
) -> tuple[Path, Path]:
    image_path = root / f"sub-{label}_space-MNI152_desc-preproc_T1w.nii.gz"
    record_path = root / f"sub-{label}_desc-register_qc.json"
    if image is None:
        image_path.write_bytes(b"")
    else:
        nib.save(nib.Nifti1Image(image, load_template(resolution=2).affine), image_path)
    base = {
        "stage": "register",
        "status": "ok",
        "reason": "",
        "findings": [],
        "metrics": {},
        "warnings": [],
    }
    record_path.write_text(json.dumps(base | record))
    return image_path, record_path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Six normals, one lesioned subject, one failed registration (empty image), one flagged registration."""
    root = tmp_path_factory.mktemp("cohort")
    rng = np.random.default_rng(7)
    subjects: dict[str, tuple[Path, Path]] = {}
    for label in NORMALS:
        subjects[label] = _write_subject(root, label, _synthetic(rng), {})
    subjects["les"] = _write_subject(root, "les", _synthetic(rng, lesion=True), {})
    subjects["broken"] = _write_subject(
        root, "broken", None, {"status": "failed", "reason": "registration diverged"}
    )
    subjects["misreg"] = _write_subject(
        root, "misreg", _synthetic(rng), {"findings": ["registration_failed"]}
    )
    return {"root": root, "subjects": subjects}


def _train(cohort: dict, out: Path, *, reference: list[str], **kwargs) -> dict:
    labels = list(cohort["subjects"])
    images = [cohort["subjects"][s][0] for s in labels]
    records = [cohort["subjects"][s][1] for s in labels]
    return train_cohort(
        images,
        records,
        labels,
        reference=reference,
        out_checkpoint=out / "model.pt",
        out_sidecar=out / "model.json",
        device="cpu",
        threads=2,
        **kwargs,
    )


def _score(cohort: dict, out: Path, label: str, checkpoint: Path) -> dict:
    image, record = cohort["subjects"][label]
    return score_subject(
        image,
        checkpoint=checkpoint,
        subject=label,
        out_map=out / f"sub-{label}_anomaly_map.nii.gz",
        record_path=out / f"sub-{label}_desc-score_qc.json",
        upstream=[record],
        device="cpu",
        threads=2,
    )


@pytest.fixture(scope="module")
def trained(cohort: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two fold models trained on the normals (reference: labels 0); every subject scored."""
    out = tmp_path_factory.mktemp("model")
    reference = [*NORMALS, "broken", "misreg"]
    sidecar = _train(cohort, out, reference=reference, folds=2, epochs=8, options=FAST)
    records = {label: _score(cohort, out, label, out / "model.pt") for label in cohort["subjects"]}
    return {"out": out, "sidecar": sidecar, "records": records}


def test_folds_are_deterministic_balanced_and_order_free() -> None:
    labels = [f"s{i}" for i in range(10)]
    first = assign_folds(labels, folds=3, seed=0)
    assert first == assign_folds(labels[::-1], folds=3, seed=0)
    assert sorted(np.bincount(list(first.values()))) == [3, 3, 4]
    assert any(assign_folds(labels, folds=3, seed=s) != first for s in range(1, 4))


def test_fold_groups_keep_a_group_in_one_fold() -> None:
    """Subjects of one group (a person, a participant's sessions) share a fold."""
    labels = [f"s{i}" for i in range(12)]
    groups = {label: f"person{i % 4}" for i, label in enumerate(labels[:10])}
    folds = assign_folds(labels, folds=4, seed=0, groups=groups)
    for person in {f"person{i}" for i in range(4)}:
        assert len({folds[s] for s, g in groups.items() if g == person}) == 1
    assert sorted(set(folds.values())) == [0, 1, 2, 3]
    assert folds == assign_folds(labels[::-1], folds=4, seed=0, groups=groups)
    assert group_count(labels, groups) == 6  # s10 and s11 are groups of their own


@pytest.mark.parametrize(("n", "expected"), [(0, 0), (2, 0), (3, 2), (5, 2), (6, 3), (25, 3)])
def test_fold_count_degrades_with_few_subjects(n: int, expected: int) -> None:
    assert fold_count(n, 3) == expected


def test_reference_problem_names_unusable_subjects(cohort: dict) -> None:
    assert reference_problem(*cohort["subjects"]["n00"]) == ""
    assert "failed" in reference_problem(*cohort["subjects"]["broken"])
    assert "registration failed" in reference_problem(*cohort["subjects"]["misreg"])


def test_resolve_device_auto_and_unknown() -> None:
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    assert resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu")


def test_train_writes_checkpoint_and_sidecar(trained: dict) -> None:
    out = trained["out"]
    checkpoint = load_checkpoint(out / "model.pt")
    sidecar = json.loads((out / "model.json").read_text())
    assert set(checkpoint) >= CHECKPOINT_KEYS
    assert set(sidecar) >= SIDECAR_KEYS
    assert checkpoint["status"] == sidecar["status"] == "ok"
    assert sidecar == json.loads(json.dumps(trained["sidecar"]))
    assert len(sidecar["data_hash"]) == 64
    assert sidecar["n_reference"] == len(NORMALS)
    assert set(sidecar["excluded_reference"]) == {"broken", "misreg"}
    assert len(checkpoint["state_dicts"]) == len(sidecar["fold_final_loss"]) == 2
    assert all(np.isfinite(sidecar["fold_final_loss"]))
    # Out of fold: exactly the usable reference subjects, each in one of the folds.
    assert set(checkpoint["fold_assignment"]) == set(NORMALS)
    assert set(checkpoint["fold_assignment"].values()) == {0, 1}
    assert checkpoint["resolution"] == 2
    # The reference intensity scale that scoring maps every subject onto.
    landmarks = checkpoint["normalisation"]["landmarks"]
    assert landmarks == sidecar["landmarks"]
    assert len(landmarks) == len(checkpoint["normalisation"]["landmark_percentiles"])
    assert np.all(np.diff(landmarks) >= 0) and landmarks[0] >= 0 and landmarks[-1] <= 1.5


def test_score_writes_map_on_template_grid_and_record(trained: dict) -> None:
    template = load_template(resolution=2)
    checkpoint = load_checkpoint(trained["out"] / "model.pt")
    for label in [*NORMALS, "les", "misreg"]:
        record = trained["records"][label]
        assert record == read_record(trained["out"] / f"sub-{label}_desc-score_qc.json")
        assert record["status"] == "ok"
        # anomaly_raw is a robust z against the out-of-fold reference: any sign.
        assert np.isfinite(record["metrics"]["anomaly_raw"])
        img = nib.load(trained["out"] / f"sub-{label}_anomaly_map.nii.gz")
        assert img.shape == template.shape
        assert img.get_data_dtype() == np.float32
        np.testing.assert_allclose(img.affine, template.affine)
        regions = record["top_regions"]
        assert 1 <= len(regions) <= 3
        assert {"centroid_mm", "volume_ml", "peak"} <= set(regions[0])
    for label in NORMALS:
        record = trained["records"][label]
        assert record["in_reference"] is True
        assert record["fold"] == checkpoint["fold_assignment"][label]
    for label in ("les", "misreg"):
        assert trained["records"][label]["in_reference"] is False
        assert trained["records"][label]["fold"] is None


def test_a_reused_model_does_not_mistake_a_new_subject_for_its_namesake(
    trained: dict, cohort: dict, tmp_path: Path
) -> None:
    # Another cohort's subject n00 (here: the lesioned image) was never seen in training.
    image, record = cohort["subjects"]["les"]
    scored = score_subject(
        image,
        checkpoint=trained["out"] / "model.pt",
        subject="n00",
        out_map=tmp_path / "map.nii.gz",
        record_path=tmp_path / "score.json",
        upstream=[record],
        device="cpu",
    )
    assert scored["in_reference"] is False and scored["fold"] is None
    assert scored["metrics"]["anomaly_raw"] == pytest.approx(
        trained["records"]["les"]["metrics"]["anomaly_raw"], rel=1e-5
    )


def test_lesion_scores_highest_and_is_located(trained: dict) -> None:
    records = trained["records"]
    normal = [records[label]["metrics"]["anomaly_raw"] for label in NORMALS]
    lesion = records["les"]["metrics"]["anomaly_raw"]
    assert lesion > max(normal)
    centroid = np.array(records["les"]["top_regions"][0]["centroid_mm"])
    assert np.linalg.norm(centroid - LESION_MM) < 10.0


def test_failed_upstream_gives_skipped_record_and_no_map(trained: dict, cohort: dict) -> None:
    record = trained["records"]["broken"]
    assert record["status"] == "failed"
    assert record["skipped"] is True
    assert not (trained["out"] / "sub-broken_anomaly_map.nii.gz").exists()


def test_empty_image_with_ok_upstream_fails_cleanly(
    trained: dict, cohort: dict, tmp_path: Path
) -> None:
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    record = score_subject(
        empty,
        checkpoint=trained["out"] / "model.pt",
        subject="n00",
        out_map=tmp_path / "map.nii.gz",
        record_path=tmp_path / "score.json",
        upstream=[cohort["subjects"]["n00"][1]],
        device="cpu",
    )
    assert record["status"] == "failed"
    assert "empty" in record["reason"]
    assert not (tmp_path / "map.nii.gz").exists()


def test_too_few_reference_subjects_fail_training_not_the_run(cohort: dict, tmp_path: Path) -> None:
    sidecar = _train(cohort, tmp_path, reference=["n00", "broken"])
    assert sidecar["status"] == "failed"
    assert "1 usable reference subject" in sidecar["reason"]
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint["status"] == "failed"
    assert checkpoint["reason"] == sidecar["reason"]
    record = _score(cohort, tmp_path, "n01", tmp_path / "model.pt")
    assert record["status"] == "ok"
    assert "not_scored" in record["findings"]
    assert record["metrics"]["anomaly_raw"] is None
    assert any(sidecar["reason"] in warning for warning in record["warnings"])
    # Not scored: no map (an all-zero map would read as a clean result).
    assert not (tmp_path / "sub-n01_anomaly_map.nii.gz").exists()


def test_an_error_during_training_is_a_failed_model_not_a_crash(
    cohort: dict, tmp_path: Path
) -> None:
    # batch_size 0 makes the training loop itself raise, as a CUDA out-of-memory would.
    sidecar = _train(cohort, tmp_path, reference=NORMALS, epochs=1, batch_size=0)
    assert sidecar["status"] == "failed"
    assert sidecar["reason"].startswith("training failed: ZeroDivisionError")
    checkpoint = load_checkpoint(tmp_path / "model.pt")
    assert checkpoint["status"] == "failed" and checkpoint["resolution"] == 2


def test_same_seed_gives_same_scores(cohort: dict, tmp_path: Path) -> None:
    tiny = TrainOptions(slices_per_subject=4, calibration_subjects=4)
    scores = []
    for run in ("a", "b"):
        out = tmp_path / run
        _train(cohort, out, reference=NORMALS[:4], folds=2, epochs=1, seed=3, options=tiny)
        scores.append(
            [
                _score(cohort, out, s, out / "model.pt")["metrics"]["anomaly_raw"]
                for s in ("n00", "les")
            ]
        )
    np.testing.assert_allclose(scores[0], scores[1], rtol=1e-4)


def test_subject_score_and_regions_on_a_known_map() -> None:
    grid = brain_grid(2)
    mask = grid.crop_mask
    anomaly = np.zeros(mask.shape, np.float32)
    centre = np.array(mask.shape) // 2
    anomaly[tuple(slice(c - 2, c + 3) for c in centre)] = 5.0
    anomaly[centre[0] + 15, centre[1], centre[2]] = 9.0
    (focal,), diffuse = focal_and_diffuse(anomaly, mask, sigmas=[0.0])
    assert focal == pytest.approx(9.0)
    assert diffuse == pytest.approx((125 * 5.0 + 9.0) / mask.sum())
    calibration = {"focal": [4.0, 1.0], "diffuse": [0.0, 1.0]}
    assert subject_score([focal], diffuse, calibration) == pytest.approx(5.0)
    # Several scales: the largest z of any scale (or of the diffuse summary) wins.
    scales = {"focal": [[4.0, 1.0], [2.0, 0.5]], "diffuse": [0.0, 1.0]}
    assert subject_score([focal, 6.0], diffuse, scales) == pytest.approx(8.0)
    regions = top_regions(
        anomaly, mask, affine=grid.affine, offset=[a for a, _ in grid.crop], percentile=99.0
    )
    # The 5x5x5 block outweighs the single brighter voxel.
    assert regions[0]["volume_ml"] == pytest.approx(125 * 0.008)
    voxel = centre + np.array([a for a, _ in grid.crop])
    expected = grid.affine[:3, :3] @ voxel + grid.affine[:3, 3]
    np.testing.assert_allclose(regions[0]["centroid_mm"], expected, atol=0.1)
    assert regions[1]["peak"] == pytest.approx(9.0)


def test_score_cohort_scores_like_one_by_one_and_writes_its_table(
    trained: dict, cohort: dict, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    labels = ["n00", "les", "broken"]
    for label in labels:
        image, record = cohort["subjects"][label]
        for source, target in [
            (image, paths.preproc(out, label, res=2)),
            (record, paths.record(out, label, "register")),
        ]:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    stages = tmp_path / "stages.tsv"
    stages.write_text("bids_id\tstatus\n" + "".join(f"{label}\tok\n" for label in labels))
    table = score_cohort(
        stages,
        checkpoint=trained["out"] / "model.pt",
        out_dir=out,
        out_table=paths.model_scores(out),
        resolution=2,
        device="cpu",
        threads=2,
    )
    assert list(table["bids_id"]) == labels
    written = pd.read_csv(paths.model_scores(out), sep="\t", dtype={"bids_id": str})
    assert list(written["status"]) == ["ok", "ok", "failed"]
    for label in ("n00", "les"):
        record = read_record(paths.record(out, label, "score"))
        expected = trained["records"][label]
        # Other torch threads, other float sums: the focal contrast divides by the map's
        # spread, so the last digits move.
        assert record["metrics"]["anomaly_raw"] == pytest.approx(
            expected["metrics"]["anomaly_raw"], rel=1e-4
        )
        assert record["fold"] == expected["fold"]
        row = written.set_index("bids_id").loc[label]
        assert row["anomaly_raw"] == pytest.approx(record["metrics"]["anomaly_raw"], rel=1e-6)
        assert record["peak_rss_mb"] > 0 and record["cpu_s"] >= 0
    assert not paths.anomaly_map(out, "broken", res=2).exists()


def test_focal_contrast_ignores_a_map_raised_everywhere():
    """An unusual but normal head raises its whole map and with it every peak; the
    contrast of a peak against the subject's own map stays, a lesion's rises."""
    grid = brain_grid(2)
    mask = grid.crop_mask
    rng = np.random.default_rng(0)
    # Residual maps of normal heads are blotchy: smooth noise, spread about 0.3.
    blotches = ndimage.gaussian_filter(rng.normal(0.0, 1.0, mask.shape), 2.0)
    base = np.clip(0.5 + 0.3 * blotches / blotches[mask].std(), 0.0, None).astype(np.float32)
    raised = base * 2.5  # the same map of a head unlike the training heads
    lesion = base.copy()
    centre = np.array(mask.shape) // 2
    lesion[tuple(slice(c - 3, c + 4) for c in centre)] += 4.0
    sigmas = [1.5, 3.0]

    def summaries(anomaly, relative):
        return focal_and_diffuse(anomaly, mask, sigmas=sigmas, relative=relative)[0]

    peaks = [summaries(m, False) for m in (base, raised, lesion)]
    contrasts = [summaries(m, True) for m in (base, raised, lesion)]
    # Peaks: the raised normal map outranks the lesion at the coarse scale.
    assert peaks[1][1] > 1.5 * peaks[0][1]
    np.testing.assert_allclose(contrasts[1], contrasts[0], rtol=1e-3)
    assert all(
        c_lesion > 3 * c_base for c_lesion, c_base in zip(contrasts[2], contrasts[0], strict=True)
    )
    # A nearly empty map: the spread floor keeps the contrast finite.
    empty = np.zeros(mask.shape, np.float32)
    empty[tuple(centre)] = 1.0
    assert np.isfinite(summaries(empty, True)).all()
