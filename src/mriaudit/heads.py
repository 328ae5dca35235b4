"""Real heads for benchmark cohorts: six healthy people of ``../shared/data`` on the template grid.

The demo generator poses, deforms and scans one head volume on the MNI152 1 mm
grid (the template with a synthetic skull). A benchmark judged on copies of
the registration target flatters every detector, so this module brings six
distinct real people (MANIFEST section 3 of the shared data) onto the same
grid: each person's 3D T1 is converted (dcm2niix for the DICOM ones, gzip
files decompressed first, ``mriaudit.sources``), bias-corrected (N4) and affinely registered to
MNI152 with the workflow's own stages, then flattened (``flatten``: N4 again
on the template grid until no field is left) and its intensities mapped
piecewise-linearly onto the template's tissue levels (histogram landmarks
inside the template brain mask), so the demo's contrast, lesion and artefact
machinery applies unchanged. A head carries a person's anatomy only; every
acquisition effect, the bias field included, comes from the renderer. Each
prepared head is cached as ``<cache>/head-<person>_recipe-<RECIPE>.nii.gz``
(float32, template 1 mm grid and affine).
"""

from __future__ import annotations

import logging
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from mriaudit import preprocess, sources, template
from mriaudit.dicom import run_dcm2niix
from mriaudit.intensity import histogram_landmarks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Person:
    """One real healthy person: ``source`` relative to the unpacked shared data root."""

    person: str
    source: str
    scanner: str


#: The six people of MANIFEST section 3 (no two are the same person; none is a template).
PERSONS = (
    Person("A", "nifti/niivue-demo-images/chris_t1.nii.gz", "unknown, 0.88 mm"),
    Person("B", "nifti/niivue/otsu_T1.nii.gz", "unknown, 1 mm"),
    Person("C", "nifti/niivue-demo-images/register_T1_head_ext2.nii.gz", "unknown, 1.6 mm"),
    Person(
        "D",
        "heads/studyforrest-sub02_philips-achieva-3t/dicoms",
        "Philips Achieva 3T, 0.7 mm",
    ),
    Person("E", "heads/philips-ingenia-elition-3t/In/cl", "Philips Ingenia Elition X 3T, 1 mm"),
    Person("F", "heads/siemens-trio-3t_memprage/dicom/adi_brain", "Siemens TrioTim 3T, 1.15 mm"),
)
PERSON_IDS = tuple(p.person for p in PERSONS)
#: Intensity range of a prepared head (template scale: white matter about 0.85).
HEAD_RANGE = (0.0, 2.0)
#: Version of the preparation, part of the cache name: a changed recipe re-prepares.
RECIPE = 2
#: Flattening: N4 passes at most, and the field range (p95 - p5 over the median) that
#: counts as flat. One pass on the native grid leaves up to 40 % (person D): a
#: normal rendered from it would carry its scanner's field on top of the renderer's.
FLATTEN_PASSES = 3
FLAT_RANGE = 0.05


def unpack_shared(shared_data: Path, work: Path) -> Path | None:
    """``shared_data``'s archives unpacked by its ``unpack.sh`` into ``work/shared``; the
    folder, or None when ``shared_data`` holds no real heads (a benchmark then skips)."""
    unpack = Path(shared_data) / "unpack.sh"
    if not unpack.is_file():
        return None
    data_root = Path(work) / "shared"
    data_root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["bash", str(unpack), str(data_root)], check=True, capture_output=True)
    return data_root


def person(name: str) -> Person:
    """The ``PERSONS`` entry called ``name`` (``A`` .. ``F``)."""
    for entry in PERSONS:
        if entry.person == name:
            return entry
    message = f"unknown person {name!r}; expected one of {', '.join(PERSON_IDS)}"
    raise ValueError(message)


def dicom_to_nifti(folder: Path, work: Path) -> Path:
    """Convert the one 3D series of ``folder`` (compressed files decompressed first)."""
    source = work / "dicom"
    sources.materialise(folder, [entry.rel for entry in sources.walk(folder)], source)
    out = work / "nifti"
    out.mkdir()
    code, _, output = run_dcm2niix(source, out)
    images = sorted(out.glob("*.nii.gz"))
    # Irregular slice spacing (person F): dcm2niix's equidistant ``_Eq`` copy has the geometry right.
    equidistant = [p for p in images if "_Eq" in p.name]
    if code or not images:
        message = f"dcm2niix wrote no image for {folder} (exit {code}): {output[-3:]}"
        raise RuntimeError(message)
    return max(equidistant or images, key=lambda p: p.stat().st_size)


