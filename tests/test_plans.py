"""Per-signature plans (pydl/_plan.py): an eager call reuses the checked call, the output
allocations and the launches its signature built, so a call that differs in anything a plan
was built from must get a plan of its own. Each case runs an op on one layout of its inputs
and then on others of the same shapes, in one process (the plans of the first stay cached),
and compares outputs and gradients with the torch backend: a key that missed a stride, a
dtype or the TF32 switch would run the second layout through the first one's launches and
fail here. Inputs are views of leaf tensors, so the strided layouts reach the ops as they are.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE

import pydl
from pydl import _plan

TOL = dict(rtol=2e-4, atol=2e-4)


def _randn(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _run(op, bases, view, grad):
    """op(*view(*leaves)) on fresh leaves copied from `bases`, backpropagating grad(out):
    (output, the leaves' gradients)."""
    leaves = [b.detach().clone().requires_grad_(b.is_floating_point()) for b in bases]
    out = op(*view(*leaves))
    out.backward(grad(out))
    return out.detach(), [leaf.grad for leaf in leaves]


def _check_layouts(op, layouts, backend="triton"):
    """op(*inputs, backend=...) against backend='torch' for each (bases, view, grad) in
    turn."""
    for i, (bases, view, grad) in enumerate(layouts):
        out, grads = _run(lambda *a: op(*a, backend=backend), bases, view, grad)
        t_out, t_grads = _run(lambda *a: op(*a, backend="torch"), bases, view, grad)
        torch.testing.assert_close(out, t_out, **TOL, msg=lambda m, i=i: f"layout {i}: {m}")
        for j, (a, b) in enumerate(zip(grads, t_grads)):
            if b is None:
                assert a is None
                continue
            torch.testing.assert_close(a, b, **TOL,
                                       msg=lambda m, i=i, j=j: f"layout {i}, grad {j}: {m}")


def _cotangent(shape, permute=None):
    """A fixed cotangent: contiguous, or laid out as `permute` of a contiguous tensor."""
    if permute is None:
        g = _randn(*shape)
        return lambda out: g
    inverse = [permute.index(d) for d in range(len(permute))]
    g = _randn(*[shape[d] for d in permute]).permute(*inverse)
    return lambda out: g


# --- conv2d ---------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,algo", [("triton", "implicit"), ("triton", "im2col"),
                                          ("numba", "im2col")])
def test_conv2d_layouts_do_not_share_a_plan(backend, algo):
    """Input NCHW, channels_last and strided; weight contiguous and strided; bias contiguous
    and a strided view (the implicit kernel reads it at unit stride: copied); cotangent NCHW
    and channels_last, in one process."""
    N, C, H, W, OC = 2, 3, 5, 6, 4
    x, xw = _randn(N, C, H, W), _randn(N, C, H, W + 3)
    w, wt = _randn(OC, C, 3, 3), _randn(OC, C, 3, 3)
    b, b2 = _randn(OC), _randn(2 * OC)
    out_shape = (N, OC, H, W)
    nchw, cl = _cotangent(out_shape), _cotangent(out_shape, (0, 2, 3, 1))
    cl_x = lambda x: x.to(memory_format=torch.channels_last)  # noqa: E731
    swap_w = lambda w: w.transpose(2, 3).contiguous().transpose(2, 3)  # noqa: E731
    layouts = [     # one thing changed at a time, then all
        ((x, w, b), lambda x, w, b: (x, w, b), nchw),
        ((x, w, b), lambda x, w, b: (cl_x(x), w, b), nchw),
        ((x, w, b), lambda x, w, b: (cl_x(x), w, b), cl),
        ((x, wt, b), lambda x, w, b: (x, swap_w(w), b), cl),
        ((x, w, b2), lambda x, w, b: (x, w, b[::2]), cl),
        ((xw, wt, b2), lambda x, w, b: (x[..., 1:-2], swap_w(w), b[::2]), cl),
        ((x, w, b), lambda x, w, b: (x, w, b), cl),
    ]
    _check_layouts(lambda x, w, b, backend: pydl.conv2d(
        x, w, b, padding=1, backend=backend, **({"algo": algo} if backend != "torch" else {})),
        layouts, backend)


