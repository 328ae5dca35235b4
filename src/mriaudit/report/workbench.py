"""The data behind the report's workbench: linked views, subject views, review mode.

``cohort_data`` gathers, per ``scores.tsv`` row (in the table's order), what the
page's script draws: the scores and key IQMs as brushable strips, a 2D PCA
embedding of the standardised IQMs and scores, and the subject's two pictures
(``mriaudit.thumbnails``: native whole field of view, registered with the
anomaly map), and those of each contrast beside the T1w (``contrasts``). Up to ``max_inline`` subjects the pictures are inline ``data:``
URIs, so the page stays one self-contained file (about 13 kB per subject, 13 MB
for 1,000); above it they are hard-linked (or copied) into a sidecar folder
beside the page, ``report_files/``, which the page names.

PCA, not UMAP: scikit-learn's PCA is deterministic, explains its axes (their
share of variance is printed on them) and needs nothing beyond the project's
dependencies; no maintained UMAP package serves offline here without numba.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA

from mriaudit import paths, robust
from mriaudit.aggregate import iqm_tables, iqm_title
from mriaudit.report import contrasts

#: Default of config report.max_subjects_inline.
MAX_SUBJECTS_INLINE = 1000
#: The sidecar folder of pictures beside the page, above ``max_inline`` subjects.
SIDECAR = "report_files"
#: Strips of the linked view: the two scores, then these IQMs where present.
STRIP_IQMS = ("iqm_cjv", "iqm_snr_total", "iqm_efc", "iqm_fber", "iqm_qi_1", "iqm_inu_range")
_PICTURES = {"native": paths.native_thumbnail, "registered": paths.anomaly_thumbnail}


def run_id(scores_tsv: Path) -> str:
    """What identifies this report's run for the reviewer's saved decisions: a digest of
    scores.tsv (the same run rendered again keeps them; another run starts afresh)."""
    return hashlib.sha256(Path(scores_tsv).read_bytes()).hexdigest()[:16]


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return round(number, 4) if math.isfinite(number) else None


def _metrics(frame: pd.DataFrame) -> list[dict[str, Any]]:
    directions, titles = iqm_tables()
    chosen = [
        {"key": "audit_score", "title": "audit score", "higher_is_worse": True},
        {"key": "anomaly_score", "title": "model z", "higher_is_worse": True},
    ]
    for column in STRIP_IQMS:
        if column in frame and pd.to_numeric(frame[column], errors="coerce").notna().any():
            chosen.append(
                {
                    "key": column,
                    "title": iqm_title(column, titles),
                    "higher_is_worse": directions.get(column[4:], 0) < 0,
                }
            )
    return chosen


def embedding(frame: pd.DataFrame) -> tuple[np.ndarray, dict[str, Any] | None]:
    """2D PCA of the ok rows' scores and IQMs, each robustly standardised: (n, 2), NaN
    for rows left out, and ``{"explained": [...], "columns": [...]}`` (None when fewer
    than 3 rows or 2 varying columns)."""
    directions, _ = iqm_tables()
    columns = ["audit_score", "anomaly_score"] + [
        c for c in frame.columns if c.startswith("iqm_") and directions.get(c[4:], 0) != 0
    ]
    values = frame.reindex(columns=columns).apply(pd.to_numeric, errors="coerce")
    rows = (frame["status"] == "ok").to_numpy() & values.notna().any(axis=1).to_numpy()
    xy = np.full((len(frame), 2), np.nan)
    usable = [c for c in columns if values.loc[rows, c].notna().sum() >= 3]
    if rows.sum() < 3 or len(usable) < 2:
        return xy, None
    block = values.loc[rows, usable].to_numpy(dtype=float)
    standard = []
    kept = []
    for j, column in enumerate(usable):
        x = block[:, j]
        centre, scale = robust.location_scale(x[np.isfinite(x)])
        if scale > 0:
            # A missing value sits at the cohort's median: it moves no one.
            standard.append(np.where(np.isfinite(x), (x - centre) / scale, 0.0))
            kept.append(column)
    if len(kept) < 2:
        return xy, None
    # Clipped: one wild scan must not squeeze everyone else into a point.
    matrix = np.clip(np.column_stack(standard), -10, 10)
    pca = PCA(n_components=2, svd_solver="full", random_state=0)
    xy[rows] = pca.fit_transform(matrix)
    explained = [round(float(v), 4) for v in pca.explained_variance_ratio_]
    return xy, {"explained": explained, "columns": kept}


def _picture_uri(path: Path, *, inline: bool, sidecar: Path, name: str) -> str:
    if not path.is_file():
        return ""
    if inline:
        return "data:image/webp;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    target = sidecar / name
    try:
        os.link(path, target)
    except OSError:
        shutil.copyfile(path, target)
    return f"{SIDECAR}/{name}"


def cohort_data(
    frame: pd.DataFrame,
    out_dir: Path,
    *,
    page: Path,
    threshold: float | None,
    max_inline: int = MAX_SUBJECTS_INLINE,
    run: str = "",
) -> tuple[dict[str, Any], str]:
    """The workbench's data (see the module docstring) and the note the page shows about
    where its pictures are ("" when inline). ``page`` is the report's path: the sidecar
    folder goes beside it, emptied first so no picture of an earlier run survives."""
    inline = len(frame) <= max_inline
    sidecar = Path(page).parent / SIDECAR
    shutil.rmtree(sidecar, ignore_errors=True)
    if not inline:
        sidecar.mkdir(parents=True)
    metrics = _metrics(frame)
    xy, pca = embedding(frame)
    groups = sorted({str(g) for g in frame.get("scanner_group", pd.Series(dtype=str)) if g})
    group_index = {g: i for i, g in enumerate(groups)}
    columns = [pd.to_numeric(frame[m["key"]], errors="coerce").to_numpy() for m in metrics]
    extra_contrasts = contrasts.present(frame)

    def uri(path: Path, name: str) -> str:
        return _picture_uri(path, inline=inline, sidecar=sidecar, name=name)

    subjects = []
    for i, row in enumerate(frame.to_dict("records")):
        bids_id = str(row.get("bids_id") or "")
        pictures = {
            key: _picture_uri(
                build(out_dir, bids_id),
                inline=inline,
                sidecar=sidecar,
                name=f"{bids_id}_{key}.webp",
            )
            if bids_id and row.get("failed_stage") != "cohort"
            else ""
            for key, build in _PICTURES.items()
        }
        subjects.append(
            {
                "folder": row["folder"],
                "status": row["status"],
                "flagged": bool(row["flagged"]),
                "group": group_index.get(str(row.get("scanner_group") or ""), -1),
                "score": _finite(row.get("audit_score")),
                "values": [_finite(column[i]) for column in columns],
                "xy": None if not np.isfinite(xy[i]).all() else [round(float(v), 4) for v in xy[i]],
                "reasons": str(row.get("flag_reasons") or ""),
                **pictures,
            }
        )
        if extra_contrasts and row.get("failed_stage") != "cohort":
            subjects[-1]["contrasts"] = contrasts.pictures(row, out_dir, extra_contrasts, uri)
    data = {
        "run_id": run,
        "metrics": metrics,
        "groups": groups,
        "threshold": _finite(threshold),
        "pca": pca,
        "subjects": subjects,
    }
    note = (
        ""
        if inline
        else f"{len(frame)} subjects are more than report.max_subjects_inline ({max_inline}): "
        f"the pictures are in the folder {SIDECAR}/ beside this page; keep the two together."
    )
    return data, note


def script_json(data: dict[str, Any]) -> str:
    """JSON safe inside ``<script type="application/json">``: every ``<`` escaped (only
    strings hold one), so no ``</script>`` or ``<!--`` in a folder name can end it."""
    return json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
