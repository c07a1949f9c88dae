"""``textgen predict``: a running server's most likely next words or tokens after a text, as a keyboard shows
them. One line per prediction (its probability, then the text, with whitespace escaped) on stdout."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from textgen.client_cli import _client, _connection_flags


def register(commands: Any) -> None:
    p = commands.add_parser(
        "predict",
        help="the most likely next words (character models) or tokens (word models) after a text",
        description="Ask a textgen server for the N most likely continuations of TEXT: for a character model the "
        "next words (a beam search over characters up to whitespace; after a partial word, the rest of it), for "
        "a word model the next tokens. --snapshot-out keeps the state after TEXT in a file and --snapshot-in "
        "continues from one, so each call needs only the new keystrokes; --session does the same on the server.",
    )
    p.add_argument("text", nargs="?", default="", help="the context (default: empty, start of a text)")
    p.add_argument("--num", type=int, default=0, metavar="N", help="predictions (default: the server's, 3)")
    p.add_argument(
        "--unit", choices=("token", "word"), default="", help="predict tokens or words (default: the model's)"
    )
    p.add_argument("--max-word-chars", type=int, default=0, help="longest word searched (default: 24)")
    p.add_argument("--model", default="", help="model name (default: the server's only model)")
    p.add_argument("--session", default="", metavar="ID", help="predict after this session; it advances by TEXT")
    p.add_argument("--snapshot-in", type=Path, metavar="FILE", help="predict after the state in a snapshot file")
    p.add_argument("--snapshot-out", type=Path, metavar="FILE", help="write the state after TEXT to FILE")
    _connection_flags(p)
    p.set_defaults(handler=_predict)


def _predict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        reply = client.predict(
            args.text,
            num_predictions=args.num,
            unit=args.unit,
            model=args.model,
            session_id=args.session,
            snapshot=args.snapshot_in.read_bytes() if args.snapshot_in else b"",
            return_snapshot=args.snapshot_out is not None,
            max_word_chars=args.max_word_chars,
        )
    for p in reply.predictions:
        print(f"{math.exp(p.logprob):.4f}\t{p.text.encode('unicode_escape').decode('ascii')}")
    if args.snapshot_out:
        tmp = args.snapshot_out.with_name(args.snapshot_out.name + ".partial")
        tmp.write_bytes(reply.snapshot)
        tmp.replace(args.snapshot_out)
    print(f"[{reply.context_tokens} context tokens; {reply.model}:{reply.model_version}]", file=sys.stderr)
    return 0
