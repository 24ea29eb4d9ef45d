"""The direct Numba launch (pydl/_numba_launch.py launch_numba on a GPU): a call whose argument
signature was launched before refills the parameter list Numba made then.

Without a GPU: the refilled list against Numba's own marshalling (tests/numba_direct_check.py,
in a process without the CUDA simulator), and the dispatch around it with a stand-in of what
it needs of Numba (which launch goes where). On a GPU: Numba ops called repeatedly with
other data, against torch, with the direct path engaged."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEVICE

import pydl
from pydl import _numba_launch, _plan

REPO = Path(__file__).resolve().parent.parent
GPU = DEVICE == "cuda"


def test_refilled_parameters_are_numbas():
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYDL_INTERPRET", "NUMBA_ENABLE_CUDASIM", "TRITON_INTERPRET")}
    proc = subprocess.run([sys.executable, "tests/numba_direct_check.py"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), \
        proc.stdout[-2000:] + proc.stderr[-4000:]


class _Runtime:
    """A stand-in for pydl._numba_launch._NumbaRuntime that records what happens: first launches
    (through "Numba") and direct ones with their parameter lists."""

    def __init__(self):
        self.first, self.direct = [], []

    def device_index(self, device):
        return 0

    def first_launch(self, kernel, grid, threads, device, args):
        self.first.append(args)
        return kernel.overload(args), args, 0

    def kernel(self, overload, index):
        return overload

    def config(self, grid, threads, cooperative):
        return grid, threads

    def stream(self, device):
        return 0

    refuse = False      # the launch raises (cuda.core refusing an argument list)

    def launch(self, stream, config, kernel, params):
        if self.refuse:
            raise TypeError("refused")
        self.direct.append((config, list(params)))


class _Kernel:
    """A kernel whose overloads marshal as Numba does (arrays: 5 fields, shape, strides;
    a Python int as int64, a float as float64, a bool as it is); `plain=False` makes one the
    direct path refuses (an argument kind it does not refill)."""

    def __init__(self, plain=True):
        self.plain = plain

    def overload(self, args):
        kernel = self

        class Overload:
            extensions, debug, cooperative = (), False, False
            argument_types = [type("Array", (), {"ndim": a.dim()})()
                              if isinstance(a, torch.Tensor) else type(a) for a in args]

            @staticmethod
            def _prepare_args(ty, a, stream, retr, params):
                if isinstance(a, torch.Tensor):
                    size = a.element_size()
                    params += [0, 0, a.numel(), size, a.data_ptr() if a.numel() else 0,
                               *a.shape, *(s * size for s in a.stride())]
                elif not kernel.plain:
                    params.append(object())
                elif isinstance(a, bool):
                    params.append(a)
                elif isinstance(a, int):
                    params.append(ctypes.c_int64(a))
                else:
                    params.append(ctypes.c_double(a))
        return Overload


def _installed(runtime, monkeypatch):
    """`runtime` in place of pydl._numba_launch's, the direct path on (on a CPU), nothing kept."""
    monkeypatch.setattr(_numba_launch, "_NUMBA_RUNTIME", runtime)
    monkeypatch.setattr(_numba_launch, "_NUMBA_DIRECT_ON_CPU", True)
    monkeypatch.setattr(_numba_launch, "NUMBA_DIRECT", True)
    monkeypatch.setattr(_numba_launch, "_NUMBA_DIRECTS", {})
    monkeypatch.setattr(_numba_launch, "NUMBA_NOT_DIRECT", [])
    return runtime


@pytest.fixture
def runtime(monkeypatch):
    return _installed(_Runtime(), monkeypatch)


def _reference(kernel, args):
    params = []
    o = kernel.overload(args)
    for ty, a in zip(o.argument_types, args):
        o._prepare_args(ty, a, 0, [], params)
    return _numba_launch._numba_params(params)


