"""The project's one TSV dialect: how every table mriaudit writes is written and read.

Tab-separated, one header line, UTF-8 (bytes that are not, in folder names, as
backslash escapes), no quoting: tabs and line breaks inside a cell become one
space, so every line is one row and a file splits on tabs without a CSV
parser. An empty cell is a missing value, booleans are ``true``/``false``,
floats are written with ``digits`` significant digits. A table is written
atomically (a temporary sibling renamed over the target), so a reader never
sees half of one.

Files a user writes (the labels file, fold groups) are read by pandas' own
tolerant reader instead: a spreadsheet may quote them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriaudit.records import temporary_sibling

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
    path = Path(path)
    fd, tmp = temporary_sibling(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="backslashreplace") as handle:
            handle.write("\n".join(lines) + "\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
