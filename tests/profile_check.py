"""Worker functions (module level, run in the gloo pools) for tests/test_profiler.py."""
from __future__ import annotations


def measure(rank: int, world: int, mesh_shape: tuple[int, ...], options: dict) -> dict:
    """``autopar.cluster.measure.profile_cluster`` on the pool's process group: every rank's profile JSON dict."""
    from autopar.cluster.measure import profile_cluster
    from autopar.cluster.timing import ProfileOptions

    return profile_cluster(mesh_shape, opts=ProfileOptions(**options))
