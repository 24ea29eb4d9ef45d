"""A tiled Numba CUDA GEMM over 4-D strided arrays: C[b1, b2] = A[b1, b2] @ B[b1, b2] (+ ...).

    A: (B1, B2, M, K)    B: (B1, B2, K, N)    C: (B1, B2c, M, N)

Each operand is a 4-D array of any strides (Numba arrays keep them, so a transposed or
permuted torch view costs nothing). The two leading axes are batch axes:
  - an operand whose batch axis has size 1 is broadcast along it (a weight shared by a batch);
  - when C's second batch axis has size 1 and the operands' has B2 > 1, that axis is summed
    over inside the K loop: C[b1, 0] = sum over b2 of A[b1, b2] @ B[b1, b2]. A reduction over
    (image, pixel) pairs whose strides do not merge into one (an NCHW gradient) is a GEMM.

Epilogue, in fp32 before the one rounding to C's type:
  out = acc (+ c_in[b1, b2, m, n] when `accumulate`) (+ bias[b1, 0, 0, n] or [.., m]),
then with `softcap` s > 0 s tanh(out / s), written to c_out. c_in and c_out may be the same
array (each element is read and then written by the same thread) or differ (an fp32
accumulator read, the final result written in fp16).

Tiling: one block computes a TILE x TILE tile of C with (TILE / MICRO)^2 threads, each
owning a MICRO x MICRO register tile: rows ty + i * TILE / MICRO, columns tx + j * TILE / MICRO
(interleaved, so a warp's loads, stores and shared reads at fixed (i, j) are consecutive).
The K loop stages a TILE x TILE tile of A and one of B in shared memory per step (zeros outside
M, N, K, so any sizes work), synchronises, and each thread runs TILE x MICRO^2 fp32
multiply-adds from registers and shared memory. Loads are coalesced whichever axis of an
operand is the contiguous one: the launcher says per operand which axis has the smaller
stride and the threads' x index walks that axis (the tiles are padded to TILE + 1 columns so
the transposed write does not bank-conflict). Stores are coalesced along columns; the launcher
(pydl/_gemm_numba.py) computes C^T = B^T A^T instead when C's rows are the contiguous axis.
The micro-tile also keeps the CUDA simulator usable: a syncthreads there costs milliseconds,
more with more threads, so a few threads doing more work each make emulated tests fast.

Grid: x over column tiles, y over row tiles, z over the B1 x B2c batches; every axis is a
grid-stride loop over its tiles, so the grid may be smaller than the work (GPU limits on
y and z; the CUDA simulator, where a launcher caps the grid at one block). The loop bounds
are uniform across a block, so every thread reaches every syncthreads.

TILE and MICRO are compile-time constants (the shared and local arrays need them):
`gemm_kernel(tile, micro, trim)` builds one kernel per combination (`trim`: the simulator's
variant that skips work outside the matrices, see there), made and cached by `_build`, a
kernels/numba/_builder.py builder.

All arithmetic is fp32; fp16 and bf16 (int16 bits) operands and results are decoded and
encoded with kernels/numba/_dtypes.py, one dtype code per array.
"""
import math

import numpy as np
from numba import cuda, float32, int64

from ._builder import builder
from ._device import device
from ._dtypes import dtype_code, load4_f32, store4_f32  # noqa: F401  (dtype_code: launchers)

ZERO = np.float32(0.0)

BIAS_NONE = 0
BIAS_COLS = 1   # bias[b1, 0, 0, n]: one value per column
BIAS_ROWS = 2   # bias[b1, 0, 0, m]: one value per row (the transposed problem)


