"""The demo cohort on disk: subject folders, the labels TSV, and the command line.

``generate_cohort`` plans, renders and writes a cohort (in parallel processes)
and its labels (``LABEL_COLUMNS``); ``write_cohort`` does the same for given
plans (the detection benchmark); ``main`` is ``python -m mriaudit.demo``.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mriaudit.demo.anatomy import _head
from mriaudit.demo.plan import (
    EXTRA_CONTRASTS,
    FULL_MIX_SUBJECTS,
    MIN_SUBJECTS,
    SubjectPlan,
    plan_cohort,
)
from mriaudit.demo.render import SubjectScan, render_subject
from mriaudit.demo.writer import write_subject
from mriaudit.template import load_brain_mask

logger = logging.getLogger(__name__)


LABEL_COLUMNS = (
    "folder",
    "truth",
    "kind",
    "contrast",
    "description",
    "lesion_x_mm",
    "lesion_y_mm",
    "lesion_z_mm",
    "lesion_radius_mm",
    "person",
)
#: ``person`` of subjects made from the template head.
TEMPLATE_PERSON = "MNI152"


def _truth_row(scan: SubjectScan) -> dict[str, object]:
    # The lesion columns locate a lesion on the T1's anomaly map; one planted in another
    # contrast is described in words only.
    lesion = scan.lesion if scan.plan.anomaly_contrast == "T1w" else None
    centre = lesion.centre_mni_mm if lesion else (np.nan, np.nan, np.nan)
    return {
        "folder": scan.plan.folder,
        "truth": scan.plan.truth,
        "kind": scan.plan.kind,
        "contrast": scan.plan.anomaly_contrast if scan.plan.truth else "",
        "description": "; ".join(scan.notes) or "normal",
        "lesion_x_mm": centre[0],
        "lesion_y_mm": centre[1],
        "lesion_z_mm": centre[2],
        "lesion_radius_mm": lesion.radius_mm if lesion else np.nan,
        "person": scan.plan.person or TEMPLATE_PERSON,
    }


def _check_destination(out_dir: Path, labels_path: Path) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        message = f"demo output folder {str(out_dir)!r} is not empty; remove it or choose another"
        raise FileExistsError(message)
    inside = labels_path.resolve().parent
    if inside != out_dir.resolve() and out_dir.resolve() in inside.parents:
        message = f"labels file {str(labels_path)!r} would sit inside a subject folder of {str(out_dir)!r}"
        raise ValueError(message)


def _make_subject(plan: SubjectPlan, out_dir: Path, voxel_size_mm: float) -> dict[str, object]:
    """Render and write one subject; returns its labels row."""
    started = time.perf_counter()
    scan = render_subject(plan, voxel_size_mm=voxel_size_mm)
    write_subject(scan, out_dir / plan.folder)
    logger.info("%s: %s (%.1f s)", plan.folder, plan.kind, time.perf_counter() - started)
    return _truth_row(scan)


def _default_jobs(n_subjects: int, voxel_size_mm: float) -> int:
    # Worker processes pay off only at full resolution (about 2 s a subject); coarse
    # test cohorts take a fraction of a second a subject. Each worker needs ~0.5 GB.
    if voxel_size_mm >= 2.0:
        return 1
    return max(1, min(os.cpu_count() or 1, 4, n_subjects))


def _make_all(
    plans: list[SubjectPlan], out_dir: Path, voxel_size_mm: float, jobs: int
) -> list[dict[str, object]]:
    if jobs <= 1:
        return [_make_subject(plan, out_dir, voxel_size_mm) for plan in plans]
    # Build the cached anatomy once; forked workers share it instead of rebuilding it.
    for plan in plans:
        _head(plan)
    load_brain_mask(resolution=1)
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = [pool.submit(_make_subject, plan, out_dir, voxel_size_mm) for plan in plans]
        return [future.result() for future in futures]


def generate_cohort(
    out_dir: str | Path,
    *,
    n_subjects: int = 30,
    seed: int = 0,
    voxel_size_mm: float = 1.2,
    labels_path: str | Path | None = None,
    jobs: int | None = None,
    contrasts: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Write the demo cohort under ``out_dir`` and its labels TSV; return the labels table.

    One folder per subject (nothing else at the top level except a labels file
    placed there). ``voxel_size_mm`` is the nominal T1 voxel size (each subject
    varies it by +-10 %); 0.8-8 mm. ``jobs`` worker processes (default: up to 4
    at full resolution, 1 for coarse cohorts); the output does not depend on it.
    The table has ``LABEL_COLUMNS``, lesion centres in MNI mm (RAS), one row per
    folder, sorted by folder name; ``contrast`` names the contrast an anomaly is in.
    ``contrasts`` (``T2w``, ``FLAIR``) are rendered beside each T1, some with an
    anomaly of their own (``plan.plan_cohort``).
    """
    return write_cohort(
        plan_cohort(n_subjects, seed=seed, contrasts=contrasts),
        out_dir,
        voxel_size_mm=voxel_size_mm,
        labels_path=labels_path,
        jobs=jobs,
    )


