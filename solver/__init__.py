"""autopar.solver: strategies per op, the cost model and the sharding ILP.

Imports autopar's core only (never codegen). ``plan_graph`` turns a captured, indexed graph into
a solved :class:`autopar.plan.Plan`.
"""
from autopar.solver.planner import plan_graph

__all__ = ["plan_graph"]
