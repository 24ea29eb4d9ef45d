"""linear_cross_entropy: cross_entropy(linear(x, W, b), target) in row chunks, on both kernel
backends, against the float64 reference (the logits computed in float64, then
pydl.reference's cross-entropy and its backward) and against torch's composite, every option,
forward and the gradients of input, weight and bias."""
import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_CUDA, KERNEL_BACKENDS, spy_kernels, take_tma_gemm

import pydl
from pydl import _linear_ce_ops, linear_ce
from pydl import reference as ref
from pydl.testing import assert_close, random_tensor

backends = pytest.mark.parametrize("backend", KERNEL_BACKENDS)
F = torch.nn.functional


def _targets(n, classes, ignore_index=None, frac=0.3, shape=None):
    t = torch.randint(0, classes, (n,))
    if ignore_index is not None:
        t[torch.rand(n) < frac] = ignore_index
    return t.reshape(shape or (n,)).to(DEVICE)


def _reference(x, w, b, t, g, class_weight, softcap=None, z_loss=0.0, **kw):
    """(loss, dx, dw, db) in float64: the logits (capped: s tanh(. / s)), the cross-entropy
    and its backward by pydl.reference (the z-loss included), the cap's and the linear layer's
    gradients by hand."""
    x64 = x.double().cpu().numpy().reshape(-1, x.shape[-1])
    w64 = w.double().cpu().numpy()
    logits = x64 @ w64.T + (0.0 if b is None else b.double().cpu().numpy())
    if softcap:
        logits = softcap * np.tanh(logits / softcap)
    t64 = t.cpu().numpy().reshape(-1)
    cw = None if class_weight is None else class_weight.double().cpu().numpy()
    g64 = g.double().cpu().numpy().reshape(-1) if g.dim() else float(g)
    loss = ref.cross_entropy(logits, t64, cw, **kw, z_loss=z_loss)
    dlogits = ref.cross_entropy_backward(g64, logits, t64, cw, **kw, z_loss=z_loss)
    if softcap:
        dlogits = dlogits * (1.0 - (logits / softcap) ** 2)
    return (np.asarray(loss).reshape(tuple(t.shape)) if kw.get("reduction") == "none"
            else loss, (dlogits @ w64).reshape(x.shape), dlogits.T @ x64, dlogits.sum(0))


