"""Numba CUDA pieces every recurrent layer shares (kernels/numba/lstm.py and gru.py build on
them): typed loads and stores, the gate nonlinearities, a tile's origin, the gate-stacked
loads, sums and stores, the tiled products of a step, and the layer's other kernels (bias
column sums, dropout's product). Same math, layout and launch
structure as kernels/triton/rnn.py (see its docstring): a layer kernel runs a range of time
steps per launch, each block looping over (rows x units) tiles; between steps, when the
launch covers several, the blocks meet at the grid's barrier (cuda.cg.this_grid().sync(): a
cooperative launch, which Numba makes when a kernel uses it). The CUDA simulator supports it
with one block, which is how pydl launches in emulation.

A block of TB x TU threads owns TB batch rows x TU hidden units, thread (ty, tx) the element
(row ty, unit tx). The products stage a TB x TK tile of the left operand and the gates'
TK x TU weight tiles in shared memory per K step, then each thread runs the multiply-adds
of its element: every staged value is reused by TU units (and every gate) or TB rows. TB,
TU and TK size the shared arrays, so they are compile-time constants: the kernel builders
(`*_kernel(tb, tu, tk)`, kernels/numba/_builder.py builders) make and cache one kernel per
tiling, launched with a (tu, tb) block. The gate and tile helpers are inlined at Numba's
level (inline="always"), so the kernels compile as if they were written out there.

All arithmetic is fp32; constants are typed fp32 so nothing is promoted to fp64 on the GPU.
sigmoid and tanh take exp of -|a| only (no overflow). fp16 arrays are read and written as
such; bf16 arrive as int16 bit patterns (see _dtypes).
"""
import math

import numpy as np
from numba import cuda, float32, int64

from ._builder import builder
from ._dtypes import BF16, FP32, bf16_bits_to_f32, dtype_code, f32_to_bf16_bits, load_f32, store_f32  # noqa: F401
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


@cuda.jit(device=True)
def step_time(s, T, reverse):
    """The time index of run-order step s of a direction."""
    if reverse:
        return int64(T - 1 - s)
    return int64(s)


@cuda.jit(device=True, inline="always")
def bptt_step(us, T, reverse):
    """(t, tn, tp, now, before) of BPTT step us (run-order step T-1-us): its time, the time of
    the step that ran after it and of the one before; the planes of the running buffers by
    step parity, the one it writes and the one it reads."""
    s = T - 1 - us
    now = us % 2
    return (step_time(s, T, reverse), step_time(s + 1, T, reverse),
            step_time(s - 1, T, reverse), now, 1 - now)


@cuda.jit(device=True, inline="always")
def tile_origin(tile, n_rb, TB, TU):
    """(first row, first unit, this thread's row, its unit) of tile number `tile` of TB rows x
    TU units, row blocks varying fastest (as kernels/triton/rnn.py tile_of)."""
    row0 = int64(tile % n_rb) * TB
    unit0 = int64(tile // n_rb) * TU
    return row0, unit0, row0 + cuda.threadIdx.y, unit0 + cuda.threadIdx.x


@cuda.jit(device=True, inline="always")
def load_gates(a, t, r, u, H):
    """The four gates (a[t, r, q*H + u], q < 4) of a gate-stacked row of an fp32 workspace."""
    return a[t, r, u], a[t, r, u + H], a[t, r, u + 2 * H], a[t, r, u + 3 * H]


@cuda.jit(device=True, inline="always")
def store_gates(a, t, r, u, H, g0, g1, g2, g3, G):
    """a[t, r, q*H + u] = g_q for the gates q < G (3 or 4) of a gate-stacked row of an fp32
    workspace."""
    a[t, r, u] = g0
    a[t, r, u + H] = g1
    a[t, r, u + 2 * H] = g2
    if G > 3:
        a[t, r, u + 3 * H] = g3


@cuda.jit(device=True, inline="always")
def add_gates(a0, a1, a2, a3, v, u, H, G, code):
    """(a0, a1, a2, a3) plus, for the gates q < G (3 or 4), element q*H + u of the
    gate-stacked vector v (a bias, a row of xp) in fp32."""
    a0 += ld1(v, u, code)
    a1 += ld1(v, u + H, code)
    a2 += ld1(v, u + 2 * H, code)
    if G > 3:
        a3 += ld1(v, u + 3 * H, code)
    return a0, a1, a2, a3


# --- the products of a step -------------------------------------------------------------------

@cuda.jit(device=True, inline="always")
def stage_rows(sa, a, row0, k0, K, code, tid, TB, TK, NT):
    """sa[i, kk] = a[row0 + i, k0 + kk] in fp32 (zero past a's rows or column K): the block's
    TB x TK tile of the left operand at k0, staged by its NT threads from thread tid."""
    B = a.shape[0]
    for e in range(tid, TB * TK, NT):
        i = e // TK
        kk = e - i * TK
        v = ZERO
        if row0 + i < B and k0 + kk < K:
            v = ld2(a, row0 + i, k0 + kk, code)
        sa[i, kk] = v


@builder
def gate_dots_device(TB, TU, TK):
    """The device function gate_dots(a, w, row0, unit0, H, G, sa, sw, code_a, code_w, acc0,
    acc1, acc2, acc3) -> the four accumulators plus, for gates q < G, a[row] . w[q*H + unit]
    over all of a's columns (the thread's row row0 + ty and unit unit0 + tx); sa (TB, TK)
    and sw (4, TK, TU) are the calling kernel's fp32 shared arrays. G = 1 and H = the
    output width make it a plain product (the LSTM's projection)."""
    NT = TB * TU

    @cuda.jit(device=True)
    def gate_dots(a, w, row0, unit0, H, G, sa, sw, code_a, code_w, acc0, acc1, acc2, acc3):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TU + tx
        K = a.shape[1]
        for k0 in range(0, K, TK):
            stage_rows(sa, a, row0, k0, K, code_a, tid, TB, TK, NT)
            for e in range(tid, G * TU * TK, NT):
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
                acc0 += av * sw[0, kk, tx]
                if G > 1:
                    acc1 += av * sw[1, kk, tx]
                    acc2 += av * sw[2, kk, tx]
                if G > 3:
                    acc3 += av * sw[3, kk, tx]
            cuda.syncthreads()
        return acc0, acc1, acc2, acc3

    return gate_dots


@builder
def recurrent_dh_device(TB, TU, TK):
    """The device function dh = dg_next[rows] @ W[:, units] of one (row, unit) per thread:
    the recurrent product of backpropagation through time. Arguments: dgn (B, K) fp32, w
    (K, H), row0, unit0, K, H, sa (TB, TK) and sw (TK, TU) fp32 shared arrays of the calling
    kernel, and W's dtype code."""
    NT = TB * TU

    @cuda.jit(device=True)
    def recurrent_dh(dgn, whh, row0, unit0, K, H, sa, sw, code_w):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TU + tx
        dh = ZERO
        for k0 in range(0, K, TK):
            stage_rows(sa, dgn, row0, k0, K, FP32, tid, TB, TK, NT)
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


# --- the layer's other kernels ----------------------------------------------------------------

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
        if code_db == BF16:
            db1[n] = f32_to_bf16_bits(acc)
            if write_db2:
                db2[n] = f32_to_bf16_bits(acc)
        else:
            db1[n] = acc
            if write_db2:
                db2[n] = acc


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
