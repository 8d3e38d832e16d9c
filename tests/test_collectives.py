"""autopar.ops.collectives.redistribute on real gloo process groups: forward values and gradients.

Every case builds, on every rank, this rank's local tensor of a seeded global tensor ``X``
under ``src`` (partial placements get genuinely different per-rank parts), redistributes it
to ``dst``, then back-propagates this rank's local part of a seeded global gradient ``G``
under ``grad_dst``. The parent reassembles the per-rank results: the outputs must make up
``X`` under ``dst`` and the input gradients ``G`` under ``grad_src``. Where ``dst`` has no
Partial, DTensor's own ``redistribute`` is a second oracle for each rank's local output.

The workers are the session's shared pools (``dist2``, ``dist4`` in conftest.py).
"""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch
from torch.distributed.tensor import Partial, Replicate, Shard

from autopar.ops.collectives import plan_redistribute, redistribute, to_global_output, to_local_input
from autopar.core.errors import ShardingError
from autopar.core.placement import format_sharding, parse_sharding, redistribute_steps

SHAPE = (4, 8, 12)
BASIC = ["R", "S(0)", "S(1)", "S(2)", "P(sum)"]

# ------------------------------------------------------------------------------ reference (pure torch)


def _coords(rank: int, mesh_shape) -> tuple[int, ...]:
    out = []
    for n in reversed(mesh_shape):
        out.append(rank % n)
        rank //= n
    return tuple(reversed(out))


