"""The benchmark command: its scale part on a small cohort writes the contract's keys."""

from __future__ import annotations

import json

import pytest

from mriaudit import bench, bench_model

pytestmark = pytest.mark.workflow


def test_scale_part_writes_figures_and_a_table(tmp_path, capsys):
    assert (
        bench.main(
            [
                "--skip-subject",
                "--skip-model",
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
    # 40 subjects: 2 preprocess groups of 25, collect, train, 1 score job, the cohort group;
    # a training and a score job per contrast beside the T1w (T2w, FLAIR).
    assert scale["slurm_jobs_40_by_kind"] == {
        "collect": 1,
        "group cohort": 1,
        "group subject": 2,
        "score": 1,
        "train_model": 1,
        "score_contrast": 2,
        "train_contrast_model": 2,
    }
    assert scale["slurm_jobs_40"] == 10
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    printed = capsys.readouterr().out
    assert "scale (40 subjects)" in printed and "aggregate + report" in printed
    assert "SLURM submissions of the plan" in printed
    budget = result["report_budget"]
    assert budget["subjects"] == 30 and budget["report_mb"] > 0.1  # 30 subjects' pictures inline
    assert "report of 30 subjects, every picture inline" in printed


def test_model_part_measures_scoring_and_training_on_the_cpu():
    figures = bench_model.model_part(
        ["cpu"], threads=2, score_subjects={"cpu": 3}, epoch_subjects=3
    )
    scoring, epoch = figures["cpu"]["scoring"], figures["cpu"]["training_epoch"]
    assert scoring["scored"] == 3 and scoring["folds"] == 3 and scoring["subjects_per_s"] > 0
    assert epoch["epoch_s"] > 0 and epoch["subjects"] == 3
    assert figures["cpu"]["demo_training_estimate_s"] > epoch["epoch_s"]


def test_cuda_part_says_clearly_when_there_is_no_gpu(tmp_path, capsys):
    if bench_model.cuda_device():
        pytest.skip("a CUDA GPU is present: the GPU figures run instead")
    assert bench.main(["--device", "cuda", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["model"] == {"cuda": None}
    assert "scale" not in result and "per_subject" not in result
    assert "model on cuda: NOT MEASURED, no CUDA GPU on this machine" in capsys.readouterr().out
