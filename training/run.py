"""From command-line values to a training run: defaults, what a resumed checkpoint fixes, and the checks that
a resume continues the same model on the same data."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from textgen.errors import CheckpointError, ConfigError
from textgen.tokenizer import Level, TextTokenizer
from training.checkpoint import load_checkpoint
from training.config import TrainConfig
from training.corpus import STDLIB, DataConfig, load_splits
from training.data import TokenizedCorpus, batchify, tokenize, windows_per_epoch
from training.distributed import Launch, check_layout, started
from training.model import ModelConfig
from training.trainer import LAST, TrainResult, train

STDLIB_MAX_CHARS = 4_000_000  # default cap on the standard-library corpus: about 1.5 M tokens of Python


def normalise_data_args(data_args: dict[str, Any]) -> dict[str, Any]:
    """Absolute paths (a checkpoint must find its data again from anywhere) and tuple splits."""
    out = dict(data_args)
    for key in ("path", "valid_path", "test_path"):
        if out.get(key) not in (None, STDLIB):
            out[key] = str(Path(out[key]).expanduser().resolve())
    if "split" in out:
        out["split"] = tuple(out["split"])
    return out


def data_config_from(saved: dict[str, Any]) -> DataConfig:
    return DataConfig(**{**saved, "split": tuple(saved["split"])})


def default_model_config(vocab_size: int, level: Level, model_args: dict[str, Any]) -> ModelConfig:
    args = dict(model_args)
    hidden = args.get("hidden_size", ModelConfig.hidden_size)
    if "embedding_size" not in args:
        # Tied weights need embedding = hidden; words get a wide embedding, characters a small one (torch-rnn).
        args["embedding_size"] = hidden if args.get("tie_weights") or level is Level.WORD else 64
    return ModelConfig(vocab_size=vocab_size, **args)


def _check_same(kind: str, given: dict[str, Any], saved: dict[str, Any]) -> None:
    for key, value in given.items():
        if saved.get(key) != value:
            raise CheckpointError(
                f"cannot resume with a different {kind}: {key} is {value!r} here but {saved.get(key)!r} "
                "in the checkpoint; drop the flag or train into a new --out directory"
            )


def _check_resumable(given: dict[str, Any], saved: dict[str, Any]) -> None:
    """Training flags replace the saved ones on resume, except those the checkpoint's state is laid out for."""

    def refuse(name: str, why: str) -> None:
        flag = "--" + name.replace("_", "-")
        raise CheckpointError(
            f"cannot resume with {flag} {given[name]}: this run was trained with {flag} {saved[name]}, and {why}; "
            "drop the flag, or train into a new --out directory"
        )

    if "batch_size" in given and given["batch_size"] != saved["batch_size"]:
        refuse("batch_size", f"its data position and carried state are laid out for {saved['batch_size']} streams")
    if "optimizer" in given and given["optimizer"] != saved["optimizer"]:
        refuse("optimizer", f"the checkpoint holds {saved['optimizer']}'s state, which {given['optimizer']} cannot use")
    # cosine, step and constant are one scheduler (a multiplier of the step count) and may replace each other;
    # plateau's state (best loss, evaluations since) is another kind.
    schedules = {given.get("schedule", saved["schedule"]), saved["schedule"]}
    if len(schedules) == 2 and "plateau" in schedules:
        refuse("schedule", f"the checkpoint holds the {saved['schedule']} schedule's state, which is of another kind")


def run_train(
    model_args: dict[str, Any],
    data_args: dict[str, Any],
    train_args: dict[str, Any],
    out_dir: Path,
    resume: bool = False,
    epochs: int | None = None,
    stop_at: int | None = None,
    progress: bool = True,
) -> TrainResult:
    out_dir = Path(out_dir)
    data_args = normalise_data_args(data_args)
    checkpoint = None
    if resume:
        last = out_dir / LAST
        if not last.exists():
            raise CheckpointError(f"nothing to resume: {last} does not exist")
        checkpoint = load_checkpoint(last)
        saved_data = {**checkpoint["data_config"], "split": tuple(checkpoint["data_config"]["split"])}
        _check_same("data configuration", data_args, saved_data)
        _check_same("model configuration", model_args, checkpoint["model_config"])
        data_cfg = data_config_from(saved_data)
        _check_resumable(train_args, checkpoint["train_config"])
        train_cfg = TrainConfig(**{**checkpoint["train_config"], **train_args})
        tok = checkpoint["tokenizer"]
        corpus = tokenize(load_splits(data_cfg), data_cfg, TextTokenizer.from_json(tok["level"], tok["json"]))
        model_cfg = ModelConfig(**checkpoint["model_config"])
    else:
        if (out_dir / LAST).exists():
            raise ConfigError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")
        if data_args.get("path") in (None, STDLIB) and "max_chars" not in data_args:
            data_args["max_chars"] = STDLIB_MAX_CHARS
        data_cfg = DataConfig(**data_args)
        train_cfg = TrainConfig(**train_args)
        corpus = tokenize(load_splits(data_cfg), data_cfg)
        model_cfg = default_model_config(corpus.tokenizer.vocab_size, Level(data_cfg.level), model_args)
    if epochs is not None:
        if epochs < 1:
            raise ConfigError(f"epochs must be at least 1 (got {epochs})")
        steps = epochs * windows_per_epoch(batchify(corpus.train, train_cfg.batch_size, train_cfg.bptt), train_cfg.bptt)
        train_cfg = TrainConfig(**{**train_cfg.to_dict(), "max_steps": steps})
    launch = Launch.from_environment(os.environ)  # set by torchrun: data-parallel training, one process per rank
    if launch is None:
        return train(
            model_cfg, train_cfg, data_cfg, corpus, out_dir, resume=checkpoint, stop_at=stop_at, progress=progress
        )
    check_layout(train_cfg.batch_size, launch.world_size)
    with started(launch, train_cfg.device) as replicas:
        return train(
            model_cfg,
            train_cfg,
            data_cfg,
            corpus,
            out_dir,
            resume=checkpoint,
            stop_at=stop_at,
            progress=progress,
            replicas=replicas,
        )


def corpus_for_checkpoint(checkpoint: dict[str, Any], data_args: dict[str, Any] | None = None) -> TokenizedCorpus:
    """The data a checkpoint was trained on (or ``data_args`` instead), encoded with its tokenizer."""
    saved = {**checkpoint["data_config"], "split": tuple(checkpoint["data_config"]["split"])}
    if data_args:
        overrides = normalise_data_args(data_args)
        if "path" in overrides and "valid_path" not in overrides:  # a new single source: no saved split files
            overrides.update(valid_path=None, test_path=None)
        saved.update(overrides)
    data_cfg = data_config_from(saved)
    tok = checkpoint["tokenizer"]
    return tokenize(load_splits(data_cfg), data_cfg, TextTokenizer.from_json(tok["level"], tok["json"]))


def field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}
