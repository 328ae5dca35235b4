"""SLURM: the grouped plan of profiles/slurm, and real runs against a local SLURM cluster.

The cluster tests start tools/slurm/start-local-slurm.sh (slurm-wlm 22.05, munge, slurmdbd
with a private MariaDB, one fake GPU, partitions debug (the default) and gpu) and need root
on Debian, as on CI; elsewhere they skip. Set MRIAUDIT_SKIP_SLURM=1 to skip them on such a
machine too.

The demo cohort runs to its report with profiles/slurm alone (no site profile: every job
goes to the default partition); the model rules then run again with the site profile
profiles/slurm-ci, which sends them to partition gpu; and a site profile naming a partition
the cluster lacks fails with sbatch's own message.
"""

from __future__ import annotations

import json
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
from mriaudit.bench_scale import plan_submissions

from .conftest import ROOT, SNAKEMAKE

pytestmark = pytest.mark.workflow

PROFILE = ROOT / "profiles" / "slurm"
CI_PROFILE = ROOT / "profiles" / "slurm-ci"
START = ROOT / "tools" / "slurm" / "start-local-slurm.sh"
STOP = ROOT / "tools" / "slurm" / "stop-local-slurm.sh"
# A fixed state folder: a cluster left over by an interrupted session is reused, then stopped.
CLUSTER_STATE = Path(tempfile.gettempdir()) / "mriaudit-slurm-test"
SUBJECT_RULES = ["preprocess"]
MODEL_RULES = ("train_model", "score", "train_contrast_model", "score_contrast")
# The partitions of start-local-slurm.sh: jobs without -p go to the first.
DEFAULT_PARTITION, GPU_PARTITION = "debug", "gpu"
SUBJECTS_PER_SCORE_JOB = 2
RUN_LIMIT_S = 600


def _profile(path: Path) -> dict:
    return yaml.safe_load((path / "config.yaml").read_text())


def _flags(settings: dict) -> list[str]:
    """Profile entries as the command-line options they stand for."""
    flags: list[str] = []
    for key, value in settings.items():
        if value is True:
            flags.append(f"--{key}")
        elif isinstance(value, int | float | str) and not isinstance(value, bool):
            flags += [f"--{key}", str(value)]
        else:
            raise ValueError(f"no command-line form for {key}: {value!r}")
    return flags


# profiles/slurm with no site profile: only the test node's size (`cores`) and the fast
# polling of profiles/slurm-ci, on the command line; no partition anywhere.
PLAIN_ARGS = [
    "--profile",
    str(PROFILE),
    *_flags({k: v for k, v in _profile(CI_PROFILE).items() if k != "set-resources"}),
    "--workflow-profile",
    "none",
]
# The site profile layered on top; `none` keeps an implicit profiles/default out of the runs.
PROFILE_ARGS = [
    "--profile",
    str(PROFILE),
    "--profile",
    str(CI_PROFILE),
    "--workflow-profile",
    "none",
]