def _seeded(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _avg_factor(placements, mesh_shape) -> int:
    return math.prod(mesh_shape[d] for d, p in enumerate(placements) if isinstance(p, Partial) and p.reduce_op == "avg")


def make_local(value: torch.Tensor, placements, coord, mesh_shape, seed: int) -> torch.Tensor:
    """This coordinate's local tensor of ``value`` (outer mesh dims first, like DTensor).

    Partial dims split the value into different random parts that sum (P(sum)) or average
    (P(avg)) to it; the noise depends only on the outer coordinates, so all ranks agree.
    """
    for d, p in enumerate(placements):
        n = mesh_shape[d]
        if isinstance(p, Shard):
            value = value.chunk(n, dim=p.dim)[coord[d]]
        elif isinstance(p, Partial):
            key = seed * 1_000_003 + d * 7919 + sum(c * 31 ** i for i, c in enumerate(coord[:d]))
            noise = [_seeded(value.shape, key + k, value.dtype) for k in range(n - 1)]
            parts = noise + [value - sum(noise, torch.zeros_like(value))]
            value = parts[coord[d]] * (n if p.reduce_op == "avg" else 1)
    return value.clone()


def assemble(locals_by_coord: dict, placements, mesh_shape, what: str = "") -> torch.Tensor:
    """The global tensor the per-coordinate locals make up under ``placements`` (inner mesh dims first)."""
    cur = dict(locals_by_coord)
    for d in reversed(range(len(mesh_shape))):
        groups: dict[tuple, list] = {}
        for c in sorted(cur):
            groups.setdefault(c[:d], []).append(cur[c])
        p = placements[d]
        nxt = {}
        for key, parts in groups.items():
            if isinstance(p, Shard):
                nxt[key] = torch.cat(parts, dim=p.dim)
            elif isinstance(p, Partial):
                total = torch.stack(parts).sum(0)
                nxt[key] = total / len(parts) if p.reduce_op == "avg" else total
            else:
                for k, t in enumerate(parts[1:], 1):
                    torch.testing.assert_close(t, parts[0], msg=lambda m: f"{what}: R on mesh dim {d} but "
                                               f"coordinate {key + (k,)} differs from {key + (0,)}: {m}")
                nxt[key] = parts[0]
        cur = nxt
    return cur[()]


def nested_order_ok(src, dst) -> bool:
    """Whether redistribute_steps(src, dst) keeps DTensor's outer-first nested shard layout."""
    cur = list(src)
    for d, kind, before, after in redistribute_steps(src, dst):
        touched = {p.dim for p in (before, after) if isinstance(p, Shard)}
        if any(isinstance(cur[e], Shard) and cur[e].dim in touched for e in range(d + 1, len(cur))):
            return False
        cur[d] = after
    return True


def _sh(text) -> tuple:
    return None if text is None else parse_sharding(text.split(","))


def _grad(placements):
    return tuple(Replicate() if isinstance(p, Partial) else p for p in placements)


# --------------------------------------------------------------------------------------- worker side

_MESHES: dict = {}


def _mesh(shape):
    if shape not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[shape] = init_device_mesh("cpu", shape)
    return _MESHES[shape]


def _run_cases(rank, world_size, mesh_shape, cases, seed, dtensor_check=True):
    """Each case: (src, dst, grad_src, grad_dst, shape) as comma-joined strings; per-case local results."""
    from torch.distributed.tensor import DTensor

    mesh = _mesh(mesh_shape)
    coord = tuple(mesh.get_coordinate())
    out = []
    for k, (src, dst, gsrc, gdst, shape) in enumerate(cases):
        src_p, dst_p, gsrc_p, gdst_p = _sh(src), _sh(dst), _sh(gsrc), _sh(gdst)
        X, G = _seeded(shape, seed + 2 * k), _seeded(shape, seed + 2 * k + 1)
        x = make_local(X, src_p, coord, mesh_shape, seed + k).requires_grad_()
        x0 = x.detach().clone()
        try:
            y = redistribute(x, src_p, dst_p, mesh=mesh, grad_src=gsrc_p, grad_dst=gdst_p)
        except ShardingError as e:
            out.append({"error": str(e)})
            continue
        g_eff = gdst_p if gdst_p is not None else _grad(dst_p)
        g = make_local(G, g_eff, coord, mesh_shape, seed + 7 * k + 3) / _avg_factor(dst_p, mesh_shape)
        y.backward(g)
        res = {"y": y, "grad": x.grad, "x_unchanged": torch.equal(x.detach(), x0)}
        two_shards = sum(isinstance(p, Shard) for p in src_p) > 1 or sum(isinstance(p, Shard) for p in dst_p) > 1
        if (dtensor_check or two_shards) and not any(isinstance(p, Partial) for p in dst_p):
            res["dtensor"] = DTensor.from_local(x0, mesh, src_p, run_check=False).redistribute(mesh, dst_p).to_local()
        out.append(res)
    return coord, out


def check_cases(pool, mesh_shape, cases, seed=0, dtensor_check=True):
    """Run ``cases`` on the pool and check every one; returns the failures as readable lines.

    ``dtensor_check=False`` keeps the DTensor oracle only for cases with two shards (nested layouts).
    """
    per_rank = pool.run(_run_cases, mesh_shape, cases, seed, dtensor_check)
    failures = []
    for k, (src, dst, gsrc, gdst, shape) in enumerate(cases):
        src_p, dst_p = _sh(src), _sh(dst)
        gsrc_p = _sh(gsrc) if gsrc else _grad(src_p)
        gdst_p = _sh(gdst) if gdst else _grad(dst_p)
        name = f"[{src}] -> [{dst}] (grad [{','.join(format_sharding(gdst_p))}] -> " \
               f"[{','.join(format_sharding(gsrc_p))}], shape {shape})"
        res = {coord: results[k] for coord, results in per_rank}
        expect_refusal = not (nested_order_ok(src_p, dst_p) and nested_order_ok(gdst_p, gsrc_p))
        errors = {c: r["error"] for c, r in res.items() if "error" in r}
        if expect_refusal:
            if len(errors) != len(res) or not all("redistribute_steps" in e for e in errors.values()):
                failures.append(f"{name}: expected a ShardingError about redistribute_steps on every rank, got "
                                f"{errors or 'none'}")
            continue
        if errors:
            failures.append(f"{name}: unexpected error {next(iter(errors.values()))}")
            continue
        try:
            X, G = _seeded(shape, seed + 2 * k), _seeded(shape, seed + 2 * k + 1)
            y = assemble({c: r["y"] for c, r in res.items()}, dst_p, mesh_shape, f"{name} forward")
            torch.testing.assert_close(y, X, msg=lambda m: f"{name} forward: {m}")
            scale = _avg_factor(src_p, mesh_shape)
            grad = assemble({c: r["grad"] * scale for c, r in res.items()}, gsrc_p, mesh_shape, f"{name} backward")
            torch.testing.assert_close(grad, G, msg=lambda m: f"{name} backward: {m}")
            for c, r in res.items():
                assert r["x_unchanged"], f"{name}: the input was modified in place on {c}"
                assert r["y"].shape == make_local(X, dst_p, c, mesh_shape, 0).shape, f"{name}: local shape on {c}"
                if "dtensor" in r:
                    torch.testing.assert_close(r["y"], r["dtensor"], msg=lambda m: f"{name} vs DTensor at {c}: {m}")
        except AssertionError as e:
            failures.append(str(e).splitlines()[0] if len(str(e)) > 2000 else str(e))
    return failures


def _pairs(ndim, choices=BASIC):
    shardings = [",".join(t) for t in itertools.product(choices, repeat=ndim)]
    return [(s, d) for s in shardings for d in shardings]


def _assert_no_failures(failures):
    assert not failures, f"{len(failures)} failing case(s):\n" + "\n".join(failures[:20])


# -------------------------------------------------------------------------------------------- tests

_ALL2 = [",".join(t) for t in itertools.product(BASIC, repeat=2)]
_SRC1 = BASIC + ["P(avg)"]
_DST1 = BASIC + ["P(avg)"]


@pytest.mark.parametrize("src", _SRC1)
def test_all_pairs_mesh2(dist2, src):
    _assert_no_failures(check_cases(dist2, (2,), [(src, dst, None, None, SHAPE) for dst in _DST1]))


@pytest.mark.parametrize("src", _SRC1)
def test_all_pairs_mesh4(dist4, src):
    _assert_no_failures(check_cases(dist4, (4,), [(src, dst, None, None, SHAPE) for dst in _DST1]))


@pytest.mark.parametrize("src", _ALL2)
def test_all_pairs_mesh2x2(dist4, src):
    """All 625 pairs of {R, S(0), S(1), S(2), P(sum)}^2; 24 of them hit the nested-order refusal."""
    _assert_no_failures(check_cases(dist4, (2, 2), [(src, dst, None, None, SHAPE) for dst in _ALL2],
                                    dtensor_check=False))


def test_avg_mesh2x2(dist4):
    """P(avg) on either mesh dim (or both), as source and as destination, against a seeded sample."""
    with_avg = [",".join(t) for t in itertools.product(BASIC + ["P(avg)"], repeat=2) if "P(avg)" in t]
    everything = [",".join(t) for t in itertools.product(BASIC + ["P(avg)"], repeat=2)]
    rng = random.Random(1)
    cases = [(s, d, None, None, SHAPE) for s in with_avg for d in rng.sample(everything, 8)]
    cases += [(s, d, None, None, SHAPE) for s in rng.sample(_ALL2, 10) for d in rng.sample(with_avg, 4)]
    cases += [("P(avg),P(avg)", "R,R", None, None, SHAPE), ("P(avg),S(0)", "S(0),R", None, None, SHAPE),
              ("R,R", "P(avg),P(avg)", None, None, SHAPE), ("P(avg),P(avg)", "P(avg),P(avg)", None, None, SHAPE),
              ("P(avg),P(sum)", "P(sum),P(avg)", None, None, SHAPE)]
    _assert_no_failures(check_cases(dist4, (2, 2), cases, seed=100))


def test_nested_cases_mesh2x2(dist4):
    """Nested shards of one tensor dim and partial+shard mixes, also with odd-sized shapes."""
    cases = [("S(0),S(0)", "R,R"), ("R,R", "S(0),S(0)"), ("P(sum),S(0)", "S(0),R"), ("S(0),S(0)", "S(1),S(1)"),
             ("S(1),S(1)", "S(0),S(2)"), ("S(0),S(1)", "S(1),S(0)"), ("P(sum),P(sum)", "S(2),S(2)"),
             ("S(2),S(2)", "P(sum),P(sum)"), ("S(0),P(sum)", "R,S(0)"), ("P(sum),S(1)", "S(1),P(sum)")]
    _assert_no_failures(check_cases(dist4, (2, 2), [(s, d, None, None, (4, 12, 20)) for s, d in cases], seed=7))


EXPLICIT_GRAD_1D = [
    # (src, dst, grad_src, grad_dst): the consumer splits its work, so its local gradient is partial
    ("R", "R", None, "P(sum)"),          # backward: all_reduce
    ("S(0)", "R", None, "P(sum)"),       # backward: reduce_scatter to S(0)
    ("S(2)", "R", None, "P(sum)"),       # backward: reduce_scatter to S(2)
    ("S(1)", "R", None, "P(sum)"),       # backward: reduce_scatter to S(1)
    ("R", "S(1)", "P(sum)", None),       # producer wants a partial gradient: zero step
    ("P(sum)", "R", "P(sum)", "P(sum)"),  # nothing to do on the gradient
    ("P(avg)", "R", None, "P(sum)"),     # all_reduce then 1/n
    ("R", "P(avg)", "P(sum)", "P(sum)"),  # n then nothing
    ("R", "R", "P(sum)", "R"),           # zero step on the gradient only
    ("P(sum)", "S(0)", "P(avg)", None),  # gradient to P(avg): all_gather, keep everywhere
]


def test_explicit_grad_placements_mesh2(dist2):
    _assert_no_failures(check_cases(dist2, (2,), [(*c, SHAPE) for c in EXPLICIT_GRAD_1D], seed=11))


def test_explicit_grad_placements_mesh4(dist4):
    _assert_no_failures(check_cases(dist4, (4,), [(*c, SHAPE) for c in EXPLICIT_GRAD_1D], seed=12))


def test_explicit_grad_placements_mesh2x2(dist4):
    cases = [("S(0),R", "R,R", None, "P(sum),P(sum)"), ("R,S(2)", "R,R", None, "R,P(sum)"),
             ("P(sum),R", "R,R", None, "P(sum),R"), ("R,R", "R,R", None, "P(sum),P(sum)"),
             ("S(1),S(2)", "R,S(0)", None, "P(sum),S(0)"), ("R,R", "S(0),S(1)", "P(sum),P(sum)", None),
             ("P(avg),R", "R,S(1)", None, "P(sum),S(1)")]
    _assert_no_failures(check_cases(dist4, (2, 2), [(*c, SHAPE) for c in cases], seed=13))


# ----------------------------------------------------------------- the runtime follows the planner's steps

_NATIVE = {"all_gather": "all_gather", "all_reduce": "all_reduce", "reduce_scatter": "reduce_scatter",
           "all_to_all": "all_to_all"}


def _record_collectives(rank, world_size, mesh_shape, pairs):
    """Per pair: the (collective, mesh dim) calls of forward and backward, by patching the module's primitives."""
    from unittest import mock

    import autopar.ops.collectives as C

    mesh = _mesh(mesh_shape)
    groups = {id(mesh.get_group(d)): d for d in range(len(mesh_shape))}
    calls: list = []

    def spy(name, real):
        def f(*args, group=None, **kw):
            calls.append((name, groups[id(group)]))
            return real(*args, group=group, **kw)
        return f

    dist_spy = mock.MagicMock(wraps=C.dist)
    dist_spy.ReduceOp = C.dist.ReduceOp
    dist_spy.get_backend = C.dist.get_backend
    dist_spy.all_reduce = spy("all_reduce", C.dist.all_reduce)
    dist_spy.all_to_all_single = spy("all_to_all", C.dist.all_to_all_single)
    out = []
    with mock.patch.object(C, "dist", dist_spy), \
            mock.patch.object(C, "all_gather_single", spy("all_gather", C.all_gather_single)), \
            mock.patch.object(C, "_reduce_scatter_single", spy("reduce_scatter", C._reduce_scatter_single)):
        for src, dst in pairs:
            src_p, dst_p = _sh(src), _sh(dst)
            x = make_local(_seeded(SHAPE, 0), src_p, tuple(mesh.get_coordinate()), mesh_shape, 0).requires_grad_()
            calls.clear()
            try:
                y = redistribute(x, src_p, dst_p, mesh=mesh)
            except ShardingError:
                out.append(None)
                continue
            fwd = list(calls)
            calls.clear()
            y.backward(torch.ones_like(y))
            out.append((fwd, list(calls)))
    return out


def _expected_calls(src, dst):
    return [(_NATIVE[k], d) for d, k, _, _ in redistribute_steps(src, dst) if k in _NATIVE]


@pytest.mark.parametrize("mesh_shape", [(2,), (4,), (2, 2)], ids=["mesh2", "mesh4", "mesh2x2"])
def test_runtime_runs_exactly_the_planned_steps(dist2, dist4, mesh_shape):
    pool = dist2 if mesh_shape == (2,) else dist4
    pairs = _pairs(len(mesh_shape), BASIC + ["P(avg)"])
    if len(mesh_shape) == 2:
        pairs = random.Random(3).sample(pairs, 200)
    per_rank = pool.run(_record_collectives, mesh_shape, pairs)
    for k, (src, dst) in enumerate(pairs):
        src_p, dst_p = _sh(src), _sh(dst)
        if not nested_order_ok(src_p, dst_p) or not nested_order_ok(_grad(dst_p), _grad(src_p)):
            assert all(r[k] is None for r in per_rank), (src, dst)
            continue
        for rank, r in enumerate(per_rank):
            fwd, bwd = r[k]
            assert fwd == _expected_calls(src_p, dst_p), (src, dst, rank, fwd)
            assert bwd == _expected_calls(_grad(dst_p), _grad(src_p)), (src, dst, rank, "backward", bwd)


# ------------------------------------------------------------------------------------- planner issue


def _nested_bad_pairs():
    shardings = list(itertools.product([Replicate(), Shard(0), Shard(1), Shard(2), Partial("sum")], repeat=2))
    return [(s, d) for s in shardings for d in shardings if not nested_order_ok(s, d)]


def test_redistribute_steps_keep_nested_shard_order():
    assert _nested_bad_pairs() == []


# ---------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize("local_shape,src,dst,mesh_shape,grad,pattern", [
    ((3, 8, 12), "R", "S(0)", (2,), {}, r"tensor dim 0 of global shape \(3, 8, 12\) has size 3.*mesh dim\(s\) "
                                        r"\[0\] of size 2 \(mesh shape \(2,\)\)"),
    ((4, 8, 10), "R", "S(2)", (4,), {}, r"tensor dim 2 of global shape \(4, 8, 10\).*of size 4"),
    ((6, 8, 12), "R,R", "S(0),S(0)", (2, 2), {}, r"tensor dim 0 of global shape \(6, 8, 12\).*\[0, 1\] of size "
                                                 r"2 x 2.*multiple of 4"),
    ((4, 8, 12), "R", "S(3)", (2,), {}, r"S\(3\) on mesh dim 0 names a dim the 3-D tensor does not have"),
    ((4, 8, 12), "R", "P(max)", (2,), {}, r"P\(max\) on mesh dim 0 is not supported"),
    ((4, 8, 12), "R,R", "R", (2, 2), {}, r"dst .* has 1 placements but the mesh \(2, 2\) has 2 dims"),
    ((4, 8, 12), "S(1)", "S(0)", (2,), {"grad_dst": "P(sum)"}, r"grad_dst \(P\(sum\)\) does not fit the tensor's "
                                                               r"placements \(S\(0\)\): on mesh dim 0"),
    ((4, 8, 12), "R,R", "R,R", (2, 2), {"grad_src": "R,S(0)"}, r"grad_src \(R, S\(0\)\) does not fit.*mesh dim 1"),
])
def test_plan_errors(local_shape, src, dst, mesh_shape, grad, pattern):
    grad = {k: _sh(v) for k, v in grad.items()}
    with pytest.raises(ShardingError, match=pattern):
        plan_redistribute(local_shape, _sh(src), _sh(dst), mesh_shape, **grad)


