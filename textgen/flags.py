"""Command-line flags shared by several commands (``textgen sample`` and ``textgen generate``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from textgen.errors import InvalidInputError

if TYPE_CHECKING:
    from textgen.sampling import SamplingParams
    from textgen.tokenizer import TextTokenizer


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


def add_control_flags(p: argparse.ArgumentParser, top_logprobs: bool = True) -> None:
    """The generation controls beside the sampling flags (their order of application: textgen.sampling)."""
    g = p.add_argument_group("generation controls")
    g.add_argument("--min-p", type=float, default=None, help="drop tokens below MIN_P x the top one's probability")
    g.add_argument("--presence-penalty", type=float, default=None, help="-2..2, once per token already generated")
    g.add_argument("--frequency-penalty", type=float, default=None, help="-2..2, per time a token was generated")
    g.add_argument(
        "--logit-bias",
        action="append",
        default=[],
        type=bias_pair(int),
        metavar="ID=BIAS",
        help="add BIAS (-100..100) to token ID's logit (repeatable)",
    )
    g.add_argument(
        "--logit-bias-text",
        action="append",
        default=[],
        type=bias_pair(str),
        metavar="TEXT=BIAS",
        help="the same for the token whose text is TEXT (a character or a word; repeatable)",
    )
    g.add_argument("--allow-token", action="append", default=[], type=int, metavar="ID", help="only these tokens")
    g.add_argument("--ban-token", action="append", default=[], type=int, metavar="ID", help="never this token")
    g.add_argument("--stop-token", action="append", default=[], type=int, metavar="ID", help="stop when sampled")
    if top_logprobs:
        g.add_argument(
            "--top-logprobs", type=int, default=0, metavar="N", help="print the N most likely tokens at each position"
        )


def bias_pair(key: type) -> Any:
    """An argparse type for KEY=BIAS (the last '=' splits, so a text may hold one)."""

    def parse(value: str) -> tuple[Any, float]:
        name, sep, bias = value.rpartition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{value!r}: expected KEY=BIAS")
        try:
            return key(name), float(bias)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r}: expected KEY=BIAS with a number as BIAS") from None

    return parse


def local_sampling_params(args: argparse.Namespace, tokenizer: TextTokenizer) -> SamplingParams:
    """The sampling rule of ``args`` (sampling and control flags) for a sampler that holds the tokenizer itself
    (``textgen sample``): ``--logit-bias-text`` resolved to token ids as the server resolves ``logit_bias_text``."""
    from textgen.sampling import SamplingParams

    bias = dict(args.logit_bias)
    for text, value in args.logit_bias_text:
        token = tokenizer.single_token(text)
        if token is None:
            raise InvalidInputError(f"--logit-bias-text {text!r}: not exactly one token of the model")
        if token in bias:
            raise InvalidInputError(f"--logit-bias-text {text!r}: token {token} already has a bias")
        bias[token] = value
    return SamplingParams(
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        min_p=args.min_p or 0.0,
        presence_penalty=args.presence_penalty or 0.0,
        frequency_penalty=args.frequency_penalty or 0.0,
        logit_bias=tuple(bias.items()),
        allowed_token_ids=tuple(sorted(set(args.allow_token))),
        banned_token_ids=tuple(sorted(set(args.ban_token))),
    )
