"""Log-probabilities of chosen tokens under the model (temperature 1, before any filtering), for Score and for a
generation's ``logprobs``. Only the chosen tokens' values are needed, so each row costs one max, one exp-sum and
one gather, in float32 (the graph's own precision), never a full float64 log-softmax table."""

from __future__ import annotations

import numpy as np


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """``log softmax(logits[i])[targets[i]]`` for every row ``i`` of ``logits`` [n, vocab] (float32 [n])."""
    x = np.asarray(logits, dtype=np.float32)
    top = x.max(axis=-1)
    shifted = np.empty_like(x)
    np.subtract(x, top[:, None], out=shifted)
    np.exp(shifted, out=shifted)
    log_total = np.log(shifted.sum(axis=-1, dtype=np.float64)).astype(np.float32)
    chosen = x[np.arange(x.shape[0]), np.asarray(targets, dtype=np.int64)]
    return (chosen - top) - log_total
