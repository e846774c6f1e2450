"""The engine on the Triton kernels gives transformers' greedy tokens on a tiny random Llama.

On CPUs the kernels run under the Triton interpreter (`ORCA_KERNELS=triton` sends every op of the
facade to them), so the whole Triton path of the engine is checked without a GPU: store by slot
mapping, paged attention over mixed batches of prompt chunks and decodes, norm, rotary, SiLU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from triton_interpreter import use_interpreter_without_cuda

use_interpreter_without_cuda()

from conftest import hf_greedy  # noqa: E402
from orca.engine import LLM, SamplingParams  # noqa: E402
from orca.engine.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from orca.engine.hf_reference import load_hf_model  # noqa: E402
from orca.kernels import ops  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]
# head_dim 64 and a GQA ratio of 2, untied so greedy tokens vary (tied random embeddings echo the input)
TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2, "hidden_size": 128,
        "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
        "vocab_size": 512, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
PROMPTS = [[5, 17, 300, 42], list(range(20, 90)), [7], list(range(100, 140))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


@pytest.fixture
def triton_everywhere(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("ORCA_KERNELS", "triton")
    ops.provider.cache_clear()
    yield
    ops.provider.cache_clear()


def test_engine_on_triton_kernels_matches_transformers(tmp_path: Path, triton_everywhere: None) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    # a 32-token budget chunks the 70- and 40-token prompts, so steps mix chunks with earlier context and decodes
    llm = LLM(model=str(tmp_path), load_format="dummy", dtype="float32", device="cpu", kv_cache_memory="8MiB",
              max_num_batched_tokens=32, block_size=16)
    assert isinstance(llm.engine.runner.attn_backend, TritonAttentionBackend)
    ours = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)]
    hf = load_hf_model(str(tmp_path), "float32", load_format="dummy")
    assert ours == [hf_greedy(hf, ids, GREEDY.max_tokens) for ids in PROMPTS]
    # and the decode path that CUDA graphs replay, padded to buckets, on the same kernels
    llm.engine.runner.enable_static_decode(capture=False)
    again = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)]
    assert again == ours
