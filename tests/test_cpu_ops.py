"""The facade's fused token-wise ops on CPUs (`csrc/elementwise.cpp`) against plain torch, in float32 and
bfloat16, including the activations far outside the usual range that a fast-math build gets wrong."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orca.kernels import ops

pytestmark = pytest.mark.skipif(ops.provider("cpu") != "cpu", reason="the C++ CPU kernels do not build here")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch_even_past_exp_range(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(0)
    gate_up = (torch.randn(37, 2 * 1536, generator=g) * 3).to(dtype)
    gate_up[:, :8] = torch.tensor([-200.0, -100.0, -89.0, -87.0, 0.0, 87.0, 89.0, 100.0])  # exp(-x) overflows for x < -88
    gate, up = gate_up.float().chunk(2, dim=-1)
    expected = F.silu(gate) * up
    out = ops.silu_and_mul(gate_up)
    assert torch.isfinite(out).all(), "silu of a large negative gate is 0, not NaN"
    torch.testing.assert_close(out.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(19, 576, generator=g).to(dtype) for _ in range(2))
    weight = torch.rand(576, generator=g).to(dtype)
    summed = (x.float() + residual.float()).to(dtype)
    normed = summed.float() * torch.rsqrt(summed.float().pow(2).mean(-1, keepdim=True) + 1e-5)
    expected = weight.float() * normed.to(dtype).float()
    out, new_residual = ops.fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    assert torch.equal(new_residual, summed)
    torch.testing.assert_close(out.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_embedding_matches_torch(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    tokens, heads, kv_heads, dim = 11, 9, 3, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    q, k, _ = qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)  # strided views, as the model passes them
    q, k = q.view(tokens, heads, dim), k.view(tokens, kv_heads, dim)
    angles = torch.outer(torch.arange(64).float(), 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim))
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=-1).to(dtype)
    positions = torch.randint(0, 64, (tokens,), generator=g)
    cos, sin = cos_sin[positions].float().unsqueeze(1).chunk(2, dim=-1)

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    expected_q, expected_k = rotate(q), rotate(k)
    out_q, out_k = ops.rotary_embedding(positions, q, k, cos_sin)
    torch.testing.assert_close(out_q.float(), expected_q, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    torch.testing.assert_close(out_k.float(), expected_k, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
