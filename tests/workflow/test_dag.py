"""DAG-level checks that need no image processing: dry runs, targets, lint, config errors."""

from __future__ import annotations

import pytest

from mriaudit import paths

from .conftest import snakemake


@pytest.fixture()
def placeholder_cohort(tmp_path):
    """Subject folders with one placeholder file each: enough for the DAG."""
    root = tmp_path / "input"
    for name in ["sub-01", "sub-02", "Patient 7 (ü)", "a-b", "ab"]:
        (root / name).mkdir(parents=True)
        (root / name / "IM0001").write_bytes(b"placeholder")
    (root / "README.txt").write_text("not a subject")
    return root


def _jobs(output: str) -> dict[str, int]:
    counts, in_table = {}, False
    for line in output.splitlines():
        if line.startswith("job ") and "count" in line:
            in_table = True
            continue
        if in_table:
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                counts[parts[0]] = int(parts[1])
            elif parts and parts[0] == "total":
                break
    return counts


def test_dry_run_builds_one_chain_per_subject(placeholder_cohort, tmp_path):
    out = tmp_path / "out"
    result = snakemake("-n", "--config", f"input_dir={placeholder_cohort}", f"output_dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(result.stdout)
    # a-b and ab collide on the BIDS id "ab": reported, not processed.
    assert jobs["preprocess"] == 3, jobs
    for rule in ["collect", "train_model", "score", "aggregate", "report"]:
        assert jobs[rule] == 1, jobs
    # A model per contrast beside the T1w (config contrasts: T2w and FLAIR by default).
    for rule in ["train_contrast_model", "score_contrast", "merge_contrast_scores"]:
        assert jobs[rule] == 2, jobs
    assert "evaluate" not in jobs, "metrics.json only when labels are given"


def test_a_t1_only_config_has_no_contrast_jobs(placeholder_cohort, tmp_path):
    result = snakemake(
        "-n",
        "--config",
        f"input_dir={placeholder_cohort}",
        f"output_dir={tmp_path / 'out'}",
        "contrasts=[T1w]",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(result.stdout)
    assert jobs["preprocess"] == 3 and jobs["train_model"] == 1, jobs
    assert not {"train_contrast_model", "score_contrast", "merge_contrast_scores"} & set(jobs)
    assert "_desc-T2w_qc.json" not in result.stdout
    refused = snakemake(
        "-n", "--config", f"input_dir={placeholder_cohort}", "contrasts=[T2w, FLAIR]"
    )
    message = refused.stdout + refused.stderr
    assert refused.returncode != 0 and "contrasts" in message and "T1w" in message, message


def test_contract_paths_are_targets_with_absolute_output_dir(placeholder_cohort, tmp_path):
    out = (tmp_path / "out").resolve()
    # The subject's JSON is a contract path; the score records are written by the score
    # jobs of the cohort's shards, not declared per subject.
    target = paths.subject_scores(out, "Patient7")
    result = snakemake(
        "-n", str(target), "--config", f"input_dir={placeholder_cohort}", f"output_dir={out}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(result.stdout)
    assert jobs["score"] == jobs["merge_scores"] == jobs["aggregate"] == 1, jobs


def test_reused_checkpoint_skips_training(placeholder_cohort, tmp_path):
    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"trained elsewhere")
    result = snakemake(
        "-n",
        "--config",
        f"input_dir={placeholder_cohort}",
        f"output_dir={tmp_path / 'out'}",
        f"model={checkpoint}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = _jobs(result.stdout)
    assert "train_model" not in jobs and jobs["score"] == 1
    # The checkpoint is the T1w's: each other contrast's model is trained on the cohort.
    assert jobs["train_contrast_model"] == 2


def test_missing_input_dir_is_a_clear_config_error(tmp_path):
    result = snakemake("-n", "--config", f"input_dir={tmp_path / 'absent'}")
    assert result.returncode != 0
    assert "input_dir" in result.stdout + result.stderr


def test_unknown_config_key_is_rejected(placeholder_cohort):
    result = snakemake("-n", "--config", f"input_dir={placeholder_cohort}", "trheads=3")
    assert result.returncode != 0
    assert "trheads" in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("device=gpu", "'gpu' is not one of ['auto', 'cpu', 'cuda']"),
        ("training={'epochs': 'many'}", "'many' is not of type 'integer'"),
        (
            "model={'method': 'vae'}",
            "'vae' is not one of ['atlas_warp', 'ae3d', 'itermask3d', 'token_surprisal']",
        ),
        ("model={'methd': 'ae3d'}", "'methd' was unexpected"),
    ],
)
def test_a_value_of_the_wrong_type_is_rejected_with_the_schema_message(
    placeholder_cohort, override, message
):
    result = snakemake("-n", "--config", f"input_dir={placeholder_cohort}", override)
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_invalid_series_regex_fails_before_any_job(placeholder_cohort, tmp_path):
    configfile = tmp_path / "config.yaml"
    configfile.write_text(f"input_dir: {placeholder_cohort}\nseries:\n  include: 't1(('\n")
    result = snakemake("-n", "--configfile", str(configfile))
    assert result.returncode != 0
    assert "series.include is not a valid regular expression" in result.stdout + result.stderr


def test_labels_naming_unknown_subjects_fail_before_any_job(placeholder_cohort, tmp_path):
    labels = tmp_path / "labels.tsv"
    labels.write_text("folder\ttruth\nsub-01\t0\nsub-1\t1\nPatient 7 (ü)\t1\n")
    out = tmp_path / "out"
    result = snakemake(
        "-n", "--config", f"input_dir={placeholder_cohort}", f"output_dir={out}", f"labels={labels}"
    )
    assert result.returncode != 0
    printed = result.stdout + result.stderr
    assert "config key labels: 1 subject(s) of" in printed and "'sub-1'" in printed, printed
    assert not out.exists()
    labels.write_text("folder\ttruth\nsub-01\t0\nPatient 7 (ü)\t1\n")
    result = snakemake(
        "-n", "--config", f"input_dir={placeholder_cohort}", f"output_dir={out}", f"labels={labels}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert _jobs(result.stdout)["evaluate"] == 1


def test_lint_is_clean(placeholder_cohort, tmp_path):
    result = snakemake(
        "--lint", "--config", f"input_dir={placeholder_cohort}", f"output_dir={tmp_path / 'out'}"
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Lints for" not in result.stdout + result.stderr
