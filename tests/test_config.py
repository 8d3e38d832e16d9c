"""Config files (TOML / JSON, parsed as data) and init_distributed's process-group timeout."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from autopar.runtime.distributed import Config, DistributedConfig, load_config
from autopar.core.errors import ConfigError


def test_toml_and_json_give_the_same_config(tmp_path):
    (tmp_path / "run.toml").write_text('[distributed]\nbackend = "gloo"\ntimeout_s = 45\nfault_grace_s = 5\n')
    (tmp_path / "run.json").write_text(json.dumps({"distributed": {"backend": "gloo", "timeout_s": 45,
                                                                   "fault_grace_s": 5}}))
    a, b = load_config(tmp_path / "run.toml"), load_config(tmp_path / "run.json")
    assert a == b == Config(distributed=DistributedConfig(backend="gloo", timeout_s=45, fault_grace_s=5))
    assert a.distributed.grace_s == 5
    assert load_config(None).distributed.grace_s == load_config(None).distributed.timeout_s == 600


@pytest.mark.parametrize(("text", "suffix", "message"), [
    ('[distributed]\ntimeout_s = 0\n', "toml", "distributed.timeout_s: expected a positive number of seconds, got 0"),
    ('[distributed]\ntimeout_s = "ten"\n', "toml", "expected a positive number of seconds, got 'ten'"),
    ('[distributed]\nbackend = "mpi"\n', "toml", "distributed.backend: 'mpi' is not one of"),
    ('[distributed]\ntimeout = 5\n', "toml", "unknown key(s) ['distributed.timeout']"),
    ('[trainer]\nsteps = 5\n', "toml", "unknown section(s) ['trainer']"),
    ('[distributed\n', "toml", "is not valid TOML"),
    ('{"distributed": ', "json", "is not valid JSON"),
    ('distributed = 3\n', "toml", "[distributed] must be a table"),
    ('x', "yaml", "expected a .toml or .json file"),
])
def test_bad_config_files_name_the_problem(tmp_path, text, suffix, message):
    path = tmp_path / f"c.{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(path)
    assert message in str(ei.value), str(ei.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_a_config_is_data_never_code(tmp_path):
    """TOML/JSON values are plain data: an expression in a string stays a string and nothing runs."""
    marker = tmp_path / "ran"
    (tmp_path / "c.toml").write_text(f'[distributed]\nbackend = "__import__(\'os\').mkdir(\'{marker}\')"\n')
    with pytest.raises(ConfigError, match="is not one of"):
        load_config(tmp_path / "c.toml")
    assert not marker.exists()


SCRIPT = textwrap.dedent("""
    import datetime, torch.distributed as dist
    from autopar.runtime.distributed import init_distributed
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    print(init_distributed({"distributed": {"timeout_s": 7}}, backend="gloo", rank=0, world_size=1, store=store))
    pg = dist.distributed_c10d._get_default_group()
    import torch
    print(pg._get_backend(torch.device("cpu")).options._timeout.total_seconds())
    from autopar.runtime.faults import _default_grace
    print(_default_grace())
    dist.destroy_process_group()
""")


def test_init_distributed_sets_the_timeout_from_the_config(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["(0,", "1)", "7.0", "7.0"], r.stdout


def test_init_distributed_needs_a_launcher(monkeypatch):
    for v in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    from autopar.runtime.distributed import init_distributed
    with pytest.raises(ConfigError, match="run under torchrun"):
        init_distributed(timeout_s=5)
    with pytest.raises(ConfigError, match="pass rank, world_size and store together"):
        init_distributed(rank=0)
