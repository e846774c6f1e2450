"""Paged attention for one flattened mixed batch (decodes and prompt chunks): one launch per kind of row.

Why this shape:

* A program owns a block of up to `BLOCK_Q` consecutive query rows of one request and one KV head,
  and packs all `H / KVH` query heads sharing that KV head into its tile (`BLOCK_M = BLOCK_Q * group`
  rows), so every K/V tile read from the cache feeds a matrix product of several rows, even for a
  single decode, and is read once per group instead of once per head.
* The KV sequence is cut into segments of `segment_size` positions. Decodes are few rows over long
  contexts, so they are split flash-decoding style: each segment is a separate program (the grid's
  third axis) and a second kernel merges the segments by log-sum-exp. Prompt chunks have rows
  enough to fill the GPU, so their programs walk their segments in a loop and merge as they go,
  which needs no workspace.
* Within a segment, softmax runs online in float32 over tiles of `_TILE` positions; P·V takes P in
  the cache dtype (the tensor cores' input) and accumulates in float32.

Batch invariance (what the engine relies on for reproducible sampling): a query row's output
depends only on its own query, its context and its absolute position, never on what else is in the
batch nor on how its request's prompt was chunked, nor on whether it ran as a decode. Therefore:

* segment and tile boundaries are fixed absolute positions (multiples of `segment_size` and
  `_TILE`), never derived from the batch or the chunk;
* a segment's state is computed by the same code in both launches, starting from the same empty
  state, and tiles past a row's position are fully masked for it and leave its state bit-identical
  (the rescale factor is exactly 1 and the added terms exactly 0);
* both launches merge a row's segments by the same `_fold`, one segment at a time in position
  order, with explicit fused multiply-adds so the compiler has no contraction left to choose;
* the configuration (`BLOCK_M`, `_TILE`, warps) depends only on the model's shapes and dtype.

So the same row computed alone or inside any batch yields identical bits; the tests check this with
`torch.equal`. `segment_size` must stay fixed for the life of an engine.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

SEGMENT_SIZE = 512  # KV positions per segment; a multiple of _TILE, fixed per engine (see the module docstring)
_TILE = 32  # KV positions per inner-loop step, independent of the cache's block size
_MIN_BLOCK_M = 16  # the smallest M of a tensor-core product


@triton.jit
def _first_q_block(query_start_loc_ptr, req, num_decodes, BLOCK_Q: tl.constexpr):
    """Index of request `req`'s first query block: decodes own one block each, chunks ceil(len / BLOCK_Q)."""
    first = req
    if req >= num_decodes:
        first = num_decodes + (tl.load(query_start_loc_ptr + req) - num_decodes) // BLOCK_Q + (req - num_decodes)
    return first


@triton.jit
def _find_request(query_start_loc_ptr, q_block, num_decodes, num_reqs, BLOCK_Q: tl.constexpr):
    """The request owning query block `q_block`: decodes map one to one, chunks by binary search."""
    req = q_block
    if q_block >= num_decodes:
        lo = num_decodes
        hi = num_reqs
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_q_block(query_start_loc_ptr, mid, num_decodes, BLOCK_Q) <= q_block:
                lo = mid + 1
            else:
                hi = mid
        req = lo - 1
    return req


