"""T2w and FLAIR beside the T1w: selection, co-registration checks, the subject's row."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mriaudit import aggregate, dicom, paths, records, tables, template, thumbnails
from mriaudit.aggregate.reasons import contrast_reasons
from mriaudit.contrasts import choose_nifti
from mriaudit.contrasts.coregister import MIN_ALIGNMENT_GAIN, gradient_alignment
from mriaudit.contrasts.iqms import FLAIR_UNDEFINED, TISSUE_ORDER, template_transform
from mriaudit.dicom import inventory
from mriaudit.model.score import score_cohort
from mriaudit.model.train import train_cohort
from mriaudit.subject import preprocess_subject
from mriaudit.template import load_template
from tests.unit.test_aggregate import (  # the shared fake cohort
    built_cohort,  # noqa: F401  (fixture)
    copy_cohort,
    grid,  # noqa: F401  (fixture)
    run_aggregate,
)
from tests.unit.test_model import FAST, LESION_MM, LESION_RADIUS_MM, NORMALS, _synthetic
from tests.unit.test_report import render

CONTRASTS = ("T2w", "FLAIR")


def _inventory(subject: Path, out: Path) -> tuple[dict, pd.DataFrame]:
    record = dicom.inventory_subject(
        subject,
        series_table=out / "series.tsv",
        record_path=out / "inventory.json",
        rules={},
        contrasts=CONTRASTS,
    )
    return record, tables.read_tsv(out / "series.tsv", text=True)


def test_each_contrast_takes_its_series_from_the_headers(dicom_series, tmp_path):
    subject = tmp_path / "sub-1"
    dicom_series(subject / "t1", series_number=2, shape=(16, 16, 20))
    # Names that say nothing: the timings decide (T2w, FLAIR, proton density).
    series = {  # description: (folder, number, TR, TE, TI, ScanningSequence, SequenceName)
        "ax 1": ("a", 3, 5000.0, 100.0, None, ("SE",), "*tse2d1_15"),
        "ax 2": ("b", 4, 9000.0, 90.0, 2500.0, ("SE", "IR"), "*tir2d1_21"),
        "ax 3": ("c", 5, 3000.0, 12.0, None, ("SE",), "*tse2d1_15"),
    }
    for description, (folder, number, tr, te, ti, scanning, name) in series.items():
        dicom_series(
            subject / folder,
            description=description,
            series_number=number,
            tr=tr,
            te=te,
            ti=ti,
            scanning_sequence=scanning,
            sequence_name=name,
            acquisition="2D",
            flip_angle=150.0,
        )
    record, table = _inventory(subject, tmp_path / "out")
    assert record["status"] == "ok"
    assert record["selected"]["description"] == "t1_mprage_sag"
    chosen = record["contrasts"]
    assert chosen["T2w"]["selected"]["description"] == "ax 1"
    assert chosen["FLAIR"]["selected"]["description"] == "ax 2"
    verdicts = dict(zip(table["description"], table["reason"], strict=True))
    assert verdicts["ax 1"].startswith("audited as T2w: best T2w series (spin echo")
    assert verdicts["ax 2"].startswith("audited as FLAIR: best FLAIR series (long inversion")
    assert dict(zip(table["description"], table["verdict"], strict=True))["ax 3"] == "rejected"

    # Proton density is another contrast, never a T2w; a subject without them says what it has.
    shutil.rmtree(subject / "a")
    shutil.rmtree(subject / "b")
    record, _ = _inventory(subject, tmp_path / "out2")
    assert record["contrasts"]["T2w"] == {
        "reason": "no T2w series (proton-density (PD): 1; not audited as T2w)"
    }


def test_nifti_contrasts_are_read_from_their_names(nifti_file, tmp_path):
    subject = tmp_path / "sub-1"
    names = [
        "BraTS-GLI-00001-000-t1n.nii.gz",
        "BraTS-GLI-00001-000-t1c.nii.gz",
        "BraTS-GLI-00001-000-t2w.nii.gz",
        "BraTS-GLI-00001-000-t2f.nii.gz",
        "chris_PD.nii.gz",
    ]
    for name in names:
        nifti_file(subject / name, shape=(20, 20, 16))
    record, table = _inventory(subject, tmp_path / "out")
    assert record["selected"]["files"] == ["BraTS-GLI-00001-000-t1n.nii.gz"]
    assert record["contrasts"]["T2w"]["selected"]["files"] == ["BraTS-GLI-00001-000-t2w.nii.gz"]
    assert record["contrasts"]["FLAIR"]["selected"]["files"] == ["BraTS-GLI-00001-000-t2f.nii.gz"]
    verdicts = dict(zip(table["path"], table["verdict"], strict=True))
    assert verdicts["chris_PD.nii.gz"] == "rejected"
    # Two names say T1 (a TCGA export): the native one wins over the larger post-Gd one.
    tcga = tmp_path / "tcga"
    nifti_file(tcga / "T1_AX_SE_10_se2d1_t1.nii.gz", shape=(20, 20, 16))
    nifti_file(tcga / "MRHR_T1_AX_POST_GAD_SE_13_se2d1r_t1c.nii.gz", shape=(24, 24, 16))
    record, _ = _inventory(tcga, tmp_path / "out-tcga")
    assert record["selected"]["files"] == ["T1_AX_SE_10_se2d1_t1.nii.gz"]
    rows = [{"path": "x_fla.nii.gz", "shape": (4, 4, 4), "geometry_ok": True}]
    assert choose_nifti(rows, "FLAIR")[0] == 0
    assert choose_nifti(rows, "T2w") == (None, "no T2w series (FLAIR: 1; not audited as T2w)")


def test_gradient_alignment_sees_one_head_whatever_is_bright():
    rng = np.random.default_rng(0)
    from scipy import ndimage

    head = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 3)
    mask = np.ones(head.shape, dtype=bool)
    other = ndimage.gaussian_filter(rng.normal(size=(40, 40, 40)), 3)
    # Inverted contrast (a T2 of the same head) keeps its edges; another head does not.
    assert gradient_alignment(head, -2.0 * head + 5.0, mask) == pytest.approx(1.0)
    assert gradient_alignment(head, other, mask) < 0.5
    assert np.isnan(gradient_alignment(head, other, np.zeros_like(mask)))


def _real_subject(root: Path, name: str, files: dict[str, Path]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    for target, source in files.items():
        shutil.copyfile(source, folder / target)
    return folder


def test_a_t2_of_another_person_is_flagged_with_a_cross_contrast_reason(shared_data, tmp_path):
    """Real glioma scans: BraTS' own T1, T2 and FLAIR belong together, and so do TCGA's
    (2D, thick slices, with skull); TCGA's T2 beside the BraTS T1 is another person's;
    a post-contrast T1 named T2w is T1-like."""
    brats = shared_data / "nifti" / "BraTS-GLI-00001-000"
    tcga = shared_data / "nifti" / "TCGA-FG-6692" / "brats_space_bet"
    t1 = {"sub-x_T1w.nii.gz": brats / "BraTS-GLI-00001-000-t1n.nii.gz"}
    subjects = {
        "same": {
            **t1,
            "sub-x_T2w.nii.gz": brats / "BraTS-GLI-00001-000-t2w.nii.gz",
            "sub-x_FLAIR.nii.gz": brats / "BraTS-GLI-00001-000-t2f.nii.gz",
        },
        "other": {**t1, "sub-x_T2w.nii.gz": tcga / "TCGA-FG-6692_t2_bet.nii.gz"},
        "relabelled": {**t1, "sub-x_T2w.nii.gz": brats / "BraTS-GLI-00001-000-t1c.nii.gz"},
        # A clinical export: 2D axial series of 5.5 mm slices with the skull, as TCIA has them.
        "clinical": {path.name: path for path in sorted((tcga.parent / "raw").glob("*.nii.gz"))},
    }
    out = tmp_path / "out"
    done = {}
    for name, files in subjects.items():
        folder = _real_subject(tmp_path / "in", name, files)
        done[name] = preprocess_subject(
            folder, out_dir=out, bids_id=name, rules={}, contrasts=CONTRASTS
        )
        for contrast in CONTRASTS:
            saved = records.read_record(paths.contrast_record(out, name, contrast))
            assert saved["status"] == done[name][contrast]["status"]

    same = done["same"]
    for contrast in CONTRASTS:
        assert same[contrast]["status"] == "ok" and same[contrast]["findings"] == []
        assert same[contrast]["metrics"]["coreg_alignment_gain"] > MIN_ALIGNMENT_GAIN + 0.2
        registered = nib.load(paths.contrast_preproc(out, "same", contrast, res=2))
        reference = template.load_template(resolution=2)
        assert registered.shape == reference.shape
        np.testing.assert_allclose(registered.affine, reference.affine, atol=1e-4)
    assert same["T2w"]["metrics"]["reg_similarity"] > 0.2  # T2-like in template space
    # Each contrast's IQMs on its own tissue classes, through the composed transform.
    for contrast in CONTRASTS:
        saved = records.read_record(paths.contrast_record(out, "same", contrast))
        medians = saved["details"]["tissue_medians"]
        assert sorted(medians, key=medians.get) == list(TISSUE_ORDER[contrast])
        assert saved["metrics"]["iqm_tpm_overlap_gm"] > 0.4
        assert saved["metrics"]["iqm_snr_total"] > 3 and saved["metrics"]["iqm_cjv"] > 0
        # Skull-stripped: no air, so no air measures.
        assert saved["metrics"]["iqm_snrd_total"] is None and saved["metrics"]["iqm_cnr"] is None
    flair = records.read_record(paths.contrast_record(out, "same", "FLAIR"))["metrics"]
    assert all(flair[name] is None for name in FLAIR_UNDEFINED)  # its CSF is nulled

    clinical = done["clinical"]
    assert clinical["inventory"]["selected"]["files"][0].endswith("_t1.nii.gz")  # not t1c
    for contrast in CONTRASTS:
        assert clinical[contrast]["status"] == "ok", clinical[contrast]
        assert "contrast_mismatch" not in clinical[contrast]["findings"]
        # With the skull and the air around it: the air's measures too.
        measures = records.read_record(paths.contrast_record(out, "clinical", contrast))["metrics"]
        assert measures["iqm_snrd_total"] > 3 and 0 < measures["iqm_efc"] < 1
        assert measures["iqm_bg_peak"] is not None and measures["iqm_inu_range"] > 0

    other = done["other"]["T2w"]
    assert other["status"] == "ok" and "contrast_mismatch" in other["findings"]
    assert other["metrics"]["coreg_alignment_gain"] < MIN_ALIGNMENT_GAIN
    flags, notes = contrast_reasons("T2w", other)
    assert flags[0].startswith("T2w: does not match the subject's T1w (another person or session?)")
    assert "edge alignment above chance 0." in flags[0] and notes == []
    assert done["other"]["FLAIR"]["status"] == "no_series"
    assert contrast_reasons("FLAIR", done["other"]["FLAIR"]) == (
        [],
        ["no FLAIR series (T2w: 1; not audited as FLAIR)"],
    )

    relabelled = done["relabelled"]["T2w"]
    assert relabelled["findings"] == ["contrast_unexpected"]
    assert relabelled["metrics"]["core_skew"] < 0.1
    assert "contrast_mismatch" not in relabelled["findings"]


def test_a_contrast_without_a_t1w_is_registered_to_the_template_on_its_own(shared_data, tmp_path):
    """BraTS' T2w and FLAIR without their T1: no T1w series is the subject's finding, and
    each contrast is registered to the template directly, judged as its own contrast."""
    brats = shared_data / "nifti" / "BraTS-GLI-00001-000"
    folder = _real_subject(
        tmp_path / "in",
        "brats",
        {
            "sub-x_T2w.nii.gz": brats / "BraTS-GLI-00001-000-t2w.nii.gz",
            "sub-x_FLAIR.nii.gz": brats / "BraTS-GLI-00001-000-t2f.nii.gz",
        },
    )
    out = tmp_path / "out"
    done = preprocess_subject(folder, out_dir=out, bids_id="brats", rules={}, contrasts=CONTRASTS)
    assert done["inventory"]["status"] == "no_series"
    assert "no T1w" in done["inventory"]["reason"]
    assert done["register"]["status"] == "no_series"
    reference = template.load_template(resolution=2)
    brain = template.load_brain_mask(resolution=2).get_fdata() > 0
    for contrast in CONTRASTS:
        record = records.read_record(paths.contrast_record(out, "brats", contrast))
        assert record["status"] == "ok" and record["findings"] == [], record
        assert record["registration"] == "direct" and "no T1w" in record["registration_why"]
        assert any("registered to the template directly" in w for w in record["warnings"])
        metrics = record["metrics"]
        assert 0.6 <= metrics["reg_scale"] <= 1.0 and metrics["reg_mutual_information"] > 0.1
        assert "coreg_alignment_gain" not in metrics
        assert paths.contrast_to_template(out, "brats", contrast).is_file()
        assert not paths.contrast_to_t1w(out, "brats", contrast).exists()
        registered = nib.load(paths.contrast_preproc(out, "brats", contrast, res=2))
        np.testing.assert_allclose(registered.affine, reference.affine, atol=1e-4)
        data = registered.get_fdata()
        assert (data[brain] > 0).mean() > 0.9  # the brain lies on the template's brain
        # The IQMs' tissue classes came through the contrast's own transform.
        medians = record["details"]["tissue_medians"]
        assert sorted(medians, key=medians.get) == list(TISSUE_ORDER[contrast])
        flags, notes = contrast_reasons(contrast, {**record, "registration": "direct"})
        assert flags == []
        assert notes == [f"{contrast} registered to the template on its own: no usable T1w"]
    t2w = records.read_record(paths.contrast_record(out, "brats", "T2w"))["metrics"]
    assert t2w["reg_similarity"] > 0.2  # judged as a T2w: anti-correlated with the T1 template
    flair = records.read_record(paths.contrast_record(out, "brats", "FLAIR"))["metrics"]
    assert flair["reg_similarity"] is None  # a FLAIR's correlation says nothing


def test_a_failed_direct_registration_says_so_in_its_own_words():
    entry = {
        "status": "ok",
        "findings": ["registration_failed"],
        "metrics": {"reg_mutual_information": 0.01},
        "registration": "direct",
    }
    flags, _ = contrast_reasons("FLAIR", entry)
    assert flags == [
        "FLAIR: its registration to the MNI152 template failed (no usable T1w) "
        "(mutual information 0.01)"
    ]
    flags, notes = contrast_reasons("FLAIR", {**entry, "registration": "via_t1w"})
    assert "after co-registration to the T1w" in flags[0] and notes == []


def _write_contrast(out: Path, label: str, contrast: str, record: dict) -> None:
    records.write_json(paths.contrast_record(out, label, contrast), record)


def test_contrasts_in_the_subjects_row(built_cohort, tmp_path):  # noqa: F811 (fixture)
    cohort = copy_cohort(built_cohort, tmp_path)
    before = run_aggregate(cohort)
    out = cohort["out"]
    # Only missing contrasts: a T1-only cohort reads exactly as before.
    for label in ("01", "02", "11"):
        for contrast in CONTRASTS:
            reason = f"no {contrast} series"
            _write_contrast(
                out,
                label,
                contrast,
                records.make_record("contrast", status="no_series", reason=reason),
            )
    pd.testing.assert_frame_equal(run_aggregate(cohort), before)

    clean = {"coreg_alignment": 0.72, "coreg_alignment_gain": 0.5, "reg_similarity": 0.35}
    _write_contrast(
        out, "01", "T2w", records.make_record("contrast", metrics=clean, contrast="T2w")
    )
    mismatch = {**clean, "coreg_alignment_gain": 0.09}
    _write_contrast(
        out,
        "02",
        "T2w",
        records.make_record("contrast", findings=["contrast_mismatch"], metrics=mismatch),
    )
    frame = run_aggregate(cohort)
    rows = {row["folder"]: row for row in frame.to_dict("records")}
    assert rows["sub-01"]["t2w_status"] == "ok" and rows["sub-01"]["t2w_coreg_alignment"] == 0.72
    assert not rows["sub-01"]["flagged"]
    assert rows["sub-02"]["flagged"]
    assert "T2w: does not match the subject's T1w" in rows["sub-02"]["flag_reasons"]
    assert "(edge alignment above chance 0.09)" in rows["sub-02"]["flag_reasons"]
    assert "contrast_mismatch: T2w" in rows["sub-02"]["findings"]
    assert rows["sub-11"]["t2w_status"] == "no_series"
    assert "no T2w series" in rows["sub-11"]["notes"]
    # No subject has a FLAIR: no FLAIR columns, no FLAIR notes.
    assert not [c for c in frame.columns if c.startswith("flair_")]
    assert "FLAIR" not in rows["sub-11"]["notes"]
    # The T1w's own columns and scores are untouched.
    for column in before.columns:
        if column not in ("folder", "flagged", "flag_reasons", "findings", "notes"):
            left = before.set_index("folder")[column]
            right = frame.set_index("folder")[column].reindex(left.index)
            pd.testing.assert_series_equal(left, right, check_names=False)
    scores = aggregate.read_scores(paths.scores_table(out))
    assert list(scores.columns) == list(frame.columns)
    # A run asked for the T1w alone reads no record an earlier run left of another contrast.
    cohort_dir = paths.cohort_dir(out)
    t1_only = aggregate.aggregate_cohort(
        cohort["input"],
        out,
        labels_path=str(cohort["labels"]),
        flag={},
        out_scores=cohort_dir / "scores.tsv",
        out_exclusions=cohort_dir / "exclusions.tsv",
        out_subjects=cohort_dir / "subjects.tsv",
        resolution=2,
        contrasts=(),
    )
    pd.testing.assert_frame_equal(t1_only, before)
    frame = run_aggregate(cohort)
    subject = json.loads(paths.subject_scores(out, "02").read_text())
    assert subject["contrasts"]["T2w"]["findings"] == ["contrast_mismatch"]


def test_the_report_shows_each_contrast_beside_the_t1w(built_cohort, tmp_path):  # noqa: F811 (fixture)
    cohort = copy_cohort(built_cohort, tmp_path)
    out = cohort["out"]
    metrics = {"coreg_alignment_gain": 0.05, "coreg_overlap": 0.9}
    _write_contrast(
        out,
        "01",
        "T2w",
        records.make_record("contrast", findings=["contrast_mismatch"], metrics=metrics),
    )
    _write_contrast(
        out,
        "02",
        "T2w",
        records.make_record("contrast", status="no_series", reason="no T2w series"),
    )
    # A T2w registered to the template on its own: its subject has no T1w series.
    _write_contrast(
        out,
        "empty",
        "T2w",
        records.make_record("contrast", metrics={"reg_scale": 0.8}, registration="direct"),
    )
    picture = np.zeros((8, 24), dtype=np.uint8)
    thumbnails.save_picture(picture, paths.contrast_native_thumbnail(out, "01", "T2w"))
    frame = run_aggregate(cohort)
    alone = frame.set_index("folder").loc["sub-empty"]
    assert alone["status"] == "no_series" and alone["flagged"]
    assert alone["t2w_status"] == "ok" and alone["t2w_reg_scale"] == 0.8
    alone = alone["notes"]
    assert "T2w registered to the template on its own: no usable T1w" in alone
    html = render(cohort, with_metrics=False)
    summary = re.search(r'<tr data-contrast="T2w">(.*?)</tr>', html).group(1)
    assert re.findall(r"<td>([^<]*)</td>", summary) == ["T2w", "2", "2", "1", "0", "1", "1"]
    data = json.loads(
        re.search(
            r'<script type="application/json" id="cohort-data">(.*?)</script>', html, re.S
        ).group(1)
    )
    subjects = {s["folder"]: s for s in data["subjects"]}
    (view,) = subjects["sub-01"]["contrasts"]
    assert view["contrast"] == "T2w" and view["status"] == "ok"
    assert view["native"].startswith("data:image/webp;base64,") and view["registered"] == ""
    assert subjects["sub-02"]["contrasts"][0]["status"] == "no_series"
    assert "contrasts" not in subjects["a-b"]  # not processed (a BIDS id collision)


def test_each_contrast_has_its_own_model(tmp_path):
    """A T2w model trained out of fold on the subjects' T2w images scores a T2-bright lesion
    above every normal, into the contrast's own outputs; a T2w that does not belong to its
    T1w does not train it."""
    out = tmp_path / "out"
    rng = np.random.default_rng(11)
    reference = load_template(resolution=2)
    labels = [*NORMALS, "les", "other"]

    def t2_like(image: np.ndarray) -> np.ndarray:
        # CSF bright, white matter dark: the T1-like synthetic head turned around inside it.
        head = image > 0.1 * np.percentile(image, 99)
        return np.where(head, np.percentile(image, 99) - image, 0.0).clip(0).astype(np.float32)

    centre = np.linalg.solve(reference.affine[:3, :3], LESION_MM - reference.affine[:3, 3])
    distance = np.linalg.norm((np.indices(reference.shape).T - centre).T, axis=0) * 2.0
    lesion = np.clip(LESION_RADIUS_MM - distance + 0.5, 0.0, 1.0)
    for label in labels:
        image = t2_like(_synthetic(rng))
        if label == "les":  # a T2-bright lesion (oedema, a stroke) in white matter
            bright = 2.0 * np.median(image[image > 0])
            image = image * (1 - lesion) + bright * lesion
        path = paths.contrast_preproc(out, label, "T2w", res=2)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, reference.affine), path)
        findings = ["contrast_mismatch"] if label == "other" else []
        records.write_json(
            paths.contrast_record(out, label, "T2w"),
            records.make_record("contrast", findings=findings, contrast="T2w"),
        )
    sidecar = train_cohort(
        [paths.contrast_preproc(out, s, "T2w", res=2) for s in labels],
        [paths.contrast_record(out, s, "T2w") for s in labels],
        labels,
        reference=[*NORMALS, "other"],
        out_checkpoint=paths.model_checkpoint(out, contrast="T2w"),
        out_sidecar=paths.model_sidecar(out, contrast="T2w"),
        folds=2,
        epochs=8,
        options=FAST,
        device="cpu",
        threads=2,
        contrast="T2w",
    )
    assert sidecar["status"] == "ok" and sidecar["contrast"] == "T2w"
    assert "another head" in sidecar["excluded_reference"]["other"]
    stages = tmp_path / "stages.tsv"
    tables.write_tsv(pd.DataFrame({"bids_id": labels}), stages)
    table = score_cohort(
        stages,
        checkpoint=paths.model_checkpoint(out, contrast="T2w"),
        out_dir=out,
        out_table=paths.score_shard(out, "1of1", contrast="T2w"),
        resolution=2,
        device="cpu",
        threads=1,
        contrast="T2w",
    )
    raw = dict(zip(table["bids_id"], table["anomaly_raw"], strict=True))
    assert raw["les"] > 2 * max(raw[s] for s in NORMALS), raw
    for label in labels:
        assert records.read_record(paths.contrast_score_record(out, label, "T2w"))["status"] == "ok"
        assert paths.anomaly_map(out, label, res=2, contrast="T2w").is_file()
    assert not paths.record(out, "les", "score").exists()  # the T1w's record is not touched


def test_a_contrasts_model_flags_the_subject_for_that_contrast(built_cohort, tmp_path):  # noqa: F811 (fixture)
    cohort = copy_cohort(built_cohort, tmp_path)
    out = cohort["out"]
    before = run_aggregate(cohort).set_index("folder")
    normals = [f"{i:02d}" for i in range(1, 11)]
    raws = dict(zip(normals, np.linspace(0.9, 1.1, len(normals)), strict=True)) | {"12": 3.0}
    for label, raw in raws.items():
        _write_contrast(out, label, "FLAIR", records.make_record("contrast", contrast="FLAIR"))
        score = records.make_record(
            "score",
            metrics={"anomaly_raw": float(raw)},
            in_reference=label in normals,
            top_regions=[{"centroid_mm": [30.0, -20.0, 20.0], "volume_ml": 2.1, "peak": 5.0}],
        )
        records.write_json(paths.contrast_score_record(out, label, "FLAIR"), score)
    frame = run_aggregate(cohort).set_index("folder")
    z = frame["flair_anomaly_score"]
    median = np.median([raws[s] for s in normals])
    assert z["sub-12"] > 10 and abs(z["sub-05"]) < 2 and np.isnan(z["sub-11"])
    assert z["sub-12"] == pytest.approx(
        (3.0 - median) / (1.4826 * np.median(np.abs(np.array([raws[s] for s in normals]) - median)))
    )
    # No IQMs in these records: the model is the FLAIR's audit score's only evidence.
    audit_score = frame["flair_audit_score"]
    assert audit_score["sub-12"] > 10
    assert (audit_score[[f"sub-{s}" for s in normals]] < 3.0).all()
    reasons = frame.at["sub-12", "flag_reasons"]
    assert re.search(
        r"FLAIR: audit score [0-9.]+ \(threshold [0-9.]+\) driven by model anomaly", reasons
    )
    assert "robust SD above the cohort at (30, -20, 20) mm, 2.1 ml" in reasons
    assert not any("FLAIR: " in r for r in frame.drop(index="sub-12")["flag_reasons"])
    # The T1w's scores are the T1w's alone.
    pd.testing.assert_series_equal(frame["audit_score"], before["audit_score"].reindex(frame.index))


def test_a_broken_contrast_selection_costs_the_t1_nothing(dicom_series, tmp_path, monkeypatch):
    subject = tmp_path / "sub-1"
    dicom_series(subject / "t1", series_number=2, shape=(16, 16, 20))

    def broken(*args, **kwargs):
        message = "a header no one foresaw"
        raise RuntimeError(message)

    monkeypatch.setattr(inventory.contrast_select, "choose_dicom", broken)
    record, _ = _inventory(subject, tmp_path / "out")
    assert record["status"] == "ok" and record["selected"]["description"] == "t1_mprage_sag"
    assert record["contrasts"]["T2w"] == {
        "reason": "T2w selection failed: RuntimeError: a header no one foresaw",
        "failed": True,
    }


def _write_t2w_iqms(out: Path, labels: list[str], *, ghosted: str, tissue_outlier: str) -> None:
    """T2w records with summary IQMs spread as a normal cohort's (the quantiles of a
    Gaussian, shuffled per measure); ``ghosted``'s ghost ratio 20x, ``tissue_outlier``'s
    grey-matter SNR far out."""
    rng = np.random.default_rng(3)
    spread = stats.norm.ppf((np.arange(len(labels)) + 0.5) / len(labels))

    def normal(centre: float, sd: float) -> list[float]:
        return list(centre + sd * rng.permutation(spread))

    columns = {
        "iqm_snr_total": normal(12.0, 0.5),
        "iqm_cnr": normal(2.4, 0.1),
        "iqm_efc": normal(0.5, 0.01),
        "iqm_ghost_ratio": normal(0.01, 0.002),
        "iqm_inu_range": normal(0.3, 0.02),
        "iqm_snr_gm": normal(12.0, 0.5),
    }
    for i, label in enumerate(labels):
        metrics = {name: float(values[i]) for name, values in columns.items()}
        # A per-tissue SNR far out: not one of audit.CONTRAST_MEASURES.
        metrics["iqm_snr_gm"] = 2.0 if label == tissue_outlier else metrics["iqm_snr_gm"]
        metrics["iqm_ghost_ratio"] = 0.2 if label == ghosted else metrics["iqm_ghost_ratio"]
        _write_contrast(
            out, label, "T2w", records.make_record("contrast", metrics=metrics, contrast="T2w")
        )


def test_a_contrasts_iqms_flag_it_with_their_cause(built_cohort, tmp_path):  # noqa: F811 (fixture)
    """A contrast's audit score fuses its summary IQMs as the T1w's does: a ghosted T2w is
    flagged with the measure that saw it; a per-tissue SNR, which hangs on the
    contrast's tissue classes, does not enter."""
    cohort = copy_cohort(built_cohort, tmp_path)
    out = cohort["out"]
    before = run_aggregate(cohort).set_index("folder")
    labels = [f"{i:02d}" for i in range(1, 11)] + ["12"]
    _write_t2w_iqms(out, labels, ghosted="03", tissue_outlier="05")
    frame = run_aggregate(cohort).set_index("folder")
    score = frame["t2w_audit_score"]
    assert score["sub-03"] > 10
    assert (score[[f"sub-{s}" for s in labels if s != "03"]] < 3.0).all()
    assert np.isnan(score["sub-11"])  # no T2w record: not audited
    reasons = frame.at["sub-03", "flag_reasons"]
    assert re.search(r"T2w: audit score [0-9.]+ \(threshold 3\.0\) driven by Ghost ratio", reasons)
    assert "(ghosting along the phase-encode direction)" in reasons
    assert "T2w" not in frame.at["sub-05", "flag_reasons"]
    assert frame.at["sub-05", "t2w_iqm_snr_gm"] == 2.0  # kept in the table all the same
    # The T1w's audit is the T1w's alone.
    pd.testing.assert_series_equal(frame["audit_score"], before["audit_score"].reindex(frame.index))

    # The ghosted T2w does not train the T2w's model; the T1w's model is not told of it.
    ids = [p.name[4:] for p in sorted(out.glob("sub-*")) if p.is_dir()]
    stage_table = tmp_path / "stages.tsv"
    aggregate.write_stage_table(out, ids, out_tsv=stage_table, contrasts=["T2w"])
    t1w, t2w = (
        aggregate.read_prescreen(stage_table),
        aggregate.read_prescreen(stage_table, contrast="T2w"),
    )
    assert t2w["03"].startswith("T2w: audit score ") and t2w["03"].endswith("without the model")
    assert "03" not in t1w and "05" not in t2w
    # The T1w's status and hard findings keep its contrasts out (their template space
    # hangs on its registration); its audit score, which judges the T1w's image, does not.
    assert t1w["12"].startswith("audit score ") and "12" not in t2w
    assert {s: r for s, r in t1w.items() if not r.startswith("audit score ")}.items() <= t2w.items()


def test_the_composed_template_transform_maps_points_as_the_two_do(tmp_path):
    """template -> T1w, then T1w -> contrast, as one affine ``.mat`` the IQMs read."""
    import ants

    rng = np.random.default_rng(0)

    def affine(name: str) -> tuple[Path, ants.ANTsTransform]:
        matrix = np.eye(3) + rng.normal(0, 0.05, (3, 3))
        transform = ants.create_ants_transform(
            transform_type="AffineTransform",
            dimension=3,
            matrix=matrix,
            offset=rng.normal(0, 5, 3),
        )
        path = tmp_path / f"{name}.mat"
        ants.write_transform(transform, str(path))
        return path, ants.read_transform(str(path))

    t1w_path, to_t1w_space = affine("t1w_to_template")
    contrast_path, to_contrast = affine("to_t1w")
    composed = ants.read_transform(
        str(template_transform(contrast_path, t1w_path, tmp_path / "out" / "composed.mat"))
    )
    for point in [(0.0, 0.0, 0.0), (30.0, -20.0, 45.0), (-60.0, 70.0, -10.0)]:
        expected = to_contrast.apply_to_point(to_t1w_space.apply_to_point(point))
        np.testing.assert_allclose(composed.apply_to_point(point), expected, atol=1e-3)
