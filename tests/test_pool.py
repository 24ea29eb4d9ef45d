"""max_pool2d, avg_pool2d, adaptive_avg_pool2d: kernels against the float64 reference and
torch, forward, indices and gradient, every option of the signature."""
import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, KERNEL_BACKENDS, spy_kernels
from hypothesis import given, settings
from hypothesis import strategies as st

import pydl
from pydl import reference as ref
from pydl._launch import memory_format_of
from pydl._shapes import pool_output_size
from pydl.testing import assert_close, poisoned_outputs, random_tensor, run_with_grad

backends = pytest.mark.parametrize("backend", KERNEL_BACKENDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)
F = torch.nn.functional

# (input shape, kernel, stride, padding, dilation, ceil_mode)
MAX_CASES = [
    ((1, 1, 6, 6), 3, 3, 0, 1, False),      # the lecture's 6x6 with 3x3 windows -> 2x2
    ((2, 3, 8, 8), 2, 2, 0, 1, False),      # VGG's 2x2/2
    ((2, 3, 13, 13), 3, 2, 0, 1, False),    # AlexNet's overlapping 3x3/2
    ((1, 2, 9, 11), 3, 2, 1, 1, False),     # ResNet stem's 3x3/2 p1, odd sizes
    ((2, 1, 9, 9), 3, 1, 1, 2, False),      # dilation 2
    ((1, 3, 8, 7), 2, 2, 0, 1, True),       # ceil_mode: a last partial window
    ((2, 2, 7, 7), 3, 2, 1, 1, True),       # ceil_mode with padding
    ((1, 2, 5, 9), (2, 3), (1, 2), (1, 1), (1, 2), False),  # non-square everything
    ((3, 5, 4, 4), 4, 1, 2, 1, False),      # window = input, padding = half the kernel
]


def _max_case_id(case):
    shape, k, s, p, d, cm = case
    return f"{'x'.join(map(str, shape))}-k{k}-s{s}-p{p}-d{d}{'-ceil' if cm else ''}"


def _check_max(x, k, s, p, d, cm, backend, dtype):
    run = lambda t: pydl.max_pool2d(t, k, s, p, d, cm, backend=backend)  # noqa: E731
    out, g, (dx,) = run_with_grad(run, [x])
    # torch's CPU fp16 backward rounds after every add of overlapping windows; compare with its
    # fp32 result (the reference checks our own accuracy)
    t_x = x.float() if x.device.type == "cpu" else x
    t_out, _, (t_dx,) = run_with_grad(lambda t: F.max_pool2d(t, k, s, p, d, cm), [t_x],
                                      g.to(t_x.dtype))
    y64, idx64 = ref.max_pool2d(x.double().cpu().numpy(), k, s, p, d, cm)
    dx64 = ref.max_pool2d_backward(g.double().cpu().numpy(), idx64, tuple(x.shape))
    # an input element can be the argmax of up to KH * KW overlapping windows
    overlap = k * k if isinstance(k, int) else k[0] * k[1]
    assert_close(out, y64, dtype, name="forward vs reference")
    assert_close(out, t_out, dtype, name="forward vs torch")
    assert_close(dx, dx64, dtype, reduction=overlap, name="grad vs reference")
    assert_close(dx, t_dx, dtype, reduction=overlap, name="grad vs torch")
    # the inference forward (no gradient: no index, its own kernel path) gives the same maxima
    y_inf = pydl.max_pool2d(x.detach(), k, s, p, d, cm, backend=backend)
    assert torch.equal(y_inf, out.detach()), "inference forward differs from the training one"
    # return_indices: torch's flat per-plane indices, and the backward through them
    out_i, idx = pydl.max_pool2d(x, k, s, p, d, cm, return_indices=True, backend=backend)
    assert idx.dtype == torch.int64
    assert torch.equal(idx.cpu(), torch.from_numpy(idx64)), "indices differ from the reference"
    xi = x.detach().clone().requires_grad_()
    yi, _ = pydl.max_pool2d(xi, k, s, p, d, cm, return_indices=True, backend=backend)
    yi.backward(g)
    assert_close(xi.grad, dx64, dtype, reduction=overlap, name="grad through return_indices")


