"""Benchmark: what one 1 mm 3D T1 subject costs per stage, and the cohort steps at scale.

``python -m mriaudit.bench [--out results/bench] [--runs 3] [--subjects 10000 100000]``
(``make bench``) prints one table and writes ``OUT/bench.json``:

- ``per_subject``: the two jobs a subject costs, run as processes the way
  Snakemake runs them, on a real 1 mm MPRAGE from ``../shared/data`` when
  present (else a generated 1 mm demo subject): its ``preprocess`` job
  (inventory, convert, N4, registration, IQMs) and its share of a ``score``
  job that scores ``SCORE_COPIES`` subjects. Per stage (from its status
  record) and per job: wall and CPU seconds and peak resident memory (MB),
  the median of ``--runs`` runs; the total is the preprocess job plus the
  per-subject score time. Scoring needs a model: one is trained first on
  three copies of the registered image (``setup``; its time says nothing
  about a real training).
- ``scale``: per cohort size of ``--subjects``, the SLURM plan of that many
  placeholder folders (``snakemake -n --profile profiles/slurm``: time, peak
  memory, and the submissions it makes, which must stay within 5,000 for
  100,000 subjects), and aggregate + report on that many synthetic subjects'
  records, with the peak memory of that process (:mod:`mriaudit.bench_scale`).

- ``model``: per device present (``--device``: ``auto`` every one, ``cpu``,
  or ``cuda`` alone, which measures nothing else and says so where there is
  no GPU): scoring throughput in subjects/s (2 mm template grid, 3 fold models,
  through the score job's own path) and the time of one training epoch on the
  demo cohort's size (:mod:`mriaudit.bench_model`).

Figures are measurements of this machine (``machine``), not assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mriaudit import bench_scale, paths, records
from mriaudit.demo.records import synthetic_cohort

#: The per-subject stages, by the name of their status record, in the order they run.
SUBJECT_STAGES = (*paths.PREPROCESS_STAGES, "score")
SUBJECT = "bench"
PROJECT = Path(__file__).resolve().parents[2]
SHARED_MPRAGE = "dicom/dcm_qa_asl/In/T1"
#: The smallest demo cohort, which holds normals to pick the bench subject from.
MIN_DEMO_SUBJECTS = 6
#: Copies of the bench subject that one measured score job scores (as a cohort's job does).
SCORE_COPIES = 6


def _work_paths(work: Path) -> dict[str, Path]:
    out = work / "out"
    return {"folder": work / "input" / SUBJECT, "out": out, "model": work / "model"}


def _copies() -> list[str]:
    return [f"{SUBJECT}{i}" for i in range(SCORE_COPIES)]


def _score_cohort_inputs(work: Path) -> Path:
    """The bench subject's registered image and record under ``SCORE_COPIES`` ids."""
    out = _work_paths(work)["out"]
    bids_ids = _copies()
    for bids_id in bids_ids:
        for source, target in [
            (paths.preproc(out, SUBJECT, res=2), paths.preproc(out, bids_id, res=2)),
            (paths.record(out, SUBJECT, "register"), paths.record(out, bids_id, "register")),
        ]:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    table = work / "stages.tsv"
    table.write_text("bids_id\n" + "\n".join(bids_ids) + "\n")
    return table


