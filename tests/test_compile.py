"""torch.compile, torch.library and autocast: every kernel launch is a registered custom op
(pydl._library), so compiled models trace through pydl's ops without graph breaks.

- each op passes torch.library.opcheck (schema, fake tensor, AOT dispatch with dynamic shapes);
- `torch._dynamo.explain` finds no graph break in a function of pydl ops, and a compiled
  (fullgraph, "aot_eager") function gives the eager outputs and gradients;
- under torch.autocast a pydl op returns the dtype the torch op it replaces returns.
"""
import importlib

import pytest
import torch
from conftest import DEVICE

import pydl
from pydl import (
    _attention_ops,
    _attention_weights,
    _conv_ops,
    _linear_ce_ops,
    _pool_ops,
    _softmax_ce_ops,
    attention,
    conv,
    pool,
)

# pydl.lstm and pydl.gru are the functions; their modules by name:
lstm, gru = importlib.import_module("pydl.lstm"), importlib.import_module("pydl.gru")
rnn = importlib.import_module("pydl.rnn")

BACKEND = "triton"


def _x(*shape, grad=False):
    return torch.randn(*shape, device=DEVICE, requires_grad=grad)


# --- opcheck: the registration itself -----------------------------------------------------

def _ce_args():
    return (_x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), _x(6).abs(), -100, "mean", 0.1,
            0.0, 0.0)                               # no z-loss (it takes no class weights), no cap


def _ce_prob_weight_args(wdtype, reduction):
    x, y, w = _x(2, 5, 3), torch.softmax(_x(2, 5, 3), 1), _x(5).abs().to(wdtype)
    _, stats, _ = _softmax_ce_ops._cross_entropy_prob_fwd(x, y, w, reduction, 0.1, False, BACKEND)
    grad_out = _x(2, 3) if reduction == "none" else torch.randn((), device=DEVICE)
    return _softmax_ce_ops._cross_entropy_prob_weight_bwd, (x, y, w, stats, grad_out, reduction,
                                                            0.1, BACKEND)


def _lce_args(reduction="mean"):
    return (_x(5, 4), _x(7, 4), _x(7), torch.randint(0, 7, (5,), device=DEVICE), _x(7).abs(),
            -100, reduction, 0.1, 2.5, 0.0, True, True, True)     # softcap 2.5, no z-loss


