"""max_pool2d, avg_pool2d and adaptive_avg_pool2d (and their 1-d forms, on the same kernels): the
public functions, their argument checks, the implementations by backend and the per-signature
call (the eager plan). The op's other parts: pydl/_pool_ops.py (the kernel ops and autograd
Functions), pydl/_pool_launch.py (the geometry and the Triton and Numba launchers).

Kernels: kernels/{triton,numba}/pool.py. The launchers here size the grid and allocate outputs
in the input's memory format (channels_last stays channels_last, as in torch); the kernels read
any strides, so no input is copied.

Max pooling's training path saves the argmax as a one-byte window offset (see the kernel
module's docstring); return_indices=True returns torch's int64 flat per-plane indices.
"""
from __future__ import annotations

import math

import torch

from ._checks import check_tensor
from ._launch import fresh, image_view, memory_format_of, output_maker, signal_maker
from ._library import memory_format
from ._plan import (
    Cache,
    apply,
    capturing,
    emulated,
    needs_graph,
    options_key,
    plain_tensors,
    tensors_key,
)
from ._pool_launch import INDEX_FLAT, INDEX_LOCAL, INDEX_NONE, LAUNCHERS, PoolGeometry
from ._pool_ops import (
    AvgPool2dFunction,
    MaxPool2dFunction,
    PoolKernels,
    _channels_last,
    _index_dtype,
    _y_shape,
)
from ._shapes import integer, pair, pool_output_size, positive_int, single
from .backends import current_backend, dispatch, register

# --- implementations by backend -------------------------------------------------------------

def _register(name: str):
    def max_pool(x, g, return_indices):
        ops = PoolKernels(g, name, False, _channels_last(x))
        if needs_graph(x):
            return apply(MaxPool2dFunction, x, ops, return_indices)
        y, idx = ops.max_forward(x, INDEX_FLAT if return_indices else INDEX_NONE)
        return (y, idx) if return_indices else y

    def avg_pool(adaptive):
        def impl(x, g):
            ops = PoolKernels(g, name, adaptive, _channels_last(x))
            if needs_graph(x):
                return apply(AvgPool2dFunction, x, ops)
            return ops.avg_forward(x)
        return impl

    _KERNEL_IMPLS[name] = (register("max_pool2d", name)(max_pool),
                           register("avg_pool2d", name)(avg_pool(False)),
                           register("adaptive_avg_pool2d", name)(avg_pool(True)))


# backend -> pydl's own implementations (a call plans its eager form only where they run)
_KERNEL_IMPLS: dict[str, tuple] = {}


for _name in LAUNCHERS:
    _register(_name)


@register("max_pool2d", "torch")
def _torch_max_pool2d(x, g, return_indices):
    return torch.nn.functional.max_pool2d(x, (g.KH, g.KW), (g.SH, g.SW), (g.PH, g.PW), (g.DH, g.DW),
                                          ceil_mode=g.ceil_mode, return_indices=return_indices)


@register("avg_pool2d", "torch")
def _torch_avg_pool2d(x, g):
    return torch.nn.functional.avg_pool2d(
        x, (g.KH, g.KW), (g.SH, g.SW), (g.PH, g.PW),
        ceil_mode=g.ceil_mode, count_include_pad=g.count_include_pad,
        divisor_override=g.divisor or None)


@register("adaptive_avg_pool2d", "torch")
def _torch_adaptive_avg_pool2d(x, g):
    return torch.nn.functional.adaptive_avg_pool2d(x, (g.OH, g.OW))


# --- argument checks and the public functions -----------------------------------------------
# Each public function checks a call signature once (pydl._plan): the result is a function of
# the input alone that batches it, runs the implementation and unbatches the output.

def _batched_shape(input, backend) -> tuple[tuple[int, int, int, int], bool]:
    check_tensor(input, "input", backend, ndims=(3, 4))
    if input.dim() == 3:
        return (1, *input.shape), True
    return tuple(input.shape), False


def _check_not_empty(shape) -> None:
    """Only the batch may be empty, as in torch (which raises for 0 channels or pixels)."""
    if 0 in shape[1:]:
        raise ValueError(f"input has an empty non-batch dimension: shape {tuple(shape)} (only "
                         f"the batch may be 0, as in torch)")