def test_conv2d_strided_bias():
    """A bias view with a stride (a slice of a larger tensor) on the implicit kernel, which
    reads the bias at unit stride: the wrong channels' values before it was copied. One
    output channel's bias of any stride is read as it is (torch calls it contiguous and
    .contiguous() keeps its stride: copying it for the kernel had recursed forever)."""
    x, w, b = _randn(1, 3, 5, 5), _randn(4, 3, 3, 3), _randn(8)
    y = pydl.conv2d(x, w, b[::2], padding=1, backend="triton", algo="implicit")
    torch.testing.assert_close(y, F.conv2d(x, w, b[::2], padding=1), **TOL)
    w1 = _randn(1, 3, 3, 3)
    for b1 in (b[::2][:1], b[3:4].expand(1), b[5:6]):
        for algo in ("implicit", "im2col"):
            y = pydl.conv2d(x, w1, b1, padding=1, backend="triton", algo=algo)
            torch.testing.assert_close(y, F.conv2d(x, w1, b1, padding=1), **TOL)


def test_conv2d_dtype_does_not_share_a_plan():
    x, w = _randn(2, 3, 5, 5), _randn(4, 3, 3, 3)
    for dtype in (torch.float32, torch.float16, torch.float32):
        y = pydl.conv2d(x.to(dtype), w.to(dtype), padding=1)
        assert y.dtype == dtype
        torch.testing.assert_close(y.float(), F.conv2d(x.to(dtype).float(), w.to(dtype).float(),
                                                       padding=1), rtol=2e-2, atol=2e-2)


def _precisions(monkeypatch):
    """The INPUT_PRECISION of every Launch called from now on."""
    seen = []
    real = _plan.Launch.__call__

    def spy(self, *tensors, **dynamic):
        if "INPUT_PRECISION" in self.consts:
            seen.append(self.consts["INPUT_PRECISION"])
        return real(self, *tensors, **dynamic)
    monkeypatch.setattr(_plan.Launch, "__call__", spy)
    return seen


def test_conv2d_follows_the_tf32_switch(monkeypatch):
    """An fp32 conv's launches round as torch.backends.cudnn.allow_tf32 says at the time they
    run: the forward planned under one setting is not reused under the other, nor the
    backward planned under one (on the same forward's plan) after a switch."""
    seen = _precisions(monkeypatch)
    x = _randn(2, 3, 6, 6, dtype=torch.float32).requires_grad_()
    w = _randn(4, 3, 3, 3, dtype=torch.float32).requires_grad_()
    for allow in (True, False, True):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allow)
        seen.clear()
        y = pydl.conv2d(x, w, padding=1, backend="triton", algo="implicit")
        assert seen == ["tf32" if allow else "ieee"], (allow, seen)
        for during in (not allow, allow):       # the backward planned under both
            monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", during)
            seen.clear()
            y.backward(torch.ones_like(y), retain_graph=True)
            assert seen == ["tf32" if during else "ieee"] * 2, (allow, during, seen)


