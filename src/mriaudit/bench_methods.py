"""Every detector on the same cohorts: ``python -m mriaudit.bench_methods`` (part of ``make bench``).

Runs the workflow once per normative model method (config ``model.method``)
on two cohorts, each with one output folder whose preprocessing every method
reuses (only training and scoring rerun):

- ``real``: the real-head cohort of :mod:`mriaudit.bench_detection`, read
  leave-one-person-out (one fold per person, so no subject is scored by a model
  that saw its person);
- ``demo``: the demo cohort (``make demo``'s input and labels), default folds.

After each run the score table, the evaluation and the rules' benchmark files
are kept under ``WORK/<cohort>/<method>/``. The ensemble (the mean, over the
methods, of each subject's rank by the model score) is computed from those
tables. It prints one table per cohort: per method, AUROC/AUPRC of the model
score (``anomaly_score``) and of the audit score overall, the model score's
AUROC per anomaly kind, voxel AUPRC on the lesion cases, false flags among
normals, and training and scoring seconds per subject. Figures go to
``WORK/methods.json``. ``--reuse`` tabulates the kept runs without running
anything (after a run, to print the table again or add the ensemble).
Labels are read only here, after the runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from mriaudit import bench_detection, cohort, demo, heads
from mriaudit.aggregate import read_scores
from mriaudit.model.methods import METHODS

log = logging.getLogger(__name__)

PROJECT = bench_detection.PROJECT
COHORTS = ("real", "demo")
ENSEMBLE = "ensemble"
#: What a run leaves that the table needs, relative to its output folder.
KEPT = ("cohort/scores.tsv", "cohort/metrics.json", "benchmarks/train_model", "benchmarks/score")


def keep_run(out_dir: Path, dest: Path) -> None:
    """Copy what the table needs of a finished run in ``out_dir`` to ``dest``."""
    for relative in KEPT:
        source, target = out_dir / relative, dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)


def _seconds(folder: Path) -> float:
    """Wall seconds summed over the Snakemake benchmark TSVs in ``folder``."""
    return float(sum(pd.read_csv(p, sep="\t")["s"].sum() for p in sorted(folder.glob("*.tsv"))))


def run_figures(kept: Path, labels: Path) -> dict[str, Any]:
    """Detection (per kind), localisation and cost figures of one kept run.

    ``voxel_auprc_lesion`` is the evaluation's mean voxel AUPRC over the lesion
    cases (None without one); ``train_s_per_subject`` divides the training
    job's wall time by the reference subjects it trained on, and
    ``score_s_per_subject`` the scoring jobs' by the subjects scored.
    """
    figures = bench_detection.detection_figures(kept / "cohort" / "scores.tsv", labels)
    metrics = json.loads((kept / "cohort" / "metrics.json").read_text())
    frame = read_scores(kept / "cohort" / "scores.tsv")
    scored = int(frame["anomaly_score"].notna().sum()) if "anomaly_score" in frame else 0
    reference = int(frame["in_reference"].astype(bool).sum()) if "in_reference" in frame else 0
    train_s = _seconds(kept / "benchmarks" / "train_model")
    score_s = _seconds(kept / "benchmarks" / "score")
    figures["voxel_auprc_lesion"] = (metrics.get("localisation") or {}).get("voxel_auprc_mean")
    figures["train_s"], figures["score_s"] = round(train_s, 1), round(score_s, 1)
    figures["train_s_per_subject"] = round(train_s / reference, 2) if reference else None
    figures["score_s_per_subject"] = round(score_s / scored, 2) if scored else None
    return figures


def ensemble_figures(tables: dict[str, Path], labels: Path) -> dict[str, Any]:
    """The rank-average ensemble's model-score figures (per kind and overall).

    Each method's ``anomaly_score`` becomes a rank over the subjects (subjects
    that are not ``ok`` rank above every scored one, as in the single-method
    figures); the ensemble score is the mean rank. AUROC/AUPRC only: the
    ensemble has no flag of its own.
    """
    ranks = []
    base: pd.DataFrame | None = None
    for table in tables.values():
        frame = read_scores(table).sort_values("folder").reset_index(drop=True)
        if base is not None and list(frame["folder"]) != list(base["folder"]):
            message = f"the methods' score tables list different subjects: {sorted(tables)}"
            raise ValueError(message)
        base = frame if base is None else base
        ranks.append(stats.rankdata(bench_detection.ranking_score(frame, "anomaly_score")))
    assert base is not None
    frame = base.copy()
    frame["anomaly_score"] = np.mean(ranks, axis=0)
    frame = frame.merge(
        cohort.read_labels_table(labels)[["folder", "kind"]], on="folder", how="inner"
    )
    score = frame["anomaly_score"].to_numpy(dtype=float)
    kind = frame["kind"].to_numpy(dtype=str)
    normal = kind == "normal"
    out: dict[str, Any] = {"methods": sorted(tables), "kinds": {}}
    for name in ["overall", *[k for k in demo.ANOMALY_KINDS if (kind == k).any()]]:
        members = ~normal if name == "overall" else kind == name
        keep = members | normal
        out["kinds"][name] = {
            "n": int(members.sum()),
            "anomaly_score": bench_detection.scores_for(members[keep], score[keep]),
        }
    return out


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(cohort_name: str, figures: dict[str, dict[str, Any]]) -> str:
    """One cohort's methods as a Markdown table (the README's)."""
    kinds = [k for k in next(iter(figures.values()))["kinds"] if k != "overall"]
    header = ["method", "model AUROC", "AUPRC", "audit AUROC", "AUPRC", *kinds]
    header += ["voxel AUPRC (lesions)", "false flags", "train s/subject", "score s/subject"]
    lines = [f"{cohort_name}:", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, entry in figures.items():
        overall = entry["kinds"]["overall"]
        audit = overall.get("audit_score", {})
        row = [
            method,
            _cell(overall["anomaly_score"]["auroc"]),
            _cell(overall["anomaly_score"]["auprc"]),
            _cell(audit.get("auroc")),
            _cell(audit.get("auprc")),
            *(
                _cell(entry["kinds"].get(k, {}).get("anomaly_score", {}).get("auroc"))
                for k in kinds
            ),
            _cell(entry.get("voxel_auprc_lesion")),
            "-" if method == ENSEMBLE else str(len(entry["false_flags"])),
            _cell(entry.get("train_s_per_subject"), 1),
            _cell(entry.get("score_s_per_subject"), 2),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _demo_cohort(work: Path) -> tuple[Path, Path]:
    """The demo's input and labels (``make demo``'s), generated under ``work`` if absent."""
    input_dir, labels = PROJECT / "results" / "demo-input", PROJECT / "results" / "demo-labels.tsv"
    if input_dir.is_dir() and labels.is_file():
        return input_dir, labels
    input_dir, labels = work / "demo-input", work / "demo-labels.tsv"
    if not labels.is_file():
        command = [sys.executable, "-m", "mriaudit.demo", str(input_dir), "--subjects", "30"]
        subprocess.run([*command, "--labels", str(labels)], check=True)
    return input_dir, labels


def run(
    work: Path,
    data_root: Path | None,
    *,
    methods: tuple[str, ...],
    cohorts: tuple[str, ...],
    cores: int,
    reuse: bool,
) -> dict[str, Any]:
    """Run (or, with ``reuse``, only read) every method on every cohort; the figures."""
    sources: dict[str, tuple[Path, Path, dict[str, Any]]] = {}
    if "real" in cohorts and data_root is not None:
        real = work / "real"
        input_dir, labels, groups = bench_detection.build_cohort(
            real, data_root, renditions=3, per_kind=2, seed=0, voxel_size_mm=1.2
        )
        persons = int(pd.read_csv(groups, sep="\t")["group"].nunique())
        config = {"training": {"fold_groups": str(groups), "folds": persons}}
        sources["real"] = (input_dir, labels, config)
    if "demo" in cohorts:
        input_dir, labels = _demo_cohort(work)
        sources["demo"] = (input_dir, labels, {})
    result: dict[str, Any] = {}
    for name, (input_dir, labels, config) in sources.items():
        (work / name).mkdir(parents=True, exist_ok=True)
        figures: dict[str, dict[str, Any]] = {}
        tables: dict[str, Path] = {}
        for method in methods:
            kept = work / name / method
            if not reuse:
                log.info("%s cohort, model.method %s", name, method)
                out_dir = work / name / "out"
                bench_detection.run_workflow(
                    input_dir,
                    out_dir,
                    labels,
                    cores=cores,
                    config={**config, "model": {"method": method}},
                    configfile=work / name / f"config-{method}.yaml",
                )
                keep_run(out_dir, kept)
            if not (kept / "cohort" / "scores.tsv").is_file():
                log.warning("no kept run of %s on the %s cohort: left out", method, name)
                continue
            figures[method] = run_figures(kept, labels)
            tables[method] = kept / "cohort" / "scores.tsv"
        if len(tables) > 1:
            figures[ENSEMBLE] = ensemble_figures(tables, labels)
        result[name] = figures
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mriaudit.bench_methods", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--work", type=Path, default=Path("results/bench/methods"))
    parser.add_argument("--shared-data", type=Path, default=PROJECT.parent / "shared" / "data")
    parser.add_argument("--method", choices=list(METHODS), action="append")
    parser.add_argument("--cohort", choices=list(COHORTS), action="append")
    parser.add_argument("--cores", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="tabulate the kept runs only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cohorts = tuple(args.cohort or COHORTS)
    data_root = (
        heads.unpack_shared(args.shared_data, args.work / "real") if "real" in cohorts else None
    )
    if "real" in cohorts and data_root is None:
        print(f"real-head cohort skipped: no real heads at {args.shared_data}")
    result = run(
        args.work,
        data_root,
        methods=tuple(args.method or METHODS),
        cohorts=cohorts,
        cores=args.cores,
        reuse=args.reuse,
    )
    written = args.work / "methods.json"
    written.parent.mkdir(parents=True, exist_ok=True)
    # A run of one cohort keeps the other cohort's figures of an earlier run.
    earlier = json.loads(written.read_text()) if written.is_file() else {}
    written.write_text(json.dumps(earlier | result, indent=2) + "\n")
    for name, figures in result.items():
        print((table(name, figures) if figures else f"{name}: no kept run") + "\n")
    print(f"written: {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
