"""Everything that touches the device: the model in its dtype, the KV cache, each step's inputs, the forward
pass and sampling. The scheduler decides what runs; this executes it, the same way on every rank."""
from __future__ import annotations

import ctypes
import dataclasses
import math
from dataclasses import dataclass

import torch

from orca.kernels import ops

from .attention.metadata import AttentionMetadata, ForwardContext, set_forward_context
from .attention.selector import select_backend
from .config import EngineConfig, ModelConfig
from .device import free_memory, kv_cache_zeros, parse_memory, resolve_device, resolve_dtype
from .distributed import parallel_state
from .loaders import LoadedModel
from .models.llama import IntermediateTensors, LlamaForCausalLM
from .sampler import Sampler
from .static_decode import StaticDecodeRunner
from .scheduler import ScheduledBatch
from .sequence import Sequence


@dataclass
class StepInputs:
    """One step's inputs on the host, built by `prepare`; `execute` moves them to the device and runs them."""

    order: list[int]  # batch indices in row order
    input_ids: torch.Tensor
    positions: torch.Tensor
    logit_rows: torch.Tensor  # rows whose logits are sampled
    metadata: AttentionMetadata


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the OS.

    Every step allocates activations of tens of megabytes; by default glibc serves each with a
    fresh mmap and unmaps it on free, so every step page-faults its activations in again (about
    10% of a CPU run). Keeping freed memory in the heap makes the next step reuse it.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 1 << 30)


