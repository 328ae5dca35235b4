"""MRIQC compatibility: MRIQC 24's names and output layout, export, import, agreement.

Our IQMs are recorded as ``iqm_<MRIQC name>`` columns of ``cohort/scores.tsv``.
:data:`MRIQC_NAMES` maps every column that is the same quantity as one of MRIQC
24's anatomical IQMs to MRIQC's name; :func:`export_mriqc` writes a cohort in
the layout MRIQC 24 writes for T1w images (``group_T1w.tsv`` and one JSON per
image under ``sub-<label>/[ses-<label>/]anat/``), :func:`read_mriqc` reads such
a folder back with our column names, and :func:`agreement` compares two sets of
IQMs per metric. ``docs/MRIQC.md`` says where each definition differs from
MRIQC's and by how much the two rank-agree (``mriaudit.bench_mriqc``).

The FWHM is the one unit that differs: we record mm, MRIQC voxels (3dFWHMx's mm
divided by the voxel size); the export and import convert with the
``spacing_*`` columns.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mriaudit import __version__, files, paths
from mriaudit.aggregate import read_scores
from mriaudit.tables import write_tsv

log = logging.getLogger(__name__)

#: Our column -> MRIQC 24's IQM name, for every metric that both compute as the same
#: quantity (same formula and unit after the FWHM conversion, see the module doc).
#: Left out on purpose: ``iqm_rpve_*`` (another normalisation), ``iqm_summary_*`` (MRIQC's
#: are partial-volume weighted, on an image harmonised to a WM median of 1000),
#: ``iqm_inu_*`` (another region and normalisation of the field) and our own measures
#: (``iqm_ghost_ratio``, ``iqm_edge_anatomy``, ``iqm_bg_peak``, ``iqm_inu_wm_range``).
MRIQC_NAMES: dict[str, str] = {
    f"iqm_{name}": name
    for name in (
        "cjv",
        "cnr",
        "efc",
        "fber",
        "qi_1",
        "wm2max",
        *(f"snr_{t}" for t in ("csf", "gm", "wm", "total")),
        *(f"snrd_{t}" for t in ("csf", "gm", "wm", "total")),
        *(f"fwhm_{a}" for a in ("x", "y", "z", "avg")),
        *(f"icvs_{t}" for t in ("csf", "gm", "wm")),
        *(f"tpm_overlap_{t}" for t in ("csf", "gm", "wm")),
        *(f"size_{a}" for a in ("x", "y", "z")),
        *(f"spacing_{a}" for a in ("x", "y", "z")),
    )
}
#: MRIQC's name -> our column.
OUR_NAMES: dict[str, str] = {mriqc: ours for ours, mriqc in MRIQC_NAMES.items()}
#: The modality (BIDS suffix) of every exported image.
SUFFIX = "T1w"
GROUP_TSV = f"group_{SUFFIX}.tsv"
_AXES = ("x", "y", "z")


def bids_name(bids_id: str) -> str:
    """MRIQC's ``bids_name`` of one of our subjects: ``sub-<bids_id>_T1w``."""
    return f"sub-{bids_id}_{SUFFIX}"


def bids_id_of(name: str) -> str:
    """Our ``bids_id`` from a MRIQC ``bids_name`` (or JSON file name).

    ``sub-01_ses-1_run-2_T1w`` -> ``01_ses-1_run-2``: the name without its
    leading ``sub-`` and trailing ``_T1w`` (and ``.json``). Raises ValueError
    for a name that is not a T1w image's.
    """
    stem = name.removesuffix(".json")
    if not (stem.startswith("sub-") and stem.endswith(f"_{SUFFIX}")):
        message = f"not a MRIQC T1w name (sub-<label>[_<entity>-<label>...]_T1w): {name!r}"
        raise ValueError(message)
    return stem[len("sub-") : -len(f"_{SUFFIX}")]


#: paths.entities' short keys -> the entity names MRIQC's ``bids_meta`` uses.
_ENTITY_NAMES = {"sub": "subject", "ses": "session", "run": "run"}


