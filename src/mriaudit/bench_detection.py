"""Detection benchmark on real heads: ``python -m mriaudit.bench_detection`` (part of ``make bench``).

The demo's normals are warped copies of the registration target, which
flatters every detector. This benchmark renders a cohort whose normals are six
distinct real people (``mriaudit.heads``), each several times with its own
deformation, pose, grid, vendor and noise, and whose anomalies are every demo
anomaly kind at least twice on those same heads; it runs the workflow twice on
it and prints, per anomaly kind and overall, AUROC/AUPRC of each score and the
flag's TPR and FPR:

- ``random folds``: the default training (``reference: all``, out-of-fold by
  subject), so other renditions of a scored person may have trained its model;
- ``leave-one-person-out``: ``training.fold_groups`` by person with one fold
  per person, so every subject is scored by a model that never saw that
  person. This is the reading to trust; the gap between the two is what a
  person seen in training would flatter.

Subjects that are not ``ok`` (a failed stage) rank above every scored
subject: the audit flags them by their finding. Labels are read only here,
after the run.

``--method`` picks the normative model (config ``model.method``); the figures
go to ``detection-<method>.json`` under the work folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mriaudit import cohort, demo, heads
from mriaudit.aggregate import read_scores
from mriaudit.cohort import DEFAULT_MODEL_METHOD
from mriaudit.evaluate import rank_auroc, step_average_precision
from mriaudit.model.methods import METHODS

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[2]
#: Score columns of scores.tsv compared (the first is the audit's verdict score).
SCORE_COLUMNS = ("audit_score", "anomaly_score")
READINGS = ("random_folds", "leave_one_person_out")


def build_cohort(
    work: Path,
    data_root: Path,
    *,
    renditions: int,
    per_kind: int,
    seed: int,
    voxel_size_mm: float,
    persons: tuple[str, ...] = heads.PERSON_IDS,
) -> tuple[Path, Path, Path]:
    """Prepare the heads and write the cohort; returns (input_dir, labels TSV, person groups TSV)."""
    prepared = heads.prepared_heads(data_root, work / "heads", persons=persons)
    plans = demo.plan_real_heads(prepared, renditions=renditions, per_kind=per_kind, seed=seed)
    input_dir, labels = work / "input", work / "labels.tsv"
    # The cohort is rendered once per recipe: a new head preparation or other options
    # render it (and run the workflow) anew instead of judging the old one.
    recipe = {
        "heads": heads.RECIPE,
        "persons": list(persons),
        "renditions": renditions,
        "per_kind": per_kind,
        "seed": seed,
        "voxel_size_mm": voxel_size_mm,
    }
    stamp = work / "cohort.json"
    if not labels.is_file() or not stamp.is_file() or json.loads(stamp.read_text()) != recipe:
        for stale in (input_dir, work / "out"):
            shutil.rmtree(stale, ignore_errors=True)
        labels.unlink(missing_ok=True)
        demo.write_cohort(plans, input_dir, voxel_size_mm=voxel_size_mm, labels_path=labels)
        stamp.write_text(json.dumps(recipe))
    groups = work / "person_groups.tsv"
    table = cohort.read_labels_table(labels)
    table.rename(columns={"person": "group"})[["folder", "group"]].to_csv(
        groups, sep="\t", index=False
    )
    return input_dir, labels, groups


def run_workflow(
    input_dir: Path,
    out_dir: Path,
    labels: Path,
    *,
    cores: int,
    config: dict[str, Any],
    configfile: Path,
) -> float:
    """Run the Snakefile on the cohort with ``config`` on top; returns wall seconds.

    Raises on a failed run. The config goes through ``configfile``: ``--config``
    would read nested values as strings. The benchmarks measure the T1w's detection:
    ``contrasts`` is ``[T1w]`` unless ``config`` says otherwise (the real heads have no
    T2w or FLAIR of their people, only the demo's 2D T2 of some, which would otherwise
    train models of their own and add their flags).
    """
    full = {
        "input_dir": str(input_dir),
        "output_dir": str(out_dir),
        "labels": str(labels),
        "contrasts": ["T1w"],
    }
    configfile.write_text(yaml.safe_dump({**full, **config}))
    command = [str(Path(sys.executable).with_name("snakemake")), "--cores", str(cores), "--quiet"]
    command += ["--configfile", str(configfile)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True)
    if result.returncode:
        message = f"workflow failed ({result.returncode}):\n{result.stderr[-3000:]}"
        raise RuntimeError(message)
    return time.perf_counter() - started


def ranking_score(frame: pd.DataFrame, column: str) -> np.ndarray:
    """The column as a ranking: subjects that are not ok rank above every scored one."""
    values = frame[column].to_numpy(dtype=float) if column in frame else np.full(len(frame), np.nan)
    not_ok = frame["status"].to_numpy(dtype=str) != "ok"
    top = np.nanmax(values) + 1.0 if np.isfinite(values).any() else 1.0
    values = np.where(not_ok, top, values)
    # An ok subject the model could not score is as unsuspicious as it gets for that score.
    low = np.nanmin(values) - 1.0 if np.isfinite(values).any() else 0.0
    return np.where(np.isfinite(values), values, low)


def scores_for(truth: np.ndarray, score: np.ndarray) -> dict[str, float | None]:
    if truth.all() or not truth.any():
        return {"auroc": None, "auprc": None}
    return {
        "auroc": round(rank_auroc(truth, score), 4),
        "auprc": round(step_average_precision(truth, score), 4),
    }


def detection_figures(scores_tsv: Path, labels_tsv: Path) -> dict[str, Any]:
    """Per anomaly kind and overall: AUROC/AUPRC of each score, the flag's TPR, and its FPR.

    Each kind is measured against all normals; ``overall`` against all anomalies.
    """
    frame = read_scores(scores_tsv)
    labels = cohort.read_labels_table(labels_tsv)
    frame = frame.merge(labels[["folder", "kind", "person"]], on="folder", how="inner")
    normal = frame["kind"].to_numpy(dtype=str) == "normal"
    flagged = frame["flagged"].to_numpy(dtype=bool)
    ranking = {column: ranking_score(frame, column) for column in SCORE_COLUMNS}
    kinds = [k for k in demo.ANOMALY_KINDS if (frame["kind"] == k).any()]
    figures: dict[str, Any] = {
        "n_normal": int(normal.sum()),
        "n_anomalous": int((~normal).sum()),
        "fpr": round(float(flagged[normal].mean()), 4) if normal.any() else None,
        "false_flags": sorted(frame.loc[normal & flagged, "folder"].tolist()),
        "kinds": {},
    }
    for kind in ["overall", *kinds]:
        members = ~normal if kind == "overall" else frame["kind"].to_numpy(dtype=str) == kind
        keep = members | normal
        truth = members[keep]
        entry: dict[str, Any] = {"n": int(members.sum())}
        for column, score in ranking.items():
            entry[column] = scores_for(truth, score[keep])
        entry["tpr"] = round(float(flagged[members].mean()), 4) if members.any() else None
        entry["missed"] = sorted(frame.loc[members & ~flagged, "folder"].tolist())
        figures["kinds"][kind] = entry
    return figures


def table(result: dict[str, Any]) -> str:
    """The figures as a plain-text table, one block per reading."""
    lines = [f"model.method: {result.get('method', DEFAULT_MODEL_METHOD)}"]
    for reading, figures in result["readings"].items():
        lines.append(
            f"{reading}: {figures['n_normal']} normals, {figures['n_anomalous']} anomalies; "
            f"flag FPR {figures['fpr']:.3f} (false flags: {', '.join(figures['false_flags']) or 'none'})"
        )
        header = f"  {'kind':<16}{'n':>3}  " + "  ".join(
            f"{c + ' AUROC':>20}{'AUPRC':>7}" for c in SCORE_COLUMNS
        )
        lines.append(header + f"{'flag TPR':>10}")
        for kind, entry in figures["kinds"].items():
            cells = []
            for column in SCORE_COLUMNS:
                auroc, auprc = entry[column]["auroc"], entry[column]["auprc"]
                cells.append(
                    f"{'-' if auroc is None else f'{auroc:.3f}':>20}"
                    f"{'-' if auprc is None else f'{auprc:.3f}':>7}"
                )
            lines.append(
                f"  {kind:<16}{entry['n']:>3}  " + "  ".join(cells) + f"{entry['tpr']:>10.2f}"
            )
        lines.append("")
    return "\n".join(lines)


def run(
    work: Path,
    data_root: Path,
    *,
    renditions: int = 3,
    per_kind: int = 2,
    seed: int = 0,
    voxel_size_mm: float = 1.2,
    cores: int = 2,
    readings: tuple[str, ...] = tuple(READINGS),
    method: str = DEFAULT_MODEL_METHOD,
) -> dict[str, Any]:
    """Build the cohort under ``work``, run each reading with the normative model's
    ``method`` (config ``model.method``), return the figures."""
    input_dir, labels, groups = build_cohort(
        work,
        data_root,
        renditions=renditions,
        per_kind=per_kind,
        seed=seed,
        voxel_size_mm=voxel_size_mm,
    )
    persons = pd.read_csv(groups, sep="\t")["group"].nunique()
    result: dict[str, Any] = {
        "method": method,
        "cohort": {
            "persons": int(persons),
            "renditions": renditions,
            "per_kind": per_kind,
            "seed": seed,
            "voxel_size_mm": voxel_size_mm,
        },
        "readings": {},
        "wall_s": {},
    }
    # One output folder: the second reading reuses the preprocessing and retrains.
    out_dir = work / "out"
    for reading in readings:
        config: dict[str, Any] = {"model": {"method": method}}
        if reading == "leave_one_person_out":
            config["training"] = {"fold_groups": str(groups), "folds": int(persons)}
        result["wall_s"][reading] = round(
            run_workflow(
                input_dir,
                out_dir,
                labels,
                cores=cores,
                config=config,
                configfile=work / f"config-{reading}.yaml",
            ),
            1,
        )
        result["readings"][reading] = detection_figures(out_dir / "cohort" / "scores.tsv", labels)
    return result


def cohort_parser(
    prog: str, description: str, *, work: str, renditions: int
) -> argparse.ArgumentParser:
    """The options of a benchmark on a rendered real-head cohort (``--work``,
    ``--shared-data``, ``--renditions``, ``--per-kind``, ``--seed``, ``--voxel-size``,
    ``--cores``)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--work", type=Path, default=Path(work))
    parser.add_argument("--shared-data", type=Path, default=PROJECT.parent / "shared" / "data")
    parser.add_argument(
        "--renditions", type=int, default=renditions, help="normal renditions per person"
    )
    parser.add_argument("--per-kind", type=int, default=2, help="subjects per anomaly kind")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--voxel-size", type=float, default=1.2)
    parser.add_argument("--cores", type=int, default=2)
    return parser


