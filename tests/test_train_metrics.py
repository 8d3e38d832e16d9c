"""autopar.train's metrics: the host memory figure on CPU, and TensorBoard scalars equal to the JSONL records.

* ``host_peak_rss_bytes`` (the process's resident-set high-water mark) is a positive int and grows by about the
  size of a tensor the process then fills (its peak so far + 256 MiB, in a fresh interpreter so earlier tests'
  peaks do not hide it).
* In one process the per-rank lists hold one entry; ``peak_memory_bytes`` (CUDA allocator) is null on CPU.
* With ``logging.tensorboard_dir`` the event file holds, for every record of the JSONL file, every number of it as
  ``train/<key>`` at its step (float32 in the event file: compared at rel 1e-6), and nothing else.
* Without the tensorboard package the JSONL file alone is written and the log says so once.
"""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from autopar.train import load_train_config, train
from autopar.train.metrics import host_peak_rss_bytes, memory_per_rank


def _job(tmp_path, **logging_keys) -> dict:
    return {"model": {"source": "llama-tiny"}, "data": {"seq_len": 16, "num_sequences": 32},
            "training": {"steps": 3, "global_batch": 4, "grad_accum": 2},
            "logging": {"progress": False, "metrics_file": str(tmp_path / "m.jsonl"), **logging_keys}}


def test_host_peak_rss_is_positive_and_grows_with_a_big_tensor():
    # the tensor is larger than the peak so far (imports may have peaked above the resident set): filling it
    # takes the resident set to at least that peak + 256 MiB
    code = ("import torch\nfrom autopar.train.metrics import host_peak_rss_bytes as f\n"
            "a = f()\nt = torch.ones(a // 4 + 64 * 2**20)\nb = f()\nprint(a, b, type(a).__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    a, b, kind = out.stdout.split()
    assert kind == "int" and int(a) > 0
    assert int(b) - int(a) >= 200 * 2**20, f"peak + 256 MiB filled: the peak grew by {int(b) - int(a)} bytes only"


def test_memory_per_rank_in_one_process():
    m = memory_per_rank(torch.device("cpu"))
    assert m["peak_memory_bytes"] is None and m["peak_memory_bytes_per_rank"] is None
    assert isinstance(m["host_peak_rss_bytes"], int) and m["host_peak_rss_bytes"] > 0
    assert m["host_peak_rss_bytes_per_rank"] == [m["host_peak_rss_bytes"]]
    assert host_peak_rss_bytes() >= m["host_peak_rss_bytes"]       # a high-water mark never falls


def test_tensorboard_scalars_equal_the_jsonl_records(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(load_train_config(_job(tmp_path, tensorboard_dir=str(tmp_path / "tb"))))
    records = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    numbers = {k for r in records for k, v in r.items()
               if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
    assert {"train/loss", "train/lr", "train/grad_norm", "train/host_peak_rss_bytes"} <= {f"train/{k}" for k in numbers}
    assert set(acc.Tags()["scalars"]) == {f"train/{k}" for k in numbers}
    for key in numbers:
        events = {e.step: e.value for e in acc.Scalars(f"train/{key}")}
        assert events == {r["step"]: pytest.approx(r[key], rel=1e-6) for r in records}, key


def test_without_tensorboard_only_the_jsonl_file(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)     # import fails as when not installed
    with caplog.at_level(logging.WARNING, logger="autopar.train.metrics"):
        train(load_train_config(_job(tmp_path, tensorboard_dir=str(tmp_path / "tb"))))
    said = [r for r in caplog.records if "tensorboard" in r.getMessage()]
    assert len(said) == 1 and "only the JSONL metrics file" in said[0].getMessage()
    assert not (tmp_path / "tb").exists()
    assert len((tmp_path / "m.jsonl").read_text().splitlines()) == 3
