"""Series selection from what the headers say: vendors' T1 acquisitions, their reformats,
contrast agents, repeats, compressed exports and NIfTI contrasts.

Every vendor row is a small header series written as DICOM files (16 x 16 x 20
voxels) with the header values that vendor writes, so the inventory reads it as
it reads a real export.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import tarfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest

from mriaudit import dicom, series, sources, tables
from mriaudit.demo import anatomy, physics
from mriaudit.records import NO_SERIES, OK

RULES = {"min_slices": 8}
SHAPE = (16, 16, 20)

#: T1 acquisitions as each vendor's headers describe them: name -> write_dicom_series options.
VENDOR_T1 = {
    "siemens t1_mprage_sag": dict(
        description="t1_mprage_sag_p2_iso", sequence_name="*tfl3d1_16ns", manufacturer="SIEMENS"
    ),
    # The Avanto export: an MPRAGE whose name a name rule took for a reformat.
    "siemens t1_mpr_tra": dict(
        description="t1_mpr_tra_gk_v4", sequence_name="*tfl3d1", tr=1900.0, te=3.37, ti=1100.0
    ),
    "siemens MPRAGE_GRAPPA2": dict(description="MPRAGE_GRAPPA2", sequence_name="*tfl3d1_ns"),
    "siemens unnamed *tfl3d1": dict(description="", protocol="", sequence_name="*tfl3d1"),
    "ge BRAVO": dict(
        description="Sag T1 BRAVO",
        sequence_name="efgre3d",
        tr=8.2,
        te=3.2,
        ti=450.0,
        flip_angle=12.0,
    ),
    "ge FSPGR": dict(
        description="Ax 3D FSPGR",
        sequence_name="fspgr3d",
        scanning_sequence=("GR",),
        tr=7.6,
        te=3.1,
        ti=None,
        flip_angle=12.0,
    ),
    "ge 3D T1 IR-FSPGR": dict(
        description="3D T1 IR-FSPGR", sequence_name="efgre3d", tr=7.0, te=2.9, ti=400.0
    ),
    "ge Sag T1 MPRAGE": dict(
        description="Sag T1 MPRAGE", sequence_name="", tr=7.1, te=3.0, ti=1060.0
    ),
    "ge efgre3d": dict(
        description="",
        protocol="",
        sequence_name="efgre3d",
        scanning_sequence=("GR",),
        ti=None,
        tr=8.0,
        te=3.0,
    ),
    "philips T1TFE": dict(
        description="T1TFE",
        sequence_name="T1TFE",
        scanning_sequence=("GR",),
        tr=8.1,
        te=3.7,
        ti=None,
        flip_angle=8.0,
        image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
    ),
    "philips sT1W_3D_TFE": dict(
        description="sT1W_3D_TFE",
        sequence_name="",
        scanning_sequence=("GR",),
        tr=8.1,
        te=3.7,
        ti=None,
        flip_angle=8.0,
    ),
    "philips 3D_T1": dict(
        description="3D_T1", sequence_name="", scanning_sequence=("GR",), tr=8.3, te=3.8, ti=None
    ),
    "canon 3D T1 MPRAGE": dict(
        description="3D T1 MPRAGE",
        sequence_name="",
        scanning_sequence=("IR", "GR"),
        tr=2000.0,
        te=2.6,
        ti=900.0,
    ),
    "canon FFE3D": dict(
        description="FFE3D",
        sequence_name="FFE3D",
        scanning_sequence=("GR",),
        tr=10.0,
        te=4.0,
        ti=None,
        flip_angle=15.0,
    ),
    "uih t1_gre_fsp_3d": dict(
        description="t1_gre_fsp_3d",
        sequence_name="gre_fsp",
        scanning_sequence=("GR",),
        tr=7.2,
        te=3.1,
        ti=None,
        flip_angle=10.0,
    ),
    "hitachi 3D T1 RSSG": dict(
        description="3D_T1_RSSG",
        sequence_name="RSSG",
        scanning_sequence=("GR",),
        tr=9.0,
        te=4.0,
        ti=None,
        flip_angle=12.0,
    ),
}

#: Reformats, projections and subtractions of a T1 -> a word their reason must hold.
REFORMATS = {
    "t1_mpr_cor": (("DERIVED", "SECONDARY", "MPR", "NORM"), "multiplanar reformat"),
    "T1 MIP": (("DERIVED", "SECONDARY", "PROJECTION IMAGE"), "projection"),
    "Ax T1 reformat": (("DERIVED", "SECONDARY", "REFORMATTED", "AVERAGE"), "reformat"),
    "t1_sub": (("DERIVED", "PRIMARY", "SUBTRACTION"), "subtraction"),
    # A name alone: derived and called MPR, with no reformat word in ImageType.
    "t1_mpr_sag": (("DERIVED", "SECONDARY", "OTHER"), "reformat"),
}

T2_TSE = dict(
    description="t2_tse_tra",
    sequence_name="*tse2d1_15",
    scanning_sequence=("SE",),
    tr=4000.0,
    te=100.0,
    ti=None,
    flip_angle=150.0,
    acquisition="2D",
    spacing=(1.0, 1.0, 4.0),
)
FLAIR = dict(
    description="t2_spc_da-fl_sag",
    sequence_name="*spcir_278",
    scanning_sequence=("SE", "IR"),
    tr=5000.0,
    te=390.0,
    ti=1800.0,
)


def inventory(subject: Path, out: Path, rules: dict | None = None) -> tuple[dict, pd.DataFrame]:
    out.mkdir(parents=True, exist_ok=True)
    record = dicom.inventory_subject(
        subject,
        series_table=out / "series.tsv",
        record_path=out / "inventory.json",
        rules=RULES if rules is None else rules,
    )
    table = tables.read_tsv(out / "series.tsv", text=True)
    return record, table.set_index("series_number")


@pytest.mark.parametrize("vendor", list(VENDOR_T1))
def test_each_vendors_t1_is_selected_and_its_reformats_rejected(tmp_path, dicom_series, vendor):
    subject = tmp_path / "s"
    dicom_series(subject / "t1", shape=SHAPE, series_number=2, **VENDOR_T1[vendor])
    dicom_series(subject / "t2", series_number=3, **T2_TSE)
    dicom_series(subject / "flair", shape=SHAPE, series_number=4, **FLAIR)
    for number, (name, (image_type, _)) in enumerate(REFORMATS.items(), start=10):
        options = {**VENDOR_T1[vendor], "description": name, "image_type": image_type}
        dicom_series(subject / name, shape=(16, 16, 24), series_number=number, **options)
    record, table = inventory(subject, tmp_path / "out")
    assert record["status"] == OK, record["reason"]
    assert table.loc["2", "verdict"] == "selected", table.loc["2", "reason"]
    assert table.loc["2", "contrast"] == "T1w"
    assert record["findings"] == []
    assert table.loc["3", "contrast"] == "T2w" and table.loc["3", "reason"].startswith(
        "T2-weighted"
    )
    assert table.loc["4", "contrast"] == "FLAIR" and table.loc["4", "reason"].startswith("FLAIR")
    # Reformats have more slices than the acquisition, and still lose: they are no acquisition.
    for number, (_, word) in enumerate(REFORMATS.values(), start=10):
        reason = table.loc[str(number), "reason"]
        assert word in reason and reason.endswith("not an acquisition"), reason


def test_an_enhanced_multiframe_mprage_is_classified_from_its_functional_groups(
    tmp_path, enhanced_series, dicom_series
):
    subject = tmp_path / "s"
    enhanced_series(
        subject / "xa.dcm",
        shape=SHAPE,
        description="t1_mprage_sag_p2_iso",
        timing={"tr": 2300.0, "te": 2.32, "ti": 900.0, "flip": 8.0},
    )
    dicom_series(subject / "t2", series_number=5, **T2_TSE)
    record, table = inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    row = table.loc["3"]
    assert row["verdict"] == "selected" and row["contrast"] == "T1w"
    assert "inversion-prepared (TI 900 ms)" in row["contrast_evidence"]
    assert (row["tr"], row["te"], row["ti"]) == ("2300", "2.32", "900")


def test_headers_decide_over_names(tmp_path, dicom_series):
    """A T2 called ``t1_...`` is not audited as the T1; an MPRAGE called ``flair`` is."""
    subject = tmp_path / "s"
    dicom_series(subject / "a", series_number=2, **{**T2_TSE, "description": "t1_se_tra"})
    dicom_series(subject / "b", shape=SHAPE, series_number=3, description="flair_3d_sag")
    _, table = inventory(subject, tmp_path / "out")
    assert table.loc["3", "verdict"] == "selected"
    assert "named like FLAIR, the headers decide" in table.loc["3", "contrast_evidence"]
    assert table.loc["2", "reason"].startswith("T2-weighted")


def test_post_contrast_ranks_below_pre_contrast(tmp_path, dicom_series):
    subject = tmp_path / "s"
    # The post-contrast series is the later one and has more slices: it still loses.
    dicom_series(subject / "pre", shape=SHAPE, series_number=2)
    dicom_series(
        subject / "post",
        shape=(16, 16, 24),
        series_number=9,
        description="t1_mprage_sag",
        tags={"ContrastBolusAgent": "Gadovist 1 mmol/ml"},
    )
    record, table = inventory(subject, tmp_path / "out")
    assert table.loc["2", "verdict"] == "selected"
    assert table.loc["9", "post_contrast"] == "true"
    assert table.loc["9", "reason"].startswith("post-contrast T1, ranked below")
    assert record["findings"] == []
    # Only a post-contrast T1 (named so, no agent tag): audited, with a note.
    only = tmp_path / "only"
    dicom_series(only, shape=SHAPE, description="T1_MPRAGE_POST_GD")
    record, _ = inventory(only, tmp_path / "out2")
    assert record["status"] == OK and record["findings"] == ["post_contrast_only"]


def test_a_repeat_acquisition_is_listed_and_the_later_one_audited(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject / "first", shape=SHAPE, series_number=3)
    dicom_series(subject / "repeat", shape=SHAPE, series_number=7)
    record, table = inventory(subject, tmp_path / "out")
    assert table.loc["7", "verdict"] == "selected"
    assert table.loc["3", "reason"] == "repeat T1 acquisition, ranked below 't1_mprage_sag'"
    assert record["findings"] == ["repeat_series"]


def test_a_derived_copy_is_audited_only_without_an_original(tmp_path, dicom_series):
    """A 3D T1 re-created as DICOM from NIfTI (DERIVED\\SECONDARY, no timing) is the
    subject's T1 when alone, and loses to an original acquisition."""
    copy = dict(
        description="anat-T1w",
        image_type=("DERIVED", "SECONDARY"),
        sequence_name="",
        tags={
            "RepetitionTime": None,
            "EchoTime": None,
            "InversionTime": None,
            "ScanningSequence": None,
            "SequenceVariant": None,
        },
    )
    alone = tmp_path / "alone"
    dicom_series(alone, shape=SHAPE, series_number=401, **copy)
    record, table = inventory(alone, tmp_path / "out")
    assert record["status"] == OK and record["findings"] == ["derived_only"]
    assert "derived copy" in table.loc["401", "reason"]
    both = tmp_path / "both"
    dicom_series(both / "copy", shape=(16, 16, 24), series_number=401, **copy)
    dicom_series(both / "original", shape=SHAPE, series_number=2)
    record, table = inventory(both, tmp_path / "out2")
    assert table.loc["2", "verdict"] == "selected" and record["findings"] == []
    assert table.loc["401", "reason"].endswith("an original T1 acquisition is present")


