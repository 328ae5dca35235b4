"""Synthetic DICOM and NIfTI writers for the unit tests (tiny, deterministic, real pydicom files).

``write_dicom_series`` writes one MR series, one classic single-frame file per
slice, with exact geometry: every voxel holds a unique value
``1 + col + n_cols * row + n_cols * n_rows * slice``, so a converted image can
be traced back voxel by voxel to the DICOM slice, row and column it came from.
``write_enhanced_series`` writes the same series as one enhanced multi-frame
file, and ``write_nifti`` a small NIfTI. Other test modules reuse them through
the ``dicom_series``, ``enhanced_series`` and ``nifti_file`` fixtures or by
importing them from ``tests.unit.conftest``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from mriaudit import isolation

_TILT = math.radians(35.0)


@pytest.fixture(scope="session", autouse=True)
def stages_in_process():
    """Unit tests run stages in-process: this session has used OpenMP and ITK thread
    pools, after which a forked child can deadlock (a rule's fresh process cannot).
    Only this process: the workflow tests' Snakemake jobs still fork."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(isolation, "FORK_STAGES", False)
        yield


#: ImageOrientationPatient (row direction cosines, then column direction cosines), LPS.
ORIENTATIONS: dict[str, tuple[float, ...]] = {
    "axial": (1.0, 0.0, 0.0, 0.0, 1.0, 0.0),
    "sagittal": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0),
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
    # Axial tilted 35 degrees about the left-right axis: more than any axis tolerance.
    "oblique": (1.0, 0.0, 0.0, 0.0, math.cos(_TILT), math.sin(_TILT)),
}

#: Identifying values written into every synthetic file; tests assert none of them leaks.
PHI_VALUES: dict[str, str] = {
    "PatientName": "Doe^Jane",
    "PatientID": "PID-4711-SECRET",
    "PatientBirthDate": "19700101",
    "InstitutionName": "Secret General Hospital",
    "InstitutionAddress": "1 Hidden Lane Nowhere",
    "ReferringPhysicianName": "Who^Doctor",
    "AccessionNumber": "ACC99887766",
}

STUDY_UID = generate_uid(entropy_srcs=["mriaudit-test-study"])


def _ds1(value: float) -> str:
    return format_number_as_ds(float(value))


def _ds(values: Sequence[float]) -> list[str]:
    return [_ds1(v) for v in values]


