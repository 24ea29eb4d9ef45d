"""GRU: the cell (pydl.gru_cell, nn.GRUCell) and the layer's cell for the shared stack
machinery (pydl/rnn.py: GRURecurrence), with their launchers; the public functions.

Kernels: kernels/{triton,numba}/gru.py, one forward and one backward kernel that run a range
of time steps per launch (pydl/_rnn_launch.py says how); the layers' other kernels (GEMMs,
bias sums, dropout) are shared with the LSTM (pydl/_rnn_launch.py TritonRNN, NumbaRNN).

The cell, forward in ONE launch (both products, the gates and the update), saving r, z, n and
gh_n in fp32 (4H floats a row); backward: the backward kernel over one step gives the
pre-activation gradients dgi, dgh (B, 3H) and the direct path dh1 * z, its pseudo-step
dh = dgh W_hh + dh1 z; then dx = dgi W_ih, dW_ih = dgi^T x, dW_hh = dgh^T h, db_ih / db_hh =
column sums of dgi / dgh.

The layer, per layer and direction, after the input projection gi = X W_ih^T + b_ih (one
GEMM for all steps, pydl/rnn.py): the recurrence, one launch for the whole sequence (grid
barrier between steps) by default, or one per step with algo="steps". Backward through time
likewise, dh_t = dgh_{t+1} W_hh + dh_direct_{t+1} (+ the output gradient) being the prologue
of each step, writing dgi_t and dgh_t (fp32, T * B * 6H floats a direction: the two
products' gradients differ in the n gate); then the weight, input and bias gradients over
every (t, b) row. With recompute=True the forward keeps no r, z, n, gh_n: the backward
recomputes them from the saved outputs (every step's starting state), all steps at once.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._autograd import without_double_backward
from ._checks import check_tensor
from ._launch import cdiv, new_output, numba_array
from ._library import autocast_inputs, kernel_op
from . import _rnn_launch
from ._rnn_checks import check_cell_state, check_cell_weights, run_layer
from ._rnn_launch import (NumbaPlan, NumbaRNN, Schedule, TritonPlan, TritonRNN, numba_tile,
                          tile_configs)
from ._rnn_launch import numba_arg as _a
from ._rnn_launch import numba_code as _code
from ._rnn_launch import strides as _strides
from ._tune import Tuner
from .backends import dispatch, register
from .rnn import (cell_grads_fake, cell_need, layer_impl, mm, or_empty, seq_rows,
                  steps_after_first)

F32 = torch.float32
TUNERS = {name: Tuner(name) for name in ("gru_layer_fwd", "gru_layer_bwd")}


class TritonGRU(TritonRNN):
    """The GRU's recurrence kernels on Triton (plus the shared launches of TritonRNN)."""

    @classmethod
    def forward(cls, schedule, x, w_ih, xp, b_ih, b_hh, h0, w_hh, out, ws, hn, bs,
                reverse: bool) -> TritonPlan:
        """The plan of one direction's forward (kernels/triton/gru.py gru_layer_fwd): x / w_ih
        (the cell: (T, B, I)), xp (a layer: (T, B, 3H) fp32), biases, h0 (B, H), hn, bs may
        be None. Steps: plan.run(0, plan.n_steps)."""
        from .kernels.triton import gru as k
        T, B, H = out.shape
        I = x.shape[2] if x is not None else 0
        dt = out.dtype
        d = out
        flags = dict(REVERSE=reverse, HAS_X=x is not None, HAS_XP=xp is not None,
                     HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, HAS_H0=h0 is not None,
                     WRITE_HN=hn is not None, HAS_BS=bs is not None,
                     PRECISION=cls.precision(dt, dt, dt))
        K = max(I, H)
        key, candidates = tile_configs("gru_layer_fwd", B, H, K, dt, tuple(sorted(flags.items())),
                                       out.device, False)
        head = (x if x is not None else d, w_ih if w_ih is not None else d,
                xp if xp is not None else d, b_ih if b_ih is not None else d,
                b_hh if b_hh is not None else d, h0 if h0 is not None else d, w_hh, out, ws,
                hn if hn is not None else d, bs if bs is not None else ws)
        tail = (*_strides(x, 3), *_strides(w_ih, 2), *_strides(xp, 3), *_strides(h0, 2),
                *w_hh.stride(), *out.stride(), *ws.stride(), *_strides(hn, 2))
        plan = TritonPlan(
            k.gru_layer_fwd, TUNERS["gru_layer_fwd"], key, candidates, head, (T, B, I, H),
            tail, flags, lambda cfg: cdiv(B, cfg["BLOCK_B"]) * cdiv(H, cfg["BLOCK_H"]),
            schedule, T)
        return plan

    @classmethod
    def backward(cls, schedule, ws, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dh0,
                 reverse: bool, model: torch.dtype) -> TritonPlan:
        """The plan of one direction's backward through time (gru_layer_bwd): out (T, B, H)
        the forward's output (each step's starting state); dgi, dgh (T, B, 3H) written; dh0
        by the pseudo-step when given; h0, d_out, d_hn, bs may be None."""
        from .kernels.triton import gru as k
        T, B, H = out.shape
        dev = out.device
        dhd = new_output((2, B, H), F32, dev)
        flags = dict(REVERSE=reverse, HAS_H0=h0 is not None, HAS_DOUT=d_out is not None,
                     HAS_DHN=d_hn is not None, HAS_BS=bs is not None,
                     PRECISION=cls.precision(F32, w_hh.dtype, model))
        key, candidates = tile_configs("gru_layer_bwd", B, H, 3 * H, model,
                                       tuple(sorted(flags.items())), dev, True)
        d = out
        head = (ws, out, h0 if h0 is not None else d, w_hh, d_out if d_out is not None else d,
                d_hn if d_hn is not None else d, bs if bs is not None else ws, dgi, dgh, dhd,
                dh0 if dh0 is not None else d)
        tail = (*ws.stride(), *out.stride(), *_strides(h0, 2), *w_hh.stride(),
                *_strides(d_out, 3), *_strides(d_hn, 2), *dgi.stride(), *dgh.stride(),
                *dhd.stride(), *_strides(dh0, 2))
        return TritonPlan(
            k.gru_layer_bwd, TUNERS["gru_layer_bwd"], key, candidates, head, (T, B, H), tail,
            flags, lambda cfg: cdiv(B, cfg["BLOCK_B"]) * cdiv(H, cfg["BLOCK_H"]), schedule,
            T + 1 if dh0 is not None else T)


