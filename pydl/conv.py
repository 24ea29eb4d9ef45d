"""conv2d: argument checks, the autograd Function, and the launchers of each algorithm.

Algorithms (`algo=`), each a handwritten kernel path:
  "implicit"  Triton implicit GEMM (kernels/triton/conv.py): input patches are gathered inside
              the GEMM's K loop, never materialised; backward passes are implicit GEMMs too.
              The default for the triton backend.

Semantics are torch.nn.functional.conv2d's: cross-correlation, padding int / pair / "same" /
"valid", stride, dilation, groups (depthwise included), optional bias; NCHW or channels_last
input (the output keeps the input's memory format), any strides without a copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._checks import check_tensor
from ._launch import cdiv, new_output, next_power_of_2
from ._shapes import conv_output_size_padded, conv_padding, pair
from .backends import dispatch, register


@dataclass(frozen=True)
class ConvGeometry:
    """One convolution: input (N, C, H, W), weight (OC, C / groups, KH, KW), output (N, OC, OH, OW)."""
    N: int
    C: int
    H: int
    W: int
    OC: int
    KH: int
    KW: int
    OH: int
    OW: int
    SH: int = 1
    SW: int = 1
    PH: int = 0   # top padding
    PW: int = 0   # left padding
    DH: int = 1
    DW: int = 1
    groups: int = 1
    PB: int = 0   # bottom and right padding: equal to PH, PW except for padding="same"
    PR: int = 0   # with an even kernel span (the kernels only need top and left)

    @property
    def CG(self) -> int:
        return self.C // self.groups

    @property
    def OCG(self) -> int:
        return self.OC // self.groups


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots round like cuDNN under the same torch setting: TF32 when it is allowed."""
    return "tf32" if dtype == torch.float32 and torch.backends.cudnn.allow_tf32 else "ieee"


# --- Triton implicit GEMM -------------------------------------------------------------------

def _gemm_tile(m: int, n: int, k: int) -> dict:
    """Block sizes for an (m x k) @ (k x n) tile loop: tl.dot needs every block >= 16."""
    return dict(BLOCK_M=64 if m >= 64 else max(16, next_power_of_2(m)),
                BLOCK_N=min(128, max(16, next_power_of_2(n))),
                BLOCK_K=min(32, max(16, next_power_of_2(k))),
                num_warps=4)


class _TritonImplicit:
    @staticmethod
    def forward(x, w, b, y, g: ConvGeometry) -> None:
        from .kernels.triton import conv as k
        M = g.N * g.OH * g.OW
        cfg = _gemm_tile(M, g.OCG, g.CG)
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(g.OCG, cfg["BLOCK_N"]), g.groups)
        k.conv2d_implicit_fwd[grid](
            x, w, b if b is not None else w, y, g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW,
            *x.stride(), *w.stride(), *y.stride(), g.SH, g.SW, g.PH, g.PW, g.DH, g.DW,
            KH=g.KH, KW=g.KW, CG=g.CG, OCG=g.OCG, HAS_BIAS=b is not None,
            INPUT_PRECISION=_input_precision(x.dtype), **cfg)

    @staticmethod
    def backward_input(dy, w, dx, g: ConvGeometry) -> None:
        from .kernels.triton import conv as k
        M = g.N * g.H * g.W
        cfg = _gemm_tile(M, g.CG, g.OCG)
        grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(g.CG, cfg["BLOCK_N"]), g.groups)
        k.conv2d_implicit_bwd_input[grid](
            dy, w, dx, g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *dy.stride(), *w.stride(),
            *dx.stride(), g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, KH=g.KH, KW=g.KW, CG=g.CG,
            OCG=g.OCG, INPUT_PRECISION=_input_precision(dy.dtype), **cfg)

    @staticmethod
    def backward_weight(dy, x, dw, g: ConvGeometry) -> None:
        from .kernels.triton import conv as k
        J = g.CG * g.KH * g.KW
        cfg = _gemm_tile(g.OCG, J, g.N * g.OH * g.OW)
        grid = (cdiv(g.OCG, cfg["BLOCK_M"]), cdiv(J, cfg["BLOCK_N"]), g.groups)
        k.conv2d_implicit_bwd_weight[grid](
            dy, x, dw, g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *dy.stride(), *x.stride(),
            *dw.stride(), g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, KH=g.KH, KW=g.KW, CG=g.CG,
            OCG=g.OCG, INPUT_PRECISION=_input_precision(dy.dtype), **cfg)

    @staticmethod
    def backward_bias(dy, db, g: ConvGeometry) -> None:
        from .kernels.triton import conv as k
        block_c = min(16, next_power_of_2(g.OC))
        k.conv2d_bwd_bias[(cdiv(g.OC, block_c),)](
            dy, db, g.N, g.OC, g.OH, g.OW, *dy.stride(), BLOCK_C=block_c, BLOCK_P=128)


