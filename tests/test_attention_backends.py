"""Every attention backend must agree with a per-request reference on one mixed batch of decodes and prompt
chunks (with and without earlier context in the cache), built from the same neutral metadata."""
from __future__ import annotations

import platform

import pytest
import torch
import torch.nn.functional as F

from orca.engine.attention.cpu_backend import CpuAttentionBackend
from orca.engine.attention.metadata import AttentionMetadata
from orca.engine.attention.torch_backend import TorchAttentionBackend
from orca.kernels import cpu

BS, HEADS, KV_HEADS, DIM = 16, 9, 3, 64


def reference(q, k_cache, v_cache, tables, query_start_loc, seq_lens, scale, block_size=BS):
    """Row i of request r sits at position seq_len - query_len + i and attends to positions up to it."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for r in range(len(seq_lens)):
        start, end, length = int(query_start_loc[r]), int(query_start_loc[r + 1]), int(seq_lens[r])
        pos = torch.arange(length)
        slots = tables[r].long()[pos // block_size] * block_size + pos % block_size
        keys, vals = k_cache[slots].float().transpose(0, 1), v_cache[slots].float().transpose(0, 1)
        qr = q[start:end].float().transpose(0, 1)  # [heads, rows, dim]
        mask = pos.unsqueeze(0) <= torch.arange(length - (end - start), length).unsqueeze(1)
        o = F.scaled_dot_product_attention(qr, keys, vals, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:end] = o.transpose(0, 1)
    return out


def _has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx512f" in f.read()
    except OSError:
        return False


# The kernels' vector code for this CPU, on an AVX-512 CPU also their AVX2 code (AMD Zen 2/3 runs that),
# and the portable code non-x86 CPUs run.
ISAS = ["native"] + (["avx2"] if _has_avx512() else []) + (["portable"] if platform.machine() == "x86_64" else [])


def cpu_kernels(isa: str = "native"):
    kernels = cpu.load(isa)
    if kernels is None:
        pytest.fail("the CPU kernel did not build (compiler and ninja are installed by `make`)")
    return kernels


def backends():
    yield "torch", TorchAttentionBackend(KV_HEADS)
    for isa in ISAS:
        yield f"cpu ({isa})", CpuAttentionBackend(KV_HEADS, cpu_kernels(isa))


def mixed_batch(dtype: torch.dtype, num_decodes: int, chunks: list[tuple[int, int]], seed: int = 0,
                heads: int = HEADS, kv_heads: int = KV_HEADS, dim: int = DIM, block_size: int = BS):
    """Decodes of random (unsorted) context lengths, then prompt chunks given as (query_len, earlier context)."""
    g = torch.Generator().manual_seed(seed)
    decode_lens = torch.randint(1, 300, (num_decodes,), generator=g).tolist()
    query_lens = [1] * num_decodes + [n for n, _ in chunks]
    seq_lens = torch.tensor(decode_lens + [n + earlier for n, earlier in chunks], dtype=torch.int32)
    width = int((seq_lens.max() + block_size - 1) // block_size)
    num_blocks = len(seq_lens) * width + 3
    tables = torch.randperm(num_blocks, generator=g)[: len(seq_lens) * width].view(len(seq_lens), width).to(torch.int32)
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g).to(dtype)
    query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
    query_start_loc[1:] = torch.tensor(query_lens).cumsum(0)
    num_tokens = int(query_start_loc[-1])
    q = torch.randn(num_tokens, heads, dim, generator=g).to(dtype)
    request = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
    positions = torch.arange(num_tokens) - query_start_loc[request].long() + (seq_lens[request] - torch.tensor(query_lens)[request]).long()
    slot_mapping = tables.long()[request, positions // block_size] * block_size + positions % block_size
    # the step's new K/V are what the cache holds at their slots, so the reference sees the same values
    k_new, v_new = k_cache[slot_mapping].clone(), v_cache[slot_mapping].clone()
    meta = AttentionMetadata(query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=tables,
                             slot_mapping=slot_mapping, num_decodes=num_decodes, num_actual_tokens=num_tokens,
                             block_size=block_size, query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens,
                             max_seq_len=int(seq_lens.max()))
    expected = reference(q, k_cache, v_cache, tables, query_start_loc, seq_lens, dim ** -0.5, block_size)
    return q, k_new, v_new, k_cache, v_cache, meta, expected


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_backends_match_reference_on_a_mixed_batch(dtype, tol):
    # 37 decodes: more than one torch decode group; chunks without and with earlier context
    q, k_new, v_new, k_cache, v_cache, meta, expected = mixed_batch(dtype, 37, [(20, 0), (7, 50), (33, 16)])
    for name, backend in backends():
        out = backend.forward(q, k_new, v_new, k_cache.clone(), v_cache.clone(), meta, backend.build(meta), DIM ** -0.5)
        err = (out.float() - expected).abs().max().item()
        assert err < tol, f"{name} backend differs from the reference by {err}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (4, 4, 128), (12, 2, 32), (2, 1, 256), (6, 3, 96)])
@pytest.mark.parametrize("isa", ISAS)
def test_cpu_kernels_on_long_chunks(dtype, tol, heads, kv_heads, dim, isa):
    """Chunks longer than a query block and a context tile, with and without earlier context, and one row
    past a tile boundary, for every compiled head size and a few query-head groupings."""
    q, k_new, v_new, k_cache, v_cache, meta, expected = mixed_batch(
        dtype, 3, [(100, 0), (70, 45), (1, 31), (33, 64)], seed=1, heads=heads, kv_heads=kv_heads, dim=dim)
    backend = CpuAttentionBackend(kv_heads, cpu_kernels(isa))
    out = backend.forward(q, k_new, v_new, k_cache.clone(), v_cache.clone(), meta, backend.build(meta), dim ** -0.5)
    err = (out.float() - expected).abs().max().item()
    assert err < tol, f"{isa}: heads={heads} kv_heads={kv_heads} dim={dim}: the CPU kernels differ from the reference by {err}"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size", [5, 24])
def test_cpu_kernels_on_odd_block_sizes(dtype, tol, block_size):
    """Blocks that are not a multiple of the decode kernel's 16-token score tiles, or are odd (its value
    pass takes tokens in pairs, so a pair may straddle two blocks), with odd and even context lengths."""
    q, k_new, v_new, k_cache, v_cache, meta, expected = mixed_batch(dtype, 23, [(9, 0), (17, 13)], seed=2,
                                                                    block_size=block_size)
    for isa in ISAS:
        backend = CpuAttentionBackend(KV_HEADS, cpu_kernels(isa))
        out = backend.forward(q, k_new, v_new, k_cache.clone(), v_cache.clone(), meta, backend.build(meta), DIM ** -0.5)
        err = (out.float() - expected).abs().max().item()
        assert err < tol, f"{isa}: block_size={block_size}: the CPU kernels differ from the reference by {err}"


def test_padded_rows_store_nothing():
    """Rows past num_actual_tokens (a batch padded to a captured size) must not touch the cache."""
    q, k_new, v_new, k_cache, v_cache, meta, expected = mixed_batch(torch.float32, 5, [])
    pad = 3
    q = torch.cat([q, torch.zeros(pad, HEADS, DIM)])
    k_new, v_new = torch.cat([k_new, torch.full((pad, KV_HEADS, DIM), 7.0)]), torch.cat([v_new, torch.zeros(pad, KV_HEADS, DIM)])
    meta.slot_mapping = torch.cat([meta.slot_mapping, torch.full((pad,), -1)])
    for name, backend in backends():
        cache = k_cache.clone()
        out = backend.forward(q, k_new, v_new, cache, v_cache.clone(), meta, backend.build(meta), DIM ** -0.5)
        assert torch.equal(cache, k_cache), name
        assert (out[:5] - expected).abs().max() < 1e-5, name
