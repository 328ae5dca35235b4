"""A BIDS root as the cohort: its T1w scans by subject, session and run, and ``participants.tsv``.

pybids indexes the dataset and answers which T1w images each subject and
session holds. The unit of the audit (one row, one ``preprocess`` job) is a
session, or a subject when it has no sessions; a session (or subject) with
T1w images of two or more runs becomes one unit per run. So a 10,000-session
cohort is 10,000 jobs, as a 10,000-folder one is. A unit's ``entry`` is the
folder its files are read from (``sub-01/ses-1``); a run unit also names its
files (the run's T1w images and their sidecars, and the session's T2w and
FLAIR: those of the same run when there are, else all), so the header-driven
series selection sees that run only.

Indexing costs about 20 s per 10,000 sessions, and every Snakemake process
(each cluster job included) lists the cohort, so the index is kept as pybids'
database under ``cache_dir`` and reused while the dataset's folders are
unchanged (their names and modification times make its key).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mriaudit import paths

log = logging.getLogger(__name__)

#: Extensions of the images a unit is made of.
IMAGE_EXTENSIONS = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Scan:
    """One unit of a BIDS root: ``subject``, ``session`` and ``run`` labels ("" when absent),
    the folder read (``entry``, relative to the root) and, for a run, its files (relative
    to ``entry``; empty: the whole folder)."""

    subject: str
    session: str
    run: str
    entry: str
    files: tuple[str, ...] = ()


def _folders(root: Path) -> list[Path]:
    """``sub-*`` folders and every folder below them (sorted), hidden ones skipped."""
    found = []
    stack = sorted(
        (p for p in root.iterdir() if p.name.startswith("sub-") and p.is_dir()), reverse=True
    )
    while stack:
        folder = stack.pop()
        found.append(folder)
        try:
            children = sorted(
                (
                    e.path
                    for e in os.scandir(folder)
                    if e.is_dir(follow_symlinks=False) and not e.name.startswith(".")
                ),
                reverse=True,
            )
        except OSError:
            continue
        stack.extend(Path(c) for c in children)
    return found


def index_key(root: Path) -> str:
    """Digest of the dataset's folder names and modification times (a file added, removed
    or renamed changes its folder's time), and of the root's own path."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for folder in _folders(root):
        digest.update(
            f"{folder.relative_to(root).as_posix()}\0{folder.stat().st_mtime_ns}\0".encode()
        )
    return digest.hexdigest()[:16]


def _layout(root: Path, cache_dir: Path | None) -> Any:
    """pybids' ``BIDSLayout`` of ``root`` (imported here: a folder cohort never pays for it)."""
    from bids import BIDSLayout, BIDSLayoutIndexer

    indexer = BIDSLayoutIndexer(validate=False, index_metadata=False)
    if cache_dir is None:
        return BIDSLayout(root, validate=False, indexer=indexer)
    database = Path(cache_dir) / f"pybids-{index_key(root)}"
    if (database / "layout_index.sqlite").is_file():
        try:
            return BIDSLayout(root, validate=False, database_path=database)
        except Exception as error:  # a damaged cache is rebuilt, not trusted
            log.warning("pybids index %s unusable (%s); indexing again", database, error)
            shutil.rmtree(database, ignore_errors=True)
    for stale in Path(cache_dir).glob("pybids-*") if Path(cache_dir).is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)
    return BIDSLayout(root, validate=False, indexer=indexer, database_path=database)


def list_scans(root: str | Path, *, cache_dir: str | Path | None = None) -> list[Scan]:
    """The units of the BIDS root ``root``, sorted by subject, session and run.

    Every ``sub-*`` folder is at least one unit (a subject or session with no
    T1w image is still audited, and reported as having none); ``cache_dir``
    keeps pybids' index between calls (None: index afresh).
    """
    from bids.layout import parse_file_entities

    # pybids answers with absolute paths; a relative input_dir must match them.
    root = Path(root).absolute()
    layout = _layout(root, Path(cache_dir) if cache_dir else None)
    # The layout's own entity configs: parse_file_entities would reload them per file.
    configs = list(layout.config.values())

    def by_session_and_run(suffixes: list[str]) -> dict[tuple[str, str], dict[str, list[str]]]:
        images = layout.get(
            suffix=suffixes, extension=list(IMAGE_EXTENSIONS), return_type="filename"
        )
        found_runs: dict[tuple[str, str], dict[str, list[str]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for image in sorted(images):
            found = parse_file_entities(image, config=configs)
            key = (str(found.get("subject", "")), str(found.get("session", "") or ""))
            run = found.get("run")
            found_runs[key][str(int(run)) if run is not None else ""].append(
                Path(os.path.relpath(image, root)).as_posix()
            )
        return found_runs

    runs = by_session_and_run(["T1w"])
    others = by_session_and_run(list(paths.EXTRA_CONTRASTS))
    units: list[Scan] = []
    for subject_dir in sorted(
        p for p in root.iterdir() if p.name.startswith("sub-") and p.is_dir()
    ):
        subject = subject_dir.name[4:]
        sessions = sorted(
            p.name[4:] for p in subject_dir.iterdir() if p.is_dir() and p.name.startswith("ses-")
        )
        for session in sessions or [""]:
            entry = f"{subject_dir.name}/ses-{session}" if session else subject_dir.name
            by_run = runs.get((subject, session), {})
            if len(by_run) < 2:
                units.append(Scan(subject, session, "", entry))
                continue
            contrast_runs = others.get((subject, session), {})
            for run, t1w_paths in sorted(
                by_run.items(), key=lambda item: (item[0] == "", item[0].zfill(9))
            ):
                # The T2w and FLAIR of the same run, else every one of the session: the
                # contrast's selection ranks them.
                contrast_paths = contrast_runs.get(run) or [
                    path for found in contrast_runs.values() for path in found
                ]
                files = []
                for path in t1w_paths + contrast_paths:
                    relative = Path(path).relative_to(entry).as_posix()
                    stem = relative.removesuffix(".gz").removesuffix(".nii")
                    files += [relative, f"{stem}.json"]
                units.append(Scan(subject, session, run, entry, tuple(files)))
    return units


def read_participants(root: str | Path) -> pd.DataFrame:
    """``participants.tsv`` of the BIDS root as text, indexed by subject label (``01`` for
    ``sub-01``); empty when the file is absent. ``n/a`` cells are empty. A file without
    a ``participant_id`` column raises ``ValueError`` naming it."""
    path = Path(root) / "participants.tsv"
    if not path.is_file():
        return pd.DataFrame(index=pd.Index([], name="subject"))
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=["n/a", ""])
    if "participant_id" not in table.columns:
        message = f"{path}: no participant_id column (BIDS participants.tsv needs one)"
        raise ValueError(message)
    subjects = table.pop("participant_id").str.removeprefix("sub-")
    table.index = pd.Index(subjects, name="subject")
    return table[~table.index.duplicated()]
