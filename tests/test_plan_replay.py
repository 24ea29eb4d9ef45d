"""A plan replayed on other memory (pydl/_plan.py; pydl/_numba_launch.py NumbaLaunch): a call
signature's plan runs every later call with that key, re-deriving each tensor argument from the
call's own tensors. Nothing the key does not hold may leak from the call that built the plan:
where the tensors lie in their storage (a view into a larger buffer, 16-byte aligned or not),
their data, and which of them share one buffer (an RNN's weights in one flat buffer, as
torch.nn.LSTM keeps them; the query, key and value of one packed projection). Each case runs
one signature three times, every floating input a view into one fresh buffer at another
offset each time, and compares the output and every gradient with torch's op in float64
(outputs NaN-poisoned by the suite: an element a kernel left unwritten fails). A differential
fuzz of this kind found no fault in the plans; this keeps the property checked."""
from __future__ import annotations

import pytest
import torch
from conftest import DEVICE

import pydl
from pydl.testing import assert_close

F = torch.nn.functional
# Elements before the first input in each call's buffer: the plan is built at 0, then the
# inputs move 16 bytes along (fp32; 8 bytes fp16) and to an odd element (misaligned).
OFFSETS = (0, 4, 3)


class Fixed:
    """An input that is not placed and has no gradient (class weights)."""

    def __init__(self, t):
        self.t = t


def _movable(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point()


def _placed(tensors, offset: int, dtype):
    """(leaf buffer, views): copies of the floating `tensors` laid one after another into one
    fresh buffer of `dtype` from element `offset` on (other entries pass through; a Fixed
    one as its tensor)."""
    floats = [t for t in tensors if _movable(t)]
    total = offset + sum(t.numel() + 1 for t in floats)
    buf = torch.full((total,), float("nan"), dtype=dtype, device=DEVICE)
    views, at = [], offset
    with torch.no_grad():
        for t in tensors:
            if not _movable(t):
                views.append(t.t if isinstance(t, Fixed) else t)
                continue
            buf[at:at + t.numel()].copy_(t.reshape(-1))
            views.append(at)
            at += t.numel() + 1
    buf.requires_grad_()
    views = [buf[v:v + t.numel()].view(t.shape) if _movable(t) else v
             for v, t in zip(views, tensors)]
    return buf, views


def _reference(t):
    if isinstance(t, Fixed):
        return t.t.double()
    return t.detach().double().requires_grad_() if _movable(t) else t


def _replay(op, make_inputs, backend, dtype=torch.float32, reduction=16, **pydl_kw):
    """op(*inputs, backend=..., **pydl_kw) three times, at OFFSETS, against torch's op in
    float64."""
    gen = torch.Generator().manual_seed(0)
    for i, offset in enumerate(OFFSETS):
        inputs = make_inputs(gen)
        buf, views = _placed(inputs, offset, dtype)
        out = op(*views, backend=backend, **pydl_kw)
        g = torch.randn(out.shape, generator=gen).to(DEVICE, dtype)
        out.backward(g)
        leaves = [_reference(t) for t in inputs]
        ref = op(*leaves, backend="torch")
        ref.backward(g.double())
        assert_close(out, ref, dtype, reduction=reduction, name=f"call {i}: output")
        at = offset
        for j, (t, leaf) in enumerate(zip(inputs, leaves)):
            if not _movable(t):
                continue
            got = buf.grad[at:at + t.numel()].view(t.shape)
            want = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            assert_close(got, want, dtype, reduction=reduction, name=f"call {i}: grad {j}")
            at += t.numel() + 1


def _r(gen, *shape, scale=1.0):
    return torch.randn(*shape, generator=gen).to(DEVICE) * scale


def _conv(x, w, b, **kw):
    return pydl.conv2d(x, w, b, padding=1, **kw)


def _lstm(x, w_ih, w_hh, b_ih, b_hh, h0, c0, **kw):
    return pydl.lstm(x, (h0, c0), [w_ih, w_hh, b_ih, b_hh], **kw)[0]


def _gru(x, w_ih, w_hh, b_ih, b_hh, h0, **kw):
    return pydl.gru(x, h0, [w_ih, w_hh, b_ih, b_hh], **kw)[0]


def _lstm_cell(x, w_ih, w_hh, b_ih, b_hh, h, c, **kw):
    h1, c1 = pydl.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh, **kw)
    return torch.cat([h1, c1], 1)


def _rnn_inputs(gates: int, states: int, T=3, B=2, I=4, H=5, cell=False):
    def make(gen):
        x = _r(gen, B, I) if cell else _r(gen, T, B, I)
        s = (B, H) if cell else (1, B, H)
        return (x, _r(gen, gates * H, I, scale=0.4), _r(gen, gates * H, H, scale=0.4),
                _r(gen, gates * H, scale=0.1), _r(gen, gates * H, scale=0.1),
                *[_r(gen, *s, scale=0.5) for _ in range(states)])
    return make


CASES = {
    "conv2d": (_conv, lambda g: (_r(g, 2, 3, 6, 6), _r(g, 4, 3, 3, 3), _r(g, 4)), {}),
    "max_pool2d": (lambda x, **kw: pydl.max_pool2d(x, 3, 2, 1, **kw),
                   lambda g: (_r(g, 2, 3, 7, 7),), {}),
    "avg_pool2d": (lambda x, **kw: pydl.avg_pool2d(x, 3, 2, 1, **kw),
                   lambda g: (_r(g, 2, 3, 7, 7),), {}),
    "softmax": (lambda x, **kw: pydl.softmax(x, -1, **kw), lambda g: (_r(g, 4, 33),), {}),
    "cross_entropy": (
        lambda x, t, w, **kw: pydl.cross_entropy(x, t, w, label_smoothing=0.1, **kw),
        lambda g: (_r(g, 6, 11), torch.randint(0, 11, (6,), generator=g).to(DEVICE),
                   Fixed(_r(g, 11).abs())), {}),
    "cross_entropy_soft": (
        lambda x, y, **kw: pydl.cross_entropy(x, y, **kw),
        lambda g: (_r(g, 6, 11), _r(g, 6, 11).softmax(1)), {}),
    "attention": (
        lambda qkv, **kw: pydl.scaled_dot_product_attention(
            *qkv.view(1, 9, 3, 2, 16).permute(2, 0, 3, 1, 4), is_causal=True, **kw),
        lambda g: (_r(g, 1, 9, 3 * 2 * 16),), {}),
    "lstm": (_lstm, _rnn_inputs(4, 2), {}),
    "gru": (_gru, _rnn_inputs(3, 1), {}),
    "lstm_cell": (_lstm_cell, _rnn_inputs(4, 2, cell=True), {}),
    "gru_cell": (lambda x, w_ih, w_hh, b_ih, b_hh, h, **kw: pydl.gru_cell(
        x, h, w_ih, w_hh, b_ih, b_hh, **kw), _rnn_inputs(3, 1, cell=True), {}),
}


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_plan_replays_on_other_memory(case, backend):
    op, make_inputs, kw = CASES[case]
    _replay(op, make_inputs, backend, **kw)


@pytest.mark.parametrize("algo", ["im2col", "steps"])
def test_a_plan_replays_on_other_memory_other_algorithms(algo):
    """The Triton backend's second algorithms: im2col convolution, the step-by-step LSTM."""
    if algo == "im2col":
        op, make_inputs, _ = CASES["conv2d"]
    else:
        op, make_inputs, _ = CASES["lstm"]
    _replay(op, make_inputs, "triton", algo=algo)
