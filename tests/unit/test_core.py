"""paths, cohort, records, template and intensity: the shared core of every stage."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mriaudit import cohort, isolation, paths, records, template
from mriaudit.intensity import histogram_landmarks, normalize_intensity, standardize_histogram


def test_paths_follow_bids_derivatives():
    assert paths.t1w("/o", "01") == Path("/o/sub-01/anat/sub-01_T1w.nii.gz")
    assert (
        paths.preproc("/o", "01", res=2).name
        == "sub-01_space-MNI152NLin2009aSym_res-2_desc-preproc_T1w.nii.gz"
    )
    assert (
        paths.anomaly_map("/o", "01", res=1).name
        == "sub-01_space-MNI152NLin2009aSym_res-1_desc-anomaly_T1w.nii.gz"
    )
    # Sessions and runs: BIDS folders and prefixes.
    session_run = paths.t1w("/o", "01_ses-b_run-2")
    assert session_run.as_posix() == "/o/sub-01/ses-b/anat/sub-01_ses-b_run-2_T1w.nii.gz"
    assert (
        paths.record("/o", "02_run-1", "iqm").as_posix()
        == "/o/sub-02/sub-02_run-1_desc-iqm_qc.json"
    )
    assert paths.entities("01_ses-b_run-2") == {"sub": "01", "ses": "b", "run": "2"}
    assert paths.scan_id("01", session="b", run="2") == "01_ses-b_run-2"
    assert (
        str(paths.record("/o", "{bids_id}", "n4")) == "/o/{scan_dir}/sub-{bids_id}_desc-n4_qc.json"
    )
    with pytest.raises(ValueError, match="acq-x"):
        paths.entities("01_acq-x")
    assert paths.subject_scores("/o", "01") == Path("/o/sub-01/sub-01_scores.json")
    with pytest.raises(ValueError, match="unknown stage"):
        paths.record("o", "01", "nope")


@pytest.mark.parametrize(
    ("folder", "bids_id"),
    [("sub-01", "01"), ("Patient 7 (ü)", "Patient7"), ("sub-a_b.c", "abc"), ("ü", "")],
)
def test_to_bids_id(folder, bids_id):
    assert cohort.to_bids_id(folder) == bids_id


def test_list_subjects_reports_collisions_and_ignores_files(tmp_path):
    for name in ["sub-01", "a-b", "ab", "Patient 7 (ü)", "ü", ".hidden"]:
        (tmp_path / name).mkdir()
    (tmp_path / "README").write_text("top-level files are not subjects")
    subjects = {s.folder: s for s in cohort.list_subjects(tmp_path)}
    assert set(subjects) == {"sub-01", "a-b", "ab", "Patient 7 (ü)", "ü"}
    assert subjects["sub-01"].processed and subjects["Patient 7 (ü)"].bids_id == "Patient7"
    assert "collision" in subjects["a-b"].problem and "collision" in subjects["ab"].problem
    assert not subjects["ü"].processed
    assert sorted(cohort.processed_ids(list(subjects.values()))) == ["01", "Patient7"]


def test_bids_root_lists_only_sub_folders(tmp_path):
    (tmp_path / "dataset_description.json").write_text("{}")
    for name in ["sub-01", "sub-02", "derivatives", "code"]:
        (tmp_path / name).mkdir()
    (tmp_path / "sub-03.zip").write_bytes(b"PK")
    assert [s.folder for s in cohort.list_subjects(tmp_path)] == ["sub-01", "sub-02"]


def test_a_subject_exported_as_one_archive_is_a_subject(tmp_path):
    (tmp_path / "sub-01").mkdir()
    for name in ["sub-02.zip", "sub-03.tar.gz", "Sub 04.TGZ", "sub-05.zip", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub-05").mkdir()
    subjects = {s.folder: s for s in cohort.list_subjects(tmp_path)}
    assert set(subjects) == {"sub-01", "sub-02", "sub-03", "Sub 04", "sub-05", "sub-05.zip"}
    assert subjects["sub-02"].entry == "sub-02.zip" and subjects["sub-02"].bids_id == "02"
    assert subjects["sub-03"].entry == "sub-03.tar.gz" and subjects["sub-03"].processed
    assert subjects["Sub 04"].bids_id == "Sub04" and subjects["sub-01"].entry == "sub-01"
    # A folder and an archive of one name are never merged: both named, neither audited.
    assert (
        "collision" in subjects["sub-05"].problem and "'sub-05.zip'" in subjects["sub-05"].problem
    )
    assert not subjects["sub-05.zip"].processed
    labels = tmp_path / "labels.tsv"
    labels.write_text("folder\ttruth\nsub-02\t1\nsub-03\t0\n")
    assert cohort.check_labels(labels, list(subjects.values())) == {
        "sub-02": 1,
        "sub-03": 0,
    }


def test_missing_input_dir_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="input_dir"):
        cohort.list_subjects(tmp_path / "absent")


def test_labels_and_reference(tmp_path):
    for name in ["sub-01", "sub-02", "sub-03"]:
        (tmp_path / name).mkdir()
    subjects = cohort.list_subjects(tmp_path)
    labels = tmp_path / "labels.tsv"
    labels.write_text("folder\ttruth\nsub-01\t0\nsub-02\t1\nsub-03\t0\n\n")
    assert cohort.read_labels(labels) == {"sub-01": 0, "sub-02": 1, "sub-03": 0}
    assert cohort.resolve_reference("all", subjects=subjects) == ["01", "02", "03"]
    assert cohort.resolve_reference("labels", subjects=subjects, labels_path=labels) == [
        "01",
        "03",
    ]
    assert cohort.resolve_reference(["sub-02"], subjects=subjects) == ["02"]
    with pytest.raises(ValueError, match="not found"):
        cohort.resolve_reference(["sub-99"], subjects=subjects)
    bad = tmp_path / "bad.tsv"
    bad.write_text("folder\ttruth\nsub-01\tyes\n")
    with pytest.raises(ValueError, match="line 2"):
        cohort.read_labels(bad)


def test_run_stage_turns_errors_into_records(tmp_path, caplog):
    image = tmp_path / "img.nii.gz"
    record_path = tmp_path / "rec.json"
    # A rerun first removes the image an earlier run left.
    records.run_stage(
        "n4",
        lambda: image.write_bytes(b"ok") and records.make_record("n4"),
        record_path=record_path,
        image_outputs=[image],
    )
    assert image.read_bytes() == b"ok"

    def broken():
        image.write_bytes(b"half-written")
        raise RuntimeError("boom")

    with caplog.at_level(logging.ERROR):
        record = records.run_stage("n4", broken, record_path=record_path, image_outputs=[image])
    assert record["status"] == "failed" and "RuntimeError: boom" in record["reason"]
    assert "Traceback" in caplog.text
    assert not image.exists(), "a partial image must be removed (no image-shaped leftover)"
    assert json.loads(record_path.read_text())["status"] == "failed"


def test_run_stage_survives_a_native_crash(tmp_path):
    image = tmp_path / "img.nii.gz"

    def segfault():
        image.write_bytes(b"half-written")
        faulthandler.disable()  # pytest's handler would print every module of the child
        os.kill(os.getpid(), signal.SIGSEGV)

    record = records.run_stage(
        "register", segfault, record_path=tmp_path / "rec.json", image_outputs=[image], isolate=True
    )
    assert record["status"] == "failed" and "SIGSEGV" in record["reason"]
    assert not image.exists()
    assert records.read_record(tmp_path / "rec.json") == record


def test_workers_survive_a_crash_and_lose_only_its_item(tmp_path, monkeypatch):
    monkeypatch.setattr(isolation, "FORK_STAGES", True)
    crashed: list[tuple[int, str]] = []

    def done(item: int) -> Path:
        return tmp_path / f"{item}.done"

    def work(shard):
        for item in shard:
            if item == 4:
                faulthandler.disable()  # pytest's handler would print every module of the child
                os.kill(os.getpid(), signal.SIGSEGV)
            done(item).write_text("ok")

    def on_crash(item, how):
        crashed.append((item, how))
        done(item).write_text("crashed")

    isolation.run_in_workers(
        list(range(9)), work, workers=2, finished=lambda i: done(i).exists(), crashed=on_crash
    )
    assert crashed == [(4, "killed by SIGSEGV")]
    assert [done(i).read_text() for i in range(9)] == ["ok"] * 4 + ["crashed"] + ["ok"] * 4


def test_run_stage_skips_after_failed_upstream(tmp_path):
    upstream = tmp_path / "up.json"
    records.write_json(upstream, records.make_record("inventory", status="no_series", reason="x"))
    calls = []
    record = records.run_stage(
        "convert",
        lambda: calls.append(1) or records.make_record("convert"),
        record_path=tmp_path / "rec.json",
        image_outputs=[tmp_path / "a.nii.gz"],
        upstream=[upstream],
    )
    assert not calls
    assert record["status"] == "no_series" and record["reason"] == "x" and record["skipped"]
    assert not (tmp_path / "a.nii.gz").exists()


def test_run_stage_keeps_stage_error_status_and_json_safety(tmp_path):
    def no_series():
        raise records.StageError("only a localizer", status="no_series")

    record = records.run_stage("inventory", no_series, record_path=tmp_path / "r.json")
    assert record["status"] == "no_series" and record["reason"] == "only a localizer"
    records.write_json(tmp_path / "m.json", {"a": np.float32(1.5), "b": float("nan")})
    assert json.loads((tmp_path / "m.json").read_text()) == {"a": 1.5, "b": None}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_stages_keep_freed_memory_under_glibc():
    # In a fresh interpreter, as a rule's script process calls it.
    code = "from mriaudit import isolation; raise SystemExit(0 if isolation.keep_freed_memory() else 1)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_template_grid_and_priors():
    t1 = template.load_template(resolution=2)
    mask = template.load_brain_mask(resolution=2)
    priors = template.load_tissue_priors(resolution=2)
    assert t1.shape == mask.shape == priors["wm"].shape == (99, 117, 95)
    np.testing.assert_allclose(np.diag(t1.affine)[:3], [2, 2, 2])
    brain = mask.get_fdata() > 0
    total = sum(p.get_fdata() for p in priors.values())
    np.testing.assert_allclose(total[brain], 1.0, atol=1e-5)
    assert total[~brain].max() == 0
    # White matter is brighter than grey matter on the T1 template.
    data = t1.get_fdata()
    assert data[priors["wm"].get_fdata() > 0.9].mean() > data[priors["gm"].get_fdata() > 0.9].mean()
    with pytest.raises(ValueError, match="resolution"):
        template.load_template(resolution=3)


@pytest.mark.parametrize("resolution", [1, 2])
def test_template_images_are_nilearns(resolution):
    """Read from nilearn's files without nilearn: the same images as nilearn's own loaders."""
    from nilearn import datasets

    ours = {
        "t1": template.load_template(resolution=resolution),
        "mask": template.load_brain_mask(resolution=resolution),
        "gm": template.load_tissue_priors(resolution=resolution)["gm"],
    }
    brain = ours["mask"].get_fdata() > 0
    theirs = {
        "t1": datasets.load_mni152_template(resolution=resolution),
        "mask": datasets.load_mni152_brain_mask(resolution=resolution),
        "gm": datasets.load_mni152_gm_template(resolution=resolution),
    }
    for name, image in ours.items():
        assert image.shape == theirs[name].shape, name
        np.testing.assert_allclose(image.affine, theirs[name].affine)
        expected = theirs[name].get_fdata()
        if name == "gm":  # the prior is the map inside the brain mask, clipped to [0, 1]
            expected = np.clip(expected, 0, 1) * brain
        np.testing.assert_allclose(image.get_fdata(), expected, atol=1e-6, err_msg=name)


def test_normalize_intensity_maps_percentiles():
    rng = np.random.default_rng(0)
    data = rng.uniform(100, 200, size=(10, 10, 10)).astype(np.float32)
    mask = np.zeros_like(data, dtype=bool)
    mask[2:8, 2:8, 2:8] = True
    out = normalize_intensity(data, mask, lower_percentile=0, upper_percentile=100)
    assert out.dtype == np.float32
    assert out[mask].min() == pytest.approx(0) and out[mask].max() == pytest.approx(1)
    assert np.all(out[~mask] == 0)
    with pytest.raises(ValueError, match="flat"):
        normalize_intensity(np.ones((4, 4, 4)), np.ones((4, 4, 4)))
    with pytest.raises(ValueError, match="no finite"):
        normalize_intensity(np.ones((4, 4, 4)), np.zeros((4, 4, 4)))


def test_standardize_histogram_undoes_a_contrast_change_and_keeps_a_lesion():
    rng = np.random.default_rng(1)
    grey = rng.random((20, 20, 20)) < 0.5
    base = np.where(grey, 0.6, 0.3) + rng.normal(0.0, 0.03, grey.shape)
    mask = np.ones(grey.shape, dtype=bool)
    mask[0] = False
    reference = histogram_landmarks(base, mask)
    other = 0.1 + 1.4 * base**1.6  # another scanner: a monotone change of contrast
    lesion = np.zeros(grey.shape, dtype=bool)
    lesion[5:8, 5:8, 5:8] = True
    other[lesion] = 1.3 * other[mask].max()
    out = standardize_histogram(other, mask, reference=reference)
    assert out.dtype == np.float32
    for tissue in (grey, ~grey):
        inside = mask & ~lesion & tissue
        assert out[inside].mean() == pytest.approx(base[inside].mean(), abs=0.01)
    assert out[lesion].min() > reference[-1]
    assert np.all(out[~mask] == 0)
    with pytest.raises(ValueError, match="ascending"):
        standardize_histogram(other, mask, reference=reference[::-1])


def test_outputs_get_the_umask_not_private_permissions(tmp_path):
    previous = os.umask(0o022)
    try:
        records.write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(previous)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


ORPHAN_SCRIPT = """
import os, sys, time
from mriaudit import records

def work():
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(60)
    open(sys.argv[1] + ".late", "w").write("still running")
    return records.make_record("n4")

records.run_stage("n4", work, record_path=sys.argv[1] + ".json", isolate=True)
"""


def test_a_stage_child_dies_with_its_job(tmp_path):
    # A cancelled job (SIGKILL from Snakemake or SLURM) must not leave its stage writing outputs.
    pid_file = tmp_path / "child.pid"
    job = subprocess.Popen([sys.executable, "-c", ORPHAN_SCRIPT, str(pid_file)])
    deadline = time.monotonic() + 30
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    child = int(pid_file.read_text())
    job.kill()
    job.wait()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{child}").exists(), "the stage's child outlived its job"