def _to_template_scale(data: np.ndarray, brain: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Map ``data``'s landmarks inside ``brain`` onto ``reference`` (both ascending); air (0)
    stays 0 and values above the top landmark extend linearly, so scalp fat stays
    brighter than white matter."""
    own = histogram_landmarks(data, brain) + 1e-9 * np.arange(reference.size)
    mapped = np.interp(data, np.r_[0.0, own], np.r_[0.0, reference])
    high = (reference[-1] - reference[-2]) / max(own[-1] - own[-2], 1e-6)
    mapped = np.where(data > own[-1], reference[-1] + (data - own[-1]) * high, mapped)
    return np.clip(mapped, *HEAD_RANGE).astype(np.float32)


def flatten(data: np.ndarray, *, spacing_mm: float = 1.0, threads: int = 1) -> np.ndarray:
    """``data`` (X, Y, Z; isotropic ``spacing_mm``) divided by N4 fields until the last
    one's range inside the head is below ``FLAT_RANGE`` (at most ``FLATTEN_PASSES``)."""
    spacing = (float(spacing_mm),) * 3
    mask = preprocess.head_mask(data, spacing_mm=spacing)
    inside = mask & (data > 0)
    for _ in range(FLATTEN_PASSES):
        with preprocess.ants_environment(threads=threads):
            field = preprocess.n4_bias_field(data, mask, spacing_mm=spacing)
        data = np.where(inside, data / field, data).astype(np.float32)
        p5, p50, p95 = np.percentile(field[inside], [5, 50, 95])
        if (p95 - p5) / p50 < FLAT_RANGE:
            break
    return data


def prepare_head(entry: Person, data_root: Path, out_path: Path, *, threads: int = 1) -> Path:
    """Convert, bias-correct and register one person; write its head on the template 1 mm grid.

    ``data_root`` is the unpacked shared data (``unpack.sh DEST``). Returns
    ``out_path`` (float32 NIfTI, template affine, template intensity scale).
    One ITK thread by default: a multi-threaded registration differs from run to
    run, and so would every cohort rendered from the head.
    """
    source = Path(data_root) / entry.source
    if not source.exists():
        message = f"person {entry.person}: {source} not found (unpack ../shared/data first)"
        raise FileNotFoundError(message)
    with tempfile.TemporaryDirectory(prefix=f"head-{entry.person}-") as tmp:
        work = Path(tmp)
        image = dicom_to_nifti(source, work) if source.is_dir() else source
        n4_image, n4_mask = work / "n4.nii.gz", work / "n4_mask.nii.gz"
        record = preprocess.bias_correct_subject(
            image,
            out_image=n4_image,
            out_mask=n4_mask,
            record_path=work / "n4.json",
            upstream=[],
            threads=threads,
        )
        registered = work / "registered.nii.gz"
        if record["status"] == "ok":
            record = preprocess.register_subject(
                n4_image,
                out_image=registered,
                out_mask=work / "brain.nii.gz",
                out_transform=work / "xfm.mat",
                record_path=work / "register.json",
                upstream=[work / "n4.json"],
                threads=threads,
                resolution=1,
            )
        if record["status"] != "ok" or record.get("findings"):
            message = f"person {entry.person}: preparation failed: {record.get('reason') or record.get('warnings')}"
            raise RuntimeError(message)
        data = np.asarray(nib.load(registered).dataobj, dtype=np.float32)
    template_img = template.load_template(resolution=1)
    brain = np.asarray(template.load_brain_mask(resolution=1).dataobj) > 0
    reference = histogram_landmarks(template_img.get_fdata(dtype=np.float32), brain)
    head = _to_template_scale(flatten(np.nan_to_num(data), threads=threads), brain, reference)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = out_path.with_name(f".{out_path.name}.tmp.nii.gz")
    nib.save(nib.Nifti1Image(head, template_img.affine), tmp_path)
    tmp_path.replace(out_path)
    log.info(
        "person %s: head prepared (similarity %s)",
        entry.person,
        record["metrics"]["reg_similarity"],
    )
    return out_path


def prepared_heads(
    data_root: Path, cache_dir: Path, *, persons: tuple[str, ...] = PERSON_IDS, threads: int = 1
) -> dict[str, Path]:
    """``{person: head path}`` for ``persons``, preparing those not yet in ``cache_dir``."""
    heads = {}
    for name in persons:
        path = Path(cache_dir) / f"head-{name}_recipe-{RECIPE}.nii.gz"
        if not path.is_file():
            prepare_head(person(name), Path(data_root), path, threads=threads)
        heads[name] = path
    return heads


def load_head(path: str | Path) -> np.ndarray:
    """A prepared head: float32 (197, 233, 189) on the template 1 mm grid."""
    return np.asarray(nib.load(Path(path)).dataobj, dtype=np.float32)
