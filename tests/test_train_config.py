"""autopar.train.config: typed TOML job files, --set overrides, and ConfigErrors that name key, file and line."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

import autopar.train.config as config_module
from autopar import ConfigError
from autopar.tools.cli import main as cli_main
from autopar.train.config import SECTIONS, TrainConfig, load_train_config, mesh_for, resolve_batch


def write(tmp_path, text: str):
    p = tmp_path / "job.toml"
    p.write_text(text)
    return p


def test_defaults_documented_and_loaded(tmp_path):
    cfg = load_train_config(write(tmp_path, "[training]\nsteps = 7\n[parallel]\nmesh = [2, 2]\n"))
    assert cfg.training.steps == 7 and cfg.parallel.mesh == [2, 2]
    assert cfg.optimizer == TrainConfig().optimizer and cfg.base_dir == str(tmp_path)
    text = Path(config_module.__file__).read_text()
    for name, cls in SECTIONS.items():       # every key has a default and a docstring, in one file
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name
            if name != "distributed":
                assert f'    {f.name}: ' in text and '"""' in text.split(f'    {f.name}: ', 1)[1].split("\n", 2)[1], \
                    f"{name}.{f.name} has no docstring"


def test_set_overrides_parse_toml_values(tmp_path):
    p = write(tmp_path, "[training]\nsteps = 7\n")
    cfg = load_train_config(p, ["training.steps=3", "parallel.mesh=[2,2]", "optimizer.lr=1e-3",
                                "checkpoint.resume=false", "model.source=gpt-tiny"])
    assert (cfg.training.steps, cfg.parallel.mesh, cfg.optimizer.lr, cfg.checkpoint.resume, cfg.model.source) == \
        (3, [2, 2], 1e-3, False, "gpt-tiny")


@pytest.mark.parametrize("text, sets, expect", [
    ("[training]\nsteps = 2\nglobal_bach = 8\n", [], (r"job\.toml:3: unknown key 'training\.global_bach' "
                                                    r"\(did you mean 'global_batch'\?\)")),
    ("[model]\nsource = 'llama-tiny'\n\n[trainig]\nsteps = 2\n", [], (r"job\.toml:4: unknown section \[trainig\] "
                                                                      r"\(did you mean 'training'\?\)")),
    ("[optimizer]\n# peak\nlr = 'fast'\n", [], r"job\.toml:3: optimizer\.lr = 'fast' is a str, expected float"),
    ("[training]\nsteps = 2.5\n", [], r"job\.toml:2: training\.steps = 2\.5 is a float, expected int"),
    ("[training]\nsteps = 2\n", ["training.steps=two"], r"--set training\.steps=two: .* is a str, expected int"),
    ("[training]\nsteps = 2\n", ["training.stepz=2"], r"unknown key 'training\.stepz' \(did you mean 'steps'\?\)"),
    ("[schedule]\ndecay = 'cosin'\n", [], (r"job\.toml:2: schedule\.decay = 'cosin' is not one of .*did you mean "
                                          r"'cosine'")),
    ("[training]\nsteps = 0\n", [], r"job\.toml:2: training\.steps must be positive"),
    ("[data]\nkind = 'text'\npaths = ['missing.txt']\n", [], (r"job\.toml:3: data\.paths: .*missing\.txt' does not "
                                                             r"exist")),
    ("[model]\nsource = './no/such/dir'\n", [], r"job\.toml:2: model\.source .* does not exist"),
    ("[parallel]\npipeline_schedule = '1fb1'\n", [], (r"job\.toml:2: parallel\.pipeline_schedule = '1fb1' is not "
                                                     r"one of .*did you mean '1f1b'")),
    ("[parallel]\npipeline = 'yes'\n", [], r"job\.toml:2: parallel\.pipeline = 'yes' is not one of"),
])
def test_bad_configs_name_key_file_and_line(tmp_path, text, sets, expect):
    with pytest.raises(ConfigError, match=expect):
        load_train_config(write(tmp_path, text), sets)


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config file 'nope/job\.toml' does not exist"):
        load_train_config("nope/job.toml")


def test_inconsistent_batch_sizes_and_mesh_size(tmp_path):
    cfg = load_train_config(write(tmp_path, "[training]\nsteps = 2\nglobal_batch = 16\nmicro_batch = 2\n"
                                            "grad_accum = 3\n[parallel]\nmesh = [2, 2]\n"))
    with pytest.raises(ConfigError, match=r"job\.toml:3: inconsistent batch sizes: training\.global_batch = 16 but "
                                          r"micro_batch 2 x 2 dp ranks x grad_accum 3 = 12"):
        resolve_batch(cfg, 2)
    with pytest.raises(ConfigError, match=r"job\.toml:7: parallel\.mesh = \[2, 2\] has 4 positions but the job runs "
                                          r"on 2 ranks"):
        mesh_for(cfg, 2)
    assert mesh_for(cfg, 4) == ((2, 2), ("dp", "tp"))
    ok = load_train_config({"training": {"global_batch": 16, "grad_accum": 4}})
    b = resolve_batch(ok, 2)
    assert (b.micro_batch, b.grad_accum, b.dp) == (2, 4, 2)
    tok = load_train_config({"training": {"global_batch_tokens": 256}, "data": {"seq_len": 32}})
    assert resolve_batch(tok, 1).global_batch == 8
    with pytest.raises(ConfigError, match="not a multiple of data.seq_len"):
        load_train_config({"training": {"global_batch_tokens": 100}, "data": {"seq_len": 32}})


def test_cli_reports_config_errors(tmp_path, capsys):
    p = write(tmp_path, "[training]\nsteps = 2\n")
    assert cli_main(["train", "--config", str(p), "--set", "parallel.mesh=[2,2]"]) == 1
    assert "parallel.mesh = [2, 2] has 4 positions but the job runs on 1 ranks" in capsys.readouterr().err
