"""The one TSV dialect: what goes in comes back, one line per row, never half a file."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mriaudit import tables


def test_a_frame_round_trips_with_awkward_cells(tmp_path):
    frame = pd.DataFrame(
        {
            "subject": ["sub-01", 'say "hi"', "tab\there\nand line"],
            "score": [1.23456789012345, np.nan, -np.inf],
            "flagged": [True, False, np.True_],
            "n": [3, np.int64(4), 5],
        }
    )
    path = tmp_path / "t.tsv"
    tables.write_tsv(frame, path)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 and all(line.count("\t") == 3 for line in lines)
    assert lines[1] == "sub-01\t1.23456789\ttrue\t3"
    back = tables.read_tsv(path, text_columns=["subject"], bool_columns=["flagged"])
    assert back["subject"].tolist() == ["sub-01", 'say "hi"', "tab here and line"]
    assert back["flagged"].tolist() == [True, False, True]
    assert back["score"].iloc[0] == pytest.approx(1.23456789) and back["score"].isna().sum() == 2
    text = tables.read_tsv(path, text=True)
    assert text.loc[1, "score"] == "" and text.loc[2, "n"] == "5"
    assert [p.name for p in tmp_path.iterdir()] == ["t.tsv"]  # no temporary left behind


def test_rows_take_their_columns_and_digits(tmp_path):
    rows = [{"a": 0.123456789, "b": "x"}, {"a": None}]
    path = tmp_path / "r.tsv"
    tables.write_tsv(rows, path, columns=["b", "a"], digits=3)
    assert path.read_text() == "b\ta\nx\t0.123\n\t\n"
    with pytest.raises(ValueError, match="need their columns"):
        tables.write_tsv(rows, path)


def test_a_name_that_is_not_utf8_is_written_escaped(tmp_path):
    name = b"Patient \xe9".decode("utf-8", errors="surrogateescape")
    path = tmp_path / "n.tsv"
    tables.write_tsv(pd.DataFrame({"folder": [name]}), path)
    assert tables.read_tsv(path, text=True)["folder"].tolist() == ["Patient \\udce9"]
