"""Inputs that must never give a silent wrong answer, on both kernel backends, forward and
backward: zero-sized dimensions (torch's result, or torch's refusal, as a clear error), NaN and
infinities (propagated as torch propagates them), and bfloat16 in emulation (refused by the
Triton interpreter, which computes it wrongly; computed right by the Numba simulator)."""

import contextlib

import pytest
import torch
from conftest import DEVICE, HAS_CUDA

import pydl
from pydl.testing import assert_close, random_tensor, run_with_grad, uses_tf32

BACKENDS = ("triton", "numba")
backends = pytest.mark.parametrize("backend", BACKENDS)
NAN, INF = float("nan"), float("inf")


def check_like_torch(fn, inputs, backend, reduction=64, tf32=False, **kw):
    """fn(*inputs, backend=...) forward and backward against the torch backend on the same
    inputs and cotangent (outputs NaN-poisoned by the suite, so a skipped element fails).
    On a GPU torch computes the reference with its plain math kernels (torch_math), and `tf32`
    compares an fp32 convolution at the tolerance of the TF32 products pydl's kernels use."""
    out, g, grads = run_with_grad(lambda *a: fn(*a, backend=backend, **kw), inputs)
    with torch_math():
        t_out, _, t_grads = run_with_grad(lambda *a: fn(*a, backend="torch"), inputs, g)
    tf32 = tf32 and uses_tf32(DEVICE, cudnn=True)
    assert out.shape == t_out.shape
    assert_close(out, t_out, torch.float32, reduction=reduction, tf32=tf32, name="forward")
    for i, (a, b) in enumerate(zip(grads, t_grads)):
        if b is None:
            assert a is None, f"input {i}: got a gradient where torch has none"
            continue
        assert a is not None, f"input {i}: no gradient where torch computes one"
        assert a.shape == b.shape, f"input {i}: gradient shape {a.shape} != {b.shape}"
        assert_close(a, b, torch.float32, reduction=reduction, tf32=tf32,
                     name=f"grad of input {i}")


def torch_math():
    """torch's reference without its CUDA-only algorithms: cuDNN's convolutions (Winograd and
    FFT spread a NaN or an infinity to other outputs) and SDPA's fused kernels (whose handling
    of empty heads and infinities differs from the math the CPU and pydl follow)."""
    stack = contextlib.ExitStack()
    if HAS_CUDA:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
    return stack


def t(*shape):
    return random_tensor(shape, device=DEVICE)


def conv(x, w, b, **kw):
    return pydl.conv2d(x, w, b, padding=1, **kw)


def ce(reduction, **opts):
    def fn(x, target, **kw):
        return pydl.cross_entropy(x, target, reduction=reduction, **opts, **kw)

    return fn


def attention(x_shape, kv_shape, algo=None):
    def fn(q, k, v, **kw):
        if algo and kw["backend"] == "triton":
            kw["algo"] = algo
        return pydl.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kw)

    return fn


# --- zero-sized dimensions ------------------------------------------------------------------


def _idx(*shape, classes=5):
    return torch.randint(0, classes, shape, device=DEVICE)


