"""Fixtures shared by the matgen tests."""

import pytest

from matgen.data import load_structures


@pytest.fixture(scope="session")
def mp20_test_structures(shared_data_dir):
    """``(ids, structures)`` of the whole MP-20 test split (9,046 crystals; parsed once per session)."""
    return load_structures("test", shared_data_dir / "mp_20", progress=False)


@pytest.fixture
def isolated_matgen_env(monkeypatch, tmp_path):
    """Keep a test away from the user's real data and cache folders ($MATGEN_DATA, $MATGEN_CACHE, XDG)."""
    monkeypatch.delenv("MATGEN_DATA", raising=False)
    monkeypatch.setenv("MATGEN_CACHE", str(tmp_path / "token-cache"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
