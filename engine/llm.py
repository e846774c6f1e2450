"""Offline batch API in vLLM's shape: `LLM(...).generate(prompts, SamplingParams(...))`."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq

from tqdm import tqdm

from .llm_engine import EngineConfig, LLMEngine
from .output_processor import RequestOutput
from .sequence import SamplingParams

Message = dict[str, str]


class LLM:
    def __init__(self, model: str | None = None, dtype: str = "auto", **engine_args: object) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, dtype=dtype, **engine_args))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: str | Seq[str] | None = None,
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
                 prompt_token_ids: Seq[list[int]] | None = None, priority: Seq[int] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in input order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        inputs: list[str | list[int]] = list(prompts) if prompts is not None else list(prompt_token_ids or [])
        if prompts is not None and prompt_token_ids is not None:
            raise ValueError("prompts: pass either prompts or prompt_token_ids, not both")
        params = sampling_params or SamplingParams()
        params_list = [params] * len(inputs) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(inputs):
            raise ValueError(f"sampling_params: got {len(params_list)} for {len(inputs)} prompts")
        # Validate everything before queueing anything, so a bad prompt leaves the engine untouched.
        seqs = [self.engine.make_sequence(str(next(self._ids)), p, sp, priority[i] if priority else 0)
                for i, (p, sp) in enumerate(zip(inputs, params_list))]
        for seq in seqs:
            self.engine.add_sequence(seq)
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(seqs), desc="Generating", disable=not use_tqdm)
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                if out.finished:
                    results[out.request_id] = out
                    self.engine.release(out.request_id)
                    bar.update(1)
        bar.close()
        return [results[s.request_id] for s in seqs]

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, *,
             add_generation_prompt: bool = True, use_tqdm: bool = True) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        # The template already carries BOS where the model wants it.
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self.generate(prompt_token_ids=ids, sampling_params=sampling_params, use_tqdm=use_tqdm)
