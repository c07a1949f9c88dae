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

    # (token 3 leads row 0: behind 40 it would add nothing to a float32 running sum and have no width to draw)
    logits = np.array([[0.0, 4.0, 1e-3, 5.0, -np.inf, -np.inf], [2.0, 1.0, 0.0, -np.inf, 3.0, -np.inf]], np.float32)
    rngs = [_TopOfRange(), _TopOfRange()]
    picked = sample_batch(logits, [SamplingParams(), SamplingParams(top_k=2)], rngs)  # type: ignore[list-item]
    assert picked.tolist() == [3, 4]  # never a token with zero probability after the last one that has some


# -- the rule, token for token: sample_batch against bench/sampling.py's plain per-row implementation -------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from bench.sampling import reference_batch, reference_probabilities  # noqa: E402
from textgen import sampling  # noqa: E402
from textgen.sampling import sample_batch  # noqa: E402

SETTINGS = [
    SamplingParams(),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.0, repetition_penalty=1.7),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.9),
    SamplingParams(top_k=1),
    SamplingParams(top_k=3, temperature=0.8),
    SamplingParams(top_k=40),
    SamplingParams(top_k=10**6),  # k >= vocab: no filter
    SamplingParams(top_p=0.9),
    SamplingParams(top_p=0.5, temperature=1.4),
    SamplingParams(top_p=1e-9),  # the most probable token only
    SamplingParams(top_p=0.999999),
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(repetition_penalty=0.7, temperature=1.2),
    SamplingParams(top_k=5, top_p=0.8, repetition_penalty=1.5),
    SamplingParams(top_k=300, top_p=0.95, temperature=0.7),
    SamplingParams(temperature=1e-45, repetition_penalty=1e-45),  # 0 in float32: taken as 2^-126, never NaN
    SamplingParams(temperature=100.0, repetition_penalty=100.0, top_p=0.7),
]


def _logits(rng: np.random.Generator, batch: int, vocab: int, kind: str) -> np.ndarray:
    x = rng.standard_normal((batch, vocab)).astype(np.float32) * np.float32(rng.uniform(0.2, 4))
    if kind == "ties":  # few distinct values: ties everywhere, at the k-th value and at the nucleus cut
        x = np.round(x)
    elif kind == "inf":
        x[rng.random((batch, vocab)) < 0.3] = -np.inf
    elif kind == "fp16":
        x = x.astype(np.float16)
    elif kind == "peaked":
        x[np.arange(batch), rng.integers(0, vocab, batch)] += 25
    return x


def _controlled(rng: np.random.Generator, vocab: int) -> SamplingParams:
    """Random settings of the logit controls (rule steps 2 to 4 and 10), with the other settings too."""
    ids = rng.permutation(vocab)
    allowed = tuple(ids[: rng.integers(1, vocab + 1)].tolist()) if rng.random() < 0.4 else ()
    banned = tuple(rng.choice(vocab, rng.integers(0, vocab), replace=False).tolist()) if rng.random() < 0.5 else ()
    if allowed and set(allowed) <= set(banned):  # refused: something must stay allowed
        banned = tuple(t for t in banned if t != allowed[0])
    bias = rng.uniform(-100, 100, vocab).astype(np.float32)
    bias[rng.random(vocab) < 0.2] = rng.choice([-100.0, 100.0, 0.0, 1e-3])
    return SamplingParams(
        temperature=float(rng.choice([0.0, 0.5, 1.0, 1.7])),
        top_k=int(rng.choice([0, 1, 5])),
        top_p=float(rng.choice([1.0, 0.9, 0.3])),
        repetition_penalty=float(rng.choice([1.0, 1.3])),
        min_p=float(rng.choice([0.0, 0.05, 0.5, 1.0, 1e-45])),
        presence_penalty=float(rng.choice([0.0, 0.7, -2.0, 2.0])),
        frequency_penalty=float(rng.choice([0.0, 0.3, -1.1, 2.0])),
        logit_bias=tuple((int(t), float(bias[t])) for t in ids[: rng.integers(0, min(vocab, 40) + 1)]),
        allowed_token_ids=allowed,
        banned_token_ids=banned,
    )


