"""Pass: a causal LM's attention becomes paged attention over a KV cache, on the captured graph.

Input: the graph of a decoder's forward over one *packed step* -- the new tokens of every scheduled sequence one
after another as a batch of one, ``[1, N]`` (N symbolic) -- captured by ``torch.export`` and unlifted (parameters
and buffers as ``get_attr``), with its attention as ``aten.scaled_dot_product_attention`` (HF models captured with
``attn_implementation='sdpa'``; autopar's built-in models call SDPA themselves). Nothing of the user's model is
edited: only the graph changes.

What changes:

* every SDPA node, in graph order (= layer order), becomes ``autopar.paged_attention`` (the custom op of
  ``runtime_kernels.paged_attention``): it writes this step's K/V into layer ``i``'s cache blocks and attends over
  the cache, causally per sequence. The layer's caches are ``get_attr`` nodes ``paged_k_cache_{i}`` /
  ``paged_v_cache_{i}`` (the layer index is a constant of the graph; the runner binds the tensors with
  :func:`bind_cache`), the step metadata are four new graph inputs after the model's own: ``slot_mapping [N]``,
  ``block_tables [B, max_blocks]``, ``seq_lens [B]``, ``query_lens [B]``. The SDPA's scale is kept.
* GQA: where the model repeats its kv heads before SDPA (``repeat_kv``: unsqueeze, expand, reshape; or
  ``repeat_interleave``), the op reads the unrepeated K/V and the repeat becomes dead; where the repeat is some
  other pattern, the op keeps every G-th head (h -> h // G), which is the same K/V. Only kv heads reach the cache.
* ``index_positions=True`` (models that derive positions from the token's index, like autopar's built-in GPT and
  Llama): ``arange(N)`` becomes the new input ``positions [N]`` (each token's position in its own sequence) and a
  position table sliced to the first N rows (``table[:N]``, e.g. rotary cos/sin) becomes ``table[positions]``.
  Export's guards on N (``_guards_fn``, ``_assert_scalar``: N at most the table's length) are dropped with them:
  a packed step may hold more tokens than one sequence's longest, each at a position inside the table.
* ``keep_rows=True`` (models without HF's ``logits_to_keep``): the LM head's input is indexed by a new input
  ``keep [B]`` (each sequence's last token of the step), so the head runs on B rows, not N.
* dead code -- the causal/packed mask construction, the K/V repeats, export's metadata asserts on them -- is
  removed.

Refused (:class:`~autopar.core.errors.CaptureError`): a graph with no SDPA (capture with
``attn_implementation='sdpa'``), an SDPA with dropout, or a non-causal one (no mask and ``is_causal=False``: an
encoder, which a KV cache does not serve). An SDPA with a mask is taken to be the decoder's causal mask (with
packed positions, HF's mask is causal within each sequence, which the paged op applies itself).
"""
from __future__ import annotations

import torch
from torch import fx

from autopar.core.errors import CaptureError
from autopar.runtime_kernels.paged_attention import paged_attention_op  # noqa: F401  (registers the op)

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
PAGED = torch.ops.autopar.paged_attention.default
STEP_INPUTS = ("slot_mapping", "block_tables", "seq_lens", "query_lens")
_ASSERTS = {aten._assert_tensor_metadata.default}
_VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}


def cache_names(layer: int) -> tuple[str, str]:
    return f"paged_k_cache_{layer}", f"paged_v_cache_{layer}"


def bind_cache(gm: fx.GraphModule, k: list[torch.Tensor], v: list[torch.Tensor]) -> None:
    """Point the graph's per-layer cache attributes at the cache tensors (``[num_blocks, kv_heads, bs, D]``)."""
    if len(k) != gm.paged_layers or len(v) != gm.paged_layers:
        raise CaptureError(f"the graph has {gm.paged_layers} attention layers but the cache {len(k)}: size the "
                           "cache from the same model")
    for i, (kc, vc) in enumerate(zip(k, v)):
        kn, vn = cache_names(i)
        setattr(gm, kn, kc)
        setattr(gm, vn, vc)


def _unrepeated(node: fx.Node) -> fx.Node:
    """The K/V before a GQA repeat (``x[:, :, None].expand(...).reshape(...)`` or ``repeat_interleave``), or node."""
    n = node
    if n.op == "call_function" and n.target is aten.repeat_interleave.self_int and n.args[2:3] in ((1,), (-3,)):
        return n.args[0]
    if not (n.op == "call_function" and n.target in _VIEWS):
        return node
    n = n.args[0]
    if not (isinstance(n, fx.Node) and n.target is aten.expand.default):
        return node
    n = n.args[0]
    if isinstance(n, fx.Node) and n.target is aten.unsqueeze.default and n.args[1] == 2:
        src = n.args[0]
        val = src.meta.get("val")
        if val is not None and val.dim() == 4:
            return src
    return node


def _token_count(gm: fx.GraphModule):
    """The symbolic N: dim 1 of the first graph input (the packed token ids ``[1, N]``)."""
    first = next(n for n in gm.graph.nodes if n.op == "placeholder")
    val = first.meta.get("val")
    if val is None or val.dim() != 2:
        raise CaptureError("the paged-attention pass needs a graph whose first input is the packed token ids [1, N] "
                           "with shapes recorded (capture it with torch.export)")
    return val.shape[1]


