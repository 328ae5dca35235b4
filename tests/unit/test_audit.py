"""audit and artefacts: site-aware robust z, the fused audit score, native artefact measures."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mriaudit import artefacts, audit

N_MAJORITY, N_MINORITY = 30, 10


def _group_headers(minority: np.ndarray) -> dict[str, list[object]]:
    return {
        "hdr_manufacturer": np.where(minority, "GE MEDICAL SYSTEMS", "SIEMENS").tolist(),
        "hdr_model": np.where(minority, "SIGNA Premier", "Prisma").tolist(),
        "hdr_field_strength": np.where(minority, 1.5, 3.0).tolist(),
        "hdr_tr": np.where(minority, 7.6, 2300.0).tolist(),
        "hdr_te": np.where(minority, 3.1, 2.98).tolist(),
        "hdr_ti": np.where(minority, 450.0, 900.0).tolist(),
        "hdr_voxel_x": [1.0] * minority.size,
        "hdr_voxel_y": [1.0] * minority.size,
        "hdr_voxel_z": np.where(minority, 1.2, 1.0).tolist(),
    }


def two_scanner_cohort(seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Healthy subjects of two scanners; the minority (a quarter) has a darker, noisier
    image (lower SNR and CNR, higher CJV) and a different model response."""
    rng = np.random.default_rng(seed)
    minority = np.r_[np.zeros(N_MAJORITY, bool), np.ones(N_MINORITY, bool)]
    n = minority.size
    frame = pd.DataFrame(
        {
            "anomaly_raw": rng.normal(0, 1, n) + 1.5 * minority,
            "iqm_snr_wm": rng.normal(20, 1.5, n) - 9.0 * minority,
            "iqm_snr_gm": rng.normal(15, 1.2, n) - 7.0 * minority,
            "iqm_cnr": rng.normal(3.0, 0.25, n) - 1.2 * minority,
            "iqm_cjv": rng.normal(0.40, 0.03, n) + 0.2 * minority,
            "iqm_efc": rng.normal(0.50, 0.02, n),
            "iqm_inu_range": rng.normal(0.20, 0.03, n),
            "iqm_fwhm_avg": rng.normal(2.5, 0.1, n) + 0.3 * minority,
            "reg_similarity": rng.normal(0.7, 0.02, n),
            **_group_headers(minority),
        }
    )
    return frame, minority


def _audit(frame: pd.DataFrame) -> audit.AuditResult:
    n = len(frame)
    return audit.audit_scores(
        frame, usable=np.ones(n, bool), hard=np.zeros(n, bool), audit_z=3.0, fp_budget=0.05
    )


def test_scanner_groups_from_headers():
    frame, minority = two_scanner_cohort()
    groups = np.array(audit.scanner_groups(frame))
    assert len(set(groups[minority])) == 1 and len(set(groups[~minority])) == 1
    assert groups[0] == "SIEMENS Prisma 3T TR2300 TE3 TI900 1mm"
    assert audit.scanner_groups(pd.DataFrame({"iqm_cjv": [0.4, 0.5]})) == ["", ""]


def test_site_robust_z_judges_a_different_scanner_against_itself():
    frame, minority = two_scanner_cohort()
    values = frame["iqm_snr_wm"].to_numpy()
    groups = audit.scanner_groups(frame)
    pooled = audit.site_robust_z(values, np.ones(len(values), bool), [""] * len(values))
    site = audit.site_robust_z(values, np.ones(len(values), bool), groups)
    assert np.median(pooled[minority]) < -2  # pooled: the whole minority looks bad
    assert abs(np.median(site[minority])) < 1.0
    # Groups that do not differ keep the cohort's statistics (no noise from small groups).
    same = np.random.default_rng(1).normal(10, 1, 40)
    split = ["a"] * 20 + ["b"] * 20
    np.testing.assert_allclose(
        audit.site_robust_z(same, np.ones(40, bool), split),
        audit.site_robust_z(same, np.ones(40, bool), [""] * 40),
        rtol=0.15,
        atol=0.1,
    )


def test_minority_scanner_is_not_flagged_wholesale():
    """Two healthy scanner groups, the minority a quarter: its flag rate is at most twice
    the majority's (and both are small)."""
    rates = []
    for seed in range(5):
        frame, minority = two_scanner_cohort(seed)
        result = _audit(frame)
        flagged = result.score >= result.threshold
        rates.append((flagged[minority].mean(), flagged[~minority].mean()))
    minority_rate, majority_rate = np.mean(rates, axis=0)
    assert minority_rate <= 2 * max(majority_rate, 1 / N_MAJORITY)
    assert minority_rate <= 0.2


