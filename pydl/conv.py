"""conv2d (and conv1d, on its kernels): the public functions, the argument checks and per-call
plans, and the implementations registered per backend.

Algorithms (`algo=`), each a handwritten kernel path:
  "implicit"  Triton implicit GEMM (kernels/triton/conv.py): input patches are gathered inside
              the GEMM's K loop, never materialised; backward passes are implicit GEMMs too.
              Depthwise layers (groups == C_in, multiplier <= 4) take direct kernels instead
              (kernels/triton/conv_depthwise.py: no matrix product in them). The default for
              the triton backend.
  "im2col"    Triton explicit im2col + tiled GEMM (kernels/triton/conv.py, kernels/triton/gemm.py):
              the column matrix of a chunk of images is materialised, then multiplied by the
              weight; grad input is a GEMM then a col2im gather, grad weight a GEMM. The batch
              goes in chunks so the workspace stays under IM2COL_WORKSPACE_BYTES (256 MiB).
              On the numba backend (its only algo, so its default): the same steps as Numba
              CUDA kernels (kernels/numba/conv.py; the shared-memory tiled GEMM of
              kernels/numba/gemm.py via pydl/_gemm_numba.py), the same workspace bound.

Semantics are torch.nn.functional.conv2d's: cross-correlation, padding int / pair / "same" /
"valid", stride, dilation, groups (depthwise included), optional bias; NCHW or channels_last
input (the output keeps the input's memory format), any strides without a copy.

The parts, a module each:
  pydl/conv.py            conv2d and conv_geometry (the argument checks), the checked call of a
                          signature, which is also its plan in eager mode (_Conv2dCall, cached
                          in _CALLS), and pydl's implementations registered per backend
  pydl/_conv_ops.py       ALGOS (backend -> algo -> launcher), the pydl::conv2d_* kernel ops,
                          Conv2dKernels, Conv2dFunction and the double backward's Functions
  pydl/_conv_implicit.py  the triton backend's "implicit" launchers: the implicit GEMM (tiles,
                          tuners, the weight gradient's split-K) and the depthwise kernels
  pydl/_conv_im2col.py    the triton backend's "im2col" launcher, and what both backends' im2col
                          share: IM2COL_WORKSPACE_BYTES, the chunks, the matrix views
  pydl/_conv_numba.py     the numba backend's "im2col" launcher
  pydl/_conv_common.py    ConvGeometry, the launcher interface (_Launcher), the Triton plans'
                          cache and the small helpers the launchers share
"""
from __future__ import annotations

import math

import torch

from ._checks import check_tensor
from ._conv_common import ConvGeometry, _launch_nothing
from ._conv_implicit import _depthwise, to_channels_last
from ._conv_ops import ALGOS, Conv2dFunction, Conv2dKernels, _weight_grad_format, _y_shape
from ._launch import (
    fresh,
    image_view,
    memory_format_of,
    output_maker,
    signal_maker,
    tf32_allowed,
)
from ._library import autocast_inputs
from ._plan import (
    GRID_YZ_MAX,
    Cache,
    apply,
    capturing,
    emulated,
    needs_graph,
    options_key,
    plain_tensors,
    tensors_key,
)
from ._shapes import conv_output_size_padded, conv_padding, pair, positive_int, single
from .backends import current_backend, dispatch, register, resolve_algo

# --- implementations by backend -------------------------------------------------------------

def _kernel_conv2d(backend: str):
    def impl(x, w, b, g, algo):
        ops = Conv2dKernels(g, algo, backend)
        if needs_graph(x, w, b):
            return apply(Conv2dFunction, x, w, b, ops)
        return ops.forward(x, w, b)     # no graph to record
    return impl


# backend -> pydl's own implementation (a call plans its eager form only where it still runs)
_KERNEL_IMPLS = {_backend: register("conv2d", _backend, algos=tuple(_algos))(
    _kernel_conv2d(_backend)) for _backend, _algos in ALGOS.items()}


@register("conv2d", "torch")
def _torch_conv2d(x, w, b, g, algo):
    if (g.PB, g.PR) == (g.PH, g.PW):
        return torch.nn.functional.conv2d(x, w, b, (g.SH, g.SW), (g.PH, g.PW), (g.DH, g.DW),
                                          g.groups)
    return torch.nn.functional.conv2d(x, w, b, (g.SH, g.SW), "same", (g.DH, g.DW), g.groups)