EMPTY = {
    # name: (fn, inputs, extra keywords for the kernel backends)
    "conv2d_batch0_implicit": (
        conv,
        lambda: [t(0, 3, 5, 5), t(4, 3, 3, 3), t(4)],
        {"algo": "implicit"},
    ),
    "conv2d_batch0_im2col": (
        conv,
        lambda: [t(0, 3, 5, 5), t(4, 3, 3, 3), t(4)],
        {"algo": "im2col"},
    ),
    "conv2d_batch0_channels_last": (
        conv,
        lambda: [t(0, 3, 5, 5).to(memory_format=torch.channels_last), t(4, 3, 3, 3), t(4)],
        {},
    ),
    "max_pool2d_batch0": (lambda x, **kw: pydl.max_pool2d(x, 2, **kw), lambda: [t(0, 3, 6, 6)], {}),
    "avg_pool2d_batch0": (
        lambda x, **kw: pydl.avg_pool2d(x, 3, 2, 1, **kw),
        lambda: [t(0, 3, 6, 6)],
        {},
    ),
    "adaptive_avg_pool2d_batch0": (
        lambda x, **kw: pydl.adaptive_avg_pool2d(x, 2, **kw),
        lambda: [t(0, 3, 6, 6)],
        {},
    ),
    "softmax_rows0": (lambda x, **kw: pydl.softmax(x, -1, **kw), lambda: [t(0, 5)], {}),
    "softmax_row_length0": (lambda x, **kw: pydl.softmax(x, -1, **kw), lambda: [t(5, 0)], {}),
    "log_softmax_middle0": (lambda x, **kw: pydl.log_softmax(x, 1, **kw), lambda: [t(3, 0, 4)], {}),
    "log_softmax_outer0_dim2": (
        lambda x, **kw: pydl.log_softmax(x, 2, **kw),
        lambda: [t(3, 0, 4)],
        {},
    ),
    "cross_entropy_batch0_mean": (ce("mean"), lambda: [t(0, 5), _idx(0)], {}),
    "cross_entropy_batch0_sum_smoothing": (
        ce("sum", label_smoothing=0.2),
        lambda: [t(0, 5), _idx(0)],
        {},
    ),
    "cross_entropy_batch0_none_weight": (
        ce("none", weight=torch.rand(5, device=DEVICE) + 0.5),
        lambda: [t(0, 5), _idx(0)],
        {},
    ),
    "cross_entropy_pixels0_mean": (ce("mean"), lambda: [t(2, 5, 0), _idx(2, 0)], {}),
    "cross_entropy_prob_batch0_mean": (ce("mean"), lambda: [t(0, 5), t(0, 5).softmax(1)], {}),
    "cross_entropy_prob_classes0_mean": (ce("mean"), lambda: [t(3, 0), t(3, 0)], {}),
    "cross_entropy_prob_classes0_none": (ce("none"), lambda: [t(3, 0), t(3, 0)], {}),
    "attention_batch0": (
        attention(0, 0),
        lambda: [t(0, 2, 5, 8), t(0, 2, 6, 8), t(0, 2, 6, 8)],
        {},
    ),
    "attention_heads0": (
        attention(0, 0),
        lambda: [t(2, 0, 5, 8), t(2, 0, 6, 8), t(2, 0, 6, 8)],
        {},
    ),
    "attention_query_heads0_gqa": (
        attention(0, 0),
        lambda: [t(1, 0, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 8)],
        {},
    ),
    "attention_queries0": (
        attention(0, 0),
        lambda: [t(2, 2, 0, 8), t(2, 2, 6, 8), t(2, 2, 6, 8)],
        {},
    ),
    "attention_keys0": (attention(0, 0), lambda: [t(2, 2, 5, 8), t(2, 2, 0, 8), t(2, 2, 0, 8)], {}),
    "attention_head_dim0": (
        attention(0, 0),
        lambda: [t(1, 2, 5, 0), t(1, 2, 6, 0), t(1, 2, 6, 4)],
        {},
    ),
    "attention_value_dim0": (
        attention(0, 0),
        lambda: [t(1, 2, 5, 8), t(1, 2, 6, 8), t(1, 2, 6, 0)],
        {},
    ),
    "attention_naive_queries0": (
        attention(0, 0, "naive"),
        lambda: [t(1, 2, 0, 8), t(1, 2, 6, 8), t(1, 2, 6, 8)],
        {},
    ),
    "attention_naive_heads0": (     # no query head against one key head (broadcast to none)
        attention(0, 0, "naive"),
        lambda: [t(1, 0, 5, 8), t(1, 1, 6, 8), t(1, 1, 6, 4)],
        {},
    ),
    "attention_naive_batch0": (
        attention(0, 0, "naive"),
        lambda: [t(0, 2, 5, 8), t(0, 2, 6, 8), t(0, 2, 6, 8)],
        {},
    ),
}


@backends
@pytest.mark.parametrize("case", EMPTY)
def test_empty_dims_match_torch(case, backend):
    fn, inputs, kw = EMPTY[case]
    if backend == "numba":
        kw = {k: v for k, v in kw.items() if k != "algo"}
    check_like_torch(fn, inputs(), backend, tf32=case.startswith("conv"), **kw)


