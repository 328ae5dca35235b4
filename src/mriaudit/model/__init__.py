"""Normative anomaly model: out-of-fold denoising autoencoders on template-space slices.

``train_cohort`` trains the fold models once per cohort; ``score_cohort``
(one subject: ``score_subject``) writes each subject's voxel anomaly map and
score record.
"""

from __future__ import annotations

from mriaudit.model.device import resolve_device
from mriaudit.model.score import score_cohort, score_subject
from mriaudit.model.train import train_cohort

__all__ = ["resolve_device", "score_cohort", "score_subject", "train_cohort"]
