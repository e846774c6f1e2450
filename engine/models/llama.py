"""Llama-family decoder written for selective batching: every op but attention sees one [tokens, hidden] tensor."""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from orca.kernels import ops

from ..config import ModelConfig
from ..distributed import parallel_state
from ..layers.attention import Attention
from ..layers.embed import ParallelLMHead, VocabParallelEmbedding
from ..layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads)
        heads, kv_heads, dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, cfg.head_dim
        self.sizes = [heads * dim, kv_heads * dim, kv_heads * dim]
        self.o_proj = RowParallelLinear(cfg.num_heads * dim, cfg.hidden_size)
        self.rotary = RotaryEmbedding(dim, cfg.max_position, cfg.rope_theta)
        self.attn = Attention(heads, kv_heads, dim)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.sizes, dim=-1)
        dim = self.attn.head_dim
        q, k = self.rotary(positions, q.view(-1, self.attn.num_heads, dim), k.view(-1, self.attn.num_kv_heads, dim))
        return self.o_proj(self.attn(q, k, v.view(-1, self.attn.num_kv_heads, dim)))


# On CPUs a long prefill's gate/up output (4,096 tokens: 50 MB in float32) spills out of the L3 between
# the GEMM that writes it and the activation that reads it; in slices of this many rows it stays
# (the MLP 9% faster at 4,096 rows on an AVX2 EPYC). Every op in the MLP is row-wise.
CPU_MLP_ROWS = 1024


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [cfg.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.shape[0] > CPU_MLP_ROWS:
            return torch.cat([self.forward(rows) for rows in x.split(CPU_MLP_ROWS)])
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x, residual = self.input_layernorm(x, residual)
        x, residual = self.post_attention_layernorm(self.self_attn(positions, x), residual)
        return self.mlp(x), residual


def stage_layers(num_layers: int, pipeline_parallel_size: int, stage: int) -> range:
    """The contiguous layers of one pipeline stage; the first `num_layers % size` stages take one more."""
    if pipeline_parallel_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pipeline_parallel_size} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pipeline_parallel_size)
    start = stage * base + min(stage, extra)
    return range(start, start + base + (stage < extra))


class MissingLayer(nn.Identity):
    """Stands where another pipeline stage holds the layer, so parameter names keep their layer index."""


IntermediateTensors = tuple[torch.Tensor, torch.Tensor]  # (hidden states, residual) between pipeline stages


class LlamaModel(nn.Module):
    """The decoder stack, or the layers of this process's pipeline stage: the first stage embeds, the last
    normalises; in between, activations arrive and leave as (hidden states, residual)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        state = parallel_state.get()
        self.stage_layers = stage_layers(cfg.num_layers, state.pipeline_parallel_size, state.stage)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size) if state.is_first_stage else None
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) if i in self.stage_layers else MissingLayer()
                                    for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if state.is_last_stage else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        x, residual = (self.embed_tokens(input_ids), None) if intermediate is None else intermediate
        for i in self.stage_layers:
            x, residual = self.layers[i](positions, x, residual)
        if self.norm is None:
            return x, residual
        return self.norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    # checkpoint projection -> (fused parameter, shard) so one GEMM serves several projections
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        state = parallel_state.get()
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size) if state.is_last_stage else None
        if cfg.tie_word_embeddings and self.lm_head is not None and self.model.embed_tokens is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def parameter_name(self, checkpoint_name: str) -> str | None:
        """The local parameter a checkpoint tensor loads into, or None where another stage holds it.

        A tied LM head on a last stage without the embedding loads the embedding's tensor itself.
        """
        tied = self.config.tie_word_embeddings
        if checkpoint_name == "lm_head.weight" and tied:
            return None
        if checkpoint_name == "model.embed_tokens.weight":
            if self.model.embed_tokens is not None:
                return checkpoint_name
            return "lm_head.weight" if tied and self.lm_head is not None else None
        if checkpoint_name == "model.norm.weight" and self.model.norm is None:
            return None
        if checkpoint_name == "lm_head.weight" and self.lm_head is None:
            return None
        if checkpoint_name.startswith("model.layers."):
            if int(checkpoint_name.split(".")[2]) not in self.model.stage_layers:
                return None
        for ckpt, (fused, _) in self.packed_modules.items():
            if f".{ckpt}." in checkpoint_name:
                return checkpoint_name.replace(ckpt, fused)
        return checkpoint_name

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.named_parameters(remove_duplicate=False))
        seen: set[str] = set()
        for checkpoint_name, tensor in weights:
            name = self.parameter_name(checkpoint_name)
            if name is None:
                continue
            shard = next((shard_id for ckpt, (_, shard_id) in self.packed_modules.items()
                          if f".{ckpt}." in checkpoint_name), None)
            if name not in params:
                raise KeyError(f"checkpoint tensor {checkpoint_name!r} has no matching parameter")
            param = params[name]
            loader = getattr(param, "weight_loader", None)
            tensor = tensor.to(param.dtype)
            if loader is None:
                param.data.copy_(tensor)
            else:
                loader(param, tensor, shard)
            seen.add(name)
            if name == "model.embed_tokens.weight" and self.lm_head is not None and self.config.tie_word_embeddings:
                seen.add("lm_head.weight")
        missing = set(params) - seen
        if missing:
            raise KeyError(f"checkpoint lacks tensors for: {sorted(missing)[:5]}")
