"""Backend registry and selection: the one place that decides which implementation runs.

Backends:
  "triton" - pydl's Triton kernels (the default for CUDA tensors)
  "numba"  - pydl's Numba CUDA kernels
  "torch"  - the baseline: PyTorch's own ATen/cuDNN implementation, named as such. It is what
             pydl is measured against, never a silent substitute for a missing kernel.

Selection, first match wins: the op's `backend=` keyword, the innermost `pydl.use_backend(...)`
context, the PYDL_BACKEND environment variable, then "triton".

Each op family registers its implementations with `@register(op, backend)`; `dispatch` returns
the implementation after checking that the tensors can run there (same device; a CUDA device,
or CPU tensors under PYDL_INTERPRET=1 emulation; no bfloat16 tensor for Triton's interpreter,
which computes bfloat16 wrongly).
"""
from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable, Iterator

import torch

from . import _env, _plan

BACKENDS: tuple[str, ...] = ("triton", "numba", "torch")
KERNEL_BACKENDS: tuple[str, ...] = ("triton", "numba")
DEFAULT_BACKEND = "triton"

_registry: dict[str, dict[str, Callable]] = {}
_algos: dict[str, dict[str, tuple[str, ...]]] = {}
# The stack of `use_backend` contexts, per thread. A threading.local rather than a ContextVar:
# torch.compile's dynamo can read (and guard on) it, so a compiled model re-traces when the
# backend around it changes instead of breaking the graph.
_context = threading.local()


def _check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name.lower()


def register(op: str, backend: str, algos: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as the implementation of `op` on `backend`, with the
    algorithms it offers through `algo=` (the first is the default; none: no choice). The
    calls checked so far are forgotten: each holds the implementation it dispatched to."""
    backend = _check_name(backend, "register")

    def wrap(fn: Callable) -> Callable:
        _registry.setdefault(op, {})[backend] = fn
        _algos.setdefault(op, {})[backend] = tuple(algos)
        _plan.clear_all()
        return fn

    return wrap


def implementations(op: str) -> dict[str, Callable]:
    """The registered implementations of `op`, by backend name."""
    return dict(_registry.get(op, {}))


def algorithms(op: str, backend: str) -> tuple[str, ...]:
    """The algorithms `op` offers on `backend` (`algo=`), the default first; () for none."""
    return _algos.get(op, {}).get(backend, ())


def resolve_algo(op: str, backend: str, algo: str | None) -> str | None:
    """The algorithm to run: `algo`, or the backend's default when None; one error for all ops."""
    algos = algorithms(op, backend)
    if algo is None:
        return algos[0] if algos else None
    if algo not in algos:
        if not algos:
            raise ValueError(f"{op}: the {backend!r} backend has no algo= choice, got {algo!r}")
        raise ValueError(f"{op}: algo={algo!r} is not available on the {backend!r} backend "
                         f"(available: {', '.join(algos)})")
    return algo


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Run the ops inside the `with` block on `name` unless an op's `backend=` says otherwise."""
    stack = _context.__dict__.setdefault("stack", [])
    stack.append(_check_name(name, "use_backend"))
    try:
        yield name
    finally:
        stack.pop()


# os.environ.get decodes on every call (about 1.5 us); the raw table is read instead where
# the platform has one (POSIX: bytes keys), and the name is validated once per value.
_ENV_KEY = b"PYDL_BACKEND"
_env_raw = getattr(os.environ, "_data", None)
_env_seen: dict = {}


def _env_backend() -> str | None:
    if isinstance(_env_raw, dict) and os.name == "posix":
        raw = _env_raw.get(_ENV_KEY)
    else:
        raw = os.environ.get("PYDL_BACKEND")
    if not raw:
        return None
    name = _env_seen.get(raw)
    if name is None:
        text = raw.decode() if isinstance(raw, bytes) else raw
        name = _env_seen[raw] = _check_name(text, "PYDL_BACKEND")
    return name


def current_backend() -> str:
    """The backend an op without `backend=` would use: context, then PYDL_BACKEND, then default."""
    stack = getattr(_context, "stack", None)
    if stack:
        return stack[-1]
    return _env_backend() or DEFAULT_BACKEND


def check_device(backend: str, *tensors: torch.Tensor) -> torch.device:
    """All tensors on one device, and that device can run `backend`; returns the device."""
    ts = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not ts:
        raise TypeError("expected at least one tensor argument")
    device = ts[0].device
    for t in ts[1:]:
        if t.device != device:
            raise RuntimeError(f"expected all tensors on one device, got {device} and {t.device}")
    if backend in KERNEL_BACKENDS:
        if device.type == "cpu" and not _env.INTERPRET:
            raise RuntimeError(
                f"the {backend!r} backend runs GPU kernels and got CPU tensors. Move the tensors "
                "to a CUDA device, or set PYDL_INTERPRET=1 before importing pydl to run the "
                "kernels in emulation on the CPU (slow; for tests and debugging), or pass "
                "backend='torch' (or use pydl.use_backend('torch')) for PyTorch's own "
                "implementation")
        if device.type not in ("cuda", "cpu"):
            raise RuntimeError(f"the {backend!r} backend does not run on {device.type} tensors")
        if backend == "triton" and _env.INTERPRET:
            _check_interpreter_dtypes(ts)
    return device


def _check_interpreter_dtypes(tensors) -> None:
    """Triton's interpreter (emulation) computes bfloat16 wrongly: its dot products are off by
    orders of magnitude (a conv2d by 1e10), so a bf16 tensor there raises instead of giving a
    wrong answer. Every op passes all its tensors through here (dispatch), autocast's casts
    included. The Numba simulator decodes bf16 bit patterns itself and computes it right."""
    for t in tensors:
        if t.dtype == torch.bfloat16:
            raise TypeError(
                "the 'triton' backend got a bfloat16 tensor in emulation (PYDL_INTERPRET=1): "
                "Triton's interpreter computes bfloat16 wrongly, so pydl refuses it there. Run "
                "bfloat16 on a GPU, or use float16 / float32 (torch.autocast(..., "
                "dtype=torch.float16) under autocast), or backend='numba' (its simulator "
                "computes bfloat16 correctly), or backend='torch'")


def dispatch(op: str, backend: str | None, *tensors: torch.Tensor) -> tuple[str, Callable]:
    """(backend name, implementation) of `op` for `backend` (None = current) on these tensors."""
    name = current_backend() if backend is None else _check_name(backend, f"{op}(backend=...)")
    impls = _registry.get(op, {})
    if name not in impls:
        have = ", ".join(sorted(impls)) or "none"
        raise NotImplementedError(f"{op} has no {name!r} implementation yet (available: {have})")
    check_device(name, *tensors)
    return name, impls[name]