def test_dispatch_first_launch_then_direct(runtime):
    k, cpu = _Kernel(), torch.device("cpu")
    x, y = torch.randn(4, 3), torch.randn(4, 3)
    _numba_launch.launch_numba(k, 2, 32, cpu, x, 5, 1.5, True)
    assert len(runtime.first) == 1 and runtime.direct == []
    _numba_launch.launch_numba(k, 2, 32, cpu, y, -7, 2.5, False)          # same signature
    assert len(runtime.first) == 1 and len(runtime.direct) == 1
    assert _numba_launch._numba_params(runtime.direct[0][1]) == _reference(k, (y, -7, 2.5, False))
    assert runtime.direct[0][0] == (2, 32)
    # another signature (strides), another first launch; then direct too
    _numba_launch.launch_numba(k, 2, 32, cpu, y.t(), 1, 0.0, True)
    _numba_launch.launch_numba(k, 3, 64, cpu, x.t(), 2, 0.5, True)
    assert len(runtime.first) == 2 and len(runtime.direct) == 2
    assert runtime.direct[1][0] == (3, 64)
    assert _numba_launch._numba_params(runtime.direct[1][1]) == _reference(k, (x.t(), 2, 0.5, True))
    # an int past the first call's int64: Numba's path (it types the call anew)
    _numba_launch.launch_numba(k, 2, 32, cpu, y, 2 ** 63, 2.5, False)
    assert len(runtime.first) == 3 and len(runtime.direct) == 2


def test_a_signature_it_cannot_refill_stays_on_numbas_path(runtime):
    k, cpu = _Kernel(plain=False), torch.device("cpu")
    for _ in range(3):
        _numba_launch.launch_numba(k, 1, 32, cpu, torch.randn(3), 4)
    assert len(runtime.first) == 3 and runtime.direct == []


def test_a_refused_first_direct_launch_goes_back_to_numba(runtime):
    k, cpu = _Kernel(), torch.device("cpu")
    _numba_launch.launch_numba(k, 1, 32, cpu, torch.randn(3), 4)
    runtime.refuse = True
    _numba_launch.launch_numba(k, 1, 32, cpu, torch.randn(3), 5)          # refused: through Numba
    assert len(runtime.first) == 2 and runtime.direct == []
    assert "refused" in _numba_launch.NUMBA_NOT_DIRECT[-1]
    runtime.refuse = False
    _numba_launch.launch_numba(k, 1, 32, cpu, torch.randn(3), 6)          # stays on Numba's path
    assert len(runtime.first) == 3 and runtime.direct == []
    # a signature that launched direct before: a later error is the launch's own, raised
    _numba_launch.launch_numba(k, 1, 32, cpu, torch.randn(2, 2), 1)
    _numba_launch.launch_numba(k, 1, 32, cpu, torch.randn(2, 2), 2)
    assert len(runtime.direct) == 1
    runtime.refuse = True
    with pytest.raises(TypeError, match="refused"):
        _numba_launch.launch_numba(k, 1, 32, cpu, torch.randn(2, 2), 3)


def test_planned_launch_writes_only_the_pointers(runtime):
    """NumbaLaunch: a plan's arguments lie in the call's tensors at fixed offsets; from the
    signature's second launch on, a call writes the sources' pointers (plus offsets) into the
    kept list, and the list is what Numba makes of the views."""
    k, cpu = _Kernel(), torch.device("cpu")
    base, out = torch.randn(6, 8), torch.randn(3, 4)
    kept = torch.randn(2)
    args = (base[2:5, 4:].t(), 7, kept, out[1:], 0.5, out.view(-1)[:4])
    launch = _numba_launch.NumbaLaunch(k, 2, 32, cpu, args, (base, out), places=(0, None, 1, 1))
    for i in range(4):
        b, o = torch.randn(6, 8), torch.randn(3, 4)
        launch(b, o)
        want = _reference(k, (b[2:5, 4:].t(), 7, kept, o[1:], 0.5, o.view(-1)[:4]))
        if i == 0:      # Numba's first launch, then the direct path's, then the plan's own
            assert len(runtime.first) == 1 and runtime.direct == []
        else:
            assert len(runtime.first) == 1 and len(runtime.direct) == i
            assert _numba_launch._numba_params(runtime.direct[-1][1]) == want
    assert launch.params is not None