def _entities(bids_id: str) -> dict[str, str]:
    """BIDS entities of a ``bids_id`` (``01_ses-1_run-2`` -> subject, session, run)."""
    return {_ENTITY_NAMES[key]: value for key, value in paths.entities(bids_id).items()}


def _json_path(out_dir: Path, bids_id: str) -> Path:
    """Where MRIQC 24 writes the IQMs of ``sub-<bids_id>_T1w``: the scan's BIDS folder."""
    return Path(out_dir) / paths.scan_dir(bids_id) / "anat" / f"{bids_name(bids_id)}.json"


def _value(value: Any, *, integer: bool = False) -> float | int | None:
    """A cell as a JSON number (None for missing or non-finite); ``integer`` for counts."""
    if value is None or value is pd.NA:
        return None
    number = float(value)
    if not math.isfinite(number):
        return None
    return round(number) if integer else number


def _to_mriqc_units(row: Mapping[str, Any]) -> dict[str, Any]:
    """One row's mapped IQMs under MRIQC's names and units (FWHM in voxels)."""
    out: dict[str, Any] = {}
    for ours, name in MRIQC_NAMES.items():
        out[name] = _value(row.get(ours), integer=name.startswith("size_"))
    voxels = []
    for axis in _AXES:
        fwhm, spacing = out[f"fwhm_{axis}"], out[f"spacing_{axis}"]
        out[f"fwhm_{axis}"] = fwhm / spacing if fwhm is not None and spacing else None
        voxels.append(out[f"fwhm_{axis}"])
    out["fwhm_avg"] = float(np.mean(voxels)) if None not in voxels else None
    return out


def export_mriqc(scores: pd.DataFrame, *, out_dir: Path, version: str) -> list[Path]:
    """Write our IQMs in MRIQC 24's output layout under ``out_dir``; return the files written.

    ``scores``: rows with ``bids_id`` and ``iqm_*`` columns (``cohort/scores.tsv``).
    ``version``: mriaudit's version, recorded as the JSONs' provenance. Writes,
    as MRIQC 24 does for T1w images:

    - ``sub-<label>/[ses-<label>/]anat/sub-<bids_id>_T1w.json`` per image: every
      :data:`MRIQC_NAMES` IQM as a top-level key (``null`` where undefined),
      ``bids_meta`` (the BIDS entities, ``modality``) and ``provenance``
      (``software`` mriaudit, ``version``), keys sorted, two-space indent;
    - ``group_T1w.tsv``: ``bids_name`` then the IQMs in MRIQC's (alphabetical)
      order, one row per JSON, sorted by ``bids_name``; an empty cell where
      undefined.

    Units are MRIQC's: the FWHM is divided by the voxel size (voxels), every
    other IQM is dimensionless or as recorded. Rows without a ``bids_id`` or
    without any defined mapped IQM (failed subjects) are left out of both, as
    MRIQC writes nothing for an image it could not process. Raises ValueError
    when ``scores`` has no ``bids_id`` column or two rows share a ``bids_id``.
    """
    if "bids_id" not in scores.columns:
        message = f"export_mriqc needs a bids_id column; the table has {list(scores.columns)[:8]}"
        raise ValueError(message)
    out_dir = Path(out_dir)
    ids = scores["bids_id"].fillna("").astype(str)
    repeated = sorted(set(ids[ids.duplicated() & (ids != "")]))
    if repeated:
        message = f"export_mriqc: bids_id repeated in the scores: {', '.join(repeated[:5])}"
        raise ValueError(message)
    names = sorted(MRIQC_NAMES.values())
    rows: list[dict[str, Any]] = []
    written: list[Path] = []
    for bids_id, (_, row) in zip(ids, scores.iterrows(), strict=True):
        iqms = _to_mriqc_units(row.to_dict())
        if not bids_id or all(
            iqms[n] is None for n in names if not n.startswith(("size", "spacing"))
        ):
            continue
        document = {
            **iqms,
            "bids_meta": {
                **_entities(bids_id),
                "datatype": "anat",
                "suffix": SUFFIX,
                "modality": SUFFIX,
            },
            "provenance": {"software": "mriaudit", "version": str(version), "settings": {}},
        }
        path = _json_path(out_dir, bids_id)
        files.write_text(path, json.dumps(document, indent=2, sort_keys=True) + "\n")
        written.append(path)
        rows.append({"bids_name": bids_name(bids_id), **iqms})
    table = pd.DataFrame(rows, columns=["bids_name", *names]).sort_values("bids_name")
    group = out_dir / GROUP_TSV
    with files.atomic_path(group) as tmp:
        table.to_csv(tmp, sep="\t", index=False, na_rep="")
    return [group, *written]


