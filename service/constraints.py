"""Constrained decoding (GenerateRequest.regex and .choices): which tokens keep the generated text on its way to a
match, step by step, with llguidance (the regex/grammar engine vLLM, SGLang and llama.cpp use).

Why llguidance: it builds its automaton lazily (regex derivatives), one state per text prefix actually met, under
explicit limits of work and states (``LIMITS``), so a pattern whose full DFA is exponential (``(a|b)*a(a|b){30}``)
or huge (``x{1000}{1000}``) costs a bounded amount or fails; a token mask costs tens to hundreds of microseconds.

The model's tokens become llguidance's vocabulary as the bytes of their text (``service.output.TokenText``). A
character model's token is its character. A word model's text depends on the token before it (bare at the start
of a line, after ``<eos>``, else with a leading space), so its vocabulary holds both forms (ids 0..V-1 spaced,
V..2V-1 bare; each step reads the form that applies), and, for the lookahead (``Cursor``), both again followed by a
space and by a line break. ``<unk>`` is a special token, which no pattern matches. Our models have no end-of-text
token: llguidance's end token (the last id) only stands for "the text may end here". Byte forcing is off
(``no_forcing``): every token whose text keeps a match possible may be sampled, not just the one tokenization
llguidance would force (through a Python tokenizer call).

The rule, per generated token: while the text does not match, only tokens that keep a match possible may be
sampled (``Cursor.mask``); once it matches, any token may, and one that leaves the pattern ends generation instead
of being emitted (``Advance.REJECT``); a token after which nothing can follow ends it right after (``Advance.END``).
Where no token can continue a text that does not match (the mask looks one token ahead, not further), the call
fails (FAILED_PRECONDITION). The text has at least one token: the empty text never counts as matching (a
generation's state must end with its last token pending), and a pattern that matches only it is refused.

A compiled pattern is cached per model (``Compiler``); each generation gets its own cursor, a copy of the
compiled matcher (the copies share the pattern's lazily built automaton)."""

from __future__ import annotations

import enum
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import llguidance
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

from textgen.errors import FailedPreconditionError, InvalidInputError
from textgen.tokenizer import TextTokenizer

# Work and memory one pattern may cost. Fuel is llguidance's unit of lexer work (about 100 ns): building a
# pattern may spend the initial fuel (~20 ms), a mask the step fuel (~5 ms, a twentieth of llguidance's default:
# masks run on the engine thread, so a row's mask delays its whole batch's step); states are shared by the
# generations of one compiled pattern, about 1 KB each (a full automaton of 50,000 states measured 51 MB), so a
# compiled pattern holds at most about 10 MB and a model's cache a few hundred MB at worst. Measured on a 65-character
# and a 10,000-word model: x{1000}{1000}, ((a{100}){100}){100} and (a|b)*a(a|b){30} start in 1-2 ms and mask in
# 30-100 us; 256 choices of 16 characters or \p{L}{4000} start in under 10 ms; (\w+\s*){1000} on the word model
# runs out of step fuel within a few dozen words and fails as too complex.
LIMITS = {"initial_lexer_fuel": 200_000, "step_lexer_fuel": 50_000, "max_lexer_states": 10_000}
CACHED_PATTERNS = 32  # compiled patterns kept per model
_NO_FORCING = '%llguidance {"no_forcing": true}\n'
_CEILING = np.array([-np.inf, np.inf], np.float32)  # a mask bit -> the ceiling the sampler applies
_SHOWN_CHARS = 40  # of the generated text, quoted in a dead end's error


@dataclass(frozen=True)
class ConstraintSpec:
    """A request's constraint: the field it came from and the Lark terminal the whole text must match."""

    field: str  # "regex" or "choices"
    terminal: str  # /regex/, or "choice" | "choice" | ...

    @classmethod
    def of(cls, regex: str, choices: Sequence[str], max_chars: int, max_choices: int) -> ConstraintSpec | None:
        """The request's constraint, within the server's bounds (None: unconstrained); every error names its
        field. Nothing is compiled here."""
        if regex and choices:
            raise InvalidInputError("regex, choices: give at most one of them")
        if regex:
            if len(regex) > max_chars:
                raise InvalidInputError(f"regex: {len(regex)} characters exceed this server's maximum of {max_chars}")
            return cls("regex", f"/{llguidance.regex_to_lark(regex)}/")
        if not choices:
            return None
        if len(choices) > max_choices:
            raise InvalidInputError(f"choices: {len(choices)} exceed this server's maximum of {max_choices}")
        total = 0
        for i, choice in enumerate(choices):
            if not choice:
                raise InvalidInputError(f"choices[{i}]: empty string")
            total += len(choice)
            if total > max_chars:
                raise InvalidInputError(f"choices: more than this server's maximum of {max_chars} characters together")
        # llguidance's own form of a choice grammar (llguidance.grammar_from("choice", ...)): JSON string literals.
        return cls("choices", " | ".join(json.dumps(c) for c in choices))

    def grammar(self, then: str = "", alphabet: str = "") -> str:
        """The llguidance grammar: text that matches, or (``then``) text that matches followed by ``then`` or not;
        ``alphabet`` (a regex), only text of it. One terminal, so the pattern's end is no lexeme boundary llguidance
        would have to guess."""
        optional = f" {json.dumps(then)}?" if then else ""
        terminal = f"({self.terminal}) & {alphabet}" if alphabet else self.terminal
        return f"{_NO_FORCING}start: MATCH\nMATCH: ({terminal}){optional}\n"


