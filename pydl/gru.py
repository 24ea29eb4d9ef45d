"""GRU: the fused cell (torch.nn.GRUCell) and the multi-layer, bidirectional layer
(torch.nn.GRU), forward and backward through time. Argument checks, autograd Functions,
kernel launches.

Kernels: kernels/{triton,numba}/gru.py (the fused step forward; the backward step, whose
prologue is the recurrent GEMM dh = dgh_next W_hh); the GEMMs, bias column sums and
dropout's product are the LSTM's (pydl/lstm.py launchers), and so is the whole layer
machinery: the GRU layer is pydl/lstm.py's RNNFunction with GRURecurrence as its cell.

The cell, forward in ONE kernel (both products, the gates and the update), saving r, z, n and
gh_n in fp32 (4H floats a row); backward: one elementwise kernel for the pre-activation
gradients dgi, dgh (B, 3H) and the direct path dh1 * z, then dx = dgi W_ih,
dh = dgh W_hh + dh1 z (the direct part enters as the GEMM's addend), dW_ih = dgi^T x,
dW_hh = dgh^T h, db_ih / db_hh = column sums of dgi / dgh.

The layer, per layer and direction: gi = X W_ih^T + b_ih for ALL time steps (one GEMM,
(T, B, 3H) fp32), then one fused step kernel per time step (h_{t-1} W_hh^T + b_hh, the gates,
the update; h_t written into the output). Backward through time: one fused kernel per step
in reverse run order, dh_t = dgh_{t+1} W_hh + dh_direct_{t+1} (+ the output gradient) as its
prologue, writing dgi_t and dgh_t (fp32, T * B * 6H floats a direction, as the two products'
gradients differ in the n gate); then dW_ih = dgi^T X, dW_hh = dgh^T H_prev summed over every
(t, b) row, dX = dgi W_ih, and the two bias column sums. With recompute=True the forward keeps
no r, z, n, gh_n: the backward recomputes them from the saved outputs (every step's starting
state), all steps in one launch.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _env
from ._checks import check_tensor
from ._library import autocast_inputs, kernel_op
from ._launch import cdiv, input_precision, new_output, numba_array
from ._tune import aliased
from .backends import dispatch, register
from .lstm import (_NUMBA_SIM_STEP_TILE, _NUMBA_STEP_TILE, _cell_grads_fake, _cell_need,
                   _check_cell_state, _check_cell_weights, _mm, _or_empty, _numba_launch, _NumbaLSTM, _run_order, _seq_rows,
                   _steps_after_first, _strides, _TritonLSTM, layer_impl, layer_output,
                   prepare_layer, step_config)

F32 = torch.float32


class _TritonGRU(_TritonLSTM):
    """The LSTM launcher (GEMMs, bias sums, dropout's product) plus the GRU step kernels."""

    @classmethod
    def gru_step_fwd(cls, x, w_ih, xp, b_ih, h, w_hh, b_hh, h1, hn, ws) -> None:
        """One fused step (see kernels/triton/gru.py); x/w_ih (the cell) or xp (a layer's
        step), the biases, h and hn may be None."""
        from .kernels.triton import gru as k
        B, H = h1.shape
        I = x.shape[1] if x is not None else 0
        d = h1
        flags = dict(HAS_X=x is not None, HAS_XP=xp is not None, HAS_BIH=b_ih is not None,
                     HAS_BHH=b_hh is not None, HAS_H=h is not None, WRITE_HN=hn is not None,
                     INPUT_PRECISION=input_precision(h1.dtype, cudnn=cls.CUDNN_TF32))

        def launch(cfg):
            k.gru_step_fwd[(cdiv(B, cfg["BLOCK_B"]), cdiv(H, cfg["BLOCK_H"]))](
                x if x is not None else d, w_ih if w_ih is not None else d,
                xp if xp is not None else d, b_ih if b_ih is not None else d,
                h if h is not None else d, w_hh, b_hh if b_hh is not None else d, h1,
                hn if hn is not None else d, ws, B, I, H,
                *_strides(x, 2), *_strides(w_ih, 2), *_strides(xp, 2), *_strides(h, 2),
                *w_hh.stride(), *h1.stride(), *_strides(hn, 2), *ws.stride(), **flags, **cfg)

        launch(step_config("gru_step_fwd", B, H, max(I, H), h1.dtype, flags, launch,
                           aliased((h1, hn, ws), (x, xp, h))))

    @classmethod
    def gru_step_bwd(cls, ws, h, dg_next, w_hh, dh_a, dh_b, dhd, dgi, dgh, dhd_out) -> None:
        """One backward step: dh1 = dg_next W_hh + dh_a + dh_b + dhd, then the gate
        gradients; h, dg_next, dh_a, dh_b, dhd may be None; dhd_out may alias dhd."""
        from .kernels.triton import gru as k
        B, H = dhd_out.shape
        d = dhd_out
        flags = dict(HAS_H=h is not None, HAS_DGN=dg_next is not None, HAS_DHA=dh_a is not None,
                     HAS_DHB=dh_b is not None, HAS_DHD=dhd is not None,
                     INPUT_PRECISION=input_precision(F32, cudnn=cls.CUDNN_TF32))

        def launch(cfg):
            k.gru_step_bwd[(cdiv(B, cfg["BLOCK_B"]), cdiv(H, cfg["BLOCK_H"]))](
                ws, h if h is not None else d, dg_next if dg_next is not None else d, w_hh,
                dh_a if dh_a is not None else d, dh_b if dh_b is not None else d,
                dhd if dhd is not None else d, dgi, dgh, dhd_out, B, H,
                *ws.stride(), *_strides(h, 2), *_strides(dg_next, 2), *w_hh.stride(),
                *_strides(dh_a, 2), *_strides(dh_b, 2), *_strides(dhd, 2), *dgi.stride(),
                *dgh.stride(), *dhd_out.stride(), **flags, **cfg)

        launch(step_config("gru_step_bwd", B, H, 3 * H, F32, flags, launch,
                           aliased((dgi, dgh, dhd_out), (ws, h, dg_next, dh_a, dh_b, dhd))))


class _NumbaGRU(_NumbaLSTM):
    """Same methods as _TritonGRU, on the Numba kernels."""

    @staticmethod
    def gru_step_fwd(x, w_ih, xp, b_ih, h, w_hh, b_hh, h1, hn, ws) -> None:
        from .kernels.numba import gru as k
        B, H = h1.shape
        tb, tu, tk = _NUMBA_SIM_STEP_TILE if _env.INTERPRET else _NUMBA_STEP_TILE
        blocks = 1 if _env.INTERPRET else cdiv(B, tb) * cdiv(H, tu)
        d2, d1 = h1, ws.reshape(-1)  # placeholders of the right rank, never read

        def a2(t):
            return numba_array(t if t is not None else d2)

        def a1(t):
            return numba_array(t if t is not None else d1)

        def cd(t):
            return k.dtype_code(t.dtype) if t is not None else 0

        _numba_launch(
            k.gru_step_kernel(tb, tu, tk), blocks, (tu, tb), h1.device,
            a2(x), a2(w_ih), a2(xp), a1(b_ih), a2(h), numba_array(w_hh), a1(b_hh),
            numba_array(h1), a2(hn), numba_array(ws),
            x is not None, xp is not None, b_ih is not None, b_hh is not None, h is not None,
            hn is not None, k.dtype_code(w_hh.dtype), cd(xp), k.dtype_code(h1.dtype), cd(hn))

    @staticmethod
    def gru_step_bwd(ws, h, dg_next, w_hh, dh_a, dh_b, dhd, dgi, dgh, dhd_out) -> None:
        from .kernels.numba import gru as k
        B, H = dhd_out.shape
        tb, tu, tk = _NUMBA_SIM_STEP_TILE if _env.INTERPRET else _NUMBA_STEP_TILE
        blocks = 1 if _env.INTERPRET else cdiv(B, tb) * cdiv(H, tu)

        def a2(t):
            return numba_array(t if t is not None else dhd_out)

        def cd(t):
            return k.dtype_code(t.dtype) if t is not None else 0

        _numba_launch(
            k.gru_step_bwd_kernel(tb, tu, tk), blocks, (tu, tb), dhd_out.device,
            numba_array(ws), a2(h), a2(dg_next), numba_array(w_hh), a2(dh_a), a2(dh_b), a2(dhd),
            numba_array(dgi), numba_array(dgh), numba_array(dhd_out),
            h is not None, dg_next is not None, dh_a is not None, dh_b is not None,
            dhd is not None, cd(h), k.dtype_code(w_hh.dtype), cd(dh_a), cd(dh_b))


LAUNCHERS = {"triton": _TritonGRU, "numba": _NumbaGRU}


class _TritonGRUCell(_TritonGRU):
    CUDNN_TF32 = False   # torch's GRUCell is a cuBLAS matmul (see pydl.lstm._TritonLSTM)


CELL_LAUNCHERS = {"triton": _TritonGRUCell, "numba": _NumbaGRU}
# backend -> the layer's algorithms; the first is the default
ALGOS = {"triton": ("steps",), "numba": ("steps",)}


# --- the cell -------------------------------------------------------------------------------

def _gru_cell_fwd_fake(x, h, w_ih, w_hh, b_ih, b_hh, backend):
    B, H = x.shape[0], w_hh.shape[1]
    return x.new_empty((B, H)), x.new_empty((B, 4 * H), dtype=F32)


@kernel_op("gru_cell_fwd", _gru_cell_fwd_fake)
def _gru_cell_fwd(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                  backend: str) -> tuple[Tensor, Tensor]:
    """(h1, the fp32 workspace r, z, n, gh_n the backward reads)."""
    B, H = x.shape[0], w_hh.shape[1]
    h1 = new_output((B, H), x.dtype, x.device)
    ws = new_output((B, 4 * H), F32, x.device)
    if B and H:
        CELL_LAUNCHERS[backend].gru_step_fwd(x, w_ih, None, b_ih, h, w_hh, b_hh, h1, None, ws)
    return h1, ws


@kernel_op("gru_cell_bwd", lambda x, h, w_ih, w_hh, ws, dh1, need, backend: [
    g for i, g in enumerate(_cell_grads_fake(x, h, None, w_ih, w_hh, [*need[:2], False, *need[2:]], 3))
    if i != 2])
def _gru_cell_bwd(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, ws: Tensor,
                  dh1: Tensor, need: list[bool], backend: str) -> list[Tensor]:
    """Gradients of (x, h, w_ih, w_hh, b_ih, b_hh), an empty tensor where not `need`ed."""
    launch = CELL_LAUNCHERS[backend]
    B, H = dh1.shape
    dev = x.device
    dgi = new_output((B, 3 * H), F32, dev)
    dgh = new_output((B, 3 * H), F32, dev)
    dhd = new_output((B, H), F32, dev)
    if B and H:
        launch.gru_step_bwd(ws, h, None, w_hh, dh1, None, None, dgi, dgh, dhd)
    dx = dh = dw_ih = dw_hh = db_ih = db_hh = None
    if need[0]:
        dx = new_output(x.shape, x.dtype, dev)
        _mm(launch, dgi, w_ih, dx)
    if need[1]:
        dh = new_output(h.shape, h.dtype, dev)
        _mm(launch, dgh, w_hh, dh, c_in=dhd)
    if need[2]:
        dw_ih = new_output(w_ih.shape, w_ih.dtype, dev)
        _mm(launch, dgi.t(), x, dw_ih)
    if need[3]:
        if h is None:   # zero state: no gradient reaches W_hh
            dw_hh = torch.zeros_like(w_hh)
        else:
            dw_hh = new_output(w_hh.shape, w_hh.dtype, dev)
            _mm(launch, dgh.t(), h, dw_hh)
    if need[4]:
        db_ih = new_output((3 * H,), w_ih.dtype, dev)
        launch.bias_grad(dgi[None], db_ih, None)
    if need[5]:
        db_hh = new_output((3 * H,), w_ih.dtype, dev)
        launch.bias_grad(dgh[None], db_hh, None)
    return [_or_empty(t, x) for t in (dx, dh, dw_ih, dw_hh, db_ih, db_hh)]


class GRUCellFunction(torch.autograd.Function):
    """h1 of one GRU step for x (B, I) and h (B, H) or None (zeros)."""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, backend: str):
        h1, ws = _gru_cell_fwd(x, h, w_ih, w_hh, b_ih, b_hh, backend)
        ctx.save_for_backward(x, h, w_ih, w_hh, ws)
        ctx.need = _cell_need(ctx, x, h, w_ih, w_hh, b_ih, b_hh)
        ctx.backend = backend
        return h1

    @staticmethod
    def backward(ctx, dh1):
        x, h, w_ih, w_hh, ws = ctx.saved_tensors
        grads = _gru_cell_bwd(x, h, w_ih, w_hh, ws, dh1, ctx.need, ctx.backend)
        return (*[g if n else None for g, n in zip(grads, ctx.need)], None)


