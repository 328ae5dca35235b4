"""Which series is the subject's T1, from what its headers say: class, then rank.

Site naming is free text (``t1_mpr_tra_gk_v4`` is an MPRAGE acquisition, ``anat-T1w``
a volume re-created from NIfTI), so the class of a series comes from the acquisition
physics its headers record, and its name only breaks ties where the headers are
silent:

- ``ImageType``: ``LOCALIZER``; reformats and projections (``MPR``, ``REFORMATTED``,
  ``PROJECTION IMAGE``, ``MIP``, ``SUBTRACTION``, ...) are never acquisitions;
  ``DERIVED``/``SECONDARY`` without such a word is a derived copy (usable only when
  no original T1 is present); ``DIFFUSION``/``ADC``/``TRACEW`` are diffusion.
- The sequence: ``ScanningSequence`` (``GR``, ``SE``, ``IR``, ``EP``), the sequence
  name (Siemens ``*tfl3d1``, GE ``efgre3d``, Philips ``T1TFE``, enhanced DICOM's
  ``PulseSequenceName``), and the timings: an inversion of 200-1400 ms read with a
  short echo is T1-weighted (MPRAGE, IR-FSPGR, TFE with a prepulse); a long
  inversion with a long echo is FLAIR; a spoiled gradient echo with short TR and
  TE and a flip above 5 degrees is T1-weighted; a spin echo with a long TR is T2-
  (long TE) or PD-weighted (short TE), with a short TR and TE T1-weighted.
- ``ContrastBolusAgent``: a post-contrast series ranks below a pre-contrast one.

Where the headers and the name disagree, the headers win and the reason says so.
Values: TR, TE, TI in ms, flip angle in degrees.

``select_series`` then ranks the T1 candidates (``rank_key``: volumetric, original,
pre-contrast, whole-head coverage, slices, voxel size, the later run) and gives
every other series its verdict in words; the user's ``series`` rules
(``resolve_rules``) override the headers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from mriaudit.cohort import to_bids_id
from mriaudit.records import StageError

#: The classes a series is sorted into.
CONTRAST_CLASSES: tuple[str, ...] = (
    "T1w",
    "T2w",
    "FLAIR",
    "PD",
    "DWI",
    "BOLD",
    "localizer",
    "derived",
    "other",
)

#: ImageType words of a reformat, projection or subtraction, in plain words.
REFORMAT_WORDS: dict[str, str] = {
    "MPR": "multiplanar reformat (MPR)",
    "CSA MPR": "multiplanar reformat (MPR)",
    "CSAMPR": "multiplanar reformat (MPR)",
    "REFORMATTED": "reformat",
    "REFORMAT": "reformat",
    "CSA RESAMPLED": "resampled reformat",
    "RESAMPLED": "resampled reformat",
    "PROJECTION IMAGE": "projection image",
    "MIP": "maximum-intensity projection (MIP)",
    "MNIP": "minimum-intensity projection",
    "MINIP": "minimum-intensity projection",
    "SUBTRACTION": "subtraction image",
    "SUBTRACT": "subtraction image",
    "SUB": "subtraction image",
}
#: ImageType words of diffusion images and their maps.
DIFFUSION_WORDS = frozenset({"DIFFUSION", "ADC", "TRACEW", "TRACE", "FA", "EADC", "DWI"})

#: Names, for the tie-break only (the first that matches wins, most specific first).
_NAME_CLASSES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("localizer", re.compile(r"localizer|localiser|scout|survey|3.?plane|aahead", re.I)),
    # BraTS names FLAIR "t2f" (T2-FLAIR; the T2 pattern below would take it), TCGA "fla".
    ("FLAIR", re.compile(r"flair|dark.?fl|tirm|da.?fl|(?<![a-z0-9])(t2f|fla)(?![a-z])", re.I)),
    ("DWI", re.compile(r"dwi|diff|dti|(?<![a-z])adc|trace|tensor", re.I)),
    ("BOLD", re.compile(r"bold|fmri|resting|rs.?fmri|(?<![a-z])task", re.I)),
    ("PD", re.compile(r"(?<![a-z])pd(?![a-z])|pdw|proton", re.I)),
    ("T2w", re.compile(r"(?<![a-z])t2(?!\*)|t2w|(?<![a-z])cube(?![a-z])", re.I)),
    (
        "T1w",
        re.compile(
            r"(?<![a-z])t1|mprage|mp.?rage|mp2rage|spgr|bravo|(?<![a-z])tfl|fl3d|flash|"
            r"ffe|tfe|fsp|gre_fsp",
            re.I,
        ),
    ),
)
#: A reformat says so in its name too (``t1_mpr_cor``, ``MIP``, ``sub``); only believed
#: for a derived series, since ``t1_mpr_tra`` is also how Siemens names an MPRAGE.
_REFORMAT_NAME = re.compile(
    r"_mpr(?![a-z])|mpr_|reformat|(?<![a-z])mip|(?<![a-z])sub(?![a-z])", re.I
)
#: Sequence families from sequence names (Siemens, GE, Philips, Canon, UIH, Hitachi).
_SEQUENCE_FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("EP", re.compile(r"(?<![a-z])\*?ep|epi|ep2d|ep_b|epfid|epse", re.I)),
    (
        "IR",
        re.compile(r"tfl|tir|mprage|bravo|ir.?fspgr|irfspgr|ir_|spcir|(?<![a-z])ir(?![a-z])", re.I),
    ),
    (
        "GR",
        re.compile(r"fl3d|fl2d|\*fl|fgre|efgre|spgr|fspgr|gre|tfe|ffe|fsp|flash|field.?echo", re.I),
    ),
    ("SE", re.compile(r"tse|fse|spc|cube|space|(?<![a-z])se(?![a-z])|\*se|vista|fastse", re.I)),
)
#: A ContrastBolusAgent that means no agent.
_NO_AGENT = re.compile(r"^\s*(none|no|n/?a|-|0)?\s*$", re.I)
#: Names of a post-contrast series (tie-break where the agent tag is empty).
_POST_CONTRAST_NAME = re.compile(
    r"(?<![a-z])(post|gd|gad|gado|contrast|km)(?![a-z])|\+c(?![a-z])|_c(?![a-z0-9])|(?<![a-z])ce(?![a-z])"
    # BraTS' and TCGA's post-contrast T1: t1c, t1ce, t1gd.
    r"|(?<![a-z0-9])t1(c|ce|gd)(?![a-z0-9])",
    re.I,
)


@dataclass(frozen=True)
class SeriesClass:
    """What one series is: ``contrast`` (one of ``CONTRAST_CLASSES``) and ``why``, in
    words a curator reads; ``reformat`` names the kind of reformat or projection ("" for
    an acquisition); ``derived`` marks a derived or secondary copy that is no reformat;
    ``post_contrast`` marks a series after a contrast agent."""

    contrast: str
    why: str
    reformat: str = ""
    derived: bool = False
    post_contrast: bool = False


def _words(value: Any) -> list[str]:
    text = "\\".join(value) if isinstance(value, (list, tuple)) else str(value or "")
    return [w.strip().upper() for w in text.split("\\") if w.strip()]


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number == number and number > 0 else None  # NaN and 0 are unknown


def _families(scanning: list[str], names: str) -> set[str]:
    """Sequence families (GR, SE, IR, EP) from ScanningSequence, else from sequence names."""
    found = {w for w in scanning if w in ("GR", "SE", "IR", "EP")}
    for family, pattern in _SEQUENCE_FAMILIES:
        if pattern.search(names):
            found.add(family)
    return found


def _ms(value: float | None) -> str:
    return "unknown" if value is None else f"{value:g} ms"


def contrast_from_timing(
    families: set[str],
    *,
    tr: float | None,
    te: float | None,
    ti: float | None,
    flip: float | None,
    diffusion: bool = False,
) -> tuple[str, str]:
    """``(class, why)`` from the sequence families and timings; ``("", "")`` when they
    do not decide (times in ms, flip in degrees)."""
    if diffusion:
        return "DWI", "ImageType says DIFFUSION"
    if "EP" in families:
        if te is not None and 15 <= te <= 60 and (tr is None or tr < 5000):
            return "BOLD", f"echo-planar, TE {_ms(te)}, TR {_ms(tr)}"
        if te is not None and te > 60:
            return "DWI", f"echo-planar spin echo with a long TE ({_ms(te)})"
        return "other", "echo-planar"
    inversion = "IR" in families or ti is not None
    short_te = te is not None and te < 20
    if inversion and ti is not None:
        if ti >= 1400 and te is not None and te >= 50:
            return "FLAIR", f"long inversion (TI {_ms(ti)}) with a long TE ({_ms(te)})"
        if 200 <= ti < 1400 and short_te:
            return "T1w", f"inversion-prepared (TI {_ms(ti)}), short TE ({_ms(te)})"
        if ti < 200 and te is not None and te >= 50:
            return "T2w", f"short-inversion fat suppression (STIR, TI {_ms(ti)}), TE {_ms(te)}"
        if ti >= 1400 and short_te:
            return "other", f"long inversion (TI {_ms(ti)}) with a short TE (second inversion?)"
    if inversion and ti is None and short_te and "GR" in families:
        return "T1w", f"inversion-prepared gradient echo, short TE ({_ms(te)})"
    if "GR" in families and "SE" not in families:
        if tr is not None and te is not None and tr < 100 and te < 15:
            if flip is not None and flip < 5:
                return "PD", f"gradient echo with a small flip ({flip:g} deg)"
            return "T1w", f"spoiled gradient echo, TR {_ms(tr)}, TE {_ms(te)}"
        if te is not None and te >= 15:
            return "other", f"gradient echo with a long TE ({_ms(te)}, T2*-weighted)"
    # A spin echo, or timings alone where no sequence is named.
    if tr is not None and te is not None and ("SE" in families or "GR" not in families):
        if tr >= 1500 and te >= 60:
            return "T2w", f"spin echo, long TR ({_ms(tr)}) and TE ({_ms(te)})"
        if tr >= 1500 and te < 40:
            return "PD", f"spin echo, long TR ({_ms(tr)}), short TE ({_ms(te)})"
        if tr < 1000 and te < 30:
            return "T1w", f"spin echo, short TR ({_ms(tr)}) and TE ({_ms(te)})"
    return "", ""


def name_class(*names: str) -> str:
    """The class a series' names suggest ("" when none does)."""
    text = " ".join(n for n in names if n)
    for contrast, pattern in _NAME_CLASSES:
        if pattern.search(text):
            return contrast
    return ""


