"""Triton kernels for 2-D convolution (cross-correlation, as cuDNN computes it).

Implicit GEMM: the convolution is a matrix product whose operands are never materialised.
For group g, forward is

    Y[m, oc] = sum_k X[m, k] * Wt[k, oc]     m = (n, oh, ow),  k = (kh, kw, c)

with X[m, k] = x[n, g*Cg + c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW] (zero outside the input)
gathered tile by tile inside the K loop. The reduction runs over (kh, kw) outermost and channels
innermost, so for channels_last inputs each A tile is BLOCK_M rows of contiguous channels. It is
one flat loop over t = (kh, kw, channel block), not three nested loops, because Triton
software-pipelines (prefetches the next K tile in) only the innermost loop, and a loop over the
channel blocks alone is often only one or two iterations long (with an (OC, C, KH, KW)
weight, TAPS_INNER, t = (channel block, kh, kw): a block's taps, which share the weight's
sectors, one after another).
Every tensor comes with its four strides, so NCHW, channels_last and sliced tensors need no copy
(an NCHW tile is loaded and stored pixel-major: GATHER_PIXELS, STORE_PIXELS).

The backward passes are implicit GEMMs of the same shape family:
  grad_input  dX[(n, h, w), c]  = sum over (kh, kw, oc) of dY[n, oc, oh, ow] * W[oc, c, kh, kw]
              with oh = (h + PH - kh*DH) / SH where that divides exactly (else no term);
              with stride > 1 a tile holds pixels of one stride phase and loops over only
              the taps that reach it;
  grad_weight dW[oc, (kh, kw, c)] = sum over (n, oh, ow) of dY[n, oc, oh, ow] * X[...];
  grad_bias   a column sum of dY.

Accumulation is fp32. fp32 inputs use `tl.dot` with INPUT_PRECISION "tf32" or "ieee" (the
launcher follows torch.backends.cudnn.allow_tf32, so pydl rounds like cuDNN does under the same
setting).
"""
import triton
import triton.language as tl

from ._index import (
    gather_tile,
    oriented,
    pixel_offsets,
    program_pixels,
    tile_mask,
    tile_offsets,
    unravel3,
    window_of,
)
from ._split import sum_partials