class Advance(enum.Enum):
    """What a sampled token does to a constrained generation."""

    CONTINUE = "continue"
    END = "end"  # the token is emitted and nothing can follow it: generation ends right after it
    REJECT = "reject"  # the text matched and this token leaves the pattern: generation ends before it


class Compiler:
    """One model's constraint vocabulary and compiled patterns. Thread-safe: patterns are compiled on worker
    threads; a cursor then belongs to one generation (one thread at a time)."""

    def __init__(self, tokenizer: TextTokenizer, cache_size: int = CACHED_PATTERNS) -> None:
        from service.output import TokenText  # (here: service.output imports this module)

        self.text = TokenText(tokenizer)
        self.vocab = tokenizer.vocab_size
        self.unk = tokenizer.unk_id
        self.eos = self.text.eos  # -1 for a character model
        self.cache_size = cache_size
        # llguidance's vocabulary: for each suffix, each form of every token (see the module docstring).
        self.forms = [self.text.bare] if self.text.char else [self.text.spaced, self.text.bare]
        self.suffixes = ("",) if self.text.char else ("", " ", "\n")
        self.size = len(self.suffixes) * len(self.forms) * self.vocab  # llguidance's end token comes after
        written = {ch for form in self.forms for i, piece in enumerate(form) if i != self.unk for ch in piece}
        self.alphabet = "/[" + "".join(f"\\x{{{ord(ch):X}}}" for ch in sorted(written)) + "]*/"  # the text it writes
        self._lock = threading.Lock()
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._compiled: OrderedDict[ConstraintSpec, tuple[llguidance.LLMatcher, llguidance.LLMatcher | None]] = (
            OrderedDict()
        )
        self._hint = (
            " (a word model's text is its words, each with a leading space unless it starts a line)"
            if not self.text.char
            else " (its first character is not in the model's vocabulary)"
        )

    def tokenizer(self) -> llguidance.LLTokenizer:
        """llguidance's view of the vocabulary, built on first use (a word model of 10,000 words: 0.2 s)."""
        with self._lock:
            if self._tokenizer is None:
                # No slices: llguidance's default ones are made for JSON, and slow masks over these tokens down.
                self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(self)), slices=[])
            return self._tokenizer

    def start(self, spec: ConstraintSpec, previous: int | None) -> Cursor:
        """A cursor for a generation that follows token ``previous`` (None: nothing). Refuses (INVALID_ARGUMENT,
        naming the field) a pattern llguidance rejects or exceeds its limits on, and one that no token of the model
        can start while the empty text does not match either. Milliseconds for a new pattern (up to the fuel
        limit): call it off the event loop."""
        matcher, lookahead = self._matchers(spec)
        cursor = Cursor(self, spec, matcher.deep_copy(), lookahead and lookahead.deep_copy(), previous)
        try:
            cursor.mask()
        except FailedPreconditionError as exc:
            if cursor.dead_end and cursor.matcher.is_accepting():
                raise InvalidInputError(f"{spec.field}: matches only the empty text") from None
            if cursor.dead_end:
                raise InvalidInputError(
                    f"{spec.field}: no text this model can generate here starts a match{self._hint}"
                ) from None
            raise InvalidInputError(str(exc)) from None
        return cursor

    def _matchers(self, spec: ConstraintSpec) -> tuple[llguidance.LLMatcher, llguidance.LLMatcher | None]:
        """The pattern's compiled matcher and, for a word model, its lookahead matcher (cached)."""
        with self._lock:
            compiled = self._compiled.get(spec)
            if compiled is not None:
                self._compiled.move_to_end(spec)
                return compiled
        limits = llguidance.LLParserLimits(verbose_errors=False, **LIMITS)
        grammars = [spec.grammar()] if self.text.char else [spec.grammar(), spec.grammar(then="\n")]
        matchers = [llguidance.LLMatcher(self.tokenizer(), g, log_level=0, limits=limits) for g in grammars]
        for matcher in matchers:
            if matcher.is_error():
                raise InvalidInputError(f"{spec.field}: {_reason(matcher.get_error())}")
        self._check_writable(spec, limits)
        compiled = (matchers[0], matchers[1] if len(matchers) > 1 else None)
        with self._lock:
            self._compiled[spec] = compiled
            while len(self._compiled) > self.cache_size:
                self._compiled.popitem(last=False)
        return compiled

    def _check_writable(self, spec: ConstraintSpec, limits: llguidance.LLParserLimits) -> None:
        """Refuse a pattern every match of which needs a character no token has (``[a-z ]+Q``): its masks, which
        know bytes, not the model's characters, would let it run to max_tokens without a match. Asked once per
        compile of the pattern intersected with the model's characters; where that runs into a limit (the
        intersection costs more, ``.{4000}``), the pattern is kept."""
        probe = llguidance.LLMatcher(self.tokenizer(), spec.grammar(alphabet=self.alphabet), log_level=0, limits=limits)
        bits = allocate_token_bitmask(1, self.size + 1)
        if not probe.is_error():
            fill_next_token_bitmask(probe, bits)
        if probe.is_error() and probe.get_error().startswith("NoExtensionBias"):  # nothing can start: no match
            raise InvalidInputError(
                f"{spec.field}: no text this model can generate matches it (a character it needs is none)"
            )

    def forget(self, spec: ConstraintSpec) -> None:
        """Drop a pattern that ran into a limit: its shared automaton may be what is full; a new compile starts
        afresh."""
        with self._lock:
            self._compiled.pop(spec, None)


