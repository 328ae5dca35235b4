"""Submissions that SLURM refuses: sbatch's own message in the run's output and in the job logs.

When ``sbatch`` refuses a submission (an unknown partition, a node configuration no node
has, a wrong account), snakemake-executor-plugin-slurm 2.6 reports it through
``Executor.report_job_error(job_info, msg)`` with sbatch's stderr in ``msg``. Snakemake 9.27
prints that text for a single job, but a job group (the preprocess groups, the cohort
steps) loses it: ``GroupJob.log_error`` drops ``msg`` and every rule of the group shows
``message: None``; and no log of any rule says anything, since no rule ran. The plugin has
no setting for this and no file receives the text, so :func:`surface_refused_submissions`
wraps the plugin's ``report_job_error`` (at run time, in the Snakefile): for a job that got
no SLURM job id, sbatch refused it, so it logs sbatch's message with a hint and writes the
same into the log of each rule of the submission (which ``show-failed-logs`` prints), then
hands over to the plugin's own report.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

#: The plugin's report of a refused sbatch call: "... The error message was '<stderr>'.\n".
_SBATCH_TEXT = re.compile(
    r"The error message was '(?P<text>.*?)'\.?\s*(?=sbatch call:|sbatch script:|\Z)", re.DOTALL
)
#: ... followed by "    sbatch call:\n        sbatch ... --wrap=\"<snakemake command>\"\n".
_SBATCH_CALL = re.compile(r"sbatch call:\s*\n\s*(?P<call>\S[^\n]*)")
_WRAP = re.compile(r'\s--wrap=".*"\s*$')
#: Set on the wrapper so that installing twice wraps once.
_MARK = "__mriaudit_surfaces_refusals__"


def sbatch_message(report: str) -> str:
    """sbatch's own error text in the plugin's report of a refused submission.

    Falls back to the report up to its ``sbatch call:`` part when the wording differs
    (another plugin version, an array submission).
    """
    found = _SBATCH_TEXT.search(report)
    if found and found.group("text").strip():
        return found.group("text").strip()
    return report.split("sbatch call:")[0].strip()


def hint(message: str, *, partition: str | None, gpus: int, cpus: int, mem_mb: int) -> str:
    """What to change in a site profile for the usual refusals ('' for the others)."""
    where = f"partition {partition}" if partition else "the cluster's default partition"
    if re.search(r"invalid partition", message, re.IGNORECASE):
        return (
            f"The partition comes from `slurm_partition: {partition}` in a profile; "
            "profiles/slurm names none (its jobs go to the cluster's default partition), so a "
            "site profile does. `sinfo -s` lists this cluster's partitions."
        )
    if re.search(r"generic resource|gres", message, re.IGNORECASE) or (
        gpus and re.search(r"node configuration is not available", message, re.IGNORECASE)
    ):
        return (
            f"The job asks for {gpus} GPU(s) in {where}, and no node there has them: name a "
            "partition with GPU nodes for train_model and score in a site profile's "
            "`set-resources` (`slurm_partition`), or set `gpu: 0` there on a cluster "
            "without GPUs."
        )
    if re.search(r"node configuration is not available", message, re.IGNORECASE):
        return (
            f"No node of {where} has the {cpus} CPU(s) and {mem_mb} MB the job asks for: "
            "lower `cores` (the most CPUs of one job) in a site profile, or name a partition "
            "with larger nodes."
        )
    if re.search(r"invalid account", message, re.IGNORECASE):
        return (
            "Set `slurm_account` in a site profile's `default-resources` "
            "(`sacctmgr show associations user=$USER` lists yours), or "
            "`slurm-no-account: true` where the site rejects -A."
        )
    return ""


def _jobs(job: Any) -> list[Any]:
    """The rule jobs of a submitted job: the members of a group, or the job itself."""
    return sorted(job.jobs, key=lambda j: j.rule.name) if job.is_group() else [job]


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def sbatch_call(report: str) -> str:
    """The sbatch command line in the plugin's report, its ``--wrap`` payload elided ('' if none)."""
    found = _SBATCH_CALL.search(report)
    if not found:
        return ""
    return _WRAP.sub(' --wrap="<the job\'s snakemake command>"', found.group("call").strip())


def refusal_text(job: Any, report: str) -> str:
    """sbatch's message for a refused submission, what was submitted, a hint and the call."""
    members = _jobs(job)
    rules = sorted({j.rule.name for j in members})
    resources = job.resources
    partition = resources.get("slurm_partition") or None
    what = (
        f"group {job.groupid} ({len(members)} job(s) of rule {', '.join(rules)})"
        if job.is_group()
        else f"rule {job.rule.name}"
    )
    message = sbatch_message(report)
    advice = hint(
        message,
        partition=partition,
        gpus=_int(resources.get("gpu")),
        cpus=_int(getattr(job, "threads", 0)),
        mem_mb=_int(resources.get("mem_mb")),
    )
    call = sbatch_call(report)
    lines = [
        f"SLURM refused the submission of {what}, attempt {getattr(job, 'attempt', 1)}, "
        f"partition {partition or '(the cluster default)'}; sbatch said:",
        *(f"    {line}" for line in message.splitlines()),
    ]
    if advice:
        lines.append(f"    {advice}")
    if call:
        lines.append(f"    sbatch call: {call}")
    return "\n".join(lines) + "\n"


def log_files(job: Any) -> list[Path]:
    """The log files of every rule of a submitted job (relative ones under the working dir)."""
    return [Path(str(log)) for member in _jobs(job) for log in member.log]


def write_logs(paths: Iterable[Path], text: str) -> list[Path]:
    """Write ``text`` into each log file (replacing what a refused attempt left); the written."""
    written = []
    for path in paths:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError:
            continue
        written.append(path)
    return written


def report_refusal(job: Any, report: str, logger: logging.Logger | Any) -> list[Path]:
    """Log sbatch's message for a refused submission and write it into its rules' logs."""
    text = refusal_text(job, report)
    written = write_logs(log_files(job), text)
    if written:
        text += f"    The same is in the log of each of its rules, e.g. {written[0]}\n"
    logger.error(text.rstrip("\n"))
    return written


def _wrap(report_job_error: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(self: Any, job_info: Any, msg: str | None = None, **kwargs: Any) -> Any:
        # No SLURM job id: sbatch did not accept the job (a job that ran and failed has one).
        if msg and getattr(job_info, "external_jobid", None) is None:
            try:
                report_refusal(job_info.job, msg, self.logger)
            except Exception as error:  # the plugin's own report must still happen
                self.logger.warning(f"mriaudit: cannot report the refused submission: {error!r}")
        return report_job_error(self, job_info, msg, **kwargs)

    setattr(wrapped, _MARK, True)
    wrapped.__wrapped__ = report_job_error  # type: ignore[attr-defined]
    wrapped.__doc__ = report_job_error.__doc__
    return wrapped


def surface_refused_submissions(executor: type | None = None) -> bool:
    """Make the SLURM executor show sbatch's message for refused submissions (see the module).

    ``executor`` defaults to snakemake-executor-plugin-slurm's ``Executor``. Returns False
    when the plugin is not installed or has no ``report_job_error``; installing twice is a
    no-op.
    """
    if executor is None:
        try:
            from snakemake_executor_plugin_slurm import Executor
        except ImportError:
            return False
        executor = Executor
    original = getattr(executor, "report_job_error", None)
    if original is None:
        return False
    if not getattr(original, _MARK, False):
        executor.report_job_error = _wrap(original)
    return True
