"""The output folder as a BIDS derivatives dataset: description, sidecars, ignore list."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from mriaudit import __version__, derivatives, paths


def _image(path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4)), path)


def test_the_description_names_the_run_and_its_source(tmp_path):
    config = {"input_dir": "in", "flag": {"audit_z": 3}}
    description, ignore, readme = derivatives.write_dataset_files(
        tmp_path / "out", input_dir=tmp_path / "in", config=config
    )
    data = json.loads(description.read_text())
    assert data["DatasetType"] == "derivative" and data["BIDSVersion"]
    generated = data["GeneratedBy"][0]
    assert generated["Name"] == "mriaudit" and generated["Version"] == __version__
    # The digest follows the settings, not their order.
    digest = derivatives.config_digest(config)
    assert digest in generated["Description"]
    assert derivatives.config_digest({"flag": {"audit_z": 3}, "input_dir": "in"}) == digest
    assert derivatives.config_digest(config | {"flag": {"audit_z": 4}}) != digest
    assert data["SourceDatasets"][0]["URL"] == (tmp_path / "in").resolve().as_uri()
    assert {"/cohort", "*_qc.json", "**/figures", "*_xfm.mat"} <= set(ignore.read_text().split())
    assert readme.name == "README.md" and "mriaudit" in readme.read_text()


def test_each_existing_image_gets_the_sidecar_bids_requires(tmp_path):
    out, bids_id = tmp_path / "out", "01_ses-2"
    for name in ("T1w", "n4", "preproc", "brain_mask", "anomaly_map"):
        _image(paths.subject_images(out, bids_id, res=2)[name])
    written = derivatives.write_sidecars(out, bids_id, res=2)
    assert paths.sidecar(paths.head_mask(out, bids_id)) not in written  # no image, no sidecar
    preproc = json.loads(paths.sidecar(paths.preproc(out, bids_id, res=2)).read_text())
    assert preproc["SkullStripped"] is False and "2 mm" in preproc["Resolution"]
    assert preproc["Sources"][0] == "bids::sub-01/ses-2/anat/sub-01_ses-2_desc-n4_T1w.nii.gz"
    mask = json.loads(paths.sidecar(paths.brain_mask(out, bids_id, res=2)).read_text())
    assert mask["Type"] == "Brain"
    anomaly = json.loads(paths.sidecar(paths.anomaly_map(out, bids_id, res=2)).read_text())
    assert "z" in anomaly["Units"] and anomaly["SkullStripped"] is True
    converted = json.loads(paths.t1w_sidecar(out, bids_id).read_text())
    assert converted["SkullStripped"] is False
    # ``only`` limits the writing to the named images (the score job writes the map's).
    paths.sidecar(paths.n4(out, bids_id)).unlink()
    assert derivatives.write_sidecars(out, bids_id, res=2, only=("anomaly_map",)) == [
        paths.sidecar(paths.anomaly_map(out, bids_id, res=2))
    ]
    assert not paths.sidecar(paths.n4(out, bids_id)).exists()
