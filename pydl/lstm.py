"""LSTM: the fused cell and the full multi-layer, bidirectional layer, forward and backward
through time. Argument checks, autograd Functions, kernel launches; and the layer machinery
the GRU shares (pydl/gru.py): RNNFunction runs the stack (layers, directions, input
projections, dropout, the backward's weight-gradient GEMMs and accumulation) over a "cell"
object that says the gate count, whether there is a cell state, and runs one direction's
recurrence forward, recomputed and backward (LSTMRecurrence here, GRURecurrence there).

Kernels: kernels/{triton,numba}/lstm.py (the fused forward and backward steps, the
persistent layer, bias sums, dropout's product); GEMMs as described under "GEMMs" below.
torch computes nothing on the kernel path; it allocates buffers and, for dropout between
layers, draws the mask with its own random generator (bernoulli_, as torch's CPU LSTM and
GRU do, so the masks are the ones torch would draw from the same seed there).

The cell (pydl.lstm_cell / nn.LSTMCell), forward in ONE kernel:
    gates = x W_ih^T + h W_hh^T + b_ih + b_hh; i, f, o = sigmoid; g = tanh;
    c1 = f c + i g; h1 = o tanh(c1)
saving the fp32 activations (i, f, g, o) and an fp32 copy of c1 (4H + H floats a row).
Backward: one elementwise kernel for the gate gradients dg (B, 4H) and dc, then GEMMs
dx = dg W_ih, dh = dg W_hh, dW_ih = dg^T x, dW_hh = dg^T h, and a column sum for the biases
(db_ih = db_hh). Mixed-dtype products (fp32 dg times fp16 weights) run in fp32.

The layer (pydl.lstm / nn.LSTM), per layer and direction:
    xp = X W_ih^T + b_ih for ALL time steps: one GEMM, (T, B, 4H) fp32;
    then the recurrence, by algo:
      "steps"       one fused kernel per time step (h_{t-1} W_hh^T + xp[t] + b_hh, the
                    nonlinearities and the state update), h_t written into the output;
      "persistent"  (Triton, hidden_size <= 64) one launch for the whole sequence: each
                    program owns a block of batch rows and all hidden units, so no program
                    waits for another between steps (no grid-wide synchronisation), and
                    W_hh, h and c stay in registers throughout.
Backward through time walks each direction's steps in reverse run order, one fused kernel
per step: dh_t = dg_{t+1} W_hh as the GEMM prologue of the gate-gradient math (so one launch
per step each way), or one persistent launch; then the weight gradients as GEMMs summed over
every (t, b) row at once (dW_hh pairs dg_t with the output one step earlier, h0 for the
first step), dX = dg W_ih for all steps (both directions summed in an fp32 buffer), and the
bias column sums. Dropout's mask multiplies the gradient on its way to the layer below.

Projections (torch's proj_size P < H; weights w_hr (P, H) per layer and direction, told by
the weight count): h_t = m_t W_hr^T with m_t = o_t * tanh(c_t). The step kernel's recurrent
product runs over K = P (W_hh is (4H, P)) and writes m_t; one GEMM per step projects it into
the output, the next step's recurrent input. m (T, B, H) is saved (with recompute= the
recomputation's scratch states are m). Backward: dm_t = dh_t W_hr with dh_t = d_out[t]
(+ d_hn) + dg_{t+1} W_hh, i.e. dm_t = d_out[t] W_hr + dg_{t+1} (W_hh W_hr): the same per-step
kernel on W_hh W_hr (4H, H) after two GEMMs; dW_hr = sum_t dh_t^T m_t from GEMMs over all
(t, b) rows (_grad_w_hr). Not with algo="persistent".

GEMMs: same-dtype products without a reduction over a batch axis (the input projection; dx
and dh in fp32) run on the library's shared Triton GEMM (pydl/_gemm.py); the others (fp32
dg times fp16/bf16 weights, weight gradients summed over time steps whose (t, b) rows do not
merge into one stride, e.g. a batch_first input) on `gemm_batched` in kernels/triton/lstm.py,
which has the shared Numba GEMM's semantics.

The c state is carried in fp32 between steps (torch carries it in the input dtype); h is
rounded to the dtype, as it is an output and the next step's GEMM operand.

Gate activations and cell states are kept in fp32 workspaces (5H floats per row and step)
whatever the dtype: the backward then loses nothing to fp16 rounding of saved values.
With recompute=True the gate activations (4H of the 5H) are not kept past the forward: the
backward recomputes them one layer and direction at a time, just before that direction's
BPTT, from what is saved anyway (the layer's input, its output h_t and the cell states c_t):
the input projection again, then the step kernel over all T*B rows at once (every step's
starting state is saved, so the steps need not run in order; two launches), into a scratch
buffer freed after the direction. This holds for algo="persistent" too (the recomputation
uses the step kernel; the persistent backward then reads its output).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from . import _env
from ._checks import check_tensor
from ._library import autocast_inputs, kernel_op
from ._launch import (cdiv, dot_block, input_precision, new_output, next_power_of_2, numba_array,
                      numba_blocks, numba_stream, numba_threads)
from ._tune import Tuner, aliased, bucket
from .backends import dispatch, register

F32 = torch.float32

# algo="persistent" keeps four BLOCK_H x BLOCK_H tiles of W_hh in registers.
PERSISTENT_MAX_HIDDEN = 64


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


# --- Triton launch --------------------------------------------------------------------------

# Tuning space of the fused RNN step kernels (LSTM and GRU, forward and backward): (BLOCK_B
# batch rows, BLOCK_H hidden units, BLOCK_K, warps, stages). A step is a small GEMM (batch x
# gates*hidden, K = hidden) with a fused epilogue, launched once per time step: the tile
# decides how many of the 132 SMs a step can use, against how much W_hh each one re-reads.
STEP_SPACE = ((64, 32, 64, 4, 3), (32, 64, 64, 4, 3), (16, 64, 64, 4, 3), (64, 64, 32, 8, 3),
              (16, 32, 128, 4, 3), (32, 32, 64, 4, 4))
STEP_TUNERS = {name: Tuner(name) for name in
               ("lstm_step_fwd", "lstm_step_bwd", "gru_step_fwd", "gru_step_bwd")}


def step_config(name: str, B: int, H: int, K: int, dtype: torch.dtype, flags: dict, launch,
                inout: tuple = ()) -> dict:
    """The tile of one fused RNN step kernel over B batch rows x H units with a K-deep
    recurrent (or input) product; tuned once per shape and options (pydl/_tune.py), so a
    layer's T steps reuse the first step's choice."""
    default = dict(BLOCK_B=dot_block(B, 32), BLOCK_H=dot_block(H, 32),
                   BLOCK_K=dot_block(K, 32), num_warps=4)
    candidates = [default] + [
        dict(BLOCK_B=dot_block(B, bb), BLOCK_H=dot_block(H, bh), BLOCK_K=dot_block(K, bk),
             num_warps=warps, num_stages=stages) for bb, bh, bk, warps, stages in STEP_SPACE]
    key = (dtype, bucket(B, hi=1 << 12), H, K, tuple(sorted(flags.items())))
    return STEP_TUNERS[name].pick(key, candidates, launch, inout)


class _TritonLSTM:
    # fp32 dots round as torch's cuDNN RNN (the layer) does; the cells' launcher below rounds
    # as torch's LSTMCell, a cuBLAS matmul (pydl._launch.input_precision)
    CUDNN_TF32 = True

    @classmethod
    def step_fwd(cls, x, w_ih, xp, b_ih, b_hh, h, c, w_hh, h1, c1, hn, cn, gates) -> None:
        """One fused step (see kernels/triton/lstm.py): any of x/w_ih, xp, biases, h, c, hn,
        cn may be None."""
        from .kernels.triton import lstm as k
        B, H = h1.shape
        P = w_hh.shape[1]   # h's width: H, or proj_size with projections
        I = x.shape[1] if x is not None else 0
        d = h1
        flags = dict(HAS_X=x is not None, HAS_XP=xp is not None, HAS_BIH=b_ih is not None,
                     HAS_BHH=b_hh is not None, HAS_H=h is not None, HAS_C=c is not None,
                     WRITE_HN=hn is not None, WRITE_CN=cn is not None,
                     INPUT_PRECISION=input_precision(h1.dtype, cudnn=cls.CUDNN_TF32))

        def launch(cfg):
            k.lstm_step_fwd[(cdiv(B, cfg["BLOCK_B"]), cdiv(H, cfg["BLOCK_H"]))](
                x if x is not None else d, w_ih if w_ih is not None else d,
                xp if xp is not None else d, b_ih if b_ih is not None else d,
                b_hh if b_hh is not None else d, h if h is not None else d,
                c if c is not None else d, w_hh, h1, c1,
                hn if hn is not None else d, cn if cn is not None else d, gates,
                B, I, H, P, *_strides(x, 2), *_strides(w_ih, 2), *_strides(xp, 2),
                *_strides(h, 2), *_strides(c, 2), *w_hh.stride(), *h1.stride(), *c1.stride(),
                *_strides(hn, 2), *_strides(cn, 2), *gates.stride(), **flags, **cfg)

        launch(step_config("lstm_step_fwd", B, H, max(I, P), h1.dtype, flags, launch,
                           aliased((h1, c1, hn, cn, gates), (x, xp, h, c))))

    @classmethod
    def step_bwd(cls, gates, c_prev, c1, dg_next, w_hh, dh_a, dh_b, dc, dg, dc_prev) -> None:
        """One fused backward step (dh = dg_next W_hh, then the gate gradients); c_prev,
        dg_next, dh_a, dh_b, dc, dc_prev may be None."""
        from .kernels.triton import lstm as k
        B, H = c1.shape
        d = c1
        flags = dict(HAS_CPREV=c_prev is not None, HAS_DGN=dg_next is not None,
                     HAS_DHA=dh_a is not None, HAS_DHB=dh_b is not None, HAS_DC=dc is not None,
                     WRITE_DCPREV=dc_prev is not None,
                     INPUT_PRECISION=input_precision(F32, cudnn=cls.CUDNN_TF32))

        def launch(cfg):
            k.lstm_step_bwd[(cdiv(B, cfg["BLOCK_B"]), cdiv(H, cfg["BLOCK_H"]))](
                gates, c_prev if c_prev is not None else d, c1,
                dg_next if dg_next is not None else d, w_hh, dh_a if dh_a is not None else d,
                dh_b if dh_b is not None else d, dc if dc is not None else d, dg,
                dc_prev if dc_prev is not None else d, B, H,
                *gates.stride(), *_strides(c_prev, 2), *c1.stride(), *_strides(dg_next, 2),
                *w_hh.stride(), *_strides(dh_a, 2), *_strides(dh_b, 2), *_strides(dc, 2),
                *dg.stride(), *_strides(dc_prev, 2), **flags, **cfg)

        launch(step_config("lstm_step_bwd", B, H, 4 * H, F32, flags, launch,
                           aliased((dg, dc_prev), (gates, c_prev, dg_next, dh_a, dh_b, dc))))

    @classmethod
    def gemm(cls, a, b, out, c_in=None, bias=None) -> None:
        """out[b1, b2] = a[b1, b2] @ b[b1, b2] (+ c_in) (+ bias[b1] per column), 4-D views;
        a size-1 batch axis of an operand broadcasts, and out's second batch axis of size 1
        sums over the operands' (the semantics of pydl/_gemm_numba.py's gemm)."""
        from .kernels.triton import lstm as k
        B1, B2c, M, N = out.shape
        K = a.shape[3]
        B2 = a.shape[1] if a.shape[1] != 1 else b.shape[1]
        n_red = B2 if (B2c == 1 and B2 != 1) else 1
        if out.numel() == 0:
            return
        if n_red == 1 and a.dtype == b.dtype:
            # the library's shared GEMM (pydl/_gemm.py) covers same-dtype products without a
            # reduction over a batch axis: the input projection, and dx / dh in fp32
            from ._gemm import gemm
            gemm(a, b, out, addend=c_in, bias=bias,
                 input_precision=input_precision(a.dtype, cudnn=cls.CUDNN_TF32))
            return

        def batch_strides(t):
            return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in (0, 1)) + tuple(t.stride()[2:])

        dot_f32 = a.dtype != b.dtype or a.dtype == F32
        cfg = dict(BLOCK_M=dot_block(M, 64), BLOCK_N=dot_block(N, 64),
                   BLOCK_K=dot_block(K, 32), num_warps=4)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), min(B1 * B2c, 65535))
        k.gemm_batched[grid](
            a, b, c_in if c_in is not None else out, out, bias if bias is not None else out,
            M, N, K, B1 * B2c, B2c, n_red,
            *batch_strides(a), *batch_strides(b),
            *(batch_strides(c_in) if c_in is not None else (0,) * 4), *out.stride(),
            *((0 if bias.shape[0] == 1 else bias.stride(0), bias.stride(1))
              if bias is not None else (0, 0)),
            ACCUMULATE=c_in is not None, HAS_BIAS=bias is not None, DOT_F32=dot_f32,
            INPUT_PRECISION=input_precision(F32, cudnn=cls.CUDNN_TF32) if dot_f32 else "ieee", **cfg)

    @staticmethod
    def bias_grad(dg, db1, db2) -> None:
        """db1 (and db2) = column sums of dg (T, B, N)."""
        from .kernels.triton import lstm as k
        T, B, N = dg.shape
        block_n = min(next_power_of_2(N), 64)
        k.bias_grad[(cdiv(N, block_n),)](
            dg, db1, db2 if db2 is not None else db1, T, B, N, *dg.stride(),
            WRITE_DB2=db2 is not None, BLOCK_R=min(next_power_of_2(T * B), 32),
            BLOCK_N=block_n, num_warps=4)

    @staticmethod
    def mul(x, s, y) -> None:
        """y = x * s over 3-D tensors (y may be x)."""
        from .kernels.triton import lstm as k
        block = 1024
        k.mul_3d[(cdiv(x.numel(), block),)](x, s, y, *x.shape, *x.stride(), *s.stride(),
                                             *y.stride(), BLOCK=block, num_warps=4)

    @classmethod
    def persistent_fwd(cls, xp, b_hh, h0, c0, w_hh, out, cs, gates, hn, cn, reverse: bool) -> None:
        from .kernels.triton import lstm as k
        T, B, H = out.shape
        block_h = dot_block(H, PERSISTENT_MAX_HIDDEN)
        block_b = 16
        d = out
        k.lstm_persistent_fwd[(cdiv(B, block_b),)](
            xp, b_hh if b_hh is not None else d, h0 if h0 is not None else d,
            c0 if c0 is not None else d, w_hh, out, cs, gates, hn, cn, T, B, H,
            *xp.stride(), *_strides(h0, 2), *_strides(c0, 2), *w_hh.stride(), *out.stride(),
            *cs.stride(), *gates.stride(), *hn.stride(), *cn.stride(),
            REVERSE=reverse, HAS_BHH=b_hh is not None, HAS_H0=h0 is not None,
            HAS_C0=c0 is not None, INPUT_PRECISION=input_precision(out.dtype, cudnn=cls.CUDNN_TF32),
            BLOCK_B=block_b, BLOCK_H=block_h, num_warps=4 if block_h <= 32 else 8)

    @classmethod
    def persistent_bwd(cls, gates, cs, c0, w_hh, d_out, d_hn, d_cn, dg, dh0, dc0, reverse: bool) -> None:
        from .kernels.triton import lstm as k
        T, B, H = cs.shape
        block_h = dot_block(H, PERSISTENT_MAX_HIDDEN)
        block_b = 16
        d = cs
        k.lstm_persistent_bwd[(cdiv(B, block_b),)](
            gates, cs, c0 if c0 is not None else d, w_hh, d_out if d_out is not None else d,
            d_hn if d_hn is not None else d, d_cn if d_cn is not None else d, dg, dh0, dc0,
            T, B, H, *gates.stride(), *cs.stride(), *_strides(c0, 2), *w_hh.stride(),
            *_strides(d_out, 3), *_strides(d_hn, 2), *_strides(d_cn, 2), *dg.stride(),
            *dh0.stride(), *dc0.stride(),
            REVERSE=reverse, HAS_C0=c0 is not None, HAS_DOUT=d_out is not None,
            HAS_DHN=d_hn is not None, HAS_DCN=d_cn is not None,
            INPUT_PRECISION=input_precision(F32, cudnn=cls.CUDNN_TF32), BLOCK_B=block_b,
            BLOCK_H=block_h,
            num_warps=4 if block_h <= 32 else 8)


# --- Numba launch ---------------------------------------------------------------------------

# Step-kernel tiles (rows x units x K): 8 x 32 x 32 (256 threads) on a GPU; 4 x 8 x 8 (32
# threads) in the simulator, where every thread is an OS thread.
_NUMBA_STEP_TILE = (8, 32, 32)
_NUMBA_SIM_STEP_TILE = (4, 8, 8)


def _numba_launch(kernel, blocks, threads, device, *args) -> None:
    """kernel[blocks, threads](*args) on torch's current stream."""
    kernel[blocks, threads, numba_stream(device)](*args)


