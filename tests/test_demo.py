"""``python -m autopar.tools.demo``, the README's first command: 4 spawned gloo ranks train a GPT under a
solved DPxTP plan, the losses match one process, and the plan file it writes loads."""
import sys

import pytest

from autopar.core.plan import Plan
from launch import describe, run_command


@pytest.mark.slow
def test_demo_trains_and_matches_single_process(tmp_path):
    out = tmp_path / "plan.json"
    res = run_command([sys.executable, "-m", "autopar.tools.demo", "--steps", "3", "--out", str(out)], tmpdir=tmp_path,
                      timeout=300, cwd=tmp_path)
    assert res.returncode == 0, describe(res)
    assert "losses match" in res.stdout, describe(res)
    assert "parameters" in res.stdout and "placement" in res.stdout, "rank 0 prints the plan table"
    assert "Traceback" not in res.stderr, describe(res)
    plan = Plan.from_json(out)
    assert plan.mesh.shape == (2, 2) and plan.mesh.dim_names == ("dp", "tp")
    assert plan.node_shardings["input:idx"].outputs[0][0] == "S(0)", "the batch splits over dp"
    assert any(p != "R" for pl in plan.param_placements.values() for p in pl), "some weight is sharded"
