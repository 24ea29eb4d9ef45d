"""Autotuning (pydl/_tune.py): the tuner's choices, caching and restores with a fake clock, and
every candidate configuration of every tuned kernel computing the right answer.

In emulation the tuner is forced on and its device clock replaced: the trial launches are not
run (the fake clock does not call them), but the chosen configuration is what the real launch
uses, so forcing each candidate in turn runs the op with each tile shape of the space.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import pydl
import pydl._gemm
from pydl import _tune
from pydl._gemm import gemm
from pydl._launch import dot_block
from pydl.testing import assert_close, random_tensor

triton_only = pytest.mark.parametrize("backend", ["triton"])


@pytest.fixture
def tuning(monkeypatch):
    """Tuning on (also in emulation), every choice forgotten before and after."""
    monkeypatch.setattr(_tune, "enabled", lambda: True)
    _tune.reset()
    yield
    _tune.reset()


def _fake_clock(monkeypatch, times):
    """Every tuner's clock: times(config) in ms (or raises); records the configs it saw."""
    seen = []

    def bench(fn, config):
        seen.append(config)
        return times(config)
    for tuner in _tune.Tuner.all.values():
        monkeypatch.setattr(tuner, "bench", bench)
    return seen


def test_pick_fastest_caches_skips_failures_and_restores(tuning):
    tuner = _tune.Tuner("test_tuner")
    buf = torch.zeros(4)
    launched = []

    def launch(cfg):
        launched.append(cfg["B"])
        buf.add_(1.0)                       # an in-place kernel: trials must not accumulate

    def bench(fn, cfg):
        fn()
        if cfg["B"] == 3:
            raise RuntimeError("out of resources: shared memory\nmore detail")
        return {1: 2.0, 2: 0.5, 4: 1.0}[cfg["B"]]
    tuner.bench = bench
    cands = [{"B": 1}, {"B": 2}, {"B": 3}, {"B": 4}, {"B": 2}]   # duplicates are dropped
    assert tuner.pick("k", cands, launch, inout=(buf,)) == {"B": 2}
    assert launched == [1, 2, 3, 4] and torch.equal(buf, torch.zeros(4))
    assert tuner.pick("k", cands, launch) == {"B": 2} and len(launched) == 4   # cached
    rows = _tune.report()["test_tuner"]
    assert rows[0]["config"] == {"B": 2} and rows[0]["ms"] == 0.5
    assert [c["error"] is not None for c in rows[0]["candidates"]] == [False, False, True, False]
    assert "out of resources" in rows[0]["candidates"][2]["error"]
    tuner.bench = lambda fn, cfg: (_ for _ in ()).throw(ValueError("no"))
    with pytest.raises(RuntimeError, match="no configuration of test_tuner runs"):
        tuner.pick("other key", cands, launch)
    del _tune.Tuner.all["test_tuner"]


def test_disabled_or_single_candidate_uses_the_default(monkeypatch):
    tuner = _tune.Tuner("test_default")
    tuner.bench = lambda fn, cfg: pytest.fail("must not time")
    monkeypatch.setattr(_tune, "enabled", lambda: False)
    assert tuner.pick("k", [{"B": 1}, {"B": 2}], lambda c: None) == {"B": 1}
    monkeypatch.setattr(_tune, "enabled", lambda: True)
    assert tuner.pick("k", [{"B": 1}, {"B": 1}], lambda c: None) == {"B": 1}
    assert not tuner.chosen
    del _tune.Tuner.all["test_default"]


def test_no_timing_during_graph_capture(tuning, monkeypatch):
    """Under a CUDA graph capture the tuner times nothing: an earlier choice, else the default."""
    tuner = _tune.Tuner("test_capture")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    capturing = [True]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    tuner.bench = lambda fn, cfg: {1: 2.0, 2: 1.0}[cfg["B"]]
    cands = [{"B": 1}, {"B": 2}]
    assert tuner.pick("k", cands, lambda c: None) == {"B": 1} and not tuner.chosen
    capturing[0] = False
    assert tuner.pick("k", cands, lambda c: None) == {"B": 2}
    capturing[0] = True
    tuner.bench = lambda fn, cfg: pytest.fail("must not time while capturing")
    assert tuner.pick("k", cands, lambda c: None) == {"B": 2}
    del _tune.Tuner.all["test_capture"]


