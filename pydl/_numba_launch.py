"""The one way pydl launches a Numba kernel: `launch_numba` (torch tensors as zero-copy Numba
arrays, on torch's current stream; the block and thread counts the CUDA simulator can run) and
its plan, NumbaLaunch (a launch planned once, replayed on each call's tensors).

On a GPU, launches whose argument signature (each tensor's dtype, shape and strides, each
scalar's type) was launched before take the direct path: the parameter list Numba made for the
signature's first launch, kept, with only the data pointers and scalar values refilled, which
skips Numba's per-call array conversion, typing and argument marshalling. PYDL_DIRECT_LAUNCH=0
turns it off. The helpers both backends use are pydl/_launch.py's.
"""
from __future__ import annotations

import ctypes

import numpy as np
import torch

from . import _env
from ._launch import cdiv, stream_handle


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
    t = numba_view(t)
    if t.device.type == "cuda":
        from numba import cuda
        return cuda.as_cuda_array(t)
    # Simulator: wrap the NumPy view as a simulated device array. A plain NumPy argument would
    # be copied in and out on every launch, and strided views that are neither C- nor
    # F-contiguous would be refused.
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    return FakeCUDAArray(t.numpy())


def numba_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose memory a Numba array of t describes: t detached, bf16 as int16."""
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).detach()


_NUMBA_STREAMS: dict = {}


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
    on torch's current stream. Arguments are torch tensors (passed as zero-copy Numba arrays;
    bf16 as int16 bit patterns, see numba_array) and scalars. On a GPU a call whose argument
    signature was launched before takes the direct path (_NumbaDirect); the first goes through
    Numba's own dispatch."""
    if NUMBA_DIRECT and (device.type == "cuda" or _NUMBA_DIRECT_ON_CPU):
        _launch_numba_direct(kernel, grid, threads, device, args)
        return
    kernel[grid, threads, numba_stream(device)](
        *[numba_array(a) if isinstance(a, torch.Tensor) else a for a in args])


def launch_numba_built(launch: tuple) -> None:
    """launch_numba on a launch as a Numba launcher's builder returns it, (kernel, grid,
    threads, device, arguments, ...): what a NumbaLaunch is made from, launched once."""
    kernel, grid, threads, device, args = launch[:5]
    launch_numba(kernel, grid, threads, device, *args)


# --- Numba: the direct launch ------------------------------------------------------------------
# Numba launches a kernel called with torch tensors in three costly steps every call: each
# tensor becomes a DeviceNDArray (torch's __cuda_array_interface__, a driver pointer, a
# MemoryPointer; numba-cuda issue #98 measures it at several times the launch itself), the
# call is typed and dispatched to a compiled overload, and each argument is marshalled into the
# overload's parameter list (_Kernel._prepare_args). A call whose argument signature (each
# tensor's dtype, shape and strides, each scalar's type) was launched before differs from that
# launch only in its tensors' data pointers and its scalars' values, so the direct path keeps
# the parameter list Numba made the first time and refills those: the same overload, the same
# list, the same cuda.core launch Numba makes. PYDL_DIRECT_LAUNCH=0 turns it off, with
# Triton's.
NUMBA_DIRECT = _env.DIRECT_LAUNCH
# `python -m bench overhead` measures the direct path on a CPU (its stand-in runtime).
_NUMBA_DIRECT_ON_CPU = False
_NUMBA_DIRECTS: dict = {}           # (kernel, device, signature) -> _NumbaDirect or None
_NUMBA_DIRECT_MAX = 4096
# Why a first launch was left on Numba's path (the first few; tests print them).
NUMBA_NOT_DIRECT: list = []


class _NotDirect(Exception):
    """A first launch whose parameter list the direct path cannot refill (a kind of argument
    it does not know, a Numba debug or extension launch): that signature keeps Numba's path."""


def _numba_signature(args) -> tuple:
    """What decides a Numba launch's overload and its parameter list but the data pointers and
    scalar values: each tensor's dtype, shape and strides (its Numba type and array fields
    follow from them), each other argument's type."""
    return tuple([(a.dtype, a.shape, a.stride()) if isinstance(a, torch.Tensor) else type(a)
                  for a in args])


