"""Double backward (gradients of gradients, create_graph=True) on the kernel backends.

Supported ops (conv2d, the three pools, the 1-d ops on them, softmax, log_softmax,
cross_entropy) must give the torch backend's second (and third) derivatives; attention (flash
and naive, as torch's own fused attention kernels) must raise when its gradient is
differentiated, never return a gradient that silently lacks its share. Kernels take no
float64, so the comparison is with torch at fp32 tolerance.
"""

import pytest
import torch
from conftest import DEVICE
from torch import autograd

import pydl
from pydl.testing import assert_close, random_tensor

KERNEL_VARIANTS = [("triton", None), ("numba", None)]
CONV_VARIANTS = [("triton", "implicit"), ("triton", "im2col"), ("numba", "im2col")]
TF32 = DEVICE == "cuda"


def close(actual, expected, name, reduction=256):
    """fp32 tolerance (TF32 on a GPU) for second derivatives: sums over a few hundred products
    of gradients, with atol scaled by the expected magnitude (they run to tens)."""
    scale = 10.0 * max(1.0, float(expected.abs().max()))
    assert_close(
        actual, expected, torch.float32, reduction=reduction, scale=scale, tf32=TF32, name=name
    )


def _leaves(inputs):
    return [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]


def second_order(fn, inputs, seed=0):
    """Gradients w.r.t. `inputs` of  sum(c1 * y) + sum_i <r_i, d/d input_i sum(c2 * y * y)>,
    y = fn(*inputs): the inner gradient's cotangent depends on y, so both derivatives of each
    backward (w.r.t. its cotangent and w.r.t. the saved inputs) are exercised."""
    gen = torch.Generator().manual_seed(seed)
    leaves = _leaves(inputs)
    y = fn(*leaves)
    c1, c2 = (random_tensor(y.shape, y.dtype, y.device, generator=gen) for _ in range(2))
    diff = [t for t in leaves if t.requires_grad]
    grads = autograd.grad((c2 * y * y).sum(), diff, create_graph=True)
    total = (c1 * y).sum()
    for g in grads:
        total = total + (random_tensor(g.shape, g.dtype, g.device, generator=gen) * g).sum()
    total.backward()
    return [t.grad for t in diff]


def check_second_order(fn, inputs, backend, algo=None):
    ours = second_order(
        lambda *a: fn(*a, backend=backend, **({"algo": algo} if algo else {})), inputs
    )
    theirs = second_order(lambda *a: fn(*a, backend="torch"), inputs)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        close(a, b, f"second-order grad of input {i}")


# --- the case: a gradient penalty through conv2d ------------------------------------


