"""`python -m bench overhead`: what pydl costs on the host around its kernels.

At the sizes real models use a kernel takes tens of microseconds, so the Python between a
public op and its kernels decides the speed a user sees. This command measures it per op
family, forward and backward, on the benchmark suites' own cases and callables:

without a GPU (emulation, kernels stubbed)
    Every kernel launch is replaced by a counter: the Triton interpreter's launch
    (`triton.runtime.interpreter.InterpretedFunction.run`, the interpreter's counterpart of
    the GPU launch path `JITFunction.run`: its argument normalisation and grid execution) and
    what pydl._numba_launch.launch_numba needs of Numba on a GPU (`_NumbaRuntime` below). The stub's
    first launch of a kernel returns a stand-in compiled kernel, so a plan's later launches
    take the path they take on a GPU: pydl._plan.Launch's direct call of the compiled
    launcher (alignment, hook, device and stream reads included; the stand-in checks the
    argument list against the kernel's parameters), and for a Numba kernel the direct path's
    refilled parameter list (its signature and lookup included; checked against the
    stand-in overload's length). What is left is everything pydl does around its kernels: argument
    checks, dispatch, autocast, the launch plan, allocation, the launch call up to the
    compiled launcher (whose C call and driver launch, a few us, are not counted; a kernel
    launched outside a plan, through Triton's JITFunction.run, pays 10-20 us more there).
    Columns: host microseconds per call (median), kernel launches (those by the direct
    path), other torch kernels (ATen ops that would launch on a GPU: not views, not allocations),
    host synchronisations (`.item()`, `bool(tensor)`), and the same op's host time relative
    to torch's own dispatch of a tiny conv2d timed in the same run (the reference that makes
    the numbers comparable across machines). The JSON rows also count the Numba launches
    that did not come from a plan (`numba_unplanned`: launch_numba's per-call signature and
    lookup instead of a NumbaLaunch's kept list; tests/test_overhead.py requires none).

on a GPU (nothing stubbed)
    end to end per call (many calls back to back, one synchronisation at the end: what a
    training loop sees), the sum of the op's kernel times per call (torch.profiler's CUDA
    activity), their ratio, and launches / syncs per call from the same profile.

The backward is timed inside pydl's autograd Function (`grad_fn.apply`, no autograd engine)
when the op's output is the one output of one pydl Function; otherwise through the engine
(`torch.autograd.grad`, marked "engine"; on a CPU the engine adds 20 us or more).

Directions (`--directions`, default fwd bwd): fwd, the forward with inputs that require grad
(training: the autograd Function recorded); bwd, its backward; inf, the same forward under
torch.no_grad (inference: no graph, nothing allocated that only a backward reads).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

# Inputs larger than this are shrunk along their first dimension for the CPU measurement:
# host cost does not depend on the size, CPU allocation of huge outputs does.
CPU_MAX_INPUT_BYTES = 16 * 2**20
# The cases measured per op: representative quick cases (the first when absent). conv2d: a
# 3x3 layer (the implicit-GEMM kernel) and a 1x1 one (the shared GEMM), most of ResNet-50's;
# conv1d: the case whose shrunk output stays under the size the CPU allocator maps afresh.
CPU_CASES = {"conv2d": ("l1-3x3-64", "l1-1x1-64-256"), "conv1d": "whisper-base-conv2",
             "max_pool2d": "vgg-28",
             "avg_pool2d": "densenet-14", "attention": "d128-1k", "lstm": "h1024-b32-t25",
             "gru": "h1536-b32-t187", "lstm_cell": "h1024-b32", "gru_cell": "h1024-b32"}


# --- counting -----------------------------------------------------------------------------

class Counts:
    def __init__(self):
        self.launches = 0
        self.direct = 0         # of the launches, those taking pydl._plan.Launch's direct path
        self.unplanned = 0      # Numba launches not from a plan (launch_numba's own lookup)
        self.aten = 0
        self.syncs = 0
        self.aten_ops: dict[str, int] = {}


_COUNTS: Counts | None = None
_SYNC_OPS = {"_local_scalar_dense", "is_nonzero", "item", "equal"}
_NOT_KERNELS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
                "detach", "lift_fresh", "resize_", "set_", "_to_copy_meta", "copy_meta"}


@contextlib.contextmanager
def stubbed_launches():
    """Kernel launches become counters (emulation only): Triton's interpreter, Numba's
    simulator and pydl's Gluon simulator run nothing."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    from triton.runtime.interpreter import InterpretedFunction

    def count(self, *args, **kwargs):
        if _COUNTS is not None:
            _COUNTS.launches += 1

    compiled: dict = {}     # kernel -> its stand-in compiled kernel

    def triton_launch(self, *args, **kwargs):
        count(self)
        c = compiled.get(self)
        return c if c is not None else compiled.setdefault(self, _Compiled(self))

    old_triton, old_numba = InterpretedFunction.run, FakeCUDAKernel.__call__

    def numba_call(self, *args):
        if self._device:        # a device function called from Python: not a launch
            return old_numba(self, *args)
        count(self)

    # The path a GPU takes: Triton's cross-entropy checks its targets in the kernel there (a
    # PTX trap the interpreter cannot run), so the host check of emulation is not counted.
    # Nor is the interpreter's own state around each kernel op (pydl._env.emulated_launch),
    # nor the frame that sets it around a plan's methods (pydl._plan.emulated).
    # kernel_checks_targets is read where it is called: by the call's plan (pydl.softmax_ce)
    # and by the kernel op (pydl._softmax_ce_ops).
    from pydl import _env, _plan, _softmax_ce_ops, softmax_ce
    old_check = _softmax_ce_ops.kernel_checks_targets
    for module in (softmax_ce, _softmax_ce_ops):
        module.kernel_checks_targets = lambda x, backend: backend in ("triton", "numba")
    # A GPU launches a plan's kernels through pydl._plan.Launch's direct path after their
    # first launch (the compiled kernel's launcher, called with the argument list kept then):
    # the stub's first launch returns a stand-in compiled kernel, so the calls timed take
    # that path too, with the current device and stream reads of CUDA builds stubbed.
    old_device, old_keep, kept = (_plan._DEVICE_INDEX, _plan._RAW_STREAM), _plan.Launch._keep, []

    def keep(launch, compiled, tensors, dynamic):
        old_keep(launch, compiled, tensors, dynamic)
        kept.append(launch)

    _plan._DEVICE_INDEX, _plan._RAW_STREAM = (lambda: 0), (lambda device: 0)
    _plan.Launch._keep = keep
    # Numba's launches likewise take pydl._numba_launch's direct path, with a stand-in of what it
    # needs of Numba on a GPU (_NumbaRuntime): a first launch per argument signature through
    # "Numba", then the parameter list refilled.
    from pydl import _numba_launch
    old_runtime, old_direct = _numba_launch._NUMBA_RUNTIME, _numba_launch._launch_numba_direct

    def unplanned(*args):
        if _COUNTS is not None:
            _COUNTS.unplanned += 1
        old_direct(*args)

    _numba_launch._launch_numba_direct = unplanned
    # The Gluon kernels' simulator (emulation's stand-in for their Triton launch) likewise:
    # counted, a compiled stand-in returned for the direct path.
    from pydl import _gluon_sim
    old_gluon = _gluon_sim.launch
    _gluon_sim.launch = lambda kernel, grid, *args, **kwargs: triton_launch(kernel)
    _numba_launch._NUMBA_RUNTIME, _numba_launch._NUMBA_DIRECT_ON_CPU = _NumbaRuntime(), True
    _numba_launch._NUMBA_DIRECTS.clear()
    InterpretedFunction.run, FakeCUDAKernel.__call__ = triton_launch, numba_call
    _env.SCOPE_EMULATION = False
    old_checks, _env.CHECK_PLANS = _env.CHECK_PLANS, False
    wrapped = [(cls, name, cls.__dict__[name]) for cls, name, _ in _plan.EMULATED]
    for cls, name, method in _plan.EMULATED:     # the plans' methods as a GPU has them
        setattr(cls, name, method)
    try:
        yield
    finally:
        InterpretedFunction.run, FakeCUDAKernel.__call__ = old_triton, old_numba
        _plan._DEVICE_INDEX, _plan._RAW_STREAM = old_device
        _plan.Launch._keep = old_keep
        _numba_launch._NUMBA_RUNTIME, _numba_launch._NUMBA_DIRECT_ON_CPU = old_runtime, False
        _numba_launch._launch_numba_direct = old_direct
        _gluon_sim.launch = old_gluon
        _numba_launch._NUMBA_DIRECTS.clear()
        for launch in kept:         # the interpreter runs them again
            launch.compiled = None
        softmax_ce.kernel_checks_targets = _softmax_ce_ops.kernel_checks_targets = old_check
        _env.SCOPE_EMULATION = True
        _env.CHECK_PLANS = old_checks
        for cls, name, method in wrapped:
            setattr(cls, name, method)
        # nothing built here serves a later call: plans decided by the stubs (a stand-in
        # compiled kernel, targets taken as checked in the kernel, which the interpreter
        # cannot do)
        _plan.clear_all()


