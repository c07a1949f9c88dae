"""The generation controls of GenerateRequest against a real server: min_p, presence and frequency penalties,
logit_bias (by id and by text), allowed and banned tokens, stop token ids and top_logprobs. Each changes the output
as its contract says, a seeded request stays exact alone and batched with 63 others, a stream ended by a stop token
resumes to the same ending, and every invalid value is refused naming its field."""

from __future__ import annotations

import math
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_resume import assert_every_cut_resumes, resume_from, stream_messages
from test_resume_attacks import word_bundle  # noqa: F401 (a fixture)

from textgen.tokenizer import TextTokenizer
from textgen.v1 import textgen_pb2 as pb

from live_server import Live, rpc_error, start_server, stream_text

PROMPT = "the quick "
RESUMED = "def add(a, b):\n"  # the prompt of the resumed streams


@pytest.fixture(scope="module")
def live(served_bundle: Path) -> Iterator[Live]:
    server = start_server(served_bundle, max_logit_bias=8)
    yield server
    server.close()


def tokenizer(live: Live) -> TextTokenizer:
    return live.engine.model.tokenizer


def ids(live: Live, chars: str) -> list[int]:
    """The char model's token ids of ``chars``, one each."""
    return [int(tokenizer(live).encode(c)[0]) for c in chars]


def greedy(live: Live, max_tokens: int = 60, **fields: Any) -> pb.GenerateResponse:
    return live.generate(PROMPT, max_tokens=max_tokens, temperature=0, **fields)


# -- each control changes the output as defined ---------------------------------------------------------------


def test_banned_tokens_never_appear_and_allowed_ones_are_all_that_appear(live: Live) -> None:
    free = greedy(live).text
    common = "".join(c for c, _ in Counter(free).most_common(3))
    for temperature in (0.0, 1.5):
        text = live.generate(
            PROMPT, max_tokens=150, temperature=temperature, seed=4, banned_token_ids=ids(live, common)
        ).text
        assert len(text) == 150 and not set(text) & set(common)
        allowed = live.generate(
            PROMPT, max_tokens=150, temperature=temperature, seed=4, allowed_token_ids=ids(live, "ab c")
        ).text
        assert set(allowed) <= set("ab c") and len(allowed) == 150
    both = live.generate(
        PROMPT, max_tokens=80, seed=4, allowed_token_ids=ids(live, "ab c"), banned_token_ids=ids(live, " ")
    )
    assert set(both.text) <= set("abc")


def test_logit_bias_minus_100_bans_and_plus_100_forces_by_id_and_by_text(live: Live) -> None:
    free = greedy(live).text
    top = Counter(free).most_common(1)[0][0]
    banned = live.generate(PROMPT, max_tokens=150, temperature=1.5, seed=2, logit_bias={ids(live, top)[0]: -100.0})
    assert top not in banned.text and len(banned.text) == 150
    forced = live.generate(PROMPT, max_tokens=30, temperature=1.5, seed=2, logit_bias_text={"z": 100.0})
    assert forced.text == "z" * 30
    mixed = greedy(live, logit_bias={ids(live, "q")[0]: 100.0}, logit_bias_text={"z": 100.0, top: -100.0})
    assert set(mixed.text) <= {"q", "z"}  # a tie of +100s, broken by the model's own logits


def test_min_p_one_is_greedy(live: Live) -> None:
    assert live.generate(PROMPT, max_tokens=60, temperature=1.7, seed=9, min_p=1.0).text == greedy(live).text
    hot = live.generate(PROMPT, max_tokens=60, temperature=1.7, seed=9).text
    assert live.generate(PROMPT, max_tokens=60, temperature=1.7, seed=9, min_p=0.0).text == hot


def test_presence_and_frequency_penalties_reduce_repeats(live: Live) -> None:
    def repeats(**penalties: float) -> int:
        """Tokens that repeat an earlier token of the same text, over a few seeded texts."""
        texts = [live.generate(PROMPT, max_tokens=60, seed=s, **penalties).text for s in range(4)]
        return sum(len(t) - len(set(t)) for t in texts)

    free = repeats()
    assert repeats(presence_penalty=2.0) < free
    assert repeats(frequency_penalty=2.0) < free
    assert repeats(presence_penalty=-2.0, frequency_penalty=-2.0) > free  # negative values encourage repeats


