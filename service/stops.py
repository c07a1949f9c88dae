"""Stop strings that never leak, matched in linear time over all stops at once.

Semantics (those of OpenAI and vLLM): generation stops at the first position of the generated text where any
stop string is complete; if several complete there, the longest (the one that starts earliest) is reported. The
text returned is everything before that stop's start, so it never contains any stop string, and the result does
not depend on how the text was cut into pieces (a word model pushes ``" word"``, a char model one character).

Text that could still turn into a stop string is held back until it resolves: the hold-back is exactly the
longest suffix of the text that is a proper prefix of some stop (at most ``len(longest stop) - 1`` characters),
released as soon as it cannot become one.

The matcher is an Aho-Corasick automaton over characters, walked as the text streams in. Its current state is a
trie node whose depth is that longest suffix, so the hold-back costs nothing to find, where re-checking every
suffix against every stop costs O(stop length ** 2) per token (413 us a token with 16 crafted 256-character
stops). pyahocorasick builds the same automaton in C and can resume a search across chunks, but it keeps the
walk's state private, and the hold-back needs that state's depth, so the automaton is written here (under 100
lines). Each character costs one goto plus amortised at most one failure-link step (the depth rises by at most
one per character and every failure step lowers it), so a push costs O(len(piece)) amortised whatever the stops.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass

_LEAF: dict[str, int] = {}  # the shared, never-written child table of nodes without children


@dataclass(frozen=True)
class Automaton:
    """The trie of the stops with failure links; node 0 is the root (the empty string).

    Node ``n`` stands for the string ``stops[owner[n]][:depth[n]]``, so held-back text is a slice of a stop and
    never has to be kept as a copy of the generated text. Most nodes of long stops have a single child, made
    right after them: such a node's ``kids`` entry is None and its child is node ``n + 1``, entered by
    ``chars[n + 1]``, which keeps a 16 x 256-character automaton near 100 KB instead of a dict per node (1 MB,
    for each of the hundreds of sequences a server may hold)."""

    stops: tuple[str, ...]
    kids: list[dict[str, int] | None]  # trie edges only (None: the one child is n + 1); missing: follow ``fail``
    chars: str  # chars[n]: the character on the edge into node n (the root's is a placeholder)
    fail: array  # the node of the longest proper suffix of this node's string that is in the trie
    depth: array
    owner: array  # a stop whose prefix this node is
    match: array  # index of the longest stop that is a suffix of this node's string, or -1

    @classmethod
    def build(cls, stops: tuple[str, ...]) -> Automaton:
        """O(total characters of the stops): at most 16 x 256 = 4,096 nodes under the server's limits."""
        kids: list[dict[str, int] | None] = [_LEAF]
        chars, depth, owner, terminal = [" "], [0], [0], [-1]
        for index, stop in enumerate(stops):
            node, i = 0, 0
            while i < len(stop) and (nxt := _child(kids, chars, node, stop[i])) is not None:  # already in the trie
                node, i = nxt, i + 1
            if i < len(stop):  # the rest is a new chain of single-child nodes, made in bulk
                first, new = len(kids), len(stop) - i
                table = kids[node]
                if table is _LEAF:
                    kids[node] = None if first == node + 1 else {stop[i]: first}
                elif table is None:  # a single-child node gets a second child
                    kids[node] = {chars[node + 1]: node + 1, stop[i]: first}
                else:
                    table[stop[i]] = first
                kids.extend([None] * (new - 1))
                kids.append(_LEAF)
                chars.extend(stop[i:])
                depth.extend(range(depth[node] + 1, depth[node] + 1 + new))
                owner.extend([index] * new)
                terminal.extend([-1] * new)
                node = first + new - 1
            if terminal[node] < 0:  # a repeated stop keeps its first index
                terminal[node] = index
        text = "".join(chars)
        fail, match = [0] * len(kids), terminal
        order = list(kids[0].values()) if kids[0] is not None else [1]  # breadth first: depth-1 nodes fail to
        for node in order:  # the root, and every failure target is done before it is used (the list grows)
            if match[node] < 0:  # no stop ends exactly here: the longest one ending at a shorter suffix
                match[node] = match[fail[node]]
            table = kids[node]
            for ch, child in ((text[node + 1], node + 1),) if table is None else table.items():
                f = fail[node]
                while True:  # _child inlined: this loop is most of the build, which runs per request
                    t = kids[f]
                    nxt = (f + 1 if text[f + 1] == ch else None) if t is None else t.get(ch)
                    if nxt is not None or not f:
                        break
                    f = fail[f]
                fail[child] = nxt or 0
                order.append(child)
        return cls(stops, kids, text, array("i", fail), array("i", depth), array("i", owner), array("i", match))

    def text(self, node: int) -> str:
        """The string node ``node`` stands for."""
        return self.stops[self.owner[node]][: self.depth[node]]


def _child(kids: list[dict[str, int] | None], chars: str | list[str], node: int, ch: str) -> int | None:
    """The trie edge from ``node`` on ``ch`` (no failure links)."""
    table = kids[node]
    if table is None:
        return node + 1 if chars[node + 1] == ch else None
    return table.get(ch)


class StopMatcher:
    """One sequence's stop strings: ``push`` every generated piece, ``flush`` when generation ends otherwise."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._automaton = Automaton.build(tuple(self.stops)) if self.stops else None
        self._state = 0  # the node of the longest suffix of the text so far that is a prefix of a stop
        self.transitions = 0  # automaton steps taken (gotos and failure links), to bound the cost in tests

    def push(self, piece: str) -> tuple[str, str | None]:
        """Add newly generated text; return the text that is now safe to send, and the stop string if one
        completed (the text before it is returned, the stop string and anything after it are not)."""
        a = self._automaton
        if a is None:  # no stops: the engine pushes every token of every row, so this must cost nothing
            return piece, None
        kids, chars, fail, match = a.kids, a.chars, a.fail, a.match
        start = state = self._state
        steps = 0
        for i, ch in enumerate(piece):
            steps += 1
            while True:  # _child inlined: this loop is the per-token cost
                table = kids[state]
                nxt = (state + 1 if chars[state + 1] == ch else None) if table is None else table.get(ch)
                if nxt is not None:
                    state = nxt
                    break
                if not state:
                    break
                state = fail[state]
                steps += 1
            if match[state] >= 0:
                self.transitions += steps
                self._state = 0
                stop = a.stops[match[state]]
                # The stop began len(stop) characters before here, within held text + piece (the depth rose by
                # at most one per character, so it reaches no further back than the held text).
                return _released(a, start, piece, a.depth[start] + i + 1 - len(stop)), stop
        self.transitions += steps
        self._state = state
        return _released(a, start, piece, a.depth[start] + len(piece) - a.depth[state]), None

    def flush(self) -> str:
        """The held-back text, released when generation ends without a stop string."""
        held = self._automaton.text(self._state) if self._automaton is not None else ""
        self._state = 0
        return held

    @property
    def held(self) -> str:
        """The text held back now (it could still become a stop string)."""
        return self._automaton.text(self._state) if self._automaton is not None else ""


def _released(a: Automaton, start: int, piece: str, n: int) -> str:
    """The first ``n`` characters of (text held at node ``start``) + ``piece``, copying only those."""
    held = a.depth[start]
    if n <= held:
        return a.stops[a.owner[start]][:n]
    return (a.text(start) + piece[: n - held]) if held else piece[:n]
