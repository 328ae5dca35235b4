"""The demo cohort generator: determinism, DICOM validity, labels, broken inputs, anomalies."""

from __future__ import annotations

import collections
import copy
import hashlib
import io
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import dcm2niix
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

from mriaudit import cohort, demo, heads
from mriaudit import series as series_class
from mriaudit.demo import anatomy, generate, physics, writer

SEED = 3
VOXEL_MM = 3.0
N_SUBJECTS = 8


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame]:
    out = tmp_path_factory.mktemp("demo") / "cohort"
    table = demo.generate_cohort(
        out, n_subjects=N_SUBJECTS, seed=SEED, voxel_size_mm=VOXEL_MM, jobs=1
    )
    return out, table


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _series(folder: Path) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """Headers of every file under ``folder`` grouped by SeriesInstanceUID."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = collections.defaultdict(list)
    for path in _files(folder):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        groups[ds.SeriesInstanceUID].append((path, ds))
    return groups


def _t1(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    t1 = [s for s in _series(folder).values() if s[0][1].MRAcquisitionType == "3D"]
    assert len(t1) == 1, f"{folder.name}: expected one 3D series, found {len(t1)}"
    return sorted(t1[0], key=lambda item: int(item[1].InstanceNumber))


def _kind_folders(table: pd.DataFrame, kind: str) -> list[str]:
    return list(table.loc[table["kind"] == kind, "folder"])


def _normal(plan: demo.SubjectPlan) -> demo.SubjectPlan:
    return replace(plan, kind="normal", variant="")


def _render_t1(plan: demo.SubjectPlan) -> demo.Series:
    series = demo.render_subject(plan, voxel_size_mm=VOXEL_MM).t1()
    assert series is not None
    return series


# ---------------------------------------------------------------- plan and labels


def test_plan_mixes_kinds_by_cohort_size():
    full = collections.Counter(p.kind for p in demo.plan_cohort(30, seed=0))
    assert full["normal"] == 17
    assert all(1 <= full[kind] <= 2 for kind in demo.ANOMALY_KINDS), full
    assert all(full[kind] == 1 for kind in demo.BROKEN_KINDS), full
    small = collections.Counter(p.kind for p in demo.plan_cohort(8, seed=0))
    assert all(small[kind] == 1 for kind in demo.BROKEN_KINDS), small
    assert small["normal"] >= 2 and sum(small[k] for k in demo.ANOMALY_KINDS) >= 1, small
    with pytest.raises(ValueError, match="at least"):
        demo.plan_cohort(demo.MIN_SUBJECTS - 1, seed=0)


def test_labels_table_lists_every_folder(generated):
    out, table = generated
    on_disk = pd.read_csv(out / "labels.tsv", sep="\t", dtype={"folder": str})
    assert list(on_disk.columns) == list(demo.LABEL_COLUMNS)
    assert len(on_disk) == N_SUBJECTS
    pd.testing.assert_frame_equal(
        on_disk[["folder", "truth", "kind"]], table[["folder", "truth", "kind"]]
    )
    folders = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert sorted(on_disk["folder"]) == folders
    assert [p.name for p in out.iterdir() if not p.is_dir()] == ["labels.tsv"]
    assert set(on_disk["kind"]) <= set(demo.KINDS)
    assert (on_disk["truth"] == (on_disk["kind"] != "normal").astype(int)).all()
    assert cohort.read_labels(out / "labels.tsv") == dict(
        zip(on_disk["folder"], on_disk["truth"], strict=True)
    )
    # One messy archive name whose BIDS id stays unique and processed.
    subjects = cohort.list_subjects(out)
    assert any(" " in s.folder and "(" in s.folder for s in subjects)
    assert all(s.processed for s in subjects)
    lesions = on_disk[on_disk["kind"] == "lesion"]
    assert not lesions.empty
    assert (
        lesions[["lesion_x_mm", "lesion_y_mm", "lesion_z_mm", "lesion_radius_mm"]]
        .notna()
        .all()
        .all()
    )
    assert on_disk.loc[on_disk["kind"] != "lesion", "lesion_radius_mm"].isna().all()


def test_same_seed_gives_the_same_cohort(generated, tmp_path):
    out, _ = generated
    again = tmp_path / "again"
    labels = tmp_path / "labels.tsv"
    # Through the command line and two worker processes this time: neither may change a byte.
    argv = [str(again), "--subjects", str(N_SUBJECTS), "--seed", str(SEED), "--jobs", "2"]
    assert demo.main([*argv, "--voxel-size", str(VOXEL_MM), "--labels", str(labels)]) == 0

    def digest(root: Path) -> dict[str, str]:
        return {
            str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in _files(root)
            if p.name != "labels.tsv"
        }

    assert digest(again) == digest(out)
    assert labels.read_text() == (out / "labels.tsv").read_text()
    # The seed matters: the same subject under another seed has other pixels.
    plan = next(p for p in demo.plan_cohort(N_SUBJECTS, seed=SEED) if p.kind == "normal")
    first = _render_t1(plan).frames
    other = _render_t1(replace(plan, seed=SEED + 1)).frames
    assert first.shape != other.shape or not np.array_equal(first, other)


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "old").mkdir()
    with pytest.raises(FileExistsError, match="not empty"):
        demo.generate_cohort(tmp_path, n_subjects=5, seed=0, voxel_size_mm=VOXEL_MM)


# ------------------------------------------------------------------------ headers


def test_headers_are_valid_and_geometry_is_consistent(generated):
    out, table = generated
    sop_uids = []
    for folder in table["folder"]:
        series = _series(out / folder)
        studies = {items[0][1].StudyInstanceUID for items in series.values()}
        frames = {items[0][1].FrameOfReferenceUID for items in series.values()}
        assert len(studies) <= 1 and len(frames) <= 1, folder
        numbers = [items[0][1].SeriesNumber for items in series.values()]
        assert len(set(numbers)) == len(numbers), folder
        for items in series.values():
            for _, ds in items:
                sop_uids.append(ds.SOPInstanceUID)
                assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
                assert ds.SOPClassUID == MRImageStorage == ds.file_meta.MediaStorageSOPClassUID
                assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
                assert ds.Modality == "MR" and ds.PatientPosition == "HFS"
                assert str(ds.PatientName).startswith("DEMO^SUBJECT")
                assert ds.InstitutionName == "Demo Hospital" and ds.PatientBirthDate
                assert ds.BitsAllocated == 16 and 12 <= ds.BitsStored <= 16
                assert ds.HighBit == ds.BitsStored - 1 and ds.PixelRepresentation == 0
                assert ds.PhotometricInterpretation == "MONOCHROME2"
                assert ds.Manufacturer in {v.manufacturer for v in demo.VENDORS}
    assert len(sop_uids) == len(set(sop_uids))
    assert all(len(uid) <= 64 for uid in sop_uids)


def test_t1_positions_follow_orientation_and_spacing(generated):
    out, table = generated
    for folder in _kind_folders(table, "normal"):
        t1 = _t1(out / folder)
        first = t1[0][1]
        orientation = np.array(first.ImageOrientationPatient, dtype=float)
        row, col = orientation[:3], orientation[3:]
        assert abs(row @ col) < 1e-5 and np.allclose([row @ row, col @ col], 1, atol=1e-5)
        normal = np.cross(row, col)
        spacing = float(first.SpacingBetweenSlices)
        assert spacing == pytest.approx(float(first.SliceThickness))
        assert abs(spacing / VOXEL_MM - 1) <= 0.11
        origin = np.array(first.ImagePositionPatient, dtype=float)
        for index, (path, ds) in enumerate(t1):
            assert int(ds.InstanceNumber) == index + 1
            position = np.array(ds.ImagePositionPatient, dtype=float)
            np.testing.assert_allclose(position, origin + index * spacing * normal, atol=1e-3)
            assert list(map(float, ds.ImageOrientationPatient)) == pytest.approx(list(orientation))
            if index == len(t1) // 2:
                pixels = pydicom.dcmread(path).pixel_array
                assert pixels.shape == (ds.Rows, ds.Columns)
                assert pixels.max() < 2**ds.BitsStored and pixels.max() > 0


def test_series_encoder_writes_what_dcmwrite_writes():
    plan = next(p for p in demo.plan_cohort(N_SUBJECTS, seed=SEED) if p.kind == "normal")
    scan = demo.render_subject(
        replace(plan, has_localizer=True, has_t2=True), voxel_size_mm=VOXEL_MM
    )
    study = writer._study_tags(scan)
    for series in scan.series:
        static = writer._series_dataset(scan, series, study)
        frame = writer._frame_dataset(scan, series, len(series.frames) // 2)
        full = copy.deepcopy(static)
        for element in frame:
            full[element.tag] = element
        expected = io.BytesIO()
        pydicom.dcmwrite(expected, full, enforce_file_format=True)
        assert writer._SeriesEncoder(static).encode(frame) == expected.getvalue(), series.role


# ------------------------------------------------------------------ broken inputs


def test_broken_inputs_exist_as_specified(generated):
    out, table = generated
    (empty,) = _kind_folders(table, "empty_folder")
    assert list((out / empty).iterdir()) == []

    (localizer_only,) = _kind_folders(table, "localizer_only")
    headers = [ds for items in _series(out / localizer_only).values() for _, ds in items]
    assert headers and all("LOCALIZER" in ds.ImageType for ds in headers)
    assert {ds.MRAcquisitionType for ds in headers} == {"2D"}

    (truncated,) = _kind_folders(table, "truncated_file")
    broken = []
    for path, ds in _t1(out / truncated):
        expected = ds.Rows * ds.Columns * 2
        try:
            if len(pydicom.dcmread(path).PixelData) < expected:
                broken.append(path)
        except Exception:
            broken.append(path)
    assert len(broken) == 1


# ---------------------------------------------------------------------- dcm2niix


def _convert(folder: Path, out: Path) -> subprocess.CompletedProcess:
    out.mkdir()
    command = [dcm2niix.bin, "-z", "y", "-b", "y", "-o", str(out), "-f", "%s_%d", str(folder)]
    return subprocess.run(command, capture_output=True, text=True, check=False, timeout=120)


def test_dcm2niix_converts_a_normal_subject_to_the_expected_geometry(generated, tmp_path):
    out, table = generated
    folder = next(f for f in _kind_folders(table, "normal") if len(_series(out / f)) > 1)
    result = _convert(out / folder, tmp_path / "nii")
    assert result.returncode == 0, result.stdout + result.stderr
    log = (result.stdout + result.stderr).lower()
    assert "missing" not in log.replace("missing ge protocol data block", "")
    t1 = _t1(out / folder)
    first = t1[0][1]
    outputs = {
        p: json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())
        for p in (tmp_path / "nii").glob("*.nii.gz")
    }
    volumes = [p for p, sidecar in outputs.items() if sidecar.get("MRAcquisitionType") == "3D"]
    assert len(volumes) == 1, sorted(p.name for p in outputs)
    assert volumes[0].name.startswith(f"{first.SeriesNumber}_")
    others = [sidecar["SeriesNumber"] for p, sidecar in outputs.items() if p not in volumes]
    assert others and first.SeriesNumber not in others
    img = nib.load(volumes[0])
    assert img.ndim == 3
    pixel = float(first.PixelSpacing[0])
    expected = sorted(
        [(first.Columns, pixel), (first.Rows, pixel), (len(t1), float(first.SpacingBetweenSlices))]
    )
    found = sorted(zip(img.shape, map(float, img.header.get_zooms()), strict=True))
    assert [n for n, _ in found] == [n for n, _ in expected]
    np.testing.assert_allclose([z for _, z in found], [z for _, z in expected], atol=1e-3)
    # The volume centre lands on the same scanner point (DICOM LPS -> NIfTI RAS).
    row, col = (np.array(first.ImageOrientationPatient[i : i + 3], dtype=float) for i in (0, 3))
    corners = [np.array(t1[i][1].ImagePositionPatient, dtype=float) for i in (0, -1)]
    centre_lps = (corners[0] + corners[1]) / 2 + (
        (first.Columns - 1) * row + (first.Rows - 1) * col
    ) * pixel / 2
    centre_ras = img.affine @ np.r_[(np.array(img.shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre_ras[:3], centre_lps * [-1, -1, 1], atol=0.5)


def test_dcm2niix_puts_the_lesion_where_the_labels_say(generated, tmp_path):
    out, table = generated
    row = table[table["kind"] == "lesion"].iloc[0]
    plan = next(p for p in demo.plan_cohort(N_SUBJECTS, seed=SEED) if p.folder == row["folder"])
    scan = demo.render_subject(plan, voxel_size_mm=VOXEL_MM)
    assert scan.lesion is not None and scan.lesion.contrast == "hyperintense"
    result = _convert(out / row["folder"], tmp_path / "nii")
    assert result.returncode == 0, result.stdout + result.stderr
    (volume,) = [
        p
        for p in (tmp_path / "nii").glob("*.nii.gz")
        if json.loads(p.with_name(p.name.replace(".nii.gz", ".json")).read_text())[
            "MRAcquisitionType"
        ]
        == "3D"
    ]
    img = nib.load(volume)
    data = img.get_fdata()

    def value_at(mni: tuple[float, float, float]) -> float:
        lps = scan.anatomy.scanner_from_mni(np.array([mni]))[0]
        voxel = np.linalg.inv(img.affine) @ np.r_[lps * [-1, -1, 1], 1]
        index = np.round(voxel[:3]).astype(int)
        return float(data[tuple(slice(i - 1, i + 2) for i in index)].mean())

    centre = (row["lesion_x_mm"], row["lesion_y_mm"], row["lesion_z_mm"])
    mirrored = (-centre[0], centre[1], centre[2])
    # Bright at the labelled centre, not at its left-right mirror: no flipped axis anywhere.
    assert value_at(centre) > 1.15 * value_at(mirrored)


# ---------------------------------------------------------------------- anomalies


@pytest.fixture(scope="module")
def base_plan() -> demo.SubjectPlan:
    return demo.SubjectPlan(folder="sub-x", number=4, kind="normal", seed=11, has_localizer=False)


@pytest.fixture(scope="module")
def normal_frames(base_plan) -> np.ndarray:
    return _render_t1(base_plan).frames.astype(float)


@pytest.mark.parametrize("variant", ["hyper", "hypo"])
def test_lesion_changes_only_its_neighbourhood(base_plan, normal_frames, variant):
    plan = replace(base_plan, kind="lesion", variant=variant)
    scan = demo.render_subject(plan, voxel_size_mm=VOXEL_MM)
    series, lesion = scan.t1(), scan.lesion
    assert lesion is not None and 5 <= lesion.radius_mm <= 20
    changed = np.abs(series.frames.astype(float) - normal_frames) > 0
    assert changed.sum() * VOXEL_MM**3 > 0.3 * 4 / 3 * np.pi * lesion.radius_mm**3
    # Voxel centres of the changed voxels in scanner mm, against the lesion centre.
    orientation = series.orientations[0]
    k, r, c = np.nonzero(changed)
    points = (
        series.positions[k]
        + r[:, None] * series.pixel_mm * orientation[3:]
        + c[:, None] * series.pixel_mm * orientation[:3]
    )
    centre = scan.anatomy.scanner_from_mni(np.array([lesion.centre_mni_mm]))[0]
    distance = np.linalg.norm(points - centre, axis=1)
    assert distance.max() < lesion.radius_mm * 1.4 + 2 * VOXEL_MM + 5
    inside = distance < lesion.radius_mm * 0.5
    difference = series.frames.astype(float)[changed][inside] - normal_frames[changed][inside]
    assert (difference.mean() > 0) == (variant == "hyper")


def test_missing_slices_zeroed_and_removed(base_plan, normal_frames, tmp_path):
    zeroed = _render_t1(replace(base_plan, kind="missing_slices", variant="zeroed")).frames
    blank = np.flatnonzero(zeroed.reshape(len(zeroed), -1).max(axis=1) == 0)
    assert 4 <= len(blank) <= 8 and np.all(np.diff(blank) == 1)
    kept = np.setdiff1d(np.arange(len(zeroed)), blank)
    np.testing.assert_array_equal(zeroed[kept], normal_frames[kept])

    plan = replace(base_plan, kind="missing_slices", variant="removed")
    scan = demo.render_subject(plan, voxel_size_mm=VOXEL_MM)
    files = demo.write_subject(scan, tmp_path / "sub-x")
    dropped = sorted(scan.t1().dropped)
    assert 3 <= len(dropped) <= 6 and len(files) == len(scan.t1().frames) - len(dropped)
    numbers = sorted(int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber) for p in files)
    assert set(range(1, len(scan.t1().frames) + 1)) - set(numbers) == {i + 1 for i in dropped}


def _background(frames: np.ndarray, reference: np.ndarray) -> float:
    """Mean signal where the reference image is air (its darkest fifth)."""
    return float(frames[reference <= np.percentile(reference, 20)].mean())


@pytest.mark.parametrize("kind", ["ghosting", "spike", "noise"])
def test_artefacts_put_signal_into_the_background(base_plan, normal_frames, kind):
    frames = _render_t1(replace(base_plan, kind=kind)).frames.astype(float)
    assert frames.shape == normal_frames.shape
    assert _background(frames, normal_frames) > 1.5 * _background(normal_frames, normal_frames)


def test_fold_aliases_everything_outside_the_kept_field_of_view():
    signal = np.arange(2 * 10 * 3, dtype=float).reshape(2, 10, 3)
    folded, start = physics._fold(signal, 1, 0.6)
    assert folded.shape == (2, 6, 3) and start == 2
    assert folded.sum() == signal.sum()
    # Row 0 of the new field holds original rows 2 and 8; row 5 holds rows 1 and 7.
    np.testing.assert_array_equal(folded[:, 0], signal[:, 2] + signal[:, 8])
    np.testing.assert_array_equal(folded[:, 5], signal[:, 1] + signal[:, 7])


def test_wraparound_shrinks_the_phase_field_of_view(base_plan):
    normal = _render_t1(base_plan)
    folded = _render_t1(replace(base_plan, kind="wraparound"))
    shrunk = [i for i in (1, 2) if folded.frames.shape[i] < normal.frames.shape[i]]
    assert len(shrunk) == 1 and folded.frames.shape[0] == normal.frames.shape[0]
    axis = shrunk[0]
    length = folded.frames.shape[axis]
    assert 0.65 < length / normal.frames.shape[axis] < 0.8
    # The header follows the cropped grid: the first pixel moved in along the phase axis.
    start = (normal.frames.shape[axis] - length) // 2
    orientation = normal.orientations[0]
    step = orientation[3:] if axis == 1 else orientation[:3]
    expected = normal.positions + start * normal.pixel_mm * step
    np.testing.assert_allclose(folded.positions, expected, atol=1e-3)
    # The folded-in head adds signal near both edges of the new field of view.
    band = list(range(3)) + list(range(length - 3, length))
    crop = np.take(normal.frames.astype(float), range(start, start + length), axis=axis)
    assert (
        np.take(folded.frames, band, axis=axis).mean() > 1.1 * np.take(crop, band, axis=axis).mean()
    )


def test_bias_and_wrong_contrast_change_intensities_inside_the_head(base_plan, normal_frames):
    head = normal_frames > 0.3 * np.percentile(normal_frames, 99)
    biased = _render_t1(replace(base_plan, kind="bias")).frames.astype(float)
    ratio = biased[head] / np.maximum(normal_frames[head], 1)
    low, high = np.percentile(ratio, [1, 99])
    assert high / low > 1.3
    inverted = _render_t1(replace(base_plan, kind="wrong_contrast")).frames.astype(float)
    assert np.corrcoef(inverted[head], normal_frames[head])[0, 1] < 0


def test_a_t2w_cohort_renders_a_3d_t2_of_the_same_head(base_plan, normal_frames):
    scan = demo.render_subject(base_plan, voxel_size_mm=VOXEL_MM, contrast="T2w")
    t2 = scan.t1()
    assert t2 is not None and t2.frames.shape == normal_frames.shape
    names = {description for v in demo.VENDORS for description in v.t2_3d_description.values()}
    assert t2.description in names
    assert t2.tags["MRAcquisitionType"] == "3D" and "InversionTime" not in t2.tags
    assert t2.tags["RepetitionTime"] > 2000 and t2.tags["EchoTime"] > 80
    # Same anatomy, reversed tissue order: the T2 anti-correlates with the T1 in the head.
    head = normal_frames > 0.3 * np.percentile(normal_frames, 99)
    assert np.corrcoef(t2.frames[head].astype(float), normal_frames[head])[0, 1] < 0
    assert any("3D T2 " in note for note in scan.notes)
    with pytest.raises(ValueError, match="unknown contrast"):
        demo.render_subject(base_plan, voxel_size_mm=VOXEL_MM, contrast="PD")


def test_real_head_plan_puts_every_person_among_the_normals_and_every_kind_twice(tmp_path):
    heads = {name: tmp_path / f"head-{name}.nii.gz" for name in "ABC"}
    plans = demo.plan_real_heads(heads, renditions=2, per_kind=2, seed=0)
    normals = collections.Counter(p.person for p in plans if p.kind == "normal")
    assert normals == {"A": 2, "B": 2, "C": 2}
    kinds = collections.Counter(p.kind for p in plans if p.kind != "normal")
    assert kinds == dict.fromkeys(demo.ANOMALY_KINDS, 2)
    # Anomalies are dealt to people in turn, and every plan renders its person's head.
    assert len({p.person for p in plans if p.kind != "normal"}) == 3
    assert all(p.head_path == str(heads[p.person]) for p in plans)
    assert len({p.folder for p in plans}) == len(plans)
    assert plans == demo.plan_real_heads(heads, renditions=2, per_kind=2, seed=0)
    with pytest.raises(ValueError, match="renditions"):
        demo.plan_real_heads(heads, renditions=0, per_kind=1, seed=0)


def test_a_real_head_renders_like_the_template_head(tmp_path):
    """A head volume on the template grid replaces the template head (person in the labels)."""
    plan = next(p for p in demo.plan_cohort(N_SUBJECTS, seed=SEED) if p.kind == "normal")
    template_head = anatomy._head_volume()
    shifted = np.roll(template_head, 6, axis=1) * 0.9  # another head on the same grid
    path = tmp_path / "head-X.nii.gz"
    nib.save(nib.Nifti1Image(shifted, np.eye(4)), path)
    real = replace(plan, person="X", head_path=str(path))
    base = demo.render_subject(plan, voxel_size_mm=VOXEL_MM).t1()
    other = demo.render_subject(real, voxel_size_mm=VOXEL_MM).t1()
    assert base.frames.shape != other.frames.shape or not np.array_equal(base.frames, other.frames)
    row = generate._truth_row(demo.render_subject(real, voxel_size_mm=VOXEL_MM))
    assert row["person"] == "X"
    assert (
        generate._truth_row(demo.render_subject(plan, voxel_size_mm=VOXEL_MM))["person"] == "MNI152"
    )


def test_flatten_removes_a_smooth_field_and_keeps_the_anatomy():
    """A prepared head carries anatomy only: a +-30 % field on the template head is
    taken out (one N4 pass leaves part of it, so ``flatten`` repeats), the tissue
    contrast stays."""
    head = anatomy._head_volume()[::2, ::2, ::2].copy()  # 2 mm: a quick N4, same physics
    inside = head > 0.05
    x = np.linspace(-1.0, 1.0, head.shape[0])[:, None, None]
    field = 1.0 + 0.3 * x * np.ones_like(head)
    flat = heads.flatten(head * field, spacing_mm=2.0)

    def left_right(volume):
        half = head.shape[0] // 2
        brain = inside & (head > np.percentile(head[inside], 60))
        left, right = brain.copy(), brain.copy()
        left[half:], right[:half] = False, False
        return float(np.median(volume[right]) / np.median(volume[left]))

    assert left_right(head * field) > 1.15
    assert left_right(flat) == pytest.approx(left_right(head), abs=0.06)
    assert np.corrcoef(flat[inside], head[inside])[0, 1] > 0.97


# ------------------------------------------------------- contrasts beside the T1


def test_contrasts_beside_the_t1_leave_the_t1_cohort_as_it_was():
    plain = demo.plan_cohort(30, seed=0)
    plans = demo.plan_cohort(30, seed=0, contrasts=("T2w", "FLAIR"))
    moved = collections.Counter()
    for before, after in zip(plain, plans, strict=True):
        assert after.folder == before.folder and after.has_localizer == before.has_localizer
        if after.anomaly_contrast == "T1w":
            assert (after.kind, after.variant) == (before.kind, before.variant)
        else:  # an anomaly of another contrast is planted in a normal subject
            assert before.kind == "normal" and after.kind != "normal"
            moved[after.anomaly_contrast] += 1
        has_t1 = after.kind not in ("localizer_only", "empty_folder")
        assert after.contrasts == (("T2w", "FLAIR") if has_t1 else ())
        assert not after.has_t2  # the 2D distractor gives way to the real T2w
    assert moved == {"T2w": 3, "FLAIR": 3}
    assert sum(p.kind == "normal" for p in plans) >= 3
    with pytest.raises(ValueError, match="unknown contrasts"):
        demo.plan_cohort(30, seed=0, contrasts=("PD",))


def test_an_anomaly_of_one_contrast_leaves_the_others_normal(base_plan, normal_frames):
    plan = replace(base_plan, contrasts=("T2w", "FLAIR"), kind="lesion", variant="hyper")
    flair_lesion = demo.render_subject(
        replace(plan, anomaly_contrast="FLAIR"), voxel_size_mm=VOXEL_MM
    )
    normal = demo.render_subject(replace(plan, kind="normal", variant=""), voxel_size_mm=VOXEL_MM)
    # A lesion labelled in the T1 is the T1's alone too.
    t1_lesion = demo.render_subject(plan, voxel_size_mm=VOXEL_MM)
    t1_roles = {s.role: s for s in t1_lesion.series}
    roles = {s.role: s for s in flair_lesion.series}
    assert set(roles) == {"t1", "t2w", "flair"}
    np.testing.assert_array_equal(roles["t1"].frames, normal_frames)  # the T1 is normal
    others = {s.role: s for s in normal.series}
    np.testing.assert_array_equal(roles["t2w"].frames, others["t2w"].frames)
    assert not np.array_equal(t1_roles["t1"].frames, normal_frames)
    for role in ("t2w", "flair"):
        np.testing.assert_array_equal(t1_roles[role].frames, others[role].frames)
    changed = roles["flair"].frames.astype(float) - others["flair"].frames.astype(float)
    assert changed.max() > 0.2 * others["flair"].frames.max()  # FLAIR-bright
    assert flair_lesion.notes[0].startswith("FLAIR only: bright lesion")
    # The headers say what each series is: the classifier the audit uses reads them so.
    for role, expected in (("t2w", "T2w"), ("flair", "FLAIR")):
        tags = roles[role].tags
        families = set(np.atleast_1d(tags["ScanningSequence"]))
        found, _ = series_class.contrast_from_timing(
            families,
            tr=tags["RepetitionTime"],
            te=tags["EchoTime"],
            ti=tags.get("InversionTime"),
            flip=tags["FlipAngle"],
        )
        assert found == expected, (role, tags)
    # Its own draws: the FLAIR is not the T1's acquisition in another look-up table.
    assert roles["flair"].frames.shape != normal_frames.shape or not np.array_equal(
        roles["flair"].positions, roles["t1"].positions
    )
