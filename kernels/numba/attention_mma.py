"""The Numba flash attention on tensor cores, for fp16 and bf16 inputs: the forward and the
backward's dK/dV and dQ kernels.

The semantics, arguments and outputs of kernels/numba/attention.py's kernels (read its
docstring first: masks, causal, grouped-query heads, dropout with the same counter-based hash,
lse = +inf and output 0 for a row with no visible key, NaN propagated), so each can stand in
for its CUDA-core twin (the backward's delta kernel is shared). What differs is the product:
every GEMM of a tile runs as PTX mma.sync m16n8k16 (kernels/numba/_device.py `mma_into`), with
FlashAttention-2's register-resident structure. The forward:

    block = WARPS warps; warp w owns the 16 query rows 16 w .. 16 w + 15 of the block's
            BM = 16 WARPS; a lane holds rows g and g + 8 (g = lane // 4) of every 16 x 8
            accumulator tile, columns 2 t, 2 t + 1 (t = lane % 4)
    per item (a (batch, head) plane's BM query rows): Q staged once in shared memory as
            32-bit words of two head-dim-consecutive 16-bit elements (the fragments' pairs),
            rows padded to a word count of 4 mod 32, so that a fragment read (8 rows x 4
            words) touches 32 different banks
    per key tile (BN keys; K as Q, V transposed with its pairs along the keys):
            S = Q K^T: BD / 16 x BN / 8 mma a warp into BN / 2 fp32 scores a lane;
            scale, masks and the running max per row (over the lane's scores, then its
            quad: `quad_max`); P = exp(S - m), rescaling the output by exp(m_old - m_new);
            P's accumulators are exactly the A fragments of P V (the C layout of two
            adjacent n-tiles is the A layout of one 16-deep step), rounded to the inputs'
            16-bit type as FlashAttention and the Triton kernel round P;
            O += P V: BN / 16 x BDV / 8 mma a warp
    end of item: the row sums, kept per lane, summed over the quad (`quad_sum`); O / l
            stored; lse = m + log l by the quad's first lane.

The row sum uses the unrounded, undropped probabilities (the normaliser); the product uses the
rounded, dropped and 1 / (1 - p) scaled ones. Two barriers per key tile (before its staging:
the previous tile's reads are done; after it), one per item before Q is staged. Elements
outside L, S, E and EV are staged as zeros and their scores hidden.

Kernel arguments: q, k, v as int16 arrays of their bit patterns (fp16 and bf16 alike; or, with
Q_WORDS / K_WORDS, q and k as int32 words of pairs, (B, H, L, E / 2): an even, contiguous head
dim; with V_WORDS v likewise, its two keys' words of a column pair recombined into two words
of V^T with integer operations), then attention.py's forward arguments from o on (o in its own
dtype, bf16 as int16 bits). Built per (WARPS, BN, BD, BDV, BF16, Q_WORDS, K_WORDS, V_WORDS),
head dims up to 128 (BD, BDV: the head dims padded to multiples of 16; BN a multiple of 16).
Launch on 32 WARPS threads a block, grid-stride over cdiv(L, 16 WARPS) * B * H items.

The backward (`_build_dkdv`, `_build_dq`, after attention.py's split): a warp owns 16 keys
(dK/dV: S^T = K Q^T, dP^T = V dO^T, then dV += P^T dO, dK += dS^T Q) or 16 queries (dQ:
S = Q K^T, dP = dO V^T, then dQ += dS K); the probabilities and dS go from the accumulators
into A fragments as in the forward, rounded to the inputs' type as FlashAttention rounds
them; the B operands whose K axis is the streamed rows (dO and Q in dK/dV, K in dQ) are
gathered from the same staged rows as pairs of halves of two words (`_down`), so each
operand is staged once. They take q, k, v and dO as words (even, contiguous head dims).

Registers: the scores and the output rows are local arrays indexed only by constants once the
loops over them unroll (each element of a 16 x 8 tile written out, the loops short), so NVVM
keeps them in registers; a loop that indexed them by a runtime value (the epilogue's did)
put them in a local-memory frame, stored to after every mma. The forward keeps them in
registers at every head dim; in the backward some loop over its scores and dP does not
unroll at 64 rows, so they take a 256-byte local frame, and at d128 the dK/dV kernel spills
(bench/TUNING.md v11, with what was tried).
"""
import math

import numpy as np
from numba import cuda, float32, int64, uint32

