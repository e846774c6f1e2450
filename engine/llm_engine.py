"""The engine loop: admit requests, run one iteration, sample, retire finished requests — repeat."""
from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass, field

import torch

from .block_manager import BlockManager
from .config import ModelConfig
from .layers.attention import select_backend
from .loaders import load_model
from .model_runner import ModelRunner
from .models.llama import LlamaForCausalLM
from .scheduler import Scheduler, SchedulerConfig
from .sequence import SamplingParams, Sequence
from .tokenizer import IncrementalDetokenizer


@dataclass
class EngineConfig:
    model: str | None = None  # None: the bundled SmolLM2-135M-Instruct GGUF
    dtype: str = "auto"  # auto: bfloat16 where the device has fast bf16, else float32
    device: str = "auto"
    max_batch_size: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int | None = None
    kv_cache_memory: str | float = "4GiB"  # bytes ("4GiB", 1000000) or a fraction of free memory (0.3)
    block_size: int = 16
    enable_prefix_caching: bool = True
    preemption: str = "reserve"
    seed: int = 0


@dataclass
class RequestOutput:
    """State of one request after a step: the full output so far plus what is new since the last step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None
    logprobs: list[dict[int, float]] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM's shape (`out.outputs[0].text`) for code written against it."""
        return [self]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype) or dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype={name!r} must be one of auto, float32, bfloat16, float16")
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        flags = ""
    return torch.bfloat16 if re.search(r"\b(avx512_bf16|amx_bf16)\b", flags) else torch.float32


def parse_memory(value: str | float, free_bytes: int) -> int:
    """`0.3` is 30% of free memory; `2GiB`, `512MB` or `1000000` are absolute sizes in bytes."""
    text = str(value).strip()
    m = re.fullmatch(r"([0-9.]+)\s*([KMGT]i?B?)?", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"kv_cache_memory={value!r} must be bytes (e.g. 2GiB) or a fraction of free memory (e.g. 0.3)")
    number, unit = float(m.group(1)), (m.group(2) or "").upper().rstrip("B")
    if not unit and number <= 1:
        return int(number * free_bytes)
    scale = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(number * scale)


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        device = config.device if config.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        torch.manual_seed(config.seed)
        loaded = load_model(config.model)
        self.model_config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = config.model or "SmolLM2-135M-Instruct"
        self.max_model_len = min(config.max_model_len or loaded.config.max_position, loaded.config.max_position)
        with torch.device(self.device):
            model = LlamaForCausalLM(loaded.config, select_backend(self.device)).to(self.dtype)
        model.load_weights(loaded.weights())
        model.eval()
        per_block = ModelRunner.kv_bytes_per_block(loaded.config, config.block_size, self.dtype)
        num_blocks = parse_memory(config.kv_cache_memory, free_memory(self.device)) // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={config.kv_cache_memory!r} is smaller than one KV block ({per_block} bytes)")
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_size, config.max_num_batched_tokens,
                                                   self.max_model_len, config.preemption), self.block_manager)
        self.runner = ModelRunner(model, loaded.config, num_blocks, config.block_size, self.dtype, self.device)
        self.requests: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.texts: dict[str, str] = {}
        self.last_iteration_tokens = 0

    # ---- requests -------------------------------------------------------------------------------
    def make_sequence(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                      priority: int = 0) -> Sequence:
        """Validate a request and build its sequence without touching engine state (safe from any thread)."""
        params = params or SamplingParams()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise ValueError("prompt: must not be empty")
        vocab = self.model_config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt: token id {bad!r} is outside the vocabulary [0, {vocab})")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room in the context length of {self.max_model_len}")
        if params.max_tokens is None:  # copy: one params object may serve many prompts
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(ids))
        if len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds the context length of {self.max_model_len}")
        needed = self.block_manager.blocks_for(len(ids) + params.max_tokens)
        if needed > self.block_manager.num_blocks:
            raise ValueError(f"max_tokens: prompt + max_tokens needs {needed} KV blocks but the pool has only "
                             f"{self.block_manager.num_blocks} ({self.block_manager.num_blocks * self.config.block_size} tokens)")
        seq = Sequence(request_id, ids, params, priority=priority)
        seq.prompt = text
        return seq

    def add_sequence(self, seq: Sequence) -> None:
        if seq.request_id in self.requests:
            raise ValueError(f"request_id: {seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        self.detokenizers[seq.request_id] = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens)
        self.texts[seq.request_id] = ""
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params, priority))

    def abort_request(self, request_id: str) -> None:
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.abort(seq)
        self.detokenizers.pop(request_id, None)
        self.texts.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the iteration --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that got a token or finished."""
        batch = self.scheduler.schedule()
        if not batch:
            return []
        self.last_iteration_tokens = batch.num_tokens
        sampled = self.runner.run(batch)
        now = time.monotonic()
        outputs = []
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            seq.num_computed_tokens += n
            self.block_manager.commit(seq)
            if i not in sampled:
                continue
            token, logprobs = sampled[i]
            seq.token_ids.append(token)
            if logprobs is not None:
                seq.logprobs.append(logprobs)
            seq.first_token_time = seq.first_token_time or now
            outputs.append(self._process(seq, token))
        self.scheduler.remove_finished()
        return outputs

    def _process(self, seq: Sequence, token: int) -> RequestOutput:
        """Detokenize the new token and apply every stop condition to `seq`."""
        p, rid = seq.params, seq.request_id
        reason = None
        if (token in self.model_config.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.max_model_len:
            reason = "length"
        detok = self.detokenizers[rid]
        text = self.texts[rid] + detok.step([token])
        if reason is not None:
            text += detok.flush()
        if p.stop:
            # Only the tail can hold a new match: the new text plus one stop string's length before it.
            tail = max(0, len(self.texts[rid]) - max(map(len, p.stop)))
            hits = [(text.find(s, tail), s) for s in p.stop if text.find(s, tail) >= 0]
            if hits:
                at, s = min(hits)
                text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                reason = "stop"
        old_len = len(self._visible(self.texts[rid], p, False))
        self.texts[rid] = text
        if reason is not None:
            self.scheduler.finish(seq, reason)
        visible = self._visible(text, p, reason is not None)
        return RequestOutput(
            request_id=rid, prompt=seq.prompt, prompt_token_ids=seq.prompt_token_ids,
            token_ids=seq.output_token_ids, text=visible, new_token_ids=[token], new_text=visible[old_len:],
            finished=reason is not None, finish_reason=reason, logprobs=seq.logprobs,
            num_cached_tokens=seq.num_cached_tokens)

    @staticmethod
    def _visible(text: str, p: SamplingParams, finished: bool) -> str:
        """Hold back a possible partial stop string while streaming, so no client ever sees one."""
        if finished or not p.stop:
            return text
        hold = max(map(len, p.stop)) - 1
        return text[:len(text) - hold] if hold else text

    def release(self, request_id: str) -> None:
        """Forget a finished request's bookkeeping once its output was delivered."""
        self.requests.pop(request_id, None)
        self.detokenizers.pop(request_id, None)
        self.texts.pop(request_id, None)
