from __future__ import annotations

import pytest
import torch

from textgen.errors import ConfigError
from training.model import CELLS, ModelConfig, RNNLanguageModel


@pytest.mark.parametrize("cell", CELLS)
def test_forward_shapes_and_state_per_cell(cell: str) -> None:
    model = RNNLanguageModel(ModelConfig(vocab_size=11, cell=cell, num_layers=2, hidden_size=8, embedding_size=4))
    state = model.init_state(3)
    assert len(state) == (2 if cell == "lstm" else 1)
    assert all(s.shape == (2, 3, 8) for s in state)
    logits, new_state = model(torch.randint(0, 11, (3, 5)), state)
    assert logits.shape == (3, 5, 11)
    assert [s.shape for s in new_state] == [s.shape for s in state]


@pytest.mark.parametrize("cell", CELLS)
def test_state_carries_across_chunks(cell: str) -> None:
    torch.manual_seed(0)
    model = RNNLanguageModel(ModelConfig(vocab_size=7, cell=cell, hidden_size=6, embedding_size=5)).eval()
    tokens = torch.randint(0, 7, (2, 9))
    whole, whole_state = model(tokens, model.init_state(2))
    first, state = model(tokens[:, :4], model.init_state(2))
    second, chunk_state = model(tokens[:, 4:], state)
    assert torch.allclose(torch.cat([first, second], 1), whole, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(chunk_state, whole_state, strict=False))


def test_tied_weights_share_one_matrix() -> None:
    model = RNNLanguageModel(ModelConfig(vocab_size=9, hidden_size=8, embedding_size=8, tie_weights=True))
    assert model.decoder.weight is model.embedding.weight
    untied = RNNLanguageModel(ModelConfig(vocab_size=9, hidden_size=8, embedding_size=8))
    assert model.num_parameters() == untied.num_parameters() - 9 * 8


def test_lstm_forget_gate_starts_open() -> None:
    model = RNNLanguageModel(ModelConfig(vocab_size=5, hidden_size=4, embedding_size=4))
    bias = model.rnn.bias_ih_l0 + model.rnn.bias_hh_l0
    assert torch.all(bias[4:8] == 1.0)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cell": "transformer"}, "unknown cell type 'transformer'"),
        ({"tie_weights": True, "hidden_size": 8, "embedding_size": 4}, "embedding size = hidden size"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_layers": 0}, "num_layers"),
    ],
)
def test_bad_configs(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ModelConfig(vocab_size=5, **kwargs)
