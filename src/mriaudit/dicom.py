"""Inventory and conversion of one subject folder: DICOM series, or NIfTI files.

``inventory_subject`` reads DICOM headers only (pydicom; pixel data of plain
files stay on disk; compressed files and archives through ``mriaudit.sources``),
groups the files by SeriesInstanceUID, writes one TSV row per series with its
header class (``mriaudit.series``) and selection verdict, chooses the audited
series (the best 3D T1-weighted series by what the headers say, the user's
name rules on top; else the best 2D T1 series with the finding ``2d_only``)
and audits the chosen series' headers: missing or duplicated
slices, non-uniform spacing, mixed orientations or sizes, inconsistent
rescaling, unreadable files, and which identifying tags are filled. A folder
with NIfTI files and no DICOM is a NIfTI subject.

``convert_subject`` converts the chosen series with the dcm2niix binary of the
PyPI package (or copies the chosen NIfTI) into the contract's
``sub-<id>_T1w.nii.gz`` and JSON sidecar, keeping dcm2niix's voxel order and
affine, and strips identifying keys from the sidecar.

PHI: only tag *names* ever leave this module; identifying values are never
logged, stored or returned. Header strings (descriptions, protocols) are stored
as plain data with control characters removed; they are never interpreted.
The subject folder is only read: conversion works on links to (or decompressed
copies of) the chosen files in a private temporary folder.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dcm2niix
import nibabel as nib
import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from mriaudit import series as series_class
from mriaudit import sources
from mriaudit.records import (
    NO_SERIES,
    OK,
    StageError,
    make_record,
    read_record,
    run_stage,
    temporary_sibling,
    write_json,
)
from mriaudit.series import Selection, resolve_rules, select_series

log = logging.getLogger(__name__)

#: Header-audit findings, in the order they are reported.
FINDINGS: tuple[str, ...] = (
    "2d_only",
    "derived_only",
    "post_contrast_only",
    "repeat_series",
    "missing_slices",
    "duplicate_slices",
    "nonuniform_spacing",
    "mixed_orientation",
    "mixed_dimensions",
    "inconsistent_rescale",
    "unreadable_files",
)

#: Findings of the selection itself: notes on what was audited, never a flag.
SELECTION_FINDINGS: tuple[str, ...] = FINDINGS[:4]

#: Identifying DICOM attributes whose presence (never value) is reported.
PHI_TAGS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "MedicalRecordLocator",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "RequestingPhysician",
    "OperatorsName",
    "AccessionNumber",
    "StationName",
    "DeviceSerialNumber",
)

#: Sidecar keys removed after dcm2niix (which writes institution and device keys
#: even with ``-ba y``); keys starting with ``Patient`` (except PatientPosition)
#: and every date are removed as well.
SIDECAR_PHI_KEYS: frozenset[str] = frozenset(
    {
        "InstitutionName",
        "InstitutionAddress",
        "InstitutionalDepartmentName",
        "StationName",
        "DeviceSerialNumber",
        "ReferringPhysicianName",
        "PerformingPhysicianName",
        "OperatorsName",
        "PhysiciansOfRecord",
        "RequestingPhysician",
        "AccessionNumber",
        "StudyID",
    }
)

#: Columns of the series table (``sub-<id>_series.tsv``), one row per series or NIfTI file.
SERIES_COLUMNS: tuple[str, ...] = (
    "kind",
    "series_uid",
    "series_number",
    "path",
    "modality",
    "description",
    "protocol",
    "sequence_name",
    "scanning_sequence",
    "sequence_variant",
    "pulse_sequence",
    "image_type",
    "original",
    "localizer",
    "contrast",
    "post_contrast",
    "contrast_evidence",
    "coverage_mm",
    "core_skew",
    "acquisition",
    "rows",
    "cols",
    "n_slices",
    "pixel_spacing_row",
    "pixel_spacing_col",
    "slice_thickness",
    "slice_spacing",
    "orientation",
    "n_files",
    "n_unreadable",
    "transfer_syntax",
    "manufacturer",
    "model",
    "field_strength",
    "tr",
    "te",
    "ti",
    "flip_angle",
    "missing_slices",
    "duplicate_slices",
    "verdict",
    "reason",
)

METRIC_KEYS: tuple[str, ...] = (
    "hdr_manufacturer",
    "hdr_model",
    "hdr_field_strength",
    "hdr_tr",
    "hdr_te",
    "hdr_ti",
    "hdr_flip_angle",
    "hdr_voxel_x",
    "hdr_voxel_y",
    "hdr_voxel_z",
    "hdr_dim_x",
    "hdr_dim_y",
    "hdr_dim_z",
    "hdr_acquisition",
    "hdr_orientation",
    "hdr_series_description",
    "hdr_n_series",
    "hdr_n_files",
    "hdr_n_unreadable",
    "hdr_n_non_dicom",
    "hdr_missing_slices",
    "hdr_duplicate_slices",
    "hdr_phi_tags",
)

_LOCALIZER = re.compile(
    r"localizer|localiser|scout|survey|3.?plane|aahead|(?<![a-z])loc(?![a-z])", re.IGNORECASE
)
_NIFTI_NOT_IMAGE = re.compile(r"mask|seg|label|lesion|roi|probseg|dseg", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Pixel data and large private elements (Siemens CSA headers) stay on disk, unread.
_DEFER_SIZE = "1 KB"
_POSITION_TOLERANCE_MM = 0.01
_ORIENTATION_TOLERANCE = 1e-3
# A slice normal more than 25 degrees from every axis is called oblique.
_OBLIQUE_COS = float(np.cos(np.radians(25.0)))
_DCM2NIIX_TIMEOUT_S = 900
_OUTPUT_NAME = "series"


# --------------------------------------------------------------------------- values


def _text(value: Any) -> str:
    """A header value as one clean line: multi-values joined with ``\\``, no control characters."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        value = "\\".join(str(v) for v in value)
    return _CONTROL.sub(" ", str(value)).strip()


def _number(value: Any) -> float | None:
    """A finite float from a header value (first of a multi-value), else None."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _numbers(value: Any, count: int) -> tuple[float, ...] | None:
    """``count`` finite floats from a multi-valued header element, else None."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(np.isfinite(numbers)):
        return None
    return numbers


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Read headers without validation warnings: pydicom's messages can quote values (PHI)."""
    previous = pydicom_config.settings.reading_validation_mode
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_config.settings.reading_validation_mode = previous


# ------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class SliceGaps:
    """Slice positions along the normal, summarised.

    ``spacing`` is the median step between distinct positions (mm, None with
    fewer than two); ``missing`` counts the positions absent from gaps that are
    whole multiples of it; ``duplicates`` counts positions seen more than once
    (extra copies); ``nonuniform`` is True when some step is not a whole
    multiple of the median spacing within tolerance.
    """

    n_unique: int
    spacing: float | None
    missing: int
    duplicates: int
    nonuniform: bool


def slice_gaps(distances: Sequence[float] | np.ndarray, *, tolerance_mm: float = 0.01) -> SliceGaps:
    """Audit slice positions (mm along the slice normal, any order).

    Positions closer than ``tolerance_mm`` are the same slice. A step of about
    k times the median spacing means k - 1 missing slices; a step that is not
    within max(0.02 mm, 2 %) of a whole multiple of the median makes the
    spacing non-uniform. Slices missing at either end cannot be seen.
    """
    ordered = np.sort(np.asarray(distances, dtype=float))
    if ordered.size == 0:
        return SliceGaps(0, None, 0, 0, False)
    steps = np.diff(ordered)
    duplicates = int(np.sum(steps <= tolerance_mm))
    steps = steps[steps > tolerance_mm]
    if steps.size == 0:
        return SliceGaps(1, None, 0, duplicates, False)
    spacing = round(float(np.median(steps)), 5)  # positions carry float noise
    multiples = np.maximum(np.rint(steps / spacing), 1.0)
    missing = int(np.sum(multiples - 1.0))
    residual = np.abs(steps - multiples * spacing)
    nonuniform = bool(np.any(residual > max(0.02, 0.02 * spacing)))
    return SliceGaps(int(steps.size + 1), spacing, missing, duplicates, nonuniform)


