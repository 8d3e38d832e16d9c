"""Pass: remove export's metadata assertions (they check global shapes; the rewritten graph runs on shards)."""
from __future__ import annotations

import torch
from torch import fx

from autopar.codegen.context import ShardingContext

aten = torch.ops.aten
ASSERTS = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten._assert_async.msg,
           aten.sym_constrain_range_for_size.default, aten.sym_constrain_range.default}


def drop_asserts(gm: fx.GraphModule, ctx: ShardingContext) -> fx.GraphModule:
    """Requires: an exported graph. Ensures: no assertion ops remain (nothing else changes)."""
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in ASSERTS and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()
    return gm
