from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from tokenizers import Tokenizer

from textgen.errors import DataError
from textgen.tokenizer import EOS, REPLACEMENT_CHAR, UNK, Level, TextTokenizer, count_tokens

CHAR_TEXT = "def f(x):\n\treturn x * 2  # é, 日本, emoji 🙂\n"
WORD_TEXT = "the cat sat\non the mat\n\nthe end\n"


def build(level: Level, text: str, **kw: object) -> TextTokenizer:
    return TextTokenizer.build(level, count_tokens(level, text), **kw)  # type: ignore[arg-type]


def test_char_round_trip_keeps_every_code_point() -> None:
    tok = build(Level.CHAR, CHAR_TEXT)
    ids = tok.encode(CHAR_TEXT)
    assert len(ids) == len(CHAR_TEXT)
    assert tok.decode(ids) == CHAR_TEXT
    assert tok.id_to_token[0] == UNK


def test_char_unknown_becomes_unk_and_decodes_to_replacement_char() -> None:
    tok = build(Level.CHAR, "abc\n")
    ids = tok.encode("abz")
    assert ids[-1] == tok.unk_id
    assert tok.decode(ids) == "ab" + REPLACEMENT_CHAR


def test_char_literal_unk_text_is_five_characters() -> None:
    tok = build(Level.CHAR, "<unk> x\n")
    assert len(tok.encode("<unk>")) == 5


def test_word_round_trip_with_eos_per_line() -> None:
    tok = build(Level.WORD, WORD_TEXT)
    ids = tok.encode(WORD_TEXT)
    tokens = [tok.id_to_token[i] for i in ids]
    assert tokens == ["the", "cat", "sat", EOS, "on", "the", "mat", EOS, EOS, "the", "end", EOS]
    assert tok.decode(ids) == WORD_TEXT
    assert tok.start_id == tok.eos_id


def test_word_whitespace_is_normalised_and_unknown_words_map_to_unk() -> None:
    tok = build(Level.WORD, WORD_TEXT)
    ids = tok.encode("  the   dog\tsat ")
    assert [tok.id_to_token[i] for i in ids] == ["the", UNK, "sat"]
    assert tok.decode(ids) == "the <unk> sat"


def test_pieces_join_to_decode_from_any_split_point() -> None:
    for level, text in ((Level.CHAR, CHAR_TEXT), (Level.WORD, WORD_TEXT)):
        tok = build(level, text)
        ids = list(tok.encode(text))
        for cut in range(1, len(ids)):
            head = tok.decode(ids[:cut])
            tail = "".join(tok.pieces(ids[cut:], after=ids[cut - 1]))
            assert head + tail == tok.decode(ids)


@pytest.mark.parametrize("level,text", [(Level.CHAR, CHAR_TEXT), (Level.WORD, WORD_TEXT)])
def test_json_round_trip_and_plain_tokenizers_library_agree(level: Level, text: str) -> None:
    tok = build(level, text)
    again = TextTokenizer.from_json(level, tok.to_json())
    assert again == tok
    plain = Tokenizer.from_str(tok.to_json())  # what a stranger's code would do
    assert plain.encode(text).ids == list(tok.encode(text))


def test_vocabulary_order_cap_and_min_freq() -> None:
    text = "aaaa bbb cc d\n"
    tok = build(Level.CHAR, text)
    assert tok.id_to_token[:3] == [UNK, "a", " "]  # by falling frequency, ties by code point
    capped = build(Level.CHAR, text, max_size=3)
    assert capped.vocab_size == 3
    assert capped.decode(capped.encode("ab")) == "a" + REPLACEMENT_CHAR
    frequent = build(Level.WORD, "x x y\nx z\n", min_freq=2)
    assert frequent.id_to_token == [UNK, EOS, "x"]


def test_word_vocabulary_of_only_unk_is_an_error() -> None:
    with pytest.raises(DataError, match="only <unk>"):
        build(Level.WORD, "a b c\n", min_freq=5)


