"""Constrained decoding (GenerateRequest.regex and .choices) against a real server: the returned text always matches
(many seeds, alone and batched with unconstrained streams, seeds exact either way), choices come out exactly and
end at once, patterns the model cannot start or the engine rejects are refused naming their field, a dead end part
way fails the call, hostile patterns are bounded, cancellation frees the slot, a snapshot continues from the matched
text, stop strings never leak, streams resume exactly, candidates each match, and a word model's text matches
(at the start of a line and after a word). The engine itself: tests/test_constraints.py."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_resume import assert_every_cut_resumes
from test_resume_attacks import serve_bundle, word_bundle  # noqa: F401 (fixtures)

from textgen.client import Client
from textgen.v1 import textgen_pb2 as pb

from live_server import ENDLESS, Live, rpc_error, start_server, wait_until

PROMPT = "the quick "
PATTERN = r"[a-f]{2} [a-z ]+"  # the test corpus has no digits nor capitals: its lower-case letters, space, (),:+
CHOICES = ["yes", "no", "maybe not"]
HOLDING = [c + "\x00" for c in "abcdefghijklmnopqrstuvwxyz "]  # stops that never complete: the last letter is held


@pytest.fixture(scope="module")
def live(served_bundle: Path) -> Iterator[Live]:
    server = start_server(
        served_bundle, max_constraint_chars=64, max_choices=4, max_tokens_limit=ENDLESS, max_stop_sequences=32
    )
    yield server
    server.close()


def test_the_returned_text_always_matches_the_regex(live: Live) -> None:
    for seed in range(12):
        reply = live.generate(PROMPT, regex=PATTERN, seed=seed, max_tokens=80, temperature=1.3)
        assert re.fullmatch(PATTERN, reply.text), (seed, reply.text)
        if reply.complete.finish_reason == pb.FINISH_REASON_STOP:  # ended by a token that would leave it
            assert reply.complete.generated_tokens == len(reply.text)


def test_choices_come_out_exactly_and_end_at_once(live: Live) -> None:
    seen = set()
    for seed in range(16):
        reply = live.generate(PROMPT, choices=CHOICES, seed=seed, max_tokens=50, temperature=1.5)
        assert reply.text in CHOICES and reply.complete.finish_reason == pb.FINISH_REASON_STOP
        assert reply.complete.generated_tokens == len(reply.text)  # no step after the last character
        seen.add(reply.text)
    assert len(seen) > 1


def test_seeded_constrained_requests_are_the_same_alone_and_batched(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=32)
    mix = [{"regex": PATTERN}, {"choices": CHOICES}, {}]
    requests = [
        dict(prompt=PROMPT, seed=i, max_tokens=40, temperature=1.2, return_token_ids=True, **mix[i % 3])
        for i in range(30)
    ]
    alone = [live.generate(**r) for r in requests]
    for messages, single in zip(live.batched(requests), alone, strict=True):
        assert "".join(m.text for m in messages) == single.text
        assert [t for m in messages for t in m.token_ids] == list(single.token_ids)
        assert messages[-1].complete.finish_reason == single.complete.finish_reason


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"regex": "(ab"}, "regex: "),
        ({"regex": "Q[a-z]+"}, "regex: no text this model can generate"),
        ({"choices": ["Yes", "No"]}, "choices: no text"),
        ({"regex": "a" * 65}, "regex: 65 characters exceed"),
        ({"choices": ["a", "b", "c", "d", "e"]}, "choices: 5 exceed"),
        ({"choices": ["a", ""]}, "choices[1]: empty"),
        ({"choices": ["a" * 40, "b" * 25]}, "choices: more than"),
        ({"regex": "a", "choices": ["a"]}, "regex, choices: "),
    ],
)
def test_invalid_constraints_are_refused_naming_the_field(live: Live, fields: dict[str, Any], named: str) -> None:
    for call in (live.generate, live.stream):
        err = rpc_error(call, PROMPT, **fields)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(named), err.details()


def test_a_dead_end_part_way_fails_the_call_naming_the_field(live: Live) -> None:
    for call in (live.generate, live.stream):
        banned = [int(t) for t in live.engine.model.tokenizer.encode("cd")]  # (ab[QZ] is refused at the start)
        err = rpc_error(call, PROMPT, regex="ab[cd]", banned_token_ids=banned, max_tokens=10)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert err.details().startswith("regex: no token") and 'ending "ab"' in err.details()
    wait_until(lambda: live.engine.running == 0, "the failed sequences' slots free")


@pytest.mark.parametrize("pattern", ["x{1000}{1000}", "((a{100}){100}){100}", "(a|b)*a(a|b){30}", r"(\w+\s*){1000}"])
def test_hostile_patterns_complete_or_are_refused(live: Live, pattern: str) -> None:
    try:
        reply = live.generate(PROMPT, regex=pattern[:64], max_tokens=60, seed=1)
    except grpc.RpcError as err:
        assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert err.details().startswith("regex: ")
    else:
        assert reply.complete.finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)


def test_cancelling_a_constrained_stream_frees_its_slot(live: Live) -> None:
    call = live.stream(PROMPT, regex="(?s:.)*", banned_token_ids=[0], max_tokens=ENDLESS)  # (0: <unk>)
    next(call)
    call.cancel()
    wait_until(lambda: live.engine.running == 0 and live.engine.queued == 0, "the cancelled stream's slot free")


def test_a_snapshot_continues_from_the_matched_text(live: Live) -> None:
    greedy = {"max_tokens": 30, "temperature": 0.0}
    for fields in ({"choices": CHOICES}, {"regex": PATTERN}):  # ended after its last token, or by the next one
        done = live.generate(PROMPT, seed=3, max_tokens=80, return_snapshot=True, **fields)
        after = live.generate("", snapshot=done.complete.snapshot, **greedy).text
        assert after == live.generate(PROMPT + done.text, **greedy).text


def test_stop_strings_never_leak_and_held_text_is_released(live: Live) -> None:
    for seed in range(6):
        free = live.generate(PROMPT, regex=PATTERN, seed=seed, max_tokens=80).text
        held = live.generate(PROMPT, regex=PATTERN, seed=seed, max_tokens=80, stop=HOLDING).text
        assert held == free  # what they held back comes out at the end, however the pattern ended
        stop = free[len(free) // 2 : len(free) // 2 + 2]
        cut = live.generate(PROMPT, regex=PATTERN, seed=seed, max_tokens=80, stop=[stop])
        assert cut.text == free[: free.index(stop)] and stop not in cut.text


@pytest.mark.parametrize(
    "fields",
    [{"regex": PATTERN, "stop": HOLDING}, {"regex": PATTERN}, {"choices": ["maybe not", "no"]}],
    ids=["regex-holding", "regex", "choices"],
)
def test_a_constrained_stream_resumes_exactly(serve: Callable[..., Live], fields: dict[str, Any]) -> None:
    """Ended before a token that would leave the pattern (releasing held-back text: resumed after its last token,
    the stream ends at once), or after the last token a pattern allows."""
    live = serve(max_stop_sequences=32)
    assert_every_cut_resumes(
        live, PROMPT, {"max_tokens": 60, "seed": 5, "temperature": 1.2, "return_snapshot": True, **fields}
    )


def test_a_resume_with_tokens_the_pattern_never_allowed_is_refused(live: Live) -> None:
    x = int(live.engine.model.tokenizer.encode("x")[0])
    resume = pb.Resume(token_ids=[x], text_chars=1)
    err = rpc_error(live.generate, PROMPT, regex=PATTERN, seed=1, max_tokens=20, resume=resume)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("resume.token_ids[0]: ") and "regex" in err.details()


def test_every_candidate_matches(live: Live) -> None:
    reply = live.generate(PROMPT, n=4, regex=PATTERN, seed=2, max_tokens=60)
    assert len(reply.candidates) == 4 and all(re.fullmatch(PATTERN, c.text) for c in reply.candidates)
    for c in reply.candidates:
        assert c.text == live.generate(PROMPT, regex=PATTERN, seed=c.complete.seed, max_tokens=60).text


def test_the_client_and_the_cli_take_a_regex_and_choices(live: Live) -> None:
    with Client(f"127.0.0.1:{live.server.port}") as client:
        assert client.generate(PROMPT, choices=CHOICES, seed=1).text in CHOICES
    target = ["--server", f"127.0.0.1:{live.server.port}", "--prompt", PROMPT, "--seed", "4"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "textgen.cli", "generate", *target, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    out = cli("--choice", "yes", "--choice", "no")
    assert out.returncode == 0, out.stderr
    assert out.stdout in (PROMPT + "yes\n", PROMPT + "no\n")
    out = cli("--regex", PATTERN, "--max-tokens", "60")
    assert out.returncode == 0 and re.fullmatch(PATTERN, out.stdout[len(PROMPT) : -1]), out.stdout
    refused = cli("--regex", "(ab")
    assert refused.returncode == 1 and "regex: " in refused.stderr


# -- a word model -------------------------------------------------------------------------------------------------


def test_a_word_models_text_matches_at_the_start_of_a_line_and_after_a_word(
    serve_bundle: Callable[..., Live],  # noqa: F811
    word_bundle: Path,  # noqa: F811
) -> None:
    live = serve_bundle(word_bundle)
    choices = ["add(a, b):", "to be or not", "a stitch"]
    for seed in range(8):
        reply = live.generate("", choices=choices, seed=seed, max_tokens=20)
        assert reply.text in choices and reply.complete.finish_reason == pb.FINISH_REASON_STOP
        mid = live.generate("the quick", choices=[" " + c for c in choices], seed=seed, max_tokens=20)
        assert mid.text in [" " + c for c in choices]
        line = r"(the|a) [a-z]+( [a-z]+)*"
        assert re.fullmatch(line, live.generate("", regex=line, seed=seed, max_tokens=20).text)
        assert re.fullmatch(" " + line, live.generate("the", regex=" " + line, seed=seed, max_tokens=20).text)
    err = rpc_error(live.generate, "the", regex=line)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "leading space" in err.details()
