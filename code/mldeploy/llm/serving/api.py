"""An OpenAI-compatible completions API over the batching engine.

``POST /v1/completions`` answers in one JSON body, or with ``"stream": true`` as server-sent
events (``data: {json}\\n\\n`` per token, then ``data: [DONE]``). The engine runs in its own
thread; its tokens cross into the event loop through ``call_soon_threadsafe``. A client that
disconnects cancels its sequence, so its batch slot is free at the next step.

5.2's defences carry over: a request-body limit (``BodySizeLimit``), a bounded waiting queue
(503 + ``Retry-After``), a deadline per request, probes that report the engine thread, and a
drain on SIGTERM (``LLMService`` plugs into 5.2's ``serve``/``BackgroundServer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from mldeploy.llm.model import Llama
from mldeploy.llm.serving.engine import Engine, QueueFull, Sequence
from mldeploy.serving.hardening import BodySizeLimit
from mldeploy.settings import ServiceSettings


class TextTokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completion request this server honours; anything else is refused."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    prompt: str = Field(min_length=1)
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    seed: int = Field(0, ge=0, le=2**63 - 1)  # what torch.Generator.manual_seed accepts
    stream: bool = False


class LLMService:
    """What 5.2's server machinery asks of a service: settings, a draining flag, and probes.

    Live while the engine thread runs; ready when also not draining (the model is loaded before
    the app exists). ``DrainingServer`` sets ``draining`` on SIGTERM."""

    metrics = None  # no connection counters: 5.2's protocol then counts nothing

    def __init__(self, engine: Engine, settings: ServiceSettings) -> None:
        self.engine, self.settings, self.draining = engine, settings, False

    def health_probe(self) -> tuple[int, dict]:
        live = self.engine.alive
        return (200 if live else 503), {"status": "ok" if live else "failing"}

    def ready_probe(self) -> tuple[int, dict]:
        ready = self.engine.alive and not self.draining
        return (200 if ready else 503), {"ready": ready}

    def metrics_page(self) -> tuple[int, bytes, str]:
        return 200, json.dumps(self.engine.metrics()).encode(), "application/json"


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


def _first_problem(exc: RequestValidationError) -> str:
    """One clear line for the first problem pydantic found: where, and what."""
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def create_app(
    net: Llama,
    tokenizer: TextTokenizer,
    *,
    model_name: str = "tiny-llama",
    batching: str = "continuous",
    max_running: int = 8,
    max_waiting: int = 64,
    max_tokens_in_flight: int | None = None,
    request_timeout_s: float = 60.0,
    max_body_bytes: int = 64 * 1024,
    settings: ServiceSettings | None = None,
) -> FastAPI:
    """The app; the engine's worker thread starts and stops with the app's lifespan.

    ``settings``: 5.2's server settings (drain period, shutdown timeout, connection limits)."""
    if not (math.isfinite(request_timeout_s) and request_timeout_s > 0):
        raise ValueError(
            f"request_timeout_s must be a finite number above 0, got {request_timeout_s}"
        )
    engine = Engine(
        net,
        batching=batching,
        max_running=max_running,
        max_waiting=max_waiting,
        max_tokens_in_flight=max_tokens_in_flight,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="mldeploy LLM server", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    service = LLMService(engine, settings or ServiceSettings())
    app.state.engine, app.state.service = engine, service

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _first_problem(exc))

    @app.get("/health")
    async def health() -> JSONResponse:
        status, answer = service.health_probe()
        return JSONResponse(answer, status_code=status)

    @app.get("/ready")
    async def ready() -> JSONResponse:
        status, answer = service.ready_probe()
        return JSONResponse(answer, status_code=status)

    @app.get("/v1/models")
    async def models() -> dict:
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "mldeploy"}
        return {"object": "list", "data": [entry]}

    @app.get("/metrics")
    async def metrics() -> dict:
        return engine.metrics()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        if service.draining:  # SIGTERM: streams already running finish, new ones go elsewhere
            return _error(503, "the server is shutting down; retry elsewhere", {"Retry-After": "1"})
        if body.model != model_name:
            return _error(400, f"unknown model {body.model!r}; this server has {model_name!r}")
        prompt = tokenizer.encode(body.prompt)
        context = net.cfg.max_seq_len
        if not prompt:
            return _error(400, "prompt encodes to no tokens")
        if len(prompt) >= context:
            return _error(400, f"prompt is {len(prompt)} tokens; the context is {context}")
        if len(prompt) + body.max_tokens > context:
            room = context - len(prompt)
            return _error(400, f"max_tokens={body.max_tokens} exceeds the {room} tokens left")
        tokens: asyncio.Queue[int | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def on_token(seq: Sequence, token: int | None) -> None:  # runs in the engine thread
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody listens
                loop.call_soon_threadsafe(tokens.put_nowait, token)

        try:
            seq = engine.submit(
                prompt, body.max_tokens, temperature=body.temperature, seed=body.seed,
                on_token=on_token, deadline=time.perf_counter() + request_timeout_s,
            )  # fmt: skip
        except QueueFull:
            return _error(503, "too many requests are waiting; retry later", {"Retry-After": "1"})
        meta = {"id": f"cmpl-{seq.id}", "created": int(time.time()), "model": model_name}
        if body.stream:
            events = _stream(engine, seq, tokens, tokenizer, meta)
            return StreamingResponse(events, media_type="text/event-stream")
        return await _complete(engine, seq, tokens, tokenizer, meta, request)

    return app


def _choice(text: str, finish_reason: str | None) -> dict:
    return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}


async def _stream(
    engine: Engine, seq: Sequence, tokens: asyncio.Queue, tokenizer: TextTokenizer, meta: dict
) -> AsyncIterator[str]:
    """Server-sent events, one per token with the text it adds; cancels if the client leaves."""
    sent, received = "", 0
    try:
        while await tokens.get() is not None:
            received += 1  # the engine may be ahead: decode only what this client has received
            text = tokenizer.decode(seq.generated[:received])
            delta, sent = text[len(sent) :], text
            chunk = {**meta, "object": "text_completion", "choices": [_choice(delta, None)]}
            yield f"data: {json.dumps(chunk)}\n\n"
        final = _choice("", seq.finish_reason)
        yield f"data: {json.dumps({**meta, 'object': 'text_completion', 'choices': [final]})}\n\n"
        yield "data: [DONE]\n\n"
    finally:  # also on disconnect: Starlette cancels this generator
        if seq.finish_reason is None:
            engine.cancel(seq)


async def _complete(engine, seq, tokens, tokenizer, meta, request: Request) -> JSONResponse:
    """Wait for the whole completion; a client that disconnects meanwhile cancels it."""
    try:
        while True:
            try:
                if await asyncio.wait_for(tokens.get(), timeout=0.25) is None:
                    break
            except TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(seq)
                    return _error(499, "client closed the request")
    finally:
        if seq.finish_reason is None:
            engine.cancel(seq)
    if seq.finish_reason == "error":
        return _error(500, "the engine failed on this request; see the server log")
    if seq.finish_reason == "timeout":
        return _error(504, f"no complete answer within the deadline ({len(seq.generated)} tokens)")
    n_prompt, n_out = len(seq.prompt), len(seq.generated)
    usage = {
        "prompt_tokens": n_prompt,
        "completion_tokens": n_out,
        "total_tokens": n_prompt + n_out,
    }
    choice = _choice(tokenizer.decode(seq.generated), seq.finish_reason)
    return JSONResponse({**meta, "object": "text_completion", "choices": [choice], "usage": usage})