class _Compiled:
    """What Triton's launch returns on a GPU (a CompiledKernel), as pydl._plan.Launch keeps it
    for its direct path: `run` is the compiled launcher, here a launch counter that checks
    the argument list Launch passes (the grid, stream, function, metadata and hooks, then
    one value per kernel parameter)."""

    packed_metadata = function = None

    def __init__(self, kernel):
        import inspect
        self.name = kernel.fn.__name__
        self.params = len(inspect.signature(kernel.fn).parameters)

    def run(self, *args):
        _count_direct(len(args) - 9, self.params, f"{self.name}: the direct launch passed")


def _count_direct(passed: int, want: int, what: str) -> None:
    """A direct launch of a stub: `passed` kernel parameters where its kernel has `want`."""
    if passed != want:
        raise TypeError(f"{what} {passed} parameters, the kernel has {want}")
    if _COUNTS is not None:
        _COUNTS.launches += 1
        _COUNTS.direct += 1


class _NumbaRuntime:
    """pydl._numba_launch._NumbaRuntime's stand-in on a CPU: the first launch of an argument
    signature is counted and "launches" an overload typed as Numba types the call (numpy's
    view of each tensor, Python scalars as they are) whose parameter list is made as Numba's
    _Kernel._prepare_args makes it (tests/test_numba_direct.py checks pydl's refilling
    against Numba's real one); the direct launches that follow are counted and their
    parameter lists checked against the overload's length."""

    @staticmethod
    def device_index(device) -> int:
        return 0

    @staticmethod
    def first_launch(kernel, grid, threads, device, args):
        if _COUNTS is not None:
            _COUNTS.launches += 1
        return _Overload(args), args, 0

    @staticmethod
    def kernel(overload, index):
        return overload

    @staticmethod
    def config(grid, threads, cooperative):
        return grid, threads

    @staticmethod
    def stream(device):
        return 0

    @staticmethod
    def launch(stream, config, kernel, params) -> None:
        _count_direct(len(params), kernel.params, "the direct Numba launch passed")


