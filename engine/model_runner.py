"""Turns a scheduled batch into one flattened forward pass over the paged KV cache, then samples."""
from __future__ import annotations

import ctypes

import torch

from .config import ModelConfig
from .layers.attention import AttentionMetadata, PrefillSeq, set_context
from .models.llama import LlamaForCausalLM
from .sampler import Sampler
from .scheduler import ScheduledBatch
from .sequence import Sequence


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the OS.

    Every step allocates activations of tens of megabytes; by default glibc serves each with a
    fresh mmap and unmaps it on free, so every step page-faults its activations in again (about
    10% of a CPU run). Keeping freed memory in the heap makes the next step reuse it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


class ModelRunner:
    def __init__(self, model: LlamaForCausalLM, cfg: ModelConfig, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, batch_invariant: bool = False) -> None:
        self.model, self.cfg, self.block_size, self.device = model, cfg, block_size, device
        self.batch_invariant = batch_invariant
        attn_layers = [layer.self_attn.attn for layer in model.model.layers]
        self.kv_heads, self.head_dim = attn_layers[0].num_kv_heads, attn_layers[0].head_dim
        shape = (num_blocks * block_size, self.kv_heads, self.head_dim)
        for attn in attn_layers:
            attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
            attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.sampler = Sampler()
        if device.type == "cpu":
            keep_freed_memory()

    @staticmethod
    def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, tp: int = 1) -> int:
        return 2 * cfg.num_layers * block_size * (cfg.num_kv_heads // tp) * cfg.head_dim * dtype.itemsize

    def attends_per_row(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether every new token of `seq` attends as a single-query row (the decode path).

        Decodes always do. A prompt chunk does when its request has a seed (or the engine is batch
        invariant): a per-row kernel gives each token the same arithmetic however its prompt was cut
        into chunks, whatever the prefix cache held and whatever shared the step, so a seeded request
        samples from the same logits every time. Batched prefill attention would not: its reduction
        order follows the chunk's shape.
        """
        return num_new_tokens == 1 or self.batch_invariant or seq.params.seed is not None

    def prepare(self, batch: ScheduledBatch) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
        """Order rows (single-query rows first, then prefill chunks) and build every index of the step.

        Returns (row order as batch indices, input_ids, positions, rows whose logits are sampled, metadata).
        """
        seqs, counts = batch.seqs, batch.num_new_tokens
        per_row = [self.attends_per_row(s, n) for s, n in zip(seqs, counts)]
        num_per_row_seqs = sum(per_row)
        order = [i for i, p in enumerate(per_row) if p] + [i for i, p in enumerate(per_row) if not p]
        seqs = [seqs[i] for i in order]
        counts_l = [counts[i] for i in order]
        starts_l = [s.num_computed_tokens for s in seqs]
        ids: list[int] = []
        for s, st, n in zip(seqs, starts_l, counts_l):
            ids.extend(s.token_ids[st:st + n])
        bs, kvh = self.block_size, self.kv_heads
        counts_t, starts_t = torch.tensor(counts_l), torch.tensor(starts_l)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs])
        offsets = counts_t.cumsum(0) - counts_t
        num_tokens = len(ids)
        row = torch.repeat_interleave(torch.arange(len(seqs)), counts_t, output_size=num_tokens)
        positions = torch.arange(num_tokens) - torch.repeat_interleave(offsets - starts_t, counts_t, output_size=num_tokens)
        slot_mapping = tables[row, positions // bs] * bs + positions % bs
        heads = torch.arange(kvh)
        num_decodes = int(counts_t[:num_per_row_seqs].sum())
        meta = AttentionMetadata(slot_mapping=slot_mapping.to(self.device), block_size=bs, num_decodes=num_decodes)
        if num_decodes:
            meta.block_tables = tables[row[:num_decodes]].to(torch.int32).to(self.device)
            meta.context_lens = (positions[:num_decodes] + 1).to(torch.int32).to(self.device)
        for r in range(num_per_row_seqs, len(seqs)):
            start, n = int(offsets[r]), counts_l[r]
            p = PrefillSeq(start, start + n)
            if starts_l[r] > 0:
                length = starts_l[r] + n
                pos = torch.arange(length)
                s = tables[r][pos // bs] * bs + pos % bs
                p.gather_index = (s.unsqueeze(1) * kvh + heads).flatten().to(self.device)
                q_pos = torch.arange(starts_l[r], length).unsqueeze(1)
                p.mask = (torch.arange(length).unsqueeze(0) <= q_pos).to(self.device)
                meta.workspace_rows = max(meta.workspace_rows, p.gather_index.numel())
            meta.prefills.append(p)
        samples = (starts_t + counts_t) == torch.tensor([len(s) for s in seqs])
        logit_rows = (offsets + counts_t - 1)[samples]
        return order, torch.tensor(ids, device=self.device), positions.to(self.device), logit_rows, meta

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        set_context(meta)
        try:
            return self.model(input_ids, positions)
        finally:
            set_context(None)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> dict[int, tuple[int, dict[int, float] | None]]:
        """One iteration. Returns {batch index: (token, logprobs)} for the requests that sample a token."""
        order, input_ids, positions, logit_rows, meta = self.prepare(batch)
        hidden = self.forward(input_ids, positions, meta)
        sampling = [i for i in order if batch.seqs[i].num_computed_tokens + batch.num_new_tokens[i] == len(batch.seqs[i])]
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[logit_rows.to(self.device)]).cpu()
        tokens, logprobs = self.sampler(logits, [batch.seqs[i] for i in sampling])
        return {i: (t, lp) for i, t, lp in zip(sampling, tokens, logprobs)}
