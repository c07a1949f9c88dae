"""``textgen serve``: one flag per server setting, generated from ``ServerSettings`` so that flags, environment
variables (``TEXTGEN_*``) and their help never drift apart. Flags override the environment."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr


def _flag_type(annotation: Any) -> dict[str, Any]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return {"choices": list(typing.get_args(annotation))}
    if origin is typing.Annotated:
        return _flag_type(args[0])
    if args and origin is not list:  # Optional[X]
        return _flag_type(args[0])
    if annotation in (int, float):
        return {"type": annotation}
    if annotation is Path:
        return {"type": Path}
    return {"type": str}  # str, SecretStr, comma-separated lists


def register(commands: Any) -> None:
    from service.settings import ServerSettings

    p = commands.add_parser(
        "serve",
        allow_abbrev=False,  # else a removed flag such as --snapshot-key would read as --snapshot-key-file
        help="serve model bundles over gRPC (TextGeneration, health, reflection)",
        description="Serve one bundle (--bundle) or a model repository of <model>/<version>/ bundles "
        "(--model-repository, newest version of each model). Every flag can also be set with the environment "
        "variable named in its help; flags win. SIGTERM or Ctrl-C drains gracefully.",
    )
    for name, info in ServerSettings.model_fields.items():
        if isinstance(info.json_schema_extra, dict) and info.json_schema_extra.get("env_only"):
            continue  # a secret: a flag's value is visible to every user in ps
        default = info.default
        if isinstance(default, list):
            default = ",".join(default)
        elif isinstance(default, SecretStr) or default is None:
            default = "unset"
        p.add_argument(
            "--" + name.replace("_", "-"),
            dest=name,
            default=argparse.SUPPRESS,
            metavar=name.upper(),
            help=f"{info.description} (env TEXTGEN_{name.upper()}; default: {default})",
            **_flag_type(info.annotation),
        )
    p.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    from service.server import run
    from service.settings import load_settings

    overrides = {k: v for k, v in vars(args).items() if k not in ("handler", "command")}
    run(load_settings(**overrides))
    return 0
