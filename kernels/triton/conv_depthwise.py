"""Triton kernels for depthwise 2-D convolution: groups == C_in, so every output channel
oc = ci * M + j (M = C_out / C_in, the channel multiplier) reads one input channel ci.

Such a layer (MobileNet, EfficientNet, ConvNeXt's 7x7) has no matrix product in it: an
implicit GEMM would be a K = KH*KW, N = M product per channel, 1 useful column of 16, with
the channel's pixels gathered 2 bytes at a time from a channels_last tensor. These kernels
are direct convolutions on [pixels x channels] tiles instead, which for channels_last
inputs load contiguous channel vectors per tap (16 bytes a thread), and are memory-bound:

  forward      y[n, oc, oh, ow] = b[oc] + sum_(kh, kw) x[n, ci, oh*SH - PH + kh*DH,
                                                        ow*SW - PW + kw*DW] * w[oc, 0, kh, kw]
  grad input   dx[n, ci, h, w] = sum_(j, kh, kw) dy[n, ci*M + j, oh, ow] * w[ci*M + j, 0, kh, kw]
               over the windows that read (h, w) at (kh, kw) (a gather: no atomics)
  grad weight  dw[oc, 0, kh, kw] = sum_(n, oh, ow) dy[n, oc, oh, ow] * x[n, ci, ih, iw]
               one program per (kernel row, channel block, pixel range), the row's taps
               together (dY read once a row, not once a tap); the last program of a (row,
               channel block) to arrive sums the ranges' partials in order (deterministic;
               _split.py)

Every tensor comes with its strides (NCHW, channels_last and views alike); fp32
accumulation, one rounding to the output's dtype.
"""
import triton
import triton.language as tl

from ._index import (
    per_channel,
    program_pixels,
    tile_mask,
    tile_offsets,
    unravel3,
    window_of,
)
from ._split import arrive_last, sum_partials