def test_subclass_tensors_do_not_take_the_plan():
    """A tensor subclass with a plain tensor's shapes and strides (FakeTensor) goes through
    the custom op (its fake implementation), not through the launches a plain call planned."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x, w = _randn(2, 3, 6, 6), _randn(4, 3, 3, 3)
    pydl.conv2d(x, w, padding=1)
    pydl.softmax(x, -1)
    with FakeTensorMode() as mode:
        fx, fw = mode.from_tensor(x), mode.from_tensor(w)
        y = pydl.conv2d(fx, fw, padding=1)
        s = pydl.softmax(fx, -1)
    assert type(y) is not torch.Tensor and y.shape == (2, 4, 6, 6)
    assert type(s) is not torch.Tensor and s.shape == x.shape


# --- pooling --------------------------------------------------------------------------------

POOLS = {
    "max_pool2d": lambda x, backend: pydl.max_pool2d(x, 2, backend=backend),
    "avg_pool2d": lambda x, backend: pydl.avg_pool2d(x, 2, backend=backend),
    "adaptive_avg_pool2d": lambda x, backend: pydl.adaptive_avg_pool2d(x, (2, 3),
                                                                       backend=backend),
}


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("op", sorted(POOLS))
def test_pool_layouts_do_not_share_a_plan(op, backend):
    N, C, H, W = 2, 3, 6, 6
    x, xw = _randn(N, C, H, W), _randn(N, C, H, W + 2)
    out_shape = (N, C, 3, 3) if op != "adaptive_avg_pool2d" else (N, C, 2, 3)
    nchw, cl = _cotangent(out_shape), _cotangent(out_shape, (0, 2, 3, 1))
    layouts = [
        ((x,), lambda x: (x,), nchw),
        ((x,), lambda x: (x.to(memory_format=torch.channels_last),), nchw),
        ((x,), lambda x: (x.to(memory_format=torch.channels_last),), cl),
        ((xw,), lambda x: (x[..., 1:-1],), cl),
        ((x,), lambda x: (x,), cl),
    ]
    _check_layouts(POOLS[op], layouts, backend)


# --- softmax and cross-entropy --------------------------------------------------------------

@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("log", [False, True])
def test_softmax_layouts_do_not_share_a_plan(log, backend):
    fn = pydl.log_softmax if log else pydl.softmax
    x, xt = _randn(4, 7), _randn(7, 4)
    rows, cols = _cotangent((4, 7)), _cotangent((4, 7), (1, 0))
    layouts = [
        ((x,), lambda x: (x,), rows),
        ((xt,), lambda x: (x.t(),), rows),
        ((xt,), lambda x: (x.t(),), cols),
        ((x,), lambda x: (x,), cols),
    ]
    for dim in (1, 0):
        _check_layouts(lambda x, backend, dim=dim: fn(x, dim, backend=backend), layouts,
                       backend)


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_layouts_do_not_share_a_plan(reduction, backend):
    """Logits contiguous and transposed, targets contiguous and strided, class weights
    contiguous and strided; a per-row cotangent contiguous and strided."""
    N, C = 5, 7
    x, xt = _randn(N, C), _randn(C, N)
    t, t2 = torch.randint(0, C, (N,), device=DEVICE), torch.randint(0, C, (2 * N,), device=DEVICE)
    w, w2 = _randn(C).abs(), _randn(2 * C).abs()
    if reduction == "none":
        g, g2 = _randn(N), _randn(2 * N)
        plain, strided = (lambda out: g), (lambda out: g2[::2])
    else:
        g = _randn(())
        plain = strided = (lambda out: g)
    d = torch.Tensor.detach      # torch's cross_entropy has no gradient for the weights
    layouts = [
        ((x, t, w), lambda x, t, w: (x, t, d(w)), plain),
        ((x, t, w), lambda x, t, w: (x, t, d(w)), strided),
        ((xt, t, w), lambda x, t, w: (x.t(), t, d(w)), plain),
        ((xt, t2, w2), lambda x, t, w: (x.t(), t[::2], d(w)[::2]), strided),
        ((x, t2, w), lambda x, t, w: (x, t[::2], d(w)), strided),
        ((x, t, w), lambda x, t, w: (x, t, d(w)), plain),
    ]
    _check_layouts(lambda x, t, w, backend: pydl.cross_entropy(
        x, t, weight=w, reduction=reduction, label_smoothing=0.1, backend=backend), layouts,
        backend)


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_probabilities_layouts_do_not_share_a_plan(reduction, backend):
    """Class-probability targets (their own plan): logits and targets contiguous, transposed
    and strided, (N, C, d) logits, class weights strided, the target's gradient too; a
    per-row cotangent contiguous and strided."""
    N, C, D = 5, 7, 3
    x, xt, x3 = _randn(N, C), _randn(C, N), _randn(N, C, D)
    y, y2, y3 = _randn(N, C).softmax(1), _randn(N, 2 * C).softmax(1), _randn(N, C, D).softmax(1)
    w, w2 = _randn(C).abs(), _randn(2 * C).abs()
    if reduction == "none":
        g, g2, g3 = _randn(N), _randn(2 * N), _randn(N, D)
        plain, strided, rows3 = (lambda out: g), (lambda out: g2[::2]), (lambda out: g3)
    else:
        g = _randn(())
        plain = strided = rows3 = (lambda out: g)
    d = torch.Tensor.detach      # torch's cross_entropy has no gradient for the weights
    layouts = [
        ((x, y, w), lambda x, y, w: (x, y, d(w)), plain),
        ((x, y, w), lambda x, y, w: (x, y, d(w)), strided),
        ((xt, y, w), lambda x, y, w: (x.t(), y, d(w)), plain),
        ((xt, y2, w2), lambda x, y, w: (x.t(), y[:, ::2], d(w)[::2]), strided),
        ((x3, y3, w), lambda x, y, w: (x, y, d(w)), rows3),
        ((x3, y3, w), lambda x, y, w: (x.transpose(1, 2).contiguous().transpose(1, 2), y, d(w)),
         rows3),
        ((x, y, w), lambda x, y, w: (x, y, d(w)), plain),
    ]
    _check_layouts(lambda x, y, w, backend: pydl.cross_entropy(
        x, y, weight=w, reduction=reduction, label_smoothing=0.1, backend=backend), layouts,
        backend)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_numba_fp64_weights_each_call(reduction):
    """The numba kernels read fp64 class weights as fp32, a copy made per call: a plan that
    kept the first call's copy would weigh the later calls' losses by the first's weights."""
    N, C = 6, 5
    for _ in range(3):
        x, t = _randn(N, C), torch.randint(0, C, (N,), device=DEVICE)
        w = _randn(C, dtype=torch.float64).abs()
        xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
        out = pydl.cross_entropy(xs[0], t, weight=w, reduction=reduction, backend="numba")
        ref = F.cross_entropy(xs[1], t, weight=w.float(), reduction=reduction)
        torch.testing.assert_close(out, ref, **TOL)
        g = torch.ones_like(ref)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL)


