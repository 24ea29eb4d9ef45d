"""Numba CUDA kernels for 2-D convolution by im2col + GEMM: the column builders and reducers.

Same semantics as kernels/triton/conv.py (cross-correlation, as cuDNN computes it). Here the
patches ARE materialised, a chunk of the batch at a time, and the products run on the tiled
GEMM of kernels/numba/gemm.py:

    cols[g, n, p, k] = x[n, g*CG + c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW]  (0 outside x)
        p = oh*OW + ow;  k = (c, kh, kw) flattened, or (kh, kw, c) with `c_last`
    forward       y[n, g*OCG + o, p]  = sum_k cols[g, n, p, k] W[g*OCG + o, k]  (+ bias)
    grad input    dcols[g, n, p, k]   = sum_o dy[n, g*OCG + o, p] W[g*OCG + o, k]
                  dx[n, g*CG + c, h, w] = sum of the dcols entries that read x[n, c, h, w]
    grad weight   dW[g*OCG + o, k]    = sum over (n, p) of dy[n, g*OCG + o, p] cols[g, n, p, k]
    grad bias     db[o]               = sum over (n, p) of dy[n, o, p]

The k order follows the weight's memory layout (the launcher picks it): (c, kh, kw) for an
NCHW-contiguous weight, (kh, kw, c) for a channels_last one, so the weight is a plain
(G, OCG, K) strided view in either case.

col2im is a gather, not a scatter: a thread owns one dx element and sums, in a fixed order,
the column entries whose window position reads it (kh, kw with (h + PH - kh*DH) / SH and
(w + PW - kw*DW) / SW exact and in range). Every dx element is written exactly once: no
atomics, no zero-fill, deterministic. The bias gradient is one block per output channel,
threads striding over the pixels and a shared-memory tree reduction: deterministic as well.

Layout: x, dx and dy are (N, C, H, W) arrays of any strides; the column buffers are the
launcher's contiguous (G, Nc, P, K) workspaces. Every kernel except the bias reduction is a
1-D grid-stride loop over its elements, so results do not depend on the grid size (the
launcher caps it in the CUDA simulator, where each thread is an OS thread); index arithmetic
is int64. Arithmetic is fp32 (kernels/numba/_dtypes.py decodes fp16 and bf16); im2col copies
raw elements, so its columns have x's dtype (bf16 stays int16 bits) and no rounding.
"""
import numpy as np
from numba import cuda, float32, int64

from ._device import device
from ._dtypes import dtype_code, load4_f32, store4_f32  # noqa: F401  (dtype_code: launchers)
from ._grid import grid_threads, thread_index
from ._index import BEFORE_ALL, unravel4, unravel_nchw, window_of

ZERO = np.float32(0.0)
# Largest block of the bias reduction (its shared array needs a compile-time size).
MAX_THREADS = 256


@device
def _split_k(k, CG, KH, KW, c_last):
    """(c, kh, kw) of a column index k: k = (c*KH + kh)*KW + kw, or (kh*KW + kw)*CG + c."""
    if c_last:
        c = k % CG
        r = k // CG
    else:
        r = k % (KH * KW)
        c = k // (KH * KW)
    return c, r // KW, r % KW


@device
def _col_index(c, kh, kw, CG, KH, KW, c_last):
    """Inverse of _split_k."""
    if c_last:
        return (kh * KW + kw) * CG + c
    return (c * KH + kh) * KW + kw


@cuda.jit
def im2col(x, cols, n0, SH, SW, PH, PW, DH, DW, KH, KW, OW, c_last):
    """cols[g, n, p, k] = x[n0 + n, g*CG + c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW], zero
    where that falls in the padding; one thread per column entry, in the memory order of cols.

    x:       input, (N, C, H, W) array, any strides, any dtype (copied raw)
    cols:    output, contiguous (G, Nc, OH*OW, CG*KH*KW) array of x's element type
    n0:      first image of the chunk
    SH .. DW: stride, top / left padding and dilation
    KH, KW:  kernel size
    OW:      output width (p = oh*OW + ow)
    c_last:  k = (kh, kw, c) instead of (c, kh, kw)
    """
    G, NC, P, K = cols.shape
    H = x.shape[2]
    W = x.shape[3]
    CG = x.shape[1] // G
    for i in range(thread_index(), G * NC * P * K, grid_threads()):
        g, n, p, k = unravel4(i, NC, P, K)
        c, kh, kw = _split_k(k, CG, KH, KW, c_last)
        oh = p // OW
        ow = p - oh * OW
        h = oh * SH - PH + kh * DH
        w = ow * SW - PW + kw * DW
        if h >= 0 and h < H and w >= 0 and w < W:
            cols[g, n, p, k] = x[n0 + n, g * CG + c, h, w]
        else:
            cols[g, n, p, k] = 0


