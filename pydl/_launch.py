"""Launch helpers shared by every op, whichever backend launches it: output allocation (NaN
poisoning under the tests), block sizing, tl.dot's input precision, Hopper's TMA checks, the
raw handle of torch's current stream, a plan built once per signature of its arguments, and
the arrival counters of kernels whose last program reduces what the others left. How a Numba
kernel is launched (`launch_numba`, its direct path, NumbaLaunch) is pydl/_numba_launch.py.

Kept in one place so the Triton and Numba launchers never each grow their own copy.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch

from . import _env
from ._plan import Cache, capturing

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
                 memory_format: torch.memory_format = torch.contiguous_format,
                 stride: tuple | None = None):
    """new_output's allocation with its arguments fixed, for a plan that allocates the same
    output every call: a callable returning a fresh uninitialised tensor (torch.empty_strided
    with the strides of `memory_format` worked out once: 0.6 us less a call than torch.empty
    with a memory format). `stride`, when given, instead (a 0 makes the elements along that
    axis one). Pass it to `fresh` for the poisoning of tests."""
    if stride is None:
        stride = torch.empty(shape, dtype=dtype, device="meta",
                             memory_format=memory_format).stride()
    return functools.partial(torch.empty_strided, tuple(shape), stride, dtype=dtype,
                             device=device)


def image_view(t):
    """A 1-d op's (N, C, L) tensor as the 1 x L image the 2-d kernels take (a view): conv1d's
    and the 1-d pools' plans plan their launches on it, then give the launches the 1-d tensors
    by pointer. Anything else (a bias, an already 4-d tensor, None, a geometry) as it is."""
    return t.unsqueeze(-2) if isinstance(t, torch.Tensor) and t.dim() == 3 else t


def signal_maker(make):
    """An output_maker of a 1 x L image's tensor, making it in its 1-d form instead: the same
    strides without the unit axis's. Not a view, so the caller may write it in place (a view
    made inside a custom Function refuses in-place use)."""
    shape, stride = make.args
    return functools.partial(torch.empty_strided, shape[:2] + shape[3:], stride[:2] + stride[3:],
                             **make.keywords)


def fresh(make) -> torch.Tensor:
    """A new output from an `output_maker` (NaN-filled under `poisoned_outputs`)."""
    out = make()
    if _POISON:
        poison(out)
    return out


class WriteOnly:
    """A buffer a kernel must write and nothing reads: what only a backward would read (a
    recurrent cell's gate activations and fp32 cell state, attention's log-sum-exp) on a call
    that records no autograd graph. Made once from an `output_maker` and handed to every such
    call of one plan, so that the call allocates nothing for it. Only for what the launch
    itself never reads back (a workspace it reads stays per call). Calls on other streams may
    write it at once: harmless, as nothing reads it. It is never an inference tensor (a
    kernel's emulation writes it in place whatever the mode); one made while a CUDA graph is
    captured is not kept (an allocation then belongs to the graph's memory pool)."""

    __slots__ = ("make", "buffer")

    def __init__(self, make):
        self.make, self.buffer = make, None

    def __call__(self) -> torch.Tensor:
        buffer = self.buffer
        if buffer is None:
            with torch.inference_mode(False):       # usable outside inference mode too
                buffer = fresh(self.make)
            if not capturing():
                self.buffer = buffer
        return buffer


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


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The multiprocessors a grid is sized for where there is no GPU to ask (emulation, the
# offline compile report): an H100's and H200's.
TARGET_SMS = 132


def multiprocessors(device: torch.device) -> int:
    """The streaming multiprocessors of a CUDA device (the size of a persistent grid);
    TARGET_SMS for other devices."""
    if device.type != "cuda":
        return TARGET_SMS
    return _multiprocessors(device.index if device.index is not None
                            else torch.cuda.current_device())


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


def descriptor_strides(t: torch.Tensor) -> tuple[int, ...] | None:
    """t's strides for a TMA descriptor over all its dims (a kernel that indexes the batch
    and head in the descriptor, not by moving its base): a size-1 dim's stride, which no
    index multiplies and torch leaves arbitrary, replaced by the extent of the dims inside it
    (as a TMA stride must be, a multiple of 16 bytes where the rows' is); None where a dim of
    several entries has stride 0 (an expanded tensor), which a descriptor cannot express.
    For a `tma_compatible` t."""
    strides = list(t.stride())
    for i in range(len(strides) - 2, -1, -1):
        if t.shape[i] == 1:
            strides[i] = t.shape[i + 1] * strides[i + 1]
        elif strides[i] == 0:
            return None
    return tuple(strides)


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


# --- the current stream; a plan built once per signature -----------------------------------

def stream_handle(device: torch.device) -> int:
    """The raw handle of torch's current stream on a CUDA `device`: the value of
    torch.cuda.current_stream(device).cuda_stream without building a Stream object (a
    per-call cost of the launches that look their stream up: several microseconds of a GPU
    machine's host time)."""
    index = device.index
    return torch._C._cuda_getCurrentRawStream(torch._C._cuda_getDevice() if index is None
                                              else index)


def planned_once(plan):
    """A Numba launcher's plan_<step> built once per signature of its arguments (tensors by
    dtype, shape, strides and device, the rest as they are) and kept (pydl._plan.Cache): the
    kernel ops, which launch a step once per call, then launch its plan as the eager plans
    do. A plan's places follow from those alone (a NumbaLaunch's tensors are views of its
    sources at offsets their shapes and strides fix). Keyword arguments (options) are part of
    the key as they are. Unhashable arguments: built per call."""
    cache = Cache(f"numba {plan.__qualname__}")

    @functools.wraps(plan)
    def cached(*args, **options):
        build = functools.partial(plan, **options) if options else plan
        try:
            key = tuple((a.dtype, a.shape, a.stride(), a.device)
                        if isinstance(a, torch.Tensor) else a for a in args)
            if options:
                key += tuple(sorted(options.items()))
            return cache.get(key, build, *args)
        except TypeError:
            return build(*args)
    return cached


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
