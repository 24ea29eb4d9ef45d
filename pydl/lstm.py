"""LSTM: the cell (pydl.lstm_cell, nn.LSTMCell) and the layer's cell for the shared stack
machinery (pydl/rnn.py: LSTMRecurrence), with their launchers; the public functions.

Kernels: kernels/{triton,numba}/lstm.py, one forward and one backward kernel that run a range
of time steps per launch (pydl/_rnn_launch.py says how); the layers' other kernels (GEMMs,
bias sums, dropout) are shared with the GRU (pydl/_rnn_launch.py TritonRNN, NumbaRNN).

The cell, forward in ONE launch (the forward kernel over one step, the input product in it):
    gates = x W_ih^T + h W_hh^T + b_ih + b_hh; i, f, o = sigmoid; g = tanh;
    c1 = f c + i g; h1 = o tanh(c1)
saving the fp32 activations (i, f, g, o) and an fp32 copy of c1 (4H + H floats a row).
Backward: the backward kernel over one step gives the gate gradients dg (B, 4H) and dc, and
its pseudo-step dh = dg W_hh; then GEMMs dx = dg W_ih, dW_ih = dg^T x, dW_hh = dg^T h, and a
column sum for the biases (db_ih = db_hh).

The layer (pydl.lstm, nn.LSTM), per layer and direction, after the input projection (one
GEMM for all steps, pydl/rnn.py): the recurrence, one launch for the whole sequence (grid
barrier between steps) by default, or one per step with algo="steps"; backward likewise,
dh_t = dg_{t+1} W_hh being the prologue of each step's gate gradients. Gate activations and
cell states are kept in fp32 workspaces (5H floats per row and step) whatever the dtype; the
c state is carried in fp32 between steps (torch carries it in the input dtype); h is rounded
to the dtype, as it is an output and the next step's product operand.

Projections (torch's proj_size P < H; w_hr (P, H) per layer and direction, told by the weight
count): h_t = m_t W_hr^T with m_t = o_t * tanh(c_t), a second sub-step of the same kernel; m
(T, B, H) is saved. Backward: dm_t = dh_t W_hr with dh_t = d_out[t] (+ d_hn) + dg_{t+1} W_hh,
i.e. dm_t = d_out[t] W_hr + dg_{t+1} (W_hh W_hr): the same backward kernel on W_hh W_hr
(4H, H) after two GEMMs; dW_hr = sum_t dh_t^T m_t from GEMMs over all (t, b) rows.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _rnn_launch
from ._autograd import without_double_backward
from ._launch import WriteOnly, fresh, new_output, output_maker
from ._library import autocast_inputs, kernel_op
from ._plan import Cache, apply, capturing, emulated, needs_graph
from ._rnn_checks import cell_call, run_layer
from ._rnn_checks import rnn_weight_names as lstm_weight_names
from ._rnn_launch import (
    NumbaRNN,
    TritonRNN,
    cell_input_grads,
    check_workspace,
    seq_shape,
    seq_strides,
    tf32_key,
)
from ._rnn_launch import numba_code as _code
from ._rnn_launch import strides as _strides
from ._tune import Tuner, aliased
from .backends import register
from .rnn import (
    Plans,
    RNNConfig,
    at_own_ends,
    cell_grads_fake,
    layer_impl,
    needed,
    seq_rows,
    sig,
    steps_after_first,
)

F32 = torch.float32

# The ranks of the recurrence kernels' tensor arguments, in order (a Numba kernel is compiled
# for them: an absent tensor's placeholder has its rank).
FWD_RANKS = (3, 2, 3, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 2, 2, 1)
BWD_RANKS = (3, 3, 2, 2, 3, 2, 2, 1, 3, 3, 3, 2, 2)


# --- Triton launch -----------------------------------------------------------------------------

TUNERS = {name: Tuner(name) for name in ("lstm_layer_fwd", "lstm_layer_bwd")}


class TritonLSTM(TritonRNN):
    """The LSTM's recurrence kernels on Triton (plus the shared launches of TritonRNN)."""

    @classmethod
    def forward_plan(cls, mode, x, w_ih, xp, b_ih, b_hh, h0, c0, w_hh, w_hr, out, m, cs, acts,
                     hn, cn, bs, reverse: bool):
        """The launch of one direction's forward (kernels/triton/lstm.py lstm_layer_fwd),
        rec(x, w_ih, xp, b_ih, b_hh, h0, c0, w_hh, w_hr, out, m, cs, acts, hn, cn, bs): x /
        w_ih (the cell: (T, B, I)), xp (a layer: (T, B, 4H) fp32), biases, h0 (B, P), c0,
        bs, hn, cn may be None; with projections w_hr (P, H) and m (T, B, H). Sequences may
        be 2-D (one step)."""
        from .kernels.triton import lstm as k
        T, B, H = seq_shape(cs)
        P = w_hh.shape[1]
        I = x.shape[-1] if x is not None else 0
        dt = out.dtype
        flags = dict(REVERSE=reverse, HAS_X=x is not None, HAS_XP=xp is not None,
                     HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, HAS_H0=h0 is not None,
                     HAS_C0=c0 is not None, WRITE_HN=hn is not None, WRITE_CN=cn is not None,
                     HAS_BS=bs is not None, PROJ=w_hr is not None,
                     PRECISION=cls.precision(dt, dt, dt))
        tensors = (x, w_ih, xp, b_ih, b_hh, h0, c0, w_hh, w_hr, out, m, cs, acts, hn, cn, bs)
        scalars = (T, B, I, H, P, *seq_strides(x), *_strides(w_ih, 2), *_strides(b_ih, 1),
                   *_strides(b_hh, 1), *seq_strides(xp), *_strides(h0, 2), *_strides(c0, 2),
                   *w_hh.stride(), *_strides(w_hr, 2), *seq_strides(out), *seq_strides(m),
                   *seq_strides(cs), *seq_strides(acts), *_strides(hn, 2), *_strides(cn, 2))
        return cls.recurrence(k.lstm_layer_fwd, TUNERS["lstm_layer_fwd"], "lstm_layer_fwd", mode,
                              tensors, FWD_RANKS, scalars, flags, B, H,
                              max(I, P, H if w_hr is not None else 0), dt,
                              2 * T if w_hr is not None else T, out.device, None,
                              inout=aliased((acts,), (xp,)))

    @classmethod
    def backward_plan(cls, mode, acts, cs, c0, w_rec, d_out, d_hn, d_cn, bs, dg, dc_run, pas,
                      dh0, dc0, reverse: bool, model: torch.dtype):
        """The launch of one direction's backward through time (lstm_layer_bwd),
        rec(acts, cs, c0, w_rec, d_out, d_hn, d_cn, bs, dg, dc_run, pas, dh0, dc0): dg
        (T, B, 4H) written; dh0 (B, H) written by the pseudo-step when given (W_rec = W_hh
        then), dc0 when given; c0, d_out, d_hn, d_cn, bs (and pas, the pass-through buffer of
        a packed batch) may be None; dc_run the workspace, (backward_planes, B, H) fp32
        contiguous (kernels/triton/rnn.py step_workspace)."""
        from .kernels.triton import lstm as k
        T, B, H = seq_shape(cs)
        K = w_rec.shape[0]
        check_workspace(dc_run, cls.backward_planes(B, H, K, w_rec.dtype, cs.device), B, H)
        bcast = cls.broadcast(w_rec.dtype)
        flags = dict(REVERSE=reverse, HAS_C0=c0 is not None, HAS_DOUT=d_out is not None,
                     HAS_DHN=d_hn is not None, HAS_DCN=d_cn is not None, HAS_BS=bs is not None,
                     WRITE_DC0=dc0 is not None, BCAST=bcast,
                     PRECISION=cls.precision(w_rec.dtype if bcast else F32, w_rec.dtype, model))
        # dg in acts itself (LSTMRecurrence.Backward, in_place): the kernel's IN_ACTS
        inout = aliased((dg,), (acts,))
        flags["IN_ACTS"] = bool(inout)
        tensors = (acts, cs, c0, w_rec, d_out, d_hn, d_cn, bs, dg, dc_run, pas, dh0, dc0)
        scalars = (T, B, H, K, *seq_strides(acts), *seq_strides(cs), *_strides(c0, 2),
                   *w_rec.stride(), *seq_strides(d_out), *_strides(d_hn, 2), *_strides(d_cn, 2),
                   *seq_strides(dg), *dc_run.stride(), *seq_strides(pas), *_strides(dh0, 2),
                   *_strides(dc0, 2))
        return cls.recurrence(k.lstm_layer_bwd, TUNERS["lstm_layer_bwd"], "lstm_layer_bwd", mode,
                              tensors, BWD_RANKS, scalars, flags, B, H, K, model,
                              T + 1 if dh0 is not None else T, cs.device,
                              cls.backward_operands(w_rec.dtype), inout=inout)