def _geometry(shape, kernel_size, stride, padding, dilation, ceil_mode, **extra) -> PoolGeometry:
    N, C, H, W = shape
    KH, KW = pair(kernel_size, "kernel_size")
    if KH <= 0 or KW <= 0:
        raise ValueError(f"kernel_size must be positive, got {kernel_size}")
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        SH, SW = KH, KW
    else:
        SH, SW = pair(stride, "stride")
    PH, PW = pair(padding, "padding")
    DH, DW = pair(dilation, "dilation")
    _check_not_empty(shape)
    OH = pool_output_size(H, KH, SH, PH, DH, ceil_mode, name="input height")
    OW = pool_output_size(W, KW, SW, PW, DW, ceil_mode, name="input width")
    return PoolGeometry(N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, ceil_mode, **extra)


@emulated("max_forward", "max_backward", "avg_forward", "avg_backward")
class _PoolCall(PoolKernels):
    """A pooling op for one call signature (pydl._plan), checked once: the implementation and
    the geometry; called with the input alone (batched and unbatched here). On a kernel
    backend in eager mode it is also the signature's plan: the Functions run its methods,
    which allocate with arguments fixed here and launch what the first call built (the
    backward's launches per strides of the upstream gradient); the call's key fixes every
    other input of those."""

    __slots__ = ("impl", "unbatched", "indices", "max", "eager", "launcher", "new_y",
                 "new_idx", "new_dx", "no_y", "no_dx", "fwd", "bwd")

    def __init__(self, impl, name: str, g: PoolGeometry, input, unbatched: bool, max_pool: bool,
                 adaptive: bool = False, indices: bool = False):
        super().__init__(g, name, adaptive, not unbatched and _channels_last(input))
        self.impl, self.unbatched, self.max, self.indices = impl, unbatched, max_pool, indices
        self.eager = (impl in _KERNEL_IMPLS.get(name, ()) and not unbatched
                      and not torch.compiler.is_compiling() and plain_tensors(input))
        if self.eager:
            dt, dev, fmt = input.dtype, input.device, memory_format_of(input)
            self.launcher = LAUNCHERS[name]
            self.new_y = output_maker(_y_shape(g), dt, dev, fmt)
            self.new_idx = {mode: output_maker(_y_shape(g), _index_dtype(g, mode), dev, fmt)
                            for mode in (INDEX_LOCAL, INDEX_FLAT)}
            self.new_dx = output_maker(input.shape, dt, dev, memory_format(self.channels_last))
            # nothing to launch for an empty output (as the kernel ops)
            self.no_y, self.no_dx = math.prod(_y_shape(g)) == 0, input.numel() == 0
            self.fwd, self.bwd = {}, {}

    def __call__(self, input):
        if self.eager:
            graph = torch.is_grad_enabled() and input.requires_grad
            if self.max:
                if graph:
                    return apply(MaxPool2dFunction, input, self, self.indices)
                y, idx = self.max_forward(input, INDEX_FLAT if self.indices else INDEX_NONE)
                return (y, idx) if self.indices else y
            if graph:
                return apply(AvgPool2dFunction, input, self)
            return self.avg_forward(input)
        x = input.unsqueeze(0) if self.unbatched else input
        out = self.impl(x, self.g, self.indices) if self.max else self.impl(x, self.g)
        if not self.unbatched:
            return out
        if self.max and self.indices:
            return out[0].squeeze(0), out[1].squeeze(0)
        return out.squeeze(0)

    # the plan (eager, kernel backends): PoolKernels' steps with fixed arguments

    def kernels(self) -> PoolKernels:
        return PoolKernels(self.g, self.backend, self.adaptive, self.channels_last)

    @staticmethod
    def image(t):
        """A tensor of the call as the kernels see it, for planning (a 1-d pool: its 1 x L
        view; the launches then take the call's own tensors by pointer)."""
        return t

    def _run(self, runs: dict, key, plan, *args):
        """runs[key], else plan(*args) kept there (not under a CUDA graph capture); args'
        tensors as the kernels see them."""
        run = plan(*map(self.image, args))
        if not capturing():
            runs[key] = run
        return run

    def max_forward(self, x, mode: int):
        y = fresh(self.new_y)
        idx = fresh(self.new_idx[mode]) if mode != INDEX_NONE else None
        if not self.no_y:
            run = self.fwd.get(mode) or self._run(self.fwd, mode, self.launcher.plan_max_fwd, x,
                                                  y, idx, self.g, mode)
            run(x, y, y if idx is None else idx)
        return y, idx

    def max_backward(self, dy, idx, mode: int):
        dx = fresh(self.new_dx)
        if not self.no_dx:
            key = (dy.stride(), mode)
            run = self.bwd.get(key) or self._run(self.bwd, key, self.launcher.plan_max_bwd, dy,
                                                 idx, dx, self.g, mode)
            run(dy, idx, dx)
        return dx

    def avg_forward(self, x):
        y = fresh(self.new_y)
        if not self.no_y:
            run = self.fwd.get(0) or self._run(
                self.fwd, 0, self.launcher.plan_adaptive_fwd if self.adaptive
                else self.launcher.plan_avg_fwd, x, y, self.g)
            run(x, y)
        return y

    def avg_backward(self, dy):
        dx = fresh(self.new_dx)
        if not self.no_dx:
            key = dy.stride()
            run = self.bwd.get(key) or self._run(
                self.bwd, key, self.launcher.plan_adaptive_bwd if self.adaptive
                else self.launcher.plan_avg_bwd, dy, dx, self.g)
            run(dy, dx)
        return dx


