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

from . import _rnn_launch
from ._autograd import without_double_backward
from ._launch import WriteOnly, fresh, new_output, output_maker
from ._library import autocast_inputs, kernel_op
from ._plan import Cache, apply, capturing, emulated, needs_graph
from ._rnn_checks import cell_call, run_layer
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
from .rnn import Plans, cell_grads_fake, layer_impl, needed, seq_rows, sig, steps_after_first

F32 = torch.float32
TUNERS = {name: Tuner(name) for name in ("gru_layer_fwd", "gru_layer_bwd")}

# The ranks of the recurrence kernels' tensor arguments, in order (a Numba kernel is compiled
# for them: an absent tensor's placeholder has its rank).
FWD_RANKS = (3, 2, 3, 1, 1, 2, 2, 3, 3, 2, 1)
BWD_RANKS = (3, 3, 2, 2, 3, 2, 1, 3, 3, 3, 2)


class TritonGRU(TritonRNN):
    """The GRU's recurrence kernels on Triton (plus the shared launches of TritonRNN)."""

    @classmethod
    def forward_plan(cls, mode, x, w_ih, xp, b_ih, b_hh, h0, w_hh, out, ws, hn, bs,
                     reverse: bool):
        """The launch of one direction's forward (kernels/triton/gru.py gru_layer_fwd),
        rec(x, w_ih, xp, b_ih, b_hh, h0, w_hh, out, ws, hn, bs): x / w_ih (the cell:
        (T, B, I)), xp (a layer: (T, B, 3H) fp32), biases, h0 (B, H), hn, bs may be None.
        Sequences may be 2-D (one step)."""
        from .kernels.triton import gru as k
        T, B, H = seq_shape(out)
        I = x.shape[-1] if x is not None else 0
        dt = out.dtype
        flags = dict(REVERSE=reverse, HAS_X=x is not None, HAS_XP=xp is not None,
                     HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, HAS_H0=h0 is not None,
                     WRITE_HN=hn is not None, HAS_BS=bs is not None,
                     PRECISION=cls.precision(dt, dt, dt))
        tensors = (x, w_ih, xp, b_ih, b_hh, h0, w_hh, out, ws, hn, bs)
        scalars = (T, B, I, H, *seq_strides(x), *_strides(w_ih, 2), *_strides(b_ih, 1),
                   *_strides(b_hh, 1), *seq_strides(xp), *_strides(h0, 2), *w_hh.stride(),
                   *seq_strides(out), *seq_strides(ws), *_strides(hn, 2))
        return cls.recurrence(k.gru_layer_fwd, TUNERS["gru_layer_fwd"], "gru_layer_fwd", mode,
                              tensors, FWD_RANKS, scalars, flags, B, H, max(I, H), dt, T,
                              out.device, None, inout=aliased((ws,), (xp,)))

    @classmethod
    def backward_plan(cls, mode, ws, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dhd, dh0,
                      reverse: bool, model: torch.dtype):
        """The launch of one direction's backward through time (gru_layer_bwd),
        rec(ws, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dhd, dh0): out (T, B, H) the
        forward's output (each step's starting state); dgi, dgh (T, B, 3H) written; dh0 by
        the pseudo-step when given; h0, d_out, d_hn, bs may be None; dhd the workspace,
        (backward_planes, B, H) fp32 contiguous (kernels/triton/rnn.py step_workspace)."""
        from .kernels.triton import gru as k
        T, B, H = seq_shape(out)
        check_workspace(dhd, cls.backward_planes(B, H, 3 * H, w_hh.dtype, out.device), B, H)
        bcast = cls.broadcast(w_hh.dtype)
        flags = dict(REVERSE=reverse, HAS_H0=h0 is not None, HAS_DOUT=d_out is not None,
                     HAS_DHN=d_hn is not None, HAS_BS=bs is not None, BCAST=bcast,
                     PRECISION=cls.precision(w_hh.dtype if bcast else F32, w_hh.dtype, model))
        # dgi and dgh in ws itself (GRURecurrence.Backward, in_place): the kernel's IN_WS
        inout = aliased((dgi, dgh), (ws,))
        flags["IN_WS"] = bool(inout)
        tensors = (ws, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dhd, dh0)
        scalars = (T, B, H, *seq_strides(ws), *seq_strides(out), *_strides(h0, 2),
                   *w_hh.stride(), *seq_strides(d_out), *_strides(d_hn, 2), *seq_strides(dgi),
                   *seq_strides(dgh), *dhd.stride(), *_strides(dh0, 2))
        return cls.recurrence(k.gru_layer_bwd, TUNERS["gru_layer_bwd"], "gru_layer_bwd", mode,
                              tensors, BWD_RANKS, scalars, flags, B, H, 3 * H, model,
                              T + 1 if dh0 is not None else T, out.device,
                              cls.backward_operands(w_hh.dtype), inout=inout[:1])