# --- attention ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,algo", [("triton", "flash"), ("triton", "naive"),
                                          ("numba", "flash")])
def test_attention_layouts_do_not_share_a_plan(backend, algo):
    """q, k, v contiguous and as (B, L, H, E) transposed; a bool mask, a float mask
    broadcast from (L, S) and one of full shape; the cotangent contiguous and transposed;
    grouped-query K/V heads with q and the cotangent contiguous or transposed (the naive
    variant's (B, Hkv, G * L, E) rows: a view of each, or a copy)."""
    B, H, L, S, E = 1, 2, 5, 6, 8
    q, k, v = _randn(B, H, L, E), _randn(B, H, S, E), _randn(B, H, S, E)
    qt, kt, vt = _randn(B, L, H, E), _randn(B, S, H, E), _randn(B, S, H, E)
    q4, q4t, k1, v1 = _randn(B, 4, L, E), _randn(B, L, 4, E), _randn(B, 1, S, E), _randn(B, 1, S, E)
    float_mask, full_mask = _randn(L, S), _randn(B, H, L, S)
    bool_mask = torch.rand(L, S, device=DEVICE) > 0.3
    bool_mask[:, 0] = True
    plain, transposed = _cotangent((B, H, L, E)), _cotangent((B, H, L, E), (0, 2, 1, 3))
    plain4, transposed4 = _cotangent((B, 4, L, E)), _cotangent((B, 4, L, E), (0, 2, 1, 3))
    t = lambda a: a.transpose(1, 2)  # noqa: E731
    layouts = [
        ((q, k, v), lambda q, k, v: (q, k, v, None), plain),
        ((qt, kt, vt), lambda q, k, v: (t(q), t(k), t(v), None), plain),
        ((qt, kt, vt), lambda q, k, v: (t(q), t(k), t(v), None), transposed),
        ((q, k, v), lambda q, k, v: (q, k, v, bool_mask), transposed),
        ((q, k, v), lambda q, k, v: (q, k, v, float_mask), plain),
        ((q, k, v), lambda q, k, v: (q, k, v, full_mask), plain),
        ((q, k, v), lambda q, k, v: (q, k, v, full_mask.transpose(2, 3).contiguous()
                                     .transpose(2, 3)), plain),
        ((q, k, v, float_mask), lambda q, k, v, m: (q, k, v, m), plain),   # mask gradient
        ((q4, k1, v1), lambda q, k, v: (q, k, v, None), plain4),
        ((q4t, k1, v1), lambda q, k, v: (t(q), k, v, None), transposed4),
        ((q4, k1, v1), lambda q, k, v: (q, k, v, None), plain4),
        ((q, k, v), lambda q, k, v: (q, k, v, None), plain),
    ]
    _check_layouts(lambda q, k, v, m, backend: pydl.scaled_dot_product_attention(
        q, k, v, attn_mask=m, enable_gqa=q.shape[1] != k.shape[1], backend=backend,
        algo=algo if backend != "torch" else None), layouts, backend)