def test_enabled_follows_emulation_and_env(monkeypatch):
    monkeypatch.setattr(_tune._env, "INTERPRET", False)
    monkeypatch.setenv("PYDL_TUNE", "0")
    assert not _tune.enabled()
    monkeypatch.setenv("PYDL_TUNE", "1")
    assert _tune.enabled()
    monkeypatch.setattr(_tune._env, "INTERPRET", True)
    assert not _tune.enabled()


def test_helpers():
    assert [_tune.bucket(n) for n in (1, 17, 64, 65, 10 ** 9)] == [16, 32, 64, 128, 1 << 16]
    assert dot_block(40, 128) == 64 and dot_block(3, 128) == 16 and dot_block(1000, 64) == 64
    cands = _tune.gemm_candidates({"BLOCK_M": 16}, 20, 30, 8, 2)
    assert all(c.get("BLOCK_M", 16) <= 32 and c.get("BLOCK_K", 16) == 16 for c in cands)
    assert len(cands) == len({tuple(sorted(c.items())) for c in cands})
    fp32 = _tune.gemm_candidates({}, 4096, 4096, 4096, 4)
    assert max(c.get("BLOCK_K", 0) for c in fp32) == 32     # half the K depth of 16-bit
    # the GEMM's TMA kernel: offered only where asked (its operands addressable), on the
    # large pipelined tiles, at one K step too; the 128 x 128 tile also two to a
    # multiprocessor, each tile's pipeline drained before its epilogue
    assert not any(c.get("TMA") for c in _tune.gemm_candidates({}, 4096, 4096, 64, 2))
    tma = [c for c in _tune.gemm_candidates({}, 4096, 4096, 64, 2, tma=True) if c.get("TMA")]
    assert sorted((c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) for c in tma) == \
        sorted([(128, 128, 64), (128, 128, 64), (128, 256, 64), (256, 128, 64)]) \
        and all(c["num_stages"] > 1 for c in tma)
    assert [(c.get("FLATTEN", True), c.get("PER_SM", 1)) for c in tma].count((False, 2)) == 1
    # operands loaded element by element: the pointer tiles up to 128 x 128, at most 32 deep,
    # 8 warps from 128 x 64 up (the TMA kernel's tiles, which load no element alone, as they are)
    elem = _tune.gemm_candidates({}, 4096, 4096, 4096, 2, tma=True, vector_loads=False)
    pointer = [c for c in elem[1:] if not c.get("TMA")]
    assert pointer and all(c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 128 and c["BLOCK_K"] <= 32
                           and c["num_warps"] == (8 if c["BLOCK_M"] * c["BLOCK_N"] >= 128 * 64
                                                  else 4) for c in pointer)
    assert [c for c in elem if c.get("TMA")] == tma


def test_gemm_accumulate_is_not_doubled_by_trials(tuning, monkeypatch):
    """Trial launches of an accumulating GEMM write into its output; the tuner restores it."""
    trials = []

    def bench(fn, cfg):                     # a clock that really launches, as the device's does
        fn()
        trials.append(cfg)
        return float(len(trials))
    monkeypatch.setattr(pydl._gemm.GEMM_TUNER, "bench", bench)
    a = random_tensor((70, 40), torch.float32, DEVICE)
    b = random_tensor((40, 50), torch.float32, DEVICE)
    out = random_tensor((70, 50), torch.float32, DEVICE)
    start = out.clone()
    gemm(a, b, out, accumulate=True, input_precision="ieee")
    assert len(trials) > 1
    assert_close(out, start.double() + a.double() @ b.double(), torch.float32, reduction=40)


