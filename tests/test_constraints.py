"""Constrained decoding's engine (service/constraints.py) on the tokenizers of real exported models, and the
sampler's constraint masks: every walk the masks allow ends in a match (or a dead end named as such), choices come
out exactly, a word model's words never stop half-way through a word of the pattern, bad and unbounded patterns
are refused naming their field, and a mask excludes exactly what banned tokens would."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from test_resume_attacks import word_bundle  # noqa: F401 (a fixture)

from service.bundle import load_bundle
from service.constraints import Advance, Compiler, ConstraintSpec, Cursor
from textgen.errors import FailedPreconditionError, InvalidInputError
from textgen.sampling import SamplingParams, sample_batch

LIMIT_CHARS, LIMIT_CHOICES = 4096, 256


@pytest.fixture(scope="module")
def chars(served_bundle: Path) -> Compiler:
    return Compiler(load_bundle(served_bundle).tokenizer)


@pytest.fixture(scope="module")
def words(word_bundle: Path) -> Compiler:  # noqa: F811
    return Compiler(load_bundle(word_bundle).tokenizer)


def spec(regex: str = "", choices: tuple[str, ...] = ()) -> ConstraintSpec:
    made = ConstraintSpec.of(regex, choices, LIMIT_CHARS, LIMIT_CHOICES)
    assert made is not None
    return made


def walk(cursor: Cursor, rng: np.random.Generator, max_tokens: int = 200) -> tuple[str, Advance | None]:
    """Sample uniformly among the tokens the masks allow (any token where the text matches) until the pattern
    ends it; return the text taken and how it ended (None: max_tokens)."""
    text = cursor.compiler.text
    out = []
    for _ in range(max_tokens):
        row = cursor.mask()
        allowed = np.arange(cursor.compiler.vocab) if row is None else np.flatnonzero(row > 0)
        assert cursor.compiler.unk not in allowed.tolist() or row is None
        token = int(rng.choice(allowed))
        piece = text.bare[token] if cursor.bare else text.spaced[token]
        step = cursor.advance(token)
        if step is Advance.REJECT:
            return "".join(out), step
        out.append(piece)
        if step is Advance.END:
            return "".join(out), step
    return "".join(out), None


# -- the request's bounds ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("regex", "choices", "named"),
    [
        ("a", ("b",), "regex, choices"),
        ("a" * (LIMIT_CHARS + 1), (), "regex"),
        ("", ("a",) * (LIMIT_CHOICES + 1), "choices"),
        ("", ("a", ""), "choices[1]"),
        ("", ("a" * 4000, "b" * 97), "choices"),
    ],
)
def test_bounds_are_checked_before_anything_is_compiled(regex: str, choices: tuple[str, ...], named: str) -> None:
    with pytest.raises(InvalidInputError, match=f"^{re.escape(named)}: "):
        ConstraintSpec.of(regex, choices, LIMIT_CHARS, LIMIT_CHOICES)
    assert ConstraintSpec.of("", (), LIMIT_CHARS, LIMIT_CHOICES) is None


# -- a character model --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [r"[a-f]{3}\+[a-z ]+", r"(def|to) [a-z]+\(?", r"the (quick|lazy) [a-z]+", "[^e]*"])
def test_every_walk_the_masks_allow_matches_the_regex(chars: Compiler, pattern: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        text, ended = walk(chars.start(spec(pattern), None), rng, max_tokens=400)
        assert ended is not None and re.fullmatch(pattern, text), (pattern, text)


def test_choices_come_out_exactly_and_end_at_once(chars: Compiler) -> None:
    choices = ("yes", "no", "yes sir", "def add(a, b):")
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(60):
        text, ended = walk(chars.start(spec(choices=choices), None), rng)
        assert text in choices
        assert ended is (Advance.END if text != "yes" else Advance.REJECT)  # "yes" may go on: ended by the next token
        seen.add(text)
    assert seen >= {"yes", "no", "def add(a, b):"}  # ("yes sir" needs the one token of ~30 that goes on)
    cursor = chars.start(spec(choices=choices), None)
    for ch in "yes sir":
        cursor.mask()
        step = cursor.advance(int(chars.text.bare.index(ch)))
    assert step is Advance.END


def test_a_matched_text_ends_before_a_token_that_leaves_the_pattern(chars: Compiler) -> None:
    cursor = chars.start(spec("ab*"), None)
    a, b, c = (int(chars.text.bare.index(ch)) for ch in "abc")
    assert cursor.mask() is not None and cursor.advance(a) is Advance.CONTINUE
    assert cursor.mask() is None  # "a" matches: any token may be sampled
    assert cursor.advance(b) is Advance.CONTINUE
    assert cursor.mask() is None and cursor.advance(c) is Advance.REJECT
    assert chars.start(spec("ab*"), None).advance(chars.unk) is Advance.REJECT


def test_copies_go_their_own_ways(chars: Compiler) -> None:
    cursor = chars.start(spec(choices=("ab", "ac")), None)
    a, b, c = (int(chars.text.bare.index(ch)) for ch in "abc")
    cursor.mask()
    assert cursor.advance(a) is Advance.CONTINUE
    other = cursor.copy()
    row, other_row = cursor.mask(), other.mask()
    assert row is not None and other_row is not None and np.array_equal(row, other_row)
    assert cursor.advance(b) is Advance.END and other.advance(c) is Advance.END


def test_a_pattern_that_cannot_start_or_compile_is_refused_naming_its_field(chars: Compiler) -> None:
    with pytest.raises(InvalidInputError, match=r"^regex: .*unclosed group"):
        chars.start(spec("(ab"), None)
    with pytest.raises(InvalidInputError, match=r"^regex: no text this model can generate"):
        chars.start(spec("Z[a-z]+"), None)  # no capitals in the vocabulary
    with pytest.raises(InvalidInputError, match=r"^choices: no text"):
        chars.start(spec(choices=("Yes", "No")), None)
    with pytest.raises(InvalidInputError, match=r"^regex: matches only the empty text"):
        chars.start(spec("(Q)?"), None)  # (a generation takes at least one token)


def test_a_dead_end_part_way_fails_naming_the_field_and_the_text(chars: Compiler) -> None:
    cursor = chars.start(spec("abZ|c"), None)  # (a pattern no text matches is refused at the start)
    a, b = (int(chars.text.bare.index(ch)) for ch in "ab")
    for token in (a, b):
        cursor.mask()
        cursor.advance(token)
    with pytest.raises(FailedPreconditionError, match=r'^regex: no token .* after 2 generated tokens ending "ab"'):
        cursor.mask()


def test_the_requests_own_exclusions_count_for_a_dead_end(chars: Compiler) -> None:
    cursor = chars.start(spec("a[bc]"), None)
    cursor.mask()
    cursor.advance(int(chars.text.bare.index("a")))
    banned = SamplingParams(banned_token_ids=tuple(int(chars.text.bare.index(ch)) for ch in "bc"))
    with pytest.raises(FailedPreconditionError, match="among the tokens the request allows"):
        cursor.mask(banned.controls(chars.vocab).ceiling)


@pytest.mark.parametrize("pattern", ["x{1000}{1000}", "((a{100}){100}){100}", "(a|b)*a(a|b){30}", r"(\w+\s*){1000}"])
def test_hostile_patterns_cost_a_bounded_amount(chars: Compiler, pattern: str) -> None:
    """Each either compiles and steps (lazily built, bounded by the limits) or is refused: never a hang."""
    try:
        cursor = chars.start(spec(pattern), None)
    except InvalidInputError as exc:
        assert str(exc).startswith("regex: ")
        return
    try:
        walk(cursor, np.random.default_rng(0), max_tokens=100)
    except FailedPreconditionError as exc:
        assert "too complex" in str(exc) or "no token" in str(exc)


def test_compiled_patterns_are_cached_and_bounded(served_bundle: Path) -> None:
    compiler = Compiler(load_bundle(served_bundle).tokenizer, cache_size=2)
    for pattern in ("a+", "b+", "a+", "c+"):
        compiler.start(spec(pattern), None)
    assert list(compiler._compiled) == [spec("a+"), spec("c+")]


# -- a word model -------------------------------------------------------------------------------------------------


def test_word_choices_come_out_exactly_never_stopping_inside_a_word(words: Compiler) -> None:
    """ "a" and "b" are words of the model and prefixes of "add(a," and "b):": the lookahead keeps them out where
    they would start a longer word of the choice (the text could not go on from them)."""
    choices = ("add(a, b):", "to be or not", "a stitch")
    rng = np.random.default_rng(2)
    seen = set()
    for _ in range(40):
        text, ended = walk(words.start(spec(choices=choices), None), rng)
        assert ended is Advance.END and text in choices
        seen.add(text)
    assert seen == set(choices)


def test_a_word_that_matches_ends_at_once_where_only_glued_text_could_follow(words: Compiler) -> None:
    cursor = words.start(spec(choices=("the", "thequick", "the\nfox")), None)
    cursor.mask()
    assert cursor.advance(words.text.bare.index("the")) is Advance.CONTINUE  # a line break may follow
    cursor = words.start(spec(choices=("the", "thequick")), None)
    cursor.mask()
    assert cursor.advance(words.text.bare.index("the")) is Advance.END


def test_a_word_regex_matches_the_returned_text_at_the_start_of_a_line_and_after_a_word(words: Compiler) -> None:
    start = re.compile(r"(the|a) [a-z]+( [a-z]+)?")
    inside = re.compile(r" (the|a) [a-z]+( [a-z]+)?")
    word = int(words.text.bare.index("fox"))
    rng = np.random.default_rng(3)
    for _ in range(30):
        text, ended = walk(words.start(spec(start.pattern), None), rng)
        assert ended is not None and start.fullmatch(text), text
        text, ended = walk(words.start(spec(inside.pattern), word), rng)
        assert ended is not None and inside.fullmatch(text), text
    with pytest.raises(InvalidInputError, match="leading space unless it starts a line"):
        words.start(spec(start.pattern), word)  # after a word, the text starts with a space


def test_a_word_regex_over_lines(words: Compiler) -> None:
    pattern = re.compile(r"[a-z]+( [a-z]+)*\n[a-z]+( [a-z]+)*")
    rng = np.random.default_rng(4)
    for _ in range(20):
        text, ended = walk(words.start(spec(pattern.pattern), words.eos), rng, max_tokens=400)
        assert ended is not None and pattern.fullmatch(text), text


# -- the sampler's masks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05),
        SamplingParams(temperature=1.3, logit_bias=((3, 5.0),), banned_token_ids=(1, 2)),
        SamplingParams(temperature=0.0, allowed_token_ids=(0, 4, 5, 9, 40)),
    ],
)
def test_a_mask_excludes_exactly_what_banned_tokens_would(params: SamplingParams) -> None:
    rng = np.random.default_rng(5)
    vocab, batch = 300, 6
    logits = rng.standard_normal((batch, vocab)).astype(np.float32) * 4
    logits[2] = -np.inf  # every logit -inf: rule step 6 (and the greedy fallback)
    keep = [rng.random(vocab) < 0.3 for _ in range(batch)]
    for k in keep:
        k[[4, 5, 40]] = True  # (at least one token the allowed list keeps too)
    masks = [np.where(k, np.float32(np.inf), np.float32(-np.inf)) if i % 3 else None for i, k in enumerate(keep)]
    banned = [
        dataclasses.replace(params, banned_token_ids=tuple(sorted({*params.banned_token_ids, *np.flatnonzero(~k)})))
        if m is not None
        else params
        for k, m in zip(keep, masks, strict=True)
    ]
    for seed in range(5):
        got = sample_batch(
            logits, [params] * batch, [np.random.default_rng(seed + i) for i in range(batch)], masks=masks
        )
        want = sample_batch(logits, banned, [np.random.default_rng(seed + i) for i in range(batch)])
        assert got.tolist() == want.tolist()
