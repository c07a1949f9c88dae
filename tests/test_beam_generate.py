"""Beam search through the server (GenerateRequest.num_beams): its beams are the search's own
(``service.beam_search``, tested in tests/test_beam_search.py), deterministic under other traffic, best first, with
their finish reasons, snapshots and sessions; refusals name their fields; a cancelled search frees the worker; a
full worker queue refuses; the client and ``textgen generate --num-beams``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from test_resume_attacks import serve_bundle, word_bundle  # noqa: F401 (fixtures)

from service.beam_search import Beam, BeamParams, beam_search
from service.output import TokenText
from textgen.client import Client, gather
from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, ENDLESS, MODEL, Live, rpc_error, wait_until

PROMPT = "the quick"
STOP, LENGTH = pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    return serve(max_tokens_limit=ENDLESS)


def _beams(live: Live, prompt: str = PROMPT, **fields: Any) -> list[pb.Candidate]:
    reply = live.generate(prompt, **{"num_beams": 3, "n": 3, "max_tokens": 12, **fields})
    assert not reply.text and not reply.HasField("complete")  # beams come as candidates only
    return list(reply.candidates)


def _searched(live: Live, prompt: str = PROMPT, **fields: Any) -> list[Beam]:
    """What the search itself finds for the same request (on the server's model, on this thread)."""
    model = live.server.app.registry.get(MODEL)
    feed = model.tokenizer.encode(prompt).astype(np.int64)  # as the server feeds a prompt with no context
    seen = np.zeros(model.vocab_size, bool)
    seen[feed] = True
    params = BeamParams(**fields)
    return beam_search(model, TokenText(model.tokenizer), model.zero_state(1), feed, seen, params, lambda: None)


def test_beams_are_the_searchs_best_first(live: Live) -> None:
    got = _beams(live, num_beams=4, n=3, max_tokens=10, length_penalty=0.5, logprobs=True, return_token_ids=True)
    want = _searched(live, num_beams=4, max_tokens=10, length_penalty=0.5)[:3]
    assert [c.index for c in got] == [0, 1, 2]
    assert [c.text for c in got] == [b.text for b in want]
    assert [list(c.token_ids) for c in got] == [b.token_ids for b in want]
    scores = [c.complete.beam_score for c in got]
    assert scores == sorted(scores, reverse=True) and scores == pytest.approx([b.score for b in want], abs=1e-6)
    for c in got:
        done = c.complete
        assert done.index == c.index and done.finish_reason == LENGTH and done.generated_tokens == 10
        assert done.model == MODEL and done.prompt_tokens == len(PROMPT)
        assert done.cumulative_logprob == pytest.approx(sum(t.logprob for t in c.logprobs), abs=1e-4)
        # no controls: the search ranks the model's own log-probabilities
        assert done.beam_score == pytest.approx(done.cumulative_logprob / 10**0.5, abs=1e-4)


def test_a_search_is_the_same_under_other_traffic(live: Live) -> None:
    alone = _beams(live, num_beams=4, n=4, max_tokens=16)
    streams = [live.stream("to be", max_tokens=ENDLESS, seed=i) for i in range(3)]
    try:
        for s in streams:
            next(s)  # each stream is generating
        busy = _beams(live, num_beams=4, n=4, max_tokens=16)
    finally:
        for s in streams:
            s.cancel()
    assert [(c.text, c.complete.beam_score) for c in busy] == [(c.text, c.complete.beam_score) for c in alone]


def test_one_beam_means_sampling(live: Live) -> None:
    """num_beams 0 or 1 is no beam search (the proto's rule): one text, sampled as the request says."""
    one = live.generate(PROMPT, num_beams=1, max_tokens=12, temperature=0)
    plain = live.generate(PROMPT, max_tokens=12, temperature=0)
    assert one.text == plain.text and not one.candidates


def test_finish_reasons(live: Live) -> None:
    stopped = _beams(live, num_beams=3, n=3, max_tokens=40, stop=["o"], early_stopping=True)
    for c in stopped:
        assert c.complete.finish_reason == STOP and c.complete.stop == "o" and "o" not in c.text
    ids = _beams(live, num_beams=2, n=2, max_tokens=40, stop_token_ids=[int(_id(live, " "))], return_token_ids=True)
    for c in ids:
        assert c.complete.finish_reason == STOP and c.complete.stop_token_id == _id(live, " ")
        assert c.token_ids[-1] == _id(live, " ") and " " not in c.text
    for c in _beams(live, max_tokens=5):
        assert c.complete.finish_reason == LENGTH and c.complete.generated_tokens == 5 and len(c.text) == 5


def _id(live: Live, char: str) -> int:
    return int(live.server.app.registry.get(MODEL).tokenizer.encode(char)[0])


@pytest.mark.parametrize("early", [True, False])
def test_early_stopping_or_not_ends_as_the_search_does(live: Live, early: bool) -> None:
    stop = _id(live, " ")
    got = _beams(live, num_beams=3, n=3, max_tokens=60, stop_token_ids=[stop], early_stopping=early)
    want = _searched(live, num_beams=3, max_tokens=60, stop_ids=frozenset({stop}), early_stopping=early)
    assert [c.text for c in got] == [b.text for b in want]
    assert all(c.complete.finish_reason == STOP for c in got)


def test_the_stream_sends_each_beam_when_the_search_ends(live: Live) -> None:
    messages = list(live.stream(PROMPT, num_beams=3, n=2, max_tokens=12, logprobs=True))
    assert [m.index for m in messages] == [0, 1] and all(m.HasField("complete") for m in messages)
    reply = _beams(live, num_beams=3, n=2, max_tokens=12, logprobs=True)
    assert [(c.text, c.complete.beam_score) for c in gather(messages)] == [
        (c.text, c.complete.beam_score) for c in reply
    ]


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"num_beams": 9}, "num_beams"),
        ({"num_beams": 3, "n": 4}, "n"),
        ({"temperature": 0.5}, "temperature"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 3}, "top_k"),
        ({"top_p": 0.9}, "top_p"),
        ({"min_p": 0.1}, "min_p"),
        ({"seed": 7}, "seed"),
        ({"regex": "[a-z]+"}, "regex"),
        ({"choices": ["a", "b"]}, "choices"),
        ({"resume": pb.Resume(token_ids=[3])}, "resume"),
        ({"length_penalty": 10.5}, "length_penalty"),
        ({"length_penalty": -11}, "length_penalty"),
        ({"length_penalty": math.nan}, "length_penalty"),
    ],
)
def test_refusals_name_their_field(live: Live, fields: dict[str, Any], named: str) -> None:
    err = rpc_error(lambda: live.generate(PROMPT, **{"num_beams": 2, **fields}))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(named), err.details()


