"""softmax, log_softmax and cross_entropy: Triton and Numba kernels against the float64
reference and against torch, forward and backward, every option of the signature."""
import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_CUDA, KERNEL_BACKENDS, spy_kernels
from hypothesis import given, settings
from hypothesis import strategies as st

import pydl
from pydl import _softmax_ce_ops, _softmax_ce_triton
from pydl import reference as ref
from pydl.reference.softmax_ce import cross_entropy_target_backward
from pydl.testing import assert_close, random_tensor, run_with_grad, to_numpy64

backends = pytest.mark.parametrize("backend", KERNEL_BACKENDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)


def _check_softmax(x, dim, log, backend, dtype, scale=None):
    op = pydl.log_softmax if log else pydl.softmax
    out, g, (dx,) = run_with_grad(lambda t: op(t, dim, backend=backend), [x])
    t_out, _, (t_dx,) = run_with_grad(
        lambda t: (torch.log_softmax if log else torch.softmax)(t, dim), [x], g)
    n = x.shape[dim] if x.dim() else 1
    x64, g64 = x.double().cpu().numpy(), g.double().cpu().numpy()
    y64 = (ref.log_softmax if log else ref.softmax)(x64, dim)
    dx64 = (ref.log_softmax_backward if log else ref.softmax_backward)(g64, y64, dim)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_close(out, y64, dtype, reduction=n, name="forward vs reference", scale=scale)
    assert_close(out, t_out, dtype, reduction=n, name="forward vs torch", scale=scale)
    assert_close(dx, dx64, dtype, reduction=n, name="grad vs reference", scale=scale)
    assert_close(dx, t_dx, dtype, reduction=n, name="grad vs torch", scale=scale)


# --- the lecture's worked example -----------------------------------------------------------

def test_reference_softmax_lecture_fixture():
    np.testing.assert_allclose(ref.softmax([1.2, 0.9, 0.4]), [0.456590, 0.338250, 0.205159],
                               atol=1e-6)
    # rounded as the deck does
    np.testing.assert_allclose(np.round(ref.softmax([1.2, 0.9, 0.4]), 4), [0.4566, 0.3383, 0.2052])
    # shift invariance: softmax(z) = softmax(z - max z), also where exp would overflow
    np.testing.assert_allclose(ref.softmax([1001.2, 1000.9, 1000.4]), ref.softmax([1.2, 0.9, 0.4]))


def test_reference_mse_vs_ce_lecture_fixture():
    target = np.array([0.0, 0.0, 1.0])
    assert np.isclose(((np.array([0.8, 0.0, 0.2]) - target) ** 2).sum(), 1.28)
    assert np.isclose(((np.array([0.4, 0.4, 0.2]) - target) ** 2).sum(), 0.96)
    # both predictions put 0.2 on the true class, so their cross-entropy is the same: -log 0.2
    logits = np.log(np.array([[0.8, 1e-12, 0.2], [0.4, 0.4, 0.2]]))
    np.testing.assert_allclose(ref.cross_entropy(logits, [2, 2], reduction="none"),
                               [-np.log(0.2)] * 2)


@backends
def test_softmax_lecture_fixture(backend):
    x = torch.tensor([[1.2, 0.9, 0.4]], device=DEVICE)
    y = pydl.softmax(x, -1, backend=backend)
    assert_close(y, [[0.456590, 0.338250, 0.205159]], torch.float32, scale=2)


# --- softmax / log_softmax ------------------------------------------------------------------

@backends
@dtypes
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
@pytest.mark.parametrize("shape,dim", [((1, 1), -1), ((3, 7), 1), ((5, 37), -1), ((2, 3, 5), 0),
                                       ((2, 3, 5), 1), ((2, 3, 5), 2), ((9,), 0), ((4, 130), 1)])
def test_softmax(backend, dtype, log, shape, dim):
    x = random_tensor(shape, dtype, DEVICE, scale=3.0)
    _check_softmax(x, dim, log, backend, dtype)


@backends
@pytest.mark.parametrize("log", [False, True], ids=["softmax", "log_softmax"])
def test_softmax_multi_block_rows(backend, log, monkeypatch):
    """Rows wider than one block go through the online max/sum path."""
    monkeypatch.setattr(_softmax_ce_triton, "MAX_BLOCK_N", 16)
    x = random_tensor((3, 101), torch.float32, DEVICE, scale=4.0)
    x[1, 60] = 30.0  # the max arrives late: the running sum must be rescaled
    _check_softmax(x, -1, log, backend, torch.float32)


@backends
def test_softmax_non_contiguous(backend):
    x = random_tensor((37, 6), torch.float32, DEVICE).t()          # strided rows
    _check_softmax(x, 1, False, backend, torch.float32)
    # sliced, not viewable as rows
    y = random_tensor((4, 10, 8), torch.float32, DEVICE)[:, ::2, 1:7]
    _check_softmax(y, 1, True, backend, torch.float32)
    z = random_tensor((2, 3, 4, 5), torch.float32, DEVICE).to(memory_format=torch.channels_last)
    _check_softmax(z, 1, False, backend, torch.float32)


@backends
def test_softmax_extreme_and_special_values(backend):
    x = torch.tensor([[1e4, -1e4, 0.0, 5e3], [-1e4, -1e4, -1e4, -1e4],
                      [0.0, float("-inf"), 1.0, 2.0], [float("nan"), 1.0, 2.0, 3.0]], device=DEVICE)
    for op, top in ((pydl.softmax, torch.softmax), (pydl.log_softmax, torch.log_softmax)):
        assert_close(op(x, 1, backend=backend), top(x, 1), torch.float32, name=op.__name__)


@backends
def test_softmax_dtype_argument_and_module(backend):
    x = random_tensor((3, 11), torch.float16, DEVICE)
    y = pydl.softmax(x, 1, dtype=torch.float32, backend=backend)
    assert y.dtype == torch.float32
    assert_close(y, torch.softmax(x.float(), 1), torch.float32)
    m = pydl.nn.LogSoftmax(dim=1, backend=backend)
    assert_close(m(x.float()), torch.nn.LogSoftmax(dim=1)(x.float()), torch.float32)


@backends
@settings(max_examples=15, deadline=None)
@given(rows=st.integers(1, 6), n=st.integers(1, 70), log=st.booleans())
def test_softmax_fuzz(backend, rows, n, log):
    x = random_tensor((rows, n), torch.float32, DEVICE, scale=5.0)
    _check_softmax(x, -1, log, backend, torch.float32)


# --- cross-entropy --------------------------------------------------------------------------