# backend -> algo -> launcher; the first algo listed is the backend's default
ALGOS: dict[str, dict[str, type]] = {
    "triton": {"implicit": _TritonImplicit},
}


# --- autograd Function ----------------------------------------------------------------------

class Conv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, g: ConvGeometry, launch):
        y = new_output((g.N, g.OC, g.OH, g.OW), x.dtype, x.device, _memory_format(x))
        if y.numel():
            launch.forward(x, w, b, y, g)
        ctx.save_for_backward(x, w)
        ctx.g, ctx.launch, ctx.has_bias = g, launch, b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        g, launch = ctx.g, ctx.launch
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = new_output(x.shape, x.dtype, x.device, _memory_format(x))
            if dx.numel():
                launch.backward_input(dy, w, dx, g)
        if ctx.needs_input_grad[1]:
            dw = new_output(w.shape, w.dtype, w.device)
            launch.backward_weight(dy, x, dw, g)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = new_output((g.OC,), dy.dtype, dy.device)
            launch.backward_bias(dy, db, g)
        return dx, dw, db, None, None


# --- implementations by backend -------------------------------------------------------------

def _kernel_conv2d(backend: str):
    algos = ALGOS[backend]

    def impl(x, w, b, g, algo):
        name = algo or next(iter(algos))
        if name not in algos:
            raise ValueError(f"conv2d: algo={algo!r} is not available on the {backend!r} backend "
                             f"(available: {', '.join(algos)})")
        return Conv2dFunction.apply(x, w, b, g, algos[name])
    return impl


for _backend in ALGOS:
    register("conv2d", _backend)(_kernel_conv2d(_backend))


@register("conv2d", "torch")
def _torch_conv2d(x, w, b, g, algo):
    if algo is not None:
        raise ValueError("conv2d: the torch backend has no algo= choice (cuDNN picks its own)")
    if (g.PB, g.PR) == (g.PH, g.PW):
        return torch.nn.functional.conv2d(x, w, b, (g.SH, g.SW), (g.PH, g.PW), (g.DH, g.DW), g.groups)
    return torch.nn.functional.conv2d(x, w, b, (g.SH, g.SW), "same", (g.DH, g.DW), g.groups)


# --- argument checks and the public function ------------------------------------------------

def conv_geometry(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1) -> ConvGeometry:
    """Validate a conv2d configuration and resolve its output size (the one shared formula)."""
    N, C, H, W = x_shape
    OC, CG, KH, KW = w_shape
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if C % groups:
        raise ValueError(f"input channels ({C}) must be divisible by groups ({groups})")
    if OC % groups:
        raise ValueError(f"out channels of weight ({OC}) must be divisible by groups ({groups})")
    if CG * groups != C:
        raise ValueError(f"input has {C} channels but weight expects {CG} x groups={groups} = "
                         f"{CG * groups}: weight shape {tuple(w_shape)}")
    if KH <= 0 or KW <= 0:
        raise ValueError(f"kernel size must be positive, got weight shape {tuple(w_shape)}")
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


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           backend=None, algo=None):
    """torch.nn.functional.conv2d (cross-correlation) on pydl's kernels.

    algo: "implicit" (Triton implicit GEMM, the default).
    """
    name, impl = dispatch("conv2d", backend, input, weight,
                          *([bias] if isinstance(bias, torch.Tensor) else []))
    check_tensor(input, "input", name, ndims=(3, 4))
    check_tensor(weight, "weight", name, ndims=(4,))
    if weight.dtype != input.dtype:
        raise TypeError(f"input ({input.dtype}) and weight ({weight.dtype}) must have the same dtype")
    unbatched = input.dim() == 3
    x = input.unsqueeze(0) if unbatched else input
    if bias is not None:
        check_tensor(bias, "bias", name, ndims=(1,))
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must have {weight.shape[0]} elements (out channels), "
                             f"got {bias.shape[0]}")
        if bias.dtype != input.dtype:
            raise TypeError(f"bias ({bias.dtype}) and input ({input.dtype}) must have the same dtype")
    g = conv_geometry(tuple(x.shape), tuple(weight.shape), stride, padding, dilation, groups)
    y = impl(x, weight, bias, g, algo)
    return y.squeeze(0) if unbatched else y


__all__ = ["conv2d", "conv_geometry", "ConvGeometry", "Conv2dFunction", "ALGOS"]
