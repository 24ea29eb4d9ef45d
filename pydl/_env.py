"""Emulation switch, read once, before triton or numba is imported anywhere in pydl.

PYDL_INTERPRET=1 runs every kernel on CPU tensors: it sets TRITON_INTERPRET=1 (Triton's
interpreter, read when `@triton.jit` decorates a kernel) and NUMBA_ENABLE_CUDASIM=1 (Numba's
CUDA simulator, read when `numba.cuda` is first imported). This module is the only place in
the project that sets either variable.

Emulation changes nothing else in the process: what the emulated kernels need of the
interpreter (NumPy's floating-point errors silenced) holds only while a pydl kernel runs
(`emulated_launch`, applied to every kernel op by pydl._library.kernel_op).
"""
import functools
import os
import sys
import warnings

import numpy as np

_TRUE = {"1", "true", "yes", "on"}


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


INTERPRET: bool = _flag("PYDL_INTERPRET")

if INTERPRET:
    if "numba.cuda" in sys.modules and not _flag("NUMBA_ENABLE_CUDASIM"):
        warnings.warn("numba.cuda was imported before pydl with PYDL_INTERPRET=1, so the Numba "
                      "backend cannot use the CUDA simulator: import pydl first", stacklevel=1)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba.core.config" in sys.modules and "numba.cuda" not in sys.modules:
        # numba read its configuration already (some tool imported numba); read it again
        sys.modules["numba.core.config"].reload_config()


# On a GPU, a kernel launched before with arguments of the same kind is launched again with
# the argument list kept from that launch, skipping the launcher's own per-call work (Triton:
# pydl._plan.Launch; Numba: pydl._numba_launch.launch_numba). PYDL_DIRECT_LAUNCH=0 keeps every
# launch on Triton's and Numba's own paths.
DIRECT_LAUNCH: bool = os.environ.get("PYDL_DIRECT_LAUNCH", "1").strip() != "0"


class _EmulatedLaunch:
    """What an emulated kernel needs of the process, for as long as it runs: NumPy's
    floating-point errors ignored in this thread (np.errstate is thread-local). Triton's
    interpreter evaluates masked-off lanes too (-inf - -inf, log(0)); the kernels discard
    those lanes, so NumPy's RuntimeWarnings about them are noise to a user, and a user's
    np.seterr(all="raise") would otherwise break the kernel."""

    __slots__ = ("_errstate",)

    def __enter__(self):
        self._errstate = np.errstate(all="ignore")
        self._errstate.__enter__()
        return self

    def __exit__(self, *exc):
        self._errstate.__exit__(*exc)
        return False


# `python -m bench overhead` turns this off while it measures the host path with the kernels
# stubbed: the state above exists for the interpreter alone, not on a GPU.
SCOPE_EMULATION = True

# Checks of pydl's own plans that emulation (where the tests run) affords and a GPU's host
# path does not (pydl/rnn.py Plans: a named launch called with the layouts it was built for);
# `python -m bench overhead` turns them off too while it measures.
CHECK_PLANS: bool = INTERPRET


def emulated_launch(fn):
    """`fn` (a function that launches kernels) run inside _EmulatedLaunch."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not SCOPE_EMULATION:
            return fn(*args, **kwargs)
        with _EmulatedLaunch():
            return fn(*args, **kwargs)
    return run
