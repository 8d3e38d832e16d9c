"""autopar.tools.sweep and ``autopar plan --sweep-memory``: plans from the top budget down to the smallest
feasible one on the tiny GPT (h100-sxm preset, (2,) mesh), the time-memory frontier, and its PNG."""
from __future__ import annotations

import struct

import pytest

from autopar.tools import cli
from autopar.core.capture import capture
from autopar.core.mesh import MeshSpec
from autopar.models import build_model
from autopar.cluster.profile import PRESETS
from autopar.tools.sweep import SweepPoint, pareto, plot, render_sweep, sweep_memory


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_sweep_is_monotone_and_plots(tmp_path):
    model, inputs = build_model("gpt-tiny", batch=8, seq=32, device="meta")
    cap = capture(model, inputs)
    prof = PRESETS["h100-sxm"]
    points = sweep_memory(cap, MeshSpec.make((2,)), prof, top_budget=prof.device.memory_capacity, points=4)
    assert len(points) == 4
    budgets = [p.budget_bytes for p in points]
    assert budgets == sorted(budgets, reverse=True) and len(set(budgets)) == 4
    for p in points:
        assert p.peak_bytes <= p.budget_bytes
    # less memory is never faster (each point is the ILP's optimum at its budget)
    for hi, lo in zip(points, points[1:]):
        assert lo.peak_bytes <= hi.peak_bytes
        assert lo.step_time_s >= hi.step_time_s * (1 - 1e-6), (hi, lo)
    assert points[0].decisions == "none" and points[-1].decisions != "none"
    assert points[0].on_frontier and points[-1].on_frontier
    text = render_sweep(points)
    assert text.splitlines()[0].split()[:3] == ["budget", "step", "time"] and len(text.splitlines()) == 6
    width, height = _png_size(plot(points, tmp_path / "sweep.png", title="gpt-tiny"))
    assert width > 100 and height > 100


def _pt(budget, t, peak) -> SweepPoint:
    return SweepPoint(budget_bytes=budget, step_time_s=t, peak_bytes=peak, decisions="none", time_breakdown={})


def test_pareto_marks_points_nothing_beats():
    pts = pareto([_pt(10, 1.0, 9), _pt(8, 1.0, 9), _pt(7, 1.5, 7), _pt(6, 2.0, 7), _pt(5, 3.0, 5)])
    assert [p.on_frontier for p in pts] == [True, False, True, False, True]


def test_cli_sweep_prints_the_table_and_writes_the_png(tmp_path, capsys):
    out = tmp_path / "sweep.png"
    rc = cli.main(["plan", "--model", "gpt-tiny", "--batch", "8", "--seq", "32", "--mesh", "2", "--cluster",
                   "h100-sxm", "--sweep-memory", "--sweep-points", "2", "--sweep-out", str(out)])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("time-memory sweep: gpt-tiny") and "memory decisions" in lines[1]
    assert len(lines) == 5 and _png_size(out)[0] > 100


@pytest.mark.parametrize("extra,message", [
    (["--sweep-memory", "--sweep-out", "sweep.jpg"], "path ending in .png"),
    (["--sweep-memory", "--sweep-points", "1"], "at least 2"),
    (["--sweep-out", "sweep.png"], "add --sweep-memory"),
])
def test_cli_sweep_bad_options(extra, message, capsys):
    rc = cli.main(["plan", "--model", "gpt-tiny", "--mesh", "2", *extra])
    assert rc == 1 and message in capsys.readouterr().err
