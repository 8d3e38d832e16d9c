"""``autopar.inference.LLM``: a model (or a local HF directory) plus an optional tokenizer behind one engine.

Prompts are strings (needs a tokenizer) or lists of token ids. With ``mesh=`` (a 1-D torch DeviceMesh, on every
rank) and ``plan=`` (``autopar.plan`` of the model over a decode-sized batch) the model runs tensor-parallel
with the plan's placements (:mod:`autopar.inference.tensor_parallel`).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from autopar.core.errors import CaptureError, ConfigError, MeshError
from autopar.core.plan import Plan
from autopar.inference.builtin import is_builtin
from autopar.inference.engine import Engine, EngineConfig, RequestOutput
from autopar.inference.errors import RequestError
from autopar.inference.sampling import SamplingParams
from autopar.inference.step_graph import StepGraph
from autopar.inference.tensor_parallel import decode_layouts, shard_for_decoding

log = logging.getLogger(__name__)


@dataclass
class Completion(RequestOutput):
    text: str | None = None


def load_local(path: str | Path, *, dtype: torch.dtype | None = None):
    """(model, tokenizer or None) from a local HF directory; never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a local HF model directory (no config.json); autopar never downloads "
                          "models: save one with model.save_pretrained(dir)")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    tok = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tok


class LLM:
    def __init__(self, model_or_name, mesh=None, *, tokenizer=None, plan: Plan | None = None,
                 prefill_plan: Plan | None = None, **config) -> None:
        """``plan``: the inference plan of a decode step (tensor-parallel with ``mesh``); ``prefill_plan``: optionally
        a second plan, made for a prefill-sized step, that steps carrying prompt tokens run (graph path only)."""
        if mesh is not None and plan is None:
            raise MeshError("tensor-parallel decoding needs the plan to run: plan = autopar.plan(model, "
                            "{'input_ids': ids}, mesh_shape=(n,)), then LLM(model, mesh, plan=plan)")
        if isinstance(model_or_name, (str, Path)):
            model, tok = load_local(model_or_name)
            tokenizer = tokenizer if tokenizer is not None else tok
        else:
            model = model_or_name
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(tokenizer, local_files_only=True)
        self.model, self.tokenizer = model, tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        kv_heads, graph = None, None
        if mesh is not None:
            kv_heads, graph = self._shard(model, plan, mesh, config, prefill_plan)
        elif prefill_plan is not None:
            raise MeshError("prefill_plan is a tensor-parallel plan: give the mesh (and plan=) too")
        self.engine = Engine(model, EngineConfig(**config), eos_token_id=eos, kv_heads=kv_heads, step_graph=graph)

    @staticmethod
    def _shard(model, plan, mesh, config, prefill_plan=None):
        """Tensor-parallel decoding: the captured step graph sharded by the codegen pass (the model stays whole), or,
        with runner_path "interface"/"modules" or where the model cannot be captured, the model sharded in place
        by torch's TP styles (module hooks, run module by module)."""
        path = config.get("runner_path", "auto")
        layouts = decode_layouts(model, plan, mesh.size()) if mesh.ndim == 1 else None
        prefill = decode_layouts(model, prefill_plan, mesh.size()) if prefill_plan is not None and layouts else None
        if path in ("auto", "graph") and layouts is not None:
            try:
                graph = StepGraph(model, num_splits=config.get("num_splits", 1), layouts=layouts, mesh=mesh,
                                  prefill_layouts=prefill)
                config["runner_path"] = "graph"
                return layouts.kv_heads, graph
            except CaptureError as e:
                if path == "graph":
                    raise
                log.warning("tensor-parallel decoding of %s by torch TP styles: %s", type(model).__name__, e)
        if prefill_plan is not None:
            raise ConfigError("a separate prefill plan runs on the captured step graph only (runner_path 'auto' or "
                              "'graph'); torch's TP styles shard the model one way")
        kv_heads = shard_for_decoding(model, plan, mesh).kv_heads
        config["runner_path"] = "modules" if is_builtin(model) else "interface"
        return kv_heads, None

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("a text prompt needs a tokenizer: give LLM(tokenizer=...) or token ids")
            return list(self.tokenizer.encode(prompt, add_special_tokens=False))
        return [int(t) for t in prompt]

    def decode(self, ids: Sequence[int]) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode(list(ids))

    def generate(self, prompts, sampling: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Complete one prompt (str or token ids) or a list of them; a prompt that cannot be served gets
        ``finish_reason="error"`` while the others run."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        plist = [prompts] if single else list(prompts)
        encoded, errors = [], {}
        for i, p in enumerate(plist):
            try:
                encoded.append(self.encode(p))
            except RequestError as e:
                errors[i] = str(e)
                encoded.append([0])
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * len(plist)
        runnable = [i for i in range(len(plist)) if i not in errors]
        outs = self.engine.generate([encoded[i] for i in runnable], [params[i] for i in runnable])
        by_index = dict(zip(runnable, outs))
        result = []
        for i in range(len(plist)):
            if i in errors:
                result.append(Completion(-1, [], finish_reason="error", error=errors[i]))
            else:
                o = by_index[i]
                result.append(Completion(**vars(o), text=self.decode(o.token_ids)))
        return result

    def stream(self, prompt, sampling: SamplingParams | None = None) -> Iterator[int]:
        """Token ids of one request as they come; closing the iterator frees the request's blocks."""
        return self.engine.stream(self.encode(prompt), sampling)
