"""A tiny generated cohort and one real end-to-end run of the workflow, shared by the tests."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SNAKEMAKE = Path(sys.executable).with_name("snakemake")


def snakemake(*args: str, cwd: Path = ROOT, timeout: int = 1500) -> subprocess.CompletedProcess:
    """Run the project's Snakemake from the project root; output is kept for the assertion message."""
    return subprocess.run(
        [str(SNAKEMAKE), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Run:
    input_dir: Path
    output_dir: Path
    labels: Path
    configfile: Path
    result: subprocess.CompletedProcess


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Eight generated subjects on a coarse grid (normals, anomalies and broken inputs)."""
    base = tmp_path_factory.mktemp("cohort")
    input_dir, labels = base / "input", base / "labels.tsv"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mriaudit.demo",
            str(input_dir),
            "--subjects",
            "10",
            "--seed",
            "3",
            "--voxel-size",
            "3",
            "--labels",
            str(labels),
        ],
        check=True,
    )
    return input_dir, labels


@pytest.fixture(scope="session")
def workflow_run(tiny_cohort, tmp_path_factory) -> Run:
    input_dir, labels = tiny_cohort
    output_dir = tmp_path_factory.mktemp("audit") / "out"
    configfile = output_dir.parent / "config.yaml"
    configfile.write_text(
        yaml.safe_dump(
            {
                "input_dir": str(input_dir),
                "output_dir": str(output_dir),
                "labels": str(labels),
                "device": "cpu",
                "training": {"folds": 2, "epochs": 4},
            }
        )
    )
    result = snakemake("--cores", "2", "--configfile", str(configfile))
    return Run(input_dir, output_dir, labels, configfile, result)