@backends
@dtypes
@pytest.mark.parametrize("case", MAX_CASES, ids=_max_case_id)
def test_max_pool2d(backend, dtype, case):
    shape, k, s, p, d, cm = case
    _check_max(random_tensor(shape, dtype, DEVICE), k, s, p, d, cm, backend, dtype)


@backends
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "offset", "unbatched"])
def test_max_pool2d_layouts(backend, layout):
    x = random_tensor((2, 6, 10, 9), torch.float32, DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, 1::2, 1:, ::2]
    elif layout == "offset":        # W contiguous (the planar kernels), rows not aligned
        x = x[:, :, 1:, 1:]
    else:
        x = x[0]
    _check_max(x, 3, 2, 1, 1, True, backend, torch.float32)
    if layout == "channels_last":
        y = pydl.max_pool2d(x, 3, 2, backend=backend)
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last must be kept"


@backends
def test_max_pool2d_ties_nan_and_inf(backend):
    x = torch.zeros(1, 2, 4, 4)
    x[0, 0] = torch.tensor([[1., 1, 0, 2], [1, 1, 2, 2], [0, 0, -1, -1], [0, 0, -1, -1]])  # ties
    x[0, 1] = float("-inf")
    x[0, 1, 0, 1] = float("nan")
    x[0, 1, 1, 0] = float("nan")    # two NaNs in one window: torch reports the last
    x[0, 1, 2, 2] = 5.0
    x = x.to(DEVICE)
    for k, s, p in ((2, 2, 0), (3, 1, 1)):
        y, idx = pydl.max_pool2d(x, k, s, p, return_indices=True, backend=backend)
        t_y, t_idx = F.max_pool2d(x, k, s, p, return_indices=True)
        assert_close(y, t_y, torch.float32)
        assert torch.equal(idx, t_idx), f"k={k}: {idx} != {t_idx}"
        y_inf = pydl.max_pool2d(x, k, s, p, backend=backend)       # no index kept
        torch.testing.assert_close(y_inf, t_y, rtol=0, atol=0, equal_nan=True)


MAX_POOL_FUZZ = dict(H=st.integers(1, 12), W=st.integers(1, 12), k=st.integers(1, 4),
                     s=st.integers(1, 3), d=st.integers(1, 2), cm=st.booleans())


