"""Bad inputs added to the generated demo cohort, and what the audit must make of each.

Everything is generated at test time from a normal demo subject (no binaries are
committed): an archive-like export, hopeless folders, non-image DICOM objects,
a scan duplicated under a second name with hostile header strings, pure noise,
and broken NIfTI files. ``EXPECTED`` says, for each folder, the status and the
reason (or flag reason) a person should read in ``scores.tsv``.
"""

from __future__ import annotations

import copy
import random
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from ..unit.conftest import write_enhanced_series

MESSY = "sub-messy"
#: The messy subject's extra series by description, with why the inventory must reject each.
MESSY_REJECTIONS = {
    "localizer": "localizer",
    "t1_se_tra_2d": "2D T1, ranked below",
    "ep2d_diff_b1000": "diffusion-weighted (ImageType says DIFFUSION)",
}
JUNK_FILES = {
    "README.txt": b"exported by PACS\n",
    "notes.pdf": b"%PDF-1.4\n",
    ".DS_Store": b"\0" * 64,
}
#: A header string that would do harm if it ever reached a shell or a path.
HOSTILE_TEXT = "$(rm -rf ~); ls ../../etc"
#: The second copy of a normal scan: shell-special characters in its folder name.
TWIN = "sub-twin $(rm -rf ~); ls"
#: A third normal subject's folder packed as one zip file in input_dir (``sub-zipped.zip``).
ZIPPED = "sub-zipped"

#: folder -> (status, the scores.tsv column that explains it, text it must contain).
EXPECTED: dict[str, tuple[str, str, str]] = {
    MESSY: ("ok", "", ""),
    "sub-junk": ("no_series", "reason", "no DICOM or NIfTI files (3 non-DICOM files)"),
    "sub-corrupt": ("no_series", "reason", "no readable DICOM or NIfTI files (5 unreadable files)"),
    "sub-zero-bytes": (
        "no_series",
        "reason",
        "no readable DICOM or NIfTI files (3 unreadable files)",
    ),
    "sub-dcm-names": ("no_series", "reason", "no DICOM or NIfTI files (2 non-DICOM files)"),
    "sub-report-only": (
        "no_series",
        "reason",
        "no usable T1-weighted series among 2 series (not MR: 2)",
    ),
    "sub-2d-only": ("ok", "notes", "only a 2D T1-weighted series was available"),
    "sub-duplicated-slices": ("ok", "flag_reasons", "duplicate slices in the series (2)"),
    "sub-4d": ("ok", "", ""),
    "sub-4d-unnumbered": ("failed", "reason", "affine that is not invertible or not finite"),
    "sub-mixed-dimensions": ("ok", "flag_reasons", "slices with mixed matrix sizes"),
    "sub-enhanced": ("ok", "", ""),
    TWIN: ("ok", "flag_reasons", "identical image data to "),
    # The zip holds a normal subject's files, so it is that subject's duplicate.
    ZIPPED: ("ok", "flag_reasons", "identical image data to "),
    "sub-noise": ("ok", "flag_reasons", "registration to the MNI152 template failed"),
    "sub-nan": ("failed", "reason", "non-finite voxels"),
    "sub-singular-affine": ("no_series", "reason", "affine not invertible or not finite: 1"),
    "sub-1x1x1": ("no_series", "reason", "not a 3D image (1x1x1)"),
    "sub-2048x2048x1": ("no_series", "reason", "not a 3D image (2048x2048x1)"),
}


def _series_files(folder: Path) -> dict[str, list[Path]]:
    """DICOM files of ``folder`` by SeriesInstanceUID."""
    series: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
            series.setdefault(uid, []).append(path)
    return series


