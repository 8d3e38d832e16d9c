"""Figures and outputs in the docs come from their sources: benchmarks/README.md's table from the result
files (benchmarks/report.py), README.md's pasted command outputs from running the commands
(docs/readme_outputs.py). Both scripts' ``--check`` modes are run here."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_figures_are_generated_from_the_result_files():
    report = _load(ROOT / "benchmarks" / "report.py")
    assert report.main(["--check"]) == 0, "run `python benchmarks/report.py`"
    table = report.table()
    assert table.count("\n") >= 8 and "memory_fidelity" in table   # every result file gave its rows


def test_the_figures_check_catches_an_edited_figure(tmp_path, monkeypatch):
    report = _load(ROOT / "benchmarks" / "report.py")
    edited = report.README.read_text().replace("0 mismatches |", "1 mismatches |", 1)
    assert edited != report.README.read_text()
    fake = tmp_path / "README.md"
    fake.write_text(edited)
    monkeypatch.setattr(report, "README", fake)
    assert report.main(["--check"]) == 1


def test_every_readme_output_block_names_an_autopar_command():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- output: ([^\n]*?) -->\n```\n\$ ([^\n]*)\n", text)
    assert len(blocks) >= 4
    for marker, shown in blocks:
        assert marker == shown and marker.startswith("autopar ")


@pytest.mark.slow
def test_readme_outputs_are_what_the_commands_print():
    outputs = _load(ROOT / "docs" / "readme_outputs.py")
    assert outputs.main(["--check"]) == 0, "run `python docs/readme_outputs.py`"