def orientation_label(normal: Sequence[float] | np.ndarray) -> str:
    """``axial``, ``sagittal`` or ``coronal`` after the axis nearest the slice normal.

    ``oblique`` when the normal is more than 25 degrees from every axis. The
    normal may be in LPS (DICOM) or RAS (NIfTI): only absolute components count.
    """
    vector = np.abs(np.asarray(normal, dtype=float))
    norm = float(np.linalg.norm(vector))
    if norm == 0 or not np.isfinite(norm):
        return ""
    vector /= norm
    axis = int(np.argmax(vector))
    if vector[axis] < _OBLIQUE_COS:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


# ------------------------------------------------------------------------ scanning


@dataclass
class _Slice:
    """One image frame: a single-frame file or one frame of a multi-frame file."""

    file: str
    position: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    shape: tuple[int, int] | None
    pixel_spacing: tuple[float, ...] | None
    rescale: tuple[float, float]
    volume: str


@dataclass
class _Series:
    uid: str
    header: dict[str, Any]
    slices: list[_Slice] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    unusable: list[str] = field(default_factory=list)  # header read, pixel data not usable


@dataclass
class _Scan:
    """Everything found in one subject folder (paths relative to it, POSIX style)."""

    n_files: int = 0
    non_dicom: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    nifti: list[str] = field(default_factory=list)
    series: dict[str, _Series] = field(default_factory=dict)
    phi_tags: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)


def _read_header(entry: sources.Entry) -> tuple[str, Dataset | None, int]:
    """Classify a file as ``dicom`` (with its header), ``non_dicom`` or ``unreadable``,
    with its size in bytes (decompressed).

    A file is DICOM when it carries the ``DICM`` prefix (``force=False``
    semantics); an empty file, one that cannot be opened or decompressed, or a
    DICOM file whose header does not parse is unreadable. Pixel data of a plain
    file are never loaded: every value over ``_DEFER_SIZE`` (pixel data
    included) stays on disk, and only its offset and length are read, which is
    what reveals a truncated file; a compressed file or archive member is read
    from its decompressed bytes. Error messages are not kept: pydicom's can
    quote header values.
    """
    try:
        if entry.path is not None:
            size = entry.path.stat().st_size
            with entry.path.open("rb") as handle:
                prefix = handle.read(132)
            source: Any = entry.path
        else:
            data = entry.read() if entry.read is not None else b""
            size, prefix, source = len(data), data[:132], io.BytesIO(data)
    except sources.READ_ERRORS as error:
        log.warning("unreadable file: %s (%s)", Path(entry.rel).name, type(error).__name__)
        return "unreadable", None, 0
    if not prefix:
        return "unreadable", None, size
    if len(prefix) < 132 or prefix[128:132] != b"DICM":
        return "non_dicom", None, size
    try:
        defer = _DEFER_SIZE if entry.path is not None else None
        dataset = pydicom.dcmread(source, defer_size=defer, force=False)
    except Exception as error:
        log.warning("unreadable DICOM header: %s (%s)", Path(entry.rel).name, type(error).__name__)
        return "unreadable", None, size
    return "dicom", dataset, size


def _sop_class(dataset: Dataset) -> str:
    meta = dataset.file_meta if dataset.file_meta else {}
    return _text(meta.get("MediaStorageSOPClassUID") or dataset.get("SOPClassUID"))


_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_FLOAT_PIXEL_DATA = (Tag(0x7FE0, 0x0008), Tag(0x7FE0, 0x0009))


def _pixel_problem(dataset: Dataset, size: int) -> str:
    """Why an image file's pixel data cannot be used ("" when they look complete).

    Checks, without reading them, that an image (one with ``Rows``) has pixel
    data and that a defined-length pixel element ends within the file (``size``
    in bytes).
    """
    if "Rows" not in dataset:
        return ""
    if _PIXEL_DATA not in dataset:
        return "" if any(t in dataset for t in _FLOAT_PIXEL_DATA) else "no pixel data"
    raw = dataset.get_item(_PIXEL_DATA, keep_deferred=True)
    length = getattr(raw, "length", None)
    offset = getattr(raw, "value_tell", None)
    if length is None or offset is None or length == 0xFFFFFFFF:
        return ""  # encapsulated (compressed) pixel data: dcm2niix judges those
    return "truncated pixel data" if offset + length > size else ""


def _header_fields(dataset: Dataset) -> dict[str, Any]:
    """Descriptive, non-identifying header fields of one file."""
    image_type = [_text(v).upper() for v in dataset.get("ImageType", []) or []]
    syntax = dataset.file_meta.get("TransferSyntaxUID") if dataset.file_meta else None
    field_strength = _number(dataset.get("MagneticFieldStrength"))
    if field_strength is not None and field_strength > 20:
        field_strength /= 10000.0  # some exports store gauss
    series_number = _number(dataset.get("SeriesNumber"))
    enhanced = _enhanced_timing(dataset)
    return {
        "modality": _text(dataset.get("Modality")),
        "description": _text(dataset.get("SeriesDescription")),
        "protocol": _text(dataset.get("ProtocolName")),
        "sequence_name": _text(dataset.get("SequenceName")),
        "pulse_sequence": _text(dataset.get("PulseSequenceName") or _private(dataset)),
        "scanning_sequence": _text(dataset.get("ScanningSequence")) or enhanced["scanning"],
        "sequence_variant": _text(dataset.get("SequenceVariant")),
        "image_type": image_type,
        "acquisition": _text(dataset.get("MRAcquisitionType")).upper(),
        "manufacturer": _text(dataset.get("Manufacturer")),
        "model": _text(dataset.get("ManufacturerModelName")),
        "field_strength": field_strength,
        "tr": _number(dataset.get("RepetitionTime")) or enhanced["tr"],
        "te": _number(dataset.get("EchoTime")) or enhanced["te"],
        "ti": _number(dataset.get("InversionTime")) or enhanced["ti"],
        "flip_angle": _number(dataset.get("FlipAngle")) or enhanced["flip_angle"],
        "contrast_agent": _text(dataset.get("ContrastBolusAgent")),
        "series_number": None if series_number is None else int(series_number),
        "slice_thickness": _number(dataset.get("SliceThickness")),
        "spacing_between_slices": _number(dataset.get("SpacingBetweenSlices")),
        "transfer_syntax": "" if syntax is None else _text(syntax.name),
    }


#: GE's private pulse sequence name (``efgre3d``, ``fsfgre``), where pydicom exposes it.
_GE_PULSE_SEQUENCE = Tag(0x0019, 0x109C)


def _private(dataset: Dataset) -> Any:
    element = dataset.get(_GE_PULSE_SEQUENCE)
    value = None if element is None else element.value
    # Without a private dictionary the value may come as raw bytes (VR UN).
    return value.decode("ascii", "replace").strip("\0 ") if isinstance(value, bytes) else value


