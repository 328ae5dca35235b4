"""The self-contained HTML audit report and its figures."""

from __future__ import annotations

from mriaudit.report.build import MAX_MONTAGES, build_report
from mriaudit.report.figures import make_subject_montage

__all__ = ["MAX_MONTAGES", "build_report", "make_subject_montage"]