def _numba_grid(n_items: int, threads: int) -> int:
    # the kernels' grid-stride loops cover all items when the simulator gets fewer blocks
    return numba_blocks(cdiv(n_items, threads))


class _NumbaLSTM:
    """Same methods as _TritonLSTM (no persistent variant), on the Numba kernels."""

    @staticmethod
    def step_fwd(x, w_ih, xp, b_ih, b_hh, h, c, w_hh, h1, c1, hn, cn, gates) -> None:
        from .kernels.numba import lstm as k
        arr = numba_array
        code = k.dtype_code
        B, H = h1.shape
        tb, tu, tk = _NUMBA_SIM_STEP_TILE if _env.INTERPRET else _NUMBA_STEP_TILE
        kernel = k.lstm_step_kernel(tb, tu, tk)
        d2, d1 = h1, gates.reshape(-1)  # placeholders of the right rank, never read
        blocks = 1 if _env.INTERPRET else cdiv(B, tb) * cdiv(H, tu)

        def a2(t):
            return arr(t if t is not None else d2)

        def a1(t):
            return arr(t if t is not None else d1)

        def cd(t):
            return code(t.dtype) if t is not None else 0

        bias = b_ih if b_ih is not None else b_hh
        _numba_launch(
            kernel, blocks, (tu, tb), h1.device,
            a2(x), a2(w_ih), a2(xp), a1(b_ih), a1(b_hh), a2(h), a2(c), arr(w_hh),
            arr(h1), arr(c1), a2(hn), a2(cn), arr(gates),
            x is not None, xp is not None, b_ih is not None, b_hh is not None, h is not None,
            c is not None, hn is not None, cn is not None,
            cd(x), cd(xp), cd(bias), code(w_hh.dtype), cd(c), code(h1.dtype), code(c1.dtype),
            cd(hn), cd(cn))

    @staticmethod
    def step_bwd(gates, c_prev, c1, dg_next, w_hh, dh_a, dh_b, dc, dg, dc_prev) -> None:
        from .kernels.numba import lstm as k
        arr = numba_array
        B, H = c1.shape
        tb, tu, tk = _NUMBA_SIM_STEP_TILE if _env.INTERPRET else _NUMBA_STEP_TILE
        kernel = k.lstm_step_bwd_kernel(tb, tu, tk)
        blocks = 1 if _env.INTERPRET else cdiv(B, tb) * cdiv(H, tu)

        def a2(t):
            return arr(t if t is not None else c1)

        def cd(t):
            return k.dtype_code(t.dtype) if t is not None else 0

        _numba_launch(
            kernel, blocks, (tu, tb), c1.device,
            arr(gates), a2(c_prev), arr(c1), a2(dg_next), arr(w_hh), a2(dh_a), a2(dh_b), a2(dc),
            arr(dg), a2(dc_prev),
            c_prev is not None, dg_next is not None, dh_a is not None, dh_b is not None,
            dc is not None, dc_prev is not None,
            cd(c_prev), cd(w_hh), cd(dh_a), cd(dh_b), cd(dc), cd(dc_prev))

    @staticmethod
    def gemm(a, b, out, c_in=None, bias=None) -> None:
        from ._gemm_numba import gemm
        gemm(a, b, out, c_in=c_in, bias=bias)

    @staticmethod
    def bias_grad(dg, db1, db2) -> None:
        from .kernels.numba import lstm as k
        arr = numba_array
        N = dg.shape[2]
        threads = numba_threads(128)
        _numba_launch(
            k.bias_grad, _numba_grid(N, threads), threads, dg.device,
            arr(dg), arr(db1), arr(db2 if db2 is not None else db1), db2 is not None,
            k.dtype_code(db1.dtype))

    @staticmethod
    def mul(x, s, y) -> None:
        from .kernels.numba import lstm as k
        arr = numba_array
        threads = numba_threads(256)
        _numba_launch(
            k.mul_3d, _numba_grid(x.numel(), threads), threads, x.device,
            arr(x), arr(s), arr(y), k.dtype_code(x.dtype), k.dtype_code(s.dtype),
            k.dtype_code(y.dtype))


