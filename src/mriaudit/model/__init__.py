"""The normative anomaly model: train it on the reference subjects, score every subject.

``train_cohort`` trains the fold models once per cohort; ``score_cohort``
(one subject: ``score_subject``) writes each subject's voxel anomaly map and
score record. The network itself is described once, in ``network.py``; why it
is built so (and what was tried instead) in docs/DESIGN.md, "Detection design".
"""

from __future__ import annotations

from mriaudit.model.device import resolve_device
from mriaudit.model.score import score_cohort, score_subject
from mriaudit.model.train import train_cohort

__all__ = ["resolve_device", "score_cohort", "score_subject", "train_cohort"]
