"""`orca bench throughput`: offline throughput of the engine against a static-batching baseline.

The engine serves the whole fixed workload with iteration-level scheduling. The baseline is
what serving looked like before Orca: Hugging Face `generate` over FCFS batches that run
until their longest request finishes. Both see exactly the same requests, so the ratio of
their total tokens/s on the same prefix of the workload is the number that matters.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from orca.engine.arg_utils import LOAD_FORMAT_HELP, MODEL_HELP
from orca.engine.bundled_model import bundled_model_path
from orca.engine.config import LOAD_FORMATS
from orca.engine.workload import BenchRequest, load_workload

WARMUP_PROMPT = list(range(100, 116))
WARMUP_MAX_TOKENS = 4


@dataclass
class RunResult:
    """Token counts and wall time of one timed run; rates are derived so they never disagree."""

    name: str
    requests: int
    prompt_tokens: int
    generated_tokens: int
    seconds: float

    @property
    def generated_tok_s(self) -> float:
        return self.generated_tokens / self.seconds

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.generated_tokens) / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "generated_tok_s": self.generated_tok_s, "total_tok_s": self.total_tok_s}


def add_bench_args(subparsers: argparse._SubParsersAction) -> None:
    """Register `bench` with its `throughput` sub-subcommand on the CLI's subparsers."""
    bench = subparsers.add_parser("bench", help="benchmarks")
    kinds = bench.add_subparsers(dest="bench_kind", required=True)
    p = kinds.add_parser("throughput", help="offline throughput vs a static-batching HF baseline")
    _add_model_args(p)
    p.add_argument("--workload", default=None, help="workload JSON (default: regenerate it from its seed)")
    p.add_argument("--num-requests", type=int, default=None, help="serve only this prefix of the workload")
    p.add_argument("--baseline", choices=["hf", "none"], default="hf")
    p.add_argument("--baseline-requests", type=int, default=48,
                   help="prefix the baseline runs on; the engine is timed on it too for the ratio")
    p.add_argument("--baseline-batch-size", type=int, default=16)
    p.add_argument("--baseline-dtype", default=None,
                   help="dtype of the transformers baseline (default: --dtype; float32 is transformers' default for GGUF)")
    p.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    p.add_argument("--max-batch-size", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--kv-cache-memory", default="0.5", help="fraction of free memory, or a size")
    p.add_argument("--batch-invariant", action="store_true", help="time the engine in batch-invariant mode")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--distributed-executor-backend", choices=["uni", "mp"], default=None,
                   help="mp: worker processes even for one rank (the worker path's own cost)")
    p.set_defaults(func=_cmd_throughput)
    p = kinds.add_parser("step", help="engine step time vs a bare forward of the same batch (overhead %%)")
    _add_model_args(p)
    p.add_argument("--batch-sizes", default="16,64,256", help="comma-separated decode batch sizes")
    p.add_argument("--steps", type=int, default=10, help="timed steps per batch size")
    p.add_argument("--kv-cache-memory", default="0.5")
    p.add_argument("--json", default=None)
    p.set_defaults(func=_cmd_step)
    from orca.engine.bench_attention import add_bench_attention_args
    from orca.engine.server.bench_serve import add_bench_serve_args

    add_bench_serve_args(kinds)
    add_bench_attention_args(kinds)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    """What both benchmarks need to build the engine; the dtype `orca serve` picks by default (bfloat16 on a GPU
    or a CPU with native bf16, float32 on one without, where bf16 GEMMs run several times slower)."""
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto", help=LOAD_FORMAT_HELP)
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (the baseline runs on the engine's)")


def _cmd_throughput(args: argparse.Namespace) -> int:
    """CLI entry point: the exit status, with the numbers already printed."""
    run_throughput(args)
    return 0


def _cmd_step(args: argparse.Namespace) -> int:
    run_step_bench(args)
    return 0


def run_step_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Engine overhead: a full `LLMEngine.step()` against the model alone on the same flattened batch.

    For each batch size, requests from the workload are prefilled until all of them decode; then each
    timed step is followed by a bare replay of that step's prepared inputs (forward + LM head), so the
    two see the same batch and the difference is scheduling, input preparation, sampling and output.
    """
    import statistics

    import torch

    from orca.engine import EngineConfig, LLMEngine, SamplingParams

    engine = LLMEngine(EngineConfig(model=args.model, load_format=args.load_format, dtype=args.dtype,
                                    device=args.device, kv_cache_memory=args.kv_cache_memory,
                                    enable_prefix_caching=False))
    runner, captured = engine.runner, {}
    prepare = runner.prepare

    def capture(batch: Any) -> Any:
        captured["inputs"] = prepare(batch)
        return captured["inputs"]

    runner.prepare = capture
    reqs = fit_to_vocabulary(load_workload(None), engine.model_config.vocab_size)
    rows = []
    print(f"{'batch':>6} {'step ms':>9} {'forward ms':>10} {'overhead %':>10}")
    for size in [int(b) for b in args.batch_sizes.split(",")]:
        params = SamplingParams(max_tokens=args.steps + 8, ignore_eos=True, temperature=0.0)
        for i in range(size):
            engine.add_request(f"step-{size}-{i}", reqs[i % len(reqs)].prompt_token_ids, params)
        while any(s.num_output_tokens == 0 for s in engine.requests.values()):  # prefill everything first
            engine.step()
        engine.step()  # one warm decode step at this size
        step_s, fwd_s = [], []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            engine.step()
            t1 = time.perf_counter()
            inputs = captured["inputs"]
            with torch.inference_mode():
                runner.model.compute_logits(runner.execute(inputs)[inputs.logit_rows.to(runner.device)])
            if runner.device.type == "cuda":  # the step syncs when its tokens come back; the bare replay must too
                torch.cuda.synchronize()
            fwd_s.append(time.perf_counter() - t1)
            step_s.append(t1 - t0)
        for rid in list(engine.requests):
            engine.abort_request(rid)
        step, fwd = statistics.median(step_s), statistics.median(fwd_s)
        row = {"batch_size": size, "step_ms": step * 1e3, "forward_ms": fwd * 1e3, "overhead_pct": (step - fwd) / fwd * 100}
        rows.append(row)
        print(f"{size:>6} {row['step_ms']:>9.2f} {row['forward_ms']:>10.2f} {row['overhead_pct']:>10.1f}")
    result = {**_model_fields(args, str(engine.device), str(engine.dtype).removeprefix("torch.")), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def run_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Time the engine on the workload (and its baseline prefix), the baseline, print and return it all."""
    llm = _build_llm(args)
    # The engine's resolved device and dtype, for the baseline and the report ("auto" means nothing to either).
    device, dtype = str(llm.engine.device), str(llm.engine.dtype).removeprefix("torch.")
    reqs = fit_to_vocabulary(load_workload(args.workload)[: args.num_requests], llm.engine.model_config.vocab_size)
    prefix = reqs[: args.baseline_requests]
    runs = [time_engine(llm, reqs, f"engine ({len(reqs)} requests)")]
    if args.baseline == "hf":
        runs.append(time_engine(llm, prefix, f"engine (first {len(prefix)})"))
        llm.engine.shutdown()  # the baseline should not compete with the engine's workers or KV cache
        del llm
        runs.append(run_hf_baseline(prefix, args.model, args.baseline_dtype or dtype, args.baseline_batch_size,
                                    args.load_format, device))
    result = _summarize(args, runs, device, dtype)
    print_report(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _build_llm(args: argparse.Namespace) -> Any:
    """Build the engine and warm it up, so one-time costs (allocation, first kernels) are not timed."""
    from orca.engine import LLM

    llm = LLM(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_num_batched_tokens=args.max_num_batched_tokens,
        kv_cache_memory=args.kv_cache_memory,
        # The prompts are random and share no prefixes; caching would only let the second timed
        # run (the baseline prefix) reuse the first run's KV and inflate the ratio.
        enable_prefix_caching=False,
        batch_invariant=args.batch_invariant,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
    )
    _engine_generate(llm, [BenchRequest(WARMUP_PROMPT, WARMUP_MAX_TOKENS)] * 2)
    return llm


def fit_to_vocabulary(reqs: list[BenchRequest], vocab_size: int) -> list[BenchRequest]:
    """Fold the workload's token ids into a smaller vocabulary (a tiny dummy config), keeping every length.

    The workload's ids span SmolLM2's 49152; a model with at least that many gets the requests unchanged.
    """
    if all(t < vocab_size for r in reqs for t in r.prompt_token_ids):
        return reqs
    return [BenchRequest([t % vocab_size for t in r.prompt_token_ids], r.max_tokens) for r in reqs]


def time_engine(llm: Any, reqs: list[BenchRequest], name: str) -> RunResult:
    """Serve all requests in one `generate` call and check every one produced exactly max_tokens."""
    start = time.perf_counter()
    outs = _engine_generate(llm, reqs)
    seconds = time.perf_counter() - start
    for i, (req, out) in enumerate(zip(reqs, outs, strict=True)):
        if len(out.token_ids) != req.max_tokens:
            raise RuntimeError(f"{name}: request {i} generated {len(out.token_ids)} tokens, expected {req.max_tokens}")
    return _result(name, reqs, seconds)


def _engine_generate(llm: Any, reqs: list[BenchRequest]) -> list[Any]:
    """Greedy, EOS ignored: every request must produce exactly max_tokens so runs are comparable."""
    from orca.engine import SamplingParams

    params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True, temperature=0.0) for r in reqs]
    return llm.generate(prompt_token_ids=[r.prompt_token_ids for r in reqs], sampling_params=params, use_tqdm=False)


