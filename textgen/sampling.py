"""The sampling rule, defined once, in numpy, so that the torch reference sampler (``textgen sample``) and the
ONNX Runtime service draw the same token for the same logits and seed.

For one row of logits the rule is, in this order, all in float32 (float16 logits are widened exactly, float64
ones rounded; every parameter is rounded to float32, temperature and repetition penalty to at least 2^-126; NaN
logits are not supported). Penalties and biases act on the logits, then temperature, then the filters (top_k,
top_p, min_p), as in vLLM:
1. repetition penalty (CTRL, Keskar et al. 2019) on every token already seen in the prompt or the output:
   a positive logit is divided by the penalty, any other multiplied by it;
2. presence and frequency penalties (OpenAI) on the tokens this request has generated: a token generated ``c``
   times (``c`` as float32) gets ``logit - (c * frequency_penalty + presence_penalty)`` when ``c > 0`` (the
   product and the sum rounded to float32);
3. ``logit_bias``: the token's bias is added to its logit;
4. banned tokens, tokens outside ``allowed_token_ids`` when it is given, and tokens a row's constraint mask
   excludes (GenerateRequest.regex, .choices) are excluded: their logit is -inf, and they stay so below;
5. temperature 0 means greedy: the arg-max (the lowest id among equals; the lowest id not excluded when every
   other logit is -inf), and no random number is drawn;
6. otherwise the logits are divided by the temperature. If the largest logit is not finite (+inf, or every
   logit -inf), the tokens equal to it that are not excluded get logit 0 and all others -inf;
7. ``top_k``: tokens below the k-th largest logit are dropped (ties with the k-th are kept);
8. ``p = exp(logit - largest logit)``: the largest gets exactly 1, dropped tokens 0;
9. ``top_p``: the tokens sorted by ``p`` descending (equal ``p``: lower id first) are kept up to and
   including the first at which their running sum reaches ``top_p * total`` (``total`` as in 11, of the ``p``
   of step 8); all of them if it never does. The others get ``p = 0``;
10. ``min_p``: tokens with ``p < min_p`` get ``p = 0``; as the largest ``p`` is exactly 1, that is min_p times
   the most likely token's probability (the most likely tokens always stay: min_p 1 keeps only them);
11. the pick: inverse CDF over token-id order with one uniform ``u`` in [0, 1) from the request's own PCG64
   generator, on two levels. The vocabulary is cut into blocks of BLOCK (256) ids, the last one shorter if
   need be; ``S[b]`` is numpy's sum of block ``b``'s ``p`` (``np.add.reduce``: pairwise, fixed for a given
   length), ``C[b]`` the running sum of ``S`` up to block ``b`` and ``total`` the last ``C``. With
   ``t = u * total`` (float64), the pick is in the first block ``b`` whose ``C[b] > t``: the first token in
   it whose ``C[b-1] + Q > t`` (``C[b-1]`` 0 for the first block; ``Q`` the running sum of ``p`` in the
   block up to and including the token; the sum and comparison in float64). Where rounding leaves no such
   block or token, the pick is the last token with ``p > 0`` in block ``b`` (the last block when no
   ``C[b]`` exceeds ``t``). Either way the token picked has ``p > 0``.
Running sums are sequential float32 sums; the exponential and the block sums are numpy's float32 routines
(bit-identical on one machine and numpy build, not necessarily across CPUs or numpy versions). Every step is
elementwise or confined to one row (``tests/test_sampling.py`` checks the numpy paths taken for one row and for
many give the same bits), so a row's token depends only on its own logits, parameters, counts and generator: a
seeded request draws the same token alone or batched with others. Exactly one ``random()`` is drawn per sampled
row and call. Steps 2 to 4 and 10 cost only the rows that use them. ``bench/sampling.py`` holds a plain per-row
implementation of this rule; the tests hold ``sample_batch`` to it token for token.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.lib.stride_tricks import as_strided

from textgen.errors import InvalidInputError
from textgen.logit_controls import (
    LogitControls,
    adjust,
    apply_masks,
    check_controls,
    exclude_row,
    greedy_fallback,
    parameter32,
    repetition_penalty,
)

BLOCK = 256  # tokens per block of the pick: the CDF is a few dozen block sums plus one block's running sum
CANDIDATES = 1024  # first top_p candidate set: the nucleus of most rows, grown for the rows it does not hold
ROW_SORT = 512  # top_p on a single row up to this size: one stable argsort (cheaper below, dearer above)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # 1.0: none
    min_p: float = 0.0  # 0: no min-p filter
    presence_penalty: float = 0.0  # OpenAI's, on this request's generated tokens; 0: none
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), each id at most once
    allowed_token_ids: tuple[int, ...] = ()  # empty: every token allowed
    banned_token_ids: tuple[int, ...] = ()
    # Derived in __post_init__: whether steps 2-4 of the rule touch this row, and its per-vocabulary arrays.
    adjusts: bool = field(default=False, init=False, repr=False, compare=False)
    controlled: bool = field(default=False, init=False, repr=False, compare=False)  # adjusts, or min_p
    penalises: bool = field(default=False, init=False, repr=False, compare=False)
    _controls: dict[int, LogitControls] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise InvalidInputError(f"temperature must be in [0, 100] (got {self.temperature})")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0 (got {self.top_k})")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInputError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not (0.0 < self.repetition_penalty <= 100.0):
            raise InvalidInputError(f"repetition_penalty must be in (0, 100] (got {self.repetition_penalty})")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidInputError(f"min_p must be in [0, 1] (got {self.min_p})")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                raise InvalidInputError(f"{name} must be in [-2, 2] (got {getattr(self, name)})")
        check_controls(self)
        penalises = self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
        adjusts = penalises or bool(self.logit_bias or self.allowed_token_ids or self.banned_token_ids)
        object.__setattr__(self, "penalises", penalises)
        object.__setattr__(self, "adjusts", adjusts)
        object.__setattr__(self, "controlled", adjusts or self.min_p > 0.0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def controls(self, vocab: int) -> LogitControls:
        """This row's bias and exclusion arrays for a vocabulary of ``vocab`` tokens (built once per size)."""
        built = self._controls.get(vocab)
        if built is None:
            built = self._controls[vocab] = LogitControls.build(self, vocab)
        return built


