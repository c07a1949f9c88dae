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
    x = np.asarray(logits, dtype=np.float64).copy()
    if params.repetition_penalty != 1.0 and seen is not None and seen.any():
        penalised = x[seen]
        x[seen] = np.where(penalised > 0, penalised / params.repetition_penalty, penalised * params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(x))
    x /= params.temperature
    vocab = x.shape[0]
    if 0 < params.top_k < vocab:
        kth = np.partition(x, vocab - params.top_k)[vocab - params.top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    if params.top_p < 1.0:
        order = np.argsort(-p, kind="stable")
        mass = np.cumsum(p[order])
        # Keep tokens until the kept mass reaches top_p of the total (the first one always).
        cut = int(np.searchsorted(mass, params.top_p * mass[-1], side="left")) + 1
        p[order[cut:]] = 0.0
    cdf = np.cumsum(p)
    u = rng.random()
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), vocab - 1)
