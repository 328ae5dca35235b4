"""The methods' benchmark table (``mriaudit.bench_methods``): figures of kept runs, the
rank-average ensemble, and the table, on small hand-made score tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mriaudit import bench_methods

NORMALS = [f"sub-{i:02d}" for i in range(6)]
LESIONS = ["sub-10", "sub-11"]
NOISE = ["sub-20", "sub-21"]


def _labels(path: Path) -> Path:
    rows = [(s, 0, "normal") for s in NORMALS]
    rows += [(s, 1, "lesion") for s in LESIONS] + [(s, 1, "noise") for s in NOISE]
    frame = pd.DataFrame(rows, columns=["folder", "truth", "kind"])
    frame["person"] = "A"
    frame.to_csv(path, sep="\t", index=False)
    return path


def _kept(folder: Path, scores: dict[str, float], *, flagged: set[str], train_s: float) -> Path:
    """A kept run: its score table, evaluation and the rules' benchmark files."""
    rows = [
        {
            "folder": s,
            "bids_id": s.removeprefix("sub-"),
            "status": "ok",
            "reason": "",
            "audit_score": value,
            "anomaly_score": value,
            "flagged": s in flagged,
            "flag_reasons": "",
            "findings": "",
            "in_reference": s in NORMALS,
        }
        for s, value in scores.items()
    ]
    (folder / "cohort").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(folder / "cohort" / "scores.tsv", sep="\t", index=False)
    metrics = {"localisation": {"voxel_auprc_mean": 0.5}}
    (folder / "cohort" / "metrics.json").write_text(json.dumps(metrics))
    for rule, seconds in [("train_model", train_s), ("score", 20.0)]:
        (folder / "benchmarks" / rule).mkdir(parents=True)
        pd.DataFrame({"s": [seconds / 2, seconds / 2]}).to_csv(
            folder / "benchmarks" / rule / f"{rule}.tsv", sep="\t", index=False
        )
    return folder


@pytest.fixture
def runs(tmp_path: Path) -> dict:
    labels = _labels(tmp_path / "labels.tsv")
    normal = dict(zip(NORMALS, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6], strict=True))
    # "good" ranks every anomaly above every normal; "lesions" only the lesions.
    good = _kept(
        tmp_path / "good",
        normal | {"sub-10": 2.0, "sub-11": 3.0, "sub-20": 4.0, "sub-21": 5.0},
        flagged={"sub-10", "sub-11", "sub-20", "sub-21"},
        train_s=60.0,
    )
    lesions = _kept(
        tmp_path / "lesions",
        normal | {"sub-10": 2.0, "sub-11": 3.0, "sub-20": 0.0, "sub-21": 0.05},
        flagged={"sub-10", "sub-11", "sub-05"},
        train_s=120.0,
    )
    return {"labels": labels, "good": good, "lesions": lesions}


def test_run_figures_add_localisation_and_cost_per_subject(runs: dict) -> None:
    figures = bench_methods.run_figures(runs["lesions"], runs["labels"])
    assert figures["kinds"]["lesion"]["anomaly_score"]["auroc"] == 1.0
    assert figures["kinds"]["noise"]["anomaly_score"]["auroc"] == 0.0
    assert figures["false_flags"] == ["sub-05"]
    assert figures["voxel_auprc_lesion"] == 0.5
    assert figures["train_s"] == 120.0 and figures["train_s_per_subject"] == 20.0  # 6 reference
    assert figures["score_s_per_subject"] == 2.0  # 20 s over 10 scored subjects


def test_ensemble_is_the_mean_rank_of_the_methods(runs: dict) -> None:
    tables = {m: runs[m] / "cohort" / "scores.tsv" for m in ("good", "lesions")}
    ensemble = bench_methods.ensemble_figures(tables, runs["labels"])
    kinds = ensemble["kinds"]
    assert kinds["lesion"]["anomaly_score"]["auroc"] == 1.0
    # Noise ranks 9-10 of 10 for "good" and 1-2 for "lesions" (mean ranks 5 and 6); the
    # normals 1-6 and 3-8 (mean ranks 2-7): noise is above 3.5 and 4.5 of 6 normals.
    assert kinds["noise"]["anomaly_score"]["auroc"] == pytest.approx(8 / 12, abs=1e-4)
    assert ensemble["methods"] == ["good", "lesions"]
    text = bench_methods.table(
        "real",
        {
            "good": bench_methods.run_figures(runs["good"], runs["labels"]),
            bench_methods.ENSEMBLE: ensemble,
        },
    )
    lines = text.splitlines()
    assert lines[0] == "real:" and "| good | 1.000 |" in lines[3]
    assert lines[4].startswith("| ensemble |") and lines[4].count("|") == lines[1].count("|")
