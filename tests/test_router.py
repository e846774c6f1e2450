"""`orca router` in front of real HTTP servers on 127.0.0.1, driven by the official `openai` client.

The upstreams here are small FastAPI apps that stand in for engines ONLY in this unit-level test:
they answer /ready, /metrics (the engine's `orca:` gauges, with values the test sets), /v1/models
and the two completion endpoints (JSON, or SSE chunks spaced in time), and echo which upstream
answered and the Authorization header they got. Real engines behind the router are exercised end
to end elsewhere (the Kubernetes tests).
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from orca.engine.server.disconnect import unless_disconnected
from orca.engine.tokenizer import Tokenizer
from orca.operator.router.endpoints import StaticSource
from orca.operator.router.policy import ScoringWeights
from orca.operator.router.prompts import CHAT_PATH, COMPLETIONS_PATH, PromptHasher, load_tokenizer
from orca.operator.router.proxy import build_app
from orca.operator.router.replicas import ReplicaSet

API_KEY = "sk-router-test"
DEADLINE = 10.0  # seconds any wait in these tests may take


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class ServerThread:
    """A uvicorn server on a loopback port chosen by the kernel (bind to port 0), in a thread."""

    def __init__(self, app: FastAPI) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = self.socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=1, lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, f"the server on port {self.port} to start")

    def stop(self) -> None:
        """Afterwards the port refuses connections."""
        self.server.should_exit = True
        self.thread.join(timeout=DEADLINE)
        self.socket.close()
        assert not self.thread.is_alive()


@dataclass
class Upstream:
    """What a fake engine reports and what it saw."""

    name: str
    running: float = 0.0
    waiting: float = 0.0
    ready_status: int = 200
    chunk_delay: float = 0.0
    v1_draining: bool = False  # /v1 answers 503 as an engine's does from SIGTERM on
    answer_delay: float = 0.0  # before a non-streamed answer, as an engine generating the whole text
    answers_cancelled: int = 0
    authorizations: list[str] = field(default_factory=list)
    served: int = 0
    stream_finished_at: float | None = None  # monotonic time the last chunk of the last stream was sent
    streams_cancelled: int = 0
    server: ServerThread | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"


def fake_engine_app(upstream: Upstream) -> FastAPI:
    app = FastAPI()

    @app.middleware("http")
    async def drain(request: Request, call_next):  # type: ignore[no-untyped-def]
        if upstream.v1_draining and request.url.path.startswith("/v1/"):
            return JSONResponse({"error": {"message": "server is draining", "type": "service_unavailable",
                                           "param": None, "code": "draining"}}, status_code=503,
                                headers={"Retry-After": "1"})
        return await call_next(request)

    @app.get("/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": upstream.ready_status == 200}, status_code=upstream.ready_status)

    @app.get("/metrics")
    async def metrics() -> Response:
        lines = []
        for name, value in (("num_requests_running", upstream.running), ("num_requests_waiting", upstream.waiting),
                            ("kv_cache_usage_perc", 0.25)):
            lines += [f"# HELP orca:{name} x", f"# TYPE orca:{name} gauge",
                      f'orca:{name}{{model_name="fake"}} {value}']
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse({"object": "list", "data": [{"id": upstream.name, "object": "model", "created": 0,
                                                         "owned_by": "orca"}]})

    def answered(request: Request) -> str:
        authorization = request.headers.get("authorization", "")
        upstream.authorizations.append(authorization)
        upstream.served += 1
        return f"{upstream.name}|{authorization}"

    async def sse(chunks: list[dict]) -> AsyncIterator[bytes]:
        try:
            for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                await asyncio.sleep(upstream.chunk_delay)
            yield b"data: [DONE]\n\n"
            upstream.stream_finished_at = time.monotonic()
        except (asyncio.CancelledError, GeneratorExit):
            upstream.streams_cancelled += 1
            raise

    async def after_delay(response: Response) -> Response:
        try:
            await asyncio.sleep(upstream.answer_delay)
        except asyncio.CancelledError:
            upstream.answers_cancelled += 1
            raise
        return response

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, text = await request.json(), answered(request)
        if body.get("stream"):
            return StreamingResponse(sse([{"id": "c", "object": "chat.completion.chunk", "created": 0,
                                           "model": upstream.name,
                                           "choices": [{"index": 0, "delta": {"content": f"{text}|{i}"},
                                                        "finish_reason": None if i < 3 else "stop"}]}
                                          for i in range(4)]), media_type="text/event-stream")
        # As the engine does: a non-streamed handler notices a hang-up only when it watches for one.
        return await unless_disconnected(request, after_delay(JSONResponse({
            "id": "c", "object": "chat.completion", "created": 0, "model": upstream.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, text = await request.json(), answered(request)
        choices = [{"index": 0, "text": f"{text}|{i}", "logprobs": None, "finish_reason": None if i < 3 else "stop"}
                   for i in range(4)]
        if body.get("stream"):
            return StreamingResponse(sse([{"id": "t", "object": "text_completion", "created": 0,
                                           "model": upstream.name, "choices": [choice]} for choice in choices]),
                                     media_type="text/event-stream")
        return JSONResponse({"id": "t", "object": "text_completion", "created": 0, "model": upstream.name,
                             "choices": [choices[-1]]})

    return app


@dataclass
class Router:
    server: ServerThread
    replica_set: ReplicaSet

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.server.url}/v1", api_key=API_KEY, max_retries=0, timeout=DEADLINE)

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the router's /metrics (0 when absent, as Prometheus would read a missing counter)."""
        text = httpx.get(f"{self.server.url}/metrics", timeout=DEADLINE).text
        return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
                   if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def start_router(upstreams: list[Upstream], scrape_interval: float, weights: ScoringWeights = ScoringWeights(),
                 prompt_hasher: PromptHasher | None = None) -> Router:
    replica_set = ReplicaSet(StaticSource([u.server.url for u in upstreams]),  # type: ignore[union-attr]
                             scrape_interval=scrape_interval, scrape_timeout=0.5, weights=weights)
    router = Router(ServerThread(build_app(replica_set, connect_timeout=1.0, prompt_hasher=prompt_hasher)),
                    replica_set)
    wait_until(lambda: httpx.get(f"{router.server.url}/ready").status_code == 200, "the router to be ready")
    return router


