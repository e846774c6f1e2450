"""API key, drain and in-flight accounting for /v1, as plain ASGI middleware.

Only /v1 is gated: /health, /ready and /metrics stay open for probes and scrapers, and keep
answering while the server drains.

Not `@app.middleware("http")`: that returns as soon as a response's headers exist, so a streamed
response would stop counting as in flight before its first token and the drain could exit under
it. Here a request counts until its last byte is sent.
"""
from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import APIError, error_response
from .state import ServerState


class Gate:
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
        if state.engine.error is not None:
            await error_response(APIError(503, f"engine failed: {state.engine.error}", "service_unavailable",
                                          code="engine_failed"))(scope, receive, send)
            return
        state.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            state.inflight -= 1
