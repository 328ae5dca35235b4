"""T2w and FLAIR beside the T1w through the whole workflow: a generated cohort whose every
subject has all three, with anomalies planted in one contrast only."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from mriaudit import paths

from .conftest import snakemake


@pytest.fixture(scope="module")
def contrast_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("contrasts")
    input_dir, labels, output_dir = base / "input", base / "labels.tsv", base / "out"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mriaudit.demo",
            str(input_dir),
            *("--subjects", "12", "--seed", "3", "--voxel-size", "3"),
            *("--labels", str(labels), "--contrasts", "T2w", "FLAIR"),
        ],
        check=True,
    )
    configfile = base / "config.yaml"
    config = {
        "input_dir": str(input_dir),
        "output_dir": str(output_dir),
        "labels": str(labels),
        "device": "cpu",
        "training": {"folds": 2, "epochs": 4},
    }
    configfile.write_text(yaml.safe_dump(config))
    result = snakemake("--cores", "2", "--configfile", str(configfile))
    assert result.returncode == 0, result.stderr[-3000:]
    scores = pd.read_csv(paths.scores_table(output_dir), sep="\t", keep_default_na=False)
    truth = pd.read_csv(labels, sep="\t", keep_default_na=False)
    return output_dir, scores.merge(truth[["folder", "kind", "contrast"]], on="folder")


def test_every_contrast_is_audited_and_an_anomaly_flags_its_own_contrast(contrast_run):
    out, table = contrast_run
    with_t1 = table[table["status"] == "ok"]
    assert len(with_t1) == 10
    # The T1w of the wrong contrast fails its registration: its T2w and FLAIR are
    # registered to the template on their own, and the row says so.
    alone = with_t1["findings"].str.contains("registration_failed")
    assert alone.sum() == 1
    for contrast in ("T2w", "FLAIR"):
        note = f"{contrast} registered to the template on its own: no usable T1w"
        assert with_t1.loc[alone, "notes"].str.contains(note, regex=False).all()
        assert not with_t1.loc[~alone, "notes"].str.contains(note, regex=False).any()
    for contrast in ("t2w", "flair"):
        assert set(with_t1[f"{contrast}_status"]) == {"ok"}
        # Every subject's contrasts are its own head: no cross-contrast flag.
        gain = pd.to_numeric(with_t1.loc[~alone, f"{contrast}_coreg_alignment_gain"])
        assert (gain > 0.17).all()
        assert pd.to_numeric(with_t1.loc[alone, f"{contrast}_reg_scale"]).between(0.6, 1.6).all()
    assert not table["findings"].str.contains("contrast_mismatch|contrast_unexpected").any()
    for contrast in ("T2w", "FLAIR"):
        (row,) = table[table["contrast"] == contrast].to_dict("records")
        parts = row["flag_reasons"].split("; ")
        (own,) = [part for part in parts if part.startswith(f"{contrast}: audit score ")]
        assert row["flagged"] and "model anomaly" in own, row  # a lesion: its model saw it
        # The lesion stays in its contrast: the other's model does not see it. (Its IQMs
        # may still be judged unusual in a cohort of ten: the T1w's audit flags a normal
        # one here too.)
        other = "FLAIR" if contrast == "T2w" else "T2w"
        assert not [part for part in parts if part.startswith(other) and "model anomaly" in part]
        bids_id = row["bids_id"]
        for name in ("preproc", "anomaly_map", "native_thumbnail", "anomaly_thumbnail"):
            image = paths.subject_images(out, bids_id, res=2)[f"{contrast}_{name}"]
            assert image.is_file(), image
    metrics = json.loads(paths.metrics(out).read_text())
    for contrast in ("T2w", "FLAIR"):
        figures = metrics["contrasts"][contrast]
        assert (figures["n_pos"], figures["n_neg"]) == (1, 9)
        assert figures["auroc"] == 1.0 and figures["flagged"]["tp"] == 1
        # The model alone, on ten 3 mm heads after four epochs: better than chance.
        assert figures["model_only"]["auroc"] >= 0.75
    html = paths.report(out).read_text()
    assert 'id="contrast-summary"' in html and 'id="contrast-detection"' in html
