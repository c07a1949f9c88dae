"""The OpenAI-compatible HTTP API (service/http_api.py) on a real server on loopback, beside gRPC on the same engine:
the official ``openai`` client against it, streaming and not; the same seed gives the same text over HTTP and gRPC;
errors in OpenAI's shape with their status and parameter; a client that disconnects mid-stream frees its slot."""

from __future__ import annotations

import http.client
import json
import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, ENDLESS, MODEL, Live, wait_until


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    return serve(http_port=0, metrics_port=0, max_tokens_limit=ENDLESS)


def port(live: Live) -> int:
    assert live.server.server is not None and live.server.server.http is not None
    return live.server.server.http.port


def client(live: Live) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port(live)}/v1", api_key="unused", timeout=CALL_TIMEOUT, max_retries=0
    )


def call(live: Live, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """(status, JSON body) of one request, errors included."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port(live)}{path}", data, {"content-type": "application/json"}, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def http_requests(live: Live, **labels: str) -> float:
    """The sum of the samples of ``textgen_http_requests_total`` with ``labels``, from the /metrics page."""
    port = live.server.server.metrics_port  # type: ignore[union-attr]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=CALL_TIMEOUT) as reply:
        page = reply.read().decode()
    want = set(labels.items())
    return sum(
        s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
        if s.name == "textgen_http_requests_total" and want <= set(s.labels.items())
    )


def settled(live: Live) -> bool:
    engine = live.engine
    return engine.idle and engine.running == 0 and engine.queued == 0 and live.server.app.admission.in_progress == 0


def test_the_openai_client_gets_the_text_grpc_gets_for_the_same_seed(live: Live) -> None:
    fields = dict(max_tokens=30, temperature=0.9, seed=7)
    grpc_reply = live.generate("the ", **fields)
    reply = client(live).completions.create(model=MODEL, prompt="the ", **fields)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-") and reply.model == MODEL
    (choice,) = reply.choices
    assert choice.text == grpc_reply.text and choice.index == 0
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert reply.usage is not None and reply.usage.completion_tokens == 30
    assert reply.usage.prompt_tokens == grpc_reply.complete.prompt_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 30
    assert choice.model_extra is not None and choice.model_extra["textgen"]["seed"] == 7

    chunks = list(client(live).completions.create(model=MODEL, prompt="the ", stream=True, **fields))
    assert "".join(c.choices[0].text for c in chunks) == grpc_reply.text
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1]) and chunks[-1].choices[0].finish_reason
    assert len({c.id for c in chunks}) == 1


def test_stop_strings_and_the_prompt_as_a_list_of_one(live: Live) -> None:
    grpc_reply = live.generate("to be ", max_tokens=40, seed=3, stop=["e"])
    reply = client(live).completions.create(model=MODEL, prompt=["to be "], max_tokens=40, seed=3, stop="e")
    assert reply.choices[0].text == grpc_reply.text
    if grpc_reply.complete.stop:
        assert reply.choices[0].finish_reason == "stop"


def test_n_candidates_are_grpcs_candidates(live: Live) -> None:
    fields = dict(max_tokens=12, temperature=1.0, seed=11, n=3)
    grpc_reply = live.generate("a ", **fields)
    reply = client(live).completions.create(model=MODEL, prompt="a ", **fields)
    assert [c.text for c in reply.choices] == [c.text for c in grpc_reply.candidates]
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.completion_tokens == 36
    chunks = list(client(live).completions.create(model=MODEL, prompt="a ", stream=True, **fields))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(3)]
    assert texts == [c.text for c in grpc_reply.candidates]


def test_logprobs_in_openais_legacy_shape(live: Live) -> None:
    reply = client(live).completions.create(model=MODEL, prompt="the ", max_tokens=8, seed=1, logprobs=2)
    lp = reply.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == 8 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.top_logprobs is not None and all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset is not None and lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    grpc_reply = live.generate("the ", max_tokens=8, seed=1, logprobs=True)
    assert lp.token_logprobs == pytest.approx([t.logprob for t in grpc_reply.logprobs])
    chunks = list(
        client(live).completions.create(model=MODEL, prompt="the ", max_tokens=8, seed=1, logprobs=2, stream=True)
    )
    streamed = [c.choices[0].logprobs for c in chunks]
    assert [t for s in streamed if s and s.tokens for t in s.tokens] == lp.tokens
    assert [o for s in streamed if s and s.text_offset for o in s.text_offset] == lp.text_offset


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": ["a", "b"]}, 400, "prompt"),
        ({"prompt": "a", "n": 0}, 400, "n"),
        ({"prompt": "a", "n": 1000}, 400, "n"),
        ({"prompt": "a", "temperature": -1}, 400, "temperature"),
        ({"prompt": "a", "logit_bias": {"x": 1}}, 400, "logit_bias"),
        ({"prompt": "a", "top_kk": 3}, 400, "top_kk"),
        ({"prompt": "a", "echo": True}, 400, "echo"),
        ({"prompt": "a", "snapshot": "%%"}, 400, "snapshot"),
        ({"prompt": "a", "model": "nope"}, 404, "model"),
        ({"prompt": "a", "session_id": "nope"}, 404, "session_id"),
        ([1, 2], 400, None),
    ],
)
def test_errors_in_openais_shape(
    live: Live, body: Any, status: int, param: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    for stream in (False, True):
        got, reply = call(live, "POST", "/v1/completions", {**body, "stream": stream} if stream else body)
        assert got == status, reply
        error = reply["error"]
        assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"
        if isinstance(body, list):
            break
    assert not caplog.records  # an answer, not a failure of the server


def test_the_openai_client_raises_its_own_errors(live: Live) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(live).completions.create(model=MODEL, prompt="a", max_tokens=ENDLESS + 1)
    assert info.value.status_code == 400 and isinstance(info.value.body, dict)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client(live).completions.create(model="nope", prompt="a")


def test_malformed_and_oversized_bodies(live: Live) -> None:
    status, reply = call(live, "POST", "/v1/completions", raw=b"{not json")
    assert status == 400 and reply["error"]["param"] is None and "JSON" in reply["error"]["message"]
    limit = live.server.app.settings.max_message_bytes
    status, reply = call(live, "POST", "/v1/completions", {"prompt": "a" * limit})
    assert status == 413 and "max_message_bytes" in reply["error"]["message"]
    status, reply = call(live, "GET", "/v1/nothing")
    assert status == 404 and "error" in reply


def test_models_health_and_readiness(live: Live) -> None:
    assert client(live).models.list().data[0].id == MODEL
    assert client(live).models.retrieve(MODEL).id == MODEL
    status, reply = call(live, "GET", "/v1/models/nope")
    assert status == 404 and reply["error"]["param"] == "model"
    assert call(live, "GET", "/health") == (200, {"status": "ok"})
    assert call(live, "GET", "/health/ready") == (200, {"status": "ready"})
    assert call(live, "GET", "/ready")[0] == 200


def test_draining_refuses_with_503(live: Live) -> None:
    live.on_loop(live.server.app.drain)
    status, reply = call(live, "POST", "/v1/completions", {"prompt": "a"})
    assert status == 503 and reply["error"]["type"] == "server_error"
    assert call(live, "GET", "/health/ready")[0] == 503
    assert call(live, "GET", "/health")[0] == 200


def _open_stream(live: Live) -> socket.socket:
    """A raw connection with an endless stream running on it, its first event read."""
    body = json.dumps({"model": MODEL, "prompt": "the ", "max_tokens": ENDLESS, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("content-type", "").startswith("text/event-stream")
    assert reply.readline().startswith(b"data: {")
    assert conn.sock is not None
    return conn.sock


def test_a_client_that_disconnects_mid_stream_frees_its_slot(live: Live) -> None:
    sock = _open_stream(live)
    assert not settled(live)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    wait_until(lambda: settled(live), "the generation ended and its slot is free")
    assert call(live, "GET", "/health/ready")[0] == 200  # and the server goes on serving


def test_http_requests_are_counted_by_endpoint_and_status(live: Live) -> None:
    call(live, "GET", "/health")
    call(live, "POST", "/v1/completions", {"prompt": "a", "n": 0})
    call(live, "GET", "/no/such/path")
    assert http_requests(live, endpoint="/health", code="200") == 1
    assert http_requests(live, endpoint="/v1/completions", code="400") == 1
    assert http_requests(live, endpoint="other", code="404") == 1


def test_sessions_and_snapshots_over_http_continue_as_over_grpc(live: Live) -> None:
    def session() -> str:
        return live.stub.CreateSession(pb.CreateSessionRequest(model=MODEL, seed=5), timeout=CALL_TIMEOUT).session_id

    over_grpc, over_http = session(), session()
    for prompt in ("the ", "and "):
        expected = live.generate(prompt, session_id=over_grpc, max_tokens=6).text
        status, reply = call(
            live, "POST", "/v1/completions", {"prompt": prompt, "session_id": over_http, "max_tokens": 6}
        )
        assert status == 200 and reply["choices"][0]["text"] == expected
        assert reply["choices"][0]["textgen"]["session_id"] == over_http

    first = {"prompt": "the ", "max_tokens": 6, "seed": 9, "return_snapshot": True}
    status, reply = call(live, "POST", "/v1/completions", first)
    snapshot = reply["choices"][0]["textgen"]["snapshot"]
    grpc_snapshot = live.generate("the ", max_tokens=6, seed=9, return_snapshot=True).complete.snapshot
    expected = live.generate("and ", max_tokens=6, snapshot=grpc_snapshot).text
    status, reply = call(live, "POST", "/v1/completions", {"prompt": "and ", "max_tokens": 6, "snapshot": snapshot})
    assert status == 200 and reply["choices"][0]["text"] == expected


def test_a_client_that_disconnects_before_a_unary_reply_frees_its_slot(live: Live) -> None:
    body = json.dumps({"model": MODEL, "prompt": "the ", "max_tokens": ENDLESS}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", port(live), timeout=CALL_TIMEOUT)
    conn.request("POST", "/v1/completions", body, {"content-type": "application/json"})
    wait_until(lambda: live.engine.running == 1, "the generation runs")
    assert conn.sock is not None
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_until(lambda: settled(live), "the generation ended and its slot is free")


def test_a_deadline_that_passes_is_504_or_the_streams_last_event(live: Live) -> None:
    body = {"model": MODEL, "prompt": "the ", "max_tokens": ENDLESS, "timeout": 0.2}  # (ENDLESS: it cannot end first)
    status, reply = call(live, "POST", "/v1/completions", body)
    assert status == 504 and reply["error"]["code"] == "deadline" and reply["error"]["type"] == "server_error"
    data = json.dumps({**body, "stream": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port(live)}/v1/completions", data, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=CALL_TIMEOUT) as stream:
            events = [e for e in stream.read().decode().split("\n\n") if e]
        last = json.loads(events[-2].removeprefix("data: "))
        assert events[-1] == "data: [DONE]" and last["error"]["code"] == "deadline"
    except urllib.error.HTTPError as exc:  # the deadline passed before the first token (a slow machine)
        assert exc.code == 504
    wait_until(lambda: settled(live), "both generations ended")


def test_the_http_listener_sends_small_writes_at_once(live: Live) -> None:
    # Nagle's algorithm off on the listening socket, which accepted connections inherit: with it on, every stream's
    # second and later events waited for the client's delayed ACK (about 40 ms on Linux).
    assert live.server.server is not None and live.server.server.http is not None
    listener = live.server.server.http._socket
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