def post_contrast(agent: Any, *names: str) -> bool:
    """Whether a series was acquired after a contrast agent: the agent tag, else the names."""
    text = str(agent or "")
    if text and not _NO_AGENT.match(text):
        return True
    return bool(_POST_CONTRAST_NAME.search(" ".join(n for n in names if n)))


def classify(row: Mapping[str, Any]) -> SeriesClass:
    """The class of a series-table row (``image_type``, ``scanning_sequence``,
    ``sequence_name``, ``tr``/``te``/``ti`` ms, ``flip_angle`` deg, ``description``,
    ``protocol``, ``contrast_agent``, ``localizer``)."""
    image_type = _words(row.get("image_type"))
    names = " ".join(str(row.get(k) or "") for k in ("description", "protocol"))
    sequence = " ".join(str(row.get(k) or "") for k in ("sequence_name", "pulse_sequence"))
    agent = post_contrast(row.get("contrast_agent"), names)
    if "LOCALIZER" in image_type or row.get("localizer"):
        return SeriesClass("localizer", "localizer (ImageType or name)")
    derived = bool({"DERIVED", "SECONDARY"} & set(image_type))
    reformat = next((REFORMAT_WORDS[w] for w in image_type if w in REFORMAT_WORDS), "")
    if not reformat and derived and (m := _REFORMAT_NAME.search(names)):
        reformat = f"reformat (derived, named {m.group(0)!r})"
    if reformat:
        return SeriesClass("derived", f"derived {reformat}", reformat=reformat, derived=True)
    families = _families(_words(row.get("scanning_sequence")), sequence)
    contrast, why = contrast_from_timing(
        families,
        tr=_number(row.get("tr")),
        te=_number(row.get("te")),
        ti=_number(row.get("ti")),
        flip=_number(row.get("flip_angle")),
        diffusion=bool(DIFFUSION_WORDS & set(image_type)),
    )
    named = name_class(names, sequence)
    if not contrast:
        contrast = named or "other"
        why = (
            f"named like {named} (headers carry no timing)"
            if named
            else "headers and name say nothing of the contrast"
        )
    elif named and named not in (contrast, "localizer"):
        why = f"{why}; named like {named}, the headers decide"
    if derived:
        kind = "\\".join(image_type[:2])
        why = f"{why}; derived copy ({kind}), no reformat"
    if agent:
        why = f"{why}; post-contrast"
    return SeriesClass(contrast, why, derived=derived, post_contrast=agent)


