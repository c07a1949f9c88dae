"""Resuming an interrupted stream (GenerateRequest.resume, service/resume.py): cut a seeded stream after any of its
messages, resume it from what the client had received, and the text that follows is exactly the rest of the
uninterrupted stream, with the same ending, counts and final state; every inconsistent resume is refused with the
field named."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from textgen.v1 import textgen_pb2 as pb

from live_server import Live, rpc_error

PROMPT = "def add(a, b):\n"
SETTINGS: list[dict[str, Any]] = [
    {"temperature": 0.9, "top_k": 20},
    {"temperature": 1.2, "top_p": 0.8, "repetition_penalty": 1.3},
    {"temperature": 0.0},  # greedy: no generator draws to advance
    {"temperature": 1.0, "stop": ["b", "(a"], "logprobs": True},  # hold-back across messages, ends on a stop
    # Stops that never complete but hold text back often (after "e", and over indentation): cuts land in hold-backs.
    {"temperature": 0.8, "stop": ["e\x00", "    \x00"]},
]


def stream_messages(live: Live, prompt: str = PROMPT, **fields: Any) -> list[pb.GenerateStreamResponse]:
    messages = list(live.stream(prompt, return_token_ids=True, **fields))
    assert messages[-1].HasField("complete") and not any(m.HasField("complete") for m in messages[:-1])
    return messages


def resume_from(received: list[pb.GenerateStreamResponse], version: str = "") -> pb.Resume:
    return pb.Resume(
        token_ids=[t for m in received for t in m.token_ids],
        text_chars=sum(len(m.text) for m in received),
        model_version=version,
    )


def assert_every_cut_resumes(live: Live, prompt: str, fields: dict[str, Any]) -> list[pb.GenerateStreamResponse]:
    """Cut a stream (``fields`` with a seed and return_snapshot) after each of its messages, and after its last
    token (only the final message lost); each resume gives the rest of the text, ids and log-probabilities, the
    same ending, counts and seed, and a final state whose snapshot continues with the same text. Returns the
    uninterrupted stream."""
    full = stream_messages(live, prompt, **fields)
    text = "".join(m.text for m in full)
    done = full[-1].complete
    assert full[0].model_version == done.model_version and all(not m.model_version for m in full[1:])
    assert len([t for m in full for t in m.token_ids]) == done.generated_tokens  # held-back tokens' ids too
    after = {"max_tokens": 20, "seed": 3, "temperature": 1.0}
    after_full = live.generate("", snapshot=done.snapshot, **after).text
    # Every cut a client can see: after each message but the last (whose loss loses only the final message), and
    # after every token but before the final message (its tokens came in a message of their own).
    for cut in range(len(full) + 1):
        received = full[:cut] if cut < len(full) else [*full[:-1], _without_complete(full[-1])]
        rest = stream_messages(live, prompt, resume=resume_from(received, done.model_version), **fields)
        whole = received + rest
        assert "".join(m.text for m in whole) == text, f"cut after {cut} messages"
        assert _ids(whole) == _ids(full), f"cut after {cut} messages"
        assert [(lp.token_id, lp.logprob) for m in whole for lp in m.logprobs] == [
            (lp.token_id, lp.logprob) for m in full for lp in m.logprobs
        ]
        again = rest[-1].complete
        assert (again.finish_reason, again.stop, again.generated_tokens, again.prompt_tokens, again.seed) == (
            done.finish_reason,
            done.stop,
            done.generated_tokens,
            done.prompt_tokens,
            done.seed,
        ), f"cut after {cut} messages"
        # The final state is the same: its snapshot continues with the same text.
        assert live.generate("", snapshot=again.snapshot, **after).text == after_full, f"cut after {cut} messages"
    return full


def _without_complete(msg: pb.GenerateStreamResponse) -> pb.GenerateStreamResponse:
    part = pb.GenerateStreamResponse()
    part.CopyFrom(msg)
    part.ClearField("complete")
    return part


def _ids(messages: list[pb.GenerateStreamResponse]) -> list[int]:
    return [t for m in messages for t in m.token_ids]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: ",".join(s))
def test_a_stream_cut_after_any_message_resumes_exactly(serve: Callable[..., Live], settings: dict[str, Any]) -> None:
    assert_every_cut_resumes(serve(), PROMPT, {"max_tokens": 40, "seed": 7, "return_snapshot": True, **settings})


def test_a_snapshot_request_resumes_from_its_snapshot(serve: Callable[..., Live]) -> None:
    live = serve()
    snapshot = live.generate(PROMPT, max_tokens=5, seed=1, return_snapshot=True).complete.snapshot
    fields = {"max_tokens": 30, "temperature": 0.9, "snapshot": snapshot}  # no seed: the snapshot's generator
    full = stream_messages(live, **fields)
    for cut in (1, len(full) // 2):
        rest = stream_messages(live, resume=resume_from(full[:cut]), **fields)
        assert "".join(m.text for m in full[:cut] + rest) == "".join(m.text for m in full)


def test_token_ids_come_with_unary_calls_too(serve: Callable[..., Live]) -> None:
    live = serve()
    reply = live.generate(PROMPT, max_tokens=12, seed=2, return_token_ids=True)
    assert len(reply.token_ids) == 12
    streamed = stream_messages(live, max_tokens=12, seed=2)
    assert list(reply.token_ids) == [t for m in streamed for t in m.token_ids]


def test_inconsistent_resumes_are_refused_naming_the_field(serve: Callable[..., Live]) -> None:
    live = serve()
    fields: dict[str, Any] = {"max_tokens": 10, "seed": 5, "stop": ["("]}
    full = stream_messages(live, **fields)
    ids = [t for m in full for t in m.token_ids]
    good = resume_from(full[:2])

    def refused(resume: pb.Resume, code: grpc.StatusCode, words: str, **more: Any) -> None:
        err = rpc_error(live.generate, PROMPT, resume=resume, **{**fields, **more})
        assert err.code() == code and words in err.details(), err.details()

    # Two ids, not two messages' worth: a loaded transport may gather every token into the first messages.
    bad = pb.Resume(token_ids=[*ids[:2], 10**6], text_chars=1)
    refused(bad, grpc.StatusCode.INVALID_ARGUMENT, "resume.token_ids[2]: 1000000 is not a token")
    refused(pb.Resume(token_ids=ids * 2), grpc.StatusCode.INVALID_ARGUMENT, "exceed the request's max_tokens")
    refused(
        pb.Resume(token_ids=good.token_ids, text_chars=good.text_chars + 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "resume.text_chars",
    )
    refused(
        pb.Resume(token_ids=good.token_ids, text_chars=good.text_chars, model_version="999"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "resume.model_version",
    )
    session = live.stub.CreateSession(pb.CreateSessionRequest(), timeout=30).session_id
    refused(good, grpc.StatusCode.INVALID_ARGUMENT, "resume: a session's stream", session_id=session)


def test_tokens_after_a_stop_are_refused(serve: Callable[..., Live]) -> None:
    live = serve()
    fields: dict[str, Any] = {"max_tokens": 60, "seed": 5, "temperature": 1.0}
    free = stream_messages(live, **fields)  # no stop: find a character the stream produces, and stop on it
    text = "".join(m.text for m in free)
    stop = text[len(text) // 2]
    stopped = stream_messages(live, stop=[stop], **fields)
    ids = [t for m in stopped for t in m.token_ids]
    assert stopped[-1].complete.finish_reason == pb.FINISH_REASON_STOP
    tail = [t for m in free for t in m.token_ids][len(ids) : len(ids) + 2]
    resume = pb.Resume(token_ids=ids + tail, text_chars=sum(len(m.text) for m in stopped))
    err = rpc_error(live.generate, PROMPT, resume=resume, stop=[stop], **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "the stream ended at token" in err.details()
