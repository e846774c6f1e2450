"""Iteration-level scheduling (Orca, Algorithm 1) with chunked prefill, priorities and two admission policies."""
from __future__ import annotations

import bisect
import time
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_batch_size: int = 256
    max_num_batched_tokens: int = 4096
    max_model_len: int = 2048
    preemption: str = "reserve"  # "reserve" (Orca) or "recompute"

    def __post_init__(self) -> None:
        if self.preemption not in ("reserve", "recompute"):
            raise ValueError(f"preemption={self.preemption!r} must be 'reserve' or 'recompute'")
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size={self.max_batch_size} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")


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
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self.waiting: list[Sequence] = []  # kept sorted by _order
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=_order)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _target_tokens(self, seq: Sequence) -> int:
        """Tokens whose KV must have a slot before `seq` is admitted: all it may ever hold under reservation."""
        if self.config.preemption == "recompute":
            return len(seq)
        remaining = seq.params.max_tokens - seq.num_output_tokens if seq.params.max_tokens else self.config.max_model_len
        return min(len(seq) + remaining, self.config.max_model_len)

    def schedule(self) -> ScheduledBatch:
        budget = self.config.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        self.running.sort(key=_order)
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted below as a victim
                continue
            n = min(len(seq) - seq.num_computed_tokens, budget)
            if self.config.preemption == "recompute" and not self._grow(seq, seq.num_computed_tokens + n):
                continue
            seqs.append(seq)
            counts.append(n)
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.config.max_batch_size:
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
        return ScheduledBatch(seqs, counts)

    def _grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for `seq` by preempting the newest running requests; False if `seq` itself was preempted."""
        while not self.bm.can_allocate(seq, num_tokens):
            victim = max((s for s in self.running if s.status is SequenceStatus.RUNNING), key=_order)
            self.preempt(victim)
            if victim is seq:
                return False
        self.bm.allocate(seq, num_tokens)
        return True

    def preempt(self, seq: Sequence) -> None:
        """Drop the KV of `seq` and queue it again; its prompt plus outputs are recomputed later."""
        self.bm.free_seq(seq)
        seq.num_computed_tokens = 0
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