def test_a_stop_token_ends_generation_with_its_id_and_without_its_text(live: Live) -> None:
    free = greedy(live).text
    at = next(i for i in range(5, 50) if free.index(free[i]) == i)  # a character's first occurrence, past 5
    stop_id = ids(live, free[at])[0]
    unseen = next(t for t in range(len(tokenizer(live).id_to_token)) if tokenizer(live).id_to_token[t] not in free)
    for reply in (
        greedy(live, stop_token_ids=[unseen, stop_id]),
        greedy(live, stop_token_ids=[stop_id], stop=[free[at - 2 : at] + "\u2603"]),  # held back, then released
    ):
        done = reply.complete
        assert reply.text == free[:at]
        assert done.finish_reason == pb.FINISH_REASON_STOP and done.HasField("stop_token_id")
        assert (done.stop_token_id, done.stop, done.generated_tokens) == (stop_id, "", at + 1)
    text, last = stream_text(live.stream(PROMPT, max_tokens=60, temperature=0, stop_token_ids=[stop_id], logprobs=True))
    assert text == free[:at] and last.complete.stop_token_id == stop_id
    with_ids = greedy(live, stop_token_ids=[stop_id], return_token_ids=True, logprobs=True)
    assert with_ids.token_ids[-1] == stop_id and len(with_ids.token_ids) == at + 1  # a resume needs its id
    assert [t.token_id for t in with_ids.logprobs] == list(with_ids.token_ids)
    # Nothing else sets the field: a length or stop-string ending leaves it unset.
    assert not greedy(live).complete.HasField("stop_token_id")
    assert not greedy(live, stop=[free[at]]).complete.HasField("stop_token_id")


def test_a_stop_token_stays_the_pending_token_of_the_snapshot_and_session(live: Live) -> None:
    """The state after a stop token is the state after the text before it, with the stop token next to feed: a
    continuation is the same as from the whole text (stop token included) as a prompt."""
    free = greedy(live).text
    at = next(i for i in range(5, 50) if free.index(free[i]) == i)
    ended = greedy(live, stop_token_ids=ids(live, free[at]), return_snapshot=True)
    after = live.generate("", snapshot=ended.complete.snapshot, max_tokens=25, temperature=0).text
    assert after == live.generate(PROMPT + free[: at + 1], max_tokens=25, temperature=0).text
    session = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=30).session_id
    live.generate(PROMPT, session_id=session, max_tokens=60, temperature=0, stop_token_ids=ids(live, free[at]))
    assert live.generate("", session_id=session, max_tokens=25, temperature=0).text == after


def test_top_logprobs_lists_the_most_likely_tokens(live: Live) -> None:
    reply = live.generate(PROMPT, max_tokens=30, seed=5, top_logprobs=5)  # implies logprobs
    assert len(reply.logprobs) == 30
    names = tokenizer(live).id_to_token
    for chosen in reply.logprobs:
        top = list(chosen.top_logprobs)
        assert len(top) == 5 and len({t.token_id for t in top}) == 5
        assert [t.logprob for t in top] == sorted((t.logprob for t in top), reverse=True)
        assert all(t.token == names[t.token_id] and t.logprob <= 0 for t in top)
        assert sum(math.exp(t.logprob) for t in top) <= 1 + 1e-5
        listed = {t.token_id: t.logprob for t in top}
        if chosen.token_id in listed:  # the same number, computed the same way
            assert listed[chosen.token_id] == chosen.logprob
        else:
            assert chosen.logprob <= top[-1].logprob
    # Greedy picks the first alternative; the distribution is the model's own, whatever the sampling settings.
    plain = greedy(live, max_tokens=20, top_logprobs=3)
    assert all(t.top_logprobs[0].token_id == t.token_id for t in plain.logprobs)
    tempered = greedy(live, max_tokens=20, top_logprobs=3, logit_bias_text={"z": 5.0}, frequency_penalty=1.0)
    assert [list(t.top_logprobs) for t in tempered.logprobs][:1] == [list(t.top_logprobs) for t in plain.logprobs][:1]
    assert all(not t.top_logprobs for t in greedy(live, max_tokens=5, logprobs=True).logprobs)
    streamed = [lp for m in live.stream(PROMPT, max_tokens=30, seed=5, top_logprobs=5) for lp in m.logprobs]
    assert streamed == list(reply.logprobs)


