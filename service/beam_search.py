"""Beam search (GenerateRequest.num_beams): Hugging Face's deterministic beam search over a model's host states.

The rules, which the proto and README state:
- The context runs once. Each step takes every running beam's next-token log-probabilities (a log-softmax of the
  logits after the repetition penalty, presence and frequency penalties, logit bias and allowed/banned tokens:
  ``textgen.logit_controls``, each beam with its own seen tokens and generated counts), adds the beam's running
  sum and ranks the continuations of all beams together, best first; ties go to the lower beam, then the lower
  token id, so a search is deterministic.
- In rank order, a continuation that ends (a stop token, a completed stop string: one ``StopMatcher`` per beam,
  copied when a beam forks) is a finished hypothesis if it ranks among the best ``num_beams`` (else dropped, as in
  Hugging Face); any other continues as a running beam, until ``num_beams`` beams run.
- A hypothesis's score is its sum divided by (generated tokens ** length_penalty), the stop token counted. The best
  ``num_beams`` hypotheses are kept.
- The search ends when no beam runs; or when ``num_beams`` hypotheses are kept and either ``early_stopping`` or
  (Hugging Face's heuristic) the best running beam's sum divided by (its generated tokens ** length_penalty) does
  not beat the worst kept score; or at ``max_tokens``, where the running beams become hypotheses (finish LENGTH).
- A finished beam reports its text (stop strings never in it), its tokens' log-probabilities under the model's own
  distribution (temperature 1, before any control: as ``logprobs`` reports) and the state after its text with its
  last token pending, as Generate leaves a context.

Everything here runs on a worker thread (``service.workers``); ``check`` is called before every graph call, so a
cancelled or expired search stops within one step. A step costs one graph call of at most ``num_beams`` rows."""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from service.logprobs import token_logprobs, top_logprobs
from service.models import ServedModel, State
from service.output import TokenText
from service.sequence import Finish, TokenLogprob
from service.stops import StopMatcher
from service.word_search import log_softmax
from service.workers import run_context
from textgen.logit_controls import controlled_logits
from textgen.sampling import SamplingParams


@dataclass(frozen=True)
class BeamParams:
    """One search's settings, checked by the caller (``service.beam_generate``)."""

    num_beams: int
    max_tokens: int
    length_penalty: float = 1.0
    early_stopping: bool = False
    controls: SamplingParams = field(default_factory=SamplingParams)  # steps 1-4 of the sampling rule only
    stops: tuple[str, ...] = ()
    stop_ids: frozenset[int] = frozenset()
    top_logprobs: int = 0  # alternatives reported per token
    chunk: int = 512  # context tokens per graph call


@dataclass(frozen=True)
class Beam:
    """A finished hypothesis."""

    token_ids: list[int]
    pieces: list[str]  # the text each token released (a stream's deltas: held-back text comes later or never)
    finish: Finish  # STOP or LENGTH
    stop: str  # the stop string that ended it, if one did
    stop_token: int  # the stop token that ended it, or -1
    score: float  # its summed log-probability as the search saw it / generated tokens ** length_penalty
    logprobs: list[TokenLogprob]  # under the model's own distribution
    state: State  # after all its tokens but the last (pending), batch 1

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(t.logprob for t in self.logprobs))


@dataclass(frozen=True)
class _Node:
    """One generated token of some beam: the beams share their common prefixes."""

    parent: _Node | None
    token: int
    logprob: TokenLogprob


@dataclass
class _Hypothesis:
    score: float
    node: _Node
    finish: Finish
    stop_token: int
    state: State


