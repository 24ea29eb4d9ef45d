"""LSTM cell and layer kernels against the float64 reference and torch: forward, every gradient
(input, states, weights, biases), both backends and both ways of launching the layer's
recurrence (tests/rnn_checks.py), fp16, batch 1, sequence length 1, hidden sizes that are not
powers of two, two layers, bidirectional, batch_first, absent initial state, dropout,
projections, the nn drop-ins, bad input. What the LSTM and the GRU share (recompute, packed
sequences, launch counts, double backward, empty batches): tests/test_rnn.py.

Shapes stay tiny (emulation runs every kernel on the CPU: the Numba simulator starts an OS
thread per CUDA thread).
"""
import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, KERNEL_BACKENDS
from rnn_checks import (
    TF32,
    cell_case_id,
    check_cell,
    check_dropout_between_layers,
    check_layer,
    check_module_drop_in,
    variants,
)
from rnn_checks import np64 as _np
from rnn_checks import run as _run

import pydl
from pydl import reference as ref
from pydl.testing import assert_close, random_tensor

backends = pytest.mark.parametrize("backend", KERNEL_BACKENDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)


# --- the cell -------------------------------------------------------------------------------

# (B, I, H, bias, with_state)
CELL_CASES = [
    (3, 7, 5, True, True),
    (1, 4, 13, True, True),       # batch 1, hidden 13
    (2, 5, 6, False, True),       # no bias
    (2, 3, 9, True, False),       # hx=None (zeros)
]


@backends
@dtypes
@pytest.mark.parametrize("case", CELL_CASES, ids=cell_case_id)
def test_lstm_cell(backend, dtype, case):
    check_cell("lstm", backend, dtype, *case)


@backends
def test_lstm_cell_unbatched(backend):
    check_cell("lstm", backend, torch.float32, 1, 4, 5, True, True, unbatched=True)


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
    (h1, c1), grads = _run(lambda *a: pydl.lstm_cell(a[0], (a[1], a[2]), a[3], a[4],
                                                     backend=backend),
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
    hx = (random_tensor((3, 7), torch.float32, DEVICE),
          random_tensor((3, 7), torch.float32, DEVICE))
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
    check_layer(backend, algo, torch.float32, *LAYER_CASES[case][:4], *LAYER_CASES[case][4:])


@variants
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32], ids=str)
def test_lstm_half(backend, algo, dtype):
    check_layer(backend, algo, dtype, 2, 2, 3, 5, 2, True, False, True, True)


@variants
def test_lstm_unbatched(backend, algo):
    check_layer(backend, algo, torch.float32, 3, 1, 4, 5, 1, False, unbatched=True)


@pytest.mark.parametrize("algo", [None, "steps"])
def test_lstm_many_tiles(algo):
    """Hidden 72 and batch 18: several unit blocks and two row blocks, so a step's tiles are
    spread over programs (one program looping over all of them by default in emulation)."""
    check_layer("triton", algo, torch.float32, 3, 18, 5, 72, 1, False)


@backends
def test_lstm_module_is_drop_in(backend):
    kw = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, batch_first=True)
    check_module_drop_in("LSTM", backend, kw, random_tensor((2, 3, 4), torch.float32, DEVICE))


@backends
def test_lstm_dropout_between_layers(backend):
    check_dropout_between_layers("LSTM", backend)


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
    with pytest.raises(ValueError,
                       match=r"weight_ih_l1 must have shape \(4\*hidden_size, 1\*hidden_size"):
        lstm(x, None, w[:4] + [w[4][:, :3]] + w[5:], num_layers=2)
    with pytest.raises(RuntimeError, match="sequence length 0.*larger than 0"):
        lstm(x[:0], None, w, num_layers=2)
    with pytest.raises(ValueError, match="algo='nope' is not available"):
        lstm(x, None, w, num_layers=2, algo="nope")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        lstm(x.double(), None, [t.double() for t in w], num_layers=2)
    with pytest.raises(ValueError, match="algo='flash' is not available on the .* "
                                         "\\(available: persistent, steps\\)"):
        lstm(x, None, w, num_layers=2, algo="flash")


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
@pytest.mark.parametrize("backend,algo,case", [("triton", None, c) for c in PROJ_CASES]
                         + [("triton", "steps", "T3-B2-H6-P4"),
                            ("numba", None, "2layers-bidir-batch_first-P3"),
                            ("numba", "steps", "T3-B2-H6-P4")])
def test_lstm_proj(backend, algo, case):
    """h_t = W_hr (o_t * tanh(c_t)), the kernel's second sub-step: outputs, h_n (P wide), c_n
    and every gradient (dW_hr included) against the reference and
    torch.nn.LSTM(proj_size=...)."""
    *args, proj = PROJ_CASES[case]
    check_layer(backend, algo, torch.float32, *args, proj=proj)


@no_onednn_warning
def test_lstm_proj_half():
    check_layer("triton", None, torch.float16, 2, 2, 3, 5, 1, True, False, True, True, proj=3)


@no_onednn_warning
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_lstm_proj_recompute(backend):
    """recompute=True with projections: the recomputation's scratch states are the
    unprojected m_t dW_hr needs, so the forward keeps neither gates nor m."""
    check_layer(backend, None, torch.float32, 2, 2, 3, 5, 2, True, False, True, True,
                 recompute=True, proj=3)


@no_onednn_warning
def test_lstm_proj_module_is_drop_in():
    kw = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=True, proj_size=2)
    x = random_tensor((2, 2, 3), torch.float32, DEVICE)
    ours, theirs = check_module_drop_in("LSTM", "triton", kw, x)
    assert "weight_hr_l1_reverse" in ours.state_dict()
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


def test_lstm_torch_backend_matches_torch():
    """backend='torch' is torch's own LSTM, the baseline, with the same signature."""
    m = torch.nn.LSTM(3, 4, 2, bidirectional=True, batch_first=True).to(DEVICE)
    x = random_tensor((2, 3, 3), torch.float32, DEVICE)
    out, (hn, cn) = pydl.lstm(x, None, list(m._flat_weights), num_layers=2, bidirectional=True,
                              batch_first=True, backend="torch")
    t_out, (t_hn, t_cn) = m(x)
    assert torch.equal(out, t_out) and torch.equal(hn, t_hn) and torch.equal(cn, t_cn)