@triton.jit
def conv2d_implicit_fwd(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, OC, OH, OW,             # C and OC are totals over all groups
    sx_n, sx_c, sx_h, sx_w,             # input strides
    sw_o, sw_c, sw_h, sw_w,             # weight strides (OC, C / groups, KH, KW)
    sy_n, sy_c, sy_h, sy_w,             # output strides
    SH, SW, PH, PW, DH, DW,             # stride, padding (top, left), dilation
    KH: tl.constexpr, KW: tl.constexpr,
    CG, OCG,                            # channels per group in and out
    HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    FLAT_K: tl.constexpr,               # K steps over (kh, kw, c) jointly: few input channels
    GATHER_PIXELS: tl.constexpr,        # x's channels not at unit stride (NCHW): pixel-major
    STORE_PIXELS: tl.constexpr,         # y's likewise
    TAPS_INNER: tl.constexpr,           # w's channels not at unit stride: K steps (cb, kh, kw)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y = X @ Wt by output tiles. With FLAT_K (a layer with few input channels, like an RGB
    stem: 3 channels would fill 3 of a 16-deep channel block) each K step takes BLOCK_K
    consecutive (kh, kw, c) columns as im2col orders them, decoded per column, so the tensor
    cores see no channel padding. GATHER_PIXELS (x's channels a plane apart): the A tile is
    loaded as [channels, pixels] ([columns, pixels] with FLAT_K) and transposed, so that a
    warp's lanes run along the pixels, which lie at unit stride (a row's run: 2-4 sectors a
    load, not one a lane);
    STORE_PIXELS likewise for y's tile (tile_offsets). TAPS_INNER (an (OC, C, KH, KW)
    weight, its taps at unit stride): the K steps visit a channel block's taps one after
    another, so the 32-byte sectors its weight tile touches (each holding a channel's taps)
    and x's planes are read again from L1 at the next tap, not after every other block; and
    the weight tile is loaded with its lanes along the channels (KH*KW apart), not the out
    channels (C*KH*KW apart)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)          # output pixels (n, oh, ow)
    oc = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)         # output channels within the group
    m_ok = m < N * OH * OW
    oc_ok = oc < OCG
    n, oh, ow = unravel3(m, OH, OW)
    n = n.to(tl.int64)
    oc_abs = (group * OCG + oc).to(tl.int64)
    kc = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if FLAT_K:
        for j0 in range(0, KH * KW * CG, BLOCK_K):       # j = (kh, kw, c)
            j = j0 + kc
            j_ok = j < KH * KW * CG
            kh, kw, c = unravel3(j, KW, CG)
            c_abs = (group * CG + c).to(tl.int64)
            if GATHER_PIXELS:       # [columns, pixels], a warp's lanes along the pixels
                h = oh[None, :] * SH - PH + kh[:, None] * DH
                w = ow[None, :] * SW - PW + kw[:, None] * DW
                a_ok = j_ok[:, None] & m_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
                a = tl.trans(tl.load(x_ptr + n[None, :] * sx_n + c_abs[:, None] * sx_c
                                     + h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w,
                                     mask=a_ok, other=0.0))
            else:
                h = oh[:, None] * SH - PH + kh[None, :] * DH
                w = ow[:, None] * SW - PW + kw[None, :] * DW
                a_ok = m_ok[:, None] & j_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
                a = tl.load(x_ptr + n[:, None] * sx_n + c_abs[None, :] * sx_c
                            + h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w, mask=a_ok,
                            other=0.0)
            w_off = c.to(tl.int64) * sw_c + kh.to(tl.int64) * sw_h + kw.to(tl.int64) * sw_w
            b = tl.load(w_ptr + oc_abs[None, :] * sw_o + w_off[:, None],
                        mask=j_ok[:, None] & oc_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    else:
        NC = tl.cdiv(CG, BLOCK_K)                        # channel blocks per (kh, kw)
        for t in range(KH * KW * NC):                    # t = (kh, kw, channel block)
            if TAPS_INNER:
                cb, kh, kw = unravel3(t, KH, KW)
            else:
                kh, kw, cb = unravel3(t, KW, NC)
            h = oh * SH - PH + kh * DH
            w = ow * SW - PW + kw * DW
            a_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            a_row = x_ptr + n * sx_n + h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
            b_col = w_ptr + oc_abs * sw_o + kh.to(tl.int64) * sw_h + kw.to(tl.int64) * sw_w
            c = cb * BLOCK_K + kc
            c_ok = c < CG
            c_abs = (group * CG + c).to(tl.int64)
            a = gather_tile(a_row, c_abs * sx_c, a_ok, c_ok, GATHER_PIXELS)
            if TAPS_INNER:
                # an (OC, C, KH, KW) weight: loaded as [out channels, channels], a warp's
                # lanes along the channels (KH*KW apart: 5 lines a warp-load at 3x3, where
                # lanes along the out channels, C*KH*KW apart, took 32)
                b = tl.trans(gather_tile(b_col, c.to(tl.int64) * sw_c, oc_ok, c_ok, False))
            else:
                b = tl.load(b_col[None, :] + c.to(tl.int64)[:, None] * sw_c,
                            mask=c_ok[:, None] & oc_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + oc_abs, mask=oc_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + tile_offsets(n, oh, ow, oc_abs, sy_n, sy_h, sy_w, sy_c, STORE_PIXELS),
             oriented(acc.to(y_ptr.dtype.element_ty), STORE_PIXELS),
             mask=tile_mask(m_ok, oc_ok, STORE_PIXELS))


@triton.jit
def conv2d_implicit_bwd_input(
    dy_ptr, w_ptr, dx_ptr,
    N, C, H, W, OC, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sw_o, sw_c, sw_h, sw_w,
    sdx_n, sdx_c, sdx_h, sdx_w,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    CG, OCG,
    STRIDE_PHASES: tl.constexpr,        # tiles of one stride phase (stride > 1, dilation 1)
    INPUT_PRECISION: tl.constexpr,
    GATHER_PIXELS: tl.constexpr,        # dy's channels not at unit stride (NCHW): pixel-major
    STORE_PIXELS: tl.constexpr,         # dx's likewise
    TAPS_INNER: tl.constexpr,           # w's channels not at unit stride: K steps (ob, i, j)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX[(n, h, w), c] = sum_(kh, kw, oc) dY[n, oc, oh, ow] W[oc, c, kh, kw]: a gather over
    the output positions whose window holds (h, w), so every dX element is written once.

    Without STRIDE_PHASES a tile is BLOCK_M consecutive pixels and the K loop visits every
    tap (kh, kw), masking the rows whose oh = (h + PH - kh*DH) / SH is not an integer. With
    stride S > 1 a pixel's phase (h % SH, w % SW) decides which taps reach it, so a tile of
    mixed phases would run SH*SW times the MMA work it needs, most rows masked zeros.

    STRIDE_PHASES (dilation 1): program_id(0) = pixel tile * SH*SW + phase (rh, rw), and the
    tile's pixels are h = hp*SH + rh, w = wp*SW + rw over an (N, cdiv(H, SH), cdiv(W, SW))
    grid (rows past H or W masked). The taps that reach phase rh are kh = kh0 + i*SH with
    kh0 = (rh + PH) % SH, i < cdiv(KH - kh0, SH), and tap i reads output row
    oh = (h + PH - kh) / SH = hp + (rh + PH) // SH - i exactly, for every row of the tile
    (likewise along w); only the border checks 0 <= oh < OH remain. A phase no tap reaches
    (kh0 >= KH: kernel 1 at stride 2) runs no K step and writes zeros. Consecutive programs
    are the phases of one pixel region, which read the same dY rows (shared in L2).

    GATHER_PIXELS, STORE_PIXELS: dY's and dX's tiles pixel-major; TAPS_INNER: an output-
    channel block's taps one after another; as in the forward.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2)
    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)          # input channels within the group
    c_ok = c < CG
    c_abs = (group * CG + c).to(tl.int64)
    if STRIDE_PHASES:
        phase = pid_m % (SH * SW)
        rh = phase // SW
        rw = phase % SW
        HP = tl.cdiv(H, SH)                              # rows and columns of a phase
        WP = tl.cdiv(W, SW)
        m = (pid_m // (SH * SW)) * BLOCK_M + tl.arange(0, BLOCK_M)   # (n, hp, wp)
        n, hp, wp = unravel3(m, HP, WP)
        h = hp * SH + rh
        w = wp * SW + rw
        m_ok = (m < N * HP * WP) & (h < H) & (w < W)
        kh0 = (rh + PH) % SH                             # the phase's first tap
        kw0 = (rw + PW) % SW
        TH = tl.cdiv(KH - kh0, SH)                       # the phase's taps: 0 when kh0 >= KH
        TW = tl.cdiv(KW - kw0, SW)
        oh0 = hp + (rh + PH) // SH                       # the output pixel tap (kh0, kw0) reads
        ow0 = wp + (rw + PW) // SW
    else:
        m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)      # input pixels (n, h, w)
        m_ok = m < N * H * W
        n, h, w = unravel3(m, H, W)
        TH = KH
        TW = KW
    n = n.to(tl.int64)
    ko = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    NC = tl.cdiv(OCG, BLOCK_K)                           # output-channel blocks per (kh, kw)
    for t in range(TH * TW * NC):                        # t = (tap row, tap column, oc block)
        if TAPS_INNER:
            ob, i, j = unravel3(t, TH, TW)
        else:
            i, j, ob = unravel3(t, TW, NC)
        if STRIDE_PHASES:
            kh = kh0 + i * SH
            kw = kw0 + j * SW
            oh = oh0 - i
            ow = ow0 - j
            a_ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        else:
            kh = i
            kw = j
            oh, oh_ok = window_of(h, kh, PH, DH, SH, OH)
            ow, ow_ok = window_of(w, kw, PW, DW, SW, OW)
            a_ok = m_ok & oh_ok & ow_ok
        a_row = dy_ptr + n * sdy_n + oh.to(tl.int64) * sdy_h + ow.to(tl.int64) * sdy_w
        b_col = w_ptr + c.to(tl.int64) * sw_c + kh.to(tl.int64) * sw_h + kw.to(tl.int64) * sw_w
        o = ob * BLOCK_K + ko
        o_ok = o < OCG
        o_abs = (group * OCG + o).to(tl.int64)
        a = gather_tile(a_row, o_abs * sdy_c, a_ok, o_ok, GATHER_PIXELS)
        b = tl.load(b_col[None, :] + o_abs[:, None] * sw_o,
                    mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    tl.store(dx_ptr + tile_offsets(n, h, w, c_abs, sdx_n, sdx_h, sdx_w, sdx_c, STORE_PIXELS),
             oriented(acc.to(dx_ptr.dtype.element_ty), STORE_PIXELS),
             mask=tile_mask(m_ok, c_ok, STORE_PIXELS))


@triton.jit
def conv2d_implicit_bwd_weight(
    dy_ptr, x_ptr, dw_ptr,
    ws_ptr, arrivals_ptr,                # split-K: fp32 partials and per-tile arrival counters
    N, C, H, W, OC, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sx_n, sx_c, sx_h, sx_w,
    sdw_o, sdw_c, sdw_h, sdw_w,
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    CG, OCG,
    SPLIT, P_SPLIT,                      # split-K: SPLIT pixel ranges of P_SPLIT pixels each
    FLAT_N: tl.constexpr,                # columns over (kh, kw, c) jointly: few input channels
    REDUCE_ROWS: tl.constexpr,           # split-K: rows of the tile the last program sums at once
    INPUT_PRECISION: tl.constexpr,
    GATHER_PIXELS: tl.constexpr,         # x's channels not at unit stride (NCHW): pixel-major
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[oc, (kh, kw, c)] = sum over pixels (n, oh, ow) of dY[n, oc, oh, ow] X[...]:
    M = output channels, N = (kh, kw, c) of the group, K = N * OH * OW output pixels.

    Column tiles (program_id(1)): one (kh, kw) tap and a block of BLOCK_N consecutive
    channels, as CUTLASS's wgrad iterator fixes (r, s) per tile. The X tile of a K step is
    then BLOCK_K pixel rows, each a run of contiguous channels for a channels_last input, so
    it loads with 16-byte vectors (and cp.async) like the forward's; the (h, w) of a row and
    its padding mask are computed once per pixel, not per element. With FLAT_N (fewer input
    channels than a 16-wide block would use, like an RGB stem) a column tile is BLOCK_N
    consecutive (kh, kw, c) columns, decoded per column instead. GATHER_PIXELS (not FLAT_N):
    an NCHW input's X tile is loaded as [channels, pixels] and transposed, a warp's lanes
    along the pixels, as the forward's A tile (dY's tile runs along the pixels already).

    Split-K: the weight gradient is a small M x N output with a very long K (every pixel of
    the batch), so its tiles alone cannot fill the GPU. program_id(2) = group * SPLIT + split;
    split s sums pixels [s * P_SPLIT, (s + 1) * P_SPLIT). With SPLIT > 1 each program stores
    its fp32 partial tile in the workspace, then counts its arrival on the tile's counter;
    the last to arrive sums the SPLIT partials in split order (so the result does not depend
    on which program finished last: deterministic), writes dW and resets the counter to 0
    for the next launch. No program waits for another, so no co-residency is assumed.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    group = tl.program_id(2) // SPLIT
    split = tl.program_id(2) % SPLIT
    oc = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    oc_ok = oc < OCG
    oc_abs = (group * OCG + oc).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    if FLAT_N:
        j = pid_n * BLOCK_N + cols                       # (kh, kw, c) flattened
        col_ok = j < CG * KH * KW
        kh, kw, c = unravel3(j, KW, CG)                  # per column
    else:
        NCB = tl.cdiv(CG, BLOCK_N)                       # channel blocks per tap
        tap = pid_n // NCB
        kh = tap // KW                                   # one tap per tile: scalars
        kw = tap % KW
        c = (pid_n % NCB) * BLOCK_N + cols
        col_ok = c < CG
    c_abs = (group * CG + c).to(tl.int64)
    pk = tl.arange(0, BLOCK_K)
    P = N * OH * OW
    p_end = tl.minimum(P, (split + 1) * P_SPLIT)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for p0 in range(split * P_SPLIT, p_end, BLOCK_K):
        p = p0 + pk
        p_ok = p < p_end
        n, oh, ow = unravel3(p, OH, OW)
        n = n.to(tl.int64)
        a = tl.load(dy_ptr + oc_abs[:, None] * sdy_c
                    + (n * sdy_n + oh.to(tl.int64) * sdy_h + ow.to(tl.int64) * sdy_w)[None, :],
                    mask=oc_ok[:, None] & p_ok[None, :], other=0.0)
        if FLAT_N:
            h = oh[:, None] * SH - PH + kh[None, :] * DH
            w = ow[:, None] * SW - PW + kw[None, :] * DW
            b_ok = p_ok[:, None] & col_ok[None, :] & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            b = tl.load(x_ptr + n[:, None] * sx_n + c_abs[None, :] * sx_c
                        + h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w, mask=b_ok, other=0.0)
        else:
            h = oh * SH - PH + kh * DH
            w = ow * SW - PW + kw * DW
            row_ok = p_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            row = n * sx_n + h.to(tl.int64) * sx_h + w.to(tl.int64) * sx_w
            b = gather_tile(x_ptr + row, c_abs * sx_c, row_ok, col_ok, GATHER_PIXELS)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    # dW's offsets are formed only where it is stored: live across the split-K reduction,
    # a tile of int64 offsets would take two registers per accumulator element
    dw_col = c.to(tl.int64) * sdw_c + kh * sdw_h + kw * sdw_w
    if SPLIT == 1:
        tl.store(dw_ptr + oc_abs[:, None] * sdw_o + dw_col[None, :],
                 acc.to(dw_ptr.dtype.element_ty), mask=oc_ok[:, None] & col_ok[None, :])
    else:
        # the tile's SPLIT partials lie together, each BLOCK_M x BLOCK_N fp32, row-major
        tile = (group * tl.num_programs(0) + pid_m) * tl.num_programs(1) + pid_n
        tile_ws = ws_ptr + tile.to(tl.int64) * SPLIT * (BLOCK_M * BLOCK_N)
        tl.store(tile_ws + split * (BLOCK_M * BLOCK_N)
                 + (tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + cols[None, :]), acc)
        tl.debug_barrier()                               # every thread's partial is stored
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT - 1:
            # REDUCE_ROWS rows at a time, so that the sum and the partials in flight take
            # no more registers than the main loop
            for r0 in tl.static_range(0, BLOCK_M, REDUCE_ROWS):
                r = r0 + tl.arange(0, REDUCE_ROWS)
                total = sum_partials(tile_ws + (r[:, None] * BLOCK_N + cols[None, :]), SPLIT,
                                     BLOCK_M * BLOCK_N, 2)
                oc_r = pid_m * BLOCK_M + r
                tl.store(dw_ptr + (group * OCG + oc_r).to(tl.int64)[:, None] * sdw_o
                         + dw_col[None, :], total.to(dw_ptr.dtype.element_ty),
                         mask=(oc_r < OCG)[:, None] & col_ok[None, :])
            tl.atomic_xchg(arrivals_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def relayout_planes(
    x_ptr, y_ptr,
    C_A, HW_A, SN_A, SC_A,              # C, H * W and the planes side's image and channel
                                        # strides, each divided by ALIGN
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
    OUT: tl.constexpr,                  # planes x into packed y (False), or back (True)
    ALIGN: tl.constexpr,                # a power of two dividing the four
):
    """y = x between an NCHW tensor stored as planes (each (h, w) plane contiguous) and a
    packed channels_last one ((N, HW, C) contiguous), either way: the implicit kernels'
    channels_last operands made from NCHW ones, and their channels_last results written back
    (pydl/_conv_implicit.py's "channels_last" route). A program copies a [BLOCK_P pixels,
    BLOCK_C channels] tile of one image, along the pixels on the planes side and along the
    channels on the packed side; Triton moves the tile between the two layouts through shared
    memory. The sizes come divided by ALIGN so that the compiler knows them multiples of it
    (it proves multiples of 16 only): a 3000-frame plane then moves 16 bytes at a time."""
    C = C_A * ALIGN
    HW = HW_A * ALIGN
    tiles = tl.cdiv(HW, BLOCK_P)
    pid = tl.program_id(0)
    n = (pid // tiles).to(tl.int64)
    p = ((pid % tiles) * BLOCK_P + tl.arange(0, BLOCK_P)).to(tl.int64)
    c = (tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)).to(tl.int64)
    ok = (p < HW)[:, None] & (c < C)[None, :]
    planes = (n * SN_A + c * SC_A)[None, :] * ALIGN + p[:, None]
    packed = (n * HW + p)[:, None] * C + c[None, :]
    if OUT:
        tl.store(y_ptr + planes, tl.load(x_ptr + packed, mask=ok), mask=ok)
    else:
        tl.store(y_ptr + packed, tl.load(x_ptr + planes, mask=ok), mask=ok)


@triton.jit
def conv2d_bwd_bias(
    dy_ptr, db_ptr,
    N, OC, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """db[oc] = sum over (n, oh, ow) of dY[n, oc, oh, ow]; one program per channel block."""
    oc = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    oc_ok = oc < OC
    acc = tl.zeros([BLOCK_C, BLOCK_P], tl.float32)
    for p0 in range(0, N * OH * OW, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        n, oh, ow = unravel3(p, OH, OW)
        off = n.to(tl.int64) * sdy_n + oh.to(tl.int64) * sdy_h + ow.to(tl.int64) * sdy_w
        acc += tl.load(dy_ptr + oc.to(tl.int64)[:, None] * sdy_c + off[None, :],
                       mask=oc_ok[:, None] & (p < N * OH * OW)[None, :], other=0.0).to(tl.float32)
    tl.store(db_ptr + oc, tl.sum(acc, 1).to(db_ptr.dtype.element_ty), mask=oc_ok)


# --- explicit im2col ------------------------------------------------------------------------
#
# The im2col algorithm materialises the GEMM operand that the implicit kernels gather on the
# fly. For group g and a chunk of images the column matrix is
#
#     cols[g, p, j] = x[n, g*Cg + c, oh*SH - PH + kh*DH, ow*SW - PW + kw*DW]   (0 outside)
#     p = (n - n0, oh, ow) flattened,   j = (c, kh, kw) flattened (the weight's own order)
#
# so forward is Y_g = cols[g] @ W_g^T and grad weight dW_g = dY_g^T @ cols[g] (plain GEMMs,
# kernels/triton/gemm.py). Grad input computes dcols[g] = dY_g @ W_g and folds it back with
# col2im. cols is written with its group and pixel strides; j is contiguous.


@triton.jit
def conv2d_im2col(
    x_ptr, cols_ptr,
    n0, NB, C, H, W, OH, OW,            # images n0 .. n0 + NB - 1 of x (N, C, H, W); C is the total
    sx_n, sx_c, sx_h, sx_w,             # input strides
    scol_g, scol_p,                     # cols strides: group, pixel (the column j has stride 1)
    SH, SW, PH, PW, DH, DW,             # stride, padding (top, left), dilation
    KH: tl.constexpr, KW: tl.constexpr,
    CG,                                 # input channels per group
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr,
    TAPS_FIRST: tl.constexpr = False,   # columns j = (kh, kw, c), else (c, kh, kw)
):
    """cols[g, p, j] for a BLOCK_P x BLOCK_J tile; grid (cdiv(NB*OH*OW, BLOCK_P),
    cdiv(CG*KH*KW, BLOCK_J), groups). Every element of the tile is written (zeros for padding).
    TAPS_FIRST orders a row's columns by tap, channels innermost, and takes grid axis 1 as
    (tap, channel block), KH*KW*cdiv(CG, BLOCK_J) of them: a channels_last input's tile is
    then read along its contiguous channels.

    With a 1x1 kernel (stride 1, no padding) this is a layout change to a pixel-major
    (NB*H*W, C) matrix; with the kernel spanning the whole input (H = KH, W = KW) it packs a
    (N, C, KH, KW) weight into a contiguous (N, C*KH*KW) matrix."""
    pid_p = tl.program_id(0)
    pid_j = tl.program_id(1)
    group = tl.program_id(2)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)          # chunk pixels (n - n0, oh, ow)
    p_ok = p < NB * OH * OW
    nl, oh, ow = unravel3(p, OH, OW)
    n = (n0 + nl).to(tl.int64)
    if TAPS_FIRST:
        # grid axis 1 is (tap, channel block): one tap's BLOCK_J consecutive channels, so
        # the loads run along them (a flat j would hide that from the compiler)
        n_cb = tl.cdiv(CG, BLOCK_J)
        tap = pid_j // n_cb
        c = (pid_j % n_cb) * BLOCK_J + tl.arange(0, BLOCK_J)
        j_ok = c < CG
        j = tap * CG + c
        kh = tap // KW + tl.zeros([BLOCK_J], tl.int32)
        kw = tap % KW + tl.zeros([BLOCK_J], tl.int32)
    else:
        j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)      # (c, kh, kw)
        j_ok = j < CG * KH * KW
        c, kh, kw = unravel3(j, KH, KW)
    c_abs = (group * CG + c).to(tl.int64)
    h = oh[:, None] * SH - PH + kh[None, :] * DH
    w = ow[:, None] * SW - PW + kw[None, :] * DW
    ok = p_ok[:, None] & j_ok[None, :]
    x_ok = ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    v = tl.load(x_ptr + n[:, None] * sx_n + c_abs[None, :] * sx_c + h.to(tl.int64) * sx_h
                + w.to(tl.int64) * sx_w, mask=x_ok, other=0.0)
    col_off = group.to(tl.int64) * scol_g + p.to(tl.int64)[:, None] * scol_p + j[None, :]
    tl.store(cols_ptr + col_off, v.to(cols_ptr.dtype.element_ty), mask=ok)


@triton.jit
def conv2d_col2im(
    cols_ptr, dx_ptr,
    n0, NB, C, H, W, OH, OW,            # dx images n0 .. n0 + NB - 1; cols holds their pixels
    scol_g, scol_p,                     # dcols strides: group, pixel (the column j has stride 1)
    sdx_n, sdx_c, sdx_h, sdx_w,         # grad input strides
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr,
    CG,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    TAPS_FIRST: tl.constexpr = False,   # dcols' columns j = (kh, kw, c), else (c, kh, kw)
    STRIDE_PHASES: tl.constexpr = False,    # by stride phase (_index.py program_pixels)
):
    """dX[n, g*Cg + c, h, w] = sum over (kh, kw) of dcols[g, (n - n0, oh, ow), j(c, kh, kw)] with
    oh = (h + PH - kh*DH) / SH (and ow likewise) where that divides exactly and lies in the
    output. A gather, as in conv2d_implicit_bwd_input: every dX element of the chunk is
    written once by one program (no atomics, deterministic). Sums in fp32.
    Grid (cdiv(NB*H*W, BLOCK_M), cdiv(CG, BLOCK_C), groups); with STRIDE_PHASES, axis 0 is
    SH*SW phases x cdiv(NB*cdiv(H, SH)*cdiv(W, SW), BLOCK_M), a program visiting only the
    taps that reach its phase's pixels."""
    pid_c = tl.program_id(1)
    group = tl.program_id(2)
    # chunk input pixels (n - n0, h, w)
    nl, h, w, m_ok, kh0, kh_step, kw0, kw_step = program_pixels(
        tl.program_id(0), NB, H, W, SH, SW, PH, PW, BLOCK_M, STRIDE_PHASES)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)          # input channels within the group
    c_ok = c < CG
    if TAPS_FIRST:          # a tap's channels are contiguous columns
        col_c = cols_ptr + group.to(tl.int64) * scol_g + c.to(tl.int64)
        s_tap = CG
    else:
        col_c = cols_ptr + group.to(tl.int64) * scol_g + (c * (KH * KW)).to(tl.int64)
        s_tap = 1
    acc = tl.zeros([BLOCK_M, BLOCK_C], tl.float32)
    for kh in range(kh0, KH, kh_step):
        oh, oh_ok = window_of(h, kh, PH, DH, SH, OH)
        h_ok = m_ok & oh_ok
        row = ((nl * OH + oh) * OW).to(tl.int64)         # first pixel of output row (n, oh)
        for kw in range(kw0, KW, kw_step):
            ow, ow_ok = window_of(w, kw, PW, DW, SW, OW)
            ok = h_ok & ow_ok
            ptr = col_c[None, :] + ((row + ow) * scol_p)[:, None] + (kh * KW + kw) * s_tap
            acc += tl.load(ptr, mask=ok[:, None] & c_ok[None, :], other=0.0).to(tl.float32)
    n = (n0 + nl).to(tl.int64)
    c_abs = (group * CG + c).to(tl.int64)
    tl.store(dx_ptr + pixel_offsets(n, h, w, c_abs, sdx_n, sdx_h, sdx_w, sdx_c),
             acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & c_ok[None, :])
