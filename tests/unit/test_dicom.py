"""dicom: series inventory, selection, header audit, and conversion with the real dcm2niix."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import yaml

from mriaudit import dicom, series, tables
from mriaudit.records import FAILED, NO_SERIES, OK, StageError, write_json

from .conftest import ORIENTATIONS, PHI_VALUES, series_normal

ROOT = Path(__file__).resolve().parents[2]
# The synthetic series are tiny (12 slices): lower min_slices, keep the other defaults.
RULES = {"min_slices": 8}
#: Header values of a Siemens 2D T2 turbo spin echo.
T2_TSE = {
    "sequence_name": "*tse2d1_15",
    "scanning_sequence": ("SE",),
    "tr": 4000.0,
    "te": 100.0,
    "ti": None,
    "flip_angle": 150.0,
}


def run_inventory(subject: Path, out: Path, rules: dict | None = None) -> tuple[dict, pd.DataFrame]:
    record = dicom.inventory_subject(
        subject,
        series_table=out / "series.tsv",
        record_path=out / "inventory.json",
        rules=RULES if rules is None else rules,
    )
    assert json.loads((out / "inventory.json").read_text()) == json.loads(json.dumps(record))
    table = tables.read_tsv(out / "series.tsv", text=True)
    assert list(table.columns) == list(dicom.SERIES_COLUMNS)
    return record, table


def run_convert(subject: Path, out: Path) -> dict:
    return dicom.convert_subject(
        subject,
        inventory_record=out / "inventory.json",
        out_image=out / "anat" / "sub-x_T1w.nii.gz",
        out_sidecar=out / "anat" / "sub-x_T1w.json",
        record_path=out / "convert.json",
    )


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under ``folder`` with its size and modification time (symlinks not followed)."""
    entries = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            stat = os.lstat(Path(dirpath) / name)
            entries[str(Path(dirpath, name).relative_to(folder))] = (stat.st_size, stat.st_mtime_ns)
    return entries