class TritonGRUCell(TritonGRU):
    cudnn = False   # torch's GRUCell is a cuBLAS matmul: its TF32 setting is the matmul one


class NumbaGRU(NumbaRNN):
    """Same methods as TritonGRU, on the Numba kernels (kernels/numba/gru.py)."""

    @classmethod
    def forward_plan(cls, mode, x, w_ih, xp, b_ih, b_hh, h0, w_hh, out, ws, hn, bs,
                     reverse: bool):
        from .kernels.numba import gru as k
        T, B, H = seq_shape(out)
        tensors = (x, w_ih, xp, b_ih, b_hh, h0, w_hh, out, ws, hn, bs)
        scalars = (reverse, x is not None, xp is not None, b_ih is not None, b_hh is not None,
                   h0 is not None, hn is not None, bs is not None, _code(w_hh), _code(xp),
                   _code(b_ih if b_ih is not None else b_hh), _code(h0), _code(out), _code(hn))
        return cls.recurrence(k.gru_layer_fwd_kernel, mode, tensors, FWD_RANKS, scalars, B, H, T,
                              out.device)

    @classmethod
    def backward_plan(cls, mode, ws, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dhd, dh0,
                      reverse: bool, model):
        from .kernels.numba import gru as k
        T, B, H = seq_shape(out)
        tensors = (ws, out, h0, w_hh, d_out, d_hn, bs, dgi, dgh, dhd, dh0)
        scalars = (reverse, h0 is not None, d_out is not None, d_hn is not None,
                   bs is not None, dh0 is not None,
                   bool(aliased((dgi, dgh), (ws,))),    # dgi, dgh in ws (in_ws)
                   _code(out), _code(h0), _code(w_hh), _code(d_out), _code(d_hn), _code(dh0))
        return cls.recurrence(k.gru_layer_bwd_kernel, mode, tensors, BWD_RANKS, scalars, B, H,
                              T + 1 if dh0 is not None else T, out.device)


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

    class Forward(Plans):
        """One direction's recurrence in a layer's forward plan: the recurrence launched
        (its launch built on the first call)."""

        def workspace(self, dev, keep=True):
            """(ws, xp): the fp32 workspace r, z, n, gh_n (T, B, 4H) and, in its first 3H
            columns, the input projection gi; each tile of the recurrence reads its elements
            of gi before it writes r, z, n there (kernels/triton/gru.py). keep False: gi
            alone (T, B, 3H), r, z, n, gh_n (which nothing reads then) into one (B, 4H)
            plane the plan keeps."""
            T, B, H = self.dims
            if not keep:
                return (self.unread("ws_run", (T, B, 4 * H), F32, dev, (0, 4 * H, 1)),
                        self.new("xp_run", (T, B, 3 * H), F32, dev))
            ws = self.new("ws", (T, B, 4 * H), F32, dev)
            return ws, ws.narrow(2, 0, 3 * H)

        def __call__(self, ws, xp, b_hh, h0, c0, w_hh, w_hr, out, h_n, c_n, bs, keep=True):
            if self.dims[1]:
                self.forward("fwd" if keep else "fwd_run", None, None, xp, None, b_hh, h0, w_hh,
                             out, ws, h_n, bs)
            return ws, None, None

    class Recompute(Forward):
        """Forward's workspace again: every step starts from a saved state (h0, or the output
        of the step before), so all run at once, one launch over T*B rows (and one for the
        first step). The new states it writes are scratch. Returns (ws, None)."""

        def __call__(self, ws, xp, b_hh, h0, c0, w_hh, out, cs):
            T, B, H = self.dims
            h_tmp = new_output((T, B, H), out.dtype, out.device)
            if B == 0:
                return ws, None
            t0, rest, prev = steps_after_first(T, self.reverse)
            self.forward("first", None, None, xp[t0], None, b_hh, h0, w_hh, h_tmp[t0], ws[t0],
                         None, None, mode="steps", reverse=False)
            if T > 1:
                r = seq_rows
                self.forward("rest", None, None, r(xp[rest]), None, b_hh, r(out[prev]), w_hh,
                             r(h_tmp[rest]), r(ws[rest]), None, None, mode="steps",
                             reverse=False)
            return ws, None

    class Backward(Plans):
        """BPTT of one direction; returns (dgi, dgh), the fp32 gradients (T, B, 3H) of
        gi = x W_ih^T + b_ih and of gh = h W_hh^T + b_hh; writes dh0 where given.

        in_place (nothing reads the activations after this backward: recomputed ones, or
        the saved ones on a forward's first backward, pydl/rnn.py LayerPlan.backward): both
        go into the workspace in place of the activations, dgh = ws[..., :3H] and dgi =
        ws's [r, z] and [n] column blocks, returned as its parts ((ws[..., :2H], 0),
        (ws[..., 3H:], 2H)): (T, B, 6H) fp32 less at the backward's peak
        (kernels/triton/gru.py _bwd_cell IN_WS, the Numba kernel's in_ws). Otherwise dgi
        has buffers of its own, returned as the same two column blocks, so that dX, dW_ih
        and db_ih are the same sums either way (the kernel op torch.compile runs, which
        never writes in place, gives eager mode's gradients bit for bit)."""

        def __call__(self, acts, cs, h0, c0, out, w_hh, w_hr, d_out, d_hn, d_cn, dh0, dc0, bs,
                     in_place: bool = False):
            T, B, H = self.dims
            dev = out.device
            if in_place:
                dgi, dgh = acts, acts[:, :, :3 * H]
                parts = ((acts[:, :, :2 * H], 0), (acts[:, :, 3 * H:], 2 * H))
            else:
                dgi = self.new("dgi", (T, B, 3 * H), F32, dev)
                dgh = self.new("dgh", (T, B, 3 * H), F32, dev)
                parts = ((dgi[:, :, :2 * H], 0), (dgi[:, :, 2 * H:], 2 * H))
            if B:
                dhd = self.new("dhd", lambda: (self.launch.backward_planes(
                    B, H, 3 * H, w_hh.dtype, dev), B, H), F32, dev)
                # a launch of its own in place (its IN_WS flag is built from the aliasing)
                self.backward("bwd_in_place" if in_place else "bwd", acts, out, h0, w_hh, d_out,
                              d_hn, bs, dgi, dgh, dhd, dh0,
                              model=out.dtype)
            return parts, dgh


