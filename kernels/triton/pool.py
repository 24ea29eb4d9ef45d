"""Triton kernels for 2-D max, average and adaptive average pooling, forward and backward.

Layout: every kernel takes explicit (N, C, H, W) strides for each tensor, so NCHW,
channels_last and sliced inputs need no copy. A program owns a tile of BLOCK_S spatial
positions x BLOCK_C channels of one image (grid: spatial blocks, channel blocks, batch); the
launcher picks a wide BLOCK_S for NCHW (W is the contiguous axis) and a wide BLOCK_C for
channels_last (C is contiguous), so loads are coalesced either way.

Backward passes are gathers, not scatters: a program owns a tile of INPUT positions and, for
each kernel offset (kh, kw), finds the one output window that holds the element at that offset
(if any). Every input gradient is written exactly once: no atomics, no zero-fill, deterministic
for overlapping windows (stride < kernel). The max and average pools' backward works on cells:
cell (i, j) holds the SH x SW inputs (SH i + rh, SW j + rw), one per stride phase. Within a
phase a kernel offset reaches every cell's window (i + qh, j + qw), one shift, or none; stride,
padding and dilation are constexprs, so this is settled at compile time, without a branch or a
division per element. A program loads the grad_out and argmax tiles of each shift once (the
average pool: grad_out over each window's divisor), all before its first store (a store may
alias a later load for all the compiler knows, which would put each load's wait in a row), and
writes every phase of its cells; for W-contiguous layouts (NCHW, the _planar kernels) the loads
and stores run along W in memory order.

Max pooling's backward needs the argmax of each window. Training without return_indices saves
it as a one-byte window offset kh * KW + kw (INDEX_LOCAL), an eighth of torch's int64 flat
index; return_indices=True writes torch's flat per-plane index h * W + w (INDEX_FLAT) and the
backward uses that. Recomputing the argmax from the input in the backward would re-read up to
KH * KW windows per element, costlier than one byte per output.

Max semantics are torch's: a window is scanned row-major and an element is taken when
`v > best or isnan(v)` (ties keep the first maximum, the last NaN wins); best starts at -inf
with the index of the window's first non-negative row and column, so an all -inf window
reports that element.
"""
import triton
import triton.language as tl

from ._index import pixel_offsets

INDEX_NONE = tl.constexpr(0)   # inference: no indices
INDEX_LOCAL = tl.constexpr(1)  # window offset kh * KW + kw (int8 when KH * KW < 128)
INDEX_FLAT = tl.constexpr(2)   # int64 h * W + w, torch's return_indices format
AVERAGE = tl.constexpr(3)      # the cell backward of average pooling: every window counts


@triton.jit
def _tile(BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, A, B, C):
    """This program's tile of an (N, C, A, B) tensor: the spatial positions (a, b) (BLOCK_S of
    them, b fastest), the BLOCK_C channels c, the image n, and the [BLOCK_S, BLOCK_C] mask."""
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(2).to(tl.int64)
    return s // B, s % B, c, n, (s < A * B)[:, None] & (c < C)[None, :]


@triton.jit
def _adaptive_window(o, I, O):
    """[start, end) of adaptive window o over I inputs and O outputs: floor(o I / O) and
    ceil((o + 1) I / O)."""
    return (o * I) // O, ((o + 1) * I + O - 1) // O