class TritonLSTMCell(TritonLSTM):
    cudnn = False   # torch's LSTMCell is a cuBLAS matmul: its TF32 setting is the matmul one


# --- Numba launch ------------------------------------------------------------------------------

class NumbaLSTM(NumbaRNN):
    """Same methods as TritonLSTM, on the Numba kernels (kernels/numba/lstm.py)."""

    @classmethod
    def forward_plan(cls, mode, x, w_ih, xp, b_ih, b_hh, h0, c0, w_hh, w_hr, out, m, cs, acts,
                     hn, cn, bs, reverse: bool):
        from .kernels.numba import lstm as k
        T, B, H = seq_shape(cs)
        tensors = (x, w_ih, xp, b_ih, b_hh, h0, c0, w_hh, w_hr, out, m, cs, acts, hn, cn, bs)
        scalars = (reverse, x is not None, xp is not None, b_ih is not None, b_hh is not None,
                   h0 is not None, c0 is not None, hn is not None, cn is not None,
                   bs is not None, w_hr is not None, _code(w_hh), _code(xp),
                   _code(b_ih if b_ih is not None else b_hh), _code(h0), _code(c0), _code(out),
                   _code(hn), _code(cn))
        return cls.recurrence(k.lstm_layer_fwd_kernel, mode, tensors, FWD_RANKS, scalars, B, H,
                              2 * T if w_hr is not None else T, out.device)

    @classmethod
    def backward_plan(cls, mode, acts, cs, c0, w_rec, d_out, d_hn, d_cn, bs, dg, dc_run, pas,
                      dh0, dc0, reverse: bool, model):
        from .kernels.numba import lstm as k
        T, B, H = seq_shape(cs)
        tensors = (acts, cs, c0, w_rec, d_out, d_hn, d_cn, bs, dg, dc_run, pas, dh0, dc0)
        scalars = (reverse, c0 is not None, d_out is not None, d_hn is not None,
                   d_cn is not None, bs is not None, dh0 is not None, dc0 is not None,
                   bool(aliased((dg,), (acts,))),       # dg in acts' place (in_acts)
                   _code(c0), _code(w_rec), _code(d_out), _code(d_hn), _code(d_cn), _code(dh0),
                   _code(dc0))
        return cls.recurrence(k.lstm_layer_bwd_kernel, mode, tensors, BWD_RANKS, scalars, B, H,
                              T + 1 if dh0 is not None else T, cs.device)


