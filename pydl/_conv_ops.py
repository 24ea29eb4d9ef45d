"""conv2d's kernel ops and autograd Functions (pydl/conv.py lists the parts): `ALGOS`, the
launcher of each backend and algorithm; the pydl::conv2d_* custom ops, each with its fake
(pydl._library.kernel_op), which allocate a step's output and run its launcher;
`Conv2dKernels`, those ops for one geometry, algorithm and backend; `Conv2dFunction`, the
autograd Function that runs them; and the double backward's Functions.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._conv_common import ConvGeometry
from ._conv_im2col import _TritonIm2col
from ._conv_implicit import _TritonImplicit
from ._conv_numba import _NumbaIm2col
from ._launch import memory_format_of, new_output
from ._library import as_geometry, empty_like_shape, geometry_from, kernel_op

# backend -> algo -> launcher; the first algo listed is the backend's default
ALGOS: dict[str, dict[str, type]] = {
    "triton": {"implicit": _TritonImplicit, "im2col": _TritonIm2col},
    "numba": {"im2col": _NumbaIm2col},
}


# --- kernel ops (pydl::...) and the autograd Function ---------------------------------------
# The geometry travels as the ConvGeometry itself in eager mode and as its fields (an int list)
# through a custom op under torch.compile (pydl._library.kernel_op, as_geometry).

def _y_shape(g: ConvGeometry) -> tuple:
    return (g.N, g.OC, g.OH, g.OW)


@kernel_op("conv2d_fwd", lambda x, w, b, geom, algo, backend: empty_like_shape(
    x, _y_shape(geometry_from(ConvGeometry, geom)), memory_format=memory_format_of(x)))
def _conv2d_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], geom: list[int], algo: str,
                backend: str) -> Tensor:
    g = as_geometry(ConvGeometry, geom)
    y = new_output(_y_shape(g), x.dtype, x.device, memory_format_of(x))
    if y.numel():
        ALGOS[backend][algo].forward(x, w, b, y, g)
    return y


@kernel_op("conv2d_bwd_input", lambda dy, w, x, geom, algo, backend: empty_like_shape(
    x, memory_format=memory_format_of(x)))
def _conv2d_bwd_input(dy: Tensor, w: Tensor, x: Tensor, geom: list[int], algo: str,
                      backend: str) -> Tensor:
    """dL/dx; x gives only the shape and memory format."""
    dx = new_output(x.shape, x.dtype, x.device, memory_format_of(x))
    if dx.numel():
        ALGOS[backend][algo].backward_input(dy, w, dx, as_geometry(ConvGeometry, geom))
    return dx


def _weight_grad_format(x: Tensor, w: Tensor) -> torch.memory_format:
    """The memory format of the weight's gradient: channels_last when the input or the weight
    is (torch's convolutions run in channels_last then, and return the gradient so), else
    contiguous."""
    if torch.channels_last in (memory_format_of(x), memory_format_of(w)):
        return torch.channels_last
    return torch.contiguous_format


@kernel_op("conv2d_bwd_weight", lambda dy, x, w, geom, algo, backend: empty_like_shape(
    w, memory_format=_weight_grad_format(x, w)))
def _conv2d_bwd_weight(dy: Tensor, x: Tensor, w: Tensor, geom: list[int], algo: str,
                       backend: str) -> Tensor:
    """dL/dw, laid out as torch returns it (_weight_grad_format); w gives only the shape."""
    dw = new_output(w.shape, w.dtype, w.device, _weight_grad_format(x, w))
    if x.shape[0] == 0:          # an empty batch sums nothing (split-K would divide by 0)
        return dw.zero_()
    ALGOS[backend][algo].backward_weight(dy, x, dw, as_geometry(ConvGeometry, geom))
    return dw


@kernel_op("conv2d_bwd_bias", lambda dy, geom, algo, backend: empty_like_shape(
    dy, (geometry_from(ConvGeometry, geom).OC,)))
def _conv2d_bwd_bias(dy: Tensor, geom: list[int], algo: str, backend: str) -> Tensor:
    g = as_geometry(ConvGeometry, geom)
    db = new_output((g.OC,), dy.dtype, dy.device)
    ALGOS[backend][algo].backward_bias(dy, db, g)
    return db


def _grad_output_layout(dy: Tensor, x: Tensor, algo: str) -> Tensor:
    """The upstream gradient in the input's channels_last layout for the implicit-GEMM
    kernels, converted once for both gradients. An NCHW gradient of a channels_last layer
    (e.g. one made by torch.randn) would otherwise be the grad-input and grad-weight GEMMs'
    operand with only its pixels contiguous, gathered by 2-byte loads; cuDNN converts too."""
    if algo == "implicit" and memory_format_of(x) == torch.channels_last \
            and not dy.is_contiguous(memory_format=torch.channels_last):
        return dy.contiguous(memory_format=torch.channels_last)
    return dy


class Conv2dKernels:
    """conv2d's kernel ops for one geometry, algorithm and backend: what Conv2dFunction and
    the double backward's Functions run. Each is a pydl:: custom op under torch.compile. In
    eager mode a call signature's plan (_Conv2dCall, a subclass) runs the same steps with its
    outputs' allocation and its launches fixed."""

    __slots__ = ("g", "algo", "backend")

    def __init__(self, g: ConvGeometry, algo: str, backend: str):
        self.g, self.algo, self.backend = g, algo, backend

    def kernels(self) -> "Conv2dKernels":
        """The ops for tensors of any strides (the double backward's operands)."""
        return self

    def forward(self, x, w, b):
        return _conv2d_fwd(x, w, b, self.g, self.algo, self.backend)

    def grad_output(self, dy, x):
        return _grad_output_layout(dy, x, self.algo)

    def backward_input(self, dy, w, x):
        return _conv2d_bwd_input(dy, w, x, self.g, self.algo, self.backend)

    def backward_weight(self, dy, x, w):
        return _conv2d_bwd_weight(dy, x, w, self.g, self.algo, self.backend)

    def backward_bias(self, dy):
        return _conv2d_bwd_bias(dy, self.g, self.algo, self.backend)


class Conv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b) by `ops` (Conv2dKernels, or a call signature's plan)."""

    @staticmethod
    def forward(ctx, x, w, b, ops: Conv2dKernels):
        y = ops.forward(x, w, b)
        ctx.save_for_backward(x, w)
        ctx.ops, ctx.has_bias = ops, b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        ops = ctx.ops
        dy = ops.grad_output(dy, x)
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph: the same kernels, through Functions that are differentiable again
            k = ops.kernels()
            dx = _Conv2dInputGrad.apply(dy, w, x, k) if need[0] else None
            dw = _Conv2dWeightGrad.apply(dy, x, w, k) if need[1] else None
            db = _Conv2dBiasGrad.apply(dy, k) if ctx.has_bias and need[2] else None
            return dx, dw, db, None
        dx = ops.backward_input(dy, w, x) if need[0] else None
        dw = ops.backward_weight(dy, x, w) if need[1] else None
        db = ops.backward_bias(dy) if ctx.has_bias and need[2] else None
        return dx, dw, db, None


# --- double backward ------------------------------------------------------------------------
# conv2d's gradients are bilinear in (dy, w) and (dy, x), and their derivatives are the three
# kernels again: for y = conv(x, w), dx = conv_input_grad(dy, w) and dw = conv_weight_grad(dy,
# x), so d<ddx, dx>/d dy = conv(ddx, w), d<ddx, dx>/d w = conv_weight_grad(dy, ddx),
# d<ddw, dw>/d dy = conv(x, ddw), d<ddw, dw>/d x = conv_input_grad(dy, ddw). The three Functions
# below are closed under differentiation, so gradients of any order run on pydl's kernels.

class _Conv2dInputGrad(torch.autograd.Function):
    """dx of conv2d as a function of (dy, w); x gives only the shape and memory format."""

    @staticmethod
    def forward(ctx, dy, w, x, ops: Conv2dKernels):
        ctx.save_for_backward(dy, w)
        ctx.ops = ops
        return ops.backward_input(dy, w, x)

    @staticmethod
    def backward(ctx, ddx):
        dy, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_dy = Conv2dFunction.apply(ddx, w, None, ctx.ops) if need[0] else None
        d_w = _Conv2dWeightGrad.apply(dy, ddx, w, ctx.ops) if need[1] else None
        return d_dy, d_w, None, None


class _Conv2dWeightGrad(torch.autograd.Function):
    """dw of conv2d as a function of (dy, x); w gives only the shape."""

    @staticmethod
    def forward(ctx, dy, x, w, ops: Conv2dKernels):
        ctx.save_for_backward(dy, x)
        ctx.ops = ops
        return ops.backward_weight(dy, x, w)

    @staticmethod
    def backward(ctx, ddw):
        dy, x = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_dy = Conv2dFunction.apply(x, ddw, None, ctx.ops) if need[0] else None
        d_x = _Conv2dInputGrad.apply(dy, ddw, x, ctx.ops) if need[1] else None
        return d_dy, d_x, None, None


class _Conv2dBiasGrad(torch.autograd.Function):
    """db = dy summed over (N, OH, OW); its derivative broadcasts ddb back (a view)."""

    @staticmethod
    def forward(ctx, dy, ops: Conv2dKernels):
        ctx.shape = dy.shape
        return ops.backward_bias(dy)

    @staticmethod
    def backward(ctx, ddb):
        return ddb.view(1, -1, 1, 1).expand(ctx.shape), None