def test_attention_dtype_does_not_share_a_plan():
    q = _randn(1, 2, 5, 16)
    for dtype in (torch.float32, torch.float16, torch.float32):
        a = q.to(dtype)
        o = pydl.scaled_dot_product_attention(a, a, a)
        assert o.dtype == dtype
        ref = F.scaled_dot_product_attention(a.float(), a.float(), a.float())
        torch.testing.assert_close(o.float(), ref, rtol=2e-2, atol=2e-2)


# --- recurrent layers and cells -------------------------------------------------------------

def _column_major(w):
    return w.t().contiguous().t()


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_rnn_layer_layouts_do_not_share_a_plan(kind):
    """Weights contiguous and column-major, the input (T, B, I) and batch-first, the output's
    cotangent contiguous and transposed."""
    G = 4 if kind == "lstm" else 3
    T, B, I, Hd = 3, 2, 4, 5
    x, xb = _randn(T, B, I), _randn(B, T, I)
    ws = [_randn(G * Hd, I), _randn(G * Hd, Hd), _randn(G * Hd), _randn(G * Hd)]
    fn = getattr(pydl, kind)
    plain, transposed = _cotangent((T, B, Hd)), _cotangent((T, B, Hd), (1, 0, 2))

    def op(x, *w, backend, batch_first=False):
        return fn(x, None, list(w), batch_first=batch_first, backend=backend)[0]

    layouts = [
        ((x, *ws), lambda x, *w: (x, *w), plain),
        ((x, *ws), lambda x, *w: (x, _column_major(w[0]), _column_major(w[1]), *w[2:]),
         plain),
        ((x, *ws), lambda x, *w: (x, _column_major(w[0]), _column_major(w[1]), *w[2:]),
         transposed),
        ((x, *ws), lambda x, *w: (x, *w), transposed),
    ]
    _check_layouts(op, layouts)
    first = [((xb, *ws), lambda x, *w: (x, *w), _cotangent((B, T, Hd)))]
    _check_layouts(lambda x, *w, backend: op(x, *w, backend=backend, batch_first=True), first)


@pytest.mark.parametrize("kind", ["lstm_cell", "gru_cell"])
def test_rnn_cell_layouts_do_not_share_a_plan(kind):
    G = 4 if kind == "lstm_cell" else 3
    B, I, Hd = 3, 4, 5
    x, h = _randn(B, I), _randn(B, Hd)
    w_ih, w_hh = _randn(G * Hd, I), _randn(G * Hd, Hd)
    fn = getattr(pydl, kind)

    def op(x, h, w_ih, w_hh, backend):
        hx = (h, h * 0.5) if kind == "lstm_cell" else h
        out = fn(x, hx, w_ih, w_hh, backend=backend)
        return out[0] + 2 * out[1] if kind == "lstm_cell" else out

    grad = lambda out: torch.ones_like(out)  # noqa: E731
    layouts = [
        ((x, h, w_ih, w_hh), lambda *a: a, grad),
        ((x, h, w_ih, w_hh), lambda x, h, a, b: (x, h, _column_major(a), _column_major(b)), grad),
        ((x, h, w_ih, w_hh), lambda x, h, a, b: (_column_major(x), h, a, b), grad),
        ((x, h, w_ih, w_hh), lambda *a: a, grad),
    ]
    _check_layouts(op, layouts)