REFUSED = {
    # torch raises for these too, or (0 input channels) returns an (N, 0, OH, OW) tensor that
    # drops the bias's out channels: no answer to give
    "conv2d_in_channels0": (
        lambda **kw: pydl.conv2d(t(2, 0, 5, 5), t(4, 0, 3, 3), t(4), **kw),
        "0 channels",
    ),
    "conv2d_out_channels0": (
        lambda **kw: pydl.conv2d(t(2, 3, 5, 5), t(0, 3, 3, 3), **kw),
        "0 output channels",
    ),
    "max_pool2d_channels0": (
        lambda **kw: pydl.max_pool2d(t(2, 0, 6, 6), 2, **kw),
        "empty non-batch",
    ),
    "avg_pool2d_height0": (lambda **kw: pydl.avg_pool2d(t(2, 3, 0, 6), 1, **kw), "empty non-batch"),
    "adaptive_avg_pool2d_height0": (
        lambda **kw: pydl.adaptive_avg_pool2d(t(2, 3, 0, 6), 2, **kw),
        "empty non-batch",
    ),
    "attention_kv_heads0": (
        lambda **kw: pydl.scaled_dot_product_attention(
            t(1, 2, 5, 8), t(1, 0, 6, 8), t(1, 0, 6, 8), enable_gqa=True, **kw
        ),
        "key/value have none",
    ),
}


@backends
@pytest.mark.parametrize("case", REFUSED)
def test_empty_dims_torch_refuses_raise_clearly(case, backend):
    fn, match = REFUSED[case]
    with pytest.raises(ValueError, match=match):
        fn(backend=backend)


# --- NaN and infinities ---------------------------------------------------------------------


def _with(x, *spots):
    x = x.clone()
    for index, value in spots:
        x[index] = value
    return x


def _sdpa(algo=None):
    def fn(q, k, v, m=None, **kw):
        if algo and kw["backend"] == "triton":
            kw["algo"] = algo
        return pydl.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw)

    return fn


def _softmax_rows():
    # a NaN; a row all -inf; a row all -inf but a NaN; +inf; a -inf
    s = t(5, 11)
    s[1, :] = -INF
    s[2, :] = -INF
    return _with(s, ((0, 3), NAN), ((2, 5), NAN), ((3, 2), INF), ((4, 1), -INF))


def _image():
    return _with(t(2, 3, 7, 7), ((0, 1, 2, 3), NAN), ((1, 0, 4, 4), INF), ((1, 2, 0, 0), -INF))


