"""Command-line flags shared by several commands (``textgen sample`` and ``textgen generate``)."""

from __future__ import annotations

import argparse


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    """The sampling flags; their meaning is the rule in ``textgen.sampling``, the same everywhere."""
    default = f"default: {max_tokens}" if max_tokens is not None else "default: the server's"
    p.add_argument("--prompt", default="", help="text to continue (default: empty, start of a line)")
    p.add_argument("--max-tokens", type=int, default=max_tokens or 0, help=f"tokens to generate ({default})")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature, 0 = greedy (default: 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens, 0 = all (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (default: 1.0)")
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="penalise tokens already in the context, 1 = off (default: 1.0)",
    )
    p.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed to stderr)")
