"""`orca bench attention`: decode attention's achieved memory bandwidth against the device's own copy bandwidth.

Decode attention reads every context token's K and V once per step, so its speed limit is memory
bandwidth; the fair yardstick is a plain device-to-device copy measured in the same run, not a
datasheet figure. Runs the attention backend the engine would pick for the device (Triton on CUDA,
the C++ kernel on CPUs).
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Any


def add_bench_attention_args(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("attention", help="decode attention bandwidth vs a device-to-device copy")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-heads", type=int, default=32, help="default: the 1B shape (32 query, 8 KV heads, dim 64)")
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--batch-sizes", default="64,128,256")
    p.add_argument("--context-lens", default="512,1024,2048")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--iterations", type=int, default=20)
    p.add_argument("--json", default=None)
    p.set_defaults(func=lambda args: (run_attention_bench(args), 0)[1])


def _timed(fn: Any, iterations: int, device: Any) -> float:
    """Median seconds of `fn` over `iterations` runs after one warm-up, synchronising on CUDA."""
    import statistics

    import torch

    fn()
    times = []
    for _ in range(iterations):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_attention_bench(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from .attention.metadata import AttentionMetadata
    from .attention.selector import select_backend
    from .device import resolve_device

    device, dtype = resolve_device(args.device), getattr(torch, args.dtype)
    heads, kv_heads, dim, bs = args.num_heads, args.num_kv_heads, args.head_dim, args.block_size
    backend = select_backend(device, heads, kv_heads, dim, dtype)
    copy_source = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    copy_target = torch.empty_like(copy_source)
    copy_bandwidth = 2 * copy_source.numel() / _timed(lambda: copy_target.copy_(copy_source), args.iterations, device)
    rows = []
    print(f"{type(backend).__name__} on {device}; device-to-device copy: {copy_bandwidth / 1e9:.1f} GB/s")
    print(f"{'batch':>6} {'context':>8} {'us':>9} {'GB/s':>8} {'of copy':>8}")
    for batch in [int(b) for b in args.batch_sizes.split(",")]:
        for context in [int(c) for c in args.context_lens.split(",")]:
            blocks_per_seq = -(-context // bs)
            num_blocks = batch * blocks_per_seq
            k_cache = torch.randn(num_blocks * bs, kv_heads, dim, device=device).to(dtype)
            v_cache = torch.randn_like(k_cache)
            tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).to(torch.int32)
            seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
            query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
            last = torch.full((batch,), context - 1, device=device)
            slots = tables.long()[torch.arange(batch, device=device), last // bs] * bs + last % bs
            meta = AttentionMetadata(query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=tables,
                                     slot_mapping=slots, num_decodes=batch, num_actual_tokens=batch, block_size=bs,
                                     query_start_loc_cpu=query_start_loc.cpu(), seq_lens_cpu=seq_lens.cpu(),
                                     max_seq_len=context)
            q = torch.randn(batch, heads, dim, device=device).to(dtype)
            k, v = k_cache[slots].clone(), v_cache[slots].clone()
            built = backend.build(meta)
            seconds = _timed(lambda: backend.forward(q, k, v, k_cache, v_cache, meta, built, dim ** -0.5),
                             args.iterations, device)
            bytes_read = 2 * batch * context * kv_heads * dim * dtype.itemsize
            row = {"batch": batch, "context": context, "seconds": seconds, "bandwidth": bytes_read / seconds,
                   "fraction_of_copy": bytes_read / seconds / copy_bandwidth}
            rows.append(row)
            print(f"{batch:>6} {context:>8} {seconds * 1e6:>9.1f} {row['bandwidth'] / 1e9:>8.1f} "
                  f"{row['fraction_of_copy']:>8.0%}")
            del k_cache, v_cache
    result = {"backend": type(backend).__name__, "device": str(device), "dtype": args.dtype,
              "copy_bandwidth": copy_bandwidth, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