NONFINITE = {
    # the case: a NaN in one key made the Numba flash forward give zeros
    "attention_nan_key": (
        _sdpa(),
        lambda: [t(1, 2, 7, 8), _with(t(1, 2, 9, 8), ((0, 0, 3, 2), NAN)), t(1, 2, 9, 8)],
    ),
    "attention_naive_nan_key": (
        _sdpa("naive"),
        lambda: [t(1, 2, 7, 8), _with(t(1, 2, 9, 8), ((0, 0, 3, 2), NAN)), t(1, 2, 9, 8)],
    ),
    "attention_inf_value": (
        _sdpa(),
        lambda: [t(1, 2, 7, 8), t(1, 2, 9, 8), _with(t(1, 2, 9, 8), ((0, 1, 4, 0), INF))],
    ),
    # a NaN as the only score of a row that is otherwise masked: NaN, not "fully masked"
    "attention_nan_in_masked_row": (
        _sdpa(),
        lambda: [
            t(1, 2, 7, 8),
            t(1, 2, 9, 8),
            t(1, 2, 9, 8),
            _with(
                torch.zeros(7, 9, device=DEVICE).index_fill_(
                    1, torch.arange(1, 9, device=DEVICE), -INF
                ),
                ((2, 0), NAN),
            ),
        ],
    ),
    "attention_inf_mask": (
        _sdpa(),
        lambda: [t(1, 2, 7, 8), t(1, 2, 9, 8), t(1, 2, 9, 8), _with(t(7, 9), ((3, 4), INF))],
    ),
    "conv2d": (
        lambda x, w, **kw: pydl.conv2d(x, w, padding=1, **kw),
        lambda: [_image(), t(4, 3, 3, 3)],
    ),
    "max_pool2d": (lambda x, **kw: pydl.max_pool2d(x, 3, 2, 1, **kw), lambda: [_image()]),
    "avg_pool2d": (lambda x, **kw: pydl.avg_pool2d(x, 3, 2, 1, **kw), lambda: [_image()]),
    "adaptive_avg_pool2d": (
        lambda x, **kw: pydl.adaptive_avg_pool2d(x, 3, **kw),
        lambda: [_image()],
    ),
    "softmax": (lambda x, **kw: pydl.softmax(x, -1, **kw), lambda: [_softmax_rows()]),
    "log_softmax": (lambda x, **kw: pydl.log_softmax(x, -1, **kw), lambda: [_softmax_rows()]),
    "cross_entropy_none": (
        lambda x, **kw: pydl.cross_entropy(
            x,
            torch.tensor([1, 2, 3, 4, 0], device=DEVICE),
            reduction="none",
            label_smoothing=0.1,
            **kw,
        ),
        lambda: [_softmax_rows()],
    ),
    # weight 0 times an infinite log-probability: NaN, as torch gives
    "cross_entropy_weight0_smoothing": (
        lambda x, **kw: pydl.cross_entropy(
            x,
            torch.tensor([1, 2, 3, 4, 0], device=DEVICE),
            reduction="none",
            label_smoothing=0.1,
            weight=torch.tensor(
                [1.0, 0.0, 2.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0], device=DEVICE
            ),
            **kw,
        ),
        lambda: [_softmax_rows()],
    ),
    "cross_entropy_mean": (
        lambda x, **kw: pydl.cross_entropy(x, torch.tensor([1, 2, 3, 4, 0], device=DEVICE), **kw),
        lambda: [_softmax_rows()],
    ),
    "cross_entropy_prob": (
        lambda x, p, **kw: pydl.cross_entropy(x, p, reduction="none", **kw),
        lambda: [_softmax_rows(), torch.rand(5, 11, device=DEVICE)],
    ),
}


@backends
@pytest.mark.parametrize("case", NONFINITE)
def test_nan_and_inf_propagate_like_torch(case, backend):
    fn, inputs = NONFINITE[case]
    check_like_torch(fn, inputs(), backend, tf32=case.startswith("conv"))


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [NAN, INF])
@pytest.mark.parametrize("ignored", ["some", "all"])
def test_ignored_rows_keep_a_zero_gradient_under_a_nonfinite_upstream(backend, reduction,
                                                                     upstream, ignored):
    """An ignored row's gradient is 0 whatever the loss's upstream gradient is, as torch's
    (it is never written, not 0 * g): the Triton forward writes the gradient and its
    backward scales it by g, where a NaN or infinite g had made the ignored rows NaN too.
    (An all-ignored mean is NaN, which a caller may feed back.) The other rows' gradients
    are not finite where torch's are not (which of NaN and inf follows each kernel's order
    of operations: torch's log-softmax backward gives inf - inf)."""
    N, C = 6, 9
    x = random_tensor((N, C), torch.float32, DEVICE, scale=2.0)
    t = torch.tensor([0, 3, 8, 3, 5, 1], device=DEVICE)
    t[t == 3] = -100
    if ignored == "all":
        t[:] = -100
    grads = []
    for be in (backend, "torch"):
        xg = x.clone().requires_grad_()
        loss = pydl.cross_entropy(xg, t, reduction=reduction, label_smoothing=0.1, backend=be)
        (dx,) = torch.autograd.grad(loss, xg, torch.tensor(upstream, device=DEVICE))
        grads.append(dx)
    got, want = grads
    skipped = t == -100
    assert torch.equal(got[skipped], torch.zeros_like(got[skipped]))
    assert torch.equal(got.isfinite(), want.isfinite())


