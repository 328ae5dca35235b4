"""Where the bytes of an input file come from: plain files, compressed files, archives.

Exports are not always plain folders of DICOM files: some store every file
compressed (``IM_0001.dcm.gz``, ``.bz2``, ``.xz``), some pack a subject's
folder as one archive (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.bz2``,
``.tar.xz``). This module walks a subject folder and gives every file, whatever
its packing, one name relative to the folder: the path itself for a plain or
compressed file, ``<archive path>::<member path>`` for an archive member. The
input is only ever read: decompressed bytes live in memory while a header is
read, and in the converter's private folder (``materialise``).

NIfTI files are never decompressed here (nibabel reads ``.nii.gz``), and
archives are not searched for archives.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

#: Separates an archive's path from its member's in a file's name.
MEMBER_SEPARATOR = "::"
#: Archive names, longest suffix first.
ARCHIVE_SUFFIXES: tuple[str, ...] = (
    ".tar.gz",
    ".tar.bz2",
    ".tar.xz",
    ".tgz",
    ".tbz2",
    ".txz",
    ".tar",
    ".zip",
)
#: Single-file compression by suffix.
COMPRESSION: dict[str, Callable[..., io.BufferedIOBase]] = {
    ".gz": gzip.open,
    ".bz2": bz2.open,
    ".xz": lzma.open,
}
#: Largest file decompressed into memory (bytes): an enhanced multi-frame series fits,
#: a decompression bomb does not.
MAX_BYTES = 2 * 1024**3
#: What reading a damaged compressed file or archive raises.
READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError, tarfile.TarError, zipfile.BadZipFile)


def _lower(name: str) -> str:
    return name.lower()


def is_nifti(name: str) -> bool:
    """A NIfTI file name (``.nii`` or ``.nii.gz``)."""
    lower = _lower(name)
    return lower.endswith((".nii", ".nii.gz"))


def is_archive(name: str) -> bool:
    """An archive name (``ARCHIVE_SUFFIXES``)."""
    return _lower(name).endswith(ARCHIVE_SUFFIXES)


def archive_stem(name: str) -> str:
    """``name`` without its archive suffix (``sub-07.tar.gz`` -> ``sub-07``); ``name``
    itself when it is no archive."""
    lower = _lower(name)
    suffix = next((s for s in ARCHIVE_SUFFIXES if lower.endswith(s)), "")
    return name[: len(name) - len(suffix)] if suffix else name


def is_subject_archive(path: Path) -> bool:
    """A subject exported as one archive file (``input_dir/sub-07.zip``)."""
    return path.is_file() and is_archive(path.name)


def subject_root(subject: Path) -> Path:
    """The folder that ``walk``'s names are relative to: ``subject`` itself, or the
    folder holding it when the subject is one archive file (``sub-07.zip``)."""
    return subject.parent if subject.is_file() else subject


def compression_of(name: str) -> str:
    """The single-file compression suffix of ``name`` ("" for a plain file, a NIfTI or an
    archive)."""
    if is_nifti(name) or is_archive(name):
        return ""
    return next((s for s in COMPRESSION if _lower(name).endswith(s)), "")


class TooLarge(OSError):
    """A file that decompresses beyond ``MAX_BYTES``."""


def _read_capped(handle: io.BufferedIOBase | io.RawIOBase) -> bytes:
    data = handle.read(MAX_BYTES + 1)
    if len(data) > MAX_BYTES:
        message = f"decompresses beyond {MAX_BYTES // 1024**3} GiB"
        raise TooLarge(message)
    return data


@dataclass(frozen=True)
class Entry:
    """One file of a subject folder: ``rel`` its name (see the module docstring), ``path``
    the file on disk for a plain file, else ``read`` giving its decompressed bytes."""

    rel: str
    path: Path | None = None
    read: Callable[[], bytes] | None = None


def _safe_member(name: str) -> bool:
    """A member name that stays inside the archive (no absolute path, no ``..``)."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts


