"""Text <-> token ids, chat templates, and streaming detokenization for the serving engine."""
from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import processors

# Tokens re-decoded before the read offset, so a window's first token is decoded in context
# (leading spaces, merged bytes). vLLM uses the same value.
_CONTEXT_TOKENS = 5


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token and chat-template facts a loader knows.

    `add_bos_token` / `add_eos_token` follow transformers: when either is given, or the backend has
    no post-processor, the post-processor is rebuilt from them; otherwise the backend's own
    post-processor (e.g. from tokenizer.json) decides what `add_special_tokens` adds.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: list[int],
        chat_template: str | None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token is not None else None
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        if add_bos_token is not None or add_eos_token is not None or backend.post_processor is None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))
        self._template: jinja2.Template | None = None

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        bos = [self.bos_token] if add_bos and self.bos_token is not None else []
        eos = [self.eos_token] if add_eos and self.eos_token is not None else []
        single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
        pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
        special = [(t, self.backend.token_to_id(t)) for t in dict.fromkeys(bos + eos)]
        self.backend.post_processor = processors.TemplateProcessing(
            single=" ".join(single), pair=" ".join(pair), special_tokens=special
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render like transformers' `apply_chat_template(tokenize=False)`, so prompts match the reference."""
        if self.chat_template is None:
            raise ValueError("This model has no chat template; pass a raw prompt instead.")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=messages,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            add_generation_prompt=add_generation_prompt,
        )


def _compile_template(source: str) -> jinja2.Template:
    """The environment transformers uses: sandboxed, block-trimmed, HTML-free `tojson`."""

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: object, ensure_ascii: bool = False, indent: int | None = None,
               separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without re-decoding the whole sequence.

    Keeps the tokens from `prefix_offset` on. Each step decodes `[prefix_offset:read_offset]` and
    `[prefix_offset:]`; the difference is the new text. A result ending in U+FFFD is an incomplete
    UTF-8 character split across tokens, so it is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list((prompt_ids or [])[-_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)

    def _split(self) -> tuple[str, str]:
        """(text already emitted in the window, text of the whole window)."""
        decode = self.tokenizer.decode
        prefix = decode(self._ids[: self._read_offset], self.skip_special_tokens)
        return prefix, decode(self._ids, self.skip_special_tokens)

    def step(self, new_token_ids: list[int]) -> str:
        """Add tokens; return the text they finalize (possibly "")."""
        self._ids.extend(new_token_ids)
        prefix, full = self._split()
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        # The emitted window becomes the next step's context; older tokens are no longer needed.
        self._ids = self._ids[self._read_offset :]
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        """Return whatever is still held back, even an incomplete character, at the end of the stream."""
        prefix, full = self._split()
        self._ids = self._ids[self._read_offset :]
        self._read_offset = len(self._ids)
        return full[len(prefix) :]
