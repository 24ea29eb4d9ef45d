"""float64 NumPy reference for 2-D convolution (NCHW), forward and backward, and for padding.

Written from the math, not by calling torch. For input x (N, C_in, H, W), weight
w (C_out, C_in / G, KH, KW), stride (s_h, s_w), dilation (d_h, d_w), padding and G groups,
with x_p the padded input and c_o in group g = c_o // (C_out / G):

    y[n, c_o, i, j] = b[c_o] + sum_{c, p, q} w[c_o, c, p, q]
                                  * x_p[n, g * C_in / G + c, i * s_h + p * d_h, j * s_w + q * d_w]

    OH = floor((H + pad_top + pad_bottom - d_h (KH - 1) - 1) / s_h) + 1   (pydl._shapes)

Deviation from the lecture notes: the lectures define convolution with a flipped kernel,
x[i - p, j - q]; like torch and cuDNN, pydl computes the cross-correlation above (the kernel is
not flipped). A learnt kernel absorbs the flip, but a fixed asymmetric filter (an edge
detector) gives the opposite sign.

It is computed as im2col + one matmul per group: the patches of x_p are gathered into a matrix
cols (N, C_in * KH * KW, OH * OW) and y_g = w_g (C_out/G, C_in/G * KH * KW) @ cols_g. The
backward pass is the transpose of that:

    grad_b = sum over n, i, j of grad_y
    grad_w_g = sum_n grad_y_g @ cols_g^T
    grad_x_p = col2im(w_g^T @ grad_y_g)   (each patch entry added back where it was read)

and grad_x is grad_x_p with the padding folded back (see pad2d_backward).

padding is an int, a pair (applied to both sides), "valid" (none) or "same" (stride 1 only;
an uneven total d (K - 1) puts the extra row/column at the bottom/right, as torch does).
padding_mode is torch Conv2d's: "zeros", "reflect", "replicate" or "circular".

Array-module generic (see _xp.py): given CuPy arrays, the same code runs on the GPU and
returns CuPy arrays.
"""
from __future__ import annotations

from .._shapes import conv_output_size_padded, conv_padding, pair
from ._xp import add_at, array_module, f64

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# --- padding ----------------------------------------------------------------------------------

def _pad_source(xp, n: int, before: int, after: int, mode: str):
    """For each position of a padded axis, the input position it copies and whether it copies
    one at all (False: a zero of "zeros" padding)."""
    if before < 0 or after < 0:
        raise ValueError(f"padding must be non-negative, got ({before}, {after})")
    i = xp.arange(-before, n + after)
    inside = (i >= 0) & (i < n)
    if mode == "zeros":
        return xp.clip(i, 0, n - 1), inside
    if mode == "replicate":
        return xp.clip(i, 0, n - 1), xp.ones_like(inside)
    if mode == "reflect":
        # Mirror about the edge elements without repeating them: -1 -> 1, n -> n - 2.
        if max(before, after) >= n:
            raise ValueError(f"reflect padding ({before}, {after}) must be less than the "
                             f"input size {n}")
        src = xp.abs(i)
        src = xp.where(src > n - 1, 2 * (n - 1) - src, src)
        return src, xp.ones_like(inside)
    if mode == "circular":
        if max(before, after) > n:
            raise ValueError(f"circular padding ({before}, {after}) must be at most the input "
                             f"size {n} (it may wrap around only once)")
        return i % n, xp.ones_like(inside)
    raise ValueError(f"padding mode must be one of {PADDING_MODES}, got {mode!r}")


def pad2d(x, pads, mode: str = "zeros"):
    """Pad the last two axes by pads = (top, bottom, left, right).

    Note the order: torch.nn.functional.pad takes (left, right, top, bottom).
    """
    xp = array_module(x)
    x = f64(xp, x)
    top, bottom, left, right = (int(p) for p in pads)
    src_h, in_h = _pad_source(xp, x.shape[-2], top, bottom, mode)
    src_w, in_w = _pad_source(xp, x.shape[-1], left, right, mode)
    out = x[..., src_h[:, None], src_w[None, :]]
    return xp.where(in_h[:, None] & in_w[None, :], out, 0.0)


def pad2d_backward(grad_out, input_shape, pads, mode: str = "zeros"):
    """dL/dx for y = pad2d(x, pads, mode): each padded element's gradient goes back to the
    input element it copied (several, for reflect/replicate/circular borders)."""
    xp = array_module(grad_out)
    g = f64(xp, grad_out)
    top, bottom, left, right = (int(p) for p in pads)
    H, W = input_shape[-2:]
    src_h, in_h = _pad_source(xp, H, top, bottom, mode)
    src_w, in_w = _pad_source(xp, W, left, right, mode)
    g = xp.where(in_h[:, None] & in_w[None, :], g, 0.0)
    grad = xp.zeros(tuple(input_shape), dtype=xp.float64)
    add_at(xp, grad, (..., src_h[:, None], src_w[None, :]), g)
    return grad


# --- convolution --------------------------------------------------------------------------------