class _Overload:
    """A compiled Numba kernel as pydl's direct path reads it (argument_types, _prepare_args,
    cooperative), for a call's arguments."""

    extensions, debug, cooperative = (), False, False

    def __init__(self, args):
        import torch
        from numba.cuda.typing.typeof import Purpose, typeof
        self.argument_types = [typeof(_numpy_view(a) if isinstance(a, torch.Tensor) else a,
                                      Purpose.argument) for a in args]
        self.params = sum(5 + 2 * a.dim() if isinstance(a, torch.Tensor) else 1 for a in args)

    @staticmethod
    def _prepare_args(ty, value, stream, retr, params) -> None:
        import ctypes

        import torch
        if isinstance(value, torch.Tensor):
            size = value.element_size()
            params += [0, 0, value.numel(), size, value.data_ptr() if value.numel() else 0,
                       *value.shape, *(s * size for s in value.stride())]
        elif str(ty) in ("float32", "float64"):
            params.append((ctypes.c_float if str(ty) == "float32" else ctypes.c_double)(value))
        elif str(ty) == "bool":
            params.append(value)
        else:
            params.append(getattr(ctypes, f"c_{ty}")(value))


def _numpy_view(t):
    import torch
    t = t.detach()
    return (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()


def _dispatch_counter():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if _COUNTS is not None:
                if name in _SYNC_OPS:
                    _COUNTS.syncs += 1
                elif not func.is_view and name not in _NOT_KERNELS:
                    _COUNTS.aten += 1
                    _COUNTS.aten_ops[name] = _COUNTS.aten_ops.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    del torch
    return Counter()


def counted(fn) -> Counts:
    """Launches, other torch kernels and syncs of one call of fn (kernels stubbed)."""
    global _COUNTS
    _COUNTS = Counts()
    try:
        with _dispatch_counter():
            fn()
        return _COUNTS
    finally:
        _COUNTS = None


def median_us(fn, calls: int, warmup: int = 10, clock=time.perf_counter_ns) -> float:
    """Median microseconds of fn per call by `clock` (nanoseconds): wall time by default;
    the tests pass time.thread_time_ns, which a busy neighbour process does not inflate."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times) / 1e3


# --- the cases ------------------------------------------------------------------------------

def _names(op: str) -> tuple:
    names = CPU_CASES.get(op, (None,))
    return (names,) if isinstance(names, str) else names


def _case(suite, shapes: str, gpu: bool, name: str | None = None):
    """The case measured (`name`, else the op's CPU_CASES one, else its first), shrunk for a
    CPU."""
    import torch
    cases = suite.cases(shapes)
    name = name or _names(suite.op)[0]
    case = next((c for c in cases if c.name == name), cases[0])
    if gpu:
        return case
    if case.dtype == torch.bfloat16:   # Triton's interpreter computes bf16 wrongly; fp16 path
        case = dataclasses.replace(case, dtype=torch.float16)
    return suite.cpu_case(case, CPU_MAX_INPUT_BYTES)


def _pydl_nodes(out):
    """The autograd nodes of pydl Functions in out's graph."""
    seen, stack, found = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        fwd = getattr(type(node), "_forward_cls", None)
        if fwd is not None and fwd.__module__.startswith("pydl"):
            found.append(node)
        stack.extend(n for n, _ in node.next_functions)
    return found


@dataclasses.dataclass
class Prepared:
    op: str
    case: str
    variant: str
    fwd: object
    bwd: object
    bwd_engine: bool


def prepare(suite, variant, case, device, seed: int = 0) -> Prepared:
    """fwd(): the forward with inputs that require grad (training); bwd(): the backward."""
    import functools

    import torch

    from . import gate
    gen = torch.Generator(device=device).manual_seed(seed)
    inputs = suite.make_inputs(case, case.dtype, device, gen)
    args = gate.clone_inputs(inputs, suite.differentiable, suite)
    fn = functools.partial(variant.fn, **suite.options(case))
    out = fn(*args)
    grad = suite.grad_output(out, gen)
    nodes = _pydl_nodes(out) if variant.kind == "pydl" else []
    # Two ops' first backward of a forward differs from a later one through the retained
    # graph: a recurrent layer's writes its gradients over the saved activations
    # (pydl/rnn.py LayerPlan.backward) and cross-entropy's scales the gradient its forward
    # wrote and hands it over (pydl/_softmax_ce_ops.py CrossEntropyFunction), where a later one
    # recomputes them. Each timed call re-arms the nodes first (a few attribute stores), so
    # every one is a first backward, what a training step runs (its values then meaningless:
    # only times and counts are read here).
    rearm = [(n, "acts_gone", False) for n in nodes if hasattr(n, "acts_gone")] + \
        [(n, "grad_from_forward", n.grad_from_forward) for n in nodes
         if getattr(n, "grad_from_forward", None) is not None]
    if len(nodes) == 1 and nodes[0] is out.grad_fn and len(out.grad_fn._input_metadata) == 1:
        node = out.grad_fn

        def bwd(out=out):         # out kept alive with its graph
            for n, name, value in rearm:
                setattr(n, name, value)
            return node.apply(grad)
        engine = False
    else:
        leaves = gate.leaves(args, suite.differentiable)

        def bwd():
            for n, name, value in rearm:
                setattr(n, name, value)
            return torch.autograd.grad(out, leaves, grad, retain_graph=True)
        engine = True
    # the op alone where the suite combines its outputs into one (bench/suites/rnn_cell.py)
    op = functools.partial(variant.fn.op, **suite.options(case)) if hasattr(variant.fn, "op") \
        else fn
    return Prepared(suite.op, case.name, variant.name, lambda: op(*args), bwd, engine)


def _grad_mode(direction: str):
    """The backward runs with grad mode off, as the autograd engine runs it (without
    create_graph); the forward with it on (training), and off for inference ("inf")."""
    import torch
    return torch.no_grad() if direction in ("bwd", "inf") else contextlib.nullcontext()


def allocator_like_cuda() -> bool:
    """Make the CPU allocator reuse large buffers, as torch's CUDA caching allocator does.

    glibc maps every buffer above its mmap threshold (at most 32 MB) afresh and unmaps it when
    it is freed: about 10 us a call for a recurrent layer's 100 MB workspace, which a GPU never
    pays (the caching allocator hands the freed block back). Serving large buffers from glibc's
    heap and keeping freed memory there makes a repeated allocation cost here what it costs on
    a GPU, about 1 us, so the table shows pydl's host time, not the CPU allocator's. Linux's
    glibc only (mallopt); False elsewhere. Process-wide: for this command; the tests take it
    for their measurement alone (cuda_like_allocator)."""
    mallopt = _mallopt()
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold,
                                                                     (1 << 31) - 1))


