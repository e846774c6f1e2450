"""The kernel facade's linear on CPUs: the packed oneDNN GEMM agrees with F.linear, and inside
`batch_invariant_gemms` a row comes out bit for bit the same alone or among hundreds, whichever GEMM
this machine's measurement picked (the CI's Sapphire Rapids Xeon failed this before GEMMs there were cut
into calls of one shape)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orca.kernels import ops

SHAPES = [(960, 576), (3072, 576), (576, 1536)]  # qkv, gate_up and down projections of the bundled model
DTYPES = [torch.float32, torch.bfloat16]


def packable(dtype: torch.dtype) -> bool:
    return torch.backends.mkldnn.is_available() and (dtype == torch.float32 or torch.ops.mkldnn._is_mkldnn_bf16_supported())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_packed_gemm_matches_plain(out_features: int, in_features: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    packed = ops.pack_linear_weight(weight)
    assert (packed is not None) == packable(dtype), "a CPU with oneDNN for this dtype must get a packed weight"
    if packed is None:
        pytest.skip(f"oneDNN has no {dtype} GEMM on this CPU")
    for rows in (1, 7, 64, 300):
        x = torch.randn(rows, in_features, generator=g).to(dtype)
        expected = F.linear(x.double(), weight.double())
        err = (ops.linear(x, weight, packed).double() - expected).abs().max().item()
        tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert err <= tolerance * expected.abs().max().item(), f"{rows} rows: packed GEMM off by {err}"


def test_other_dtypes_keep_the_plain_gemm() -> None:
    assert ops.pack_linear_weight(torch.randn(8, 8, dtype=torch.float16)) is None


@pytest.mark.parametrize("packed_weight", [True, False], ids=["packed", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features,in_features", SHAPES)
def test_rows_are_batch_invariant_when_asked(out_features: int, in_features: int, dtype: torch.dtype,
                                             packed_weight: bool) -> None:
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    packed = ops.pack_linear_weight(weight) if packed_weight else None
    x = torch.randn(300, in_features, generator=g).to(dtype)
    with ops.batch_invariant_gemms(True):
        alone = torch.cat([ops.linear(x[i:i + 1].contiguous(), weight, packed) for i in range(8)])
        for rows in (2, 3, 5, 8, 11, 16, 33, 40, 300):
            assert torch.equal(ops.linear(x[:rows].contiguous(), weight, packed)[:8], alone[:min(rows, 8)]), rows
    assert not getattr(ops._gemm_mode, "invariant", False), "the mode must end with its block"
