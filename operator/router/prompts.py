"""A request body's prompt as the engine will tokenize it, hashed into blocks for prefix affinity.

Block boundaries only line up with the engine's prefix cache when the router's token ids are the
engine's, so this mirrors the engine's handlers exactly: a completion's text prompt is encoded with
the tokenizer's special tokens (engine/llm_engine.py `make_sequence`), a chat goes through the chat
template and is encoded without them (engine/server/serving_chat.py), and both parse the body with
the engine's own request models. A body the engine would reject hashes to nothing; the engine
answers it.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .prefix import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_BLOCKS, block_hashes

if TYPE_CHECKING:
    from orca.engine.tokenizer import Tokenizer

COMPLETIONS_PATH, CHAT_PATH = "/v1/completions", "/v1/chat/completions"


def load_tokenizer(spec: str) -> Tokenizer | None:
    """`--tokenizer`: "bundled" (the engine's default model), "none", a .gguf file or a Hugging Face
    directory; torch-free, reading only tokenizer metadata. ValueError naming the flag for any other
    value; OSError or NotImplementedError for a model whose tokenizer cannot be read."""
    if spec == "none":
        return None
    if spec == "bundled":
        from orca.engine.bundled_model import bundled_model_path

        path = bundled_model_path()  # FileNotFoundError where the bundled model is not installed
    else:
        path = spec
    if os.path.isdir(path):
        from orca.engine.loaders.hf import load_hf_tokenizer

        return load_hf_tokenizer(path)
    if path.endswith(".gguf") and os.path.isfile(path):
        from orca.engine.loaders.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    raise ValueError(f"--tokenizer {spec!r}: expected 'bundled', 'none', an existing .gguf file or a "
                     f"Hugging Face model directory")


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    """`tokenizer.encode`'s ids, through `encode_batch` because that one releases the GIL: a long
    prompt tokenized in a worker thread then does not stall the event loop relaying other streams."""
    return tokenizer.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


def completion_token_ids(tokenizer: Tokenizer, body: dict[str, Any]) -> list[int] | None:
    """The first prompt's ids, as the engine makes them (of several prompts, the first: one pick
    serves them all)."""
    from orca.engine.server.protocol import CompletionRequest

    prompt = CompletionRequest.model_validate(body).prompt
    if isinstance(prompt, list):
        if not prompt:
            return None
        if not all(isinstance(token, int) for token in prompt):
            prompt = prompt[0]  # type: ignore[assignment]  # a list of texts or of token lists
    if isinstance(prompt, str):
        return encode(tokenizer, prompt, add_special_tokens=True)
    return list(prompt)  # type: ignore[arg-type]


def chat_token_ids(tokenizer: Tokenizer, body: dict[str, Any]) -> list[int]:
    from orca.engine.server.protocol import ChatCompletionRequest

    request = ChatCompletionRequest.model_validate(body)
    text = tokenizer.apply_chat_template([{"role": message.role, "content": message.text()}
                                          for message in request.messages])
    return encode(tokenizer, text, add_special_tokens=False)


class PromptHasher:
    """Request body -> the chained hashes of its prompt's leading full blocks, in the engine's block size."""

    def __init__(self, tokenizer: Tokenizer, block_size: int = DEFAULT_BLOCK_SIZE,
                 max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        if block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {block_size}")
        self.tokenizer, self.block_size, self.max_blocks = tokenizer, block_size, max_blocks

    def token_ids(self, path: str, body: bytes) -> list[int] | None:
        """None for a body the engine would reject (bad JSON, bad fields, a template that refuses
        the conversation) or a path without a prompt."""
        try:
            parsed = json.loads(body)
            if not isinstance(parsed, dict):
                return None
            if path == COMPLETIONS_PATH:
                return completion_token_ids(self.tokenizer, parsed)
            if path == CHAT_PATH:
                return chat_token_ids(self.tokenizer, parsed)
        except Exception:  # the engine gives the client the precise error; the router routes by score
            return None
        return None

    def hashes(self, path: str, body: bytes) -> Sequence[int]:
        """Blocking (tokenizing takes milliseconds per thousand tokens): call it in a thread."""
        ids = self.token_ids(path, body)
        return block_hashes(ids, self.block_size, self.max_blocks) if ids else ()
