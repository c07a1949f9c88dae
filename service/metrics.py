"""Prometheus metrics: what the server counts, on its own registry, exported over HTTP on ``metrics_port``.

Three sources, each counted in one place so a request is counted exactly once in every metric it touches:
- per call (``Metrics.call``): requests by method/model/status code, failures by reason, end-to-end latency;
  recorded by the servicer's one error-mapping wrapper when the call ends, however it ends;
- per engine step (``ModelMetrics``, an ``EngineObserver`` bound to one model, with its labelled children
  resolved once): step duration and batch size by phase, prompt and generated tokens, queue wait, time to first
  token, inter-token latency;
- at scrape time (``_StateCollector``): queue size and limit, running sequences, sessions and their state bytes,
  sessions ended by reason, and the model info gauge, read from the live objects, so they can never drift.

Inter-token latency is one observation per generated token (tens of thousands a second under load). A
prometheus-client ``Histogram.observe`` per token costs a lock and a Python bucket search each; instead a step's
gaps go into numpy bucket counts at once (``_TokenHistogram``) and are exported as an ordinary histogram."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from service.observer import EngineObserver
from textgen.errors import TextgenError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from service.app import App
    from service.sequence import Sequence as EngineSequence

# Buckets fitted to what this server measures: a decode step of a small LSTM is ~0.1-2 ms on a CPU, a first
# token ~1-100 ms, a long stream seconds to minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
STEP_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
HTTP_ENDPOINTS = frozenset(
    {"/v1/completions", "/v1/models", "/v1/models/{model}", "/health", "/health/ready", "/ready"}
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_SMALL = 16  # observations per call below which the pure-Python path is faster
# How an engine sequence (a generation or a score pass) can end: the finish reasons, then the errors.
ENDED_REASONS = ("length", "stop", "cancelled", "slow_reader", "deadline", "error")


class _TokenHistogram:
    """A histogram fed many observations at a time (one numpy pass per engine step), exported at scrape time.
    Written by engine threads, read by the metrics HTTP thread: a lock per step, not per token."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._bounds = [float(b) for b in buckets]
        self._lock = threading.Lock()
        self._counts: dict[str, np.ndarray] = {}
        self._sums: dict[str, float] = {}

    def ensure(self, model: str) -> None:
        """Create the model's series (all zero), so it is exported before its first token."""
        with self._lock:
            if model not in self._counts:
                self._counts[model] = np.zeros(self.bounds.size + 1, dtype=np.int64)
                self._sums[model] = 0.0

    def observe_many(self, model: str, values: Sequence[float]) -> None:
        """Add every value in ``values`` (``ensure`` must have been called for ``model``)."""
        if len(values) <= _SMALL:  # a few rows: plain bisect beats numpy's per-call overhead (~2 vs ~10 us)
            slots = [bisect.bisect_left(self._bounds, v) for v in values]
            with self._lock:
                counts = self._counts[model]
                for i in slots:
                    counts[i] += 1
                self._sums[model] += sum(values)
            return
        v = np.asarray(values, dtype=np.float64)
        # slot i counts values <= bounds[i] (and > bounds[i-1]); the last slot is +Inf
        add = np.bincount(np.searchsorted(self.bounds, v, side="left"), minlength=self.bounds.size + 1)
        with self._lock:
            self._counts[model] += add
            self._sums[model] += float(v.sum())

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=["model"])
        with self._lock:
            snapshot = [(m, c.copy(), self._sums[m]) for m, c in self._counts.items()]
        for model, counts, total in snapshot:
            cumulative = np.cumsum(counts).tolist()
            edges = [*(_le(b) for b in self.bounds), "+Inf"]
            family.add_metric([model], list(zip(edges, cumulative, strict=True)), total)
        return family


def _le(bound: float) -> str:
    return repr(float(bound))


@dataclass
class _Families:
    """The prometheus-client metrics every model's observer and every call share."""

    requests: Counter
    failures: Counter
    request_seconds: Histogram
    first_token_seconds: Histogram
    queue_seconds: Histogram
    step_seconds: Histogram
    batch_size: Histogram
    prompt_tokens: Counter
    generated_tokens: Counter
    sequences_ended: Counter
    inter_token: _TokenHistogram
    http_requests: Counter
    http_request_seconds: Histogram


