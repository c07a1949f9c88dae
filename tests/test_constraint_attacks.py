"""Attacks on constrained decoding (GenerateRequest.regex, .choices) against a real server: work a pattern costs
per token must stay off the event loop (a resumed stream replays its tokens through the pattern), and a pattern
the model's characters can never complete is refused up front rather than sampled to max_tokens."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from service.constraints import Cursor
from textgen.v1 import textgen_pb2 as pb

from live_server import Live, rpc_error, start_server

PROMPT = "the quick "
PATTERN = r"[a-f]{2} [a-z ]+"  # the test corpus has no digits nor capitals


@pytest.fixture(scope="module")
def live(served_bundle: Path) -> Iterator[Live]:
    server = start_server(served_bundle, max_stream_interval=1)
    yield server
    server.close()


def test_a_resumed_streams_pattern_is_replayed_off_the_event_loop(live: Live, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each replayed token may cost a token mask (milliseconds on a large word model): a short resume of a
    constrained stream must not run them on the event loop, which every call shares."""
    messages = list(live.stream(PROMPT, regex=PATTERN, seed=4, max_tokens=40, return_token_ids=True))
    received = messages[: len(messages) // 2]
    resume = pb.Resume(
        token_ids=[t for m in received for t in m.token_ids], text_chars=sum(len(m.text) for m in received)
    )
    threads: set[threading.Thread] = set()
    advance = Cursor.advance

    def recording(self: Cursor, *args: object, **kwargs: object) -> object:  # (the real advance, its thread noted)
        threads.add(threading.current_thread())
        return advance(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Cursor, "advance", recording)
    rest = list(live.stream(PROMPT, regex=PATTERN, seed=4, max_tokens=40, return_token_ids=True, resume=resume))
    assert "".join(m.text for m in received + rest) == "".join(m.text for m in messages)
    loop_thread = live.server._thread
    assert threads and loop_thread not in threads


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"regex": "[a-z ]+Q"}, "regex: "),
        ({"regex": "(the|a)+[XYZ]"}, "regex: "),
        ({"choices": ["aQ", "bZ"]}, "choices: "),
    ],
)
def test_a_pattern_no_text_of_the_models_characters_can_match_is_refused(
    live: Live, fields: dict[str, object], named: str
) -> None:
    """Its start is possible, its end needs a character the model never writes: the masks must not let it run to
    max_tokens with a text that does not match (finish LENGTH)."""
    err = rpc_error(live.generate, PROMPT, max_tokens=200, seed=1, **fields)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith(named), err.details()
    assert "no text this model can generate matches it" in err.details()
