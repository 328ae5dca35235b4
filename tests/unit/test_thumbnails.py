"""The report's pictures of every subject (mriaudit.thumbnails), judged by geometry and values."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from PIL import Image

from mriaudit import thumbnails

SIZE = thumbnails.SIZE


def head(shape=(96, 112, 80), *, ghost: bool = False) -> np.ndarray:
    """An ellipsoid 'head' of value 100 in air of 0; the ghost is a faint copy shifted half
    the field of view along the second axis (the phase-encode direction), into the air."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * np.array([0.3, 0.25, 0.35])
    inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
    volume = 100.0 * inside
    if ghost:
        volume += 0.15 * np.roll(volume, shape[1] // 2, axis=1)
    return volume.astype(np.float32)


def test_native_picture_shows_three_planes_of_the_whole_field_of_view():
    volume = head()
    volume[70, 80, 60] = 0  # keep the window robust to one voxel
    image = nib.Nifti1Image(volume, np.diag([1.0, 1.0, 1.2, 1.0]))
    picture = thumbnails.native_picture(image)
    assert picture.shape == (SIZE, 3 * SIZE) and picture.dtype == np.uint8
    # The head is bright in the middle of each plane, the air black at the corners.
    for panel in np.split(picture, 3, axis=1):
        assert panel[SIZE // 2, SIZE // 2] > 200
        assert panel[2, 2] < 10


def test_the_subjects_left_is_on_the_left_and_superior_up_whatever_the_voxel_order():
    volume = np.zeros((40, 40, 40), np.float32)
    volume[5:12, 18:22, 30:36] = 100.0  # low x (left in RAS), high z (superior)
    ras = nib.Nifti1Image(volume, np.eye(4))
    # The same head stored left-right flipped (LAS voxel order): the picture must not change.
    flip = np.diag([-1.0, 1.0, 1.0, 1.0])
    flip[0, 3] = 39
    las = nib.Nifti1Image(volume[::-1].copy(), flip)
    for image in (ras, las):
        coronal = thumbnails.native_picture(image, size=40)[:, 40:80]
        rows, cols = np.nonzero(coronal > 128)
        assert cols.mean() < 20 and rows.mean() < 20, (cols.mean(), rows.mean())


def test_a_ghost_in_the_air_is_visible_in_the_native_picture(tmp_path):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    clean = tmp_path / "clean.nii.gz"
    ghosted = tmp_path / "ghost.nii.gz"
    nib.save(nib.Nifti1Image(head(), affine), clean)
    nib.save(nib.Nifti1Image(head(ghost=True), affine), ghosted)
    pictures = {}
    for name, path in (("clean", clean), ("ghost", ghosted)):
        out = thumbnails.write_native_thumbnail(path, tmp_path / f"{name}.webp")
        assert out.stat().st_size < 20_000
        pictures[name] = np.asarray(Image.open(out).convert("L"), dtype=float)
    # The axial panel's top band (anterior air): black when clean, the ghost's grey otherwise.
    band = (slice(0, 12), slice(SIZE // 4, 3 * SIZE // 4))
    assert pictures["clean"][band].mean() < 5
    assert pictures["ghost"][band].mean() > pictures["clean"][band].mean() + 15


def test_anomaly_picture_crosses_the_maps_maximum_and_colours_it():
    image = head((60, 70, 60))
    anomaly = np.zeros_like(image)
    anomaly[20:24, 30:34, 40:44] = 8.0
    picture = thumbnails.anomaly_picture(image, anomaly, zooms=(2.0, 2.0, 2.0), size=60)
    assert picture.shape == (60, 180, 3)
    warm = (picture[..., 0] > 200) & (picture[..., 2] < 60)  # red to yellow, no blue
    # The lesion is drawn in each of the three planes through it.
    assert all(panel.any() for panel in np.split(warm, 3, axis=1))
    plain = thumbnails.anomaly_picture(image, None, zooms=(2.0, 2.0, 2.0), size=60)
    assert (plain[..., 0] == plain[..., 2]).all()  # grey only without a map


def test_a_picture_that_cannot_be_drawn_is_a_warning_not_a_failure(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a NIfTI")
    out = tmp_path / "figures" / "picture.webp"
    warnings = thumbnails.try_draw(thumbnails.write_native_thumbnail, broken, out)
    assert len(warnings) == 1 and warnings[0].startswith("no report picture: ")
    assert not out.exists() and not list(out.parent.glob("*"))  # nothing half-written
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(head((30, 30, 30)), np.eye(4)), good)
    assert thumbnails.try_draw(thumbnails.write_native_thumbnail, good, out) == []
    assert out.is_file()