def _read_t1(files: list[Path]) -> list[pydicom.Dataset]:
    return sorted((pydicom.dcmread(path) for path in files), key=lambda d: int(d.InstanceNumber))


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

    Every file gets a random name in a random nested folder, as in a PACS export,
    and a symlink loops back to the subject folder.
    """
    t1 = _read_t1(t1_files)
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
    (target / "a" / "b" / "up").symlink_to("../..")  # a loop: never followed


def _non_image_objects(source: pydicom.Dataset, target: Path) -> None:
    """A structured report and a presentation state: DICOM with a series but no pixels."""
    target.mkdir(parents=True)
    for name, sop_class, modality in (
        ("SR0001", "1.2.840.10008.5.1.4.1.1.88.11", "SR"),  # Basic Text SR
        ("PS0001", "1.2.840.10008.5.1.4.1.1.11.1", "PR"),  # Grayscale Softcopy Presentation State
    ):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = sop_class
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset = pydicom.Dataset()
        dataset.file_meta = meta
        dataset.SOPClassUID = sop_class
        dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        dataset.StudyInstanceUID = source.StudyInstanceUID
        dataset.SeriesInstanceUID = generate_uid()
        dataset.Modality = modality
        dataset.SeriesDescription = f"{modality} t1 report"
        dataset.PatientName = source.PatientName
        dataset.save_as(target / name, enforce_file_format=True)


def _save_all(datasets: list[pydicom.Dataset], target: Path) -> None:
    target.mkdir(parents=True)
    for index, dataset in enumerate(datasets):
        dataset.save_as(target / f"IM{index:04d}", enforce_file_format=True)


def _two_d_only(t1_files: list[Path], target: Path) -> None:
    """Only a 2D T1: every second slice of the 3D T1, twice as thick."""
    two_d = _derived_series(_read_t1(t1_files)[::2], 5, "t1_se_sag_2d")
    for dataset in two_d:
        dataset.MRAcquisitionType = "2D"
        dataset.SliceThickness = 2 * float(dataset.SliceThickness)
    _save_all(two_d, target)


def _duplicated_slices(t1_files: list[Path], target: Path) -> None:
    """The T1 with two slices stored twice (new instance UIDs, same positions)."""
    t1 = _read_t1(t1_files)
    copies = [copy.deepcopy(t1[len(t1) // 3]), copy.deepcopy(t1[len(t1) // 2])]
    for dataset in copies:
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    _save_all(t1 + copies, target)


def _two_time_points(t1_files: list[Path], target: Path, *, renumber: bool = True) -> None:
    """A 4D series: the T1 acquired twice, one series, two temporal positions.

    Without ``renumber`` both time points repeat instance numbers 1..N: dcm2niix
    then cannot tell the slice direction and writes a zero slice axis.
    """
    volumes = []
    for time_point in (1, 2):
        for dataset in _read_t1(t1_files):
            if renumber:
                dataset.InstanceNumber = len(volumes) + 1
            dataset.SOPInstanceUID = generate_uid()
            dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
            dataset.AcquisitionNumber = time_point
            dataset.TemporalPositionIdentifier = time_point
            dataset.NumberOfTemporalPositions = 2
            volumes.append(dataset)
    _save_all(volumes, target)


def _mixed_dimensions(t1_files: list[Path], target: Path) -> None:
    """The T1 with one slice stored on a smaller matrix (cropped by 8 rows and columns)."""
    t1 = _read_t1(t1_files)
    odd = t1[len(t1) // 2]
    pixels = odd.pixel_array[4:-4, 4:-4]
    odd.Rows, odd.Columns = pixels.shape
    odd.PixelData = np.ascontiguousarray(pixels).tobytes()
    _save_all(t1, target)


def _twin(t1_files: list[Path], target: Path) -> None:
    """The same T1 exported again: new UIDs and hostile strings, identical pixels."""
    target.mkdir(parents=True)
    series_uid = generate_uid()
    for index, dataset in enumerate(_read_t1(t1_files)):
        dataset.SeriesInstanceUID = series_uid
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.SeriesDescription = f"{HOSTILE_TEXT} {dataset.SeriesDescription}"
        dataset.save_as(target / f"{index:04d}; ls.dcm", enforce_file_format=True)


def zipped_source(labels: Path) -> str:
    """The normal subject whose folder ``sub-zipped.zip`` packs."""
    table = pd.read_csv(labels, sep="\t", dtype=str, keep_default_na=False)
    return table[table["kind"] == "normal"]["folder"].tolist()[2]


def _zipped(folder: Path, target: Path) -> None:
    """A subject's export packed as one zip file, members under ``export/``."""
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            archive.write(path, f"export/{path.relative_to(folder).as_posix()}")


def _noise(t1_files: list[Path], target: Path, rng: np.random.Generator) -> None:
    """A T1 series whose pixels are uniform noise: headers of a head, no head at all."""
    target.mkdir(parents=True)
    for index, dataset in enumerate(_read_t1(t1_files)):
        pixels = dataset.pixel_array
        top = max(int(pixels.max()), 1)
        dataset.PixelData = rng.integers(0, top, pixels.shape, dtype=pixels.dtype).tobytes()
        dataset.save_as(target / f"IM{index:04d}", enforce_file_format=True)


