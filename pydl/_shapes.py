"""Shape arithmetic, once for the whole library (kernels, references, tests and benchmarks).

The output-size rule of convolution and pooling, argument normalisation for int-or-pair
options (int-or-single for the 1-d ops), and the (outer, n, inner) view that row-wise kernels
(softmax, cross-entropy) use.
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch


def integer(value) -> int | None:
    """`value` as a Python int where it is an integer option as torch takes one (an int, a
    NumPy integer: anything with __index__ but a bool or a tensor), else None."""
    if isinstance(value, (bool, torch.Tensor)):
        return None
    try:
        return operator.index(value)
    except TypeError:       # not an integer (a float, a NumPy bool)
        return None


def positive_int(value, name: str) -> int:
    """`value` (an integer option, see `integer`) as a Python int, if it is positive; a
    ValueError naming the option otherwise."""
    v = integer(value)
    if v is None or v <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return v


def pair(value, name: str) -> tuple[int, int]:
    """An integer or a length-2 (or 1) sequence of integers as a pair of Python ints; a clear
    error otherwise."""
    v = integer(value)
    if v is not None:
        return (v, v)
    if isinstance(value, Sequence) and not isinstance(value, str) and len(value) in (1, 2):
        vs = [integer(v) for v in value]
        if None not in vs:
            return (vs[0], vs[-1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def single(value, name: str) -> int:
    """An integer or a length-1 sequence of one (a 1-d op's option, as torch's conv1d and
    pools take it) as a Python int; a clear error otherwise."""
    v = integer(value)
    if v is None and isinstance(value, Sequence) and not isinstance(value, str) \
            and len(value) == 1:
        v = integer(value[0])
    if v is None:
        raise TypeError(f"{name} must be an int or a sequence of one int (a 1-d op's option), "
                        f"got {value!r}")
    return v


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0,
                     dilation: int = 1, *, exact: bool = False, name: str = "input") -> int:
    """floor((N + 2P - D(K - 1) - 1) / S) + 1, the output length of a convolution.

    PyTorch (and so pydl's ops) floor a window that does not fit the last stride step; with
    `exact=True` such a configuration is rejected, as the lecture notes do (7x7 input, 3x3
    kernel, stride 3 gives 2.33 and "does not fit").
    """
    _check_window(kernel, stride, padding, dilation)
    span = dilation * (kernel - 1) + 1
    room = size + 2 * padding - span
    if room < 0:
        raise ValueError(f"kernel size {kernel} (dilated span {span}) is larger than the padded "
                         f"{name} size {size + 2 * padding}")
    if exact and room % stride:
        raise ValueError(f"a kernel of {kernel} at stride {stride} does not fit {name} size {size} "
                         f"with padding {padding}: (N + 2P - D(K-1) - 1)/S + 1 = "
                         f"{room / stride + 1:.2f} is not an integer")
    return room // stride + 1


def pool_output_size(size: int, kernel: int, stride: int, padding: int = 0, dilation: int = 1,
                     ceil_mode: bool = False, *, name: str = "input") -> int:
    """Pooling output length with PyTorch's ceil_mode rule: rounding up may add a last window,
    but never one that starts inside the right padding.

    With ceil_mode the last window may run past the padded edge, so PyTorch accepts a kernel up
    to stride - 1 elements longer than the padded input (size 2, kernel 3, stride 2 gives one
    window); only a configuration with no window at all is rejected.
    """
    _check_window(kernel, stride, padding, dilation)
    if padding * 2 > kernel:
        raise ValueError(f"padding ({padding}) must be at most half the kernel size ({kernel})")
    span = dilation * (kernel - 1) + 1
    room = size + 2 * padding - span
    # ceil(room / stride) with integers; it is floor((room + stride - 1) / stride) in PyTorch.
    out = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    if out <= 0:
        raise ValueError(f"kernel size {kernel} (dilated span {span}) is larger than the padded "
                         f"{name} size {size + 2 * padding}")
    return out


def _check_window(kernel: int, stride: int, padding: int, dilation: int) -> None:
    if kernel <= 0:
        raise ValueError(f"kernel size must be positive, got {kernel}")
    if stride <= 0:
        raise ValueError(f"stride must be positive, got {stride}")
    if dilation <= 0:
        raise ValueError(f"dilation must be positive, got {dilation}")
    if padding < 0:
        raise ValueError(f"padding must be non-negative, got {padding}")


def same_padding(kernel: int, dilation: int = 1) -> tuple[int, int]:
    """(left, right) padding that keeps the size at stride 1; uneven spans pad more on the right,
    as PyTorch does for padding="same"."""
    total = dilation * (kernel - 1)
    return total // 2, total - total // 2


def normalize_dim(dim: int, ndim: int, name: str = "dim") -> int:
    given, dim = dim, integer(dim)
    if dim is None:
        raise TypeError(f"{name} must be an int, got {given!r}")
    if not -max(ndim, 1) <= dim < max(ndim, 1):
        raise IndexError(f"{name}={dim} is out of range for a tensor of {ndim} dimensions")
    return dim % max(ndim, 1)


def as_rows(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, int, int]:
    """View `x` as (outer, n, inner) around `dim`; returns (view, outer, n, inner).

    Row r = (o, i) holds x[o, :, i]; a row-wise kernel addresses it with the view's three
    strides, so contiguous tensors and 2-D tensors of any strides need no copy. Only a
    layout that cannot be expressed with one outer and one inner stride is copied.
    """
    dim = normalize_dim(dim, x.dim())
    shape = x.shape if x.dim() else (1,)
    outer = math.prod(shape[:dim])
    n = shape[dim]
    inner = math.prod(shape[dim + 1:])
    return x.reshape(outer, n, inner), outer, n, inner


def conv_padding(padding, kernel: tuple[int, int], stride: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) for a conv's padding: an int, a pair, "valid" or "same".

    "same" (stride 1 only, as in torch) puts the extra row/column of an uneven total at the
    bottom/right, as torch does.
    """
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0, 0, 0)
        if padding == "same":
            if tuple(stride) != (1, 1):
                raise ValueError(f"padding='same' is not supported for strided convolutions "
                                 f"(stride={tuple(stride)})")
            return same_padding(kernel[0], dilation[0]) + same_padding(kernel[1], dilation[1])
        raise ValueError(f"padding must be an int, a pair, 'same' or 'valid', got {padding!r}")
    ph, pw = pair(padding, "padding")
    if ph < 0 or pw < 0:
        raise ValueError(f"padding must be non-negative, got {padding!r}")
    return (ph, ph, pw, pw)


def conv_output_size_padded(size: int, kernel: int, stride: int, before: int, after: int,
                            dilation: int = 1, *, name: str = "input") -> int:
    """conv_output_size with possibly uneven padding (only the total matters)."""
    if before == after:
        return conv_output_size(size, kernel, stride, before, dilation, name=name)
    return conv_output_size(size + before + after, kernel, stride, 0, dilation,
                            name=f"padded {name}")