def test_the_python_client_passes_maps_and_lists(live: Live) -> None:
    from textgen.client import Client

    with Client(f"127.0.0.1:{live.server.port}") as client:
        reply = client.generate(PROMPT, max_tokens=20, temperature=0, logit_bias={ids(live, "z")[0]: 100.0})
        assert reply.text == "z" * 20
        reply = client.generate(PROMPT, max_tokens=20, seed=1, logit_bias_text={"y": 100.0}, top_logprobs=2)
        assert reply.text == "y" * 20 and len(reply.logprobs[0].top_logprobs) == 2


# -- guarantees kept --------------------------------------------------------------------------------------------

# Token lists by their characters ("ban", "allow", "stop_at"), resolved to ids by ``resolve``.
CONTROLS: list[dict[str, Any]] = [
    {"min_p": 0.1},
    {"presence_penalty": 1.5, "frequency_penalty": 0.7},
    {"logit_bias_text": {"e": -3.0, "a": 2.0}},
    {"ban": " e"},
    {"allow": "abcdefg h", "ban": "h"},
    {"top_logprobs": 4},
    {"stop_at": "x"},
    {"frequency_penalty": -1.0, "min_p": 0.02, "logit_bias_text": {"o": 1.0}, "top_k": 10},
]
_LISTS = {"ban": "banned_token_ids", "allow": "allowed_token_ids", "stop_at": "stop_token_ids"}


def resolve(live: Live, control: dict[str, Any]) -> dict[str, Any]:
    return {_LISTS.get(k, k): ids(live, v) if k in _LISTS else v for k, v in control.items()}


def _request(live: Live, i: int, control: dict[str, Any]) -> dict[str, Any]:
    prompts = ["", "a", "to be or ", "def add(a, b):\n    ", "the lazy dog"]
    return {
        "prompt": prompts[i % len(prompts)],
        "max_tokens": 20 + (i % 5) * 10,
        "temperature": (0.0, 0.7, 1.0, 1.4)[i % 4],
        "seed": i * 13 + 5,
        **resolve(live, control),
    }


def test_seeded_requests_with_controls_are_the_same_alone_and_batched(serve: Callable[..., Live]) -> None:
    live = serve(max_batch_size=64)
    requests = [_request(live, i, CONTROLS[i % len(CONTROLS)] if i % 3 else {}) for i in range(64)]
    alone = [live.generate(**r) for r in requests]
    recorder = live.observe()
    for messages, single in zip(live.batched(requests), alone, strict=True):
        assert "".join(m.text for m in messages) == single.text
        assert [lp for m in messages for lp in m.logprobs] == list(single.logprobs)
        assert messages[-1].complete.stop_token_id == single.complete.stop_token_id
    assert max(recorder.decode_batches) >= 48


@pytest.mark.parametrize(
    "settings",
    [
        {"temperature": 1.0, "presence_penalty": 1.0, "frequency_penalty": 0.5, "top_logprobs": 2},
        {"temperature": 0.9, "min_p": 0.05, "logit_bias_text": {"a": 2.0}, "ban": "e", "stop": ["b", "a\x00"]},
    ],
    ids=["penalties", "bias"],
)
def test_a_stream_with_controls_resumes_exactly(serve: Callable[..., Live], settings: dict[str, Any]) -> None:
    live = serve()
    assert_every_cut_resumes(
        live, RESUMED, {"max_tokens": 40, "seed": 7, "return_snapshot": True, **resolve(live, settings)}
    )


def test_a_stream_ended_by_a_stop_token_resumes_to_the_same_ending(serve: Callable[..., Live]) -> None:
    """Stop strings that never complete but hold text back (after "a" and spaces), so the stop token meets a
    hold-back; every cut resumes to the same text, the stop token's ending and final state."""
    live = serve()
    fields: dict[str, Any] = {"max_tokens": 40, "seed": 7, "temperature": 1.0, "stop": ["a\x00", " \x00"]}
    free = live.generate(RESUMED, **fields).text
    at = next(i for i in range(15, 40) if free.index(free[i]) == i)
    fields.update(stop_token_ids=ids(live, free[at]), return_snapshot=True)
    full = assert_every_cut_resumes(live, RESUMED, fields)
    done = full[-1].complete
    assert "".join(m.text for m in full) == free[:at]
    assert done.finish_reason == pb.FINISH_REASON_STOP and done.stop_token_id == ids(live, free[at])[0]
    # Every token received, the final message lost: the resume ends at once, on the same stop token.
    received = [*full[:-1], pb.GenerateStreamResponse(text=full[-1].text, token_ids=full[-1].token_ids)]
    rest = stream_messages(live, RESUMED, resume=resume_from(received), **fields)
    assert rest[-1].complete.stop_token_id == done.stop_token_id and "".join(m.text for m in rest) == ""
    assert rest[-1].complete.generated_tokens == at + 1


