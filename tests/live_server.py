"""A real textgen server for tests: ``start_server`` runs one on an ephemeral loopback port
(``BackgroundServer``) serving a bundle; ``Live`` holds a channel and stubs to it; ``Gate`` holds the engine
inside its graph call so a test can be sure requests overlap, instead of relying on timing."""

from __future__ import annotations

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


class Recorder(EngineObserver):
    """Remembers the decode batch sizes and the sequences that finished (called on the engine thread)."""

    def __init__(self) -> None:
        self.decode_batches: list[int] = []
        self.done: list[Sequence] = []

    def step(self, phase: str, batch: int, tokens: int, seconds: float) -> None:
        if phase == "decode":
            self.decode_batches.append(batch)

    def finished(self, seq: Sequence) -> None:
        self.done.append(seq)


class Gate:
    """Holds the engine thread inside the model's graph call until ``release``: whatever is submitted meanwhile
    waits (queued, or in flight for the sequence whose call is held)."""

    def __init__(self, engine: Engine) -> None:
        self._model = engine.model
        self._run = engine.model.run
        self.entered = threading.Event()
        self._open = threading.Event()
        self._model.run = self._held  # type: ignore[method-assign]

    def _held(self, *args: Any) -> Any:
        self.entered.set()
        if not self._open.wait(CALL_TIMEOUT):
            raise AssertionError("gate never released")
        return self._run(*args)

    def wait_entered(self) -> None:
        assert self.entered.wait(CALL_TIMEOUT), "the engine never ran the model"

    def release(self) -> None:
        self._open.set()
        self._model.__dict__.pop("run", None)


class Live:
    """A running server with a channel and stubs to it."""

    def __init__(self, server: BackgroundServer) -> None:
        self.server = server
        self.channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        self.stub = pb_grpc.TextGenerationStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    @property
    def engine(self) -> Engine:
        return self.server.app.engines[MODEL]

    def observe(self) -> Recorder:
        recorder = Recorder()
        self.engine.observer = recorder
        return recorder

    def gate(self) -> Gate:
        return Gate(self.engine)

    def generate(self, prompt: str = "", timeout: float = CALL_TIMEOUT, **fields: Any) -> pb.GenerateResponse:
        return self.stub.Generate(pb.GenerateRequest(prompt=prompt, **fields), timeout=timeout)

    def stream(self, prompt: str = "", timeout: float = CALL_TIMEOUT, **fields: Any) -> Any:
        """The streaming call (a ``grpc.Call`` and iterator of ``GenerateStreamResponse``), already started."""
        return self.stub.GenerateStream(pb.GenerateRequest(prompt=prompt, **fields), timeout=timeout)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` run on the server's event loop thread (the app's sessions are not thread-safe)."""

        async def run() -> Any:
            return fn()

        return self.server.call(run)

    def check(self, service: str) -> int:
        return self.health.Check(health_pb2.HealthCheckRequest(service=service), timeout=CALL_TIMEOUT).status

    def close(self) -> None:
        self.channel.close()
        self.server.stop()


def start_server(bundle: Path, **overrides: Any) -> Live:
    settings = load_settings(
        **{
            "bundle": bundle,
            "host": "127.0.0.1",
            "port": 0,
            "providers": ["CPUExecutionProvider"],
            "intra_op_threads": 1,
            "snapshot_key": "test-key",
            "log_level": "warning",
            **overrides,
        }
    )
    return Live(BackgroundServer(settings))


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