@backends
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("upstream", [1.0, 2.0, NAN, INF])
def test_ignored_rows_with_nonfinite_logits_like_torch(backend, reduction, upstream):
    """An ignored row's gradient is torch's 0 p_c (nll_loss's zero gradient through
    log_softmax's backward): NaN where the row's softmax is NaN (a NaN or +inf logit, every
    logit -inf), zeros otherwise, whatever the upstream gradient; every path: the gradient
    the Triton forward writes and its backward scales (sum, mean), the backward kernels
    (none; the Numba backend always)."""
    N, C = 7, 5
    x = random_tensor((N, C), torch.float32, DEVICE)
    x[0, 2], x[1, 4], x[2] = NAN, INF, -INF        # ignored, non-finite
    x[3, 1], x[4, 0] = NAN, -INF                   # counted (row 4 stays finite)
    t = torch.tensor([-100, -100, -100, 1, 2, -100, 0], device=DEVICE)
    grads = []
    for be in (backend, "torch"):
        xg = x.clone().requires_grad_()
        loss = pydl.cross_entropy(xg, t, reduction=reduction, backend=be)
        g = torch.full_like(loss, upstream)
        (dx,) = torch.autograd.grad(loss, xg, g)
        grads.append(dx)
    got, want = grads
    ignored = t == -100
    assert torch.equal(got[ignored].isnan(), want[ignored].isnan()), (got, want)
    assert torch.equal(got[ignored].nan_to_num(1.0), want[ignored].nan_to_num(1.0))
    assert torch.equal(got.isfinite(), want.isfinite()), (got, want)


# --- bfloat16 in emulation ------------------------------------------------------------------

emulation_only = pytest.mark.skipif(HAS_CUDA, reason="emulation only: on a GPU bf16 is compiled")
bf = torch.bfloat16


def _lstm_cell(x, **kw):
    w_ih, w_hh = t(16, x.shape[1]).to(x.dtype), t(16, 4).to(x.dtype)
    return pydl.lstm_cell(x, None, w_ih, w_hh, **kw)[0]


BF16_OPS = {
    "conv2d": lambda x, **kw: pydl.conv2d(x, t(4, 3, 3, 3).to(x.dtype), **kw),
    "max_pool2d": lambda x, **kw: pydl.max_pool2d(x, 2, **kw),
    "avg_pool2d": lambda x, **kw: pydl.avg_pool2d(x, 2, **kw),
    "softmax": lambda x, **kw: pydl.softmax(x, -1, **kw),
    "cross_entropy": lambda x, **kw: pydl.cross_entropy(
        x.flatten(1), _idx(x.shape[0], classes=75), **kw
    ),
    "attention": lambda x, **kw: pydl.scaled_dot_product_attention(x, x, x, **kw),
    "lstm_cell": lambda x, **kw: _lstm_cell(x.flatten(1), **kw),
    "gru_cell": lambda x, **kw: pydl.gru_cell(
        x.flatten(1), None, t(12, 75).to(x.dtype), t(12, 4).to(x.dtype), **kw
    ),
    "lstm": lambda x, **kw: pydl.lstm(
        x.flatten(2), None, [t(16, 25).to(x.dtype), t(16, 4).to(x.dtype)], bias=False, **kw
    )[0],
}


@emulation_only
@pytest.mark.parametrize("op", BF16_OPS)
def test_triton_interpreter_refuses_bf16(op):
    x = t(2, 3, 5, 5).to(bf)
    with pytest.raises(TypeError, match="Triton's interpreter computes bfloat16 wrongly"):
        BF16_OPS[op](x, backend="triton")


@emulation_only
def test_triton_interpreter_refuses_bf16_from_autocast_and_in_masks():
    q = t(1, 2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="Triton's interpreter"):
            pydl.conv2d(t(1, 3, 5, 5), t(4, 3, 3, 3), backend="triton")
        with pytest.raises(TypeError, match="Triton's interpreter"):
            pydl.scaled_dot_product_attention(q, q, q, backend="triton")
        with pytest.raises(TypeError, match="Triton's interpreter"):
            pydl.nn.Conv2d(3, 4, 3, backend="triton")(t(1, 3, 5, 5))
    with pytest.raises(TypeError, match="Triton's interpreter"):
        pydl.scaled_dot_product_attention(q, q, q, attn_mask=t(5, 5).to(bf), backend="triton")
    # float16 stays available there
    assert (
        pydl.conv2d(t(1, 3, 5, 5).half(), t(4, 3, 3, 3).half(), backend="triton").dtype
        == torch.float16
    )