def assert_voxels_match_dicom(image_path: Path, *, shape, spacing, orientation, origin) -> None:
    """Every converted voxel sits at the world position of the DICOM voxel it came from.

    The synthetic value code ``1 + col + n_cols * row + n_cols * n_rows * slice``
    names each voxel's DICOM slice, row and column, whatever order dcm2niix chose.
    """
    image = nib.load(image_path)
    values = np.rint(np.asanyarray(image.dataobj)).astype(np.int64).reshape(-1) - 1
    n_cols, n_rows, _ = shape
    assert np.array_equal(np.sort(values), np.arange(int(np.prod(shape))))
    iop = np.asarray(ORIENTATIONS[orientation] if isinstance(orientation, str) else orientation)
    slice_index = values // (n_cols * n_rows)
    row = (values // n_cols) % n_rows
    col = values % n_cols
    lps = (
        np.asarray(origin)
        + np.outer(slice_index * spacing[2], series_normal(iop))
        + np.outer(col * spacing[0], iop[:3])
        + np.outer(row * spacing[1], iop[3:])
    )
    ras = lps * np.array([-1.0, -1.0, 1.0])
    ijk = np.indices(image.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(image.affine, ijk)
    assert np.abs(world - ras).max() < 1e-3
    # The affine's axes are the DICOM row, column and slice directions (up to order and sign).
    axes = image.affine[:3, :3] / np.linalg.norm(image.affine[:3, :3], axis=0)
    dicom_axes = np.stack([iop[:3], iop[3:], series_normal(iop)]) * np.array([-1.0, -1.0, 1.0])
    assert np.allclose(np.sort(np.abs(axes.T @ dicom_axes.T).max(axis=1)), 1.0, atol=1e-4)


def phi_free(text: str) -> bool:
    return not any(value.lower() in text.lower() for value in PHI_VALUES.values())


# ---------------------------------------------------------------------- pure functions


def test_slice_gaps_counts_missing_duplicates_and_nonuniform():
    uniform = dicom.slice_gaps(np.arange(10) * 1.2)
    assert uniform == dicom.SliceGaps(10, 1.2, 0, 0, False)
    gaps = dicom.slice_gaps([0, 1, 2, 5, 6, 7, 7.001, 8, 9][::-1])
    assert (gaps.n_unique, gaps.spacing, gaps.missing, gaps.duplicates) == (8, 1.0, 2, 1)
    assert not gaps.nonuniform
    assert dicom.slice_gaps([0, 1, 2, 3.5, 4.5, 5.5]).nonuniform
    assert dicom.slice_gaps([4.0]) == dicom.SliceGaps(1, None, 0, 0, False)


@pytest.mark.parametrize("name", ["axial", "sagittal", "coronal", "oblique"])
def test_orientation_label(name):
    assert dicom.orientation_label(series_normal(ORIENTATIONS[name])) == name


def test_rules_take_defaults_and_reject_bad_regex():
    rules = series.resolve_rules({"min_slices": 4, "exclude": None})
    assert rules["min_slices"] == 4
    assert rules["exclude"] == series.DEFAULT_RULES["exclude"] == ""
    # No name rule by default: the headers choose.
    assert rules["include_re"] is None and rules["exclude_re"] is None
    assert series.resolve_rules({"include": "mprage"})["include_re"].search("T1_MPRAGE")
    with pytest.raises(StageError, match=r"series\.include"):
        series.resolve_rules({"include": "t1("})


def test_schema_defaults_match_module_defaults():
    """The workflow passes the schema defaults: they must be the rules this module documents."""
    schema = yaml.safe_load(
        (ROOT / "src" / "mriaudit" / "schemas" / "config.schema.yaml").read_text()
    )
    rules = schema["properties"]["series"]["properties"]
    assert {key: spec["default"] for key, spec in rules.items()} == series.DEFAULT_RULES


# ---------------------------------------------------------------------------- inventory


def test_inventory_groups_nested_series_and_selects_3d_t1(tmp_path, dicom_series):
    subject = tmp_path / "Patient 7 (ü)"
    loc = dicom_series(
        subject / "x" / "1",
        shape=(16, 16, 3),
        description="localizer",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        series_number=1,
        acquisition="2D",
    )
    t1 = dicom_series(subject / "deep" / "er" / "still", series_number=2, prefix="")
    t2 = dicom_series(
        subject / "x" / "2",
        description="t2_tse_tra",
        **T2_TSE,
        spacing=(1.0, 1.0, 4.0),
        acquisition="2D",
        series_number=3,
    )
    junk = subject / "junk"
    junk.mkdir()
    (junk / "README.txt").write_text("export notes")
    (junk / ".DS_Store").write_bytes(os.urandom(64))
    (junk / "IM9999").write_bytes(b"")  # zero-byte: a failed copy, unreadable
    (subject / "x" / "loop").symlink_to(subject, target_is_directory=True)

    record, table = run_inventory(subject, tmp_path / "out")

    assert record["status"] == OK
    assert record["findings"] == []
    metrics = record["metrics"]
    assert set(dicom.METRIC_KEYS) <= set(metrics)
    assert metrics["hdr_n_series"] == 3
    assert metrics["hdr_n_files"] == len(loc) + len(t1) + len(t2) + 3
    assert (metrics["hdr_n_non_dicom"], metrics["hdr_n_unreadable"]) == (2, 1)
    assert (metrics["hdr_dim_x"], metrics["hdr_dim_y"], metrics["hdr_dim_z"]) == (16, 16, 12)
    assert metrics["hdr_voxel_z"] == pytest.approx(1.0)
    assert metrics["hdr_acquisition"] == "3D"
    assert metrics["hdr_orientation"] == "axial"
    assert metrics["hdr_series_description"] == "t1_mprage_sag"
    assert (metrics["hdr_manufacturer"], metrics["hdr_model"]) == ("Acme Imaging", "Model X")
    assert (metrics["hdr_tr"], metrics["hdr_te"], metrics["hdr_ti"]) == (2300.0, 2.98, 900.0)
    assert (metrics["hdr_flip_angle"], metrics["hdr_field_strength"]) == (9.0, 3.0)
    assert (metrics["hdr_missing_slices"], metrics["hdr_duplicate_slices"]) == (0, 0)
    selected = record["selected"]
    assert selected["kind"] == "dicom"
    assert selected["files"] == sorted(p.relative_to(subject).as_posix() for p in t1)
    assert selected["description"] == "t1_mprage_sag"

    rows = table.set_index("description")
    assert rows.loc["t1_mprage_sag", "verdict"] == "selected"
    assert rows.loc["t1_mprage_sag", "series_uid"] == selected["series_uid"]
    assert rows.loc["t1_mprage_sag", "path"] == "deep/er/still"
    assert rows.loc["localizer", "localizer"] == "true"
    assert rows.loc["localizer", "reason"] == "localizer"
    assert rows.loc["t2_tse_tra", "reason"].startswith("T2-weighted (spin echo")
    assert rows.loc["t2_tse_tra", "contrast"] == "T2w"
    assert rows.loc["t2_tse_tra", "acquisition"] == "2D"
    assert rows.loc["t2_tse_tra", "slice_spacing"] == "4"
    assert rows["transfer_syntax"].eq("Explicit VR Little Endian").all()


def test_best_3d_t1_has_most_slices_then_finest_voxels(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject / "a", shape=(16, 16, 10), description="t1_a", series_number=1)
    dicom_series(subject / "b", spacing=(1.2, 1.2, 1.2), description="t1_coarse", series_number=2)
    dicom_series(subject / "c", spacing=(0.9, 0.9, 1.0), description="t1_fine", series_number=3)
    dicom_series(
        subject / "d",
        description="t1_derived",
        image_type=("DERIVED", "SECONDARY", "MPR"),
        series_number=4,
        shape=(16, 16, 14),
    )
    record, table = run_inventory(subject, tmp_path / "out")
    assert record["selected"]["description"] == "t1_fine"
    verdicts = dict(zip(table["description"], table["reason"], strict=True))
    assert verdicts["t1_derived"] == "derived multiplanar reformat (MPR), not an acquisition"
    assert "ranked below 't1_fine'" in verdicts["t1_coarse"]


def test_2d_t1_is_audited_as_fallback(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(
        subject / "loc",
        shape=(16, 16, 3),
        description="AAHead_Scout",
        image_type=("ORIGINAL", "PRIMARY", "M"),
        series_number=1,
    )
    dicom_series(
        subject / "t1",
        spacing=(1.0, 1.0, 5.0),
        slice_thickness=4.0,
        acquisition=None,  # no MRAcquisitionType: 2D inferred from 4-5 mm slices
        orientation="sagittal",
        description="t1_se_sag",
        series_number=2,
    )
    record, table = run_inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert record["findings"] == ["2d_only"]
    assert record["metrics"]["hdr_acquisition"] == "2D"
    assert record["metrics"]["hdr_orientation"] == "sagittal"
    assert record["metrics"]["hdr_voxel_z"] == pytest.approx(5.0)
    assert table.set_index("description").loc["t1_se_sag", "verdict"] == "selected"


def _empty(subject: Path, dicom_series) -> None:
    subject.mkdir(parents=True)


def _localizer_only(subject: Path, dicom_series) -> None:
    dicom_series(
        subject / "loc",
        shape=(16, 16, 3),
        description="localizer",
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )


def _junk_only(subject: Path, dicom_series) -> None:
    (subject / "docs").mkdir(parents=True)
    (subject / "README").write_text("nothing here")
    (subject / "docs" / "report.pdf").write_bytes(b"%PDF-1.4" + bytes(300))
    (subject / "docs" / ".DS_Store").write_bytes(bytes(200))


def _t2_only(subject: Path, dicom_series) -> None:
    dicom_series(subject, description="t2_tse_tra", acquisition="2D", **T2_TSE)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_empty, "folder is empty"),
        (_localizer_only, "only a localizer series"),
        (_junk_only, "no DICOM or NIfTI files (3 non-DICOM files)"),
        (_t2_only, "no usable T1-weighted series among 1 series (T2-weighted: 1)"),
    ],
)
def test_no_series(tmp_path, dicom_series, make, reason):
    subject = tmp_path / "s"
    make(subject, dicom_series)
    record, _ = run_inventory(subject, tmp_path / "out")
    assert record["status"] == NO_SERIES
    assert record["reason"] == reason
    assert "selected" not in record


