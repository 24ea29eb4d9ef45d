"""LSTM cell and layer kernels against the float64 reference and torch: forward, every gradient
(input, states, weights, biases), both backends (and triton's persistent layer), fp16,
batch 1, sequence length 1, hidden sizes that are not powers of two, two layers,
bidirectional, batch_first, absent initial state, dropout, the nn drop-ins, bad input.

Shapes stay tiny (emulation runs every kernel on the CPU: the Numba simulator starts an OS
thread per CUDA thread).
"""
import numpy as np
import pytest
import torch

import pydl
from pydl import reference as ref
from pydl.testing import assert_close, random_tensor, uses_tf32

from conftest import DEVICE, DTYPES, KERNEL_BACKENDS

backends = pytest.mark.parametrize("backend", KERNEL_BACKENDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)
# the layer: (backend, algo)
LAYER_VARIANTS = [("triton", None), ("triton", "persistent"), ("numba", None)]
variants = pytest.mark.parametrize("backend,algo", LAYER_VARIANTS,
                                   ids=["triton", "triton-persistent", "numba"])
TF32 = uses_tf32(DEVICE, cudnn=True)


def _np(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def _run(fn, tensors, cotangents):
    """fn(*leaves) with fresh leaves of the tensors (None stays None), backpropagating the
    cotangents through its tensor outputs; (outputs, grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    torch.autograd.backward(outs, cotangents)
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def _weights_like(module, dtype):
    """The module's parameters (torch's init) as plain tensors of `dtype` on DEVICE."""
    return [p.detach().to(DEVICE, dtype) for p in module.parameters()]


# --- the cell -------------------------------------------------------------------------------

# (B, I, H, bias, with_state)
CELL_CASES = [
    (3, 7, 5, True, True),
    (1, 4, 13, True, True),       # batch 1, hidden 13
    (2, 5, 6, False, True),       # no bias
    (2, 3, 9, True, False),       # hx=None (zeros)
]


def _check_cell(backend, dtype, B, I, H, bias, with_state, unbatched=False):
    cell = torch.nn.LSTMCell(I, H, bias=bias)
    ws = _weights_like(cell, dtype)
    w_ih, w_hh = ws[0], ws[1]
    b_ih, b_hh = (ws[2], ws[3]) if bias else (None, None)
    xs = (I,) if unbatched else (B, I)
    ss = (H,) if unbatched else (B, H)
    x = random_tensor(xs, dtype, DEVICE)
    h = random_tensor(ss, dtype, DEVICE) if with_state else None
    c = random_tensor(ss, dtype, DEVICE) if with_state else None
    dh1, dc1 = random_tensor(ss, dtype, DEVICE), random_tensor(ss, dtype, DEVICE)

    def run(be):
        def fn(x, h, c, w_ih, w_hh, b_ih, b_hh):
            return pydl.lstm_cell(x, None if h is None else (h, c), w_ih, w_hh, b_ih, b_hh,
                                  backend=be)
        return _run(fn, [x, h, c, w_ih, w_hh, b_ih, b_hh], [dh1, dc1])

    (h1, c1), grads = run(backend)
    # torch in fp32 for fp16 inputs: CPU half arithmetic rounds every op, which is torch's
    # error, not ours; the reference holds both to account.
    up = torch.float32 if dtype == torch.float16 else dtype
    (t_h1, t_c1), t_grads = _run(
        lambda *a: pydl.lstm_cell(a[0], None if a[1] is None else (a[1], a[2]), *a[3:], backend="torch"),
        [None if t is None else t.to(up) for t in (x, h, c, w_ih, w_hh, b_ih, b_hh)],
        [dh1.to(up), dc1.to(up)])
    r_h1, r_c1, cache = ref.lstm_cell(_np(x), _np(h), _np(c), _np(w_ih), _np(w_hh), _np(b_ih), _np(b_hh))
    r_grads = ref.lstm_cell_backward(_np(dh1), _np(dc1), cache)
    red = I + H
    assert h1.dtype == c1.dtype == dtype and h1.shape == c1.shape == ss
    for ours, r, t, name in ((h1, r_h1, t_h1, "h1"), (c1, r_c1, t_c1, "c1")):
        assert_close(ours, r, dtype, reduction=red, tf32=TF32, name=f"{name} vs reference")
        assert_close(ours, t, dtype, reduction=red, tf32=TF32, name=f"{name} vs torch")
    # grads: (x, h, c, w_ih, w_hh, b_ih, b_hh); the reference's dh / dc are w.r.t. the zero
    # state when none was given, ours are None there
    names = ("dx", "dh", "dc", "dw_ih", "dw_hh", "db_ih", "db_hh")
    reds = (4 * H, 4 * H, 1, B, B, B, B)
    for g, r, t, name, n in zip(grads, r_grads, t_grads, names, reds):
        if name in ("dh", "dc") and not with_state or name in ("db_ih", "db_hh") and not bias:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        assert_close(g, r, dtype, reduction=n * red, tf32=TF32, name=f"{name} vs reference")
        assert_close(g, t, dtype, reduction=n * red, tf32=TF32, name=f"{name} vs torch")


@backends
@dtypes
@pytest.mark.parametrize("case", CELL_CASES, ids=lambda c: "B{}-I{}-H{}{}{}".format(
    *c[:3], "" if c[3] else "-nobias", "" if c[4] else "-nostate"))
def test_lstm_cell(backend, dtype, case):
    _check_cell(backend, dtype, *case)


@backends
def test_lstm_cell_unbatched(backend):
    _check_cell(backend, torch.float32, 1, 4, 5, True, True, unbatched=True)


@backends
def test_lstm_cell_strided_views(backend):
    """Transposed, sliced and column-major operands: the kernels read strides, no copies."""
    B, I, H = 3, 5, 6
    x = random_tensor((2 * I, B), torch.float32, DEVICE).t()[:, ::2]          # (B, I), strided
    h = random_tensor((B, 2 * H), torch.float32, DEVICE)[:, H:]
    c = random_tensor((H, B), torch.float32, DEVICE).t()
    w_ih = random_tensor((I, 4 * H), torch.float32, DEVICE).t()                # column-major
    w_hh = random_tensor((4 * H, 2 * H), torch.float32, DEVICE)[:, 1::2]
    b = random_tensor((8 * H,), torch.float32, DEVICE)[::2]
    cot = [random_tensor((B, H), torch.float32, DEVICE) for _ in range(2)]
    tensors = [x, h, c, w_ih, w_hh, b, b]
    cell = lambda be: lambda *a: pydl.lstm_cell(a[0], (a[1], a[2]), *a[3:], backend=be)  # noqa: E731
    outs, grads = _run(cell(backend), tensors, cot)
    t_outs, t_grads = _run(cell("torch"), tensors, cot)
    for o, t in zip(outs, t_outs):
        assert_close(o, t, torch.float32, reduction=I + H, tf32=TF32)
    for g, t in zip(grads, t_grads):
        assert_close(g, t, torch.float32, reduction=B * 4 * H, tf32=TF32)


@backends
def test_lstm_cell_saturated_gates(backend):
    """Pre-activations of +-60: sigmoid and tanh must not overflow (exp of -|a| only), and
    the gradients through saturated gates vanish instead of turning NaN."""
    B, I, H = 2, 3, 5
    x = torch.full((B, I), 20.0, device=DEVICE)
    w_ih = torch.ones(4 * H, I, device=DEVICE)
    w_ih[H:2 * H] = -1.0                      # f = sigmoid(-60) = 0, the others saturate at 1
    w_hh = torch.zeros(4 * H, H, device=DEVICE)
    h = torch.zeros(B, H, device=DEVICE)
    c = torch.full((B, H), 3.0, device=DEVICE)
    (h1, c1), grads = _run(lambda *a: pydl.lstm_cell(a[0], (a[1], a[2]), a[3], a[4], backend=backend),
                           [x, h, c, w_ih, w_hh], [torch.ones(B, H, device=DEVICE)] * 2)
    r_h1, r_c1, cache = ref.lstm_cell(_np(x), _np(h), _np(c), _np(w_ih), _np(w_hh))
    assert_close(h1, r_h1, torch.float32, name="h1")
    assert_close(c1, r_c1, torch.float32, name="c1")
    for g, r in zip(grads, ref.lstm_cell_backward(np.ones((B, H)), np.ones((B, H)), cache)):
        assert torch.isfinite(g).all()
        assert_close(g, r, torch.float32, reduction=4 * H)


@backends
def test_lstm_cell_module_is_drop_in(backend):
    theirs = torch.nn.LSTMCell(6, 7).to(DEVICE)
    ours = pydl.nn.LSTMCell(6, 7, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.LSTMCell)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = random_tensor((3, 6), torch.float32, DEVICE)
    hx = (random_tensor((3, 7), torch.float32, DEVICE), random_tensor((3, 7), torch.float32, DEVICE))
    for hx_ in (hx, None):
        h1, c1 = ours(x, hx_)
        t_h1, t_c1 = theirs(x, hx_)
        assert_close(h1, t_h1, torch.float32, reduction=13, tf32=TF32)
        assert_close(c1, t_c1, torch.float32, reduction=13, tf32=TF32)
    (h1.sum() + c1.sum()).backward()
    (t_h1.sum() + t_c1.sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=3 * 13, tf32=TF32, name=name)
    h1u, c1u = ours(x[0])                     # unbatched
    assert h1u.shape == (7,)
    assert_close(h1u, theirs(x[0])[0], torch.float32, reduction=13, tf32=TF32)


@backends
def test_lstm_cell_bad_input(backend):
    B, I, H = 2, 4, 5
    x = random_tensor((B, I), torch.float32, DEVICE)
    w_ih = random_tensor((4 * H, I), torch.float32, DEVICE)
    w_hh = random_tensor((4 * H, H), torch.float32, DEVICE)
    h = random_tensor((B, H), torch.float32, DEVICE)
    cell = lambda *a, **k: pydl.lstm_cell(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match="input has size 3 .* w_ih expects input_size 4"):
        cell(x[:, :3], (h, h), w_ih, w_hh)
    with pytest.raises(ValueError, match="w_ih has 16 rows but hidden_size 5"):
        cell(x, (h, h), w_ih[:16], w_hh)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(4\*hidden_size, hidden_size\)"):
        cell(x, (h, h), w_ih, w_hh[:, :4])
    with pytest.raises(ValueError, match="input must be 1-D or 2-D"):
        cell(x[None], (h, h), w_ih, w_hh)
    with pytest.raises(ValueError, match=r"hx\[0\] \(h\) must have shape \(2, 5\)"):
        cell(x, (h[:1], h), w_ih, w_hh)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c\) must have shape \(2, 5\)"):
        cell(x, (h, h[:, :4]), w_ih, w_hh)
    with pytest.raises(TypeError, match="hx must be a pair"):
        cell(x, h, w_ih, w_hh)
    with pytest.raises(ValueError, match="hx must hold both h and c"):
        cell(x, (h, None), w_ih, w_hh)
    with pytest.raises(ValueError, match=r"b_ih must have shape \(4\*hidden_size,\) = \(20,\)"):
        cell(x, (h, h), w_ih, w_hh, w_ih[:, 0][:19])
    with pytest.raises(TypeError, match="w_hh has dtype torch.float16 but input has torch.float32"):
        cell(x, (h, h), w_ih, w_hh.half())
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        cell(x.double(), (h.double(), h.double()), w_ih.double(), w_hh.double())


# --- the layer ------------------------------------------------------------------------------

def _layer_fn(kind, backend, algo=None, recompute=False, **opts):
    """fn(x, *states, *weights) -> the layer's outputs as a tuple: (out, h_n, c_n) for the
    LSTM (states h0, c0), (out, h_n) for the GRU (state h0); None states are zeros."""
    extra = {} if backend == "torch" else dict(algo=algo, recompute=recompute)

    def lstm(x, h0, c0, *w):
        out, (hn, cn) = pydl.lstm(x, None if h0 is None else (h0, c0), list(w), backend=backend,
                                  **extra, **opts)
        return out, hn, cn

    def gru(x, h0, *w):
        return pydl.gru(x, h0, list(w), backend=backend, **extra, **opts)
    return lstm if kind == "lstm" else gru


def _check_layer(backend, algo, dtype, T, B, I, H, L=1, bidirectional=False, batch_first=False,
                 with_state=True, bias=True, unbatched=False, kind="lstm", recompute=False,
                 proj=0):
    """pydl.lstm / pydl.gru (kind) against the float64 reference and torch: outputs and the
    gradients of the input, the initial states and every weight. proj: the LSTM's proj_size."""
    D = 2 if bidirectional else 1
    n_states, G = (2, 4) if kind == "lstm" else (1, 3)
    module = (torch.nn.LSTM(I, H, L, bias=bias, bidirectional=bidirectional, proj_size=proj)
              if kind == "lstm" else torch.nn.GRU(I, H, L, bias=bias, bidirectional=bidirectional))
    names = ref.lstm_weight_names(L, bidirectional, bias, proj=proj > 0)
    ws = [getattr(module, n).detach().to(DEVICE, dtype) for n in names]
    P = proj or H   # h's width
    lead = (L * D,) if unbatched else (L * D, B)
    xs = (T, I) if unbatched else ((B, T, I) if batch_first else (T, B, I))
    sizes = [lead + (P,), lead + (H,)][:n_states]      # h, c
    x = random_tensor(xs, dtype, DEVICE)
    states = [random_tensor(ss, dtype, DEVICE) if with_state else None for ss in sizes]
    out_shape = xs[:-1] + (D * P,)
    cot = [random_tensor(out_shape, dtype, DEVICE)] + [random_tensor(ss, dtype, DEVICE)
                                                        for ss in sizes]
    opts = dict(num_layers=L, bias=bias, batch_first=batch_first, bidirectional=bidirectional)

    outs, grads = _run(_layer_fn(kind, backend, algo, recompute, **opts), [x, *states, *ws], cot)
    up = torch.float32 if dtype == torch.float16 else dtype
    # training mode on torch's side: cuDNN refuses a backward through its RNN in eval mode
    # (with no dropout the two modes compute the same)
    t_outs, t_grads = _run(_layer_fn(kind, "torch", training=True, **opts),
                           [None if t is None else t.to(up) for t in [x, *states, *ws]],
                           [t.to(up) for t in cot])
    w64 = dict(zip(names, map(_np, ws)))
    if kind == "lstm":
        r_out, (r_hn, r_cn), cache = ref.lstm(_np(x), *map(_np, states), w64, L, bidirectional,
                                              batch_first, return_cache=True)
        r_dx, r_dh0, r_dc0, r_dw = ref.lstm_backward(*map(_np, cot), cache)
        r_outs, r_grads = (r_out, r_hn, r_cn), [r_dx, r_dh0, r_dc0]
        out_names, state_names = ("output", "h_n", "c_n"), ["dh0", "dc0"]
    else:
        r_out, r_hn, cache = ref.gru(_np(x), _np(states[0]), w64, L, bidirectional, batch_first,
                                     return_cache=True)
        r_dx, r_dh0, r_dw = ref.gru_backward(*map(_np, cot), cache)
        r_outs, r_grads = (r_out, r_hn), [r_dx, r_dh0]
        out_names, state_names = ("output", "h_n"), ["dh0"]
    r_grads += [r_dw[n] for n in names]
    # errors compound through time and layers: scale the reduction length with both
    red = T * L * (I + D * H)
    for ours, r, t, name in zip(outs, r_outs, t_outs, out_names):
        assert ours.dtype == dtype
        assert_close(ours, r, dtype, reduction=red, tf32=TF32, name=f"{name} vs reference")
        assert_close(ours, t, dtype, reduction=red, tf32=TF32, name=f"{name} vs torch")
    for g, r, t, name in zip(grads, r_grads, t_grads, ["dx"] + state_names + names):
        if g is None:
            assert name in state_names and not with_state
            continue
        assert g.dtype == dtype, name
        red_g = red * (T * B + G * H)
        assert_close(g, r, dtype, reduction=red_g, tf32=TF32, name=f"{name} vs reference")
        assert_close(g, t, dtype, reduction=red_g, tf32=TF32, name=f"{name} vs torch")


