"""Numerical checking shared by the test suite and the benchmark's correctness gate.

One tolerance table by dtype. Absolute tolerance grows with the length of the reduction an
output element sums over (rounding errors of a sum of n terms grow like sqrt(n) on average).
An fp32 op is compared at the tolerance of the precision its products really use: TF32 where
`uses_tf32` says so (a CUDA device, torch allowing it for that kind of op), fp32 otherwise.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ._launch import (
    input_precision,
    poisoned_outputs,  # noqa: F401  (re-exported for tests)
)

# dtype -> (rtol, atol at reduction length 1)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
# fp32 products on tensor cores in TF32: fp16's 10-bit mantissa, but both operands of every
# product are rounded (cuDNN: to nearest, 2^-11 each; Triton: truncated, up to 2^-10 each), and
# when two such implementations are compared their errors add. Calibrated by
# tests/test_testing.py on emulated TF32 products: exact-vs-TF32 uses about half of it,
# truncated-vs-rounded about 0.8; bf16-rounded operands exceed it 3-fold.
TF32_TOLERANCE: tuple[float, float] = (2e-3, 3e-3)


def tolerance(dtype: torch.dtype, reduction: int = 1, tf32: bool = False) -> tuple[float, float]:
    """(rtol, atol) for outputs of `dtype` that each reduce over `reduction` terms."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}")
    rtol, atol = TF32_TOLERANCE if (tf32 and dtype == torch.float32) else TOLERANCES[dtype]
    return rtol, atol * math.sqrt(max(1, int(reduction)))


def uses_tf32(device: str | torch.device, *, cudnn: bool) -> bool:
    """Whether fp32 products may round to TF32 on `device`, in pydl's Triton kernels and in the
    torch op they are compared with: on a CUDA device, when torch allows it for that kind of op
    (`cudnn=True`: convolution and the RNNs, torch.backends.cudnn.allow_tf32, on by default;
    else matmuls and attention, torch.backends.cuda.matmul.allow_tf32, off by default) - the
    rule the launchers follow (pydl._launch.input_precision). Emulation computes fp32 products
    exactly (Triton's interpreter ignores the precision), and so does torch on the CPU."""
    return (torch.device(device).type == "cuda"
            and input_precision(torch.float32, cudnn=cudnn) == "tf32")


def to_numpy64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


@dataclass
class Deviation:
    """How far `actual` is from `expected` at a dtype's tolerance."""
    ratio: float            # max |actual - expected| / (atol + rtol |expected|): <= 1 is within
    message: str | None     # why it is out of tolerance; None when within


def deviation(actual: Any, expected: Any, dtype: torch.dtype, *, reduction: int = 1,
              tf32: bool = False, name: str = "output", scale: float | None = None) -> Deviation:
    """The measure behind `assert_close` (same arguments), as a number: the benchmark's gate
    weighs a variant's deviation from a float64 reference against torch's own."""
    a, e = to_numpy64(actual), to_numpy64(expected)
    if a.shape != e.shape:
        return Deviation(math.inf, f"{name}: shape {a.shape} != expected {e.shape}")
    rtol, atol = tolerance(dtype, reduction, tf32)
    if scale is not None:
        atol *= scale
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if (nan_a != nan_e).any():
        idx = np.argwhere(nan_a != nan_e)[0]
        return Deviation(math.inf, f"{name}: NaN mismatch at {tuple(idx)}: got {a[tuple(idx)]}, "
                                   f"expected {e[tuple(idx)]} ({int((nan_a != nan_e).sum())} "
                                   "elements)")
    inf_e = np.isinf(e)
    if (a[inf_e] != e[inf_e]).any():
        return Deviation(math.inf, f"{name}: infinities differ")
    ok = ~nan_e & ~inf_e
    if not ok.any():
        return Deviation(0.0, None)
    err = np.abs(a[ok] - e[ok])
    bound = atol + rtol * np.abs(e[ok])
    ratio = float(np.max(err / bound))
    bad = err > bound
    if not bad.any():
        return Deviation(ratio, None)
    worst = int(np.argmax(err - bound))
    return Deviation(ratio, (
        f"{name}: {int(bad.sum())} of {err.size} elements out of tolerance for {dtype} "
        f"(rtol={rtol:.1e}, atol={atol:.1e}); worst |diff|={err[worst]:.3e} at value "
        f"{e[ok][worst]:.6g} (got {a[ok][worst]:.6g})"))


def assert_close(actual: Any, expected: Any, dtype: torch.dtype, *, reduction: int = 1,
                 tf32: bool = False, name: str = "output", scale: float | None = None) -> None:
    """`actual` matches `expected` within the tolerance of `dtype` (TF32's for fp32 when
    `tf32`: see `uses_tf32`).

    NaN must stand where the expected value has NaN and nowhere else (poisoned outputs fail);
    infinities must match exactly. `scale` multiplies atol, for outputs whose magnitude is
    known to be larger than one (gradients summed over a batch, extreme logits).
    """
    d = deviation(actual, expected, dtype, reduction=reduction, tf32=tf32, name=name,
                  scale=scale)
    if d.message is not None:
        raise AssertionError(d.message)


def random_tensor(shape, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                  *, scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh normal random values (never all zeros), made in fp32 and rounded to `dtype`."""
    t = torch.randn(shape, dtype=torch.float32, generator=generator) * scale
    return t.to(device=device, dtype=dtype)


def run_with_grad(fn, inputs, grad_out=None, *, seed: int = 0):
    """Call fn(*inputs) on fresh leaf copies of the floating-point tensor inputs and
    backpropagate `grad_out` (a fixed random cotangent when None).

    Returns (output, grad_out, grads): one grad per input, None for non-float inputs, so the
    same inputs and cotangent can be given to another implementation and compared.
    """
    leaves = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dtype.is_floating_point:
            leaves.append(t.detach().clone().requires_grad_(True))
        else:
            leaves.append(t)
    out = fn(*leaves)
    if grad_out is None:
        gen = torch.Generator().manual_seed(seed)
        grad_out = random_tensor(out.shape, out.dtype, out.device, generator=gen)
    out.backward(grad_out)
    grads = [leaf.grad if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None
             for leaf in leaves]
    return out.detach(), grad_out, grads