@triton.jit
def conv2d_depthwise_fwd(
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C, H, W, OC, OH, OW,
    sx_n, sx_c, sx_h, sx_w,             # input strides
    sw_o, sw_h, sw_w,                   # weight strides (OC, 1, KH, KW): channel, row, column
    sy_n, sy_c, sy_h, sy_w,             # output strides
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PIXEL_MAJOR: tl.constexpr,          # NCHW: the tile [channels, pixels], lanes along pixels
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (cdiv(N*OH*OW, BLOCK_P), cdiv(OC, BLOCK_C)): a tile of output pixels x output
    channels, summed over the window's taps. PIXEL_MAJOR (x's channels a plane apart): the
    tile is held as [channels, pixels], so that a warp's lanes run along a row's pixels (a
    [pixels, channels] tile of 4 channels spreads a warp over 4 planes: 4 sectors and 4 L1
    wavefronts a load where 2 sectors and 1 serve)."""
    n, oh, ow, p_ok, _, _, _, _ = program_pixels(tl.program_id(0), N, OH, OW, 1, 1, 0, 0,
                                                 BLOCK_P, False)   # output pixels
    n = n.to(tl.int64)
    oc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    oc_ok = oc < OC
    ci = (oc // M).to(tl.int64)
    acc = tl.zeros([BLOCK_C, BLOCK_P] if PIXEL_MAJOR else [BLOCK_P, BLOCK_C], tl.float32)
    for kh in range(KH):
        h = oh * SH - PH + kh * DH
        h_ok = p_ok & (h >= 0) & (h < H)
        for kw in range(KW):
            w = ow * SW - PW + kw * DW
            ok = h_ok & (w >= 0) & (w < W)
            xv = tl.load(x_ptr + tile_offsets(n, h, w, ci, sx_n, sx_h, sx_w, sx_c, PIXEL_MAJOR),
                         mask=tile_mask(ok, oc_ok, PIXEL_MAJOR), other=0.0)
            wv = tl.load(w_ptr + oc.to(tl.int64) * sw_o + tl.cast(kh, tl.int64) * sw_h
                         + tl.cast(kw, tl.int64) * sw_w, mask=oc_ok, other=0.0)
            acc += xv.to(tl.float32) * per_channel(wv.to(tl.float32), PIXEL_MAJOR)
    if HAS_BIAS:
        acc += per_channel(tl.load(b_ptr + oc, mask=oc_ok, other=0.0).to(tl.float32),
                           PIXEL_MAJOR)
    tl.store(y_ptr + tile_offsets(n, oh, ow, oc.to(tl.int64), sy_n, sy_h, sy_w, sy_c,
                                  PIXEL_MAJOR),
             acc.to(y_ptr.dtype.element_ty), mask=tile_mask(p_ok, oc_ok, PIXEL_MAJOR))


@triton.jit
def conv2d_depthwise_bwd_input(
    dy_ptr, w_ptr, dx_ptr,
    N, C, H, W, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,         # upstream gradient strides (N, OC, OH, OW)
    sw_o, sw_h, sw_w,
    sdx_n, sdx_c, sdx_h, sdx_w,         # grad input strides
    SH, SW, PH, PW, DH, DW,
    KH: tl.constexpr, KW: tl.constexpr, M: tl.constexpr,
    STRIDE_PHASES: tl.constexpr,        # by stride phase (a stride > 1, no dilation)
    PIXEL_MAJOR: tl.constexpr,          # NCHW dx: the tile [channels, pixels], as the forward's
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A tile of input pixels x input channels, each element the sum over the M output
    channels it feeds and the taps whose window reads it (window_of: the output pixel, if
    any, that reads (h, w) at (kh, kw)). Grid (cdiv(N*H*W, BLOCK_P), cdiv(C, BLOCK_C)); with
    STRIDE_PHASES (SH * SW phases x cdiv(N*cdiv(H, SH)*cdiv(W, SW), BLOCK_P), ...) a tile
    holds pixels of one stride phase (h % SH, w % SW), which only the taps kh = (h + PH) % SH
    + i*SH (and kw likewise) reach: it visits those, not all KH x KW with most masked, as
    conv.py's implicit grad input does."""
    n, h, w, p_ok, kh0, kh_step, kw0, kw_step = program_pixels(
        tl.program_id(0), N, H, W, SH, SW, PH, PW, BLOCK_P, STRIDE_PHASES)
    n = n.to(tl.int64)
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = ci < C
    acc = tl.zeros([BLOCK_C, BLOCK_P] if PIXEL_MAJOR else [BLOCK_P, BLOCK_C], tl.float32)
    for kh in range(kh0, KH, kh_step):
        oh, oh_ok = window_of(h, kh, PH, DH, SH, OH)
        h_ok = p_ok & oh_ok
        for kw in range(kw0, KW, kw_step):
            ow, ow_ok = window_of(w, kw, PW, DW, SW, OW)
            ok = tile_mask(h_ok & ow_ok, c_ok, PIXEL_MAJOR)
            for m in range(M):
                oc = (ci * M + m).to(tl.int64)
                g = tl.load(dy_ptr + tile_offsets(n, oh, ow, oc, sdy_n, sdy_h, sdy_w, sdy_c,
                                                  PIXEL_MAJOR), mask=ok, other=0.0)
                wv = tl.load(w_ptr + oc * sw_o + tl.cast(kh, tl.int64) * sw_h
                             + tl.cast(kw, tl.int64) * sw_w, mask=c_ok, other=0.0)
                acc += g.to(tl.float32) * per_channel(wv.to(tl.float32), PIXEL_MAJOR)
    tl.store(dx_ptr + tile_offsets(n, h, w, ci.to(tl.int64), sdx_n, sdx_h, sdx_w, sdx_c,
                                   PIXEL_MAJOR),
             acc.to(dx_ptr.dtype.element_ty), mask=tile_mask(p_ok, c_ok, PIXEL_MAJOR))


