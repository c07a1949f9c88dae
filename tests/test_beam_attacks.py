"""Attacks on beam search through a real server (GenerateRequest.num_beams; the search itself is
tests/test_beam_search.py, its ordinary use tests/test_beam_generate.py): a beam too large for one message, and a
long search beside a keyboard's Predict calls on the same model."""

from __future__ import annotations

from collections.abc import Callable

import grpc
from test_beam_generate import PROMPT, _running_search, _searched

from textgen.client import gather
from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, ENDLESS, MODEL, Live, rpc_error, wait_until

SMALLEST_MESSAGE = 1 << 16  # the least max_message_bytes a server takes


def test_a_beam_over_max_message_bytes_streams_in_several_messages(serve: Callable[..., Live]) -> None:
    """A stream sends a beam when the search ends: a beam of 600 tokens with 20 alternatives each is about 200 KB,
    which was one message over the server's limit (RESOURCE_EXHAUSTED 'Sent message larger than max', while the
    unary call's refusal said to stream it). It comes in several messages, each within the limit."""
    live = serve(max_tokens_limit=ENDLESS, max_message_bytes=SMALLEST_MESSAGE)
    fields = {"num_beams": 2, "max_tokens": 600, "top_logprobs": 20}
    err = rpc_error(lambda: live.generate(PROMPT, n=2, **fields))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(("n:", "num_beams:"))
    assert "GenerateStream" in err.details()
    messages = list(live.stream(PROMPT, n=2, return_token_ids=True, **fields))
    assert all(m.ByteSize() <= SMALLEST_MESSAGE for m in messages)
    for index in (0, 1):
        mine = [m for m in messages if m.index == index]
        assert len(mine) > 1
        assert [m.HasField("complete") for m in mine] == [False] * (len(mine) - 1) + [True]  # complete comes last
        assert [bool(m.model_version) for m in mine] == [True] + [False] * (len(mine) - 1)  # once, first
    want = _searched(live, **fields)
    got = gather(messages)
    assert [c.text for c in got] == [b.text for b in want]
    assert [list(c.token_ids) for c in got] == [b.token_ids for b in want]
    assert [len(c.logprobs) for c in got] == [600, 600]
    assert all(len(t.top_logprobs) == 20 for c in got for t in c.logprobs)


def test_a_predict_is_answered_while_a_search_runs(serve: Callable[..., Live]) -> None:
    """A search holds its worker for up to max_tokens graph calls (8 beams x 4,096 tokens of the tiny test model:
    1.45 s, and far longer on a real one); a keyboard's Predict on the same model waited behind all of it. Searches
    and predictions have separate workers: a Predict is answered while a search that cannot end by itself runs."""
    live = serve(max_tokens_limit=ENDLESS, max_queue=0)
    call = _running_search(live)
    try:
        reply = live.stub.Predict(pb.PredictRequest(text="the qu", num_predictions=3), timeout=CALL_TIMEOUT)
        assert reply.predictions
        assert not call.done()  # the search still runs
    finally:
        call.cancel()
    app = live.server.app
    wait_until(lambda: app.predictor.idle and not app.busy, "the workers idle")
    assert app.predictor.workers.running(MODEL) is None


def test_a_queued_search_cancelled_before_it_starts_holds_nothing(serve: Callable[..., Live]) -> None:
    """A search waiting behind another is dropped from the queue when its client cancels; once the running one is
    cancelled too, the workers are idle and a session the queued one held is released unchanged."""
    live = serve(max_tokens_limit=ENDLESS)
    app = live.server.app
    session = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id
    running = _running_search(live)
    queued = live.stub.Generate.future(
        pb.GenerateRequest(prompt=PROMPT, num_beams=2, max_tokens=4, session_id=session), timeout=CALL_TIMEOUT
    )
    wait_until(lambda: live.on_loop(lambda: app.sessions.get(session).busy), "the queued search holding its session")
    assert not app.predictor.idle
    queued.cancel()
    wait_until(lambda: live.on_loop(lambda: not app.sessions.get(session).busy), "the session released")
    assert not running.done()  # the running search goes on
    running.cancel()
    wait_until(lambda: app.predictor.idle and not app.busy, "the workers idle")
    assert live.on_loop(lambda: app.sessions.get(session).context.token_count) == 0


def test_banning_every_token_is_refused_naming_the_field(serve: Callable[..., Live]) -> None:
    # Nothing could be generated: sampling would return excluded tokens, a beam search no candidate at all.
    live = serve()
    everything = list(range(live.engine.model.vocab_size))
    for fields in ({}, {"num_beams": 2}):
        err = rpc_error(live.generate, "the ", max_tokens=3, banned_token_ids=everything, **fields)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.details().startswith("banned_token_ids: bans every token")
