"""The benchmark command: its scale part on a small cohort writes the contract's keys."""

from __future__ import annotations

import json

import pytest

from mriaudit import bench

pytestmark = pytest.mark.workflow


def test_scale_part_writes_figures_and_a_table(tmp_path, capsys):
    assert (
        bench.main(
            [
                "--skip-subject",
                "--subjects",
                "40",
                "--report-subjects",
                "30",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "bench.json").read_text())
    scale = result["scale"]
    assert scale["subjects"] == [40]
    assert scale["dry_run_40_s"] > 0 and scale["aggregate_report_40_s"] > 0
    assert scale["dry_run_40_peak_rss_mb"] > 50 and scale["aggregate_report_40_peak_rss_mb"] > 50
    assert scale["report_40_mb"] > 0
    # 40 subjects: 2 preprocess groups of 25, collect, train, 1 score job, the cohort group.
    assert scale["slurm_jobs_40_by_kind"] == {
        "collect": 1,
        "group cohort": 1,
        "group subject": 2,
        "score": 1,
        "train_model": 1,
    }
    assert scale["slurm_jobs_40"] == 6
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    printed = capsys.readouterr().out
    assert "scale (40 subjects)" in printed and "aggregate + report" in printed
    assert "SLURM submissions of the plan" in printed
    budget = result["report_budget"]
    assert budget["subjects"] == 30 and budget["report_mb"] > 0.1  # 30 subjects' pictures inline
    assert "report of 30 subjects, every picture inline" in printed
