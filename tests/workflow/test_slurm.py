"""SLURM: the grouped plan of profiles/slurm, and real runs against a local SLURM cluster.

The cluster tests start tools/slurm/start-local-slurm.sh (slurm-wlm 22.05, munge, slurmdbd
with a private MariaDB, one fake GPU) and need root on Debian, as on CI; elsewhere they
skip. Set MRIAUDIT_SKIP_SLURM=1 to skip them on such a machine too.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml

from mriaudit import cohort, paths

from .conftest import ROOT, SNAKEMAKE

pytestmark = pytest.mark.workflow

PROFILE = ROOT / "profiles" / "slurm"
CI_PROFILE = ROOT / "profiles" / "slurm-ci"
START = ROOT / "tools" / "slurm" / "start-local-slurm.sh"
STOP = ROOT / "tools" / "slurm" / "stop-local-slurm.sh"
# A fixed state folder: a cluster left over by an interrupted session is reused, then stopped.
CLUSTER_STATE = Path(tempfile.gettempdir()) / "mriaudit-slurm-test"
SUBJECT_RULES = ["preprocess"]
# The profiles are layered; `none` keeps an implicit profiles/default out of the test runs.
PROFILE_ARGS = [
    "--profile",
    str(PROFILE),
    "--profile",
    str(CI_PROFILE),
    "--workflow-profile",
    "none",
]
RUN_LIMIT_S = 600


def _profile(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def _run(*args: str, cwd: Path = ROOT, limit_s: int = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    """Snakemake under `timeout -k`: on overrun it gets SIGTERM, cancels its SLURM jobs and unlocks."""
    return subprocess.run(
        ["timeout", "-k", "30", str(limit_s), str(SNAKEMAKE), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def _submissions(dry_run_output: str, *, local_rules: set[str]) -> Counter:
    """SLURM jobs of a dry run: one per printed group job, one per ungrouped non-local job."""
    jobs: Counter = Counter()
    for line in dry_run_output.splitlines():
        group = re.search(r"Group job (\S+) \(", line)
        rule = re.match(r"(?:\[[^\]]*\] )?rule (\w+):", line)
        if group:
            jobs[f"group {group.group(1)}"] += 1
        elif rule and rule.group(1) not in local_rules:
            jobs[rule.group(1)] += 1
    return jobs


# --------------------------------------------------------------------------- without a cluster


def test_profile_sends_the_model_rules_to_the_gpu_partition():
    profile = _profile(PROFILE)
    assert profile["executor"] == "slurm"
    for rule in ["train_model", "score"]:
        resources = profile["set-resources"][rule]
        assert resources["slurm_partition"] == "gpu" and resources["gpu"] == 1, rule
        assert resources["cpus_per_gpu"] >= 1
    assert "slurm_account" not in profile["default-resources"], "accounts belong to site profiles"
    grouped = set(profile["groups"])
    assert set(SUBJECT_RULES) <= grouped
    assert profile["retries"] >= 1


def test_default_workflow_profile_does_not_override_the_slurm_profile():
    # Snakemake applies profiles/default to every run as a workflow profile, after --profile,
    # so a key set in both would silently replace the cluster setting.
    default = ROOT / "profiles" / "default"
    if not (default / "config.yaml").is_file():
        return
    local = _profile(default)
    clashes = {
        key: (value, local[key])
        for key, value in _profile(PROFILE).items()
        if key in local and local[key] != value
    }
    assert not clashes, f"profiles/default overrides profiles/slurm: {clashes}"


def test_grouped_plan_for_1000_subjects_submits_at_most_100_jobs(tmp_path):
    input_dir = tmp_path / "input"
    for index in range(1000):
        folder = input_dir / f"sub-{index:04d}"
        folder.mkdir(parents=True)
        (folder / "IM0001").write_bytes(b"placeholder")
    # Only the job headers are needed: printing the reasons of a 1,000-job plan is slow.
    result = subprocess.run(
        [str(SNAKEMAKE), "-n", "--quiet", "reason", "progress", "host",
         "--profile", str(PROFILE), "--workflow-profile", "none",
         "--config", f"input_dir={input_dir}", f"output_dir={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _submissions(result.stdout + result.stderr, local_rules={"all"})
    assert sum(jobs.values()) <= 100, jobs
    components = _profile(PROFILE)["group-components"]
    assert jobs["group subject"] == math.ceil(1000 / components["subject"]), jobs
    assert jobs["collect"] == jobs["train_model"] == jobs["score"] == jobs["group cohort"] == 1, (
        jobs
    )
    for rule in SUBJECT_RULES:
        assert rule not in jobs, f"{rule} is submitted on its own: {jobs}"


# --------------------------------------------------------------------------- real cluster


def _cluster_unavailable() -> str:
    if os.environ.get("MRIAUDIT_SKIP_SLURM") == "1":
        return "MRIAUDIT_SKIP_SLURM=1"
    if sys.platform != "linux" or os.geteuid() != 0:
        return "the local SLURM cluster needs root (it installs packages and starts daemons)"
    os_release = Path("/etc/os-release")
    if not os_release.is_file() or "ID=debian" not in os_release.read_text():
        return "the local SLURM cluster is written for Debian 12 (slurm-wlm 22.05)"
    if shutil.which("slurmctld") is None and shutil.which("apt-get") is None:
        return "slurm-wlm is not installed and apt-get is missing"
    return ""


@pytest.fixture(scope="module")
def slurm_cluster():
    """A real single-node SLURM cluster on 127.0.0.1, stopped (and purged) after the module."""
    reason = _cluster_unavailable()
    if reason:
        pytest.skip(f"no local SLURM cluster: {reason}")
    started = time.monotonic()
    result = subprocess.run(
        ["bash", str(START), str(CLUSTER_STATE)], capture_output=True, text=True, timeout=600
    )
    if result.returncode != 0:
        subprocess.run(["bash", str(STOP), str(CLUSTER_STATE)], capture_output=True, timeout=120)
        pytest.fail(
            f"start-local-slurm.sh failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    print(f"local SLURM cluster up in {time.monotonic() - started:.0f} s")
    yield CLUSTER_STATE
    stopped = subprocess.run(
        ["bash", str(STOP), str(CLUSTER_STATE), "--purge"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr


@dataclass(frozen=True)
class SlurmJob:
    job_id: str
    partition: str
    comment: str
    requested: str
    state: str
    memory: str


def _sacct(run_id: str, since: str) -> list[SlurmJob]:
    """Allocations (no steps) of one Snakemake run, which names its jobs after the run id."""
    result = subprocess.run(
        ["sacct", "-X", "-P", "-n", "--name", run_id, "-S", since,
         "-o", "JobID,Partition,Comment,ReqTRES,State,ReqMem"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [line.split("|") for line in result.stdout.splitlines() if line.strip()]
    return [SlurmJob(*row[:6]) for row in rows]


def _run_id(output: str) -> str:
    found = re.search(r"SLURM run ID: (\S+)", output)
    assert found, "the slurm executor did not report a run id:\n" + output[-3000:]
    return found.group(1)


def _jobs_when_recorded(run_id: str, since: str, *, count_at_least: int) -> list[SlurmJob]:
    # slurmdbd records a finished job's comment a moment after snakemake has seen it end.
    jobs: list[SlurmJob] = []
    for _ in range(30):
        jobs = _sacct(run_id, since)
        if len(jobs) >= count_at_least and all(job.comment for job in jobs):
            break
        time.sleep(1)
    return jobs


@dataclass(frozen=True)
class SlurmRun:
    input_dir: Path
    output_dir: Path
    result: subprocess.CompletedProcess
    jobs: list[SlurmJob]
    seconds: float


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, tmp_path_factory) -> SlurmRun:
    base = tmp_path_factory.mktemp("slurm")
    input_dir, labels, output_dir = base / "input", base / "labels.tsv", base / "out"
    subprocess.run(
        [sys.executable, "-m", "mriaudit.demo", str(input_dir), "--subjects", "6", "--seed", "3",
         "--voxel-size", "3", "--labels", str(labels)],
        check=True, capture_output=True,
    )  # fmt: skip
    configfile = base / "config.yaml"
    configfile.write_text(
        yaml.safe_dump(
            {
                "input_dir": str(input_dir),
                "output_dir": str(output_dir),
                "labels": str(labels),
                # auto: the model rules see the fake GPU, find no working CUDA and use the CPU.
                "device": "auto",
                "training": {"folds": 2, "epochs": 4},
            }
        )
    )
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    started = time.monotonic()
    result = _run(*PROFILE_ARGS, "--configfile", str(configfile),
                  "--slurm-logdir", str(base / "slurm_logs"))  # fmt: skip
    seconds = time.monotonic() - started
    print(f"SLURM workflow run: {seconds:.0f} s")
    output = result.stdout + result.stderr
    jobs = (
        _jobs_when_recorded(_run_id(output), since, count_at_least=4)
        if result.returncode == 0
        else []
    )
    return SlurmRun(input_dir, output_dir, result, jobs, seconds)


def test_slurm_run_produces_the_cohort_outputs(slurm_run):
    result = slurm_run.result
    assert result.returncode == 0, result.stderr[-5000:]
    scores = pd.read_csv(paths.scores_table(slurm_run.output_dir), sep="\t", dtype={"folder": str})
    folders = sorted(s.folder for s in cohort.list_subjects(slurm_run.input_dir))
    assert sorted(scores["folder"]) == folders
    assert set(scores["status"]) <= {"ok", "failed", "no_series"}
    html = paths.report(slurm_run.output_dir).read_text()
    assert 'id="subjects"' in html


def test_model_rules_ran_with_a_gpu_on_the_gpu_partition(slurm_run):
    assert slurm_run.result.returncode == 0, slurm_run.result.stderr[-5000:]
    model_jobs = [
        job for job in slurm_run.jobs if job.comment.startswith(("rule_train_model", "rule_score"))
    ]
    assert {job.comment.split("_wildcards")[0] for job in model_jobs} >= {"rule_train_model"}
    assert any(job.comment.startswith("rule_score") for job in model_jobs), slurm_run.jobs
    for job in model_jobs:
        assert job.partition == "gpu", job
        assert "gres/gpu=1" in job.requested, job
    for job in slurm_run.jobs:
        if job not in model_jobs:
            assert job.partition == "cpu" and "gres/gpu" not in job.requested, job


def test_per_subject_rules_ran_in_groups(slurm_run):
    assert slurm_run.result.returncode == 0, slurm_run.result.stderr[-5000:]
    bids_ids = [s.bids_id for s in cohort.list_subjects(slurm_run.input_dir)]
    instances = 0
    for rule in SUBJECT_RULES:
        ran = [
            bids_id
            for bids_id in bids_ids
            if paths.benchmark(slurm_run.output_dir, rule, bids_id).is_file()
        ]
        assert ran, f"no {rule} job ran"
        instances += len(ran)
    assert len(slurm_run.jobs) < instances, (len(slurm_run.jobs), instances)
    for job in slurm_run.jobs:
        # A per-subject rule submitted alone would carry its wildcards in the comment.
        assert "_wildcards_" not in job.comment, job
    assert all(job.state == "COMPLETED" for job in slurm_run.jobs), slurm_run.jobs


OOM_SNAKEFILE = """\
# A job that needs more memory than its first attempt asks for: SLURM kills it
# (JobAcctGatherParams=OverMemoryKill) and the retry asks for mem_per_attempt's next step.
configfile: "{root}/config.yaml"