class TritonGRUCell(TritonGRU):
    cudnn = False   # torch's GRUCell is a cuBLAS matmul: its TF32 setting is the matmul one


class NumbaGRU(NumbaRNN):
    """Same methods as TritonGRU, on the Numba kernels (kernels/numba/gru.py)."""

    @staticmethod
    def forward(schedule, x, w_ih, xp, b_ih, b_hh, h0, w_hh, out, ws, hn, bs,
                reverse: bool) -> NumbaPlan:
        from .kernels.numba import gru as k
        T, B, H = out.shape
        tb, tu, tk = numba_tile()
        seq, row, vec = out, out[0], ws[0, 0]
        args = (_a(x, seq), _a(w_ih, row), _a(xp, seq), _a(b_ih, vec), _a(b_hh, vec),
                _a(h0, row), numba_array(w_hh), numba_array(out), numba_array(ws), _a(hn, row),
                _a(bs, vec), reverse, x is not None, xp is not None, b_ih is not None,
                b_hh is not None, h0 is not None, hn is not None, bs is not None,
                _code(w_hh), _code(xp), _code(b_ih if b_ih is not None else b_hh), _code(h0),
                _code(out), _code(hn))
        plan = NumbaPlan(k.gru_layer_fwd_kernel(tb, tu, tk), args, cdiv(B, tb) * cdiv(H, tu),
                         schedule, out.device)
        plan.n_steps = T
        return plan

    @staticmethod
    def backward(schedule, ws, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dh0,
                 reverse: bool, model) -> NumbaPlan:
        from .kernels.numba import gru as k
        T, B, H = out.shape
        dev = out.device
        tb, tu, tk = numba_tile()
        dhd = new_output((2, B, H), F32, dev)
        seq, row, vec = out, out[0], ws[0, 0]
        args = (numba_array(ws), numba_array(out), _a(h0, row), numba_array(w_hh),
                _a(d_out, seq), _a(d_hn, row), _a(bs, vec), numba_array(dgi), numba_array(dgh),
                numba_array(dhd), _a(dh0, row), reverse, h0 is not None, d_out is not None,
                d_hn is not None, bs is not None, dh0 is not None, _code(out), _code(h0),
                _code(w_hh), _code(d_out), _code(d_hn), _code(dh0))
        plan = NumbaPlan(k.gru_layer_bwd_kernel(tb, tu, tk), args, cdiv(B, tb) * cdiv(H, tu),
                         schedule, dev)
        plan.n_steps = T + 1 if dh0 is not None else T
        return plan


LAUNCHERS = {"triton": TritonGRU, "numba": NumbaGRU}
CELL_LAUNCHERS = {"triton": TritonGRUCell, "numba": NumbaGRU}
# backend -> the layer's algorithms (pydl/_rnn_launch.py); the first is the default
ALGOS = {name: _rnn_launch.ALGOS for name in LAUNCHERS}


# --- the layer's cell ------------------------------------------------------------------------