def _setup(x_shape, w_shape, stride, padding, dilation, groups):
    """Validate shapes and options; returns (stride, dilation, pads, (OH, OW))."""
    if len(x_shape) != 4:
        raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {tuple(x_shape)}")
    if len(w_shape) != 4:
        raise ValueError(f"weight must be (C_out, C_in / groups, KH, KW), got shape "
                         f"{tuple(w_shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool) or groups <= 0:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    N, C, H, W = x_shape
    C_out, C_g, KH, KW = w_shape
    if C % groups or C_out % groups:
        raise ValueError(f"in_channels ({C}) and out_channels ({C_out}) must both be divisible "
                         f"by groups ({groups})")
    if C_g != C // groups:
        raise ValueError(f"weight of shape {tuple(w_shape)} expects {C_g * groups} input "
                         f"channels with groups={groups}, but the input has {C}")
    stride, dilation = pair(stride, "stride"), pair(dilation, "dilation")
    pads = conv_padding(padding, (KH, KW), stride, dilation)
    OH = conv_output_size_padded(H, KH, stride[0], pads[0], pads[1], dilation[0],
                                 name="input height")
    OW = conv_output_size_padded(W, KW, stride[1], pads[2], pads[3], dilation[1],
                                 name="input width")
    return stride, dilation, pads, (OH, OW)


def _patch_index(xp, K, s, d, out):
    """Row (or column) of the padded input that patch entry k of output position o reads:
    o * s + k * d, as a (K, out) table."""
    return xp.arange(K)[:, None] * d + xp.arange(out)[None, :] * s


def _im2col(xp, x_p, KH, KW, stride, dilation, OH, OW):
    """(N, C, Hp, Wp) -> (N, C, KH, KW, OH, OW): every patch entry of every output position."""
    rows = _patch_index(xp, KH, stride[0], dilation[0], OH)[:, None, :, None]
    cols = _patch_index(xp, KW, stride[1], dilation[1], OW)[None, :, None, :]
    return x_p[:, :, rows, cols]


def _col2im(xp, cols, x_p_shape, stride, dilation):
    """Transpose of _im2col: add every patch entry back into the element it was read from
    (overlapping patches accumulate, hence add_at and not assignment)."""
    _, _, KH, KW, OH, OW = cols.shape
    rows = _patch_index(xp, KH, stride[0], dilation[0], OH)[:, None, :, None]
    cidx = _patch_index(xp, KW, stride[1], dilation[1], OW)[None, :, None, :]
    out = xp.zeros(x_p_shape, dtype=xp.float64)
    add_at(xp, out, (slice(None), slice(None), rows, cidx), cols)
    return out


def _batched(xp, x):
    x = f64(xp, x)
    if x.ndim == 3:  # unbatched (C, H, W), as torch accepts
        return x[None], True
    return x, False


def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, groups: int = 1, *,
           padding_mode: str = "zeros"):
    """y = cross-correlation of x with w (+ bias), torch.nn.functional.conv2d's semantics."""
    xp = array_module(x, w, bias)
    x, unbatched = _batched(xp, x)
    w = f64(xp, w)
    stride, dilation, pads, (OH, OW) = _setup(x.shape, w.shape, stride, padding, dilation,
                                              groups)
    N, C = x.shape[:2]
    C_out, C_g, KH, KW = w.shape
    x_p = pad2d(x, pads, padding_mode)
    cols = _im2col(xp, x_p, KH, KW, stride, dilation, OH, OW)
    # (N, G, C/G * KH * KW, OH * OW): channel-major patch rows, matching w's (c, p, q) order
    cols = cols.reshape(N, groups, C_g * KH * KW, OH * OW)
    w_g = w.reshape(groups, C_out // groups, C_g * KH * KW)
    y = (w_g @ cols).reshape(N, C_out, OH, OW)  # (G, Co/G, K) @ (N, G, K, L), per group
    if bias is not None:
        b = f64(xp, bias)
        if b.shape != (C_out,):
            raise ValueError(f"bias must have shape ({C_out},), got {b.shape}")
        y = y + b[None, :, None, None]
    return y[0] if unbatched else y


def conv2d_backward(grad_out, x, w, stride=1, padding=0, dilation=1, groups: int = 1,
                    has_bias: bool = False, *, padding_mode: str = "zeros"):
    """(grad_x, grad_w, grad_b or None) for y = conv2d(x, w, b, stride, padding, ...)."""
    xp = array_module(grad_out, x, w)
    x, unbatched = _batched(xp, x)
    w = f64(xp, w)
    g = f64(xp, grad_out)
    if unbatched:
        g = g[None]
    stride, dilation, pads, (OH, OW) = _setup(x.shape, w.shape, stride, padding, dilation,
                                              groups)
    N, C = x.shape[:2]
    C_out, C_g, KH, KW = w.shape
    if g.shape != (N, C_out, OH, OW):
        raise ValueError(f"grad_out must have the output's shape {(N, C_out, OH, OW)}, "
                         f"got {g.shape}")
    x_p = pad2d(x, pads, padding_mode)
    cols = _im2col(xp, x_p, KH, KW, stride, dilation, OH, OW).reshape(
        N, groups, C_g * KH * KW, OH * OW)
    g_g = g.reshape(N, groups, C_out // groups, OH * OW)
    w_g = w.reshape(groups, C_out // groups, C_g * KH * KW)

    grad_w = (g_g @ cols.transpose(0, 1, 3, 2)).sum(axis=0).reshape(w.shape)
    grad_cols = w_g.transpose(0, 2, 1) @ g_g  # (N, G, C/G * KH * KW, OH * OW)
    grad_x_p = _col2im(xp, grad_cols.reshape(N, C, KH, KW, OH, OW), x_p.shape, stride,
                       dilation)
    grad_x = pad2d_backward(grad_x_p, x.shape, pads, padding_mode)
    grad_b = g.sum(axis=(0, 2, 3)) if has_bias else None
    return (grad_x[0] if unbatched else grad_x), grad_w, grad_b