# --- argument checks and the public function ------------------------------------------------

def conv_geometry(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1) -> ConvGeometry:
    """Validate a conv2d configuration and resolve its output size (the one shared formula)."""
    N, C, H, W = x_shape
    OC, CG, KH, KW = w_shape
    groups = positive_int(groups, "groups")
    if C % groups:
        raise ValueError(f"input channels ({C}) must be divisible by groups ({groups})")
    if OC % groups:
        raise ValueError(f"out channels of weight ({OC}) must be divisible by groups ({groups})")
    if CG * groups != C:
        raise ValueError(f"input has {C} channels but weight expects {CG} x groups={groups} = "
                         f"{CG * groups}: weight shape {tuple(w_shape)}")
    if KH <= 0 or KW <= 0:
        raise ValueError(f"kernel size must be positive, got weight shape {tuple(w_shape)}")
    if OC == 0:
        raise ValueError(f"weight has 0 output channels (shape {tuple(w_shape)}); torch's conv2d "
                         f"rejects it too")
    if H == 0 or W == 0:
        raise ValueError(f"input has an empty spatial dimension: shape {tuple(x_shape)} (only the "
                         f"batch or the channels may be 0, as in torch)")
    SH, SW = pair(stride, "stride")
    DH, DW = pair(dilation, "dilation")
    if SH <= 0 or SW <= 0:
        raise ValueError(f"stride must be positive, got {stride!r}")
    if DH <= 0 or DW <= 0:
        raise ValueError(f"dilation must be positive, got {dilation!r}")
    top, bottom, left, right = conv_padding(padding, (KH, KW), (SH, SW), (DH, DW))
    OH = conv_output_size_padded(H, KH, SH, top, bottom, DH, name="input height")
    OW = conv_output_size_padded(W, KW, SW, left, right, DW, name="input width")
    return ConvGeometry(N, C, H, W, OC, KH, KW, OH, OW, SH, SW, top, left, DH, DW, groups,
                        bottom, right)


