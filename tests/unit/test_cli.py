"""The ``mriaudit`` command line: what Snakemake command it builds, and its help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mriaudit import cli

COMMAND = Path(sys.executable).with_name("mriaudit")


def _after(command: list[str], flag: str) -> list[str]:
    """The values that follow ``flag`` up to the next option."""
    start = command.index(flag) + 1
    end = next((i for i in range(start, len(command)) if command[i].startswith("-")), None)
    return command[start:end]


def test_the_command_runs_the_project_snakefile_with_absolute_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    command = cli.snakemake_command(["in", "out", "--labels", "labels.tsv", "--cores", "4"])
    assert command[:3] == [sys.executable, "-m", "snakemake"]
    assert _after(command, "--snakefile") == [str(cli.PROJECT / "Snakefile")]
    assert _after(command, "--cores") == ["4"]
    assert _after(command, "--config") == [
        f"input_dir={tmp_path / 'in'}",
        f"output_dir={tmp_path / 'out'}",
        f"labels={tmp_path / 'labels.tsv'}",
    ]
    assert "--until" not in command and "--dry-run" not in command


def test_levels_profiles_config_and_passthrough(tmp_path):
    command = cli.snakemake_command(
        [
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            "participant",
            "--profile",
            "slurm",
            "--config",
            "device=cpu",
            "model=/m/model.pt",
            "--config",
            "template_resolution=2",
            "-n",
            "--",
            "--forcerun",
            "train_model",
        ]
    )
    assert _after(command, "--until") == [cli.PARTICIPANT_RULE]
    assert _after(command, "--profile") == [str(cli.PROJECT / "profiles" / "slurm")]
    assert _after(command, "--config")[2:] == [
        "device=cpu",
        "model=/m/model.pt",
        "template_resolution=2",
    ]
    assert "--dry-run" in command and "--cores" not in command  # the profile's own
    assert command[-2:] == ["--forcerun", "train_model"]
    assert _after(cli.snakemake_command(["in", "out"]), "--cores") == ["all"]
    own = cli.snakemake_command([str(tmp_path), str(tmp_path), "--profile", str(tmp_path)])
    assert _after(own, "--profile") == [str(tmp_path)]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["in", "out", "--config", "device"], "KEY=VALUE"),
        (["in", "out", "everything"], "invalid choice"),
        (["in"], "required"),
    ],
)
def test_bad_arguments_say_what_is_wrong(argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        cli.snakemake_command(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


def test_installed_command_helps_with_every_config_key():
    result = subprocess.run([str(COMMAND), "--help"], capture_output=True, text=True, check=True)
    schema = yaml.safe_load(cli.SCHEMA.read_text())
    for key in schema["properties"]:
        assert f"\n  {key}" in result.stdout, key
    for nested in schema["properties"]["flag"]["properties"]:
        assert nested in result.stdout
    version = subprocess.run(
        [str(COMMAND), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"mriaudit {cli.version()}" != "mriaudit unknown"
