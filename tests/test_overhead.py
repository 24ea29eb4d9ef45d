"""The host path: what pydl does around its kernels, measured with the kernels stubbed out
(`python -m bench overhead`'s method). Counts are exact; times are guarded by a ratio to
torch's own dispatch of a tiny conv2d timed in the same process, which holds on a loaded
2-core machine where absolute microseconds do not."""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import triton
import triton.language as tl

import pydl
from bench import overhead
from bench.suites import select
from pydl.testing import poisoned_outputs

pytestmark = pytest.mark.skipif(not pydl.INTERPRET, reason="kernels are stubbed in emulation only")

# (op, variant[, case]): launches per forward and per backward call on the GPU path, at the
# op's case in `python -m bench overhead` or the one named. Convolution (channels_last input
# and weight): im2col forward the im2col and the GEMM (columns by tap: the weight is that
# matrix as it lies), backward the grad input's GEMM and col2im, the weight gradient's im2col
# and GEMM (columns by channel, as its contiguous dw: no pack either); a 1x1 layer's forward
# and grad input are the shared GEMM (pydl/_gemm.py), its weight gradient the implicit kernel;
# a depthwise layer's are the direct kernels, one each (the weight gradient's ranges summed in
# its launch).
# Naive attention: the scores GEMM, the masked softmax and the P V GEMM forward; the dV and
# dP GEMMs, the softmax backward and the dQ and dK GEMMs backward. The recurrent layers (the
# benchmark's quick cases: T = 25 and 187 steps, one layer, one direction): the input
# projection's GEMM and one recurrence launch forward, whatever T (the persistent schedule);
# backward the recurrence, the weight and input gradients' GEMMs and the bias sums (one for
# both LSTM biases). The cells: one launch forward (the input product inside); backward the
# step and its dh pseudo-step, three GEMMs, the bias sums. Cross-entropy with class
# probabilities in training: one forward launch (loss and gradient; its last program
# reduces), the backward scales the gradient; the Numba forward's per-row kernel and its
# reduction, the backward computing the gradient.
LAUNCHES = {
    ("conv2d", "triton-implicit"): (1, 2),
    ("conv2d", "triton-im2col"): (2, 4),
    ("conv2d", "triton-implicit", "l1-1x1-64-256"): (1, 2),
    ("conv2d_depthwise", "triton-implicit"): (1, 2),
    # conv1d: conv2d's launches, on the 1-d tensors themselves (no view, no copy)
    ("conv1d", "triton-implicit"): (1, 2),
    ("conv1d_depthwise", "triton-implicit"): (1, 2),
    ("conv1d", "numba-im2col"): (2, 4),
    ("max_pool2d", "triton"): (1, 1),
    ("avg_pool2d", "triton"): (1, 1),
    ("adaptive_avg_pool2d", "triton"): (1, 1),
    ("softmax", "triton"): (1, 1),
    ("log_softmax", "triton"): (1, 1),
    ("cross_entropy", "triton"): (2, 1),
    ("cross_entropy_soft", "triton"): (1, 1),
    ("attention", "triton-flash"): (1, 3),
    ("attention", "triton-naive"): (3, 5),
    # decoding (one query per head, 8k keys): the split forward, one launch (its last split
    # of a tile combines); the flash backward
    ("attention_decode", "triton-flash"): (1, 3),
    ("lstm", "triton-persistent"): (2, 5),
    # the GRU's backward writes dgi over its saved workspace in two column blocks ([r, z] and
    # [n]): its input and weight gradients and b_ih's sums take one launch a block
    ("gru", "triton-persistent"): (2, 9),
    ("lstm_cell", "triton"): (1, 6),
    ("gru_cell", "triton"): (1, 7),
    # the Numba backend: the same steps (its conv2d always by im2col, its attention the flash
    # kernels), each launch after the first call on pydl._numba_launch's direct path
    ("conv2d", "numba-im2col"): (2, 4),
    ("max_pool2d", "numba"): (1, 1),
    ("softmax", "numba"): (1, 1),
    ("cross_entropy", "numba"): (1, 1),
    ("cross_entropy_soft", "numba"): (1, 1),
    ("attention", "numba-flash"): (1, 3),
    ("lstm", "numba-persistent"): (2, 5),
    ("gru_cell", "numba"): (1, 7),
    # the language model's head and loss fused (one chunk at the overhead's shrunk case):
    # triton forward the logits' GEMM, the mean's denominator, the cross-entropy writing
    # their gradient, dh's and dW's GEMMs, its backward a scale of each gradient; numba
    # forward the GEMM and the cross-entropy, backward the logits again, the gradient kernel
    # and the two GEMMs
    ("linear_cross_entropy", "triton"): (5, 2),
    ("linear_cross_entropy", "numba"): (2, 4),
}
# Host time of a call, at most BASE_RATIO + LAUNCH_RATIO x its launches times torch's tiny
# conv2d (about 4-8 us on a 2-core machine): 5x for one launch, 9x for three. pydl's calls
# measure 1-5x it with their per-signature plans (pydl/_plan.py), 2-8x before them; the
# launch path before its cache measured 8-30x.
BASE_RATIO, LAUNCH_RATIO = 3.0, 2.0
# The recurrent ops allocate more (a layer's output, final states and saved activations; a
# cell's outputs and workspace) and their backward runs through the autograd engine (several
# outputs), which alone costs about 5x: caps of their own. Before their plans they measured
# 18-21x forward and 33-37x backward (layers), 10-14x and 20-33x (cells); with them 7-12x
# forward (the GRU's 36 MB workspace is mapped afresh by the CPU allocator every call) and
# about 20x backward (layers), 4-7x and 9-21x (cells).
# The naive attention's backward (its output and the weights: two outputs) runs through the
# engine too. Its forward measured 4.9-5.4x alone but 9.1-9.5x in two CI runs of the whole
# suite; the likely cause is the (B, H, L, S) weights it allocates, large enough for glibc to
# map afresh or serve from its heap depending on what the worker's earlier tests left (not
# confirmed). Its launches leaving the direct path are caught by the launch counts above
# (test_launches_and_no_torch_kernels_or_syncs), not by this cap. Keys: (op, direction), or a
# LAUNCHES key and the direction.
# The backward caps of the layers and cells (25x) and of the naive attention (20x) sit about
# 35% above what they measure alone (17-18.6x, 15.3x on 2026-12-06): inside the suite, with
# the other test worker busy on the second core, the same rows measured 22-23x (up to 27x with
# a third process running), as thread CPU time of pydl's Python path grows more with a busy
# neighbour than torch's C++ dispatch does; at 22x and 18x they failed one suite run in two.
# The Numba rows share the caps: planned per signature as the Triton ones are (their launches
# NumbaLaunches, pydl/_numba_launch.py), they measured 1-3x (6x the LSTM layer's forward, 16x its
# backward through the engine); before their plans 2-12x forward and 2-35x backward.
# The GRU layer's backward, 9 launches since it writes dgi over its saved workspace in two
# column blocks (6 before), measured 15.8-24.8x alone on 2026-12-06 and 35.1x inside a loaded
# suite run (its cap of 32x then failed it): its cap 45x, which a launch leaving the direct
# path (2-3x the host time) still exceeds.
# The naive attention's backward measured 20.2x in a fresh-clone CI run on 2026-12-07 (its
# cap of 20x then failed it; its path changed that day by at most 0.2 us, the merged
# plain-tensor test): its cap 24x, under what a launch leaving the direct path costs (30x and
# more).
# The allocation-heavy rows failed a fresh-clone CI run on 2026-12-07 (conv2d im2col forward
# 8.7x, both im2col variants, the naive attention's 13.3x, the GRU layer's 15.6x) with no
# change to their paths: their per-call buffers cost what the worker's heap history made them
# (an mmap and munmap a call, or not: conv2d im2col 18 / 37 / 49 us served from the heap, by
# glibc's dynamic threshold in a fresh process, mapped afresh). The measurement now serves
# large buffers as the CUDA caching allocator does (bench/overhead.py cuda_like_allocator);
# those rows then measured 3.0x, 5.0x and 6.0x alone, well under the caps above.
# linear_cross_entropy's forward (its GPU time is milliseconds of GEMMs a call: bench/
# TUNING.md v32) measured 9-15x on 2026-12-07 with its call checked once per signature and
# its kernel ops keyed per call (18-24x before; a cap of 20x of its own); with its steps kept
# by the call's plan 7.8x (triton, five launches) and 4.9x (numba), under the default caps.
MAX_RATIOS = {("attention", "triton-naive", "bwd"): 24.0,
              ("attention", "triton-naive", "fwd"): 13.0,
              ("lstm", "fwd"): 10.0, ("lstm", "bwd"): 25.0, ("gru", "fwd"): 15.0,
              ("gru", "bwd"): 45.0, ("lstm_cell", "fwd"): 9.0, ("lstm_cell", "bwd"): 25.0,
              ("gru_cell", "fwd"): 7.0, ("gru_cell", "bwd"): 12.0}


