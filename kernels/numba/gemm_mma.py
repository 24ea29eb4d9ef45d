"""The Numba GEMM on tensor cores, for fp16 and bf16 operands: C[b1, b2] = A @ B (+ ...).

The same problem, batch rules, epilogue and arguments as kernels/numba/gemm.py (read its
docstring first), with the product on the tensor cores: each warp issues PTX mma.sync
m16n8k16 (kernels/numba/_device.py `mma`: Numba has no tensor-core intrinsic, so it is inline
PTX) where the CUDA-core kernel runs fp32 multiply-adds, 16 x 8 x 16 multiply-adds an
instruction per warp against 32. Accumulation is fp32 in the tensor cores' registers.

    block = WM x WN warps; warp (wm, wn) owns the 32 x 32 output block at
            (32 wm, 32 wn) of the block's BM x BN tile (BM = 32 WM, BN = 32 WN):
            2 x 4 mma tiles of 16 x 8, 32 fp32 accumulators a lane
    K loop: BK = 32 deep a step; A's BM x 32 and B^T's BN x 32 slabs are staged in shared
            memory as 32-bit words holding two K-consecutive 16-bit elements (the pairs
            the fragments are made of), rows padded to 20 words so that a fragment read
            (8 rows x 4 words) touches 32 different banks
    per 16-deep half-step: each lane reads its A fragments of both row tiles (4 words each)
            and, per column tile, its B fragment (2 words), and issues 8 mma

Operands arrive as A (.., M, K) and B^T (.., N, K) (B transposed: a view), both int16
arrays of their bit patterns (fp16 and bf16 alike, torch's `.view(torch.int16)`): a pair is
packed with integer operations, and the builder's BF16 flag picks the instruction's type.
Where an operand's K axis is contiguous and even (and its rows 4-byte aligned), the launcher
passes it as int32 words instead, (.., M or N, K / 2), one pair a load with nothing to pack
(A_PAIRS, B_PAIRS): the usual layout of an im2col matrix and a weight. Elements outside the
matrices are staged as zeros, so any M, N, K work. Staging: a K-contiguous operand as runs
of consecutive words of one row a thread; the other orientation with consecutive threads on
consecutive rows (a_k_fast, b_n_fast, as in gemm.py). The output, addend and bias keep their
own dtypes (dtype codes, kernels/numba/_dtypes.py).

Kernel arguments: a, b (B^T), c_in, c_out, bias, accumulate, bias_mode, softcap, a_k_fast,
b_n_fast,
code_c_in, code_c_out, code_bias (gemm.py's, less the operands' codes). Launch with
gemm_mma_kernel(wm, wn, bf16, a_pairs, b_pairs) on a (32 WM WN,)-thread block; the grid as
gemm.py's (x over column tiles of BN, y over row tiles of BM, z over batches; grid-stride
loops on each).
"""
import numpy as np
from numba import cuda, float32, int64, uint32

from ._builder import builder
from ._device import device, mma_into
from .gemm import batch_of, store_result

ZERO = np.float32(0.0)
BK = 32                 # K depth of a staged step
PAIRS = BK // 2         # 32-bit words a staged row holds
ROW_WORDS = PAIRS + 4   # padded row length of the shared slabs (conflict-free fragment reads)


def gemm_mma_kernel(wm: int, wn: int, bf16: bool, a_pairs: bool = False,
                    b_pairs: bool = False):
    """The tensor-core GEMM for a block of wm x wn warps (a 32 wm x 32 wn output tile) on
    fp16 (bf16=False) or bf16 operands, compiled on first use. a_pairs / b_pairs: the operand
    comes as int32 words of K-consecutive pairs, A as (B1, B2, M, K / 2), B^T as
    (B1, B2, N, K / 2) (see the module docstring)."""
    if wm not in (1, 2, 4) or wn not in (1, 2, 4):
        raise ValueError(f"gemm_mma: warps along M and N are 1, 2 or 4, got {wm} x {wn}")
    return _build(int(wm), int(wn), bool(bf16), bool(a_pairs), bool(b_pairs))


