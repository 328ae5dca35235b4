"""Which series of a subject is its T2w, which its FLAIR: the selection beside the T1.

The classes come from the same header physics as the T1's (``series.classify``:
a spin echo with a long TR and TE is T2-weighted, a long inversion read with a
long echo is FLAIR; a proton-density series is ``PD``, never a T2w). NIfTI files
say their contrast by name (``series.file_class``: ``_T2w``, ``_FLAIR``, BraTS
``t2w``/``t2f``, TCGA ``t2``/``fla``). Among a contrast's candidates the ranking
is the T1's (``series.rank_key``: original, pre-contrast, whole head, volumetric,
most slices, smallest voxel, the later repeat); a 2D series is no note here,
since T2w and FLAIR are mostly acquired in 2D.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mriaudit import series

#: A contrast's selection: ``(index of the chosen row, why)``, or ``(None, why none)``.
Choice = tuple[int | None, str]

#: How a class reads when it is seen instead of the one wanted.
_CLASS_WORDS = {"PD": "proton-density (PD)", "T1w": "T1-weighted", "T2w": "T2w", "FLAIR": "FLAIR"}


def _dicom_usable(row: dict[str, Any], rules: dict[str, Any]) -> bool:
    """An MR acquisition with an image geometry, not excluded by the user's rule."""
    kind: series.SeriesClass = row["class"]
    if (row["modality"] and row["modality"] != "MR") or kind.reformat:
        return False
    if row["rows"] is None or row["cols"] is None:
        return False
    names = [row["description"], row["protocol"], row["sequence_name"]]
    excluded = rules["exclude_re"]
    return not (excluded and any(excluded.search(n) for n in names))


def _none_found(contrast: str, seen: Counter[str]) -> str:
    """Why a subject has no series of ``contrast``, naming what else it holds."""
    others = {c: n for c, n in seen.items() if c in _CLASS_WORDS and c not in (contrast, "T1w")}
    text = f"no {contrast} series"
    if others:
        listed = ", ".join(f"{_CLASS_WORDS[c]}: {n}" for c, n in sorted(others.items()))
        text += f" ({listed}; not audited as {contrast})"
    return text


def choose_dicom(rows: Sequence[dict[str, Any]], contrast: str, rules: dict[str, Any]) -> Choice:
    """The DICOM series (index into ``rows``, series-table rows with their ``class``) to
    audit as ``contrast`` (``T2w`` or ``FLAIR``), and why; ``rules`` from
    ``series.resolve_rules``. Derived copies only where no original is present."""
    usable = [i for i, row in enumerate(rows) if _dicom_usable(row, rules)]
    candidates = [i for i in usable if rows[i]["class"].contrast == contrast]
    originals = [i for i in candidates if not rows[i]["class"].derived]
    candidates = originals or candidates
    if not candidates:
        return None, _none_found(contrast, Counter(rows[i]["class"].contrast for i in usable))
    ranked = sorted(candidates, key=lambda i: series.rank_key(rows[i], rules))
    best = rows[ranked[0]]
    why = f"best {contrast} series ({best['class'].why})"
    if len(ranked) > 1:
        why += f", ranked above {len(ranked) - 1} other {contrast} series"
    return ranked[0], why


def choose_nifti(rows: Sequence[dict[str, Any]], contrast: str) -> Choice:
    """The NIfTI file (index into ``rows``, NIfTI series-table rows) to audit as
    ``contrast``: a readable 3D image whose name says ``contrast``; the largest of
    several, then the first by name."""

    def is_volume(row: dict[str, Any]) -> bool:
        shape = row.get("shape") or ()
        return len(shape) >= 3 and min(shape[:3]) >= 2 and bool(row.get("geometry_ok"))

    named = {i: series.file_class(Path(row["path"]).name)[0] for i, row in enumerate(rows)}
    candidates = [i for i, row in enumerate(rows) if named[i] == contrast and is_volume(row)]
    if not candidates:
        return None, _none_found(contrast, Counter(named.values()))

    def size(i: int) -> int:
        shape = rows[i]["shape"]
        return shape[0] * shape[1] * shape[2]

    best = sorted(candidates, key=lambda i: (-size(i), rows[i]["path"]))[0]
    how = series.file_class(Path(rows[best]["path"]).name)[1]
    why = f"{contrast} by its {how} ({Path(rows[best]['path']).name})"
    if len(candidates) > 1:
        why += f", the largest of {len(candidates)}"
    return best, why
