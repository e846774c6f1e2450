"""A GGUF file's tokenizer from its metadata alone, without torch.

Split out of `gguf.py` (which needs torch for the weights) so that processes that only tokenize,
such as `orca router` hashing prompt prefixes, get token ids identical to the engine's without
importing torch or dequantizing a tensor.
"""
from __future__ import annotations

from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from ..tokenizer import Tokenizer

# Split regexes for `tokenizer.ggml.pre` values whose merges were not learned on GPT-2's split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZER_SPLITS = {"llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT}

_TOKEN_CONTROL = 3  # gguf.TokenType.CONTROL
_TOKEN_USER_DEFINED = 4  # gguf.TokenType.USER_DEFINED


class GGUFMetadata:
    """GGUF key/value fields as plain Python values."""

    _MISSING = object()

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self._fields = reader.fields

    def get(self, key: str, default: Any = _MISSING) -> Any:
        field = self._fields.get(key)
        if field is not None:
            return field.contents()
        if default is GGUFMetadata._MISSING:
            raise KeyError(f"GGUF metadata key {key!r} is missing.")
        return default


def eos_token_ids(meta: GGUFMetadata) -> list[int]:
    """End-of-sequence and end-of-turn ids, in that order, without duplicates."""
    ids = [meta.get(key, None) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def load_gguf_tokenizer(path: str) -> Tokenizer:
    """The tokenizer `load_gguf(path)` would give, from the metadata (the tensors are never read)."""
    meta = GGUFMetadata(gguf.GGUFReader(path))
    return tokenizer_from_metadata(meta, eos_token_ids(meta), path)


def tokenizer_from_metadata(meta: GGUFMetadata, eos_token_ids: list[int], path: str) -> Tokenizer:
    """Rebuild the tokenizer the way transformers' GGUF converter does, so token ids match it."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"{path}: GGUF tokenizer {kind!r} is not supported (only byte-level BPE 'gpt2').")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges")]
    backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    split = _PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", None))
    if split is None:
        # transformers keeps GPT-2's split regex for `tokenizer.ggml.pre` names it does not know,
        # SmolLM2's "smollm" among them; we match it.
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    backend.decoder = decoders.ByteLevel()
    types = meta.get("tokenizer.ggml.token_type", [])
    backend.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == _TOKEN_CONTROL]
    )
    backend.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == _TOKEN_USER_DEFINED]
    )

    def token(key: str) -> str | None:
        token_id = meta.get(key, None)
        return tokens[token_id] if token_id is not None else None

    return Tokenizer(
        backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        eos_token_ids=eos_token_ids,
        chat_template=meta.get("tokenizer.chat_template", None),
        # Byte-level vocabularies add no BOS unless the file asks (transformers and llama.cpp agree).
        add_bos_token=meta.get("tokenizer.ggml.add_bos_token", False),
        add_eos_token=meta.get("tokenizer.ggml.add_eos_token", False),
    )