BF16_NUMBA = {
    # name: (fn, input shapes, reduction length for the tolerance)
    "conv2d": (
        lambda x, w, **kw: pydl.conv2d(x, w, padding=1, **kw),
        [(2, 3, 6, 5), (4, 3, 3, 3)],
        27,
    ),
    "max_pool2d": (lambda x, **kw: pydl.max_pool2d(x, 3, 2, 1, **kw), [(2, 3, 7, 6)], 1),
    "avg_pool2d": (lambda x, **kw: pydl.avg_pool2d(x, 3, 2, 1, **kw), [(2, 3, 7, 6)], 9),
    "softmax": (lambda x, **kw: pydl.softmax(x, -1, **kw), [(4, 37)], 37),
    "cross_entropy": (
        lambda x, **kw: pydl.cross_entropy(
            x, torch.tensor([3, 0, 36, 7], device=DEVICE), reduction="none", **kw
        ),
        [(4, 37)],
        37,
    ),
    "attention": (
        lambda q, k, v, **kw: pydl.scaled_dot_product_attention(q, k, v, **kw),
        [(1, 2, 9, 16), (1, 2, 11, 16), (1, 2, 11, 16)],
        16 * 11,
    ),
}


@pytest.mark.parametrize("op", BF16_NUMBA)
def test_numba_bf16_against_float64(op):
    """The Numba simulator decodes bf16 bit patterns itself: bf16 stays tested in emulation,
    forward and backward, against torch in float64 on the same bf16-rounded inputs."""
    fn, shapes, reduction = BF16_NUMBA[op]
    inputs = [t(*s).to(bf) for s in shapes]
    out, g, grads = run_with_grad(lambda *a: fn(*a, backend="numba"), inputs)
    r_out, _, r_grads = run_with_grad(
        lambda *a: fn(*a, backend="torch"), [x.double() for x in inputs], g.double()
    )
    assert out.dtype == bf
    assert_close(out, r_out, bf, reduction=reduction, name="forward")
    for i, (a, b) in enumerate(zip(grads, r_grads)):
        assert a.dtype == bf
        assert_close(a, b, bf, reduction=reduction, name=f"grad of input {i}", scale=2.0)


@backends
@pytest.mark.parametrize("op", ["softmax", "cross_entropy"])
def test_nan_in_rows_wider_than_a_block(op, backend, monkeypatch):
    """Rows walked block by block (the online max/sum): a NaN that a lane sees first, next to
    -inf, still makes the row NaN (a GPU's default max drops a NaN; Triton's interpreter
    does not, so in emulation this guards the NaN-propagating max the kernels ask for)."""
    from pydl import _softmax_ce_triton

    monkeypatch.setattr(_softmax_ce_triton, "MAX_BLOCK_N", 16)
    x = t(3, 50)
    x[0, 3] = NAN
    x[1, :20] = -INF
    x[1, 2] = NAN
    x[2, 40] = NAN
    if op == "softmax":
        fn = lambda x, **kw: pydl.log_softmax(x, -1, **kw)  # noqa: E731
    else:
        fn = lambda x, **kw: pydl.cross_entropy(  # noqa: E731
            x, torch.tensor([1, 30, 2], device=DEVICE), reduction="none", label_smoothing=0.1, **kw
        )
    check_like_torch(fn, [x], backend)


@backends
def test_adaptive_avg_pool2d_channels0(backend):
    """0 channels: torch's empty forward (where max_pool2d and avg_pool2d raise); the gradient
    is the empty one (torch's backward raises)."""
    for shape in ((2, 0, 6, 5), (0, 6, 5)):
        x = t(*shape).requires_grad_()
        y = pydl.adaptive_avg_pool2d(x, (3, 2), backend=backend)
        assert y.shape == torch.nn.functional.adaptive_avg_pool2d(x, (3, 2)).shape
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        assert dx.shape == x.shape