LAUNCHERS = {"triton": _TritonLSTM, "numba": _NumbaLSTM}


class _TritonLSTMCell(_TritonLSTM):
    CUDNN_TF32 = False


CELL_LAUNCHERS = {"triton": _TritonLSTMCell, "numba": _NumbaLSTM}
# backend -> the layer's algorithms; the first is the default
ALGOS = {"triton": ("steps", "persistent"), "numba": ("steps",)}


def _mm(launch, a, b, out, c_in=None, bias=None) -> None:
    """out = a @ b (+ c_in) (+ bias) for 2-D operands, through the 4-D batched GEMM."""
    launch.gemm(a[None, None], b[None, None], out[None, None],
                c_in=None if c_in is None else c_in[None, None],
                bias=None if bias is None else bias[None])


# --- the cell -------------------------------------------------------------------------------

def _cell_grads_fake(x, h, c, w_ih, w_hh, need, gates: int):
    """Fake gradients of a cell's (x, h, c, w_ih, w_hh, b_ih, b_hh): empty where not needed."""
    bias = x.new_empty((gates * w_hh.shape[1],), dtype=w_ih.dtype)
    likes = (x, h, c, w_ih, w_hh, bias, bias)
    return [t.new_empty(t.shape) if n else x.new_empty(0) for t, n in zip(likes, need)]


def _lstm_cell_fwd_fake(x, h, c, w_ih, w_hh, b_ih, b_hh, backend):
    B, H = x.shape[0], w_hh.shape[1]
    return (x.new_empty((B, H)), x.new_empty((B, H)), x.new_empty((B, 4 * H), dtype=F32),
            x.new_empty((B, H), dtype=F32))


