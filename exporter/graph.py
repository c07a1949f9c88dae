"""The exported graph: the model with its recurrent state as named inputs and outputs, and the vocabulary
projection computed only at the time positions the caller asks for.

Inputs: ``tokens`` int64 [batch, time]; ``positions`` int64 [n] (time indices whose logits are wanted:
``[time - 1]`` for a prompt or a decode step, ``0..time-1`` to score a text); ``h`` (and ``c`` for LSTM)
float32 [layers, batch, hidden]. Outputs: ``logits`` float32 [batch, n, vocab]; ``h_out`` (and ``c_out``).
ONNX Runtime runs every node of a graph whatever outputs are fetched, so a second "last logits" output would
not save the projection; selecting positions inside the graph does.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from training.model import RNNLanguageModel

OPSET = 17


def input_names(state_names: tuple[str, ...]) -> list[str]:
    return ["tokens", "positions", *state_names]


def output_names(state_names: tuple[str, ...]) -> list[str]:
    return ["logits", *(f"{name}_out" for name in state_names)]


class _ExportWrapper(nn.Module):
    def __init__(self, model: RNNLanguageModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor, positions: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        m = self.model
        out, new_state = m.rnn_forward(tokens, tuple(state))
        logits = m.decoder(out.index_select(1, positions))
        return (logits, *new_state)


def export_onnx(model: RNNLanguageModel, path: Path | None = None) -> bytes:
    """Serialise ``model`` (eval mode) to ONNX with the native recurrent ops and dynamic batch/time axes."""
    model = model.eval().cpu()
    names = model.config.state_names
    example_state = model.init_state(2)
    example = (torch.zeros(2, 3, dtype=torch.int64), torch.tensor([2], dtype=torch.int64), *example_state)
    dynamic_axes: dict[str, dict[int, str]] = {
        "tokens": {0: "batch", 1: "time"},
        "positions": {0: "positions"},
        "logits": {0: "batch", 1: "positions"},
    }
    for name in names:
        dynamic_axes[name] = {1: "batch"}
        dynamic_axes[f"{name}_out"] = {1: "batch"}
    buffer = io.BytesIO()
    # The exporter warns that an LSTM exported at batch 2 may fail at other batch sizes unless h0/c0 are graph
    # inputs; they are, and parity is checked at batch sizes 1, 3 and 8.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
        warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)  # nn.RNN's shape checks, not data flow
        torch.onnx.export(
            _ExportWrapper(model),
            example,
            buffer,
            dynamo=False,
            opset_version=OPSET,
            input_names=input_names(names),
            output_names=output_names(names),
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    data = buffer.getvalue()
    if path is not None:
        Path(path).write_bytes(data)
    return data