@cuda.jit
def col2im(dcols, dx, n0, SH, SW, PH, PW, DH, DW, KH, KW, OH, OW, c_last, channels_last, code):
    """dx[n0 + n, g*CG + c, h, w] = sum over the (kh, kw) whose window position reads (h, w) of
    dcols[g, n, oh*OW + ow, k(c, kh, kw)]; one thread per dx element of the chunk (a gather).

    dcols:   fp32 contiguous (G, Nc, OH*OW, CG*KH*KW) array (the column gradients)
    dx:      output, (N, C, H, W) array, any strides; images n0 .. n0 + Nc - 1 are written
    n0:      first image of the chunk
    SH .. KW: as in im2col
    OH, OW:  output size
    c_last:  k order of dcols, as in im2col
    channels_last: order the threads with c fastest (else w fastest)
    code:    dtype_code of dx
    """
    G = dcols.shape[0]
    NC = dcols.shape[1]
    C = dx.shape[1]
    H = dx.shape[2]
    W = dx.shape[3]
    CG = C // G
    for i in range(thread_index(), NC * C * H * W, grid_threads()):
        n, c, h, w = unravel_nchw(i, C, H, W, channels_last)
        g = c // CG
        cg = c - g * CG
        acc = ZERO
        for kh in range(KH):
            oh = window_of(h, kh, PH, DH, SH, OH)
            if oh == BEFORE_ALL:
                break
            if oh < 0:
                continue
            for kw in range(KW):
                ow = window_of(w, kw, PW, DW, SW, OW)
                if ow == BEFORE_ALL:
                    break
                if ow < 0:
                    continue
                acc += dcols[g, n, oh * OW + ow, _col_index(cg, kh, kw, CG, KH, KW, c_last)]
        store4_f32(dx, n0 + n, c, h, w, acc, code)


@cuda.jit
def bias_grad(dy, db, code_dy, code_db):
    """db[o] = sum over (n, oh, ow) of dy[n, o, oh, ow]: one block per channel (a grid-stride
    loop over channels), threads striding over the pixels, then a shared-memory tree.

    dy:      (N, OC, OH, OW) array, any strides
    db:      output, (1, 1, 1, OC) array (a view of the (OC,) gradient)
    code_*:  dtype_code of dy and db
    The block size must be a power of two, at most MAX_THREADS.
    """
    partial = cuda.shared.array(MAX_THREADS, float32)
    N, OC, OH, OW = dy.shape
    P = OH * OW
    tid = cuda.threadIdx.x
    nthreads = cuda.blockDim.x
    for o in range(cuda.blockIdx.x, OC, cuda.gridDim.x):
        acc = ZERO
        for j in range(int64(tid), N * P, nthreads):
            n = j // P
            p = j - n * P
            oh = p // OW
            acc += load4_f32(dy, n, o, oh, p - oh * OW, code_dy)
        partial[tid] = acc
        cuda.syncthreads()
        half = nthreads // 2
        while half > 0:
            if tid < half:
                partial[tid] = partial[tid] + partial[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            store4_f32(db, 0, 0, 0, o, partial[0], code_db)
        cuda.syncthreads()  # slot 0 is read before the next channel overwrites it


@cuda.jit
def copy4(src, dst, code_src, code_dst):
    """dst[i0, i1, i2, i3] = src[...], converted through fp32 (a layout or dtype change of a
    weight-sized tensor, when no strided view will do). Both (A, B, C, D) arrays, any strides;
    one thread per element."""
    A, B, C, D = dst.shape
    for i in range(thread_index(), A * B * C * D, grid_threads()):
        i0, i1, i2, i3 = unravel4(i, B, C, D)
        store4_f32(dst, i0, i1, i2, i3, load4_f32(src, i0, i1, i2, i3, code_src), code_dst)