LAUNCHERS = {"triton": TritonLSTM, "numba": NumbaLSTM}
CELL_LAUNCHERS = {"triton": TritonLSTMCell, "numba": NumbaLSTM}
# backend -> the layer's algorithms (pydl/_rnn_launch.py); the first is the default
ALGOS = {name: _rnn_launch.ALGOS for name in LAUNCHERS}


# --- the layer's cell ------------------------------------------------------------------------

class LSTMRecurrence:
    """The LSTM for pydl/rnn.py's stack (the cell contract is written down there): 4 gates,
    a cell state, the fp32 activations i, f, g, o saved per step."""
    name = "lstm"
    gates = 4
    saved_gates = 4
    has_cell_state = True

    class Forward(Plans):
        """One direction's recurrence in a layer's forward plan: cs (and m) allocated, the
        recurrence launched (its launch built on the first call)."""

        def workspace(self, dev, keep=True):
            """(acts, xp): the buffer of the fp32 activations, into which the input
            projection goes first; each tile of the recurrence reads its elements of xp
            before it writes the same elements of acts (kernels/triton/lstm.py). keep False:
            xp alone, the activations (which nothing reads then) into one (B, 4H) plane the
            plan keeps."""
            T, B, H = self.dims
            if not keep:
                return (self.unread("acts_run", (T, B, 4 * H), F32, dev, (0, 4 * H, 1)),
                        self.new("xp_run", (T, B, 4 * H), F32, dev))
            acts = self.new("acts", (T, B, 4 * H), F32, dev)
            return acts, acts

        def __call__(self, acts, xp, b_hh, h0, c0, w_hh, w_hr, out, h_n, c_n, bs, keep=True):
            T, B, H = self.dims
            dev = out.device
            # keep False: every step's c (and m) in one (B, H) plane (stride 0 over time). A
            # step reads c_{t-1} of its elements and then writes c_t over them, in the same
            # program or thread; m_t is read by the projection, whose step ends (a launch or a
            # grid barrier) before the next step's cell writes m again (kernels/*/lstm.py).
            if keep:
                cs_name, m_name, fwd_name, step = "cs", "m", "fwd", None
            else:
                cs_name, m_name, fwd_name, step = "cs_run", "m_run", "fwd_run", (0, H, 1)
            cs = self.new(cs_name, (T, B, H), F32, dev, step)
            m = self.new(m_name, (T, B, H), out.dtype, dev, step) if w_hr is not None else None
            if B:
                self.forward(fwd_name, None, None, xp, None, b_hh, h0, c0, w_hh, w_hr, out, m, cs,
                             acts, h_n, c_n, bs)
            return acts, cs, m

    class Recompute(Forward):
        """The activations Forward computed, again. A step's gates depend only on the state
        it started from (h_{t-1}, c_{t-1}), and those were saved (the output and cs), so every
        step runs at once: the kernel over T*B rows as one step (and the first step alone,
        which starts from h0, c0). Returns (acts, m): the new states it writes are scratch,
        but with projections they are the unprojected m (T, B, H) dW_hr needs."""

        def __call__(self, acts, xp, b_hh, h0, c0, w_hh, out, cs):
            T, B, H = self.dims
            dev = out.device
            h_tmp = new_output((T, B, H), out.dtype, dev)
            c_tmp = new_output((T, B, H), F32, dev)
            if B == 0:
                return acts, h_tmp
            t0, rest, prev = steps_after_first(T, self.reverse)
            self.forward("first", None, None, xp[t0], None, b_hh, h0, c0, w_hh, None,
                         h_tmp[t0], None, c_tmp[t0], acts[t0], None, None, None, mode="steps",
                         reverse=False)
            if T > 1:
                r = seq_rows
                self.forward("rest", None, None, r(xp[rest]), None, b_hh, r(out[prev]),
                             r(cs[prev]), w_hh, None, r(h_tmp[rest]), None, r(c_tmp[rest]),
                             r(acts[rest]), None, None, None, mode="steps", reverse=False)
            return acts, h_tmp

    class Backward(Plans):
        """BPTT of one direction; returns (dg, dg): the fp32 gradients (T, B, 4H) of the
        pre-activations, one tensor for both products. With projections the gradient of m_t
        is dh_t W_hr, so the kernel runs on W_rec = W_hh W_hr (4H, H) with d_out W_hr and
        d_hn W_hr (two GEMMs first), and dh0 = dg_first W_hh is a GEMM after. in_place (acts
        are this backward's own, recomputed): dg is acts, each step's gradients written in
        place of its activations (kernels/triton/lstm.py IN_ACTS, the Numba kernel's
        in_acts), (T, B, 4H) fp32 less at the backward's peak."""

        def __call__(self, acts, cs, h0, c0, out, w_hh, w_hr, d_out, d_hn, d_cn, dh0, dc0, bs,
                     in_place: bool = False):
            T, B, H = self.dims
            dev = cs.device
            model = out.dtype
            if in_place:
                dg = acts       # the backward's own (recomputed): dg in its place (IN_ACTS)
            else:
                dg = self.new("dg", (T, B, 4 * H), F32, dev)
            w_rec = w_hh
            if w_hr is not None:
                w_rec = new_output((4 * H, H), F32, dev)
                self.gemm("w_rec", w_hh, w_hr, w_rec, model=model)
                if d_out is not None:
                    dm_out = new_output((T, B, H), F32, dev)
                    self.gemm("dm_out", d_out, w_hr, dm_out, model=model)
                    d_out = dm_out
                if d_hn is not None:
                    dm_hn = new_output((B, H), F32, dev)
                    self.gemm("dm_hn", d_hn, w_hr, dm_hn, model=model)
                    d_hn = dm_hn
            if B == 0:
                return dg, dg
            dc_run = self.new("dc_run", lambda: (self.launch.backward_planes(
                B, H, 4 * H, w_rec.dtype, dev), B, H), F32, dev)
            pas = new_output((2, B, H), F32, dev) if bs is not None else None
            # a launch of its own in place (its IN_ACTS flag is built from the aliasing)
            self.backward("bwd_in_place" if in_place else "bwd", acts, cs, c0, w_rec, d_out,
                          d_hn, d_cn, bs, dg, dc_run, pas,
                          dh0 if w_hr is None else None, dc0, model=model)
            if dh0 is not None and w_hr is not None:
                # from each sequence's first step: a packed batch's reversed sequences start
                # at their own ends (the steps before keep h0)
                first = dg[0] if not self.reverse else dg[T - 1] if bs is None else \
                    at_own_ends(dg, bs)
                self.gemm("dh0", first, w_hh, dh0, model=model)
            return dg, dg


