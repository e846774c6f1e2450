"""Turns the model loop's token updates into text: detokenization and stop strings.

The model loop only decides what it can from token ids (EOS, stop token ids, max_tokens, context
length). Text is made here, by whoever consumes the outputs: inline for the offline `LLM`, on the
server's event loop for `AsyncLLMEngine`, so the model loop never waits on detokenization.
A stop string found here ends the request; the caller tells the model loop to stop it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import SamplingParams, Sequence
from .tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TokenUpdate:
    """What one iteration produced for one request, as the model loop sees it."""

    request_id: str
    token: int
    finish_reason: str | None  # set when the model loop finished the request on this token
    logprobs: dict[int, float] | None = None
    num_cached_tokens: int = 0


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


@dataclass(eq=False)
class _Request:
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    text: str = ""
    finished: bool = False


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _Request] = {}

    def add(self, seq: Sequence) -> None:
        detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids, seq.params.skip_special_tokens)
        self.requests[seq.request_id] = _Request(seq.prompt, seq.prompt_token_ids, seq.params, detok)

    def remove(self, request_id: str) -> None:
        self.requests.pop(request_id, None)

    def process(self, update: TokenUpdate) -> RequestOutput | None:
        """Detokenize the new token and apply stop strings; None for a request already finished here."""
        r = self.requests.get(update.request_id)
        if r is None or r.finished:  # e.g. a token the model loop made before it heard of a stop string
            return None
        p, reason = r.params, update.finish_reason
        r.token_ids.append(update.token)
        if update.logprobs is not None:
            r.logprobs.append(update.logprobs)
        text = r.text + r.detokenizer.step([update.token])
        if reason is not None:
            text += r.detokenizer.flush()
        if p.stop:
            # Only the tail can hold a new match: the new text plus one stop string's length before it.
            tail = max(0, len(r.text) - max(map(len, p.stop)))
            hits = [(text.find(s, tail), s) for s in p.stop if text.find(s, tail) >= 0]
            if hits:
                at, s = min(hits)
                text = text[:at + len(s)] if p.include_stop_str_in_output else text[:at]
                reason = "stop"
        old_len = len(_visible(r.text, p, False))
        r.text, r.finished = text, reason is not None
        visible = _visible(text, p, r.finished)
        return RequestOutput(
            request_id=update.request_id, prompt=r.prompt, prompt_token_ids=r.prompt_token_ids,
            token_ids=list(r.token_ids), text=visible, new_token_ids=[update.token], new_text=visible[old_len:],
            finished=r.finished, finish_reason=reason, logprobs=r.logprobs,
            num_cached_tokens=update.num_cached_tokens)


def _visible(text: str, p: SamplingParams, finished: bool) -> str:
    """Hold back a possible partial stop string while streaming, so no client ever sees one."""
    if finished or not p.stop:
        return text
    hold = max(map(len, p.stop)) - 1
    return text[:len(text) - hold] if hold else text
