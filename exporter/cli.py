"""``textgen export``: flags and handler (torch is imported by the handler only)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(commands: Any) -> None:
    p = commands.add_parser(
        "export",
        help="export a checkpoint to a verified ONNX model bundle",
        description="Write model.onnx, tokenizer.json and manifest.json into OUT (a <name>/<version> directory) "
        "after checking the graph (onnx.checker, ONNX Runtime vs torch parity, state continuation). The bundle is "
        "assembled in a temporary directory and renamed into place only when every check passed.",
    )
    p.add_argument("checkpoint", type=Path, nargs="?", help="a .pt checkpoint (e.g. runs/default/best.pt)")
    p.add_argument("--out", type=Path, metavar="BUNDLE_DIR", help="new bundle directory, e.g. bundles/default/1")
    p.add_argument(
        "--precision",
        choices=("fp32", "fp16", "int8"),
        default=None,
        help="fp32 (default); fp16, for GPU serving (every float tensor in float16, the state and logits "
        "included; parity within 1%% of the values' scale); int8, dynamic quantization for CPU serving. fp16 and "
        "int8 record their measured quality change in the manifest",
    )
    p.add_argument("--quantize", choices=("int8",), default=None, help="the same as --precision int8")
    p.add_argument(
        "--quality-tokens",
        type=int,
        default=20_000,
        metavar="N",
        help="held-out tokens used to measure an fp16 or int8 bundle's quality change (default: 20000)",
    )
    p.add_argument(
        "--verify-only",
        type=Path,
        metavar="BUNDLE_DIR",
        help="re-check an existing bundle (schema, checksums, graph I/O); with CHECKPOINT also a parity run against it",
    )
    p.set_defaults(handler=_export)


def _export(args: argparse.Namespace) -> int:
    from textgen.errors import ConfigError

    if args.verify_only is not None:
        from exporter.publish import verify_bundle

        report = verify_bundle(args.verify_only, args.checkpoint)
        print(f"{args.verify_only}: ok " + json.dumps(report))
        return 0
    if args.checkpoint is None or args.out is None:
        raise ConfigError("give a CHECKPOINT and --out BUNDLE_DIR (or --verify-only BUNDLE_DIR)")
    from exporter.publish import export_bundle

    if args.precision is not None and args.quantize is not None and args.precision != args.quantize:
        raise ConfigError(f"--quantize {args.quantize} contradicts --precision {args.precision}: give one")
    precision = args.precision or args.quantize or "fp32"
    manifest = export_bundle(args.checkpoint, args.out, precision, args.quality_tokens)
    v = manifest.verification
    print(
        f"exported {manifest.name}/{manifest.version} ({manifest.graph.precision}) to {args.out}: "
        f"max |logit diff| vs torch {v.max_abs_logit_diff:.2e}, continuation {v.continuation_max_abs_diff:.2e}"
    )
    if manifest.quality is not None:
        q = manifest.quality
        print(
            f"quality on {q.tokens:,} held-out tokens: {q.metric_name} {q.reference_metric:.4f} -> {q.metric:.4f} "
            f"(loss {q.loss_delta:+.4f}), top-1 agreement {q.top1_agreement:.2%}"
        )
    return 0
