"""The FastAPI app: OpenAI's endpoints over `AsyncLLMEngine`, plus health, readiness and metrics.

Handlers never touch the model loop directly: they build sequences (tokenized in a worker
thread), read their streams, and turn outputs into OpenAI's response shapes.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from ..async_engine import AsyncLLMEngine, EngineDeadError
from ..output_processor import RequestOutput
from ..sequence import SamplingParams, Sequence
from .metrics import Metrics
from .protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                       CompletionResponse, ErrorResponse, Health, ModelList, Readiness, SamplingFields)

_WHY = {400: "An invalid value; `param` names the field.", 401: "Missing or wrong API key.",
        404: "Unknown model.", 429: "Too many requests waiting; retry after `Retry-After` seconds.",
        503: "The server is draining (or its engine failed)."}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse, "description": _WHY[code]} for code in codes}


def _streamed(chunk: type) -> dict[int | str, dict[str, Any]]:
    """`stream: true` answers 200 with server-sent events instead of one JSON body."""
    return {200: {"description": f"JSON, or with `stream: true` server-sent events: `data: {{{chunk.__name__}}}` "
                                 "per event, then `data: [DONE]`.",
                  # one server-sent event, as OpenAPI 3.2's itemSchema describes event streams
                  "content": {"text/event-stream": {"schema": {
                      "type": "object", "required": ["data"],
                      "properties": {"data": {"type": "string", "description": f"a {chunk.__name__} as JSON, "
                                                                                 "or [DONE] at the end"},
                                     "event": {"type": "string"}}}}}}}


class APIError(Exception):
    """Raised anywhere in a handler; answered in OpenAI's error shape with this status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = \
            status, message, type, param, code, headers


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def bad_value(e: ValueError) -> APIError:
    """Engine and SamplingParams errors start with the field they are about ("max_tokens: ...")."""
    m = re.match(r"(?:SamplingParams\.)?(\w+)\s*[=:]", str(e))
    return APIError(400, str(e), param=m.group(1) if m else None)


@dataclass
class ServerState:
    engine: AsyncLLMEngine
    model_name: str
    metrics: Metrics
    api_key: str | None = None
    max_waiting: int = 512
    draining: bool = False
    queued: int = 0  # submitted, no token yet: the server's view of the waiting queue
    inflight: int = 0  # HTTP requests on /v1 being answered
    created: int = field(default_factory=lambda: int(time.time()))


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="Orca", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.orca = state

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",) and not isinstance(x, int)]
        param = loc[0] if loc else None
        message = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    app.add_middleware(_Gate, state=state)

    @app.get("/health", response_model=Health, responses={503: {"model": Health, "description": "Engine failed."}})
    async def health() -> Response:
        """Process alive (and its model loop too)."""
        if state.engine.error is not None:
            return JSONResponse({"status": "engine failed"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/ready", response_model=Readiness,
             responses={503: {"model": Readiness, "description": "Draining, or the engine failed."}})
    async def ready() -> Response:
        """Ready for traffic: model loaded and not draining."""
        ok = not state.draining and state.engine.error is None
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        """Prometheus text format, `orca:` names mirroring vLLM's."""
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", response_model=ModelList, responses=_errors(401, 503))
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "orca",
            "max_model_len": state.engine.engine.max_model_len}]})

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**_streamed(CompletionResponse), **_errors(400, 401, 404, 429, 503)})
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await _unless_disconnected(request, _complete(state, req))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**_streamed(ChatCompletionChunk), **_errors(400, 401, 404, 429, 503)})
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await _unless_disconnected(request, _chat(state, req))

    _finish_schema(app)
    return app


