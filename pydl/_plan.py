"""The path from a public op to its kernels, written once for every op family.

    pydl.conv2d(x, w, b, stride, ...)        the public op (pydl/<op>.py): torch.nn.functional's
      |                                      signature; autocast; builds the call's key
      |-- calls.get(key) -> Call             checks, geometry, backend and algorithm resolved
      |                                      ONCE per signature (types, shapes, strides,
      |                                      dtypes, device, options, backend, TF32 switch);
      |                                      a hit is a lookup
      |-- Call(x, w, b)                      the op on these tensors; in eager mode on a
            |                                kernel backend the Call is also the signature's
            |                                plan:
            |-- apply(<Op>Function, ..., ops) autograd, only when a gradient can flow; the
            |                                Function runs `ops`' methods: the plan's
            |-- plan.forward(x, w, b)        outputs allocated with arguments fixed once
                  |                          (output_maker), the launch the first call built
                  |                          (by the launcher's plan_<step>, from its Cache)
                  |-- Launch(*tensors)       kernel[grid](*tensors, *scalars, **constexprs)

Under torch.compile (and for tensor subclasses, or an implementation registered in place of
pydl's own) the Call runs the registered implementation, whose Function gets the family's
`<Op>Kernels`: each step a `torch.library` custom op (pydl/_library.py) that allocates and
looks its launch up in the launcher's Cache, taking the geometry as a list of ints; in eager
mode the custom-op dispatcher is skipped (it costs tens of microseconds a call).

Everything keyed here is decided by the key alone: a check that passed for one call passes
for every call with the same key, and a plan built for one call runs every call with that
key. What a key holds that can change between calls without a tensor changing (the backend
context, torch's TF32 switches, the current device) is read on every call and put in the key;
what the call's key cannot know (the upstream gradient's strides, the TF32 switch when a
backward runs, a tensor's 16-byte alignment where a launch depends on it) keys the plan's
own small tables. tests/test_plans.py runs each family on layouts that differ in one of
these at a time.
"""
from __future__ import annotations

from functools import reduce
from operator import itemgetter, or_
from typing import Callable, Hashable

import torch

from . import _env

# A cache holds at most this many signatures; past it, it starts over (a model uses a few).
MAX_ENTRIES = 4096


class Cache:
    """Values built by `build(*args)` once per key."""

    __slots__ = ("name", "entries")
    all: list["Cache"] = []

    def __init__(self, name: str):
        self.name = name
        self.entries: dict[Hashable, object] = {}
        Cache.all.append(self)

    def get(self, key: Hashable, build: Callable, *args):
        try:
            return self.entries[key]
        except KeyError:
            pass
        value = build(*args)
        if _capturing():
            # A launch built inside a CUDA graph capture could not be autotuned (timing
            # synchronises): use it for this capture, build again after it.
            return value
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = value
        return value

    def clear(self) -> None:
        self.entries.clear()

    def call(self, make_key: Callable, build: Callable, *args):
        """The value for a public op's call: `build(*args)` (checks and all) once per
        `make_key(*args)`. A key that cannot be built (an argument that is not a tensor, an
        unhashable option) means no caching: `build` runs and raises the op's own error.
        Under torch.compile nothing is cached (dynamo traces `build`)."""
        if torch.compiler.is_compiling():
            return build(*args)
        try:
            key = make_key(*args)
            value = self.entries.get(key)
        except (AttributeError, TypeError):
            return build(*args)
        if value is None:
            _refuse_negative_views(args)
            value = self.get(key, build, *args)
        return value


def _refuse_negative_views(args) -> None:
    """A tensor with its negative bit set (a lazy negation, such as z.conj().imag of a complex
    z) holds -x in memory as x: a kernel reading its storage would compute on the wrong sign.
    Refused by name (the bit is in every call's key, so such a tensor never reaches a plan
    built for a plain one)."""
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and t.is_neg():
                raise TypeError(f"a {tuple(t.shape)} {t.dtype} input has its negative bit set "
                                f"(a lazily negated view, such as z.conj().imag): pydl's ops "
                                f"read memory directly; pass t.resolve_neg()")