#: BIDS suffixes (the last ``_`` part of a file name) and the class each declares.
BIDS_SUFFIXES: dict[str, str] = {
    "T1w": "T1w",
    "inplaneT1": "T1w",
    "T2w": "T2w",
    "inplaneT2": "T2w",
    "FLAIR": "FLAIR",
    "PD": "PD",
    "PDw": "PD",
    "PDT2": "other",
    "T2starw": "other",
    "T2star": "other",
    "angio": "other",
    "dwi": "DWI",
    "bold": "BOLD",
    "sbref": "BOLD",
    "cbv": "BOLD",
}


_T1_FILE_NAME = re.compile(r"(?<![a-z0-9])t1[wn]?(?![a-z0-9])|mp.?rage|spgr|bravo", re.I)


#: ``core_skew`` beyond which an image looks T2-weighted, and below which T1-weighted. On
#: the real NIfTI of ../shared: T1w (native, post-contrast, PD too) -0.38..-0.03, T2w
#: 0.33..0.62; FLAIR spans -0.38..0.19 and is judged by neither.
T2_LIKE_SKEW = 0.3
T1_LIKE_SKEW = 0.1
#: Erosion of the head mask (mm) that leaves the brain's core: no scalp, skull or cortex rim.
CORE_MM = 15.0


