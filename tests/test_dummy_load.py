"""`--load-format dummy`: any config.json runs with seeded random weights, and transformers runs the same ones."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from conftest import hf_greedy
from orca.engine import LLM, SamplingParams
from orca.engine.cli import main
from orca.engine.loaders import load_model
from orca.engine.loaders.dummy import bundled_config_names, config_file, dummy_config, load_dummy, weight_shapes

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    # Wider than hidden_size / heads (16): the CPU attention kernel takes head_dim 32, 64, 96, 128, 256.
    "head_dim": 32,
    "vocab_size": 512,
    "max_position_embeddings": 1024,  # room for the benchmark workload's longest request (768 tokens)
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
PROMPTS = [[5, 17, 300, 42], list(range(20, 70)), [7]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def write_config(directory: Path, **changes: object) -> Path:
    (directory / "config.json").write_text(json.dumps({**TINY_CONFIG, **changes}))
    return directory


@pytest.fixture
def tiny_dir(tmp_path: Path) -> Path:
    return write_config(tmp_path)


@pytest.fixture
def untied_dir(tmp_path: Path) -> Path:
    """Tied random embeddings make a shallow model echo its last token (the embedding dominates the
    residual and scores itself highest); an independent LM head makes greedy tokens vary, a real test."""
    return write_config(tmp_path, tie_word_embeddings=False)


def test_any_config_json_loads(tiny_dir: Path) -> None:
    loaded = load_model(str(tiny_dir), "dummy")
    c = loaded.config
    assert (c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size) == (2, 64, 128, 512)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.eos_token_ids) == (4, 2, 32, [2])
    weights = dict(loaded.weights())
    assert len(weights) == loaded.num_weights == 2 + 9 * 2  # tied: no lm_head
    assert weights["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 32, 64)  # [out, in]
    assert weights["model.layers.0.self_attn.o_proj.weight"].shape == (64, 4 * 32)
    assert weights["model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))
    assert 0.015 < weights["model.embed_tokens.weight"].std() < 0.025
    (tiny_dir / "untied").mkdir()
    untied = load_model(str(write_config(tiny_dir / "untied", tie_word_embeddings=False)), "dummy")
    assert untied.num_weights == 3 + 9 * 2 and dict(untied.weights())["lm_head.weight"].shape == (512, 64)
    # The file itself, not only its directory, names the model.
    assert load_model(str(tiny_dir / "config.json"), "dummy").config == c
    # Without a matching vocabulary the tokenizer's text is the token ids themselves.
    assert loaded.tokenizer.encode("5 17 300") == [5, 17, 300]
    assert loaded.tokenizer.decode([5, 17, 300]) == "5 17 300"


def test_same_seed_same_weights(tiny_dir: Path) -> None:
    first, again, other = (dict(load_dummy(str(tiny_dir), seed).weights()) for seed in (3, 3, 4))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    loaded = load_dummy(str(tiny_dir), 3)
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(loaded.weights(), loaded.weights()))


def test_unknown_names_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="load_format"):
        load_model(str(tmp_path), "safetensors")
    with pytest.raises(FileNotFoundError, match="llama-1b"):
        load_model("no-such-shape", "dummy")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path), "dummy")


def test_bundled_configs_are_the_benchmark_shapes() -> None:
    assert bundled_config_names() == ["llama-1b", "smollm2-135m"]
    small = dummy_config("smollm2-135m")
    assert dummy_config(None) == small  # the bundled model's shape is the default
    assert (small.num_layers, small.hidden_size, small.intermediate_size) == (30, 576, 1536)
    assert (small.num_heads, small.num_kv_heads, small.head_dim, small.vocab_size) == (9, 3, 64, 49152)
    assert (small.rope_theta, small.rms_norm_eps, small.max_position, small.tie_word_embeddings) == (
        100000.0, 1e-5, 8192, True)
    # Only the config is read: the 1B model's weights are never made here.
    large = dummy_config("llama-1b")
    assert (large.num_layers, large.hidden_size, large.intermediate_size) == (16, 2048, 8192)
    assert (large.num_heads, large.num_kv_heads, large.head_dim, large.vocab_size) == (32, 8, 64, 49152)
    assert (large.rope_theta, large.max_position, large.tie_word_embeddings) == (500000.0, 8192, True)
    shapes = dict(weight_shapes(large))
    assert len(shapes) == 2 + 9 * 16
    assert sum(shape[0] * shape[1] for shape in shapes.values() if len(shape) == 2) == 1_073_741_824  # 1.07B


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "llama-1b"])
def test_bundled_configs_are_hf_llama_configs(name: str) -> None:
    """transformers builds the same shape from them, which the baseline relies on."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoConfig.from_pretrained(config_file(name))
    ours = dummy_config(name)
    assert type(hf).__name__ == "LlamaConfig" and hf.architectures == ["LlamaForCausalLM"]
    assert (hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.vocab_size) == (
        ours.num_layers, ours.hidden_size, ours.intermediate_size, ours.vocab_size)
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim) == (
        ours.num_heads, ours.num_kv_heads, ours.head_dim)
    assert (hf.rope_parameters["rope_theta"], hf.max_position_embeddings, hf.tie_word_embeddings) == (
        ours.rope_theta, ours.max_position, ours.tie_word_embeddings)