@emulated("forward", "grad_output", "backward_input", "backward_weight", "backward_bias")
class _Conv2dCall(Conv2dKernels):
    """conv2d for one call signature (pydl._plan), checked once: the implementation, the
    geometry and the algorithm. On a kernel backend in eager mode it is also the signature's
    plan: Conv2dFunction runs its methods, which allocate with arguments fixed here and launch
    what the first call built (the backward's launches per strides of the upstream gradient
    and, in fp32, per TF32 switch); the call's key fixes every other input of those."""

    __slots__ = ("impl", "unbatched", "eager", "launcher", "fp32", "grad_layout", "new_y",
                 "new_dx", "new_dw", "new_db", "fwd", "bwd")

    def __init__(self, input, weight, bias, stride, padding, dilation, groups, backend, algo):
        name, self.impl = dispatch("conv2d", backend, input, weight,
                                   *([bias] if isinstance(bias, torch.Tensor) else []))
        algo = resolve_algo("conv2d", name, algo)
        check_tensor(input, "input", name, ndims=(3, 4))
        check_tensor(weight, "weight", name, ndims=(4,))
        if weight.dtype != input.dtype:
            raise TypeError(f"input ({input.dtype}) and weight ({weight.dtype}) must have the "
                            "same dtype")
        if bias is not None:
            check_tensor(bias, "bias", name, ndims=(1,))
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"bias must have {weight.shape[0]} elements (out channels), "
                                 f"got {bias.shape[0]}")
            if bias.dtype != input.dtype:
                raise TypeError(f"bias ({bias.dtype}) and input ({input.dtype}) must have the "
                                "same dtype")
        self.unbatched = input.dim() == 3
        x_shape = (1, *input.shape) if self.unbatched else tuple(input.shape)
        g = conv_geometry(x_shape, tuple(weight.shape), stride, padding, dilation, groups)
        if g.C == 0 and name != "torch":
            # torch returns an (N, 0, OH, OW) tensor here, dropping the bias's out channels: no
            # answer to match, so the kernel backends refuse the case
            raise ValueError(f"input has 0 channels (shape {x_shape}): the kernel backends do "
                             f"not run a convolution over no channels (torch returns an (N, 0, "
                             f"OH, OW) tensor for it); use backend='torch' for torch's result")
        if name == "triton" and g.groups > GRID_YZ_MAX and not _depthwise(g):
            raise NotImplementedError(
                f"conv2d: {g.groups} groups on the triton backend, whose grouped kernels run one "
                f"grid row per group, at most {GRID_YZ_MAX} (CUDA's cap on grid axes 1 and 2); "
                f"use backend='numba' or backend='torch'")
        super().__init__(g, algo, name)
        self.eager = (self.impl is _KERNEL_IMPLS.get(name) and not self.unbatched
                      and not torch.compiler.is_compiling() and plain_tensors(input, weight, bias))
        if self.eager:
            dt, dev, fmt = input.dtype, input.device, memory_format_of(input)
            self.launcher = ALGOS[name][algo]
            self.fp32 = dt == torch.float32
            self.grad_layout = algo == "implicit" and fmt == torch.channels_last
            self.new_y = output_maker(_y_shape(g), dt, dev, fmt)
            self.new_dx = output_maker(input.shape, dt, dev, fmt)
            self.new_dw = output_maker(weight.shape, dt, dev, _weight_grad_format(input, weight))
            self.new_db = output_maker((g.OC,), dt, dev)
            # nothing to launch for an empty output
            self.fwd = None if math.prod(_y_shape(g)) else _launch_nothing
            self.bwd = {}

    def __call__(self, input, weight, bias):
        if self.eager:
            if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or (
                    bias is not None and bias.requires_grad)):
                return apply(Conv2dFunction, input, weight, bias, self)
            return self.forward(input, weight, bias)
        if self.unbatched:
            return self.impl(input.unsqueeze(0), weight, bias, self.g, self.algo).squeeze(0)
        return self.impl(input, weight, bias, self.g, self.algo)

    # the plan (eager, kernel backends): Conv2dKernels' steps with fixed arguments

    def kernels(self) -> Conv2dKernels:
        return Conv2dKernels(self.g, self.algo, self.backend)

    @staticmethod
    def image(t):
        """A tensor of the call as the kernels see it, for planning (conv1d: its 1 x L view;
        the launches then take the call's own tensors by pointer, pydl/_plan.py's rule)."""
        return t

    def forward(self, x, w, b):
        y = fresh(self.new_y)
        run = self.fwd
        if run is None:
            image = self.image
            run = self.launcher.plan_forward(image(x), image(w), b, image(y), self.g)
            if not capturing():
                self.fwd = run
        run(x, w, w if b is None else b, y)
        return y

    def grad_output(self, dy, x):
        if self.grad_layout and not dy.is_contiguous(memory_format=torch.channels_last):
            return to_channels_last(dy)     # an NCHW gradient by pydl's relayout kernel
        return dy

    def _backward_run(self, which: int, plan, dy, *tensors):
        """The backward's launch `which` (0 input, 1 weight, 2 bias), planned on first use, for
        an upstream gradient of dy's strides (and, in fp32, the TF32 switch now)."""
        key = (dy.stride(), tf32_allowed(True)) if self.fp32 else dy.stride()
        runs = self.bwd.get(key)
        if runs is None:
            runs = [None, None, None]
            if not capturing():
                self.bwd[key] = runs
        run = runs[which]
        if run is None:
            run = runs[which] = plan(*map(self.image, (dy, *tensors)), self.g)
        return run

    def backward_input(self, dy, w, x):
        dx = fresh(self.new_dx)
        if dx.numel():
            self._backward_run(0, self.launcher.plan_backward_input, dy, w, dx)(dy, w, dx)
        return dx

    def backward_weight(self, dy, x, w):
        dw = fresh(self.new_dw)
        if self.g.N == 0:            # an empty batch sums nothing (as _conv2d_bwd_weight)
            return dw.zero_()
        self._backward_run(1, self.launcher.plan_backward_weight, dy, x, dw)(dy, x, dw)
        return dw

    def backward_bias(self, dy):
        db = fresh(self.new_db)
        self._backward_run(2, self.launcher.plan_backward_bias, dy, db)(dy, db)
        return db


_CALLS = Cache("conv2d calls")


