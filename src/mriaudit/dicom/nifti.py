"""NIfTI input: a subject folder with NIfTI files and no usable DICOM series.

Each file is a row like a DICOM series (BIDS suffix, sidecar headers, the
image's own contrast by ``series.core_skew``); ``choose_nifti`` picks the T1w
image and ``_no_nifti_reason`` says why none was chosen ("only a T2w image").
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from mriaudit import series as series_class
from mriaudit.dicom.geometry import orientation_label
from mriaudit.dicom.scan import _number, _plural, _text
from mriaudit.dicom.table import SERIES_COLUMNS

log = logging.getLogger(__name__)


_NIFTI_NOT_IMAGE = re.compile(r"mask|seg|label|lesion|roi|probseg|dseg", re.IGNORECASE)


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
    the others, a post-contrast name (``POST_GAD``, ``t1c``) loses to a native one,
    names that look like masks or labels lose, then the largest image wins.
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
        # A post-contrast T1 (``T1_POST_GAD``, BraTS ``t1c``) after a native one, as in DICOM.
        post = series_class.post_contrast(None, name(i).split(".")[0])
        not_image = bool(_NIFTI_NOT_IMAGE.search(name(i)))
        return (
            not says_t1,
            post,
            not_image,
            -int(np.prod(rows[i]["shape"][:3])),
            rows[i]["path"],
        )

    ordered = sorted(eligible, key=key)
    best = ordered[0]
    named = [i for i in eligible if rows[i]["contrast"] == "T1w"]
    if len(named) == 1:
        why = f"name says T1 ({name(best)}) among {len(eligible)} NIfTI images"
    elif named:
        why = (
            f"{len(named)} NIfTI names say T1; chose {name(best)} "
            "(a native T1 before a post-contrast one, then the largest)"
        )
    else:
        why = (
            f"no NIfTI name says T1w/T1; chose {name(best)} "
            "(a native image before a post-contrast one, then the largest)"
        )
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