def run_hf_baseline(
    reqs: list[BenchRequest], model: str | None, dtype: str, batch_size: int = 16, load_format: str = "auto",
    device: str = "cpu",
) -> RunResult:
    """Static request-level batching with transformers: each FCFS batch runs to its longest request.

    Only each request's own max_tokens count as useful output; the extra steps a short request
    spends waiting for its batch are exactly the waste iteration-level scheduling removes.
    """
    from orca.engine.hf_reference import load_hf_model

    hf = load_hf_model(model, dtype, load_format, device)
    pad_id = _pad_token_id(hf)
    _hf_generate(hf, [BenchRequest(WARMUP_PROMPT, WARMUP_MAX_TOKENS)] * 2, pad_id)
    start = time.perf_counter()
    for i in range(0, len(reqs), batch_size):
        _hf_generate(hf, reqs[i : i + batch_size], pad_id)
    seconds = time.perf_counter() - start
    return _result(f"HF static {dtype} (first {len(reqs)})", reqs, seconds)


def _pad_token_id(hf: Any) -> int:
    """Pad with EOS (or 0): padded positions are masked out, so the id only has to be valid."""
    eos = hf.generation_config.eos_token_id
    if isinstance(eos, list):
        eos = eos[0] if eos else None
    return eos if eos is not None else 0


