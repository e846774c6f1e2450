"""The Triton kernels against their torch references; on CPUs they run under the Triton interpreter.

Shapes stay small because the interpreter executes every program in Python; the `gpu`-marked tests
repeat the checks at serving sizes when CUDA is available.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from triton_interpreter import use_interpreter_without_cuda

triton = use_interpreter_without_cuda()

from orca.kernels.triton.activation import silu_and_mul, silu_and_mul_reference  # noqa: E402
from orca.kernels.triton.attention import paged_attention, paged_attention_reference  # noqa: E402
from orca.kernels.triton.rms_norm import fused_add_rms_norm, fused_add_rms_norm_reference  # noqa: E402
from orca.kernels.triton.rotary import rotary_embedding, rotary_embedding_reference  # noqa: E402
from orca.kernels.triton.store_kvcache import store_kvcache, store_kvcache_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter evaluates masked-off lanes too: padding rows compute inf - inf before being discarded.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
TOLERANCE = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}




def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=DEVICE)


# ---------------------------------------------------------------------------------------------- elementwise


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kvcache_skips_padded_slots(dtype: torch.dtype) -> None:
    tokens, kv_heads, dim, slots = 5, 3, 64, 40
    # key and value as views into a fused projection, as the model hands them over
    kv = randn(tokens, 2 * kv_heads * dim + 16, dtype=dtype)
    key = kv[:, :kv_heads * dim].view(tokens, kv_heads, dim)
    value = kv[:, kv_heads * dim:2 * kv_heads * dim].view(tokens, kv_heads, dim)
    slot_mapping = torch.tensor([7, -1, 0, 39, -1], device=DEVICE)
    caches = [randn(slots, kv_heads, dim, dtype=dtype, seed=s) for s in (1, 2)]
    before = caches[0].clone()
    expected = [c.clone() for c in caches]
    store_kvcache(key, value, *caches, slot_mapping)
    store_kvcache_reference(key, value, *expected, slot_mapping)
    assert torch.equal(caches[0], expected[0]) and torch.equal(caches[1], expected[1])
    untouched = torch.ones(slots, dtype=torch.bool, device=DEVICE)
    untouched[[7, 0, 39]] = False
    assert torch.equal(caches[0][untouched], before[untouched])


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rms_norm(dtype: torch.dtype, with_residual: bool) -> None:
    tokens, hidden = 4, 96  # not a power of two: the row tile is masked
    x, weight = randn(tokens, hidden, dtype=dtype), randn(hidden, dtype=dtype, seed=1)
    residual = randn(tokens, hidden, dtype=dtype, seed=2) if with_residual else None
    x_ref, res_ref = x.clone(), None if residual is None else residual.clone()
    out, res = fused_add_rms_norm(x, residual, weight, 1e-6)
    out_ref, res_ref = fused_add_rms_norm_reference(x_ref, res_ref, weight, 1e-6)
    assert out is x and (residual is None or res is residual)
    assert torch.equal(res, res_ref)  # the sum rounds exactly like torch's add
    torch.testing.assert_close(out, out_ref, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128])
def test_rotary_embedding(dtype: torch.dtype, dim: int) -> None:
    tokens, heads, kv_heads, max_pos = 3, 3, 1, 50
    qkv = randn(tokens, (heads + 2 * kv_heads) * dim, dtype=dtype)
    v_before = qkv[:, (heads + kv_heads) * dim:].clone()
    q = qkv[:, :heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim:(heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.tensor([0, 17, 49], device=DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_embedding(positions, q, k, cos_sin)
    rotary_embedding_reference(positions, q_ref, k_ref, cos_sin)
    torch.testing.assert_close(q, q_ref, **TOLERANCE[dtype])
    torch.testing.assert_close(k, k_ref, **TOLERANCE[dtype])
    assert torch.equal(qkv[:, (heads + kv_heads) * dim:], v_before)  # v, beside q and k in the projection, is left alone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul(dtype: torch.dtype) -> None:
    tokens, inter = 3, 1100  # two column programs per row, the second one masked
    gate_up = randn(tokens, 2 * inter, dtype=dtype) * 3
    out, out_ref = gate_up.new_empty(tokens, inter), gate_up.new_empty(tokens, inter)
    silu_and_mul(out, gate_up)
    silu_and_mul_reference(out_ref, gate_up)
    torch.testing.assert_close(out, out_ref, **TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------- attention


@dataclass
class PagedRequests:
    """Several requests' full K/V in one paged cache; a batch queries any row range of any of them."""

    q: list[torch.Tensor]  # per request: [len, H, D], the query of every position
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    tables: list[list[int]]
    block_size: int