# (T, B, I, H, layers, bidirectional, batch_first, with_state, bias)
LAYER_CASES = {
    "T3-B2-H5": (3, 2, 4, 5, 1, False, False, True, True),
    "T1-B1-H7": (1, 1, 3, 7, 1, False, False, True, True),          # one step, batch 1
    "nostate-nobias": (3, 2, 3, 6, 1, False, False, False, False),
    "2layers-bidir-batch_first": (2, 2, 3, 5, 2, True, True, True, True),
    "bidir-H13": (2, 2, 4, 13, 1, True, False, True, True),
}


@variants
@pytest.mark.parametrize("case", list(LAYER_CASES), ids=list(LAYER_CASES))
def test_lstm(backend, algo, case):
    _check_layer(backend, algo, torch.float32, *LAYER_CASES[case][:4], *LAYER_CASES[case][4:])


@variants
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_lstm_half(backend, algo, dtype):
    _check_layer(backend, algo, dtype, 2, 2, 3, 5, 2, True, False, True, True)


@variants
def test_lstm_unbatched(backend, algo):
    _check_layer(backend, algo, torch.float32, 3, 1, 4, 5, 1, False, unbatched=True)


def test_lstm_persistent_largest_hidden():
    """The persistent kernel at its hidden-size limit (one 64-wide register tile)."""
    _check_layer("triton", "persistent", torch.float32, 2, 2, 3, 64, 1, False)