def _check(backend, dtype, x, w, b, t, class_weight=None, upstream=None, chunk_rows=None,
           scale=None, softcap=None, z_loss=0.0, **kw):
    """pydl against the reference and torch: the loss and every gradient; returns them."""
    leaves = [a.detach().clone().requires_grad_() for a in (x, w) + ((b,) if b is not None
                                                                     else ())]
    loss = pydl.linear_cross_entropy(leaves[0], leaves[1], t, leaves[2] if b is not None
                                     else None, class_weight=class_weight, softcap=softcap,
                                     z_loss=z_loss, chunk_rows=chunk_rows, backend=backend,
                                     **kw)
    g = upstream if upstream is not None else (
        torch.randn(loss.shape, device=DEVICE).to(loss.dtype) if loss.dim()
        else torch.tensor(1.0, device=DEVICE, dtype=loss.dtype))
    grads = torch.autograd.grad(loss, leaves, g)
    t_leaves = [a.detach().clone().requires_grad_() for a in leaves]
    logits = F.linear(t_leaves[0], t_leaves[1], t_leaves[2] if b is not None else None)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    t_loss = F.cross_entropy(logits.reshape(-1, w.shape[0]), t.reshape(-1),
                             weight=class_weight, **kw)
    if z_loss:      # the rows that count: z lse^2 (a mean: over their number)
        counted = t.reshape(-1) != kw.get("ignore_index", -100)
        z = z_loss * torch.logsumexp(logits.reshape(-1, w.shape[0]), 1).square() * counted
        t_loss = t_loss + (z if kw.get("reduction") == "none" else z.sum() / (
            counted.sum().clamp_min(1) if kw.get("reduction", "mean") == "mean" else 1))
    if kw.get("reduction") == "none":
        t_loss = t_loss.view(t.shape)
    t_grads = torch.autograd.grad(t_loss, t_leaves, g)
    want = _reference(x, w, b, t, g, class_weight, softcap, z_loss, **kw)
    classes, hidden = w.shape
    rows = t.numel()
    assert loss.dtype == x.dtype and loss.shape == t_loss.shape
    red = classes * hidden * (rows if kw.get("reduction", "mean") != "none" else 1)
    assert_close(loss, want[0], dtype, reduction=red, name="loss vs reference", scale=scale)
    assert_close(loss, t_loss, dtype, reduction=red, name="loss vs torch", scale=scale)
    for name, got, r64, tg, k in zip(("input", "weight", "bias"), grads, want[1:], t_grads,
                                     (classes, rows, rows)):
        assert got.dtype == dtype and got.shape == tg.shape, name
        assert_close(got, r64, dtype, reduction=k, name=f"d{name} vs reference", scale=scale)
        assert_close(got, tg, dtype, reduction=k, name=f"d{name} vs torch", scale=scale)
    return loss, grads


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["one_chunk", "chunks_of_4"])
def test_options(backend, reduction, weighted, smoothing, chunk_rows):
    """Every reduction, class weights, label smoothing and an ignore_index, with a bias, in
    one chunk and in four (the last one short), with an upstream gradient other than 1."""
    N, H, V = 13, 24, 37
    x = random_tensor((N, H), torch.float32, DEVICE)
    w = random_tensor((V, H), torch.float32, DEVICE, scale=0.3)
    b = random_tensor((V,), torch.float32, DEVICE)
    cw = torch.rand(V, device=DEVICE) + 0.5 if weighted else None
    g = None if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    _check(backend, torch.float32, x, w, b, _targets(N, V, 3), cw, upstream=g,
           chunk_rows=chunk_rows, reduction=reduction, label_smoothing=smoothing,
           ignore_index=3)


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["one_chunk", "chunks_of_4"])
def test_softcap(backend, reduction, chunk_rows):
    """Capped logits s tanh(z / s) (Gemma-2's final layer): the GEMM's epilogue caps them and
    the gradient kernels multiply by 1 - (logit / s)^2, with weights and smoothing, in one
    chunk and in several. Logits of tens against a cap of 2, most of them on the flat part
    of the tanh, where a missing factor would show."""
    N, H, V = 13, 24, 37
    x = random_tensor((N, H), torch.float32, DEVICE, scale=3.0)
    w = random_tensor((V, H), torch.float32, DEVICE)
    b = random_tensor((V,), torch.float32, DEVICE)
    g = None if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    _check(backend, torch.float32, x, w, b, _targets(N, V, 3), torch.rand(V, device=DEVICE)
           + 0.5, upstream=g, chunk_rows=chunk_rows, reduction=reduction, softcap=2.0,
           label_smoothing=0.1, ignore_index=3)


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_rows", [None, 4], ids=["one_chunk", "chunks_of_4"])
def test_z_loss(backend, reduction, chunk_rows):
    """z lse^2 added to each row that counts (PaLM's z-loss), with smoothing, a cap and an
    ignore_index, in one chunk and in several: the forward kernels add it to the rows' losses,
    the gradient kernels add g 2 z lse p_c. The rows' lse is about 4-6, so the term (z = 0.1:
    about 2-4 a row, as large as the cross-entropy) is not lost in the tolerance."""
    N, H, V = 13, 24, 37
    x = random_tensor((N, H), torch.float32, DEVICE)
    w = random_tensor((V, H), torch.float32, DEVICE)
    b = random_tensor((V,), torch.float32, DEVICE)
    g = None if reduction == "none" else torch.tensor(0.7, device=DEVICE)
    for softcap in (None, 3.0):
        _check(backend, torch.float32, x, w, b, _targets(N, V, 3), upstream=g,
               chunk_rows=chunk_rows, reduction=reduction, softcap=softcap, z_loss=0.1,
               label_smoothing=0.1, ignore_index=3)


