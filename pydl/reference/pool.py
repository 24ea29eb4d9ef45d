"""float64 NumPy references for 2-D max, average and adaptive average pooling (NCHW), forward
and backward, with PyTorch's semantics. Written from the math, not by calling torch.

Window (i, j) of a pool with kernel (KH, KW), stride S, padding P and dilation D reads rows
i * S_h - P_h + p * D_h (p < KH) and columns likewise; the output length is
pydl._shapes.pool_output_size (floor, or with ceil_mode one more window when it starts inside
the input or left padding; that last window may run past the padded edge).

max_pool2d: out = max over the window's in-bounds elements (padding acts as -inf) and
    indices = the argmax as a flat per-plane index h * W + w of the unpadded input. Rules that
    match torch (its CPU and CUDA kernels scan the window row-major and take an element when
    `val > max or isnan(val)`):
    - ties go to the FIRST maximum in row-major window order;
    - a NaN beats everything, and with several NaNs the LAST one's index is returned;
    - a window whose in-bounds elements are all -inf returns -inf and its first in-bounds
      element; with dilation a window can hold no in-bounds element at all, and torch then
      returns -inf with the index (first non-negative row) * W + (first non-negative column),
      which lies outside the plane. The forward pass mirrors that; max_pool2d_backward drops
      such indices (there is no input element to route to; torch's own backward writes out of
      bounds there).
    The backward pass routes grad_out[i, j] to input element indices[i, j], accumulating where
    overlapping windows share an argmax.

avg_pool2d: out = (sum of the window's in-bounds elements) / divisor, where, with the window
    [h0, h0 + KH) clipped on the right to the padded input, [h0, min(h0 + KH, H + P_h)):
    - divisor_override, if given;
    - else with count_include_pad, the size of that clipped window (padding counts, but not the
      part of a ceil_mode window that runs past the padded edge);
    - else the number of input elements in the window.
    backward: grad_x[h, w] = sum over windows containing (h, w) of grad_out / divisor.

adaptive_avg_pool2d: output row i averages input rows [floor(i H / OH), ceil((i + 1) H / OH)),
    columns likewise. The average is separable, so out = A_h @ x @ A_w^T with A[i, h] =
    1 / (window length) inside window i; backward is grad_x = A_h^T @ grad_out @ A_w.

Array-module generic (see _xp.py): given CuPy arrays, the same code runs on the GPU and
returns CuPy arrays.
"""
from __future__ import annotations

from .._shapes import pair, pool_output_size
from ._xp import add_at, array_module, f64


def _batched(xp, x):
    x = f64(xp, x)
    if x.ndim == 3:  # unbatched (C, H, W), as torch accepts
        return x[None], True
    if x.ndim != 4:
        raise ValueError(f"input must be (N, C, H, W) or (C, H, W), got shape {x.shape}")
    return x, False


def _shape4(input_shape) -> tuple[tuple[int, int, int, int], bool]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) == 3:
        return (1,) + shape, True
    if len(shape) != 4:
        raise ValueError(f"input_shape must be (N, C, H, W) or (C, H, W), got {shape}")
    return shape, False