def test_min_slices_rule_applies(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject)
    record, table = run_inventory(subject, tmp_path / "out", rules={})  # default: 16 slices
    assert record["status"] == NO_SERIES
    assert table.loc[0, "reason"] == "too few slices (12 < 16)"
    record, _ = run_inventory(subject, tmp_path / "out2", rules={"min_slices": 12})
    assert record["status"] == OK


def test_missing_and_duplicated_slices_are_found(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject, missing=[4, 5], duplicated=[8])
    record, table = run_inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert record["findings"] == ["missing_slices", "duplicate_slices"]
    assert record["metrics"]["hdr_missing_slices"] == 2
    assert record["metrics"]["hdr_duplicate_slices"] == 1
    assert record["metrics"]["hdr_dim_z"] == 10
    assert record["metrics"]["hdr_voxel_z"] == pytest.approx(1.0)
    assert (table.loc[0, "missing_slices"], table.loc[0, "duplicate_slices"]) == ("2", "1")
    assert len(record["selected"]["files"]) == 11


def test_multi_echo_is_not_duplicated(tmp_path, dicom_series):
    subject = tmp_path / "s"
    uid = "1.2.826.0.1.3680043.8.498.1"
    dicom_series(subject, series_uid=uid, te=2.0, prefix="E1_")
    dicom_series(subject, series_uid=uid, te=4.0, prefix="E2_")
    record, _ = run_inventory(subject, tmp_path / "out")
    assert record["findings"] == []
    assert record["metrics"]["hdr_dim_z"] == 12


@pytest.mark.parametrize(
    ("finding", "overrides"),
    [
        ("mixed_dimensions", {3: {"Rows": 8, "Columns": 8}}),
        ("mixed_dimensions", {3: {"PixelSpacing": ["0.5", "0.5"]}}),
        ("inconsistent_rescale", {4: {"RescaleSlope": "2"}}),
        ("mixed_orientation", {6: {"ImageOrientationPatient": ["1", "0", "0", "0", "0", "-1"]}}),
        ("nonuniform_spacing", {6: {"ImagePositionPatient": ["-8", "-8", "0.4"]}}),
    ],
)
def test_inconsistent_headers_are_found(tmp_path, dicom_series, finding, overrides):
    subject = tmp_path / "s"
    dicom_series(subject, overrides=overrides)
    record, _ = run_inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert finding in record["findings"]


