"""The engine for servers: the model loop runs in its own thread and never waits for HTTP.

Requests are tokenized and validated in a worker thread, handed to the loop through a queue, and
their token updates come back to the asyncio event loop, where each request's stream turns them
into text (`OutputProcessor`). Torch releases the GIL inside every op, so the event loop keeps
serving clients while a step runs. A stream that is closed early (client gone) aborts its
request, which frees its KV blocks before the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from typing import Any

from .llm_engine import LLMEngine
from .output_processor import OutputProcessor, RequestOutput, TokenUpdate
from .sequence import SamplingParams, Sequence


class EngineDeadError(RuntimeError):
    """The model loop stopped on an exception; no request can be served any more."""


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine, list[TokenUpdate]], None] | None = None) -> None:
        """`on_step` runs on the model loop after every iteration (metrics); keep it cheap."""
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.processor = OutputProcessor(engine.tokenizer)
        self.on_step = on_step
        self._commands: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[list[TokenUpdate] | BaseException]] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._started = threading.Event()  # for a loop thread made by `build`: the event loop is known
        self._stop = False
        self.error: BaseException | None = None

    # ---- lifecycle ------------------------------------------------------------------------------
    @classmethod
    def build(cls, make_engine: Callable[[], LLMEngine]) -> AsyncLLMEngine:
        """Build the engine on the thread that will run its model loop, and return once it is built.

        libgomp keeps one OpenMP worker pool per thread that runs parallel regions, and with more pool
        threads than cores its workers stop spinning between regions: a model loop on a second thread,
        after the model was loaded and warmed up on the first, pays a futex wake-up for every op (decode
        steps ran 1.6x slower on two cores). Loading and stepping on one thread keeps one pool.
        """
        built: Future[AsyncLLMEngine] = Future()

        def model_thread() -> None:
            try:
                engine = cls(make_engine())
            except BaseException as e:  # raised again by build, on the caller's thread
                built.set_exception(e)
                return
            engine._thread = threading.current_thread()
            built.set_result(engine)
            engine._started.wait()
            try:
                engine._run()
            finally:  # worker processes die with the thread that started them: stop them in order first
                engine.engine.shutdown()

        threading.Thread(target=model_thread, name="orca-model-loop", daemon=True).start()
        return built.result()

    def start(self) -> None:
        """Start the model loop; call from the event loop that will consume the streams."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="orca-model-loop", daemon=True)
            self._thread.start()
        self._started.set()

    def shutdown(self) -> None:
        self._stop = True
        self._started.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        self.engine.shutdown()

    @property
    def num_streams(self) -> int:
        return len(self._streams)

    # ---- requests -------------------------------------------------------------------------------
    async def make_sequence(self, prompt: str | list[int], params: SamplingParams, priority: int = 0,
                            request_id: str | None = None) -> Sequence:
        """Tokenize and validate off the event loop; raises ValueError naming the bad field."""
        rid = request_id or f"req-{next(self._ids)}"
        return await asyncio.to_thread(self.engine.make_sequence, rid, prompt, params, priority)

    async def stream(self, seq: Sequence) -> AsyncIterator[RequestOutput]:
        """Submit a validated sequence and yield its outputs until it finishes.

        Closing the generator early (client disconnect, cancellation) aborts the request.
        """
        if self.error is not None:
            raise EngineDeadError(f"model loop failed: {self.error!r}")
        self.start()
        rid = seq.request_id
        if rid in self._streams:
            raise ValueError(f"request_id: {rid!r} is already running")
        inbox: asyncio.Queue[list[TokenUpdate] | BaseException] = asyncio.Queue()
        self._streams[rid] = inbox
        self.processor.add(seq)
        self._send("add", seq)
        finished = False
        try:
            while not finished:
                item = await inbox.get()
                if isinstance(item, BaseException):
                    raise EngineDeadError(f"model loop failed: {item!r}") from item
                for update in item:
                    out = self.processor.process(update)
                    if out is None:
                        continue
                    finished = out.finished
                    if finished and update.finish_reason is None:  # stop string: the loop must stop too
                        self._send("abort", (rid, out.finish_reason))
                    yield out
                    if finished:
                        break
        finally:
            if not finished:
                self._send("abort", (rid, "abort"))
            self._streams.pop(rid, None)
            self.processor.remove(rid)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        seq = await self.make_sequence(prompt, params or SamplingParams(), priority, request_id)
        async for out in self.stream(seq):
            yield out

    def _send(self, kind: str, payload: Any) -> None:
        self._commands.put((kind, payload))
        self._wake.set()

    # ---- the model loop (its own thread) --------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._apply_commands()
                if not engine.has_unfinished_requests():
                    if self.on_step is not None:  # gauges reflect aborts even when no step follows
                        self.on_step(engine, [])
                    self._wake.wait()
                    self._wake.clear()
                    continue
                updates = engine.step_tokens()
                for u in updates:
                    if u.finish_reason is not None:
                        engine.requests.pop(u.request_id, None)
                if self.on_step is not None:
                    self.on_step(engine, updates)
                if updates:
                    self._loop.call_soon_threadsafe(self._deliver, updates)
            self._apply_commands()  # aborts sent just before shutdown still free their blocks
        except BaseException as e:  # surface to every waiting stream instead of hanging them
            self.error = e
            self._loop.call_soon_threadsafe(self._fail_all, e)

    def _apply_commands(self) -> None:
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.engine.add_sequence(payload, make_text=False)
            else:
                rid, reason = payload
                self.engine.abort_request(rid, reason)

    # ---- back on the event loop -----------------------------------------------------------------
    def _deliver(self, updates: list[TokenUpdate]) -> None:
        per_request: dict[str, list[TokenUpdate]] = {}
        for u in updates:
            per_request.setdefault(u.request_id, []).append(u)
        for rid, items in per_request.items():
            inbox = self._streams.get(rid)
            if inbox is not None:
                inbox.put_nowait(items)

    def _fail_all(self, error: BaseException) -> None:
        for inbox in self._streams.values():
            inbox.put_nowait(error)