def test_runs_where_the_bundled_gguf_is_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU box that cannot receive the GGUF: SmolLM2's vocabulary size, but no tokenizer file to read."""
    import orca.engine.loaders.dummy as dummy

    def missing() -> str:
        raise FileNotFoundError("no bundled model here")

    monkeypatch.setattr(dummy, "bundled_model_path", missing)
    loaded = load_model("llama-1b", "dummy")
    assert loaded.tokenizer.vocab_size == 49152
    assert loaded.tokenizer.encode("49151 17") == [49151, 17] and loaded.tokenizer.eos_token_ids == [2]


@pytest.mark.slow
def test_smollm2_shape_matches_the_bundled_gguf() -> None:
    """The config must describe the bundled model exactly, and text prompts use its tokenizer."""
    gguf = load_model(None)
    dummy = load_model("smollm2-135m", "dummy")
    assert dummy.config.rms_norm_eps == pytest.approx(gguf.config.rms_norm_eps)  # GGUF stores it as float32
    assert dataclasses.replace(dummy.config, rms_norm_eps=gguf.config.rms_norm_eps) == gguf.config
    assert dummy.num_weights == gguf.num_weights
    assert dummy.tokenizer.encode("Hello, world!") == gguf.tokenizer.encode("Hello, world!")


@pytest.mark.slow
def test_smollm2_shape_generates() -> None:
    llm = LLM(model="smollm2-135m", load_format="dummy", dtype="float32", kv_cache_memory="64MiB")
    [out] = llm.generate(["The capital of France is"], GREEDY, use_tqdm=False)
    assert len(out.token_ids) == GREEDY.max_tokens and isinstance(out.text, str)


def test_engine_generates_with_tiny_config(untied_dir: Path) -> None:
    llm = LLM(model=str(untied_dir), load_format="dummy", dtype="float32", kv_cache_memory="16MiB")
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [GREEDY.max_tokens] * len(PROMPTS)
    assert all(0 <= t < 512 for o in outs for t in o.token_ids)
    assert all(len(set(o.token_ids)) > 3 for o in outs)  # random weights, but not one token forever


@pytest.mark.slow
@pytest.mark.parametrize("tie", [False, True])
def test_greedy_tokens_equal_transformers_on_the_same_weights(tmp_path: Path, tie: bool) -> None:
    from orca.engine.hf_reference import load_hf_model

    model = str(write_config(tmp_path, tie_word_embeddings=tie))
    llm = LLM(model=model, load_format="dummy", dtype="float32", kv_cache_memory="16MiB")
    ours = [o.token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY, use_tqdm=False)]
    hf = load_hf_model(model, "float32", load_format="dummy")
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie
    assert ours == [hf_greedy(hf, ids, GREEDY.max_tokens) for ids in PROMPTS]


@pytest.mark.slow
def test_bench_throughput_with_dummy_weights(tiny_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    assert main(["bench", "throughput", "--load-format", "dummy", "--model", str(tiny_dir), "--num-requests", "3",
                 "--baseline-requests", "2", "--baseline-batch-size", "2", "--dtype", "float32",
                 "--kv-cache-memory", "64MiB", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["requests"] for r in result["runs"]] == [3, 2, 2]
    assert result["ratio_engine_over_baseline"] > 0
    assert (result["load_format"], result["device"]) == ("dummy", "cpu")
    assert result["model"] == str(tiny_dir / "config.json")
