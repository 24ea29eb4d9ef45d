"""float64 references for LSTM / GRU cells, the full LSTM (BPTT) and scaled dot-product attention,
against torch on CPU in float64: outputs and every gradient, through autograd."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from pydl import reference as ref
from pydl.testing import assert_close

F64 = torch.float64


def close(actual, expected, name, reduction=1):
    assert_close(actual, expected, F64, reduction=reduction, name=name)


def randn(*shape):
    return torch.randn(shape, dtype=F64)


def np_(t):
    return None if t is None else t.detach().numpy()


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ====================================================================================== LSTM cell

def _torch_lstm_cell(x, h, c, w, dh1, dc1):
    """h1, c1 and the grads of x, h, c and the weights for loss = <h1, dh1> + <c1, dc1>."""
    cell = torch.nn.LSTMCell(w["w_ih"].shape[1], w["w_hh"].shape[1],
                             bias=w.get("b_ih") is not None, dtype=F64)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.from_numpy(w["w_ih"]))
        cell.weight_hh.copy_(torch.from_numpy(w["w_hh"]))
        if cell.bias:
            cell.bias_ih.copy_(torch.from_numpy(w["b_ih"]))
            cell.bias_hh.copy_(torch.from_numpy(w["b_hh"]))
    x, h, c = leaf(x), leaf(h), leaf(c)
    h1, c1 = cell(x, (h, c))
    ((h1 * dh1).sum() + (c1 * dc1).sum()).backward()
    grads = dict(x=x.grad, h=h.grad, c=c.grad, w_ih=cell.weight_ih.grad, w_hh=cell.weight_hh.grad)
    if cell.bias:
        grads.update(b_ih=cell.bias_ih.grad, b_hh=cell.bias_hh.grad)
    return h1.detach(), c1.detach(), grads


def _cell_weights(I, H, gates, bias):
    w = dict(w_ih=randn(gates * H, I).numpy(), w_hh=randn(gates * H, H).numpy())
    if bias:
        w.update(b_ih=randn(gates * H).numpy(), b_hh=randn(gates * H).numpy())
    return w


def _check_lstm_cell(B, I, H, bias, unbatched=False, mutate=None):
    w = _cell_weights(I, H, 4, bias)
    shape = (lambda n: (n,)) if unbatched else (lambda n: (B, n))
    x, h, c, dh1, dc1 = (randn(*shape(I)), randn(*shape(H)), randn(*shape(H)), randn(*shape(H)),
                         randn(*shape(H)))
    t_h1, t_c1, tg = _torch_lstm_cell(x, h, c, w, dh1, dc1)
    wr = mutate(w) if mutate else w
    h1, c1, cache = ref.lstm_cell(np_(x), np_(h), np_(c), wr["w_ih"], wr["w_hh"], wr.get("b_ih"),
                                  wr.get("b_hh"))
    close(h1, t_h1, "h1")
    close(c1, t_c1, "c1")
    dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh = ref.lstm_cell_backward(np_(dh1), np_(dc1), cache)
    red = max(I, H, 4 * H, B)
    for name, got in dict(x=dx, h=dh, c=dc, w_ih=dw_ih, w_hh=dw_hh).items():
        close(got, tg[name], f"d{name}", red)
    if bias:
        close(db_ih, tg["b_ih"], "db_ih", B)
        close(db_hh, tg["b_hh"], "db_hh", B)
    else:
        assert db_ih is None and db_hh is None


@pytest.mark.parametrize("B,I,H,bias", [(3, 4, 5, True), (1, 7, 3, True), (2, 6, 6, False),
                                        (4, 1, 11, True)])
def test_lstm_cell(B, I, H, bias):
    _check_lstm_cell(B, I, H, bias)


def test_lstm_cell_unbatched_and_default_state():
    _check_lstm_cell(1, 4, 5, True, unbatched=True)
    w = _cell_weights(4, 5, 4, True)
    x = randn(3, 4).numpy()
    h1, c1, _ = ref.lstm_cell(x, None, None, **w)
    h1z, c1z, _ = ref.lstm_cell(x, np.zeros((3, 5)), np.zeros((3, 5)), **w)
    np.testing.assert_array_equal(h1, h1z)
    np.testing.assert_array_equal(c1, c1z)


def _blocks(a, n):
    return np.split(a, n, axis=0)


@pytest.mark.parametrize("mutation", ["swap_i_f", "swap_g_o", "transpose_w_hh_blocks",
                                      "biases_i_f_swapped"])
def test_lstm_cell_comparison_catches_layout_bugs(mutation):
    """The comparison is sharp enough to fail a wrong gate order or a transposed weight."""
    def mutate(w):
        w = dict(w)
        if mutation == "swap_i_f":
            i, f, g, o = _blocks(w["w_ih"], 4)
            w["w_ih"] = np.concatenate([f, i, g, o])
        elif mutation == "swap_g_o":
            for k in ("w_ih", "w_hh"):
                i, f, g, o = _blocks(w[k], 4)
                w[k] = np.concatenate([i, f, o, g])
        elif mutation == "transpose_w_hh_blocks":
            w["w_hh"] = np.concatenate([b.T for b in _blocks(w["w_hh"], 4)])
        else:
            i, f, g, o = _blocks(w["b_hh"], 4)
            w["b_hh"] = np.concatenate([f, i, g, o])
        return w
    with pytest.raises(AssertionError):
        _check_lstm_cell(3, 5, 5, True, mutate=mutate)


def test_sigmoid_is_safe_for_large_inputs():
    x = np.array([-1e308, -800.0, -40.0, 0.0, 40.0, 800.0, 1e308])
    with np.errstate(all="raise", under="ignore"):
        s = ref.sigmoid(x)
    assert s[0] == 0.0 and s[-1] == 1.0 and s[3] == 0.5
    close(s, torch.sigmoid(torch.from_numpy(x)), "sigmoid")
    # A cell with huge pre-activations stays finite, gradients included.
    w = _cell_weights(3, 4, 4, True)
    w = {k: v * 1e3 for k, v in w.items()}
    with np.errstate(over="raise", invalid="raise"):
        h1, c1, cache = ref.lstm_cell(randn(2, 3).numpy(), randn(2, 4).numpy(),
                                      randn(2, 4).numpy(), **w)
        grads = ref.lstm_cell_backward(np.ones((2, 4)), np.ones((2, 4)), cache)
    assert np.isfinite(h1).all() and np.isfinite(c1).all()
    assert all(np.isfinite(g).all() for g in grads)


def test_lstm_cell_state_passes_unchanged_when_forget_is_one_and_input_is_zero():
    """The additive cell path (the lecture's point): f = 1, i = 0 carries c and dc through."""
    I, H, T, B = 3, 5, 200, 2
    w = _cell_weights(I, H, 4, True)
    w["w_ih"][:2 * H] = 0.0  # i and f depend on the biases only
    w["w_hh"][:2 * H] = 0.0
    w["b_ih"][:H], w["b_hh"][:H] = -50.0, 0.0     # i = sigmoid(-50) ~ 2e-22
    w["b_ih"][H:2 * H], w["b_hh"][H:2 * H] = 50.0, 0.0  # f = sigmoid(50) == 1.0 in float64
    c0 = randn(B, H).numpy()
    h, c, caches = randn(B, H).numpy(), c0, []
    for _ in range(T):
        h, c, cache = ref.lstm_cell(randn(B, I).numpy(), h, c, **w)
        caches.append(cache)
    np.testing.assert_allclose(c, c0, rtol=1e-15, atol=1e-18)
    # Gradient of c_T alone flows back to c_0 unchanged (constant error carousel).
    dc = randn(B, H).numpy()
    dc_T = dc.copy()
    for cache in reversed(caches):
        _, _, dc, *_ = ref.lstm_cell_backward(None, dc, cache)
    np.testing.assert_allclose(dc, dc_T, rtol=1e-15, atol=0)


# ====================================================================================== full LSTM

def _check_lstm(T, B, I, H, num_layers, bidirectional, batch_first, with_state, bias=True,
                unbatched=False, grads=("out", "hn", "cn"), proj=0):
    D = 2 if bidirectional else 1
    mod = torch.nn.LSTM(I, H, num_layers, bias=bias, batch_first=batch_first,
                        bidirectional=bidirectional, proj_size=proj, dtype=F64)
    with torch.no_grad():  # not torch's U(-1/sqrt(H), 1/sqrt(H)): larger values test more
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.6)
    weights = {k: v.detach().numpy().copy() for k, v in mod.state_dict().items()}
    assert list(weights) == ref.lstm_weight_names(num_layers, bidirectional, bias, proj=proj > 0)
    lead = (num_layers * D,) if unbatched else (num_layers * D, B)
    if unbatched:
        x_shape = (T, I)
    else:
        x_shape = (B, T, I) if batch_first else (T, B, I)
    x = leaf(randn(*x_shape))
    h0, c0 = ((leaf(randn(*lead, proj or H)), leaf(randn(*lead, H))) if with_state
              else (None, None))
    out, (hn, cn) = mod(x, (h0, c0)) if with_state else mod(x)
    gout = randn(*out.shape) if "out" in grads else None
    ghn = randn(*hn.shape) if "hn" in grads else None
    gcn = randn(*cn.shape) if "cn" in grads else None
    loss = sum((a * g).sum() for a, g in ((out, gout), (hn, ghn), (cn, gcn)) if g is not None)
    loss.backward()

    r_out, (r_hn, r_cn), cache = ref.lstm(np_(x), np_(h0), np_(c0), weights, num_layers,
                                          bidirectional, batch_first, return_cache=True)
    r_out2, _ = ref.lstm(np_(x), np_(h0), np_(c0), weights, num_layers, bidirectional, batch_first)
    np.testing.assert_array_equal(r_out, r_out2)
    close(r_out, out.detach(), "output")
    close(r_hn, hn.detach(), "h_n")
    close(r_cn, cn.detach(), "c_n")
    dx, dh0, dc0, dw = ref.lstm_backward(np_(gout), np_(ghn), np_(gcn), cache)
    red = T * max(B, 1) * max(I, D * H)
    close(dx, x.grad, "dx", red)
    if with_state:
        close(dh0, h0.grad, "dh0", red)
        close(dc0, c0.grad, "dc0", red)
    else:
        assert dh0.shape == hn.shape and dc0.shape == cn.shape
    params = dict(mod.named_parameters())
    assert sorted(dw) == sorted(params)
    for name, p in params.items():
        close(dw[name], p.grad, f"d{name}", red)


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("with_state", [True, False], ids=["h0c0", "no_state"])
def test_lstm(num_layers, bidirectional, batch_first, with_state):
    _check_lstm(4, 3, 3, 5, num_layers, bidirectional, batch_first, with_state)