def test_plan_normalizes_negative_dims_and_defaults():
    plan = plan_redistribute((4, 8, 6), (Shard(-1),), (Partial("sum"),), (2,))
    assert plan.src == (Shard(2),) and plan.global_shape == (4, 8, 12)
    assert plan.grad_src == (Shard(2),) and plan.grad_dst == (Replicate(),)
    assert [k for _, k, _, _ in plan.forward_steps] == ["all_gather", "zero"]
    assert [k for _, k, _, _ in plan.backward_steps] == ["chunk"]
    assert plan_redistribute((4,), (Partial("avg"),), (Replicate(),), (4,)).grad_scale == 0.25
    assert plan_redistribute((4,), (Replicate(),), (Partial("avg"),), (4,)).grad_scale == 4
    assert plan_redistribute((4,), (Shard(0),), (Shard(-1),), (4,)).is_identity


def _errors_on_all_ranks(rank, world_size):
    """Bad input raises the same ShardingError on every rank before any communication; the group stays usable."""
    import torch.distributed as dist

    mesh = _mesh((world_size,))
    messages = []
    for shape, src, dst in [((3, 8), "R", "S(0)"), ((2, 3), "S(0)", "S(1)"), ((4, 4), "P(sum)", "P(max)")]:
        try:
            redistribute(torch.ones(shape), _sh(src), _sh(dst), mesh=mesh)
            messages.append(None)
        except ShardingError as e:
            messages.append(str(e))
    t = torch.ones(1)
    dist.all_reduce(t)
    return messages, t.item()


