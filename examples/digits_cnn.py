"""A small CNN on scikit-learn's 8x8 digits: pydl's Conv2d, MaxPool2d, AvgPool2d and
CrossEntropyLoss.

    python examples/digits_cnn.py [--backend triton|numba|torch] [--epochs N] [--seed S]
                                  [--plot PATH] [--limit N]
"""
from __future__ import annotations

import torch

if __package__:
    from . import _common
else:  # run as a script: python examples/digits_cnn.py
    import _common
import pydl  # noqa: E402  (after _common, which decides on emulation)


class ChannelsLast(torch.nn.Module):
    """(N, C, H, W) in channels_last memory format (a copy unless it is already)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last)


class DigitsCNN(torch.nn.Module):
    """conv 3x3 -> ReLU -> max-pool 2 (8x8 -> 4x4) -> conv 3x3 -> ReLU -> avg-pool 2 (-> 2x2)
    -> linear; images (N, 8, 8) in, logits (N, 10) out.

    The activations are channels_last (N, H, W, C in memory) from the first convolution on:
    pydl's conv and pooling kernels then tile along the contiguous channels. (The one-channel
    input has no layout to speak of, so the first conv writes NCHW and is converted once.)
    """

    def __init__(self, channels: tuple[int, int] = (16, 32), backend: str | None = None):
        super().__init__()
        c1, c2 = channels
        self.features = torch.nn.Sequential(
            pydl.nn.Conv2d(1, c1, 3, padding=1, backend=backend), ChannelsLast(), torch.nn.ReLU(),
            pydl.nn.MaxPool2d(2, backend=backend),
            pydl.nn.Conv2d(c1, c2, 3, padding=1, backend=backend), torch.nn.ReLU(),
            pydl.nn.AvgPool2d(2, backend=backend))
        self.head = torch.nn.Linear(c2 * 2 * 2, _common.NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images.unsqueeze(1)).flatten(1))


def build_model(backend: str | None = None, channels: tuple[int, int] = (16, 32)) -> DigitsCNN:
    """The CNN with its pydl layers on `backend` (None: pydl's current backend)."""
    return DigitsCNN(channels, backend)


def main(argv=None) -> _common.Result:
    return _common.run("digits_cnn", build_model, argv, epochs=10, lr=1e-2)


if __name__ == "__main__":
    main()
