"""A real textgen server for tests: ``start_server`` runs one on an ephemeral loopback port
(``BackgroundServer``) serving a bundle; ``Live`` holds a channel and stubs to it; ``Gate`` holds the engine
inside its graph call so a test can be sure requests overlap, instead of relying on timing.

No test here may pass or fail by the machine's speed: a test waits for observable state (``wait_until``, a
``Gate``, a ``Recorder``), never for a fixed time, and a generation that must still be running at some point
asks for ``ENDLESS`` tokens rather than for "more than this machine makes in a second"."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.engine import Engine, EngineObserver
from service.sequence import Sequence
from service.server import BackgroundServer
from service.settings import load_settings
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc

MODEL = "tiny"  # the served bundle is <tmp>/tiny/1
CALL_TIMEOUT = 30.0  # every call gets a deadline, so a bug shows up as a failure, not a hung test run
# max_tokens of a generation that cannot end by length during a test on any machine: the proto's largest value
# (uint32), over an hour of decoding even at a microsecond a token. A server must allow it (max_tokens_limit).
ENDLESS = 2**32 - 1
# Client channel options that keep a stream's HTTP/2 flow-control window at about 1 KB. By default gRPC's BDP
# probing grows the window to megabytes, so a client that stops reading goes on receiving: measured, an unread
# stream of this tiny model got 57,846 tokens in 30 s and never paused. With these (grpcio honours both; measured:
# paused after 137-230 tokens with an 8-token stream buffer, 1,168-1,259 with 1,024) the server's writes block after
# about 1 KB, so an unread stream stops within window bytes plus its stream buffer of tokens (a token is at least
# one byte), whatever the speed, and a reader that resumes is at most that far behind.
SMALL_WINDOW = (("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024))


class Recorder(EngineObserver):
    """Remembers the decode batch sizes, the sequences admitted to the batch (``started``, in order) and those that
    finished (called on the engine thread)."""

    def __init__(self) -> None:
        self.decode_batches: list[int] = []
        self.started: list[Sequence] = []
        self.done: list[Sequence] = []

    def step(self, phase: str, batch: int, tokens: int, seconds: float) -> None:
        if phase == "decode":
            self.decode_batches.append(batch)

    def admitted(self, seq: Sequence) -> None:
        self.started.append(seq)

    def finished(self, seq: Sequence) -> None:
        self.done.append(seq)


class Gate:
    """Holds the engine thread inside the model's next graph call (a prompt or a decode step) until ``release``:
    whatever is submitted meanwhile waits (queued, or in flight for the sequences whose call is held)."""

    def __init__(self, engine: Engine) -> None:
        self._state = engine.state
        self.entered = threading.Event()
        self._open = threading.Event()
        for name in ("run", "decode"):
            setattr(self._state, name, self._holding(getattr(self._state, name)))

    def _holding(self, call: Callable[..., Any]) -> Callable[..., Any]:
        def held(*args: Any) -> Any:
            self.entered.set()
            if not self._open.wait(CALL_TIMEOUT):
                raise AssertionError("gate never released")
            return call(*args)

        return held

    def wait_entered(self) -> None:
        assert self.entered.wait(CALL_TIMEOUT), "the engine never ran the model"

    def release(self) -> None:
        self._open.set()
        for name in ("run", "decode"):
            self._state.__dict__.pop(name, None)


class Live:
    """A running server with a channel and stubs to it."""

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        # its own connection: flow-control windows are negotiated per connection
        self.small_window_channel = grpc.insecure_channel(f"127.0.0.1:{server.port}", options=SMALL_WINDOW)
        self._small_window_stub = pb_grpc.TextGenerationStub(self.small_window_channel)

    @property
    def engine(self) -> Engine:
        return self.server.app.engines[MODEL]

    def observe(self) -> Recorder:
        recorder = Recorder()
        self.engine.observer = recorder
        return recorder

    def gate(self) -> Gate:
        return Gate(self.engine)

    def batched(self, requests: list[dict[str, Any]], queued: int | None = None) -> list[list[Any]]:
        """Every request's stream messages, the requests run together: the first is held in the model's graph call
        while the others queue behind it (``queued`` sequences in all; default one per other request), then all
        are released at once, so they share their steps (the exactness of a row alone and batched)."""
        gate = self.gate()
        calls = [self.stream(**requests[0])]
        gate.wait_entered()
        calls += [self.stream(**r) for r in requests[1:]]
        expected = len(requests) - 1 if queued is None else queued
        wait_until(lambda: self.engine.queued == expected, f"all {expected} other sequences queued")
        gate.release()
        return [list(call) for call in calls]

    def generate(self, prompt: str = "", timeout: float = CALL_TIMEOUT, **fields: Any) -> pb.GenerateResponse:
        return self.stub.Generate(pb.GenerateRequest(prompt=prompt, **fields), timeout=timeout)

    def stream(self, prompt: str = "", timeout: float = CALL_TIMEOUT, small_window: bool = False, **fields: Any) -> Any:
        """The streaming call (a ``grpc.Call`` and iterator of ``GenerateStreamResponse``), already started.
        ``small_window``: on a connection whose flow-control window cannot grow (``SMALL_WINDOW``), for a test
        whose stream must block its server when its reader stops, or must stay close behind its reader."""
        stub = self._small_window_stub if small_window else self.stub
        return stub.GenerateStream(pb.GenerateRequest(prompt=prompt, **fields), timeout=timeout)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on the server's event loop thread (the app's sessions are not thread-safe)."""

        async def run() -> Any:
            return fn()

        return self.server.call(run)

    def check(self, service: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT).status

    def close(self) -> None:
        self.channel.close()
        self.small_window_channel.close()
        self.server.stop()


