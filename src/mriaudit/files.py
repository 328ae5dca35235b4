"""Files on disk: atomic writes and content digests, one way each.

Every table, record, sidecar and copied image mriaudit writes goes through
:func:`atomic_path`: the content is written to a temporary sibling and renamed
over the target, so a reader (the next rule, a curator's script, a rerun after
a crash) never sees half a file. Digests of whole files use
``hashlib.file_digest`` (sha256).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

#: os.umask can only be read by setting it: two threads doing so at once could leave
#: the process with umask 0 (every later file writable by all).
_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    with _UMASK_LOCK:
        umask = os.umask(0)
        os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """A temporary path beside ``target``; renamed over ``target`` when the block ends.

    The caller writes the whole file to the yielded path (by any library that
    takes a path). An exception inside the block removes the temporary file and
    leaves ``target`` as it was. The file gets the usual ``0666 & ~umask`` mode
    (mkstemp's 0600 would hide an audit from the group that shares it).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(target: str | Path, text: str, *, errors: str = "strict") -> None:
    """Write ``text`` (UTF-8) to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)


def sha256(path: str | Path) -> str:
    """Hex sha256 of the file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