# --- the cell ---------------------------------------------------------------------------------
# A cell step is the layer's recurrence kernel over one step (its 2-D tensors are one-step
# sequences), both products inside (HAS_X). The kernel ops look their plans up per signature.

class _CellForward(Plans):
    def __call__(self, x, h, w_ih, w_hh, b_ih, b_hh, h1, ws):
        self.forward("fwd", x, w_ih, None, b_ih, b_hh, h, w_hh, h1, ws, None, None)


class _CellBackward(Plans):
    """The `need`ed gradients of (x, h, w_ih, w_hh, b_ih, b_hh): the backward kernel over one
    step gives the pre-activation gradients dgi, dgh (B, 3H) and the direct path dh1 * z, its
    pseudo-step dh = dgh W_hh + dh1 z; then GEMMs and column sums."""

    def __init__(self, launch, need):
        super().__init__(launch)
        self.need = need

    def __call__(self, x, h, w_ih, w_hh, ws, dh1):
        need = self.need
        B, H = dh1.shape
        dev, model = x.device, x.dtype
        dgi = new_output((B, 3 * H), F32, dev)
        dgh = new_output((B, 3 * H), F32, dev)
        dh = new_output(h.shape, h.dtype, dev) if need[1] else None
        if B and H:
            # h1 = ... + z h: the step's output sequence is not needed, h is the state it
            # started from (the kernel reads it as h0 at the first and only step)
            dhd = self.new("dhd", lambda: (self.launch.backward_planes(
                B, H, 3 * H, w_hh.dtype, dev), B, H), F32, dev)
            self.backward("bwd", ws, dh1, h, w_hh, dh1, None, None, dgi, dgh, dhd, dh,
                          model=model)
        dx, dw_ih, dw_hh = cell_input_grads(self, x, h, w_ih, w_hh, dgi, dgh, need[0], need[2],
                                            need[3], model)
        db_ih = db_hh = None
        if need[4]:
            db_ih = new_output((3 * H,), w_ih.dtype, dev)
            self.bias_grad("db_ih", dgi, db_ih)
        if need[5]:
            db_hh = new_output((3 * H,), w_ih.dtype, dev)
            self.bias_grad("db_hh", dgh, db_hh)
        return [t for t, n in zip((dx, dh, dw_ih, dw_hh, db_ih, db_hh), need) if n]