def start_server(bundle: Path, **overrides: Any) -> Live:
    settings = load_settings(
        **{
            "bundle": bundle,
            "host": "127.0.0.1",
            "port": 0,
            "providers": ["CPUExecutionProvider"],
            "intra_op_threads": 1,
            # a 256-bit test key (hex), unless the test gives a keyring file instead
            **({} if "snapshot_key_file" in overrides else {"snapshot_key": "74657374" * 8}),
            "log_level": "warning",
            **overrides,
        }
    )
    return Live(BackgroundServer(settings))


class ServeProcess:
    """``textgen serve ARGS`` in its own process, as users run it, on any free loopback port: started by
    ``start_serve_process``, which returns once the server says it listens (at log level info or lower). Its log
    is read all along by a thread (``log``), so a full pipe never blocks the server and a server that never
    starts is killed, not left behind."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "textgen.cli",
                "serve",
                "--port",
                "0",
                "--providers",
                "CPUExecutionProvider",
                "--intra-op-threads",
                "1",
                *args,
            ],
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        self.log: list[str] = []
        self.port = 0
        self.metrics_url = ""
        self._listening = threading.Event()
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)
            if not self._listening.is_set() and " on 127.0.0.1:" in line:
                self.port = int(line.split(" on 127.0.0.1:")[1].split()[0])
                tail = line.split("metrics on http://127.0.0.1:")
                if len(tail) > 1:
                    self.metrics_url = f"http://127.0.0.1:{int(tail[1].split('/')[0])}/metrics"
                self._listening.set()
        self._listening.set()  # it exited

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def start_serve_process(*args: str) -> ServeProcess:
    server = ServeProcess(*args)
    if not server._listening.wait(60) or not server.port:
        server.stop()
        raise AssertionError("textgen serve did not start: " + "".join(server.log[-20:]))
    return server


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = CALL_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.01)


def rpc_error(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> grpc.RpcError:
    """The ``grpc.RpcError`` that ``fn(*args, **kwargs)`` raises (streams are read to the end)."""
    with pytest.raises(grpc.RpcError) as info:
        out = fn(*args, **kwargs)
        if hasattr(out, "__next__"):
            list(out)
    return info.value


def stream_text(call: Any) -> tuple[str, pb.GenerateStreamResponse]:
    messages = list(call)
    assert all(not m.HasField("complete") for m in messages[:-1]) and messages[-1].HasField("complete")
    return "".join(m.text for m in messages), messages[-1]