# --- the plans' bookkeeping -----------------------------------------------------------------

def test_no_graph_calls_share_the_plan_with_training_calls():
    """A call without a gradient and one with use the same plan (the same cached call), and a
    backward after no-grad calls still gets the right gradients."""
    x = _randn(2, 3, 6, 6)
    w = _randn(4, 3, 3, 3).requires_grad_()
    with torch.no_grad():
        y0 = pydl.conv2d(x, w, padding=1)
    sizes = [len(c.entries) for c in _plan.Cache.all]
    y = pydl.conv2d(x, w, padding=1)
    y.sum().backward()
    torch.testing.assert_close(y.detach(), y0)
    torch.testing.assert_close(w.grad, torch.func.grad(lambda w: F.conv2d(
        x, w, padding=1).sum())(w.detach()), **TOL)
    calls = [c for c in _plan.Cache.all if c.name == "conv2d calls"][0]
    assert len(calls.entries) == sizes[_plan.Cache.all.index(calls)]


# op -> (its module, the shapes of its differentiable inputs, pydl's call, torch's, the
# outputs a call allocates); a cell's outputs (h1, c1) concatenated
_CELL_SHAPES = [(5, 6), (5, 7)]
_TARGET = torch.tensor([0, 4, 2, 1, 3, 4])
_PROBS = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)).softmax(1)
WITHOUT_GRAPH = {
    "attention": ("attention", [(1, 2, 20, 16)] * 3,
                  lambda q, k, v, **b: pydl.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                         **b),
                  lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), 1),
    "cross_entropy_mean": ("softmax_ce", [(6, 5)],
                           lambda x, **b: pydl.cross_entropy(x, _TARGET.to(DEVICE),
                                                             label_smoothing=0.1, **b),
                           lambda x: F.cross_entropy(x, _TARGET.to(DEVICE), label_smoothing=0.1),
                           1),
    "cross_entropy_none": ("softmax_ce", [(6, 5)],
                           lambda x, **b: pydl.cross_entropy(x, _TARGET.to(DEVICE),
                                                             reduction="none", **b),
                           lambda x: F.cross_entropy(x, _TARGET.to(DEVICE), reduction="none"), 1),
    "cross_entropy_probabilities": ("softmax_ce", [(6, 5)],
                                    lambda x, **b: pydl.cross_entropy(x, _PROBS.to(DEVICE), **b),
                                    lambda x: F.cross_entropy(x, _PROBS.to(DEVICE)), 1),
    "lstm_cell": ("lstm", _CELL_SHAPES + [(5, 7), (28, 6), (28, 7), (28,), (28,)],
                  lambda x, h, c, *w, **b: torch.cat(pydl.lstm_cell(x, (h, c), *w, **b)),
                  lambda x, h, c, *w: torch.cat(torch.lstm_cell(x, (h, c), *w)), 2),
    "gru_cell": ("gru", _CELL_SHAPES + [(21, 6), (21, 7), (21,), (21,)],
                 lambda x, h, *w, **b: pydl.gru_cell(x, h, *w, **b),
                 lambda x, h, *w: torch.gru_cell(x, h, *w), 1),
}


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("op", WITHOUT_GRAPH)
def test_a_call_without_graph_allocates_only_its_output(monkeypatch, op, backend):
    """A call that records no graph writes what only a backward reads (attention's and
    cross-entropy's rows' log-sum-exp, the loss's denominators, the probability loss's row
    statistics, the cells' gate activations and the LSTM's fp32 cell state) into buffers its
    plan keeps (pydl._launch.WriteOnly) and allocates its outputs alone; a training call's
    saved tensors are its own, so inference calls between its forward and its backward (the
    first under inference_mode) leave its gradients bitwise those of a backward without them.
    (A second backward through the retained graph: the one that reads what the forward saved,
    where the first may take a gradient the forward wrote.) The cells compared with TF32 off,
    as torch's cells multiply."""
    import importlib
    if backend == "numba":
        pytest.importorskip("numba")
    name, shapes, ours, theirs, allocated = WITHOUT_GRAPH[op]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    module = importlib.import_module(f"pydl.{name}")
    leaves = [_randn(*s).requires_grad_() for s in shapes]

    def forward():
        out = ours(*leaves, backend=backend)
        out.square().sum().backward(retain_graph=True)
        return out

    def backward(out):
        for t in leaves:
            t.grad = None
        out.square().sum().backward()
        return [t.grad.clone() for t in leaves]
    want = backward(forward())
    out = forward()
    made = []
    real = module.fresh
    monkeypatch.setattr(module, "fresh", lambda make: made.append(make) or real(make))
    others = [_randn(*s) * 3 for s in shapes]
    for mode in (torch.inference_mode, torch.no_grad, torch.no_grad):
        made.clear()
        with mode():
            got = ours(*others, backend=backend)
        torch.testing.assert_close(got, theirs(*others), **TOL)
    assert len(made) == allocated            # the outputs alone, on a repeated call
    for g, w in zip(backward(out), want):
        assert torch.equal(g, w)
    torch.testing.assert_close(out.detach(), theirs(*[t.detach() for t in leaves]), **TOL)


