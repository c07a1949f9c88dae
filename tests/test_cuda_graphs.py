"""On a GPU (skipped elsewhere): decode steps under CUDA graphs give what the same provider gives without them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import onnxruntime as ort
import pytest

from service.providers import CPU, CUDA, nvidia_gpu_present
from textgen.v1 import textgen_pb2 as pb

needs_gpu = pytest.mark.skipif(
    not nvidia_gpu_present() or CUDA not in ort.get_available_providers(), reason="needs an NVIDIA GPU and ORT's CUDA"
)


@needs_gpu
def test_cuda_graphs_decode_what_plain_cuda_decodes(serve: Callable[..., Any]) -> None:
    """ONNX Runtime runs a new graph id normally twice before it captures (onnxruntime issue 32243), and a replay
    copies no output to a host-bound buffer: the engine runs those first runs on the scratch slot when it creates
    a bucket, and reads the logits from a device buffer, so every row advances once per step and greedy text is
    the same with and without graphs, at bucket sizes 1 and 4 and on a replay. (Never run: no GPU was lent when
    this was written.)"""
    plain = serve(providers=[CUDA, CPU])
    graphs = serve(providers=[CUDA, CPU], cuda_graphs=True)

    def texts(live: Any, n: int) -> list[str]:
        calls = [
            live.stub.Generate.future(pb.GenerateRequest(prompt="the ", max_tokens=40, temperature=0), timeout=60)
            for _ in range(n)
        ]
        return [c.result().text for c in calls]

    for n in (1, 3, 1):  # bucket 1 (captured on first use), bucket 4 (3 rows padded), bucket 1 replayed
        assert texts(graphs, n) == texts(plain, n), f"{n} concurrent greedy generations differ under CUDA graphs"