def _enhanced_timing(dataset: Dataset) -> dict[str, Any]:
    """TR, TE, TI (ms), flip angle and the sequence families of an enhanced (multi-frame)
    MR file, whose timings live in functional groups (first frame, then shared)."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    groups = (
        per_frame[0] if per_frame else None,
        _first_item(dataset, "SharedFunctionalGroupsSequence"),
    )
    inversion = _functional(groups, "MRModifierSequence", "InversionTimes")
    if isinstance(inversion, (list, tuple, MultiValue)):
        inversion = inversion[0] if len(inversion) else None
    families = []
    echo = _text(dataset.get("EchoPulseSequence")).upper()
    families += ["GR"] if echo in ("GRADIENT", "BOTH") else []
    families += ["SE"] if echo in ("SPIN", "BOTH") else []
    recovery = _text(dataset.get("InversionRecovery")).upper()
    recovery = (
        recovery or _text(_functional(groups, "MRModifierSequence", "InversionRecovery")).upper()
    )
    families += ["IR"] if recovery == "YES" else []
    return {
        "tr": _number(
            _functional(groups, "MRTimingAndRelatedParametersSequence", "RepetitionTime")
        ),
        "te": _number(_functional(groups, "MREchoSequence", "EffectiveEchoTime")),
        "ti": _number(inversion),
        "flip_angle": _number(
            _functional(groups, "MRTimingAndRelatedParametersSequence", "FlipAngle")
        ),
        "scanning": "\\".join(families),
    }


def _first_item(container: Any, keyword: str) -> Dataset | None:
    sequence = container.get(keyword) if container is not None else None
    return sequence[0] if sequence else None


def _functional(groups: Sequence[Dataset | None], sequence: str, keyword: str) -> Any:
    """A value from the first functional group (per-frame, then shared) that has it."""
    for group in groups:
        item = _first_item(group, sequence)
        if item is not None and keyword in item:
            return item.get(keyword)
    return None


#: Most frames believed from one file's NumberOfFrames (16 bits of frame count).
MAX_FRAMES = 65536


def _slices(dataset: Dataset, rel: str) -> list[_Slice]:
    """The frames of one file; enhanced multi-frame files give one entry per frame."""
    shape = None
    if "Rows" in dataset and "Columns" in dataset:
        with contextlib.suppress(TypeError, ValueError):
            shape = (int(dataset.Rows), int(dataset.Columns))
    # A corrupt NumberOfFrames (say 99999999) must not build millions of entries.
    n_frames = min(max(int(_number(dataset.get("NumberOfFrames")) or 1), 1), MAX_FRAMES)
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    shared = _first_item(dataset, "SharedFunctionalGroupsSequence")
    if n_frames > 1 and per_frame is not None and len(per_frame) == n_frames:
        frames = []
        for item in per_frame:
            groups = (item, shared)
            slope = _number(_functional(groups, "PixelValueTransformationSequence", "RescaleSlope"))
            intercept = _number(
                _functional(groups, "PixelValueTransformationSequence", "RescaleIntercept")
            )
            echo = _number(_functional(groups, "MREchoSequence", "EffectiveEchoTime"))
            temporal = _functional(groups, "FrameContentSequence", "TemporalPositionIndex")
            frames.append(
                _Slice(
                    file=rel,
                    position=_numbers(
                        _functional(groups, "PlanePositionSequence", "ImagePositionPatient"), 3
                    ),
                    orientation=_numbers(
                        _functional(groups, "PlaneOrientationSequence", "ImageOrientationPatient"),
                        6,
                    ),
                    shape=shape,
                    pixel_spacing=_numbers(
                        _functional(groups, "PixelMeasuresSequence", "PixelSpacing"), 2
                    ),
                    rescale=(1.0 if slope is None else slope, intercept or 0.0),
                    volume=f"{'' if echo is None else f'{echo:g}'}|{_text(temporal)}",
                )
            )
        return frames
    slope = _number(dataset.get("RescaleSlope"))
    intercept = _number(dataset.get("RescaleIntercept"))
    # Echoes, time points and repeated acquisitions are separate volumes, not duplicates.
    volume = "|".join(
        _text(dataset.get(keyword))
        for keyword in (
            "EchoNumbers",
            "EchoTime",
            "TemporalPositionIdentifier",
            "AcquisitionNumber",
        )
    )
    position = _numbers(dataset.get("ImagePositionPatient"), 3) if n_frames == 1 else None
    return [
        _Slice(
            file=rel,
            position=position,
            orientation=_numbers(dataset.get("ImageOrientationPatient"), 6),
            shape=shape,
            pixel_spacing=_numbers(dataset.get("PixelSpacing"), 2),
            rescale=(1.0 if slope is None else slope, intercept or 0.0),
            volume=volume,
        )
        for _ in range(n_frames)
    ]


def _filled_phi_tags(dataset: Dataset) -> set[str]:
    """Names of identifying attributes holding a non-empty value (values are not kept)."""
    return {keyword for keyword in PHI_TAGS if _text(dataset.get(keyword))}


def _scan_folder(subject_dir: Path) -> _Scan:
    """Walk ``subject_dir`` (any depth, symlinked folders not followed, compressed files
    and archives opened; see ``mriaudit.sources``) and read DICOM headers."""
    scan = _Scan()
    with _quiet_pydicom():
        for entry in sources.walk(subject_dir, on_error=scan.problems.append):
            rel = entry.rel
            scan.n_files += 1
            if entry.path is not None and sources.is_nifti(entry.path.name):
                scan.nifti.append(rel)
                continue
            kind, dataset, size = _read_header(entry)
            if kind == "non_dicom":
                scan.non_dicom.append(rel)
                continue
            if kind == "unreadable" or dataset is None:
                scan.unreadable.append(rel)
                continue
            try:
                uid = _text(dataset.get("SeriesInstanceUID"))
                if not uid:
                    # DICOMDIR and other objects with a SOP class but no series are not
                    # images; a "DICM" file without a SOP class, or whose data set ends
                    # right after its file meta (a header cut off), is damaged.
                    damaged = len(dataset) == 0 or not _sop_class(dataset)
                    (scan.unreadable if damaged else scan.non_dicom).append(rel)
                    continue
                # Everything that can fail on a malformed attribute runs before the file
                # joins a series, so a file is either in its series or counted unreadable.
                phi_tags = _filled_phi_tags(dataset)
                fields = _header_fields(dataset)
                problem = _pixel_problem(dataset, size)
                slices = [] if problem else _slices(dataset, rel)
                scan.phi_tags |= phi_tags
                series = scan.series.setdefault(uid, _Series(uid, fields))
                series.files.append(rel)
                if problem:
                    log.warning("unusable DICOM file: %s (%s)", rel, problem)
                    series.unusable.append(rel)
                    scan.unreadable.append(rel)
                    continue
                series.slices.extend(slices)
            except Exception as error:
                # One file with a malformed attribute must not end the inventory; the
                # message may quote header values, so only its type is logged.
                log.warning("unusable DICOM file: %s (%s)", rel, type(error).__name__)
                scan.unreadable.append(rel)
    return scan


# ------------------------------------------------------------------ series summary


@dataclass(frozen=True)
class _Geometry:
    orientation: tuple[float, ...] | None
    normal: np.ndarray | None
    shape: tuple[int, int] | None
    pixel_spacing: tuple[float, ...] | None
    n_slices: int
    gaps: SliceGaps
    mixed_orientation: bool
    mixed_dimensions: bool
    inconsistent_rescale: bool


def _most_common(values: list[Any]) -> Any:
    known = [v for v in values if v is not None]
    return Counter(known).most_common(1)[0][0] if known else None


def _series_geometry(series: _Series) -> _Geometry:
    """Slice grid of a series: main orientation, in-plane size, and the slice-position audit."""
    slices = series.slices
    rounded = [None if s.orientation is None else tuple(np.round(s.orientation, 3)) for s in slices]
    main_key = _most_common(rounded)
    main = next(
        (s.orientation for s, r in zip(slices, rounded, strict=True) if r == main_key), None
    )
    mixed_orientation = main is not None and any(
        s.orientation is not None
        and float(np.max(np.abs(np.subtract(s.orientation, main)))) > _ORIENTATION_TOLERANCE
        for s in slices
    )
    shapes = {s.shape for s in slices if s.shape is not None}
    spacings = {tuple(np.round(s.pixel_spacing, 3)) for s in slices if s.pixel_spacing}
    rescales = {(round(a, 6), round(b, 6)) for a, b in (s.rescale for s in slices)}
    normal = None
    gaps = SliceGaps(0, None, 0, 0, False)
    if main is not None:
        normal = np.cross(main[:3], main[3:])
        normal = normal / (np.linalg.norm(normal) or 1.0)
        on_grid = [
            s
            for s, r in zip(slices, rounded, strict=True)
            if r == main_key and s.position is not None
        ]
        gaps = _volume_aware_gaps(on_grid, normal)
    n_slices = gaps.n_unique if gaps.n_unique else len(slices)
    return _Geometry(
        orientation=main,
        normal=normal,
        shape=_most_common([s.shape for s in slices]),
        pixel_spacing=_most_common([s.pixel_spacing for s in slices]),
        n_slices=n_slices,
        gaps=gaps,
        mixed_orientation=mixed_orientation,
        mixed_dimensions=len(shapes) > 1 or len(spacings) > 1,
        inconsistent_rescale=len(rescales) > 1,
    )


def _volume_aware_gaps(slices: list[_Slice], normal: np.ndarray) -> SliceGaps:
    """``slice_gaps`` where each echo, time point or acquisition is its own volume.

    Positions repeated across volumes are not duplicates; repeated within one are.
    """
    distances = np.array([float(np.dot(s.position, normal)) for s in slices])
    if distances.size == 0:
        return SliceGaps(0, None, 0, 0, False)
    overall = slice_gaps(distances, tolerance_mm=_POSITION_TOLERANCE_MM)
    volumes = sorted({s.volume for s in slices})
    if len(volumes) < 2:
        return overall
    duplicates = 0
    for volume in volumes:
        group = distances[[s.volume == volume for s in slices]]
        duplicates += slice_gaps(group, tolerance_mm=_POSITION_TOLERANCE_MM).duplicates
    return SliceGaps(
        overall.n_unique, overall.spacing, overall.missing, duplicates, overall.nonuniform
    )


def _slice_positions(series: _Series, normal: np.ndarray, skip: set[str]) -> list[float]:
    """Distinct slice positions (mm along ``normal``, ascending) of the files kept for conversion."""
    distances = sorted(
        float(np.dot(s.position, normal))
        for s in series.slices
        if s.position is not None and s.file not in skip
    )
    distinct = [
        d
        for i, d in enumerate(distances)
        if i == 0 or d - distances[i - 1] > _POSITION_TOLERANCE_MM
    ]
    return [round(d, 4) for d in distinct]


def _common_folder(files: list[str]) -> str:
    folders = [str(Path(f).parent) for f in files]
    if not folders:
        return ""
    common = os.path.commonpath(folders)
    return "" if common == "." else common


def _series_row(series: _Series, geometry: _Geometry, rules: dict[str, Any]) -> dict[str, Any]:
    """One row of the series table (selection verdict filled in later)."""
    header = series.header
    image_type = header["image_type"]
    original = image_type[0] if image_type and image_type[0] in ("ORIGINAL", "DERIVED") else ""
    names = " ".join([header["description"], header["protocol"]])
    localizer = "LOCALIZER" in image_type or bool(_LOCALIZER.search(names))
    spacing = geometry.gaps.spacing or header["spacing_between_slices"] or header["slice_thickness"]
    thickness = header["slice_thickness"]
    acquisition = header["acquisition"] if header["acquisition"] in ("2D", "3D") else ""
    if not acquisition and (thickness or spacing):
        thin = max(thickness or 0.0, spacing or 0.0) <= rules["max_slice_thickness_3d"]
        acquisition = "3D" if thin else "2D"
    pixel_spacing = geometry.pixel_spacing
    row = {
        "kind": "dicom",
        "series_uid": series.uid,
        "series_number": header["series_number"],
        "path": _common_folder(series.files),
        "modality": header["modality"],
        "description": header["description"],
        "protocol": header["protocol"],
        "sequence_name": header["sequence_name"],
        "scanning_sequence": header["scanning_sequence"],
        "sequence_variant": header["sequence_variant"],
        "pulse_sequence": header["pulse_sequence"],
        "contrast_agent": header["contrast_agent"],
        "image_type": "\\".join(image_type),
        "original": original,
        "localizer": localizer,
        "acquisition": acquisition,
        "rows": None if geometry.shape is None else geometry.shape[0],
        "cols": None if geometry.shape is None else geometry.shape[1],
        "n_slices": geometry.n_slices,
        "pixel_spacing_row": None if pixel_spacing is None else pixel_spacing[0],
        "pixel_spacing_col": None if pixel_spacing is None else pixel_spacing[1],
        "slice_thickness": thickness,
        "slice_spacing": spacing,
        "orientation": "" if geometry.normal is None else orientation_label(geometry.normal),
        "n_files": len(series.files),
        "n_unreadable": len(series.unusable),
        "transfer_syntax": header["transfer_syntax"],
        "manufacturer": header["manufacturer"],
        "model": header["model"],
        "field_strength": header["field_strength"],
        "tr": header["tr"],
        "te": header["te"],
        "ti": header["ti"],
        "flip_angle": header["flip_angle"],
        "missing_slices": geometry.gaps.missing,
        "duplicate_slices": geometry.gaps.duplicates,
        "verdict": "",
        "reason": "",
    }
    return _classified(row)


def _coverage_mm(row: dict[str, Any]) -> float | None:
    """The smallest extent (mm) of the box a series' slices span."""
    extents = [
        (row.get("rows") or 0) * (row.get("pixel_spacing_row") or 0.0),
        (row.get("cols") or 0) * (row.get("pixel_spacing_col") or 0.0),
        (row.get("n_slices") or 0) * (row.get("slice_spacing") or 0.0),
    ]
    return round(min(extents), 1) if all(e > 0 for e in extents) else None


