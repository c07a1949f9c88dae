"""What the engine reports as it runs, for metrics: a no-op base class that ``service.metrics`` implements. Its
own module so the engine and the metrics depend on it, not on each other."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.sequence import Sequence


class EngineObserver:
    """Hooks for metrics; the default does nothing. Called on the engine thread."""

    def step(self, phase: str, batch: int, tokens: int, seconds: float) -> None:
        """One graph call: ``phase`` "prompt" or "decode", ``tokens`` run for ``batch`` sequences."""

    def admitted(self, seq: Sequence) -> None:
        """``seq`` left the queue for a batch slot."""

    def first_token(self, seconds: float) -> None:
        """A generation's first token, ``seconds`` after it arrived."""

    def sampled(self, count: int, gaps: list[float]) -> None:
        """A step sampled ``count`` tokens; ``gaps``: for each sequence that had sampled before, the seconds
        since its previous token."""

    def finished(self, seq: Sequence) -> None:
        """``seq`` ended, however (its result is set)."""