@backends
def test_lstm_module_is_drop_in(backend):
    kw = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, batch_first=True)
    theirs = torch.nn.LSTM(**kw).to(DEVICE)
    ours = pydl.nn.LSTM(**kw, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.LSTM)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = random_tensor((2, 3, 4), torch.float32, DEVICE)
    out, (hn, cn) = ours(x)
    t_out, (t_hn, t_cn) = theirs(x)
    for a, b in ((out, t_out), (hn, t_hn), (cn, t_cn)):
        assert a.shape == b.shape
        assert_close(a, b, torch.float32, reduction=64, tf32=TF32)
    (out.square().sum() + hn.sum()).backward()
    (t_out.square().sum() + t_hn.sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=64 * 30, tf32=TF32, name=name)


@backends
def test_lstm_dropout_between_layers(backend):
    """Dropout on every layer's output but the last, in training only. On the CPU the mask is
    drawn exactly as torch's LSTM draws it, so the same seed gives the same result."""
    kw = dict(input_size=3, hidden_size=5, num_layers=2, dropout=0.5)
    theirs = torch.nn.LSTM(**kw).to(DEVICE)
    ours = pydl.nn.LSTM(**kw, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor((2, 2, 3), torch.float32, DEVICE)
    if DEVICE == "cpu":
        torch.manual_seed(11)
        out, (hn, _) = ours(x)
        torch.manual_seed(11)
        t_out, (t_hn, _) = theirs(x)
        assert_close(out, t_out, torch.float32, reduction=48, name="train output")
        assert_close(hn, t_hn, torch.float32, reduction=48, name="train h_n")
        out.sum().backward()
        t_out.sum().backward()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad, torch.float32, reduction=48 * 20, name=name)
        # a different draw gives a different result: the mask is really applied
        assert not torch.allclose(ours(x)[0], out)
    ours.eval()
    theirs.eval()
    assert_close(ours(x)[0], theirs(x)[0], torch.float32, reduction=48, tf32=TF32, name="eval")


