"""The pooling's kernel ops (pydl:: custom ops, what torch.compile traces), PoolKernels and
the autograd Functions of max and average pooling (and their double backward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._launch import memory_format_of, new_output
from ._library import as_geometry, empty_like_shape, geometry_from, kernel_op, memory_format
from ._pool_launch import INDEX_FLAT, INDEX_LOCAL, INDEX_NONE, LAUNCHERS, PoolGeometry


def _local_index_dtype(g: PoolGeometry) -> torch.dtype:
    return torch.int8 if g.KH * g.KW <= 127 else torch.int32


# --- kernel ops (pydl::...) and autograd Functions ------------------------------------------

def _y_shape(g: PoolGeometry) -> tuple:
    return (g.N, g.C, g.OH, g.OW)


def _index_dtype(g: PoolGeometry, mode: int) -> torch.dtype:
    return {INDEX_FLAT: torch.int64, INDEX_LOCAL: _local_index_dtype(g)}.get(mode, torch.int8)


def _max_fwd_fake(x, geom, mode, backend):
    g, fmt = geometry_from(PoolGeometry, geom), memory_format_of(x)
    idx_shape = _y_shape(g) if mode != INDEX_NONE else (0,)
    return (empty_like_shape(x, _y_shape(g), memory_format=fmt),
            empty_like_shape(x, idx_shape, _index_dtype(g, mode),
                             memory_format=fmt if mode != INDEX_NONE else torch.contiguous_format))


@kernel_op("max_pool2d_fwd", _max_fwd_fake)
def _max_pool2d_fwd(x: Tensor, geom: list[int], mode: int, backend: str) -> tuple[Tensor, Tensor]:
    """(output, argmax in `mode`'s format; an empty tensor for INDEX_NONE)."""
    g, fmt = as_geometry(PoolGeometry, geom), memory_format_of(x)
    y = new_output(_y_shape(g), x.dtype, x.device, fmt)
    idx = (new_output(y.shape, _index_dtype(g, mode), x.device, fmt) if mode != INDEX_NONE
           else torch.empty(0, dtype=torch.int8, device=x.device))
    if y.numel():
        LAUNCHERS[backend].max_fwd(x, y, idx if mode != INDEX_NONE else None, g, mode)
    return y, idx


def _dx_fake(dy, *args):
    *_, geom, channels_last, backend = args
    g = geometry_from(PoolGeometry, geom)
    return empty_like_shape(dy, (g.N, g.C, g.H, g.W), memory_format=memory_format(channels_last))


def _new_dx(dy: Tensor, g: PoolGeometry, channels_last: bool) -> Tensor:
    return new_output((g.N, g.C, g.H, g.W), dy.dtype, dy.device, memory_format(channels_last))


@kernel_op("max_pool2d_bwd", _dx_fake)
def _max_pool2d_bwd(dy: Tensor, idx: Tensor, mode: int, geom: list[int], channels_last: bool,
                    backend: str) -> Tensor:
    g = as_geometry(PoolGeometry, geom)
    dx = _new_dx(dy, g, channels_last)
    if dx.numel():
        LAUNCHERS[backend].max_bwd(dy, idx, dx, g, mode)
    return dx


@kernel_op("avg_pool2d_fwd", lambda x, geom, adaptive, backend: empty_like_shape(
    x, _y_shape(geometry_from(PoolGeometry, geom)), memory_format=memory_format_of(x)))
def _avg_pool2d_fwd(x: Tensor, geom: list[int], adaptive: bool, backend: str) -> Tensor:
    g = as_geometry(PoolGeometry, geom)
    y = new_output(_y_shape(g), x.dtype, x.device, memory_format_of(x))
    if y.numel():
        launch = LAUNCHERS[backend]
        (launch.adaptive_fwd if adaptive else launch.avg_fwd)(x, y, g)
    return y


@kernel_op("avg_pool2d_bwd", _dx_fake)
def _avg_pool2d_bwd(dy: Tensor, adaptive: bool, geom: list[int], channels_last: bool,
                    backend: str) -> Tensor:
    g = as_geometry(PoolGeometry, geom)
    dx = _new_dx(dy, g, channels_last)
    if dx.numel():
        launch = LAUNCHERS[backend]
        (launch.adaptive_bwd if adaptive else launch.avg_bwd)(dy, dx, g)
    return dx


def _channels_last(x: Tensor) -> bool:
    return memory_format_of(x) == torch.channels_last


class PoolKernels:
    """A pooling op's kernel ops for one geometry and backend (the average pools' `adaptive`
    telling adaptive_avg_pool2d; `channels_last`: the input's layout, the gradient's): what
    the Functions run, pydl:: custom ops under torch.compile. In eager mode a call
    signature's plan (_PoolCall, a subclass) runs the same steps with its outputs' allocation
    and its launches fixed."""

    __slots__ = ("g", "backend", "adaptive", "channels_last")

    def __init__(self, g: PoolGeometry, backend: str, adaptive: bool, channels_last: bool):
        self.g, self.backend, self.adaptive, self.channels_last = (g, backend, adaptive,
                                                                   channels_last)

    def kernels(self) -> "PoolKernels":
        """The ops for tensors of any strides (the double backward's)."""
        return self

    def like(self, t: Tensor) -> "PoolKernels":
        """These ops for a gradient laid out as `t` (the double backward's)."""
        return PoolKernels(self.g, self.backend, self.adaptive, _channels_last(t))

    def max_forward(self, x, mode: int):
        """(y, argmax in `mode`'s format; unused for INDEX_NONE)."""
        return _max_pool2d_fwd(x, self.g, mode, self.backend)

    def max_backward(self, dy, idx, mode: int):
        return _max_pool2d_bwd(dy, idx, mode, self.g, self.channels_last, self.backend)

    def avg_forward(self, x):
        return _avg_pool2d_fwd(x, self.g, self.adaptive, self.backend)

    def avg_backward(self, dy):
        return _avg_pool2d_bwd(dy, self.adaptive, self.g, self.channels_last, self.backend)


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ops: PoolKernels, return_indices: bool):
        needs_grad = ctx.needs_input_grad[0]
        mode = INDEX_FLAT if return_indices else (INDEX_LOCAL if needs_grad else INDEX_NONE)
        y, idx = ops.max_forward(x, mode)
        ctx.ops, ctx.mode = ops, mode
        if needs_grad:
            ctx.save_for_backward(idx)
        if return_indices:
            ctx.mark_non_differentiable(idx)
            return y, idx
        return y

    @staticmethod
    def backward(ctx, dy, *unused):
        (idx,) = ctx.saved_tensors
        if torch.is_grad_enabled():      # create_graph: differentiable again
            return _MaxPool2dBackward.apply(dy, idx, ctx.ops.kernels(), ctx.mode), None, None
        return ctx.ops.max_backward(dy, idx, ctx.mode), None, None