def _check_cross_entropy(x, target, backend, dtype, weight=None, scale=None, **kw):
    fn = lambda t: pydl.cross_entropy(t, target, weight, backend=backend, **kw)  # noqa: E731
    out, g, (dx,) = run_with_grad(fn, [x])
    t_out, _, (t_dx,) = run_with_grad(
        lambda t: torch.nn.functional.cross_entropy(t, target, weight, **kw), [x], g)
    C = x.shape[0 if x.dim() == 1 else 1]
    w64 = None if weight is None else weight.double().cpu().numpy()
    args = (x.double().cpu().numpy(), target.cpu().numpy(), w64)
    loss64 = ref.cross_entropy(*args, **kw)
    dx64 = ref.cross_entropy_backward(g.double().cpu().numpy(), *args, **kw)
    assert out.dtype == x.dtype and out.shape == t_out.shape
    red = C * (x.numel() // C if kw.get("reduction", "mean") != "none" else 1)
    assert_close(out, loss64, dtype, reduction=red, name="loss vs reference", scale=scale)
    assert_close(out, t_out, dtype, reduction=red, name="loss vs torch", scale=scale)
    assert_close(dx, dx64, dtype, reduction=C, name="grad vs reference", scale=scale)
    assert_close(dx, t_dx, dtype, reduction=C, name="grad vs torch", scale=scale)


def _targets(shape, C, ignore_index=None, frac=0.3):
    t = torch.randint(0, C, shape)
    if ignore_index is not None:
        t[torch.rand(shape) < frac] = ignore_index
    return t.to(DEVICE)


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_cross_entropy_options(backend, reduction, weighted, smoothing, ignore_index):
    N, C = 7, 11
    x = random_tensor((N, C), torch.float32, DEVICE, scale=2.0)
    t = _targets((N,), C, ignore_index)
    w = torch.rand(C, device=DEVICE) + 0.5 if weighted else None
    _check_cross_entropy(x, t, backend, torch.float32, w, reduction=reduction,
                         label_smoothing=smoothing, ignore_index=ignore_index)


def _check_option_loss(x, t, w, g, kw, options, loss, grads, t_loss, t_dx):
    """A loss with pydl's options (z_loss, softcap) and its gradients (the forward's and a
    retained graph's second) against the float64 reference and torch's composite (t_loss,
    t_dx), upstream gradient g."""
    C = x.shape[0 if x.dim() == 1 else 1]
    args = (x.detach().double().cpu().numpy(), t.cpu().numpy(),
            None if w is None else w.double().cpu().numpy())
    loss64 = ref.cross_entropy(*args, **kw, **options)
    dx64 = ref.cross_entropy_backward(g.double().cpu().numpy(), *args, **kw, **options)
    red = C * (x.numel() // C if kw["reduction"] != "none" else 1)
    assert_close(loss, loss64, torch.float32, reduction=red, name="loss vs reference")
    assert_close(loss, t_loss, torch.float32, reduction=red, name="loss vs torch")
    for name, dx in zip(("first", "second"), grads):
        assert_close(dx, dx64, torch.float32, reduction=C, name=f"{name} grad vs reference")
        assert_close(dx, t_dx, torch.float32, reduction=C, name=f"{name} grad vs torch")


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(7, 11), (3, 11, 4), (11,)], ids=str)
def test_cross_entropy_z_loss(backend, reduction, shape):
    """z_loss (pydl's option): z lse^2 added to each row that counts, in the forward kernels,
    and g 2 z lse p_c in the gradient (Triton's written by the training forward, then again
    by the backward kernel through a retained graph), with smoothing and an ignore_index:
    against the float64 reference and torch's composite."""
    z, C = 0.1, 11
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    x = random_tensor(shape, torch.float32, DEVICE, scale=2.0).requires_grad_()
    t = _targets(tshape, C, 3)
    kw = dict(reduction=reduction, label_smoothing=0.1, ignore_index=3)
    loss = pydl.cross_entropy(x, t, z_loss=z, backend=backend, **kw)
    g = torch.randn(loss.shape, device=DEVICE)
    first = torch.autograd.grad(loss, x, g, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x, g)[0]
    xd = x.detach().requires_grad_()
    t_loss = torch.nn.functional.cross_entropy(xd, t, **kw)
    counted = t != 3
    rows = z * torch.logsumexp(xd, 0 if len(shape) == 1 else 1).square() * counted
    t_loss = t_loss + (rows if reduction == "none" else rows.sum() / (
        counted.sum().clamp_min(1) if reduction == "mean" else 1))
    t_dx = torch.autograd.grad(t_loss, xd, g)[0]
    _check_option_loss(x, t, None, g, kw, dict(z_loss=z), loss, (first, second), t_loss, t_dx)
    torch.testing.assert_close(pydl.cross_entropy(x, t, z_loss=z, backend="torch", **kw),
                               t_loss)


@backends
def test_cross_entropy_z_loss_refusals(backend):
    """A z-loss with class weights, with class-probability targets, negative or not a
    number: ValueError; differentiating its gradient (create_graph) raises, pydl's rule for
    an op without double backward (the gradient itself comes)."""
    x = random_tensor((4, 5), torch.float32, DEVICE).requires_grad_()
    t = _targets((4,), 5)
    with pytest.raises(ValueError, match="z_loss with weight"):
        pydl.cross_entropy(x, t, torch.ones(5, device=DEVICE), z_loss=1e-4, backend=backend)
    with pytest.raises(ValueError, match="class-probability"):
        pydl.cross_entropy(x, torch.softmax(x.detach(), 1), z_loss=1e-4, backend=backend)
    pydl.cross_entropy(x, t, z_loss=0.0, backend=backend)      # a signature checked, kept:
    for z in (-1.0, float("nan"), float("inf"), "0.1", True, False):   # False is 0, not 0.0
        with pytest.raises(ValueError, match="z_loss"):
            pydl.cross_entropy(x, t, z_loss=z, backend=backend)
    loss = pydl.cross_entropy(x, t, z_loss=1e-2, backend=backend)
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    torch.testing.assert_close(dx, torch.autograd.grad(
        pydl.cross_entropy(x, t, z_loss=1e-2, backend=backend), x)[0])
    with pytest.raises(RuntimeError, match="no double backward"):
        dx.square().sum().backward()
    module = pydl.nn.CrossEntropyLoss(z_loss=1e-2, backend=backend)
    torch.testing.assert_close(module(x, t), loss)


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["weighted", "z_loss", "wide", "nd", "single"])
def test_cross_entropy_softcap(backend, reduction, case, monkeypatch):
    """softcap s (pydl's option): the loss of s tanh(x / s), the logits capped as the kernels
    read them (the statistics, the target's logit, the gradient's softmax) and the gradient
    w.r.t. the logits given, times 1 - tanh(x / s)^2: Triton's written by the training
    forward, then by the backward kernel through a retained graph. Large logits (the cap
    bites: near +-s, where the factor is small), a -inf logit (capped to -s, as torch's
    composite gives), an ignored row; rows wider than a block; against the float64
    reference and torch's composite."""
    s, C = 5.0, 11
    shape = {"nd": (3, C, 4), "single": (C,), "wide": (5, 101)}.get(case, (7, C))
    C = shape[0] if len(shape) == 1 else shape[1]
    if case == "wide":
        monkeypatch.setattr(_softmax_ce_triton, "MAX_BLOCK_N", 16)
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    x = random_tensor(shape, torch.float32, DEVICE, scale=8.0)
    x.view(-1)[2] = float("-inf")
    x = x.requires_grad_()
    t = _targets(tshape, C, 3) if tshape else torch.tensor(4, device=DEVICE)
    kw = dict(reduction=reduction, label_smoothing=0.1, ignore_index=3)
    if case == "weighted":
        kw["weight"] = torch.rand(C, device=DEVICE) + 0.5
    options = dict(softcap=s, z_loss=0.05 if case == "z_loss" else 0.0)
    loss = pydl.cross_entropy(x, t, backend=backend, **kw, **options)
    g = torch.randn(loss.shape, device=DEVICE)
    first = torch.autograd.grad(loss, x, g, retain_graph=True)[0]
    second = torch.autograd.grad(loss, x, g)[0]
    xd = x.detach().requires_grad_()
    t_loss = pydl.cross_entropy(xd, t, backend="torch", **kw, **options)
    torch.testing.assert_close(t_loss, torch.nn.functional.cross_entropy(
        s * torch.tanh(xd / s), t, **kw) if case != "z_loss" else t_loss)
    t_dx = torch.autograd.grad(t_loss, xd, g)[0]
    w = kw.pop("weight", None)
    _check_option_loss(x, t, w, g, kw, options, loss, (first, second), t_loss, t_dx)
    # the cap changes the answer: without it the loss is another one
    assert not torch.allclose(loss, pydl.cross_entropy(x, t, backend=backend, weight=w, **kw,
                                                       z_loss=options["z_loss"]))


