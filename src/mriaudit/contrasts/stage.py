"""The chain of one contrast beside the T1w: convert, N4, co-register, check, template space.

One record per contrast (``paths.contrast_record``), written after the T1w's
stages in the same ``preprocess`` job. A subject without the contrast gets
``no_series`` with what it holds instead ("no FLAIR series (proton-density (PD):
1; not audited as FLAIR)"): a finding, not a failure of the subject.

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
from collections.abc import Sequence
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
    if check is not None:
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
    transforms: tuple[Path, Path],
    inu: dict[str, float],
    workdir: Path,
    resolution: int,
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """The contrast's IQMs (``contrasts.iqms``) through the template transform composed
    of its co-registration and the T1w's (``transforms``: to the T1w, the T1w's to the
    template); none needing the tissues when the T1w's is missing (failed registration)."""
    to_t1w, t1w_to_template = transforms
    transform = None
    if Path(t1w_to_template).is_file() and Path(t1w_to_template).stat().st_size:
        transform = template_transform(to_t1w, t1w_to_template, workdir / "to_template.mat")
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


def contrast_subject(
    subject_dir: Path,
    *,
    contrast: str,
    inventory_record: Path,
    t1w_n4: Path,
    t1w_transform: Path,
    out_image: Path,
    out_sidecar: Path,
    out_to_t1w: Path,
    out_preproc: Path,
    record_path: Path,
    upstream: Sequence[Path],
    out_pictures: tuple[Path, Path] | None = None,
    resolution: int = 2,
    threads: int = 1,
    handoff: Handoff | None = None,
) -> dict[str, Any]:
    """Audit the subject's ``contrast`` (``T2w`` or ``FLAIR``) series the inventory chose.

    Converts it (``out_image``, ``out_sidecar``: ``dicom.convert_selected``),
    corrects its bias field (N4 in its head mask, kept in memory), registers it
    rigidly to the subject's bias-corrected T1w ``t1w_n4`` (``out_to_t1w``) and
    resamples it onto the template grid of ``resolution`` mm through the T1w's
    ``t1w_transform`` (``out_preproc``, float32); ``out_pictures``: the report's
    pictures of the converted image and of the template-space one
    (``mriaudit.thumbnails``). Metrics: the ``conv_*`` of the
    conversion, ``n4_p05``/``n4_p95``, ``coreg_alignment`` (0-1, see
    ``coregister``) and its gain above chance ``coreg_alignment_gain``,
    ``coreg_overlap`` (0-1), ``core_skew`` (``series.core_skew``), the ``iqm_*``
    of ``contrasts.iqms`` (their tissue details in the record's ``details``),
    ``reg_mutual_information`` (nats) and, for T2w, ``reg_similarity``. Findings: see the module. ``no_series``
    when the subject has no such series; skipped when an ``upstream`` record (the
    T1w's registration, first) is not ``ok``; no template-space checks when the
    T1w's registration failed. Returns the record.
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
        t1_image, t1_data = load_volume(t1w_n4, handoff=handoff)
        fixed = template.load_template(resolution=resolution)
        with ants_environment(threads=threads) as workdir:
            field = n4_bias_field(data, mask, spacing_mm=spacing)
            corrected = data / field
            coreg = coregister(corrected, image.affine, t1_data, t1_image.affine, workdir=workdir)
            out_to_t1w.parent.mkdir(parents=True, exist_ok=True)
            out_to_t1w.write_bytes(coreg.transform.read_bytes())
            stats = bias_field_stats(field, mask)
            iqms, iqm_warnings, iqm_details = _iqms(
                data,
                corrected,
                mask,
                image.affine,
                contrast=contrast,
                transforms=(out_to_t1w, t1w_transform),
                inu=stats,
                workdir=workdir,
                resolution=resolution,
            )
            registered = to_template(
                corrected,
                image.affine,
                to_t1w=out_to_t1w,
                t1w_to_template=t1w_transform,
                template=ants_image(fixed.get_fdata(dtype=np.float32), fixed.affine),
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
            "coreg_alignment": round(coreg.alignment, 4) if np.isfinite(coreg.alignment) else None,
            "coreg_alignment_gain": round(coreg.gain, 4) if np.isfinite(coreg.gain) else None,
            "coreg_overlap": round(coreg.overlap, 4),
        }
        findings: list[str] = []
        warnings = [*converted["warnings"], *iqm_warnings, *pictures]
        skew = series.core_skew(data, tuple(float(z) for z in spacing))
        metrics["core_skew"] = round(skew, 4) if np.isfinite(skew) else None
        if contrast == "T2w" and series.contrast_look(skew) == "T1w":
            findings.append("contrast_unexpected")
            warnings.append(
                f"contrast_unexpected: labelled T2w but its intensities look T1-weighted "
                f"(CSF darker than white matter; core skew {skew:.2f} < {series.T1_LIKE_SKEW})"
            )
        if not np.isfinite(coreg.gain) or coreg.gain < MIN_ALIGNMENT_GAIN:
            findings.append("contrast_mismatch")
            warnings.append(
                f"contrast_mismatch: the {contrast} does not match the subject's T1w after "
                f"co-registration (edge alignment above chance {coreg.gain:.2f} < "
                f"{MIN_ALIGNMENT_GAIN}): another person's or another session's series?"
            )
        t1w_register = records.read_record(upstream[0]) if upstream else {}
        if "registration_failed" in (t1w_register.get("findings") or []):
            # The contrast reached template space through a failed T1w registration:
            # what it shows there says nothing of the contrast itself.
            warnings.append("template-space checks skipped: the T1w's registration failed")
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
        )

    record = records.run_stage(
        CONTRAST_STAGE,
        work,
        record_path=record_path,
        image_outputs=[out_image, out_sidecar, out_to_t1w, out_preproc, *(out_pictures or ())],
        upstream=upstream,
    )
    return record