@backends
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("chunk_rows", [None, 5], ids=["one_chunk", "chunks_of_5"])
def test_dtypes_and_leading_dims(backend, dtype, chunk_rows):
    """16-bit hidden states and weights (their gradient summed over chunks in fp32, rounded
    once), a (batch, sequence, hidden) input with (batch, sequence) targets, no bias."""
    B, T, H, V = 2, 7, 16, 40
    x = random_tensor((B, T, H), dtype, DEVICE)
    w = random_tensor((V, H), dtype, DEVICE, scale=0.4)
    for reduction in ("mean", "none"):
        _check(backend, dtype, x, w, None, _targets(B * T, V, -100, shape=(B, T)),
               chunk_rows=chunk_rows, reduction=reduction, label_smoothing=0.05)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=str)
@pytest.mark.parametrize("chunk_rows", [None, 8], ids=["one_chunk", "chunks_of_8"])
def test_triton_on_the_tma_gemm(monkeypatch, dtype, chunk_rows):
    """The triton backend with its shared GEMM's persistent TMA kernel taken wherever the
    tuner is offered it: the logits x W^T (W read as stored), dh = G W and dW = G^T x (the
    logits' gradient read along its rows as A^T), over chunks (each a view of x at a row
    offset) with a bias and a mean's gradient in the forward, and reduction "none" (the
    recompute schedule's backward GEMMs), against the reference and torch."""
    offered, grids = take_tma_gemm(monkeypatch)
    N, H, V = 24, 32, 40        # rows 64 and 80 bytes apart: every operand TMA-addressable
    x = random_tensor((N, H), dtype, DEVICE)
    w = random_tensor((V, H), dtype, DEVICE, scale=0.4)
    b = random_tensor(V, dtype, DEVICE)
    for reduction in ("mean", "none"):
        _check("triton", dtype, x, w, b, _targets(N, V, -100), chunk_rows=chunk_rows,
               reduction=reduction)
    # the logits', dh's and dW's products at least (not the bias gradient's: a broadcast row
    # of ones, which no descriptor addresses)
    assert offered.count(True) >= 3 and len(grids) >= 3, (offered, grids)


@backends
@pytest.mark.parametrize("which", ["input", "weight", "bias", "weight_bias"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradient_of_some_inputs(backend, which, reduction):
    """Only some of input, weight and bias require grad: those get theirs, equal to the full
    computation's, and the others none."""
    N, H, V = 9, 8, 21
    x = random_tensor((N, H), torch.float32, DEVICE)
    w = random_tensor((V, H), torch.float32, DEVICE, scale=0.5)
    b = random_tensor((V,), torch.float32, DEVICE)
    t = _targets(N, V, -100)
    g = torch.ones(t.shape if reduction == "none" else (), device=DEVICE)
    _, full = _check(backend, torch.float32, x, w, b, t, upstream=g, chunk_rows=4,
                     reduction=reduction)
    args = {"input": x.clone(), "weight": w.clone(), "bias": b.clone()}
    wanted = which.split("_")
    for name in wanted:
        args[name].requires_grad_()
    loss = pydl.linear_cross_entropy(args["input"], args["weight"], t, args["bias"],
                                     chunk_rows=4, reduction=reduction, backend=backend)
    got = torch.autograd.grad(loss, [args[n] for n in wanted], g)
    index = {"input": 0, "weight": 1, "bias": 2}
    for name, gr in zip(wanted, got):
        torch.testing.assert_close(gr, full[index[name]], rtol=1e-5, atol=1e-6)


@backends
def test_inference_matches_training_loss(backend):
    """Under no_grad (or with nothing requiring grad) the loss alone, the same values."""
    N, H, V = 11, 8, 19
    x = random_tensor((N, H), torch.float32, DEVICE)
    w = random_tensor((V, H), torch.float32, DEVICE)
    t = _targets(N, V, -100)
    for reduction in ("mean", "sum", "none"):
        with torch.no_grad():
            a = pydl.linear_cross_entropy(x, w, t, reduction=reduction, chunk_rows=3,
                                          backend=backend)
        b = pydl.linear_cross_entropy(x.clone().requires_grad_(), w, t, reduction=reduction,
                                      chunk_rows=3, backend=backend)
        torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-6)
        assert_close(a, F.cross_entropy(F.linear(x, w), t, reduction=reduction),
                     torch.float32, reduction=V * H)


@backends
def test_empty_and_fully_ignored(backend):
    """No rows: a summed loss 0, a mean NaN (torch's), zero gradients of weight and bias. Every
    row ignored: the same, as torch gives."""
    H, V = 6, 9
    w = random_tensor((V, H), torch.float32, DEVICE).requires_grad_()
    b = random_tensor((V,), torch.float32, DEVICE).requires_grad_()
    for n in (0, 5):
        x = random_tensor((n, H), torch.float32, DEVICE).requires_grad_()
        t = torch.full((n,), -100, dtype=torch.long, device=DEVICE)
        for reduction in ("sum", "mean", "none"):
            loss = pydl.linear_cross_entropy(x, w, t, b, reduction=reduction, backend=backend)
            want = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction)
            torch.testing.assert_close(loss, want, equal_nan=True)
            if reduction == "sum":
                dx, dw, db = torch.autograd.grad(loss, (x, w, b))
                assert not dx.any() and not dw.any() and not db.any()
            # with a z-loss (no row has one): the torch backend's composite, gradients too
            got, want = (pydl.linear_cross_entropy(x, w, t, b, reduction=reduction, z_loss=0.1,
                                                   backend=be) for be in (backend, "torch"))
            torch.testing.assert_close(got, want, equal_nan=True)
            for a, e in zip(*(torch.autograd.grad(v.sum(), (x, w, b)) for v in (got, want))):
                torch.testing.assert_close(a, e, equal_nan=True)


