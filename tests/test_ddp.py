"""Data-parallel training (DDP, gloo, 2 ranks on the CPU), started the two ways ranks get started: by the real
``torchrun`` running ``textgen train`` (what users run), and by ``torch.multiprocessing`` setting the same
environment torchrun sets, where the test needs each rank's weights. Every launch has a deadline and is ended
(with the ranks it started) if it passes it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from textgen.errors import ConfigError
from training.checkpoint import load_checkpoint
from training.run import run_train

MODEL = {"hidden_size": 16, "embedding_size": 8}
DROPOUT_MODEL = {**MODEL, "dropout": 0.3}
TRAIN = {"batch_size": 4, "bptt": 16, "eval_every": 4, "max_steps": 8, "warmup_steps": 2}
LAUNCH_TIMEOUT_S = 240  # generous: a launch takes about 10 s on two busy cores
# DDP averages the ranks' gradients, a one-process step averages the same tokens in another order of sums. Largest
# weight difference measured between 2 ranks and one process: 3.0e-8 after 4 and after 8 steps, 2.4e-7 after 40;
# validation loss: 2.2e-7 at most.
ATOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, runs: list[tuple[int, str, dict, dict, dict, int]]) -> None:
    """One rank, with the environment torchrun would give it, doing ``runs`` one after another (each
    ``(port, out, model, data, train, stop_at)``; its own process group on its own port): one start for them all.
    Leaves its final weights of each run in ``out``."""
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    for port, out, model, data, train, stop_at in runs:
        os.environ["MASTER_PORT"] = str(port)
        result = run_train(model, data, train, Path(out) / "run", stop_at=stop_at, progress=False)
        torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")


def _spawn(runs: list[tuple[Path, dict, dict, dict, int]], world: int = 2) -> None:
    """Start ``world`` ranks that do ``runs`` (``(out, model, data, train, stop_at)``, into ``out/run``)."""
    ctx = mp.start_processes(
        _rank_main,
        args=(world, [(_free_port(), str(out), *run) for out, *run in runs]),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):  # raises if a rank failed
            if time.monotonic() >= deadline:
                pytest.fail(f"{world} ranks did not finish within {LAUNCH_TIMEOUT_S} s")
    finally:
        for process in ctx.processes:
            if process.is_alive():
                process.terminate()
            process.join(30)


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt", weights_only=True)


def _torchrun(*args: str, interrupt_when: Callable[[], bool] | None = None) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc-per-node 2 -m textgen.cli train ARGS`` (--standalone rendezvouses on a free
    loopback port), sent SIGINT (Ctrl-C) once ``interrupt_when`` holds. On the deadline torchrun gets SIGTERM,
    which it passes to its ranks (and SIGKILL 30 s later), so no rank outlives the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    command += ["-m", "textgen.cli", "train", "--quiet", *args]
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            if interrupt_when is not None:
                while not interrupt_when():
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise subprocess.TimeoutExpired(command, LAUNCH_TIMEOUT_S)
                    time.sleep(0.05)  # polling the predicate, not timing anything
                proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=90)
            pytest.fail(f"torchrun did not get where expected within {LAUNCH_TIMEOUT_S} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def _cli_flags(model: dict, train: dict) -> list[str]:
    names = {"hidden_size": "--hidden", "embedding_size": "--embedding", "dropout": "--dropout"}
    flags = [f for key, value in model.items() for f in (names[key], str(value))]
    return flags + [f for key, value in train.items() for f in ("--" + key.replace("_", "-"), str(value))]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[name] - b[name]).abs().max().item() for name in a)


def _logged(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@dataclass
class Runs:
    data: dict[str, str]
    one: Path  # one process, no dropout, paused at step 4
    two: Path  # the same on two ranks (out dir: rank0.pt, rank1.pt and run/)
    straight: Path  # two ranks, dropout, straight to the end
    split: Path  # the same paused at step 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, corpus_text: str) -> Runs:
    """The runs the tests compare with, made once (starting ranks is the slow part: one start of two ranks does
    all three of theirs)."""
    root = tmp_path_factory.mktemp("ddp")
    data_file = root / "corpus.txt"
    data_file.write_text(corpus_text, encoding="utf-8")
    made = Runs({"path": str(data_file)}, root / "one" / "run", root / "two", root / "straight", root / "split")
    run_train(MODEL, made.data, TRAIN, made.one, stop_at=4, progress=False)
    # no dropout to compare with one process; dropout to make each rank's RNG state matter on resume
    _spawn(
        [
            (made.two, MODEL, made.data, TRAIN, 4),
            (made.straight, DROPOUT_MODEL, made.data, TRAIN, 8),
            (made.split, DROPOUT_MODEL, made.data, TRAIN, 4),
        ]
    )
    return made


def test_ranks_agree_and_match_one_process_on_the_same_global_batch(runs: Runs) -> None:
    one, two, rank0, rank1 = runs.one, runs.two / "run", _weights(runs.two, 0), _weights(runs.two, 1)
    for name in rank0:  # DDP's all-reduced gradients and the same update: bit for bit the same weights
        assert torch.equal(rank0[name], rank1[name]), name
    assert _max_difference(rank0, load_checkpoint(two / "last.pt")["model"]) == 0  # rank 0 wrote the checkpoint
    assert _max_difference(rank0, load_checkpoint(one / "last.pt")["model"]) < ATOL
    # evaluation split over the ranks and summed: the loss one process measures, on every token of the split
    (val_one,), (val_two,) = ([r for r in _logged(run) if "val_loss" in r] for run in (one, two))
    assert val_two["val_loss"] == pytest.approx(val_one["val_loss"], abs=ATOL)
    # rank 0 alone writes metrics: each record once
    assert [r["step"] for r in _logged(two)] == [r["step"] for r in _logged(one)] == [4, 4]


def test_a_two_rank_checkpoint_resumes_on_one_process(
    tmp_path: Path, runs: Runs, capsys: pytest.CaptureFixture[str]
) -> None:
    """Data position, carried state (the whole batch's), optimizer and schedule do not depend on the world size."""
    one, two = shutil.copytree(runs.one, tmp_path / "one"), shutil.copytree(runs.two / "run", tmp_path / "two")
    ckpt = load_checkpoint(two / "last.pt")
    assert ckpt["world_size"] == 2 and ckpt["carried_state"][0].shape[1] == TRAIN["batch_size"]
    capsys.readouterr()
    for run in (one, two):
        assert run_train({}, {}, {}, run, resume=True, progress=False).step == TRAIN["max_steps"]
    assert "was saved by 2 process(es) and resumes on 1: data, schedule and state continue; dropout masks" in (
        capsys.readouterr().err
    )
    assert _max_difference(load_checkpoint(one / "last.pt")["model"], load_checkpoint(two / "last.pt")["model"]) < ATOL


def test_torchrun_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path: Path, runs: Runs) -> None:
    run = shutil.copytree(runs.split / "run", tmp_path / "split")
    assert load_checkpoint(run / "last.pt")["step"] == 4
    done = _torchrun("--out", str(run), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("max_steps at step 8") == 1  # rank 0 alone reports
    resumed = load_checkpoint(run / "last.pt")
    assert resumed["step"] == TRAIN["max_steps"]
    for name, weights in _weights(runs.straight, 0).items():  # the same ranks, the same sums: bit for bit
        assert torch.equal(resumed["model"][name], weights), name
    assert [r["step"] for r in _logged(run) if "val_loss" in r] == [4, 8]


def test_a_one_process_checkpoint_resumes_under_torchrun_exactly(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A one-process run continued by a one-rank torchrun launch (in this process): its RNG state is the rank's,
    and DDP over one rank changes no gradient, so the weights are those of the run straight through."""
    data = {"path": str(corpus_file)}
    run_train(DROPOUT_MODEL, data, TRAIN, tmp_path / "straight", progress=False)
    run_train(DROPOUT_MODEL, data, TRAIN, tmp_path / "split", stop_at=4, progress=False)
    environment = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**environment, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    run_train({}, {}, {}, tmp_path / "split", resume=True, progress=False)
    assert "ranks" in load_checkpoint(tmp_path / "split" / "last.pt")["rng"]  # written by the one-rank launch
    straight, split = (load_checkpoint(tmp_path / run / "last.pt")["model"] for run in ("straight", "split"))
    assert _max_difference(straight, split) == 0


TORCHRUN_ENVIRONMENT = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--batch-size", "5"],
            "--batch-size 5 cannot be split evenly over 2 processes: it is the global batch, and each process "
            "trains an equal share of its streams (at least one); use a multiple of 2",
        ),
        (
            ["--device", "cuda:1"],
            "--device cuda:1 under torchrun: each process trains on the GPU of its local rank; "
            "pass --device cuda (or auto), or cpu",
        ),
    ],
)
def test_a_launch_the_run_cannot_be_split_over_is_one_line(
    tmp_path: Path,
    corpus_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    """What each rank says before it joins the process group (so no rank waits for the others to fail): the
    environment is torchrun's for rank 0 of 2 (the port is never reached)."""
    from textgen.cli import main

    for name, value in {**TORCHRUN_ENVIRONMENT, "MASTER_PORT": str(_free_port())}.items():
        monkeypatch.setenv(name, value)
    tiny = [*_cli_flags(MODEL, {**TRAIN, "batch_size": 4}), "--quiet"]
    assert main(["train", "--data", str(corpus_file), "--out", str(tmp_path / "r"), *tiny, *flags]) == 1
    err = capsys.readouterr().err
    assert err == f"textgen train: error: {message}\n"
    assert not (tmp_path / "r" / "last.pt").exists()


def test_an_incomplete_torchrun_environment_is_a_clear_error(
    tmp_path: Path, corpus_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="incomplete torchrun environment: WORLD_SIZE set but not RANK, LOCAL_RANK"):
        run_train(MODEL, {"path": str(corpus_file)}, TRAIN, tmp_path / "r", progress=False)


def test_ctrl_c_stops_every_torchrun_rank_at_the_same_step_and_saves(tmp_path: Path, corpus_file: Path) -> None:
    """torchrun passes Ctrl-C to each rank; they see it at different steps, agree on one, save and exit (a rank
    stopping alone would leave the others waiting in a collective)."""
    run = tmp_path / "r"
    endless = {**TRAIN, "max_steps": 10**6, "eval_every": 10**6, "log_every": 1}
    done = _torchrun(
        "--data",
        str(corpus_file),
        "--out",
        str(run),
        *_cli_flags(MODEL, endless),
        interrupt_when=lambda: (run / "metrics.jsonl").exists(),  # training is under way
    )
    step = load_checkpoint(run / "last.pt")["step"]
    assert done.stdout.count(f"interrupted at step {step} ") == 1, done.stderr[-3000:]  # rank 0 reports
    assert f"continue with: torchrun --standalone --nproc-per-node 2 -m textgen.cli train --out {run} --resume" in (
        done.stdout
    )
    assert [(r["step"], r["event"]) for r in _logged(run) if "event" in r] == [(step, "interrupted")]
