"""The logit controls of the sampling rule (textgen/logit_controls.py: presence and frequency penalties, logit
bias, allowed and banned tokens) and min_p, each on its own; tests/test_sampling.py holds them, with every other
setting, to the per-row reference token for token."""

from __future__ import annotations

import numpy as np
import pytest
from test_sampling import LOGITS, draws

from textgen.errors import InvalidInputError
from textgen.sampling import SamplingParams, new_rng, sample_token


def test_banned_tokens_are_never_drawn_and_allowed_ones_are_the_only_ones() -> None:
    assert 1 not in draws(SamplingParams(banned_token_ids=(1, 5)), 3, 500)
    assert set(draws(SamplingParams(allowed_token_ids=(0, 3, 4)), 3, 500)) == {0, 3, 4}
    assert set(draws(SamplingParams(allowed_token_ids=(0, 3, 4), banned_token_ids=(4,)), 3, 300)) == {0, 3}
    assert sample_token(LOGITS, SamplingParams(temperature=0, banned_token_ids=(1,)), new_rng(0)) == 5


def test_a_bias_of_minus_100_bans_and_plus_100_forces() -> None:
    assert set(draws(SamplingParams(logit_bias=((4, 100.0),)), 1, 200)) == {4}
    assert 1 not in draws(SamplingParams(logit_bias=((1, -100.0),)), 1, 500)
    assert sample_token(LOGITS, SamplingParams(temperature=0, logit_bias=((2, 1.5),)), new_rng(0)) == 2


def test_min_p_one_keeps_only_the_most_likely_token() -> None:
    assert set(draws(SamplingParams(min_p=1.0, temperature=2.0), 1, 200)) == {1}
    # p of token 5 is exp(-0.1) = 0.905 of token 1's: kept at min_p 0.9, dropped at 0.91
    assert set(draws(SamplingParams(min_p=0.9), 1, 300)) == {1, 5}
    assert set(draws(SamplingParams(min_p=0.91), 1, 100)) == {1}


def test_presence_and_frequency_penalties_act_on_generated_counts() -> None:
    counts = np.zeros(len(LOGITS), np.float32)
    counts[1] = 1  # token 1 leads token 5 by 0.1
    greedy = SamplingParams(temperature=0, presence_penalty=0.2)
    assert sample_token(LOGITS, greedy, new_rng(0), counts=counts) == 5
    assert sample_token(LOGITS, SamplingParams(temperature=0, presence_penalty=0.05), new_rng(0), counts=counts) == 1
    counts[1] = 3  # 3 x 0.05 > 0.1
    assert sample_token(LOGITS, SamplingParams(temperature=0, frequency_penalty=0.05), new_rng(0), counts=counts) == 5
    negative = SamplingParams(temperature=0, frequency_penalty=-2.0)  # encourages repeats
    assert sample_token(np.array([1.0, 0.0], np.float32), negative, new_rng(0), counts=np.array([0.0, 1.0])) == 1


def test_a_row_whose_every_allowed_logit_is_minus_infinity_still_draws_an_allowed_token() -> None:
    row = np.array([0.0, -np.inf, -np.inf, 5.0], np.float32)
    allowed = (1, 2)
    assert sample_token(row, SamplingParams(temperature=0, allowed_token_ids=allowed), new_rng(0)) == 1
    assert set(draws(SamplingParams(allowed_token_ids=allowed), 2, 200, row)) == {1, 2}
    assert set(draws(SamplingParams(banned_token_ids=(0, 3), top_p=0.5), 2, 200, row)) <= {1, 2}


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"logit_bias": ((3, 100.5),)}, r"logit_bias\[3\]"),
        ({"logit_bias": ((3, float("inf")),)}, r"logit_bias\[3\]"),
        ({"logit_bias": ((3, 1.0), (3, 2.0))}, r"logit_bias\[3\]"),
        ({"allowed_token_ids": (1, 2), "banned_token_ids": (2, 1, 0)}, "allowed_token_ids"),
    ],
)
def test_out_of_range_controls_name_the_field(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        SamplingParams(**kwargs)


def test_ids_beyond_the_vocabulary_name_the_field() -> None:
    with pytest.raises(InvalidInputError, match=r"logit_bias\[6\]: 6 is not a token"):
        sample_token(LOGITS, SamplingParams(logit_bias=((6, 1.0),)), new_rng(0))
    with pytest.raises(InvalidInputError, match=r"banned_token_ids\[1\]: 9 is not a token"):
        sample_token(LOGITS, SamplingParams(banned_token_ids=(0, 9)), new_rng(0))