def _run(*args: str, cwd: Path = ROOT, limit_s: int = RUN_LIMIT_S) -> subprocess.CompletedProcess:
    """Snakemake under `timeout -k`: on overrun it gets SIGTERM, cancels its SLURM jobs and unlocks."""
    return subprocess.run(
        ["timeout", "-k", "30", str(limit_s), str(SNAKEMAKE), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


# --------------------------------------------------------------------------- without a cluster


def test_profile_names_no_partition_and_asks_a_gpu_for_the_model_rules():
    profile = _profile(PROFILE)
    assert profile["executor"] == "slurm"
    for rule in MODEL_RULES:
        assert profile["set-resources"][rule]["gpu"] == 1, rule
    # Their CPUs (--cpus-per-task, one task per GPU) are their threads, capped by `cores`.
    for rule in ("train_model", "train_contrast_model"):
        assert 1 <= profile["set-threads"][rule] <= profile["cores"], rule
    # Partitions and accounts belong to site profiles: the jobs go to the default partition.
    for resources in [profile["default-resources"], *profile["set-resources"].values()]:
        assert not {"slurm_partition", "slurm_account", "cpus_per_gpu"} & set(resources)
    # The test cluster's site profile names the GPU partition for the model rules only.
    site = _profile(CI_PROFILE)
    assert "default-resources" not in site
    assert set(site["set-resources"]) == set(MODEL_RULES)
    for rule in MODEL_RULES:
        assert site["set-resources"][rule] == {"slurm_partition": GPU_PARTITION, "gpu": 1}, rule
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
    jobs = plan_submissions(result.stdout + result.stderr)
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
    configfile: Path
    result: subprocess.CompletedProcess
    jobs: list[SlurmJob]
    seconds: float


@pytest.fixture(scope="module")
def demo_cohort(tmp_path_factory) -> tuple[Path, Path]:
    """Six demo subjects on a 3 mm grid and their labels."""
    base = tmp_path_factory.mktemp("slurm-cohort")
    input_dir, labels = base / "input", base / "labels.tsv"
    subprocess.run(
        [sys.executable, "-m", "mriaudit.demo", str(input_dir), "--subjects", "6", "--seed", "3",
         "--voxel-size", "3", "--labels", str(labels)],
        check=True, capture_output=True,
    )  # fmt: skip
    return input_dir, labels


def _configfile(base: Path, input_dir: Path, labels: Path) -> Path:
    configfile = base / "config.yaml"
    configfile.write_text(
        yaml.safe_dump(
            {
                "input_dir": str(input_dir),
                "output_dir": str(base / "out"),
                "labels": str(labels),
                # auto: the model rules see the fake GPU, find no working CUDA and use the CPU.
                "device": "auto",
                "training": {"folds": 2, "epochs": 4},
                # Sharded scoring: ceil(n / 2) score jobs side by side.
                "score": {"subjects_per_job": SUBJECTS_PER_SCORE_JOB},
            }
        )
    )
    return configfile


def _shards(input_dir: Path) -> int:
    """Score jobs of the demo cohort's run (its processed subjects in slices)."""
    subjects = cohort.processed_ids(cohort.list_subjects(input_dir))
    return len(cohort.score_shards(subjects, subjects_per_job=SUBJECTS_PER_SCORE_JOB))


def _slurm_run(
    args: list[str], configfile: Path, *extra: str, count_at_least: int, label: str
) -> SlurmRun:
    config = yaml.safe_load(configfile.read_text())
    since = time.strftime("%Y-%m-%dT%H:%M:%S")
    started = time.monotonic()
    result = _run(*args, "--configfile", str(configfile),
                  "--slurm-logdir", str(configfile.parent / "slurm_logs"), *extra)  # fmt: skip
    seconds = time.monotonic() - started
    print(f"SLURM workflow run, {label}: {seconds:.0f} s")
    output = result.stdout + result.stderr
    jobs = (
        _jobs_when_recorded(_run_id(output), since, count_at_least=count_at_least)
        if result.returncode == 0
        else []
    )
    return SlurmRun(
        Path(config["input_dir"]), Path(config["output_dir"]), configfile, result, jobs, seconds
    )


@pytest.fixture(scope="module")
def slurm_run(slurm_cluster, demo_cohort, tmp_path_factory) -> SlurmRun:
    """The whole demo cohort with profiles/slurm and no site profile."""
    configfile = _configfile(tmp_path_factory.mktemp("slurm"), *demo_cohort)
    # One preprocess group, collect, train_model, the score shards and the cohort group;
    # per contrast beside the T1w (T2w, FLAIR) its training job and its score shards.
    jobs = 4 + _shards(demo_cohort[0]) + 2 * (1 + _shards(demo_cohort[0]))
    return _slurm_run(PLAIN_ARGS, configfile, count_at_least=jobs, label="profiles/slurm alone")


@pytest.fixture(scope="module")
def site_run(slurm_run) -> SlurmRun:
    """score again, with the site profile profiles/slurm-ci (the score jobs only: training
    takes a minute)."""
    assert slurm_run.result.returncode == 0, slurm_run.result.stderr[-5000:]
    return _slurm_run(PROFILE_ARGS, slurm_run.configfile, "--forcerun", "score", "--until", "score",
                      count_at_least=_shards(slurm_run.input_dir),
                      label="with profiles/slurm-ci, score forced")  # fmt: skip


def _rule(job: SlurmJob) -> str:
    """``rule_<name>`` of a job's comment (the plugin appends ``_wildcards_...``)."""
    return job.comment.split("_wildcards")[0]


def _is_model_job(job: SlurmJob) -> bool:
    return _rule(job) in {f"rule_{rule}" for rule in MODEL_RULES}


def _assert_model_jobs(
    jobs: list[SlurmJob], *, partition: str, rules: tuple[str, ...] = MODEL_RULES
) -> None:
    """``rules`` ran with one GPU in ``partition``; every other job in the default partition."""
    model_jobs = [job for job in jobs if _is_model_job(job)]
    assert {_rule(job) for job in model_jobs} >= {f"rule_{rule}" for rule in rules}, jobs
    for job in model_jobs:
        assert job.partition == partition, job
        assert "gres/gpu=1" in job.requested, job
    for job in jobs:
        if job not in model_jobs:
            assert job.partition == DEFAULT_PARTITION and "gres/gpu" not in job.requested, job


def test_slurm_run_produces_the_cohort_outputs(slurm_run):
    result = slurm_run.result
    assert result.returncode == 0, result.stderr[-5000:]
    scores = pd.read_csv(paths.scores_table(slurm_run.output_dir), sep="\t", dtype={"folder": str})
    folders = sorted(s.folder for s in cohort.list_subjects(slurm_run.input_dir))
    assert sorted(scores["folder"]) == folders
    assert set(scores["status"]) <= {"ok", "failed", "no_series"}
    html = paths.report(slurm_run.output_dir).read_text()
    assert 'id="subjects"' in html


def test_without_a_site_profile_every_job_goes_to_the_default_partition(slurm_run):
    assert slurm_run.result.returncode == 0, slurm_run.result.stderr[-5000:]
    assert PLAIN_ARGS.count("--profile") == 1 and "slurm_partition" not in str(PLAIN_ARGS)
    _assert_model_jobs(slurm_run.jobs, partition=DEFAULT_PARTITION)


def test_site_profile_sends_the_model_rules_to_its_gpu_partition(site_run):
    assert site_run.result.returncode == 0, site_run.result.stderr[-5000:]
    # test_profile_names_no_partition_... checks that it names the same for train_model.
    _assert_model_jobs(site_run.jobs, partition=GPU_PARTITION, rules=("score",))
    assert len(site_run.jobs) == _shards(site_run.input_dir), site_run.jobs


def test_sharded_score_jobs_give_the_unsharded_runs_tables_and_report(slurm_run, tmp_path):
    """The SLURM run scored its cohort in shards; the same outputs scored by one local score
    job give identical tables and the same report."""
    assert slurm_run.result.returncode == 0, slurm_run.result.stderr[-5000:]
    shards = _shards(slurm_run.input_dir)
    assert shards >= 2
    score_jobs = [job for job in slurm_run.jobs if _rule(job) == "rule_score"]
    assert len(score_jobs) == shards, slurm_run.jobs
    unsharded = tmp_path / "out"
    # Preprocessing and the model are reused (modification times kept); the score, merge
    # and cohort rules run again with one score job (forced: the copy has no Snakemake
    # metadata, so the changed list of shards alone would not rerun them).
    shutil.copytree(slurm_run.output_dir, unsharded)
    shutil.rmtree(paths.score_shard(unsharded, "0").parent)
    config = yaml.safe_load(slurm_run.configfile.read_text())
    config |= {"output_dir": str(unsharded), "score": {"subjects_per_job": 1000}}
    configfile = tmp_path / "config.yaml"
    configfile.write_text(yaml.safe_dump(config))
    result = _run("--cores", "2", "--configfile", str(configfile), "--workflow-profile", "none",
                  "--forcerun", "score")  # fmt: skip
    assert result.returncode == 0, result.stderr[-5000:]
    output = result.stdout + result.stderr
    ran = Counter(re.findall(r"^(?:\[[^\]]*\] )?(?:local)?rule (\w+):", output, re.M))
    assert ran["score"] == 1 and "train_model" not in ran and "preprocess" not in ran, output[
        -3000:
    ]
    for table in (paths.scores_table, paths.exclusions_table, paths.model_scores):
        before = pd.read_csv(table(slurm_run.output_dir), sep="\t", dtype=str)
        after = pd.read_csv(table(unsharded), sep="\t", dtype=str)
        pd.testing.assert_frame_equal(before.drop(columns="elapsed_s", errors="ignore"),
                                      after.drop(columns="elapsed_s", errors="ignore"))  # fmt: skip
    assert json.loads(paths.metrics(unsharded).read_text()) == json.loads(
        paths.metrics(slurm_run.output_dir).read_text()
    )

    def report(out: Path) -> str:
        """The page less what differs by design: its folder, its time, the shard size."""
        text = paths.report(out).read_text().replace(str(out), "OUT")
        text = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", "TIME", text)
        return re.sub(r"(&#34;subjects_per_job&#34;: )\d+", r"\1N", text)

    assert report(unsharded) == report(slurm_run.output_dir)


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
    subject_jobs = [job for job in slurm_run.jobs if not _is_model_job(job)]
    assert len(subject_jobs) < instances, (len(slurm_run.jobs), instances)
    for job in subject_jobs:
        # A per-subject rule submitted alone would carry its wildcards in the comment (a
        # score job carries its shard's, a contrast's model job its contrast).
        assert "_wildcards_" not in job.comment, job
    assert all(job.state == "COMPLETED" for job in slurm_run.jobs), slurm_run.jobs


def test_refused_submission_shows_sbatchs_message(slurm_cluster, demo_cohort, tmp_path):
    # A site profile that names a partition this cluster lacks: sbatch refuses every job.
    site = tmp_path / "site"
    site.mkdir()
    (site / "config.yaml").write_text(
        yaml.safe_dump({"default-resources": {"slurm_partition": "no-such-partition"}})
    )
    configfile = _configfile(tmp_path, *demo_cohort)
    result = _run(*PROFILE_ARGS[:-2], "--profile", str(site), *PROFILE_ARGS[-2:],
                  "--configfile", str(configfile), "--retries", "0", limit_s=300)  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-5000:]
    refusal = "sbatch: error: invalid partition specified: no-such-partition"
    # In the run's output and in its log file, with what to change ...
    assert "SLURM refused the submission of group subject" in output, output[-5000:]
    assert refusal in output and "sinfo -s" in output, output[-5000:]
    [logfile] = re.findall(r"Complete log\(s\): (\S+)", output)
    assert refusal in Path(logfile).read_text()
    # ... and in the log of each rule of the refused submission, which was empty before.
    for subject in cohort.list_subjects(demo_cohort[0]):
        log = paths.log(tmp_path / "out", "preprocess", subject.bids_id)
        assert refusal in log.read_text(), log


OOM_SNAKEFILE = """\
# A job that needs more memory than its first attempt asks for: SLURM kills it
# (JobAcctGatherParams=OverMemoryKill) and the retry asks for mem_per_attempt's next step.
from snakemake.utils import validate


configfile: "{root}/config.yaml"


validate(config, "{root}/src/mriaudit/schemas/config.schema.yaml", set_default=True)


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
