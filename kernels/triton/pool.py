"""Triton kernels for 2-D max, average and adaptive average pooling, forward and backward.

Layout: every kernel takes explicit (N, C, H, W) strides for each tensor, so NCHW,
channels_last and sliced inputs need no copy. A program owns a tile of BLOCK_S spatial
positions x BLOCK_C channels of one image (grid: spatial blocks, channel blocks, batch); the
launcher picks a wide BLOCK_S for NCHW (W is the contiguous axis) and a wide BLOCK_C for
channels_last (C is contiguous), so loads are coalesced either way.

Backward passes are gathers, not scatters: a program owns a tile of INPUT positions and, for
each kernel offset (kh, kw), finds the one output window that holds the element at that offset
(if any). Every input gradient is written exactly once: no atomics, no zero-fill, deterministic
for overlapping windows (stride < kernel). Max pooling's backward takes its input positions by
stride phase (h mod SH, w mod SW): within a phase an offset reaches all positions' windows or
none, so a program skips the offsets that cannot hold its inputs, and for W-contiguous layouts
(NCHW, max_pool2d_bwd_planar) its loads and stores run along W in memory order.

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

from ._index import pixel_offsets, window_of

INDEX_NONE = tl.constexpr(0)   # inference: no indices
INDEX_LOCAL = tl.constexpr(1)  # window offset kh * KW + kw (int8 when KH * KW < 128)
INDEX_FLAT = tl.constexpr(2)   # int64 h * W + w, torch's return_indices format


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
    oh, ow, c, n, tile_mask = _tile(BLOCK_S, BLOCK_C, OH, OW, C)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    x_base = x_ptr + n * sx_n + c[None, :].to(tl.int64) * sx_c
    best = tl.full([BLOCK_S, BLOCK_C], float("-inf"), tl.float32)
    if INDEX_MODE == INDEX_FLAT:
        start = _first_in_window(h0, DH) * W + _first_in_window(w0, DW)
        best_idx = tl.zeros([BLOCK_S, BLOCK_C], tl.int32) + start[:, None]
    else:
        # window offset of the first non-negative row and column
        start = ((_first_in_window(h0, DH) - h0) // DH) * KW + (_first_in_window(w0, DW) - w0) // DW
        best_idx = tl.zeros([BLOCK_S, BLOCK_C], tl.int32) + start[:, None]
    for kh in tl.static_range(KH):
        h = h0 + kh * DH
        h_ok = (h >= 0) & (h < H)
        for kw in tl.static_range(KW):
            w = w0 + kw * DW
            ok = (h_ok & (w >= 0) & (w < W))[:, None] & tile_mask
            off = h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
            v = tl.load(x_base + off[:, None], mask=ok, other=float("-inf")).to(tl.float32)
            take = ok & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            if INDEX_MODE == INDEX_FLAT:
                best_idx = tl.where(take, (h * W + w)[:, None], best_idx)
            else:
                best_idx = tl.where(take, kh * KW + kw, best_idx)
    out_off = pixel_offsets(n, oh, ow, c.to(tl.int64), sy_n, sy_h, sy_w, sy_c)
    tl.store(y_ptr + out_off, best.to(y_ptr.dtype.element_ty), mask=tile_mask)
    if INDEX_MODE != INDEX_NONE:
        tl.store(idx_ptr + out_off, best_idx.to(idx_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def _phase_offset(r, k, P, D, S):
    """Input coordinates x = S i + r (stride phase r) meet kernel offset k in the window of
    output o = i + q when r + P - k D is a multiple of S, q that multiple over S: for every
    i of the phase or for none. Returns (q, whether they do); q is meaningless when not."""
    e = r + P - k * D
    q = e // S
    return q, e - q * S == 0


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
def max_pool2d_bwd(
    dy_ptr, idx_ptr, dx_ptr,
    C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,        # strides of grad_out
    si_n, si_c, si_h, si_w,            # strides of the saved indices
    sdx_n, sdx_c, sdx_h, sdx_w,        # strides of grad_input
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    INDEX_MODE: tl.constexpr,          # INDEX_LOCAL or INDEX_FLAT
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input[h, w] = sum of grad_out over the windows whose argmax is (h, w), for
    layouts with the channels contiguous: a program owns BLOCK_S input positions of one
    stride phase x BLOCK_C channels of one image.

    Stride phases: program_id(0) = phase * blocks + block, phase (rh, rw), positions h =
    SH i + rh, w = SW j + rw. Within a phase a kernel offset (kh, kw) reaches either every
    position's window (i + qh, j + qw) or none (_phase_offset), so a program visits only the
    offsets that can hold its inputs (4 of 9 or fewer for 3x3 windows at stride 2, 2.25 on
    average), without a division per position. grad_out and the indices are loaded under the
    window mask alone, constant along the channels (16-byte vector loads); the argmax test
    selects afterwards. Grid (SH SW cdiv(NI NJ, BLOCK_S), cdiv(C, BLOCK_C), N), NI = cdiv(H,
    SH) and NJ = cdiv(W, SW) positions per phase at most."""
    NI = tl.cdiv(H, SH)
    NJ = tl.cdiv(W, SW)
    blocks = tl.cdiv(NI * NJ, BLOCK_S)
    phase = tl.program_id(0) // blocks
    rh = phase // SW
    rw = phase % SW
    s = (tl.program_id(0) % blocks) * BLOCK_S + tl.arange(0, BLOCK_S)
    i = s // NJ
    j = s % NJ
    h = i * SH + rh
    w = j * SW + rw
    pos_ok = (s < NI * NJ) & (h < H) & (w < W)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    c_ok = c < C
    n = tl.program_id(2).to(tl.int64)
    dy_base = dy_ptr + n * sdy_n + c[None, :] * sdy_c
    idx_base = idx_ptr + n * si_n + c[None, :] * si_c
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for kh in tl.static_range(KH):
        qh, h_in = _phase_offset(rh, kh, PH, DH, SH)
        if h_in:
            oh = i + qh
            oh_ok = pos_ok & (oh >= 0) & (oh < OH)
            for kw in tl.static_range(KW):
                qw, w_in = _phase_offset(rw, kw, PW, DW, SW)
                if w_in:
                    ow = j + qw
                    ok = (oh_ok & (ow >= 0) & (ow < OW))[:, None] & c_ok[None, :]
                    oh64 = oh.to(tl.int64)
                    ow64 = ow.to(tl.int64)
                    idx = tl.load(idx_base + (oh64 * si_h + ow64 * si_w)[:, None], mask=ok,
                                  other=-1)
                    g = tl.load(dy_base + (oh64 * sdy_h + ow64 * sdy_w)[:, None], mask=ok,
                                other=0.0)
                    hit = _argmax_hit(idx, h[:, None], w[:, None], W, kh, kw, KW, INDEX_MODE)
                    acc += tl.where(hit, g.to(tl.float32), 0.0)
    dx_off = pixel_offsets(n, h, w, c, sdx_n, sdx_h, sdx_w, sdx_c)
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty),
             mask=pos_ok[:, None] & c_ok[None, :])


