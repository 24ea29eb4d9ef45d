"""Numba CUDA kernels for softmax, log_softmax and cross-entropy, forward and backward.

Same math and layout as kernels/triton/softmax_ce.py. Every tensor arrives as an
(outer, n, inner) array of any strides (Numba arrays keep them), and row r is
a[r // inner, :, r % inner]. One block of threads handles one row at a time (grid-stride over
the rows); the threads stride over the row's columns, each keeping its own online (max m, sum s of
exp(x - m)) pair, and a shared-memory tree reduction combines the pairs, so no row length is
capped by the block size. Block size: any power of two up to MAX_THREADS.

All arithmetic is fp32 whatever the tensor dtype (see _dtypes for fp16 and bf16). Constants
are typed fp32 on purpose: an int or a Python float literal would promote the arithmetic to
fp64 on the GPU. The row reductions use shared memory and __syncthreads only, no warp
shuffles, so the kernels run unchanged in the CUDA simulator. The helpers are `device`
functions (see _device.py: inlined when compiled, plain calls in the CUDA simulator), except
the block reductions: each inlined copy of them would allocate its own shared arrays.
"""
import math

import numpy as np
from numba import cuda, float32, int32, int64

from ._device import device, trap
from ._dtypes import (  # noqa: F401  (dtype_code: for launchers)
    BF16,
    bf16_bits_to_f32,
    dtype_code,
    load_f32,
    store_f32,
)

# Largest block the shared-memory reductions hold (their arrays need a compile-time size).
MAX_THREADS = 256

NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)
NAN = np.float32(np.nan)
INF = np.float32(np.inf)
ONE = np.float32(1.0)


# --- row statistics ------------------------------------------------------------------------

@device
def _online_add(m, s, v):
    """Fold one value v into a running (max m, sum s of exp(x - m)); one exp per value.

    -inf values add nothing (exp(-inf - -inf) would be NaN); a NaN makes s NaN for good, so
    a row holding a NaN gives NaN as torch does.
    """
    if v <= m:
        if v != NEG_INF:
            s += math.exp(v - m)
    else:
        s = s * math.exp(m - v) + ONE
        m = v
    return m, float32(s)


@device
def _merge(m1, s1, m2, s2):
    """(max, sum) of the union of two parts summarised as (m1, s1) and (m2, s2)."""
    m = m1 if m2 <= m1 else m2
    if m == NEG_INF:
        # Each part is empty / all -inf (s = 0) or saw a NaN (s = NaN, and m1 = NaN loses
        # the comparison above): keep the NaN in s, where exp(-inf - -inf) would not.
        return m, s1 + s2
    return m, float32(s1 * math.exp(m1 - m) + s2 * math.exp(m2 - m))


@cuda.jit(device=True)
def _block_max_sum(m, s):
    """Combine every thread's (m, s) into the row's; every thread gets the result."""
    # One shared array per line: the simulator keys shared arrays by source line.
    shared_max = cuda.shared.array(MAX_THREADS, float32)
    shared_sum = cuda.shared.array(MAX_THREADS, float32)
    tid = cuda.threadIdx.x
    shared_max[tid] = m
    shared_sum[tid] = s
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            mm, ss = _merge(shared_max[tid], shared_sum[tid],
                            shared_max[tid + half], shared_sum[tid + half])
            shared_max[tid] = mm
            shared_sum[tid] = ss
        cuda.syncthreads()
        half //= 2
    m = shared_max[0]
    s = shared_sum[0]
    cuda.syncthreads()  # everyone has read slot 0 before a later call overwrites it
    return m, s


@cuda.jit(device=True)
def _block_sum(v):
    """Sum of every thread's v; every thread gets the result."""
    shared = cuda.shared.array(MAX_THREADS, float32)
    tid = cuda.threadIdx.x
    shared[tid] = v
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if tid < half:
            shared[tid] = shared[tid] + shared[tid + half]
        cuda.syncthreads()
        half //= 2
    total = shared[0]
    cuda.syncthreads()
    return total


@device
def _log_sum(s):
    """log(s) of a row's sum s: -inf for an all -inf row (s = 0), where the simulator's
    math.log would raise instead of returning -inf. s is >= 1 or NaN otherwise."""
    if s == ZERO:
        return NEG_INF
    return float32(math.log(s))