def _is_count(arg, count) -> bool:
    v = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
    return isinstance(v, torch.SymInt) and str(v) == str(count) or (isinstance(count, int) and v == count)


def _dead_code(gm: fx.GraphModule) -> None:
    """DCE that also drops export's metadata asserts on dead values (they would keep the mask code alive)."""
    changed = True
    while changed:
        changed = False
        for node in reversed(list(gm.graph.nodes)):
            if node.op == "call_function" and node.target in _ASSERTS and not node.users:
                arg = node.args[0]
                if isinstance(arg, fx.Node) and len(arg.users) == 1:
                    gm.graph.erase_node(node)
                    changed = True
        changed |= gm.graph.eliminate_dead_code()


def swap_paged_attention(gm: fx.GraphModule, plan=None, *, index_positions: bool = False,
                         keep_rows: bool = False, num_splits: int = 1) -> fx.GraphModule:
    """Requires: an unlifted exported graph of a packed step (see the module docstring); ``plan`` is unused (the
    pass is the same for every placement: it runs on whatever heads a rank holds). Ensures: no SDPA remains; the
    graph takes ``(*model inputs, [positions], [keep], slot_mapping, block_tables, seq_lens, query_lens)`` as
    plain positional inputs; ``gm.paged_layers`` is the number of attention layers; caches are bound by
    :func:`bind_cache`."""
    g = gm.graph
    sdpas = [n for n in g.nodes if n.op == "call_function" and n.target is SDPA]
    if not sdpas:
        raise CaptureError("no scaled_dot_product_attention in the captured graph: the paged-attention pass swaps "
                           "SDPA nodes; load HF models with attn_implementation='sdpa'")
    g.set_codegen(fx.graph.CodeGen())        # plain positional inputs (export's pytree spec no longer holds)
    count = _token_count(gm)
    last = [n for n in g.nodes if n.op == "placeholder"][-1]

    def add_input(name: str) -> fx.Node:       # new inputs after the model's own, in this order
        nonlocal last
        with g.inserting_after(last):
            last = g.placeholder(name)
        return last

    positions = add_input("positions") if index_positions else None
    keep = add_input("keep") if keep_rows else None
    new_inputs = [add_input(name) for name in STEP_INPUTS]
    for i, node in enumerate(sdpas):
        q, k, v = node.args[:3]
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
        causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
        scale = node.kwargs.get("scale", node.args[6] if len(node.args) > 6 else None)
        where = node.meta.get("stack_trace", "").strip().splitlines()[-1:] or [node.name]
        if dropout:
            raise CaptureError(f"attention {node.name} ({where[0]}) has dropout_p={dropout}: put the model in eval "
                               "mode (model.eval()) before serving it")
        if mask is None and not causal:
            raise CaptureError(f"attention {node.name} ({where[0]}) is not causal (no mask, is_causal=False): the "
                               "paged KV cache serves decoders (causal LMs) only")
        if scale is None:
            scale = q.meta["val"].shape[-1] ** -0.5
        kname, vname = cache_names(i)
        gm.register_buffer(kname, torch.empty(0), persistent=False)    # empty until bind_cache
        gm.register_buffer(vname, torch.empty(0), persistent=False)
        with g.inserting_before(node):
            kc, vc = g.get_attr(kname), g.get_attr(vname)
            new = g.call_function(PAGED, (q, _unrepeated(k), _unrepeated(v), kc, vc, *new_inputs, float(scale),
                                          num_splits))
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        g.erase_node(node)
    if index_positions:
        for node in list(g.nodes):
            if node.op == "call_module" and node.target == "_guards_fn" or node.target is aten._assert_scalar.default:
                g.erase_node(node)       # export's range guards on N restate the position table's length
                continue
            if node.op != "call_function":
                continue
            if node.target is aten.arange.default and len(node.args) == 1 and _is_count(node.args[0], count):
                node.replace_all_uses_with(positions)
                g.erase_node(node)
            elif (node.target is aten.slice.Tensor and node.args[0].op == "get_attr" and node.args[1] == 0
                  and node.args[2] in (None, 0)
                  and len(node.args) > 3 and _is_count(node.args[3], count)):
                with g.inserting_before(node):
                    rows = g.call_function(aten.index_select.default, (node.args[0], 0, positions))
                node.replace_all_uses_with(rows)
                g.erase_node(node)
    if keep_rows:
        _keep_head_rows(g, keep)
    _dead_code(gm)
    g.lint()
    # a fresh module over the graph: export's input-spec check (a forward pre-hook of gm) sees only the model's inputs
    out = fx.GraphModule(gm, g, class_name="PagedStep")
    out.paged_layers = len(sdpas)
    return out


def _keep_head_rows(g: fx.Graph, keep: fx.Node) -> None:
    """Index the LM head's input ``[1, N, C]`` by ``keep``: the output's producer must be a linear."""
    out = next(n for n in g.nodes if n.op == "output")
    res = out.args[0]
    head = res[0] if isinstance(res, (tuple, list)) else res
    if not (isinstance(head, fx.Node) and head.target is aten.linear.default):
        raise CaptureError("the model's output is not an LM head (linear) whose rows the step can select; serve it "
                           "with logits_to_keep (HF models) or a model ending in its LM head")
    x = head.args[0]
    with g.inserting_before(head):
        rows = g.call_function(aten.index_select.default, (x, 1, keep))
    head.replace_input_with(x, rows)