@kernel_op("lstm_cell_fwd", _lstm_cell_fwd_fake)
def _lstm_cell_fwd(x: Tensor, h: Optional[Tensor], c: Optional[Tensor], w_ih: Tensor,
                   w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                   backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(h1, c1, the fp32 gate activations, the fp32 new cell state)."""
    B, H = x.shape[0], w_hh.shape[1]
    h1 = new_output((B, H), x.dtype, x.device)
    c1 = new_output((B, H), x.dtype, x.device)
    c32 = new_output((B, H), F32, x.device)
    gates = new_output((B, 4 * H), F32, x.device)
    if B and H:
        CELL_LAUNCHERS[backend].step_fwd(x, w_ih, None, b_ih, b_hh, h, c, w_hh, h1, c32, None,
                                         c1, gates)
    return h1, c1, gates, c32


@kernel_op("lstm_cell_bwd", lambda x, h, c, w_ih, w_hh, gates, c32, dh1, dc1, need, backend:
           _cell_grads_fake(x, h, c, w_ih, w_hh, need, 4))
def _lstm_cell_bwd(x: Tensor, h: Optional[Tensor], c: Optional[Tensor], w_ih: Tensor,
                   w_hh: Tensor, gates: Tensor, c32: Tensor, dh1: Tensor, dc1: Tensor,
                   need: list[bool], backend: str) -> list[Tensor]:
    """Gradients of (x, h, c, w_ih, w_hh, b_ih, b_hh), an empty tensor where not `need`ed."""
    launch = CELL_LAUNCHERS[backend]
    B, H = c32.shape
    dg = new_output((B, 4 * H), F32, x.device)
    dc = new_output(c.shape, c.dtype, c.device) if need[2] else None
    if B and H:
        launch.step_bwd(gates, c, c32, None, w_hh, dh1, None, dc1, dg, dc)
    dx = dh = dw_ih = dw_hh = db_ih = db_hh = None
    if need[0]:
        dx = new_output(x.shape, x.dtype, x.device)
        _mm(launch, dg, w_ih, dx)
    if need[1]:
        dh = new_output(h.shape, h.dtype, h.device)
        _mm(launch, dg, w_hh, dh)
    if need[3]:
        dw_ih = new_output(w_ih.shape, w_ih.dtype, w_ih.device)
        _mm(launch, dg.t(), x, dw_ih)
    if need[4]:
        if h is None:   # zero state: no gradient reaches W_hh
            dw_hh = torch.zeros_like(w_hh)
        else:
            dw_hh = new_output(w_hh.shape, w_hh.dtype, w_hh.device)
            _mm(launch, dg.t(), h, dw_hh)
    if need[5] or need[6]:
        first = new_output((4 * H,), w_ih.dtype, w_ih.device)
        second = new_output((4 * H,), w_ih.dtype, w_ih.device) if need[5] and need[6] else None
        launch.bias_grad(dg[None], first, second)
        db_ih, db_hh = (first, second) if need[5] and need[6] else (
            (first, None) if need[5] else (None, first))
    return [_or_empty(t, x) for t in (dx, dh, dc, dw_ih, dw_hh, db_ih, db_hh)]


def _cell_need(ctx, *inputs) -> list[bool]:
    """needs_input_grad of a cell's tensor inputs, False for those that are None."""
    return [n and t is not None for n, t in zip(ctx.needs_input_grad, inputs)]


class LSTMCellFunction(torch.autograd.Function):
    """(h1, c1) of one LSTM step for x (B, I), h and c (B, H) or None (zeros)."""

    @staticmethod
    def forward(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh, backend: str):
        h1, c1, gates, c32 = _lstm_cell_fwd(x, h, c, w_ih, w_hh, b_ih, b_hh, backend)
        ctx.save_for_backward(x, h, c, w_ih, w_hh, gates, c32)
        ctx.need = _cell_need(ctx, x, h, c, w_ih, w_hh, b_ih, b_hh)
        ctx.backend = backend
        return h1, c1

    @staticmethod
    def backward(ctx, dh1, dc1):
        x, h, c, w_ih, w_hh, gates, c32 = ctx.saved_tensors
        grads = _lstm_cell_bwd(x, h, c, w_ih, w_hh, gates, c32, dh1, dc1, ctx.need, ctx.backend)
        return (*[g if n else None for g, n in zip(grads, ctx.need)], None)


# --- the layer: the stack machinery the LSTM and the GRU share ------------------------------

@dataclass(frozen=True)
class RNNConfig:
    """The static options of a (multi-layer) LSTM or GRU call."""
    num_layers: int
    bidirectional: bool
    bias: bool
    dropout: float
    training: bool
    algo: str | None
    recompute: bool = False
    proj: bool = False      # an LSTM with projections (torch's proj_size > 0): w_hr per direction

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def per_direction(self) -> int:
        return (4 if self.bias else 2) + self.proj


def _direction_weights(weights, cfg: RNNConfig, layer: int, d: int):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction; biases None without bias,
    w_hr None without projections."""
    n = cfg.per_direction
    w = weights[(layer * cfg.D + d) * n:(layer * cfg.D + d + 1) * n]
    b_ih, b_hh = (w[2], w[3]) if cfg.bias else (None, None)
    return w[0], w[1], b_ih, b_hh, (w[-1] if cfg.proj else None)


def _sizes(weights, cfg: RNNConfig, gates: int) -> tuple[int, int]:
    """(H, P): the hidden size and the width of h (proj_size, or H without projections)."""
    H = weights[0].shape[0] // gates
    return H, (weights[cfg.per_direction - 1].shape[0] if cfg.proj else H)


def _run_order(T: int, reverse: bool):
    """(t, t_prev) of each step in the order it runs; t_prev is None for the first."""
    ts = range(T - 1, -1, -1) if reverse else range(T)
    prev = None
    for t in ts:
        yield t, prev
        prev = t


def _at(t: torch.Tensor | None, i: int):
    return t[i] if t is not None else None


def _seq_rows(t: torch.Tensor) -> torch.Tensor:
    """(T, B, N) as (T*B, N) rows, a view: the sequence buffers here (outputs, workspaces) all
    have a time stride of B times the batch stride."""
    return t.view(t.shape[0] * t.shape[1], t.shape[2])


def _steps_after_first(T: int, reverse: bool):
    """For recomputation: (t of the first step in run order, the slice of the other steps,
    the slice of the steps that ran just before each of them)."""
    if reverse:
        return T - 1, slice(0, T - 1), slice(1, T)
    return 0, slice(1, T), slice(0, T - 1)


def _input_projection(launch, inp, w_ih, b_ih):
    """xp = inp W_ih^T + b_ih for every time step at once: one GEMM into (T, B, G*H) fp32."""
    T, B, _ = inp.shape
    xp = new_output((T, B, w_ih.shape[0]), F32, inp.device)
    launch.gemm(inp[None], w_ih.t()[None, None], xp[None],
                bias=None if b_ih is None else b_ih[None])
    return xp


class LSTMRecurrence:
    """What RNNFunction needs to know of the LSTM cell: 4 gates, a cell state, and the
    recurrence of one direction forward, recomputed, and backward (per-step kernels, or
    the persistent ones). `launch` is a backend's launcher (_TritonLSTM, _NumbaLSTM).

    With projections (w_hr (P, H), torch's proj_size P) h_t = m_t W_hr^T, m_t = o * tanh(c_t):
    the step kernel writes m_t (B, H) and one GEMM per step projects it into the output, which
    is the next step's recurrent input (K = P in the step kernel's product with W_hh (4H, P))."""
    name = "lstm"
    gates = 4
    saved_gates = 4     # i, f, g, o activations per step
    has_cell_state = True

    @staticmethod
    def forward(launch, algo, xp, b_hh, h0, c0, w_hh, w_hr, out, h_n, c_n, reverse):
        """Run one direction: writes out (T, B, P) (a view into the layer's output), h_n
        (B, P) and c_n (B, H). Returns (acts, cs, m): the fp32 gate activations (T, B, 4H),
        cell states (T, B, H) and, with projections, the unprojected m (T, B, H) (else None)
        the backward reads."""
        T, B, P = out.shape
        H = w_hh.shape[0] // 4
        acts = new_output((T, B, 4 * H), F32, out.device)
        cs = new_output((T, B, H), F32, out.device)
        if algo == "persistent":
            launch.persistent_fwd(xp, b_hh, h0, c0, w_hh, out, cs, acts, h_n, c_n, reverse)
            return acts, cs, None
        m = new_output((T, B, H), out.dtype, out.device) if w_hr is not None else None
        for s, (t, tp) in enumerate(_run_order(T, reverse)):
            last = s == T - 1
            launch.step_fwd(None, None, xp[t], None, b_hh, h0 if tp is None else out[tp],
                            c0 if tp is None else cs[tp], w_hh, out[t] if m is None else m[t],
                            cs[t], h_n if last and m is None else None, c_n if last else None,
                            acts[t])
            if m is not None:   # h_t = m_t W_hr^T
                _mm(launch, m[t], w_hr.t(), out[t])
                if last:
                    _mm(launch, m[t], w_hr.t(), h_n)
        return acts, cs, m

    @staticmethod
    def recompute(launch, xp, b_hh, h0, c0, w_hh, out, cs, reverse):
        """The gate activations forward() computed, again. A step's gates depend only on the
        state it started from (h_{t-1}, c_{t-1}), and those were saved (the output and cs),
        so every step runs at once: the step kernel over T*B rows (two launches: the first
        step starts from h0, c0). Returns (acts, m): the new states it writes are scratch,
        but the unprojected m (T, B, H) an LSTM with projections needs is one of them."""
        T, B, H = cs.shape
        dev = out.device
        acts = new_output((T, B, 4 * H), F32, dev)
        h_tmp = new_output((T, B, H), out.dtype, dev)
        c_tmp = new_output((T, B, H), F32, dev)
        t0, rest, prev = _steps_after_first(T, reverse)
        launch.step_fwd(None, None, xp[t0], None, b_hh, h0, c0, w_hh, h_tmp[t0], c_tmp[t0],
                        None, None, acts[t0])
        if T > 1:
            r = _seq_rows
            launch.step_fwd(None, None, r(xp[rest]), None, b_hh, r(out[prev]), r(cs[prev]),
                            w_hh, r(h_tmp[rest]), r(c_tmp[rest]), None, None, r(acts[rest]))
        return acts, h_tmp

    @staticmethod
    def backward(launch, algo, acts, cs, h0, c0, out, w_hh, w_hr, d_out, d_hn, d_cn, dh0, dc0,
                 reverse):
        """Backpropagation through one direction, walking its steps in reverse run order.
        Returns (dg_ih, dg_hh), the fp32 gradients (T, B, G*H) of the pre-activations of
        x W_ih^T and of h W_hh^T (one tensor for the LSTM); writes dh0 / dc0 where given.
        d_out (T, B, P), d_hn (B, P), d_cn (B, H) may be None.

        With projections the gradient of m_t is dm_t = dh_t W_hr, where dh_t = d_out[t]
        (+ d_hn at the last step) + dg_next W_hh: so dm_t = d_out[t] W_hr (+ d_hn W_hr)
        + dg_next (W_hh W_hr). Two GEMMs before the loop (d_out W_hr for all steps, W_hh W_hr
        (4H, H)) and the step kernel runs unchanged, one launch per step, on W_hh W_hr."""
        T, B, H = cs.shape
        dev = cs.device
        dg = new_output((T, B, 4 * H), F32, dev)
        if algo == "persistent":
            launch.persistent_bwd(acts, cs, c0, w_hh, d_out, d_hn, d_cn, dg,
                                  dh0 if dh0 is not None else new_output((B, H), F32, dev),
                                  dc0 if dc0 is not None else new_output((B, H), F32, dev),
                                  reverse)
            return dg, dg
        w_rec = w_hh
        if w_hr is not None:
            w_rec = new_output((4 * H, H), F32, dev)
            _mm(launch, w_hh, w_hr, w_rec)
            if d_out is not None:
                dm_out = new_output((T, B, H), F32, dev)
                launch.gemm(d_out[None], w_hr[None, None], dm_out[None])
                d_out = dm_out
            if d_hn is not None:
                dm_hn = new_output((B, H), F32, dev)
                _mm(launch, d_hn, w_hr, dm_hn)
                d_hn = dm_hn
        dc_run = new_output((B, H), F32, dev)
        t_next = None   # the step that ran after t: its dg feeds dh_t
        for s, (t, tp) in enumerate(reversed(list(_run_order(T, reverse)))):
            first, last = s == 0, s == T - 1
            launch.step_bwd(acts[t], c0 if tp is None else cs[tp], cs[t],
                            None if first else dg[t_next], w_rec, d_hn if first else None,
                            None if d_out is None else d_out[t], d_cn if first else dc_run,
                            dg[t], dc0 if last else dc_run)
            t_next = t
        if dh0 is not None:
            _mm(launch, dg[t_next], w_hh, dh0)
        return dg, dg


# The layer as two kernel ops, pydl::rnn_fwd and pydl::rnn_bwd. Everything the backward
# reads travels between them as one flat list of tensors ("saved"), laid out by
# _saved_layout, which the real op and the fake one share.

_RNN_KINDS: dict[tuple[str, str], tuple[object, object]] = {}   # (op, backend) -> (cell, launcher)


def _cfg_args(cfg: RNNConfig) -> tuple[list[int], float, str]:
    """RNNConfig as custom-op arguments: (int flags, dropout, algo)."""
    return ([cfg.num_layers, int(cfg.bidirectional), int(cfg.bias), int(cfg.training),
             int(cfg.recompute)], float(cfg.dropout), cfg.algo)


def _cfg_from(flags: list[int], dropout: float, algo: str, n_weights: int) -> RNNConfig:
    """The config back from the op's arguments; projections are told by the weight count (one
    more weight per layer and direction: w_hr), as pydl.lstm tells them."""
    L, bidirectional, bias, training, recompute = flags
    per = (4 if bias else 2) * L * (2 if bidirectional else 1)
    return RNNConfig(L, bool(bidirectional), bool(bias), dropout, bool(training), algo,
                     bool(recompute), proj=n_weights != per)


def _dropout_on(cfg: RNNConfig) -> bool:
    return cfg.num_layers > 1 and cfg.dropout > 0 and cfg.training


def _saved_layout(cfg: RNNConfig, cell, T: int, B: int, H: int, P: int, dt: torch.dtype):
    """(shape, dtype) of each tensor the forward passes to the backward, in order: per inner
    layer its output (and with dropout its noise and the dropped output the next layer
    read), then per layer and direction the gate activations (unless recomputed), the
    cell states (LSTM) and, with projections, the unprojected m (unless recomputed)."""
    D = cfg.D
    seq = ((T, B, D * P), dt)
    items = []
    for _ in range(cfg.num_layers - 1):
        items += [seq, seq, seq] if _dropout_on(cfg) else [seq]
    for _ in range(cfg.num_layers * D):
        if not cfg.recompute:
            items.append(((T, B, cell.saved_gates * H), F32))
        if cell.has_cell_state:
            items.append(((T, B, H), F32))
        if cfg.proj and not cfg.recompute:
            items.append(((T, B, H), dt))
    return items


def _unpack(x, last_out, saved, cfg: RNNConfig, cell):
    """The flat saved list back as (inputs, outs, masks, [(acts, cs, m)] per
    layer-direction)."""
    it = iter(saved)
    inputs, outs, masks = [x], [], []
    for _ in range(cfg.num_layers - 1):
        out = next(it)
        outs.append(out)
        if _dropout_on(cfg):
            masks.append(next(it))
            inputs.append(next(it))
        else:
            masks.append(None)
            inputs.append(out)
    outs.append(last_out)
    masks.append(None)
    keep = not cfg.recompute
    per_dir = [(next(it) if keep else None, next(it) if cell.has_cell_state else None,
                next(it) if keep and cfg.proj else None)
               for _ in range(cfg.num_layers * cfg.D)]
    return inputs, outs, masks, per_dir


def _or_empty(t, like):
    """Custom ops return tensors, not None: an empty placeholder stands for "no gradient"."""
    return t if t is not None else like.new_empty(0)


def _rnn_fwd_fake(x, h0, c0, weights, flags, dropout, algo, op, backend):
    cfg, (cell, _) = _cfg_from(flags, dropout, algo, len(weights)), _RNN_KINDS[(op, backend)]
    T, B, _ = x.shape
    (H, P), LD = _sizes(weights, cfg, cell.gates), cfg.num_layers * cfg.D
    return (x.new_empty((T, B, cfg.D * P)), x.new_empty((LD, B, P)),
            x.new_empty((LD, B, H) if cell.has_cell_state else (0,)),
            [x.new_empty(shape, dtype=dtype)
             for shape, dtype in _saved_layout(cfg, cell, T, B, H, P, x.dtype)])


@kernel_op("rnn_fwd", _rnn_fwd_fake)
def _rnn_fwd(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: list[Tensor],
             flags: list[int], dropout: float, algo: str, op: str,
             backend: str) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """(out, h_n, c_n (empty without a cell state), saved) of a whole stack."""
    cfg, (cell, launch) = _cfg_from(flags, dropout, algo, len(weights)), _RNN_KINDS[(op, backend)]
    T, B, _ = x.shape
    L, D = cfg.num_layers, cfg.D
    H, P = _sizes(weights, cfg, cell.gates)
    dt, dev = x.dtype, x.device
    h_n = new_output((L * D, B, P), dt, dev)
    c_n = new_output((L * D, B, H), dt, dev) if cell.has_cell_state else None
    inputs, outs, masks, saved = [], [], [], []
    inp = x
    for layer in range(L):
        out = new_output((T, B, D * P), dt, dev)
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_hr = _direction_weights(weights, cfg, layer, d)
            idx = layer * D + d
            xp = _input_projection(launch, inp, w_ih, b_ih)
            acts, cs, m = cell.forward(launch, cfg.algo, xp, b_hh, _at(h0, idx), _at(c0, idx),
                                       w_hh, w_hr, out[:, :, d * P:(d + 1) * P], h_n[idx],
                                       _at(c_n, idx), d == 1)
            keep = not cfg.recompute
            saved.append((acts if keep else None, cs, m if keep else None))
        inputs.append(inp)
        outs.append(out)
        if layer < L - 1 and cfg.dropout > 0 and cfg.training:
            # torch's CPU dropout: noise = empty_like(out).bernoulli_(1 - p) / (1 - p)
            noise = torch.empty_like(out).bernoulli_(1 - cfg.dropout).div_(1 - cfg.dropout)
            dropped = new_output(out.shape, dt, dev)
            launch.mul(out, noise, dropped)
            masks.append(noise)
            inp = dropped
        else:
            masks.append(None)
            inp = out
    flat = []
    for layer in range(L - 1):
        flat.append(outs[layer])
        if masks[layer] is not None:
            flat += [masks[layer], inputs[layer + 1]]
    for per_dir in saved:
        flat += [t for t in per_dir if t is not None]
    return outs[-1], h_n, _or_empty(c_n, x), flat


def _rnn_bwd_fake(x, h0, c0, last_out, weights, saved, d_out, d_hn, d_cn, need, *rest):
    return [x.new_empty(t.shape if n else (0,), dtype=t.dtype if n else x.dtype)
            for t, n in zip((x, h0, c0, *weights), need)]


@kernel_op("rnn_bwd", _rnn_bwd_fake)
def _rnn_bwd(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], last_out: Tensor,
             weights: list[Tensor], saved: list[Tensor], d_out: Optional[Tensor],
             d_hn: Optional[Tensor], d_cn: Optional[Tensor], need: list[bool], flags: list[int],
             dropout: float, algo: str, op: str, backend: str) -> list[Tensor]:
    """[dx, dh0, dc0, *dweights], an empty tensor where `need` is False."""
    cfg, (cell, launch) = _cfg_from(flags, dropout, algo, len(weights)), _RNN_KINDS[(op, backend)]
    inputs, outs, masks, saved = _unpack(x, last_out, saved, cfg, cell)
    L, D, G = cfg.num_layers, cfg.D, cell.gates
    T, B, _ = x.shape
    H, P = _sizes(weights, cfg, G)
    dt, dev = x.dtype, x.device
    dh0 = new_output(h0.shape, h0.dtype, dev) if h0 is not None and need[1] else None
    dc0 = new_output(c0.shape, c0.dtype, dev) if c0 is not None and need[2] else None
    dweights = [None] * len(weights)
    need_w = need[3:]
    for layer in range(L - 1, -1, -1):
        inp, out = inputs[layer], outs[layer]
        # gradient of this layer's input: fp32 below the top, x's dtype for layer 0
        if layer > 0:
            d_in = new_output(inp.shape, F32, dev)
        elif need[0]:
            d_in = new_output(x.shape, dt, dev)
        else:
            d_in = None
        acc = new_output(inp.shape, F32, dev) if d_in is not None and D == 2 else None
        for d in range(D):
            w_ih, w_hh, b_ih, b_hh, w_hr = _direction_weights(weights, cfg, layer, d)
            idx = layer * D + d
            base = idx * cfg.per_direction
            h0_, c0_ = _at(h0, idx), _at(c0, idx)
            out_d = out[:, :, d * P:(d + 1) * P]
            d_out_d = d_out[:, :, d * P:(d + 1) * P] if d_out is not None else None
            acts, cs, m = saved[idx]
            if acts is None:    # recompute: this layer-direction's activations only
                xp = _input_projection(launch, inp, w_ih, b_ih)
                acts, m = cell.recompute(launch, xp, b_hh, h0_, c0_, w_hh, out_d, cs, d == 1)
                del xp
            dg_ih, dg_hh = cell.backward(
                launch, cfg.algo, acts, cs, h0_, c0_, out_d, w_hh, w_hr, d_out_d,
                _at(d_hn, idx), _at(d_cn, idx), _at(dh0, idx), _at(dc0, idx), d == 1)
            del acts
            if w_hr is not None and need_w[base + cfg.per_direction - 1]:
                dweights[base + cfg.per_direction - 1] = _grad_w_hr(
                    launch, dg_hh, m, d_out_d, _at(d_hn, idx), w_hh, w_hr, d == 1)
            del m
            # weight gradients: sums over every (t, b) row
            if need_w[base]:
                dw = new_output(w_ih.shape, w_ih.dtype, dev)
                launch.gemm(dg_ih.transpose(1, 2)[None], inp[None], dw[None, None])
                dweights[base] = dw
            if need_w[base + 1]:
                dweights[base + 1] = _grad_w_hh(launch, dg_hh, out_d, h0_, w_hh, d == 1)
            if cfg.bias:
                dbs = [new_output((G * H,), b.dtype, dev) if need_w[base + j] else None
                       for j, b in ((2, b_ih), (3, b_hh))]
                if dg_ih is dg_hh:
                    # b_ih and b_hh get the same gradient: one pass writes both
                    if dbs[0] is not None or dbs[1] is not None:
                        first = dbs[0] if dbs[0] is not None else dbs[1]
                        launch.bias_grad(dg_ih, first, dbs[1] if dbs[0] is not None else None)
                else:
                    for db, dg in zip(dbs, (dg_ih, dg_hh)):
                        if db is not None:
                            launch.bias_grad(dg, db, None)
                dweights[base + 2], dweights[base + 3] = dbs
            if d_in is not None:
                # d_in = sum over directions of dg_ih W_ih; the first into an fp32 buffer
                last_dir = d == D - 1
                launch.gemm(dg_ih[None], w_ih[None, None], (d_in if last_dir else acc)[None],
                            c_in=None if d == 0 else acc[None])
        if layer > 0 and masks[layer - 1] is not None:
            launch.mul(d_in, masks[layer - 1], d_in)
        d_out = d_in    # the output gradient of the layer below
    return [_or_empty(t, x) for t in (d_out if need[0] else None, dh0, dc0, *dweights)]


class RNNFunction(torch.autograd.Function):
    """A whole LSTM or GRU stack (`op` "lstm" or "gru"): x (T, B, I) ->
    (out (T, B, D*H), h_n (L*D, B, H), c_n (L*D, B, H), None for a cell without one).

    h0, c0: (L*D, B, H) or None (zeros). weights: torch's flat order (per layer, per
    direction: w_ih, w_hh[, b_ih, b_hh][, w_hr (P, H): an LSTM with projections, whose out,
    h0 and h_n are P wide instead of H]). Per layer and direction: the input projection of
    all steps as one GEMM, the cell's recurrence, and in the backward the cell's BPTT, then
    the weight gradients as GEMMs over every (t, b) row and dX = dg_ih W_ih (both directions
    summed). With cfg.recompute the forward keeps no gate activations: the backward rebuilds
    them for one layer and direction at a time, just before its BPTT."""

    @staticmethod
    def forward(ctx, x, h0, c0, cfg: RNNConfig, op: str, backend: str, *weights):
        args = (*_cfg_args(cfg), op, backend)
        out, h_n, c_n, saved = _rnn_fwd(x, h0, c0, list(weights), *args)
        ctx.save_for_backward(x, h0, c0, out, *weights, *saved)
        ctx.n_weights, ctx.args = len(weights), args
        return out, h_n, c_n if _RNN_KINDS[(op, backend)][0].has_cell_state else None

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        x, h0, c0, out, *rest = ctx.saved_tensors
        weights, saved = rest[:ctx.n_weights], rest[ctx.n_weights:]
        need = ctx.needs_input_grad
        need = [need[0], need[1] and h0 is not None, need[2] and c0 is not None, *need[6:]]
        grads = _rnn_bwd(x, h0, c0, out, list(weights), list(saved), d_out, d_hn, d_cn, need,
                         *ctx.args)
        dx, dh0, dc0, *dw = [g if n else None for g, n in zip(grads, need)]
        return (dx, dh0, dc0, None, None, None, *dw)


def _recurrent_terms(dg, prev, h0, reverse: bool):
    """The (a, b) pairs of sum_t dg_t^T prev(t), prev(t) the sequence `prev` one step earlier
    in run order (prev[t-1], or prev[t+1] in reverse), h0 for the first step (no term if
    None); a (n, G, B), b (n, B, N)."""
    T = dg.shape[0]
    terms = []
    if T > 1:
        a, b = (dg[:-1], prev[1:]) if reverse else (dg[1:], prev[:-1])
        terms.append((a.transpose(1, 2), b))
    if h0 is not None:
        t0 = T - 1 if reverse else 0
        terms.append((dg[t0:t0 + 1].transpose(1, 2), h0[None]))
    return terms


def _sum_of_products(launch, terms, shape, dtype, dev):
    """sum over the terms (a (n, M, K), b (n, K, N)) of sum_n a_n @ b_n: a new (M, N) tensor
    of `dtype` (zeros without terms), the terms accumulated in fp32, one GEMM each."""
    if not terms:
        return torch.zeros(shape, dtype=dtype, device=dev)
    out = new_output(shape, dtype, dev)
    acc = new_output(shape, F32, dev) if len(terms) > 1 else None
    for j, (a, b) in enumerate(terms):
        target = out if j == len(terms) - 1 else acc
        launch.gemm(a[None], b[None], target[None, None],
                    c_in=None if j == 0 else acc[None, None])
    return out


def _grad_w_hh(launch, dg, out_d, h0, w_hh, reverse: bool):
    """dW_hh = sum_t dg_t^T h_prev(t): h_prev is the direction's output one step earlier in
    run order, h0 for the first step (no term if None: one step from a zero state gives
    W_hh no gradient)."""
    return _sum_of_products(launch, _recurrent_terms(dg, out_d, h0, reverse), w_hh.shape,
                            w_hh.dtype, dg.device)


def _grad_w_hr(launch, dg, m, d_out, d_hn, w_hh, w_hr, reverse: bool):
    """dW_hr = sum_t dh_t^T m_t for h_t = m_t W_hr^T, where dh_t = d_out[t] (+ d_hn at the
    last step) + dg_next(t) W_hh (not at the last step). Summed over every (t, b) row without
    building dh: d_out^T M + d_hn^T m_last + W_hh^T Y, Y = sum_t dg_next(t)^T m_t (4H, H)
    fp32, which is dW_hh's sum with m in place of the outputs."""
    T = m.shape[0]
    dev = m.device
    terms = []
    y_terms = _recurrent_terms(dg, m, None, reverse)
    if y_terms:
        y = _sum_of_products(launch, y_terms, (dg.shape[2], m.shape[2]), F32, dev)
        terms.append((w_hh.t()[None], y[None]))
    if d_out is not None:
        terms.append((d_out.transpose(1, 2), m))
    if d_hn is not None:
        t_last = 0 if reverse else T - 1
        terms.append((d_hn.t()[None], m[t_last][None]))
    return _sum_of_products(launch, terms, w_hr.shape, w_hr.dtype, dev)