# --- integer options of other integer types ---------------------------------------------------

@backends
def test_numpy_integer_options(backend):
    """NumPy integers (sizes from a config file or an array) work wherever torch takes an int,
    with the ints' result; a NumPy bool or a float is still refused."""
    import numpy as np
    i = np.int64
    x = t(2, 4, 7, 6)
    w = t(4, 2, 3, 3)
    same = [
        (lambda: pydl.conv2d(x, w, stride=i(2), padding=(i(1), 2), dilation=i(1), groups=i(2),
                             backend=backend),
         lambda: pydl.conv2d(x, w, stride=2, padding=(1, 2), groups=2, backend=backend)),
        (lambda: pydl.max_pool2d(x, i(3), i(2), i(1), backend=backend),
         lambda: pydl.max_pool2d(x, 3, 2, 1, backend=backend)),
        (lambda: pydl.avg_pool2d(x, (i(2), i(3)), divisor_override=i(5), backend=backend),
         lambda: pydl.avg_pool2d(x, (2, 3), divisor_override=5, backend=backend)),
        (lambda: pydl.adaptive_avg_pool2d(x, (i(3), None), backend=backend),
         lambda: pydl.adaptive_avg_pool2d(x, (3, None), backend=backend)),
        (lambda: pydl.softmax(x, i(-2), backend=backend),
         lambda: pydl.softmax(x, -2, backend=backend)),
        (lambda: pydl.cross_entropy(x, torch.zeros(2, 7, 6, dtype=torch.long),
                                    ignore_index=i(1), backend=backend),
         lambda: pydl.cross_entropy(x, torch.zeros(2, 7, 6, dtype=torch.long), ignore_index=1,
                                    backend=backend)),
    ]
    for ours, ints in same:
        assert torch.equal(ours(), ints())
    m = torch.nn.LSTM(6, 3, num_layers=2)
    seq = t(4, 2, 6)
    assert torch.equal(pydl.lstm(seq, None, m._flat_weights, num_layers=i(2), backend=backend)[0],
                       pydl.lstm(seq, None, m._flat_weights, num_layers=2, backend=backend)[0])
    with pytest.raises(TypeError, match="kernel_size"):
        pydl.max_pool2d(x, np.bool_(True), backend=backend)
    with pytest.raises(TypeError, match="stride"):
        pydl.conv2d(x, w, stride=np.float64(2.0), groups=2, backend=backend)


@backends
def test_negative_bit_views_refused(backend):
    """A lazily negated view (its negative bit set: z.conj().imag) holds -x as x in memory:
    refused by name, for an input or a weight, also after a plan for plain tensors of the
    same shape exists (the bit is in the call's key); resolve_neg() runs."""
    def neg(*shape):
        return torch.randn(*shape, dtype=torch.complex64, device=DEVICE).conj().imag

    x, w = neg(2, 3, 5, 5), neg(4, 3, 3, 3)
    assert x.is_neg() and w.is_neg()
    cases = [(lambda t: pydl.softmax(t, 1, backend=backend), x),
             (lambda t: pydl.max_pool2d(t, 2, backend=backend), x),
             (lambda t: pydl.conv2d(t, w.resolve_neg(), backend=backend), x),
             (lambda t: pydl.conv2d(x.resolve_neg(), t, backend=backend), w)]
    for call, t in cases:
        call(t.resolve_neg())           # a plan for the plain tensor first
        with pytest.raises(TypeError, match="negative bit"):
            call(t)
    m = torch.nn.LSTM(3, 4)
    weights = [neg(*p.shape) if i == 1 else p.detach() for i, p in enumerate(m._flat_weights)]
    with pytest.raises(TypeError, match="negative bit"):
        pydl.lstm(torch.randn(2, 1, 3), None, weights, backend=backend)


