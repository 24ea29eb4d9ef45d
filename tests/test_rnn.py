"""What the LSTM and GRU layers share (pydl/rnn.py's machinery, pydl/_rnn_launch.py's launches):
recompute, PackedSequence inputs, launches per call that do not grow with the sequence length,
the persistent schedule's launch (cooperative, one program per SM at most), the precision of
the backward's products (the recurrent one on a 16-bit copy of the gate gradients, the weight
gradients' fp32 x fp16), double backward, empty batches and NaN propagation.
"""
import contextlib
import importlib
import time
import weakref

import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_CUDA, KERNEL_BACKENDS, fuzz_seeds, take_tma_gemm
from rnn_checks import TF32, assert_same_but_chunks, check_layer
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import pydl
from bench import overhead
from pydl import _rnn_launch, rnn
from pydl.testing import assert_close, poisoned_outputs, random_tensor

KINDS = ("lstm", "gru")
# launches are counted where they are stubbed: Triton's interpreter and Numba's simulator
stubbed = pytest.mark.skipif(HAS_CUDA, reason="counts the emulators' launches (kernels stubbed)")


def _module(kind, *args, **kwargs):
    return (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(*args, **kwargs).to(DEVICE)


def _call(kind, x, hx, weights, **kw):
    """pydl.lstm / pydl.gru with (h0, c0) or h0; returns (out, [h_n, (c_n)])."""
    if kind == "lstm":
        out, (hn, cn) = pydl.lstm(x, hx, weights, **kw)
        return out, [hn, cn]
    out, hn = pydl.gru(x, hx, weights, **kw)
    return out, [hn]


def _outputs(kind, x, hx, weights, **kw):
    """A layer call's output (a packed one's data) and final states, as one list."""
    out, finals = _call(kind, x, hx, weights, **kw)
    return [out.data if isinstance(out, PackedSequence) else out, *finals]



# --- recompute: no gate activations kept between forward and backward -----------------------

@pytest.mark.parametrize("kind,case", [("lstm", (1, 1, 3, 7)), ("gru", (3, 2, 3, 6))])
def test_recompute_vs_reference(kind, case):
    """recompute=True against the reference: one step (no batched recomputation of the
    later steps), and a zero initial state."""
    check_layer("triton", None, torch.float32, *case, kind=kind, recompute=True,
                with_state=kind == "lstm", bias=kind == "lstm")


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=str)
def test_layers_on_the_tma_gemm(monkeypatch, kind, dtype):
    """A 16-bit stack (2 layers, both directions) with the shared GEMM's persistent TMA
    kernel taken wherever the tuner is offered it (the input projections into their fp32
    workspaces, the weight gradients), against the float64 reference and torch."""
    offered, grids = take_tma_gemm(monkeypatch)
    check_layer("triton", None, dtype, 3, 2, 8, 8, 2, True, kind=kind)
    assert any(offered) and grids, (offered, grids)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("pick", [1, 2, -1])
def test_layers_on_each_rnn_gemm_candidate(monkeypatch, kind, pick):
    """The layers' own GEMM (gemm_batched: the weight gradients summed over time, an fp32
    gate gradient times a 16-bit input by the "split" rule) on one of its tuning candidates
    instead of the default (the tuner's choice on a GPU), against the float64 reference and
    torch: a 16-bit stack of 2 layers, both directions, 4H = 128 gate rows."""
    from pydl import _plan, _rnn_launch
    taken = []

    def take(key, candidates, launch, inout=()):
        cfg = candidates[min(pick, len(candidates) - 1)]
        taken.append((cfg, candidates[0]))
        return cfg
    monkeypatch.setattr(_rnn_launch.RNN_GEMM_TUNER, "pick", take)
    _plan.clear_all()
    try:
        check_layer("triton", None, torch.float16, 3, 2, 24, 32, 2, True, kind=kind)
    finally:
        _plan.clear_all()
    assert any(cfg != default for cfg, default in taken), taken


def _saved_gate_activations(out, H):
    """The per-step gate activations (fp32 (T, B, 4H)) the layer's autograd node keeps, and
    every tensor it holds."""
    held = [t for t in out.grad_fn.saved_tensors if t is not None]
    acts = [t for t in held if t.dtype == torch.float32 and t.dim() == 3 and t.shape[-1] == 4 * H]
    return acts, held


@pytest.mark.parametrize("kind,backend,algo,L", [
    ("lstm", "triton", None, 2), ("lstm", "triton", "steps", 1), ("lstm", "numba", None, 1),
    ("gru", "triton", None, 1), ("gru", "numba", None, 1)])
def test_recompute(kind, backend, algo, L):
    """recompute=True (the nn modules' keyword, passed to pydl.lstm / pydl.gru): the same
    outputs and gradients as without it, and the autograd node holds no gate activations."""
    T, B, I, H = 3, 2, 3, 5
    G = 4 if kind == "lstm" else 3
    cls = pydl.nn.LSTM if kind == "lstm" else pydl.nn.GRU
    extra = dict(algo=algo) if algo else {}
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    results = []
    for recompute in (False, True):
        torch.manual_seed(5)    # the same weights both times
        m = cls(I, H, L, bidirectional=True, backend=backend, recompute=recompute,
                **extra).to(DEVICE)
        xr = x.clone().requires_grad_(True)
        out, hn = m(xr)
        hn = hn[0] if kind == "lstm" else hn
        acts, held = _saved_gate_activations(out, H)
        if recompute:
            assert not acts
            assert not any(t.dtype == torch.float32 and t.dim() == 3
                           and t.shape[-1] in (G * H, 4 * H)
                           for t in held), [tuple(t.shape) for t in held]
        else:
            assert len(acts) == 2 * L, [tuple(t.shape) for t in held]   # one per layer-direction
        (out.square().sum() + hn.sum()).backward()
        results.append([out.detach(), hn.detach(), xr.grad] + [p.grad for p in m.parameters()])
    # fp32 rounding at most: the recomputation runs every step in one launch (other tiles)
    for a, b in zip(*results):
        assert_close(b, a, torch.float32, reduction=4, tf32=TF32)


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("kind,buffers", [("gru", {"dgi", "dgh"}), ("lstm", {"dg"})])
def test_backward_writes_its_gradients_in_place(monkeypatch, kind, buffers, backend):
    """A layer's backward writes the gate gradients in place of the activations, which its
    BPTT reads last (kernels/triton/gru.py IN_WS, lstm.py IN_ACTS, and the Numba kernels'
    in_ws, in_acts), with no gradient buffers (the GRU's dgi and dgh, (T, B, 3H) fp32 each,
    its backward's largest; the LSTM's dg, (T, B, 4H)): the activations it recomputes with
    recompute=True, else the saved ones, on the first backward of a forward. A second
    backward through the retained graph finds them gone and recomputes them (the Recompute
    plan), to the first's gradients; the kernel op torch.compile runs (LayerKernels) leaves
    the saved tensors alone and asks for the buffers. The gradients against torch and the
    float64 reference: test_recompute, test_recompute_vs_reference and check_layer."""
    asked, redone = [], []
    _plan_capturing = rnn.capturing
    new = rnn.Plans.new
    monkeypatch.setattr(rnn.Plans, "new",
                        lambda self, name, *a: (asked.append(name), new(self, name, *a))[1])
    recompute_cls = importlib.import_module(f"pydl.{kind}").__dict__[
        "LSTMRecurrence" if kind == "lstm" else "GRURecurrence"].Recompute
    real_redo = recompute_cls.__call__
    monkeypatch.setattr(recompute_cls, "__call__",
                        lambda self, *a: (redone.append(1), real_redo(self, *a))[1])
    x = random_tensor((4, 2, 3), torch.float32, DEVICE)
    for recompute in (True, False):
        cls = pydl.nn.GRU if kind == "gru" else pydl.nn.LSTM
        m = cls(3, 5, backend=backend, recompute=recompute).to(DEVICE)
        xg = x.clone().requires_grad_(True)
        out, hn = m(xg)
        hn = hn if kind == "gru" else hn[0]
        loss = out.square().sum() + hn.sum()
        grads = []
        for n in range(3):
            asked.clear()
            redone.clear()
            grads.append(torch.autograd.grad(loss, [xg, *m.parameters()], retain_graph=n < 2))
            assert not buffers & set(asked), asked
            assert len(redone) == (1 if recompute or n > 0 else 0)
        for later in grads[1:]:
            for a, b in zip(later, grads[0]):
                assert_close(a, b, torch.float32, reduction=8, name="a retained graph's backward")
    # while a CUDA graph is captured (stood in for here), the saved activations are kept: a
    # captured backward may be replayed on them without the recomputation
    monkeypatch.setattr(rnn, "capturing", lambda: True)
    asked.clear()
    xg = x.clone().requires_grad_(True)
    out, _ = m(xg)
    replays = []
    for _ in range(2):
        replays.append(torch.autograd.grad(out.square().sum(), [xg], retain_graph=True)[0])
        assert buffers <= set(asked) and out.grad_fn.acts_gone is False, asked
    assert torch.equal(replays[0], replays[1])
    monkeypatch.setattr(rnn, "capturing", _plan_capturing)
    asked.clear()
    weights = [w.detach().requires_grad_() for w in m._flat_weights]
    cfg = rnn.layer_config(kind, backend, rnn.RNNConfig(1, False, True, 0.0, False, None))
    ops = rnn.LayerKernels(cfg, kind, backend)
    out, h_n, _ = rnn.RNNFunction.apply(x, None, None, None, ops, *weights)
    out.sum().backward()
    assert buffers <= set(asked), asked