@triton.jit
def conv2d_depthwise_bwd_weight(
    dy_ptr, x_ptr, dw_ptr, parts_ptr, arrivals_ptr,
    N, C, H, W, OC, OH, OW,
    sdy_n, sdy_c, sdy_h, sdy_w,
    sx_n, sx_c, sx_h, sx_w,
    sdw_o, sdw_h, sdw_w,                # grad weight strides (OC, 1, KH, KW)
    SH, SW, PH, PW, DH, DW,
    SPLIT, P_SPLIT,                     # pixel ranges, pixels a range (runtime: one compiled
                                        # kernel for every batch size, the sum not unrolled)
    KH: tl.constexpr, KW: tl.constexpr, M: tl.constexpr, ONE_RANGE: tl.constexpr,
    IN_FLIGHT: tl.constexpr,            # partials loaded at a time by the tile's last program
    PIXEL_MAJOR: tl.constexpr,          # NCHW: tiles [channels, pixels], [taps, channels, pixels]
    BLOCK_KW: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Grid (KH, cdiv(OC, BLOCK_C), SPLIT): one kernel row kh of a channel block, all its KW
    taps at once, over output pixels [s*P_SPLIT, (s+1)*P_SPLIT) (a multiple of BLOCK_P). A
    pixel block's dY tile is loaded once for the row's taps, and the input as one
    [BLOCK_KW, BLOCK_P, BLOCK_C] gather whose taps overlap (mostly L1 hits); the products
    are summed over pixels at the end. The rows of one pixel range are consecutive programs
    (they read the same dY, from L2 after the first). With several ranges each program stores
    its fp32 partial (parts: (KH*cdiv(OC, BLOCK_C), SPLIT, BLOCK_KW, BLOCK_C)) and the last of
    a (row, channel block) to arrive writes their sum; ONE_RANGE (SPLIT == 1) writes directly
    (parts and arrivals are not read). PIXEL_MAJOR (NCHW): the pixels are the tiles' last axis
    ([channels, pixels] of dY, [taps, channels, pixels] of X), so that a warp's lanes run
    along the taps and a row's pixels (overlapping windows: a sector or two a load) instead of
    across 4 channel planes."""
    kh = tl.program_id(0)
    pid_c = tl.program_id(1)
    s = tl.program_id(2)
    kw = tl.arange(0, BLOCK_KW)
    kw_ok = kw < KW
    c = tl.arange(0, BLOCK_C)
    oc = pid_c * BLOCK_C + c
    oc_ok = oc < OC
    oc64 = oc.to(tl.int64)
    ci = (oc // M).to(tl.int64)
    acc = tl.zeros([BLOCK_KW, BLOCK_C, BLOCK_P] if PIXEL_MAJOR else
                   [BLOCK_KW, BLOCK_P, BLOCK_C], tl.float32)
    P = N * OH * OW
    for p0 in range(s * P_SPLIT, s * P_SPLIT + P_SPLIT, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        p_ok = p < P
        n, oh, ow = unravel3(p, OH, OW)
        n = n.to(tl.int64)
        g = tl.load(dy_ptr + tile_offsets(n, oh, ow, oc64, sdy_n, sdy_h, sdy_w, sdy_c,
                                          PIXEL_MAJOR),
                    mask=tile_mask(p_ok, oc_ok, PIXEL_MAJOR), other=0.0)
        h = oh * SH - PH + kh * DH
        row_ok = p_ok & (h >= 0) & (h < H)
        w = ow[None, :] * SW - PW + kw[:, None] * DW                  # [BLOCK_KW, BLOCK_P]
        ok = kw_ok[:, None] & row_ok[None, :] & (w >= 0) & (w < W)
        at = (n * sx_n + h.to(tl.int64) * sx_h)[None, :] + w.to(tl.int64) * sx_w
        if PIXEL_MAJOR:
            xv = tl.load(x_ptr + at[:, None, :] + (ci * sx_c)[None, :, None],
                         mask=ok[:, None, :] & oc_ok[None, :, None], other=0.0)
        else:
            xv = tl.load(x_ptr + at[:, :, None] + (ci * sx_c)[None, None, :],
                         mask=ok[:, :, None] & oc_ok[None, None, :], other=0.0)
        acc += g.to(tl.float32)[None, :, :] * xv.to(tl.float32)
    total = tl.sum(acc, 2 if PIXEL_MAJOR else 1)                       # [BLOCK_KW, BLOCK_C]
    dw = dw_ptr + oc64[None, :] * sdw_o + kh * sdw_h + kw[:, None] * sdw_w
    dw_ok = kw_ok[:, None] & oc_ok[None, :]
    if ONE_RANGE:
        tl.store(dw, total.to(dw_ptr.dtype.element_ty), mask=dw_ok)
    else:
        tile = kh * tl.num_programs(1) + pid_c
        parts = parts_ptr + (tile * SPLIT).to(tl.int64) * (BLOCK_KW * BLOCK_C) \
            + kw[:, None] * BLOCK_C + c[None, :]
        tl.store(parts + s * (BLOCK_KW * BLOCK_C), total)
        if arrive_last(arrivals_ptr + tile, SPLIT):
            total = sum_partials(parts, SPLIT, BLOCK_KW * BLOCK_C, IN_FLIGHT)
            tl.store(dw, total.to(dw_ptr.dtype.element_ty), mask=dw_ok)
