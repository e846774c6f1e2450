"""The C++ paged decode kernel and the torch gather+SDPA backend must agree with a per-request reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from orca.engine.layers.attention import AttentionMetadata, CpuAttentionBackend, TorchAttentionBackend
from orca.kernels import cpu

BS, HEADS, KV_HEADS, DIM = 16, 9, 3, 64


def reference(q, k_cache, v_cache, tables, lens, scale):
    outs = []
    for i in range(q.shape[0]):
        pos = torch.arange(int(lens[i]))
        slots = tables[i].long()[pos // BS] * BS + pos % BS
        keys, vals = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)
        qi = q[i].float().view(KV_HEADS, HEADS // KV_HEADS, DIM)
        outs.append(F.scaled_dot_product_attention(qi, keys, vals, scale=scale).reshape(HEADS, DIM))
    return torch.stack(outs)


def backends():
    yield "torch", TorchAttentionBackend()
    kernels = cpu.load()
    if kernels is None:
        pytest.fail("the CPU kernel did not build (compiler and ninja are installed by `make`)")
    yield "cpu", CpuAttentionBackend(kernels)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_decode_backends_match_reference(dtype, tol):
    g = torch.Generator().manual_seed(0)
    n = 37  # more than one torch decode group, odd sizes
    lens = torch.sort(torch.randint(1, 300, (n,), generator=g)).values.to(torch.int32)
    width = int((lens.max() + BS - 1) // BS)
    num_blocks = n * width + 3
    tables = torch.randperm(num_blocks, generator=g)[: n * width].view(n, width).to(torch.int32)
    k_cache = torch.randn(num_blocks * BS, KV_HEADS, DIM, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * BS, KV_HEADS, DIM, generator=g).to(dtype)
    q = torch.randn(n, HEADS, DIM, generator=g).to(dtype)
    # the step's new K/V are written to each request's last slot before attention reads it
    last = lens.long() - 1
    slot_mapping = tables.long()[torch.arange(n), last // BS] * BS + last % BS
    k_new, v_new = k_cache[slot_mapping].clone(), v_cache[slot_mapping].clone()
    expected = reference(q, k_cache, v_cache, tables, lens, DIM ** -0.5)
    for name, backend in backends():
        meta = AttentionMetadata(slot_mapping=slot_mapping, block_size=BS, num_decodes=n,
                                 block_tables=tables, context_lens=lens)
        out = backend.forward(q, k_new, v_new, k_cache, v_cache, meta, DIM ** -0.5)
        err = (out.float() - expected).abs().max().item()
        assert err < tol, f"{name} backend differs from the reference by {err}"
