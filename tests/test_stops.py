"""The stop-string matcher against a by-definition reference (hypothesis: random small alphabets, stops and
piece splits), and its cost on crafted stops counted in automaton steps, never in time."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from service.stops import Automaton, StopMatcher


def reference(stops: list[str], text: str) -> tuple[str, str | None]:
    """Generation ends where a stop first completes (the longest one completing there); the text before it."""
    stops = [s for s in stops if s]
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text.endswith(s, 0, end)]
        if done:
            stop = max(done, key=len)
            return text[: end - len(stop)], stop
    return text, None


def hold_back(stops: list[str], text: str) -> int:
    """The longest suffix of ``text`` that is a proper prefix of a stop: what may not be released yet."""
    return max(
        (k for s in stops if s for k in range(1, min(len(s) - 1, len(text)) + 1) if text.endswith(s[:k])), default=0
    )


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[str], list[str]]:
    alphabet = draw(st.sampled_from(["a", "ab", "abc", "ab\u00e9\u2603", "xyz \n"]))
    stops = draw(st.lists(st.text(alphabet, max_size=7), max_size=5))
    pieces = draw(st.lists(st.text(alphabet, max_size=6), max_size=30))
    return stops, pieces


@settings(max_examples=600, deadline=None)
@given(cases())
def test_matches_the_reference_for_any_split(case: tuple[list[str], list[str]]) -> None:
    stops, pieces = case
    text = "".join(pieces)
    want_text, want_stop = reference(stops, text)
    matcher = StopMatcher(stops)
    sent, seen, stop = "", "", None
    for piece in pieces:
        out, stop = matcher.push(piece)
        sent += out
        seen += piece
        if stop is not None:
            break
        # released as soon as it cannot become a stop, and nothing more
        assert sent == seen[: len(seen) - hold_back(stops, seen)]
        assert matcher.held == seen[len(sent) :]
    if stop is None:
        sent += matcher.flush()
    assert (sent, stop) == (want_text, want_stop)
    assert not any(s in sent for s in stops if s)
    # linear: one goto per character, plus failure-link steps that can only undo earlier depth gains
    assert matcher.transitions <= 2 * len(seen)


def test_the_stop_that_ends_first_wins_and_among_those_the_longest() -> None:
    assert StopMatcher(["abcd", "bc"]).push("abcd") == ("a", "bc")  # "abcd" starts first but ends later
    assert StopMatcher(["b", "ab"]).push("xab") == ("x", "ab")  # both end at the same place
    m = StopMatcher(["abcd", "bc"])
    assert [m.push(c) for c in "abcd"][:3] == [("", None), ("", None), ("a", "bc")]  # any split: the same


def test_held_text_is_released_when_it_cannot_become_a_stop() -> None:
    m = StopMatcher(["abc"])
    assert m.push("xab") == ("x", None) and m.held == "ab"
    assert m.push("x") == ("abx", None) and m.held == ""
    assert m.push("a") == ("", None) and m.flush() == "a" and m.held == ""


def test_no_stops_passes_text_through() -> None:
    m = StopMatcher(["", ""])  # empty strings are not stops
    assert m.stops == [] and m.push(" word") == (" word", None) and m.flush() == ""


def test_crafted_stops_cost_a_constant_per_character() -> None:
    # The old matcher re-checked every suffix of the held text against every stop: O(len(stop) ** 2) per token.
    stops = [chr(ord("b") + i) * 256 for i in range(15)] + ["a" * 255 + "b"]
    m = StopMatcher(stops)
    tokens = 10_000
    released = [m.push("a")[0] for _ in range(tokens)]
    assert m.held == "a" * 255 and "".join(released) == "a" * (tokens - 255)
    assert m.transitions <= 2 * tokens
    # a character that breaks the long match walks the failure links back once, still linear overall
    assert m.push("z") == ("a" * 255 + "z", None) and m.transitions <= 2 * (tokens + 1)
    assert m.push("a" * 255 + "b") == ("", "a" * 255 + "b")


def test_the_automaton_is_bounded_by_the_stops_length() -> None:
    stops = tuple(chr(0x4E00 + i) * 256 for i in range(16))  # the server's limits: 16 stops of 256 characters
    assert len(Automaton.build(stops).kids) == 1 + 16 * 256
    assert len(Automaton.build(("abc", "abd", "ab")).kids) == 5  # shared prefixes share nodes
