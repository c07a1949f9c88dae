"""A session changes only when its generation's final message has been delivered: a call that ends any other way
(cancelled, timed out, however late) leaves it exactly as it was, even when the engine had already finished.

The late-cancel cases are driven on the server's own event loop through the app, at the points the transport would
reach them, so they do not depend on racing a real cancel against the engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from service.app import GenerateSpec, Generation
from service.sessions import Session
from textgen.v1 import textgen_pb2 as pb

from live_server import Live

OWNER = "commit-test"


def _state(session: Session) -> tuple[int, int, list[bytes], dict[str, Any]]:
    ctx = session.context
    return ctx.token_count, ctx.pending, [s.tobytes() for s in ctx.state], ctx.rng.bit_generator.state


async def _finished(live: Live, session_id: str) -> Generation:
    """A generation on the session whose engine work is over (its result is in), not yet reported."""
    app = live.server.app
    spec = GenerateSpec(prompt="the ", max_tokens=20, session_id=session_id, principal=OWNER)
    gen = await app.start_generation(spec, asyncio.get_running_loop())
    async for _, result in app.follow(gen):
        if result is not None:
            break
    assert gen.seq.result is not None and gen.seq.result.context is not None
    return gen


def _on_loop(live: Live, fn: Callable[[], Any]) -> Any:
    return live.server.call(fn)


def test_a_call_cancelled_after_the_engine_finished_leaves_the_session_unchanged(serve: Callable[..., Live]) -> None:
    live = serve()
    app = live.server.app
    session = _on_loop(live, lambda: _async(app.create_session, "", b"", 1, OWNER))
    before = _state(session)

    async def cancelled_before_its_reply() -> None:
        gen = await _finished(live, session.id)
        app.end_generation(gen)  # what the transport does when the call is cancelled before its reply is built

    async def cancelled_while_its_final_message_is_sent() -> None:
        gen = await _finished(live, session.id)
        app.outcome(gen)  # the final message is built (with a snapshot, if asked) ...
        app.end_generation(gen)  # ... but the client went away before it was delivered

    for case in (cancelled_before_its_reply, cancelled_while_its_final_message_is_sent):
        _on_loop(live, case)
        assert _state(session) == before and not session.busy, case.__name__

    async def delivered() -> None:
        gen = await _finished(live, session.id)
        app.outcome(gen)
        app.commit(gen)  # the transport took the final message

    _on_loop(live, delivered)
    after = _state(session)
    assert after[0] == before[0] + 4 + 19 and not session.busy  # the prompt's 4 tokens, then 19 of the 20 sampled
    assert after[2] != before[2]


def test_a_client_that_asks_again_the_moment_it_reads_the_final_message_finds_the_session_committed(
    serve: Callable[..., Live],
) -> None:
    live = serve(trust_principal_metadata=True)
    metadata = (("x-textgen-principal", OWNER),)
    sid = live.stub.CreateSession(pb.CreateSessionRequest(seed=3), metadata=metadata, timeout=30).session_id
    prompt_tokens = 0
    for _ in range(40):  # each round races the next call against the previous stream's commit
        messages = list(
            live.stub.GenerateStream(
                pb.GenerateRequest(prompt="a", max_tokens=3, session_id=sid), metadata=metadata, timeout=30
            )
        )
        prompt_tokens += messages[-1].complete.prompt_tokens  # "a", after the first round with the pending token
    info = live.stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=metadata, timeout=30)
    # every round was committed: the state consumed each round's prompt and 2 of its 3 sampled tokens
    assert prompt_tokens == 1 + 39 * 2
    assert info.token_count == prompt_tokens + 40 * 2


async def _async(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)