# --- PackedSequence inputs ---------------------------------------------------------------------

# (lengths in the caller's order, layers, bidirectional, with a state, recompute[, proj_size:
# an LSTM with projections, whose sequences of each length run as a batch of their own])
PACKED_CASES = {
    "unsorted-bidir": ([3, 5, 1, 4], 1, True, True, False),
    "sorted-2layers": ([4, 4, 2], 2, False, True, False),
    "nostate-bidir-2layers": ([2, 3, 3, 1, 2], 2, True, False, False),
    "unsorted-bidir-recompute": ([3, 5, 1, 4], 1, True, True, True),
    "proj-unsorted-bidir": ([3, 5, 1, 4], 1, True, True, False, 2),
    "proj-sorted-2layers": ([4, 4, 2], 2, False, True, False, 3),
    "proj-nostate-bidir-2layers": ([2, 3, 3, 1, 2], 2, True, False, False, 2),
    "proj-unsorted-bidir-recompute": ([3, 5, 1, 4], 1, True, True, True, 2),
}
_PLAIN = [c for c in PACKED_CASES if not c.startswith("proj")]
_PROJ = [c for c in PACKED_CASES if c.startswith("proj")]


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")
@pytest.mark.parametrize("kind,backend,algo,case",
                         [(k, "triton", None, c) for k in KINDS for c in _PLAIN]
                         + [(k, "triton", "steps", "unsorted-bidir") for k in KINDS]
                         + [(k, "numba", None, "unsorted-bidir") for k in KINDS]
                         + [(k, "numba", "steps", "sorted-2layers") for k in KINDS]
                         + [("lstm", "triton", None, c) for c in _PROJ]
                         + [("lstm", "triton", "steps", "proj-nostate-bidir-2layers"),
                            ("lstm", "numba", None, "proj-unsorted-bidir"),
                            ("lstm", "numba", "steps", "proj-sorted-2layers")])
def test_packed_sequence(kind, backend, algo, case):
    """A PackedSequence input as torch.nn.LSTM / GRU take it (projections included): packed
    output, h_n (and c_n) of each sequence's own last step, in the caller's batch order;
    gradients of the packed data, the initial states (given in the caller's order) and every
    weight, against torch's packed LSTM / GRU. Sequences past their end keep their state
    (frozen rows); with projections the sequences of each length run apart (several groups in
    every proj case: running them as one group fails these)."""
    lengths, L, bidir, with_state, recompute, *proj = PACKED_CASES[case]
    I, H, T, B = 3, 5, max(lengths), len(lengths)
    m = _module(kind, I, H, L, bidirectional=bidir, **({"proj_size": proj[0]} if proj else {}))
    D = 2 if bidir else 1
    padded = random_tensor((T, B, I), torch.float32, DEVICE)
    packed = pack_padded_sequence(padded, torch.tensor(lengths), enforce_sorted=False)
    widths = ((proj[0] if proj else H), H)[:2 if kind == "lstm" else 1]     # h0[, c0]
    states = [random_tensor((L * D, B, n), torch.float32, DEVICE) if with_state else None
              for n in widths]
    results = []
    for be in (backend, "torch"):
        data = packed.data.clone().requires_grad_(True)
        seq = PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                             packed.unsorted_indices)
        hs = [None if s is None else s.clone().requires_grad_(True) for s in states]
        hx = (None if hs[0] is None else (tuple(hs) if kind == "lstm" else hs[0]))
        weights = [w.detach().clone().requires_grad_(True) for w in m._flat_weights]
        kw = dict(num_layers=L, bidirectional=bidir, backend=be)
        if be != "torch":
            kw.update(algo=algo, recompute=recompute)
        else:
            kw["training"] = True       # cuDNN refuses a backward in eval mode (no dropout here)
        out, finals = _call(kind, seq, hx, weights, **kw)
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        assert torch.equal(out.unsorted_indices, packed.unsorted_indices)
        gen = torch.Generator().manual_seed(3)
        cots = [torch.randn(t.shape, generator=gen).to(DEVICE) for t in (out.data, *finals)]
        torch.autograd.backward([out.data, *finals], cots)
        results.append([out.data.detach(), *[f.detach() for f in finals], data.grad,
                        *[h.grad for h in hs if h is not None], *[w.grad for w in weights]])
    # torch on the module directly: the functional call above must be what nn.LSTM does
    t_out, t_finals = m(packed, None if states[0] is None else
                        (tuple(states) if kind == "lstm" else states[0]))
    assert_close(results[1][0], t_out.data, torch.float32, name="torch functional vs module")
    for i, (ours, theirs) in enumerate(zip(*results)):
        assert_close(ours, theirs, torch.float32, reduction=T * L * 4 * (I + D * H), tf32=TF32,
                     name=f"packed result {i}")


def test_packed_sequence_module():
    """pydl.nn.GRU takes a PackedSequence as torch.nn.GRU does."""
    theirs = torch.nn.GRU(3, 4, batch_first=True).to(DEVICE)
    ours = pydl.nn.GRU(3, 4, batch_first=True, backend="triton").to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor((3, 5, 3), torch.float32, DEVICE)
    packed = pack_padded_sequence(x, torch.tensor([2, 5, 3]), batch_first=True,
                                  enforce_sorted=False)
    out, hn = ours(packed)
    t_out, t_hn = theirs(packed)
    assert_close(out.data, t_out.data, torch.float32, reduction=20, tf32=TF32)
    assert_close(hn, t_hn, torch.float32, reduction=20, tf32=TF32)


# --- launches per call ---------------------------------------------------------------------

# ATen ops that only allocate or make views: no device work
_NO_LAUNCH = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
              "_unsafe_view", "as_strided", "t", "transpose", "permute", "select", "slice",
              "unsqueeze", "squeeze", "detach", "alias", "expand", "split", "unbind",
              "_reshape_alias", "lift_fresh", "reshape"}