@device
def _row_coords(row, inner):
    """(o, i): row `row` of an (outer, n, inner) array is a[o, :, i]."""
    o = row // inner
    return o, row - o * inner


@device
def _class_weight(weight, c, has_weight, w_code):
    """Class c's weight in fp32 (weight of dtype code w_code: fp32, fp16, bf16 bits); 1
    without class weights."""
    if not has_weight:
        return ONE
    if w_code == BF16:
        return bf16_bits_to_f32(weight[c])
    return float32(weight[c])


# --- softmax / log_softmax -----------------------------------------------------------------

@cuda.jit
def softmax_fwd(x, y, inner, log, code):
    """y = softmax(x) (or log_softmax when `log`) along axis 1, one block per row.

    x:     input, (outer, n, inner) array, any strides
    y:     output, (outer, n, inner) array of x's dtype, any strides
    inner: size of axis 2 (rows = outer * inner; row r = (r // inner, r % inner))
    log:   write log_softmax instead of softmax
    code:  dtype_code of x and y (BF16: int16 arrays of bf16 bits)
    """
    tid, nthreads = cuda.threadIdx.x, cuda.blockDim.x
    n = x.shape[1]
    # grid-stride over rows: a GPU launch has one block per row; the simulator a few
    for row in range(int64(cuda.blockIdx.x), x.shape[0] * inner, cuda.gridDim.x):
        o, i = _row_coords(row, inner)
        m = NEG_INF
        s = ZERO
        for c in range(tid, n, nthreads):
            m, s = _online_add(m, s, load_f32(x, o, c, i, code))
        m, s = _block_max_sum(m, s)
        if log:
            # (x - m) - log s, not x - lse: with |x| ~ 1e4 the rounding of lse = m + log s alone
            # would cost ~5e-4 absolute, while x - m is exact near the max
            log_s = _log_sum(s)
            for c in range(tid, n, nthreads):
                store_f32(y, o, c, i, (load_f32(x, o, c, i, code) - m) - log_s, code)
        else:
            for c in range(tid, n, nthreads):
                store_f32(y, o, c, i, float32(math.exp(load_f32(x, o, c, i, code) - m)) / s, code)


@cuda.jit
def softmax_bwd(y, dy, dx, inner, log, code):
    """Gradient of softmax / log_softmax along axis 1 from its output, one block per row.

    softmax: dx = y * (dy - sum(dy * y)); log_softmax: dx = dy - exp(y) * sum(dy).

    y:     the forward's output, (outer, n, inner) array, any strides
    dy:    gradient of the loss w.r.t. y, same shape and dtype, any strides
    dx:    output: gradient w.r.t. the forward's input, same shape and dtype
    inner: size of axis 2 (rows = outer * inner)
    log:   y is log_softmax rather than softmax
    code:  dtype_code of y, dy and dx
    """
    tid, nthreads = cuda.threadIdx.x, cuda.blockDim.x
    n = y.shape[1]
    # grid-stride over rows: a GPU launch has one block per row; the simulator a few
    for row in range(int64(cuda.blockIdx.x), y.shape[0] * inner, cuda.gridDim.x):
        o, i = _row_coords(row, inner)
        acc = ZERO
        if log:
            for c in range(tid, n, nthreads):
                acc += load_f32(dy, o, c, i, code)
        else:
            for c in range(tid, n, nthreads):
                acc += load_f32(dy, o, c, i, code) * load_f32(y, o, c, i, code)
        total = _block_sum(acc)
        for c in range(tid, n, nthreads):
            yv = load_f32(y, o, c, i, code)
            g = load_f32(dy, o, c, i, code)
            if log:
                out = g - float32(math.exp(yv)) * total
            else:
                out = yv * (g - total)
            store_f32(dx, o, c, i, out, code)


# --- cross-entropy -------------------------------------------------------------------------

@device
def _logit(x, o, c, i, code, cap):
    """Logit c of a row in fp32, capped as cap tanh(x_c / cap) where cap > 0 (the loss's
    softcap: -inf becomes -cap, NaN stays NaN, as torch's composite gives)."""
    v = load_f32(x, o, c, i, code)
    if cap > 0:
        v = float32(cap * math.tanh(v / cap))
    return v


