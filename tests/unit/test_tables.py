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


def test_user_tables_are_validated_against_their_schema(tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("folder\ttruth\tlesion_radius_mm\nsub-01\t1\t4\nsub-02\t\t\n\nsub-03\t0\t\n")
    table = tables.read_user_tsv(labels, "labels", what="labels file")
    assert table["folder"].tolist() == ["sub-01", "sub-02", "sub-03"]  # the blank row is dropped
    assert table["truth"].tolist()[0] == 1 and np.isnan(table["truth"].tolist()[1])
    labels.write_text("folder\ttruth\nsub-01\tyes\nsub-02\t2\n")
    with pytest.raises(ValueError, match=r"column 'truth' has 2 bad value\(s\) \(line 2: 'yes'"):
        tables.read_user_tsv(labels, "labels", what="labels file")
    labels.write_text("folder\ttruth\tlesion_radius_mm\nsub-01\t1\t-3\n")
    with pytest.raises(ValueError, match="lesion_radius_mm"):
        tables.read_user_tsv(labels, "labels", what="labels file")
    labels.write_text("name\ttruth\nsub-01\t1\n")
    with pytest.raises(ValueError, match=r"labels file .*: missing column\(s\) folder"):
        tables.read_user_tsv(labels, "labels", what="labels file")


def test_old_column_names_of_a_user_table_are_read_with_a_warning(tmp_path, caplog):
    labels = tmp_path / "labels.tsv"
    labels.write_text("subject\tlabel\nsub-01\t1\n")
    table = tables.read_user_tsv(labels, "labels", what="labels file")
    assert table[["folder", "truth"]].values.tolist() == [["sub-01", 1]]
    assert "subject -> folder, label -> truth" in caplog.text


def test_a_scores_table_that_breaks_its_schema_is_named():
    frame = pd.DataFrame(
        {
            "folder": ["a", "b"],
            "bids_id": ["a", "b"],
            "status": ["ok", "fine"],
            "reason": ["", ""],
            "audit_score": [1.0, 2.0],
            "anomaly_score": [0.5, np.nan],
            "flagged": [True, False],
            "flag_reasons": ["", ""],
            "findings": ["", ""],
        }
    )
    with pytest.raises(
        ValueError, match=r"t: column 'status' has 1 bad value\(s\) \(line 3: 'fine'\)"
    ):
        tables.validate(frame, "scores", source="t")
    frame.loc[1, "status"] = "ok"
    checked = tables.validate(frame, "scores", source="t")
    assert checked["in_reference"].tolist() == [False, False]  # the schema's default
    with pytest.raises(ValueError, match="unknown column 'mystery'"):
        tables.validate(frame.assign(mystery=1), "scores", source="t")


def test_every_table_schema_is_a_valid_json_schema():
    import jsonschema

    for path in tables.SCHEMAS.glob("*.schema.yaml"):
        schema = tables.load_schema(path.name.removesuffix(".schema.yaml"))
        jsonschema.Draft202012Validator.check_schema(schema)
        for name, spec in schema.get("properties", {}).items():
            assert spec.get("description"), f"{path.name}: {name} has no description"
