"""/v1/completions: prompts in OpenAI's four shapes, `echo`, and logprobs with text offsets."""
from __future__ import annotations

from typing import Any

from fastapi.responses import Response

from ..output_processor import RequestOutput
from ..sequence import Sequence
from .admission import submit
from .errors import APIError
from .protocol import CompletionRequest
from .serving import OpenAIServing, most_likely, scored_tokens
from .state import ServerState


async def create_completion(state: ServerState, request: CompletionRequest) -> Response:
    prompts = _prompts(request.prompt)
    sequences = await submit(state, request, prompts, request.max_tokens or 16, request.logprobs)
    return await OpenAIServingCompletion(state, request, sequences, prompts).respond()


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    """One text or token list per prompt, as a flat list of ints is one prompt, not many."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt: must not be empty", param="prompt")
    if all(isinstance(token, int) for token in prompt):
        return [list(prompt)]  # type: ignore[arg-type]
    return list(prompt)  # type: ignore[arg-type]


class OpenAIServingCompletion(OpenAIServing[CompletionRequest]):
    id_prefix = "cmpl"
    object_name = "text_completion"
    chunk_object_name = "text_completion"  # OpenAI streams completions under the same name

    def __init__(self, state: ServerState, request: CompletionRequest, sequences: list[Sequence],
                 prompts: list[str | list[int]]) -> None:
        super().__init__(state, request, sequences)
        self.prompts = prompts
        # where the next streamed token starts in each choice's text (logprobs.text_offset)
        self.offsets = [len(self.echoed(index)) for index in range(len(sequences))]

    def echoed(self, index: int) -> str:
        """The prompt text that `echo` puts before a choice's completion ("" without echo)."""
        if not self.request.echo:
            return ""
        prompt = self.prompts[index // self.request.n]
        return prompt if isinstance(prompt, str) else self.tokenizer.decode(prompt)

    def _logprobs(self, output: RequestOutput, start: int, newest: int | None = None) -> dict[str, Any] | None:
        top = self.request.logprobs
        if top is None:
            return None
        scored = scored_tokens(output, newest)
        tokens = [self.token_text(token) for token, _ in scored]
        offsets: list[int] = []
        position = start
        for text in tokens:
            offsets.append(position)
            position += len(text)
        return {"tokens": tokens, "token_logprobs": [entry[token] for token, entry in scored],
                "top_logprobs": [{self.token_text(candidate): logprob for candidate, logprob in most_likely(entry, top)}
                                 for _, entry in scored],
                "text_offset": offsets}

    def choice(self, index: int, output: RequestOutput) -> dict[str, Any]:
        return {"index": index, "text": self.echoed(index) + output.text,
                "logprobs": self._logprobs(output, self.offsets[index]), "finish_reason": output.finish_reason}

    def opening_chunks(self) -> list[dict[str, Any]]:
        if not self.request.echo:
            return []
        return [self.chunk([{"index": index, "text": self.echoed(index), "logprobs": None, "finish_reason": None}])
                for index in range(len(self.sequences))]

    def delta(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        if not output.new_text and not output.finished and self.request.logprobs is None:
            return None
        logprobs = self._logprobs(output, self.offsets[index], len(output.new_token_ids))
        if logprobs is not None:
            self.offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return self.chunk([{"index": index, "text": output.new_text, "logprobs": logprobs,
                            "finish_reason": output.finish_reason if output.finished else None}])
