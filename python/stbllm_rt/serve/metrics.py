"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""
from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

RATE_WINDOW_S = 10.0  # tokens/s is averaged over this many recent seconds


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stbllm_requests", "Generation requests by outcome (completed, cancelled: the "
                                "client went away, timeout, rejected: queue full, invalid: a 4xx, error)",
                                ["outcome"], registry=r)
        self.prompt_tokens = Counter("stbllm_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.generated_tokens = Counter("stbllm_generated_tokens", "Tokens generated", registry=r)
        self.steps = Counter("stbllm_batch_steps", "Forward steps of the continuous batch", registry=r)
        self.time_to_first_token = Histogram(
            "stbllm_time_to_first_token_seconds", "From arrival (queueing included) to the first generated token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60), registry=r)
        self._queue_depth = Gauge("stbllm_queue_depth", "Requests waiting for a place in the batch", registry=r)
        self._running = Gauge("stbllm_running_requests", "Requests in the running batch", registry=r)
        tokens_per_second = Gauge("stbllm_tokens_per_second",
                                  f"Generated tokens per second over the last {RATE_WINDOW_S:g} s", registry=r)
        tokens_per_second.set_function(self._tokens_per_second)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._recent_lock = threading.Lock()

    def watch(self, queue_depth, running) -> None:
        """Reads the queue depth and running count from these callables at each scrape."""
        self._queue_depth.set_function(queue_depth)
        self._running.set_function(running)

    def request_done(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def step(self, tokens: int, now: float) -> None:
        self.steps.inc()
        self.generated_tokens.inc(tokens)
        with self._recent_lock:
            self._recent.append((now, tokens))
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()

    def _tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._recent_lock:
            total = sum(n for t, n in self._recent if t >= now - RATE_WINDOW_S)
        return total / RATE_WINDOW_S

    def render(self) -> bytes:
        return generate_latest(self.registry)
