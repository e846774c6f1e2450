"""Greedy outputs equal transformers token for token (float32), however the engine batches the requests."""
from __future__ import annotations

import pytest

from conftest import NEW_TOKENS, PROMPTS, hf_greedy
from orca.engine import LLM, SamplingParams
from orca.engine.llm_engine import LLMEngine

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", kv_cache_memory="512MiB")


@pytest.fixture(scope="module")
def prompt_ids(llm: LLM) -> list[list[int]]:
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    lengths = sorted(map(len, ids))
    assert lengths[0] <= 2 and lengths[-1] >= 400, lengths  # very different lengths, as the test intends
    return ids


@pytest.fixture(scope="module")
def expected(hf_model, prompt_ids: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf_model, ids, NEW_TOKENS) for ids in prompt_ids]


def run(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompt_ids, sampling_params=GREEDY, use_tqdm=False)]


def test_one_at_a_time(llm: LLM, prompt_ids, expected) -> None:
    for ids, want in zip(prompt_ids, expected):
        assert run(llm, [ids]) == [want]


def test_all_at_once(llm: LLM, prompt_ids, expected) -> None:
    assert run(llm, prompt_ids) == expected


def drive_staggered(engine: LLMEngine, prompt_ids: list[list[int]]) -> dict[str, list[int]]:
    """Add a new request every other iteration, so each joins while the earlier ones are mid-decode."""
    batches: list[list[int]] = []
    run_batch = engine.runner.run
    engine.runner.run = lambda b: batches.append(list(b.num_new_tokens)) or run_batch(b)
    pending = list(enumerate(prompt_ids))
    done: dict[str, list[int]] = {}
    try:
        for it in range(10_000):
            if pending and it % 2 == 0:
                i, ids = pending.pop(0)
                engine.add_request(f"s{i}", ids, GREEDY)
            if not (pending or engine.has_unfinished_requests()):
                break
            for o in engine.step():
                if o.finished:
                    done[o.request_id] = o.token_ids
                    engine.release(o.request_id)
    finally:
        engine.runner.run = run_batch
    # Selective batching: some iteration ran a prompt and single decode tokens together.
    assert any(max(b) > 1 and min(b) == 1 for b in batches), batches
    return done


def test_staggered_arrivals(llm: LLM, prompt_ids, expected) -> None:
    done = drive_staggered(llm.engine, prompt_ids)
    assert [done[f"s{i}"] for i in range(len(prompt_ids))] == expected


def test_chunked_prefill(prompt_ids, expected) -> None:
    llm = LLM(dtype="float32", kv_cache_memory="512MiB", max_num_batched_tokens=48)
    assert max(map(len, prompt_ids)) > 48
    assert run(llm, prompt_ids) == expected


def test_prefix_cache_hits(llm: LLM, prompt_ids, expected) -> None:
    bm = llm.engine.block_manager
    hits_before = bm.prefix_hits
    outs = llm.generate(prompt_token_ids=prompt_ids, sampling_params=GREEDY, use_tqdm=False)
    assert bm.prefix_hits > hits_before
    assert sum(o.num_cached_tokens > 0 for o in outs) >= 4
    assert [o.token_ids for o in outs] == expected


def test_recompute_preemption_small_pool(prompt_ids, expected) -> None:
    longest = max(map(len, prompt_ids)) + NEW_TOKENS
    # Room for the longest request plus a little: far less than all eight need at once.
    per_token = 2 * 30 * 3 * 64 * 4
    budget = (longest + 64) * per_token
    llm = LLM(dtype="float32", kv_cache_memory=str(budget), preemption="recompute")
    assert llm.engine.block_manager.num_blocks * 16 < sum(map(len, prompt_ids)) + 8 * NEW_TOKENS
    assert run(llm, prompt_ids) == expected
    assert llm.engine.scheduler.num_preemptions > 0
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
