"""Fixtures shared by the matgen tests."""

import pytest

from matgen.data import load_structures


@pytest.fixture(scope="session")
def mp20_test_structures(shared_data_dir):
    """``(ids, structures)`` of the whole MP-20 test split (9,046 crystals; parsed once per session)."""
    return load_structures("test", shared_data_dir / "mp_20", progress=False)
