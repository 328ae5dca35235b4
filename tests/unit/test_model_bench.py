"""The model's benchmark functions run on the CPU (figures are not asserted)."""

from __future__ import annotations

import json

import numpy as np

from mriaudit.bench_model import scoring_throughput, training_epoch_seconds


def test_scoring_throughput_scores_its_synthetic_cohort():
    figures = scoring_throughput(device="cpu", subjects=2, folds=2, threads=1)
    assert figures["scored"] == 2 and figures["subjects_per_s"] > 0
    assert figures["s_per_subject"] > 0 and figures["median_subject_s"] > 0
    assert json.loads(json.dumps(figures)) == figures


def test_training_epoch_seconds_trains_one_epoch():
    figures = training_epoch_seconds(device="cpu", subjects=2, threads=1)
    assert figures["device"] == "cpu" and figures["epoch_s"] > 0
    assert figures["slices_per_s"] > 0 and np.isfinite(figures["loss"])
