"""Reading a subject folder's DICOM headers (``mriaudit.sources`` gives the files).

``_scan_folder`` walks the folder (plain, compressed and archived files), reads
each file's header only (pixel data of plain files stay on disk), and groups
the files by SeriesInstanceUID into ``_Series`` of ``_Slice`` geometry: one per
frame of an enhanced multi-frame file. Files that are not DICOM, cut, or carry
unusable pixel attributes are counted, never fatal. Only the *names* of filled
identifying tags (``PHI_TAGS``) are kept; header strings lose control
characters and are never interpreted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import Tag

from mriaudit import sources

log = logging.getLogger(__name__)


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

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
# Pixel data and large private elements (Siemens CSA headers) stay on disk, unread.
_DEFER_SIZE = "1 KB"


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


def _scan_folder(subject_dir: Path, *, only: Collection[str] = ()) -> _Scan:
    """Walk ``subject_dir`` (any depth, symlinked folders not followed, compressed files
    and archives opened; see ``mriaudit.sources``) and read DICOM headers. ``only``:
    the files to consider (relative names, as ``walk`` gives them; empty: all)."""
    scan = _Scan()
    wanted = frozenset(only)
    with _quiet_pydicom():
        for entry in sources.walk(subject_dir, on_error=scan.problems.append):
            rel = entry.rel
            if wanted and rel not in wanted:
                continue
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