# -- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,named",
    [
        ({"min_p": 1.5}, "min_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"frequency_penalty": float("inf")}, "frequency_penalty"),
        ({"logit_bias": {70000: 1.0}}, "logit_bias[70000]: "),
        ({"logit_bias": {3: 101.0}}, "logit_bias[3]: "),
        ({"logit_bias": {3: float("nan")}}, "logit_bias[3]: "),
        ({"logit_bias": {i: 1.0 for i in range(9)}}, "logit_bias: 9 entries"),
        ({"logit_bias": {i: 1.0 for i in range(5)}, "logit_bias_text": dict.fromkeys("abcd", 1.0)}, "logit_bias: 9"),
        ({"logit_bias_text": {"ab": 1.0}}, 'logit_bias_text["ab"]: not exactly one token'),
        ({"logit_bias_text": {"": 1.0}}, 'logit_bias_text[""]: '),
        ({"logit_bias_text": {"\u2603": 1.0}}, 'logit_bias_text["\\u2603"]: '),
        ({"logit_bias_text": {"a": -100.5}}, 'logit_bias_text["a"]: '),
        ({"allowed_token_ids": [1, 2, 99999]}, "allowed_token_ids[2]: 99999 is not a token"),
        ({"allowed_token_ids": list(range(10_000))}, "allowed_token_ids: 10000 ids exceed"),
        ({"banned_token_ids": [70000]}, "banned_token_ids[0]: "),
        ({"allowed_token_ids": [3, 4], "banned_token_ids": [4, 3]}, "allowed_token_ids: every allowed token"),
        ({"stop_token_ids": [5, 2**32 - 1]}, "stop_token_ids[1]: "),
        ({"top_logprobs": 21}, "top_logprobs"),
    ],
)
def test_invalid_controls_are_refused_naming_the_field(live: Live, fields: dict[str, Any], named: str) -> None:
    for call in (live.generate, live.stream):
        err = rpc_error(call, PROMPT, max_tokens=5, **fields)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(named), err.details()


def test_a_token_biased_by_id_and_by_text_is_refused(live: Live) -> None:
    err = rpc_error(live.generate, PROMPT, logit_bias={ids(live, "a")[0]: 1.0}, logit_bias_text={"a": 2.0})
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith('logit_bias_text["a"]: token') and "already has a bias" in err.details()


def test_the_cli_takes_every_control(live: Live) -> None:
    target = ["--server", f"127.0.0.1:{live.server.port}", "--prompt", PROMPT, "--temperature", "0"]
    free = greedy(live, max_tokens=30).text
    at = next(i for i in range(5, 30) if free.index(free[i]) == i)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "textgen.cli", "generate", *target, *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    out = cli("--max-tokens", "30", "--stop-token", str(ids(live, free[at])[0]), "--top-logprobs", "2")
    assert out.returncode == 0, out.stderr
    assert out.stdout == PROMPT + free[:at] + "\n"
    assert f"[stop; 10 prompt + {at + 1} generated tokens" in out.stderr
    assert f"stop token {ids(live, free[at])[0]}" in out.stderr
    assert out.stderr.count("\n") == at + 2 and out.stderr.splitlines()[0].count("\t") == 3  # token, 2 alternatives
    z, q = ids(live, "zq")
    args = ["--max-tokens", "6", "--logit-bias", f"{z}=100", "--logit-bias-text", "q=100", "--ban-token", str(z)]
    assert cli(*args).stdout == PROMPT + "q" * 6 + "\n"
    args = ["--max-tokens", "6", "--allow-token", str(z), "--allow-token", str(q), "--logit-bias-text", "q=-50"]
    assert (
        cli(*args, "--min-p", "1", "--presence-penalty", "0", "--frequency-penalty", "-2").stdout
        == PROMPT + "z" * 6 + "\n"
    )
    bad = cli("--logit-bias", "a=1")
    assert bad.returncode == 2 and "expected KEY=BIAS" in bad.stderr
    refused = cli("--logit-bias-text", "ab=1")
    assert refused.returncode == 1 and 'logit_bias_text["ab"]' in refused.stderr


