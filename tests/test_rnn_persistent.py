"""The persistent recurrence on a GPU: the one command that checks what no emulator can run,

    python -m pytest tests/test_rnn_persistent.py          (bench/gpu_session.sh rnn OUT)

The grid barrier alone (kernels/triton/rnn.py grid_barrier_check: every program must see
every other program's writes of the round, many rounds, at several grid sizes up to one
program per SM), then whole layers: the persistent launch (one cooperative launch per
direction, the programs meeting at the barrier after every step) must give bit for bit what
the step-by-step launches give (the same tiles and arithmetic, one launch per step), at
DeepBench sizes where a step's tiles span the chip (the backward's products split over K, in
fp16 on the 16-bit copy of the gate gradients), match torch (cuDNN), and every gradient
matches torch's float64 layer by the benchmark gate's measure. Skipped without a CUDA device;
the emulated suite covers the arithmetic (tests/test_lstm.py, test_gru.py, test_rnn.py).
"""
import copy

import pytest
import torch
from conftest import DEVICE

import pydl
from pydl import _rnn_launch
from pydl.testing import assert_close, deviation

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("programs", [2, 37, "sms"])
def test_grid_barrier(programs):
    device = torch.device(DEVICE)
    n = _rnn_launch.multiprocessors(device) if programs == "sms" else programs
    bad, sync = _rnn_launch.grid_barrier_check(device, n, 500)
    torch.cuda.synchronize()
    assert bad.item() == 0, f"{bad.item()} stale reads across {n} programs"
    assert sync.tolist() == [0, 0], "the last program out must reset the counters"


# (kind, hidden, batch, steps, dtype): DeepBench quick shapes, shortened, and odd sizes
LAYERS = [
    ("lstm", 1024, 32, 25, torch.float16),
    ("lstm", 256, 32, 60, torch.float16),
    ("lstm", 2048, 128, 6, torch.float16),
    ("lstm", 200, 7, 9, torch.float32),
    ("gru", 1536, 32, 20, torch.float16),
    ("gru", 2560, 32, 6, torch.float16),
    ("gru", 100, 5, 9, torch.float32),
]


def _layer(kind, x, h0, weights, algo, bidirectional):
    fn = pydl.lstm if kind == "lstm" else pydl.gru
    hx = (h0, h0) if kind == "lstm" else h0
    out, hn = fn(x, hx, weights, bidirectional=bidirectional, algo=algo)
    return out, (hn[0] if kind == "lstm" else hn)


@pytest.mark.parametrize("kind,H,B,T,dtype", LAYERS,
                         ids=[f"{k}-h{h}-b{b}-t{t}-{str(d)[6:]}" for k, h, b, t, d in LAYERS])
def test_persistent_equals_steps(kind, H, B, T, dtype):
    """Persistent and step-by-step launches run the same tiles in the same order: outputs and
    every gradient equal bit for bit (a barrier that let a program read a stale h or dg would
    show here), and both match torch within the dtype's tolerance."""
    torch.manual_seed(0)
    D = 2 if H <= 256 else 1
    module = (torch.nn.LSTM if kind == "lstm" else torch.nn.GRU)(
        H, H, bidirectional=D == 2).to(DEVICE, dtype)
    x = torch.randn(T, B, H, device=DEVICE, dtype=dtype)
    h0 = torch.randn(D, B, H, device=DEVICE, dtype=dtype)
    cot = torch.randn(T, B, D * H, device=DEVICE, dtype=dtype)
    results = {}
    for algo in ("persistent", "steps"):
        xs = x.clone().requires_grad_(True)
        ws = [w.detach().clone().requires_grad_(True) for w in module._flat_weights]
        out, hn = _layer(kind, xs, h0, ws, algo, D == 2)
        torch.autograd.backward([out, hn], [cot, torch.ones_like(hn)])
        results[algo] = [out.detach(), hn.detach(), xs.grad, *[w.grad for w in ws]]
    for i, (a, b) in enumerate(zip(results["persistent"], results["steps"])):
        assert torch.equal(a, b), f"result {i} differs: max {(a.float() - b.float()).abs().max()}"
    with torch.no_grad():
        t_out = module(x, (h0, h0) if kind == "lstm" else h0)[0]
    assert_close(results["persistent"][0], t_out, dtype, reduction=T * (H + D * H),
                 tf32=dtype == torch.float32, name="output vs torch")
    check_gradients_float64(kind, module, x, h0, cot, results["persistent"], D)


def check_gradients_float64(kind, module, x, h0, cot, results, D):
    """Every gradient of `results` ([out, h_n, dx, *dweights]) against torch's layer in
    float64 on the CPU, by the benchmark gate's measure (bench/gate.py: the dtype's tolerance,
    the suites' reduction lengths, scaled to gradients below 1): the backward's K-split
    products and, in fp16, its 16-bit copy of the gate gradients, as compiled for the GPU."""
    T, B, H = x.shape[0], x.shape[1], module.hidden_size
    G = 4 if kind == "lstm" else 3
    dtype = x.dtype
    m64 = copy.deepcopy(module).to("cpu", torch.float64)
    x64 = x.detach().to("cpu", torch.float64).requires_grad_(True)
    h64 = h0.detach().to("cpu", torch.float64)
    out, hn = m64(x64, (h64, h64) if kind == "lstm" else h64)
    hn = hn[0] if kind == "lstm" else hn
    torch.autograd.backward([out, hn], [cot.to("cpu", torch.float64), torch.ones_like(hn)])
    want = [x64.grad, *[w.grad for w in m64._flat_weights]]
    lengths = [G * H * D] + [B * T] * len(m64._flat_weights)
    tf32 = dtype == torch.float32
    for i, (have, w, n) in enumerate(zip(results[2:], want, lengths)):
        largest = float(w.abs().max())
        d = deviation(have, w, dtype, reduction=n, tf32=tf32,
                      scale=largest if 0.0 < largest < 1.0 else None, name=f"gradient {i}")
        assert d.message is None, d.message


def test_barrier_counters_once_per_stream():
    """The persistent launches share one buffer of barrier counters per stream, made once: the
    last program out of every launch resets them, so after layer calls (forward and
    backward, both directions) they read zero and are the same tensor. Another stream gets
    its own pair; a CUDA graph capture a fresh one, kept by the graph."""
    device = torch.device(DEVICE)
    torch.manual_seed(0)
    module = torch.nn.LSTM(64, 64, bidirectional=True).to(DEVICE, torch.float16)
    x = torch.randn(9, 8, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    ws = [w.detach().requires_grad_(True) for w in module._flat_weights]
    counters = _rnn_launch.barrier_counters(device)
    for _ in range(3):
        out, _ = pydl.lstm(x, None, ws, bidirectional=True)
        out.square().sum().backward()
    torch.cuda.synchronize()
    assert _rnn_launch.barrier_counters(device) is counters
    assert not counters.any()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        other = _rnn_launch.barrier_counters(device)
        assert other is not counters and other is _rnn_launch.barrier_counters(device)
        out, _ = pydl.lstm(x.detach(), None, [w.detach() for w in ws], bidirectional=True)
    torch.cuda.synchronize()
    assert not other.any()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _rnn_launch.barrier_counters(device)
    assert captured is not counters and captured is not other
