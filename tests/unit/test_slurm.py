"""mriaudit.slurm: sbatch's message for a refused submission, in the output and the rules' logs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from mriaudit import slurm

# The report of snakemake-executor-plugin-slurm 2.6.1 when sbatch refuses a group job
# (seen on the local cluster of tools/slurm with a site profile naming partition `nope`).
REFUSED = (
    "SLURM sbatch failed. The error message was 'sbatch: error: invalid partition specified: nope\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified'.\n"
    "    sbatch call:\n"
    "        sbatch --parsable --job-name mriaudit_1 --output /out/slurm_logs/group_subject/%j.log "
    "--export=ALL --comment rule_subject_preprocess   -p nope -t 40 --mem 2500 --ntasks=1 "
    "--cpus-per-task=2 -D /work "
    "--wrap=\"/venv/bin/python -m snakemake --snakefile '/work/Snakefile' --target-jobs "
    "'preprocess:bids_id=sub-001' --mode 'remote'\"\n"
)
NO_GPU_NODE = REFUSED.replace(
    "sbatch: error: invalid partition specified: nope\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified",
    "sbatch: error: Batch job submission failed: Requested node configuration is not available",
)


def _rule_job(tmp_path: Path, name: str, log: str, **resources) -> SimpleNamespace:
    return SimpleNamespace(
        rule=SimpleNamespace(name=name),
        log=[str(tmp_path / log)],
        resources=resources,
        attempt=1,
        threads=1,
        is_group=lambda: False,
    )


def _group(tmp_path: Path, *subjects: str, **resources) -> SimpleNamespace:
    members = [_rule_job(tmp_path, "preprocess", f"logs/preprocess/{s}/{s}.log") for s in subjects]
    return SimpleNamespace(
        jobs=members,
        groupid="subject",
        resources=resources,
        attempt=2,
        threads=2,
        is_group=lambda: True,
    )


class _Logger:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.warnings: list[str] = []

    def error(self, text: str) -> None:
        self.errors.append(text)

    def warning(self, text: str) -> None:
        self.warnings.append(text)


class _Executor:
    """The part of the plugin's Executor that the wrapper touches."""

    def __init__(self) -> None:
        self.logger = _Logger()
        self.reported: list[tuple] = []

    def report_job_error(self, job_info, msg=None, **kwargs):
        self.reported.append((job_info, msg, kwargs))


@pytest.fixture
def executor_class(monkeypatch):
    monkeypatch.setattr(_Executor, "report_job_error", _Executor.report_job_error)
    assert slurm.surface_refused_submissions(_Executor)
    return _Executor


def test_sbatch_message_is_sbatchs_own_text():
    assert slurm.sbatch_message(REFUSED) == (
        "sbatch: error: invalid partition specified: nope\n"
        "sbatch: error: Batch job submission failed: Invalid partition name specified"
    )
    # Another wording (an array submission's exception): the report up to the call.
    assert slurm.sbatch_message("Array job submission failed with exception: boom") == (
        "Array job submission failed with exception: boom"
    )


def test_sbatch_call_keeps_the_request_and_elides_the_jobs_command():
    call = slurm.sbatch_call(REFUSED)
    assert call.startswith("sbatch --parsable --job-name mriaudit_1")
    assert "-p nope -t 40 --mem 2500" in call and "--cpus-per-task=2" in call
    assert call.endswith('--wrap="<the job\'s snakemake command>"')
    assert slurm.sbatch_call("no call here") == ""


@pytest.mark.parametrize(
    ("message", "gpus", "expected"),
    [
        ("sbatch: error: invalid partition specified: nope", 0, "sinfo -s"),
        ("Batch job submission failed: Requested node configuration is not available", 1, "GPU"),
        ("Batch job submission failed: Invalid generic resource (gres) specification", 1, "GPU"),
        ("Batch job submission failed: Requested node configuration is not available", 0, "cores"),
        ("Batch job submission failed: Invalid account or account/partition", 0, "slurm_account"),
        ("Batch job submission failed: Job violates accounting/QOS policy", 0, ""),
    ],
)
def test_hint_names_the_profile_setting_to_change(message, gpus, expected):
    advice = slurm.hint(message, partition="nope", gpus=gpus, cpus=8, mem_mb=2000)
    assert (expected in advice) if expected else advice == ""


def test_refused_group_writes_sbatchs_message_into_every_rule_log(executor_class, tmp_path):
    executor = executor_class()
    group = _group(tmp_path, "sub-001", "sub-002", slurm_partition="nope")
    job_info = SimpleNamespace(job=group, external_jobid=None)
    executor.report_job_error(job_info, REFUSED)
    # The plugin's own report still happens, with the same arguments.
    assert executor.reported == [(job_info, REFUSED, {})]
    [output] = executor.logger.errors
    assert output.startswith(
        "SLURM refused the submission of group subject (2 job(s) of rule preprocess), "
        "attempt 2, partition nope; sbatch said:\n"
        "    sbatch: error: invalid partition specified: nope\n"
        "    sbatch: error: Batch job submission failed: Invalid partition name specified\n"
    )
    assert "sinfo -s" in output and "-p nope" in output and "e.g. " in output
    for subject in ["sub-001", "sub-002"]:
        log = tmp_path / "logs" / "preprocess" / subject / f"{subject}.log"
        text = log.read_text()
        assert "sbatch: error: invalid partition specified: nope" in text
        assert "--wrap=" in text and "--target-jobs" not in text


def test_a_retry_replaces_the_refusal_in_the_log(executor_class, tmp_path):
    executor = executor_class()
    job = _rule_job(tmp_path, "train_model", "logs/train_model.log", gpu=1, mem_mb=8000)
    for attempt in [1, 2]:
        job.attempt = attempt
        executor.report_job_error(SimpleNamespace(job=job, external_jobid=None), msg=NO_GPU_NODE)
    text = (tmp_path / "logs" / "train_model.log").read_text()
    assert text.count("SLURM refused") == 1 and "attempt 2" in text
    assert "Requested node configuration is not available" in text
    assert "partition (the cluster default)" in text and "set-resources" in text


def test_a_job_that_slurm_ran_is_left_to_the_plugin(executor_class, tmp_path):
    executor = executor_class()
    job = _rule_job(tmp_path, "score", "logs/score.log")
    job_info = SimpleNamespace(job=job, external_jobid="42")
    executor.report_job_error(job_info, msg="SLURM-job '42' failed", aux_logs=["42.log"])
    assert executor.reported == [(job_info, "SLURM-job '42' failed", {"aux_logs": ["42.log"]})]
    assert executor.logger.errors == [] and not (tmp_path / "logs").exists()


def test_a_failing_report_never_hides_the_plugins_own(executor_class):
    executor = executor_class()
    job_info = SimpleNamespace(job=object(), external_jobid=None)
    executor.report_job_error(job_info, REFUSED)
    assert executor.reported == [(job_info, REFUSED, {})]
    assert executor.logger.warnings and not executor.logger.errors


def test_installing_twice_wraps_once(executor_class):
    wrapped = executor_class.report_job_error
    assert slurm.surface_refused_submissions(executor_class)
    assert executor_class.report_job_error is wrapped


def test_the_installed_plugin_is_wrapped(monkeypatch):
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    report = plugin.Executor.report_job_error
    original = getattr(report, "__wrapped__", report)
    monkeypatch.setattr(plugin.Executor, "report_job_error", original)
    assert slurm.surface_refused_submissions()
    assert plugin.Executor.report_job_error.__wrapped__ is original
    assert not slurm.surface_refused_submissions(type("NoReport", (), {}))