# --- the layer: the GRU's part of the shared stack machinery (pydl/lstm.py RNNFunction) ------

class GRURecurrence:
    """What RNNFunction needs to know of the GRU cell: 3 gates, no cell state, and the
    recurrence of one direction forward, recomputed, and backward (methods and arguments as
    pydl.lstm.LSTMRecurrence; c0, c_n, cs, dc0 and w_hr (no projections) are always None
    here)."""
    name = "gru"
    gates = 3
    saved_gates = 4     # r, z, n and gh_n per step
    has_cell_state = False

    @staticmethod
    def forward(launch, algo, xp, b_hh, h0, c0, w_hh, w_hr, out, h_n, c_n, reverse):
        """Run one direction: writes out (T, B, H) and h_n (B, H); returns (ws, None, None):
        the fp32 r, z, n, gh_n of every step (T, B, 4H)."""
        T, B, H = out.shape
        ws = new_output((T, B, 4 * H), F32, out.device)
        for s, (t, tp) in enumerate(_run_order(T, reverse)):
            launch.gru_step_fwd(None, None, xp[t], None, h0 if tp is None else out[tp], w_hh,
                                b_hh, out[t], h_n if s == T - 1 else None, ws[t])
        return ws, None, None

    @staticmethod
    def recompute(launch, xp, b_hh, h0, c0, w_hh, out, cs, reverse):
        """forward()'s workspace again: every step starts from a saved state (h0, or the
        output of the step before), so all run at once, one launch over T*B rows (and one
        for the first step). The new states it writes are scratch. Returns (ws, None)."""
        T, B, H = out.shape
        ws = new_output((T, B, 4 * H), F32, out.device)
        h_tmp = new_output((T, B, H), out.dtype, out.device)
        t0, rest, prev = _steps_after_first(T, reverse)
        launch.gru_step_fwd(None, None, xp[t0], None, h0, w_hh, b_hh, h_tmp[t0], None, ws[t0])
        if T > 1:
            r = _seq_rows
            launch.gru_step_fwd(None, None, r(xp[rest]), None, r(out[prev]), w_hh, b_hh,
                                r(h_tmp[rest]), None, r(ws[rest]))
        return ws, None

    @staticmethod
    def backward(launch, algo, acts, cs, h0, c0, out, w_hh, w_hr, d_out, d_hn, d_cn, dh0, dc0,
                 reverse):
        """Backpropagation through one direction in reverse run order; returns (dgi, dgh),
        the fp32 gradients (T, B, 3H) of gi = x W_ih^T + b_ih and of gh = h W_hh^T + b_hh;
        writes dh0 where given."""
        T, B, H = out.shape
        dev = out.device
        dgi = new_output((T, B, 3 * H), F32, dev)
        dgh = new_output((T, B, 3 * H), F32, dev)
        dhd = new_output((B, H), F32, dev)    # the running direct part: dh1 * z
        t_next = None   # the step that ran after t: its dgh and dhd feed dh_t
        for s, (t, tp) in enumerate(reversed(list(_run_order(T, reverse)))):
            first = s == 0
            launch.gru_step_bwd(acts[t], h0 if tp is None else out[tp],
                                None if first else dgh[t_next], w_hh, d_hn if first else None,
                                None if d_out is None else d_out[t], None if first else dhd,
                                dgi[t], dgh[t], dhd)
            t_next = t
        if dh0 is not None:
            _mm(launch, dgh[t_next], w_hh, dh0, c_in=dhd)
        return dgi, dgh