@backends
def test_lstm_bad_input(backend):
    T, B, I, H = 3, 2, 4, 5
    m = torch.nn.LSTM(I, H, 2).to(DEVICE)
    w = list(m._flat_weights)
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    h0 = random_tensor((2, B, H), torch.float32, DEVICE)
    lstm = lambda *a, **k: pydl.lstm(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"weight_ih_l0 must have shape .* input has size 3"):
        lstm(x[..., :3], None, w, num_layers=2)
    with pytest.raises(ValueError, match="input must be 2-D or 3-D"):
        lstm(x[None], None, w, num_layers=2)
    with pytest.raises(ValueError, match=r"hx\[0\] \(h0\) must have shape \(2, 2, 5\)"):
        lstm(x, (h0[:1], h0), w, num_layers=2)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c0\) must have shape \(2, 2, 5\)"):
        lstm(x, (h0, h0[:, :1]), w, num_layers=2)
    with pytest.raises(ValueError, match="weights: expected 8 tensors"):
        lstm(x, None, w[:4], num_layers=2)
    with pytest.raises(ValueError, match=r"weight_hh_l1 must have shape \(4\*hidden_size"):
        lstm(x, None, w[:5] + [w[5][:, :4]] + w[6:], num_layers=2)
    with pytest.raises(ValueError, match=r"weight_ih_l1 must have shape \(4\*hidden_size, 1\*hidden_size"):
        lstm(x, None, w[:4] + [w[4][:, :3]] + w[5:], num_layers=2)
    with pytest.raises(ValueError, match="sequence length 0"):
        lstm(x[:0], None, w, num_layers=2)
    with pytest.raises(ValueError, match="algo='nope' is not available"):
        lstm(x, None, w, num_layers=2, algo="nope")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        lstm(x.double(), None, [t.double() for t in w], num_layers=2)
    if backend == "triton":
        big = torch.nn.LSTM(I, 65).to(DEVICE)
        with pytest.raises(ValueError, match="hidden_size <= 64"):
            lstm(x, None, list(big._flat_weights), algo="persistent")
    else:
        with pytest.raises(ValueError, match="algo='persistent' is not available on the 'numba'"):
            lstm(x, None, w, num_layers=2, algo="persistent")


