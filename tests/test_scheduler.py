"""Scheduler and block manager on their own: admission, ordering, chunking, preemption, prefix cache."""
from __future__ import annotations

import random

import pytest

from orca.engine.block_manager import BlockManager
from orca.engine.scheduler import Scheduler, SchedulerConfig
from orca.engine.sequence import SamplingParams, Sequence, SequenceStatus

BS = 4


def make(prompt_len: int, max_tokens: int, priority: int = 0, rid: str = "r", first: int = 0) -> Sequence:
    return Sequence(rid, list(range(first, first + prompt_len)), SamplingParams(max_tokens=max_tokens), priority=priority)


def step(s: Scheduler) -> list[tuple[Sequence, int]]:
    """Stand-in for the model: every request that completes its tokens samples token 7."""
    batch = s.schedule()
    sampled = {i: (7, None) for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
               if seq.num_computed_tokens + n == len(seq)}
    s.update_from_output(batch, sampled)
    return list(zip(batch.seqs, batch.num_new_tokens))


def run_all(s: Scheduler, limit: int = 10_000) -> list[list[tuple[Sequence, int]]]:
    history = []
    for _ in range(limit):
        if not s.has_work():
            return history
        history.append(step(s))
    raise AssertionError("scheduler did not drain")


def test_reservation_never_overcommits_and_never_stalls() -> None:
    rng = random.Random(0)
    bm = BlockManager(num_blocks=40, block_size=BS)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=64, max_model_len=1000), bm)
    seqs = [make(rng.randint(1, 40), rng.randint(1, 30), rid=str(i), first=100 * i) for i in range(30)]
    for seq in seqs:
        s.add(seq)
    for _ in range(10_000):
        if not s.has_work():
            break
        scheduled = dict((id(q), n) for q, n in step(s))
        held = sum(len(q.block_table) for q in s.running)
        assert held + bm.num_free_blocks == bm.num_blocks  # no block double-counted or lost
        for q in s.running:
            assert len(q.block_table) * BS >= q.num_prompt_tokens + q.params.max_tokens  # fully reserved
            if not q.in_prefill:
                assert id(q) in scheduled or q.num_output_tokens == 0  # an admitted decoder never stalls
    assert all(q.is_finished and q.num_output_tokens == q.params.max_tokens for q in seqs)
    assert bm.num_free_blocks == bm.num_blocks and s.num_preemptions == 0


def test_fcfs_and_priority_order() -> None:
    bm = BlockManager(num_blocks=100, block_size=BS)
    s = Scheduler(SchedulerConfig(max_batch_size=1, max_num_batched_tokens=100, max_model_len=1000), bm)
    order = [("a", 0), ("b", 0), ("c", 5), ("d", 0), ("e", 5), ("f", -1)]
    for i, (rid, prio) in enumerate(order):
        seq = make(3, 2, priority=prio, rid=rid, first=10 * i)
        seq.arrival_time = float(i)
        s.add(seq)
    admitted = []
    for batch in run_all(s):
        for seq, _ in batch:
            if seq.request_id not in admitted:
                admitted.append(seq.request_id)
    assert admitted == ["c", "e", "a", "b", "d", "f"]


def test_head_of_line_is_not_overtaken_when_pool_is_full() -> None:
    bm = BlockManager(num_blocks=10, block_size=BS)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=100, max_model_len=1000), bm)
    big, small = make(20, 16, rid="big"), make(2, 2, rid="small", first=500)
    first = make(8, 8, rid="first", first=900)
    for i, q in enumerate((first, big, small)):
        q.arrival_time = float(i)
        s.add(q)
    step(s)
    assert first.status is SequenceStatus.RUNNING
    assert big.status is SequenceStatus.WAITING and small.status is SequenceStatus.WAITING  # FCFS: no overtaking
    run_all(s)
    assert big.is_finished and small.is_finished


def test_chunked_prefill_keeps_decoders_going() -> None:
    bm = BlockManager(num_blocks=200, block_size=BS)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=16, max_model_len=1000), bm)
    short = make(4, 20, rid="short")
    s.add(short)
    step(s)  # short's prompt done; it now decodes
    long = make(100, 4, rid="long", first=1000)
    s.add(long)
    for _ in range(6):
        batch = dict((q.request_id, n) for q, n in step(s))
        assert batch["short"] == 1  # one decode token every iteration
        assert sum(batch.values()) <= 16
        assert 0 < batch["long"] <= 15  # the long prompt advances in chunks
    assert long.in_prefill


def test_recompute_preempts_newest_and_finishes_everyone() -> None:
    bm = BlockManager(num_blocks=12, block_size=BS, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=64, max_model_len=1000,
                                  preemption="recompute"), bm)
    seqs = [make(8, 12, rid=str(i), first=100 * i) for i in range(4)]
    for i, q in enumerate(seqs):
        q.arrival_time = float(i)
        s.add(q)
    preempted: list[str] = []
    orig = s.preempt
    s.preempt = lambda q: (preempted.append(q.request_id), orig(q))[1]
    run_all(s)
    assert preempted and preempted[0] == "3"  # the newest goes first
    assert all(q.is_finished and q.num_output_tokens == 12 for q in seqs)
    assert bm.num_free_blocks == bm.num_blocks


def test_abort_frees_blocks() -> None:
    bm = BlockManager(num_blocks=50, block_size=BS)
    s = Scheduler(SchedulerConfig(max_model_len=1000), bm)
    a, b = make(10, 10, rid="a"), make(10, 10, rid="b", first=50)
    s.add(a)
    s.add(b)
    step(s)
    assert bm.num_free_blocks < bm.num_blocks
    s.abort(a)
    s.abort(b)
    assert bm.num_free_blocks == bm.num_blocks and not s.has_work()
    assert a.finish_reason == "abort"


