"""Load a llama.cpp GGUF file: metadata -> ModelConfig and tokenizer, dequantized tensors -> HF-named weights.

The tokenizer half lives in the torch-free `gguf_tokenizer`, which the router uses on its own.
"""
from __future__ import annotations

import re

import gguf
import torch
from tqdm import tqdm

from ..config import ModelConfig
from . import LoadedModel, WeightFilter, WeightIterator
from .gguf_tokenizer import GGUFMetadata, eos_token_ids, tokenizer_from_metadata

# llama.cpp tensor name -> Hugging Face Llama name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.weight")

def load_gguf(path: str) -> LoadedModel:
    reader = gguf.GGUFReader(path)
    meta = GGUFMetadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama').")
    if meta.get("llama.rope.scaling.type", "none") != "none":
        raise NotImplementedError(f"{path}: RoPE scaling {meta.get('llama.rope.scaling.type')!r} is not supported.")

    names = {t.name: _hf_name(t.name) for t in reader.tensors}
    num_heads = meta.get("llama.attention.head_count")
    hidden = meta.get("llama.embedding_length")
    config = ModelConfig(
        vocab_size=meta.get("llama.vocab_size", len(meta.get("tokenizer.ggml.tokens"))),
        hidden_size=hidden,
        intermediate_size=meta.get("llama.feed_forward_length"),
        num_layers=meta.get("llama.block_count"),
        num_heads=num_heads,
        num_kv_heads=meta.get("llama.attention.head_count_kv", num_heads),
        head_dim=meta.get("llama.attention.key_length", hidden // num_heads),
        rms_norm_eps=meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=meta.get("llama.rope.freq_base", 10000.0),
        max_position=meta.get("llama.context_length", 2048),
        tie_word_embeddings="lm_head.weight" not in names.values(),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id", None),
        eos_token_ids=eos_token_ids(meta),
    )

    def weights(wanted: WeightFilter | None = None) -> WeightIterator:
        for tensor in tqdm(reader.tensors, desc="Loading weights"):
            name = names[tensor.name]
            if wanted is None or wanted(name):  # another stage's tensors are never dequantized
                yield name, _to_hf_layout(name, _dequantize(tensor), config)

    return LoadedModel(config, weights, len(names), tokenizer_from_metadata(meta, config.eos_token_ids, path))


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER_TENSOR.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {name!r} has no Llama equivalent; this model variant is not supported.")
    return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.weight"


def _dequantize(tensor: gguf.ReaderTensor) -> torch.Tensor:
    """float32 in torch order: GGUF lists dimensions innermost first, the reverse of torch."""
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise ValueError(f"GGUF tensor {tensor.name!r} has unsupported type {tensor.tensor_type.name}.") from e
    values = values.reshape([int(d) for d in reversed(tensor.shape)])
    # F32 comes back as a read-only view of the memory-mapped file; torch wants a writable array.
    return torch.from_numpy(values if values.flags.writeable else values.copy()).float()


def _to_hf_layout(name: str, weight: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    HF's rotary embedding pairs dimension i with i + head_dim/2 ("rotate half"); llama.cpp's pairs
    2i with 2i+1, so its converter reorders each head's rows from [first half | second half] to
    interleaved. Viewing each head as (2, head_dim/2) and transposing reverses that.
    """
    if name.endswith("q_proj.weight"):
        heads = config.num_heads
    elif name.endswith("k_proj.weight"):
        heads = config.num_kv_heads
    else:
        return weight
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, -1).transpose(1, 2).reshape(rows, -1).contiguous()
