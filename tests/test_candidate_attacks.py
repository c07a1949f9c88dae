"""Attacks on candidates (GenerateRequest.n) against a real server: a unary reply too large for the transport,
clients that read nothing, candidates cancelled or expired while they wait for a slot, and candidates paused and
readmitted. Whatever happens, the client gets a status that says why, nothing stays held (slots, queue, counters,
sessions) and every candidate is still exactly the n = 1 request with its seed."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from textgen.client import gather
from textgen.v1 import textgen_pb2 as pb

from live_server import ENDLESS, Live, rpc_error, wait_until

PROMPT = "the quick "


def settled(live: Live) -> bool:
    """Nothing held: no slot, no queued sequence, no candidate waiting for its leader, no paused stream."""
    engine = live.engine
    return engine.idle and engine.running == 0 and engine.queued == 0 and engine.paused == 0


def requests(live: Live, method: str, code: str) -> float:
    labels = {"method": method, "model": "tiny", "code": code}
    return live.server.app.metrics.registry.get_sample_value("textgen_requests_total", labels) or 0.0


# -- a unary reply the transport cannot send ------------------------------------------------------------------


def test_a_unary_reply_over_the_message_limit_is_refused_naming_n(serve: Callable[..., Live]) -> None:
    # 4 candidates x 64 tokens x 20 alternatives: about 87 KB, over a 64 KiB send limit. gRPC itself would fail the
    # send (RESOURCE_EXHAUSTED "Sent message larger than max", a retryable-looking status) after the call had been
    # counted OK; the server says why instead, and the same request streams (each message is small).
    live = serve(max_message_bytes=1 << 16)
    fields: dict[str, Any] = dict(n=4, seed=3, max_tokens=64, top_logprobs=20, return_token_ids=True)
    err = rpc_error(live.generate, PROMPT, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith("n: ") and "max_message_bytes" in err.details()
    assert requests(live, "Generate", "OK") == 0 and requests(live, "Generate", "INVALID_ARGUMENT") == 1
    streamed = gather(live.stream(PROMPT, **fields))
    assert [c.complete.generated_tokens for c in streamed] == [64] * 4
    assert all(len(c.logprobs) == 64 and len(c.logprobs[0].top_logprobs) == 20 for c in streamed)
    wait_until(lambda: settled(live), "nothing held")


def test_a_sessions_reply_too_large_to_send_leaves_it_unchanged(serve: Callable[..., Live]) -> None:
    # n = 1 in a session: a reply that is never delivered must not change the session (as at a deadline).
    live = serve(max_message_bytes=1 << 16)
    sid = live.stub.CreateSession(pb.CreateSessionRequest(seed=5), timeout=30).session_id
    err = rpc_error(live.generate, PROMPT, session_id=sid, max_tokens=256, top_logprobs=20)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("max_tokens: ")
    info = live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=30)
    assert info.token_count == 0  # unchanged, and free again
    assert live.generate("a", session_id=sid, max_tokens=3).complete.generated_tokens == 3


# -- clients that read nothing ------------------------------------------------------------------------------------


def test_an_unread_stream_pauses_every_candidate_and_holds_no_slot(serve: Callable[..., Live]) -> None:
    # 4 candidates on 4 slots; the client reads nothing: each candidate fills its own bounded buffer and pauses,
    # giving its slot back, so other requests run meanwhile; a cancel then frees everything.
    live = serve(max_batch_size=4, max_tokens_limit=ENDLESS, stream_buffer_tokens=8)
    recorder = live.observe()
    call = live.stream(PROMPT, n=4, max_tokens=ENDLESS, seed=1, small_window=True)
    wait_until(lambda: live.engine.paused == 4 and live.engine.running == 0, "every candidate paused")
    live_seqs = list(live.engine.scheduler.live.values())
    assert len(live_seqs) == 4 and all(s.buffered_tokens <= 8 for s in live_seqs)  # each within its own buffer
    assert live.generate("a", max_tokens=5).complete.generated_tokens == 5  # the slots are free for others
    call.cancel()
    wait_until(lambda: len([s for s in recorder.done if s.max_tokens == ENDLESS]) == 4, "every candidate ended")
    wait_until(lambda: settled(live), "nothing held")
    assert live.engine.state.free_slots == 4


def test_a_paused_and_readmitted_candidate_is_still_exact(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=4, stream_buffer_tokens=4)
    fields: dict[str, Any] = dict(n=3, seed=12, max_tokens=120, temperature=1.1, logprobs=True, return_token_ids=True)
    whole = live.generate(PROMPT, **fields).candidates
    call = live.stream(PROMPT, small_window=True, **fields)
    first = next(call)
    wait_until(lambda: live.engine.paused >= 1, "a candidate paused (its client reads nothing)")
    streamed = gather([first, *call])
    for s, w in zip(streamed, whole, strict=True):
        assert (s.text, list(s.token_ids), list(s.logprobs)) == (w.text, list(w.token_ids), list(w.logprobs))
        assert s.complete.finish_reason == pb.FINISH_REASON_LENGTH
    wait_until(lambda: settled(live), "nothing held")


# -- candidates waiting for a slot --------------------------------------------------------------------------------


def test_candidates_waiting_for_a_slot_end_on_cancel_and_deadline(serve: Callable[..., Live]) -> None:
    # Two slots: an endless stream holds one and the leader the other; its candidates queue for slots that never
    # come, until the call is cancelled or its deadline passes. The queue and every counter go back.
    live = serve(max_batch_size=2, max_queue=4, max_tokens_limit=ENDLESS, stream_buffer_tokens=ENDLESS)
    blocker = live.stream("the ", max_tokens=ENDLESS, seed=1)
    assert next(blocker).text
    for end in ("cancel", "deadline"):
        timeout = 2.0 if end == "deadline" else 30.0
        call = live.stream(PROMPT, n=4, max_tokens=ENDLESS, seed=2, timeout=timeout)
        assert next(call).index == 0  # the leader runs; its three candidates wait at the front of the queue
        wait_until(lambda: live.engine.queued == 3 and live.engine.scheduler.unforked == 0, "candidates queued")
        if end == "cancel":
            call.cancel()
        err = rpc_error(lambda c=call: list(c))
        expected = grpc.StatusCode.CANCELLED if end == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
        assert err.code() == expected
        wait_until(lambda: live.engine.queued == 0 and live.engine.running == 1, f"candidates gone ({end})")
    blocker.cancel()
    wait_until(lambda: settled(live), "nothing held")
    assert live.engine.state.free_slots == 2


# -- the leader's prompt, sessions, metrics -----------------------------------------------------------------------


def test_a_call_cancelled_inside_its_chunked_prompt_ends_every_candidate(serve: Callable[..., Live]) -> None:
    live = serve(prefill_chunk_tokens=4)
    recorder = live.observe()
    gate = live.gate()
    call = live.stream(PROMPT * 8, n=5, max_tokens=5)  # the leader's prompt runs in 20 chunks
    gate.wait_entered()  # held inside its first chunk: the leader holds a slot, its candidates wait for it
    assert live.engine.running == 1 and live.engine.scheduler.unforked == 4
    call.cancel()
    wait_until(lambda: live.engine.scheduler.prefill[0].cancel_reason is not None, "the server saw the cancel")
    gate.release()
    wait_until(lambda: len(recorder.done) == 5, "every candidate ended")
    wait_until(lambda: settled(live), "nothing held")
    assert live.engine.scheduler.unforked == 0 and len(recorder.started) == 1  # no candidate ever took a slot


def test_a_session_is_busy_while_its_candidates_run_and_unchanged_when_cancelled(serve: Callable[..., Live]) -> None:
    live = serve(max_tokens_limit=ENDLESS)
    sid = live.stub.CreateSession(pb.CreateSessionRequest(seed=2), timeout=30).session_id
    call = live.stream(PROMPT, n=3, session_id=sid, max_tokens=ENDLESS)
    started: set[int] = set()
    while len(started) < 3:  # every candidate running
        started.add(next(call).index)
    err = rpc_error(live.generate, "a", session_id=sid, max_tokens=2)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "already generating" in err.details()
    call.cancel()
    wait_until(lambda: settled(live), "nothing held")
    assert live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=30).token_count == 0
    assert live.generate("a", session_id=sid, max_tokens=2).complete.generated_tokens == 2


def test_one_call_counted_once_its_prompt_once_and_every_candidates_tokens(serve: Callable[..., Live]) -> None:
    live = serve()
    registry = live.server.app.metrics.registry

    def value(name: str) -> float:
        return registry.get_sample_value(name, {"model": "tiny"}) or 0.0

    before = value("textgen_prompt_tokens_total"), value("textgen_generated_tokens_total")
    reply = live.generate(PROMPT, n=3, seed=1, max_tokens=7)
    prompt = reply.candidates[0].complete.prompt_tokens
    after = value("textgen_prompt_tokens_total"), value("textgen_generated_tokens_total")
    assert (after[0] - before[0], after[1] - before[1]) == (prompt, 3 * 7)
    assert requests(live, "Generate", "OK") == 1


def test_each_candidate_counts_against_max_concurrent_rpcs(serve: Callable[..., Live]) -> None:
    # Each candidate holds a stream buffer (paused or not) as a call does: n candidates count n calls, so clients
    # that read nothing cannot hold n times the buffered memory the call limit allows.
    live = serve(max_concurrent_rpcs=4, max_tokens_limit=ENDLESS, stream_buffer_tokens=8)
    servicer = live.server.server.servicer
    call = live.stream(PROMPT, n=3, max_tokens=ENDLESS, seed=1, small_window=True)
    wait_until(lambda: servicer.in_progress == 3, "the call counted as its 3 candidates")
    err = rpc_error(live.generate, PROMPT, n=2, max_tokens=3)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.details()
    assert "limit 4; this one counts 2, one per candidate" in err.details()
    assert live.generate(PROMPT, max_tokens=3).complete.generated_tokens == 3  # one more call fits
    assert rpc_error(live.generate, PROMPT, n=99).code() == grpc.StatusCode.INVALID_ARGUMENT  # named, not busy
    call.cancel()
    wait_until(lambda: servicer.in_progress == 0 and settled(live), "nothing held")
