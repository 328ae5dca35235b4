"""Bias-field correction (N4) and affine registration to MNI152, with their QC metrics.

Both stages use ANTsPy; spacings and distances are in mm. Modules: ``masks``
(head mask, block resampling: pure array helpers), ``images`` (nibabel to ANTs
and back, ANTs' environment, the images a job's stages hand on in memory), ``bias`` (the N4 stage), ``starts`` (where a
registration starts), ``registration`` (the register stage), ``qc`` (was the
registration right, is it a T1 head).
"""

from mriaudit.preprocess.bias import N4_STAGE, bias_correct_subject, bias_field_stats, n4_bias_field
from mriaudit.preprocess.images import (
    Handoff,
    ants_environment,
    ants_image,
    load_volume,
    physical_points,
    save_like,
    save_on_template,
    voxel_sizes,
)
from mriaudit.preprocess.masks import (
    block_sample,
    block_upsample,
    fill_holes,
    head_mask,
    is_flat,
    otsu_threshold,
)
from mriaudit.preprocess.qc import (
    CONTRAST_CHECKS,
    SCALE_RANGE,
    affine_scale,
    contrast_check,
    masked_correlation,
    mutual_information,
    registration_problems,
    similarity_mask,
)
from mriaudit.preprocess.registration import REGISTER_STAGE, register_subject
from mriaudit.preprocess.starts import candidate_centres

__all__ = [
    "CONTRAST_CHECKS",
    "N4_STAGE",
    "REGISTER_STAGE",
    "SCALE_RANGE",
    "Handoff",
    "affine_scale",
    "ants_environment",
    "ants_image",
    "bias_correct_subject",
    "bias_field_stats",
    "block_sample",
    "block_upsample",
    "candidate_centres",
    "contrast_check",
    "fill_holes",
    "head_mask",
    "is_flat",
    "load_volume",
    "masked_correlation",
    "mutual_information",
    "n4_bias_field",
    "otsu_threshold",
    "physical_points",
    "register_subject",
    "registration_problems",
    "save_like",
    "save_on_template",
    "similarity_mask",
    "voxel_sizes",
]