@pytest.fixture
def upstreams() -> Iterator[list[Upstream]]:
    started = [Upstream("alpha"), Upstream("beta")]
    for upstream in started:
        upstream.server = ServerThread(fake_engine_app(upstream))
    yield started
    for upstream in started:
        if upstream.server is not None and upstream.server.thread.is_alive():
            upstream.server.stop()


@pytest.fixture
def router_factory() -> Iterator[Callable[..., Router]]:
    routers: list[Router] = []

    def make(upstreams: list[Upstream], scrape_interval: float = 0.1, weights: ScoringWeights = ScoringWeights(),
             prompt_hasher: PromptHasher | None = None) -> Router:
        routers.append(start_router(upstreams, scrape_interval, weights, prompt_hasher))
        return routers[-1]

    yield make
    for router in routers:
        router.server.stop()


def test_openai_client_through_the_router_spreads_over_both_and_forwards_the_api_key(upstreams, router_factory):
    router = router_factory(upstreams)
    client = router.client()
    answered_by = []
    for _ in range(6):
        chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
        name, authorization = chat.choices[0].message.content.split("|")
        assert authorization == f"Bearer {API_KEY}"
        answered_by.append(name)
    stream = client.completions.create(model="fake", prompt="hi", stream=True, max_tokens=4)
    texts = [chunk.choices[0].text for chunk in stream]
    assert len(texts) == 4 and all(text.split("|")[1] == f"Bearer {API_KEY}" for text in texts)
    assert set(answered_by) == {"alpha", "beta"}
    assert all(u.authorizations and set(u.authorizations) == {f"Bearer {API_KEY}"} for u in upstreams)
    for upstream in upstreams:
        assert router.metric("orca:router_requests_total", replica=upstream.address, code="200") == upstream.served
    assert router.metric("orca:router_requests_total") == 7
    assert router.metric("orca:router_replicas_ready") == 2
    assert router.metric("orca:router_upstream_latency_seconds_count") == 7
    assert {model.id for model in client.models.list()} <= {"alpha", "beta"}
    assert httpx.get(f"{router.server.url}/health").json() == {"status": "ok"}


def test_the_least_loaded_upstream_is_chosen(upstreams, router_factory):
    alpha, beta = upstreams
    alpha.running, alpha.waiting = 4, 2
    router = router_factory(upstreams)
    replica = router.replica_set.replicas[alpha.address]
    wait_until(lambda: replica.num_requests_running == 4 and replica.num_requests_waiting == 2,
               "the router to scrape alpha's load")
    client = router.client()
    for _ in range(5):  # beta's load, counting what the router sent it, stays under alpha's 6
        client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert (alpha.served, beta.served) == (0, 5)