class _Kept:
    """The best ``size`` hypotheses so far, best first (a new one equal to the worst ranks after it)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.best: list[_Hypothesis] = []

    def add(self, hyp: _Hypothesis) -> None:
        at = next((i for i, h in enumerate(self.best) if h.score < hyp.score), len(self.best))
        self.best.insert(at, hyp)
        del self.best[self.size :]

    @property
    def full(self) -> bool:
        return len(self.best) >= self.size


@dataclass
class _Running:
    """The running beams: row ``i`` of every array (and of the model state) is beam ``i``."""

    nodes: list[_Node | None]
    sums: np.ndarray  # float64: the search's summed log-probabilities
    previous: list[int]  # each beam's last token (a word model's spacing)
    matchers: list[StopMatcher] | None  # None: no stop strings
    seen: np.ndarray | None  # bool [beams, vocab], only when the repetition penalty reads it
    counts: np.ndarray | None  # float32 [beams, vocab], only when a presence or frequency penalty reads it


def beam_search(
    model: ServedModel,
    text: TokenText,
    state: State,
    feed: np.ndarray,
    seen: np.ndarray,
    params: BeamParams,
    check: Callable[[], None],
) -> list[Beam]:
    """The finished beams after running ``feed`` (at least one token) from ``state`` (batch 1), best first: at most
    ``num_beams``, fewer only when fewer continuations exist. ``seen``: the tokens the context has seen (bool
    [vocab], the repetition penalty's), ``feed`` included."""
    logits, _, state = run_context(model, state, feed, params.chunk, check)
    return search_from(model, text, logits, state, int(feed[-1]), seen, params, check)


def search_from(
    model: ServedModel,
    text: TokenText,
    logits: np.ndarray,
    state: State,
    last: int,
    seen: np.ndarray,
    params: BeamParams,
    check: Callable[[], None],
) -> list[Beam]:
    """``beam_search`` once its context has run: ``logits`` [1, vocab] after the context's last token ``last``,
    ``state`` after it."""
    controls = params.controls
    vocab = logits.shape[-1]
    beams = _Running(
        [None],
        np.zeros(1),
        [last],
        [StopMatcher(list(params.stops))] if params.stops else None,
        seen[None].copy() if controls.repetition_penalty != 1.0 else None,
        np.zeros((1, vocab), np.float32) if controls.penalises else None,
    )
    kept = _Kept(params.num_beams)
    for length in range(1, params.max_tokens + 1):
        adjusted = controlled_logits(logits, controls, beams.seen, beams.counts)
        totals = beams.sums[:, None] + _log_probs(adjusted)
        final = length == params.max_tokens
        beams, rows, tokens = _step(beams, totals, logits, state, kept, text, params, length, final)
        parents = tuple(s[:, rows, :] for s in state)  # each new beam's state before its last token
        if final:
            for i, node in enumerate(beams.nodes):
                assert node is not None
                score = float(beams.sums[i]) / length**params.length_penalty
                kept.add(_Hypothesis(score, node, Finish.LENGTH, -1, tuple(s[:, i : i + 1] for s in parents)))
            break
        if not beams.nodes:
            break
        if kept.full and (
            params.early_stopping or kept.best[-1].score >= float(beams.sums.max()) / length**params.length_penalty
        ):
            break
        check()
        out, state = model.run(np.asarray(tokens, np.int64)[:, None], np.zeros(1, np.int64), parents)
        logits = out[:, 0]
    return [_finished(h, text, params, last) for h in kept.best]


def _step(
    beams: _Running,
    totals: np.ndarray,
    logits: np.ndarray,
    state: State,
    kept: _Kept,
    text: TokenText,
    params: BeamParams,
    length: int,
    last: bool,
) -> tuple[_Running, list[int], list[int]]:
    """Rank the continuations, keep the finished ones among the best ``num_beams``, and return the next running
    beams with each one's parent row and new token."""
    width = params.num_beams
    finite = int(np.isfinite(totals).sum())
    take = min(2 * width, finite)  # enough unless more than ``width`` of them end (several stop ids or strings)
    while True:
        ended, rows, tokens, matchers = [], [], [], []
        order = _ranked(totals, take)
        for rank, flat in enumerate(order.tolist()):
            row, token = divmod(flat, totals.shape[1])
            finish, matcher = _ends(beams, row, token, text, params)
            if finish:
                if rank < width:
                    ended.append((row, token))
            else:
                rows.append(row)
                tokens.append(token)
                matchers.append(matcher)
                if len(rows) == width:
                    break
        if len(rows) == width or take >= finite:
            break
        take = finite  # more than ``width`` of the best ended: rank them all
    nodes = _nodes(beams, logits, ended + list(zip(rows, tokens, strict=True)), params.top_logprobs, text.names)
    for (row, token), node in zip(ended, nodes[: len(ended)], strict=True):
        score = float(totals[row, token]) / length**params.length_penalty
        stop_token = token if token in params.stop_ids else -1
        kept.add(_Hypothesis(score, node, Finish.STOP, stop_token, tuple(s[:, row : row + 1] for s in state)))
    seen = counts = None
    if beams.seen is not None:
        seen = beams.seen[rows]
        seen[np.arange(len(rows)), tokens] = True
    if beams.counts is not None:
        counts = beams.counts[rows]
        counts[np.arange(len(rows)), tokens] += 1
    running = _Running(
        list(nodes[len(ended) :]),
        totals[rows, tokens],
        tokens,
        matchers if beams.matchers is not None else None,
        seen,
        counts,
    )
    return running, rows, tokens


def _ends(
    beams: _Running, row: int, token: int, text: TokenText, params: BeamParams
) -> tuple[bool, StopMatcher | None]:
    """Whether beam ``row`` continued by ``token`` ends there (a stop token or stop string), and its stop matcher
    after the token (a copy: beams that share a parent fork it)."""
    if token in params.stop_ids:
        return True, None
    if beams.matchers is None:
        return False, None
    matcher = copy.copy(beams.matchers[row])
    _, stop = matcher.push(text.piece(token, beams.previous[row]))
    return stop is not None, matcher


def _nodes(
    beams: _Running, logits: np.ndarray, chosen: list[tuple[int, int]], alternatives: int, names: list[str]
) -> list[_Node]:
    """The new tokens' history nodes, with their log-probabilities under the model's own distribution."""
    if not chosen:
        return []
    rows = [r for r, _ in chosen]
    own = logits[rows]
    values = token_logprobs(own, np.array([t for _, t in chosen])).tolist()
    tops: list[tuple[TokenLogprob, ...]] = [()] * len(chosen)
    if alternatives:
        ids, top_values = top_logprobs(own, alternatives)
        tops = [
            tuple(TokenLogprob(t, names[t], v) for t, v in zip(i, vs, strict=True))
            for i, vs in zip(ids.tolist(), top_values.tolist(), strict=True)
        ]
    return [
        _Node(beams.nodes[r], t, TokenLogprob(t, names[t], v, top))
        for (r, t), v, top in zip(chosen, values, tops, strict=True)
    ]


def _ranked(totals: np.ndarray, k: int) -> np.ndarray:
    """Flat indices (beam * vocab + token) of at least the ``k`` best finite entries of ``totals`` (all of those
    tied with the k-th), best first, ties by index."""
    flat = totals.ravel()
    if k <= 0:
        return np.zeros(0, np.int64)
    if k < flat.size:
        kth = np.partition(flat, flat.size - k)[flat.size - k]
        picked = np.flatnonzero(flat >= kth)
    else:
        picked = np.flatnonzero(flat > -np.inf)
    return picked[np.lexsort((picked, -flat[picked]))]


def _log_probs(x: np.ndarray) -> np.ndarray:
    """Log-softmax of each row of adjusted logits (float64). A row whose largest logit is +inf (a tiny repetition
    penalty) puts its mass on those tokens equally, as the sampler does; a row with every token excluded has none."""
    peak = x.max(axis=1)
    if np.isfinite(peak).all():
        return log_softmax(x)
    x = np.where(np.isposinf(peak)[:, None], np.where(x == np.inf, 0.0, -np.inf), x)
    with np.errstate(invalid="ignore"):
        out = log_softmax(x)
    out[np.isneginf(peak)] = -np.inf
    return out


def _finished(hyp: _Hypothesis, text: TokenText, params: BeamParams, before: int) -> Beam:
    """A kept hypothesis as the caller reports it: its tokens, text and log-probabilities."""
    nodes = []
    node: _Node | None = hyp.node
    while node is not None:
        nodes.append(node)
        node = node.parent
    nodes.reverse()
    tokens = [n.token for n in nodes]
    pieces, stop = _pieces(tokens, text, params, before, hyp.stop_token >= 0)
    return Beam(tokens, pieces, hyp.finish, stop, hyp.stop_token, hyp.score, [n.logprob for n in nodes], hyp.state)


def _pieces(
    tokens: list[int], text: TokenText, params: BeamParams, before: int, stop_token: bool
) -> tuple[list[str], str]:
    """The text each of a beam's tokens releases and the stop string that ended it, as ``service.output`` streams
    them: the tokens' pieces through a stop matcher; a stop token's own text is not sent, held-back text is (with
    the stop token, or with the last token at max_tokens)."""
    matcher = StopMatcher(list(params.stops))
    pieces = []
    previous = before
    for token in tokens[:-1] if stop_token else tokens:
        piece, stop = matcher.push(text.piece(token, previous))
        pieces.append(piece)
        previous = token
        if stop is not None:
            return pieces, stop
    if stop_token:
        pieces.append(matcher.flush())
    else:
        pieces[-1] += matcher.flush()
    return pieces, ""
