"""Gather + scaled_dot_product_attention: runs on any torch device, the reference the kernels replace."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .metadata import AttentionMetadata


@dataclass
class DecodeGroup:
    rows: torch.Tensor  # single-query rows of similar context length, padded to the longest
    ctx_len: int
    gather_index: torch.Tensor  # [len(rows) * kv_heads * ctx_len] rows of the [slots * kv_heads, head_dim] cache
    mask: torch.Tensor  # [len(rows), 1, 1, ctx_len] bool, True where the slot holds context


@dataclass
class PrefillChunk:
    """Rows [start, end) are consecutive prompt tokens; with earlier context, that context is gathered too."""

    start: int
    end: int
    gather_index: torch.Tensor | None = None  # None: no earlier context, attend to the chunk itself
    mask: torch.Tensor | None = None  # [end-start, ctx_len] causal mask shifted by the earlier context


@dataclass
class TorchAttentionMetadata:
    store_slots: torch.Tensor  # slot_mapping without padded rows
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    prefills: list[PrefillChunk] = field(default_factory=list)
    workspace_rows: int = 0  # largest gather of this step, so one buffer serves every layer


class TorchAttentionBackend:
    DECODE_GROUP_SIZE = 32  # single-query rows per padded attention call: less padding vs fewer calls
    supports_cuda_graphs = False  # `build` sizes its gathers from the step's lengths on the host

    def __init__(self, num_kv_heads: int) -> None:
        self.num_kv_heads = num_kv_heads
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    # ---- once per step --------------------------------------------------------------------------
    def build(self, meta: AttentionMetadata) -> TorchAttentionMetadata:
        built = TorchAttentionMetadata(store_slots=meta.slot_mapping[:meta.num_actual_tokens])
        if meta.num_decodes:
            built.decode_groups = self._decode_groups(meta)
        starts, lens = meta.query_start_loc_cpu.tolist(), meta.seq_lens_cpu.tolist()
        for r in range(meta.num_decodes, meta.num_reqs):
            chunk = PrefillChunk(starts[r], starts[r + 1])
            earlier = lens[r] - (chunk.end - chunk.start)
            if earlier > 0:
                chunk.gather_index = self._gather_index(meta, r, lens[r])
                positions = torch.arange(lens[r], device=meta.block_tables.device)
                chunk.mask = positions.unsqueeze(0) <= positions[earlier:].unsqueeze(1)
            built.prefills.append(chunk)
        sizes = [g.gather_index.numel() for g in built.decode_groups] + [
            c.gather_index.numel() for c in built.prefills if c.gather_index is not None]
        built.workspace_rows = max(sizes, default=0)
        return built

    def _slots(self, tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
        return tables.gather(-1, positions // block_size) * block_size + positions % block_size

    def _gather_index(self, meta: AttentionMetadata, request: int, length: int) -> torch.Tensor:
        positions = torch.arange(length, device=meta.block_tables.device)
        slots = self._slots(meta.block_tables[request].long(), positions, meta.block_size)
        heads = torch.arange(self.num_kv_heads, device=slots.device)
        return (slots.unsqueeze(1) * self.num_kv_heads + heads).flatten()

    def _decode_groups(self, meta: AttentionMetadata) -> list[DecodeGroup]:
        """Groups of rows sorted by context length, so padding each group to its longest wastes little."""
        tables, lens = meta.block_tables[:meta.num_decodes].long(), meta.seq_lens[:meta.num_decodes].long()
        heads = torch.arange(self.num_kv_heads, device=tables.device)
        host_lens = meta.seq_lens_cpu[:meta.num_decodes]
        order = host_lens.argsort(stable=True)
        by_length, sorted_lens = order.to(tables.device), host_lens[order].tolist()
        groups = []
        for start in range(0, meta.num_decodes, self.DECODE_GROUP_SIZE):
            rows = by_length[start:start + self.DECODE_GROUP_SIZE]
            length = sorted_lens[min(start + self.DECODE_GROUP_SIZE, meta.num_decodes) - 1]
            positions = torch.arange(length, device=tables.device).expand(rows.numel(), -1)
            valid = positions < lens[rows].unsqueeze(1)
            slots = torch.where(valid, self._slots(tables[rows], positions, meta.block_size), 0)
            index = (slots.unsqueeze(1) * self.num_kv_heads + heads.view(1, -1, 1)).flatten()
            groups.append(DecodeGroup(rows, length, index, valid[:, None, None, :]))
        return groups

    # ---- every layer ----------------------------------------------------------------------------
    def _workspace(self, rows: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Fresh multi-megabyte tensors cost page faults on every layer; reuse one buffer pair instead.
        if self._k is None or self._k.shape[0] < rows or self._k.dtype != like.dtype or self._k.device != like.device:
            self._k = torch.empty(rows, like.shape[-1], dtype=like.dtype, device=like.device)
            self._v = torch.empty_like(self._k)
        return self._k, self._v

    def store(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
              built: TorchAttentionMetadata) -> None:
        rows = built.store_slots.shape[0]
        k_cache.index_copy_(0, built.store_slots, k[:rows])
        v_cache.index_copy_(0, built.store_slots, v[:rows])

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, built: TorchAttentionMetadata,
                scale: float) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D]; caches: [slots, KVH, D]. Returns [T, H, D]."""
        self.store(k, v, k_cache, v_cache, built)
        out = torch.empty_like(q)
        if meta.num_decodes:
            self.decode(out[:meta.num_decodes], q[:meta.num_decodes], k_cache, v_cache, meta, built, scale)
        kv_heads, dim = k.shape[1], q.shape[2]
        kc, vc = k_cache.view(-1, dim), v_cache.view(-1, dim)
        for p in built.prefills:
            qp = q[p.start:p.end].transpose(0, 1).unsqueeze(0)
            if p.gather_index is None:
                keys, vals = k[p.start:p.end], v[p.start:p.end]
            else:
                kbuf, vbuf = self._workspace(built.workspace_rows, q)
                rows = p.gather_index.numel()
                keys = torch.index_select(kc, 0, p.gather_index, out=kbuf[:rows]).view(-1, kv_heads, dim)
                vals = torch.index_select(vc, 0, p.gather_index, out=vbuf[:rows]).view(-1, kv_heads, dim)
            o = F.scaled_dot_product_attention(
                qp, keys.transpose(0, 1).unsqueeze(0), vals.transpose(0, 1).unsqueeze(0),
                attn_mask=p.mask, is_causal=p.mask is None, scale=scale, enable_gqa=True)
            out[p.start:p.end] = o[0].transpose(0, 1)
        return out

    def decode(self, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               meta: AttentionMetadata, built: TorchAttentionMetadata, scale: float) -> None:
        """Gather each group's context into the workspace, then one SDPA call per group."""
        num_heads, kv_heads, dim = q.shape[1], k_cache.shape[1], q.shape[2]
        kbuf, vbuf = self._workspace(built.workspace_rows, q)
        kc, vc = k_cache.view(-1, dim), v_cache.view(-1, dim)
        for g in built.decode_groups:
            n, rows = g.rows.numel(), g.gather_index.numel()
            keys = torch.index_select(kc, 0, g.gather_index, out=kbuf[:rows]).view(n, kv_heads, g.ctx_len, dim)
            vals = torch.index_select(vc, 0, g.gather_index, out=vbuf[:rows]).view(n, kv_heads, g.ctx_len, dim)
            # One query per head: the query heads sharing a KV head stand in as that head's query rows.
            qg = q[g.rows].view(n, kv_heads, num_heads // kv_heads, dim)
            out[g.rows] = F.scaled_dot_product_attention(qg, keys, vals, attn_mask=g.mask, scale=scale).view(n, num_heads, dim)
