"""Helpers shared by the inference tests."""
from __future__ import annotations


def record_steps(engine) -> list:
    """Every step's logits, as the engine's runner returns them (the runner's ``execute`` wrapped in place)."""
    steps, execute = [], engine.runner.execute

    def run(*a):
        out = execute(*a)
        steps.append(out.clone())
        return out
    engine.runner.execute = run
    return steps
