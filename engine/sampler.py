"""Batched token sampling on the logits' own device: every request in the batch is handled by the same few
tensor ops, and only the sampled ids (and asked-for logprobs) come back to the host, in one transfer."""
from __future__ import annotations

import torch

from orca.kernels import ops

from .sequence import Sequence


def _padded(rows: list[list[int]], fill: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(map(len, rows)))
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long, device=device)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """OpenAI presence/frequency penalties on output tokens; repetition penalty (CTRL) on prompt and output."""
    rows = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty
            or s.params.repetition_penalty != 1.0]
    if not rows:
        return logits
    vocab, device = logits.shape[1], logits.device
    sub = logits[rows]
    # Pad with an out-of-range id that lands in one extra column, dropped afterwards.
    outs = _padded([seqs[i].output_token_ids for i in rows], vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(
        1, outs, torch.ones_like(outs, dtype=torch.float))[:, :vocab]
    p = [seqs[i].params for i in rows]
    freq = torch.tensor([x.frequency_penalty for x in p], device=device).unsqueeze(1)
    pres = torch.tensor([x.presence_penalty for x in p], device=device).unsqueeze(1)
    rep = torch.tensor([x.repetition_penalty for x in p], device=device).unsqueeze(1)
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device)
    seen.scatter_(1, _padded([seqs[i].token_ids for i in rows], vocab, device), True)
    seen = seen[:, :vocab]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - freq * counts - pres * (counts > 0)
    logits = logits.clone()
    logits[rows] = sub
    return logits


def filter_logits(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens outside top-k, the top-p nucleus and the min-p floor (per-row values, 0/-1 = off).

    Whether a filter applies at all is decided by the caller from the host-side parameters, so no
    `.any()` on the device forces a synchronisation here.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    rank = torch.arange(vocab, device=logits.device).unsqueeze(0)
    drop = rank >= k.unsqueeze(1)
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # mass before this token already exceeds p; rows with top_p = 1 skip it (the cumsum may round past 1)
    drop |= (probs.cumsum(-1) - probs > top_p.unsqueeze(1)) & (top_p < 1).unsqueeze(1)
    drop[:, 0] = False  # always keep the most likely token
    logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return logits.masked_fill(probs < min_p.unsqueeze(1) * probs.max(-1, keepdim=True).values, float("-inf"))


class Sampler:
    """Greedy rows take the argmax; the others sample with the exponential-race trick.

    argmax(p / E), E ~ Exp(1) i.i.d., draws from p; a seeded request draws its E from its own generator,
    created on the logits' device at its first sample, so its tokens do not depend on what else shares
    the batch.
    """

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], list[dict[int, float] | None]]:
        params = [s.params for s in seqs]
        device = logits.device
        # Greedy rows need only the argmax, which the model dtype gives exactly (upcasting is exact);
        # anything that computes with the logits works in float32.
        if any(not p.greedy or p.logprobs is not None or p.presence_penalty or p.frequency_penalty
               or p.repetition_penalty != 1.0 for p in params):
            logits = logits.float()
        raw = logits
        logits = apply_penalties(logits, seqs)
        tokens = ops.argmax(logits)
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            sub = logits[sampled] / torch.tensor([params[i].temperature for i in sampled], device=device).unsqueeze(1)
            vocab = logits.shape[-1]
            if any(params[i].top_k > 0 or params[i].top_p < 1 or params[i].min_p > 0 for i in sampled):
                sub = filter_logits(
                    sub,
                    # clamped here, not only in filter_logits: a top_k past int64 cannot become a tensor,
                    # and an exception on the model loop would fail every request in flight
                    torch.tensor([min(params[i].top_k, vocab) for i in sampled], device=device),
                    torch.tensor([params[i].top_p for i in sampled], device=device),
                    torch.tensor([params[i].min_p for i in sampled], device=device),
                )
            probs = sub.softmax(-1)
            noise = torch.empty_like(probs).exponential_()
            for row, i in enumerate(sampled):
                seq = seqs[i]
                if seq.params.seed is not None:
                    if seq.generator is None or seq.generator.device != device:
                        seq.generator = torch.Generator(device=device).manual_seed(seq.params.seed)
                    noise[row].exponential_(generator=seq.generator)
            tokens[sampled] = (probs / noise).argmax(dim=-1)
        return self._to_host(raw, tokens, params)

    @staticmethod
    def _to_host(raw: torch.Tensor, tokens: torch.Tensor,
                 params: list) -> tuple[list[int], list[dict[int, float] | None]]:
        """The sampled ids and the asked-for logprobs, copied to the host together (one synchronisation)."""
        rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        out: list[dict[int, float] | None] = [None] * len(params)
        if not rows:
            return tokens.tolist(), out
        lp = raw[rows].log_softmax(-1)
        top_n = max(params[i].logprobs for i in rows)
        top_vals, top_ids = lp.topk(max(top_n, 1), dim=-1)
        chosen = lp.gather(1, tokens[rows].unsqueeze(1)).squeeze(1)
        # one transfer: tokens, chosen logprobs, top values and top ids side by side in float64
        packed = torch.cat([tokens.double(), chosen.double(), top_vals.double().flatten(),
                            top_ids.double().flatten()]).tolist()
        n, r, width = len(params), len(rows), top_vals.shape[1]
        token_list = [int(t) for t in packed[:n]]
        chosen_l, vals_l, ids_l = packed[n:n + r], packed[n + r:n + r + r * width], packed[n + r + r * width:]
        for j, i in enumerate(rows):
            k = params[i].logprobs
            entry = {int(t): v for t, v in zip(ids_l[j * width:j * width + k], vals_l[j * width:j * width + k])}
            entry[token_list[i]] = chosen_l[j]
            out[i] = entry
        return token_list, out
