"""The facade's fused token-wise ops and greedy argmax on CPUs (`csrc/elementwise.cpp`, `csrc/sampling.cpp`)
against plain torch, in float32 and bfloat16, including the values a fast-math build gets wrong."""
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_torchs_first_maximum_with_ties_infinities_and_nan(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    for rows, vocab in [(1, 49152), (37, 1000), (5, 7), (3, 16), (4, 33)]:  # with and without a vector tail
        logits = torch.randn(rows, vocab, generator=g).to(dtype)
        assert torch.equal(ops.argmax(logits), logits.max(dim=-1).indices), (rows, vocab)
    logits = torch.randn(6, 100, generator=g).to(dtype)
    logits[0, [20, 60]] = 9.0  # a tie: the first
    logits[1, :] = float("-inf")  # nothing to choose: index 0
    logits[2, 70] = float("inf")
    logits[3, [40, 90]] = float("nan")  # the first NaN, as torch.max (a -ffast-math isnan says never)
    logits[3, 10] = 50.0
    logits[4, 99] = float("nan")  # in the scalar tail
    logits[5, :] = 1.0
    assert ops.argmax(logits).tolist() == logits.max(dim=-1).indices.tolist() == [20, 0, 70, 40, 99, 0]


def _other_builds() -> list[str]:
    """The AVX2 build on an AVX-512 CPU (what AMD Zen 2/3 runs) and the portable build, where this CPU can run them."""
    import platform

    with open("/proc/cpuinfo") as f:
        avx512 = " avx512f" in f.read()
    return (["avx2"] if avx512 else []) + (["portable"] if platform.machine() == "x86_64" else [])


@pytest.mark.parametrize("isa", _other_builds())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_other_instruction_sets_agree_with_torch(isa: str, dtype: torch.dtype) -> None:
    from orca.kernels import cpu

    kernels = cpu.load(isa)
    g = torch.Generator().manual_seed(4)
    gate_up = (torch.randn(9, 2 * 96, generator=g) * 3).to(dtype)
    out = torch.empty(9, 96, dtype=dtype)
    kernels.silu_and_mul(out, gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    torch.testing.assert_close(out.float(), F.silu(gate) * up, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    x, residual, weight = torch.randn(5, 64, generator=g).to(dtype), torch.randn(5, 64, generator=g).to(dtype), \
        torch.rand(64, generator=g).to(dtype)
    summed = (x.float() + residual.float()).to(dtype)
    kernels.fused_add_rms_norm(x, residual, weight, 1e-5)
    assert torch.equal(residual, summed)
    normed = (summed.float() * torch.rsqrt(summed.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    torch.testing.assert_close(x.float(), weight.float() * normed.float(), rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    logits = torch.randn(7, 1003, generator=g).to(dtype)
    tokens = torch.empty(7, dtype=torch.long)
    kernels.greedy_argmax(tokens, logits)
    assert torch.equal(tokens, logits.max(dim=-1).indices)
