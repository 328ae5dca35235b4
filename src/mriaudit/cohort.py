"""The cohort: which subjects ``input_dir`` holds, their BIDS ids, and the user's tables.

Subjects are the first-level folders of ``input_dir`` (or its ``sub-*`` folders
when it is a BIDS root, recognised by ``dataset_description.json``), and the
first-level archive files of a plain ``input_dir`` (``sub-07.zip``, ``.tar``,
``.tar.gz``/``.tgz``, ...: one subject's export packed as one file). A subject's
``folder`` is its folder's name, or its archive's without the suffix; its
``bids_id`` is that name without a leading ``sub-`` and with every character
outside ``[A-Za-z0-9]`` removed (outputs are ``sub-<bids_id>``). Subjects whose
ids collide, or are empty, are kept in the listing with a problem so the report
can name them, but get no id in the DAG: they are never merged.

The user's tables (labels file, fold groups, reference list) are read with
``tables.read_user_tsv`` against their schemas.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mriaudit import bids_input, paths, sources, tables

_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


@dataclass(frozen=True)
class Subject:
    """One unit of the audit: a first-level folder (or archive file) of ``input_dir``,
    or in a BIDS root a subject's session or run (``bids_input``).

    ``folder`` is the unit's name in the labels file and every table (an
    archive's name without its suffix; in a BIDS root ``sub-<bids_id>``, e.g.
    ``sub-01_ses-2``); ``bids_id`` names its outputs (``sub-<bids_id>``, see
    ``paths``); ``problem`` is empty for units that are processed, else the
    reason they are not; ``source`` is the entry of ``input_dir`` read (the
    folder, the archive file, or ``sub-01/ses-2``), when it differs from
    ``folder``; ``session`` and ``run`` are the BIDS labels ("" when none);
    ``files`` restricts a run to its own files (relative to the entry; empty:
    every file of the entry).
    """

    folder: str
    bids_id: str
    problem: str = ""
    source: str = ""
    session: str = ""
    run: str = ""
    files: tuple[str, ...] = ()

    @property
    def entry(self) -> str:
        """The folder or archive file read, relative to ``input_dir``."""
        return self.source or self.folder

    @property
    def processed(self) -> bool:
        return not self.problem

    @property
    def subject(self) -> str:
        """The BIDS subject label (the part of ``bids_id`` before any session or run)."""
        return self.bids_id.split("_")[0]


def to_bids_id(folder_name: str) -> str:
    """``sub-01`` -> ``01``; ``Patient 7 (ü)`` -> ``Patient7``."""
    name = folder_name[4:] if folder_name.startswith("sub-") else folder_name
    return _NOT_ALNUM.sub("", name)


def is_bids_root(input_dir: str | Path) -> bool:
    return (Path(input_dir) / "dataset_description.json").is_file()


def list_subjects(input_dir: str | Path, *, cache_dir: str | Path | None = None) -> list[Subject]:
    """Units of ``input_dir``, sorted by folder or archive name (BIDS: subject, session, run).

    Hidden entries (``.git``, ``.DS_Store``) are skipped; a BIDS root is read
    with pybids (``bids_input.list_scans``, whose index ``cache_dir`` keeps),
    and archives count only in a plain ``input_dir``. Raises
    ``FileNotFoundError`` with the path when ``input_dir`` is not a folder,
    since that is a configuration error.
    """
    root = Path(input_dir)
    if not root.is_dir():
        message = f"input_dir {str(root)!r} is not a folder (set config key input_dir)"
        raise FileNotFoundError(message)
    if is_bids_root(root):
        units = []
        for scan in bids_input.list_scans(root, cache_dir=cache_dir):
            label = paths.scan_id(
                to_bids_id(scan.subject) or "", session=to_bids_id(scan.session), run=scan.run
            )
            units.append((f"sub-{label}", scan.entry, scan))
        return _named(units)
    entries = sorted(
        entry.name
        for entry in root.iterdir()
        if not entry.name.startswith(".") and (entry.is_dir() or sources.is_subject_archive(entry))
    )
    stems = [sources.archive_stem(entry) for entry in entries]
    stem_counts = Counter(stems)
    # A folder and an archive of one stem keep their entry names, so rows stay distinct.
    return _named(
        [
            (stem if stem_counts[stem] == 1 else entry, entry, None)
            for entry, stem in zip(entries, stems, strict=True)
        ]
    )


def _named(units: list[tuple[str, str, bids_input.Scan | None]]) -> list[Subject]:
    """Subjects of ``(name, entry, scan)`` units, with their BIDS ids and naming problems."""
    ids = [
        paths.scan_id(to_bids_id(scan.subject), session=to_bids_id(scan.session), run=scan.run)
        if scan is not None and to_bids_id(scan.subject)
        else to_bids_id(sources.archive_stem(entry) if scan is None else name)
        for name, entry, scan in units
    ]
    by_id: dict[str, list[str]] = {}
    for (_, entry, _), bids_id in zip(units, ids, strict=True):
        by_id.setdefault(bids_id, []).append(entry)
    subjects = []
    for (name, entry, scan), bids_id in zip(units, ids, strict=True):
        if not bids_id:
            problem = "folder name has no letters or digits to build a BIDS id from"
        elif len(by_id[bids_id]) > 1:
            others = ", ".join(repr(f) for f in by_id[bids_id] if f != entry)
            problem = f"BIDS id collision: {entry!r} and {others} both map to sub-{bids_id}"
        else:
            problem = ""
        subjects.append(
            Subject(
                folder=name,
                bids_id=bids_id,
                problem=problem,
                source=entry if entry != name else "",
                session=scan.session if scan else "",
                run=scan.run if scan else "",
                files=scan.files if scan else (),
            )
        )
    return subjects


def processed_ids(subjects: list[Subject]) -> list[str]:
    return [s.bids_id for s in subjects if s.processed]


def score_shards(bids_ids: Sequence[str], *, subjects_per_job: int) -> dict[str, list[str]]:
    """The cohort cut into score jobs of at most ``subjects_per_job`` scans each.

    ``{shard label: bids ids}``, labels ``<k>of<n>`` zero-padded in cohort order
    (``"000of003"``, ``"001of003"``, ...): another cut of the cohort names other
    files, so a table of an earlier cut is never taken for one of this. Consecutive
    slices, so a shard's subjects are neighbours in the listing. At least one
    shard, even for an empty cohort, so the score table always has a producer.
    """
    if subjects_per_job < 1:
        message = f"score.subjects_per_job must be at least 1, got {subjects_per_job}"
        raise ValueError(message)
    n = max(1, math.ceil(len(bids_ids) / subjects_per_job))
    width = max(3, len(str(n - 1)))
    return {
        f"{k:0{width}d}of{n:0{width}d}": list(
            bids_ids[k * subjects_per_job : (k + 1) * subjects_per_job]
        )
        for k in range(n)
    }


#: Optional labels columns: a lesion's centre (MNI mm, RAS) and radius (mm).
LESION_COLUMNS = ("lesion_x_mm", "lesion_y_mm", "lesion_z_mm", "lesion_radius_mm")


def read_labels_table(path: str | Path) -> pd.DataFrame:
    """The labels file as validated by ``schemas/labels.schema.yaml`` (``ValueError`` if not)."""
    return tables.read_user_tsv(path, "labels", what="labels file")


def read_lesions(path: str | Path) -> dict[str, tuple[float, float, float, float]]:
    """Known lesions of the labels file as {folder: (x, y, z, radius)}, all in mm.

    Only rows with all of ``LESION_COLUMNS`` set to finite numbers, radius > 0,
    count; a file without those columns has none. (x, y, z) is the centre in
    template (MNI, RAS) coordinates.
    """
    table = read_labels_table(path)
    if not set(LESION_COLUMNS) <= set(table.columns):
        return {}
    values = table[list(LESION_COLUMNS)].to_numpy(dtype=float)
    usable = np.isfinite(values).all(axis=1) & (values[:, 3] > 0)
    return {
        folder: tuple(float(v) for v in row)
        for folder, row in zip(table["folder"][usable], values[usable], strict=True)
    }


def read_labels(path: str | Path) -> dict[str, int]:
    """The labels file's known truths as {folder: 0 or 1}; rows with an empty truth are skipped.

    A truth other than 0 or 1, or a file without the ``folder`` and ``truth``
    columns, raises ``ValueError`` naming the file and the line.
    """
    table = read_labels_table(path)
    known = table["truth"].notna()
    return {
        folder: int(truth)
        for folder, truth in zip(table["folder"][known], table["truth"][known], strict=True)
    }


def check_labels(path: str | Path, subjects: list[Subject]) -> dict[str, int]:
    """The labels of ``path`` (see ``read_labels``), checked against the cohort's folders.

    A missing file, a malformed one, or a subject that is no folder of the
    cohort (a typo, or a labels file of another cohort) raises ``ValueError``
    naming the file and up to five such subjects: labels that silently match
    nothing would make every metric in the report wrong.
    """
    if not Path(path).is_file():
        message = f"config key labels: {str(path)!r} is not a file"
        raise ValueError(message)
    labels = read_labels(path)
    folders = {s.folder for s in subjects}
    unknown = sorted(set(labels) - folders)
    if unknown:
        shown = ", ".join(repr(name) for name in unknown[:5])
        more = f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""
        message = (
            f"config key labels: {len(unknown)} subject(s) of {str(path)!r} are not folders "
            f"of input_dir: {shown}{more}"
        )
        raise ValueError(message)
    return labels


def read_fold_groups(path: str | Path, *, subjects: list[Subject]) -> dict[str, str]:
    """``{bids_id: group}`` from a TSV with columns ``folder`` and ``group``.

    The groups (e.g. the person scanned, for sessions of one participant) keep
    subjects together in one training fold. Sessions and runs of one BIDS
    subject are one person: they share a group (``sub-<subject>``) unless the
    table says otherwise, so no fold is scored by a model that saw the same
    person. Empty ``path``: those groups only. A folder that is not a subject
    of the cohort is a configuration error.
    """
    groups = {
        s.bids_id: f"sub-{s.subject}" for s in subjects if s.processed and (s.session or s.run)
    }
    if not path:
        return groups
    table = tables.read_user_tsv(path, "fold_groups", what="training.fold_groups")
    ids = {s.folder: s.bids_id for s in subjects if s.processed}
    unknown = sorted(set(table["folder"]) - {s.folder for s in subjects})
    if unknown:
        message = f"training.fold_groups names subjects not found in input_dir: {unknown[:5]}"
        raise ValueError(message)
    groups.update(
        (ids[folder], group)
        for folder, group in zip(table["folder"], table["group"], strict=True)
        if folder in ids and group
    )
    return groups


#: The default of config ``model.method`` (the schema's), for the string form of ``model``.
DEFAULT_MODEL_METHOD = "atlas_warp"


def model_settings(value: str | Mapping[str, Any]) -> dict[str, str]:
    """Config ``model`` as ``{"method", "checkpoint"}``.

    The object form has both keys once the schema's defaults are set; a string
    (the form before the methods) is the checkpoint, ``train`` or a model.pt
    path, with the default method.
    """
    if isinstance(value, str):
        return {"method": DEFAULT_MODEL_METHOD, "checkpoint": value}
    return {
        "method": str(value.get("method", DEFAULT_MODEL_METHOD)),
        "checkpoint": str(value.get("checkpoint", "train")),
    }


def resolve_reference(
    spec: str | list[str],
    *,
    subjects: list[Subject],
    labels_path: str | Path | None = None,
) -> list[str]:
    """BIDS ids of the subjects allowed to train the normative model.

    ``spec`` is ``"all"`` (every processed subject), ``"labels"`` (truth-0
    subjects of ``labels_path``), a path to a TSV with a ``folder`` column, or
    a list of folder names. Unknown folder names raise ``ValueError``.
    """
    processed = {s.folder: s.bids_id for s in subjects if s.processed}
    if spec == "all":
        return sorted(processed.values())
    if spec == "labels":
        if not labels_path:
            message = "reference: labels needs the config key labels (a TSV with folder, truth)"
            raise ValueError(message)
        folders = [folder for folder, truth in read_labels(labels_path).items() if truth == 0]
    elif isinstance(spec, str):
        if not Path(spec).is_file():
            message = f"reference {spec!r} is neither all, labels nor an existing TSV file"
            raise ValueError(message)
        folders = tables.read_user_tsv(spec, "reference", what="reference")["folder"].tolist()
    else:
        folders = list(spec)
    unknown = sorted(set(folders) - {s.folder for s in subjects})
    if unknown and spec != "labels":
        message = f"reference names subjects not found in input_dir: {unknown[:5]}"
        raise ValueError(message)
    return sorted({processed[f] for f in folders if f in processed})
