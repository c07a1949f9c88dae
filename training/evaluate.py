"""Held-out loss with the state carried across the whole split, and its usual names (bpc, perplexity)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from textgen.errors import DataError
from textgen.tokenizer import Level
from training.data import batchify, window, windows_per_epoch
from training.model import RNNLanguageModel

if TYPE_CHECKING:
    from training.distributed import Replicas


@dataclass(frozen=True)
class Quality:
    """Mean cross-entropy in nats per token, with bits per character (char) or perplexity (word)."""

    loss: float
    tokens: int
    level: Level

    @property
    def bpc(self) -> float | None:
        return self.loss / math.log(2) if self.level is Level.CHAR else None

    @property
    def perplexity(self) -> float | None:
        return math.exp(min(self.loss, 700.0)) if self.level is Level.WORD else None

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        out = {f"{prefix}loss": self.loss}
        if self.bpc is not None:
            out[f"{prefix}bpc"] = self.bpc
        if self.perplexity is not None:
            out[f"{prefix}perplexity"] = self.perplexity
        return out

    def summary(self) -> str:
        extra = f"bpc {self.bpc:.4f}" if self.bpc is not None else f"perplexity {self.perplexity:.2f}"
        return f"loss {self.loss:.4f} nats/token, {extra} ({self.tokens:,} tokens)"


@torch.no_grad()
def evaluate(
    model: RNNLanguageModel,
    ids: Tensor,
    level: Level,
    batch_size: int = 10,
    bptt: int = 128,
    device: torch.device | str = "cpu",
    replicas: Replicas | None = None,
) -> Quality:
    """Mean loss over ``ids`` read as ``batch_size`` streams (fewer if the split is short). Under data-parallel
    training (``replicas``) each rank reads its share of the streams and the sums are added over the ranks, so
    every rank gets the loss one process would, up to the order of the sums."""
    if ids.numel() < 2:
        raise DataError(f"cannot evaluate a split of {ids.numel()} token(s)")
    batch_size = max(1, min(batch_size, ids.numel() // (bptt + 1)))
    stream = batchify(ids, batch_size, min(bptt, ids.numel() // batch_size - 1), "evaluation split")
    if replicas is not None:
        stream = replicas.eval_rows(stream)  # a rank may get no rows when ranks outnumber the streams
    stream = stream.to(device)
    was_training = model.training
    model.eval()
    state = model.init_state(stream.size(0), device)
    total, count = 0.0, 0
    for i in range(windows_per_epoch(stream, bptt) if stream.size(0) else 0):
        x, y = window(stream, i * bptt, bptt)
        logits, state = model(x, state)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train(was_training)
    if replicas is not None:
        total, summed = replicas.sum(total, count)
        count = int(summed)
    return Quality(total / count, count, level)
