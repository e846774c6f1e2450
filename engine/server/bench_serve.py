"""`orca bench serve`: replay the standard workload against any OpenAI-compatible server.

Requests arrive as a Poisson process at --rate per second and stream their completions, so the
same numbers (throughput, TTFT, inter-token and end-to-end latency percentiles) can be taken
from Orca, vLLM or any other server, side by side. Prompts are sent as token ids, which vLLM
and Orca accept on /v1/completions; `ignore_eos` fixes each output length.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..workload import BenchRequest, load_workload

if TYPE_CHECKING:
    import httpx


@dataclass
class Sample:
    ok: bool = False
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str = ""


def add_bench_serve_args(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("serve", help="replay the workload against an OpenAI-compatible server")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (without /v1)")
    p.add_argument("--model", default=None, help="model id to send (default: the server's first model)")
    p.add_argument("--rate", type=float, default=2.0, help="requests per second (Poisson); inf sends all at once")
    p.add_argument("--num-requests", type=int, default=200)
    p.add_argument("--workload", default=None, help="workload JSON (default: regenerate it from its seed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    p.add_argument("--api-key", default=None)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout in seconds")
    p.add_argument("--json", default=None, help="also write the results here")
    p.set_defaults(func=lambda args: (print_report(asyncio.run(run(args))), 0)[1])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import httpx  # here, not at the top: `orca --help` should not need the HTTP client

    reqs = load_workload(args.workload)[: args.num_requests]
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=args.url, headers=headers, timeout=args.timeout, limits=limits) as client:
        model = args.model or (await client.get("/v1/models")).json()["data"][0]["id"]
        rng = random.Random(args.seed)
        start = time.perf_counter()
        tasks = []
        for req in reqs:
            tasks.append(asyncio.create_task(_one(client, model, req)))
            if args.rate != float("inf"):
                await asyncio.sleep(rng.expovariate(args.rate))
        samples = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - start
    return summarize(samples, seconds, args)


async def _one(client: httpx.AsyncClient, model: str, req: BenchRequest) -> Sample:
    import httpx

    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    s, start = Sample(), time.perf_counter()
    last = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                s.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode()[:200]}"
                return s
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    s.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    s.output_tokens = chunk["usage"]["completion_tokens"]
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if last is None:
                    s.ttft = now - start
                else:
                    s.itl.append(now - last)
                last = now
        s.e2e, s.ok = time.perf_counter() - start, True
        s.output_tokens = s.output_tokens or req.max_tokens
        s.prompt_tokens = s.prompt_tokens or len(req.prompt_token_ids)
    except httpx.HTTPError as e:
        s.error = repr(e)
    return s


def _pcts(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0, "mean": 0.0}
    v = sorted(values)

    def at(q: float) -> float:
        return v[min(len(v) - 1, int(q * len(v)))]

    return {"p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "mean": sum(v) / len(v)}


def summarize(samples: list[Sample], seconds: float, args: argparse.Namespace) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    gen = sum(s.output_tokens for s in ok)
    total = gen + sum(s.prompt_tokens for s in ok)
    result = {
        "url": args.url, "rate": args.rate, "requests": len(samples), "completed": len(ok),
        "failed": len(samples) - len(ok), "errors": sorted({s.error for s in samples if s.error})[:5],
        "seconds": seconds, "generated_tok_s": gen / seconds, "total_tok_s": total / seconds,
        "ttft_s": _pcts([s.ttft for s in ok]), "itl_s": _pcts([x for s in ok for x in s.itl]),
        "e2e_s": _pcts([s.e2e for s in ok]),
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def print_report(r: dict[str, Any]) -> None:
    print(f"{r['url']}  rate {r['rate']}/s  {r['completed']}/{r['requests']} completed in {r['seconds']:.1f} s")
    print(f"throughput: {r['generated_tok_s']:.1f} generated tok/s, {r['total_tok_s']:.1f} total tok/s")
    print(f"{'':>8} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'mean ms':>9}")
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_s", "E2E")):
        p = r[key]
        print(f"{label:>8} {p['p50'] * 1e3:>9.1f} {p['p90'] * 1e3:>9.1f} {p['p99'] * 1e3:>9.1f} {p['mean'] * 1e3:>9.1f}")
    for e in r["errors"]:
        print(f"error: {e}")