def test_errors_raise_everywhere_without_hanging(dist2):
    results = dist2.run(_errors_on_all_ranks)
    assert results[0][0] == results[1][0] and all(m is not None for m in results[0][0])
    assert "tensor dim 0 of global shape (3, 8)" in results[0][0][0]
    assert "tensor dim 1 of global shape (4, 3)" in results[0][0][1]
    assert [r[1] for r in results] == [2.0, 2.0]


def _raise_in_worker(rank, world_size):
    redistribute(torch.ones(3, 8), (Replicate(),), (Shard(0),), mesh=_mesh((world_size,)))


def test_sharding_error_reaches_the_parent(dist2):
    with pytest.raises(ShardingError, match="tensor dim 0 of global shape") as info:
        dist2.run(_raise_in_worker)
    assert "traceback in rank 1" in "\n".join(getattr(info.value, "__notes__", []))
    assert dist2.run(_errors_on_all_ranks)[0][1] == 2.0  # the pool is still usable


# ----------------------------------------------------------------- inputs, outputs, dtypes, layouts


def _round_trip(rank, world_size, mesh_shape, dsts):
    from torch.distributed.tensor import distribute_tensor

    mesh = _mesh(mesh_shape)
    out = []
    for k, dst in enumerate(dsts):
        dst_p = _sh(dst)
        X = _seeded(SHAPE, 50 + k).requires_grad_()
        G = _seeded(SHAPE, 80 + k)
        local = to_local_input(X, dst_p, mesh)
        full = to_global_output(local * 2, dst_p, mesh)
        full.backward(G)
        ref = None
        if not any(isinstance(p, Partial) for p in dst_p):
            ref = distribute_tensor(X.detach(), mesh, dst_p).to_local()
        out.append({"local": local, "full": full, "x_grad": X.grad, "dtensor_local": ref, "X": X, "G": G})
    return tuple(mesh.get_coordinate()), out


