"""Decode steps on persistent buffers at bucketed batch sizes: the path CUDA graphs capture and replay.

A decode-only step copies its inputs into buffers allocated once (from pinned host buffers, one
non-blocking copy each), pads the batch to the next bucket (padded rows store nothing: slot -1;
they attend over one slot and their outputs are dropped) and replays the graph captured for that
bucket. Without CUDA the same buffers, padding and metadata run eagerly, so the path is tested on
any machine; only `_capture` needs a GPU.
"""
from __future__ import annotations

import bisect
from typing import TYPE_CHECKING

import torch

from .attention.metadata import AttentionMetadata, ForwardContext, set_forward_context

if TYPE_CHECKING:
    from .model_runner import ModelRunner

BUCKETS = [1, 2, 4, 8, *range(16, 257, 16), *range(288, 513, 32)]


class StaticDecodeRunner:
    def __init__(self, runner: ModelRunner, capture: bool) -> None:
        self.runner = runner
        self.buckets = [b for b in BUCKETS if b < runner.max_batch_size] + [runner.max_batch_size]
        size, device = self.buckets[-1], runner.device
        self.max_blocks = -(-runner.max_model_len // runner.block_size)
        pin = device.type == "cuda"

        def buffers(dtype: torch.dtype, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
            host = torch.zeros(*shape, dtype=dtype, pin_memory=pin)
            return host, (torch.zeros(*shape, dtype=dtype, device=device) if pin else host)

        self.host_input_ids, self.input_ids = buffers(torch.long, size)
        self.host_positions, self.positions = buffers(torch.long, size)
        self.host_slot_mapping, self.slot_mapping = buffers(torch.long, size)
        self.host_seq_lens, self.seq_lens = buffers(torch.int32, size)
        self.host_block_tables, self.block_tables = buffers(torch.int32, size, self.max_blocks)
        # every row is one query: the start offsets never change
        self.query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        self.query_start_loc_cpu = torch.arange(size + 1, dtype=torch.int32)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    def fits(self, meta: AttentionMetadata) -> bool:
        return meta.num_decodes == meta.num_actual_tokens == meta.num_reqs and meta.num_reqs <= self.buckets[-1] \
            and meta.block_tables.shape[1] <= self.max_blocks

    def _metadata(self, bucket: int, num_actual: int, max_seq_len: int) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=self.query_start_loc[:bucket + 1], seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket], slot_mapping=self.slot_mapping[:bucket],
            num_decodes=bucket, num_actual_tokens=num_actual, block_size=self.runner.block_size,
            query_start_loc_cpu=self.query_start_loc_cpu[:bucket + 1], seq_lens_cpu=self.host_seq_lens[:bucket],
            max_seq_len=max_seq_len)

    def _load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> int:
        """Write the step into the host buffers, padded to its bucket, and copy them to the device."""
        n = meta.num_actual_tokens
        bucket = self.buckets[bisect.bisect_left(self.buckets, n)]
        width = meta.block_tables.shape[1]
        self.host_input_ids[:n] = input_ids
        self.host_positions[:n] = positions
        self.host_slot_mapping[:n] = meta.slot_mapping
        self.host_seq_lens[:n] = meta.seq_lens
        self.host_block_tables[:n, :width] = meta.block_tables
        self.host_input_ids[n:bucket] = 0
        self.host_positions[n:bucket] = 0
        self.host_slot_mapping[n:bucket] = -1
        self.host_seq_lens[n:bucket] = 1
        if self.input_ids is not self.host_input_ids:
            for host, device in ((self.host_input_ids, self.input_ids), (self.host_positions, self.positions),
                                 (self.host_slot_mapping, self.slot_mapping), (self.host_seq_lens, self.seq_lens)):
                device[:bucket].copy_(host[:bucket], non_blocking=True)
            self.block_tables[:bucket].copy_(self.host_block_tables[:bucket], non_blocking=True)
        return bucket

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        n = meta.num_actual_tokens
        bucket = self._load(input_ids, positions, meta)
        if bucket in self.graphs:
            graph, hidden = self.graphs[bucket]
            graph.replay()
            return hidden[:n]
        return self._forward(bucket, n, meta.max_seq_len)[:n]

    def _forward(self, bucket: int, num_actual: int, max_seq_len: int) -> torch.Tensor:
        runner = self.runner
        meta = self._metadata(bucket, num_actual, max_seq_len)
        set_forward_context(ForwardContext(meta, runner.attn_backend, runner.attn_backend.build(meta)))
        try:
            return runner.model(self.input_ids[:bucket], self.positions[:bucket])
        finally:
            set_forward_context(None)

    @torch.inference_mode()
    def _capture(self) -> None:
        """One CUDA graph per bucket, largest first, sharing one memory pool; attention sized for the longest context."""
        self.host_seq_lens.fill_(1)
        self.seq_lens.fill_(1)
        self.slot_mapping.fill_(-1)
        pool = None
        for bucket in reversed(self.buckets):
            self._forward(bucket, bucket, self.runner.max_model_len)  # warm-up: compiles the kernels for this shape
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._forward(bucket, bucket, self.runner.max_model_len)
            pool = graph.pool()
            self.graphs[bucket] = (graph, hidden)
        torch.cuda.synchronize()
