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


# -- resuming with other training flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flag,value,message",
    [
        (
            "--batch-size",
            "8",
            "cannot resume with --batch-size 8: this run was trained with --batch-size 4, and its "
            "data position and carried state are laid out for 4 streams; drop the flag, or train into a new --out",
        ),
        (
            "--optimizer",
            "sgd",
            "cannot resume with --optimizer sgd: this run was trained with --optimizer adamw, and "
            "the checkpoint holds adamw's state, which sgd cannot use",
        ),
        ("--schedule", "plateau", "cannot resume with --schedule plateau: this run was trained with --schedule cosine"),
    ],
)
def test_resume_with_a_flag_the_checkpoint_state_is_laid_out_for_is_one_line(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str], flag: str, value: str, message: str
) -> None:
    from textgen.cli import main

    out = str(tmp_path / "run")
    tiny = ["--hidden", "16", "--embedding", "8", "--batch-size", "4", "--bptt", "16", "--quiet"]
    assert main(["train", "--data", str(corpus_file), "--out", out, "--max-steps", "2", *tiny]) == 0
    before = (tmp_path / "run" / "last.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--out", out, "--resume", "--max-steps", "4", "--quiet", flag, value]) == 1
    err = capsys.readouterr().err
    assert err.startswith("textgen train: error: " + message) and err.count("\n") == 1
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_cosine_step_and_constant_schedules_may_replace_each_other_on_resume(tmp_path: Path, corpus_file: Path) -> None:
    train = {**TINY_TRAIN, "max_steps": 4, "schedule": "cosine", "log_every": 1}
    run_train(TINY_MODEL, {"path": str(corpus_file)}, train, tmp_path / "r", stop_at=2, progress=False)
    resumed = run_train({}, {}, {"schedule": "constant"}, tmp_path / "r", resume=True, progress=False)
    assert resumed.step == 4
    logged = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in logged if "lr" in r][2:] == [TINY_TRAIN.get("lr", 2e-3)] * 2  # constant: the peak


@pytest.mark.parametrize("schedule", ["constant", "cosine", "plateau"])
def test_a_learning_rate_given_on_resume_replaces_the_saved_one(
    tmp_path: Path, corpus_file: Path, schedule: str
) -> None:
    train = {**TINY_TRAIN, "max_steps": 6, "schedule": schedule, "warmup_steps": 0, "lr": 0.01, "log_every": 1}
    run_train(TINY_MODEL, {"path": str(corpus_file)}, train, tmp_path / "a", stop_at=3, progress=False)
    run_train(TINY_MODEL, {"path": str(corpus_file)}, {**train, "lr": 0.04}, tmp_path / "b", progress=False)
    run_train({}, {}, {"lr": 0.04}, tmp_path / "a", resume=True, progress=False)
    lrs = {}
    for run in ("a", "b"):
        logged = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        lrs[run] = {r["step"]: r["lr"] for r in logged if "lr" in r}
    assert lrs["a"][3] == pytest.approx(lrs["b"][3] / 4)  # before the resume: the old peak
    for step in (4, 5, 6):  # after it: the schedule from the new peak, as if it had been given from the start
        assert lrs["a"][step] == pytest.approx(lrs["b"][step])


def test_the_first_loss_logged_after_a_resume_is_the_mean_of_its_own_steps(tmp_path: Path, corpus_file: Path) -> None:
    train = {**TINY_TRAIN, "max_steps": 8, "eval_every": 100}
    run_train(TINY_MODEL, {"path": str(corpus_file)}, {**train, "log_every": 1}, tmp_path / "each", progress=False)
    run_train(
        TINY_MODEL, {"path": str(corpus_file)}, {**train, "log_every": 4}, tmp_path / "r", stop_at=6, progress=False
    )
    run_train({}, {}, {}, tmp_path / "r", resume=True, progress=False)

    def losses(run: str) -> dict[int, float]:
        logged = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["train_loss"] for r in logged if "train_loss" in r}

    each, resumed = losses("each"), losses("r")
    assert resumed[4] == pytest.approx(sum(each[s] for s in (1, 2, 3, 4)) / 4, rel=1e-5)
    # steps 7 and 8 only ran after the resume at step 6: their mean, not their sum over 4
    assert resumed[8] == pytest.approx((each[7] + each[8]) / 2, rel=1e-5)


def test_a_checkpoint_is_fsynced_then_renamed_then_its_directory_fsynced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability_events: list[tuple[str, str]]
) -> None:
    events = durability_events
    target = tmp_path / "run" / "last.pt"
    save_checkpoint(target, {"step": 1})
    monkeypatch.undo()
    (tmp_file,) = [path for kind, path in events if kind == "fsync" and path.endswith(".tmp")]
    assert Path(tmp_file).name.startswith(".last.pt.")
    assert events[-3:] == [("fsync", tmp_file), ("replace", str(target)), ("fsync", str(target.parent))]
    assert load_checkpoint(target)["step"] == 1
