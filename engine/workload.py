"""The fixed benchmark workload: 200 synthetic requests shared by every throughput run.

Throughput numbers are only comparable when every system serves exactly the same
requests, so the workload is either read from the shared JSON file or regenerated
bit-for-bit from its seed (the generator below reproduces the file's requests).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

SEED = 20240601
NUM_REQUESTS = 200
PROMPT_LEN_RANGE = (32, 512)  # inclusive
OUTPUT_LEN_RANGE = (16, 256)  # inclusive
TOKEN_ID_RANGE = (17, 49151)  # inclusive; skips the SmolLM2 special tokens


@dataclass
class BenchRequest:
    """One request: the prompt as token ids and how many tokens to generate (EOS ignored)."""

    prompt_token_ids: list[int]
    max_tokens: int


def load_workload(path: str | None = None) -> list[BenchRequest]:
    """Read the workload JSON at `path`, or generate the identical requests when it is None."""
    if path is None:
        return generate_workload()
    with open(path) as f:
        data = json.load(f)
    return [
        BenchRequest(prompt_token_ids=list(r["prompt_token_ids"]), max_tokens=int(r["output_len"]))
        for r in data["requests"]
    ]


def generate_workload() -> list[BenchRequest]:
    """Regenerate the workload from its seed; draw order matters, so it mirrors the file's generator."""
    rng = np.random.default_rng(SEED)
    prompt_lens = rng.integers(PROMPT_LEN_RANGE[0], PROMPT_LEN_RANGE[1] + 1, size=NUM_REQUESTS)
    output_lens = rng.integers(OUTPUT_LEN_RANGE[0], OUTPUT_LEN_RANGE[1] + 1, size=NUM_REQUESTS)
    return [
        BenchRequest(
            prompt_token_ids=rng.integers(TOKEN_ID_RANGE[0], TOKEN_ID_RANGE[1] + 1, size=int(p)).tolist(),
            max_tokens=int(o),
        )
        for p, o in zip(prompt_lens, output_lens)
    ]
