"""Benchmark of the cohort steps at archive scale (part of ``python -m mriaudit.bench``).

- :func:`slurm_plan`: ``snakemake -n --profile profiles/slurm`` of a cohort of
  placeholder folders: its wall time and peak memory, and the SLURM
  submissions the plan makes (job groups count once, local rules not at all),
  which must stay within :data:`MAX_SLURM_JOBS` for 100,000 subjects.
- aggregate + report of that many synthetic subjects' records, as the two
  rules run them, with the peak memory of that process (``bench.scale``).
- :func:`report_budget`: the report of a smaller cohort with every picture
  inline, and its load time in headless Chromium.

Figures are measurements of this machine, not assertions, except the plan's
job count.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from mriaudit import paths

PROJECT = Path(__file__).resolve().parents[2]
#: Most SLURM submissions a 100,000-subject plan may make (issue #20).
MAX_SLURM_JOBS = 5000
#: Rules the Snakefile runs on the submit host (``localrules``): no submission.
LOCAL_RULES = frozenset({"all", "describe_dataset"})
#: Lines of a dry run that start a submission: a job group, or a rule outside one.
_PLAN_LINE = re.compile(r"^(?:\[[^\]]*\] )?(?:Group job (?P<group>\S+)|rule (?P<rule>\w+):)")


def placeholder_cohort(input_dir: Path, n: int) -> Path:
    """``n`` subject folders of one placeholder file each (what a dry run lists)."""
    for i in range(n):
        folder = input_dir / f"sub-{i:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "IM0001").write_bytes(b"placeholder")
    return input_dir


def run_measured(
    command: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[str, dict[str, float]]:
    """stdout + stderr of ``command``, and its ``wall_s``, ``cpu_s`` (user + system) and
    ``peak_rss_mb``. ``os.wait4`` reports the child's usage together with the children
    it waited for. A non-zero exit raises ``RuntimeError`` with the output's end."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        message = f"{' '.join(command[:4])} ... exited with {process.returncode}:\n{output[-2000:]}"
        raise RuntimeError(message)
    return output, {
        "wall_s": round(wall, 3),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
    }


def plan_submissions(dry_run_output: str) -> Counter:
    """SLURM submissions of a dry run's plan, by job group or rule name.

    A job group is one submission whatever it holds; a rule outside a group is
    one per job; local rules are none. Indented ``rule`` lines are members of
    the group above them.
    """
    counts: Counter = Counter()
    for line in dry_run_output.splitlines():
        match = _PLAN_LINE.match(line)
        if not match:
            continue
        if match["group"]:
            counts[f"group {match['group']}"] += 1
        elif match["rule"] not in LOCAL_RULES:
            counts[match["rule"]] += 1
    return counts


def slurm_plan(work: Path, *, subjects: int, profile: str = "profiles/slurm") -> dict[str, Any]:
    """The SLURM plan of ``subjects`` placeholder folders: dry-run time, memory, submissions."""
    input_dir = placeholder_cohort(work / "input", subjects)
    # Only the job headers: printing every job's reasons costs more than planning it.
    command = [str(Path(sys.executable).with_name("snakemake")), "-n", "--profile", profile]
    command += ["--quiet", "reason", "progress", "host", "--workflow-profile", "none"]
    command += ["all", "--config", f"input_dir={input_dir}", f"output_dir={work / 'out'}"]
    output, cost = run_measured(command, cwd=PROJECT)
    counts = plan_submissions(output)
    return {
        "subjects": subjects,
        "dry_run_s": round(cost["wall_s"], 1),
        "dry_run_peak_rss_mb": round(cost["peak_rss_mb"]),
        "slurm_jobs": sum(counts.values()),
        "slurm_jobs_by_kind": dict(sorted(counts.items())),
    }


def _aggregate_and_report(work: Path) -> dict[str, Any]:
    """Aggregate and report of the synthetic cohort in ``work`` (as the two rules do)."""
    from mriaudit.aggregate import aggregate_cohort
    from mriaudit.report import build_report

    input_dir, out = work / "input", work / "out"
    aggregate_cohort(
        input_dir,
        out,
        labels_path=str(work / "labels.tsv"),
        flag={},
        out_scores=paths.scores_table(out),
        out_exclusions=paths.exclusions_table(out),
        out_subjects=paths.cohort_table(out),
        resolution=2,
    )
    build_report(
        out,
        scores_tsv=paths.scores_table(out),
        exclusions_tsv=paths.exclusions_table(out),
        metrics_json=None,
        config={"flag": {}, "input_dir": str(input_dir)},
        out_html=paths.report(out),
    )
    return {"report_mb": round(paths.report(out).stat().st_size / 1e6, 2)}


def report_budget(work: Path, *, subjects: int = 1000) -> dict[str, Any]:
    """The report of a ``subjects``-strong synthetic cohort, every subject with its two
    pictures inline: page size, build time, and load and first paint in headless
    Chromium (None where it is not installed). Budget: 25 MB, first paint 3 s."""
    from mriaudit.demo.records import synthetic_report
    from mriaudit.report.chromium import page_timings

    built = synthetic_report(work / "cohort", subjects, report={"max_subjects_inline": subjects})
    timings = page_timings(built["page"], work / "chromium-profile")
    return {
        "subjects": subjects,
        "report_mb": round(built["page"].stat().st_size / 1e6, 2),
        "build_s": round(built["build_s"], 2),
        "browser": timings,
    }
