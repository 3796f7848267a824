"""The serving engine: one worker thread drives a C++ `BatchEngine` (continuous batching) for many asyncio clients.

Why a thin Python loop over a C++ step: the per-token work (the batched forward pass and every request's sampler)
runs in C++ with the GIL released, once per step for the whole batch. What is left per step — admitting queued
requests, applying cancellations, turning token ids into text and cutting it at stop strings, handing pieces to
the asyncio event loop — is bookkeeping that needs Python objects (tokenizer, asyncio queues) anyway, so it lives
here, where the server can reach it without a second threading layer in C++.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field

from .. import _core
from ..model import Model, StopStringFilter
from ..tokenizer import IncrementalDecoder
from .metrics import ServerMetrics


class QueueFull(Exception):
    """Raised by `ServingEngine.submit` when the batch and the queue behind it are full."""


@dataclass
class Sampling:
    """Per-request sampling parameters (the C++ Sampler's, plus OpenAI's penalties)."""
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int = 0


@dataclass
class Piece:
    """What a request's consumer receives: new text, and on the last piece the finish reason ("stop" when a stop
    token or string ended it, "length" at max_tokens or the context) and the count of generated tokens."""
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0


@dataclass(eq=False)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: Sampling
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None  # None: the model's end-of-sequence tokens
    # Set by the engine.
    id: int = -1
    arrival: float = 0.0
    completion_tokens: int = 0
    _outputs: asyncio.Queue | None = None
    _loop: asyncio.AbstractEventLoop | None = None
    _decoder: IncrementalDecoder | None = None
    _filter: StopStringFilter | None = None

    async def next_piece(self, timeout: float | None = None) -> Piece:
        """The next piece of output; raises asyncio.TimeoutError after `timeout` seconds, or the engine's error."""
        item = await asyncio.wait_for(self._outputs.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def _deliver(self, item) -> None:
        """Hands an output to the request's event loop (called from the worker thread)."""
        try:
            self._loop.call_soon_threadsafe(self._outputs.put_nowait, item)
        except RuntimeError:  # the client's event loop is gone (server shutting down)
            pass


class ServingEngine:
    """Continuous batching behind a bounded queue.

    max_batch requests run at once (each holds a KV-cache slot); up to max_queue more wait. `submit` adds a request
    (raising QueueFull beyond that); `cancel` removes one (queued or running) and frees its slot before the next
    step. Call `start()` before submitting and `stop()` at shutdown.
    """

    def __init__(self, model: Model, max_batch: int = 8, max_queue: int = 64, max_step_tokens: int = 256,
                 metrics: ServerMetrics | None = None):
        if max_queue < 0:
            raise ValueError("max_queue must be >= 0")
        self.model = model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.metrics = metrics or ServerMetrics()
        self._batch = _core.BatchEngine(model._live()[0], max_batch, max(max_step_tokens, max_batch))
        self._ids = itertools.count()
        self._cond = threading.Condition()
        self._waiting: collections.deque[GenerationRequest] = collections.deque()
        self._running: dict[int, GenerationRequest] = {}
        self._to_cancel: dict[int, str] = {}  # request id -> outcome for the metrics
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.metrics.watch(queue_depth=lambda: self.queue_depth, running=lambda: self.running)

    # ---- called from the event loop ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="stbllm-batch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread:
            self._thread.join()

    def submit(self, request: GenerationRequest) -> GenerationRequest:
        """Queues `request` for the batch; its output arrives through `request.next_piece()`."""
        request._loop = asyncio.get_running_loop()
        request._outputs = asyncio.Queue()
        request._decoder = IncrementalDecoder(self.model.tokenizer)
        request._filter = StopStringFilter(request.stop)
        if request.stop_token_ids is None:
            request.stop_token_ids = list(self.model.tokenizer.eos_token_ids)
        with self._cond:
            if len(self._waiting) + len(self._running) >= self.max_batch + self.max_queue:
                self.metrics.request_done("rejected")
                raise QueueFull(f"{self.max_batch} requests are running and {len(self._waiting)} are queued")
            request.id = next(self._ids)
            request.arrival = time.monotonic()
            self._waiting.append(request)
            self.metrics.prompt_tokens.inc(len(request.prompt_ids))
            self._cond.notify()
        return request

    def cancel(self, request: GenerationRequest, outcome: str = "cancelled") -> None:
        """Drops `request` (a disconnected client, a timeout); a no-op once it has finished."""
        with self._cond:
            if request in self._waiting:
                self._waiting.remove(request)
                self.metrics.request_done(outcome)
            elif request.id in self._running:
                self._to_cancel.setdefault(request.id, outcome)
                self._cond.notify()

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the worker thread ---------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running):
                    self._cond.wait()
                if self._stopping:
                    return
                for rid, outcome in self._to_cancel.items():
                    if self._running.pop(rid, None) is not None:  # else it finished before the cancel arrived
                        self._batch.cancel(rid)
                        self.metrics.request_done(outcome)
                self._to_cancel.clear()
                joining = []
                while self._waiting and len(self._running) < self.max_batch:
                    request = self._waiting.popleft()
                    self._running[request.id] = request
                    joining.append(request)
            for request in joining:
                self._admit(request)
            if not self._running:
                continue
            try:
                events = self._batch.step()
            except Exception as error:  # noqa: BLE001 - any engine failure ends the running requests, not the server
                self._fail_all(error)
                continue
            self._dispatch(events)

    def _admit(self, request: GenerationRequest) -> None:
        s = request.sampling
        try:
            self._batch.add(request.id, request.prompt_ids, request.max_tokens, s.temperature, s.top_k, s.top_p,
                            s.min_p, s.repetition_penalty, s.seed, request.stop_token_ids, s.frequency_penalty,
                            s.presence_penalty)
        except (ValueError, IndexError) as error:
            with self._cond:
                self._running.pop(request.id, None)
            self.metrics.request_done("error")
            request._deliver(ValueError(str(error)))

    def _dispatch(self, events) -> None:
        now = time.monotonic()
        self.metrics.step(len(events), now)
        for rid, token, finish in events:
            request = self._running.get(rid)
            if request is None:  # cancelled while this step ran
                continue
            if request.completion_tokens == 0:
                self.metrics.time_to_first_token.observe(now - request.arrival)
            request.completion_tokens += 1
            text = request._filter.push(request._decoder.push([token]))
            if request._filter.stopped:
                finish = "stop"
                self._batch.cancel(rid)
            elif finish is not None:
                text += request._filter.push(request._decoder.flush(), final=True)
            if finish is not None:
                with self._cond:
                    self._running.pop(rid, None)
                self.metrics.request_done("completed")
                request._deliver(Piece(text, finish, request.completion_tokens))
            elif text:
                request._deliver(Piece(text))

    def _fail_all(self, error: Exception) -> None:
        with self._cond:
            failed = list(self._running.values())
            self._running.clear()
        for request in failed:
            self._batch.cancel(request.id)
            self.metrics.request_done("error")
            request._deliver(RuntimeError(f"generation failed: {error}"))
