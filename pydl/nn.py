"""Drop-in modules: same constructor arguments and state_dict keys as the torch.nn classes they
replace (each subclasses that class), with a `backend=` keyword; forward calls pydl's ops."""
from __future__ import annotations

import torch

from . import functional as F


class Conv2d(torch.nn.Conv2d):
    """torch.nn.Conv2d computed by pydl's kernels; `algo=` picks the kernel variant.

    padding_mode "reflect" / "replicate" / "circular" pads the input with
    torch.nn.functional.pad first (a copy), exactly as torch.nn.Conv2d does, then runs pydl's
    convolution with no padding.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, backend: str | None = None, algo: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self.backend, self.algo = backend, algo

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                            mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return F.conv2d(input, weight, bias, self.stride, padding, self.dilation, self.groups,
                        backend=self.backend, algo=self.algo)


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


class MaxPool2d(torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d computed by pydl's kernels."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1, return_indices: bool = False,
                 ceil_mode: bool = False, *, backend: str | None = None):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.backend = backend

    def forward(self, input: torch.Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices,
                            backend=self.backend)


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d computed by pydl's kernels."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override=None, *, backend: str | None = None):
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override, backend=self.backend)


class AdaptiveAvgPool2d(torch.nn.AdaptiveAvgPool2d):
    """torch.nn.AdaptiveAvgPool2d computed by pydl's kernels."""

    def __init__(self, output_size, *, backend: str | None = None):
        super().__init__(output_size)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(input, self.output_size, backend=self.backend)


__all__ = ["Conv2d", "CrossEntropyLoss", "Softmax", "LogSoftmax", "MaxPool2d", "AvgPool2d",
           "AdaptiveAvgPool2d"]
