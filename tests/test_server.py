"""The real `orca serve` on 127.0.0.1, driven by the official openai client and raw HTTP."""
from __future__ import annotations

import asyncio
import json
import re
import socket
import time

import httpx
import openai
import pytest

from conftest import ServerProcess
from orca.engine.server.protocol import (ChatCompletionChunk, ChatCompletionResponse, CompletionResponse,
                                         ErrorResponse, ModelList)

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def server() -> ServerProcess:
    # float32: these tests compare the greedy tokens of separate requests, exact only in float32. In bf16 a
    # logit of ~16 resolves 0.125 (the chat test's top two differ by 0.04), and a prefix-cache hit computes
    # the prompt's tail in other GEMM shapes, so a near tie may flip between two identical requests.
    with ServerProcess("--dtype", "float32", "--kv-cache-memory", "256MiB", "--max-model-len", "1024", "--max-waiting", "256") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(rf"^orca:{name}\{{[^}}]*\}} (\S+)$", text, re.MULTILINE)
    assert m, f"metric orca:{name} missing"
    return float(m.group(1))


def aborts(server: ServerProcess) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    m = re.search(r'^orca:request_success_total\{finished_reason="abort"[^}]*\} (\S+)$', text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def openai_error(response: httpx.Response) -> dict:
    """The `error` of OpenAI's error shape, which every failed request must answer in."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"], response.text
    return error


def test_health_ready_models(server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_stream_equals_non_stream_and_usage(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24, temperature=0)
    assert full.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=24,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    if full.choices[0].finish_reason == "length":
        assert full.usage.completion_tokens == 24


def test_chat_stream_equals_non_stream(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    assert text and full.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text
    assert full.usage.completion_tokens <= 30


def test_stop_string(client: openai.OpenAI) -> None:
    free = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0).choices[0].text
    assert " 7" in free
    out = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, temperature=0, stop=[" 7"])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == free[:free.index(" 7")]


def test_seed_and_n(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw).choices[0].text
    b = client.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    many = client.completions.create(n=3, seed=7, **kw)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].text == a  # the first of n uses the seed itself
    assert len({c.text for c in many.choices}) > 1
    assert many.usage.completion_tokens == 48


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(len(t) >= 3 for t in lp.top_logprobs) and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    # greedy: the chosen token is the most likely one
    assert all(c.logprob == max(t.logprob for t in c.top_logprobs) for c in content)


def test_streamed_n_and_several_prompts_with_usage(client: openai.OpenAI) -> None:
    """n choices per prompt, prompt-major; streamed text per index equals the non-streamed choices."""
    kw = dict(model=MODEL, prompt=[[504, 2536, 314], [28, 1159]], max_tokens=6, temperature=0.8, seed=11, n=2,
              extra_body={"ignore_eos": True})
    full = client.completions.create(**kw)
    assert [c.index for c in full.choices] == [0, 1, 2, 3]
    texts: dict[int, str] = {}
    usage = None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
        usage = chunk.usage or usage
    assert [texts[i] for i in range(4)] == [c.text for c in full.choices]
    assert usage.completion_tokens == full.usage.completion_tokens == 24
    assert usage.prompt_tokens == full.usage.prompt_tokens == 5  # counted once per prompt, not once per choice


def test_chat_n_stream_usage_and_max_completion_tokens(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello."}]
    stream = client.chat.completions.create(model=MODEL, messages=messages, n=2, max_completion_tokens=5,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    texts = ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
             for i in range(2)]
    assert texts[0] == texts[1] and texts[0]  # greedy: both choices agree
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 10
    full = client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=5, temperature=0)
    assert full.choices[0].message.content == texts[0]
    assert full.usage.prompt_tokens == chunks[-1].usage.prompt_tokens


def test_echo_and_streamed_logprob_offsets(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0, echo=True, logprobs=1)
    full = client.completions.create(**kw).choices[0]
    assert full.text.startswith("Hello there")
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == full.text
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == full.logprobs.text_offset and offsets[0] == len("Hello there")


def test_tiny_temperature_is_greedy_and_priority_is_accepted(client: openai.OpenAI) -> None:
    greedy = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0)
    tiny = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=1e-300,
                                     extra_body={"priority": -5})
    assert tiny.choices[0].text == greedy.choices[0].text


EXTREME = [
    {"top_k": 2**70, "temperature": 1.0},
    {"repetition_penalty": 1e30, "frequency_penalty": -2, "presence_penalty": 2, "temperature": 2.0},
    {"seed": 2**63 - 1, "n": 3, "temperature": 1.0},
    {"priority": -(10**30), "min_p": 1.0, "top_p": 1e-9, "temperature": 1.0},
    {"stop": ["a", "b", "\n", "the", " "], "logprobs": 20},
]


@pytest.mark.parametrize("extra", EXTREME, ids=[",".join(e) for e in EXTREME])
def test_extreme_but_valid_values_are_served(server: ServerProcess, extra: dict) -> None:
    """Values at the edges of what the schema allows must neither fail nor hurt the model loop."""
    r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                   json={"model": MODEL, "prompt": "Hello", "max_tokens": 3, **extra})
    assert r.status_code == 200, r.text
    CompletionResponse.model_validate(r.json())
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_bodies_match_the_published_models(server: ServerProcess) -> None:
    """The handlers build plain dicts; these are the shapes /openapi.json promises."""
    url = server.url
    ModelList.model_validate(httpx.get(f"{url}/v1/models").json())
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "logprobs": True,
            "top_logprobs": 2, "n": 2}
    ChatCompletionResponse.model_validate(httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60).json())
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=60,
                      json={**chat, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionChunk.model_validate_json(e) for e in events[:-1]]
    assert chunks[-1].usage is not None and chunks[0].choices[0].delta.role == "assistant"
    with httpx.stream("POST", f"{url}/v1/completions", timeout=60,
                      json={"model": MODEL, "prompt": "Hi", "max_tokens": 3, "stream": True, "logprobs": 1}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(CompletionResponse.model_validate_json(e).choices for e in events[:-1])
    err = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "top_p": 5})
    assert ErrorResponse.model_validate(err.json()).error.param == "top_p"


BAD = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "word " * 1100, "max_tokens": 1}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000}, 400,
     "max_tokens"),
]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_name_the_field_and_the_server_keeps_serving(server: ServerProcess, client: openai.OpenAI,
                                                                   path: str, body: dict, status: int, param: str) -> None:
    r = httpx.post(server.url + path, json={"model": MODEL, **body}, timeout=30)
    assert r.status_code == status, r.text
    assert openai_error(r)["param"] == param
    ok = client.completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert ok.choices[0].text is not None


UNPARSABLE = {
    "malformed": b"{not json",
    "not-utf-8": b'{"model": "\xff\xfe", "prompt": "x"}',
    "nested-arrays": b"[" * 20000 + b"]" * 20000,  # past the JSON decoder's recursion limit
    "nested-objects": b'{"a": ' * 20000 + b"1" + b"}" * 20000,
    "huge-integer": b'{"model": "%s", "prompt": "x", "seed": %s}' % (MODEL.encode(), b"9" * 5000),
}


@pytest.mark.parametrize("body", list(UNPARSABLE.values()), ids=list(UNPARSABLE))
def test_unparsable_bodies_get_openai_errors_and_the_server_keeps_serving(server: ServerProcess,
                                                                          client: openai.OpenAI, body: bytes) -> None:
    def greedy() -> str:
        return client.completions.create(model=MODEL, prompt="The sky is", max_tokens=6, temperature=0).choices[0].text

    before = greedy()
    r = httpx.post(f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert openai_error(r)["type"] == "invalid_request_error"
    assert greedy() == before


def test_unknown_paths_and_methods_get_openai_errors(server: ServerProcess) -> None:
    missing = httpx.post(f"{server.url}/v1/embeddings", json={"model": MODEL, "input": "x"})
    assert missing.status_code == 404 and "/v1/embeddings" in openai_error(missing)["message"]
    wrong = httpx.get(f"{server.url}/v1/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    openai_error(wrong)


def test_cancelled_streams_free_their_blocks(server: ServerProcess) -> None:
    async def run() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

        async def one(i: int) -> str:
            stream = await aclient.completions.create(model=MODEL, prompt=f"Story number {i}:", max_tokens=40,
                                                      temperature=0, stream=True, extra_body={"ignore_eos": True})
            text, seen, reason = "", 0, None
            async for chunk in stream:
                text += chunk.choices[0].text
                reason = chunk.choices[0].finish_reason or reason
                seen += 1
                if i % 2 and seen == 2:
                    await stream.close()  # the client goes away mid-stream
                    return "cancelled"
            assert reason == "length", reason
            return text

        try:
            return await asyncio.gather(*(one(i) for i in range(32)))
        finally:
            await aclient.close()

    aborted = aborts(server)
    results = asyncio.run(run())
    assert results.count("cancelled") == 16
    assert all(r != "cancelled" and r for r in results[::2])
    deadline = time.monotonic() + 30
    while metric(server, "kv_cache_usage_perc") != 0 or metric(server, "num_requests_running") != 0:
        assert time.monotonic() < deadline, "KV blocks of cancelled streams were not freed"
        time.sleep(0.2)
    assert aborts(server) == aborted + 16


def test_non_streamed_request_is_aborted_when_the_client_disconnects(server: ServerProcess) -> None:
    """Nobody reads the answer any more, so the server must stop generating and free the blocks."""
    body = json.dumps({"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 900, "temperature": 0,
                       "ignore_eos": True}).encode()
    generated, aborted = metric(server, "generation_tokens_total"), aborts(server)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 30
        while metric(server, "generation_tokens_total") == generated:  # it is generating
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
    finally:
        sock.close()
    deadline = time.monotonic() + 30
    while metric(server, "num_requests_running") != 0 or metric(server, "kv_cache_usage_perc") != 0:
        assert time.monotonic() < deadline, "the abandoned request kept running"
        time.sleep(0.05)
    assert aborts(server) == aborted + 1
    assert metric(server, "generation_tokens_total") - generated < 900


def test_metrics_exposition(server: ServerProcess) -> None:
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "num_preemptions_total",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "time_to_first_token_seconds_bucket",
                 "inter_token_latency_seconds_bucket", "e2e_request_latency_seconds_bucket",
                 "request_queue_time_seconds_bucket", "iteration_tokens_bucket"):
        assert re.search(rf"^orca:{name}\{{.*model_name=\"{MODEL}\"", text, re.MULTILINE), name
    assert metric(server, "generation_tokens_total") > 0
    assert 'finished_reason="length"' in text


def test_bench_serve_against_the_server(server: ServerProcess, tmp_path) -> None:
    from orca.engine.cli import main

    out = tmp_path / "serve.json"
    assert main(["bench", "serve", "--url", server.url, "--rate", "4", "--num-requests", "3",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["completed"] == 3 and result["failed"] == 0 and result["rate"] == 4
    assert result["generated_tok_s"] > 0 and 0 < result["ttft_s"]["p50"] <= result["e2e_s"]["p99"]
