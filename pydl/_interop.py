"""The public ops' wrapper (`public_op`): each runs on its tensors' CUDA device, as torch's ops
do, and takes arrays from outside torch.

Arrays from outside torch: the functional ops take CuPy arrays (or any array that speaks
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


def public_op(fn: Callable) -> Callable:
    """Decorator of a pydl functional op `fn`: it runs on its tensors' device, and it also
    takes DLPack arrays, then returning the first such argument's kind of array. fn must
    refuse a non-tensor argument before it does anything (every pydl op checks its tensors
    first): the wrapper converts only then."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return on_tensors_device(fn, args, kwargs)      # torch callers: nothing more
        except Exception:
            first = next((a for a in (*args, *kwargs.values()) if _foreign(a) is not None),
                         None)
            if first is None:
                raise
        lib = array_module_of(_foreign(first))
        out = on_tensors_device(fn, _to_torch(args), {k: _to_torch(v) for k, v in kwargs.items()})
        return _from_torch(out, lib.from_dlpack)
    return wrapper


# --- the tensors' device -------------------------------------------------------------------
# A kernel launches on the current CUDA device and its current stream (Triton's launcher,
# Numba's context, the tuner's timings), as torch's own ops do only inside the device guard
# each of them takes. A pydl op on tensors of another device than the current one (a model
# moved to "cuda:1" without torch.cuda.set_device) would launch on the wrong device: an
# illegal address, or with peer access a kernel that reads the tensors' memory outside their
# stream's order. So the op runs under a guard of its tensors' device, where that differs.

_CURRENT_DEVICE = getattr(torch._C, "_cuda_getDevice", None)    # absent from CPU builds


def on_tensors_device(fn: Callable, args, kwargs):
    """fn(*args, **kwargs) with the CUDA device of its first argument (a tensor, or a
    PackedSequence's data) current, as torch's ops run; nothing more (about 0.2 us) where it
    is already current, for CPU tensors, and under torch.compile (whose graphs take their own
    device guard)."""
    if _FORWARD_AD._current_level >= 0 or torch._C._are_functorch_transforms_active():
        if not torch.compiler.is_compiling():
            _refuse_transforms(fn, args, kwargs)
    x = args[0] if args else next(iter(kwargs.values()), None)
    if not isinstance(x, torch.Tensor):
        x = getattr(x, "data", None)            # a PackedSequence
    if isinstance(x, torch.Tensor):
        device = x.device
        if device.type == "cuda" and _CURRENT_DEVICE is not None \
                and not torch.compiler.is_compiling() and device.index != _CURRENT_DEVICE():
            with torch.cuda.device(device.index):
                return fn(*args, **kwargs)
    return fn(*args, **kwargs)


_FORWARD_AD = torch.autograd.forward_ad     # its _current_level: -1 outside dual_level()


def _refuse_transforms(fn: Callable, args, kwargs) -> None:
    """Forward-mode AD (dual tensors) and torch.func's transforms (vmap, grad, jacrev, jvp)
    reach no pydl kernel: pydl's Functions define neither a jvp nor a vmap rule, and the
    eager path would run on a dual tensor's primal alone, its tangent silently dropped. So a
    kernel backend refuses them by name; backend='torch' (torch's own ops) runs them."""
    from .backends import current_backend
    if (kwargs.get("backend") or current_backend()) == "torch":
        return
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if torch._C._are_functorch_transforms_active():
        what = "torch.func transforms (vmap, grad, jacrev, jvp)"
    elif any(_FORWARD_AD.unpack_dual(t).tangent is not None for t in tensors):
        what = "forward-mode AD (dual tensors)"
    else:
        return
    raise NotImplementedError(
        f"pydl.{fn.__name__} does not support {what} on pydl's kernel backends (the kernels "
        f"have no jvp or batching rule); use backend='torch' (or pydl.use_backend('torch')) "
        f"for this call")
