"""Loaders and tokenizer against the transformers reference (GGUF and HF directory)."""
from __future__ import annotations

import os

import pytest
import torch

from orca.engine.bundled_model import bundled_model_path
from orca.engine.loaders import LoadedModel, load_model
from orca.engine.loaders.gguf_tokenizer import load_gguf_tokenizer
from orca.engine.loaders.hf import load_hf, load_hf_tokenizer
from orca.engine.tokenizer import IncrementalDetokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello, world!",
    "  leading spaces and   runs\tof\twhitespace\n\n\nnewlines  ",
    "Unicode: naïve café, Ελληνικά, 日本語のテキスト, العربية",
    "Emoji 🚀🔥👩‍👩‍👧‍👦 and flags 🇫🇷",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n",
    "Numbers 1234567 3.14159 and   42 with spaces",
    "<|im_start|>user\nSpecial tokens inline<|im_end|>\n",
    "I'm sure they'll've done it; don't",
    "",
    "a",
]
CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "What is 2+2? Answer with emoji 🤔."},
]


@pytest.fixture(scope="module")
def gguf_model() -> LoadedModel:
    return load_model(None)


@pytest.fixture(scope="module")
def hf_gguf_tokenizer():
    path = bundled_model_path()
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


def test_default_path_dispatches_to_gguf(gguf_model: LoadedModel) -> None:
    assert bundled_model_path().endswith(".gguf")
    assert gguf_model.num_weights == 3 + 9 * gguf_model.config.num_layers - gguf_model.config.tie_word_embeddings


def test_load_model_rejects_unknown_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="gguf"):
        load_model(str(tmp_path / "model.bin"))


def test_gguf_config(gguf_model: LoadedModel) -> None:
    c = gguf_model.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size) == (49152, 576, 1536)
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 9, 3, 64)
    assert (c.rope_theta, c.max_position, c.tie_word_embeddings) == (100000.0, 8192, True)
    assert c.rms_norm_eps == pytest.approx(1e-5)
    assert c.bos_token_id == 1 and c.eos_token_ids == [2]
    assert gguf_model.tokenizer.eos_token_ids == [2]


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_encode_matches_transformers(gguf_model: LoadedModel, hf_gguf_tokenizer, text: str) -> None:
    ours = gguf_model.tokenizer
    assert ours.encode(text) == hf_gguf_tokenizer.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf_gguf_tokenizer.encode(text, add_special_tokens=False)
    ids = ours.encode(text)
    assert ours.decode(ids) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == hf_gguf_tokenizer.decode(ids)


def test_gguf_chat_template_matches_transformers(gguf_model: LoadedModel, hf_gguf_tokenizer) -> None:
    ours = gguf_model.tokenizer.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    theirs = hf_gguf_tokenizer.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert ours.endswith("<|im_start|>assistant\n")
    assert gguf_model.tokenizer.encode(ours) == hf_gguf_tokenizer.encode(theirs)
    assert gguf_model.tokenizer.encode(ours)[0] == 1  # <|im_start|> from the template, no BOS added


def test_the_torch_free_gguf_tokenizer_is_the_loaders(gguf_model: LoadedModel) -> None:
    """What the router tokenizes with must give the engine's ids, or its prefix blocks would not line up."""
    ours, engines = load_gguf_tokenizer(bundled_model_path()), gguf_model.tokenizer
    for text in TEXTS:
        assert ours.encode(text) == engines.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == engines.encode(text, add_special_tokens=False), text
    assert ours.apply_chat_template(CONVERSATION) == engines.apply_chat_template(CONVERSATION)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.vocab_size) == (
        engines.bos_token_id, engines.eos_token_ids, engines.vocab_size)


@pytest.mark.slow
def test_gguf_weights_match_transformers(gguf_model: LoadedModel) -> None:
    path = bundled_model_path()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32
    ).state_dict()
    expected = set(reference) - ({"lm_head.weight"} if gguf_model.config.tie_word_embeddings else set())
    seen = set()
    for name, tensor in gguf_model.weights():
        assert tensor.dtype == torch.float32
        assert tensor.shape == reference[name].shape, name
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=0, msg=name)
        seen.add(name)
    assert seen == expected


@pytest.mark.parametrize("prompt", [None, "<|im_start|>assistant\n"])
def test_incremental_detokenizer(gguf_model: LoadedModel, prompt: str | None) -> None:
    tok = gguf_model.tokenizer
    text = "Héllo 世界! 🚀🇫🇷 naïve — “quotes” <|im_end|> done 👩‍👩‍👧"
    ids = tok.encode(text)
    assert any(tok.decode([i]).endswith("\ufffd") for i in ids), "text should split characters across tokens"
    detok = IncrementalDetokenizer(tok, tok.encode(prompt) if prompt else None)
    deltas = [detok.step([i]) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids)


def test_incremental_detokenizer_keeps_special_tokens(gguf_model: LoadedModel) -> None:
    tok = gguf_model.tokenizer
    ids = tok.encode("a<|im_end|>b 🚀")
    detok = IncrementalDetokenizer(tok, skip_special_tokens=False)
    out = "".join(detok.step(ids[i : i + 2]) for i in range(0, len(ids), 2)) + detok.flush()
    assert out == "a<|im_end|>b 🚀"


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, hf_gguf_tokenizer):
    """A tiny random Llama with the SmolLM2 tokenizer, sharded so the index path is exercised."""
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(hf_gguf_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_theta=5000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = transformers.LlamaForCausalLM(config)
    model.generation_config.eos_token_id = [2, 0]
    model.save_pretrained(path, max_shard_size="1MB")
    hf_gguf_tokenizer.save_pretrained(path)
    return path, model.state_dict()


def test_hf_loader(hf_dir) -> None:
    path, state = hf_dir
    assert (path / "model.safetensors.index.json").exists()
    loaded = load_hf(str(path))
    assert load_model(str(path)).config == loaded.config
    c = loaded.config
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (49152, 64, 128, 2)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.max_position) == (4, 2, 16, 512)
    assert (c.rms_norm_eps, c.rope_theta, c.tie_word_embeddings) == (1e-6, 5000.0, False)
    assert c.bos_token_id == 1 and c.eos_token_ids == [2, 0]

    weights = dict(loaded.weights())
    assert len(weights) == loaded.num_weights and set(weights) == set(state)
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, state[name], atol=0, rtol=0, msg=name)


def test_hf_tokenizer_matches_transformers(hf_dir) -> None:
    path, _ = hf_dir
    ours = load_hf(str(path)).tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
    assert ours.apply_chat_template(CONVERSATION) == theirs.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert ours.eos_token_ids == [2, 0] and ours.bos_token_id == 1


def test_the_torch_free_hf_tokenizer_is_the_loaders(hf_dir) -> None:
    path, _ = hf_dir
    ours, engines = load_hf_tokenizer(str(path)), load_hf(str(path)).tokenizer
    for text in TEXTS:
        assert ours.encode(text) == engines.encode(text), text
    assert ours.apply_chat_template(CONVERSATION) == engines.apply_chat_template(CONVERSATION)
    assert (ours.bos_token_id, ours.eos_token_ids) == (engines.bos_token_id, engines.eos_token_ids) == (1, [2, 0])

    from orca.operator.router.prompts import load_tokenizer  # the router's --tokenizer DIRECTORY

    router_tokenizer = load_tokenizer(str(path))
    assert router_tokenizer is not None and router_tokenizer.encode(TEXTS[0]) == engines.encode(TEXTS[0])