class _Windows:
    """The pooling windows of one configuration: for every output position, the rows and
    columns its window reads (pos_h (OH, KH), pos_w (OW, KW)) and which of them are inside
    the input; tables of array module xp."""

    def __init__(self, xp, H, W, kernel_size, stride, padding, dilation, ceil_mode):
        self.xp = xp
        self.H, self.W = H, W
        self.kh, self.kw = pair(kernel_size, "kernel_size")
        # stride=None (or torch's empty list) means stride = kernel_size
        if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
            stride = (self.kh, self.kw)
        self.sh, self.sw = pair(stride, "stride")
        self.ph, self.pw = pair(padding, "padding")
        self.dh, self.dw = pair(dilation, "dilation")
        self.OH = pool_output_size(H, self.kh, self.sh, self.ph, self.dh, ceil_mode,
                                   name="input height")
        self.OW = pool_output_size(W, self.kw, self.sw, self.pw, self.dw, ceil_mode,
                                   name="input width")
        self.pos_h = (xp.arange(self.OH)[:, None] * self.sh - self.ph
                      + xp.arange(self.kh)[None, :] * self.dh)
        self.pos_w = (xp.arange(self.OW)[:, None] * self.sw - self.pw
                      + xp.arange(self.kw)[None, :] * self.dw)
        in_h = (self.pos_h >= 0) & (self.pos_h < H)
        in_w = (self.pos_w >= 0) & (self.pos_w < W)
        # (OH, OW, KH * KW), row-major window order (the order torch scans a window in)
        self.valid = (in_h[:, None, :, None] & in_w[None, :, None, :]).reshape(
            self.OH, self.OW, -1)
        self.flat = (self.pos_h[:, None, :, None] * W + self.pos_w[None, :, None, :]).reshape(
            self.OH, self.OW, -1)

    def gather(self, x, fill):
        """(N, C, H, W) -> (N, C, OH, OW, KH * KW), out-of-bounds entries set to `fill`."""
        xp = self.xp
        rows = xp.clip(self.pos_h, 0, self.H - 1)[:, None, :, None]
        cols = xp.clip(self.pos_w, 0, self.W - 1)[None, :, None, :]
        v = x[:, :, rows, cols].reshape(x.shape[:2] + (self.OH, self.OW, -1))
        return xp.where(self.valid, v, fill)

    def scatter(self, values, shape):
        """Transpose of gather: add values (N, C, OH, OW, KH * KW) into the in-bounds elements
        they came from."""
        xp = self.xp
        N, C = shape[:2]
        grad = xp.zeros((N * C, self.H * self.W), dtype=xp.float64)
        plane = xp.arange(N * C)[:, None]
        idx = xp.broadcast_to(self.flat[self.valid], (N * C, int(self.valid.sum())))
        vals = values.reshape(N * C, self.OH, self.OW, -1)[:, self.valid]
        add_at(xp, grad, (plane, idx), vals)
        return grad.reshape(shape)


# --- max pooling ------------------------------------------------------------------------------

def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False):
    """(out, indices): torch.nn.functional.max_pool2d(..., return_indices=True)."""
    xp = array_module(x)
    x, unbatched = _batched(xp, x)
    win = _Windows(xp, x.shape[2], x.shape[3], kernel_size, stride, padding, dilation,
                   ceil_mode)
    v = win.gather(x, -xp.inf)  # padding acts as -inf
    K = v.shape[-1]
    nan = xp.isnan(v)
    has_nan = nan.any(axis=-1)
    last_nan = K - 1 - xp.argmax(nan[..., ::-1], axis=-1)
    m = xp.max(xp.where(nan, -xp.inf, v), axis=-1)
    # first maximum (argmax returns the first True); -inf maxima handled below
    first_max = xp.argmax(win.valid & (v == m[..., None]), axis=-1)
    # torch's starting index: the first row and column of the window that are >= 0
    first_h = win.pos_h[xp.arange(win.OH), xp.argmax(win.pos_h >= 0, axis=1)]
    first_w = win.pos_w[xp.arange(win.OW), xp.argmax(win.pos_w >= 0, axis=1)]
    start = first_h[:, None] * win.W + first_w[None, :]  # (OH, OW)
    pick = xp.where(has_nan, last_nan, first_max)
    idx = xp.take_along_axis(xp.broadcast_to(win.flat, v.shape), pick[..., None], -1)[..., 0]
    # a max of -inf is never "greater" than torch's initial -inf: the start index stays
    idx = xp.where(~has_nan & (m == -xp.inf), start, idx).astype(xp.int64)
    out = xp.where(has_nan, xp.nan, m)
    if unbatched:
        return out[0], idx[0]
    return out, idx


def max_pool2d_backward(grad_out, indices, input_shape):
    """dL/dx: grad_out routed to the argmax of each window, accumulated over windows."""
    xp = array_module(grad_out, indices)
    shape, unbatched = _shape4(input_shape)
    N, C, H, W = shape
    g = f64(xp, grad_out)
    idx = xp.asarray(indices, dtype=xp.int64)
    g_shape, idx_shape = g.shape, idx.shape
    g, idx = g.reshape(N * C, -1), idx.reshape(N * C, -1)
    if g.shape != idx.shape:
        raise ValueError(f"grad_out {g_shape} and indices {idx_shape} must have the same shape")
    grad = xp.zeros((N * C, H * W), dtype=xp.float64)
    plane = xp.broadcast_to(xp.arange(N * C)[:, None], idx.shape)
    inside = (idx >= 0) & (idx < H * W)  # an all-padding window has no input to route to
    add_at(xp, grad, (plane[inside], idx[inside]), g[inside])
    grad = grad.reshape(shape)
    return grad[0] if unbatched else grad