REGISTERED = {
    "conv2d": lambda: pydl.conv2d(_randn(1, 3, 5, 5), _randn(4, 3, 3, 3)),
    "max_pool2d": lambda: pydl.max_pool2d(_randn(1, 3, 4, 4), 2),
    "avg_pool2d": lambda: pydl.avg_pool2d(_randn(1, 3, 4, 4), 2),
    "adaptive_avg_pool2d": lambda: pydl.adaptive_avg_pool2d(_randn(1, 3, 4, 4), 1),
    "softmax": lambda: pydl.softmax(_randn(3, 5), -1),
    "cross_entropy": lambda: pydl.cross_entropy(_randn(3, 5), torch.tensor([0, 4, 2])),
    "scaled_dot_product_attention": lambda: pydl.scaled_dot_product_attention(
        *(_randn(1, 2, 4, 8),) * 3),
    "lstm": lambda: pydl.lstm(_randn(3, 2, 4), None, [_randn(20, 4), _randn(20, 5)],
                              bias=False),
    "lstm_cell": lambda: pydl.lstm_cell(_randn(2, 4), None, _randn(20, 4), _randn(20, 5)),
    "gru_cell": lambda: pydl.gru_cell(_randn(2, 4), None, _randn(15, 4), _randn(15, 5)),
    "linear_cross_entropy": lambda: pydl.linear_cross_entropy(
        _randn(3, 4), _randn(5, 4), torch.tensor([0, 4, 2])),
}


@pytest.mark.parametrize("op", sorted(REGISTERED))
def test_a_registered_implementation_replaced_is_the_one_that_runs(monkeypatch, op):
    """The backend registry decides what runs: a call plans its eager form only where the
    registered implementation is pydl's own, so one registered in its place is called."""
    from pydl import backends
    calls = []
    impls = dict(backends._registry[op])
    real = impls["triton"]
    impls["triton"] = lambda *a, **k: calls.append(op) or real(*a, **k)
    monkeypatch.setitem(backends._registry, op, impls)
    REGISTERED[op]()
    assert calls == [op]


