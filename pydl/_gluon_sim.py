"""A CPU simulator for the Gluon kernels (kernels/triton/attention_gluon.py), which Triton's
interpreter cannot run.

Triton's interpreter runs `tl` kernels on CPU tensors; it refuses Gluon kernels (no driver).
This module runs the subset of Gluon the attention kernels use, as their Python source
reads, on CPU tensors, so that their logic - index arithmetic, masks, the persistent work
order, the ring's indices and phases, the barrier protocol between partitions - is tested in
emulation like every other kernel in pydl:

- every `@gluon.jit` function of the kernel's module is re-bound to simulated `gl`,
  `mbarrier`, `tma` and `warpgroup_mma` namespaces (the same code object, other globals);
- a register tensor is a whole-block NumPy array (layouts are accepted and ignored;
  `convert_layout` is the identity), values rounded to float16/bfloat16 where the kernel
  converts to them, products accumulated in float32;
- programs run one after another; `warp_specialize` runs each partition in its own thread;
- an mbarrier counts arrivals and transaction bytes per phase and completes phases as the
  hardware does (`wait(bar, p)` returns once the phase of parity p completed; a fresh
  barrier's phase 1 counts as complete), and a wait that no other partition or copy can
  ever satisfy raises a deadlock error instead of hanging;
- a TMA load lands later, at a random barrier operation or when its waiter would block, so
  a consumer that reads a buffer before its barrier says the data arrived reads stale data;
  boxes past the tensor's extent read zeros and count their full bytes, as TMA does;
- an asynchronous `warpgroup_mma` reads its shared-memory operands when it retires (the
  `warpgroup_mma_wait` that retires it), so a buffer released or overwritten before the
  product was waited for gives a wrong answer here, as it may on a GPU; a wait that returns
  a product still in flight raises;
- a shared-memory store from registers must be followed by the storing partition's
  `fence_async_shared` before a wgmma or a TMA store reads that memory (the hardware's
  generic and async proxies), else the read raises;
- global loads and stores raise on an unmasked address outside the tensor's storage.

What it cannot check: how Gluon lowers the layouts, shared-memory swizzles and the
instructions' timing on a GPU. The first GPU run checks those (the GPU tests of
tests/test_attention_forward.py).
"""
from __future__ import annotations

import functools
import math
import random
import threading
import time
import types

import numpy as np
import torch

# --- dtypes ----------------------------------------------------------------------------------


class DType:
    """A Gluon element type: its NumPy storage (low-precision floats are held as float32,
    rounded) and size in bytes."""

    def __init__(self, name: str, np_dtype, itemsize: int, torch_dtype=None):
        self.name, self.np, self.itemsize, self.torch = name, np.dtype(np_dtype), itemsize, \
            torch_dtype

    @property
    def is_float(self) -> bool:
        return self.np.kind == "f"

    def round(self, a: np.ndarray) -> np.ndarray:
        """a (any NumPy array) as values of this type, in its storage dtype."""
        if self.torch in (torch.float16, torch.bfloat16):
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
            return t.to(self.torch).to(torch.float32).numpy()
        if self.is_float or self.np == np.bool_:
            return np.asarray(a).astype(self.np)
        a = np.asarray(a)
        if a.dtype.kind == "f":                  # float -> int truncates toward zero
            a = np.trunc(a)
        return a.astype(self.np)

    def __repr__(self) -> str:
        return self.name


float32 = DType("fp32", np.float32, 4, torch.float32)
float16 = DType("fp16", np.float32, 2, torch.float16)
bfloat16 = DType("bf16", np.float32, 2, torch.bfloat16)
int1 = DType("i1", np.bool_, 1, torch.bool)
int32 = DType("i32", np.int32, 4, torch.int32)
int64 = DType("i64", np.int64, 8, torch.int64)
_OF_TORCH = {d.torch: d for d in (float32, float16, bfloat16, int1, int32, int64)}


def _promote(a: DType, b: DType) -> DType:
    if a is b:
        return a
    if a.is_float or b.is_float:
        return float32
    if a is int1:
        return b
    if b is int1:
        return a
    return int64 if int64 in (a, b) else int32


# --- register tensors ------------------------------------------------------------------------