# --- average pooling ------------------------------------------------------------------------

def _avg_divisor(win: _Windows, count_include_pad, divisor_override):
    """(OH, OW) divisors, torch's rule (see the module docstring)."""
    xp = win.xp
    if divisor_override is not None:
        if int(divisor_override) == 0:
            raise ValueError("divisor_override must be non-zero")
        return xp.full((win.OH, win.OW), float(divisor_override))
    if count_include_pad:
        def length(O, s, p, k, n):
            start = xp.arange(O) * s - p
            return xp.minimum(start + k, n + p) - start  # clipped to the padded input only
        return xp.outer(length(win.OH, win.sh, win.ph, win.kh, win.H),
                        length(win.OW, win.sw, win.pw, win.kw, win.W)).astype(xp.float64)
    return win.valid.sum(axis=-1).astype(xp.float64)


def avg_pool2d(x, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override=None):
    """torch.nn.functional.avg_pool2d."""
    xp = array_module(x)
    x, unbatched = _batched(xp, x)
    win = _Windows(xp, x.shape[2], x.shape[3], kernel_size, stride, padding, 1, ceil_mode)
    total = win.gather(x, 0.0).sum(axis=-1)
    out = total / _avg_divisor(win, count_include_pad, divisor_override)
    return out[0] if unbatched else out


def avg_pool2d_backward(grad_out, input_shape, kernel_size, stride=None, padding=0,
                        ceil_mode: bool = False, count_include_pad: bool = True,
                        divisor_override=None):
    """dL/dx for out = avg_pool2d(x, ...): each window spreads grad_out / divisor over its
    in-bounds elements."""
    xp = array_module(grad_out)
    shape, unbatched = _shape4(input_shape)
    win = _Windows(xp, shape[2], shape[3], kernel_size, stride, padding, 1, ceil_mode)
    g = f64(xp, grad_out).reshape(shape[:2] + (win.OH, win.OW))
    share = g / _avg_divisor(win, count_include_pad, divisor_override)
    grad = win.scatter(xp.broadcast_to(share[..., None], share.shape + (win.valid.shape[-1],)),
                       shape)
    return grad[0] if unbatched else grad


# --- adaptive average pooling -------------------------------------------------------------------

def _adaptive_matrix(xp, n: int, out: int):
    """(out, n): row i averages [floor(i n / out), ceil((i + 1) n / out))."""
    A = xp.zeros((out, n), dtype=xp.float64)
    for i in range(out):
        start = (i * n) // out
        end = -((-(i + 1) * n) // out)  # integer ceil, exact for any size
        A[i, start:end] = 1.0 / (end - start)
    return A


def _adaptive_size(output_size, H, W) -> tuple[int, int]:
    if isinstance(output_size, int) or output_size is None:
        output_size = (output_size, output_size)
    if len(output_size) != 2:
        raise ValueError(f"output_size must be an int or a pair, got {output_size!r}")
    # None keeps that input size, as in torch
    oh, ow = (H if output_size[0] is None else output_size[0],
              W if output_size[1] is None else output_size[1])
    if oh <= 0 or ow <= 0:
        raise ValueError(f"output_size must be positive, got {output_size!r}")
    return int(oh), int(ow)


def adaptive_avg_pool2d(x, output_size):
    """torch.nn.functional.adaptive_avg_pool2d."""
    xp = array_module(x)
    x, unbatched = _batched(xp, x)
    H, W = x.shape[2:]
    OH, OW = _adaptive_size(output_size, H, W)
    out = _adaptive_matrix(xp, H, OH) @ x @ _adaptive_matrix(xp, W, OW).T
    return out[0] if unbatched else out


def adaptive_avg_pool2d_backward(grad_out, input_shape):
    """dL/dx for out = adaptive_avg_pool2d(x, grad_out's spatial size)."""
    xp = array_module(grad_out)
    shape, unbatched = _shape4(input_shape)
    g = f64(xp, grad_out)
    g_shape = g.shape
    if unbatched:
        g = g[None]
    OH, OW = g.shape[-2:]
    if g.shape[:2] != shape[:2]:
        raise ValueError(f"grad_out {g_shape} does not match input_shape {shape}")
    grad = _adaptive_matrix(xp, shape[2], OH).T @ g @ _adaptive_matrix(xp, shape[3], OW)
    return grad[0] if unbatched else grad