@contextlib.contextmanager
def counted_launches():
    """Kernel launches (Triton's interpreter, Numba's simulator) recorded and not run, and the
    ATen ops that do device work (fills, copies, random draws) recorded and run: a list of
    (kind, name, launch keyword arguments)."""
    from numba.cuda.simulator import kernel as sim
    from torch.utils._python_dispatch import TorchDispatchMode
    from triton.runtime import interpreter

    calls = []
    triton_call, numba_call = interpreter.GridExecutor.__call__, sim.FakeCUDAKernel.__call__

    def count_triton(self, *args, **kwargs):
        calls.append(("triton", self.fn.__name__, kwargs))

    def count_numba(self, *args):
        if self._device or sim._kernel_context:
            return numba_call(self, *args)
        calls.append(("numba", self.fn.__name__, {}))

    class CountATen(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__.rstrip("_")
            if name not in _NO_LAUNCH:
                calls.append(("aten", name, {}))
            return func(*args, **(kwargs or {}))

    interpreter.GridExecutor.__call__, sim.FakeCUDAKernel.__call__ = count_triton, count_numba
    try:
        with CountATen(), poisoned_outputs(False):
            yield calls
    finally:
        interpreter.GridExecutor.__call__, sim.FakeCUDAKernel.__call__ = triton_call, numba_call


@pytest.fixture
def gpu_schedule(monkeypatch):
    """The schedule a GPU takes ("persistent": one cooperative launch per direction), for
    counting launches that are not run."""
    monkeypatch.setattr(_rnn_launch, "persistent_on", lambda device: True)


def _layer_launches(kind, backend, algo, T, L=1, bidirectional=False, B=4, H=8):
    """(forward launches, backward launches) of a repeated call of a layer of T steps (the
    first call of a signature builds its plans, and the persistent schedule's barrier
    counters once per stream)."""
    I = 6
    m = _module(kind, I, H, L, bidirectional=bidirectional)
    x = random_tensor((T, B, I), torch.float32, DEVICE).requires_grad_(True)
    weights = [w.detach().requires_grad_(True) for w in m._flat_weights]
    with counted_launches() as calls:
        for _ in range(2):
            del calls[:]
            out, finals = _call(kind, x, None, weights, num_layers=L,
                                bidirectional=bidirectional, backend=backend, algo=algo)
            n_fwd = len(calls)
            (out.sum() + finals[0].sum()).backward()
    return calls[:n_fwd], calls[n_fwd:]


@stubbed
@pytest.mark.parametrize("kind,proj", [("lstm", 0), ("lstm", 3), ("gru", 0)])
def test_a_packed_call_launches_once_per_direction(gpu_schedule, kind, proj):
    """A packed batch of five sequences of five lengths runs each layer and direction's
    recurrence once, forward and backward, as a padded batch does (the LSTM with projections
    ran one layer call per distinct length)."""
    T, B, I, H, L = 6, 5, 3, 8, 2
    m = (torch.nn.LSTM(I, H, L, bidirectional=True, proj_size=proj) if kind == "lstm"
         else torch.nn.GRU(I, H, L, bidirectional=True)).to(DEVICE)
    x = random_tensor((T, B, I), torch.float32, DEVICE).requires_grad_(True)
    weights = [w.detach().requires_grad_(True) for w in m._flat_weights]
    with counted_launches() as calls:
        for _ in range(2):
            del calls[:]
            seq = pack_padded_sequence(x, [6, 5, 3, 2, 1])
            out, finals = _call(kind, seq, None, weights, num_layers=L, bidirectional=True,
                                backend="triton")
            n_fwd = len(calls)
            (out.data.sum() + finals[0].sum()).backward()
    fwd = [c for c in calls[:n_fwd] if c[1].endswith("layer_fwd")]
    bwd = [c for c in calls[n_fwd:] if c[1].endswith("layer_bwd")]
    assert len(fwd) == L * 2 and len(bwd) == L * 2, (fwd, bwd)


@stubbed
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_launches_do_not_grow_with_sequence_length(gpu_schedule, kind, backend):
    """With the kernels stubbed out, a layer call launches as many kernels (and ATen ops) at
    T=50 as at T=3, forward and backward, on the schedule a GPU takes: one recurrence launch
    per layer and direction each way, whatever T. algo="steps" launches once per step."""
    counts = {}
    for T in (3, 50):
        fwd, bwd = _layer_launches(kind, backend, None, T, L=2, bidirectional=True)
        counts[T] = (fwd, bwd)
        rec_f = [c for c in fwd if c[1].endswith("layer_fwd") or c[1] == "fwd"]
        rec_b = [c for c in bwd if c[1].endswith("layer_bwd") or c[1] == "bwd"]
        assert len(rec_f) == 4 and len(rec_b) == 4, (rec_f, rec_b)     # 2 layers x 2 directions
    for i, what in enumerate(("forward", "backward")):
        names3 = [c[1] for c in counts[3][i]]
        names50 = [c[1] for c in counts[50][i]]
        assert names3 == names50, f"{what}: {names3} vs {names50}"
    steps3 = _layer_launches(kind, backend, "steps", 3)
    steps50 = _layer_launches(kind, backend, "steps", 50)
    assert len(steps50[0]) - len(steps3[0]) == 47
    assert len(steps50[1]) - len(steps3[1]) == 47


@stubbed
@pytest.mark.parametrize("kind", KINDS)
def test_backward_gemms_are_one_product_each(monkeypatch, kind):
    """The backward's products over every (t, b) row of an fp16 stack (fp32 gate gradients
    times fp16 weights or inputs, kernels/triton/rnn.py gemm_batched: dW_ih, dW_hh, dX) run
    as one product each, the time axis merged into the rows (pydl/_rnn_launch.py
    merge_steps): a single K loop T*B deep for the weight gradients, T*B rows for dX, not T
    batches (grid axis 1, BATCH and N_RED all 1). Two layers, both directions (a
    direction's half of the output merges too)."""
    from triton.runtime import interpreter
    launches = []

    def record(self, *args, **kwargs):
        if self.fn.__name__ == "gemm_batched":
            launches.append((self.grid, args[5:11]))     # (grid, (M, N, K, BATCH, B2C, N_RED))
    monkeypatch.setattr(interpreter.GridExecutor, "__call__", record)
    T, B, I, H = 5, 3, 6, 8
    m = _module(kind, I, H, 2, bidirectional=True)
    x = random_tensor((T, B, I), torch.float16, DEVICE).requires_grad_(True)
    ws = [w.detach().half().requires_grad_(True) for w in m._flat_weights]
    with poisoned_outputs(False):
        out, finals = _call(kind, x, None, ws, num_layers=2, bidirectional=True,
                            backend="triton")
        del launches[:]
        torch.autograd.grad(out.float().sum(), [x, *ws])
    assert len(launches) >= 2 * 2 * 2 + 2, launches      # dW_ih, dW_hh per direction; dX
    for grid, (M, N, K, batch, _, n_red) in launches:
        assert (grid[1], batch, n_red) == (1, 1, 1), (grid, M, N, K, batch, n_red)
        assert K in (T * B, (T - 1) * B) or M == T * B, (M, N, K)


@stubbed
@pytest.mark.parametrize("kind", KINDS)
def test_persistent_launch_is_cooperative(gpu_schedule, kind):
    """The persistent recurrence launch asks for a cooperative grid of at most one program
    per SM, with the grid barrier compiled in; "steps" launches without it."""
    fwd, bwd = _layer_launches(kind, "triton", None, 5, B=40, H=600)
    for name, kw in [(c[1], c[2]) for c in fwd + bwd if c[1].startswith(kind + "_layer")]:
        assert kw["GRID_SYNC"] is True and kw["launch_cooperative_grid"] is True, name
    fwd, _ = _layer_launches(kind, "triton", "steps", 5, B=40, H=600)
    steps = [c[2] for c in fwd if c[1] == f"{kind}_layer_fwd"]
    assert len(steps) == 5 and all(kw["GRID_SYNC"] is False for kw in steps)
    assert all("launch_cooperative_grid" not in kw for kw in steps)


def test_step_tiles_fill_the_chip():
    """The default tiles spread one step over most SMs without exceeding them (DeepBench
    shapes on 132 SMs), at least 4 units a tile forward and 16 backward."""
    for B, H in ((32, 1024), (64, 512), (16, 2048), (128, 2048), (32, 256), (32, 1536)):
        for min_units, max_units in ((4, 32), (16, 64)):
            bb, bh = _rnn_launch.step_tiles(B, H, 132, min_units, max_units, 64)
            tiles = -(-B // bb) * -(-H // bh)
            assert bh >= min_units and tiles <= 132 or bh == max_units, (B, H, bb, bh, tiles)
            assert tiles >= 32, (B, H, bb, bh, tiles)


def _host_us_per_call(kind, lengths, repeat=9):
    """Microseconds of host time per forward + backward call with the launches stubbed out, for
    each sequence length in lengths: the best of repeat calls, the lengths taken in turn so that
    each sees the same machine. Thread CPU time, which a busy neighbour (another test worker, a
    simulated CUDA block's threads) does not inflate."""
    m = _module(kind, 16, 32, 1)
    weights = [w.detach().requires_grad_(True) for w in m._flat_weights]
    xs = [random_tensor((T, 8, 16), torch.float32, DEVICE).requires_grad_(True) for T in lengths]
    best = [float("inf")] * len(lengths)
    for _ in range(repeat):
        for i, x in enumerate(xs):
            with counted_launches():
                t0 = time.thread_time_ns()
                out, _ = _call(kind, x, None, weights, backend="triton")
                out.sum().backward()
                best[i] = min(best[i], time.thread_time_ns() - t0)
    return [b / 1e3 for b in best]


@stubbed
@pytest.mark.parametrize("kind", KINDS)
def test_host_time_does_not_grow_with_sequence_length(gpu_schedule, kind):
    """Host time of a call with the launches stubbed: T=50 costs about what T=3 does on the
    persistent schedule (the launch plan is built once a direction, not per step)."""
    t3, t50 = _host_us_per_call(kind, (3, 50))
    assert t50 < 1.5 * t3 + 200, (t3, t50)


# --- the launch path: plans built once, no graph without a gradient ---------------------------

def _cell(kind):
    """pydl.lstm_cell / pydl.gru_cell as fn(x, states, w_ih, w_hh, b_ih, b_hh, backend) ->
    a list of outputs; states: [h, c] or [h], [None] for zeros."""
    if kind == "lstm":
        return lambda x, s, *w, backend: list(pydl.lstm_cell(
            x, None if s[0] is None else tuple(s), *w, backend=backend))
    return lambda x, s, *w, backend: [pydl.gru_cell(x, s[0], *w, backend=backend)]


def _layer_and_cell_calls(kind, backend, algo=None):
    """One training step of a two-layer bidirectional layer with dropout and initial states,
    and of a cell: fn() running both forward and backward."""
    torch.manual_seed(0)
    m = _module(kind, 3, 4, 2, bidirectional=True)
    G = 4 if kind == "lstm" else 3
    n_states = 2 if kind == "lstm" else 1
    x = random_tensor((5, 2, 3), torch.float32, DEVICE).requires_grad_(True)
    states = [random_tensor((4, 2, 4), torch.float32, DEVICE).requires_grad_(True)
              for _ in range(n_states)]
    weights = [w.detach().requires_grad_(True) for w in m._flat_weights]
    cw = [random_tensor(s, torch.float32, DEVICE).requires_grad_(True)
          for s in ((G * 4, 3), (G * 4, 4), (G * 4,), (G * 4,))]

    def step():
        hx = tuple(states) if kind == "lstm" else states[0]
        out, finals = _call(kind, x, hx, weights, num_layers=2, bidirectional=True,
                            dropout=0.5, training=True, backend=backend, algo=algo)
        ys = _cell(kind)(x[0], [s[0] for s in states], *cw, backend=backend)
        (out.sum() + finals[0].sum() + sum(y.sum() for y in ys)).backward()
    return step


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend,algo", [("triton", None), ("triton", "steps"), ("numba", None)])
def test_repeated_calls_build_nothing(monkeypatch, kind, backend, algo):
    """A second call with the same signature (layers with dropout and states, a cell, forward
    and backward) builds no launch: every plan comes from its cache."""
    step = _layer_and_cell_calls(kind, backend, algo)
    step()
    sizes = [len(c.entries) for c in pydl._plan.Cache.all]

    def refuse(*args, **kwargs):
        raise AssertionError("a launch was built on a repeated call")
    for launcher in (_rnn_launch.TritonRNN, _rnn_launch.NumbaRNN):
        for name in ("recurrence", "gemm_plan", "bias_grad_plan", "mul_plan"):
            monkeypatch.setattr(launcher, name, staticmethod(refuse))
    step()
    assert [len(c.entries) for c in pydl._plan.Cache.all] == sizes


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_graph_without_gradient(monkeypatch, kind, backend):
    """Under no_grad, or when no input requires grad, the layers and cells run their forward
    kernels directly (pydl._plan.needs_graph): no autograd Function, the same outputs."""
    from pydl import rnn
    cell_fn = importlib.import_module(f"pydl.{kind}").__dict__[
        "LSTMCellFunction" if kind == "lstm" else "GRUCellFunction"]
    m = _module(kind, 3, 4)
    x = random_tensor((4, 2, 3), torch.float32, DEVICE)
    weights = [w.detach() for w in m._flat_weights]
    trained = [w.detach().requires_grad_(True) for w in weights]
    want, want_finals = _call(kind, x, None, trained, backend=backend)
    want_cell = _cell(kind)(x[0], [None], *trained[:2], None, None, backend=backend)

    def refuse(*args):
        raise AssertionError("an autograd Function ran without a gradient to record")
    monkeypatch.setattr(rnn.RNNFunction, "apply", refuse)
    monkeypatch.setattr(cell_fn, "apply", refuse)
    for grad_mode, ws in ((False, trained), (True, weights)):
        with torch.set_grad_enabled(grad_mode):
            out, finals = _call(kind, x, None, ws, backend=backend)
            ys = _cell(kind)(x[0], [None], *ws[:2], None, None, backend=backend)
        assert out.grad_fn is None and all(f.grad_fn is None for f in finals)
        assert torch.equal(out, want.detach())
        for a, b in zip(finals + ys, want_finals + want_cell):
            assert torch.equal(a, b.detach())


class _LiveBytes:
    """Bytes of storage alive, and their peak, of the tensors handed to `track` (each counted
    until its storage is freed, whichever views held it)."""

    def __init__(self):
        self.live = self.peak = 0

    def track(self, t):
        n = t.untyped_storage().nbytes()
        self.live += n
        self.peak = max(self.peak, self.live)
        weakref.finalize(t.untyped_storage(), self._free, n)
        return t

    def _free(self, n):
        self.live -= n


def _peak_bytes(monkeypatch, call, mode=contextlib.nullcontext) -> int:
    """The peak of live bytes pydl's layer plans allocate (rnn.fresh) over call() under
    `mode`, the launches stubbed in emulation (Triton's interpreter holds on to its last
    launch's arguments; a GPU launch does not)."""
    real, live = rnn.fresh, _LiveBytes()
    monkeypatch.setattr(rnn, "fresh", lambda make: live.track(real(make)))
    with mode(), (contextlib.nullcontext() if HAS_CUDA else overhead.stubbed_launches()):
        call()
    monkeypatch.setattr(rnn, "fresh", real)
    return live.peak


@pytest.mark.parametrize("kind,proj,packed", [("lstm", 0, False), ("lstm", 3, False),
                                              ("gru", 0, False), ("lstm", 0, True)])
@pytest.mark.parametrize("backend,algo", [(b, a) for b in KERNEL_BACKENDS
                                          for a in ((None, "steps") if b == "triton" else (None,))])
def test_a_layer_call_without_graph_holds_one_workspace(monkeypatch, kind, proj, packed, algo,
                                                         backend):
    """A stack's call that records no graph keeps nothing for a backward: one direction's fp32
    input projection at a time (each let go once its recurrence is launched; the GRU's 3H
    wide, not its 4H workspace), the activations in a plane the plan keeps, the LSTM's cell
    state (and unprojected m) as one (B, H) plane every step shares, and at most two layers'
    outputs (the one being read, the one being written); its outputs bitwise a training
    call's. A training call holds every direction's workspace and cell states for its
    backward. (The bytes counted with the launches stubbed in emulation: Triton's interpreter
    holds on to its last launch's arguments; a GPU launch does not.) A packed input's call
    too."""
    T, B, I, H, L, D = 4, 3, 5, 6, 2, 2
    P = proj or H
    mod = (torch.nn.LSTM(I, H, L, bidirectional=True, proj_size=proj) if kind == "lstm"
           else torch.nn.GRU(I, H, L, bidirectional=True)).to(DEVICE)
    weights = [w.detach().requires_grad_() for w in mod._flat_weights]
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    if packed:
        x = pack_padded_sequence(x, [4, 4, 2])
    h0 = random_tensor((L * D, B, P), torch.float32, DEVICE)
    hx = (h0, random_tensor((L * D, B, H), torch.float32, DEVICE)) if kind == "lstm" else h0

    def call():
        return _outputs(kind, x, hx, weights, num_layers=L, bidirectional=True,
                        backend=backend, algo=algo)
    want = call()
    with torch.no_grad():
        got = call()
    for a, b in zip(got, want):
        assert torch.equal(a, b.detach())

    f32 = 4
    finals = L * D * B * (P + (H if kind == "lstm" else 0)) * f32
    ws = T * B * 4 * H * f32        # a training call's workspace
    xp = T * B * (4 if kind == "lstm" else 3) * H * f32     # an inference call's
    state = B * H * f32 * ((2 if proj else 1) if kind == "lstm" else 0)
    for mode in (torch.no_grad, torch.inference_mode):
        assert _peak_bytes(monkeypatch, call, mode) == \
            finals + 2 * T * B * D * P * f32 + xp + state
    assert _peak_bytes(monkeypatch, call) >= \
        finals + L * D * (ws + (T * B * H * f32 if kind == "lstm" else 0))


@pytest.mark.parametrize("kind,proj,packed", [("lstm", 0, False), ("lstm", 3, False),
                                              ("gru", 0, False), ("gru", 0, True)])
@pytest.mark.parametrize("backend,algo", [("triton", None), ("numba", None)])
def test_a_long_call_without_graph_projects_in_chunks(monkeypatch, kind, proj, packed, algo,
                                                      backend):
    """A call that records no graph, whose fp32 input projection would exceed
    rnn.INFERENCE_CHUNK_BYTES, projects and runs each direction a chunk of steps at a time
    (here 3 of 7: chunks of 3, 3, 1 forward, 1, 3, 3 reversed), each chunk starting from the
    output row and cell state the one before ended in (a packed input's ended rows carry
    theirs): its outputs bitwise an unchunked call's, one chunk's projection alive at a
    time. (The step-by-step schedule's chunks: test_chunked_inference_fuzz.)"""
    from pydl import _plan
    T, B, I, H, L, D = 7, 2, 3, 4, 2, 2
    P, G = proj or H, 4 if kind == "lstm" else 3
    mod = (torch.nn.LSTM(I, H, L, bidirectional=True, proj_size=proj) if kind == "lstm"
           else torch.nn.GRU(I, H, L, bidirectional=True)).to(DEVICE)
    weights = [w.detach() for w in mod._flat_weights]
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    if packed:
        x = pack_padded_sequence(x, [7, 2])
    h0 = random_tensor((L * D, B, P), torch.float32, DEVICE)
    hx = (h0, random_tensor((L * D, B, H), torch.float32, DEVICE)) if kind == "lstm" else h0

    def call():
        return _outputs(kind, x, hx, weights, num_layers=L, bidirectional=True,
                        backend=backend, algo=algo)
    with torch.no_grad():
        want = call()                                   # one chunk: the whole sequence
        f32, steps = 4, 3
        monkeypatch.setattr(rnn, "INFERENCE_CHUNK_BYTES", f32 * B * G * H * steps)
        assert rnn.chunk_steps(T, B, G * H) == steps
        _plan.clear_all()
        got = call()
        assert_same_but_chunks(got, want, 4 * (I + H))
        peak = _peak_bytes(monkeypatch, call)
    # the finals, two layers' outputs, one chunk's projection, the cell state planes (the
    # chunk's, and the one before's it starts from) and m
    finals = L * D * B * (P + (H if kind == "lstm" else 0)) * f32
    state = B * H * f32 * ((3 if proj else 2) if kind == "lstm" else 0)
    assert peak == finals + 2 * T * B * D * P * f32 + steps * B * G * H * f32 + state
    _plan.clear_all()
    # the DeepBench GRU h2048-b32-t375's 295 MB projection: 3 chunks of at most 170 steps
    monkeypatch.undo()
    assert rnn.chunk_steps(375, 32, 3 * 2048) == 170 and rnn.chunk_steps(25, 32, 4096) == 25


@pytest.mark.parametrize("backend,algo", [("triton", None), ("triton", "steps"), ("numba", None)])
def test_chunked_inference_fuzz(request, monkeypatch, backend, algo):
    """Random stacks (LSTM with and without projections, GRU; layers, directions, biases,
    batch-first, unbatched and packed inputs, initial states or none) under no_grad with a
    random chunk of steps (rnn.INFERENCE_CHUNK_BYTES): outputs bitwise a training call's,
    which never chunks. PYDL_FUZZ_SEED=<seed> reruns one case."""
    from pydl import _plan
    for seed in fuzz_seeds(request, 2, 60):
        rng = np.random.default_rng(1000 + seed)
        lstm = rng.random() < 0.6
        I, H, T, B = (int(rng.integers(1, n)) for n in (5, 6, 9, 4))
        L, D = int(rng.integers(1, 3)), int(rng.integers(1, 3))
        proj = int(rng.integers(1, H)) if lstm and H > 1 and rng.random() < 0.4 else 0
        bias, batch_first = bool(rng.random() < 0.8), bool(rng.random() < 0.3)
        form = str(rng.choice(["padded", "unbatched", "packed"]))
        kw = dict(num_layers=L, bidirectional=D == 2, bias=bias, batch_first=batch_first)
        mod = (torch.nn.LSTM(I, H, proj_size=proj, **kw) if lstm
               else torch.nn.GRU(I, H, **kw)).to(DEVICE)
        weights = [w.detach().requires_grad_() for w in mod._flat_weights]
        P = proj or H
        if form == "unbatched":
            x, lead = random_tensor((T, I), torch.float32, DEVICE), (L * D,)
        else:
            x, lead = random_tensor((T, B, I), torch.float32, DEVICE), (L * D, B)
            if form == "packed":
                lengths = sorted(rng.integers(1, T + 1, B).tolist(), reverse=True)
                lengths[0] = T
                x = pack_padded_sequence(x, lengths)
            elif batch_first:
                x = x.transpose(0, 1)
        hx = None
        if rng.random() < 0.6:
            h0 = random_tensor((*lead, P), torch.float32, DEVICE)
            hx = (h0, random_tensor((*lead, H), torch.float32, DEVICE)) if lstm else h0
        steps = int(rng.integers(1, T + 1))
        case = f"seed {seed}: {'lstm' if lstm else 'gru'} proj={proj} {form} T={T} B={B} " \
               f"{kw} states={hx is not None} chunk={steps}"

        kind = "lstm" if lstm else "gru"
        want = _outputs(kind, x, hx, weights, backend=backend, algo=algo, **kw)
        rows = 1 if form == "unbatched" else B
        monkeypatch.setattr(rnn, "INFERENCE_CHUNK_BYTES", 4 * rows * (4 if lstm else 3) * H * steps)
        _plan.clear_all()
        with torch.no_grad():
            got = _outputs(kind, x, hx, weights, backend=backend, algo=algo, **kw)
        monkeypatch.undo()
        _plan.clear_all()
        assert_same_but_chunks(got, want, 4 * (I + H + 2 * P), case)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_outputs_without_gradient(kind, backend):
    """An output no gradient reaches gets None in the backward (no zeros made for it): the
    gradients when only h_n (or c_n) of a layer, or only one output of the LSTM cell, is
    used match torch's."""
    m = _module(kind, 3, 4)
    x = random_tensor((4, 2, 3), torch.float32, DEVICE)
    n_states = 2 if kind == "lstm" else 1
    states = [random_tensor((1, 2, 4), torch.float32, DEVICE) for _ in range(n_states)]
    for used in range(1, 1 + n_states):        # h_n, then c_n
        results = []
        for be in (backend, "torch"):
            xr = x.clone().requires_grad_(True)
            hs = [s.clone().requires_grad_(True) for s in states]
            ws = [w.detach().clone().requires_grad_(True) for w in m._flat_weights]
            _, finals = _call(kind, xr, tuple(hs) if kind == "lstm" else hs[0], ws, backend=be,
                              training=True)
            finals[used - 1].square().sum().backward()
            results.append([xr.grad, *[h.grad for h in hs], *[w.grad for w in ws]])
        for a, b in zip(*results):
            assert_close(a, b, torch.float32, reduction=16, tf32=TF32)
    if kind == "lstm":
        for used in (0, 1):                     # h1 alone, c1 alone
            results = []
            for be in (backend, "torch"):
                leaves = [t.clone().requires_grad_(True)
                          for t in (x[0], states[0][0], states[1][0], *m._flat_weights)]
                outs = pydl.lstm_cell(leaves[0], (leaves[1], leaves[2]), *leaves[3:],
                                      backend=be)
                outs[used].square().sum().backward()
                results.append([t.grad for t in leaves])
            for a, b in zip(*results):
                assert_close(a, b, torch.float32, reduction=16, tf32=TF32)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_strided_biases(kind, backend):
    """Biases that are strided views (every other element of a buffer): the recurrence
    kernels read them through their strides, in the layers and the cells, as torch does."""
    T, B, I, H = 3, 2, 3, 4
    G = 4 if kind == "lstm" else 3
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    w_ih = random_tensor((G * H, I), torch.float32, DEVICE)
    w_hh = random_tensor((G * H, H), torch.float32, DEVICE)
    buf = random_tensor((4 * G * H,), torch.float32, DEVICE)
    results = []
    for be in (backend, "torch"):
        leaves = [t.clone().requires_grad_(True) for t in (x, w_ih, w_hh, buf)]
        xr, wi, wh, big = leaves
        b_ih, b_hh = big[::4], big[1::4]
        assert not b_ih.is_contiguous()
        out, finals = _call(kind, xr, None, [wi, wh, b_ih, b_hh], backend=be, training=True)
        ys = _cell(kind)(xr[0], [None], wi, wh, b_ih, b_hh, backend=be)
        (out.square().sum() + sum(y.square().sum() for y in ys)).backward()
        results.append([out.detach(), *[y.detach() for y in ys], *[t.grad for t in leaves]])
    for a, b in zip(*results):
        assert_close(a, b, torch.float32, reduction=T * (I + H), tf32=TF32)


@pytest.mark.skipif(HAS_CUDA, reason="the GPU runs the real grid barrier "
                    "(tests/test_rnn_persistent.py)")
@pytest.mark.parametrize("kind", KINDS)
def test_persistent_schedule_in_emulation(monkeypatch, kind):
    """The persistent schedule in emulation, one program (one "SM"): the launch runs the grid
    barrier's bookkeeping (arrivals, the last program out resetting the counters) in the
    interpreter. It gives bit for bit what the step-by-step launches give on the same tiles;
    the counters are zero after every call and one pair serves them all, made once (no
    memset per call)."""
    monkeypatch.setattr(_rnn_launch, "multiprocessors", lambda device: 1)
    m = _module(kind, 3, 5, 1, bidirectional=True)
    x = random_tensor((4, 2, 3), torch.float32, DEVICE)
    results = {}
    for algo in ("steps", None):
        if algo is None:
            monkeypatch.setattr(_rnn_launch, "persistent_on", lambda device: True)
        for _ in range(2):
            xr = x.clone().requires_grad_(True)
            ws = [w.detach().clone().requires_grad_(True) for w in m._flat_weights]
            out, finals = _call(kind, xr, None, ws, bidirectional=True, backend="triton",
                                algo=algo)
            (out.square().sum() + finals[0].sum()).backward()
            results[algo] = [out.detach(), finals[0].detach(), xr.grad, *[w.grad for w in ws]]
            if algo is None:
                counters = _rnn_launch.barrier_counters(x.device)
                assert not counters.any()
    for i, (a, b) in enumerate(zip(results[None], results["steps"])):
        assert torch.equal(a, b), f"result {i} differs"
    with counted_launches() as calls:
        _call(kind, x, None, [w.detach() for w in m._flat_weights], bidirectional=True,
              backend="triton")
    assert _rnn_launch.barrier_counters(x.device) is counters
    assert [c for c in calls if c[0] == "aten"] == []
    rec = [c[2] for c in calls if c[1] == f"{kind}_layer_fwd"]
    assert len(rec) == 2 and all(kw["GRID_SYNC"] for kw in rec)


# --- precision of the backward's fp32 x fp16 products ------------------------------------------

@contextlib.contextmanager
def tensor_core_rounding():
    """Triton's interpreter multiplies fp32 exactly whatever input_precision says; make it
    round as Hopper's tensor cores do: "tf32" truncates each fp32 operand to its top 19 bits
    (no round-to-nearest), "tf32x3" sums the three TF32 products of the operands' hi/lo
    splits."""
    import numpy as np
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    def trunc(a):
        return (a.astype(np.float32).view(np.int32) & np.int32(-8192)).view(np.float32)

    original = interpreter.InterpreterBuilder.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.data.dtype == np.float32 and input_precision in (ir.INPUT_PRECISION.TF32,
                                                              ir.INPUT_PRECISION.TF32x3):
            x, y = a.data, b.data.astype(np.float32)
            if input_precision == ir.INPUT_PRECISION.TF32:
                prod = np.matmul(trunc(x), trunc(y))
            else:
                xh, yh = trunc(x), trunc(y)
                prod = (np.matmul(xh, yh) + np.matmul(trunc(x - xh), yh)
                        + np.matmul(xh, trunc(y - yh)))
            return interpreter.TensorHandle(prod.astype(d.data.dtype) + d.data, d.dtype.scalar)
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    interpreter.InterpreterBuilder.create_dot = create_dot
    try:
        yield
    finally:
        interpreter.InterpreterBuilder.create_dot = original


def _backward_recurrence(kind, mode, T, B, H, gen, d_out_scale=1.0):
    """One fp16 direction's backward recurrence (the Triton kernel, no other launch) on random
    saved activations: (dg per step (T, B, G*H) fp32 (the LSTM's, or the GRU's dgh), dh0,
    the inputs). d_out_scale: of the upstream gradients."""
    lstm_mod, gru_mod = importlib.import_module("pydl.lstm"), importlib.import_module("pydl.gru")
    G = 4 if kind == "lstm" else 3
    w_hh = (torch.randn(G * H, H, generator=gen) / H ** 0.5).half()
    d_out = (torch.randn(T, B, H, generator=gen) * d_out_scale).half()
    launch = lstm_mod.TritonLSTM if kind == "lstm" else gru_mod.TritonGRU
    ws = torch.empty(launch.backward_planes(B, H, G * H, w_hh.dtype, torch.device(DEVICE)), B, H)
    dh0 = torch.empty(B, H, dtype=torch.float16)
    if kind == "lstm":
        acts = torch.rand(T, B, 4 * H, generator=gen)
        cs = torch.randn(T, B, H, generator=gen)
        dg = torch.empty(T, B, 4 * H)
        args = (acts, cs, None, w_hh, d_out, None, None, None, dg, ws, None, dh0, None)
        saved = (acts, cs)
    else:
        acts = torch.rand(T, B, 4 * H, generator=gen)
        out = torch.randn(T, B, H, generator=gen).half()
        dgi, dg = torch.empty(T, B, 3 * H), torch.empty(T, B, 3 * H)
        args = (acts, out, None, w_hh, d_out, None, None, dgi, dg, ws, dh0)
        saved = (acts, out)
    launch.backward_plan(mode, *args, False, torch.float16)(*args)
    return dg, dh0, w_hh, d_out, saved


def _reference_recurrence(kind, dg, w_hh, d_out, saved, dg_next_of):
    """float64 BPTT of `_backward_recurrence`'s direction, each step's recurrent product
    dh = dg_next_of(dg[t + 1]) W_hh taking the KERNEL's dg of the step after (so a step's
    error is its own): (dg per step, dh0)."""
    f64 = torch.float64
    T, B, _ = d_out.shape
    H = w_hh.shape[1]
    w = w_hh.to(f64)
    want = torch.empty(dg.shape, dtype=f64)
    run = torch.zeros(B, H, dtype=f64)          # LSTM: dc; GRU: the direct part dh1 z
    for t in range(T - 1, -1, -1):
        dh = d_out[t].to(f64) + (dg_next_of(dg[t + 1]) @ w if t + 1 < T else 0.0)
        if kind == "lstm":
            acts, cs = (v.to(f64) for v in saved)
            i, f, g, o = (acts[t, :, q * H:(q + 1) * H] for q in range(4))
            c1, c = cs[t], (cs[t - 1] if t > 0 else torch.zeros(B, H, dtype=f64))
            tc = torch.tanh(c1)
            dct = run + dh * o * (1 - tc * tc)
            want[t] = torch.cat([dct * g * i * (1 - i), dct * c * f * (1 - f),
                                 dct * i * (1 - g * g), dh * tc * o * (1 - o)], 1)
            run = dct * f
        else:
            ws, out = (v.to(f64) for v in saved)
            r, z, n, ghn = (ws[t, :, q * H:(q + 1) * H] for q in range(4))
            h = out[t - 1] if t > 0 else torch.zeros(B, H, dtype=f64)
            dh1 = dh + run
            dan = dh1 * (1 - z) * (1 - n * n)
            want[t] = torch.cat([dan * ghn * r * (1 - r), dh1 * (h - n) * z * (1 - z), dan * r], 1)
            run = dh1 * z
    return want, dg_next_of(dg[0]) @ w + (run if kind == "gru" else 0.0)


def _rel(have, want):
    return ((have.to(torch.float64) - want).abs().max() / want.abs().max()).item()


def _to_fp16(dg):
    return dg.half().to(torch.float64)


@pytest.mark.skipif(HAS_CUDA, reason="calls the kernel on CPU tensors (emulation)")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["steps", "one_program"])
@pytest.mark.parametrize("sms", [1, 132], ids=["unsplit", "split"])
def test_fp16_recurrent_product_reads_the_16bit_copy(monkeypatch, kind, mode, sms):
    """In an fp16 layer each backward step multiplies the step after's gate gradients,
    rounded to fp16 (a copy by step parity in the workspace, kernels/triton/rnn.py
    Precision), by W_hh. Every step's gate gradients (and dh0, the pseudo-step's) must equal
    a float64 BPTT that rounds the kernel's own dg_next so, to fp32 accuracy (1e-5 of the
    largest): a copy of the wrong step or parity, a stale one, a missing factor (the GRU's r
    in dgh) or a split's partial left out is off by far more. Unsplit and split over K
    (sms=132: 2 splits of the 48-unit layer's 4H or 3H), one launch per step and one for
    all; 5 rows (a masked row block)."""
    monkeypatch.setattr(_rnn_launch, "multiprocessors", lambda device: sms)
    gen = torch.Generator().manual_seed(0)
    T, B, H = 4, 5, 48
    G = 4 if kind == "lstm" else 3
    split = _rnn_launch.backward_tile(B, H, G * H, 2, 2, sms)["SPLIT"]
    assert (split > 1) == (sms > 1), split
    with poisoned_outputs(True):
        dg, dh0, w_hh, d_out, saved = _backward_recurrence(kind, mode, T, B, H, gen)
    want, want_dh0 = _reference_recurrence(kind, dg, w_hh, d_out, saved, _to_fp16)
    for t in range(T):
        assert _rel(dg[t], want[t]) < 1e-5, f"step {t}: relative error {_rel(dg[t], want[t]):.1e}"
    assert _rel(dh0, want_dh0) < 1e-3, f"dh0 (fp16): relative error {_rel(dh0, want_dh0):.1e}"
    # the product really is the fp16 copy's: exact fp32 gate gradients give another dh
    exact, _ = _reference_recurrence(kind, dg, w_hh, d_out, saved, lambda v: v.to(torch.float64))
    assert max(_rel(dg[t], exact[t]) for t in range(T - 1)) > 1e-5


@pytest.mark.skipif(HAS_CUDA, reason="emulates the tensor cores' rounding in the interpreter")
@pytest.mark.parametrize("kind", KINDS)
def test_fp16_backward_weight_gradients_are_fp32_accurate(kind):
    """In an fp16 layer the weight-gradient GEMMs multiply the fp32 gate gradients by fp16
    inputs: with the tensor cores' TF32 truncation emulated, dg^T h must still be
    fp32-accurate (the hi/lo split, kernels/triton/rnn.py `dot`), within 1e-5 of float64
    (relative to its largest value); plain TF32 truncation is off by ~1e-3. The recurrent
    product's own rounding (the 16-bit copy) stays within fp16's: 2^-10 of the largest."""
    lstm_mod = importlib.import_module("pydl.lstm")
    T, B, H = 2, 16, 32
    G = 4 if kind == "lstm" else 3
    gen = torch.Generator().manual_seed(0)
    f64 = torch.float64
    with tensor_core_rounding(), poisoned_outputs(False):
        grads, _, w_hh, d_out, saved = _backward_recurrence(kind, "steps", T, B, H, gen)
        exact, _ = _reference_recurrence(kind, grads, w_hh, d_out, saved, lambda v: v.to(f64))
        err = _rel(grads[0], exact[0])
        assert err < 2 ** -10, f"recurrent product: relative error {err:.2e}"
        h = torch.randn(T * B, H, generator=gen).half()
        acc = torch.empty(G * H, H)
        rows = grads.reshape(T * B, -1)
        lstm_mod.TritonLSTM.gemm_plan(rows, h, acc, trans_a=True, model=torch.float16)(
            rows, h, acc, None, None)
        want = rows.to(f64).t() @ h.to(f64)
        err = ((acc.to(f64) - want).abs().max() / want.abs().max()).item()
        assert err < 1e-5, f"weight-gradient GEMM: relative error {err:.2e}"


# --- double backward, empty batches, NaN ------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_double_backward_raises(kind, backend):
    """The layers' and cells' backward is kernels: differentiating a gradient through them
    raises (naming the op) instead of silently dropping their share of a second derivative,
    also with a constant cotangent (a gradient penalty)."""
    m = _module(kind, 3, 4)
    x = random_tensor((2, 2, 3), torch.float32, DEVICE).requires_grad_(True)
    out, _ = _call(kind, x, None, list(m._flat_weights), backend=backend)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"pydl.{kind} has no double backward"):
        g.square().sum().backward()
    # torch.autograd.grad runs only the nodes on a path to its inputs: the refusal must lie
    # on them (a penalty with another term that reaches x)
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"pydl.{kind} has no double backward"):
        torch.autograd.grad(g.square().sum() + x.square().sum(), x)
    cell = (pydl.lstm_cell if kind == "lstm" else pydl.gru_cell)
    G = 4 if kind == "lstm" else 3
    w_ih = random_tensor((G * 4, 3), torch.float32, DEVICE).requires_grad_(True)
    w_hh = random_tensor((G * 4, 4), torch.float32, DEVICE)
    y = cell(x[0], None, w_ih, w_hh, backend=backend)
    y = y[0] if kind == "lstm" else y
    (g,) = torch.autograd.grad(y.sum(), w_ih, create_graph=True)
    with pytest.raises(RuntimeError, match=f"pydl.{kind}_cell has no double backward"):
        g.sum().backward()
    y = cell(x[0], None, w_ih, w_hh, backend=backend)
    y = y[0] if kind == "lstm" else y
    (g,) = torch.autograd.grad(y.sum(), w_ih, create_graph=True)
    with pytest.raises(RuntimeError, match=f"pydl.{kind}_cell has no double backward"):
        torch.autograd.grad(g.square().sum() + w_ih.sum(), w_ih)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_empty_batch(kind, backend):
    """Batch 0, as torch: outputs (T, 0, H) and (L*D, 0, H), zero weight gradients; the cells
    (0, H). Sequence length 0 raises as torch does (test_lstm / test_gru bad input)."""
    m = _module(kind, 3, 4, 2, bidirectional=True)
    x = torch.empty(5, 0, 3, device=DEVICE, requires_grad=True)
    weights = [w.detach().requires_grad_(True) for w in m._flat_weights]
    out, finals = _call(kind, x, None, weights, num_layers=2, bidirectional=True, backend=backend)
    t_out, t_finals = _call(kind, x, None, weights, num_layers=2, bidirectional=True,
                            backend="torch", training=True)
    assert out.shape == t_out.shape == (5, 0, 8)
    assert [f.shape for f in finals] == [f.shape for f in t_finals]
    (out.sum() + finals[0].sum()).backward()
    assert x.grad.shape == x.shape
    for w in weights:
        assert w.grad is not None and torch.equal(w.grad, torch.zeros_like(w))
    cell = pydl.lstm_cell if kind == "lstm" else pydl.gru_cell
    y = cell(torch.empty(0, 3, device=DEVICE), None, weights[0], weights[1], backend=backend)
    assert (y[0] if kind == "lstm" else y).shape == (0, 4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_nan_propagates_as_in_torch(kind, backend):
    """A NaN in one sequence's input reaches that sequence's outputs from its step on, and
    its gradients, exactly where torch's do; the other sequences stay finite."""
    m = _module(kind, 3, 4)
    x = random_tensor((3, 2, 3), torch.float32, DEVICE)
    x[1, 0, 2] = float("nan")
    results = []
    for be in (backend, "torch"):
        xr = x.clone().requires_grad_(True)
        weights = [w.detach().requires_grad_(True) for w in m._flat_weights]
        out, finals = _call(kind, xr, None, weights, backend=be, training=True)
        out[:, 1].sum().backward()
        results.append((out.detach(), finals[0].detach(), xr.grad))
    for ours, theirs in zip(*results):
        assert_close(ours, theirs, torch.float32, reduction=16, tf32=TF32)
    out = results[0][0]
    assert torch.isnan(out[1:, 0]).all() and not torch.isnan(out[0]).any()
    assert torch.isfinite(out[:, 1]).all()


@pytest.mark.parametrize("kind", KINDS)
def test_module_weights_swapped_or_parametrized(kind):
    """pydl.nn.LSTM / GRU run the weights torch's module would: those torch.func.functional_call
    swaps in, and a parametrization's weight recomputed every call (weight_norm), whose
    parameters get their gradients (the flat weight list is refreshed as torch's forward
    refreshes it)."""
    from torch.nn.utils import parametrizations
    cls = torch.nn.LSTM if kind == "lstm" else torch.nn.GRU
    ours_cls = pydl.nn.LSTM if kind == "lstm" else pydl.nn.GRU
    theirs = cls(3, 4).to(DEVICE)
    ours = ours_cls(3, 4, device=DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor((5, 2, 3), torch.float32, DEVICE)
    swapped = {n: random_tensor(p.shape, torch.float32, DEVICE) for n, p in
               theirs.named_parameters()}
    got = torch.func.functional_call(ours, swapped, (x,))[0]
    want = torch.func.functional_call(theirs, swapped, (x,))[0]
    assert_close(got, want, torch.float32, reduction=32, tf32=TF32, name="functional_call")
    for m in (theirs, ours):
        parametrizations.weight_norm(m, "weight_hh_l0")
    for _ in range(2):      # and after changing a parametrization's parameter in place
        outs = [m(x)[0] for m in (ours, theirs)]
        assert_close(outs[0], outs[1], torch.float32, reduction=32, tf32=TF32, name="weight_norm")
        for out in outs:
            out.sum().backward()
        p_ours = ours.parametrizations.weight_hh_l0
        p_theirs = theirs.parametrizations.weight_hh_l0
        for a, b in ((p_ours.original0, p_theirs.original0),
                     (p_ours.original1, p_theirs.original1)):
            assert a.grad is not None
            assert_close(a.grad, b.grad, torch.float32, reduction=64, tf32=TF32, name="dv")
            a.grad = b.grad = None
        with torch.no_grad():
            p_ours.original1.mul_(1.5)
            p_theirs.original1.mul_(1.5)


@pytest.mark.skipif(HAS_CUDA, reason="patches a kernel constant, which only the interpreter "
                                     "reads at run time")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_forward_tiles_load_early_or_late_alike(monkeypatch, kind):
    """A small forward tile loads its step operands (projected input, starting state) before
    its K loop, a large one after it (kernels/triton/rnn.py EARLY_ELEMS): the same sums in the
    same order, so the same bits. Emulation's tiles are all small; this runs the late path too
    and compares, forward and backward, with biases and a starting state."""
    import triton.language as tl

    from pydl.kernels.triton import gru as kg
    from pydl.kernels.triton import lstm as kl
    T, B, I, H = 4, 3, 5, 6
    mod = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(I, H, bidirectional=True)
    weights = [p.detach().requires_grad_() for p in mod._flat_weights]
    x = random_tensor((T, B, I), torch.float32, DEVICE).requires_grad_()
    h0 = random_tensor((2, B, H), torch.float32, DEVICE)
    hx = (h0, random_tensor((2, B, H), torch.float32, DEVICE)) if kind == "lstm" else h0
    g = random_tensor((T, B, 2 * H), torch.float32, DEVICE)

    def run():
        out = getattr(pydl, kind)(x, hx, weights, bidirectional=True, backend="triton")[0]
        return (out.detach(), *torch.autograd.grad(out, [x, *weights], g))
    early = run()
    for module in (kl, kg):
        monkeypatch.setattr(module, "EARLY_ELEMS", tl.constexpr(0))
    late = run()
    for i, (a, b) in enumerate(zip(early, late)):
        assert torch.equal(a, b), i
