"""Numba CUDA kernels for scaled dot-product attention: flash-style forward and backward.

Same semantics as kernels/triton/attention.py (see its docstring), mirrored kernel for kernel:

- scores s = (q . k) * scale, -inf where a key index is out of range, where the boolean mask is
  False (True = attend), or above the diagonal for causal attention (top-left: query i sees keys
  j <= i); a float mask is added. Masks are (B, H, L, S) arrays of any strides (broadcast dims
  have stride 0), indexed with the query head.
- grouped-query attention: query head h reads K/V head h // GROUP, GROUP = H // HKV; dK and dV
  sum over the GROUP query heads of their K/V head inside one block (no atomics).
- a row with every key masked gets output 0 and lse = +inf (so the backward's exp(s - lse) is 0).
- dropout: keep(i, j) of plane bh is decided by a counter-based hash of (seed, bh, i * S + j)
  (`_dropout_base`, `_dropout_keep`: the one definition, used by forward, backward and
  `attention_dropout_mask`); kept probabilities are scaled by 1 / (1 - p); the softmax
  normaliser uses the undropped probabilities. The bits differ from Triton's Philox stream.

Forward (`fwd_kernel`): a block owns BM query rows of one (batch, head) and streams K/V in tiles
of BN keys through shared memory; the L x S scores are never written. Per K/V tile: the tile is
loaded (double-buffered), the block computes the BM x BN scores into shared memory, then each
query row runs the online softmax (running max m, running sum l of exp(s - m), rescaling by
exp(m_old - m_new)) and accumulates P V into registers. lse = m + log l (natural log) is saved.

Backward (FlashAttention-2's split): `delta_kernel` computes D_i = sum_d dO_i,d O_i,d;
`dkdv_kernel` owns BN keys of one K/V head and streams the BM-row query tiles of every query
head of its group, recomputing P = exp(s - lse) and accumulating dV = P^T dO and
dK = dS^T Q * scale in registers, dS = P * (dP - D), dP = dO V^T; `dq_kernel` owns BM query rows
and streams K/V tiles, accumulating dQ = dS K * scale. Every gradient element is written once,
by one thread: deterministic, no atomics, no zero-fill.

Thread layout (NT threads, a compile-time constant, like the tile sizes: each kernel is made
once per combination by a kernels/numba/_builder.py builder): the G = NT / rows threads of an
owned row share it; thread g of a row owns the head-dim columns d = g + c * G (interleaved, so
neighbouring threads touch neighbouring addresses) of the row's accumulator, held in a local
(register) array, and computes the scores of that row's keys j = g + c * G. Each thread of a row
runs the row's online softmax itself (the G copies do identical work, so they agree exactly). In
the dK/dV kernel the roles swap: the owned rows are keys and thread g of key j computes the
pairs (i, j) with query rows i = g + c * G. Shared tiles are fp32, padded to an odd row length
against bank conflicts; each tile is stored in the orientation its inner loops read along (V
transposed in the forward, P and dS transposed in the dK/dV kernel), so the products are runs
over contiguous rows of shared memory (which is also what keeps the simulator's interpreted
inner loops short).

Synchronisation: two __syncthreads per streamed tile (after its load, after the score tile is
written). The streamed tiles are double-buffered, so the load of tile n + 1 cannot overwrite a
buffer another thread still reads for tile n - 1 (every thread passed the sync that ends its
last use); the score tile is single-buffered, since it is written only after the next tile's
first sync, which every reader of the previous scores has passed. Blocks loop over their work
items grid-stride (one item per block on a GPU; the CUDA simulator runs one block over all of
them, since starting a block costs tens of milliseconds there); every loop bound the syncs sit
in is uniform across the block. Shared memory stays below the 48 KiB static limit for head dims
up to 256: the launcher shrinks the tiles as the head dim grows (`tile_sizes`).

The three flash kernels share their pieces as `device` functions (kernels/numba/_device.py:
inlined into each kernel when compiled, plain calls in the CUDA simulator): the tile loads
(`_load_rows`) and output stores (`_store_row`), the score with its masks (`_score`), the
backward's P and dS of a score (`_grad_pair`), and the row-times-tile accumulation
(`_accumulate`). The loads and stores decode and encode bf16 inline rather than through
_dtypes.load4_f32 / store4_f32, and the hot loops call no Numba type casts: in the CUDA
simulator each call of a `cuda.jit` device function costs tens of microseconds and each
`float32(x)` several.

All arithmetic is fp32 whatever the tensor dtype (fp16; bf16 arrives as int16 bits and is
decoded with kernels/numba/_dtypes.py); constants are typed fp32 so that nothing promotes to
fp64 on the GPU (math.exp / math.log of an fp32 value are fp32 in Numba).
"""
import math

import numpy as np
from numba import cuda, float32, int8, int32, int64, types
from numba.core.extending import overload

from ._builder import builder
from ._device import device
from ._dtypes import (
    BF16,
    FP32,
    bf16_bits_to_f32,
    dtype_code,  # noqa: F401  (for launchers)
    f32_to_bf16_bits,
    load4_f32,
    store4_f32,
)
from ._grid import grid_threads, thread_index

MASK_NONE = 0
MASK_BOOL = 1
MASK_FLOAT = 2

NEG_INF = np.float32(-np.inf)
POS_INF = np.float32(np.inf)
ZERO = np.float32(0.0)
ONE = np.float32(1.0)

