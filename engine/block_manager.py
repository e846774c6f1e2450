"""Paged KV cache bookkeeping: fixed-size blocks, per-request block tables, and a prefix cache of full blocks."""
from __future__ import annotations

from dataclasses import dataclass, field

from .sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = field(default_factory=tuple)


class BlockManager:
    """Owns which block holds whose KV.

    Free blocks keep their content and hash until reused, so a finished request's prompt
    stays hittable (LRU order: the oldest freed block is reused first).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: dict[int, None] = dict.fromkeys(range(num_blocks))  # insertion-ordered set
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @staticmethod
    def _chain(prev: int | None, tokens: tuple[int, ...]) -> int:
        return hash((prev, tokens))

    def _match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding a prefix of the prompt; at least one prompt token is left to compute."""
        if not self.enable_prefix_caching or seq.block_table:
            return []
        bs, out, h = self.block_size, [], None
        for i in range((seq.num_prompt_tokens - 1) // bs):
            tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            h = self._chain(h, tokens)
            bid = self.cached.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            out.append(bid)
        return out

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Whether the table of `seq` can grow to cover `num_tokens` tokens."""
        matched = self._match_prefix(seq)
        reclaimed = sum(self.blocks[b].ref_count == 0 for b in matched)
        need = self.blocks_for(num_tokens) - len(seq.block_table) - len(matched)
        return need + reclaimed <= len(self.free)

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow the block table of `seq` to cover `num_tokens` tokens (call can_allocate first)."""
        if not seq.block_table and seq.num_computed_tokens == 0:
            matched = self._match_prefix(seq)
            if self.enable_prefix_caching:
                self.prefix_queries += seq.num_prompt_tokens
                self.prefix_hits += len(matched) * self.block_size
            for bid in matched:
                block = self.blocks[bid]
                if block.ref_count == 0:
                    del self.free[bid]
                block.ref_count += 1
            seq.block_table = matched
            seq.num_computed_tokens = seq.num_cached_tokens = len(matched) * self.block_size
            seq.num_hashed_blocks = len(matched)
        for _ in range(self.blocks_for(num_tokens) - len(seq.block_table)):
            bid = next(iter(self.free))
            del self.free[bid]
            block = self.blocks[bid]
            if block.hash is not None and self.cached.get(block.hash) == bid:
                del self.cached[block.hash]
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(bid)

    def commit(self, seq: Sequence) -> None:
        """Publish newly completed full blocks of `seq` to the prefix cache, once their KV is written."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // bs
        for i in range(seq.num_hashed_blocks, full):
            prev = self.blocks[seq.block_table[i - 1]].hash if i else None
            block = self.blocks[seq.block_table[i]]
            block.token_ids = tuple(seq.token_ids[i * bs:(i + 1) * bs])
            block.hash = self._chain(prev, block.token_ids)
            self.cached.setdefault(block.hash, block.block_id)
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free_seq(self, seq: Sequence) -> None:
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []
        seq.num_hashed_blocks = 0
