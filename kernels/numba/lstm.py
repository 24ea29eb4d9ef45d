"""Numba CUDA kernels for the LSTM: the fused cell / time step, its gate gradients, the bias
gradient and an elementwise product (dropout between layers).

Same math, layout and workspaces as kernels/triton/lstm.py (see its docstring): gates stacked
[i; f; g; o] as rows of w_ih (4H, I) and w_hh (4H, H); the forward writes the fp32 gate
activations and the fp32 cell state for the backward. Arrays arrive 2-D or 3-D with any
strides (Numba arrays keep them). The GEMMs of the backward and of the layer's input
projection run on the shared tiled GEMM (kernels/numba/gemm.py, launched by pydl/_gemm_numba.py).

The step kernel is tiled: a block of TB x TU threads owns TB batch rows x TU hidden units,
thread (ty, tx) the element (row ty, unit tx). The K loop stages a TB x TK tile of x (or h)
and the four gates' TK x TU weight tiles (rows q*H + u of W) in shared memory, then each
thread runs 4 * TK multiply-adds: every loaded x value is reused by TU units and four gates,
every weight value by TB rows. The four gate sums of a thread belong to one (row, unit), so
the cell update follows in registers, with no second pass. The block loops over tiles (a
grid-stride loop, bounds uniform across the block so every thread reaches every syncthreads):
the simulator launches one block for all of them. The backward step is built the same way,
with the recurrent GEMM dh = dg_next W_hh as the prologue of the gate-gradient math.

TB, TU and TK size the shared arrays, so they are compile-time constants: `lstm_step_kernel`
builds and caches one kernel per tiling, launched with a (TU, TB) block.

All arithmetic is fp32; constants are typed fp32 so nothing is promoted to fp64 on the GPU.
sigmoid and tanh take exp of -|a| only (no overflow). fp16 arrays are read and written as
such; bf16 arrive as int16 bit patterns (see _dtypes).
"""
import math

import numpy as np
from numba import cuda, float32, int64

from ._dtypes import (BF16, bf16_bits_to_f32, dtype_code, f32_to_bf16_bits,  # noqa: F401
                      load_f32, store_f32)
from ._grid import grid_threads, thread_index

ZERO = np.float32(0.0)
ONE = np.float32(1.0)
TWO = np.float32(2.0)


# --- helpers -------------------------------------------------------------------------------

@cuda.jit(device=True)
def ld2(a, i, j, code):
    """a[i, j] as fp32 (code: the dtype_code of the tensor behind a)."""
    v = a[i, j]
    if code == BF16:
        return bf16_bits_to_f32(v)
    return float32(v)


@cuda.jit(device=True)
def st2(a, i, j, value, code):
    """a[i, j] = value, rounded to the tensor's dtype."""
    if code == BF16:
        a[i, j] = f32_to_bf16_bits(value)
    else:
        a[i, j] = value


@cuda.jit(device=True)
def ld1(a, i, code):
    v = a[i]
    if code == BF16:
        return bf16_bits_to_f32(v)
    return float32(v)


@cuda.jit(device=True)
def st1(a, i, value, code):
    if code == BF16:
        a[i] = f32_to_bf16_bits(value)
    else:
        a[i] = value


@cuda.jit(device=True)
def sigmoid(a):
    """1 / (1 + exp(-a)) without overflow: exp is only taken of -|a|."""
    e = float32(math.exp(-abs(a)))
    if a >= ZERO:
        return float32(ONE / (ONE + e))
    return float32(e / (ONE + e))


@cuda.jit(device=True)
def tanh(a):
    """sign(a) (1 - e) / (1 + e), e = exp(-2|a|): no overflow; NaN propagates."""
    e = float32(math.exp(-TWO * abs(a)))
    t = float32((ONE - e) / (ONE + e))
    if a >= ZERO:
        return t
    return -t


# --- the fused step ------------------------------------------------------------------------

_STEP_KERNELS = {}


