"""Rotate-half rotary embedding of q and k in place, one program per token for all of its heads.

One program per token gathers that token's cos/sin row once and reuses it for every query and KV head.
q and k are usually views into the fused qkv projection, so they are addressed through their strides
instead of being copied. The rounding follows the engine's torch code (cos/sin cast to the activation
dtype, each product rounded to it) so the GPU and the portable path give the same bits in bf16/fp16.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, token, stride_t, stride_h, num_heads, cos, sin,
                  HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, HALF_PAD)[None, :]
    mask = (heads < num_heads) & (dims < HALF)
    first = x_ptr + token * stride_t + heads * stride_h + dims
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = (x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)
    out2 = (x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)
    tl.store(first, out1.to(dtype), mask=mask)
    tl.store(first + HALF, out2.to(dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    positions_ptr, q_ptr, k_ptr, cos_sin_ptr,
    q_stride_t, q_stride_h, k_stride_t, k_stride_h, cos_sin_stride, num_heads, num_kv_heads,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)[None, :]
    row = cos_sin_ptr + position * cos_sin_stride + dims
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(row, mask=dims < HALF, other=0.0).to(dtype).to(tl.float32)
    sin = tl.load(row + HALF, mask=dims < HALF, other=0.0).to(dtype).to(tl.float32)
    _rotate_heads(q_ptr, token, q_stride_t, q_stride_h, num_heads, cos, sin, HALF, HEADS_PAD, HALF_PAD)
    _rotate_heads(k_ptr, token, k_stride_t, k_stride_h, num_kv_heads, cos, sin, HALF, KV_HEADS_PAD, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """positions: [T]; q: [T, H, D]; k: [T, KVH, D]; cos_sin: [max_position, D] = [cos | sin], float32."""
    num_tokens, num_heads, head_dim = q.shape
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and positions.shape == (num_tokens,)
    assert q.dtype == k.dtype and q.stride(-1) == 1 and k.stride(-1) == 1
    assert cos_sin.shape[1] == head_dim and cos_sin.stride(-1) == 1 and head_dim % 2 == 0
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(num_tokens,)](
        positions, q, k, cos_sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        num_heads, k.shape[1],
        HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HEADS_PAD=triton.next_power_of_2(num_heads), KV_HEADS_PAD=triton.next_power_of_2(k.shape[1]),
    )


def rotary_embedding_reference(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                               cos_sin: torch.Tensor) -> None:
    """The engine's torch rotary (engine/layers/rotary.py), written back into q and k."""
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    for x in (q, k):
        x1, x2 = x.chunk(2, dim=-1)
        x.copy_(torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1))
