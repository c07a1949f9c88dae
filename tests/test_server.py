"""End-to-end tests of the gRPC service: a real server on an ephemeral loopback port (``BackgroundServer``), the
generated ``textgen.v1`` stubs, and a tiny real bundle exported from the ``fluent_run`` checkpoint (see conftest).

Where a test needs the engine held still (to be sure requests overlap, or that a call is in flight), it closes a
``Gate`` on the model's graph call instead of relying on timing; every assertion is about behaviour."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from grpc_health.v1 import health_pb2

from service.sequence import Finish
from textgen.errors import CancelledError, DeadlineExceededError
from textgen.sampling import SamplingParams
from textgen.tokenizer import TextTokenizer
from textgen.v1 import textgen_pb2 as pb
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.generate import generate_text
from training.model import RNNLanguageModel

from live_server import CALL_TIMEOUT, ENDLESS, MODEL, Live, rpc_error, start_server, stream_text, wait_until

LONG = 1_000_000  # max_tokens of a generation that cannot end during a test (servers that allow it raise the limit)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
def live(served_bundle: Path) -> Iterator[Live]:
    """One server with the default limits, shared by the tests that change nothing on it."""
    server = start_server(served_bundle)
    yield server
    server.close()


@pytest.fixture(scope="module")
def reference(fluent_run: Path) -> tuple[RNNLanguageModel, TextTokenizer]:
    return model_from_checkpoint(load_checkpoint(fluent_run / "best.pt"))


def reference_text(
    reference: tuple[RNNLanguageModel, TextTokenizer], prompt: str, max_tokens: int, seed: int = 0, **params: Any
) -> str:
    """What the torch reference sampler (``textgen sample``) generates."""
    model, tokenizer = reference
    return "".join(generate_text(model, tokenizer, prompt, max_tokens, SamplingParams(**params), seed))


# -- 1. Generate and GenerateStream ---------------------------------------------------------------------------


def test_stream_and_unary_agree_and_report_the_completion(live: Live) -> None:
    request = dict(max_tokens=40, temperature=0.8, seed=7, logprobs=True)
    unary = live.generate("the ", **request)
    text, last = stream_text(live.stream("the ", **request))
    assert text == unary.text and len(unary.text) == 40  # char model: one character per token
    streamed_logprobs = [lp for m in live.stream("the ", **request) for lp in m.logprobs]
    assert [(t.token_id, t.token) for t in streamed_logprobs] == [(t.token_id, t.token) for t in unary.logprobs]
    assert "".join(t.token for t in unary.logprobs) == unary.text
    assert all(t.logprob <= 0.0 for t in unary.logprobs)
    for done in (unary.complete, last.complete):
        assert done.finish_reason == pb.FINISH_REASON_LENGTH
        assert (done.prompt_tokens, done.generated_tokens, done.seed) == (4, 40, 7)
        assert (done.model, done.model_version) == (MODEL, "1")
        assert done.stop == "" and done.snapshot == b"" and done.session_id == ""
        t = done.timings
        assert t.total_seconds > 0 and 0 < t.first_token_seconds <= t.total_seconds
        assert t.queue_seconds >= 0 and t.prompt_seconds > 0
    assert live.generate("a", max_tokens=3, seed=2**64 - 1).complete.seed == 2**64 - 1
    unseeded = live.generate("the ", max_tokens=5)
    assert unseeded.complete.seed != 0  # a random seed, reported so the result can be reproduced
    again = live.generate("the ", max_tokens=5, seed=unseeded.complete.seed)
    assert again.text == unseeded.text


# -- 2. Score -------------------------------------------------------------------------------------------------


def test_score_matches_the_torch_model(live: Live, reference: tuple[RNNLanguageModel, TextTokenizer]) -> None:
    text = "the quick brown fox jumps\n    return a + b\n"
    reply = live.stub.Score(pb.ScoreRequest(text=text, token_logprobs=True), timeout=CALL_TIMEOUT)
    logprobs = np.array([t.logprob for t in reply.tokens])
    assert reply.token_count == len(text) == len(reply.tokens)
    assert "".join(t.token for t in reply.tokens) == text
    assert reply.loss == pytest.approx(-logprobs.mean(), abs=1e-9)
    assert reply.perplexity == pytest.approx(math.exp(reply.loss), rel=1e-9)
    assert reply.bits_per_char == pytest.approx(reply.loss / math.log(2), rel=1e-9)
    assert (reply.model, reply.model_version) == (MODEL, "1")

    model, tokenizer = reference
    ids = torch.as_tensor(tokenizer.encode(text))
    feed = torch.cat([torch.tensor([tokenizer.start_id]), ids[:-1]]).view(1, -1)
    with torch.no_grad():
        logits, _ = model(feed, model.init_state(1))
    torch_logprobs = torch.log_softmax(logits[0].double(), dim=-1)[torch.arange(ids.numel()), ids].numpy()
    assert abs(reply.loss - F.cross_entropy(logits[0], ids).item()) < 1e-4
    assert np.abs(logprobs - torch_logprobs).max() < 1e-4
    assert [t.token_id for t in reply.tokens] == ids.tolist()

    totals = live.stub.Score(pb.ScoreRequest(text=text), timeout=CALL_TIMEOUT)
    assert len(totals.tokens) == 0 and totals.loss == reply.loss and totals.token_count == reply.token_count


# -- 3. The service samples what the torch reference samples --------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0.8),
        dict(temperature=1.0, top_k=5),
        dict(temperature=1.2, top_p=0.9),
        dict(temperature=0.7, top_k=8, top_p=0.95),
        dict(temperature=1.0, repetition_penalty=1.3),
        dict(temperature=0.0),
        dict(temperature=0.0, repetition_penalty=1.5),
    ],
    ids=["t0.8", "top_k", "top_p", "top_k+top_p", "repetition_penalty", "greedy", "greedy+penalty"],
)
def test_sampled_text_equals_the_torch_reference(
    live: Live, reference: tuple[RNNLanguageModel, TextTokenizer], params: dict[str, float]
) -> None:
    for prompt, seed in (("the quick ", 3), ("def add(a, b):\n", 11)):
        served = live.generate(prompt, max_tokens=60, seed=seed, **params)
        assert served.text == reference_text(reference, prompt, 60, seed, **params), (prompt, seed)


# -- 4. A seeded request draws the same text alone and in a batch --------------------------------------------


def test_seeded_request_is_the_same_alone_and_batched(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=64)
    target = dict(prompt="the quick ", max_tokens=60, temperature=0.9, top_k=12, seed=1234)
    alone = live.generate(**target).text

    prompts = ["", "a", "to be or ", "def add(a, b):\n    ", "the lazy dog", "x" * 30]
    others = [
        dict(
            prompt=prompts[i % len(prompts)],
            max_tokens=20 + (i % 5) * 10,  # rows leave the batch at different steps
            temperature=(0.0, 0.5, 1.0, 1.4)[i % 4],
            top_k=(0, 3, 20)[i % 3],
            top_p=(1.0, 0.8)[i % 2],
            repetition_penalty=(1.0, 1.2)[i % 2],
            seed=i * 7 + 1,
        )
        for i in range(63)
    ]
    ordered = [others[0], *others[1:32], target, *others[32:]]
    each_alone = [live.generate(**r).text for r in ordered]
    assert each_alone[32] == alone
    recorder = live.observe()
    texts = [stream_text(messages)[0] for messages in live.batched(ordered)]
    assert texts[32] == alone
    assert texts == each_alone  # every row, whatever its parameters, is independent of its neighbours
    assert max(recorder.decode_batches) >= 48  # the target really shared its steps with most of the others
    assert all(len(t) == r["max_tokens"] for t, r in zip(texts, ordered, strict=True))


def test_paused_slow_readers_resume_where_they_stopped(serve: Callable[..., Live]) -> None:
    live = serve(stream_buffer_tokens=4)
    free = live.generate("the ", max_tokens=100, temperature=0).text
    requests = [
        dict(prompt="to be or ", max_tokens=120, temperature=1.0, top_k=6, seed=2),
        # Its first 30 tokens are held back (they could still become the stop string), so its buffer fills
        # 30 steps after the others': it runs on alone while they are paused, then pauses too.
        dict(prompt="the ", max_tokens=100, temperature=0, stop=[free[:30] + "\u2603"]),
        dict(prompt="", max_tokens=80, temperature=0.6, seed=3),
    ]
    alone = [live.generate(**r).text for r in requests]
    assert alone[1] == free
    engine = live.engine
    recorder = live.observe()
    gate = live.gate()
    calls = [live.stream(**r) for r in requests]
    gate.wait_entered()
    wait_until(lambda: engine.running + engine.queued == 3, "all three submitted")

    def starve_the_streams() -> None:  # blocks the event loop: nothing drains the streams' buffers
        gate.release()
        started = recorder.started
        wait_until(lambda: len(started) == 3 and all(s.paused for s in started), "all three paused")

    live.on_loop(starve_the_streams)
    assert [stream_text(c)[0] for c in calls] == alone


def test_slow_reader_is_ended_at_once_under_the_cancel_policy(serve: Callable[..., Live]) -> None:
    live = serve(stream_buffer_tokens=4, slow_reader_policy="cancel")
    request = dict(prompt="the ", max_tokens=100, temperature=0.8, seed=4)
    alone = live.generate(**request).text  # a unary call drains its buffer as it goes
    gate = live.gate()
    call = live.stream(**request)
    gate.wait_entered()

    def starve_the_stream() -> None:
        gate.release()
        wait_until(lambda: live.engine.idle, "the stream cancelled")

    live.on_loop(starve_the_stream)
    text, last = stream_text(call)
    assert last.complete.finish_reason == pb.FINISH_REASON_SLOW_READER
    assert last.complete.generated_tokens == 4 and text == alone[:4]


def test_prompts_run_in_chunks_give_the_same_results(live: Live, serve: Callable[..., Live]) -> None:
    chunked = serve(prefill_chunk_tokens=4)
    text = "the quick brown fox jumps over\n    return a + b\n"
    whole = live.stub.Score(pb.ScoreRequest(text=text, token_logprobs=True), timeout=CALL_TIMEOUT)
    parts = chunked.stub.Score(pb.ScoreRequest(text=text, token_logprobs=True), timeout=CALL_TIMEOUT)
    assert parts.token_count == whole.token_count and parts.loss == pytest.approx(whole.loss, abs=1e-6)
    assert np.allclose([t.logprob for t in parts.tokens], [t.logprob for t in whole.tokens], atol=1e-5)

    requests = [
        dict(prompt=p, max_tokens=30, temperature=0.7, seed=i)
        for i, p in enumerate(["a", "the lazy", "def add(a, b):", "to be or not to be that is the q"])
    ]
    expected = [live.generate(**r).text for r in requests]
    gate = chunked.gate()
    try:  # all four prompts are admitted together and share chunked prefill steps
        calls = [chunked.stream(**requests[0])]
        gate.wait_entered()
        calls += [chunked.stream(**r) for r in requests[1:]]
        wait_until(lambda: chunked.engine.queued == 3, "three prompts queued")
    finally:
        gate.release()
    assert [stream_text(c)[0] for c in calls] == expected


# -- 5. Stop strings ----------------------------------------------------------------------------------------


def test_stop_string_ends_generation_and_never_leaks(live: Live) -> None:
    free = live.generate("the ", max_tokens=60, temperature=0).text
    assert len(free) == 60
    stop = next(free[i : i + 3] for i in range(8, 50) if free.find(free[i : i + 3]) == i)  # first at i >= 8
    cut = free.index(stop)

    unary = live.generate("the ", max_tokens=60, temperature=0, stop=["\u2603never", stop])
    assert unary.text == free[:cut] and stop not in unary.text
    assert unary.complete.finish_reason == pb.FINISH_REASON_STOP and unary.complete.stop == stop
    assert unary.complete.generated_tokens == cut + len(stop)
    messages = list(live.stream("the ", max_tokens=60, temperature=0, stop=[stop]))
    assert "".join(m.text for m in messages) == unary.text
    assert all(stop not in m.text for m in messages)
    assert messages[-1].complete.finish_reason == pb.FINISH_REASON_STOP and messages[-1].complete.stop == stop

    # A stop string whose beginning occurs earlier without completing: held back there, then released.
    late = next(
        free[j : j + 7] for j in range(1, 50) if free.find(free[j : j + 7]) == j and free.find(free[j : j + 4]) < j
    )
    unary = live.generate("the ", max_tokens=60, temperature=0, stop=[late])
    assert unary.text == free[: free.index(late)] and unary.complete.stop == late
    assert free.index(stop) < free.index(late)  # of several stop strings, the one that completes first ends it
    assert live.generate("the ", max_tokens=60, temperature=0, stop=[late, stop]).complete.stop == stop
    assert stream_text(live.stream("the ", max_tokens=60, temperature=0, stop=[late]))[0] == unary.text

    # A stop string whose beginning ends the text is held back, then released when max_tokens ends generation.
    tail_stop = free[-2:] + "\u2603"
    assert tail_stop not in free
    for text in (
        live.generate("the ", max_tokens=60, temperature=0, stop=[tail_stop]).text,
        stream_text(live.stream("the ", max_tokens=60, temperature=0, stop=[tail_stop]))[0],
    ):
        assert text == free


# -- 6. Sessions --------------------------------------------------------------------------------------------


def test_session_continues_its_history(live: Live) -> None:
    info = live.stub.CreateSession(pb.CreateSessionRequest(seed=5), timeout=CALL_TIMEOUT)
    assert info.session_id and info.model == MODEL and info.token_count == 0 and info.state_bytes > 0
    sid = info.session_id
    first = live.generate("the qu", session_id=sid, max_tokens=20, temperature=0)
    assert first.complete.session_id == sid and first.complete.prompt_tokens == 6
    second = live.generate(" to be", session_id=sid, max_tokens=25, temperature=0)
    assert second.complete.prompt_tokens == 1 + 6  # the pending last token of the first call, then the prompt
    whole = live.generate("the qu" + first.text + " to be", max_tokens=25, temperature=0)
    assert second.text == whole.text

    # The same with sampling: a seed given on the second call restarts the session's generator from it.
    sampled = dict(temperature=0.9, top_k=10)
    s1 = live.stub.CreateSession(pb.CreateSessionRequest(seed=8), timeout=CALL_TIMEOUT).session_id
    h1 = live.generate("to be", session_id=s1, max_tokens=20, **sampled)
    assert h1.text == live.generate("to be", max_tokens=20, seed=8, **sampled).text
    h2 = live.generate(" or", session_id=s1, max_tokens=30, seed=77, **sampled)
    assert h2.text == live.generate("to be" + h1.text + " or", max_tokens=30, seed=77, **sampled).text

    fork = live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=CALL_TIMEOUT)
    assert fork.token_count == (6 + 19) + (7 + 24)  # the last sampled token of each call is still pending
    empty = live.generate(session_id=sid, max_tokens=10, temperature=0)  # an empty prompt continues the state
    assert empty.complete.prompt_tokens == 1
    assert (
        empty.text == live.generate("the qu" + first.text + " to be" + second.text, max_tokens=10, temperature=0).text
    )


def test_forked_sessions_continue_identically(live: Live) -> None:
    sid = live.stub.CreateSession(pb.CreateSessionRequest(seed=21), timeout=CALL_TIMEOUT).session_id
    live.generate("to be ", session_id=sid, max_tokens=15, temperature=0.9)
    copy = live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=CALL_TIMEOUT).session_id
    assert copy != sid
    # Without a seed the fork continues a copy of the source's generator...
    a = live.generate("or", session_id=sid, max_tokens=30, temperature=0.9)
    b = live.generate("or", session_id=copy, max_tokens=30, temperature=0.9)
    assert a.text == b.text and a.complete.seed == b.complete.seed == 21
    # ...and with the same seed both continue the same way again.
    a = live.generate(" q", session_id=sid, max_tokens=30, temperature=0.9, seed=99)
    b = live.generate(" q", session_id=copy, max_tokens=30, temperature=0.9, seed=99)
    assert a.text == b.text and a.complete.seed == 99
    reseeded = live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid, seed=4), timeout=CALL_TIMEOUT)
    c = live.generate("", session_id=reseeded.session_id, max_tokens=30, temperature=0.9)
    d = live.generate("", session_id=sid, max_tokens=30, temperature=0.9, seed=4)
    assert c.text == d.text and c.complete.seed == 4


def test_closed_session_is_gone(live: Live) -> None:
    sid = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id
    live.generate("a", session_id=sid, max_tokens=3)
    live.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=CALL_TIMEOUT)
    err = rpc_error(live.generate, "a", session_id=sid, max_tokens=3)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "closed" in err.details()
    err = rpc_error(live.stub.CloseSession, pb.CloseSessionRequest(session_id=sid), timeout=CALL_TIMEOUT)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_session_ids_never_read_as_command_line_flags(live: Live) -> None:
    # token_urlsafe ids start with "-" one time in 64, and `textgen generate --session ID` then fails
    ids = [live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id for _ in range(200)]
    assert len(set(ids)) == 200 and not any(i.startswith("-") for i in ids)
    for sid in ids:
        live.stub.CloseSession(pb.CloseSessionRequest(session_id=sid), timeout=CALL_TIMEOUT)


def test_busy_session_refuses_a_second_call(live: Live) -> None:
    sid = live.stub.CreateSession(pb.CreateSessionRequest(seed=1), timeout=CALL_TIMEOUT).session_id
    gate = live.gate()
    try:
        call = live.stream("the ", session_id=sid, max_tokens=10)
        gate.wait_entered()  # the first call holds the session
        err = rpc_error(live.generate, "x", session_id=sid, max_tokens=3)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and sid in err.details()
        err = rpc_error(live.stream, "x", session_id=sid, max_tokens=3)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        err = rpc_error(live.stub.CloseSession, pb.CloseSessionRequest(session_id=sid), timeout=CALL_TIMEOUT)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        gate.release()
    text, last = stream_text(call)
    assert len(text) == 10 and last.complete.session_id == sid
    assert live.generate("x", session_id=sid, max_tokens=3).complete.generated_tokens == 3  # free again


def test_idle_session_expires(serve: Callable[..., Live]) -> None:
    live = serve(session_ttl_seconds=600)
    now = [1000.0]  # the store's clock, moved by the test instead of waited for
    live.on_loop(lambda: setattr(live.server.app.sessions, "clock", lambda: now[0]))
    info = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT)
    assert info.idle_ttl_seconds == pytest.approx(600)
    for _ in range(2):
        now[0] += 599
        live.generate("a", session_id=info.session_id, max_tokens=2)  # used within its TTL: still there
    now[0] += 601
    err = rpc_error(live.generate, "a", session_id=info.session_id, max_tokens=2)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "expired" in err.details()


def test_least_recently_used_session_is_evicted(serve: Callable[..., Live]) -> None:
    live = serve(max_sessions=2)

    def create() -> str:
        return live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id

    a, b = create(), create()
    live.generate("a", session_id=a, max_tokens=2)  # b is now the least recently used
    c = create()
    err = rpc_error(live.generate, "a", session_id=b, max_tokens=2)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "evicted" in err.details()
    for sid in (a, c):
        assert live.generate("a", session_id=sid, max_tokens=2).complete.session_id == sid

    gate = live.gate()
    try:  # with both of this client's sessions generating it has nothing of its own to evict
        calls = [live.stream("a", session_id=sid, max_tokens=3) for sid in (a, c)]
        gate.wait_entered()
        wait_until(lambda: live.engine.running + live.engine.queued == 2, "both session calls submitted")
        err = rpc_error(live.stub.CreateSession, pb.CreateSessionRequest(), timeout=CALL_TIMEOUT)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "session quota reached" in err.details()
    finally:
        gate.release()
    assert all(stream_text(c)[1].complete.generated_tokens == 3 for c in calls)
    create()  # evicts one again


# -- 7. Snapshots -------------------------------------------------------------------------------------------


def test_snapshot_resumes_on_another_server(serve: Callable[..., Live]) -> None:
    first, second = serve(), serve()
    sid = first.stub.CreateSession(pb.CreateSessionRequest(seed=11), timeout=CALL_TIMEOUT).session_id
    head = first.generate("the ", session_id=sid, max_tokens=15, temperature=0.8, return_snapshot=True)
    snapshot = head.complete.snapshot
    assert snapshot and head.complete.session_id == sid
    assert len(snapshot) < 4096  # a few KB: state, generator and seen-token mask

    later = dict(prompt=" a", max_tokens=25, temperature=0.8, top_p=0.95, repetition_penalty=1.1)
    continued = first.generate(session_id=sid, **later).text
    assert second.generate(snapshot=snapshot, **later).text == continued
    _, last = stream_text(second.stream(snapshot=snapshot, **later))
    resumed = second.stub.CreateSession(pb.CreateSessionRequest(snapshot=snapshot), timeout=CALL_TIMEOUT)
    assert resumed.token_count == 4 + 14
    assert second.generate(session_id=resumed.session_id, **later).text == continued
    assert last.complete.seed == 11

    reseeded = second.stub.CreateSession(pb.CreateSessionRequest(snapshot=snapshot, seed=6), timeout=CALL_TIMEOUT)
    assert (
        second.generate(session_id=reseeded.session_id, **later).text
        == first.generate(snapshot=snapshot, seed=6, **later).text
    )

    # A snapshot of an ephemeral generation resumes too.
    e = first.generate("to be", max_tokens=10, temperature=0.8, seed=3, return_snapshot=True)
    assert (
        second.generate(snapshot=e.complete.snapshot, **later).text
        == first.generate(snapshot=e.complete.snapshot, **later).text
    )


def test_bad_snapshots_are_refused(serve: Callable[..., Live]) -> None:
    # Every fault's own message is tested in tests/test_snapshots.py; here, that each reaches the client.
    live, other = serve(), serve(snapshot_key="another-deployment:" + "ab" * 32)
    snapshot = live.generate("the ", max_tokens=5, seed=1, return_snapshot=True).complete.snapshot
    middle = len(snapshot) // 2
    flipped_payload = snapshot[:middle] + bytes([snapshot[middle] ^ 0x01]) + snapshot[middle + 1 :]
    flipped_tag = snapshot[:-1] + bytes([snapshot[-1] ^ 0x80])
    bad = {
        "flipped payload byte": (live, flipped_payload),
        "flipped tag byte": (live, flipped_tag),
        "truncated": (live, snapshot[:-10]),
        "half": (live, snapshot[:middle]),
        "garbage": (live, b"\xff" * 40),
        "another key": (other, snapshot),
    }
    for what, (server, blob) in bad.items():
        for err in (
            rpc_error(server.generate, "a", snapshot=blob, max_tokens=2),
            rpc_error(server.stub.CreateSession, pb.CreateSessionRequest(snapshot=blob), timeout=CALL_TIMEOUT),
        ):
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert "snapshot" in err.details(), what
    assert live.generate("a", snapshot=snapshot, max_tokens=2).complete.generated_tokens == 2


# -- 8-10. Cancellation, deadlines, overload ----------------------------------------------------------------


def test_cancelled_stream_frees_its_slot(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=1, max_tokens_limit=LONG, stream_buffer_tokens=8)
    recorder = live.observe()
    call = live.stream("the ", max_tokens=LONG, temperature=1.0, seed=1)
    assert next(call).text
    call.cancel()
    assert call.code() == grpc.StatusCode.CANCELLED
    done = live.generate("the ", max_tokens=10)  # the only slot: this would wait forever if it leaked
    assert done.complete.finish_reason == pb.FINISH_REASON_LENGTH
    wait_until(lambda: live.engine.running == 0 and live.engine.idle, "engine idle")
    [cancelled] = [s for s in recorder.done if s.max_tokens == LONG]  # by identity, not by the order they ended
    assert cancelled.result is not None and isinstance(cancelled.result.error, CancelledError)
    assert cancelled.generated < LONG


def test_cancelled_call_leaves_its_session_unchanged(serve: Callable[..., Live]) -> None:
    live = serve(max_tokens_limit=LONG, stream_buffer_tokens=8)
    sid = live.stub.CreateSession(pb.CreateSessionRequest(seed=3), timeout=CALL_TIMEOUT).session_id
    live.generate("the ", session_id=sid, max_tokens=10, temperature=0.8)
    before = live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=CALL_TIMEOUT)
    call = live.stream("x", session_id=sid, max_tokens=LONG, temperature=0.8)
    assert next(call).text
    call.cancel()

    wait_until(lambda: not live.on_loop(lambda: live.server.app.sessions.get(sid).busy), "the session is released")
    later = dict(prompt=" q", max_tokens=20, temperature=0.8)
    assert live.generate(session_id=sid, **later).text == live.generate(session_id=before.session_id, **later).text


# A deadline long enough for a call to reach the server on a loaded machine (it must, to be ended there), a whole
# number of milliseconds so gRPC's timeout header carries it unrounded.
DEADLINE = 1.0


def test_deadline_ends_a_generation(serve: Callable[..., Live]) -> None:
    live = serve(max_tokens_limit=ENDLESS)
    recorder = live.observe()
    # Both run at once, and neither can end by length first, on any machine.
    unary = live.stub.Generate.future(pb.GenerateRequest(prompt="the ", max_tokens=ENDLESS), timeout=DEADLINE)
    stream = live.stream("the ", max_tokens=ENDLESS, timeout=DEADLINE)
    received: list[pb.GenerateStreamResponse] = []
    err = rpc_error(lambda: received.extend(stream))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert received and not received[-1].HasField("complete")  # it was generating when its deadline passed
    assert unary.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: len(recorder.done) == 2, "both generations retired")
    wait_until(lambda: live.engine.idle, "engine idle")
    for seq in recorder.done:
        assert seq.result is not None and isinstance(seq.result.error, DeadlineExceededError | CancelledError)
    assert live.generate("a", max_tokens=3).complete.generated_tokens == 3


def test_deadline_passes_while_queued(serve: Callable[..., Live]) -> None:
    # a buffer the blocker cannot fill during the test: it never pauses, so it keeps the only batch slot
    live = serve(max_batch_size=1, max_tokens_limit=LONG, stream_buffer_tokens=LONG)
    recorder = live.observe()
    gate = live.gate()
    try:
        blocker = live.stream("the ", max_tokens=LONG)
        gate.wait_entered()  # the blocker holds the only slot, and the engine is held still: nothing is admitted
        queued = live.stub.Generate.future(pb.GenerateRequest(prompt="a", max_tokens=3), timeout=DEADLINE)
        wait_until(lambda: live.engine.queued == 1, "the second request queued")
        assert queued.exception().code() == grpc.StatusCode.DEADLINE_EXCEEDED  # its deadline passed in the queue
    finally:
        gate.release()
    wait_until(lambda: len(recorder.done) == 1, "the expired request retired")
    assert live.engine.queued == 0
    [expired] = recorder.done
    assert expired.admitted == 0 and expired.generated == 0  # reaped from the queue, never run
    assert expired.result is not None and isinstance(expired.result.error, DeadlineExceededError | CancelledError)
    assert next(blocker).text  # the running stream goes on
    blocker.cancel()
    wait_until(lambda: live.engine.idle, "engine idle")


def test_full_queue_is_resource_exhausted(serve: Callable[..., Live]) -> None:
    # buffers no stream can fill during the test: the running one never pauses and keeps the only slot
    live = serve(max_batch_size=1, max_queue=1, max_tokens_limit=LONG, stream_buffer_tokens=LONG)
    calls = [live.stream("the ", max_tokens=LONG, seed=i) for i in range(3)]  # one running, one queued, one too many
    wait_until(lambda: any(c.done() for c in calls), "a call refused")
    refused = [c for c in calls if c.done()]
    assert len(refused) == 1 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in refused[0].details()
    assert live.engine.running == 1 and live.engine.queued == 1
    for c in calls:
        c.cancel()
    wait_until(lambda: live.engine.idle, "engine idle")
    assert live.generate("a", max_tokens=3).complete.finish_reason == pb.FINISH_REASON_LENGTH


# -- 11. Validation -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(served_bundle: Path) -> Iterator[Live]:
    server = start_server(served_bundle, max_tokens_limit=50, default_max_tokens=20, max_prompt_tokens=20)
    yield server
    server.close()


_INVALID = [
    (dict(temperature=101.0), "temperature"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=101.0), "repetition_penalty"),
    (dict(max_tokens=51), "max_tokens"),
    (dict(prompt="x" * 21), "prompt"),
    (dict(prompt="the \u2603"), "prompt"),
    (dict(stop=["ok", ""]), "stop[1]"),
    (dict(stop=["y"] * 17), "stop"),
    (dict(stop=["z" * 257]), "stop[0]"),
    (dict(session_id="abc", snapshot=b"xyz"), "session_id, snapshot"),
]


@pytest.mark.parametrize(
    ("fields", "named"),
    [pytest.param(f, n, id="-".join(f"{k}={v!r}"[:24] for k, v in f.items())) for f, n in _INVALID],
)
def test_invalid_generate_request_names_its_field(limited: Live, fields: dict[str, Any], named: str) -> None:
    for call in (limited.generate, limited.stream):
        err = rpc_error(call, **{"prompt": "the ", **fields})
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith(named), err.details()
    assert limited.engine.idle  # nothing was queued


def test_invalid_and_unknown_names(limited: Live) -> None:
    assert limited.generate("the ").complete.generated_tokens == 20  # max_tokens 0: the server's default
    assert limited.generate("x" * 20, max_tokens=50).complete.generated_tokens == 50  # both limits are inclusive
    err = rpc_error(limited.generate, "the \u2603", max_tokens=3)
    assert "U+2603" in err.details() and "offset 4" in err.details()

    for fn, request in (
        (limited.stub.Generate, pb.GenerateRequest(model="nope", prompt="a")),
        (limited.stub.Score, pb.ScoreRequest(model="nope", text="a")),
        (limited.stub.GetModel, pb.GetModelRequest(model="nope")),
        (limited.stub.CreateSession, pb.CreateSessionRequest(model="nope")),
        (limited.stub.Generate, pb.GenerateRequest(session_id="no-such-session", prompt="a")),
        (limited.stub.ForkSession, pb.ForkSessionRequest(session_id="no-such-session")),
        (limited.stub.CloseSession, pb.CloseSessionRequest(session_id="no-such-session")),
    ):
        err = rpc_error(fn, request, timeout=CALL_TIMEOUT)
        assert err.code() == grpc.StatusCode.NOT_FOUND, request
        assert "nope" in err.details() or "no-such-session" in err.details()
    err = rpc_error(limited.stream, "a", model="nope")
    assert err.code() == grpc.StatusCode.NOT_FOUND

    for request, named in (
        (pb.ScoreRequest(text=""), "text"),
        (pb.ScoreRequest(text="x" * 21), "text"),
        (pb.ScoreRequest(text="a\u2603"), "text"),
    ):
        err = rpc_error(limited.stub.Score, request, timeout=CALL_TIMEOUT)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(named)
    sid = limited.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id
    err = rpc_error(limited.generate, "a", session_id=sid, model="other")
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("model")
    for prompt in ("\u2603", "x" * 21):
        err = rpc_error(limited.generate, prompt, session_id=sid)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("prompt")
    assert limited.generate("a", session_id=sid, max_tokens=2).complete.generated_tokens == 2  # not left busy


# -- 12. Draining and health ----------------------------------------------------------------------------------


def test_health_reports_serving(live: Live) -> None:
    for service in ("", "textgen.v1.TextGeneration", f"models/{MODEL}"):
        assert live.check(service) == SERVING
    err = rpc_error(live.health.Check, health_pb2.HealthCheckRequest(service="models/nope"), timeout=CALL_TIMEOUT)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_drain_refuses_new_calls_and_finishes_running_ones(serve: Callable[..., Live]) -> None:
    live = serve()
    request = dict(prompt="the ", max_tokens=50, temperature=0.8, seed=5)
    expected = live.generate(**request).text
    gate = live.gate()
    try:
        call = live.stream(**request)
        gate.wait_entered()  # the stream is in flight
        live.on_loop(live.server.app.drain)
        for fn in (
            lambda: live.generate("a", max_tokens=2),
            lambda: live.stream("a", max_tokens=2),
            lambda: live.stub.Score(pb.ScoreRequest(text="a"), timeout=CALL_TIMEOUT),
            lambda: live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT),
        ):
            err = rpc_error(fn)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
        assert live.engine.running == 1
    finally:
        gate.release()
    text, last = stream_text(call)
    assert text == expected and last.complete.finish_reason == pb.FINISH_REASON_LENGTH


def test_graceful_shutdown_lets_a_running_stream_finish(serve: Callable[..., Live]) -> None:
    live = serve()
    assert live.check("") == SERVING
    gate = live.gate()
    stopping = threading.Thread(target=live.server.stop, kwargs={"grace": CALL_TIMEOUT})
    try:
        call = live.stream("to be", max_tokens=30, temperature=0.5, seed=2)
        gate.wait_entered()
        stopping.start()
        wait_until(lambda: live.server.app.draining, "the server drains")
        assert live.check("") == NOT_SERVING and live.check(f"models/{MODEL}") == NOT_SERVING
        err = rpc_error(live.generate, "a", max_tokens=2)
        assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        gate.release()
    text, last = stream_text(call)
    assert len(text) == 30 and last.complete.finish_reason == pb.FINISH_REASON_LENGTH
    stopping.join(CALL_TIMEOUT)
    assert not stopping.is_alive()


def test_shutdown_past_the_grace_period_cancels_streams(serve: Callable[..., Live]) -> None:
    # Two streams that cannot end by length (ENDLESS) are still there when the grace period ends, however fast the
    # machine: one whose reader stopped (paused), one read as it comes. Both get the whole grace period, then are
    # cancelled. Both use small-window connections: the first really pauses, and the second's final message is
    # never more than ~1 KB behind its reader.
    grace = 0.2
    live = serve(max_tokens_limit=ENDLESS, stream_buffer_tokens=8)
    recorder = live.observe()
    stalled = live.stream("to be", max_tokens=ENDLESS, small_window=True)
    assert next(stalled).text
    wait_until(lambda: recorder.started[0].paused, "the stream whose reader stopped is paused")
    call = live.stream("the ", max_tokens=ENDLESS, small_window=True)
    received: list[pb.GenerateStreamResponse] = []
    reader = threading.Thread(target=lambda: received.extend(call))
    reader.start()
    wait_until(lambda: len(received) > 0, "the other stream started")
    stopping = time.monotonic()
    live.server.stop(grace=grace)
    assert time.monotonic() - stopping >= grace
    reader.join(CALL_TIMEOUT)
    assert not reader.is_alive()
    last = received[-1]
    assert last.complete.finish_reason == pb.FINISH_REASON_CANCELLED
    assert 0 < last.complete.generated_tokens < ENDLESS
    assert [s.result.finish for s in recorder.done if s.result] == [Finish.CANCELLED] * 2
    stalled.cancel()


# -- 13. Empty prompt and model facts ----------------------------------------------------------------------


def test_empty_prompt_starts_from_the_start_token(
    live: Live, reference: tuple[RNNLanguageModel, TextTokenizer]
) -> None:
    empty = live.generate("", max_tokens=40, temperature=0)
    assert empty.complete.prompt_tokens == 1
    assert empty.text == reference_text(reference, "", 40, temperature=0.0)
    assert empty.text == live.generate("\n", max_tokens=40, temperature=0).text
    sampled = live.generate("", max_tokens=40, temperature=1.0, seed=8)
    assert sampled.text == reference_text(reference, "", 40, 8, temperature=1.0)


def test_list_and_get_model(live: Live, reference: tuple[RNNLanguageModel, TextTokenizer]) -> None:
    model, tokenizer = reference
    listed = live.stub.ListModels(pb.ListModelsRequest(), timeout=CALL_TIMEOUT).models
    assert [m.name for m in listed] == [MODEL]
    info = listed[0]
    cfg = model.config
    assert (info.name, info.version, info.cell, info.level, info.precision) == (MODEL, "1", "lstm", "char", "fp32")
    assert (info.num_layers, info.hidden_size) == (cfg.num_layers, cfg.hidden_size)
    assert info.vocab_size == tokenizer.vocab_size == cfg.vocab_size
    assert info.state_bytes == len(cfg.state_names) * cfg.num_layers * cfg.hidden_size * 4
    assert "CPUExecutionProvider" in info.execution_providers
    assert info.training_steps > 0 and info.val_loss > 0 and "rejected" in info.unknown_token_policy
    assert json.loads(info.manifest_json)["name"] == MODEL
    for name in ("", MODEL):
        assert live.stub.GetModel(pb.GetModelRequest(model=name), timeout=CALL_TIMEOUT) == info