# Largest shared-memory footprint the tile choice allows (the static limit is 48 KiB).
SHARED_LIMIT = 48 * 1024


# --- dropout: a counter-based hash ---------------------------------------------------------
# lowbias32 (C. Wellons' integer hash, constants 0x21f0aaad / 0x735a2d97). Values are held in
# int64 and kept below 2**32; both multipliers are below 2**31, so no product reaches 2**63:
# the same code is exact on the GPU (int64) and in the simulator (Python ints), with no
# overflow anywhere.

_M32 = 0xFFFFFFFF


@device
def _mix32(x):
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def seed_word(seed):
    """A dropout seed as the kernels take it: an int (drawn on the host), or a one-element
    device array the kernel reads it from (drawn on the device inside CUDA graph capture, so
    each replay reads the draw of that replay). This body is the simulator's; compiled, the
    overload below, one per argument type."""
    return int(seed[0]) if hasattr(seed, "shape") else int(seed)


@overload(seed_word, target="cuda")
def _seed_word_compiled(seed):
    if isinstance(seed, types.Array):
        return lambda seed: int64(seed[0])
    return lambda seed: int64(seed)


@device
def _dropout_base(seed, bh):
    """The key of (seed, batch*head plane bh), computed once per plane; seed as `seed_word`
    takes it."""
    return _mix32(_mix32((seed_word(seed) & _M32) ^ 0x9E3779B9) ^ (int64(bh) & _M32))


@device
def _dropout_keep(base, offset, threshold):
    """Whether score `offset` = i * S + j of the plane keyed `base` survives dropout:
    hash >= threshold = p * 2**32, so it is dropped with probability p. Two hash rounds, the
    second mixing in the offset's high word (offsets past 2**32 stay distinct)."""
    x = base ^ (offset & _M32)
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    x = x ^ (x >> 15)
    x = x ^ (offset >> 32)
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    x = x ^ (x >> 15)
    return x >= threshold


@cuda.jit
def attention_dropout_mask(keep, seed, threshold):
    """keep[bh, i, j] = 1 where the kernels keep score (i, j) of plane bh, else 0: for tests.
    keep is an int8 (B*H, L, S) array; one thread per row (bh, i), grid-stride."""
    L = keep.shape[1]
    S = keep.shape[2]
    total = int64(keep.shape[0]) * L
    for r in range(thread_index(), total, grid_threads()):
        bh = r // L
        i = r - bh * L
        base = _dropout_base(seed, bh)
        for j in range(S):
            keep[bh, i, j] = 1 if _dropout_keep(base, i * S + j, threshold) else 0


@device
def _row_softmax_stats(q, k, b, h, hk, i, S, E, sc, mask, mask_kind, mask_code, is_causal,
                       code):
    """(max, sum of exp(s - max)) over the visible scores of row (b, h, i), each computed from
    global memory: the row's softmax normaliser (-inf and 0 for a row with no visible key; a
    NaN score makes the sum NaN, so the row's weights NaN, as torch's softmax)."""
    m = NEG_INF
    for j in range(S):
        visible, s = _global_score(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code,
                                   is_causal, code)
        if visible and s > m:
            m = s
    total_exp = ZERO
    for j in range(S):
        visible, s = _global_score(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code,
                                   is_causal, code)
        if visible:
            total_exp += math.exp(s - m) if m != NEG_INF else ZERO
    return m, total_exp


@device
def _row_weight(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code, is_causal, code, m,
                total_exp, dropout, base, threshold, drop_scale):
    """(P[i, j], its dropout factor): the softmax weight of score (i, j) in the row whose
    normaliser `_row_softmax_stats` gave (0 for a hidden key, or any key of a row with none
    visible), and what dropout multiplies it by: drop_scale where the flash kernels keep the
    score, 0 where they drop it, 1 without dropout."""
    visible, s = _global_score(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code,
                               is_causal, code)
    w = ZERO
    if visible and m != NEG_INF:
        w = math.exp(s - m) / total_exp
    factor = ONE
    if dropout:
        factor = float32(drop_scale) if _dropout_keep(base, i * k.shape[2] + j, threshold) \
            else ZERO
    return w, factor