def _launch_numba_direct(kernel, grid, threads, device, args) -> None:
    runtime = _NUMBA_RUNTIME
    index = runtime.device_index(device)
    key = (kernel, index, _numba_signature(args))
    direct = _NUMBA_DIRECTS.get(key, False)
    if direct:
        try:
            if direct(runtime, grid, threads, device, args):
                return
        except Exception as exc:
            if direct.launched:         # the launch's own error, not the direct path's
                raise
            # the first direct launch of a signature failed before launching (an argument
            # list cuda.core refuses): Numba's path from now on, this call included
            _NUMBA_DIRECTS[key] = None
            _not_direct(kernel, exc)
    overload, arrays, stream = runtime.first_launch(kernel, grid, threads, device, args)
    if direct is not False:             # a known signature whose scalar would not fit
        return
    try:
        if overload is None:
            raise _NotDirect("Numba's launch reported no overload")
        direct = _NumbaDirect(overload, args, arrays, stream, runtime.kernel(overload, index))
    except Exception as exc:    # anything this Numba does otherwise: its own path, still right
        direct = None
        _not_direct(kernel, exc)
    if len(_NUMBA_DIRECTS) >= _NUMBA_DIRECT_MAX:
        _NUMBA_DIRECTS.clear()
    _NUMBA_DIRECTS[key] = direct


def _not_direct(kernel, exc: Exception) -> None:
    if len(NUMBA_NOT_DIRECT) < 16:
        NUMBA_NOT_DIRECT.append(f"{getattr(kernel, '__name__', kernel)}: {exc!r}")


_ARRAY_FIELDS = 5   # meminfo, parent, size, itemsize, data; then shape and strides (ndim each)
_DATA_FIELD = 4


class _NumbaDirect:
    """A Numba overload's launch for one argument signature: the parameter list Numba's
    _prepare_args made for the first launch, with the places each call fills (the tensors'
    data pointers, the scalars) and how (the ctypes type Numba made of the scalar). Integer
    scalars are checked to fit the type Numba gave the first call's value (a Python int past
    int64 types otherwise): one that does not goes through Numba, which types it anew."""

    __slots__ = ("kernel", "template", "pointers", "scalars", "cooperative", "configs",
                 "launched")

    def __init__(self, overload, args, arrays, stream, kernel):
        if getattr(overload, "extensions", None) or getattr(overload, "debug", False):
            raise _NotDirect("an extension or debug launch")
        template, written_back = [], []
        for ty, value in zip(overload.argument_types, arrays):
            overload._prepare_args(ty, value, stream, written_back, template)
        if written_back or len(overload.argument_types) != len(args):
            raise _NotDirect("arguments copied to the device or not one type each")
        pointers, scalars, at = [], [], 0
        for i, (ty, a) in enumerate(zip(overload.argument_types, args)):
            if isinstance(a, torch.Tensor):
                ndim = getattr(ty, "ndim", None)
                if ndim is None or ndim != a.dim():
                    raise _NotDirect(f"argument {i}: a tensor typed {ty}")
                if a.numel():           # an empty tensor's pointer is Numba's 0 every call
                    pointers.append((at + _DATA_FIELD, i))
                at += _ARRAY_FIELDS + 2 * ndim
            else:
                value = template[at]
                if isinstance(value, (bool, np.bool_)):
                    scalars.append((at, i, None, False))
                elif isinstance(value, (ctypes.c_float, ctypes.c_double)):
                    scalars.append((at, i, type(value), False))
                elif isinstance(value, _CTYPES_INTS):
                    scalars.append((at, i, type(value), True))
                else:
                    raise _NotDirect(f"argument {i}: {ty} marshalled as {value!r}")
                at += 1
        if at != len(template):
            raise _NotDirect(f"{len(template)} parameters, {at} placed")
        self.template, self.pointers = tuple(template), tuple(pointers)
        self.scalars = tuple(scalars)
        self.kernel, self.cooperative, self.configs = kernel, overload.cooperative, {}
        self.launched = False           # by this path, once at least
        if _numba_params(self.fill(args)) != _numba_params(template):
            raise _NotDirect("the first call refilled is not the list Numba made")

    def fill(self, args) -> list | None:
        """The parameter list of a call with this signature; None where an integer scalar does
        not fit the type the first call's got."""
        params = list(self.template)
        for at, i in self.pointers:
            params[at] = args[i].data_ptr()
        if not self.refill(params, self.scalars, [args[i] for _, i, _, _ in self.scalars], 0):
            return None
        return params

    def refill(self, params: list, slots, values, first: int) -> bool:
        """The scalars of `slots` (entries of self.scalars, of arguments first, first + 1,
        ...) refilled in params from `values`; False where an integer does not fit."""
        for (at, i, make, exact), a in zip(slots, values):
            if i < first:
                return False
            if make is None:
                params[at] = a
                continue
            c = make(a)
            if exact and c.value != a:
                return False
            params[at] = c
        return True

    def __call__(self, runtime, grid, threads, device, args) -> bool:
        params = self.fill(args)
        if params is None:
            return False
        self.launch(runtime, grid, threads, device, params)
        return True

    def launch(self, runtime, grid, threads, device, params: list) -> None:
        config = self.configs.get((grid, threads))
        if config is None:
            config = self.configs[(grid, threads)] = runtime.config(grid, threads,
                                                                    self.cooperative)
        runtime.launch(runtime.stream(device), config, self.kernel, params)
        self.launched = True


