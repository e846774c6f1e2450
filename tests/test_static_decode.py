"""The decode path CUDA graphs replay (persistent buffers, batches padded to bucket sizes, padded rows that
store nothing) gives the eager path's greedy tokens; here it runs eagerly, so it is tested without a GPU."""
from __future__ import annotations

import pytest

from orca.engine import LLM, SamplingParams
from orca.engine.static_decode import StaticDecodeRunner

from conftest import PROMPTS, drain

pytestmark = pytest.mark.slow


def greedy_tokens(llm: LLM) -> dict[str, list[int]]:
    for i, prompt in enumerate(PROMPTS[:5]):  # 5 requests: decode batches of 5, 4, ... padded to 8 and 4
        llm.engine.add_request(str(i), prompt, SamplingParams(temperature=0.0, max_tokens=12 + 3 * i, ignore_eos=True))
    return {request_id: out.token_ids for request_id, out in drain(llm).items()}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_static_decode_path_matches_eager(dtype: str) -> None:
    # Batch invariant, so that bf16 GEMMs padded from 5 rows to 8 give the 5 rows' bits (oneDNN's do not
    # on a Sapphire Rapids Xeon otherwise); what is tested is that padding and persistent buffers change nothing.
    llm = LLM(dtype=dtype, kv_cache_memory="128MiB", max_model_len=512, batch_invariant=True)
    eager = greedy_tokens(llm)
    llm.engine.runner.enable_static_decode(capture=False)
    static = llm.engine.runner.static_decode
    calls = []
    run = static.run
    static.run = lambda *args: calls.append(args[2].num_actual_tokens) or run(*args)
    assert greedy_tokens(llm) == eager
    assert {5, 4, 3, 1} <= set(calls)  # decode steps took the static path at several padded sizes
    assert static.graphs == {}  # no CUDA here: nothing was captured


def test_buckets_pad_to_the_next_size() -> None:
    llm = LLM(dtype="float32", kv_cache_memory="64MiB", max_model_len=256, max_batch_size=40)
    static = StaticDecodeRunner(llm.engine.runner, capture=False)
    assert static.buckets == [1, 2, 4, 8, 16, 32, 40]
