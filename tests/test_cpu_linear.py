"""The kernel facade's linear on CPUs: the packed oneDNN GEMM agrees with F.linear, and inside
`batch_invariant_gemms` a row comes out bit for bit the same alone or among hundreds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orca.kernels import ops

SHAPES = [(960, 576), (3072, 576), (576, 1536)]  # qkv, gate_up and down projections of the bundled model


@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_packed_gemm_matches_plain(out_features: int, in_features: int) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    packed = ops.pack_linear_weight(weight)
    assert packed is not None, "bf16 on a CPU with oneDNN must get a packed weight"
    for rows in (1, 7, 64, 300):
        x = torch.randn(rows, in_features, generator=g).bfloat16()
        expected = F.linear(x.float(), weight.float())
        err = (ops.linear(x, weight, packed).float() - expected).abs().max().item()
        assert err <= 2e-2 * expected.abs().max().item(), f"{rows} rows: packed GEMM off by {err}"


def test_float32_keeps_the_plain_gemm() -> None:
    assert ops.pack_linear_weight(torch.randn(8, 8)) is None


@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_rows_are_batch_invariant_when_asked(out_features: int, in_features: int) -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    packed = ops.pack_linear_weight(weight)
    x = torch.randn(300, in_features, generator=g).bfloat16()
    with ops.batch_invariant_gemms(True):
        alone = torch.cat([ops.linear(x[i:i + 1].contiguous(), weight, packed) for i in range(8)])
        for rows in (2, 8, 40, 300):
            assert torch.equal(ops.linear(x[:rows].contiguous(), weight, packed)[:8], alone[:min(rows, 8)]), rows
    assert not getattr(ops._gemm_mode, "invariant", False), "the mode must end with its block"
