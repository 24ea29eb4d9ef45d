"""Emulation switch, read once, before triton or numba is imported anywhere in pydl.

PYDL_INTERPRET=1 runs every kernel on CPU tensors: it sets TRITON_INTERPRET=1 (Triton's
interpreter, read when `@triton.jit` decorates a kernel) and NUMBA_ENABLE_CUDASIM=1 (Numba's
CUDA simulator, read when `numba.cuda` is first imported). This module is the only place in
the project that sets either variable.
"""
import os
import sys
import warnings

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


INTERPRET: bool = _flag("PYDL_INTERPRET")

if INTERPRET:
    if "numba.cuda" in sys.modules and not _flag("NUMBA_ENABLE_CUDASIM"):
        warnings.warn("numba.cuda was imported before pydl with PYDL_INTERPRET=1, so the Numba "
                      "backend cannot use the CUDA simulator: import pydl first")
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    # The CUDA simulator runs each CUDA thread as an OS thread, released from a syncthreads by
    # a busy-polling manager thread; with Python's default 5 ms switch interval every barrier
    # costs milliseconds. 0.1 ms makes barrier-heavy simulated kernels several times faster.
    sys.setswitchinterval(1e-4)
    if "numba.core.config" in sys.modules and "numba.cuda" not in sys.modules:
        # numba read its configuration already (some tool imported numba); read it again
        sys.modules["numba.core.config"].reload_config()