def gemm_kernel(tile: int, micro: int, trim: bool = False):
    """The GEMM kernel for TILE = `tile` and MICRO = `micro` (powers of two, micro <= tile),
    compiled on first use; launch it with a (tile // micro, tile // micro) block.

    trim: skip the multiply-adds of a tile's rows, columns and K steps that lie outside the
    matrices (and the zero-fill of their shared entries, which are then never read). For the
    CUDA simulator, where a multiply-add costs microseconds and a small N (depthwise: one
    output channel per group) would otherwise run a whole tile's worth; on a GPU the
    constant trip counts keep the register tile in registers, so it stays off there.

    Kernel arguments, in order:

    a, b:         (B1, B2, M, K) and (B1, B2, K, N) arrays, any strides, batch axes of size 1
                  broadcast
    c_in:         (B1, B2c, M, N) array read when `accumulate` (any 4-D array otherwise)
    c_out:        (B1, B2c, M, N) output array; B2c = 1 with B2 > 1 sums over b2
    bias:         (B1 or 1, 1, 1, L) array, L = N or M per `bias_mode` (any 4-D array for
                  BIAS_NONE)
    accumulate:   add c_in to the product
    bias_mode:    BIAS_NONE, BIAS_COLS or BIAS_ROWS
    a_k_fast:     A's K axis has the smaller stride (threads walk k when loading A)
    b_n_fast:     B's N axis has the smaller stride (threads walk n when loading B)
    code_*:       dtype_code of each array
    """
    T, R = int(tile), int(micro)
    if T < 1 or T & (T - 1) or R < 1 or R & (R - 1) or R > T:
        raise ValueError(f"GEMM tile and micro-tile must be powers of two with micro <= tile, "
                         f"got {tile}, {micro}")
    return _build(T, R, bool(trim))


@builder
def _build(T, R, TRIM):
    # compile-time constants of this kernel (the shared and local arrays need them)
    TP = T + 1          # padded row length of the shared tiles
    TR = T // R         # threads per block along each axis

    @cuda.jit
    def gemm(a, b, c_in, c_out, bias, accumulate, bias_mode, softcap, a_k_fast, b_n_fast,
             code_a, code_b, code_c_in, code_c_out, code_bias):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((T, TP), float32)   # sa[i, kk] = A[row0 + i, k0 + kk]
        sb = cuda.shared.array((T, TP), float32)   # sb[kk, j] = B[k0 + kk, col0 + j]
        acc = cuda.local.array((R, R), float32)    # C[row0 + ty + i TR, col0 + tx + j TR]
        part = cuda.local.array((R, R), float32)   # the same elements' sums over one K tile
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        M = c_out.shape[2]
        N = c_out.shape[3]
        K = a.shape[3]
        B1 = c_out.shape[0]
        B2c = c_out.shape[1]
        B2 = a.shape[1] if a.shape[1] != 1 else b.shape[1]
        n_red = B2 if (B2c == 1 and B2 != 1) else 1   # b2 values summed into one C
        tiles_m = (M + T - 1) // T
        tiles_n = (N + T - 1) // T
        # which elements of each tile this thread loads: x walks the contiguous axis
        a_i = ty if a_k_fast else tx
        a_k = tx if a_k_fast else ty
        b_k = ty if b_n_fast else tx
        b_j = tx if b_n_fast else ty
        for z in range(cuda.blockIdx.z, B1 * B2c, cuda.gridDim.z):
            b1, b2c, a1, w1 = batch_of(z, B2c, a, b)
            for tm in range(cuda.blockIdx.y, tiles_m, cuda.gridDim.y):
                row0 = int64(tm) * T
                for tn in range(cuda.blockIdx.x, tiles_n, cuda.gridDim.x):
                    col0 = int64(tn) * T
                    for i in range(R):
                        for j in range(R):
                            acc[i, j] = ZERO
                    for r in range(n_red):
                        b2 = r if n_red != 1 else b2c
                        a2 = b2 if a.shape[1] != 1 else 0
                        w2 = b2 if b.shape[1] != 1 else 0
                        for k0 in range(0, K, T):
                            # this thread's share of the A and B tiles: R x R elements each
                            # (under TRIM only those inside the matrices)
                            ai = R
                            ak = R
                            bk = R
                            bj = R
                            if TRIM:
                                ai = _span(M - row0 - a_i, TR, R)
                                ak = _span(K - k0 - a_k, TR, R)
                                bk = _span(K - k0 - b_k, TR, R)
                                bj = _span(N - col0 - b_j, TR, R)
                            for i in range(ai):
                                si = a_i + i * TR
                                m = row0 + si
                                for j in range(ak):
                                    sk = a_k + j * TR
                                    k = k0 + sk
                                    if m < M and k < K:
                                        sa[si, sk] = load4_f32(a, a1, a2, m, k, code_a)
                                    else:
                                        sa[si, sk] = ZERO
                            for i in range(bk):
                                sk = b_k + i * TR
                                k = k0 + sk
                                for j in range(bj):
                                    sj = b_j + j * TR
                                    n = col0 + sj
                                    if k < K and n < N:
                                        sb[sk, sj] = load4_f32(b, w1, w2, k, n, code_b)
                                    else:
                                        sb[sk, sj] = ZERO
                            cuda.syncthreads()
                            nk = T
                            ni = R
                            nj = R
                            if TRIM:
                                nk = min(T, K - k0)
                                ni = _span(M - row0 - ty, TR, R)
                                nj = _span(N - col0 - tx, TR, R)
                            # each K tile summed apart, then added: rounding error grows
                            # with T + K / T terms, not K (one running sum lost the small
                            # products of long reductions, bench/TUNING.md)
                            for i in range(ni):
                                for j in range(nj):
                                    part[i, j] = ZERO
                            for kk in range(nk):
                                for i in range(ni):
                                    av = sa[ty + i * TR, kk]
                                    for j in range(nj):
                                        part[i, j] += av * sb[kk, tx + j * TR]
                            for i in range(ni):
                                for j in range(nj):
                                    acc[i, j] += part[i, j]
                            cuda.syncthreads()
                    ni = R
                    nj = R
                    if TRIM:
                        ni = _span(M - row0 - ty, TR, R)
                        nj = _span(N - col0 - tx, TR, R)
                    for i in range(ni):
                        m = row0 + ty + i * TR
                        for j in range(nj):
                            n = col0 + tx + j * TR
                            if m < M and n < N:
                                store_result(acc[i, j], c_in, c_out, bias, b1, b2c, m, n,
                                             accumulate, bias_mode, softcap, code_c_in,
                                             code_c_out, code_bias)

    return gemm


