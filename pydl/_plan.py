"""The path from a public op to its kernels, written once for every op family.

    pydl.conv2d(x, w, b, stride, ...)        the public op (pydl/<op>.py): torch.nn.functional's
      |                                      signature; autocast; builds the call's key
      |-- calls.get(key) -> Call             checks, geometry, backend and algorithm resolved
      |                                      ONCE per signature (shapes, strides, dtypes,
      |                                      device, options, backend); a hit is a lookup
      |-- Call(x, w, b)                      the op on these tensors:
            |-- <Op>Function.apply(...)      autograd, only when a gradient can flow
            |-- <launcher>.forward(...)      the family's launcher (per backend and algo):
                  |                          allocates outputs
                  |-- launches.get(key)      Launch objects, built once per signature: config
                  |                          (autotuned on a GPU), grid, scalar arguments,
                  |                          constexprs
                  |-- Launch(*tensors)       kernel[grid](*tensors, *scalars, **constexprs)

Under torch.compile the same launchers run inside `torch.library` custom ops
(pydl/_library.py), which take the geometry as a list of ints; in eager mode the custom-op
dispatcher is skipped (it costs tens of microseconds a call).

Everything keyed here is decided by the key alone: a check that passed for one call passes
for every call with the same key. What a key holds that can change between calls without a
tensor changing (the backend context, torch's TF32 switches, the current device) is read on
every call and put in the key.
"""
from __future__ import annotations

from typing import Callable, Hashable

import torch

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
            value = self.get(key, build, *args)
        return value


def clear_all() -> None:
    """Forget every cached call and launch (tests; after changing a module-level default that
    a plan captured, such as a block-size cap)."""
    for cache in Cache.all:
        cache.clear()


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


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


class Launch:
    """One Triton kernel launch with everything but its tensors fixed: the kernel and grid, the
    scalar arguments that follow the tensors, and the constexprs (the launch config included).

    Kernels take their tensor arguments first; `Launch(*tensors)` launches. A scalar that
    changes every call (a dropout seed) is the kernel's last one and goes by keyword:
    `Launch(*tensors, seed=s)`."""

    __slots__ = ("run", "scalars", "consts", "kernel", "grid")

    def __init__(self, kernel, grid: tuple, scalars: tuple, consts: dict):
        self.kernel, self.grid = kernel, grid
        self.run = kernel[grid]
        self.scalars = tuple(scalars)
        self.consts = consts

    def __call__(self, *tensors, **dynamic) -> None:
        self.run(*tensors, *self.scalars, **dynamic, **self.consts)