def layer_impl(op: str, cell, backend: str, launch, algos: tuple[str, ...]):
    """The kernel implementation of a layer op ("lstm", "gru") on `backend`, for the
    registry: impl(x, h0, c0, weights, cfg) -> (out, h_n, c_n or None)."""
    _RNN_KINDS[(op, backend)] = (cell, launch)

    def impl(x, h0, c0, weights, cfg: RNNConfig):
        algo = cfg.algo or algos[0]
        if algo not in algos:
            raise ValueError(f"{op}: algo={cfg.algo!r} is not available on the {backend!r} "
                             f"backend (available: {', '.join(algos)})")
        if algo == "persistent" and cfg.proj:
            raise ValueError(f"{op}: algo='persistent' does not support projections "
                             f"(proj_size > 0); use algo='steps'")
        H = weights[0].shape[0] // cell.gates
        if algo == "persistent" and H > PERSISTENT_MAX_HIDDEN:
            raise ValueError(f"{op}: algo='persistent' keeps W_hh in registers and needs "
                             f"hidden_size <= {PERSISTENT_MAX_HIDDEN}, got {H}; use algo='steps'")
        return RNNFunction.apply(x, h0, c0, replace(cfg, algo=algo), op, backend, *weights)
    return impl


# --- implementations by backend -------------------------------------------------------------

