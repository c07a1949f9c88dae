"""Request fields checked and resolved against the server's limits before any work starts: every error names its
field. (Ranges that belong to the sampling rule itself, such as temperature in [0, 100] or a logit bias in
[-100, 100], are checked by ``textgen.sampling.SamplingParams``.) Token ids and token texts are checked against
the model once it is known (``token_controls``, ``token_ids``)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from service.settings import ServerSettings
from textgen.errors import InvalidInputError
from textgen.logit_controls import MAX_BIAS
from textgen.sampling import SamplingParams

if TYPE_CHECKING:
    from service.app import GenerateSpec
    from service.models import ServedModel

MAX_TOP_LOGPROBS = 20  # OpenAI's limit: alternatives per position
_MAX_TOKEN_CHARS = 256  # a logit_bias_text key longer than this is no single token of any served vocabulary


def finite(name: str, value: float | None, default: float) -> float:
    if value is None:
        return default
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be a finite number (got {value})")
    return float(value)


def sampling_params(spec: GenerateSpec, settings: ServerSettings) -> SamplingParams:
    """The settings that need no model (token ids and texts: ``token_controls``); also checks top_logprobs."""
    entries = len(spec.logit_bias) + len(spec.logit_bias_text)
    if entries > settings.max_logit_bias:
        raise InvalidInputError(
            f"logit_bias: {entries} entries (with logit_bias_text) exceed this server's maximum of "
            f"{settings.max_logit_bias}"
        )
    if not 0 <= spec.top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidInputError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}] (got {spec.top_logprobs})")
    return SamplingParams(
        temperature=finite("temperature", spec.temperature, 1.0),
        top_k=spec.top_k,
        top_p=finite("top_p", spec.top_p, 1.0),
        repetition_penalty=finite("repetition_penalty", spec.repetition_penalty, 1.0),
        min_p=finite("min_p", spec.min_p, 0.0),
        presence_penalty=finite("presence_penalty", spec.presence_penalty, 0.0),
        frequency_penalty=finite("frequency_penalty", spec.frequency_penalty, 0.0),
        logit_bias=tuple((int(token), float(bias)) for token, bias in spec.logit_bias.items()),
    )


def token_controls(params: SamplingParams, spec: GenerateSpec, model: ServedModel) -> SamplingParams:
    """``params`` with the request's token controls resolved against ``model``: ids within its vocabulary,
    ``logit_bias_text`` keys as its tokens, allowed and banned ids (every error names its field and entry)."""
    allowed = token_ids("allowed_token_ids", spec.allowed_token_ids, model)
    banned = token_ids("banned_token_ids", spec.banned_token_ids, model)
    if len(banned) == model.vocab_size:  # nothing could be generated (with allowed ids: textgen.logit_controls)
        raise InvalidInputError(f"banned_token_ids: bans every token of {model.name}; nothing could be generated")
    bias = dict(params.logit_bias)
    for token in bias:
        if token >= model.vocab_size:
            raise InvalidInputError(f"logit_bias[{token}]: not a token of {model.name} (vocabulary {model.vocab_size})")
    for text, value in spec.logit_bias_text.items():
        name = f"logit_bias_text[{json.dumps(text)}]"
        token = _single_token(model, text, name)
        if not -MAX_BIAS <= value <= MAX_BIAS:
            raise InvalidInputError(f"{name}: the bias must be a number in [-100, 100] (got {value})")
        if token in bias:
            raise InvalidInputError(f"{name}: token {token} already has a bias (in logit_bias or another text)")
        bias[token] = float(value)
    if not (bias or allowed or banned):
        return params
    return dataclasses.replace(
        params,
        logit_bias=tuple(bias.items()),
        allowed_token_ids=tuple(sorted(allowed)),
        banned_token_ids=tuple(sorted(banned)),
    )


def token_ids(name: str, ids: Sequence[int], model: ServedModel) -> frozenset[int]:
    """A request's list of token ids as a set, each checked against ``model``'s vocabulary."""
    if not ids:
        return frozenset()
    vocab = model.vocab_size
    if len(ids) > vocab:  # (before any copy: a message may hold a million ids)
        raise InvalidInputError(f"{name}: {len(ids)} ids exceed {model.name}'s vocabulary of {vocab} tokens")
    array = np.asarray(ids, dtype=np.int64)
    if int(array.max()) >= vocab:
        i = int(np.argmax(array >= vocab))
        raise InvalidInputError(f"{name}[{i}]: {int(array[i])} is not a token of {model.name} (vocabulary {vocab})")
    return frozenset(array.tolist())


def _single_token(model: ServedModel, text: str, name: str) -> int:
    """The id of the one token ``text`` is in ``model``'s vocabulary (``TextTokenizer.single_token``)."""
    token = model.tokenizer.single_token(text)
    if token is None:
        ids = model.tokenizer.encode(text) if 0 < len(text) <= _MAX_TOKEN_CHARS else np.zeros(0, np.int64)
        what = "outside the vocabulary" if ids.size == 1 else f"{ids.size} tokens" if ids.size else "no token"
        raise InvalidInputError(f"{name}: not exactly one token of {model.name} ({what})")
    return token


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