def _from_mriqc(frame: pd.DataFrame, where: Path) -> pd.DataFrame:
    """MRIQC's rows (``bids_name`` + IQMs) -> our columns, indexed by ``bids_id``."""
    ids = [bids_id_of(str(name)) for name in frame["bids_name"]]
    out = pd.DataFrame(index=pd.Index(ids, name="bids_id"))
    for name, ours in OUR_NAMES.items():
        if name in frame.columns:
            out[ours] = pd.to_numeric(frame[name], errors="coerce").to_numpy(dtype=float)
    for axis in _AXES:
        fwhm, spacing = f"iqm_fwhm_{axis}", f"iqm_spacing_{axis}"
        if fwhm in out.columns:
            out[fwhm] = out[fwhm] * out[spacing] if spacing in out.columns else np.nan
    if all(f"iqm_fwhm_{a}" in out.columns for a in _AXES):
        out["iqm_fwhm_avg"] = out[[f"iqm_fwhm_{a}" for a in _AXES]].mean(axis=1, skipna=False)
    if out.columns.empty:
        message = f"no MRIQC T1w IQM column in {where}"
        raise ValueError(message)
    if out.index.duplicated().any():
        out = out[~out.index.duplicated(keep="last")]
    return out.sort_index()


def read_mriqc(mriqc_dir: Path) -> pd.DataFrame:
    """MRIQC's T1w IQMs in ``mriqc_dir`` as a frame indexed by ``bids_id``, our column names.

    Reads ``group_T1w.tsv`` when present, else every
    ``sub-*/**/anat/sub-*_T1w.json`` (MRIQC's per-image JSON, top-level IQM
    keys). ``bids_name`` ``sub-01_ses-1_run-2_T1w`` becomes ``bids_id``
    ``01_ses-1_run-2``; columns are the :data:`OUR_NAMES` of the IQMs found
    (FWHM back to mm with the ``spacing_*`` columns; NaN without them), other
    MRIQC columns are dropped. Raises ValueError naming the path when the folder
    is missing, holds no T1w IQMs, or a name is not a T1w image's.
    """
    folder = Path(mriqc_dir)
    if not folder.is_dir():
        message = f"no MRIQC output folder at {folder}"
        raise ValueError(message)
    group = folder / GROUP_TSV
    if group.is_file():
        frame = pd.read_csv(group, sep="\t", dtype={"bids_name": str})
        if "bids_name" not in frame.columns or frame.empty:
            message = f"{group} has no bids_name column or no rows"
            raise ValueError(message)
        return _from_mriqc(frame, group)
    rows = []
    for path in sorted(folder.glob(f"sub-*/**/anat/sub-*_{SUFFIX}.json")):
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            message = f"cannot read MRIQC's {path}: {error}"
            raise ValueError(message) from error
        iqms = {k: v for k, v in document.items() if not isinstance(v, dict)}
        rows.append({"bids_name": path.name.removesuffix(".json"), **iqms})
    if not rows:
        message = f"no MRIQC T1w IQMs in {folder} (no {GROUP_TSV}, no sub-*/**/anat/sub-*_T1w.json)"
        raise ValueError(message)
    return _from_mriqc(pd.DataFrame(rows), folder)


