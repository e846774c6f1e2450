"""The router's HTTP face: OpenAI's endpoints proxied to one replica each, plus its own probes.

Bodies pass through as bytes, both ways: the router never rewrites a request or buffers a response,
so a streamed completion reaches the client token by token. With prefix affinity on it does read a
completion's or chat's prompt (tokenized in a worker thread, see `prompts`) to choose the replica
likely to hold its prefix in cache; what it forwards is still the client's bytes.
A request moves to another replica only while nothing has reached the client yet (the replica
refused the connection, dropped it before answering, or answered 503 because it is draining), so a
retry can never duplicate output the client already saw.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import Receive, Scope, Send

from orca.engine.server.disconnect import unless_disconnected
from orca.engine.server.errors import APIError, add_error_handlers, error_response

from .metrics import NO_REPLICA, RouterMetrics
from .policy import ReplicaState
from .prompts import CHAT_PATH, COMPLETIONS_PATH, PromptHasher
from .replicas import ReplicaSet

log = logging.getLogger("orca.router")

FORWARDED_REQUEST_HEADERS = ("authorization", "content-type", "accept")
# Hop-by-hop headers belong to one connection; length, date and server are the router's own to set.
DROPPED_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
                                      "trailer", "transfer-encoding", "upgrade", "content-length", "date", "server"})
# Failures that leave no doubt that nothing reached the client yet: the request may go elsewhere.
RETRYABLE_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError, httpx.ReadError,
                    httpx.WriteError)
RETRY_AFTER_SECONDS = "1"


class UpstreamResponse(StreamingResponse):
    """A replica's response relayed chunk by chunk as it arrives.

    Closing the upstream response is what tells the engine its client left (it then aborts the
    request and frees its KV blocks), so it is closed on every way out: the end of the body, the
    client hanging up (Starlette cancels the relay), or an error; shielded, since the way out may
    itself be a cancellation.
    """

    def __init__(self, upstream: httpx.Response, replica: ReplicaState, metrics: RouterMetrics,
                 done: Callable[[], None] = lambda: None) -> None:
        headers = {name: value for name, value in upstream.headers.items() if name not in DROPPED_RESPONSE_HEADERS}
        super().__init__(self._relay(), status_code=upstream.status_code, headers=headers)
        self.upstream, self.replica, self.metrics, self.done = upstream, replica, metrics, done

    async def _relay(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.upstream.aiter_raw():
                yield chunk
        except httpx.HTTPError:
            # Too late to retry: bytes went out. Re-raising makes the server cut the connection, so
            # the client sees a broken response rather than a complete-looking truncated one.
            self.metrics.upstream_errors.labels(self.replica.label).inc()
            raise

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.done()
            with anyio.CancelScope(shield=True):
                await self.upstream.aclose()


def no_replica_response(num_replicas: int, num_tried: int) -> Response:
    message = (f"no ready replica to serve the request ({num_replicas} known, {num_tried} tried and failed); "
               f"retry later")
    return error_response(APIError(503, message, "service_unavailable", code="no_ready_replica",
                                   headers={"Retry-After": RETRY_AFTER_SECONDS}))


def build_app(replica_set: ReplicaSet, metrics: RouterMetrics | None = None, connect_timeout: float = 5.0,
              prompt_hasher: PromptHasher | None = None) -> FastAPI:
    """`prompt_hasher` None (no tokenizer) or `replica_set.weights.prefix_affinity` off: every
    request routes by score alone, and no prompt is ever tokenized."""
    metrics = metrics or RouterMetrics(replica_set.num_available)
    hasher = prompt_hasher if replica_set.weights.prefix_affinity else None
    # No read timeout: a long generation may take minutes before its headers (non-streamed) or
    # between tokens under load; a dead replica is noticed by its connection and by the scraper.
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=connect_timeout),
                               limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await replica_set.start()
        try:
            yield
        finally:
            await replica_set.stop()
            await client.aclose()

    app = FastAPI(title="Orca router", summary="Routes OpenAI requests to the best-scored Orca replica",
                  lifespan=lifespan)
    app.state.replica_set, app.state.metrics = replica_set, metrics
    add_error_handlers(app)

    async def try_replica(replica: ReplicaState, request: httpx.Request) -> httpx.Response | None:
        """The replica's response once its headers came, or None when the request may go elsewhere."""
        started = time.monotonic()
        try:
            upstream = await client.send(request, stream=True)
        except RETRYABLE_ERRORS as error:
            log.warning("replica %s: %s: %s", replica.label, type(error).__name__, error)
            replica_set.mark_failed(replica)
            metrics.upstream_errors.labels(replica.label).inc()
            return None
        metrics.upstream_latency.labels(replica.label).observe(time.monotonic() - started)
        if upstream.status_code == 503:  # draining, or its engine failed: nothing was forwarded yet
            await upstream.aclose()
            replica_set.mark_failed(replica)
            metrics.upstream_errors.labels(replica.label).inc()
            return None
        return upstream

    async def prompt_hashes(path: str, body: bytes) -> Sequence[int]:
        if hasher is None or path not in (COMPLETIONS_PATH, CHAT_PATH):
            return ()
        return await asyncio.to_thread(hasher.hashes, path, body)

    async def route(method: str, path: str, target: str, body: bytes, headers: dict[str, str],
                    count_load: bool) -> Response:
        block_hashes = await prompt_hashes(path, body)
        tried: set[str] = set()
        while (choice := replica_set.pick(tried, count_load, block_hashes)) is not None:
            replica = choice.replica
            if tried:
                metrics.retries.inc()
            elif choice.affinity is not None:  # the first pick only: a retry says nothing of the prefix
                metrics.prefix_affinity.labels(choice.affinity).inc()
            tried.add(replica.address)
            request = client.build_request(method, f"http://{replica.address}{target}", content=body or None,
                                           headers=headers)
            try:
                upstream = await try_replica(replica, request)
            except BaseException as error:  # cancelled (the client left) or failed: the request is over
                replica_set.release(choice)
                if not isinstance(error, httpx.HTTPError):
                    raise
                log.error("replica %s: %s: %s", replica.label, type(error).__name__, error)
                metrics.upstream_errors.labels(replica.label).inc()
                metrics.requests.labels(replica.label, "502").inc()
                return error_response(APIError(502, f"upstream {replica.label}: {error}", "upstream_error",
                                               code="upstream_error"))
            if upstream is None:
                replica_set.release(choice)
            else:
                metrics.requests.labels(replica.label, str(upstream.status_code)).inc()
                return UpstreamResponse(upstream, replica, metrics, lambda choice=choice: replica_set.release(choice))
        metrics.requests.labels(NO_REPLICA, "503").inc()
        return no_replica_response(len(replica_set.replicas), len(tried))

    async def forward(request: Request, count_load: bool = True) -> Response:
        body = await request.body()
        headers = {name: request.headers[name] for name in FORWARDED_REQUEST_HEADERS if name in request.headers}
        headers["accept-encoding"] = "identity"  # the bytes are relayed raw: keep them what the client expects
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        # Until the replica's headers come back the client's hang-up is only seen this way; the
        # cancelled send closes the upstream connection, which aborts the request in the engine.
        return await unless_disconnected(request, route(request.method, request.url.path, target, body, headers,
                                                        count_load))

    @app.get("/health")
    async def health() -> Response:
        """The process is alive; replicas being down does not make the router need a restart."""
        return JSONResponse({"status": "ok"})

    @app.get("/ready")
    async def ready() -> Response:
        """Ready once the replica list is known and probed, so a new router does not answer 503 to
        traffic its Service sends before it has looked."""
        return JSONResponse({"ready": replica_set.synced}, status_code=200 if replica_set.synced else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def router_metrics() -> Response:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await forward(request, count_load=False)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(request)

    return app
