"""Index arithmetic shared by the Numba conv and pooling kernels.

- `unravel4` / `unravel_nchw`: the coordinates of a flat element index, counted in memory order,
  so neighbouring threads of a 1-D grid touch neighbouring addresses.
- `window_of`: the gather side of a sliding window. Output index o's window reads input
  coordinate o*S - P + k*D at kernel offset k; a backward pass that owns input coordinate x
  walks the offsets k and finds, for each, the one window (if any) that reads x there.

Index arithmetic is int64 (Numba's integer type). The helpers are `device` functions (see
_device.py): inlined on the GPU, plain calls in the CUDA simulator.
"""
from ._device import device

BEFORE_ALL = -2   # window_of: no window at this kernel offset or any larger one


@device
def unravel4(i, B, C, D):
    """(i0, i1, i2, i3) of flat index i over a row-major (A, B, C, D) extent (i3 fastest)."""
    i3 = i % D
    t = i // D
    i2 = t % C
    t = t // C
    i1 = t % B
    return t // B, i1, i2, i3


@device
def unravel_nchw(i, C, A, B, channels_last):
    """(n, c, a, b) of flat index i over an (N, C, A, B) tensor, counted in memory order:
    (n, a, b, c) for channels_last, (n, c, a, b) otherwise."""
    if channels_last:
        n, a, b, c = unravel4(i, A, B, C)
    else:
        n, c, a, b = unravel4(i, C, A, B)
    return n, c, a, b


@device
def window_of(x, k, P, D, S, O):
    """The output index o < O whose window reads input coordinate x >= 0 at kernel offset k
    (o*S - P + k*D == x); -1 if there is none; BEFORE_ALL if x lies before the window start
    at k and so at every larger k (x + P - k*D < 0), where a loop over k can stop."""
    t = x + P - k * D
    if t < 0:
        return BEFORE_ALL
    o = t // S
    if o * S != t or o >= O:
        return -1
    return o
