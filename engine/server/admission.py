"""Admission: a request is either refused whole or queued whole, never half of its sequences."""
from __future__ import annotations

import uuid

from ..sequence import SamplingParams, Sequence
from .errors import APIError, bad_value
from .protocol import SamplingFields
from .state import ServerState


async def submit(state: ServerState, request: SamplingFields, prompts: list[str | list[int]],
                 max_tokens: int | None, logprobs: int | None) -> list[Sequence]:
    """Validate everything and build all sequences (prompt-major, n per prompt) before queueing any."""
    if request.model != state.model_name:
        raise APIError(404, f"The model `{request.model}` does not exist; this server serves `{state.model_name}`.",
                       param="model", code="model_not_found")
    base_id = uuid.uuid4().hex[:16]
    sequences: list[Sequence] = []
    try:
        for prompt_index, prompt in enumerate(prompts):
            first: Sequence | None = None
            for choice in range(request.n):
                params = SamplingParams(
                    temperature=request.temperature, top_p=request.top_p, top_k=request.top_k, min_p=request.min_p,
                    seed=None if request.seed is None else request.seed + choice, stop=request.stop,
                    presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
                    repetition_penalty=request.repetition_penalty, max_tokens=max_tokens,
                    ignore_eos=request.ignore_eos, logprobs=logprobs)
                # the n copies of a prompt reuse its token ids instead of tokenizing again
                sequence = await state.engine.make_sequence(
                    prompt if first is None else first.prompt_token_ids, params, request.priority,
                    f"{base_id}-{prompt_index}-{choice}")
                if first is None:
                    first = sequence
                else:
                    sequence.prompt = first.prompt
                sequences.append(sequence)
    except ValueError as error:
        raise bad_value(error) from error
    # Checked and counted with no await in between, so a burst cannot slip past the limit.
    if state.queued + len(sequences) > state.max_waiting:
        raise APIError(429, f"too many waiting requests ({state.queued}); retry later", "rate_limit_exceeded",
                       code="too_many_waiting", headers={"Retry-After": "1"})
    state.queued += len(sequences)
    return sequences
