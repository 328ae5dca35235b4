"""A BIDS root as the cohort: sessions and runs as their own units, participants.tsv, pybids' index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mriaudit import aggregate, bids_input, cohort, paths


def _touch(path: Path, text: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def bids_root(root: Path) -> Path:
    """sub-01 with two sessions, sub-02 with two T1w runs (and a T2w), sub-03 plain,
    sub-04 with no image at all; participants.tsv with age, sex and site."""
    _touch(root / "dataset_description.json", json.dumps({"Name": "t", "BIDSVersion": "1.10.0"}))
    for name in (
        "sub-01/ses-1/anat/sub-01_ses-1_T1w.nii.gz",
        "sub-01/ses-2/anat/sub-01_ses-2_T1w.nii.gz",
        "sub-02/anat/sub-02_run-1_T1w.nii.gz",
        "sub-02/anat/sub-02_run-2_T1w.nii.gz",
        "sub-02/anat/sub-02_T2w.nii.gz",
        "sub-03/anat/sub-03_T1w.nii.gz",
    ):
        _touch(root / name)
        _touch(root / name.replace(".nii.gz", ".json"), "{}")
    (root / "sub-04").mkdir()
    _touch(
        root / "participants.tsv",
        "participant_id\tage\tsex\tsite\nsub-01\t34\tF\tOslo\nsub-02\tn/a\tM\tLyon\n"
        "sub-03\t61\tF\tOslo\n",
    )
    return root


def test_sessions_and_runs_are_units_of_their_own(tmp_path):
    root = bids_root(tmp_path / "bids")
    units = {s.folder: s for s in cohort.list_subjects(root)}
    assert list(units) == [
        "sub-01_ses-1",
        "sub-01_ses-2",
        "sub-02_run-1",
        "sub-02_run-2",
        "sub-03",
        "sub-04",
    ]
    assert units["sub-01_ses-2"].bids_id == "01_ses-2"
    assert units["sub-01_ses-2"].entry == "sub-01/ses-2" and units["sub-01_ses-2"].session == "2"
    run = units["sub-02_run-2"]
    assert (run.bids_id, run.run, run.entry) == ("02_run-2", "2", "sub-02")
    # A run sees its own T1w only, not the other run's; and the session's T2w, which has
    # no run of its own.
    assert run.files == (
        "anat/sub-02_run-2_T1w.nii.gz",
        "anat/sub-02_run-2_T1w.json",
        "anat/sub-02_T2w.nii.gz",
        "anat/sub-02_T2w.json",
    )
    assert units["sub-03"].files == () and units["sub-03"].bids_id == "03"
    assert units["sub-04"].processed  # no image: audited, and reported as having none
    # Outputs follow the BIDS layout of the input.
    assert paths.t1w("/o", run.bids_id).as_posix() == "/o/sub-02/anat/sub-02_run-2_T1w.nii.gz"
    assert paths.subject_dir("/o", "01_ses-2").as_posix() == "/o/sub-01/ses-2"
    # Sessions and runs of one person train in one fold.
    groups = cohort.read_fold_groups("", subjects=list(units.values()))
    assert groups == {
        "01_ses-1": "sub-01",
        "01_ses-2": "sub-01",
        "02_run-1": "sub-02",
        "02_run-2": "sub-02",
    }


def test_a_relative_input_dir_lists_the_same_units(tmp_path, monkeypatch):
    root = bids_root(tmp_path / "bids")
    monkeypatch.chdir(tmp_path)
    assert cohort.list_subjects("bids") == cohort.list_subjects(root)


def test_the_index_is_kept_and_renewed_when_the_dataset_changes(tmp_path):
    root, cache = bids_root(tmp_path / "bids"), tmp_path / "cache"
    first = cohort.list_subjects(root, cache_dir=cache)
    (kept,) = cache.glob("pybids-*")
    assert cohort.list_subjects(root, cache_dir=cache) == first
    assert list(cache.glob("pybids-*")) == [kept]
    _touch(root / "sub-03/ses-2/anat/sub-03_ses-2_T1w.nii.gz")
    renewed = cohort.list_subjects(root, cache_dir=cache)
    assert "sub-03_ses-2" in {s.folder for s in renewed}
    assert [p.name for p in cache.glob("pybids-*")] != [kept.name]


def test_participants_travel_by_subject(tmp_path):
    root = bids_root(tmp_path / "bids")
    units = cohort.list_subjects(root)
    columns = aggregate.scores.participant_columns(root, units)
    assert set(columns) == {"participant_age", "participant_sex", "participant_site"}
    assert columns["participant_site"] == ["Oslo", "Oslo", "Lyon", "Lyon", "Oslo", None]
    ages = columns["participant_age"]
    assert ages[0] == 34 and ages[4] == 61 and ages[2] != ages[2]  # n/a is missing
    bad = tmp_path / "bad"
    _touch(bad / "participants.tsv", "id\tage\n")
    with pytest.raises(ValueError, match="participant_id"):
        bids_input.read_participants(bad)
    assert aggregate.scores.participant_columns(tmp_path, units) == {}
