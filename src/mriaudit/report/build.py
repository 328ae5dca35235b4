"""The cohort audit report: one self-contained HTML file.

Everything is inline (CSS, a little JS, PNG figures as data: URIs), so the page
opens offline, prints, and makes no request to any server. Jinja2 renders it
with autoescaping on: header strings and folder names are shown as text, never
as markup. Montages are drawn only for flagged subjects, at most
config ``report.max_montages`` (default ``MAX_MONTAGES``; the page says so), so the report stays small and fast for
cohorts of thousands.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import platform
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
import pandas as pd

from mriaudit import files, paths
from mriaudit.aggregate import (
    iqm_tables,
    iqm_title,
    read_scores,
    reference_mask,
    table_threshold,
)
from mriaudit.records import OK
from mriaudit.report import contrasts, figures, sites, workbench
from mriaudit.tables import read_tsv

log = logging.getLogger(__name__)

#: Default of config report.max_montages: most montages drawn (most anomalous first).
MAX_MONTAGES = 200
#: IQMs shown in the distribution figure, in this order of preference.
KEY_IQMS = (
    "iqm_cjv",
    "iqm_cnr",
    "iqm_snr_wm",
    "iqm_snr_total",
    "iqm_efc",
    "iqm_fber",
    "iqm_qi_1",
    "iqm_inu_range",
    "iqm_fwhm_avg",
)
MAX_IQM_PANELS = 6
MONTAGE_THREADS = min(8, os.cpu_count() or 1)
_PACKAGES = (
    "mriaudit",
    "snakemake",
    "torch",
    "antspyx",
    "nibabel",
    "pydicom",
    "dcm2niix",
    "numpy",
    "pandas",
    "scipy",
    "scikit-learn",
    "nilearn",
    "matplotlib",
    "jinja2",
)
_TOP = 10


def _environment() -> jinja2.Environment:
    folder = Path(__file__).parent / "templates"
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(folder),
        autoescape=True,  # header strings may hold markup; they must show as text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def _number(value: Any, digits: int = 2) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return ""
    return f"{number:.{digits}f}" if math.isfinite(number) else ""


def _versions() -> dict[str, str]:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["python"] = platform.python_version()
    return versions


def _model_provenance(out_dir: Path) -> dict[str, Any]:
    checkpoint = paths.model_checkpoint(out_dir)
    info: dict[str, Any] = {"checkpoint": str(checkpoint), "sha256": "", "sidecar": ""}
    if checkpoint.is_file() and checkpoint.stat().st_size > 0:
        info["sha256"] = files.sha256(checkpoint)
    sidecar = paths.model_sidecar(out_dir)
    if sidecar.is_file():
        try:
            info["sidecar"] = json.dumps(json.loads(sidecar.read_text()), indent=2, sort_keys=True)
        except ValueError:
            info["sidecar"] = "(unreadable model.json)"
    return info


def _counts(values: pd.Series, *, missing: str = "unknown") -> list[tuple[str, int]]:
    text = values.fillna("").astype(str).str.strip().replace("", missing)
    counts = text.value_counts()
    return [(str(k), int(v)) for k, v in counts.head(_TOP).items()]


def _protocols(frame: pd.DataFrame) -> list[tuple[str, int]]:
    """The most common acquisition protocols (field strength, TR/TE/TI, flip, voxel)."""
    if not any(c.startswith("hdr_") for c in frame.columns):
        return []

    def column(name: str) -> list[Any]:
        return frame[name].tolist() if name in frame else [None] * len(frame)

    parts = []
    for fs, tr, te, ti, flip, vx, vy, vz in zip(
        *(
            column(c)
            for c in (
                "hdr_field_strength",
                "hdr_tr",
                "hdr_te",
                "hdr_ti",
                "hdr_flip_angle",
                "hdr_voxel_x",
                "hdr_voxel_y",
                "hdr_voxel_z",
            )
        ),
        strict=True,
    ):
        text = [
            f"{_short(fs)} T",
            f"TR {_short(tr)} ms",
            f"TE {_short(te)} ms",
            f"TI {_short(ti)} ms",
            f"flip {_short(flip)}°",
        ]
        voxel = sorted(v for v in (_float(vx), _float(vy), _float(vz)) if math.isfinite(v))
        text.append("voxel " + ("x".join(f"{v:.2g}" for v in voxel) + " mm" if voxel else "?"))
        parts.append(", ".join(text))
    return [(k, int(v)) for k, v in pd.Series(parts).value_counts().head(_TOP).items()]


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _short(value: Any) -> str:
    number = _float(value)
    return f"{number:.4g}" if math.isfinite(number) else "?"


def _finding_counts(frame: pd.DataFrame) -> list[tuple[str, int]]:
    counts: dict[str, int] = {}
    for text in frame["findings"].tolist():
        for item in filter(None, text.split("; ")):
            code = item.split(":", 1)[0]
            counts[code] = counts.get(code, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def _truths(frame: pd.DataFrame) -> np.ndarray | None:
    if "truth" not in frame:
        return None
    values = pd.to_numeric(frame["truth"], errors="coerce").to_numpy(dtype=float)
    return np.where(np.isfinite(values), values, -1).astype(int)


def _iqm_figure(frame: pd.DataFrame) -> str:
    directions, titles_of = iqm_tables()
    chosen = [c for c in KEY_IQMS if c in frame and frame[c].notna().any()][:MAX_IQM_PANELS]
    if not chosen:
        return ""
    words = {1: "higher is better", -1: "lower is better", 0: "descriptive"}
    titles = {c: f"{iqm_title(c, titles_of)} ({words[directions.get(c[4:], 0)]})" for c in chosen}
    values = {c: pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float) for c in chosen}
    png = figures.iqm_distributions(values, frame["flagged"].to_numpy(dtype=bool), titles=titles)
    return figures.png_data_uri(png)


def _mriqc_agreement(path: Path | None) -> list[dict[str, str]]:
    """The rows of ``cohort/mriqc/agreement.tsv`` as the report shows them (none without it)."""
    if path is None or not Path(path).is_file():
        return []
    table = read_tsv(path, text=True)
    titles_of = iqm_tables()[1]
    return [
        {
            "metric": row["metric"],
            "title": iqm_title(row["metric"], titles_of),
            "n": row["n"],
            "rho": _number(_float(row["rho"]), 3),
            "ours": _number(_float(row["median_ours"]), 3),
            "theirs": _number(_float(row["median_theirs"]), 3),
            "difference": _number(100 * _float(row["median_abs_rel_diff"]), 1),
        }
        for row in table.to_dict("records")
    ]


def _usable(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _subject_json(out_dir: Path, bids_id: str) -> dict[str, Any]:
    path = paths.subject_scores(out_dir, bids_id)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _montage(out_dir: Path, row: dict[str, Any]) -> dict[str, Any]:
    """One flagged subject's card: montage image (or why there is none) and region."""
    bids_id = row["bids_id"]
    card: dict[str, Any] = {"image": "", "no_image": "", "region": ""}
    if not bids_id or row["failed_stage"] == "cohort":
        card["no_image"] = "not processed: " + row["reason"]
        return card
    details = _subject_json(out_dir, bids_id)
    listed = details.get("images") if isinstance(details.get("images"), dict) else {}
    image, anomaly = (out_dir / str(listed.get(name, "-")) for name in ("preproc", "anomaly_map"))
    if not _usable(image):
        stopped = f" (processing stopped at {row['failed_stage']})" if row["failed_stage"] else ""
        card["no_image"] = f"no registered image{stopped}"
        return card
    anomaly_path = anomaly if _usable(anomaly) else None
    centre = None
    regions = details.get("top_regions") or []
    if regions and isinstance(regions[0], dict):
        region = regions[0]
        centroid = region.get("centroid_mm")
        if isinstance(centroid, list) and len(centroid) == 3:
            centre = [_float(c) for c in centroid]
            volume, peak = _float(region.get("volume_ml")), _float(region.get("peak"))
            card["region"] = (
                "most anomalous region at ("
                + ", ".join(f"{c:.0f}" for c in centre)
                + ") mm MNI"
                + (f", {volume:.2g} ml" if math.isfinite(volume) else "")
                + (f", peak {peak:.2f}" if math.isfinite(peak) else "")
            )
    try:
        if centre is None and anomaly_path is not None:
            centre = list(figures.map_peak_mm(anomaly_path))
            card["region"] = (
                "anomaly map maximum at (" + ", ".join(f"{c:.0f}" for c in centre) + ") mm MNI"
            )
        png = figures.make_subject_montage(image, anomaly_path, centre_mm=centre)
    except Exception as error:
        # One unreadable image must not cost the cohort its report.
        log.warning("montage of %s failed: %s", row["folder"], error)
        card["no_image"] = f"montage not drawn: {error}"
        return card
    card["image"] = figures.png_data_uri(png)
    if anomaly_path is None:
        card["region"] = card["region"] or "no anomaly map: registered image only"
    return card


