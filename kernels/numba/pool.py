"""Numba CUDA kernels for 2-D max, average and adaptive average pooling, forward and backward.

Same semantics as kernels/triton/pool.py (see its docstring); this module mirrors it kernel for
kernel.

Layout: tensors arrive as 4-D (N, C, H, W) arrays of any strides (Numba arrays keep them), so
NCHW, channels_last and sliced inputs need no copy. One thread per output element (forward) or
per input element (backward), on a 1-D grid over the flattened elements. The flat index is
decomposed in the memory order of the tensor the launcher names (`channels_last`: c fastest,
else w fastest), so neighbouring threads touch neighbouring addresses either way.

Every kernel is a grid-stride loop: on a GPU the launcher sizes the grid to cover all elements
and each thread runs one iteration; under the CUDA simulator, where each thread is an OS thread
and starting a block costs tens of milliseconds, the launcher caps the grid and a few threads
loop over everything. Results do not depend on the grid size.

Backward passes are gathers, not scatters: a thread owns one input element and sums over the
output windows that hold it. Every input gradient is written exactly once: no atomics, no
zero-fill, deterministic for overlapping windows (stride < kernel).

Max pooling: a window is scanned row-major and an element is taken when `v > best or
isnan(v)` (torch's rule: ties keep the first maximum, the last NaN wins); best starts at -inf
with the index of the window's first non-negative row and column. Indices: INDEX_LOCAL saves
the window offset kh * KW + kw (int8 when KH * KW < 128) for training, INDEX_FLAT torch's
per-plane h * W + w (int64) for return_indices, INDEX_NONE nothing (inference).

All arithmetic is fp32 whatever the tensor dtype (see _dtypes for fp16 and bf16); index
arithmetic is int64 (Numba's integer type), so offsets of huge tensors cannot overflow.
Window sizes, strides and the like are runtime ints: one compiled kernel per dtype and
layout, not per pooling configuration.
"""
import numpy as np
from numba import cuda, float32

from ._device import device
from ._dtypes import BF16, FP16, FP32, dtype_code, load4_f32, store4_f32  # noqa: F401
from ._grid import grid_threads, thread_index
from ._index import BEFORE_ALL, unravel_nchw, window_of

INDEX_NONE = 0   # inference: no indices
INDEX_LOCAL = 1  # window offset kh * KW + kw
INDEX_FLAT = 2   # int64 h * W + w, torch's return_indices format

NEG_INF = np.float32(-np.inf)
ZERO = np.float32(0.0)


# --- helpers -------------------------------------------------------------------------------

