"""torch.library registration: every kernel launch of pydl is a custom op `pydl::<name>`.

pydl's autograd Functions stay the public wrappers (forward and backward in Python), but
the work inside them - allocating outputs and launching Triton or Numba kernels - runs
through custom ops with fake (meta) implementations. That is what lets `torch.compile`
trace a model that calls pydl ops with `fullgraph=True`: dynamo traces the Function's
Python, sees each launch as one opaque op, and learns its output shapes from the fake
implementation instead of running the kernel. FlashAttention wraps its kernels the same way.

Rules the ops follow (torch.library's contract):
- outputs never alias inputs or each other (a kernel writes fresh tensors);
- the fake implementation returns tensors of exactly the real one's shapes, dtypes and
  strides;
- the backend travels as a string (`"triton"` / `"numba"`), never as a Python object.

Autocast: the public functions cast their inputs as torch's autocast does for the op they
replace (`autocast_inputs`), so a pydl op under `torch.autocast` runs in the dtype the torch
op would, eager or compiled.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

from ._env import INTERPRET, emulated_launch
from ._plan import plain_tensors

NAMESPACE = "pydl"

# torch's autocast policies (aten/src/ATen/autocast_mode.cpp), by device type and op: inputs
# cast to the autocast dtype ("lower"), or to float32 ("float32"). Ops absent from a device's
# table (pooling everywhere; softmax, the GRU and the cells on the CPU) keep their input dtype.
# The CPU's LSTM layer runs in the lower precision (torch's CPU autocast casts its oneDNN
# layer, and torch.nn.LSTM with projections too, although oneDNN does not run those).
LOWER, FLOAT32 = "lower", "float32"
AUTOCAST_POLICY = {
    "cuda": {"conv2d": LOWER, "scaled_dot_product_attention": LOWER, "lstm_cell": LOWER,
             "gru_cell": LOWER, "lstm": LOWER, "gru": LOWER,
             "softmax": FLOAT32, "log_softmax": FLOAT32, "cross_entropy": FLOAT32,
             "linear": LOWER},
    "cpu": {"conv2d": LOWER, "scaled_dot_product_attention": LOWER, "lstm": LOWER,
            "cross_entropy": FLOAT32, "linear": LOWER},
}


def kernel_op(name: str, fake: Callable) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` (annotated with torch types) as the custom op pydl::name,
    with `fake` as its fake-tensor implementation.

    Returns a function with fn's signature that calls the op while torch.compile traces
    (and for tensor subclasses such as FakeTensor), and calls `fn` directly in eager mode:
    a custom op's Python dispatch costs tens of microseconds a call, as much as a small
    kernel, and eager mode gains nothing from it. Geometry arguments (pydl's frozen geometry
    dataclasses) travel to the op as int lists and to `fn` as they are in eager mode, so `fn`
    reads them with `as_geometry`. The op itself is the `.op` attribute
    (`torch.ops.pydl.<name>`), for torch.library.opcheck and for users who want it.
    """
    def wrap(fn: Callable) -> Callable:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", fn, mutates_args=())
        op.register_fake(fake)
        if INTERPRET:   # the interpreter state emulated kernels need, for their launch only
            fn = emulated_launch(fn)
            op.register_kernel(("cpu", "cuda"), fn)

        @functools.wraps(fn)
        def call(*args):
            if torch.compiler.is_compiling() or not plain_tensors(*args):
                return op(*[geometry_args(a) if isinstance(a, Geometry) else a for a in args])
            return fn(*args)

        call.op = op
        return call
    return wrap


def empty_like_shape(t: torch.Tensor, shape=None, dtype: torch.dtype | None = None,
                     memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """A fresh tensor on t's device (for fake implementations and placeholders)."""
    return torch.empty(t.shape if shape is None else shape,
                       dtype=t.dtype if dtype is None else dtype, device=t.device,
                       memory_format=memory_format)


def autocast_inputs(op: str, *tensors):
    """`tensors` cast as torch.autocast casts the inputs of the torch op `op` replaces, when
    autocast is on for their device: the tensors autocast deems eligible, floating ones but
    float64 (which autocast leaves alone: a float64 input then meets the kernel backends'
    dtype check, as it would outside autocast); None and others pass through."""
    if not torch._C._is_any_autocast_enabled():
        return tensors                          # the common case, decided in 0.05 us
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None:
        return tensors
    device_type = first.device.type
    policy = AUTOCAST_POLICY.get(device_type, {}).get(op)
    if policy is None or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type) if policy == LOWER else torch.float32
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


class Geometry:
    """Base of the frozen geometry dataclasses the launchers take (ConvGeometry,
    PoolGeometry). A custom op takes one as the list of its fields (`geometry_args`); in eager
    mode the object itself travels, so nothing is converted (`as_geometry` accepts both).

    Geometries key the launch caches, so their hash is computed once: a subclass sets
    `__hash__ = Geometry.__hash__` in its body (a frozen dataclass would otherwise hash all
    its fields on every lookup)."""

    def __hash__(self) -> int:
        try:
            return self.__dict__["_hash"]
        except KeyError:
            h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", h)
            return h


def geometry_args(g) -> list[int]:
    """A frozen geometry dataclass as the int list a custom op takes (bools as 0/1)."""
    return [int(getattr(g, f.name)) for f in dataclasses.fields(g)]


def geometry_from(cls, args) -> object:
    """The inverse of geometry_args: the dataclass `cls` from its int list."""
    return cls(*[bool(a) if f.type in (bool, "bool") else int(a)
                 for f, a in zip(dataclasses.fields(cls), args)])


def as_geometry(cls, geom):
    """`geom` as a `cls` instance: itself in eager mode, rebuilt from its int list in a
    custom op (under torch.compile)."""
    return geom if isinstance(geom, cls) else geometry_from(cls, geom)


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format
