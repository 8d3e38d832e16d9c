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


@pytest.fixture(scope="session")
def dist8():
    """An 8-rank gloo worker pool shared by the whole session (2.5D / 3D tensor parallelism on 2 x 2 x 2)."""
    pool = DistPool(8)
    yield pool
    pool.close()
