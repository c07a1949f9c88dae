"""Predict (issue 15): next words of a character model by beam search, next tokens of a word model, against a real
server. Its probabilities are checked against Score's, its snapshots and sessions against whole-text calls, and
a cancelled or expired call against the server's state afterwards."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_resume_attacks import serve_bundle, word_bundle  # noqa: F401 (fixtures)

from service.models import ServedModel
from textgen.client import Client
from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, MODEL, Live, rpc_error, wait_until

BOUNDARIES = (" ", "\n")  # the whitespace of the test corpus, so the char model's only word boundaries
# A context as Score sees one: Score feeds the start token ("\n" for a character model) before a text.
START = "\n"


@pytest.fixture
def live(serve: Callable[..., Live]) -> Live:
    return serve()


@pytest.fixture
def client(live: Live) -> Iterator[Client]:
    with Client(f"127.0.0.1:{live.server.port}", timeout=CALL_TIMEOUT) as c:
        yield c


def _word_logprob(client: Client, context: str, word: str) -> float:
    """log P(word, then any boundary | START + context) from Score's per-token log-probabilities."""
    parts = []
    for b in BOUNDARIES:
        tokens = client.score(context + word + b, token_logprobs=True).tokens
        parts.append(sum(t.logprob for t in tokens[len(context) :]))
    return float(math.log(sum(math.exp(p) for p in parts)))


def _assert_sorted(reply: pb.PredictResponse) -> None:
    logprobs = [p.logprob for p in reply.predictions]
    assert logprobs == sorted(logprobs, reverse=True)
    assert len({p.text for p in reply.predictions}) == len(logprobs)


@pytest.mark.parametrize("context", ["the quick ", "to be or not to ", "the qui", "a stitch in ti"])
def test_words_are_sorted_and_their_logprobs_are_scores(client: Client, context: str) -> None:
    reply = client.predict(START + context, num_predictions=5)
    assert reply.model == MODEL and reply.context_tokens == len(START + context)
    assert len(reply.predictions) == 5
    _assert_sorted(reply)
    for p in reply.predictions:
        assert not any(c.isspace() for c in p.text)
        assert len(p.token_ids) == len(p.text)
        assert p.logprob == pytest.approx(_word_logprob(client, context, p.text), abs=1e-4)


@pytest.mark.parametrize("context", ["the quick ", "def add(a, b):\n    ret", "to be or not "])
def test_the_top_word_is_greedy_generations_first_word(client: Client, context: str) -> None:
    greedy = client.generate(START + context, max_tokens=40, temperature=0).text
    first = re.split(r"\s", greedy, maxsplit=1)[0]  # the rest of the word, or the next word
    top = client.predict(START + context, num_predictions=3).predictions[0]
    assert top.text == first


def test_a_partial_word_is_completed_and_may_be_complete_already(client: Client) -> None:
    done = client.predict(START + "the quick brown fox jumps over the lazy dog", num_predictions=3)
    assert done.predictions[0].text == ""  # "dog" is a whole word: a boundary is the likeliest next
    assert done.predictions[0].token_ids == []
    rest = client.predict(START + "the quick bro").predictions[0]
    assert rest.text == "wn"


def test_tokens_are_one_softmax_row(client: Client) -> None:
    context = "the quick"
    reply = client.predict(START + context, num_predictions=4, unit="token")
    _assert_sorted(reply)
    assert len(reply.predictions) == 4 and reply.predictions[0].text == " "
    for p in reply.predictions:
        assert len(p.token_ids) == 1 and len(p.text) == 1
        scored = client.score(context + p.text, token_logprobs=True).tokens[-1]
        assert scored.token_id == p.token_ids[0]
        assert p.logprob == pytest.approx(scored.logprob, abs=1e-4)
    total = client.predict(START + context, num_predictions=20, unit="token").predictions
    assert sum(math.exp(p.logprob) for p in total) <= 1.0 + 1e-6