def _counts(rng: np.random.Generator, batch: int, vocab: int) -> np.ndarray:
    """Generated-token counts: most tokens never, some a few times."""
    return (rng.integers(1, 5, (batch, vocab)) * (rng.random((batch, vocab)) < 0.2)).astype(np.float32)


def _same(
    logits: np.ndarray,
    params: list[SamplingParams],
    seeds: list[int],
    seen: np.ndarray | None,
    counts: np.ndarray | None = None,
) -> np.ndarray:
    rngs = [new_rng(s) for s in seeds]
    picked = sample_batch(logits, params, rngs, seen, counts)
    expected = reference_batch(logits, params, [new_rng(s) for s in seeds], seen, counts)
    assert picked.tolist() == expected.tolist()
    for rng, s, sp in zip(rngs, seeds, params, strict=True):  # one draw per sampled row, none per greedy row
        twin = new_rng(s)
        if not sp.greedy:
            twin.random()
        assert rng.bit_generator.state == twin.bit_generator.state
    for i, (sp, token) in enumerate(zip(params, picked.tolist(), strict=True)):  # never a zero-probability token
        if not sp.greedy:
            row_counts = None if counts is None else counts[i]
            assert reference_probabilities(logits[i], sp, None if seen is None else seen[i], row_counts)[token] > 0
    return picked


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    vocab=st.sampled_from([1, 2, 7, 96, 255, 256, 257, 700, 1500]),
    batch=st.integers(1, 9),
    kind=st.sampled_from(["normal", "ties", "inf", "fp16", "peaked"]),
    block=st.sampled_from([256, 8, 5]),  # small blocks: many blocks and a short last one at any vocabulary
    candidates=st.sampled_from([1024, 1, 3, 16]),  # small candidate sets: top_p grows them round by round
    seed=st.integers(0, 2**32 - 1),
)
def test_sample_batch_follows_the_reference_rule(
    vocab: int, batch: int, kind: str, block: int, candidates: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    logits = _logits(rng, batch, vocab, kind)
    params = [
        SETTINGS[i] if rng.random() < 0.5 else _controlled(rng, vocab) for i in rng.integers(0, len(SETTINGS), batch)
    ]
    seen = rng.random((batch, vocab)) < 0.3
    counts = _counts(rng, batch, vocab)
    seeds = rng.integers(0, 2**63, batch).tolist()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling, "BLOCK", block)
        mp.setattr(sampling, "CANDIDATES", candidates)
        _same(logits, params, seeds, seen, counts)
        _same(logits, params, seeds, None, counts)


@pytest.mark.parametrize("vocab", [96, 10_000])
@pytest.mark.parametrize("setting", SETTINGS, ids=repr)
def test_one_setting_at_full_size(vocab: int, setting: SamplingParams) -> None:
    """The sizes served (the char model's 96 tokens, a word model's 10,000), each setting over a whole batch."""
    rng = np.random.default_rng(vocab)
    logits = np.concatenate([_logits(rng, 4, vocab, kind) for kind in ("normal", "ties", "peaked")])
    _same(logits, [setting] * len(logits), list(range(len(logits))), rng.random(logits.shape) < 50 / vocab)