def test_user_rules_override_the_headers(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject / "a", shape=SHAPE, series_number=2, description="t1_mprage_sag")
    dicom_series(
        subject / "b",
        series_number=3,
        **{**T2_TSE, "acquisition": "3D", "spacing": (1, 1, 1), "shape": SHAPE},
    )
    excluded, table = inventory(subject, tmp_path / "o1", {**RULES, "exclude": "mprage"})
    assert excluded["status"] == NO_SERIES
    assert table.loc["2", "reason"] == "excluded by rule (matches 'mprage')"
    _, table = inventory(subject, tmp_path / "o2", {**RULES, "include": "t2_tse"})
    assert table.loc["3", "verdict"] == "selected"
    assert table.loc["2", "reason"] == "not matched by the include rule"


def test_a_series_chosen_per_subject_overrides_everything(tmp_path, dicom_series):
    subject = tmp_path / "Patient 7"
    t1 = dicom_series(subject / "a", shape=SHAPE, series_number=2)
    dicom_series(subject / "b", series_number=3, **T2_TSE)
    record, table = inventory(subject, tmp_path / "o1", {**RULES, "choose": {"Patient7": 3}})
    assert record["status"] == OK
    assert table.loc["3", "verdict"] == "selected"
    assert table.loc["3", "reason"].startswith("chosen in series.choose (3); headers: spin echo")
    assert table.loc["2", "reason"] == "not the series chosen in series.choose (3)"
    uid = str(pydicom.dcmread(t1[0], stop_before_pixels=True).SeriesInstanceUID)
    record, table = inventory(subject, tmp_path / "o2", {**RULES, "choose": {"sub-Patient7": uid}})
    assert table.loc["2", "verdict"] == "selected"
    record, _ = inventory(subject, tmp_path / "o3", {**RULES, "choose": {"Patient 7": 99}})
    assert record["status"] == NO_SERIES
    assert record["reason"] == "the series chosen in series.choose (99) is not one of its 2 series"
    # Another subject's choice leaves this one to the headers.
    record, table = inventory(subject, tmp_path / "o4", {**RULES, "choose": {"other": 3}})
    assert table.loc["2", "verdict"] == "selected"
    # Two series of the same number: the user is asked for the UID.
    dicom_series(subject / "c", shape=SHAPE, series_number=3, description="t1_again")
    record, _ = inventory(subject, tmp_path / "o5", {**RULES, "choose": {"Patient7": 3}})
    assert record["status"] == NO_SERIES and "choose by SeriesInstanceUID" in record["reason"]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("sub-01_T1w.nii.gz", ("T1w", "BIDS suffix _T1w")),
        ("sub-01_ses-1_run-2_T2w.nii.gz", ("T2w", "BIDS suffix _T2w")),
        ("sub-01_FLAIR.nii", ("FLAIR", "BIDS suffix _FLAIR")),
        ("sub-01_dir-AP_dwi.nii.gz", ("DWI", "BIDS suffix _dwi")),
        ("sub-01_task-rest_bold.nii.gz", ("BOLD", "BIDS suffix _bold")),
        ("t2_tse_tra.nii.gz", ("T2w", "file name")),
        ("scan_T1c.nii.gz", ("", "")),
        ("image.nii.gz", ("", "")),
    ],
)
def test_nifti_names_declare_their_contrast(name, expected):
    assert series.file_class(name) == expected