@pytest.fixture(scope="module")
def rows():
    torch.set_num_threads(1)
    device = torch.device("cpu")
    prepared = []
    # large buffers served as torch's CUDA caching allocator serves them, not mapped afresh
    # or not by the worker's heap history (the allocation-heavy rows varied 2x with it)
    with overhead.stubbed_launches(), overhead.cuda_like_allocator():
        for op, name, *case in LAUNCHES:
            suite = select([op])[0]
            variant = next(v for v in suite.variants() if v.name == name)
            prepared.append(overhead.prepare(suite, variant, overhead._case(
                suite, "quick", False, *case), device))
        # the smallest of three runs of everything: a noisy neighbour inflates, never deflates
        # thread CPU time: what the op costs this thread, not how long a busy neighbour
        # (the other test worker) kept it waiting
        runs = []
        for _ in range(3):
            ref = overhead.torch_reference_us(device, 100, clock=time.thread_time_ns)
            runs.append((ref, overhead.measure_cpu(prepared, 100, ref, clock=time.thread_time_ns)))
    best = {}
    for ref, measured in runs:
        for i, r in enumerate(measured):        # a forward and a backward row per key
            k = (list(LAUNCHES)[i // 2], r["direction"])
            ratio = r["host_us"] / ref
            if k not in best or ratio < best[k]["ratio"]:
                best[k] = dict(r, ratio=ratio)
    return best


@pytest.mark.parametrize("key", list(LAUNCHES), ids="-".join)
def test_launches_and_no_torch_kernels_or_syncs(rows, key):
    op, variant = key[:2]
    for direction, want in zip(("fwd", "bwd"), LAUNCHES[key]):
        r = rows[key, direction]
        assert r["launches"] == want, r
        # every step on the device is pydl's kernel
        assert r["aten_kernels"] == 0, r
        assert r["syncs"] == 0, r                 # nothing waits for the device
        # a GPU's path: every launch after the first call is Launch's direct one, its
        # argument list checked against the kernel's parameters (bench/overhead.py)
        assert r["direct"] == want, r
        # a Numba launch from its plan (a NumbaLaunch), not looked up per call
        assert r["numba_unplanned"] == 0, r


# Inference (`python -m bench overhead --directions inf`: the forward under no_grad) launches
# what the training forward does, but the Triton cross-entropy's mean denominator, which only
# the gradient its training forward writes needs first.
INF_LAUNCHES = {("cross_entropy", "triton"): 1, ("linear_cross_entropy", "triton"): 2}


def test_inference_launches_no_torch_kernels_or_syncs():
    """Every op of LAUNCHES under no_grad: the training forward's launches but those only a
    gradient needs (all direct), no torch kernel, no host synchronisation. (What it no
    longer allocates: tests/test_plans.py, tests/test_rnn.py.)"""
    device = torch.device("cpu")
    with overhead.stubbed_launches(), poisoned_outputs(False):      # no test fills
        for key in LAUNCHES:
            op, name, *case = key
            suite = select([op])[0]
            variant = next(v for v in suite.variants() if v.name == name)
            p = overhead.prepare(suite, variant, overhead._case(suite, "quick", False, *case),
                                 device)
            r = overhead.measure_cpu([p], 3, 1.0, directions=("inf",))[0]
            want = INF_LAUNCHES.get(key[:2], LAUNCHES[key][0])
            assert (r["direction"], r["launches"], r["direct"], r["aten_kernels"],
                    r["syncs"]) == ("inf", want, want, 0, 0), (key, r)


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
@pytest.mark.parametrize("op", ["max_pool1d", "avg_pool1d", "adaptive_avg_pool1d"])
def test_one_d_pools_launch_as_the_2d_ones(op, layout, backend):
    """A 1-d pool's planned call (pydl.pool._Pool1dCall) launches the 2-d pool's kernel on the
    1-d tensors: one launch forward and one backward, each on the direct path after the
    first call (the 1-d tensors' pointers in the 2-d launch's place), no torch kernel, no
    synchronisation (an (N, L, C) gradient of an (N, L, C) input is not copied)."""
    x = torch.randn(4, 16, 50) if layout == "ncl" else torch.randn(4, 50, 16).transpose(1, 2)
    x.requires_grad_()
    args = (5,) if op == "adaptive_avg_pool1d" else (3, 2)
    call = lambda: getattr(pydl, op)(x, *args, backend=backend)  # noqa: E731
    with overhead.stubbed_launches(), poisoned_outputs(False):      # no test fills
        for _ in range(3):                          # past the first calls' own paths
            y = call()
            g = torch.empty_like(y)
            with torch.no_grad():
                y.grad_fn.apply(g)
        fwd = overhead.counted(call)
        with torch.no_grad():       # as the engine runs a backward without create_graph
            bwd = overhead.counted(lambda: y.grad_fn.apply(g))
    assert y.dim() == 3 and y._base is None
    for counts in (fwd, bwd):
        assert (counts.launches, counts.aten, counts.syncs) == (1, 0, 0), counts.aten_ops
        assert counts.direct == 1 and counts.unplanned == 0


def test_nchw_gradient_of_a_channels_last_conv_is_relaid_by_pydl():
    """A channels_last conv2d given an NCHW upstream gradient (one made by torch.randn, as the
    benchmark's and many losses' are): its backward converts it once with pydl's relayout
    kernel, then the two gradient kernels: three launches, all direct, no torch kernel."""
    x = torch.randn(2, 32, 9, 9).to(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(16, 32, 3, 3).to(memory_format=torch.channels_last).requires_grad_()
    call = lambda: pydl.conv2d(x, w, padding=1, backend="triton")  # noqa: E731
    with overhead.stubbed_launches(), poisoned_outputs(False):
        for _ in range(3):
            y = call()
            g = torch.empty(y.shape)                # NCHW, y channels_last
            with torch.no_grad():
                y.grad_fn.apply(g)
        with torch.no_grad():
            bwd = overhead.counted(lambda: y.grad_fn.apply(g))
    assert not g.is_contiguous(memory_format=torch.channels_last)
    assert (bwd.launches, bwd.direct, bwd.aten, bwd.syncs) == (3, 3, 0, 0), bwd.aten_ops


@pytest.mark.parametrize("targets", ["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_numba_cross_entropy_checks_and_reduces_on_the_device(reduction, targets):
    """The Numba cross-entropy checks its targets in the kernel (a trap on a GPU) and sums
    the loss in the same launch (its last block to finish), and with class probabilities
    writes "none"'s loss in its dtype: one launch, no host synchronisation, no torch kernel,
    forward or backward."""
    x = torch.randn(6, 10, dtype=torch.float16, requires_grad=True)
    t = torch.randint(0, 10, (6,)) if targets == "indices" else \
        torch.softmax(torch.randn(6, 10), 1).half()
    with overhead.stubbed_launches(), poisoned_outputs(False):      # no test fills
        loss = pydl.cross_entropy(x, t, reduction=reduction, backend="numba")
        fwd = overhead.counted(
            lambda: pydl.cross_entropy(x, t, reduction=reduction, backend="numba"))
        g = torch.ones_like(loss)
        with torch.no_grad():       # as the engine runs a backward without create_graph
            bwd = overhead.counted(lambda: loss.grad_fn.apply(g))
    assert (fwd.launches, fwd.aten, fwd.syncs) == (1, 0, 0), fwd.aten_ops
    assert (bwd.launches, bwd.aten, bwd.syncs) == (1, 0, 0), bwd.aten_ops


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_cross_entropy_with_weights_and_smoothing_sums_no_weights_in_torch(backend, reduction,
                                                                           weight_dtype):
    """With class weights and label smoothing the logits' gradient needs W = sum_c w_c: the
    forward kernel writes it beside the mean's denominator, so a backward that recomputes the
    gradient (per-row losses; every Numba backward) is one launch and no torch kernel (it
    summed the weights with two torch kernels every call). The kernels read 16-bit weights (the
    logits' dtype, as torch requires) as they are (the Numba launches copied them to fp32)."""
    x = torch.randn(6, 10, dtype=torch.float16, requires_grad=True)
    t, w = torch.randint(0, 10, (6,)), (torch.rand(10) + 0.5).to(weight_dtype)
    with overhead.stubbed_launches(), poisoned_outputs(False):
        loss = pydl.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.1,
                                  backend=backend)
        fwd = overhead.counted(lambda: pydl.cross_entropy(
            x, t, w, reduction=reduction, label_smoothing=0.1, backend=backend))
        g = torch.ones_like(loss)
        with torch.no_grad():
            bwd = overhead.counted(lambda: loss.grad_fn.apply(g))
    assert (fwd.aten, fwd.syncs) == (0, 0), fwd.aten_ops
    assert (bwd.launches, bwd.aten, bwd.syncs) == (1, 0, 0), bwd.aten_ops


@pytest.mark.parametrize("key", list(LAUNCHES), ids="-".join)
def test_host_time_close_to_torch_dispatch(rows, key):
    op = key[0]
    for direction in ("fwd", "bwd"):
        r = rows[key, direction]
        cap = MAX_RATIOS.get((*key, direction)) or MAX_RATIOS.get(
            (op, direction), BASE_RATIO + LAUNCH_RATIO * r["launches"])
        assert r["ratio"] <= cap, (f"{op} {direction}: {r['host_us']} us, "
                                   f"{r['ratio']:.1f}x torch's tiny conv2d (at most {cap:.0f}x)")


def test_repeated_calls_reuse_their_plans():
    """A second call with the same signature builds nothing: every cache stays the same size."""
    from pydl import _plan
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    with overhead.stubbed_launches():
        pydl.conv2d(x, w, padding=1).sum()
        sizes = [len(c.entries) for c in _plan.Cache.all]
        for _ in range(3):
            pydl.conv2d(x, w, padding=1)
        assert [len(c.entries) for c in _plan.Cache.all] == sizes
        pydl.conv2d(x[:1], w, padding=1)          # a new batch size: a new signature
        assert sum(len(c.entries) for c in _plan.Cache.all) > sum(sizes)


def test_reference_is_measured():
    us = [overhead.torch_reference_us(torch.device("cpu"), 50) for _ in range(3)]
    assert 0 < statistics.median(us) < 1000


@triton.jit
def _probe(x_ptr, y_ptr, n, m, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


@triton.jit(do_not_specialize=["seed"])
def _probe_seeded(x_ptr, n, seed, BLOCK: tl.constexpr):
    pass


def _fake_triton(monkeypatch):
    """(Compiled, jit_calls, jit_run): a fake compiled kernel class whose launcher records its
    argument lists (Compiled.calls), and a stand-in for a Launch's Triton launch (`run`) that
    records its call and returns one; the direct path on, device 0, stream 1234 (Triton's
    real launch-hook knobs: unset)."""
    from pydl import _plan

    class Compiled:
        function, packed_metadata = "fn", "meta"
        calls: list = []

        def run(self, *args):
            Compiled.calls.append(args)

    jit_calls = []

    def jit_run(*args, **kwargs):
        jit_calls.append((args, kwargs))
        return Compiled()

    monkeypatch.setattr(_plan, "DIRECT", True)
    monkeypatch.setattr(_plan, "_DEVICE_INDEX", lambda: 0)
    monkeypatch.setattr(_plan, "_RAW_STREAM", lambda d: 1234)
    return Compiled, jit_calls, jit_run


def test_direct_launch_passes_what_triton_would(monkeypatch):
    """The GPU's direct launch (pydl._plan.Launch after its first launch), driven by a fake
    compiled kernel: the launcher gets the grid, the current stream, and exactly the argument
    list Triton's JITFunction.run would bind (the new tensors, the scalars, every constexpr
    parameter in signature order); a tensor of another alignment, or a per-call scalar, goes
    through Triton again."""
    from pydl import _plan
    Compiled, jit_calls, jit_run = _fake_triton(monkeypatch)
    consts = dict(BLOCK=128, num_warps=4)        # BLOCK: a parameter; num_warps: an option
    launch = _plan.Launch(_probe, (7,), (3, 99), consts)
    launch.run = jit_run
    ws, out = torch.zeros(64, dtype=torch.float32), torch.zeros(32, dtype=torch.float16)
    launch(ws, out)                                       # first: Triton's path, kept
    assert len(jit_calls) == 1 and launch.compiled is not None
    ws2, out2 = torch.ones(64, dtype=torch.float32), torch.ones(32, dtype=torch.float16)
    launch(ws2, out2)                                     # direct
    assert len(jit_calls) == 1
    grid, stream_fn_meta, hooks, args = (Compiled.calls[-1][:3], Compiled.calls[-1][3:6],
                                         Compiled.calls[-1][6:9], Compiled.calls[-1][9:])
    assert grid == (7, 1, 1) and stream_fn_meta == (1234, "fn", "meta")
    assert hooks == (None, None, None)
    assert args[0] is ws2 and args[1] is out2 and args[2:] == (3, 99, 128, False)  # default
    launch(ws2, out2[1:])                                 # 2 bytes off 16: Triton again
    assert len(jit_calls) == 2
    launch(ws2, out2, seed=5)                             # a per-call scalar: Triton again
    assert len(jit_calls) == 3
    launch(ws2, out2)
    assert len(jit_calls) == 3                            # direct again
    # a launch told which tensors' alignment can change checks those only (the recurrences:
    # placeholders repeat a present tensor, the counters are pydl's own)
    launch = _plan.Launch(_probe, (7,), (3, 99), consts, checked=(1,))
    launch.run = jit_run
    launch(ws, out)
    launch(ws[1:], out)                                   # not checked: direct
    assert len(jit_calls) == 4 and Compiled.calls[-1][9].data_ptr() == ws[1:].data_ptr()
    launch(ws, out2[1:])                                  # checked: Triton again
    assert len(jit_calls) == 5
    # a per-call keyword scalar the kernel does not specialise on (the dropout seed): direct,
    # in its place among the arguments; one it specialises on: always Triton's path
    launch = _plan.Launch(_probe_seeded, (7,), (99,), consts)
    launch.run = jit_run
    launch(ws, seed=5)
    launch(ws2, seed=1)                                   # == 1: no specialisation to break
    assert len(jit_calls) == 6 and Compiled.calls[-1][9:] == (ws2, 99, 1, 128)
    launch(ws2, seed=77)
    assert len(jit_calls) == 6 and Compiled.calls[-1][9:] == (ws2, 99, 77, 128)
    launch(ws2)                                           # another argument list: Triton's
    assert len(jit_calls) == 7
    launch(ws2, seed=2 ** 31)                             # an int64: another kernel, Triton's
    assert len(jit_calls) == 8
    launch = _plan.Launch(_probe, (7,), (3,), consts)
    launch.run = jit_run
    launch(ws, out, m=4)
    launch(ws, out, m=5)
    assert len(jit_calls) == 10                           # m is specialised on: never direct


def test_launch_each_checks_once_then_calls_every_kept_launcher(monkeypatch):
    """pydl._plan.launch_each (a recurrence's steps): the first sequence launches each step
    through Triton (each keeps its compiled kernel); the next calls every kept launcher in
    order with its own scalars, the checks made once; a misaligned tensor or a step not yet
    kept sends every step its own way."""
    from pydl import _plan
    Compiled, jit_calls, jit_run = _fake_triton(monkeypatch)
    steps = [_plan.Launch(_probe, (7,), (s, s + 1), dict(BLOCK=128)) for s in range(3)]
    for step in steps:
        step.run = jit_run
    ws, out = torch.zeros(64, dtype=torch.float32), torch.zeros(32, dtype=torch.float16)
    _plan.launch_each(steps, (ws, out))
    assert len(jit_calls) == 3 and Compiled.calls == []
    ws2 = torch.ones(64, dtype=torch.float32)
    _plan.launch_each(steps, (ws2, out))
    assert len(jit_calls) == 3
    assert [c[9:] for c in Compiled.calls] == [(ws2, out, s, s + 1, 128, False)
                                               for s in range(3)]
    assert all(c[:6] == (7, 1, 1, 1234, "fn", "meta") for c in Compiled.calls)
    _plan.launch_each(steps, (ws2, out[1:]))             # 2 bytes off 16: Triton, each
    assert len(jit_calls) == 6 and len(Compiled.calls) == 3
    steps.append(_plan.Launch(_probe, (7,), (3, 4), dict(BLOCK=128)))
    steps[-1].run = jit_run
    _plan.launch_each(steps, (ws2, out))                 # one not kept yet: each its own way
    assert len(jit_calls) == 7 and len(Compiled.calls) == 6


def test_direct_launch_steps_aside_for_launch_hooks():
    """Triton's launch-hook knobs are HookChains (empty when nothing is hooked, never None):
    the direct path is taken with none set and left to Triton (which calls the hooks) while a
    profiler's hook is in the chain."""
    from triton import knobs

    from pydl import _plan

    assert _plan._no_hooks()
    hooks = knobs.runtime.launch_enter_hook
    assert hooks is not None                 # the Triton this is tested with: a HookChain

    def hook(metadata):
        pass

    if hasattr(hooks, "add"):
        hooks.add(hook)
        try:
            assert not _plan._no_hooks()
        finally:
            hooks.remove(hook)
    assert _plan._no_hooks()
    assert not _plan._hooked(None) and _plan._hooked(hook)


@pytest.mark.parametrize("algo", ["persistent", "steps"])
def test_recurrence_checks_the_alignment_of_every_tensor_it_is_given(algo):
    """The recurrences' launches check only their distinct tensors' alignment (Launch's
    `checked`): an initial state that starts 2 bytes off a 16-byte boundary, the first call of
    the same signature that passes one, takes Triton's path for every launch reading it,
    while the aligned calls before and after run entirely by the direct path."""
    T, B, H = 3, 4, 16
    x = torch.randn(T, B, H, dtype=torch.float16)
    w = [torch.randn(4 * H, H, dtype=torch.float16) * 0.1 for _ in range(2)] + \
        [torch.randn(4 * H, dtype=torch.float16) * 0.1 for _ in range(2)]
    big = torch.randn(2, B * H + 1, dtype=torch.float16)
    aligned = big[:, :B * H].reshape(2, 1, B, H)[0]              # (1, B, H), 16-byte base
    shifted = big[:, 1:].reshape(2, 1, B, H)[0]                  # the same strides, 2 bytes on
    c0 = torch.zeros(1, B, H, dtype=torch.float16)

    def call(h0):
        return lambda: pydl.lstm(x, (h0, c0), w, algo=algo, backend="triton")
    with overhead.stubbed_launches(), poisoned_outputs(False):
        call(aligned)()
        call(aligned)()
        before = overhead.counted(call(aligned))
        off = overhead.counted(call(shifted))
        after = overhead.counted(call(aligned))
    assert before.direct == before.launches and after.direct == after.launches, (before, after)
    # the input projection's GEMM does not read h0; every recurrence launch does (the first
    # step's or the whole sequence's)
    assert off.launches == before.launches and off.direct < off.launches


def _counted_warm(fn):
    """overhead.counted(fn) after two calls (the first plans, the second takes the plan)."""
    fn()
    fn()
    return overhead.counted(fn)


def test_attention_with_dropout_takes_the_direct_path():
    """The dropout seed changes every call, passed by keyword; the kernels do not specialise
    on it, so the forward and the backward's three launches still take the direct path. (The
    forward draws the seed from torch's default CPU generator, a randint and its .item(), and
    the backward reads it from the CPU scalar the forward saved: the counter lists those
    reads though no device takes part.)"""
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    with overhead.stubbed_launches(), poisoned_outputs(False):
        def fwd():
            return pydl.scaled_dot_product_attention(q, q, q, dropout_p=0.1)
        f = _counted_warm(fwd)
        out = fwd()
        g = torch.ones_like(out)
        with torch.no_grad():
            b = _counted_warm(lambda: out.grad_fn.apply(g))
    assert (f.launches, f.direct) == (1, 1), f.aten_ops
    assert (b.launches, b.direct, b.aten) == (3, 3, 0), b.aten_ops


def test_attention_with_a_device_seed_takes_the_direct_path():
    """The kernel ops (here: inputs that broadcast, as under torch.compile) draw the dropout
    seed on the device and pass the tensor per call; the kernels do not specialise on it, so
    forward and backward take the direct path as with a host seed (they took Triton's whole
    path, and the argument binding of a signature inspection, every call)."""
    q = torch.randn(1, 2, 16, 16, requires_grad=True)
    kv = torch.randn(1, 1, 16, 16, requires_grad=True)      # broadcast over the heads
    with overhead.stubbed_launches(), poisoned_outputs(False):
        def fwd():
            return pydl.scaled_dot_product_attention(q, kv, kv, dropout_p=0.1)
        f = _counted_warm(fwd)
        out = fwd()
        g = torch.ones_like(out)

        def bwd():      # through the engine: the output is a view of the Function's
            return torch.autograd.grad(out, [q, kv], g, retain_graph=True)
        b = _counted_warm(bwd)
    assert (f.launches, f.direct) == (1, 1), f.aten_ops
    assert (b.launches, b.direct) == (3, 3), b.aten_ops