def test_max_word_chars_bounds_the_words(client: Client) -> None:
    reply = client.predict(START + "the ", num_predictions=5, max_word_chars=3)
    assert reply.predictions and all(len(p.text) <= 3 for p in reply.predictions)
    _assert_sorted(reply)


def _same(a: pb.PredictResponse, b: pb.PredictResponse) -> None:
    assert [p.text for p in a.predictions] == [p.text for p in b.predictions]
    for x, y in zip(a.predictions, b.predictions, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


def test_keystrokes_with_snapshots_predict_as_the_whole_text(client: Client) -> None:
    text = START + "to be or no"
    snapshot = b""
    for i, key in enumerate(text):
        reply = client.predict(key, snapshot=snapshot, return_snapshot=True, num_predictions=3)
        assert reply.context_tokens == 1 and reply.snapshot
        _same(reply, client.predict(text[: i + 1], num_predictions=3))
        snapshot = reply.snapshot
    # nothing new: the same predictions, and the snapshot continues into Generate as the whole prompt would
    _same(client.predict("", snapshot=snapshot), client.predict(text))
    after = client.generate("", snapshot=snapshot, max_tokens=20, temperature=0).text
    assert after == client.generate(text, max_tokens=20, temperature=0).text


def test_a_session_advances_by_each_text(live: Live, client: Client) -> None:
    session = client.create_session().session_id
    first = client.predict(START + "the qu", session_id=session)
    _same(first, client.predict(START + "the qu"))
    second = client.predict("ick ", session_id=session, return_snapshot=True)
    _same(second, client.predict(START + "the quick "))
    # the session holds the state after all but the last token, which is pending, as after a Generate
    assert live.on_loop(lambda: live.server.app.sessions.get(session).context.token_count) == len("\nthe quick ") - 1
    text = client.generate("", session_id=session, max_tokens=12, temperature=0).text
    assert text == client.generate(START + "the quick ", max_tokens=12, temperature=0).text


def test_a_word_model_predicts_tokens(serve_bundle: Callable[..., Live], word_bundle: Any) -> None:  # noqa: F811
    live = serve_bundle(word_bundle)
    with Client(f"127.0.0.1:{live.server.port}", timeout=CALL_TIMEOUT) as client:
        context = "the quick brown fox"
        reply = client.predict(START + context, num_predictions=5)  # "\n" is <eos>, the start token Score feeds
        _assert_sorted(reply)
        greedy = client.generate(START + context, max_tokens=1, temperature=0, return_token_ids=True).token_ids
        assert reply.predictions[0].token_ids == list(greedy)
        for p in reply.predictions:
            assert p.text != "<unk>" and len(p.token_ids) == 1
            scored = client.score(context + ("" if p.text == "\n" else " ") + p.text, token_logprobs=True).tokens
            assert scored[-1].token_id == p.token_ids[0]
            assert p.logprob == pytest.approx(scored[-1].logprob, abs=1e-4)
        tokens = client.predict("to be or not to be that is the question", num_predictions=3, unit="token")
        assert "\n" in [p.text for p in tokens.predictions]  # <eos>, a line break: a token
        words = client.predict("to be or not to be that is the question", num_predictions=3, unit="word")
        assert "\n" not in [p.text for p in words.predictions]  # but no word


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"num_predictions": 21}, "num_predictions"),
        ({"max_word_chars": 65}, "max_word_chars"),
        ({"unit": 7}, "unit"),
        ({"session_id": "s_x", "snapshot": b"x"}, "session_id"),
        ({"snapshot": b"not a snapshot"}, "snapshot"),
        ({"text": "x" * 300}, "text"),
        ({"text": "\u2603"}, "text"),  # not in the character vocabulary
    ],
)
def test_invalid_requests_name_their_field(serve: Callable[..., Live], fields: dict[str, Any], named: str) -> None:
    live = serve(max_prompt_tokens=256)
    err = rpc_error(lambda: live.stub.Predict(pb.PredictRequest(**fields), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(named), err.details()


def test_unknown_model_and_session(live: Live) -> None:
    err = rpc_error(lambda: live.stub.Predict(pb.PredictRequest(model="nope"), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(lambda: live.stub.Predict(pb.PredictRequest(session_id="s_nope"), timeout=CALL_TIMEOUT))
    assert err.code() == grpc.StatusCode.NOT_FOUND


class _Held:
    """Holds the predict worker inside the model's next host graph call (``ServedModel.run``) until released."""

    def __init__(self, model: ServedModel) -> None:
        self.model, self.entered, self.open = model, threading.Event(), threading.Event()
        run = model.run

        def held(*args: Any) -> Any:
            self.entered.set()
            assert self.open.wait(CALL_TIMEOUT), "never released"
            return run(*args)

        model.run = held  # type: ignore[method-assign]

    def release(self) -> None:
        self.open.set()
        del self.model.run


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_a_cancelled_or_expired_call_holds_nothing_and_changes_no_session(live: Live, how: str) -> None:
    app = live.server.app
    session = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=CALL_TIMEOUT).session_id
    live.stub.Predict(pb.PredictRequest(text="\nthe ", session_id=session), timeout=CALL_TIMEOUT)
    before = live.on_loop(lambda: app.sessions.get(session).context.token_count)
    held = _Held(app.registry.get(MODEL))
    try:
        request = pb.PredictRequest(text="quick", session_id=session)
        if how == "cancel":
            call = live.stub.Predict.future(request, timeout=CALL_TIMEOUT)
            assert held.entered.wait(CALL_TIMEOUT)
            call.cancel()
            wait_until(lambda: live.on_loop(lambda: not app.sessions.get(session).busy), "the session released")
        else:
            err = rpc_error(lambda: live.stub.Predict(request, timeout=0.5))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert held.entered.is_set()
    finally:
        held.release()
    wait_until(lambda: app.predictor.idle and not app.busy, "the predictor idle")
    assert live.on_loop(lambda: app.sessions.get(session).context.token_count) == before
    again = live.stub.Predict(pb.PredictRequest(text="quick ", session_id=session), timeout=CALL_TIMEOUT)
    assert again.predictions


def test_calls_are_counted_in_the_metrics(live: Live, client: Client) -> None:
    client.predict("the ")
    rpc_error(lambda: live.stub.Predict(pb.PredictRequest(num_predictions=99), timeout=CALL_TIMEOUT))
    requests = live.server.app.metrics.registry.get_sample_value
    assert requests("textgen_requests_total", {"method": "Predict", "model": MODEL, "code": "OK"}) == 1
    assert requests("textgen_requests_total", {"method": "Predict", "model": MODEL, "code": "INVALID_ARGUMENT"}) == 1


def test_cli_predicts_and_carries_the_snapshot(
    live: Live, client: Client, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from textgen.cli import main

    server = ["--server", f"127.0.0.1:{live.server.port}", "--timeout", str(CALL_TIMEOUT)]
    state = tmp_path / "state.snap"
    assert main(["predict", START + "the qu", "--num", "2", "--snapshot-out", str(state), *server]) == 0
    assert main(["predict", "ick ", "--num", "2", "--snapshot-in", str(state), *server]) == 0
    lines = capsys.readouterr().out.splitlines()
    want = client.predict(START + "the quick ", num_predictions=2).predictions
    assert [line.split("\t")[1] for line in lines[2:]] == [p.text for p in want]
    assert float(lines[2].split("\t")[0]) == pytest.approx(math.exp(want[0].logprob), abs=1e-4)
    assert main(["predict", "x", "--num", "99", *server]) == 1
    assert "num_predictions" in capsys.readouterr().err


def test_bench_predict_times_keystrokes(trained_run: Path, tmp_path: Path) -> None:
    from textgen.cli import main

    assert main(["bench", "predict", str(trained_run / "best.pt"), "--calls", "5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "predict.json").read_text())["results"][0]
    assert result["level"] == "char" and result["calls"] == 5
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["server_cpu_ms_per_call"] >= 0
