"""Batched token sampling: every request in the batch is handled by the same few tensor ops."""
from __future__ import annotations

import torch

from .sequence import Sequence


def _padded(rows: list[list[int]], fill: int) -> torch.Tensor:
    width = max(1, max(map(len, rows)))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; repetition penalty (CTRL) on prompt and output."""
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty
            or s.params.repetition_penalty != 1.0]
    if not rows:
        return logits
    vocab = logits.shape[1]
    sub = logits[rows]
    # Pad with an out-of-range id that lands in one extra column, dropped afterwards.
    outs = _padded([seqs[i].output_token_ids for i in rows], vocab)
    counts = torch.zeros(len(rows), vocab + 1).scatter_add_(1, outs, torch.ones_like(outs, dtype=torch.float))[:, :vocab]
    p = [seqs[i].params for i in rows]
    freq = torch.tensor([x.frequency_penalty for x in p]).unsqueeze(1)
    pres = torch.tensor([x.presence_penalty for x in p]).unsqueeze(1)
    rep = torch.tensor([x.repetition_penalty for x in p]).unsqueeze(1)
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool)
    seen.scatter_(1, _padded([seqs[i].token_ids for i in rows], vocab), True)
    seen = seen[:, :vocab]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0)
    logits = logits.clone()
    logits[rows] = sub
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside top-k, the top-p nucleus and the min-p floor (per-row values, 0/-1 = off)."""
    if (top_k > 0).any() or (top_p < 1).any():
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        rank = torch.arange(vocab).unsqueeze(0)
        drop = rank >= k.unsqueeze(1)
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
        drop |= probs.cumsum(-1) - probs > top_p.unsqueeze(1)  # mass before this token already exceeds p
        drop[:, 0] = False  # always keep the most likely token
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if (min_p > 0).any():
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


class Sampler:
    """Greedy rows take the argmax; the others sample with the exponential-race trick.

    argmax(p / E), E ~ Exp(1) i.i.d., draws from p; a seeded request draws its E from its own generator,
    so its tokens do not depend on what else shares the batch.
    """

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        params = [s.params for s in seqs]
        # Greedy rows need only the argmax, which the model dtype gives exactly (upcasting is exact);
        # anything that computes with the logits works in float32.
        if any(not p.greedy or p.logprobs is not None or p.presence_penalty or p.frequency_penalty
               or p.repetition_penalty != 1.0 for p in params):
            logits = logits.float()
        raw = logits
        logits = apply_penalties(logits, seqs)
        tokens = logits.max(dim=-1).indices  # first maximum, like argmax, but several times faster on CPU
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            sub = logits[sampled] / torch.tensor([params[i].temperature for i in sampled]).unsqueeze(1)
            vocab = logits.shape[-1]
            sub = filter_logits(
                sub,
                # clamped here, not only in filter_logits: a top_k past int64 cannot become a tensor,
                # and an exception on the model loop would fail every request in flight
                torch.tensor([min(params[i].top_k, vocab) for i in sampled]),
                torch.tensor([params[i].top_p for i in sampled]),
                torch.tensor([params[i].min_p for i in sampled]),
            )
            probs = sub.softmax(-1)
            noise = torch.empty_like(probs).exponential_()
            for row, i in enumerate(sampled):
                if seqs[i].generator is not None:
                    noise[row].exponential_(generator=seqs[i].generator)
            tokens[sampled] = (probs / noise).argmax(dim=-1)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw, token_list, params)

    @staticmethod
    def _logprobs(raw: torch.Tensor, tokens: list[int], params: list) -> list[dict[int, float] | None]:
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[dict[int, float] | None] = [None] * len(params)
        if not rows:
            return out
        lp = raw[rows].log_softmax(-1)
        top_n = max(params[i].logprobs for i in rows)
        top_vals, top_ids = lp.topk(max(top_n, 1), dim=-1)
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows]).unsqueeze(1)).squeeze(1).tolist()
        for r, i in enumerate(rows):
            n = params[i].logprobs
            entry = dict(zip(top_ids[r, :n].tolist(), top_vals[r, :n].tolist()))
            entry[tokens[i]] = chosen[r]
            out[i] = entry
        return out