@pytest.mark.parametrize("T,B,I,H,num_layers,bidirectional", [
    (5, 1, 4, 7, 2, True),    # batch 1
    (1, 3, 2, 6, 2, True),    # sequence length 1
    (1, 1, 1, 1, 1, False),   # everything 1
    (6, 2, 5, 3, 3, False),   # three layers, input wider than hidden
])
def test_lstm_edge_shapes(T, B, I, H, num_layers, bidirectional):
    _check_lstm(T, B, I, H, num_layers, bidirectional, False, True)


@pytest.mark.parametrize("batch_first", [False, True])
def test_lstm_unbatched(batch_first):
    _check_lstm(4, 1, 3, 5, 2, True, batch_first, True, unbatched=True)


def test_lstm_without_bias():
    _check_lstm(4, 2, 3, 5, 2, True, True, True, bias=False)


@pytest.mark.parametrize("grads", [("out",), ("hn",), ("cn",)])
def test_lstm_backward_partial_grads(grads):
    """None for an output that receives no gradient."""
    _check_lstm(3, 2, 3, 4, 2, True, False, True, grads=grads)


# torch's CPU LSTM warns that oneDNN has no projections (torch's business, not the reference's)
_no_onednn_warning = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported")


@_no_onednn_warning
@pytest.mark.parametrize("num_layers,bidirectional,batch_first,with_state,bias,unbatched", [
    (1, False, False, True, True, False),
    (2, True, True, True, True, False),
    (2, True, False, False, False, False),   # zero state, no bias
    (2, False, False, True, True, True),     # unbatched
])
def test_lstm_proj(num_layers, bidirectional, batch_first, with_state, bias, unbatched):
    """proj_size: h_t = W_hr (o_t * tanh(c_t)) is P wide (output, h0, h_n, W_hh's columns)."""
    _check_lstm(3, 2, 3, 5, num_layers, bidirectional, batch_first, with_state, bias=bias,
                unbatched=unbatched, proj=3)


