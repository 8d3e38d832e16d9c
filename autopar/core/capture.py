"""Capture: a PyTorch model and example inputs -> an exported ATen graph with shapes on every node.

Uses ``torch.export.export(strict=False)``; a model whose parameters live on the meta device is
captured without allocating anything (its inputs are moved to meta too). This module imports only
autopar's core (errors) and must not plan or run anything distributed.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import re
import sys
import traceback
from dataclasses import dataclass, field

import torch
import torch.fx._pytree
import torch.utils._pytree as pytree
from torch import nn
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from autopar.core.errors import CaptureError

log = logging.getLogger(__name__)

ExampleInputs = tuple | dict | torch.Tensor


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    name: str                 # graph placeholder name
    shape: tuple[int, ...]
    dtype: str
    arg: str = ""             # the forward() argument it binds to (placeholder names can differ: input -> input_1)


@dataclass(frozen=True, kw_only=True)
class CapturedModel:
    """The exported program plus the facts later phases need, keyed by graph placeholder names."""

    program: ExportedProgram
    args: tuple
    kwargs: dict
    param_fqns: dict[str, tuple[str, ...]]   # placeholder -> FQNs (several when weights are tied)
    buffer_fqns: dict[str, str]              # placeholder -> buffer FQN
    user_inputs: tuple[InputSpec, ...]
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # first FQN -> shape
    on_meta: bool = False
    folded_layers: dict[str, int] = field(default_factory=dict)  # ModuleList FQN -> true length when folded
    model_params: tuple[tuple[str, tuple[int, ...]], ...] = ()   # every (FQN, shape) of the full model
    constant_fqns: dict[str, str] = field(default_factory=dict)  # placeholder -> lifted constant tensor's name

    @property
    def graph(self) -> torch.fx.Graph:
        return self.program.graph_module.graph

    def fingerprint(self) -> str:
        """A hash of the full model's parameter names/shapes and the input shapes: which model a plan
        belongs to (the same whether or not repeated blocks were folded for capture)."""
        h = hashlib.sha256()
        for fqn, shape in self.model_params:
            h.update(f"{fqn}:{shape};".encode())
        for i in self.user_inputs:
            h.update(f"{i.name}:{i.shape}:{i.dtype};".encode())
        return h.hexdigest()[:16]


def normalize_inputs(example_inputs: ExampleInputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise CaptureError(f"example_inputs must be a tuple (positional), a dict (keyword) or a tensor, "
                       f"got {type(example_inputs).__name__}")


def _to_meta(x):
    return torch.empty_like(x, device="meta") if isinstance(x, torch.Tensor) else x


# Frames inside these packages are not the model's: compare directories, not path substrings, so a model in a
# folder that happens to be called "autopar" or "torch" is still named.
_LIBRARY_DIRS = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (torch,)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch and autopar: the model's line that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not os.path.abspath(f.filename).startswith(_LIBRARY_DIRS) and not f.filename.startswith("<")]
    if frames:
        f = frames[-1]
        return f"{f.filename}:{f.lineno}: {f.line}"
    m = re.search(r'File "([^"]+)", line (\d+)', str(exc))
    return f"{m.group(1)}:{m.group(2)}" if m else "unknown source line"


def _failing_op(exc: BaseException) -> str:
    text = str(exc)
    for pat in (r"(aten\.[\w.]+)", r"torch\.ops\.([\w.]+)", r"operator ([\w.:]+)", r"function (\w+)"):
        m = re.search(pat, text)
        if m:
            return m.group(1)
    return type(exc).__name__


def _block_signature(m: nn.Module) -> tuple:
    return (type(m),) + tuple((n, tuple(t.shape), t.dtype) for n, t in
                              list(m.named_parameters()) + list(m.named_buffers()))


# How many leading blocks of a ModuleList may differ from the identical blocks after them for the list still to be
# folded (T5: block 0 alone holds the relative-position bias; DeepSeek-V3: three dense blocks before the MoE ones).
# A list whose differing block comes later is captured whole: folding is exact or absent.
MAX_HEAD_BLOCKS = 3


def _foldable_lists(model: nn.Module, min_len: int) -> dict[str, nn.ModuleList]:
    """ModuleLists of at least ``min_len`` blocks of one class with identical parameter shapes."""
    return {n: m for n, (m, head) in fold_candidates(model, min_len, max_head=0).items()}


def list_head(blocks: list[nn.Module]) -> int:
    """The number of leading blocks that differ from the run of identical blocks the list ends with (0: all
    blocks alike; ``len - 1``: the last block differs from the one before it)."""
    sigs = [_block_signature(b) for b in blocks]
    head = len(sigs) - 1
    while head > 0 and sigs[head - 1] == sigs[-1]:
        head -= 1
    return head


def fold_candidates(model: nn.Module, min_len: int, *, max_head: int = MAX_HEAD_BLOCKS
                    ) -> dict[str, tuple[nn.ModuleList, int]]:
    """ModuleLists of at least ``min_len`` blocks whose blocks after the first ``head <= max_head`` ones (the
    list's head) are of one class with identical parameter shapes, at least two of them: name -> (list, head)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) >= min_len and name:
            head = list_head(list(mod))
            if head <= max_head and len(mod) - head >= 2:
                out[name] = (mod, head)
    # keep the outermost lists only
    return {n: m for n, m in out.items() if not any(n.startswith(o + ".") for o in out if o != n)}


def capture(model: nn.Module, example_inputs: ExampleInputs, *, fold_layers: bool = True,
            fold_min_layers: int = 4, fold_blocks: int = 2) -> CapturedModel:
    """Export ``model`` on ``example_inputs`` (tuple = positional, dict = keyword) without running it.

    With ``fold_layers`` a ModuleList of >= ``fold_min_layers`` blocks that are identical after a head of at most
    ``MAX_HEAD_BLOCKS`` differing ones (``fold_candidates``) is captured with its head and ``fold_blocks`` (two) of
    the identical blocks (export time grows with depth); the planner scales their costs back to the true count,
    the list's length recorded in ``folded_layers``. If the folded model does not export, the full one is.
    """
    full_params = tuple((n, tuple(int(x) for x in p.shape))
                        for n, p in model.named_parameters(remove_duplicate=False)) if isinstance(model, nn.Module) else ()
    if fold_layers and isinstance(model, nn.Module):
        lists = {n: (m, head) for n, (m, head) in fold_candidates(model, fold_min_layers).items()
                 if head + fold_blocks < len(m)}   # folding that drops no block is no folding
        if lists:
            saved = {}
            try:
                for name, (mod, head) in lists.items():
                    parent_name, _, attr = name.rpartition(".")
                    parent = model.get_submodule(parent_name) if parent_name else model
                    saved[name] = (parent, attr, mod)
                    setattr(parent, attr, nn.ModuleList(list(mod)[:head + fold_blocks]))
                cap = _capture(model, example_inputs)
                return dataclasses.replace(cap, folded_layers={n: len(m) for n, (m, _) in lists.items()},
                                           model_params=full_params)
            except CaptureError as e:
                if "could not capture" in str(e) and not _folding_related(e):
                    raise
                log.info("folded capture failed; capturing all layers")
            finally:
                for parent, attr, mod in saved.values():
                    setattr(parent, attr, mod)
    return dataclasses.replace(_capture(model, example_inputs), model_params=full_params)


def forward_signature(model: nn.Module) -> inspect.Signature | None:
    """The signature of ``model.forward`` (None where Python cannot tell it)."""
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def bind_inputs(signature: inspect.Signature | None, args: tuple, kwargs: dict) -> dict[str, object]:
    """The top-level inputs of a call ``model(*args, **kwargs)`` by name, in export's order (positional
    first): a named parameter's name, ``<name>[i]`` for the i-th value of ``*<name>``, and for a keyword
    its key, whether it binds to a named parameter or to ``**kwargs``. Capture names each input of the
    graph this way and the parallel module binds its call the same way (with the signature it keeps:
    ``forward_signature(model)``, read once, not per call)."""
    params = list(signature.parameters.values()) if signature is not None else []
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    var = next((p.name for p in params if p.kind is p.VAR_POSITIONAL), None)
    out: dict[str, object] = {}
    for i, a in enumerate(args):
        if i < len(positional):
            out[positional[i]] = a
        else:
            out[f"{var}[{i - len(positional)}]" if var else f"arg{i}"] = a
    for k, v in kwargs.items():
        if k in out:
            raise CaptureError(f"input {k!r} is given both positionally and by keyword")
        out[k] = v
    return out


def _leaf_arg_names(model: nn.Module, args: tuple, kwargs: dict) -> list[str]:
    """For each pytree leaf of (args, kwargs), in export's order, the forward() argument it belongs to."""
    names = []
    for name, v in bind_inputs(forward_signature(model), args, kwargs).items():
        names += [name] * len(pytree.tree_leaves(v))
    return names


def _merge_tied_placeholders(program: ExportedProgram, fqn_to_group: dict[str, tuple[str, ...]]) -> None:
    """torch.export lifts a tied parameter once per FQN (and reads it through only one of them): keep one
    placeholder per tensor, the first one's, and point every use at it."""
    gm, sig = program.graph_module, program.graph_signature
    nodes = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    keep: dict[tuple[str, ...], str] = {}
    dropped: set[str] = set()
    for spec in sig.input_specs:
        if spec.kind != InputKind.PARAMETER:
            continue
        group = fqn_to_group.get(spec.target, (spec.target,))
        if group not in keep:
            keep[group] = spec.arg.name
            continue
        node = nodes[spec.arg.name]
        node.replace_all_uses_with(nodes[keep[group]])
        gm.graph.erase_node(node)
        dropped.add(spec.arg.name)
    if dropped:
        sig.input_specs[:] = [s for s in sig.input_specs if s.arg.name not in dropped]
        gm.recompile()


def _folding_related(e: CaptureError) -> bool:
    """A folded capture that failed on an index or length error may work unfolded; other errors will not."""
    cause = e.__cause__
    return isinstance(cause, (IndexError, KeyError, AssertionError)) or "index" in str(e).lower()


def _register_output_types() -> None:
    """Let torch.export flatten the caches HuggingFace models return by default (``use_cache=True``:
    a DynamicCache in the output), with the pytree registration transformers ships for it. The cache is
    kept, not dropped: the parallel module returns the model's outputs in their structure. Only when
    transformers is already imported (a model of it is being captured)."""
    if "transformers" not in sys.modules:
        return
    try:
        from transformers.cache_utils import EncoderDecoderCache
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:    # another transformers version: models without registered caches fail as before
        return
    register_dynamic_cache_export_support()
    # encoder-decoder models (T5, BART) return a pair of DynamicCaches: flattened as the pair
    if EncoderDecoderCache not in pytree.SUPPORTED_NODES:
        pytree.register_pytree_node(
            EncoderDecoderCache, lambda c: ([c.self_attention_cache, c.cross_attention_cache], None),
            lambda values, _: EncoderDecoderCache(*values),
            serialized_type_name=f"{EncoderDecoderCache.__module__}.{EncoderDecoderCache.__name__}")
        torch.fx._pytree.register_pytree_flatten_spec(
            EncoderDecoderCache, lambda c, spec: [c.self_attention_cache, c.cross_attention_cache])


def _capture(model: nn.Module, example_inputs: ExampleInputs) -> CapturedModel:
    if not isinstance(model, nn.Module):
        raise CaptureError(f"capture needs an nn.Module, got {type(model).__name__}")
    args, kwargs = normalize_inputs(example_inputs)
    params = list(model.parameters())
    on_meta = bool(params) and all(p.is_meta for p in params)
    if on_meta:
        args = tuple(_to_meta(a) for a in args)
        kwargs = {k: _to_meta(v) for k, v in kwargs.items()}
    _register_output_types()
    try:
        program = torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # re-raised with the op and the model's line
        raise CaptureError(
            f"torch.export could not capture the model at op {_failing_op(exc)} ({_user_frame(exc)}): "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}. "
            f"Rewrite that line without data-dependent control flow (branching on tensor values) "
            f"or Python that torch.export cannot trace, then plan again") from exc

    by_id: dict[int, list[str]] = {}
    for fqn, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(fqn)
    fqn_to_group = {f: tuple(g) for g in by_id.values() for f in g}
    _merge_tied_placeholders(program, fqn_to_group)
    sig = program.graph_signature
    param_fqns: dict[str, tuple[str, ...]] = {}
    buffer_fqns: dict[str, str] = {}
    constant_fqns: dict[str, str] = {}
    user_inputs: list[InputSpec] = []
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    leaf_args = iter(_leaf_arg_names(model, args, kwargs))
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == InputKind.PARAMETER:
            param_fqns[name] = fqn_to_group.get(spec.target, (spec.target,))
        elif spec.kind == InputKind.BUFFER:
            buffer_fqns[name] = spec.target
        elif spec.kind == InputKind.CONSTANT_TENSOR:   # a tensor made in forward (e.g. torch.tensor(...)), lifted
            constant_fqns[name] = spec.target
        elif spec.kind == InputKind.USER_INPUT:
            val = placeholders[name].meta.get("val")
            arg = next(leaf_args, name)
            if isinstance(val, torch.Tensor):
                user_inputs.append(InputSpec(name=name, shape=tuple(int(s) for s in val.shape),
                                             dtype=str(val.dtype).removeprefix("torch."), arg=arg))
    shapes = {fqns[0]: tuple(int(s) for s in placeholders[n].meta["val"].shape) for n, fqns in param_fqns.items()}
    log.info("captured %d graph nodes, %d parameters", len(program.graph.nodes), len(param_fqns))
    return CapturedModel(program=program, args=args, kwargs=kwargs, param_fqns=param_fqns, buffer_fqns=buffer_fqns,
                         user_inputs=tuple(user_inputs), param_shapes=shapes, on_meta=on_meta,
                         constant_fqns=constant_fqns)
