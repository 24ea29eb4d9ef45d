"""Offsets past 2**31 elements on every op, without 2**31 elements of data.

An input (or an upstream gradient) is given as a view whose dim `d` has a stride of
WIDE = 2**30 + 64 elements: the element at index 2 along it lies past 2**31, while each factor
of its offset (the index, the stride) fits in int32. A kernel that multiplies them in int32
wraps the offset negative and reads or writes outside the tensor (a crash, or a wrong value);
one that computes it in int64 gives what the same op gives on a contiguous copy. The view's
storage is reserved, not touched (only its few elements are written): 4.3 GB of address space
for a float16 view of 3 along the wide dim, which the OS commits lazily on a CPU (the test
skips where it refuses the reservation).

Every dim of size 3 of every tensor input is widened in turn, forward, and every dim of the
upstream gradient, backward; results are compared with the same backend on contiguous copies.
The GPU suite's `*_beyond_int32_offsets` tests (--full) check real tensors of 2**31 elements.
"""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import pydl

WIDE = 2 ** 30 + 64
DTYPE = torch.float16
BACKENDS = ("triton", "numba")
# fp16 results of one backend on two layouts of the same values: equal but for the order of
# a few sums (a wrapped offset gives garbage or a crash, far outside this)
TOL = dict(rtol=2e-3, atol=2e-3)


def widen(t: torch.Tensor, d: int) -> torch.Tensor:
    """t's values in a view whose dim d has stride WIDE (the others dense among themselves, in
    t's own memory order: channels_last stays channels_last)."""
    strides, acc = [0] * t.dim(), 1
    for i in sorted(range(t.dim()), key=lambda i: t.stride(i)):
        if i != d:
            strides[i] = acc
            acc *= t.shape[i]
    strides[d] = WIDE
    size = 1 + sum((n - 1) * s for n, s in zip(t.shape, strides))
    try:
        base = torch.empty(size, dtype=t.dtype, device=t.device)
    except (RuntimeError, MemoryError) as exc:      # overcommit refused
        pytest.skip(f"cannot reserve {size * t.element_size() / 2**30:.1f} GiB: {exc}")
    view = base.as_strided(t.shape, strides)
    with torch.no_grad():
        view.copy_(t)
    return view


def _x(*shape):
    return torch.randn(*shape, device=DEVICE).to(DTYPE)


def _cl(t):
    return t.contiguous(memory_format=torch.channels_last)


def _weights(gates: int) -> list:
    """w_ih, w_hh, b_ih, b_hh of a recurrence of 3 inputs and 3 hidden units."""
    return [_x(3 * gates, 3), _x(3 * gates, 3), _x(3 * gates), _x(3 * gates)]


def _idx(high, *shape):
    return torch.randint(0, high, shape, device=DEVICE)