@backends
@settings(max_examples=20, deadline=None)
@given(**MAX_POOL_FUZZ, p_frac=st.integers(0, 2))
def test_max_pool2d_fuzz(backend, H, W, k, s, d, cm, p_frac):
    p = min(p_frac, k // 2)
    if (H + 2 * p - d * (k - 1) - 1) < 0 or (W + 2 * p - d * (k - 1) - 1) < 0:
        return
    # With dilation a window can hold only padding; torch's backward then writes out of
    # bounds (and can crash the process), so such configurations are not compared with torch.
    for n in (H, W):
        out = pool_output_size(n, k, s, p, d, cm)
        if any(all(not 0 <= o * s - p + j * d < n for j in range(k)) for o in range(out)):
            return
    _check_max(random_tensor((1, 2, H, W), torch.float32, DEVICE), k, s, p, d, cm, backend,
               torch.float32)


# --- max pooling backward: stride phases, both layouts (triton) --------------------------------

@dtypes
@pytest.mark.parametrize("case", MAX_CASES + [((2, 3, 10, 9), 2, 3, 0, 1, False)],
                         ids=_max_case_id)
def test_max_pool2d_channels_last(dtype, case):
    """Every geometry above (and a stride longer than the window: inputs no window holds) on
    channels_last inputs, whose backward takes the channels-fastest kernel by stride phase;
    the cotangent is NCHW, as torch.randn makes it."""
    shape, k, s, p, d, cm = case
    shape = (shape[0], max(shape[1], 3)) + shape[2:]
    x = random_tensor(shape, dtype, DEVICE).to(memory_format=torch.channels_last)
    _check_max(x, k, s, p, d, cm, "triton", dtype)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("dy_layout", ["nchw", "channels_last"])
def test_max_pool2d_bwd_kernel_and_layout(monkeypatch, layout, dy_layout):
    """NCHW gradients go to the planar kernel (W-contiguous tiles of a plane), channels_last
    ones to the channels-fastest kernel; each receives the upstream gradient in its own
    layout (converted when it comes in the other), and the gradient is right."""
    from pydl.kernels.triton import pool as k
    seen = []
    spy_kernels(monkeypatch, k, ("max_pool2d_bwd", "max_pool2d_bwd_planar"),
                lambda name, args, kwargs: seen.append((name, args[0])))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    dy_fmt = torch.channels_last if dy_layout == "channels_last" else torch.contiguous_format
    x = random_tensor((2, 5, 11, 10), torch.float32, DEVICE).to(memory_format=fmt)
    g = random_tensor((2, 5, 6, 5), torch.float32, DEVICE).to(memory_format=dy_fmt)
    xg = x.clone().requires_grad_()
    pydl.max_pool2d(xg, 3, 2, 1, backend="triton").backward(g)
    y64, idx64 = ref.max_pool2d(x.double().numpy(), 3, 2, 1)
    assert_close(xg.grad, ref.max_pool2d_backward(g.double().numpy(), idx64, tuple(x.shape)),
                 torch.float32, reduction=9)
    ((name, dy),) = seen
    assert name == ("max_pool2d_bwd" if layout == "channels_last" else "max_pool2d_bwd_planar")
    assert dy.is_contiguous(memory_format=fmt)


@settings(max_examples=15, deadline=None)
@given(**MAX_POOL_FUZZ, p_frac=st.integers(0, 2), C=st.integers(2, 5))
def test_max_pool2d_channels_last_fuzz(H, W, k, s, d, cm, p_frac, C):
    p = min(p_frac, k // 2)
    if (H + 2 * p - d * (k - 1) - 1) < 0 or (W + 2 * p - d * (k - 1) - 1) < 0:
        return
    for n in (H, W):          # no window of only padding (torch's backward misbehaves there)
        out = pool_output_size(n, k, s, p, d, cm)
        if any(all(not 0 <= o * s - p + j * d < n for j in range(k)) for o in range(out)):
            return
    x = random_tensor((2, C, H, W), torch.float32, DEVICE).to(memory_format=torch.channels_last)
    _check_max(x, k, s, p, d, cm, "triton", torch.float32)


# --- max pooling backward: cells of every stride phase, tile boundaries (triton) --------------

LAYOUTS = pytest.mark.parametrize("layout", ["nchw", "channels_last"])


def _in_layout(x, layout):
    return x.to(memory_format=torch.channels_last) if layout == "channels_last" else x


BWD_CASES = [
    ((1, 1, 3, 300), 3, 2, 1, 1, False),                  # 150 cells a row: two column blocks
    ((2, 70, 9, 9), 3, 2, 1, 1, False),                   # 70 channels: a ragged channel block
    ((1, 2, 11, 10), 3, 2, 1, 2, True),                   # dilation at stride 2, ceil_mode
    ((2, 3, 10, 13), (3, 2), (3, 2), (1, 1), 1, False),   # 3 x 2 stride phases
    ((1, 2, 7, 19), 2, 3, 0, 1, True),                    # stride > window: inputs no window holds
]


@LAYOUTS
@pytest.mark.parametrize("case", BWD_CASES, ids=_max_case_id)
def test_max_pool2d_backward_cells(layout, case):
    """The backward kernels write all stride phases of a tile of cells (SH x SW inputs each):
    geometries whose cells span several column, channel or cell blocks, negative window
    shifts (dilation), uneven phase counts, and phases that no window reaches."""
    shape, k, s, p, d, cm = case
    x = _in_layout(random_tensor(shape, torch.float32, DEVICE), layout)
    _check_max(x, k, s, p, d, cm, "triton", torch.float32)


@LAYOUTS
@pytest.mark.parametrize("k, s, p", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 3, 1)])
def test_max_pool2d_backward_ties(layout, k, s, p):
    """Inputs from {0, 1, 2}: most windows hold their maximum several times (the first in scan
    order is the argmax, as in torch) and overlapping windows share argmaxes, so inputs
    receive the sum of several windows' gradients, in every stride phase."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randint(0, 3, (2, 5, 9, 11), generator=gen).float()
    y64, idx64 = ref.max_pool2d(x.double().numpy(), k, s, p)
    if k > s:      # the case is meaningful: some input is the argmax of several windows
        assert max(np.bincount(plane.ravel()).max() for plane in idx64.reshape(10, -1)) > 1
    _check_max(_in_layout(x.to(DEVICE), layout), k, s, p, 1, False, "triton", torch.float32)


@LAYOUTS
@pytest.mark.parametrize("dy_kind", ["sliced", "transposed"])
def test_max_pool2d_backward_strided_grad_output(layout, dy_kind):
    """A non-contiguous upstream gradient (a strided slice, or a transposed tensor) after a
    contiguous one through the same call's plan, in either layout of the input: each gets its
    own gradient (the backward's launch is kept per upstream-gradient strides)."""
    x = _in_layout(random_tensor((2, 6, 11, 12), torch.float32, DEVICE), layout)
    if dy_kind == "sliced":
        strided = random_tensor((2, 6, 6, 12), torch.float32, DEVICE)[..., 1::2]
    else:
        strided = random_tensor((2, 6, 6, 6), torch.float32, DEVICE).transpose(2, 3)
    assert not strided.is_contiguous()
    assert not strided.is_contiguous(memory_format=torch.channels_last)
    _, idx64 = ref.max_pool2d(x.double().cpu().numpy(), 3, 2, 1)
    xg = x.clone().requires_grad_()
    for g in (random_tensor((2, 6, 6, 6), torch.float32, DEVICE), strided):
        xg.grad = None
        pydl.max_pool2d(xg, 3, 2, 1, backend="triton").backward(g)
        want = ref.max_pool2d_backward(g.double().cpu().numpy(), idx64, tuple(x.shape))
        assert_close(xg.grad, want, torch.float32, reduction=9)


def _ramp(n: int) -> torch.Tensor:
    return torch.rand(n).add(0.1).cumsum(0)       # strictly increasing, random steps


@LAYOUTS
@pytest.mark.parametrize("case", [((2, 3, 12, 12), 3, 2, 1, 2, False),
                                  ((2, 3, 9, 12), 3, 2, 1, 1, False),
                                  ((3, 2, 8, 9), 2, 2, 1, 1, True)], ids=_max_case_id)
def test_max_pool2d_backward_edge_windows(layout, case):
    """Inputs increasing along H and W, so every window's argmax is its last element inside
    the input: the windows a cell reaches at a negative shift (window i - 1 of cell 0, at the
    top and left edges) and the ceil_mode windows past the bottom and right edges each name
    an element, and a window read outside the grid (another plane's last row, for one) would
    name its offset too."""
    shape, k, s, p, d, cm = case
    N, C, H, W = shape
    x = (_ramp(H)[:, None] + _ramp(W)[None, :]).expand(N, C, H, W)
    x = x + torch.arange(N * C, dtype=torch.float32).view(N, C, 1, 1)   # planes differ
    _check_max(_in_layout(x.contiguous().to(DEVICE), layout), k, s, p, d, cm, "triton",
               torch.float32)


@pytest.mark.parametrize("make, dim, align", [
    (lambda: torch.empty(2, 3, 7, 56), 3, 8),                           # NCHW rows of 56
    (lambda: torch.empty(2, 3, 6, 112), 3, 16),
    (lambda: torch.empty(2, 3, 8, 58)[..., :56], 3, 2),                 # rows 58 apart
    (lambda: torch.empty(2, 3, 7, 56)[..., ::2], 3, 1),                 # W not unit-stride
    (lambda: torch.empty(2, 5, 5, 24).permute(0, 3, 1, 2), 1, 8),      # channels_last, 24
    (lambda: torch.empty(1, 1, 1, 64).permute(0, 3, 1, 2), 1, 16),
    (lambda: torch.empty(2, 5, 5, 48).permute(0, 3, 1, 2)[:, ::2], 1, 1),
    (lambda: torch.empty(2, 3, 5, 7), 3, 1),                            # odd rows
], ids=["nchw-56", "nchw-112", "nchw-padded", "nchw-strided", "cl-24", "cl-64", "cl-strided",
        "odd"])
def test_max_pool2d_backward_alignment(make, dim, align):
    """The alignment the host promises the backward kernels (ALIGN): every element whose index
    along the contiguous dimension is a multiple of it sits at an offset (from the first
    element) that is one, for the tensor and slices of it; 1 where that dimension does not
    have unit stride."""
    from pydl._pool_launch import _alignment
    t = make()
    assert _alignment(t, dim) == align
    for view in (t, t[..., :max(1, t.shape[3] - 1)], t[1:]):
        a = _alignment(view, dim)
        index = torch.stack(torch.meshgrid(*[torch.arange(n) for n in view.shape],
                                           indexing="ij"))
        offset = sum(index[d] * view.stride(d) for d in range(4))
        assert (offset[index[dim] % a == 0] % a == 0).all(), (view.shape, view.stride(), a)


# --- average pooling ------------------------------------------------------------------------

AVG_CASES = [
    ((1, 1, 6, 6), 3, 3, 0, False),
    ((2, 3, 8, 8), 2, 2, 0, False),
    ((2, 2, 9, 11), 3, 2, 1, False),
    ((1, 3, 8, 7), 3, 2, 1, True),         # ceil_mode window running past the padded edge
    ((2, 2, 5, 6), (2, 3), (1, 2), (1, 1), True),
    ((1, 2, 10, 11), 2, 3, 0, False),      # stride past the window: inputs no window holds
]


@backends
@dtypes
@pytest.mark.parametrize("case", AVG_CASES, ids=lambda c: f"{c[0]}-k{c[1]}-s{c[2]}-p{c[3]}-{c[4]}")
@pytest.mark.parametrize("count_include_pad", [True, False])
@pytest.mark.parametrize("divisor_override", [None, 3])
def test_avg_pool2d(backend, dtype, case, count_include_pad, divisor_override):
    shape, k, s, p, cm = case
    x = random_tensor(shape, dtype, DEVICE)
    opts = dict(ceil_mode=cm, count_include_pad=count_include_pad,
                divisor_override=divisor_override)
    out, g, (dx,) = run_with_grad(lambda t: pydl.avg_pool2d(t, k, s, p, backend=backend, **opts),
                                  [x])
    t_out, _, (t_dx,) = run_with_grad(lambda t: F.avg_pool2d(t, k, s, p, **opts), [x], g)
    y64 = ref.avg_pool2d(x.double().cpu().numpy(), k, s, p, **opts)
    dx64 = ref.avg_pool2d_backward(g.double().cpu().numpy(), tuple(x.shape), k, s, p, **opts)
    kk = k * k if isinstance(k, int) else k[0] * k[1]
    assert_close(out, y64, dtype, reduction=kk, name="forward vs reference")
    assert_close(out, t_out, dtype, reduction=kk, name="forward vs torch")
    assert_close(dx, dx64, dtype, reduction=kk, name="grad vs reference")
    assert_close(dx, t_dx, dtype, reduction=kk, name="grad vs torch")


@backends
@pytest.mark.parametrize("layout", ["channels_last", "channels_last_nchw_grad", "sliced",
                                    "offset"])
@pytest.mark.parametrize("case", [(3, 2, 1, False, True, None), (2, 2, 0, False, False, 3),
                                  (3, 1, 1, True, False, None)], ids=str)
def test_avg_pool2d_layouts(backend, layout, case):
    """The backward by cells in both tilings (channels contiguous, W contiguous), an NCHW
    upstream gradient into a channels_last pool (converted), and a sliced input."""
    k, s, p, cm, count_pad, div = case
    x = random_tensor((2, 6, 10, 9), torch.float32, DEVICE)
    if layout.startswith("channels_last"):
        x = x.to(memory_format=torch.channels_last)
    elif layout == "offset":        # W contiguous (the planar kernels), rows not aligned
        x = x[:, :, 1:, 1:]
    else:
        x = x[:, 1::2, 1:, ::2]
    opts = dict(ceil_mode=cm, count_include_pad=count_pad, divisor_override=div)
    xg = x.detach().requires_grad_()
    y = pydl.avg_pool2d(xg, k, s, p, backend=backend, **opts)
    g = random_tensor(tuple(y.shape), torch.float32, DEVICE)
    if layout == "channels_last":
        g = g.to(memory_format=torch.channels_last)
    (dx,) = torch.autograd.grad(y, xg, g)
    y64 = ref.avg_pool2d(x.double().cpu().numpy(), k, s, p, **opts)
    dx64 = ref.avg_pool2d_backward(g.double().cpu().numpy(), tuple(x.shape), k, s, p, **opts)
    assert_close(y, y64, torch.float32, reduction=k * k, name="forward vs reference")
    assert_close(dx, dx64, torch.float32, reduction=k * k, name="grad vs reference")


@backends
@pytest.mark.parametrize("output_size", [1, (3, 2), (4, 5), (None, 4), (7, 9)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_adaptive_avg_pool2d(backend, output_size, layout):
    x = random_tensor((2, 3, 7, 9), torch.float32, DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    out, g, (dx,) = run_with_grad(
        lambda t: pydl.adaptive_avg_pool2d(t, output_size, backend=backend), [x])
    t_out, _, (t_dx,) = run_with_grad(lambda t: F.adaptive_avg_pool2d(t, output_size), [x], g)
    y64 = ref.adaptive_avg_pool2d(x.double().cpu().numpy(), output_size)
    dx64 = ref.adaptive_avg_pool2d_backward(g.double().cpu().numpy(), tuple(x.shape))
    assert_close(out, y64, torch.float32, reduction=63, name="forward vs reference")
    assert_close(out, t_out, torch.float32, reduction=63, name="forward vs torch")
    assert_close(dx, dx64, torch.float32, name="grad vs reference")
    assert_close(dx, t_dx, torch.float32, name="grad vs torch")


@backends
@pytest.mark.parametrize("output_size", [0, (0, 3), (2, 0)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_adaptive_avg_pool2d_to_nothing(backend, output_size, layout):
    """An empty output size: torch's empty forward (its backward raises); pydl's gradient is
    the exact one, zeros (the dx buffer is uninitialised memory otherwise)."""
    x = random_tensor((2, 3, 5, 4), torch.float32, DEVICE)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    want = F.adaptive_avg_pool2d(x, output_size)
    with poisoned_outputs():
        for _ in range(2):      # the plan's first call and its replay
            xg = x.clone().requires_grad_()
            y = pydl.adaptive_avg_pool2d(xg, output_size, backend=backend)
            assert y.shape == want.shape and y.is_contiguous(
                memory_format=memory_format_of(x))
            (dx,) = torch.autograd.grad(y, xg, torch.ones_like(y))
            assert torch.equal(dx, torch.zeros_like(x))
        assert pydl.adaptive_avg_pool2d(x, output_size, backend=backend).shape == want.shape


@backends
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_global_avg_pool2d(backend, layout):
    """Output 1x1 (global average pooling): more positions than one block of the global
    kernels (99), channel blocks with a ragged last one (70), fp16; a sliced input whose h and
    w do not merge takes the windowed kernel."""
    # means near 1, where a wrong divisor shows beyond fp16's rounding
    x = random_tensor((2, 70, 9, 11 if layout != "sliced" else 22), torch.float16, DEVICE) + 1
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[..., ::2]
    out, g, (dx,) = run_with_grad(lambda t: pydl.adaptive_avg_pool2d(t, 1, backend=backend), [x])
    y64 = ref.adaptive_avg_pool2d(x.double().cpu().numpy(), 1)
    dx64 = ref.adaptive_avg_pool2d_backward(g.double().cpu().numpy(), tuple(x.shape))
    assert out.shape == (2, 70, 1, 1)
    assert_close(out, y64, torch.float16, reduction=99, name="forward vs reference")
    assert_close(dx, dx64, torch.float16, name="grad vs reference")
    # each within fp16's rounding of the exact value (fp32 sums and quotients)
    exact = dict(rtol=2 ** -10, atol=1e-4)
    torch.testing.assert_close(out.double().cpu(), torch.from_numpy(y64), **exact)
    torch.testing.assert_close(dx.double().cpu(), torch.from_numpy(dx64), rtol=2 ** -10, atol=0)
    if layout == "channels_last":
        assert dx.is_contiguous(memory_format=torch.channels_last)


# --- modules --------------------------------------------------------------------------------

@backends
def test_modules_are_drop_in(backend):
    x = random_tensor((2, 3, 9, 9), torch.float32, DEVICE)
    pairs = [
        (pydl.nn.MaxPool2d(3, 2, 1, ceil_mode=True, backend=backend),
         torch.nn.MaxPool2d(3, 2, 1, ceil_mode=True)),
        (pydl.nn.AvgPool2d(2, count_include_pad=False, backend=backend),
         torch.nn.AvgPool2d(2, count_include_pad=False)),
        (pydl.nn.AdaptiveAvgPool2d(1, backend=backend), torch.nn.AdaptiveAvgPool2d(1)),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs))
        assert repr(ours).split("(")[1] == repr(theirs).split("(")[1]
        assert_close(ours(x), theirs(x), torch.float32, reduction=81)
    y, idx = pydl.nn.MaxPool2d(2, return_indices=True, backend=backend)(x)
    assert torch.equal(idx, torch.nn.MaxPool2d(2, return_indices=True)(x)[1])


# --- the 1-d pools: the 2-d kernels on a 1 x L image -----------------------------------------

# (kind, options): max (kernel, stride, padding, dilation, ceil_mode), avg (kernel, stride,
# padding, ceil_mode, count_include_pad), adaptive (output size)
POOL1D = [
    ("max", (3, 2, 1, 1, False)),
    ("max", ((2,), (3,), (1,), (2,), True)),
    ("max", (4, None, 2, 1, False)),
    ("avg", (3, 2, 1, True, False)),
    ("avg", ((4,), (3,), (2,), False, True)),
    ("adaptive", 5),
    ("adaptive", (1,)),
]


def _first(v):
    return v[0] if isinstance(v, tuple) else v


@backends
@pytest.mark.parametrize("layout", ["ncl", "nlc", "unbatched"])
@pytest.mark.parametrize("kind,opts", POOL1D, ids=lambda v: str(v).replace(" ", ""))
def test_pool1d(backend, layout, kind, opts):
    """max_pool1d (and its indices), avg_pool1d and adaptive_avg_pool1d, forward and gradient,
    against torch's 1-d pools and the float64 reference (the 2-d one on a 1 x L image)."""
    N, C, L = 2, 3, 13
    x = random_tensor((N, C, L) if layout != "nlc" else (N, L, C), torch.float32, DEVICE)
    x = x.transpose(1, 2) if layout == "nlc" else x[0] if layout == "unbatched" else x
    ours = {"max": pydl.max_pool1d, "avg": pydl.avg_pool1d,
            "adaptive": pydl.adaptive_avg_pool1d}[kind]
    theirs = {"max": F.max_pool1d, "avg": F.avg_pool1d, "adaptive": F.adaptive_avg_pool1d}[kind]
    args = opts if isinstance(opts, tuple) and kind != "adaptive" else (opts,)
    out, g, (dx,) = run_with_grad(lambda t: ours(t, *args, backend=backend), [x])
    t_out, _, (t_dx,) = run_with_grad(lambda t: theirs(t, *args), [x], g)
    x64, g64 = x.double().cpu().numpy()[..., None, :], g.double().cpu().numpy()[..., None, :]
    if kind == "max":
        k, s, p, d, cm = map(_first, args)
        s = k if s is None else s
        y64, idx64 = ref.max_pool2d(x64, (1, k), (1, s), (0, p), (1, d), cm)
        dx64 = ref.max_pool2d_backward(g64, idx64, x64.shape)
        y, idx = ours(x, *args, return_indices=True, backend=backend)
        assert torch.equal(idx, theirs(x, *args, return_indices=True)[1])
        assert torch.equal(y, out)
        window = k
    elif kind == "avg":
        k, s, p, cm, cip = map(_first, args)
        o2 = dict(ceil_mode=cm, count_include_pad=cip)
        y64 = ref.avg_pool2d(x64, (1, k), (1, s), (0, p), **o2)
        dx64 = ref.avg_pool2d_backward(g64, x64.shape, (1, k), (1, s), (0, p), **o2)
        window = k
    else:
        y64 = ref.adaptive_avg_pool2d(x64, (1, _first(opts)))
        dx64 = ref.adaptive_avg_pool2d_backward(g64, x64.shape)
        window = L
    assert out.shape == t_out.shape
    assert_close(out, y64[..., 0, :], torch.float32, reduction=window, name="forward")
    assert_close(out, t_out, torch.float32, reduction=window, name="forward vs torch")
    assert_close(dx, dx64[..., 0, :], torch.float32, reduction=window, name="grad")
    assert_close(dx, t_dx, torch.float32, reduction=window, name="grad vs torch")


def test_pool1d_modules_and_refusals():
    x = random_tensor((2, 3, 10), torch.float32, DEVICE)
    pairs = [
        (pydl.nn.MaxPool1d(3, 2, 1, ceil_mode=True, backend="triton"),
         torch.nn.MaxPool1d(3, 2, 1, ceil_mode=True)),
        (pydl.nn.AvgPool1d(2, count_include_pad=False, backend="triton"),
         torch.nn.AvgPool1d(2, count_include_pad=False)),
        (pydl.nn.AdaptiveAvgPool1d(3, backend="triton"), torch.nn.AdaptiveAvgPool1d(3)),
    ]
    for ours, theirs in pairs:
        assert isinstance(ours, type(theirs)) and repr(ours) == repr(theirs)
        assert_close(ours(x), theirs(x), torch.float32, reduction=10)
    _, idx = pydl.nn.MaxPool1d(2, return_indices=True)(x)
    assert torch.equal(idx, torch.nn.MaxPool1d(2, return_indices=True)(x)[1])
    # the planned 1-d pools make their outputs in their 1-d shapes (not views of a 1 x L
    # image, which autograd would refuse to modify in place inside a Function's output)
    for ours, theirs in ((pydl.max_pool1d, F.max_pool1d), (pydl.avg_pool1d, F.avg_pool1d)):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = ours(xa, 3, 2)
        assert y._base is None
        y.mul_(2).sum().backward()
        theirs(xb, 3, 2).mul_(2).sum().backward()
        assert_close(xa.grad, xb.grad, torch.float32, reduction=3)
    for call in (lambda: pydl.max_pool1d(x, (3, 3)), lambda: pydl.avg_pool1d(x, 2, 1.0),
                 lambda: pydl.adaptive_avg_pool1d(x, (None,))):
        with pytest.raises(TypeError, match="must be an int or a sequence of one int"):
            call()
    with pytest.raises(ValueError, match="2-D or 3-D"):
        pydl.max_pool1d(x[..., None], 2)
    with pytest.raises(ValueError, match="half the kernel"):
        pydl.max_pool1d(x, 3, 1, 2)


# --- bad input ------------------------------------------------------------------------------

@backends
def test_pool_bad_input(backend):
    x = random_tensor((1, 2, 5, 5), torch.float32, DEVICE)
    with pytest.raises(ValueError, match="larger than the padded"):
        pydl.max_pool2d(x, 7, backend=backend)
    with pytest.raises(ValueError, match="half the kernel"):
        pydl.max_pool2d(x, 3, 1, 2, backend=backend)
    with pytest.raises(ValueError, match="stride must be positive"):
        pydl.avg_pool2d(x, 2, 0, backend=backend)
    with pytest.raises(ValueError, match="3-D or 4-D"):
        pydl.max_pool2d(x[0, 0], 2, backend=backend)
    with pytest.raises(TypeError, match="kernel_size"):
        pydl.max_pool2d(x, 2.5, backend=backend)
    with pytest.raises(ValueError, match="divisor_override"):
        pydl.avg_pool2d(x, 2, divisor_override=0, backend=backend)
    for size in ((-1, 2), (3,), (2, 3, 4), (2.5, 3)):
        with pytest.raises(ValueError, match="output_size"):
            pydl.adaptive_avg_pool2d(x, size, backend=backend)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        pydl.max_pool2d(x.double(), 2, backend=backend)


@pytest.mark.gpu
@pytest.mark.full
def test_max_pool2d_beyond_int32_offsets():
    """More than 2**31 input elements: offsets must be computed in int64."""
    x = torch.randn(2 ** 15 + 1, 64, 32, 32, device="cuda", dtype=torch.float16)
    y = pydl.max_pool2d(x, 2)
    assert_close(y[-2:], F.max_pool2d(x[-2:], 2), torch.float16)
