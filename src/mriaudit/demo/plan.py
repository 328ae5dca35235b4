"""What the demo cohort holds: one plan per subject (kind, seed streams, head).

``plan_cohort`` hands a labelled minority of anomaly kinds and broken inputs
to a cohort of template heads, deterministic for a seed; ``plan_real_heads``
plans the detection benchmark's cohort on real heads (``mriaudit.heads``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from mriaudit.cohort import to_bids_id

#: Contrasts the demo renders beside the T1 (``--contrasts``).
EXTRA_CONTRASTS = ("T2w", "FLAIR")
#: Anomalies planted in one contrast beside the T1 only, handed to normals in turn:
#: a lesion as it shows there (T2-bright, FLAIR-bright), then acquisition artefacts.
CONTRAST_ANOMALIES: dict[str, tuple[tuple[str, str], ...]] = {
    "T2w": (("lesion", "hypo"), ("ghosting", ""), ("noise", "")),
    "FLAIR": (("lesion", "hyper"), ("spike", ""), ("bias", "")),
}
#: Share of the cohort with an anomaly in each contrast beside the T1.
CONTRAST_ANOMALY_FRACTION = 0.1

ANOMALY_KINDS = (
    "lesion",
    "ghosting",
    "missing_slices",
    "wrong_contrast",
    "spike",
    "noise",
    "wraparound",
    "bias",
)
BROKEN_KINDS = ("truncated_file", "empty_folder", "localizer_only")
KINDS = ("normal", *ANOMALY_KINDS, *BROKEN_KINDS)
MIN_SUBJECTS = len(BROKEN_KINDS) + 2
FULL_MIX_SUBJECTS = 24
ANOMALY_FRACTION = 0.3
# Second instances get the other variant, so a 30-subject cohort has both lesion
# contrasts and both ways of losing slices.
VARIANTS = {"lesion": ("hyper", "hypo", "ring"), "missing_slices": ("zeroed", "removed")}
# Order in which anomalies are handed out: small cohorts get the first few kinds,
# FULL_MIX_SUBJECTS or more get all of them, larger cohorts cycle again.
_ANOMALY_SEQUENCE = (*ANOMALY_KINDS, "lesion", "missing_slices")
_STREAMS = (
    "anatomy",
    "acquisition",
    "anomaly",
    "noise",
    "scanner",
    "scaling",
    "study",
    "files",
    "extra",
    "contrast",
)


@dataclass(frozen=True)
class SubjectPlan:
    """What one subject folder will hold; the random draws derive from ``seed`` and ``number``."""

    folder: str
    number: int
    kind: str
    variant: str = ""
    has_localizer: bool = True
    has_t2: bool = False
    #: Contrasts rendered beside the T1 (``T2w``, ``FLAIR``), and the one the anomaly is
    #: planted in (the others are normal).
    contrasts: tuple[str, ...] = ()
    anomaly_contrast: str = "T1w"
    seed: int = 0
    #: Whose head: ``""`` for the template head, else a person of ``mriaudit.heads``
    #: whose prepared head volume is ``head_path``.
    person: str = ""
    head_path: str = ""

    @property
    def truth(self) -> int:
        """1 = anomalous or broken (should be excluded), 0 = normal."""
        return 0 if self.kind == "normal" else 1

    def rng(self, stream: str, *, series: str = "") -> np.random.Generator:
        """Independent generator per aspect, so an anomaly never changes the other draws;
        ``series`` (a contrast beside the T1) draws its own series' aspects."""
        key = (self.number, _STREAMS.index(stream))
        if series:
            key += (1 + EXTRA_CONTRASTS.index(series),)
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))


def _anomaly_count(n_subjects: int) -> int:
    if n_subjects >= FULL_MIX_SUBJECTS:
        return max(len(_ANOMALY_SEQUENCE), round(ANOMALY_FRACTION * n_subjects))
    wanted = max(1, round(ANOMALY_FRACTION * n_subjects))
    # Small cohorts keep at least two normals so a reference exists.
    return max(1, min(wanted, n_subjects - len(BROKEN_KINDS) - 2))


def _folder_names(n_subjects: int) -> list[str]:
    width = max(3, len(str(n_subjects)))
    names = [f"sub-{number:0{width}d}" for number in range(1, n_subjects + 1)]
    # One messy archive name (spaces, parentheses, non-ASCII); its BIDS id stays unique.
    messy = min(7, n_subjects)
    names[messy - 1] = f"Patient {messy} (ü)"
    return names


