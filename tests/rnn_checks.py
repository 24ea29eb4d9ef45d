"""What the recurrent tests share (test_lstm.py, test_gru.py, test_rnn.py): running a layer or a
cell with gradients, and checking a layer against the float64 reference and torch.

Layer variants: (backend, algo). algo None is the default ("persistent": in emulation one
program runs every step of a direction in one launch, the persistent kernels' data flow
without their barrier); "steps" launches once per step with the grid covering every tile,
the unit split of the persistent path. The barrier itself runs only on a GPU
(tests/test_rnn_persistent.py).
"""
import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import pydl
from pydl import reference as ref
from pydl.testing import assert_close, random_tensor, uses_tf32

LAYER_VARIANTS = [("triton", None), ("triton", "steps"), ("numba", None)]
variants = pytest.mark.parametrize("backend,algo", LAYER_VARIANTS,
                                   ids=["triton", "triton-steps", "numba"])
TF32 = uses_tf32(DEVICE, cudnn=True)


def np64(t):
    return None if t is None else t.detach().to("cpu", torch.float64).numpy()


def run(fn, tensors, cotangents):
    """fn(*leaves) with fresh leaves of the tensors (None stays None), backpropagating the
    cotangents through its tensor outputs; (outputs, grads)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]
    outs = fn(*leaves)
    torch.autograd.backward(outs, cotangents)
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def weights_like(module, dtype):
    """The module's parameters (torch's init) as plain tensors of `dtype` on DEVICE."""
    return [p.detach().to(DEVICE, dtype) for p in module.parameters()]


def layer_fn(kind, backend, algo=None, recompute=False, **opts):
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


def check_layer(backend, algo, dtype, T, B, I, H, L=1, bidirectional=False, batch_first=False,
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

    outs, grads = run(layer_fn(kind, backend, algo, recompute, **opts), [x, *states, *ws], cot)
    up = torch.float32 if dtype == torch.float16 else dtype
    # training mode on torch's side: cuDNN refuses a backward through its RNN in eval mode
    # (with no dropout the two modes compute the same)
    t_outs, t_grads = run(layer_fn(kind, "torch", training=True, **opts),
                          [None if t is None else t.to(up) for t in [x, *states, *ws]],
                          [t.to(up) for t in cot])
    w64 = dict(zip(names, map(np64, ws)))
    if kind == "lstm":
        r_out, (r_hn, r_cn), cache = ref.lstm(np64(x), *map(np64, states), w64, L, bidirectional,
                                              batch_first, return_cache=True)
        r_dx, r_dh0, r_dc0, r_dw = ref.lstm_backward(*map(np64, cot), cache)
        r_outs, r_grads = (r_out, r_hn, r_cn), [r_dx, r_dh0, r_dc0]
        out_names, state_names = ("output", "h_n", "c_n"), ["dh0", "dc0"]
    else:
        r_out, r_hn, cache = ref.gru(np64(x), np64(states[0]), w64, L, bidirectional, batch_first,
                                     return_cache=True)
        r_dx, r_dh0, r_dw = ref.gru_backward(*map(np64, cot), cache)
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


# --- cells and modules ------------------------------------------------------------------------

def cell_case_id(case):
    """The test id of a cell case (B, I, H, bias, with_state)."""
    B, I, H, bias, with_state = case
    return f"B{B}-I{I}-H{H}" + ("" if bias else "-nobias") + ("" if with_state else "-nostate")


def cell_fn(kind, backend):
    """fn(x, *states, w_ih, w_hh, b_ih, b_hh) -> the cell's new states as a tuple: (h1, c1) for
    the LSTM (states h, c), (h1,) for the GRU (state h); None states are zeros."""
    if kind == "lstm":
        return lambda x, h, c, *w: pydl.lstm_cell(x, None if h is None else (h, c), *w,
                                                  backend=backend)
    return lambda x, h, *w: (pydl.gru_cell(x, h, *w, backend=backend),)


def check_cell(kind, backend, dtype, B, I, H, bias, with_state, unbatched=False):
    """pydl.lstm_cell / pydl.gru_cell (kind) against the float64 reference and torch: the new
    states and the gradients of the input, the states, the weights and the biases."""
    lstm = kind == "lstm"
    G, states_of = (4, ("h", "c")) if lstm else (3, ("h",))
    cell = (torch.nn.LSTMCell if lstm else torch.nn.GRUCell)(I, H, bias=bias)
    ws = weights_like(cell, dtype)
    w = ws[:2] + (ws[2:4] if bias else [None, None])
    ss = (H,) if unbatched else (B, H)
    x = random_tensor((I,) if unbatched else (B, I), dtype, DEVICE)
    states = [random_tensor(ss, dtype, DEVICE) if with_state else None for _ in states_of]
    cot = [random_tensor(ss, dtype, DEVICE) for _ in states_of]
    outs, grads = run(cell_fn(kind, backend), [x, *states, *w], cot)
    # torch in fp32 for fp16 inputs: CPU half arithmetic rounds every op, which is torch's
    # error, not ours; the reference holds both to account.
    up = torch.float32 if dtype == torch.float16 else dtype
    t_outs, t_grads = run(cell_fn(kind, "torch"),
                          [None if t is None else t.to(up) for t in [x, *states, *w]],
                          [t.to(up) for t in cot])
    if lstm:
        *r_outs, cache = ref.lstm_cell(*map(np64, [x, *states, *w]))
        r_grads = ref.lstm_cell_backward(*map(np64, cot), cache)
    else:
        r_h1, cache = ref.gru_cell(*map(np64, [x, *states, *w]))
        r_outs, r_grads = [r_h1], ref.gru_cell_backward(np64(cot[0]), cache)
    red = I + H
    for ours, r, t, s in zip(outs, r_outs, t_outs, states_of):
        assert ours.dtype == dtype and ours.shape == ss, s
        assert_close(ours, r, dtype, reduction=red, tf32=TF32, name=f"{s}1 vs reference")
        assert_close(ours, t, dtype, reduction=red, tf32=TF32, name=f"{s}1 vs torch")
    # the reference's state gradients are w.r.t. the zero state when none was given, ours
    # are None there
    names = ["dx", *(f"d{s}" for s in states_of), "dw_ih", "dw_hh", "db_ih", "db_hh"]
    for g, r, t, name in zip(grads, r_grads, t_grads, names):
        if name[1:] in states_of and not with_state or name.startswith("db") and not bias:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        n = red * (G * H if name in ("dx", "dh") else 1 if name == "dc" else B)
        assert_close(g, r, dtype, reduction=n, tf32=TF32, name=f"{name} vs reference")
        assert_close(g, t, dtype, reduction=n, tf32=TF32, name=f"{name} vs torch")


def _flat(outputs):
    """(output, h_n) or (output, (h_n, c_n)) as [output, h_n(, c_n)]."""
    out, states = outputs
    return [out, *(states if isinstance(states, tuple) else (states,))]


def check_module_drop_in(name, backend, kw, x, hx=None):
    """pydl.nn.<name>(**kw) (LSTM, GRU) in place of torch.nn.<name>(**kw): an instance of it
    with the same state dict and repr, and from the same parameters the same outputs and
    parameter gradients (of the output squared plus the final states, summed).
    Returns (ours, theirs)."""
    theirs = getattr(torch.nn, name)(**kw).to(DEVICE)
    ours = getattr(pydl.nn, name)(**kw, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, type(theirs))
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    outs, t_outs = _flat(ours(x, hx)), _flat(theirs(x, hx))
    for a, b in zip(outs, t_outs):
        assert a.shape == b.shape
        assert_close(a, b, torch.float32, reduction=64, tf32=TF32)
    for o in (outs, t_outs):
        (o[0].square().sum() + sum(s.sum() for s in o[1:])).backward()
    for (p_name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=64 * 30, tf32=TF32, name=p_name)
    return ours, theirs


def check_dropout_between_layers(name, backend):
    """Dropout on every layer's output but the last of pydl.nn.<name> (LSTM, GRU), in training
    only. On the CPU the mask is drawn exactly as torch's draws it, so the same seed gives the
    same result (outputs and gradients); a different draw a different one."""
    kw = dict(input_size=3, hidden_size=5, num_layers=2, dropout=0.5)
    theirs = getattr(torch.nn, name)(**kw).to(DEVICE)
    ours = getattr(pydl.nn, name)(**kw, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor((2, 2, 3), torch.float32, DEVICE)
    if DEVICE == "cpu":
        torch.manual_seed(11)
        out, hn = _flat(ours(x))[:2]
        torch.manual_seed(11)
        t_out, t_hn = _flat(theirs(x))[:2]
        assert_close(out, t_out, torch.float32, reduction=48, name="train output")
        assert_close(hn, t_hn, torch.float32, reduction=48, name="train h_n")
        (out.sum() + hn.square().sum()).backward()
        (t_out.sum() + t_hn.square().sum()).backward()
        for (p_name, p), q in zip(ours.named_parameters(), theirs.parameters()):
            assert_close(p.grad, q.grad, torch.float32, reduction=48 * 20, name=p_name)
        assert not torch.allclose(ours(x)[0], out)
    # p = 1 drops everything (torch: zeros, no draw), on any device; bernoulli(0) / 0 was NaN
    ours.dropout = theirs.dropout = 1.0
    xs = [x.clone().requires_grad_() for _ in range(2)]
    outs = [_flat(m(xi))[:2] for m, xi in zip((ours, theirs), xs)]
    for got, want, what in zip(outs[0], outs[1], ("output", "h_n")):
        assert_close(got, want, torch.float32, reduction=48, tf32=TF32, name=f"p=1 {what}")
    for out, hn in outs:
        (out.sum() + hn.square().sum()).backward()
    assert_close(xs[0].grad, xs[1].grad, torch.float32, reduction=48, tf32=TF32, name="p=1 dx")
    ours.eval()
    theirs.eval()
    assert_close(ours(x)[0], theirs(x)[0], torch.float32, reduction=48, tf32=TF32, name="eval")


def assert_same_but_chunks(got, want, reduction: int, case: str = ""):
    """fp32 outputs of one stack run whole and in chunks of steps (rnn.INFERENCE_CHUNK_BYTES):
    bitwise in emulation, where one GEMM configuration serves every shape; on a GPU the tuner
    may pick another tile for a chunk's rows of the input projection (another summation
    order), so there within the fp32 (TF32) tolerance."""
    for i, (a, b) in enumerate(zip(got, want)):
        if HAS_CUDA:
            assert_close(a, b.detach(), torch.float32, reduction=reduction, tf32=TF32,
                         name=f"{case} output {i}")
        else:
            assert torch.equal(a, b.detach()), f"{case}: output {i} differs"
