"""What a step's sampled tokens become for their clients: text pieces (from lookup tables, not per-token
tokenizer calls), stop strings (matched only for rows that have stops), log-probabilities (only for rows that
ask), the stream pacing that decides when a row's client is woken, and which rows are done.

Runs on the engine thread, once per step over all rows: the per-row work left is appending to each row's outbox
and its counters."""

from __future__ import annotations

import time

import numpy as np

from service.constraints import Advance
from service.logprobs import token_logprobs, top_logprobs
from service.observer import EngineObserver
from service.sequence import Delta, Finish, Sequence, TokenLogprob
from service.wakes import Wakes
from textgen.tokenizer import Level, TextTokenizer

Done = tuple[Sequence, Finish, str]  # a sequence that finished this step, how, and the stop string if any


class TokenText:
    """Every token's text piece, precomputed: a character model's piece is its character; a word model's is the
    word with a leading space unless it starts a line, and ``<eos>`` is a line break."""

    def __init__(self, tokenizer: TextTokenizer) -> None:
        ids = range(tokenizer.vocab_size)
        self.char = tokenizer.level is Level.CHAR
        self.eos = -1 if self.char or tokenizer.eos_id is None else tokenizer.eos_id
        inside = 1 if self.eos == 0 else 0  # any token that does not end a line
        self.bare = [tokenizer.piece(i, None) for i in ids]  # at the start of a line
        self.spaced = self.bare if self.char else [tokenizer.piece(i, inside) for i in ids]
        self.names = tokenizer.id_to_token

    def piece(self, token: int, previous: int | None) -> str:
        """``token``'s text after ``previous`` (None: nothing before it). ``emit`` inlines this for speed."""
        return self.bare[token] if previous is None or previous == self.eos else self.spaced[token]


class OutputProcessor:
    def __init__(self, tokenizer: TextTokenizer, observer: EngineObserver, wakes: Wakes, max_interval: int) -> None:
        self.text = TokenText(tokenizer)
        self.observer = observer
        self.wakes = wakes
        self.max_interval = max_interval

    def stream_interval(self, running: int) -> int:
        """Tokens gathered per stream message at this batch size. A message costs the transport (and the client)
        about as much CPU as a small model's whole decode step, so with ``running`` streams each sends every
        ``running``-th token: about one message per step in all, whatever the concurrency, up to
        ``max_interval`` tokens per message (vLLM's stream interval, sized by the batch). A single stream gets
        every token as it is sampled, and every stream its first token at once."""
        return max(1, min(self.max_interval, running))

    def emit(
        self, rows: list[Sequence], tokens: np.ndarray, logits: np.ndarray, steps: list[Advance | None] | None = None
    ) -> list[Done]:
        """Hand each row its sampled token; return the rows that are done. ``steps``, where a row is constrained
        (GenerateRequest.regex, .choices): what each constrained row's token did to its pattern."""
        done: list[Done] = []
        ends = None
        if steps is not None:
            rows, tokens, logits, ends = self._constrained(rows, tokens, logits, steps)
        interval = self.stream_interval(len(rows))
        wanted = [i for i, s in enumerate(rows) if s.tracks_logprob]
        chosen = {}
        tops: dict[int, tuple[TokenLogprob, ...]] = {}
        if wanted:  # a softmax over the rows that report or sum log-probabilities, none otherwise
            chosen = dict(zip(wanted, token_logprobs(logits[wanted], tokens[wanted]).tolist(), strict=True))
            for i, logprob in chosen.items():
                rows[i].cumulative_logprob += logprob
            tops = self._alternatives(rows, wanted, logits)
        now = time.monotonic()
        text = self.text
        bare, spaced, eos = text.bare, text.spaced, text.eos
        gaps: list[float] = []
        wake = self.wakes.add
        for i, (seq, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            seq.context.seen[token] = True
            if seq.counts is not None:  # (only when a presence or frequency penalty reads them)
                seq.counts[token] += 1
            first = not seq.first_token  # this call's first (a resumed stream has generated tokens before it)
            if first:
                seq.first_token = now
                self.observer.first_token(now - seq.arrived)
            else:
                gaps.append(now - seq.last_token)
            seq.last_token = now
            generated = seq.generated = seq.generated + 1
            seq.next_token = token
            previous, seq.previous = seq.previous, token
            piece = bare[token] if previous is None or previous == eos else spaced[token]
            last = generated >= seq.max_tokens
            ended = ends is not None and i in ends  # its pattern cannot go on after this token
            stop = None
            if seq.stop_ids and token in seq.stop_ids:  # its text is not sent; what was held back is, as at the end
                seq.stop_token, stop = token, ""
                piece = seq.stop_matcher.flush() if seq.stops else ""
            elif seq.stops:
                piece, stop = seq.stop_matcher.push(piece)
                if stop is None and (last or ended):
                    piece += seq.stop_matcher.flush()
            if seq.logprobs:
                logprob = TokenLogprob(token, text.names[token], chosen[i], tops.get(i, ()))
                seq.outbox.append(Delta(piece, [logprob], 1, token))
                seq.produced_tokens += 1
            elif piece or seq.token_ids:  # a held-back token's id is still sent (a resume needs every id)
                seq.outbox.append(Delta(piece, [], 1, token))
                seq.produced_tokens += 1
            if stop is not None:
                done.append((seq, Finish.STOP, stop))
            elif ended:
                done.append((seq, Finish.STOP, ""))
            elif last:
                done.append((seq, Finish.LENGTH, ""))
            elif first or seq.produced_tokens - seq.consumed_tokens >= interval:  # the first never waits
                wake(seq)
        self.observer.sampled(len(rows), gaps)
        return done

    def _constrained(
        self,
        rows: list[Sequence],
        tokens: np.ndarray,
        logits: np.ndarray,
        steps: list[Advance | None],
    ) -> tuple[list[Sequence], np.ndarray, np.ndarray, set[int] | None]:
        """Constrained decoding's share of a step (service/constraints.py). A row whose token would leave its matched
        pattern ends before it (the engine ends it: finish STOP): the token is not emitted nor counted, and text
        held back for a stop string is released. Returns the other rows and which of them end right after their
        token (nothing can follow it)."""
        rejected = [i for i, step in enumerate(steps) if step is Advance.REJECT]
        for i in rejected:
            seq = rows[i]
            held = seq.stop_matcher.flush() if seq.stops else ""
            if held:
                seq.outbox.append(Delta(held, [], 0))
        if rejected:
            keep = [i for i, step in enumerate(steps) if step is not Advance.REJECT]
            rows, tokens, logits, steps = [rows[i] for i in keep], tokens[keep], logits[keep], [steps[i] for i in keep]
        return rows, tokens, logits, {i for i, step in enumerate(steps) if step is Advance.END} or None

    def _alternatives(
        self, rows: list[Sequence], wanted: list[int], logits: np.ndarray
    ) -> dict[int, tuple[TokenLogprob, ...]]:
        """The top_logprobs of the rows that asked for them (row index -> most likely first)."""
        ranked = [i for i in wanted if rows[i].top_logprobs]
        if not ranked:
            return {}
        ids, values = top_logprobs(logits[ranked], max(rows[i].top_logprobs for i in ranked))
        names = self.text.names
        out = {}
        for i, row_ids, row_values in zip(ranked, ids.tolist(), values.tolist(), strict=True):
            n = rows[i].top_logprobs
            out[i] = tuple(TokenLogprob(t, names[t], v) for t, v in zip(row_ids[:n], row_values[:n], strict=True))
        return out
