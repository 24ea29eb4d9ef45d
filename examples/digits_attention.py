"""A small attention classifier on 8x8 digits: each image as 16 tokens (its 2x2 patches), a
linear embedding plus learned positions, one pre-norm transformer block whose attention is
pydl's MultiheadAttention, mean pooling and a linear head; pydl's CrossEntropyLoss.

    python examples/digits_attention.py [--backend triton|numba|torch] [--epochs N] [--seed S]
                                        [--plot PATH] [--limit N]
"""
from __future__ import annotations

import torch

if __package__:
    from . import _common
else:  # run as a script: python examples/digits_attention.py
    import _common
import pydl  # noqa: E402  (after _common, which decides on emulation)


class DigitsAttention(torch.nn.Module):
    """Tokens (patches) -> linear embedding + learned positions -> one pre-norm transformer
    block (pydl's MultiheadAttention, torch's LayerNorm and MLP) -> mean over tokens -> linear.

    patch=(2, 2): 16 tokens of 4 pixels; patch=(1, 8): the 8 rows as tokens of 8 pixels."""

    def __init__(self, dim: int = 32, heads: int = 2, patch: tuple[int, int] = (2, 2),
                 backend: str | None = None):
        super().__init__()
        ph, pw = patch
        if 8 % ph or 8 % pw:
            raise ValueError(f"patch sides must divide 8, got {patch}")
        self.patch = (ph, pw)
        n_tokens = (8 // ph) * (8 // pw)
        self.embed = torch.nn.Linear(ph * pw, dim)
        self.pos = torch.nn.Parameter(0.02 * torch.randn(1, n_tokens, dim))
        self.norm1 = torch.nn.LayerNorm(dim)
        self.attn = pydl.nn.MultiheadAttention(dim, heads, batch_first=True, backend=backend)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.ReLU(),
                                       torch.nn.Linear(2 * dim, dim))
        self.head = torch.nn.Linear(dim, _common.NUM_CLASSES)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 8, 8) -> (N, tokens, ph * pw), patches in row-major order."""
        (ph, pw), n = self.patch, images.shape[0]
        return (images.reshape(n, 8 // ph, ph, 8 // pw, pw).transpose(2, 3)
                .reshape(n, -1, ph * pw))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.embed(self.tokens(images)) + self.pos
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]   # flash kernels (no weights)
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


def build_model(backend: str | None = None, dim: int = 32, heads: int = 2,
                patch: tuple[int, int] = (2, 2)) -> DigitsAttention:
    """The attention classifier with pydl's attention on `backend` (None: pydl's current)."""
    return DigitsAttention(dim, heads, patch, backend)


def main(argv=None) -> _common.Result:
    return _common.run("digits_attention", build_model, argv, epochs=20, lr=1e-2)


if __name__ == "__main__":
    main()
