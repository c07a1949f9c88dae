"""The HTTP API as deployed: started by ``textgen serve --http-port``, over TLS and mutual TLS with the server's
certificates, refusing with 429 when the server is full, and ending its streams when the server shuts down."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import test_serve_cli

from live_server import CALL_TIMEOUT, ENDLESS, MODEL, Live, start_serve_process, wait_until

certs = test_serve_cli.certs  # the test CA, server and client certificates (a module-scoped fixture)


def post(url: str, body: Any, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT, context=context) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_port(live: Live) -> int:
    assert live.server.server is not None and live.server.server.http is not None
    return live.server.server.http.port


def test_textgen_serve_http_port(served_bundle: Path) -> None:
    server = start_serve_process("--bundle", str(served_bundle), "--http-port", "0", "--log-level", "info")
    try:
        wait_until(lambda: any("HTTP API" in line for line in server.log), "the HTTP API is announced")
        line = next(line for line in server.log if "HTTP API" in line)
        url = line.split(" on ")[1].split()[0]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        status, body = post(url + "/completions", {"prompt": "a", "max_tokens": 4, "seed": 1})
        assert status == 200 and json.loads(body)["usage"]["completion_tokens"] == 4
    finally:
        server.stop()


def test_https_and_mutual_tls_with_the_servers_certificates(serve: Callable[..., Live], certs: Path) -> None:
    tls = {"tls_cert_file": certs / "server.pem", "tls_key_file": certs / "server.key"}
    trusting = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    live = serve(http_port=0, **tls)
    status, body = post(
        f"https://127.0.0.1:{http_port(live)}/v1/completions", {"prompt": "a", "max_tokens": 3}, trusting
    )
    assert status == 200 and json.loads(body)["choices"][0]["finish_reason"] == "length"

    live = serve(http_port=0, **tls, tls_client_ca_file=certs / "ca.pem")
    url = f"https://127.0.0.1:{http_port(live)}/v1/completions"
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):  # no client certificate
        post(url, {"prompt": "a", "max_tokens": 3}, trusting)
    mutual = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    mutual.load_cert_chain(str(certs / "client.pem"), str(certs / "client.key"))
    assert post(url, {"prompt": "a", "max_tokens": 3}, mutual)[0] == 200


def test_a_full_server_refuses_with_429(serve: Callable[..., Live]) -> None:
    live = serve(http_port=0, max_concurrent_rpcs=1, max_tokens_limit=ENDLESS)
    stream = live.stream("a", max_tokens=ENDLESS)  # the one call in progress, over gRPC
    next(stream)
    status, body = post(f"http://127.0.0.1:{http_port(live)}/v1/completions", {"prompt": "a", "max_tokens": 2})
    error = json.loads(body)["error"]
    assert status == 429 and error["type"] == "rate_limit_error" and error["code"] == "overloaded"
    stream.cancel()
    wait_until(lambda: live.server.app.admission.in_progress == 0, "the stream ended")
    assert post(f"http://127.0.0.1:{http_port(live)}/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


def test_usage_chunk_and_shutdown_ends_a_running_stream(serve: Callable[..., Live]) -> None:
    live = serve(http_port=0, max_tokens_limit=ENDLESS)
    url = f"http://127.0.0.1:{http_port(live)}/v1/completions"
    body = {"model": MODEL, "prompt": "a", "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    status, events = post(url, body)
    lines = [line for line in events.decode().split("\n\n") if line]
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2].removeprefix("data: "))["usage"]["completion_tokens"] == 3

    request = urllib.request.Request(
        url, json.dumps({**body, "max_tokens": ENDLESS}).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as reply:
        assert reply.readline().startswith(b"data: {")
        live.server.stop(grace=0.0)  # the server goes away under the stream: it ends, with its last events
        rest = reply.read().decode()
    assert rest.rstrip().endswith("data: [DONE]") and '"finish_reason":"cancelled"' in rest
