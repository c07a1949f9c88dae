"""Request fields checked and resolved against the server's limits before any work starts: every error names its
field. (Ranges that belong to the sampling rule itself, such as temperature in [0, 100], are checked by
``textgen.sampling.SamplingParams``.)"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from service.settings import ServerSettings
from textgen.errors import InvalidInputError
from textgen.sampling import SamplingParams

if TYPE_CHECKING:
    from service.app import GenerateSpec


def finite(name: str, value: float | None, default: float) -> float:
    if value is None:
        return default
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number (got {value})")
    return float(value)


def sampling_params(spec: GenerateSpec) -> SamplingParams:
    return SamplingParams(
        temperature=finite("temperature", spec.temperature, 1.0),
        top_k=spec.top_k,
        top_p=finite("top_p", spec.top_p, 1.0),
        repetition_penalty=finite("repetition_penalty", spec.repetition_penalty, 1.0),
    )


def max_tokens(settings: ServerSettings, requested: int) -> int:
    if requested == 0:
        return settings.default_max_tokens
    if requested > settings.max_tokens_limit:
        raise InvalidInputError(f"max_tokens: {requested} exceeds this server's maximum of {settings.max_tokens_limit}")
    return requested


def stop_strings(settings: ServerSettings, stops: list[str]) -> list[str]:
    if len(stops) > settings.max_stop_sequences:
        raise InvalidInputError(
            f"stop: {len(stops)} strings exceed this server's maximum of {settings.max_stop_sequences}"
        )
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidInputError(f"stop[{i}]: empty string")
        if len(stop) > settings.max_stop_chars:
            limit = settings.max_stop_chars
            raise InvalidInputError(f"stop[{i}]: {len(stop)} characters exceed the maximum of {limit}")
    return list(stops)
