"""aggregate and evaluate: one row per folder, robust z-scores, flags with reasons, metrics."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score

from mriaudit import aggregate, audit, paths, records, template
from mriaudit import cohort as cohort_module
from mriaudit.evaluate import evaluate_cohort, rank_auroc, step_average_precision

# Reference subjects: raw anomaly scores and IQMs spread around a typical value.
REFERENCE_RAW = np.linspace(0.85, 1.15, 14).tolist()
NORMAL_SNR = [10.0, 10.5, 9.5, 10.2, 9.8, 10.1, 9.9, 10.4, 9.6, 10.3]
NORMAL_CJV = [0.40, 0.42, 0.38, 0.41, 0.39, 0.40, 0.43, 0.37, 0.41, 0.39]
HEADER = {
    "hdr_manufacturer": "SIEMENS",
    "hdr_model": "Prisma",
    "hdr_field_strength": 3.0,
    "hdr_tr": 2300.0,
    "hdr_te": 2.98,
    "hdr_ti": 900.0,
    "hdr_flip_angle": 9.0,
    "hdr_voxel_x": 1.0,
    "hdr_voxel_y": 1.0,
    "hdr_voxel_z": 1.0,
    "hdr_series_description": "MPRAGE",
    "hdr_n_files": 176,
    "hdr_missing_slices": 0,
}
HTML_STRING = "<b>x</b>"
HTML_FOLDER = "<i>odd"
BLOB_MM = (30.0, -20.0, 20.0)


@pytest.fixture(scope="session")
def grid() -> nib.Nifti1Image:
    """The 2 mm template: preproc images share its grid."""
    return template.load_template(resolution=2)


def _anomaly_map(grid: nib.Nifti1Image, centre_mm: tuple[float, float, float]) -> nib.Nifti1Image:
    """Low background with a bright ball of radius 8 mm at ``centre_mm``."""
    ijk = np.indices(grid.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(grid.affine, ijk).reshape(*grid.shape, 3)
    distance = np.linalg.norm(world - np.asarray(centre_mm), axis=-1)
    data = (0.1 + 5.0 * (distance < 8.0)).astype(np.float32)
    return nib.Nifti1Image(data, grid.affine)


def write_subject(
    out: Path,
    label: str,
    *,
    statuses: dict[str, tuple[str, str]] | None = None,
    findings: dict[str, list[str]] | None = None,
    header: dict | None = None,
    iqms: dict | None = None,
    raw: float | None = None,
    in_reference: bool = True,
) -> None:
    """Records of every stage; ``statuses`` {stage: (status, reason)} fails a stage,
    later stages are then skipped with the upstream status, as records.run_stage does."""
    statuses = statuses or {}
    findings = findings or {}
    upstream: dict | None = None
    for stage in paths.STAGES:
        if upstream is not None:
            record = records.make_record(
                stage, status=upstream["status"], reason=upstream["reason"], skipped=True
            )
        elif stage in statuses:
            status, reason = statuses[stage]
            record = records.make_record(stage, status=status, reason=reason)
            upstream = record
        else:
            metrics: dict = {}
            extra: dict = {}
            if stage == "inventory":
                metrics = {**HEADER, **(header or {})}
            elif stage == "register":
                metrics = {"reg_similarity": 0.8, "reg_scale": 1.0}
            elif stage == "iqm":
                metrics = dict(iqms or {})
            elif stage == "score":
                metrics = {"anomaly_raw": raw} if raw is not None else {}
                extra = {
                    "fold": 0,
                    "in_reference": in_reference,
                    "top_regions": [{"centroid_mm": list(BLOB_MM), "volume_ml": 2.1, "peak": 5.0}],
                }
            record = records.make_record(
                stage, findings=findings.get(stage, []), metrics=metrics, **extra
            )
        record["elapsed_s"] = 0.1
        records.write_json(paths.record(out, label, stage), record)


def write_images(out: Path, label: str, grid: nib.Nifti1Image, *, empty: bool = False) -> None:
    """The subject's registered image and map; none where ``empty`` (a stage failed)."""
    for path in (paths.preproc(out, label, res=2), paths.anomaly_map(out, label, res=2)):
        path.parent.mkdir(parents=True, exist_ok=True)
    if empty:
        return
    nib.save(grid, paths.preproc(out, label, res=2))
    nib.save(_anomaly_map(grid, BLOB_MM), paths.anomaly_map(out, label, res=2))