@pytest.mark.parametrize("vocab", [96, 1000, 10_000])
def test_a_row_draws_the_same_token_alone_or_among_63_others(vocab: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every numpy path (exp, sums, partitions, the rounds of top_p) gives a row the same bits in a batch of 64 as
    alone; 300 candidates make the top_p rows of a 1,000 or 10,000 vocabulary take several rounds."""
    monkeypatch.setattr(sampling, "CANDIDATES", 300)
    rng = np.random.default_rng(vocab)
    logits = np.concatenate([_logits(rng, 16, vocab, kind) for kind in ("normal", "ties", "fp16", "peaked")])
    params = [SETTINGS[i % len(SETTINGS)] if i % 2 else _controlled(rng, vocab) for i in range(64)]
    seen = rng.random((64, vocab)) < 0.05
    counts = _counts(rng, 64, vocab)
    for step in range(3):
        seeds = [1000 * step + i for i in range(64)]
        together = _same(logits, params, seeds, seen, counts)
        alone = [sample_token(logits[i], params[i], new_rng(seeds[i]), seen[i], counts[i]) for i in range(64)]
        assert together.tolist() == alone
        logits, seen, counts = np.roll(logits, 1, axis=0), np.roll(seen, 1, axis=0), np.roll(counts, 1, axis=0)


@pytest.mark.parametrize("vocab", [1, 5, 96, 255, 256, 257, 1000, 8191, 10_000, 50_257])
def test_block_sums_are_the_same_for_one_row_and_many(vocab: int) -> None:
    p = np.exp(np.random.default_rng(vocab).standard_normal((64, vocab)).astype(np.float32) * 3)
    together = sampling._running(p)
    for i in (0, 1, 37, 63):
        assert np.array_equal(sampling._running(p[i : i + 1].copy())[0], together[i])
        assert np.array_equal(sampling._running(p[i : i + 1])[0], together[i])


def test_seen_as_one_array_per_row_is_the_same_as_a_matrix() -> None:
    """The engine passes each request's own mask; the reference sampler a matrix."""
    rng = np.random.default_rng(11)
    logits = _logits(rng, 6, 300, "normal")
    seen = rng.random((6, 300)) < 0.2
    params = [
        SamplingParams(repetition_penalty=r, top_k=k)
        for r, k in zip([1.3, 1.0, 2.0, 1.3, 0.5, 1.0], [0, 9] * 3, strict=True)
    ]
    matrix = sample_batch(logits, params, [new_rng(i) for i in range(6)], seen)
    rows = sample_batch(logits, params, [new_rng(i) for i in range(6)], list(seen))
    assert (
        matrix.tolist()
        == rows.tolist()
        == reference_batch(logits, params, [new_rng(i) for i in range(6)], seen).tolist()
    )


def test_float16_logits_are_widened_exactly() -> None:
    logits = (np.random.default_rng(3).standard_normal((8, 300)) * 4).astype(np.float16)
    params = [SamplingParams(top_p=0.9, top_k=50, temperature=0.9)] * 8
    half = sample_batch(logits, params, [new_rng(i) for i in range(8)])
    single = sample_batch(logits.astype(np.float32), params, [new_rng(i) for i in range(8)])
    assert half.tolist() == single.tolist()


def test_top_k_keeps_every_tie_with_the_kth_value() -> None:
    logits = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 2.0], np.float32)
    assert set(draws(SamplingParams(top_k=1), 5, 300, logits)) == {0, 2, 4}
    assert set(draws(SamplingParams(top_k=4), 5, 600, logits)) == {0, 2, 3, 4, 5}


def test_top_p_breaks_ties_at_the_cut_by_lower_id() -> None:
    logits = np.array([0.0, 2.0, 1.0, 2.0, 2.0, 1.0], np.float32)
    # three tokens share the largest p; each holds about 0.28 of the mass: 0.3 needs two of them, the lower ids
    assert set(draws(SamplingParams(top_p=0.3), 9, 300, logits)) == {1, 3}
    assert set(draws(SamplingParams(top_p=1e-6), 9, 100, logits)) == {1}


def test_top_p_one_and_k_at_least_vocab_are_no_filter() -> None:
    p = SamplingParams(temperature=1.3)
    assert draws(SamplingParams(temperature=1.3, top_p=1.0, top_k=len(LOGITS)), 4, 300) == draws(p, 4, 300)
    assert draws(SamplingParams(temperature=1.3, top_k=len(LOGITS) + 5), 4, 300) == draws(p, 4, 300)


