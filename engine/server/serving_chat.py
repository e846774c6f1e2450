"""/v1/chat/completions: the conversation through the model's chat template, answered as an
assistant message, with OpenAI's chat logprobs (token, logprob, bytes)."""
from __future__ import annotations

import asyncio
from typing import Any

from fastapi.responses import Response

from ..output_processor import RequestOutput
from .admission import submit
from .errors import APIError
from .protocol import ChatCompletionRequest
from .serving import OpenAIServing, most_likely, scored_tokens
from .state import ServerState


async def create_chat_completion(state: ServerState, request: ChatCompletionRequest) -> Response:
    tokenizer = state.engine.tokenizer
    try:
        text = tokenizer.apply_chat_template([{"role": message.role, "content": message.text()}
                                              for message in request.messages])
    except Exception as error:  # a template that rejects the conversation (e.g. roles out of order)
        raise APIError(400, f"messages: {error}", param="messages") from error
    ids = await asyncio.to_thread(tokenizer.encode, text, False)
    logprobs = (request.top_logprobs or 0) if request.logprobs else None
    sequences = await submit(state, request, [ids], request.max_completion_tokens or request.max_tokens, logprobs)
    return await OpenAIServingChat(state, request, sequences).respond()


class OpenAIServingChat(OpenAIServing[ChatCompletionRequest]):
    id_prefix = "chatcmpl"
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def _logprobs(self, output: RequestOutput, newest: int | None = None) -> dict[str, Any] | None:
        if not self.request.logprobs:
            return None
        top = self.request.top_logprobs or 0

        def item(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {"content": [{**item(token, entry[token]),
                             "top_logprobs": [item(candidate, logprob)
                                              for candidate, logprob in most_likely(entry, top)]}
                            for token, entry in scored_tokens(output, newest)]}

    def choice(self, index: int, output: RequestOutput) -> dict[str, Any]:
        return {"index": index, "message": {"role": "assistant", "content": output.text},
                "logprobs": self._logprobs(output), "finish_reason": output.finish_reason}

    def opening_chunks(self) -> list[dict[str, Any]]:
        """OpenAI's streams name the role once, in a first chunk per choice with empty content."""
        return [self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None}]) for index in range(len(self.sequences))]

    def delta(self, index: int, output: RequestOutput) -> dict[str, Any] | None:
        if not output.new_text and not output.finished and not self.request.logprobs:
            return None
        delta = {"content": output.new_text} if output.new_text else {}
        logprobs = self._logprobs(output, len(output.new_token_ids))
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs,
                            "finish_reason": output.finish_reason if output.finished else None}])
