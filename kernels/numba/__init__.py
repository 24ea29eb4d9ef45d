"""Numba CUDA kernels, one module per op family.

Importing this package (every Numba launcher does, before anything else of Numba's) is the one
place that makes the installed Numba usable by pydl:
- numba and numba-cuda are an optional extra: without them the "numba" backend raises an
  ImportError that names the extra to install; the Triton and torch backends do not need them.
- numba-cuda up to at least 0.30.4 registers an overload of `np.row_stack` unconditionally when
  its array support is first loaded (at the first kernel compile); NumPy 2.5 removed
  `row_stack`, so every compile failed with AttributeError. `_register_without_row_stack`
  loads that module once with `row_stack` standing in for the duration of the import (it was an
  alias of `np.vstack`) and removes it again, so NumPy stays as installed.
"""
EXTRA = "pydl-kernels[numba]"

try:
    import numba  # noqa: F401
    from numba import config, cuda  # noqa: F401
except ImportError as exc:  # numba, or numba-cuda (which provides numba.cuda), is missing
    raise ImportError(
        f"the 'numba' backend needs numba and numba-cuda ({exc}): install them with "
        f"`pip install \"{EXTRA}\"`, or use backend='triton' or backend='torch'") from exc


def _register_without_row_stack() -> None:
    import importlib.util

    import numpy as np
    if hasattr(np, "row_stack") or config.ENABLE_CUDASIM:
        return          # nothing missing, or the simulator (which compiles nothing)
    if importlib.util.find_spec("numba.cuda.np.arrayobj") is None:
        return          # a numba-cuda without its own array module: nothing to load early
    np.row_stack = np.vstack
    try:
        import numba.cuda.np.arrayobj  # noqa: F401  (registers its overloads, once)
    finally:
        del np.row_stack


_register_without_row_stack()
