"""End-to-end: the whole DAG on a tiny generated cohort, checked against DESIGN.md's contract."""

from __future__ import annotations

import gzip
import html as html_lib
import io
import json
import re
import shutil
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml

from mriaudit import cohort, paths, tables

from . import corpus
from .conftest import ROOT, SNAKEMAKE, job_counts, snakemake

pytestmark = pytest.mark.workflow


def _scores(run):
    return pd.read_csv(paths.scores_table(run.output_dir), sep="\t", dtype={"folder": str})


def test_run_succeeds(workflow_run):
    result = workflow_run.result
    assert result.returncode == 0, result.stderr[-4000:]


def test_inputs_are_read_only_and_unchanged(workflow_run):
    # The run saw a chmod -R a-w input_dir; every file is byte-identical afterwards.
    assert len(workflow_run.inputs_before) > 100
    assert workflow_run.inputs_after == workflow_run.inputs_before
    assert not any(p.stat().st_mode & 0o222 for p in workflow_run.input_dir.rglob("*"))


def test_scores_table_has_every_subject_with_a_valid_status(workflow_run):
    scores = _scores(workflow_run)
    folders = sorted(s.folder for s in cohort.list_subjects(workflow_run.input_dir))
    assert sorted(scores["folder"]) == folders
    assert set(scores["status"]) <= {"ok", "failed", "no_series"}
    assert set(scores["flagged"].astype(str).str.lower()) <= {"true", "false"}
    for column in ["reason", "anomaly_score", "flag_reasons"]:
        assert column in scores.columns
    assert any(c.startswith("iqm_") for c in scores.columns)
    assert any(c.startswith("hdr_") for c in scores.columns)


def test_broken_inputs_are_findings_with_reasons(workflow_run):
    labels = pd.read_csv(workflow_run.labels, sep="\t", dtype={"folder": str})
    broken = labels[labels["kind"].isin(["empty_folder", "localizer_only"])]["folder"]
    assert len(broken) >= 2
    scores = _scores(workflow_run).set_index("folder")
    for folder in broken:
        row = scores.loc[folder]
        assert row["status"] == "no_series", row.to_dict()
        assert isinstance(row["reason"], str) and row["reason"]
        assert str(row["flagged"]).lower() == "true"


def test_messy_subject_audits_its_3d_t1_and_explains_the_rest(workflow_run):
    """Localizer, 2D T1, DWI, junk and a cut file under random names in nested folders."""
    row = _scores(workflow_run).set_index("folder").loc[corpus.MESSY]
    assert row["status"] == "ok", row["reason"]
    assert row["hdr_acquisition"] == "3D"
    assert "mprage" in row["hdr_series_description"].lower()
    assert (row["hdr_n_series"], row["hdr_n_non_dicom"], row["hdr_n_unreadable"]) == (4, 3, 1)
    assert np.isfinite(row["anomaly_score"])
    series = tables.read_tsv(
        paths.series_table(workflow_run.output_dir, "messy"), text=True
    ).set_index("description")
    assert series.loc[row["hdr_series_description"], "verdict"] == "selected"
    for description, reason in corpus.MESSY_REJECTIONS.items():
        assert series.loc[description, "verdict"] == "rejected"
        assert series.loc[description, "reason"].startswith(reason), series.loc[description]
    # The cut DWI file is counted against its own series, never against the T1.
    assert series.loc["ep2d_diff_b1000", "n_unreadable"] == "1"
    assert series.loc[row["hdr_series_description"], "n_unreadable"] == "0"


@pytest.mark.parametrize("folder", list(corpus.EXPECTED))
def test_every_bad_input_is_a_row_with_a_reason(workflow_run, folder):
    """The whole bad-input corpus ran in the one workflow run (which exited 0)."""
    status, column, text = corpus.EXPECTED[folder]
    row = _scores(workflow_run).set_index("folder").loc[folder]
    assert row["status"] == status, row.to_dict()
    if column in ("", "notes"):
        assert not column or text in row[column], row.to_dict()
        return
    assert text in row[column], row.to_dict()
    assert str(row["flagged"]).lower() == "true"
    exclusions = pd.read_csv(paths.exclusions_table(workflow_run.output_dir), sep="\t", dtype=str)
    assert folder in set(exclusions["folder"])
    html = paths.report(workflow_run.output_dir).read_text()
    assert html_lib.escape(text, quote=False) in html


