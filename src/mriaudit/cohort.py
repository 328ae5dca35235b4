"""The cohort: which subjects ``input_dir`` holds, and their BIDS labels.

Subjects are the first-level folders of ``input_dir`` (or its ``sub-*`` folders
when it is a BIDS root, recognised by ``dataset_description.json``), and the
first-level archive files of a plain ``input_dir`` (``sub-07.zip``, ``.tar``,
``.tar.gz``/``.tgz``, ...: one subject's export packed as one file). A subject's
name is its folder's name, or its archive's without the suffix; the label is
the name without a leading ``sub-`` and with every character outside
``[A-Za-z0-9]`` removed. Subjects whose labels collide, or are empty, are kept
in the listing with a problem so the report can name them, but get no label in
the DAG: they are never merged.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mriaudit import sources

_NOT_ALNUM = re.compile(r"[^A-Za-z0-9]")


@dataclass(frozen=True)
class Subject:
    """One first-level folder (or archive file) of ``input_dir``.

    ``folder`` is the subject's name in the labels file and every table (an
    archive's name without its suffix); ``label`` is the BIDS label used in
    output names; ``problem`` is empty for subjects that are processed, else the
    reason they are not; ``source`` is the entry of ``input_dir`` read (the folder,
    or the archive file), when it differs from ``folder``.
    """

    folder: str
    label: str
    problem: str = ""
    source: str = ""

    @property
    def entry(self) -> str:
        """The name of the folder or archive file in ``input_dir``."""
        return self.source or self.folder

    @property
    def processed(self) -> bool:
        return not self.problem


def bids_label(folder_name: str) -> str:
    """``sub-01`` -> ``01``; ``Patient 7 (ü)`` -> ``Patient7``."""
    name = folder_name[4:] if folder_name.startswith("sub-") else folder_name
    return _NOT_ALNUM.sub("", name)


def is_bids_root(input_dir: str | Path) -> bool:
    return (Path(input_dir) / "dataset_description.json").is_file()


def list_subjects(input_dir: str | Path) -> list[Subject]:
    """Subjects of ``input_dir``, sorted by folder or archive name.

    Hidden entries (``.git``, ``.DS_Store``) are skipped; in a BIDS root only
    ``sub-*`` folders count (archives only in a plain ``input_dir``). Raises
    ``FileNotFoundError`` with the path when ``input_dir`` is not a folder,
    since that is a configuration error.
    """
    root = Path(input_dir)
    if not root.is_dir():
        message = f"input_dir {str(root)!r} is not a folder (set config key input_dir)"
        raise FileNotFoundError(message)
    bids = is_bids_root(root)
    entries = sorted(
        entry.name
        for entry in root.iterdir()
        if not entry.name.startswith(".")
        and (
            (entry.is_dir() and (not bids or entry.name.startswith("sub-")))
            or (not bids and sources.is_subject_archive(entry))
        )
    )
    stems = [sources.archive_stem(entry) for entry in entries]
    stem_counts = Counter(stems)
    by_label: dict[str, list[str]] = {}
    for entry, stem in zip(entries, stems, strict=True):
        by_label.setdefault(bids_label(stem), []).append(entry)
    subjects = []
    for entry, stem in zip(entries, stems, strict=True):
        label = bids_label(stem)
        if not label:
            problem = "folder name has no letters or digits to build a BIDS label from"
        elif len(by_label[label]) > 1:
            others = ", ".join(repr(f) for f in by_label[label] if f != entry)
            problem = f"label collision: {entry!r} and {others} both map to sub-{label}"
        else:
            problem = ""
        # A folder and an archive of one stem keep their entry names, so rows stay distinct.
        name = stem if stem_counts[stem] == 1 else entry
        source = entry if entry != name else ""
        subjects.append(Subject(folder=name, label=label, problem=problem, source=source))
    return subjects


def processed_labels(subjects: list[Subject]) -> list[str]:
    return [s.label for s in subjects if s.processed]


#: Optional labels columns: a lesion's centre (MNI mm, RAS) and radius (mm).
LESION_COLUMNS = ("lesion_x_mm", "lesion_y_mm", "lesion_z_mm", "lesion_radius_mm")


def read_lesions(path: str | Path) -> dict[str, tuple[float, float, float, float]]:
    """Known lesions of the labels TSV as {folder: (x, y, z, radius)}, all in mm.

    Only rows with all of ``LESION_COLUMNS`` set to finite numbers, radius > 0,
    count; a file without those columns has none. (x, y, z) is the centre in
    template (MNI, RAS) coordinates.
    """
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "subject" not in table.columns or not set(LESION_COLUMNS) <= set(table.columns):
        return {}
    values = table[list(LESION_COLUMNS)].apply(pd.to_numeric, errors="coerce")
    usable = np.isfinite(values.to_numpy(dtype=float)).all(axis=1) & (
        values["lesion_radius_mm"] > 0
    )
    return {
        subject: tuple(float(v) for v in row)
        for subject, row in zip(table["subject"][usable], values[usable].to_numpy(), strict=True)
    }


def read_labels(path: str | Path) -> dict[str, int]:
    """Labels TSV (columns ``subject`` = folder name, ``label`` 0/1) as {folder: label}.

    Blank lines and rows with an empty label are skipped; any other label than
    0 or 1 is a configuration error and raises ``ValueError`` naming the row.
    """
    lines = Path(path).read_text().splitlines()
    if not lines:
        message = f"labels file {str(path)!r} is empty (expected columns subject, label)"
        raise ValueError(message)
    header = lines[0].split("\t")
    if "subject" not in header or "label" not in header:
        message = f"labels file {str(path)!r} needs tab-separated columns 'subject' and 'label', found {header}"
        raise ValueError(message)
    col_subject, col_label = header.index("subject"), header.index("label")
    labels: dict[str, int] = {}
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if not line.strip() or len(fields) <= max(col_subject, col_label):
            continue
        value = fields[col_label].strip()
        if value == "":
            continue
        if value not in ("0", "1"):
            message = (
                f"labels file {str(path)!r} line {number}: label must be 0 or 1, got {value!r}"
            )
            raise ValueError(message)
        labels[fields[col_subject]] = int(value)
    return labels


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
    """``{BIDS label: group}`` from a TSV with columns ``subject`` (folder) and ``group``.

    The groups (e.g. the person scanned, for sessions of one participant) keep
    subjects together in one training fold. Empty ``path``: no groups. A folder
    that is not a subject of the cohort is a configuration error.
    """
    if not path:
        return {}
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    missing = {"subject", "group"} - set(table.columns)
    if missing:
        message = f"training.fold_groups {str(path)!r} needs columns subject and group (missing {sorted(missing)})"
        raise ValueError(message)
    labels = {s.folder: s.label for s in subjects if s.processed}
    unknown = sorted(set(table["subject"]) - {s.folder for s in subjects})
    if unknown:
        message = f"training.fold_groups names subjects not found in input_dir: {unknown[:5]}"
        raise ValueError(message)
    return {
        labels[folder]: group
        for folder, group in zip(table["subject"], table["group"], strict=True)
        if folder in labels and group
    }


def resolve_reference(
    spec: str | list[str],
    *,
    subjects: list[Subject],
    labels_path: str | Path | None = None,
) -> list[str]:
    """BIDS labels of the subjects allowed to train the normative model.

    ``spec`` is ``"all"`` (every processed subject), ``"labels"`` (label-0
    subjects of ``labels_path``), a path to a TSV with a ``subject`` column, or
    a list of folder names. Unknown folder names raise ``ValueError``.
    """
    processed = {s.folder: s.label for s in subjects if s.processed}
    if spec == "all":
        return sorted(processed.values())
    if spec == "labels":
        if not labels_path:
            message = "reference: labels needs the config key labels (a TSV with subject, label)"
            raise ValueError(message)
        folders = [folder for folder, label in read_labels(labels_path).items() if label == 0]
    elif isinstance(spec, str):
        table = Path(spec)
        if not table.is_file():
            message = f"reference {spec!r} is neither all, labels nor an existing TSV file"
            raise ValueError(message)
        rows = [line.split("\t") for line in table.read_text().splitlines() if line.strip()]
        column = rows[0].index("subject") if rows and "subject" in rows[0] else None
        if column is None:
            message = f"reference table {spec!r} needs a 'subject' column"
            raise ValueError(message)
        folders = [row[column] for row in rows[1:] if len(row) > column]
    else:
        folders = list(spec)
    unknown = sorted(set(folders) - {s.folder for s in subjects})
    if unknown and spec != "labels":
        message = f"reference names subjects not found in input_dir: {unknown[:5]}"
        raise ValueError(message)
    return sorted({processed[f] for f in folders if f in processed})