def write_cohort(
    plans: list[SubjectPlan],
    out_dir: str | Path,
    *,
    voxel_size_mm: float = 1.2,
    labels_path: str | Path | None = None,
    jobs: int | None = None,
) -> pd.DataFrame:
    """Render and write ``plans`` under ``out_dir`` with their labels TSV (see ``generate_cohort``)."""
    if not 0.8 <= voxel_size_mm <= 8.0:
        message = f"voxel size must be between 0.8 and 8 mm, got {voxel_size_mm}"
        raise ValueError(message)
    out = Path(out_dir)
    labels = Path(labels_path) if labels_path is not None else out / "labels.tsv"
    _check_destination(out, labels)
    out.mkdir(parents=True, exist_ok=True)
    workers = _default_jobs(len(plans), voxel_size_mm) if jobs is None else jobs
    rows = _make_all(plans, out, voxel_size_mm, workers)
    table = pd.DataFrame(rows, columns=list(LABEL_COLUMNS))
    table = table.sort_values("folder", ignore_index=True)
    labels.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(labels, sep="\t", index=False, na_rep="", float_format="%g")
    return table


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``python -m mriaudit.demo --help``); returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m mriaudit.demo",
        description="Generate the demo DICOM cohort (MNI152 anatomy, artefacts, broken inputs) and its labels.",
    )
    parser.add_argument("outdir", type=Path, help="new or empty folder; one sub-folder per subject")
    parser.add_argument(
        "--subjects",
        type=int,
        default=30,
        help=f"number of subjects (default 30; at least {FULL_MIX_SUBJECTS} for every anomaly kind, minimum {MIN_SUBJECTS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--voxel-size", type=float, default=1.2, help="nominal T1 voxel size in mm (default 1.2)"
    )
    parser.add_argument(
        "--labels", type=Path, default=None, help="labels TSV (default OUTDIR/labels.tsv)"
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="worker processes (default: automatic, up to 4)"
    )
    parser.add_argument(
        "--contrasts",
        nargs="*",
        default=[],
        choices=EXTRA_CONTRASTS,
        help="contrasts rendered beside each T1, some with an anomaly of their own (default none)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    try:
        table = generate_cohort(
            args.outdir,
            n_subjects=args.subjects,
            seed=args.seed,
            voxel_size_mm=args.voxel_size,
            labels_path=args.labels,
            jobs=args.jobs,
            contrasts=tuple(args.contrasts),
        )
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    logger.info(
        "wrote %d subjects (%d labelled 1) to %s in %.1f s",
        len(table),
        int(table["truth"].sum()),
        args.outdir,
        time.perf_counter() - started,
    )
    return 0