_CELL_PLANS = Cache("gru_cell launches")


def _gru_cell_fwd_fake(x, h, w_ih, w_hh, b_ih, b_hh, backend):
    B, H = x.shape[0], w_hh.shape[1]
    return x.new_empty((B, H)), x.new_empty((B, 4 * H), dtype=F32)


def _forward_key(backend, x, h, w_ih, w_hh, b_ih, b_hh):
    return ("fwd", backend, tf32_key(x.dtype, False), x.shape, x.stride(), x.dtype, x.device,
            sig(h), w_ih.shape, w_ih.stride(), w_hh.shape, w_hh.stride(), sig(b_ih), sig(b_hh))


def _backward_key(backend, need, x, h, w_ih, w_hh, dh1):
    return ("bwd", backend, tf32_key(x.dtype, False), tuple(need), x.shape, x.stride(),
            x.dtype, x.device, sig(h), w_ih.shape, w_ih.stride(), w_hh.shape, w_hh.stride(),
            dh1.stride())


@kernel_op("gru_cell_fwd", _gru_cell_fwd_fake)
def _gru_cell_fwd(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor,
                  b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                  backend: str) -> tuple[Tensor, Tensor]:
    """(h1, the fp32 workspace r, z, n, gh_n the backward reads)."""
    B, H = x.shape[0], w_hh.shape[1]
    dt, dev = x.dtype, x.device
    h1 = new_output((B, H), dt, dev)
    ws = new_output((B, 4 * H), F32, dev)
    if B and H:
        _CELL_PLANS.get(_forward_key(backend, x, h, w_ih, w_hh, b_ih, b_hh), _CellForward,
                        CELL_LAUNCHERS[backend])(x, h, w_ih, w_hh, b_ih, b_hh, h1, ws)
    return h1, ws


@kernel_op("gru_cell_bwd", lambda x, h, w_ih, w_hh, ws, dh1, need, backend: cell_grads_fake(
    x, h, None, w_ih, w_hh, [*need[:2], False, *need[2:]], 3))
def _gru_cell_bwd(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, ws: Tensor,
                  dh1: Tensor, need: list[bool], backend: str) -> list[Tensor]:
    """The `need`ed gradients of (x, h, w_ih, w_hh, b_ih, b_hh)."""
    return _CELL_PLANS.get(_backward_key(backend, need, x, h, w_ih, w_hh, dh1), _CellBackward,
                           CELL_LAUNCHERS[backend], tuple(need))(x, h, w_ih, w_hh, ws, dh1)


class GRUCellKernels:
    """gru_cell's kernel ops on one backend: what GRUCellFunction runs, pydl:: custom ops
    under torch.compile. In eager mode a call signature's plan (_GRUCellPlan, a subclass)
    runs the same plans with its outputs' allocation fixed and without looking them up."""

    __slots__ = ("backend",)

    def __init__(self, backend: str):
        self.backend = backend

    def forward(self, x, h, w_ih, w_hh, b_ih, b_hh):
        """(h1, the fp32 workspace the backward reads)."""
        return _gru_cell_fwd(x, h, w_ih, w_hh, b_ih, b_hh, self.backend)

    def backward(self, x, h, w_ih, w_hh, ws, dh1, need):
        return _gru_cell_bwd(x, h, w_ih, w_hh, ws, dh1, need, self.backend)


class GRUCellFunction(torch.autograd.Function):
    """h1 of one GRU step for x (B, I) and h (B, H) or None (zeros)."""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, ops: GRUCellKernels):
        h1, ws = ops.forward(x, h, w_ih, w_hh, b_ih, b_hh)
        ctx.save_for_backward(x, h, w_ih, w_hh, ws)
        ctx.ops = ops
        return h1

    @staticmethod
    def backward(ctx, dh1):
        if torch.is_grad_enabled():     # create_graph: the kernels' result is not differentiable
            return without_double_backward("gru_cell", GRUCellFunction._backward, ctx, dh1)
        return GRUCellFunction._backward(ctx, dh1)

    @staticmethod
    def _backward(ctx, dh1):
        x, h, w_ih, w_hh, ws = ctx.saved_tensors
        need = list(ctx.needs_input_grad[:6])     # False for an absent (None) input
        grads = ctx.ops.backward(x, h, w_ih, w_hh, ws, dh1, need)
        return (*needed(grads, need), None)