def run_stage(stage: str, work: Path, *, threads: int) -> dict[str, Any]:
    """Run one measured job of the bench subject in this process (the child of :func:`measure`).

    Each job imports only its own modules, as the rule's script does: the
    import cost of ANTsPy or torch belongs to the jobs that use them.
    """
    where = _work_paths(work)
    out = where["out"]
    if stage == "preprocess":
        from mriaudit.subject import preprocess_subject

        return preprocess_subject(
            where["folder"], out_dir=out, bids_id=SUBJECT, rules={}, threads=threads
        )
    if stage == "train_model":
        from mriaudit.model import train

        copies = ["a", "b", "c"]
        return train.train_cohort(
            [paths.preproc(out, SUBJECT, res=2)] * len(copies),
            [paths.record(out, SUBJECT, "register")] * len(copies),
            copies,
            reference=copies,
            out_checkpoint=paths.model_checkpoint(where["model"]),
            out_sidecar=paths.model_sidecar(where["model"]),
            epochs=2,
            threads=threads,
        )
    if stage == "score":
        from mriaudit.model import score

        table = score.score_cohort(
            work / "stages.tsv",
            checkpoint=paths.model_checkpoint(where["model"]),
            out_dir=out,
            out_table=paths.model_scores(out),
            resolution=2,
            device="cpu",
            threads=threads,
        )
        return {"scored": len(table)}
    if stage == "cohort":
        return bench_scale._aggregate_and_report(work)
    message = f"unknown bench stage {stage!r}"
    raise ValueError(message)


def measure(stage: str, work: Path, *, threads: int) -> dict[str, float]:
    """Wall s, CPU s (user + system) and peak RSS (MB) of ``stage`` in a fresh process.

    ``os.wait4`` reports the child's usage together with the children it waited
    for (the stages fork their work), as the rule's process would use it.
    """
    command = [sys.executable, "-m", "mriaudit.bench", "--stage", stage, "--work", str(work)]
    command += ["--threads", str(threads)]
    env = {**os.environ, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
    return bench_scale.run_measured(command, env=env)[1]


def _median(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: round(statistics.median(r[key] for r in runs), 3) for key in runs[0]}


def _bench_input(work: Path, shared_data: Path | None) -> str:
    """Put the bench subject's DICOM series in place; returns what it is."""
    folder = _work_paths(work)["folder"]
    folder.parent.mkdir(parents=True, exist_ok=True)
    if shared_data is not None and (shared_data / "unpack.sh").is_file():
        unpacked = work / "shared"
        subprocess.run(
            ["bash", str(shared_data / "unpack.sh"), str(unpacked)], check=True, capture_output=True
        )
        shutil.copytree(unpacked / SHARED_MPRAGE, folder)
        return f"real: ../shared/data/{SHARED_MPRAGE} (Siemens MPRAGE, 1 mm, 192x256x256)"
    generated = work / "generated"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mriaudit.demo",
            str(generated),
            "--subjects",
            str(MIN_DEMO_SUBJECTS),
            "--seed",
            "1",
            "--voxel-size",
            "1",
            "--labels",
            str(work / "labels.tsv"),
        ],
        check=True,
        capture_output=True,
    )
    labels = [line.split("\t") for line in (work / "labels.tsv").read_text().splitlines()[1:]]
    normal = next(row[0] for row in labels if row[2] == "normal")
    shutil.copytree(generated / normal, folder)
    return f"generated: demo subject {normal} at 1 mm (no ../shared/data)"


def inventory_ms_per_file(work: Path, *, runs: int) -> float:
    """Milliseconds per DICOM file of the inventory alone (imports excluded), best of ``runs``.

    Run in this process on the bench subject's folder, with warm file caches: the
    cost of reading headers and auditing the series, not of starting Python.
    """
    from mriaudit import dicom

    where = _work_paths(work)
    folder = where["folder"]
    n_files = sum(1 for path in folder.rglob("*") if path.is_file())
    scratch = work / "inventory-timing"
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        dicom.inventory_subject(
            folder,
            series_table=scratch / "series.tsv",
            record_path=scratch / "inventory.json",
            rules={},
        )
        best = min(best, time.perf_counter() - start)
    return round(1000.0 * best / max(n_files, 1), 3)


