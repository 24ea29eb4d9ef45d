"""Triton kernels for scaled dot-product attention: flash-style forward and backward.

Forward (one program = BLOCK_M query rows of one (batch, head)): stream K/V in BLOCK_N tiles,
keep the running row max m, the running sum l of exp(s - m) and the unnormalised output acc
on chip, rescaling by exp(m_old - m_new) when the max grows. The L x S score matrix is never
written; the log-sum-exp per row (lse = m + log l) is saved for the backward.

Backward (FlashAttention-2's split): `attention_bwd_preprocess` computes D_i = sum(dO_i * O_i);
`attention_bwd_dkdv` owns a K/V tile and loops over every query tile of every query head that
shares the K/V head (grouped-query attention), recomputing P = exp(s - lse) and accumulating
dV = P^T dO and dK = dS^T Q * scale, where dS = P * (dP - D) and dP = dO V^T;
`attention_bwd_dq` owns a query tile and accumulates dQ = dS K * scale; with MASK_GRAD (a float
mask that requires grad) it also writes dS itself, the gradient of the scores and so of the
mask, one (B, H, L, S) element each (the caller sums it over the mask's broadcast dims). Each
gradient element is written once, by one program: no atomics, deterministic.

Scores: s = (q . k) * scale, then -inf where a key index is out of range, where the boolean
mask is False, or above the diagonal for causal attention (torch's top-left alignment: query i
sees keys j <= i); a float mask is added. A row with every key masked has l = 0: its output is 0
(torch's behaviour) and its saved lse is +inf so that the backward's exp(s - lse) is 0, not NaN.
Only the tiles that can hold a hidden score pay for the masks: without a mask tensor, the tiles
wholly inside the key range (and, for causal attention, wholly below the diagonal) run an
unmasked loop, the diagonal and the partial last tiles a masked one (`_key_ranges` for the
loops over keys; the dK/dV kernel splits its loop over queries the same way).

Dropout: score (i, j) of plane bh is kept where a uniform draw from Philox-4x32 (Triton's
counter-based generator) keyed by the seed, with counters (i * S + j, its high word, bh, 0), is
>= p; recomputed bit-identically in the backward (`_dropout_keep` is the one definition).
Kept probabilities are scaled by 1 / (1 - p). The normaliser l uses the undropped P. The
counter i * S + j is 32 bits wide (DROPOUT_32, its high word 0) unless a plane holds 2**32
scores or more (DROPOUT_64, chosen by the host), where it would wrap and repeat the pattern.
With SEED_IN_MEMORY added to DROPOUT the `seed` argument points to the seed, an int32 the
device drew (inside CUDA graph capture, where a host seed would be replayed every step).

Exponentials use exp2 with log2(e) folded into the scale; the forward's unmasked tiles take the
row max of the raw products and apply the scale inside the exponent's FMA, exp2(qk * c - m)
(c >= 0: a negative scale's sign moves into q). On Hopper the forward reads q, k, v and writes o
through tensor descriptors (TMA; `USE_TMA`, chosen by the host where the layout allows), which
also leaves q in shared memory for the products; the pointer loads remain for other layouts and
older GPUs. The algo="flash_hopper" forward (attention_gluon.py) is the FlashAttention-3-shaped
version of the same kernel in Gluon.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
MASK_NONE = tl.constexpr(0)
MASK_BOOL = tl.constexpr(1)
MASK_FLOAT = tl.constexpr(2)


DROPOUT_OFF = tl.constexpr(0)
DROPOUT_32 = tl.constexpr(1)    # Philox counters i * S + j in 32 bits: planes of < 2**32 scores
DROPOUT_64 = tl.constexpr(2)    # in 64 bits (the high word is Philox's second counter)
# added to DROPOUT_32 / DROPOUT_64: the `seed` argument is a pointer to the seed (an int32 the
# device drew, as inside CUDA graph capture, where a host seed would be replayed), not the seed
SEED_IN_MEMORY = tl.constexpr(4)


@triton.jit
def _dropout_keep(seed, bh, qi, kj, S, p, DROPOUT: tl.constexpr):
    """Which scores of (batch*head) bh survive dropout with probability 1 - p: qi and kj are
    each score's query and key index, broadcastable to the tile (rows[:, None], cols[None, :]
    for a query-major tile, the transposes for a key-major one). DROPOUT_64 for a plane of
    2**32 scores or more, where the 32-bit counter would wrap and repeat the pattern; below
    that both widths draw the same bits (Philox's second counter is 0). With SEED_IN_MEMORY
    added, `seed` points to the seed (the same value gives the same bits)."""
    if SEED_IN_MEMORY & DROPOUT:
        seed = tl.load(seed)
    if (DROPOUT & 3) == DROPOUT_64:
        offset = qi.to(tl.int64) * S + kj
        lo, hi = offset.to(tl.uint32), (offset >> 32).to(tl.uint32)
    else:
        lo = (qi * S + kj).to(tl.uint32, bitcast=True)
        hi = lo * 0
    # keyed by the seed alone, the plane a counter word: calls with nearby seeds share no stream
    bits, _, _, _ = tl.philox(seed, lo, hi, bh, 0)
    return tl.random.uint_to_uniform_float(bits) >= p


@triton.jit
def _apply_masks(s, qi, kj, L, S, mask_ptr, sm_m, sm_n, float_mask_scale,
                 IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """-inf where a key is out of range, masked out (bool False) or in the causal future;
    a float mask is added (times float_mask_scale: log2 e for scores in log2 units). qi, kj:
    each score's query and key index, broadcastable to s (see `_dropout_keep`)."""
    valid = (kj < S) & (qi < L)
    if IS_CAUSAL:
        valid = valid & (kj <= qi)
    if MASK_KIND == MASK_BOOL:
        keep = tl.load(mask_ptr + qi.to(tl.int64) * sm_m + kj.to(tl.int64) * sm_n,
                       mask=valid, other=0)
        valid = valid & (keep != 0)
    if MASK_KIND == MASK_FLOAT:
        add = tl.load(mask_ptr + qi.to(tl.int64) * sm_m + kj.to(tl.int64) * sm_n,
                      mask=valid, other=0.0).to(tl.float32)
        s = s + add * float_mask_scale
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _scores(a, b, qi, kj, L, S, mask_ptr, sm_m, sm_n, scale_log2, MASKED: tl.constexpr,
            IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Scores a @ b^T in log2 units (s * log2 e), masked with -inf: a query-major tile is
    (q, k, rows[:, None], cols[None, :]), a key-major one (k, q, rows[None, :], cols[:, None]).
    MASKED=False for a tile the caller knows needs no mask (`_key_ranges`)."""
    s = tl.dot(a, tl.trans(b), input_precision=INPUT_PRECISION) * scale_log2
    if MASKED:
        s = _apply_masks(s, qi, kj, L, S, mask_ptr, sm_m, sm_n, LOG2E, IS_CAUSAL, MASK_KIND)
    return s


@triton.jit
def _load_tile(base, rows, cols, s_row, s_col, n_rows, n_cols):
    """The [len(rows), len(cols)] tile base[rows, cols] of a strided 2-D slice, 0 outside its
    n_rows x n_cols extent. Offsets in int64 along both axes (a head dim's stride can be
    large: a view of a transposed tensor)."""
    return tl.load(base + rows[:, None].to(tl.int64) * s_row + cols[None, :].to(tl.int64) * s_col,
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_tile(base, rows, cols, s_row, s_col, n_rows, n_cols, value):
    """base[rows, cols] = value, converted to base's element type, inside n_rows x n_cols."""
    tl.store(base + rows[:, None].to(tl.int64) * s_row + cols[None, :].to(tl.int64) * s_col,
             value.to(base.dtype.element_ty),
             mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols))


@triton.jit
def _tile_of_plane(n_tiles):
    """(tile, plane) of this program in a grid of (n_tiles * planes,) programs, tiles fastest
    (the order of a (n_tiles, planes) grid): a plane is one (batch, head). One grid axis, as
    CUDA caps axes 1 and 2 at 65535 programs and batch * heads passes that (windowed
    attention folds its windows into the batch)."""
    pid = tl.program_id(0)
    return pid % n_tiles, pid // n_tiles


@triton.jit
def _query_program(H, GROUP, L, BLOCK_M: tl.constexpr):
    """A program owning BLOCK_M query rows of one (batch, head), grid (cdiv(L, BLOCK_M) * B*H,)
    (`_tile_of_plane`): (pid_m, bh, b, h, hk, rows), hk the K/V head it reads; b, h and hk in
    int64."""
    pid_m, bh = _tile_of_plane(tl.cdiv(L, BLOCK_M))
    b = (bh // H).to(tl.int64)
    h = bh % H
    hk = (h // GROUP).to(tl.int64)
    return pid_m, bh, b, h.to(tl.int64), hk, pid_m * BLOCK_M + tl.arange(0, BLOCK_M)


@triton.jit
def _row_stats(lse_ptr, delta_ptr, bh, rows, L):
    """The forward's lse (+inf past L) and the preprocess's delta (0 past L) of query rows."""
    lse = tl.load(lse_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=float("inf"))
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + rows, mask=rows < L, other=0.0)
    return lse, delta


@triton.jit
def _grad_tile(s, lse, delta, dp, seed, bh, qi, kj, S, dropout_p, DROPOUT: tl.constexpr):
    """(P as dV = P^T dO uses it, dS) of a score tile s (log2 units) in the backward:
    P = exp(s - lse), dropout keeping (scaling) or zeroing both P and dP = dO V^T, and
    dS = P * (dP - delta). lse, delta, dp, qi and kj are oriented like s (query- or
    key-major, see `_scores`)."""
    p = tl.math.exp2(s - lse * LOG2E)
    p_used = p
    if DROPOUT:
        keep = _dropout_keep(seed, bh, qi, kj, S, dropout_p, DROPOUT)
        p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    return p_used, p * (dp - delta)


@triton.jit
def _key_ranges(pid_m, S, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """(lo, hi) for the key tiles of query tile pid_m: tiles starting below lo need no mask
    (every key index < S, and for causal attention <= the tile's first row; no mask tensor),
    tiles in [lo, hi) are masked, keys from hi on are never visible (causal)."""
    hi = S
    if IS_CAUSAL:
        hi = tl.minimum(S, (pid_m + 1) * BLOCK_M)          # keys past the tile's last row
    lo = (S // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        lo = tl.minimum(lo, (pid_m * BLOCK_M // BLOCK_N) * BLOCK_N)
    if MASK_KIND != MASK_NONE:
        lo = 0
    return lo, hi


@triton.jit
def _kv_tile(src, start_n, cols, d, s_n, s_d, S, E, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Key or value rows [start_n, start_n + BLOCK_N) of one head, 0 past S and E: through a
    tensor descriptor (TMA: `src` is one, zero-filled out of range) or strided pointers."""
    if USE_TMA:
        tile = src.load([start_n, 0])
    else:
        tile = _load_tile(src, cols, d, s_n, s_d, S, E)
    return tile


@triton.jit
def _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, m_base, sk_n, sk_d, sv_n, sv_d, sm_m, sm_n,
               rows, d, dv, start, end, L, S, E, EV, scale_log2, dropout_p, seed, bh,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
               DROPOUT: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """The online softmax over key tiles [start, end): running max m_i, sum l_i (log2 units)
    and unnormalised output acc. MASKED=False skips the score masks (the caller guarantees the
    tiles need none: `_key_ranges`) and folds the scale into the exponent's FMA:
    exp2(qk * scale_log2 - m), with scale_log2 >= 0 (the caller moved the scale's sign into q)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _kv_tile(k_src, start_n, cols, d, sk_n, sk_d, S, E, BLOCK_N, BLOCK_D, USE_TMA)
        qk = tl.dot(q, tl.trans(k), input_precision=INPUT_PRECISION)
        if MASKED:
            s = _apply_masks(qk * scale_log2, rows[:, None], cols[None, :], L, S, m_base, sm_m,
                             sm_n, LOG2E, IS_CAUSAL, MASK_KIND)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            seen = m_new != float("-inf")
            m_safe = tl.where(seen, m_new, 0.0)
            alpha = tl.where(seen, tl.math.exp2(m_i - m_safe), 1.0)
            p = tl.math.exp2(s - m_safe[:, None])           # 0 where s = -inf
        else:
            # every key visible: the row max is finite, no -inf guards
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(qk * scale_log2 - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], S, dropout_p, DROPOUT)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = _kv_tile(v_src, start_n, cols, dv, sv_n, sv_d, S, EV, BLOCK_N, BLOCK_DV, USE_TMA)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_start(q, scale, SCALE_NEGATIVE: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_DV: tl.constexpr):
    """(q, scale in log2 units, and the online softmax's empty state m, l, acc) before the
    first key tile. The unmasked tiles take the row max before scaling, and max(qk) * c is
    max(qk * c) only for c >= 0: a negative scale's sign moves into q (exact)."""
    scale_log2 = scale * LOG2E
    if SCALE_NEGATIVE:
        q = -q
        scale_log2 = -scale_log2
    return (q, scale_log2, tl.full([BLOCK_M], float("-inf"), tl.float32),
            tl.zeros([BLOCK_M], tl.float32), tl.zeros([BLOCK_M, BLOCK_DV], tl.float32))


@triton.jit(do_not_specialize=["seed"])   # a new value every call with dropout
def attention_fwd(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr,
    sq_b, sq_h, sq_m, sq_d,            # query strides (B, Hq, L, E)
    sk_b, sk_h, sk_n, sk_d,            # key strides (B, Hkv, S, E)
    sv_b, sv_h, sv_n, sv_d,            # value strides (B, Hkv, S, Ev)
    so_b, so_h, so_m, so_d,            # output strides (B, Hq, L, Ev)
    sm_b, sm_h, sm_m, sm_n,            # mask strides (broadcast dims have stride 0)
    H, L, S, E, EV,                    # query heads, lengths, head dims
    GROUP,                             # query heads per K/V head (GQA); 1 without
    scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,             # q, k, v, o through tensor descriptors (see below)
    SCALE_NEGATIVE: tl.constexpr,      # scale < 0
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One program: BLOCK_M query rows of one (batch, head). USE_TMA: the host checked that
    every (batch, head) slice of q, k, v and o is a TMA-addressable matrix (16-byte aligned
    base and row stride, unit column stride, head dims <= 256); each program then builds
    one 2-D descriptor per slice and the compiler turns its loads into TMA copies (Hopper);
    elsewhere the same loads are masked pointer loads."""
    pid_m, bh, b, h, hk, rows = _query_program(H, GROUP, L, BLOCK_M)
    if IS_CAUSAL:
        # longest rows first: the last query tiles see the most keys, so they start first and
        # the short ones fill the tail of the grid
        pid_m = tl.cdiv(L, BLOCK_M) - 1 - pid_m
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_base = q_ptr + b * sq_b + h * sq_h
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    o_base = o_ptr + b * so_b + h * so_h
    m_base = mask_ptr + b * sm_b + h * sm_h
    if USE_TMA:
        q_desc = tl.make_tensor_descriptor(q_base, [L, E], [sq_m, 1], [BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, [S, E], [sk_n, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, [S, EV], [sv_n, 1], [BLOCK_N, BLOCK_DV])
        q = q_desc.load([pid_m * BLOCK_M, 0])
    else:
        k_src = k_base
        v_src = v_base
        q = _load_tile(q_base, rows, d, sq_m, sq_d, L, E)
    # Only with a negative scale is q in registers; otherwise the products read it from shared
    # memory where TMA put it.
    q, scale_log2, m_i, l_i, acc = _fwd_start(q, scale, SCALE_NEGATIVE, BLOCK_M, BLOCK_DV)
    lo, hi = _key_ranges(pid_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, m_base, sk_n, sk_d, sv_n, sv_d,
                               sm_m, sm_n, rows, d, dv, 0, lo, L, S, E, EV, scale_log2,
                               dropout_p, seed, bh, False, IS_CAUSAL, MASK_KIND, DROPOUT,
                               INPUT_PRECISION, USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_src, v_src, m_base, sk_n, sk_d, sv_n, sv_d,
                               sm_m, sm_n, rows, d, dv, lo, hi, L, S, E, EV, scale_log2,
                               dropout_p, seed, bh, True, IS_CAUSAL, MASK_KIND, DROPOUT,
                               INPUT_PRECISION, USE_TMA, BLOCK_N, BLOCK_D, BLOCK_DV)
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    # lse in natural-log units; +inf for rows with no visible key (their P is 0 in the backward)
    lse = tl.where(empty, float("inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) / LOG2E)
    if USE_TMA:
        o_desc = tl.make_tensor_descriptor(o_base, [L, EV], [so_m, 1], [BLOCK_M, BLOCK_DV])
        o_desc.store([pid_m * BLOCK_M, 0], out.to(o_desc.dtype))
    else:
        _store_tile(o_base, rows, dv, so_m, so_d, L, EV, out)
    tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=rows < L)


@triton.jit
def attention_fwd_split(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, mask_ptr,
    part_ptr,                          # fp32 (B*H, SPLITS, L, EV + 2): each split's rows
    arrivals_ptr,                      # int32 (B*H * cdiv(L, BLOCK_M),), zero; left zero
    sq_b, sq_h, sq_m, sq_d, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d,
    so_b, so_h, so_m, so_d, sm_b, sm_h, sm_m, sm_n,     # as attention_fwd's
    H, L, S, E, EV, GROUP, scale,
    KEYS,                              # keys a split owns: a multiple of BLOCK_N
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SCALE_NEGATIVE: tl.constexpr, SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """attention_fwd with the keys split (FlashDecoding): for few query tiles and many keys
    (decoding: a query or a few per head against a long cache), where one program per query
    tile would leave most SMs idle while it streams every key. Grid (SPLITS * tiles * B*H,),
    splits fastest: a program runs the online softmax over its KEYS keys (`_fwd_tiles`, the
    unmasked and masked ranges of `_key_ranges` cut to its own), writes its rows' unnormalised
    output and (m, l) to part_ptr, and counts its arrival on its query tile's counter; the
    last of the tile's SPLITS programs to arrive combines them in split order (deterministic):
    M = max_s m_s, out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s, lse as
    attention_fwd's (+inf and a zero output for a row with no visible key), and sets the
    counter back to zero. No dropout (the host uses attention_fwd for it)."""
    pid = tl.program_id(0)
    split = pid % SPLITS
    n_tiles = tl.cdiv(L, BLOCK_M)
    tile = pid // SPLITS
    pid_m = tile % n_tiles
    bh = tile // n_tiles
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    hk = h // GROUP
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    m_base = mask_ptr + b * sm_b + h * sm_h
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, rows, d, sq_m, sq_d, L, E)
    q, scale_log2, m_i, l_i, acc = _fwd_start(q, scale, SCALE_NEGATIVE, BLOCK_M, BLOCK_DV)
    lo, hi = _key_ranges(pid_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND)
    start = split * KEYS
    end = start + KEYS
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    # this split's share of the unmasked tiles [0, lo), then of the masked ones [lo, hi)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, m_base, sk_n, sk_d, sv_n,
                               sv_d, sm_m, sm_n, rows, d, dv, start, tl.minimum(end, lo), L, S,
                               E, EV, scale_log2, 0.0, 0, bh, False, IS_CAUSAL, MASK_KIND,
                               DROPOUT_OFF, INPUT_PRECISION, False, BLOCK_N, BLOCK_D, BLOCK_DV)
    acc, l_i, m_i = _fwd_tiles(acc, l_i, m_i, q, k_base, v_base, m_base, sk_n, sk_d, sv_n,
                               sv_d, sm_m, sm_n, rows, d, dv, tl.maximum(start, lo),
                               tl.minimum(end, hi), L, S, E, EV, scale_log2, 0.0, 0, bh, True,
                               IS_CAUSAL, MASK_KIND, DROPOUT_OFF, INPUT_PRECISION, False,
                               BLOCK_N, BLOCK_D, BLOCK_DV)
    # the partials: row r of split s at part[bh, s, r, :EV] (acc), [EV] (m), [EV + 1] (l)
    W = EV + 2
    part = part_ptr + (bh.to(tl.int64) * SPLITS + split) * L * W
    _store_tile(part, rows, dv, W, 1, L, EV, acc)
    tl.store(part + rows.to(tl.int64) * W + EV, m_i, mask=rows < L)
    tl.store(part + rows.to(tl.int64) * W + EV + 1, l_i, mask=rows < L)
    counter = arrivals_ptr + tile
    tl.debug_barrier()                  # every thread's partials before the arrival
    if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLITS - 1:
        plane = part_ptr + bh.to(tl.int64) * SPLITS * L * W
        r_ok = rows < L
        m_all = tl.full([BLOCK_M], float("-inf"), tl.float32)
        for s in range(0, SPLITS):
            m_s = tl.load(plane + (s * L + rows.to(tl.int64)) * W + EV, mask=r_ok,
                          other=float("-inf"), cache_modifier=".cg")
            m_all = tl.maximum(m_all, m_s)
        seen = m_all != float("-inf")
        m_safe = tl.where(seen, m_all, 0.0)
        l_all = tl.zeros([BLOCK_M], tl.float32)
        out = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for s in range(0, SPLITS):
            row_s = plane + (s * L + rows.to(tl.int64)) * W
            m_s = tl.load(row_s + EV, mask=r_ok, other=float("-inf"), cache_modifier=".cg")
            l_s = tl.load(row_s + EV + 1, mask=r_ok, other=0.0, cache_modifier=".cg")
            c = tl.math.exp2(m_s - m_safe)          # 0 for a split that saw no key
            a_s = tl.load(row_s[:, None] + dv[None, :], mask=r_ok[:, None] & (dv < EV)[None, :],
                          other=0.0, cache_modifier=".cg")
            l_all += c * l_s
            out += c[:, None] * a_s
        empty = l_all == 0.0
        out = out / tl.where(empty, 1.0, l_all)[:, None]
        lse = tl.where(empty, float("inf"),
                       (m_all + tl.math.log2(tl.where(empty, 1.0, l_all))) / LOG2E)
        _store_tile(o_ptr + b * so_b + h * so_h, rows, dv, so_m, so_d, L, EV, out)
        tl.store(lse_ptr + bh.to(tl.int64) * L + rows, lse, mask=r_ok)
        tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def attention_bwd_preprocess(
    o_ptr, do_ptr, delta_ptr, dq_acc_ptr,
    so_b, so_h, so_m, so_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    H, L, E, EV,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    ZERO_DQ: tl.constexpr = False, BLOCK_D: tl.constexpr = 16,
):
    """delta[bh, i] = sum_d dO[i, d] * O[i, d] (= sum_j P_ij dP_ij); with ZERO_DQ (the
    single-pass backward, attention_onepass.py) also the same rows of its fp32 dQ accumulator
    dq_acc (B * H, L, E) set to zero, which saves that backward a fill launch. Without it
    dq_acc_ptr and E are not read."""
    _, bh, b, h, _, rows = _query_program(H, 1, L, BLOCK_M)
    dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(o_ptr + b * so_b + h * so_h, rows, dv, so_m, so_d, L, EV).to(tl.float32)
    do = _load_tile(do_ptr + b * sdo_b + h * sdo_h, rows, dv, sdo_m, sdo_d, L, EV).to(tl.float32)
    tl.store(delta_ptr + bh.to(tl.int64) * L + rows, tl.sum(o * do, 1), mask=rows < L)
    if ZERO_DQ:
        _store_tile(dq_acc_ptr + bh.to(tl.int64) * L * E, rows, tl.arange(0, BLOCK_D), E, 1, L,
                    E, tl.zeros([BLOCK_M, BLOCK_D], tl.float32))


@triton.jit
def _dkdv_tiles(dk, dvacc, k, v, q_base, do_base, m_base, dq_base, lse_ptr, delta_ptr, sq_m,
                sq_d, sdo_m, sdo_d, sm_m, sm_n, cols, d, dv, start, end, L, S, E, EV, scale,
                scale_log2, dropout_p, seed, bh, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
                MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DQ_ATOMIC: tl.constexpr,
                INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr):
    """dV += P^T dO and dK (unscaled) += dS^T Q over query tiles [start, end) of one head;
    DQ_ATOMIC (the one-pass backward, attention_onepass.py): also dQ[rows] += dS K * scale,
    added into the fp32 (L, E) rows at dq_base with atomics."""
    for start_m in range(start, end, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, d, sq_m, sq_d, L, E)
        do = _load_tile(do_base, rows, dv, sdo_m, sdo_d, L, EV)
        lse, delta = _row_stats(lse_ptr, delta_ptr, bh, rows, L)
        # key-major tiles [BLOCK_N, BLOCK_M]: every product has the key block as its rows
        # (wgmma needs 64 rows per warp group; the query step may be 16 or 32)
        qi, kj = rows[None, :], cols[:, None]
        s_t = _scores(k, q, qi, kj, L, S, m_base, sm_m, sm_n, scale_log2, MASKED,
                      IS_CAUSAL, MASK_KIND, INPUT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)
        p_t, ds_t = _grad_tile(s_t, lse[None, :], delta[None, :], dp_t, seed, bh, qi, kj, S,
                               dropout_p, DROPOUT)
        dvacc += tl.dot(p_t.to(do.dtype), do, input_precision=INPUT_PRECISION)
        ds16 = ds_t.to(q.dtype)
        dk += tl.dot(ds16, q, input_precision=INPUT_PRECISION)
        if DQ_ATOMIC:
            dq = tl.dot(tl.trans(ds16), k, input_precision=INPUT_PRECISION) * scale
            tl.atomic_add(dq_base + rows[:, None].to(tl.int64) * E + d[None, :], dq,
                          mask=(rows[:, None] < L) & (d[None, :] < E), sem="relaxed")
    return dk, dvacc


@triton.jit
def _key_tile(k_ptr, v_ptr, HKV, sk_b, sk_h, sk_n, sk_d, sv_b, sv_h, sv_n, sv_d, S, E, EV,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """A program owning BLOCK_N keys of one (batch, K/V head), grid (cdiv(S, BLOCK_N) * B*HKV,)
    (`_tile_of_plane`): (pid_n, b, hk, cols, d, dv, its K tile, its V tile), b and hk in
    int64."""
    pid_n, bhk = _tile_of_plane(tl.cdiv(S, BLOCK_N))
    b = (bhk // HKV).to(tl.int64)
    hk = (bhk % HKV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(k_ptr + b * sk_b + hk * sk_h, cols, d, sk_n, sk_d, S, E)
    v = _load_tile(v_ptr + b * sv_b + hk * sv_h, cols, dv, sv_n, sv_d, S, EV)
    return pid_n, b, hk, cols, d, dv, k, v


@triton.jit
def _dkdv_head(dk, dvacc, k, v, q_base, do_base, m_base, dq_base, lse_ptr, delta_ptr, sq_m,
               sq_d, sdo_m, sdo_d, sm_m, sm_n, pid_n, cols, d, dv, L, S, E, EV, scale,
               scale_log2, dropout_p, seed, bh, IS_CAUSAL: tl.constexpr,
               MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr, DQ_ATOMIC: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """`_dkdv_tiles` over every query tile of one query head, for key tile pid_n: query tiles
    [0, a) see none of it (causal), [a, b) are masked (the causal diagonal), [b, c) unmasked,
    [c, L) masked (the last, partial row tile); all masked when the key tile is partial or a
    mask is given."""
    a = 0
    b = 0
    if IS_CAUSAL:
        a = (pid_n * BLOCK_N // BLOCK_M) * BLOCK_M     # rows above the tile's first key
        b = tl.cdiv(pid_n * BLOCK_N + BLOCK_N - 1, BLOCK_M) * BLOCK_M   # rows past its last key
    if MASK_KIND != MASK_NONE:
        b = L
    if (pid_n + 1) * BLOCK_N > S:
        b = L
    b = tl.minimum(tl.maximum(b, a), L)
    c = tl.maximum(b, (L // BLOCK_M) * BLOCK_M)
    dk, dvacc = _dkdv_tiles(dk, dvacc, k, v, q_base, do_base, m_base, dq_base, lse_ptr,
                            delta_ptr, sq_m, sq_d, sdo_m, sdo_d, sm_m, sm_n, cols, d, dv, a, b,
                            L, S, E, EV, scale, scale_log2, dropout_p, seed, bh, True,
                            IS_CAUSAL, MASK_KIND, DROPOUT, DQ_ATOMIC, INPUT_PRECISION, BLOCK_M)
    dk, dvacc = _dkdv_tiles(dk, dvacc, k, v, q_base, do_base, m_base, dq_base, lse_ptr,
                            delta_ptr, sq_m, sq_d, sdo_m, sdo_d, sm_m, sm_n, cols, d, dv, b, c,
                            L, S, E, EV, scale, scale_log2, dropout_p, seed, bh, False,
                            IS_CAUSAL, MASK_KIND, DROPOUT, DQ_ATOMIC, INPUT_PRECISION, BLOCK_M)
    dk, dvacc = _dkdv_tiles(dk, dvacc, k, v, q_base, do_base, m_base, dq_base, lse_ptr,
                            delta_ptr, sq_m, sq_d, sdo_m, sdo_d, sm_m, sm_n, cols, d, dv, c, L,
                            L, S, E, EV, scale, scale_log2, dropout_p, seed, bh, True,
                            IS_CAUSAL, MASK_KIND, DROPOUT, DQ_ATOMIC, INPUT_PRECISION, BLOCK_M)
    return dk, dvacc


@triton.jit(do_not_specialize=["seed"])   # a new value every call with dropout
def attention_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dk_ptr, dv_ptr,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sm_b, sm_h, sm_m, sm_n,
    sdk_b, sdk_h, sdk_n, sdk_d,        # dK strides (B, Hkv, S, E)
    sdv_b, sdv_h, sdv_n, sdv_d,        # dV strides (B, Hkv, S, Ev)
    H, HKV, L, S, E, EV, GROUP,
    scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """One K/V tile of one K/V head; sums over the GROUP query heads that read it."""
    pid_n, b, hk, cols, d, dv, k, v = _key_tile(k_ptr, v_ptr, HKV, sk_b, sk_h, sk_n, sk_d,
                                                sv_b, sv_h, sv_n, sv_d, S, E, EV, BLOCK_N,
                                                BLOCK_D, BLOCK_DV)
    scale_log2 = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = (b * H + h).to(tl.int32)
        q_base = q_ptr + b * sq_b + h * sq_h
        dk, dvacc = _dkdv_head(dk, dvacc, k, v, q_base, do_ptr + b * sdo_b + h * sdo_h,
                               mask_ptr + b * sm_b + h * sm_h, q_base, lse_ptr, delta_ptr,
                               sq_m, sq_d, sdo_m, sdo_d, sm_m, sm_n, pid_n, cols, d, dv, L, S,
                               E, EV, scale, scale_log2, dropout_p, seed, bh, IS_CAUSAL,
                               MASK_KIND, DROPOUT, False, INPUT_PRECISION, BLOCK_M, BLOCK_N)
    dk = dk * scale
    _store_tile(dk_ptr + b * sdk_b + hk * sdk_h, cols, d, sdk_n, sdk_d, S, E, dk)
    _store_tile(dv_ptr + b * sdv_b + hk * sdv_h, cols, dv, sdv_n, sdv_d, S, EV, dvacc)


@triton.jit
def _dq_tiles(dq, q, do, lse, delta, k_base, v_base, m_base, dm_base, sk_n, sk_d, sv_n, sv_d,
              sm_m, sm_n, sdm_m, sdm_n, rows, d, dv, start, end, L, S, E, EV, scale_log2,
              dropout_p, seed, bh, MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
              MASK_KIND: tl.constexpr, MASK_GRAD: tl.constexpr, DROPOUT: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ (unscaled) += dS K over key tiles [start, end); MASKED as in `_fwd_tiles`; with
    MASK_GRAD, dS is also stored (the float mask's gradient)."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, d, sk_n, sk_d, S, E)
        v = _load_tile(v_base, cols, dv, sv_n, sv_d, S, EV)
        qi, kj = rows[:, None], cols[None, :]
        s = _scores(q, k, qi, kj, L, S, m_base, sm_m, sm_n, scale_log2, MASKED,
                    IS_CAUSAL, MASK_KIND, INPUT_PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=INPUT_PRECISION)
        _, ds = _grad_tile(s, lse[:, None], delta[:, None], dp, seed, bh, qi, kj, S, dropout_p,
                           DROPOUT)
        if MASK_GRAD:
            _store_tile(dm_base, rows, cols, sdm_m, sdm_n, L, S, ds)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=INPUT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seed"])   # a new value every call with dropout
def attention_bwd_dq(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, mask_ptr, dq_ptr, dmask_ptr,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sm_b, sm_h, sm_m, sm_n,
    sdq_b, sdq_h, sdq_m, sdq_d,
    sdm_b, sdm_h, sdm_m, sdm_n,        # mask-gradient strides (B, Hq, L, S), MASK_GRAD only
    H, L, S, E, EV, GROUP,
    scale, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_GRAD: tl.constexpr = False,
):
    """One query tile: dQ = sum over K/V tiles of dS K * scale (and dS itself, MASK_GRAD)."""
    pid_m, bh, b, h, hk, rows = _query_program(H, GROUP, L, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_ptr + b * sq_b + h * sq_h, rows, d, sq_m, sq_d, L, E)
    do = _load_tile(do_ptr + b * sdo_b + h * sdo_h, rows, dv, sdo_m, sdo_d, L, EV)
    lse, delta = _row_stats(lse_ptr, delta_ptr, bh, rows, L)
    k_base = k_ptr + b * sk_b + hk * sk_h
    v_base = v_ptr + b * sv_b + hk * sv_h
    m_base = mask_ptr + b * sm_b + h * sm_h
    dm_base = dmask_ptr + b * sdm_b + h * sdm_h
    scale_log2 = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # a mask tensor makes every tile masked (lo = 0): MASK_GRAD writes every score's dS
    lo, hi = _key_ranges(pid_m, S, BLOCK_M, BLOCK_N, IS_CAUSAL, MASK_KIND)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, m_base, dm_base, sk_n, sk_d, sv_n,
                   sv_d, sm_m, sm_n, sdm_m, sdm_n, rows, d, dv, 0, lo, L, S, E, EV, scale_log2,
                   dropout_p, seed, bh, False, IS_CAUSAL, MASK_KIND, False, DROPOUT,
                   INPUT_PRECISION, BLOCK_N)
    dq = _dq_tiles(dq, q, do, lse, delta, k_base, v_base, m_base, dm_base, sk_n, sk_d, sv_n,
                   sv_d, sm_m, sm_n, sdm_m, sdm_n, rows, d, dv, lo, hi, L, S, E, EV, scale_log2,
                   dropout_p, seed, bh, True, IS_CAUSAL, MASK_KIND, MASK_GRAD, DROPOUT,
                   INPUT_PRECISION, BLOCK_N)
    dq = dq * scale
    _store_tile(dq_ptr + b * sdq_b + h * sdq_h, rows, d, sdq_m, sdq_d, L, E, dq)


@triton.jit
def attention_dropout_mask(
    keep_ptr, L, S, dropout_p, seed,
    DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Writes the keep mask the kernels above use for every (batch*head): for tests. Grid
    (cdiv(L, BLOCK_M) * B*H,)."""
    pid_m, bh = _tile_of_plane(tl.cdiv(L, BLOCK_M))
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, S, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], S, dropout_p, DROPOUT)
        tl.store(keep_ptr + (bh.to(tl.int64) * L + rows[:, None]) * S + cols[None, :],
                 keep.to(tl.int8), mask=(rows[:, None] < L) & (cols[None, :] < S))


@triton.jit(do_not_specialize=["seed"])   # a new value every call with dropout
def attention_naive_softmax(
    s_ptr, mask_ptr, p_ptr, pd_ptr,
    ss_b, ss_h, ss_m, ss_n,            # scores strides (B, H, L, S), fp32, already scaled
    sm_b, sm_h, sm_m, sm_n,            # mask strides (broadcast dims have stride 0)
    sp_b, sp_h, sp_m, sp_n,            # probabilities strides (p and pd alike)
    H, L, S, dropout_p, seed,
    IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr, DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The naive variant's middle kernel: P = softmax(scores + mask) for one row (b, h, i),
    with the flash kernels' masking rules; a row with no visible key gets zeros. With DROPOUT
    it also writes the dropped weights P' = P * keep / (1 - p) to pd (the flash kernels' keep
    pattern, `_dropout_keep`, so both algos drop the same scores for one seed); P itself is
    what the backward's softmax gradient needs."""
    row, bh = _tile_of_plane(L)         # grid (L * B*H,)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tl.full([1], row, tl.int32)
    s_base = s_ptr + b * ss_b + h * ss_h + row * ss_m
    m_base = mask_ptr + b * sm_b + h * sm_h
    m_i = tl.full([1, BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([1, BLOCK_N], tl.float32)
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _masked_scores(s_base, cols, rows, L, S, m_base, sm_m, sm_n, ss_n, IS_CAUSAL, MASK_KIND)
        m_new = tl.maximum(m_i, s, propagate_nan=tl.PropagateNan.ALL)   # NaN stays: torch's row
        seen = m_new != float("-inf")
        l_i = (l_i * tl.where(seen, tl.exp(m_i - m_new), 0.0)
               + tl.where(seen, tl.exp(s - m_new), 0.0))
        m_i = m_new
    m_row = tl.max(m_i, 1)
    l_row = tl.sum(tl.where(m_i != float("-inf"), l_i * tl.exp(m_i - m_row[:, None]), 0.0), 1)
    empty = l_row == 0.0
    m_row = tl.where(empty, 0.0, m_row)
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_row))
    row_off = b * sp_b + h * sp_h + row * sp_m
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        s = _masked_scores(s_base, cols, rows, L, S, m_base, sm_m, sm_n, ss_n, IS_CAUSAL, MASK_KIND)
        p = tl.exp(s - m_row[:, None]) * inv[:, None]
        off = row_off + cols[None, :].to(tl.int64) * sp_n
        tl.store(p_ptr + off, p.to(p_ptr.dtype.element_ty), mask=(cols < S)[None, :])
        if DROPOUT:
            keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], S, dropout_p, DROPOUT)
            tl.store(pd_ptr + off, tl.where(keep, p / (1.0 - dropout_p), 0.0).to(
                pd_ptr.dtype.element_ty), mask=(cols < S)[None, :])


@triton.jit(do_not_specialize=["seed"])
def attention_naive_dropout_bwd(
    p_ptr, dp_ptr, ds_ptr,             # (B*H*L, S) rows, contiguous: P, dP' (fp32), dS
    L, S, dropout_p, seed,
    DROPOUT: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The naive variant's softmax gradient under dropout, one row (bh, i) a program: dP' is
    the gradient of the dropped weights P' = P * keep / (1 - p), so dP = keep * dP' / (1 - p)
    (`_dropout_keep`, as the forward drew it) and dS = P * (dP - sum(P * dP))."""
    row, bh = _tile_of_plane(L)         # grid (L * B*H,)
    rows = tl.full([1], row, tl.int32)
    base = (bh.to(tl.int64) * L + row) * S
    acc = tl.zeros([1, BLOCK_N], tl.float32)
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        p, dp = _undropped_grad(p_ptr, dp_ptr, base, rows, cols, S, dropout_p, seed, bh, DROPOUT)
        acc += p * dp
    total = tl.sum(acc, 1)[:, None]
    for start in range(0, S, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        p, dp = _undropped_grad(p_ptr, dp_ptr, base, rows, cols, S, dropout_p, seed, bh, DROPOUT)
        tl.store(ds_ptr + base + cols[None, :], (p * (dp - total)).to(ds_ptr.dtype.element_ty),
                 mask=(cols < S)[None, :])


@triton.jit
def _undropped_grad(p_ptr, dp_ptr, base, rows, cols, S, dropout_p, seed, bh,
                    DROPOUT: tl.constexpr):
    """(P, dP) of a [1, BLOCK_N] slice of one row: P as stored, dP = keep * dP' / (1 - p) from
    the stored gradient dP' of the dropped weights (0 past S)."""
    inside = (cols < S)[None, :]
    p = tl.load(p_ptr + base + cols[None, :], mask=inside, other=0.0).to(tl.float32)
    dp = tl.load(dp_ptr + base + cols[None, :], mask=inside, other=0.0)
    keep = _dropout_keep(seed, bh, rows[:, None], cols[None, :], S, dropout_p, DROPOUT)
    return p, tl.where(keep, dp / (1.0 - dropout_p), 0.0)


@triton.jit
def _masked_scores(s_base, cols, rows, L, S, m_base, sm_m, sm_n, ss_n,
                   IS_CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr):
    """A [1, BLOCK_N] slice of one score row with the masks applied (-inf = hidden)."""
    s = tl.load(s_base + cols[None, :].to(tl.int64) * ss_n, mask=(cols < S)[None, :],
                other=float("-inf"))
    return _apply_masks(s, rows[:, None], cols[None, :], L, S, m_base, sm_m, sm_n, 1.0, IS_CAUSAL,
                        MASK_KIND)