@device
def _row_start(q, k, r, H, L, group, sc, mask, mask_kind, mask_code, is_causal, code, dropout,
               seed):
    """(b, h, i, hk, m, total_exp, base) of row r of the (B, H, L) query rows: its indices (hk
    the K/V head of query head h), `_row_softmax_stats`, and its plane's dropout key."""
    b = r // (H * L)
    i = r - b * (H * L)
    h = i // L
    i -= h * L
    hk = h // group
    m, total_exp = _row_softmax_stats(q, k, b, h, hk, i, k.shape[2], q.shape[3], sc, mask,
                                      mask_kind, mask_code, is_causal, code)
    base = _dropout_base(seed, r // L) if dropout else int64(0)
    return b, h, i, hk, m, total_exp, base


@cuda.jit
def attention_weights(q, k, mask, p, sc, mask_kind, mask_code, is_causal, group, dropout,
                      threshold, drop_scale, seed, code):
    """p[b, h, i, j] = the softmax over j of the scores `_score` defines (0 where a key is
    hidden; a row with no visible key all 0), in p's dtype: the attention weights
    MultiheadAttention(need_weights=True) returns beside the flash output. One thread per row
    (b, h, i), grid-stride; three passes over the row's keys (max, sum, write), each score
    computed again: a materialised extra output, simple rather than fast. q (B, H, L, E),
    k (B, HKV, S, E), group = H // HKV. With dropout, the weights the flash forward of `seed`
    used: 0 where it dropped the score, else scaled by drop_scale = 1 / (1 - p)."""
    H = q.shape[1]
    L = q.shape[2]
    E = q.shape[3]
    S = k.shape[2]
    for r in range(thread_index(), int64(q.shape[0]) * H * L, grid_threads()):
        b, h, i, hk, m, total_exp, base = _row_start(q, k, r, H, L, group, sc, mask, mask_kind,
                                                     mask_code, is_causal, code, dropout, seed)
        for j in range(S):
            w, factor = _row_weight(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code,
                                    is_causal, code, m, total_exp, dropout, base, threshold,
                                    drop_scale)
            store4_f32(p, b, h, i, j, w * factor, code)


@cuda.jit
def attention_weights_bwd(q, k, mask, dw, ds, dq, sc, mask_kind, mask_code, is_causal, group,
                          dropout, threshold, drop_scale, seed, code):
    """The backward of `attention_weights`, one thread per query row (b, h, i): with dW the
    gradient of the weights P * factor (factor: the dropout's, 1 without), dP = dW * factor
    and dS = P * (dP - sum_j P dP), written in fp32 to ds (B, H, L, S): the scores' gradient
    (a float mask's gradient, and what `attention_weights_bwd_keys` reads); then dq[b, h, i]
    = sc * sum_j dS[j] k[b, hk, j] in q's dtype. P is recomputed as attention_weights
    computes it."""
    H = q.shape[1]
    L = q.shape[2]
    E = q.shape[3]
    S = k.shape[2]
    for r in range(thread_index(), int64(q.shape[0]) * H * L, grid_threads()):
        b, h, i, hk, m, total_exp, base = _row_start(q, k, r, H, L, group, sc, mask, mask_kind,
                                                     mask_code, is_causal, code, dropout, seed)
        dot = ZERO      # sum_j P dP
        for j in range(S):
            w, factor = _row_weight(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code,
                                    is_causal, code, m, total_exp, dropout, base, threshold,
                                    drop_scale)
            dp = load4_f32(dw, b, h, i, j, code) * factor
            ds[b, h, i, j] = dp         # kept for the next pass (this thread's own row)
            dot += w * dp
        for j in range(S):
            w, factor = _row_weight(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code,
                                    is_causal, code, m, total_exp, dropout, base, threshold,
                                    drop_scale)
            ds[b, h, i, j] = w * (ds[b, h, i, j] - dot)
        for d in range(E):
            acc = ZERO
            for j in range(S):
                acc += ds[b, h, i, j] * load4_f32(k, b, hk, j, d, code)
            store4_f32(dq, b, h, i, d, acc * sc, code)


@cuda.jit
def attention_weights_bwd_keys(q, ds, dk, sc, group, code):
    """dk[b, hk, j] = sc * sum over the query heads h of K/V head hk and their rows i of
    dS[b, h, i, j] q[b, h, i] (ds from `attention_weights_bwd`), one thread per key row
    (b, hk, j), in k's dtype."""
    L = q.shape[2]
    E = q.shape[3]
    HKV = dk.shape[1]
    S = dk.shape[2]
    for r in range(thread_index(), int64(dk.shape[0]) * HKV * S, grid_threads()):
        b = r // (HKV * S)
        j = r - b * (HKV * S)
        hk = j // S
        j -= hk * S
        for d in range(E):
            acc = ZERO
            for g in range(group):
                h = hk * group + g
                for i in range(L):
                    acc += ds[b, h, i, j] * load4_f32(q, b, h, i, d, code)
            store4_f32(dk, b, hk, j, d, acc * sc, code)


@device
def _global_dot(x, b, h, i, y, hy, j, n, code):
    """sum over d < n of x[b, h, i, d] * y[b, hy, j, d] in fp32, in order (rows of 4-D arrays
    in global memory, decoded from bf16 where code says so)."""
    acc = ZERO
    for d in range(n):
        if code == BF16:
            acc += bf16_bits_to_f32(x[b, h, i, d]) * bf16_bits_to_f32(y[b, hy, j, d])
        else:
            acc += float32(x[b, h, i, d]) * float32(y[b, hy, j, d])
    return acc


@device
def _global_score(q, k, b, h, hk, i, j, E, sc, mask, mask_kind, mask_code, is_causal, code):
    """`_score` of (i, j) with q's row i of head h and k's row j of head hk read from global
    memory (decoded from bf16 where code says so)."""
    if _hidden(mask, b, h, i, j, mask_kind, is_causal):
        return False, NEG_INF
    return True, _plus_mask(_global_dot(q, b, h, i, k, hk, j, E, code) * sc, mask, b, h, i, j,
                            mask_kind, mask_code)


# --- tiles -----------------------------------------------------------------------------------

def tile_sizes(E: int, EV: int, rows: int | None = None) -> tuple[int, int, int, int]:
    """(owned, streamed, BD, BDV): rows a block owns, rows per streamed tile, and the padded
    head dims (powers of two, at least 16) the shared arrays are sized for.

    The footprints (fp32; each streamed tile double-buffered; rows padded by one) are at most
      forward: owned (BD+1) + 2 streamed (BD+1 + BDV+1)
      dQ, dK/dV: owned (BD+1 + BDV+1) + 2 streamed (BD+1 + BDV+1)
    so owned 16 / streamed 1024 / max(BD, BDV) (16, 8, 4 for 64, 128, 256) and owned 8 for 256
    keep every kernel near 33 KiB.

    rows (the forward's query rows per plane, L): a block owns no more rows than the next
    power of two of L, so that at decoding (L = 1) its threads serve the live row rather than
    15 empty ones (the forward's P V columns spread over all of them); with 4 rows or fewer
    it streams twice the keys a tile (2048 / max(BD, BDV), at most 32: 35-40 KiB).
    """
    BD = max(16, 1 << (max(E, 1) - 1).bit_length())
    BDV = max(16, 1 << (max(EV, 1) - 1).bit_length())
    big = max(BD, BDV)
    if big > 256:
        raise ValueError(f"Numba attention supports head dims up to 256, got {E} and {EV}")
    owned = 16 if big <= 128 else 8
    streamed = min(16, 1024 // big)
    if rows is not None:
        owned = min(owned, 1 << (max(rows, 1) - 1).bit_length())
        if owned <= 4:
            streamed = min(32, 2048 // big)
    return owned, streamed, BD, BDV


def _check_shared(nbytes: int) -> None:
    if nbytes > SHARED_LIMIT:  # pragma: no cover - guarded by tile_sizes
        raise ValueError(f"attention tiles need {nbytes} bytes of shared memory")


# --- pieces shared by the flash kernels ------------------------------------------------------
# Called once per tile, per work item or per score, never per head-dim element.

@device
def _thread_slot(G):
    """(t, r, g): this thread's index in the block, the owned row it serves (thread t serves row
    t // G) and its place g among that row's G threads."""
    t = cuda.threadIdx.x
    r = t // G
    return t, r, t - r * G


@device
def _dims(q, k, v):
    """(B, H, HKV, L, S, E, EV) of q (B, H, L, E), k (B, HKV, S, E) and v (B, HKV, S, EV)."""
    return q.shape[0], q.shape[1], k.shape[1], q.shape[2], k.shape[2], q.shape[3], v.shape[3]


@device
def _query_tile(w, nq, BM, H, group, L):
    """Work item w of a kernel that owns BM query rows (nq tiles per plane): (bh, q0, b, h, hk,
    nrows), i.e. its (batch*head) plane, first row, batch, head and K/V head, rows held."""
    bh = w // nq
    q0 = (w - bh * nq) * BM
    b = bh // H
    h = bh - b * H
    return bh, q0, b, h, h // group, min(BM, L - q0)


@device
def _load_rows(dst, src, b, h, r0, nrows, width, t, nt, code):
    """dst[r, d] = src[b, h, r0 + r, d] in fp32 for r < nrows, d < width: the block's nt threads
    (this one is t) copy rows into shared memory, consecutive threads on consecutive d. dst may
    be a transposed view (the forward keeps V transposed)."""
    for e in range(t, nrows * width, nt):
        r = e // width
        d = e - r * width
        if code == BF16:
            dst[r, d] = bf16_bits_to_f32(src[b, h, r0 + r, d])
        else:
            dst[r, d] = src[b, h, r0 + r, d]


@device
def _store_row(dst, b, h, row, acc, n, g, G, mul, div, code):
    """dst[b, h, row, g + c * G] = acc[c] * mul / div for c < n, in dst's dtype (bf16 encoded
    inline, as `_load_rows` decodes): this thread's columns of an output row; 0 where div is
    0 (a row with no visible key; a NaN div, a row that saw a NaN score, gives NaN).
    mul = div = 1 store acc exactly as it is."""
    for c in range(n):
        _store_at(dst, b, h, row, g + c * G,
                  ZERO if div == ZERO else acc[c] * mul / div, code)   # a NaN div stays NaN


@device
def _store_at(dst, b, h, row, col, value, code):
    """dst[b, h, row, col] = value (fp32) in dst's dtype, bf16 encoded inline."""
    if code == BF16:
        dst[b, h, row, col] = f32_to_bf16_bits(value)
    else:
        dst[b, h, row, col] = value


@device
def _dot(a, b, n):
    """sum of a[d] * b[d] over d < n, accumulated in order in fp32."""
    acc = ZERO
    for d in range(n):
        acc += a[d] * b[d]
    return acc


@device
def _score(qrow, krow, E, sc, mask, b, h, row, col, mask_kind, mask_code, is_causal):
    """(visible, s) of score (row, col) of plane (b, h): s = (q . k) * sc plus a float mask, or
    (False, -inf) where the causal or the boolean mask hides key col from query row."""
    if _hidden(mask, b, h, row, col, mask_kind, is_causal):
        return False, NEG_INF
    return True, _plus_mask(_dot(qrow, krow, E) * sc, mask, b, h, row, col, mask_kind,
                            mask_code)


@device
def _score_of_parts(parts, n, sc, mask, b, h, row, col, mask_kind, mask_code, is_causal):
    """_score's s from the n parts of its dot (summed in part order), -inf where hidden."""
    if _hidden(mask, b, h, row, col, mask_kind, is_causal):
        return NEG_INF
    dot = ZERO
    for p in range(n):
        dot += parts[p]
    return _plus_mask(dot * sc, mask, b, h, row, col, mask_kind, mask_code)


@device
def _hidden(mask, b, h, row, col, mask_kind, is_causal):
    """Whether the causal or the boolean mask hides key col from query row of plane (b, h)."""
    if is_causal and col > row:
        return True
    return mask_kind == MASK_BOOL and mask[b, h, row, col] == 0


@device
def _plus_mask(s, mask, b, h, row, col, mask_kind, mask_code):
    """Score s plus the float mask's (row, col) entry (none for other masks)."""
    if mask_kind == MASK_FLOAT:
        if mask_code == BF16:
            return s + bf16_bits_to_f32(mask[b, h, row, col])
        return s + mask[b, h, row, col]
    return s


@device
def _grad_pair(visible, s, row_lse, row_delta, dorow, vrow, EV, dropout, base, offset,
               threshold, dscale):
    """(P as dV = P^T dO uses it, dS) for one score (visible, s) of `_score` in the backward:
    p = exp(s - lse) (0 for every score of a fully masked row, whose lse is +inf),
    dP = dO . V, dropout keeping (scaling) or zeroing both P and dP, dS = p * (dP - delta);
    (0, 0) for a hidden score or p = 0, with no exp or dot computed for a hidden one."""
    if not visible:
        return ZERO, ZERO
    p = math.exp(s - row_lse)
    if p == ZERO:
        return ZERO, ZERO
    return grads_of(p, _dot(dorow, vrow, EV), row_delta, dropout, base, offset, threshold,
                    dscale)


@device
def grads_of(p, dp, delta, dropout, base, offset, threshold, dscale):
    """(P as dV = P^T dO uses it, dS) of a probability p > 0 and dP = dO . v: under dropout
    both kept and scaled by 1 / (1 - p), or zeroed; dS = p (dP - delta) (the undropped p:
    the normaliser's). The one definition, for the tensor-core kernels too."""
    pu = p
    if dropout:
        if _dropout_keep(base, offset, threshold):
            pu = p * dscale
            dp = dp * dscale
        else:
            pu = ZERO
            dp = ZERO
    return pu, p * (dp - delta)


@device
def _accumulate(acc, ncols, g, G, alpha, wrow, tile, n):
    """acc[c] = acc[c] * alpha + sum over j < n of wrow[j] * tile[j, g + c * G], for c < ncols:
    this thread's columns of a row (of P or dS) times a shared tile, summed in j order."""
    for c in range(ncols):
        d = g + c * G
        a = acc[c] * alpha
        for j in range(n):
            a += wrow[j] * tile[j, d]
        acc[c] = a


# --- forward ---------------------------------------------------------------------------------

def fwd_kernel(BM: int, BN: int, BD: int, BDV: int, NT: int):
    """The forward kernel for BM query rows per block, BN keys per streamed tile, head dims
    padded to BD / BDV, and NT threads per block (NT a multiple of BM). Arguments:

    q, k, v:     (B, H, L, E), (B, HKV, S, E), (B, HKV, S, EV) arrays, any strides
    o:           output (B, H, L, EV), q's dtype
    lse:         output fp32 (B*H, L): natural-log logsumexp per row, +inf for masked rows
    mask:        (B, H, L, S) uint8 (MASK_BOOL) or float (MASK_FLOAT) array, any strides;
                 unread for MASK_NONE
    mask_kind, mask_code: MASK_* and the dtype code of a float mask
    is_causal:   top-left causal masking
    scale:       score scale
    dropout, threshold, drop_scale, seed: dropout on/off, p * 2**32, 1 / (1 - p), the seed
    code:        dtype code of q, k, v and o
    part, splits, keys, arrivals: with splits > 1 the keys split over blocks (FlashDecoding's
                 scheme, as the Triton split forward): work item (query tile, split s) streams
                 keys [s keys, (s + 1) keys) and writes its rows' unnormalised output, running
                 max and sum to part, fp32 (B*H, splits, L, EV + 2); the last of a tile's
                 splits to arrive (int32 counters `arrivals`, one per query tile, zero before
                 the launch and after it) combines them into o and lse (_combine_partials).
                 splits 1: part and arrivals are placeholders, unread.
    """
    return _build_fwd(BM, BN, BD, BDV, NT)


@builder
def _build_fwd(BM, BN, BD, BDV, NT):
    G = NT // BM
    assert G * BM == NT and G >= 1, (BM, NT)
    NCV = max(1, BDV // G)
    BDP, BNP = BD + 1, BN + 1
    # With at least two threads of a row per key of a tile (few owned rows: decoding), a
    # score's dot is split over SPLIT_DOT of them (strided parts of the head dim, summed in
    # part order by one thread: deterministic), not left to one thread while the rest wait
    SPLIT_DOT = G // BN if G >= 2 * BN else 1
    _check_shared(4 * (BM * BDP + 2 * BN * BDP + 2 * BDV * BNP + BM * BNP + BM * BN * SPLIT_DOT)
                  + BM * BN)

    @cuda.jit
    def attention_fwd(q, k, v, o, lse, mask, mask_kind, mask_code, is_causal, scale,
                      dropout, threshold, drop_scale, seed, code, part, splits, keys,
                      arrivals):
        # One shared array per line: the simulator keys shared arrays by source line.
        sq = cuda.shared.array((BM, BDP), float32)        # the block's query rows
        sk = cuda.shared.array((2, BN, BDP), float32)     # streamed keys, double-buffered
        svt = cuda.shared.array((2, BDV, BNP), float32)   # streamed values, transposed
        ss = cuda.shared.array((BM, BNP), float32)        # scores of the current tile
        skeep = cuda.shared.array((BM, BN), int8)         # dropout keep flags of the tile
        slast = cuda.shared.array(1, int32)               # the last split of its tile
        sdot = cuda.shared.array((BM, BN, SPLIT_DOT), float32)   # parts of the tile's dots
        acc = cuda.local.array(NCV, float32)              # this thread's columns of P V
        pl = cuda.local.array(BN, float32)                # the row's (dropped) P of the tile
        t, i, g = _thread_slot(G)
        B, H, HKV, L, S, E, EV = _dims(q, k, v)
        group = H // HKV
        sc = float32(scale)
        dscale = float32(drop_scale)
        ncv = (EV - g + G - 1) // G          # columns g + c * G below EV
        nq = (L + BM - 1) // BM
        qrow = sq[i]
        srow = ss[i]
        it = 0                               # streamed tiles so far: picks the buffer
        for w in range(cuda.blockIdx.x, nq * B * H * splits, cuda.gridDim.x):
            tile = w // splits
            split = w - tile * splits
            bh, q0, b, h, hk, nrows = _query_tile(tile, nq, BM, H, group, L)
            # this item's keys (all of them unsplit): [k_begin, k_stop)
            k_begin = split * keys
            k_stop = min(S, k_begin + keys)
            # sq was last read before the final sync of the previous item: free to overwrite
            _load_rows(sq, q, b, h, q0, nrows, E, t, NT, code)
            for c in range(NCV):
                acc[c] = ZERO
            m = NEG_INF
            lsum = ZERO
            row = q0 + i
            live = i < nrows
            base = _dropout_base(seed, bh) if dropout else int64(0)
            end = min(k_stop, q0 + nrows) if is_causal else k_stop
            for k0 in range(k_begin, end, BN):
                buf = it & 1
                it += 1
                ncols = min(BN, k_stop - k0)
                _load_rows(sk[buf], k, b, hk, k0, ncols, E, t, NT, code)
                _load_rows(svt[buf].T, v, b, hk, k0, ncols, EV, t, NT, code)
                cuda.syncthreads()
                if SPLIT_DOT > 1:
                    jd = g // SPLIT_DOT              # this thread's key and part of its dot
                    pd = g - jd * SPLIT_DOT
                    if live and jd < ncols:
                        dot = ZERO
                        for d in range(pd, E, SPLIT_DOT):
                            dot += qrow[d] * sk[buf, jd, d]
                        sdot[i, jd, pd] = dot
                    cuda.syncthreads()
                if live:
                    for j in range(g, ncols, G):
                        col = k0 + j
                        if SPLIT_DOT > 1:
                            srow[j] = _score_of_parts(sdot[i, j], SPLIT_DOT, sc, mask, b, h,
                                                      row, col, mask_kind, mask_code,
                                                      is_causal)
                        else:
                            _, srow[j] = _score(qrow, sk[buf, j], E, sc, mask, b, h, row, col,
                                                mask_kind, mask_code, is_causal)
                        if dropout:
                            skeep[i, j] = 1 if _dropout_keep(base, row * S + col, threshold) else 0
                cuda.syncthreads()
                if live:
                    m_new = m
                    for j in range(ncols):
                        s = srow[j]
                        # NaN-propagating max (Python's and C's max drop a NaN): a NaN score
                        # makes the row NaN, as in torch, not "nothing visible"
                        if s > m_new or s != s:
                            m_new = s
                    if m_new != NEG_INF:                 # else nothing visible yet: no change
                        alpha = math.exp(m - m_new)      # 0 while m is still -inf
                        lsum *= alpha
                        for j in range(ncols):
                            p = math.exp(srow[j] - m_new)     # 0 for masked scores
                            lsum += p                    # the normaliser: undropped
                            if dropout:
                                p = p * dscale if skeep[i, j] != 0 else ZERO
                            pl[j] = p
                        _accumulate(acc, ncv, g, G, alpha, pl, svt[buf].T, ncols)
                        m = m_new
            if splits > 1:
                if live:                    # the partial: unnormalised, its max and sum
                    _store_row(part, bh, split, row, acc, ncv, g, G, ONE, ONE, FP32)
                    if g == 0:
                        part[bh, split, row, EV] = m
                        part[bh, split, row, EV + 1] = lsum
                # the classic threadfence reduction (as softmax_ce's _last_block_reduces):
                # each block's partial stores before its arrival, the last one's reads after
                cuda.threadfence()
                cuda.syncthreads()
                if t == 0:
                    slast[0] = int32(cuda.atomic.add(arrivals, tile, 1) == splits - 1)
                cuda.syncthreads()
                if slast[0] != 0:
                    cuda.threadfence()
                    _combine_partials(part, o, lse, bh, b, h, q0, nrows, t, NT, code)
                    if t == 0:
                        arrivals[tile] = 0
            elif live:
                _store_row(o, b, h, row, acc, ncv, g, G, ONE, lsum, code)
                if g == 0:
                    lse[bh, row] = POS_INF if lsum == ZERO else m + math.log(lsum)

    return attention_fwd


@device
def _combine_partials(part, o, lse, bh, b, h, q0, nrows, t, nt, code):
    """Rows q0 .. q0 + nrows of plane bh = (b, h) from the split forward's partials, the
    block's nt threads (this one is t) an output element each in turn: with M = max_s m_s and
    w_s = exp(m_s - M) (0 for a split that saw no key), o = sum_s w_s acc_s / sum_s w_s l_s
    and lse = M + log sum_s w_s l_s, summed in split order (deterministic); a row no split
    saw a key of gives 0 and lse +inf, a NaN max (a NaN score) NaN, as the unsplit kernel.
    part: fp32 (B*H, splits, L, EV + 2)."""
    splits, EV = part.shape[1], part.shape[3] - 2
    for e in range(t, nrows * EV, nt):
        r = e // EV
        d = e - r * EV
        row = q0 + r
        top = NEG_INF
        for s in range(splits):
            ms = part[bh, s, row, EV]
            if ms > top or ms != ms:            # NaN-propagating, as the kernel's max
                top = ms
        out = ZERO
        total = ZERO
        if top != NEG_INF:          # else no split saw a key (and exp(-inf - -inf) is NaN)
            for s in range(splits):
                w = math.exp(part[bh, s, row, EV] - top)       # 0 for a split that saw none
                total += w * part[bh, s, row, EV + 1]
                out += w * part[bh, s, row, d]
        _store_at(o, b, h, row, d, ZERO if total == ZERO else out / total, code)
        if d == 0:
            lse[bh, row] = POS_INF if total == ZERO else top + math.log(total)


# --- backward ------------------------------------------------------------------------------

@cuda.jit
def delta_kernel(o, do, delta, code):
    """delta[bh, i] = sum_d dO[b, h, i, d] * O[b, h, i, d] in fp32 (= sum_j P_ij dP_ij), one
    thread per row, grid-stride. o, do: (B, H, L, EV) arrays of any strides (do may be a
    broadcast gradient with stride 0); delta: fp32 (B*H, L); code: dtype code of o and do."""
    H = o.shape[1]
    L = o.shape[2]
    EV = o.shape[3]
    total = int64(o.shape[0]) * H * L
    for r in range(thread_index(), total, grid_threads()):
        bh = r // L
        i = r - bh * L
        b = bh // H
        h = bh - b * H
        delta[bh, i] = _global_dot(o, b, h, i, do, h, i, EV, code)


def dq_kernel(BM: int, BN: int, BD: int, BDV: int, NT: int):
    """dQ kernel: a block owns BM query rows of one (batch, head) and streams K/V tiles of BN
    keys. Arguments: q, k, v, do (any strides), lse and delta (fp32 (B*H, L)), dq (output,
    q's dtype), dmask and mask_grad (with mask_grad, dmask (B, H, L, S) in the float mask's
    dtype receives dS, the gradient of the scores and so of the mask; else unread), then
    mask ... code as for `fwd_kernel`."""
    return _build_dq(BM, BN, BD, BDV, NT)


@builder
def _build_dq(BM, BN, BD, BDV, NT):
    G = NT // BM
    assert G * BM == NT and G >= 1, (BM, NT)
    NCD = max(1, BD // G)
    BDP, BDVP, BNP = BD + 1, BDV + 1, BN + 1
    _check_shared(4 * (BM * (BDP + BDVP) + 2 * BN * (BDP + BDVP) + BM * BNP))

    @cuda.jit
    def attention_bwd_dq(q, k, v, do, lse, delta, dq, dmask, mask_grad, mask, mask_kind,
                         mask_code, is_causal, scale, dropout, threshold, drop_scale, seed, code):
        sq = cuda.shared.array((BM, BDP), float32)        # the block's query rows
        sdo = cuda.shared.array((BM, BDVP), float32)      # and their output gradients
        sk = cuda.shared.array((2, BN, BDP), float32)     # streamed keys, double-buffered
        sv = cuda.shared.array((2, BN, BDVP), float32)    # streamed values, double-buffered
        sds = cuda.shared.array((BM, BNP), float32)       # dS of the current tile
        acc = cuda.local.array(NCD, float32)              # this thread's columns of dQ
        t, i, g = _thread_slot(G)
        B, H, HKV, L, S, E, EV = _dims(q, k, v)
        group = H // HKV
        sc = float32(scale)
        dscale = float32(drop_scale)
        ncd = (E - g + G - 1) // G
        nq = (L + BM - 1) // BM
        qrow = sq[i]
        dorow = sdo[i]
        dsrow = sds[i]
        it = 0
        for w in range(cuda.blockIdx.x, nq * B * H, cuda.gridDim.x):
            bh, q0, b, h, hk, nrows = _query_tile(w, nq, BM, H, group, L)
            _load_rows(sq, q, b, h, q0, nrows, E, t, NT, code)
            _load_rows(sdo, do, b, h, q0, nrows, EV, t, NT, code)
            for c in range(NCD):
                acc[c] = ZERO
            row = q0 + i
            live = i < nrows
            row_lse = POS_INF
            row_delta = ZERO
            if live:
                row_lse = lse[bh, row]
                row_delta = delta[bh, row]
            base = _dropout_base(seed, bh) if dropout else int64(0)
            end = min(S, q0 + nrows) if is_causal else S
            for k0 in range(0, end, BN):
                buf = it & 1
                it += 1
                ncols = min(BN, S - k0)
                _load_rows(sk[buf], k, b, hk, k0, ncols, E, t, NT, code)
                _load_rows(sv[buf], v, b, hk, k0, ncols, EV, t, NT, code)
                cuda.syncthreads()
                if live:
                    for j in range(g, ncols, G):
                        col = k0 + j
                        visible, s = _score(qrow, sk[buf, j], E, sc, mask, b, h, row, col,
                                            mask_kind, mask_code, is_causal)
                        _, ds = _grad_pair(visible, s, row_lse, row_delta, dorow, sv[buf, j],
                                           EV, dropout, base, row * S + col, threshold, dscale)
                        dsrow[j] = ds
                        if mask_grad:        # non-causal: every (row, col) is visited once
                            if mask_code == BF16:
                                dmask[b, h, row, col] = f32_to_bf16_bits(ds)
                            else:
                                dmask[b, h, row, col] = ds
                cuda.syncthreads()
                if live:
                    _accumulate(acc, ncd, g, G, ONE, dsrow, sk[buf], ncols)
            if live:
                _store_row(dq, b, h, row, acc, ncd, g, G, sc, ONE, code)

    return attention_bwd_dq


def dkdv_kernel(BN: int, BM: int, BD: int, BDV: int, NT: int):
    """dK/dV kernel: a block owns BN keys of one (batch, K/V head) and streams query tiles of
    BM rows of each of the GROUP query heads reading that K/V head. Arguments: q, k, v, do,
    lse, delta, dk, dv (outputs, K's and V's dtype), then mask ... code as for `fwd_kernel`."""
    return _build_dkdv(BN, BM, BD, BDV, NT)


@builder
def _build_dkdv(BN, BM, BD, BDV, NT):
    G = NT // BN
    assert G * BN == NT and G >= 1, (BN, NT)
    NCD = max(1, BD // G)
    NCV = max(1, BDV // G)
    BDP, BDVP, BMP = BD + 1, BDV + 1, BM + 1
    _check_shared(4 * (BN * (BDP + BDVP) + 2 * BM * (BDP + BDVP + 2) + 2 * BN * BMP))

    @cuda.jit
    def attention_bwd_dkdv(q, k, v, do, lse, delta, dk, dv, mask, mask_kind, mask_code,
                           is_causal, scale, dropout, threshold, drop_scale, seed, code):
        sk = cuda.shared.array((BN, BDP), float32)        # the block's keys
        sv = cuda.shared.array((BN, BDVP), float32)       # and values
        sq = cuda.shared.array((2, BM, BDP), float32)     # streamed queries, double-buffered
        sdo = cuda.shared.array((2, BM, BDVP), float32)   # streamed dO, double-buffered
        slse = cuda.shared.array((2, BM), float32)        # streamed lse
        sdelta = cuda.shared.array((2, BM), float32)      # streamed delta
        spt = cuda.shared.array((BN, BMP), float32)       # (dropped) P^T of the current tile
        sdst = cuda.shared.array((BN, BMP), float32)      # dS^T of the current tile
        acck = cuda.local.array(NCD, float32)             # this thread's columns of dK
        accv = cuda.local.array(NCV, float32)             # and of dV
        t, j, g = _thread_slot(G)                         # j: the thread's key in the tile
        B, H, HKV, L, S, E, EV = _dims(q, k, v)
        group = H // HKV
        sc = float32(scale)
        dscale = float32(drop_scale)
        ncd = (E - g + G - 1) // G
        ncv = (EV - g + G - 1) // G
        nk = (S + BN - 1) // BN
        krow = sk[j]
        vrow = sv[j]
        prow = spt[j]
        dsrow = sdst[j]
        it = 0
        for w in range(cuda.blockIdx.x, nk * B * HKV, cuda.gridDim.x):
            bhk = w // nk
            k0 = (w - bhk * nk) * BN
            b = bhk // HKV
            hk = bhk - b * HKV
            ncols = min(BN, S - k0)
            # sk / sv were last read before the previous item's final sync
            _load_rows(sk, k, b, hk, k0, ncols, E, t, NT, code)
            _load_rows(sv, v, b, hk, k0, ncols, EV, t, NT, code)
            for c in range(NCD):
                acck[c] = ZERO
            for c in range(NCV):
                accv[c] = ZERO
            col = k0 + j
            live = j < ncols
            # causal: query rows below k0 see none of these keys
            qstart = (k0 // BM) * BM if is_causal else 0
            for gg in range(group):
                h = hk * group + gg
                bh = b * H + h
                base = _dropout_base(seed, bh) if dropout else int64(0)
                for q0 in range(qstart, L, BM):
                    buf = it & 1
                    it += 1
                    nrows = min(BM, L - q0)
                    _load_rows(sq[buf], q, b, h, q0, nrows, E, t, NT, code)
                    _load_rows(sdo[buf], do, b, h, q0, nrows, EV, t, NT, code)
                    for r in range(t, nrows, NT):
                        slse[buf, r] = lse[bh, q0 + r]
                        sdelta[buf, r] = delta[bh, q0 + r]
                    cuda.syncthreads()
                    if live:
                        for r in range(g, nrows, G):
                            row = q0 + r
                            visible, s = _score(sq[buf, r], krow, E, sc, mask, b, h, row, col,
                                                mask_kind, mask_code, is_causal)
                            prow[r], dsrow[r] = _grad_pair(
                                visible, s, slse[buf, r], sdelta[buf, r], sdo[buf, r], vrow, EV,
                                dropout, base, row * S + col, threshold, dscale)
                    cuda.syncthreads()
                    if live:
                        _accumulate(accv, ncv, g, G, ONE, prow, sdo[buf], nrows)
                        _accumulate(acck, ncd, g, G, ONE, dsrow, sq[buf], nrows)
            if live:
                _store_row(dk, b, hk, col, acck, ncd, g, G, sc, ONE, code)
                _store_row(dv, b, hk, col, accv, ncv, g, G, ONE, ONE, code)

    return attention_bwd_dkdv
