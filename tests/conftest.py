"""Shared pytest fixtures."""
import pytest

from dist_utils import DistPool


@pytest.fixture(scope="session")
def dist2():
    """A 2-rank gloo worker pool shared by the whole session (see tests/dist_utils.py)."""
    pool = DistPool(2)
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def dist4():
    """A 4-rank gloo worker pool shared by the whole session (see tests/dist_utils.py)."""
    pool = DistPool(4)
    yield pool
    pool.close()
