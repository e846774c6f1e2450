"""Column- and row-parallel linear layers: each rank holds a shard and loads only its slice of the checkpoint."""
from __future__ import annotations

import torch
from torch import nn

from orca.kernels import ops

from ..distributed import parallel_state as parallel


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, tp_dim: int | None) -> None:
        super().__init__()
        self.tp_dim, self.rank, self.world = tp_dim, parallel.tp_rank(), parallel.tp_size()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.packed_weight: torch.Tensor | None = None

    def process_weights_after_loading(self) -> None:
        """Lay the loaded weight out once for the device's GEMM (the model runner calls this after loading)."""
        self.packed_weight = ops.pack_linear_weight(self.weight)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        param.data.copy_(loaded)


class ReplicatedLinear(LinearBase):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.packed_weight)


class ColumnParallelLinear(LinearBase):
    """Splits the output features across ranks; no communication in forward."""

    def __init__(self, in_features: int, out_features: int) -> None:
        world = parallel.tp_size()
        assert out_features % world == 0, f"out_features={out_features} not divisible by tensor parallel size {world}"
        super().__init__(in_features, out_features // world, 0)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        size = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.packed_weight)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input (gate and up) fused into one GEMM."""

    def __init__(self, in_features: int, out_sizes: list[int]) -> None:
        self.out_sizes = out_sizes
        super().__init__(in_features, sum(out_sizes))

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        assert isinstance(shard_id, int)
        offset = sum(self.out_sizes[:shard_id]) // self.world
        size = self.out_sizes[shard_id] // self.world
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Q, K and V projections in one GEMM; each rank owns whole heads, so attention needs no communication.

    KV heads are split across ranks when the tensor-parallel size divides them; with more ranks than
    KV heads each rank holds one KV head, replicated on the ranks whose query heads share it (vLLM's
    rule), so grouped-query attention stays local to a rank either way.
    """

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int) -> None:
        world = parallel.tp_size()
        check_heads(num_heads, num_kv_heads, world)
        self.head_dim, self.num_heads = head_dim, num_heads // world
        self.num_kv_heads = max(1, num_kv_heads // world)
        # which of the checkpoint's KV heads this rank holds (the first of them)
        self.kv_head_start = parallel.tp_rank() * num_kv_heads // world if num_kv_heads >= world \
            else parallel.tp_rank() // (world // num_kv_heads)
        LinearBase.__init__(self, hidden, (self.num_heads + 2 * self.num_kv_heads) * head_dim, 0)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        offset, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[shard_id]
        start = self.rank * q if shard_id == "q" else self.kv_head_start * self.head_dim
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, start, size))


def check_heads(num_heads: int, num_kv_heads: int, tensor_parallel_size: int) -> None:
    """Raise ValueError naming the flag when the heads cannot be dealt out to the ranks."""
    if num_heads % tensor_parallel_size:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must divide the model's {num_heads} "
                         f"attention heads")
    if num_kv_heads % tensor_parallel_size and tensor_parallel_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tensor_parallel_size} must divide the model's {num_kv_heads} "
                         f"KV heads or be a multiple of them")


class RowParallelLinear(LinearBase):
    """Splits the input features across ranks; partial sums are all-reduced."""

    def __init__(self, in_features: int, out_features: int) -> None:
        world = parallel.tp_size()
        assert in_features % world == 0, f"in_features={in_features} not divisible by tensor parallel size {world}"
        super().__init__(in_features // world, out_features, 1)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | str | None = None) -> None:
        size = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.rank * size, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return parallel.all_reduce(ops.linear(x, self.weight, self.packed_weight))