@device
def _ce_row_stats(x, o, i, code, tid, nthreads, target, target_code, weight, has_weight,
                  w_code, eps, weighted, probs, cap):
    """One row's logsumexp as (m_row, log s_row), lse = m_row + log s_row, and with `weighted`
    also the block sum of a_c (lse - x_c) and this thread's part of A = sum_c a_c (0, 0
    otherwise); every thread gets the row's values. a_c = w_c for index targets (their
    smoothing term); with `probs` a_c = w_c y'_c, y' = (1 - eps) y + eps / C, for
    class-probability targets y (the array `target`, dtype code target_code); w_c = 1 without
    has_weight; the logits capped as _logit reads them with cap > 0. The block's threads
    stride over the row's columns, one pass.

    Each thread keeps d = sum a (x - m) relative to its running max m, shifted by
    A_thread (m_new - m_old) when the max grows, and the sum is assembled from the threads'
    A (m_row - m + log s) - d, terms that are all >= 0, so huge logits (|x| ~ 1e4) do not
    cancel catastrophically. Edge rules, torch's: the shift is skipped while the thread's max
    is -inf and a -inf logit adds a * -inf (+inf, NaN when a = 0); a row whose logits are all
    -inf has NaN log-probabilities, hence a NaN sum.
    """
    n = x.shape[1]
    uniform = eps / float32(n)
    m = NEG_INF
    s = ZERO
    d = ZERO      # this thread's sum_c a_c (x_c - m), m its running max
    a_sum = ZERO  # this thread's sum_c a_c
    for c in range(tid, n, nthreads):
        v = _logit(x, o, c, i, code, cap)
        # a_c is read where each kernel read it (targets before _online_add, weights after):
        # moving either read makes NVVM compile the loop differently
        a = ZERO
        if weighted and probs:
            a = load_f32(target, o, c, i, target_code) * (ONE - eps) + uniform
            if has_weight:
                a *= _class_weight(weight, c, True, w_code)
        m_old = m
        m, s = _online_add(m, s, v)
        if weighted:
            if not probs:
                a = _class_weight(weight, c, has_weight, w_code)
            if m != m_old and m_old != NEG_INF:
                d -= a_sum * (m - m_old)
            # x_c = -inf: (x_c - m) may be NaN, but the row's term a (lse - x_c) is a * inf
            d += a * NEG_INF if v == NEG_INF else a * (v - m)
            a_sum += a
    m_row, s_row = _block_max_sum(m, s)
    log_s = _log_sum(s_row)
    total = ZERO
    if weighted:
        # sum over this thread's c of a_c (lse - x_c) = A (m_row - m + log s) - d
        part = -d
        if m != NEG_INF:
            part += a_sum * ((m_row - m) + log_s)
        total = _block_sum(part)
        if m_row == NEG_INF and n > 0:
            total = NAN
    return m_row, log_s, total, a_sum


@device
def _softmax_at(x, o, c, i, code, row_lse, cap):
    """Column c of a row, for the gradients: (x_c, p_c = exp(x_c - lse)), x_c as _logit reads
    it."""
    v = _logit(x, o, c, i, code, cap)
    return v, float32(math.exp(v - row_lse))


