"""The report's scanner view: group counts, score strips and batch-effect call-outs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from mriaudit.report import sites


def _cohort(groups: dict[str, tuple[int, int]], seed: int = 0) -> pd.DataFrame:
    """Rows per group name: (subjects, flagged); flagged rows score above 3."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, (n, n_flagged) in groups.items():
        for i in range(n):
            flagged = i < n_flagged
            rows.append(
                {
                    "folder": f"{name}-{i}",
                    "status": "ok",
                    "scanner_group": name,
                    "flagged": flagged,
                    "audit_score": float(rng.uniform(4, 40) if flagged else rng.uniform(1, 2.5)),
                }
            )
    return pd.DataFrame(rows)


def test_a_scanner_flagged_far_more_often_is_called_out():
    frame = _cohort(
        {"SIEMENS Prisma 3T": (40, 3), "GE Signa 1.5T": (10, 7), "PHILIPS Ingenia": (12, 1)}
    )
    view = sites.scanner_view(frame, threshold=3.0)
    assert [g.name for g in view.groups] == [
        "SIEMENS Prisma 3T",
        "PHILIPS Ingenia",
        "GE Signa 1.5T",
    ]
    ge = view.groups[2]
    assert (ge.n, ge.n_ok, ge.n_flagged) == (10, 10, 7) and math.isclose(ge.flagged_rate, 0.7)
    assert len(ge.strip) == 10 and sum(flag for _, flag in ge.strip) == 7
    assert all(x > view.threshold_position for x, flag in ge.strip if flag)
    assert all(x < view.threshold_position for x, flag in ge.strip if not flag)
    assert ge.p_value < sites.ALPHA
    assert all(g.p_value >= sites.ALPHA for g in view.groups[:2])
    (note,) = view.notes
    assert note.startswith("Possible batch effect: GE Signa 1.5T: 7 of 10 flagged (70 %)")
    assert "4 of 52 (8 %)" in note and "Bonferroni over 3 groups" in note


def test_balanced_flags_small_groups_and_missing_headers_call_out_nothing():
    frame = _cohort({"A": (30, 3), "B": (10, 1), "": (4, 2)})
    frame.loc[frame["scanner_group"] == "", "scanner_group"] = np.nan
    view = sites.scanner_view(frame, threshold=3.0)
    assert {g.name for g in view.groups} == {"A", "B", sites.NO_HEADERS}
    # Two of four flagged is a high rate, but four subjects are no evidence of a batch.
    assert view.notes == []
    one = sites.scanner_view(_cohort({"A": (5, 4)}), threshold=3.0)
    assert one.notes == [] and math.isnan(one.groups[0].p_value)


def test_failed_rows_count_but_draw_no_dot():
    frame = _cohort({"A": (6, 0), "B": (6, 0)})
    frame.loc[0, ["status", "flagged", "audit_score"]] = ["failed", True, np.nan]
    view = sites.scanner_view(frame, threshold=3.0)
    a = next(g for g in view.groups if g.name == "A")
    assert (a.n, a.n_ok, a.n_flagged, len(a.strip)) == (6, 5, 1, 5)
    assert sites.scanner_view(frame.iloc[0:0], threshold=3.0).groups == []