@_no_onednn_warning
@pytest.mark.parametrize("grads", [("out",), ("hn",), ("cn",)])
def test_lstm_proj_partial_grads(grads):
    _check_lstm(3, 2, 3, 4, 2, True, False, True, grads=grads, proj=2)


def test_lstm_comparison_catches_reverse_direction_bug():
    """Feeding the forward direction's weights to the reverse one must fail the comparison."""
    mod = torch.nn.LSTM(3, 4, 1, bidirectional=True, dtype=F64)
    weights = {k: v.detach().numpy() for k, v in mod.state_dict().items()}
    bad = dict(weights, weight_hh_l0_reverse=weights["weight_hh_l0"])
    x = randn(5, 2, 3)
    out, _ = mod(x)
    with pytest.raises(AssertionError):
        close(ref.lstm(x.numpy(), None, None, bad, 1, True)[0], out.detach(), "output")


# ======================================================================================= GRU cell

@pytest.mark.parametrize("B,I,H,bias,state", [(3, 4, 5, True, True), (1, 6, 3, True, False),
                                              (2, 5, 7, False, True), (0, 3, 5, True, True)])
def test_gru_cell(B, I, H, bias, state):
    unbatched = B == 0  # B = 0 stands for an unbatched (I,) input
    shape = (lambda n: (n,)) if unbatched else (lambda n: (B, n))
    w = _cell_weights(I, H, 3, bias)
    cell = torch.nn.GRUCell(I, H, bias=bias, dtype=F64)
    with torch.no_grad():
        cell.weight_ih.copy_(torch.from_numpy(w["w_ih"]))
        cell.weight_hh.copy_(torch.from_numpy(w["w_hh"]))
        if bias:
            cell.bias_ih.copy_(torch.from_numpy(w["b_ih"]))
            cell.bias_hh.copy_(torch.from_numpy(w["b_hh"]))
    x, h, dh1 = leaf(randn(*shape(I))), leaf(randn(*shape(H))), randn(*shape(H))
    h1 = cell(x, h) if state else cell(x)
    (h1 * dh1).sum().backward()
    r_h1, cache = ref.gru_cell(np_(x), np_(h) if state else None, w["w_ih"], w["w_hh"],
                               w.get("b_ih"), w.get("b_hh"))
    close(r_h1, h1.detach(), "h1")
    dx, dh, dw_ih, dw_hh, db_ih, db_hh = ref.gru_cell_backward(np_(dh1), cache)
    red = max(I, 3 * H, B)
    close(dx, x.grad, "dx", red)
    if state:
        close(dh, h.grad, "dh", red)
    close(dw_ih, cell.weight_ih.grad, "dw_ih", red)
    close(dw_hh, cell.weight_hh.grad, "dw_hh", red)
    if bias:
        close(db_ih, cell.bias_ih.grad, "db_ih", red)
        close(db_hh, cell.bias_hh.grad, "db_hh", red)
    else:
        assert db_ih is None and db_hh is None


