"""Detection floors on real heads: six real people as normals, every anomaly kind once.

The demo's normals are copies of the registration target; this cohort's normals
are the six healthy people of ../shared/data (``mriaudit.heads``), each rendered
twice with its own deformation, pose, grid, vendor and noise. The model trains
leave-one-person-out (``training.fold_groups`` by person), so no subject is scored
by a model that saw its person. Skips without ../shared.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mriaudit.bench_detection import build_cohort, detection_figures

from .conftest import snakemake

#: Quality floors of the issue: AUROC of the audit score, false flags among the normals.
MIN_AUROC = 0.9
MAX_FALSE_FLAGS = 1


@pytest.fixture(scope="session")
def real_head_run(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("real-heads")
    input_dir, labels, groups = build_cohort(
        work, shared_data, renditions=2, per_kind=1, seed=0, voxel_size_mm=1.5
    )
    out = work / "out"
    configfile = work / "config.yaml"
    # A file, not --config: --config reads nested values as strings.
    configfile.write_text(
        yaml.safe_dump(
            {
                "input_dir": str(input_dir),
                "output_dir": str(out),
                "labels": str(labels),
                "device": "cpu",
                "training": {"fold_groups": str(groups), "folds": 6, "epochs": 8},
            }
        )
    )
    result = snakemake("--cores", "2", "--configfile", str(configfile), timeout=1800)
    return {"result": result, "out": out, "labels": labels}


def test_real_head_cohort_meets_the_detection_floors(real_head_run):
    result = real_head_run["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    figures = detection_figures(
        real_head_run["out"] / "cohort" / "scores.tsv", real_head_run["labels"]
    )
    overall = figures["kinds"]["overall"]
    assert figures["n_normal"] == 12 and overall["n"] == 8
    message = f"{figures}"
    assert overall["audit_score"]["auroc"] >= MIN_AUROC, message
    assert len(figures["false_flags"]) <= MAX_FALSE_FLAGS, message
    # The fusion must not lose what the model alone sees.
    assert overall["audit_score"]["auroc"] >= overall["anomaly_score"]["auroc"], message


def test_every_subject_is_scored_by_a_model_that_never_saw_its_person(real_head_run):
    sidecar = json.loads((real_head_run["out"] / "model" / "model.json").read_text())
    persons = pd.read_csv(real_head_run["labels"], sep="\t", dtype=str)
    person_of = dict(
        zip(persons["folder"].str.removeprefix("sub-"), persons["person"], strict=True)
    )
    folds = {**sidecar["fold_assignment"], **sidecar["held_out_folds"]}
    assert set(folds) == set(person_of)
    # One fold per person: a fold holds exactly one person, so its model never saw it.
    by_fold: dict[int, set[str]] = {}
    for subject, fold in folds.items():
        by_fold.setdefault(fold, set()).add(person_of[subject])
    assert all(len(people) == 1 for people in by_fold.values()), by_fold
    assert len(by_fold) == 6