class ModelMetrics(EngineObserver):
    """The engine's observer for one model (called on that model's engine thread)."""

    def __init__(self, families: _Families, model: str) -> None:
        f = families
        self.model = model
        self._inter_token = f.inter_token
        f.inter_token.ensure(model)
        self._first_token = f.first_token_seconds.labels(model)
        self._queue = f.queue_seconds.labels(model)
        self._prompt_tokens = f.prompt_tokens.labels(model)
        self._generated = f.generated_tokens.labels(model)
        self._steps = {phase: f.step_seconds.labels(model, phase) for phase in ("prompt", "decode")}
        self._batches = {phase: f.batch_size.labels(model, phase) for phase in ("prompt", "decode")}
        self._ended = {reason: f.sequences_ended.labels(model, reason) for reason in ENDED_REASONS}

    def step(self, phase: str, batch: int, tokens: int, seconds: float) -> None:
        self._steps[phase].observe(seconds)
        self._batches[phase].observe(batch)
        if phase == "prompt":
            self._prompt_tokens.inc(tokens)

    def admitted(self, seq: EngineSequence) -> None:
        self._queue.observe(seq.admitted - seq.arrived)

    def first_token(self, seconds: float) -> None:
        self._first_token.observe(seconds)

    def sampled(self, count: int, gaps: list[float]) -> None:
        self._generated.inc(count)
        self._inter_token.observe_many(self.model, gaps)

    def finished(self, seq: EngineSequence) -> None:
        if not seq.admitted:  # ended while waiting for a slot: its wait is counted here, once
            self._queue.observe(time.monotonic() - seq.arrived)
        result = seq.result
        if result is not None:
            reason = result.finish.value if result.finish is not None else "error"
            if result.error is not None and result.error.reason in ENDED_REASONS:
                reason = result.error.reason
            self._ended[reason].inc()


