"""The training set of a very large cohort: a capped sample, stratified by scanner group.

Out-of-fold training on 100,000 subjects is neither needed nor affordable: a
normative model of brain anatomy saturates long before that, while every
scanner of the cohort must stay represented (a scanner the model never saw
scores as anomalous everywhere). Above ``max_subjects`` candidates, each
scanner group keeps a share of the sample proportional to its size, and at
least one unit when the cap allows; the rest of the cohort is scored out of
sample, by every fold model, like any subject outside the reference.

The units sampled are fold groups (e.g. the person scanned) when the run has
them, so a person's sessions are all in the training set or all out of it.
Written here rather than with scikit-learn's stratified splitters, which
refuse strata of one member and know nothing of fold groups.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

import numpy as np


def _quotas(sizes: Mapping[str, int], cap: int) -> dict[str, int]:
    """Scans per stratum: proportional to ``sizes`` (largest remainder), at least one each
    while the cap allows, summing to ``cap``."""
    total = sum(sizes.values())
    exact = {k: cap * n / total for k, n in sizes.items()}
    quotas = {
        k: min(sizes[k], max(1 if cap >= len(sizes) else 0, math.floor(v)))
        for k, v in exact.items()
    }
    # The floor of one scan per stratum is paid for by the largest strata.
    while sum(quotas.values()) > cap:
        largest = max(quotas, key=lambda k: (quotas[k], k))
        quotas[largest] -= 1
    order = sorted(sizes, key=lambda k: (-(exact[k] - math.floor(exact[k])), k))
    while sum(quotas.values()) < cap:
        grown = False
        for key in order:
            if sum(quotas.values()) >= cap:
                break
            if quotas[key] < sizes[key]:
                quotas[key] += 1
                grown = True
        if not grown:
            break
    return quotas


def stratified_cap(
    candidates: Sequence[str],
    *,
    max_subjects: int,
    scanner_groups: Mapping[str, str],
    fold_groups: Mapping[str, str] | None = None,
    seed: int = 0,
) -> list[str]:
    """At most about ``max_subjects`` of ``candidates`` (BIDS ids), sorted.

    ``scanner_groups`` maps an id to its scanner group (missing: the empty
    group); ``fold_groups`` maps an id to its unit of sampling (missing: the id
    itself). A unit's stratum is its first member's scanner group. Units are
    drawn at random (``seed``) within each stratum until the stratum's quota of
    scans is reached, so a unit of several scans can overshoot it by a few.
    ``candidates`` at or under the cap come back whole.
    """
    if max_subjects < 1:
        message = f"training.max_subjects must be at least 1, got {max_subjects}"
        raise ValueError(message)
    candidates = sorted(candidates)
    if len(candidates) <= max_subjects:
        return candidates
    fold_groups = fold_groups or {}
    units: dict[str, list[str]] = defaultdict(list)
    for bids_id in candidates:
        units[fold_groups.get(bids_id, f"id:{bids_id}")].append(bids_id)
    strata: dict[str, list[str]] = defaultdict(list)
    for unit, members in units.items():
        strata[scanner_groups.get(members[0], "")].append(unit)
    sizes = {key: sum(len(units[u]) for u in unit_keys) for key, unit_keys in strata.items()}
    quotas = _quotas(sizes, max_subjects)
    rng = np.random.default_rng(seed)
    chosen: list[str] = []
    for key in sorted(strata):
        taken = 0
        for i in rng.permutation(len(strata[key])):
            if taken >= quotas[key]:
                break
            members = units[strata[key][i]]
            chosen += members
            taken += len(members)
    return sorted(chosen)
