"""The ``textgen`` command: one program, one subcommand per job. Each subcommand's module registers its
flags without importing its heavy dependencies, so ``textgen --help`` and the serving commands never load
torch. Every ``TextgenError`` ends the program with one line on stderr and exit status 1, no traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from textgen import __version__
from textgen.errors import TextgenError


def build_parser() -> argparse.ArgumentParser:
    from bench import cli as bench_cli
    from exporter import cli as exporter_cli
    from service import cli as service_cli
    from service import keyring
    from textgen import client_cli, predict_cli
    from training import cli as training_cli

    parser = argparse.ArgumentParser(
        prog="textgen",
        description="Train recurrent language models, export them to ONNX and serve them over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"textgen {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    training_cli.register(commands)
    exporter_cli.register(commands)
    service_cli.register(commands)
    keyring.register(commands)
    client_cli.register(commands)
    predict_cli.register(commands)
    bench_cli.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except TextgenError as exc:
        print(f"textgen {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"textgen {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `textgen sample ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
