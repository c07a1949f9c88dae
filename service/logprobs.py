"""Log-probabilities of chosen tokens under the model (temperature 1, before any filtering), for Score and for a
generation's ``logprobs`` and ``top_logprobs`` (the same distribution: the model's own, whatever the request's
penalties, biases, temperature and filters, as OpenAI and vLLM report by default). Only the chosen tokens' values
are needed, so each row costs one max, one exp-sum and one gather, in float32 (the graph's own precision), never a
full float64 log-softmax table; the top tokens cost one partial sort of the rows that ask."""

from __future__ import annotations

import numpy as np


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(logits[i])[targets[i]]`` for every row ``i`` of ``logits`` [n, vocab] (float32 [n])."""
    x = np.asarray(logits, dtype=np.float32)
    top, log_total = _normaliser(x)
    chosen = x[np.arange(x.shape[0]), np.asarray(targets, dtype=np.int64)]
    return (chosen - top) - log_total


def top_logprobs(logits: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``n`` most likely tokens of every row of ``logits`` [rows, vocab] and their log-probabilities (each
    [rows, n], most likely first, lower id first among equals), computed exactly as ``token_logprobs`` computes a
    chosen token's: the same bits where a chosen token is among them. One partial sort (``np.argpartition``) of
    each row, then a sort of its ``n`` candidates."""
    x = np.asarray(logits, dtype=np.float32)
    rows, vocab = x.shape
    n = min(n, vocab)
    top, log_total = _normaliser(x)
    ids = np.argpartition(x, vocab - n, axis=1)[:, vocab - n :] if n < vocab else np.tile(np.arange(vocab), (rows, 1))
    values = np.take_along_axis(x, ids, axis=1)
    order = np.lexsort((ids, -values), axis=1)  # by value descending, then id
    ids, values = np.take_along_axis(ids, order, axis=1), np.take_along_axis(values, order, axis=1)
    return ids, (values - top[:, None]) - log_total[:, None]


def _normaliser(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's largest logit and the log of its softmax denominator, relative to it (float32 [n] each)."""
    top = x.max(axis=-1)
    shifted = np.empty_like(x)
    np.subtract(x, top[:, None], out=shifted)
    np.exp(shifted, out=shifted)
    log_total = np.log(shifted.sum(axis=-1, dtype=np.float64)).astype(np.float32)
    return top, log_total
