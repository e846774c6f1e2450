"""What completions and chat share: run a request's sequences, then answer in one JSON body or as
server-sent events. A subclass says only how its choices and streamed deltas look."""
from __future__ import annotations

import json
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, ClassVar, Generic, TypeVar

from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..async_engine import EngineDeadError
from ..output_processor import RequestOutput
from ..sequence import Sequence
from .errors import APIError, error_body
from .protocol import SamplingFields
from .state import ServerState
from .streams import merged

RequestT = TypeVar("RequestT", bound=SamplingFields)


class OpenAIServing(ABC, Generic[RequestT]):
    id_prefix: ClassVar[str]
    object_name: ClassVar[str]
    chunk_object_name: ClassVar[str]

    def __init__(self, state: ServerState, request: RequestT, sequences: list[Sequence]) -> None:
        self.state, self.request, self.sequences = state, request, sequences
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.tokenizer = state.engine.tokenizer
        self.finals: dict[int, RequestOutput] = {}  # each choice's last output, once it has finished

    async def respond(self) -> Response:
        if self.request.stream:
            return StreamingResponse(self._events(), media_type="text/event-stream")
        try:
            async with aclosing(self._outputs()) as stream:
                async for _ in stream:
                    pass
        except EngineDeadError as error:
            raise APIError(503, str(error), "service_unavailable", code="engine_failed") from error
        outputs = [self.finals[index] for index in range(len(self.sequences))]
        return JSONResponse({"id": self.id, "object": self.object_name, "created": self.created,
                             "model": self.state.model_name,
                             "choices": [self.choice(index, output) for index, output in enumerate(outputs)],
                             "usage": self.usage(outputs)})

    async def _events(self) -> AsyncIterator[str]:
        for chunk in self.opening_chunks():
            yield _event(chunk)
        try:
            async with aclosing(self._outputs()) as stream:
                async for index, output in stream:
                    chunk = self.delta(index, output)
                    if chunk is not None:
                        yield _event(chunk)
        except EngineDeadError as error:
            yield _event(error_body(str(error), "service_unavailable", code="engine_failed"))
        else:
            options = self.request.stream_options
            if options is not None and options.include_usage:
                outputs = [self.finals[index] for index in sorted(self.finals)]
                yield _event(self.chunk([], usage=self.usage(outputs)))
        yield "data: [DONE]\n\n"

    async def _outputs(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Closing this closes `merged`, which aborts every sequence still running."""
        async with aclosing(merged(self.state, self.sequences)) as stream:
            async for index, output in stream:
                if output.finished:
                    self.finals[index] = output
                yield index, output

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": self.chunk_object_name, "created": self.created,
                "model": self.state.model_name, "choices": choices, **extra}

    def usage(self, outputs: list[RequestOutput]) -> dict[str, Any]:
        firsts = outputs[::self.request.n]  # prompt tokens count once per prompt, as OpenAI counts them
        prompt = sum(len(output.prompt_token_ids) for output in firsts)
        completion = sum(len(output.token_ids) for output in outputs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": sum(output.num_cached_tokens for output in firsts)}}

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def opening_chunks(self) -> list[dict[str, Any]]:
        return []

    @abstractmethod
    def choice(self, index: int, output: RequestOutput) -> dict[str, Any]:
        """One entry of a non-streamed answer's `choices`."""

    @abstractmethod
    def delta(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        """The chunk that streams what `output` adds to choice `index`; None when it adds nothing to send."""


def scored_tokens(output: RequestOutput, newest: int | None = None) -> list[tuple[int, dict[int, float]]]:
    """Each token with its logprob entry: all of them, or the `newest` that a streamed delta adds."""
    if newest is None:
        return list(zip(output.token_ids, output.logprobs))
    return list(zip(output.token_ids[-newest:], output.logprobs[-newest:]))


def most_likely(entry: dict[int, float], count: int) -> list[tuple[int, float]]:
    return sorted(entry.items(), key=lambda token_logprob: -token_logprob[1])[:count]


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
