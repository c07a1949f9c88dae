"""Resuming a stream whose replica failed, exactly: the client sends the same request plus the token ids and the
number of characters it received, and the new sequence starts where the interrupted one stood.

What makes it exact is that a sequence's future depends only on what this module rebuilds:
- the recurrent state after the prompt and the received tokens: the prompt and all received tokens but the last
  run as context, and the last one becomes the token the next decode step feeds (as it was, so the sequence also
  ends with the same pending token, which a snapshot carries);
- the sampler's generator: exactly one draw per sampled token (``textgen.sampling``), so it is the seeded
  generator advanced by the number of tokens received (none for greedy requests);
- the tokens seen (the repetition penalty), the counts of generated tokens (presence and frequency penalties) and
  the previous token (word spacing);
- the stop matcher's hold-back: the received tokens' text is pushed through a new matcher, which also yields how
  much of it the old stream had released; that must equal what the client says it received, or the resume is
  refused (another model, another request, a client bug), rather than continuing another text;
- a constraint's place in its pattern (GenerateRequest.regex, .choices): the received tokens are taken again.

A stream that had already ended (its last token, a stop string or a stop token was sent, only the final message
was lost) resumes to its ending at once, with the same final context.

The received tokens run as a prompt chunk, alone, where the interrupted stream decoded them one a step, batched
with whatever else ran: the same state only if the replica's kernels compute a row to the same bits either way.
``replay_refusal`` finds out once, at start-up, on the model's own providers; where they do not, a resume is
refused rather than continued with another text."""

from __future__ import annotations

from collections.abc import Sequence as Ids
from dataclasses import dataclass

import numpy as np

from service.constraints import Advance, Cursor
from service.models import ServedModel
from service.output import TokenText
from service.sequence import Finish, Sequence
from service.stops import StopMatcher
from textgen.errors import FailedPreconditionError, InvalidInputError


@dataclass
class ResumeSpec:
    """GenerateRequest.resume as received."""

    token_ids: Ids[int]  # the request's own repeated field: nothing is copied before its length is checked
    text_chars: int = 0
    model_version: str = ""


@dataclass
class Replay:
    """Where the interrupted stream stood after its last received token."""

    tokens: np.ndarray  # int64, the received token ids
    matcher: StopMatcher
    ending: tuple[Finish, str] | None  # it had already ended there
    stop_token: int = -1  # the stop token it ended on, if it did


# The start-up check's tokens and batch companions: several timesteps and rows, a few milliseconds of graph calls.
_CHECK_TOKENS = 8
_CHECK_COMPANIONS = 3


def replay_refusal(model: ServedModel) -> str:
    """Why this replica cannot resume ``model``'s streams exactly ('' when it can): whether a row's state and
    logits are the same bits decoded alone, decoded beside other rows, run as a prompt chunk alone and beside
    another chunk. fp32 on the CPU is (measured up to 2 x 650 LSTMs, 256-token chunks, 40 companions); int8 is
    not (dynamic quantization scales a whole batch, or chunk, at once), nor is fp16 on the CPU (a chunk differs
    from steps); other providers are checked here, on a pool of their own."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, model.vocab_size, _CHECK_TOKENS)
    zero = model.zero_state(1)
    pool = model.batch_state(4 + 1 + _CHECK_COMPANIONS)  # the four rows compared, and their companions
    chunk, chunk_beside, step, step_beside = (pool.acquire(zero) for _ in range(4))
    noise = [pool.acquire(tuple(rng.standard_normal(s.shape, np.float32) for s in zero)) for _ in range(4)]
    last = np.array([tokens.size - 1])
    logits = {chunk: np.array(pool.run(tokens[None], last, np.array([chunk]))[0, -1])}
    pair = np.stack([tokens, rng.integers(0, model.vocab_size, tokens.size)])
    logits[chunk_beside] = np.array(pool.run(pair, last, np.array([chunk_beside, noise[0]]))[0, -1])
    for i, token in enumerate(tokens.tolist()):
        logits[step] = np.array(pool.decode(np.array([token]), np.array([step]))[0])  # copied: buffers are reused
        k = 1 + i % _CHECK_COMPANIONS
        others = rng.integers(0, model.vocab_size, k)
        beside = pool.decode(np.array([token, *others]), np.array([step_beside, *noise[1 : k + 1]]))
        logits[step_beside] = np.array(beside[0])
    states = {slot: pool.take([slot]) for slot in logits}

    def same(x: int, y: int) -> bool:
        pairs = [(logits[x], logits[y]), *zip(states[x], states[y], strict=True)]
        return all(np.array_equal(u, v) for u, v in pairs)

    if not same(step, step_beside):
        return "a decode step's output depends on the rows batched with it"
    if not same(chunk, chunk_beside):
        return "a prompt's output depends on the prompts batched with it"
    if not same(chunk, step):
        return "a prompt chunk and the same tokens decoded one a step give different bits"
    return ""


def check(spec: ResumeSpec, model: ServedModel, max_tokens: int, refusal: str = "") -> np.ndarray:
    """The received token ids, validated (cheap checks, before any replay). ``refusal``: ``replay_refusal``'s."""
    if spec.model_version and spec.model_version != model.version:
        raise FailedPreconditionError(
            f"resume.model_version: the interrupted stream ran {model.name} version {spec.model_version}; this "
            f"replica serves version {model.version}, whose text would differ"
        )
    k = len(spec.token_ids)
    if k > max_tokens:
        raise InvalidInputError(f"resume.token_ids: {k} tokens exceed the request's max_tokens ({max_tokens})")
    if refusal and k:  # (with nothing received, a resume is a new start, which is exact)
        raise FailedPreconditionError(
            f"resume: {model.name} ({model.bundle.manifest.graph.precision} on {', '.join(model.bundle.providers)})"
            f" cannot continue a stream exactly on this replica: {refusal}"
        )
    tokens = np.asarray(spec.token_ids, dtype=np.int64)
    if k and int(tokens.max()) >= model.vocab_size:
        i = int(np.argmax(tokens >= model.vocab_size))
        raise InvalidInputError(
            f"resume.token_ids[{i}]: {int(tokens[i])} is not a token of {model.name} (vocabulary {model.vocab_size})"
        )
    return tokens