def _kernel_lstm_cell(backend: str):
    def impl(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return LSTMCellFunction.apply(x, h, c, w_ih, w_hh, b_ih, b_hh, backend)
    return impl


for _name, _launch in LAUNCHERS.items():
    register("lstm_cell", _name)(_kernel_lstm_cell(_name))
    register("lstm", _name)(layer_impl("lstm", LSTMRecurrence, _name, _launch, ALGOS[_name]))


@register("lstm_cell", "torch")
def _torch_lstm_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    B, H = x.shape[0], w_hh.shape[1]
    zeros = lambda: x.new_zeros(B, H)  # noqa: E731
    return torch._VF.lstm_cell(x, (zeros() if h is None else h, zeros() if c is None else c),
                               w_ih, w_hh, b_ih, b_hh)


@register("lstm", "torch")
def _torch_lstm(x, h0, c0, weights, cfg: RNNConfig):
    L, D = cfg.num_layers, cfg.D
    B, (H, P) = x.shape[1], _sizes(weights, cfg, 4)
    # torch tells projections from h0's width differing from c0's
    h0 = x.new_zeros(L * D, B, P) if h0 is None else h0
    c0 = x.new_zeros(L * D, B, H) if c0 is None else c0
    out, h_n, c_n = torch._VF.lstm(x, (h0, c0), list(weights), cfg.bias, L, cfg.dropout,
                                   cfg.training, cfg.bidirectional, False)
    return out, h_n, c_n


# --- argument checks and the public functions -----------------------------------------------

def _shape(t) -> tuple:
    return tuple(t.shape)


def _check_same(t, name: str, ref: torch.Tensor, backend: str) -> None:
    check_tensor(t, name, backend)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has {ref.dtype}: all tensors "
                        f"must have one dtype")


