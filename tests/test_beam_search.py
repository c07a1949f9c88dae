"""Beam search (issue 15, GenerateRequest.num_beams): the search itself (``service.beam_search``) on a real exported
model, against an exhaustive search and greedy decoding. The server's side is tests/test_beam_generate.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.beam_search import Beam, BeamParams, beam_search
from service.models import ModelRegistry, ServedModel
from service.output import TokenText
from service.sequence import Finish
from service.settings import ServerSettings
from service.word_search import log_softmax
from textgen.sampling import SamplingParams, new_rng, sample_token

PROMPT = "the quick"


@pytest.fixture(scope="module")
def model(served_bundle: Path) -> ServedModel:
    settings = ServerSettings(bundle=served_bundle, providers=["CPUExecutionProvider"], intra_op_threads=1)
    return next(iter(ModelRegistry.load(settings)))


def _feed(model: ServedModel, prompt: str) -> np.ndarray:
    return np.concatenate([[model.tokenizer.start_id], model.tokenizer.encode(prompt)]).astype(np.int64)


def _search(model: ServedModel, prompt: str = PROMPT, **fields: Any) -> list[Beam]:
    feed = _feed(model, prompt)
    seen = np.zeros(model.vocab_size, bool)
    seen[feed] = True
    params = BeamParams(**{"num_beams": 4, "max_tokens": 12, **fields})
    return beam_search(model, TokenText(model.tokenizer), model.zero_state(1), feed, seen, params, lambda: None)


def _id(model: ServedModel, char: str) -> int:
    return int(model.tokenizer.encode(char)[0])


def _row(model: ServedModel, tokens: list[int], prompt: str = PROMPT) -> np.ndarray:
    """The next-token log-probabilities after the prompt and ``tokens`` (float64), one graph call."""
    feed = np.concatenate([_feed(model, prompt), tokens]).astype(np.int64)
    logits, _ = model.run(feed[None], np.array([feed.size - 1]), model.zero_state(1))
    return log_softmax(logits[:, 0])[0]


def _exhaustive(model: ServedModel, length: int, stop: int, penalty: float) -> list[tuple[list[int], float]]:
    """Every text of at most ``length`` tokens that ends at ``stop`` or at ``length`` (and has no ``stop`` before
    its end), with its score, best first (ties by tokens): what beam search with enough beams must find."""
    scored = []
    prefixes: list[tuple[list[int], float]] = [([], 0.0)]
    for depth in range(1, length + 1):
        grown = []
        for tokens, total in prefixes:
            row = _row(model, tokens)
            for token in range(model.vocab_size):
                s = total + float(row[token])
                if token == stop or depth == length:
                    scored.append(([*tokens, token], s / depth**penalty))
                else:
                    grown.append(([*tokens, token], s))
        prefixes = grown
    return sorted(scored, key=lambda x: (-x[1], x[0]))


@pytest.mark.parametrize("penalty", [1.0, 0.0, 3.0, -2.0])
def test_enough_beams_find_the_exhaustive_search_best_texts(model: ServedModel, penalty: float) -> None:
    vocab, stop = model.vocab_size, _id(model, " ")
    want = _exhaustive(model, 3, stop, penalty)[:5]
    # vocab ** 2 beams keep every two-token prefix: the third step ranks every three-token text
    got = _search(model, num_beams=vocab**2, max_tokens=3, stop_ids=frozenset({stop}), length_penalty=penalty)[:5]
    assert [b.token_ids for b in got] == [tokens for tokens, _ in want]
    assert [b.score for b in got] == pytest.approx([score for _, score in want], abs=1e-4)


def test_one_beam_is_greedy_decoding_under_the_same_controls(model: ServedModel) -> None:
    controls = {"repetition_penalty": 1.3, "presence_penalty": 0.5, "frequency_penalty": 0.2}
    params = SamplingParams(temperature=0, **controls)
    feed = _feed(model, PROMPT)
    seen = np.zeros(model.vocab_size, bool)
    seen[feed] = True
    counts = np.zeros(model.vocab_size, np.float32)
    logits, state = model.run(feed[None], np.array([feed.size - 1]), model.zero_state(1))
    greedy = []
    for _ in range(20):
        token = sample_token(logits[0, 0], params, new_rng(0), seen, counts)
        greedy.append(token)
        seen[token], counts[token] = True, counts[token] + 1
        logits, state = model.run(np.array([[token]]), np.zeros(1, np.int64), state)
    (beam,) = _search(model, num_beams=1, max_tokens=20, controls=SamplingParams(**controls))
    assert beam.token_ids == greedy and beam.finish is Finish.LENGTH


def test_a_search_is_deterministic(model: ServedModel) -> None:
    first = _search(model, num_beams=5, max_tokens=16, stops=("e ",))
    again = _search(model, num_beams=5, max_tokens=16, stops=("e ",))
    assert [(b.token_ids, b.text, b.score) for b in first] == [(b.token_ids, b.text, b.score) for b in again]
    assert len(first) == 5


def test_scores_logprobs_and_state(model: ServedModel) -> None:
    beams = _search(model, num_beams=4, max_tokens=10, length_penalty=0.5, top_logprobs=3)
    assert [b.score for b in beams] == sorted((b.score for b in beams), reverse=True)
    for b in beams:
        assert b.finish is Finish.LENGTH and len(b.token_ids) == 10
        assert b.text == "".join(model.tokenizer.piece(t, None) for t in b.token_ids)
        # no controls: the search's log-probabilities are the model's own
        assert b.score == pytest.approx(b.cumulative_logprob / 10**0.5, abs=1e-4)
        for i, t in enumerate(b.logprobs):
            row = _row(model, b.token_ids[:i])
            assert t.token_id == b.token_ids[i] and t.logprob == pytest.approx(row[t.token_id], abs=1e-4)
            assert [a.token_id for a in t.top] == list(np.argsort(-row, kind="stable")[:3])
        # the state after all its tokens but the last, which is pending (as Generate leaves a context)
        feed = np.concatenate([_feed(model, PROMPT), b.token_ids[:-1]]).astype(np.int64)
        _, state = model.run(feed[None], np.zeros(0, np.int64), model.zero_state(1))
        for got, want in zip(b.state, state, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5)


def test_stop_strings_and_tokens_end_beams_and_never_show(model: ServedModel) -> None:
    beams = _search(model, num_beams=4, max_tokens=30, stops=("o",), early_stopping=True)
    assert len(beams) == 4
    for b in beams:
        assert b.finish is Finish.STOP and b.stop == "o" and "o" not in b.text
        assert len(b.pieces) == len(b.token_ids)  # one stream delta per token
        assert "".join(model.tokenizer.piece(t, None) for t in b.token_ids) == b.text + "o"
    stop = _id(model, " ")
    beams = _search(model, num_beams=3, max_tokens=30, stop_ids=frozenset({stop}), early_stopping=True)
    for b in beams:
        assert b.finish is Finish.STOP and b.stop_token == stop and b.token_ids[-1] == stop
        assert " " not in b.text and len(b.text) == len(b.token_ids) - 1


class _Calls:
    """Counts the model's graph calls (the real ones)."""

    def __init__(self, model: ServedModel) -> None:
        self.model, self.count, run = model, 0, model.run

        def counted(*args: Any) -> Any:
            self.count += 1
            return run(*args)

        model.run = counted  # type: ignore[method-assign]

    def __enter__(self) -> _Calls:
        return self

    def __exit__(self, *exc: object) -> None:
        del self.model.run