def test_a_scan_under_two_names_flags_both(workflow_run):
    scores = _scores(workflow_run).set_index("folder")
    twin = scores.loc[corpus.TWIN]
    (original,) = [
        name
        for name in scores.index
        if name != corpus.TWIN and scores.at[name, "conv_data_sha256"] == twin["conv_data_sha256"]
    ]
    assert f"identical image data to {original}" in twin["flag_reasons"]
    assert f"identical image data to {corpus.TWIN}" in scores.at[original, "flag_reasons"]
    assert "duplicate_image" in twin["findings"]
    # Its hostile header strings are data: shown in the report, never run.
    html = paths.report(workflow_run.output_dir).read_text()
    assert html_lib.escape(corpus.HOSTILE_TEXT, quote=False) in html


def test_a_subject_zipped_as_one_file_is_audited_like_its_folder(workflow_run):
    scores = _scores(workflow_run).set_index("folder")
    zipped = scores.loc[corpus.ZIPPED]
    source = scores.loc[corpus.zipped_source(workflow_run.labels)]
    assert zipped["status"] == "ok"
    assert zipped["conv_data_sha256"] == source["conv_data_sha256"]
    for column in ("hdr_n_series", "hdr_dim_z", "reg_similarity", "iqm_snr_total"):
        assert float(zipped[column]) == pytest.approx(float(source[column]), rel=1e-3), column
    assert (
        f"identical image data to {corpus.zipped_source(workflow_run.labels)}"
        in (zipped["flag_reasons"])
    )
    subjects = pd.read_csv(
        paths.cohort_dir(workflow_run.output_dir) / "subjects.tsv", sep="\t", dtype=str
    ).set_index("folder")
    assert subjects.at[corpus.ZIPPED, "bids_id"] == "zipped"
    assert subjects.at[corpus.ZIPPED, "entry"] == f"{corpus.ZIPPED}.zip"


def test_contract_images_exist_with_consistent_geometry(workflow_run):
    scores = _scores(workflow_run)
    ok = scores[scores["status"] == "ok"]
    assert len(ok) >= 5
    grids = set()
    for bids_id in (cohort.to_bids_id(folder) for folder in ok["folder"]):
        out = workflow_run.output_dir
        native = nib.load(paths.t1w(out, bids_id))
        corrected = nib.load(paths.n4(out, bids_id))
        assert native.shape == corrected.shape
        np.testing.assert_allclose(native.affine, corrected.affine, atol=1e-4)
        assert json.loads(paths.t1w_sidecar(out, bids_id).read_text())
        registered = nib.load(paths.preproc(out, bids_id, res=2))
        anomaly = nib.load(paths.anomaly_map(out, bids_id, res=2))
        assert registered.shape == anomaly.shape
        np.testing.assert_allclose(registered.affine, anomaly.affine, atol=1e-4)
        grids.add((registered.shape, tuple(np.round(registered.affine, 3).ravel())))
        assert np.isfinite(anomaly.get_fdata()).all()
        summary = json.loads(paths.subject_scores(out, bids_id).read_text())
        assert summary
    assert len(grids) == 1, "registered images of all subjects must share one template grid"


def test_no_image_shaped_placeholder_anywhere(workflow_run):
    """Pipelines glob a curated folder for images: every file under OUT that looks like an
    image is one (no zero-byte file, every ``.nii.gz`` loads), a subject that is not ok
    has none, and its manifest lists exactly the images that exist."""
    out = workflow_run.output_dir
    files = [p for p in out.rglob("*") if p.is_file()]
    assert [p for p in files if p.stat().st_size == 0] == []
    images = [p for p in files if p.name.endswith((".nii.gz", ".nii"))]
    assert images
    for path in images:
        data = nib.load(path).get_fdata(dtype=np.float32)  # raises on a damaged file
        assert data.ndim == 3 and min(data.shape) >= 2, path
    scores = _scores(workflow_run)
    for folder, status in zip(scores["folder"], scores["status"], strict=True):
        bids_id = cohort.to_bids_id(folder)
        if not paths.subject_scores(out, bids_id).is_file():
            continue  # not processed (BIDS id collision)
        manifest = json.loads(paths.subject_scores(out, bids_id).read_text())["images"]
        existing = {
            name: image.relative_to(out).as_posix()
            for name, image in paths.subject_images(out, bids_id, res=2).items()
            if image.is_file()
        }
        assert manifest == existing, folder
        if status == "no_series":
            assert existing == {}, folder
        if status == "ok":
            assert {"T1w", "preproc"} <= set(existing), folder


PHI_TAGS = (
    "PatientName",
    "PatientID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "InstitutionName",
    "InstitutionAddress",
)


def _phi_markers(input_dir) -> tuple[set[bytes], set[bytes]]:
    """Identifying values found in the inputs' headers: (strings, birth dates)."""
    strings, dates = set(), set()
    for path in input_dir.rglob("*"):
        if not path.is_file():
            continue
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        for tag in PHI_TAGS:
            value = str(header.get(tag, "")).strip()
            if len(value) >= 5:
                strings.add(value.encode())
        if header.get("PatientBirthDate"):
            dates.add(str(header.PatientBirthDate).encode())
    return strings, dates


