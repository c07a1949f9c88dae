"""The sampling rule, defined once, in numpy, so that the torch reference sampler (``textgen sample``) and the
ONNX Runtime service draw the same token for the same logits and seed.

For one row of logits the rule is, in this order:
1. repetition penalty (CTRL, Keskar et al. 2019) on every token already seen in the prompt or the output:
   a positive logit is divided by the penalty, a negative one multiplied;
2. temperature 0 means greedy: the arg-max, and no random number is drawn;
3. otherwise divide by the temperature, keep the ``top_k`` largest logits (ties with the k-th kept), take
   the softmax, keep the smallest set of most probable tokens whose mass reaches ``top_p``;
4. draw one uniform ``u`` in [0, 1) from the request's own PCG64 generator and pick the first token whose
   cumulative (unnormalised) probability exceeds ``u`` times the total: inverse-CDF sampling.
Everything is computed in float64 so that near-ties resolve the same way everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from textgen.errors import InvalidInputError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1.0: no nucleus filter
    repetition_penalty: float = 1.0  # 1.0: none

    def __post_init__(self) -> None:
        if not (0.0 <= self.temperature <= 100.0) or self.temperature != self.temperature:
            raise InvalidInputError(f"temperature must be in [0, 100] (got {self.temperature})")
        if self.top_k < 0:
            raise InvalidInputError(f"top_k must be >= 0 (got {self.top_k})")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidInputError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not (0.0 < self.repetition_penalty <= 100.0):
            raise InvalidInputError(f"repetition_penalty must be in (0, 100] (got {self.repetition_penalty})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def new_rng(seed: int) -> np.random.Generator:
    """The per-request generator: PCG64, whose whole state is two integers (easy to snapshot)."""
    if not (0 <= seed < 2**64):
        raise InvalidInputError(f"seed must be in [0, 2**64) (got {seed})")
    return np.random.Generator(np.random.PCG64(seed))


def random_seed() -> int:
    """A fresh seed for a request that gave none (reported back so the result can be reproduced)."""
    return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])


def sample_token(
    logits: np.ndarray,
    params: SamplingParams,
    rng: np.random.Generator,
    seen: np.ndarray | None = None,
) -> int:
    """Pick the next token id from one row of logits (shape ``[vocab]``) by the rule above.

    ``seen`` is a boolean mask of tokens already in the context, used only by the repetition penalty."""
    row_seen = None if seen is None else np.asarray(seen, dtype=bool)[None]
    return int(sample_batch(np.asarray(logits)[None], [params], [rng], row_seen)[0])


def sample_batch(
    logits: np.ndarray,
    params: Sequence[SamplingParams],
    rngs: Sequence[np.random.Generator],
    seen: np.ndarray | None = None,
) -> np.ndarray:
    """Pick one token per row of ``logits`` (``[batch, vocab]``), each row with its own parameters and generator.

    Every operation is row-wise (elementwise, or a reduction along the vocabulary axis computed the same way for
    one row as for many), so a row's token depends only on its own logits, parameters and generator: a seeded
    request draws the same text alone or batched with others. Rows that share a setting are filtered together
    (one ``np.partition`` per distinct ``top_k``), so the cost is a few vectorised passes, not a Python loop;
    filters nobody asked for cost nothing (a batch-1 call is a handful of numpy operations)."""
    x = np.array(logits, dtype=np.float64)  # a copy: filtered in place below
    batch, vocab = x.shape
    out = np.empty(batch, dtype=np.int64)

    if seen is not None:
        for i, sp in enumerate(params):
            if sp.repetition_penalty != 1.0:
                mask = seen[i]
                if mask.any():
                    hit = x[i, mask]
                    x[i, mask] = np.where(hit > 0, hit / sp.repetition_penalty, hit * sp.repetition_penalty)

    temperature = np.fromiter((sp.temperature for sp in params), np.float64, batch)
    greedy = temperature == 0.0
    if greedy.any():
        out[greedy] = np.argmax(x[greedy], axis=1)
        rows = np.flatnonzero(~greedy)
        if rows.size == 0:
            return out
        x = x[rows]
        params = [params[i] for i in rows]
        rngs = [rngs[i] for i in rows]
        temperature = temperature[rows]
    else:
        rows = None  # every row samples: no gather, no scatter
    x /= temperature[:, None]
    n = x.shape[0]
    if any(0 < sp.top_k < vocab for sp in params):
        top_k = np.fromiter((sp.top_k for sp in params), np.int64, n)
        for k in np.unique(top_k[(top_k > 0) & (top_k < vocab)]):
            sel = np.flatnonzero(top_k == k)
            kth = np.partition(x[sel], vocab - k, axis=1)[:, vocab - k]
            sub = x[sel]
            sub[sub < kth[:, None]] = -np.inf  # ties with the k-th are kept
            x[sel] = sub
    x -= x.max(axis=1, keepdims=True)
    p = np.exp(x, out=x)

    if any(sp.top_p < 1.0 for sp in params):
        top_p = np.fromiter((sp.top_p for sp in params), np.float64, n)
        nucleus = np.flatnonzero(top_p < 1.0)
        sub = p[nucleus]
        order = np.argsort(-sub, axis=1, kind="stable")
        mass = np.cumsum(np.take_along_axis(sub, order, axis=1), axis=1)
        # Keep tokens until the kept mass reaches top_p of the total (the first one always).
        keep = (mass < top_p[nucleus, None] * mass[:, -1:]).sum(axis=1) + 1
        dropped = np.arange(vocab)[None, :] >= keep[:, None]
        np.put_along_axis(sub, order, np.where(dropped, 0.0, np.take_along_axis(sub, order, axis=1)), axis=1)
        p[nucleus] = sub

    cdf = np.cumsum(p, axis=1)
    u = np.fromiter((r.random() for r in rngs), np.float64, n)
    picked = (cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1)  # == searchsorted(side="right") per row
    # u * total can round up to total; never pick past the last token with any probability. Only then is
    # ``picked`` past it (the cdf is flat after the last such token), so only those rows look for it.
    for i in np.flatnonzero(picked == vocab):
        picked[i] = vocab - 1 - np.argmax(p[i, ::-1] > 0)
    if rows is None:
        return picked
    out[rows] = picked
    return out
