"""What the softmax / cross-entropy host modules share (pydl/softmax_ce.py's docstring lists
them): the cross-entropy forward's denominator buffer (DENOM_SHAPE, what both launchers, the
kernel op's fake and the per-call plan allocate), the class-probability loss's scale (both
launchers) and _same_memory (whether a launch planned with a view may be given its tensor).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

# What a cross-entropy forward hands its backward besides the logsumexp: fp32 [the mean's
# denominator (the summed weights of the rows that count), the sum of the class weights (with
# weights and label smoothing: the smoothing term's W; written by the forward kernel, so the
# backward runs no reduction of its own)].
DENOM_SHAPE = (2,)


def _denominators(device) -> Tensor:
    """The DENOM_SHAPE buffer of the kernel op pydl::cross_entropy_fwd, zeroed: the kernels
    write only the elements the options use (the backward reads no other), and an op's
    outputs must not hold whatever memory was there (torch.library.opcheck compares two
    runs). The eager plans allocate it uninitialised, as nothing else sees it there."""
    return torch.zeros(DENOM_SHAPE, dtype=torch.float32, device=device)


def _prob_scale(reduction: str, rows: int, n: int) -> float:
    """The class-probability loss's factor on the rows' sum (forward) and the upstream
    gradient (backward): torch's mean divides by the number of rows (input.numel() / C),
    whatever the weights, NaN without rows or classes (0 / 0); a sum or per-row losses, 1."""
    if reduction != "mean":
        return 1.0
    return 1.0 / rows if rows and n else math.nan


def _same_memory(view: Tensor, t: Tensor) -> bool:
    """Whether `view` (a reshape of t) starts at t's address: a Launch planned with the view
    may then be given t itself (pydl._plan: the kernels read through the planned strides)."""
    return view.numel() == 0 or view.data_ptr() == t.data_ptr()