def cohort_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword options of a benchmark's ``run`` from :func:`cohort_parser`'s arguments."""
    return {
        "renditions": args.renditions,
        "per_kind": args.per_kind,
        "seed": args.seed,
        "voxel_size_mm": args.voxel_size,
        "cores": args.cores,
    }


def shared_root(args: argparse.Namespace, *, what: str) -> Path | None:
    """Set up logging and unpack ../shared's data under the work folder; None (and a
    line saying the ``what`` benchmark is skipped) when there is none."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    data_root = heads.unpack_shared(args.shared_data, args.work)
    if data_root is None:
        print(f"{what} benchmark skipped: no real data at {args.shared_data}")
    return data_root


def write_result(result: dict[str, Any], written: Path, text: str) -> None:
    """Write a benchmark's figures as JSON and print them as ``text``."""
    written.write_text(json.dumps(result, indent=2) + "\n")
    print(text)
    print(f"written: {written}")


def main(argv: list[str] | None = None) -> int:
    parser = cohort_parser(
        "python -m mriaudit.bench_detection",
        __doc__.split("\n")[0],
        work="results/bench/detection",
        renditions=3,
    )
    parser.add_argument("--reading", choices=list(READINGS), action="append")
    parser.add_argument(
        "--method",
        choices=list(METHODS),
        default=DEFAULT_MODEL_METHOD,
        help="the normative model (config model.method)",
    )
    args = parser.parse_args(argv)
    data_root = shared_root(args, what="detection")
    if data_root is None:
        return 0
    result = run(
        args.work,
        data_root,
        **cohort_options(args),
        readings=tuple(args.reading or READINGS),
        method=args.method,
    )
    write_result(result, args.work / f"detection-{args.method}.json", table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