def test_planned_views_in_emulation():
    """Off the direct path the arguments are rebuilt from the sources' storage at the planned
    byte offsets, in the planned dtype (a bf16 source read as int16 pairs of words)."""
    base = torch.arange(48.0).view(6, 8)
    words = torch.arange(16, dtype=torch.float16)
    planned = (base[1:4, 2:].t(), words[2:].view(torch.int32), 3)
    launch = _numba_launch.NumbaLaunch(None, 1, 1, torch.device("cpu"), planned, (base, words))
    b, w = torch.randn(6, 8), torch.randn(16).half()
    got = launch.arguments((b, w))
    assert torch.equal(got[0], b[1:4, 2:].t()) and got[0].stride() == (1, 8)
    assert torch.equal(got[1], w[2:].view(torch.int32)) and got[2:] == [3]
    # a source of another storage offset: the same offset from its data
    b2 = torch.randn(100)[10:58].view(6, 8)
    assert torch.equal(launch.arguments((b2, w))[0], b2[1:4, 2:].t())


def test_planned_dynamic_scalars_in_their_places(runtime):
    """DYNAMIC arguments take a call's dynamic scalars in order, wherever they are in the
    list (a seed before the last argument): refilled there on the direct path."""
    k, cpu, D = _Kernel(), torch.device("cpu"), _numba_launch.DYNAMIC
    x = torch.randn(3)
    launch = _numba_launch.NumbaLaunch(k, 1, 32, cpu, (x, D, 2.5, D, 7), (x,))
    for seed in range(4):
        y = torch.randn(3)
        launch(y, dynamic=(seed, seed % 2 == 0))
        if seed:        # the first through Numba, then direct (planned from the third on)
            assert _numba_launch._numba_params(runtime.direct[-1][1]) == _reference(
                k, (y, seed, 2.5, seed % 2 == 0, 7))
    assert len(runtime.first) == 1 and len(runtime.direct) == 3
    assert launch.params is not None
    with pytest.raises(ValueError, match="dynamic"):
        launch.arguments((x,), (1,))


def test_planned_launch_refuses_a_tensor_outside_its_source():
    a, b = torch.randn(4), torch.randn(4)
    with pytest.raises(ValueError, match="not in source 0"):
        _numba_launch.NumbaLaunch(None, 1, 1, torch.device("cpu"), (b,), (a,))
    with pytest.raises(ValueError, match="places"):
        _numba_launch.NumbaLaunch(None, 1, 1, torch.device("cpu"), (a, b), (a, b), places=(0,))


def test_each_refills_only_the_tail(runtime):
    k, cpu = _Kernel(), torch.device("cpu")
    a, b = torch.randn(5, 2), torch.randn(2)
    D = _numba_launch.DYNAMIC
    launch = _numba_launch.NumbaLaunch(k, 1, 32, cpu, (a, b, 0.5, D, D, D), (a, b))
    tails = [(s, s + 1, False) for s in range(4)]
    launch.each((a, b), tails)
    # the first step through Numba, the second through the direct path (which plans the
    # launch), the others with only the tail refilled
    assert len(runtime.first) == 1 and len(runtime.direct) == 3
    for (_, params), tail in zip(runtime.direct, tails[1:]):
        assert _numba_launch._numba_params(params) == _reference(k, (a, b, 0.5, *tail))
    # again: every step direct, the tensors' new pointers in place
    c = torch.randn(5, 2)
    runtime.direct.clear()
    launch.each((c, b), tails)
    assert len(runtime.first) == 1 and len(runtime.direct) == 4
    for (_, params), tail in zip(runtime.direct, tails):
        assert _numba_launch._numba_params(params) == _reference(k, (c, b, 0.5, *tail))
    # a tail of other kinds or past int64 goes through launch_numba
    launch.each((c, b), [(0, 1, False), (2 ** 63, 1, False), (1.0, 2, False)])
    assert len(runtime.first) == 3