@cuda.jit
def cross_entropy_fwd(x, target, weight, loss, lse, row_weight, denom, inner, ignore_index,
                      smoothing, z_loss, softcap, has_weight, w_code, code, loss_code, reduce, mean,
                      arrivals, out, out_code):
    """Per-row cross-entropy over class axis 1, one block per row:
    loss = (1 - eps) w[t] (lse - x_t) + (eps / C) sum_c w[c] (lse - x_c) (+ z lse^2); 0
    where t is ignored.
    A target that is neither a class index nor ignore_index traps (on a GPU the launch fails,
    as torch's device-side assert; the simulator raises IndexError): no host check.

    x:            logits, (outer, C, inner) array, any strides
    target:       int64 (rows,) class indices; row r's target is target[r]
    weight:       (C,) class weights of dtype code w_code; unread unless has_weight
    loss:         output, (1, rows, 1) array of dtype loss_code: the row's loss (fp32 for a
                  reduction's input, the logits' dtype for reduction "none")
    lse:          output, fp32 (rows,): logsumexp of the row, for the backward
    row_weight:   output, fp32 (rows,): w[t] (1 without weights), 0 for ignored rows
    denom:        fp32 (2,): with has_weight and eps > 0, denom[1] = W = sum_c w[c], which
                  a backward's smoothing term reads (row 0's block writes it); with
                  `reduce`, denom[0] = the mean's denominator (_reduce_rows)
    inner:        size of axis 2 (rows = outer * inner)
    ignore_index: target value whose rows contribute nothing
    smoothing:    label smoothing eps in [0, 1]
    z_loss:       z >= 0: z lse^2 added to each counted row's loss (PaLM's z-loss; unweighted)
    softcap:      s > 0: the loss of the logits s tanh(x / s), capped as read (_logit); 0: x
    has_weight:   use `weight`; otherwise every class weighs 1
    w_code:       dtype_code of weight (read as it is: no fp32 copy per call)
    code:         dtype_code of x
    loss_code:    dtype_code of loss
    reduce:       reduction "sum" or "mean" (`mean`): the last block to finish sums the rows'
                  fp32 losses into out (_last_block_reduces; no second launch)
    arrivals:     int32 (1,) arrival counter, 0 before the launch and after it (reduce only)
    out:          (1, 1, 1) array of dtype out_code, the loss (reduce only)

    One pass over the logits (_ce_row_stats, which also sums the smoothing term without
    catastrophic cancellation).
    """
    tid, nthreads = cuda.threadIdx.x, cuda.blockDim.x
    n = x.shape[1]
    smooth = smoothing > 0
    eps = float32(smoothing)
    # grid-stride over rows: a GPU launch has one block per row; the simulator a few
    for row in range(int64(cuda.blockIdx.x), x.shape[0] * inner, cuda.gridDim.x):
        o, i = _row_coords(row, inner)
        m_row, log_s, smooth_sum, a_part = _ce_row_stats(x, o, i, code, tid, nthreads, x, code,
                                                         weight, has_weight, w_code, eps, smooth,
                                                         False, softcap)
        if row == 0 and has_weight and smooth:      # the whole block is at row 0
            w_all = _block_sum(a_part)
            if tid == 0:
                denom[1] = w_all
        if tid == 0:
            t = target[row]
            valid = t != ignore_index
            row_loss = ZERO
            w_t = ZERO
            if valid:
                if t < 0 or t >= n:
                    trap("cross_entropy: a target is out of range for the classes "
                         "(valid: 0..C-1, or ignore_index)")
                w_t = _class_weight(weight, t, has_weight, w_code)
                # (m - x_t) + log s rather than lse - x_t: m - x_t loses nothing for huge logits
                row_loss = w_t * ((m_row - _logit(x, o, t, i, code, softcap)) + log_s)
                if smooth:
                    row_loss = (ONE - eps) * row_loss + (eps / float32(n)) * smooth_sum
                if z_loss > 0:
                    row_lse = m_row + log_s
                    row_loss += float32(z_loss) * row_lse * row_lse
            store_f32(loss, 0, row, 0, row_loss, loss_code)
            lse[row] = m_row + log_s
            row_weight[row] = w_t
    if reduce:
        _last_block_reduces(arrivals, loss, row_weight, out, denom, mean, smoothing > 0, ONE,
                            out_code)


@device
def _reduce_rows(loss, row_weight, out, denom, mean, smoothing, scale, code):
    """The loss of reduction "sum" or "mean" from the per-row values, by one block, in a fixed
    order (deterministic): out[0, 0, 0] = sum(loss) (mean: divided by sum(row_weight),
    torch's weighted mean: NaN when no row counts; a sum: times `scale`, 1 there, 1 / rows for
    the class-probability loss's mean), rounded to dtype `code`; denom[0] = the mean's
    denominator (1 for a sum), which the backward reads. A zero denominator gives what torch's
    division gives: the sum over 0 (NaN for 0, else inf); with label `smoothing`, NaN, since
    torch divides the NLL part (a sum of zero-weight terms, 0) by it separately.

    loss:             fp32 (1, rows, 1), as the row kernels write it
    row_weight:       fp32 (rows,) (unread unless `mean`)
    out:              (1, 1, 1) array of the loss's dtype
    denom:            fp32 (1,) or more: element 0 written
    """
    tid, nthreads = cuda.threadIdx.x, cuda.blockDim.x
    part, weights = ZERO, ZERO
    for r in range(tid, loss.shape[1], nthreads):
        part += loss[0, r, 0]
        if mean:
            weights += row_weight[r]
    total = _block_sum(part)
    weights = _block_sum(weights)
    if tid == 0:
        if mean:
            # total / weights, spelled out at 0: the simulator's NumPy would warn
            if weights != ZERO:
                total = total / weights
            elif smoothing or total == ZERO or total != total:
                total = NAN
            else:
                total = total * INF
        else:
            weights = ONE
            total = total * scale
        denom[0] = weights
        store_f32(out, 0, 0, 0, total, code)