class _MaxPool2dBackward(torch.autograd.Function):
    """max_pool2d's backward (dy sent to each window's argmax, pydl's kernel) as a Function of
    dy, for double backward. Its derivative gathers ddx at the argmax: torch.gather on the
    saved indices made flat (README: double backward); w.r.t. x it is 0 (the argmax is
    piecewise constant), as in torch, so the input gets no second-order term."""

    @staticmethod
    def forward(ctx, dy, idx, ops: PoolKernels, mode: int):
        ctx.save_for_backward(idx)
        ctx.g, ctx.mode = ops.g, mode
        return ops.max_backward(dy, idx, mode)

    @staticmethod
    def backward(ctx, ddx):
        (idx,) = ctx.saved_tensors
        flat = _flat_indices(idx, ctx.mode, ctx.g)
        n, c = flat.shape[:2]       # (N, C, OH, OW), or (N, C, OL) for a 1-d pool
        return (ddx.reshape(n, c, -1).gather(2, flat.reshape(n, c, -1)).view(flat.shape), None,
                None, None)


def _flat_indices(idx: Tensor, mode: int, g: PoolGeometry) -> Tensor:
    """The argmax as torch's flat per-plane index h * W + w (int64), from either saved format."""
    if mode == INDEX_FLAT:
        return idx
    local = idx.long()                   # kh * KW + kw
    oh = torch.arange(g.OH, device=idx.device).view(-1, 1)
    ow = torch.arange(g.OW, device=idx.device)
    h = oh * g.SH - g.PH + (local // g.KW) * g.DH
    w = ow * g.SW - g.PW + (local % g.KW) * g.DW
    return h * g.W + w


class AvgPool2dFunction(torch.autograd.Function):
    """avg_pool2d or adaptive_avg_pool2d (ops.adaptive)."""

    @staticmethod
    def forward(ctx, x, ops: PoolKernels):
        ctx.ops = ops
        return ops.avg_forward(x)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():      # create_graph: differentiable again
            return _AvgPool2dBackward.apply(dy, ctx.ops.kernels()), None
        return ctx.ops.avg_backward(dy), None


class _AvgPool2dBackward(torch.autograd.Function):
    """The average pools' backward dx = A^T dy (A the pooling, linear, independent of x) as a
    Function of dy, for double backward: its derivative is A itself, the forward kernel, so
    gradients of any order run on pydl's kernels."""

    @staticmethod
    def forward(ctx, dy, ops: PoolKernels):
        ctx.ops = ops
        return ops.avg_backward(dy)

    @staticmethod
    def backward(ctx, ddx):
        return AvgPool2dFunction.apply(ddx, ctx.ops.like(ddx)), None