# --- the cell ---------------------------------------------------------------------------------
# A cell step is the layer's recurrence kernel over one step (its 2-D tensors are one-step
# sequences), with the input product inside (HAS_X). The kernel ops look their plans up per
# signature (shapes, strides, TF32 switch, backend).

class _CellForward(Plans):
    def __call__(self, x, h, c, w_ih, w_hh, b_ih, b_hh, h1, c1, c32, gates):
        self.forward("fwd", x, w_ih, None, b_ih, b_hh, h, c, w_hh, None, h1, None, c32, gates,
                     None, c1, None)


class _CellBackward(Plans):
    """The `need`ed gradients of (x, h, c, w_ih, w_hh, b_ih, b_hh): the backward kernel over
    one step gives dg (B, 4H) and dc, its pseudo-step dh = dg W_hh; then GEMMs and a column
    sum."""

    def __init__(self, launch, need):
        super().__init__(launch, ())
        self.need = need

    def __call__(self, x, h, c, w_ih, w_hh, gates, c32, dh1, dc1):
        need = self.need
        B, H = c32.shape
        dev, model = x.device, x.dtype
        dg = new_output((B, 4 * H), F32, dev)
        dc = new_output(c.shape, c.dtype, dev) if need[2] else None
        dh = new_output(h.shape, h.dtype, dev) if need[1] else None
        if B and H:
            dc_run = self.new("dc_run", lambda: (self.launch.backward_planes(
                B, H, 4 * H, w_hh.dtype, dev), B, H), F32, dev)
            self.backward("bwd", gates, c32, c, w_hh, dh1, None, dc1, None, dg, dc_run, None,
                          dh, dc, model=model)
        dx, dw_ih, dw_hh = cell_input_grads(self, x, h, w_ih, w_hh, dg, dg, need[0], need[3],
                                            need[4], model)
        db_ih = db_hh = None
        if need[5] or need[6]:
            first = new_output((4 * H,), w_ih.dtype, dev)
            second = new_output((4 * H,), w_ih.dtype, dev) if need[5] and need[6] else None
            self.bias_grad("db", dg, first, second)
            db_ih, db_hh = (first, second) if need[5] and need[6] else (
                (first, None) if need[5] else (None, first))
        return [t for t, n in zip((dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh), need) if n]


