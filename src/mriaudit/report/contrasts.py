"""The report's view of the contrasts beside the T1w: a summary per contrast and the
subject view's pictures of each (native whole field of view; template space with its
model's anomaly map, beside the T1w's)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from mriaudit import paths
from mriaudit.aggregate.reasons import ON_ITS_OWN
from mriaudit.aggregate.rows import contrast_column


def _registered(out: Path, bids_id: str, contrast: str) -> Path:
    """The contrast on the template grid with its model's map over it, or without a map
    where its model scored nothing."""
    scored = paths.anomaly_thumbnail(out, bids_id, contrast=contrast)
    return scored if scored.is_file() else paths.contrast_template_thumbnail(out, bids_id, contrast)


_PICTURES: dict[str, Callable[[Path, str, str], Path]] = {
    "native": paths.contrast_native_thumbnail,
    "registered": _registered,
}


def present(frame: pd.DataFrame) -> list[str]:
    """The contrasts beside the T1w that scores.tsv has columns for (some subject has one)."""
    return [c for c in paths.EXTRA_CONTRASTS if contrast_column(c, "status") in frame]


def summary(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Per contrast: subjects with a series, audited ok (and of those, registered to the
    template on their own: no usable T1w), without one, failed, and those whose flag
    reasons name the contrast."""
    rows = []
    notes = frame["notes"].fillna("").astype(str) if "notes" in frame else None
    for contrast in present(frame):
        status = frame[contrast_column(contrast, "status")].fillna("").astype(str)
        reasons = frame["flag_reasons"].fillna("").astype(str)
        alone = (
            0
            if notes is None
            else int(notes.str.contains(f"{contrast} {ON_ITS_OWN}", regex=False).sum())
        )
        rows.append(
            {
                "contrast": contrast,
                "series": int((status.isin(["ok", "failed"])).sum()),
                "ok": int((status == "ok").sum()),
                "alone": alone,
                "missing": int((status == "no_series").sum()),
                "failed": int((status == "failed").sum()),
                "flagged": int(reasons.str.contains(f"{contrast}: ", regex=False).sum()),
            }
        )
    return rows


def pictures(
    row: dict[str, Any],
    out_dir: Path,
    contrasts: list[str],
    uri: Callable[[Path, str], str],
) -> list[dict[str, str]]:
    """The subject view's pictures of each contrast of ``row`` (a scores.tsv row):
    ``{"contrast", "status", "native", "registered"}`` with ``uri(path, name)`` of each
    picture ("" where none was drawn)."""
    bids_id = str(row.get("bids_id") or "")
    views = []
    for contrast in contrasts:
        status = str(row.get(contrast_column(contrast, "status")) or "")
        view = {"contrast": contrast, "status": status or "not audited"}
        for key, build in _PICTURES.items():
            path = build(out_dir, bids_id, contrast) if bids_id else None
            view[key] = uri(path, f"{bids_id}_{contrast}_{key}.webp") if path else ""
        views.append(view)
    return views
