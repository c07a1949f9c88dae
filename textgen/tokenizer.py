"""Char- and word-level tokenizers stored in the Hugging Face ``tokenizers`` JSON format.

Why that format: it is a documented, language-neutral file that the ``tokenizers`` library loads in Python,
Rust and JavaScript, so a model bundle can be served by a stranger without our code; its Rust encoder is
fast (about 3 M chars/s per core for the char level) and it needs no torch. Both levels fit one shape: a
``WordLevel`` model (a plain token -> id table with ``<unk>``) behind a pre-tokenizer that splits text into
code points (char level) or whitespace-separated words (word level, with every line break normalised to an
``<eos>`` token first, the Penn Treebank convention).

Detokenization is ours, because no stock ``tokenizers`` decoder can express the word rule "words joined by
single spaces, ``<eos>`` is a line break with no space around it". The rule is small and written down here
(and in bundle manifests): char level concatenates tokens, with ``<unk>`` shown as U+FFFD; word level is the
rule above, ``<unk>`` shown literally (as in PTB text).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from enum import Enum

import numpy as np
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

from textgen.errors import DataError, InvalidInputError

UNK = "<unk>"
EOS = "<eos>"
REPLACEMENT_CHAR = "\ufffd"
# Text is encoded in pieces of about this many characters, cut at line ends, so memory stays bounded and
# the Rust encoder can use several threads.
_ENCODE_CHUNK_CHARS = 1 << 16
_MAX_TOKEN_CHARS = 256  # text longer than this is no single token of any vocabulary we build


class Level(str, Enum):
    CHAR = "char"
    WORD = "word"


# Stands for "not a candidate word" while counting: it contains whitespace, so it is no word of any text.
_NOT_A_CANDIDATE = " "


def count_tokens(level: Level, text: str) -> Counter[str]:
    """Token frequencies of ``text`` exactly as the encoder of ``level`` splits it, so that every counted token
    encodes to itself."""
    if level is Level.CHAR:
        return Counter(text)  # one token per code point, as the char pre-tokenizer splits (tested on all of them)
    return _count_words(text)


def _count_words(text: str) -> Counter[str]:
    """Word frequencies decided by the word encoder's own normalizer and pre-tokenizer (``WhitespaceSplit``:
    Unicode White_Space). Reading the pre-tokenizer's words back one by one is about 6x slower than Python's
    ``str.split``, whose whitespace differs (it also splits at U+001C..U+001F); so ``str.split`` only proposes
    candidate words, the encoder (in Rust, in parallel) encodes the text with the candidates as its vocabulary,
    and the ids are counted. The rare piece holding a word that is no candidate is counted word by word with the
    pre-tokenizer instead."""
    candidates = [EOS, *sorted(set(text.split()) - {EOS})]
    vocab = {_NOT_A_CANDIDATE: 0, **{word: i + 1 for i, word in enumerate(candidates)}}
    hf = _hf_tokenizer(Level.WORD, vocab, unk_token=_NOT_A_CANDIDATE)
    pieces = _chunks(text)  # the pieces ``encode`` cuts, so words straddle no cut here either
    counts = np.zeros(len(vocab), dtype=np.int64)
    others: Counter[str] = Counter()
    for piece, encoding in zip(pieces, hf.encode_batch_fast(pieces, add_special_tokens=False), strict=True):
        ids = np.asarray(encoding.ids, dtype=np.int64)
        if (ids == 0).any():
            others.update([word for word, _ in hf.pre_tokenizer.pre_tokenize_str(hf.normalizer.normalize_str(piece))])
        else:
            counts += np.bincount(ids, minlength=len(vocab))
    found = Counter({candidates[i - 1]: int(n) for i, n in enumerate(counts.tolist()) if i and n})
    return found + others


def _hf_tokenizer(level: Level, vocab: dict[str, int], unk_token: str = UNK) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk_token))
    if level is Level.CHAR:
        # Oniguruma's (?m) makes "." match newlines too: one split per code point.
        tok.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    else:
        tok.normalizer = normalizers.Replace("\n", f" {EOS} ")
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


class TextTokenizer:
    """A vocabulary with encode/decode for one level. Immutable once built."""

    def __init__(self, level: Level, hf: Tokenizer) -> None:
        self.level = Level(level)
        self._hf = hf
        vocab = hf.get_vocab()
        if UNK not in vocab:
            raise InvalidInputError(f"tokenizer has no {UNK} token")
        if self.level is Level.WORD and EOS not in vocab:
            raise InvalidInputError(f"word tokenizer has no {EOS} token")
        if sorted(vocab.values()) != list(range(len(vocab))):
            raise InvalidInputError("tokenizer ids are not contiguous from 0")
        self.id_to_token: list[str] = [""] * len(vocab)
        for token, idx in vocab.items():
            self.id_to_token[idx] = token
        self.unk_id = vocab[UNK]
        self.eos_id = vocab.get(EOS)
        # Text shown for each id by ``decode``; see the module docstring for the rule.
        self._shown = list(self.id_to_token)
        if self.level is Level.CHAR:
            self._shown[self.unk_id] = REPLACEMENT_CHAR
        else:
            self._shown[vocab[EOS]] = "\n"

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        level: Level | str,
        counts: Counter[str],
        max_size: int | None = None,
        min_freq: int = 1,
    ) -> TextTokenizer:
        """Vocabulary from token counts: ``<unk>`` first, then by falling frequency, ties by token."""
        level = Level(level)
        if max_size is not None and max_size < 2:
            raise InvalidInputError(f"vocabulary size must be at least 2 (got {max_size})")
        if min_freq < 1:
            raise InvalidInputError(f"minimum frequency must be at least 1 (got {min_freq})")
        ranked = sorted(
            ((tok, n) for tok, n in counts.items() if tok != UNK and n >= min_freq),
            key=lambda item: (-item[1], item[0]),
        )
        if level is Level.WORD:
            # <eos> is structural: keep it whatever the caps say.
            ranked = [(EOS, counts.get(EOS, 0))] + [item for item in ranked if item[0] != EOS]
        if max_size is not None:
            ranked = ranked[: max_size - 1]
        words = [tok for tok, _ in ranked if tok != EOS]
        if not words:
            what = "word" if level is Level.WORD else "character"
            raise DataError(
                f"the {what} vocabulary would hold only {UNK}: no token occurs at least "
                f"{min_freq} time(s) in the training split; lower the minimum frequency or use more data"
            )
        vocab = {UNK: 0}
        for tok, _ in ranked:
            vocab[tok] = len(vocab)
        return cls(level, _hf_tokenizer(level, vocab))

    @classmethod
    def from_json(cls, level: Level | str, tokenizer_json: str) -> TextTokenizer:
        try:
            hf = Tokenizer.from_str(tokenizer_json)
        except Exception as exc:  # the library raises a bare Exception for malformed JSON
            raise InvalidInputError(f"tokenizer JSON is not a valid tokenizers file: {exc}") from exc
        model = json.loads(tokenizer_json).get("model", {})
        if model.get("type") != "WordLevel":
            raise InvalidInputError(f"tokenizer model must be WordLevel, not {model.get('type')!r}")
        return cls(Level(level), hf)

    def to_json(self) -> str:
        return self._hf.to_str()

    # -- use ----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self.id_to_token)

    @property
    def start_id(self) -> int:
        """Token fed when a prompt is empty: the line break, which is how every text in a corpus starts."""
        if self.level is Level.WORD:
            assert self.eos_id is not None
            return self.eos_id
        return self._hf.token_to_id("\n") if self._hf.token_to_id("\n") is not None else self.unk_id

    def encode(self, text: str) -> np.ndarray:
        """Token ids (int64) of ``text``; unknown tokens become ``<unk>``."""
        parts = self.encode_parts(text)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def single_token(self, text: str) -> int | None:
        """The id of the one token ``text`` is (a character of a character model, a word of a word model), or
        None: more or fewer tokens, or text outside the vocabulary (which would encode as ``<unk>``), unless it is
        ``<unk>`` itself."""
        ids = self.encode(text) if 0 < len(text) <= _MAX_TOKEN_CHARS else np.zeros(0, np.int64)
        if ids.size != 1 or (int(ids[0]) == self.unk_id and text != self.id_to_token[self.unk_id]):
            return None
        return int(ids[0])

    def encode_parts(self, text: str, max_tokens: int | None = None) -> list[np.ndarray]:
        """``encode``'s ids, one array per piece of ``_chunks(text)`` (a single piece for short text), so that
        ``first_unknown`` can find a token's text again by re-reading one piece instead of the whole text. With
        ``max_tokens``, pieces are encoded one by one and encoding stops after the piece that takes the count
        past it (a text over a limit costs the limit, not its length)."""
        if len(text) <= _ENCODE_CHUNK_CHARS:
            return [np.asarray(self._hf.encode(text, add_special_tokens=False).ids, dtype=np.int64)]
        if max_tokens is None:
            encodings = self._hf.encode_batch_fast(_chunks(text), add_special_tokens=False)
            return [np.asarray(e.ids, dtype=np.int64) for e in encodings]
        parts, count = [], 0
        for piece in _chunks(text):
            parts.append(np.asarray(self._hf.encode(piece, add_special_tokens=False).ids, dtype=np.int64))
            count += parts[-1].size
            if count > max_tokens:
                break
        return parts

    def first_unknown(self, text: str, parts: list[np.ndarray]) -> tuple[int, str] | None:
        """``(character offset, text)`` of the first token of ``text`` (encoded as ``parts``) that maps to
        ``<unk>``, or None. Found from the ids; a piece of the text is encoded again, for its offsets, only when it
        holds an ``<unk>``, so a huge text with an unknown character at its end costs no second full encoding.
        The way ``decode`` shows ``<unk>`` (U+FFFD, or the word ``<unk>``) is not unknown: generated text that
        holds one can be fed back as a prompt."""
        shown = self._shown[self.unk_id]
        skipped_chars = 0
        pieces = _chunks(text) if len(parts) > 1 else [text]
        for piece, ids in zip(pieces, parts, strict=True):
            hits = np.flatnonzero(ids == self.unk_id)
            if hits.size:
                if self.level is Level.CHAR and ids.size == len(piece):  # one token per code point
                    spans: Iterable[tuple[int, int]] = ((i, i + 1) for i in hits.tolist())
                else:
                    offsets = self._hf.encode(piece, add_special_tokens=False).offsets
                    spans = (offsets[i] for i in hits.tolist())
                for start, end in spans:
                    if piece[start:end] != shown:
                        return skipped_chars + start, piece[start:end]
            skipped_chars += len(piece)
        return None

    def decode(self, ids: Iterable[int], after: int | None = None) -> str:
        """Text of ``ids``. ``after`` is the token that precedes them (None: start of text), so that
        pieces decoded one at a time join into exactly the text decoded at once."""
        return "".join(self.pieces(ids, after))

    def piece(self, token: int, after: int | None) -> str:
        """The text piece of one token after ``after`` (the per-token fast path of ``pieces``)."""
        if self.level is Level.CHAR:
            return self._shown[token]
        if token == self.eos_id:
            return "\n"
        return self._shown[token] if after is None or after == self.eos_id else " " + self._shown[token]

    def pieces(self, ids: Iterable[int], after: int | None = None) -> list[str]:
        """One text piece per id, in order (what a stream sends as each token is sampled)."""
        shown = self._shown
        if self.level is Level.CHAR:
            return [shown[i] for i in ids]
        out = []
        line_start = after is None or after == self.eos_id
        for i in ids:
            if i == self.eos_id:
                out.append("\n")
                line_start = True
            else:
                out.append(shown[i] if line_start else " " + shown[i])
                line_start = False
        return out

    def describe(self) -> dict[str, object]:
        return {
            "level": self.level.value,
            "vocab_size": self.vocab_size,
            "unk": UNK,
            "eos": EOS if self.level is Level.WORD else None,
        }

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TextTokenizer) and self.level is other.level and self.id_to_token == other.id_to_token

    def __hash__(self) -> int:
        return hash((self.level, tuple(self.id_to_token)))


def _chunks(text: str) -> Sequence[str]:
    """Pieces of about ``_ENCODE_CHUNK_CHARS`` cut just after a line break (words never straddle a cut)."""
    out = []
    start = 0
    n = len(text)
    while start < n:
        end = min(start + _ENCODE_CHUNK_CHARS, n)
        if end < n:
            newline = text.rfind("\n", start, end)
            if newline >= start:
                end = newline + 1
            else:  # one very long line: cut at a space so a word is not split
                space = text.rfind(" ", start, end)
                end = space + 1 if space >= start else end
        out.append(text[start:end])
        start = end
    return out