_CELL_PLANS = Cache("lstm_cell launches")


def _lstm_cell_fake(x, h, c, w_ih, w_hh, b_ih, b_hh, backend):
    B, H = x.shape[0], w_hh.shape[1]
    return (x.new_empty((B, H)), x.new_empty((B, H)), x.new_empty((B, 4 * H), dtype=F32),
            x.new_empty((B, H), dtype=F32))


def _forward_key(backend, x, h, c, w_ih, w_hh, b_ih, b_hh):
    return ("fwd", backend, tf32_key(x.dtype, False), x.shape, x.stride(), x.dtype, x.device,
            sig(h), sig(c), w_ih.shape, w_ih.stride(), w_hh.shape, w_hh.stride(), sig(b_ih),
            sig(b_hh))


def _backward_key(backend, need, x, h, c, w_ih, w_hh, dh1, dc1):
    return ("bwd", backend, tf32_key(x.dtype, False), tuple(need), x.shape, x.stride(),
            x.dtype, x.device, sig(h), sig(c), w_ih.shape, w_ih.stride(), w_hh.shape,
            w_hh.stride(), sig(dh1), sig(dc1))


@kernel_op("lstm_cell_fwd", _lstm_cell_fake)
def _lstm_cell_fwd(x: Tensor, h: Optional[Tensor], c: Optional[Tensor], w_ih: Tensor,
                   w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h1, c1, the fp32 gate activations, the fp32 new cell state)."""
    B, H = x.shape[0], w_hh.shape[1]
    dt, dev = x.dtype, x.device
    h1 = new_output((B, H), dt, dev)
    c1 = new_output((B, H), dt, dev)
    c32 = new_output((B, H), F32, dev)
    gates = new_output((B, 4 * H), F32, dev)
    if B and H:
        _CELL_PLANS.get(_forward_key(backend, x, h, c, w_ih, w_hh, b_ih, b_hh), _CellForward,
                        CELL_LAUNCHERS[backend], ())(
            x, h, c, w_ih, w_hh, b_ih, b_hh, h1, c1, c32, gates)
    return h1, c1, gates, c32


@kernel_op("lstm_cell_bwd", lambda x, h, c, w_ih, w_hh, gates, c32, dh1, dc1, need, backend:
           cell_grads_fake(x, h, c, w_ih, w_hh, need, 4))
def _lstm_cell_bwd(x: Tensor, h: Optional[Tensor], c: Optional[Tensor], w_ih: Tensor,
                   w_hh: Tensor, gates: Tensor, c32: Tensor, dh1: Optional[Tensor],
                   dc1: Optional[Tensor], need: list[bool], backend: str) -> list[Tensor]:
    """The `need`ed gradients of (x, h, c, w_ih, w_hh, b_ih, b_hh); dh1 or dc1 None: no
    gradient reaches that output."""
    return _CELL_PLANS.get(_backward_key(backend, need, x, h, c, w_ih, w_hh, dh1, dc1),
                           _CellBackward, CELL_LAUNCHERS[backend], tuple(need))(
        x, h, c, w_ih, w_hh, gates, c32, dh1, dc1)


class LSTMCellKernels:
    """lstm_cell's kernel ops on one backend: what LSTMCellFunction runs, pydl:: custom ops
    under torch.compile. In eager mode a call signature's plan (_LSTMCellPlan, a subclass)
    runs the same plans with its outputs' allocation fixed and without looking them up."""

    __slots__ = ("backend",)

    def __init__(self, backend: str):
        self.backend = backend

    def forward(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        """(h1, c1, the fp32 gate activations, the fp32 new cell state)."""
        return _lstm_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, self.backend)

    def backward(self, x, h, c, w_ih, w_hh, gates, c32, dh1, dc1, need):
        return _lstm_cell_bwd(x, h, c, w_ih, w_hh, gates, c32, dh1, dc1, need, self.backend)


