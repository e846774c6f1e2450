"""Distributed execution on CPU with gloo: tensor and pipeline parallel workers equal one process.

Every layout runs real worker processes (gRPC control, torch.distributed activations and
collectives) and must give the single-process engine's greedy tokens, token for token, in float32,
with requests arriving while others run. Tiny random Llamas make the layouts SmolLM2's heads do not
allow: 8 query / 2 KV heads split KV heads at tp=2 and replicate them at tp=4.
"""
from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from orca.engine import LLM, SamplingParams
from orca.engine.distributed import contract
from orca.engine.distributed.contract import WorkerEnvironment

from conftest import ServerProcess

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512, "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
    "head_dim": 16, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2,
    "initializer_range": 0.2,  # wide weights: greedy tokens vary instead of repeating one token
}
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> str:
    directory = tmp_path_factory.mktemp("tiny")
    (directory / "config.json").write_text(json.dumps(TINY))
    return str(directory)


def prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(3, 70))] for _ in range(count)]


def staggered(llm: LLM, requests: list[list[int]], params: SamplingParams) -> dict[str, tuple[list[int], list]]:
    """Continuous batching with arrivals: a new request joins every other iteration while others decode."""
    engine, pending, done, step = llm.engine, list(enumerate(requests)), {}, 0
    while pending or engine.has_unfinished_requests():
        if pending and step % 2 == 0:
            index, prompt = pending.pop(0)
            engine.add_request(str(index), prompt, params)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = (out.token_ids, out.logprobs)
                engine.release(out.request_id)
        step += 1
        assert step < 5000, "engine did not drain"
    return done


def assert_same(expected: dict, got: dict) -> None:
    assert sorted(got) == sorted(expected)
    for request_id, (tokens, logprobs) in expected.items():
        assert got[request_id][0] == tokens, f"request {request_id}"
        for want, have in zip(logprobs, got[request_id][1]):
            assert want.keys() == have.keys()
            assert all(abs(want[t] - have[t]) < 1e-3 for t in want)


def engine_args(model: str | None, load_format: str) -> dict:
    return dict(model=model, load_format=load_format, dtype="float32", kv_cache_memory="32MiB",
                max_num_batched_tokens=64, max_model_len=256)


@pytest.fixture(scope="module")
def tiny_reference(tiny: str) -> dict:
    return staggered(LLM(**engine_args(tiny, "dummy")), prompts(8), GREEDY)


@pytest.mark.parametrize("tensor, pipeline", [(2, 1), (4, 1), (1, 2), (1, 3), (2, 2)],
                         ids=["tp2-split-kv", "tp4-replicated-kv", "pp2", "pp3", "tp2-pp2"])
def test_layouts_equal_one_process(tiny: str, tiny_reference: dict, tensor: int, pipeline: int) -> None:
    llm = LLM(**engine_args(tiny, "dummy"), tensor_parallel_size=tensor, pipeline_parallel_size=pipeline)
    try:
        assert_same(tiny_reference, staggered(llm, prompts(8), GREEDY))
    finally:
        llm.engine.shutdown()


def test_smollm2_tp3_splits_its_three_kv_heads() -> None:
    """The bundled model, real weights: 9 query and 3 KV heads over 3 ranks, one KV head each."""
    args = engine_args(None, "auto")
    requests = prompts(4, seed=1)
    expected = staggered(LLM(**args), requests, GREEDY)
    llm = LLM(**args, tensor_parallel_size=3)
    try:
        assert_same(expected, staggered(llm, requests, GREEDY))
    finally:
        llm.engine.shutdown()


