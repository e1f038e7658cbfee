"""Fixtures for the evaluation tests: MP-20 and hull folders, a shared fingerprint cache, CIF helpers."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def mp20_dir(shared_data_dir: Path) -> Path:
    path = shared_data_dir / "mp_20"
    if not (path / "test.csv.gz").is_file():
        pytest.skip("MP-20 split files not found")
    return path


@pytest.fixture(scope="session")
def hull_dir(shared_data_dir: Path) -> Path:
    path = shared_data_dir / "mp_hull"
    if not path.is_dir():
        pytest.skip("mp_hull reference not found")
    return path


@pytest.fixture(scope="session")
def fp_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One reference-fingerprint cache for the whole session (CrystalNN is slow)."""
    return tmp_path_factory.mktemp("fp_cache")
