"""Candidates (GenerateRequest.n) against a real server: each candidate is exactly the n = 1 request with its seed
(alone and batched with other traffic), streams tag and order each candidate's messages, Generate returns them in
``candidates``, cumulative_logprob sums the returned log-probabilities, a session is read but never changed,
every candidate's snapshot continues exactly, invalid requests are refused naming their field, and however a call
ends (cancelled before or after its prompt ran, shut down) every candidate ends and nothing stays held."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service.sequence import Finish
from textgen.client import Client, gather
from textgen.errors import CancelledError
from textgen.failover import Failover, Interrupted
from textgen.sampling import candidate_seed
from textgen.v1 import textgen_pb2 as pb

from live_server import ENDLESS, Live, rpc_error, start_server, wait_until

PROMPT = "the quick "
# A seeded sampling mix: every candidate must still be the n = 1 request with its seed.
MIX: dict[str, Any] = dict(
    max_tokens=30,
    temperature=1.2,
    top_k=20,
    top_p=0.95,
    repetition_penalty=1.1,
    presence_penalty=0.3,
    frequency_penalty=0.2,
)


@pytest.fixture(scope="module")
def live(served_bundle: Path) -> Iterator[Live]:
    server = start_server(served_bundle)
    yield server
    server.close()


def same(candidate: pb.Candidate, single: pb.GenerateResponse) -> None:
    """``candidate`` is exactly ``single``'s text, tokens, log-probabilities and ending."""
    assert candidate.text == single.text
    assert list(candidate.token_ids) == list(single.token_ids)
    assert list(candidate.logprobs) == list(single.logprobs)
    a, b = candidate.complete, single.complete
    assert (a.finish_reason, a.stop, a.generated_tokens, a.prompt_tokens, a.seed) == (
        b.finish_reason,
        b.stop,
        b.generated_tokens,
        b.prompt_tokens,
        b.seed,
    )
    assert a.cumulative_logprob == b.cumulative_logprob


def a_stop_for_some(texts: list[str]) -> str:
    """A two-character string found in some of ``texts`` but not all."""
    for text in texts:
        for i in range(len(text) - 1):
            found = sum(text[i : i + 2] in t for t in texts)
            if 0 < found < len(texts):
                return text[i : i + 2]
    raise AssertionError(f"no stop string tells these apart: {texts}")


# -- each candidate is the n = 1 request with its seed ---------------------------------------------------------


def test_each_candidate_is_the_single_request_with_its_seed(live: Live) -> None:
    free = live.generate(PROMPT, n=6, seed=11, **MIX).candidates
    stop = a_stop_for_some([c.text for c in free])
    fields = dict(MIX, stop=[stop], logprobs=True, return_token_ids=True)
    reply = live.generate(PROMPT, n=6, seed=11, **fields)
    assert not reply.text and not reply.logprobs and not reply.token_ids and not reply.HasField("complete")
    assert [c.index for c in reply.candidates] == list(range(6))
    assert [c.complete.index for c in reply.candidates] == list(range(6))
    assert [c.complete.seed for c in reply.candidates] == [candidate_seed(11, i) for i in range(6)]
    assert candidate_seed(11, 0) == 11
    assert len({c.text for c in reply.candidates}) > 1
    for candidate, before in zip(reply.candidates, free, strict=True):
        same(candidate, live.generate(PROMPT, seed=candidate.complete.seed, **fields))
        # a stop string changes nothing but where a candidate ends
        assert candidate.text == before.text.split(stop)[0]
        stopped = stop in before.text
        assert candidate.complete.finish_reason == (pb.FINISH_REASON_STOP if stopped else pb.FINISH_REASON_LENGTH)
    reasons = {c.complete.finish_reason for c in reply.candidates}
    assert reasons == {pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH}


def test_an_unseeded_request_reports_every_candidates_seed(live: Live) -> None:
    reply = live.generate(PROMPT, n=3, **MIX)
    seed = reply.candidates[0].complete.seed
    assert [c.complete.seed for c in reply.candidates] == [candidate_seed(seed, i) for i in range(3)]
    for c in reply.candidates:
        assert c.text == live.generate(PROMPT, seed=c.complete.seed, **MIX).text