_CTYPES_INTS = (ctypes.c_int8, ctypes.c_int16, ctypes.c_int32, ctypes.c_int64, ctypes.c_uint8,
                ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64)


def _numba_params(params) -> list:
    """A parameter list as comparable values: (ctypes type, value) for a ctypes scalar."""
    return [(type(p), p.value) if isinstance(p, ctypes._SimpleCData) else (type(p), p)
            for p in params]


class _NumbaRuntime:
    """What the direct path needs of Numba and cuda.core on a GPU (numba-cuda 0.30: the
    overload a launch ran, its parameter list, the cuda.core launch). `python -m bench
    overhead` puts a stand-in in its place to measure the direct path on a CPU."""

    @staticmethod
    def device_index(device: torch.device) -> int:
        return torch._C._cuda_getDevice() if device.index is None else device.index

    @staticmethod
    def first_launch(kernel, grid, threads, device, args):
        """Launch through Numba; returns (the overload it launched, the Numba arrays of the
        call's tensors, the stream its launch configuration holds)."""
        arrays = [numba_array(a) if isinstance(a, torch.Tensor) else a for a in args]
        configured = kernel[grid, threads, numba_stream(device)]
        launched = []
        configured.pre_launch_callbacks.append(lambda overload, _: launched.append(overload))
        configured(*arrays)
        return launched[0] if len(launched) == 1 else None, arrays, configured.stream

    @staticmethod
    def kernel(overload, index: int):
        """The overload's cuda.core kernel on the current device (Numba loads it per device
        on its first launch there)."""
        return overload._codelibrary.get_cufunc().kernel

    @staticmethod
    def config(grid, threads, cooperative: bool):
        from numba.cuda import dispatcher
        from numba.cuda.errors import normalize_kernel_dimensions
        grid, threads = normalize_kernel_dimensions(grid, threads)
        if dispatcher.CUDA_CORE_GE_1_0:
            return dispatcher.LaunchConfig(grid=grid, block=threads, shmem_size=0,
                                           is_cooperative=cooperative)
        return dispatcher.LaunchConfig(grid=grid, block=threads, shmem_size=0,
                                       cooperative_launch=cooperative)

    @staticmethod
    def stream(device: torch.device):
        """torch's current stream as the cuda.core stream Numba launches on (made once)."""
        handle = stream_handle(device)
        stream = _CORE_STREAMS.get(handle)
        if stream is None:
            from numba.cuda.cudadrv import driver
            stream = _CORE_STREAMS[handle] = driver._to_core_stream(numba_stream(device))
        return stream

    @staticmethod
    def launch(stream, config, kernel, params) -> None:
        from numba.cuda import dispatcher
        dispatcher.launch(stream, config, kernel, *params)


_CORE_STREAMS: dict = {}
_NUMBA_RUNTIME = _NumbaRuntime()


class _Dynamic:
    def __repr__(self):
        return "DYNAMIC"


# A NumbaLaunch argument given per call (`dynamic=`): a scalar that changes between calls.
DYNAMIC = _Dynamic()