class LSTMCellFunction(torch.autograd.Function):
    """(h1, c1) of one LSTM step for x (B, I), h and c (B, H) or None (zeros)."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh, ops: LSTMCellKernels):
        h1, c1, gates, c32 = ops.forward(x, h, c, w_ih, w_hh, b_ih, b_hh)
        ctx.save_for_backward(x, h, c, w_ih, w_hh, gates, c32)
        ctx.ops = ops
        ctx.set_materialize_grads(False)    # an output without a gradient: no zeros kernel
        return h1, c1

    @staticmethod
    def backward(ctx, dh1, dc1):
        if torch.is_grad_enabled():     # create_graph: the kernels' result is not differentiable
            return without_double_backward("lstm_cell", LSTMCellFunction._backward, ctx, dh1, dc1)
        return LSTMCellFunction._backward(ctx, dh1, dc1)

    @staticmethod
    def _backward(ctx, dh1, dc1):
        x, h, c, w_ih, w_hh, gates, c32 = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:7])     # False for an absent (None) input
        grads = ctx.ops.backward(x, h, c, w_ih, w_hh, gates, c32, dh1, dc1, need)
        return (*needed(grads, need), None)


@emulated("forward", "backward")
class _LSTMCellPlan(LSTMCellKernels):
    """An lstm_cell call signature's plan (pydl._plan; eager mode, a kernel backend): the
    outputs' allocation fixed, the forward's plan taken once, the backward's per need and
    upstream gradients' strides (and, in fp32, TF32 switch). The call's key (pydl/_rnn_checks.py)
    fixes everything else they are built from."""

    __slots__ = ("fp32", "empty", "new_h", "new_c32", "new_gates", "unread_c32", "unread_gates",
                 "fwd", "bwd")

    def __init__(self, backend: str, x, w_hh):
        super().__init__(backend)
        B, H = x.shape[0], w_hh.shape[1]
        self.fp32, self.empty = x.dtype == F32, not (B and H)
        self.new_h = output_maker((B, H), x.dtype, x.device)
        self.new_c32 = output_maker((B, H), F32, x.device)
        self.new_gates = output_maker((B, 4 * H), F32, x.device)
        # without a graph nothing reads them: one pair a plan, not two allocations a call
        self.unread_c32, self.unread_gates = WriteOnly(self.new_c32), WriteOnly(self.new_gates)
        self.fwd, self.bwd = None, {}

    def __call__(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        if needs_graph(x, h, c, w_ih, w_hh, b_ih, b_hh):
            return apply(LSTMCellFunction, x, h, c, w_ih, w_hh, b_ih, b_hh, self)
        h1, c1 = fresh(self.new_h), fresh(self.new_h)
        self._run(x, h, c, w_ih, w_hh, b_ih, b_hh, h1, c1, self.unread_c32(),
                  self.unread_gates())
        return h1, c1

    def forward(self, x, h, c, w_ih, w_hh, b_ih, b_hh):
        h1, c1 = fresh(self.new_h), fresh(self.new_h)
        c32, gates = fresh(self.new_c32), fresh(self.new_gates)
        self._run(x, h, c, w_ih, w_hh, b_ih, b_hh, h1, c1, c32, gates)
        return h1, c1, gates, c32

    def _run(self, x, h, c, w_ih, w_hh, b_ih, b_hh, h1, c1, c32, gates):
        if not self.empty:
            plan = self.fwd
            if plan is None:
                plan = _CELL_PLANS.get(_forward_key(self.backend, x, h, c, w_ih, w_hh, b_ih,
                                                    b_hh), _CellForward,
                                       CELL_LAUNCHERS[self.backend], ())
                if not capturing():
                    self.fwd = plan
            plan(x, h, c, w_ih, w_hh, b_ih, b_hh, h1, c1, c32, gates)

    def backward(self, x, h, c, w_ih, w_hh, gates, c32, dh1, dc1, need):
        key = (*need, sig(dh1), sig(dc1))
        if self.fp32:
            key += (tf32_key(F32, False),)
        plan = self.bwd.get(key)
        if plan is None:
            plan = _CELL_PLANS.get(_backward_key(self.backend, need, x, h, c, w_ih, w_hh, dh1,
                                                 dc1), _CellBackward,
                                   CELL_LAUNCHERS[self.backend], tuple(need))
            if not capturing():
                self.bwd[key] = plan
        return plan(x, h, c, w_ih, w_hh, gates, c32, dh1, dc1)


# --- implementations by backend -------------------------------------------------------------

_CELL_IMPLS: dict = {}     # backend -> pydl's own implementation


def _cell_plan(backend: str, impl, x, w_hh):
    """The eager plan of a call signature (pydl/_rnn_checks.py CellCall), where `impl` is
    pydl's own; None elsewhere."""
    return _LSTMCellPlan(backend, x, w_hh) if impl is _CELL_IMPLS.get(backend) else None


