"""A seeded fuzz of the custom-op path (the pydl::<name> ops torch.compile runs) across the
option space of tests/test_option_fuzz.py's case makers, with what they leave out: the
recurrent cells, training dropout, recompute and packed sequences in the layers, attention
dropout and attention_with_weights, double backward, torch.autocast.

Eager calls run a call signature's plan, which launches kernels without the custom ops; the
ops run under torch.compile and for tensor subclasses. Each case:
- runs the public call (forward and backward, sometimes double backward) twice on the same
  values: in eager mode, and with the op path forced (every tensor taken for a subclass, as
  FakeTensor or FunctionalTensor would be), recording each pydl:: op call with its real
  arguments; outputs and gradients must agree bitwise (cross-entropy's two-pass gradient,
  which torch.compile runs, within rounding of the one its eager forward writes);
- runs torch.library.opcheck on every recorded call: the schema (no aliasing, no mutation),
  the fake implementation against the real one (shapes, dtypes, strides, aliasing) and AOT
  dispatch with dynamic shapes (its comparison taking NaN for NaN: _aot_dispatch_check);
- every fourth seed, compiles the public call (fullgraph, "aot_eager") and compares its
  outputs and gradients with eager mode's, to float32 (float16) rounding.

QUICK seeds per family, backend and algorithm (FULL with --full); PYDL_FUZZ_SEED=<seed> runs
one. `python tests/test_op_fuzz.py FAMILY N [FIRST_SEED]` runs N seeds of a family on each of
its backends as a script and prints each failure (PYDL_FUZZ_VERBOSE=1: every case and the
ops it recorded), for long runs.
"""
import contextlib
import functools
import os
import sys

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(__file__))
import test_option_fuzz as OF  # noqa: E402
from conftest import DEVICE, fuzz_seeds  # noqa: E402

import pydl  # noqa: E402
from pydl import _plan, softmax_ce  # noqa: E402

QUICK, FULL = 2, 40
# (rtol, atol) of the comparisons that allow rounding: float32's, or the lower precision's
ROUNDING = {torch.float32: (1.3e-6, 1e-5), torch.float16: (1e-3, 1e-3),
            torch.bfloat16: (1.6e-2, 1e-2)}


def _plain_users() -> list:
    """The modules that decide between a plan and the op path with plain_tensors (each has
    it from pydl._plan): looked up rather than listed, so that no module that takes it up
    later keeps its plans here unnoticed."""
    users = [m for name, m in sorted(sys.modules.items()) if name.startswith("pydl.")
             and getattr(m, "plain_tensors", None) is _plan.plain_tensors]
    assert len(users) > 5, [m.__name__ for m in users]      # the families' modules
    return users


@contextlib.contextmanager
def forced_op_path(grad_in_forward=True):
    """Every public call takes the kernel ops through torch's dispatcher with real tensors
    (what a tensor subclass gets): no plan, no direct call. Cached calls built here are
    dropped on both sides. grad_in_forward False: cross-entropy's two-pass form, as under
    torch.compile (else its forward writes the gradient where eager mode's does)."""
    saved = [(m, "plain_tensors", m.plain_tensors) for m in _plain_users()]
    if not grad_in_forward:
        saved.append((softmax_ce, "_grad_in_forward", softmax_ce._grad_in_forward))
    _plan.clear_all()
    try:
        for mod, name, _ in saved:
            setattr(mod, name, lambda *a: False)
        yield
    finally:
        for mod, name, fn in saved:
            setattr(mod, name, fn)
        _plan.clear_all()


def _snapshot(a):
    """A copy of a recorded argument with its own storage, strides and offset kept."""
    if isinstance(a, torch.Tensor):
        t = a.detach()
        copy = torch.empty(0, dtype=t.dtype, device=t.device)
        return copy.set_(t.untyped_storage().clone(), t.storage_offset(), t.size(), t.stride())
    if isinstance(a, (list, tuple)):
        return type(a)(_snapshot(x) for x in a)
    return a