@backends
def test_zero_hidden_size(backend):
    """H = 0: the logits are the bias alone (a product over nothing), as torch's composite."""
    x = torch.empty(5, 0, device=DEVICE).requires_grad_()
    w = torch.empty(7, 0, device=DEVICE).requires_grad_()
    b = random_tensor((7,), torch.float32, DEVICE).requires_grad_()
    t = _targets(5, 7)
    for reduction in ("mean", "none"):
        loss = pydl.linear_cross_entropy(x, w, t, b, reduction=reduction, backend=backend)
        want = F.cross_entropy(F.linear(x, w, b), t, reduction=reduction)
        torch.testing.assert_close(loss, want)
        torch.testing.assert_close(torch.autograd.grad(loss.sum(), b)[0],
                                   torch.autograd.grad(want.sum(), b)[0])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [1.0, 2.5])
def test_triton_gradient_in_the_forward(monkeypatch, reduction, upstream):
    """Triton, a summed or averaged loss: each chunk's forward kernel writes its gradient
    (GRAD, the whole batch's mean denominator read, not summed per chunk), the backward runs
    only the scale kernel (on each gradient; it writes nothing where the upstream gradient is
    1); a second backward through the retained graph recomputes, and agrees."""
    from pydl.kernels.triton import softmax_ce as k
    seen = []
    spy_kernels(monkeypatch, k, ("cross_entropy_fwd", "cross_entropy_bwd",
                                 "cross_entropy_scale_grad", "cross_entropy_mean_denominator"),
                lambda name, args, kwargs: seen.append(
                    (name, kwargs.get("GRAD"), kwargs.get("IN_PLACE"))))
    N, H, V = 10, 8, 23
    x = random_tensor((N, H), torch.float32, DEVICE).requires_grad_()
    w = random_tensor((V, H), torch.float32, DEVICE).requires_grad_()
    t = _targets(N, V, 1)
    cw = torch.rand(V, device=DEVICE) + 0.5
    loss = pydl.linear_cross_entropy(x, w, t, class_weight=cw, ignore_index=1,
                                     reduction=reduction, label_smoothing=0.1, chunk_rows=4,
                                     backend="triton")
    # the gradient over the chunk's logits, after a barrier (IN_PLACE)
    assert seen == [("cross_entropy_fwd", True, True)] * 3
    seen.clear()
    g = torch.tensor(upstream, device=DEVICE)
    first = torch.autograd.grad(loss, (x, w), g, retain_graph=True)
    assert seen == [("cross_entropy_scale_grad", None, None)] * 2
    seen.clear()
    second = torch.autograd.grad(loss, (x, w), g)
    assert [s[0] for s in seen] == ["cross_entropy_bwd"] * 3
    kw = dict(reduction=reduction, label_smoothing=0.1, ignore_index=1)
    want = _reference(x.detach(), w.detach(), None, t, g, cw, **kw)
    for a, b, r in zip(first, second, want[1:3]):
        assert_close(a, r, torch.float32, reduction=V)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_triton_gradient_in_the_forward_compiled(monkeypatch, reduction):
    """Under torch.compile too (fullgraph, the custom ops traced) the Triton forward writes the
    gradient (GRAD kernels, no backward kernel) and the compiled backward scales the saved
    gradients out of place: equal to eager's, for an upstream gradient other than 1, and
    again through a retained graph (nothing consumed by the first backward)."""
    from pydl.kernels.triton import softmax_ce as k
    seen = []
    spy_kernels(monkeypatch, k, ("cross_entropy_fwd", "cross_entropy_bwd"),
                lambda name, args, kwargs: seen.append((name, kwargs.get("GRAD"))))
    N, H, V = 10, 8, 23
    x = random_tensor((N, H), torch.float32, DEVICE)
    w = random_tensor((V, H), torch.float32, DEVICE)
    b = random_tensor((V,), torch.float32, DEVICE)
    t = _targets(N, V, -100)

    def step(x, w, b):
        return 2.5 * pydl.linear_cross_entropy(x, w, t, b, reduction=reduction, softcap=3.0,
                                               label_smoothing=0.1, chunk_rows=4,
                                               backend="triton")
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    want = torch.autograd.grad(step(*leaves), leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    leaves = [a.clone().requires_grad_() for a in (x, w, b)]
    loss = compiled(*leaves)
    assert seen and all(s == ("cross_entropy_fwd", True) for s in seen), seen
    seen.clear()
    for _ in range(2):
        got = torch.autograd.grad(loss, leaves, retain_graph=True)
        assert seen == []                   # the backward launches no cross-entropy kernel
        for a, e in zip(got, want):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_chunk_rows_default():
    """CHUNK_BYTES of logits a chunk, in multiples of 64 rows, at most the rows there are."""
    n = _linear_ce_ops.chunk_rows_for(100_000, 131072, torch.bfloat16)
    assert n == _linear_ce_ops.CHUNK_BYTES // (131072 * 2) and n % 64 == 0
    assert _linear_ce_ops.chunk_rows_for(10, 32000, torch.float32) == 10
    assert _linear_ce_ops.chunk_rows_for(10 ** 6, 10 ** 9, torch.float32) == 1


@backends
def test_module(backend):
    """pydl.nn.LinearCrossEntropyLoss: torch.nn.CrossEntropyLoss's options (its class weight a
    buffer) applied to a linear head's output."""
    N, H, V = 8, 12, 15
    cw = torch.rand(V, device=DEVICE) + 0.5
    head = torch.nn.Linear(H, V).to(DEVICE)
    m = pydl.nn.LinearCrossEntropyLoss(cw, ignore_index=0, label_smoothing=0.2, chunk_rows=3,
                                       backend=backend)
    assert "weight" in m.state_dict()
    x, t = random_tensor((N, H), torch.float32, DEVICE), _targets(N, V, 0)
    want = torch.nn.CrossEntropyLoss(cw, ignore_index=0, label_smoothing=0.2)(head(x), t)
    assert_close(m(x, head.weight, t, head.bias), want.detach(), torch.float32,
                 reduction=N * V * H)


@backends
def test_byte_targets(backend):
    """uint8 class indices, as torch's cross_entropy takes them."""
    x = random_tensor((5, 6), torch.float32, DEVICE)
    w = random_tensor((7, 6), torch.float32, DEVICE)
    t = _targets(5, 7)
    torch.testing.assert_close(pydl.linear_cross_entropy(x, w, t.to(torch.uint8),
                                                         backend=backend),
                               pydl.linear_cross_entropy(x, w, t, backend=backend))


def test_torch_backend_is_the_composite():
    x = random_tensor((4, 6), torch.float32, DEVICE)
    w = random_tensor((5, 6), torch.float32, DEVICE)
    t = _targets(4, 5)
    torch.testing.assert_close(pydl.linear_cross_entropy(x, w, t, backend="torch"),
                               F.cross_entropy(F.linear(x, w), t))
    torch.testing.assert_close(pydl.linear_cross_entropy(x, w, t, softcap=3.0, backend="torch"),
                               F.cross_entropy(3.0 * torch.tanh(F.linear(x, w) / 3.0), t))
    torch.testing.assert_close(
        pydl.linear_cross_entropy(x, w, t, z_loss=0.1, reduction="sum", backend="torch"),
        F.cross_entropy(F.linear(x, w), t, reduction="sum")
        + 0.1 * torch.logsumexp(F.linear(x, w), 1).square().sum())


@backends
def test_bad_input(backend):
    x = random_tensor((4, 6), torch.float32, DEVICE)
    w = random_tensor((5, 6), torch.float32, DEVICE)
    t = _targets(4, 5)
    call = pydl.linear_cross_entropy
    with pytest.raises(ValueError, match="in_features"):
        call(x, w[:, :5], t, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        call(x, w.half(), t, backend=backend)
    with pytest.raises(TypeError, match="int64"):
        call(x, w, t.int(), backend=backend)
    with pytest.raises(ValueError, match="target shape"):
        call(x, w, t[:3], backend=backend)
    with pytest.raises(ValueError, match="bias"):
        call(x, w, t, torch.zeros(4, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="class_weight"):
        call(x, w, t, class_weight=torch.ones(4, device=DEVICE), backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        call(x, w, t, reduction="avg", backend=backend)
    with pytest.raises(ValueError, match="chunk_rows"):
        call(x, w, t, chunk_rows=0, backend=backend)
    for cap in (0.0, -1.0, float("inf"), float("nan"), True, "30"):
        with pytest.raises(ValueError, match="softcap"):
            call(x, w, t, softcap=cap, backend=backend)
    call(x, w, t, softcap=1.0, z_loss=0.0, backend=backend)     # a signature checked, kept:
    for z in (-1e-4, float("inf"), float("nan"), None, True, False):   # True is 1, not 1.0
        with pytest.raises(ValueError, match="z_loss"):
            call(x, w, t, softcap=1.0, z_loss=z, backend=backend)
    with pytest.raises(ValueError, match="softcap"):
        call(x, w, t, softcap=True, z_loss=0.0, backend=backend)
    with pytest.raises(ValueError, match="z_loss with class_weight"):
        call(x, w, t, class_weight=torch.ones(5, device=DEVICE), z_loss=1e-4, backend=backend)
    with pytest.raises(ValueError, match="no rows"):
        call(x, w[:0], t, backend=backend)
    with pytest.raises(NotImplementedError, match="class_weight requires grad"):
        call(x, w, t, class_weight=torch.ones(5, device=DEVICE, requires_grad=True),
             backend=backend)
    with torch.no_grad():                   # no gradient taken: nothing to refuse
        call(x, w, t, class_weight=torch.ones(5, device=DEVICE, requires_grad=True),
             backend=backend)
    with pytest.raises(TypeError, match="negative bit"):      # read as stored: refused
        call(x, torch.complex(w, w).conj().imag, t, backend=backend)
    with pytest.raises(IndexError):
        call(x, w, torch.tensor([0, 1, 5, 2], device=DEVICE), backend=backend)
    # double backward: the gradient comes, differentiating it raises (as attention's)
    xg = x.clone().requires_grad_()
    for reduction in ("mean", "none"):
        loss = call(xg, w, t, reduction=reduction, backend=backend)
        (dx,) = torch.autograd.grad(loss.sum(), xg, create_graph=True)
        torch.testing.assert_close(dx, torch.autograd.grad(
            call(xg, w, t, reduction=reduction, backend=backend).sum(), xg)[0])
        with pytest.raises(RuntimeError, match="no double backward"):
            dx.square().sum().backward()


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 in the Triton interpreter is wrong; GPU only")
@pytest.mark.parametrize("extras", [{}, {"softcap": 30.0, "z_loss": 1e-4}],
                         ids=["plain", "softcap_z_loss"])
def test_bf16_large_vocabulary_on_gpu(extras):
    """A language model's shape in bf16 on a GPU: 512 tokens, a 32k vocabulary, 4 chunks;
    also with Gemma-2's cap and a z-loss (the GEMM's bf16 epilogue, the kernels' terms)."""
    N, H, V = 512, 256, 32768
    x = random_tensor((N, H), torch.bfloat16, DEVICE)
    w = random_tensor((V, H), torch.bfloat16, DEVICE, scale=0.1)
    _check("triton", torch.bfloat16, x, w, None, _targets(N, V, -100), chunk_rows=128,
           **extras)


@backends
def test_kept_launches_follow_the_call_signature(backend):
    """The launches kept per call signature (pydl/_linear_ce_ops.py _Steps) are not reused across
    layouts, chunk lengths or TF32 switches: a contiguous then a transposed weight of the same
    shape, three chunk sizes, each against the reference; the TF32 switch keys them apart."""
    N, H, V = 10, 8, 13
    x = random_tensor((N, H), torch.float32, DEVICE)
    w = random_tensor((V, H), torch.float32, DEVICE)
    t = _targets(N, V, -100)
    for weight in (w, w.t().contiguous().t()):
        for chunk in (3, 4, 10):
            _check(backend, torch.float32, x, weight, None, t, chunk_rows=chunk,
                   label_smoothing=0.1)
    # the eager call's plan (pydl/linear_ce.py) and the kernel op's steps, by the switch
    _linear_ce_ops._STEPS.clear()
    linear_ce._CALLS.clear()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        for tf32 in (False, True):
            torch.backends.cuda.matmul.allow_tf32 = tf32
            pydl.linear_cross_entropy(x, w, t, backend=backend)
            _linear_ce_ops._linear_cross_entropy_fwd(x, w, None, t, None, -100, "mean", 0.0,
                                                     0.0, 0.0, False, False, False, False, N,
                                                     backend)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert len(_linear_ce_ops._STEPS.entries) == 2
    assert len(linear_ce._CALLS.entries) == 2


@backends
@pytest.mark.parametrize("tied", [False, True], ids=["head", "tied_embedding"])
def test_training_follows_the_composite(backend, tied):
    """Convergence: a tiny language model (embedding, a tanh layer, the head; its weight tied
    to the embedding or its own) trained a few Adam steps with pydl's fused loss follows,
    step for step, the same model trained with torch's linear + cross_entropy from the same
    initialisation, and its loss goes down."""
    V, H, B, T, steps = 40, 16, 3, 9, 6

    def model():
        torch.manual_seed(0)
        emb = torch.nn.Embedding(V, H).to(DEVICE)
        body = torch.nn.Linear(H, H).to(DEVICE)
        head = emb.weight if tied else torch.nn.Parameter(torch.randn(V, H, device=DEVICE) * 0.3)
        params = [*emb.parameters(), *body.parameters()] + ([] if tied else [head])
        return emb, body, head, torch.optim.Adam(params, lr=3e-2)

    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, V, (B, T + 1), generator=gen).to(DEVICE)
    tokens[0, -3:] = 7                                         # a few ignored targets below
    targets = tokens[:, 1:].masked_fill(tokens[:, 1:] == 7, -100)
    curves = []
    for fused in (True, False):
        emb, body, head, opt = model()
        losses = []
        for _ in range(steps):
            h = torch.tanh(body(emb(tokens[:, :-1])))
            if fused:
                loss = pydl.linear_cross_entropy(h, head, targets, label_smoothing=0.05,
                                                 chunk_rows=10, backend=backend)
            else:
                loss = F.cross_entropy(F.linear(h, head).flatten(0, 1), targets.flatten(),
                                       label_smoothing=0.05)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        curves.append(losses)
    torch.testing.assert_close(torch.tensor(curves[0]), torch.tensor(curves[1]),
                               rtol=1e-4, atol=1e-5)
    assert curves[0][-1] < 0.8 * curves[0][0]
