"""Worker functions (module level, run in the gloo pools) that count the collectives a parallel module really
runs in one training step, for comparison with ``autopar.solver.runtime_model.planned_collectives``.

``count_collectives`` applies each plan and runs one forward (phase ``fwd``) and one backward (``bwd``)
with every torch.distributed collective entry point wrapped (``torch.distributed`` and ``distributed_c10d``,
and the aliases autopar's modules hold of them, e.g. ``autopar.ops.collectives.all_gather_single``): a call
is recorded as (phase, kind, mesh dim, bytes), the mesh dim found by matching the call's process group with
``mesh.get_group(d)`` (by identity, else by its ranks), the bytes as runtime_model defines them: the tensor
unsharded on that mesh dim (the all-reduced tensor, the all-gather's output, the reduce-scatter's input, the
all-to-all's input times the group size, the broadcast tensor). Calls on other groups are recorded with mesh
dim -1.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
from collections import Counter

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
from fuzz_check import _mesh, build_inputs_for

import autopar

# entry point -> (kind, which tensor argument gives the bytes, times the group size?)
_ENTRIES = {
    "all_reduce": ("all_reduce", 0, False),
    "all_gather_into_tensor": ("all_gather", 0, False),   # (output, input)
    "all_gather_single": ("all_gather", 0, False),
    "reduce_scatter_tensor": ("reduce_scatter", 1, False),  # (output, input)
    "reduce_scatter_single": ("reduce_scatter", 1, False),
    "all_to_all_single": ("all_to_all", 1, True),          # (output, input)
    "broadcast": ("broadcast", 0, False),
    "all_gather": ("all_gather_list", 1, False),
    "reduce_scatter": ("reduce_scatter_list", 0, False),
    "all_to_all": ("all_to_all_list", 1, False),
    "reduce": ("reduce", 0, False),
    "gather": ("gather", 0, False),
    "scatter": ("scatter", 0, False),
    "send": ("send", 0, False),
    "recv": ("recv", 0, False),
    "isend": ("send", 0, False),
    "irecv": ("recv", 0, False),
}


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return 0


class Recorder:
    def __init__(self, mesh) -> None:
        self.phase = "setup"
        self.calls: list[tuple[str, str, int, int]] = []
        self._groups = []
        for d in range(mesh.ndim):
            g = mesh.get_group(d)
            self._groups.append((d, g, tuple(sorted(dist.get_process_group_ranks(g)))))

    def dim_of(self, group) -> int:
        group = group if group is not None else dist.group.WORLD
        for d, g, _ in self._groups:
            if g is group:
                return d
        ranks = tuple(sorted(dist.get_process_group_ranks(group)))
        for d, _, r in self._groups:
            if r == ranks:
                return d
        return -1

    def record(self, name: str, fn, args, kwargs) -> None:
        kind, idx, times_n = _ENTRIES[name]
        bound = inspect.signature(fn).bind_partial(*args, **kwargs).arguments
        params = list(inspect.signature(fn).parameters)
        tensor = bound.get(params[idx])
        group = bound.get("group")
        nbytes = _nbytes(tensor)
        if times_n:
            nbytes *= dist.get_world_size(group)
        self.calls.append((self.phase, kind, self.dim_of(group), nbytes))


@contextlib.contextmanager
def recording(mesh):
    """Every collective entry point wrapped for the duration; yields the Recorder."""
    rec = Recorder(mesh)
    originals = {}
    for name in _ENTRIES:
        fn = getattr(c10d, name, None)
        if fn is not None:
            originals[name] = fn
    patched = []   # (object, attribute, original)

    def wrapper(name, fn):
        def counted(*args, **kwargs):
            rec.record(name, fn, args, kwargs)
            return fn(*args, **kwargs)
        return counted

    wrappers = {name: wrapper(name, fn) for name, fn in originals.items()}
    by_id = {id(fn): name for name, fn in originals.items()}
    modules = [dist, c10d] + [m for k, m in list(sys.modules.items()) if k.startswith("autopar") and m is not None]
    for mod in modules:
        for attr, val in list(vars(mod).items()):
            name = by_id.get(id(val))
            if name is not None and val is originals[name]:
                setattr(mod, attr, wrappers[name])
                patched.append((mod, attr, val))
    try:
        yield rec
    finally:
        for mod, attr, val in patched:
            setattr(mod, attr, val)


def count_one(spec: str, plan_json: str, batch: int, seq: int) -> list[tuple[str, str, int, int]]:
    model, inputs = build_inputs_for(spec, batch, seq)
    plan = autopar.Plan.from_json(plan_json)
    mesh = _mesh(tuple(plan.mesh.shape))
    pm = autopar.apply(model, plan, mesh)
    with recording(mesh) as rec:
        rec.phase = "fwd"
        loss = pm(**inputs)
        rec.phase = "bwd"
        loss.backward()
    return rec.calls


def count_collectives(rank: int, world: int, cases: list[tuple[str, str, int]], batch: int = 4, seq: int = 16
                      ) -> list[dict]:
    """``cases``: (model spec, plan JSON, seed). Per case: seed and the calls as a sorted list of
    ((phase, kind, mesh dim, bytes), count), or ``error`` where the plan did not apply or run."""
    out = []
    for spec, plan_json, seed in cases:
        row = {"seed": seed, "spec": spec}
        try:
            row["counts"] = sorted(Counter(count_one(spec, plan_json, batch, seq)).items())
        except Exception as e:  # noqa: BLE001 - reported per plan, checked in the parent
            row["error"] = f"{type(e).__name__}: {e}"
        out.append(row)
    return out


# ------------------------------------------------------------------------- plans, made in the parent

_CAPTURES: dict = {}


def capture_for(spec: str, batch: int = 4, seq: int = 16):
    from autopar.core.capture import capture
    from autopar.models import build_model

    if (spec, batch, seq) not in _CAPTURES:
        model, inputs = build_model(spec, batch=batch, seq=seq, device="meta")
        _CAPTURES[(spec, batch, seq)] = capture(model, inputs)
    return _CAPTURES[(spec, batch, seq)]


def make_plan(seed: int, batch: int = 4, seq: int = 16):
    """(spec, the fuzzer's random plan for ``seed`` without memory decisions, seed) on the (spec, mesh) the
    fuzzer gives the seed (fuzz_check.case_for)."""
    from fuzz_check import case_for

    from autopar.cluster.profile import load_cluster
    from autopar.core.mesh import MeshSpec
    from autopar.solver.random_plan import random_plan

    spec, mesh = case_for(seed)
    plan = random_plan(capture_for(spec, batch, seq), MeshSpec.make(mesh, None), load_cluster("cpu-gloo"), seed,
                       memory=False)
    return spec, plan, seed


def planned_counts(spec: str, plan, batch: int = 4, seq: int = 16) -> list:
    """runtime_model's list for ``plan``, as count_collectives reports the real calls."""
    from autopar.core.graph import index_graph
    from autopar.solver.runtime_model import collective_counts, planned_collectives

    gi = index_graph(capture_for(spec, batch, seq))
    return sorted(collective_counts(planned_collectives(plan, gi)).items())
