"""The register stage: affine registration to the MNI152 template with ANTsPy.

The nilearn MNI152 template is skull-stripped, while most inputs show the whole
head: registration therefore measures similarity inside the template brain mask
only, and starts from several candidate head positions (intensity centre of
mass, and a brain centre estimated from the top of the head) so that a long neck
or a large field of view does not trap it far from the brain
(``mriaudit.preprocess.starts``); the best starts are refined rigid, then
affine. When the header's registration fails the QC (``mriaudit.preprocess.qc``),
the anatomy may be turned against the header (a mistyped patient position): the
turns of ``HEADER_ROTATIONS`` are tried, and one is kept only when it passes
every check and beats the header by a margin.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ants
import numpy as np

from mriaudit import records, template
from mriaudit.preprocess.images import (
    Handoff,
    ants_environment,
    ants_image,
    load_volume,
    save_on_template,
)
from mriaudit.preprocess.masks import is_flat
from mriaudit.preprocess.qc import (
    NO_ANATOMY_INFORMATION,
    affine_scale,
    contrast_check,
    masked_correlation,
    mutual_information,
    registration_problems,
    similarity_mask,
    transform_matrix,
)
from mriaudit.preprocess.starts import (
    SAME_START_MM,
    CoarseTemplate,
    _centre_transform,
    _registration_options,
    _smooth_to,
    coarse_copy,
    coarse_starts,
    distinct_starts,
)

log = logging.getLogger(__name__)


REGISTER_STAGE = "register"

RIGID_LEVELS_MM = (4.0,)
RIGID_ITERATIONS = (50,)
AFFINE_LEVELS_MM = (4.0,)
AFFINE_ITERATIONS = (50,)
FINE_LEVELS_MM = (2.0,)
FINE_ITERATIONS = (15,)
# Fraction of the template grid's points that the metric samples: on real 1 mm
# T1 heads 0.1 lands within 2 mm (max over the brain; 0.2-0.8 mm on average) of a
# 0.5-rate, 300-iteration registration, 30% faster than 0.25.
SAMPLING_RATE = 0.1
# Starts refined in full: the best ones on the coarse grid that do not land
# within SAME_START_MM of a better one.
REFINED_STARTS = 2
# A mistyped patient position (prone/supine, head/feet first, decubitus) leaves
# the anatomy turned against the header. When the header's registration fails,
# these turns (LPS, template to subject) are tried; one is kept only when it
# passes every check and beats the header's correlation by the margin.
HEADER_ROTATIONS = {
    "turned 180 degrees about the superior axis": np.diag([-1.0, -1.0, 1.0]),
    "turned 180 degrees about the anterior axis": np.diag([-1.0, 1.0, -1.0]),
    "turned 180 degrees about the left-right axis": np.diag([1.0, -1.0, -1.0]),
    "turned 90 degrees about the superior axis": np.array(
        [[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    ),
    "turned -90 degrees about the superior axis": np.array(
        [[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    ),
}
HEADER_ROTATION_MARGIN = 0.1


def linear_stage(
    kind: str,
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    start: str | Path,
    *,
    levels_mm: Sequence[float],
    iterations: Sequence[int],
    sampling_rate: float,
    prefix: Path,
) -> Path:
    """One ANTs ``kind`` (``Rigid`` or ``Affine``) registration from the ``start`` transform.

    Multi-resolution over ``levels_mm`` (shrink factors of the template grid,
    Gaussian smoothing of half the level), Mattes mutual information inside
    ``fixed_mask``. Returns the ``.mat`` ANTs writes at ``prefix``: it maps
    template points to subject points (ITK convention) and includes ``start``.
    """
    result = ants.registration(
        fixed,
        moving,
        kind,
        initial_transform=[str(start)],
        mask=fixed_mask,
        aff_iterations=tuple(iterations),
        aff_random_sampling_rate=sampling_rate,
        outprefix=str(prefix),
        **_registration_options(levels_mm, float(np.min(fixed.spacing))),
    )
    return Path(result["fwdtransforms"][0])


def settle_affine(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    start: str | Path,
    *,
    workdir: Path,
) -> Path:
    """Rigid, then affine registration on the coarser levels, from ``start``; the ANTs ``.mat``."""
    rigid = linear_stage(
        "Rigid",
        moving,
        fixed,
        fixed_mask,
        start,
        levels_mm=RIGID_LEVELS_MM,
        iterations=RIGID_ITERATIONS,
        sampling_rate=SAMPLING_RATE,
        prefix=workdir / "rigid_",
    )
    return linear_stage(
        "Affine",
        moving,
        fixed,
        fixed_mask,
        rigid,
        levels_mm=AFFINE_LEVELS_MM,
        iterations=AFFINE_ITERATIONS,
        sampling_rate=SAMPLING_RATE,
        prefix=workdir / "affine_",
    )


def finish_affine(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    start: str | Path,
    *,
    workdir: Path,
) -> Path:
    """Affine registration on the finest levels (down to the template grid); the ANTs ``.mat``."""
    resolution = float(np.min(fixed.spacing))
    levels = [level for level in FINE_LEVELS_MM if level >= resolution]
    iterations = list(FINE_ITERATIONS[: len(levels)])
    if not levels or resolution < min(levels):
        # A finer template grid gets its own last level.
        levels.append(resolution)
        iterations.append(FINE_ITERATIONS[-1])
    return linear_stage(
        "Affine",
        moving,
        fixed,
        fixed_mask,
        start,
        levels_mm=levels,
        iterations=iterations,
        sampling_rate=SAMPLING_RATE,
        prefix=workdir / "fine_",
    )


def affine_to_template(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    *,
    workdir: Path,
    rotation: np.ndarray | None = None,
) -> tuple[Path, str]:
    """Rigid then affine registration of ``moving`` to ``fixed``: ANTs ``.mat`` and chosen start.

    ``moving`` should already be anti-aliased and resampled near the template
    resolution. The ``REFINED_STARTS`` best distinct starts of ``coarse_starts``
    go through ``settle_affine`` (a start that scores best on the coarse grid
    can still settle a few mm off), and the one with the highest mutual
    information inside the template brain goes through ``finish_affine``.
    """
    coarse = CoarseTemplate.of(fixed, fixed_mask)
    scored = coarse_starts(coarse_copy(moving), coarse, workdir=workdir, rotation=rotation)
    starts = distinct_starts(
        scored, coarse.landmarks, count=REFINED_STARTS, tolerance_mm=SAME_START_MM
    )
    inside = fixed_mask.numpy() > 0
    template_values = fixed.numpy()[inside]
    results = []
    for _, name, start in starts:
        folder = workdir / f"settle_{name}"
        folder.mkdir()
        transform = settle_affine(moving, fixed, fixed_mask, start, workdir=folder)
        warped = ants.apply_transforms(fixed, moving, [str(transform)]).numpy()
        score = mutual_information(warped[inside], template_values)
        log.debug("registration from %s: mutual information %.3f", name, score)
        results.append((score, name, transform))
    _, name, settled = max(results, key=lambda result: result[0])
    return finish_affine(moving, fixed, fixed_mask, settled, workdir=workdir), name


@dataclass(frozen=True)
class _Criteria:
    """What an attempt is judged by: the template brain (mutual information), the
    part of it where the correlation is measured, and the expected contrast."""

    brain: np.ndarray
    compared: np.ndarray
    contrast: str


@dataclass
class _Attempt:
    """One registration and its quality on the template grid."""

    transform: Path
    start: str
    registered: np.ndarray
    similarity: float
    information: float
    scale: float
    problems: list[str]


def _attempt(
    transform: Path,
    start: str,
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    criteria: _Criteria,
    problems: Sequence[str] = (),
) -> _Attempt:
    registered = ants.apply_transforms(
        fixed, moving, [str(transform)], interpolator="linear"
    ).numpy()
    template_data = fixed.numpy()
    check = contrast_check(criteria.contrast)
    similarity = (
        check.sign * masked_correlation(registered, template_data, criteria.compared)
        if check.correlates
        else float("nan")
    )
    brain = criteria.brain
    information = mutual_information(registered[brain], template_data[brain])
    scale = affine_scale(transform_matrix(transform))
    found = list(problems) or registration_problems(
        similarity=similarity, scale=scale, information=information, contrast=criteria.contrast
    )
    return _Attempt(transform, start, registered, similarity, information, scale, found)


def _best_turn(
    prepared: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    *,
    workdir: Path,
) -> tuple[str, Path, str] | None:
    """The ``HEADER_ROTATIONS`` turn whose best coarse start scores highest, registered.

    Returns ``(turn name, ANTs .mat, start name)``, or None when ANTs fails on
    every turn. On real heads given a wrong header the right turn ranks first.
    """
    coarse = CoarseTemplate.of(fixed, fixed_mask)
    coarse_moving = coarse_copy(prepared)
    turns = []
    for index, (name, rotation) in enumerate(HEADER_ROTATIONS.items()):
        folder = workdir / f"turn{index}"
        folder.mkdir()
        try:
            scored = coarse_starts(coarse_moving, coarse, workdir=folder, rotation=rotation)
        except (RuntimeError, ValueError) as error:
            log.warning("registration %s failed: %s", name, error)
            continue
        score, start, path = max(scored, key=lambda candidate: candidate[0])
        turns.append((score, name, start, path, folder))
    if not turns:
        return None
    _, name, start, path, folder = max(turns, key=lambda turn: turn[0])
    settled = settle_affine(prepared, fixed, fixed_mask, path, workdir=folder)
    return name, finish_affine(prepared, fixed, fixed_mask, settled, workdir=folder), start


def _register_moving(
    moving: ants.ANTsImage,
    fixed: ants.ANTsImage,
    fixed_mask: ants.ANTsImage,
    criteria: _Criteria,
    *,
    workdir: Path,
    resolution: int,
) -> tuple[_Attempt, str | None]:
    """Register as the header says, then, if that is doubtful, as a mislabelled header would.

    Returns the attempt kept and, when a turned start won, the header error it
    implies. A turn (``_best_turn``) is tried when the header's registration
    fails or stays below the contrast's ``settled_similarity``, unless the
    image shows no anatomy or has the opposite contrast (no turn makes a T2
    look like a T1). It is kept only when it passes every plausibility check
    and beats the header's similarity by ``HEADER_ROTATION_MARGIN``.
    """
    check = contrast_check(criteria.contrast)
    try:
        prepared = ants.resample_image(
            moving, (float(resolution),) * 3, use_voxels=False, interp_type=0
        )
        transform, start = affine_to_template(prepared, fixed, fixed_mask, workdir=workdir)
    except (RuntimeError, ValueError) as error:
        log.error("ANTs registration failed: %s", error)
        fallback = _centre_transform(moving, fixed, workdir / "centre.mat")
        failed = [f"ANTs error: {error}"]
        return _attempt(fallback, "none", moving, fixed, criteria, failed), None
    attempt = _attempt(transform, start, moving, fixed, criteria)
    hopeless = attempt.information < NO_ANATOMY_INFORMATION
    if not check.correlates:
        # Nothing would tell a turned start from the header's (FLAIR): keep the header's.
        return attempt, None
    settled = not attempt.problems and attempt.similarity >= check.settled_similarity
    if settled or hopeless or attempt.similarity < -check.min_similarity:
        return attempt, None
    try:
        turn = _best_turn(prepared, fixed, fixed_mask, workdir=workdir)
    except (RuntimeError, ValueError) as error:
        log.warning("registration from turned starts failed: %s", error)
        turn = None
    if turn is None:
        return attempt, None
    name, transform, start = turn
    turned = _attempt(transform, start, moving, fixed, criteria)
    log.info("registration %s: r=%.3f, scale %.2f", name, turned.similarity, turned.scale)
    baseline = attempt.similarity if np.isfinite(attempt.similarity) else -1.0
    if not turned.problems and turned.similarity > baseline + HEADER_ROTATION_MARGIN:
        return turned, name
    return attempt, None


@dataclass(frozen=True)
class Registration:
    """An image registered to the template: what ``register_to_template`` returns.

    ``transform``: the ANTs affine (template to image, ``.mat``, inside the caller's
    work folder); ``registered``: the image anti-aliased to the grid and resampled
    onto it (float32, the template grid's shape); ``metrics``: ``reg_similarity``,
    ``reg_scale``, ``reg_mutual_information``; ``findings`` and their ``warnings``
    (``registration_failed``, ``header_orientation``); ``start``: the start that won.
    """

    transform: Path
    registered: np.ndarray
    metrics: dict[str, Any]
    findings: list[str]
    warnings: list[str]
    start: str


def register_to_template(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    contrast: str,
    resolution: int,
    workdir: Path,
) -> Registration:
    """Affine registration of an image (X, Y, Z; ``affine`` voxel to RAS mm) to MNI152,
    judged as ``contrast`` (``CONTRAST_CHECKS``), in an ANTs ``workdir``
    (``ants_environment``). See ``register_subject`` for the metrics and findings."""
    fixed_nii = template.load_template(resolution=resolution)
    template_data = fixed_nii.get_fdata(dtype=np.float32)
    brain = template.load_brain_mask(resolution=resolution).get_fdata() > 0
    compared = similarity_mask(brain, fixed_nii.affine, contrast=contrast)
    criteria = _Criteria(brain=brain, compared=compared, contrast=contrast)
    fixed = ants_image(template_data, fixed_nii.affine)
    fixed_mask = ants_image(brain.astype(np.float32), fixed_nii.affine)
    moving = _smooth_to(ants_image(data, affine), float(resolution))
    if is_flat(data):
        fallback = _centre_transform(moving, fixed, workdir / "centre.mat")
        attempt = _attempt(
            fallback, "none", moving, fixed, criteria, ["image is empty or constant"]
        )
        header_error = None
    else:
        attempt, header_error = _register_moving(
            moving, fixed, fixed_mask, criteria, workdir=workdir, resolution=resolution
        )
    similarity = attempt.similarity
    metrics = {
        "reg_similarity": round(similarity, 4) if np.isfinite(similarity) else None,
        "reg_scale": round(attempt.scale, 4),
        "reg_mutual_information": round(attempt.information, 4),
    }
    findings: list[str] = []
    warnings: list[str] = []
    if header_error is not None:
        findings.append("header_orientation")
        warnings.append(
            f"header_orientation: the anatomy is {header_error} from where the header "
            "places it (patient position entered wrong?); registered from the turned start"
        )
    if attempt.problems:
        findings.append("registration_failed")
        warnings.append("registration_failed: " + "; ".join(attempt.problems))
    return Registration(
        attempt.transform, attempt.registered, metrics, findings, warnings, attempt.start
    )


def register_subject(
    in_image: Path,
    *,
    out_image: Path,
    out_mask: Path,
    out_transform: Path,
    record_path: Path,
    upstream: Sequence[Path],
    threads: int = 1,
    resolution: int = 2,
    contrast: str = "T1w",
    handoff: Handoff | None = None,
) -> dict[str, Any]:
    """Stage ``register``: affine registration of the bias-corrected image to MNI152.

    Writes the image resampled onto the template grid of ``resolution`` mm
    (float32, linear interpolation, intensities as in ``in_image``) to
    ``out_image``, the template brain mask (uint8) to ``out_mask`` and the ANTs
    affine (template to subject, ``.mat``) to ``out_transform``.

    The similarity metric (mutual information) is contrast-independent; the
    check of the result depends on the ``contrast`` the image should have
    (``CONTRAST_CHECKS``: ``T1w``, ``T2w`` or ``FLAIR``).

    Metrics: ``reg_similarity`` (Pearson correlation with the T1 template inside
    its brain mask, negated and without the brain's 6 mm rim for T2w; higher is
    better; null for a constant result and for FLAIR, whose correlation says nothing),
    ``reg_scale`` (volume scale of the affine, template to subject; 0.6-1.0 for
    adults) and ``reg_mutual_information`` (nats, inside the brain mask; higher
    is better, contrast-independent). The record's ``registration_start`` names
    the start that won (see ``candidate_centres``; ``none`` when nothing ran).

    Findings (status stays ``ok``, the reason goes to ``warnings``):
    ``registration_failed`` for an implausible result (``registration_problems``),
    an empty image or an ANTs error; ``header_orientation`` when the anatomy
    only registers turned against its header (``HEADER_ROTATIONS``), as after
    a wrongly entered patient position. Returns the record, whose
    ``contrast`` names the check applied. With a ``handoff`` (stages in one
    process), ``in_image`` is taken from it when the N4 stage left it there.
    """
    contrast_check(contrast)  # a wrong name is the caller's error, not the scan's

    def work() -> dict[str, Any]:
        image, data = load_volume(in_image, handoff=handoff)
        fixed_nii = template.load_template(resolution=resolution)
        brain = template.load_brain_mask(resolution=resolution).get_fdata() > 0
        with ants_environment(threads=threads) as workdir:
            result = register_to_template(
                data, image.affine, contrast=contrast, resolution=resolution, workdir=workdir
            )
            out_transform.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(result.transform, out_transform)
        background = handoff is not None
        save_on_template(
            result.registered, fixed_nii.affine, out_image, dtype=np.float32, background=background
        )
        save_on_template(brain, fixed_nii.affine, out_mask, dtype=np.uint8, background=background)
        for line in result.warnings:
            log.warning("%s", line)
        log.info("register: %s", result.metrics)
        return records.make_record(
            REGISTER_STAGE,
            findings=result.findings,
            metrics=result.metrics,
            warnings=result.warnings,
            registration_start=result.start,
            contrast=contrast,
        )

    return records.run_stage(
        REGISTER_STAGE,
        work,
        record_path=record_path,
        image_outputs=[out_image, out_mask, out_transform],
        upstream=upstream,
    )