def test_gru_cell_n_gate_bias_placement_matters():
    """b_hn sits inside r * (W_hn h + b_hn): moving it to b_in must change the result."""
    w = _cell_weights(4, 5, 3, True)
    x, h = randn(3, 4), randn(3, 5)
    cell = torch.nn.GRUCell(4, 5, dtype=F64)
    with torch.no_grad():
        for name, key in (("weight_ih", "w_ih"), ("weight_hh", "w_hh"), ("bias_ih", "b_ih"),
                          ("bias_hh", "b_hh")):
            getattr(cell, name).copy_(torch.from_numpy(w[key]))
        expected = cell(x, h)
    moved = dict(w, b_ih=w["b_ih"].copy(), b_hh=w["b_hh"].copy())
    moved["b_ih"][10:] += moved["b_hh"][10:]
    moved["b_hh"][10:] = 0.0
    close(ref.gru_cell(x.numpy(), h.numpy(), **w)[0], expected, "h1")
    with pytest.raises(AssertionError):
        close(ref.gru_cell(x.numpy(), h.numpy(), **moved)[0], expected, "h1")


# ======================================================================================= full GRU

@pytest.mark.parametrize("T,B,I,H,num_layers,bidirectional,batch_first,with_state,bias", [
    (4, 3, 3, 5, 2, True, True, True, True),
    (3, 2, 4, 6, 1, False, False, False, True),   # zero initial state
    (1, 1, 2, 3, 2, True, False, True, False),    # one step, batch 1, no bias
])
@pytest.mark.parametrize("unbatched", [False, True], ids=["batched", "unbatched"])
def test_gru(T, B, I, H, num_layers, bidirectional, batch_first, with_state, bias, unbatched):
    D = 2 if bidirectional else 1
    mod = torch.nn.GRU(I, H, num_layers, bias=bias, batch_first=batch_first,
                       bidirectional=bidirectional, dtype=F64)
    with torch.no_grad():
        for p in mod.parameters():
            p.copy_(torch.randn_like(p) * 0.6)
    weights = {k: v.detach().numpy().copy() for k, v in mod.state_dict().items()}
    if unbatched:
        x_shape, s_shape = (T, I), (num_layers * D, H)
    else:
        x_shape = (B, T, I) if batch_first else (T, B, I)
        s_shape = (num_layers * D, B, H)
    x = leaf(randn(*x_shape))
    h0 = leaf(randn(*s_shape)) if with_state else None
    out, hn = mod(x, h0)
    gout, ghn = randn(*out.shape), randn(*hn.shape)
    ((out * gout).sum() + (hn * ghn).sum()).backward()
    r_out, r_hn, cache = ref.gru(np_(x), np_(h0), weights, num_layers, bidirectional, batch_first,
                                 return_cache=True)
    close(r_out, out.detach(), "output")
    close(r_hn, hn.detach(), "h_n")
    dx, dh0, dw = ref.gru_backward(np_(gout), np_(ghn), cache)
    red = T * max(B, 1) * max(I, D * H)
    close(dx, x.grad, "dx", red)
    if with_state:
        close(dh0, h0.grad, "dh0", red)
    params = dict(mod.named_parameters())
    assert sorted(dw) == sorted(params)
    for name, p in params.items():
        close(dw[name], p.grad, f"d{name}", red)


