"""The outputs of a request's sequences, as one stream that records their metrics as it goes."""
from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from ..output_processor import RequestOutput
from ..sequence import Sequence
from .state import ServerState


async def tracked(state: ServerState, sequence: Sequence) -> AsyncIterator[RequestOutput]:
    """One sequence's outputs, with its latencies recorded; it stops counting as waiting at its first token."""
    metrics, start, finished = state.metrics, sequence.arrival_time, False
    last: float | None = None
    try:
        async with aclosing(state.engine.stream(sequence)) as stream:
            async for output in stream:
                now = time.monotonic()
                if last is None:
                    state.queued -= 1
                    metrics.ttft.observe(now - start)
                    metrics.prompt_tokens.inc(len(sequence.prompt_token_ids))
                else:
                    metrics.itl.observe(now - last)
                last = now
                if output.finished:
                    finished = True
                    metrics.e2e.observe(now - start)
                    metrics.request_finished(output.finish_reason or "abort")
                    if sequence.first_scheduled_time is not None:
                        metrics.queue_time.observe(max(0.0, sequence.first_scheduled_time - sequence.arrival_time))
                yield output
    finally:
        if last is None:
            state.queued -= 1
        if not finished:  # client gone, or cancelled: vLLM counts these as finished_reason="abort"
            metrics.request_finished("abort")


async def merged(state: ServerState, sequences: list[Sequence]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several sequences as they come; closing this closes (and aborts) all of them."""
    inbox: asyncio.Queue[tuple[int, RequestOutput | Exception | object]] = asyncio.Queue()
    done = object()

    async def pump(index: int, sequence: Sequence) -> None:
        try:
            async with aclosing(tracked(state, sequence)) as stream:
                async for output in stream:
                    inbox.put_nowait((index, output))
        except Exception as error:
            inbox.put_nowait((index, error))
        finally:
            inbox.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(index, sequence)) for index, sequence in enumerate(sequences)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await inbox.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            elif isinstance(item, RequestOutput):
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
