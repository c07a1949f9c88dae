"""What Predict computes once its context has run: the most likely next tokens (one softmax row) or, for a
character model, the most likely next words (a beam search over characters up to a word boundary).

The rules, which the proto and README state:
- A word is what the word tokenizers call one: a run of characters up to whitespace (any character ``str.isspace``
  accepts: space, tab, line breaks). Punctuation belongs to the word ("dog." is a word), as a word model's
  whitespace split has it.
- A word's log-probability is that of its characters followed by a boundary, any boundary: log P(chars) +
  log sum_b P(b | chars). That is the probability that the next word is this one (without the boundary a prefix
  would always beat its words); the boundary itself is not part of the text.
- After a partial word the search continues it: the text is the rest of the word, and an empty text means the word
  is complete as it stands. After whitespace (or at the start) a word has at least one character.
- ``<unk>`` is never predicted (no one can type it); a word model's ``<eos>`` (a line break) is a token but no word.
- The beam keeps the ``max(2 N, 8)`` most likely unfinished words per character; the search stops when N words are
  found that no unfinished one can beat (extending a word only lowers its probability), or at ``max_chars``.

Everything here runs on a worker thread (``service.predict``), never on the event loop; ``check`` is called before
every graph call, so a cancelled or expired call stops within one step."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.models import ServedModel, State

_MIN_BEAM = 8


@dataclass(frozen=True)
class Found:
    token_ids: list[int]
    logprob: float


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Rows of ``logits`` [n, vocab] as log-probabilities (float64: sums of many of them are compared)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def beam_width(n: int) -> int:
    return max(2 * n, _MIN_BEAM)


class Vocabulary:
    """A model's tokens as Predict sees them: which are boundaries, which may be predicted."""

    def __init__(self, model: ServedModel) -> None:
        tok = model.tokenizer
        self.char = tok.level.value == "char"
        pieces = [tok.piece(i, None) for i in range(tok.vocab_size)]
        self.text = ["\n" if i == tok.eos_id else p for i, p in enumerate(pieces)]
        self.boundary = np.array([self.char and p.isspace() for p in pieces])
        self.banned = np.zeros(tok.vocab_size, bool)  # never predicted
        self.banned[tok.unk_id] = True
        self.not_words = self.banned.copy()  # tokens that are no word of a word model
        if tok.eos_id is not None:
            self.not_words[tok.eos_id] = True

    def ends_word(self, token: int) -> bool:
        """Whether the context ends at a word boundary after ``token`` (its last token fed)."""
        return not self.char or self.text[token].isspace()


def top_tokens(logprobs: np.ndarray, n: int, banned: np.ndarray) -> list[Found]:
    """The ``n`` most likely tokens of one log-probability row, most likely first."""
    row = np.where(banned, -np.inf, logprobs)
    n = min(n, int((~banned).sum()))
    best = np.argpartition(-row, n - 1)[:n] if n else np.zeros(0, np.int64)
    best = best[np.argsort(-row[best], kind="stable")]
    return [Found([int(t)], float(row[t])) for t in best]


def search_words(
    model: ServedModel,
    vocab: Vocabulary,
    logprobs: np.ndarray,
    state: State,
    n: int,
    max_chars: int,
    allow_empty: bool,
    check: Callable[[], None],
) -> list[Found]:
    """The ``n`` most likely next words after a context whose next-token log-probabilities are ``logprobs``
    [vocab] and whose state is ``state`` (batch 1), most likely first (fewer if fewer words of at most
    ``max_chars`` characters exist)."""
    width = beam_width(n)
    extend = ~(vocab.boundary | vocab.banned)  # characters a word may continue with
    boundary = vocab.boundary
    prefixes: list[list[int]] = [[]]
    scores = np.zeros(1)  # cumulative log-probability of each open prefix
    rows = logprobs[None, :]  # each open prefix's next-character log-probabilities
    found: list[Found] = []
    for depth in range(max_chars + 1):
        if depth > 0 or allow_empty:  # each prefix completed by any boundary is a word
            ends = scores + np.logaddexp.reduce(np.where(boundary, rows, -np.inf), axis=1)
            found.extend(Found(p, float(s)) for p, s in zip(prefixes, ends.tolist(), strict=True) if s > -np.inf)
            found.sort(key=lambda f: -f.logprob)
            del found[n:]
        if depth == max_chars:
            break
        grown = np.where(extend, scores[:, None] + rows, -np.inf)  # [open prefixes, vocab]
        k = min(width, int(np.isfinite(grown).sum()))
        if k == 0:
            break
        flat = np.argpartition(-grown.ravel(), k - 1)[:k]
        flat = flat[np.argsort(-grown.ravel()[flat], kind="stable")]
        if len(found) >= n and grown.ravel()[flat[0]] <= found[-1].logprob:
            break  # no unfinished word can beat the n found: extending only lowers a probability
        parents, chars = np.divmod(flat, grown.shape[1])
        check()
        logits, state = model.run(
            chars.astype(np.int64)[:, None], np.zeros(1, np.int64), tuple(s[:, parents, :] for s in state)
        )
        prefixes = [[*prefixes[p], int(c)] for p, c in zip(parents.tolist(), chars.tolist(), strict=True)]
        scores = grown.ravel()[flat]
        rows = log_softmax(logits[:, 0])
    return found
