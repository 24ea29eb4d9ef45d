"""Drop-in modules: same constructor arguments and state_dict keys as the torch.nn classes they
replace (each subclasses that class), with a `backend=` keyword; forward calls pydl's ops."""
from __future__ import annotations

import torch

from . import functional as F


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss computed by pydl's fused kernel."""

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *, backend: str | None = None):
        if size_average is not None or reduce is not None:
            raise ValueError("size_average and reduce are deprecated in torch; use reduction=")
        super().__init__(weight=weight, ignore_index=ignore_index, reduction=reduction,
                         label_smoothing=label_smoothing)
        self.backend = backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               backend=self.backend)


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax computed by pydl's kernel."""

    def __init__(self, dim: int | None = None, *, backend: str | None = None):
        super().__init__(dim=dim)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim, backend=self.backend)


class LogSoftmax(torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax computed by pydl's kernel."""

    def __init__(self, dim: int | None = None, *, backend: str | None = None):
        super().__init__(dim=dim)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim, backend=self.backend)


__all__ = ["CrossEntropyLoss", "Softmax", "LogSoftmax"]
