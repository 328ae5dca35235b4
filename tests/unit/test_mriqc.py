"""MRIQC compatibility: names, export layout, import, agreement (mriaudit.mriqc)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mriaudit import mriqc
from mriaudit.bench_mriqc import degrade
from mriaudit.iqm.metrics import IQM_NAMES

IDS = ["01", "02", "03_ses-1_run-2", "04", "05"]


def _scores(seed: int = 0) -> pd.DataFrame:
    """A small scores table: every IQM column, one failed subject, one without tissues."""
    rng = np.random.default_rng(seed)
    rows = []
    for i, bids_id in enumerate([*IDS, "06"]):
        row: dict[str, object] = {"folder": f"sub-{bids_id}", "bids_id": bids_id, "status": "ok"}
        for name in (*IQM_NAMES, "iqm_inu_med", "iqm_inu_range"):
            row[name] = float(rng.uniform(0.5, 2.0))
        for axis, spacing in zip("xyz", (1.0, 1.2, 0.9), strict=True):
            row[f"iqm_spacing_{axis}"] = spacing
            row[f"iqm_size_{axis}"] = 160 + i
        row["iqm_fwhm_avg"] = float(np.mean([row[f"iqm_fwhm_{a}"] for a in "xyz"]))
        rows.append(row)
    frame = pd.DataFrame(rows)
    frame.loc[frame["bids_id"] == "04", "iqm_cjv"] = math.nan  # no segmentation
    failed = frame["bids_id"] == "06"
    frame.loc[failed, "status"] = "failed"
    frame.loc[failed, [c for c in frame.columns if c.startswith("iqm_")]] = math.nan
    return frame


def test_names_are_mriqc_24s_and_leave_out_other_definitions():
    assert mriqc.MRIQC_NAMES["iqm_cjv"] == "cjv"
    assert mriqc.MRIQC_NAMES["iqm_snrd_total"] == "snrd_total"
    assert mriqc.MRIQC_NAMES["iqm_tpm_overlap_csf"] == "tpm_overlap_csf"
    for ours, theirs in mriqc.MRIQC_NAMES.items():
        assert ours == f"iqm_{theirs}"
        assert ours in IQM_NAMES
    for other in ("iqm_rpve_wm", "iqm_summary_bg_mad", "iqm_ghost_ratio", "iqm_inu_range"):
        assert other not in mriqc.MRIQC_NAMES
    assert mriqc.bids_id_of("sub-01_ses-1_run-2_T1w") == "01_ses-1_run-2"
    assert mriqc.bids_id_of("sub-01_T1w.json") == "01"
    with pytest.raises(ValueError, match="sub-01_bold"):
        mriqc.bids_id_of("sub-01_bold")


def test_export_writes_mriqc_layout(tmp_path: Path):
    scores = _scores()
    written = mriqc.export_mriqc(scores, out_dir=tmp_path, version="1.2.3")
    group = tmp_path / "group_T1w.tsv"
    assert written[0] == group
    table = pd.read_csv(group, sep="\t", dtype={"bids_name": str})
    assert list(table.columns) == ["bids_name", *sorted(mriqc.MRIQC_NAMES.values())]
    # The failed subject is left out; the one without tissues stays, CJV empty.
    assert list(table["bids_name"]) == [f"sub-{i}_T1w" for i in IDS]
    assert table.loc[table["bids_name"] == "sub-04_T1w", "cjv"].isna().all()
    session = tmp_path / "sub-03" / "ses-1" / "anat" / "sub-03_ses-1_run-2_T1w.json"
    assert session in written
    assert (tmp_path / "sub-01" / "anat" / "sub-01_T1w.json").is_file()
    assert not list(tmp_path.glob("sub-06*"))
    document = json.loads(session.read_text())
    assert set(mriqc.MRIQC_NAMES.values()) <= set(document)
    assert document["provenance"]["software"] == "mriaudit"
    assert document["provenance"]["version"] == "1.2.3"
    assert document["bids_meta"]["subject"] == "03"
    assert document["bids_meta"]["session"] == "1"
    assert document["bids_meta"]["run"] == "2"
    assert document["bids_meta"]["modality"] == "T1w"
    # FWHM in voxels (MRIQC's unit): our mm over the spacing.
    row = scores.set_index("bids_id").loc["03_ses-1_run-2"]
    assert document["fwhm_y"] == pytest.approx(row["iqm_fwhm_y"] / 1.2)
    assert document["size_x"] == 162
    assert json.loads((tmp_path / "sub-04" / "anat" / "sub-04_T1w.json").read_text())["cjv"] is None


@pytest.mark.parametrize("source", ["tsv", "json"])
def test_export_then_read_gives_back_values_and_ids(tmp_path: Path, source: str):
    scores = _scores()
    mriqc.export_mriqc(scores, out_dir=tmp_path, version="1")
    if source == "json":
        (tmp_path / "group_T1w.tsv").unlink()
    back = mriqc.read_mriqc(tmp_path)
    assert list(back.index) == IDS
    assert set(back.columns) == set(mriqc.MRIQC_NAMES)
    expected = scores.set_index("bids_id").loc[IDS, list(back.columns)]
    np.testing.assert_allclose(back.to_numpy(float), expected.to_numpy(float), rtol=1e-9)


def test_agreement_ranks_and_medians():
    rng = np.random.default_rng(1)
    ids = [f"{i:02d}" for i in range(30)]
    values = rng.uniform(0.3, 0.6, len(ids))
    ours = pd.DataFrame({"iqm_cjv": values, "iqm_efc": values, "iqm_cnr": values[:]}, index=ids)
    theirs = pd.DataFrame(
        {
            "iqm_cjv": 2.0 * values,  # same ranks, twice the value
            "iqm_efc": -values,  # reversed ranks
            "iqm_cnr": values,
        },
        index=ids,
    )
    theirs.loc[ids[:28], "iqm_cnr"] = math.nan  # two pairs left
    theirs.loc["extra"] = 1.0  # not in ours: ignored
    table = mriqc.agreement(ours, theirs).set_index("metric")
    assert list(table.index) == ["iqm_cjv", "iqm_cnr", "iqm_efc"]
    assert table.loc["iqm_cjv", "n"] == 30
    assert table.loc["iqm_cjv", "rho"] == pytest.approx(1.0)
    assert table.loc["iqm_efc", "rho"] == pytest.approx(-1.0)
    assert table.loc["iqm_cjv", "median_abs_rel_diff"] == pytest.approx(0.5)
    assert table.loc["iqm_cjv", "median_theirs"] == pytest.approx(2 * np.median(values))
    assert table.loc["iqm_cnr", "n"] == 2
    assert math.isnan(table.loc["iqm_cnr", "rho"])
    # A perturbed copy: rank agreement falls with the perturbation.
    noisy = ours.copy()
    noisy["iqm_cjv"] = values + rng.normal(0, 0.05, len(ids))
    expected = pd.Series(values).corr(pd.Series(noisy["iqm_cjv"].to_numpy()), method="spearman")
    rho = mriqc.agreement(ours, noisy).set_index("metric").loc["iqm_cjv", "rho"]
    assert rho == pytest.approx(expected)
    assert 0.5 < rho < 1.0


def test_read_mriqc_names_the_bad_path(tmp_path: Path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        mriqc.read_mriqc(missing)
    empty = tmp_path / "empty"
    (empty / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(ValueError, match=re.escape(str(empty))):
        mriqc.read_mriqc(empty)
    (empty / "sub-01" / "anat" / "sub-01_T1w.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape("sub-01_T1w.json")):
        mriqc.read_mriqc(empty)


def test_export_refuses_repeated_ids(tmp_path: Path):
    scores = pd.concat([_scores().head(2), _scores().head(1)])
    with pytest.raises(ValueError, match="01"):
        mriqc.export_mriqc(scores, out_dir=tmp_path, version="1")


def test_bench_degradations_are_fixed_and_graded():
    data = np.zeros((16, 16, 8), dtype=np.float32)
    data[4:12, 2:6] = 100.0
    ghost = degrade(data, kind="ghost", level=0.2, axis=1)
    assert ghost[4:12, 10:14].max() == pytest.approx(20.0)
    assert ghost[4:12, 2:6].min() == pytest.approx(100.0)
    first = degrade(data, kind="noise", level=0.05, axis=1, seed=3)
    np.testing.assert_array_equal(first, degrade(data, kind="noise", level=0.05, axis=1, seed=3))
    stronger = degrade(data, kind="noise", level=0.2, axis=1, seed=3)
    assert stronger[data == 0].std() > first[data == 0].std() > 0
    with pytest.raises(ValueError, match="blur"):
        degrade(data, kind="blur", level=1.0, axis=0)