@device
def _first_in_window(start, D):
    """The first non-negative coordinate start + k * D (torch's starting index)."""
    if start < 0:
        return start + ((-start + D - 1) // D) * D
    return start


@device
def _avg_divisor(h0, w0, H, W, PH, PW, KH, KW, divisor, count_pad):
    """torch's divisor of the window starting at (h0, w0): divisor_override if > 0; else the
    window clipped to the padded input (count_include_pad) or to the input."""
    if divisor > 0:
        return float32(divisor)
    h1 = min(h0 + KH, H + PH)
    w1 = min(w0 + KW, W + PW)
    if count_pad:
        return float32((h1 - h0) * (w1 - w0))
    return float32((min(h1, H) - max(h0, 0)) * (min(w1, W) - max(w0, 0)))


@device
def _first_window(t, K, S):
    """The first output index o >= 0 whose window [o * S, o * S + K) holds t >= 0 (t is the
    input coordinate plus the padding): ceil((t - K + 1) / S), at least 0."""
    a = t - K + 1
    if a <= 0:
        return 0
    return (a + S - 1) // S


# --- max pooling ---------------------------------------------------------------------------

@cuda.jit
def max_pool2d_fwd(x, y, idx, SH, SW, PH, PW, DH, DW, KH, KW, index_mode, channels_last, code):
    """y[n, c, oh, ow] = max of x over the window; idx = its argmax (see index_mode).

    x:             input, (N, C, H, W) array, any strides
    y:             output, (N, C, OH, OW) array of x's dtype, any strides
    idx:           output indices, (N, C, OH, OW) int8/int32 (INDEX_LOCAL) or int64
                   (INDEX_FLAT) array; unwritten with INDEX_NONE (any array then)
    SH .. DW:      stride, padding and dilation, per axis
    KH, KW:        window size
    index_mode:    INDEX_NONE, INDEX_LOCAL or INDEX_FLAT
    channels_last: order the threads with c fastest (else w fastest)
    code:          dtype_code of x and y (BF16: int16 arrays of bf16 bits)
    """
    N, C, OH, OW = y.shape
    H = x.shape[2]
    W = x.shape[3]
    for i in range(thread_index(), N * C * OH * OW, grid_threads()):
        n, c, oh, ow = unravel_nchw(i, C, OH, OW, channels_last)
        h0 = oh * SH - PH
        w0 = ow * SW - PW
        hs = _first_in_window(h0, DH)
        ws = _first_in_window(w0, DW)
        if index_mode == INDEX_FLAT:
            best_idx = hs * W + ws
        else:
            best_idx = ((hs - h0) // DH) * KW + (ws - w0) // DW
        best = NEG_INF
        for kh in range(KH):
            h = h0 + kh * DH
            if h < 0 or h >= H:
                continue
            for kw in range(KW):
                w = w0 + kw * DW
                if w < 0 or w >= W:
                    continue
                v = load4_f32(x, n, c, h, w, code)
                if v > best or v != v:
                    best = v
                    if index_mode == INDEX_FLAT:
                        best_idx = h * W + w
                    else:
                        best_idx = kh * KW + kw
        store4_f32(y, n, c, oh, ow, best, code)
        if index_mode != INDEX_NONE:
            idx[n, c, oh, ow] = best_idx


@cuda.jit
def max_pool2d_bwd(dy, idx, dx, SH, SW, PH, PW, DH, DW, KH, KW, index_mode, channels_last, code):
    """dx[n, c, h, w] = sum of dy over the windows whose argmax is (h, w).

    dy:            gradient of the output, (N, C, OH, OW) array, any strides
    idx:           the forward's indices, (N, C, OH, OW), INDEX_LOCAL or INDEX_FLAT
    dx:            output: gradient of the input, (N, C, H, W) array of dy's dtype
    SH .. KW:      as in max_pool2d_fwd
    index_mode:    INDEX_LOCAL or INDEX_FLAT, the format of idx
    channels_last: order the threads with c fastest (else w fastest)
    code:          dtype_code of dy and dx
    """
    N, C, H, W = dx.shape
    OH = dy.shape[2]
    OW = dy.shape[3]
    for i in range(thread_index(), N * C * H * W, grid_threads()):
        n, c, h, w = unravel_nchw(i, C, H, W, channels_last)
        flat = h * W + w
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
                k = idx[n, c, oh, ow]
                if index_mode == INDEX_FLAT:
                    hit = k == flat
                else:
                    hit = k == kh * KW + kw
                if hit:
                    acc += load4_f32(dy, n, c, oh, ow, code)
        store4_f32(dx, n, c, h, w, acc, code)


# --- average pooling -----------------------------------------------------------------------

@cuda.jit
def avg_pool2d_fwd(x, y, SH, SW, PH, PW, KH, KW, divisor, count_pad, channels_last, code):
    """y[n, c, oh, ow] = sum of x over the window / torch's divisor.

    x:             input, (N, C, H, W) array, any strides
    y:             output, (N, C, OH, OW) array of x's dtype, any strides
    SH .. PW:      stride and padding, per axis
    KH, KW:        window size
    divisor:       divisor_override, or 0 for torch's rule
    count_pad:     count_include_pad (torch's rule counts padded elements)
    channels_last: order the threads with c fastest (else w fastest)
    code:          dtype_code of x and y
    """
    N, C, OH, OW = y.shape
    H = x.shape[2]
    W = x.shape[3]
    for i in range(thread_index(), N * C * OH * OW, grid_threads()):
        n, c, oh, ow = unravel_nchw(i, C, OH, OW, channels_last)
        h0 = oh * SH - PH
        w0 = ow * SW - PW
        acc = ZERO
        for h in range(max(h0, 0), min(h0 + KH, H)):
            for w in range(max(w0, 0), min(w0 + KW, W)):
                acc += load4_f32(x, n, c, h, w, code)
        div = _avg_divisor(h0, w0, H, W, PH, PW, KH, KW, divisor, count_pad)
        store4_f32(y, n, c, oh, ow, acc / div, code)


@cuda.jit
def avg_pool2d_bwd(dy, dx, SH, SW, PH, PW, KH, KW, divisor, count_pad, channels_last, code):
    """dx[n, c, h, w] = sum over the windows holding (h, w) of dy / divisor.

    dy:            gradient of the output, (N, C, OH, OW) array, any strides
    dx:            output: gradient of the input, (N, C, H, W) array of dy's dtype
    others:        as in avg_pool2d_fwd
    """
    N, C, H, W = dx.shape
    OH = dy.shape[2]
    OW = dy.shape[3]
    for i in range(thread_index(), N * C * H * W, grid_threads()):
        n, c, h, w = unravel_nchw(i, C, H, W, channels_last)
        # window oh holds row h when oh * SH <= h + PH < oh * SH + KH
        oh_lo = _first_window(h + PH, KH, SH)
        oh_hi = min((h + PH) // SH, OH - 1)
        ow_lo = _first_window(w + PW, KW, SW)
        ow_hi = min((w + PW) // SW, OW - 1)
        acc = ZERO
        for oh in range(oh_lo, oh_hi + 1):
            for ow in range(ow_lo, ow_hi + 1):
                div = _avg_divisor(oh * SH - PH, ow * SW - PW, H, W, PH, PW, KH, KW, divisor,
                                   count_pad)
                acc += load4_f32(dy, n, c, oh, ow, code) / div
        store4_f32(dx, n, c, h, w, acc, code)


# --- adaptive average pooling --------------------------------------------------------------

@cuda.jit
def adaptive_avg_pool2d_fwd(x, y, channels_last, code):
    """y[n, c, oh, ow] = mean of x over rows [floor(oh H / OH), ceil((oh + 1) H / OH)),
    columns likewise.

    x:             input, (N, C, H, W) array, any strides
    y:             output, (N, C, OH, OW) array of x's dtype, any strides
    channels_last: order the threads with c fastest (else w fastest)
    code:          dtype_code of x and y
    """
    N, C, OH, OW = y.shape
    H = x.shape[2]
    W = x.shape[3]
    for i in range(thread_index(), N * C * OH * OW, grid_threads()):
        n, c, oh, ow = unravel_nchw(i, C, OH, OW, channels_last)
        h0 = (oh * H) // OH
        h1 = ((oh + 1) * H + OH - 1) // OH
        w0 = (ow * W) // OW
        w1 = ((ow + 1) * W + OW - 1) // OW
        acc = ZERO
        for h in range(h0, h1):
            for w in range(w0, w1):
                acc += load4_f32(x, n, c, h, w, code)
        store4_f32(y, n, c, oh, ow, acc / float32((h1 - h0) * (w1 - w0)), code)


@cuda.jit
def adaptive_avg_pool2d_bwd(dy, dx, channels_last, code):
    """dx[n, c, h, w] = sum over the windows holding (h, w) of dy / window area.

    dy:            gradient of the output, (N, C, OH, OW) array, any strides
    dx:            output: gradient of the input, (N, C, H, W) array of dy's dtype
    channels_last: order the threads with c fastest (else w fastest)
    code:          dtype_code of dy and dx

    Window oh holds row h iff floor(oh H / OH) <= h < ceil((oh + 1) H / OH). The first such
    oh is floor(h OH / H); window ends never decrease, so every later window that starts at
    or before h holds it too: the loops run from there until a window starts past h.
    """
    N, C, H, W = dx.shape
    OH = dy.shape[2]
    OW = dy.shape[3]
    for i in range(thread_index(), N * C * H * W, grid_threads()):
        n, c, h, w = unravel_nchw(i, C, H, W, channels_last)
        ow_first = (w * OW) // W
        acc = ZERO
        oh = (h * OH) // H
        while oh < OH:
            h0 = (oh * H) // OH
            if h0 > h:
                break
            h1 = ((oh + 1) * H + OH - 1) // OH
            ow = ow_first
            while ow < OW:
                w0 = (ow * W) // OW
                if w0 > w:
                    break
                w1 = ((ow + 1) * W + OW - 1) // OW
                acc += load4_f32(dy, n, c, oh, ow, code) / float32((h1 - h0) * (w1 - w0))
                ow += 1
            oh += 1
        store4_f32(dx, n, c, h, w, acc, code)