_F = torch.nn.functional
# op -> (pydl's on the numba backend, torch's, the inputs' shapes); targets of 37 classes
_DIRECT_OPS = {
    "softmax": (lambda x: pydl.softmax(x, -1, backend="numba"), lambda x: x.softmax(-1),
                [(4, 37)]),
    "cross_entropy": (lambda x: pydl.cross_entropy(x, _targets(x), backend="numba"),
                      lambda x: _F.cross_entropy(x, _targets(x)), [(4, 37)]),
    "max_pool2d": (lambda x: pydl.max_pool2d(x, 2, backend="numba"),
                   lambda x: _F.max_pool2d(x, 2), [(2, 3, 8, 8)]),
    "conv2d": (lambda x, w: pydl.conv2d(x, w, padding=1, backend="numba"),
               lambda x, w: _F.conv2d(x, w, padding=1), [(2, 3, 9, 9), (5, 3, 3, 3)]),
    "attention": (lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, backend="numba"),
                  _F.scaled_dot_product_attention, [(1, 2, 7, 16)] * 3),
}


def _targets(x):
    return torch.arange(x.shape[0], device=x.device) * 7 % x.shape[1]


@pytest.mark.skipif(not GPU, reason="the direct Numba launch runs on a GPU")
@pytest.mark.parametrize("op", sorted(_DIRECT_OPS))
def test_numba_ops_repeated_on_the_direct_path(monkeypatch, op):
    """The op forward and backward four times on other data, against float64 on the CPU:
    the first call through Numba, the second on the direct path, the later ones as planned
    (NumbaLaunch writing the pointers alone); and both did engage: a kept parameter list per
    kernel launched, and every plan of the last call holding its own. (One op a test: each
    compiles its own kernels, a few seconds apiece on a GPU machine's host.)"""
    _numba_launch._NUMBA_DIRECTS.clear()
    plans = []
    real_call = _numba_launch.NumbaLaunch.__call__

    def call(self, *args, **kwargs):
        plans.append(self)
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(_numba_launch.NumbaLaunch, "__call__", call)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    ours_fn, reference, shapes = _DIRECT_OPS[op]
    for _ in range(4):
        del plans[:]
        inputs = [torch.randn(*s, generator=g, device=DEVICE).requires_grad_() for s in shapes]
        out = ours_fn(*inputs)
        grads = torch.autograd.grad(out.sum(), inputs)
        cpu = [t.detach().double().cpu().requires_grad_() for t in inputs]
        ref = reference(*cpu)
        ref_grads = torch.autograd.grad(ref.sum(), cpu)
        for a, b in zip((out, *grads), (ref, *ref_grads)):
            torch.testing.assert_close(a.detach().double().cpu(), b, atol=1e-4, rtol=1e-4)
    kept = [d for d in _numba_launch._NUMBA_DIRECTS.values() if d is not None]
    assert kept and len(kept) == len(_numba_launch._NUMBA_DIRECTS), _numba_launch.NUMBA_NOT_DIRECT
    assert plans and all(p.params is not None for p in plans)


# --- the direct and planned paths computing, in emulation ------------------------------------