OPCHECKS = {
    # the recompute schedule's forward (the loss and the rows' logsumexp), its backward, and
    # the triton forward that also makes the gradients
    "linear_cross_entropy_fwd": lambda: (_linear_ce_ops._linear_cross_entropy_fwd,
                                         (*_lce_args(), False, 2, BACKEND)),
    "linear_cross_entropy_fwd/grad": lambda: (_linear_ce_ops._linear_cross_entropy_fwd,
                                              (*_lce_args("sum"), True, 2, BACKEND)),
    "linear_cross_entropy_bwd": lambda: (_linear_ce_ops._linear_cross_entropy_bwd, (
        _x(5, 4), _x(7, 4), None, torch.randint(0, 7, (5,), device=DEVICE), None,
        torch.rand(5, device=DEVICE) + 2.0, torch.tensor([5.0, 0.0], device=DEVICE),
        _x(5), -100, "none", 0.0, 2.5, 1e-3, True, True, False, 2, "numba")),
    "softmax_fwd": lambda: (_softmax_ce_ops._softmax_fwd, (_x(3, 5), -1, True, BACKEND)),
    "softmax_bwd": lambda: (_softmax_ce_ops._softmax_bwd,
                            (torch.softmax(_x(3, 5), 0), _x(3, 5), 0, False, BACKEND)),
    "cross_entropy_fwd": lambda: (_softmax_ce_ops._cross_entropy_fwd,
                                  (*_ce_args(), False, BACKEND)),
    # reductions whose kernels leave the denominators unused (zeros, not whatever was there)
    "cross_entropy_fwd/none": lambda: (_softmax_ce_ops._cross_entropy_fwd, (
        _x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), _x(6).abs(), -100, "none", 0.0,
        0.0, 0.0, False, BACKEND)),
    "cross_entropy_fwd/sum": lambda: (_softmax_ce_ops._cross_entropy_fwd, (
        _x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), None, -100, "sum", 0.0, 0.0, 0.0,
        False, BACKEND)),
    # a z-loss, per row and with the gradient in the forward
    "cross_entropy_fwd/z_loss": lambda: (_softmax_ce_ops._cross_entropy_fwd, (
        _x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), None, -100, "none", 0.1, 0.05,
        0.0, False, BACKEND)),
    "cross_entropy_fwd/z_loss-grad": lambda: (_softmax_ce_ops._cross_entropy_fwd, (
        _x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), None, -100, "mean", 0.1, 0.05,
        0.0, True, BACKEND)),
    # logits capped as read, per row and with the gradient in the forward
    "cross_entropy_fwd/softcap": lambda: (_softmax_ce_ops._cross_entropy_fwd, (
        3 * _x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), _x(6).abs(), -100, "none", 0.1,
        0.0, 2.5, False, BACKEND)),
    "cross_entropy_fwd/softcap-grad": lambda: (_softmax_ce_ops._cross_entropy_fwd, (
        3 * _x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), None, -100, "mean", 0.1, 0.05,
        2.5, True, BACKEND)),
    "cross_entropy_bwd/softcap": lambda: (_softmax_ce_ops._cross_entropy_bwd, (
        3 * _x(4, 6), torch.randint(0, 6, (4,), device=DEVICE), _x(6).abs(),
        torch.rand(4, device=DEVICE) + 2.0, torch.tensor([3.0, 0.0], device=DEVICE),
        _x(4), -100, "none", 0.1, 0.0, 2.5, BACKEND)),
    # gradient in the forward
    "cross_entropy_fwd/grad": lambda: (_softmax_ce_ops._cross_entropy_fwd,
                                       (*_ce_args(), True, BACKEND)),
    # numba writes no gradient in the forward: an empty placeholder, as the fake says
    "cross_entropy_fwd/grad-numba": lambda: (_softmax_ce_ops._cross_entropy_fwd,
                                             (*_ce_args(), True, "numba")),
    "cross_entropy_prob_fwd": lambda: (_softmax_ce_ops._cross_entropy_prob_fwd, (
        _x(2, 5, 3), torch.softmax(_x(2, 5, 3), 1), _x(5).abs(), "none", 0.1, False, BACKEND)),
    "cross_entropy_prob_fwd/grad": lambda: (_softmax_ce_ops._cross_entropy_prob_fwd, (
        _x(2, 5, 3), torch.softmax(_x(2, 5, 3), 1), _x(5).abs(), "mean", 0.1, True, "triton")),
    # the gradient of per-row losses: the forward wrote it into the logits (an input)
    "cross_entropy_prob_fwd/grad-none": lambda: (_softmax_ce_ops._cross_entropy_prob_fwd, (
        _x(2, 5, 3), torch.softmax(_x(2, 5, 3), 1), None, "none", 0.1, True, "triton")),
    # numba writes no gradient in the forward: an empty placeholder, as the fake says (it
    # raised)
    "cross_entropy_prob_fwd/grad-numba": lambda: (_softmax_ce_ops._cross_entropy_prob_fwd, (
        _x(2, 5, 3), torch.softmax(_x(2, 5, 3), 1), None, "mean", 0.0, True, "numba")),
    # the class weights' gradient (a weight that requires grad), in the weight's dtype
    "cross_entropy_prob_weight_bwd": lambda: _ce_prob_weight_args(torch.float32, "none"),
    "cross_entropy_prob_weight_bwd/fp16-mean": lambda: _ce_prob_weight_args(torch.float16,
                                                                            "mean"),
    "conv2d_fwd": lambda: (_conv_ops._conv2d_fwd, (
        _x(2, 3, 6, 6), _x(4, 3, 3, 3), _x(4), _geom_conv(), "implicit", BACKEND)),
    "conv2d_bwd_input": lambda: (_conv_ops._conv2d_bwd_input, (
        _x(2, 4, 4, 4), _x(4, 3, 3, 3), _x(2, 3, 6, 6), _geom_conv(), "implicit", BACKEND)),
    "conv2d_bwd_weight": lambda: (_conv_ops._conv2d_bwd_weight, (
        _x(2, 4, 4, 4), _x(2, 3, 6, 6), _x(4, 3, 3, 3), _geom_conv(), "im2col", BACKEND)),
    "max_pool2d_fwd": lambda: (_pool_ops._max_pool2d_fwd, (
        _x(2, 3, 6, 6), _geom_pool(), _pool_ops.INDEX_LOCAL, BACKEND)),
    "avg_pool2d_fwd": lambda: (_pool_ops._avg_pool2d_fwd,
                               (_x(2, 3, 6, 6), _geom_pool(), False, BACKEND)),
    "attention_fwd": lambda: (_attention_ops._attention_fwd, (
        _x(1, 2, 5, 8), _x(1, 2, 7, 8), _x(1, 2, 7, 8), None, 0, True, 0.35, 0.0, BACKEND)),
    # with dropout the seed output: a device int32 tensor on the Triton kernels (what the
    # fake says, so a compiled graph keeps attention on the device), a CPU scalar on Numba's
    "attention_fwd/dropout": lambda: (_attention_ops._attention_fwd, (
        _x(1, 2, 5, 8), _x(1, 2, 7, 8), _x(1, 2, 7, 8), None, 0, False, 0.35, 0.2, "triton")),
    "attention_fwd/dropout-numba": lambda: (_attention_ops._attention_fwd, (
        _x(1, 2, 5, 8), _x(1, 2, 7, 8), _x(1, 2, 7, 8), None, 0, False, 0.35, 0.2, "numba")),
    "attention_naive_fwd": lambda: (_attention_weights._attention_naive_fwd, (
        _x(1, 2, 5, 8), _x(1, 1, 7, 8), _x(1, 1, 7, 8), None, 0, False, 0.35)),
    # a new seed every call: its outputs differ between runs (RANDOM below)
    "attention_naive_dropout_fwd": lambda: (_attention_weights._attention_naive_dropout_fwd, (
        _x(1, 2, 5, 8), _x(1, 1, 7, 8), _x(1, 1, 7, 8), None, 0, True, 0.35, 0.25)),
    "attention_naive_bwd/dropout": lambda: _attention_naive_bwd_args(dropout_p=0.25),
    "attention_bwd/mask_grad": lambda: _attention_bwd_args(),
    "attention_naive_bwd/mask_grad": lambda: _attention_naive_bwd_args(),
    # float16 without the mask's gradient: the empty placeholder was float32, the fake's
    # float16 (a fake/real dtype mismatch)
    "attention_bwd/fp16": lambda: _attention_bwd_args(torch.float16, mask_grad=False),
    "attention_naive_bwd/fp16": lambda: _attention_naive_bwd_args(torch.float16,
                                                                  mask_grad=False),
    # numba's weights kernel
    "attention_weights": lambda: (_attention_weights._attention_weights, (
        _x(1, 2, 5, 8), _x(1, 1, 7, 8), torch.rand(1, 2, 5, 7, device=DEVICE) > 0.3,
        attention.MASK_BOOL, True, 0.35, 0.0, torch.zeros((), dtype=torch.int64))),
    "attention_weights_bwd/mask_grad": lambda: (_attention_weights._attention_weights_bwd, (
        _x(1, 2, 5, 8), _x(1, 1, 7, 8), _x(1, 2, 5, 7), _x(1, 2, 5, 7), attention.MASK_FLOAT,
        False, 0.35, 0.0, torch.zeros((), dtype=torch.int64), True)),
    "lstm_cell_fwd": lambda: (lstm._lstm_cell_fwd, (
        _x(2, 3), _x(2, 4), _x(2, 4), _x(16, 3), _x(16, 4), _x(16), None, BACKEND)),
    # no state, a column-major w_hh: dW_hh (zeros) was laid out as w_hh, the fake contiguous
    "lstm_cell_bwd/no_state": lambda: _cell_bwd_args(lstm._lstm_cell_fwd, lstm._lstm_cell_bwd, 4),
    "gru_cell_bwd/no_state": lambda: _cell_bwd_args(gru._gru_cell_fwd, gru._gru_cell_bwd, 3),
    "gru_cell_fwd": lambda: (gru._gru_cell_fwd, (
        _x(2, 3), None, _x(12, 3), _x(12, 4), None, _x(12), BACKEND)),
    "rnn_fwd": lambda: (rnn._rnn_fwd, (
        _x(3, 2, 3), None, None, [_x(16, 3), _x(16, 4), _x(16, 4), _x(16, 4)], None,
        [2, 0, 0, 1, 0], 0.5, "steps", "lstm", BACKEND)),
    "rnn_fwd/proj": lambda: (rnn._rnn_fwd, (    # proj_size 2: w_hh (4H, P), w_hr (P, H)
        _x(3, 2, 3), None, None, [_x(16, 3), _x(16, 2), _x(2, 4)], None, [1, 0, 0, 0, 1], 0.0,
        "persistent", "lstm", BACKEND)),
    "rnn_fwd/packed": lambda: (rnn._rnn_fwd, (   # batch sizes 2, 2, 1 (a PackedSequence)
        _x(3, 2, 3), _x(1, 2, 4), None, [_x(12, 3), _x(12, 4)],
        torch.tensor([2, 2, 1], dtype=torch.int32, device=DEVICE), [1, 0, 0, 0, 0], 0.0,
        "persistent", "gru", BACKEND)),
    "rnn_fwd/keep_nothing": lambda: (rnn._rnn_fwd, (   # a call no backward follows
        _x(3, 2, 3), _x(2, 2, 4), _x(2, 2, 4), [_x(16, 3), _x(16, 4)] * 2, None,
        [1, 1, 0, 0, 0], 0.0, "persistent", "lstm", BACKEND, False)),
}