# --- projections (proj_size > 0) ---------------------------------------------------------------

# torch's CPU LSTM warns that oneDNN has no projections (its baseline, not ours)
no_onednn_warning = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")

# (T, B, I, H, layers, bidirectional, batch_first, with_state, bias, proj_size)
PROJ_CASES = {
    "T3-B2-H6-P4": (3, 2, 3, 6, 1, False, False, True, True, 4),
    "2layers-bidir-batch_first-P3": (2, 2, 3, 5, 2, True, True, True, True, 3),
    "nostate-nobias-P2": (3, 2, 3, 5, 1, False, False, False, False, 2),
}


@no_onednn_warning
@pytest.mark.parametrize("backend,case", [("triton", c) for c in PROJ_CASES]
                         + [("numba", "2layers-bidir-batch_first-P3")])
def test_lstm_proj(backend, case):
    """h_t = W_hr (o_t * tanh(c_t)): outputs, h_n (P wide), c_n and every gradient (dW_hr
    included) against the reference and torch.nn.LSTM(proj_size=...)."""
    *args, proj = PROJ_CASES[case]
    _check_layer(backend, None, torch.float32, *args, proj=proj)


@no_onednn_warning
def test_lstm_proj_half():
    _check_layer("triton", None, torch.float16, 2, 2, 3, 5, 1, True, False, True, True, proj=3)


@no_onednn_warning
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_lstm_proj_recompute(backend):
    """recompute=True with projections: the recomputation's scratch states are the
    unprojected m_t dW_hr needs, so the forward keeps neither gates nor m."""
    _check_layer(backend, None, torch.float32, 2, 2, 3, 5, 2, True, False, True, True,
                 recompute=True, proj=3)


@no_onednn_warning
def test_lstm_proj_module_is_drop_in():
    kw = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)
    theirs = torch.nn.LSTM(**kw).to(DEVICE)
    ours = pydl.nn.LSTM(**kw, backend="triton").to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert "weight_hr_l1_reverse" in ours.state_dict()
    assert repr(ours) == repr(theirs)
    x = random_tensor((2, 2, 3), torch.float32, DEVICE)
    out, (hn, cn) = ours(x)
    t_out, (t_hn, t_cn) = theirs(x)
    for a, b in ((out, t_out), (hn, t_hn), (cn, t_cn)):
        assert a.shape == b.shape
        assert_close(a, b, torch.float32, reduction=64, tf32=TF32)
    (out.square().sum() + hn.sum() + cn.sum()).backward()
    (t_out.square().sum() + t_hn.sum() + t_cn.sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=64 * 30, tf32=TF32, name=name)
    u_out, (u_hn, _) = ours(x[:, 0])                    # unbatched
    assert u_out.shape == (2, 4) and u_hn.shape == (4, 2)
    assert_close(u_out, theirs(x[:, 0])[0], torch.float32, reduction=64, tf32=TF32)


@no_onednn_warning
def test_lstm_proj_torch_backend_matches_torch():
    m = torch.nn.LSTM(3, 5, 2, bidirectional=True, proj_size=2).to(DEVICE)
    x = random_tensor((2, 2, 3), torch.float32, DEVICE)
    out, (hn, cn) = pydl.lstm(x, None, list(m._flat_weights), num_layers=2, bidirectional=True,
                              backend="torch")
    t_out, (t_hn, t_cn) = m(x)
    assert torch.equal(out, t_out) and torch.equal(hn, t_hn) and torch.equal(cn, t_cn)


