"""The one kernel facade the layers call: each op dispatches by the tensor's device.

CUDA runs the Triton kernels (`triton/`), CPUs the C++ kernels (`csrc/`, built on first use), and
anything else the plain torch code below. The choice is made once per device type, here and nowhere
else (the attention backends follow it too).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from . import cpu


@functools.cache
def provider(device_type: str) -> str:
    """"triton", "cpu" or "torch": which implementation serves tensors on this device type.

    `ORCA_KERNELS` overrides the choice: `torch` everywhere, or `triton` on any device (on CPUs only
    under `TRITON_INTERPRET=1`, which is how the engine is tested on Triton without a GPU).
    """
    forced = os.environ.get("ORCA_KERNELS", "auto")
    if forced in ("torch", "triton"):
        return forced
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    if device_type == "cpu" and cpu.load() is not None:
        return "cpu"
    return "torch"


_gemm_mode = threading.local()


@contextlib.contextmanager
def batch_invariant_gemms(enabled: bool) -> Iterator[None]:
    """Within this block `linear` computes each row the same way whatever else shares the call.

    Steps with a seeded request, or every step of a batch-invariant engine, run in it; the others take
    the fastest GEMM, invariant or not.
    """
    previous = getattr(_gemm_mode, "invariant", False)
    _gemm_mode.invariant = enabled
    try:
        yield
    finally:
        _gemm_mode.invariant = previous


def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's blocked layout, for `linear`, or None where the plain weight serves.

    On CPUs `F.linear` takes MKL's GEMM in float32, which on AMD EPYCs runs far below the machine
    (3x slower than oneDNN's with a few rows, 1.9x with 256, on an AVX2 EPYC), and re-lays a bf16
    weight out for oneDNN on every call (1.07x to 2x slower than packed, on an AVX-512 EPYC). Packed
    once after loading, for a second copy of every weight in memory.
    """
    if provider(weight.device.type) != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16) \
            or not torch.backends.mkldnn.is_available() \
            or (weight.dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported()):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _packed_linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")


# Rows per GEMM call inside `batch_invariant_gemms`: every call then has one shape, so the library
# picks one kernel and one split of the reduction for all of them. 32 rows cost 1.3x to 3x the one
# call they replace (bf16, on a Sapphire Rapids Xeon), paid only by steps that must be invariant.
INVARIANT_ROWS = 32


@functools.cache
def _chunk_is_position_invariant(dtype: torch.dtype, out_features: int, in_features: int, threads: int,
                                 packed_gemm: bool) -> bool:
    """Whether a row of an `INVARIANT_ROWS`-row call gets the same bits at any position, beside any rows.

    Libraries pick kernels and reduction splits by row count (on a Sapphire Rapids Xeon oneDNN's bf16
    GEMM gives a row other bits at 1, 16, 33 or 300 rows; on an AVX2 EPYC MKL's float32 GEMM does
    below 12 rows and off multiples of four), but with the row count fixed every row should take the
    same path. Measured here on random data, since that is the library's choice, not ours.
    """
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight) if packed_gemm else None
    gemm = functools.partial(_packed_linear, packed=packed) if packed_gemm else functools.partial(F.linear, weight=weight)
    x = torch.randn(INVARIANT_ROWS, in_features, generator=g).to(dtype)
    reference = gemm(x)
    permutation = torch.randperm(INVARIANT_ROWS, generator=g)
    beside_zeros = torch.cat([x[:1], x.new_zeros(INVARIANT_ROWS - 1, in_features)])
    return torch.equal(gemm(x[permutation].contiguous()), reference[permutation]) \
        and torch.equal(gemm(beside_zeros)[:1], reference[:1])


def _invariant_cpu_linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight.T` as calls of exactly `INVARIANT_ROWS` rows (the last one padded with zeros), by the
    packed GEMM or F.linear, whichever was measured to be position invariant; else a row at a time,
    each as a two-row call (a one-row product goes to a GEMV that splits the reduction its own way)."""
    out_features, in_features = weight.shape
    threads = torch.get_num_threads()
    if packed is not None and _chunk_is_position_invariant(weight.dtype, out_features, in_features, threads, True):
        gemm, rows_per_call = functools.partial(_packed_linear, packed=packed), INVARIANT_ROWS
    elif _chunk_is_position_invariant(weight.dtype, out_features, in_features, threads, False):
        gemm, rows_per_call = functools.partial(F.linear, weight=weight), INVARIANT_ROWS
    else:
        return torch.cat([F.linear(row.expand(2, -1).contiguous(), weight)[:1] for row in x.split(1)])
    rows = x.shape[0]
    padding = -rows % rows_per_call
    if padding:
        x = torch.cat([x, x.new_zeros(padding, in_features)])
    return torch.cat([gemm(chunk) for chunk in x.split(rows_per_call)])[:rows]


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T`, by the packed GEMM where there is one; on CPUs inside `batch_invariant_gemms`
    by calls of one shape, so a row's bits do not depend on what shares the step. (GPU libraries pick
    kernels by shape too; the engine's GPU path answers for its own invariance.)"""
    if x.device.type == "cpu" and getattr(_gemm_mode, "invariant", False):
        return _invariant_cpu_linear(x, weight, packed)
    if packed is not None:
        return _packed_linear(x, packed)
    return F.linear(x, weight)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new residual) where the residual stream is `x + residual`, normed in float32.

    The kernels work in place: `x` must be a fresh activation the caller no longer needs.
    """
    kind = provider(x.device.type)
    if kind == "cpu":
        residual = torch.zeros_like(x) if residual is None else residual
        cpu.load().fused_add_rms_norm(x, residual, weight, eps)
        return x, residual
    if kind == "triton":
        from .triton.rms_norm import fused_add_rms_norm as triton_fused_add_rms_norm

        return triton_fused_add_rms_norm(x, residual, weight, eps)
    if residual is not None:
        x = x + residual
    dtype = x.dtype
    normed = x.float()
    normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype), x


def rotary_embedding(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q [T, H, D] and k [T, KVH, D]; cos_sin is [positions, cos | sin]."""
    kind = provider(q.device.type)
    if kind == "cpu":
        cpu.load().rotary_embedding(positions, q, k, cos_sin)
        return q, k
    if kind == "triton":
        from .triton.rotary import rotary_embedding as triton_rotary_embedding

        triton_rotary_embedding(positions, q, k, cos_sin)
        return q, k
    cos, sin = cos_sin[positions].to(q.dtype).unsqueeze(1).chunk(2, dim=-1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dimension."""
    kind = provider(gate_up.device.type)
    if kind == "torch":
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    out = gate_up.new_empty(gate_up.shape[0], gate_up.shape[1] // 2)
    if kind == "cpu":
        cpu.load().silu_and_mul(out, gate_up)
    else:
        from .triton.activation import silu_and_mul as triton_silu_and_mul

        triton_silu_and_mul(out, gate_up)
    return out


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The first index of each row's maximum (a NaN's, where a row has one), as int64 on the logits' device."""
    if provider(logits.device.type) == "cpu" and logits.dim() == 2 and logits.dtype in (torch.float32, torch.bfloat16):
        out = torch.empty(logits.shape[0], dtype=torch.long)
        cpu.load().greedy_argmax(out, logits.contiguous())
        return out
    return logits.max(dim=-1).indices  # first maximum, like argmax, but several times faster on CPU