@pytest.mark.parametrize(
    "control",
    [
        {"min_p": 0.2, "temperature": 1.3},
        {"presence_penalty": 1.2, "frequency_penalty": 0.8},
        {"logit_bias": ((5, 3.0), (9, -2.5)), "banned_token_ids": (7, 8), "top_k": 12},
        {"allowed_token_ids": tuple(range(4, 30)), "frequency_penalty": -0.5, "min_p": 0.05},
    ],
    ids=repr,
)
def test_served_text_equals_the_torch_reference_with_controls(
    live: Live, fluent_run: Path, control: dict[str, Any]
) -> None:
    """The torch reference sampler (training/generate.py) draws the same tokens with the controls it shares."""
    from textgen.sampling import SamplingParams
    from training.checkpoint import load_checkpoint, model_from_checkpoint
    from training.generate import generate_text

    model, tok = model_from_checkpoint(load_checkpoint(fluent_run / "best.pt"))
    fields = {**control, "logit_bias": dict(control.get("logit_bias", ()))}
    for prompt, seed in (("the quick ", 3), ("def add(a, b):\n", 11)):
        served = live.generate(prompt, max_tokens=60, seed=seed, **fields).text
        assert served == "".join(generate_text(model, tok, prompt, 60, SamplingParams(**control), seed))


def test_textgen_sample_takes_the_controls_and_matches_the_server(
    live: Live, fluent_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``textgen sample`` (the torch reference) takes the control flags and draws the served text for a seed."""
    from textgen.cli import main

    free = greedy(live).text
    stop = ids(live, free[20])[0]  # a token the text reaches: the stop ends it there, its text not printed
    fields: dict[str, Any] = {
        "temperature": 0.8,
        "min_p": 0.05,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.3,
        "logit_bias": {ids(live, "e")[0]: -2.0},
        "logit_bias_text": {"t": 1.5},
        "banned_token_ids": ids(live, "z"),
        "stop_token_ids": [stop],
    }
    flags = ["--temperature", "0.8", "--min-p", "0.05", "--presence-penalty", "0.5", "--frequency-penalty", "0.3"]
    flags += ["--logit-bias", f"{ids(live, 'e')[0]}=-2", "--logit-bias-text", "t=1.5", "--ban-token"]
    flags += [str(ids(live, "z")[0]), "--stop-token", str(stop)]
    for seed in (3, 8):
        served = live.generate(PROMPT, max_tokens=60, seed=seed, **fields).text
        argv = ["sample", str(fluent_run / "best.pt"), "--prompt", PROMPT, "--max-tokens", "60", "--seed", str(seed)]
        assert main(argv + flags) == 0
        assert capsys.readouterr().out == PROMPT + served + "\n"
    assert main(["sample", str(fluent_run / "best.pt"), "--logit-bias-text", "ab=1"]) == 1
    assert "--logit-bias-text 'ab': not exactly one token" in capsys.readouterr().err


def test_a_word_models_logit_bias_text_names_words(word_bundle: Path) -> None:  # noqa: F811
    """For a word model a logit_bias_text key is a word: +100 makes it every token, -100 removes it."""
    word_live = start_server(word_bundle)
    try:
        tok = word_live.engine.model.tokenizer
        free = word_live.generate("to be or not", max_tokens=40, temperature=1.0, seed=2, return_token_ids=True)
        word = next(tok.id_to_token[t] for t in free.token_ids if tok.id_to_token[t].isalpha())
        forced = word_live.generate("to be or not", max_tokens=10, seed=2, logit_bias_text={word: 100.0})
        assert forced.text.split() == [word] * 10
        banned = word_live.generate(
            "to be or not", max_tokens=40, temperature=1.0, seed=2, logit_bias_text={word: -100}
        )
        assert word not in banned.text.split()
        for text, what in (("to be", "2 tokens"), ("zzyzx", "outside the vocabulary")):
            error = rpc_error(lambda t=text: word_live.generate("to", max_tokens=3, logit_bias_text={t: 1.0}))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f'logit_bias_text["{text}"]' in error.details() and what in error.details()
    finally:
        word_live.close()
