"""Reading a corpus into train/valid/test text: one file split by position, a directory of files, explicit
split files (the Penn Treebank / WikiText-2 layout), or the default corpus, the Python standard library's
own source. Every fault is a one-line ``DataError`` that names the file."""

from __future__ import annotations

import glob
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from textgen.errors import DataError, NotFoundError
from textgen.tokenizer import Level

STDLIB = "stdlib"
# Files named like these inside a --data directory are taken as explicit splits.
_SPLIT_LAYOUTS = (("train.txt", "valid.txt", "test.txt"), ("ptb.train.txt", "ptb.valid.txt", "ptb.test.txt"))


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how it becomes tokens. Stored in checkpoints."""

    path: str | None = None  # a file or directory; None: the Python standard library
    valid_path: str | None = None  # with test_path: explicit split files, ``path`` is then the train file
    test_path: str | None = None
    level: str = Level.CHAR.value
    split: tuple[float, float, float] = (0.9, 0.05, 0.05)
    glob: str = "**/*.txt"
    max_chars: int | None = 4_000_000  # cap on characters read (whole corpus, before splitting)
    vocab_size: int | None = None  # cap, including <unk>
    min_freq: int = 1

    def __post_init__(self) -> None:
        Level(self.level)
        if len(self.split) != 3 or any(f < 0 for f in self.split) or abs(sum(self.split) - 1) > 1e-6:
            raise DataError(f"split fractions must be three non-negative numbers summing to 1 (got {self.split})")
        if self.split[0] <= 0 or self.split[1] <= 0:
            raise DataError("split fractions must give the train and valid splits a positive share")
        if (self.valid_path is None) != (self.test_path is None):
            raise DataError("give both a validation and a test file, or neither")
        if self.max_chars is not None and self.max_chars <= 0:
            raise DataError(f"max_chars must be positive (got {self.max_chars})")


@dataclass
class Splits:
    train: str
    valid: str
    test: str
    description: str
    sources: list[str] = field(default_factory=list)

    def get(self, name: str) -> str:
        if name not in ("train", "valid", "test"):
            raise DataError(f"unknown split {name!r}: choose train, valid or test")
        return getattr(self, name)


def read_text(path: Path) -> str:
    """A file's text, strictly UTF-8; a bad byte is reported with its offset, line and column."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"expected a file, found a directory: {path}") from None
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(
            f"{path} is not UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} "
            f"(line {line}, column {column}): {exc.reason}"
        ) from None


# Left out of the default corpus: installed packages, test suites (deliberately odd encodings and syntax) and
# the generated codec tables of ``encodings`` (byte-to-character maps, not code people write).
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings"})


def stdlib_files() -> list[Path]:
    """The standard library's own modules, ``*.py`` in a fixed order (sorted relative paths)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = sorted(p.relative_to(root) for p in root.rglob("*.py"))
    return [root / p for p in rel if not _STDLIB_SKIP_DIRS.intersection(p.parts[:-1])]


def _read_many(paths: list[Path], max_chars: int | None, skip_undecodable: bool) -> tuple[str, list[str]]:
    parts: list[str] = []
    used: list[str] = []
    total = 0
    for p in paths:
        if max_chars is not None and total >= max_chars:
            break
        try:
            text = read_text(p)
        except DataError:
            if skip_undecodable:  # a handful of stdlib test files are deliberately latin-1
                continue
            raise
        parts.append(text)
        used.append(str(p))
        total += len(text)
    text = "".join(parts)
    return (text[:max_chars] if max_chars is not None else text), used


def _split_by_position(text: str, fractions: tuple[float, float, float], snap_to_lines: bool) -> list[str]:
    n = len(text)
    cuts = [round(n * fractions[0]), round(n * (fractions[0] + fractions[1]))]
    if snap_to_lines:  # word level: cut just after a line break, never inside a word
        cuts = [_next_line_start(text, c) for c in cuts]
    return [text[: cuts[0]], text[cuts[0] : cuts[1]], text[cuts[1] :]]


def _next_line_start(text: str, pos: int) -> int:
    newline = text.find("\n", pos)
    return len(text) if newline < 0 else newline + 1


def _explicit_layout(directory: Path) -> tuple[Path, Path, Path] | None:
    for names in _SPLIT_LAYOUTS:
        files = tuple(directory / n for n in names)
        if all(f.is_file() for f in files):
            return files  # type: ignore[return-value]
    return None


def load_splits(cfg: DataConfig) -> Splits:
    """Read the corpus ``cfg`` names and cut it into train/valid/test text."""
    level = Level(cfg.level)
    if cfg.valid_path is not None:
        files = (Path(cfg.path or ""), Path(cfg.valid_path), Path(cfg.test_path or ""))
        return _explicit_splits(files)
    if cfg.path is None or cfg.path == STDLIB:
        files = stdlib_files()
        text, used = _read_many(files, cfg.max_chars, skip_undecodable=True)
        desc = f"Python {sysconfig.get_python_version()} standard library source ({len(used)} files)"
        return _checked(_position_splits(text, cfg, level, desc, used))
    path = Path(cfg.path)
    if path.is_dir():
        layout = _explicit_layout(path)
        if layout is not None:
            return _explicit_splits(layout)
        files = sorted(Path(p) for p in glob.glob(str(path / cfg.glob), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"no files match {cfg.glob!r} in {path}")
        text, used = _read_many(files, cfg.max_chars, skip_undecodable=False)
        return _checked(_position_splits(text, cfg, level, f"{path} ({len(used)} files)", used))
    if not path.exists():
        raise NotFoundError(f"data path not found: {path}")
    text, used = _read_many([path], cfg.max_chars, skip_undecodable=False)
    return _checked(_position_splits(text, cfg, level, str(path), used))


def _position_splits(text: str, cfg: DataConfig, level: Level, desc: str, used: list[str]) -> Splits:
    if not text.strip():
        raise DataError(f"the corpus is empty: {desc}")
    train, valid, test = _split_by_position(text, cfg.split, snap_to_lines=level is Level.WORD)
    pct = "/".join(f"{f * 100:g}" for f in cfg.split)
    return Splits(train, valid, test, f"{desc}, {len(text):,} chars, split {pct} by position", used)


def _explicit_splits(files: tuple[Path, Path, Path]) -> Splits:
    texts = [read_text(f) for f in files]
    for f, t in zip(files, texts, strict=False):
        if not t.strip():
            raise DataError(f"the corpus is empty: {f}")
    desc = f"train {files[0]}, valid {files[1]}, test {files[2]}"
    return _checked(Splits(*texts, description=desc, sources=[str(f) for f in files]))


def _checked(splits: Splits) -> Splits:
    for name in ("train", "valid"):
        if not splits.get(name).strip():
            raise DataError(f"the {name} split is empty: {splits.description}; use more data or other fractions")
    return splits
