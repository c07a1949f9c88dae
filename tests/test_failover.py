"""Exact failover without any proxy: three ``textgen serve`` processes on loopback, one client balancing over them
with round_robin and ``failover=True``; the replica generating a seeded stream is killed with SIGKILL mid-stream,
and the client's text equals the uninterrupted text, token for token.

Mid-stream on any machine: each replica buffers at most 8 unsent tokens (``--stream-buffer-tokens``) and the
client's connection has a ~1 KB flow-control window that cannot grow (``SMALL_WINDOW``), so while the client
reads nothing after its first message the stream cannot get more than a few hundred tokens ahead; it asks for
600, so its replica is still generating it when it is killed, whatever the machine's speed."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from textgen.client import AsyncClient, Client, RemoteError
from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, SMALL_WINDOW, ServeProcess, start_serve_process, wait_until

KEY = "74657374" * 8  # every replica opens the others' snapshots: one keyring (a published test key)
REQUEST = {"max_tokens": 600, "seed": 11, "temperature": 0.9, "top_k": 20, "stop": ["\x00never"]}


def _gauges(replica: ServeProcess) -> float:
    """Sequences this replica is running or holding paused."""
    with urllib.request.urlopen(replica.metrics_url, timeout=CALL_TIMEOUT) as reply:
        text = reply.read().decode()
    names = ("textgen_running_sequences", "textgen_paused_sequences")
    return sum(s.value for f in text_string_to_metric_families(text) if f.name in names for s in f.samples)


def _streams_served(replica: ServeProcess) -> float:
    with urllib.request.urlopen(replica.metrics_url, timeout=CALL_TIMEOUT) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        if f.name == "textgen_requests"
        for s in f.samples
        if s.name == "textgen_requests_total" and s.labels.get("method") == "GenerateStream"
    )


@pytest.fixture
def replicas(served_bundle: os.PathLike[str], monkeypatch: pytest.MonkeyPatch) -> Iterator[list[ServeProcess]]:
    monkeypatch.setenv("TEXTGEN_SNAPSHOT_KEY", KEY)
    started: list[ServeProcess] = []
    try:
        for _ in range(3):
            args = ["--bundle", str(served_bundle), "--metrics-port", "0", "--stream-buffer-tokens", "8"]
            started.append(start_serve_process(*args))
        yield started
    finally:
        for replica in started:
            replica.stop()


def _target(replicas: list[ServeProcess]) -> str:
    return ",".join(f"127.0.0.1:{r.port}" for r in replicas)


def _kill_serving(replicas: list[ServeProcess]) -> ServeProcess:
    """SIGKILL the replica that runs the (one) stream in progress."""
    wait_until(lambda: any(_gauges(r) for r in replicas), "a replica runs the stream")
    (victim,) = [r for r in replicas if _gauges(r)]
    os.kill(victim.proc.pid, signal.SIGKILL)
    assert victim.proc.wait(timeout=CALL_TIMEOUT) == -signal.SIGKILL
    return victim


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_a_killed_replica_s_stream_continues_on_another_with_the_same_text(
    replicas: list[ServeProcess], flavour: str
) -> None:
    with Client(f"127.0.0.1:{replicas[0].port}", timeout=CALL_TIMEOUT) as direct:
        expected = direct.generate("def ", return_token_ids=True, **REQUEST)
    options = {"timeout": CALL_TIMEOUT, "failover": True, "options": SMALL_WINDOW}
    victim: list[ServeProcess] = []
    if flavour == "sync":
        with Client(_target(replicas), **options) as client:
            stream = client.stream("def ", return_token_ids=True, **REQUEST)
            messages = [next(stream)]
            victim.append(_kill_serving(replicas))
            messages += list(stream)
    else:

        async def run() -> list[pb.GenerateStreamResponse]:
            async with AsyncClient(_target(replicas), **options) as client:
                stream = client.stream("def ", return_token_ids=True, **REQUEST)
                got = [await anext(stream)]
                victim.append(await asyncio.to_thread(_kill_serving, replicas))
                return got + [m async for m in stream]

        messages = asyncio.run(run())
    assert "".join(m.text for m in messages) == expected.text
    assert [t for m in messages for t in m.token_ids] == list(expected.token_ids)
    done = messages[-1].complete
    assert (done.finish_reason, done.generated_tokens, done.seed) == (pb.FINISH_REASON_LENGTH, 600, 11)
    survivors = [r for r in replicas if r is not victim[0]]
    assert sum(_streams_served(r) for r in survivors) >= 1  # the resumed call ran on a survivor


def test_the_cli_fails_over_too(replicas: list[ServeProcess]) -> None:
    with Client(f"127.0.0.1:{replicas[0].port}", timeout=CALL_TIMEOUT) as direct:
        expected = direct.generate("def ", max_tokens=30, seed=4).text
    args = ["generate", "--server", _target(replicas), "--failover", "--max-tokens", "30", "--seed", "4"]
    proc = subprocess.run(
        [sys.executable, "-m", "textgen.cli", *args, "--prompt", "def ", "--quiet"],
        capture_output=True,
        text=True,
        timeout=CALL_TIMEOUT,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "def " + expected + "\n"


def test_without_failover_the_error_reaches_the_caller(replicas: list[ServeProcess]) -> None:
    with Client(f"127.0.0.1:{replicas[0].port}", timeout=CALL_TIMEOUT, options=SMALL_WINDOW) as client:
        stream = client.stream("def ", **REQUEST)
        next(stream)
        os.kill(replicas[0].proc.pid, signal.SIGKILL)
        replicas[0].proc.wait(timeout=CALL_TIMEOUT)
        with pytest.raises(RemoteError) as broken:
            list(stream)
    assert broken.value.status in ("UNAVAILABLE", "INTERNAL", "UNKNOWN")


def test_a_session_stream_is_not_resumed_elsewhere(replicas: list[ServeProcess]) -> None:
    """A session lives on one replica: failover leaves its calls alone, and the server says why if asked."""
    with Client(f"127.0.0.1:{replicas[1].port}", timeout=CALL_TIMEOUT, failover=True) as client:
        session = client.create_session(seed=1).session_id
        reply = client.generate("def ", max_tokens=5, session_id=session)
        assert reply.complete.generated_tokens == 5 and not reply.token_ids  # sent as is: no ids asked for
