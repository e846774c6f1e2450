"""Iteration-level scheduling (Orca, Algorithm 1) with chunked prefill, priorities and two admission policies."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from .block_manager import BlockManager
from .output_processor import TokenUpdate
from .sequence import Sequence, SequenceStatus

SampledTokens = dict[int, tuple[int, dict[int, float] | None]]  # batch index -> (token, logprobs)


@dataclass
class SchedulerConfig:
    max_batch_size: int = 256
    max_num_batched_tokens: int = 4096
    # Tokens an iteration may hold while requests are decoding (Sarathi-Serve's stall-free batching):
    # decodes first, prompt chunks get the rest, so a burst of prompts cannot stretch every running
    # request's next token. None: max_num_batched_tokens, decoding or not.
    decode_token_budget: int | None = None
    max_model_len: int = 2048
    preemption: str = "reserve"  # "reserve" (Orca) or "recompute"
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.preemption not in ("reserve", "recompute"):
            raise ValueError(f"preemption={self.preemption!r} must be 'reserve' or 'recompute'")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")
        if self.decode_token_budget is not None and self.decode_token_budget < 1:
            raise ValueError(f"decode_token_budget={self.decode_token_budget} must be >= 1")


@dataclass
class ScheduledBatch:
    """What one iteration runs: `num_new_tokens[i]` tokens of `seqs[i]`, starting at its num_computed_tokens."""

    seqs: list[Sequence]
    num_new_tokens: list[int]

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


def _order(seq: Sequence) -> tuple:
    """Higher priority first, then first come first served."""
    return (-seq.priority, seq.arrival_time, seq.seq_id)


class Scheduler:
    """Decides each iteration's batch; `update_from_output` applies what the iteration produced.

    With pipeline parallelism several batches are in flight at once (Orca's Algorithm 1): a request
    in flight is in no other batch until its output is back, so every batch is made only of requests
    whose previous token is known, and there is no micro-batching.
    """

    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: list[Sequence] = []  # kept sorted by _order
        self.running: list[Sequence] = []
        self.in_flight: set[Sequence] = set()  # scheduled, output not back yet
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def has_work(self) -> bool:
        """Requests to schedule, or batches whose outputs must still be taken in."""
        return bool(self.waiting or self.running or self.in_flight)

    def _target_tokens(self, seq: Sequence) -> int:
        """Tokens whose KV must have a slot before `seq` is admitted: all it may ever hold under reservation."""
        if self.config.preemption == "recompute":
            return len(seq)
        remaining = seq.params.max_tokens - seq.num_output_tokens if seq.params.max_tokens else self.config.max_model_len
        return min(len(seq) + remaining, self.config.max_model_len)

    def schedule(self, num_free_batches: int = 1) -> ScheduledBatch:
        """The next batch. With `num_free_batches` > 1 pipeline slots open, it takes only its share of
        the requests that could run, so the next batch has requests of its own and every stage stays busy."""
        seqs: list[Sequence] = []
        counts: list[int] = []
        self.running.sort(key=_order)
        idle = sum(seq not in self.in_flight for seq in self.running) + len(self.waiting)
        share = -(-idle // num_free_batches)
        ready = [seq for seq in self.running if seq not in self.in_flight]
        decoding = [seq for seq in ready if not seq.in_prefill]
        budget = self.config.max_num_batched_tokens
        if decoding and self.config.decode_token_budget is not None:  # every decode still fits
            budget = min(budget, max(self.config.decode_token_budget, min(len(decoding), share)))
        for seq in decoding + [seq for seq in ready if seq.in_prefill]:  # decodes first
            if budget == 0 or len(seqs) >= share:
                break
            if seq.status is not SequenceStatus.RUNNING or seq in self.in_flight:  # a victim below, or busy
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if self.config.preemption == "recompute" and not self._grow(seq, seq.num_computed_tokens + n, seqs):
                continue
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size and len(seqs) < share:
            seq = self.waiting[0]
            target = self._target_tokens(seq)
            if not self.bm.can_allocate(seq, target):
                break  # strict FCFS: nobody overtakes the head of the queue
            self.waiting.pop(0)
            self.bm.allocate(seq, target)
            seq.status = SequenceStatus.RUNNING
            seq.first_scheduled_time = seq.first_scheduled_time or time.monotonic()
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        self.in_flight.update(seqs)
        return ScheduledBatch(seqs, counts)

    def update_from_output(self, batch: ScheduledBatch, sampled: SampledTokens) -> list[TokenUpdate]:
        """Advance every request of `batch` by its computed tokens and append the tokens it sampled,
        finishing those that hit EOS, a stop token, max_tokens or the context length."""
        now = time.monotonic()
        updates = []
        eos = self.config.eos_token_ids
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            self.in_flight.discard(seq)
            if seq.is_finished:  # aborted while its batch was in flight
                continue
            seq.num_computed_tokens += n
            self.bm.commit(seq)
            if i not in sampled:
                continue
            token, logprobs = sampled[i]
            seq.token_ids.append(token)
            seq.first_token_time = seq.first_token_time or now
            p, reason = seq.params, None
            if (token in eos and not p.ignore_eos) or token in p.stop_token_ids:
                reason = "stop"
            elif seq.num_output_tokens >= p.max_tokens or len(seq) >= self.config.max_model_len:
                reason = "length"
            if reason is not None:
                self.finish(seq, reason)
            updates.append(TokenUpdate(seq.request_id, token, reason, logprobs, seq.num_cached_tokens))
        self.remove_finished()
        return updates

    def _grow(self, seq: Sequence, num_tokens: int, scheduled: list[Sequence]) -> bool:
        """Make room for `seq` by preempting the newest running requests outside this batch (decodes are
        scheduled first, so a newer one may already be in it); False if `seq` itself was preempted."""
        while not self.bm.can_allocate(seq, num_tokens):
            victim = max((s for s in self.running if s.status is SequenceStatus.RUNNING and s not in self.in_flight
                          and s not in scheduled), key=_order)
            self.preempt(victim)
            if victim is seq:
                return False
        self.bm.allocate(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Drop the KV of `seq` and queue it again; its prompt plus outputs are recomputed later."""
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.running.remove(seq)
        self.add(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.bm.free_seq(seq)

    def remove_finished(self) -> None:
        self.running = [s for s in self.running if not s.is_finished]

    def abort(self, seq: Sequence, reason: str = "abort") -> None:
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq, reason)
        self.remove_finished()
