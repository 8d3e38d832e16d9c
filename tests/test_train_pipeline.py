"""``autopar train`` with pipelined plans (a mesh dim named ``pp``), against the same job in one process.

* pp=2 (``dist2``, 1F1B, 4 micro-batches) and pp=2 x dp=2 (``dist4``, GPipe, 2 micro-batches), llama-tiny, 3 steps
  with clipping active: the losses of every step, every gradient of the first step (before clipping) and every
  parameter after the last step equal one process's (fp32, rtol 1e-4 / atol 1e-5: the same sums in another order
  may differ in the last bits; parameters on pp x dp within atol 1e-4, reason at the test), on every rank (the loss
  is broadcast from the last stage); the logged gradient norm (global over pp) equals one process's.
* The data-parallel gradient sums of a pp x dp step are the runtime's once-per-step reduction: counted all-reduce
  calls on the dp group per step equal ``StepReducer.calls()`` plus the loss's per-micro-batch traffic, the same for
  2 and 4 micro-batches per step.
* Checkpoints of a pipelined module (``autopar.save`` / ``load`` underneath: each rank its stages, the optimizer's
  param groups keyed by FQN) resume the same curve bit for bit, applying the first run's plan file; a pipelined
  plan file whose micro-batches are not the job's accumulation is a ConfigError.
* An HF LLaMA directory on pp=2: weights loaded into the stages, trained, exported (one safetensors file per pp
  rank plus the index) and reloaded in plain transformers equal what one process trains.
* ``parallel.pipeline = true`` without a ``pp`` dim, and an unknown schedule, are ConfigErrors.
"""
from __future__ import annotations

import pytest
import torch
from test_train_loop import _close, job, run_job

import autopar
from autopar.core.errors import ConfigError
from autopar.train import load_train_config, train

RTOL, ATOL = 1e-4, 1e-5


def _pp(cfg: dict, mesh: list[int], names: list[str], **parallel) -> dict:
    return {**cfg, "parallel": {"mesh": mesh, "dim_names": names, **parallel}}


def train_pipelined(rank, world, cfg: dict):
    """This rank's losses, logged records, first-step gradients and final parameters (full tensors, its stages)."""
    r = run_job(cfg, parallelize=autopar.parallelize, apply=autopar.apply)
    pm = r.module
    full = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in pm.named_parameters()}
    return {"losses": r.losses, "records": r.records, "grads": r.first_grads, "params": full,
            "pipelined": type(pm).__name__ == "PipelineModule",
            "pipeline": {k: v for k, v in pm.plan.pipeline.items() if k != "stages"} if pm.plan.pipeline else None,
            "stages": sorted(getattr(pm, "stage_modules", {}))}


