"""float64 references for the LSTM and the GRU (cells and full multi-layer, bidirectional
layers), forward and backward, written from the math (never by calling torch).

Layout and gate order are PyTorch's: the four LSTM gates are stacked as rows [i; f; g; o] of
w_ih (4H, I) and w_hh (4H, H), the three GRU gates as [r; z; n] of (3H, I) and (3H, H).

LSTM cell, for a batch of rows x (B, I), h (B, H), c (B, H):
    a = x W_ih^T + b_ih + h W_hh^T + b_hh                      (B, 4H), split as [a_i a_f a_g a_o]
    i = sigma(a_i)   f = sigma(a_f)   g = tanh(a_g)   o = sigma(a_o)
    c' = f * c + i * g
    h' = o * tanh(c')
Backward, given dh' and dc' (the gradient reaching c' from the next step):
    dc'_tot = dc' + dh' * o * (1 - tanh(c')^2)
    da_i = dc'_tot * g * i (1 - i)     da_f = dc'_tot * c * f (1 - f)
    da_g = dc'_tot * i * (1 - g^2)     da_o = dh' * tanh(c') * o (1 - o)
    dx = da W_ih   dh = da W_hh   dc = dc'_tot * f
    dW_ih = da^T x   dW_hh = da^T h   db_ih = db_hh = sum_rows(da)
The path dc = f * dc'_tot is the "constant error carousel": with f = 1 and i = 0 the cell state,
and its gradient, pass through any number of steps unchanged.

Full LSTM (torch.nn.LSTM, no dropout): layer l, direction d (0 forward, 1 reverse)
runs the cell over time (reverse: from t = T-1 down to 0) starting from h0[l*D + d], c0[l*D + d];
the layer's output at time t is the concatenation over directions of h_t (T, B, D*H), which is
the input of layer l+1. h_n / c_n hold each (layer, direction)'s final state at index l*D + d.
Backward is backpropagation through time: walk each direction's steps in the reverse of the
order they ran, adding the output gradient of step t to the recurrent dh.

With projections (proj_size P, weights weight_hr (P, H) per layer and direction): the cell's
h' is m = o * tanh(c') and the step's output and recurrent state is h = m W_hr^T (P wide),
so w_hh is (4H, P), h0 / h_n are (L*D, B, P), the output (T, B, D*P); c stays H wide.
Backward: dm = dh W_hr enters the cell's backward as its dh', and dW_hr = sum_t dh_t^T m_t.

GRU cell (torch.nn.GRUCell):
    gi = x W_ih^T + b_ih = [gi_r gi_z gi_n]      gh = h W_hh^T + b_hh = [gh_r gh_z gh_n]
    r = sigma(gi_r + gh_r)   z = sigma(gi_z + gh_z)   n = tanh(gi_n + r * gh_n)
    h' = (1 - z) * n + z * h
Note b_hn sits inside r * (...), so b_ih and b_hh are not interchangeable for the n gate.
Backward, given dh':
    da_n = dh' (1 - z) (1 - n^2)   da_r = da_n gh_n r (1 - r)   da_z = dh' (h - n) z (1 - z)
    dgi = [da_r da_z da_n]         dgh = [da_r da_z da_n * r]
    dx = dgi W_ih   dh = dgh W_hh + dh' z   dW_ih = dgi^T x   dW_hh = dgh^T h

Full GRU (torch.nn.GRU): the LSTM's stack (layers, directions, BPTT) over the GRU cell, with
h the only state; W_ih and b_ih collect dgi, W_hh and b_hh collect dgh.

Array-module generic (see _xp.py): given CuPy arrays (inputs, states, weights; for the backward
functions the incoming gradients or the forward's cache), the same code runs on the GPU and
returns CuPy arrays.
"""
from __future__ import annotations

from ._xp import array_module, f64