def _attention_bwd_args(dtype=torch.float32, mask_grad=True):
    """The flash backward with a float mask's gradient (its fourth output), or without (an
    empty placeholder, in q's dtype as the fake implementation says)."""
    q, k, v, mask = (t.to(dtype) for t in (_x(1, 2, 5, 8), _x(1, 2, 7, 8), _x(1, 2, 7, 8),
                                           _x(1, 2, 5, 7)))
    o, lse, seed = _attention_ops._attention_fwd(q, k, v, mask, attention.MASK_FLOAT, False, 0.35,
                                                 0.0, BACKEND)
    return _attention_ops._attention_bwd, (q, k, v, o, lse, _x(1, 2, 5, 8).to(dtype), mask, seed,
                                      attention.MASK_FLOAT, False, 0.35, 0.0, BACKEND, mask_grad)


def _attention_naive_bwd_args(dtype=torch.float32, mask_grad=True, dropout_p=0.0):
    q, k, v, mask = (t.to(dtype) for t in (_x(1, 2, 5, 8), _x(1, 1, 7, 8), _x(1, 1, 7, 8),
                                           _x(1, 2, 5, 7)))
    if dropout_p:       # the weights P', the undropped P and the seed they were drawn with
        _, w, p, seed = _attention_weights._attention_naive_dropout_fwd(
            q, k, v, mask, attention.MASK_FLOAT, False, 0.35, dropout_p)
    else:
        (_, w), p, seed = _attention_weights._attention_naive_fwd(
            q, k, v, mask, attention.MASK_FLOAT, False, 0.35), None, None
    # the weights' own gradient (B, H, L, S) beside the output's
    return _attention_weights._attention_naive_bwd, (q, k, v, w, p, _x(1, 2, 5, 8).to(dtype),
                                            _x(1, 2, 5, 7).to(dtype), mask, seed, 0.35,
                                            dropout_p, mask_grad)