# glibc's own bounds for its dynamic thresholds on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX, twice
# it for trimming): what a long-running process's allocator converges to.
_GLIBC_MMAP_MAX, _GLIBC_TRIM_MAX = 32 * 2**20, 64 * 2**20


@contextlib.contextmanager
def cuda_like_allocator():
    """allocator_like_cuda() for the duration (the tests' host-time rows: a buffer the
    measured op allocates every call would otherwise cost what the worker's heap history
    makes it, an mmap and munmap or not: conv2d im2col's forward 18 us served from the heap,
    37 with glibc's dynamic threshold in a fresh process, 49 mapped afresh), then glibc's
    thresholds at the bounds its dynamic ones reach (setting them ends the dynamic
    adjustment; the values are what a long-running process converges to)."""
    mallopt = _mallopt()
    if mallopt is None or not allocator_like_cuda():
        yield
        return
    try:
        yield
    finally:
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, _GLIBC_MMAP_MAX)
        mallopt(m_trim_threshold, _GLIBC_TRIM_MAX)


def _mallopt():
    import ctypes
    import ctypes.util
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def torch_reference_us(device, calls: int, clock=time.perf_counter_ns) -> float:
    """torch's own host time for a tiny conv2d that requires grad: the yardstick."""
    import torch
    x = torch.randn(1, 1, 4, 4, device=device, requires_grad=True)
    w = torch.randn(1, 1, 3, 3, device=device, requires_grad=True)
    return median_us(lambda: torch.nn.functional.conv2d(x, w), calls, clock=clock)