def _archive_entries(path: Path, rel: str) -> Iterator[Entry]:
    """The regular files of an archive, in archive order; each ``read`` must be called
    before the next entry is taken (tar streams)."""
    if _lower(path.name).endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.is_dir() or not _safe_member(info.filename):
                    continue

                def read(info: zipfile.ZipInfo = info) -> bytes:
                    with archive.open(info) as handle:
                        return _read_capped(handle)

                yield Entry(f"{rel}{MEMBER_SEPARATOR}{info.filename}", read=read)
        return
    with tarfile.open(path, "r:*") as archive:
        for member in archive:
            if not member.isfile() or not _safe_member(member.name):
                continue

            def read(member: tarfile.TarInfo = member) -> bytes:
                handle = archive.extractfile(member)
                if handle is None:
                    message = f"archive member {member.name} cannot be read"
                    raise OSError(message)
                with handle:
                    return _read_capped(handle)

            yield Entry(f"{rel}{MEMBER_SEPARATOR}{member.name}", read=read)


def _decompressed(path: Path, suffix: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with COMPRESSION[suffix](path, "rb") as handle:
            return _read_capped(handle)

    return read


def walk(
    subject_dir: Path, *, on_error: Callable[[str], None] = lambda message: None
) -> Iterator[Entry]:
    """Every file of ``subject_dir`` (any depth, sorted, symlinked folders not followed),
    archive members included; ``subject_dir`` may also be one archive file (a subject
    exported as ``sub-07.zip``), whose members are then named ``sub-07.zip::<member>``.
    A folder that cannot be listed or an archive that cannot be opened is reported to
    ``on_error`` (a message without file contents) and its files are skipped."""

    def walk_error(error: OSError) -> None:
        on_error(f"a folder could not be listed ({type(error).__name__})")

    if subject_dir.is_file():
        if is_archive(subject_dir.name):
            try:
                yield from _archive_entries(subject_dir, subject_dir.name)
            except READ_ERRORS as error:
                on_error(f"archive {subject_dir.name} could not be read ({type(error).__name__})")
        return
    for dirpath, dirnames, filenames in os.walk(subject_dir, followlinks=False, onerror=walk_error):
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(subject_dir).as_posix()
            if is_archive(name):
                try:
                    yield from _archive_entries(path, rel)
                except READ_ERRORS as error:
                    on_error(f"archive {rel} could not be read ({type(error).__name__})")
                continue
            suffix = compression_of(name)
            if suffix:
                yield Entry(rel, read=_decompressed(path, suffix))
            else:
                yield Entry(rel, path=path)


def _split(rel: str) -> tuple[str, str]:
    archive, _, member = rel.partition(MEMBER_SEPARATOR)
    return archive, member


def materialise(subject_dir: Path, files: Sequence[str], folder: Path) -> list[Path]:
    """Put the files named ``files`` (names as ``walk`` gives them) into ``folder`` under
    neutral names (``000000.dcm``, ...): plain files linked (copied where links fail),
    compressed files and archive members decompressed. Returns the paths, in order.
    Raises ``FileNotFoundError`` naming a file that is gone, ``OSError`` for one that
    cannot be read."""
    root = subject_root(subject_dir)
    folder.mkdir(parents=True, exist_ok=True)
    targets = [folder / f"{index:06d}.dcm" for index in range(len(files))]
    members: dict[str, dict[str, Path]] = {}
    for rel, target in zip(files, targets, strict=True):
        archive, member = _split(rel)
        if member:
            members.setdefault(archive, {})[member] = target
            continue
        source = (root / rel).absolute()
        if not source.is_file():
            message = f"selected file disappeared since the inventory: {rel}"
            raise FileNotFoundError(message)
        suffix = compression_of(source.name)
        if suffix:
            target.write_bytes(_decompressed(source, suffix)())
            continue
        try:
            os.symlink(source, target)
        except OSError:
            shutil.copyfile(source, target)
    for archive, wanted in members.items():
        path = root / archive
        if not path.is_file():
            message = f"selected archive disappeared since the inventory: {archive}"
            raise FileNotFoundError(message)
        found = set()
        for entry in _archive_entries(path, archive):
            _, member = _split(entry.rel)
            if member in wanted and entry.read is not None:
                wanted[member].write_bytes(entry.read())
                found.add(member)
        missing = sorted(set(wanted) - found)
        if missing:
            message = f"{len(missing)} selected files are gone from {archive} since the inventory"
            raise FileNotFoundError(message)
    return targets
