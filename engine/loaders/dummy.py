"""`load_format="dummy"`: a Hugging Face config.json alone becomes a model with seeded random weights.

Benchmarks and tests of any shape then run on a machine that cannot receive a weight file. The weights
are normal(0, 0.02) matrices and all-ones norms, transformers' own initialisation, rather than vLLM's
uniform(-1e-3, 1e-3): activations keep their scale through every layer and the logits spread out
(std about 0.5), so greedy decoding never meets exact ties and its tokens can be compared with
transformers'. The text is still noise, often one token repeated, as from any random network.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import torch
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from ..bundled_model import bundled_model_path
from ..config import ModelConfig
from ..tokenizer import Tokenizer
from . import LoadedModel, WeightFilter, WeightIterator
from .hf import parse_config

MODEL_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_configs")
DEFAULT_MODEL_CONFIG = "smollm2-135m"  # the bundled model's shape
BUNDLED_VOCAB_SIZE = 49152  # SmolLM2's vocabulary: its tokenizer fits any config of this size
WEIGHT_STD = 0.02


def bundled_config_names() -> list[str]:
    """Read from the folder, so a shape added there is usable by name without touching code."""
    return sorted(name.removesuffix(".json") for name in os.listdir(MODEL_CONFIGS_DIR) if name.endswith(".json"))


def config_file(model: str | None) -> str:
    """The config.json that `model` names: a file, a directory holding one, or a bundled shape's name."""
    model = model or DEFAULT_MODEL_CONFIG
    if os.path.isdir(model):
        return os.path.join(model, "config.json")
    if os.path.isfile(model):
        return model
    bundled = os.path.join(MODEL_CONFIGS_DIR, f"{model}.json")
    if os.path.isfile(bundled):
        return bundled
    raise FileNotFoundError(f"{model!r} is neither a config.json, a directory holding one, nor a bundled shape "
                            f"({', '.join(bundled_config_names())}).")


def load_dummy(model: str | None = None, seed: int = 0) -> LoadedModel:
    """Config from the json, random weights from `seed`: the same seed always yields the same tensors.

    The json's `initializer_range` (transformers' name) sets the weights' spread, 0.02 by default.
    """
    config = dummy_config(model)
    with open(config_file(model), encoding="utf-8") as f:
        std = float(json.load(f).get("initializer_range", WEIGHT_STD))
    return LoadedModel(config, lambda wanted=None: dummy_weights(config, seed, std, wanted), len(list(weight_shapes(config))),
                       _tokenizer(config))


def dummy_config(model: str | None) -> ModelConfig:
    """Just the config, for callers that need no tokenizer (SmolLM2's takes seconds to build)."""
    file = config_file(model)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{model}: config.json is missing.")
    with open(file, encoding="utf-8") as f:
        return parse_config(json.load(f), file)


def dummy_weights(config: ModelConfig, seed: int = 0, std: float = WEIGHT_STD,
                  wanted: WeightFilter | None = None) -> WeightIterator:
    """One tensor at a time from a generator of its own, so every call repeats the same tensors (unwanted
    ones are drawn too, so a pipeline stage gets the same weights as the whole model)."""
    generator = torch.Generator().manual_seed(seed)
    for name, shape in weight_shapes(config):
        tensor = torch.ones(shape) if len(shape) == 1 else torch.empty(shape).normal_(0.0, std, generator=generator)
        if wanted is None or wanted(name):
            yield name, tensor


def weight_shapes(config: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every Llama tensor by HF name in `[out_features, in_features]` layout, in checkpoint order."""
    hidden, intermediate = config.hidden_size, config.intermediate_size
    q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    yield "model.embed_tokens.weight", (config.vocab_size, hidden)
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}."
        yield prefix + "input_layernorm.weight", (hidden,)
        yield prefix + "self_attn.q_proj.weight", (q_size, hidden)
        yield prefix + "self_attn.k_proj.weight", (kv_size, hidden)
        yield prefix + "self_attn.v_proj.weight", (kv_size, hidden)
        yield prefix + "self_attn.o_proj.weight", (hidden, q_size)
        yield prefix + "post_attention_layernorm.weight", (hidden,)
        yield prefix + "mlp.gate_proj.weight", (intermediate, hidden)
        yield prefix + "mlp.up_proj.weight", (intermediate, hidden)
        yield prefix + "mlp.down_proj.weight", (hidden, intermediate)
    yield "model.norm.weight", (hidden,)
    if not config.tie_word_embeddings:
        yield "lm_head.weight", (config.vocab_size, hidden)


def _tokenizer(config: ModelConfig) -> Tokenizer:
    """SmolLM2's tokenizer when the vocabulary is its size and the bundled file is here, so text prompts
    work; otherwise one whose text is the token ids themselves ("17 4 9"), enough for benchmarks, which
    send token ids, and for any vocabulary size."""
    if config.vocab_size == BUNDLED_VOCAB_SIZE:
        try:
            path = bundled_model_path()
        except FileNotFoundError:
            pass
        else:
            from .gguf import load_gguf

            return load_gguf(path).tokenizer
    backend = BackendTokenizer(models.WordLevel({str(i): i for i in range(config.vocab_size)}, unk_token="0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def token(token_id: int | None) -> str | None:
        return str(token_id) if token_id is not None else None

    return Tokenizer(backend, bos_token=token(config.bos_token_id),
                     eos_token=token(config.eos_token_ids[0] if config.eos_token_ids else None),
                     eos_token_ids=config.eos_token_ids, chat_template=None)