def sigmoid(x):
    """1 / (1 + exp(-x)) without overflow: exp is only ever taken of -|x|."""
    xp = array_module(x)
    x = f64(xp, x)
    e = xp.exp(-xp.abs(x))
    return xp.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _rows(xp, a, width: int | None, name: str):
    a = f64(xp, a)
    if a.ndim != 2 or (width is not None and a.shape[1] != width):
        raise ValueError(f"{name}: expected (batch, {width}), got shape {a.shape}")
    return a


def _cell_inputs(xp, x, states, w_ih, w_hh, gates: int):
    """Batch the inputs of a cell: unbatched (I,) vectors become one row; None states are zeros."""
    if w_ih is None or w_hh is None:
        raise ValueError("w_ih and w_hh are required")
    w_ih, w_hh = f64(xp, w_ih), f64(xp, w_hh)
    H = w_hh.shape[1]
    if w_hh.shape != (gates * H, H) or w_ih.ndim != 2 or w_ih.shape[0] != gates * H:
        raise ValueError(f"weights: expected w_ih ({gates}H, I) and w_hh ({gates}H, H), got "
                         f"{w_ih.shape} and {w_hh.shape}")
    x = f64(xp, x)
    unbatched = x.ndim == 1
    x = _rows(xp, x[None] if unbatched else x, w_ih.shape[1], "x")
    out = []
    for s, name in zip(states, ("h", "c")):
        if s is None:
            out.append(xp.zeros((x.shape[0], H)))
        else:
            s = f64(xp, s)
            out.append(_rows(xp, s[None] if unbatched else s, H, name))
    return x, out, w_ih, w_hh, unbatched


def _bias(xp, b, n: int):
    return xp.zeros(n) if b is None else f64(xp, b).reshape(n)


# ----------------------------------------------------------------------------------- LSTM cell

def lstm_cell(x, h=None, c=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None):
    """One LSTM step (torch.nn.LSTMCell). x (B, I) or (I,); h, c (B, H) or (H,), None = zeros.

    Returns (h1, c1, cache); cache feeds lstm_cell_backward.
    """
    xp = array_module(x, h, c, w_ih, w_hh, b_ih, b_hh)
    x, (h, c), w_ih, w_hh, unbatched = _cell_inputs(xp, x, (h, c), w_ih, w_hh, 4)
    return _lstm_cell_rows(xp, x, h, c, w_ih, w_hh, b_ih, b_hh, unbatched)


def _lstm_cell_rows(xp, x, h, c, w_ih, w_hh, b_ih, b_hh, unbatched=False):
    """lstm_cell on checked float64 rows; h may be narrower than c (P columns, w_hh (4H, P):
    the recurrent input of an LSTM with projections)."""
    H = w_ih.shape[0] // 4
    a = x @ w_ih.T + _bias(xp, b_ih, 4 * H) + h @ w_hh.T + _bias(xp, b_hh, 4 * H)
    i, f, o = sigmoid(a[:, :H]), sigmoid(a[:, H:2 * H]), sigmoid(a[:, 3 * H:])
    g = xp.tanh(a[:, 2 * H:3 * H])
    c1 = f * c + i * g
    tc1 = xp.tanh(c1)
    h1 = o * tc1
    cache = dict(x=x, h=h, c=c, w_ih=w_ih, w_hh=w_hh, i=i, f=f, g=g, o=o, tc1=tc1,
                 bias=(b_ih is not None, b_hh is not None), unbatched=unbatched)
    if unbatched:
        return h1[0], c1[0], cache
    return h1, c1, cache


def _lstm_gate_grads(xp, dh1, dc1, cache):
    """(da, dc): gradient of the pre-activations (B, 4H) and of the previous cell state."""
    i, f, g, o, tc1 = (cache[k] for k in ("i", "f", "g", "o", "tc1"))
    dc_tot = dc1 + dh1 * o * (1.0 - tc1 * tc1)
    da = xp.concatenate([dc_tot * g * i * (1.0 - i),
                         dc_tot * cache["c"] * f * (1.0 - f),
                         dc_tot * i * (1.0 - g * g),
                         dh1 * tc1 * o * (1.0 - o)], axis=1)
    return da, dc_tot * f


