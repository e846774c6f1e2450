"""The sampler, which runs on the logits' device, on CPU: greedy rows are the argmax, logprobs are the
float32 log-softmax, seeded rows are reproducible and independent of the rows beside them."""
from __future__ import annotations

import torch

from orca.engine.sampler import Sampler
from orca.engine.sequence import SamplingParams, Sequence

VOCAB = 1000
PARAMS = [
    SamplingParams(temperature=0.0, logprobs=3),
    SamplingParams(temperature=0.8, seed=1),
    SamplingParams(temperature=1.0, top_k=20, seed=2, logprobs=2),
    SamplingParams(temperature=0.7, top_p=0.5, seed=3),
    SamplingParams(temperature=1.2, min_p=0.05, seed=4),
    SamplingParams(temperature=1.0, presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2, seed=5),
    SamplingParams(temperature=0.0, repetition_penalty=1.5),
]


def sequences(params: list[SamplingParams]) -> list[Sequence]:
    seqs = [Sequence(str(i), [3, 4, 5], p) for i, p in enumerate(params)]
    for s in seqs:
        s.token_ids += [7, 7, 9]  # some output for the penalties to count
    return seqs


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_and_logprobs_are_exact() -> None:
    x = logits(len(PARAMS)).bfloat16()
    tokens, logprobs = Sampler()(x, sequences(PARAMS))
    assert tokens[0] == int(x[0].float().argmax())
    reference = x[0].float().log_softmax(-1)
    top = reference.topk(3)
    assert logprobs[0] == {**dict(zip(top.indices.tolist(), top.values.tolist())), tokens[0]: reference[tokens[0]].item()}
    assert logprobs[1] is None and len(logprobs[2]) >= 2
    # the repetition penalty moved the argmax off the already-seen tokens only if it had to
    penalized = x[6].float().clone()
    seen = torch.tensor([3, 4, 5, 7, 9])
    penalized[seen] = torch.where(penalized[seen] > 0, penalized[seen] / 1.5, penalized[seen] * 1.5)
    assert tokens[6] == int(penalized.argmax())


def test_seeded_rows_are_reproducible_and_batch_independent() -> None:
    x = logits(len(PARAMS))
    first, _ = Sampler()(x, sequences(PARAMS))
    again, _ = Sampler()(x, sequences(PARAMS))
    assert first == again
    for i, p in enumerate(PARAMS):
        if p.seed is None:
            continue
        alone, _ = Sampler()(x[i:i + 1], sequences([p]))
        assert alone == [first[i]], p
        reordered, _ = Sampler()(torch.cat([x[i:i + 1], x]), sequences([p, *PARAMS]))
        assert reordered[0] == first[i]


def test_truncation_keeps_samples_inside_the_filter() -> None:
    x = logits(200, seed=1)
    params = [SamplingParams(temperature=1.0, top_k=5, seed=i) for i in range(200)]
    tokens, _ = Sampler()(x, sequences(params))
    allowed = x.topk(5).indices
    assert all(t in allowed[row].tolist() for row, t in enumerate(tokens))