class Call:
    """One RPC being counted; ``end`` records it exactly once."""

    def __init__(self, metrics: Metrics, method: str, model: str) -> None:
        self._metrics, self.method, self.model = metrics, method, model
        self._start = time.perf_counter()
        self._done = False

    def end(self, error: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        m = self._metrics.families
        if error is None:
            code = "OK"
        elif isinstance(error, TextgenError):
            code = error.status
            m.failures.labels(self.method, self.model, error.reason).inc()
        else:
            code = "INTERNAL"
            m.failures.labels(self.method, self.model, "internal").inc()
        m.requests.labels(self.method, self.model, code).inc()
        m.request_seconds.labels(self.method, self.model).observe(time.perf_counter() - self._start)


class _StateCollector(Collector):
    """Gauges read from the live app at scrape time (the HTTP thread reads plain ints and lengths)."""

    def __init__(self, app: App, inter_token: _TokenHistogram) -> None:
        self.app = app
        self.inter_token = inter_token

    def collect(self) -> Iterator[Metric]:
        app = self.app
        queue = GaugeMetricFamily("textgen_queue_size", "Requests waiting for a batch slot", labels=["model"])
        limit = GaugeMetricFamily(
            "textgen_queue_limit", "Waiting requests beyond which new ones are refused", labels=["model"]
        )
        running = GaugeMetricFamily(
            "textgen_running_sequences", "Sequences holding a batch slot (prompt or decode)", labels=["model"]
        )
        paused = GaugeMetricFamily(
            "textgen_paused_sequences",
            "Streams out of the batch because their client is not reading (they hold no batch slot)",
            labels=["model"],
        )
        info = GaugeMetricFamily(
            "textgen_model_info",
            "A served model (always 1): version, precision, execution provider",
            labels=["model", "version", "precision", "provider"],
        )
        for name, engine in app.engines.items():
            queue.add_metric([name], engine.queued)
            limit.add_metric([name], engine.max_queue)
            running.add_metric([name], engine.running)
            paused.add_metric([name], engine.paused)
            model = engine.model
            info.add_metric([name, model.version, model.bundle.manifest.graph.precision, model.bundle.providers[0]], 1)
        yield from (queue, limit, running, paused, info)
        store = app.sessions
        yield GaugeMetricFamily("textgen_sessions_active", "Open sessions", value=len(store))
        yield GaugeMetricFamily(
            "textgen_session_state_bytes", "Memory held by open sessions' recurrent state", value=store.bytes
        )
        ended = CounterMetricFamily("textgen_sessions_ended", "Sessions ended, by reason", labels=["reason"])
        for reason in ("closed", "expired", "evicted"):
            ended.add_metric([reason], store.ended[reason])
        yield ended
        yield self.inter_token.collect()

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected at scrape time only; prometheus-client would otherwise call collect() now


class Metrics:
    """All of one server's metrics, on their own registry (several servers may share a process, as tests do)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.families = _Families(
            requests=Counter(
                "textgen_requests", "RPCs handled, by final status code", ["method", "model", "code"], registry=r
            ),
            failures=Counter(
                "textgen_request_failures",
                "RPCs that did not succeed, by reason (validation, not_found, overloaded, unavailable, cancelled, "
                "slow_reader, deadline, internal)",
                ["method", "model", "reason"],
                registry=r,
            ),
            request_seconds=Histogram(
                "textgen_request_duration_seconds",
                "End-to-end RPC latency, as the server sees it",
                ["method", "model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            first_token_seconds=Histogram(
                "textgen_time_to_first_token_seconds",
                "From a generation's arrival to its first sampled token",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            queue_seconds=Histogram(
                "textgen_queue_wait_seconds",
                "From a request's arrival to its admission into the batch",
                ["model"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
            step_seconds=Histogram(
                "textgen_step_duration_seconds",
                "One graph call of the engine, by phase (prompt chunk or decode step)",
                ["model", "phase"],
                buckets=STEP_BUCKETS,
                registry=r,
            ),
            batch_size=Histogram(
                "textgen_batch_size",
                "Sequences run together in one graph call, by phase",
                ["model", "phase"],
                buckets=BATCH_BUCKETS,
                registry=r,
            ),
            prompt_tokens=Counter(
                "textgen_prompt_tokens", "Prompt tokens run (scoring included)", ["model"], registry=r
            ),
            generated_tokens=Counter("textgen_generated_tokens", "Tokens sampled", ["model"], registry=r),
            sequences_ended=Counter(
                "textgen_sequences_ended",
                "Generations and score passes ended in the engine, by reason: length, stop, cancelled, slow_reader "
                "(its client stopped reading for longer than the pause limit), deadline, error",
                ["model", "reason"],
                registry=r,
            ),
            inter_token=_TokenHistogram(
                "textgen_inter_token_latency_seconds",
                "Time between a sequence's successive sampled tokens",
                STEP_BUCKETS,
            ),
            http_requests=Counter(
                "textgen_http_requests",
                "HTTP API requests (service/http_api.py), by endpoint and HTTP status code",
                ["endpoint", "code"],
                registry=r,
            ),
            http_request_seconds=Histogram(
                "textgen_http_request_duration_seconds",
                "HTTP API request latency to the response's end (a stream's included), as the server sees it",
                ["endpoint"],
                buckets=LATENCY_BUCKETS,
                registry=r,
            ),
        )
        self._httpd: WSGIServer | None = None

    def observer(self, model: str) -> ModelMetrics:
        return ModelMetrics(self.families, model)

    def bind(self, app: App) -> None:
        """Export the app's live state (queues, sessions, models); once, before serving."""
        self.registry.register(_StateCollector(app, self.families.inter_token))
        for engine in app.engines.values():  # every series exists from the start, so rate() has a zero to go from
            ModelMetrics(self.families, engine.model.name)

    def call(self, method: str, model: str) -> Call:
        return Call(self, method, model)

    def http(self, path: str, status: int, seconds: float) -> None:
        """One HTTP API request ended: labelled by its route (any other path is "other", so label values stay a
        small, fixed set) and its status code."""
        endpoint = "/v1/models/{model}" if path.startswith("/v1/models/") else path
        endpoint = endpoint if endpoint in HTTP_ENDPOINTS else "other"
        f = self.families
        f.http_requests.labels(endpoint, str(status)).inc()
        f.http_request_seconds.labels(endpoint).observe(seconds)

    # -- the /metrics endpoint --------------------------------------------------------------------------------
    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint on its own thread; returns the port (``port`` 0 picks a free one)."""
        self._httpd, _ = start_http_server(port, addr=host.strip("[]"), registry=self.registry)
        return int(self._httpd.server_port)

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