def build_cohort(tmp: Path, grid: nib.Nifti1Image) -> dict:
    """A small cohort covering every status and flag rule, with labels.

    sub-01..sub-10 normal; sub-11 anomaly score outlier; sub-12 SNR outlier;
    sub-13 missing slices; sub-14 2D only; sub-15 TR deviation; sub-16 header
    strings with HTML; sub-bad failed at convert; sub-empty no_series;
    a-b / ab BIDS id collision; "<i>odd" a folder name with HTML.
    """
    input_dir, out = tmp / "input", tmp / "out"
    folders = [f"sub-{i:02d}" for i in range(1, 17)] + [
        "sub-bad",
        "sub-empty",
        "a-b",
        "ab",
        HTML_FOLDER,
    ]
    for folder in folders:
        (input_dir / folder).mkdir(parents=True)
    (input_dir / "README").write_text("not a subject")

    def typical(k: int) -> dict:
        return {"iqm_snr_wm": NORMAL_SNR[k % 10], "iqm_cjv": NORMAL_CJV[k % 10]}

    # Reference subjects (as with reference: labels, the positives are not in it).
    reference = [f"{i:02d}" for i in range(1, 11)] + ["14", "15", "16", "iodd"]
    extra = {
        "14": {"findings": {"inventory": ["2d_only"]}},
        "15": {"header": {"hdr_tr": 1900.0}},
        "16": {"header": {"hdr_series_description": HTML_STRING, "hdr_manufacturer": HTML_STRING}},
    }
    for k, label in enumerate(reference):
        write_subject(out, label, raw=REFERENCE_RAW[k], iqms=typical(k), **extra.get(label, {}))
    write_subject(out, "11", raw=3.0, iqms=typical(0), in_reference=False)
    write_subject(out, "12", raw=1.0, iqms={"iqm_snr_wm": 2.0, "iqm_cjv": 0.40}, in_reference=False)
    write_subject(
        out,
        "13",
        raw=1.02,
        iqms=typical(1),
        findings={"inventory": ["missing_slices"]},
        header={"hdr_missing_slices": 3},
        in_reference=False,
    )
    write_subject(out, "bad", statuses={"convert": ("failed", "dcm2niix produced no image")})
    write_subject(
        out, "empty", statuses={"inventory": ("no_series", "no T1-weighted series among 3 series")}
    )
    for label in ("11", "12", "01"):
        write_images(out, label, grid)
    write_images(out, "bad", grid, empty=True)
    labels_path = tmp / "labels.tsv"
    positives = {"sub-11", "sub-12", "sub-bad", "sub-13"}
    lines = ["folder\ttruth"] + [
        f"{f}\t{int(f in positives)}" for f in folders if f not in ("a-b", "ab")
    ]
    labels_path.write_text("\n".join(lines) + "\n")
    return {"input": input_dir, "out": out, "folders": folders, "labels": labels_path}


def run_aggregate(cohort: dict, *, labels: bool = True, flag: dict | None = None) -> pd.DataFrame:
    cohort_dir = paths.cohort_dir(cohort["out"])
    return aggregate.aggregate_cohort(
        cohort["input"],
        cohort["out"],
        labels_path=str(cohort["labels"]) if labels else None,
        flag=flag or {},
        out_scores=cohort_dir / "scores.tsv",
        out_exclusions=cohort_dir / "exclusions.tsv",
        out_subjects=cohort_dir / "subjects.tsv",
        resolution=2,
    )


@pytest.fixture(scope="session")
def built_cohort(tmp_path_factory: pytest.TempPathFactory, grid: nib.Nifti1Image) -> Path:
    """The cohort's inputs and stage outputs, built once; tests work on copies."""
    root = tmp_path_factory.mktemp("cohort")
    build_cohort(root, grid)
    return root


def copy_cohort(built: Path, tmp_path: Path) -> dict:
    root = tmp_path / "cohort"
    shutil.copytree(built, root)
    return {
        "input": root / "input",
        "out": root / "out",
        "folders": sorted(p.name for p in (root / "input").iterdir() if p.is_dir()),
        "labels": root / "labels.tsv",
    }