class _Executing(_Runtime):
    """A stand-in runtime that runs what it is given: a first launch through the simulator
    (and an overload that marshals as Numba does: bench/overhead.py's), a direct launch by
    decoding the parameter list back into arrays at the pointers it holds and running the
    simulated kernel on them. CPU tensors have real addresses, so a wrong pointer, offset,
    shape, stride or scalar in a refilled list gives a wrong answer here, as it would on a
    GPU."""

    def first_launch(self, kernel, grid, threads, device, args):
        from bench.overhead import _Overload
        self.first.append(args)
        kernel[grid, threads](*[_numba_launch.numba_array(a) if isinstance(a, torch.Tensor) else a
                                for a in args])
        overload = _Overload(args)
        overload.kernel = kernel
        return overload, args, 0

    def launch(self, stream, config, overload, params):
        self.direct.append(config)
        args, at = [], 0
        for ty in overload.argument_types:
            ndim = getattr(ty, "ndim", None)
            if ndim is None:
                value = params[at]
                args.append(value.value if isinstance(value, ctypes._SimpleCData) else value)
                at += 1
                continue
            itemsize, data = params[at + 3], params[at + 4]
            shape = tuple(params[at + 5:at + 5 + ndim])
            strides = tuple(params[at + 5 + ndim:at + 5 + 2 * ndim])
            args.append(_array_at(data, shape, strides, itemsize, ty))
            at += 5 + 2 * ndim
        assert at == len(params)
        grid, threads = config
        overload.kernel[grid, threads](*args)


def _array_at(data: int, shape, strides, itemsize: int, ty):
    """The numpy array a kernel parameter describes (its data pointer, shape, byte strides)."""
    import numpy as np
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray
    from numba.np import numpy_support
    dtype = numpy_support.as_dtype(ty.dtype)
    if 0 in shape:
        return FakeCUDAArray(np.empty(shape, dtype))
    span = sum((n - 1) * s for n, s in zip(shape, strides)) + itemsize
    base = np.frombuffer((ctypes.c_char * span).from_address(data), dtype=np.uint8)
    # a simulated device array over that memory, as pydl._numba_launch.numba_array makes (a plain
    # NumPy argument would be copied in and out, a strided one refused)
    return FakeCUDAArray(np.lib.stride_tricks.as_strided(base.view(dtype), shape, strides))


@pytest.fixture
def executing(monkeypatch):
    return _installed(_Executing(), monkeypatch)


def _grads(op, reference, *inputs):
    """op's and reference's outputs and input gradients (sum of the outputs as the loss)."""
    results = []
    for fn in (op, reference):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves)
        results.append((out.detach(), *torch.autograd.grad(out.sum(), leaves)))
    return results