def _state_grad(xp, d, like, unbatched):
    if d is None:
        return xp.zeros_like(like)
    d = f64(xp, d)
    return xp.broadcast_to(d[None] if unbatched else d, like.shape)


def lstm_cell_backward(dh1, dc1, cache):
    """Gradients of one LSTM step: (dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh).

    dh1 / dc1 may be None (no gradient reaches that output). db_* are None where the forward
    had no such bias.
    """
    xp = array_module(dh1, dc1, cache["x"])
    u = cache["unbatched"]
    dh1 = _state_grad(xp, dh1, cache["h"], u)
    dc1 = _state_grad(xp, dc1, cache["c"], u)
    da, dc = _lstm_gate_grads(xp, dh1, dc1, cache)
    dx, dh = da @ cache["w_ih"], da @ cache["w_hh"]
    dw_ih, dw_hh = da.T @ cache["x"], da.T @ cache["h"]
    db = da.sum(axis=0)
    db_ih = db if cache["bias"][0] else None
    db_hh = db.copy() if cache["bias"][1] else None
    if u:
        dx, dh, dc = dx[0], dh[0], dc[0]
    return dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh


# ------------------------------------------------------------------------------------ GRU cell

def gru_cell(x, h=None, w_ih=None, w_hh=None, b_ih=None, b_hh=None):
    """One GRU step (torch.nn.GRUCell). x (B, I) or (I,); h (B, H) or (H,), None = zeros.

    Returns (h1, cache); cache feeds gru_cell_backward.
    """
    xp = array_module(x, h, w_ih, w_hh, b_ih, b_hh)
    x, (h,), w_ih, w_hh, unbatched = _cell_inputs(xp, x, (h,), w_ih, w_hh, 3)
    H = w_hh.shape[1]
    gi = x @ w_ih.T + _bias(xp, b_ih, 3 * H)
    gh = h @ w_hh.T + _bias(xp, b_hh, 3 * H)
    r = sigmoid(gi[:, :H] + gh[:, :H])
    z = sigmoid(gi[:, H:2 * H] + gh[:, H:2 * H])
    ghn = gh[:, 2 * H:]
    n = xp.tanh(gi[:, 2 * H:] + r * ghn)
    h1 = (1.0 - z) * n + z * h
    cache = dict(x=x, h=h, w_ih=w_ih, w_hh=w_hh, r=r, z=z, n=n, ghn=ghn,
                 bias=(b_ih is not None, b_hh is not None), unbatched=unbatched)
    return (h1[0] if unbatched else h1), cache


def _gru_gate_grads(xp, dh1, cache):
    """(dgi, dgh, dh_direct): gradients of the pre-activations of x W_ih^T + b_ih and of
    h W_hh^T + b_hh (B, 3H each), and the direct path of h' = ... + z * h into h."""
    r, z, n, ghn, h = (cache[k] for k in ("r", "z", "n", "ghn", "h"))
    dan = dh1 * (1.0 - z) * (1.0 - n * n)          # through tanh of the n pre-activation
    dar = dan * ghn * r * (1.0 - r)                # r multiplies W_hn h + b_hn
    daz = dh1 * (h - n) * z * (1.0 - z)
    dgi = xp.concatenate([dar, daz, dan], axis=1)
    dgh = xp.concatenate([dar, daz, dan * r], axis=1)
    return dgi, dgh, dh1 * z


def gru_cell_backward(dh1, cache):
    """Gradients of one GRU step: (dx, dh, dw_ih, dw_hh, db_ih, db_hh)."""
    xp = array_module(dh1, cache["x"])
    u = cache["unbatched"]
    dh1 = _state_grad(xp, dh1, cache["h"], u)
    dgi, dgh, dh_direct = _gru_gate_grads(xp, dh1, cache)
    dx = dgi @ cache["w_ih"]
    dh = dgh @ cache["w_hh"] + dh_direct
    dw_ih, dw_hh = dgi.T @ cache["x"], dgh.T @ cache["h"]
    db_ih = dgi.sum(axis=0) if cache["bias"][0] else None
    db_hh = dgh.sum(axis=0) if cache["bias"][1] else None
    if u:
        dx, dh = dx[0], dh[0]
    return dx, dh, dw_ih, dw_hh, db_ih, db_hh


