"""``pip install .`` (not editable) gives a working product: the wheel built from this checkout, unpacked
alone on sys.path and run from a directory outside the checkout, plans a built-in model from the CLI
(the built-in models ship inside the package) and finds its plan schema; the wheel declares what the
code needs (Python >= 3.11 for tomllib) and nothing it does not use."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True, timeout=300)
    (whl,) = out.glob("autopar-*.whl")
    return whl


@pytest.mark.slow
def test_the_wheel_alone_runs_the_cli(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    names = {Path(n).as_posix() for n in zipfile.ZipFile(wheel).namelist()}
    assert {"autopar/models/gpt.py", "autopar/models/llama.py", "autopar/core/plan_schema.json",
            "autopar/solver/ilp.py", "autopar/codegen/emit.py", "autopar/runtime_kernels/rms_norm.py"} <= names
    work = tmp_path / "elsewhere"
    work.mkdir()
    code = ("import sys, autopar; assert autopar.__file__.startswith(sys.argv[1]), autopar.__file__; "
            "from autopar.tools.cli import main; sys.exit(main(sys.argv[2:]))")
    env = {**os.environ, "PYTHONPATH": str(site)}   # before the editable install's finder on sys.path
    res = subprocess.run([sys.executable, "-c", code, str(site), "plan", "--model", "llama-tiny", "--batch", "2",
                          "--seq", "16", "--mesh", "2", "--cluster", "cpu-gloo", "--out", "plan.json"],
                         cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "plan v1" in res.stdout and (work / "plan.json").is_file()
    assert "Running HiGHS" not in res.stdout      # the solver's banner never reaches stdout


def test_declared_dependencies_are_used_and_python_is_true():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in text
    deps = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    for name in ("torch", "pulp", "numpy"):
        assert f'"{name}' in deps
    assert "networkx" not in deps          # nothing imports it
    sources = "".join(p.read_text() for d in ("autopar", "solver", "codegen", "runtime_kernels")
                      for p in (ROOT / d).rglob("*.py"))
    assert "import numpy" in sources and "import pulp" in sources