# ======================================================================== scaled dot-product attn

def _torch_sdpa(q, k, v, go, backend=None, **kw):
    q, k, v = leaf(q), leaf(k), leaf(v)
    if backend is None:
        out = F.scaled_dot_product_attention(q, k, v, **kw)
    else:
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, **kw)
    out.backward(go)
    return out.detach(), q.grad, k.grad, v.grad


def _check_sdpa(q_shape, k_shape, v_shape, backend=None, **kw):
    q, k, v = randn(*q_shape), randn(*k_shape), randn(*v_shape)
    out_shape = torch.broadcast_shapes(q_shape[:-2], k_shape[:-2]) if not kw.get("enable_gqa") \
        else q_shape[:-2]
    go = randn(*out_shape, q_shape[-2], v_shape[-1])
    t_out, t_dq, t_dk, t_dv = _torch_sdpa(q, k, v, go, backend, **kw)
    mask = kw.get("attn_mask")
    args = dict(attn_mask=np_(mask) if mask is not None else None,
                is_causal=kw.get("is_causal", False),
                scale=kw.get("scale"), enable_gqa=kw.get("enable_gqa", False))
    out, lse = ref.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy(), return_lse=True,
                                                **args)
    assert lse.shape == out.shape[:-1]
    dq, dk, dv = ref.scaled_dot_product_attention_backward(go.numpy(), q.numpy(), k.numpy(),
                                                           v.numpy(), **args)
    S, E, Ev = k_shape[-2], q_shape[-1], v_shape[-1]
    red = max(S, E, Ev) * (q_shape[-3] if len(q_shape) >= 3 else 1)
    close(out, t_out, "out", red)
    close(dq, t_dq, "dq", red)
    close(dk, t_dk, "dk", red * q_shape[-2])
    close(dv, t_dv, "dv", red * q_shape[-2])
    return out, lse, (dq, dk, dv)