def _check_against_one_process(par: list[dict], single, steps: int, param_atol: float = ATOL) -> None:
    seen_grads: set[str] = set()
    for rank, res in enumerate(par):
        assert res["pipelined"], f"rank {rank}: not a pipelined module"
        assert res["losses"] == par[0]["losses"], "every rank reports the same loss (broadcast from the last stage)"
        bad = _close(res["losses"], single.losses)
        assert len(res["losses"]) == steps and not bad, f"rank {rank}: (step, pipelined, one process): {bad}"
        for n, g in res["grads"].items():
            torch.testing.assert_close(g, single.first_grads[n], rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
        for n, p in res["params"].items():
            want = dict(single.module.named_parameters())[n].detach()
            torch.testing.assert_close(p, want, rtol=RTOL, atol=param_atol, msg=lambda m, n=n: f"param {n}: {m}")
        seen_grads |= set(res["grads"])
        for rec in res["records"]:   # every rank's memory figure (a collective at each logged step)
            per = rec["host_peak_rss_bytes_per_rank"]
            assert len(per) == len(par) and all(v > 0 for v in per) and rec["host_peak_rss_bytes"] == max(per)
        norms = [r["grad_norm"] for r in res["records"]]
        want_norms = [r["grad_norm"] for r in single.records]
        assert norms == pytest.approx(want_norms, rel=RTOL), "the gradient norm is global over the pipeline"
    assert seen_grads == set(single.first_grads), "the stages together hold every parameter"


@pytest.mark.slow   # the quick loop (-m "not slow") stays under 5 minutes; CI runs it
def test_pp2_matches_one_process(dist2):
    # 8 sequences in 4 micro-batches; lr high and clip 0.5 so clipping acts (the norm is > 0.5 at every step)
    cfg = job(training__steps=3, training__global_batch=8, training__grad_accum=4, optimizer__clip_grad_norm=0.5)
    single = run_job(cfg)
    assert all(r["grad_norm"] > 0.5 for r in single.records), "clipping must be active for the norm to matter"
    par = dist2.run(train_pipelined, _pp(cfg, [2], ["pp"], pipeline_schedule="1f1b"), timeout=300)
    assert par[0]["pipeline"]["microbatches"] == 4 and par[0]["pipeline"]["schedule"] == "1f1b"
    assert par[0]["stages"] == [0] and par[1]["stages"] == [1]
    _check_against_one_process(par, single, 3)


@pytest.mark.slow   # CI runs it; the quick loop stays under 5 minutes
def test_pp2_dp2_matches_one_process(dist4, tmp_path):
    # stage plans that split each micro-batch over dp (a fast-network profile), so dp gradients are summed
    cfg = job(training__steps=3, training__global_batch=16, training__grad_accum=2, optimizer__clip_grad_norm=0.5)
    single = run_job(cfg)
    par = dist4.run(train_pipelined, _pp(cfg, [2, 2], ["pp", "dp"], pipeline_schedule="gpipe",
                                         cluster=fast_net_cluster(tmp_path / "fast.json")), timeout=300)
    assert par[0]["pipeline"]["microbatches"] == 2 and par[0]["pipeline"]["schedule"] == "gpipe"
    # parameters after 3 AdamW steps within atol 1e-4: AdamW moves each element by up to lr (2e-3) in the direction of
    # g / (sqrt(v) + eps), so an element whose gradient is ~0 moves by an amount set by fp32 summation order, which
    # dp changes (measured: 1.1e-5 in one element of 4096 of one matrix; losses, norms and gradients agree to 1e-7)
    _check_against_one_process(par, single, 3, param_atol=1e-4)


def fast_net_cluster(path) -> str:
    """cpu-gloo with a fast network (tests/pipeline_check.py): the stage plans split the batch over dp, so the
    gradients are summed over dp (with cpu-gloo's slow links this tiny model is replicated and nothing is summed)."""
    from pipeline_check import fast_net_profile
    fast_net_profile().to_json(path)
    return str(path)


def count_dp_all_reduces(rank, world, cfg: dict) -> dict:
    """All-reduce calls (and elements) on the dp group during the second step of a pp x dp job (forward, backward
    and gradient sums, up to the gradient norm), and the calls / elements the stages' StepReducer makes per step."""
    import torch.distributed as dist

    from autopar.train import loop as loop_mod
    calls: list[tuple[object, int]] = []
    on = [False]
    real_ar, real_norm, real_next = dist.all_reduce, loop_mod._grad_norm, loop_mod.Loader.next_step

    def all_reduce(t, *args, **kwargs):
        if on[0]:
            calls.append((kwargs.get("group"), t.numel()))
        return real_ar(t, *args, **kwargs)

    def grad_norm_spy(module, max_norm):
        on[0] = False
        return real_norm(module, max_norm)

    def next_step_spy(self):
        out = real_next(self)
        on[0] = self.step == 2
        return out

    dist.all_reduce, loop_mod._grad_norm, loop_mod.Loader.next_step = all_reduce, grad_norm_spy, next_step_spy
    try:
        r = train(load_train_config(cfg), parallelize=autopar.parallelize, apply=autopar.apply)
    finally:
        dist.all_reduce, loop_mod._grad_norm, loop_mod.Loader.next_step = real_ar, real_norm, real_next
    pm = r.module
    dp_group = pm.mesh.get_group("dp")
    mine = [n for g, n in calls if g is dp_group]
    reduced = [mod._leaf(f) for mod, _, buckets in pm.reducer.stages for fqns, _ in buckets for f in fqns]
    return {"calls": len(mine), "elements": sum(mine), "reducer_calls": pm.reducer.calls(),
            "reducer_elements": sum(t.numel() for t in reduced), "microbatches": pm.microbatches,
            "stage_plans": [r["plan"]["node_shardings"] for r in pm.plan.pipeline["stages"]]}


@pytest.mark.slow   # CI runs it; the quick loop stays under 5 minutes
def test_pp_dp_gradients_summed_once_per_step(dist4, tmp_path):
    # the same micro-batch (4 sequences: 2 per dp rank) in 2 or 4 micro-batches per step: the same stage plans;
    # the dp all-reduces of a step are A + B m, and A (once per step) is the stages' StepReducer alone
    cluster = fast_net_cluster(tmp_path / "fast.json")
    res = {}
    for m in (2, 4):
        cfg = _pp(job(training__steps=2, training__global_batch=4 * m, training__grad_accum=m), [2, 2], ["pp", "dp"],
                  pipeline_schedule="1f1b", cluster=cluster)
        res[m] = dist4.run(count_dp_all_reduces, cfg, timeout=300)
    for rank in range(4):
        r2, r4 = res[2][rank], res[4][rank]
        assert (r2["microbatches"], r4["microbatches"]) == (2, 4)
        assert r2["stage_plans"] == r4["stage_plans"], "only the number of micro-batches differs"
        assert r2["reducer_calls"] > 0 and r2["reducer_calls"] == r4["reducer_calls"], (rank, r2, r4)
        per_mb = (r4["calls"] - r2["calls"]) / 2
        assert r2["calls"] - 2 * per_mb == r2["reducer_calls"], (rank, r2, r4)
        per_mb_elems = (r4["elements"] - r2["elements"]) / 2
        assert r2["elements"] - 2 * per_mb_elems == r2["reducer_elements"], (rank, r2, r4)
        # what runs per micro-batch is the loss's traffic (2 elements on the last stage here), nothing gradient-sized
        assert per_mb_elems < r2["reducer_elements"] / 100, (rank, r2, r4)


def test_pipeline_config_errors():
    with pytest.raises(ConfigError, match="parallel.pipeline = true needs a mesh dim named 'pp'"):
        train(load_train_config(job(parallel__pipeline=True, parallel__mesh=[1])))
    with pytest.raises(ConfigError, match="parallel.pipeline_schedule"):
        load_train_config(job(parallel__pipeline_schedule="zigzag"))


@pytest.mark.slow   # CI runs it; the quick loop stays under 5 minutes
def test_pipelined_checkpoints_resume_the_same_curve(dist2, tmp_path):
    # autopar.save / load of a PipelineModule (each rank saves and loads its own stages' parameters and optimizer
    # states): a run resumed from step 2 redoes steps 3 and 4 exactly, data position included
    # (the resumed run applies the first run's plan file: a pipelined plan is applied without planning)
    ck, plan = tmp_path / "ck", str(tmp_path / "plan.json")
    base = job(str(ck), training__steps=4, training__global_batch=8, training__grad_accum=2, checkpoint__interval=2)
    full = dist2.run(train_pipelined, _pp(base, [2], ["pp"], plan_out=plan), timeout=300)
    assert (ck / "latest").read_text() == "step_00000004"
    (ck / "latest").write_text("step_00000002")
    resumed = dist2.run(train_pipelined, _pp(base, [2], ["pp"], plan_file=plan), timeout=300)
    for rank in range(2):
        assert resumed[rank]["losses"] == {3: full[0]["losses"][3], 4: full[0]["losses"][4]}, (rank, resumed, full)
        for n, p in resumed[rank]["params"].items():
            assert torch.equal(p, full[rank]["params"][n]), n
    # the plan's micro-batches are the job's accumulation: another grad_accum is refused, naming both
    with pytest.raises(ConfigError, match=r"in 2 micro-batches but the job has .* training.grad_accum = 4"):
        dist2.run(train_pipelined, _pp({**base, "training": {"steps": 4, "global_batch": 8, "grad_accum": 4}},
                                       [2], ["pp"], plan_file=plan), timeout=300)


def hf_pipelined(rank, world, cfg: dict, out_dir: str) -> dict:
    import transformers

    from autopar.train.hf_io import export_hf
    r = train(load_train_config(cfg), parallelize=autopar.parallelize, apply=autopar.apply)
    export_hf(r.module, out_dir, transformers.AutoConfig.from_pretrained(cfg["model"]["source"]))
    return {"losses": r.losses, "names": [n for n, _ in r.module.named_parameters()]}


@pytest.mark.slow   # CI runs it; the quick loop stays under 5 minutes
def test_hf_llama_pipelined_loads_trains_and_exports(dist2, tmp_path):
    # HF weights into the stages (each pp rank reads its stages' tensors), 2 steps of 2 micro-batches, export as one
    # safetensors file per pp rank plus an index, reload in plain transformers: the parameters one process trains
    transformers = pytest.importorskip("transformers")
    from test_train_hf import tiny_llama
    tiny_llama(tmp_path / "src")
    cfg = {"model": {"source": str(tmp_path / "src")}, "data": {"seq_len": 16, "num_sequences": 32},
           "training": {"steps": 2, "global_batch": 4, "grad_accum": 2}, "optimizer": {"lr": 1e-2},
           "logging": {"progress": False}}
    single = train(load_train_config(cfg))
    res = dist2.run(hf_pipelined, {**cfg, "parallel": {"mesh": [2], "dim_names": ["pp"]}}, str(tmp_path / "out"),
                    timeout=300)
    assert res[0]["losses"] == res[1]["losses"] and not _close(res[0]["losses"], single.losses)
    assert not set(res[0]["names"]) & set(res[1]["names"]), "each pp rank holds its own stage's parameters"
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    want = dict(single.module.named_parameters())
    got = dict(reloaded.named_parameters())
    assert set(got) == set(want)
    for n, p in got.items():
        torch.testing.assert_close(p, want[n].detach(), rtol=RTOL, atol=ATOL, msg=lambda m, n=n: f"{n}: {m}")