# --- the measurement ---------------------------------------------------------------------------

DIRECTIONS = ("fwd", "bwd", "inf")


def _timed(p: Prepared, directions) -> list:
    """(direction, the call it times) for each of `directions` (DIRECTIONS)."""
    return [(d, p.bwd if d == "bwd" else p.fwd) for d in directions]


def measure_cpu(prepared: list[Prepared], calls: int, ref_us: float,
                clock=time.perf_counter_ns, directions=("fwd", "bwd")) -> list[dict]:
    """Host time and counts per call; call inside stubbed_launches()."""
    rows = []
    for p in prepared:
        for direction, fn in _timed(p, directions):
            with _grad_mode(direction):
                # the first calls build plans and one-time buffers: not counted (two: the
                # cross-entropy's first backward scales the forward's gradient, a repeated
                # one - what is timed - computes it)
                fn()
                fn()
                c = counted(fn)
                us = median_us(fn, calls, clock=clock)
            rows.append(dict(op=p.op, case=p.case, variant=p.variant, direction=direction,
                             host_us=round(us, 1), vs_torch=round(us / ref_us, 2),
                             launches=c.launches, direct=c.direct,
                             numba_unplanned=c.unplanned, aten_kernels=c.aten,
                             syncs=c.syncs,
                             aten_ops=c.aten_ops, engine=direction == "bwd" and p.bwd_engine))
    return rows


def measure_gpu(prepared: list[Prepared], calls: int, directions=("fwd", "bwd")) -> list[dict]:
    rows = []
    for p in prepared:
        for direction, fn in _timed(p, directions):
            with _grad_mode(direction):
                rows.append(dict(op=p.op, case=p.case, variant=p.variant, direction=direction,
                                 engine=direction == "bwd" and p.bwd_engine,
                                 **_gpu_times(fn, calls)))
            r = rows[-1]     # as it goes, for a run stopped by a time limit
            print(f"{p.op} {p.case} {p.variant} {direction}: e2e {r['e2e_us']} us, kernels "
                  f"{r['kernel_us']} us, host {r['host_us']} us, {r['launches']} launches",
                  file=sys.stderr, flush=True)
    return rows


