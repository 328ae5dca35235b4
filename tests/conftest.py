"""Fixtures shared by the unit and workflow tests."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MRIAUDIT_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root holding ``dicom/`` and ``nifti/`` from ../shared/data, unpacked once per session.

    Skips the test when ../shared is absent (a fresh clone outside CI).
    """
    unpack = SHARED_DATA / "unpack.sh"
    if not unpack.is_file():
        pytest.skip(f"real test data not found at {SHARED_DATA} (../shared is absent)")
    cache = Path(os.environ.get("MRIAUDIT_SHARED_CACHE", tmp_path_factory.getbasetemp() / "shared"))
    subprocess.run(["bash", str(unpack), str(cache)], check=True, capture_output=True)
    return cache
