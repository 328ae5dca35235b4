"""A tiny generated cohort and one real end-to-end run of the workflow, shared by the tests."""

from __future__ import annotations

import copy
import hashlib
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.errors import InvalidDicomError
from pydicom.uid import generate_uid

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
    add_messy_subjects(input_dir, labels)
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
    folder = table[table["kind"] == PLANTED_KIND]["subject"].iloc[0]
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


#: Folders added to the generated cohort: an archive-like subject and two hopeless ones.
MESSY, ALL_JUNK, ALL_CORRUPT = "sub-messy", "sub-junk", "sub-corrupt"
#: The messy subject's extra series by description, with why the inventory must reject each.
MESSY_REJECTIONS = {
    "localizer": "localizer",
    "t1_se_tra_2d": "T1 candidate, ranked below",
    "ep2d_diff_b1000": "excluded by rule (matches 'diff')",
}
JUNK_FILES = {
    "README.txt": b"exported by PACS\n",
    "notes.pdf": b"%PDF-1.4\n",
    ".DS_Store": b"\0" * 64,
}


def _series_files(folder: Path) -> dict[str, list[Path]]:
    """DICOM files of ``folder`` by SeriesInstanceUID."""
    series: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
            series.setdefault(uid, []).append(path)
    return series


def _derived_series(
    slices: list[pydicom.Dataset], number: int, description: str
) -> list[pydicom.Dataset]:
    """Copies of T1 slices re-labelled as another series (new UIDs, number, description)."""
    uid = generate_uid()
    out = []
    for index, source in enumerate(slices):
        dataset = copy.deepcopy(source)  # Dataset.copy() would share the data elements
        dataset.SeriesInstanceUID = uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.SeriesNumber = number
        dataset.InstanceNumber = index + 1
        dataset.SeriesDescription = description
        dataset.ProtocolName = description
        out.append(dataset)
    return out


def _messy_subject(t1_files: list[Path], target: Path, rng: random.Random) -> None:
    """A 3D T1 with a localizer, a 2D T1, a DWI series, junk and one truncated file.

    Every file gets a random name in a random nested folder, as in a PACS export.
    """
    t1 = sorted((pydicom.dcmread(path) for path in t1_files), key=lambda d: int(d.InstanceNumber))
    localizer = _derived_series(t1[len(t1) // 2 : len(t1) // 2 + 3], 90, "localizer")
    for dataset in localizer:
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    two_d = _derived_series(t1[::2], 91, "t1_se_tra_2d")
    for dataset in two_d:
        dataset.MRAcquisitionType = "2D"
        dataset.SliceThickness = 2 * float(t1[0].SliceThickness)
        dataset.SequenceName = "*se2d1"
    dwi = _derived_series(t1[::4], 92, "ep2d_diff_b1000")
    for dataset in dwi:
        dataset.MRAcquisitionType = "2D"
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]
        dataset.SequenceName = "*ep_b1000t"
    folders = [target / "a", target / "a" / "b" / "c", target / "export" / "0001", target]

    def place(name: str) -> Path:
        folder = rng.choice(folders)
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    for dataset in t1 + localizer + two_d + dwi:
        dataset.save_as(place(f"{rng.getrandbits(40):010x}"), enforce_file_format=True)
    for name, content in JUNK_FILES.items():
        place(name).write_bytes(content)
    # One more DWI slice, cut inside its pixel data.
    extra = _derived_series(t1[1:2], 92, "ep2d_diff_b1000")[0]
    extra.SeriesInstanceUID = dwi[0].SeriesInstanceUID
    truncated = place(f"{rng.getrandbits(40):010x}")
    extra.save_as(truncated, enforce_file_format=True)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])


def add_messy_subjects(input_dir: Path, labels: Path) -> None:
    """Add ``MESSY`` (built from a normal subject's T1), ``ALL_JUNK`` and ``ALL_CORRUPT``.

    The labels TSV gets their rows (the messy subject is normal, the others broken).
    """
    table = pd.read_csv(labels, sep="\t", dtype=str, keep_default_na=False)
    normal = table[table["kind"] == "normal"]["subject"].iloc[0]
    t1_files = max(_series_files(input_dir / normal).values(), key=len)
    rng = random.Random(7)
    _messy_subject(t1_files, input_dir / MESSY, rng)
    junk = input_dir / ALL_JUNK / "docs"
    junk.mkdir(parents=True)
    for name, content in JUNK_FILES.items():
        (junk / name).write_bytes(content)
    corrupt = input_dir / ALL_CORRUPT
    corrupt.mkdir()
    header = t1_files[0].read_bytes()
    for index in range(4):
        # A DICOM preamble and magic, then the header cut off mid-element.
        (corrupt / f"IM{index:04d}").write_bytes(header[: 200 + 37 * index])
    (corrupt / "IM0099").write_bytes(
        b"\0" * 128 + b"DICM" + bytes(rng.getrandbits(8) for _ in range(300))
    )
    rows = [
        {"subject": MESSY, "label": "0", "kind": "messy", "description": "archive-like export"},
        {"subject": ALL_JUNK, "label": "1", "kind": "all_junk", "description": "no DICOM"},
        {"subject": ALL_CORRUPT, "label": "1", "kind": "all_corrupt", "description": "cut files"},
    ]
    pd.concat([table, pd.DataFrame(rows)]).fillna("").to_csv(labels, sep="\t", index=False)


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