@device
def _last_block_reduces(arrivals, loss, row_weight, out, denom, mean, smoothing, scale, code):
    """After a block has written its rows: count its arrival; the last block of the grid to
    arrive sums every row (_reduce_rows) and sets the counter back to 0 for the next launch.
    The fences order each block's row stores before its arrival, and the last block's reads
    after it (the classic threadfence reduction; no-ops in the simulator, which runs the
    blocks one after another). Inlined, as _reduce_rows: a kernel that also calls
    _block_sum itself, and through a device function that is not inlined, is invalid NVVM IR
    (`python -m bench numba-resources` compiles it)."""
    last = cuda.shared.array(1, int32)
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0:
        last[0] = int32(cuda.atomic.add(arrivals, 0, 1) == cuda.gridDim.x - 1)
    cuda.syncthreads()
    if last[0] != 0:
        cuda.threadfence()
        _reduce_rows(loss, row_weight, out, denom, mean, smoothing, scale, code)
        if cuda.threadIdx.x == 0:
            arrivals[0] = 0


@cuda.jit
def cross_entropy_bwd(x, target, weight, lse, grad, grad_stride, denom, mean, dx,
                      inner, ignore_index, smoothing, softcap, z_loss, cap_input, has_weight,
                      w_code, code):
    """Gradient of the per-row cross-entropy w.r.t. the logits, one block per row:
    dx_c = g (1 - eps) w_t (p_c - [c = t]) + g (eps / C) (W p_c - w_c), p = exp(x - lse);
    rows with an ignored target get 0 p_c, whatever g is: zeros, NaN where the row's softmax
    is NaN (a NaN or +inf logit, all -inf), as torch gives (nll_loss's zero gradient through
    log_softmax's backward) and the Triton kernels do.

    x:            logits, (outer, C, inner) array, any strides
    target:       int64 (rows,) class indices
    weight:       (C,) class weights of dtype code w_code; unread unless has_weight
    lse:          fp32 (rows,) logsumexp per row, from the forward
    grad:         the upstream gradient, a (1, N, 1) array of the loss's dtype (x's); row
                  r's is grad[0, r * grad_stride, 0]
    grad_stride:  1 for per-row gradients (reduction "none"; the array carries the tensor's
                  strides), 0 to broadcast grad[0, 0, 0]
    denom:        fp32 (2,), the forward's: denom[0] the mean's denominator (_reduce_rows'),
                  read only with `mean`; denom[1] W = sum of the class weights (the forward
                  kernel's), read only with has_weight and eps > 0
    mean:         divide the upstream gradient by denom[0] (reduction "mean")
    dx:           output, (outer, C, inner) array of x's dtype, any strides
    inner:        size of axis 2 (rows = outer * inner)
    ignore_index: target value whose rows get zero gradient
    smoothing:    label smoothing eps in [0, 1]
    softcap:      s > 0: the logits are s tanh(u / s) (pydl.linear_cross_entropy's softcap),
                  and dx the gradient w.r.t. u: times 1 - (x_c / s)^2; 0: none
    z_loss:       the forward's z (its z lse^2 per counted row): + g 2 z lse p_c
    cap_input:    x holds u, capped as read (the forward's softcap); else the capped logits
    has_weight:   use `weight`; otherwise every class weighs 1 (and W = C)
    w_code:       dtype_code of weight (read as it is: no fp32 copy per call)
    code:         dtype_code of x, dx and grad
    """
    tid, nthreads = cuda.threadIdx.x, cuda.blockDim.x
    n = x.shape[1]
    # grid-stride over rows: a GPU launch has one block per row; the simulator a few
    for row in range(int64(cuda.blockIdx.x), x.shape[0] * inner, cuda.gridDim.x):
        o, i = _row_coords(row, inner)
        t = target[row]
        cap = softcap if cap_input else ZERO
        if t == ignore_index:
            row_lse = lse[row]
            for c in range(tid, n, nthreads):
                _, p = _softmax_at(x, o, c, i, code, row_lse, cap)
                store_f32(dx, o, c, i, ZERO * p, code)
            continue
        g = load_f32(grad, 0, row * grad_stride, 0, code)
        if mean:
            g = g / denom[0]
        eps = float32(smoothing)
        row_lse = lse[row]
        g_nll = g * (ONE - eps) * _class_weight(weight, t, has_weight, w_code)
        smooth = smoothing > 0
        g_smooth = g * (eps / float32(n))
        g_z = g * float32(2.0 * z_loss) * row_lse
        total_weight = denom[1] if (has_weight and smooth) else float32(n)
        for c in range(tid, n, nthreads):
            xc, p = _softmax_at(x, o, c, i, code, row_lse, cap)
            out = g_nll * (p - ONE) if c == t else g_nll * p
            if z_loss > 0:
                out += g_z * p
            if smooth:
                out += g_smooth * (total_weight * p - _class_weight(weight, c, has_weight,
                                                                    w_code))
            if softcap > 0:
                r = xc / float32(softcap)
                out *= ONE - r * r
            store_f32(dx, o, c, i, out, code)