# --- implementations by backend -------------------------------------------------------------

def _kernel_gru_cell(backend: str):
    def impl(x, h, w_ih, w_hh, b_ih, b_hh):
        return GRUCellFunction.apply(x, h, w_ih, w_hh, b_ih, b_hh, backend)
    return impl


for _name, _launch in LAUNCHERS.items():
    register("gru_cell", _name)(_kernel_gru_cell(_name))
    register("gru", _name)(layer_impl("gru", GRURecurrence, _name, _launch, ALGOS[_name]))


@register("gru_cell", "torch")
def _torch_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    h = x.new_zeros(x.shape[0], w_hh.shape[1]) if h is None else h
    return torch._VF.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)


@register("gru", "torch")
def _torch_gru(x, h0, c0, weights, cfg):
    L, D = cfg.num_layers, cfg.D
    B, H = x.shape[1], weights[1].shape[1]
    h0 = x.new_zeros(L * D, B, H) if h0 is None else h0
    out, h_n = torch._VF.gru(x, h0, list(weights), cfg.bias, L, cfg.dropout, cfg.training,
                             cfg.bidirectional, False)
    return out, h_n, None


# --- the public functions -------------------------------------------------------------------

def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """One GRU step, as torch.nn.GRUCell: returns h1.

    input (B, I) or unbatched (I,); hx (B, H) (or (H,)) or None for zeros; w_ih (3H, I),
    w_hh (3H, H), b_ih / b_hh (3H,) or None; gate order r, z, n (torch's).
    """
    if hx is not None and not isinstance(hx, torch.Tensor):
        raise TypeError(f"hx must be a tensor or None, got {type(hx).__name__}")
    input, hx, w_ih, w_hh, b_ih, b_hh = autocast_inputs("gru_cell", input, hx, w_ih, w_hh, b_ih, b_hh)
    name, impl = dispatch("gru_cell", backend, input, w_ih, w_hh,
                          *[t for t in (hx, b_ih, b_hh) if isinstance(t, torch.Tensor)])
    check_tensor(input, "input", name, ndims=(1, 2))
    H = _check_cell_weights(w_ih, w_hh, b_ih, b_hh, input, name, gates=3)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    _check_cell_state(hx, "hx", input, (H,) if unbatched else (x.shape[0], H), name)
    h = hx.unsqueeze(0) if unbatched and hx is not None else hx
    h1 = impl(x, h, w_ih, w_hh, b_ih, b_hh)
    return h1.squeeze(0) if unbatched else h1


