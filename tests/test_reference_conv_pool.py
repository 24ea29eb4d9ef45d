"""The float64 NumPy references for conv2d, padding and pooling against torch on the CPU
(float64 tensors, autograd for the backward passes), the lecture's fixtures, and the shape
helpers of pydl._shapes, including their bad-input errors."""
import ast
import itertools
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from pydl import reference as ref
from pydl._shapes import (
    conv_output_size,
    conv_output_size_padded,
    conv_padding,
    pool_output_size,
    same_padding,
)
from pydl.testing import assert_close

# torch warns that it copies the input for an uneven padding="same"; that is expected here
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # The tensors here are tiny: torch's intra-op thread pool only adds overhead, and on a
    # busy 2-core machine its waiting threads made each call ~20x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randn(*shape, generator=None):
    return torch.randn(*shape, dtype=F64, generator=generator)


def _np(t):
    return t.detach().numpy()


def _autograd(fn, *inputs, generator=None):
    """torch's output, a random cotangent and the grads of every tensor input (None for None)."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    g = _randn(*out.shape, generator=generator)
    out.backward(g)
    return out.detach(), g, [None if t is None else t.grad for t in leaves]


# --- conv2d ---------------------------------------------------------------------------------

def _torch_conv(x, w, b, stride, padding, dilation, groups, padding_mode):
    if padding_mode == "zeros":
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    # torch.nn.Conv2d's own handling of padding_mode (F.pad, then an unpadded conv)
    C_out, C_g, KH, KW = w.shape
    mod = torch.nn.Conv2d(C_g * groups, C_out, (KH, KW), stride, padding, dilation, groups,
                          bias=b is not None, padding_mode=padding_mode, dtype=F64)
    return mod._conv_forward(x, w, b)


def _check_conv(x_shape, w_shape, bias, stride=1, padding=0, dilation=1, groups=1,
                padding_mode="zeros", generator=None):
    x, w = _randn(*x_shape, generator=generator), _randn(*w_shape, generator=generator)
    b = _randn(w_shape[0], generator=generator) if bias else None
    out, g, (dx, dw, db) = _autograd(
        lambda x, w, b: _torch_conv(x, w, b, stride, padding, dilation, groups, padding_mode),
        x, w, b, generator=generator)
    y = ref.conv2d(_np(x), _np(w), None if b is None else _np(b), stride, padding, dilation,
                   groups, padding_mode=padding_mode)
    gx, gw, gb = ref.conv2d_backward(_np(g), _np(x), _np(w), stride, padding, dilation, groups,
                                     bias, padding_mode=padding_mode)
    k = w_shape[1] * w_shape[2] * w_shape[3]
    assert_close(y, out, F64, reduction=k, name="conv2d forward")
    assert_close(gx, dx, F64, reduction=w_shape[0] * k, name="conv2d grad_x")
    assert_close(gw, dw, F64, reduction=out.numel(), name="conv2d grad_w")
    if bias:
        assert_close(gb, db, F64, reduction=out.numel(), name="conv2d grad_b")
    else:
        assert gb is None
    return y


CONV_CASES = {
    # id: (x_shape, w_shape, bias, stride, padding, dilation, groups)
    "basic": ((2, 3, 8, 8), (4, 3, 3, 3), True, 1, 0, 1, 1),
    "batch1_single_channel": ((1, 1, 5, 5), (1, 1, 3, 3), False, 1, 1, 1, 1),
    "non_square": ((2, 3, 9, 7), (5, 3, 3, 2), True, (2, 1), (1, 0), 1, 1),
    "stride2_pad1": ((2, 2, 10, 9), (3, 2, 3, 3), False, 2, 1, 1, 1),
    "stride_floors": ((2, 2, 7, 7), (3, 2, 3, 3), False, 3, 0, 1, 1),
    "stride_pair_pad_pair": ((1, 2, 5, 6), (4, 2, 3, 3), False, (3, 2), (2, 1), 1, 1),
    "groups2": ((2, 4, 10, 9), (6, 2, 3, 3), True, 2, 1, 1, 2),
    "groups2_nonoverlap": ((3, 6, 6, 6), (6, 3, 2, 2), True, 2, 0, 1, 2),
    "depthwise": ((2, 4, 7, 8), (4, 1, 3, 3), True, 1, 1, 1, 4),
    "depthwise_multiplier": ((1, 3, 8, 8), (6, 1, 3, 3), False, 1, "same", 1, 3),
    "dilation2": ((2, 2, 9, 10), (3, 2, 3, 3), True, 1, 0, 2, 1),
    "dilation_pair": ((2, 2, 9, 11), (3, 2, 3, 2), True, (1, 2), (2, 1), (2, 3), 1),
    "same_odd": ((2, 3, 6, 7), (2, 3, 5, 3), True, 1, "same", 1, 1),
    "same_even_uneven": ((1, 2, 6, 7), (3, 2, 4, 2), True, 1, "same", 1, 1),
    "same_dilated": ((1, 2, 7, 7), (2, 2, 4, 4), False, 1, "same", (1, 2), 1),
    "valid": ((2, 3, 6, 5), (2, 3, 3, 3), True, 1, "valid", 1, 1),
    "kernel_is_input": ((1, 2, 5, 5), (2, 2, 5, 5), True, 1, 0, 1, 1),
    "one_by_one": ((1, 1, 4, 6), (3, 1, 1, 1), True, 1, 0, 1, 1),
    "one_by_three_groups": ((2, 4, 5, 5), (4, 2, 1, 3), True, 1, (0, 1), 1, 2),
    "single_row": ((2, 2, 1, 9), (2, 2, 1, 3), True, (1, 2), 0, 1, 1),
}


@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv2d_vs_torch(case):
    x_shape, w_shape, bias, stride, padding, dilation, groups = CONV_CASES[case]
    _check_conv(x_shape, w_shape, bias, stride, padding, dilation, groups)


@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding,kernel", [(1, (3, 3)), ((2, 1), (3, 2)), ("same", (4, 3))],
                         ids=["p1", "p21", "same_even"])
def test_conv2d_padding_modes_vs_torch(mode, padding, kernel):
    _check_conv((2, 2, 5, 6), (3, 2) + kernel, True, 1, padding, 1, 1, padding_mode=mode)


def test_conv2d_unbatched_input():
    x, w, b = _randn(3, 6, 5), _randn(2, 3, 3, 3), _randn(2)
    out, g, (dx, dw, db) = _autograd(lambda x, w, b: F.conv2d(x, w, b, padding=1), x, w, b)
    assert_close(ref.conv2d(_np(x), _np(w), _np(b), padding=1), out, F64, reduction=27)
    gx, gw, gb = ref.conv2d_backward(_np(g), _np(x), _np(w), padding=1, has_bias=True)
    assert gx.shape == (3, 6, 5)
    assert_close(gx, dx, F64, reduction=27)
    assert_close(gw, dw, F64, reduction=30)
    assert_close(gb, db, F64, reduction=30)


@pytest.mark.parametrize("mode,tmode", [("zeros", "constant"), ("reflect", "reflect"),
                                        ("replicate", "replicate"), ("circular", "circular")])
@pytest.mark.parametrize("pads", [(0, 0, 0, 0), (1, 2, 3, 0), (3, 3, 4, 4)])
def test_pad2d_vs_torch(mode, tmode, pads):
    top, bottom, left, right = pads
    x = _randn(2, 3, 4, 5)
    out, g, (dx,) = _autograd(lambda x: F.pad(x, (left, right, top, bottom), mode=tmode), x)
    assert_close(ref.pad2d(_np(x), pads, mode), out, F64)
    assert_close(ref.pad2d_backward(_np(g), x.shape, pads, mode), dx, F64, reduction=9)


def test_pad2d_bad_input():
    x = np.zeros((1, 1, 3, 3))
    with pytest.raises(ValueError, match="reflect padding"):
        ref.pad2d(x, (3, 0, 0, 0), "reflect")
    with pytest.raises(ValueError, match="circular padding"):
        ref.pad2d(x, (0, 0, 4, 0), "circular")
    with pytest.raises(ValueError, match="padding mode"):
        ref.pad2d(x, (1, 1, 1, 1), "mirror")


def test_conv2d_bad_input():
    x, w = np.zeros((1, 4, 5, 5)), np.zeros((2, 4, 3, 3))
    with pytest.raises(ValueError, match="divisible by groups"):
        ref.conv2d(x, np.zeros((3, 2, 3, 3)), groups=2)
    with pytest.raises(ValueError, match="input channels"):
        ref.conv2d(x, np.zeros((2, 3, 3, 3)))
    with pytest.raises(ValueError, match="strided"):
        ref.conv2d(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="larger than the padded"):
        ref.conv2d(x, np.zeros((2, 4, 6, 3)))
    with pytest.raises(ValueError, match="stride must be positive"):
        ref.conv2d(x, w, stride=0)
    with pytest.raises(ValueError, match="bias"):
        ref.conv2d(x, w, bias=np.zeros(3))
    with pytest.raises(ValueError, match="padding must be"):
        ref.conv2d(x, w, padding="full")
    with pytest.raises(ValueError, match="grad_out"):
        ref.conv2d_backward(np.zeros((1, 2, 4, 4)), x, w)


# --- the lecture's fixtures ----------------------------------------------------------------

def test_lecture_output_sizes():
    assert conv_output_size(6, 3) == 4
    assert ref.conv2d(np.ones((1, 1, 6, 6)), np.ones((1, 1, 3, 3))).shape == (1, 1, 4, 4)
    assert conv_output_size(7, 3, stride=1) == 5
    assert conv_output_size(7, 3, stride=2, exact=True) == 3
    assert ref.conv2d(np.ones((1, 1, 7, 7)), np.ones((1, 1, 3, 3)), stride=2).shape[-2:] == (3, 3)
    with pytest.raises(ValueError, match="does not fit"):
        conv_output_size(7, 3, stride=3, exact=True)  # (7 - 3) / 3 + 1 = 2.33
    assert conv_output_size(7, 3, stride=3) == 2  # torch floors instead
    for k, p in [(3, 1), (5, 2), (7, 3)]:
        assert same_padding(k) == (p, p)
        assert conv_output_size(32, k, padding=p) == 32
    assert same_padding(4) == (1, 2)  # uneven: more on the right, as torch
    assert same_padding(3, dilation=2) == (2, 2)
    assert conv_padding("same", (4, 3), (1, 1), (1, 1)) == (1, 2, 1, 1)
    assert conv_padding("valid", (4, 3), (2, 2), (1, 1)) == (0, 0, 0, 0)
    assert conv_padding((2, 1), (4, 3), (2, 2), (1, 1)) == (2, 2, 1, 1)
    assert conv_output_size_padded(6, 4, 1, 1, 2) == 6


def test_lecture_parameter_count():
    # 32x32x3 input, six 5x5x3 filters -> 28x28x6, 6 * (5 * 5 * 3 + 1) = 456 parameters
    w, b = np.ones((6, 3, 5, 5)), np.zeros(6)
    y = ref.conv2d(np.ones((1, 3, 32, 32)), w, b)
    assert y.shape == (1, 6, 28, 28)
    assert w.size + b.size == 456
    assert np.all(y == 75.0)


def test_lecture_alexnet_shape_walk():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 227, 227))
    walk = []

    def conv(x, c_out, k, stride=1, padding=0):
        return ref.conv2d(x, rng.standard_normal((c_out, x.shape[1], k, k)) * 0.1,
                          np.zeros(c_out), stride, padding)

    x = conv(x, 4, 11, stride=4)
    walk.append(x.shape[-1])
    x, _ = ref.max_pool2d(x, 3, 2)
    walk.append(x.shape[-1])
    x = conv(x, 4, 5, padding=2)
    walk.append(x.shape[-1])
    x, _ = ref.max_pool2d(x, 3, 2)
    walk.append(x.shape[-1])
    for _ in range(3):
        x = conv(x, 3, 3, padding=1)
        walk.append(x.shape[-1])
    x, _ = ref.max_pool2d(x, 3, 2)
    walk.append(x.shape[-1])
    assert walk == [55, 27, 27, 13, 13, 13, 13, 6]
    assert x.shape == (1, 3, 6, 6)


def _correlate(img, k):
    """Direct loops of y[i, j] = sum_{p, q} k[p, q] img[i + p, j + q] (no padding)."""
    KH, KW = k.shape
    out = np.zeros((img.shape[0] - KH + 1, img.shape[1] - KW + 1))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = sum(k[p, q] * img[i + p, j + q] for p in range(KH) for q in range(KW))
    return out


g5 = np.array([1.0, 4, 6, 4, 1])
LECTURE_FILTERS = {
    "identity": np.array([[0.0, 0, 0], [0, 1, 0], [0, 0, 0]]),
    "edge_diag": np.array([[1.0, 0, -1], [0, 0, 0], [-1, 0, 1]]),
    "laplacian": np.array([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]),
    "edge_all": np.array([[-1.0, -1, -1], [-1, 8, -1], [-1, -1, -1]]),
    "vertical_edge": np.array([[1.0, 0, -1]] * 3),
    "sharpen": np.array([[0.0, -1, 0], [-1, 5, -1], [0, -1, 0]]),
    "box_blur": np.ones((3, 3)) / 9,
    "gaussian3": np.array([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16,
    "gaussian5": np.outer(g5, g5) / 256,
    # asymmetric ones, where correlation and (flipped) convolution differ
    "sobel_x": np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]),
    "asym_2x3": np.array([[1.0, 2, 3], [0, -1, 5]]),
    "shift_right": np.array([[0.0, 0, 1]]),
}


@pytest.mark.parametrize("name", list(LECTURE_FILTERS))
def test_lecture_image_filters(name):
    k = LECTURE_FILTERS[name]
    img = np.random.default_rng(1).integers(0, 256, (9, 10)).astype(np.float64)
    y = ref.conv2d(img[None, None], k[None, None])[0, 0]
    np.testing.assert_allclose(y, _correlate(img, k), rtol=1e-12, atol=1e-9)
    t = F.conv2d(torch.from_numpy(img)[None, None], torch.from_numpy(k)[None, None])[0, 0]
    assert_close(y, t, F64, reduction=k.size, scale=256)
    flipped = _correlate(img, k[::-1, ::-1])  # the lectures' convolution
    if np.array_equal(k, k[::-1, ::-1]):
        np.testing.assert_allclose(y, flipped, rtol=1e-12, atol=1e-9)
    else:
        assert np.abs(y - flipped).max() > 1.0, "pydl must compute cross-correlation"


def test_lecture_filters_known_outputs():
    const = np.full((1, 1, 7, 7), 3.0)
    ramp = np.add.outer(np.arange(7.0), 2 * np.arange(7.0))[None, None]  # linear in h and w
    f = {n: k[None, None] for n, k in LECTURE_FILTERS.items()}
    for smooth in ("box_blur", "gaussian3", "gaussian5"):  # weights sum to one
        np.testing.assert_allclose(ref.conv2d(const, f[smooth]), 3.0, rtol=1e-14)
    np.testing.assert_allclose(ref.conv2d(const, f["sharpen"]), 3.0, rtol=1e-14)
    np.testing.assert_allclose(ref.conv2d(ramp, f["laplacian"]), 0.0, atol=1e-12)
    np.testing.assert_allclose(ref.conv2d(ramp, f["edge_all"]), 0.0, atol=1e-12)
    assert np.array_equal(ref.conv2d(ramp, f["identity"])[0, 0], ramp[0, 0, 1:-1, 1:-1])
    # a dark-to-bright step from left to right: [1, 0, -1] correlated gives -3 on the edge
    # (the flipped kernel of the lectures' convolution would give +3)
    step = np.zeros((1, 1, 5, 6))
    step[..., 3:] = 1.0
    y = ref.conv2d(step, f["vertical_edge"])[0, 0]
    assert np.array_equal(y, np.tile([0.0, -3.0, -3.0, 0.0], (3, 1)))
    # [0, 0, 1] reads the element two to the right: correlation shifts the image left
    row = np.arange(6.0)[None, None, None]
    assert np.array_equal(ref.conv2d(row, f["shift_right"])[0, 0, 0], [2.0, 3, 4, 5])


def test_lecture_pooling_6x6():
    x = np.arange(36.0).reshape(1, 1, 6, 6)
    out, idx = ref.max_pool2d(x, 3, 3)
    assert out.shape == (1, 1, 2, 2) and pool_output_size(6, 3, 3) == 2
    assert np.array_equal(out[0, 0], [[14.0, 17.0], [32.0, 35.0]])
    assert np.array_equal(idx[0, 0], [[14, 17], [32, 35]])
    avg = ref.avg_pool2d(x, 3, 3)
    assert np.array_equal(avg[0, 0], [[7.0, 10.0], [25.0, 28.0]])


# --- shape helpers: bad input --------------------------------------------------------------

def test_shape_helpers_bad_input():
    with pytest.raises(ValueError, match="larger than the padded input size 5"):
        conv_output_size(3, 7, padding=1)
    with pytest.raises(ValueError, match="stride must be positive"):
        conv_output_size(8, 3, stride=0)
    with pytest.raises(ValueError, match="dilation must be positive"):
        conv_output_size(8, 3, dilation=0)
    with pytest.raises(ValueError, match="padding must be non-negative"):
        conv_output_size(8, 3, padding=-1)
    with pytest.raises(ValueError, match="kernel size must be positive"):
        conv_output_size(8, 0)
    with pytest.raises(ValueError, match="at most half the kernel"):
        pool_output_size(8, 3, 1, padding=2)
    with pytest.raises(ValueError, match="stride must be positive"):
        pool_output_size(8, 2, 0)
    with pytest.raises(ValueError, match="larger than the padded"):
        pool_output_size(2, 3, 1)
    with pytest.raises(ValueError, match="larger than the padded"):
        pool_output_size(2, 3, 1, ceil_mode=True)  # ceil_mode adds no window at stride 1
    with pytest.raises(ValueError, match="at most half the kernel"):
        ref.max_pool2d(np.zeros((1, 1, 6, 6)), 2, padding=2)
    with pytest.raises(ValueError, match="divisor_override"):
        ref.avg_pool2d(np.zeros((1, 1, 6, 6)), 2, divisor_override=0)


def test_pool_output_size_ceil_mode_window_past_the_edge():
    # torch accepts a ceil_mode window that runs past the padded edge, even when the kernel is
    # longer than the padded input: size 2, kernel 3, stride 2 gives one window
    assert pool_output_size(2, 3, 2, ceil_mode=True) == 1
    assert F.max_pool2d(torch.ones(1, 1, 2, 2), 3, 2, ceil_mode=True).shape[-1] == 1
    # and drops a last window that would start in the right padding: 4 + 2 - 2 = 4, /3 -> 3
    # windows with ceil, but the third starts at 6 - 1 = 5 >= 4 + 1
    assert pool_output_size(4, 2, 3, padding=1, ceil_mode=True) == 2
    assert F.max_pool2d(torch.ones(1, 1, 4, 4), 2, 3, 1, ceil_mode=True).shape[-1] == 2


# --- max pooling ---------------------------------------------------------------------------

def _check_max_pool(x, kernel, stride=None, padding=0, dilation=1, ceil_mode=False):
    """Values, indices (exactly) and the backward pass against torch; x is a torch tensor."""
    out, idx = F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, return_indices=True)
    y, ri = ref.max_pool2d(_np(x), kernel, stride, padding, dilation, ceil_mode)
    assert y.shape == tuple(out.shape) and ri.dtype == np.int64
    assert_close(y, out, F64, name="max_pool2d forward")
    assert np.array_equal(ri, idx.numpy()), f"indices differ:\n{ri}\nvs torch\n{idx.numpy()}"
    plane = x.shape[-2] * x.shape[-1]
    if (ri >= plane).any():
        return y, ri  # a window of padding only: torch's backward writes out of bounds there
    t_out, g, (dx,) = _autograd(
        lambda x: F.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode), x)
    gx = ref.max_pool2d_backward(_np(g), ri, x.shape)
    # a gradient element sums over the windows sharing an argmax: at most 16 here
    assert_close(gx, dx, F64, reduction=16, name="max_pool2d backward")
    return y, ri


MAX_POOL_CASES = {
    # id: (x_shape, kernel, stride, padding, dilation, ceil_mode)
    "2x2s2": ((2, 3, 8, 8), 2, None, 0, 1, False),
    "3x3s2_overlap": ((2, 2, 9, 9), 3, 2, 0, 1, False),
    "3x3s1_overlap_pad": ((1, 2, 6, 7), 3, 1, 1, 1, False),
    "non_square": ((2, 2, 7, 10), (2, 3), (1, 2), (1, 0), 1, False),
    "ceil": ((2, 2, 7, 7), 2, 2, 0, 1, True),
    "ceil_pad": ((1, 3, 8, 6), 3, 2, 1, 1, True),
    "ceil_past_edge": ((1, 1, 2, 5), 3, 2, 0, 1, True),
    "dilation": ((2, 2, 9, 8), 3, 1, 0, 2, False),
    "dilation_pad_ceil": ((1, 2, 8, 9), (2, 3), 2, 1, (2, 3), True),
    "kernel1": ((1, 2, 4, 5), 1, 2, 0, 1, False),
    "single_channel_batch1": ((1, 1, 5, 5), 2, 1, 1, 1, False),
    "unbatched": ((3, 6, 7), 2, 2, 1, 1, True),
}


@pytest.mark.parametrize("case", list(MAX_POOL_CASES), ids=list(MAX_POOL_CASES))
def test_max_pool2d_vs_torch(case):
    x_shape, *args = MAX_POOL_CASES[case]
    _check_max_pool(_randn(*x_shape), *args)


@pytest.mark.parametrize("case", list(MAX_POOL_CASES), ids=list(MAX_POOL_CASES))
def test_max_pool2d_ties_vs_torch(case):
    # few distinct values: most windows hold tied maxima, and overlapping windows share them
    x_shape, *args = MAX_POOL_CASES[case]
    _check_max_pool(torch.randint(0, 3, x_shape).to(F64), *args)


@pytest.mark.parametrize("case", list(MAX_POOL_CASES), ids=list(MAX_POOL_CASES))
def test_max_pool2d_nan_and_inf_vs_torch(case):
    x_shape, *args = MAX_POOL_CASES[case]
    x = _randn(*x_shape)
    r = torch.rand(x_shape)
    x[r < 0.15] = float("nan")
    x[(r > 0.15) & (r < 0.35)] = float("-inf")
    x[(r > 0.35) & (r < 0.4)] = float("inf")
    _check_max_pool(x, *args)


def test_max_pool2d_tie_and_nan_fixtures():
    nan = float("nan")
    x = np.array([[1.0, 5, 5], [5, 2, 5], [0, 5, 1]])[None, None]
    out, idx = ref.max_pool2d(x, 3, 1)
    assert out.item() == 5.0 and idx.item() == 1  # the first 5 in row-major order
    x = np.array([[1.0, nan, 3], [nan, 2, 5], [0, 5, nan]])[None, None]
    out, idx = ref.max_pool2d(x, 3, 1)
    assert np.isnan(out.item()) and idx.item() == 8  # torch returns the LAST NaN
    out, idx = ref.max_pool2d(x, 2, 1)
    assert np.isnan(out).all() and np.array_equal(idx[0, 0], [[3, 1], [3, 8]])
    # all -inf: the first in-bounds element of each window, never a padding position
    out, idx = ref.max_pool2d(np.full((1, 1, 3, 3), -np.inf), 3, 2, 1, ceil_mode=True)
    assert np.array_equal(idx[0, 0], [[0, 1], [3, 4]]) and (out == -np.inf).all()
    for x in (np.array([[1.0, 5, 5], [5, 2, 5], [0, 5, 1]]),
              np.array([[1.0, nan, 3], [nan, 2, 5], [0, 5, nan]])):
        for k in (2, 3):
            _check_max_pool(torch.from_numpy(x)[None, None], k, 1)


def test_max_pool2d_window_of_padding_only():
    # kernel 2, dilation 3, padding 1 on a 2x2 plane: the window reads rows -1 and 2, both
    # outside; torch returns -inf and the index 2 * W + 2 = 6, past the plane
    x = _randn(2, 3, 2, 2)
    y, ri = _check_max_pool(x, 2, 2, 1, 3)
    assert (y == -np.inf).all() and (ri == 6).all()
    assert np.array_equal(ref.max_pool2d_backward(np.ones(y.shape), ri, x.shape), np.zeros(x.shape))


def test_max_pool2d_backward_accumulates_overlapping_windows():
    x = np.zeros((1, 1, 4, 4))
    x[0, 0, 1, 1] = 9.0  # inside all four 3x3 windows at stride 1
    out, idx = ref.max_pool2d(x, 3, 1)
    assert (idx == 5).all()
    g = np.array([[1.0, 2], [3, 4]])[None, None]
    gx = ref.max_pool2d_backward(g, idx, x.shape)
    assert gx[0, 0, 1, 1] == 10.0 and gx.sum() == 10.0


# --- average pooling -----------------------------------------------------------------------

def _check_avg_pool(x, kernel, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
                    divisor_override=None):
    args = (kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)
    out, g, (dx,) = _autograd(lambda x: F.avg_pool2d(x, *args), x)
    y = ref.avg_pool2d(_np(x), *args)
    assert_close(y, out, F64, reduction=16, name="avg_pool2d forward")
    assert_close(ref.avg_pool2d_backward(_np(g), x.shape, *args), dx, F64, reduction=16,
                 name="avg_pool2d backward")


AVG_POOL_CASES = {
    # id: (x_shape, kernel, stride, padding, ceil_mode)
    "2x2": ((2, 3, 8, 8), 2, None, 0, False),
    "3x3s2_overlap": ((2, 2, 9, 9), 3, 2, 0, False),
    "3x3s1_pad": ((1, 2, 6, 7), 3, 1, 1, False),
    "non_square": ((2, 2, 7, 10), (2, 3), (1, 2), (1, 0), False),
    "ceil": ((2, 2, 7, 7), 2, 2, 0, True),
    "ceil_pad": ((1, 3, 8, 6), 3, 2, 1, True),
    "ceil_pad_past_edge": ((1, 2, 6, 5), 4, 3, 2, True),
    "ceil_kernel_past_input": ((1, 1, 2, 5), 3, 2, 0, True),
    "unbatched": ((3, 6, 7), 3, 2, 1, True),
}


@pytest.mark.parametrize("divisor_override", [None, 2], ids=["div", "override2"])
@pytest.mark.parametrize("count_include_pad", [True, False], ids=["incl_pad", "excl_pad"])
@pytest.mark.parametrize("case", list(AVG_POOL_CASES), ids=list(AVG_POOL_CASES))
def test_avg_pool2d_vs_torch(case, count_include_pad, divisor_override):
    x_shape, *args = AVG_POOL_CASES[case]
    _check_avg_pool(_randn(*x_shape), *args, count_include_pad, divisor_override)


def test_avg_pool2d_divisor_fixture():
    # 1x5 row of ones, kernel 3, stride 2, padding 1, ceil_mode: windows start at -1, 1, 3;
    # the last covers [3, 6) clipped to the padded input [-1, 6): 3 columns, 2 of them input
    x = np.ones((1, 1, 1, 5))
    incl = ref.avg_pool2d(x, (1, 3), (1, 2), (0, 1), ceil_mode=True, count_include_pad=True)
    excl = ref.avg_pool2d(x, (1, 3), (1, 2), (0, 1), ceil_mode=True, count_include_pad=False)
    np.testing.assert_allclose(incl[0, 0, 0], [2 / 3, 1.0, 2 / 3], rtol=1e-15)
    np.testing.assert_allclose(excl[0, 0, 0], [1.0, 1.0, 1.0], rtol=1e-15)
    # kernel 3 stride 2 on 2 elements, ceil_mode: one window [0, 3) clipped to [0, 2)
    np.testing.assert_allclose(ref.avg_pool2d(np.ones((1, 1, 2, 2)), 3, 2, ceil_mode=True), 1.0)


def test_pool_sweep_vs_torch():
    """Every small configuration: the same accepted/rejected set as torch (output size by
    pydl._shapes), max values/indices and avg values/divisors and both backward passes."""
    gen = torch.Generator().manual_seed(0)
    checked = rejected = 0
    for H, k, s, p, d, ceil in itertools.product(
            range(1, 7), range(1, 5), range(1, 4), range(3), (1, 2), (False, True)):
        x = torch.randint(0, 4, (1, 2, H, 5), generator=gen).to(F64)  # ties included
        jitter = torch.rand(1, 2, H, 5, generator=gen) < 0.5
        x += 1e-3 * _randn(1, 2, H, 5, generator=gen) * jitter
        try:
            F.max_pool2d(x, (k, 2), (s, 2), (p, 1), (d, 1), ceil)
        except RuntimeError:
            with pytest.raises(ValueError):
                ref.max_pool2d(_np(x), (k, 2), (s, 2), (p, 1), (d, 1), ceil)
            rejected += 1
            continue
        _check_max_pool(x, (k, 2), (s, 2), (p, 1), (d, 1), ceil)
        if d == 1:
            for count_include_pad in (False, True):
                _check_avg_pool(x, (k, 2), (s, 2), (p, 1), ceil, count_include_pad, None)
        checked += 1
    assert checked > 200 and rejected > 50


# --- adaptive average pooling --------------------------------------------------------------

@pytest.mark.parametrize("x_shape,output_size", [
    ((2, 3, 8, 8), 4), ((2, 2, 5, 7), (3, 2)), ((1, 2, 6, 9), (4, 5)), ((1, 1, 3, 3), (5, 7)),
    ((2, 2, 5, 7), (None, 3)), ((1, 3, 7, 5), 1), ((3, 10, 6), (3, 4)), ((1, 1, 1, 1), 2)],
    ids=["even", "uneven", "overlap", "upsample", "none", "global", "unbatched", "1x1"])
def test_adaptive_avg_pool2d_vs_torch(x_shape, output_size):
    x = _randn(*x_shape)
    out, g, (dx,) = _autograd(lambda x: F.adaptive_avg_pool2d(x, output_size), x)
    y = ref.adaptive_avg_pool2d(_np(x), output_size)
    assert_close(y, out, F64, reduction=x_shape[-1] * x_shape[-2], name="adaptive forward")
    assert_close(ref.adaptive_avg_pool2d_backward(_np(g), x.shape), dx, F64, reduction=16,
                 name="adaptive backward")


def test_adaptive_avg_pool2d_windows():
    # H = 5 into 3: [0, 2), [1, 4), [3, 5) -- start floor(i H / 3), end ceil((i + 1) H / 3)
    x = np.arange(5.0)[None, None, :, None]
    y = ref.adaptive_avg_pool2d(x, (3, 1))
    np.testing.assert_allclose(y[0, 0, :, 0], [0.5, 2.0, 3.5], rtol=1e-15)


# --- hypothesis fuzz -----------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(N=st.integers(1, 2), groups=st.integers(1, 3), c_in=st.integers(1, 2),
       c_out=st.integers(1, 2), H=st.integers(1, 9), W=st.integers(1, 9),
       KH=st.integers(1, 4), KW=st.integers(1, 4), stride=st.integers(1, 3),
       dilation=st.integers(1, 2), padding=st.sampled_from([0, 1, 2, (1, 0), "same", "valid"]),
       bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_conv2d_fuzz(N, groups, c_in, c_out, H, W, KH, KW, stride, dilation, padding, bias, seed):
    if padding == "same":
        stride = 1
    x_shape, w_shape = (N, c_in * groups, H, W), (c_out * groups, c_in, KH, KW)
    try:
        F.conv2d(torch.zeros(x_shape, dtype=F64), torch.zeros(w_shape, dtype=F64), None,
                 stride, padding, dilation, groups)
    except RuntimeError:
        with pytest.raises(ValueError):
            ref.conv2d(np.zeros(x_shape), np.zeros(w_shape), None, stride, padding, dilation,
                       groups)
        return
    _check_conv(x_shape, w_shape, bias, stride, padding, dilation, groups,
                generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(H=st.integers(1, 9), W=st.integers(1, 9), KH=st.integers(1, 4), KW=st.integers(1, 4),
       stride=st.tuples(st.integers(1, 3), st.integers(1, 3)), dilation=st.integers(1, 2),
       pad=st.tuples(st.integers(0, 2), st.integers(0, 2)), ceil_mode=st.booleans(),
       count_include_pad=st.booleans(), divisor=st.sampled_from([None, None, 3]),
       ties=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_pool_fuzz(H, W, KH, KW, stride, dilation, pad, ceil_mode, count_include_pad, divisor,
                   ties, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (2, 2, H, W), generator=gen).to(F64) if ties else \
        _randn(2, 2, H, W, generator=gen)
    kernel = (KH, KW)
    try:
        F.max_pool2d(x, kernel, stride, pad, dilation, ceil_mode)
    except RuntimeError:
        with pytest.raises(ValueError):
            ref.max_pool2d(_np(x), kernel, stride, pad, dilation, ceil_mode)
        return
    _check_max_pool(x, kernel, stride, pad, dilation, ceil_mode)
    try:
        F.avg_pool2d(x, kernel, stride, pad, ceil_mode, count_include_pad, divisor)
    except RuntimeError:
        return
    _check_avg_pool(x, kernel, stride, pad, ceil_mode, count_include_pad, divisor)


def test_references_do_not_call_torch():
    # written from the math: neither module imports torch (pydl._shapes only does arithmetic)
    root = pathlib.Path(ref.__file__).parent
    for name in ("conv.py", "pool.py"):
        for node in ast.walk(ast.parse((root / name).read_text())):
            if isinstance(node, ast.Import):
                assert not any(a.name.split(".")[0] == "torch" for a in node.names), name
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] != "torch", name
