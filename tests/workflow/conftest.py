"""A tiny generated cohort and one real end-to-end run of the workflow, shared by the tests."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.errors import InvalidDicomError

from . import corpus

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


def job_counts(output: str) -> dict[str, int]:
    """Rule -> job count from the table a dry run prints."""
    counts = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit() and parts[0] != "total":
            counts[parts[0]] = int(parts[1])
    return counts


@dataclass(frozen=True)
class Run:
    input_dir: Path
    output_dir: Path
    labels: Path
    configfile: Path
    result: subprocess.CompletedProcess
    #: sha256 of every input file (relative path -> digest) before and after the run.
    inputs_before: dict[str, str]
    inputs_after: dict[str, str]


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every regular file under ``root``, by relative path."""
    return {
        path.relative_to(root).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


def make_read_only(root: Path) -> None:
    """chmod -R a-w (root ignores it; the hashes are what the tests compare)."""
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)


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
    plant_hostile_series_description(input_dir, labels)
    corpus.add_bad_inputs(input_dir, labels)
    return input_dir, labels


#: Planted in the SeriesDescription of one flagged subject: the report must show it as text.
HOSTILE_DESCRIPTION = "<script>alert(1)</script> "
#: The kind whose subject is planted: flagged in this cohort (the browser test asserts it),
#: so the description reaches the report's montage card.
PLANTED_KIND = "missing_slices"


def plant_hostile_series_description(input_dir: Path, labels: Path) -> str:
    """Prefix the T1 series description of the first ``PLANTED_KIND`` subject with a script tag.

    Returns that subject's folder name.
    """
    table = pd.read_csv(labels, sep="\t", dtype=str)
    folder = table[table["kind"] == PLANTED_KIND]["folder"].iloc[0]
    for path in sorted((input_dir / folder).rglob("*")):
        if not path.is_file():
            continue
        try:
            dataset = pydicom.dcmread(path)
        except InvalidDicomError:
            continue
        description = str(dataset.get("SeriesDescription", ""))
        if "t1" in description.lower() and "loc" not in description.lower():
            dataset.SeriesDescription = HOSTILE_DESCRIPTION + description
            dataset.save_as(path)
    return folder


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
    before = file_hashes(input_dir)
    make_read_only(input_dir)
    result = snakemake("--cores", "2", "--configfile", str(configfile))
    return Run(input_dir, output_dir, labels, configfile, result, before, file_hashes(input_dir))
