"""The engine on CUDA: transformers' greedy tokens in float32 on random weights under every scheduling
scenario, CUDA-graph replay equal to eager, and the server answering. Skipped without CUDA; run by
`tests/gpu_lane.sh` on the GPU machine."""
from __future__ import annotations

import json
import random
from pathlib import Path

import openai
import pytest
import torch

from conftest import NEW_TOKENS, ServerProcess, hf_greedy
from orca.engine import LLM, SamplingParams
from orca.engine.loaders.dummy import config_file
from test_engine_vs_hf import drive_staggered

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The bundled 135M shape with an untied LM head: tied random embeddings make greedy decoding echo its input."""
    config = json.loads(Path(config_file("smollm2-135m")).read_text())
    directory = tmp_path_factory.mktemp("smollm2-untied")
    (directory / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return str(directory)


@pytest.fixture(scope="module")
def prompt_ids() -> list[list[int]]:
    """Eight prompts from 1 to 450 tokens; the last two share a 200-token prefix (prefix-cache hits)."""
    rng = random.Random(0)
    shared = [rng.randrange(100, 40000) for _ in range(200)]
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 5, 17, 60, 130, 450)]
    return prompts + [shared + [11, 12, 13], shared + [21, 22]]


@pytest.fixture(scope="module")
def expected(model_dir: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    from orca.engine.hf_reference import load_hf_model

    torch.backends.cuda.matmul.allow_tf32 = False
    hf = load_hf_model(model_dir, "float32", load_format="dummy", device="cuda")
    tokens = [hf_greedy(hf, ids, NEW_TOKENS) for ids in prompt_ids]
    del hf
    torch.cuda.empty_cache()
    return tokens


def engine(model_dir: str, **overrides: object) -> LLM:
    return LLM(model=model_dir, load_format="dummy", dtype="float32", device="cuda", kv_cache_memory="2GiB",
               **overrides)


def run(llm: LLM, prompt_ids: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(prompt_token_ids=prompt_ids, sampling_params=GREEDY, use_tqdm=False)]


def test_scheduling_scenarios_match_transformers(model_dir: str, prompt_ids, expected) -> None:
    llm = engine(model_dir)
    assert [run(llm, [ids])[0] for ids in prompt_ids] == expected  # one at a time
    assert run(llm, prompt_ids) == expected  # all at once, then again with prefix-cache hits
    hits = llm.engine.block_manager.prefix_hits
    assert run(llm, prompt_ids) == expected and llm.engine.block_manager.prefix_hits > hits
    done = drive_staggered(llm.engine, prompt_ids)
    assert [done[f"s{i}"] for i in range(len(prompt_ids))] == expected
    assert run(engine(model_dir, max_num_batched_tokens=48), prompt_ids) == expected  # chunked prefill
    small = engine(model_dir, kv_cache_memory=str(700 * 2 * 30 * 3 * 64 * 4), preemption="recompute")
    assert run(small, prompt_ids) == expected
    assert small.engine.scheduler.num_preemptions > 0


def test_cuda_graph_replay_equals_eager(model_dir: str, prompt_ids) -> None:
    graphs = engine(model_dir)
    assert graphs.engine.runner.static_decode is not None and graphs.engine.runner.static_decode.graphs
    replayed = run(graphs, prompt_ids)
    graphs.engine.runner.static_decode.graphs.clear()  # the same padded buffers and kernels, run eagerly
    assert run(graphs, prompt_ids) == replayed
    assert run(engine(model_dir, enforce_eager=True), prompt_ids) == replayed  # the unpadded eager path


def test_server_answers_on_cuda() -> None:
    with ServerProcess("--load-format", "dummy", "--model", "smollm2-135m", "--device", "cuda") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        out = client.completions.create(model="smollm2-135m", prompt=[17, 300, 4000], max_tokens=8,
                                        temperature=0.0, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 8 and out.choices[0].finish_reason == "length"
        chunks = list(client.completions.create(model="smollm2-135m", prompt=[17, 300, 4000], max_tokens=8,
                                                temperature=0.0, stream=True, extra_body={"ignore_eos": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text


def test_worker_path_with_nccl_equals_in_process(model_dir: str, prompt_ids, expected) -> None:
    """World size 1 through a worker process (NCCL initialised, gRPC control): the same tokens."""
    llm = engine(model_dir, distributed_executor_backend="mp")
    try:
        assert llm.engine.device.type == "cuda"
        assert run(llm, prompt_ids) == expected
    finally:
        llm.engine.shutdown()
