"""The contrast benchmark's cohort and figures (its run is ``make bench``)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd

from mriaudit.bench_contrasts import (
    CONTRASTS,
    REAL_SCANS,
    contrast_figures,
    plan_cohort,
    write_real_scans,
)
from mriaudit.demo.plan import CONTRAST_ANOMALIES


def test_the_cohort_plants_each_kind_in_one_contrast_on_people_in_turn():
    people = {p: Path(f"/heads/{p}.nii.gz") for p in "ABCDEF"}
    plans = plan_cohort(people, renditions=2, per_kind=2, seed=0)
    assert all(plan.contrasts == CONTRASTS and not plan.has_t2 for plan in plans)
    normals = Counter(plan.person for plan in plans if plan.kind == "normal")
    assert normals == dict.fromkeys("ABCDEF", 2)
    planted = Counter((p.anomaly_contrast, p.kind) for p in plans if p.kind != "normal")
    expected = {(c, kind): 2 for c in CONTRASTS for kind, _ in CONTRAST_ANOMALIES[c]}
    assert planted == expected
    # Every person carries some anomaly, no person all of them: leave-one-person-out
    # leaves each model a reference.
    assert set(p.person for p in plans if p.kind != "normal") == set(people)
    assert len({p.folder for p in plans}) == len(plans)


def _scores(rows):
    columns = ["folder", "t2w_audit_score", "t2w_anomaly_score", "t2w_status", "flag_reasons"]
    return pd.DataFrame(rows, columns=columns)


def test_contrast_figures_rank_real_lesions_among_rendered_normals():
    scores = _scores(
        [
            ("sub-001", 1.0, 0.1, "ok", ""),
            ("sub-002", 1.2, 0.3, "ok", ""),
            ("sub-003", 3.5, 1.0, "ok", "T2w: audit score 3.5 (threshold 3.0)"),  # false flag
            ("sub-004", 9.0, 8.0, "ok", "T2w: audit score 9.0 (threshold 3.0)"),
            ("sub-005", 2.0, 0.2, "ok", "FLAIR: audit score 5.0 (threshold 3.0)"),
            ("real-healthy-t2", 4.0, 2.0, "ok", "T2w: audit score 4.0 (threshold 3.0)"),
            ("real-stroke-clinical", 12.0, 6.0, "ok", "T2w: audit score 12 (threshold 3.0)"),
            ("real-stroke-arc", 2.5, 1.0, "ok", ""),
        ]
    )
    labels = pd.DataFrame(
        {
            "folder": ["sub-001", "sub-002", "sub-003", "sub-004", "sub-005"],
            "kind": ["normal", "normal", "normal", "lesion", "spike"],
            "contrast": ["", "", "", "T2w", "FLAIR"],
            "person": ["A", "B", "C", "A", "B"],
        }
    )
    real = pd.DataFrame(
        {
            "folder": ["real-healthy-t2", "real-stroke-clinical", "real-stroke-arc"],
            "what": ["healthy", "stroke", "stroke"],
            "contrast": ["T2w"] * 3,
            "truth": [0, 1, 1],
        }
    )
    figures = contrast_figures(scores, labels, real, "T2w")
    # The FLAIR-only anomaly is a normal T2w.
    assert figures["n_normal"] == 4 and figures["false_flags"] == ["sub-003"]
    assert figures["kinds"]["lesion"]["audit"]["auroc"] == 1.0
    assert figures["kinds"]["lesion"]["tpr"] == 1.0
    real_rows = {row["folder"]: row for row in figures["real"]}
    assert real_rows["real-stroke-clinical"]["flagged"]
    assert not real_rows["real-stroke-arc"]["flagged"]
    assert real_rows["real-stroke-clinical"]["above_rendered_normals"] == 1.0
    assert real_rows["real-stroke-arc"]["above_rendered_normals"] == 0.75
    assert figures["real_lesions_above_real_healthy"] == {
        "audit_score": {"above": 1, "of": 2},
        "anomaly_score": {"above": 1, "of": 2},
    }


def test_the_real_scans_are_copied_as_exported(shared_data, tmp_path):
    truth = write_real_scans(shared_data / "nifti", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(REAL_SCANS)
    assert len(list((tmp_path / "real-glioma-tcga").iterdir())) == 4
    assert sorted(p.name for p in (tmp_path / "real-pd").iterdir()) == [
        "chris_PD.nii.gz",
        "chris_t1.nii.gz",
    ]
    lesions = truth[truth["truth"] == 1]
    assert set(lesions["contrast"]) == {"T2w", "FLAIR"}
    assert truth.loc[truth["truth"] == 0, "folder"].tolist() == ["real-healthy-t2"]
