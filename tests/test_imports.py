"""The serving side must never load torch: it runs in an image without it."""

from __future__ import annotations

import subprocess
import sys


def test_serving_side_and_cli_parser_do_not_import_torch() -> None:
    code = (
        "import sys, textgen.tokenizer, textgen.sampling, textgen.errors, service\n"
        "from textgen.cli import build_parser\n"
        "build_parser()\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'exporter', 'onnx'))\n"
        "assert not bad, bad\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
