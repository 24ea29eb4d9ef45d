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
- In the CUDA simulator (emulation), where a block's threads are OS threads, two fixes to
  numba-cuda's simulator (0.30), made once when this package loads:
  - `_barriers_by_notification`: its block manager found the threads waiting at a barrier by
    polling them in a loop that holds the GIL, which took about half the CPU from blocks of
    one or a few threads (most of pydl's simulated launches) and made every barrier wait for
    a thread switch. Each thread now wakes the manager when it reaches a barrier or ends
    (the Numba pool tests ran 4x faster, the tensor-core attention and GEMM tests 2.5-3x).
  - `_atomic_shared_arrays`: a block's `cuda.shared.array` allocation was an unlocked
    get-then-set, so two threads could each allocate one and part of the block then wrote a
    "shared" array the rest never saw (1e25 / -inf in GEMM outputs, about one run in two of
    tests/test_lstm.py while emulation shortened the thread switch interval).
  Neither changes what a kernel computes: barriers, errors and shared arrays as numba's.
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


def _params(fn) -> list:
    import inspect
    return list(inspect.signature(fn).parameters)


def _barriers_by_notification() -> None:
    """The simulator's BlockManager.run, waiting on a condition variable instead of polling."""
    import threading

    import numpy as np
    from numba.cuda.simulator import kernel as sim

    if getattr(sim.BlockManager.run, "notified", False) or \
            _params(sim.BlockThread.__init__) != ["self", "f", "manager", "blockIdx", "threadIdx",
                                                   "debug"] or \
            _params(sim.BlockManager.__init__) != ["self", "f", "grid_dim", "block_dim", "debug"]:
        return                      # another simulator: leave it as it is

    class Thread(sim.BlockThread):
        """A simulated CUDA thread that tells its block when it reaches a barrier or ends
        (`syncthreads_blocked`, `syncthreads_event`, `exception` and `abort` as numba's)."""

        def __init__(self, cv, *args):
            super().__init__(*args)
            self.cv, self.done = cv, False

        def run(self):
            try:
                super().run()           # stores an exception in self.exception
            finally:
                with self.cv:
                    self.done = True
                    self.cv.notify()

        def syncthreads(self):
            if self.abort:
                raise RuntimeError("abort flag set on syncthreads call")
            with self.cv:
                self.syncthreads_blocked = True
                self.cv.notify()
            self.syncthreads_event.wait()
            self.syncthreads_event.clear()
            if self.abort:
                raise RuntimeError("abort flag set on syncthreads clear")

    def run(manager, grid_point, *args):
        """Runs one block: releases the barrier when every live thread waits at it; the first
        thread's error aborts the others and is raised."""
        cv = threading.Condition()
        threads = [Thread(cv, lambda: manager._f(*args), manager, grid_point, point,
                          manager._debug) for point in np.ndindex(*manager._block_dim)]
        with cv:
            for t in threads:
                t.start()
            while True:
                failed = next((t for t in threads if t.exception), None)
                if failed is not None:
                    for t in threads:
                        t.abort, t.syncthreads_blocked = True, False
                        t.syncthreads_event.set()
                    raise failed.exception[0].with_traceback(failed.exception[1])
                live = [t for t in threads if not t.done]
                if not live:
                    return
                if all(t.syncthreads_blocked for t in live):
                    for t in live:
                        t.syncthreads_blocked = False
                        t.syncthreads_event.set()
                else:
                    cv.wait()

    run.notified = True
    sim.BlockManager.run = run


def _atomic_shared_arrays() -> None:
    """The simulator's cuda.shared.array (numba-cuda 0.30) with its lookup and insertion under
    one lock. A block's threads get one array per source line, allocated on first use;
    dynamic shared memory (shape 0) and aligned arrays are left to the original."""
    import sys
    import threading
    import traceback

    import numpy as np
    from numba.cuda import types  # the simulator's own imports
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    original = kernelapi.FakeCUDAShared.array
    if getattr(original, "locked", False):
        return
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:
            return original(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = traceback.extract_stack(sys._getframe())[-2][0:2]  # keyed by source line
        with lock:
            res = self._allocations.get(caller)
            if res is None:
                res = self._allocations[caller] = np.empty(shape, dtype)
        return res

    array.locked = True
    kernelapi.FakeCUDAShared.array = array


if config.ENABLE_CUDASIM:
    _barriers_by_notification()
    _atomic_shared_arrays()