class GRURecurrence:
    """The GRU for pydl/rnn.py's stack (the cell contract is written down there): 3 gates,
    no cell state (c0, c_n, cs, dc0 are None), no projections, r, z, n and gh_n saved per
    step (4H fp32)."""
    name = "gru"
    gates = 3
    saved_gates = 4
    has_cell_state = False

    @staticmethod
    def forward(launch, schedule, xp, b_hh, h0, c0, w_hh, w_hr, out, h_n, c_n, bs, reverse):
        T, B, H = out.shape
        ws = new_output((T, B, 4 * H), F32, out.device)
        if B:
            plan = launch.forward(schedule, None, None, xp, None, b_hh, h0, w_hh, out, ws, h_n,
                                  bs, reverse)
            plan.run(0, plan.n_steps)
        return ws, None, None

    @staticmethod
    def recompute(launch, xp, b_hh, h0, c0, w_hh, out, cs, reverse):
        """forward()'s workspace again: every step starts from a saved state (h0, or the
        output of the step before), so all run at once, one launch over T*B rows (and one
        for the first step). The new states it writes are scratch. Returns (ws, None)."""
        T, B, H = out.shape
        dev = out.device
        ws = new_output((T, B, 4 * H), F32, dev)
        h_tmp = new_output((T, B, H), out.dtype, dev)
        steps = Schedule("steps", dev, 0)
        t0, rest, prev = steps_after_first(T, reverse)

        def one_step(xp_, h_, h1, w):
            launch.forward(steps, None, None, xp_[None], None, b_hh, h_, w_hh, h1[None],
                           w[None], None, None, False).run(0, 1)
        if B == 0:
            return ws, None
        one_step(xp[t0], h0, h_tmp[t0], ws[t0])
        if T > 1:
            r = seq_rows
            one_step(r(xp[rest]), r(out[prev]), r(h_tmp[rest]), r(ws[rest]))
        return ws, None

    @staticmethod
    def backward(launch, schedule, acts, cs, h0, c0, out, w_hh, w_hr, d_out, d_hn, d_cn, dh0,
                 dc0, bs, reverse):
        """BPTT of one direction; returns (dgi, dgh), the fp32 gradients (T, B, 3H) of
        gi = x W_ih^T + b_ih and of gh = h W_hh^T + b_hh; writes dh0 where given."""
        T, B, H = out.shape
        dgi = new_output((T, B, 3 * H), F32, out.device)
        dgh = new_output((T, B, 3 * H), F32, out.device)
        if B:
            plan = launch.backward(schedule, acts, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dh0,
                                   reverse, out.dtype)
            plan.run(0, plan.n_steps)
        return dgi, dgh


# --- the cell ---------------------------------------------------------------------------------

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
        CELL_LAUNCHERS[backend].forward(
            Schedule("steps", x.device, 0), x[None], w_ih, None, b_ih, b_hh, h, w_hh, h1[None],
            ws[None], None, None, False).run(0, 1)
    return h1, ws


@kernel_op("gru_cell_bwd", lambda x, h, w_ih, w_hh, ws, dh1, need, backend: [
    g for i, g in enumerate(cell_grads_fake(x, h, None, w_ih, w_hh, [*need[:2], False, *need[2:]], 3))
    if i != 2])
def _gru_cell_bwd(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, ws: Tensor,
                  dh1: Tensor, need: list[bool], backend: str) -> list[Tensor]:
    """Gradients of (x, h, w_ih, w_hh, b_ih, b_hh), an empty tensor where not `need`ed."""
    launch = CELL_LAUNCHERS[backend]
    B, H = dh1.shape
    dev, model = x.device, x.dtype
    dgi = new_output((B, 3 * H), F32, dev)
    dgh = new_output((B, 3 * H), F32, dev)
    dh = new_output(h.shape, h.dtype, dev) if need[1] else None
    if B and H:
        # h1 = ... + z h: the step's output sequence is not needed, h is the state it started
        # from (the kernel reads it as h0 at the first and only step)
        launch.backward(Schedule("steps", dev, 0), ws[None], dh1[None], h, w_hh, dh1[None],
                        None, None, dgi[None], dgh[None], dh, False, model).run(
                            0, 2 if dh is not None else 1)
    dx = dw_ih = dw_hh = db_ih = db_hh = None
    if need[0]:
        dx = new_output(x.shape, x.dtype, dev)
        mm(launch, dgi, w_ih, dx, model=model)
    if need[2]:
        dw_ih = new_output(w_ih.shape, w_ih.dtype, dev)
        mm(launch, dgi.t(), x, dw_ih, model=model)
    if need[3]:
        if h is None:   # zero state: no gradient reaches W_hh
            dw_hh = torch.zeros_like(w_hh)
        else:
            dw_hh = new_output(w_hh.shape, w_hh.dtype, dev)
            mm(launch, dgh.t(), h, dw_hh, model=model)
    if need[4]:
        db_ih = new_output((3 * H,), w_ih.dtype, dev)
        launch.bias_grad(dgi[None], db_ih, None)
    if need[5]:
        db_hh = new_output((3 * H,), w_ih.dtype, dev)
        launch.bias_grad(dgh[None], db_hh, None)
    return [or_empty(t, x) for t in (dx, dh, dw_ih, dw_hh, db_ih, db_hh)]


