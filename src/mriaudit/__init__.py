"""mriaudit: audit cohorts of MRI scans (conversion, preprocessing, IQMs, anomaly model, report)."""

from __future__ import annotations

__version__ = "0.1.0"
