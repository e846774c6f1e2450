"""The pieces of distributed execution that need no process: the environment contract, the control
diffs that rebuild each batch on the workers, and pipelined scheduling."""
from __future__ import annotations

import random

import pytest

from orca.engine.block_manager import BlockManager
from orca.engine.distributed import contract
from orca.engine.distributed.contract import WorkerEnvironment
from orca.engine.distributed.control import ControlEncoder, RequestMirror, output_from_proto, output_to_proto
from orca.engine.scheduler import Scheduler, SchedulerConfig
from orca.engine.sequence import SamplingParams, Sequence


def test_contract_reads_the_stage_from_the_pod_name_and_names_bad_variables() -> None:
    env = WorkerEnvironment.from_environ({contract.TENSOR_PARALLEL_SIZE: "3", contract.PIPELINE_PARALLEL_SIZE: "2",
                                          contract.POD_NAME: "sm-r1-1", contract.MASTER_ADDR: "sm-r1-0.sm-r1.ns.svc",
                                          contract.HOSTS: "sm-r1-0.sm-r1.ns.svc=127.0.0.1"})
    assert (env.stage, env.world_size, env.rank(2), env.is_master) == (1, 6, 5, False)
    assert env.resolve(env.master_addr) == "127.0.0.1"
    assert WorkerEnvironment.from_environ(env.to_environ()) == env
    assert WorkerEnvironment.from_environ({}) == WorkerEnvironment()
    with pytest.raises(ValueError, match="ORCA_TP='x' must be an integer"):
        WorkerEnvironment.from_environ({contract.TENSOR_PARALLEL_SIZE: "x"})
    with pytest.raises(ValueError, match="ORCA_POD_NAME"):
        WorkerEnvironment.from_environ({contract.POD_NAME: "no-ordinal"})
    with pytest.raises(ValueError, match="stage 2 is outside the 2 pipeline stages"):
        WorkerEnvironment.from_environ({contract.PIPELINE_PARALLEL_SIZE: "2", contract.POD_NAME: "sm-r0-2"})
    with pytest.raises(ValueError, match="ORCA_HOSTS"):
        WorkerEnvironment.from_environ({contract.HOSTS: "nothing"})


def test_the_contract_needs_no_torch() -> None:
    import subprocess
    import sys

    code = "import sys; import orca.engine.distributed.contract; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], env={"PYTHONSAFEPATH": "1"}).returncode == 0


def test_diffs_rebuild_every_batch_through_chunking_preemption_and_finishing() -> None:
    """A scheduler under memory pressure (recompute preemption, chunked prompts, prefix hits) and a
    mirror fed only the diffs: each rebuilt batch equals the scheduler's, request by request."""
    rng = random.Random(0)
    shared = list(range(100, 116))  # one full block every prompt shares: prefix-cache hits
    bm = BlockManager(num_blocks=14, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_batch_size=6, max_num_batched_tokens=20, max_model_len=64,
                                          preemption="recompute"), bm)
    for i in range(10):
        prompt = shared + [rng.randrange(200, 300) for _ in range(rng.randrange(1, 14))]
        scheduler.add(Sequence(str(i), prompt, SamplingParams(max_tokens=rng.randrange(2, 9), seed=i)))
    encoder, mirror = ControlEncoder(), RequestMirror()
    new_requests_sent = []
    for _ in range(500):
        if not scheduler.has_work():
            break
        batch = scheduler.schedule()
        step = encoder.encode(batch)
        new_requests_sent += [r.request_id for r in step.new_requests]
        rebuilt = mirror.apply(step)
        assert rebuilt.num_new_tokens == batch.num_new_tokens
        for theirs, ours in zip(rebuilt.seqs, batch.seqs):
            assert (theirs.request_id, theirs.token_ids, theirs.block_table, theirs.num_computed_tokens) == (
                ours.request_id, ours.token_ids, ours.block_table, ours.num_computed_tokens)
            assert theirs.params.seed == ours.params.seed
        mirror.forget(step)
        sampled = {i: (rng.randrange(200, 300), None) for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                   if s.num_computed_tokens + n == len(s)}
        scheduler.update_from_output(batch, sampled)
    assert not scheduler.has_work() and scheduler.num_preemptions > 0
    assert sorted(new_requests_sent, key=int) == [str(i) for i in range(10)]  # each prompt sent once
    encoder.encode(scheduler.schedule())  # the last finished requests are forgotten with the next message
    assert not encoder.sent


def test_sampled_tokens_and_logprobs_round_trip() -> None:
    sampled = {0: (5, None), 2: (9, {9: -0.1234567891, 3: -2.5}), 3: (1, {})}
    message = output_to_proto(7, sampled)
    assert output_from_proto(message, [False, False, True, True]) == sampled


def test_a_request_in_flight_is_in_no_other_batch_and_free_slots_share_the_requests() -> None:
    bm = BlockManager(num_blocks=100, block_size=4)
    scheduler = Scheduler(SchedulerConfig(max_batch_size=16, max_num_batched_tokens=100, max_model_len=64), bm)
    for i in range(8):
        scheduler.add(Sequence(str(i), [1, 2, 3], SamplingParams(max_tokens=5)))
    first = scheduler.schedule(num_free_batches=2)
    second = scheduler.schedule(num_free_batches=1)
    assert len(first.seqs) == len(second.seqs) == 4
    assert not {s.request_id for s in first.seqs} & {s.request_id for s in second.seqs}
    assert not scheduler.schedule(num_free_batches=1)  # everything is in flight
    scheduler.update_from_output(first, {i: (7, None) for i in range(4)})
    third = scheduler.schedule(num_free_batches=1)
    assert [s.request_id for s in third.seqs] == [s.request_id for s in first.seqs]
    assert all(s.num_computed_tokens == 3 and s.token_ids[-1] == 7 for s in third.seqs)
