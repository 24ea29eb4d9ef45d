"""Index arithmetic shared by the Triton conv and pooling kernels (inlined into each kernel).

- `unravel3`: the coordinates of flat indices over a row-major (A, B, C) extent, e.g. the pixels
  (n, oh, ow) of an implicit-GEMM row block or the (c, kh, kw) of a weight column block.
- `pixel_offsets`: int64 element offsets of a [pixels, channels] tile of an (N, C, H, W)
  tensor with any strides.
- `window_of`: the gather side of a sliding window. Output index o's window reads input
  coordinate o*S - P + k*D at kernel offset k; a backward pass that owns input coordinates x
  finds, for each offset k, the one window (if any) that reads x there.
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