@backends
def test_lstm_proj_bad_input(backend):
    T, B, I, H, P = 2, 2, 3, 5, 3
    m = torch.nn.LSTM(I, H, 2, proj_size=P).to(DEVICE)
    w = list(m._flat_weights)       # per layer: w_ih, w_hh, b_ih, b_hh, w_hr
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    h0 = random_tensor((2, B, P), torch.float32, DEVICE)
    c0 = random_tensor((2, B, H), torch.float32, DEVICE)
    lstm = lambda *a, **k: pydl.lstm(*a, backend=backend, num_layers=2, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"weight_hr_l0 must have shape \(proj_size, "
                                         r"hidden_size\) = \(3, 5\).* got \(3, 4\)"):
        lstm(x, None, w[:4] + [w[4][:, :4]] + w[5:])
    with pytest.raises(ValueError, match=r"weight_hr_l1 must have shape .* got \(2, 5\)"):
        lstm(x, None, w[:9] + [w[9][:2]])
    with pytest.raises(ValueError, match=r"weight_hh_l1 must have shape \(4\*hidden_size, "
                                         r"proj_size\) = \(20, 3\)"):
        lstm(x, None, w[:6] + [w[6][:, :2]] + w[7:])
    with pytest.raises(ValueError, match=r"weight_ih_l1 must have shape \(4\*hidden_size, "
                                         r"1\*proj_size"):
        lstm(x, None, w[:5] + [random_tensor((4 * H, H), torch.float32, DEVICE)] + w[6:])
    with pytest.raises(ValueError, match=r"hx\[0\] \(h0\) must have shape \(2, 2, 3\) "
                                         r"\(num_layers \* num_directions, batch, proj_size\)"):
        lstm(x, (c0, c0), w)
    with pytest.raises(ValueError, match=r"hx\[1\] \(c0\) must have shape \(2, 2, 5\)"):
        lstm(x, (h0, h0), w)
    with pytest.raises(ValueError, match="weights: expected 8 tensors.* or 10 with projections"):
        lstm(x, None, w[:9])
    with pytest.raises(ValueError, match="proj_size < hidden_size"):
        big = [random_tensor((4 * H, H), torch.float32, DEVICE) if i in (1, 6) else
               random_tensor((H, H), torch.float32, DEVICE) if i in (4, 9) else
               random_tensor((4 * H, H), torch.float32, DEVICE) if i == 5 else t
               for i, t in enumerate(w)]
        lstm(x, None, big)
    if backend == "triton":
        with pytest.raises(ValueError, match="algo='persistent' does not support projections"):
            lstm(x, (h0, c0), w, algo="persistent")


def test_lstm_torch_backend_matches_torch():
    """backend='torch' is torch's own LSTM, the baseline, with the same signature."""
    m = torch.nn.LSTM(3, 4, 2, bidirectional=True, batch_first=True).to(DEVICE)
    x = random_tensor((2, 3, 3), torch.float32, DEVICE)
    out, (hn, cn) = pydl.lstm(x, None, list(m._flat_weights), num_layers=2, bidirectional=True,
                              batch_first=True, backend="torch")
    t_out, (t_hn, t_cn) = m(x)
    assert torch.equal(out, t_out) and torch.equal(hn, t_hn) and torch.equal(cn, t_cn)


# --- GRU cell -------------------------------------------------------------------------------

# (B, I, H, bias, with_state)
GRU_CASES = [
    (3, 7, 5, True, True),
    (1, 4, 13, False, True),      # batch 1, hidden 13, no bias
    (2, 3, 6, True, False),       # hx=None
]


def _check_gru(backend, dtype, B, I, H, bias, with_state, unbatched=False):
    cell = torch.nn.GRUCell(I, H, bias=bias)
    ws = _weights_like(cell, dtype)
    w_ih, w_hh = ws[0], ws[1]
    b_ih, b_hh = (ws[2], ws[3]) if bias else (None, None)
    ss = (H,) if unbatched else (B, H)
    x = random_tensor((I,) if unbatched else (B, I), dtype, DEVICE)
    h = random_tensor(ss, dtype, DEVICE) if with_state else None
    dh1 = random_tensor(ss, dtype, DEVICE)

    def run(be, tensors, cot):
        return _run(lambda *a: (pydl.gru_cell(*a, backend=be),), tensors, [cot])

    (h1,), grads = run(backend, [x, h, w_ih, w_hh, b_ih, b_hh], dh1)
    up = torch.float32 if dtype == torch.float16 else dtype
    (t_h1,), t_grads = run("torch", [None if t is None else t.to(up)
                                     for t in (x, h, w_ih, w_hh, b_ih, b_hh)], dh1.to(up))
    r_h1, cache = ref.gru_cell(_np(x), _np(h), _np(w_ih), _np(w_hh), _np(b_ih), _np(b_hh))
    r_grads = ref.gru_cell_backward(_np(dh1), cache)
    red = I + H
    assert h1.dtype == dtype and h1.shape == ss
    assert_close(h1, r_h1, dtype, reduction=red, tf32=TF32, name="h1 vs reference")
    assert_close(h1, t_h1, dtype, reduction=red, tf32=TF32, name="h1 vs torch")
    names = ("dx", "dh", "dw_ih", "dw_hh", "db_ih", "db_hh")
    for g, r, t, name in zip(grads, r_grads, t_grads, names):
        if name == "dh" and not with_state or name.startswith("db") and not bias:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        n = 3 * H * red if name in ("dx", "dh") else B * red
        assert_close(g, r, dtype, reduction=n, tf32=TF32, name=f"{name} vs reference")
        assert_close(g, t, dtype, reduction=n, tf32=TF32, name=f"{name} vs torch")


@backends
@dtypes
@pytest.mark.parametrize("case", GRU_CASES, ids=lambda c: "B{}-I{}-H{}{}{}".format(
    *c[:3], "" if c[3] else "-nobias", "" if c[4] else "-nostate"))
