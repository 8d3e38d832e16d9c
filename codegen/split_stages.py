"""Pass: split a captured graph into pipeline stage modules at layer boundaries.

``split_stages(cap, layer_list, stage_layers)`` takes a captured (lifted) graph, the FQN of the
ModuleList whose blocks are pipelined (``blocks``) and, per stage, the block indices it holds
(contiguous, in order); it returns one :class:`StageGraph` per stage. Each stage is an
``fx.GraphModule`` whose parameters and buffers are the model's own tensors under their original
FQNs (``blocks.3.attn.qkv.weight``; a tied weight appears in every stage that uses it), which takes
the values live at its left boundary and returns those live at its right one:

* an op inside block ``i`` goes to the stage holding block ``i``; an op outside the blocks goes to
  the latest stage among its inputs' (ops before the first block: stage 0; the head and loss after
  the last block: the last stage);
* the first stage takes every user input of the model (the pipeline schedule feeds only the first
  stage); a value made in stage ``s`` and used in stage ``t > s + 1`` is passed through the stages
  in between (e.g. ``labels`` travels to the stage that computes the loss);
* the last stage returns the model's output (a single tensor as itself, several as a tuple).

Requires: an exported graph without buffer mutations. Ensures: running the stages in sequence,
feeding each stage's outputs to the next, gives the model's output; every tensor a stage sends on is
contiguous (a non-contiguous one is cloned at the end of the stage that makes it). Imports autopar's core only.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.export.graph_signature import OutputKind

from autopar.core.capture import CapturedModel
from autopar.core.errors import ConfigError

_ASSERTS = {torch.ops.aten._assert_tensor_metadata.default, torch.ops.aten._assert_scalar.default}


@dataclass
class StageGraph:
    """One pipeline stage: its module, the names of the values it takes and returns, its FQNs."""

    index: int
    module: fx.GraphModule
    inputs: tuple[str, ...]            # captured node names, in placeholder order
    outputs: tuple[str, ...]           # captured node names, in output order (last stage: the model's outputs)
    param_fqns: tuple[str, ...]        # parameters of this stage, as they appear in the stage module
    layers: tuple[int, ...]            # block indices


def layer_of(node: fx.Node, layer_list: str) -> int | None:
    """The block index of ``layer_list`` a node belongs to (from export's nn_module_stack), else None."""
    pat = re.compile(rf"^(?:L__self__\.)?{re.escape(layer_list)}\.(\d+)(?:\.|$)")
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        m = pat.match(path)
        if m:
            return int(m.group(1))
    return None


def assign_stages(cap: CapturedModel, layer_list: str, stage_layers: list[list[int]]) -> dict[str, int]:
    """Op node name -> stage index (see the module docstring for the rule)."""
    stage_of_layer = {i: s for s, layers in enumerate(stage_layers) for i in layers}
    out: dict[str, int] = {}
    for node in cap.graph.nodes:
        if node.op != "call_function":
            continue
        li = layer_of(node, layer_list)
        if li is not None:
            if li not in stage_of_layer:
                raise ConfigError(f"block {layer_list}.{li} is in no stage; stages hold {stage_layers}")
            out[node.name] = stage_of_layer[li]
        else:
            deps = [out[a.name] for a in node.all_input_nodes if a.name in out]
            out[node.name] = max(deps, default=0)
    return out


def _output_names(cap: CapturedModel) -> list[fx.Node]:
    out_node = next(n for n in cap.graph.nodes if n.op == "output")
    specs = cap.program.graph_signature.output_specs
    bad = [s.kind.name for s in specs if s.kind != OutputKind.USER_OUTPUT]
    if bad:
        raise ConfigError(f"the model's graph has {bad[0]} outputs (e.g. buffers updated in forward); pipelining "
                          f"supports models whose forward only returns values")
    return list(out_node.args[0])


def split_stages(cap: CapturedModel, layer_list: str, stage_layers: list[list[int]]) -> list[StageGraph]:
    """The stage modules of ``cap`` (see the module docstring)."""
    model_outputs = _output_names(cap)
    placeholders = {n.name: n for n in cap.graph.nodes if n.op == "placeholder"}
    attr_of = {name: fqns[0] for name, fqns in cap.param_fqns.items()}
    attr_of.update(cap.buffer_fqns)
    attr_of.update(cap.constant_fqns)   # lifted constants are read from the program like buffers
    user = [n for n in placeholders if n not in attr_of]
    stage_of = assign_stages(cap, layer_list, stage_layers)
    nstages = len(stage_layers)
    for name in user:
        stage_of[name] = 0   # user inputs enter the pipeline at its first stage
    # last stage (inclusive) in which each value is needed
    last_use: dict[str, int] = {}
    for node in cap.graph.nodes:
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            continue
        for a in node.all_input_nodes:
            if a.name in stage_of:
                where = nstages - 1 if node.op == "output" else stage_of[node.name]
                last_use[a.name] = max(last_use.get(a.name, 0), where)
    order = [n.name for n in cap.graph.nodes if n.name in stage_of]

    def live(boundary: int) -> list[str]:
        """Values made before stage ``boundary`` and needed in it or later."""
        return [n for n in order if stage_of[n] < boundary and last_use.get(n, -1) >= boundary]

    stages = []
    for s in range(nstages):
        ins = user if s == 0 else live(s)
        outs = [n.name for n in model_outputs] if s == nstages - 1 else live(s + 1)
        stages.append(_build_stage(cap, s, stage_layers[s], ins, outs, stage_of, attr_of, placeholders,
                                   single=(s == nstages - 1 and len(model_outputs) == 1)))
    return stages


def _build_stage(cap: CapturedModel, s: int, layers: list[int], ins: list[str], outs: list[str],
                 stage_of: dict[str, int], attr_of: dict[str, str], placeholders: dict[str, fx.Node],
                 single: bool) -> StageGraph:
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    root = nn.Module()
    fqns: list[str] = []
    for name in ins:
        ph = graph.placeholder(name)
        src = placeholders.get(name) or next(n for n in cap.graph.nodes if n.name == name)
        ph.meta = dict(src.meta)
        env[name] = ph

    def value(node: fx.Node) -> fx.Node:
        if node.name in env:
            return env[node.name]
        fqn = attr_of[node.name]  # a parameter or buffer: read it from the stage module
        owner = cap.program
        tensor = owner.state_dict[fqn] if fqn in owner.state_dict else owner.constants[fqn]
        _set_attr(root, fqn, tensor)
        if isinstance(tensor, nn.Parameter):
            fqns.append(fqn)
        got = graph.get_attr(fqn)
        got.meta = dict(node.meta)
        env[node.name] = got
        return got

    for node in cap.graph.nodes:
        if node.op != "call_function" or stage_of.get(node.name) != s:
            continue
        if node.target in _ASSERTS and not node.users:
            continue
        for a in node.all_input_nodes:
            value(a)
        new = graph.node_copy(node, lambda a: env[a.name])
        env[node.name] = new
    result = [value(next(n for n in cap.graph.nodes if n.name == o)) if o not in env else env[o] for o in outs]
    if not single:
        # values sent to the next stage go through point-to-point sends, which take contiguous tensors only
        # (e.g. an expanded rotary table): a non-contiguous one made here is copied once, in the graph
        for i, (o, node) in enumerate(zip(outs, result)):
            val = node.meta.get("val")
            if stage_of.get(o) == s and isinstance(val, torch.Tensor) and not val.is_contiguous():
                copy = graph.call_function(torch.ops.aten.clone.default, (node,),
                                           {"memory_format": torch.contiguous_format})
                copy.meta = {**node.meta, "val": val.clone(memory_format=torch.contiguous_format)}
                result[i] = copy
    graph.output(result[0] if single else tuple(result))
    gm = fx.GraphModule(root, graph, class_name=f"Stage{s}")
    return StageGraph(index=s, module=gm, inputs=tuple(ins), outputs=tuple(outs), param_fqns=tuple(fqns),
                      layers=tuple(layers))


def _set_attr(root: nn.Module, fqn: str, tensor: torch.Tensor) -> None:
    *path, leaf = fqn.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    if hasattr(mod, leaf):
        return
    if isinstance(tensor, nn.Parameter):
        mod.register_parameter(leaf, tensor)
    else:
        mod.register_buffer(leaf, tensor)
