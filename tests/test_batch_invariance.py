"""A seeded request gives the same text whatever else the engine is doing, in bf16, the default dtype here.

In bf16 the last bits of a row's logits depend on how it was computed: a one-row GEMM reduces in
another order than a batched one, and batched prefill attention reduces in an order that follows
the chunk's shape. These tests put the same seeded request alone, beside its n siblings, beside 30
other streams with chunked prompts, after its prompt was cached, and after a preemption, and
require identical logits (bit for bit, not only the sampled tokens, which a small difference flips
only at a near-tie) and identical tokens every time.
"""
from __future__ import annotations

import asyncio
import random
from collections import defaultdict

import openai
import pytest
import torch

from orca.engine import LLM, SamplingParams
from orca.engine.bundled_model import BUNDLED_MODEL_NAME

from conftest import STORY, ServerProcess, drain

pytestmark = pytest.mark.slow

PROMPT = "Continue the story. " + STORY * 3  # ~120 tokens: several KV blocks, so the prefix cache can hit
SEEDED = SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)


def other_prompts(count: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of 5..300 tokens: with a 128-token budget most prefills are chunked."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randrange(5, 300))] for _ in range(count)]


class LogitsRecorder:
    """Wraps the engine's sampler to keep every request's logits, step by step."""

    def __init__(self, llm: LLM) -> None:
        self.sampler, self.logits = llm.engine.runner.sampler, defaultdict(list)
        llm.engine.runner.sampler = self

    def __call__(self, logits: torch.Tensor, seqs: list) -> tuple:
        for row, seq in zip(logits, seqs):
            self.logits[seq.request_id].append(row.clone())
        return self.sampler(logits, seqs)

    def same(self, a: str, b: str) -> bool:
        return torch.equal(torch.stack(self.logits[a]), torch.stack(self.logits[b]))


def run_to_completion(llm: LLM) -> dict[str, list[int]]:
    return {request_id: out.token_ids for request_id, out in drain(llm).items()}


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="bfloat16", max_num_batched_tokens=128, kv_cache_memory="64MiB", max_model_len=512)


def test_seeded_request_alone_with_siblings_beside_others_and_cached(llm: LLM) -> None:
    engine, recorder = llm.engine, LogitsRecorder(llm)
    engine.add_request("alone", PROMPT, SEEDED)
    alone = run_to_completion(llm)["alone"]

    engine.add_request("cached", PROMPT, SEEDED)  # its prompt blocks now come from the prefix cache
    assert run_to_completion(llm)["cached"] == alone
    assert recorder.same("cached", "alone")

    for i, seed in enumerate([7, 8, 9]):  # the server's n=3: seeds 7, 8, 9 on the same prompt
        engine.add_request(f"sibling-{i}", PROMPT, SamplingParams(temperature=1.0, seed=seed, max_tokens=24,
                                                                  ignore_eos=True))
    siblings = run_to_completion(llm)
    assert siblings["sibling-0"] == alone
    assert recorder.same("sibling-0", "alone")
    assert siblings["sibling-1"] != alone

    # 30 others, greedy and sampled, arriving before and after it: decode batches of every size and
    # the seeded prompt cut into chunks by the 128-token budget.
    others = other_prompts(30)
    for i, ids in enumerate(others[:12]):
        engine.add_request(f"other-{i}", ids, SamplingParams(temperature=0.8 * (i % 2), max_tokens=20 + i))
    for _ in range(3):
        engine.step()
    engine.add_request("busy", PROMPT, SEEDED)
    for i, ids in enumerate(others[12:], start=12):
        engine.add_request(f"other-{i}", ids, SamplingParams(temperature=0.8 * (i % 2), max_tokens=20 + i))
    busy = run_to_completion(llm)
    assert len(busy) == 31
    assert busy["busy"] == alone
    assert recorder.same("busy", "alone")


def test_seeded_request_survives_preemption() -> None:
    """Recompute preemption replays generated tokens as a prompt; they must attend as they did as decodes."""
    small = LLM(dtype="bfloat16", max_num_batched_tokens=256, kv_cache_memory="12MiB", max_model_len=512,
                preemption="recompute", enable_prefix_caching=False)
    recorder = LogitsRecorder(small)
    small.engine.add_request("alone", PROMPT, SEEDED)
    alone = run_to_completion(small)["alone"]
    for i, ids in enumerate(other_prompts(6, seed=1)):
        small.engine.add_request(f"other-{i}", ids, SamplingParams(temperature=0.0, max_tokens=40))
    small.engine.add_request("crowded", PROMPT, SEEDED)
    crowded = run_to_completion(small)
    assert small.engine.scheduler.num_preemptions > 0
    assert crowded["crowded"] == alone
    assert recorder.same("crowded", "alone")


def test_batch_invariant_mode_covers_greedy_requests() -> None:
    invariant = LLM(dtype="bfloat16", max_num_batched_tokens=128, kv_cache_memory="64MiB", max_model_len=512,
                    batch_invariant=True)
    recorder = LogitsRecorder(invariant)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    invariant.engine.add_request("alone", PROMPT, greedy)
    alone = run_to_completion(invariant)["alone"]
    for i, ids in enumerate(other_prompts(12, seed=2)):
        invariant.engine.add_request(f"other-{i}", ids, SamplingParams(temperature=0.0, max_tokens=20))
    invariant.engine.add_request("busy", PROMPT, greedy)
    assert run_to_completion(invariant)["busy"] == alone
    assert recorder.same("busy", "alone")


def test_server_seeded_request_alone_in_n_and_beside_30_streams() -> None:
    """The user's view: the same seeded request over HTTP, in bf16, gets the same text every time."""
    with ServerProcess("--dtype", "bfloat16", "--max-num-batched-tokens", "128", "--max-model-len", "512") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        seeded = dict(model=BUNDLED_MODEL_NAME, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=7,
                      extra_body={"ignore_eos": True})
        alone = client.completions.create(**seeded).choices[0].text
        assert client.completions.create(**seeded).choices[0].text == alone
        many = client.completions.create(n=3, **seeded)
        assert many.choices[0].text == alone

        async def beside_others() -> tuple[str, list[str]]:
            aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            started = asyncio.Event()

            async def stream(i: int, ids: list[int]) -> str:
                chunks = await aclient.completions.create(model=BUNDLED_MODEL_NAME, prompt=ids, max_tokens=32,
                                                          temperature=0.7 * (i % 2), stream=True,
                                                          extra_body={"ignore_eos": True})
                text = ""
                async for chunk in chunks:
                    started.set()
                    text += chunk.choices[0].text
                return text

            streams = [asyncio.create_task(stream(i, ids)) for i, ids in enumerate(other_prompts(30, seed=3))]
            await asyncio.wait_for(started.wait(), 60)
            text = (await aclient.completions.create(**seeded)).choices[0].text
            others = await asyncio.wait_for(asyncio.gather(*streams), 300)
            await aclient.close()
            return text, others

        busy, others = asyncio.run(beside_others())
        assert busy == alone
        assert len(others) == 30 and all(others)