class NumbaLaunch:
    """One Numba kernel launch planned once (pydl._plan.Launch's counterpart on the Numba
    backend): the kernel, grid, threads, device and scalars fixed, and each tensor argument a
    place in one of the tensors a call passes (its `sources`): the same byte offset from that
    tensor's data, the same dtype, shape and strides. Built from the launch's arguments as
    launch_numba takes them (tensors and scalars in the kernel's order) for the call's
    tensors `sources`, and `places`: for each tensor argument in order, the index of the
    source it lies in (a view of it), or None for a tensor the plan keeps for good (a
    placeholder it made once); by default the i-th tensor argument lies in the i-th source.
    The places are given, not guessed from storage: two sources may share a storage in the
    planning call and not in the next (a backward given its own output as the gradient). A
    tensor argument outside its source's storage is refused (ValueError). As with Launch, a
    call may pass any tensor at the address of the one planned (x for its view x3); the plan's
    key fixes their dtypes, shapes and strides, and which of them are the same tensor where
    the launch depends on it.

    Scalars that change between calls (a recurrence's step range, a dropout seed) are planned
    as DYNAMIC and given per call in their order: `launch(*sources, dynamic=(...))`.
    On a GPU, once the direct path (_NumbaDirect) has launched the planned signature, a call
    copies its parameter list and writes the data pointers (source + offset) and the dynamic
    scalars into it: no views, no signature, no lookup. Until then, and in the CUDA
    simulator, the arguments are rebuilt from the sources' storage at the planned offsets
    and go through launch_numba, so emulation runs the planned offsets too."""

    __slots__ = ("kernel", "grid", "threads", "device", "args", "direct", "direct_index",
                 "params", "slots", "tail", "kinds")

    def __init__(self, kernel, grid, threads, device: torch.device, args: tuple,
                 sources: tuple, places: tuple | None = None):
        self.kernel, self.grid, self.threads, self.device = kernel, grid, threads, device
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        if places is None:
            places = range(len(tensors))
        elif len(places) != len(tensors):
            raise ValueError(f"NumbaLaunch: {len(places)} places for {len(tensors)} tensors")
        planned = list(args)
        for i, k in zip(tensors, places):
            if k is not None:
                planned[i] = Place(k, args[i], sources[k], i)
        self.args = tuple(planned)
        self.direct = self.params = None

    def arguments(self, sources, dynamic: tuple = ()) -> list:
        """The launch's arguments for a call's tensors and dynamic scalars: each place's view
        of its source, the kept tensors and the fixed scalars, each DYNAMIC the next of
        `dynamic`."""
        values = iter(dynamic)
        out = [a.view(sources[a.source]) if type(a) is Place else
               next(values, DYNAMIC) if a is DYNAMIC else a for a in self.args]
        if next(values, DYNAMIC) is not DYNAMIC or any(a is DYNAMIC for a in out):
            raise ValueError(f"NumbaLaunch: {len(dynamic)} dynamic scalars for "
                             f"{sum(a is DYNAMIC for a in self.args)} places")
        return out

    def __call__(self, *sources, dynamic: tuple = ()) -> None:
        params = self.params
        if params is not None and NUMBA_DIRECT:
            params = self._fill(params, sources, dynamic)
            if params is not None:
                self.direct.launch(_NUMBA_RUNTIME, self.grid, self.threads, self.device, params)
                return
        args = self.arguments(sources, dynamic)
        launch_numba(self.kernel, self.grid, self.threads, self.device, *args)
        if self.params is None and NUMBA_DIRECT and (self.device.type == "cuda"
                                                     or _NUMBA_DIRECT_ON_CPU):
            self._keep(args)

    def each(self, sources, tails: list) -> None:
        """launch(*sources, dynamic=tail) for each tail (tuples of scalars of the same types):
        one plan launched again and again with its DYNAMIC scalars changing (a recurrence step
        by step). On the direct path the pointers are written once and only the tails
        refilled."""
        if not tails:
            return
        params = None       # the pointers written once; each step refills its tail in place
        if NUMBA_DIRECT and self.params is not None:
            params = self._fill(self.params, sources, ())
        for k, tail in enumerate(tails):
            if params is None or tuple(map(type, tail)) != self.kinds \
                    or not self.direct.refill(params, self.tail, tail, 0):
                self(*sources, dynamic=tail)
                if params is None and NUMBA_DIRECT and self.params is not None \
                        and k + 1 < len(tails):               # planned by that launch
                    params = self._fill(self.params, sources, ())
                continue
            self.direct.launch(_NUMBA_RUNTIME, self.grid, self.threads, self.device, params)

    def _fill(self, params, sources, dynamic) -> list | None:
        """The kept parameter list with this call's pointers and dynamic scalars; None where the
        current device is not the planned one's, or a dynamic scalar does not fit its type."""
        if _NUMBA_RUNTIME.device_index(self.device) != self.direct_index:
            return None
        params = list(params)
        for at, i, offset in self.slots:
            params[at] = sources[i].data_ptr() + offset
        if dynamic and (tuple(map(type, dynamic)) != self.kinds
                        or not self.direct.refill(params, self.tail, dynamic, 0)):
            return None
        return params

    def _keep(self, args: list) -> None:
        """After a launch through launch_numba: the signature's direct launch, once it has
        launched (the signature's second launch), with where each place's pointer goes."""
        index = _NUMBA_RUNTIME.device_index(self.device)
        direct = _NUMBA_DIRECTS.get((self.kernel, index, _numba_signature(args)))
        if not direct or not direct.launched:
            return
        params = direct.fill(args)
        if params is None:
            return
        self.slots = tuple((at, self.args[i].source, self.args[i].offset)
                           for at, i in direct.pointers if type(self.args[i]) is Place)
        self.tail = tuple(s for s in direct.scalars if self.args[s[1]] is DYNAMIC)
        self.kinds = tuple(type(args[s[1]]) for s in self.tail)
        self.direct_index = index
        self.direct, self.params = direct, tuple(params)