def _each_candidate(monkeypatch, run_op, check):
    """Runs run_op once to collect every tuner's candidates, then once per candidate index,
    with each tuner forced to its candidate of that index (its last one when it has fewer),
    checking the result each time. A tuner that saw several keys (the GEMMs of an RNN layer)
    is forced to the index-th candidate of each. Returns {tuner: candidates of its first key}."""
    _fake_clock(monkeypatch, lambda cfg: 1.0)
    run_op()
    spaces = {name: [[c for c, _, _ in trials] for trials in t.trials.values()]
              for name, t in _tune.Tuner.all.items() if t.trials}
    assert spaces, "no tuned kernel ran"
    n = max(len(s) for lists in spaces.values() for s in lists)
    for i in range(n):
        _tune.reset()
        for name, tuner in _tune.Tuner.all.items():
            targets = [s[min(i, len(s) - 1)] for s in spaces.get(name, [])]
            monkeypatch.setattr(tuner, "bench",
                                lambda fn, cfg, targets=targets: 0.0 if cfg in targets else 1.0)
        check(run_op(), i)
        for name, lists in spaces.items():
            if len(lists) == 1:
                chosen = list(_tune.Tuner.all[name].chosen.values())
                assert chosen == [lists[0][min(i, len(lists[0]) - 1)]], name
    return {name: lists[0] for name, lists in spaces.items()}


def test_every_gemm_candidate(tuning, monkeypatch):
    a = random_tensor((150, 90), torch.float32, DEVICE)
    b = random_tensor((90, 140), torch.float32, DEVICE)
    bias = random_tensor((140,), torch.float32, DEVICE)

    def run_op():
        out = torch.full((150, 140), float("nan"), device=DEVICE)
        return gemm(a, b, out, bias=bias, input_precision="ieee")

    def check(out, i):
        assert_close(out, a.double() @ b.double() + bias.double(), torch.float32, reduction=90)
    spaces = _each_candidate(monkeypatch, run_op, check)
    assert set(spaces) == {"gemm"} and len(spaces["gemm"]) >= 5
    assert max(c["BLOCK_M"] * c["BLOCK_N"] for c in spaces["gemm"]) >= 128 * 128


@triton_only
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.sim_heavy      # 30 s in emulation; the channel-block path is also in test_conv.py
def test_every_conv_candidate(tuning, monkeypatch, backend, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = random_tensor((2, 16, 12, 12), torch.float32, DEVICE).to(memory_format=fmt)
    w = random_tensor((128, 16, 3, 3), torch.float32, DEVICE)
    b = random_tensor((128,), torch.float32, DEVICE)
    g = random_tensor((2, 128, 6, 6), torch.float32, DEVICE)
    xd, wd, bd = (t.double().requires_grad_() for t in (x, w, b))
    yd = F.conv2d(xd, wd, bd, stride=2, padding=1)
    want = (yd, *torch.autograd.grad(yd, (xd, wd, bd), g.double()))

    def run_op():
        xx, ww, bb = (t.detach().requires_grad_() for t in (x, w, b))
        with pydl.use_backend(backend), torch.backends.cudnn.flags(allow_tf32=False):
            y = pydl.conv2d(xx, ww, bb, stride=2, padding=1, algo="implicit")
            return (y, *torch.autograd.grad(y, (xx, ww, bb), g))

    def check(got, i):
        for r, (out, ref) in enumerate(zip(got, want)):
            assert_close(out, ref, torch.float32, reduction=16 * 9 if r == 0 else 288)
    spaces = _each_candidate(monkeypatch, run_op, check)
    assert set(spaces) == {"conv2d_implicit_fwd", "conv2d_implicit_bwd_input",
                           "conv2d_implicit_bwd_weight"}


@triton_only
@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.sim_heavy), True],
                         ids=["full", "causal"])