@pytest.mark.parametrize("shapes", [
    ((2, 3, 7, 8), (2, 3, 7, 8), (2, 3, 7, 8)),      # odd length, self-attention
    ((2, 3, 5, 8), (2, 3, 9, 8), (2, 3, 9, 6)),      # Lq != Lk, Ev != E
    ((4, 11, 16), (4, 13, 16), (4, 13, 16)),         # 3-d (no head dim)
    ((7, 5), (3, 5), (3, 9)),                        # 2-d
    ((2, 2, 3, 24), (2, 2, 5, 24), (2, 2, 5, 24)),   # head dim 24
    ((1, 2, 4, 80), (1, 2, 6, 80), (1, 2, 6, 80)),   # head dim 80
    ((2, 3, 5, 8), (1, 3, 6, 8), (1, 3, 6, 8)),      # k, v broadcast over the batch
], ids=str)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_sdpa(shapes, is_causal):
    _check_sdpa(*shapes, is_causal=is_causal)


@pytest.mark.parametrize("L,S", [(6, 3), (3, 7), (1, 5), (5, 1)])
def test_sdpa_causal_is_top_left_aligned(L, S):
    out, _, _ = _check_sdpa((2, 2, L, 8), (2, 2, S, 8), (2, 2, S, 8), is_causal=True)
    _check_sdpa((2, 2, L, 8), (2, 2, S, 8), (2, 2, S, 8), backend=SDPBackend.MATH, is_causal=True)
    # Query 0 sees key 0 only, whatever L and S are.
    q, k, v = randn(1, L, 4).numpy(), randn(1, S, 4).numpy(), randn(1, S, 4).numpy()
    np.testing.assert_allclose(ref.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0],
                               v[0, 0], rtol=1e-15)


