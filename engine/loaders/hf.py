"""Load a Hugging Face Llama directory: config.json, safetensors (single or sharded), tokenizer files."""
from __future__ import annotations

import json
import os
import re
from typing import Any

from safetensors import safe_open
from tokenizers import Tokenizer as BackendTokenizer
from tqdm import tqdm

from ..config import ModelConfig
from ..tokenizer import Tokenizer
from . import LoadedModel, WeightFilter, WeightIterator

_WEIGHT_NAME = re.compile(
    r"model\.embed_tokens\.weight|model\.norm\.weight|lm_head\.weight"
    r"|model\.layers\.\d+\.(input_layernorm|post_attention_layernorm"
    r"|self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)\.weight"
)
# Buffers some older checkpoints saved; recomputed by the engine.
_IGNORED_WEIGHT = re.compile(r".*rotary_emb\.inv_freq")


def load_hf(path: str) -> LoadedModel:
    cfg = _read_json(path, "config.json")
    tok_cfg = _read_json(path, "tokenizer_config.json", required=False)
    backend = _backend_tokenizer(path)
    config = parse_config(cfg, path, _extra_eos_token_ids(path, tok_cfg, backend))

    tensor_files = _tensor_files(path)
    names = []
    for name in tensor_files:
        # A tied checkpoint may still store lm_head; the engine reuses the embedding instead.
        if _IGNORED_WEIGHT.fullmatch(name) or (config.tie_word_embeddings and name == "lm_head.weight"):
            continue
        if not _WEIGHT_NAME.fullmatch(name):
            raise ValueError(f"{path}: tensor {name!r} has no place in a Llama model; this variant is not supported.")
        names.append(name)

    def weights(wanted: WeightFilter | None = None) -> WeightIterator:
        by_file: dict[str, list[str]] = {}
        for name in names if wanted is None else filter(wanted, names):
            by_file.setdefault(tensor_files[name], []).append(name)
        with tqdm(total=sum(map(len, by_file.values())), desc="Loading weights") as progress:
            for file, file_names in by_file.items():
                with safe_open(os.path.join(path, file), framework="pt") as f:
                    for name in file_names:
                        yield name, f.get_tensor(name).float()
                        progress.update()

    return LoadedModel(config, weights, len(names), _tokenizer(path, tok_cfg, backend, config.eos_token_ids))


def load_hf_tokenizer(path: str) -> Tokenizer:
    """The tokenizer `load_hf(path)` would give, from the JSON files alone (no tensor, no torch), for
    processes that only tokenize, such as the router. Any model type, or no config.json, is accepted."""
    cfg = _read_json(path, "config.json", required=False)
    tok_cfg = _read_json(path, "tokenizer_config.json", required=False)
    backend = _backend_tokenizer(path)
    eos_token_ids = list(dict.fromkeys([*_ids(cfg.get("eos_token_id")), *_extra_eos_token_ids(path, tok_cfg, backend)]))
    return _tokenizer(path, tok_cfg, backend, eos_token_ids)


def _extra_eos_token_ids(path: str, tok_cfg: dict[str, Any], backend: BackendTokenizer) -> list[int]:
    """End-of-sequence ids beyond config.json's: generation_config.json's, then the tokenizer's eos token."""
    eos_token = _token_content(tok_cfg.get("eos_token"))
    generation = _read_json(path, "generation_config.json", required=False)
    extra_eos_ids = _ids(generation.get("eos_token_id"))
    if eos_token is not None and backend.token_to_id(eos_token) is not None:
        extra_eos_ids.append(backend.token_to_id(eos_token))
    return extra_eos_ids


def _tokenizer(path: str, tok_cfg: dict[str, Any], backend: BackendTokenizer, eos_token_ids: list[int]) -> Tokenizer:
    return Tokenizer(
        backend,
        bos_token=_token_content(tok_cfg.get("bos_token")),
        eos_token=_token_content(tok_cfg.get("eos_token")),
        eos_token_ids=eos_token_ids,
        chat_template=_chat_template(path, tok_cfg),
        add_bos_token=tok_cfg.get("add_bos_token"),
        add_eos_token=tok_cfg.get("add_eos_token"),
    )


def parse_config(cfg: dict[str, Any], path: str, extra_eos_token_ids: list[int] | None = None) -> ModelConfig:
    """A config.json as a ModelConfig; shared with the dummy loader, which has the config but nothing else.

    `extra_eos_token_ids` (from generation_config.json or the tokenizer) follow the config's own, duplicates dropped.
    """
    if cfg.get("model_type") != "llama":
        raise NotImplementedError(f"{path}: model_type {cfg.get('model_type')!r} is not supported (only 'llama').")
    # transformers >= 5 writes `rope_parameters`; older configs have `rope_theta` and `rope_scaling`.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise NotImplementedError(f"{path}: RoPE scaling {rope_type!r} is not supported.")
    num_heads = cfg["num_attention_heads"]
    return ModelConfig(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
        rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=rope.get("rope_theta", cfg.get("rope_theta", 10000.0)),
        max_position=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=cfg.get("tie_word_embeddings", True),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=list(dict.fromkeys([*_ids(cfg.get("eos_token_id")), *(extra_eos_token_ids or [])])),
    )


def _read_json(path: str, name: str, required: bool = True) -> dict[str, Any]:
    file = os.path.join(path, name)
    if not os.path.isfile(file):
        if required:
            raise FileNotFoundError(f"{path}: {name} is missing; is this a Hugging Face model directory?")
        return {}
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _ids(value: int | list[int] | None) -> list[int]:
    """config files give eos_token_id as an int, a list, or null."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _token_content(token: str | dict | None) -> str | None:
    """tokenizer_config.json spells a special token as a string or an AddedToken dict."""
    return token.get("content") if isinstance(token, dict) else token


def _backend_tokenizer(path: str) -> BackendTokenizer:
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{path}: tokenizer.json is missing (sentencepiece-only tokenizers are not supported).")
    return BackendTokenizer.from_file(file)


def _chat_template(path: str, tok_cfg: dict[str, Any]) -> str | None:
    """From chat_template.jinja (what transformers >= 4.43 saves) or tokenizer_config.json."""
    file = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            return f.read()
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = {t["name"]: t["template"] for t in template}.get("default")
    return template


def _tensor_files(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file holding it, from the shard index or the single file."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            return json.load(f)["weight_map"]
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json.")
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        return dict.fromkeys(f.keys(), "model.safetensors")