def test_every_attention_candidate(tuning, monkeypatch, backend, causal):
    q, k, v = (random_tensor((1, 2, 144, 32), torch.float32, DEVICE) for _ in range(3))
    g = random_tensor((1, 2, 144, 32), torch.float32, DEVICE)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)
    want = (od, *torch.autograd.grad(od, (qd, kd, vd), g.double()))

    def run_op():
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        with pydl.use_backend(backend):
            o = pydl.scaled_dot_product_attention(qq, kk, vv, is_causal=causal)
            return (o, *torch.autograd.grad(o, (qq, kk, vv), g))

    def check(got, i):
        for out, ref in zip(got, want):
            assert_close(out, ref, torch.float32, reduction=144)
    spaces = _each_candidate(monkeypatch, run_op, check)
    assert set(spaces) == {"attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"}
    assert any(c["BLOCK_M"] != c["BLOCK_N"] for c in spaces["attention_bwd_dkdv"])


@triton_only
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_pool_candidate(tuning, monkeypatch, backend, layout):
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = random_tensor((2, 8, 11, 9), torch.float32, DEVICE).to(memory_format=fmt)
    g = random_tensor((2, 8, 5, 4), torch.float32, DEVICE)
    xd = x.double().requires_grad_()
    yd = F.max_pool2d(xd, 3, 2)
    want = (yd, *torch.autograd.grad(yd, xd, g.double()))

    def run_op():
        xx = x.detach().requires_grad_()
        with pydl.use_backend(backend):
            y = pydl.max_pool2d(xx, 3, 2)
            return (y, *torch.autograd.grad(y, xx, g))

    def check(got, i):
        for out, ref in zip(got, want):
            assert_close(out, ref, torch.float32)
    spaces = _each_candidate(monkeypatch, run_op, check)
    planar = "" if layout == "channels_last" else "_planar"
    assert set(spaces) == {f"max_pool2d_fwd{planar}", f"max_pool2d_bwd{planar}"}


@triton_only
@pytest.mark.parametrize("n", [50, 5000], ids=["short_rows", "wide_rows"])
def test_every_row_kernel_candidate(tuning, monkeypatch, backend, n):
    """Softmax and cross-entropy (index targets, label smoothing), forward and backward, with
    each tile of the row kernels' space: short rows batched, or rows walked in blocks. The
    mean loss's forward writes its gradient; per-row losses take the separate backward."""
    x = random_tensor((6, n), torch.float32, DEVICE)
    t = torch.randint(0, n, (6,), device=DEVICE)
    g = random_tensor((6, n), torch.float32, DEVICE)
    gr = random_tensor((6,), torch.float32, DEVICE)
    xd = x.double().requires_grad_()
    want = [F.softmax(xd, 1), F.cross_entropy(xd, t, label_smoothing=0.1),
            F.cross_entropy(xd, t, label_smoothing=0.1, reduction="none")]
    want += [torch.autograd.grad(want[0], xd, g.double())[0], torch.autograd.grad(want[1], xd)[0],
             torch.autograd.grad(want[2], xd, gr.double())[0]]

    def run_op():
        xx = x.detach().requires_grad_()
        with pydl.use_backend(backend):
            y = pydl.softmax(xx, 1)
            loss = pydl.cross_entropy(xx, t, label_smoothing=0.1)
            rows = pydl.cross_entropy(xx, t, label_smoothing=0.1, reduction="none")
            return [y, loss, rows, torch.autograd.grad(y, xx, g)[0],
                    torch.autograd.grad(loss, xx)[0], torch.autograd.grad(rows, xx, gr)[0]]

    def check(got, i):
        for out, ref in zip(got, want):
            assert_close(out, ref, torch.float32, reduction=n)
    spaces = _each_candidate(monkeypatch, run_op, check)
    assert set(spaces) == {"softmax_fwd", "softmax_bwd", "cross_entropy_fwd", "cross_entropy_bwd"}
    if n > 4096:
        assert any(c["BLOCK_N"] < n for c in spaces["softmax_fwd"])


def _real_trials(monkeypatch) -> list:
    """Every tuner's clock runs the trial launch it is given (as the device clock does) and
    prefers the last candidate; returns the list of the configurations tried."""
    trials = []

    def bench(fn, cfg):
        fn()
        trials.append(cfg)
        return -float(len(trials))           # the last candidate wins
    for tuner in _tune.Tuner.all.values():
        monkeypatch.setattr(tuner, "bench", bench)
    return trials