class ModelRunner:
    def __init__(self, config: EngineConfig, loaded: LoadedModel) -> None:
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.cfg: ModelConfig = loaded.config
        self.block_size, self.batch_invariant = config.block_size, config.batch_invariant
        torch.manual_seed(config.seed)
        if self.device.type == "cpu":
            keep_freed_memory()
        with torch.device(self.device):
            self.model = LlamaForCausalLM(loaded.config).to(self.dtype)
        self.model.load_weights(loaded.weights(lambda name: self.model.parameter_name(name) is not None))
        for module in self.model.modules():
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()
        self.model.eval()
        self.parallel = parallel_state.get()
        self.attention_layers = [self.model.model.layers[i].self_attn.attn for i in self.model.model.stage_layers]
        attn = self.attention_layers[0]
        self.attn_backend = select_backend(self.device, attn.num_heads, attn.num_kv_heads, attn.head_dim, self.dtype)
        self.num_blocks = self.determine_num_blocks(config.kv_cache_memory)
        self.sampler = Sampler()
        self.max_model_len = min(config.max_model_len or loaded.config.max_position, loaded.config.max_position)
        self.max_batch_size = config.max_batch_size
        self.static_decode: StaticDecodeRunner | None = None
        # CUDA graphs hold the collectives of one rank alone: distributed ranks run eagerly
        single = self.parallel.tensor_parallel_size == self.parallel.pipeline_parallel_size == 1
        self.capture_graphs = (self.device.type == "cuda" and not config.enforce_eager and single
                               and self.attn_backend.supports_cuda_graphs)

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV cache (every rank of a replica the same number of blocks), then capture graphs."""
        self.num_blocks = num_blocks
        self.allocate_kv_cache()
        if self.capture_graphs:
            self.enable_static_decode(capture=True)

    def enable_static_decode(self, capture: bool) -> None:
        """Run decode-only steps on persistent buffers padded to bucket sizes; with `capture`, as CUDA graphs.

        Without capture the same path runs eagerly, which is how it is tested on machines without CUDA.
        """
        self.static_decode = StaticDecodeRunner(self, capture)

    # ---- KV cache -------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        attn = self.attention_layers[0]
        return 2 * len(self.attention_layers) * self.block_size * attn.num_kv_heads * attn.head_dim * self.dtype.itemsize

    def determine_num_blocks(self, kv_cache_memory: str | float) -> int:
        per_block = self.kv_bytes_per_block()
        num_blocks = parse_memory(kv_cache_memory, free_memory(self.device)) // per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory!r} is smaller than one KV block ({per_block} bytes)")
        return num_blocks

    def allocate_kv_cache(self) -> None:
        """One buffer for every layer's K and V caches (all layers have the same shape)."""
        attn = self.attention_layers[0]
        shape = (self.num_blocks * self.block_size, attn.num_kv_heads, attn.head_dim)
        caches = kv_cache_zeros(2 * len(self.attention_layers) * math.prod(shape), self.dtype, self.device)
        caches = caches.view(len(self.attention_layers), 2, *shape)
        for layer, attn in enumerate(self.attention_layers):
            attn.k_cache, attn.v_cache = caches[layer, 0], caches[layer, 1]

    # ---- one step -------------------------------------------------------------------------------
    def attends_per_row(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether every new token of `seq` attends as a single-query row (the decode path).

        Decodes always do. A prompt chunk does when its request has a seed (or the engine is batch
        invariant): a per-row kernel gives each token the same arithmetic however its prompt was cut
        into chunks, whatever the prefix cache held and whatever shared the step, so a seeded request
        samples from the same logits every time. Batched prefill attention would not: its reduction
        order follows the chunk's shape.
        """
        return num_new_tokens == 1 or self.batch_invariant or seq.params.seed is not None

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        """Order rows (single-query rows first, then prompt chunks) and build every index of the step, on the host.

        A per-row prompt chunk becomes one attention request per token, each over its own prefix.
        """
        seqs, counts = batch.seqs, batch.num_new_tokens
        per_row = [self.attends_per_row(s, n) for s, n in zip(seqs, counts)]
        num_per_row_seqs = sum(per_row)
        order = [i for i, p in enumerate(per_row) if p] + [i for i, p in enumerate(per_row) if not p]
        seqs = [seqs[i] for i in order]
        counts_l = [counts[i] for i in order]
        starts_l = [s.num_computed_tokens for s in seqs]
        ids: list[int] = []
        for s, st, n in zip(seqs, starts_l, counts_l):
            ids.extend(s.token_ids[st:st + n])
        bs = self.block_size
        counts_t, starts_t = torch.tensor(counts_l), torch.tensor(starts_l)
        width = max(len(s.block_table) for s in seqs)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], dtype=torch.int32)
        offsets = counts_t.cumsum(0) - counts_t
        num_tokens = len(ids)
        row = torch.repeat_interleave(torch.arange(len(seqs)), counts_t, output_size=num_tokens)
        positions = torch.arange(num_tokens) - torch.repeat_interleave(offsets - starts_t, counts_t, output_size=num_tokens)
        slot_mapping = tables[row, positions // bs].long() * bs + positions % bs
        num_decodes = int(counts_t[:num_per_row_seqs].sum())
        chunks = slice(num_per_row_seqs, None)
        request_seq = torch.cat([row[:num_decodes], torch.arange(num_per_row_seqs, len(seqs))])
        seq_lens = torch.cat([positions[:num_decodes] + 1, (starts_t + counts_t)[chunks]]).to(torch.int32)
        query_lens = torch.cat([torch.ones(num_decodes, dtype=torch.long), counts_t[chunks]])
        query_start_loc = torch.zeros(len(query_lens) + 1, dtype=torch.int32)
        query_start_loc[1:] = query_lens.cumsum(0)
        meta = AttentionMetadata(
            query_start_loc=query_start_loc, seq_lens=seq_lens, block_tables=tables[request_seq],
            slot_mapping=slot_mapping, num_decodes=num_decodes, num_actual_tokens=num_tokens, block_size=bs,
            query_start_loc_cpu=query_start_loc, seq_lens_cpu=seq_lens, max_seq_len=int(seq_lens.max()))
        samples = (starts_t + counts_t) == torch.tensor([len(s) for s in seqs])
        logit_rows = (offsets + counts_t - 1)[samples]
        return StepInputs(order, torch.tensor(ids), positions, logit_rows, meta)

    def _to_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return host
        return host.pin_memory().to(self.device, non_blocking=True)

    def execute(self, inputs: StepInputs, intermediate: IntermediateTensors | None = None
                ) -> torch.Tensor | IntermediateTensors:
        """The forward pass of a prepared step: replayed on the static decode path when it fits, else eager."""
        if intermediate is None and self.static_decode is not None and self.static_decode.fits(inputs.metadata):
            return self.static_decode.run(inputs.input_ids, inputs.positions, inputs.metadata)
        meta = dataclasses.replace(
            inputs.metadata, query_start_loc=self._to_device(inputs.metadata.query_start_loc),
            seq_lens=self._to_device(inputs.metadata.seq_lens), block_tables=self._to_device(inputs.metadata.block_tables),
            slot_mapping=self._to_device(inputs.metadata.slot_mapping))
        return self.forward(self._to_device(inputs.input_ids), self._to_device(inputs.positions), meta, intermediate)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: IntermediateTensors | None = None) -> torch.Tensor | IntermediateTensors:
        set_forward_context(ForwardContext(meta, self.attn_backend, self.attn_backend.build(meta)))
        try:
            return self.model(input_ids, positions, intermediate)
        finally:
            set_forward_context(None)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, intermediate: IntermediateTensors | None = None
            ) -> dict[int, tuple[int, dict[int, float] | None]] | IntermediateTensors:
        """One iteration of this stage.

        The last stage returns {batch index: (token, logprobs)} for the requests that sample a token
        (sampled on tensor rank 0 only; the other ranks join the logits' all-gather and return {}).
        Earlier stages return the activations for the next one; later stages take them as `intermediate`.
        """
        inputs = self.prepare(batch)
        invariant = self.batch_invariant or any(seq.params.seed is not None for seq in batch.seqs)
        with ops.batch_invariant_gemms(invariant):
            hidden = self.execute(inputs, intermediate)
            if not self.parallel.is_last_stage:
                return hidden
            sampling = [i for i in inputs.order
                        if batch.seqs[i].num_computed_tokens + batch.num_new_tokens[i] == len(batch.seqs[i])]
            if not sampling:
                return {}
            logits = self.model.compute_logits(hidden[self._to_device(inputs.logit_rows)])
        if self.parallel.tensor_rank != 0:
            return {}
        tokens, logprobs = self.sampler(logits, [batch.seqs[i] for i in sampling])
        return {i: (t, lp) for i, t, lp in zip(sampling, tokens, logprobs)}