def test_infinite_logits() -> None:
    row = np.array([1.0, -np.inf, np.inf, 0.0, np.inf], np.float32)
    assert set(draws(SamplingParams(), 1, 200, row)) == {2, 4}  # the +inf tokens share the draw
    dead = np.full(4, -np.inf, np.float32)
    assert set(draws(SamplingParams(top_p=0.5), 1, 200, dead)) <= {0, 1, 2, 3}  # no probability anywhere: no crash
    banned = np.array([-np.inf, 0.5, -np.inf, 0.2], np.float32)
    assert set(draws(SamplingParams(temperature=3.0), 1, 500, banned)) == {1, 3}


class _Fixed:
    def __init__(self, u: float) -> None:
        self.u = u

    def random(self) -> float:
        return self.u


@pytest.mark.parametrize("u", [0.0, 2.0**-53, 0.5, 1.0 - 2.0**-53])
@pytest.mark.parametrize("vocab", [3, 96, 700])
def test_the_extreme_draws_pick_a_token_with_probability(u: float, vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    logits = rng.standard_normal((len(SETTINGS), vocab)).astype(np.float32) * 5
    logits[:, ::2] = -np.inf  # zero-probability tokens before, between and after the others
    logits[:, 1] = 0.0  # at least one token with probability
    params = [sp for sp in SETTINGS if not sp.greedy]
    logits = logits[: len(params)]
    picked = sample_batch(logits, params, [_Fixed(u)] * len(params))  # type: ignore[list-item]
    expected = reference_batch(logits, params, [_Fixed(u)] * len(params))  # type: ignore[list-item]
    assert picked.tolist() == expected.tolist()
    for row, sp, token in zip(logits, params, picked.tolist(), strict=True):
        assert reference_probabilities(row, sp)[token] > 0


@pytest.mark.parametrize("block", [256, 16])  # one block, or the first of two
def test_where_the_running_sum_falls_short_of_the_block_sums_the_last_token_with_probability_is_picked(
    block: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fifteen tokens of p = 3e-8 after one of p = 1 add nothing to a float32 running sum (each is under half a
    unit in the last place of 1) but 4.5e-7 to numpy's pairwise block sum: a draw above the running sum falls in
    no token, and takes the last one with probability."""
    monkeypatch.setattr(sampling, "BLOCK", block)
    logits = np.array([[0.0] + [-17.33] * 15 + [-np.inf] * 4], np.float32)
    assert sampling._running(np.exp(logits))[0, -1] > 1.0
    assert sample_batch(logits, [SamplingParams()], [_Fixed(0.9999999)]).tolist() == [15]  # type: ignore[list-item]
    assert reference_batch(logits, [SamplingParams()], [_Fixed(0.9999999)]).tolist() == [15]  # type: ignore[list-item]


@pytest.mark.parametrize("candidates", [1024, 7])
@pytest.mark.parametrize("batch", [1, 8])
def test_the_nucleus_is_the_references_to_the_bit(batch: int, candidates: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Step 6 alone, on every path (one short row, whole rows, rounds of candidates), against the reference. The
    first row's running sum is float32 and sequential: fifteen tokens of 3e-8 after one of 1 never move it, so
    a goal just above 1 (reached in float64 after a dozen of them) is never reached and every token is kept."""
    monkeypatch.setattr(sampling, "CANDIDATES", candidates)
    rng = np.random.default_rng(batch)
    for kind, vocab, top_p in [("normal", 300, 0.9), ("ties", 300, 0.5), ("fp16", 700, 0.95), ("peaked", 96, 0.3)]:
        logits = _logits(rng, batch, vocab, kind).astype(np.float32)
        if kind == "normal":
            logits[0] = -np.inf
            logits[0, :16] = [0.0] + [-17.33] * 15
            top_p = 0.9999999
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        sampling._nucleus(p, np.full(batch, top_p, np.float32))
        for row, got in zip(logits, p, strict=True):
            assert np.array_equal(got, reference_probabilities(row, SamplingParams(top_p=top_p)))
        if kind == "normal":
            assert np.count_nonzero(p[0]) == 16