def replay(
    spec: ResumeSpec,
    tokens: np.ndarray,
    text: TokenText,
    stops: list[str],
    max_tokens: int,
    previous: int | None,
    stop_ids: frozenset[int] = frozenset(),
    constraint: Cursor | None = None,
) -> Replay:
    """Push the received tokens' text through a new stop matcher as the engine did (``OutputProcessor.emit``), and
    through the request's constraint if it has one (``constraint``: a cursor at the start of the generation, moved
    to where the stream stood); O(text of the tokens), so long replays run off the event loop. ``previous`` is the
    token before them."""
    matcher = StopMatcher(stops)
    released = 0
    ending: tuple[Finish, str] | None = None
    stop_token = -1
    ids = tokens.tolist()
    for i, token in enumerate(ids):
        if ending is not None:
            raise InvalidInputError(
                f"resume.token_ids: the stream ended at token {i - 1} ({ending[0].value}); {len(ids) - i} more "
                "tokens cannot have been sent"
            )
        piece = text.piece(token, previous)
        previous = token
        last = i + 1 >= max_tokens
        ended = False  # its constraint cannot go on after it
        if constraint is not None:
            step = constraint.advance(token, check=True)
            if step is Advance.REJECT:
                raise InvalidInputError(
                    f"resume.token_ids[{i}]: {token} does not follow the request's {constraint.spec.field}: these "
                    "are not what this request's stream sent"
                )
            ended = step is Advance.END
        if token in stop_ids:  # a stop token: its text never sent, what was held back released
            piece, ending, stop_token = matcher.flush() if stops else "", (Finish.STOP, ""), token
        elif stops:
            piece, stop = matcher.push(piece)
            if stop is not None:
                ending = (Finish.STOP, stop)
            elif last or ended:
                piece += matcher.flush()
        released += len(piece)
        if ended and ending is None:
            ending = (Finish.STOP, "")
        if last and ending is None:
            ending = (Finish.LENGTH, "")
    held = matcher.held
    if (
        ending is None
        and constraint is not None
        and constraint.matched
        and held
        and released + len(held) == spec.text_chars
    ):
        # Only an ending releases held-back text without a token of its own: the text matched and the next token
        # would have left the pattern (``OutputProcessor``), which the stream had already sent.
        released += len(matcher.flush())
        ending = (Finish.STOP, "")
    if released != spec.text_chars:
        raise InvalidInputError(
            f"resume.text_chars: these {len(ids)} tokens made {released} characters of text, not "
            f"{spec.text_chars}: they are not what this request's stream sent"
        )
    return Replay(tokens, matcher, ending, stop_token)


def feed(prompt_feed: np.ndarray, done: Replay) -> np.ndarray:
    """What the resumed sequence runs before its first step: the prompt and every received token but the last."""
    if done.tokens.size == 0:
        return prompt_feed
    return np.concatenate([prompt_feed, done.tokens[:-1]]).astype(np.int64)


def apply(seq: Sequence, done: Replay) -> None:
    """Put a new sequence (built on ``feed``) where the interrupted one stood. Its generator is advanced here too,
    one draw per received token it sampled."""
    k = int(done.tokens.size)
    if k == 0:
        return
    last = int(done.tokens[-1])
    seq.context.seen[done.tokens] = True
    if seq.counts is not None:
        seq.counts += np.bincount(done.tokens, minlength=seq.counts.size).astype(np.float32)
    if seq.params.temperature != 0.0:
        seq.context.rng.bit_generator.advance(k)
    seq.replayed = k - 1
    seq.generated = k
    seq.previous = last
    seq.stop_matcher = done.matcher
    seq.resume_token = last
    seq.resume_ending = done.ending
    seq.stop_token = done.stop_token