def _cell_bwd_args(fwd, bwd, gates):
    """A cell's backward without a state (h None), every gradient needed, w_hh column-major."""
    x, w_ih, w_hh = _x(2, 3), _x(gates * 4, 3), _x(4, gates * 4).t()
    if gates == 4:
        h1, c1, acts, c32 = fwd(x, None, None, w_ih, w_hh, None, None, BACKEND)
        return bwd, (x, None, None, w_ih, w_hh, acts, c32, _x(2, 4), _x(2, 4),
                     [True, False, False, True, True, False, False], BACKEND)
    h1, ws = fwd(x, None, w_ih, w_hh, None, None, BACKEND)
    return bwd, (x, None, w_ih, w_hh, ws, _x(2, 4), [True, False, True, True, False, False],
                 BACKEND)


def _geom_conv():
    from pydl._library import geometry_args
    return geometry_args(conv.conv_geometry((2, 3, 6, 6), (4, 3, 3, 3), 1, 0, 1, 1))


def _geom_pool():
    from pydl._library import geometry_args
    return geometry_args(pool._geometry((2, 3, 6, 6), 2, None, 0, 1, False))


# ops that draw a new dropout seed every call: no check that compares two runs' outputs
RANDOM = {"attention_naive_dropout_fwd", "attention_fwd/dropout",
          "attention_fwd/dropout-numba"}


@pytest.mark.parametrize("name", sorted(OPCHECKS))
def test_opcheck(name):
    fn, args = OPCHECKS[name]()
    assert fn.op._qualname == f"pydl::{name.split('/')[0]}"
    if name in RANDOM:
        torch.library.opcheck(fn.op, args, test_utils=("test_schema", "test_faketensor",
                                                       "test_autograd_registration"))
    else:
        torch.library.opcheck(fn.op, args)


# --- no graph breaks, compiled == eager ---------------------------------------------------

