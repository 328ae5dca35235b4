"""The score job's machinery: the read-ahead/write-behind pipeline, batches of subjects,
``only``, and a crash in a worker that costs only the subject that caused it.

The checkpoint is synthetic (``bench_model``: untrained fold networks of the
default architecture and a uniform calibration), so nothing here trains.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mriaudit import paths
from mriaudit.bench_model import _write_cohort
from mriaudit.model import pipeline, score
from mriaudit.model.score import score_cohort
from mriaudit.model.scorer import Scorer
from mriaudit.records import read_record

PROJECT = Path(__file__).resolve().parents[2]


# --- pipeline.run ----------------------------------------------------------------------


def test_pipeline_computes_in_order_in_batches_and_finishes_everything():
    computed: list[list[int]] = []
    finished: dict[int, pipeline.Outcome] = {}
    lock = threading.Lock()

    def finish(outcome):
        with lock:
            finished[outcome.item] = outcome

    def compute(batch):
        computed.append(list(batch))
        time.sleep(0.01)
        return [10 * b for b in batch]

    pipeline.run(
        range(7),
        prepare=lambda i: i,
        compute=compute,
        finish=finish,
        batch_size=3,
        readers=2,
        writers=2,
    )
    assert [i for batch in computed for i in batch] == list(range(7))
    assert all(len(batch) <= 3 for batch in computed) and len(computed[0]) == 3
    assert sorted(finished) == list(range(7))
    assert all(finished[i].result == 10 * i and finished[i].error is None for i in range(7))
    # Each item's share of its batch's compute time.
    assert all(finished[i].cost.wall_s >= 0.01 / 3 * 0.9 for i in range(7))


def test_pipeline_errors_belong_to_their_item():
    outcomes: dict[int, pipeline.Outcome] = {}
    batches: list[list[int]] = []

    def prepare(i):
        if i == 2:
            raise ValueError("unreadable")
        return i

    def compute(batch):
        batches.append(list(batch))
        if 5 in batch:
            raise RuntimeError("bad values")
        return [-b for b in batch]

    pipeline.run(
        range(8),
        prepare=prepare,
        compute=compute,
        finish=lambda o: outcomes.__setitem__(o.item, o),
        batch_size=4,
    )
    assert isinstance(outcomes[2].error, ValueError) and outcomes[2].result is None
    assert isinstance(outcomes[5].error, RuntimeError)
    # 2 never reached the device; the batch that failed was computed again one item
    # at a time, so only 5 failed.
    assert batches == [[0, 1, 3, 4], [5, 6, 7], [5], [6], [7]]
    assert [outcomes[i].result for i in (0, 1, 3, 4, 6, 7)] == [0, -1, -3, -4, -6, -7]


def test_pipeline_raises_what_finish_raises():
    def finish(outcome):
        if outcome.item == 3:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        pipeline.run(range(6), prepare=lambda i: i, compute=list, finish=finish)


# --- the score job on a synthetic checkpoint -------------------------------------------


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> dict[str, Path]:
    """Four subjects and a checkpoint of two untrained fold models; subject 1 is a
    reference subject of fold 1 (scored by that model alone), the others by both."""
    root = tmp_path_factory.mktemp("synthetic")
    where = _write_cohort(root, subjects=4, folds=2, resolution=2)
    state = torch.load(where["checkpoint"], weights_only=True)
    from mriaudit import files

    image = paths.preproc(where["out"], "bench00001", res=2)
    state["fold_assignment"] = {"bench00001": 1}
    state["reference_sha256"] = {"bench00001": files.sha256(image)}
    torch.save(state, where["checkpoint"])
    return where


def test_a_batch_of_subjects_scores_as_one_by_one(synthetic):
    scorer = Scorer.load(synthetic["checkpoint"], device="cpu", threads=1)
    out = synthetic["out"]
    prepared = [
        scorer.prepare(paths.preproc(out, f"bench{i:05d}", res=2), f"bench{i:05d}")
        for i in range(3)
    ]
    assert [p.folds for p in prepared] == [[0, 1], [1], [0, 1]]
    together = scorer.compute(prepared)
    for one, alone in zip(together, (scorer.compute([p])[0] for p in prepared), strict=True):
        # Other batches, other float sums in the network: the last digits move.
        np.testing.assert_allclose(one.anomaly, alone.anomaly, rtol=1e-4, atol=1e-4)
        for key, value in one.metrics.items():
            assert value == pytest.approx(alone.metrics[key], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("pipelined", [False, True])
def test_score_cohort_scores_only_the_named_rows(synthetic, tmp_path, monkeypatch, pipelined):
    monkeypatch.setattr(score, "PIPELINE_ON_CPU", pipelined)
    out = synthetic["out"]
    table = score_cohort(
        synthetic["table"],
        checkpoint=synthetic["checkpoint"],
        out_dir=out,
        out_table=tmp_path / "scores.tsv",
        resolution=2,
        device="cpu",
        threads=2,
        only=["bench00003", "bench00001"],
    )
    assert list(table["bids_id"]) == ["bench00001", "bench00003"]  # the stage table's order
    assert list(table["status"]) == ["ok", "ok"]
    assert list(table["fold"].fillna(-1)) == [1, -1] and list(table["in_reference"]) == [
        True,
        False,
    ]
    written = (tmp_path / "scores.tsv").read_text().splitlines()
    assert len(written) == 3 and written[1].startswith("bench00001\t")
    record = read_record(paths.record(out, "bench00003", "score"))
    assert record["elapsed_s"] > 0 and record["cpu_s"] > 0 and len(record["top_regions"]) == 3
    assert paths.anomaly_map(out, "bench00003", res=2).is_file()
    assert paths.anomaly_thumbnail(out, "bench00003").is_file()
    assert not paths.record(out, "bench00000", "score").exists()
    with pytest.raises(ValueError, match="not in the stage table"):
        score_cohort(
            synthetic["table"],
            checkpoint=synthetic["checkpoint"],
            out_dir=out,
            out_table=tmp_path / "none.tsv",
            resolution=2,
            device="cpu",
            only=["nobody"],
        )


def test_the_pipeline_writes_what_one_by_one_writes(synthetic, tmp_path, monkeypatch):
    out = synthetic["out"]
    written = {}
    for pipelined in (False, True):
        monkeypatch.setattr(score, "PIPELINE_ON_CPU", pipelined)
        score_cohort(
            synthetic["table"],
            checkpoint=synthetic["checkpoint"],
            out_dir=out,
            out_table=tmp_path / "scores.tsv",
            resolution=2,
            device="cpu",
            threads=1,
        )
        written[pipelined] = {
            i: (
                read_record(paths.record(out, f"bench{i:05d}", "score")),
                paths.anomaly_map(out, f"bench{i:05d}", res=2).read_bytes(),
            )
            for i in range(4)
        }
    timing = {"elapsed_s", "cpu_s", "peak_rss_mb"}
    for i in range(4):
        (one, map_one), (piped, map_piped) = written[False][i], written[True][i]
        assert {k: v for k, v in one.items() if k not in timing} == {
            k: v for k, v in piped.items() if k not in timing
        }
        assert map_one == map_piped
        assert set(piped) >= timing and piped["elapsed_s"] > 0


CRASHING_JOB = """
import faulthandler, logging, os, signal, sys
from pathlib import Path
from mriaudit.model import score, scorer