@pytest.mark.parametrize(
    ("files", "status", "text"),
    [
        (["anat/sub-1_T1w.nii.gz"], OK, "only NIfTI image"),
        (["anat/sub-1_T2w.nii.gz"], NO_SERIES, "only a T2w image (sub-1_T2w.nii.gz), no T1w"),
        (["anat/sub-1_FLAIR.nii.gz"], NO_SERIES, "only a FLAIR image"),
        (
            ["anat/sub-1_T1w.nii.gz", "anat/sub-1_T2w.nii.gz", "anat/sub-1_FLAIR.nii.gz"],
            OK,
            "the one T1w candidate among 3 NIfTI images",
        ),
        (
            ["anat/sub-1_T2w.nii.gz", "anat/sub-1_FLAIR.nii.gz"],
            NO_SERIES,
            "no T1w image among 2 NIfTI files",
        ),
    ],
)
def test_a_nifti_cohort_audits_only_t1w_images(tmp_path, nifti_file, files, status, text):
    subject = tmp_path / "s"
    for name in files:
        nifti_file(subject / name, shape=(20, 20, 20))
    record, _ = inventory(subject, tmp_path / "out")
    assert record["status"] == status
    said = record["selected"]["description"] if status == OK else record["reason"]
    assert text in said
    if status == OK:
        assert record["selected"]["files"] == ["anat/sub-1_T1w.nii.gz"]