@pytest.mark.skipif(GPU, reason="the stand-in runtime runs the CUDA simulator's kernels")
def test_planned_launches_compute_the_right_answer(executing, monkeypatch):
    """Each Numba op forward and backward four times on other data (the first call through
    Numba, the second on the direct path, the others as planned: pointers written into the
    kept list), the parameter lists run by the simulator, against torch: the conv2d in
    chunks (views at offsets in its tensors), the attention with dropout (its seed a DYNAMIC
    scalar: the same seed must give the plain path's answer), the LSTM layer step by step
    (NumbaLaunch.each)."""
    from pydl import _conv_im2col
    monkeypatch.setattr(_conv_im2col, "IM2COL_WORKSPACE_BYTES", 2 * 4 * 4 * 3 * 9 * 4)
    F = torch.nn.functional
    t = torch.randint(0, 9, (5,))
    cw = torch.rand(9) + 0.5
    mask = torch.rand(5, 6) > 0.3
    mask[:, 0] = True

    def cl(t):
        return t.to(memory_format=torch.channels_last)
    cases = [
        (lambda x: pydl.softmax(x, 0, backend="numba"), lambda x: x.softmax(0), (5, 9)),
        (lambda x: pydl.cross_entropy(x, t, backend="numba"), lambda x: F.cross_entropy(x, t),
         (5, 9)),
        (lambda x: pydl.max_pool2d(x, 2, backend="numba"), lambda x: F.max_pool2d(x, 2),
         (2, 3, 6, 6)),
        (lambda x, w: pydl.conv2d(x, w, padding=1, backend="numba"),
         lambda x, w: F.conv2d(x, w, padding=1), (3, 3, 4, 4), (4, 3, 3, 3)),
        (lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, backend="numba"),
         F.scaled_dot_product_attention, (1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)),
        (lambda x, *w: pydl.lstm(x, None, list(w), backend="numba", algo="steps")[0],
         lambda x, *w: torch._VF.lstm(x, (x.new_zeros(1, 2, 3),) * 2, list(w), True, 1, 0.0,
                                      True, False, False)[0],
         (3, 2, 4), (12, 4), (12, 3), (12,), (12,)),
        # options: class weights, smoothing, per-row losses; a bias, groups, channels_last;
        # a bool mask (read as uint8: a view of another dtype) and causal; the GRU's
        # persistent schedule and the LSTM cell
        (lambda x: pydl.cross_entropy(x, t, weight=cw, label_smoothing=0.1, reduction="none",
                                      backend="numba"),
         lambda x: F.cross_entropy(x, t, weight=cw, label_smoothing=0.1, reduction="none"),
         (5, 9)),
        (lambda x: pydl.avg_pool2d(x, 3, 2, 1, backend="numba"),
         lambda x: F.avg_pool2d(x, 3, 2, 1), (2, 3, 7, 7)),
        (lambda x, w, b: pydl.conv2d(cl(x), cl(w), b, groups=2, backend="numba"),
         lambda x, w, b: F.conv2d(x, w, b, groups=2), (2, 4, 5, 5), (6, 2, 3, 3), (6,)),
        (lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                           backend="numba"),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
         (1, 2, 5, 8), (1, 2, 6, 8), (1, 2, 6, 8)),
        (lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                           backend="numba"),
         lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
         (1, 2, 5, 8), (1, 2, 5, 8), (1, 2, 5, 8)),
        (lambda x, *w: pydl.gru(x, None, list(w), backend="numba")[0],
         lambda x, *w: torch._VF.gru(x, x.new_zeros(1, 2, 3), list(w), True, 1, 0.0, True,
                                     False, False)[0],
         (3, 2, 4), (9, 4), (9, 3), (9,), (9,)),
        (lambda x, h, c, *w: torch.cat(pydl.lstm_cell(x, (h, c), *w, backend="numba"), 1),
         lambda x, h, c, *w: torch.cat(torch.lstm_cell(x, (h, c), *w), 1),
         (2, 4), (2, 3), (2, 3), (12, 4), (12, 3), (12,), (12,)),
    ]
    for op, reference, *shapes in cases:
        for _ in range(4):
            ours, ref = _grads(op, reference, *(torch.randn(*s) for s in shapes))
            for a, b in zip(ours, ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # 16-bit tensors: bf16 goes to the kernels as its int16 bit patterns (a view of another
    # dtype on Numba's side), fp16 as it is; against torch in fp32 on the same values
    for dtype in (torch.bfloat16, torch.float16):
        for _ in range(4):
            x, w = torch.randn(2, 3, 5, 5).to(dtype), torch.randn(4, 3, 3, 3).to(dtype)
            torch.testing.assert_close(
                pydl.conv2d(x, w, padding=1, backend="numba").float(),
                F.conv2d(x.float(), w.float(), padding=1), rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(pydl.softmax(x, 1, backend="numba").float(),
                                       x.float().softmax(1), rtol=1e-2, atol=1e-2)
    assert len(executing.direct) > len(executing.first) > 0 and not _numba_launch.NUMBA_NOT_DIRECT
    # dropout: each planned launch takes its call's seed (DYNAMIC), as the plain path does
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    seeds = (11, 12, 13, 11, 14)

    def dropped():
        outs = []
        for seed in seeds:
            torch.manual_seed(seed)
            outs.append(pydl.scaled_dot_product_attention(q, k, v, dropout_p=0.3,
                                                          backend="numba"))
        return outs
    planned = dropped()
    monkeypatch.setattr(_numba_launch, "NUMBA_DIRECT", False)     # Numba's own path, plans anew
    _plan.clear_all()
    for ours, want in zip(planned, dropped()):
        torch.testing.assert_close(ours, want)
    assert not torch.equal(planned[0], planned[1])