@pytest.mark.parametrize("mask_shape", ["LS", "11LS", "B1LS", "BHLS", "1HLS", "L1"], ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_sdpa_masks(mask_shape, kind):
    B, H, L, S, E = 2, 3, 5, 7, 8
    dims = dict(B=B, H=H, L=L, S=S, **{"1": 1})
    shape = tuple(dims[c] for c in mask_shape)
    if kind == "bool":
        mask = torch.rand(shape) < 0.7
        mask[..., 0] = True  # no fully masked row here (see test_sdpa_fully_masked_row)
    else:
        mask = randn(*shape) * 2
        mask = mask.masked_fill(torch.rand(shape) < 0.2, float("-inf"))
        mask[..., 0] = 0.0
    _check_sdpa((B, H, L, E), (B, H, S, E), (B, H, S, E), attn_mask=mask)


def test_sdpa_bool_mask_equals_its_additive_form():
    q, k, v = randn(2, 4, 6).numpy(), randn(2, 5, 6).numpy(), randn(2, 5, 3).numpy()
    mask = np.random.default_rng(0).random((4, 5)) < 0.6
    mask[:, 0] = True
    additive = np.where(mask, 0.0, -np.inf)
    np.testing.assert_array_equal(ref.scaled_dot_product_attention(q, k, v, mask),
                                  ref.scaled_dot_product_attention(q, k, v, additive))


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5])
def test_sdpa_custom_scale(scale):
    _check_sdpa((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), scale=scale)
    _check_sdpa((2, 2, 5, 8), (2, 2, 6, 8), (2, 2, 6, 8), scale=scale, is_causal=True)


@pytest.mark.parametrize("hq,hkv", [(6, 2), (4, 1), (3, 3), (8, 4)])
@pytest.mark.parametrize("variant", ["plain", "causal", "mask"])
def test_sdpa_gqa(hq, hkv, variant):
    B, L, S, E = 2, 5, 7, 8
    kw = dict(enable_gqa=True)
    if variant == "causal":
        kw["is_causal"] = True
    elif variant == "mask":
        kw["attn_mask"] = torch.rand(B, hq, L, S) < 0.7
        kw["attn_mask"][..., 0] = True
    _, _, (dq, dk, dv) = _check_sdpa((B, hq, L, E), (B, hkv, S, E), (B, hkv, S, 6), **kw)
    assert dk.shape == (B, hkv, S, E) and dv.shape == (B, hkv, S, 6)


