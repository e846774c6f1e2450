"""The one kernel facade the layers call: each op dispatches by the tensor's device.

CUDA runs the Triton kernels (`triton/`), CPUs the C++ kernels (`csrc/`, built on first use), and
anything else the plain torch code below. The choice is made once per device type, here and nowhere
else (the attention backends follow it too).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
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


# Row counts a step's GEMM may have: below, at and above the library's blocking thresholds.
_PROBE_ROWS = (1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17, 31, 32, 33, 64, 65, 100, 128, 129, 256, 257, 512, 513, 1024, 2048)
_PROBE_FLOPS = 6e10  # per weight shape, once per process: the LM head is probed up to 256 rows


@functools.cache
def packed_gemm_is_batch_invariant(dtype: torch.dtype, out_features: int, in_features: int, threads: int) -> bool:
    """Whether oneDNN's packed GEMM gives a row the same bits whatever the row count, measured here.

    It depends on the CPU, the library and the thread count: on an AVX-512 EPYC the bf16 GEMM splits
    the MLP's long reduction differently past some row count, while on an AVX2 one the float32 GEMM
    is invariant and MKL's plain one is not (rows differ below 12 rows and off multiples of four). So
    it is measured, on random data of the shape, for row counts up to a bound on the probe's cost.
    """
    g = torch.Generator().manual_seed(0)
    rows = [r for r, probed in zip(_PROBE_ROWS, itertools.accumulate(_PROBE_ROWS))
            if probed * 2 * out_features * in_features <= _PROBE_FLOPS]
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(out_features, in_features, generator=g).to(dtype))
    x = torch.randn(max(rows, default=1), in_features, generator=g).to(dtype)
    full = _packed_linear(x, packed)
    return all(torch.equal(_packed_linear(x[:r], packed), full[:r]) for r in rows)


def linear(x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ weight.T`, by the packed GEMM where there is one, unless rows must not depend on the batch
    and the packed GEMM has not been measured to give them that here.

    Plain `F.linear` is then the fallback, with one exception handled: on CPUs a one-row product goes
    to a GEMV that splits the reduction differently from the GEMM that two rows or more take, so in
    bf16 a decode running alone gets logits a few last bits away from the same decode beside others,
    and a seeded sample can flip. A lone row is computed as two. (GPU libraries pick kernels by shape
    too; their kernels answer for that.)
    """
    if packed is not None and (not getattr(_gemm_mode, "invariant", False) or packed_gemm_is_batch_invariant(
            weight.dtype, weight.shape[0], weight.shape[1], torch.get_num_threads())):
        return _packed_linear(x, packed)
    if x.shape[0] == 1 and x.device.type == "cpu":
        return F.linear(x.expand(2, -1).contiguous(), weight)[:1]
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
