"""Very large cohorts: score shards, the capped training sample, streamed tables."""

from __future__ import annotations

import json
from collections import Counter

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from mriaudit import cohort, tables
from mriaudit.model.options import TrainOptions
from mriaudit.model.sample import stratified_cap
from mriaudit.model.train import train_cohort
from mriaudit.template import load_template


def test_score_shards_cover_the_cohort_once_in_order():
    ids = [f"{i:03d}" for i in range(10)]
    shards = cohort.score_shards(ids, subjects_per_job=4)
    assert list(shards) == ["000of003", "001of003", "002of003"]
    assert [len(v) for v in shards.values()] == [4, 4, 2]
    assert [b for shard in shards.values() for b in shard] == ids
    assert cohort.score_shards([], subjects_per_job=4) == {"000of001": []}
    assert list(cohort.score_shards(ids, subjects_per_job=100)) == ["000of001"]
    assert len(cohort.score_shards([str(i) for i in range(5000)], subjects_per_job=1)) == 5000
    assert (
        list(cohort.score_shards([str(i) for i in range(5000)], subjects_per_job=1))[-1]
        == "4999of5000"
    )
    with pytest.raises(ValueError, match="subjects_per_job"):
        cohort.score_shards(ids, subjects_per_job=0)


def test_concat_tsv_streams_parts_and_refuses_another_header(tmp_path):
    parts = []
    for k in range(3):
        part = tmp_path / f"part{k}.tsv"
        tables.write_tsv(pd.DataFrame({"bids_id": [f"{k}a", f"{k}b"], "x": [k, k + 0.5]}), part)
        parts.append(part)
    out = tmp_path / "all.tsv"
    assert tables.concat_tsv(parts, out) == 6
    merged = tables.read_tsv(out, text_columns=["bids_id"])
    assert merged["bids_id"].tolist() == ["0a", "0b", "1a", "1b", "2a", "2b"]
    assert merged["x"].tolist() == [0, 0.5, 1, 1.5, 2, 2.5]
    other = tmp_path / "other.tsv"
    tables.write_tsv(pd.DataFrame({"bids_id": ["z"], "y": [1]}), other)
    with pytest.raises(ValueError, match=r"other\.tsv: header"):
        tables.concat_tsv([parts[0], other], tmp_path / "bad.tsv")
    assert not (tmp_path / "bad.tsv").exists()


def _cohort(sizes: dict[str, int]) -> tuple[list[str], dict[str, str]]:
    ids, groups = [], {}
    for group, n in sizes.items():
        for i in range(n):
            bids_id = f"{group}{i:05d}"
            ids.append(bids_id)
            groups[bids_id] = group
    return ids, groups


def test_stratified_cap_keeps_every_scanner_in_proportion():
    ids, groups = _cohort({"A": 9000, "B": 900, "C": 95, "D": 5})
    chosen = stratified_cap(ids, max_subjects=1000, scanner_groups=groups, seed=3)
    assert len(chosen) == 1000 and len(set(chosen)) == 1000 and set(chosen) <= set(ids)
    counts = Counter(groups[s] for s in chosen)
    assert counts == {"A": 900, "B": 90, "C": 9, "D": 1}
    # Seeded: the same sample every time, another with another seed.
    assert chosen == stratified_cap(ids, max_subjects=1000, scanner_groups=groups, seed=3)
    assert chosen != stratified_cap(ids, max_subjects=1000, scanner_groups=groups, seed=4)
    # A small scanner group keeps one scan even where its share rounds to zero.
    counts = Counter(groups[s] for s in stratified_cap(ids, max_subjects=10, scanner_groups=groups))
    assert set(counts) == {"A", "B", "C", "D"} and sum(counts.values()) == 10


def test_stratified_cap_keeps_a_persons_sessions_together_and_small_cohorts_whole():
    ids = [f"{p:03d}_ses-{s}" for p in range(300) for s in (1, 2)]
    persons = {bids_id: bids_id.split("_")[0] for bids_id in ids}
    chosen = stratified_cap(ids, max_subjects=100, scanner_groups={}, fold_groups=persons)
    assert len(chosen) == 100
    sampled = Counter(persons[s] for s in chosen)
    assert set(sampled.values()) == {2}
    assert stratified_cap(ids[:50], max_subjects=100, scanner_groups={}) == sorted(ids[:50])
    with pytest.raises(ValueError, match="max_subjects"):
        stratified_cap(ids, max_subjects=0, scanner_groups={})


def test_a_capped_reference_trains_on_a_stratified_sample(tmp_path):
    template = load_template(resolution=2)
    data = np.asarray(template.get_fdata(), dtype=np.float32)
    rng = np.random.default_rng(0)
    ids = [f"{scanner}{i}" for scanner in ("a", "b") for i in range(4)]
    images, records = [], []
    for bids_id in ids:
        image = tmp_path / f"sub-{bids_id}_T1w.nii.gz"
        noisy = data * rng.uniform(500, 900) + rng.normal(0, 5, data.shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.abs(noisy).astype(np.float32), template.affine), image)
        record = tmp_path / f"sub-{bids_id}_desc-register_qc.json"
        record.write_text(json.dumps({"stage": "register", "status": "ok", "metrics": {}}))
        images.append(image)
        records.append(record)
    sidecar = train_cohort(
        images,
        records,
        ids,
        reference=ids,
        out_checkpoint=tmp_path / "model.pt",
        out_sidecar=tmp_path / "model.json",
        folds=2,
        epochs=1,
        device="cpu",
        threads=2,
        max_subjects=4,
        scanner_groups={bids_id: bids_id[0] for bids_id in ids},
        options=TrainOptions(slices_per_subject=2, calibration_subjects=2, atlas_updates=0),
    )
    assert sidecar["status"] == "ok", sidecar["reason"]
    assert sidecar["n_not_sampled"] == 4 and sidecar["n_reference"] == 4
    trained = sorted(sidecar["fold_assignment"])
    # Two of each scanner train; the other four are scored out of sample by both models.
    assert Counter(s[0] for s in trained) == {"a": 2, "b": 2}