def _searchable(path) -> bytes:
    """The bytes of an output a person or program could read PHI from (NIfTI: its header)."""
    if path.name.endswith(".nii.gz"):
        with gzip.open(path) as handle:
            data = handle.read(1 << 20)
        return data[: int(nib.Nifti1Header.from_fileobj(io.BytesIO(data))["vox_offset"])]
    return path.read_bytes()


def test_no_phi_in_outputs(workflow_run):
    strings, dates = _phi_markers(workflow_run.input_dir)
    assert len(strings) >= 10 and dates, "the demo headers should carry PHI to look for"
    birth_dates = re.compile(b"(?<![0-9])(" + b"|".join(dates) + b")(?![0-9])")
    checked = 0
    for path in workflow_run.output_dir.rglob("*"):
        if not path.is_file() or path.stat().st_size == 0:
            continue
        if path.suffix not in {".tsv", ".json", ".html", ".log"} and not path.name.endswith(
            ".nii.gz"
        ):
            continue
        content = _searchable(path)
        checked += 1
        for marker in strings:
            assert marker not in content, f"{marker!r} leaked into {path}"
        found = birth_dates.search(content)
        assert not found, f"birth date {found.group(0)!r} leaked into {path}"
    assert checked > 50


def test_report_lists_every_subject_and_has_the_hooks(workflow_run):
    html = paths.report(workflow_run.output_dir).read_text()
    assert re.search(r"<table[^>]*id=\"subjects\"", html)
    assert 'id="filter"' in html and 'id="export-decisions"' in html and 'id="roc"' in html
    rows = re.findall(r"<tr[^>]*data-subject=\"([^\"]*)\"", html)
    folders = {s.folder for s in cohort.list_subjects(workflow_run.input_dir)}
    assert {html_lib.unescape(r) for r in rows} == folders
    assert not re.search(r"(src|href)=\"(https?:)?//", html), "the report must not load anything"


def test_metrics_from_labels(workflow_run):
    metrics = json.loads(paths.metrics(workflow_run.output_dir).read_text())
    assert metrics["n_pos"] >= 1 and metrics["n_neg"] >= 1
    assert 0.0 <= metrics["auroc"] <= 1.0 and 0.0 <= metrics["auprc"] <= 1.0
    # Even this tiny, coarse cohort must be told apart better than by chance.
    assert metrics["auroc"] > 0.6, metrics


def test_second_run_has_nothing_to_do(workflow_run):
    result = snakemake("-n", "--cores", "2", "--configfile", str(workflow_run.configfile))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Nothing to be done" in result.stdout + result.stderr


def test_snakemake_report_carries_the_audit_report(workflow_run, tmp_path):
    target = tmp_path / "snakemake-report.html"
    result = snakemake("--report", str(target), "--configfile", str(workflow_run.configfile))
    assert result.returncode == 0, result.stderr[-3000:]
    text = target.read_text(encoding="utf-8")
    # The audit report is registered under its category, with its label.
    assert "Cohort audit" in text and "audit report" in text
    # Every registered output carries its caption, and the workflow its description.
    for caption in (
        "self-contained page",
        "one row per subject of input_dir",
        "the flagged subjects only",
    ):
        assert caption in text, caption
    assert "mriaudit audits a cohort of MRI scans" in text


def test_an_added_subject_is_the_only_one_preprocessed_again(workflow_run):
    """A new folder in input_dir: its own chain, then the cohort steps.

    With ``reference: all`` the normative model is retrained on the grown cohort,
    so every subject is scored again by it (one cohort score job); inventory to
    IQMs of the others are not repeated.
    """
    added = workflow_run.input_dir / "sub-added"
    source = workflow_run.input_dir / corpus.MESSY
    try:
        shutil.copytree(source, added, symlinks=True)
        result = snakemake("-n", "--configfile", str(workflow_run.configfile))
        assert result.returncode == 0, result.stderr[-3000:]
        jobs = job_counts(result.stdout)
        n_processed = len(cohort.processed_ids(cohort.list_subjects(workflow_run.input_dir)))
        assert jobs.get("preprocess") == 1, jobs
        assert jobs["train_model"] == jobs["score"] == jobs["collect"] == 1, jobs
        assert jobs["aggregate"] == jobs["report"] == jobs["evaluate"] == 1
        # The new model rescores the cohort: one shard holds every subject (up to 2,000).
        shards = cohort.score_shards(
            cohort.processed_ids(cohort.list_subjects(workflow_run.input_dir)),
            subjects_per_job=2000,
        )
        assert list(shards) == ["000of001"] and len(shards["000of001"]) == n_processed
        score_job = result.stdout[result.stdout.index("rule score:") :].split("\n\n")[0]
        assert "anomaly_scores_shard-000of001.tsv" in score_job and jobs["merge_scores"] == 1
        assert "sub-added" in result.stdout
    finally:
        shutil.rmtree(added, ignore_errors=True)