def _conv_pool_ce(x, w, b, t):
    y = pydl.conv2d(x, w, b, padding=1, backend=BACKEND)
    y = pydl.max_pool2d(y, 2, backend=BACKEND) + pydl.avg_pool2d(y, 2, backend=BACKEND)
    y = pydl.adaptive_avg_pool2d(y, 1, backend=BACKEND).flatten(1)
    return pydl.cross_entropy(y, t, label_smoothing=0.1, backend=BACKEND) \
        + pydl.log_softmax(y, 1, backend=BACKEND).sum() * 0.01


def _attention(q, k, v):
    a = pydl.scaled_dot_product_attention(q, k, v, is_causal=True, backend=BACKEND)
    b = pydl.scaled_dot_product_attention(q, k, v, algo="naive", backend=BACKEND)
    return (a * b).sum() + pydl.softmax(a, -1, backend=BACKEND).sum()


class _Model(torch.nn.Module):
    """conv, pooling, an LSTM over the rows, attention, a linear head: torch layers that
    pydl.patch swaps."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.lstm = torch.nn.LSTM(16, 8, batch_first=True)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.gru = torch.nn.GRU(8, 8, batch_first=True)
        self.head = torch.nn.Linear(8, 5)
        self.loss = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, t):
        y = self.pool(self.conv(x))                      # (N, 4, 4, 4)
        y = y.flatten(1, 2).transpose(1, 2)              # 4 steps of 16 features
        y, _ = self.lstm(y)
        y, _ = self.attn(y, y, y, need_weights=False)
        y, _ = self.gru(y)
        return self.loss(self.head(y[:, -1]), t)


def _patched_model(x, t):
    return _MODEL(x, t)


_MODEL = None


CASES = {
    "patched_model": (_patched_model, lambda: (_x(2, 1, 8, 8, grad=True),
                                               torch.randint(0, 5, (2,), device=DEVICE))),
    "lstm_cells": (lambda x, h, c, w_ih, w_hh: (pydl.lstm_cell(x, (h, c), w_ih, w_hh,
                                                               backend=BACKEND)[1]
                                                + pydl.gru_cell(x, h, w_ih[:12], w_hh[:12],
                                                                backend=BACKEND)).sum(),
                   lambda: (_x(2, 3, grad=True), _x(2, 4, grad=True), _x(2, 4, grad=True),
                            _x(16, 3, grad=True), _x(16, 4, grad=True))),
    "conv_pool_ce": (_conv_pool_ce, lambda: (_x(2, 3, 8, 8, grad=True), _x(4, 3, 3, 3, grad=True),
                                             _x(4, grad=True),
                                             torch.randint(0, 4, (2,), device=DEVICE))),
    "linear_cross_entropy": (
        lambda x, w, b, t: pydl.linear_cross_entropy(x, w, t, b, label_smoothing=0.1,
                                                     chunk_rows=3, backend=BACKEND)
        + pydl.linear_cross_entropy(x, w, t, reduction="none", softcap=2.0, z_loss=1e-2,
                                    chunk_rows=4, backend=BACKEND).sum() * 0.5,
        lambda: (_x(7, 4, grad=True), _x(6, 4, grad=True), _x(6, grad=True),
                 torch.randint(0, 6, (7,), device=DEVICE))),
    # the 1-d ops: views around the 2-d kernel ops, with a transposed (N, L, C) input
    "one_d": (lambda x, w: pydl.adaptive_avg_pool1d(
        pydl.max_pool1d(pydl.conv1d(x.transpose(1, 2), w, padding=1, groups=2, backend=BACKEND),
                        2, backend=BACKEND)
        + pydl.avg_pool1d(x.transpose(1, 2), 3, 2, 1, backend=BACKEND)[..., :4],
        2, backend=BACKEND).sum(),
        lambda: (_x(2, 9, 4, grad=True), _x(4, 2, 3, grad=True))),
    "cross_entropy_z_loss": (
        lambda x, t: pydl.cross_entropy(x, t, z_loss=0.01, label_smoothing=0.1, backend=BACKEND),
        lambda: (_x(5, 7, grad=True), torch.randint(0, 7, (5,), device=DEVICE))),
    "attention": (_attention, lambda: (_x(1, 2, 6, 8, grad=True), _x(1, 2, 6, 8, grad=True),
                                       _x(1, 2, 6, 8, grad=True))),
    # probability targets and a learned class weight: the weight's gradient kernel op
    "soft_targets_learned_weight": (
        lambda x, y, w: pydl.cross_entropy(x, y.softmax(1), w.exp(), label_smoothing=0.1,
                                           backend=BACKEND),
        lambda: (_x(4, 6, grad=True), _x(4, 6, grad=True), _x(6, grad=True))),
    # one tensor in several inputs of one op (dynamo traces no autograd.Function given a
    # tensor twice: pydl._plan.apply passes views): self-attention, a state as both h and c
    "one_tensor_twice": (lambda x, s, h, w_ih, w_hh: (
        pydl.scaled_dot_product_attention(x, x, x, backend=BACKEND).sum()
        + pydl.lstm_cell(s, (h, h), w_ih, w_hh, backend=BACKEND)[1].sum()
        + pydl.lstm(s[:, None].expand(2, 2, 3), (h[None], h[None]), [w_ih, w_hh],
                    bias=False, backend=BACKEND)[0].sum()),
        lambda: (_x(1, 2, 6, 8, grad=True), _x(2, 3, grad=True), _x(2, 4, grad=True),
                 _x(16, 3, grad=True), _x(16, 4, grad=True))),
}


def _grads(fn, args):
    out = fn(*args)
    leaves = [a for a in args if a.requires_grad]
    return out, torch.autograd.grad(out, leaves)


@pytest.fixture(scope="module", autouse=True)
def _patched():
    global _MODEL
    torch.manual_seed(0)
    _MODEL = _Model().to(DEVICE)
    report = pydl.patch(_MODEL, backend=BACKEND)
    assert len(report.patched) == 6, str(report)    # conv, pool, lstm, attention, gru, loss
    yield
    _MODEL = None


@pytest.mark.parametrize("case", sorted(CASES))
@torch._dynamo.config.patch(allow_rnn=True)   # dynamo refuses any torch.nn.LSTM / GRU otherwise
def test_compiled_matches_eager_without_graph_breaks(case):
    fn, make = CASES[case]
    args = make()
    explained = torch._dynamo.explain(fn)(*args)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    out, grads = _grads(fn, args)
    c_out, c_grads = _grads(torch.compile(fn, fullgraph=True, backend="aot_eager"), args)
    torch.testing.assert_close(c_out, out)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b)


def test_numba_attention_weights_compile():
    """attention_with_weights on the numba backend (MultiheadAttention's need_weights=True):
    its weights kernel is the custom op pydl::attention_weights, so a compiled function
    traces it without a graph break and gives the eager weights (it was launched directly:
    dynamo stopped at the launch, an error with fullgraph=True)."""
    def fn(q, k, v):
        return attention.attention_with_weights(q, k, v, is_causal=True, enable_gqa=True,
                                                backend="numba")
    q, k, v = _x(1, 2, 4, 8), _x(1, 1, 6, 8), _x(1, 1, 6, 8)
    out, weights = fn(q, k, v)
    explained = torch._dynamo.explain(fn)(q, k, v)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    torch._dynamo.reset()
    c_out, c_weights = torch.compile(fn, fullgraph=True, backend="aot_eager")(q, k, v)
    assert torch.equal(c_out, out) and torch.equal(c_weights, weights)


def test_numba_attention_weights_backward_compiles():
    """The numba weights' backward (NumbaWeightsFunction over pydl::attention_weights_bwd)
    traces with fullgraph=True and gives the eager gradients of a loss on the weights and the
    output, a float mask's included."""
    def fn(q, k, v, m):
        out, w = attention.attention_with_weights(q, k, v, attn_mask=m, enable_gqa=True,
                                                  backend="numba")
        return out.sum() + (w * w).sum()
    args = (_x(1, 2, 4, 8), _x(1, 1, 6, 8), _x(1, 1, 6, 8), _x(4, 6))
    grads = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        leaves = [a.clone().requires_grad_() for a in args]
        run(*leaves).backward()
        grads.append([t.grad for t in leaves])
    torch._dynamo.reset()
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_packed_sequence_with_state_compiles():
    """A PackedSequence input with an initial state: its batch, batch_sizes[0], is data (an
    unbacked size under torch.compile), and the state's shape check against it failed to
    trace (a guard on data); the state's batch now tells it. Compiled == eager."""
    w = [_x(9, 2, grad=True), _x(9, 3, grad=True), _x(9), _x(9)]
    lengths = torch.tensor([3, 2])

    def fn(x, h0):      # dynamo does not trace pack_padded_sequence (torch's): outside
        return _packed_gru(torch.nn.utils.rnn.pack_padded_sequence(x, lengths), h0)

    def _packed_gru(seq, h0):
        out, h = pydl.gru(seq, h0, w, backend=BACKEND)
        return (out.data * out.data).sum() + h.sum()

    args = (_x(3, 2, 2, grad=True), _x(1, 2, 3, grad=True))
    out, grads = _grads(fn, args)
    compiled = torch.compile(_packed_gru, fullgraph=True, backend="aot_eager")
    c_out, c_grads = _grads(lambda x, h0: compiled(
        torch.nn.utils.rnn.pack_padded_sequence(x, lengths), h0), args)
    torch.testing.assert_close(c_out, out)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b)