def _split_state(hx, name: str):
    """hx = (h, c), or None: (None, None)."""
    if hx is None:
        return None, None
    if not isinstance(hx, (tuple, list)) or len(hx) != 2:
        raise TypeError(f"{name} must be a pair (h, c) of tensors or None, got "
                        f"{type(hx).__name__}" + (f" of length {len(hx)}" if isinstance(hx, (tuple, list)) else ""))
    if (hx[0] is None) != (hx[1] is None):
        raise ValueError(f"{name} must hold both h and c (or be None for zeros), got one None")
    return hx[0], hx[1]


def _check_cell_weights(w_ih, w_hh, b_ih, b_hh, input, backend: str, gates: int = 4):
    """Hidden size H from w_hh, with every weight's shape checked against it and the input."""
    for t, name in ((w_ih, "w_ih"), (w_hh, "w_hh")):
        _check_same(t, name, input, backend)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D ({gates}*hidden_size, ...), got shape {_shape(t)}")
    H = w_hh.shape[1]
    if w_hh.shape[0] != gates * H:
        raise ValueError(f"w_hh must have shape ({gates}*hidden_size, hidden_size) = "
                         f"({gates * H}, {H}), got {_shape(w_hh)}")
    if w_ih.shape[0] != gates * H:
        raise ValueError(f"w_ih has {w_ih.shape[0]} rows but hidden_size {H} (from w_hh) "
                         f"needs {gates}*{H} = {gates * H}")
    if input.shape[-1] != w_ih.shape[1]:
        raise ValueError(f"input has size {input.shape[-1]} in its last dimension but w_ih "
                         f"expects input_size {w_ih.shape[1]} (w_ih shape {_shape(w_ih)})")
    for b, name in ((b_ih, "b_ih"), (b_hh, "b_hh")):
        if b is not None:
            _check_same(b, name, input, backend)
            if _shape(b) != (gates * H,):
                raise ValueError(f"{name} must have shape ({gates}*hidden_size,) = ({gates * H},), "
                                 f"got {_shape(b)}")
    return H


def _check_cell_state(s, name: str, input, expected: tuple, backend: str):
    if s is None:
        return
    _check_same(s, name, input, backend)
    if _shape(s) != expected:
        raise ValueError(f"{name} must have shape {expected} (batch, hidden_size), got {_shape(s)}")