def _t1_and_t2_heads() -> tuple[np.ndarray, np.ndarray]:
    """The demo's template head (T1-weighted) and its T2-weighted rendering, 1 mm."""
    head = anatomy._head_volume()
    return head, np.interp(head, *physics._T2_LUT).astype(np.float32)


def test_the_image_itself_says_t1_or_t2():
    t1, t2 = _t1_and_t2_heads()
    assert series.contrast_look(series.core_skew(t1, (1.0, 1.0, 1.0))) == "T1w"
    assert series.contrast_look(series.core_skew(t2, (1.0, 1.0, 1.0))) == "T2w"
    assert np.isnan(series.core_skew(np.zeros((20, 20, 20)), (1.0, 1.0, 1.0)))


@pytest.mark.shared
@pytest.mark.parametrize(
    ("path", "look"),
    [
        ("nifti/niivue-demo-images/chris_t1.nii.gz", "T1w"),
        ("nifti/niivue/otsu_T1.nii.gz", "T1w"),
        ("nifti/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t1c.nii.gz", "T1w"),
        ("nifti/niivue-demo-images/register_T2w.nii.gz", "T2w"),
        ("nifti/neurolabusc-Clinical/T2.nii", "T2w"),
        ("nifti/BraTS-GLI-00001-000/BraTS-GLI-00001-000-t2w.nii.gz", "T2w"),
    ],
)
def test_real_images_look_like_their_contrast(shared_data, path, look):
    image = nib.load(shared_data / path)
    skew = series.core_skew(np.asarray(image.dataobj), image.header.get_zooms()[:3])
    assert series.contrast_look(skew) == look, skew


