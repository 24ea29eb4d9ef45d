"""Triton kernels for softmax, log_softmax and cross-entropy, forward and backward.

Every kernel sees its tensor as rows of an (outer, n, inner) view: row r = (r // inner,
r % inner) starts at (r // inner) * stride_outer + (r % inner) * stride_inner and its n
elements lie stride_n apart. So softmax over any dim, (N, C) logits of any strides and
(N, C, d1, ...) logits need no copy. One program handles a tile of BLOCK_R rows x BLOCK_N
columns; rows wider than BLOCK_N are walked in blocks with an online max/sum: each block's
row maximum joins the running maximum m, and the running sums of exp(x - m) are rescaled
by exp(m_old - m_new) once per row and block. So every element costs one exponential (a
per-element running maximum would cost two, and bound the kernel by the special-function
units instead of memory), and no row length is capped by the block size. All arithmetic is
fp32 whatever the input dtype.

When SINGLE is set (n <= BLOCK_N) a row is loaded once and kept in registers; otherwise the
forward makes one pass for the statistics and one to write, reading the row twice (the
second read mostly from L2: a program re-reads the row it has just streamed).

Cross-entropy with index targets can write the gradient in its forward (GRAD), as
Liger-Kernel does, but into its own buffer (the logits are the caller's): the backward then
only multiplies it by the upstream gradient, and not even that when the upstream gradient
is 1, a loss's own backward (cross_entropy_scale_grad). Its sum and mean reductions are
finished in the kernel: each program leaves its rows' partial sums, and the last program
to arrive (an atomic counter; no program waits) adds them in program order, so the result
is deterministic, and writes the reduced loss; so are those of the class-probability
loss, whose programs leave one partial sum each.
"""
import triton
import triton.language as tl

from .gemm import _tanh

NEG_INF = tl.constexpr(float("-inf"))
# cross-entropy reductions (pydl/_softmax_ce_triton.py passes them: REDUCTION_CODES)
REDUCE_NONE = tl.constexpr(0)
REDUCE_SUM = tl.constexpr(1)
REDUCE_MEAN = tl.constexpr(2)