class GRUCellFunction(torch.autograd.Function):
    """h1 of one GRU step for x (B, I) and h (B, H) or None (zeros)."""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, backend: str):
        h1, ws = _gru_cell_fwd(x, h, w_ih, w_hh, b_ih, b_hh, backend)
        ctx.save_for_backward(x, h, w_ih, w_hh, ws)
        ctx.need = cell_need(ctx, x, h, w_ih, w_hh, b_ih, b_hh)
        ctx.backend = backend
        return h1

    @staticmethod
    def backward(ctx, dh1):
        if torch.is_grad_enabled():     # create_graph: the kernels' result is not differentiable
            return without_double_backward("gru_cell", GRUCellFunction._backward, ctx, dh1)
        return GRUCellFunction._backward(ctx, dh1)

    @staticmethod
    def _backward(ctx, dh1):
        x, h, w_ih, w_hh, ws = ctx.saved_tensors
        grads = _gru_cell_bwd(x, h, w_ih, w_hh, ws, dh1, ctx.need, ctx.backend)
        return (*[g if n else None for g, n in zip(grads, ctx.need)], None)


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
def _torch_gru(x, h0, c0, weights, cfg, packed=None):
    L, D = cfg.num_layers, cfg.D
    B, H = x.shape[1], weights[1].shape[1]
    h0 = x.new_zeros(L * D, B, H) if h0 is None else h0
    args = (h0, list(weights), cfg.bias, L, cfg.dropout, cfg.training, cfg.bidirectional)
    if packed is None:
        out, h_n = torch._VF.gru(x, *args, False)
        return out, h_n, None
    data = x.reshape(-1, x.shape[2]).index_select(0, packed.rows)
    out, h_n = torch._VF.gru(data, packed.batch_sizes, *args)
    return (out.new_zeros(x.shape[0] * B, out.shape[1]).index_copy(0, packed.rows, out)
            .view(x.shape[0], B, -1), h_n, None)


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
    H = check_cell_weights(w_ih, w_hh, b_ih, b_hh, input, name, gates=3)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    check_cell_state(hx, "hx", input, (H,) if unbatched else (x.shape[0], H), name)
    h = hx.unsqueeze(0) if unbatched and hx is not None else hx
    h1 = impl(x, h, w_ih, w_hh, b_ih, b_hh)
    return h1.squeeze(0) if unbatched else h1


def gru(input, hx, weights, *, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
        dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
        backend=None, algo=None, recompute: bool = False):
    """A multi-layer GRU over a sequence, as torch.nn.GRU: returns (output, h_n).

    input:   (T, B, I), (B, T, I) with batch_first, unbatched (T, I), or a PackedSequence
             (as torch.nn.GRU takes it: hx in the caller's batch order; output packed)
    hx:      h0 (num_layers * D, B, H) (unbatched: (num_layers * D, H)), or None for zeros;
             D = 2 if bidirectional else 1
    weights: the flat list torch.nn.GRU keeps in `_flat_weights` (per layer, per direction:
             w_ih (3H, I or D*H), w_hh (3H, H), then b_ih, b_hh (3H,) when bias); gate order
             r, z, n, with n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    dropout: applied to the outputs of every layer but the last, when training
    algo:    "persistent" (default: one launch per layer and direction for the whole
             sequence, its programs meeting at a grid barrier between steps) or "steps"
             (one launch per time step)
    recompute: keep no r, z, n, gh_n (T * B * 4H fp32 per layer and direction) between
             forward and backward; the backward recomputes them one layer and direction at
             a time
    output:  (T, B, D*H) ((B, T, D*H) with batch_first, a transposed view; (T, D*H)
             unbatched); h_n shaped like h0.
    """
    if hx is not None and not isinstance(hx, torch.Tensor):
        raise TypeError(f"hx must be a tensor (h0) or None, got {type(hx).__name__}")
    out, (h_n,) = run_layer(
        "gru", 3, input, (hx,), weights, num_layers=num_layers, bias=bias,
        batch_first=batch_first, dropout=dropout, training=training, bidirectional=bidirectional,
        backend=backend, algo=algo, recompute=recompute)
    return out, h_n


__all__ = ["gru_cell", "gru", "GRUCellFunction", "GRURecurrence", "ALGOS"]