def _hf_generate(hf: Any, batch: list[BenchRequest], pad_id: int) -> None:
    """Generate one left-padded batch greedily for exactly as many steps as its longest request."""
    import torch

    input_ids, attention_mask = (t.to(hf.device) for t in _left_pad([r.prompt_token_ids for r in batch], pad_id))
    steps = max(r.max_tokens for r in batch)
    with torch.inference_mode():
        out = hf.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            pad_token_id=pad_id,
        )
    if out.shape[1] - input_ids.shape[1] != steps:
        raise RuntimeError(f"baseline generated {out.shape[1] - input_ids.shape[1]} steps, expected {steps}")


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[Any, Any]:
    """Left-pad so every prompt ends at the last column, where decoding continues."""
    import torch

    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def _result(name: str, reqs: list[BenchRequest], seconds: float) -> RunResult:
    return RunResult(
        name=name,
        requests=len(reqs),
        prompt_tokens=sum(len(r.prompt_token_ids) for r in reqs),
        generated_tokens=sum(r.max_tokens for r in reqs),
        seconds=seconds,
    )


def _summarize(args: argparse.Namespace, runs: list[RunResult], device: str, dtype: str) -> dict[str, Any]:
    """Collect every number (runs and the same-run ratio) into one JSON-serializable dict.

    Only ratios against a baseline timed in this run are printed: absolute speeds drift between days
    and machines, so a ratio against a figure from elsewhere says nothing. `orca bench serve --url`
    compares against a peer server.
    """
    result: dict[str, Any] = {**_model_fields(args, device, dtype), "runs": [r.as_dict() for r in runs]}
    if len(runs) == 3:
        result["ratio_engine_over_baseline"] = runs[1].total_tok_s / runs[2].total_tok_s
    return result


def _model_fields(args: argparse.Namespace, device: str, dtype: str) -> dict[str, Any]:
    """What ran (the resolved dtype, not "auto"), for the JSON; a dummy model is named by its config, since no weight file exists."""
    if args.load_format == "dummy":
        from orca.engine.loaders.dummy import config_file

        model = config_file(args.model)
    else:
        model = args.model or bundled_model_path()
    return {"model": model, "load_format": args.load_format, "dtype": dtype, "device": device}


def print_report(result: dict[str, Any]) -> None:
    """Print the runs as a table, then the ratios."""
    if "dtype" in result:
        print(f"engine on {result['device']} in {result['dtype']}")
    header = f"{'run':<30} {'requests':>8} {'prompt tok':>10} {'gen tok':>8} {'seconds':>8} {'gen tok/s':>10} {'total tok/s':>11}"
    print(header)
    print("-" * len(header))
    for r in result["runs"]:
        print(
            f"{r['name']:<30} {r['requests']:>8} {r['prompt_tokens']:>10,} {r['generated_tokens']:>8,} "
            f"{r['seconds']:>8.2f} {r['generated_tok_s']:>10.1f} {r['total_tok_s']:>11.1f}"
        )
    if "ratio_engine_over_baseline" in result:
        n = result["runs"][2]["requests"]
        print(f"ratio (engine/baseline, same {n} requests): {result['ratio_engine_over_baseline']:.2f}x total tokens/s")
