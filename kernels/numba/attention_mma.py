"""The Numba flash-attention forward on tensor cores, for fp16 and bf16 inputs.

The semantics, arguments and outputs of kernels/numba/attention.py's forward (read its
docstring first: masks, causal, grouped-query heads, dropout with the same counter-based hash,
lse = +inf and output 0 for a row with no visible key, NaN propagated), so its CUDA-core
backward kernels run on what this one writes. What differs is the product: both GEMMs of a
tile run as PTX mma.sync m16n8k16 (kernels/numba/_device.py `mma`), FlashAttention-2's
register-resident structure:

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

Registers: the scores and the output rows are local arrays indexed only by constants once the
loops over them unroll (each element of a 16 x 8 tile written out, the loops short), so NVVM
keeps them in registers; a loop that indexed them by a runtime value (the epilogue's did)
put them in a local-memory frame, stored to after every mma.
"""
import math

import numpy as np
from numba import cuda, float32, int64, uint32

from ._builder import builder
from ._device import device, mma, nanmax, quad_max, quad_sum
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
    if bn % 16 or bd % 16 or bdv % 16 or max(bd, bdv) > MAX_HEAD_DIM:
        raise ValueError(f"attention_mma: BN, BD, BDV must be multiples of 16 (head dims up "
                         f"to {MAX_HEAD_DIM}), got {bn}, {bd}, {bdv}")
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
    product = mma(BF16)

    @cuda.jit
    def attention_fwd_mma(q, k, v, o, lse, mask, mask_kind, mask_code, is_causal, scale,
                          dropout, threshold, drop_scale, seed, code):
        # One shared array per line: the simulator keys shared arrays by source line.
        sq = cuda.shared.array((BM, QW), uint32)     # sq[i, p] = Q[q0 + i, 2p:2p+2]
        sk = cuda.shared.array((BN, QW), uint32)     # sk[j, p] = K[k0 + j, 2p:2p+2]
        svt = cuda.shared.array((BDV, VW), uint32)   # svt[d, p] = V[k0 + 2p:2p+2, d]
        s = cuda.local.array(SN, float32)        # scores, then P: (tile n, element e)
        acc = cuda.local.array(ON, float32)      # the output rows' columns
        tid = cuda.threadIdx.x
        lane = tid % 32
        r0 = (tid // 32) * 16
        g = lane // 4
        t = lane % 4
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
            for e in range(tid, BM * QP, NT):
                i = e // QP
                p = e - i * QP
                if Q_WORDS:
                    sq[i, p] = _word(q, b, h, q0 + i, p, L)
                else:
                    sq[i, p] = _pair(q, b, h, q0 + i, 2 * p, L, E)
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
                for e in range(tid, BN * QP, NT):
                    j = e // QP
                    p = e - j * QP
                    if K_WORDS:
                        sk[j, p] = _word(k, b, hk, k0 + j, p, S)
                    else:
                        sk[j, p] = _pair(k, b, hk, k0 + j, 2 * p, S, E)
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
                        svt[d, p] = _key_pair(v, b, hk, k0 + 2 * p, d, S, EV)
                cuda.syncthreads()
                # S = Q K^T
                for e in range(SN):
                    s[e] = ZERO
                for kk in range(0, QP, 8):           # 16 deep: 8 words
                    a0 = sq[r0 + g, kk + t]
                    a1 = sq[r0 + g + 8, kk + t]
                    a2 = sq[r0 + g, kk + t + 4]
                    a3 = sq[r0 + g + 8, kk + t + 4]
                    for n in range(SN // 4):
                        x = 4 * n
                        d = product(a0, a1, a2, a3, sk[8 * n + g, kk + t],
                                    sk[8 * n + g, kk + t + 4], s[x], s[x + 1], s[x + 2],
                                    s[x + 3])
                        s[x] = d[0]
                        s[x + 1] = d[1]
                        s[x + 2] = d[2]
                        s[x + 3] = d[3]
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
                    x = 8 * j
                    a0 = _pack(s[x], s[x + 1], BF16)
                    a1 = _pack(s[x + 2], s[x + 3], BF16)
                    a2 = _pack(s[x + 4], s[x + 5], BF16)
                    a3 = _pack(s[x + 6], s[x + 7], BF16)
                    for n in range(ON // 4):
                        y = 4 * n
                        d = product(a0, a1, a2, a3, svt[8 * n + g, 8 * j + t],
                                    svt[8 * n + g, 8 * j + t + 4], acc[y], acc[y + 1],
                                    acc[y + 2], acc[y + 3])
                        acc[y] = d[0]
                        acc[y + 1] = d[1]
                        acc[y + 2] = d[2]
                        acc[y + 3] = d[3]
            l0 = quad_sum(l0)
            l1 = quad_sum(l1)
            # 1 / l (0 for a row with no visible key; NaN stays NaN)
            i0 = ZERO if l0 == ZERO else ONE / l0
            i1 = ZERO if l1 == ZERO else ONE / l1
            for n in range(ON // 4):
                col = 8 * n + 2 * t
                x = 4 * n
                _store_pair(o, b, h, row0, col, acc[x] * i0, acc[x + 1] * i0, L, EV, BF16)
                _store_pair(o, b, h, row1, col, acc[x + 2] * i1, acc[x + 3] * i1, L, EV, BF16)
            if t == 0:
                if row0 < L:
                    lse[bh, row0] = POS_INF if l0 == ZERO else m0 + math.log(l0)
                if row1 < L:
                    lse[bh, row1] = POS_INF if l1 == ZERO else m1 + math.log(l1)

    return attention_fwd_mma


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
def _key_pair(x, b, h, j, d, S, D):
    """The 32-bit word of x[b, h, j, d] and x[b, h, j + 1, d] (int16 bits, the first in the
    low half), zeros outside S x D: a pair of V^T's row d along the keys."""
    lo = int64(0)
    hi = int64(0)
    if d < D:
        if j < S:
            lo = int64(x[b, h, j, d]) & 0xFFFF
        if j + 1 < S:
            hi = int64(x[b, h, j + 1, d]) & 0xFFFF
    return uint32(lo | (hi << 16))


@device
def _bits16(value, bf16):
    """The 16-bit pattern of fp32 `value` rounded to bf16 or fp16 (nearest even)."""
    if bf16:
        return int64(f32_to_bf16_bits(value)) & 0xFFFF
    word = cuda.local.array(1, np.float16)
    word[0] = value
    return int64(word.view(np.uint16)[0])


@device
def _pack(lo, hi, bf16):
    """Two fp32 values as one fragment register: 16-bit lo in the low half, hi in the high."""
    return uint32(_bits16(lo, bf16) | (_bits16(hi, bf16) << 16))