class Place:
    """Where a planned tensor argument lies in a call's tensor (NumbaLaunch)."""

    __slots__ = ("source", "offset", "dtype", "shape", "stride")

    def __init__(self, source: int, t: torch.Tensor, src: torch.Tensor, position: int):
        self.source, self.offset = source, 0
        self.dtype, self.shape, self.stride = t.dtype, tuple(t.shape), t.stride()
        if t.numel():
            if src is None or t.untyped_storage().data_ptr() != src.untyped_storage().data_ptr():
                raise ValueError(f"NumbaLaunch: tensor argument {position} ({t.dtype}, "
                                 f"{tuple(t.shape)}) is not in source {source}")
            self.offset = t.data_ptr() - src.data_ptr()

    def view(self, src: torch.Tensor) -> torch.Tensor:
        """The argument in this call's source: its storage at the planned byte offset from
        the source's data, in the planned dtype, shape and strides."""
        if 0 in self.shape:
            return torch.empty_strided(self.shape, self.stride, dtype=self.dtype,
                                       device=src.device)
        if not self.offset and src.dtype == self.dtype and src.shape == self.shape \
                and src.stride() == self.stride:
            return src                                  # the argument itself
        size = src.element_size()
        if self.dtype == src.dtype and self.offset % size == 0:
            return src.as_strided(self.shape, self.stride,
                                  src.storage_offset() + self.offset // size)
        at = src.storage_offset() * size + self.offset
        item = self.dtype.itemsize
        if at % item:
            raise ValueError(f"NumbaLaunch: a {self.dtype} argument at byte {at} of its storage")
        return torch.empty(0, dtype=self.dtype, device=src.device).set_(
            src.untyped_storage(), at // item, self.shape, self.stride)


def launch_numba_1d(kernel, n_elements: int, device: torch.device, *args,
                    threads: int = 256) -> None:
    """launch_numba for a grid-stride kernel over `n_elements`: one thread per element on a
    GPU, SIM_MAX_BLOCKS blocks in the simulator."""
    threads = numba_threads(threads)
    launch_numba(kernel, numba_blocks(cdiv(n_elements, threads)), threads, device, *args)


def numba_launch_1d(kernel, n_elements: int, device: torch.device, args: tuple, sources: tuple,
                    places: tuple | None = None, threads: int = 256) -> NumbaLaunch:
    """launch_numba_1d's launch planned (NumbaLaunch)."""
    threads = numba_threads(threads)
    return NumbaLaunch(kernel, numba_blocks(cdiv(n_elements, threads)), threads, device, args,
                       sources, places)
