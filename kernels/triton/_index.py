"""Index arithmetic shared by the Triton conv and pooling kernels (inlined into each kernel).

- `unravel3`: the coordinates of flat indices over a row-major (A, B, C) extent, e.g. the pixels
  (n, oh, ow) of an implicit-GEMM row block or the (c, kh, kw) of a weight column block.
- `pixel_offsets`: int64 element offsets of a [pixels, channels] tile of an (N, C, H, W)
  tensor with any strides; `plane_offsets` of the [channels, pixels] tile, for tensors whose
  pixels, not channels, lie at unit stride (NCHW); `tile_offsets`, `tile_mask`,
  `per_channel`, `oriented`: either orientation, chosen by a constexpr; `gather_tile`: a
  [pixels, channels] tile loaded in either.
- `window_of`: the gather side of a sliding window. Output index o's window reads input
  coordinate o*S - P + k*D at kernel offset k; a backward pass that owns input coordinates x
  finds, for each offset k, the one window (if any) that reads x there.
- `program_pixels`: a program's block of pixels: of all of them, or (a gather: a grad input,
  by stride phase) of one phase, with the first kernel offset and the step that reach it.
"""
import triton
import triton.language as tl


@triton.jit
def unravel3(i, B, C):
    """(i // (B*C), (i // C) % B, i % C): the coordinates of flat indices i over (A, B, C)."""
    r = i % (B * C)
    return i // (B * C), r // C, r % C


@triton.jit
def window_of(x, k, P, D, S, O):
    """(o, ok): the output index whose window reads input coordinate x at kernel offset k
    (o*S - P + k*D == x), and whether there is one (x + P - k*D >= 0, a multiple of S, and
    o < O). o is meaningless where ok is False."""
    t = x + P - k * D
    o = t // S
    return o, (t >= 0) & (t - o * S == 0) & (o < O)


@triton.jit
def pixel_offsets(n, a, b, c, s_n, s_a, s_b, s_c):
    """[len(a), len(c)] int64 offsets of pixels (n, a, b) and channels c of a tensor with
    strides s_n, s_c, s_a, s_b: n (per pixel, or one image) and c are int64 already."""
    return (n * s_n + a.to(tl.int64) * s_a + b.to(tl.int64) * s_b)[:, None] + c[None, :] * s_c


@triton.jit
def plane_offsets(n, a, b, c, s_n, s_a, s_b, s_c):
    """pixel_offsets transposed: [len(c), len(a)] offsets, channels by pixels. Where the
    strides prove no axis contiguous (a gather), Triton lays a tile's last axis along a warp's
    lanes: the pixels here, the axis an NCHW tensor holds at unit stride, so that a warp's
    loads or stores cover a run of a row (2-4 sectors) instead of 32 planes (32 sectors)."""
    return c[:, None] * s_c + (n * s_n + a.to(tl.int64) * s_a + b.to(tl.int64) * s_b)[None, :]


@triton.jit
def tile_offsets(n, a, b, c, s_n, s_a, s_b, s_c, PIXEL_MAJOR: tl.constexpr):
    """A tile's offsets: [pixels, channels] (pixel_offsets), or with PIXEL_MAJOR [channels,
    pixels] (plane_offsets), for kernels whose whole tile turns with the layout."""
    if PIXEL_MAJOR:
        return plane_offsets(n, a, b, c, s_n, s_a, s_b, s_c)
    else:
        return pixel_offsets(n, a, b, c, s_n, s_a, s_b, s_c)


@triton.jit
def tile_mask(p_ok, c_ok, PIXEL_MAJOR: tl.constexpr):
    """The tile of tile_offsets' orientation where a pixel's and a channel's masks both hold."""
    if PIXEL_MAJOR:
        return c_ok[:, None] & p_ok[None, :]
    else:
        return p_ok[:, None] & c_ok[None, :]


@triton.jit
def per_channel(v, PIXEL_MAJOR: tl.constexpr):
    """A per-channel vector broadcast along tile_offsets' pixel axis."""
    if PIXEL_MAJOR:
        return v[:, None]
    else:
        return v[None, :]


@triton.jit
def oriented(tile, PIXEL_MAJOR: tl.constexpr):
    """A [pixels, channels] tile in tile_offsets' orientation (transposed with PIXEL_MAJOR)."""
    if PIXEL_MAJOR:
        return tl.trans(tile)
    else:
        return tile


@triton.jit
def gather_tile(rows, cols, row_ok, col_ok, PIXEL_MAJOR: tl.constexpr):
    """The [len(rows), len(cols)] tile at rows[:, None] + cols[None, :] (per-pixel pointers,
    per-channel offsets), zero where a mask fails; with PIXEL_MAJOR loaded as [cols, rows],
    a warp's lanes along the pixels, and transposed (for tl.dot, through shared memory)."""
    if PIXEL_MAJOR:
        return tl.trans(tl.load(rows[None, :] + cols[:, None],
                                mask=row_ok[None, :] & col_ok[:, None], other=0.0))
    else:
        return tl.load(rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                       other=0.0)


@triton.jit
def program_pixels(pid, NB, H, W, SH, SW, PH, PW, BLOCK: tl.constexpr,
                   STRIDE_PHASES: tl.constexpr):
    """A program's BLOCK pixels (grid axis 0 = pid) over NB images of H x W:
    (n (local), h, w, mask, kh0, kh_step, kw0, kw_step), the kernel offsets to visit being
    kh0, kh0 + kh_step, ... < KH (and kw likewise). Plainly: cdiv(NB*H*W, BLOCK) programs,
    every offset. With STRIDE_PHASES (stride > 1, no dilation): SH*SW phases x
    cdiv(NB*cdiv(H, SH)*cdiv(W, SW), BLOCK) programs, each on pixels of one phase (h % SH,
    w % SW), which only offsets kh = (h + PH) % SH + i*SH reach (kw likewise): a gather's
    input pixels (SH, SW, PH, PW are read only with STRIDE_PHASES)."""
    if STRIDE_PHASES:
        HP = tl.cdiv(H, SH)             # a phase's rows and columns, at most
        WP = tl.cdiv(W, SW)
        tiles = tl.cdiv(NB * HP * WP, BLOCK)
        phase = pid // tiles
        rh = phase // SW
        rw = phase % SW
        p = (pid % tiles) * BLOCK + tl.arange(0, BLOCK)
        n, i, j = unravel3(p, HP, WP)
        h = rh + i * SH
        w = rw + j * SW
        return (n, h, w, (p < NB * HP * WP) & (h < H) & (w < W), (rh + PH) % SH, SH,
                (rw + PW) % SW, SW)
    p = pid * BLOCK + tl.arange(0, BLOCK)
    n, h, w = unravel3(p, H, W)
    return n, h, w, p < NB * H * W, 0, 1, 0, 1
