"""Triton kernels for softmax, log_softmax and cross-entropy, forward and backward.

Every kernel sees its tensor as rows of an (outer, n, inner) view: row r = (r // inner,
r % inner) starts at (r // inner) * stride_outer + (r % inner) * stride_inner and its n
elements lie stride_n apart. So softmax over any dim, (N, C) logits of any strides and
(N, C, d1, ...) logits need no copy. One program handles a tile of BLOCK_R rows x BLOCK_N
columns; rows wider than BLOCK_N are walked in blocks with an online max/sum (the row's
running maximum m and the sum s of exp(x - m), rescaled by exp(m_old - m_new) when m grows),
so no row length is capped by the block size. All arithmetic is fp32 whatever the input dtype.

When SINGLE is set (n <= BLOCK_N) a row is loaded once and kept in registers; otherwise the
forward makes one pass for the statistics and one to write, reading the row twice.
"""
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _row_starts(row0, n_rows, inner, stride_outer, stride_inner, BLOCK_R: tl.constexpr):
    """Offsets (int64) of the BLOCK_R rows that start at row0, and which of them exist."""
    rows = row0 + tl.arange(0, BLOCK_R).to(tl.int64)
    offsets = (rows // inner) * stride_outer + (rows % inner) * stride_inner
    return rows, offsets, rows < n_rows


@triton.jit
def _online_update(m, s, x):
    """Fold a block x into per-lane running max m and rescaled sum s.

    A lane that has only seen -inf keeps m = -inf and s = 0 (exp(-inf - -inf) would be NaN).
    The max propagates NaN (a GPU's default max drops it; Triton's interpreter keeps it): a
    lane that saw a NaN keeps m = s = NaN, so the row gives NaN as in torch.
    """
    m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
    seen = m_new != NEG_INF
    alpha = tl.where(seen, tl.exp(m - m_new), 0.0)
    p = tl.where(seen, tl.exp(x - m_new), 0.0)
    return m_new, s * alpha + p


@triton.jit
def _lanes_to_row(m, s):
    """Combine per-lane (m, s) of a [BLOCK_R, BLOCK_N] tile into per-row (max, sum)."""
    m_row = tl.max(m, 1)
    s_row = tl.sum(tl.where(m != NEG_INF, s * tl.exp(m - m_row[:, None]), 0.0), 1)
    return m_row, s_row


@triton.jit
def _col_block(start, cols, n, rmask):
    """Columns c = start + cols of a tile: (c, c < n, the tile mask of existing rows x columns)."""
    c = start + cols
    cmask = c < n
    return c, cmask, rmask[:, None] & cmask[None, :]


@triton.jit
def _load_block(ptr, row_off, c, stride, mask, other):
    """The [BLOCK_R, BLOCK_N] tile at columns c of the rows starting at row_off, in fp32."""
    return tl.load(ptr + row_off[:, None] + c[None, :] * stride, mask=mask, other=other).to(tl.float32)


@triton.jit
def _store_block(ptr, row_off, c, stride, value, mask):
    """Store a tile as _load_block reads it, in the tensor's dtype."""
    tl.store(ptr + row_off[:, None] + c[None, :] * stride, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _class_weights(weight_ptr, c, cmask, HAS_WEIGHT: tl.constexpr):
    """The class weights w_c as a [1, BLOCK_N] row (0 past the last class); 1.0 without weights."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + c, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        w = 1.0
    return w


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
    y read at y_ptr, y_off, sy_n. w_c = 1 without HAS_WEIGHT.

    Each lane keeps the online (m, s) of _online_update and d = sum a (x - m_lane) relative to
    its own running max, shifted exactly when the max grows (d -= A_lane (m_new - m_old)), and
    the sum is assembled as sum_lanes [A_lane (lse - m_lane) - d_lane], so huge logits do not
    cancel catastrophically. Edge rules, torch's: the shift is skipped while a lane's max is
    -inf and a -inf logit adds a * -inf (an inf loss where a > 0, NaN where a = 0); a row
    whose logits are all -inf has NaN log-probabilities, hence a NaN sum.
    """
    cols = tl.arange(0, BLOCK_N)
    m = tl.full([BLOCK_R, BLOCK_N], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    d = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)   # sum_c a_c (x_c - m_lane)
    al = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)  # sum_c a_c per lane
    for start in range(0, n, BLOCK_N):
        c, cmask, mask = _col_block(start, cols, n, rmask)
        x = _load_block(x_ptr, x_off, c, sx_n, mask, NEG_INF)
        if WEIGHTED:
            if PROBS:
                a = _load_block(y_ptr, y_off, c, sy_n, mask, 0.0) * (1.0 - smoothing) + smoothing / n
                if HAS_WEIGHT:
                    a = a * _class_weights(weight_ptr, c, cmask, HAS_WEIGHT)
            else:
                a = _class_weights(weight_ptr, c, cmask, HAS_WEIGHT)
            m_new = tl.maximum(m, x, propagate_nan=tl.PropagateNan.ALL)
            # a lane whose max was -inf holds only -inf logits so far: d already has their a * -inf
            shift = tl.where(m == NEG_INF, 0.0, al * (m_new - m))
            term = tl.where(x == NEG_INF, a * NEG_INF, a * (x - m_new))
            d = d - shift
            d += tl.where(mask, term, 0.0)
            al += tl.where(mask, a, 0.0)
        m, s = _online_update(m, s, x)
    m_row, s_row = _lanes_to_row(m, s)
    log_s = tl.log(s_row)
    total = log_s
    if WEIGHTED:
        # (m_row - m) + log s rather than lse - m keeps log s's digits when |m| is large
        lane = tl.where(m == NEG_INF, 0.0, al * ((m_row[:, None] - m) + log_s[:, None])) - d
        total = tl.where((m_row == NEG_INF) & (n > 0), float("nan"), tl.sum(lane, 1))
    return m_row, log_s, total, tl.sum(al, 1)


@triton.jit
def _softmax_block(x_ptr, x_off, sx_n, lse, weight_ptr, start, cols, n, rmask,
                   HAS_WEIGHT: tl.constexpr):
    """A column block of the rows' softmax, for the gradient kernels: (c, tile mask, x,
    p = exp(x - lse), the class weights w as _class_weights gives them); lse: [BLOCK_R, 1]."""
    c, cmask, mask = _col_block(start, cols, n, rmask)
    x = _load_block(x_ptr, x_off, c, sx_n, mask, 0.0)
    return c, mask, x, tl.exp(x - lse), _class_weights(weight_ptr, c, cmask, HAS_WEIGHT)


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
        x = tl.load(x_ptr + x_off[:, None] + cols[None, :] * sx_n, mask=mask,
                    other=NEG_INF).to(tl.float32)
        m = tl.max(x, 1)
        e = tl.exp(x - m[:, None])
        s = tl.sum(e, 1)
        if LOG:
            # (x - m) - log s, not x - lse: lse = m + log s rounds away log s when |m| is large
            y = (x - m[:, None]) - tl.log(s)[:, None]
        else:
            y = e / s[:, None]
        tl.store(y_ptr + y_off[:, None] + cols[None, :] * sy_n,
                 y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_R, BLOCK_N], NEG_INF, tl.float32)
        s = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            x = tl.load(x_ptr + x_off[:, None] + c[None, :] * sx_n, mask=mask,
                        other=NEG_INF).to(tl.float32)
            m, s = _online_update(m, s, x)
        m_row, s_row = _lanes_to_row(m, s)
        log_s = tl.log(s_row)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            x = tl.load(x_ptr + x_off[:, None] + c[None, :] * sx_n, mask=mask,
                        other=NEG_INF).to(tl.float32)
            if LOG:
                y = (x - m_row[:, None]) - log_s[:, None]
            else:
                y = tl.exp(x - m_row[:, None]) / s_row[:, None]
            tl.store(y_ptr + y_off[:, None] + c[None, :] * sy_n,
                     y.to(y_ptr.dtype.element_ty), mask=mask)


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
        y = tl.load(y_ptr + y_off[:, None] + cols[None, :] * sy_n, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + dy_off[:, None] + cols[None, :] * sdy_n, mask=mask, other=0.0).to(tl.float32)
        if LOG:
            dx = dy - tl.exp(y) * tl.sum(dy, 1)[:, None]
        else:
            dx = y * (dy - tl.sum(dy * y, 1)[:, None])
        tl.store(dx_ptr + dx_off[:, None] + cols[None, :] * sdx_n, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            dy = tl.load(dy_ptr + dy_off[:, None] + c[None, :] * sdy_n, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                acc += dy
            else:
                y = tl.load(y_ptr + y_off[:, None] + c[None, :] * sy_n, mask=mask, other=0.0).to(tl.float32)
                acc += dy * y
        total = tl.sum(acc, 1)[:, None]
        for start in range(0, n, BLOCK_N):
            c = start + cols
            mask = rmask[:, None] & (c < n)[None, :]
            y = tl.load(y_ptr + y_off[:, None] + c[None, :] * sy_n, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + dy_off[:, None] + c[None, :] * sdy_n, mask=mask, other=0.0).to(tl.float32)
            if LOG:
                dx = dy - tl.exp(y) * total
            else:
                dx = y * (dy - total)
            tl.store(dx_ptr + dx_off[:, None] + c[None, :] * sdx_n, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def cross_entropy_fwd(
    x_ptr, target_ptr, weight_ptr,          # logits (outer, C, inner) view; targets (rows,); weights (C,)
    loss_ptr, lse_ptr, row_weight_ptr,      # fp32 outputs per row: loss, logsumexp, w[target] (0 if ignored)
    n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    ignore_index, smoothing,                # label_smoothing eps
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
    CHECK_TARGETS: tl.constexpr,            # trap on a target out of range (GPU)
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """loss = (1 - eps) w[t] (lse - x_t) + (eps / C) sum_c w[c] (lse - x_c); 0 where t is ignored.

    Single pass over the logits (_ce_row_stats, which also sums the smoothing term without
    catastrophic cancellation); probabilities are never written.
    """
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    t = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    # A target outside [0, n) is never read (its loss is NaN) and, with CHECK_TARGETS, stops
    # the kernel as torch's device-side assert does (no host synchronisation).
    bad = valid & ((t < 0) | (t >= n))
    if CHECK_TARGETS:
        _trap_if(bad)
    valid = valid & ~bad
    t_safe = tl.where(valid, t, 0)
    m_row, log_s, smooth, _ = _ce_row_stats(x_ptr, x_off, sx_n, x_ptr, x_off, sx_n, weight_ptr, n,
                                            rmask, smoothing, HAS_WEIGHT, HAS_SMOOTHING, False,
                                            BLOCK_R, BLOCK_N)
    x_t = tl.load(x_ptr + x_off + t_safe.to(tl.int64) * sx_n, mask=valid, other=0.0).to(tl.float32)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + t_safe, mask=valid, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    # lse - x as (m - x) + log s keeps log s's digits when |m| is large
    loss = w_t * ((m_row - x_t) + log_s)
    if HAS_SMOOTHING:
        loss = (1.0 - smoothing) * loss + (smoothing / n) * smooth
    loss = tl.where(valid, loss, tl.where(bad, float("nan"), 0.0))
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=rmask)
    tl.store(lse_ptr + rows, m_row + log_s, mask=rmask)
    tl.store(row_weight_ptr + rows, w_t, mask=rmask)


@triton.jit
def _trap_if(bad):
    """Abort the kernel where `bad` holds (PTX trap), as torch's device-side assert does: the
    error surfaces at the next synchronisation. GPU only (the interpreter has no PTX)."""
    tl.inline_asm_elementwise("{ .reg .pred p; setp.ne.s32 p, $1, 0; @p trap; mov.u32 $0, 0; }",
                              "=r,r", [bad.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def loss_reduce(
    loss_ptr, row_weight_ptr,               # fp32 per row: loss, and the weight the mean divides by
    out_ptr, denom_ptr,                     # out: the reduced loss (its dtype); denom: fp32 divisor
    n_rows, scale,
    BY_WEIGHT: tl.constexpr,                # out = scale * sum(loss) / sum(row_weight); else no divide
    BLOCK: tl.constexpr,
):
    """The sum or mean of the per-row losses in one program, rows in a fixed order (the same
    result every run), written in the output's dtype: what would otherwise be three or four
    small torch kernels after the loss kernel."""
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    wacc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_rows, BLOCK):
        r = start + cols
        acc += tl.load(loss_ptr + r, mask=r < n_rows, other=0.0)
        if BY_WEIGHT:
            wacc += tl.load(row_weight_ptr + r, mask=r < n_rows, other=0.0)
    total = tl.sum(acc, 0) * scale
    if BY_WEIGHT:
        denom = tl.sum(wacc, 0)
        total = total / denom
        tl.store(denom_ptr, denom)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))


@triton.jit
def cross_entropy_bwd(
    x_ptr, target_ptr, weight_ptr, lse_ptr,
    grad_ptr,                               # upstream gradient per row (grad_stride 0: a scalar)
    denom_ptr,                              # 0-d fp32 the gradient is divided by (DIVIDE only)
    weight_sum_ptr,                         # 0-d fp32: sum of the class weights (smoothing only)
    dx_ptr,
    grad_stride, n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    sdx_outer, sdx_n, sdx_inner,
    ignore_index, smoothing,
    HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, DIVIDE: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dx_c = g (1 - eps) w_t (p_c - [c = t]) + g (eps / C) (W p_c - w_c), p = exp(x - lse);
    one pass over the logits; rows with an ignored target get g = 0, hence zeros (NaN where
    the logits hold NaN, as torch gives)."""
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    dx_off = (rows // inner) * sdx_outer + (rows % inner) * sdx_inner
    t = tl.load(target_ptr + rows, mask=rmask, other=ignore_index)
    valid = rmask & (t != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    g = tl.load(grad_ptr + rows * grad_stride, mask=rmask, other=0.0).to(tl.float32)
    if DIVIDE:
        g = g / tl.load(denom_ptr)
    valid = valid & (t >= 0) & (t < n)      # an out-of-range target has no gradient to give
    g = tl.where(valid, g, 0.0)
    if HAS_WEIGHT:
        w_t = tl.load(weight_ptr + tl.where(valid, t, 0), mask=valid, other=0.0).to(tl.float32)
    else:
        w_t = tl.where(valid, 1.0, 0.0)
    g_nll = (g * (1.0 - smoothing) * w_t)[:, None]
    if HAS_SMOOTHING:
        g_smooth = (g * (smoothing / n))[:, None]
        if HAS_WEIGHT:
            w_sum = tl.load(weight_sum_ptr).to(tl.float32)
        else:
            w_sum = n * 1.0
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, n, BLOCK_N):
        c, mask, x, p, w = _softmax_block(x_ptr, x_off, sx_n, lse[:, None], weight_ptr, start, cols,
                                          n, rmask, HAS_WEIGHT)
        dx = g_nll * (p - tl.where(c[None, :] == t[:, None], 1.0, 0.0))
        if HAS_SMOOTHING:
            dx += g_smooth * (w_sum * p - w)
        _store_block(dx_ptr, dx_off, c, sdx_n, dx, mask)


# --- cross-entropy with class-probability targets --------------------------------------------

@triton.jit
def cross_entropy_prob_fwd(
    x_ptr, y_ptr, weight_ptr,               # logits and targets (outer, C, inner) views; weights (C,)
    loss_ptr, lse_ptr, mass_ptr,            # fp32 outputs per row: loss, logsumexp, sum_c w_c y'_c
    n_rows, n, inner,
    sx_outer, sx_n, sx_inner,
    sy_outer, sy_n, sy_inner,               # strides of the target's view (its own dtype)
    smoothing,                              # label_smoothing eps: y' = (1 - eps) y + eps / C
    HAS_WEIGHT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """loss = sum_c a_c (lse - x_c) with a = w y', y' = (1 - eps) y + eps / C (stored in
    loss's dtype).

    Single pass over logits and targets: _ce_row_stats, the sum of the index kernel's smoothing
    term with a = w y' (logits of 1e4 do not cancel; a -inf logit gives an inf loss where a > 0,
    NaN where a = 0, as torch gives).
    """
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    rows, x_off, rmask = _row_starts(row0, n_rows, inner, sx_outer, sx_inner, BLOCK_R)
    y_off = (rows // inner) * sy_outer + (rows % inner) * sy_inner
    m_row, log_s, loss, mass = _ce_row_stats(x_ptr, x_off, sx_n, y_ptr, y_off, sy_n, weight_ptr, n,
                                             rmask, smoothing, HAS_WEIGHT, True, True,
                                             BLOCK_R, BLOCK_N)
    tl.store(loss_ptr + rows, loss.to(loss_ptr.dtype.element_ty), mask=rmask)
    tl.store(lse_ptr + rows, m_row + log_s, mask=rmask)
    tl.store(mass_ptr + rows, mass, mask=rmask)


@triton.jit
def cross_entropy_prob_bwd(
    x_ptr, y_ptr, weight_ptr, lse_ptr, mass_ptr,
    grad_ptr,                               # upstream gradient per row (grad_stride 0: a scalar)
    dx_ptr, dy_ptr,                         # gradients w.r.t. logits and targets (dy: TARGET_GRAD only)
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
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)[:, None]
    mass = tl.load(mass_ptr + rows, mask=rmask, other=0.0)[:, None]
    g = (tl.load(grad_ptr + rows * grad_stride, mask=rmask, other=0.0).to(tl.float32)
         * grad_scale)[:, None]
    if TARGET_GRAD:
        dy_off = (rows // inner) * sdy_outer + (rows % inner) * sdy_inner
    cols = tl.arange(0, BLOCK_N)
    for start in range(0, n, BLOCK_N):
        c, mask, x, p, w = _softmax_block(x_ptr, x_off, sx_n, lse, weight_ptr, start, cols, n, rmask,
                                          HAS_WEIGHT)
        a = w * (_load_block(y_ptr, y_off, c, sy_n, mask, 0.0) * (1.0 - smoothing) + smoothing / n)
        _store_block(dx_ptr, dx_off, c, sdx_n, g * (p * mass - a), mask)
        if TARGET_GRAD:
            _store_block(dy_ptr, dy_off, c, sdy_n, g * ((1.0 - smoothing) * w) * (lse - x), mask)