@triton.jit
def _first_in_window(start, D):
    """The first non-negative coordinate start + k * D (torch's starting index)."""
    return tl.where(start < 0, start + ((-start + D - 1) // D) * D, start)


@triton.jit
def _max_start(h0, w0, W, DH, DW, KW: tl.constexpr, INDEX_MODE: tl.constexpr):
    """The index a window reports before any element is taken (an all -inf window keeps it):
    that of its first non-negative row and column, h0 / w0 its first coordinates."""
    hf = _first_in_window(h0, DH)
    wf = _first_in_window(w0, DW)
    if INDEX_MODE == INDEX_FLAT:
        return hf * W + wf
    return ((hf - h0) // DH) * KW + (wf - w0) // DW


@triton.jit
def _window_take(best, best_idx, v, index, MODE: tl.constexpr):
    """One window element v into the running (best, best_idx) of a window. Max pooling, in
    the input's dtype (compares and max are exact in any dtype; 16-bit values two lanes an
    instruction), v -inf where masked: the value a NaN-propagating max, and with an index
    torch's rule, v taken when v > best or isnan(v) (ties keep the first, the last NaN wins:
    the value the max gives then too), `index` its index. AVERAGE: an fp32 sum, v 0 where
    masked."""
    if MODE == AVERAGE:
        best += v.to(tl.float32)
    else:
        if MODE != INDEX_NONE:
            take = (v > best) | (v != v)
            best_idx = tl.where(take, index, best_idx)
        best = tl.maximum(best, v, propagate_nan=tl.PropagateNan.ALL)
    return best, best_idx


@triton.jit
def max_pool2d_fwd(
    x_ptr, y_ptr, idx_ptr,
    C, H, W, OH, OW,
    sx_n, sx_c, sx_h, sx_w,            # input strides
    sy_n, sy_c, sy_h, sy_w,            # output strides (indices use the same)
    SH, SW, PH, PW, DH, DW,            # stride, padding, dilation
    KH: tl.constexpr, KW: tl.constexpr,
    INDEX_MODE: tl.constexpr,          # INDEX_NONE / INDEX_LOCAL / INDEX_FLAT
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Any layout (_pool_fwd). W-contiguous layouts take max_pool2d_fwd_planar."""
    _pool_fwd(x_ptr, y_ptr, idx_ptr, C, H, W, OH, OW, sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h,
              sy_w, SH, SW, PH, PW, DH, DW, KH, KW, INDEX_MODE, True, 0, BLOCK_S, BLOCK_C)


@triton.jit
def avg_pool2d_fwd(
    x_ptr, y_ptr,
    C, H, W, OH, OW,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    SH, SW, PH, PW,
    DIVISOR,                           # divisor_override, or 0 for torch's rule
    KH: tl.constexpr, KW: tl.constexpr, COUNT_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Any layout (_pool_fwd). W-contiguous layouts take avg_pool2d_fwd_planar."""
    _pool_fwd(x_ptr, y_ptr, y_ptr, C, H, W, OH, OW, sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h,
              sy_w, SH, SW, PH, PW, 1, 1, KH, KW, AVERAGE, COUNT_PAD, DIVISOR, BLOCK_S,
              BLOCK_C)


@triton.jit
def _pool_fwd(
    x_ptr, y_ptr, idx_ptr, C, H, W, OH, OW, sx_n, sx_c, sx_h, sx_w, sy_n, sy_c, sy_h, sy_w,
    SH, SW, PH, PW, DH, DW, KH: tl.constexpr, KW: tl.constexpr, MODE: tl.constexpr,
    COUNT_PAD: tl.constexpr, DIVISOR, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The max (MODE an INDEX_*) or average (AVERAGE) pool's forward for any layout: a
    [BLOCK_S positions, BLOCK_C channels] tile (channels_last: its loads are vectors along
    C), the window's offsets in row-major order (_window_take)."""
    oh, ow, c, n, tile_mask = _tile(BLOCK_S, BLOCK_C, OH, OW, C)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    x_base = x_ptr + n * sx_n + c[None, :].to(tl.int64) * sx_c
    best = tl.full([BLOCK_S, BLOCK_C], 0.0 if MODE == AVERAGE else float("-inf"),
                   tl.float32 if MODE == AVERAGE else x_ptr.dtype.element_ty)
    best_idx = tl.zeros([BLOCK_S, BLOCK_C], tl.int32) + \
        _max_start(h0, w0, W, DH, DW, KW, MODE)[:, None]
    for kh in tl.static_range(KH):
        h = h0 + kh * DH
        h_ok = (h >= 0) & (h < H)
        for kw in tl.static_range(KW):
            w = w0 + kw * DW
            ok = (h_ok & (w >= 0) & (w < W))[:, None] & tile_mask
            off = h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
            v = tl.load(x_base + off[:, None], mask=ok,
                        other=0.0 if MODE == AVERAGE else float("-inf"))
            index = (h * W + w)[:, None] if MODE == INDEX_FLAT else kh * KW + kw
            best, best_idx = _window_take(best, best_idx, v, index, MODE)
    if MODE == AVERAGE:
        best = best / _avg_divisor(oh, ow, H, W, SH, SW, PH, PW, KH, KW, COUNT_PAD,
                                   DIVISOR)[:, None]
    out_off = pixel_offsets(n, oh, ow, c.to(tl.int64), sy_n, sy_h, sy_w, sy_c)
    tl.store(y_ptr + out_off, best.to(y_ptr.dtype.element_ty), mask=tile_mask)
    if MODE == INDEX_LOCAL or MODE == INDEX_FLAT:
        tl.store(idx_ptr + out_off, best_idx.to(idx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def max_pool2d_fwd_planar(
    x_ptr, y_ptr, idx_ptr,
    C, H, W, OH, OW,
    sx_n, sx_c, sx_h,                  # input strides (W contiguous)
    sy_n, sy_c, sy_h,                  # output strides (OW contiguous; indices the same)
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ALIGN_X: tl.constexpr,             # a power of two dividing W and x's other strides
    INDEX_MODE: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """max_pool2d_fwd for layouts whose contiguous axis is W (NCHW) (_pool_fwd_planar)."""
    _pool_fwd_planar(x_ptr, y_ptr, idx_ptr, C, H, W, OH, OW, sx_n, sx_c, sx_h, sy_n, sy_c,
                     sy_h, KH, KW, SH, SW, PH, PW, DH, DW, ALIGN_X, INDEX_MODE, True, 0,
                     BLOCK_I, BLOCK_J)


@triton.jit
def avg_pool2d_fwd_planar(
    x_ptr, y_ptr,
    C, H, W, OH, OW,
    sx_n, sx_c, sx_h,                  # input strides (W contiguous)
    sy_n, sy_c, sy_h,                  # output strides (OW contiguous)
    DIVISOR,                           # divisor_override, or 0 for torch's rule
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, ALIGN_X: tl.constexpr, COUNT_PAD: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """avg_pool2d_fwd for layouts whose contiguous axis is W (NCHW) (_pool_fwd_planar)."""
    _pool_fwd_planar(x_ptr, y_ptr, y_ptr, C, H, W, OH, OW, sx_n, sx_c, sx_h, sy_n, sy_c,
                     sy_h, KH, KW, SH, SW, PH, PW, 1, 1, ALIGN_X, AVERAGE, COUNT_PAD, DIVISOR,
                     BLOCK_I, BLOCK_J)


@triton.jit
def _pool_fwd_planar(
    x_ptr, y_ptr, idx_ptr, C, H, W, OH, OW, sx_n, sx_c, sx_h, sy_n, sy_c, sy_h,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ALIGN_X: tl.constexpr, MODE: tl.constexpr, COUNT_PAD: tl.constexpr, DIVISOR,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The pools' forward for layouts whose contiguous axis is W (NCHW): a program owns
    BLOCK_I output rows r = (c, oh) of one image (a small plane's rows do not leave the tile
    empty) x BLOCK_J output columns ow, and reads input rows along W. At stride 2 the
    window offsets 2 ow + 2q + {0, 1} of every column are one contiguous row segment, loaded
    (as 16-byte vectors where q = 0) and split into its two phases in registers, one tile
    layout for every offset (a separate strided load of 2 ow - 1 made the compile move each
    tile through shared memory). Grid (cdiv(C OH, BLOCK_I), cdiv(OW, BLOCK_J), N)."""
    FILL: tl.constexpr = 0.0 if MODE == AVERAGE else float("-inf")
    r = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    c = (r // OH).to(tl.int64)[:, None]
    oh = (r % OH)[:, None]
    ow = (tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J))[None, :]
    n = tl.program_id(2).to(tl.int64)
    row_ok = c < C
    AX: tl.constexpr = ALIGN_X if ALIGN_X < 2 * BLOCK_J else 2 * BLOCK_J
    W_ = _multiple(W, AX)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    best = tl.full([BLOCK_I, BLOCK_J], FILL,
                   tl.float32 if MODE == AVERAGE else x_ptr.dtype.element_ty)
    best_idx = tl.zeros([BLOCK_I, BLOCK_J], tl.int32) + \
        _max_start(h0, w0, W, DH, DW, KW, MODE)
    x_plane = x_ptr + n * sx_n + c * _multiple(sx_c, AX)
    seg = (tl.program_id(1) * 2 * BLOCK_J + tl.arange(0, 2 * BLOCK_J))[None, :]
    for kh in tl.static_range(KH):
        h = h0 + kh * DH
        h_ok = row_ok & (h >= 0) & (h < H)
        x_row = x_plane + h.to(tl.int64) * _multiple(sx_h, AX)
        for kw in tl.static_range(KW):
            w = ow * SW + (kw * DW - PW)
            if SW == 2:
                # offset 2 ow + 2 q + p (p = 0, 1) is phase p of the row segment
                # [2 (ow0 + q), 2 (ow0 + q + BLOCK_J)): one load (vectors where q = 0) split
                # in registers, shared by the offsets of the same q
                if kw == 0 or (kw * DW - PW) // 2 != ((kw - 1) * DW - PW) // 2:
                    ws = seg + (kw * DW - PW) // 2 * 2
                    pair = tl.load(x_row + ws, mask=h_ok & (ws >= 0) & (ws < W_), other=FILL)
                    even, odd = tl.split(tl.reshape(pair, [BLOCK_I, BLOCK_J, 2]))
                if (kw * DW - PW) % 2 == 1:
                    v = odd
                else:
                    v = even
            else:
                v = tl.load(x_row + w, mask=h_ok & (w >= 0) & (w < W), other=FILL)
            index = h * W + w if MODE == INDEX_FLAT else kh * KW + kw
            best, best_idx = _window_take(best, best_idx, v, index, MODE)
    if MODE == AVERAGE:
        best = best / _avg_divisor(oh, ow, H, W, SH, SW, PH, PW, KH, KW, COUNT_PAD, DIVISOR)
    out_off = n * sy_n + c * sy_c + oh.to(tl.int64) * sy_h + ow
    out_ok = row_ok & (ow < OW)
    tl.store(y_ptr + out_off, best.to(y_ptr.dtype.element_ty), mask=out_ok)
    if MODE == INDEX_LOCAL or MODE == INDEX_FLAT:
        tl.store(idx_ptr + out_off, best_idx.to(idx_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def _multiple(x, A: tl.constexpr):
    """x, a multiple of A (the host guarantees it), in a form whose divisibility the
    compiler sees: masks compared with it stay constant over A-element vectors."""
    if A > 1:
        x = x // A * A
    return x


@triton.jit
def _argmax_hit(idx, h, w, W, kh, kw, KW: tl.constexpr, INDEX_MODE: tl.constexpr):
    """Where the saved argmax `idx` of a window is the input element (h, w) at its offset
    (kh, kw): torch's flat h * W + w (INDEX_FLAT) or the window offset kh * KW + kw."""
    if INDEX_MODE == INDEX_FLAT:
        hit = idx == h * W + w
    else:
        hit = idx == kh * KW + kw
    return hit


@triton.jit
def _window_tiles(dy_ptr, idx_ptr, dy_at, idx_at, i, j, ok, H, W, OH, OW, sdy_h, sdy_w, si_h,
                  si_w, ALIGN: tl.constexpr, SHIFT_ALONG_COLUMNS: tl.constexpr,
                  KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                  PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                  MODE: tl.constexpr, COUNT_PAD: tl.constexpr, DIVISOR):
    """grad_out (fp32) and the argmax of the windows (i + qh, j + qw) for every shift
    (qh, qw) a kernel offset can give a cell (i, j) (_phase_grad), as two tuples in
    row-major shift order; loaded once and shared by the cell's stride phases. Masked to
    the windows that exist and `ok`. dy_at / idx_at: offsets of the parts other than
    (oh, ow), broadcast against them. ALIGN: a power of two dividing every offset where a
    run of the tile's contiguous columns starts (from the host), unless the shift moves
    along the columns (SHIFT_ALONG_COLUMNS, W-contiguous tiles) by other than a multiple of
    it. A shift that no phase uses is dead code, removed by the compiler. MODE AVERAGE (the
    average pool): grad_out times each window's reciprocal divisor instead, once a window
    tile, shared by the phases, and no argmax (args: the same tiles)."""
    grads = ()
    args = ()
    for a in tl.static_range((SH - 1 + PH) // SH - (PH - (KH - 1) * DH) // SH + 1):
        oh = i + ((PH - (KH - 1) * DH) // SH + a)
        oh64 = oh.to(tl.int64)
        for b in tl.static_range((SW - 1 + PW) // SW - (PW - (KW - 1) * DW) // SW + 1):
            ow = j + ((PW - (KW - 1) * DW) // SW + b)          # shift qw
            m = ok & (oh < OH) & (ow < OW)
            if (PH - (KH - 1) * DH) // SH + a < 0:         # i, j >= 0: only negative shifts
                m = m & (oh >= 0)                          # can leave the window grid
            if (PW - (KW - 1) * DW) // SW + b < 0:
                m = m & (ow >= 0)
            dy_off = dy_at + oh64 * sdy_h + ow * sdy_w
            idx_off = idx_at + oh64 * si_h + ow * si_w
            if ALIGN > 1 and (not SHIFT_ALONG_COLUMNS
                              or ((PW - (KW - 1) * DW) // SW + b) % ALIGN == 0):
                dy_off = tl.multiple_of(dy_off, [1, ALIGN])
                idx_off = tl.multiple_of(idx_off, [1, ALIGN])
            g = tl.load(dy_ptr + dy_off, mask=m, other=0.0).to(tl.float32)
            if MODE == AVERAGE:
                scale = _avg_reciprocal(oh, ow, H, W, SH, SW, PH, PW, KH, KW, COUNT_PAD,
                                        DIVISOR)
                grads = grads + (tl.where(m, g * scale, 0.0),)  # no window: no divisor
            else:
                grads = grads + (g,)
                args = args + (tl.load(idx_ptr + idx_off, mask=m, other=-1),)
    if MODE == AVERAGE:
        args = grads
    return grads, args


@triton.jit
def _phase_grad(grads, args, h, w, W, RH: tl.constexpr, RW: tl.constexpr,
                KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
                INDEX_MODE: tl.constexpr):
    """grad_input at the input positions (h, w) = (SH i + RH, SW j + RW) of stride phase
    (RH, RW) of the cells (i, j): the sum of grad_out over the windows whose argmax they are
    (over every window that holds them for AVERAGE), from _window_tiles' tiles. Offset (kh, kw)
    reaches the phase when RH + PH - kh DH and RW + PW - kw DW are multiples of the strides, and
    then holds every cell's input in window (i + qh, j + qw), those multiples over the strides:
    decided at compile time, no division and no branch."""
    QH0: tl.constexpr = (PH - (KH - 1) * DH) // SH
    QW0: tl.constexpr = (PW - (KW - 1) * DW) // SW
    NQW: tl.constexpr = (SW - 1 + PW) // SW - QW0 + 1
    terms = ()
    for kh in tl.static_range(KH):
        if (RH + PH - kh * DH) % SH == 0:
            for kw in tl.static_range(KW):
                if (RW + PW - kw * DW) % SW == 0:
                    # the tiles of shift (qh, qw)
                    g = grads[((RH + PH - kh * DH) // SH - QH0) * NQW
                              + (RW + PW - kw * DW) // SW - QW0]
                    if INDEX_MODE == AVERAGE:
                        terms = terms + (g,)
                    else:
                        hit = _argmax_hit(args[((RH + PH - kh * DH) // SH - QH0) * NQW
                                               + (RW + PW - kw * DW) // SW - QW0],
                                          h, w, W, kh, kw, KW, INDEX_MODE)
                        terms = terms + (tl.where(hit, g, 0.0),)
    if len(terms) == 0:                 # a stride longer than the window: no window holds it
        acc = tl.zeros(grads[0].shape, tl.float32)
    else:
        acc = terms[0]                  # (not 0 + terms[0]: an add the compiler must keep)
        for t in tl.static_range(1, len(terms)):
            acc += terms[t]
    return acc


@triton.jit
def max_pool2d_bwd(
    dy_ptr, idx_ptr, dx_ptr,
    C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,        # strides of grad_out
    si_n, si_c, si_h, si_w,            # strides of the saved indices
    sdx_n, sdx_c, sdx_h, sdx_w,        # strides of grad_input
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ALIGN_Y: tl.constexpr, ALIGN_X: tl.constexpr,
    INDEX_MODE: tl.constexpr,          # INDEX_LOCAL or INDEX_FLAT
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input[h, w] = sum of grad_out over the windows whose argmax is (h, w), for
    layouts with the channels contiguous (_cells_bwd)."""
    _cells_bwd(dy_ptr, idx_ptr, dx_ptr, C, H, W, OH, OW, sdy_n, sdy_c, sdy_h, sdy_w,
               si_n, si_c, si_h, si_w, sdx_n, sdx_c, sdx_h, sdx_w, KH, KW, SH, SW, PH, PW, DH,
               DW, ALIGN_Y, ALIGN_X, INDEX_MODE, True, 0, BLOCK_S, BLOCK_C)


@triton.jit
def avg_pool2d_bwd(
    dy_ptr, dx_ptr,
    C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    DIVISOR,                           # divisor_override, or 0 for torch's rule
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, ALIGN_Y: tl.constexpr, ALIGN_X: tl.constexpr,
    COUNT_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input[h, w] = sum over the windows holding (h, w) of grad_out / divisor, for
    layouts with the channels contiguous: max pooling's cell backward (_cells_bwd) with
    every window counted, each window tile divided once."""
    _cells_bwd(dy_ptr, dy_ptr, dx_ptr, C, H, W, OH, OW, sdy_n, sdy_c, sdy_h, sdy_w,
               sdy_n, sdy_c, sdy_h, sdy_w, sdx_n, sdx_c, sdx_h, sdx_w, KH, KW, SH, SW, PH, PW,
               1, 1, ALIGN_Y, ALIGN_X, AVERAGE, COUNT_PAD, DIVISOR, BLOCK_S, BLOCK_C)


@triton.jit
def _cells_bwd(
    dy_ptr, idx_ptr, dx_ptr, C, H, W, OH, OW, sdy_n, sdy_c, sdy_h, sdy_w, si_n, si_c, si_h,
    si_w, sdx_n, sdx_c, sdx_h, sdx_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ALIGN_Y: tl.constexpr, ALIGN_X: tl.constexpr, INDEX_MODE: tl.constexpr,
    COUNT_PAD: tl.constexpr, DIVISOR, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The pools' backward by cells, for layouts with the channels contiguous. A program
    owns BLOCK_S cells (i, j) x BLOCK_C channels of one image and writes all SH x SW input
    positions (SH i + rh, SW j + rw) of its cells, one per stride phase: it loads the windows
    its cells can be in once (_window_tiles: the window mask is constant along the channels, so
    16-byte vector loads), sums each phase's terms from registers (_phase_grad), and stores each
    position's channels contiguously after every load. ALIGN_Y / ALIGN_X: powers of two dividing
    C and the other strides of grad_out and the indices / of grad_input (host). Grid (cdiv(NI
    NJ, BLOCK_S), cdiv(C, BLOCK_C), N), NI = cdiv(H, SH) and NJ = cdiv(W, SW) cells."""
    NJ = tl.cdiv(W, SW)
    s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    i = (s // NJ)[:, None]
    j = (s % NJ)[:, None]
    cell_ok = (s < tl.cdiv(H, SH) * NJ)[:, None]
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C))[None, :]
    n = tl.program_id(2).to(tl.int64)
    # vectors along the channels: aligned where a channel block starts
    AY: tl.constexpr = ALIGN_Y if ALIGN_Y < BLOCK_C else BLOCK_C
    AX: tl.constexpr = ALIGN_X if ALIGN_X < BLOCK_C else BLOCK_C
    grads, args = _window_tiles(dy_ptr, idx_ptr, n * sdy_n + c * sdy_c, n * si_n + c * si_c,
                                i, j, cell_ok & (c < _multiple(C, AY)), H, W, OH, OW, sdy_h,
                                sdy_w, si_h, si_w, AY, False, KH, KW, SH, SW, PH, PW, DH, DW,
                                INDEX_MODE, COUNT_PAD, DIVISOR)
    c_ok = c < _multiple(C, AX)
    for rh in tl.static_range(SH):
        h = i * SH + rh
        for rw in tl.static_range(SW):
            w = j * SW + rw
            acc = _phase_grad(grads, args, h, w, W, rh, rw, KH, KW, SH, SW, PH, PW, DH, DW,
                              INDEX_MODE)
            dx_off = n * sdx_n + h.to(tl.int64) * sdx_h + w.to(tl.int64) * sdx_w + c * sdx_c
            if AX > 1:
                dx_off = tl.multiple_of(dx_off, [1, AX])
            tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty),
                     mask=cell_ok & (h < H) & (w < W) & c_ok)


@triton.jit
def max_pool2d_bwd_planar(
    dy_ptr, idx_ptr, dx_ptr,
    C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,        # strides of grad_out
    si_n, si_c, si_h, si_w,            # strides of the saved indices
    sdx_n, sdx_c, sdx_h, sdx_w,        # strides of grad_input
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ALIGN_Y: tl.constexpr, ALIGN_X: tl.constexpr,
    INDEX_MODE: tl.constexpr,          # INDEX_LOCAL or INDEX_FLAT
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """max_pool2d_bwd for layouts whose contiguous axis is W (NCHW) (_cells_bwd_planar)."""
    _cells_bwd_planar(dy_ptr, idx_ptr, dx_ptr, C, H, W, OH, OW, sdy_n, sdy_c, sdy_h, sdy_w,
                      si_n, si_c, si_h, si_w, sdx_n, sdx_c, sdx_h, sdx_w, KH, KW, SH, SW, PH,
                      PW, DH, DW, ALIGN_Y, ALIGN_X, INDEX_MODE, True, 0, BLOCK_I, BLOCK_J)


@triton.jit
def avg_pool2d_bwd_planar(
    dy_ptr, dx_ptr,
    C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    DIVISOR,                           # divisor_override, or 0 for torch's rule
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, ALIGN_Y: tl.constexpr, ALIGN_X: tl.constexpr,
    COUNT_PAD: tl.constexpr,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """avg_pool2d_bwd for layouts whose contiguous axis is W (NCHW) (_cells_bwd_planar)."""
    _cells_bwd_planar(dy_ptr, dy_ptr, dx_ptr, C, H, W, OH, OW, sdy_n, sdy_c, sdy_h, sdy_w,
                      sdy_n, sdy_c, sdy_h, sdy_w, sdx_n, sdx_c, sdx_h, sdx_w, KH, KW, SH, SW,
                      PH, PW, 1, 1, ALIGN_Y, ALIGN_X, AVERAGE, COUNT_PAD, DIVISOR, BLOCK_I,
                      BLOCK_J)


@triton.jit
def _cells_bwd_planar(
    dy_ptr, idx_ptr, dx_ptr, C, H, W, OH, OW, sdy_n, sdy_c, sdy_h, sdy_w, si_n, si_c, si_h,
    si_w, sdx_n, sdx_c, sdx_h, sdx_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr, DH: tl.constexpr, DW: tl.constexpr,
    ALIGN_Y: tl.constexpr, ALIGN_X: tl.constexpr, INDEX_MODE: tl.constexpr,
    COUNT_PAD: tl.constexpr, DIVISOR, BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """The pools' backward by cells, for layouts whose contiguous axis is W (NCHW). A program
    owns BLOCK_I x BLOCK_J cells of one image, rows r = (c, i) of its planes flattened (a small
    plane's rows do not leave the tile empty) x columns j, and writes all SH x SW stride
    phases of them. Its grad_out and index loads (_window_tiles; ow = j + qw) run along W,
    vectors where qw = 0; for stride 2 the two column phases of a row are interleaved in
    registers and stored as one contiguous row segment, otherwise each phase's store fills
    every SW-th element and the program's next ones the rest: no 32-byte sector of
    grad_input is left partly written for another program. ALIGN_Y / ALIGN_X: powers of two
    dividing OW and the other strides of grad_out and the indices / W and those of
    grad_input (host). Grid (cdiv(C NI, BLOCK_I), cdiv(NJ, BLOCK_J), N), NI = cdiv(H, SH)
    and NJ = cdiv(W, SW)."""
    NI = tl.cdiv(H, SH)
    r = tl.program_id(0) * BLOCK_I + tl.arange(0, BLOCK_I)
    c = (r // NI).to(tl.int64)[:, None]
    i = (r % NI)[:, None]
    j = (tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J))[None, :]
    n = tl.program_id(2).to(tl.int64)
    row_ok = c < C
    # vectors along W: aligned where a column block starts
    AY: tl.constexpr = ALIGN_Y if ALIGN_Y < BLOCK_J else BLOCK_J
    AX: tl.constexpr = ALIGN_X if ALIGN_X < 2 * BLOCK_J else 2 * BLOCK_J
    grads, args = _window_tiles(dy_ptr, idx_ptr, n * sdy_n + c * sdy_c, n * si_n + c * si_c,
                                i, j, row_ok, H, W, OH, _multiple(OW, AY), sdy_h, sdy_w, si_h,
                                si_w, AY, True, KH, KW, SH, SW, PH, PW, DH, DW, INDEX_MODE,
                                COUNT_PAD, DIVISOR)
    W_ = _multiple(W, AX)
    for rh in tl.static_range(SH):
        h = i * SH + rh
        h_ok = row_ok & (h < H)
        dx_row = n * sdx_n + c * sdx_c + h.to(tl.int64) * sdx_h
        if SW == 2:
            w = j * 2
            even = _phase_grad(grads, args, h, w, W, rh, 0, KH, KW, SH, SW, PH, PW, DH, DW,
                               INDEX_MODE)
            odd = _phase_grad(grads, args, h, w + 1, W, rh, 1, KH, KW, SH, SW, PH, PW, DH, DW,
                              INDEX_MODE)
            ws = (tl.program_id(1) * 2 * BLOCK_J + tl.arange(0, 2 * BLOCK_J))[None, :]
            dx_off = dx_row + ws * sdx_w
            if AX > 1:
                dx_off = tl.multiple_of(dx_off, [1, AX])
            tl.store(dx_ptr + dx_off, tl.interleave(even, odd).to(dx_ptr.dtype.element_ty),
                     mask=h_ok & (ws < W_))
        else:
            for rw in tl.static_range(SW):
                w = j * SW + rw
                acc = _phase_grad(grads, args, h, w, W, rh, rw, KH, KW, SH, SW, PH, PW, DH, DW,
                                  INDEX_MODE)
                tl.store(dx_ptr + dx_row + w * sdx_w, acc.to(dx_ptr.dtype.element_ty),
                         mask=h_ok & (w < W_))


@triton.jit
def _avg_divisor(oh, ow, H, W, SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr,
                 COUNT_PAD: tl.constexpr, DIVISOR):
    """torch's divisor of window (oh, ow): divisor_override if > 0; else the window clipped to
    the padded input (count_include_pad) or to the input, rows x columns (_avg_extent)."""
    count = _avg_extent(oh, H, SH, PH, KH, COUNT_PAD) * _avg_extent(ow, W, SW, PW, KW, COUNT_PAD)
    return tl.where(DIVISOR > 0, DIVISOR, count).to(tl.float32)


@triton.jit
def _avg_extent(o, I, S, P, K: tl.constexpr, COUNT_PAD: tl.constexpr):
    """The rows (or columns) of window o along one axis that torch's divisor counts."""
    a0 = o * S - P
    a1 = tl.minimum(a0 + K, I + P)
    if COUNT_PAD:
        return a1 - a0
    return tl.minimum(a1, I) - tl.maximum(a0, 0)


@triton.jit
def _avg_reciprocal(oh, ow, H, W, SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr,
                    COUNT_PAD: tl.constexpr, DIVISOR):
    """1 / _avg_divisor(oh, ow, ...), as two per-axis reciprocals (torch's count is rows x
    columns): a division a row and a column of a tile, a multiply an element. Within 2 ulp
    of fp32 division by the count."""
    counted = (1.0 / _avg_extent(oh, H, SH, PH, KH, COUNT_PAD).to(tl.float32)) * \
        (1.0 / _avg_extent(ow, W, SW, PW, KW, COUNT_PAD).to(tl.float32))
    return tl.where(DIVISOR > 0, 1.0 / DIVISOR, counted)


@triton.jit
def adaptive_avg_pool2d_fwd(
    x_ptr, y_ptr,
    C, H, W, OH, OW,
    sx_n, sx_c, sx_h, sx_w,
    sy_n, sy_c, sy_h, sy_w,
    MAX_KH, MAX_KW,                    # the largest window: ceil(H / OH) + 1 bounds it
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Output (oh, ow) averages rows [floor(oh H / OH), ceil((oh + 1) H / OH)), columns likewise."""
    oh, ow, c, n, tile_mask = _tile(BLOCK_S, BLOCK_C, OH, OW, C)
    h0, h1 = _adaptive_window(oh, H, OH)
    w0, w1 = _adaptive_window(ow, W, OW)
    x_base = x_ptr + n * sx_n + c[None, :].to(tl.int64) * sx_c
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for kh in range(0, MAX_KH):
        h = h0 + kh
        for kw in range(0, MAX_KW):
            w = w0 + kw
            ok = ((h < h1) & (w < w1))[:, None] & tile_mask
            off = h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
            acc += tl.load(x_base + off[:, None], mask=ok, other=0.0).to(tl.float32)
    area = ((h1 - h0) * (w1 - w0)).to(tl.float32)
    out_off = pixel_offsets(n, oh, ow, c.to(tl.int64), sy_n, sy_h, sy_w, sy_c)
    tl.store(y_ptr + out_off, (acc / area[:, None]).to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def adaptive_avg_pool2d_bwd(
    dy_ptr, dx_ptr,
    C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    MAX_OH, MAX_OW,                    # most windows one row / column can fall in: OH // H + 2
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input[h, w] = sum over the windows holding (h, w) of grad_out / window area."""
    h, w, c, n, tile_mask = _tile(BLOCK_S, BLOCK_C, H, W, C)
    dy_base = dy_ptr + n * sdy_n + c[None, :].to(tl.int64) * sdy_c
    # the first window that can hold row h: window oh starts at floor(oh H / OH) <= h
    oh_first = tl.maximum((h * OH) // H - 1, 0)
    ow_first = tl.maximum((w * OW) // W - 1, 0)
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for i in range(0, MAX_OH):
        oh = oh_first + i
        h0, h1 = _adaptive_window(oh, H, OH)
        h_ok = (oh < OH) & (h0 <= h) & (h < h1)
        for j in range(0, MAX_OW):
            ow = ow_first + j
            w0, w1 = _adaptive_window(ow, W, OW)
            ok_s = h_ok & (ow < OW) & (w0 <= w) & (w < w1)
            off = (oh.to(tl.int64) * sdy_h + ow.to(tl.int64) * sdy_w)[:, None]
            g = tl.load(dy_base + off, mask=ok_s[:, None] & tile_mask, other=0.0).to(tl.float32)
            area = tl.where(ok_s, (h1 - h0) * (w1 - w0), 1).to(tl.float32)
            acc += g / area[:, None]
    dx_off = pixel_offsets(n, h, w, c.to(tl.int64), sdx_n, sdx_h, sdx_w, sdx_c)
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def global_avg_pool2d_fwd(
    x_ptr, y_ptr,
    C, HW,
    sx_n, sx_c, sx_p,                  # x (N, C, H W): h and w merged (sx_h = W sx_w)
    sy_n, sy_c,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """adaptive_avg_pool2d to 1x1 (global average pooling): y[n, c] = the mean of x[n, c]
    over its HW positions, summed in fp32. A program owns BLOCK_C channels of one image and
    walks its positions BLOCK_P at a time: a row reduction along p for NCHW (p contiguous),
    a column reduction along p for channels_last (c contiguous), no window arithmetic.
    Grid (cdiv(C, BLOCK_C), N)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    n = tl.program_id(1).to(tl.int64)
    c_ok = (c < C)[:, None]
    x_c = x_ptr + n * sx_n + c.to(tl.int64)[:, None] * sx_c
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for p0 in range(0, HW, BLOCK_P):
        p = (p0 + tl.arange(0, BLOCK_P))[None, :]
        acc += tl.load(x_c + p * sx_p, mask=c_ok & (p < HW), other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / HW
    tl.store(y_ptr + n * sy_n + c * sy_c, mean.to(y_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def global_avg_pool2d_bwd(
    dy_ptr, dx_ptr,
    C, HW,
    sdy_n, sdy_c,
    sdx_n, sdx_c, sdx_p,               # dx (N, C, H W): h and w merged
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """The backward of global average pooling: dx[n, c, p] = dy[n, c] / HW, one division a
    channel and a broadcast store. Grid (cdiv(C, BLOCK_C), cdiv(HW, BLOCK_P), N)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = (tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P))[None, :]
    n = tl.program_id(2).to(tl.int64)
    g = tl.load(dy_ptr + n * sdy_n + c * sdy_c, mask=c < C, other=0.0).to(tl.float32) / HW
    tile = tl.zeros([BLOCK_C, BLOCK_P], tl.float32) + g[:, None]
    tl.store(dx_ptr + n * sdx_n + c.to(tl.int64)[:, None] * sdx_c + p * sdx_p,
             tile.to(dx_ptr.dtype.element_ty), mask=(c < C)[:, None] & (p < HW))


@triton.jit
def global_avg_pool2d_bwd_flat(
    dy_ptr, dx_ptr,
    total,                             # N C HW elements of dx
    sdy_c,                             # dy's stride between (n, c) planes in order
    HW: tl.constexpr,                  # positions a plane: a constant divisor
    WIDE: tl.constexpr,                # int64 offsets (total >= 2^31)
    BLOCK: tl.constexpr,
):
    """global_avg_pool2d_bwd for a contiguous NCHW dx (planes of HW positions in a row, HW
    not a multiple of 8 at the classifier heads, 7 x 7): the flat dx in 16-byte vectors, the
    plane of each element by a division by the constant HW (a multiply and a shift), dy's
    quotient gathered per element (the same few values a program: cache hits). The scale is
    a multiply by 1 / HW, within an ulp of torch's division in fp32."""
    start = tl.program_id(0).to(tl.int64) * BLOCK if WIDE else tl.program_id(0) * BLOCK
    e = start + tl.arange(0, BLOCK)
    ok = e < total
    g = tl.load(dy_ptr + (e // HW) * sdy_c, mask=ok, other=0.0).to(tl.float32)
    tl.store(dx_ptr + e, (g * (1.0 / HW)).to(dx_ptr.dtype.element_ty), mask=ok)