@pytest.fixture
def cohort(built_cohort: Path, tmp_path: Path) -> dict:
    copied = copy_cohort(built_cohort, tmp_path)
    copied["frame"] = run_aggregate(copied)
    return copied


def _by_subject(frame: pd.DataFrame) -> dict[str, dict]:
    return {row["folder"]: row for row in frame.to_dict("records")}


def test_one_row_per_folder_with_statuses(cohort):
    table = aggregate.read_scores(paths.cohort_dir(cohort["out"]) / "scores.tsv")
    assert sorted(table["folder"]) == sorted(cohort["folders"])
    rows = _by_subject(table)
    assert rows["sub-bad"]["status"] == "failed"
    assert rows["sub-bad"]["reason"] == "dcm2niix produced no image"
    assert rows["sub-bad"]["failed_stage"] == "convert"
    assert rows["sub-empty"]["status"] == "no_series"
    for folder in ("a-b", "ab"):
        assert rows[folder]["status"] == "failed" and rows[folder]["flagged"]
        assert "collision" in rows[folder]["reason"]
    assert rows[HTML_FOLDER]["status"] == "ok" and rows[HTML_FOLDER]["bids_id"] == "iodd"
    assert {rows[f"sub-{i:02d}"]["status"] for i in range(1, 17)} == {"ok"}
    subjects = pd.read_csv(
        paths.cohort_dir(cohort["out"]) / "subjects.tsv", sep="\t", keep_default_na=False
    )
    assert set(subjects.columns) == {"folder", "entry", "bids_id", "problem"}
    assert len(subjects) == len(cohort["folders"])


def test_anomaly_score_is_robust_z_against_the_reference(cohort):
    rows = _by_subject(cohort["frame"])
    raws = [r["anomaly_raw"] for r in rows.values() if r["in_reference"]]
    assert len(raws) == 14
    median = np.median(raws)
    scale = 1.4826 * np.median(np.abs(np.asarray(raws) - median))
    for subject in ("sub-11", "sub-12", "sub-01", HTML_FOLDER):
        expected = (rows[subject]["anomaly_raw"] - median) / scale
        assert rows[subject]["anomaly_score"] == pytest.approx(expected)
    assert np.isnan(rows["sub-bad"]["anomaly_score"]) and np.isnan(rows["a-b"]["anomaly_score"])


def test_flags_and_reasons(cohort):
    rows = _by_subject(cohort["frame"])
    assert rows["sub-11"]["flagged"]
    assert rows["sub-11"]["flag_reasons"].startswith("audit score ")
    assert "(threshold 3.0) driven by model anomaly" in rows["sub-11"]["flag_reasons"]
    _, titles = aggregate.iqm_tables()
    snr_name = aggregate.iqm_title("iqm_snr_wm", titles)
    assert rows["sub-12"]["flagged"]
    assert f"{snr_name} " in rows["sub-12"]["flag_reasons"]
    assert "robust SD below the cohort (noisy image)" in rows["sub-12"]["flag_reasons"]
    assert (
        rows["sub-13"]["flagged"]
        and "missing slices in the series (3)" in rows["sub-13"]["flag_reasons"]
    )
    assert (
        rows["sub-bad"]["flagged"]
        and "failed at convert: dcm2niix" in rows["sub-bad"]["flag_reasons"]
    )
    assert rows["sub-empty"]["flagged"] and rows["sub-empty"]["flag_reasons"].startswith(
        "no usable T1-weighted series"
    )
    assert rows["a-b"]["flag_reasons"].startswith("not processed: BIDS id collision")
    # 2D-only and protocol deviations are findings, not flags.
    assert not rows["sub-14"]["flagged"] and "2d_only" in rows["sub-14"]["findings"]
    assert "2D" in rows["sub-14"]["notes"]
    assert not rows["sub-15"]["flagged"]
    assert "protocol_deviation: TR 1900 vs cohort 2300 ms" in rows["sub-15"]["findings"]
    for i in range(1, 11):
        assert not rows[f"sub-{i:02d}"]["flagged"], rows[f"sub-{i:02d}"]["flag_reasons"]
    # Flagged first, then by audit score.
    frame = cohort["frame"]
    flagged = frame["flagged"].to_numpy()
    assert not (np.diff(flagged.astype(int)) > 0).any()
    normal_scores = frame.loc[~frame["flagged"], "audit_score"].dropna().to_numpy()
    assert (np.diff(normal_scores) <= 0).all()


