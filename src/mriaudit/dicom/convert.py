"""The convert stage: the chosen series to ``sub-<id>_T1w.nii.gz`` and its sidecar.

DICOM goes through the dcm2niix binary of the PyPI package on links to (or
decompressed copies of) the chosen files in a private temporary folder,
keeping dcm2niix's voxel order and affine; missing slices come back as zeros
at their positions; a NIfTI input is copied (first volume of a 4D file). The
sidecar loses identifying keys (``SIDECAR_PHI_KEYS``); ``check_image`` rejects
an image that is not a finite 3D volume with an invertible affine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dcm2niix
import nibabel as nib
import numpy as np

from mriaudit import files, sources, thumbnails
from mriaudit.records import (
    OK,
    StageError,
    make_record,
    read_record,
    run_stage,
    write_json,
)

log = logging.getLogger(__name__)


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

_DCM2NIIX_TIMEOUT_S = 900
_OUTPUT_NAME = "series"


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
    with files.atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


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
    return convert_selected(subject_dir, selected, out_image=out_image, out_sidecar=out_sidecar)


def convert_selected(
    subject_dir: Path, selected: dict[str, Any], *, out_image: Path, out_sidecar: Path
) -> dict[str, Any]:
    """Convert what an inventory ``selected`` (a DICOM series or a NIfTI file, paths
    relative to ``subject_dir``) to ``out_image`` and ``out_sidecar``; the ``convert``
    record (``conv_*`` metrics, warnings). Raises ``StageError`` for a data problem."""
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
    out_thumbnail: Path | None = None,
) -> dict:
    """Convert the inventory's chosen series (or NIfTI file) to ``out_image`` + ``out_sidecar``.

    DICOM: links to the chosen files in a private temporary folder, the
    packaged dcm2niix (``-ba y -b y -z y``), the largest 3D output kept with
    dcm2niix's own voxel order and affine, the sidecar stripped of identifying
    keys; dcm2niix's warnings go to the log and the record (metric
    ``conv_n_warnings``). NIfTI: the chosen file copied unchanged in
    geometry (first volume of a 4D image). The result must be 3D, at least 2
    voxels per axis, finite; metrics ``conv_dim_*`` (voxels), ``conv_voxel_*`` (mm).
    ``out_thumbnail``: the report's picture of the whole field of view
    (``thumbnails.native_picture``). Skipped (with the inventory's status)
    when the inventory is not ``ok``.
    """
    subject_dir = Path(subject_dir)

    def work() -> dict:
        record = _convert(subject_dir, Path(inventory_record), Path(out_image), Path(out_sidecar))
        if out_thumbnail is not None:
            record["warnings"] += thumbnails.try_draw(
                thumbnails.write_native_thumbnail, out_image, out_thumbnail
            )
        return record

    return run_stage(
        "convert",
        work,
        record_path=record_path,
        image_outputs=[out_image, out_sidecar, *([out_thumbnail] if out_thumbnail else [])],
        upstream=[inventory_record],
    )
