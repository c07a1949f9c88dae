"""The torch reference generator: the whole prompt in one forward call, then one token per call, each drawn
by the shared sampling rule (``textgen.sampling``). The exporter and the service are checked against it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from textgen.errors import InvalidInputError
from textgen.sampling import SamplingParams, new_rng, sample_token
from textgen.tokenizer import TextTokenizer
from training.model import RNNLanguageModel


@torch.no_grad()
def generate_ids(
    model: RNNLanguageModel,
    prompt_ids: np.ndarray,
    max_tokens: int,
    params: SamplingParams,
    seed: int,
    stop_ids: frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yield up to ``max_tokens`` sampled ids after ``prompt_ids`` (must be non-empty), stopping after one of
    ``stop_ids`` (which is yielded too, as the server counts it)."""
    if len(prompt_ids) == 0:
        raise InvalidInputError("prompt must hold at least one token")
    if max_tokens < 0:
        raise InvalidInputError(f"max_tokens must be >= 0 (got {max_tokens})")
    model.eval()
    rng = new_rng(seed)
    seen = np.zeros(model.config.vocab_size, dtype=bool)
    seen[prompt_ids] = True
    counts = np.zeros(model.config.vocab_size, np.float32) if params.penalises else None  # generated tokens
    state = model.init_state(1)
    logits, state = model(torch.as_tensor(prompt_ids, dtype=torch.int64).view(1, -1), state)
    for _ in range(max_tokens):
        token = sample_token(logits[0, -1].float().numpy(), params, rng, seen, counts)
        seen[token] = True
        if counts is not None:
            counts[token] += 1
        yield token
        if token in stop_ids:
            return
        logits, state = model(torch.tensor([[token]], dtype=torch.int64), state)


def generate_text(
    model: RNNLanguageModel,
    tokenizer: TextTokenizer,
    prompt: str,
    max_tokens: int,
    params: SamplingParams,
    seed: int,
    stop_ids: frozenset[int] = frozenset(),
) -> Iterator[str]:
    """Text pieces of the continuation of ``prompt``, one per token. An empty prompt starts from the
    tokenizer's start token (a line break), as every text in the corpus does. A stop token ends it, its text not
    returned (as the server's ``stop_token_ids``)."""
    prompt_ids = tokenizer.encode(prompt) if prompt else np.array([tokenizer.start_id], dtype=np.int64)
    if len(prompt_ids) == 0:  # e.g. a word-level prompt of only spaces
        prompt_ids = np.array([tokenizer.start_id], dtype=np.int64)
    previous = int(prompt_ids[-1]) if prompt else None
    for token in generate_ids(model, prompt_ids, max_tokens, params, seed, stop_ids):
        if token in stop_ids:
            return
        yield tokenizer.pieces([token], previous)[0]
        previous = token
