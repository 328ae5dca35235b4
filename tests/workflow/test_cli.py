"""The installed ``mriaudit`` command drives the same Snakefile (dry runs: no job runs)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import job_counts

COMMAND = Path(sys.executable).with_name("mriaudit")


def _dry_run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(COMMAND), *args, "--dry-run"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_participant_and_group_levels_from_any_folder(tmp_path):
    cohort = tmp_path / "cohort"
    for name in ("sub-01", "sub-02"):
        (cohort / name).mkdir(parents=True)
    with zipfile.ZipFile(cohort / "sub-03.zip", "w") as archive:
        archive.writestr("export/IM0001", b"not yet read: a dry run reads no file")
    # Relative paths from the caller's folder, not the project's.
    participant = _dry_run("cohort", "audit", "participant", "--cores", "2", cwd=tmp_path)
    assert participant.returncode == 0, participant.stderr[-3000:]
    counts = job_counts(participant.stdout + participant.stderr)
    assert counts.get("preprocess") == 3, counts
    assert not {"train_model", "score", "report"} & set(counts), counts
    group = _dry_run("cohort", "audit", "--config", "device=cpu", cwd=tmp_path)
    assert group.returncode == 0, group.stderr[-3000:]
    counts = job_counts(group.stdout + group.stderr)
    assert counts.get("preprocess") == 3, counts
    assert {"train_model", "score", "aggregate", "report"} <= set(counts), counts
    assert not (tmp_path / "audit").exists() or not any((tmp_path / "audit").rglob("*.json"))


def test_a_missing_input_folder_is_named(tmp_path):
    result = _dry_run(str(tmp_path / "absent"), str(tmp_path / "out"), cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "absent" in output and "input_dir" in output, output