@pytest.mark.parametrize("backend,dtype", [
    ("numba", torch.float16), ("numba", torch.bfloat16), ("triton", torch.float16)]
    + ([("triton", torch.bfloat16)] if HAS_CUDA else []), ids=str)
def test_cross_entropy_softcap_16bit(backend, dtype):
    """16-bit logits capped in fp32 as read (torch's composite rounds x / s, the tanh and the
    product to 16 bits each): the loss and the gradient against the float64 reference at
    the dtype's tolerance, rows wider than a Numba block, logits well past the cap."""
    x = random_tensor((16, 300), dtype, DEVICE, scale=20.0).requires_grad_()
    t = _targets((16,), 300, 3)
    loss = pydl.cross_entropy(x, t, ignore_index=3, softcap=30.0, backend=backend)
    loss.backward()
    args = (x.detach().double().cpu().numpy(), t.cpu().numpy())
    assert_close(loss, ref.cross_entropy(*args, ignore_index=3, softcap=30.0), dtype,
                 reduction=300 * 16, name="loss vs reference")
    assert_close(x.grad, ref.cross_entropy_backward(1.0, *args, ignore_index=3, softcap=30.0),
                 dtype, reduction=300, name="grad vs reference")


@backends
def test_cross_entropy_softcap_refusals(backend):
    """A softcap that is not a positive finite number, or with class-probability targets:
    ValueError; differentiating its gradient (create_graph) raises (the gradient itself
    comes); nn.CrossEntropyLoss(softcap=) is the function's."""
    x = random_tensor((4, 5), torch.float32, DEVICE, scale=6.0).requires_grad_()
    t = _targets((4,), 5)
    with pytest.raises(ValueError, match="class-probability"):
        pydl.cross_entropy(x, torch.softmax(x.detach(), 1), softcap=3.0, backend=backend)
    pydl.cross_entropy(x, t, softcap=1.0, backend=backend)     # a signature checked, kept:
    for cap in (0.0, -1.0, float("nan"), float("inf"), "3", True):  # True is 1, not 1.0
        with pytest.raises(ValueError, match="softcap"):
            pydl.cross_entropy(x, t, softcap=cap, backend=backend)
    loss = pydl.cross_entropy(x, t, softcap=3.0, backend=backend)
    (dx,) = torch.autograd.grad(loss, x, create_graph=True)
    torch.testing.assert_close(dx, torch.autograd.grad(
        pydl.cross_entropy(x, t, softcap=3.0, backend="torch"), x)[0])
    with pytest.raises(RuntimeError, match="no double backward"):
        dx.square().sum().backward()
    module = pydl.nn.CrossEntropyLoss(softcap=3.0, backend=backend)
    torch.testing.assert_close(module(x, t), loss)


@pytest.mark.parametrize("backend,dtype", [
    ("numba", torch.float16), ("numba", torch.bfloat16), ("triton", torch.float16)]
    + ([("triton", torch.bfloat16)] if HAS_CUDA else []), ids=str)
@pytest.mark.parametrize("targets", ["indices", "probabilities"])
def test_cross_entropy_16bit_class_weights(backend, dtype, targets):
    """Class weights in the logits' 16-bit dtype (as torch requires them), read by the kernels
    as they are (Numba: bf16 as bit patterns), with label smoothing: loss and gradients against
    torch and the float64 reference."""
    N, C = 6, 13
    x = random_tensor((N, C), dtype, DEVICE, scale=2.0)
    w = (torch.rand(C, device=DEVICE) + 0.5).to(dtype)
    if targets == "indices":
        for reduction in ("none", "mean"):
            _check_cross_entropy(x, _targets((N,), C, -100), backend, dtype, w,
                                 reduction=reduction, label_smoothing=0.1)
    else:
        y = torch.softmax(torch.randn(N, C, device=DEVICE), 1).to(dtype)
        _check_cross_entropy_probs(x, y, backend, dtype, w, label_smoothing=0.1)


@backends
@dtypes
@pytest.mark.parametrize("shape", [(1, 1), (5, 37), (3, 130), (2, 5, 3, 4), (6,)])
def test_cross_entropy_shapes_dtypes(backend, dtype, shape):
    C = shape[0] if len(shape) == 1 else shape[1]
    tshape = () if len(shape) == 1 else (shape[0],) + shape[2:]
    x = random_tensor(shape, dtype, DEVICE, scale=2.0)
    _check_cross_entropy(x, _targets(tshape, C, -100), backend, dtype, label_smoothing=0.05)


@backends
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_multi_block(backend, reduction, monkeypatch):
    monkeypatch.setattr(_softmax_ce_triton, "MAX_BLOCK_N", 16)
    x = random_tensor((4, 75), torch.float32, DEVICE, scale=3.0)
    x[2, 70] = 25.0
    w = torch.rand(75, device=DEVICE) + 0.5
    _check_cross_entropy(x, _targets((4,), 75), backend, torch.float32, w, reduction=reduction,
                         label_smoothing=0.2)