def test_packed_lstm_with_projections_compiles():
    """A packed LSTM with proj_size (bidirectional: the reversed direction's rows start at
    their own ends) is one layer call like any other: fullgraph=True traces it (its per-length
    calls, read from batch_sizes' values, broke the graph before), and the result and
    gradients are eager's."""
    H, P, I = 4, 2, 3
    w = [_x(4 * H, I, grad=True), _x(4 * H, P, grad=True), _x(4 * H), _x(4 * H),
         _x(P, H, grad=True)] * 2
    lengths = torch.tensor([3, 2, 1])

    def fn(x, *_):      # the weights are leaves only for the gradients
        return _packed_lstm(torch.nn.utils.rnn.pack_padded_sequence(x, lengths))

    def _packed_lstm(seq):
        out, (h, c) = pydl.lstm(seq, None, w, bidirectional=True, backend=BACKEND)
        return (out.data * out.data).sum() + h.sum() + c.sum()

    x = _x(3, 3, I, grad=True)
    out, grads = _grads(fn, (x, w[0], w[1], w[4]))
    compiled = torch.compile(_packed_lstm, fullgraph=True, backend="aot_eager")
    c_out, c_grads = _grads(lambda x, *_: compiled(
        torch.nn.utils.rnn.pack_padded_sequence(x, lengths)), (x, w[0], w[1], w[4]))
    torch.testing.assert_close(c_out, out)
    for a, b in zip(c_grads, grads):
        torch.testing.assert_close(a, b)


