from __future__ import annotations

from pathlib import Path

import pytest

from textgen.errors import DataError, NotFoundError
from training.corpus import DataConfig, load_splits, stdlib_files


def test_single_file_is_split_by_position(corpus_file: Path, corpus_text: str) -> None:
    splits = load_splits(DataConfig(path=str(corpus_file), split=(0.8, 0.1, 0.1)))
    assert splits.train + splits.valid + splits.test == corpus_text
    assert len(splits.train) == round(len(corpus_text) * 0.8)
    assert len(splits.valid) == round(len(corpus_text) * 0.9) - round(len(corpus_text) * 0.8)


def test_word_level_cuts_fall_on_line_ends(corpus_file: Path) -> None:
    splits = load_splits(DataConfig(path=str(corpus_file), level="word"))
    assert splits.train.endswith("\n") and splits.valid.endswith("\n")


def test_directory_of_files_in_sorted_order(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second file\n" * 10)
    (tmp_path / "a.txt").write_text("first file\n" * 10)
    (tmp_path / "skip.md").write_text("not matched\n")
    splits = load_splits(DataConfig(path=str(tmp_path), split=(0.5, 0.5, 0.0)))
    text = splits.train + splits.valid + splits.test
    assert text == "first file\n" * 10 + "second file\n" * 10
    assert splits.sources == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


@pytest.mark.parametrize(
    "names", [("train.txt", "valid.txt", "test.txt"), ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt")]
)
def test_directory_with_split_files_uses_them(tmp_path: Path, names: tuple[str, str, str]) -> None:
    for name, body in zip(names, ("tr a\n", "va b\n", "te c\n"), strict=False):
        (tmp_path / name).write_text(body)
    splits = load_splits(DataConfig(path=str(tmp_path), level="word"))
    assert (splits.train, splits.valid, splits.test) == ("tr a\n", "va b\n", "te c\n")


def test_explicit_split_files(tmp_path: Path) -> None:
    files = []
    for name in ("tr", "va", "te"):
        files.append(tmp_path / name)
        files[-1].write_text(f"{name} text\n")
    splits = load_splits(DataConfig(path=str(files[0]), valid_path=str(files[1]), test_path=str(files[2])))
    assert splits.valid == "va text\n"


def test_default_corpus_is_the_stdlib_in_a_fixed_order() -> None:
    files = stdlib_files()
    assert files == sorted(files)
    assert not any({"site-packages", "test", "encodings"} & set(f.parts) for f in files)
    a = load_splits(DataConfig(max_chars=50_000))
    b = load_splits(DataConfig(max_chars=50_000))
    assert a.train == b.train and len(a.train + a.valid + a.test) == 50_000
    assert "def " in a.train and "standard library" in a.description


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match=r"not found.*nope\.txt"):
        load_splits(DataConfig(path=str(tmp_path / "nope.txt")))


def test_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    with pytest.raises(DataError, match=r"empty.*empty\.txt"):
        load_splits(DataConfig(path=str(empty)))


def test_non_utf8_says_where(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"fine line\ncaf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8: byte 0xe9 at offset 13 \(line 2, column 4\)"):
        load_splits(DataConfig(path=str(bad)))


def test_bad_split_fractions() -> None:
    with pytest.raises(DataError, match="sum"):
        DataConfig(split=(0.5, 0.2, 0.2))