def test_prefix_cache_shares_full_blocks_and_verifies_tokens() -> None:
    bm = BlockManager(num_blocks=50, block_size=BS)
    s = Scheduler(SchedulerConfig(max_model_len=1000), bm)
    first = make(10, 1, rid="first")
    s.add(first)
    run_all(s)
    again = make(10, 1, rid="again")  # same 10 tokens: blocks 0-1 cached (the last token is always computed)
    s.add(again)
    step(s)
    assert again.num_cached_tokens == 8
    other = Sequence("other", [0, 1, 2, 3, 9, 9, 9, 9, 9, 9], SamplingParams(max_tokens=1))
    s.add(other)
    step(s)
    assert other.num_cached_tokens == 4  # first block shared, second differs
    # A hash collision must not be trusted: corrupt the stored tokens of the first cached block.
    next(b for b in bm.blocks if b.token_ids == (0, 1, 2, 3)).token_ids = (5, 5, 5, 5)
    third = make(10, 1, rid="third")
    s.add(third)
    step(s)
    assert third.num_cached_tokens == 0


def test_sampling_params_validation_names_the_field() -> None:
    for field, value in [("temperature", -1.0), ("top_p", 0.0), ("top_k", -5), ("min_p", 2.0),
                         ("max_tokens", 0), ("logprobs", 99), ("presence_penalty", 3.0)]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})


def test_tiny_temperature_samples_like_greedy() -> None:
    """Dividing logits by 1e-300 would overflow to inf/NaN; such temperatures mean greedy."""
    import torch

    from orca.engine.sampler import Sampler

    logits = torch.tensor([[0.5, 3.0, 1.0, 2.9]] * 3)
    seqs = [Sequence(f"r{i}", [1], SamplingParams(temperature=t, seed=i)) for i, t in enumerate((0.0, 1e-300, 1e-6))]
    tokens, _ = Sampler()(logits, seqs)
    assert tokens == [1, 1, 1]


def test_huge_top_k_means_no_top_k() -> None:
    """Any int is a valid top_k (the API does not bound it); one past int64 must not crash the batch."""
    import torch

    from orca.engine.sampler import Sampler

    logits = torch.tensor([[0.5, 3.0, 1.0, 2.9]] * 2)
    seqs = [Sequence(f"r{i}", [1], SamplingParams(top_k=k, seed=1)) for i, k in enumerate((2**70, -1))]
    tokens, _ = Sampler()(logits, seqs)
    assert tokens[0] == tokens[1]  # same seed, same distribution


def test_decode_token_budget_chunks_prompts_while_requests_decode() -> None:
    """While requests decode, an iteration holds at most decode_token_budget tokens: the decodes, then
    prompt chunks in what is left; with nobody decoding, prompts get the whole max_num_batched_tokens."""
    bm = BlockManager(num_blocks=200, block_size=BS)
    s = Scheduler(SchedulerConfig(max_batch_size=16, max_num_batched_tokens=256, decode_token_budget=24,
                                  max_model_len=1000), bm)
    first = make(100, 8, rid="first", first=0)
    s.add(first)
    assert step(s) == [(first, 100)]  # nobody decodes yet
    second, third = make(40, 8, rid="second", first=1000), make(30, 8, rid="third", first=2000)
    s.add(second)
    s.add(third)
    assert step(s) == [(first, 1), (second, 23)]
    assert step(s) == [(first, 1), (second, 17), (third, 6)]
    assert step(s) == [(first, 1), (second, 1), (third, 22)]
    assert step(s) == [(first, 1), (second, 1), (third, 2)]
    assert step(s) == [(first, 1), (second, 1), (third, 1)]
    s.config.decode_token_budget = 2  # fewer than the decodes: every decode still runs
    s.add(make(10, 8, rid="fourth", first=3000))
    assert [n for _, n in step(s)] == [1, 1, 1]


def test_decode_token_budget_is_validated() -> None:
    with pytest.raises(ValueError, match="decode_token_budget"):
        SchedulerConfig(decode_token_budget=0)


@pytest.mark.parametrize("decode_token_budget", [None, 6])
def test_recompute_batches_hold_only_running_requests_with_blocks(decode_token_budget: int | None) -> None:
    """Under block pressure with chunked prompts, decodes first: every request of a batch is running, once,
    with blocks for its new tokens (a victim of preemption must come from outside the batch being built)."""
    rng = random.Random(3)
    bm = BlockManager(num_blocks=24, block_size=BS, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_batch_size=8, max_num_batched_tokens=12, decode_token_budget=decode_token_budget,
                                  max_model_len=1000, preemption="recompute"), bm)
    seqs = [make(rng.randint(4, 30), rng.randint(4, 20), rid=str(i), first=100 * i) for i in range(16)]
    for i, q in enumerate(seqs):
        q.arrival_time = float(i)
        s.add(q)
    for _ in range(10_000):
        if not s.has_work():
            break
        batch = s.schedule()
        assert len({id(q) for q in batch.seqs}) == len(batch.seqs), "a request twice in one batch"
        assert all(q.status is SequenceStatus.RUNNING for q in batch.seqs), "a preempted request left in the batch"
        for q, n in zip(batch.seqs, batch.num_new_tokens):
            assert len(q.block_table) * BS >= q.num_computed_tokens + n  # its new KV has blocks of its own
        sampled = {i: (7, None) for i, (q, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                   if q.num_computed_tokens + n == len(q)}
        s.update_from_output(batch, sampled)
    assert all(q.is_finished and q.num_output_tokens == q.params.max_tokens for q in seqs)
    assert s.num_preemptions > 0 and bm.num_free_blocks == bm.num_blocks