@pytest.mark.parametrize("mesh_shape,dsts", [
    ((2,), ["R", "S(0)", "S(1)", "S(2)", "P(sum)", "P(avg)"]),
    ((2, 2), ["R,R", "S(0),S(0)", "S(1),S(0)", "S(2),P(sum)", "P(sum),P(sum)", "P(avg),S(1)", "R,P(avg)"]),
], ids=["mesh2", "mesh2x2"])
def test_to_local_input_and_to_global_output(dist2, dist4, mesh_shape, dsts):
    pool = dist2 if mesh_shape == (2,) else dist4
    per_rank = pool.run(_round_trip, mesh_shape, dsts)
    for k, dst in enumerate(dsts):
        dst_p = _sh(dst)
        for coord, res in per_rank:
            r = res[k]
            expected = r["X"].detach()
            for d, p in enumerate(dst_p):  # shards outer-first; P(sum) on coordinate 0; P(avg) everywhere
                if isinstance(p, Shard):
                    expected = expected.chunk(mesh_shape[d], dim=p.dim)[coord[d]]
                elif isinstance(p, Partial) and p.reduce_op == "sum" and coord[d] != 0:
                    expected = torch.zeros_like(expected)
            torch.testing.assert_close(r["local"], expected, rtol=0, atol=0, msg=lambda m: f"{dst} at {coord}: {m}")
            if r["dtensor_local"] is not None:
                torch.testing.assert_close(r["local"], r["dtensor_local"], rtol=0, atol=0)
            torch.testing.assert_close(r["full"], 2 * r["X"], msg=lambda m: f"{dst} at {coord}: {m}")
            torch.testing.assert_close(r["x_grad"], 2 * r["G"], msg=lambda m: f"{dst} grad at {coord}: {m}")
        got = assemble({c: res[k]["local"] for c, res in per_rank}, dst_p, mesh_shape, dst)
        torch.testing.assert_close(got, per_rank[0][1][k]["X"])