@pytest.mark.parametrize("backend", ["triton", pytest.param("numba", marks=pytest.mark.sim_heavy)])
def test_cross_entropy_wide_vocabulary(backend):
    """A 4 x 50,000 row set: wider than any block, handled by the online reduction. (The
    simulator runs each CUDA thread's loop in Python: Numba's online path is covered there by
    test_cross_entropy_multi_block, this case with --full or on a GPU.)"""
    x = random_tensor((4, 50_000), torch.float32, DEVICE, scale=2.0)
    t = _targets((4,), 50_000)
    _check_cross_entropy(x, t, backend, torch.float32, label_smoothing=0.1)


@backends
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_extreme_logits(backend, smoothing):
    x = (torch.randint(0, 3, (6, 9)).float() - 1.0) * 1e4   # values in {-1e4, 0, 1e4}
    x[5] = 1e4 + torch.randn(9)                              # all huge: smoothing must not cancel
    x = x.to(DEVICE)
    t = _targets((6,), 9)
    _check_cross_entropy(x, t, backend, torch.float32, reduction="none", label_smoothing=smoothing,
                         scale=1e4)


@backends
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cross_entropy_per_row_upstream_gradient_layouts(backend, dtype):
    """reduction="none" with upstream gradients of other layouts than the loss: a strided
    view, a broadcast (stride 0, as sum() sends back) and a transposed 2-D one; each row
    must get its own element (torch's gradient in float64 as the reference)."""
    x = random_tensor((4, 6, 5), dtype, DEVICE)           # (N, C, d): 20 rows
    t = _targets((4, 5), 6)
    x64 = x.detach().double().requires_grad_()
    loss64 = torch.nn.functional.cross_entropy(x64, t, reduction="none")
    for g in (torch.randn(4, 10, device=DEVICE, dtype=dtype)[:, ::2],
              torch.randn((), device=DEVICE, dtype=dtype).expand(4, 5),
              torch.randn(5, 4, device=DEVICE, dtype=dtype).t()):
        xg = x.detach().requires_grad_()
        pydl.cross_entropy(xg, t, reduction="none", backend=backend).backward(g)
        want, = torch.autograd.grad(loss64, x64, g.double(), retain_graph=True)
        assert_close(xg.grad, want, dtype)


@backends
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_probabilities_mixed_dtypes_and_gradient_layouts(backend, reduction):
    """Class probabilities of another dtype than the logits (fp16 logits, fp32 targets: the
    loss is fp32, as torch promotes), the loss written in that dtype by the kernel; for
    "none", upstream gradients of other layouts than the loss (strided, broadcast,
    transposed), each row getting its own; both gradients against torch in float64."""
    x = random_tensor((4, 6, 5), torch.float16, DEVICE)
    y = torch.softmax(torch.randn(4, 6, 5, device=DEVICE), 1)
    x64 = x.detach().double().requires_grad_()
    y64 = y.double().requires_grad_()
    loss64 = torch.nn.functional.cross_entropy(x64, y64, reduction=reduction,
                                               label_smoothing=0.1)
    loss = pydl.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == loss64.shape
    assert_close(loss, loss64, torch.float16, reduction=6)
    grads = [torch.randn(4, 10, device=DEVICE)[:, ::2],
             torch.randn((), device=DEVICE).expand(4, 5),
             torch.randn(5, 4, device=DEVICE).t()] if reduction == "none" else \
        [torch.randn((), device=DEVICE)]
    for g in grads:
        xg, yg = x.detach().requires_grad_(), y.detach().requires_grad_()
        pydl.cross_entropy(xg, yg, reduction=reduction, label_smoothing=0.1,
                           backend=backend).backward(g)
        want_x, want_y = torch.autograd.grad(loss64, (x64, y64), g.double(), retain_graph=True)
        assert_close(xg.grad, want_x, torch.float16)
        assert_close(yg.grad, want_y, torch.float32, reduction=6)


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored(backend, reduction):
    x = random_tensor((3, 5), torch.float32, DEVICE)
    t = torch.full((3,), -100, dtype=torch.long, device=DEVICE)
    _check_cross_entropy(x, t, backend, torch.float32, reduction=reduction)


@backends
@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_cross_entropy_mean_over_zero_weight(backend, smoothing):
    """Every target counted has class weight 0: the mean's denominator is 0, and torch's
    loss is NaN with label smoothing too (its NLL part is 0 / 0 on its own, where the
    smoothing part alone would be inf)."""
    x = random_tensor((4, 5), torch.float32, DEVICE)
    t = torch.tensor([2, 2, -100, 2], device=DEVICE)
    w = torch.tensor([0.5, 0.7, 0.0, 0.9, 0.3], device=DEVICE)
    _check_cross_entropy(x, t, backend, torch.float32, w, label_smoothing=smoothing)


@backends
def test_cross_entropy_non_contiguous(backend):
    x = random_tensor((13, 6), torch.float32, DEVICE).t()           # (6, 13), column-major
    _check_cross_entropy(x, _targets((6,), 13, -100), backend, torch.float32, label_smoothing=0.1)
    y = random_tensor((2, 4, 3, 5), torch.float32, DEVICE).to(memory_format=torch.channels_last)
    _check_cross_entropy(y, _targets((2, 3, 5), 4, -100), backend, torch.float32)


@backends
@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 6), C=st.integers(1, 60), smoothing=st.sampled_from([0.0, 0.1]),
       reduction=st.sampled_from(["mean", "sum", "none"]), weighted=st.booleans())
def test_cross_entropy_fuzz(backend, N, C, smoothing, reduction, weighted):
    x = random_tensor((N, C), torch.float32, DEVICE, scale=3.0)
    w = torch.rand(C, device=DEVICE) + 0.1 if weighted else None
    _check_cross_entropy(x, _targets((N,), C, -100, 0.2), backend, torch.float32, w,
                         reduction=reduction, label_smoothing=smoothing)