def test_candidates_are_exact_batched_with_other_traffic(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=16, prefill_chunk_tokens=4)  # the shared prompt runs in chunks, beside others
    fields = dict(MIX, logprobs=True, return_token_ids=True)
    others = [dict(prompt="to be or ", max_tokens=10 + 5 * i, temperature=0.8, seed=100 + i) for i in range(5)]
    alone = [live.generate(PROMPT, seed=candidate_seed(5, i), **fields) for i in range(4)]
    others_alone = [live.generate(**r).text for r in others]
    recorder = live.observe()
    requests = [others[0], dict(prompt=PROMPT, n=4, seed=5, **fields), *others[1:]]
    messages = live.batched(requests, queued=4 + 4)  # the four candidates and four other requests
    for candidate, single in zip(gather(messages[1]), alone, strict=True):
        same(candidate, single)
    assert ["".join(m.text for m in got) for got in messages[:1] + messages[2:]] == others_alone
    assert max(recorder.decode_batches) >= 6  # the candidates really shared steps with the others


# -- transport ------------------------------------------------------------------------------------------------


def test_a_stream_tags_orders_and_ends_each_candidate(live: Live) -> None:
    fields = dict(MIX, seed=3, logprobs=True, return_token_ids=True)
    messages = list(live.stream(PROMPT, n=4, **fields))
    by_index: dict[int, list[pb.GenerateStreamResponse]] = {}
    for m in messages:
        by_index.setdefault(m.index, []).append(m)
    assert sorted(by_index) == [0, 1, 2, 3]
    for index, got in by_index.items():
        assert [m.HasField("complete") for m in got] == [False] * (len(got) - 1) + [True]  # one, the last
        assert got[-1].complete.index == index
        assert got[0].model_version == live.engine.model.version
        assert not any(m.model_version for m in got[1:])
    assert sum(m.HasField("complete") for m in messages) == 4 and messages[-1].HasField("complete")
    unary = live.generate(PROMPT, n=4, **fields).candidates
    assert len(unary) == 4
    for streamed, whole in zip(gather(messages), unary, strict=True):
        assert streamed.text == whole.text and list(streamed.token_ids) == list(whole.token_ids)
        assert list(streamed.logprobs) == list(whole.logprobs)
    with Client(f"127.0.0.1:{live.server.port}", timeout=30) as client:  # the client reads to the last candidate
        assert [c.text for c in gather(client.stream(PROMPT, n=4, **fields))] == [c.text for c in unary]
        assert [c.text for c in client.generate(PROMPT, n=4, **fields).candidates] == [c.text for c in unary]


def test_one_candidate_is_reported_as_before(live: Live) -> None:
    for n in (0, 1):
        reply = live.generate(PROMPT, n=n, seed=4, **MIX)
        assert reply.text and not reply.candidates
        assert reply.complete.index == 0 and not reply.complete.HasField("cumulative_logprob")
        [last] = [m for m in live.stream(PROMPT, n=n, seed=4, **MIX) if m.HasField("complete")]
        assert last.index == 0


def test_a_failed_over_stream_reports_the_whole_cumulative_logprob(live: Live) -> None:
    # A resumed call sums only the tokens it generates; the failover client adds what it had received before.
    state = Failover.prepare(pb.GenerateRequest(prompt=PROMPT, seed=9, logprobs=True, **MIX))
    whole = list(live.stub.GenerateStream(state.request, timeout=30))
    for m in whole[:12]:
        state.receive(m)
    resumed = state.next_request(Interrupted())
    assert resumed is not None
    rest = [state.receive(m)[0] for m in live.stub.GenerateStream(resumed[0], timeout=30)]
    expected = whole[-1].complete.cumulative_logprob
    assert rest[-1] is not None and rest[-1].complete.cumulative_logprob == pytest.approx(expected, abs=1e-9)
    assert not Failover.prepare(pb.GenerateRequest(n=2, seed=1)).enabled  # candidates are not failed over


def test_cumulative_logprob_sums_the_returned_logprobs(live: Live) -> None:
    with_logprobs = live.generate(PROMPT, n=3, seed=8, logprobs=True, **MIX).candidates
    without = live.generate(PROMPT, n=3, seed=8, **MIX).candidates
    for c, bare in zip(with_logprobs, without, strict=True):
        assert c.complete.HasField("cumulative_logprob") and len(c.logprobs) == c.complete.generated_tokens
        assert c.complete.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in c.logprobs), abs=1e-5)
        assert not bare.logprobs and bare.complete.cumulative_logprob == c.complete.cumulative_logprob
    single = live.generate(PROMPT, seed=8, logprobs=True, **MIX)
    assert single.complete.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in single.logprobs), abs=1e-5)