def plan_cohort(
    n_subjects: int, *, seed: int, contrasts: tuple[str, ...] = ()
) -> list[SubjectPlan]:
    """One plan per subject, in folder order; kinds are shuffled over the folders.

    ``contrasts`` (``T2w``, ``FLAIR``) are rendered beside every subject's T1 (and
    replace the 2D T2 some subjects otherwise hold as a distractor); about a tenth
    of the cohort per contrast, taken from the normals, gets an anomaly in that
    contrast only (``CONTRAST_ANOMALIES``). Without them the plans are those of a
    T1 cohort, draw for draw.
    """
    unknown = sorted(set(contrasts) - set(EXTRA_CONTRASTS))
    if unknown:
        message = f"unknown contrasts {unknown}; the demo renders {EXTRA_CONTRASTS} beside the T1"
        raise ValueError(message)
    if n_subjects < MIN_SUBJECTS:
        message = (
            f"the demo cohort needs at least {MIN_SUBJECTS} subjects "
            f"(3 broken inputs, one anomaly, one normal), got {n_subjects}"
        )
        raise ValueError(message)
    n_anomalies = _anomaly_count(n_subjects)
    n_normal = n_subjects - len(BROKEN_KINDS) - n_anomalies
    counts: dict[str, int] = {}
    kinds: list[tuple[str, str]] = []
    for index in range(n_anomalies):
        kind = _ANOMALY_SEQUENCE[index % len(_ANOMALY_SEQUENCE)]
        variants = VARIANTS.get(kind, ("",))
        kinds.append((kind, variants[counts.get(kind, 0) % len(variants)]))
        counts[kind] = counts.get(kind, 0) + 1
    kinds += [(kind, "") for kind in BROKEN_KINDS] + [("normal", "")] * n_normal
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
    order = rng.permutation(n_subjects)
    has_localizer = rng.random(n_subjects) < 0.85
    has_t2 = rng.random(n_subjects) < 0.2
    plans = []
    for number, folder in enumerate(_folder_names(n_subjects), start=1):
        kind, variant = kinds[order[number - 1]]
        plans.append(
            SubjectPlan(
                folder=folder,
                number=number,
                kind=kind,
                variant=variant,
                has_localizer=bool(has_localizer[number - 1]) or kind == "localizer_only",
                has_t2=bool(has_t2[number - 1]) and kind != "localizer_only",
                seed=seed,
            )
        )
    if contrasts:
        plans = _with_contrasts(plans, contrasts, seed=seed)
    ids = [to_bids_id(p.folder) for p in plans]
    if len(set(ids)) != len(ids):
        message = f"demo folder names collide on their BIDS ids: {ids}"
        raise RuntimeError(message)
    return plans


def _with_contrasts(
    plans: list[SubjectPlan], contrasts: tuple[str, ...], *, seed: int
) -> list[SubjectPlan]:
    """``plans`` with ``contrasts`` beside each T1 and a share of the normals turned into
    anomalies of one of those contrasts (their own random stream: the T1 cohort's draws
    stay as they were)."""
    normals = [i for i, p in enumerate(plans) if p.kind == "normal"]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    order = [normals[i] for i in rng.permutation(len(normals))]
    per_contrast = max(1, round(CONTRAST_ANOMALY_FRACTION * len(plans)))
    # Keep at least three normals: each contrast's model needs a reference.
    per_contrast = min(per_contrast, max(0, (len(normals) - 3) // len(contrasts)))
    changes: dict[int, dict[str, str]] = {}
    for c, contrast in enumerate(contrasts):
        kinds = CONTRAST_ANOMALIES[contrast]
        for k in range(per_contrast):
            kind, variant = kinds[k % len(kinds)]
            changes[order[c * per_contrast + k]] = {
                "kind": kind,
                "variant": variant,
                "anomaly_contrast": contrast,
            }
    return [
        replace(
            plan,
            contrasts=contrasts if plan.kind not in ("localizer_only", "empty_folder") else (),
            has_t2=False,
            **changes.get(i, {}),
        )
        for i, plan in enumerate(plans)
    ]


def plan_real_heads(
    heads: dict[str, str | Path], *, renditions: int, per_kind: int, seed: int
) -> list[SubjectPlan]:
    """A benchmark cohort on real heads (``mriaudit.heads``): no normal is the template.

    Every person of ``heads`` (``{person: prepared head path}``) is a normal
    ``renditions`` times, each with its own deformation, pose, grid, vendor and
    noise; every anomaly kind appears ``per_kind`` times on people taken in
    turn (lesion contrasts and ways of losing slices alternate). No broken
    inputs: the cohort measures detection. Folder order is shuffled.
    """
    if not heads or renditions < 1 or per_kind < 1:
        message = f"need people, renditions >= 1 and per_kind >= 1, got {len(heads)}, {renditions}, {per_kind}"
        raise ValueError(message)
    people = sorted(heads)
    entries: list[tuple[str, str, str]] = [
        ("normal", "", name) for name in people for _ in range(renditions)
    ]
    turn = 0
    for kind in ANOMALY_KINDS:
        variants = VARIANTS.get(kind, ("",))
        for index in range(per_kind):
            entries.append((kind, variants[index % len(variants)], people[turn % len(people)]))
            turn += 1
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1,)))
    order = rng.permutation(len(entries))
    width = max(3, len(str(len(entries))))
    plans = []
    for number in range(1, len(entries) + 1):
        kind, variant, name = entries[order[number - 1]]
        plans.append(
            SubjectPlan(
                folder=f"sub-{number:0{width}d}",
                number=number,
                kind=kind,
                variant=variant,
                has_localizer=bool(rng.random() < 0.85),
                has_t2=bool(rng.random() < 0.2),
                seed=seed,
                person=name,
                head_path=str(heads[name]),
            )
        )
    return plans