# --- cross-entropy with class-probability targets ------------------------------------------

@cuda.jit
def cross_entropy_prob_fwd(x, target, weight, loss, lse, mass, inner, smoothing, has_weight,
                           w_code, code, target_code, loss_code, reduce, scale, arrivals, out,
                           sink, out_code):
    """Per-row cross-entropy with class-probability targets over class axis 1, one block per
    row: loss = sum_c a_c (lse - x_c), a = w y', y' = (1 - eps) y + eps / C.

    x:            logits, (outer, C, inner) array, any strides
    target:       class probabilities, (outer, C, inner) array, any strides
    weight:       (C,) class weights of dtype code w_code; unread unless has_weight
    loss:         output, (1, rows, 1): the row's loss, in dtype `loss_code` (fp32 for a
                  reduction, the loss's own dtype for "none")
    lse:          output, fp32 (rows,): logsumexp of the row, for the backward
    mass:         output, fp32 (rows,): S = sum_c a_c, for the backward
    inner:        size of axis 2 (rows = outer * inner)
    smoothing:    label smoothing eps in [0, 1]
    has_weight:   use `weight`; otherwise every class weighs 1
    w_code:       dtype_code of weight (read as it is: no fp32 copy per call)
    code:         dtype_code of x
    target_code:  dtype_code of target
    loss_code:    dtype_code of loss
    reduce:       reduction "sum" or "mean": the last block to finish sums the rows' fp32
                  losses times `scale` (1, or 1 / rows for a mean) into out, as the index
                  kernel's (its denominator into the fp32 (1,) `sink`)
    arrivals:     int32 (1,) arrival counter, 0 before the launch and after it (reduce only)
    out:          (1, 1, 1) array of dtype out_code, the loss (reduce only)

    One pass (_ce_row_stats: the index kernel's smoothing sum with a = w y', so huge logits do
    not cancel).
    """
    tid, nthreads = cuda.threadIdx.x, cuda.blockDim.x
    # grid-stride over rows: a GPU launch has one block per row; the simulator a few
    for row in range(int64(cuda.blockIdx.x), x.shape[0] * inner, cuda.gridDim.x):
        o, i = _row_coords(row, inner)
        m_row, log_s, row_loss, a_sum = _ce_row_stats(x, o, i, code, tid, nthreads, target,
                                                      target_code, weight, has_weight, w_code,
                                                      float32(smoothing), True, True, ZERO)
        row_mass = _block_sum(a_sum)
        if tid == 0:
            store_f32(loss, 0, row, 0, row_loss, loss_code)
            lse[row] = m_row + log_s
            mass[row] = row_mass
    if reduce:
        _last_block_reduces(arrivals, loss, mass, out, sink, False, False, float32(scale),
                            out_code)


