"""The engine loop: admit requests, run one iteration, sample, retire finished requests — repeat."""
from __future__ import annotations

import dataclasses
from collections import deque
from concurrent.futures import Future
from typing import TYPE_CHECKING

from .block_manager import BlockManager
from .bundled_model import BUNDLED_MODEL_NAME
from .config import EngineConfig, ModelConfig
from .distributed.contract import WorkerEnvironment
from .executor import make_executor
from .loaders import load_model
from .output_processor import OutputProcessor, RequestOutput, TokenUpdate
from .scheduler import SampledTokens, ScheduledBatch, Scheduler, SchedulerConfig
from .sequence import SamplingParams, Sequence

if TYPE_CHECKING:
    from .model_runner import ModelRunner


class LLMEngine:
    def __init__(self, config: EngineConfig, environment: WorkerEnvironment | None = None) -> None:
        """`environment`: this pod's distributed contract when other pipeline stages run in other pods."""
        self.config = config
        loaded = load_model(config.model, config.load_format)
        self.model_config: ModelConfig = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = config.model or BUNDLED_MODEL_NAME
        self.executor = make_executor(config, loaded, environment)
        self.max_model_len = self.executor.max_model_len
        self.device, self.dtype = self.executor.device, self.executor.dtype
        self.block_manager = BlockManager(self.executor.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(SchedulerConfig(config.max_batch_size, config.max_num_batched_tokens,
                                                   config.decode_token_budget, self.max_model_len, config.preemption,
                                                   tuple(self.model_config.eos_token_ids)), self.block_manager)
        self.requests: dict[str, Sequence] = {}
        self.processor = OutputProcessor(self.tokenizer)  # text for step(); AsyncLLMEngine keeps its own
        self.in_flight: deque[tuple[ScheduledBatch, Future[SampledTokens]]] = deque()
        self.last_iteration_tokens = 0

    @property
    def runner(self) -> ModelRunner:
        """The in-process model runner, for tests and benchmarks that reach into it (one rank only)."""
        return self.executor.runner

    def shutdown(self) -> None:
        """Stop the workers (a no-op in process)."""
        self.executor.shutdown()

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

    def add_sequence(self, seq: Sequence, make_text: bool = True) -> None:
        """Queue a validated request. make_text=False: the caller detokenizes `step_tokens()` itself."""
        if seq.request_id in self.requests:
            raise ValueError(f"request_id: {seq.request_id!r} is already running")
        self.requests[seq.request_id] = seq
        if make_text:
            self.processor.add(seq)
        self.scheduler.add(seq)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        self.add_sequence(self.make_sequence(request_id, prompt, params, priority))

    def abort_request(self, request_id: str, reason: str = "abort") -> None:
        """Stop a request wherever it is (waiting, running or preempted) and free its KV blocks."""
        seq = self.requests.pop(request_id, None)
        if seq is not None and not seq.is_finished:
            self.scheduler.abort(seq, reason)
        self.processor.remove(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # ---- the iteration --------------------------------------------------------------------------
    def step_tokens(self) -> list[TokenUpdate]:
        """Fill the pipeline with batches, then take in the oldest one's output: the token of every
        request that sampled one, finishing those that hit EOS, a stop token, max_tokens or the
        context length. In one process this is one schedule, one forward pass and one update."""
        while len(self.in_flight) < self.executor.max_concurrent_batches:
            batch = self.scheduler.schedule(self.executor.max_concurrent_batches - len(self.in_flight))
            if not batch:
                break
            self.last_iteration_tokens = batch.num_tokens
            self.in_flight.append((batch, self.executor.execute_model(batch)))
        if not self.in_flight:
            return []
        batch, output = self.in_flight.popleft()
        return self.scheduler.update_from_output(batch, output.result())

    def step(self) -> list[RequestOutput]:
        """Run one iteration; return an output for every request that got a token or finished."""
        outputs = []
        for update in self.step_tokens():
            out = self.processor.process(update)
            if out is None:
                continue
            if out.finished and update.finish_reason is None:  # a stop string: the text ended it
                self.abort_request(out.request_id, out.finish_reason)
            outputs.append(out)
        return outputs

    def release(self, request_id: str) -> None:
        """Forget a finished request's bookkeeping once its output was delivered."""
        self.requests.pop(request_id, None)
        self.processor.remove(request_id)