@triton.jit
def max_pool2d_bwd_planar(
    dy_ptr, idx_ptr, dx_ptr,
    N, C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,        # strides of grad_out
    si_n, si_c, si_h, si_w,            # strides of the saved indices
    sdx_n, sdx_c, sdx_h, sdx_w,        # strides of grad_input
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    INDEX_MODE: tl.constexpr,          # INDEX_LOCAL or INDEX_FLAT
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """max_pool2d_bwd for layouts whose contiguous axis is W (NCHW). A program owns a
    BLOCK_I x BLOCK_J tile of one stride phase (rh, rw): rows r = (n, c, i) of all planes
    flattened (a small image's rows do not leave the tile empty), columns j, input positions
    (SH i + rh, SW j + rw). Along j the grad_out and index loads (ow = j + qw, one shift for
    the whole phase) and the grad_input stores (w = SW j + rw) run through memory in order,
    so each warp's accesses are coalesced (every SW-th element for the stores: the other
    phases' programs fill the rest), and a program visits only the kernel offsets that reach
    its phase. Grid (SH cdiv(N C NI, BLOCK_I), SW cdiv(NJ, BLOCK_J)), NI = cdiv(H, SH) and
    NJ = cdiv(W, SW)."""
    NI = tl.cdiv(H, SH)
    NJ = tl.cdiv(W, SW)
    r_blocks = tl.cdiv(N * C * NI, BLOCK_I)
    j_blocks = tl.cdiv(NJ, BLOCK_J)
    rh = tl.program_id(0) // r_blocks
    rw = tl.program_id(1) // j_blocks
    r = ((tl.program_id(0) % r_blocks) * BLOCK_I + tl.arange(0, BLOCK_I)).to(tl.int64)
    j = (tl.program_id(1) % j_blocks) * BLOCK_J + tl.arange(0, BLOCK_J)
    plane = r // NI
    n = plane // C
    c = plane % C
    i = (r % NI).to(tl.int32)
    h = i * SH + rh
    w = j * SW + rw
    h_ok = (plane < N * C) & (h < H)
    w_ok = w < W
    dy_rows = dy_ptr + n * sdy_n + c * sdy_c
    idx_rows = idx_ptr + n * si_n + c * si_c
    acc = tl.zeros([BLOCK_I, BLOCK_J], tl.float32)
    for kh in tl.static_range(KH):
        qh, h_in = _phase_offset(rh, kh, PH, DH, SH)
        if h_in:
            oh = (i + qh).to(tl.int64)
            oh_ok = h_ok & (oh >= 0) & (oh < OH)
            dy_row = dy_rows + oh * sdy_h
            idx_row = idx_rows + oh * si_h
            for kw in tl.static_range(KW):
                qw, w_in = _phase_offset(rw, kw, PW, DW, SW)
                if w_in:
                    ow = (j + qw).to(tl.int64)
                    ok = oh_ok[:, None] & (w_ok & (ow >= 0) & (ow < OW))[None, :]
                    idx = tl.load(idx_row[:, None] + (ow * si_w)[None, :], mask=ok, other=-1)
                    g = tl.load(dy_row[:, None] + (ow * sdy_w)[None, :], mask=ok, other=0.0)
                    hit = _argmax_hit(idx, h[:, None], w[None, :], W, kh, kw, KW, INDEX_MODE)
                    acc += tl.where(hit, g.to(tl.float32), 0.0)
    dx_off = (n * sdx_n + c * sdx_c + h.to(tl.int64) * sdx_h)[:, None] \
        + (w.to(tl.int64) * sdx_w)[None, :]
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=h_ok[:, None] & w_ok[None, :])


