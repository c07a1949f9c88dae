"""Checkpoints: plain dicts of tensors and built-in types, written atomically, read with ``weights_only``.

Keys (format 1): ``format``, ``model`` (state dict), ``model_config``, ``tokenizer`` ({level, json}),
``train_config``, ``data_config``, ``data_description``, ``optimizer``, ``scheduler``, ``step``, ``epoch``,
``data_position``, ``carried_state`` (the TBPTT state between windows), ``rng`` (torch CPU and CUDA states),
``best_val_loss``, ``evals_since_best``, ``metrics`` (last validation figures), ``saved_at``, and ``world_size``
(processes that trained it; absent: 1). Under torchrun ``carried_state`` is the whole global batch's and ``rng``
also holds every rank's states under ``ranks``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from textgen.errors import CheckpointError, NotFoundError
from textgen.tokenizer import TextTokenizer
from training.durable import fsync_directory, make_directories_durably
from training.model import ModelConfig, RNNLanguageModel

FORMAT = 1


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, fsync it, rename it over ``path``, then fsync the
    directory (the rename itself is durable only then): a crash at any point leaves either the old checkpoint or
    the new one, never a torn file."""
    path = Path(path)
    make_directories_durably(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **payload}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_directory(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise NotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several unrelated types for a bad file
        raise CheckpointError(f"{path} is not a readable textgen checkpoint: {str(exc).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "format" not in ckpt:
        raise CheckpointError(f"{path} is not a textgen checkpoint (no format field)")
    if ckpt["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format']}; this textgen reads format {FORMAT}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[RNNLanguageModel, TextTokenizer]:
    """The model (in eval mode, on the CPU) and tokenizer a checkpoint holds."""
    model = RNNLanguageModel(ModelConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    model.eval()
    tok = ckpt["tokenizer"]
    return model, TextTokenizer.from_json(tok["level"], tok["json"])
