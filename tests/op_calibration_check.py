"""Worker functions (module level, run in the gloo pools) for tests/test_op_calibration.py."""
from __future__ import annotations


def calibrate_on_ranks(rank: int, world: int, mesh_shape: tuple[int, ...]) -> dict:
    """Every rank times gpt-tiny's ops at once (autopar.cluster.calibrate.calibrate_ops); the table's JSON form."""
    import torch

    from autopar.cluster.calibrate import OpCalibrationOptions, calibrate_ops
    from autopar.core.capture import capture
    from autopar.models import build_model
    from autopar.cluster.profile import PRESETS

    torch.manual_seed(0)
    model, inputs = build_model("gpt-tiny", batch=2, seq=16, device="cpu")
    table = calibrate_ops(capture(model, inputs), mesh_shape, PRESETS["cpu-gloo"],
                          options=OpCalibrationOptions(trials=2, warmup=1, min_trial_s=2e-4))
    return table.to_dict()
