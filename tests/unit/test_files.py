"""Atomic writes and digests (mriaudit.files)."""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from mriaudit import files


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "deep" / "table.tsv"
    files.write_text(target, "old\n")
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in target.parent.iterdir()) == ["table.tsv"]


def test_written_files_get_the_umask_mode_and_their_digest(tmp_path):
    umask = os.umask(0o022)
    try:
        files.write_text(tmp_path / "a.txt", "ü\n")
    finally:
        os.umask(umask)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
    assert files.sha256(tmp_path / "a.txt") == hashlib.sha256("ü\n".encode()).hexdigest()


def test_atomic_writes_from_many_threads_keep_the_umask(tmp_path):
    previous = os.umask(0o027)
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda i: files.write_text(tmp_path / f"{i}.txt", "x"), range(400)))
        assert os.umask(0o027) == 0o027
    finally:
        os.umask(previous)
    assert {(tmp_path / f"{i}.txt").stat().st_mode & 0o777 for i in range(400)} == {0o640}
