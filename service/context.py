"""A sequence's whole context, which is all a session or a snapshot is: the recurrent state after the tokens
consumed so far, the last sampled token not yet fed, the sampler's generator and the tokens seen (for the
repetition penalty). Its size is fixed per model, whatever the length of the history."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.models import ServedModel, State
from textgen.sampling import new_rng, random_seed


@dataclass
class Context:
    model: ServedModel
    state: State  # one array per state input, each [layers, 1, hidden]
    pending: int  # last sampled token, not yet fed; -1 when none
    token_count: int  # tokens the state has consumed
    rng: np.random.Generator
    seed: int
    seen: np.ndarray  # bool [vocab]

    @classmethod
    def fresh(cls, model: ServedModel, seed: int | None = None) -> Context:
        seed = random_seed() if seed is None else seed
        return cls(model, model.zero_state(1), -1, 0, new_rng(seed), seed, np.zeros(model.vocab_size, bool))

    def reseed(self, seed: int) -> None:
        self.rng, self.seed = new_rng(seed), seed

    def copy(self) -> Context:
        """An independent copy (a fork): state arrays and generator state are duplicated, not shared."""
        rng = np.random.Generator(np.random.PCG64())
        rng.bit_generator.state = self.rng.bit_generator.state
        return Context(
            self.model,
            tuple(s.copy() for s in self.state),
            self.pending,
            self.token_count,
            rng,
            self.seed,
            self.seen.copy(),
        )

    @property
    def nbytes(self) -> int:
        """Server memory this context holds: the state tensors and the seen-token mask."""
        return sum(s.nbytes for s in self.state) + self.seen.nbytes