include: "{root}/rules/common.smk"


localrules:
    all,


rule all:
    input:
        "probe.txt",


rule memory_probe:
    output:
        "probe.txt",
    log:
        "probe.log",
    resources:
        mem_mb=mem_per_attempt(600),
        runtime=5,
    shell:
        "{python} -c 'import time; block = b\\"x\\" * (700 * 2**20); time.sleep(8)' 2> {{log}} && "
        "echo mem_mb={{resources.mem_mb}} > {{output}}"
"""


def test_job_over_its_memory_is_reported_and_retried_with_more(slurm_cluster, tmp_path):
    (tmp_path / "Snakefile").write_text(OOM_SNAKEFILE.format(root=ROOT, python=sys.executable))
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    result = _run(*PROFILE_ARGS, "--directory", str(tmp_path), "--snakefile", str(tmp_path / "Snakefile"),
                  "--config", f"input_dir={tmp_path / 'none'}", f"output_dir={tmp_path}",
                  "--slurm-logdir", str(tmp_path / "slurm_logs"), limit_s=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    # The failure is reported with the SLURM log, which says why the job was killed.
    assert "Error in rule memory_probe" in output, output[-5000:]
    logs = re.findall(r"(\S*slurm_logs\S*\.log)", output)
    failed_logs = [
        Path(p) for p in logs if Path(p).is_file() and "memory limit" in Path(p).read_text()
    ]
    assert failed_logs, f"no SLURM log with the memory kill among {logs}"
    # The retry asked for twice the memory and succeeded.
    assert (tmp_path / "probe.txt").read_text().split() == ["mem_mb=1200"]
    jobs = _jobs_when_recorded(_run_id(output), since, count_at_least=2)
    assert [job.memory for job in jobs] == ["600M", "1200M"], jobs
    assert jobs[0].state in {"FAILED", "OUT_OF_MEMORY"} and jobs[1].state == "COMPLETED", jobs