def test_backend_switch_recompiles():
    """The backend is read at trace time and guarded on: changing it re-traces."""
    fn = torch.compile(lambda x: pydl.softmax(x, -1) * 2, fullgraph=True, backend="eager")
    x = _x(3, 5)
    a = fn(x)
    calls = []
    real = _softmax_ce_ops.LAUNCHERS["numba"].softmax_fwd
    _softmax_ce_ops.LAUNCHERS["numba"].softmax_fwd = staticmethod(
        lambda *args: (calls.append(1), real(*args)))
    try:
        with pydl.use_backend("numba"):
            b = fn(x)
    finally:
        _softmax_ce_ops.LAUNCHERS["numba"].softmax_fwd = real
    assert calls, "the compiled function kept the triton launch after use_backend('numba')"
    torch.testing.assert_close(a, b)


# --- autocast -----------------------------------------------------------------------------

AUTOCAST = {
    "conv2d": (lambda x, m: m.conv2d(x, x[:2, :, :3, :3].contiguous()), (3, 3, 6, 6)),
    "max_pool2d": (lambda x, m: m.max_pool2d(x, 2), (2, 3, 6, 6)),
    "softmax": (lambda x, m: m.softmax(x, -1), (3, 5)),
    "cross_entropy": (lambda x, m: m.cross_entropy(x, torch.zeros(3, dtype=torch.long,
                                                                  device=x.device)),
                      (3, 5)),
    "sdpa": (lambda x, m: m.scaled_dot_product_attention(x, x, x), (1, 2, 4, 8)),
}


@pytest.mark.parametrize("op", sorted(AUTOCAST))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32_in", "fp16_in"])
def test_autocast_dtype_matches_torch(op, dtype):
    fn, shape = AUTOCAST[op]
    x = torch.randn(*shape, device=DEVICE).to(dtype)
    with torch.autocast(DEVICE, dtype=torch.float16):
        ours = fn(x, pydl)
        theirs = fn(x, torch.nn.functional)
    assert ours.dtype == theirs.dtype, f"{op}: pydl gives {ours.dtype}, torch {theirs.dtype}"
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32_in", "fp16_in"])
def test_autocast_linear_cross_entropy(dtype):
    """Under autocast the product runs in the autocast dtype (linear's rule) and the loss
    comes out in float32 (cross_entropy's), as torch's composite gives."""
    x, w = _x(6, 8).to(dtype), _x(5, 8).to(dtype)
    t = torch.randint(0, 5, (6,), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        ours = pydl.linear_cross_entropy(x, w, t, backend=BACKEND)
        theirs = torch.nn.functional.cross_entropy(torch.nn.functional.linear(x, w), t)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=2e-2)