def test_a_stream_is_relayed_as_it_comes_not_buffered(upstreams, router_factory):
    for upstream in upstreams:
        upstream.chunk_delay = 0.3
    router = router_factory(upstreams)
    stream = router.client().chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                     stream=True)
    arrivals = []
    for chunk in stream:
        arrivals.append((time.monotonic(), chunk.choices[0].delta.content))
    finished = [u.stream_finished_at for u in upstreams if u.stream_finished_at is not None]
    assert len(arrivals) == 4 and len(finished) == 1
    assert arrivals[0][0] < finished[0] - 0.6  # three more chunks, 0.3 s apart, were still to come
    assert arrivals[-1][1].endswith("|3")


def test_a_client_hanging_up_closes_the_upstream_stream(upstreams, router_factory):
    for upstream in upstreams:
        upstream.chunk_delay = 0.5
    router = router_factory(upstreams)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    with httpx.stream("POST", f"{router.server.url}/v1/chat/completions", json=body, timeout=DEADLINE) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        next(response.iter_raw())  # the first chunk, then hang up
    wait_until(lambda: sum(u.streams_cancelled for u in upstreams) == 1, "the upstream to see the hang-up")
    assert all(u.stream_finished_at is None for u in upstreams)


def test_a_client_hanging_up_before_a_non_streamed_answer_cancels_it_upstream(upstreams, router_factory):
    for upstream in upstreams:
        upstream.answer_delay = 30.0
    router = router_factory(upstreams)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{router.server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(0.5))
    wait_until(lambda: sum(u.answers_cancelled for u in upstreams) == 1, "the upstream to see the hang-up")


def test_a_draining_upstream_gets_nothing_after_the_next_scrape(upstreams, router_factory):
    alpha, beta = upstreams
    router = router_factory(upstreams)
    alpha.ready_status = 503  # what an engine's /ready answers from SIGTERM on
    replica = router.replica_set.replicas[alpha.address]
    wait_until(lambda: replica.draining, "the router to see alpha draining")
    served_before = alpha.served
    client = router.client()
    for _ in range(6):
        client.completions.create(model="fake", prompt="hi", max_tokens=1)
    assert alpha.served == served_before and beta.served == 6
    assert router.metric("orca:router_replicas_ready") == 1


def test_a_stopped_upstream_is_retried_elsewhere_without_the_client_noticing(upstreams, router_factory):
    alpha, beta = upstreams
    alpha.running = 3  # beta looks idlest, so the router tries it first
    router = router_factory(upstreams, scrape_interval=60.0)  # one scrape at start: the proxy must notice
    beta.server.stop()  # type: ignore[union-attr]
    client = router.client()
    for _ in range(3):
        chat = client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
        assert chat.choices[0].message.content.startswith("alpha|")
    assert alpha.served == 3
    assert router.metric("orca:router_retries_total") == 1  # then beta sits out its cooldown
    assert router.metric("orca:router_upstream_errors_total", replica=beta.address) == 1
    assert router.metric("orca:router_requests_total", replica=alpha.address, code="200") == 3


def test_all_upstreams_down_answers_503_with_retry_after_in_openai_shape(upstreams, router_factory):
    router = router_factory(upstreams, scrape_interval=60.0)
    for upstream in upstreams:
        upstream.server.stop()  # type: ignore[union-attr]
    response = httpx.post(f"{router.server.url}/v1/completions", json={"model": "fake", "prompt": "hi"},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=DEADLINE)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert set(response.json()) == {"error"}
    assert (error["type"], error["param"], error["code"]) == ("service_unavailable", None, "no_ready_replica")
    assert "no ready replica" in error["message"]
    assert router.metric("orca:router_retries_total") == 1  # the second upstream, then nothing was left
    with pytest.raises(openai.APIStatusError) as raised:  # and again, now with both in their cooldown
        router.client().chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert raised.value.status_code == 503 and raised.value.code == "no_ready_replica"
    assert router.metric("orca:router_requests_total", replica="none", code="503") == 2


def test_a_draining_upstreams_503_is_retried_on_another_before_any_byte(upstreams, router_factory):
    """Between SIGTERM and the router's next scrape an engine answers 503 itself: that is a retry,
    not an error for the client."""
    alpha, beta = upstreams
    alpha.running = 3
    router = router_factory(upstreams, scrape_interval=60.0)
    beta.v1_draining = True  # its /ready still says 200 as far as the router last looked
    chat = router.client().chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content.startswith("alpha|")
    assert router.metric("orca:router_retries_total") == 1
    assert router.metric("orca:router_upstream_errors_total", replica=beta.address) == 1