def gru(input, hx, weights, *, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
        backend=None, algo=None, recompute: bool = False):
    """A multi-layer GRU over a sequence, as torch.nn.GRU: returns (output, h_n).

    input:   (T, B, I), (B, T, I) with batch_first, or unbatched (T, I)
    hx:      h0 (num_layers * D, B, H) (unbatched: (num_layers * D, H)), or None for zeros;
             D = 2 if bidirectional else 1
    weights: the flat list torch.nn.GRU keeps in `_flat_weights` (per layer, per direction:
             w_ih (3H, I or D*H), w_hh (3H, H), then b_ih, b_hh (3H,) when bias); gate order
             r, z, n, with n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    dropout: applied to the outputs of every layer but the last, when training
    algo:    "steps" (the only one: one fused kernel per time step)
    recompute: keep no r, z, n, gh_n (T * B * 4H fp32 per layer and direction) between
             forward and backward; the backward recomputes them one layer and direction at
             a time
    output:  (T, B, D*H) ((B, T, D*H) with batch_first, a transposed view; (T, D*H)
             unbatched); h_n shaped like h0.
    """
    if hx is not None and not isinstance(hx, torch.Tensor):
        raise TypeError(f"hx must be a tensor (h0) or None, got {type(hx).__name__}")
    impl, x, (h0,), cfg, unbatched = prepare_layer(
        "gru", 3, input, ((hx, "hx (h0)"),), weights, num_layers=num_layers, bias=bias,
        batch_first=batch_first, dropout=dropout, training=training,
        bidirectional=bidirectional, backend=backend, algo=algo, recompute=recompute)
    out, h_n, _ = impl(x, h0, None, tuple(weights), cfg)
    out, (h_n,) = layer_output(out, (h_n,), unbatched, batch_first)
    return out, h_n


__all__ = ["gru_cell", "gru", "GRUCellFunction", "GRURecurrence", "ALGOS"]
