"""autopar.cluster.measure: the alpha-beta fit recovers known parameters from synthetic timings, and a live
2-rank gloo profile yields a loadable ClusterProfile whose fitted links explain what was measured."""
import json
import random

import pytest

from autopar.core.errors import AutoparError, ClusterProfileError, ConfigError
from autopar.core.mesh import MeshSpec
from autopar.cluster.profile import COLLECTIVES, ClusterProfile, load_cluster
from autopar.cluster.timing import ProfileOptions, fit_alpha_beta, fit_linear, sizes_between
from autopar.solver.cost import collective_time
from profile_check import measure

SIZES = [2 ** k for k in range(10, 25, 2)]


@pytest.mark.parametrize("alpha, bandwidth", [(50e-6, 1e9), (2e-6, 400e9), (0.0, 5e9), (1e-3, 1e8)])
def test_fit_recovers_exact_parameters(alpha, bandwidth):
    times = [alpha + x / bandwidth for x in SIZES]
    ab = fit_alpha_beta(SIZES, times)
    assert ab.alpha == pytest.approx(alpha, rel=1e-6, abs=1e-12)
    assert ab.beta == pytest.approx(1 / bandwidth, rel=1e-6)


def test_fit_recovers_parameters_under_noise():
    rng = random.Random(0)
    alpha, beta = 80e-6, 1 / 2e9
    sizes = [s for s in SIZES for _ in range(5)]
    times = [(alpha + beta * x) * rng.uniform(0.95, 1.05) for x in sizes]
    ab = fit_alpha_beta(sizes, times)
    assert ab.alpha == pytest.approx(alpha, rel=0.1)
    assert ab.beta == pytest.approx(beta, rel=0.1)


def test_fit_weights_small_messages_by_relative_error():
    # an unweighted fit of these would put alpha off by the noise of the 16 MiB point (~tens of us)
    times = [10e-6 + x / 1e9 for x in SIZES]
    times[-1] *= 1.02
    a, _ = fit_linear(SIZES, times)
    assert a == pytest.approx(10e-6, rel=0.05)


def test_negative_intercept_is_clamped():
    times = [max(1e-9, -5e-6 + x / 1e9) for x in SIZES[2:]]
    ab = fit_alpha_beta(SIZES[2:], times)
    assert ab.alpha == 0.0 and ab.beta == pytest.approx(1e-9, rel=0.15)  # a line through the origin


@pytest.mark.parametrize("sizes, times, err, match", [
    ([1024, 1024], [1e-3, 1e-3], ConfigError, "at least 2 distinct sizes"),
    ([1024, 2048], [1e-3, -1.0], ConfigError, "times finite and > 0"),
    ([1024, 2048, 4096], [1e-3], ConfigError, "one length"),
    ([1024, 2048, 4096], [3e-3, 2e-3, 1e-3], ClusterProfileError, "do not grow with message size"),
])
def test_fit_errors(sizes, times, err, match):
    with pytest.raises(err, match=match) as ei:
        fit_alpha_beta(sizes, times)
    assert isinstance(ei.value, AutoparError)


def test_sizes_between_and_options():
    s = sizes_between(4096, 4 << 20, 5)
    assert s[0] == 4096 and s[-1] == 4 << 20 and len(s) == 5 and list(s) == sorted(s)
    with pytest.raises(ConfigError, match="min bytes < max bytes"):
        sizes_between(4096, 1024, 3)
    with pytest.raises(ConfigError, match="at least 2 distinct message sizes"):
        ProfileOptions(message_sizes=(4096,))


QUICK = dict(message_sizes=(4096, 1 << 20, 4 << 20), matmul_sizes=(32, 128), stream_bytes=(1 << 16, 1 << 20),
             dtypes=("float32",), trials=3, warmup=1, probes=((1, 32, 2, 64, 16, 2), (1, 64, 2, 128, 32, 4)))


@pytest.fixture(scope="module")
def live_profile(dist2, tmp_path_factory):
    results = dist2.run(measure, (2,), QUICK)
    path = tmp_path_factory.mktemp("prof") / "cluster.json"
    path.write_text(json.dumps(results[0]))
    return results, path


def test_live_calibration_fits_the_probes(live_profile):
    """The probe GPTs' forward+backward, as the calibrated roofline prices them, is no further from the
    measured time than the uncalibrated one (least squares over both scales, (1, 1) among them)."""
    cal = live_profile[0][0]["measurements"]["device"]["calibration"]
    rel = lambda key: sum((p[key] / p["measured_s"] - 1) ** 2 for p in cal["probes"])  # noqa: E731
    for p in cal["probes"]:
        p["uncalibrated_s"] = p["overhead_s"] + p["roofline_s"]
        assert p["measured_s"] > 0 and p["roofline_s"] > 0 and p["overhead_s"] > 0
    assert rel("calibrated_s") <= rel("uncalibrated_s") + 1e-12
    assert cal["overhead_scale"] > 0 and cal["throughput_scale"] > 0