# ---------------------------------------------------------------------------------- full LSTM

def lstm_weight_names(num_layers: int = 1, bidirectional: bool = False, bias: bool = True,
                      proj: bool = False):
    """torch.nn.LSTM's state_dict keys in its order: per layer, per direction, ih, hh, b_ih, b_hh
    (and hr with projections, proj=True)."""
    names = []
    for layer in range(num_layers):
        for suffix in ("", "_reverse")[:2 if bidirectional else 1]:
            kinds = (("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if bias else ())
                     + (("weight_hr",) if proj else ()))
            names += [f"{k}_l{layer}{suffix}" for k in kinds]
    return names


def _sequence_major(xp, x, batch_first: bool, what: str):
    """(T, B, F) view of a sequence input; unbatched (T, F) becomes (T, 1, F)."""
    x = f64(xp, x)
    if x.ndim == 2:
        return x[:, None, :], True
    if x.ndim != 3:
        raise ValueError(f"{what}: expected 2 or 3 dimensions, got shape {x.shape}")
    return (xp.swapaxes(x, 0, 1) if batch_first else x), False


# The stack is the same for both cells; a cell enters as its step forward and backward:
#   step(x_t, states, w) -> (h_t, new states, cache)
#   step_backward(xp, dh, d_other_states, cache, w)
#       -> (da_ih, da_hh, dh_prev, d_other_states_prev)
# where da_ih / da_hh are the gradients of the pre-activations of x W_ih^T + b_ih and of
# h W_hh^T + b_hh (the same array for the LSTM), and "other states" is (c,) for the LSTM.

def _lstm_step(x, states, w):
    xp = array_module(x)
    h, c, cache = _lstm_cell_rows(xp, x, states[0], states[1], w["weight_ih"], w["weight_hh"],
                                  w["bias_ih"], w["bias_hh"])
    if w["weight_hr"] is not None:   # projections: h = m W_hr^T
        cache["m"] = h
        h = h @ w["weight_hr"].T
    return h, (h, c), cache


def _lstm_step_backward(xp, dh, d_other, cache, w):
    dm = dh if w["weight_hr"] is None else dh @ w["weight_hr"]
    da, dc = _lstm_gate_grads(xp, dm, d_other[0], cache)
    return da, da, da @ w["weight_hh"], (dc,)


def _gru_step(x, states, w):
    h, cache = gru_cell(x, states[0], w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"])
    return h, (h,), cache


def _gru_step_backward(xp, dh, d_other, cache, w):
    dgi, dgh, dh_direct = _gru_gate_grads(xp, dh, cache)
    return dgi, dgh, dgh @ w["weight_hh"] + dh_direct, ()


def _state_sizes(weights, gates: int):
    """(h's width, c's width, ...) of a stack: (P, H) for an LSTM with projections (keys
    weight_hr_l*), (H, H) for one without, (H,) for the GRU (gates 3)."""
    if weights is None:
        raise ValueError("weights are required")
    H = weights["weight_ih_l0"].shape[0] // gates
    if gates == 3:
        return (H,)
    hr = weights.get("weight_hr_l0")
    return (H if hr is None else hr.shape[0], H)


def _rnn(step, x, states, weights, num_layers, bidirectional, batch_first, sizes):
    """The multi-layer, bidirectional stack over `step`. states: the initial states (h0[, c0])
    as given (None = zeros), sizes their widths (h's is the output's). Returns (output, final
    states, cache) in the caller's layout."""
    xp = array_module(x, *states, *weights.values())
    D = 2 if bidirectional else 1
    xs, unbatched = _sequence_major(xp, x, batch_first, "x")
    T, B = xs.shape[:2]
    H = sizes[0]    # the width of h: the output's per direction
    init = []
    for s, n in zip(states, sizes):
        if s is None:
            init.append(xp.zeros((num_layers * D, B, n)))
        else:
            s = f64(xp, s)
            s = s[:, None, :] if unbatched else s
            if s.shape != (num_layers * D, B, n):
                raise ValueError(f"initial state: expected {(num_layers * D, B, n)}, got {s.shape}")
            init.append(s)
    final = [xp.empty_like(s) for s in init]
    layers = []
    inp = xs
    for layer in range(num_layers):
        out = xp.empty((T, B, D * H))
        dirs = []
        for d in range(D):
            sfx = f"_l{layer}" + ("_reverse" if d else "")
            w = {k: (None if weights.get(k + sfx) is None else f64(xp, weights[k + sfx]))
                 for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")}
            if w["weight_ih"].shape[1] != inp.shape[2]:
                raise ValueError(f"weight_ih{sfx}: input size {w['weight_ih'].shape[1]} != "
                                 f"{inp.shape[2]}")
            if w["weight_hh"].shape[1] != H or (
                    w["weight_hr"] is not None and w["weight_hr"].shape != (H, sizes[-1])):
                raise ValueError(f"weight_hh{sfx} {w['weight_hh'].shape} / weight_hr{sfx}: "
                                 f"expected h {H} wide (the cell {sizes[-1]})")
            st = tuple(s[layer * D + d] for s in init)
            steps = []
            for t in (range(T - 1, -1, -1) if d else range(T)):
                h, st, cache = step(inp[t], st, w)
                out[t, :, d * H:(d + 1) * H] = h
                steps.append((t, cache))
            for f, s in zip(final, st):
                f[layer * D + d] = s
            dirs.append((sfx, w, steps))
        layers.append(dirs)
        inp = out
    cache = dict(layers=layers, T=T, B=B, H=H, D=D, num_layers=num_layers, sizes=sizes,
                 in_size=xs.shape[2], batch_first=batch_first, unbatched=unbatched)
    if unbatched:
        out, final = out[:, 0], [f[:, 0] for f in final]
    elif batch_first:
        out = xp.swapaxes(out, 0, 1)
    return out, final, cache


def _rnn_backward(step_backward, grad_output, grad_states, cache):
    """Backpropagation through time for `_rnn`: (dx, d initial states, dweights)."""
    T, B, H, D, L = (cache[k] for k in ("T", "B", "H", "D", "num_layers"))
    u = cache["unbatched"]
    xp = array_module(grad_output, *grad_states, cache["layers"][0][0][1]["weight_hh"])

    def seq(g, width):
        if g is None:
            return xp.zeros((T, B, width))
        g = f64(xp, g)
        if u:
            return g[:, None, :]
        return xp.swapaxes(g, 0, 1) if cache["batch_first"] else g

    def state(g, n):
        if g is None:
            return xp.zeros((L * D, B, n))
        g = f64(xp, g)
        return g[:, None, :] if u else g

    sizes = cache["sizes"]
    d_out = seq(grad_output, D * H)
    g_final = [state(g, n) for g, n in zip(grad_states, sizes)]
    d_init = [xp.zeros((L * D, B, n)) for n in sizes]
    dweights = {}
    for layer in range(L - 1, -1, -1):
        dirs = cache["layers"][layer]
        in_size = dirs[0][1]["weight_ih"].shape[1]
        d_in = xp.zeros((T, B, in_size))
        for d, (sfx, w, steps) in enumerate(dirs):
            dh = g_final[0][layer * D + d].copy()
            d_other = tuple(g[layer * D + d].copy() for g in g_final[1:])
            G = w["weight_hh"].shape[0]
            da_ih, da_hh = xp.empty((T, B, G)), xp.empty((T, B, G))
            x_all, h_all = xp.empty((T, B, in_size)), xp.empty((T, B, H))
            hr = w.get("weight_hr") is not None
            if hr:  # the whole gradient of each h_t and the unprojected m_t, for dW_hr
                dh_all, m_all = xp.empty((T, B, H)), xp.empty((T, B, sizes[-1]))
            for t, step in reversed(steps):  # reverse of the order the steps ran
                dh = dh + d_out[t, :, d * H:(d + 1) * H]
                if hr:
                    dh_all[t], m_all[t] = dh, step["m"]
                da_ih[t], da_hh[t], dh, d_other = step_backward(xp, dh, d_other, step, w)
                x_all[t], h_all[t] = step["x"], step["h"]
            d_in += da_ih @ w["weight_ih"]
            # Weight gradients summed over all steps and rows at once.
            dweights["weight_ih" + sfx] = xp.einsum("tbg,tbi->gi", da_ih, x_all)
            dweights["weight_hh" + sfx] = xp.einsum("tbg,tbh->gh", da_hh, h_all)
            if w["bias_ih"] is not None:
                dweights["bias_ih" + sfx] = da_ih.sum(axis=(0, 1))
            if w["bias_hh"] is not None:
                dweights["bias_hh" + sfx] = da_hh.sum(axis=(0, 1))
            if hr:
                dweights["weight_hr" + sfx] = xp.einsum("tbp,tbh->ph", dh_all, m_all)
            for g, v in zip(d_init, (dh,) + d_other):
                g[layer * D + d] = v
        d_out = d_in
    dx = d_out
    if u:
        return dx[:, 0], [g[:, 0] for g in d_init], dweights
    if cache["batch_first"]:
        dx = xp.swapaxes(dx, 0, 1)
    return dx, d_init, dweights


def lstm(x, h0=None, c0=None, weights=None, num_layers: int = 1, bidirectional: bool = False,
         batch_first: bool = False, *, return_cache: bool = False):
    """torch.nn.LSTM forward. x (T, B, I), (B, T, I) if batch_first, or unbatched (T, I);
    h0, c0 (L*D, B, H) or (L*D, H), None = zeros; weights keyed by torch's state_dict names
    (a layer without bias_* keys has no bias, like bias=False; weight_hr_* keys (P, H) make
    it an LSTM with projections, h0 then (L*D, B, P)).

    Returns (output, (h_n, c_n)) shaped like torch's: output (T, B, D*H) ((B, T, D*H) if
    batch_first, (T, D*H) unbatched; D*P with projections), h_n / c_n like h0 / c0. With
    return_cache=True a third item, the cache that lstm_backward needs.
    """
    out, (h_n, c_n), cache = _rnn(_lstm_step, x, (h0, c0), weights, num_layers, bidirectional,
                                  batch_first, _state_sizes(weights, 4))
    return (out, (h_n, c_n), cache) if return_cache else (out, (h_n, c_n))


def lstm_backward(grad_output, grad_hn, grad_cn, cache):
    """Backpropagation through time for `lstm`. Any of the three incoming gradients may be None.

    Returns (dx, dh0, dc0, dweights): dx shaped like the input, dh0 / dc0 like the initial
    states (the gradient w.r.t. the zero state when none was given), dweights keyed like
    `weights` (only the keys the forward used).
    """
    dx, (dh0, dc0), dweights = _rnn_backward(_lstm_step_backward, grad_output,
                                             (grad_hn, grad_cn), cache)
    return dx, dh0, dc0, dweights


# ----------------------------------------------------------------------------------- full GRU

def gru(x, h0=None, weights=None, num_layers: int = 1, bidirectional: bool = False,
        batch_first: bool = False, *, return_cache: bool = False):
    """torch.nn.GRU forward: as `lstm` without the cell state. Returns (output, h_n), plus
    the cache gru_backward needs with return_cache=True."""
    out, (h_n,), cache = _rnn(_gru_step, x, (h0,), weights, num_layers, bidirectional,
                              batch_first, _state_sizes(weights, 3))
    return (out, h_n, cache) if return_cache else (out, h_n)


def gru_backward(grad_output, grad_hn, cache):
    """Backpropagation through time for `gru`: (dx, dh0, dweights); either incoming gradient
    may be None."""
    dx, (dh0,), dweights = _rnn_backward(_gru_step_backward, grad_output, (grad_hn,), cache)
    return dx, dh0, dweights
