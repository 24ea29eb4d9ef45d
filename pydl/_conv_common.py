"""What conv2d's launchers share (pydl/conv.py lists the parts): the geometry of one
convolution (`ConvGeometry`, which the kernel ops and the argument checks build too), the
interface every algorithm's launcher class follows (`_Launcher`), the cache of the Triton
algorithms' plans (`_TRITON_PLANS`), and the small helpers more than one launcher calls: the
rounding of fp32 dots, the grad input's stride phases, the bias as per-group rows, and the
launch of nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._launch import input_precision
from ._library import Geometry
from ._plan import Cache


@dataclass(frozen=True)
class ConvGeometry(Geometry):
    """One convolution: input (N, C, H, W), weight (OC, C / groups, KH, KW), output
    (N, OC, OH, OW)."""
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
    __hash__ = Geometry.__hash__

    @property
    def CG(self) -> int:
        return self.C // self.groups

    @property
    def OCG(self) -> int:
        return self.OC // self.groups


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots round like cuDNN under the same torch setting (pydl._launch.input_precision)."""
    return input_precision(dtype, cudnn=True)


def _stride_phases(g: ConvGeometry) -> int:
    """Stride phases the implicit grad input tiles apart (kernels/triton/conv.py,
    STRIDE_PHASES): SH * SW for a strided convolution without dilation, else 1 (one tile
    holds pixels of every phase and masks the taps that do not reach them)."""
    if (g.DH, g.DW) != (1, 1):
        return 1
    return g.SH * g.SW


def _bias_matrix(b: torch.Tensor | None, g: ConvGeometry) -> torch.Tensor | None:
    """The bias as (groups, OC / groups), a view (the GEMM epilogue adds it per column)."""
    if b is None:
        return None
    return b.as_strided((g.groups, g.OCG), (g.OCG * b.stride(0), b.stride(0)), b.storage_offset())


# The Triton algorithms' plans, built once per signature: the geometry, the operands' dtype,
# layout (strides) and device, bias or not, the rounding of fp32 dots (and for im2col the
# workspace bound). The kernel ops look them up here; an eager call's plan keeps its own.
_TRITON_PLANS = Cache("conv2d triton plans")


class _Launcher:
    """What a conv2d launcher offers (each algorithm's class: _conv_implicit.py,
    _conv_im2col.py, _conv_numba.py): plans, one per step, plan_forward(x, w, b, y, g),
    plan_backward_input(dy, w, dx, g), plan_backward_weight(dy, x, dw, g),
    plan_backward_bias(dy, db, g) -> run(tensors), for a caller that launches the same
    signature again (pydl/_plan.py): run takes the tensors alone (the forward's bias, when
    absent, as a placeholder: the weight) at the addresses of those planned, and holds what
    was built for the shapes, strides, dtypes and device it was planned with (the Triton
    launchers' cached Launches and GEMM plans, the Numba one's NumbaLaunches); and the same
    steps launched once into the given output, forward(x, w, b, y, g) and so on."""

    @classmethod
    def forward(cls, x, w, b, y, g: ConvGeometry) -> None:
        cls.plan_forward(x, w, b, y, g)(x, w, w if b is None else b, y)

    @classmethod
    def backward_input(cls, dy, w, dx, g: ConvGeometry) -> None:
        cls.plan_backward_input(dy, w, dx, g)(dy, w, dx)

    @classmethod
    def backward_weight(cls, dy, x, dw, g: ConvGeometry) -> None:
        cls.plan_backward_weight(dy, x, dw, g)(dy, x, dw)

    @classmethod
    def backward_bias(cls, dy, db, g: ConvGeometry) -> None:
        cls.plan_backward_bias(dy, db, g)(dy, db)


def _launch_nothing(*tensors) -> None:
    pass