# op: (the tensor inputs (differentiable), the call on them with a backend). Sizes of 3 along
# every dim that is widened.
OPS = {
    "softmax": (lambda: [_x(3, 3, 3)], lambda x, *, backend: pydl.softmax(x, 1, backend=backend)),
    "log_softmax": (lambda: [_x(3, 3, 3)],
                    lambda x, *, backend: pydl.log_softmax(x, 2, backend=backend)),
    "cross_entropy": (lambda: [_x(3, 3, 3)], lambda x, *, backend: pydl.cross_entropy(
        x, TARGETS, reduction="none", backend=backend)),
    "cross_entropy_weighted": (lambda: [_x(3, 3, 3)], lambda x, *, backend: pydl.cross_entropy(
        x, TARGETS, weight=CLASS_WEIGHTS, label_smoothing=0.1, backend=backend)[None]
        .expand(3)),
    "cross_entropy_targets": (lambda: [_x(3, 3, 3), _idx(3, 3, 3).to(torch.uint8)],
                              lambda x, t, *, backend: pydl.cross_entropy(
                                  x, t, reduction="none", ignore_index=1, backend=backend)),
    "cross_entropy_probs": (lambda: [_x(3, 3), torch.softmax(_x(3, 3).float(), 1).to(DTYPE)],
                            lambda x, p, *, backend: pydl.cross_entropy(
                                x, p, reduction="none", backend=backend)),
    # hidden states (batch, sequence, hidden), the head's weight and bias; chunks of 4 rows
    "linear_cross_entropy": (lambda: [_x(3, 3, 3), _x(3, 3), _x(3)],
                             lambda x, w, b, *, backend: pydl.linear_cross_entropy(
                                 x, w, TARGETS, b, reduction="none", chunk_rows=4,
                                 backend=backend)),
    "linear_cross_entropy_mean": (lambda: [_x(3, 3, 3), _x(3, 3)],
                                  lambda x, w, *, backend: pydl.linear_cross_entropy(
                                      x, w, TARGETS, class_weight=CLASS_WEIGHTS,
                                      label_smoothing=0.1, chunk_rows=4,
                                      backend=backend)[None].expand(3)),
    "attention": (lambda: [_x(3, 3, 3, 3), _x(3, 3, 3, 3), _x(3, 3, 3, 3)],
                  lambda q, k, v, *, backend: pydl.scaled_dot_product_attention(
                      q, k, v, backend=backend)),
    "attention_causal_onepass": (
        lambda: [_x(3, 3, 3, 3), _x(3, 3, 3, 3), _x(3, 3, 3, 3)],
        lambda q, k, v, *, backend: pydl.scaled_dot_product_attention(
            q, k, v, is_causal=True, backend=backend,
            algo="flash_onepass" if backend == "triton" else None)),
    "attention_masks": (
        lambda: [_x(3, 3, 3, 3), _x(3, 3, 3, 3), _x(3, 3, 3, 3), _x(3, 3, 3, 3),
                 torch.rand(3, 3, 3, 3, device=DEVICE) > 0.3],
        lambda q, k, v, bias, keep, *, backend: pydl.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.masked_fill(~keep, float("-inf")), backend=backend)),
    "attention_gqa": (lambda: [_x(3, 3, 3, 3), _x(3, 1, 3, 3), _x(3, 1, 3, 3)],
                      lambda q, k, v, *, backend: pydl.scaled_dot_product_attention(
                          q, k, v, enable_gqa=True, backend=backend)),
    "conv2d": (lambda: [_x(3, 3, 3, 3), _x(3, 3, 3, 3)],
               lambda x, w, *, backend: pydl.conv2d(x, w, padding=1, backend=backend)),
    "conv2d_im2col": (lambda: [_x(3, 3, 3, 3), _x(3, 3, 3, 3)],
                      lambda x, w, *, backend: pydl.conv2d(x, w, padding=1, backend=backend,
                                                           algo="im2col")),
    "conv2d_1x1": (lambda: [_x(3, 3, 3, 3), _x(3, 3, 1, 1)],
                   lambda x, w, *, backend: pydl.conv2d(x, w, backend=backend)),
    "conv2d_channels_last": (lambda: [_cl(_x(3, 3, 3, 3)), _cl(_x(3, 3, 3, 3))],
                             lambda x, w, *, backend: pydl.conv2d(x, w, padding=1,
                                                                  backend=backend)),
    "conv2d_groups": (lambda: [_x(3, 6, 3, 3), _x(4, 3, 3, 3)],
                      lambda x, w, *, backend: pydl.conv2d(x, w, padding=1, groups=2,
                                                           backend=backend)),
    "conv2d_depthwise": (lambda: [_cl(_x(3, 3, 3, 3)), _x(3, 1, 3, 3)],
                         lambda x, w, *, backend: pydl.conv2d(x, w, padding=1, groups=3,
                                                              backend=backend)),
    "max_pool2d_channels_last": (lambda: [_cl(_x(3, 3, 3, 3))],
                                 lambda x, *, backend: pydl.max_pool2d(x, 2, 1, 1,
                                                                       backend=backend)),
    "max_pool2d": (lambda: [_x(3, 3, 3, 3)],
                   lambda x, *, backend: pydl.max_pool2d(x, 2, 1, 1, backend=backend)),
    "avg_pool2d": (lambda: [_x(3, 3, 3, 3)],
                   lambda x, *, backend: pydl.avg_pool2d(x, 3, 1, 1, backend=backend)),
    "adaptive_avg_pool2d": (lambda: [_x(3, 3, 3, 3)],
                            lambda x, *, backend: pydl.adaptive_avg_pool2d(x, 2, backend=backend)),
    # recurrences: input, states, then the weights (w_ih, w_hh: their dim 1 widened) and biases
    "lstm": (lambda: [_x(3, 3, 3), _x(1, 3, 3), _x(1, 3, 3), *_weights(4)],
             lambda x, h, c, *w, backend: pydl.lstm(x, (h, c), list(w), backend=backend)[0]),
    "gru": (lambda: [_x(3, 3, 3), _x(1, 3, 3), *_weights(3)],
            lambda x, h, *w, backend: pydl.gru(x, h, list(w), backend=backend)[0]),
    "lstm_cell": (lambda: [_x(3, 3), _x(3, 3), _x(3, 3), *_weights(4)],
                  lambda x, h, c, *w, backend: torch.cat(pydl.lstm_cell(
                      x, (h, c), *w, backend=backend))),
    "gru_cell": (lambda: [_x(3, 3), _x(3, 3), *_weights(3)],
                 lambda x, h, *w, backend: pydl.gru_cell(x, h, *w, backend=backend)),
}
TARGETS = CLASS_WEIGHTS = None


