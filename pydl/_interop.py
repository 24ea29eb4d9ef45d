"""Arrays from outside torch: the functional ops take CuPy arrays (or any array that speaks
DLPack: NumPy, JAX, ...) and return arrays of the caller's library.

Inputs are wrapped with torch.from_dlpack (zero copy: the tensor shares the array's memory,
on its device and stream) and tensor outputs go back through the caller's library's
`from_dlpack` (zero copy again). Nested tuples and lists (an LSTM's (h, c) state, its weight
list) are converted too. There is no autograd across the boundary: CuPy has none.

Torch callers pay nothing but the call: the op runs on the arguments as given first, and an
array from outside torch fails its checks (pydl's ops take tensors only) before anything is
allocated or launched; only then are the arguments looked at, converted, and the op run again.
"""
from __future__ import annotations

import functools
import sys
from typing import Callable

import torch

_PLAIN = (torch.Tensor, int, float, bool, str, type(None))


def _foreign(obj):
    """The first non-torch DLPack array in obj (looking one level into tuples and lists)."""
    if isinstance(obj, _PLAIN):
        return None
    if isinstance(obj, (tuple, list)):
        for item in obj:
            if not isinstance(item, _PLAIN) and not isinstance(item, (tuple, list)) \
                    and hasattr(item, "__dlpack__"):
                return item
        return None
    return obj if hasattr(obj, "__dlpack__") else None


def _to_torch(obj):
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_torch(o) for o in obj)
    if not isinstance(obj, _PLAIN) and hasattr(obj, "__dlpack__"):
        return torch.from_dlpack(obj)
    return obj


def _from_torch(obj, from_dlpack: Callable):
    if isinstance(obj, torch.Tensor):
        # DLPack exports no autograd state; the caller's library has none to receive.
        return from_dlpack(obj.detach())
    if isinstance(obj, (tuple, list)):
        return type(obj)(_from_torch(o, from_dlpack) for o in obj)
    return obj


def array_module_of(array) -> object:
    """The library an array comes from (cupy, numpy, ...), by its type's top-level module."""
    return sys.modules[type(array).__module__.split(".")[0]]


def accepts_arrays(fn: Callable) -> Callable:
    """Decorator: `fn` (a pydl functional op) also takes DLPack arrays, and then returns the
    first such argument's kind of array. fn must refuse a non-tensor argument before it does
    anything (every pydl op checks its tensors first): the wrapper converts only then."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)          # torch callers: nothing more
        except Exception:
            first = next((a for a in (*args, *kwargs.values()) if _foreign(a) is not None),
                         None)
            if first is None:
                raise
        lib = array_module_of(_foreign(first))
        out = fn(*_to_torch(args), **{k: _to_torch(v) for k, v in kwargs.items()})
        return _from_torch(out, lib.from_dlpack)
    return wrapper