@emulated("forward", "backward")
class _GRUCellPlan(GRUCellKernels):
    """A gru_cell call signature's plan (pydl._plan; eager mode, a kernel backend): the
    outputs' allocation fixed, the forward's plan taken once, the backward's per need and
    upstream gradient's strides (and, in fp32, TF32 switch). The call's key
    (pydl/_rnn_checks.py) fixes everything else they are built from."""

    __slots__ = ("fp32", "empty", "new_h", "new_ws", "unread_ws", "fwd", "bwd")

    def __init__(self, backend: str, x, w_hh):
        super().__init__(backend)
        B, H = x.shape[0], w_hh.shape[1]
        self.fp32, self.empty = x.dtype == F32, not (B and H)
        self.new_h = output_maker((B, H), x.dtype, x.device)
        self.new_ws = output_maker((B, 4 * H), F32, x.device)
        self.unread_ws = WriteOnly(self.new_ws)    # without a graph nothing reads it
        self.fwd, self.bwd = None, {}

    def __call__(self, x, h, w_ih, w_hh, b_ih, b_hh):
        if needs_graph(x, h, w_ih, w_hh, b_ih, b_hh):
            return apply(GRUCellFunction, x, h, w_ih, w_hh, b_ih, b_hh, self)
        h1 = fresh(self.new_h)
        self._run(x, h, w_ih, w_hh, b_ih, b_hh, h1, self.unread_ws())
        return h1

    def forward(self, x, h, w_ih, w_hh, b_ih, b_hh):
        h1, ws = fresh(self.new_h), fresh(self.new_ws)
        self._run(x, h, w_ih, w_hh, b_ih, b_hh, h1, ws)
        return h1, ws

    def _run(self, x, h, w_ih, w_hh, b_ih, b_hh, h1, ws):
        if not self.empty:
            plan = self.fwd
            if plan is None:
                plan = _CELL_PLANS.get(_forward_key(self.backend, x, h, w_ih, w_hh, b_ih, b_hh),
                                       _CellForward, CELL_LAUNCHERS[self.backend])
                if not capturing():
                    self.fwd = plan
            plan(x, h, w_ih, w_hh, b_ih, b_hh, h1, ws)

    def backward(self, x, h, w_ih, w_hh, ws, dh1, need):
        key = (*need, dh1.stride())
        if self.fp32:
            key += (tf32_key(F32, False),)
        plan = self.bwd.get(key)
        if plan is None:
            plan = _CELL_PLANS.get(_backward_key(self.backend, need, x, h, w_ih, w_hh, dh1),
                                   _CellBackward, CELL_LAUNCHERS[self.backend], tuple(need))
            if not capturing():
                self.bwd[key] = plan
        return plan(x, h, w_ih, w_hh, ws, dh1)


# --- implementations by backend -------------------------------------------------------------

_CELL_IMPLS: dict = {}     # backend -> pydl's own implementation


def _cell_plan(backend: str, impl, x, w_hh):
    """The eager plan of a call signature (pydl/_rnn_checks.py CellCall), where `impl` is
    pydl's own; None elsewhere."""
    return _GRUCellPlan(backend, x, w_hh) if impl is _CELL_IMPLS.get(backend) else None


def _kernel_gru_cell(backend: str):
    def impl(x, h, w_ih, w_hh, b_ih, b_hh):
        ops = GRUCellKernels(backend)
        if needs_graph(x, h, w_ih, w_hh, b_ih, b_hh):
            return apply(GRUCellFunction, x, h, w_ih, w_hh, b_ih, b_hh, ops)
        return ops.forward(x, h, w_ih, w_hh, b_ih, b_hh)[0]
    return impl


for _name, _launch in LAUNCHERS.items():
    _CELL_IMPLS[_name] = register("gru_cell", _name)(_kernel_gru_cell(_name))
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
    input, hx, w_ih, w_hh, b_ih, b_hh = autocast_inputs("gru_cell", input, hx, w_ih, w_hh, b_ih,
                                                        b_hh)
    states = (hx,)
    return cell_call("gru_cell", 3, _cell_plan, input, states, w_ih, w_hh, b_ih, b_hh,
                     backend)(input, states, w_ih, w_hh, b_ih, b_hh)


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
             a time, and writes the gate gradients in their place (no
             T * B * 6H fp32 of gradient buffers): the lowest peak memory
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
