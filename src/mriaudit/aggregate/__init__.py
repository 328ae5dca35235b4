"""Cohort aggregation: one row per subject folder, robust z-scores, flags and reasons.

Reads the status records of every per-subject stage (``paths.record``), merges
them into one row per first-level folder of ``input_dir`` and judges each
subject against the cohort:

- ``anomaly_score`` is the robust z of the model's ``anomaly_raw`` against the
  reference subjects: ``(raw - median_ref) / (1.4826 * MAD_ref)`` over subjects
  that are ``ok`` and ``in_reference`` (higher = more anomalous; NaN when not
  scored): the model alone, kept for comparison.
- ``audit_score`` fuses the model, every IQM, the artefact measures and the
  registration similarity into one calibrated outlier score, standardised per
  scanner group where groups differ (``mriaudit.audit``); ``scanner_group`` is
  the group key from the headers.

Flag rules (config ``flag``; defaults in ``DEFAULT_FLAG``):

- hard findings: status ``failed`` / ``no_series`` (with the stage's reason),
  header findings that make the series unreliable (missing or duplicate slices,
  mixed orientation or dimensions, non-uniform spacing, inconsistent rescale,
  unreadable files), ``registration_failed``, ``header_orientation`` and an
  image identical to another subject's;
- ``audit_score >= max(audit_z, fp_budget point)`` (see ``audit.audit_threshold``),
  the reason naming the components whose evidence is at least ``component_z``.

Reported but not flagged (column ``notes``, and ``findings``):

- ``2d_only``: the audited series is the 2D fallback; it is usable and the
  IQMs and the anomaly model still judge it, so it is a note for the curator;
- ``derived_only``, ``post_contrast_only``, ``repeat_series``: what the series
  selection had to settle for or choose between (``mriaudit.series``); the image
  is judged like any other;
- ``not_scored``: the anomaly model gave no score; the other checks still ran;
- protocol deviations from the cohort mode (field strength, manufacturer,
  TR/TE/TI, flip angle, voxel size): multi-site cohorts mix protocols on purpose,
  and whether the image itself is fine is judged by the IQMs and the model.

Modules: ``rows`` (stage records into one row per subject), ``reasons`` (the
vocabulary of findings and the sentences of reasons), ``judge`` (scores,
duplicates, protocol deviations, flags), ``stages`` (cohort/stages.tsv and the
prescreen), ``scores`` (the cohort's tables and subject JSONs).
"""

from mriaudit.aggregate.judge import (
    DEFAULT_FLAG,
    duplicate_images,
    flag_settings,
    protocol_deviations,
    reference_mask,
    robust_z,
    table_threshold,
)
from mriaudit.aggregate.reasons import (
    AUDIT_REASON,
    FLAGGING_FINDINGS,
    NOTE_FINDINGS,
    flagged_otherwise,
    iqm_causes,
    iqm_tables,
    iqm_title,
)
from mriaudit.aggregate.rows import METRIC_PREFIXES, read_subject_records
from mriaudit.aggregate.scores import aggregate_cohort, read_scores, subject_image
from mriaudit.aggregate.stages import read_prescreen, read_scanner_groups, write_stage_table

__all__ = [
    "AUDIT_REASON",
    "DEFAULT_FLAG",
    "FLAGGING_FINDINGS",
    "METRIC_PREFIXES",
    "NOTE_FINDINGS",
    "aggregate_cohort",
    "duplicate_images",
    "flag_settings",
    "flagged_otherwise",
    "iqm_causes",
    "iqm_tables",
    "iqm_title",
    "protocol_deviations",
    "read_prescreen",
    "read_scanner_groups",
    "read_scores",
    "read_subject_records",
    "reference_mask",
    "robust_z",
    "subject_image",
    "table_threshold",
    "write_stage_table",
]
