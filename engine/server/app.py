"""The FastAPI app: OpenAI's endpoints over `AsyncLLMEngine`, plus health, readiness and metrics.

Handlers never touch the model loop directly: they build sequences (tokenized in a worker
thread), read their streams, and turn outputs into OpenAI's response shapes.
"""
from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .disconnect import unless_disconnected
from .errors import add_error_handlers
from .gate import Gate
from .openapi import error_responses, finish_schema, streamed_responses
from .protocol import (ChatCompletionChunk, ChatCompletionRequest, ChatCompletionResponse, CompletionRequest,
                       CompletionResponse, Health, ModelList, Readiness)
from .serving_chat import create_chat_completion
from .serving_completion import create_completion
from .state import ServerState

__all__ = ["ServerState", "build_app"]


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.engine.start()
        yield
        state.engine.shutdown()

    app = FastAPI(title="Orca", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.orca = state
    add_error_handlers(app)
    app.add_middleware(Gate, state=state)

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

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "orca",
            "max_model_len": state.engine.engine.max_model_len}]})

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={**streamed_responses(CompletionResponse), **error_responses(400, 401, 404, 429, 503)})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await unless_disconnected(request, create_completion(state, body))

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={**streamed_responses(ChatCompletionChunk), **error_responses(400, 401, 404, 429, 503)})
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        return await unless_disconnected(request, create_chat_completion(state, body))

    finish_schema(app)
    return app
