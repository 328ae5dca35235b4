"""The chain of one contrast beside the T1w: convert, N4, co-register, check, template space.

One record per contrast (``paths.contrast_record``), written after the T1w's
stages in the same ``preprocess`` job. A subject without the contrast gets
``no_series`` with what it holds instead ("no FLAIR series (proton-density (PD):
1; not audited as FLAIR)"): a finding, not a failure of the subject.

A contrast reaches the template through its subject's T1w: rigidly co-registered
to it, then through the T1w's affine. A subject without a usable T1w (none, or
one whose conversion, N4 or registration failed) has the contrast registered to
the template directly (``registration.register_to_template``, judged as that
contrast: ``qc.CONTRAST_CHECKS``), and the record says so (``registration``:
``direct``, with why).

Findings (status stays ``ok``):

- ``contrast_mismatch``: the contrast and the T1w do not show one head after a
  rigid co-registration (``coregister.MIN_ALIGNMENT_GAIN``): another person's series,
  or another session's with the head changed;
- ``contrast_unexpected``: a T2w whose intensities look T1-weighted (white
  matter the bulk and brightest of the brain's core: ``series.core_skew``; T2w
  0.33-0.62 on the real scans of ../shared, T1w and PD -0.38 to -0.03, a
  post-contrast T1 named T2w -0.14), or whose image in template space
  correlates with the T1 template the way a T1 does (``preprocess.qc``'s T2w
  check): a T1 labelled or exported as T2;
- ``registration_failed``: the contrast shows no anatomy in template space.

The contrast's IQMs (``contrasts.iqms``: MRIQC's definitions on its own native
grid and tissue classes, its N4 field's spread) join the record's metrics; the
aggregate fuses them with its model's score into its own audit score
(``audit.CONTRAST_MEASURES``).

FLAIR has no template check: its CSF is dark as in a T1 while white matter is
darker than grey matter as in a T2, so its correlation with the T1 template
says neither (-0.37 to 0.18 on the real scans of ../shared).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from mriaudit import records, series, template, thumbnails
from mriaudit.contrasts.coregister import MIN_ALIGNMENT_GAIN, coregister, to_template
from mriaudit.contrasts.iqms import contrast_iqms, template_transform
from mriaudit.dicom.convert import convert_selected
from mriaudit.preprocess.bias import bias_field_stats, n4_bias_field
from mriaudit.preprocess.images import (
    Handoff,
    ants_environment,
    ants_image,
    load_volume,
    save_on_template,
    voxel_sizes,
)
from mriaudit.preprocess.masks import head_mask, is_flat
from mriaudit.preprocess.qc import (
    CONTRAST_CHECKS,
    NO_ANATOMY_INFORMATION,
    masked_correlation,
    mutual_information,
    similarity_mask,
)
from mriaudit.preprocess.registration import register_to_template

log = logging.getLogger(__name__)

CONTRAST_STAGE = "contrast"


def _template_checks(
    registered: np.ndarray, contrast: str, *, resolution: int, unexpected: bool
) -> tuple[dict[str, Any], list[str], list[str]]:
    """``reg_*`` metrics of a contrast in template space, its findings and their warnings
    (``unexpected``: ``contrast_unexpected`` was found already)."""
    fixed = template.load_template(resolution=resolution)
    brain = template.load_brain_mask(resolution=resolution).get_fdata() > 0
    template_data = fixed.get_fdata(dtype=np.float32)
    information = mutual_information(registered[brain], template_data[brain])
    metrics: dict[str, Any] = {"reg_mutual_information": round(information, 4)}
    findings, warnings = [], []
    if information < NO_ANATOMY_INFORMATION:
        findings.append("registration_failed")
        warnings.append(
            f"registration_failed: no anatomy in template space (mutual information "
            f"{information:.3f})"
        )
    check = CONTRAST_CHECKS.get(contrast)
    if check is not None and check.correlates:
        compared = similarity_mask(brain, fixed.affine, contrast=contrast)
        similarity = check.sign * masked_correlation(registered, template_data, compared)
        metrics["reg_similarity"] = round(similarity, 4) if np.isfinite(similarity) else None
        if np.isfinite(similarity) and similarity < -check.min_similarity and not unexpected:
            findings.append("contrast_unexpected")
            warnings.append(
                f"contrast_unexpected: labelled {contrast} but its contrast is T1-like "
                f"(similarity to a {contrast} {similarity:.2f})"
            )
    return metrics, findings, warnings


def _iqms(
    raw: np.ndarray,
    corrected: np.ndarray,
    mask: np.ndarray,
    affine: np.ndarray,
    *,
    contrast: str,
    transforms: tuple[Path, ...],
    inu: dict[str, float],
    workdir: Path,
    resolution: int,
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """The contrast's IQMs (``contrasts.iqms``) through its template transform:
    ``transforms`` is its own (registered directly), or its co-registration and the
    T1w's, composed; none needing the tissues when the T1w's is missing."""
    transform = None
    if len(transforms) == 1:
        transform = transforms[0]
    elif Path(transforms[1]).is_file() and Path(transforms[1]).stat().st_size:
        transform = template_transform(*transforms, workdir / "to_template.mat")
    return contrast_iqms(
        raw,
        corrected,
        mask > 0,
        affine,
        contrast=contrast,
        transform=transform,
        inu=inu,
        resolution=resolution,
    )


def _inventory_status(inventory_record: Path) -> str:
    try:
        return str(records.read_record(inventory_record).get("status"))
    except (OSError, ValueError):
        return ""  # unreadable: run_stage says so as the contrast's reason


def _usable_t1w(t1w_register: Path) -> str:
    """Why the subject's T1w cannot carry its contrasts to the template ("" when it can:
    its registration is ``ok`` and not failed)."""
    try:
        record = records.read_record(t1w_register)
    except (OSError, ValueError) as error:
        return f"its T1w registration record cannot be read ({type(error).__name__})"
    if record.get("status") != records.OK:
        return record.get("reason") or f"its T1w is {record.get('status')}"
    if "registration_failed" in (record.get("findings") or []):
        return "its T1w's registration failed"
    return ""


def _via_t1w(
    corrected: np.ndarray,
    affine: np.ndarray,
    *,
    contrast: str,
    t1w_n4: Path,
    t1w_transform: Path,
    out_to_t1w: Path,
    fixed: Any,
    workdir: Path,
    handoff: Handoff | None,
) -> tuple[np.ndarray, tuple[Path, ...], dict[str, Any], list[str], list[str]]:
    """Co-register to the T1w, then to the template through the T1w's transform.

    Returns the template-space image, the transforms (to the T1w, the T1w's), the
    ``coreg_*`` metrics, findings (``contrast_mismatch``) and their warnings."""
    t1_image, t1_data = load_volume(t1w_n4, handoff=handoff)
    coreg = coregister(corrected, affine, t1_data, t1_image.affine, workdir=workdir)
    out_to_t1w.parent.mkdir(parents=True, exist_ok=True)
    out_to_t1w.write_bytes(coreg.transform.read_bytes())
    registered = to_template(
        corrected,
        affine,
        to_t1w=out_to_t1w,
        t1w_to_template=t1w_transform,
        template=ants_image(fixed.get_fdata(dtype=np.float32), fixed.affine),
    )
    metrics = {
        "coreg_alignment": round(coreg.alignment, 4) if np.isfinite(coreg.alignment) else None,
        "coreg_alignment_gain": round(coreg.gain, 4) if np.isfinite(coreg.gain) else None,
        "coreg_overlap": round(coreg.overlap, 4),
    }
    findings, warnings = [], []
    if not np.isfinite(coreg.gain) or coreg.gain < MIN_ALIGNMENT_GAIN:
        findings.append("contrast_mismatch")
        warnings.append(
            f"contrast_mismatch: the {contrast} does not match the subject's T1w after "
            f"co-registration (edge alignment above chance {coreg.gain:.2f} < "
            f"{MIN_ALIGNMENT_GAIN}): another person's or another session's series?"
        )
    return registered, (out_to_t1w, t1w_transform), metrics, findings, warnings


def _direct(
    corrected: np.ndarray,
    affine: np.ndarray,
    *,
    contrast: str,
    why: str,
    out_to_template: Path,
    resolution: int,
    workdir: Path,
) -> tuple[np.ndarray, tuple[Path, ...], dict[str, Any], list[str], list[str]]:
    """Register to the template on its own, judged as ``contrast`` (no usable T1w:
    ``why``). Returns what :func:`_via_t1w` does: the image, its transform, the
    ``reg_*`` metrics, findings and warnings."""
    direct = register_to_template(
        corrected, affine, contrast=contrast, resolution=resolution, workdir=workdir
    )
    out_to_template.parent.mkdir(parents=True, exist_ok=True)
    out_to_template.write_bytes(direct.transform.read_bytes())
    warnings = [f"registered to the template directly: no usable T1w ({why})", *direct.warnings]
    return direct.registered, (out_to_template,), dict(direct.metrics), direct.findings, warnings


def contrast_subject(
    subject_dir: Path,
    *,
    contrast: str,
    inventory_record: Path,
    t1w_register: Path,
    t1w_n4: Path,
    t1w_transform: Path,
    out_image: Path,
    out_sidecar: Path,
    out_to_t1w: Path,
    out_to_template: Path,
    out_preproc: Path,
    record_path: Path,
    out_pictures: tuple[Path, Path] | None = None,
    resolution: int = 2,
    threads: int = 1,
    handoff: Handoff | None = None,
) -> dict[str, Any]:
    """Audit the subject's ``contrast`` (``T2w`` or ``FLAIR``) series the inventory chose.

    Converts it (``out_image``, ``out_sidecar``: ``dicom.convert_selected``),
    corrects its bias field (N4 in its head mask, kept in memory) and brings it onto
    the template grid of ``resolution`` mm (``out_preproc``, float32): when the T1w's
    registration record ``t1w_register`` is ``ok`` and not failed, registered
    rigidly to the subject's bias-corrected T1w ``t1w_n4`` (``out_to_t1w``) and
    resampled through the T1w's ``t1w_transform``; otherwise registered to the
    template directly (``out_to_template``; ``registration.register_to_template``).
    ``out_pictures``: the report's pictures of the converted image and of the
    template-space one (``mriaudit.thumbnails``). Metrics: the ``conv_*`` of the
    conversion, ``n4_p05``/``n4_p95``, ``core_skew`` (``series.core_skew``), the
    ``iqm_*`` of ``contrasts.iqms`` (their tissue details in the record's
    ``details``), ``reg_mutual_information`` (nats) and, for T2w, ``reg_similarity``;
    through the T1w ``coreg_alignment`` (0-1, see ``coregister``), its gain above
    chance ``coreg_alignment_gain`` and ``coreg_overlap`` (0-1); directly
    ``reg_scale``. The record's ``registration`` is ``via_t1w`` or ``direct`` (then
    ``registration_why``). Findings: see the module; directly, also
    ``header_orientation``. ``no_series`` when the subject has no such series
    (the T1w may have none); skipped when the inventory failed. Returns the record.
    """

    def work() -> dict[str, Any]:
        chosen = (records.read_record(inventory_record).get("contrasts") or {}).get(contrast)
        if not chosen:
            message = f"the inventory did not look for a {contrast} series"
            raise records.StageError(message)
        if chosen.get("failed"):
            raise records.StageError(chosen.get("reason", ""))
        if "selected" not in chosen:
            # What the subject lacks is said in the report, not logged as an error.
            log.info("%s: %s", contrast, chosen.get("reason", ""))
            return records.make_record(
                CONTRAST_STAGE,
                status=records.NO_SERIES,
                reason=chosen.get("reason", ""),
                contrast=contrast,
            )
        converted = convert_selected(
            Path(subject_dir), chosen["selected"], out_image=out_image, out_sidecar=out_sidecar
        )
        image, data = load_volume(out_image)
        if is_flat(data):
            message = f"the {contrast} image is empty or constant"
            raise records.StageError(message)
        spacing = voxel_sizes(image.affine)
        mask = head_mask(data, spacing_mm=spacing)
        fixed = template.load_template(resolution=resolution)
        without_t1w = _usable_t1w(t1w_register)
        findings: list[str] = []
        warnings = [*converted["warnings"]]
        with ants_environment(threads=threads) as workdir:
            field = n4_bias_field(data, mask, spacing_mm=spacing)
            corrected = data / field
            stats = bias_field_stats(field, mask)
            if without_t1w:
                registered, transforms, route, found, said = _direct(
                    corrected,
                    image.affine,
                    contrast=contrast,
                    why=without_t1w,
                    out_to_template=out_to_template,
                    resolution=resolution,
                    workdir=workdir,
                )
            else:
                registered, transforms, route, found, said = _via_t1w(
                    corrected,
                    image.affine,
                    contrast=contrast,
                    t1w_n4=t1w_n4,
                    t1w_transform=t1w_transform,
                    out_to_t1w=out_to_t1w,
                    fixed=fixed,
                    workdir=workdir,
                    handoff=handoff,
                )
            findings += found
            warnings += said
            iqms, iqm_warnings, iqm_details = _iqms(
                data,
                corrected,
                mask,
                image.affine,
                contrast=contrast,
                transforms=transforms,
                inu=stats,
                workdir=workdir,
                resolution=resolution,
            )
        save_on_template(registered, fixed.affine, out_preproc, dtype=np.float32)
        pictures = (
            []
            if out_pictures is None
            else [
                *thumbnails.try_draw(thumbnails.write_native_thumbnail, out_image, out_pictures[0]),
                *thumbnails.try_draw(
                    thumbnails.write_anomaly_thumbnail, out_preproc, None, out_pictures[1]
                ),
            ]
        )
        metrics = {
            **converted["metrics"],
            **{k: v for k, v in stats.items() if k.startswith("n4_")},
            **iqms,
            **route,
        }
        warnings += [*iqm_warnings, *pictures]
        skew = series.core_skew(data, tuple(float(z) for z in spacing))
        metrics["core_skew"] = round(skew, 4) if np.isfinite(skew) else None
        if contrast == "T2w" and series.contrast_look(skew) == "T1w":
            findings.append("contrast_unexpected")
            warnings.append(
                f"contrast_unexpected: labelled T2w but its intensities look T1-weighted "
                f"(CSF darker than white matter; core skew {skew:.2f} < {series.T1_LIKE_SKEW})"
            )
        if "registration_failed" in findings:
            # What a failed registration put on the template grid says nothing of the
            # contrast; the direct registration's own checks said why it failed.
            warnings.append("template-space checks skipped: the registration failed")
        else:
            template_metrics, template_findings, template_warnings = _template_checks(
                registered,
                contrast,
                resolution=resolution,
                unexpected="contrast_unexpected" in findings,
            )
            metrics.update(template_metrics)
            findings += template_findings
            warnings += template_warnings
        for line in warnings:
            log.warning("%s: %s", contrast, line)
        log.info("%s: %s", contrast, metrics)
        return records.make_record(
            CONTRAST_STAGE,
            findings=findings,
            metrics=metrics,
            warnings=warnings,
            details=iqm_details,
            contrast=contrast,
            selected=chosen["selected"].get("why") or chosen["selected"].get("description", ""),
            source=converted.get("source", ""),
            registration="direct" if without_t1w else "via_t1w",
            **({"registration_why": without_t1w} if without_t1w else {}),
        )

    return records.run_stage(
        CONTRAST_STAGE,
        work,
        # A T1w of no series still lets the inventory choose the contrast; a failed
        # inventory skips it, with the inventory's reason.
        upstream=[]
        if _inventory_status(inventory_record) in (records.OK, records.NO_SERIES)
        else [inventory_record],
        record_path=record_path,
        image_outputs=[
            out_image,
            out_sidecar,
            out_to_t1w,
            out_to_template,
            out_preproc,
            *(out_pictures or ()),
        ],
    )