def test_early_stopping_ends_once_num_beams_finished(model: ServedModel) -> None:
    stop = _id(model, " ")
    fields = {"num_beams": 3, "max_tokens": 40, "stop_ids": frozenset({stop}), "length_penalty": 1.0}
    with _Calls(model) as early:
        eager = _search(model, early_stopping=True, **fields)
    with _Calls(model) as late:
        patient = _search(model, early_stopping=False, **fields)
    # the prompt runs in two calls (all but its last token, then that one), each step in one more
    steps_early = early.count - 2 + 1
    assert len(eager) == 3 and all(b.finish is Finish.STOP for b in eager)
    assert max(len(b.token_ids) for b in eager) == steps_early  # it ended at the step the third beam finished
    # without early stopping it goes on from the same beams, so it keeps as good or better ones
    assert late.count >= early.count
    assert all(p >= e for p, e in zip((b.score for b in patient), (b.score for b in eager), strict=True))


def test_without_early_stopping_it_ends_when_no_running_beam_beats_the_worst_kept(model: ServedModel) -> None:
    """Hugging Face's heuristic: the search ends at the first step where the best running beam's score at its
    length does not beat the worst of ``num_beams`` finished ones. Cut there by max_tokens, the running beams
    (finish LENGTH) would not enter the best; cut at any earlier step, one would (or too few had finished)."""
    stop = _id(model, " ")
    fields = {"num_beams": 3, "max_tokens": 40, "stop_ids": frozenset({stop}), "length_penalty": 1.0}
    with _Calls(model) as calls:
        beams = _search(model, **fields)
    steps = calls.count - 2 + 1
    assert steps < 40 and len(beams) == 3 and all(b.finish is Finish.STOP for b in beams)
    cut = _search(model, **{**fields, "max_tokens": steps})
    assert [(b.token_ids, b.score) for b in cut] == [(b.token_ids, b.score) for b in beams]
    for limit in range(1, steps):
        assert any(b.finish is Finish.LENGTH for b in _search(model, **{**fields, "max_tokens": limit}))


def test_n_distinct_beams(model: ServedModel) -> None:
    for num_beams in (2, 4):
        beams = _search(model, num_beams=num_beams)
        assert len({tuple(b.token_ids) for b in beams}) == len(beams) == num_beams


def test_a_beam_never_takes_an_excluded_token(model: ServedModel) -> None:
    allowed = tuple(_id(model, c) for c in "aeiou ")
    beams = _search(model, num_beams=4, max_tokens=8, controls=SamplingParams(allowed_token_ids=allowed))
    assert beams and all(set(b.token_ids) <= set(allowed) for b in beams)
    one = _search(model, num_beams=4, max_tokens=3, controls=SamplingParams(allowed_token_ids=allowed[:1]))
    assert [b.token_ids for b in one] == [[allowed[0]] * 3]  # fewer beams when fewer continuations exist