def _median_abs_relative_difference(ours: np.ndarray, theirs: np.ndarray) -> float:
    usable = theirs != 0
    if not usable.any():
        return math.nan
    return float(np.median(np.abs(ours[usable] - theirs[usable]) / np.abs(theirs[usable])))


def agreement(ours: pd.DataFrame, theirs: pd.DataFrame) -> pd.DataFrame:
    """Per metric both frames have, on the ``bids_id`` both have: how well they agree.

    ``ours`` and ``theirs``: frames indexed by ``bids_id`` with our ``iqm_*``
    column names (``theirs`` typically from :func:`read_mriqc`); a ``bids_id``
    column is used as the index when present. Returns one row per shared
    ``iqm_*`` column, sorted by ``metric``: ``n`` (subjects where both values
    are finite), ``rho`` (Spearman rank correlation; NaN below 3 pairs or for
    a constant column), ``median_ours``, ``median_theirs`` (in the metric's
    units) and ``median_abs_rel_diff`` (median of ``|ours - theirs| / |theirs|``
    over pairs with a non-zero ``theirs``; a fraction).
    """
    frames = []
    for frame in (ours, theirs):
        if "bids_id" in frame.columns:
            frame = frame.set_index("bids_id")
        frames.append(frame[~frame.index.duplicated(keep="last")])
    first, second = frames
    shared_ids = first.index.intersection(second.index)
    metrics = sorted(
        c for c in first.columns.intersection(second.columns) if str(c).startswith("iqm_")
    )
    rows = []
    for metric in metrics:
        a = pd.to_numeric(first.loc[shared_ids, metric], errors="coerce").to_numpy(dtype=float)
        b = pd.to_numeric(second.loc[shared_ids, metric], errors="coerce").to_numpy(dtype=float)
        both = np.isfinite(a) & np.isfinite(b)
        a, b = a[both], b[both]
        rho = math.nan
        if a.size >= 3 and np.ptp(a) > 0 and np.ptp(b) > 0:
            rho = float(stats.spearmanr(a, b).statistic)
        rows.append(
            {
                "metric": metric,
                "n": int(a.size),
                "rho": rho,
                "median_ours": float(np.median(a)) if a.size else math.nan,
                "median_theirs": float(np.median(b)) if b.size else math.nan,
                "median_abs_rel_diff": _median_abs_relative_difference(a, b),
            }
        )
    columns = ["metric", "n", "rho", "median_ours", "median_theirs", "median_abs_rel_diff"]
    return pd.DataFrame(rows, columns=columns)


def export_cohort(scores_tsv: Path, *, out_group: Path) -> list[Path]:
    """:func:`export_mriqc` of ``cohort/scores.tsv`` into the folder of ``out_group``
    (``paths.mriqc_group_table``); the rule ``export_mriqc``. Returns the files written."""
    written = export_mriqc(
        read_scores(scores_tsv), out_dir=Path(out_group).parent, version=__version__
    )
    log.info("MRIQC layout: %d scans exported to %s", max(0, len(written) - 1), out_group.parent)
    return written


def compare_cohort(scores_tsv: Path, *, mriqc_dir: Path, out_table: Path) -> pd.DataFrame:
    """:func:`agreement` of ``cohort/scores.tsv``'s IQMs with those of the MRIQC output
    folder ``mriqc_dir`` (:func:`read_mriqc`), written to ``out_table``; the rule
    ``compare_mriqc``. A folder that holds no MRIQC T1w IQMs raises ``ValueError`` naming it
    (the config key ``mriqc_dir`` points at the wrong place)."""
    ours = read_scores(scores_tsv)
    theirs = read_mriqc(mriqc_dir)
    table = agreement(ours, theirs)
    shared = ours["bids_id"].isin(theirs.index).sum()
    if not shared:
        log.warning(
            "no scan of %s is in the MRIQC run %s: nothing to compare", scores_tsv, mriqc_dir
        )
    write_tsv(table, out_table)
    log.info("MRIQC agreement: %d metrics over %d shared scans", len(table), shared)
    return table