def test_unreadable_files_are_counted_and_left_out(tmp_path, dicom_series):
    subject = tmp_path / "s"
    files = dicom_series(subject / "t1")
    truncated = files[5]
    truncated.write_bytes(truncated.read_bytes()[:-200])  # pixel data cut short
    (subject / "t1" / "broken.dcm").write_bytes(bytes(128) + b"DICM" + b"\x02\x00\xff" * 7)
    # Its file meta intact, the data set cut off right after it: damaged, not a non-image.
    header = files[0].read_bytes()
    meta_end = 132 + 12 + int.from_bytes(header[140:144], "little")  # group length element
    (subject / "t1" / "cut.dcm").write_bytes(header[:meta_end])
    record, table = run_inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert "unreadable_files" in record["findings"]
    assert "missing_slices" in record["findings"]
    assert record["metrics"]["hdr_n_unreadable"] == 3
    assert record["metrics"]["hdr_n_non_dicom"] == 0
    assert "t1/IM0006" not in record["selected"]["files"]
    assert len(record["selected"]["files"]) == 11
    assert table.loc[0, "n_unreadable"] == "1"
    assert table.loc[0, "n_files"] == "12"


def test_enhanced_multiframe_series(tmp_path, enhanced_series):
    subject = tmp_path / "s"
    enhanced_series(subject / "enh.dcm", missing=[7])
    record, table = run_inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert record["findings"] == ["missing_slices"]
    assert record["metrics"]["hdr_dim_z"] == 11
    assert record["selected"]["files"] == ["enh.dcm"]
    assert table.loc[0, "n_files"] == "1"