# name: (input shapes, the op on them, the input that needs a gradient); the others are made
# under torch.inference_mode
INFERENCE_INPUTS = {
    "lstm_cell": ([(2, 4), (2, 5), (2, 5), (20, 4), (20, 5), (20,), (20,)],
                  lambda a, be: pydl.lstm_cell(a[0], (a[1], a[2]), *a[3:], backend=be)[0], 3),
    "gru": ([(3, 2, 4), (1, 2, 5), (15, 4), (15, 5), (15,), (15,)],
            lambda a, be: pydl.gru(a[0], a[1], a[2:], backend=be)[0], 1),
    "cross_entropy_soft": ([(4, 6), (4, 6)],
                           lambda a, be: pydl.cross_entropy(a[0], a[1], backend=be), 1),
    "attention_mask": ([(1, 2, 3, 4)] * 3 + [(3, 3)],
                       lambda a, be: pydl.scaled_dot_product_attention(*a[:3], attn_mask=a[3],
                                                                        backend=be), 0),
    "conv2d": ([(1, 3, 5, 5), (2, 3, 3, 3)], lambda a, be: pydl.conv2d(a[0], a[1], backend=be), 1),
}


@backends
@pytest.mark.parametrize("case", sorted(INFERENCE_INPUTS))
def test_inference_mode_inputs_in_a_training_graph(backend, case):
    """Tensors made under torch.inference_mode feeding a graph through another input that
    needs a gradient: autograd saves no inference tensor, and pydl's Functions save their
    inputs (the cells whatever gradient is needed, the soft-target loss its logits), which
    raised where torch's formulas, saving products instead, ran. pydl now copies such an
    input where it must save it; the result and gradient are torch's on ordinary copies."""
    shapes, op, grad_at = INFERENCE_INPUTS[case]
    with torch.inference_mode():
        made = [t(*s) for s in shapes]
    results = []
    for be in (backend, "torch"):
        args = [a if be != "torch" else a.clone() for a in made]
        args[grad_at] = made[grad_at].clone().requires_grad_()
        out = op(args, be)
        results.append((out.detach(), *torch.autograd.grad(out.sum(), args[grad_at])))
    for got, want in zip(*results):
        assert_close(got, want, made[0].dtype, reduction=8)


# name: (input shapes, the op with dropout on them)
DROPOUT_OPS = {
    "attention": ([(1, 2, 6, 4)] * 3, lambda a, be: pydl.scaled_dot_product_attention(
        *a, dropout_p=0.5, backend=be)),
    "lstm": ([(3, 2, 4), (20, 4), (20, 5), (20,), (20,), (20, 5), (20, 5), (20,), (20,)],
             lambda a, be: pydl.lstm(a[0], None, a[1:], num_layers=2, dropout=0.5,
                                     training=True, backend=be)[0]),
    "gru": ([(3, 2, 4), (15, 4), (15, 5), (15,), (15,), (15, 5), (15, 5), (15,), (15,)],
            lambda a, be: pydl.gru(a[0], None, a[1:], num_layers=2, dropout=0.5,
                                   training=True, backend=be)[0]),
}


@backends
@pytest.mark.parametrize("reentrant", [False, True], ids=["nonreentrant", "reentrant"])
@pytest.mark.parametrize("case", sorted(DROPOUT_OPS))
def test_activation_checkpointing_replays_dropout(backend, case, reentrant):
    """torch.utils.checkpoint runs the forward again in the backward with the random state of
    the first run restored: an op that draws its dropout mask from anything but torch's
    generators would recompute another mask there, and its gradients would silently belong
    to another forward. The checkpointed gradients must be the plain ones, bit for bit."""
    from torch.utils.checkpoint import checkpoint
    shapes, op = DROPOUT_OPS[case]
    made = [random_tensor(s, torch.float32, DEVICE) for s in shapes]
    g = None
    grads = []
    for checkpointed in (False, True):
        leaves = [t.clone().requires_grad_() for t in made]
        torch.manual_seed(7)
        if checkpointed:
            out = checkpoint(lambda *a: op(a, backend), *leaves, use_reentrant=reentrant)
        else:
            out = op(leaves, backend)
        g = torch.randn_like(out) if g is None else g
        out.backward(g)
        grads.append([t.grad for t in leaves])
    for i, (a, b) in enumerate(zip(*grads)):
        assert torch.equal(a, b), f"input {i}"
