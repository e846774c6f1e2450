"""Prefix affinity's memory: which replica last served each prompt prefix, block by block.

An engine keeps the KV of a prompt's full blocks in its prefix cache, keyed by a chain of hashes
(engine/block_manager.py: block i's hash covers block i-1's hash and block i's tokens, so equal
hashes mean equal prefixes, not only equal blocks). The router hashes each prompt the same way
and remembers, per block hash, the replica it sent that prompt to. A later prompt sharing those
leading blocks is then likely to find their KV cached on that replica, and skip recomputing them.

The index is a guess, never checked against the engines: a replica may have evicted the blocks
since. Being wrong costs only a prefill that would have happened anyway.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from .policy import PrefixMatch

DEFAULT_BLOCK_SIZE = 16  # the engine's default --block-size: block boundaries must match the engine's
DEFAULT_MAX_BLOCKS = 128  # 2048 tokens at the default block size: enough to tell shared prefixes apart
DEFAULT_INDEX_CAPACITY = 100_000  # block hashes remembered: some 15 MB of router memory


def block_hashes(token_ids: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE,
                 max_blocks: int = DEFAULT_MAX_BLOCKS) -> list[int]:
    """Chained hashes of the leading full blocks (a partial last block is never cached, so never hashed)."""
    hashes: list[int] = []
    previous: int | None = None
    for start in range(0, min(len(token_ids) // block_size, max_blocks) * block_size, block_size):
        previous = hash((previous, tuple(token_ids[start:start + block_size])))
        hashes.append(previous)
    return hashes


class PrefixIndex:
    """Block hash -> the address of the replica that last served a prompt with that prefix; a
    bounded LRU, so the router's memory stays flat however many distinct prompts pass."""

    def __init__(self, capacity: int = DEFAULT_INDEX_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"prefix index capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._owners: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owners)

    def lookup(self, hashes: Sequence[int]) -> PrefixMatch | None:
        """The replica holding the longest known prefix of these blocks, and how many blocks it holds.

        The deepest hash found wins: a chained hash stands for the whole prefix up to its block,
        even when a shallower entry was evicted or now names another replica."""
        for index in range(len(hashes) - 1, -1, -1):
            address = self._owners.get(hashes[index])
            if address is not None:
                return PrefixMatch(address, index + 1)
        return None

    def record(self, hashes: Sequence[int], address: str) -> None:
        """Remember that `address` now holds these blocks. Deepest first, so the leading blocks,
        shared by the most prompts, end up the most recently used and are evicted last."""
        for block_hash in reversed(hashes):
            self._owners[block_hash] = address
            self._owners.move_to_end(block_hash)
        while len(self._owners) > self.capacity:
            self._owners.popitem(last=False)