def new_rng(seed: int) -> np.random.Generator:
    """The per-request generator: PCG64, whose whole state is two integers (easy to snapshot)."""
    if not (0 <= seed < 2**64):
        raise InvalidInputError(f"seed must be in [0, 2**64) (got {seed})")
    return np.random.Generator(np.random.PCG64(seed))


def random_seed() -> int:
    """A fresh seed for a request that gave none (reported back so the result can be reproduced)."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])


def candidate_seed(seed: int, index: int) -> int:
    """The seed of candidate ``index`` (GenerateRequest.n) of a request whose seed is ``seed``: ``seed`` for 0."""
    return int(np.random.SeedSequence(seed, spawn_key=(index,)).generate_state(1, np.uint64)[0]) if index else seed


def sample_token(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
    counts: np.ndarray | None = None,
) -> int:
    """Pick the next token id from one row of logits (shape ``[vocab]``) by the rule above.

    ``seen`` is a boolean mask of tokens already in the context, used only by the repetition penalty; ``counts``
    how often each token was generated by this request, used only by the presence and frequency penalties."""
    row_seen = None if seen is None else np.asarray(seen, dtype=bool)[None]
    row_counts = None if counts is None else [counts]
    return int(sample_batch(np.asarray(logits)[None], [params], [rng], row_seen, row_counts)[0])


def sample_batch(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    seen: np.ndarray | Sequence[np.ndarray] | None = None,
    counts: np.ndarray | Sequence[np.ndarray | None] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    """Pick one token per row of ``logits`` (``[batch, vocab]``), each row with its own parameters and generator.

    ``seen`` (``[batch, vocab]`` booleans, or one such row per request) feeds the repetition penalty; ``counts``
    (``[batch, vocab]`` generated-token counts, or one row or None per request) the presence and frequency
    penalties, and is read only for the rows that have one; ``masks`` (per row, None or a float32 ``[vocab]`` row
    of +-inf) excludes where it is -inf. Each filter costs only the rows that ask for it, and works on candidate
    sets (``np.partition``), never on fully sorted rows; the pick reads a few dozen block sums and one block."""
    # A tiny temperature or penalty may overflow logits to +-inf, which step 3 provides for: no warnings then.
    extreme = any(0.0 < sp.temperature < 1e-3 or sp.repetition_penalty < 1e-3 for sp in params)
    with np.errstate(over="ignore") if extreme else contextlib.nullcontext():
        return _sample_batch(logits, params, rngs, seen, counts, masks)


def _sample_batch(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    seen: np.ndarray | Sequence[np.ndarray] | None,
    counts: np.ndarray | Sequence[np.ndarray | None] | None = None,
    masks: Sequence[np.ndarray | None] | None = None,
) -> np.ndarray:
    x = np.array(logits, dtype=np.float32)  # a copy: filtered in place below
    batch, vocab = x.shape
    if seen is not None:
        repetition_penalty(x, params, seen)
    controlled = [i for i, sp in enumerate(params) if sp.controlled]  # rows without controls pay only this pass
    adjusted = [i for i in controlled if params[i].adjusts]
    if adjusted:
        adjust(x, params, adjusted, counts)
    masked = apply_masks(x, masks) if masks is not None else []  # (rows without a mask: nothing)
    sampled = [i for i, sp in enumerate(params) if sp.temperature != 0.0]
    if len(sampled) < batch:
        out = np.argmax(x, axis=1)
        if adjusted or masked:
            greedy_fallback(x, out, params, sorted({*adjusted, *masked}), masks)
        if not sampled:
            return out
        x = x[sampled]
        params = [params[i] for i in sampled]
        rngs = [rngs[i] for i in sampled]
        masks = [masks[i] for i in sampled] if masks is not None else None
    n = len(params)
    temperature = {sp.temperature for sp in params}
    if len(temperature) > 1:  # dividing by 1 changes nothing: rows at 1 may share the pass
        x /= np.array([parameter32(sp.temperature) for sp in params], np.float32)[:, None]
    elif temperature != {1.0}:
        x /= parameter32(temperature.pop())
    peak = np.maximum.reduce(x, axis=1)
    if not all(map(math.isfinite, peak.tolist())):  # (cheaper than np.isfinite(...).all() on a few rows)
        for i in np.flatnonzero(~np.isfinite(peak)):
            x[i] = np.where(x[i] == peak[i], np.float32(0), np.float32(-np.inf))
            exclude_row(x[i], params[i], masks[i] if masks is not None else None)
            peak[i] = 0
    p = _probabilities(x, peak, [sp.top_k if 0 < sp.top_k < vocab else 0 for sp in params])
    nucleus = [i for i, sp in enumerate(params) if sp.top_p < 1.0]
    if nucleus:
        top_p = np.array([params[i].top_p for i in nucleus], np.float32)
        if len(nucleus) == n:
            _nucleus(p, top_p)
        else:
            sub = p[nucleus]
            _nucleus(sub, top_p)
            p[nucleus] = sub
    floored = [i for i, sp in enumerate(params) if sp.min_p > 0.0] if controlled else []
    if floored:  # rule step 10: below min_p times the largest p, which is 1
        if len(floored) == n:  # (p times a mask: cheaper than putmask; p is finite, so p * 0 is 0)
            np.multiply(p, p >= np.array([sp.min_p for sp in params], np.float32)[:, None], out=p)
        else:
            sub = p[floored]
            np.multiply(sub, sub >= np.array([params[i].min_p for i in floored], np.float32)[:, None], out=sub)
            p[floored] = sub
    u = np.array([r.random() for r in rngs])  # float64: exactly one draw per sampled row
    picked = _pick(p, u)
    if len(sampled) == batch:
        return picked
    out[sampled] = picked
    return out


def _probabilities(x: np.ndarray, peak: np.ndarray, top_k: list[int]) -> np.ndarray:
    """``exp(x - peak)`` per row, 0 below each row's k-th largest logit (``x`` is reused). With a large
    vocabulary and small k, the exponential is taken only on the survivors, about k a row."""
    n, vocab = x.shape
    filtered = [i for i, k in enumerate(top_k) if k]
    if not filtered:
        np.subtract(x, peak[:, None], out=x)
        return np.exp(x, out=x)
    ks = {top_k[i] for i in filtered}
    if len(filtered) == n and len(ks) == 1:  # one k for every row: no gathers
        kth = np.partition(x, vocab - top_k[0], axis=1)[:, vocab - top_k[0]]
    else:
        kth = np.full(n, -np.inf, np.float32)  # -inf: no filter
        for k in ks:
            sel = [i for i in filtered if top_k[i] == k]
            kth[sel] = np.partition(x[sel], vocab - k, axis=1)[:, vocab - k]
    if vocab < 1024 or max(ks) > vocab // 8:  # the whole rows: cheaper than gathering most of them
        np.putmask(x, x < kth[:, None], np.float32(-np.inf))
        np.subtract(x, peak[:, None], out=x)
        return np.exp(x, out=x)
    if len(filtered) < n:  # the rows without a top_k: their whole row; nothing of theirs to scatter below
        dense = [i for i, k in enumerate(top_k) if not k]
        x[dense] = np.exp(x[dense] - peak[dense, None])
        kth[dense] = np.inf
    keep = np.flatnonzero(x >= kth[:, None])
    values = np.exp(x.reshape(-1)[keep] - peak[keep // vocab])
    if len(filtered) < n:
        p = x
        p[filtered] = 0
    else:
        p = np.zeros_like(x)
    p.reshape(-1)[keep] = values
    return p


def _nucleus(p: np.ndarray, top_p: np.ndarray) -> None:
    """Zero, in place, every token outside its row's nucleus (rule step 6).

    The values alone decide how many tokens are kept and the smallest kept value (ids matter only for ties
    with it, settled at the end by id). So each round moves a row's next ``k`` largest remaining values to the
    end of its working copy (``np.partition``), sorts just those and continues the running sum; only rows not
    yet at their goal go on, on the rest of their copy, with ``k`` at least doubled."""
    n, vocab = p.shape
    goal = top_p * _running(p)[:, -1]
    if n == 1 and vocab <= ROW_SORT:  # one short row: a stable argsort costs less than the bookkeeping below
        row = p[0]
        order = np.argsort(-row, kind="stable")  # most probable first, lower id first among equals
        last = min(int(row[order].cumsum().searchsorted(goal[0])), vocab - 1)  # first to reach the goal
        row[order[last + 1 :]] = 0
        return
    settled: list[tuple[np.ndarray, ...]] = []  # per round: its rows, their cut, count and maybe-tied flag
    todo = np.arange(n)
    # Non-negative float32 values order as their bit patterns do: int32 partitions and sorts are faster.
    rest, end = p.view(np.int32), vocab  # rest[:, :end]: the values not yet sorted (p itself is only read)
    mass_before = None  # the running sum over the values sorted in earlier rounds
    k = min(vocab, CANDIDATES)
    while True:
        if k < end:
            rest = np.partition(rest[:, :end], end - k, axis=1)
        top = np.sort(rest[:, end - k : end], axis=1)[:, ::-1].view(np.float32)  # descending: cumsum follows
        if mass_before is not None:  # continue the running sum exactly where it stopped
            top = np.concatenate([mass_before[:, None], top], axis=1)
        mass = top.cumsum(axis=1)
        if mass_before is not None:
            top, mass = top[:, 1:], mass[:, 1:]
        want = goal if todo.size == n else goal[todo]
        reach = mass >= want[:, None]  # running sums never decrease: the first True is an argmax
        found = reach[:, -1]
        everywhere = found.all()
        end -= k
        last = reach.argmax(axis=1)
        if not end and not everywhere:
            last[~found] = k - 1  # never reached with every token: keep them all
        rows = np.arange(todo.size)
        value = top[rows, last]
        # Tokens after the cut may equal it (settled by id below): the next sorted value does, or perhaps an
        # unsorted one where the cut is the smallest sorted value (the check below finds out).
        tie = top[rows, np.minimum(last + 1, k - 1)] == value
        count = vocab - end - k + last + 1
        if everywhere or not end:
            settled.append((todo, value, count, tie))
            break
        settled.append((todo[found], value[found], count[found], tie[found]))
        left = ~found
        # Every unsorted value is at most the smallest sorted one, which bounds how many more are needed from
        # below; they shrink, so take twice that, and at least twice as many as sorted so far (a round costs
        # a partition of the rest: fewer, larger rounds are cheaper).
        short = (want[left] - mass[left, -1]) / np.maximum(top[left, -1], np.float32(1e-30))
        k = int(min(end, 2 * max(vocab - end, np.ceil(short.max()))))
        todo, rest, mass_before = todo[left], rest[left, :end], mass[left, -1]
    if len(settled) == 1:  # one round for every row: in row order already
        _, cut, count, tied = settled[0]
    else:
        order = np.argsort(np.concatenate([rows for rows, *_ in settled]))
        cut, count, tied = (np.concatenate([part[i] for part in settled])[order] for i in (1, 2, 3))
    keep = p >= cut[:, None]
    for i in np.flatnonzero(tied):
        extra = np.count_nonzero(keep[i]) - count[i]
        if extra:  # ties with the cut value straddle the cut: the lower ids are kept
            equal = np.flatnonzero(p[i] == cut[i])
            keep[i, equal[equal.size - extra :]] = False
    np.multiply(p, keep, out=p)


def _running(p: np.ndarray) -> np.ndarray:
    """``[0, C[0], C[1], ...]``: the running float32 sum of the block sums ``S``, numpy's sum of each block of
    BLOCK tokens (the last one shorter when BLOCK does not divide the vocabulary), each block reduced alone
    whatever the batch. The leading 0 is what comes before the first block."""
    n, vocab = p.shape
    full, tail = divmod(vocab, BLOCK)
    c = np.zeros((n, 1 + full + (tail > 0)), np.float32)
    if full:
        blocks = as_strided(p, (n, full, BLOCK), (p.strides[0], BLOCK * p.itemsize, p.itemsize), writeable=False)
        np.add.reduce(blocks, axis=2, out=c[:, 1 : full + 1])
    if tail:
        np.add.reduce(p[:, full * BLOCK :], axis=1, out=c[:, -1])
    return np.cumsum(c, axis=1, out=c)


def _pick(p: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Rule step 7: the two-level inverse CDF, one uniform ``u`` per row. Running sums never decrease, so the
    first one above ``t`` is an ``argmax`` of a comparison (its last entry says whether there is one)."""
    n, vocab = p.shape
    block: np.ndarray | None = None
    if vocab <= BLOCK:  # one block: its sum is the total, and nothing comes before it
        total = np.add.reduce(p, axis=1)
        t = u * total  # float64
        q = p.cumsum(axis=1)
        above = q > t[:, None]
        picked = above.argmax(axis=1)
        found = np.minimum(total, q[:, -1]) > t  # the block, and a token in it, above t
    else:
        c = _running(p)
        t = u * c[:, -1]  # float64
        over = c[:, -1] <= t  # no block's running sum exceeds t: only where u * total rounded up to the total
        block = np.where(over, c.shape[1] - 2, (c > t[:, None]).argmax(axis=1) - 1)
        rows = np.arange(n)
        cols = block[:, None] * BLOCK + np.arange(BLOCK)
        if vocab % BLOCK:  # the last block is shorter: its missing tokens count as 0
            q = np.cumsum(p[rows[:, None], np.minimum(cols, vocab - 1)] * (cols < vocab), axis=1)
        else:
            q = np.cumsum(p[rows[:, None], cols], axis=1)
        above = c[rows, block].astype(np.float64)[:, None] + q > t[:, None]  # float64; q is flat past the end
        picked = block * BLOCK + above.argmax(axis=1)
        found = above[:, -1] & ~over
    for r in [r for r, ok in enumerate(found.tolist()) if not ok]:  # rounding left no token: the last with p > 0
        end = vocab if block is None else min(vocab, (int(block[r]) + 1) * BLOCK)
        picked[r] = end - 1 - np.argmax(p[r, :end][::-1] > 0)
    return picked
