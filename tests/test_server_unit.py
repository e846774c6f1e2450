"""Server pieces that need no model: error mapping, metrics sampling, and `orca bench serve` against a
stand-in for another OpenAI-compatible server (vLLM's streaming shape), so the load generator is
known to work with peers and not only with Orca."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import generate_latest

from orca.engine.output_processor import TokenUpdate
from orca.engine.server.errors import bad_value
from orca.engine.server.metrics import Metrics


@pytest.mark.parametrize("message,param", [
    ("SamplingParams.top_p=0.0 must be in (0, 1]", "top_p"),
    ("max_tokens: prompt (10 tokens) + max_tokens (600) exceeds the context length of 512", "max_tokens"),
    ("prompt: must not be empty", "prompt"),
    ("something unrelated went wrong", None),
])
def test_value_errors_name_their_field(message: str, param: str | None) -> None:
    e = bad_value(ValueError(message))
    assert (e.status, e.param, e.message, e.type) == (400, param, message, "invalid_request_error")


def test_metrics_follow_the_engine_after_each_step() -> None:
    m = Metrics("tiny")
    sched = SimpleNamespace(running=[1, 2], waiting=[3], num_preemptions=0)
    bm = SimpleNamespace(num_blocks=10, num_free_blocks=6, prefix_queries=32, prefix_hits=16)
    engine = SimpleNamespace(scheduler=sched, block_manager=bm, last_iteration_tokens=40)
    m.on_step(engine, [TokenUpdate("a", 1, None), TokenUpdate("b", 2, "length")])
    sched.num_preemptions, bm.prefix_queries, bm.num_free_blocks, sched.running = 1, 48, 10, []
    m.on_step(engine, [])  # the idle call after aborts: gauges drop, counters only grow
    m.request_finished("length")
    text = generate_latest(m.registry).decode()

    def value(series: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(series + "{") or x.startswith(series + " "))
        return float(line.rsplit(" ", 1)[1])

    assert value("orca:num_requests_running") == 0 and value("orca:num_requests_waiting") == 1
    assert value("orca:kv_cache_usage_perc") == 0
    assert value("orca:generation_tokens_total") == 2 and value("orca:num_preemptions_total") == 1
    assert value("orca:prefix_cache_queries_total") == 48 and value("orca:prefix_cache_hits_total") == 16
    assert value("orca:iteration_tokens_count") == 1 and value("orca:iteration_tokens_sum") == 40
    assert 'orca:request_success_total{finished_reason="length",model_name="tiny"} 1.0' in text
    assert "_created" not in text  # vLLM's dashboards do not expect them


def peer_app(calls: list[dict[str, Any]]) -> FastAPI:
    """A different server's shape: `usage: null` on every chunk, usage only in the last, model "peer"."""
    app = FastAPI()

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": "peer", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        calls.append(body)
        if len(body["prompt"]) % 7 == 0:  # some requests fail, as an overloaded peer's would
            return JSONResponse({"error": {"message": "busy", "type": "rate_limit", "param": None, "code": None}},
                                status_code=429)

        async def events() -> Any:
            for i in range(body["max_tokens"]):
                await asyncio.sleep(0.001)
                chunk = {"id": "x", "object": "text_completion", "model": "peer", "usage": None,
                         "choices": [{"index": 0, "text": f" t{i}", "logprobs": None,
                                      "finish_reason": "length" if i == body["max_tokens"] - 1 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": body["max_tokens"],
                     "total_tokens": len(body["prompt"]) + body["max_tokens"]}
            yield f"data: {json.dumps({'id': 'x', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def test_bench_serve_measures_another_openai_server(tmp_path) -> None:
    from orca.engine.cli import main
    from orca.engine.workload import load_workload

    calls: list[dict[str, Any]] = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(peer_app(calls), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "stand-in server did not start"
            time.sleep(0.02)
        out = tmp_path / "peer.json"
        assert main(["bench", "serve", "--url", f"http://127.0.0.1:{port}", "--rate", "50", "--num-requests", "8",
                     "--json", str(out)]) == 0
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    reqs = load_workload(None)[:8]
    # token ids, each prompt once (requests 20 ms apart may reach a loaded machine's server out of order)
    assert sorted(c["prompt"] for c in calls) == sorted(r.prompt_token_ids for r in reqs)
    assert all(c["model"] == "peer" and c["stream"] and c["ignore_eos"] for c in calls)
    result = json.loads(out.read_text())
    failing = [r for r in reqs if len(r.prompt_token_ids) % 7 == 0]
    ok = [r for r in reqs if len(r.prompt_token_ids) % 7]
    assert result["requests"] == 8 and result["failed"] == len(failing) and result["completed"] == len(ok)
    assert all("HTTP 429" in e for e in result["errors"])
    gen = sum(r.max_tokens for r in ok)
    assert result["generated_tok_s"] == pytest.approx(gen / result["seconds"])
    assert result["total_tok_s"] == pytest.approx((gen + sum(len(r.prompt_token_ids) for r in ok)) / result["seconds"])
    for key in ("ttft_s", "itl_s", "e2e_s"):
        p = result[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"]
    assert result["ttft_s"]["p50"] < result["e2e_s"]["p50"]


def test_access_log_leaves_out_routine_polls_but_not_their_failures() -> None:
    import logging

    from orca.engine.server.serve import _not_a_routine_poll

    def record(method: str, path: str, status: int) -> logging.LogRecord:
        return logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                                 ("127.0.0.1:1", method, path, "1.1", status), None)

    assert not _not_a_routine_poll(record("GET", "/ready", 200)) and not _not_a_routine_poll(record("GET", "/metrics", 200))
    assert _not_a_routine_poll(record("GET", "/ready", 503)) and _not_a_routine_poll(record("POST", "/v1/completions", 200))