@pytest.mark.parametrize("kind", ["lstm", pytest.param("gru", marks=pytest.mark.sim_heavy)])
@pytest.mark.parametrize("algo", ["steps", pytest.param("persistent", marks=pytest.mark.sim_heavy)])
def test_every_rnn_step_candidate(tuning, monkeypatch, kind, algo):
    """The recurrence kernels' tiles, forward and backward through time (checked against the
    float64 reference and torch inside check_layer); then trial launches that really run, as
    the device clock's do: a trial runs the first step (algo="steps") or the whole sequence,
    neither of which reads the running state before writing it, so trials leave no trace."""
    from rnn_checks import check_layer

    def run_op():
        check_layer("triton", algo, torch.float32, 2, 20, 24, 40, kind=kind)
    spaces = _each_candidate(monkeypatch, run_op, lambda got, i: None)
    # rnn_gemm: the weight gradients summed over time (gemm_batched), whose trials accumulate
    # into the gradient they then write: restored by the tuner
    assert {f"{kind}_layer_fwd", f"{kind}_layer_bwd", "rnn_gemm"} <= set(spaces)
    assert len(spaces[f"{kind}_layer_bwd"]) >= 4
    _tune.reset()
    trials = _real_trials(monkeypatch)
    run_op()
    assert len(trials) > len(spaces[f"{kind}_layer_bwd"])


def test_rnn_gemm_trials_restore_what_they_accumulate(tuning, monkeypatch):
    """A 16-bit layer's weight gradient adds its h0 term to the product over time (the
    layers' own GEMM, gemm_batched, with an addend): trial launches that really run, as the
    device clock's do, leave no trace (an output that is its own addend is restored by the
    tuner), so the gradients match the float64 reference and torch."""
    from rnn_checks import check_layer
    trials = _real_trials(monkeypatch)
    check_layer("triton", "steps", torch.float16, 2, 20, 24, 40, kind="lstm")
    keys = [key for key, _ in _tune.Tuner.all["rnn_gemm"].trials]
    assert any(key[10] for key in keys) and len(trials) > len(keys)  # an accumulating one


@pytest.mark.parametrize("kind,proj,chunked", [("lstm", 3, False), ("gru", 0, False),
                                               ("lstm", 3, True)])
@pytest.mark.parametrize("algo", ["steps", None])
def test_rnn_trials_without_graph_leave_no_trace(tuning, monkeypatch, kind, proj, algo,
                                                  chunked):
    """A layer call without a graph keeps the LSTM's cell state (and m) as one (B, H) plane
    that each step reads and then overwrites, and writes its activations into a plane of the
    plan's (pydl/rnn.py): trial launches that really run (the first step, or the whole
    sequence, each from the initial state) leave the call's answer that of torch. Also where
    the sequence runs in chunks of 2 steps (rnn.INFERENCE_CHUNK_BYTES), each from the state
    the chunk before ended in."""
    from pydl import _plan, rnn
    if chunked:
        monkeypatch.setattr(rnn, "INFERENCE_CHUNK_BYTES", 4 * 3 * (4 if kind == "lstm" else 3)
                            * 8 * 2)
        assert rnn.chunk_steps(5, 3, (4 if kind == "lstm" else 3) * 8) == 2
    _plan.clear_all()
    trials = _real_trials(monkeypatch)
    mod = (torch.nn.LSTM(6, 8, proj_size=proj) if kind == "lstm" else torch.nn.GRU(6, 8))
    weights = [w.detach().to(DEVICE) for w in mod._flat_weights]
    x = random_tensor((5, 3, 6), torch.float32, DEVICE)
    fn = pydl.lstm if kind == "lstm" else pydl.gru
    with torch.no_grad():
        got = fn(x, None, weights, backend="triton", algo=algo)[0]
        want = mod.to(DEVICE)(x)[0]
    assert trials and _tune.Tuner.all[f"{kind}_layer_fwd"].trials, "the recurrence was not tuned"
    assert_close(got, want, torch.float32, reduction=8, tf32=True)
    _plan.clear_all()
