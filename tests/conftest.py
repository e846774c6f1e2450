"""Shared fixtures: the bundled model's path and a float32 transformers reference built from the same GGUF."""
from __future__ import annotations

import faulthandler
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx

import pytest
import torch

from orca.engine.bundled_model import bundled_model_path
from orca.engine.hf_reference import load_hf_model

SYSTEM = ("You are Orca, a meticulous assistant for platform engineers. You answer questions about Kubernetes, "
          "GPUs, batching and schedulers with short, precise sentences, cite the relevant API object, and never "
          "invent flags that do not exist. When unsure, you say so and suggest how to check.")
STORY = ("The lighthouse keeper climbed the spiral stairs each evening, counting the steps aloud, ninety-one, "
         "ninety-two, until the lamp room opened above him like a glass flower. ")

# Eight prompts of very different lengths; the last two share a long system prefix (prefix-cache hits).
PROMPTS = [
    "Hi",
    "The capital of France is",
    "List three prime numbers and explain why each is prime:",
    "Summarize the following story in one sentence. " + STORY * 3,
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n" + "    # iterative version\n" * 4,
    "Continue the story. " + STORY * 14,
    SYSTEM + "\nQuestion: what does a PodDisruptionBudget protect against?\nAnswer:",
    SYSTEM + "\nQuestion: why does continuous batching raise GPU utilisation?\nAnswer:",
]
NEW_TOKENS = 32
# A hang must cost minutes, not CI's whole budget: past these, the stacks are printed and the run ends.
TEST_TIMEOUT_S = 1500  # one test with its fixtures' set-up (a cold dev cluster builds kernels)
EXIT_TIMEOUT_S = 300  # from the summary to the process's end (threads a failed test left behind)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def pytest_unconfigure(config: pytest.Config) -> None:
    faulthandler.dump_traceback_later(EXIT_TIMEOUT_S, exit=True)


@pytest.fixture(scope="session")
def model_path() -> str:
    return bundled_model_path()


@pytest.fixture(scope="session")
def hf_model(model_path: str):
    pytest.importorskip("transformers")
    return load_hf_model(model_path, "float32")


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding with the reference's own KV cache, EOS ignored."""
    out = model(torch.tensor([prompt_ids], device=model.device), use_cache=True)
    tokens = [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(torch.tensor([[tokens[-1]]], device=model.device), past_key_values=out.past_key_values,
                    use_cache=True)
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def drain(llm, limit: int = 5000) -> dict:
    """Step the engine until every request finished; {request_id: final RequestOutput}."""
    done = {}
    for _ in range(limit):
        if not llm.engine.has_unfinished_requests():
            return done
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out
                llm.engine.release(out.request_id)
    raise AssertionError("engine did not drain")


class ServerProcess:
    """A real `orca serve` on a free loopback port, for tests that talk HTTP to it."""

    def __init__(self, *args: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONSAFEPATH": "1"}
        env.pop("ORCA_API_KEY", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orca.engine.cli", "serve", "--port", str(self.port), "--log-level", "warning",
             *args], env=env)

    def wait_ready(self, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def __enter__(self) -> ServerProcess:
        """Ready to serve on entry; killed on exit, whatever the test did."""
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def k8s():
    """A real kube-apiserver + controller-manager + etcd on loopback, once per test session."""
    from k8s import cluster

    c = cluster.start()
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(scope="module")
def dev_cluster(tmp_path_factory):
    """`orca dev cluster up` in a fresh state directory, once per module; `down` after it."""
    from orca.operator.dev import cluster

    state = tmp_path_factory.mktemp("dev-cluster")
    plane = cluster.up(state)
    try:
        yield plane
    finally:
        cluster.down(state)


@pytest.fixture(scope="module")
def dev_core(dev_cluster):
    from kubernetes import client, config

    return client.CoreV1Api(config.new_client_from_config(str(dev_cluster.state_dir / "admin.kubeconfig")))