faulthandler.disable()
prepare = scorer.Scorer.prepare


def crash_on_two(self, image, subject):
    if subject == "bench00002":  # a native crash while this subject is read ahead
        os.kill(os.getpid(), signal.SIGSEGV)
    return prepare(self, image, subject)


scorer.Scorer.prepare = crash_on_two
score.PIPELINE_ON_CPU = True  # the GPU's path: subjects read ahead in a thread
root = Path(sys.argv[1])
score.score_cohort(
    root / "stages.tsv",
    checkpoint=root / "model.pt",
    out_dir=root / "out",
    out_table=root / "scores.tsv",
    resolution=2,
    device="cpu",
    threads=2,
)
"""


def test_a_crash_while_reading_ahead_costs_only_its_subject(synthetic):
    """Workers fork as in the score job (a fresh process); the crash happens in a
    reader thread while the worker computes another subject."""
    root = synthetic["out"].parent
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_JOB, str(root)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(PROJECT / "src")},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    statuses = {}
    for i in range(4):
        record = read_record(paths.record(synthetic["out"], f"bench{i:05d}", "score"))
        statuses[i] = (record["status"], record["reason"])
    assert statuses[2] == ("failed", "score: crashed (killed by SIGSEGV)")
    assert all(statuses[i] == ("ok", "") for i in (0, 1, 3)), statuses
    table = (root / "scores.tsv").read_text()
    assert "bench00002\tfailed" in table
