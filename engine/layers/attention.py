"""Attention over the paged KV cache: the only op of the model that is split per request.

Token-wise ops see one flattened batch; here the rows are cut back into requests. The model runner
orders rows as single-query rows (decodes, and the prompt tokens of requests that must not depend on
how their prompt was chunked) followed by prefill chunks, and builds the block tables once per step. On CPUs a C++ kernel reads decode contexts from the paged cache in
place; elsewhere (and for prefills with earlier context) contexts are gathered into a reused
workspace for one fused SDPA call per group.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillSeq:
    """Rows [start, end) are consecutive prompt tokens; with earlier context, that context is gathered too."""

    start: int
    end: int
    gather_index: torch.Tensor | None = None  # None: no earlier context, attend to the chunk itself
    mask: torch.Tensor | None = None  # [end-start, ctx_len] causal mask shifted by the earlier context


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens]: cache slot receiving each new token's K and V
    block_size: int
    num_decodes: int = 0  # rows [0, num_decodes) each attend as one query over their own context
    block_tables: torch.Tensor | None = None  # [num_decodes, width] int32, the block table of each row's request
    context_lens: torch.Tensor | None = None  # [num_decodes] int32, including the new token
    prefills: list[PrefillSeq] = field(default_factory=list)
    workspace_rows: int = 0  # largest prefill gather of this step, so one buffer serves every layer
    derived: dict = field(default_factory=dict)  # what a backend computes once per step for all layers


_context: AttentionMetadata | None = None


def set_context(meta: AttentionMetadata | None) -> None:
    global _context
    _context = meta


def get_context() -> AttentionMetadata:
    assert _context is not None, "attention called outside a model-runner step"
    return _context


@dataclass
class _DecodeGroup:
    rows: torch.Tensor  # decode rows of similar context length, padded to the longest
    ctx_len: int
    gather_index: torch.Tensor  # [len(rows) * kv_heads * ctx_len] rows of the [slots * kv_heads, head_dim] cache
    mask: torch.Tensor  # [len(rows), 1, 1, ctx_len] bool, True where the slot holds context


class TorchAttentionBackend:
    """Gather + scaled_dot_product_attention. Works on any torch device; kernels can replace parts of it."""

    DECODE_GROUP_SIZE = 32  # decode requests per padded attention call: less padding vs fewer calls

    def __init__(self) -> None:
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def _workspace(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Fresh multi-megabyte tensors cost page faults on every layer; reuse one buffer pair instead.
        if self._k is None or self._k.shape[0] < rows or self._k.dtype != like.dtype or self._k.device != like.device:
            self._k = torch.empty(rows, like.shape[-1], dtype=like.dtype, device=like.device)
            self._v = torch.empty_like(self._k)
        return self._k, self._v

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches: [slots, KVH, D]. Returns [T, H, D]."""
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        if meta.num_decodes:
            self.decode(out[:meta.num_decodes], q[:meta.num_decodes], k_cache, v_cache, meta, scale)
        kv_heads, dim = k.shape[1], q.shape[2]
        kc, vc = k_cache.view(-1, dim), v_cache.view(-1, dim)
        for p in meta.prefills:
            qp = q[p.start:p.end].transpose(0, 1).unsqueeze(0)
            if p.gather_index is None:
                keys, vals = k[p.start:p.end], v[p.start:p.end]
            else:
                kbuf, vbuf = self._workspace(meta.workspace_rows, q)
                rows = p.gather_index.numel()
                keys = torch.index_select(kc, 0, p.gather_index, out=kbuf[:rows]).view(-1, kv_heads, dim)
                vals = torch.index_select(vc, 0, p.gather_index, out=vbuf[:rows]).view(-1, kv_heads, dim)
            o = F.scaled_dot_product_attention(
                qp, keys.transpose(0, 1).unsqueeze(0), vals.transpose(0, 1).unsqueeze(0),
                attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=True)
            out[p.start:p.end] = o[0].transpose(0, 1)
        return out

    def decode(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> None:
        """Gather each group's context into the workspace, then one SDPA call per group."""
        num_heads, kv_heads, dim = q.shape[1], k_cache.shape[1], q.shape[2]
        if "decode_groups" not in meta.derived:
            meta.derived["decode_groups"] = self._decode_groups(meta, kv_heads)
        groups: list[_DecodeGroup] = meta.derived["decode_groups"]
        kbuf, vbuf = self._workspace(max(g.gather_index.numel() for g in groups), q)
        kc, vc = k_cache.view(-1, dim), v_cache.view(-1, dim)
        for g in groups:
            n, rows = g.rows.numel(), g.gather_index.numel()
            keys = torch.index_select(kc, 0, g.gather_index, out=kbuf[:rows]).view(n, kv_heads, g.ctx_len, dim)
            vals = torch.index_select(vc, 0, g.gather_index, out=vbuf[:rows]).view(n, kv_heads, g.ctx_len, dim)
            # One query per head: the query heads sharing a KV head stand in as that head's query rows.
            qg = q[g.rows].view(n, kv_heads, num_heads // kv_heads, dim)
            out[g.rows] = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=g.mask, scale=scale).view(n, num_heads, dim)

    def _decode_groups(self, meta: AttentionMetadata, kv_heads: int) -> list[_DecodeGroup]:
        """Groups of rows sorted by context length, so padding each group to its longest wastes little."""
        bs, tables, lens = meta.block_size, meta.block_tables.long(), meta.context_lens.long()
        heads = torch.arange(kv_heads, device=tables.device)
        by_length = lens.argsort(stable=True)
        groups = []
        for start in range(0, meta.num_decodes, self.DECODE_GROUP_SIZE):
            rows = by_length[start:start + self.DECODE_GROUP_SIZE]
            length = int(lens[rows[-1]])
            pos = torch.arange(length, device=tables.device)
            valid = pos.unsqueeze(0) < lens[rows].unsqueeze(1)
            slots = torch.where(valid, tables[rows][:, pos // bs] * bs + pos % bs, 0)
            index = (slots.unsqueeze(1) * kv_heads + heads.view(1, -1, 1)).flatten()
            groups.append(_DecodeGroup(rows, length, index, valid[:, None, None, :]))
        return groups


class CpuAttentionBackend(TorchAttentionBackend):
    """Decode attention by the C++ kernel that reads the paged cache in place; prefills as in torch."""

    def __init__(self, kernels: ModuleType) -> None:
        super().__init__()
        self.kernels = kernels

    def decode(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, scale: float) -> None:
        self.kernels.paged_decode_attention(out, q.contiguous(), k_cache, v_cache, meta.block_tables,
                                            meta.context_lens, meta.block_size, scale)


def select_backend(device: torch.device) -> TorchAttentionBackend:
    """The fastest backend that runs on `device`; ORCA_KERNELS=torch forces the portable one."""
    if device.type == "cpu":
        from orca.kernels import cpu

        kernels = cpu.load()
        if kernels is not None:
            return CpuAttentionBackend(kernels)
    return TorchAttentionBackend()


class Attention(nn.Module):
    """Per-layer handle on its slice of the KV cache; the backend is shared by all layers."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, backend: TorchAttentionBackend) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.backend = backend
        self.k_cache = self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, get_context(), self.scale)
        return out.view(q.shape[0], -1)
