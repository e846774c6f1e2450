"""The server-facing engine: a model-loop thread feeding per-request asyncio streams."""
from __future__ import annotations

import asyncio

import pytest

from orca.engine import LLM, AsyncLLMEngine, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Kubernetes is", "Write a haiku about rain"]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="128MiB", max_model_len=256)


def test_streams_match_offline_generate_and_free_blocks(llm: LLM) -> None:
    params = SamplingParams(max_tokens=24, temperature=0.0)
    offline = [o.text for o in llm.generate(PROMPTS, params, use_tqdm=False)]

    async def run() -> list[str]:
        engine = AsyncLLMEngine(llm.engine)

        async def one(prompt: str) -> str:
            text, finished = "", 0
            async for out in engine.generate(prompt, params):
                text += out.new_text
                finished += out.finished
            assert finished == 1 and text == out.text
            return text

        try:
            return await asyncio.gather(*(one(p) for p in PROMPTS))
        finally:
            engine.shutdown()

    assert asyncio.run(run()) == offline
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_closing_a_stream_aborts_its_request(llm: LLM) -> None:
    async def run() -> int:
        engine = AsyncLLMEngine(llm.engine)
        try:
            long = SamplingParams(max_tokens=200, ignore_eos=True)
            gen = engine.generate("Count to a thousand:", long)
            async for _ in gen:
                break
            await gen.aclose()  # what a disconnecting client's handler does
            # a request after the abort still completes, so the loop saw the abort first
            async for out in engine.generate("Hello", SamplingParams(max_tokens=4)):
                pass
            assert out.finished
            return engine.num_streams
        finally:
            engine.shutdown()

    assert asyncio.run(run()) == 0
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_stop_string_ends_the_stream_and_the_request(llm: LLM) -> None:
    async def run() -> str:
        engine = AsyncLLMEngine(llm.engine)
        try:
            async for out in engine.generate("1, 2, 3, 4, 5, 6,", SamplingParams(max_tokens=60, stop=[" 9"])):
                pass
            return out.text, out.finish_reason
        finally:
            engine.shutdown()

    text, reason = asyncio.run(run())
    assert reason == "stop" and " 9" not in text and "8" in text
    assert not llm.engine.has_unfinished_requests()
