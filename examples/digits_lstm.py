"""An LSTM that reads each 8x8 digit row by row (8 time steps of 8 pixels) and classifies it from
its last hidden state: pydl's LSTM and CrossEntropyLoss.

    python examples/digits_lstm.py [--backend triton|numba|torch] [--epochs N] [--seed S]
                                   [--plot PATH] [--limit N]
"""
from __future__ import annotations

import torch

if __package__:
    from . import _common
else:  # run as a script: python examples/digits_lstm.py
    import _common
import pydl  # noqa: E402  (after _common, which decides on emulation)


class DigitsLSTM(torch.nn.Module):
    """Rows as time steps -> one LSTM layer -> linear on the last hidden state."""

    def __init__(self, hidden_size: int = 64, backend: str | None = None, algo: str | None = None):
        super().__init__()
        self.lstm = pydl.nn.LSTM(8, hidden_size, batch_first=True, backend=backend, algo=algo)
        self.head = torch.nn.Linear(hidden_size, _common.NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.lstm(images)        # images (N, 8, 8) = (batch, time, features)
        return self.head(h[-1])


def build_model(backend: str | None = None, hidden_size: int = 64,
                algo: str | None = None) -> DigitsLSTM:
    """The LSTM classifier on `backend` (None: pydl's current backend); `algo` picks the LSTM
    layer's kernel variant ("steps", or "persistent" on triton)."""
    return DigitsLSTM(hidden_size, backend, algo)


def main(argv=None) -> _common.Result:
    return _common.run("digits_lstm", build_model, argv, epochs=15, lr=1e-2)


if __name__ == "__main__":
    main()