@pytest.mark.parametrize("backend,algo", CONV_VARIANTS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(padding=1),
        dict(stride=2, padding=(1, 0), dilation=(1, 2)),
        dict(padding="same", groups=2),
    ],
    ids=["pad", "strided", "same-groups"],
)
def test_conv2d_gradient_penalty(backend, algo, opts):
    x0 = random_tensor((2, 4, 7, 6), device=DEVICE)
    w0 = random_tensor((6, 4 // opts.get("groups", 1), 3, 2), device=DEVICE)
    b0 = random_tensor((6,), device=DEVICE)

    def run(be, algo=None):
        x, w, b = _leaves([x0, w0, b0])
        y = pydl.conv2d(x, w, b, backend=be, algo=algo, **opts)
        (g,) = autograd.grad(y.pow(2).sum(), x, create_graph=True)
        (y.mean() + 0.1 * g.pow(2).sum()).backward()
        return x.grad, w.grad, b.grad

    for name, a, b in zip("xwb", run(backend, algo), run("torch")):
        close(a, b, f"d{name}")


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_one_d_ops_second_order(backend):
    """conv1d and the 1-d pools: the 2-d kernels' derivatives through the views."""
    x = random_tensor((2, 4, 9), device=DEVICE)
    w = random_tensor((6, 2, 3), device=DEVICE)

    def fn(x, w, backend):
        y = pydl.conv1d(x, w, padding=1, stride=(2,), groups=2, backend=backend)
        return (pydl.avg_pool1d(y, 2, 1, backend=backend)[..., :3]
                + pydl.adaptive_avg_pool1d(y, 3, backend=backend)
                + pydl.max_pool1d(y, 2, 1, backend=backend)[..., :3])

    check_second_order(fn, [x, w], backend)


@pytest.mark.parametrize("backend,algo", CONV_VARIANTS)
def test_conv1d_forward_through_the_double_backward(backend, algo):
    """The double-vjp trick: differentiating conv1d's input gradient (made with a graph)
    w.r.t. its upstream gradient v, along u, runs the double backward's conv1d forward and
    gives conv1d(u, w) itself; that output, and the weight gradient's and the input
    gradient's, are tensors of their own that take in-place ops (a view made inside a
    Function would refuse them)."""
    x, w, u = (random_tensor(s, device=DEVICE) for s in ((2, 4, 9), (6, 2, 3), (2, 4, 9)))
    xx, ww = _leaves([x, w])
    y = pydl.conv1d(xx, ww, padding=1, groups=2, backend=backend, algo=algo)
    v = random_tensor(y.shape, device=DEVICE).requires_grad_()
    gx, gw = autograd.grad(y, [xx, ww], v, create_graph=True)
    (gv,) = autograd.grad(gx, v, u, create_graph=True)
    close(gv, torch.nn.functional.conv1d(u, w, padding=1, groups=2), "conv1d(u, w)")
    for g in (gx, gw, gv):
        g.mul_(2)


@pytest.mark.parametrize("backend,algo", CONV_VARIANTS)
def test_conv2d_second_order_and_constant_cotangent(backend, algo):
    x, w, b = (random_tensor(s, device=DEVICE) for s in ((1, 3, 6, 5), (4, 3, 3, 3), (4,)))
    fn = lambda x, w, b, **kw: pydl.conv2d(x, w, b, padding=1, **kw)  # noqa: E731
    check_second_order(fn, [x, w, b], backend, algo)

    # grad of sum(y): the cotangent is a constant, the penalty depends on w only through the
    # backward's saved weight (torch's own once_differentiable would miss exactly this)
    def penalty_grad(be):
        xx, ww = _leaves([x, w])
        (g,) = autograd.grad(
            pydl.conv2d(
                xx, ww, padding=1, backend=be, **({"algo": algo} if be != "torch" else {})
            ).sum(),
            xx,
            create_graph=True,
        )
        g.pow(2).sum().backward()
        return ww.grad

    close(penalty_grad(backend), penalty_grad("torch"), "dw")


@pytest.mark.parametrize("backend,algo", CONV_VARIANTS)
def test_conv2d_third_order(backend, algo):
    x, w = random_tensor((1, 2, 5, 5), device=DEVICE), random_tensor((3, 2, 3, 3), device=DEVICE)

    def third(be, algo=None):
        xx, ww = _leaves([x, w])
        y = pydl.conv2d(xx, ww, backend=be, **({"algo": algo} if algo else {}))
        (gx,) = autograd.grad((y**3).sum(), xx, create_graph=True)
        (gw,) = autograd.grad((gx**2).sum(), ww, create_graph=True)
        (gw**2).sum().backward()
        return xx.grad, ww.grad

    for name, a, b in zip("xw", third(backend, algo), third("torch")):
        close(a, b, f"third-order d{name}", reduction=4096)


# --- the other supported ops --------------------------------------------------------------

SUPPORTED = {
    "avg_pool2d": (
        lambda x, **kw: pydl.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False, **kw),
        (2, 3, 7, 6),
    ),
    "avg_pool2d_divisor": (
        lambda x, **kw: pydl.avg_pool2d(x, 2, 1, divisor_override=3, **kw),
        (1, 2, 5, 5),
    ),
    "adaptive_avg_pool2d": (
        lambda x, **kw: pydl.adaptive_avg_pool2d(x, (3, 2), **kw),
        (2, 3, 7, 5),
    ),
    "max_pool2d": (
        lambda x, **kw: pydl.max_pool2d(x, 3, 2, 1, dilation=(1, 2), **kw),
        (2, 3, 7, 8),
    ),
    "max_pool2d_ceil": (
        lambda x, **kw: pydl.max_pool2d(x, (2, 3), (2, 1), ceil_mode=True, **kw),
        (1, 2, 5, 6),
    ),
    "max_pool2d_return_indices": (
        lambda x, **kw: pydl.max_pool2d(x, 2, return_indices=True, **kw)[0],
        (1, 3, 6, 4),
    ),
    "max_pool2d_channels_last": (
        lambda x, **kw: pydl.max_pool2d(x.to(memory_format=torch.channels_last), 2, 1, **kw),
        (2, 4, 5, 5),
    ),
    "softmax": (lambda x, **kw: pydl.softmax(x, 1, **kw), (3, 7, 4)),
    "log_softmax": (lambda x, **kw: pydl.log_softmax(x, -1, **kw), (5, 9)),
    "cross_entropy_none_weight_smoothing": (
        lambda x, **kw: pydl.cross_entropy(
            x,
            torch.tensor([[1, -100], [4, 0], [2, 2]], device=DEVICE),
            reduction="none",
            weight=torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0], device=DEVICE),
            label_smoothing=0.2,
            **kw,
        ),
        (3, 5, 2),
    ),
    "cross_entropy_mean_weight": (
        lambda x, **kw: pydl.cross_entropy(
            x,
            torch.tensor([1, 0, 4, -100], device=DEVICE),
            weight=torch.tensor([1.0, 0.5, 2.0, 1.0, 3.0], device=DEVICE),
            **kw,
        ),
        (4, 5),
    ),
    "cross_entropy_sum_1d": (
        lambda x, **kw: pydl.cross_entropy(
            x, torch.tensor(3, device=DEVICE), reduction="sum", label_smoothing=0.1, **kw
        ),
        (6,),
    ),
    "cross_entropy_prob_mean": (
        lambda x, **kw: pydl.cross_entropy(
            x,
            torch.softmax(
                random_tensor(x.shape, device=DEVICE, generator=torch.Generator().manual_seed(3)), 1
            ),
            label_smoothing=0.1,
            weight=torch.tensor([1.0, 0.5, 2.0, 1.0], device=DEVICE),
            **kw,
        ),
        (3, 4),
    ),
}