def series_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal (row cosines x column cosines), LPS."""
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def write_dicom_series(
    folder: str | Path,
    *,
    shape: tuple[int, int, int] = (16, 16, 12),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    slice_thickness: float | None = None,
    orientation: str | Sequence[float] = "axial",
    origin: Sequence[float] = (-8.0, -8.0, -6.0),
    description: str = "t1_mprage_sag",
    protocol: str | None = None,
    sequence_name: str = "*tfl3d1",
    scanning_sequence: Sequence[str] = ("GR", "IR"),
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "M", "ND"),
    acquisition: str | None = "3D",
    modality: str = "MR",
    series_number: int = 1,
    series_uid: str | None = None,
    missing: Sequence[int] = (),
    duplicated: Sequence[int] = (),
    phi: bool = True,
    manufacturer: str = "Acme Imaging",
    model: str = "Model X",
    field_strength: float = 3.0,
    tr: float = 2300.0,
    te: float = 2.98,
    ti: float | None = 900.0,
    flip_angle: float = 9.0,
    overrides: Mapping[int, Mapping[str, Any]] | None = None,
    tags: Mapping[str, Any] | None = None,
    prefix: str = "IM",
) -> list[Path]:
    """Write one MR series as single-frame DICOM files and return their paths.

    ``shape`` is (columns, rows, slices) in voxels and ``spacing`` (column
    spacing, row spacing, slice spacing) in mm, so ``PixelSpacing`` is
    ``[spacing[1], spacing[0]]``. Slice ``s`` sits at
    ``origin + s * spacing[2] * normal``. ``missing`` slice indices are not
    written, ``duplicated`` ones are written twice (new SOPInstanceUID, same
    position). ``overrides`` maps a slice index to header values set last
    (changing ``Rows``/``Columns`` there resizes that slice's pixels); ``tags``
    are header values set on every slice (``None`` deletes one).
    ``orientation`` is a name from ``ORIENTATIONS`` or six direction cosines.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_cols, n_rows, n_slices = shape
    iop = ORIENTATIONS[orientation] if isinstance(orientation, str) else tuple(orientation)
    uid = series_uid or generate_uid(entropy_srcs=[str(folder), description, str(series_number)])
    overrides = overrides or {}
    written: list[Path] = []
    order = [s for s in range(n_slices) if s not in set(missing)]
    order += [s for s in duplicated if s not in set(missing)]
    for counter, s in enumerate(order):
        sop_uid = generate_uid(entropy_srcs=[uid, str(counter)])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{prefix}{counter + 1:04d}"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = STUDY_UID
        ds.SeriesInstanceUID = uid
        ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[STUDY_UID, "frame"])
        ds.Modality = modality
        ds.SeriesNumber = series_number
        ds.InstanceNumber = counter + 1
        ds.AcquisitionNumber = 1
        ds.SeriesDescription = description
        ds.ProtocolName = description if protocol is None else protocol
        ds.SequenceName = sequence_name
        ds.ScanningSequence = list(scanning_sequence)
        ds.SequenceVariant = ["SK", "SP", "MP"]
        ds.ImageType = list(image_type)
        if acquisition is not None:
            ds.MRAcquisitionType = acquisition
        ds.Manufacturer = manufacturer
        ds.ManufacturerModelName = model
        ds.MagneticFieldStrength = _ds1(field_strength)
        ds.RepetitionTime = _ds1(tr)
        ds.EchoTime = _ds1(te)
        if ti is not None:
            ds.InversionTime = _ds1(ti)
        ds.FlipAngle = _ds1(flip_angle)
        ds.PatientPosition = "HFS"
        ds.StudyDate = "20240102"
        ds.SeriesDate = "20240102"
        ds.AcquisitionTime = "101500.000000"
        if phi:
            for keyword, value in PHI_VALUES.items():
                setattr(ds, keyword, value)
        ds.ImageOrientationPatient = _ds(iop)
        position = np.asarray(origin, dtype=float) + s * spacing[2] * series_normal(iop)
        ds.ImagePositionPatient = _ds(position)
        ds.SliceLocation = _ds1(float(np.dot(position, series_normal(iop))))
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])
        ds.SliceThickness = _ds1(spacing[2] if slice_thickness is None else slice_thickness)
        ds.SpacingBetweenSlices = _ds1(spacing[2])
        ds.Rows, ds.Columns = n_rows, n_cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope, ds.RescaleIntercept = "1", "0"
        for keyword, value in {**(tags or {}), **overrides.get(s, {})}.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        rows, cols = int(ds.Rows), int(ds.Columns)
        grid_r, grid_c = np.mgrid[0:rows, 0:cols]
        pixels = 1 + grid_c + n_cols * grid_r + n_cols * n_rows * s
        ds.PixelData = pixels.astype("<u2").tobytes()
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _item(**values: Any) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def write_enhanced_series(
    path: str | Path,
    *,
    shape: tuple[int, int, int] = (16, 16, 12),
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    orientation: str | Sequence[float] = "axial",
    origin: Sequence[float] = (-8.0, -8.0, -6.0),
    description: str = "T1 3D TFE",
    missing: Sequence[int] = (),
    timing: Mapping[str, float] | None = None,
) -> Path:
    """Write one enhanced (multi-frame) MR file, one frame per slice, and return its path.

    Geometry and pixel values follow ``write_dicom_series`` (same ``shape``,
    ``spacing`` and value code); positions and orientation live in the
    per-frame and shared functional groups, as Philips and newer scanners write them.
    ``timing`` (``tr``, ``te``, ``ti``, ``flip`` in ms and degrees) goes into the shared
    MR timing, echo and modifier groups with a gradient-echo pulse sequence, as Siemens
    XA writes an MPRAGE; without it the file carries no timing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n_cols, n_rows, n_slices = shape
    iop = ORIENTATIONS[orientation] if isinstance(orientation, str) else tuple(orientation)
    frames = [s for s in range(n_slices) if s not in set(missing)]
    sop_uid = generate_uid(entropy_srcs=[str(path), "enhanced"])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedMRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = EnhancedMRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[str(path), description])
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[STUDY_UID, "frame"])
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "MR", 3, 1
    ds.SeriesDescription = ds.ProtocolName = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.MRAcquisitionType = "3D"
    ds.Manufacturer = "Acme Imaging"
    ds.PatientPosition = "HFS"
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = n_rows, n_cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 0
    shared = _item(
        PixelMeasuresSequence=DicomSequence(
            [_item(PixelSpacing=_ds([spacing[1], spacing[0]]), SliceThickness=_ds1(spacing[2]))]
        ),
        PlaneOrientationSequence=DicomSequence([_item(ImageOrientationPatient=_ds(iop))]),
        PixelValueTransformationSequence=DicomSequence(
            [_item(RescaleSlope="1", RescaleIntercept="0", RescaleType="US")]
        ),
    )
    if timing:
        shared.MRTimingAndRelatedParametersSequence = DicomSequence(
            [_item(RepetitionTime=timing["tr"], FlipAngle=timing["flip"])]
        )
        shared.MREchoSequence = DicomSequence([_item(EffectiveEchoTime=timing["te"])])
        shared.MRModifierSequence = DicomSequence(
            [_item(InversionRecovery="YES", InversionTimes=[timing["ti"]])]
        )
        ds.EchoPulseSequence = "GRADIENT"
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    normal = series_normal(iop)
    per_frame = []
    for index, s in enumerate(frames):
        position = np.asarray(origin, dtype=float) + s * spacing[2] * normal
        per_frame.append(
            _item(
                PlanePositionSequence=DicomSequence([_item(ImagePositionPatient=_ds(position))]),
                FrameContentSequence=DicomSequence(
                    [_item(InStackPositionNumber=index + 1, StackID="1")]
                ),
            )
        )
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    grid_r, grid_c = np.mgrid[0:n_rows, 0:n_cols]
    pixels = np.stack([1 + grid_c + n_cols * grid_r + n_cols * n_rows * s for s in frames])
    ds.PixelData = pixels.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def write_nifti(
    path: str | Path,
    *,
    shape: tuple[int, ...] = (12, 14, 10),
    zooms: tuple[float, float, float] = (1.0, 1.0, 1.0),
    rotation: np.ndarray | None = None,
) -> Path:
    """Write a small float32 NIfTI with a ramp image and a known affine; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.arange(int(np.prod(shape)), dtype=np.float32).reshape(shape)
    affine = np.eye(4)
    affine[:3, :3] = (np.eye(3) if rotation is None else rotation) @ np.diag(zooms)
    affine[:3, 3] = (-5.0, 7.0, 3.0)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def dicom_series():
    """The ``write_dicom_series`` factory: ``dicom_series(folder, shape=..., ...)``."""
    return write_dicom_series


@pytest.fixture
def enhanced_series():
    """The ``write_enhanced_series`` factory: ``enhanced_series(path, shape=..., missing=...)``."""
    return write_enhanced_series


@pytest.fixture
def nifti_file():
    """The ``write_nifti`` factory: ``nifti_file(path, shape=..., zooms=...)``."""
    return write_nifti
