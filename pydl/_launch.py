"""Launch helpers shared by every op: output allocation, Numba array views, block sizing.

Kept in one place so the Triton and Numba launchers never each grow their own copy.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from . import _env

# When set (by the test suite, through `poisoned_outputs()`), every output buffer a launcher
# allocates is filled with NaN (or the integer minimum), so an element a kernel forgets to
# write fails the comparison instead of passing on whatever the allocator left there.
_POISON = False


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True) -> Iterator[None]:
    global _POISON
    old, _POISON = _POISON, enabled
    try:
        yield
    finally:
        _POISON = old


def new_output(shape, dtype: torch.dtype, device: torch.device,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """An uninitialised kernel output (NaN-filled under `poisoned_outputs`)."""
    out = torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)
    if _POISON:
        poison(out)
    return out


def poison(out: torch.Tensor) -> None:
    """Fill `out` with NaN (the integer minimum for integers): what a kernel leaves unwritten
    then fails a comparison."""
    if out.dtype.is_floating_point:
        out.fill_(float("nan"))
    elif out.dtype != torch.bool:
        out.fill_(torch.iinfo(out.dtype).min)


def output_maker(shape, dtype: torch.dtype, device: torch.device,
                 memory_format: torch.memory_format = torch.contiguous_format):
    """new_output's allocation with its arguments fixed, for a plan that allocates the same
    output every call: a callable returning a fresh uninitialised tensor (torch.empty_strided
    with the strides of `memory_format` worked out once: 0.6 us less a call than torch.empty
    with a memory format). Pass it to `fresh` for the poisoning of tests."""
    stride = torch.empty(shape, dtype=dtype, device="meta", memory_format=memory_format).stride()
    return functools.partial(torch.empty_strided, tuple(shape), stride, dtype=dtype,
                             device=device)


def fresh(make) -> torch.Tensor:
    """A new output from an `output_maker` (NaN-filled under `poisoned_outputs`)."""
    out = make()
    if _POISON:
        poison(out)
    return out


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels-last tensor (with more than one channel), else
    contiguous: outputs are allocated in the input's format, as torch does."""
    if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last) \
            and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def input_precision(dtype: torch.dtype, *, cudnn: bool = False) -> str:
    """tl.dot's input precision, rounding fp32 operands as torch rounds the op pydl replaces:
    TF32 when torch allows it - for cuDNN ops (`cudnn=True`: convolution, the RNN layers,
    whose torch versions run in cuDNN) by torch.backends.cudnn.allow_tf32 (default on), for
    matmuls (attention, plain GEMMs) by torch.backends.cuda.matmul.allow_tf32 (default off)."""
    if dtype != torch.float32:
        return "ieee"
    return "tf32" if tf32_allowed(cudnn) else "ieee"