def test_layouts_the_model_cannot_take_fail_before_any_process_starts(tiny: str) -> None:
    with pytest.raises(ValueError, match="tensor_parallel_size=3 must divide the model's 8 attention heads"):
        LLM(**engine_args(tiny, "dummy"), tensor_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline_parallel_size=5 exceeds the model's 4 layers"):
        LLM(**engine_args(tiny, "dummy"), pipeline_parallel_size=5)


def test_pipeline_keeps_two_batches_in_flight_with_no_request_in_both(tiny: str) -> None:
    llm = LLM(**engine_args(tiny, "dummy"), pipeline_parallel_size=2)
    engine = llm.engine
    flights: dict[int, tuple[set[str], float, float | None]] = {}  # step id -> (requests, sent, returned)
    execute, update = engine.executor.execute_model, engine.scheduler.update_from_output
    order: list[int] = []

    def traced_execute(batch):  # noqa: ANN001, ANN202
        step_id = engine.executor.encoder.next_step_id
        flights[step_id] = ({s.request_id for s in batch.seqs}, time.monotonic(), None)
        order.append(step_id)
        return execute(batch)

    def traced_update(batch, sampled):  # noqa: ANN001, ANN202
        step_id = order.pop(0)
        flights[step_id] = (flights[step_id][0], flights[step_id][1], time.monotonic())
        return update(batch, sampled)

    engine.executor.execute_model, engine.scheduler.update_from_output = traced_execute, traced_update
    try:
        staggered(llm, prompts(12, seed=2), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
        spans = engine.executor.timeline()
    finally:
        llm.engine.shutdown()
    # the master: batches overlap in flight, and overlapping batches share no request
    overlapping = 0
    for a, (requests_a, sent_a, back_a) in flights.items():
        for b, (requests_b, sent_b, back_b) in flights.items():
            if a < b and sent_b < back_a:
                overlapping += 1
                assert not requests_a & requests_b, f"steps {a} and {b} both carry {requests_a & requests_b}"
    assert overlapping >= 5
    # the workers: stage 0 computes a later step while stage 1 still computes an earlier one
    stage0 = {s.step_id: s for s in spans if s.stage == 0}
    stage1 = {s.step_id: s for s in spans if s.stage == 1}
    assert stage0.keys() == stage1.keys() == flights.keys()
    concurrent = sum(1 for step, late in stage1.items() for other, early in stage0.items()
                     if other > step and early.start < late.end)
    assert concurrent >= 3, "the two stages never worked at the same time"


@pytest.mark.parametrize("layout", [["--tensor-parallel-size", "3"], ["--pipeline-parallel-size", "2"]],
                         ids=["tp3", "pp2"])
def test_orca_serve_pipeline_and_tensor_parallel_equal_one_process(layout: list[str]) -> None:
    """`orca serve -tp 3` and `-pp 2`: chat and streamed completions with the openai client equal the
    in-process engine."""
    args = ["--dtype", "float32", "--kv-cache-memory", "64MiB", "--max-model-len", "512"]
    messages = [{"role": "user", "content": "Name three colours."}]
    llm = LLM(dtype="float32", kv_cache_memory="64MiB", max_model_len=512)
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    want_chat = llm.chat(messages, greedy, use_tqdm=False)[0].text
    want_completion = llm.generate(["Once upon a time"], greedy, use_tqdm=False)[0].text
    with ServerProcess(*args, *layout) as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
        chat = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, max_tokens=24,
                                              temperature=0)
        assert chat.choices[0].message.content == want_chat
        stream = client.completions.create(model="SmolLM2-135M-Instruct", prompt="Once upon a time", max_tokens=24,
                                           temperature=0, stream=True)
        assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want_completion


def worker_pids(parent: int) -> list[int]:
    return [int(pid) for pid in subprocess.run(["pgrep", "-P", str(parent)], capture_output=True,
                                               text=True).stdout.split()]


def test_a_dead_worker_fails_requests_turns_unready_and_every_process_exits(tiny: str) -> None:
    server = ServerProcess("--model", tiny, "--load-format", "dummy", "--dtype", "float32", "--kv-cache-memory",
                           "32MiB", "--pipeline-parallel-size", "2")
    with server:
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model=tiny, prompt="1 2 3", max_tokens=400, temperature=0,
                                           stream=True, extra_body={"ignore_eos": True})
        next(iter(stream))  # generation is under way
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        with pytest.raises(openai.APIError, match="distributed worker failed"):
            for _ in stream:
                pass
        statuses = set()
        while server.proc.poll() is None and time.monotonic() - killed < 30:
            try:
                statuses.add(httpx.get(f"{server.url}/ready", timeout=1).status_code)
                response = httpx.post(f"{server.url}/v1/completions", json={"model": tiny, "prompt": "1"}, timeout=2)
                statuses.add(response.status_code)
                if response.status_code == 503:
                    assert response.json()["error"]["code"] == "engine_failed"
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        assert server.proc.wait(timeout=30) == 1
        assert time.monotonic() - killed < 30
        assert statuses == {503}
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in workers if Path(f"/proc/{pid}").exists()]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pods_start_from_the_environment_the_operator_renders(tmp_path: Path) -> None:
    """The StatefulSet of a tp=3, pp=2 replica, run as two 'pods': each process gets the rendered env
    with its fieldRefs resolved as the kubelet would (pod name, pod IP) and the master's DNS name
    resolved as cluster DNS would (ORCA_HOSTS, which the one-machine node agent sets)."""
    from orca.operator import render

    od = {"metadata": {"name": "sm", "namespace": "ns", "uid": "u"},
          "spec": {"model": {"name": "SmolLM2-135M-Instruct"}, "parallelism": {"tensor": 3, "pipeline": 2},
                   "resources": {"requests": {"cpu": "1"}}}}
    sts = render.statefulset(od, 0)
    container = sts["spec"]["template"]["spec"]["containers"][0]
    assert sts["spec"]["replicas"] == 2
    port = free_port()
    master = contract.master_host(render.group_name(od, 0), "ns")
    pods = []
    for ordinal in range(2):
        ip = f"127.0.0.{ordinal + 1}"
        fields = {"metadata.name": f"sm-r0-{ordinal}", "status.podIP": ip}
        env = {e["name"]: e["value"] if "value" in e else fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
               for e in container["env"]}
        assert WorkerEnvironment.from_environ(env).stage == ordinal
        args = list(container["args"])
        args[args.index("--host") + 1] = ip  # each pod has its own network namespace in a cluster
        args[args.index("--port") + 1] = str(port)
        args += ["--kv-cache-memory", "64MiB", "--max-model-len", "512"]
        log = open(tmp_path / f"pod{ordinal}.log", "w")
        pods.append(subprocess.Popen([sys.executable, "-m", "orca.engine.cli", *args], stdout=log, stderr=log,
                                     env={**os.environ, **env, contract.HOSTS: f"{master}=127.0.0.1",
                                          "PYTHONSAFEPATH": "1"}))
    try:
        deadline = time.monotonic() + 300
        ready = set()
        while ready != {0, 1} and time.monotonic() < deadline:
            for ordinal, pod in enumerate(pods):
                assert pod.poll() is None, (tmp_path / f"pod{ordinal}.log").read_text()[-3000:]
                try:
                    if httpx.get(f"http://127.0.0.{ordinal + 1}:{port}/ready", timeout=1).status_code == 200:
                        ready.add(ordinal)
                except httpx.HTTPError:
                    pass
            time.sleep(0.5)
        assert ready == {0, 1}
        assert len(worker_pids(pods[0].pid)) == len(worker_pids(pods[1].pid)) == 3
        response = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60, json={
            "model": "SmolLM2-135M-Instruct", "prompt": "The capital of France is", "max_tokens": 8,
            "temperature": 0})
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8
        assert httpx.post(f"http://127.0.0.2:{port}/v1/completions", timeout=5, json={}).status_code != 200
    finally:
        for pod in pods:
            pod.kill()
            pod.wait(timeout=30)
