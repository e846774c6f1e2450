"""Each iteration's batch as a diff, in the spirit of vLLM's cached-request data.

The master's `ControlEncoder` remembers what the workers already hold of every request and sends
only what changed: a request's prompt and sampling parameters once, then per iteration its new
tokens (the ones sampled since it last ran), its new KV blocks and where its computation starts.
Every worker's `RequestMirror` applies the same diffs in the same order, so each rank rebuilds the
exact `ScheduledBatch` the scheduler made and runs it through the same model runner.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..scheduler import SampledTokens, ScheduledBatch
from ..sequence import SamplingParams, Sequence
from . import worker_pb2 as pb


def params_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """The fields the sampler and the runner read; stop conditions stay with the master."""
    return pb.SamplingParams(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                             min_p=params.min_p, seed=params.seed, presence_penalty=params.presence_penalty,
                             frequency_penalty=params.frequency_penalty, repetition_penalty=params.repetition_penalty,
                             logprobs=params.logprobs)


def params_from_proto(message: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=message.temperature, top_p=message.top_p, top_k=message.top_k,
                          min_p=message.min_p, seed=message.seed if message.HasField("seed") else None,
                          presence_penalty=message.presence_penalty, frequency_penalty=message.frequency_penalty,
                          repetition_penalty=message.repetition_penalty,
                          logprobs=message.logprobs if message.HasField("logprobs") else None, max_tokens=None)


@dataclass
class _Sent:
    """What the workers hold of one request."""

    seq: Sequence
    num_tokens: int
    num_blocks: int
    num_preemptions: int


class ControlEncoder:
    def __init__(self) -> None:
        self.sent: dict[str, _Sent] = {}
        self.next_step_id = 0

    def encode(self, batch: ScheduledBatch) -> pb.StepRequest:
        step = pb.StepRequest(step_id=self.next_step_id)
        self.next_step_id += 1
        for seq, num_new_tokens in zip(batch.seqs, batch.num_new_tokens):
            known = self.sent.get(seq.request_id)
            if known is None or known.seq is not seq:
                step.new_requests.append(pb.NewRequest(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                                                       params=params_to_proto(seq.params)))
                known = self.sent[seq.request_id] = _Sent(seq, seq.num_prompt_tokens, 0, seq.num_preemptions)
            reset = known.num_preemptions != seq.num_preemptions
            if reset:
                known.num_blocks, known.num_preemptions = 0, seq.num_preemptions
            step.scheduled.append(pb.ScheduledRequest(
                request_id=seq.request_id, num_new_tokens=num_new_tokens, num_computed_tokens=seq.num_computed_tokens,
                new_token_ids=seq.token_ids[known.num_tokens:], new_block_ids=seq.block_table[known.num_blocks:],
                reset_block_table=reset))
            known.num_tokens, known.num_blocks = len(seq.token_ids), len(seq.block_table)
        finished = [request_id for request_id, known in self.sent.items() if known.seq.is_finished]
        for request_id in finished:
            del self.sent[request_id]
        step.finished_request_ids.extend(finished)
        return step


class RequestMirror:
    """A worker's copy of every request the master has sent it."""

    def __init__(self) -> None:
        self.requests: dict[str, Sequence] = {}

    def apply(self, step: pb.StepRequest) -> ScheduledBatch:
        for new in step.new_requests:
            self.requests[new.request_id] = Sequence(new.request_id, list(new.prompt_token_ids),
                                                     params_from_proto(new.params))
        seqs, counts = [], []
        for scheduled in step.scheduled:
            seq = self.requests[scheduled.request_id]
            seq.token_ids.extend(scheduled.new_token_ids)
            if scheduled.reset_block_table:
                seq.block_table = list(scheduled.new_block_ids)
            else:
                seq.block_table.extend(scheduled.new_block_ids)
            seq.num_computed_tokens = scheduled.num_computed_tokens
            seqs.append(seq)
            counts.append(scheduled.num_new_tokens)
        return ScheduledBatch(seqs, counts)

    def forget(self, step: pb.StepRequest) -> None:
        for request_id in step.finished_request_ids:
            self.requests.pop(request_id, None)


def output_to_proto(step_id: int, sampled: SampledTokens) -> pb.StepOutput:
    out = pb.StepOutput(step_id=step_id)
    for index, (token, logprobs) in sampled.items():
        item = out.sampled.add(index=index, token=token)
        if logprobs is not None:
            item.logprob_token_ids.extend(logprobs.keys())
            item.logprobs.extend(logprobs.values())
    return out


def output_from_proto(message: pb.StepOutput, wants_logprobs: list[bool]) -> SampledTokens:
    """`wants_logprobs[i]`: whether request i of the batch asked for logprobs (an empty dict is still an answer)."""
    return {item.index: (item.token, dict(zip(item.logprob_token_ids, item.logprobs))
                         if wants_logprobs[item.index] else None) for item in message.sampled}
