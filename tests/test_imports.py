"""The serving side must never load torch (it runs in an image without it), nor the offline packages."""

from __future__ import annotations

import subprocess
import sys


def _loaded_after(statements: str) -> list[str]:
    code = f"import sys\n{statements}\nprint(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


def test_service_loads_neither_torch_nor_the_offline_packages() -> None:
    loaded = _loaded_after(
        "import service, service.bundle, service.manifest, service.server, service.cli, textgen.client, "
        "textgen.client_cli, textgen.tokenizer, textgen.sampling"
    )
    roots = {m.split(".")[0] for m in loaded}
    # onnx is allowed: the service builds its step graph from each bundle's graph with it (service.slotted_graph)
    assert not roots & {"torch", "training", "exporter"}


def test_cli_parser_and_help_do_not_load_torch() -> None:
    loaded = _loaded_after(
        "from textgen.cli import build_parser\n"
        "parser = build_parser()\n"
        "for action in parser._subparsers._group_actions:\n"
        "    for sub in action.choices.values():\n"
        "        sub.format_help()\n"
    )
    assert "torch" not in {m.split(".")[0] for m in loaded}