def tf32_allowed(cudnn: bool) -> bool:
    """torch.backends.cudnn.allow_tf32 (cudnn=True) or torch.backends.cuda.matmul.allow_tf32,
    read from torch's C getters those properties wrap (0.1 us instead of 0.4-0.6): plans key
    on it every call."""
    return torch._C._get_cudnn_allow_tf32() if cudnn else torch._C._get_cublas_allow_tf32()


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def dot_block(extent: int, cap: int) -> int:
    """A block size for `extent` elements: a power of two, no larger than the extent needs nor
    than cap, and at least 16 (tl.dot's minimum)."""
    return max(16, min(next_power_of_2(extent), cap))


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --- TMA (Hopper's tensor memory accelerator) ----------------------------------------------

TMA_MAX_BOX = 256       # elements per dimension of one TMA copy


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA device; None for other devices."""
    if device.type != "cuda":
        return None
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def tma_available(device: torch.device) -> bool:
    """Whether kernels on `device` may read through tensor descriptors: a GPU of compute
    capability 9.0 or newer, or emulation (Triton's interpreter runs descriptor loads)."""
    cap = device_capability(device)
    if cap is None:
        return _env.INTERPRET
    return cap[0] >= 9


def tma_compatible(t: torch.Tensor, box_cols: int) -> bool:
    """Whether every matrix t[i, ..., :, :] over the leading dims is a TMA-addressable 2-D
    slice read in boxes `box_cols` wide: unit column stride, a 16-byte aligned base and row
    stride (and leading strides, which move the base; those of size-1 dims never do)."""
    strides = t.stride()
    if len(strides) < 2 or strides[-1] != 1 or box_cols > TMA_MAX_BOX or t.data_ptr() % 16:
        return False
    size = t.element_size()
    if strides[-2] * size % 16:
        return False
    return all(s * size % 16 == 0 for n, s in zip(t.shape[:-2], strides[:-2]) if n > 1)


def _torch_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def ensure_triton_allocator() -> None:
    """Device-side tensor descriptors (tl.make_tensor_descriptor) need global scratch at
    launch from the allocator Triton keeps per context (triton.set_allocator, a ContextVar:
    threads start without one). Installs torch's caching allocator where none is set and
    leaves a caller's own alone."""
    from triton.runtime import _allocation
    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        import triton
        triton.set_allocator(_torch_scratch)


# --- Numba ---------------------------------------------------------------------------------

def numba_threads(gpu: int) -> int:
    """Threads per block: `gpu` on a device; 32 in the CUDA simulator, where each CUDA thread
    is an OS thread and large blocks make tests crawl. Kernels must be correct for any count
    that is a power of two."""
    return 32 if _env.INTERPRET else gpu


def numba_array(t: torch.Tensor):
    """A zero-copy Numba view of a torch tensor.

    CUDA tensors go through the CUDA array interface; CPU tensors (simulator only) through
    NumPy. NumPy and the CUDA array interface have no bfloat16, so bf16 tensors are viewed as
    int16 bit patterns; kernels decode them (see kernels/numba/_dtypes.py).
    """
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    if t.device.type == "cuda":
        from numba import cuda
        return cuda.as_cuda_array(t.detach())
    # Simulator: wrap the NumPy view as a simulated device array. A plain NumPy argument would
    # be copied in and out on every launch, and strided views that are neither C- nor
    # F-contiguous would be refused.
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    _atomic_simulator_shared_arrays()
    return FakeCUDAArray(t.detach().numpy())


_SIM_SHARED_LOCK = None


def _atomic_simulator_shared_arrays() -> None:
    """Make the CUDA simulator's cuda.shared.array allocation atomic (once per process).

    The simulator gives a block's threads one array per source line, allocated on first use by
    an unlocked get-then-set on a dict; when the OS switches threads between the two, two
    threads each allocate, and part of the block then writes and reads a "shared" array the
    rest never sees (np.empty garbage reaches the results). The short GIL switch interval set
    under emulation (pydl/_env.py) makes it frequent: about one run in two of
    tests/test_lstm.py failed with 1e25 / -inf in GEMM outputs; none of 8 runs with the lock.
    The replacement is the simulator's own method (numba-cuda 0.30) with the lookup and
    insertion under one lock; dynamic shared memory (shape 0) is left to the original.
    """
    global _SIM_SHARED_LOCK
    if _SIM_SHARED_LOCK is not None:
        return
    import sys
    import threading
    import traceback

    import numpy as np
    from numba.cuda import types              # the simulator's own imports
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    lock = threading.Lock()
    original = kernelapi.FakeCUDAShared.array

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

    kernelapi.FakeCUDAShared.array = array
    _SIM_SHARED_LOCK = lock


_NUMBA_STREAMS: dict = {}


def stream_handle(device: torch.device) -> int:
    """The raw handle of torch's current stream on a CUDA `device`: the value of
    torch.cuda.current_stream(device).cuda_stream without building a Stream object (a
    per-call cost of the launches that look their stream up: several microseconds of a GPU
    machine's host time)."""
    index = device.index
    return torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice() if index is None
                                              else index)


def numba_stream(device: torch.device):
    """Numba stream wrapping torch's current stream, so Numba kernels order with torch's work
    (one wrapper per stream handle, made once)."""
    if device.type != "cuda":
        return 0
    handle = stream_handle(device)
    stream = _NUMBA_STREAMS.get(handle)
    if stream is None:
        from numba import cuda
        stream = _NUMBA_STREAMS[handle] = cuda.external_stream(handle)
    return stream


# The CUDA simulator starts a block in tens of milliseconds and runs each thread as an OS
# thread: under emulation 1-D launches get at most this many blocks, and the kernels'
# grid-stride loops let those threads cover every element. On a GPU the grid covers every
# element, so each thread does exactly one.
SIM_MAX_BLOCKS = 1


def numba_blocks(blocks: int) -> int:
    """Blocks of a grid-stride Numba launch: all of them on a GPU, SIM_MAX_BLOCKS simulated."""
    blocks = max(1, blocks)
    return min(blocks, SIM_MAX_BLOCKS) if _env.INTERPRET else blocks


def launch_numba(kernel, grid, threads, device: torch.device, *args) -> None:
    """The one way pydl launches a Numba kernel: `grid` blocks of `threads` (ints or tuples)
    on torch's current stream; tensor arguments become zero-copy Numba arrays (numba_array),
    the others pass as they are."""
    numba_launcher(kernel, grid, threads, device)(
        *[numba_array(a) if isinstance(a, torch.Tensor) else a for a in args])


def numba_launcher(kernel, grid, threads, device: torch.device):
    """launch_numba's kernel configured once, for a plan that launches it several times in a
    call (a recurrence step by step): call it with Numba arrays (numba_array) and scalars."""
    return kernel[grid, threads, numba_stream(device)]


def launch_numba_1d(kernel, n_elements: int, device: torch.device, *args, threads: int = 256) -> None:
    """launch_numba for a grid-stride kernel over `n_elements`: one thread per element on a
    GPU, SIM_MAX_BLOCKS blocks in the simulator."""
    threads = numba_threads(threads)
    launch_numba(kernel, numba_blocks(cdiv(n_elements, threads)), threads, device, *args)


# --- arrival counters (a last-arriving program reduces what the others left) ----------------

_ARRIVALS: dict = {}


def arrival_counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n int32 counters, all zero, for a kernel whose programs count their arrival
    on shared counters: the last to arrive reduces the others' partial results (conv2d's
    split-K weight gradient, cross-entropy's sum), or all meet at a grid barrier (the
    persistent recurrences). Every such kernel resets the counters it used to zero before it
    exits, so one buffer per device and stream serves every launch on that stream, one after
    another in stream order, with no memset per call. A launch that fails to start never
    touches them; a kernel that dies mid-run leaves the CUDA context unusable, so stale
    counters are never read. Another stream gets its own buffer (two streams' launches may
    overlap). Inside a CUDA graph capture each call takes a fresh buffer, zeroed by a captured
    memset and kept by the graph alone, so a graph's replays (on any stream) never share
    counters with work outside it."""
    if device.type == "cuda":
        if torch._C._cuda_isCurrentStreamCapturing():
            return torch.zeros(max(n, 2), dtype=torch.int32, device=device)
        key = (device, stream_handle(device))
    else:
        key = (device, 0)       # emulation: programs run one after another
    buf = _ARRIVALS.get(key)
    if buf is None or buf.numel() < n:
        buf = _ARRIVALS[key] = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
    return buf