def _call_key(input, weight, bias, stride, padding, dilation, groups, backend, algo):
    return (backend or current_backend(), algo, *tensors_key(input, weight, bias),
            *options_key(stride, padding, dilation, groups), tf32_allowed(True))


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           backend=None, algo=None):
    """torch.nn.functional.conv2d (cross-correlation) on pydl's kernels.

    algo: on the triton backend "implicit" (implicit GEMM, the default) or "im2col" (explicit
    im2col + GEMM, batch in chunks bounded by IM2COL_WORKSPACE_BYTES); on the numba backend
    "im2col" (the default and only one: Numba im2col, tiled GEMM and col2im kernels).
    """
    input, weight, bias = autocast_inputs("conv2d", input, weight, bias)
    call = _CALLS.call(_call_key, _Conv2dCall, input, weight, bias, stride, padding, dilation,
                       groups, backend, algo)
    return call(input, weight, bias)


# --- conv1d: the same kernels and plans on a 1 x L image -------------------------------------

class _Conv1dKernels(Conv2dKernels):
    """conv2d's kernel ops on conv1d's tensors, for the double backward's Functions: each on
    the 1 x L images, its output back in the 1-d shape (a copy: a view made inside a Function
    would refuse in-place use)."""

    __slots__ = ()

    def forward(self, x, w, b):
        return super().forward(image_view(x), image_view(w), b).squeeze(-2).clone()

    def grad_output(self, dy, x):
        return super().grad_output(image_view(dy), image_view(x)).squeeze(-2)

    def backward_input(self, dy, w, x):
        dx = super().backward_input(image_view(dy), image_view(w), image_view(x))
        return dx.squeeze(-2).clone()

    def backward_weight(self, dy, x, w):
        dw = super().backward_weight(image_view(dy), image_view(x), image_view(w))
        return dw.squeeze(-2).clone()

    def backward_bias(self, dy):
        return super().backward_bias(image_view(dy))


class _Conv1dCall(_Conv2dCall):
    """conv1d for one call signature: conv2d's call of the 1 x L image, checked on views of
    the tensors. In eager mode on a kernel backend its Function takes the 1-d tensors
    themselves: the launches are planned on their 1 x L views and take the tensors by pointer,
    and the outputs are made in their 1-d shapes, so a call adds no view, and no view's
    autograd node, to conv2d's. Otherwise (torch.compile, another implementation, an
    unbatched input) the 2-d call runs on the views."""

    __slots__ = ()
    image = staticmethod(image_view)

    def __init__(self, input, weight, bias, stride, padding, dilation, groups, backend, algo):
        name = backend or current_backend()
        check_tensor(input, "input", name, ndims=(2, 3))
        check_tensor(weight, "weight", name, ndims=(3,))
        if not isinstance(padding, str):
            padding = (0, single(padding, "padding"))
        super().__init__(input.unsqueeze(-2), weight.unsqueeze(-2), bias,
                         (1, single(stride, "stride")), padding,
                         (1, single(dilation, "dilation")), groups, backend, algo)
        if self.eager:
            self.new_y, self.new_dx, self.new_dw = map(signal_maker,
                                                       (self.new_y, self.new_dx, self.new_dw))

    def __call__(self, input, weight, bias):
        if self.eager:
            return super().__call__(input, weight, bias)
        return super().__call__(input.unsqueeze(-2), weight.unsqueeze(-2), bias).squeeze(-2)

    def kernels(self) -> Conv2dKernels:
        return _Conv1dKernels(self.g, self.algo, self.backend)

    def grad_output(self, dy, x):
        if not self.grad_layout:
            return dy
        # in the 1-d shape again: the double backward's Functions take it as an input
        return super().grad_output(image_view(dy), x).squeeze(-2)


def _call_key_1d(*args):
    return ("conv1d", *_call_key(*args))


def conv1d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           backend=None, algo=None):
    """torch.nn.functional.conv1d on conv2d's kernels and plans: a length-L signal is a 1 x L
    image (cuDNN runs conv1d so too; _Conv1dCall). An input laid out (N, L, C), as a
    transposed (N, L, C) activation is, is channels_last as an image, uncopied, and its output
    keeps that layout. Options: an int or a sequence of one int as in torch, padding also
    "same" / "valid"; `algo=` as conv2d's."""
    input, weight, bias = autocast_inputs("conv2d", input, weight, bias)
    call = _CALLS.call(_call_key_1d, _Conv1dCall, input, weight, bias, stride, padding, dilation,
                       groups, backend, algo)
    return call(input, weight, bias)


__all__ = ["conv1d", "conv2d", "conv_geometry", "ConvGeometry", "Conv2dFunction", "Conv2dKernels",
           "ALGOS"]