def test_sdpa_gqa_head_mapping():
    """Query head h reads kv head h // (Hq // Hkv): equal to repeating each kv head in place."""
    q, k, v = randn(1, 6, 3, 4).numpy(), randn(1, 2, 5, 4).numpy(), randn(1, 2, 5, 4).numpy()
    got = ref.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for h in range(6):
        np.testing.assert_allclose(
            got[0, h], ref.scaled_dot_product_attention(q[0, h], k[0, h // 3], v[0, h // 3]),
            rtol=1e-14)
    with pytest.raises(ValueError):
        ref.scaled_dot_product_attention(q[:, :5], k, v, enable_gqa=True)


@pytest.mark.parametrize("backend", [SDPBackend.MATH, None], ids=["math", "default"])
@pytest.mark.parametrize("kind", ["bool", "float", "causal_and_float"])
def test_sdpa_fully_masked_row(backend, kind):
    """torch (CPU, math and default) gives zeros, and zero gradients, for a fully masked row."""
    B, H, L, S, E = 2, 2, 4, 5, 8
    if kind == "bool":
        mask = torch.ones(L, S, dtype=torch.bool)
        mask[1] = False
    else:
        mask = torch.zeros(B, 1, L, S, dtype=F64)
        mask[0, :, 2] = float("-inf")
        if kind == "causal_and_float":  # a causal mask expressed additively, plus a dead row
            mask = mask + torch.zeros(L, S, dtype=F64).masked_fill(
                ~torch.ones(L, S, dtype=torch.bool).tril(), float("-inf"))
    out, lse, (dq, _, _) = _check_sdpa((B, H, L, E), (B, H, S, E), (B, H, S, E), backend=backend,
                                       attn_mask=mask)
    row = 1 if kind == "bool" else 2
    batch = slice(None) if kind == "bool" else 0
    assert (out[batch, :, row] == 0).all() and (dq[batch, :, row] == 0).all()
    assert np.isneginf(lse[batch, :, row]).all()
    assert np.isfinite(out).all()
    dead = np.zeros(lse.shape, bool)
    dead[batch, :, row] = True
    assert (np.isneginf(lse) == dead).all()


def test_sdpa_lse_matches_scores():
    q, k, v = randn(2, 5, 8).numpy(), randn(2, 7, 8).numpy(), randn(2, 7, 3).numpy()
    out, lse = ref.scaled_dot_product_attention(q, k, v, is_causal=True, return_lse=True)
    s = q @ k.transpose(0, 2, 1) / math.sqrt(8) + np.where(np.tril(np.ones((5, 7))) > 0, 0, -np.inf)
    close(lse, torch.logsumexp(torch.from_numpy(s), -1), "lse")
    close(np.exp(s - lse[..., None]) @ v, out, "out from lse", 7)


def test_sdpa_lecture_fixture_scale():
    """d_model 512 split into 8 heads of 64: the default scale is 1/sqrt(64) = 1/8."""
    d_model, heads = 512, 8
    E = d_model // heads
    assert E == 64 and 1 / math.sqrt(E) == 0.125
    B, L = 1, 5
    x = randn(B, L, d_model)
    q = x.view(B, L, heads, E).transpose(1, 2)  # (B, heads, L, 64)
    k, v = randn(B, heads, L, E), randn(B, heads, L, E)
    default = ref.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy())
    np.testing.assert_array_equal(
        default, ref.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy(), scale=0.125))
    manual = ref.softmax(q.numpy() @ k.numpy().swapaxes(-1, -2) / 8.0) @ v.numpy()
    close(default, manual, "out", 64)
    close(default, F.scaled_dot_product_attention(q, k, v), "out vs torch", 64)
    # A wrong scale (1/sqrt(d_model), or 1/64) is detected.
    for wrong in (1 / math.sqrt(d_model), 1 / 64):
        with pytest.raises(AssertionError):
            close(ref.scaled_dot_product_attention(q.numpy(), k.numpy(), v.numpy(), scale=wrong),
                  manual, "out")


def test_sdpa_errors():
    q = np.zeros((2, 3, 4))
    with pytest.raises(ValueError):
        ref.scaled_dot_product_attention(q, q, q, attn_mask=np.ones((3, 3), bool), is_causal=True)
    with pytest.raises(NotImplementedError):
        ref.scaled_dot_product_attention(q, q, q, dropout_p=0.1)


@settings(max_examples=25, deadline=None)
@given(batch=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       L=st.integers(1, 9), S=st.integers(1, 9), E=st.integers(1, 12), Ev=st.integers(1, 12),
       groups=st.sampled_from([1, 2, 3]), hkv=st.integers(1, 2),
       mode=st.sampled_from(["none", "causal", "bool", "float"]),
       scale=st.one_of(st.none(), st.floats(0.05, 3.0)))
def test_sdpa_fuzz(batch, L, S, E, Ev, groups, hkv, mode, scale):
    heads_q = hkv * groups
    gqa = groups > 1
    prefix_q, prefix_kv = tuple(batch) + (heads_q,), tuple(batch) + (hkv if gqa else heads_q,)
    kw = dict(scale=scale, enable_gqa=gqa)
    if mode == "causal":
        kw["is_causal"] = True
    elif mode in ("bool", "float"):
        mshape = (L, S) if len(batch) == 0 else (batch[0],) + (1,) * len(batch[1:]) + (1, L, S)
        keep = torch.rand(mshape) < 0.6  # may leave rows fully masked: torch gives 0 there
        kw["attn_mask"] = keep if mode == "bool" else \
            torch.randn(mshape, dtype=F64).masked_fill(~keep, float("-inf"))
    _check_sdpa(prefix_q + (L, E), prefix_kv + (S, E), prefix_kv + (S, Ev), **kw)
