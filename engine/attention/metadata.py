"""The step's attention description that every backend shares, and the context layers read it from."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class AttentionMetadata:
    """One step of the flattened batch, in terms every backend understands and none owns.

    An attention request is a run of consecutive query rows over one block table: requests
    [0, num_decodes) have one query row each (decodes, and prompt tokens that must attend row by
    row), the rest are prompt chunks. Query row i of request r sits at absolute position
    `seq_lens[r] - query_len(r) + i` and attends causally to every earlier position. Rows past
    `num_actual_tokens` pad a batch to a captured size; their slot is -1 and nothing reads them.
    """

    query_start_loc: torch.Tensor  # [num_reqs + 1] int32, on the device
    seq_lens: torch.Tensor  # [num_reqs] int32, context length including the new rows, on the device
    block_tables: torch.Tensor  # [num_reqs, max_blocks] int32, on the device
    slot_mapping: torch.Tensor  # [num_tokens] int64, cache slot of each row's K and V, -1 for padding
    num_decodes: int
    num_actual_tokens: int
    block_size: int
    query_start_loc_cpu: torch.Tensor  # host copies, for backends that size or loop on the host
    seq_lens_cpu: torch.Tensor
    max_seq_len: int

    @property
    def num_reqs(self) -> int:
        return self.seq_lens.shape[0]


@dataclass
class ForwardContext:
    metadata: AttentionMetadata
    backend: Any  # the runner's attention backend
    built: Any  # what the backend's `build` made of the metadata, shared by all layers


_context: ForwardContext | None = None


def set_forward_context(context: ForwardContext | None) -> None:
    global _context
    _context = context


def get_forward_context() -> ForwardContext:
    assert _context is not None, "attention called outside a model-runner step"
    return _context
