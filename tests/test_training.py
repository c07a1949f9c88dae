from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from textgen.errors import CheckpointError, ConfigError, DataError
from training import checkpoint as checkpoint_module
from training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from training.model import CELLS
from training.run import run_train

TINY_MODEL = {"hidden_size": 16, "embedding_size": 8}
TINY_TRAIN = {"batch_size": 4, "bptt": 16, "eval_every": 1000}


@pytest.mark.parametrize("level", ["char", "word"])
@pytest.mark.parametrize("cell", CELLS)
def test_one_step_smoke_per_cell_and_level(tmp_path: Path, corpus_file: Path, cell: str, level: str) -> None:
    result = run_train(
        {**TINY_MODEL, "cell": cell},
        {"path": str(corpus_file), "level": level},
        {**TINY_TRAIN, "max_steps": 1, "bptt": 4},
        tmp_path / "run",
        progress=False,
    )
    assert result.step == 1 and result.stop_reason == "max_steps"
    ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    model, tokenizer = model_from_checkpoint(ckpt)
    assert ckpt["model_config"]["cell"] == cell and tokenizer.level.value == level
    assert model.config.vocab_size == tokenizer.vocab_size
    assert ckpt["step"] == 1 and ckpt["best_val_loss"] == result.best_val_loss


def test_overfits_a_tiny_corpus(tmp_path: Path) -> None:
    data = tmp_path / "abc.txt"
    data.write_text("abcdefgh\n" * 400)
    result = run_train(
        {"hidden_size": 32, "embedding_size": 8},
        {"path": str(data), "split": (0.8, 0.2, 0.0)},
        {"batch_size": 8, "bptt": 32, "max_steps": 150, "eval_every": 50, "lr": 1e-2},
        tmp_path / "run",
        progress=False,
    )
    assert result.best_val_loss < 0.05  # a fully predictable sequence: near-zero loss


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]


@pytest.mark.parametrize("schedule", ["cosine", "plateau", "step"])
def test_resume_gives_the_same_weights_as_training_straight(tmp_path: Path, corpus_file: Path, schedule: str) -> None:
    model = {**TINY_MODEL, "dropout": 0.3}  # dropout makes the RNG state matter
    train = {**TINY_TRAIN, "max_steps": 12, "eval_every": 4, "schedule": schedule, "warmup_steps": 3}
    data = {"path": str(corpus_file)}
    run_train(model, data, train, tmp_path / "straight", progress=False)
    paused = run_train(model, data, train, tmp_path / "split", stop_at=6, progress=False)
    assert paused.stop_reason == "paused" and paused.step == 6
    resumed = run_train({}, {}, {}, tmp_path / "split", resume=True, progress=False)
    assert resumed.step == 12
    straight, split = _final_weights(tmp_path / "straight"), _final_weights(tmp_path / "split")
    assert straight.keys() == split.keys()
    for name in straight:
        assert torch.equal(straight[name], split[name]), name
    logged = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "val_loss" in r] == [4, 8, 12]


def test_step_schedule_decays_once_per_epoch_after_decay_after(tmp_path: Path, corpus_file: Path) -> None:
    train = {**TINY_TRAIN, "schedule": "step", "decay_after": 2, "decay_factor": 0.5, "lr": 0.1, "log_every": 1}
    run_train(TINY_MODEL, {"path": str(corpus_file)}, train, tmp_path / "r", epochs=4, progress=False)
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["epoch"]: r["lr"] for r in logged if "lr" in r and r["epoch"] < 4}
    # the lr logged in an epoch is the one its steps use: full for epochs 0 and 1, then halved per epoch
    assert lrs == pytest.approx({0: 0.1, 1: 0.1, 2: 0.05, 3: 0.025})


def test_resume_with_another_model_config_is_an_error(tmp_path: Path, corpus_file: Path) -> None:
    run_train(TINY_MODEL, {"path": str(corpus_file)}, {**TINY_TRAIN, "max_steps": 2}, tmp_path / "r", progress=False)
    with pytest.raises(CheckpointError, match="hidden_size is 32 here but 16 in the checkpoint"):
        run_train({"hidden_size": 32}, {}, {}, tmp_path / "r", resume=True, progress=False)
    with pytest.raises(CheckpointError, match="level"):
        run_train({}, {"level": "word"}, {}, tmp_path / "r", resume=True, progress=False)


def test_resume_without_a_run_and_overwriting_a_run_are_errors(tmp_path: Path, corpus_file: Path) -> None:
    with pytest.raises(CheckpointError, match="nothing to resume"):
        run_train({}, {}, {}, tmp_path / "none", resume=True, progress=False)
    run_train(TINY_MODEL, {"path": str(corpus_file)}, {**TINY_TRAIN, "max_steps": 1}, tmp_path / "r", progress=False)
    with pytest.raises(ConfigError, match="already holds a run"):
        run_train(
            TINY_MODEL, {"path": str(corpus_file)}, {**TINY_TRAIN, "max_steps": 1}, tmp_path / "r", progress=False
        )


def test_corpus_smaller_than_one_batch(tmp_path: Path) -> None:
    data = tmp_path / "small.txt"
    data.write_text("just a few characters\n" * 3)
    with pytest.raises(DataError, match="fewer than one batch"):
        run_train(
            TINY_MODEL,
            {"path": str(data)},
            {**TINY_TRAIN, "batch_size": 32, "bptt": 64},
            tmp_path / "r",
            progress=False,
        )


def test_early_stopping(tmp_path: Path, corpus_file: Path) -> None:
    # lr so high the model cannot improve after its first evaluation
    result = run_train(
        TINY_MODEL,
        {"path": str(corpus_file)},
        {
            **TINY_TRAIN,
            "max_steps": 400,
            "eval_every": 2,
            "patience": 2,
            "lr": 50.0,
            "schedule": "constant",
            "clip": 0.0,
        },
        tmp_path / "r",
        progress=False,
    )
    assert result.stop_reason == "early_stop" and result.step < 400


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "last.pt"
    save_checkpoint(target, {"step": 1})

    def crash(obj: object, f: object) -> None:
        f.write(b"partial")  # type: ignore[attr-defined]
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(target, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(target)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable textgen checkpoint"):
        load_checkpoint(bad)