def _layouts(rank, world_size):
    """Non-contiguous and float64 inputs, and an input that must not be modified in place."""
    mesh = _mesh((world_size,))
    r = mesh.get_local_rank(0)
    base = _seeded((12, 8, 4), 5, torch.float64)  # global (4, 8, 12) = base.permute(2, 1, 0)
    X = base.permute(2, 1, 0)
    x = X.chunk(world_size, dim=2)[r]  # S(2) local, non-contiguous
    assert not x.is_contiguous()
    y = redistribute(x, (Shard(2),), (Shard(0),), mesh=mesh)  # all_to_all
    z = redistribute(x, (Shard(2),), (Replicate(),), mesh=mesh)  # all_gather
    p = redistribute(X * (r + 1), (Partial("sum"),), (Shard(1),), mesh=mesh)  # reduce_scatter of a view
    return {"y": y, "z": z, "p": p, "X": X, "dtype": str(y.dtype), "x_same": torch.equal(x, X.chunk(world_size, 2)[r])}


def test_non_contiguous_and_float64(dist4):
    res = dist4.run(_layouts)
    X = res[0]["X"]
    n = 4
    total = sum(range(1, n + 1))
    for r, out in enumerate(res):
        assert out["dtype"] == "torch.float64" and out["x_same"]
        torch.testing.assert_close(out["y"], X.chunk(n, 0)[r], rtol=0, atol=0)
        torch.testing.assert_close(out["z"], X, rtol=0, atol=0)
        torch.testing.assert_close(out["p"], (X * total).chunk(n, 1)[r])