def _key(input, *options):
    return (*tensors_key(input), current_backend() if options[-1] is None else options[-1],
            *options_key(*options))


def _max_pool2d_call(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     backend, cls=_PoolCall):
    name, impl = dispatch("max_pool2d", backend, input)
    shape, unbatched = _batched_shape(input, name)
    g = _geometry(shape, kernel_size, stride, padding, dilation, bool(ceil_mode))
    return cls(impl, name, g, input, unbatched, True, indices=bool(return_indices))


def _avg_pool2d_call(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override, backend, cls=_PoolCall):
    name, impl = dispatch("avg_pool2d", backend, input)
    shape, unbatched = _batched_shape(input, name)
    if divisor_override is not None:
        divisor_override = positive_int(divisor_override, "divisor_override")
    g = _geometry(shape, kernel_size, stride, padding, 1, bool(ceil_mode),
                  count_include_pad=bool(count_include_pad), divisor=divisor_override or 0)
    return cls(impl, name, g, input, unbatched, False)


def _adaptive_avg_pool2d_call(input, output_size, backend, cls=_PoolCall):
    name, impl = dispatch("adaptive_avg_pool2d", backend, input)
    (N, C, H, W), unbatched = _batched_shape(input, name)
    if isinstance(output_size, (list, tuple)):
        sizes = [None if v is None else integer(v) for v in output_size]
        if len(sizes) != 2 or any(v is None and o is not None
                                  for v, o in zip(sizes, output_size)):
            # torch too: no one-element form here
            raise ValueError(f"output_size must be an int or a pair of ints (or None), got "
                             f"{output_size!r}")
        OH = H if sizes[0] is None else sizes[0]
        OW = W if sizes[1] is None else sizes[1]
    else:
        OH, OW = pair(output_size, "output_size")
    if OH < 0 or OW < 0:
        raise ValueError(f"output_size must be non-negative, got {output_size}")
    _check_not_empty((N, 1, H, W))      # 0 channels: an empty output, as torch gives
    return cls(impl, name, PoolGeometry(N, C, H, W, int(OH), int(OW), 1, 1, 1, 1), input,
               unbatched, False, adaptive=True)


_CALLS = {"max": Cache("max_pool2d calls"), "avg": Cache("avg_pool2d calls"),
          "adaptive": Cache("adaptive_avg_pool2d calls")}


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, backend=None):
    """torch.nn.functional.max_pool2d; with return_indices, (output, int64 flat indices)."""
    return _CALLS["max"].call(_key, _max_pool2d_call, input, kernel_size, stride, padding,
                              dilation, ceil_mode, return_indices, backend)(input)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, *, backend=None):
    """torch.nn.functional.avg_pool2d."""
    return _CALLS["avg"].call(_key, _avg_pool2d_call, input, kernel_size, stride, padding,
                              ceil_mode, count_include_pad, divisor_override, backend)(input)


def adaptive_avg_pool2d(input, output_size, *, backend=None):
    """torch.nn.functional.adaptive_avg_pool2d; output_size an int, a pair, or None entries
    (keep that input dimension). output_size=1 is global average pooling."""
    return _CALLS["adaptive"].call(_key, _adaptive_avg_pool2d_call, input, output_size,
                                   backend)(input)


# --- the 1-d pools: the same kernels and plans on a 1 x L image ------------------------------