from ._builder import builder
from ._device import device, mma_into, nanmax, quad_max, quad_sum
from ._dtypes import BF16 as BF16_CODE
from ._dtypes import f32_to_bf16_bits
from .attention import (
    NEG_INF,
    ONE,
    POS_INF,
    ZERO,
    _dims,
    _dropout_base,
    _dropout_keep,
    _hidden,
    _plus_mask,
    _query_tile,
    grads_of,
)
from .gemm_mma import _pair, _word

MAX_HEAD_DIM = 128


def tile(E: int, EV: int) -> tuple[int, int, int]:
    """(BN, BD, BDV) for head dims E and EV (at most MAX_HEAD_DIM): the head dims padded to
    multiples of 16; 64 keys a tile where both are 16, 32 or 64 wide, else 32, so that the
    scores and the output rows (BN / 2 + BDV / 2 fp32 registers a lane) fit in registers
    without spilling (sm_90: 64 keys at padded widths 48 spilled 8-36 bytes) and shared memory
    stays within 36 KiB at 4 warps."""
    BD = max(16, -(-E // 16) * 16)
    BDV = max(16, -(-EV // 16) * 16)
    if max(BD, BDV) > MAX_HEAD_DIM:
        raise ValueError(f"the tensor-core attention takes head dims up to {MAX_HEAD_DIM}, "
                         f"got {E} and {EV}")
    return (64 if BD in (16, 32, 64) and BDV in (16, 32, 64) else 32), BD, BDV


def fwd_mma_kernel(warps: int, bn: int, bd: int, bdv: int, bf16: bool, q_words: bool,
                   k_words: bool, v_words: bool):
    """The kernel for `warps` warps and `tile`'s sizes (see the module docstring), compiled
    on first use."""
    _check_tile(bn, bd, bdv)
    return _build(int(warps), int(bn), int(bd), int(bdv), bool(bf16), bool(q_words),
                  bool(k_words), bool(v_words))


@builder
def _build(WARPS, BN, BD, BDV, BF16, Q_WORDS, K_WORDS, V_WORDS):
    BM = 16 * WARPS
    NT = 32 * WARPS
    QP = BD // 2            # words of a staged Q or K row
    VP = BN // 2            # words of a staged V^T row (pairs of keys)
    QW = QP + 4             # padded to 4 mod 32 words: conflict-free fragment reads
    VW = VP + 4
    SN = BN // 2            # scores a lane holds: BN / 8 tiles of 16 x 8, 4 each
    ON = BDV // 2           # output elements a lane holds
    acc_into, rows_times_rows, probs_times_rows = _products(BF16)

    @cuda.jit
    def attention_fwd_mma(q, k, v, o, lse, mask, mask_kind, mask_code, is_causal, scale,
                          dropout, threshold, drop_scale, seed, code):
        # One shared array per line: the simulator keys shared arrays by source line.
        sq = cuda.shared.array((BM, QW), uint32)     # sq[i, p] = Q[q0 + i, 2p:2p+2]
        sk = cuda.shared.array((BN, QW), uint32)     # sk[j, p] = K[k0 + j, 2p:2p+2]
        svt = cuda.shared.array((BDV, VW), uint32)   # svt[d, p] = V[k0 + 2p:2p+2, d]
        s = cuda.local.array(SN, float32)        # scores, then P: (tile n, element e)
        acc = cuda.local.array(ON, float32)      # the output rows' columns
        tid, r0, g, t = _lane()
        B, H, HKV, L, S, E, EV = _dims(q, k, v)
        if Q_WORDS:
            E = 2 * E
        if V_WORDS:
            EV = 2 * EV
        group = H // HKV
        sc = float32(scale)
        dscale = float32(drop_scale)
        nq = (L + BM - 1) // BM
        for w in range(cuda.blockIdx.x, nq * B * H, cuda.gridDim.x):
            bh, q0, b, h, hk, nrows = _query_tile(w, nq, BM, H, group, L)
            cuda.syncthreads()                       # the last item's reads of sq are done
            _stage(sq, q, b, h, q0, L, E, BM, QP, Q_WORDS, tid, NT)
            for e in range(ON):
                acc[e] = ZERO
            m0 = NEG_INF                 # running maxima of rows g and g + 8
            m1 = NEG_INF
            l0 = ZERO                    # this lane's share of their sums
            l1 = ZERO
            row0 = q0 + r0 + g
            row1 = row0 + 8
            base = _dropout_base(seed, bh) if dropout else int64(0)
            end = min(S, q0 + nrows) if is_causal else S
            for k0 in range(0, end, BN):
                cuda.syncthreads()                   # the last tile's reads are done
                _stage(sk, k, b, hk, k0, S, E, BN, QP, K_WORDS, tid, NT)
                if V_WORDS:     # two keys' words of a column pair make two words of V^T
                    for e in range(tid, BDV // 2 * VP, NT):
                        p = e // (BDV // 2)
                        c = e - p * (BDV // 2)
                        w0 = _word(v, b, hk, k0 + 2 * p, c, S)
                        w1 = _word(v, b, hk, k0 + 2 * p + 1, c, S)
                        svt[2 * c, p] = uint32((w0 & 0xFFFF) | ((w1 & 0xFFFF) << 16))
                        svt[2 * c + 1, p] = uint32((w0 >> 16) | (w1 & 0xFFFF0000))
                else:
                    for e in range(tid, BDV * VP, NT):  # consecutive threads on consecutive d
                        p = e // BDV
                        d = e - p * BDV
                        svt[d, p] = _pair(v, b, hk, k0 + 2 * p, d, 1, 0, S, EV)
                cuda.syncthreads()
                # S = Q K^T
                for e in range(SN):
                    s[e] = ZERO
                rows_times_rows(s, SN // 4, sq, r0, sk, QP, g, t)
                # the scores with their masks, and the rows' maxima over the tile
                t0 = NEG_INF
                t1 = NEG_INF
                for n in range(SN // 4):                 # elements (row, col), (row, col+1)
                    x = 4 * n                            # of rows g, then g + 8
                    col = k0 + 8 * n + 2 * t
                    s[x] = _masked(s[x] * sc, mask, b, h, row0, col, L, S, mask_kind,
                                   mask_code, is_causal)
                    s[x + 1] = _masked(s[x + 1] * sc, mask, b, h, row0, col + 1, L, S,
                                       mask_kind, mask_code, is_causal)
                    s[x + 2] = _masked(s[x + 2] * sc, mask, b, h, row1, col, L, S, mask_kind,
                                       mask_code, is_causal)
                    s[x + 3] = _masked(s[x + 3] * sc, mask, b, h, row1, col + 1, L, S,
                                       mask_kind, mask_code, is_causal)
                    t0 = nanmax(t0, nanmax(s[x], s[x + 1]))
                    t1 = nanmax(t1, nanmax(s[x + 2], s[x + 3]))
                n0 = nanmax(m0, quad_max(t0))
                n1 = nanmax(m1, quad_max(t1))
                # the exponents' base: 0 while nothing is visible (every p is then 0)
                u0 = ZERO if n0 == NEG_INF else n0
                u1 = ZERO if n1 == NEG_INF else n1
                al0 = math.exp(m0 - u0)              # 0 while m is -inf
                al1 = math.exp(m1 - u1)
                l0 *= al0
                l1 *= al1
                for x in range(ON):
                    acc[x] *= al0 if x % 4 < 2 else al1
                for n in range(SN // 4):
                    x = 4 * n
                    col = k0 + 8 * n + 2 * t
                    p0 = math.exp(s[x] - u0)
                    p1 = math.exp(s[x + 1] - u0)
                    p2 = math.exp(s[x + 2] - u1)
                    p3 = math.exp(s[x + 3] - u1)
                    l0 += p0 + p1
                    l1 += p2 + p3
                    if dropout:
                        p0 = _dropped(p0, base, row0 * S + col, threshold, dscale)
                        p1 = _dropped(p1, base, row0 * S + col + 1, threshold, dscale)
                        p2 = _dropped(p2, base, row1 * S + col, threshold, dscale)
                        p3 = _dropped(p3, base, row1 * S + col + 1, threshold, dscale)
                    s[x] = p0
                    s[x + 1] = p1
                    s[x + 2] = p2
                    s[x + 3] = p3
                m0 = n0
                m1 = n1
                # O += P V: score tiles 2j and 2j + 1 are the A fragments of keys 16j..+15
                for j in range(BN // 16):
                    a0, a1, a2, a3 = _a_fragments(s, j, BF16)
                    for n in range(ON // 4):
                        y = 4 * n
                        acc_into(acc, y, a0, a1, a2, a3,
                                 svt[8 * n + g, 8 * j + t], svt[8 * n + g, 8 * j + t + 4])
            l0 = quad_sum(l0)
            l1 = quad_sum(l1)
            # 1 / l (0 for a row with no visible key; NaN stays NaN)
            i0 = ZERO if l0 == ZERO else ONE / l0
            i1 = ZERO if l1 == ZERO else ONE / l1
            _store_rows(o, b, h, row0, acc, ON // 4, t, i0, i1, L, EV, BF16)
            if t == 0:
                if row0 < L:
                    lse[bh, row0] = POS_INF if l0 == ZERO else m0 + math.log(l0)
                if row1 < L:
                    lse[bh, row1] = POS_INF if l1 == ZERO else m1 + math.log(l1)

    return attention_fwd_mma


# --- backward ---------------------------------------------------------------------------------

def bwd_tile(E: int, EV: int) -> tuple[int, int, int, int]:
    """(WARPS, BN, BD, BDV) of the backward kernels on a GPU for head dims E and EV (at most
    MAX_HEAD_DIM, both even): the rows a block owns (16 a warp) and the rows it streams (BN:
    the forward's key tile, `tile`), 4 warps at padded widths up to 64, else 2, so that the
    owned and streamed slabs of two operands each (about 35 KiB at d128) stay under the
    48 KiB static limit."""
    BN, BD, BDV = tile(E, EV)
    return (4 if max(BD, BDV) <= 64 else 2), BN, BD, BDV


def dq_mma_kernel(warps: int, bn: int, bd: int, bdv: int, bf16: bool):
    """dQ on tensor cores (see `_build_dq`), compiled on first use."""
    _check_tile(bn, bd, bdv)
    return _build_dq(int(warps), int(bn), int(bd), int(bdv), bool(bf16))


def dkdv_mma_kernel(warps: int, bm: int, bd: int, bdv: int, bf16: bool):
    """dK and dV on tensor cores (see `_build_dkdv`), compiled on first use."""
    _check_tile(bm, bd, bdv)
    return _build_dkdv(int(warps), int(bm), int(bd), int(bdv), bool(bf16))


def _check_tile(bn: int, bd: int, bdv: int) -> None:
    if bn % 16 or bd % 16 or bdv % 16 or max(bd, bdv) > MAX_HEAD_DIM:
        raise ValueError(f"attention_mma: BN, BD, BDV must be multiples of 16 (head dims up "
                         f"to {MAX_HEAD_DIM}), got {bn}, {bd}, {bdv}")


@builder
def _build_dq(WARPS, BN, BD, BDV, BF16):
    """attention.py's dq_kernel on tensor cores: a warp owns 16 query rows; per key tile
    S = Q K^T and dP = dO V^T (mma), dS = P (dP - delta) per element (with the mask's
    gradient written where asked), dQ += dS K (mma: dS's accumulators as A fragments, K's
    pairs along the keys gathered from its staged rows, `_down`). Arguments: q, k, v, do as
    int32 words of pairs (even head dims), then attention.py dq_kernel's from lse on."""
    BM = 16 * WARPS
    NT = 32 * WARPS
    QP = BD // 2
    DP = BDV // 2
    QW = QP + 4
    DW = DP + 4
    SN = BN // 2            # scores (and dP) a lane holds
    QN = BD // 2            # dQ elements a lane holds
    acc_into, rows_times_rows, probs_times_rows = _products(BF16)

    @cuda.jit
    def attention_bwd_dq_mma(q, k, v, do, lse, delta, dq, dmask, mask_grad, mask, mask_kind,
                             mask_code, is_causal, scale, dropout, threshold, drop_scale, seed,
                             code):
        sq = cuda.shared.array((BM, QW), uint32)     # the block's query rows
        sdo = cuda.shared.array((BM, DW), uint32)    # and their output gradients
        sk = cuda.shared.array((BN, QW), uint32)     # the streamed keys
        sv = cuda.shared.array((BN, DW), uint32)     # and values
        s = cuda.local.array(SN, float32)            # scores, then dS
        dp = cuda.local.array(SN, float32)
        acc = cuda.local.array(QN, float32)
        tid, r0, g, t = _lane()
        B, H, HKV, L, S, E, EV, group = _word_dims(q, k, v)
        sc = float32(scale)
        dscale = float32(drop_scale)
        nq = (L + BM - 1) // BM
        for w in range(cuda.blockIdx.x, nq * B * H, cuda.gridDim.x):
            bh, q0, b, h, hk, nrows = _query_tile(w, nq, BM, H, group, L)
            cuda.syncthreads()
            _stage(sq, q, b, h, q0, L, E, BM, QP, True, tid, NT)
            _stage(sdo, do, b, h, q0, L, EV, BM, DP, True, tid, NT)
            for x in range(QN):
                acc[x] = ZERO
            row0 = q0 + r0 + g
            row1 = row0 + 8
            lse0 = lse[bh, row0] if row0 < L else POS_INF
            lse1 = lse[bh, row1] if row1 < L else POS_INF
            dl0 = delta[bh, row0] if row0 < L else ZERO
            dl1 = delta[bh, row1] if row1 < L else ZERO
            base = _dropout_base(seed, bh) if dropout else int64(0)
            end = min(S, q0 + nrows) if is_causal else S
            for k0 in range(0, end, BN):
                cuda.syncthreads()
                _stage(sk, k, b, hk, k0, S, E, BN, QP, True, tid, NT)
                _stage(sv, v, b, hk, k0, S, EV, BN, DP, True, tid, NT)
                cuda.syncthreads()
                for x in range(SN):
                    s[x] = ZERO
                    dp[x] = ZERO
                rows_times_rows(s, SN // 4, sq, r0, sk, QP, g, t)        # S = Q K^T
                rows_times_rows(dp, SN // 4, sdo, r0, sv, DP, g, t)      # dP = dO V^T
                for n in range(SN // 4):                 # dS, element by element
                    x = 4 * n                            # (written out: constant indices)
                    col = k0 + 8 * n + 2 * t
                    s[x] = _grad_element(s[x] * sc, dp[x], lse0, dl0, mask, b, h, row0, col,
                                         L, S, mask_kind, mask_code, is_causal, dropout, base,
                                         threshold, dscale)[1]
                    s[x + 1] = _grad_element(s[x + 1] * sc, dp[x + 1], lse0, dl0, mask, b, h,
                                             row0, col + 1, L, S, mask_kind, mask_code,
                                             is_causal, dropout, base, threshold, dscale)[1]
                    s[x + 2] = _grad_element(s[x + 2] * sc, dp[x + 2], lse1, dl1, mask, b, h,
                                             row1, col, L, S, mask_kind, mask_code, is_causal,
                                             dropout, base, threshold, dscale)[1]
                    s[x + 3] = _grad_element(s[x + 3] * sc, dp[x + 3], lse1, dl1, mask, b, h,
                                             row1, col + 1, L, S, mask_kind, mask_code,
                                             is_causal, dropout, base, threshold, dscale)[1]
                    if mask_grad:
                        _store_mask_pair(dmask, b, h, row0, col, s[x], s[x + 1], L, S,
                                         mask_code)
                        _store_mask_pair(dmask, b, h, row1, col, s[x + 2], s[x + 3], L, S,
                                         mask_code)
                # dQ += dS K, a call per 16-deep step with j a literal (a loop over j,
                # left rolled, spilled 216 bytes at d128; the dK/dV kernel spills more
                # written this way, so it keeps its loop)
                probs_times_rows(acc, QN // 4, s, 0, sk, g, t)
                probs_times_rows(acc, QN // 4, s, 1, sk, g, t)
                if BN == 64:
                    probs_times_rows(acc, QN // 4, s, 2, sk, g, t)
                    probs_times_rows(acc, QN // 4, s, 3, sk, g, t)
            _store_rows(dq, b, h, row0, acc, QN // 4, t, sc, sc, L, E, BF16)

    return attention_bwd_dq_mma


@builder
def _build_dkdv(WARPS, BM, BD, BDV, BF16):
    """attention.py's dkdv_kernel on tensor cores: a warp owns 16 keys of one K/V head and
    streams query tiles of BM rows of every query head of its group; per tile S^T = K Q^T and
    dP^T = V dO^T (mma), P^T and dS^T per element, dV += P^T dO and dK += dS^T Q (mma: the
    accumulators as A fragments, dO's and Q's pairs along the queries gathered from their
    staged rows, `_down`). Arguments: q, k, v, do as int32 words of pairs (even head dims),
    then attention.py dkdv_kernel's from lse on."""
    BK = 16 * WARPS
    NT = 32 * WARPS
    QP = BD // 2
    DP = BDV // 2
    QW = QP + 4
    DW = DP + 4
    SN = BM // 2            # scores (and dP) a lane holds: 16 keys x BM queries a warp
    KN = BD // 2            # dK elements a lane holds
    VN = BDV // 2           # dV elements a lane holds
    acc_into, rows_times_rows, probs_times_rows = _products(BF16)

    @cuda.jit
    def attention_bwd_dkdv_mma(q, k, v, do, lse, delta, dk, dv, mask, mask_kind, mask_code,
                               is_causal, scale, dropout, threshold, drop_scale, seed, code):
        sk = cuda.shared.array((BK, QW), uint32)     # the block's keys
        sv = cuda.shared.array((BK, DW), uint32)     # and values
        sq = cuda.shared.array((BM, QW), uint32)     # the streamed queries
        sdo = cuda.shared.array((BM, DW), uint32)    # and their output gradients
        slse = cuda.shared.array(BM, float32)        # and their lse
        sdelta = cuda.shared.array(BM, float32)      # and delta
        st = cuda.local.array(SN, float32)           # S^T, then P^T as dV uses it
        dpt = cuda.local.array(SN, float32)          # dP^T, then dS^T
        acck = cuda.local.array(KN, float32)
        accv = cuda.local.array(VN, float32)
        tid, r0, g, t = _lane()
        B, H, HKV, L, S, E, EV, group = _word_dims(q, k, v)
        sc = float32(scale)
        dscale = float32(drop_scale)
        nk = (S + BK - 1) // BK
        for w in range(cuda.blockIdx.x, nk * B * HKV, cuda.gridDim.x):
            bhk = w // nk
            k0 = (w - bhk * nk) * BK
            b = bhk // HKV
            hk = bhk - b * HKV
            cuda.syncthreads()
            _stage(sk, k, b, hk, k0, S, E, BK, QP, True, tid, NT)
            _stage(sv, v, b, hk, k0, S, EV, BK, DP, True, tid, NT)
            for x in range(KN):
                acck[x] = ZERO
            for x in range(VN):
                accv[x] = ZERO
            key0 = k0 + r0 + g
            key1 = key0 + 8
            qstart = (k0 // BM) * BM if is_causal else 0   # earlier queries see none
            for gg in range(group):
                h = hk * group + gg
                bh = b * H + h
                base = _dropout_base(seed, bh) if dropout else int64(0)
                for q0 in range(qstart, L, BM):
                    cuda.syncthreads()
                    _stage(sq, q, b, h, q0, L, E, BM, QP, True, tid, NT)
                    _stage(sdo, do, b, h, q0, L, EV, BM, DP, True, tid, NT)
                    for r in range(tid, BM, NT):
                        slse[r] = lse[bh, q0 + r] if q0 + r < L else POS_INF
                        sdelta[r] = delta[bh, q0 + r] if q0 + r < L else ZERO
                    cuda.syncthreads()
                    for x in range(SN):
                        st[x] = ZERO
                        dpt[x] = ZERO
                    rows_times_rows(st, SN // 4, sk, r0, sq, QP, g, t)   # S^T = K Q^T
                    rows_times_rows(dpt, SN // 4, sv, r0, sdo, DP, g, t)  # dP^T = V dO^T
                    for n in range(SN // 4):             # P^T, dS^T element by element
                        x = 4 * n                        # (written out: constant indices)
                        c = 8 * n + 2 * t                # the tile's query column
                        st[x], dpt[x] = _grad_element(
                            st[x] * sc, dpt[x], slse[c], sdelta[c], mask, b, h, q0 + c, key0,
                            L, S, mask_kind, mask_code, is_causal, dropout, base, threshold,
                            dscale)
                        st[x + 1], dpt[x + 1] = _grad_element(
                            st[x + 1] * sc, dpt[x + 1], slse[c + 1], sdelta[c + 1], mask, b, h,
                            q0 + c + 1, key0, L, S, mask_kind, mask_code, is_causal, dropout,
                            base, threshold, dscale)
                        st[x + 2], dpt[x + 2] = _grad_element(
                            st[x + 2] * sc, dpt[x + 2], slse[c], sdelta[c], mask, b, h, q0 + c,
                            key1, L, S, mask_kind, mask_code, is_causal, dropout, base,
                            threshold, dscale)
                        st[x + 3], dpt[x + 3] = _grad_element(
                            st[x + 3] * sc, dpt[x + 3], slse[c + 1], sdelta[c + 1], mask, b, h,
                            q0 + c + 1, key1, L, S, mask_kind, mask_code, is_causal, dropout,
                            base, threshold, dscale)
                    for j in range(BM // 16):            # dV += P^T dO, dK += dS^T Q
                        probs_times_rows(accv, VN // 4, st, j, sdo, g, t)
                        probs_times_rows(acck, KN // 4, dpt, j, sq, g, t)
            _store_rows(dk, b, hk, key0, acck, KN // 4, t, sc, sc, S, E, BF16)
            _store_rows(dv, b, hk, key0, accv, VN // 4, t, ONE, ONE, S, EV, BF16)

    return attention_bwd_dkdv_mma


@device
def _store_mask_pair(dmask, b, h, row, col, lo, hi, L, S, mask_code):
    """dmask[b, h, row, col:col + 2] = (lo, hi) (dS: the float mask's gradient) in the mask's
    dtype, within L x S."""
    if row < L:
        if col < S:
            if mask_code == BF16_CODE:
                dmask[b, h, row, col] = f32_to_bf16_bits(lo)
            else:
                dmask[b, h, row, col] = lo
        if col + 1 < S:
            if mask_code == BF16_CODE:
                dmask[b, h, row, col + 1] = f32_to_bf16_bits(hi)
            else:
                dmask[b, h, row, col + 1] = hi


@device
def _grad_element(s, dp, lse, delta, mask, b, h, row, col, L, S, mask_kind, mask_code,
                  is_causal, dropout, base, threshold, dscale):
    """(P as dV uses it, dS) of score (row, col) of plane (b, h) (s: q . k scaled; dp: dO . v),
    as attention.py's _grad_pair: p = exp(s - lse), then `grads_of`; (0, 0) where the score is
    hidden or p is 0."""
    v = _masked(s, mask, b, h, row, col, L, S, mask_kind, mask_code, is_causal)
    if v == NEG_INF:
        return ZERO, ZERO
    p = math.exp(v - lse)
    if p == ZERO:
        return ZERO, ZERO
    return grads_of(p, dp, delta, dropout, base, row * S + col, threshold, dscale)


def _products(bf16: bool):
    """(acc_into, rows_times_rows, probs_times_rows): the warp's tile products of these
    kernels (kernels/numba/_device.py mma_into), device functions made per input type.

    rows_times_rows(acc, n_tiles, sa, ra, sb, words, g, t): acc[4n:4n + 4] += tile n of
        A B^T for n < n_tiles, A the 16 rows ra.. of sa, B^T the rows 8n.. of sb, both staged
        by `_stage` (pairs along the contraction, `words` of them deep);
    probs_times_rows(acc, n_tiles, p, j, sb, g, t): acc[4n:4n + 4] += tile n of P B over the
        16-deep step j, P a lane's fp32 accumulators (p[8j:8j + 8]: the C layout of two
        adjacent 16 x 8 tiles is the A layout of one 16-deep step), rounded to the inputs'
        type; B's rows 16j.. staged by `_stage` along its columns, gathered down (`_down`)."""
    acc_into = mma_into(bf16)

    @device
    def rows_times_rows(acc, n_tiles, sa, ra, sb, words, g, t):
        for kk in range(0, words, 8):               # 16 deep: 8 words
            a0 = sa[ra + g, kk + t]
            a1 = sa[ra + g + 8, kk + t]
            a2 = sa[ra + g, kk + t + 4]
            a3 = sa[ra + g + 8, kk + t + 4]
            for n in range(n_tiles):
                acc_into(acc, 4 * n, a0, a1, a2, a3, sb[8 * n + g, kk + t],
                         sb[8 * n + g, kk + t + 4])

    @device
    def probs_times_rows(acc, n_tiles, p, j, sb, g, t):
        a0, a1, a2, a3 = _a_fragments(p, j, bf16)
        for n in range(n_tiles):
            acc_into(acc, 4 * n, a0, a1, a2, a3, _down(sb, 16 * j + 2 * t, 8 * n + g),
                     _down(sb, 16 * j + 8 + 2 * t, 8 * n + g))

    return acc_into, rows_times_rows, probs_times_rows


@device
def _stage(sx, x, b, h, r0, rows, cols, nrows, words, is_words, tid, nt):
    """sx[i, p] = the pair X[r0 + i, 2p:2p+2] of x[b, h] for i < nrows, p < words (zeros past
    rows x cols): the block's nt threads (this one is tid) stage a slab of rows as 32-bit
    pairs, consecutive threads on consecutive words of a row. x: int32 words of pairs where
    is_words (cols even), else int16 elements."""
    for e in range(tid, nrows * words, nt):
        i = e // words
        p = e - i * words
        if is_words:
            sx[i, p] = _word(x, b, h, r0 + i, p, rows)
        else:
            sx[i, p] = _pair(x, b, h, r0 + i, 2 * p, 0, 1, rows, cols)


@device
def _down(sx, r, c):
    """The fragment register (X[r, c], X[r + 1, c]) of a matrix staged by `_stage` (pairs
    along its columns): two halves of two words, for an operand whose K axis is X's rows."""
    sh = 16 * (c & 1)
    p = c >> 1
    return uint32(((sx[r, p] >> sh) & 0xFFFF) | (((sx[r + 1, p] >> sh) & 0xFFFF) << 16))


@device
def _masked(s, mask, b, h, row, col, L, S, mask_kind, mask_code, is_causal):
    """The score (row, col) of plane (b, h) (s: q . k scaled) with its masks: -inf for a key
    past S, a row past L, or what the causal or boolean mask hides; plus a float mask."""
    if row >= L or col >= S or _hidden(mask, b, h, row, col, mask_kind, is_causal):
        return NEG_INF
    return _plus_mask(s, mask, b, h, row, col, mask_kind, mask_code)


@device
def _dropped(p, base, offset, threshold, dscale):
    """p as the product uses it under dropout: kept and scaled by 1 / (1 - p), or 0."""
    return p * dscale if _dropout_keep(base, offset, threshold) else ZERO


@device
def _word_dims(q, k, v):
    """(B, H, HKV, L, S, E, EV, GROUP) of q, k, v passed as int32 words of pairs."""
    B, H, HKV, L, S, E, EV = _dims(q, k, v)
    return B, H, HKV, L, S, 2 * E, 2 * EV, H // HKV


@device
def _lane():
    """(tid, r0, g, t): this thread's index in the block, the first of its warp's 16 rows,
    and its place in the mma layouts (g = lane // 4, t = lane % 4)."""
    tid = cuda.threadIdx.x
    lane = tid % 32
    return tid, (tid // 32) * 16, lane // 4, lane % 4


@device
def _store_rows(o, b, h, row, acc, n_tiles, t, mul0, mul1, L, D, bf16):
    """A lane's two rows of a 16 x 8n result out of its accumulators: o[b, h, row, c] =
    acc * mul0 and o[b, h, row + 8, c] = acc * mul1 for its columns c = 8n + 2t, 8n + 2t + 1
    of tiles n < n_tiles, within L x D, in o's dtype."""
    for n in range(n_tiles):
        col = 8 * n + 2 * t
        x = 4 * n
        _store_pair(o, b, h, row, col, acc[x] * mul0, acc[x + 1] * mul0, L, D, bf16)
        _store_pair(o, b, h, row + 8, col, acc[x + 2] * mul1, acc[x + 3] * mul1, L, D, bf16)


@device
def _store_pair(o, b, h, row, col, lo, hi, L, EV, bf16):
    """o[b, h, row, col:col + 2] = (lo, hi) in o's dtype, within L x EV."""
    if row < L:
        if col < EV:
            if bf16:
                o[b, h, row, col] = f32_to_bf16_bits(lo)
            else:
                o[b, h, row, col] = lo
        if col + 1 < EV:
            if bf16:
                o[b, h, row, col + 1] = f32_to_bf16_bits(hi)
            else:
                o[b, h, row, col + 1] = hi


@device
def _bits16(value, bf16):
    """The 16-bit pattern of fp32 `value` rounded to bf16 or fp16 (nearest even)."""
    if bf16:
        return int64(f32_to_bf16_bits(value)) & 0xFFFF
    word = cuda.local.array(1, np.float16)
    word[0] = value
    return int64(word.view(np.uint16)[0])


@device
def _a_fragments(p, j, bf16):
    """The A fragments (a0, a1, a2, a3) of the 16-deep step j from a lane's fp32 accumulators
    p of 16 x 8 tiles 2j and 2j + 1 (rows g, g + 8; columns 2t, 2t + 1 of each: exactly A's
    places), rounded to bf16 or fp16."""
    x = 8 * j
    return (_pack(p[x], p[x + 1], bf16), _pack(p[x + 2], p[x + 3], bf16),
            _pack(p[x + 4], p[x + 5], bf16), _pack(p[x + 6], p[x + 7], bf16))


@device
def _pack(lo, hi, bf16):
    """Two fp32 values as one fragment register: 16-bit lo in the low half, hi in the high."""
    return uint32(_bits16(lo, bf16) | (_bits16(hi, bf16) << 16))
