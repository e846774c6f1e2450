"""CPU kernels compiled from `csrc/` on first use with torch's extension builder (cached across runs).

Torch has no paged-attention op for CPUs: gathering each request's KV blocks into a padded
buffer for SDPA copies the whole cache every layer. The C++ kernel reads the blocks in place.
Building needs a C++ compiler and ninja; without them `load()` returns None and the engine
falls back to the portable torch backend.
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
import sys
from types import ModuleType


log = logging.getLogger(__name__)
_SOURCES = [os.path.join(os.path.dirname(__file__), "csrc", name)
            for name in ("bindings.cpp", "paged_attention.cpp", "prefill_attention.cpp", "cache.cpp",
                          "elementwise.cpp", "sampling.cpp")]
# Fast-math lets the compiler vectorize the dot-product reductions and exp; -march=native is safe
# because the build is cached per machine (torch keys the cache on the flags and sources).
_CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_NAME = "orca_cpu_kernels"
# The kernels' vector code is AVX-512 where the CPU has it, else AVX2 (`csrc/simd.h`), else portable C++.
# The other builds let one machine's tests cover what AMD Zen 2/3 (AVX2) and non-x86 CPUs run.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"], "portable": ["-mno-avx2"]}


@functools.cache
def load(isa: str = "native") -> ModuleType | None:
    # torch looks for `ninja` on PATH; the pip-installed one sits next to this interpreter.
    bin_dir = os.path.dirname(sys.executable)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils.cpp_extension import _get_build_directory, load as build

        # torch's build lock is a plain file: a process killed while holding it (even while loading an
        # up-to-date build) leaves every later one waiting forever. An flock dies with its holder, so
        # whoever holds it is alone and may clear a lock file left behind.
        name = _NAME if isa == "native" else f"{_NAME}_{isa}"
        directory = _get_build_directory(name, verbose=False)
        with open(os.path.join(directory, "orca.flock"), "w") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            stale = os.path.join(directory, "lock")
            if os.path.exists(stale):
                os.remove(stale)
            return build(name, _SOURCES, extra_cflags=_CFLAGS + ISA_FLAGS[isa], verbose=False)
    except Exception as e:  # no compiler, no ninja, unsupported platform: stay correct, just slower
        log.warning("CPU kernels unavailable (%s); using torch ops, which are slower", e)
        return None
