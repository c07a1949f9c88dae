"""The recurrent language model: embedding -> stacked LSTM/GRU/RNN -> linear decoder, with the recurrent
state passed in and returned explicitly (the signature the exported ONNX graph keeps)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from textgen.errors import ConfigError

CELLS = ("lstm", "gru", "rnn_tanh", "rnn_relu")
State = tuple[Tensor, ...]  # (h,) or, for LSTM, (h, c); each [num_layers, batch, hidden_size]


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    cell: str = "lstm"
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int = 64
    dropout: float = 0.0  # on the embedding output, between layers and before the decoder
    tie_weights: bool = False  # decoder shares the embedding matrix (needs embedding_size == hidden_size)
    init_range: float = 0.1  # embedding and decoder weights ~ U(-init_range, init_range)

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ConfigError(f"unknown cell type {self.cell!r}: choose one of {', '.join(CELLS)}")
        for name in ("vocab_size", "num_layers", "hidden_size", "embedding_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1) (got {self.dropout})")
        if self.tie_weights and self.embedding_size != self.hidden_size:
            raise ConfigError(
                f"tied weights need embedding size = hidden size (got {self.embedding_size} and {self.hidden_size})"
            )

    @property
    def state_names(self) -> tuple[str, ...]:
        return ("h", "c") if self.cell == "lstm" else ("h",)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class RNNLanguageModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_size)
        self.drop = nn.Dropout(config.dropout)
        rnn_kwargs = dict(
            input_size=config.embedding_size,
            hidden_size=config.hidden_size,
            num_layers=config.num_layers,
            dropout=config.dropout if config.num_layers > 1 else 0.0,
            batch_first=True,
        )
        if config.cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(**rnn_kwargs)
        elif config.cell == "gru":
            self.rnn = nn.GRU(**rnn_kwargs)
        else:
            self.rnn = nn.RNN(nonlinearity=config.cell.removeprefix("rnn_"), **rnn_kwargs)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight  # Press & Wolf 2017, Inan et al. 2017
        self._init_weights()

    def _init_weights(self) -> None:
        # Untied, the embedding keeps PyTorch's N(0, 1): inputs of unit size, like char-rnn's one-hot codes;
        # measured on tiny-shakespeare, U(-0.1, 0.1) inputs left a 2x256 LSTM on a plateau about three times
        # longer. Tied, the matrix is also the decoder and must start small.
        r = self.config.init_range
        nn.init.uniform_(self.decoder.weight, -r, r)
        nn.init.zeros_(self.decoder.bias)
        # Recurrent weights keep PyTorch's U(-1/sqrt(H), 1/sqrt(H)). An LSTM starts with its forget gate
        # open (bias 1, Jozefowicz et al. 2015) so gradients flow through long spans from the first step.
        if self.config.cell == "lstm":
            h = self.config.hidden_size
            for name, param in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    with torch.no_grad():
                        param[h : 2 * h].fill_(1.0)
                elif name.startswith("bias_hh"):
                    with torch.no_grad():
                        param[h : 2 * h].fill_(0.0)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        cfg = self.config
        shape = (cfg.num_layers, batch_size, cfg.hidden_size)
        device = device if device is not None else self.embedding.weight.device
        return tuple(torch.zeros(shape, device=device) for _ in cfg.state_names)

    def rnn_forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """Hidden outputs [batch, time, hidden] (what the decoder reads) and the state after the last step."""
        x = self.drop(self.embedding(tokens))
        if self.config.cell == "lstm":
            out, (h, c) = self.rnn(x, (state[0], state[1]))
            new_state: State = (h, c)
        else:
            out, h = self.rnn(x, state[0])
            new_state = (h,)
        return self.drop(out), new_state

    def forward(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:
        """``tokens`` [batch, time] int64 -> logits [batch, time, vocab] and the state after the last step."""
        out, new_state = self.rnn_forward(tokens, state)
        return self.decoder(out), new_state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def detach_state(state: State) -> State:
    """Cut the graph between truncated-BPTT windows while keeping the values."""
    return tuple(s.detach() for s in state)