@builder
def _build(WM, WN, BF16, A_PAIRS, B_PAIRS):
    BM = 32 * WM
    BN = 32 * WN
    THREADS = 32 * WM * WN
    STAGED_A = BM * PAIRS // THREADS
    STAGED_B = BN * PAIRS // THREADS
    acc_into = mma_into(BF16)

    @cuda.jit
    def gemm_mma(a, b, c_in, c_out, bias, accumulate, bias_mode, softcap, a_k_fast, b_n_fast,
                 code_c_in, code_c_out, code_bias):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((BM, ROW_WORDS), uint32)   # sa[i, p] = A[row0 + i, k0 + 2p:+2]
        sb = cuda.shared.array((BN, ROW_WORDS), uint32)   # sb[j, p] = B[k0 + 2p:+2, col0 + j]
        acc = cuda.local.array(32, float32)     # (row tile r, column tile c, element e)
        tid = cuda.threadIdx.x
        lane = tid % 32
        warp = tid // 32
        g = lane // 4
        t = lane % 4
        wrow = (warp % WM) * 32
        wcol = (warp // WM) * 32
        M = c_out.shape[2]
        N = c_out.shape[3]
        K = 2 * a.shape[3] if A_PAIRS else a.shape[3]
        B1 = c_out.shape[0]
        B2c = c_out.shape[1]
        B2 = a.shape[1] if a.shape[1] != 1 else b.shape[1]
        n_red = B2 if (B2c == 1 and B2 != 1) else 1
        tiles_m = (M + BM - 1) // BM
        tiles_n = (N + BN - 1) // BN
        # what this thread stages of each slab: STAGED_A words of A from (ai, ap) on, a
        # step (di, dp) apart (likewise for B^T). Along K where K is the contiguous axis: a
        # run of consecutive words of one row (WN threads a row; one base address a thread);
        # across rows where it is not, consecutive threads on consecutive rows.
        if a_k_fast:
            ai, ap, di, dp = tid // WN, (tid % WN) * STAGED_A, 0, 1
        else:
            ai, ap, di, dp = tid % BM, tid // BM, 0, THREADS // BM
        if b_n_fast:
            bj, bp, dj, dq = tid % BN, tid // BN, 0, THREADS // BN
        else:
            bj, bp, dj, dq = tid // WM, (tid % WM) * STAGED_B, 0, 1
        for z in range(cuda.blockIdx.z, B1 * B2c, cuda.gridDim.z):
            b1, b2c, a1, w1 = batch_of(z, B2c, a, b)
            for tm in range(cuda.blockIdx.y, tiles_m, cuda.gridDim.y):
                row0 = int64(tm) * BM
                for tn in range(cuda.blockIdx.x, tiles_n, cuda.gridDim.x):
                    col0 = int64(tn) * BN
                    for e in range(32):
                        acc[e] = ZERO
                    for r in range(n_red):
                        b2 = r if n_red != 1 else b2c
                        a2 = b2 if a.shape[1] != 1 else 0
                        w2 = b2 if b.shape[1] != 1 else 0
                        for k0 in range(0, K, BK):
                            for s in range(STAGED_A):
                                i = ai + s * di
                                p = ap + s * dp
                                m = row0 + i
                                if A_PAIRS:
                                    sa[i, p] = _word(a, a1, a2, m, k0 // 2 + p, M)
                                else:
                                    sa[i, p] = _pair(a, a1, a2, m, k0 + 2 * p, 0, 1, M, K)
                            for s in range(STAGED_B):
                                j = bj + s * dj
                                p = bp + s * dq
                                n = col0 + j
                                if B_PAIRS:
                                    sb[j, p] = _word(b, w1, w2, n, k0 // 2 + p, N)
                                else:
                                    sb[j, p] = _pair(b, w1, w2, n, k0 + 2 * p, 0, 1, N, K)
                            cuda.syncthreads()
                            for h in range(0, PAIRS, 8):            # 16 deep: 8 words
                                x0 = sa[wrow + g, h + t]
                                x1 = sa[wrow + g + 8, h + t]
                                x2 = sa[wrow + g, h + t + 4]
                                x3 = sa[wrow + g + 8, h + t + 4]
                                y0 = sa[wrow + 16 + g, h + t]
                                y1 = sa[wrow + 16 + g + 8, h + t]
                                y2 = sa[wrow + 16 + g, h + t + 4]
                                y3 = sa[wrow + 16 + g + 8, h + t + 4]
                                for c in range(4):
                                    n_ = wcol + 8 * c + g
                                    v0 = sb[n_, h + t]
                                    v1 = sb[n_, h + t + 4]
                                    # two explicit products (row tiles 0 and 1): their
                                    # fragments stay in named registers
                                    acc_into(acc, 4 * c, x0, x1, x2, x3, v0, v1)
                                    acc_into(acc, 16 + 4 * c, y0, y1, y2, y3, v0, v1)
                            cuda.syncthreads()
                    # accumulator 16 rt + 4 c + 2 hr + hc: row 16 rt + g + 8 hr, column
                    # 8 c + 2 t + hc of the warp's block (constant trip counts: the loops
                    # unroll and acc stays in registers)
                    for rt in range(2):
                        for hr in range(2):
                            m = row0 + wrow + 16 * rt + 8 * hr + g
                            for c in range(4):
                                for hc in range(2):
                                    n = col0 + wcol + 8 * c + 2 * t + hc
                                    if m < M and n < N:
                                        store_result(acc[16 * rt + 4 * c + 2 * hr + hc],
                                                     c_in, c_out, bias, b1, b2c, m, n,
                                                     accumulate, bias_mode, softcap,
                                                     code_c_in, code_c_out, code_bias)

    return gemm_mma


@device
def _word(x, o, c, line, p, lines):
    """The word x[o, c, line, p] of an operand held as int32 words of pairs (its K even), zero
    past `lines` x K / 2."""
    if line < lines and p < x.shape[3]:
        return uint32(int64(x[o, c, line, p]) & 0xFFFFFFFF)
    return uint32(0)


@device
def _pair(x, o, c, m, k, dm, dk, M, K):
    """The 32-bit word of x[o, c, m, k] and x[o, c, m + dm, k + dk] (int16 bits of a 16-bit
    operand, the first in the low half), each zero outside M x K: a pair along a row
    (dm, dk = 0, 1: of A or B^T here, N for M) or down a column (1, 0)."""
    lo = int64(0)
    hi = int64(0)
    if m < M and k < K:
        lo = int64(x[o, c, m, k]) & 0xFFFF
    if m + dm < M and k + dk < K:
        hi = int64(x[o, c, m + dm, k + dk]) & 0xFFFF
    return uint32(lo | (hi << 16))