def _classified(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its header class (``class``, and the table's ``contrast``,
    ``post_contrast``, ``contrast_evidence``) and ``coverage_mm``."""
    kind = series_class.classify(row)
    row.update(
        {
            "class": kind,
            "contrast": kind.contrast,
            "post_contrast": kind.post_contrast,
            "contrast_evidence": kind.why,
            "coverage_mm": _coverage_mm(row),
        }
    )
    return row


# ----------------------------------------------------------------------- selection


def _no_series_reason(scan: _Scan, rows: list[dict[str, Any]]) -> str:
    """A short, human-readable reason why a subject has no usable T1 series."""
    if scan.n_files == 0:
        return "folder is empty"
    if not rows:
        parts = []
        if scan.non_dicom:
            parts.append(_plural(len(scan.non_dicom), "non-DICOM file"))
        if scan.unreadable:
            parts.append(_plural(len(scan.unreadable), "unreadable file"))
        detail = f" ({', '.join(parts)})" if parts else ""
        readable = "readable " if scan.unreadable else ""
        return f"no {readable}DICOM or NIfTI files{detail}"
    if all(r["localizer"] for r in rows):
        return (
            "only a localizer series" if len(rows) == 1 else f"only localizer series ({len(rows)})"
        )
    reasons = Counter(r["reason"].split(" (")[0].split(", ")[0] for r in rows)
    summary = ", ".join(f"{reason}: {count}" for reason, count in reasons.most_common())
    reason = f"no usable T1-weighted series among {len(rows)} series ({summary})"
    return reason[:300]


# ------------------------------------------------------------------------ NIfTI


def _bids_sidecar(path: Path) -> dict[str, Any]:
    """Non-identifying acquisition fields of a BIDS sidecar next to a NIfTI file, if any."""
    name = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".gz") else path.stem
    sidecar = path.with_name(name + ".json")
    if not sidecar.is_file():
        return {}
    try:
        data = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}

    def ms(key: str) -> float | None:
        seconds = _number(data.get(key))
        return None if seconds is None else seconds * 1000.0  # BIDS times are in seconds

    return {
        "manufacturer": _text(data.get("Manufacturer")),
        "model": _text(data.get("ManufacturersModelName")),
        "field_strength": _number(data.get("MagneticFieldStrength")),
        "tr": ms("RepetitionTime"),
        "te": ms("EchoTime"),
        "ti": ms("InversionTime"),
        "flip_angle": _number(data.get("FlipAngle")),
        "description": _text(data.get("SeriesDescription")),
        "acquisition": _text(data.get("MRAcquisitionType")).upper(),
    }


def _nifti_row(subject_dir: Path, rel: str, rules: dict[str, Any]) -> dict[str, Any]:
    """Series-table row of one NIfTI file (header only; the data are not loaded)."""
    row = dict.fromkeys(SERIES_COLUMNS)
    row.update(kind="nifti", path=rel, n_files=1, n_unreadable=0, verdict="", reason="")
    path = subject_dir / rel
    try:
        image = nib.load(path)
        shape = tuple(int(n) for n in image.shape)
        zooms = tuple(float(z) for z in image.header.get_zooms())
        affine = image.affine
    except Exception as error:
        log.warning("unreadable NIfTI: %s (%s)", rel, type(error).__name__)
        row.update(n_unreadable=1, verdict="rejected", reason="unreadable NIfTI")
        return row
    sidecar = _bids_sidecar(path)
    row.update({k: v for k, v in sidecar.items() if v not in ("", None)})
    if len(shape) >= 3:
        thickness = zooms[2]
        row.update(
            cols=shape[0],
            rows=shape[1],
            n_slices=shape[2],
            pixel_spacing_col=zooms[0],
            pixel_spacing_row=zooms[1],
            slice_thickness=thickness,
            slice_spacing=thickness,
            orientation=orientation_label(affine[:3, 2]),
        )
        if row["acquisition"] not in ("2D", "3D"):
            thin = max(zooms[:3]) <= rules["max_slice_thickness_3d"]
            row["acquisition"] = "3D" if thin else "2D"
    row["shape"] = shape
    # A singular or non-finite affine gives voxels no place in the world: no
    # registration, no sizes in mm.
    linear = np.asarray(affine, dtype=float)[:3, :3]
    row["geometry_ok"] = bool(
        np.all(np.isfinite(affine)) and abs(float(np.linalg.det(linear))) > 1e-9
    )
    if len(shape) >= 3 and min(shape[:3]) >= 8:
        # What the image itself says of its contrast (a check of its name).
        try:
            volume = image.dataobj[..., 0] if len(shape) > 3 else image.dataobj
            row["core_skew"] = round(series_class.core_skew(volume, zooms[:3]), 3)
        except Exception as error:
            log.warning(
                "NIfTI data unreadable for the contrast check: %s (%s)", rel, type(error).__name__
            )
    return row


def choose_nifti(rows: list[dict[str, Any]]) -> tuple[int | None, str]:
    """Index of the NIfTI row to audit and why.

    A 3D (or 4D) image with at least 2 voxels per axis and an invertible, finite
    affine is eligible, unless its BIDS suffix or name declares another contrast
    (``_T2w``, ``_FLAIR``, ``_dwi``, ``t2_tse``: ``series.file_class``), which
    rejects it with that reason. With one eligible file, it is chosen. With several,
    files whose name says T1w/T1 (``sub-01_T1w``, ``t1``; not ``t1c``) win over
    the others, names that look like masks or labels lose, then the largest
    image wins.
    """

    def is_volume(row: dict[str, Any]) -> bool:
        shape = row.get("shape")
        return bool(shape) and len(shape) >= 3 and min(shape[:3]) >= 2

    def name(i: int) -> str:
        return Path(rows[i]["path"]).name

    eligible = []
    for i, row in enumerate(rows):
        if row["verdict"]:
            continue
        contrast, how = series_class.file_class(name(i))
        row["contrast"] = contrast
        if not is_volume(row):
            shape = "x".join(str(n) for n in row.get("shape") or ())
            row.update(verdict="rejected", reason=f"not a 3D image ({shape or 'no shape'})")
        elif not row["geometry_ok"]:
            row.update(verdict="rejected", reason="affine not invertible or not finite")
        elif contrast and contrast != "T1w":
            reason = f"a {contrast} image ({how}), not T1w"
            if contrast == "T2w" and _looks(row) == "T1w":
                reason += f"; but its intensities look T1-weighted ({_SKEW_WORDS}): check its name"
            row.update(verdict="rejected", reason=reason)
        else:
            eligible.append(i)
    if not eligible:
        return None, ""
    if len(eligible) == 1:
        path = rows[eligible[0]]["path"]
        if len(rows) == 1:
            return eligible[0], f"only NIfTI image ({path})"
        return eligible[0], f"the one T1w candidate among {len(rows)} NIfTI images ({path})"

    def key(i: int) -> tuple[Any, ...]:
        says_t1 = rows[i]["contrast"] == "T1w"
        not_image = bool(_NIFTI_NOT_IMAGE.search(name(i)))
        return (not says_t1, not_image, -int(np.prod(rows[i]["shape"][:3])), rows[i]["path"])

    ordered = sorted(eligible, key=key)
    best = ordered[0]
    named = [i for i in eligible if rows[i]["contrast"] == "T1w"]
    if len(named) == 1:
        why = f"name says T1 ({name(best)}) among {len(eligible)} NIfTI images"
    elif named:
        why = f"{len(named)} NIfTI names say T1; chose the largest ({name(best)})"
    else:
        why = f"no NIfTI name says T1w/T1; chose the largest image ({name(best)})"
    for i in ordered[1:]:
        rows[i].update(verdict="rejected", reason=f"ranked below {name(best)}")
    return best, why


_SKEW_WORDS = "CSF darker than white matter"


def _looks(row: dict[str, Any]) -> str:
    skew = row.get("core_skew")
    return series_class.contrast_look(float(skew)) if skew is not None else ""


def _no_nifti_reason(rows: list[dict[str, Any]]) -> str:
    """Why no NIfTI image of a subject is audited as its T1w, in a curator's words."""
    contrasts = Counter(
        r.get("contrast") for r in rows if r.get("contrast") not in ("", None, "T1w")
    )
    if contrasts and sum(contrasts.values()) == len(rows):
        if len(rows) == 1:
            hint = (
                ": its intensities look T1-weighted, check its name"
                if "look T1" in rows[0]["reason"]
                else ""
            )
            return (
                f"only a {next(iter(contrasts))} image ({Path(rows[0]['path']).name}), no T1w{hint}"
            )
        listed = ", ".join(f"{c}: {n}" for c, n in contrasts.most_common())
        return f"no T1w image among {_plural(len(rows), 'NIfTI file')} ({listed})"
    verdicts = Counter(r["reason"] for r in rows)
    summary = ", ".join(f"{why}: {count}" for why, count in verdicts.most_common())
    return f"no usable 3D NIfTI image among {_plural(len(rows), 'file')} ({summary})"


# ----------------------------------------------------------------------- outputs


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    return _text(value)


def write_series_table(rows: list[dict[str, Any]], path: Path) -> None:
    """Write the series table atomically: tab-separated, header line, one line per series.

    Cells never hold tabs or newlines (header strings are cleaned), so every
    row is one line; quotes are CSV-escaped.
    """
    fd, tmp = temporary_sibling(path)
    try:
        # backslashreplace: folder names that are not valid UTF-8 still write.
        with os.fdopen(fd, "w", newline="", encoding="utf-8", errors="backslashreplace") as handle:
            writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
            writer.writerow(SERIES_COLUMNS)
            for row in rows:
                writer.writerow([_cell(row.get(column)) for column in SERIES_COLUMNS])
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _base_metrics(scan: _Scan, n_series: int) -> dict[str, Any]:
    metrics: dict[str, Any] = dict.fromkeys(METRIC_KEYS)
    metrics.update(
        hdr_n_series=n_series,
        hdr_n_files=scan.n_files,
        hdr_n_unreadable=len(scan.unreadable),
        hdr_n_non_dicom=len(scan.non_dicom),
        hdr_phi_tags=",".join(sorted(scan.phi_tags)),
    )
    return metrics


def _row_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """The ``hdr_*`` acquisition metrics of the audited row (mm, ms, degrees, tesla)."""
    return {
        "hdr_manufacturer": row.get("manufacturer") or None,
        "hdr_model": row.get("model") or None,
        "hdr_field_strength": row.get("field_strength"),
        "hdr_tr": row.get("tr"),
        "hdr_te": row.get("te"),
        "hdr_ti": row.get("ti"),
        "hdr_flip_angle": row.get("flip_angle"),
        "hdr_voxel_x": row.get("pixel_spacing_col"),
        "hdr_voxel_y": row.get("pixel_spacing_row"),
        "hdr_voxel_z": row.get("slice_spacing"),
        "hdr_dim_x": row.get("cols"),
        "hdr_dim_y": row.get("rows"),
        "hdr_dim_z": row.get("n_slices"),
        "hdr_acquisition": row.get("acquisition") or None,
        "hdr_orientation": row.get("orientation") or None,
        "hdr_series_description": row.get("description") or None,
    }


def _series_findings(
    scan: _Scan, series: _Series, geometry: _Geometry, *, notes: Sequence[str]
) -> tuple[list[str], int]:
    """Header-audit findings of the chosen series and its count of unreadable files.

    Files that could not be read at all have no known series: they count for the
    chosen series when they sit in one of its folders.
    """
    folders = {str(Path(f).parent) for f in series.files}
    unreadable = set(series.unusable) | {
        f for f in scan.unreadable if str(Path(f).parent) in folders
    }
    present = {
        **{name: name in notes for name in SELECTION_FINDINGS},
        "missing_slices": geometry.gaps.missing > 0,
        "duplicate_slices": geometry.gaps.duplicates > 0,
        "nonuniform_spacing": geometry.gaps.nonuniform,
        "mixed_orientation": geometry.mixed_orientation,
        "mixed_dimensions": geometry.mixed_dimensions,
        "inconsistent_rescale": geometry.inconsistent_rescale,
        "unreadable_files": bool(unreadable),
    }
    return [name for name in FINDINGS if present[name]], len(unreadable)


def _dicom_record(
    scan: _Scan,
    rows: list[dict[str, Any]],
    geometries: dict[str, _Geometry],
    selection: Selection,
    warnings_: list[str],
) -> dict[str, Any]:
    uid = str(selection.uid)
    series = scan.series[uid]
    row = next(r for r in rows if r["series_uid"] == uid)
    findings, n_unreadable = _series_findings(
        scan, series, geometries[uid], notes=selection.findings
    )
    metrics = _base_metrics(scan, len(rows))
    metrics.update(_row_metrics(row))
    metrics.update(
        hdr_missing_slices=row["missing_slices"], hdr_duplicate_slices=row["duplicate_slices"]
    )
    if n_unreadable:
        warnings_.append(f"{_plural(n_unreadable, 'unreadable file')} next to the audited series")
    truncated = set(series.unusable)
    why = selection.verdicts[uid][1]
    geometry = geometries[uid]
    log.info(
        "selected series %s (%s): %s, %d slices; findings: %s",
        row["series_number"],
        row["description"],
        why,
        row["n_slices"],
        ", ".join(findings) or "none",
    )
    selected = {
        "kind": "dicom",
        "series_uid": uid,
        "files": sorted(f for f in series.files if f not in truncated),
        "description": row["description"],
        "why": why,
    }
    if geometry.gaps.missing and not geometry.gaps.nonuniform and geometry.normal is not None:
        # Convert puts the absent slices back as zeros at their positions.
        selected["slice_normal_lps"] = [float(v) for v in geometry.normal]
        selected["slice_positions_mm"] = _slice_positions(series, geometry.normal, truncated)
        selected["slice_spacing_mm"] = geometry.gaps.spacing
    return make_record(
        "inventory",
        status=OK,
        findings=findings,
        metrics=metrics,
        warnings=warnings_,
        selected=selected,
    )


def _nifti_record(
    subject_dir: Path,
    scan: _Scan,
    rules: dict[str, Any],
    warnings_: list[str],
    dicom_rows: list[dict[str, Any]],
    series_table: Path,
) -> dict[str, Any]:
    rows = [_nifti_row(subject_dir, rel, rules) for rel in scan.nifti]
    unreadable = [r["path"] for r in rows if r["n_unreadable"]]
    scan.unreadable.extend(unreadable)
    index, why = choose_nifti(rows)
    metrics = _base_metrics(scan, len(dicom_rows) + len(rows))
    if index is None:
        write_series_table(dicom_rows + rows, series_table)
        reason = _no_nifti_reason(rows)
        return make_record(
            "inventory", status=NO_SERIES, reason=reason, metrics=metrics, warnings=warnings_
        )
    row = rows[index]
    row.update(verdict="selected", reason=why)
    if _looks(row) == "T2w":
        warnings_.append(
            f"{Path(row['path']).name}: its intensities look T2-weighted (CSF brighter than"
            " white matter), not like the T1w audited"
        )
    write_series_table(dicom_rows + rows, series_table)
    metrics.update(_row_metrics(row))
    metrics.update(hdr_missing_slices=0, hdr_duplicate_slices=0)
    if not metrics["hdr_series_description"]:
        metrics["hdr_series_description"] = Path(row["path"]).name
    findings = []
    if (
        max(row["pixel_spacing_col"], row["pixel_spacing_row"], row["slice_thickness"])
        > rules["max_slice_thickness_3d"]
    ):
        findings.append("2d_only")
    if unreadable:
        findings.append("unreadable_files")
    log.info("NIfTI subject: %s", why)
    selected = {"kind": "nifti", "files": [row["path"]], "description": why}
    return make_record(
        "inventory",
        status=OK,
        findings=findings,
        metrics=metrics,
        warnings=warnings_,
        selected=selected,
    )


def _inventory(subject_dir: Path, series_table: Path, rules: dict[str, Any]) -> dict[str, Any]:
    if not (subject_dir.is_dir() or sources.is_subject_archive(subject_dir)):
        message = f"subject folder not found: {subject_dir.name}"
        raise StageError(message)
    rules = resolve_rules(rules)
    scan = _scan_folder(subject_dir)
    warnings_ = list(scan.problems)
    log.info(
        "%d files: %d DICOM series, %d NIfTI, %d non-DICOM, %d unreadable",
        scan.n_files,
        len(scan.series),
        len(scan.nifti),
        len(scan.non_dicom),
        len(scan.unreadable),
    )
    geometries = {uid: _series_geometry(s) for uid, s in scan.series.items()}
    rows = [_series_row(scan.series[uid], geometries[uid], rules) for uid in scan.series]
    rows.sort(key=lambda r: (r["series_number"] is None, r["series_number"] or 0, r["series_uid"]))
    chosen = series_class.chosen_series(rules, sources.archive_stem(subject_dir.name))
    # The user's choice that names no usable series ends the subject with its own reason.
    choice_problem = ""
    if chosen is not None:
        selection, choice_problem = series_class.select_chosen(rows, chosen)
    else:
        selection = select_series(rows, rules)
    for row in rows:
        row["verdict"], row["reason"] = selection.verdicts[row["series_uid"]]
    if selection.uid is not None:
        if scan.nifti:
            warnings_.append(f"{_plural(len(scan.nifti), 'NIfTI file')} ignored: DICOM audited")
        write_series_table(rows, series_table)
        return _dicom_record(scan, rows, geometries, selection, warnings_)
    if scan.nifti and not choice_problem:
        if rows:
            warnings_.append("no usable DICOM T1 series: audited a NIfTI file instead")
        return _nifti_record(subject_dir, scan, rules, warnings_, rows, series_table)
    write_series_table(rows, series_table)
    reason = choice_problem or _no_series_reason(scan, rows)
    log.warning("no series: %s", reason)
    return make_record(
        "inventory",
        status=NO_SERIES,
        reason=reason,
        metrics=_base_metrics(scan, len(rows)),
        warnings=warnings_,
    )


def inventory_subject(
    subject_dir: Path, *, series_table: Path, record_path: Path, rules: dict
) -> dict:
    """List the subject's series, choose the audited one and audit its headers.

    Writes ``series_table`` (TSV, ``SERIES_COLUMNS``) and the ``inventory``
    record, whose ``metrics`` hold the ``hdr_*`` columns (voxel sizes in mm,
    dims in voxels as columns x rows x slices, TR/TE/TI in ms, flip angle in
    degrees, field strength in T; None when unknown), whose ``findings`` are
    codes from ``FINDINGS`` (each one is a reason to flag the subject), and
    whose ``selected`` names the files to convert (paths relative to
    ``subject_dir``). ``rules`` is the ``series`` config (missing keys take
    ``series.DEFAULT_RULES``). Status ``no_series`` when nothing usable is found.
    """
    subject_dir, series_table = Path(subject_dir), Path(series_table)
    record = run_stage(
        "inventory",
        lambda: _inventory(subject_dir, series_table, rules),
        record_path=record_path,
    )
    if not series_table.exists():
        write_series_table([], series_table)
    return record


# ---------------------------------------------------------------------- conversion


def run_dcm2niix(in_dir: Path, out_dir: Path) -> tuple[int, list[str], list[str]]:
    """Run the packaged dcm2niix with the project's flags; returns (exit code, warning lines,
    other output lines). The images land in ``out_dir`` as ``series*.nii.gz``."""
    command = [
        str(dcm2niix.bin),  # the PyPI package's own binary, never one found on PATH
        "-g", "i",  # ignore a user's ~/.dcm2nii.ini: same flags on every machine
        "-ba", "y",
        "-b", "y",
        "-z", "y",
        "-f", _OUTPUT_NAME,
        "-o", str(out_dir),
        str(in_dir),
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=_DCM2NIIX_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired as error:
        message = f"dcm2niix did not finish within {_DCM2NIIX_TIMEOUT_S} s"
        raise StageError(message) from error
    lines = [
        line.replace(str(in_dir), "<in>").replace(str(out_dir), "<out>").strip()
        for line in (result.stdout + "\n" + result.stderr).splitlines()
        if line.strip()
    ]
    warning_lines = [line for line in lines if line.lower().startswith("warning")]
    other = [line for line in lines if not line.lower().startswith("warning")]
    for line in other:
        log.info("dcm2niix: %s", line)  # warnings are logged by the caller, with the record's
    return result.returncode, warning_lines, other


def _nifti_outputs(out_dir: Path) -> list[tuple[Path, tuple[int, ...]]]:
    outputs = []
    for path in sorted(out_dir.glob("*.nii.gz")) + sorted(out_dir.glob("*.nii")):
        try:
            outputs.append((path, tuple(int(n) for n in nib.load(path).shape)))
        except Exception as error:
            log.warning("dcm2niix output unreadable: %s (%s)", path.name, type(error).__name__)
    return outputs


def _pick_output(out_dir: Path, *, acquired_slices: int = 0) -> tuple[Path, bool, list[str]]:
    """The image to keep among dcm2niix's outputs: the largest 3D one.

    Returns (path, take_first_volume, warnings). A 4D image is used (first
    volume) only when no 3D image was written. With ``acquired_slices`` (a
    series with a gap), a 3D image of exactly that many slices comes first:
    the slices as acquired, not dcm2niix's resampled equidistant copy.
    """
    outputs = _nifti_outputs(out_dir)
    if not outputs:
        message = "dcm2niix wrote no image"
        raise StageError(message)

    def is_3d(shape: tuple[int, ...]) -> bool:
        return len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)

    three_d = [o for o in outputs if is_3d(o[1])]
    pool = three_d or outputs
    pool = [o for o in three_d if o[1][2] == acquired_slices] or pool
    path, shape = max(pool, key=lambda o: (int(np.prod(o[1][:3])), o[0].name))
    notes = []
    if len(outputs) > 1:
        names = ", ".join(f"{p.name} {'x'.join(map(str, s))}" for p, s in outputs)
        notes.append(
            f"dcm2niix split the series into {len(outputs)} images ({names}); kept {path.name}"
        )
    first_volume = not is_3d(shape)
    if first_volume:
        notes.append(
            f"dcm2niix wrote a 4D image ({'x'.join(map(str, shape))}); kept the first volume"
        )
    return path, first_volume, notes


def clean_sidecar(sidecar: dict[str, Any]) -> dict[str, Any]:
    """A copy of a dcm2niix sidecar without identifying keys.

    Removes ``SIDECAR_PHI_KEYS``, every ``Patient*`` key except
    ``PatientPosition``, and every date (``*Date``, ``*DateTime``).
    """
    return {
        key: value
        for key, value in sidecar.items()
        if key not in SIDECAR_PHI_KEYS
        and not (key.startswith("Patient") and key != "PatientPosition")
        and not key.endswith(("Date", "DateTime"))
    }


def _atomic_copy(source: Path, target: Path) -> None:
    """Copy ``source`` to ``target`` through a temporary name in the target folder."""
    fd, tmp = temporary_sibling(target)
    os.close(fd)
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _first_volume(source: Path, target: Path) -> None:
    """Write the first volume of a 4D NIfTI (same affine and header otherwise) to ``target``."""
    image = nib.load(source)
    nib.save(image.slicer[..., 0], target)


def fill_missing_slices(
    image: nib.Nifti1Image,
    *,
    positions_mm: Sequence[float],
    normal_lps: Sequence[float],
    spacing_mm: float,
) -> tuple[nib.Nifti1Image | None, str]:
    """The image of a series with absent slices, with zeros where they belong.

    dcm2niix stacks the slices of a series with a gap as if they were
    equidistant: the image is shorter than the head it shows, and the anatomy
    past the gap shifts by the gap's width. (For some data types it also writes
    an ``_Eq`` copy resampled to equal steps, with made-up anatomy in the gap;
    that copy is not used.) Here the stack ``image`` (X x Y x Z voxels, its
    third axis along the DICOM slice normal ``normal_lps``, one slice per
    distinct acquired position ``positions_mm``, mm, ascending) goes onto the
    equidistant grid of step ``spacing_mm`` (mm) that starts at the same first
    slice, with zeros in the gap. Returns (image, what was done) or (None, why
    it was left as it is).
    """
    affine = np.asarray(image.affine, dtype=float)
    positions = np.asarray(positions_mm, dtype=float)
    normal_ras = np.asarray(normal_lps, dtype=float) * [-1.0, -1.0, 1.0]
    shape = image.shape
    if len(shape) != 3 or shape[2] != positions.size or positions.size < 2 or spacing_mm <= 0:
        return None, f"image shape {shape} does not match {positions.size} slice positions"
    column = affine[:3, 2]
    step = float(np.linalg.norm(column)) or 1.0
    alignment = float(np.dot(column, normal_ras)) / step
    if abs(alignment) < 0.99:
        return None, "the image's third axis is not the slice normal"
    # dcm2niix may store the stack in either direction along the normal.
    ordered = positions if alignment > 0 else positions[::-1]
    first = float(np.dot(affine[:3, 3], normal_ras))
    if abs(first - ordered[0]) > spacing_mm / 2:
        return None, f"first slice at {first:.2f} mm, expected {ordered[0]:.2f} mm"
    index = np.rint(np.abs(ordered - ordered[0]) / spacing_mm).astype(int)
    depth = int(index[-1]) + 1
    if np.any(np.diff(index) < 1):
        return None, "slice positions do not fall on distinct grid steps"
    data = np.asanyarray(image.dataobj)
    filled = np.zeros((*shape[:2], depth), dtype=data.dtype)
    filled[:, :, index] = data
    new_affine = affine.copy()
    new_affine[:3, 2] = column / step * spacing_mm
    header = image.header.copy()
    header.set_data_shape(filled.shape)
    header["slice_end"] = 0  # dcm2niix's slice range described the stack without the gap
    out = nib.Nifti1Image(filled, new_affine, header)
    out.set_qform(new_affine, code=int(image.header["qform_code"]) or 1)
    out.set_sform(new_affine, code=int(image.header["sform_code"]) or 1)
    return out, f"{depth - positions.size} missing slice(s) put back as zeros at their positions"


def _restore_gaps(path: Path, selected: dict[str, Any], target: Path) -> tuple[Path, list[str]]:
    """``fill_missing_slices`` on ``path`` when the inventory found gaps: (image to keep, notes)."""
    if not selected.get("slice_positions_mm"):
        return path, []
    filled, done = fill_missing_slices(
        nib.squeeze_image(nib.load(path)),  # (X, Y, Z, 1) counts as 3D
        positions_mm=selected["slice_positions_mm"],
        normal_lps=selected["slice_normal_lps"],
        spacing_mm=float(selected["slice_spacing_mm"]),
    )
    if filled is None:
        return path, [f"missing slices left out of the image ({done})"]
    nib.save(filled, target)
    return target, [done]


def check_image(path: Path) -> dict[str, Any]:
    """Sanity of a converted image and its ``conv_*`` metrics.

    The image must be 3D, with at least 2 voxels along each axis, an invertible
    finite affine and only finite values; otherwise ``StageError``. Metrics:
    ``conv_dim_x/y/z`` (voxels) and ``conv_voxel_x/y/z`` (mm), in the file's own
    voxel order, and ``conv_data_sha256``: a digest of the shape and voxel values
    (16 hex digits), equal for the same scan exported twice, whatever its headers
    and file names.
    """
    image = nib.load(path)
    shape = tuple(int(n) for n in image.shape)
    if len(shape) != 3 or min(shape) < 2:
        message = (
            f"converted image is not a 3D volume of at least 2 voxels per axis (shape {shape})"
        )
        raise StageError(message)
    affine = np.asarray(image.affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(float(np.linalg.det(affine[:3, :3]))) <= 1e-9:
        message = "converted image has an affine that is not invertible or not finite"
        raise StageError(message)
    data = image.get_fdata(dtype=np.float32)
    n_bad = int(np.size(data) - np.count_nonzero(np.isfinite(data)))
    if n_bad:
        message = f"converted image has {n_bad} non-finite voxels"
        raise StageError(message)
    zooms = [float(z) for z in image.header.get_zooms()[:3]]
    digest = hashlib.sha256(repr(shape).encode())
    digest.update(np.ascontiguousarray(data).tobytes())
    return {
        "conv_data_sha256": digest.hexdigest()[:16],
        "conv_dim_x": shape[0],
        "conv_dim_y": shape[1],
        "conv_dim_z": shape[2],
        "conv_voxel_x": zooms[0],
        "conv_voxel_y": zooms[1],
        "conv_voxel_z": zooms[2],
    }


def _convert_dicom(
    subject_dir: Path, selected: dict[str, Any], out_image: Path, out_sidecar: Path
) -> dict[str, Any]:
    files = list(selected.get("files") or [])
    if not files:
        message = "the inventory selected no files to convert"
        raise StageError(message)
    with tempfile.TemporaryDirectory(prefix="mriaudit-dcm2niix-") as tmp:
        in_dir, out_dir = Path(tmp) / "in", Path(tmp) / "out"
        out_dir.mkdir()
        try:
            sources.materialise(subject_dir, files, in_dir)
        except sources.READ_ERRORS as error:
            raise StageError(
                str(error)
                if isinstance(error, FileNotFoundError)
                else f"selected files cannot be read ({type(error).__name__})"
            ) from error
        code, dcm_warnings, other = run_dcm2niix(in_dir, out_dir)
        if not _nifti_outputs(out_dir):
            last = next((line for line in reversed(other) if "error" in line.lower()), "")
            detail = last or (dcm_warnings[-1] if dcm_warnings else "no output")
            message = f"dcm2niix failed (exit code {code}): {detail}"[:300]
            raise StageError(message)
        notes = list(dcm_warnings)
        if code != 0:
            notes.append(f"dcm2niix exited with code {code} but wrote an image")
        acquired = len(selected.get("slice_positions_mm") or [])
        path, first_volume, pick_notes = _pick_output(out_dir, acquired_slices=acquired)
        notes += pick_notes
        image = path
        if first_volume:
            image = out_dir / "first_volume.nii.gz"
            _first_volume(path, image)
        image, gap_notes = _restore_gaps(image, selected, out_dir / "filled.nii.gz")
        notes += gap_notes
        metrics = check_image(image)
        _atomic_copy(image, out_image)
        name = path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.stem
        json_path = out_dir / f"{name}.json"
        if json_path.is_file():
            sidecar = clean_sidecar(json.loads(json_path.read_text(errors="replace")))
        else:
            notes.append("dcm2niix wrote no JSON sidecar; wrote a minimal one")
            sidecar = {"ConversionSoftware": "dcm2niix"}
        version = next(
            (m.group(1) for line in other if (m := re.search(r"version (v\S+)", line))), ""
        )
    write_json(out_sidecar, sidecar)
    metrics["conv_n_warnings"] = len(notes)
    for note in notes:
        log.warning("%s", note)
    return make_record(
        "convert",
        status=OK,
        metrics=metrics,
        warnings=notes,
        source="dicom",
        converter=f"dcm2niix {version}".strip(),
    )


def _convert_nifti(
    subject_dir: Path, selected: dict[str, Any], out_image: Path, out_sidecar: Path
) -> dict[str, Any]:
    files = list(selected.get("files") or [])
    if len(files) != 1:
        message = f"the inventory selected {len(files)} NIfTI files; expected 1"
        raise StageError(message)
    rel = files[0]
    source = subject_dir / rel
    notes: list[str] = []
    try:
        image = nib.load(source)
    except Exception as error:
        message = f"cannot read NIfTI {rel}: {type(error).__name__}"
        raise StageError(message) from error
    with tempfile.TemporaryDirectory(prefix="mriaudit-nifti-") as tmp:
        staged = Path(tmp) / "image.nii.gz"
        if len(image.shape) == 4:
            notes.append(f"4D NIfTI ({'x'.join(map(str, image.shape))}): kept the first volume")
            _first_volume(source, staged)
        elif len(image.shape) == 3 and source.name.lower().endswith(".nii.gz"):
            shutil.copyfile(source, staged)  # byte-identical copy: nothing to change
        else:
            nib.save(image, staged)  # compress (.nii -> .nii.gz); header and affine kept
        metrics = check_image(staged)
        _atomic_copy(staged, out_image)
    write_json(out_sidecar, {"SourceFile": Path(rel).name})
    metrics["conv_n_warnings"] = len(notes)
    for note in notes:
        log.warning("%s", note)
    return make_record("convert", status=OK, metrics=metrics, warnings=notes, source="nifti")


def _convert(
    subject_dir: Path, inventory_record: Path, out_image: Path, out_sidecar: Path
) -> dict[str, Any]:
    selected = read_record(inventory_record).get("selected") or {}
    kind = selected.get("kind")
    if kind == "dicom":
        return _convert_dicom(subject_dir, selected, out_image, out_sidecar)
    if kind == "nifti":
        return _convert_nifti(subject_dir, selected, out_image, out_sidecar)
    message = f"the inventory record selects nothing to convert (kind {kind!r})"
    raise StageError(message)


def convert_subject(
    subject_dir: Path,
    *,
    inventory_record: Path,
    out_image: Path,
    out_sidecar: Path,
    record_path: Path,
) -> dict:
    """Convert the inventory's chosen series (or NIfTI file) to ``out_image`` + ``out_sidecar``.

    DICOM: links to the chosen files in a private temporary folder, the
    packaged dcm2niix (``-ba y -b y -z y``), the largest 3D output kept with
    dcm2niix's own voxel order and affine, the sidecar stripped of identifying
    keys; dcm2niix's warnings go to the log and the record (metric
    ``conv_n_warnings``). NIfTI: the chosen file copied unchanged in
    geometry (first volume of a 4D image). The result must be 3D, at least 2
    voxels per axis, finite; metrics ``conv_dim_*`` (voxels), ``conv_voxel_*`` (mm).
    Skipped (with the inventory's status) when the inventory is not ``ok``.
    """
    subject_dir = Path(subject_dir)
    return run_stage(
        "convert",
        lambda: _convert(subject_dir, Path(inventory_record), Path(out_image), Path(out_sidecar)),
        record_path=record_path,
        image_outputs=[out_image, out_sidecar],
        upstream=[inventory_record],
    )
