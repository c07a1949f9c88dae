"""Token streams for truncated BPTT: each split encoded once, laid out as ``batch_size`` contiguous rows
(the ``batchify`` layout of char-rnn and pytorch/examples), read in windows of ``bptt`` steps so that row r
of window i+1 continues exactly where row r of window i stopped, and the recurrent state can be carried."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from textgen.errors import DataError
from textgen.tokenizer import Level, TextTokenizer, count_tokens
from training.corpus import DataConfig, Splits


@dataclass
class TokenizedCorpus:
    tokenizer: TextTokenizer
    train: Tensor
    valid: Tensor
    test: Tensor
    description: str

    def split(self, name: str) -> Tensor:
        if name not in ("train", "valid", "test"):
            raise DataError(f"unknown split {name!r}: choose train, valid or test")
        return getattr(self, name)


def tokenize(splits: Splits, cfg: DataConfig, tokenizer: TextTokenizer | None = None) -> TokenizedCorpus:
    """Encode the splits; the vocabulary is built from the training split unless one is given."""
    if tokenizer is None:
        tokenizer = TextTokenizer.build(
            Level(cfg.level), count_tokens(Level(cfg.level), splits.train), cfg.vocab_size, cfg.min_freq
        )
    ids = {name: torch.from_numpy(tokenizer.encode(splits.get(name))) for name in ("train", "valid", "test")}
    return TokenizedCorpus(tokenizer, ids["train"], ids["valid"], ids["test"], splits.description)


def batchify(ids: Tensor, batch_size: int, bptt: int, what: str = "training split") -> Tensor:
    """``ids`` as ``[batch_size, length]`` contiguous streams (the tail that does not fill a row is dropped)."""
    needed = batch_size * (bptt + 1)
    if ids.numel() < needed:
        raise DataError(
            f"the {what} has {ids.numel():,} tokens, fewer than one batch "
            f"({batch_size} rows x ({bptt} + 1) steps = {needed:,}); lower --batch-size or --bptt, or use more data"
        )
    length = ids.numel() // batch_size
    return ids[: length * batch_size].view(batch_size, length)


def windows_per_epoch(stream: Tensor, bptt: int) -> int:
    return math.ceil((stream.size(1) - 1) / bptt)


def window(stream: Tensor, position: int, bptt: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets of the window starting at ``position`` (the last one may be shorter)."""
    steps = min(bptt, stream.size(1) - 1 - position)
    return stream[:, position : position + steps], stream[:, position + 1 : position + 1 + steps]
