"""The project's one TSV dialect: how every table mriaudit writes is written and read.

Tab-separated, one header line, UTF-8 (bytes that are not, in folder names, as
backslash escapes), no quoting: tabs and line breaks inside a cell become one
space, so every line is one row and a file splits on tabs without a CSV
parser. An empty cell is a missing value, booleans are ``true``/``false``,
floats are written with ``digits`` significant digits. A table is written
atomically (a temporary sibling renamed over the target), so a reader never
sees half of one.

Files a user writes (the labels file, fold groups) are read by pandas' own
tolerant reader instead (:func:`read_user_tsv`): a spreadsheet may quote them.
Every table read from outside the run is checked against its schema
(``schemas/*.schema.yaml``, :func:`validate`), as the config is.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mriaudit import files

log = logging.getLogger(__name__)

#: What a cell may not hold: it would end the cell or the row.
_SEPARATORS = re.compile(r"[\t\r\n]+")
#: Significant digits of floats (scores, metrics) unless a table asks for fewer.
DIGITS = 10


def cell(value: Any, *, digits: int = DIGITS) -> str:
    """One value as the dialect writes it ("" for None, NA and non-finite floats)."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    if isinstance(value, float | np.floating):
        return f"{value:.{digits}g}" if math.isfinite(value) else ""
    if isinstance(value, int | np.integer):
        return str(int(value))
    return _SEPARATORS.sub(" ", str(value))


def write_tsv(
    table: pd.DataFrame | Sequence[Mapping[str, Any]],
    path: Path,
    *,
    columns: Sequence[str] | None = None,
    digits: int = DIGITS,
) -> None:
    """Write ``table`` (a frame, or rows as mappings with ``columns``) to ``path``.

    ``columns`` picks and orders the columns (all of a frame's by default; a
    row's missing key is an empty cell). Raises ``ValueError`` for rows without
    ``columns``.
    """
    if isinstance(table, pd.DataFrame):
        names = list(columns) if columns is not None else list(table.columns)
        rows: Iterable[Sequence[Any]] = zip(*(table[c].tolist() for c in names), strict=True)
    else:
        if columns is None:
            message = "write_tsv: rows given as mappings need their columns"
            raise ValueError(message)
        names = list(columns)
        rows = ([row.get(c) for c in names] for row in table)
    lines = ["\t".join(names)]
    lines += ["\t".join(cell(v, digits=digits) for v in row) for row in rows]
    files.write_text(path, "\n".join(lines) + "\n", errors="backslashreplace")


def read_tsv(
    path: Path,
    *,
    text: bool = False,
    text_columns: Iterable[str] = (),
    bool_columns: Iterable[str] = (),
) -> pd.DataFrame:
    """A table written by :func:`write_tsv`.

    ``text``: every cell as a string ("" for empty). Otherwise pandas infers
    numbers, an empty cell is NaN, ``text_columns`` stay strings ("" for
    empty) and ``bool_columns`` become booleans (``true`` is True).
    """
    text_columns, bool_columns = list(text_columns), list(bool_columns)
    frame = pd.read_csv(
        path,
        sep="\t",
        quoting=3,  # csv.QUOTE_NONE: the writer never quotes
        keep_default_na=False,
        na_values=[] if text else [""],
        dtype=str if text else {c: str for c in text_columns},
        encoding="utf-8",
    )
    if text:
        return frame
    for column in text_columns:
        if column in frame:
            frame[column] = frame[column].fillna("")
    for column in bool_columns:
        if column in frame:
            frame[column] = frame[column].astype(str).str.lower().eq("true")
    return frame


def concat_tsv(parts: Sequence[Path], path: Path) -> int:
    """Write the tables ``parts`` (same header each, written by :func:`write_tsv`) one after
    another into ``path``, line by line, never holding a whole table; returns the row count.

    A part whose header differs from the first's raises ``ValueError`` naming it.
    """
    header, rows = None, 0
    with files.atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        for part in parts:
            with Path(part).open(encoding="utf-8") as lines:
                first = lines.readline()
                if header is None:
                    header = first
                    out.write(header)
                elif first != header:
                    message = f"{part}: header {first.strip()!r} differs from {header.strip()!r}"
                    raise ValueError(message)
                for line in lines:
                    out.write(line)
                    rows += 1
    return rows


#: The tables' JSON schemas (YAML), beside the config's.
SCHEMAS = Path(__file__).resolve().parent / "schemas"


@functools.cache
def load_schema(name: str) -> dict[str, Any]:
    """The schema ``schemas/<name>.schema.yaml`` (``config``, ``labels``, ``scores``, ...)."""
    return yaml.safe_load((SCHEMAS / f"{name}.schema.yaml").read_text())


def _column_spec(schema: Mapping[str, Any], column: str) -> Mapping[str, Any] | None:
    if column in schema.get("properties", {}):
        return schema["properties"][column]
    for pattern, spec in schema.get("patternProperties", {}).items():
        if re.search(pattern, column):
            return spec
    return None


