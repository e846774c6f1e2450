"""Runs Triton kernels on CPUs for tests: the interpreter, with four of its gaps closed.

Import this before any module that decorates Triton kernels: `TRITON_INTERPRET` is read then.
"""
from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Any

import pytest
import torch


def use_interpreter_without_cuda() -> ModuleType:
    """Triton itself (the test is skipped without it), interpreting on CPUs when there is no CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    triton = pytest.importorskip("triton")
    if triton.knobs.runtime.interpret:
        _fix_interpreter()
    return triton


@functools.cache  # patch once, however many test modules ask
def _fix_interpreter() -> None:
    """Four interpreter gaps that are not the kernels' behaviour on GPUs, closed for these tests.

    * It truncates float32 -> bfloat16 casts; compiled Triton (and torch) round to nearest even. Left
      alone, bf16 results would differ from torch's by the interpreter's rounding, not the kernels'.
    * Its `tl.dot` multiplies bfloat16 operands as their raw 16-bit patterns; they are widened first
      here, which is exact (tensor cores multiply bf16 exactly and accumulate in float32 as well).
    * Its `tl.dot` is `np.matmul`, whose BLAS sums a row in an order that depends on the row's place
      in the tile (numpy 2.4's OpenBLAS does), while a GPU's MMA gives each row the same order. The
      products are summed here in one fixed order over k, so batch-invariance tests test the kernels.
    * Its scalars are one-element arrays, and numpy >= 2.4 refuses `int()` on those, so a loop whose
      bound was loaded from memory (`range(lo, hi)`) fails before it starts.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    convert_float = interpreter._convert_float

    def convert_rounding(data: np.ndarray, src: tl.dtype, dst: tl.dtype, rounding_mode: Any) -> np.ndarray:
        if src == tl.float32 and dst == tl.bfloat16:
            rounded = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32)).to(torch.bfloat16)
            return rounded.view(torch.int16).numpy().view(np.uint16)
        return convert_float(data, src, dst, rounding_mode)

    builder = interpreter.InterpreterBuilder
    raw_dot = builder.create_dot

    def widen(x: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if x.dtype.scalar != tl.bfloat16:
            return x
        return interpreter.TensorHandle(convert_float(x.data, tl.bfloat16, tl.float32, None).view(np.float32),
                                        tl.float32)

    def dot(self: Any, a: interpreter.TensorHandle, b: interpreter.TensorHandle, acc: interpreter.TensorHandle,
            input_precision: Any, max_num_imprecise_acc: int) -> interpreter.TensorHandle:
        a, b = widen(a), widen(b)
        if not (a.dtype.scalar.is_floating() and b.dtype.scalar.is_floating()) or a.dtype.primitive_bitwidth == 8:
            return raw_dot(self, a, b, acc, input_precision, max_num_imprecise_acc)
        dtype = acc.data.dtype
        left, right = a.data.astype(dtype), b.data.astype(dtype)
        total = acc.data.copy()
        for k in range(left.shape[-1]):
            total += left[..., :, k, None] * right[..., k, None, :]
        return interpreter.TensorHandle(total, acc.dtype.scalar)

    patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor_with_scalar_index(tensor: type, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._convert_float = convert_rounding
    builder.create_dot = dot
    interpreter._patch_lang_tensor = patch_tensor_with_scalar_index