@triton.jit
def _avg_divisor(oh, ow, H, W, SH, SW, PH, PW, KH: tl.constexpr, KW: tl.constexpr,
                 COUNT_PAD: tl.constexpr, DIVISOR):
    """torch's divisor of window (oh, ow): divisor_override if > 0; else the window clipped to
    the padded input (count_include_pad) or to the input."""
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    h1 = tl.minimum(h0 + KH, H + PH)
    w1 = tl.minimum(w0 + KW, W + PW)
    if COUNT_PAD:
        count = (h1 - h0) * (w1 - w0)
    else:
        count = (tl.minimum(h1, H) - tl.maximum(h0, 0)) * (tl.minimum(w1, W) - tl.maximum(w0, 0))
    return tl.where(DIVISOR > 0, DIVISOR, count).to(tl.float32)


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
    oh, ow, c, n, tile_mask = _tile(BLOCK_S, BLOCK_C, OH, OW, C)
    h0 = oh * SH - PH
    w0 = ow * SW - PW
    x_base = x_ptr + n * sx_n + c[None, :].to(tl.int64) * sx_c
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for kh in tl.static_range(KH):
        h = h0 + kh
        h_ok = (h >= 0) & (h < H)
        for kw in tl.static_range(KW):
            w = w0 + kw
            ok = (h_ok & (w >= 0) & (w < W))[:, None] & tile_mask
            off = h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
            acc += tl.load(x_base + off[:, None], mask=ok, other=0.0).to(tl.float32)
    div = _avg_divisor(oh, ow, H, W, SH, SW, PH, PW, KH, KW, COUNT_PAD, DIVISOR)
    out_off = pixel_offsets(n, oh, ow, c.to(tl.int64), sy_n, sy_h, sy_w, sy_c)
    tl.store(y_ptr + out_off, (acc / div[:, None]).to(y_ptr.dtype.element_ty), mask=tile_mask)


@triton.jit
def avg_pool2d_bwd(
    dy_ptr, dx_ptr,
    C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    SH, SW, PH, PW,
    DIVISOR,
    KH: tl.constexpr, KW: tl.constexpr, COUNT_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grad_input[h, w] = sum over windows holding (h, w) of grad_out / divisor."""
    h, w, c, n, tile_mask = _tile(BLOCK_S, BLOCK_C, H, W, C)
    dy_base = dy_ptr + n * sdy_n + c[None, :].to(tl.int64) * sdy_c
    acc = tl.zeros([BLOCK_S, BLOCK_C], tl.float32)
    for kh in tl.static_range(KH):
        oh, h_ok = window_of(h, kh, PH, 1, SH, OH)
        for kw in tl.static_range(KW):
            ow, w_ok = window_of(w, kw, PW, 1, SW, OW)
            ok_s = h_ok & w_ok
            off = (oh.to(tl.int64) * sdy_h + ow.to(tl.int64) * sdy_w)[:, None]
            g = tl.load(dy_base + off, mask=ok_s[:, None] & tile_mask, other=0.0).to(tl.float32)
            div = _avg_divisor(oh, ow, H, W, SH, SW, PH, PW, KH, KW, COUNT_PAD, DIVISOR)
            acc += g / div[:, None]
    dx_off = pixel_offsets(n, h, w, c.to(tl.int64), sdx_n, sdx_h, sdx_w, sdx_c)
    tl.store(dx_ptr + dx_off, acc.to(dx_ptr.dtype.element_ty), mask=tile_mask)


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
