"""Vocab-parallel embedding and LM head: each rank owns a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orca.kernels import ops

from ..distributed import parallel_state as parallel


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.rank, self.world = parallel.tp_rank(), parallel.tp_size()
        self.shard = -(-vocab_size // self.world)
        self.start = self.rank * self.shard
        self.weight = nn.Parameter(torch.zeros(self.shard, hidden), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        part = loaded[self.start:self.start + self.shard]
        param.data[:part.shape[0]].copy_(part)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.world == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local >= 0) & (local < self.shard)
        out = F.embedding(local.clamp(0, self.shard - 1), self.weight) * mask.unsqueeze(-1)
        return parallel.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Projects only the rows that will be sampled; full-vocab logits are gathered in float32."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__(vocab_size, hidden)
        self.vocab_size = vocab_size
        self.packed_weight: torch.Tensor | None = None

    def process_weights_after_loading(self) -> None:
        """Lay the (possibly tied) weight out once for the device's GEMM; the embedding keeps the plain one."""
        self.packed_weight = ops.pack_linear_weight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = ops.linear(x, self.weight, self.packed_weight)  # model dtype: the sampler upcasts only rows that need it
        return parallel.all_gather_last_dim(logits)[:, :self.vocab_size]