def test_gru_cell(backend, dtype, case):
    _check_gru(backend, dtype, *case)


@backends
def test_gru_cell_module_is_drop_in(backend):
    theirs = torch.nn.GRUCell(4, 6).to(DEVICE)
    ours = pydl.nn.GRUCell(4, 6, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.GRUCell)
    x = random_tensor((2, 4), torch.float32, DEVICE)
    h = random_tensor((2, 6), torch.float32, DEVICE)
    for h_ in (h, None):
        assert_close(ours(x, h_), theirs(x, h_), torch.float32, reduction=10, tf32=TF32)
    ours(x, h).square().sum().backward()
    theirs(x, h).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=2 * 10, tf32=TF32, name=name)
    assert_close(ours(x[0], h[0]), theirs(x[0], h[0]), torch.float32, reduction=10, tf32=TF32)


@backends
def test_gru_cell_bad_input(backend):
    x = random_tensor((2, 4), torch.float32, DEVICE)
    w_ih = random_tensor((15, 4), torch.float32, DEVICE)
    w_hh = random_tensor((15, 5), torch.float32, DEVICE)
    h = random_tensor((2, 5), torch.float32, DEVICE)
    gru = lambda *a, **k: pydl.gru_cell(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match="input has size 3 .* w_ih expects input_size 4"):
        gru(x[:, :3], h, w_ih, w_hh)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(3\*hidden_size, hidden_size\)"):
        gru(x, h, w_ih, w_hh[:12])
    with pytest.raises(ValueError, match=r"hx must have shape \(2, 5\)"):
        gru(x, h[:, :4], w_ih, w_hh)
    with pytest.raises(TypeError, match="hx must be a tensor or None"):
        gru(x, (h, h), w_ih, w_hh)


# --- GRU layer ------------------------------------------------------------------------------

# (T, B, I, H, layers, bidirectional, batch_first, with_state, bias); the Numba simulator runs
# the marked few (its kernels are the cell's, covered above; these check the layer's wiring)
GRU_LAYER_CASES = {
    "T3-B2-H5": (3, 2, 4, 5, 1, False, False, True, True),
    "T1-B1-H7": (1, 1, 3, 7, 1, False, False, True, True),          # one step, batch 1
    "nostate-nobias": (3, 2, 3, 6, 1, False, False, False, False),
    "2layers-bidir-batch_first": (2, 2, 3, 5, 2, True, True, True, True),
    "bidir-H13": (2, 2, 4, 13, 1, True, False, True, True),         # hidden not a block multiple
}
GRU_NUMBA_CASES = ("T1-B1-H7", "nostate-nobias", "2layers-bidir-batch_first")


@pytest.mark.parametrize("backend,case", [("triton", c) for c in GRU_LAYER_CASES]
                         + [("numba", c) for c in GRU_NUMBA_CASES])
def test_gru(backend, case):
    _check_layer(backend, None, torch.float32, *GRU_LAYER_CASES[case], kind="gru")


@backends
def test_gru_half(backend):
    _check_layer(backend, None, torch.float16, 2, 2, 3, 5, 1, True, False, True, True, kind="gru")


def test_gru_unbatched():
    _check_layer("triton", None, torch.float32, 3, 1, 4, 5, 1, False, unbatched=True, kind="gru")


@backends
def test_gru_module_is_drop_in(backend):
    kw = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, batch_first=True)
    theirs = torch.nn.GRU(**kw).to(DEVICE)
    ours = pydl.nn.GRU(**kw, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.GRU)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = random_tensor((2, 3, 4), torch.float32, DEVICE)
    h0 = random_tensor((4, 2, 6), torch.float32, DEVICE)
    out, hn = ours(x, h0)
    t_out, t_hn = theirs(x, h0)
    for a, b in ((out, t_out), (hn, t_hn)):
        assert a.shape == b.shape
        assert_close(a, b, torch.float32, reduction=64, tf32=TF32)
    (out.square().sum() + hn.sum()).backward()
    (t_out.square().sum() + t_hn.sum()).backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=64 * 30, tf32=TF32, name=name)


@backends
def test_gru_dropout_between_layers(backend):
    """As test_lstm_dropout_between_layers: on the CPU the same seed draws torch's mask."""
    kw = dict(input_size=3, hidden_size=5, num_layers=2, dropout=0.5)
    theirs = torch.nn.GRU(**kw).to(DEVICE)
    ours = pydl.nn.GRU(**kw, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor((2, 2, 3), torch.float32, DEVICE)
    if DEVICE == "cpu":
        torch.manual_seed(11)
        out, hn = ours(x)
        torch.manual_seed(11)
        t_out, t_hn = theirs(x)
        assert_close(out, t_out, torch.float32, reduction=48, name="train output")
        assert_close(hn, t_hn, torch.float32, reduction=48, name="train h_n")
        (out.sum() + hn.square().sum()).backward()
        (t_out.sum() + t_hn.square().sum()).backward()
        for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad, torch.float32, reduction=48 * 20, name=name)
        assert not torch.allclose(ours(x)[0], out)
    ours.eval()
    theirs.eval()
    assert_close(ours(x)[0], theirs(x)[0], torch.float32, reduction=48, tf32=TF32, name="eval")


