"""Prometheus metrics from a real server: the live /metrics page passes ``promtool check metrics``, every metric
the dashboards use is there, and a call that succeeds, fails, is cancelled or runs out of time is counted exactly
once in every metric it touches."""

from __future__ import annotations

import math
import shutil
import subprocess
import urllib.request
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, ENDLESS, MODEL, Live, rpc_error, wait_until

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def page(live: Live) -> str:
    port = live.server.server.metrics_port  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def scrape(live: Live) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(page(live))
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


@pytest.fixture
def metered(serve: Callable[..., Live]) -> Live:
    return serve(metrics_port=0, max_tokens_limit=ENDLESS)


def test_metrics_page_passes_promtool_and_has_every_metric(metered: Live) -> None:
    metered.generate("the ", max_tokens=20, seed=1)
    list(metered.stream("a ", max_tokens=20, seed=2))
    metered.stub.Score(pb.ScoreRequest(text="the quick brown fox"), timeout=CALL_TIMEOUT)
    session = metered.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT)
    metered.generate("to be ", max_tokens=5, session_id=session.session_id)
    rpc_error(metered.generate, "x", temperature=math.nan)
    text = page(metered)
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {
        "textgen_requests",
        "textgen_request_failures",
        "textgen_request_duration_seconds",
        "textgen_time_to_first_token_seconds",
        "textgen_inter_token_latency_seconds",
        "textgen_queue_wait_seconds",
        "textgen_queue_size",
        "textgen_queue_limit",
        "textgen_running_sequences",
        "textgen_batch_size",
        "textgen_step_duration_seconds",
        "textgen_prompt_tokens",
        "textgen_generated_tokens",
        "textgen_sessions_active",
        "textgen_sessions_ended",
        "textgen_session_state_bytes",
        "textgen_model_info",
    } <= names
    samples = scrape(metered)
    assert value(samples, "textgen_model_info", model=MODEL, version="1", provider="CPUExecutionProvider") == 1
    assert value(samples, "textgen_sessions_active") == 1
    assert value(samples, "textgen_session_state_bytes") > 0
    assert value(samples, "textgen_step_duration_seconds_count", phase="prompt") >= 4
    assert value(samples, "textgen_prompt_tokens_total", model=MODEL) >= len("the quick brown fox")
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (scripts/install-system-deps.sh installs it)")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_token_histograms_agree_with_the_token_counters(metered: Live) -> None:
    for seed in range(4):
        metered.generate("the ", max_tokens=30, seed=seed)
    samples = scrape(metered)
    generated = value(samples, "textgen_generated_tokens_total", model=MODEL)
    assert generated == 4 * 30
    assert value(samples, "textgen_time_to_first_token_seconds_count", model=MODEL) == 4
    # every token after a generation's first has one inter-token gap
    assert value(samples, "textgen_inter_token_latency_seconds_count", model=MODEL) == generated - 4
    inf = value(samples, "textgen_inter_token_latency_seconds_bucket", model=MODEL, le="+Inf")
    assert inf == generated - 4
    assert value(samples, "textgen_batch_size_count", phase="decode") == value(
        samples, "textgen_step_duration_seconds_count", phase="decode"
    )


def _counted_once(live: Live, method: str, code: str, reason: str | None, model: str = MODEL) -> None:
    """The call is in the request counter, the failure counter and the latency histogram once, and nowhere else.
    Read once the server holds nothing of the call any more, instead of "a moment later": the request counter
    is the last thing its handler does, and an idle engine has retired its sequence, so no later count can come."""
    wait_until(lambda: value(scrape(live), "textgen_requests_total", method=method) >= 1, f"{method} counted")
    wait_until(lambda: live.engine.idle, "the engine retired every sequence")
    s = scrape(live)
    assert value(s, "textgen_requests_total", method=method) == 1
    assert value(s, "textgen_requests_total", method=method, model=model, code=code) == 1
    assert value(s, "textgen_request_duration_seconds_count", method=method, model=model) == 1
    failures = value(s, "textgen_request_failures_total", method=method)
    if reason is None:
        assert failures == 0
    else:
        assert failures == 1
        assert value(s, "textgen_request_failures_total", method=method, model=model, reason=reason) == 1


def test_success_is_counted_once(metered: Live) -> None:
    list(metered.stream("the ", max_tokens=10))
    _counted_once(metered, "GenerateStream", "OK", None)


def test_cancelled_stream_is_counted_once(metered: Live) -> None:
    call = metered.stream("the ", max_tokens=ENDLESS)
    next(call)
    call.cancel()
    _counted_once(metered, "GenerateStream", "CANCELLED", "cancelled")
    wait_until(lambda: metered.server.app.engines[MODEL].idle, "the cancelled sequence left the engine")
    s = scrape(metered)
    assert value(s, "textgen_running_sequences", model=MODEL) == 0
    assert value(s, "textgen_time_to_first_token_seconds_count", model=MODEL) == 1


def test_deadline_is_counted_once(metered: Live) -> None:
    # Long enough to reach the server on a loaded machine. The client cancels at its own deadline, which can reach
    # the handler before the server's deadline passes (gRPC's timeout header rounds 1.234 s up to 1.24 s: 6 calls of
    # 10 were counted "cancelled" before the servicer counted a cancel that close to the deadline as the deadline).
    error = rpc_error(lambda: list(metered.stream("the ", max_tokens=ENDLESS, timeout=0.5)))
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _counted_once(metered, "GenerateStream", "DEADLINE_EXCEEDED", "deadline")


@pytest.mark.parametrize(
    ("fields", "code", "reason", "model"),
    [
        ({"temperature": math.nan}, "INVALID_ARGUMENT", "validation", MODEL),
        ({"model": "no-such-model"}, "NOT_FOUND", "not_found", "unknown"),  # never the caller's string as a label
    ],
)
def test_rejected_request_is_counted_once(metered: Live, fields: dict[str, Any], code: str, reason: str, model: str):
    error = rpc_error(metered.generate, "the ", **fields)
    assert error.code().name == code
    _counted_once(metered, "Generate", code, reason, model)


def test_overload_is_counted_once(serve: Callable[..., Live]) -> None:
    live = serve(metrics_port=0, max_tokens_limit=ENDLESS, max_batch_size=1, max_queue=0)
    gate = live.gate()
    try:
        holder = live.stream("the ", max_tokens=ENDLESS)
        gate.wait_entered()  # the holder has the only slot and the engine is held still: no room, no queue
        error = rpc_error(live.generate, "a ", max_tokens=5)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        holder.cancel()
    finally:
        gate.release()
    _counted_once(live, "Generate", "RESOURCE_EXHAUSTED", "overloaded")


def test_metrics_port_in_use_is_a_clear_error(metered: Live, serve: Callable[..., Live]) -> None:
    taken = metered.server.server.metrics_port  # type: ignore[union-attr]
    with pytest.raises(Exception, match=f"cannot serve metrics on 127.0.0.1:{taken}"):
        serve(metrics_port=taken)