def test_phi_tag_names_are_reported_never_values(tmp_path, dicom_series, caplog):
    subject = tmp_path / "s"
    dicom_series(subject)
    caplog.set_level(logging.DEBUG)
    record, _ = run_inventory(subject, tmp_path / "out")
    tags = record["metrics"]["hdr_phi_tags"].split(",")
    assert set(PHI_VALUES) <= set(tags)
    for path in [tmp_path / "out" / "series.tsv", tmp_path / "out" / "inventory.json"]:
        assert phi_free(path.read_text())
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == OK
    sidecar = json.loads((tmp_path / "out" / "anat" / "sub-x_T1w.json").read_text())
    assert not set(sidecar) & {*PHI_VALUES, "InstitutionalDepartmentName", "StationName"}
    assert not any(key.endswith("Date") for key in sidecar)
    assert sidecar["PatientPosition"] == "HFS"
    image_bytes = gzip.decompress((tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz").read_bytes())
    assert phi_free(image_bytes.decode("latin-1"))
    assert phi_free(json.dumps(sidecar)) and phi_free(json.dumps(convert))
    assert phi_free(caplog.text)


def test_no_phi_when_headers_are_clean(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject, phi=False)
    record, _ = run_inventory(subject, tmp_path / "out")
    assert record["metrics"]["hdr_phi_tags"] == ""


def test_header_strings_are_data(tmp_path, dicom_series):
    nasty = 't1 <script>alert(1)</script>\t$(rm -rf ~); `id` |x\n"q"\r'
    subject = tmp_path / "s"
    dicom_series(subject, description=nasty, protocol="t1\tproto")
    record, table = run_inventory(subject, tmp_path / "out")
    lines = (tmp_path / "out" / "series.tsv").read_text().splitlines()
    assert len(lines) == 2
    assert all(line.count("\t") == len(dicom.SERIES_COLUMNS) - 1 for line in lines)
    clean = 't1 <script>alert(1)</script> $(rm -rf ~); `id` |x "q"'
    assert table.loc[0, "description"] == clean
    assert table.loc[0, "protocol"] == "t1 proto"
    assert record["metrics"]["hdr_series_description"] == clean
    assert record["selected"]["description"] == clean


def test_missing_subject_folder_is_a_failed_record(tmp_path):
    record, table = run_inventory(tmp_path / "nope", tmp_path / "out")
    assert record["status"] == FAILED
    assert "not found" in record["reason"]
    assert table.empty


# ------------------------------------------------------------------------------- NIfTI


def test_nifti_subject_prefers_t1_name(tmp_path, nifti_file):
    subject = tmp_path / "s"
    nifti_file(subject / "anat" / "flair.nii.gz", shape=(20, 20, 20))
    nifti_file(subject / "anat" / "brain_mask.nii.gz", shape=(20, 20, 20))
    nifti_file(subject / "anat" / "scan_T1c.nii.gz", shape=(20, 20, 20))
    nifti_file(subject / "anat" / "sub-01_T1w.nii", shape=(12, 14, 10), zooms=(1.0, 1.1, 1.2))
    (subject / "anat" / "sub-01_T1w.json").write_text(
        json.dumps({"Manufacturer": "Acme", "RepetitionTime": 2.3, "InstitutionName": "X"})
    )
    record, table = run_inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert record["selected"]["kind"] == "nifti"
    assert record["selected"]["files"] == ["anat/sub-01_T1w.nii"]
    assert "name says T1" in record["selected"]["description"]
    metrics = record["metrics"]
    assert (metrics["hdr_dim_x"], metrics["hdr_dim_y"], metrics["hdr_dim_z"]) == (12, 14, 10)
    assert metrics["hdr_voxel_y"] == pytest.approx(1.1)
    assert (metrics["hdr_manufacturer"], metrics["hdr_tr"]) == ("Acme", pytest.approx(2300.0))
    assert metrics["hdr_n_series"] == 4
    assert metrics["hdr_n_non_dicom"] == 1  # the JSON sidecar
    verdicts = dict(zip(table["path"], table["verdict"], strict=True))
    assert verdicts["anat/sub-01_T1w.nii"] == "selected"
    assert list(verdicts.values()).count("rejected") == 3

    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == OK
    source = nib.load(subject / "anat" / "sub-01_T1w.nii")
    result = nib.load(tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz")
    assert np.array_equal(result.affine, source.affine)
    assert np.array_equal(result.get_fdata(), source.get_fdata())
    assert convert["metrics"]["conv_voxel_z"] == pytest.approx(1.2)
    sidecar = json.loads((tmp_path / "out" / "anat" / "sub-x_T1w.json").read_text())
    assert sidecar == {"SourceFile": "sub-01_T1w.nii"}


def test_single_nifti_with_thick_slices_4d(tmp_path, nifti_file):
    subject = tmp_path / "s"
    nifti_file(subject / "scan.nii.gz", shape=(10, 12, 8, 3), zooms=(1.0, 1.0, 5.0))
    record, _ = run_inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert record["findings"] == ["2d_only"]
    assert record["selected"]["description"].startswith("only NIfTI image")
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == OK
    assert "kept the first volume" in convert["warnings"][0]
    result = nib.load(tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz")
    assert result.shape == (10, 12, 8)
    assert result.header.get_zooms() == (1.0, 1.0, 5.0)
    source = nib.load(subject / "scan.nii.gz")
    assert np.array_equal(result.affine, source.affine)
    assert np.array_equal(result.get_fdata(), source.get_fdata()[..., 0])


def test_nifti_without_3d_image_is_no_series(tmp_path, nifti_file):
    subject = tmp_path / "s"
    nifti_file(subject / "flat.nii.gz", shape=(10, 12, 1))
    (subject / "broken.nii.gz").write_bytes(b"not gzip")
    record, _ = run_inventory(subject, tmp_path / "out")
    assert record["status"] == NO_SERIES
    assert record["reason"] == (
        "no usable 3D NIfTI image among 2 files (unreadable NIfTI: 1, not a 3D image (10x12x1): 1)"
    )
    assert record["metrics"]["hdr_n_unreadable"] == 1


def test_nifti_with_a_singular_affine_is_no_series(tmp_path):
    header = nib.Nifti1Header()
    header.set_data_shape((12, 10, 8))
    header.set_data_dtype(np.float32)
    header["sform_code"], header["qform_code"] = 1, 0
    for row in ("srow_x", "srow_y", "srow_z"):
        header[row] = [0.0, 0.0, 0.0, 0.0]  # every voxel at the origin
    subject = tmp_path / "s"
    subject.mkdir()
    data = np.ones((12, 10, 8), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, None, header=header), subject / "T1w.nii.gz")
    record, table = run_inventory(subject, tmp_path / "out")
    assert record["status"] == NO_SERIES
    assert "affine not invertible or not finite: 1" in record["reason"]
    assert table.loc[0, "reason"] == "affine not invertible or not finite"
    with pytest.raises(StageError, match="affine that is not invertible"):
        dicom.check_image(subject / "T1w.nii.gz")


# -------------------------------------------------------------------------- conversion


@pytest.mark.parametrize(
    ("orientation", "acquisition", "spacing"),
    [
        ("axial", "3D", (1.0, 1.0, 1.0)),
        ("sagittal", "3D", (0.9, 1.1, 1.2)),
        ("coronal", "2D", (1.0, 0.8, 4.0)),
        ("oblique", "3D", (1.0, 1.0, 1.5)),
    ],
)
def test_convert_keeps_dicom_geometry(tmp_path, dicom_series, orientation, acquisition, spacing):
    subject = tmp_path / "s"
    origin = (-7.5, 10.25, -3.0)
    shape = (16, 14, 12)
    dicom_series(
        subject / "series",
        shape=shape,
        spacing=spacing,
        orientation=orientation,
        origin=origin,
        acquisition=acquisition,
    )
    before = snapshot(subject)
    record, _ = run_inventory(subject, tmp_path / "out")
    assert record["findings"] == ([] if acquisition == "3D" else ["2d_only"])
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == OK, convert["reason"]
    assert snapshot(subject) == before  # the input folder is never written
    image = tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz"
    metrics = convert["metrics"]
    dims = (metrics["conv_dim_x"], metrics["conv_dim_y"], metrics["conv_dim_z"])
    zooms = (metrics["conv_voxel_x"], metrics["conv_voxel_y"], metrics["conv_voxel_z"])
    assert dims == nib.load(image).shape
    assert sorted(dims) == sorted(shape)
    assert sorted(zooms) == pytest.approx(sorted(spacing), abs=1e-4)
    assert_voxels_match_dicom(
        image, shape=shape, spacing=spacing, orientation=orientation, origin=origin
    )
    # The synthetic manufacturer is unknown to dcm2niix: its warning is recorded.
    assert any("manufacturer" in w for w in convert["warnings"])
    assert metrics["conv_n_warnings"] == len(convert["warnings"])
    assert all(w.lower().startswith("warning") for w in convert["warnings"])


def test_convert_enhanced_multiframe(tmp_path, enhanced_series):
    subject = tmp_path / "s"
    enhanced_series(subject / "enh.dcm", orientation="sagittal", spacing=(1.0, 1.0, 1.3))
    run_inventory(subject, tmp_path / "out")
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == OK, convert["reason"]
    assert_voxels_match_dicom(
        tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz",
        shape=(16, 16, 12),
        spacing=(1.0, 1.0, 1.3),
        orientation="sagittal",
        origin=(-8.0, -8.0, -6.0),
    )


@pytest.mark.parametrize("orientation", ["axial", "sagittal", "coronal"])
def test_convert_puts_missing_slices_back_as_zeros(tmp_path, dicom_series, orientation):
    # dcm2niix alone stacks the 10 slices it has, shifting the anatomy past the gap.
    geometry = {"shape": (16, 14, 12), "spacing": (0.9, 1.0, 1.3), "orientation": orientation}
    dicom_series(tmp_path / "full", **geometry)
    dicom_series(tmp_path / "gap", missing=[4, 5], **geometry)
    run_inventory(tmp_path / "full", tmp_path / "full-out")
    run_convert(tmp_path / "full", tmp_path / "full-out")
    record, _ = run_inventory(tmp_path / "gap", tmp_path / "gap-out")
    assert "missing_slices" in record["findings"]
    convert = run_convert(tmp_path / "gap", tmp_path / "gap-out")
    assert convert["status"] == OK
    assert any("Interslice distance varies" in w for w in convert["warnings"])
    assert "2 missing slice(s) put back as zeros at their positions" in convert["warnings"]
    assert convert["metrics"]["conv_n_warnings"] == len(convert["warnings"])
    # dcm2niix flips a gapped series' axes differently: compare both in RAS voxel order.
    full = nib.as_closest_canonical(nib.load(tmp_path / "full-out" / "anat" / "sub-x_T1w.nii.gz"))
    filled = nib.as_closest_canonical(nib.load(tmp_path / "gap-out" / "anat" / "sub-x_T1w.nii.gz"))
    assert filled.shape == full.shape
    np.testing.assert_allclose(filled.affine, full.affine, atol=1e-4)
    expected = full.get_fdata()
    # Voxels of DICOM slices 4 and 5: their distance along the normal from slice 0.
    ijk = np.indices(full.shape).reshape(3, -1)
    world = full.affine[:3, :3] @ ijk + full.affine[:3, 3:]
    normal_ras = series_normal(ORIENTATIONS[orientation]) * [-1, -1, 1]
    origin = np.array([8.0, 8.0, -6.0])  # the fixture's default (-8, -8, -6) LPS
    dicom_index = np.rint(normal_ras @ (world - origin[:, None]) / 1.3).reshape(full.shape)
    gap = np.isin(dicom_index, [4, 5])
    assert gap.sum() == 2 * 16 * 14
    np.testing.assert_array_equal(filled.get_fdata()[gap], 0)
    np.testing.assert_array_equal(filled.get_fdata()[~gap], expected[~gap])
    assert np.all(expected[gap] != 0)


def test_convert_skips_after_no_series(tmp_path):
    subject = tmp_path / "s"
    subject.mkdir()
    run_inventory(subject, tmp_path / "out")
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == NO_SERIES
    assert convert["reason"] == "folder is empty"
    # No image-shaped placeholder: the record says why there is no image.
    assert not (tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz").exists()
    assert not (tmp_path / "out" / "anat" / "sub-x_T1w.json").exists()


def test_convert_rejects_a_single_slice(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject, shape=(16, 16, 1))
    record, _ = run_inventory(subject, tmp_path / "out", rules={"min_slices": 1})
    assert record["status"] == OK
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == FAILED
    assert "not a 3D volume" in convert["reason"]
    assert not (tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz").exists()


def test_convert_fails_cleanly_when_a_file_vanished(tmp_path, dicom_series):
    subject = tmp_path / "s"
    files = dicom_series(subject)
    run_inventory(subject, tmp_path / "out")
    files[3].unlink()
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == FAILED
    assert convert["reason"] == "selected file disappeared since the inventory: IM0004"


def test_convert_needs_a_selection(tmp_path):
    write_json(tmp_path / "out" / "inventory.json", {"stage": "inventory", "status": OK})
    convert = run_convert(tmp_path, tmp_path / "out")
    assert convert["status"] == FAILED
    assert "selects nothing" in convert["reason"]


def test_check_image_digest_follows_the_voxels_not_the_header(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    first, second, third = (tmp_path / f"{name}.nii.gz" for name in "abc")
    nib.save(nib.Nifti1Image(data, np.eye(4)), first)
    moved = nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0]))
    moved.header["descrip"] = b"another export of the same scan"
    nib.save(moved, second)
    changed = data.copy()
    changed[1, 2, 3] += 1
    nib.save(nib.Nifti1Image(changed, np.eye(4)), third)
    digests = [dicom.check_image(path)["conv_data_sha256"] for path in (first, second, third)]
    assert digests[0] == digests[1] != digests[2]
    assert len(digests[0]) == 16 and int(digests[0], 16) >= 0


def test_clean_sidecar():
    sidecar = {
        "InstitutionName": "x",
        "PatientName": "y",
        "PatientPosition": "HFS",
        "AcquisitionDateTime": "2020",
        "StudyDate": "2020",
        "EchoTime": 0.003,
    }
    assert dicom.clean_sidecar(sidecar) == {"PatientPosition": "HFS", "EchoTime": 0.003}


# ---------------------------------------------------------------------- real DICOM data


@pytest.mark.shared
def test_real_mprage_is_selected_and_matches_reference(shared_data, tmp_path):
    asl = shared_data / "dicom" / "dcm_qa_asl"
    record, _ = run_inventory(asl / "In", tmp_path / "out", rules={})
    assert record["status"] == OK, record["reason"]
    assert record["findings"] == []
    metrics = record["metrics"]
    assert (metrics["hdr_acquisition"], metrics["hdr_orientation"]) == ("3D", "sagittal")
    assert sorted([metrics["hdr_dim_x"], metrics["hdr_dim_y"], metrics["hdr_dim_z"]]) == [
        192,
        256,
        256,
    ]
    assert metrics["hdr_ti"] == pytest.approx(925.0)
    assert "PatientName" in metrics["hdr_phi_tags"]
    assert len(record["selected"]["files"]) == 192
    convert = run_convert(asl / "In", tmp_path / "out")
    assert convert["status"] == OK, convert["reason"]
    result = nib.load(tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz")
    reference = nib.load(asl / "Ref_regenerated" / "T1_mprage_ns_sag_p2_iso_1.0mm_192_5.nii.gz")
    assert result.shape == reference.shape == (192, 256, 256)
    assert result.header.get_zooms() == pytest.approx(reference.header.get_zooms(), abs=1e-3)
    assert np.allclose(result.affine, reference.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(result.dataobj), np.asanyarray(reference.dataobj))
    sidecar_text = (tmp_path / "out" / "anat" / "sub-x_T1w.json").read_text()
    for key in ["InstitutionName", "InstitutionAddress", "StationName", "DeviceSerialNumber"]:
        assert key not in sidecar_text
    assert json.loads(sidecar_text)["SeriesDescription"] == "T1_mprage_ns_sag_p2_iso 1.0mm_192"


@pytest.mark.shared
@pytest.mark.parametrize(
    ("position", "reference"),
    [("HFS", "t1_fl2d_sag_20220407150138.nii"), ("HFP", "t1_fl2d_sag_20220407151756.nii")],
)
def test_real_2d_sagittal_t1_is_2d_only(shared_data, tmp_path, position, reference):
    decubitus = shared_data / "dicom" / "dcm_qa_decubitus"
    subject = decubitus / "In" / position
    record, _ = run_inventory(subject, tmp_path / "out", rules={})
    assert record["status"] == OK, record["reason"]
    assert record["findings"] == ["2d_only"]
    metrics = record["metrics"]
    assert metrics["hdr_n_non_dicom"] == 1  # the header dump .txt
    assert metrics["hdr_voxel_z"] == pytest.approx(4.8, abs=1e-3)
    assert metrics["hdr_dim_z"] == 35
    convert = run_convert(subject, tmp_path / "out")
    assert convert["status"] == OK, convert["reason"]
    result = nib.load(tmp_path / "out" / "anat" / "sub-x_T1w.nii.gz")
    ref = nib.load(decubitus / "Ref_regenerated" / reference)
    assert result.shape == ref.shape
    assert result.header.get_zooms() == pytest.approx(ref.header.get_zooms(), abs=1e-4)
    assert np.allclose(result.affine, ref.affine, atol=1e-4)
    assert np.array_equal(np.asanyarray(result.dataobj), np.asanyarray(ref.dataobj))


# Permissive rules: the reference series are EPI and mosaics, not T1s, but their
# conversion must still match dcm2niix's own regression outputs.
ANY_SERIES = {"include": ".", "exclude": "(?!)", "min_slices": 1}
NIH_REFERENCES = [
    ("20180918GE/mr_0004", "DCM2NIIX_regression_test_4"),
    ("20180918GE/mr_0005", "DCM2NIIX_regression_test_5"),
    ("20180918GE/mr_0006", "DCM2NIIX_regression_test_6"),
    ("20180918GE/mr_0007", "DCM2NIIX_regression_test_7"),
    ("20180918Si/mr_0003", "EPI_PE=AP_3"),
    ("20180918Si/mr_0004", "EPI_PE=PA_4"),
    ("20180918Si/mr_0005", "EPI_PE=RL_5"),
    ("20180918Si/mr_0006", "EPI_PE=LR_6"),
]


def _assert_matches_reference(result_path: Path, reference_path: Path) -> None:
    """Same grid (affine within 1e-4 mm) and identical voxels; a 4D reference's first volume."""
    result, reference = nib.load(result_path), nib.load(reference_path)
    expected = np.asanyarray(reference.dataobj)
    if expected.ndim == 4:
        expected = expected[..., 0]  # convert keeps the first volume of a time series
    assert result.shape == expected.shape
    assert result.get_data_dtype() == reference.get_data_dtype()
    assert result.header.get_zooms()[:3] == pytest.approx(
        reference.header.get_zooms()[:3], abs=1e-4
    )
    assert np.allclose(result.affine, reference.affine, atol=1e-4, rtol=0)
    assert np.array_equal(np.asanyarray(result.dataobj), expected)


def _convert_files(source: Path, names: list[str], out: Path) -> dict:
    """Inventory and convert ``names`` from ``source`` as one subject folder."""
    subject = out / "subject"
    subject.mkdir(parents=True)
    for name in names:
        os.symlink(source / name, subject / name)
    record, _ = run_inventory(subject, out, rules=ANY_SERIES)
    assert record["status"] == OK, record["reason"]
    convert = run_convert(subject, out)
    assert convert["status"] == OK, convert["reason"]
    return convert


@pytest.mark.shared
@pytest.mark.parametrize(("series", "reference"), NIH_REFERENCES)
def test_real_nih_epi_matches_reference(shared_data, tmp_path, series, reference):
    """GE EPI slices (4 slice orders) and Siemens mosaics (4 phase-encoding directions)."""
    nih = shared_data / "dicom" / "dcm_qa_nih"
    source = nih / "In" / series
    convert = _convert_files(source, sorted(p.name for p in source.iterdir()), tmp_path)
    assert any("4D image" in warning for warning in convert["warnings"])
    _assert_matches_reference(
        tmp_path / "anat" / "sub-x_T1w.nii.gz", nih / "Ref" / f"{reference}.nii"
    )


@pytest.mark.shared
@pytest.mark.parametrize("number", range(1, 10))
def test_real_transfer_syntaxes_match_reference(shared_data, tmp_path, number):
    """One mosaic in 9 transfer syntaxes (little/big endian, JPEG lossless, JPEG-LS, JPEG 2000, RLE)."""
    ts = shared_data / "dicom" / "dcm_qa_ts"
    _convert_files(ts / "In", [f"{number}.dcm"], tmp_path)
    _assert_matches_reference(tmp_path / "anat" / "sub-x_T1w.nii.gz", ts / "Ref" / f"{number}.nii")


@pytest.mark.shared
@pytest.mark.parametrize(
    "name", ["12bitUnsigned.dcm", "12bitUnsigned_0x0F0F.dcm", "12bitSigned_0x0F0F.dcm"]
)
def test_real_12bit_pixels_match_reference(shared_data, tmp_path, name):
    """12-bit signed and unsigned pixels, with junk in the unused high bits (0x0F0F mask)."""
    twelve = shared_data / "dicom" / "dcm_qa_12bit"
    _convert_files(twelve / "In", [name], tmp_path)
    # The upstream references are named by series number (dcm2niix -f %s).
    number = json.loads((tmp_path / "anat" / "sub-x_T1w.json").read_text())["SeriesNumber"]
    _assert_matches_reference(
        tmp_path / "anat" / "sub-x_T1w.nii.gz", twelve / "Ref" / f"{number}.nii"
    )
