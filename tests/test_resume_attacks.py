"""Exact failover, attacked (issue 14): resumes of word-level streams, of streams whose every token arrived, of
streams batched with others and in static decode buckets; models whose rows are not the same bits in every batch
(int8, fp16 on the CPU); and the client's failover against replicas that shut down (a stream past its replica's
grace period ends with FINISH_REASON_CANCELLED), its deadline, and what a caller with or without failover gets.

Every server here is in this process (``serve``, ``start_server``); two of them with the same bundle and keyring
are two replicas of one model version."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_resume import PROMPT, assert_every_cut_resumes, resume_from, stream_messages

from service.batch_state import BatchState
from textgen.client import AsyncClient, Client, RemoteError
from textgen.v1 import textgen_pb2 as pb

from live_server import CALL_TIMEOUT, SMALL_WINDOW, Live, rpc_error, start_server, wait_until

# A stream still running when its replica shuts down on any machine: its client reads nothing after the first
# message, its replica buffers at most 8 unsent tokens and the connection's window is ~1 KB (see test_failover).
LONG = {"max_tokens": 600, "seed": 11, "temperature": 0.9, "top_k": 20}


@pytest.fixture(scope="session")
def word_bundle(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Path:
    """A tiny word-level LSTM (spacing from the previous token, ``<eos>`` line breaks, ``<unk>`` sampled)."""
    from exporter.publish import export_bundle
    from training.run import run_train

    root = tmp_path_factory.mktemp("words")
    data = root / "corpus.txt"
    data.write_text(corpus_text, encoding="utf-8")
    run_train(
        {"hidden_size": 32, "embedding_size": 16},
        {"path": str(data), "level": "word"},
        {"batch_size": 4, "bptt": 16, "max_steps": 60, "eval_every": 30, "lr": 1e-2},
        root / "run",
        progress=False,
    )
    out = root / "bundles" / "tiny" / "1"
    export_bundle(root / "run" / "best.pt", out)
    return out


@pytest.fixture
def serve_bundle() -> Iterator[Callable[..., Live]]:
    started: list[Live] = []

    def start(bundle: Path, **overrides: Any) -> Live:
        started.append(start_server(bundle, **overrides))
        return started[-1]

    yield start
    for live in reversed(started):
        live.close()


WORD_SETTINGS: list[dict[str, Any]] = [
    {"temperature": 1.5},
    {"temperature": 1.0, "stop": ["the", "be or", "\n"], "logprobs": True},  # stops across words and line breaks
    {"temperature": 1.3, "top_p": 0.7, "repetition_penalty": 1.5, "stop": ["b"]},
    {"temperature": 0.0, "max_tokens": 12},
]


@pytest.mark.parametrize("settings", WORD_SETTINGS, ids=lambda s: ",".join(s))
def test_word_level_streams_resume_exactly(
    serve_bundle: Callable[..., Live], word_bundle: Path, settings: dict[str, Any]
) -> None:
    live = serve_bundle(word_bundle, max_stream_interval=1)  # a message per token: a cut between any two
    for prompt in ("the quick zebra", "", "a stitch\n"):  # an unknown word; the start of a text; after a line end
        assert_every_cut_resumes(live, prompt, {"max_tokens": 25, "seed": 7, "return_snapshot": True, **settings})


@pytest.mark.parametrize("mode", ["dynamic", "static", "graphs"])
def test_resumed_streams_batched_with_others_and_in_static_buckets(serve: Callable[..., Live], mode: str) -> None:
    """Streams resumed at different cuts while others run beside them (messages gather several tokens), with
    decode steps of any size, padded to power-of-two buckets, or through the CUDA-graph bucket path (on CPU)."""
    live = serve(max_batch_size=16)
    model = live.engine.model
    if mode != "dynamic":  # the engine is idle: its state pool is swapped before any request
        sessions = dataclasses.replace(model.sessions, cuda_graphs=True) if mode == "graphs" else model.sessions
        pool = BatchState(
            sessions, model.state_names, model.state_shape, model.state_dtype.type, model.vocab_size, 16, True
        )
        live.engine.state = live.engine.scheduler.state = pool
    fields = [{"max_tokens": 150, "seed": s, "temperature": 1.0, "top_p": 0.9, "stop": ["e\x00"]} for s in range(6)]
    full = [stream_messages(live, **f) for f in fields]
    got: list[str] = [""] * len(fields)

    def run(i: int) -> None:
        if i % 2:  # a resumed stream, cut somewhere in the middle
            cut = len(full[i]) * i // 7
            rest = stream_messages(live, resume=resume_from(full[i][:cut]), **fields[i])
            got[i] = "".join(m.text for m in full[i][:cut] + rest)
        else:
            got[i] = "".join(m.text for m in stream_messages(live, **fields[i]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fields))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(CALL_TIMEOUT)
    assert got == ["".join(m.text for m in f) for f in full]
    wait_until(lambda: live.engine.idle, "every slot is free again")


@pytest.fixture(scope="session")
def quantized_bundles(tmp_path_factory: pytest.TempPathFactory, fluent_run: Path) -> dict[str, Path]:
    from exporter.publish import export_bundle

    root = tmp_path_factory.mktemp("quantized")
    out = {p: root / p / "tiny" / "1" for p in ("int8", "fp16")}
    for precision, path in out.items():
        export_bundle(fluent_run / "best.pt", path, quantize=precision)
    return out


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_a_model_that_cannot_replay_exactly_refuses_resumes(
    serve_bundle: Callable[..., Live], quantized_bundles: dict[str, Path], precision: str
) -> None:
    """A resume runs the received tokens as a prompt chunk, where the interrupted stream decoded them one a step
    in batches of any make-up: exact only where a row's bits are the same either way. int8's dynamic quantization
    scales a whole batch (and a whole chunk) at once, so its rows never are; whatever the replica's kernels, a
    resume is either refused (FAILED_PRECONDITION naming resume) or exact (before: int8 resumes went on with
    another state, and the final snapshots continued with another text)."""
    live = serve_bundle(quantized_bundles[precision])
    fields = {"max_tokens": 40, "seed": 7, "return_snapshot": True, "temperature": 0.9}
    full = stream_messages(live, **fields)
    if live.engine.resume_refusal:
        err = rpc_error(live.generate, PROMPT, resume=resume_from(full[:2]), **fields)
        assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and err.details().startswith("resume:"), err
        assert live.generate(PROMPT, resume=resume_from([]), **fields).text == "".join(m.text for m in full)
    else:
        assert precision != "int8", "an int8 model's rows depend on the rows batched with them"
        assert_every_cut_resumes(live, PROMPT, fields)


def test_hostile_resumes_are_refused_cheaply_and_an_empty_one_is_a_new_start(serve: Callable[..., Live]) -> None:
    live = serve()
    fields: dict[str, Any] = {"max_tokens": 20, "seed": 4, "temperature": 1.0}
    plain = live.generate(PROMPT, **fields).text
    assert live.generate(PROMPT, resume=pb.Resume(), **fields).text == plain
    for resume, words in (
        (pb.Resume(token_ids=[1] * 200_000), "resume.token_ids: 200000 tokens exceed the request's max_tokens (20)"),
        (pb.Resume(token_ids=[1, 2], text_chars=2**64 - 1), "resume.text_chars: these 2 tokens made 2 characters"),
        (pb.Resume(text_chars=1), "resume.text_chars: these 0 tokens made 0 characters"),
    ):
        err = rpc_error(live.generate, PROMPT, resume=resume, **fields)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details(), err.details()
    wait_until(lambda: live.engine.idle, "nothing was queued")


def test_a_resumed_stream_pauses_for_its_reader_and_ends_on_cancel_or_deadline(serve: Callable[..., Live]) -> None:
    """A resumed stream is a stream like any other once it has rejoined the batch: paused while its reader lags
    (and exact when read on), and cancelled or past its deadline it frees its slot."""
    live = serve(stream_buffer_tokens=8)
    fields: dict[str, Any] = {"max_tokens": 600, "seed": 6, "temperature": 1.0}
    full = stream_messages(live, **fields)
    resume = resume_from(full[:3])
    call = live.stream(PROMPT, small_window=True, resume=resume, return_token_ids=True, **fields)
    rest = [next(call)]
    wait_until(lambda: live.engine.paused == 1, "the resumed stream is paused for its reader")
    rest += list(call)
    assert "".join(m.text for m in full[:3] + rest) == "".join(m.text for m in full)
    call = live.stream(PROMPT, small_window=True, resume=resume, **fields)
    next(call)
    call.cancel()
    wait_until(lambda: live.engine.idle, "the cancelled stream's slot is free")
    gate = live.gate()  # held in the resumed stream's prompt until its deadline has passed
    call = live.stream(PROMPT, timeout=1.0, resume=resume, **fields)
    gate.wait_entered()
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    gate.release()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: live.engine.idle, "the expired stream's slot is free")


def test_failover_keeps_a_snapshot_s_generator(serve: Callable[..., Live]) -> None:
    """A snapshot carries its generator: failover fixes no seed for it (the stream goes on from the snapshot's)."""
    live = serve()
    snapshot = live.generate(PROMPT, max_tokens=5, seed=9, return_snapshot=True).complete.snapshot
    with Client(f"127.0.0.1:{live.server.port}", timeout=CALL_TIMEOUT, failover=True) as client:
        streamed = list(client.stream("", snapshot=snapshot, max_tokens=20, temperature=1.0))
        reply = client.generate("", snapshot=snapshot, max_tokens=20, temperature=1.0)
    assert streamed[-1].complete.seed == reply.complete.seed == 9
    assert "".join(m.text for m in streamed) == reply.text == live.generate("", snapshot=snapshot, max_tokens=20).text


def test_a_resumed_stream_times_its_first_new_token(serve: Callable[..., Live]) -> None:
    """The first token a resumed call samples is its client's first token: it is timed (and, as every stream's
    first token, sent at once). Before, a resumed stream reported no first-token time."""
    live = serve()
    fields = {"max_tokens": 30, "seed": 2, "temperature": 1.0}
    ids = [t for m in stream_messages(live, **fields) for t in m.token_ids]
    # Five tokens, not five messages (which may hold them all); a character a token, nothing held back.
    rest = stream_messages(live, resume=pb.Resume(token_ids=ids[:5], text_chars=5), **fields)
    assert rest[-1].complete.timings.first_token_seconds > 0


# -- the client ----------------------------------------------------------------------------------------------------
def _replicas(serve: Callable[..., Live]) -> tuple[Live, Live, str]:
    a, b = serve(stream_buffer_tokens=8), serve(stream_buffer_tokens=8)
    return a, b, f"127.0.0.1:{a.server.port},127.0.0.1:{b.server.port}"


def _shut_down_serving(replicas: tuple[Live, ...]) -> tuple[Live, threading.Thread]:
    """Begin the graceful shutdown, with no grace period, of the replica running the (one) generation: what is
    left of it ends with FINISH_REASON_CANCELLED."""
    wait_until(lambda: any(r.server.app.busy for r in replicas), "a replica runs the generation")
    (victim,) = [r for r in replicas if r.server.app.busy]
    stopping = threading.Thread(target=victim.server.stop, daemon=True)
    stopping.start()
    return victim, stopping


@pytest.mark.parametrize("flavour", ["sync", "asyncio"])
def test_failover_resumes_a_stream_its_replica_cancelled_while_shutting_down(
    serve: Callable[..., Live], flavour: str
) -> None:
    """A replica that shuts down (SIGTERM past its grace period: a rolling update) ends its streams with a final
    message saying CANCELLED; with failover that is a cut like any other, and the text goes on elsewhere (before:
    the caller got the cut text as if it had ended)."""
    a, b, target = _replicas(serve)
    expected = Client(f"127.0.0.1:{b.server.port}", timeout=CALL_TIMEOUT).generate("def ", **LONG)
    options: dict[str, Any] = {"timeout": CALL_TIMEOUT, "failover": True, "options": SMALL_WINDOW}
    if flavour == "sync":
        with Client(target, **options) as client:
            stream = client.stream("def ", return_token_ids=True, **LONG)
            messages = [next(stream)]
            _, stopping = _shut_down_serving((a, b))
            messages += list(stream)
    else:

        async def run() -> tuple[list[pb.GenerateStreamResponse], threading.Thread]:
            async with AsyncClient(target, **options) as client:
                stream = client.stream("def ", return_token_ids=True, **LONG)
                got = [await anext(stream)]
                _, stopping = await asyncio.to_thread(_shut_down_serving, (a, b))
                return got + [m async for m in stream], stopping

        messages, stopping = asyncio.run(run())
    stopping.join(CALL_TIMEOUT)
    assert "".join(m.text for m in messages) == expected.text
    assert [m for m in messages if m.HasField("complete")] == messages[-1:]
    done = messages[-1].complete
    assert (done.finish_reason, done.generated_tokens) == (pb.FINISH_REASON_LENGTH, 600)


def test_unary_failover_sends_a_generation_its_replica_cancelled_again(serve: Callable[..., Live]) -> None:
    a, b, target = _replicas(serve)
    gates = {id(r): r.gate() for r in (a, b)}  # the call is held in its replica's first graph call
    replies: list[Any] = []
    with Client(target, timeout=CALL_TIMEOUT, failover=True) as client:
        call = threading.Thread(target=lambda: replies.append(client.generate("def ", max_tokens=50)))
        call.start()
        wait_until(lambda: any(g.entered.is_set() for g in gates.values()), "a replica runs the call")
        victim = next(r for r in (a, b) if gates[id(r)].entered.is_set())
        gates[id(b if victim is a else a)].release()
        stopping = threading.Thread(target=victim.server.stop, daemon=True)
        stopping.start()
        wait_until(lambda: victim.engine.scheduler.stopping, "the replica cancels what is left")
        gates[id(victim)].release()
        call.join(CALL_TIMEOUT)
        stopping.join(CALL_TIMEOUT)
    (reply,) = replies
    assert reply.complete.finish_reason == pb.FINISH_REASON_LENGTH and reply.complete.generated_tokens == 50
    survivor = b if victim is a else a
    assert reply.text == survivor.generate("def ", max_tokens=50, seed=reply.complete.seed).text  # the fixed seed


def test_without_failover_a_stream_is_sent_as_asked(serve: Callable[..., Live]) -> None:
    """No token ids, model version or messages without text that the caller did not ask for (before: every
    stream asked for token ids, so held-back tokens came as empty messages, and got a seed fixed by the client)."""
    live = serve()
    with Client(f"127.0.0.1:{live.server.port}", timeout=CALL_TIMEOUT) as client:
        messages = list(client.stream(PROMPT, max_tokens=40, temperature=1.0, stop=["e\x00", "    \x00"]))
    assert not any(m.token_ids or m.model_version for m in messages)
    assert all(m.text for m in messages[:-1])


def test_with_failover_a_caller_gets_what_it_asked_for(serve: Callable[..., Live]) -> None:
    """Failover asks for token ids to resume; the caller sees them (and the model version, and messages of
    held-back tokens) only if it asked for them itself."""
    live = serve()
    fields: dict[str, Any] = {"max_tokens": 40, "seed": 3, "temperature": 1.0, "stop": ["e\x00", "    \x00"]}
    direct = stream_messages(live, **fields)
    with Client(f"127.0.0.1:{live.server.port}", timeout=CALL_TIMEOUT, failover=True) as client:
        plain = list(client.stream(PROMPT, **fields))
        asked = list(client.stream(PROMPT, return_token_ids=True, **fields))
    assert not any(m.token_ids or m.model_version for m in plain) and all(m.text for m in plain[:-1])
    assert "".join(m.text for m in plain) == "".join(m.text for m in direct)
    assert [t for m in asked for t in m.token_ids] == [t for m in direct for t in m.token_ids]
    assert asked[0].model_version == direct[0].model_version


def test_a_failed_over_stream_keeps_its_deadline(serve: Callable[..., Live]) -> None:
    """The client's timeout bounds the whole generation, as it would have bounded the uninterrupted stream: a
    resumed call gets what is left of it (before: each resumed call got the whole timeout again).

    Checked on the timeouts the client sends, exactly: the first call's deadline is fixed at most at ``sent[0]``
    + CALL_TIMEOUT, and every resumed call is made after ``cut`` (the shutdown that breaks the stream), so each
    may ask for at most CALL_TIMEOUT - (cut - sent[0]), however fast or slow the machine."""
    a, b, target = _replicas(serve)
    sent: list[tuple[float, float | None]] = []  # (when the call was made, its timeout)
    with Client(target, timeout=CALL_TIMEOUT, failover=True, options=SMALL_WINDOW) as client:
        real = client.stub.GenerateStream

        def recorded(request: Any, timeout: float | None = None, **kwargs: Any) -> Any:
            sent.append((time.monotonic(), timeout))
            return real(request, timeout=timeout, **kwargs)

        client.stub.GenerateStream = recorded  # type: ignore[method-assign]
        stream = client.stream("def ", **LONG)
        next(stream)
        cut = time.monotonic()
        _, stopping = _shut_down_serving((a, b))
        assert list(stream)[-1].complete.generated_tokens == LONG["max_tokens"]
        stopping.join(CALL_TIMEOUT)
    # A resume may first reach the replica that is shutting down and be tried again: every one is bounded.
    assert len(sent) >= 2 and sent[0][1] == CALL_TIMEOUT
    resumed = [timeout for _, timeout in sent[1:]]
    assert all(t is not None and 0 < t <= CALL_TIMEOUT - (cut - sent[0][0]) for t in resumed), sent
    assert resumed == sorted(resumed, reverse=True), sent  # what is left only shrinks


def test_deadline_exceeded_is_not_retried(serve: Callable[..., Live]) -> None:
    live = serve()
    recorder = live.observe()
    gate = live.gate()  # the call is held until its deadline has passed
    with Client(f"127.0.0.1:{live.server.port}", timeout=1.0, failover=True) as client:
        try:
            with pytest.raises(RemoteError) as err:
                list(client.stream(PROMPT, max_tokens=5, seed=1))
        finally:
            gate.release()
    assert err.value.status == "DEADLINE_EXCEEDED"
    assert len(recorder.started) == 1
