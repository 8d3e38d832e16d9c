"""The command outputs pasted in README.md, produced by running the commands.

A block in README.md written as

    <!-- output: autopar plan --model gpt-tiny --mesh 2 -->
    ```
    ...
    ```

is filled with ``$ <command>`` and what the command prints on stdout (run in-process through
``autopar.tools.cli.main`` in a temporary directory, so files it writes do not land in the checkout).
``python docs/readme_outputs.py`` rewrites every such block; ``--check`` exits 1 when a block is not
what its command prints now (solver and phase timings, which vary from run to run, are masked in the
comparison). tests/test_docs.py runs the check, so a pasted output cannot go stale.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import sys
import tempfile
from pathlib import Path

from autopar.tools.cli import main as cli_main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"<!-- output: (?P<cmd>[^\n]*?) -->\n```\n(?P<body>.*?)```\n", re.S)
# timings that differ between runs of the same command: "capture 1.96s", "solve 3.65s"
TIMING = re.compile(r"\b(\w+) \d+(\.\d+)?s\b")


def run(cmd: str) -> str:
    argv = shlex.split(cmd)
    if argv[0] != "autopar":
        raise SystemExit(f"README output blocks run autopar commands only, got {cmd!r}")
    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = cli_main(argv[1:])
        finally:
            os.chdir(cwd)
    if rc != 0:
        raise SystemExit(f"{cmd!r} exited {rc}: {err.getvalue()[-2000:]}")
    return out.getvalue()


def render(text: str, only: str | None = None) -> str:
    def fill(m: re.Match) -> str:
        cmd = m.group("cmd")
        if only and only not in cmd:
            return m.group(0)
        print(f"running: {cmd}", file=sys.stderr, flush=True)
        return f"<!-- output: {cmd} -->\n```\n$ {cmd}\n{run(cmd)}```\n"
    return BLOCK.sub(fill, text)


def masked(text: str) -> str:
    return TIMING.sub(r"\1 <t>s", text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a pasted output is not what its command prints")
    ap.add_argument("--only", default=None, help="only the blocks whose command contains this text")
    args = ap.parse_args(argv)
    text = README.read_text()
    if not BLOCK.search(text):
        raise SystemExit("README.md has no <!-- output: ... --> blocks")
    new = render(text, args.only)
    if args.check:
        if masked(new) != masked(text):
            import difflib
            diff = difflib.unified_diff(masked(text).splitlines(True), masked(new).splitlines(True), "README.md",
                                        "generated", n=1)
            print("".join(diff)[:6000], file=sys.stderr)
            print("README.md outputs are stale: run `python docs/readme_outputs.py`", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
