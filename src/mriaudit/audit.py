"""One audit score per subject: model, IQMs, artefact measures and registration fused.

Each image-quality metric, the artefact measures of ``mriaudit.artefacts``,
the normative model's ``anomaly_raw`` and the registration similarity become a
robust z of their bad side against the pool (the ok subjects without a hard
finding), per scanner group where groups differ (``site_robust_z``). Ratios
are judged on a log scale, and a measure whose normal values have a long tail
on the bad side is scaled by that tail. Measures that see the same fault are
one *family* (``FAMILIES``: the SNR variants are one piece of evidence of
noise, not eight) whose evidence is its worst member's bad-side z. The score
is ``1 + sqrt(sum over families of max(0, evidence - 1)^2)``: in units of one
measure's robust z (a subject whose worst family is 4 SD out scores 4), with
the moderate deviations normal subjects show somewhere (``SLACK``) not adding
up. It needs no calibration of its own, so a cohort rich in anomalies cannot
widen what hides them; the flag threshold is ``audit_z``, raised by
``fp_budget`` only by the spread of the pool's subjects below ``audit_z``.

No label enters anywhere: every statistic comes from the images and headers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from mriaudit.robust import MAD_TO_SD, MEAN_AD_TO_SD, location_scale

#: Fewest subjects a robust statistic is computed over.
MIN_COHORT = 5
#: Fewest subjects of a scanner group whose own statistics are used (shrunk): a
#: smaller group's median and MAD are too noisy to judge its members by.
MIN_GROUP = 8
#: Groups smaller than this judge each member by the others (leave one out): in a
#: group of ten, one anomaly would otherwise widen the statistics that judge it.
LEAVE_ONE_OUT_BELOW = 30
#: Evidence of a family up to this many robust SD is what normal subjects show in some
#: family or other; only the excess beyond it adds up across families.
SLACK = 1.0
#: 75th percentile of the standard normal: a bad side's spread is (quartile - median) / this.
Q75_Z = 0.6745
#: Sampling variance of a sample median over sigma^2 / n for normal data (pi / 2).
MEDIAN_VARIANCE = math.pi / 2
#: Sampling variance of log(MAD) times n for normal data.
LOG_MAD_VARIANCE = 1.36

#: Evidence families: column prefixes whose measures see the same fault, and the
#: direction of each (+1 higher is better, -1 lower is better).
FAMILIES: dict[str, tuple[tuple[str, int], ...]] = {
    "model": (("anomaly_raw", -1),),
    "noise": (
        ("iqm_snr_", +1),
        ("iqm_snrd_", +1),
        ("iqm_cnr", +1),
        ("iqm_cjv", -1),
    ),
    "air": (("iqm_fber", +1), ("iqm_qi_1", -1), ("iqm_efc", -1)),
    "ghosting": (("iqm_ghost_ratio", -1),),
    "wraparound": (("iqm_edge_anatomy", -1),),
    "spike": (("iqm_bg_peak", -1),),
    "blur": (("iqm_fwhm_", -1), ("iqm_rpve_", -1)),
    "bias": (("iqm_inu_range", -1), ("iqm_inu_wm_range", -1)),
    "contrast": (("iqm_wm2max", +1), ("iqm_tpm_overlap_", +1), ("reg_similarity", +1)),
}


#: The measures a contrast beside the T1w is audited on: each family's summary of the
#: fault. Per-tissue SNR, rPVE, TPM overlap and the INU in white matter depend on the
#: contrast's tissue classes, which reach it through two registrations (its own to the
#: T1w, the T1w's to the template) and its weaker grey-white contrast; on the demo they
#: put 5 of 25 normal T2w past the threshold, and none of these 5 once left out.
CONTRAST_MEASURES: tuple[str, ...] = (
    "anomaly_raw",
    "reg_similarity",
    "iqm_snr_total",
    "iqm_snrd_total",
    "iqm_cnr",
    "iqm_cjv",
    "iqm_efc",
    "iqm_fber",
    "iqm_qi_1",
    "iqm_ghost_ratio",
    "iqm_edge_anatomy",
    "iqm_bg_peak",
    "iqm_fwhm_avg",
    "iqm_inu_range",
    "iqm_wm2max",
)


#: Measures that are ratios of positive quantities: judged on a log scale, where a
#: subject at half the cohort's SNR is as far from it as one at twice. (The INU ranges
#: are spreads of a unit-median field already, and a log would compress a strong one.)
LOG_PREFIXES = ("iqm_snr_", "iqm_snrd_", "iqm_cnr", "iqm_cjv", "iqm_fber", "iqm_fwhm_")


#: Smallest spread of measures that are exactly 0 for most clean images (a fraction of
#: voxels), so a pool of clean subjects still has a scale to judge the others by.
MIN_SCALE = {"iqm_edge_anatomy": 0.01, "iqm_ghost_ratio": 0.002, "iqm_qi_1": 0.001}


def transformed(column: str, values: np.ndarray) -> np.ndarray:
    """``values`` on the scale the audit judges them: log for ``LOG_PREFIXES`` (NaN where <= 0)."""
    x = np.asarray(values, dtype=float)
    if column.startswith(LOG_PREFIXES):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(x > 0, np.log(np.where(x > 0, x, 1.0)), np.nan)
    return x


def feature_columns(columns: Sequence[str]) -> dict[str, tuple[str, int]]:
    """``{column: (family, direction)}`` of the table's columns that enter the audit score."""
    found: dict[str, tuple[str, int]] = {}
    for column in columns:
        for family, members in FAMILIES.items():
            for prefix, direction in members:
                exact = not prefix.endswith("_")
                if (column == prefix) if exact else column.startswith(prefix):
                    found[column] = (family, direction)
    return found