class _Type:
    layout = None


class T:
    """A register tensor (or scalar) of a program: the whole block as one NumPy array."""

    __slots__ = ("a", "dtype")
    type = _Type()

    def __init__(self, a, dtype: DType):
        self.a = np.asarray(a, dtype=dtype.np)
        self.dtype = dtype

    @property
    def shape(self) -> list:
        return list(self.a.shape)

    def to(self, dtype: DType, **_) -> "T":
        return T(dtype.round(self.a), dtype)

    def __index__(self) -> int:
        return int(self.a)

    __int__ = __index__

    def __float__(self) -> float:
        return float(self.a)

    def __bool__(self) -> bool:
        return bool(self.a)

    def __repr__(self) -> str:
        return f"T({self.dtype}, {self.a!r})"

    # arithmetic: the operands' promoted type (a Python number takes the tensor's kind)
    def _bin(self, other, fn, result=None, swap=False):
        o, od = _operand(other, self.dtype)
        x, y = (o, self.a) if swap else (self.a, o)
        dt = _promote(self.dtype, od)
        with np.errstate(all="ignore"):
            out = fn(x, y)
        if result is not None:            # a comparison
            return T(out, result)
        return T(dt.round(out) if dt in (float16, bfloat16) else out, dt)

    def __truediv__(self, o):
        return _float(self)._bin(o, np.divide)

    def __rtruediv__(self, o):
        return _float(self)._bin(o, np.divide, swap=True)

    def __neg__(self):
        return T(-self.a, self.dtype)

    __hash__ = None


def _float(t: T) -> T:
    return t if t.dtype.is_float else t.to(float32)


def _cdiv_trunc(a, b):
    """Integer division as C (and Triton) does it: toward zero; true division for floats."""
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return np.floor_divide(a, b)
    q = np.abs(a) // np.abs(b)
    return np.where((a < 0) != (b < 0), -q, q)