def lstm_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """One LSTM step, as torch.nn.LSTMCell: returns (h1, c1).

    input (B, I) or unbatched (I,); hx = (h, c), each (B, H) (or (H,)), or None for zeros;
    w_ih (4H, I), w_hh (4H, H), b_ih / b_hh (4H,) or None; gate order i, f, g, o.
    """
    h, c = _split_state(hx, "hx")
    input, h, c, w_ih, w_hh, b_ih, b_hh = autocast_inputs("lstm_cell", input, h, c, w_ih, w_hh,
                                                          b_ih, b_hh)
    name, impl = dispatch("lstm_cell", backend, input, w_ih, w_hh,
                          *[t for t in (h, c, b_ih, b_hh) if isinstance(t, torch.Tensor)])
    check_tensor(input, "input", name, ndims=(1, 2))
    H = _check_cell_weights(w_ih, w_hh, b_ih, b_hh, input, name)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    expected = (H,) if unbatched else (x.shape[0], H)
    _check_cell_state(h, "hx[0] (h)", input, expected, name)
    _check_cell_state(c, "hx[1] (c)", input, expected, name)
    if unbatched:
        h = h.unsqueeze(0) if h is not None else None
        c = c.unsqueeze(0) if c is not None else None
    h1, c1 = impl(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return (h1.squeeze(0), c1.squeeze(0)) if unbatched else (h1, c1)


def lstm_weight_names(num_layers: int, bidirectional: bool, bias: bool,
                      proj: bool = False) -> list[str]:
    """torch.nn.LSTM's (and torch.nn.GRU's) parameter names in its flat order (per layer,
    per direction; weight_hr last with projections)."""
    from .reference.lstm import lstm_weight_names as names
    return names(num_layers, bidirectional, bias, proj)


# op -> (what to call one in a message, the torch module whose _flat_weights it takes)
_LAYER_NAMES = {"lstm": ("an LSTM", "torch.nn.LSTM"), "gru": ("a GRU", "torch.nn.GRU")}


def prepare_layer(op: str, gates: int, input, states, weights, *, num_layers, bias, batch_first,
                  dropout, training, bidirectional, backend, algo, recompute):
    """The argument checks pydl.lstm and pydl.gru share (`gates` = 4 or 3 per hidden unit).

    states: ((tensor or None, its name in messages), ...), the initial states, h first.
    An LSTM's weights may hold one more per layer and direction, w_hr (P, H): an LSTM with
    projections (torch's proj_size P < H), where h0 is (L*D, B, P) and c0 (L*D, B, H).
    Returns (impl, x (T, B, I), the states as (L*D, B, P or H) or None, cfg, unbatched).
    """
    a_op, module = _LAYER_NAMES[op]
    if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    D = 2 if bidirectional else 1
    per = 4 if bias else 2
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors ({module}'s _flat_weights), "
                        f"got {type(weights).__name__}")
    names = lstm_weight_names(num_layers, bidirectional, bias)
    proj_names = lstm_weight_names(num_layers, bidirectional, bias, proj=True)
    proj = op == "lstm" and len(weights) == len(proj_names)
    if proj:
        names, per = proj_names, per + 1
    elif len(weights) != len(names):
        with_proj = (f", or {len(proj_names)} with projections (proj_size > 0: "
                     f"{', '.join(proj_names[:per + 1])}, ...)") if op == "lstm" else ""
        raise ValueError(f"weights: expected {len(names)} tensors for num_layers={num_layers}, "
                         f"bidirectional={bidirectional}, bias={bias} ({', '.join(names[:per])}, ...)"
                         f"{with_proj}, got {len(weights)}")
    cast = autocast_inputs(op, input, *weights, *[t for t, _ in states])
    input, weights = cast[0], list(cast[1:1 + len(weights)])
    states = tuple((t, n) for t, (_, n) in zip(cast[1 + len(weights):], states))
    name, impl = dispatch(op, backend, input, *weights,
                          *[s for s, _ in states if isinstance(s, torch.Tensor)])
    if name == "torch" and algo is not None:
        raise ValueError(f"{op}: the torch backend has no algo= choice")
    if name == "torch" and recompute:
        raise ValueError(f"{op}: the torch backend has no recompute= option (it is pydl's "
                         f"kernels' memory saving; torch keeps its own workspace)")
    check_tensor(input, "input", name, ndims=(2, 3))
    unbatched = input.dim() == 2
    x = input.unsqueeze(1) if unbatched else (input.transpose(0, 1) if batch_first else input)
    T, B, I = x.shape
    if T == 0:
        raise ValueError(f"input has sequence length 0 (shape {_shape(input)}); {a_op} needs "
                         "at least one time step")
    G = gates
    H = P = None
    # h's width: hidden_size, or proj_size with projections (w_hh is then (G*H, P))
    p_name = "proj_size" if proj else "hidden_size"
    for layer in range(num_layers):
        for d in range(D):
            base = (layer * D + d) * per
            w = weights[base:base + per]
            wn = names[base:base + per]
            for t, n in zip(w, wn):
                _check_same(t, f"weights[{names.index(n)}] ({n})", input, name)
            w_ih, w_hh = w[0], w[1]
            if w_hh.dim() != 2:
                raise ValueError(f"{wn[1]} must be 2-D ({G}*hidden_size, {p_name}), got {_shape(w_hh)}")
            if H is None:
                P = w_hh.shape[1]
                H = w_hh.shape[0] // G if proj else P
            if _shape(w_hh) != (G * H, P):
                raise ValueError(f"{wn[1]} must have shape ({G}*hidden_size, {p_name}) = "
                                 f"({G * H}, {P}), got {_shape(w_hh)}")
            in_size = I if layer == 0 else D * P
            if _shape(w_ih) != (G * H, in_size):
                what = "input_size" if layer == 0 else f"{D}*{p_name} (the layer below's output)"
                raise ValueError(f"{wn[0]} must have shape ({G}*hidden_size, {what}) = "
                                 f"({G * H}, {in_size}), got {_shape(w_ih)}"
                                 + (f": input has size {I} in its last dimension" if layer == 0 else ""))
            for t, n in zip(w[2:4] if bias else (), wn[2:4] if bias else ()):
                if _shape(t) != (G * H,):
                    raise ValueError(f"{n} must have shape ({G}*hidden_size,) = ({G * H},), got {_shape(t)}")
            if proj:
                if _shape(w[-1]) != (P, H):
                    raise ValueError(f"{wn[-1]} must have shape (proj_size, hidden_size) = "
                                     f"({P}, {H}) ({wn[1]} is ({G}*hidden_size, proj_size) = "
                                     f"{_shape(w_hh)}), got {_shape(w[-1])}")
                if P >= H:
                    raise ValueError(f"projections need proj_size < hidden_size (as "
                                     f"torch.nn.LSTM), got proj_size {P} (the columns of {wn[1]}) "
                                     f"and hidden_size {H}")
    out_states = []
    for k, (s, n) in enumerate(states):
        if s is not None:
            width, what = (P, p_name) if k == 0 else (H, "hidden_size")
            expected = (num_layers * D, width) if unbatched else (num_layers * D, B, width)
            _check_same(s, n, input, name)
            if _shape(s) != expected:
                raise ValueError(f"{n} must have shape {expected} (num_layers * num_directions, "
                                 f"{'' if unbatched else 'batch, '}{what}), got {_shape(s)}")
            if unbatched:
                s = s.unsqueeze(1)
        out_states.append(s)
    cfg = RNNConfig(num_layers, bool(bidirectional), bool(bias), float(dropout), bool(training),
                    algo, recompute, proj=proj)
    return impl, x, out_states, cfg, unbatched


def layer_output(out, states, unbatched: bool, batch_first: bool):
    """The layer's output (T, B, D*H) and final states (L*D, B, H) in the caller's layout."""
    if unbatched:
        return out.squeeze(1), [s.squeeze(1) for s in states]
    return (out.transpose(0, 1) if batch_first else out), list(states)


def lstm(input, hx, weights, *, num_layers: int = 1, bias: bool = True, batch_first: bool = False,
         dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
         backend=None, algo=None, recompute: bool = False):
    """A multi-layer LSTM over a sequence, as torch.nn.LSTM (proj_size included): returns
    (output, (h_n, c_n)).

    input:   (T, B, I), (B, T, I) with batch_first, or unbatched (T, I)
    hx:      (h0, c0), each (num_layers * D, B, H) (unbatched: (num_layers * D, H)), or None
             for zeros; D = 2 if bidirectional else 1; with projections h0 is
             (num_layers * D, B, P)
    weights: the flat list torch.nn.LSTM keeps in `_flat_weights` (per layer, per direction:
             w_ih (4H, I or D*H), w_hh (4H, H), then b_ih, b_hh (4H,) when bias); with
             projections (proj_size P < H: h_t = W_hr (o_t * tanh(c_t))) also w_hr (P, H)
             last, w_hh is (4H, P) and the next layer's w_ih (4H, D*P): told from the count
    dropout: applied to the outputs of every layer but the last, when training
    algo:    "steps" (default: one fused kernel per time step, plus one projection GEMM with
             projections) or "persistent" (triton only, hidden size <= 64, no projections:
             one launch per layer and direction loops over time)
    recompute: keep no gate activations (T * B * 4H fp32 per layer and direction) between
             forward and backward; the backward recomputes them one layer and direction at a
             time (one GEMM and two step launches), so its peak holds one direction's only
    output:  (T, B, D*H) ((B, T, D*H) with batch_first: a transposed view, as torch's CPU
             LSTM returns; (T, D*H) unbatched; D*P for H with projections); h_n, c_n shaped
             like h0, c0.
    """
    h0, c0 = _split_state(hx, "hx")
    impl, x, (h0, c0), cfg, unbatched = prepare_layer(
        "lstm", 4, input, ((h0, "hx[0] (h0)"), (c0, "hx[1] (c0)")), weights,
        num_layers=num_layers, bias=bias, batch_first=batch_first, dropout=dropout,
        training=training, bidirectional=bidirectional, backend=backend, algo=algo,
        recompute=recompute)
    out, h_n, c_n = impl(x, h0, c0, tuple(weights), cfg)
    out, (h_n, c_n) = layer_output(out, (h_n, c_n), unbatched, batch_first)
    return out, (h_n, c_n)


__all__ = ["lstm_cell", "lstm", "LSTMCellFunction", "RNNFunction", "RNNConfig", "LSTMRecurrence",
           "ALGOS"]