def test_live_profile_loads_and_is_the_same_on_every_rank(live_profile):
    results, path = live_profile
    p = load_cluster(str(path))
    assert isinstance(p, ClusterProfile) and p.mesh_shape == (2,)
    assert ClusterProfile.from_dict(results[1]) == p, "every rank returns the same (max over ranks) numbers"
    assert set(p.mesh_dim_links[0].collectives) == set(COLLECTIVES)
    assert p.device.peak_flops["float32"] > 1e6 and p.device.memory_bandwidth > 1e6 and p.device.op_overhead_s > 0
    with pytest.raises(ClusterProfileError, match=r"measured on mesh \(2,\) but the plan is for \(4,\)"):
        p.dim_links(MeshSpec.make("4"))


def test_live_fit_explains_the_measurements(live_profile):
    """The fitted link reproduces what was measured (a shared 2-core host: the median point within 3x)."""
    results, path = live_profile
    p = load_cluster(str(path))
    raw = results[0]["measurements"]["links"]["dp"]
    for kind in COLLECTIVES:
        xs, ts = raw[kind]["traffic_bytes"], raw[kind]["seconds"]
        assert xs == sorted(xs) and len(xs) == len(QUICK["message_sizes"])
        ab = p.mesh_dim_links[0].collectives[kind]
        ratios = sorted((ab.alpha + ab.beta * x) / t for x, t in zip(xs, ts))
        assert 1 / 3 < ratios[len(ratios) // 2] < 3, (kind, xs, ts, ab)
    # the solver's collective_time prices the measured traffic with these numbers
    full = QUICK["message_sizes"][-1]
    link = p.mesh_dim_links[0]
    ab = link.collectives["all_reduce"]
    assert collective_time("all_reduce", full, 2, link) == pytest.approx(ab.alpha + link.sync_s + ab.beta * full)
    # the per-call sync cost is what a call between compute takes beyond the fitted all-reduce of its size
    sync = raw["sync"]
    assert sync["work_s"] > 0 and sync["matmuls"] >= 1
    assert sync["fitted_call_s"] == pytest.approx(ab.alpha + ab.beta * sync["bytes"])   # 2 ranks: traffic = S
    assert link.sync_s == pytest.approx(max(0.0, sync["work_and_call_s"] - sync["work_s"] - sync["fitted_call_s"]))


def test_per_op_fit_recovers_a_known_surcharge():
    from autopar.cluster.timing import fit_per_op

    rng = random.Random(1)
    ops, base = [40, 40, 80, 160], [0.005, 0.05, 0.1, 0.4]
    exact = [b + 3e-4 * n for b, n in zip(base, ops)]
    assert fit_per_op(ops, base, exact) == pytest.approx(3e-4, rel=1e-9)
    noisy = [t * rng.uniform(0.98, 1.02) for t in exact]   # +-2 % on every timing
    assert fit_per_op(ops, base, noisy) == pytest.approx(3e-4, rel=0.3)
    assert fit_per_op(ops, base, [b * 0.99 for b in base]) == 0.0, "faster than plain: no surcharge, not negative"
    with pytest.raises(ConfigError):
        fit_per_op([0, 0], [0.1, 0.2], [0.1, 0.2])


def test_live_checkpoint_surcharges_are_the_fit_of_the_probes(live_profile):
    """The checkpointed probes were timed, and the profile's surcharges are fit_per_op of what they took beyond
    plain and beyond the recompute the cost model charges."""
    from autopar.cluster.timing import fit_per_op

    results, path = live_profile
    raw = results[0]["measurements"]["device"]["checkpoint"]
    dev = load_cluster(str(path)).device
    rows = raw["probes"]
    assert len(rows) == len(QUICK["probes"])
    for r in rows:
        assert r["block_ops"] > 0 and r["plain_s"] > 0 and r["selective_s"] > 0 and r["full_s"] > 0
        assert r["charged_s"]["full"] > r["charged_s"]["selective"] > 0, "full re-runs the contractions too"
    for mode, field in (("selective", "selective_op_overhead_s"), ("full", "recompute_op_overhead_s")):
        want = fit_per_op([r["block_ops"] for r in rows], [r["plain_s"] for r in rows],
                          [r[f"{mode}_s"] - r["charged_s"][mode] for r in rows])
        assert getattr(dev, field) == pytest.approx(want) and raw[field] == pytest.approx(want)