def lstm_step_kernel(tb: int, tu: int, tk: int):
    """The fused step kernel for a TB x TU tile of (rows x units) and TK-wide K steps, built
    on first use; launch it with a (tu, tb) block. Arguments, in order:

    x (B, I), w_ih (4H, I), xp (B, 4H), b_ih (4H,), b_hh (4H,), h (B, P), c (B, H),
    w_hh (4H, P): inputs, any of them a placeholder when its flag says absent (P = H, or
    proj_size for an LSTM with projections: the K loop runs over h's columns, and h1 is
    then the unprojected o * tanh(c1), projected by the layer with a GEMM);
    h1, c1 (B, H): the new state (c1: the fp32 workspace); hn, cn: second copies of h1 / c1;
    gates (B, 4H): fp32 activations i, f, g, o;
    has_x, has_xp, has_bih, has_bhh, has_h, has_c, write_hn, write_cn: flags as in the
    Triton kernel (has_x: x @ W_ih^T is computed here; has_xp: the precomputed input part);
    code_*: dtype codes of x and w_ih, xp, the biases, h, c, w_hh, h1, c1, hn, cn.
    """
    key = (int(tb), int(tu), int(tk))
    if key not in _STEP_KERNELS:
        _STEP_KERNELS[key] = _build_step(*key)
    return _STEP_KERNELS[key]