def _stage_figures(out: Path, bids_id: str, stage: str) -> dict[str, float]:
    """Wall s, CPU s and peak RSS (MB) of one stage, from its status record."""
    record = records.read_record(paths.record(out, bids_id, stage))
    if record["status"] != records.OK:
        print(f"warning: {stage} of the bench subject: {record['status']} ({record['reason']})")
    return {
        "wall_s": record["elapsed_s"],
        "cpu_s": record.get("cpu_s", math.nan),
        "peak_rss_mb": record.get("peak_rss_mb", math.nan),
    }


def per_subject(work: Path, *, runs: int, threads: int, shared_data: Path | None) -> dict:
    """The ``preprocess`` job of the bench subject and its share of a ``score`` job.

    Each stage's wall time, CPU time and peak memory come from its status
    record (its forked process); ``jobs`` hold the two jobs as processes
    (start-up and imports included). The score share is the per-subject time
    inside a job that scores ``SCORE_COPIES`` subjects; the total is the
    preprocess job plus that share.
    """
    source = _bench_input(work, shared_data)
    out = _work_paths(work)["out"]
    stage_runs: dict[str, list[dict[str, float]]] = {s: [] for s in SUBJECT_STAGES}
    jobs: dict[str, list[dict[str, float]]] = {"preprocess": [], "score": []}
    for _ in range(runs):
        jobs["preprocess"].append(measure("preprocess", work, threads=threads))
        for stage in paths.PREPROCESS_STAGES:
            stage_runs[stage].append(_stage_figures(out, SUBJECT, stage))
    setup = {"train_model": measure("train_model", work, threads=threads)}
    _score_cohort_inputs(work)
    for _ in range(runs):
        jobs["score"].append(measure("score", work, threads=1))
        copies = [_stage_figures(out, bids_id, "score") for bids_id in _copies()]
        stage_runs["score"].append(_median(copies))
    stages = {stage: _median(figures) for stage, figures in stage_runs.items()}
    job_figures = {name: _median(figures) for name, figures in jobs.items()}
    preprocess_job, score_share = job_figures["preprocess"], stages["score"]
    return {
        "input": source,
        "runs": runs,
        "threads": threads,
        "stages": stages,
        "jobs": job_figures,
        "score_copies": SCORE_COPIES,
        "total_wall_s": round(preprocess_job["wall_s"] + score_share["wall_s"], 2),
        "total_cpu_s": round(preprocess_job["cpu_s"] + score_share["cpu_s"], 2),
        "peak_rss_mb": max(preprocess_job["peak_rss_mb"], job_figures["score"]["peak_rss_mb"]),
        "inventory_ms_per_file": inventory_ms_per_file(work, runs=runs),
        "setup": setup,
    }


# ------------------------------------------------------------------------------ scale


def scale(work: Path, *, sizes: list[int]) -> dict[str, Any]:
    """Per cohort size ``n`` of ``sizes``: the SLURM plan (``bench_scale.slurm_plan``) and
    aggregate + report of ``n`` synthetic subjects measured in a fresh process, as flat
    keys ending in ``n`` (``dry_run_<n>_s``, ``aggregate_report_<n>_s``, ...).

    Raises ``RuntimeError`` when a plan makes more SLURM submissions than
    ``bench_scale.MAX_SLURM_JOBS`` per 100,000 subjects (checked from 1,000 subjects on).
    """
    result: dict[str, Any] = {"subjects": list(sizes)}
    for n in sizes:
        plan = bench_scale.slurm_plan(work / f"dry-{n}", subjects=n)
        allowed = max(1, round(bench_scale.MAX_SLURM_JOBS * n / 100_000))
        if n >= 1000 and plan["slurm_jobs"] > allowed:
            message = (
                f"the SLURM plan of {n} subjects makes {plan['slurm_jobs']} submissions, "
                f"more than {allowed}: {plan['slurm_jobs_by_kind']}"
            )
            raise RuntimeError(message)
        synthetic_cohort(work / f"cohort-{n}", n)
        cohort = measure("cohort", work / f"cohort-{n}", threads=1)
        report = paths.report(work / f"cohort-{n}" / "out")
        result |= {
            f"dry_run_{n}_s": plan["dry_run_s"],
            f"dry_run_{n}_peak_rss_mb": plan["dry_run_peak_rss_mb"],
            f"slurm_jobs_{n}": plan["slurm_jobs"],
            f"slurm_jobs_{n}_by_kind": plan["slurm_jobs_by_kind"],
            f"aggregate_report_{n}_s": cohort["wall_s"],
            f"aggregate_report_{n}_peak_rss_mb": cohort["peak_rss_mb"],
            f"report_{n}_mb": round(report.stat().st_size / 1e6, 2),
        }
        # Each size's files go before the next is made: 100,000 subjects' records are many.
        shutil.rmtree(work / f"dry-{n}", ignore_errors=True)
        shutil.rmtree(work / f"cohort-{n}", ignore_errors=True)
    return result