def _nifti(target: Path, data: np.ndarray, affine: np.ndarray | None, header=None) -> None:
    target.mkdir(parents=True)
    nib.save(nib.Nifti1Image(data, affine, header=header), target / "T1w.nii.gz")


def _broken_niftis(input_dir: Path, rng: np.random.Generator) -> None:
    head = np.zeros((40, 48, 36), dtype=np.float32)
    head[8:32, 8:40, 6:30] = 100 + 10 * rng.standard_normal((24, 32, 24))
    scaled = np.diag([3.0, 3.0, 3.0, 1.0])
    with_nan = head.copy()
    with_nan[:, :, 14:18] = np.nan
    _nifti(input_dir / "sub-nan", with_nan, scaled)
    singular = nib.Nifti1Header()
    singular.set_data_shape(head.shape)
    singular.set_data_dtype(np.float32)
    singular["sform_code"], singular["qform_code"] = 1, 0
    for row in ("srow_x", "srow_y", "srow_z"):
        singular[row] = [0.0, 0.0, 0.0, 0.0]
    _nifti(input_dir / "sub-singular-affine", head, None, header=singular)
    _nifti(input_dir / "sub-1x1x1", np.ones((1, 1, 1), dtype=np.float32), np.eye(4))
    _nifti(input_dir / "sub-2048x2048x1", np.ones((2048, 2048, 1), dtype=np.uint8), np.eye(4))


def add_bad_inputs(input_dir: Path, labels: Path) -> None:
    """Add every folder of ``EXPECTED`` to a generated cohort, and their labels.

    The DICOM ones are built from two normal subjects' T1 series (so the twin
    and that normal subject are duplicates), and a third normal subject's folder
    is zipped as ``sub-zipped.zip`` (its duplicate too); the messy, 2D-only and 4D subjects
    are labelled 0 (usable), every other added folder 1 (to be excluded).
    """
    table = pd.read_csv(labels, sep="\t", dtype=str, keep_default_na=False)
    normals = table[table["kind"] == "normal"]["folder"].tolist()
    t1_of = {name: max(_series_files(input_dir / name).values(), key=len) for name in normals[:2]}
    first, second = (t1_of[name] for name in normals[:2])
    rng = np.random.default_rng(7)
    _messy_subject(first, input_dir / MESSY, random.Random(7))
    junk = input_dir / "sub-junk" / "docs"
    junk.mkdir(parents=True)
    for name, content in JUNK_FILES.items():
        (junk / name).write_bytes(content)
    corrupt = input_dir / "sub-corrupt"
    corrupt.mkdir()
    header = first[0].read_bytes()
    for index in range(4):
        # A DICOM preamble and magic, then the header cut off mid-element.
        (corrupt / f"IM{index:04d}").write_bytes(header[: 200 + 37 * index])
    garbage = bytes(rng.integers(0, 256, 300, dtype=np.uint8))
    (corrupt / "IM0099").write_bytes(b"\0" * 128 + b"DICM" + garbage)
    zero = input_dir / "sub-zero-bytes"
    zero.mkdir()
    for name in ("IM0001", "IM0002", "IM0003.dcm"):
        (zero / name).write_bytes(b"")
    named = input_dir / "sub-dcm-names"
    named.mkdir()
    (named / "IM0001.dcm").write_text("patient list exported as text\n")
    (named / "IM0002.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + garbage)
    _non_image_objects(
        pydicom.dcmread(first[0], stop_before_pixels=True), input_dir / "sub-report-only"
    )
    _two_d_only(first, input_dir / "sub-2d-only")
    _duplicated_slices(second, input_dir / "sub-duplicated-slices")
    _two_time_points(first, input_dir / "sub-4d")
    _two_time_points(first, input_dir / "sub-4d-unnumbered", renumber=False)
    _mixed_dimensions(first, input_dir / "sub-mixed-dimensions")
    write_enhanced_series(
        input_dir / "sub-enhanced" / "MF0001", shape=(48, 56, 40), spacing=(3.0, 3.0, 3.0)
    )
    _twin(second, input_dir / TWIN)
    _zipped(input_dir / normals[2], input_dir / f"{ZIPPED}.zip")
    _noise(second, input_dir / "sub-noise", rng)
    _broken_niftis(input_dir, rng)
    normal = {MESSY, "sub-2d-only", "sub-4d"}
    rows = [
        {"folder": folder, "truth": "0" if folder in normal else "1", "kind": "corpus"}
        for folder in EXPECTED
    ]
    pd.concat([table, pd.DataFrame(rows)]).fillna("").to_csv(labels, sep="\t", index=False)