def test_audit_score_finds_each_kind_of_outlier_and_names_it():
    frame, _ = two_scanner_cohort()
    frame.loc[3, "iqm_snr_wm"] = 5.0  # noise
    frame.loc[7, "anomaly_raw"] = 9.0  # model
    frame.loc[11, "iqm_inu_range"] = 0.6  # bias
    result = _audit(frame)
    flagged = np.flatnonzero(result.score >= result.threshold)
    assert {3, 7, 11} <= set(flagged.tolist())
    assert len(flagged) <= 5
    family = {f: i for i, f in enumerate(audit.FAMILY_NAMES)}
    assert result.families[3, family["noise"]] > 4
    assert result.families[7, family["model"]] > 4
    assert result.families[11, family["bias"]] > 4
    # Better than typical is not evidence: a very clean subject scores low.
    frame.loc[20, "iqm_snr_wm"] = 40.0
    assert _audit(frame).score[20] < 3


def test_hard_flagged_and_unusable_rows_do_not_enter_the_statistics():
    frame, _ = two_scanner_cohort()
    base = _audit(frame)
    changed = frame.copy()
    changed.loc[:4, "iqm_snr_wm"] = 1000.0
    n = len(frame)
    hard = np.zeros(n, bool)
    hard[:5] = True
    result = audit.audit_scores(
        changed, usable=np.ones(n, bool), hard=hard, audit_z=3.0, fp_budget=0.05
    )
    # The five rows with absurd values change nothing for the others.
    assert np.corrcoef(result.score[5:], base.score[5:])[0, 1] > 0.95
    changed_flags = (result.score >= result.threshold) != (base.score >= base.threshold)
    assert changed_flags[5:].sum() <= 2
    unusable = audit.audit_scores(
        frame, usable=np.arange(n) >= 5, hard=np.zeros(n, bool), audit_z=3.0, fp_budget=0.05
    )
    assert np.isnan(unusable.score[:5]).all() and np.isfinite(unusable.score[5:]).all()


def _head_volume(shape=(64, 80, 72)) -> tuple[np.ndarray, np.ndarray]:
    """A bright ellipsoid head in Rician-like air noise, and its mask."""
    grid = np.indices(shape).astype(float)
    centre = (np.array(shape) - 1) / 2
    radii = np.array(shape) * np.array([0.3, 0.32, 0.3])
    inside = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1
    rng = np.random.default_rng(0)
    data = np.where(inside, 100.0, 0.0) + np.abs(rng.normal(0, 5, shape))
    return data.astype(np.float32), inside


def test_ghost_ratio_sees_a_replica_along_the_phase_axis():
    data, head = _head_volume()
    clean = artefacts.ghost_ratio(data, head)
    kspace = np.fft.fft(data, axis=1)
    lines = np.arange(data.shape[1]) % 4 == 1
    ghosted = np.abs(np.fft.ifft(kspace * np.where(lines, np.exp(0.8j), 1)[None, :, None], axis=1))
    assert abs(clean) < 0.02
    assert artefacts.ghost_ratio(ghosted.astype(np.float32), head) > 0.05


def test_edge_anatomy_sees_a_head_folded_over_but_not_a_neck():
    _, head = _head_volume()
    assert artefacts.edge_anatomy(head) == 0.0
    neck = head.copy()
    neck[:, :, :10] |= head[:, :, 36:37]  # anatomy through one end only
    assert artefacts.edge_anatomy(neck) == 0.0
    folded = np.roll(head, 30, axis=1)  # the head wraps across the field of view
    assert artefacts.edge_anatomy(folded) > 0.05


def test_bg_peak_sees_a_spike_and_not_noise():
    data, head = _head_volume()
    clean = artefacts.bg_peak(data, head)
    k, r, c = np.indices(data.shape)
    stripes = 15.0 * np.cos(2 * np.pi * (0.21 * r + 0.17 * c + 0.02 * k))
    spiked = artefacts.bg_peak((data + stripes).astype(np.float32), head)
    assert clean < 2.0
    assert spiked > clean + 1.0
    assert np.isnan(artefacts.bg_peak(np.where(head, data, 0.0), head))  # zero-filled air
