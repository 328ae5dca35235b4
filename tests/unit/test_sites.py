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


def _participants(seed: int = 1) -> pd.DataFrame:
    """90 subjects at three sites (St Olav flagged 12 of 20 times, the others 2 of 35 each),
    with ages (four missing: one in the twenties, one in the thirties, two in the fifties),
    sex (F, M, one empty) and weight (evenly spread)."""
    frame = _cohort({"Oslo": (35, 2), "Bergen": (35, 2), "St Olav": (20, 12)}, seed=seed)
    frame["participant_site"] = frame.pop("scanner_group")
    frame["scanner_group"] = "SIEMENS Prisma 3T"
    ages = np.tile([21.0, 29.5, 34.0, 47.0, 58.0, 63.0], 15)
    ages[[0, 10, 40, 80]] = np.nan
    frame["participant_age"] = ages
    frame["participant_sex"] = [*(["F", "M"] * 45)[:89], np.nan]
    frame["participant_weight"] = np.linspace(50.0, 94.5, 90)
    frame["participant_study"] = "ABIDE"  # one group: no view
    return frame


def test_participant_columns_group_by_value_by_decade_and_by_quartile():
    frame = _participants()
    views = sites.participant_views(frame, threshold=3.0)
    assert [title for title, _ in views] == ["site", "age (bands)", "sex", "weight (bands)"]
    by_title = dict(views)
    site = by_title["site"]
    assert site.column == "participant_site" and site.title == "site"
    counts = {g.name: (g.n, g.n_flagged) for g in site.groups}
    assert counts == {"Oslo": (35, 2), "Bergen": (35, 2), "St Olav": (20, 12)}
    olav = next(g for g in site.groups if g.name == "St Olav")
    assert math.isclose(olav.flagged_rate, 0.6) and len(olav.strip) == 20
    (note,) = site.notes
    assert note.startswith("site St Olav is flagged more often than the rest: 12 of 20 flagged")
    assert "4 of 70 (6 %)" in note and "Bonferroni over 3 groups" in note

    age = by_title["age (bands)"]
    assert age.column == "participant_age"
    assert [(g.name, g.n) for g in age.groups] == [
        ("20\u201329", 29),
        ("30\u201339", 14),
        ("40\u201349", 15),
        ("50\u201359", 13),
        ("60\u201369", 15),
        (sites.NOT_GIVEN, 4),
    ]
    assert sum(g.n_flagged for g in age.groups) == 16

    sex = by_title["sex"]
    assert [(g.name, g.n) for g in sex.groups] == [("F", 45), ("M", 44), (sites.NOT_GIVEN, 1)]
    assert sex.notes == []

    weight = by_title["weight (bands)"]
    assert [g.name for g in weight.groups] == [
        "50\u201361",
        "61.5\u201372",
        "72.5\u201383",
        "83.5\u201394.5",
    ]
    assert [g.n for g in weight.groups] == [23, 22, 22, 23]


def test_few_numbers_group_by_value_and_bids_na_is_not_given():
    frame = _cohort({"A": (8, 1), "B": (8, 1)})
    frame["participant_handedness"] = [*([1.0, 2.0, 3.0, 2.0] * 4)[:15], np.nan]
    frame["participant_group"] = ["patient", "control", "n/a", ""] * 4
    views = dict(sites.participant_views(frame, threshold=3.0))
    assert [(g.name, g.n) for g in views["handedness"].groups] == [
        ("1", 4),
        ("2", 7),
        ("3", 4),
        (sites.NOT_GIVEN, 1),
    ]
    assert [(g.name, g.n) for g in views["group"].groups] == [
        ("control", 4),
        ("patient", 4),
        (sites.NOT_GIVEN, 8),
    ]


def test_no_participant_columns_one_group_or_too_many_give_no_view():
    frame = _cohort({"A": (40, 3), "B": (10, 7)})
    assert sites.participant_views(frame, threshold=3.0) == []
    frame["participant_site"] = "Oslo"
    frame["participant_empty"] = np.nan
    frame["participant_code"] = [f"c{i % 40}" for i in range(50)]  # 40 groups
    frame["participant_id_like"] = [f"s{i}" for i in range(50)]  # one row per group
    assert sites.participant_views(frame, threshold=3.0) == []
    assert sites.participant_views(frame.iloc[0:0], threshold=3.0) == []


def test_the_report_has_a_table_per_participant_column(tmp_path):
    from mriaudit import paths
    from mriaudit.demo.records import synthetic_cohort
    from mriaudit.tables import write_tsv
    from tests.unit.test_aggregate import run_aggregate
    from tests.unit.test_report import parse, render

    cohort = synthetic_cohort(tmp_path, 24)
    frame = run_aggregate(cohort, labels=False)
    names = ["Oslo", "<b>St Olav</b>", "Bergen"]
    frame["participant_site"] = [names[i % 3] for i in range(len(frame))]
    frame["participant_age"] = [20.0 + 3 * i for i in range(len(frame))]
    write_tsv(frame, paths.cohort_dir(cohort["out"]) / "scores.tsv")
    html = render(cohort, with_metrics=False)
    assert "participants" in parse(html).ids and "<h2>By participant</h2>" in html
    assert 'data-column="participant_site"' in html and 'data-column="participant_age"' in html
    assert 'data-group="Oslo"' in html and 'data-group="20\u201329"' in html
    assert "&lt;b&gt;St Olav&lt;/b&gt;" in html and "<b>St Olav" not in html
    assert 'id="scanner-groups" data-column="scanner_group"' in html