def clear_all() -> None:
    """Forget every cached call and launch (tests; after changing a module-level default that
    a plan captured, such as a block-size cap)."""
    for cache in Cache.all:
        cache.clear()


def capturing() -> bool:
    """Whether a CUDA graph is being captured on the current stream: what is built now
    (a launch that could not be autotuned) is used for this call and not kept."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


_capturing = capturing

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def options_key(*options) -> tuple:
    """What a call's key holds of its non-tensor options: the values, then each one's type (of
    a tuple, its items' types). Equal values of other types are other calls: stride=1.0,
    True or (1.0, 1) equals 1 or (1, 1), and the checks refuse the float and the bool as
    torch does, so a kept call of the int must not serve them (0.3-0.8 us a call)."""
    return options + tuple([tuple(map(type, o)) if type(o) is tuple else type(o)
                            for o in options])


def tensors_key(*tensors) -> tuple:
    """What a call's key holds of its tensor arguments (None allowed): of each its type, shape,
    strides, dtype, device and negative bit, everything a check or a plan reads of it but its
    data; None for
    an absent one. One flat tuple (no tuple a tensor: about 0.4 us less a call of seven
    tensors, to build and to compare); it decodes one way, as no type is None, so two calls
    have one key only where every tensor matches."""
    key = []
    for t in tensors:
        if t is None:
            key.append(None)
        else:
            key += (type(t), t.shape, t.stride(), t.dtype, t.device, t.is_neg())
    return tuple(key)


def plain_tensors(*tensors) -> bool:
    """Every tensor among `tensors` (other values allowed: None, numbers, strings, lists) is a
    plain tensor or a Parameter, not a subclass (FakeTensor, FunctionalTensor, a user's) that
    must go through torch's dispatcher to the custom op: what a plan may launch on directly,
    and what a kernel op's eager call may run without the dispatcher (pydl._library). A
    call's key holds its tensors' types."""
    for t in tensors:
        if type(t) not in _PLAIN and isinstance(t, torch.Tensor):
            return False
    return True


def needs_graph(*tensors) -> bool:
    """Whether an op on `tensors` must record an autograd graph: grad mode is on and one of
    them (None allowed) requires grad. Without one, a launcher is called directly, which
    saves torch.autograd.Function's machinery (several microseconds a call)."""
    if not torch.is_grad_enabled():
        return False
    for t in tensors:
        if t is not None and t.requires_grad:
            return True
    return False


def emulated(*methods: str):
    """Class decorator for a plan: its named methods, which launch kernels, run in the
    emulation's interpreter state under PYDL_INTERPRET (pydl._env.emulated_launch, as the
    kernel ops do); unchanged on a GPU. EMULATED lists what was wrapped, (class, name, the
    method itself), for `python -m bench overhead`, which times the host path without the
    wrappers a GPU never has."""
    def wrap(cls):
        if _env.INTERPRET:
            for name in methods:
                method = cls.__dict__[name]
                EMULATED.append((cls, name, method))
                setattr(cls, name, _env.emulated_launch(method))
        return cls
    return wrap


EMULATED: list[tuple[type, str, Callable]] = []


def _distinct(args: tuple) -> tuple:
    """args with a tensor passed more than once (self-attention's q = k = v, an LSTM's h0 and
    c0 one tensor) given as views after its first place: dynamo traces no autograd.Function
    that takes one tensor in two inputs ("duplicate tensor input"), torch.compile's error
    for a call eager mode runs. The gradients of the views reach the tensor."""
    seen: set[int] = set()
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            if id(a) in seen:
                a = a.view_as(a)
            seen.add(id(a))
        out.append(a)
    return tuple(out)


_FUNCTION_APPLY = torch._C._FunctionBase.__dict__["apply"]   # autograd.Function's C++ apply
_APPLIERS: dict = {}


def apply(function: type, *args):
    """`function.apply(*args)` (a pydl torch.autograd.Function). In eager mode, outside
    functorch's transforms, the C++ apply is called directly: Function.apply's Python
    preamble (about 2 us a call here) binds default arguments for a `setup_context`, which
    pydl's Functions do not define, and unwraps functorch wrappers that outlived their
    transform, which pydl's ops take on no path (without a graph they reach the kernels
    unwrapped too). Under torch.compile and functorch, Function.apply itself, and so where a
    class's `apply` is replaced (a test's spy)."""
    if torch.compiler.is_compiling():
        return function.apply(*_distinct(args))
    if torch._C._are_functorch_transforms_active() or "apply" in function.__dict__:
        run = function.apply
    else:
        run = _APPLIERS.get(function)
        if run is None:
            run = _APPLIERS[function] = _FUNCTION_APPLY.__get__(None, function)
    try:
        return run(*args)
    except RuntimeError as exc:
        if _INFERENCE_SAVED not in str(exc) or not any(
                isinstance(a, torch.Tensor) and a.is_inference() for a in args):
            raise
    # A tensor made under torch.inference_mode, which autograd refuses to save for backward,
    # where the Function saves its inputs (an LSTM cell saves x, h and c whatever gradient is
    # needed; torch's formulas save some products instead and raise less often): the call
    # again on copies of those tensors, which are ordinary tensors. Nothing on other paths.
    return run(*[a.clone() if isinstance(a, torch.Tensor) and a.is_inference() else a
                 for a in args])


_INFERENCE_SAVED = "Inference tensors cannot be saved for backward"


# On a GPU, a Launch calls the compiled kernel's launcher directly after its first launch,
# skipping Triton's per-call argument binding and cache lookup (JITFunction.run: 10-20 us of
# host time a launch); PYDL_DIRECT_LAUNCH=0 keeps every launch on Triton's own path.
DIRECT = _env.DIRECT_LAUNCH
# The current CUDA device's index and a device's current raw stream, read by the direct path
# (torch's C getters; absent from CPU builds, where bench/overhead.py's stub replaces them).
_DEVICE_INDEX = getattr(torch._C, "_cuda_getDevice", None)
_RAW_STREAM = getattr(torch._C, "_cuda_getCurrentRawStream", None)


class Launch:
    """One Triton kernel launch with everything but its tensors fixed: the kernel and grid, the
    scalar arguments that follow the tensors, and the constexprs (the launch config included).

    Kernels take their tensor arguments first; `Launch(*tensors)` launches. A scalar that
    changes every call (a dropout seed) is the kernel's last one and goes by keyword:
    `Launch(*tensors, seed=s)`.

    The direct path (GPU only, DIRECT): the first launch goes through Triton (which compiles
    or finds the kernel specialised for these arguments) and its compiled kernel is kept with
    the full argument list Triton passed to it. A later launch calls that kernel's launcher
    with the new tensors in place of the old when nothing it was specialised on can differ:
    the scalars and constexprs are fixed here, the tensors' dtypes are fixed by the caller's
    key (a Launch cache's key must hold the dtype of every tensor argument), and the one thing
    left, each tensor's 16-byte alignment, is compared (a mismatch, another current device or
    a launch hook set by a profiler take Triton's path). A per-call keyword (the dropout
    seed: an int, or a device tensor the kernel reads it from) takes the direct path too, in
    its place in the argument list, where the kernel does not specialise on it
    (`do_not_specialize`: a kernel compiled for the first call's value, say 1 or a multiple
    of 16, could be wrong for another); elsewhere, and when
    the keywords differ from the first call's, Triton's. `checked`: the positions of the
    tensor arguments whose alignment can differ between calls, where a launch knows the others
    repeat one of them (a placeholder passed for an absent tensor) or are its own buffers
    (arrival counters); default all."""

    __slots__ = ("run", "scalars", "consts", "kernel", "grid", "compiled", "tail", "aligned",
                 "device", "checked", "per_call")

    def __init__(self, kernel, grid: tuple, scalars: tuple, consts: dict,
                 checked: tuple | None = None):
        self.kernel, self.grid = kernel, tuple(grid) + (1,) * (3 - len(grid))
        self.run = runner(kernel, grid)
        self.scalars = tuple(scalars)
        self.consts = consts
        self.compiled = None
        self.checked = None if checked is None else (
            itemgetter(*checked) if len(checked) > 1 else lambda t, i=checked[0]: (t[i],))

    def __call__(self, *tensors, **dynamic) -> None:
        c = self.compiled
        if c is not None:
            tail = self.tail if not dynamic and not self.per_call else self._tail(dynamic)
            if tail is not None \
                    and _alignment(tensors if self.checked is None else self.checked(tensors)) \
                    == self.aligned and _no_hooks() and _DEVICE_INDEX() == self.device:
                g = self.grid
                c.run(g[0], g[1], g[2], _RAW_STREAM(self.device),
                      c.function, c.packed_metadata, None, None, None, *tensors, *tail)
                return
        k = self.run(*tensors, *self.scalars, **dynamic, **self.consts)
        if c is None and DIRECT and hasattr(k, "packed_metadata") \
                and hasattr(self.kernel, "fn"):      # a JITFunction (not a wrapper around one)
            self._keep(k, tensors, dynamic)

    def _tail(self, dynamic: dict):
        """The kept argument list with this call's per-call keywords in their places; None
        where they are not the kept call's keywords, or one is not of the kept one's kind: an
        int32 (Triton types an unspecialised int by its range: another value compiles
        another kernel), or a tensor of the kept one's dtype (a device-drawn dropout seed)."""
        per_call = self.per_call
        if dynamic.keys() != per_call.keys():
            return None
        tail = list(self.tail)
        for name, value in dynamic.items():
            i = per_call[name]
            if not _same_kind(value, tail[i]):
                return None
            tail[i] = value
        return tail

    def _keep(self, compiled, tensors, dynamic: dict) -> None:
        """The argument list after the tensors, in the kernel's parameter order with its
        defaults, as JITFunction.run passes it to the compiled kernel, and where in it each
        per-call keyword goes (none kept when the kernel specialises on one, or one is neither
        an int32 nor a tensor)."""
        import inspect
        sig = inspect.signature(self.kernel.fn)
        if not set(dynamic) <= _unspecialised(self.kernel, list(sig.parameters)) \
                or not all(_int32(v) or isinstance(v, torch.Tensor) for v in dynamic.values()):
            return
        params = [n for n in self.consts if n in sig.parameters]       # not launch options
        bound = sig.bind(*tensors, *self.scalars, **dynamic,
                         **{n: self.consts[n] for n in params})
        bound.apply_defaults()
        names = list(bound.arguments)[len(tensors):]
        self.per_call = {n: names.index(n) for n in dynamic}
        self.tail = tuple(bound.arguments.values())[len(tensors):]
        self.aligned = _alignment(tensors if self.checked is None else self.checked(tensors))
        self.device = _DEVICE_INDEX()
        self.compiled = compiled


def runner(kernel, grid: tuple) -> Callable:
    """kernel[grid]: Triton's launch of `kernel` on `grid`; in emulation, for a Gluon kernel
    (which Triton's interpreter cannot run), pydl's Gluon simulator (pydl/_gluon_sim.py)."""
    is_gluon = getattr(kernel, "is_gluon", None)
    if _env.INTERPRET and is_gluon is not None and is_gluon():
        from . import _gluon_sim
        return lambda *args, **kwargs: _gluon_sim.launch(kernel, grid, *args, **kwargs)
    return kernel[grid]


# CUDA's cap on grid axes 1 and 2 (axis 0 takes 2**31 - 1 programs): a launch past it fails.
GRID_YZ_MAX = 65535


class BatchSlices:
    """A launch whose last grid axis runs over the N images of a batch, for N past
    GRID_YZ_MAX: the batch in slices of at most GRID_YZ_MAX images, each launched on views of
    its slice (dim 0 of every tensor argument is the batch; the kernel reads its image from
    the grid, so a slice is the same kernel on other pointers). make(n) builds the launch of
    an n-image slice: two Launches in all, the full slice's and the remainder's."""

    __slots__ = ("n", "full", "rest")

    def __init__(self, make: Callable, n: int):
        self.n = n
        self.full = make(GRID_YZ_MAX)
        self.rest = make(n % GRID_YZ_MAX) if n % GRID_YZ_MAX else None

    def __call__(self, *tensors, **dynamic) -> None:
        for n0 in range(0, self.n, GRID_YZ_MAX):
            n1 = min(self.n, n0 + GRID_YZ_MAX)
            run = self.full if n1 - n0 == GRID_YZ_MAX else self.rest
            run(*(t[n0:n1] for t in tensors), **dynamic)


def batch_launch(make: Callable, grid: tuple):
    """make(grid) (a Launch) where its last axis, the batch, fits CUDA's cap; a BatchSlices
    of launches over slices of the batch where it does not. Grids of one axis are whole."""
    if len(grid) == 1 or grid[-1] <= GRID_YZ_MAX:
        return make(grid)
    return BatchSlices(lambda n: make((*grid[:-1], n)), grid[-1])


def launch_each(launches, tensors: tuple) -> None:
    """launch(*tensors) for each of `launches` in turn: one kernel's launches on the same
    tensors, differing in their scalars (a recurrence's steps). Once every one has kept its
    compiled kernel (Launch's direct path), with the same alignment and device, the direct
    path's checks and the stream's read are made once for them all, then each compiled
    launcher is called; otherwise each launches as it would alone."""
    first = launches[0]
    c = first.compiled
    if c is not None and _alignment(tensors if first.checked is None
                                    else first.checked(tensors)) == first.aligned \
            and _no_hooks() and _DEVICE_INDEX() == first.device \
            and all(_kept_like(launch, first) for launch in launches):
        stream = _RAW_STREAM(first.device)
        for launch in launches:
            c, g = launch.compiled, launch.grid
            c.run(g[0], g[1], g[2], stream, c.function, c.packed_metadata, None, None, None,
                  *tensors, *launch.tail)
        return
    for launch in launches:
        launch(*tensors)


def _kept_like(launch: Launch, first: Launch) -> bool:
    """`launch` has kept its compiled kernel for the alignment and device `first` kept its
    own for, and takes no per-call scalar."""
    return launch.compiled is not None and not launch.per_call \
        and launch.aligned == first.aligned and launch.device == first.device


def _int32(value) -> bool:
    return type(value) is int and -2 ** 31 <= value < 2 ** 31


def _same_kind(value, kept) -> bool:
    """A per-call argument the kept launch takes in place of `kept`: an int32 for an int32,
    a tensor of its dtype for a tensor (an unspecialised pointer: any address will do)."""
    if isinstance(kept, torch.Tensor):
        return isinstance(value, torch.Tensor) and value.dtype == kept.dtype
    return _int32(value)


def _unspecialised(kernel, names: list) -> set:
    """The parameters (of those `names`) `kernel` is not specialised on: its
    do_not_specialize, by name or position (a JITFunction's attribute, or the keyword an
    interpreted one keeps)."""
    marked = getattr(kernel, "do_not_specialize", None)
    if marked is None:
        marked = getattr(kernel, "kwargs", {}).get("do_not_specialize") or ()
    return {names[m] if isinstance(m, int) else m for m in marked}


_DATA_PTR = torch.Tensor.data_ptr


def _alignment(tensors) -> int:
    """One bit per tensor argument: its data pointer is 16-byte aligned (what Triton
    specialises a pointer on). All aligned, the usual case, is told from the OR of the
    pointers (map and reduce in C: about 40% less a launch of 16 tensors here)."""
    if not reduce(or_, map(_DATA_PTR, tensors), 0) & 15:
        return (1 << len(tensors)) - 1
    bits = 0
    for i, t in enumerate(tensors):
        if t.data_ptr() % 16 == 0:
            bits |= 1 << i
    return bits


_RUNTIME = None


def _no_hooks() -> bool:
    """No launch hook is set (a profiler's, Proton's): Triton's own path calls them."""
    global _RUNTIME
    if _RUNTIME is None:
        from triton import knobs
        _RUNTIME = knobs.runtime
    return not (_hooked(_RUNTIME.launch_enter_hook) or _hooked(_RUNTIME.launch_exit_hook))


def _hooked(hook) -> bool:
    """A hook is set: a callable (older Triton), or a HookChain with calls in it (Triton 3.5+,
    where the knob is an empty HookChain, never None, when nothing is hooked)."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True
