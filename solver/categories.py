"""The categories of the sharding ILP's terms, and the one table of which memory rows each enters.

Every part of the ILP names a category by its enum member (solver.model re-exports them), never by a
string: a term under a category that does not exist fails instead of silently leaving a memory row.
The cost model's per-strategy memory dicts (cost.param_state_bytes) are read through
``MemCategory.parse``. Imports nothing of autopar's.
"""
from __future__ import annotations

import enum


class TimeCategory(enum.Enum):
    """The objective's terms by kind (kept apart so a plan's predicted time can be explained)."""
    COMPUTE = "compute"       # forward + backward compute of the chosen strategies
    COMM = "comm"             # resharding collectives, ZeRO's all-gathers / reduce-scatters
    RECOMPUTE = "recompute"   # recomputed blocks' forward in backward (solver.remat)
    OFFLOAD = "offload"       # host copies and the CPU optimizer step (solver.offload)


class MemCategory(enum.StrEnum):
    """Per-rank bytes by kind; ``ROWS`` says which memory rows each enters. A str enum because a key's
    per-strategy memory (keys.KeyInfo.memory) is keyed by it and read as a plain dict elsewhere
    (solver.pipeline's unit costs); the model's methods still take members only (TypeError otherwise)."""
    PARAMS = "params"
    OPTIMIZER = "optimizer"
    ACTIVATIONS = "activations"              # kept for backward, outside recompute decisions
    ACTIVATIONS_AFTER = "activations_after"  # kept by ops after the repeated blocks (freed before a recompute)
    BLOCKS = "blocks"                        # kept by repeated blocks under the recompute counts
    BACKWARD_GRAD = "backward_grad"          # the loss's first gradient and its backward collectives
    MODEL_OUTPUTS = "model_outputs"          # the model's outputs as returned (replicated), held by the caller
    GRADS = "grads"
    GRAD_BUCKETS = "grad_buckets"            # the reducer's copy of its last bucket
    RECOMPUTE = "recompute"                  # one block re-materialized in backward, T_g
    RECOMPUTE_HOLD = "recompute_hold"        # H >= kept blocks, H >= gradients
    HOST = "host"                            # offloaded bytes in host memory: in no device row
    LIVE = "forward_live"                    # inference: activations live at the forward's peak (solver.live)
    KV_CACHE = "kv_cache"                    # inference: this rank's part of the declared KV cache

    @classmethod
    def parse(cls, name: str) -> MemCategory:
        """The category of a cost-model dict key (cost.param_state_bytes); KeyError for an unknown one."""
        try:
            return _MEM_BY_NAME[name]
        except KeyError:
            raise KeyError(f"unknown memory category {name!r}; known: {sorted(_MEM_BY_NAME)}") from None


_MEM_BY_NAME = {c.value: c for c in MemCategory}


class MemRow(enum.Enum):
    """The peaks of a training step, one memory row each (ShardingModel.memory_exprs)."""
    BACKWARD = "backward"     # backward start: every kept activation live, no gradient yet
    STEP = "step"             # end of backward / optimizer step: every gradient live, activations freed
    RECOMPUTE = "recompute"   # a recomputed block's backward (only once solver.remat opens it)


# The one table: which rows each category enters. Its order is the order terms are summed in a row.
ROWS: dict[MemCategory, tuple[MemRow, ...]] = {
    MemCategory.PARAMS: (MemRow.BACKWARD, MemRow.STEP, MemRow.RECOMPUTE),
    MemCategory.OPTIMIZER: (MemRow.BACKWARD, MemRow.STEP, MemRow.RECOMPUTE),
    MemCategory.ACTIVATIONS: (MemRow.BACKWARD, MemRow.RECOMPUTE),
    MemCategory.ACTIVATIONS_AFTER: (MemRow.BACKWARD,),
    MemCategory.BLOCKS: (MemRow.BACKWARD,),
    MemCategory.BACKWARD_GRAD: (MemRow.BACKWARD,),
    MemCategory.MODEL_OUTPUTS: (MemRow.BACKWARD,),
    MemCategory.GRADS: (MemRow.STEP,),
    MemCategory.GRAD_BUCKETS: (MemRow.STEP,),
    MemCategory.RECOMPUTE: (MemRow.RECOMPUTE,),
    MemCategory.RECOMPUTE_HOLD: (MemRow.RECOMPUTE,),
    MemCategory.HOST: (),
    MemCategory.LIVE: (),        # inference only (INFERENCE_ROWS)
    MemCategory.KV_CACHE: (),    # inference only (INFERENCE_ROWS)
}
OPTIONAL_ROWS = frozenset({MemRow.RECOMPUTE})   # built once a part opens them (ShardingModel.open_row)
# An inference plan (autopar.plan(training=False)) has one peak, the forward's, and none of the rows above:
# its ILP (solver.ilp.ShardingILP.memory_exprs) reads this table instead of ROWS.
INFERENCE_ROWS: dict[str, tuple[MemCategory, ...]] = {
    "forward": (MemCategory.PARAMS, MemCategory.LIVE, MemCategory.KV_CACHE),
}
# what a plan reports as activations (Plan.predicted.memory_breakdown)
ACTIVATION_CATEGORIES = (MemCategory.ACTIVATIONS, MemCategory.ACTIVATIONS_AFTER, MemCategory.BLOCKS,
                         MemCategory.BACKWARD_GRAD, MemCategory.MODEL_OUTPUTS, MemCategory.LIVE)