@pytest.mark.parametrize("backend,algo", KERNEL_VARIANTS)
@pytest.mark.parametrize("op", SUPPORTED)
def test_second_order_matches_torch(op, backend, algo):
    fn, shape = SUPPORTED[op]
    check_second_order(fn, [random_tensor(shape, device=DEVICE)], backend, algo)


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_softmax_third_order(backend):
    x = random_tensor((4, 6), device=DEVICE)

    def third(be):
        (xx,) = _leaves([x])
        y = pydl.softmax(xx, -1, backend=be)
        (g1,) = autograd.grad((y**2).sum(), xx, create_graph=True)
        (g2,) = autograd.grad((g1**2).sum(), xx, create_graph=True)
        (g2**2).sum().backward()
        return xx.grad

    close(third(backend), third("torch"), "third order")


def test_cnn_gradient_penalty_through_conv_and_avg_pool():
    """The issue's user: a small CNN trained with a gradient penalty."""
    x0 = random_tensor((2, 3, 8, 8), device=DEVICE)
    w0 = random_tensor((4, 3, 3, 3), device=DEVICE)

    def run(be):
        x, w = _leaves([x0, w0])
        y = pydl.adaptive_avg_pool2d(pydl.conv2d(x, w, padding=1, backend=be).tanh(), 1, backend=be)
        (g,) = autograd.grad(y.sum(), x, create_graph=True)
        (y.pow(2).mean() + (g.flatten(1).norm(dim=1) - 1).pow(2).mean()).backward()
        return w.grad

    close(run("triton"), run("torch"), "dw")


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_cross_entropy_soft_target_second_order_in_logits_target_and_grad_out(backend, reduction):
    """Probability targets that are trained too (distillation): second derivatives w.r.t. the
    logits and the target, through a cotangent that depends on the loss."""
    x, y = random_tensor((3, 6), device=DEVICE), torch.rand(3, 6, device=DEVICE)

    def run(be):
        xx, yy = _leaves([x, y])
        loss = pydl.cross_entropy(xx, yy, reduction=reduction, label_smoothing=0.05, backend=be)
        gx, gy = autograd.grad((loss**2).sum(), (xx, yy), create_graph=True)
        ((gx**2).sum() + (gy * gx).sum() + loss.sum()).backward()
        return xx.grad, yy.grad

    for name, a, b in zip("xy", run(backend), run("torch")):
        close(a, b, f"d{name}")