def _round_class(value: float, step: float) -> str:
    return "" if not math.isfinite(value) else f"{round(value / step) * step:g}"


def scanner_groups(frame: pd.DataFrame) -> list[str]:
    """A scanner-and-protocol key per row from the ``hdr_*`` columns.

    Manufacturer (first word), model, field strength (0.5 T classes), TR, TE
    and TI (two significant digits, ms) and the voxel size class (nearest power
    of two of the mean voxel edge, mm). Rows without headers (NIfTI input) share
    the empty key and are standardised against the pooled cohort.
    """

    def column(name: str) -> list[object]:
        return frame[name].tolist() if name in frame else [None] * len(frame)

    def number(value: object) -> float:
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return math.nan

    def two_digits(value: float) -> str:
        return "" if not math.isfinite(value) or value <= 0 else f"{float(f'{value:.2g}'):g}"

    keys = []
    rows = zip(
        column("hdr_manufacturer"),
        column("hdr_model"),
        column("hdr_field_strength"),
        column("hdr_tr"),
        column("hdr_te"),
        column("hdr_ti"),
        *(column(f"hdr_voxel_{axis}") for axis in "xyz"),
        strict=True,
    )
    for vendor, model, field, tr, te, ti, vx, vy, vz in rows:
        voxel = (
            np.nanmean([number(vx), number(vy), number(vz)])
            if any(math.isfinite(number(v)) for v in (vx, vy, vz))
            else math.nan
        )
        parts = [
            str(vendor).split()[0].upper() if isinstance(vendor, str) and vendor.strip() else "",
            str(model).strip() if isinstance(model, str) else "",
            _round_class(number(field), 0.5) and f"{_round_class(number(field), 0.5)}T",
            two_digits(number(tr)) and f"TR{two_digits(number(tr))}",
            two_digits(number(te)) and f"TE{two_digits(number(te))}",
            two_digits(number(ti)) and f"TI{two_digits(number(ti))}",
            f"{2 ** round(math.log2(voxel)):g}mm" if math.isfinite(voxel) and voxel > 0 else "",
        ]
        keys.append(" ".join(p for p in parts if p))
    return keys


def _tail_spread(values: np.ndarray, median: float, direction: int) -> float:
    """Spread of the bad side (``direction`` -1: above the median is bad, +1: below):
    the distance from the median to the bad-side quartile, as an SD. A sample
    quartile: it depends on the ranks beyond it, not on how far the anomalies are."""
    quartile = 0.75 if direction < 0 else 0.25
    return abs(float(np.quantile(values, quartile)) - median) / Q75_Z