@triton.jit
def _segment_state(q, segment, last_pos, position, row_valid, block_table, k_head_ptr, v_head_ptr, cache_stride_slot,
                   scale, BLOCK_M: tl.constexpr, DIM_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SEGMENT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Running max, sum and unnormalized output of each row over keys [segment start, its position]."""
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    kv_lo = segment * SEGMENT
    kv_hi = tl.minimum(kv_lo + SEGMENT, last_pos + 1)
    for tile_lo in range(kv_lo, kv_hi, TILE):
        key_pos = tile_lo + tl.arange(0, TILE)
        key_valid = key_pos < kv_hi
        block_id = tl.load(block_table + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        slot = block_id * BLOCK_SIZE + key_pos % BLOCK_SIZE
        k = tl.load(k_head_ptr + slot[None, :] * cache_stride_slot + dims[:, None],
                    mask=key_valid[None, :] & dim_valid[:, None], other=0.0)  # [DIM_PAD, TILE]
        v = tl.load(v_head_ptr + slot[:, None] * cache_stride_slot + dims[None, :],
                    mask=key_valid[:, None] & dim_valid[None, :], other=0.0)  # [TILE, DIM_PAD]
        scores = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        scores = tl.where(row_valid[:, None] & (key_pos[None, :] <= position[:, None]), scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        # rows with nothing visible yet keep a finite reference so exp() never sees inf - inf
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        probs = tl.exp(scores - safe_max[:, None])
        # exactly 1 when the maximum did not move, so fully masked tiles leave a row's state bit-identical
        rescale = tl.where(new_max == running_max, 1.0, tl.exp(running_max - safe_max))
        running_sum = tl.fma(running_sum, rescale, tl.sum(probs, axis=1))
        acc = tl.dot(probs.to(v.dtype), v, acc * rescale[:, None], input_precision=DOT_PRECISION)
        running_max = new_max
    return running_max, running_sum, acc


@triton.jit
def _fold(total_max, total_sum, total_acc, seg_max, seg_sum, seg_acc):
    """Merge one more segment into rows' states: the one merge both launches share, so their bits agree.

    Meaningful for rows where both sides have seen a key; callers keep their old state for the others.
    """
    new_max = tl.maximum(total_max, seg_max)
    old_weight = tl.exp(total_max - new_max)
    seg_weight = tl.exp(seg_max - new_max)
    total_sum = tl.fma(total_sum, old_weight, seg_sum * seg_weight)
    old_weight = tl.broadcast_to(old_weight[:, None], total_acc.shape)
    total_acc = tl.fma(total_acc, old_weight, seg_acc * seg_weight[:, None])
    return new_max, total_sum, total_acc


# Batch sizes change every step: specialising on them (Triton makes 1 a constant) would recompile.
@triton.jit(do_not_specialize=["num_decodes", "num_reqs", "max_segments", "q_block_offset"])
def _attention_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    scale, num_decodes, num_reqs, max_segments, q_block_offset,
    q_stride_t, q_stride_h, out_stride_t, out_stride_h, cache_stride_slot, cache_stride_head, block_table_stride,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE: tl.constexpr,
    SEGMENT: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    q_block = tl.program_id(0) + q_block_offset
    kv_head = tl.program_id(1)
    req = _find_request(query_start_loc_ptr, q_block, num_decodes, num_reqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    first_row = (q_block - _first_q_block(query_start_loc_ptr, req, num_decodes, BLOCK_Q)) * BLOCK_Q
    seq_len = tl.load(seq_lens_ptr + req)
    context = seq_len - q_len  # absolute position of the request's first query row
    last_pos = tl.minimum(context + first_row + BLOCK_Q, seq_len) - 1  # of this block's rows
    segment = tl.program_id(2)  # 0 unless SPLIT
    if (first_row < q_len) & (segment * SEGMENT <= last_pos):
        rows = tl.arange(0, BLOCK_M)
        row_in_req = first_row + rows // GROUP
        head = kv_head * GROUP + rows % GROUP
        row_valid = (rows // GROUP < BLOCK_Q) & (row_in_req < q_len)
        position = context + row_in_req
        dims = tl.arange(0, DIM_PAD)
        dim_valid = dims < HEAD_DIM
        token = (q_start + row_in_req).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
                    mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
        block_table = block_tables_ptr + req.to(tl.int64) * block_table_stride
        k_head_ptr = k_cache_ptr + kv_head * cache_stride_head
        v_head_ptr = v_cache_ptr + kv_head * cache_stride_head
        done = row_valid
        if SPLIT:
            row_max, row_sum, acc = _segment_state(
                q, segment, last_pos, position, row_valid, block_table, k_head_ptr, v_head_ptr, cache_stride_slot,
                scale, BLOCK_M, DIM_PAD, HEAD_DIM, BLOCK_SIZE, TILE, SEGMENT, DOT_PRECISION)
            done = row_valid & (position < SEGMENT) & (segment == 0)  # the rest wait for the merge
            partial = row_valid & (position >= SEGMENT) & (position >= segment * SEGMENT)
            part = (token * NUM_HEADS + head) * max_segments + segment
            tl.store(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], acc,
                     mask=partial[:, None] & dim_valid[None, :])
            tl.store(part_max_ptr + part, row_max, mask=partial)
            tl.store(part_sum_ptr + part, row_sum, mask=partial)
        else:
            row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
            row_sum = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
            for seg in range(0, last_pos // SEGMENT + 1):
                seg_max, seg_sum, seg_acc = _segment_state(
                    q, seg, last_pos, position, row_valid, block_table, k_head_ptr, v_head_ptr, cache_stride_slot,
                    scale, BLOCK_M, DIM_PAD, HEAD_DIM, BLOCK_SIZE, TILE, SEGMENT, DOT_PRECISION)
                new_max, new_sum, new_acc = _fold(row_max, row_sum, acc, seg_max, seg_sum, seg_acc)
                # segment 0 is taken as is (as the merge kernel starts from it); rows before a segment skip it
                first = seg == 0
                reached = row_valid & (position >= seg * SEGMENT)
                row_max = tl.where(first, seg_max, tl.where(reached, new_max, row_max))
                row_sum = tl.where(first, seg_sum, tl.where(reached, new_sum, row_sum))
                acc = tl.where(first, seg_acc, tl.where(reached[:, None], new_acc, acc))
        row_sum = tl.where(done, row_sum, 1.0)  # rows not finished here may have nothing to divide
        tl.store(out_ptr + token[:, None] * out_stride_t + head[:, None] * out_stride_h + dims[None, :],
                 (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty), mask=done[:, None] & dim_valid[None, :])


@triton.jit(do_not_specialize=["max_segments"])
def _merge_segments_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, seq_lens_ptr, query_start_loc_ptr, max_segments,
    out_stride_t, out_stride_h,
    NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_PAD: tl.constexpr,
    SEGMENT: tl.constexpr,
):
    req = tl.program_id(0)  # a decode: one query row
    token = tl.load(query_start_loc_ptr + req).to(tl.int64)
    position = tl.load(seq_lens_ptr + req) - 1
    if position >= SEGMENT:
        heads = tl.arange(0, HEADS_PAD)
        dims = tl.arange(0, DIM_PAD)
        head_valid = heads < NUM_HEADS
        part = (token * NUM_HEADS + heads) * max_segments
        row_max = tl.load(part_max_ptr + part, mask=head_valid, other=0.0)
        row_sum = tl.load(part_sum_ptr + part, mask=head_valid, other=1.0)
        acc = tl.load(part_acc_ptr + part[:, None] * DIM_PAD + dims[None, :], mask=head_valid[:, None], other=0.0)
        for segment in range(1, position // SEGMENT + 1):  # in position order, as the in-program merge
            row_max, row_sum, acc = _fold(
                row_max, row_sum, acc,
                tl.load(part_max_ptr + part + segment, mask=head_valid, other=0.0),
                tl.load(part_sum_ptr + part + segment, mask=head_valid, other=1.0),
                tl.load(part_acc_ptr + (part + segment)[:, None] * DIM_PAD + dims[None, :],
                        mask=head_valid[:, None], other=0.0))
        tl.store(out_ptr + token * out_stride_t + heads[:, None] * out_stride_h + dims[None, :],
                 (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty),
                 mask=head_valid[:, None] & (dims[None, :] < HEAD_DIM))


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                    block_size: int, scale: float, num_decodes: int | None = None, *,
                    max_seq_len: int | None = None, segment_size: int = SEGMENT_SIZE) -> None:
    """Causal attention of every query row over its request's paged context, written into `out`.

    q, out: [T, H, D]; k_cache, v_cache: [slots, KVH, D], already holding this step's keys and values;
    query_start_loc: [B + 1] int32; seq_lens: [B] int32 (context including the new rows); block_tables:
    [B, W] int32. Rows past `query_start_loc[B]` (CUDA-graph padding) are left untouched.
    `num_decodes`: requests [0, num_decodes) have exactly one query row each; they get the split
    launch (without the hint every row is served by the looping launch, with the same results).
    `max_seq_len`: an upper bound on seq_lens known on the host (default W * block_size, which needs
    no device sync); it sizes the split grid and its workspace. Neither hint changes any result.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    num_reqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0 and k_cache.shape[2] == head_dim and out.shape == q.shape
    assert k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1
    assert q.stride(-1) == 1 and out.stride(-1) == 1 and block_tables.stride(-1) == 1
    assert segment_size % _TILE == 0 and q.dtype == k_cache.dtype
    if num_tokens == 0 or num_reqs == 0:
        return
    num_decodes = num_decodes or 0
    group = num_heads // num_kv_heads
    block_m = max(_MIN_BLOCK_M, triton.next_power_of_2(group))
    block_q = block_m // group
    max_seq_len = max_seq_len if max_seq_len is not None else block_tables.shape[1] * block_size
    max_segments = max(1, math.ceil(max_seq_len / segment_size))
    dim_pad = triton.next_power_of_2(head_dim)
    split = num_decodes > 0 and max_segments > 1
    # every request's blocks fit below this bound (see _first_q_block), without reading query_start_loc
    num_q_blocks = num_decodes + (num_tokens - num_decodes) // block_q + (num_reqs - num_decodes)
    if split:
        part_acc = torch.empty(num_decodes, num_heads, max_segments, dim_pad, dtype=torch.float32, device=q.device)
        part_max = torch.empty(num_decodes, num_heads, max_segments, dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:  # never touched: any float32 pointer will do
        part_acc = part_max = part_sum = torch.empty(1, dtype=torch.float32, device=q.device)
    shapes = dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, DIM_PAD=dim_pad, SEGMENT=segment_size)

    def launch(grid: tuple[int, int, int], q_block_offset: int, is_split: bool) -> None:
        _attention_kernel[grid](
            out, q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, part_acc, part_max, part_sum,
            scale, num_decodes, num_reqs, max_segments, q_block_offset,
            q.stride(0), q.stride(1), out.stride(0), out.stride(1), k_cache.stride(0), k_cache.stride(1),
            block_tables.stride(0),
            GROUP=group, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_Q=block_q, TILE=_TILE, SPLIT=is_split,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4, **shapes,
        )

    if split:
        launch((num_decodes, num_kv_heads, max_segments), 0, True)
        _merge_segments_kernel[(num_decodes,)](
            out, part_acc, part_max, part_sum, seq_lens, query_start_loc, max_segments, out.stride(0), out.stride(1),
            HEADS_PAD=triton.next_power_of_2(num_heads), num_warps=4, **shapes,
        )
    first = num_decodes if split else 0
    if num_q_blocks > first:
        launch((num_q_blocks - first, num_kv_heads, 1), first, False)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                              query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                              block_size: int, scale: float, num_decodes: int | None = None, *,
                              max_seq_len: int | None = None, segment_size: int = SEGMENT_SIZE) -> None:
    """Per request: gather its context from the cache, softmax(q kᵀ · scale + causal mask) v in float32.

    The hints (`num_decodes`, `max_seq_len`, `segment_size`) do not change the result and are ignored.
    """
    group = q.shape[1] // k_cache.shape[1]
    starts = query_start_loc.tolist()
    for req, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[req], starts[req + 1]
        if end == start:
            continue
        key_pos = torch.arange(seq_len, device=q.device)
        slots = block_tables[req, key_pos // block_size].long() * block_size + key_pos % block_size
        keys = k_cache[slots].float().repeat_interleave(group, dim=1)  # [S, H, D]
        values = v_cache[slots].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        query_pos = seq_len - (end - start) + torch.arange(end - start, device=q.device)
        scores.masked_fill_(key_pos[None, None, :] > query_pos[None, :, None], float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(dim=-1), values).to(out.dtype)
