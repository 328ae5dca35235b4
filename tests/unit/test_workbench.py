"""The report workbench's data (mriaudit.report.workbench): every subject, its pictures, PCA."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from mriaudit import paths
from mriaudit.report import workbench


def frame(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "folder": [f"sub-{i:02d}" for i in range(n)],
            "bids_id": [f"{i:02d}" for i in range(n)],
            "status": ["ok"] * (n - 1) + ["failed"],
            "flagged": [False] * (n - 2) + [True, True],
            "failed_stage": [""] * (n - 1) + ["convert"],
            "flag_reasons": [""] * (n - 2) + ["audit score", "failed"],
            "scanner_group": ["A"] * (n // 2) + ["B"] * (n - n // 2),
            "audit_score": rng.normal(0, 1, n),
            "anomaly_score": rng.normal(0, 1, n),
            "iqm_cjv": rng.normal(0.4, 0.05, n),
            "iqm_snr_total": rng.normal(10, 1, n),
        }
    )


def pictures(out, bids_ids):
    for bids_id in bids_ids:
        for build in (paths.native_thumbnail, paths.anomaly_thumbnail):
            build(out, bids_id).parent.mkdir(parents=True, exist_ok=True)
            build(out, bids_id).write_bytes(b"RIFF0000WEBP" + bids_id.encode())


def test_every_subject_gets_its_pictures_inline_up_to_the_cap(tmp_path):
    table = frame(6)
    pictures(tmp_path, table["bids_id"][:-1])  # the failed subject has none
    page = tmp_path / "cohort" / "report.html"
    data, note = workbench.cohort_data(table, tmp_path, page=page, threshold=3.0, run="r1")
    assert note == "" and data["run_id"] == "r1" and data["threshold"] == 3.0
    assert [s["folder"] for s in data["subjects"]] == table["folder"].tolist()
    assert all(s["native"].startswith("data:image/webp;base64,") for s in data["subjects"][:-1])
    assert data["subjects"][-1]["native"] == data["subjects"][-1]["registered"] == ""
    assert [m["key"] for m in data["metrics"]] == [
        "audit_score",
        "anomaly_score",
        "iqm_cjv",
        "iqm_snr_total",
    ]
    assert data["groups"] == ["A", "B"] and data["subjects"][0]["group"] == 0
    # The embedding places every ok subject; the failed one is left out.
    assert all(s["xy"] is not None for s in data["subjects"][:-1])
    assert data["subjects"][-1]["xy"] is None and len(data["pca"]["explained"]) == 2


def test_above_the_cap_the_pictures_go_beside_the_page(tmp_path):
    table = frame(5)
    pictures(tmp_path, table["bids_id"])
    page = tmp_path / "cohort" / "report.html"
    stale = page.parent / workbench.SIDECAR / "old.webp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"stale")
    data, note = workbench.cohort_data(table, tmp_path, page=page, threshold=None, max_inline=3)
    assert "report_files/" in note and "max_subjects_inline (3)" in note
    first = data["subjects"][0]
    assert first["native"] == f"{workbench.SIDECAR}/00_native.webp"
    assert (page.parent / first["native"]).read_bytes().endswith(b"00")
    assert not stale.exists()


def test_the_embedded_json_cannot_end_its_script_element():
    text = workbench.script_json({"folder": "</script><script>alert(1)</script><!--"})
    assert "<" not in text
    assert json.loads(text)["folder"].startswith("</script>")