def test_a_run_killed_halfway_resumes_to_the_same_result(workflow_run, tmp_path):
    output_dir = tmp_path / "out"
    config = yaml.safe_load(workflow_run.configfile.read_text()) | {"output_dir": str(output_dir)}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    command = [str(SNAKEMAKE), "--cores", "2", "--configfile", str(configfile)]
    with open(tmp_path / "killed.log", "w") as log:
        run = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        # Halfway: some subjects registered, the model not trained yet.
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and run.poll() is None:
            if len(list(output_dir.glob("sub-*/sub-*_desc-register_qc.json"))) >= 3:
                break
            time.sleep(0.5)
        assert run.poll() is None, "the run ended before it could be interrupted"
        run.send_signal(signal.SIGTERM)
        assert run.wait(timeout=120) != 0
    assert not paths.report(output_dir).exists()
    resumed = snakemake(*command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    first = _scores(workflow_run).set_index("folder").sort_index()
    again = pd.read_csv(paths.scores_table(output_dir), sep="\t", dtype={"folder": str})
    again = again.set_index("folder").sort_index()
    assert list(again.index) == list(first.index)
    for column in ["status", "flagged", "reason", "flag_reasons"]:
        assert again[column].equals(first[column]), column
    numeric = [c for c in first.columns if c == "anomaly_score" or c.startswith("iqm_")]
    np.testing.assert_allclose(
        again[numeric].to_numpy(float), first[numeric].to_numpy(float), rtol=1e-6, atol=1e-9
    )


@pytest.mark.parametrize("method", ["ae3d", "itermask3d", "token_surprisal"])
def test_model_method_runs_through_the_same_rules(method, workflow_run, tmp_path):
    """Each method beside the default retrains and rescores through the same rules, into
    the same layout; its checkpoint, reused under another method, is refused, never
    scored."""
    output_dir = tmp_path / "out"
    shutil.copytree(workflow_run.output_dir, output_dir, symlinks=True)
    config = yaml.safe_load(workflow_run.configfile.read_text())
    configfile = tmp_path / "config.yaml"
    configfile.write_text(
        yaml.safe_dump(config | {"output_dir": str(output_dir), "model": {"method": method}})
    )
    # The copy has no run metadata to compare the method against: the model is forced.
    run = snakemake("--cores", "2", "--configfile", str(configfile), "--forcerun", "train_model")
    assert run.returncode == 0, run.stderr[-3000:]
    jobs = job_counts(run.stdout + run.stderr)
    assert "preprocess" not in jobs and jobs["train_model"] == jobs["score"] == 1, jobs
    sidecar = json.loads(paths.model_sidecar(output_dir).read_text())
    assert sidecar["status"] == "ok" and sidecar["method"] == method
    first = _scores(workflow_run).set_index("folder").sort_index()
    again = pd.read_csv(paths.scores_table(output_dir), sep="\t", dtype={"folder": str})
    again = again.set_index("folder").sort_index()
    assert list(again.columns) == list(first.columns) and list(again.index) == list(first.index)
    scored = first.index[first["anomaly_score"].notna()]
    assert again.loc[scored, "anomaly_score"].notna().all()
    for folder in scored:
        bids_id = cohort.to_bids_id(folder)
        assert paths.anomaly_map(output_dir, bids_id, res=2).is_file(), folder
    # The checkpoint named under the default method: refused, every subject not scored.
    reuse = tmp_path / "reuse.yaml"
    checkpoint = str(paths.model_checkpoint(output_dir))
    reuse.write_text(
        yaml.safe_dump(
            config | {"output_dir": str(output_dir), "model": {"checkpoint": checkpoint}}
        )
    )
    refused = snakemake("--cores", "2", "--configfile", str(reuse))
    assert refused.returncode == 0, refused.stderr[-3000:]
    table = pd.read_csv(paths.model_scores(output_dir), sep="\t", dtype={"bids_id": str})
    ok = table[table["status"] == "ok"]
    assert len(ok) and ok["anomaly_raw"].isna().all()
    record = json.loads(paths.record(output_dir, ok["bids_id"].iloc[0], "score").read_text())
    assert "not_scored" in record["findings"]
    assert any(f"trained with model.method {method!r}" in w for w in record["warnings"])