# -- sessions and snapshots -----------------------------------------------------------------------------------


def test_a_session_is_read_but_never_changed(live: Live) -> None:
    sid = live.stub.CreateSession(pb.CreateSessionRequest(seed=21), timeout=30).session_id
    twins = [live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=30).session_id for _ in range(3)]
    reply = live.generate("the ", n=3, session_id=sid, max_tokens=12, return_snapshot=True)
    info = live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), timeout=30)
    assert info.token_count == 0  # unchanged: nothing was committed
    for c in reply.candidates:
        assert c.complete.session_id == sid and c.complete.snapshot
    # candidate 0 continues the session's generator, as an n = 1 call does; the others are reseeded
    assert reply.candidates[0].text == live.generate("the ", session_id=twins[0], max_tokens=12).text
    reseeded = live.generate("the ", session_id=twins[1], max_tokens=12, seed=reply.candidates[2].complete.seed)
    assert reseeded.text == reply.candidates[2].text
    for _ in range(20):  # a client that asks again the moment it reads the last final message finds it free
        finals = 0
        for m in live.stream("b", n=2, session_id=sid, max_tokens=2):
            finals += m.HasField("complete")
            if finals == 2:
                break  # (before the call's status arrives)
    # the session goes on as if the n > 1 calls had never happened (as its untouched twin does)
    assert (
        live.generate("a", session_id=sid, max_tokens=12).text
        == live.generate("a", session_id=twins[2], max_tokens=12).text
    )


def test_every_candidates_snapshot_continues_exactly(live: Live) -> None:
    reply = live.generate(PROMPT, n=3, seed=30, max_tokens=10, return_snapshot=True)
    for c in reply.candidates:
        single = live.generate(PROMPT, seed=c.complete.seed, max_tokens=10, return_snapshot=True)
        assert single.text == c.text
        after = live.generate("x", snapshot=c.complete.snapshot, max_tokens=15)
        assert after.text == live.generate("x", snapshot=single.complete.snapshot, max_tokens=15).text
    # a snapshot as input, with n > 1: candidate 0 continues its generator, as n = 1 does
    snapshot = reply.candidates[1].complete.snapshot
    more = live.generate("y", snapshot=snapshot, n=2, max_tokens=15).candidates
    assert more[0].text == live.generate("y", snapshot=snapshot, max_tokens=15).text
    assert more[1].text == live.generate("y", snapshot=snapshot, max_tokens=15, seed=more[1].complete.seed).text


# -- validation and accounting --------------------------------------------------------------------------------


