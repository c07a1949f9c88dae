from __future__ import annotations

import numpy as np
import pytest

from textgen.errors import InvalidInputError
from textgen.sampling import SamplingParams, new_rng, sample_token

LOGITS = np.array([1.0, 3.0, 2.0, 0.5, -1.0, 2.9], dtype=np.float32)


def draws(params: SamplingParams, seed: int, n: int, logits: np.ndarray = LOGITS) -> list[int]:
    rng = new_rng(seed)
    return [sample_token(logits, params, rng) for _ in range(n)]


def test_greedy_is_argmax_and_draws_no_random_number() -> None:
    rng = new_rng(7)
    before = rng.bit_generator.state
    assert sample_token(LOGITS, SamplingParams(temperature=0), rng) == 1
    assert rng.bit_generator.state == before


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    p = SamplingParams(temperature=1.5)
    assert draws(p, 3, 200) == draws(p, 3, 200)
    assert draws(p, 3, 200) != draws(p, 4, 200)


def test_frequencies_follow_the_softmax() -> None:
    p = SamplingParams(temperature=1.0)
    counts = np.bincount(draws(p, 0, 40_000), minlength=len(LOGITS)) / 40_000
    expected = np.exp(LOGITS - LOGITS.max())
    expected /= expected.sum()
    assert np.allclose(counts, expected, atol=0.01)


def test_top_k_restricts_the_support() -> None:
    assert set(draws(SamplingParams(top_k=2), 1, 500)) == {1, 5}
    assert set(draws(SamplingParams(top_k=1), 1, 50)) == {1}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = np.exp(LOGITS - LOGITS.max())
    probs /= probs.sum()
    # tokens 1 and 5 hold about 0.63 of the mass; 0.5 needs both of them, 0.1 only the first
    assert set(draws(SamplingParams(top_p=0.5), 2, 500)) == {1, 5}
    assert set(draws(SamplingParams(top_p=0.1), 2, 50)) == {1}


def test_repetition_penalty_moves_mass_away_from_seen_tokens() -> None:
    seen = np.zeros(len(LOGITS), dtype=bool)
    seen[[1, 5]] = True
    greedy = SamplingParams(temperature=0, repetition_penalty=2.0)
    assert sample_token(LOGITS, greedy, new_rng(0), seen) == 2
    negative = np.array([-1.0, -1.5], dtype=np.float32)  # a negative logit is multiplied: -1 -> -2
    assert sample_token(negative, greedy, new_rng(0), np.array([True, False])) == 1


@pytest.mark.parametrize(
    "kwargs,field",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_out_of_range_parameters_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidInputError, match=field):
        SamplingParams(**kwargs)


def test_seed_range() -> None:
    with pytest.raises(InvalidInputError, match="seed"):
        new_rng(-1)


@pytest.mark.parametrize("vocab", [5, 96, 1000])
def test_batched_sampling_equals_row_by_row(vocab: int) -> None:
    """A row's token depends only on its own logits, parameters and generator, never on its batch."""
    from textgen.sampling import sample_batch

    rng = np.random.default_rng(7)
    batch = 64
    logits = (rng.standard_normal((batch, vocab)) * 3).astype(np.float32)
    logits[:, 1] = logits[:, 2]  # ties
    choices = [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=1.3, top_p=0.5),
        SamplingParams(top_k=2, top_p=0.9, repetition_penalty=1.5),
        SamplingParams(temperature=0.0, repetition_penalty=2.0),
    ]
    params = [choices[i % len(choices)] for i in range(batch)]
    seen = rng.random((batch, vocab)) < 0.2
    for step in range(20):
        together = sample_batch(logits, params, [new_rng(1000 * step + i) for i in range(batch)], seen)
        alone = [sample_token(logits[i], params[i], new_rng(1000 * step + i), seen[i]) for i in range(batch)]
        assert together.tolist() == alone
        logits = np.roll(logits, 1, axis=0)


class _TopOfRange:
    """A generator that always draws the largest double below 1: the draw that lands closest to the total."""

    def random(self) -> float:
        return 1.0 - 2.0**-53


def test_a_draw_at_the_top_of_the_range_picks_the_last_token_that_has_probability() -> None:
    from textgen.sampling import sample_batch

    logits = np.array([[0.0, 40.0, 1e-3, 5.0, -np.inf, -np.inf], [2.0, 1.0, 0.0, -np.inf, 3.0, -np.inf]], np.float32)
    rngs = [_TopOfRange(), _TopOfRange()]
    picked = sample_batch(logits, [SamplingParams(), SamplingParams(top_k=2)], rngs)  # type: ignore[list-item]
    assert picked.tolist() == [3, 4]  # never a token with zero probability after the last one that has some