def _leave_one_out(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per element of ``values`` (n,), the ``location_scale`` of the others: (n,), (n,)."""
    n = values.size
    others = np.broadcast_to(values, (n, n))[~np.eye(n, dtype=bool)].reshape(n, n - 1)
    median = np.median(others, axis=1)
    deviation = np.abs(others - median[:, None])
    scale = MAD_TO_SD * np.median(deviation, axis=1)
    fallback = MEAN_AD_TO_SD * deviation.mean(axis=1)
    return median, np.where(scale > 0, scale, fallback)


def site_robust_z(
    values: np.ndarray,
    pool: np.ndarray,
    groups: Sequence[str],
    *,
    direction: int = 0,
    min_scale: float = 0.0,
) -> np.ndarray:
    """Robust z of ``values`` (n,) against ``pool`` (n,) bool, per scanner group where it pays.

    The cohort's median and MAD-based SD are the prior; a group with at least
    ``MIN_GROUP`` pool members moves its location and scale towards its own by
    an empirical-Bayes weight ``tau^2 / (tau^2 + sampling variance)``, where
    ``tau^2`` is the spread between the groups beyond what sampling explains.
    Groups that do not differ keep the cohort's statistics; a scanner whose
    images are systematically darker or noisier is judged against itself.
    With a ``direction`` (+1 higher is better, -1 lower is better) the scale
    is at least the spread of the cohort's bad side (``_tail_spread``): a
    measure whose normal values have a long tail on that side (real people,
    real backgrounds) does not call that tail an anomaly.
    NaN where ``values`` is NaN or the pool has fewer than ``MIN_COHORT`` values
    or no spread.
    """
    x = np.asarray(values, dtype=float)
    use = np.asarray(pool, dtype=bool) & np.isfinite(x)
    z = np.full(x.shape, np.nan)
    if use.sum() < MIN_COHORT:
        return z
    centre, scale = location_scale(x[use])
    scale = max(scale, min_scale)
    if scale <= 0:
        return z
    # How much wider the bad side is than the MAD says; carried over to every group.
    tail = max(1.0, _tail_spread(x[use], centre, direction) / scale) if direction else 1.0
    key = np.asarray(groups, dtype=object)
    names = [g for g in sorted(set(key[use])) if (use & (key == g)).sum() >= MIN_GROUP]
    location = np.full(x.shape, centre)
    spread = np.full(x.shape, scale)
    if len(names) >= 2:
        group_stats = {g: location_scale(x[use & (key == g)]) for g in names}
        sizes = {g: int((use & (key == g)).sum()) for g in names}
        residual = np.concatenate([x[use & (key == g)] - group_stats[g][0] for g in names])
        _, within = location_scale(residual)
        within = within if within > 0 else scale
        medians = np.array([group_stats[g][0] for g in names])
        sampling = np.array([MEDIAN_VARIANCE * within**2 / sizes[g] for g in names])
        tau2 = max(0.0, float(np.var(medians, ddof=1) - sampling.mean()))
        logs = np.log([max(group_stats[g][1], 1e-12) for g in names])
        log_sampling = np.array([LOG_MAD_VARIANCE / sizes[g] for g in names])
        tau2_log = max(0.0, float(np.var(logs, ddof=1) - log_sampling.mean()))
        for g, m_g, s_sampling, l_g, l_sampling in zip(
            names, medians, sampling, logs, log_sampling, strict=True
        ):
            weight = tau2 / (tau2 + s_sampling) if tau2 > 0 else 0.0
            weight_log = tau2_log / (tau2_log + l_sampling) if tau2_log > 0 else 0.0
            members = key == g
            m_i = np.full(x.shape, m_g)
            l_i = np.full(x.shape, l_g)
            if sizes[g] < LEAVE_ONE_OUT_BELOW:
                peers = np.flatnonzero(use & members)
                m_i[peers], s_out = _leave_one_out(x[peers])
                l_i[peers] = np.log(np.maximum(s_out, 1e-12))
            location[members] = weight * m_i[members] + (1 - weight) * centre
            spread[members] = np.maximum(
                min_scale, np.exp(weight_log * l_i[members] + (1 - weight_log) * math.log(within))
            )
    z = (x - location) / (spread * tail)
    z[~np.isfinite(x)] = np.nan
    return z


@dataclass
class AuditResult:
    """Per subject (n,): ``score`` (audit_score); per feature column
    (n, columns): ``z`` (signed site-aware robust z) and ``bad`` (bad-side z, >= 0);
    ``families`` (n, families) evidence; ``threshold``, the statistics' ``pool`` (n,)
    and each row's ``groups`` key."""

    columns: list[str]
    z: np.ndarray
    bad: np.ndarray
    families: np.ndarray
    score: np.ndarray
    pool: np.ndarray
    threshold: float
    groups: list[str]


FAMILY_NAMES = tuple(FAMILIES)


def _evidence(
    frame: pd.DataFrame,
    features: Mapping[str, tuple[str, int]],
    pool: np.ndarray,
    groups: list[str],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    columns = list(features)
    z = np.full((len(frame), len(columns)), np.nan)
    for j, column in enumerate(columns):
        values = pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=float)
        direction = features[column][1]
        z[:, j] = site_robust_z(
            transformed(column, values),
            pool,
            groups,
            direction=direction,
            min_scale=MIN_SCALE.get(column, 0.0),
        )
    directions = np.array([features[c][1] for c in columns], dtype=float)
    bad = np.clip(-directions * np.nan_to_num(z, nan=0.0), 0.0, None)
    families = np.zeros((len(frame), len(FAMILY_NAMES)))
    for j, column in enumerate(columns):
        f = FAMILY_NAMES.index(features[column][0])
        families[:, f] = np.maximum(families[:, f], bad[:, j])
    return z, bad, families


def audit_threshold(
    score: np.ndarray, pool: np.ndarray, *, audit_z: float, fp_budget: float
) -> float:
    """``max(audit_z, the fp_budget point of the pool)``; infinite when ``fp_budget`` is 0.

    The fp_budget point is where a Gaussian with the spread of the upper half
    of the pool's scores leaves ``fp_budget`` above it.
    """
    if fp_budget <= 0:
        return math.inf
    values = np.asarray(score, dtype=float)[np.asarray(pool, dtype=bool)]
    values = values[np.isfinite(values)]
    threshold = float(audit_z)
    if values.size:
        median, upper = float(np.median(values)), float(np.quantile(values, 0.75))
        tail = float(stats.norm.isf(fp_budget) / stats.norm.isf(0.25))
        threshold = max(threshold, median + max(upper - median, 0.0) * tail)
    return threshold


def audit_scores(
    frame: pd.DataFrame,
    *,
    usable: np.ndarray,
    hard: np.ndarray,
    audit_z: float,
    fp_budget: float,
) -> AuditResult:
    """The audit score of every row of ``frame`` (see the module docstring).

    ``usable`` (n,) bool: rows whose images were judged (status ok);
    ``hard`` (n,) bool: rows flagged by a hard finding, left out of every
    statistic. Rows that are not usable get NaN.
    """
    usable = np.asarray(usable, dtype=bool)
    features = feature_columns(list(frame.columns))
    groups = scanner_groups(frame)
    pool = usable & ~np.asarray(hard, dtype=bool)
    z, bad, families = _evidence(frame, features, pool, groups)
    excess = np.clip(families - SLACK, 0.0, None)
    score = np.where(usable, np.sqrt((excess**2).sum(axis=1)) + SLACK, np.nan)
    # The fp_budget point from the pool's subjects below audit_z: the anomalies of a
    # cohort audited with ``reference: all`` must not raise the bar that finds them.
    below = pool & ~(np.nan_to_num(score, nan=0.0) >= audit_z)
    threshold = audit_threshold(score, below, audit_z=audit_z, fp_budget=fp_budget)
    return AuditResult(
        columns=list(features),
        z=z,
        bad=bad,
        families=families,
        score=score,
        pool=pool,
        threshold=threshold,
        groups=groups,
    )
