"""Sharding strategies: one op family per module, registered on the ATen overload.

Importing this package registers every rule. ``strategies_for(node, nodes, mesh_shape)`` lists a
node's N-D strategies; an op without a rule gets the logged replicate fallback.
"""
from autopar.solver.strategies import (  # noqa: F401
                                       attention,
                                       dtensor_rules,
                                       embedding,
                                       factory,
                                       loss,
                                       matmul,
                                       moe,
                                       norm,
                                       pointwise,
                                       reduction,
                                       softmax,
                                       view,
)
from autopar.solver.strategies.base import (
                                       Strategy,
                                       Strategy1D,
                                       expand_to_mesh,
                                       register,
                                       registered_rules,
                                       rule_for,
                                       strategies_for,
)

__all__ = ["Strategy", "Strategy1D", "expand_to_mesh", "register", "registered_rules", "rule_for", "strategies_for"]