@backends
def test_cross_entropy_loss_module_is_drop_in(backend):
    w = torch.rand(8, device=DEVICE) + 0.5
    ours = pydl.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1, backend=backend)
    theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, label_smoothing=0.1)
    assert isinstance(ours, torch.nn.CrossEntropyLoss)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x, t = random_tensor((5, 8), torch.float32, DEVICE), _targets((5,), 8, 1)
    assert_close(ours(x, t), theirs(x, t), torch.float32, reduction=40)
    # uint8 class indices, as torch takes them (its label smoothing's gather does not)
    t8 = t.to(torch.uint8)
    assert_close(pydl.cross_entropy(x, t8, w, ignore_index=1, backend=backend),
                 torch.nn.functional.cross_entropy(x, t8, w, ignore_index=1), torch.float32,
                 reduction=40)
    # the deprecated size_average / reduce: torch's reduction, and its warning
    for legacy in (dict(size_average=False), dict(reduce=False), dict(size_average=True,
                                                                      reduce=True)):
        with pytest.warns(UserWarning, match="deprecated"):
            ours = pydl.nn.CrossEntropyLoss(weight=w, ignore_index=1, backend=backend, **legacy)
        with pytest.warns(UserWarning, match="deprecated"):
            theirs = torch.nn.CrossEntropyLoss(weight=w, ignore_index=1, **legacy)
        assert ours.reduction == theirs.reduction
        assert_close(ours(x, t), theirs(x, t), torch.float32, reduction=40)
        with pytest.warns(UserWarning, match="deprecated"):
            functional = pydl.cross_entropy(x, t, w, ignore_index=1, backend=backend, **legacy)
        assert_close(functional, theirs(x, t), torch.float32, reduction=40)


# --- cross-entropy: the gradient written by the forward (triton) ------------------------------

def _spy_launches(monkeypatch):
    """The Triton cross-entropy kernels launched, with their constexprs, in order."""
    from pydl.kernels.triton import softmax_ce as k
    seen = []
    spy_kernels(monkeypatch, k, ("cross_entropy_fwd", "cross_entropy_bwd",
                                 "cross_entropy_scale_grad", "cross_entropy_mean_denominator",
                                 "cross_entropy_prob_fwd", "cross_entropy_prob_bwd",
                                 "cross_entropy_prob_weight_grad"),
                lambda name, args, kwargs: seen.append(
                    (name, {a: v for a, v in kwargs.items() if a.isupper()})))
    return seen


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("case", ["plain", "weighted_smoothed_multi_block"])
def test_cross_entropy_gradient_from_forward(monkeypatch, reduction, upstream, case):
    """Training a summed or averaged loss: the forward writes the gradient (GRAD) into its own
    buffer and the backward only scales it by the upstream gradient, on the device; the
    logits are left as they were; the gradient matches the reference for an upstream
    gradient of 1 (nothing to scale) and of 2.5; the mean's denominator comes from its own
    kernel first; every arrival counter is back at zero."""
    from pydl import _launch
    seen = _spy_launches(monkeypatch)
    N, C = 9, 37
    kw = dict(reduction=reduction, ignore_index=2)
    w = None
    if case != "plain":
        monkeypatch.setattr(_softmax_ce_triton, "MAX_BLOCK_N", 16)
        w = torch.rand(C, device=DEVICE) + 0.5
        kw["label_smoothing"] = 0.2
    x = random_tensor((N, C), torch.float32, DEVICE, scale=3.0)
    x[4, 30] = 30.0                                          # the max arrives late in its row
    t = _targets((N,), C, 2)
    xg = x.clone().requires_grad_()
    loss = pydl.cross_entropy(xg, t, w, backend="triton", **kw)
    loss.backward(torch.tensor(upstream, device=DEVICE))
    assert torch.equal(xg.detach(), x)                      # the caller's logits untouched
    w64 = None if w is None else w.double().cpu().numpy()
    args = (x.double().cpu().numpy(), t.cpu().numpy(), w64)
    assert_close(loss, ref.cross_entropy(*args, **kw), torch.float32, reduction=N * C)
    assert_close(xg.grad, ref.cross_entropy_backward(upstream, *args, **kw), torch.float32,
                 reduction=C)
    names = [n for n, _ in seen]
    want = ["cross_entropy_fwd", "cross_entropy_scale_grad"]
    if reduction == "mean":
        want.insert(0, "cross_entropy_mean_denominator")
    assert names == want
    assert seen[names.index("cross_entropy_fwd")][1]["GRAD"] is True
    assert all(not c.any() for c in _launch._ARRIVALS.values())


def test_cross_entropy_second_backward_recomputes(monkeypatch):
    """A retained graph's second backward does not scale the buffer it already handed out:
    it recomputes the gradient from the saved logits, and the first gradient stays as it
    was."""
    seen = _spy_launches(monkeypatch)
    x = random_tensor((5, 11), torch.float32, DEVICE, scale=2.0).requires_grad_()
    t = _targets((5,), 11)
    loss = pydl.cross_entropy(x, t, backend="triton")
    (first,) = torch.autograd.grad(loss, x, torch.tensor(3.0), retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.5))
    assert torch.equal(first, kept)
    assert_close(second, kept / 6.0, torch.float32, reduction=11)
    assert [n for n, _ in seen][-2:] == ["cross_entropy_scale_grad", "cross_entropy_bwd"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [1.0, 2.5])
@pytest.mark.parametrize("case", ["plain", "weighted_smoothed_multi_block", "nd"])
def test_cross_entropy_probabilities_gradient_from_forward(monkeypatch, reduction, upstream,
                                                           case):
    """Class-probability targets in training: one forward launch writes the loss (its last
    program reduces the programs' partial sums) and the gradient, the backward only scales
    it; against float64 torch, for an upstream gradient of 1 and of 2.5, a row in one column
    block and over several, (N, C, d) logits; every arrival counter back at zero."""
    from pydl import _launch
    seen = _spy_launches(monkeypatch)
    N, C = 9, 37
    shape = (N, C, 3) if case == "nd" else (N, C)
    kw = dict(reduction=reduction)
    w = None
    if case == "weighted_smoothed_multi_block":
        monkeypatch.setattr(_softmax_ce_triton, "MAX_BLOCK_N", 16)
        w = torch.rand(C, device=DEVICE) + 0.5
        kw["label_smoothing"] = 0.2
    x = random_tensor(shape, torch.float32, DEVICE, scale=3.0)
    y = torch.softmax(random_tensor(shape, torch.float32, DEVICE, scale=2.0), 1)
    xg = x.clone().requires_grad_()
    loss = pydl.cross_entropy(xg, y, w, backend="triton", **kw)
    loss.backward(torch.tensor(upstream, device=DEVICE))
    assert torch.equal(xg.detach(), x)
    x64 = x.double().requires_grad_()
    want = torch.nn.functional.cross_entropy(x64, y.double(), None if w is None else w.double(),
                                             **kw)
    want.backward(torch.tensor(upstream, dtype=torch.float64, device=DEVICE))
    rows = N * (3 if case == "nd" else 1)
    assert_close(loss, want, torch.float32, reduction=rows * C)
    assert_close(xg.grad, x64.grad, torch.float32, reduction=C)
    names = [n for n, _ in seen]
    assert names == ["cross_entropy_prob_fwd", "cross_entropy_scale_grad"]
    assert seen[0][1]["GRAD"] is True and seen[0][1]["REDUCE"] is True
    assert all(not c.any() for c in _launch._ARRIVALS.values())