class _Pool1dKernels(PoolKernels):
    """The pools' kernel ops on a 1-d pool's tensors, for the double backward's Functions:
    each on the 1 x L images, its output back in the 1-d shape (a copy: a view made inside a
    Function would refuse in-place use)."""

    __slots__ = ()

    def like(self, t) -> PoolKernels:
        return _Pool1dKernels(self.g, self.backend, self.adaptive,
                              _channels_last(image_view(t)))

    def max_forward(self, x, mode: int):
        y, idx = super().max_forward(image_view(x), mode)
        return y.squeeze(-2).clone(), idx if mode == INDEX_NONE else idx.squeeze(-2).clone()

    def max_backward(self, dy, idx, mode: int):
        return super().max_backward(image_view(dy), image_view(idx), mode).squeeze(-2).clone()

    def avg_forward(self, x):
        return super().avg_forward(image_view(x)).squeeze(-2).clone()

    def avg_backward(self, dy):
        return super().avg_backward(image_view(dy)).squeeze(-2).clone()


class _Pool1dCall(_PoolCall):
    """A 1-d pool for one call signature: the 2-d pool's call of the 1 x L image (built on a
    view of the input). In eager mode on a kernel backend its Function takes the 1-d tensor
    itself: the launches are planned on 1 x L views and take the tensors by pointer, the
    outputs are made in their 1-d shapes (conv1d's design). Otherwise (torch.compile, another
    implementation, an unbatched input) the 2-d call runs on a view."""

    __slots__ = ()
    image = staticmethod(image_view)

    def __init__(self, impl, name: str, g: PoolGeometry, input, unbatched: bool, max_pool: bool,
                 adaptive: bool = False, indices: bool = False):
        super().__init__(impl, name, g, input, unbatched, max_pool, adaptive, indices)
        if self.eager:
            self.new_y, self.new_dx = signal_maker(self.new_y), signal_maker(self.new_dx)
            self.new_idx = {mode: signal_maker(make) for mode, make in self.new_idx.items()}

    def __call__(self, input):
        if self.eager:
            return super().__call__(input)
        out = super().__call__(input.unsqueeze(-2))
        if self.max and self.indices:    # a 1 x L image's flat indices: positions along L
            return out[0].squeeze(-2), out[1].squeeze(-2)
        return out.squeeze(-2)

    def kernels(self) -> PoolKernels:
        return _Pool1dKernels(self.g, self.backend, self.adaptive, self.channels_last)


def _image(input, backend):
    """input (C, L) or (N, C, L), checked as a 1-d pool's input, as a 1 x L image's view."""
    check_tensor(input, "input", backend or current_backend(), ndims=(2, 3))
    return input.unsqueeze(-2)


def _stride_1d(stride):
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        return None     # the kernel size, as in torch
    return (1, single(stride, "stride"))


def _max_pool1d_call(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     backend):
    return _max_pool2d_call(_image(input, backend), (1, single(kernel_size, "kernel_size")),
                            _stride_1d(stride), (0, single(padding, "padding")),
                            (1, single(dilation, "dilation")), ceil_mode, return_indices,
                            backend, _Pool1dCall)


def _avg_pool1d_call(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     backend):
    return _avg_pool2d_call(_image(input, backend), (1, single(kernel_size, "kernel_size")),
                            _stride_1d(stride), (0, single(padding, "padding")), ceil_mode,
                            count_include_pad, None, backend, _Pool1dCall)


def _adaptive_avg_pool1d_call(input, output_size, backend):
    return _adaptive_avg_pool2d_call(_image(input, backend),
                                     (1, single(output_size, "output_size")), backend,
                                     _Pool1dCall)


_CALLS_1D = {"max": Cache("max_pool1d calls"), "avg": Cache("avg_pool1d calls"),
             "adaptive": Cache("adaptive_avg_pool1d calls")}


def max_pool1d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, backend=None):
    """torch.nn.functional.max_pool1d; with return_indices, (output, int64 indices along L)."""
    return _CALLS_1D["max"].call(_key, _max_pool1d_call, input, kernel_size, stride, padding,
                                 dilation, ceil_mode, return_indices, backend)(input)


def avg_pool1d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, *, backend=None):
    """torch.nn.functional.avg_pool1d."""
    return _CALLS_1D["avg"].call(_key, _avg_pool1d_call, input, kernel_size, stride, padding,
                                 ceil_mode, count_include_pad, backend)(input)


def adaptive_avg_pool1d(input, output_size, *, backend=None):
    """torch.nn.functional.adaptive_avg_pool1d; output_size an int (or a sequence of one)."""
    return _CALLS_1D["adaptive"].call(_key, _adaptive_avg_pool1d_call, input, output_size,
                                      backend)(input)


__all__ = ["max_pool1d", "avg_pool1d", "adaptive_avg_pool1d",
           "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "PoolGeometry",
           "MaxPool2dFunction", "AvgPool2dFunction"]