def _build_step(TB, TU, TK):
    NT = TB * TU

    @cuda.jit(device=True)
    def gate_dots(a, w, row0, unit0, H, sa, sw, code_a, code_w, acc_i, acc_f, acc_g, acc_o):
        """acc_q += a[rows] @ w[q*H + units]^T over the whole K axis, tile by tile."""
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TU + tx
        B = a.shape[0]
        K = a.shape[1]
        for k0 in range(0, K, TK):
            for e in range(tid, TB * TK, NT):
                i = e // TK
                kk = e - i * TK
                v = ZERO
                if row0 + i < B and k0 + kk < K:
                    v = ld2(a, row0 + i, k0 + kk, code_a)
                sa[i, kk] = v
            for e in range(tid, 4 * TU * TK, NT):
                # kk fastest: neighbouring threads read neighbouring weights of one row
                q = e // (TU * TK)
                rem = e - q * (TU * TK)
                j = rem // TK
                kk = rem - j * TK
                v = ZERO
                if unit0 + j < H and k0 + kk < K:
                    v = ld2(w, int64(q) * H + unit0 + j, k0 + kk, code_w)
                sw[q, kk, j] = v
            cuda.syncthreads()
            for kk in range(TK):
                av = sa[ty, kk]
                acc_i += av * sw[0, kk, tx]
                acc_f += av * sw[1, kk, tx]
                acc_g += av * sw[2, kk, tx]
                acc_o += av * sw[3, kk, tx]
            cuda.syncthreads()
        return acc_i, acc_f, acc_g, acc_o

    @cuda.jit
    def step(x, wih, xp, bih, bhh, h, c, whh, h1, c1, hn, cn, gates,
             has_x, has_xp, has_bih, has_bhh, has_h, has_c, write_hn, write_cn,
             code_x, code_xp, code_b, code_h, code_c, code_h1, code_c1, code_hn, code_cn):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((4, TK, TU), float32)
        B = h1.shape[0]
        H = h1.shape[1]
        tiles_u = (H + TU - 1) // TU
        tiles = ((B + TB - 1) // TB) * tiles_u
        for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
            row0 = int64(tile // tiles_u) * TB
            unit0 = int64(tile % tiles_u) * TU
            r = row0 + cuda.threadIdx.y
            u = unit0 + cuda.threadIdx.x
            a_i = ZERO
            a_f = ZERO
            a_g = ZERO
            a_o = ZERO
            if has_x:
                a_i, a_f, a_g, a_o = gate_dots(x, wih, row0, unit0, H, sa, sw, code_x, code_x,
                                               a_i, a_f, a_g, a_o)
            if has_h:
                a_i, a_f, a_g, a_o = gate_dots(h, whh, row0, unit0, H, sa, sw, code_h, code_h,
                                               a_i, a_f, a_g, a_o)
            if r < B and u < H:
                if has_xp:
                    a_i += ld2(xp, r, u, code_xp)
                    a_f += ld2(xp, r, u + H, code_xp)
                    a_g += ld2(xp, r, u + 2 * H, code_xp)
                    a_o += ld2(xp, r, u + 3 * H, code_xp)
                if has_bih:
                    a_i += ld1(bih, u, code_b)
                    a_f += ld1(bih, u + H, code_b)
                    a_g += ld1(bih, u + 2 * H, code_b)
                    a_o += ld1(bih, u + 3 * H, code_b)
                if has_bhh:
                    a_i += ld1(bhh, u, code_b)
                    a_f += ld1(bhh, u + H, code_b)
                    a_g += ld1(bhh, u + 2 * H, code_b)
                    a_o += ld1(bhh, u + 3 * H, code_b)
                i = sigmoid(a_i)
                f = sigmoid(a_f)
                g = tanh(a_g)
                o = sigmoid(a_o)
                c_new = i * g
                if has_c:
                    c_new += f * ld2(c, r, u, code_c)
                h_new = o * tanh(c_new)
                st2(h1, r, u, h_new, code_h1)
                st2(c1, r, u, c_new, code_c1)
                if write_hn:
                    st2(hn, r, u, h_new, code_hn)
                if write_cn:
                    st2(cn, r, u, c_new, code_cn)
                gates[r, u] = i
                gates[r, u + H] = f
                gates[r, u + 2 * H] = g
                gates[r, u + 3 * H] = o

    return step


# --- backward ------------------------------------------------------------------------------

_BWD_KERNELS = {}


def lstm_step_bwd_kernel(tb: int, tu: int, tk: int):
    """The fused backward step for a TB x TU tile and TK-wide K steps, built on first use;
    launch it with a (tu, tb) block. Same formulas and arguments as the Triton kernel
    lstm_step_bwd (in order: gates, c_prev, c1, dg_next, w_hh, dha, dhb, dc, dg, dc_prev, the
    flags has_cprev, has_dgn, has_dha, has_dhb, has_dc, write_dcprev, then the dtype codes of
    c_prev, w_hh, dha, dhb, dc, dc_prev; gates, c1, dg_next and dg are fp32).

    dh1 = dg_next @ W_hh is the prologue (recurrent_dh_device); then each thread finishes its
    own (row, unit) elementwise. dc may alias dc_prev.
    """
    key = (int(tb), int(tu), int(tk))
    if key not in _BWD_KERNELS:
        _BWD_KERNELS[key] = _build_step_bwd(*key)
    return _BWD_KERNELS[key]


_DH_PROLOGUES = {}


def recurrent_dh_device(tb: int, tu: int, tk: int):
    """The device function dh = dg_next[rows] @ W_hh[:, units] of one (row, unit) per thread,
    for a TB x TU block (the recurrent GEMM of backpropagation through time, the prologue of
    the LSTM's and the GRU's backward steps). Arguments: dgn (B, K) fp32, whh (K, H), row0,
    unit0, K, H, sa (TB, TK) and sw (TK, TU) fp32 shared arrays of the calling kernel, and
    W_hh's dtype code. Per K step the block stages a TB x TK tile of dg_next and a TK x TU tile
    of W_hh (rows k, the block's unit columns), as the forward step does."""
    key = (int(tb), int(tu), int(tk))
    if key not in _DH_PROLOGUES:
        _DH_PROLOGUES[key] = _build_dh_prologue(*key)
    return _DH_PROLOGUES[key]


def _build_dh_prologue(TB, TU, TK):
    NT = TB * TU

    @cuda.jit(device=True)
    def recurrent_dh(dgn, whh, row0, unit0, K, H, sa, sw, code_w):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TU + tx
        B = dgn.shape[0]
        dh = ZERO
        for k0 in range(0, K, TK):
            for e in range(tid, TB * TK, NT):
                ii = e // TK
                kk = e - ii * TK
                v = ZERO
                if row0 + ii < B and k0 + kk < K:
                    v = dgn[row0 + ii, k0 + kk]
                sa[ii, kk] = v
            for e in range(tid, TK * TU, NT):
                kk = e // TU
                j = e - kk * TU
                v = ZERO
                if k0 + kk < K and unit0 + j < H:
                    v = ld2(whh, k0 + kk, unit0 + j, code_w)
                sw[kk, j] = v
            cuda.syncthreads()
            for kk in range(TK):
                dh += sa[ty, kk] * sw[kk, tx]
            cuda.syncthreads()
        return dh

    return recurrent_dh


def _build_step_bwd(TB, TU, TK):
    recurrent_dh = recurrent_dh_device(TB, TU, TK)

    @cuda.jit
    def step_bwd(gates, cprev, c1, dgn, whh, dha, dhb, dc, dg, dcprev,
                 has_cprev, has_dgn, has_dha, has_dhb, has_dc, write_dcprev,
                 code_cprev, code_w, code_dha, code_dhb, code_dc, code_dcprev):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((TK, TU), float32)
        B = c1.shape[0]
        H = c1.shape[1]
        tiles_u = (H + TU - 1) // TU
        tiles = ((B + TB - 1) // TB) * tiles_u
        for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
            row0 = int64(tile // tiles_u) * TB
            unit0 = int64(tile % tiles_u) * TU
            r = row0 + cuda.threadIdx.y
            u = unit0 + cuda.threadIdx.x
            dh = ZERO
            if has_dgn:
                dh = recurrent_dh(dgn, whh, row0, unit0, 4 * H, H, sa, sw, code_w)
            if r < B and u < H:
                if has_dha:
                    dh += ld2(dha, r, u, code_dha)
                if has_dhb:
                    dh += ld2(dhb, r, u, code_dhb)
                i = gates[r, u]
                f = gates[r, u + H]
                g = gates[r, u + 2 * H]
                o = gates[r, u + 3 * H]
                tc = tanh(float32(c1[r, u]))
                dct = dh * o * (ONE - tc * tc)
                if has_dc:
                    dct += ld2(dc, r, u, code_dc)
                c = ZERO
                if has_cprev:
                    c = ld2(cprev, r, u, code_cprev)
                dg[r, u] = dct * g * i * (ONE - i)
                dg[r, u + H] = dct * c * f * (ONE - f)
                dg[r, u + 2 * H] = dct * i * (ONE - g * g)
                dg[r, u + 3 * H] = dh * tc * o * (ONE - o)
                if write_dcprev:
                    st2(dcprev, r, u, dct * f, code_dcprev)

    return step_bwd


@cuda.jit
def bias_grad(dg, db1, db2, write_db2, code_db):
    """db[n] = sum over (t, b) of dg[t, b, n] (dg: fp32 (T, B, N)), written to db1 and, when
    write_db2, db2; one thread per column."""
    T = dg.shape[0]
    B = dg.shape[1]
    N = dg.shape[2]
    for n in range(thread_index(), N, grid_threads()):
        acc = ZERO
        for t in range(T):
            for b in range(B):
                acc += dg[t, b, n]
        st1(db1, n, acc, code_db)
        if write_db2:
            st1(db2, n, acc, code_db)


@cuda.jit
def mul_3d(x, s, y, code_x, code_s, code_y):
    """y = x * s elementwise over 3-D arrays of any strides; y may alias x."""
    D1 = x.shape[1]
    D2 = x.shape[2]
    for e in range(thread_index(), int64(x.shape[0]) * D1 * D2, grid_threads()):
        i0 = e // (D1 * D2)
        rem = e - i0 * (D1 * D2)
        i1 = rem // D2
        i2 = rem - i1 * D2
        store_f32(y, i0, i1, i2, load_f32(x, i0, i1, i2, code_x) * load_f32(s, i0, i1, i2, code_s),
                  code_y)