@triton.jit
def _row_starts(row0, n_rows, inner, stride_outer, stride_inner, BLOCK_R: tl.constexpr):
    """Offsets (int64) of the BLOCK_R rows that start at row0, and which of them exist."""
    rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
    offsets = (rows // inner) * stride_outer + (rows % inner) * stride_inner
    return rows, offsets, rows < n_rows


@triton.jit
def _rescaled_sum(m, m_new, s, x):
    """The lanes' running sums s ([BLOCK_R, BLOCK_N]) of exp(x - m) moved from the rows'
    old max m to their new max m_new ([BLOCK_R] each) and a block x (-inf where absent)
    added: one exponential per element, one per row to rescale. A row that has seen only
    -inf keeps s = 0 (exp(-inf - -inf) would be NaN)."""
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    return s * tl.exp(m - m_safe)[:, None] + tl.exp(x - m_safe[:, None])


@triton.jit
def _block_update(m, s, x):
    """Fold a [BLOCK_R, BLOCK_N] block x (-inf where absent) into the rows' running max m
    and the lanes' running sums s of exp(x - m) (_rescaled_sum)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    return m_new, _rescaled_sum(m, m_new, s, x)


@triton.jit
def _col_block(start, cols, n, rmask):
    """Columns c = start + cols of a tile: (c, c < n, the tile mask of existing rows x columns)."""
    c = start + cols
    cmask = c < n
    return c, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _col_offsets(c, stride):
    """The [1, BLOCK_N] offsets of columns c along rows of this stride, in int64: each factor
    fits int32 but their product may not (a softmax over a dim whose stride is large, as a
    dim-0 softmax of a (3, 2**30) tensor: 2 * 2**30 wrapped to a negative offset)."""
    return c[None, :].to(tl.int64) * stride


@triton.jit
def _load_block(ptr, row_off, c, stride, mask, other):
    """The [BLOCK_R, BLOCK_N] tile at columns c of the rows starting at row_off, in fp32."""
    return tl.load(ptr + row_off[:, None] + _col_offsets(c, stride), mask=mask,
                   other=other).to(tl.float32)


@triton.jit
def _capped(x, SOFTCAP: tl.constexpr, CAP_INPUT: tl.constexpr):
    """Logits as the loss reads them: with CAP_INPUT, s tanh(x / s) (SOFTCAP s > 0; -inf
    becomes -s, NaN stays NaN, as torch's composite gives); x itself otherwise."""
    if CAP_INPUT:
        x = SOFTCAP * _tanh(x * (1.0 / SOFTCAP))
    return x


@triton.jit
def _load_logits(ptr, row_off, c, stride, mask, other, SOFTCAP: tl.constexpr,
                 CAP_INPUT: tl.constexpr):
    """_load_block of logits, capped with CAP_INPUT (`other` where the mask is off)."""
    x = _load_block(ptr, row_off, c, stride, mask, other)
    if CAP_INPUT:
        x = tl.where(mask, _capped(x, SOFTCAP, CAP_INPUT), other)
    return x


@triton.jit
def _store_block(ptr, row_off, c, stride, value, mask):
    """Store a tile as _load_block reads it, in the tensor's dtype."""
    tl.store(ptr + row_off[:, None] + _col_offsets(c, stride), value.to(ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _class_weights(weight_ptr, c, cmask, HAS_WEIGHT: tl.constexpr):
    """The class weights w_c as a [1, BLOCK_N] row (0 past the last class); 1.0 without weights."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        w = 1.0
    return w


@triton.jit
def _ce_update(m, s, d, al, x, a, mask, WEIGHTED: tl.constexpr, PROBS: tl.constexpr):
    """One column block x (-inf where absent) of the rows' cross-entropy statistics:
    _block_update's max m and sums s, and with WEIGHTED the lane sums d = sum_c a_c (x_c - m)
    (relative to the row's running max, shifted exactly when it grows: d -= A_lane (m_new -
    m_old)) and al = sum_c a_c of the weights a (placeholders without). Keeping d relative to
    the max means huge logits do not cancel catastrophically in the smoothing sum. Edge rules,
    torch's: the shift is skipped while a row's max is -inf (d then holds only the a * -inf of
    -inf logits) and a -inf logit adds a * -inf (an inf loss where a > 0, NaN where a = 0)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    if WEIGHTED:
        shift = tl.where((m == NEG_INF)[:, None], 0.0, al * (m_new - m)[:, None])
        term = tl.where(x == NEG_INF, a * NEG_INF, a * (x - m_new[:, None]))
        d = d - shift + tl.where(mask, term, 0.0)
        al += tl.where(mask, a, 0.0)
    return m_new, _rescaled_sum(m, m_new, s, x), d, al


@triton.jit
def _ce_finish(m, s, d, al, n, WEIGHTED: tl.constexpr, PROBS: tl.constexpr):
    """Per row from _ce_update's state: (log s, sum_c a_c (lse - x_c) = A log s - D, and
    A = sum_c a_c), with lse = m + log s; the last two are placeholders without WEIGHTED. A
    row whose n > 0 logits are all -inf has NaN log-probabilities, hence a NaN sum (torch's)."""
    log_s = tl.log(tl.sum(s, 1))
    total = log_s
    mass = log_s
    if WEIGHTED:
        mass = tl.sum(al, 1)
        dsum = tl.sum(d, 1)
        # A (lse - m) - D: (m - m) + log s keeps log s's digits when |m| is large
        total = tl.where(m == NEG_INF, 0.0, mass * log_s) - dsum
        total = tl.where((m == NEG_INF) & (n > 0), float("nan"), total)
    return log_s, total, mass


@triton.jit
def _ce_row_stats(
    x_ptr, x_off, sx_n, y_ptr, y_off, sy_n, weight_ptr, n, rmask, smoothing,
    HAS_WEIGHT: tl.constexpr,
    WEIGHTED: tl.constexpr,                 # also return sum_c a_c (lse - x_c) and A = sum_c a_c
    PROBS: tl.constexpr,                    # a = w y' (class-probability targets y); else a = w
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One pass over the logits of BLOCK_R rows (x_off from _row_starts): per row the max
    m_row and log s_row (lse = m_row + log s_row), and with WEIGHTED also sum_c a_c (lse - x_c)
    and A = sum_c a_c (placeholders without). a_c = w_c for index targets (their smoothing
    term); with PROBS a_c = w_c y'_c, y' = (1 - eps) y + eps / C for class-probability targets
    y read at y_ptr, y_off, sy_n. w_c = 1 without HAS_WEIGHT."""
    cols = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_R], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    d = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    al = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for start in range(0, n, BLOCK_N):
        c, cmask, mask = _col_block(start, cols, n, rmask)
        x = _load_block(x_ptr, x_off, c, sx_n, mask, NEG_INF)
        a = _smoothing_weights(y_ptr, y_off, sy_n, weight_ptr, c, cmask, mask, n, smoothing,
                               HAS_WEIGHT, WEIGHTED, PROBS)
        m, s, d, al = _ce_update(m, s, d, al, x, a, mask, WEIGHTED, PROBS)
    log_s, total, mass = _ce_finish(m, s, d, al, n, WEIGHTED, PROBS)
    return m, log_s, total, mass


@triton.jit
def _smoothing_weights(y_ptr, y_off, sy_n, weight_ptr, c, cmask, mask, n, smoothing,
                       HAS_WEIGHT: tl.constexpr, WEIGHTED: tl.constexpr, PROBS: tl.constexpr):
    """The weights a_c of _ce_row_stats' sums for a column block (1.0 when not WEIGHTED)."""
    a = 1.0
    if WEIGHTED:
        if PROBS:
            a = _load_block(y_ptr, y_off, c, sy_n, mask, 0.0) * (1.0 - smoothing) + smoothing / n
            if HAS_WEIGHT:
                a = a * _class_weights(weight_ptr, c, cmask, HAS_WEIGHT)
        else:
            a = _class_weights(weight_ptr, c, cmask, HAS_WEIGHT)
    return a


@triton.jit
def _softmax_block(x_ptr, x_off, sx_n, lse, weight_ptr, start, cols, n, rmask,
                   HAS_WEIGHT: tl.constexpr, SOFTCAP: tl.constexpr = 0.0,
                   CAP_INPUT: tl.constexpr = False):
    """A column block of the rows' softmax, for the gradient kernels: (c, tile mask, x,
    p = exp(x - lse), the class weights w as _class_weights gives them); lse: [BLOCK_R, 1].
    x capped as _capped does with CAP_INPUT."""
    c, cmask, mask = _col_block(start, cols, n, rmask)
    x = _load_logits(x_ptr, x_off, c, sx_n, mask, 0.0, SOFTCAP, CAP_INPUT)
    return c, mask, x, tl.exp(x - lse), _class_weights(weight_ptr, c, cmask, HAS_WEIGHT)


@triton.jit
def _trap_if(bad):
    """Abort the kernel where `bad` holds (PTX trap), as torch's device-side assert does: the
    error surfaces at the next synchronisation. GPU only (the interpreter has no PTX)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.s32 p, $1, 0; @p trap; mov.u32 $0, 0; }",
                              "=r,r", [bad.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _arrive_last(arrivals_ptr):
    """Count this program's arrival (after every thread's stores before it; acq_rel at GPU
    scope) and say whether it is the last of the grid's programs to arrive."""
    tl.debug_barrier()
    arrived = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu")
    return arrived == tl.num_programs(0) - 1


@triton.jit
def _sum_parts(parts_ptr, count, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
    """sum over i < count of parts_ptr[i * STRIDE] (fp32), in a fixed order (blocks of BLOCK,
    then a tree): deterministic. The loads bypass L1 (.cg): other programs wrote them."""
    acc = tl.zeros([BLOCK], tl.float32)
    for i0 in range(0, count, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(parts_ptr + i.to(tl.int64) * STRIDE, mask=i < count, other=0.0,
                       cache_modifier=".cg")
    return tl.sum(acc, 0)


@triton.jit
def softmax_fwd(
    x_ptr, y_ptr,
    n_rows, n, inner,                       # rows = outer * inner; n = length of each row
    sx_outer, sx_n, sx_inner,               # strides of x's (outer, n, inner) view
    sy_outer, sy_n, sy_inner,               # strides of y's (outer, n, inner) view
    LOG: tl.constexpr,                      # write log_softmax instead of softmax
    SINGLE: tl.constexpr,                   # n <= BLOCK_N: one load per row
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    y_off = (rows // inner) * sy_outer + (rows % inner) * sy_inner
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = rmask[:, None] & (cols < n)[None, :]
        x = _load_block(x_ptr, x_off, cols, sx_n, mask, NEG_INF)
        m = tl.max(x, 1)
        e = tl.exp(x - m[:, None])
        s = tl.sum(e, 1)
        if LOG:
            # (x - m) - log s, not x - lse: lse = m + log s rounds away log s when |m| is large
            y = (x - m[:, None]) - tl.log(s)[:, None]
        else:
            y = e / s[:, None]
        _store_block(y_ptr, y_off, cols, sy_n, y, mask)
    else:
        m_row = tl.full([BLOCK_R], NEG_INF, tl.float32)
        s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            x = _load_block(x_ptr, x_off, c, sx_n, mask, NEG_INF)
            m_row, s = _block_update(m_row, s, x)
        s_row = tl.sum(s, 1)
        log_s = tl.log(s_row)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            x = _load_block(x_ptr, x_off, c, sx_n, mask, NEG_INF)
            if LOG:
                y = (x - m_row[:, None]) - log_s[:, None]
            else:
                y = tl.exp(x - m_row[:, None]) / s_row[:, None]
            _store_block(y_ptr, y_off, c, sy_n, y, mask)


@triton.jit
def softmax_bwd(
    y_ptr, dy_ptr, dx_ptr,
    n_rows, n, inner,
    sy_outer, sy_n, sy_inner,               # strides of the saved output y
    sdy_outer, sdy_n, sdy_inner,            # strides of the incoming gradient
    sdx_outer, sdx_n, sdx_inner,            # strides of the gradient written
    LOG: tl.constexpr, SINGLE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, y_off, rmask = _row_starts(row0, n_rows, inner, sy_outer, sy_inner, BLOCK_R)
    dy_off = (rows // inner) * sdy_outer + (rows % inner) * sdy_inner
    dx_off = (rows // inner) * sdx_outer + (rows % inner) * sdx_inner
    cols = tl.arange(0, BLOCK_N)
    if SINGLE:
        mask = rmask[:, None] & (cols < n)[None, :]
        y = _load_block(y_ptr, y_off, cols, sy_n, mask, 0.0)
        dy = _load_block(dy_ptr, dy_off, cols, sdy_n, mask, 0.0)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, 1)[:, None]
        else:
            dx = y * (dy - tl.sum(dy * y, 1)[:, None])
        _store_block(dx_ptr, dx_off, cols, sdx_n, dx, mask)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            dy = _load_block(dy_ptr, dy_off, c, sdy_n, mask, 0.0)
            if LOG:
                acc += dy
            else:
                y = _load_block(y_ptr, y_off, c, sy_n, mask, 0.0)
                acc += dy * y
        total = tl.sum(acc, 1)[:, None]
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            y = _load_block(y_ptr, y_off, c, sy_n, mask, 0.0)
            dy = _load_block(dy_ptr, dy_off, c, sdy_n, mask, 0.0)
            if LOG:
                dx = dy - tl.exp(y) * total
            else:
                dx = y * (dy - total)
            _store_block(dx_ptr, dx_off, c, sdx_n, dx, mask)


@triton.jit
def cross_entropy_fwd(
    x_ptr, target_ptr, weight_ptr,          # logits (outer, C, inner) view; targets (rows,);
                                            # weights (C,)
    loss_ptr,                               # REDUCE_NONE: the per-row losses, in their dtype
    lse_ptr,                                # fp32 per-row logsumexp, for a backward from the logits
    out_ptr, denom_ptr,                     # sum / mean: the reduced loss (0-d, in its dtype);
                                            # fp32 (2,): [0] the mean's denominator, read with
                                            # GRAD (made by cross_entropy_mean_denominator),
                                            # else written; [1] written with weights and
                                            # smoothing: the sum of the class weights
    parts_ptr, arrivals_ptr,                # sum / mean: 2 fp32 per program; a zero counter
    dx_ptr,                                 # GRAD: the reduced loss's gradient w.r.t. the logits
    n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    sdx_outer, sdx_n, sdx_inner,
    ignore_index, smoothing,                # label_smoothing eps
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    REDUCTION: tl.constexpr,                # REDUCE_NONE / REDUCE_SUM / REDUCE_MEAN
    PARTS_BLOCK: tl.constexpr,              # the last program sums the partials this many at a time
    GRAD: tl.constexpr,                     # also write the gradient (sum and mean only)
    CHECK_TARGETS: tl.constexpr,            # trap on a target out of range (GPU)
    IN_PLACE: tl.constexpr,                 # GRAD: dx is x itself (its memory overwritten)
    SINGLE: tl.constexpr,                   # n <= BLOCK_N: the row stays in registers
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr = 0.0,            # x = s tanh(u / s): GRAD's gradient w.r.t. u
    Z_LOSS: tl.constexpr = 0.0,             # z: each counted row's loss + z lse^2 (no weights)
    CAP_INPUT: tl.constexpr = False,        # x_ptr holds u: the kernel caps it as it reads
                                            # (pydl.cross_entropy's softcap); else x itself
):
    """loss = (1 - eps) w[t] (lse - x_t) + (eps / C) sum_c w[c] (lse - x_c) (+ z lse^2); 0
    where t is ignored. Reductions: per-row losses (none), or their sum, or the sum over the summed
    weights w[t] of the rows that count (mean), finished by the last program to arrive.

    With GRAD, the gradient of the reduced loss is written too: dx_c = r ((1 - eps) w_t
    (p_c - [c = t]) + (eps / C) (W p_c - w_c)), p = softmax(x), W = sum_c w_c, r = 1 (sum) or
    1 / denominator (mean; 0 for ignored rows). SINGLE rows are read once (the gradient from
    the exponentials already in registers); wider rows twice, the statistics first.
    """
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    t = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    hit = valid & (t >= 0) & (t < n)        # never read outside the row
    # A target outside [0, n): its loss is NaN and, with CHECK_TARGETS, the kernel stops as
    # torch's device-side assert does (no host synchronisation).
    bad = valid & ~hit
    if CHECK_TARGETS:
        _trap_if(bad)
    t_safe = tl.where(hit, t, 0)
    cols = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_R], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    d = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    al = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    if SINGLE:
        # from zero sums, s comes back as exp(x - m) itself: the gradient's numerators
        c, cmask, mask = _col_block(0, cols, n, rmask)
        x = _load_logits(x_ptr, x_off, c, sx_n, mask, NEG_INF, SOFTCAP, CAP_INPUT)
        a = _smoothing_weights(x_ptr, x_off, sx_n, weight_ptr, c, cmask, mask, n, smoothing,
                               HAS_WEIGHT, HAS_SMOOTHING, False)
        m, s, d, al = _ce_update(m, s, d, al, x, a, mask, HAS_SMOOTHING, False)
    else:
        for start in range(0, n, BLOCK_N):
            c, cmask, mask = _col_block(start, cols, n, rmask)
            x = _load_logits(x_ptr, x_off, c, sx_n, mask, NEG_INF, SOFTCAP, CAP_INPUT)
            a = _smoothing_weights(x_ptr, x_off, sx_n, weight_ptr, c, cmask, mask, n,
                                   smoothing, HAS_WEIGHT, HAS_SMOOTHING, False)
            m, s, d, al = _ce_update(m, s, d, al, x, a, mask, HAS_SMOOTHING, False)
    log_s, smooth, w_sum = _ce_finish(m, s, d, al, n, HAS_SMOOTHING, False)
    if HAS_WEIGHT and HAS_SMOOTHING:
        # W = sum_c w_c, the same in every row: the smoothing term of a separate backward
        # reads it there (denom_ptr[1]); row 0's program writes it
        tl.store(denom_ptr + 1 + rows * 0, w_sum, mask=rows == 0)
    x_t = _capped(tl.load(x_ptr + x_off + t_safe.to(tl.int64) * sx_n, mask=hit,
                          other=0.0).to(tl.float32), SOFTCAP, CAP_INPUT)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_safe, mask=hit, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    # lse - x as (m - x) + log s keeps log s's digits when |m| is large
    loss = w_t * ((m - x_t) + log_s)
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + (smoothing / n) * smooth
    lse = m + log_s
    if Z_LOSS > 0.0:
        loss += Z_LOSS * lse * lse
    loss = tl.where(hit, loss, tl.where(bad, float("nan"), 0.0))
    tl.store(lse_ptr + rows, lse, mask=rmask)
    if REDUCTION == REDUCE_NONE:
        tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=rmask)
    if GRAD:
        if IN_PLACE:
            # every warp's reads of x above (the statistics, x_t: another warp may own the
            # target's column) before any warp overwrites x with the gradient; below, each
            # thread stores only elements it has just loaded itself
            tl.debug_barrier()
        r = 1.0
        if REDUCTION == REDUCE_MEAN:
            r = 1.0 / tl.load(denom_ptr)
        g = tl.where(hit, r, 0.0)
        g_nll = (g * (1.0 - smoothing) * w_t)[:, None]
        g_smooth = (g * (smoothing / n))[:, None]
        g_z = (g * (2.0 * Z_LOSS) * lse)[:, None]
        if HAS_WEIGHT:
            w_sum = w_sum[:, None]                      # sum_c w_c: the smoothing sum's A
        else:
            w_sum = n * 1.0
        dx_off = (rows // inner) * sdx_outer + (rows % inner) * sdx_inner
        if SINGLE:
            p = s * (1.0 / tl.sum(s, 1))[:, None]
            w = _class_weights(weight_ptr, c, cmask, HAS_WEIGHT)
            _store_block(dx_ptr, dx_off, c, sdx_n, _uncapped(
                _ce_grad(p, c, t, w, w_sum, g_nll, g_smooth, g_z, HAS_SMOOTHING, Z_LOSS), x,
                SOFTCAP), mask)
        else:
            for start in range(0, n, BLOCK_N):
                c, mask, x, p, w = _softmax_block(x_ptr, x_off, sx_n, lse[:, None], weight_ptr,
                                                  start, cols, n, rmask, HAS_WEIGHT, SOFTCAP,
                                                  CAP_INPUT)
                _store_block(dx_ptr, dx_off, c, sdx_n, _uncapped(
                    _ce_grad(p, c, t, w, w_sum, g_nll, g_smooth, g_z, HAS_SMOOTHING, Z_LOSS),
                    x, SOFTCAP), mask)
    if REDUCTION != REDUCE_NONE:
        pid = tl.program_id(0)
        tl.store(parts_ptr + 2 * pid, tl.sum(loss, 0))
        tl.store(parts_ptr + 2 * pid + 1, tl.sum(w_t, 0))
        if _arrive_last(arrivals_ptr):
            total = _sum_parts(parts_ptr, tl.num_programs(0), 2, PARTS_BLOCK)
            if REDUCTION == REDUCE_MEAN:
                if GRAD:
                    denom = tl.load(denom_ptr)
                else:
                    denom = _sum_parts(parts_ptr + 1, tl.num_programs(0), 2, PARTS_BLOCK)
                    tl.store(denom_ptr, denom)
                total = total / denom
                if HAS_SMOOTHING:
                    # torch divides the NLL part (0 when the weights of the rows that count
                    # sum to 0) by the denominator on its own: 0 / 0
                    total = tl.where(denom == 0.0, float("nan"), total)
            tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
            tl.atomic_xchg(arrivals_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _uncapped(dx, x, SOFTCAP: tl.constexpr):
    """The gradient dx w.r.t. logits x = s tanh(u / s) (SOFTCAP s > 0: made so by the GEMM that
    wrote them, pydl.linear_cross_entropy's softcap, or by _capped as read) as the gradient
    w.r.t. u: dx (1 - (x / s)^2); dx itself without a cap."""
    if SOFTCAP > 0.0:
        r = x * (1.0 / SOFTCAP)
        dx = dx * (1.0 - r * r)
    return dx


@triton.jit
def _ce_grad(p, c, t, w, w_sum, g_nll, g_smooth, g_z, HAS_SMOOTHING: tl.constexpr,
             Z_LOSS: tl.constexpr):
    """The logits' gradient of a column block: g_nll (p_c - [c = t]) + g_smooth (W p_c - w_c)
    (+ g_z p_c, the z-loss's: g 2 z lse p_c)."""
    dx = g_nll * (p - tl.where(c[None, :] == t[:, None], 1.0, 0.0))
    if HAS_SMOOTHING:
        dx += g_smooth * (w_sum * p - w)
    if Z_LOSS > 0.0:
        dx += g_z * p
    return dx


@triton.jit
def cross_entropy_mean_denominator(
    target_ptr, weight_ptr,                 # targets (rows,); weights (C,)
    denom_ptr,                              # fp32 0-d: sum over rows that count of w[t]
    parts_ptr, arrivals_ptr,                # 1 fp32 per program; a zero counter
    n_rows, n, ignore_index,
    HAS_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, PARTS_BLOCK: tl.constexpr,
):
    """The mean reduction's denominator, from the targets alone, before the forward that
    scales its gradient by it (8 bytes a row: a short kernel); the last program to arrive
    sums the programs' partial sums in order."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    rmask = rows < n_rows
    t = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    if HAS_WEIGHT:
        hit = valid & (t >= 0) & (t < n)
        w = tl.load(weight_ptr + tl.where(hit, t, 0), mask=hit, other=0.0).to(tl.float32)
    else:
        w = tl.where(valid, 1.0, 0.0)
    tl.store(parts_ptr + tl.program_id(0), tl.sum(w, 0))
    if _arrive_last(arrivals_ptr):
        tl.store(denom_ptr, _sum_parts(parts_ptr, tl.num_programs(0), 1, PARTS_BLOCK))
        tl.atomic_xchg(arrivals_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def cross_entropy_scale_grad(dx_ptr, g_ptr, target_ptr, numel, n, inner, st, ignore_index,
                             IGNORE: tl.constexpr,      # class-index targets (with ignored rows)
                             BLOCK: tl.constexpr, SUB: tl.constexpr):
    """dx *= g in place (dx contiguous, x's shape: rows of n classes, inner apart), g the 0-d
    upstream gradient of a reduced loss on the device; where g == 1 (a loss's own backward)
    every program returns at once, so a gradient written by the forward costs the backward
    nothing. An ignored row's gradient stays what the forward wrote whatever g is, as
    torch's (0 p_c: zeros, NaN where the row's softmax is; never times g): where g is not
    finite (IGNORE: index targets; the class-probability loss has no ignored row) each
    element's row reads its target (row stride st), SUB elements at a time (the 64-bit row
    arithmetic of a whole BLOCK took every register). A grid-stride loop: a few programs per
    multiprocessor cover any size."""
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        step = tl.num_programs(0).to(tl.int64) * BLOCK
        first = tl.program_id(0).to(tl.int64) * BLOCK
        if IGNORE:
            if tl.abs(g) < float("inf"):                # False for NaN too
                _scale_blocks(dx_ptr, g, first, numel, step, BLOCK)
            else:
                for start in range(first, numel, step):
                    for sub in tl.static_range(0, BLOCK, SUB):
                        i = start + sub + tl.arange(0, SUB)
                        ok = i < numel
                        v = tl.load(dx_ptr + i, mask=ok, other=0.0).to(tl.float32)
                        row = (i // (n * inner)) * inner + i % inner
                        t = tl.load(target_ptr + row * st, mask=ok, other=0)
                        v = tl.where(t == ignore_index, v, v * g)
                        tl.store(dx_ptr + i, v.to(dx_ptr.dtype.element_ty), mask=ok)
        else:
            _scale_blocks(dx_ptr, g, first, numel, step, BLOCK)


@triton.jit
def _scale_blocks(dx_ptr, g, first, numel, step, BLOCK: tl.constexpr):
    """dx *= g over the blocks of BLOCK elements from `first`, `step` apart."""
    for start in range(first, numel, step):
        i = start + tl.arange(0, BLOCK)
        ok = i < numel
        v = tl.load(dx_ptr + i, mask=ok, other=0.0).to(tl.float32) * g
        tl.store(dx_ptr + i, v.to(dx_ptr.dtype.element_ty), mask=ok)


@triton.jit
def cross_entropy_bwd(
    x_ptr, target_ptr, weight_ptr, lse_ptr,
    grad_ptr,                               # upstream gradient per row (grad_stride 0: a 0-d one)
    denom_ptr,                              # the forward's fp32 (2,): [0] with MEAN the mean's
                                            # denominator (divides g); [1] with weights and
                                            # smoothing the sum of the class weights
    dx_ptr,
    grad_stride, n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    sdx_outer, sdx_n, sdx_inner,
    ignore_index, smoothing,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr = 0.0,            # x = s tanh(u / s): the gradient w.r.t. u
    Z_LOSS: tl.constexpr = 0.0,             # z: the forward's z lse^2, its gradient g 2 z lse p_c
    CAP_INPUT: tl.constexpr = False,        # x_ptr holds u, capped as read (cross_entropy_fwd's)
):
    """dx_c = g (1 - eps) w_t (p_c - [c = t]) + g (eps / C) (W p_c - w_c), p = exp(x - lse);
    one pass over the logits; rows with an ignored target get g = 0, hence zeros (NaN where
    the logits hold NaN, as torch gives). The backward when the forward did not write the
    gradient (per-row losses, a second backward, torch.compile)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    dx_off = (rows // inner) * sdx_outer + (rows % inner) * sdx_inner
    t = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    hit = valid & (t >= 0) & (t < n)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(grad_ptr + rows * grad_stride, mask=rmask, other=0.0).to(tl.float32)
    if MEAN:
        g = g / tl.load(denom_ptr)
    g = tl.where(hit, g, 0.0)               # an out-of-range target has no gradient to give
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + tl.where(hit, t, 0), mask=hit, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    g_nll = (g * (1.0 - smoothing) * w_t)[:, None]
    g_smooth = (g * (smoothing / n))[:, None]
    g_z = (g * (2.0 * Z_LOSS) * lse)[:, None]
    w_sum = n * 1.0
    if HAS_SMOOTHING and HAS_WEIGHT:
        w_sum = tl.load(denom_ptr + 1)
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, n, BLOCK_N):
        c, mask, x, p, w = _softmax_block(x_ptr, x_off, sx_n, lse[:, None], weight_ptr, start, cols,
                                          n, rmask, HAS_WEIGHT, SOFTCAP, CAP_INPUT)
        _store_block(dx_ptr, dx_off, c, sdx_n, _uncapped(
            _ce_grad(p, c, t, w, w_sum, g_nll, g_smooth, g_z, HAS_SMOOTHING, Z_LOSS), x,
            SOFTCAP), mask)


# --- cross-entropy with class-probability targets --------------------------------------------

@triton.jit
def cross_entropy_prob_fwd(
    x_ptr, y_ptr, weight_ptr,               # logits and targets (outer, C, inner) views;
                                            # weights (C,)
    loss_ptr,                               # the loss: per row (REDUCE off), else the reduced
                                            # one (0-d)
    stats_ptr,                              # fp32: per row lse, then S = sum_c w_c y'_c
    arrivals_ptr,                           # REDUCE: the grid's arrival counter (left at 0)
    parts_ptr,                              # REDUCE: fp32 scratch, a partial sum per program
    dx_ptr,                                 # GRAD: the loss's gradient w.r.t. the logits
    n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    sy_outer, sy_n, sy_inner,               # strides of the target's view (its own dtype)
    sdx_outer, sdx_n, sdx_inner,
    smoothing,                              # label_smoothing eps: y' = (1 - eps) y + eps / C
    scale,                                  # REDUCE: the loss is scale * sum of the rows' losses
    HAS_WEIGHT: tl.constexpr, REDUCE: tl.constexpr, PARTS_BLOCK: tl.constexpr,
    GRAD: tl.constexpr,                     # also write the gradient (REDUCE only)
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """loss = sum_c a_c (lse - x_c) with a = w y', y' = (1 - eps) y + eps / C.

    Single pass over logits and targets: _ce_row_stats, the sum of the index kernel's smoothing
    term with a = w y' (logits of 1e4 do not cancel; a -inf logit gives an inf loss where a > 0,
    NaN where a = 0, as torch gives). stats holds the rows' lse at [0, n_rows) and S at
    [n_rows, 2 n_rows), what the backward reads. REDUCE (a sum, or a mean with scale = 1 / rows):
    each program leaves its rows' sum at parts[program], and the last program to arrive adds
    them in program order (deterministic) and writes the loss. GRAD (training):
    the gradient for an upstream gradient of 1, scale (p_c S - a_c), from a second pass over
    the rows (from L2: the program has just streamed them), so the backward only scales it.
    """
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    y_off = (rows // inner) * sy_outer + (rows % inner) * sy_inner
    m_row, log_s, loss, mass = _ce_row_stats(x_ptr, x_off, sx_n, y_ptr, y_off, sy_n, weight_ptr, n,
                                             rmask, smoothing, HAS_WEIGHT, True, True,
                                             BLOCK_R, BLOCK_N)
    tl.store(stats_ptr + rows, m_row + log_s, mask=rmask)
    tl.store(stats_ptr + n_rows + rows, mass, mask=rmask)
    if GRAD:
        dx_off = (rows // inner) * sdx_outer + (rows % inner) * sdx_inner
        _prob_grad_rows(x_ptr, x_off, sx_n, y_ptr, y_off, sy_n, weight_ptr,
                        (m_row + log_s)[:, None], mass[:, None], scale, n, rmask, smoothing,
                        dx_ptr, dx_off, sdx_n, dx_ptr, dx_off, sdx_n, HAS_WEIGHT, False, BLOCK_N)
    if REDUCE:
        tl.store(parts_ptr + tl.program_id(0), tl.sum(tl.where(rmask, loss, 0.0), 0))
        if _arrive_last(arrivals_ptr):
            total = _sum_parts(parts_ptr, tl.num_programs(0), 1, PARTS_BLOCK) * scale
            tl.store(loss_ptr, total.to(loss_ptr.dtype.element_ty))
            tl.atomic_xchg(arrivals_ptr, 0, sem="relaxed", scope="gpu")
    else:
        tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=rmask)


@triton.jit
def cross_entropy_prob_bwd(
    x_ptr, y_ptr, weight_ptr,
    stats_ptr,                              # the forward's: per row lse, then S
    grad_ptr,                               # upstream gradient per row (grad_stride 0: a scalar)
    dx_ptr, dy_ptr,                         # gradients w.r.t. logits and targets (dy:
                                            # TARGET_GRAD only)
    grad_stride, grad_scale,                # the gradient is multiplied by grad_scale
    n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    sy_outer, sy_n, sy_inner,
    sdx_outer, sdx_n, sdx_inner,
    sdy_outer, sdy_n, sdy_inner,
    smoothing,
    HAS_WEIGHT: tl.constexpr, TARGET_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx_c = g (p_c S - a_c) with p = exp(x - lse), a = w y', S = sum_k a_k (saved by the
    forward); with TARGET_GRAD also dy_c = g (1 - eps) w_c (lse - x_c). One pass."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    y_off = (rows // inner) * sy_outer + (rows % inner) * sy_inner
    dx_off = (rows // inner) * sdx_outer + (rows % inner) * sdx_inner
    lse = tl.load(stats_ptr + rows, mask=rmask, other=0.0)[:, None]
    mass = tl.load(stats_ptr + n_rows + rows, mask=rmask, other=0.0)[:, None]
    g = (tl.load(grad_ptr + rows * grad_stride, mask=rmask, other=0.0).to(tl.float32)
         * grad_scale)[:, None]
    dy_off = 0
    if TARGET_GRAD:
        dy_off = (rows // inner) * sdy_outer + (rows % inner) * sdy_inner
    _prob_grad_rows(x_ptr, x_off, sx_n, y_ptr, y_off, sy_n, weight_ptr, lse, mass, g, n, rmask,
                    smoothing, dx_ptr, dx_off, sdx_n, dy_ptr, dy_off, sdy_n, HAS_WEIGHT,
                    TARGET_GRAD, BLOCK_N)


@triton.jit
def _prob_grad_rows(x_ptr, x_off, sx_n, y_ptr, y_off, sy_n, weight_ptr, lse, mass, g, n, rmask,
                    smoothing, dx_ptr, dx_off, sdx_n, dy_ptr, dy_off, sdy_n,
                    HAS_WEIGHT: tl.constexpr, TARGET_GRAD: tl.constexpr, BLOCK_N: tl.constexpr):
    """The class-probability loss's gradients of BLOCK_R rows ((BLOCK_R, 1) lse, S and the
    factor g), a column block at a time: dx_c = g (p_c S - a_c), p = exp(x - lse), a = w y';
    with TARGET_GRAD also dy_c = g (1 - eps) w_c (lse - x_c)."""
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, n, BLOCK_N):
        c, mask, x, p, w = _softmax_block(x_ptr, x_off, sx_n, lse, weight_ptr, start, cols, n,
                                          rmask, HAS_WEIGHT)
        a = w * (_load_block(y_ptr, y_off, c, sy_n, mask, 0.0) * (1.0 - smoothing) + smoothing / n)
        _store_block(dx_ptr, dx_off, c, sdx_n, g * (p * mass - a), mask)
        if TARGET_GRAD:
            _store_block(dy_ptr, dy_off, c, sdy_n, g * ((1.0 - smoothing) * w) * (lse - x), mask)


@triton.jit
def cross_entropy_prob_weight_grad(
    x_ptr, y_ptr,
    stats_ptr,                              # the forward's: per row lse, then S
    grad_ptr,                               # upstream gradient per row (grad_stride 0: a scalar)
    dw_ptr,                                 # (n,) contiguous, the class weight's dtype
    grad_stride, grad_scale,
    n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    sy_outer, sy_n, sy_inner,
    smoothing,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The class-probability loss's gradient w.r.t. the class weights: with
    loss_r = sum_c w_c y'_rc (lse_r - x_rc) and y' = (1 - eps) y + eps / n,
    dw_c = sum_r g_r y'_rc (lse_r - x_rc). A program owns BLOCK_N classes and walks every
    row in blocks of BLOCK_R, summing in fp32 in row order: deterministic, no atomics."""
    c = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = c < n
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for row0 in range(0, n_rows, BLOCK_R):
        rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
        y_off = (rows // inner) * sy_outer + (rows % inner) * sy_inner
        mask = rmask[:, None] & cmask[None, :]
        lse = tl.load(stats_ptr + rows, mask=rmask, other=0.0)[:, None]
        g = (tl.load(grad_ptr + rows * grad_stride, mask=rmask, other=0.0).to(tl.float32)
             * grad_scale)[:, None]
        x = _load_block(x_ptr, x_off, c, sx_n, mask, 0.0)
        y = _load_block(y_ptr, y_off, c, sy_n, mask, 0.0) * (1.0 - smoothing) + smoothing / n
        acc += tl.sum(tl.where(mask, g * y * (lse - x), 0.0), 0)
    tl.store(dw_ptr + c, acc.to(dw_ptr.dtype.element_ty), mask=cmask)