def _check_column(values: pd.Series, spec: Mapping[str, Any]) -> tuple[pd.Series, np.ndarray]:
    """``values`` as the spec's type (missing: NaN, or "" for text) and the mask of bad cells."""
    types = spec.get("type", [])
    types = {types} if isinstance(types, str) else set(types)
    if values.dtype == object:
        text = values.fillna("").astype(str)
        missing = (text.str.strip() == "").to_numpy()
    else:
        text = None
        missing = values.isna().to_numpy()
    bad = np.zeros(len(values), dtype=bool)
    if types & {"number", "integer"} and not types & {"string", "boolean"}:
        coerced = pd.to_numeric(
            values if text is None else text.str.strip().replace("", np.nan), errors="coerce"
        )
        bad |= coerced.isna().to_numpy() & ~missing
        number = coerced.to_numpy(dtype=float)
        if "number" not in types:
            bad |= np.isfinite(number) & (number % 1 != 0)
        with np.errstate(invalid="ignore"):  # NaN compares False: missing cells are not bad here
            if "minimum" in spec:
                bad |= number < spec["minimum"]
            if "maximum" in spec:
                bad |= number > spec["maximum"]
    elif types == {"boolean"} or types == {"boolean", "null"}:
        if values.dtype == bool:
            coerced = values
        else:
            lowered = (text if text is not None else values.astype(str)).str.strip().str.lower()
            bad |= ~lowered.isin(["true", "false"]).to_numpy() & ~missing
            coerced = lowered.eq("true")
    else:
        coerced = text if text is not None and types <= {"string", "null"} else values
    if "enum" in spec:
        allowed = {str(v) for v in spec["enum"]}
        shown = coerced.astype(str).str.replace(r"\.0$", "", regex=True)
        bad |= ~shown.isin(allowed).to_numpy() & ~missing
    if "null" not in types:
        bad |= missing
    return coerced, bad


def validate(frame: pd.DataFrame, schema: str | Mapping[str, Any], *, source: str) -> pd.DataFrame:
    """``frame`` checked against a table schema; its columns coerced to the schema's types.

    The schema describes one row (JSON Schema, checked column by column so a
    100,000-row table is validated in a fraction of a second): ``required``
    columns must be present, ``properties`` and ``patternProperties`` give each
    column's ``type`` (``null`` allowed means a cell may be empty), ``enum``,
    ``minimum`` and ``maximum``; an absent optional column with a ``default``
    is added with it; ``additionalProperties: false`` rejects other columns.
    Raises ``ValueError`` naming ``source``, the column and up to three of its
    bad rows (as line numbers of the file: the header is line 1, blank lines
    not counted).
    """
    spec_of = load_schema(schema) if isinstance(schema, str) else schema
    missing = [c for c in spec_of.get("required", []) if c not in frame.columns]
    if missing:
        found = ", ".join(map(str, frame.columns[:12])) + (
            ", ..." if len(frame.columns) > 12 else ""
        )
        message = f"{source}: missing column(s) {', '.join(missing)} (found {found or 'none'})"
        raise ValueError(message)
    frame = frame.copy()
    for column in frame.columns:
        spec = _column_spec(spec_of, str(column))
        if spec is None:
            if spec_of.get("additionalProperties", True) is False:
                message = f"{source}: unknown column {column!r}"
                raise ValueError(message)
            continue
        coerced, bad = _check_column(frame[column], spec)
        if bad.any():
            rows = np.flatnonzero(bad)[:3]
            shown = ", ".join(f"line {i + 2}: {frame[column].iloc[i]!r}" for i in rows)
            expected = spec.get("description", "").split(".")[0]
            message = f"{source}: column {column!r} has {int(bad.sum())} bad value(s) ({shown}); expected {expected}"
            raise ValueError(message)
        frame[column] = coerced
    for column, spec in spec_of.get("properties", {}).items():
        if column not in frame.columns and "default" in spec:
            frame[column] = spec["default"]
    return frame


def read_user_tsv(path: str | Path, schema: str, *, what: str) -> pd.DataFrame:
    """A table a user wrote (tab-separated, may be quoted), renamed and validated.

    Cells are read as text (``""`` when empty) and blank rows dropped; columns
    the schema lists under ``x-renamed`` (old name: new name) are renamed, with a
    warning in the log, when the new name is absent; then :func:`validate` checks
    and coerces them. ``what`` names the table in messages (a config key).
    """
    source = f"{what} {str(path)!r}"
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame()
    except (OSError, UnicodeDecodeError, pd.errors.ParserError) as error:
        message = f"{source} cannot be read as a tab-separated table: {error}"
        raise ValueError(message) from error
    frame.columns = [str(c).strip() for c in frame.columns]
    spec = load_schema(schema)
    renames = {
        old: new
        for old, new in spec.get("x-renamed", {}).items()
        if old in frame.columns and new not in frame.columns
    }
    if renames:
        log.warning(
            "%s uses old column names; read as %s",
            source,
            ", ".join(f"{old} -> {new}" for old, new in renames.items()),
        )
        frame = frame.rename(columns=renames)
    if len(frame.columns):
        blank = frame.apply(lambda column: column.str.strip() == "").all(axis=1)
        frame = frame[~blank].reset_index(drop=True)
    return validate(frame, spec, source=source)