def test_a_t1_like_image_named_t2_is_said_so(tmp_path):
    t1, t2 = _t1_and_t2_heads()
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    misnamed = tmp_path / "misnamed"
    (misnamed / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(t1, affine), misnamed / "anat" / "sub-1_T2w.nii.gz")
    record, _ = inventory(misnamed, tmp_path / "o1")
    assert record["status"] == NO_SERIES
    assert record["reason"] == (
        "only a T2w image (sub-1_T2w.nii.gz), no T1w: its intensities look T1-weighted,"
        " check its name"
    )
    honest = tmp_path / "honest"
    (honest / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(t2, affine), honest / "anat" / "sub-1_T2w.nii.gz")
    record, _ = inventory(honest, tmp_path / "o2")
    assert record["reason"] == "only a T2w image (sub-1_T2w.nii.gz), no T1w"
    # A T2-like image named T1w is audited (the registration check judges it), with a warning.
    swapped = tmp_path / "swapped"
    (swapped / "anat").mkdir(parents=True)
    nib.save(nib.Nifti1Image(t2, affine), swapped / "anat" / "sub-1_T1w.nii.gz")
    record, table = inventory(swapped, tmp_path / "o3")
    assert record["status"] == OK
    assert any("look T2-weighted" in w for w in record["warnings"])
    assert float(table["core_skew"].iloc[0]) > series.T2_LIKE_SKEW


def _compress(folder: Path, how: str) -> None:
    openers = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with (
            path.open("rb") as plain,
            openers[how](path.with_name(path.name + how), "wb") as packed,
        ):
            shutil.copyfileobj(plain, packed)
        path.unlink()


@pytest.mark.parametrize("how", [".gz", ".bz2", ".xz"])
def test_compressed_dicom_files_are_read_and_converted(tmp_path, dicom_series, how):
    subject = tmp_path / "s"
    dicom_series(subject / "dicom", shape=SHAPE)
    _compress(subject, how)
    before = {p: p.read_bytes() for p in subject.rglob("*") if p.is_file()}
    record, table = inventory(subject, tmp_path / "out")
    assert record["status"] == OK and table.loc["1", "verdict"] == "selected"
    assert all(f.endswith(how) for f in record["selected"]["files"])
    folder = tmp_path / "staged"
    staged = sources.materialise(subject, record["selected"]["files"], folder)
    assert len(staged) == SHAPE[2] and all(p.read_bytes()[128:132] == b"DICM" for p in staged)
    assert {p: p.read_bytes() for p in subject.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    ("suffix", "layout"),
    [
        *((suffix, "in_folder") for suffix in (".zip", ".tar", ".tar.gz", ".tgz")),
        (".zip", "as_subject"),
        (".tar.gz", "as_subject"),
    ],
)
def test_an_archived_subject_folder_is_read_like_the_folder(tmp_path, dicom_series, suffix, layout):
    """An export packed as one archive, inside the subject's folder or as the subject
    itself (``input_dir/export.zip``), reads and converts like the plain folder."""
    plain = tmp_path / "plain"
    dicom_series(plain / "export" / "t1", shape=SHAPE, series_number=2)
    dicom_series(plain / "export" / "t2", series_number=3, **T2_TSE)
    packed = tmp_path / "packed"
    packed.mkdir()
    archive = packed / f"export{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(archive, "w") as handle:
            for path in sorted((plain / "export").rglob("*")):
                handle.write(path, path.relative_to(plain).as_posix())
    else:
        mode = {".tar": "w", ".tar.gz": "w:gz", ".tgz": "w:gz"}[suffix]
        with tarfile.open(archive, mode) as handle:
            handle.add(plain / "export", arcname="export")
    if layout == "as_subject":
        packed = archive
    record_plain, table_plain = inventory(plain, tmp_path / "o1")
    record_packed, table_packed = inventory(packed, tmp_path / "o2")
    assert record_packed["status"] == OK
    assert record_packed["metrics"] == record_plain["metrics"] | {
        "hdr_n_files": record_packed["metrics"]["hdr_n_files"]
    }
    columns = ["verdict", "reason", "contrast", "n_slices"]
    pd.testing.assert_frame_equal(table_packed[columns], table_plain[columns])
    files = record_packed["selected"]["files"]
    assert all(f.startswith(f"export{suffix}::export/t1/") for f in files)
    staged = sources.materialise(packed, files, tmp_path / "staged")
    originals = sorted((plain / "export" / "t1").iterdir())
    assert sorted(p.read_bytes() for p in staged) == sorted(p.read_bytes() for p in originals)
    # Converted like the folder: same voxels, same geometry.
    images = {}
    for name, subject, out in (
        ("plain", plain, tmp_path / "o1"),
        ("packed", packed, tmp_path / "o2"),
    ):
        record = dicom.convert_subject(
            subject,
            inventory_record=out / "inventory.json",
            out_image=out / "sub-x_T1w.nii.gz",
            out_sidecar=out / "sub-x_T1w.json",
            record_path=out / "convert.json",
        )
        assert record["status"] == OK, record["reason"]
        images[name] = nib.load(out / "sub-x_T1w.nii.gz")
    assert images["packed"].shape == images["plain"].shape
    np.testing.assert_allclose(images["packed"].affine, images["plain"].affine, atol=1e-5)
    np.testing.assert_array_equal(images["packed"].get_fdata(), images["plain"].get_fdata())