def test_invalid_requests_are_refused_naming_the_field(serve: Callable[..., Live]) -> None:
    live = serve(max_candidates=4, max_batch_size=2, max_queue=1)
    err = rpc_error(live.generate, PROMPT, n=5)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("n: 5") and "4" in err.details()
    err = rpc_error(live.generate, PROMPT, n=4)  # more than the server can ever hold (batch 2 + queue 1)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("n: 4")
    resume = pb.Resume(token_ids=[], text_chars=0)
    err = rpc_error(lambda: list(live.stream(PROMPT, n=2, seed=1, resume=resume)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("resume:")
    assert live.engine.idle


def test_the_queue_counts_every_candidate(serve: Callable[..., Live]) -> None:
    # the running stream never pauses (its buffer outlasts the test) and keeps the only slot
    live = serve(max_batch_size=1, max_queue=3, max_tokens_limit=ENDLESS, stream_buffer_tokens=ENDLESS)
    blocker = live.stream("the ", max_tokens=ENDLESS, seed=1)
    assert next(blocker).text
    err = rpc_error(live.generate, PROMPT, n=4, max_tokens=3)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "needs 4" in err.details()
    queued = live.stream(PROMPT, n=3, max_tokens=3)
    wait_until(lambda: live.engine.queued == 3, "the three candidates queued")
    assert rpc_error(live.generate, "a", max_tokens=3).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    blocker.cancel()
    assert sum(m.HasField("complete") for m in queued) == 3  # one slot: the candidates ran one after another
    wait_until(lambda: live.engine.idle and live.engine.running == 0 and live.engine.queued == 0, "engine idle")


# -- however a call ends, every candidate ends ----------------------------------------------------------------


def test_a_cancelled_stream_ends_every_candidate(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=4, max_tokens_limit=ENDLESS)
    recorder = live.observe()
    free = live.engine.state.free_slots
    call = live.stream(PROMPT, n=3, max_tokens=ENDLESS, seed=2)
    started: set[int] = set()
    for m in call:
        started.add(m.index)
        if len(started) == 3:
            break
    call.cancel()
    wait_until(lambda: len(recorder.done) == 3, "every candidate ended")
    wait_until(lambda: live.engine.idle and live.engine.running == 0 and live.engine.queued == 0, "engine idle")
    assert all(s.result is not None and isinstance(s.result.error, CancelledError) for s in recorder.done)
    assert live.engine.state.free_slots == free  # every slot back


def test_candidates_waiting_for_their_prompt_end_with_it(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=4)
    recorder = live.observe()
    gate = live.gate()
    blocker = live.stream("a", max_tokens=3)  # held in its prompt's graph call
    gate.wait_entered()
    call = live.stream(PROMPT, n=3, max_tokens=5)
    wait_until(lambda: live.engine.queued == 3, "the request and its two other candidates queued")
    call.cancel()
    waiting = live.engine.scheduler.waiting
    wait_until(lambda: all(s.cancel_reason for s in waiting), "the server saw the cancel (its prompt never ran)")
    gate.release()
    assert list(blocker)[-1].complete.finish_reason == pb.FINISH_REASON_LENGTH
    wait_until(lambda: len(recorder.done) == 4, "every sequence ended")
    wait_until(lambda: live.engine.idle and live.engine.running == 0 and live.engine.queued == 0, "engine idle")
    cancelled = [s for s in recorder.done if s.max_tokens == 5]
    assert len(cancelled) == 3 and all(isinstance(s.result.error, CancelledError) for s in cancelled if s.result)
    assert all(s.max_tokens != 5 for s in recorder.started)  # none of them ever got a slot


def test_shutdown_past_the_grace_period_cancels_every_candidate(serve: Callable[..., Live]) -> None:
    live = serve(max_tokens_limit=ENDLESS, stream_buffer_tokens=8)
    recorder = live.observe()
    call = live.stream(PROMPT, n=2, max_tokens=ENDLESS, small_window=True)
    received: list[pb.GenerateStreamResponse] = []
    reader = threading.Thread(target=lambda: received.extend(call))
    reader.start()
    wait_until(lambda: {m.index for m in received} == {0, 1}, "both candidates streaming")
    live.server.stop(grace=0.1)
    reader.join(30)
    assert not reader.is_alive()
    finals = [m.complete for m in received if m.HasField("complete")]
    assert sorted(c.index for c in finals) == [0, 1]
    assert all(c.finish_reason == pb.FINISH_REASON_CANCELLED for c in finals)
    assert [s.result.finish for s in recorder.done if s.result] == [Finish.CANCELLED] * 2


# -- the command line -----------------------------------------------------------------------------------------


def test_the_cli_prints_each_candidate_under_its_header(live: Live, tmp_path: Path) -> None:
    expected = live.generate(PROMPT, n=3, seed=6, max_tokens=12, return_snapshot=True).candidates
    command = [sys.executable, "-m", "textgen.cli", "generate", "--server", f"127.0.0.1:{live.server.port}"]
    command += ["--prompt", PROMPT, "--n", "3", "--seed", "6", "--max-tokens", "12"]
    command += ["--snapshot-out", str(tmp_path / "state")]
    out = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "".join(f"--- candidate {c.index}\n{PROMPT}{c.text}\n" for c in expected)
    summaries = [line for line in out.stderr.splitlines() if line.startswith("[candidate ")]
    assert [s.split(":")[0] for s in summaries] == ["[candidate 0", "[candidate 1", "[candidate 2"]
    for line, c in zip(summaries, expected, strict=True):
        assert f"seed {c.complete.seed};" in line
        continued = live.generate("x", snapshot=(tmp_path / f"state.{c.index}").read_bytes(), max_tokens=10)
        assert continued.text == live.generate("x", snapshot=c.complete.snapshot, max_tokens=10).text