class RecordOps(TorchDispatchMode):
    """Records every pydl:: op call: (op overload, snapshot of its args)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "pydl":
            self.calls.append((func, _snapshot(args), _snapshot(kwargs)))
        return func(*args, **kwargs)


def _signature(a):
    if isinstance(a, torch.Tensor):
        return ("T", tuple(a.shape), a.stride(), a.dtype)
    if isinstance(a, (list, tuple)):
        return tuple(_signature(x) for x in a)
    return a


# --- extra case makers: the cells, and options test_option_fuzz leaves out -----------------

def _cell(rng, dtype, backend, algo):
    lstm = rng.random() < 0.5
    G = 4 if lstm else 3
    I, H, B = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 4))
    unbatched = rng.random() < 0.15
    shape = (I,) if unbatched else (B, I)
    sshape = (H,) if unbatched else (B, H)
    x = OF._tensor(rng, shape, dtype, str(rng.choice(["contig", "sliced"])))
    w_ih = OF._tensor(rng, (G * H, I), dtype, OF._layout(rng))
    w_hh = OF._tensor(rng, (G * H, H), dtype, OF._layout(rng))
    bias = rng.random() < 0.7
    b_ih = OF._tensor(rng, (G * H,), dtype, OF._layout(rng)) if bias else None
    b_hh = OF._tensor(rng, (G * H,), dtype, OF._layout(rng)) if bias and rng.random() < 0.8 \
        else None
    states = [OF._tensor(rng, sshape, dtype, OF._layout(rng)) for _ in range(2 if lstm else 1)] \
        if rng.random() < 0.7 else []
    n = len(states)

    def ours(x, *rest):
        st, (w_ih, w_hh, b_ih, b_hh) = rest[:n], rest[n:]
        if lstm:
            return pydl.lstm_cell(x, tuple(st) if st else None, w_ih, w_hh, b_ih, b_hh,
                                  backend=backend)
        return pydl.gru_cell(x, st[0] if st else None, w_ih, w_hh, b_ih, b_hh, backend=backend)
    case = f"{'lstm' if lstm else 'gru'}_cell x{shape} H={H} states={n} bias={b_ih is not None}"
    return case, ours, None, [x, *states, w_ih, w_hh, b_ih, b_hh], I + H


def _rnn(rng, dtype, backend, algo):
    """test_option_fuzz's layers and options, with those it leaves out: recompute, training
    dropout between layers (its mask drawn from torch's generator, seeded per call here), a
    PackedSequence input."""
    lstm = rng.random() < 0.5
    I, H = int(rng.integers(1, 5)), int(rng.integers(1, 5))
    L = int(rng.integers(1, 3))
    opts = dict(num_layers=L, bias=bool(rng.random() < 0.8),
                batch_first=bool(rng.random() < 0.3), bidirectional=bool(rng.random() < 0.4))
    proj = int(rng.integers(1, H)) if lstm and H > 1 and rng.random() < 0.3 else 0
    module = (torch.nn.LSTM(I, H, proj_size=proj, **opts) if lstm
              else torch.nn.GRU(I, H, **opts)).to(DEVICE)
    T, B = int(rng.integers(1, 5)), int(rng.integers(1, 4))
    packed = rng.random() < 0.2
    unbatched = not packed and rng.random() < 0.15
    shape = (T, I) if unbatched else ((B, T, I) if opts["batch_first"] else (T, B, I))
    x = OF._tensor(rng, shape, dtype, str(rng.choice(["contig", "transposed"])))
    lengths = sorted((int(v) for v in rng.integers(1, T + 1, B)), reverse=True)
    enforce_sorted = bool(rng.random() < 0.5)
    if packed and not enforce_sorted:
        rng.shuffle(lengths)
    D = 2 if opts["bidirectional"] else 1
    P = proj or H
    states = []
    if rng.random() < 0.6:
        states = [OF._tensor(rng, (L * D, P) if unbatched else (L * D, B, P), dtype,
                             OF._layout(rng))]
        if lstm:
            states.append(OF._tensor(rng, (L * D, H) if unbatched else (L * D, B, H), dtype,
                                     OF._layout(rng)))
    # the module's weight shapes, in any layout (the values drawn here)
    weights = [OF._tensor(rng, tuple(w.shape), dtype, OF._layout(rng)) * 0.5
               for w in module._flat_weights]
    n = len(states)
    extra = dict(recompute=bool(rng.random() < 0.3))
    if L > 1 and rng.random() < 0.3:
        extra.update(dropout=float(rng.choice([0.3, 1.0])), training=True)
    fn = pydl.lstm if lstm else pydl.gru

    def layer(x, *rest):
        hx = (tuple(rest[:n]) if lstm else rest[0]) if n else None
        out, hn = fn(x, hx, list(rest[n:]), **opts, **extra, backend=backend, algo=algo)
        return (out, *hn) if lstm else (out, hn)

    def pack(x):
        return torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths),
                                                       opts["batch_first"], enforce_sorted)

    def ours(x, *rest):
        return layer(pack(x) if packed else x, *rest)

    def compiled(**options):    # dynamo does not trace pack_padded_sequence: packed outside
        c = torch.compile(layer, **options)
        return lambda x, *rest: c(pack(x) if packed else x, *rest)
    ours.compiled = compiled
    case = (f"{'lstm' if lstm else 'gru'} x{shape} {opts} proj={proj} states={n} {extra} "
            f"packed={packed and (lengths, enforce_sorted)} algo={algo}")
    return case, ours, None, [x, *states, *weights], 4 * T * (I + H)


def _attention_dropout(rng, dtype, backend, algo):
    """test_option_fuzz's attention with dropout (its seed drawn from torch's generator)."""
    case, _, _, (q, k, v, m), reduction = OF._attention(rng, dtype, backend, algo)
    opts = dict(dropout_p=float(rng.choice([0.25, 0.5])),
                is_causal="'is_causal': True" in case, enable_gqa="'enable_gqa': True" in case)

    def ours(q, k, v, m):
        return pydl.scaled_dot_product_attention(q, k, v, m, **opts, backend=backend, algo=algo)
    return case + f" dropout={opts['dropout_p']}", ours, None, [q, k, v, m], reduction


def _attention_weights(rng, dtype, backend, algo):
    """attention_with_weights (the triton backend's naive kernels, numba's weights kernel)."""
    case, ours, theirs, (q, k, v, m), reduction = OF._attention(rng, dtype, backend, algo)
    from pydl.attention import attention_with_weights
    causal = "'is_causal': True" in case
    gqa = "'enable_gqa': True" in case

    def weights(q, k, v, m):
        return attention_with_weights(q, k, v, m, is_causal=causal, enable_gqa=gqa,
                                      backend=backend)[0]
    # numba's weights are marked to raise on backward, a Function dynamo cannot trace
    weights.compiles_with_grad = backend != "numba"
    return case.replace("sdpa", "attention_with_weights"), weights, None, [q, k, v, m], reduction


# family: (case makers, (backend, algo) variants)
FAMILIES = {
    "conv2d": ((OF._conv,), [("triton", "implicit"), ("triton", "im2col"), ("numba", None)]),
    "pools": ((OF._pool,), [("triton", None), ("numba", None)]),
    "softmax_cross_entropy": ((OF._softmax_ce,), [("triton", None), ("numba", None)]),
    "linear_cross_entropy": ((OF._linear_ce,), [("triton", None), ("numba", None)]),
    "attention": ((OF._attention, _attention_weights, _attention_dropout),
                  [("triton", "flash"), ("triton", "naive"), ("numba", None)]),
    "rnn": ((_rnn,), [("triton", "persistent"), ("triton", "steps"), ("numba", None)]),
    "cells": ((_cell,), [("triton", None), ("numba", None)]),
}


# --- one case ---------------------------------------------------------------------------------

def _leaves(inputs, need):
    return [t.detach().clone().requires_grad_(n) if isinstance(t, torch.Tensor)
            and t.is_floating_point() else t for t, n in zip(inputs, need)]


def _outputs(out):
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _flat(out):
    flat = []
    for o in _outputs(out):
        flat += _flat(o) if isinstance(o, (tuple, list)) else [o]
    return flat


def _run_call(fn, inputs, need, cots, seed, double=None):
    """(outputs, gradients of the inputs that need one) of fn on fresh leaves, torch's
    generator seeded first (dropout); with `double` (cotangents of those gradients) also the
    gradients of <gradients, double> (double backward)."""
    leaves = _leaves(inputs, need)
    torch.manual_seed(seed)
    out = _flat(fn(*leaves))
    diff = [(o, c) for o, c in zip(out, cots) if isinstance(o, torch.Tensor) and o.requires_grad]
    grads = []
    if diff:
        wrt = [t for t, n in zip(leaves, need) if n]
        grads = torch.autograd.grad([o for o, _ in diff], wrt, [c.to(o.dtype) for o, c in diff],
                                    allow_unused=True, create_graph=double is not None)
        if double is not None:
            terms = [(g * c.to(g.dtype)).sum() for g, c in zip(grads, double)
                     if g is not None and g.requires_grad]
            grads = [None if g is None else g.detach() for g in grads]
            if terms:
                grads += torch.autograd.grad(sum(terms), wrt, allow_unused=True)
    return [o.detach() if isinstance(o, torch.Tensor) else o for o in out], list(grads)


def _same(a, b, what, exact=True):
    for i, (x, y) in enumerate(zip(a, b)):
        if x is None or y is None or not isinstance(x, torch.Tensor):
            assert (x is None) == (y is None), f"{what} {i}: {x} vs {y}"
            continue
        assert x.shape == y.shape and x.dtype == y.dtype, \
            f"{what} {i}: {tuple(x.shape)} {x.dtype} vs {tuple(y.shape)} {y.dtype}"
        if exact or not x.is_floating_point():
            assert torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)) and \
                torch.equal(x.isnan(), y.isnan()), f"{what} {i} differ: {x} vs {y}"
        else:
            rtol, atol = ROUNDING[x.dtype]
            torch.testing.assert_close(x, y, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=functools.partial("{} {}: {}".format, what, i))


# opcheck's tests, each run alone so that one failing does not hide another
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor",
                 "test_aot_dispatch_dynamic")


def run_case(maker, seed, backend, algo, compile_every=4, checked=None):
    """Runs one case; returns a list of failure strings (empty: all good)."""
    rng = np.random.default_rng(seed)
    dtype = OF.DTYPES[int(rng.integers(len(OF.DTYPES)))]
    case, ours, _, inputs, *_ = maker(rng, dtype, backend, algo)
    if dtype == torch.float32 and rng.random() < 0.2:
        ours, case = _autocast(ours), case + " autocast(float16)"
    name = f"seed {seed} {backend}/{algo} {dtype} {case}"
    floating = [isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs]
    need = [f and rng.random() < 0.75 for f in floating]
    failures = []
    try:
        out, grads = _run_call(ours, inputs, need, [], seed)
    except (ValueError, TypeError, RuntimeError, IndexError, NotImplementedError):
        return name, failures, 0       # refused in eager mode: nothing to compare
    cots = [OF._tensor(rng, o.shape, torch.float32) if isinstance(o, torch.Tensor)
            and o.is_floating_point() else None for o in out]
    double = None
    if rng.random() < 0.3:     # double backward, where the op has one
        double = [OF._tensor(rng, t.shape, torch.float32) if n else None
                  for t, n in zip(inputs, need)]
        double = [d for d in double if d is not None]
        try:
            _run_call(ours, inputs, need, cots, seed, double)
        except Exception:  # noqa: BLE001  (no double backward: a first-order case)
            double = None
    out, grads = _run_call(ours, inputs, need, cots, seed, double)

    rec = RecordOps()
    try:
        with forced_op_path(grad_in_forward=seed % 2 == 0), rec:
            f_out, f_grads = _run_call(ours, inputs, need, cots, seed, double)
        # cross-entropy's two-pass gradient rounds differently from the gradient its eager
        # forward writes and the backward scales (fp16: twice rounded)
        _same(f_out, out, "op path: output")
        _same(f_grads, grads, "op path: gradient", exact=seed % 2 == 0)
    except Exception as exc:  # noqa: BLE001
        failures.append(f"{name}: op path: {type(exc).__name__}: {exc}")

    if os.environ.get("PYDL_FUZZ_VERBOSE"):
        print(name, "double" if double else "", [op.name() for op, _, _ in rec.calls], flush=True)
    checked = {} if checked is None else checked
    n_checks = 0
    for op, args, kwargs in rec.calls:
        key = (op.name(), _signature(args))
        if key in checked:
            continue
        checked[key] = True
        n_checks += 1
        res = torch.library.opcheck(op, args, kwargs, test_utils=OPCHECK_UTILS[:3],
                                    raise_exception=False)
        res["test_aot_dispatch_dynamic"] = _aot_dispatch_check(op, args, kwargs)
        for util, r in res.items():
            if r != "SUCCESS":
                failures.append(f"{name}: opcheck {op.name()} {util}: {type(r).__name__}: "
                                f"{str(r)[:2000]}\n  args: {_describe(args)}")

    if compile_every and seed % compile_every == 0 and getattr(ours, "compiles", True) and (
            getattr(ours, "compiles_with_grad", True) or not any(need)):
        torch._dynamo.reset()
        try:
            compiled = getattr(ours, "compiled", functools.partial(torch.compile, ours))(
                fullgraph=True, backend="aot_eager")
            c_out, c_grads = _run_call(compiled, inputs, need, cots, seed)
            _same(c_out, out, "compiled: output", exact=False)
            _same(c_grads, grads[:len(c_grads)], "compiled: gradient", exact=False)
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{name}: compiled: {type(exc).__name__}: {str(exc)[:3000]}")
        torch._dynamo.reset()
    return name, failures, n_checks


def _autocast(fn):
    """fn under torch.autocast to float16 (the public ops cast their inputs as torch's)."""
    def run(*args):
        with torch.autocast(DEVICE, dtype=torch.float16):
            return fn(*args)
    run.compiles = getattr(fn, "compiles", True) and not hasattr(fn, "compiled")
    run.compiles_with_grad = getattr(fn, "compiles_with_grad", True)
    return run


def _aot_dispatch_check(op, args, kwargs):
    """opcheck's test_aot_dispatch_dynamic, its comparison taking NaN for NaN: an op whose
    right answer is NaN (cross-entropy's mean over ignored rows only, as torch's) fails
    opcheck's own, which compares by torch.testing.assert_close's default."""
    from torch.testing._internal.optests.aot_autograd import aot_autograd_check
    from torch.utils import _pytree as pytree

    def func(*args, **kwargs):
        args, kwargs = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        return op(*args, **kwargs)
    try:
        aot_autograd_check(func, args, kwargs, True, check_gradients="auto",
                           assert_equals_fn=functools.partial(torch.testing.assert_close,
                                                              equal_nan=True))
        return "SUCCESS"
    except Exception as exc:  # noqa: BLE001
        return exc


def _describe(args):
    if isinstance(args, torch.Tensor):
        return f"T{tuple(args.shape)}/{args.stride()}/{str(args.dtype)[6:]}"
    if isinstance(args, (list, tuple)):
        return "[" + ", ".join(_describe(a) for a in args) + "]"
    return repr(args)


# --- the test ---------------------------------------------------------------------------------

@pytest.mark.parametrize("family,backend,algo", [(f, b, a) for f, (_, variants) in FAMILIES.items()
                                                 for b, a in variants])
def test_op_fuzz(request, family, backend, algo):
    makers, _ = FAMILIES[family]
    failures = []
    for seed in fuzz_seeds(request, QUICK, FULL):
        _, fails, _ = run_case(makers[seed % len(makers)], seed, backend, algo)
        failures += fails
    assert not failures, "\n".join(failures)


if __name__ == "__main__":
    import time

    from pydl.testing import poisoned_outputs
    family, n = sys.argv[1], int(sys.argv[2])
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 0
    makers, variants = FAMILIES[family]
    total = fails = checks = 0
    t0 = time.time()
    with poisoned_outputs():
        for seed in range(first, first + n):
            for backend, algo in variants:
                torch.manual_seed(seed)
                name, f, c = run_case(makers[seed % len(makers)], seed, backend, algo)
                total += 1
                checks += c
                for msg in f:
                    fails += 1
                    print("FAIL", msg, flush=True)
            print(f"# {family} seed {seed} done: {total} cases, {checks} opchecks, {fails} "
                  f"failures, {time.time() - t0:.0f} s", flush=True)