def test_a_subject_that_is_a_damaged_archive_says_so(tmp_path):
    subject = tmp_path / "sub-9.zip"
    subject.write_bytes(b"PK\x03\x04 not really a zip")
    record, _ = inventory(subject, tmp_path / "o")
    assert record["status"] == NO_SERIES
    assert record["reason"] == "no readable files: archive sub-9.zip could not be read (BadZipFile)"


def test_a_damaged_archive_or_compressed_file_is_reported_not_fatal(tmp_path, dicom_series):
    subject = tmp_path / "s"
    dicom_series(subject / "t1", shape=SHAPE)
    (subject / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    packed = gzip.compress(bytes(range(256)) * 40)
    (subject / "IM_cut.dcm.gz").write_bytes(packed[: len(packed) // 2])  # cut mid-stream
    record, _ = inventory(subject, tmp_path / "out")
    assert record["status"] == OK
    assert any("broken.zip could not be read" in w for w in record["warnings"])
    assert record["metrics"]["hdr_n_unreadable"] == 1


#: The three DICOM heads of ../shared/data/heads: folder -> (a note finding, shape).
REAL_HEADS = {
    # gzip-compressed Philips export (``*.dcm.gz``), ADNI 3D T1-TFE.
    "philips-ingenia-elition-3t": ([], 170),
    # Re-created from NIfTI: DERIVED\SECONDARY, no acquisition tags.
    "studyforrest-sub02_philips-achieva-3t": (["derived_only"], 384),
    # Multi-echo MPRAGE (RMS combined) whose headers carry no TI; one partition of the
    # 1 mm grid is absent from the export (a 2 mm gap), which the header audit reports.
    "siemens-trio-3t_memprage": (["missing_slices"], 175),
}


@pytest.mark.shared
@pytest.mark.parametrize("head", list(REAL_HEADS))
def test_the_real_dicom_heads_are_selected_and_converted(shared_data, tmp_path, head):
    findings, n_slices = REAL_HEADS[head]
    subject = shared_data / "heads" / head
    record, table = inventory(subject, tmp_path / "out", rules={})
    assert record["status"] == OK, record["reason"]
    assert record["findings"] == findings
    assert table["verdict"].tolist() == ["selected"] and table["contrast"].tolist() == ["T1w"]
    assert int(table["n_slices"].iloc[0]) == n_slices
    converted = dicom.convert_subject(
        subject,
        inventory_record=tmp_path / "out" / "inventory.json",
        out_image=tmp_path / "out" / "sub-x_T1w.nii.gz",
        out_sidecar=tmp_path / "out" / "sub-x_T1w.json",
        record_path=tmp_path / "out" / "convert.json",
    )
    assert converted["status"] == OK, converted["reason"]
    image = nib.load(tmp_path / "out" / "sub-x_T1w.nii.gz")
    assert image.ndim == 3 and min(image.shape) >= 160
