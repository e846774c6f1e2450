"""Operations behaviour of `orca serve`: API keys, backpressure (429), SIGTERM drain, schema fuzzing."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest
import schemathesis
from schemathesis.checks import (content_type_conformance, not_a_server_error, response_schema_conformance,
                                 status_code_conformance)
from hypothesis import HealthCheck, given, settings

from conftest import ServerProcess

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
KEY = "s3cret-key"


@pytest.fixture(scope="module")
def strict() -> ServerProcess:
    with ServerProcess("--kv-cache-memory", "256MiB", "--max-model-len", "512", "--api-key", KEY,
                        "--max-waiting", "2", "--drain-timeout", "60") as srv:
        yield srv


def test_api_key_is_required_on_v1_only(strict: ServerProcess) -> None:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{strict.url}/v1/completions", json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(strict.url + path).status_code == 200
    client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_too_many_waiting_requests_get_429_with_retry_after(strict: ServerProcess) -> None:
    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=strict.url, headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=120) as c:
            body = {"model": MODEL, "prompt": "Tell me a long story. " * 20, "max_tokens": 8}
            return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(12)))

    codes = [r.status_code for r in asyncio.run(run())]
    assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2
    rejected = next(r for r in asyncio.run(run()) if r.status_code == 429)
    assert rejected.headers["retry-after"] == "1" and rejected.json()["error"]["type"] == "rate_limit_exceeded"
    client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_sigterm_drains_in_flight_requests_then_exits_0(strict: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{strict.url}/v1", api_key=KEY, max_retries=0)
    stream = client.completions.create(model=MODEL, prompt="Count:", max_tokens=120, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
    chunks = iter(stream)
    first = next(chunks)
    strict.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while httpx.get(f"{strict.url}/ready").status_code != 503:
        assert time.monotonic() < deadline, "/ready did not turn false after SIGTERM"
        time.sleep(0.05)
    r = httpx.post(f"{strict.url}/v1/completions", json={"model": MODEL, "prompt": "Hi"},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "draining"
    assert httpx.get(f"{strict.url}/health").status_code == 200  # alive, just not taking work
    rest = list(chunks)
    assert rest[-1].usage.completion_tokens == 120
    assert [c for c in [first, *rest] if c.choices][-1].choices[0].finish_reason == "length"
    assert strict.proc.wait(timeout=60) == 0


def test_drain_timeout_bounds_the_shutdown() -> None:
    """A request longer than --drain-timeout is cut, and the server still exits 0 soon after."""
    srv = ServerProcess("--kv-cache-memory", "128MiB", "--max-model-len", "512", "--drain-timeout", "1")
    try:
        srv.wait_ready()
        body = {"model": MODEL, "prompt": "Count:", "max_tokens": 500, "temperature": 0, "ignore_eos": True,
                "stream": True}
        received = 0
        with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while received < 2:  # generating
                received += next(lines).startswith("data: ")
            srv.proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            try:
                for _ in lines:
                    pass
            except httpx.HTTPError:
                pass  # the connection was cut mid-stream
        assert srv.proc.wait(timeout=30) == 0
        assert time.monotonic() - start < 15
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def fuzz_server() -> ServerProcess:
    with ServerProcess("--kv-cache-memory", "128MiB", "--max-model-len", "96") as srv:
        yield srv


def test_fuzzed_requests_never_get_a_5xx(fuzz_server: ServerProcess) -> None:
    """Every operation of the server's own OpenAPI schema, with schema-shaped random bodies."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=int(os.environ.get("ORCA_FUZZ_EXAMPLES", "25")), deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case) -> None:
            if isinstance(case.body, dict) and "model" in case.body:  # random names would all stop at the 404
                case.body["model"] = MODEL
            response = case.call(base_url=fuzz_server.url, timeout=60)
            assert response.status_code < 500, f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}"
            # and the answer is one the schema promises: a documented status, content type and body
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                     content_type_conformance, response_schema_conformance])

        check()


def test_server_alive_after_fuzzing(fuzz_server: ServerProcess) -> None:
    assert httpx.get(f"{fuzz_server.url}/health").status_code == 200
    r = httpx.post(f"{fuzz_server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