def _finish_schema(app: FastAPI) -> None:
    """Make the published OpenAPI schema say what the server does.

    Invalid bodies get OpenAI's 400 error shape (see `invalid`), so the schema must not promise
    FastAPI's 422 with its own shape: clients and fuzzers read the schema literally. The chat
    stream's event shape is published too, though no operation can reference it (an SSE body is
    text, not one JSON document).
    """
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = build()
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            chunk = ChatCompletionChunk.model_json_schema(ref_template="#/components/schemas/{model}",
                                                          mode="serialization")
            for name, definition in chunk.pop("$defs", {}).items():
                components.setdefault(name, definition)
            components["ChatCompletionChunk"] = chunk
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class _Gate:
    """API key, drain and in-flight accounting for /v1, as plain ASGI middleware.

    Only /v1 is gated: /health, /ready and /metrics stay open for probes and scrapers, and keep
    answering while the server drains.

    Not `@app.middleware("http")`: that returns as soon as a response's headers exist, so a
    streamed response would stop counting as in flight before its first token and the drain could
    exit under it. Here a request counts until its last byte is sent.
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.state
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        if state.api_key is not None:
            header = Headers(scope=scope).get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            # constant time, so response timing does not leak how much of a guess was right
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                await error_response(APIError(401, "invalid or missing API key", "authentication_error",
                                              code="invalid_api_key"))(scope, receive, send)
                return
        if state.draining:
            await error_response(APIError(503, "server is draining", "service_unavailable", code="draining",
                                          headers={"Retry-After": "1"}))(scope, receive, send)
            return
        state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.inflight -= 1


async def _unless_disconnected(request: Request, work: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it if the client hangs up first.

    Starlette notices a disconnect only while it streams a body; a non-streamed completion would
    otherwise keep generating (and holding KV blocks) for nobody. Cancelling the handler closes
    its streams, which aborts its sequences.
    """

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait((task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it
    return task.result()


async def _complete(state: ServerState, req: CompletionRequest) -> Response:
    prompts = _completion_prompts(req.prompt)
    seqs = await _submit(state, req, prompts, req.max_tokens or 16, req.logprobs)
    return await _Completion(state, req, seqs, prompts).respond()


async def _chat(state: ServerState, req: ChatCompletionRequest) -> Response:
    tok = state.engine.tokenizer
    try:
        text = tok.apply_chat_template([{"role": m.role, "content": m.text()} for m in req.messages])
    except Exception as e:  # a template that rejects the conversation (e.g. roles out of order)
        raise APIError(400, f"messages: {e}", param="messages") from e
    ids = await asyncio.to_thread(tok.encode, text, False)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    seqs = await _submit(state, req, [ids], req.max_completion_tokens or req.max_tokens, logprobs)
    return await _Chat(state, req, seqs).respond()


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return list(prompt)


async def _submit(state: ServerState, req: SamplingFields, prompts: list[str | list[int]],
                  max_tokens: int | None, logprobs: int | None) -> list[Sequence]:
    """Validate everything and build all sequences (prompt-major, n per prompt) before queueing any."""
    if req.model != state.model_name:
        raise APIError(404, f"The model `{req.model}` does not exist; this server serves `{state.model_name}`.",
                       param="model", code="model_not_found")
    base = f"{uuid.uuid4().hex[:16]}"
    seqs = []
    try:
        for p, prompt in enumerate(prompts):
            first = None
            for i in range(req.n):
                params = SamplingParams(
                    temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
                    seed=None if req.seed is None else req.seed + i, stop=req.stop,
                    presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                    repetition_penalty=req.repetition_penalty, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                    logprobs=logprobs)
                # the n copies of a prompt reuse its token ids instead of tokenizing again
                seq = await state.engine.make_sequence(prompt if first is None else first.prompt_token_ids,
                                                       params, req.priority, f"{base}-{p}-{i}")
                if first is None:
                    first = seq
                else:
                    seq.prompt = first.prompt
                seqs.append(seq)
    except ValueError as e:
        raise bad_value(e) from e
    # Checked and counted with no await in between, so a burst cannot slip past the limit.
    if state.queued + len(seqs) > state.max_waiting:
        raise APIError(429, f"too many waiting requests ({state.queued}); retry later", "rate_limit_exceeded",
                       code="too_many_waiting", headers={"Retry-After": "1"})
    state.queued += len(seqs)
    return seqs


async def _tracked(state: ServerState, seq: Sequence) -> AsyncIterator[RequestOutput]:
    """One sequence's outputs, with its latencies recorded; it stops counting as waiting at its first token."""
    m, start, last, finished = state.metrics, seq.arrival_time, None, False
    try:
        async with aclosing(state.engine.stream(seq)) as stream:
            async for out in stream:
                now = time.monotonic()
                if last is None:
                    state.queued -= 1
                    m.ttft.observe(now - start)
                    m.prompt_tokens.inc(len(seq.prompt_token_ids))
                else:
                    m.itl.observe(now - last)
                last = now
                if out.finished:
                    finished = True
                    m.e2e.observe(now - start)
                    m.request_finished(out.finish_reason or "abort")
                    if seq.first_scheduled_time is not None:
                        m.queue_time.observe(max(0.0, seq.first_scheduled_time - seq.arrival_time))
                yield out
    finally:
        if last is None:
            state.queued -= 1
        if not finished:  # client gone, or cancelled: vLLM counts these as finished_reason="abort"
            m.request_finished("abort")


async def _merged(state: ServerState, seqs: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several sequences as they come; closing this closes (and aborts) all of them."""
    inbox: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(i: int, seq: Sequence) -> None:
        try:
            async with aclosing(_tracked(state, seq)) as stream:
                async for out in stream:
                    inbox.put_nowait((i, out))
        except Exception as e:
            inbox.put_nowait((i, e))
        finally:
            inbox.put_nowait((i, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(seqs)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await inbox.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _Response:
    """Shared by completions and chat: run the sequences, then answer in one body or as SSE."""

    object_name = ""

    def __init__(self, state: ServerState, req: SamplingFields, seqs: list[Sequence]) -> None:
        self.state, self.req, self.seqs = state, req, seqs
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tok = state.engine.tokenizer

    prefix = "cmpl"

    async def respond(self) -> Response:
        if self.req.stream:
            return StreamingResponse(self._sse(), media_type="text/event-stream")
        finals: dict[int, RequestOutput] = {}
        try:
            async with aclosing(_merged(self.state, self.seqs)) as stream:
                async for i, out in stream:
                    if out.finished:
                        finals[i] = out
        except EngineDeadError as e:
            raise APIError(500, str(e), "internal_error") from e
        outs = [finals[i] for i in range(len(self.seqs))]
        return JSONResponse({"id": self.id, "object": self.object_name, "created": self.created,
                             "model": self.state.model_name, "choices": [self.choice(i, o) for i, o in enumerate(outs)],
                             "usage": self.usage(outs)})

    async def _sse(self) -> AsyncIterator[str]:
        finals: dict[int, RequestOutput] = {}
        for chunk in self.opening_chunks():
            yield _event(chunk)
        try:
            async with aclosing(_merged(self.state, self.seqs)) as stream:
                async for i, out in stream:
                    if out.finished:
                        finals[i] = out
                    chunk = self.delta(i, out)
                    if chunk is not None:
                        yield _event(chunk)
        except EngineDeadError as e:
            yield _event(error_body(str(e), "internal_error"))
        else:
            options = self.req.stream_options
            if options is not None and options.include_usage:
                outs = [finals[i] for i in sorted(finals)]
                yield _event(self.chunk([], usage=self.usage(outs)))
        yield "data: [DONE]\n\n"

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": f"{self.object_name}.chunk" if self.prefix == "chatcmpl" else self.object_name,
                "created": self.created, "model": self.state.model_name, "choices": choices, **extra}

    def usage(self, outs: list[RequestOutput]) -> dict[str, Any]:
        n = self.req.n
        firsts = outs[::n]  # prompt tokens count once per prompt, as OpenAI counts them
        prompt = sum(len(o.prompt_token_ids) for o in firsts)
        completion = sum(len(o.token_ids) for o in outs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(o.num_cached_tokens for o in firsts)}}

    def token_text(self, token: int) -> str:
        return self.tok.decode([token], skip_special_tokens=False)

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    def choice(self, i: int, out: RequestOutput) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, i: int, out: RequestOutput) -> dict[str, Any] | None:
        raise NotImplementedError


class _Completion(_Response):
    object_name = "text_completion"
    prefix = "cmpl"

    def __init__(self, state: ServerState, req: CompletionRequest, seqs: list[Sequence],
                 prompts: list[str | list[int]]) -> None:
        super().__init__(state, req, seqs)
        self.prompts = prompts
        # where the next streamed token starts in each choice's text (logprobs.text_offset)
        self.offsets = [len(self.echoed(i)) for i in range(len(seqs))]

    def echoed(self, i: int) -> str:
        """The prompt text that `echo` puts before choice i's completion ("" without echo)."""
        if not self.req.echo:
            return ""
        prompt = self.prompts[i // self.req.n]
        return prompt if isinstance(prompt, str) else self.tok.decode(prompt)

    def _logprobs(self, out: RequestOutput, start: int, new: int | None = None) -> dict[str, Any] | None:
        if self.req.logprobs is None:
            return None
        ids = out.token_ids if new is None else out.token_ids[-new:]
        entries = out.logprobs if new is None else out.logprobs[-new:]
        tokens = [self.token_text(t) for t in ids]
        offsets, pos = [], start
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        return {"tokens": tokens, "token_logprobs": [e[t] for t, e in zip(ids, entries)],
                "top_logprobs": [{self.token_text(k): v for k, v in _top(e, self.req.logprobs)} for e in entries],
                "text_offset": offsets}

    def choice(self, i: int, out: RequestOutput) -> dict[str, Any]:
        return {"index": i, "text": self.echoed(i) + out.text, "logprobs": self._logprobs(out, self.offsets[i]),
                "finish_reason": out.finish_reason}

    def opening_chunks(self) -> list[dict[str, Any]]:
        if not self.req.echo:
            return []
        return [self.chunk([{"index": i, "text": self.echoed(i), "logprobs": None, "finish_reason": None}])
                for i in range(len(self.seqs))]

    def delta(self, i: int, out: RequestOutput) -> dict[str, Any] | None:
        if not out.new_text and not out.finished and self.req.logprobs is None:
            return None
        logprobs = self._logprobs(out, self.offsets[i], len(out.new_token_ids))
        if logprobs is not None:
            self.offsets[i] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return self.chunk([{"index": i, "text": out.new_text, "logprobs": logprobs,
                            "finish_reason": out.finish_reason if out.finished else None}])


class _Chat(_Response):
    object_name = "chat.completion"
    prefix = "chatcmpl"

    def _logprobs(self, out: RequestOutput, new: int | None = None) -> dict[str, Any] | None:
        if not self.req.logprobs:
            return None
        ids = out.token_ids if new is None else out.token_ids[-new:]
        entries = out.logprobs if new is None else out.logprobs[-new:]

        def item(token: int, lp: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {"content": [{**item(t, e[t]), "top_logprobs": [item(k, v) for k, v in _top(e, self.req.top_logprobs or 0)]}
                            for t, e in zip(ids, entries)]}

    def choice(self, i: int, out: RequestOutput) -> dict[str, Any]:
        return {"index": i, "message": {"role": "assistant", "content": out.text},
                "logprobs": self._logprobs(out), "finish_reason": out.finish_reason}

    def opening_chunks(self) -> list[dict[str, Any]]:
        return [self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for i in range(len(self.seqs))]

    def delta(self, i: int, out: RequestOutput) -> dict[str, Any] | None:
        if not out.new_text and not out.finished and not self.req.logprobs:
            return None
        delta = {"content": out.new_text} if out.new_text else {}
        return self.chunk([{"index": i, "delta": delta, "logprobs": self._logprobs(out, len(out.new_token_ids)),
                            "finish_reason": out.finish_reason if out.finished else None}])


def _top(entry: dict[int, float], n: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda kv: -kv[1])[:n]


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