@pytest.fixture(autouse=True)
def _seeded():
    global TARGETS, CLASS_WEIGHTS
    torch.manual_seed(0)
    TARGETS = _idx(3, 3, 3)
    CLASS_WEIGHTS = torch.rand(3, device=DEVICE).to(DTYPE) + 0.5


def _cases():
    out = []
    for op in OPS:
        for backend in BACKENDS:
            if backend == "numba" and op == "conv2d_im2col":
                continue        # numba's only algorithm: the conv2d case
            # Numba's index arithmetic is int64 by default (Python ints) and passed every case:
            # its half runs with --full (a minute of the simulator otherwise)
            marks = [pytest.mark.sim_heavy] if backend == "numba" else []
            out.append(pytest.param(op, backend, id=f"{op}-{backend}", marks=marks))
    return out


@pytest.mark.parametrize("op,backend", _cases())
def test_inputs_with_offsets_past_int32(op, backend):
    make, fn = OPS[op]
    inputs = make()
    expected = fn(*inputs, backend=backend)
    for i, t in enumerate(inputs):
        for d in range(t.dim()):
            if t.shape[d] != 3:
                continue
            args = list(inputs)
            args[i] = widen(t, d)
            got = fn(*args, backend=backend)
            torch.testing.assert_close(got, expected, **TOL,
                                       msg=lambda m, i=i, d=d: f"input {i} wide along dim {d}: {m}")
            del args


@pytest.mark.parametrize("op,backend", _cases())
def test_upstream_gradients_with_offsets_past_int32(op, backend):
    make, fn = OPS[op]
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in make()]
    out = fn(*inputs, backend=backend)
    g = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    leaves = [t for t in inputs if t.requires_grad]
    expected = torch.autograd.grad(out, leaves, g, retain_graph=True)
    for d in range(out.dim()):
        if out.shape[d] != 3:
            continue
        got = torch.autograd.grad(out, leaves, widen(g, d), retain_graph=True)
        for i, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, **TOL, msg=lambda m, i=i, d=d: (
                f"gradient of input {i}, upstream gradient wide along dim {d}: {m}"))
