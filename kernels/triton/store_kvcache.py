"""Write the step's new K and V rows into the paged cache, one program per token.

The cache is slot-major (`[num_blocks * block_size, kv_heads, head_dim]`), so a token's K (or V) is
one contiguous run of `kv_heads * head_dim` elements at its slot: a token needs no block-table lookup,
only its slot. CUDA-graph batches are padded to a captured size, and the padded rows carry slot -1;
they must leave the cache untouched, since slot -1 would otherwise alias the last slot of the cache.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    key_stride_t, key_stride_h, value_stride_t, value_stride_h,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        heads = tl.arange(0, HEADS_PAD)[:, None]
        dims = tl.arange(0, DIM_PAD)[None, :]
        mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
        # The token's rows may be views into a fused qkv projection: only the last dimension is contiguous.
        src_k = token.to(tl.int64) * key_stride_t + heads * key_stride_h + dims
        src_v = token.to(tl.int64) * value_stride_t + heads * value_stride_h + dims
        dst = slot * (NUM_KV_HEADS * HEAD_DIM) + heads * HEAD_DIM + dims
        tl.store(k_cache_ptr + dst, tl.load(key_ptr + src_k, mask=mask), mask=mask)
        tl.store(v_cache_ptr + dst, tl.load(value_ptr + src_v, mask=mask), mask=mask)


def store_kvcache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """key, value: [T, kv_heads, head_dim]; caches: [slots, kv_heads, head_dim]; slot_mapping: [T], -1 = skip."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape and slot_mapping.shape == (num_tokens,)
    assert k_cache.is_contiguous() and v_cache.is_contiguous() and k_cache.shape[1:] == key.shape[1:]
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads), DIM_PAD=triton.next_power_of_2(head_dim),
    )


def store_kvcache_reference(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            slot_mapping: torch.Tensor) -> None:
    """Row t goes to slot `slot_mapping[t]`; rows with slot -1 are padding and are dropped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots] = key[keep]
    v_cache[slots] = value[keep]