# --- prefix affinity, with the bundled model's real tokenizer ---

SYSTEM_PROMPT = ("You are the support assistant of a company that sells garden tools. Answer politely, in at most "
                 "three sentences, cite the manual's section when you can, and never promise a delivery date. "
                 "The catalogue: spades, rakes, hoes, shears, secateurs, wheelbarrows, hoses and watering cans; "
                 "every tool has a five-year warranty against defects, not against wear. ") * 3


@pytest.fixture(scope="module")
def bundled_tokenizer() -> Tokenizer:
    tokenizer = load_tokenizer("bundled")
    assert tokenizer is not None
    return tokenizer


def ask(router: Router, question: str) -> str:
    chat = router.client().chat.completions.create(model="fake", messages=[
        {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}])
    return chat.choices[0].message.content.split("|")[0]  # type: ignore[union-attr]


QUESTIONS = ["Do you sell rakes?", "What does the warranty cover?", "When will my order arrive?",
             "Which shears cut branches?", "Is a hose included with the watering can?"]


def test_requests_sharing_a_system_prompt_follow_its_replica_while_loads_are_equal(
        upstreams, router_factory, bundled_tokenizer):
    router = router_factory(upstreams, prompt_hasher=PromptHasher(bundled_tokenizer))
    answered_by = [ask(router, question) for question in QUESTIONS]
    assert len(set(answered_by)) == 1, answered_by
    assert router.metric("orca:router_prefix_affinity_total", outcome="miss") == 1
    assert router.metric("orca:router_prefix_affinity_total", outcome="hit") == len(QUESTIONS) - 1
    assert router.metric("orca:router_prefix_affinity_total", outcome="overridden") == 0

    holder = next(u for u in upstreams if u.name == answered_by[0])
    other = next(u for u in upstreams if u is not holder)
    holder.running = 10  # far beyond the affinity bound: load wins over the cached prefix
    replica = router.replica_set.replicas[holder.address]
    wait_until(lambda: replica.num_requests_running == 10, "the router to scrape the holder's load")
    assert ask(router, "And hoes?") == other.name
    assert router.metric("orca:router_prefix_affinity_total", outcome="overridden") == 1
    holder.running = 0
    wait_until(lambda: replica.num_requests_running == 0, "the router to scrape the holder's load")
    assert ask(router, "And spades?") == other.name  # the prefix now lives where it last went


def test_without_prefix_affinity_the_same_requests_spread(upstreams, router_factory, bundled_tokenizer):
    router = router_factory(upstreams, weights=ScoringWeights(prefix_affinity=False),
                            prompt_hasher=PromptHasher(bundled_tokenizer))
    answered_by = [ask(router, question) for question in QUESTIONS]
    assert set(answered_by) == {"alpha", "beta"}
    assert router.metric("orca:router_prefix_affinity_total") == 0  # not consulted at all


def test_without_a_tokenizer_requests_route_by_score_alone(upstreams, router_factory):
    router = router_factory(upstreams)  # no prompt hasher: what --tokenizer none gives
    answered_by = [ask(router, question) for question in QUESTIONS]
    assert set(answered_by) == {"alpha", "beta"}
    assert router.metric("orca:router_prefix_affinity_total") == 0


