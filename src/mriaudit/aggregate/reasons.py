"""The words of the audit: findings that flag or only note, and the reasons built from them.

``FLAGGING_FINDINGS`` and ``NOTE_FINDINGS`` are the vocabulary of hard
findings and notes; the functions here turn findings, IQM outliers, the audit
score's drivers and the anomaly map's regions into the plain sentences of
``flag_reasons`` and ``notes`` (``AUDIT_REASON`` starts the audit score's).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mriaudit import audit, paths
from mriaudit.aggregate.rows import _as_float
from mriaudit.records import FAILED, NO_SERIES, OK

#: Findings that flag the subject, with their plain reason.
FLAGGING_FINDINGS: dict[str, str] = {
    "missing_slices": "missing slices in the series",
    "duplicate_slices": "duplicate slices in the series",
    "nonuniform_spacing": "non-uniform slice spacing",
    "mixed_orientation": "slices with mixed orientations",
    "mixed_dimensions": "slices with mixed matrix sizes",
    "inconsistent_rescale": "inconsistent intensity rescaling across slices",
    "unreadable_files": "unreadable files in the subject folder",
    "registration_failed": "registration to the MNI152 template failed",
    # The header's patient position disagrees with the anatomy: every tool that trusts the
    # header (left/right included) reads this scan wrongly.
    "header_orientation": "header orientation disagrees with the anatomy (wrong patient position?)",
}
#: Findings reported as notes only (see the module docstring for why).
NOTE_FINDINGS: dict[str, str] = {
    "2d_only": "only a 2D T1-weighted series was available (thick slices); it was audited instead",
    "derived_only": (
        "only a derived T1 copy (DERIVED/SECONDARY, e.g. re-created from NIfTI) was available;"
        " it was audited"
    ),
    "post_contrast_only": "only a post-contrast T1 was available; it was audited",
    "repeat_series": "repeat T1 acquisitions: the best was audited (see the series table)",
    "not_scored": "not scored by the anomaly model",
}

#: Findings of a contrast beside the T1w (``mriaudit.contrasts.stage``): each flags the
#: subject, its reason starting with the contrast ("T2w: ...").
CONTRAST_FINDINGS: dict[str, str] = {
    "contrast_mismatch": "does not match the subject's T1w (another person or session?)",
    "contrast_unexpected": "labelled T2w but its contrast is T1-like",
    "registration_failed": "no anatomy in template space after co-registration to the T1w",
    "header_orientation": "header orientation disagrees with the anatomy (wrong patient position?)",
}
#: The note of a contrast registered to the template without its T1w (after its name).
ON_ITS_OWN = "registered to the template on its own: no usable T1w"
#: The words of a finding of a contrast registered to the template on its own (no
#: usable T1w), where they differ.
DIRECT_FINDINGS: dict[str, str] = {
    "registration_failed": "its registration to the MNI152 template failed (no usable T1w)",
}
# A contrast finding's evidence in its reason: (metric, words).
_CONTRAST_EVIDENCE: dict[str, tuple[str, str]] = {
    "contrast_mismatch": ("coreg_alignment_gain", "edge alignment above chance"),
    "contrast_unexpected": ("core_skew", "core skew"),
    "registration_failed": ("reg_mutual_information", "mutual information"),
    "header_orientation": ("", ""),
}


def contrast_reasons(contrast: str, entry: dict[str, Any]) -> tuple[list[str], list[str]]:
    """``(flag reasons, notes)`` of one contrast beside the T1w (``entry``: its status,
    reason, findings, metrics and registration as ``rows._subject_row`` keeps them). A
    contrast the subject lacks is a note, and so is one registered to the template
    without its T1w; one skipped because the inventory failed says nothing more."""
    status = entry.get("status")
    if entry.get("skipped"):
        return [], []
    if status == NO_SERIES:
        return [], [str(entry.get("reason") or f"no {contrast} series")]
    if status != OK:
        return [f"{contrast}: failed: {entry.get('reason', '')}"], []
    direct = entry.get("registration") == "direct"
    reasons = []
    for code in entry.get("findings") or []:
        if code not in CONTRAST_FINDINGS:
            continue
        words = (DIRECT_FINDINGS if direct else {}).get(code, CONTRAST_FINDINGS[code])
        text = f"{contrast}: {words}"
        metric, evidence = _CONTRAST_EVIDENCE[code]
        value = _as_float((entry.get("metrics") or {}).get(metric)) if metric else math.nan
        if math.isfinite(value):
            text += f" ({evidence} {value:.2f})"
        reasons.append(text)
    notes = [f"{contrast} {ON_ITS_OWN}"] if direct else []
    return reasons, notes


# Counts that make a finding's reason concrete.
_FINDING_COUNTS: dict[str, str] = {
    "missing_slices": "hdr_missing_slices",
    "duplicate_slices": "hdr_duplicate_slices",
    "unreadable_files": "hdr_n_unreadable",
}

_STATUS_PREFIX = {FAILED: "failed", NO_SERIES: "no usable T1-weighted series"}


def iqm_tables() -> tuple[dict[str, int], dict[str, str]]:
    """IQM directions (+1 higher is better, -1 lower is better, 0 descriptive) and display names.

    Keys are MRIQC names without the ``iqm_`` prefix, as ``mriaudit.iqm`` defines them.
    """
    # Imported here: mriaudit.iqm imports ANTsPy, which the cohort steps need for nothing else.
    from mriaudit.iqm import IQM_DIRECTIONS, IQM_TITLES

    directions = {_strip_iqm(k): int(v) for k, v in IQM_DIRECTIONS.items()}
    titles = {_strip_iqm(k): str(v) for k, v in IQM_TITLES.items()}
    return directions, titles


def _strip_iqm(name: str) -> str:
    return name[4:] if name.startswith("iqm_") else name


def iqm_title(column: str, titles: dict[str, str]) -> str:
    """Human-readable name of an ``iqm_*`` column (``iqm_snr_wm`` -> ``SNR (WM)``)."""
    return titles.get(_strip_iqm(column), _strip_iqm(column))


#: Prefix of the flag reason the audit score gives (the other reasons are hard findings).
AUDIT_REASON = "audit score "


def flagged_otherwise(flag_reasons: Sequence[str]) -> np.ndarray:
    """(n,) bool: the ``flag_reasons`` of scores.tsv hold a hard finding of the T1w (a
    reason besides the audit score's and the other contrasts', which start "T2w: ")."""
    others = tuple(f"{contrast}: " for contrast in paths.EXTRA_CONTRASTS)
    return np.array(
        [
            any(
                part and not part.startswith((AUDIT_REASON, *others))
                for part in str(text).split("; ")
            )
            for text in flag_reasons
        ],
        dtype=bool,
    )


def _finding_reason(code: str, metrics: dict[str, Any]) -> str:
    reason = FLAGGING_FINDINGS[code]
    count = _as_float(metrics.get(_FINDING_COUNTS.get(code, "")))
    if math.isfinite(count) and count > 0:
        reason = f"{reason} ({int(count)})"
    if code == "registration_failed":
        similarity = _as_float(metrics.get("reg_similarity"))
        if math.isfinite(similarity):
            reason = f"{reason} (similarity {similarity:.2f})"
    return reason


def iqm_causes() -> dict[str, str]:
    """Likely cause of each IQM on its bad side (keys without the ``iqm_`` prefix)."""
    from mriaudit.iqm import IQM_CAUSES

    return {_strip_iqm(k): str(v) for k, v in IQM_CAUSES.items()}


def _iqm_reason(column: str, z: float, titles: dict[str, str], causes: dict[str, str]) -> str:
    """``EFC 4.2 robust SD above the cohort (ghosting or blur)``."""
    side = "below" if z < 0 else "above"
    cause = causes.get(_strip_iqm(column))
    suffix = f" ({cause})" if cause else ""
    return f"{iqm_title(column, titles)} {abs(z):.1f} robust SD {side} the cohort{suffix}"


def _top_region_text(regions: list[Any]) -> str:
    if not regions or not isinstance(regions[0], dict):
        return ""
    region = regions[0]
    centre = region.get("centroid_mm")
    text = ""
    if isinstance(centre, (list, tuple)) and len(centre) == 3:
        text = "(" + ", ".join(f"{_as_float(c):.0f}" for c in centre) + ") mm"
    volume = _as_float(region.get("volume_ml"))
    if math.isfinite(volume):
        text = f"{text}, {volume:.2g} ml" if text else f"{volume:.2g} ml"
    return text


def _drivers(result: audit.AuditResult, row: int, *, component_z: float) -> list[tuple[str, float]]:
    """The worst member of each family whose evidence is at least ``component_z``, worst first:
    ``[(column, signed z)]``."""
    found = []
    for f, family in enumerate(audit.FAMILY_NAMES):
        if result.families[row, f] < component_z:
            continue
        members = [
            j for j, c in enumerate(result.columns) if audit.feature_columns([c])[c][0] == family
        ]
        worst = max(members, key=lambda j: result.bad[row, j])
        found.append((result.columns[worst], float(result.z[row, worst]), result.families[row, f]))
    found.sort(key=lambda item: -item[2])
    return [(column, z) for column, z, _ in found]


def _component_reason(column: str, z: float, titles: dict[str, str], causes: dict[str, str]) -> str:
    """``CJV 4.2 robust SD above the cohort (noise, ...)``; the model: ``model anomaly 4.2 ...``."""
    if column == "anomaly_raw":
        return f"model anomaly {z:.1f} robust SD above the cohort"
    if column == "reg_similarity":
        return f"template similarity {abs(z):.1f} robust SD below the cohort (wrong contrast or misregistration)"
    return _iqm_reason(column, z, titles, causes)
