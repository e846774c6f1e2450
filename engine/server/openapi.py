"""Make the published OpenAPI schema say what the server does: clients and fuzzers read it literally."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from .protocol import ChatCompletionChunk, ErrorResponse

_WHY = {400: "An invalid value; `param` names the field.", 401: "Missing or wrong API key.",
        404: "Unknown model.", 429: "Too many requests waiting; retry after `Retry-After` seconds.",
        503: "The server is draining (or its engine failed)."}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorResponse, "description": _WHY[status]} for status in statuses}


def streamed_responses(chunk: type[BaseModel]) -> dict[int | str, dict[str, Any]]:
    """`stream: true` answers 200 with server-sent events instead of one JSON body."""
    return {200: {"description": f"JSON, or with `stream: true` server-sent events: `data: {{{chunk.__name__}}}` "
                                 "per event, then `data: [DONE]`.",
                  # one server-sent event, as OpenAPI 3.2's itemSchema describes event streams
                  "content": {"text/event-stream": {"schema": {
                      "type": "object", "required": ["data"],
                      "properties": {"data": {"type": "string", "description": f"a {chunk.__name__} as JSON, "
                                                                                 "or [DONE] at the end"},
                                     "event": {"type": "string"}}}}}}}


def finish_schema(app: FastAPI) -> None:
    """Invalid bodies get OpenAI's 400 error shape (see `errors`), so the schema must not promise
    FastAPI's 422 with its own shape. The chat stream's event shape is published too, though no
    operation can reference it (an SSE body is text, not one JSON document).
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