@backends
def test_gru_bad_input(backend):
    T, B, I, H = 3, 2, 4, 5
    m = torch.nn.GRU(I, H, 2).to(DEVICE)
    w = list(m._flat_weights)
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    h0 = random_tensor((2, B, H), torch.float32, DEVICE)
    gru = lambda *a, **k: pydl.gru(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"weight_ih_l0 must have shape \(3\*hidden_size, input_size\) "
                                         r"= \(15, 3\), got \(15, 4\): input has size 3"):
        gru(x[..., :3], None, w, num_layers=2)
    with pytest.raises(ValueError, match="input must be 2-D or 3-D"):
        gru(x[None], None, w, num_layers=2)
    with pytest.raises(ValueError, match=r"hx \(h0\) must have shape \(2, 2, 5\)"):
        gru(x, h0[:1], w, num_layers=2)
    with pytest.raises(TypeError, match="hx must be a tensor"):
        gru(x, (h0, h0), w, num_layers=2)
    with pytest.raises(ValueError, match="weights: expected 8 tensors"):
        gru(x, None, w[:4], num_layers=2)
    with pytest.raises(ValueError, match=r"weight_hh_l1 must have shape \(3\*hidden_size"):
        gru(x, None, w[:5] + [w[5][:, :4]] + w[6:], num_layers=2)
    with pytest.raises(ValueError, match=r"weight_hh_l0 must have shape \(3\*hidden_size"):
        gru(x, None, list(torch.nn.LSTM(I, H, 2).to(DEVICE)._flat_weights), num_layers=2)
    with pytest.raises(ValueError, match=r"bias_hh_l1 must have shape \(3\*hidden_size,\) = \(15,\)"):
        gru(x, None, w[:7] + [w[7][:14]], num_layers=2)
    with pytest.raises(ValueError, match="sequence length 0.*a GRU needs"):
        gru(x[:0], None, w, num_layers=2)
    with pytest.raises(ValueError, match="algo='persistent' is not available"):
        gru(x, None, w, num_layers=2, algo="persistent")
    with pytest.raises(TypeError, match="recompute must be a bool"):
        gru(x, None, w, num_layers=2, recompute="yes")
    with pytest.raises(TypeError, match="weights.* has dtype torch.float16 but input has torch.float32"):
        gru(x, None, w[:1] + [w[1].half()] + w[2:], num_layers=2)
    with pytest.raises(ValueError, match="the torch backend has no recompute"):
        pydl.gru(x, None, w, num_layers=2, backend="torch", recompute=True)


def test_gru_torch_backend_matches_torch():
    """backend='torch' is torch's own GRU, the baseline, with the same signature."""
    m = torch.nn.GRU(3, 4, 2, bidirectional=True, batch_first=True).to(DEVICE)
    x = random_tensor((2, 3, 3), torch.float32, DEVICE)
    out, hn = pydl.gru(x, None, list(m._flat_weights), num_layers=2, bidirectional=True,
                       batch_first=True, backend="torch")
    t_out, t_hn = m(x)
    assert torch.equal(out, t_out) and torch.equal(hn, t_hn)


# --- recompute: no gate activations kept between forward and backward -----------------------

@pytest.mark.parametrize("kind,case", [("lstm", "T1-B1-H7"), ("gru", "nostate-nobias")])
def test_recompute_vs_reference(kind, case):
    """recompute=True against the reference: one step (no batched recomputation of the
    later steps), and a zero initial state."""
    cases = LAYER_CASES if kind == "lstm" else GRU_LAYER_CASES
    _check_layer("triton", None, torch.float32, *cases[case], kind=kind, recompute=True)


def _saved_gate_activations(out, H):
    """The per-step gate activations (fp32 (T, B, 4H)) the layer's autograd node keeps, and
    every tensor it holds."""
    held = [t for t in out.grad_fn.saved_tensors if t is not None]
    acts = [t for t in held if t.dtype == torch.float32 and t.dim() == 3 and t.shape[-1] == 4 * H]
    return acts, held


@pytest.mark.parametrize("kind,backend,algo,L", [
    ("lstm", "triton", None, 2), ("lstm", "triton", "persistent", 1), ("lstm", "numba", None, 1),
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
        m = cls(I, H, L, bidirectional=True, backend=backend, recompute=recompute, **extra).to(DEVICE)
        xr = x.clone().requires_grad_(True)
        out, hn = m(xr)
        hn = hn[0] if kind == "lstm" else hn
        acts, held = _saved_gate_activations(out, H)
        if recompute:
            assert not acts
            assert not any(t.dtype == torch.float32 and t.dim() == 3 and t.shape[-1] in (G * H, 4 * H)
                           for t in held), [tuple(t.shape) for t in held]
        else:
            assert len(acts) == 2 * L, [tuple(t.shape) for t in held]   # one per layer-direction
        (out.square().sum() + hn.sum()).backward()
        results.append([out.detach(), hn.detach(), xr.grad] + [p.grad for p in m.parameters()])
    # fp32 rounding at most: the recomputation runs every step in one launch (other tiles)
    for a, b in zip(*results):
        assert_close(b, a, torch.float32, reduction=4, tf32=TF32)