def _kernel_lstm_cell(backend: str):
    def impl(x, h, c, w_ih, w_hh, b_ih, b_hh):
        ops = LSTMCellKernels(backend)
        if needs_graph(x, h, c, w_ih, w_hh, b_ih, b_hh):
            return apply(LSTMCellFunction, x, h, c, w_ih, w_hh, b_ih, b_hh, ops)
        h1, c1, _, _ = ops.forward(x, h, c, w_ih, w_hh, b_ih, b_hh)
        return h1, c1
    return impl


for _name, _launch in LAUNCHERS.items():
    _CELL_IMPLS[_name] = register("lstm_cell", _name)(_kernel_lstm_cell(_name))
    register("lstm", _name)(layer_impl("lstm", LSTMRecurrence, _name, _launch, ALGOS[_name]))


@register("lstm_cell", "torch")
def _torch_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    B, H = x.shape[0], w_hh.shape[1]
    zeros = lambda: x.new_zeros(B, H)  # noqa: E731
    return torch._VF.lstm_cell(x, (zeros() if h is None else h, zeros() if c is None else c),
                               w_ih, w_hh, b_ih, b_hh)


@register("lstm", "torch")
def _torch_lstm(x, h0, c0, weights, cfg: RNNConfig, packed=None):
    L, D = cfg.num_layers, cfg.D
    B = x.shape[1]
    H = weights[0].shape[0] // 4
    P = weights[cfg.per_direction - 1].shape[0] if cfg.proj else H
    # torch tells projections from h0's width differing from c0's
    h0 = x.new_zeros(L * D, B, P) if h0 is None else h0
    c0 = x.new_zeros(L * D, B, H) if c0 is None else c0
    args = ((h0, c0), list(weights), cfg.bias, L, cfg.dropout, cfg.training, cfg.bidirectional)
    if packed is None:
        return torch._VF.lstm(x, *args, False)
    # torch's own packed LSTM on the packed rows, its output padded back for layer_output
    data = x.reshape(-1, x.shape[2]).index_select(0, packed.rows)
    out, h_n, c_n = torch._VF.lstm(data, packed.batch_sizes, *args)
    return (out.new_zeros(x.shape[0] * B, out.shape[1]).index_copy(0, packed.rows, out)
            .view(x.shape[0], B, -1), h_n, c_n)