# ------------------------------------------------------------------------------ output


def machine() -> dict[str, Any]:
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    gpu = None
    try:
        import torch

        if torch.cuda.is_available():
            gpu = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return {"cores": os.cpu_count(), "cpu": model, "gpu": gpu, "python": platform.python_version()}


def table(result: dict[str, Any]) -> str:
    """The figures as a plain text table."""
    lines = [f"machine: {result['machine']['cores']} cores, {result['machine']['cpu']}, "
             f"GPU {result['machine']['gpu'] or 'none'}"]  # fmt: skip
    subject = result.get("per_subject")
    if subject:
        lines += [f"per subject: {subject['input']}; median of {subject['runs']} runs, "
                  f"{subject['threads']} thread(s) per stage", "",
                  f"{'stage':<26}{'wall s':>9}{'CPU s':>9}{'peak RSS MB':>13}"]  # fmt: skip

        def row(name: str, figures: dict[str, float]) -> str:
            return (
                f"{name:<26}{figures['wall_s']:>9.2f}{figures['cpu_s']:>9.2f}"
                f"{figures['peak_rss_mb']:>13.0f}"
            )

        for stage, figures in subject["stages"].items():
            lines.append(row(f"  {stage}", figures))
        lines.append(row("preprocess job", subject["jobs"]["preprocess"]))
        lines.append(
            row(f"score job ({subject['score_copies']} subjects)", subject["jobs"]["score"])
        )
        lines.append(
            f"{'total (preprocess + score)':<26}{subject['total_wall_s']:>9.2f}"
            f"{subject['total_cpu_s']:>9.2f}{subject['peak_rss_mb']:>13.0f}"
        )
        lines.append(
            f"inventory alone: {subject['inventory_ms_per_file']:.2f} ms per DICOM file "
            "(imports excluded)"
        )
        for stage, figures in subject["setup"].items():
            lines.append(f"(setup) {stage}: {figures['wall_s']:.1f} s on 3 copies, 2 epochs")
    scaled = result.get("scale")
    for n in scaled["subjects"] if scaled else []:
        kinds = ", ".join(f"{v} {k}" for k, v in scaled[f"slurm_jobs_{n}_by_kind"].items())
        lines += ["", f"scale ({n} subjects):",
                  f"  dry run (snakemake -n, SLURM profile) {scaled[f'dry_run_{n}_s']:>8.1f} s, "
                  f"peak RSS {scaled[f'dry_run_{n}_peak_rss_mb']:.0f} MB",
                  f"  SLURM submissions of the plan     {scaled[f'slurm_jobs_{n}']:>8d} ({kinds})",
                  f"  aggregate + report                {scaled[f'aggregate_report_{n}_s']:>8.1f} s, "
                  f"peak RSS {scaled[f'aggregate_report_{n}_peak_rss_mb']:.0f} MB, "
                  f"report {scaled[f'report_{n}_mb']:.1f} MB"]  # fmt: skip
    from mriaudit.bench_model import DEMO_EPOCHS, DEMO_FOLDS  # torch: only where it is used

    for device, figures in (result.get("model") or {}).items():
        if figures is None:
            lines += ["", f"model on {device}: NOT MEASURED, {result['model_unavailable'][device]}"]
            continue
        scoring, epoch = figures["scoring"], figures["training_epoch"]
        lines += ["", f"model on {device} ({scoring['threads']} thread(s)):",
                  f"  scoring   {scoring['subjects_per_s']:>8.2f} subjects/s ({scoring['subjects']} "
                  f"subjects, {scoring['folds']} fold models, {scoring['resolution']} mm grid; "
                  f"{scoring['s_per_subject']:.3f} s per subject)",
                  f"  training  {epoch['epoch_s']:>8.2f} s per epoch ({epoch['subjects']} subjects, "
                  f"{epoch['slices_per_s']:.0f} slices/s, {epoch['precision']}); demo cohort's {DEMO_FOLDS} models x "
                  f"{DEMO_EPOCHS} epochs about {figures['demo_training_estimate_s']:.0f} s"]  # fmt: skip
    budget = result.get("report_budget")
    if budget:
        timings = budget["browser"]
        seen = (
            f"load {timings['load_s']:.2f} s, first paint {timings['first_paint_s']:.2f} s"
            if timings
            else "no Chromium here: load time not measured"
        )
        lines += ["", f"report of {budget['subjects']} subjects, every picture inline "
                  "(budget 25 MB, first paint 3 s):",
                  f"  {budget['report_mb']:.1f} MB, built in {budget['build_s']:.1f} s; {seen}"]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mriaudit.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--out", type=Path, default=Path("results/bench"), help="where bench.json goes"
    )
    parser.add_argument("--runs", type=int, default=3, help="runs per stage (median)")
    parser.add_argument(
        "--threads", type=int, default=1, help="threads per stage (the rules use 1)"
    )
    parser.add_argument(
        "--subjects",
        type=int,
        nargs="+",
        default=[10_000, 100_000],
        help="cohort sizes of the scale part",
    )
    parser.add_argument(
        "--report-subjects", type=int, default=1000, help="cohort size of the report budget"
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="model figures on every device present (auto), or only on this one; "
        "cuda measures nothing else and says so when there is no GPU",
    )
    parser.add_argument("--skip-subject", action="store_true", help="no per-subject part")
    parser.add_argument("--skip-scale", action="store_true", help="no scale part")
    parser.add_argument("--skip-model", action="store_true", help="no model (device) part")
    parser.add_argument("--shared-data", type=Path, default=PROJECT.parent / "shared" / "data")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:  # one measured stage, in the child process of measure()
        run_stage(args.stage, args.work, threads=args.threads)
        return 0
    result: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    gpu_only = args.device == "cuda"
    with tempfile.TemporaryDirectory(prefix="mriaudit-bench-") as tmp:
        if not args.skip_model:
            # Imported here: torch would weigh on the measured stages' processes otherwise.
            from mriaudit import bench_model

            gpu = bench_model.cuda_device()
            devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
            present = [d for d in devices if d == "cpu" or gpu]
            threads = args.threads if args.threads > 1 else os.cpu_count() or 1
            result["model"] = bench_model.model_part(present, threads=threads)
            if "cuda" in devices and not gpu:
                result["model"]["cuda"] = None
                result["model_unavailable"] = {
                    "cuda": "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
                }
        if not args.skip_subject and not gpu_only:
            result["per_subject"] = per_subject(
                Path(tmp) / "subject",
                runs=args.runs,
                threads=args.threads,
                shared_data=args.shared_data,
            )
        if not args.skip_scale and not gpu_only:
            result["scale"] = scale(Path(tmp) / "scale", sizes=args.subjects)
            result["report_budget"] = bench_scale.report_budget(
                Path(tmp) / "report", subjects=args.report_subjects
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nwritten: {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
