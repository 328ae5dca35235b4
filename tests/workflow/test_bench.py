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
    assert scale["subjects"] == 40
    assert scale["dry_run_40_s"] > 0 and scale["aggregate_report_40_s"] > 0
    assert scale["aggregate_report_peak_rss_mb"] > 50  # the process really ran pandas
    assert scale["report_mb"] > 0
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    printed = capsys.readouterr().out
    assert "scale (40 subjects)" in printed and "aggregate + report" in printed
    budget = result["report_budget"]
    assert budget["subjects"] == 30 and budget["report_mb"] > 0.1  # 30 subjects' pictures inline
    assert "report of 30 subjects, every picture inline" in printed