# --- the public functions ---------------------------------------------------------------------

def _split_state(hx, name: str):
    """hx = (h, c), or None: (None, None)."""
    if hx is None:
        return None, None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        length = f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""
        raise TypeError(f"{name} must be a pair (h, c) of tensors or None, got "
                        f"{type(hx).__name__}{length}")
    if (hx[0] is None) != (hx[1] is None):
        raise ValueError(f"{name} must hold both h and c (or be None for zeros), got one None")
    return hx[0], hx[1]


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """One LSTM step, as torch.nn.LSTMCell: returns (h1, c1).

    input (B, I) or unbatched (I,); hx = (h, c), each (B, H) (or (H,)), or None for zeros;
    w_ih (4H, I), w_hh (4H, H), b_ih / b_hh (4H,) or None; gate order i, f, g, o.
    """
    states = _split_state(hx, "hx")
    input, h, c, w_ih, w_hh, b_ih, b_hh = autocast_inputs("lstm_cell", input, *states, w_ih,
                                                          w_hh, b_ih, b_hh)
    states = (h, c)
    return cell_call("lstm_cell", 4, _cell_plan, input, states, w_ih, w_hh, b_ih, b_hh,
                     backend)(input, states, w_ih, w_hh, b_ih, b_hh)


def lstm(input, hx, weights, *, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
         dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
         backend=None, algo=None, recompute: bool = False):
    """A multi-layer LSTM over a sequence, as torch.nn.LSTM (proj_size included): returns
    (output, (h_n, c_n)).

    input:   (T, B, I), (B, T, I) with batch_first, unbatched (T, I), or a PackedSequence
             (as torch.nn.LSTM takes it: hx in the caller's batch order; output packed)
    hx:      (h0, c0), each (num_layers * D, B, H) (unbatched: (num_layers * D, H)), or None
             for zeros; D = 2 if bidirectional else 1; with projections h0 is
             (num_layers * D, B, P)
    weights: the flat list torch.nn.LSTM keeps in `_flat_weights` (per layer, per direction:
             w_ih (4H, I or D*H), w_hh (4H, H), then b_ih, b_hh (4H,) when bias); with
             projections (proj_size P < H: h_t = W_hr (o_t * tanh(c_t))) also w_hr (P, H)
             last, w_hh is (4H, P) and the next layer's w_ih (4H, D*P): told from the count
    dropout: applied to the outputs of every layer but the last, when training
    algo:    "persistent" (default: one launch per layer and direction for the whole
             sequence, its programs meeting at a grid barrier between steps) or "steps"
             (one launch per time step)
    recompute: keep no gate activations (T * B * 4H fp32 per layer and direction) between
             forward and backward; the backward recomputes them one layer and direction at a
             time (one GEMM and two step launches), so its peak holds one direction's only,
             and writes the gate gradients in their place
    output:  (T, B, D*H) ((B, T, D*H) with batch_first: a transposed view, as torch's CPU
             LSTM returns; (T, D*H) unbatched; D*P for H with projections); h_n, c_n shaped
             like h0, c0.
    """
    h0, c0 = _split_state(hx, "hx")
    out, (h_n, c_n) = run_layer(
        "lstm", 4, input, (h0, c0), weights, num_layers=num_layers, bias=bias,
        batch_first=batch_first, dropout=dropout, training=training, bidirectional=bidirectional,
        backend=backend, algo=algo, recompute=recompute)
    return out, (h_n, c_n)


__all__ = ["lstm_cell", "lstm", "lstm_weight_names", "LSTMCellFunction", "LSTMRecurrence",
           "ALGOS"]
