"""OpenAI-compatible HTTP serving (``/v1/completions``, streaming as server-sent events) on FastAPI + uvicorn
(the ``serve`` extra). The server only translates HTTP: one background thread drives the engine; each
request validates its parameters and prompt synchronously (400 before anything runs), then waits on its own
queue of tokens. A client that disconnects mid-stream aborts its request, which frees its blocks.
"""
# no `from __future__ import annotations`: FastAPI must see the Request annotation (imported lazily) as a class
import asyncio
import json
import logging
import threading
import time
import uuid
from typing import Any

from autopar.core.errors import ConfigError
from autopar.inference.api import LLM
from autopar.inference.engine import TokenEvent
from autopar.inference.errors import RequestError, SamplingParamsError
from autopar.inference.sampling import SamplingParams

log = logging.getLogger(__name__)


class EngineLoop:
    """Runs ``engine.step()`` on one thread while there is work; other threads add and abort requests
    under the same lock. Token events go to the asyncio queue each request registered."""

    def __init__(self, llm: LLM) -> None:
        self.llm, self.engine = llm, llm.engine
        self._lock = threading.Condition()
        self._subs: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="autopar-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue]:
        """Queue a request (raises RequestError for a prompt it cannot serve); returns its id and token queue."""
        loop, q = asyncio.get_running_loop(), asyncio.Queue()
        with self._lock:
            rid = self.engine.add_request(prompt_ids, params)
            self._subs[rid] = (loop, q)
            self._lock.notify()
        return rid, q

    def abort(self, rid: int) -> None:
        with self._lock:
            self.engine.abort(rid)
            self.engine.release(rid)
            self._subs.pop(rid, None)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.engine.has_unfinished():
                    self._lock.wait()
                if self._stop:
                    return
                try:
                    events = self.engine.step()
                except Exception:   # a failing step ends every running request, loudly
                    log.exception("engine step failed")
                    events = [TokenEvent(rid, None, "error") for rid in list(self._subs)]
                    for rid in list(self._subs):
                        self.engine.abort(rid)
                for ev in events:
                    sub = self._subs.get(ev.request_id)
                    if sub is not None:
                        sub[0].call_soon_threadsafe(sub[1].put_nowait, ev)
                    if ev.finish_reason is not None:
                        self._subs.pop(ev.request_id, None)
                        self.engine.release(ev.request_id)


def _params(body: dict) -> SamplingParams:
    stop = body.get("stop_token_ids") or ()
    return SamplingParams(temperature=body.get("temperature", 1.0), top_p=body.get("top_p", 1.0),
                          top_k=body.get("top_k", 0), repetition_penalty=body.get("repetition_penalty", 1.0),
                          seed=body.get("seed"), max_new_tokens=body.get("max_tokens", 16),
                          stop_token_ids=tuple(stop) if isinstance(stop, (list, tuple)) else stop,
                          ignore_eos=bool(body.get("ignore_eos", False)))


def create_app(llm: LLM, *, model_name: str = "autopar"):
    """The FastAPI app serving ``llm``; ``app.state.engine_loop`` drives it."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import JSONResponse, StreamingResponse
    except ImportError as e:
        raise ConfigError("serving needs FastAPI and uvicorn: pip install 'autopar[serve]'") from e

    app = FastAPI(title="autopar inference")
    loop_ = EngineLoop(llm)
    app.state.engine_loop = loop_
    app.router.add_event_handler("shutdown", loop_.close)

    def error(status: int, msg: str):
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error"}}, status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "autopar"}]}

    @app.get("/stats")
    async def stats():
        u = llm.engine.blocks.usage()
        return {"free_blocks": llm.engine.blocks.num_free, "total_blocks": u.total_blocks,
                "used_slots": u.used_slots, "allocated_slots": u.allocated_slots, "steps": llm.engine.steps}

    @app.post("/v1/completions")
    async def completions(request: Request):
        try:
            body: dict[str, Any] = await request.json()
        except json.JSONDecodeError:
            return error(400, "the body is not JSON")
        if not isinstance(body, dict) or "prompt" not in body:
            return error(400, "the body must be a JSON object with a 'prompt' (text or a list of token ids)")
        if body.get("n", 1) != 1:
            return error(400, "only n=1 is supported")
        try:
            params = _params(body)
            prompt = body["prompt"]
            if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
                raise RequestError("'prompt' must be a string or a list of integer token ids")
            rid, q = loop_.submit(llm.encode(prompt), params)
        except (SamplingParamsError, RequestError) as e:
            return error(400, str(e))
        except TypeError as e:
            return error(400, f"bad parameter type: {e}")
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n_prompt = len(llm.encode(prompt))

        def chunk(tokens: list[int], reason: str | None) -> dict:
            return {"id": cid, "object": "text_completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "text": llm.decode(tokens) or "", "token_ids": tokens,
                                 "finish_reason": reason, "logprobs": None}]}

        if not body.get("stream", False):
            tokens, reason = [], None
            try:
                while reason is None:
                    ev = await q.get()
                    if ev.token is not None:
                        tokens.append(ev.token)
                    reason = ev.finish_reason
            finally:
                if reason is None:
                    loop_.abort(rid)
            out = chunk(tokens, reason)
            out["usage"] = {"prompt_tokens": n_prompt, "completion_tokens": len(tokens),
                            "total_tokens": n_prompt + len(tokens)}
            return out

        async def events():
            reason = None
            try:
                while reason is None:
                    ev = await q.get()
                    reason = ev.finish_reason
                    yield f"data: {json.dumps(chunk([] if ev.token is None else [ev.token], reason))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if reason is None:                 # the client went away: free the request's blocks
                    loop_.abort(rid)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def serve(llm: LLM, *, host: str = "127.0.0.1", port: int = 8000, model_name: str = "autopar") -> None:
    try:
        import uvicorn
    except ImportError as e:
        raise ConfigError("serving needs FastAPI and uvicorn: pip install 'autopar[serve]'") from e
    uvicorn.run(create_app(llm, model_name=model_name), host=host, port=port, log_level="info")