def test_long_text_is_encoded_in_chunks_without_changing_ids() -> None:
    line = "alpha beta gamma delta " * 40 + "\n"
    text = line * 200  # well over one encoding chunk
    for level in Level:
        tok = build(level, line)
        ids = tok.encode(text)
        single = np.concatenate([tok.encode(line)] * 200)
        assert np.array_equal(ids, single)


@pytest.mark.parametrize("level", ["char", "word"])
def test_piece_by_piece_equals_pieces(level: str) -> None:
    text = "the cat sat\non the mat\n\nthe end"
    tok = TextTokenizer.build(level, count_tokens(Level(level), text))
    ids = tok.encode(text).tolist()
    for after in (None, ids[0]):
        previous, pieces = after, []
        for i in ids:
            pieces.append(tok.piece(i, previous))
            previous = i
        assert pieces == tok.pieces(ids, after)


# Whitespace on which Python's str.split and the encoder's WhitespaceSplit (Unicode White_Space) may disagree.
UNUSUAL = ["\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u00a0", "\u3000", "\t", "\r", "\x0b", "\x0c"]


def _unusual_text(repeat: int = 1) -> str:
    lines = []
    for n, c in enumerate(UNUSUAL):
        lines.append(f"a{c}b w{n}{c} {c}lead{n} x{n}{c}{c}y{n} plain")
    lines.append("crlf line\r")
    return ("\n".join(lines) + "\n") * repeat


def test_word_counts_split_exactly_as_the_encoder_does() -> None:
    text = _unusual_text()
    counts = count_tokens(Level.WORD, text)
    assert counts["a\x1cb"] == 1  # one word to the encoder: str.split would have counted "a" and "b"
    assert "a\u3000b" not in counts and counts["a"] >= 1  # and U+3000 does separate words for both
    tok = TextTokenizer.build(Level.WORD, counts)
    for word in counts:
        ids = tok.encode(word)
        assert len(ids) == 1 and ids[0] != tok.unk_id and tok.id_to_token[ids[0]] == word, repr(word)
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert np.array_equal(tok.encode(tok.decode(ids)), ids)  # the round trip holds


@pytest.mark.parametrize("level", list(Level))
def test_counts_are_the_histogram_of_the_encoding_over_many_chunks(level: Level) -> None:
    text = _unusual_text(repeat=600) + "only plain words here\n" * 20_000  # well over one encoding chunk
    counts = count_tokens(level, text)
    tok = TextTokenizer.build(level, counts)
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert Counter(tok.id_to_token[i] for i in ids.tolist()) == counts


def test_char_counts_split_exactly_as_the_encoder_does() -> None:
    text = "".join(UNUSUAL) + "\r\n" + "".join(chr(i) for i in range(0x10000) if not 0xD800 <= i < 0xE000)
    text += "".join(chr(i) for i in range(0x10000, 0x110000, 97))
    counts = count_tokens(Level.CHAR, text)
    tok = TextTokenizer.build(Level.CHAR, counts)
    ids = tok.encode(text)
    assert len(ids) == len(text) and tok.unk_id not in ids  # one token per code point, every one known
    assert tok.decode(ids) == text


def test_encoding_with_a_limit_stops_at_the_piece_that_crosses_it() -> None:
    tok = TextTokenizer.build(Level.WORD, count_tokens(Level.WORD, "a b\n"))
    text = "a b\n" * 250_000  # 1 MB, 750,000 tokens, 16 pieces
    full = tok.encode_parts(text)
    limited = tok.encode_parts(text, max_tokens=1000)
    assert len(full) > 10 and len(limited) == 1 and limited[0].size > 1000
    assert np.array_equal(limited[0], full[0])
    assert sum(p.size for p in tok.encode_parts(text, max_tokens=10**6)) == 750_000