def test_cross_entropy_probabilities_target_gradient_and_second_backward(monkeypatch):
    """A target that needs a gradient (a learned label distribution): no gradient in the
    forward, the backward kernel writes both. A retained graph's second backward after a
    gradient from the forward recomputes, leaving the first as it was."""
    seen = _spy_launches(monkeypatch)
    x = random_tensor((5, 11), torch.float32, DEVICE, scale=2.0).requires_grad_()
    y = torch.softmax(random_tensor((5, 11), torch.float32, DEVICE), 1).requires_grad_()
    loss = pydl.cross_entropy(x, y, backend="triton")
    dx, dy = torch.autograd.grad(loss, (x, y))
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(x64, y64), (x64, y64))
    assert_close(dx, want[0], torch.float32, reduction=11)
    assert_close(dy, want[1], torch.float32, reduction=11)
    assert seen[0][1]["GRAD"] is False and [n for n, _ in seen] == [
        "cross_entropy_prob_fwd", "cross_entropy_prob_bwd"]
    seen.clear()
    loss = pydl.cross_entropy(x, y.detach(), backend="triton")
    (first,) = torch.autograd.grad(loss, x, torch.tensor(3.0), retain_graph=True)
    kept = first.clone()
    (second,) = torch.autograd.grad(loss, x, torch.tensor(0.5))
    assert torch.equal(first, kept)
    assert_close(second, kept / 6.0, torch.float32, reduction=11)
    assert [n for n, _ in seen] == ["cross_entropy_prob_fwd", "cross_entropy_scale_grad",
                                    "cross_entropy_prob_bwd"]


@pytest.mark.parametrize("case", ["no_grad", "detached", "none_reduction"])
def test_cross_entropy_no_gradient_in_forward(monkeypatch, case):
    """The forward writes no gradient when none will be asked for (no grad mode, logits that
    do not require one) or when the loss is not reduced (the backward scales each row)."""
    seen = _spy_launches(monkeypatch)
    x = random_tensor((6, 10), torch.float32, DEVICE).requires_grad_(case != "detached")
    t = _targets((6,), 10, -100)
    red = "none" if case == "none_reduction" else "mean"
    if case == "no_grad":
        with torch.no_grad():
            loss = pydl.cross_entropy(x, t, reduction=red, backend="triton")
    else:
        loss = pydl.cross_entropy(x, t, reduction=red, backend="triton")
    assert_close(loss, torch.nn.functional.cross_entropy(x.detach(), t, reduction=red),
                 torch.float32, reduction=60)
    assert [c["GRAD"] for n, c in seen if n == "cross_entropy_fwd"] == [False]
    assert "cross_entropy_mean_denominator" not in [n for n, _ in seen]


@pytest.mark.gpu
def test_cross_entropy_reduction_is_deterministic_on_gpu():
    """The loss finished by the last program to arrive, and the gradient from the forward,
    bitwise the same over repeated runs (programs finish in a different order each time)."""
    x = torch.randn(4096, 32768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 32768, (4096,), device="cuda")
    t[::7] = -100
    runs = []
    for _ in range(10):
        loss = pydl.cross_entropy(x, t)
        (g,) = torch.autograd.grad(loss, x)
        runs.append((loss.detach(), g))
    assert all(torch.equal(runs[0][0], v) and torch.equal(runs[0][1], g) for v, g in runs[1:])
    want = torch.nn.functional.cross_entropy(x.float(), t)
    assert_close(runs[0][0], want, torch.bfloat16, reduction=32768)


def test_cross_entropy_reduction_over_many_programs(monkeypatch):
    """The in-kernel sum and mean over more programs than one block of partial sums holds
    (one row a program, 70 rows, partials added 16 at a time), and a denominator over
    several programs."""
    monkeypatch.setattr(_softmax_ce_triton, "TILE_ELEMENTS", 4)
    monkeypatch.setattr(_softmax_ce_triton, "DENOMINATOR_BLOCK", 16)
    monkeypatch.setattr(_softmax_ce_triton, "PARTS_BLOCK", 16)
    x = random_tensor((70, 3), torch.float32, DEVICE, scale=2.0)
    t = _targets((70,), 3, -100, 0.1)
    for reduction in ("mean", "sum"):
        _check_cross_entropy(x, t, "triton", torch.float32, reduction=reduction)


# --- cross-entropy with class-probability targets ---------------------------------------------