def test_maml_inner_step_through_conv_and_cross_entropy():
    """A MAML-style inner step: the adapted weight depends on a create_graph gradient of the
    cross-entropy through conv2d, and the outer loss differentiates through it."""
    x0, w0 = random_tensor((4, 2, 5, 5), device=DEVICE), random_tensor((3, 2, 3, 3), device=DEVICE)
    target = torch.tensor([0, 2, 1, 2], device=DEVICE)

    def run(be):
        x, w = _leaves([x0, w0])
        logits = pydl.conv2d(x, w, backend=be).mean((2, 3))
        (gw,) = autograd.grad(pydl.cross_entropy(logits, target, backend=be), w, create_graph=True)
        logits2 = pydl.conv2d(x, w - 0.5 * gw, backend=be).mean((2, 3))
        pydl.cross_entropy(logits2, target, label_smoothing=0.1, backend=be).backward()
        return w.grad

    close(run("numba"), run("torch"), "outer dw")


# --- ops without double backward raise ----------------------------------------------------


def _attention(x, **kw):
    return pydl.scaled_dot_product_attention(x, x.flip(2), x * 0.5, **kw)


UNSUPPORTED = {
    "attention": (_attention, (1, 2, 5, 8), "scaled_dot_product_attention"),
    "attention_naive": (
        lambda x, **kw: (
            _attention(x, algo="naive", **kw) if kw["backend"] == "triton" else _attention(x, **kw)
        ),
        (1, 2, 5, 8),
        "scaled_dot_product_attention",
    ),
}


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("op", UNSUPPORTED)
def test_no_double_backward_raises(op, backend):
    fn, shape, name = UNSUPPORTED[op]
    x0 = random_tensor(shape, device=DEVICE)
    (x,) = _leaves([x0])
    y = fn(x, backend=backend)
    # a constant cotangent: torch.autograd.function.once_differentiable would let this through
    (g,) = autograd.grad(y.sum(), x, create_graph=True)
    (x_ref,) = _leaves([x0])
    (g_ref,) = autograd.grad(fn(x_ref, backend="torch").sum(), x_ref)
    close(g.detach(), g_ref, "first-order gradient")
    with pytest.raises(RuntimeError, match=f"pydl.{name} has no double backward.*backend='torch'"):
        g.pow(2).sum().backward()
    # torch.autograd.grad runs only the nodes on a path to its inputs: the refusal must lie on
    # them (a gradient penalty plus a term that reaches x by another path)
    (g,) = autograd.grad(fn(x, backend=backend).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=f"pydl.{name} has no double backward"):
        autograd.grad(g.pow(2).sum() + x.square().sum(), x)


@pytest.mark.parametrize("op", UNSUPPORTED)
def test_first_order_create_graph_still_trains(op):
    """create_graph=True without differentiating the result again (or backward with
    create_graph on the loss only) works as before."""
    fn, shape, _ = UNSUPPORTED[op]
    (x,) = _leaves([random_tensor(shape, device=DEVICE)])
    fn(x, backend="triton").sum().backward(create_graph=True)
    assert x.grad is not None and torch.isfinite(x.grad).all()
