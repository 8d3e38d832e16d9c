"""The primitives the generated module calls at run time: autograd-aware collectives (``collectives``),
ops whose sharded form is not the plain op on local shards (``parallel_ops``) and the hooks memory
trackers listen to (``tracking``). Codegen emits calls to these; they import only the core.
"""
