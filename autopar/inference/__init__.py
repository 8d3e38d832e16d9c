"""autopar.inference: serving HF causal LMs on a paged KV cache with continuous batching.

Rooms, one job each: ``kv_cache`` (block manager and block pools), ``scheduler`` (who runs each step),
``runner`` (one step of the model on the paged cache), ``step_graph`` (the model's step captured and rewritten
by the codegen passes: paged attention, tensor-parallel sharding), ``sampling`` (parameters and sampler), ``engine``
(the loop), ``api`` (:class:`LLM`), ``server`` (OpenAI-compatible HTTP, optional FastAPI + uvicorn).
"""
from autopar.inference.api import LLM, Completion
from autopar.inference.engine import Engine, EngineConfig, RequestOutput
from autopar.inference.errors import CacheConfigError, RequestError, SamplingParamsError
from autopar.inference.kv_cache import BlockManager, CacheUsage, KVCache
from autopar.inference.sampling import SamplingParams

__all__ = ["LLM", "BlockManager", "CacheConfigError", "CacheUsage", "Completion", "Engine", "EngineConfig", "KVCache", "RequestError",
           "RequestOutput", "SamplingParams", "SamplingParamsError"]
