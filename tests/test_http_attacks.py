"""The HTTP API (service/http_api.py) against hostile clients, on a real server on loopback with raw sockets: a
stream whose client reads nothing, connections that never finish a request, bodies that break the JSON parser or
the types; each must be bounded, refused with the right status naming the field, and leave nothing held."""

from __future__ import annotations

import http.client
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

import pytest
from test_http_api import call, port, settled

from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, ENDLESS, MODEL, Live, wait_until


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    return serve(http_port=0, max_tokens_limit=ENDLESS)


def _raw(live: Live, rcvbuf: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:  # before connecting: the window the client advertises stays this small
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(CALL_TIMEOUT)
    sock.connect(("127.0.0.1", port(live)))
    return sock


def _request(body: dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {len(data)}"
    return head.encode() + b"\r\n\r\n" + data


def _closed_by_server(sock: socket.socket) -> bool:
    """Reads until the server closes the connection (True) or CALL_TIMEOUT passes (False)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def test_a_stream_whose_client_reads_nothing_ends_and_gives_back_its_place(serve: Callable[..., Live]) -> None:
    """As over gRPC (test_attacks): the engine ends the unread stream after the pause limit; the call, stuck
    writing to a client that reads nothing, must end too, or such clients fill max_concurrent_rpcs for ever."""
    live = serve(
        http_port=0,
        max_concurrent_rpcs=2,
        max_pause_seconds=0.5,
        max_tokens_limit=ENDLESS,
        stream_buffer_tokens=8,
        http_idle_seconds=0.5,
    )
    server = live.server.server.http  # type: ignore[union-attr]
    sock = _raw(live, rcvbuf=4096)
    sock.sendall(_request({"model": MODEL, "prompt": "the ", "max_tokens": ENDLESS, "stream": True}))
    admission = live.server.app.admission
    wait_until(lambda: admission.in_progress == 1, "the stream is admitted")
    wait_until(lambda: settled(live) and server.connections == 0, "the unread stream ended, its place free", 120)
    assert call(live, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    sock.close()


def test_a_connection_that_never_finishes_its_request_head_is_closed(serve: Callable[..., Live]) -> None:
    """uvicorn times only idle keep-alive connections: a client that sends nothing, or its request line and
    headers a byte at a time, would hold its connection (a file descriptor, shared with gRPC) for ever."""
    live = serve(http_port=0, http_idle_seconds=0.5)
    silent = _raw(live)
    partial = _raw(live)
    partial.sendall(b"POST /v1/completions HTTP/1.1\r\nhost: x\r\n")
    for byte in b"x-slow: 1\r\n":
        partial.sendall(bytes([byte]))
    assert _closed_by_server(silent) and _closed_by_server(partial)
    silent.close()
    partial.close()


def test_a_body_that_stops_coming_is_refused_with_408(serve: Callable[..., Live]) -> None:
    live = serve(http_port=0, http_idle_seconds=0.5)
    sock = _raw(live)
    sock.sendall(_request({"prompt": "a"})[:-3])  # the head and all but the body's last bytes
    reply = b""
    while chunk := sock.recv(65536):
        reply += chunk
    assert reply.startswith(b"HTTP/1.1 408 ")
    sock.close()


def test_json_that_breaks_the_parser_is_400_not_500(live: Live) -> None:
    status, reply = call(live, "POST", "/v1/completions", raw=b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "JSON" in reply["error"]["message"]
    deep = b'{"prompt": "a", "logit_bias": ' + b'{"1": ' * 50_000 + b"1" + b"}" * 50_001
    status, reply = call(live, "POST", "/v1/completions", raw=deep)
    assert status == 400
    status, reply = call(live, "POST", "/v1/completions", raw=b'{"seed": 1' + b"0" * 5000 + b"}")
    assert status == 400


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "NaN"),
        ("temperature", "Infinity"),
        ("top_p", "NaN"),
        ("presence_penalty", "-Infinity"),
        ("timeout", "Infinity"),
        ("timeout", "NaN"),
        ("max_tokens", "1e400"),
        ("seed", str(2**70)),
        ("seed", "-1"),
        ("n", str(2**70)),
        ("logit_bias", '{"1": NaN}'),
        ("logit_bias", '{"99999999999999999999999": 1}'),
        ("logit_bias_text", '{"a": Infinity}'),
        ("allowed_token_ids", f"[{2**70}]"),
        ("banned_token_ids", "[-1]"),
        ("stop_token_ids", f"[{2**70}]"),
        ("stop", "[1, 2]"),
        ("stream_options", '{"include_usage": "yes please"}'),
        ("prompt", '{"a": 1}'),
        ("unknown_field", "1"),
    ],
)
def test_a_bad_field_is_400_naming_it(live: Live, field: str, value: str) -> None:
    raw = f'{{"prompt": "the ", "max_tokens": 2, "{field}": {value}}}'.encode()
    status, reply = call(live, "POST", "/v1/completions", raw=raw)
    assert status == 400, reply
    assert reply["error"]["param"] == field, reply
    assert settled(live)


def _strict_json(text: bytes) -> Any:
    def refuse(constant: str) -> None:
        raise AssertionError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("stream", [False, True])
def test_log_probabilities_of_masked_tokens_are_valid_json(live: Live, stream: bool) -> None:
    """Alternatives a mask excludes have logprob -inf, which JSON cannot write (Starlette refuses it: a 500 after
    the generation ran; json.dumps writes -Infinity, which JSON parsers refuse)."""
    body = {"prompt": "the ", "max_tokens": 3, "allowed_token_ids": [3, 4], "logprobs": 5, "stream": stream}
    conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    reply = conn.getresponse()
    data = reply.read()
    conn.close()
    assert reply.status == 200, data
    if stream:
        events = [line.removeprefix(b"data: ") for line in data.split(b"\n\n") if line.strip()]
        assert events[-1] == b"[DONE]"
        chunks = [_strict_json(e) for e in events[:-1]]
        assert all("error" not in c for c in chunks), chunks
    else:
        assert len(_strict_json(data)["choices"][0]["logprobs"]["top_logprobs"]) == 3


def test_a_unary_reply_over_max_message_bytes_is_refused_naming_the_field(serve: Callable[..., Live]) -> None:
    """As over gRPC: the reply's JSON is bounded (16 candidates x 4096 tokens x 20 log-probabilities is 25 MB,
    encoded on the event loop in seconds); the generation ends as soon as the reply is known to be too large."""
    live = serve(http_port=0, max_message_bytes=1 << 16)
    for fields, param in (({"n": 2, "logprobs": 5}, "n"), ({"logprobs": 20}, "max_tokens")):
        body = {"prompt": "the ", "max_tokens": 2000, **fields}
        status, reply = call(live, "POST", "/v1/completions", body)
        assert status == 400 and reply["error"]["param"] == param, reply
        assert "max_message_bytes" in reply["error"]["message"]
        wait_until(lambda: settled(live), "the generation ended")
    body = {"prompt": "the ", "max_tokens": 2000, "n": 2, "logprobs": 5, "stream": True}
    conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
    data = conn.getresponse().read()
    assert data.endswith(b"data: [DONE]\n\n") and len(data) > 1 << 16  # streamed, it is not bounded so
    conn.close()


def _post(live: Live, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json", **headers})
    reply = conn.getresponse()
    status, data = reply.status, json.loads(reply.read())
    conn.close()
    return status, data


def test_sessions_belong_to_their_principal_over_http(serve: Callable[..., Live]) -> None:
    live = serve(http_port=0, trust_principal_metadata=True)
    alice = {"x-textgen-principal": "alice"}
    created = live.stub.CreateSession(
        pb.CreateSessionRequest(model=MODEL, seed=5), metadata=tuple(alice.items()), timeout=CALL_TIMEOUT
    )
    body = json.dumps({"prompt": "the ", "max_tokens": 2, "session_id": created.session_id}).encode()
    missing = json.dumps({"prompt": "the ", "max_tokens": 2, "session_id": "no-such-session"}).encode()
    status, theirs = _post(live, body, {"x-textgen-principal": "bob"})
    assert status == 404 and theirs["error"]["param"] == "session_id"
    status, nobodys = _post(live, missing, {"x-textgen-principal": "bob"})
    assert status == 404
    assert theirs["error"]["message"].replace(created.session_id, "X") == nobodys["error"]["message"].replace(
        "no-such-session", "X"
    )
    assert _post(live, body, alice)[0] == 200
    conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
    conn.putrequest("POST", "/v1/completions")
    for name, value in (("content-type", "application/json"), ("content-length", str(len(body)))):
        conn.putheader(name, value)
    conn.putheader("x-textgen-principal", "alice")
    conn.putheader("x-textgen-principal", "bob")
    conn.endheaders(body)
    reply = conn.getresponse()
    assert reply.status == 400 and b"x-textgen-principal" in reply.read()
    conn.close()
    assert settled(live)

    untrusting = serve(http_port=0)  # the header is no one's word: every loopback client is the same caller
    created = untrusting.stub.CreateSession(pb.CreateSessionRequest(model=MODEL), timeout=CALL_TIMEOUT)
    body = json.dumps({"prompt": "the ", "max_tokens": 2, "session_id": created.session_id}).encode()
    assert _post(untrusting, body, {"x-textgen-principal": "bob"})[0] == 200


def test_a_chunked_body_is_bounded_as_one_with_a_length(live: Live) -> None:
    limit = live.server.app.settings.max_message_bytes
    over = json.dumps({"prompt": "a" * limit}).encode()
    for body, expected in ((over, 413), (json.dumps({"prompt": "a", "max_tokens": 2}).encode(), 200)):
        conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
        conn.request("POST", "/v1/completions", chunks, {"content-type": "application/json"}, encode_chunked=True)
        reply = conn.getresponse()
        data = json.loads(reply.read())
        assert reply.status == expected, data
        assert expected == 200 or "max_message_bytes" in data["error"]["message"]
        conn.close()
    assert settled(live)


def _status_and_retry_after(live: Live) -> tuple[int, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "a"}), {"content-type": "application/json"})
    reply = conn.getresponse()
    reply.read()
    conn.close()
    return reply.status, reply.getheader("retry-after")


def test_full_and_draining_servers_say_when_to_retry(serve: Callable[..., Live]) -> None:
    live = serve(http_port=0, max_concurrent_rpcs=1, max_tokens_limit=ENDLESS)
    held = live.stream("the ", max_tokens=ENDLESS)
    wait_until(lambda: live.server.app.admission.in_progress == 1, "the server is full")
    assert _status_and_retry_after(live) == (429, "1")
    held.cancel()
    wait_until(lambda: settled(live), "the stream ended")
    live.on_loop(live.server.app.drain)
    assert _status_and_retry_after(live) == (503, "1")


def test_a_client_gone_before_its_body_came_is_no_server_error(live: Live, caplog: pytest.LogCaptureFixture) -> None:
    sock = _raw(live)
    sock.sendall(_request({"prompt": "a"})[:-3])
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    observed = live.server.app.metrics.registry.get_sample_value
    labels = {"endpoint": "/v1/completions"}

    def counted(status: str) -> float:
        return observed("textgen_http_requests_total", {**labels, "code": status}) or 0.0

    wait_until(lambda: counted("499") + counted("500") + counted("400") == 1, "the request was counted")
    assert counted("499") == 1, (counted("400"), counted("500"))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_unary_reply_whose_client_reads_nothing_is_given_up(serve: Callable[..., Live]) -> None:
    """A reply bigger than the socket's buffers waits on the client: one that reads nothing must not hold its
    connection and the reply's buffer for ever (Starlette sends the reply in one write, queued whole: the write
    returns, and a close waits to flush it)."""
    limit = 16 << 20
    live = serve(http_port=0, max_message_bytes=limit, http_idle_seconds=0.5)
    server = live.server.server.http  # type: ignore[union-attr]
    sock = _raw(live, rcvbuf=4096)
    sock.sendall(_request({"prompt": "the ", "max_tokens": 4000, "n": 4, "logprobs": 20}))  # about 11 MB
    wait_until(lambda: server.connections == 1, "the request came")
    wait_until(lambda: settled(live) and server.connections == 0, "the unread reply was given up")
    sock.close()