def build_report(
    out_dir: Path,
    *,
    scores_tsv: Path,
    exclusions_tsv: Path,
    metrics_json: Path | None,
    config: dict[str, Any],
    out_html: Path,
    mriqc_agreement_tsv: Path | None = None,
) -> None:
    """Render the cohort report to ``out_html`` (self-contained HTML, no external reference).

    Reads scores.tsv (every subject), exclusions.tsv (flagged subjects),
    metrics.json (when labels were given), the MRIQC agreement table (when
    ``mriqc_dir`` was given) and, for the montages of flagged subjects, their
    subject JSON, registered image and anomaly map under ``out_dir``.
    """
    started = datetime.datetime.now(datetime.UTC)
    frame = read_scores(scores_tsv)
    exclusions = read_tsv(exclusions_tsv, text=True)
    iqm_evidence = dict(
        zip(
            exclusions["folder"],
            exclusions.get("iqm_outliers", [""] * len(exclusions)),
            strict=True,
        )
    )
    metrics = None
    if metrics_json is not None and Path(metrics_json).is_file():
        metrics = json.loads(Path(metrics_json).read_text())

    mriqc = _mriqc_agreement(mriqc_agreement_tsv)

    status = frame["status"].to_numpy(dtype=str)
    score = frame["audit_score"].to_numpy(dtype=float)
    model_score = frame["anomaly_score"].to_numpy(dtype=float)
    flagged = frame["flagged"].to_numpy(dtype=bool)
    reference = reference_mask(
        status, frame["in_reference"].to_numpy(dtype=bool), np.isfinite(model_score)
    )
    threshold = table_threshold(frame, flag=config.get("flag") or {})
    truths = _truths(frame)

    records = frame.to_dict("records")
    flagged_rows = [r for r in records if r["flagged"]]
    max_montages = int((config.get("report") or {}).get("max_montages", MAX_MONTAGES))
    chosen = flagged_rows[:max_montages]
    # Reading gzipped NIfTI dominates; zlib and numpy release the GIL, so threads help.
    with ThreadPoolExecutor(max_workers=MONTAGE_THREADS) as pool:
        montages = list(pool.map(lambda row: _montage(out_dir, row), chosen))
    for row, card in zip(chosen, montages, strict=True):
        card.update(
            folder=row["folder"],
            status=row["status"],
            score=_number(row["audit_score"]),
            reasons=[r for r in row["flag_reasons"].split("; ") if r],
            notes=[n for n in row["notes"].split("; ") if n],
            evidence=iqm_evidence.get(row["folder"], ""),
            series=str(row.get("hdr_series_description") or "")
            if not pd.isna(row.get("hdr_series_description"))
            else "",
        )
    anchors = {card["folder"]: f"m{index}" for index, card in enumerate(montages)}
    for card in montages:
        card["anchor"] = anchors[card["folder"]]

    rows = [
        {
            "folder": r["folder"],
            "status": r["status"],
            "score": _number(r["audit_score"]),
            "model_score": _number(r["anomaly_score"]),
            "group": str(r.get("scanner_group") or ""),
            "flagged": bool(r["flagged"]),
            "reasons": r["flag_reasons"],
            "findings": "; ".join(filter(None, (r["findings"], r["notes"]))),
            "truth": "" if truths is None or truths[i] < 0 else str(int(truths[i])),
            "anchor": anchors.get(r["folder"], ""),
        }
        for i, r in enumerate(records)
    ]

    figures_ctx: dict[str, str] = {
        "scores": figures.png_data_uri(figures.score_histogram(score, truths, threshold=threshold))
        if np.isfinite(score).any()
        else "",
        "iqms": _iqm_figure(frame),
    }
    if metrics and metrics.get("roc_curve"):
        figures_ctx["roc"] = figures.png_data_uri(figures.roc_figure(metrics))
        figures_ctx["pr"] = figures.png_data_uri(figures.pr_figure(metrics))

    data, thumbnails_note = workbench.cohort_data(
        frame,
        out_dir,
        page=Path(out_html),
        threshold=_float(threshold),
        max_inline=int(
            (config.get("report") or {}).get("max_subjects_inline", workbench.MAX_SUBJECTS_INLINE)
        ),
        run=workbench.run_id(scores_tsv),
    )
    n = len(frame)
    context = {
        "run_id": data["run_id"],
        "cohort_json": workbench.script_json(data),
        "thumbnails_note": thumbnails_note,
        "title": "mriaudit cohort report",
        "generated": started.isoformat(timespec="seconds"),
        "summary": {
            "n": n,
            "status": [(s, int((status == s).sum())) for s in ("ok", "failed", "no_series")],
            "flagged": int(flagged.sum()),
            "flagged_rate": f"{100 * flagged.mean():.1f} %" if n else "n/a",
            "scored": int(np.isfinite(model_score).sum()),
            "reference": int(reference.sum()),
            "threshold": _number(threshold),
            "excluded_rows": len(exclusions),
            "exclusions_file": Path(exclusions_tsv).name,
        },
        "vendors": _counts(frame["hdr_manufacturer"]) if "hdr_manufacturer" in frame else [],
        "protocols": _protocols(frame),
        "scanners": sites.scanner_view(frame, threshold=_float(threshold)),
        "participants": sites.participant_views(frame, threshold=_float(threshold)),
        "mriqc": mriqc,
        "findings": _finding_counts(frame),
        "contrasts": contrasts.summary(frame),
        "rows": rows,
        "has_labels": truths is not None,
        "metrics": metrics,
        "figures": figures_ctx,
        "montages": montages,
        "n_flagged_rows": len(flagged_rows),
        "max_montages": max_montages,
        "failures": [
            {
                "folder": r["folder"],
                "status": r["status"],
                "stage": r["failed_stage"],
                "reason": r["reason"],
            }
            for r in records
            if r["status"] != OK
        ],
        "provenance": {
            "versions": _versions(),
            "config": json.dumps(config, indent=2, sort_keys=True, default=str),
            "model": _model_provenance(out_dir),
            "date": started.isoformat(timespec="seconds"),
            "output_dir": str(out_dir),
        },
        "fmt": _number,
    }
    html = _environment().get_template("report.html.j2").render(**context)
    files.write_text(out_html, html)
    elapsed = (datetime.datetime.now(datetime.UTC) - started).total_seconds()
    log.info(
        "report: %d subjects, %d montages, %.1f MB in %.1f s -> %s",
        n,
        len(montages),
        len(html.encode()) / 1e6,
        elapsed,
        out_html,
    )
