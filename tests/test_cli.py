"""The ``autopar`` command line: plan writes a loadable plan, show prints its tables, every user error
exits 1 with one ``autopar: error:`` line, bad usage exits 2, and the console script is installed.

Commands run in-process through ``autopar.tools.cli.main`` (fast); one subprocess checks the entry point.
"""
import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import autopar
from autopar.core.plan import Plan
from autopar.tools.cli import main

TINY = ["--model", "gpt-tiny", "--batch", "4", "--seq", "16", "--mesh", "2x2", "--cluster", "cpu-gloo"]


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory) -> tuple[Path, str]:
    """``autopar plan`` on gpt-tiny once for the module: (plan path, stdout)."""
    out = tmp_path_factory.mktemp("cli") / "plan.json"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = main(["plan", *TINY, "--out", str(out)])
    assert rc == 0, stderr.getvalue()
    assert f"wrote {out}" in stderr.getvalue()
    return out, stdout.getvalue()


def _error_line(capsys, argv: list[str]) -> str:
    """Run a failing command; it must exit 1 with exactly one error line, which is returned."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    errors = [ln for ln in captured.err.splitlines() if ln.startswith("autopar: error:")]
    assert len(errors) == 1, captured.err
    assert "Traceback" not in captured.err
    return errors[0]


def _assert_tables(text: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith("plan v1  mesh dp=2 x tp=2  cluster cpu-gloo")
    assert "parameters" in lines and "layers" in lines
    params = lines[lines.index("parameters") + 1:lines.index("layers")]
    assert params[0].split() == ["parameter", "placement"]
    rows = {ln.split()[0]: ln.split()[1:] for ln in params[2:] if ln.strip()}
    assert set(rows) >= {"wte.weight", "wpe.weight", "blocks.0..1.attn.qkv.weight", "blocks.0..1.mlp.proj.weight",
                         "ln_f.weight"}
    assert all(len(pl) == 2 for pl in rows.values()), "one placement per mesh dim"
    layers = lines[lines.index("layers") + 1:]
    assert layers[0].split() == ["module", "count", "time", "comm", "memory"]
    blocks = next(ln.split() for ln in layers if ln.startswith("blocks.*"))
    assert blocks[1] == "2"


def test_plan_writes_a_loadable_plan(tiny_plan):
    path, stdout = tiny_plan
    plan = Plan.from_json(path)
    assert plan.mesh.shape == (2, 2) and plan.mesh.dim_names == ("dp", "tp")
    assert plan.cluster.name == "cpu-gloo"
    assert plan.model.inputs[0]["shape"] == [4, 16]
    assert plan.solver.status == "Optimal"
    assert "blocks.1.mlp.fc.weight" in plan.param_placements
    assert Plan.from_json(plan.to_json()) == plan
    _assert_tables(stdout)


def test_show_prints_parameter_and_layer_tables(tiny_plan, capsys):
    path, plan_stdout = tiny_plan
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out
    _assert_tables(out)
    assert out.strip() == plan_stdout.strip(), "show prints what plan printed"


@pytest.mark.parametrize("argv, expected", [
    (["plan", "--model", "no-such-model", "--mesh", "2"], "unknown model 'no-such-model'"),
    (["plan", "--model", "gpt-tiny", "--cluster", "no-such-cluster"], "unknown cluster preset 'no-such-cluster'"),
    (["plan", "--model", "gpt-tiny", "--memory", "0"], "memory budget must be positive"),
    (["plan", "--model", "gpt-tiny", "--memory", "lots"], "is not a size"),
    (["plan", "--model", "gpt-tiny", "--mesh", "8x8", "--nodes", "1", "--cluster", "h100-sxm"],
     "cannot hold a mesh of 64; use --nodes 8"),
    (["plan", "--model", "gpt-tiny", "--mesh", "8xfour"], "is not of the form 8x8"),
    (["show", "/nonexistent/plan.json"], "does not exist"),
], ids=["unknown-model", "unknown-cluster", "memory-0", "memory-not-a-size", "mesh-exceeds-nodes", "bad-mesh",
        "missing-plan"])
def test_user_errors_exit_1_with_one_line(capsys, argv, expected):
    assert expected in _error_line(capsys, argv)


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_infeasible_memory_names_smallest_feasible(capsys, tmp_path):
    out = tmp_path / "plan.json"
    line = _error_line(capsys, ["plan", *TINY, "--memory", "1KiB", "--out", str(out)])
    assert "smallest feasible" in line and "1.00 KiB" in line
    assert not out.exists()


def test_show_rejects_malformed_json(capsys, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 1, "mesh": ')
    assert "is not valid JSON" in _error_line(capsys, ["show", str(bad)])


def test_show_rejects_unknown_plan_version(capsys, tmp_path, tiny_plan):
    data = json.loads(tiny_plan[0].read_text())
    data["version"] = 99
    path = tmp_path / "v99.json"
    path.write_text(json.dumps(data))
    line = _error_line(capsys, ["show", str(path)])
    assert "unknown plan version 99" in line and "plan.version" in line


def test_show_names_the_bad_field(capsys, tmp_path, tiny_plan):
    data = json.loads(tiny_plan[0].read_text())
    data["param_placements"]["wte.weight"] = ["S(0)", "Q"]
    path = tmp_path / "badfield.json"
    path.write_text(json.dumps(data))
    assert "plan.param_placements['wte.weight']" in _error_line(capsys, ["show", str(path)])


@pytest.mark.parametrize("argv", [[], ["plan"], ["plan", "--model", "gpt-tiny", "--backend", "gurobi"], ["frobnicate"]])
def test_bad_usage_exits_2(capsys, argv):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    assert "usage: autopar" in capsys.readouterr().err


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("autopar")
    script = str(exe) if exe.exists() else shutil.which("autopar")
    assert script, "the `autopar` console script is not installed: pip install -e ."
    res = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "usage: autopar" in res.stdout and "{plan,show" in res.stdout
    assert "Exit codes: 0 ok, 1 autopar error" in res.stdout


# --- profile, predict, show --explain (issue 5) ------------------------------------------------------
GPT_ARGS = ["predict", "--layers", "8", "--hidden", "1024", "--heads", "16", "--seq", "512", "--vocab", "32000",
            "--global-batch", "64", "--micro-batch", "2"]


def test_predict_json_has_time_memory_and_breakdowns(capsys):
    assert main([*GPT_ARGS, "--tp", "4", "--dp", "2", "--cluster", "a100-80g-sxm", "--nodes", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step_time_s"] == pytest.approx(sum(out["breakdown"]["time"].values()))
    assert out["peak_memory_bytes"] == sum(out["breakdown"]["memory"].values())
    assert set(out["breakdown"]["time"]) >= {"compute_s", "comm_s", "recompute_s", "bubble_s"}
    assert set(out["breakdown"]["memory"]) == {"params", "grads", "optimizer", "activations"}
    assert out["mesh"] == {"dp": 2, "tp": 4} and out["communication"]["tp_all_reduce"]["count"] == 4 * 8 * 16


def test_predict_prints_a_summary(capsys):
    assert main([*GPT_ARGS, "--pp", "2", "--recompute", "selective", "--gpus", "2"]) == 0
    out = capsys.readouterr().out
    assert "predicted iteration time" in out and "bubble" in out and "pp_send_recv" in out


@pytest.mark.parametrize("argv, expected", [
    ([*GPT_ARGS, "--tp", "3"], "--tp 3 does not divide --heads 16"),
    ([*GPT_ARGS, "--tp", "8", "--nodes", "2"], "= 8 GPUs, but the cluster has 16"),
    ([*GPT_ARGS, "--dp", "3"], "--global-batch 64 is not a multiple of micro-batch x dp"),
    (["profile", "--nproc", "1"], "needs at least 2 ranks"),
    (["profile", "--nproc", "2", "--mesh", "2x2"], "needs 4 ranks but the process group has 2"),
    (["profile", "--min-bytes", "1MiB", "--max-bytes", "4KiB"], "min bytes < max bytes"),
], ids=["tp-heads", "gpus", "batch", "nproc-1", "mesh-vs-nproc", "sizes"])
def test_profile_and_predict_errors_exit_1(capsys, argv, expected):
    assert expected in _error_line(capsys, argv)


def test_profile_spawns_ranks_and_writes_a_loadable_profile(tmp_path, capsys):
    from autopar.cluster.profile import load_cluster

    out = tmp_path / "cluster.json"
    assert main(["profile", "--nproc", "2", "--quick", "--max-bytes", "1MiB", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert f"wrote {out}" in captured.err
    prof = load_cluster(str(out))
    assert prof.mesh_shape == (2,) and "all_reduce" in captured.out and "sync per call" in captured.out
    assert len(json.loads(out.read_text())["measurements"]["links"]["dp"]["all_reduce"]["seconds"]) == 3


def test_show_explain_lists_chosen_and_alternatives(tiny_plan, capsys):
    path, _ = tiny_plan
    plan = Plan.from_json(path)
    assert main(["show", str(path), "--explain", "--model", "gpt-tiny"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("plan v1  mesh dp=2 x tp=2")
    lines = out.splitlines()
    row = next(i for i, ln in enumerate(lines) if ln.startswith("param:blocks.*.mlp.fc.weight "))
    chosen = " -> " + "·".join(plan.param_placements["blocks.0.mlp.fc.weight"])
    assert "chosen" in lines[row] and chosen in lines[row]
    assert "alt 1" in lines[row + 1] and "alt 2" in lines[row + 2] and "+" in lines[row + 1]
    assert {"wte", "blocks.*", "lm_head"} <= {ln for ln in lines if ln and " " not in ln}


def test_show_explain_errors(tiny_plan, capsys):
    path, _ = tiny_plan
    assert "give --model" in _error_line(capsys, ["show", str(path), "--explain"])
    assert "not the model the plan was made for" in _error_line(
        capsys, ["show", str(path), "--explain", "--model", "llama-tiny"])


def test_fused_plan_show_and_emit(tmp_path, capsys):
    """``plan --fuse`` lists the fused kernels (cpu-gloo plans unfused by default), ``show`` prints them,
    ``emit --fuse`` writes them as autopar.runtime_kernels calls; without --fuse emit has none."""
    small = ["--model", "llama-tiny", "--batch", "2", "--seq", "8", "--mesh", "2", "--cluster", "cpu-gloo"]
    assert main(["plan", *small, "--out", str(tmp_path / "plain.json")]) == 0
    assert Plan.from_json(tmp_path / "plain.json").fusions == ()
    path = tmp_path / "fused.json"
    assert main(["plan", *small, "--fuse", "--out", str(path)]) == 0
    plan = Plan.from_json(path)
    assert {f.kind for f in plan.fusions} == {"rms_norm", "add_norm", "rotary", "swiglu", "cross_entropy"}
    capsys.readouterr()
    assert main(["show", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    head = next(i for i, ln in enumerate(out) if ln.startswith("fused kernels"))
    assert out[head + 1].split() == ["root", "kernel", "ops", "count", "saved"]
    assert out[head + 3 + [f.root for f in plan.fusions].index("blocks.*/mlp/mul#0")].split()[:4] == \
        ["blocks.*/mlp/mul#0", "swiglu", "2", "2"]
    assert main(["emit", str(path), "--model", "llama-tiny", "--fuse"]) == 0
    src = capsys.readouterr().out
    compile(src, "fused.py", "exec")
    assert src.count(" = autopar.runtime_kernels.swiglu(") == 2 and src.count(" = autopar.runtime_kernels.rotary(") == 4
    assert "# Fused kernels (fuse_kernels pass): rms_norm x1, rotary x4, add_norm x4, swiglu x2, cross_entropy x1;" in src
    assert main(["emit", str(path), "--model", "llama-tiny"]) == 0
    assert "runtime_kernels" not in capsys.readouterr().out


def test_plan_on_a_pp_mesh_plans_pipeline_stages(capsys, tmp_path):
    """`autopar plan` goes through autopar.plan: a mesh dim named pp is laid out as pipeline stages, and the
    pipeline flags fix their choices (the CLI used to treat pp as an ordinary dim)."""
    out = tmp_path / "pp.json"
    argv = ["plan", "--model", "gpt-tiny", "--batch", "8", "--seq", "16", "--mesh", "2x2", "--mesh-names", "pp,dp",
            "--cluster", "cpu-gloo", "--schedule", "1f1b", "--microbatches", "2", "--out", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "pipeline over pp: 2 stages, schedule 1f1b, 2 micro-batches" in text
    plan = autopar.Plan.from_json(out)
    assert plan.pipeline["schedule"] == "1f1b" and len(plan.pipeline["stages"]) == 2
    assert "--no-pipeline contradicts" in _error_line(capsys, [*argv[:-2], "--no-pipeline", "--out", str(out)])
    assert "zero=1 is not supported with pipeline stages" in _error_line(capsys, [*argv, "--zero", "1"])


def test_plan_takes_fix_and_precision_flags(capsys, tmp_path):
    out = tmp_path / "p.json"
    assert main(["plan", *TINY, "--fix", "input:*=S(0),R", "--fix", "param:*=R R", "--precision", "bf16",
                 "--out", str(out)]) == 0
    plan = autopar.Plan.from_json(out)
    assert all(pl == ("R", "R") for pl in plan.param_placements.values())
    assert plan.precision["compute_dtype"] == "bfloat16"
    assert "write PATTERN=PLACEMENTS" in _error_line(capsys, ["plan", *TINY, "--fix", "input:*"])