def _crem(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        return np.fmod(a, b)
    return a - b * _cdiv_trunc(a, b)


# the arithmetic and bitwise operators, both ways round, and the comparisons
for _name, _fn in (("add", np.add), ("sub", np.subtract), ("mul", np.multiply),
                   ("floordiv", _cdiv_trunc), ("mod", _crem), ("and", np.bitwise_and),
                   ("or", np.bitwise_or), ("xor", np.bitwise_xor)):
    setattr(T, f"__{_name}__", lambda self, o, fn=_fn: self._bin(o, fn))
    setattr(T, f"__r{_name}__", lambda self, o, fn=_fn: self._bin(o, fn, swap=True))
for _name, _fn in (("lt", np.less), ("le", np.less_equal), ("gt", np.greater),
                   ("ge", np.greater_equal), ("eq", np.equal), ("ne", np.not_equal)):
    setattr(T, f"__{_name}__", lambda self, o, fn=_fn: self._bin(o, fn, int1))


def _operand(x, like: DType):
    """(array, dtype) of an operand: a T's own; a Python number's in `like`'s kind (an int
    literal is int32 beside ints, a float literal fp32)."""
    if isinstance(x, T):
        return x.a, x.dtype
    if isinstance(x, bool):
        return np.asarray(x), int1
    if isinstance(x, int):
        dt = like if not like.is_float and like is not int1 else int32
        if not -2**31 <= x < 2**31:
            dt = int64
        return np.asarray(x, dtype=dt.np), dt
    if isinstance(x, float):
        return np.asarray(x, dtype=np.float32), float32 if not like.is_float else like
    raise TypeError(f"gluon simulator: cannot operate on {type(x).__name__}")


def _t(x, like: DType = int32) -> T:
    if isinstance(x, T):
        return x
    a, dt = _operand(x, like)
    return T(a, dt)


# --- global memory: pointers and tensor descriptors --------------------------------------------

_GMEM = threading.Lock()          # one global access at a time (the partitions' threads)


class _PtrType:
    def __init__(self, elem: DType):
        self.element_ty = elem


class Ptr:
    """A pointer (or block of pointers) into a torch tensor's storage: the storage as a flat
    tensor of the element type, and element offsets into it."""

    __slots__ = ("flat", "off", "elem")

    def __init__(self, flat: torch.Tensor, off, elem: DType):
        self.flat, self.off, self.elem = flat, off, elem

    @classmethod
    def of(cls, t: torch.Tensor) -> "Ptr":
        flat = torch.empty(0, dtype=t.dtype).set_(t.untyped_storage())
        return cls(flat, np.asarray(t.storage_offset(), dtype=np.int64), _OF_TORCH[t.dtype])

    @property
    def dtype(self) -> _PtrType:
        return _PtrType(self.elem)

    def __add__(self, o):
        a, _ = _operand(o, int32)
        return Ptr(self.flat, self.off + a.astype(np.int64), self.elem)

    __radd__ = __add__

    def addresses(self, shape, mask) -> tuple[np.ndarray, np.ndarray]:
        """(offsets, active) broadcast to `shape`; an active offset outside the storage
        raises (a GPU would read or write another tensor's memory, or fault)."""
        off = np.broadcast_to(self.off, shape)
        active = np.ones(shape, dtype=bool) if mask is None else \
            np.broadcast_to(_t(mask).a.astype(bool), shape)
        n = self.flat.numel()
        bad = active & ((off < 0) | (off >= n))
        if bad.any():
            raise IndexError(f"gluon simulator: an access outside the tensor's storage "
                             f"(offset {int(off[bad].flat[0])} of {n} elements)")
        return np.where(active, off, 0), active


def _shape_of(*xs) -> tuple:
    return np.broadcast_shapes(*[np.shape(x.off if isinstance(x, Ptr) else
                                          x.a if isinstance(x, T) else x)
                                 for x in xs if x is not None])


def load(pointer: Ptr, mask=None, other=None, **_) -> T:
    shape = _shape_of(pointer, mask, other)
    with _GMEM:
        off, active = pointer.addresses(shape, mask)
        vals = pointer.flat[torch.from_numpy(off.reshape(-1))].reshape(shape)
        vals = vals.to(torch.float32 if pointer.elem.is_float else vals.dtype).numpy()
    if other is not None:
        vals = np.where(active, vals, _operand(other, pointer.elem)[0])
    elif not active.all():
        vals = np.where(active, vals, 0)
    return T(pointer.elem.round(vals), pointer.elem)


def store(pointer: Ptr, value, mask=None, **_) -> None:
    shape = _shape_of(pointer, value, mask)
    v = np.broadcast_to(pointer.elem.round(_t(value, pointer.elem).a), shape)
    with _GMEM:
        off, active = pointer.addresses(shape, mask)
        idx = torch.from_numpy(off[active])
        pointer.flat[idx] = torch.from_numpy(np.ascontiguousarray(v[active])).to(
            pointer.flat.dtype)


def atomic_add(pointer: Ptr, val, mask=None, sem=None, scope=None, **_) -> None:
    shape = _shape_of(pointer, val, mask)
    v = np.broadcast_to(_t(val, pointer.elem).a, shape)
    with _GMEM:
        off, active = pointer.addresses(shape, mask)
        pointer.flat.index_put_((torch.from_numpy(off[active]),),
                                torch.from_numpy(np.ascontiguousarray(v[active])).to(
                                    pointer.flat.dtype), accumulate=True)


class _BlockType:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


class Descriptor:
    """A TMA tensor descriptor: a base pointer, the global shape and strides (elements), the
    box. Checked as the hardware requires (unit last stride, 16-byte aligned base and
    other strides); boxes read zeros past the extent and write only inside it."""

    def __init__(self, base: Ptr, shape, strides, block_shape):
        self.flat, self.base, self.elem = base.flat, int(base.off), base.elem
        self.shape = [int(s) for s in shape]
        self.strides = [int(s) for s in strides]
        self.block_shape = [int(b) for b in block_shape]
        self.block_type = _BlockType(math.prod(self.block_shape) * self.elem.itemsize)
        size = self.elem.itemsize
        if any(b > 256 for b in self.block_shape):
            raise ValueError(f"gluon simulator: a TMA box of {self.block_shape} (at most 256 "
                             f"a dim)")
        if self.strides[-1] != 1:
            raise ValueError(f"gluon simulator: a TMA descriptor's last stride must be 1, got "
                             f"{self.strides}")
        addr = self.flat.data_ptr() + self.base * size
        if addr % 16 or any(s * size % 16 for s in self.strides[:-1]):
            raise ValueError(f"gluon simulator: a TMA descriptor needs a 16-byte aligned base "
                             f"and strides, got base {addr % 16} bytes off and strides "
                             f"{self.strides} of {size}-byte elements")

    def _box(self, coord):
        if len(coord) != len(self.shape):
            raise ValueError(f"gluon simulator: a {len(coord)}-d coordinate for a "
                             f"{len(self.shape)}-d descriptor")
        grids = np.ix_(*[int(c) + np.arange(b) for c, b in zip(coord, self.block_shape)])
        inside = functools.reduce(np.logical_and, [(g >= 0) & (g < n) for g, n in
                                                   zip(grids, self.shape)])
        off = self.base + sum(g.astype(np.int64) * s for g, s in zip(grids, self.strides))
        return np.where(inside, off, 0), inside

    def read(self, coord) -> np.ndarray:
        with _GMEM:
            off, inside = self._box(coord)
            vals = self.flat[torch.from_numpy(off.reshape(-1))].reshape(off.shape)
            return np.where(inside, vals.to(torch.float32).numpy(), 0.0)

    def write(self, coord, values: np.ndarray) -> None:
        with _GMEM:
            off, inside = self._box(coord)
            v = np.broadcast_to(values.reshape(off.shape), off.shape)
            self.flat[torch.from_numpy(off[inside])] = torch.from_numpy(
                np.ascontiguousarray(v[inside])).to(self.flat.dtype)


# --- shared memory and mbarriers ---------------------------------------------------------------


class SMem:
    """A shared-memory buffer or a view of one (index, slice, reshape, permute)."""

    __slots__ = ("arr", "dtype")

    def __init__(self, arr: np.ndarray, dtype: DType):
        self.arr, self.dtype = arr, dtype

    @property
    def shape(self) -> list:
        return list(self.arr.shape)

    def index(self, i) -> "SMem":
        return SMem(self.arr[int(i)], self.dtype)

    def slice(self, start, length, dim: int = 0) -> "SMem":
        s = int(start)
        return SMem(self.arr[(slice(None),) * dim + (slice(s, s + int(length)),)], self.dtype)

    def reshape(self, shape) -> "SMem":
        view = self.arr.view()
        view.shape = [int(s) for s in shape]      # raises where it would need a copy
        return SMem(view, self.dtype)

    def permute(self, order) -> "SMem":
        return SMem(self.arr.transpose([int(o) for o in order]), self.dtype)

    def store(self, value: T) -> None:
        """A generic-proxy store: the async proxy (wgmma, TMA) may read it only after the
        storing partition's fence_async_shared."""
        self.arr[...] = self.dtype.round(value.a)
        prog = _prog()
        with prog.cv:
            prog.unfenced.setdefault(threading.get_ident(), []).append(self.arr)

    def load(self, layout=None) -> T:
        return T(self.arr.copy(), self.dtype)


class Barrier:
    """An mbarrier: arrivals expected per phase, arrivals and transaction bytes pending,
    phases completed."""

    __slots__ = ("count", "pending", "tx", "completed")

    def __init__(self):
        self.count = self.pending = 0
        self.tx = self.completed = 0


class Barriers:
    """gl.allocate_shared_memory(gl.int64, [n(, 1)], MBarrierLayout()): n barriers; one
    barrier itself where n is 1."""

    def __init__(self, n: int):
        self.items = [Barrier() for _ in range(n)]

    def index(self, i) -> Barrier:
        return self.items[int(i)]


def _bar(b) -> Barrier:
    if isinstance(b, Barriers):
        if len(b.items) != 1:
            raise TypeError("gluon simulator: an mbarrier operation on several barriers")
        return b.items[0]
    return b


class DeadlockError(RuntimeError):
    """Every partition of a program waits on a barrier that nothing left can complete."""


class _Aborted(Exception):
    pass


class _Program:
    """One program's state: its id, the partitions' threads and what they wait for."""

    def __init__(self, pid: tuple, nprog: tuple, seed: int):
        self.pid, self.nprog = pid, nprog
        self.cv = threading.Condition()
        self.copies: list = []          # TMA loads issued, not landed
        self.live = 0                   # partitions running
        self.waiting: dict = {}         # thread -> (barrier, parity) it blocks on
        self.unfenced: dict = {}        # thread -> shared memory it stored, not yet fenced
        self.error: BaseException | None = None
        self.rng = random.Random(seed)

    # under self.cv:
    def complete(self, bar: Barrier) -> None:
        if bar.pending <= 0 and bar.tx == 0:
            bar.completed += 1
            bar.pending = bar.count
            self.cv.notify_all()

    def land_one(self) -> None:
        """One of the copies in flight lands (any one: TMA completes them in no set order)."""
        self.land(self.rng.randrange(len(self.copies)))

    def land(self, i: int) -> None:
        desc, coord, bar, dst = self.copies.pop(i)
        dst.arr[...] = dst.dtype.round(desc.read(coord).reshape(dst.arr.shape))
        bar.tx -= desc.block_type.nbytes
        self.complete(bar)

    def maybe_land(self) -> None:
        while self.copies and self.rng.random() < 0.25:
            self.land_one()

    def check(self) -> None:
        if self.error is not None:
            raise _Aborted()


# how long a partition sleeps at most where it lets the others run (seconds)
YIELD_S = 2e-3
# a wait that sees nothing happen this long is an error of the simulator's (every event that
# can complete a phase notifies the waiters; a deadlock is detected, not waited out)
STALL_S = 60

_STATE = threading.local()
_PROGRAM: list = [None]           # the program running (programs run one after another)


def _prog() -> _Program:
    return _PROGRAM[0]


# --- the gl namespace --------------------------------------------------------------------------


class _Layout:
    """Any layout: accepted and ignored (the simulator holds whole blocks)."""

    def __init__(self, *args, **kwargs):
        pass

    @classmethod
    def get_default_for(cls, *args, **kwargs):
        return cls()


def _dtype_of(*xs) -> DType:
    dt = None
    for x in xs:
        d = x.dtype if isinstance(x, T) else (float32 if isinstance(x, float) else None)
        if d is not None:
            dt = d if dt is None else _promote(dt, d)
    return dt or int32


def _allocate_shared_memory(element_ty: DType, shape, layout, value=None):
    shape = [int(s) for s in shape]
    if element_ty is int64 and isinstance(layout, _BarrierLayout):
        return Barriers(math.prod(shape))
    # uninitialised, as on a GPU: NaN (the integer minimum), so a read before any write shows
    fill = np.nan if element_ty.is_float else np.iinfo(element_ty.np).min \
        if element_ty is not int1 else False
    mem = SMem(np.full(shape, fill, dtype=element_ty.np), element_ty)
    if value is not None:
        mem.store(value)
    return mem


def _warp_specialize(functions_and_args, worker_num_warps, worker_num_regs=None):
    """Each partition in a thread of its own (the first, the default partition, in this
    one); the first error (a deadlock included) stops them all and is raised here."""
    prog = _prog()
    with prog.cv:
        prog.live += len(functions_and_args)

    def run(fn, args):
        _STATE.mma = []
        _STATE.stores = []
        try:
            fn(*args)
            _flush_stores(0)
        except _Aborted:
            pass
        except BaseException as exc:       # noqa: BLE001 (raised by the launch)
            with prog.cv:
                if prog.error is None:
                    prog.error = exc
                prog.cv.notify_all()
        finally:
            with prog.cv:
                prog.live -= 1
                _detect_deadlock(prog)
                prog.cv.notify_all()         # the waiters left may be all there is

    threads = [threading.Thread(target=run, args=(fn, tuple(args)), daemon=True)
               for fn, args in functions_and_args[1:]]
    for th in threads:
        th.start()
    fn, args = functions_and_args[0]
    run(fn, tuple(args))
    for th in threads:
        th.join()
    if prog.error is not None:
        raise prog.error


def _detect_deadlock(prog: _Program) -> None:
    """Under prog.cv: every live partition waits on a phase not yet complete, and no copy is
    left to land (a woken waiter whose phase completed is not stuck)."""
    if prog.error is not None or prog.live == 0 or len(prog.waiting) < prog.live \
            or prog.copies:
        return
    if all((b.completed & 1) == p for b, p in prog.waiting.values()):
        prog.error = DeadlockError(
            f"gluon simulator: program {prog.pid}: every partition waits on an mbarrier "
            f"phase that no partition or copy can complete (deadlock)")
        prog.cv.notify_all()


def _gl_reduce(np_fn, out_dtype=None):
    def reduce(x, axis=None, keep_dims=False, **_):
        a = x.a if axis is not None else x.a.reshape(-1)
        with np.errstate(all="ignore"):
            a = np_fn(a, axis=0 if axis is None else int(axis), keepdims=keep_dims)
        return T(a, out_dtype or x.dtype)
    return reduce


def _elementwise(np_fn):
    def op(x):
        x = _float(_t(x, float32))
        with np.errstate(all="ignore"):
            return T(np_fn(x.a), float32)
    return op


def _binary(np_fn):
    def op(a, b, *args, **kwargs):
        dt = _dtype_of(a, b)
        with np.errstate(all="ignore"):
            return T(np_fn(_operand(a, dt)[0], _operand(b, dt)[0]), dt)
    return op


def _where(cond, a, b):
    dt = _dtype_of(a, b)
    return T(np.where(_t(cond).a.astype(bool), _operand(a, dt)[0], _operand(b, dt)[0]), dt)


def _cdiv(a, b):
    return (a + b - 1) // b


def _arange(start, end, layout=None):
    return T(np.arange(int(start), int(end)), int32)


def _full(shape, value, dtype: DType, layout=None):
    return T(np.full([int(s) for s in shape], value, dtype=dtype.np), dtype)


def _zeros(shape, dtype: DType = float32, layout=None):
    return _full(shape, 0, dtype)


def _program_id(axis):
    return T(_prog().pid[int(axis)], int32)


def _num_programs(axis):
    return T(_prog().nprog[int(axis)], int32)


gl = types.SimpleNamespace(
    constexpr=lambda v: v, float32=float32, float16=float16, bfloat16=bfloat16, int1=int1,
    int32=int32, int64=int64,
    BlockedLayout=_Layout, DotOperandLayout=_Layout, NVMMADistributedLayout=_Layout,
    NVMMASharedLayout=_Layout, SliceLayout=_Layout,
    allocate_shared_memory=_allocate_shared_memory, arange=_arange, full=_full, zeros=_zeros,
    atomic_add=atomic_add, load=load, store=store, cdiv=_cdiv,
    convert_layout=lambda x, layout, assert_trivial=False: x,
    exp=_elementwise(np.exp), exp2=_elementwise(np.exp2), log=_elementwise(np.log),
    log2=_elementwise(np.log2),
    expand_dims=lambda x, axis: T(np.expand_dims(x.a, int(axis)), x.dtype),
    # max and min as Triton lowers them by default (propagate_nan NONE: maxnum / minnum, a
    # NaN operand loses to a number, as fmaxf on a GPU)
    max=_gl_reduce(np.fmax.reduce), sum=_gl_reduce(np.sum, float32),
    maximum=_binary(np.fmax), minimum=_binary(np.fmin), where=_where,
    num_programs=_num_programs, program_id=_program_id, static_range=range,
    warp_specialize=_warp_specialize,
)


# --- mbarrier, tma, wgmma ----------------------------------------------------------------------

class _BarrierLayout(_Layout):
    pass


def _init(bar, count):
    b = _bar(bar)
    b.count = b.pending = int(count)
    b.tx = b.completed = 0


def _expect(bar, bytes_per_cta=None, pred=True):
    """arrive.expect_tx: the transaction bytes to wait for, and one arrival."""
    if not pred:
        return
    prog, b = _prog(), _bar(bar)
    with prog.cv:
        b.tx += int(bytes_per_cta)
        b.pending -= 1
        prog.complete(b)
        prog.maybe_land()
    _yield(prog)


def _arrive(bar, *, count=1, pred=True):
    if not pred:
        return
    prog, b = _prog(), _bar(bar)
    with prog.cv:
        b.pending -= int(count)
        if b.pending < 0:
            raise RuntimeError("gluon simulator: more arrivals on an mbarrier phase than "
                               "its count")
        prog.complete(b)
        prog.maybe_land()
    _yield(prog)


def _yield(prog: _Program) -> None:
    """Sometimes let the other partitions run now (what an arrival released them to do:
    the producer's next copy into a buffer just released, say) before this one goes on."""
    if prog.rng.random() < 0.5:
        time.sleep(prog.rng.random() * YIELD_S)


def _wait(bar, phase, pred=True, deps=()):
    """Until the phase of parity `phase` completed (the current phase's parity differs):
    landing copies first where the wait would block."""
    if not pred:
        return
    prog, b, p = _prog(), _bar(bar), int(phase) & 1
    with prog.cv:
        prog.check()
        prog.maybe_land()
        while (b.completed & 1) == p:
            mine = [i for i, c in enumerate(prog.copies) if c[2] is b]
            if mine:                         # the copies this phase waits for land
                prog.land(prog.rng.choice(mine))
                continue
            me = threading.get_ident()
            if prog.copies and len(prog.waiting) + 1 >= prog.live:
                prog.land_one()              # everyone waits: something in flight lands
                continue
            prog.waiting[me] = (b, p)
            _detect_deadlock(prog)
            if prog.error is None and not prog.cv.wait(timeout=STALL_S):
                prog.error = RuntimeError(f"gluon simulator: program {prog.pid}: a wait saw "
                                          f"nothing happen in {STALL_S} s")
                prog.cv.notify_all()
            del prog.waiting[me]
            prog.check()


def _copy_global_to_shared(tensor_desc, coord, barrier, result, pred=True, multicast=False):
    if not pred:
        return
    prog = _prog()
    with prog.cv:
        prog.copies.append((tensor_desc, [int(c) for c in coord], _bar(barrier), result))
        prog.maybe_land()
        prog.cv.notify_all()         # a waiter lands it where nothing else would


def _copy_shared_to_global(tensor_desc, coord, src):
    _async_read(src, "a TMA store")
    _STATE.stores.append((tensor_desc, [int(c) for c in coord], src))


def _fence_async_shared() -> None:
    """This partition's shared-memory stores become visible to the async proxy."""
    prog = _prog()
    with prog.cv:
        prog.unfenced.pop(threading.get_ident(), None)


def _async_read(mem, what: str) -> None:
    """`mem` (shared memory the async proxy is about to read: a wgmma operand, a TMA store's
    source) must hold no generic-proxy store left unfenced by any partition: the hardware
    may read the old bytes."""
    if not isinstance(mem, SMem):
        return
    prog = _prog()
    with prog.cv:
        stale = any(np.shares_memory(mem.arr, arr) for arrs in prog.unfenced.values()
                    for arr in arrs)
    if stale:
        raise RuntimeError(f"gluon simulator: {what} reads shared memory stored without a "
                           f"fence_async_shared after the store")


def _flush_stores(pendings) -> None:
    stores = _STATE.stores
    while len(stores) > int(pendings):
        desc, coord, src = stores.pop(0)
        desc.write(coord, src.arr)


def _make_tensor_descriptor(base, shape, strides, block_shape, layout, padding_option="zero"):
    return Descriptor(base, shape, strides, block_shape)


mbarrier = types.SimpleNamespace(MBarrierLayout=_BarrierLayout, init=_init, expect=_expect,
                                 arrive=_arrive, wait=_wait)
tma = types.SimpleNamespace(make_tensor_descriptor=_make_tensor_descriptor,
                            async_copy_global_to_shared=_copy_global_to_shared,
                            async_copy_shared_to_global=_copy_shared_to_global,
                            store_wait=_flush_stores)


class _Product:
    """An asynchronous warpgroup product in flight: computed (its shared-memory operands
    read) when a warpgroup_mma_wait retires it."""

    __slots__ = ("a", "b", "acc", "use_acc", "value")

    def __init__(self, a, b, acc, use_acc):
        self.a, self.b, self.acc, self.use_acc, self.value = a, b, acc, use_acc, None

    def retire(self) -> T:
        a = self.a.arr if isinstance(self.a, SMem) else self.a.a
        b = self.b.arr if isinstance(self.b, SMem) else self.b.a
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or \
                list(self.acc.a.shape) != [a.shape[0], b.shape[1]]:
            raise ValueError(f"gluon simulator: warpgroup_mma of {a.shape} by {b.shape} into "
                             f"{self.acc.a.shape}")
        with np.errstate(all="ignore"):          # inf * 0 is NaN here as on the GPU
            out = a.astype(np.float32) @ b.astype(np.float32)
            if self.use_acc:
                out = out + self.acc.a
        self.value = T(out.astype(np.float32), float32)
        return self.value


def _warpgroup_mma(a, b, acc, *, use_acc=True, precision=None, max_num_imprecise_acc=None,
                   is_async=False):
    (m, k), n = a.shape, b.shape[-1]
    if m % 64 or n % 8 or n > 256 or k % 16:
        raise ValueError(f"gluon simulator: a {m} x {n} x {k} wgmma (16-bit operands: M a "
                         f"multiple of 64, N of 8 up to 256, K of 16)")
    _async_read(a, "warpgroup_mma")
    _async_read(b, "warpgroup_mma")
    product = _Product(a, b, acc, bool(use_acc))
    if not is_async:
        return product.retire()
    _STATE.mma.append(product)
    return product


def _warpgroup_mma_wait(num_outstanding=0, deps=None):
    prog = _prog()
    _yield(prog)
    with prog.cv:
        prog.maybe_land()
    inflight = _STATE.mma
    while len(inflight) > int(num_outstanding):
        inflight.pop(0).retire()
    out = []
    for d in deps or ():
        if isinstance(d, _Product):
            if d.value is None:
                raise RuntimeError("gluon simulator: warpgroup_mma_wait returns a product "
                                   "still in flight (num_outstanding too large)")
            d = d.value
        out.append(d)
    return out[0] if len(out) == 1 else tuple(out)


# --- the launch --------------------------------------------------------------------------------

_BOUND: dict = {}


def _bind(module) -> dict:
    """The module's globals with every @gluon.jit function re-made on the simulated
    namespaces (the same code), Gluon's constexpr constants as their values."""
    env = _BOUND.get(module.__name__)
    if env is not None:
        return env
    env = dict(vars(module))
    for name, value in vars(module).items():
        fn = getattr(value, "fn", None)
        if isinstance(fn, types.FunctionType) and fn.__module__ == module.__name__:
            env[name] = types.FunctionType(fn.__code__, env, fn.__name__, fn.__defaults__,
                                           fn.__closure__)
        elif type(value).__name__ == "constexpr":
            env[name] = value.value
    env.update(gl=gl, mbarrier=mbarrier, tma=tma, warpgroup_mma=_warpgroup_mma,
               warpgroup_mma_wait=_warpgroup_mma_wait,
               fence_async_shared=_fence_async_shared)
    _BOUND[module.__name__] = env
    return env


def _argument(x):
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError("gluon simulator: CPU tensors only")
        return Ptr.of(x)
    if isinstance(x, bool):
        return x
    if isinstance(x, int):
        return T(x, int32 if -2**31 <= x < 2**31 else int64)
    if isinstance(x, float):
        return T(x, float32)
    return x


def launch(kernel, grid: tuple, *args, seed: int = 0, **kwargs) -> None:
    """kernel[grid](*args, **kwargs) on CPU tensors, simulated: the programs one after
    another, each program's partitions in threads. Launch options (num_warps, ...) that are
    not the kernel's parameters are ignored. `seed` varies when copies land."""
    import inspect
    import sys
    fn = _bind(sys.modules[kernel.fn.__module__])[kernel.fn.__name__]
    params = inspect.signature(kernel.fn).parameters
    consts = {n: v for n, v in kwargs.items() if n in params}
    args = [_argument(a) for a in args]
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    for z in range(grid[2]):
        for y in range(grid[1]):
            for x in range(grid[0]):
                prog = _Program((x, y, z), grid, hash((seed, x, y, z)))
                _PROGRAM[0] = prog
                _STATE.mma, _STATE.stores = [], []
                try:
                    fn(*args, **consts)
                    _flush_stores(0)
                finally:
                    _PROGRAM[0] = None