def _gpu_times(fn, calls: int) -> dict:
    """End to end per call (calls back to back, one sync at the end), host time per call, and
    the kernels' time, launches and syncs per call from torch.profiler's CUDA activity."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    e2e_us = (time.perf_counter() - t0) / calls * 1e6
    host = median_us(fn, calls // 4 or 1, warmup=0)
    torch.cuda.synchronize()
    n = 10
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    kernels, kernel_us, syncs = 0, 0.0, 0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            kernel_us += getattr(ev, "device_time_total", None) or ev.cuda_time_total
        elif ev.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy",
                         "cudaEventSynchronize"):
            syncs += 1
    kernel_us /= n
    return dict(e2e_us=round(e2e_us, 1), kernel_us=round(kernel_us, 1),
                ratio=round(e2e_us / kernel_us, 2) if kernel_us else None,
                host_us=round(host, 1), launches=kernels / n,
                syncs=max(0, syncs - 1) / n)        # the profile's own final sync


def _cell(row: dict, key: str) -> str:
    if key == "direction" and row.get("engine"):
        return f"{row[key]}*"
    if key == "launches" and "direct" in row:
        return f"{row[key]} ({row['direct']})"
    return str(row[key])


def _print(rows: list[dict], gpu: bool, ref_us: float) -> None:
    if gpu:
        head = ("op", "case", "variant", "dir", "e2e us", "kernels us", "ratio", "host us",
                "launches", "syncs")
        keys = ("op", "case", "variant", "direction", "e2e_us", "kernel_us", "ratio", "host_us",
                "launches", "syncs")
    else:
        print(f"torch reference (tiny conv2d, requires grad): {ref_us:.1f} us per call; "
              "kernels stubbed (emulation): host time only, not GPU performance")
        head = ("op", "case", "variant", "dir", "host us", "x torch", "launches (direct)",
                "aten", "syncs")
        keys = ("op", "case", "variant", "direction", "host_us", "vs_torch", "launches",
                "aten_kernels", "syncs")
    table = [head] + [tuple(_cell(r, k) for k in keys) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    if any(r.get("engine") for r in rows):
        print("* backward through the autograd engine (the output is not one pydl Function's)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench overhead", description=__doc__.split(
        "\n\n")[0] + " Host microseconds, launches and syncs per call, per op and direction.")
    p.add_argument("ops", nargs="*", help="ops (default: all; see `python -m bench list`)")
    p.add_argument("--variants", nargs="+", default=["triton", "numba"],
                   help="variants (default: pydl's triton and numba ones; add torch to compare)")
    p.add_argument("--calls", type=int, default=200, help="timed calls per row")
    p.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=["fwd", "bwd"],
                   help="fwd (training forward), bwd (its backward), inf (the forward under "
                        "no_grad); default: fwd bwd")
    p.add_argument("--shapes", choices=("tiny", "quick"), default="quick")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)

    from . import environment
    mode, relaunch = environment.prepare()
    if relaunch:
        return environment.relaunch(["overhead", *(argv if argv is not None else sys.argv[2:])])
    gpu = mode == "gpu"
    import torch

    import pydl  # noqa: F401  (sets up emulation before numba.cuda is imported below)

    from .suites import select, variant_selected
    device = torch.device("cuda" if gpu else "cpu")
    if not gpu:
        torch.set_num_threads(1)   # the reference's CPU kernel must not wait on busy cores
        cached = allocator_like_cuda()
        print("large CPU buffers: " + ("kept when freed and reused, as torch's CUDA caching "
                                       "allocator does" if cached else
                                       "mapped afresh per call (glibc's mallopt unavailable): "
                                       "ops with buffers over 32 MB read high"))
    prepared = []
    stack = contextlib.ExitStack()
    if not gpu:
        stack.enter_context(stubbed_launches())   # also for the first call in prepare()
    for suite in select(args.ops):
        for name in _names(suite.op):
            case = _case(suite, args.shapes, gpu, name)
            for v in suite.variants():
                if v.fn is None or v.skip or not variant_selected(v.name, args.variants):
                    continue
                if v.gpu_only and not gpu or suite.unsupported(case, case.dtype, v):
                    continue
                try:
                    prepared.append(prepare(suite, v, case, device))
                except (ValueError, NotImplementedError) as exc:   # e.g. an algo's size limit
                    print(f"skipped {suite.op} {case.name} {v.name}: {exc}")
    ref_us = torch_reference_us(device, args.calls)
    with stack:
        rows = measure_gpu(prepared, args.calls, args.directions) if gpu else measure_cpu(
            prepared, args.calls, ref_us, directions=args.directions)
    _print(rows, gpu, ref_us)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"mode": mode, "torch_reference_us": ref_us,
                                         "rows": rows}, indent=1))
    return 0