# the recurrent ops against torch's modules on the same weights: (module, pydl's call of it,
# torch's output); the LSTM with projections, as torch's CPU LSTM fails in float16 without
RNN_AUTOCAST = {
    "lstm": (lambda: torch.nn.LSTM(4, 6, proj_size=3),
             lambda m, x: pydl.lstm(x, None, m._flat_weights)[0], lambda m, x: m(x)[0]),
    "gru": (lambda: torch.nn.GRU(4, 6),
            lambda m, x: pydl.gru(x, None, m._flat_weights)[0], lambda m, x: m(x)[0]),
    "lstm_cell": (lambda: torch.nn.LSTMCell(4, 6),
                  lambda m, x: pydl.lstm_cell(x[0], None, m.weight_ih, m.weight_hh, m.bias_ih,
                                              m.bias_hh)[0], lambda m, x: m(x[0])[0]),
    "gru_cell": (lambda: torch.nn.GRUCell(4, 6),
                 lambda m, x: pydl.gru_cell(x[0], None, m.weight_ih, m.weight_hh, m.bias_ih,
                                            m.bias_hh), lambda m, x: m(x[0])),
}


@pytest.mark.parametrize("op", sorted(RNN_AUTOCAST))
def test_autocast_dtype_matches_torch_recurrent(op):
    """torch's CPU autocast runs the LSTM layer in float16, not the GRU or the cells (CUDA's
    all four): pydl's output dtype follows the device's rule."""
    make, ours_fn, theirs_fn = RNN_AUTOCAST[op]
    m = make().to(DEVICE)
    x = torch.randn(3, 2, 4, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        ours, theirs = ours_fn(m, x), theirs_fn(m, x)
    assert ours.dtype == theirs.dtype, f"{op}: pydl gives {ours.dtype}, torch {theirs.dtype}"
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("op", ["conv2d", "cross_entropy", "sdpa"])
def test_autocast_leaves_float64_alone(op):
    """torch's autocast casts no float64 tensor (it is not eligible): torch's op runs in
    float64, and pydl's kernel backends then refuse it by dtype as outside autocast (they
    cast it to float16 silently before); the torch backend gives torch's float64."""
    fn, shape = AUTOCAST[op]
    x = torch.randn(*shape, device=DEVICE, dtype=torch.float64)
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert fn(x, torch.nn.functional).dtype == torch.float64
        with pydl.use_backend("torch"):
            assert fn(x, pydl).dtype == torch.float64
        with pytest.raises(TypeError, match="float64"):
            fn(x, pydl)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_compiled_inference_keeps_nothing_for_a_backward(monkeypatch, kind):
    """Under torch.compile a layer call without a graph runs the stack's op keeping nothing
    (pydl::rnn_fwd with keep False: no saved tensors, a long sequence's projection in chunks,
    pydl/rnn.py), as eager mode does: the outputs those of an eager training call (bit for
    bit in emulation); and with a graph the op keeps what the backward reads."""
    from pydl import _plan
    T, B, I, H = 5, 2, 3, 4
    G = 4 if kind == "lstm" else 3
    w = [_x(G * H, I), _x(G * H, H), _x(G * H), _x(G * H),        # 2 layers
         _x(G * H, H), _x(G * H, H), _x(G * H), _x(G * H)]
    fn = pydl.lstm if kind == "lstm" else pydl.gru

    def layer(x):
        out, finals = fn(x, None, w, num_layers=2, backend=BACKEND)
        return (out, *finals) if kind == "lstm" else (out, finals)
    x = _x(T, B, I)
    want = layer(x.clone().requires_grad_())
    keeps = []
    real = rnn._Forward.__call__
    monkeypatch.setattr(rnn._Forward, "__call__",
                        lambda self, *a: keeps.append(a[-1]) or real(self, *a))
    monkeypatch.setattr(rnn, "INFERENCE_CHUNK_BYTES", 4 * B * G * H * 2)    # chunks of 2 steps
    _plan.clear_all()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        got = compiled(x)
    assert keeps and not any(keeps)
    from rnn_checks import assert_same_but_chunks
    assert_same_but_chunks(got, want, 4 * (I + H))
    keeps.clear()
    torch._dynamo.reset()
    torch.compile(layer, fullgraph=True, backend="aot_eager")(x.clone().requires_grad_())
    assert keeps and all(keeps)
    _plan.clear_all()