@pytest.mark.parametrize("op", sorted(REGISTERED))
def test_registering_an_implementation_forgets_the_calls_checked(monkeypatch, op):
    """A call's signature keeps the implementation it dispatched to: one registered after
    (pydl.backends.register) runs from the next call on, on the same signature."""
    from pydl import backends
    monkeypatch.setitem(backends._registry, op, dict(backends._registry[op]))
    monkeypatch.setitem(backends._algos, op, dict(backends._algos[op]))
    torch.manual_seed(0)
    REGISTERED[op]()                         # the signature's call kept, with pydl's own
    calls = []
    real = backends._registry[op]["triton"]
    backends.register(op, "triton", backends.algorithms(op, "triton"))(
        lambda *a, **k: calls.append(op) or real(*a, **k))
    torch.manual_seed(0)
    REGISTERED[op]()
    assert calls == [op]


_X4 = _randn(1, 2, 5, 5)
_W4 = _randn(3, 2, 3, 3)
_ROWS = _randn(4, 6)
_CLASSES = torch.tensor([0, 1, 2, 5], device=DEVICE)
_SEQ = _randn(3, 2, 4)
# (op, the options of a valid call, {option: a value equal to its valid one that is refused})
REFUSED_EQUALS = {
    "conv2d": (lambda **o: pydl.conv2d(_X4, _W4, **o),
               dict(stride=1, padding=(1, 1), dilation=1, groups=1),
               dict(stride=1.0, padding=(True, 1), dilation=True, groups=1.0)),
    "max_pool2d": (lambda **o: pydl.max_pool2d(_X4, **o),
                   dict(kernel_size=2, stride=(2, 2), padding=0, dilation=1),
                   dict(kernel_size=2.0, stride=(2.0, 2), padding=False, dilation=True)),
    "avg_pool2d": (lambda **o: pydl.avg_pool2d(_X4, **o),
                   dict(kernel_size=2, stride=2, padding=0, divisor_override=3),
                   dict(kernel_size=(2, 2.0), stride=2.0, padding=0.0, divisor_override=3.0)),
    "adaptive_avg_pool2d": (lambda **o: pydl.adaptive_avg_pool2d(_X4, **o),
                            dict(output_size=(2, 2)), dict(output_size=(2.0, 2))),
    "softmax": (lambda **o: pydl.softmax(_ROWS, **o), dict(dim=1), dict(dim=True)),
    "log_softmax": (lambda **o: pydl.log_softmax(_ROWS, **o), dict(dim=1), dict(dim=1.0)),
    "cross_entropy": (lambda **o: pydl.cross_entropy(_ROWS, _CLASSES, **o),
                      dict(ignore_index=1, z_loss=0.0), dict(ignore_index=1.0, z_loss=False)),
    "linear_cross_entropy": (
        lambda **o: pydl.linear_cross_entropy(_ROWS, _randn(7, 6), _CLASSES, **o),
        dict(ignore_index=1, softcap=4.0, chunk_rows=2),
        dict(ignore_index=True, softcap=True, chunk_rows=2.0)),
    "lstm": (lambda **o: pydl.lstm(_SEQ, None, [_randn(20, 4), _randn(20, 5)], bias=False, **o),
             dict(num_layers=1, recompute=False), dict(num_layers=1.0, recompute=0)),
    "gru": (lambda **o: pydl.gru(_SEQ, None, [_randn(15, 4), _randn(15, 5)], bias=False, **o),
            dict(num_layers=1), dict(num_layers=1.0)),
}


@pytest.mark.parametrize("op", sorted(REFUSED_EQUALS))
def test_a_refused_option_is_refused_after_an_equal_valid_one(op):
    """The checks refuse what torch refuses (a float or bool stride, a float dim), also after a
    call with the equal int kept its signature: a call's key holds its options' types
    (pydl._plan.options_key), so 1.0 or True is not served by the call kept for 1."""
    run, valid, refused = REFUSED_EQUALS[op]
    for name, value in refused.items():
        options = {**valid, name: value}
        _plan.clear_all()
        with pytest.raises((TypeError, ValueError)):
            run(**options)                   # refused on its own
        run(**valid)
        with pytest.raises((TypeError, ValueError)):
            run(**options)                   # and after the valid call
