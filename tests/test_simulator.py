"""The fixes pydl makes to the emulators. numba-cuda's CUDA simulator (kernels/numba/__init__.py):
a block manager woken by its threads at each barrier instead of polling them, and an atomic
`cuda.shared.array`; barriers must still hold every thread of a block until the last one
arrives (threads that run ahead are delayed on purpose here), a thread's error must reach the
caller without leaving the block waiting. Triton's interpreter (kernels/triton/__init__.py):
its builtins found by name, patching exactly what its own search patches."""
import time

import numpy as np
import pytest
from conftest import HAS_CUDA

import pydl.kernels.numba  # noqa: F401  (applies the fixes)
import pydl.kernels.triton  # noqa: F401

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="the CUDA simulator's behaviour")

from numba import cuda  # noqa: E402

THREADS, ROUNDS = 8, 5


@cuda.jit
def _rounds(out, delays):
    """Each round every thread writes its slot, waits at the barrier, and records what the
    others wrote: a barrier released early shows a stale value. Thread i sleeps delays[i]
    first, so the threads arrive in a different order each round."""
    buf = cuda.shared.array(THREADS, np.int64)
    i = cuda.threadIdx.x
    for r in range(ROUNDS):
        time.sleep(delays[r, i])
        buf[i] = r * 100 + i
        cuda.syncthreads()
        for j in range(THREADS):
            out[r, i, j] = buf[j]
        cuda.syncthreads()


@cuda.jit
def _early_exit(out):
    """Odd threads end before the barrier; the even ones must still be released from it."""
    i = cuda.threadIdx.x
    if i % 2:
        return
    cuda.syncthreads()
    out[i] = 1


@cuda.jit
def _fails(out):
    i = cuda.threadIdx.x
    if i == 3:
        raise ValueError("thread three fails")
    cuda.syncthreads()          # the others wait here: the error must release them
    out[i] = 1


def test_barriers_hold_every_thread_until_the_last_arrives():
    rng = np.random.default_rng(0)
    delays = rng.choice([0.0, 0.002, 0.005], size=(ROUNDS, THREADS))
    out = np.full((ROUNDS, THREADS, THREADS), -1, np.int64)
    _rounds[2, THREADS](out, delays)
    want = np.arange(ROUNDS)[:, None, None] * 100 + np.arange(THREADS)[None, None, :]
    np.testing.assert_array_equal(out, np.broadcast_to(want, out.shape))


def test_a_barrier_releases_the_threads_still_running():
    out = np.zeros(THREADS, np.int64)
    _early_exit[1, THREADS](out)
    np.testing.assert_array_equal(out, np.arange(THREADS) % 2 == 0)


def test_a_thread_error_reaches_the_caller_with_its_thread():
    out = np.zeros(THREADS, np.int64)
    with pytest.raises(ValueError, match=r"tid=\[3, 0, 0\].*thread three fails"):
        _fails[1, THREADS](out)


def test_the_fixes_are_in_place():
    from numba.cuda.simulator import kernel, kernelapi
    assert getattr(kernel.BlockManager.run, "notified", False)
    assert getattr(kernelapi.FakeCUDAShared.array, "locked", False)


def test_triton_interpreter_patches_the_builtins_its_own_search_finds():
    import triton.language as tl
    from triton.runtime import interpreter
    ours = interpreter._patch_builtin
    assert getattr(ours, "by_name", False)
    for pkg in (tl, tl.math, tl.tensor, tl.core, tl.core.tensor_descriptor_base):
        patched = []
        for patch in (ours, ours.original):
            outer, inner = interpreter._LangPatchScope(), interpreter._LangPatchScope()
            patch(pkg, None, outer)
            patch(pkg, None, inner)         # a helper's call inside the launch: nothing left
            patched.append(([n for _, n, _ in outer._changes], inner._changes))
            outer.restore()
        assert patched[0] == patched[1] and patched[0][0] and not patched[0][1], pkg