def _check_cross_entropy_probs(x, y, backend, dtype, weight=None, scale=None, **kw):
    """Loss and the gradients w.r.t. logits, target and (where given) the class weights, as
    a learned weight has them, against torch and the reference."""
    leaves = [x, y] + ([] if weight is None else [weight])
    fn = lambda a, b, *w: pydl.cross_entropy(a, b, *w, backend=backend, **kw)  # noqa: E731
    out, g, (dx, dy, *dw) = run_with_grad(fn, leaves)
    t_out, _, (t_dx, t_dy, *t_dw) = run_with_grad(
        lambda a, b, *w: torch.nn.functional.cross_entropy(a, b, *w, **kw), leaves, g)
    C = x.shape[0 if x.dim() == 1 else 1]
    w64 = None if weight is None else weight.double().cpu().numpy()
    args = (x.double().cpu().numpy(), y.double().cpu().numpy(), w64)
    g64 = g.double().cpu().numpy()
    loss64 = ref.cross_entropy(*args, **kw)
    dx64 = ref.cross_entropy_backward(g64, *args, **kw)
    dy64 = cross_entropy_target_backward(g64, *args, **kw)
    assert out.dtype == t_out.dtype and out.shape == t_out.shape
    assert dx.dtype == x.dtype and dy.dtype == y.dtype
    red = C * (x.numel() // C if kw.get("reduction", "mean") != "none" else 1)
    checks = [("loss", out, loss64, red), ("loss", out, t_out, red),
              ("grad", dx, dx64, C), ("grad", dx, t_dx, C),
              ("target grad", dy, dy64, C), ("target grad", dy, t_dy, C)]
    if weight is not None:      # a sum over the rows of each class
        dw64 = ref.cross_entropy_weight_backward(g64, *args, **kw)
        assert dw[0].dtype == weight.dtype and dw[0].shape == weight.shape
        checks += [("weight grad", dw[0], dw64, x.numel() // C),
                   ("weight grad", dw[0], t_dw[0], x.numel() // C)]
    for name, ours, theirs, r in checks:
        kind = "reference" if isinstance(theirs, np.ndarray) else "torch"
        assert_close(ours, theirs, dtype, reduction=r, name=f"{name} vs {kind}", scale=scale)


def _probs(shape, dtype=torch.float32, normalised=True):
    """Class probabilities along dim 1 (dim 0 for a (C,) shape); rows need not sum to 1."""
    y = torch.rand(shape)
    if normalised:
        y = y / y.sum(0 if len(shape) == 1 else 1, keepdim=True)
    return y.to(DEVICE, dtype)


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted,smoothing", [(False, 0.0), (True, 0.15)],
                         ids=["plain", "weighted-smoothed"])
def test_cross_entropy_probs_options(backend, reduction, weighted, smoothing):
    N, C = 5, 7
    x = random_tensor((N, C), torch.float32, DEVICE, scale=2.0)
    w = torch.rand(C, device=DEVICE) + 0.5 if weighted else None
    # weighted rows do not sum to 1: the loss and gradients are linear in y all the same
    _check_cross_entropy_probs(x, _probs((N, C), normalised=not weighted), backend,
                               torch.float32, w, reduction=reduction, label_smoothing=smoothing)


@backends
@dtypes
@pytest.mark.parametrize("shape", [(6,), (2, 5, 3)])
def test_cross_entropy_probs_shapes_dtypes(backend, dtype, shape):
    x = random_tensor(shape, dtype, DEVICE, scale=2.0)
    _check_cross_entropy_probs(x, _probs(shape, dtype), backend, dtype, label_smoothing=0.05,
                               reduction="none" if len(shape) > 1 else "mean")


@backends
@pytest.mark.parametrize("case", ["spatial-none", "spatial-mean-smoothed", "1d-sum",
                                  "fp16-sum", "many-rows"])
def test_cross_entropy_probs_weight_gradient(backend, case, monkeypatch):
    """A class weight that requires grad (a learned weight) with probability targets: torch
    differentiates the loss w.r.t. it, dw_c = sum_r g_r y'_rc (lse_r - x_rc); so must pydl,
    on its kernels (each backend's weight-gradient kernel runs), beside the logits' and the
    target's gradients, for every reduction, label smoothing, (C,) and (N, C, d) logits, a
    half-precision weight, and more rows than a program's block."""
    dtype = torch.float16 if case == "fp16" else torch.float32
    shape = {"spatial": (3, 6, 2, 2), "1d": (7,), "fp16": (4, 5), "many": (70, 5)}[
        case.split("-")[0]]
    kw = dict(reduction=next((r for r in ("none", "mean", "sum") if r in case), "mean"),
              label_smoothing=0.2 if "smoothed" in case else 0.0)
    x = random_tensor(shape, dtype, DEVICE, scale=2.0)
    C = shape[0 if len(shape) == 1 else 1]
    w = (torch.rand(C, device=DEVICE) + 0.5).to(dtype)
    seen = _spy_launches(monkeypatch)
    _check_cross_entropy_probs(x, _probs(shape, dtype), backend, dtype, w, **kw)
    if backend == "triton":
        assert "cross_entropy_prob_weight_grad" in [n for n, _ in seen]
    # the weight alone requires grad: the graph is recorded for it, the logits' gradient
    # kernel does not run
    wl = w.clone().requires_grad_()
    y = _probs(shape, dtype)
    seen.clear()
    pydl.cross_entropy(x, y, wl, backend=backend, **kw).sum().backward()
    if backend == "triton":
        assert [n for n, _ in seen] == ["cross_entropy_prob_fwd", "cross_entropy_prob_weight_grad"]
    w64 = w.double().requires_grad_()
    torch.nn.functional.cross_entropy(x.double(), y.double(), w64, **kw).sum().backward()
    assert_close(wl.grad, w64.grad, dtype, reduction=x.numel() // C, name="weight grad alone")


def test_cross_entropy_probs_weight_gradient_of_gradient():
    """Under create_graph the weight's gradient is differentiable again (the double backward's
    pieces): d/dx of sum(dL/dw * v) against torch's."""
    x = random_tensor((4, 6), torch.float32, DEVICE, scale=2.0)
    y, v = _probs((4, 6)), random_tensor((6,), torch.float32, DEVICE)
    w = torch.rand(6, device=DEVICE) + 0.5
    grads = []
    for fn, dt in ((lambda *a: pydl.cross_entropy(*a, label_smoothing=0.1, backend="triton"),
                    torch.float32),
                   (lambda *a: torch.nn.functional.cross_entropy(*a, label_smoothing=0.1),
                    torch.float64)):
        xl, wl = x.to(dt).requires_grad_(), w.to(dt).requires_grad_()
        (dw,) = torch.autograd.grad(fn(xl, y.to(dt), wl), wl, create_graph=True)
        grads.append((dw.detach(), torch.autograd.grad((dw * v.to(dt)).sum(), xl)[0]))
    for ours, theirs, name in zip(grads[0], grads[1], ("weight grad", "its x grad")):
        assert_close(ours, theirs, torch.float32, reduction=24, name=name)


@backends
def test_cross_entropy_probs_multi_block(backend, monkeypatch):
    """Rows wider than a block (Triton) and than the threads of a block (Numba)."""
    monkeypatch.setattr(_softmax_ce_triton, "MAX_BLOCK_N", 16)
    x = random_tensor((3, 75), torch.float32, DEVICE, scale=3.0)
    x[1, 70] = 25.0  # the max arrives late: the running sums must be rescaled
    w = torch.rand(75, device=DEVICE) + 0.5
    _check_cross_entropy_probs(x, _probs((3, 75)), backend, torch.float32, w,
                               label_smoothing=0.2)


@backends
def test_cross_entropy_probs_extreme_layouts_and_dtypes(backend):
    # logits of 1e4: the loss is assembled without cancellation
    x = (torch.randint(0, 3, (4, 9)).float() - 1.0) * 1e4
    x[3] = 1e4 + torch.randn(9)
    _check_cross_entropy_probs(x.to(DEVICE), _probs((4, 9)), backend, torch.float32,
                               reduction="none", label_smoothing=0.3, scale=1e4)
    # channels-last logits with a contiguous target: each is read with its own strides
    x = random_tensor((2, 4, 3, 5), torch.float32, DEVICE).to(memory_format=torch.channels_last)
    _check_cross_entropy_probs(x, _probs((2, 4, 3, 5)), backend, torch.float32, reduction="sum")
    # fp16 logits, fp32 target: the loss takes the promoted dtype, as in torch
    x = random_tensor((3, 6), torch.float16, DEVICE)
    _check_cross_entropy_probs(x, _probs((3, 6)), backend, torch.float16)
    # a target that needs no gradient; no rows
    x, y = random_tensor((3, 6), torch.float32, DEVICE).requires_grad_(), _probs((3, 6))
    pydl.cross_entropy(x, y, backend=backend).backward()
    assert_close(x.grad, ref.cross_entropy_backward(1.0, to_numpy64(x), to_numpy64(y)),
                 torch.float32, reduction=6)
    empty = torch.zeros(0, 6, device=DEVICE)
    assert pydl.cross_entropy(empty, empty, backend=backend).isnan()
    assert pydl.cross_entropy(empty, empty, reduction="sum", backend=backend) == 0


# --- bad input ------------------------------------------------------------------------------

_TRAP = """
import torch, pydl
x = torch.randn(4, 5, device="cuda")
pydl.cross_entropy(x, torch.tensor({target}, device="cuda"), backend="{backend}")
torch.cuda.synchronize()
"""


def _out_of_range_traps(target: list, backend: str) -> None:
    """On a GPU the kernel checks the targets itself and traps, as torch's device-side
    assert does: the process's CUDA context is lost, so the call runs in a fresh process,
    which must fail with the CUDA error and not finish."""
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-c", _TRAP.format(target=target, backend=backend)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode != 0, "an out-of-range target passed on the GPU"
    assert "launch failure" in proc.stderr or "illegal instruction" in proc.stderr, proc.stderr


@backends
def test_cross_entropy_bad_input(backend):
    x = random_tensor((4, 5), torch.float32, DEVICE)
    t = _targets((4,), 5)
    ce = lambda *a, **k: pydl.cross_entropy(*a, backend=backend, **k)  # noqa: E731
    for bad in ([0, 1, 5, 2], [0, -1, 2, 2]):
        if _softmax_ce_ops.kernel_checks_targets(x, backend) and x.is_cuda:
            _out_of_range_traps(bad, backend)
        else:       # the host's check, or the simulated kernel's
            with pytest.raises(IndexError, match="out of range"):
                ce(x, torch.tensor(bad, device=DEVICE))
    with pytest.raises(ValueError, match="target shape"):
        ce(x, _targets((3,), 5))
    with pytest.raises(TypeError, match="int64"):
        ce(x, t.int())
    with pytest.raises(ValueError, match="weight"):
        ce(x, t, weight=torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match="reduction"):
        ce(x, t, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        ce(x, t, label_smoothing=1.5)
    p = torch.softmax(x, 1)
    with pytest.raises(ValueError, match="must have input's shape"):
        ce(x, p[:, :4])
    with pytest.raises(TypeError, match="must be floating point"):
        ce(x, torch.zeros(4, 5, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="int64 class indices"):
        ce(x, p[:, 0])
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        ce(x, p.double())
    with pytest.raises(ValueError, match="ignore_index"):
        ce(x, p, ignore_index=0)
    ce(x, t, ignore_index=1)        # a signature checked and kept; its float twin refused
    with pytest.raises(TypeError, match="ignore_index must be an int"):
        ce(x, t, ignore_index=1.0)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        ce(x.double(), t)
    # a class weight that requires grad with class indices: refused, as torch refuses it
    # (probabilities differentiate it: test_cross_entropy_probs_weight_gradient)
    w = torch.rand(5, device=DEVICE).requires_grad_()
    with pytest.raises(NotImplementedError, match="class weight requires grad"):
        ce(x, t, weight=w)
    with pytest.raises(RuntimeError, match="not differentiable with respect to argument 'weight'"):
        torch.nn.functional.cross_entropy(x, t, weight=w)
    with torch.no_grad():
        ce(x, t, weight=w)
    ce(x, t, weight=w.detach())


@backends
def test_softmax_bad_input(backend):
    x = random_tensor((4, 5), torch.float32, DEVICE)
    with pytest.raises(IndexError, match="dim"):
        pydl.softmax(x, 2, backend=backend)
    with pytest.raises(TypeError, match="Tensor"):
        pydl.softmax([1.0, 2.0], 0, backend=backend)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        pydl.softmax(x.to(torch.int32), 0, backend=backend)


# --- GPU-only: large offsets ----------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.full
def test_cross_entropy_beyond_int32_offsets():
    """2**31+ logits: row offsets must be computed in int64."""
    N, C = 2 ** 16 + 3, 2 ** 15
    x = torch.randn(N, C, device="cuda", dtype=torch.bfloat16)
    t = torch.randint(0, C, (N,), device="cuda")
    ours = pydl.cross_entropy(x, t, reduction="none")
    ref_rows = torch.nn.functional.cross_entropy(x[-4:].float(), t[-4:], reduction="none")
    assert_close(ours[-4:], ref_rows, torch.bfloat16, reduction=C)


@pytest.mark.parametrize("shape", [(5,), (2, 5), (2, 3, 5), (2, 3, 4, 5)])
def test_implicit_dim_as_torch(shape):
    """dim=None (nn.Softmax() without dim) picks torch's deprecated implicit dim, and warns."""
    x = torch.randn(*shape, device=DEVICE)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        ours = pydl.nn.Softmax()(x)
    with pytest.warns(UserWarning, match="Implicit dimension"):
        theirs = torch.nn.Softmax()(x)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.skipif(HAS_CUDA, reason="the simulator's block count (a GPU runs one block a row)")
@pytest.mark.parametrize("targets", ["indices", "probabilities"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_numba_cross_entropy_last_block_reduces(monkeypatch, reduction, targets):
    """The Numba forward sums a sum or a mean in its last block to finish (no second launch):
    with several blocks striding over the rows, every block counts its arrival, only the last
    sums, and the counter is back at zero for the next launch (two calls in a row)."""
    from pydl import _launch, _numba_launch, _plan
    monkeypatch.setattr(_numba_launch, "SIM_MAX_BLOCKS", 3)
    _plan.clear_all()       # plans of these shapes built earlier fixed the block count
    grids, launch = [], _numba_launch.launch_numba
    monkeypatch.setattr(_numba_launch, "launch_numba", lambda kernel, grid, *a: (
        grids.append((kernel.__name__, grid)), launch(kernel, grid, *a))[1])
    x = random_tensor((37, 11), torch.float32, DEVICE)
    w = random_tensor((11,), torch.float32, DEVICE).abs() + 0.5
    t = (torch.randint(0, 11, (37,), device=DEVICE) if targets == "indices"
         else torch.softmax(random_tensor((37, 11), torch.float32, DEVICE), 1))
    t[3] = -100 if targets == "indices" else t[3]
    want = torch.nn.functional.cross_entropy(x.double(), t if targets == "indices" else
                                             t.double(), w.double(), reduction=reduction,
                                             label_smoothing=0.2)
    for _ in range(2):
        got = pydl.cross_entropy(x, t, w, reduction=reduction, label_smoothing=0.2,
                                 backend="numba")
        assert_close(got, want, torch.float32, reduction=37 * 11)
    assert not _launch.arrival_counters(x.device, 1).any()
    forward = "cross_entropy_fwd" if targets == "indices" else "cross_entropy_prob_fwd"
    assert (forward, 3) in grids, grids      # several blocks did stride over the rows
    _plan.clear_all()