def make_requests(lengths: list[int], heads: int, kv_heads: int, dim: int, block_size: int,
                  dtype: torch.dtype, seed: int = 0) -> PagedRequests:
    gen = torch.Generator().manual_seed(seed)
    per_request = [-(-n // block_size) for n in lengths]
    num_blocks = 1 + sum(per_request) + 2
    order = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()  # scattered blocks; block 0 unused
    tables, used = [], 0
    for n in per_request:
        tables.append(order[used:used + n])
        used += n
    cache_shape = (num_blocks * block_size, kv_heads, dim)
    # free slots hold NaN: a kernel that reads past a context would poison its output
    k_cache = torch.full(cache_shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = k_cache.clone()
    for table, n in zip(tables, lengths):
        slots = (torch.tensor(table)[:, None] * block_size + torch.arange(block_size)).flatten()[:n].to(DEVICE)
        k_cache[slots] = torch.randn(n, kv_heads, dim, generator=gen).to(dtype=dtype, device=DEVICE)
        v_cache[slots] = torch.randn(n, kv_heads, dim, generator=gen).to(dtype=dtype, device=DEVICE)
    q = [torch.randn(n, heads, dim, generator=gen).to(dtype=dtype, device=DEVICE) for n in lengths]
    return PagedRequests(q, k_cache, v_cache, tables, block_size)


def run_batch(reqs: PagedRequests, parts: list[tuple[int, int, int]], num_decodes: int = 0,
              kernel: Callable[..., None] = paged_attention, padding: int = 0, **kwargs: Any) -> list[torch.Tensor]:
    """parts: (request, first row, end row) each; rows [first, end) of that request attend over [0, end)."""
    q = torch.cat([reqs.q[r][lo:hi] for r, lo, hi in parts] + [reqs.q[0][:padding]])
    lens = [hi - lo for _, lo, hi in parts]
    query_start_loc = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([hi for _, _, hi in parts], dtype=torch.int32, device=DEVICE)
    width = max(len(reqs.tables[r]) for r, _, _ in parts) + 1
    block_tables = torch.zeros(len(parts), width, dtype=torch.int32, device=DEVICE)
    for i, (r, _, _) in enumerate(parts):
        block_tables[i, :len(reqs.tables[r])] = torch.tensor(reqs.tables[r])
    out = torch.full_like(q, 7.0)
    scale = q.shape[-1] ** -0.5
    kernel(q, reqs.k_cache, reqs.v_cache, out, query_start_loc, seq_lens, block_tables, reqs.block_size, scale,
           num_decodes, **kwargs)
    if padding:
        assert torch.equal(out[-padding:], torch.full_like(out[-padding:], 7.0)), "padded rows were written"
    return list(out[:q.shape[0] - padding].split(lens))


ATTENTION_CASES = [
    # dtype, head_dim, block_size, heads, kv_heads, segment_size
    pytest.param(torch.float32, 64, 16, 2, 2, 64, id="fp32-d64-bs16-gqa1"),
    pytest.param(torch.float32, 128, 32, 6, 2, 64, id="fp32-d128-bs32-gqa3"),
    pytest.param(torch.bfloat16, 64, 32, 8, 2, 64, id="bf16-d64-bs32-gqa4"),
    pytest.param(torch.bfloat16, 128, 16, 4, 1, 512, id="bf16-d128-bs16-gqa4-one-segment"),
]


@pytest.mark.parametrize("dtype,dim,block_size,heads,kv_heads,segment_size", ATTENTION_CASES)
def test_paged_attention_mixed_batch(dtype: torch.dtype, dim: int, block_size: int, heads: int, kv_heads: int,
                                     segment_size: int) -> None:
    # two decodes (one spanning three 64-position segments), a chunk after 70 cached positions
    # (crossing the first segment boundary), a first chunk with no earlier context
    reqs = make_requests([150, 37, 79, 13], heads, kv_heads, dim, block_size, dtype)
    parts = [(0, 149, 150), (1, 36, 37), (2, 70, 79), (3, 0, 13)]
    got = run_batch(reqs, parts, num_decodes=2, padding=3, segment_size=segment_size)
    want = run_batch(reqs, parts, num_decodes=2, kernel=paged_attention_reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOLERANCE[dtype])
    # without the hint the decodes take the looping launch instead of the split one: the same bits
    unhinted = run_batch(reqs, parts, segment_size=segment_size)
    assert all(torch.equal(g, u) for g, u in zip(got, unhinted))


@pytest.mark.parametrize("dtype,heads,kv_heads", [(torch.bfloat16, 6, 2), (torch.float32, 4, 1)])
def test_paged_attention_is_batch_invariant(dtype: torch.dtype, heads: int, kv_heads: int) -> None:
    """A row's bits depend neither on its batch nor on how its prompt was chunked."""
    reqs = make_requests([100, 150, 45, 13], heads, kv_heads, 64, 16, dtype)
    alone = run_batch(reqs, [(0, 0, 100)], segment_size=64)[0]
    first_chunk = run_batch(reqs, [(3, 0, 13), (0, 0, 37)], segment_size=64)[1]
    middle_chunk = run_batch(reqs, [(1, 149, 150), (2, 5, 20), (0, 37, 99)], num_decodes=1, segment_size=64)[2]
    last_as_decode = run_batch(reqs, [(1, 149, 150), (0, 99, 100), (2, 20, 45)], num_decodes=2, segment_size=64)[1]
    assert torch.equal(torch.cat([first_chunk, middle_chunk, last_as_decode]), alone)
    torch.testing.assert_close(alone, run_batch(reqs, [(0, 0, 100)], kernel=paged_attention_reference)[0],
                               **TOLERANCE[dtype])


# ---------------------------------------------------------------------------------------------- GPU sizes


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dim,block_size,heads,kv_heads", [(64, 16, 32, 8), (128, 32, 32, 8), (128, 16, 24, 8)])
def test_paged_attention_serving_sizes(dtype: torch.dtype, dim: int, block_size: int, heads: int,
                                       kv_heads: int) -> None:
    lengths = [3000, 1, 517, 2048, 700, 1300, 64, 4100]
    reqs = make_requests(lengths, heads, kv_heads, dim, block_size, dtype)
    parts = [(0, 2999, 3000), (1, 0, 1), (2, 516, 517), (3, 1000, 2048), (4, 0, 700), (5, 1200, 1300),
             (6, 0, 64), (7, 3000, 4100)]
    got = run_batch(reqs, parts, num_decodes=3, padding=5)
    want = run_batch(reqs, parts, num_decodes=3, kernel=paged_attention_reference)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=2e-2, rtol=2e-2)
    alone = run_batch(reqs, [(3, 0, 2048)])[0]
    pieces = [run_batch(reqs, [(0, 2999, 3000), (3, 0, 1000)], num_decodes=1)[1],
              run_batch(reqs, [(2, 516, 517), (7, 0, 300), (3, 1000, 2047)], num_decodes=1)[2],
              run_batch(reqs, [(3, 2047, 2048), (4, 0, 700)], num_decodes=1)[0]]
    assert torch.equal(torch.cat(pieces), alone)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_elementwise_serving_sizes(dtype: torch.dtype) -> None:
    tokens, hidden, inter, heads, kv_heads, dim = 1000, 4096, 14336, 32, 8, 128
    x, residual, weight = randn(tokens, hidden, dtype=dtype), randn(tokens, hidden, dtype=dtype, seed=1), randn(
        hidden, dtype=dtype, seed=2)
    out, res = fused_add_rms_norm(x.clone(), residual.clone(), weight, 1e-5)
    out_ref, res_ref = fused_add_rms_norm_reference(x.clone(), residual.clone(), weight, 1e-5)
    assert torch.equal(res, res_ref)
    torch.testing.assert_close(out, out_ref, atol=2e-2, rtol=2e-2)
    gate_up = randn(tokens, 2 * inter, dtype=dtype)
    act, act_ref = gate_up.new_empty(tokens, inter), gate_up.new_empty(tokens, inter)
    silu_and_mul(act, gate_up)
    silu_and_mul_reference(act_ref, gate_up)
    torch.testing.assert_close(act, act_ref, atol=2e-2, rtol=2e-2)
    q, k = randn(tokens, heads, dim, dtype=dtype), randn(tokens, kv_heads, dim, dtype=dtype, seed=1)
    freqs = torch.outer(torch.arange(8192).float(), 1.0 / 500000 ** (torch.arange(0, dim, 2).float() / dim))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.randint(0, 8192, (tokens,), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    q_ref, k_ref = q.clone(), k.clone()
    rotary_embedding(positions, q, k, cos_sin)
    rotary_embedding_reference(positions, q_ref, k_ref, cos_sin)
    torch.testing.assert_close(q, q_ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(k, k_ref, atol=2e-2, rtol=2e-2)