class _Vocabulary:
    """The model's vocabulary as llguidance.TokenizerWrapper reads it: every token's text as bytes."""

    def __init__(self, compiler: Compiler) -> None:
        pieces = [p + suffix for suffix in compiler.suffixes for form in compiler.forms for p in form]
        self.tokens = [p.encode() for p in pieces] + [b"<end>"]
        self.eos_token_id = len(pieces)  # "the text may end here": no token of the model
        self.bos_token_id = None
        blocks = range(0, len(pieces), compiler.vocab)
        self.special_token_ids = [b + compiler.unk for b in blocks] + [self.eos_token_id]  # <unk>: never text
        self._ids = {t: i for i, t in reversed(list(enumerate(self.tokens[: len(pieces)])))}
        self._longest = max(map(len, self.tokens))

    def __call__(self, data: bytes) -> list[int]:
        """Greedy longest-match tokenization. llguidance calls it only to force bytes, which is off (and once
        when it is built); bytes no token starts with are skipped."""
        out, i = [], 0
        while i < len(data):
            for j in range(min(len(data), i + self._longest), i, -1):
                token = self._ids.get(data[i:j])
                if token is not None:
                    out.append(token)
                    i = j
                    break
            else:
                i += 1
        return out


class Cursor:
    """One generation's place in its pattern: the mask for its next token, and the token it took.

    A word model's token ends its word: the token after it starts with a space or a line break, or there is none.
    So a word may be sampled only if the text with it can go on with a space or a line break, or matches: the
    lookahead matcher, on the pattern optionally followed by a line break, reads that from the word's forms
    followed by a space and by a line break, in the same mask (``<eos>`` is judged by its own text)."""

    def __init__(
        self,
        compiler: Compiler,
        spec: ConstraintSpec,
        matcher: llguidance.LLMatcher,
        lookahead: llguidance.LLMatcher | None,
        previous: int | None,
    ):
        self.compiler = compiler
        self.spec = spec
        self.matcher = matcher
        self.lookahead = lookahead
        self.bare = previous is None or previous == compiler.eos  # a word model's next token has no space
        self.tokens = 0  # tokens taken
        self.shown = ""  # the end of the text taken, for errors
        self.dead_end = False
        self._bits = allocate_token_bitmask(1, compiler.size + 1)
        self._matched: bool | None = None  # this step's: whether the text matches as it stands
        self._viable: np.ndarray | None = None  # this step's, for a word model: which tokens may be taken

    @property
    def matched(self) -> bool:
        """Whether the text taken so far matches. Never the empty text: a generation takes at least one token (it
        could not end before its first one with the state of its last token pending, as every generation does)."""
        return self.tokens > 0 and self.matcher.is_accepting()

    def copy(self) -> Cursor:
        """An independent cursor at the same place (a candidate of its own)."""
        lookahead = self.lookahead and self.lookahead.deep_copy()
        other = Cursor(self.compiler, self.spec, self.matcher.deep_copy(), lookahead, None)
        other.bare, other.tokens, other.shown = self.bare, self.tokens, self.shown
        return other

    def mask(self, ceiling: np.ndarray | None = None) -> np.ndarray | None:
        """The next token's ceiling row (float32 [vocab]: +inf where a token keeps a match possible, -inf
        elsewhere, and where ``ceiling``, the request's own exclusions, has -inf), or None when the text matches
        as it stands (any token may be sampled; ``advance`` says whether it goes on). Raises
        FailedPreconditionError, naming the field, where no token can continue the text."""
        matched = self._matched = self.matched
        if self.lookahead is not None and self._viable is None:  # (wanted where the text matches too: ``advance``)
            self._viable = self._word_bits()
        if matched:
            return None
        bits = self._bits_of(self.matcher)[0] if self._viable is None else self._viable
        row = _CEILING[bits]
        if ceiling is not None:
            np.minimum(row, ceiling, out=row)
        if row.max() > 0:
            return row
        self.dead_end = True
        among = " among the tokens the request allows" if ceiling is not None else ""
        raise FailedPreconditionError(
            f"{self.spec.field}: no token of the model{among} can continue the match {self._where()}"
        )

    def advance(self, token: int, check: bool = False) -> Advance:
        """Take the sampled ``token``. A token that leaves the pattern can only come where the text matched (``mask``
        gave None): it is REJECTed, and the cursor is spent (its generation ends). ``check``: the token comes from
        elsewhere (a resumed stream's): one that cannot go on is REJECTed wherever it comes. Raises
        FailedPreconditionError where a limit stops the pattern."""
        compiler, m = self.compiler, self.matcher
        matched = self.matched if self._matched is None else self._matched
        viable = self._viable
        self._matched = self._viable = None
        if token == compiler.unk or (viable is not None and not viable[token]):
            return Advance.REJECT  # (never sampled where the text did not match: the mask excluded it)
        form = compiler.vocab if self.bare and self.lookahead is not None else 0
        if check and not m.validate_tokens([token + form]):
            return Advance.REJECT
        if not m.consume_token(token + form):
            if matched:
                return Advance.REJECT
            raise self._too_complex(m)
        if self.lookahead is not None and not self.lookahead.consume_token(token + form):
            raise self._too_complex(self.lookahead)
        text = compiler.text
        piece = text.bare[token] if self.bare else text.spaced[token]
        self.shown = (self.shown + piece)[-_SHOWN_CHARS:]
        self.tokens += 1
        self.bare = token == compiler.eos
        if m.is_stopped():
            return Advance.END
        if self.lookahead is not None and m.is_accepting():  # a word may match with only glued text to follow
            self._viable = self._word_bits()
            if not self._viable.any():
                return Advance.END
        return Advance.CONTINUE

    def _bits_of(self, matcher: llguidance.LLMatcher) -> np.ndarray:
        """The mask of ``matcher`` as bits [suffix, token] of the form that applies (all 0 where nothing can
        follow)."""
        compiler = self.compiler
        fill_next_token_bitmask(matcher, self._bits)
        if matcher.is_error() and not matcher.get_error().startswith("NoExtensionBias"):  # a limit, not a dead end
            raise self._too_complex(matcher)
        bits = np.unpackbits(self._bits.view(np.uint8), count=compiler.size, bitorder="little")
        forms = bits.reshape(len(compiler.suffixes), len(compiler.forms), compiler.vocab)
        return forms[:, 1 if self.bare and len(compiler.forms) == 2 else 0]

    def _word_bits(self) -> np.ndarray:
        """For a word model: the words whose text can be followed by a space or a line break (or the end), and
        ``<eos>`` where a line break can come (asked of the pattern itself: the lookahead's would end it)."""
        bits = self._bits_of(self.lookahead)  # type: ignore[arg-type]
        viable = bits[1] | bits[2]
        eos, vocab = self.compiler.eos, self.compiler.vocab
        viable[eos] = self.matcher.validate_tokens([eos + (vocab if self.bare else 0)]) > 0
        return viable

    def _too_complex(self, matcher: llguidance.LLMatcher) -> FailedPreconditionError:
        """The pattern ran into a limit (``LIMITS``)."""
        self.compiler.forget(self.spec)
        reason = _reason(matcher.get_error())
        return FailedPreconditionError(f"{self.spec.field}: too complex for this server ({reason}) {self._where()}")

    def _where(self) -> str:
        if not self.tokens:
            return "at the start of the generated text"
        return f"after {self.tokens} generated tokens ending {json.dumps(self.shown)}"


def _reason(message: str) -> str:
    """llguidance's error, without the grammar listing it appends (which quotes our grammar, not the request)."""
    kept = []
    for line in (line.strip() for line in message.splitlines()):
        if (line[:1].isdigit() and "|" in line) or line.startswith("<non-verbose"):
            break
        if line and line != "^":
            kept.append(line)
    return " ".join(kept)[:300] or "rejected by the pattern engine"