def test_tsv_formatting_and_exclusions(cohort):
    cohort_dir = paths.cohort_dir(cohort["out"])
    lines = (cohort_dir / "scores.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    assert header[:4] == ["folder", "bids_id", "status", "reason"]
    for column in (
        "audit_score",
        "anomaly_score",
        "scanner_group",
        "flagged",
        "flag_reasons",
        "iqm_snr_wm",
        "hdr_tr",
        "reg_similarity",
        "truth",
    ):
        assert column in header
    cells = [line.split("\t") for line in lines[1:]]
    assert all(len(row) == len(header) for row in cells)
    flagged = {row[0]: row[header.index("flagged")] for row in cells}
    assert set(flagged.values()) == {"true", "false"}
    assert flagged["sub-11"] == "true" and flagged["sub-01"] == "false"
    score_of = {row[0]: row[header.index("anomaly_score")] for row in cells}
    assert score_of["sub-bad"] == ""  # NaN is written empty
    label_of = {row[0]: row[header.index("truth")] for row in cells}
    assert label_of["sub-11"] == "1" and label_of["a-b"] == ""
    exclusions = pd.read_csv(
        cohort_dir / "exclusions.tsv", sep="\t", dtype=str, keep_default_na=False
    )
    expected = {"sub-11", "sub-12", "sub-13", "sub-bad", "sub-empty", "a-b", "ab"}
    assert set(exclusions["folder"]) == expected
    assert {"folder", "status", "reasons", "audit_score", "anomaly_score"} <= set(
        exclusions.columns
    )
    evidence = exclusions.set_index("folder")
    assert evidence.loc["sub-12", "iqm_outliers"].startswith("iqm_snr_wm z=-")
    assert evidence.loc["sub-11", "top_region"].startswith("(30, -20, 20) mm")


def test_subject_json_merges_records(cohort):
    data = json.loads(paths.subject_scores(cohort["out"], "12").read_text())
    assert data["folder"] == "sub-12" and data["flagged"] is True
    assert set(data["records"]) == set(paths.STAGES)
    assert data["records"]["convert"]["status"] == "ok" and "metrics" not in data["records"]["iqm"]
    assert data["metrics"]["hdr_tr"] == 2300.0 and data["metrics"]["iqm_snr_wm"] == 2.0
    assert data["iqm_z"]["iqm_snr_wm"] < -4
    assert data["cohort"]["audit_threshold"] >= 3.0
    assert data["audit_score"] >= data["cohort"]["audit_threshold"]
    assert data["audit_drivers"][0].startswith("SNR (WM)")
    assert data["truth"] == 1
    bad = json.loads(paths.subject_scores(cohort["out"], "bad").read_text())
    assert bad["status"] == "failed" and bad["anomaly_score"] is None
    # Colliding folders have no output of their own.
    assert not paths.subject_scores(cohort["out"], "ab").exists()


def test_fp_budget_raises_the_threshold(cohort):
    # A tiny budget: the threshold rises above audit_z to where a Gaussian with the
    # spread of the upper half of the pool's scores below audit_z leaves 0.1 %.
    flag = {"audit_z": 3.0, "fp_budget": 0.001}
    frame = run_aggregate(cohort, flag=flag)
    scores = frame["audit_score"].to_numpy()
    data = json.loads(paths.subject_scores(cohort["out"], "01").read_text())
    threshold = data["cohort"]["audit_threshold"]
    below = scores[np.isfinite(scores) & (scores < 3.0) & frame["status"].eq("ok").to_numpy()]
    median, upper = np.median(below), np.quantile(below, 0.75)
    expected = median + (upper - median) * stats.norm.isf(0.001) / stats.norm.isf(0.25)
    assert threshold == pytest.approx(max(3.0, expected))
    # Evaluate and the report recompute the same threshold from scores.tsv.
    recomputed = aggregate.table_threshold(
        aggregate.read_scores(paths.cohort_dir(cohort["out"]) / "scores.tsv"), flag=flag
    )
    assert recomputed == pytest.approx(threshold, abs=1e-6)
    by_score = frame["flag_reasons"].str.contains("audit score ").to_numpy()
    assert (scores[by_score] >= threshold).all()
    assert (scores[~by_score & np.isfinite(scores)] < threshold).all()
    # A budget of 0 turns the audit flag off; hard findings still flag.
    off = run_aggregate(cohort, flag={"fp_budget": 0.0})
    assert not off["flag_reasons"].str.contains("audit score ").any()
    assert off.set_index("folder").loc["sub-13", "flagged"]


def test_permuted_labels_change_no_score_and_no_flag(cohort, tmp_path):
    """Labels never influence scores: a shuffled labels file leaves every score and flag."""
    table = pd.read_csv(cohort["labels"], sep="\t", dtype=str)
    table["truth"] = np.random.default_rng(3).permutation(table["truth"].to_numpy())
    table.to_csv(cohort["labels"], sep="\t", index=False)
    permuted = run_aggregate(cohort).set_index("folder").sort_index()
    original = cohort["frame"].set_index("folder").sort_index()
    columns = [c for c in original.columns if c != "truth"]
    pd.testing.assert_frame_equal(permuted[columns], original[columns])
    assert not permuted["truth"].equals(original["truth"])


def test_missing_records_and_empty_cohort(tmp_path):
    (tmp_path / "in" / "sub-x").mkdir(parents=True)
    out = tmp_path / "out"
    frame = aggregate.aggregate_cohort(
        tmp_path / "in",
        out,
        labels_path=None,
        flag={},
        out_scores=out / "s.tsv",
        out_exclusions=out / "e.tsv",
        out_subjects=out / "f.tsv",
        resolution=2,
    )
    assert frame["status"].tolist() == ["failed"]
    assert "no inventory record" in frame["reason"].iloc[0]
    (tmp_path / "in" / "sub-x").rmdir()
    frame = aggregate.aggregate_cohort(
        tmp_path / "in",
        out,
        labels_path=None,
        flag={},
        out_scores=out / "s.tsv",
        out_exclusions=out / "e.tsv",
        out_subjects=out / "f.tsv",
        resolution=2,
    )
    assert frame.empty
    assert (out / "s.tsv").read_text().startswith("folder\tbids_id\tstatus")
    # collect on an empty cohort writes its header, prescreen included.
    stages = aggregate.write_stage_table(out, [], out_tsv=out / "stages.tsv")
    assert stages.empty and aggregate.read_prescreen(out / "stages.tsv") == {}


def test_robust_z_handles_ties_and_small_references():
    values = np.array([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 2.0, np.nan])
    z, median, scale = aggregate.robust_z(values, np.ones(8, dtype=bool))
    # MAD is zero: the mean absolute deviation (1/7) sets the scale.
    assert median == 1.0 and scale == pytest.approx(1.2533 / 7)
    assert z[6] == pytest.approx(1 / scale) and np.isnan(z[7])
    z, _, _ = aggregate.robust_z(values[:3], np.ones(3, dtype=bool))
    assert np.isnan(z).all()


def test_evaluate_matches_sklearn(cohort, tmp_path):
    scores_tsv = paths.cohort_dir(cohort["out"]) / "scores.tsv"
    metrics = evaluate_cohort(
        scores_tsv,
        cohort["labels"],
        out_metrics=tmp_path / "metrics.json",
        flag={},
        output_dir=cohort["out"],
        n_bootstrap=200,
    )
    assert metrics["localisation"] is None  # the labels give no lesion
    table = aggregate.read_scores(scores_tsv)
    labels = dict(line.split("\t") for line in cohort["labels"].read_text().splitlines()[1:])
    for column, figures in (("audit_score", metrics), ("anomaly_score", metrics["model_only"])):
        scored = table[table[column].notna() & table["folder"].isin(labels)]
        y = scored["folder"].map(labels).astype(int).to_numpy()
        s = scored[column].to_numpy()
        assert figures["auroc"] == roc_auc_score(y, s)
        assert figures["auprc"] == average_precision_score(y, s)
    # The audit score sees the SNR outlier that the model alone ranks low.
    assert metrics["auroc"] > metrics["model_only"]["auroc"]
    low, high = metrics["auroc_ci"]
    assert low <= metrics["auroc"] <= high
    assert metrics["n_pos"] == int(y.sum()) and metrics["n_neg"] == int((y == 0).sum())
    # sub-bad (label 1) and sub-empty (label 0) have no score; the collisions have no label.
    assert metrics["n_unscored"] == 2
    assert {u["folder"]: u["truth"] for u in metrics["unscored"]} == {"sub-bad": 1, "sub-empty": 0}
    # Flags: the four positives are flagged (sub-bad as a failure); sub-empty is a false positive.
    assert metrics["flagged"]["tp"] == 4 and metrics["flagged"]["fn"] == 0
    assert metrics["flagged"]["fp"] == 1
    point = metrics["operating_point"]
    assert point["tp"] + point["fn"] == metrics["n_pos"]
    assert point["threshold"] >= 3.0
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["auroc"] == metrics["auroc"]
    assert len(written["roc_curve"]["fpr"]) == len(written["roc_curve"]["tpr"]) >= 2


def test_evaluate_localises_known_lesions(cohort, tmp_path):
    # sub-11's map peaks in its lesion; sub-12's lesion lies 40 mm from its map's
    # blob; sub-bad failed and has no map. sub-01 has a map but no lesion.
    far = (BLOB_MM[0] - 40.0, BLOB_MM[1], BLOB_MM[2])
    lesions = {"sub-11": (*BLOB_MM, 8.0), "sub-12": (*far, 10.0), "sub-bad": (*BLOB_MM, 8.0)}
    rows = ["folder\ttruth\t" + "\t".join(cohort_module.LESION_COLUMNS)]
    for line in cohort["labels"].read_text().splitlines()[1:]:
        lesion = lesions.get(line.split("\t")[0], ("", "", "", ""))
        rows.append(line + "\t" + "\t".join(map(str, lesion)))
    labels = tmp_path / "labels.tsv"
    labels.write_text("\n".join(rows) + "\n")
    metrics = evaluate_cohort(
        paths.cohort_dir(cohort["out"]) / "scores.tsv",
        labels,
        out_metrics=tmp_path / "metrics.json",
        flag={},
        output_dir=cohort["out"],
        n_bootstrap=20,
    )
    summary = metrics["localisation"]
    cases = {c["folder"]: c for c in summary["cases"]}
    assert set(cases) == set(lesions)
    assert (summary["n"], summary["n_hit"], summary["hit_rate"]) == (3, 1, pytest.approx(1 / 3))
    hit, miss = cases["sub-11"], cases["sub-12"]
    assert hit["hit"] and hit["peak_distance_mm"] == 0.0
    assert np.linalg.norm(np.subtract(hit["peak_mm"], BLOB_MM)) < 8.0
    # The blob (radius 8 mm) is the lesion (radius 8 mm) up to the 2 mm grid.
    assert hit["voxel_auprc"] > 0.9
    assert not miss["hit"] and 40.0 - 10.0 - 8.0 <= miss["peak_distance_mm"] <= 40.0 - 10.0
    assert miss["voxel_auprc"] < 0.1
    assert not cases["sub-bad"]["hit"] and "no anomaly map" in cases["sub-bad"]["problem"]
    assert summary["voxel_auprc_mean"] == pytest.approx(
        (hit["voxel_auprc"] + miss["voxel_auprc"]) / 2
    )


def test_bootstrap_metrics_equal_sklearn_with_ties():
    rng = np.random.default_rng(1)
    for decimals in (1, 6):
        y = rng.integers(0, 2, 200)
        s = np.round(rng.normal(size=200) + y, decimals)
        assert rank_auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
        assert step_average_precision(y, s) == pytest.approx(
            average_precision_score(y, s), abs=1e-12
        )


def test_duplicate_images_pairs_ok_subjects_with_the_same_voxel_digest():
    frame = pd.DataFrame(
        {
            "folder": ["sub-a", "sub-b", "sub-c", "sub-d", "sub-e", "sub-f"],
            "status": ["ok", "ok", "ok", "failed", "ok", "ok"],
            "conv_data_sha256": ["1f", "2e", "1f", "2e", None, "1f"],
        }
    )
    assert aggregate.duplicate_images(frame) == [
        ["sub-c", "sub-f"],
        [],  # its twin failed: nothing to compare
        ["sub-a", "sub-f"],
        [],
        [],
        ["sub-a", "sub-c"],
    ]
    assert aggregate.duplicate_images(frame.drop(columns="conv_data_sha256")) == [[]] * 6


def test_audit_threshold_follows_a_long_upper_tail():
    # Normal scores whose upper half spreads 6x wider than the lower: z >= 3 would
    # flag 16 %; the fp_budget point keeps ~5 %.
    rng = np.random.default_rng(0)
    raw = np.concatenate([-np.abs(rng.normal(0, 1, 1000)), np.abs(rng.normal(0, 6, 1000))])
    scores, _, _ = aggregate.robust_z(raw, np.ones(raw.size, dtype=bool))
    assert np.mean(scores >= 3.0) > 0.1
    pool = np.ones(scores.size, dtype=bool)
    threshold = audit.audit_threshold(scores, pool, audit_z=3.0, fp_budget=0.05)
    assert threshold > 3.0
    assert 0.03 < np.mean(scores >= threshold) < 0.07
    assert audit.audit_threshold(scores, pool, audit_z=3.0, fp_budget=0.0) == math.inf


def test_prescreen_keeps_flagged_images_out_of_the_model_reference(cohort, tmp_path):
    """collect's prescreen: what the audit flags without the model does not train it."""
    labels = [s.bids_id for s in cohort_module.list_subjects(cohort["input"]) if s.processed]
    table = tmp_path / "stages.tsv"
    aggregate.write_stage_table(cohort["out"], labels, out_tsv=table)
    prescreen = aggregate.read_prescreen(table)
    assert prescreen["13"] == "missing slices in the series"
    assert prescreen["12"].startswith("audit score ") and prescreen["12"].endswith(
        "without the model"
    )
    assert prescreen["bad"] == "status failed"
    # The anomaly-score outlier is the model's to judge: its images are fine.
    assert "11" not in prescreen and not {f"{i:02d}" for i in range(1, 11)} & set(prescreen)


def test_flagged_otherwise_reads_the_reasons_column():
    reasons = [
        "",
        "audit score 6.0 (threshold 3.0) driven by CJV 5.1 robust SD above the cohort (noise)",
        "audit score 6.0 (threshold 3.0); missing slices in the series (3)",
        "failed at convert: dcm2niix failed",
        # Another contrast's reasons say nothing of the T1w: its audit pool keeps the subject.
        "T2w: audit score 8.1 (threshold 3.0) driven by Ghost ratio; FLAIR: failed: no data",
    ]
    assert aggregate.flagged_otherwise(reasons).tolist() == [False, False, True, True, False]


def test_stage_table_names_each_subjects_first_problem(tmp_path):
    out = tmp_path / "out"
    write_subject(out, "01")
    write_subject(out, "bad", statuses={"n4": ("failed", "N4: no signal")})
    write_subject(out, "none", statuses={"inventory": ("no_series", "folder is empty")})
    table = aggregate.write_stage_table(
        out, ["01", "bad", "none", "gone"], out_tsv=tmp_path / "s.tsv"
    )
    written = pd.read_csv(tmp_path / "s.tsv", sep="\t", dtype=str, keep_default_na=False)
    assert list(written.columns) == [
        "bids_id",
        *paths.PREPROCESS_STAGES,
        "status",
        "failed_stage",
        "reason",
        "prescreen",
        "scanner_group",
    ]
    rows = written.set_index("bids_id")
    # The training sample of a large cohort is stratified by this column.
    assert aggregate.read_scanner_groups(tmp_path / "s.tsv") == dict(
        zip(written["bids_id"], written["scanner_group"], strict=True)
    )
    assert rows.loc["01", "prescreen"] == "" and rows.loc["bad", "prescreen"] == "status failed"
    assert list(rows.loc["01", list(paths.PREPROCESS_STAGES)]) == ["ok"] * 5
    assert rows.loc["bad", "convert"] == "ok" and rows.loc["bad", "iqm"] == "failed"
    assert tuple(rows.loc["bad", ["status", "failed_stage", "reason"]]) == (
        "failed",
        "n4",
        "N4: no signal",
    )
    assert tuple(rows.loc["none", ["status", "failed_stage"]]) == ("no_series", "inventory")
    # A subject whose job never ran is a failure that says so.
    assert rows.loc["gone", "inventory"] == "missing" and rows.loc["gone", "status"] == "failed"
    assert "did not run" in rows.loc["gone", "reason"]
    assert len(table) == 4