def _running_search(live: Live, **fields: Any) -> Any:
    """A search that cannot end by itself during a test (no stops, endless max_tokens), running on the worker."""
    call = live.stub.Generate.future(
        pb.GenerateRequest(prompt=PROMPT, num_beams=8, max_tokens=ENDLESS, **fields), timeout=CALL_TIMEOUT
    )
    workers = live.server.app.predictor.workers
    wait_until(lambda: workers.running(MODEL) is not None, "the search running on the worker")
    return call


def test_a_cancelled_search_frees_the_worker(live: Live) -> None:
    app = live.server.app
    call = _running_search(live)
    call.cancel()
    wait_until(lambda: app.predictor.idle and not app.busy, "the worker idle")
    assert call.cancelled()
    assert len(_beams(live, max_tokens=4)) == 3  # the next search runs


def test_an_expired_search_frees_the_worker(live: Live) -> None:
    err = rpc_error(lambda: live.generate(PROMPT, num_beams=8, max_tokens=ENDLESS, timeout=0.5))
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: live.server.app.predictor.idle and not live.server.app.busy, "the worker idle")


def test_a_session_is_held_for_the_search(live: Live) -> None:
    session = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id
    call = _running_search(live, session_id=session)
    try:
        err = rpc_error(lambda: live.generate(" ", session_id=session, max_tokens=1))
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    finally:
        call.cancel()
    app = live.server.app
    wait_until(lambda: live.on_loop(lambda: not app.sessions.get(session).busy), "the session released")
    assert live.on_loop(lambda: app.sessions.get(session).context.token_count) == 0


def test_a_full_queue_refuses(serve: Callable[..., Live]) -> None:
    live = serve(max_tokens_limit=ENDLESS, max_queue=0)
    call = _running_search(live)
    try:
        err = rpc_error(lambda: _beams(live, max_tokens=4))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.details()
    finally:
        call.cancel()
    wait_until(lambda: live.server.app.predictor.idle, "the worker idle")


