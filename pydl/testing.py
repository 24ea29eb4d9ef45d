"""Numerical checking shared by the test suite and the benchmark's correctness gate.

One tolerance table by dtype. Absolute tolerance grows with the length of the reduction an
output element sums over (rounding errors of a sum of n terms grow like sqrt(n) on average).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ._launch import poisoned_outputs  # noqa: F401  (re-exported for tests)

# dtype -> (rtol, atol at reduction length 1)
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}
# fp32 dots on tensor cores (TF32: 10-bit mantissa), the GPU default for fp32 tl.dot.
TF32_TOLERANCE: tuple[float, float] = (3e-4, 3e-4)


def tolerance(dtype: torch.dtype, reduction: int = 1, tf32: bool = False) -> tuple[float, float]:
    """(rtol, atol) for outputs of `dtype` that each reduce over `reduction` terms."""
    if dtype not in TOLERANCES:
        raise KeyError(f"no tolerance for {dtype}")
    rtol, atol = TF32_TOLERANCE if (tf32 and dtype == torch.float32) else TOLERANCES[dtype]
    return rtol, atol * math.sqrt(max(1, int(reduction)))


def to_numpy64(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def assert_close(actual: Any, expected: Any, dtype: torch.dtype, *, reduction: int = 1,
                 tf32: bool = False, name: str = "output", scale: float | None = None) -> None:
    """`actual` matches `expected` within the tolerance of `dtype`.

    NaN must stand where the expected value has NaN and nowhere else (poisoned outputs fail);
    infinities must match exactly. `scale` multiplies atol, for outputs whose magnitude is
    known to be larger than one (gradients summed over a batch, extreme logits).
    """
    a, e = to_numpy64(actual), to_numpy64(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} != expected {e.shape}")
    rtol, atol = tolerance(dtype, reduction, tf32)
    if scale is not None:
        atol *= scale
    nan_a, nan_e = np.isnan(a), np.isnan(e)
    if (nan_a != nan_e).any():
        idx = np.argwhere(nan_a != nan_e)[0]
        raise AssertionError(f"{name}: NaN mismatch at {tuple(idx)}: got {a[tuple(idx)]}, "
                             f"expected {e[tuple(idx)]} ({int((nan_a != nan_e).sum())} elements)")
    inf_e = np.isinf(e)
    if (a[inf_e] != e[inf_e]).any():
        raise AssertionError(f"{name}: infinities differ")
    ok = ~nan_e & ~inf_e
    err = np.abs(a[ok] - e[ok])
    bound = atol + rtol * np.abs(e[ok])
    bad = err > bound
    if bad.any():
        worst = int(np.argmax(err - bound))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.size} elements out of tolerance for {dtype} "
            f"(rtol={rtol:.1e}, atol={atol:.1e}); worst |diff|={err[worst]:.3e} at value "
            f"{e[ok][worst]:.6g} (got {a[ok][worst]:.6g})")


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
