from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from textgen.cli import main

TINY = ["--hidden", "16", "--embedding", "8", "--batch-size", "4", "--bptt", "16", "--quiet"]


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "textgen.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_train_eval_sample_from_the_command_line(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        main(["train", "--data", str(corpus_file), "--out", str(out), "--max-steps", "5", "--eval-every", "5", *TINY])
        == 0
    )
    assert "max_steps at step 5" in capsys.readouterr().out
    assert {"best.pt", "last.pt", "metrics.jsonl"} <= {p.name for p in out.iterdir()}

    assert main(["eval", str(out / "best.pt"), "--split", "test"]) == 0
    assert capsys.readouterr().out.startswith("test: loss ")

    args = [
        "sample",
        str(out / "best.pt"),
        "--prompt",
        "the ",
        "--max-tokens",
        "40",
        "--seed",
        "5",
        "--temperature",
        "0.9",
        "--top-k",
        "10",
        "--top-p",
        "0.95",
    ]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first  # reproducible for a seed
    assert first.startswith("the ") and len(first) == len("the ") + 40 + 1


def test_word_level_eval_reports_perplexity(
    tmp_path: Path, corpus_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(corpus_file),
                "--level",
                "word",
                "--out",
                str(out),
                "--max-steps",
                "2",
                *TINY,
                "--bptt",
                "4",
            ]
        )
        == 0
    )
    assert main(["eval", str(out / "best.pt"), "--split", "valid"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_greedy_sampling_is_deterministic(trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    outputs = set()
    for seed in ("1", "2"):
        assert (
            main(
                [
                    "sample",
                    str(trained_run / "best.pt"),
                    "--prompt",
                    "def",
                    "--temperature",
                    "0",
                    "--max-tokens",
                    "30",
                    "--seed",
                    seed,
                ]
            )
            == 0
        )
        outputs.add(capsys.readouterr().out)
    assert len(outputs) == 1


@pytest.mark.parametrize(
    "content,extra,message",
    [
        (None, [], "data path not found: "),
        (b"", [], "the corpus is empty"),
        (b"ok\n\xff\xfe", [], "is not UTF-8: byte 0xff at offset 3 (line 2, column 1)"),
        (b"tiny corpus\n" * 5, ["--batch-size", "64"], "fewer than one batch"),
        (b"a b c d\n" * 50, ["--level", "word", "--min-freq", "100"], "vocabulary would hold only <unk>"),
    ],
    ids=["missing", "empty", "not-utf8", "too-small", "only-unk"],
)
def test_bad_input_is_one_line_without_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, extra: list[str], message: str
) -> None:
    path = tmp_path / "corpus.txt"
    if content is not None:
        path.write_bytes(content)
    code = main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *TINY, *extra])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("textgen train: error: ") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "run" / "last.pt").exists()


def test_process_exit_status_and_message_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    proc = run_cli("train", "--data", str(bad), "--out", str(tmp_path / "run"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"textgen train: error: {bad} is not UTF-8: byte 0xe9 at offset 3 (line 1, column 4): invalid continuation byte"
    ]
    proc = run_cli("sample", str(tmp_path / "nope.pt"))
    assert proc.returncode == 1 and "checkpoint not found" in proc.stderr and "Traceback" not in proc.stderr


def test_ctrl_c_saves_a_resumable_checkpoint(tmp_path: Path, corpus_file: Path) -> None:
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "textgen.cli",
            "train",
            "--data",
            str(corpus_file),
            "--out",
            str(out),
            "--max-steps",
            "1000000000",  # a run that cannot end by itself before the signal, on any machine
            "--log-every",
            "1",
            *TINY,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The first logged step proves the loop (and its signal handler) is running: signal then, not after a guess.
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "training never logged a step"
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted at step" in stdout and "--resume" in stdout
    from training.checkpoint import load_checkpoint

    assert load_checkpoint(out / "last.pt")["step"] > 0


def test_help_lists_the_documented_flags() -> None:
    from textgen.cli import build_parser

    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()  # type: ignore[union-attr]
    for flag in ("--data", "--level", "--cell", "--layers", "--hidden", "--out", "--max-steps", "--resume"):
        assert flag in text