def core_skew(data: np.ndarray, zooms: tuple[float, float, float]) -> float:
    """Bowley skewness ``(q90 + q10 - 2 q50) / (q90 - q10)`` of the intensities in the core
    of the head (``data`` 3D, ``zooms`` mm; block means of about 2 mm first), unitless, NaN
    when there is no head. White matter is the bulk of the core: the brightest tissue of
    a T1-weighted image (a dark tail of CSF: negative), the darkest of a T2-weighted one
    (a bright tail of CSF: positive)."""
    # Imported here: this module is read when the Snakefile is parsed, ANTs is heavy.
    from mriaudit.preprocess import head_mask

    steps = [max(1, round(2.0 / z)) if z > 0 else 1 for z in zooms]
    volume = np.nan_to_num(np.asarray(data, dtype=np.float32))
    # Block means, not every n-th voxel: the noise averages out (a T2w with an SNR of 4
    # measured 0.03 from strided samples, 0.14 from block means; real scans moved <= 0.03).
    whole = [n // s * s for n, s in zip(volume.shape, steps, strict=True)]
    if min(whole) == 0:
        return float("nan")
    blocks = volume[: whole[0], : whole[1], : whole[2]].reshape(
        whole[0] // steps[0],
        steps[0],
        whole[1] // steps[1],
        steps[1],
        whole[2] // steps[2],
        steps[2],
    )
    small = blocks.mean(axis=(1, 3, 5))
    spacing = tuple(float(z * s) for z, s in zip(zooms, steps, strict=True))
    if min(small.shape) < 8 or not np.ptp(small) > 0:
        return float("nan")
    mask = head_mask(small, spacing_mm=spacing)
    core = ndimage.binary_erosion(mask, iterations=max(1, round(CORE_MM / float(np.mean(spacing)))))
    values = small[core if core.sum() >= 100 else mask]
    if values.size < 100:
        return float("nan")
    q10, q50, q90 = np.percentile(values, [10, 50, 90])
    return float((q90 + q10 - 2 * q50) / (q90 - q10)) if q90 > q10 else float("nan")


def contrast_look(skew: float) -> str:
    """``T1w``, ``T2w`` or "" (undecided, or NaN) from ``core_skew``."""
    if skew > T2_LIKE_SKEW:
        return "T2w"
    if skew < T1_LIKE_SKEW:
        return "T1w"
    return ""


def file_class(name: str) -> tuple[str, str]:
    """``(class, how)`` a NIfTI file's name declares: its BIDS suffix (``sub-1_T2w.nii.gz``),
    else a name that says a contrast (``t2_tse.nii.gz``); ``("", "")`` when it says none."""
    stem = name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else name.rsplit(".", 1)[0]
    suffix = stem.rsplit("_", 1)[-1] if "_" in stem else ""
    if suffix in BIDS_SUFFIXES:
        return BIDS_SUFFIXES[suffix], f"BIDS suffix _{suffix}"
    named = name_class(stem)
    if named == "T1w" and not _T1_FILE_NAME.search(stem):
        named = ""  # ``T1c``, ``t1ce``: post-contrast, not the T1 a name means
    return (named, "file name") if named and named != "localizer" else ("", "")


# ----------------------------------------------------------------------- selection

#: Series rules when a key is missing from the ``series`` config (schema defaults). The
#: headers choose the series (``mriaudit.series``); ``include``/``exclude`` are the user's
#: overrides on names, empty by default: a name rule that keeps reformats out also threw
#: away ``t1_mpr_tra_gk_v4``, an MPRAGE acquisition.
DEFAULT_RULES: dict[str, Any] = {
    "include": "",
    "exclude": "",
    "min_slices": 16,
    "max_slice_thickness_3d": 2.0,
    "choose": {},
}


def resolve_rules(rules: dict[str, Any] | None) -> dict[str, Any]:
    """The series rules with defaults for missing keys; regexes compiled (case-insensitive,
    ``None`` for an empty one: no rule)."""
    merged = {**DEFAULT_RULES, **{k: v for k, v in (rules or {}).items() if v is not None}}
    for key in ("include", "exclude"):
        try:
            text = str(merged[key])
            merged[f"{key}_re"] = re.compile(text, re.IGNORECASE) if text else None
        except re.error as error:
            message = f"config series.{key} is not a valid regular expression: {error}"
            raise StageError(message) from error
    merged["min_slices"] = int(merged["min_slices"])
    merged["max_slice_thickness_3d"] = float(merged["max_slice_thickness_3d"])
    merged["choose"] = {str(k): v for k, v in dict(merged.get("choose") or {}).items()}
    return merged


def chosen_series(rules: dict[str, Any], folder: str) -> int | str | None:
    """The series ``rules["choose"]`` names for a subject folder (by its folder name or its
    BIDS id): a SeriesNumber (int) or a SeriesInstanceUID (str); None when none."""
    choose = rules.get("choose") or {}
    for key in (folder, to_bids_id(folder), f"sub-{to_bids_id(folder)}"):
        if key in choose:
            return choose[key]
    return None


def select_chosen(rows: list[dict[str, Any]], chosen: int | str) -> tuple[Selection, str]:
    """The selection the user made for this subject (``series.choose``): the series whose
    number or UID is ``chosen``, whatever its headers say; with no such series (or
    several of that number), no selection and why."""

    def matches(row: dict[str, Any]) -> bool:
        if isinstance(chosen, int) or str(chosen).isdigit():
            return row["series_number"] is not None and int(row["series_number"]) == int(chosen)
        return row["series_uid"] == str(chosen)

    picked = [r for r in rows if matches(r)]
    verdicts = {
        r["series_uid"]: ("rejected", f"not the series chosen in series.choose ({chosen})")
        for r in rows
    }
    if not picked:
        why = f"the series chosen in series.choose ({chosen}) is not one of its {len(rows)} series"
        return Selection(None, (), verdicts), why
    if len(picked) > 1:
        why = (
            f"series.choose names series {chosen}, which {len(picked)} series share:"
            " choose by SeriesInstanceUID"
        )
        return Selection(None, (), verdicts), why
    verdicts[picked[0]["series_uid"]] = (
        "selected",
        f"chosen in series.choose ({chosen}); headers: {picked[0]['class'].why}",
    )
    return Selection(picked[0]["series_uid"], (), verdicts), ""


def _is_volumetric(row: dict[str, Any], rules: dict[str, Any]) -> bool:
    """3D acquisition, or 2D slices thin and close enough to count as a volume."""
    if row["acquisition"] == "3D":
        return True
    sizes = [v for v in (row["slice_thickness"], row["slice_spacing"]) if v is not None]
    return bool(sizes) and max(sizes) <= rules["max_slice_thickness_3d"]


#: How a rejected class reads in a reason.
_CLASS_WORDS = {
    "T2w": "T2-weighted",
    "FLAIR": "FLAIR",
    "PD": "PD-weighted",
    "DWI": "diffusion-weighted",
    "BOLD": "functional (BOLD)",
    "other": "not T1-weighted",
}


def _rejection(row: dict[str, Any], rules: dict[str, Any]) -> str:
    """Why a series cannot be audited as the T1, or "" when it is a T1 candidate.

    The header class decides (``series.classify``); the user's ``exclude`` rule
    rejects whatever it matches and a set ``include`` rule admits only, and
    every one of, the series it matches.
    """
    if row["modality"] and row["modality"] != "MR":
        return f"not MR ({row['modality']})"
    kind: SeriesClass = row["class"]
    if kind.contrast == "localizer":
        return "localizer"
    if kind.reformat:
        return f"{kind.why}, not an acquisition"
    if row["rows"] is None or row["cols"] is None:
        return "no image geometry"
    names = [row["description"], row["protocol"], row["sequence_name"]]
    excluded = rules["exclude_re"] and next(
        (m for n in names if (m := rules["exclude_re"].search(n))), None
    )
    if excluded:
        return f"excluded by rule (matches {excluded.group(0)!r})"
    if rules["include_re"]:
        if not any(rules["include_re"].search(n) for n in names):
            return "not matched by the include rule"
    elif kind.contrast != "T1w":
        return f"{_CLASS_WORDS.get(kind.contrast, kind.contrast)} ({kind.why})"
    if row["n_slices"] < rules["min_slices"]:
        return f"too few slices ({row['n_slices']} < {rules['min_slices']})"
    return ""


#: Coverage (mm, the smallest extent of the series' box) from which a series holds the head.
WHOLE_HEAD_MM = 100.0


def tier(row: dict[str, Any], rules: dict[str, Any]) -> tuple[int, int, int]:
    """Ranking tier of a candidate: volumetric before 2D, original before a derived
    copy, pre-contrast before post-contrast (lower is better)."""
    kind: SeriesClass = row["class"]
    return (not _is_volumetric(row, rules), kind.derived, kind.post_contrast)


def rank_key(row: dict[str, Any], rules: dict[str, Any]) -> tuple[Any, ...]:
    """Tier, then whole-head coverage, most slices, the smallest voxel; among equals the
    later series (a repeat is taken because the first try failed), then the UID."""
    sizes = (row["pixel_spacing_row"], row["pixel_spacing_col"], row["slice_spacing"])
    volume = float(np.prod(sizes)) if all(v is not None for v in sizes) else float("inf")
    partial = not (row.get("coverage_mm") or 0.0) >= WHOLE_HEAD_MM
    return (
        tier(row, rules),
        partial,
        -row["n_slices"],
        round(volume, 3),
        -(row["series_number"] or 0),
        row["series_uid"],
    )


@dataclass(frozen=True)
class Selection:
    """The chosen series (``uid`` None when none is usable), each series' verdict, and
    the selection's note findings (``2d_only``, ``derived_only``, ``post_contrast_only``,
    ``repeat_series``)."""

    uid: str | None
    findings: tuple[str, ...]
    verdicts: dict[str, tuple[str, str]]


def select_series(rows: list[dict[str, Any]], rules: dict[str, Any]) -> Selection:
    """Choose the audited series from series-table rows (each with its ``class``).

    Candidates: MR series that ``_rejection`` keeps. Derived copies (no
    reformat) are candidates only where no original T1 is present. Ranked by
    ``rank_key``: a 3D original pre-contrast T1 first, then post-contrast, then
    a derived copy, then 2D. Every other candidate's verdict says what it is
    (a repeat, post-contrast, 2D) and which series it ranked below.
    ``rules`` comes from ``resolve_rules``.
    """
    verdicts: dict[str, tuple[str, str]] = {}
    candidates = []
    for row in rows:
        reason = _rejection(row, rules)
        if reason:
            verdicts[row["series_uid"]] = ("rejected", reason)
        else:
            candidates.append(row)
    originals = [r for r in candidates if not r["class"].derived]
    if originals:
        for row in candidates:
            if row["class"].derived:
                verdicts[row["series_uid"]] = (
                    "rejected",
                    f"{row['class'].why}; an original T1 acquisition is present",
                )
        candidates = originals
    if not candidates:
        return Selection(None, (), verdicts)
    ranked = sorted(candidates, key=lambda r: rank_key(r, rules))
    best = ranked[0]
    two_d, derived, post = tier(best, rules)
    kind = "2D" if two_d else "3D"
    why = f"best {kind} T1 series ({best['class'].why})"
    findings = []
    if two_d:
        findings.append("2d_only")
    if derived:
        findings.append("derived_only")
    if post:
        findings.append("post_contrast_only")
    repeats = {r["series_uid"] for r in ranked[1:] if tier(r, rules) == tier(best, rules)}
    if repeats:
        findings.append("repeat_series")
    verdicts[best["series_uid"]] = ("selected", why)
    label = best["description"] or best["series_uid"]
    for row in ranked[1:]:
        row_two_d, _, row_post = tier(row, rules)
        if row["series_uid"] in repeats:
            what = "repeat T1 acquisition"
        elif row_two_d and not two_d:
            what = "2D T1"
        elif row_post and not post:
            what = "post-contrast T1"
        else:
            what = "T1 candidate"
        verdicts[row["series_uid"]] = ("rejected", f"{what}, ranked below {label!r}")
    return Selection(best["series_uid"], tuple(findings), verdicts)