def test_a_session_is_read_never_changed(live: Live) -> None:
    app = live.server.app
    session = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id
    live.generate("\n" + PROMPT, session_id=session, max_tokens=1, temperature=0)
    before = live.on_loop(lambda: app.sessions.get(session).context.token_count)
    beams = _beams(live, " ", session_id=session, num_beams=3, n=2, max_tokens=8)
    assert len(beams) == 2 and all(not c.complete.snapshot for c in beams)
    assert live.on_loop(lambda: app.sessions.get(session).context.token_count) == before
    assert not live.on_loop(lambda: app.sessions.get(session).busy)
    again = _beams(live, " ", session_id=session, num_beams=3, n=2, max_tokens=8)
    assert [c.text for c in again] == [c.text for c in beams]


def test_snapshots_in_and_out_continue_exactly(live: Live) -> None:
    head = live.generate("\nthe quick", max_tokens=1, temperature=0, return_snapshot=True)
    from_snapshot = _beams(live, " brown", snapshot=head.complete.snapshot, return_snapshot=True)
    whole = _beams(live, "\nthe quick" + head.text + " brown")
    assert [c.text for c in from_snapshot] == [c.text for c in whole]
    for c in from_snapshot:  # the state after the beam's text, its last token pending
        after = live.generate("", snapshot=c.complete.snapshot, max_tokens=15, temperature=0).text
        assert after == live.generate("\nthe quick" + head.text + " brown" + c.text, max_tokens=15, temperature=0).text


def test_a_word_models_beams_are_spaced_as_its_streams(
    serve_bundle: Callable[..., Live],  # noqa: F811
    word_bundle: Path,  # noqa: F811
) -> None:
    live = serve_bundle(word_bundle)
    tokenizer = live.server.app.registry.get(MODEL).tokenizer
    prompt = "the quick brown"
    beams = _beams(live, prompt, num_beams=3, n=3, max_tokens=6, return_token_ids=True, stop=["\n"])
    after = int(tokenizer.encode(prompt)[-1])
    for c in beams:
        text = "".join(tokenizer.pieces(c.token_ids, after))
        assert c.text == (text.split("\n")[0] if c.complete.finish_reason == STOP else text)
        assert not c.text or c.text.startswith(" ")  # the words after "brown", each with its leading space
    assert any(c.text for c in beams)
    greedy = live.generate(prompt, max_tokens=6, temperature=0, return_token_ids=True)
    one = _beams(live, prompt, num_beams=2, n=2, max_tokens=1, return_token_ids=True)
    assert one[0].token_ids == greedy.token_ids[:1]  # one step: the most likely token first


def test_client_and_cli(live: Live, capsys: pytest.CaptureFixture[str]) -> None:
    from textgen.cli import main

    with Client(f"127.0.0.1:{live.server.port}", timeout=CALL_TIMEOUT) as client:
        reply = client.generate(PROMPT, num_beams=3, n=2, max_tokens=10, length_penalty=0.0, early_stopping=True)
        # fewer continuations than n exist: the stream ends after the beams there are
        few = gather(client.stream(PROMPT, num_beams=3, n=3, max_tokens=1, allowed_token_ids=[_id(live, "e")]))
    assert len(reply.candidates) == 2
    assert [c.text for c in few] == ["e"]
    server = ["--server", f"127.0.0.1:{live.server.port}", "--timeout", str(CALL_TIMEOUT)]
    beams = ["--prompt", PROMPT, "--num-beams", "3", "--max-tokens", "10", "--length-penalty", "0", "--early-stopping"]
    assert main(["generate", *beams, "--n", "2", *server]) == 0
    out, err = capsys.readouterr()
    assert out == "".join(f"--- candidate {c.index}\n{PROMPT}{c.text}\n" for c in reply.candidates)
    assert err.count("beam score") == 2
    assert main(["generate", *beams, *server]) == 0  # the best beam alone
    assert capsys.readouterr().out == f"{PROMPT}{reply.candidates[0].text}\n"
    assert main(["generate", "--prompt", PROMPT, "--num-beams", "99", *server]) == 1
    assert "num_beams" in capsys.readouterr().err