def test_the_router_tokenizes_prompts_exactly_as_the_engine_does(bundled_tokenizer):
    tokenizer, hasher = bundled_tokenizer, PromptHasher(bundled_tokenizer)
    messages = [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": [{"type": "text", "text": "Do you "}, {"type": "text", "text": "rake?"}]}]
    body = json.dumps({"model": "m", "messages": messages}).encode()
    engine_ids = tokenizer.encode(tokenizer.apply_chat_template([
        {"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "Do you rake?"}]), False)
    assert hasher.token_ids(CHAT_PATH, body) == engine_ids  # serving_chat.py: template, no special tokens
    assert len(hasher.hashes(CHAT_PATH, body)) == len(engine_ids) // 16

    text = "<|im_start|>user\nSpecial tokens inline and naïve café 🚀" + SYSTEM_PROMPT
    for prompt in (text, [text, "second prompt"]):
        body = json.dumps({"model": "m", "prompt": prompt}).encode()
        assert hasher.token_ids(COMPLETIONS_PATH, body) == tokenizer.encode(text)  # make_sequence's encode
    for prompt in ([5, 6, 7], [[5, 6, 7], [8]]):
        assert hasher.token_ids(COMPLETIONS_PATH, json.dumps({"model": "m", "prompt": prompt}).encode()) == [5, 6, 7]
    for bad in (b"not json", b"[1]", b'{"prompt": "no model"}', b'{"model": "m", "prompt": []}',
                b'{"model": "m", "messages": [{"role": "nobody", "content": "x"}]}'):
        assert not hasher.hashes(COMPLETIONS_PATH if b"prompt" in bad else CHAT_PATH, bad), bad
    assert hasher.token_ids("/v1/models", body) is None


def test_the_router_tokenizer_loads_without_torch() -> None:
    import os
    import subprocess
    import sys

    script = """
import sys
from orca.operator.router.prompts import load_tokenizer
from orca.operator.router.proxy import build_app
assert load_tokenizer("bundled").encode("Hello, world!")
assert "torch" not in sys.modules, "torch was imported"
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")


# --- the replica sources and the flags, without a server ---

def endpoints_object(ready: list[tuple[str, str]], not_ready: list[tuple[str, str]],
                     version: str = "1") -> Any:
    """A V1Endpoints as the API server returns it: one subset, a metrics port listed before http."""
    from kubernetes import client

    def addresses(pairs: list[tuple[str, str]]) -> list[client.V1EndpointAddress]:
        return [client.V1EndpointAddress(ip=ip, target_ref=client.V1ObjectReference(kind="Pod", name=pod))
                for ip, pod in pairs]

    ports = [client.CoreV1EndpointPort(name="metrics", port=9000), client.CoreV1EndpointPort(name="http", port=8000)]
    return client.V1Endpoints(metadata=client.V1ObjectMeta(name="od-engine", resource_version=version),
                              subsets=[client.V1EndpointSubset(addresses=addresses(ready),
                                                               not_ready_addresses=addresses(not_ready), ports=ports)])


def test_endpoints_give_ready_and_not_ready_addresses_on_the_http_port_with_pod_names() -> None:
    from orca.operator.router.endpoints import Endpoint, endpoints_of

    found = endpoints_of(endpoints_object([("10.0.0.2", "od-r1-0"), ("fd00::1", "od-r2-0")], [("10.0.0.1", "od-r0-0")]))
    assert found == [Endpoint("10.0.0.1:8000", "od-r0-0", False), Endpoint("10.0.0.2:8000", "od-r1-0", True),
                     Endpoint("[fd00::1]:8000", "od-r2-0", True)]
    assert endpoints_of(None) == []


def test_the_endpoints_watch_follows_changes_and_relists_after_an_error() -> None:
    """The list-and-watch loop against a fake API: list, watch events, a 410 Gone, list again."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from orca.operator.router.endpoints import EndpointsSource

    lists: list[str] = []

    class FakeApi:
        def list_namespaced_endpoints(self, namespace: str, **kwargs: object) -> client.V1EndpointsList:
            assert namespace == "ns" and kwargs["field_selector"] == "metadata.name=od-engine"
            lists.append(namespace)
            return client.V1EndpointsList(metadata=client.V1ListMeta(resource_version=str(len(lists))),
                                          items=[endpoints_object([("10.0.0.1", "a")], [("10.0.0.2", "b")])])

    class FakeWatch:
        calls = 0

        def stream(self, func, *args, **kwargs):  # type: ignore[no-untyped-def]
            FakeWatch.calls += 1
            assert kwargs["timeout_seconds"] > 0 and kwargs["resource_version"]
            if FakeWatch.calls == 1:
                yield {"type": "MODIFIED", "object": endpoints_object([("10.0.0.1", "a"), ("10.0.0.2", "b")], [], "5")}
                yield {"type": "DELETED", "object": endpoints_object([], [], "6")}
            elif FakeWatch.calls == 2:
                raise ApiException(status=410, reason="Gone")
            time.sleep(0.01)

        def stop(self) -> None:
            pass

    published: list[list[str]] = []
    stop = threading.Event()
    source = EndpointsSource("od-engine", "ns", api=FakeApi(), watch_factory=FakeWatch)
    thread = threading.Thread(target=source.list_and_watch,
                              args=(lambda found: published.append([f"{e.address}:{e.ready}" for e in found]), stop),
                              daemon=True)
    thread.start()
    wait_until(lambda: len(published) >= 4, "the watch to publish")
    stop.set()
    thread.join(timeout=DEADLINE)
    assert published[:4] == [["10.0.0.1:8000:True", "10.0.0.2:8000:False"],
                             ["10.0.0.1:8000:True", "10.0.0.2:8000:True"], [],
                             ["10.0.0.1:8000:True", "10.0.0.2:8000:False"]]  # re-listed after the 410
    assert len(lists) >= 2


def test_parse_load_sums_the_engine_gauges_over_label_sets() -> None:
    from orca.operator.router.replicas import parse_load

    text = ("# TYPE orca:num_requests_running gauge\norca:num_requests_running{model_name=\"a\"} 2.0\n"
            "orca:num_requests_running{model_name=\"b\"} 1.0\n"
            "# TYPE orca:num_requests_waiting gauge\norca:num_requests_waiting{model_name=\"a\"} 4.0\n")
    assert parse_load(text) == (3.0, 4.0, None)
    with pytest.raises(ValueError):
        parse_load("# TYPE other gauge\nother 1\n")


@pytest.mark.parametrize("argv, flag", [
    ([], "--upstream"), (["--upstream", "http://127.0.0.1:1", "--service", "od-engine"], "--service"),
    (["--upstream", "https://127.0.0.1:1"], "--upstream"), (["--upstream", "http://127.0.0.1:1/v1"], "--upstream"),
    (["--upstream", "http://127.0.0.1:1", "--namespace", "ns"], "--namespace"),
    (["--service", "od-engine", "--scrape-interval", "0"], "--scrape-interval"),
    (["--service", "od-engine", "--waiting-weight", "-1"], "--waiting-weight"),
    (["--service", "od-engine", "--running-weight", "nan"], "--running-weight"),
    (["--service", "od-engine", "--kv-cache-weight", "-0.5"], "--kv-cache-weight"),
    (["--service", "od-engine", "--affinity-bound", "-1"], "--affinity-bound"),
    (["--service", "od-engine", "--block-size", "0"], "--block-size"),
    (["--service", "od-engine", "--tokenizer", "/no/such/model.gguf"], "--tokenizer"),
])
def test_a_bad_flag_combination_is_one_clear_error_naming_the_flag(argv, flag, capsys) -> None:
    from orca.engine.cli import main

    assert main(["router", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("orca: error:") and flag in error


def test_the_namespace_defaults_to_pod_namespace(monkeypatch) -> None:
    import argparse

    from orca.operator.router.main import add_router_args, endpoint_source

    parser = argparse.ArgumentParser()
    add_router_args(parser.add_subparsers())
    monkeypatch.setenv("POD_NAMESPACE", "serving")
    source = endpoint_source(parser.parse_args(["router", "--service", "od-engine"]))
    assert (source.service, source.namespace) == ("od-engine", "serving")  # type: ignore[attr-defined]
    monkeypatch.delenv("POD_NAMESPACE")
    source = endpoint_source(parser.parse_args(["router", "--service", "od-engine", "--namespace", "other"]))
    assert source.namespace == "other"  # type: ignore[attr-defined]


def test_the_scoring_flags_default_to_the_documented_values() -> None:
    import argparse

    from orca.operator.router.main import add_router_args

    parser = argparse.ArgumentParser()
    add_router_args(parser.add_subparsers())
    args = parser.parse_args(["router", "--service", "od-engine"])
    assert (args.waiting_weight, args.running_weight, args.kv_cache_weight, args.affinity_bound) == (1.0, 1.0, 4.0, 4.0)
    assert (args.prefix_affinity, args.block_size, args.tokenizer) == (True, 16, "bundled")
    defaults = ScoringWeights()
    assert (defaults.waiting_weight, defaults.running_weight, defaults.kv_cache_weight, defaults.affinity_bound,
            defaults.prefix_affinity) == (1.0, 1.0, 4.0, 4.0, True)
    args = parser.parse_args(["router", "--service", "od-engine", "--no-prefix-affinity", "--tokenizer", "none",
                              "--block-size", "32", "--kv-cache-weight", "0"])
    assert (args.prefix_affinity, args.tokenizer, args.block_size, args.kv_cache_weight) == (False, "none", 32, 0.0)


def test_router_help_and_flag_errors_import_no_server_or_kubernetes_library() -> None:
    import os
    import subprocess
    import sys

    script = """
import sys
for name in ("fastapi", "uvicorn", "httpx", "kubernetes", "prometheus_client"):
    sys.modules[name] = None
import orca.engine.cli as cli
try:
    cli.main(["router", "--help"])
except SystemExit as exit:
    assert exit.code == 0, exit.code
assert cli.main(["router"]) == 2
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONSAFEPATH": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("ok")