@cuda.jit
def cross_entropy_prob_bwd(x, target, weight, lse, mass, grad, grad_stride, scale, dx, dtarget,
                           inner, smoothing, has_weight, w_code, target_grad, code, target_code,
                           grad_code):
    """Gradients of the per-row class-probability cross-entropy, one block per row:
    dx_c = g (p_c S - a_c), p = exp(x - lse), a = w y', S = sum_k a_k;
    with target_grad also dtarget_c = g (1 - eps) w_c (lse - x_c).

    x:            logits, (outer, C, inner) array, any strides
    target:       class probabilities, (outer, C, inner) array, any strides
    weight:       (C,) class weights of dtype code w_code; unread unless has_weight
    lse, mass:    fp32 (rows,) logsumexp and S per row, from the forward
    grad, grad_stride: the upstream gradient, as cross_entropy_bwd takes it, of dtype
                  grad_code (the loss's: the promoted dtype of x and target)
    scale:        its factor (1, or 1 / rows for the mean)
    dx:           output, (outer, C, inner) array of x's dtype
    dtarget:      output, (outer, C, inner) array of target's dtype; written only with target_grad
    inner:        size of axis 2 (rows = outer * inner)
    smoothing:    label smoothing eps in [0, 1]
    has_weight:   use `weight`; otherwise every class weighs 1
    w_code:       dtype_code of weight (read as it is: no fp32 copy per call)
    target_grad:  write dtarget
    code:         dtype_code of x and dx
    target_code:  dtype_code of target and dtarget
    grad_code:    dtype_code of grad
    """
    tid, nthreads = cuda.threadIdx.x, cuda.blockDim.x
    n = x.shape[1]
    eps = float32(smoothing)
    uniform = eps / float32(n)
    # grid-stride over rows: a GPU launch has one block per row; the simulator a few
    for row in range(int64(cuda.blockIdx.x), x.shape[0] * inner, cuda.gridDim.x):
        o, i = _row_coords(row, inner)
        g = load_f32(grad, 0, row * grad_stride, 0, grad_code) * float32(scale)
        row_lse = lse[row]
        row_mass = mass[row]
        for c in range(tid, n, nthreads):
            v, p = _softmax_at(x, o, c, i, code, row_lse, ZERO)
            w = _class_weight(weight, c, has_weight, w_code)
            a = w * (load_f32(target, o, c, i, target_code) * (ONE - eps) + uniform)
            store_f32(dx, o, c, i, g * (p * row_mass - a), code)
            if target_grad:
                store_f32(dtarget, o, c, i, g * ((ONE - eps) * w) * (row_lse - v), target_code)


@cuda.jit
def cross_entropy_prob_weight_grad(x, target, lse, grad, grad_stride, scale, dw, inner,
                                   smoothing, code, target_code, grad_code):
    """The class-probability loss's gradient w.r.t. the class weights, a thread per class
    (grid-stride): with loss_r = sum_c w_c y'_rc (lse_r - x_rc), y' = (1 - eps) y + eps / n,
    dw_c = sum_r g_r y'_rc (lse_r - x_rc), summed in fp32 in row order.

    x, target:    logits and class probabilities, (outer, C, inner) arrays, any strides
    lse:          fp32 (rows,) logsumexp per row, from the forward
    grad, grad_stride, scale: the upstream gradient as cross_entropy_prob_bwd takes it
    dw:           output, fp32 (1, C, 1)
    inner:        size of axis 2 (rows = outer * inner)
    smoothing:    label smoothing eps in [0, 1]
    code, target_code, grad_code: dtype_codes of x, target and grad
    """
    n = x.shape[1]
    eps = float32(smoothing)
    uniform = eps / float32(n)
    rows = x.shape[0] * inner
    for c in range(cuda.grid(1), n, cuda.gridsize(1)):
        acc = ZERO
        for row in range(rows):
            o, i = _row_coords(row, inner)
            g = load_f32(grad, 0, row * grad_stride, 0, grad_code) * float32(scale)
            y = load_f32(target, o, c, i, target_code) * (ONE - eps) + uniform
            acc += g * y * (lse[row] - load_f32(x, o, c, i, code))
        dw[0, c, 0] = acc
