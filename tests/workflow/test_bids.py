"""BIDS in and out: a BIDS root with sessions and runs audited row by row, participants.tsv in
the tables and the report, and every output folder a valid BIDS derivatives dataset."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mriaudit import paths

from .conftest import snakemake

pytestmark = pytest.mark.workflow

VALIDATOR = Path(sys.executable).parent / "bids-validator-deno"


def validate(root: Path) -> list[dict]:
    """The BIDS validator's issues of ``root`` (errors and warnings)."""
    result = subprocess.run(
        [str(VALIDATOR), str(root), "--format", "json"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.stdout, result.stderr[-2000:]
    return json.loads(result.stdout)["issues"]["issues"]


def errors(issues: list[dict]) -> list[str]:
    return [
        f"{i['code']} {i.get('location', '')} {i.get('subCode', '')}"
        for i in issues
        if i["severity"] == "error"
    ]


@pytest.fixture(scope="session")
def bids_run(workflow_run, tmp_path_factory):
    """Five scans of the tiny cohort's normals as a BIDS root: sub-01 with two sessions,
    sub-02 with two T1w runs, sub-03 plain; scored by the tiny run's model (no training).
    ``mriqc_dir`` is an MRIQC-layout folder: the tiny run's own MRIQC export of the same
    five images, renamed to their BIDS names here."""
    scores = pd.read_csv(paths.scores_table(workflow_run.output_dir), sep="\t", dtype=str)
    normals = scores[(scores["status"] == "ok") & (scores["truth"] == "0")]["bids_id"].tolist()
    assert len(normals) >= 5, scores[["folder", "status", "truth"]]
    root = tmp_path_factory.mktemp("bids") / "input"
    layout = ["01_ses-1", "01_ses-2", "02_run-1", "02_run-2", "03"]
    for bids_id, source in zip(layout, normals, strict=False):
        target = paths.t1w(root, bids_id)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(paths.t1w(workflow_run.output_dir, source), target)
        shutil.copyfile(paths.t1w_sidecar(workflow_run.output_dir, source), paths.sidecar(target))
    (root / "dataset_description.json").write_text(
        json.dumps({"Name": "sessions and runs", "BIDSVersion": "1.10.0"})
    )
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsite\nsub-01\t34\tOslo\nsub-02\t57\tLyon\nsub-03\tn/a\tOslo\n"
    )
    group = pd.read_csv(paths.mriqc_group_table(workflow_run.output_dir), sep="\t", dtype=str)
    names = {
        f"sub-{source}_T1w": f"sub-{bids_id}_T1w"
        for bids_id, source in zip(layout, normals, strict=False)
    }
    mriqc_dir = root.parent / "mriqc"
    mriqc_dir.mkdir()
    group[group["bids_name"].isin(names)].replace({"bids_name": names}).to_csv(
        mriqc_dir / "group_T1w.tsv", sep="\t", index=False
    )
    output_dir = root.parent / "out"
    configfile = root.parent / "config.yaml"
    configfile.write_text(
        yaml.safe_dump(
            {
                "input_dir": str(root),
                "output_dir": str(output_dir),
                "device": "cpu",
                "model": str(paths.model_checkpoint(workflow_run.output_dir)),
                "mriqc_dir": str(mriqc_dir),
            }
        )
    )
    result = snakemake("--cores", "2", "--configfile", str(configfile))
    assert result.returncode == 0, result.stderr[-4000:]
    return root, output_dir


def test_sessions_and_runs_are_rows_with_their_participants(bids_run):
    _, out = bids_run
    scores = pd.read_csv(paths.scores_table(out), sep="\t", dtype=str, keep_default_na=False)
    rows = scores.set_index("folder")
    assert sorted(rows.index) == [
        "sub-01_ses-1",
        "sub-01_ses-2",
        "sub-02_run-1",
        "sub-02_run-2",
        "sub-03",
    ]
    assert (rows["status"] == "ok").all(), rows[["status", "reason"]]
    assert rows.loc["sub-01_ses-2", "session"] == "2" and rows.loc["sub-02_run-1", "run"] == "1"
    assert rows.loc["sub-03", "session"] == "" and rows.loc["sub-03", "run"] == ""
    assert rows.loc["sub-02_run-2", "participant_site"] == "Lyon"
    assert rows.loc["sub-01_ses-1", "participant_age"] in {"34", "34.0"}
    # Each run audited its own image: the series table lists that run's file only.
    series = pd.read_csv(paths.series_table(out, "02_run-2"), sep="\t", dtype=str)
    assert series["path"].tolist() == ["anat/sub-02_run-2_T1w.nii.gz"], series
    assert paths.preproc(out, "01_ses-2", res=2).is_file()
    report = paths.report(out).read_text()
    assert 'data-column="participant_site"' in report and "Lyon" in report


def test_the_output_is_a_valid_bids_derivatives_dataset(workflow_run, bids_run):
    for out in (workflow_run.output_dir, bids_run[1]):
        description = json.loads(paths.dataset_description(out).read_text())
        assert description["DatasetType"] == "derivative"
        assert description["GeneratedBy"][0]["Name"] == "mriaudit"
        found = errors(validate(out))
        assert not found, "\n".join(found[:20])


def test_the_iqms_in_mriqc_layout_and_the_agreement_with_an_mriqc_run(bids_run):
    _, out = bids_run
    group = pd.read_csv(paths.mriqc_group_table(out), sep="\t")
    assert group.columns[0] == "bids_name"
    assert {"cjv", "cnr", "efc", "fber", "snr_total", "fwhm_avg", "qi_1"} <= set(group.columns)
    assert "sub-01_ses-1_T1w" in set(group["bids_name"])
    image = json.loads(
        (paths.mriqc_dir(out) / "sub-01/ses-1/anat/sub-01_ses-1_T1w.json").read_text()
    )
    assert image["provenance"]["software"] == "mriaudit" and "cjv" in image
    # The same five images measured twice by the same pipeline: the ranks agree.
    agreement = pd.read_csv(paths.mriqc_agreement(out), sep="\t").set_index("metric")
    assert agreement.loc["iqm_cjv", "n"] == 5, agreement
    assert agreement.loc["iqm_cjv", "rho"] > 0.8 and agreement.loc["iqm_snr_total", "rho"] > 0.8
    report = paths.report(out).read_text()
    assert 'id="mriqc-agreement"' in report and 'data-metric="iqm_cjv"' in report