@cuda.jit(device=True)
def _span(room, step, count):
    """How many of the offsets 0, step, .., (count - 1) * step are below `room`."""
    if room <= 0:
        return 0
    return min(count, (room + step - 1) // step)


@device
def batch_of(z, B2c, a, b):
    """Item z of the output's (B1, B2c) batches (both GEMM kernels): (b1, b2c) and the
    operands' first batch indices (a1, w1), 0 where an operand broadcasts along it."""
    b1 = int64(z) // B2c
    return b1, int64(z) - b1 * B2c, b1 if a.shape[0] != 1 else 0, b1 if b.shape[0] != 1 else 0


@device
def store_result(out, c_in, c_out, bias, b1, b2c, m, n, accumulate, bias_mode, softcap,
                 code_c_in, code_c_out, code_bias):
    """The epilogue of one output element (both GEMM kernels): c_out[b1, b2c, m, n] = out (the
    fp32 product) (+ c_in's element when `accumulate`) (+ the bias of its column or row),
    then with softcap s > 0 s tanh(. / s) (a language model's capped logits; the launcher
    refuses it with an addend), rounded once to c_out's dtype."""
    if accumulate:
        out += load4_f32(c_in, b1, b2c, m, n, code_c_in)
    if bias_mode == BIAS_COLS:
        out += _load_bias(bias, b1, n, code_bias)
    elif bias_mode == BIAS_ROWS:
        out += _load_bias(bias, b1, m, code_bias)
    if softcap > 0:
        out = float32(softcap * math.tanh(out / softcap))
    store4_f32(c_out, b1, b2c, m, n, out, code_c_out)


@cuda.jit(device=True)
def _load_bias(bias, b1, i, code):
    """bias[b1, 0, 0, i] as fp32, the first axis broadcast when it has size 1."""
    return load4_f32(bias, b1 if bias.shape[0] != 1 else 0, 0, 0, i, code)
