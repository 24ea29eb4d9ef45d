"""The references' array module: NumPy, or CuPy when they are given CuPy arrays.

Every reference function picks its module from its inputs and writes its math with it:

    xp = array_module(x, w)
    y = xp.exp(f64(xp, x)) ...

so the same code checks a GPU kernel at shapes too large for the CPU, on CuPy arrays, and runs
unchanged (bit for bit) on NumPy arrays. CuPy is imported only once an input is a CuPy array:
importing pydl.reference needs neither cupy nor a GPU.

What NumPy has and CuPy lacks gets one helper here each:
    errstate(xp, ...)            np.errstate (CuPy never warns about floating-point errors)
    add_at(xp, a, index, values) np.add.at (cupyx.scatter_add on CuPy)
"""
from __future__ import annotations

import contextlib

import numpy


def _from_cupy(a) -> bool:
    """Whether a's type comes from the cupy package (tested without importing cupy)."""
    return type(a).__module__.partition(".")[0] == "cupy"


def array_module(*arrays):
    """cupy when any argument is a cupy.ndarray, else numpy.

    Other arguments (NumPy arrays, Python scalars and lists, None) do not vote; they are
    converted by the chosen module's asarray.
    """
    for a in arrays:
        if _from_cupy(a):
            import cupy  # already imported: a cupy array exists
            if isinstance(a, cupy.ndarray):
                return cupy
    return numpy


def f64(xp, x):
    """x as a float64 array of module xp (no copy when it already is one)."""
    return xp.asarray(x, dtype=xp.float64)


def errstate(xp, **kwargs):
    """numpy.errstate(**kwargs) for NumPy. CuPy never warns about division by zero, overflow
    or invalid operations (its kernels just produce inf/NaN), so there it is a no-op."""
    if xp is numpy:
        return numpy.errstate(**kwargs)
    return contextlib.nullcontext()


def add_at(xp, a, index, values) -> None:
    """a[index] += values, unbuffered: repeated indices all accumulate (np.add.at).

    On CuPy this is cupyx.scatter_add, which has the same semantics but adds with atomics, so
    the order of the additions into one element, and so its last bits, may vary.
    """
    if xp is numpy:
        numpy.add.at(a, index, values)
    else:
        import cupyx
        cupyx.scatter_add(a, index, values)
