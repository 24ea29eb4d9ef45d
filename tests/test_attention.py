"""scaled_dot_product_attention: flash kernels against the float64 reference and torch, forward
and the three gradients: odd lengths, Lq != Lk with causal, masks of every broadcast shape, GQA,
head dims 24/80, fully masked rows, dropout statistics and reproducibility."""
import contextlib
import functools
import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import DEVICE, DTYPES, spy_kernels
from hypothesis import given, settings
from hypothesis import strategies as st

import pydl
from pydl import _attention_seed, _attention_triton, attention
from pydl import reference as ref
from pydl.kernels.triton import attention as kt
from pydl.testing import assert_close, random_tensor, run_with_grad, uses_tf32

BACKENDS = ("triton", "numba")
backends = pytest.mark.parametrize("backend", BACKENDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)
F = torch.nn.functional
TF32 = uses_tf32(DEVICE, cudnn=False)


def torch_sdpa(q, k, v, attn_mask=None, **opts):
    """torch's SDPA, held on every device to what its CUDA kernels accept: they refuse a mask
    whose last dimension is not contiguous once broadcast (a (L, 1) mask over S > 1 keys)."""
    if attn_mask is not None and attn_mask.shape[-1] == 1 and k.shape[-2] > 1:
        raise RuntimeError("(*bias): last dimension must be contiguous (as torch on CUDA says)")
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, **opts)


def check_attention(q, k, v, backend, dtype, algo=None, **opts):
    fn = lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, backend=backend, algo=algo,  # noqa: E731
                                                           **opts)
    out, g, grads = run_with_grad(fn, [q, k, v])
    t_opts = dict(opts)
    if opts.get("attn_mask") is not None:   # pydl gets the mask as given, torch what it accepts
        mask = opts["attn_mask"]
        t_opts["attn_mask"] = mask.expand(mask.shape[:-2] + (q.shape[-2], k.shape[-2])).contiguous()
    t_out, _, t_grads = run_with_grad(lambda q, k, v: torch_sdpa(q, k, v, **t_opts), [q, k, v], g)
    np64 = lambda t: None if t is None else t.detach().cpu().double().numpy() \
        if t.dtype != torch.bool else t.cpu().numpy()  # noqa: E731
    mask = opts.get("attn_mask")
    r_opts = dict(attn_mask=np64(mask), is_causal=opts.get("is_causal", False),
                  scale=opts.get("scale"), enable_gqa=opts.get("enable_gqa", False))
    r_out = ref.scaled_dot_product_attention(np64(q), np64(k), np64(v), **r_opts)
    r_grads = ref.scaled_dot_product_attention_backward(np64(g), np64(q), np64(k), np64(v),
                                                        **r_opts)
    S, E = k.shape[-2], q.shape[-1]
    assert out.shape == t_out.shape and out.dtype == q.dtype
    assert_close(out, r_out, dtype, reduction=S, tf32=TF32, name="forward vs reference")
    assert_close(out, t_out, dtype, reduction=S, tf32=TF32, name="forward vs torch")
    for name, ours, theirs, r in zip("qkv", grads, t_grads, r_grads):
        red = S * E if name == "q" else q.shape[-2] * max(E, v.shape[-1])
        assert_close(ours, r, dtype, reduction=red, tf32=TF32, name=f"d{name} vs reference")
        assert_close(ours, theirs, dtype, reduction=red, tf32=TF32, name=f"d{name} vs torch")


def qkv(B, H, HKV, L, S, E, EV=None, dtype=torch.float32):
    return (random_tensor((B, H, L, E), dtype, DEVICE),
            random_tensor((B, HKV, S, E), dtype, DEVICE),
            random_tensor((B, HKV, S, EV or E), dtype, DEVICE))


# (B, Hq, Hkv, L, S, E, Ev)
SHAPES = {
    "odd_lengths": (2, 2, 2, 37, 29, 24, 24),
    "single_query": (1, 1, 1, 1, 19, 16, 16),
    "long_keys": (1, 2, 2, 9, 70, 16, 16),
    "head_dim_80": (1, 2, 2, 20, 18, 80, 80),
    "value_dim_differs": (1, 1, 1, 17, 23, 32, 16),
}


@backends
@dtypes
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_attention(backend, dtype, shape, causal):
    B, H, HKV, L, S, E, EV = SHAPES[shape]
    check_attention(*qkv(B, H, HKV, L, S, E, EV, dtype), backend, dtype, is_causal=causal)


@backends
@pytest.mark.parametrize("L,S", [(40, 17), (17, 40), (33, 33)])
def test_causal_top_left_alignment_when_lengths_differ(backend, L, S):
    check_attention(*qkv(1, 2, 2, L, S, 16), backend, torch.float32, is_causal=True)


@backends
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("mask_shape", [(19, 23), (1, 1, 19, 23), (2, 1, 19, 23), (2, 3, 19, 23),
                                        (1, 3, 19, 23), (19, 1)])
def test_masks_broadcast(backend, kind, mask_shape):
    q, k, v = qkv(2, 3, 3, 19, 23, 16)
    if kind == "bool":
        mask = torch.rand(mask_shape, device=DEVICE) > 0.3
        mask[..., 0] = True   # a live key in every row (fully masked rows: their own test)
    else:
        mask = random_tensor(mask_shape, torch.float32, DEVICE)
    check_attention(q, k, v, backend, torch.float32, attn_mask=mask)


@backends
def test_fully_masked_rows_give_zeros_like_torch(backend):
    q, k, v = qkv(1, 2, 2, 9, 12, 16)
    mask = torch.rand(1, 2, 9, 12, device=DEVICE) > 0.4
    mask[0, 0, 3] = False
    mask[0, 1, :2] = False
    check_attention(q, k, v, backend, torch.float32, attn_mask=mask)


@backends
@pytest.mark.parametrize("heads", [(4, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_grouped_query_attention(backend, heads, causal):
    H, HKV = heads
    check_attention(*qkv(2, H, HKV, 21, 18, 16), backend, torch.float32, enable_gqa=True,
                    is_causal=causal)


@backends
def test_scale_and_lecture_fixture(backend):
    # d_model 512 with 8 heads of 64: the default scale is 1/sqrt(64) = 1/8
    q, k, v = qkv(1, 8, 8, 5, 6, 64)
    default = pydl.scaled_dot_product_attention(q, k, v, backend=backend)
    assert_close(default, pydl.scaled_dot_product_attention(q, k, v, scale=0.125, backend=backend),
                 torch.float32)
    check_attention(q, k, v, backend, torch.float32, scale=0.3)


@backends
@pytest.mark.parametrize("layout", ["3d", "2d", "transposed"])
def test_layouts(backend, layout):
    if layout == "3d":
        q, k, v = (t[0] for t in qkv(1, 3, 3, 11, 13, 16))
    elif layout == "2d":
        q, k, v = (t[0, 0] for t in qkv(1, 1, 1, 11, 13, 16))
    else:  # (B, L, H, E) memory viewed as (B, H, L, E), as multi-head projections produce
        q, k, v = (random_tensor((2, n, 3, 16), torch.float32, DEVICE).transpose(1, 2)
                   for n in (11, 13, 13))
    check_attention(q, k, v, backend, torch.float32, is_causal=True)


@backends
@settings(max_examples=12, deadline=None)
@given(L=st.integers(1, 40), S=st.integers(1, 40), E=st.sampled_from([16, 24, 32]),
       causal=st.booleans(), group=st.sampled_from([1, 2]))
def test_fuzz(backend, L, S, E, causal, group):
    check_attention(*qkv(1, 2 * group, 2, L, S, E), backend, torch.float32, is_causal=causal,
                    enable_gqa=group > 1)


# --- gradient of a float mask (a learned bias: ALiBi, T5 relative positions) ---------------

MASK_GRAD_VARIANTS = [("triton", None), ("triton", "naive"), ("numba", None)]
mask_grad_variants = pytest.mark.parametrize("backend,algo", MASK_GRAD_VARIANTS,
                                             ids=["triton-flash", "triton-naive", "numba"])


def _mask_reference(q, k, v, mask, scale=None, keep=None, p=0.0):
    """float64 torch autograd of softmax(q k^T * scale + mask) (dropped by `keep`) @ v, with the
    gradient flowing to the mask: the definition the kernels must match."""
    q, k, v, mask = (t.detach().double().requires_grad_() for t in (q, k, v, mask))
    G = q.shape[1] // k.shape[1]
    kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    probs = torch.softmax(q @ kk.transpose(-1, -2) * (scale or 1 / math.sqrt(q.shape[-1])) + mask,
                          -1)
    if keep is not None:
        probs = probs * keep / (1 - p)
    return probs @ vv, (q, k, v, mask)


@mask_grad_variants
@pytest.mark.parametrize("mask_shape", [(19, 23), (3, 19, 23), (1, 3, 1, 23), (2, 1, 19, 23),
                                        (2, 3, 19, 23), (19, 1)])
def test_float_mask_gets_its_gradient(backend, algo, mask_shape):
    """A float attn_mask that requires grad trains: its gradient is dS summed over the mask's
    broadcast dims (torch's; before, the kernels returned None)."""
    q, k, v = qkv(2, 3, 3, 19, 23, 16)
    mask = random_tensor(mask_shape, torch.float32, DEVICE)
    fn = lambda q, k, v, m: pydl.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=m, backend=backend, algo=algo)
    out, g, grads = run_with_grad(fn, [q, k, v, mask])
    r_out, leaves = _mask_reference(q, k, v, mask)
    r_out.backward(g.double())
    # torch's CUDA SDPA refuses a mask whose last dim is not contiguous (the (19, 1) case's
    # stride-0 broadcast): it gets a contiguous copy, whose gradient is the same
    _, _, t_grads = run_with_grad(
        lambda q, k, v, m: F.scaled_dot_product_attention(
            q, k, v, attn_mask=m.expand(19, 23).contiguous() if m.shape == (19, 1) else m),
        [q, k, v, mask], g)
    assert grads[3] is not None and grads[3].shape == mask.shape
    red = 19 * 23 * 16
    assert_close(out, r_out, torch.float32, reduction=23, tf32=TF32, name="forward")
    for name, ours, leaf, theirs in zip(("q", "k", "v", "mask"), grads, leaves, t_grads):
        assert_close(ours, leaf.grad, torch.float32, reduction=red, tf32=TF32,
                     name=f"d{name} vs reference")
        assert_close(ours, theirs, torch.float32, reduction=red, tf32=TF32,
                     name=f"d{name} vs torch")


@mask_grad_variants
def test_float_mask_gradient_with_gqa_fp32_mask_and_masked_keys(backend, algo):
    """Grouped-query heads, a float32 mask on float16 inputs (the gradient takes the mask's
    dtype; the other way round torch refuses), -inf entries (their gradient is 0) and a fully
    masked row (0, as its output)."""
    q, k, v = qkv(1, 4, 2, 13, 17, 16, dtype=torch.float16)
    mask = random_tensor((4, 13, 17), torch.float32, DEVICE)
    mask[:, :, 5] = float("-inf")
    mask[1, 7] = float("-inf")
    fn = lambda q, k, v, m: pydl.scaled_dot_product_attention(  # noqa: E731
        q, k, v, attn_mask=m, enable_gqa=True, backend=backend, algo=algo)
    out, g, grads = run_with_grad(fn, [q, k, v, mask])
    r_out, leaves = _mask_reference(q, k, v, mask)
    r_out.backward(g.double())
    r_mask_grad = torch.nan_to_num(leaves[3].grad)      # fully masked row: 0, as pydl and torch
    assert grads[3].dtype == torch.float32
    assert torch.all(grads[3][:, :, 5] == 0) and torch.all(grads[3][1, 7] == 0)
    assert_close(grads[3], r_mask_grad, torch.float16, reduction=16, name="dmask")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_gradient_with_dropout(backend):
    p = 0.3
    q, k, v = qkv(2, 2, 2, 17, 21, 16)
    mask = random_tensor((2, 17, 21), torch.float32, DEVICE)
    torch.manual_seed(1234)
    out, g, grads = run_with_grad(lambda q, k, v, m: pydl.scaled_dot_product_attention(
        q, k, v, attn_mask=m, dropout_p=p, backend=backend), [q, k, v, mask])
    torch.manual_seed(1234)
    seed = _attention_seed.dropout_seed()
    keep = attention.LAUNCHERS[backend].dropout_mask(2, 2, 17, 21, p, seed, q.device)
    r_out, leaves = _mask_reference(q, k, v, mask, keep=keep, p=p)
    r_out.backward(g.double())
    assert_close(out, r_out, torch.float32, reduction=21, name="forward")
    assert_close(grads[3], leaves[3].grad, torch.float32, reduction=17 * 21 * 16, name="dmask")


# --- the naive variant (materialised scores) -----------------------------------------------

@pytest.mark.parametrize("case", ["odd_causal", "gqa_causal", "bool_mask_with_empty_row",
                                  "float_mask", "fp16"])
def test_naive_variant(case):
    dtype = torch.float16 if case == "fp16" else torch.float32
    q, k, v = qkv(2, 4, 2 if case.startswith("gqa") else 4, 19, 23, 24, 16, dtype)
    opts = dict(enable_gqa=True) if case.startswith("gqa") else {}
    if "causal" in case:
        opts["is_causal"] = True
    if case == "bool_mask_with_empty_row":
        mask = torch.rand(2, 1, 19, 23, device=DEVICE) > 0.3
        mask[1, 0, 4] = False
        opts["attn_mask"] = mask
    if case == "float_mask":
        opts["attn_mask"] = random_tensor((19, 23), torch.float32, DEVICE)
    check_attention(q, k, v, "triton", dtype, algo="naive", **opts)


# --- dropout --------------------------------------------------------------------------------

def _dropout_reference(q, k, v, keep, p, **opts):
    """Attention with an explicit keep mask, in float64 torch autograd (the same math)."""
    q, k, v = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = q @ k.transpose(-1, -2) * (opts.get("scale") or 1 / math.sqrt(q.shape[-1]))
    if opts.get("is_causal"):
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(),
                          float("-inf"))
    probs = torch.softmax(s, -1) * keep / (1 - p)
    return probs @ v, (q, k, v)


@backends
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_matches_its_mask_forward_and_backward(backend, causal):
    p = 0.3
    q, k, v = qkv(2, 2, 2, 17, 21, 16)
    torch.manual_seed(1234)
    out, g, grads = run_with_grad(
        lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal,
                                                          backend=backend), [q, k, v])
    torch.manual_seed(1234)
    seed = _attention_seed.dropout_seed()
    keep = attention.LAUNCHERS[backend].dropout_mask(2, 2, 17, 21, p, seed, q.device)
    r_out, leaves = _dropout_reference(q, k, v, keep, p, is_causal=causal)
    r_out.backward(g.double())
    assert_close(out, r_out, torch.float32, reduction=21, name="forward")
    for name, ours, leaf in zip("qkv", grads, leaves):
        assert_close(ours, leaf.grad, torch.float32, reduction=21 * 16, name=f"d{name}")


def _fake_capture(monkeypatch, on: bool):
    """CUDA graph capture on or off as pydl sees it (graphs need a GPU): where a call's dropout
    seed is drawn (pydl/_attention_seed.py) and where a call decides whether to keep its plan
    (pydl/attention.py)."""
    for module in (_attention_seed, attention):
        monkeypatch.setattr(module, "capturing", lambda: on)


@pytest.mark.parametrize("how", ["weights", "broadcast"])
def test_numba_kernel_ops_dropout_is_the_same_inside_graph_capture(how, monkeypatch):
    """The numba backend's kernel ops (inputs that broadcast: one key/value head for two
    query heads) and its attention weights draw their dropout seed on the device whether or
    not a CUDA graph is being captured (the capture state faked: graphs need a GPU): inside
    capture they run, and drop what they drop outside it for the same generator state."""
    from pydl.attention import attention_with_weights
    q, k, v = qkv(1, 2, 2, 5, 6, 8)

    def run():
        torch.manual_seed(5)
        if how == "weights":
            return attention_with_weights(q, k, v, dropout_p=0.4, backend="numba")
        return (pydl.scaled_dot_product_attention(q, k[:, :1], v[:, :1], dropout_p=0.4,
                                                  backend="numba"),)
    outside = run()
    _fake_capture(monkeypatch, True)
    inside = run()
    for a, b in zip(outside, inside):
        assert torch.equal(a, b)
    if how == "weights":        # some dropped, some kept
        assert (outside[1] == 0).any() and (outside[1] != 0).any()
    else:                       # not the output without dropout
        plain = pydl.scaled_dot_product_attention(q, k[:, :1], v[:, :1], backend="numba")
        assert not torch.allclose(outside[0], plain)


@pytest.mark.parametrize("case", ["flash", "flash-causal", "naive", "broadcast",
                                  "numba-flash", "numba-flash-causal"])
def test_dropout_inside_graph_capture_reads_a_device_seed(case, monkeypatch):
    """Inside CUDA graph capture the flash kernels of either backend take a seed the device
    draws (torch's generator, which each replay advances) and read it from memory: the same
    keep pattern as the host seed of that value, forward and backward, on the flash kernels'
    planned path, the naive algo and the custom-op path (inputs that broadcast; Triton's);
    the capture state faked: CUDA graphs need a GPU, the tensor seed is what the kernels see
    there. A backward captured for a host seed (the eager plan's outside capture) refuses;
    the Triton kernel op's seed is on the device outside capture too, so its backward runs."""
    p, causal = 0.3, case.endswith("causal")
    backend = "numba" if case.startswith("numba") else "triton"
    q, k, v = qkv(2, 2, 2, 17, 21, 16)
    opts = dict(dropout_p=p, is_causal=causal, backend=backend,
                algo="naive" if case == "naive" else None)
    _fake_capture(monkeypatch, True)
    torch.manual_seed(99)
    if case == "broadcast":     # one key/value head for both query heads: the op path
        k, v = k[:, :1], v[:, :1]
    out, g, grads = run_with_grad(
        lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, **opts), [q, k, v])
    torch.manual_seed(99)
    seed = int(torch.randint(0, 2 ** 31 - 1, (1,), dtype=torch.int32, device=q.device))
    keep = attention.LAUNCHERS[backend].dropout_mask(2, 2, 17, 21, p, seed, q.device)
    r_out, leaves = _dropout_reference(q, k.expand(2, 2, 21, 16), v.expand(2, 2, 21, 16), keep,
                                       p, is_causal=causal)
    r_out.backward(g.double())
    assert_close(out, r_out, torch.float32, reduction=21, name="forward")
    for name, ours, leaf in zip("qkv", grads, leaves):
        theirs = leaf.grad.sum(1, keepdim=True) if ours.shape[1] == 1 else leaf.grad
        assert_close(ours, theirs, torch.float32, reduction=21 * 16, name=f"d{name}")
    _fake_capture(monkeypatch, False)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = pydl.scaled_dot_product_attention(*leaves, dropout_p=p, backend=backend)
    _fake_capture(monkeypatch, True)
    if case == "broadcast":     # the kernel op's seed is a device tensor even outside capture
        out.sum().backward()
        assert all(t.grad is not None for t in leaves)
        return
    with pytest.raises(RuntimeError, match="dropout.*graph capture"):
        out.sum().backward()


@backends
def test_dropout_is_reproducible_and_has_the_right_rate(backend):
    p = 0.25
    q, k, v = qkv(1, 2, 2, 20, 24, 16)
    torch.manual_seed(7)
    a = pydl.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    torch.manual_seed(7)
    b = pydl.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    c = pydl.scaled_dot_product_attention(q, k, v, dropout_p=p, backend=backend)
    assert torch.equal(a, b), "same seed, different dropout"
    assert not torch.equal(a, c), "a new draw gave the same dropout mask"
    keep = attention.LAUNCHERS[backend].dropout_mask(2, 2, 64, 64, p, 99, q.device)
    rate = 1 - keep.float().mean().item()
    # 16384 Bernoulli(0.25) draws: standard deviation ~0.0034
    assert abs(rate - p) < 0.015, f"dropped fraction {rate:.4f}, expected {p}"
    # and independent across (batch, head) planes
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])


@triton.jit
def _keep_at(keep_ptr, qi_ptr, kj_ptr, S, seed, p, DROPOUT: tl.constexpr, N: tl.constexpr):
    """The Triton kernels' dropout decision for N (query, key) index pairs of plane 0."""
    i = tl.arange(0, N)
    keep = kt._dropout_keep(seed, 0, tl.load(qi_ptr + i), tl.load(kj_ptr + i), S, p, DROPOUT)
    tl.store(keep_ptr + i, keep.to(tl.int8))


def test_triton_dropout_counters_do_not_wrap_on_planes_of_2_to_the_32_scores():
    """Row 65536 of a plane with S = 65537 keys starts at score 2**32 + 65536: a 32-bit counter
    wraps there onto row 1's pattern (shifted by one key); the 64-bit counters the host chooses
    for such planes do not, and below 2**32 both widths draw the same bits."""
    S, N, p = 65537, 256, 0.5
    j = torch.arange(1, N + 1, dtype=torch.int32, device=DEVICE)

    def keep(qi, kj, kind):
        out = torch.empty(N, dtype=torch.int8, device=DEVICE)
        _keep_at[(1,)](out, torch.full_like(kj, qi), kj, S, 1234, p, DROPOUT=kind, N=N)
        return out

    assert _attention_triton._dropout_kind(p, 65536, S) == kt.DROPOUT_64
    assert _attention_triton._dropout_kind(p, 65535, 65537) == kt.DROPOUT_32
    assert _attention_triton._dropout_kind(0.0, 65536, S) == kt.DROPOUT_OFF
    assert torch.equal(keep(65536, j, kt.DROPOUT_32), keep(1, j - 1, kt.DROPOUT_32)), \
        "the 32-bit counter no longer wraps: this test lost its witness"
    assert not torch.equal(keep(65536, j, kt.DROPOUT_64), keep(1, j - 1, kt.DROPOUT_64))
    for qi in (0, 1, 65534):       # row 65534 ends just below 2**32
        assert torch.equal(keep(qi, j, kt.DROPOUT_64), keep(qi, j, kt.DROPOUT_32))


@pytest.mark.skipif(DEVICE != "cpu", reason="records the interpreter's launches, not run")
def test_triton_dropout_on_a_plane_of_2_to_the_32_scores_launches_64_bit_counters(monkeypatch):
    from triton.runtime.interpreter import InterpretedFunction
    seen = {}
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *args, grid, warmup=False,
                        **kw: seen.setdefault(self.fn.__name__, kw.get("DROPOUT")))
    q = torch.zeros(1, 1, 65536, 16, dtype=torch.float16, requires_grad=True)
    out = pydl.scaled_dot_product_attention(q, q, q, dropout_p=0.1, backend="triton")
    out.backward(torch.ones_like(out))
    assert {n: seen[n] for n in ("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq")} \
        == dict.fromkeys(("attention_fwd", "attention_bwd_dkdv", "attention_bwd_dq"),
                         kt.DROPOUT_64), seen



@backends
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_of_one_drops_everything_as_torch(backend, causal):
    """dropout_p=1: torch's math backend drops every probability (zeros out, zero gradients);
    the kernels' keep test never passes and the 1 / (1 - p) scale is never applied."""
    q, k, v = qkv(1, 2, 2, 9, 11, 16)
    out, g, grads = run_with_grad(
        lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, dropout_p=1.0, is_causal=causal,
                                                          backend=backend), [q, k, v])
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.MATH):     # the definition (its CUDA backends may differ)
        r_out, r_grads = run_with_grad(
            lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=1.0, is_causal=causal), [q, k, v], g)[::2]
    assert torch.equal(r_out, torch.zeros_like(r_out))      # what torch does, checked here
    assert torch.equal(out, torch.zeros_like(out))
    for name, ours, theirs in zip("qkv", grads, r_grads):
        assert torch.equal(ours, torch.zeros_like(ours)), f"d{name}"
        assert torch.equal(theirs, torch.zeros_like(theirs)), f"torch's d{name}"

# --- broadcasting, as torch's math backend ----------------------------------------------------

BROADCAST = {   # name: (query, key (value alike) or (key, value), mask or None, enable_gqa)
    "kv_batch1": ((2, 2, 5, 8), (1, 2, 6, 8), None, False),
    "q_batch1": ((1, 2, 5, 8), (3, 2, 6, 8), (5, 6), False),
    "kv_one_head": ((2, 3, 5, 8), (2, 1, 6, 8), None, False),
    "q_one_head": ((2, 1, 5, 8), (2, 3, 6, 8), (2, 1, 1, 6), False),
    "3d_q_4d_kv": ((2, 5, 8), (3, 2, 6, 8), None, False),
    "5d": ((2, 2, 2, 5, 8), (2, 2, 2, 6, 8), (1, 2, 1, 5, 6), False),
    "5d_q_4d_kv": ((3, 2, 2, 5, 8), (2, 2, 6, 8), None, False),
    "gqa_kv_batch1": ((2, 4, 5, 8), (1, 2, 6, 8), (4, 5, 6), True),
    # key and value heads broadcast against each other (pydl refused these)
    "k_one_head_v_two": ((2, 2, 5, 8), ((2, 1, 6, 8), (2, 2, 6, 4)), None, False),
    "v_one_head_k_three": ((1, 3, 5, 8), ((1, 3, 6, 8), (1, 1, 6, 8)), (5, 6), False),
    "gqa_k_one_head_v_two": ((2, 4, 5, 8), ((2, 1, 6, 8), (2, 2, 6, 8)), None, True),
}


@pytest.mark.parametrize("backend,algo", [("triton", "flash"), ("triton", "naive"),
                                          ("numba", "flash")])
@pytest.mark.parametrize("case", BROADCAST)
def test_broadcast_inputs_match_torch(case, backend, algo):
    """Batch and head dims broadcast as in torch's math backend (shared keys, one key/value
    head without enable_gqa, 3-D against 4-D, 5-D): the output's shape and values and every
    input's gradient (summed over its broadcast dims), a float mask's too."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q_shape, kv_shape, mask_shape, gqa = BROADCAST[case]
    k_shape, v_shape = kv_shape if isinstance(kv_shape[0], tuple) else (kv_shape, kv_shape)
    q = random_tensor(q_shape, torch.float32, DEVICE)
    k = random_tensor(k_shape, torch.float32, DEVICE)
    v = random_tensor(v_shape, torch.float32, DEVICE)
    inputs = [q, k, v] + ([random_tensor(mask_shape, torch.float32, DEVICE)] if mask_shape
                          else [])

    def run(be, *ts):
        mask = ts[3] if len(ts) > 3 else None
        if be == "torch":
            with sdpa_kernel(SDPBackend.MATH):
                return torch.nn.functional.scaled_dot_product_attention(
                    *ts[:3], attn_mask=mask, enable_gqa=gqa)
        return pydl.scaled_dot_product_attention(*ts[:3], attn_mask=mask, enable_gqa=gqa,
                                                 backend=be, algo=algo)
    out, g, grads = run_with_grad(lambda *ts: run(backend, *ts), inputs)
    want, _, want_grads = run_with_grad(lambda *ts: run("torch", *[t.double() for t in ts]),
                                        inputs, g.double())
    assert out.shape == want.shape
    assert_close(out, want, torch.float32, reduction=k_shape[-2] * 8, tf32=TF32, name="out")
    for name, got, exp in zip("qkvm", grads, want_grads):
        assert got.shape == exp.shape, name
        assert_close(got, exp, torch.float32, reduction=4 * k_shape[-2] * 8, tf32=TF32,
                     name=f"d{name}")


@backends
def test_mask_dtype_as_torch(backend):
    """A float mask must be float32 or the query's dtype, as torch requires (pydl read a
    float16 mask against float32 inputs); under autocast the mask is cast with the inputs,
    as torch's autocast casts it (a float64 mask, which autocast leaves, raises there too)."""
    q, k, v = qkv(1, 2, 2, 5, 6, 8)
    mask = random_tensor((5, 6), torch.float32, DEVICE)
    sdpa = functools.partial(pydl.scaled_dot_product_attention, backend=backend)
    for dtype in (torch.float16, torch.float64):
        with pytest.raises(TypeError, match="attn_mask must be bool, float32 or of the query"):
            sdpa(q, k, v, attn_mask=mask.to(dtype))
    half = sdpa(q.half(), k.half(), v.half(), attn_mask=mask)       # float32 with float16
    assert half.dtype == torch.float16
    with torch.autocast(DEVICE, dtype=torch.float16):
        assert sdpa(q, k, v, attn_mask=mask.half()).dtype == torch.float16
        with pytest.raises(TypeError, match="attn_mask must be bool, float32 or of the query"):
            sdpa(q, k, v, attn_mask=mask.double())


# --- bad input ------------------------------------------------------------------------------

@backends
def test_bad_input(backend):
    q, k, v = qkv(2, 4, 2, 5, 6, 16)
    sdpa = lambda *a, **kw: pydl.scaled_dot_product_attention(*a, backend=backend, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, k, v)
    with pytest.raises(ValueError, match="divisible"):
        sdpa(q[:, :3], k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="head dim"):
        sdpa(q, k[..., :8], v, enable_gqa=True)
    with pytest.raises(ValueError, match="sequence length"):
        sdpa(q, k, v[:, :, :5], enable_gqa=True)
    with pytest.raises(ValueError, match="batch dims .* do not broadcast"):
        sdpa(torch.cat([q, q[:1]]), k, v, enable_gqa=True)
    with pytest.raises(ValueError, match="does not broadcast"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool, device=DEVICE), enable_gqa=True)
    with pytest.raises(ValueError, match="is_causal"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.bool, device=DEVICE), is_causal=True,
             enable_gqa=True)
    with pytest.raises(ValueError, match="more than the query"):     # as torch
        sdpa(q[0], k[0], v[0], attn_mask=torch.ones(1, 4, 5, 6, dtype=torch.bool, device=DEVICE),
             enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        sdpa(q, k, v, dropout_p=1.5, enable_gqa=True)
    with pytest.raises(TypeError, match="one dtype"):
        sdpa(q, k.half(), v, enable_gqa=True)
    with pytest.raises(TypeError, match="bool, float32 or of the query"):
        sdpa(q, k, v, attn_mask=torch.ones(5, 6, dtype=torch.int32, device=DEVICE), enable_gqa=True)


@pytest.mark.gpu
@pytest.mark.full
def test_attention_beyond_int32_offsets():
    """A (B, H, L, E) tensor past 2**31 elements: offsets must be computed in int64."""
    q = torch.randn(1, 4100, 4096, 128, device="cuda", dtype=torch.bfloat16)
    out = pydl.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert_close(out[:, -1:],
                 F.scaled_dot_product_attention(q[:, -1:], q[:, -1:], q[:, -1:], is_causal=True),
                 torch.bfloat16, reduction=4096)


# --- nn.MultiheadAttention ------------------------------------------------------------------

@pytest.mark.parametrize("backend,need_weights", [("triton", False), ("triton", True),
                                                  ("numba", True)],
                         ids=["flash", "weights", "numba-weights"])
@pytest.mark.parametrize("config", ["plain", "batch_first_kpm", "kdim_vdim_bool_mask", "float_mask",
                                    "unbatched", "bias_kv_kpm_mask", "zero_attn_float_mask",
                                    "bias_kv_zero_attn_unbatched"])
def test_multihead_attention_is_drop_in(config, backend, need_weights):
    """torch.nn.MultiheadAttention's outputs, weights (need_weights=True: the triton backend's
    materialising kernels; on numba the flash output and a weights kernel of its own) and
    parameter gradients."""
    E, H, N, L, S = 32, 4, 2, 7, 9
    kw = dict(batch_first=config == "batch_first_kpm")
    if config == "kdim_vdim_bool_mask":
        kw.update(kdim=24, vdim=20)
    if "bias_kv" in config:
        kw.update(add_bias_kv=True)
    if "zero_attn" in config:
        kw.update(add_zero_attn=True, kdim=24)
    theirs = torch.nn.MultiheadAttention(E, H, **kw).to(DEVICE)
    ours = pydl.nn.MultiheadAttention(E, H, device=DEVICE, backend=backend, **kw)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    shape = (lambda n: (N, n, E)) if kw["batch_first"] else (lambda n: (n, N, E))
    q = random_tensor(shape(L), torch.float32, DEVICE)
    k = random_tensor(shape(S)[:-1] + (kw.get("kdim", E),), torch.float32, DEVICE)
    v = random_tensor(shape(S)[:-1] + (kw.get("vdim", E),), torch.float32, DEVICE)
    opts = dict(need_weights=need_weights)
    if config in ("batch_first_kpm", "bias_kv_kpm_mask"):
        kpm = torch.zeros(N, S, dtype=torch.bool, device=DEVICE)
        kpm[0, -3:] = True
        if config == "bias_kv_kpm_mask":
            kpm[1] = True       # a sequence with every given key masked: the bias key remains
        opts["key_padding_mask"] = kpm
    if config in ("kdim_vdim_bool_mask", "bias_kv_kpm_mask"):
        opts["attn_mask"] = torch.rand(L, S, device=DEVICE) > 0.7   # True = do not attend
        opts["attn_mask"][:, 0] = False
    if config in ("float_mask", "zero_attn_float_mask"):
        opts["attn_mask"] = random_tensor((N * H, L, S), torch.float32, DEVICE)
    if "unbatched" in config:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    out, w = ours(q, k, v, **opts)
    t_out, t_w = theirs(q, k, v, **opts)
    assert_close(out, t_out, torch.float32, reduction=S * E, tf32=TF32, name="output")
    if need_weights:
        assert_close(w, t_w, torch.float32, reduction=S, tf32=TF32, name="weights")
    else:
        assert w is None and t_w is None
    g = random_tensor(out.shape, torch.float32, DEVICE)
    out.backward(g)
    t_out.backward(g)
    for (name, p), tp in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, tp.grad, torch.float32, reduction=N * L * S, tf32=TF32, name=name)


@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_checks_its_inputs(batch_first):
    """What torch.nn.MultiheadAttention refuses, pydl's refuses, with the shapes in the
    message: ranks, masks of another dtype than bool or the query's, mask shapes."""
    ours = pydl.nn.MultiheadAttention(4, 2, batch_first=batch_first, device=DEVICE)
    theirs = torch.nn.MultiheadAttention(4, 2, batch_first=batch_first).to(DEVICE)
    N, L, S = 2, 3, 5
    q = random_tensor((N, L, 4) if batch_first else (L, N, 4), torch.float32, DEVICE)
    kv = random_tensor((N, S, 4) if batch_first else (S, N, 4), torch.float32, DEVICE)
    one = (lambda t: t[0]) if batch_first else (lambda t: t[:, 0])      # unbatched
    batch1 = (lambda t: t[:1]) if batch_first else (lambda t: t[:, :1])     # a batch of 1
    shorter = (lambda t: t[:, :-1]) if batch_first else (lambda t: t[:-1])  # one key less
    ours(q, kv, kv, attn_mask=torch.zeros(N * 2, L, S, device=DEVICE))  # the shapes it takes
    bool_mask = functools.partial(torch.zeros, dtype=torch.bool, device=DEVICE)
    cases = [   # (message, query, key, value, masks)
        ("query must be unbatched 2-D", q[None], kv[None], kv[None], {}),
        ("key must be 3-D", q, one(kv), one(kv), {}),
        ("key_padding_mask must be bool", q, kv, kv,
         dict(key_padding_mask=torch.zeros(N, S, dtype=torch.long, device=DEVICE))),
        ("attn_mask must be bool", q, kv, kv,
         dict(attn_mask=torch.zeros(L, S, dtype=torch.float64, device=DEVICE))),
        (r"key_padding_mask must be \(N, S\)", q, kv, kv, dict(key_padding_mask=bool_mask(S))),
        (r"key_padding_mask must be \(S,\)", one(q), one(kv), one(kv),
         dict(key_padding_mask=bool_mask(1, S))),
        (r"key_padding_mask must be \(N, S\) = \(2, 5\)", q, kv, kv,    # was a view's error
         dict(key_padding_mask=bool_mask(N, S - 1))),
        (r"attn_mask must be \(L, S\) = \(3, 5\) or \(N \* num_heads, L, S\) = \(4, 3, 5\)",
         q, kv, kv, dict(attn_mask=torch.zeros(3, L, S, device=DEVICE))),
        # batches that would broadcast in the attention: pydl returned a wrong-shaped output
        ("key has batch size 1 but the query has 2", q, batch1(kv), batch1(kv), {}),
        ("value has batch size 1 but the query has 2", q, kv, batch1(kv), {}),
        ("key and value must have one sequence length", q, kv, shorter(kv), {}),
    ]
    for message, query, key, value, masks in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            ours(query, key, value, **masks)
        with pytest.raises((AssertionError, RuntimeError)):        # torch refuses each too
            theirs(query, key, value, **masks)


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("case", ["causal", "gqa_bool_mask"])
def test_attention_weights_under_dropout_are_the_dropped_ones(backend, case):
    """With dropout_p, attention_with_weights returns torch's MultiheadAttention pair: the
    dropped weights P * keep / (1 - p) and their product with v, the keep pattern the flash
    kernels draw for the seed (so the two algos drop the same scores), against float64;
    gradients through the output and the weights."""
    from pydl.attention import attention_with_weights
    p, B, H, L, S, E = 0.3, 2, 4, 6, 9, 8
    HKV = 2 if case.startswith("gqa") else H
    q = random_tensor((B, H, L, E), torch.float32, DEVICE)
    k = random_tensor((B, HKV, S, E), torch.float32, DEVICE)
    v = random_tensor((B, HKV, S, E), torch.float32, DEVICE)
    opts = dict(is_causal=True) if case == "causal" else dict(enable_gqa=True)
    vis = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril()
    if case.endswith("bool_mask"):
        vis = torch.rand(L, S, device=DEVICE) > 0.3
        vis[:, 0], vis[2] = True, False          # row 2: nothing visible, all-zero weights
        opts["attn_mask"] = vis
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(11)
    out, w = attention_with_weights(*leaves, dropout_p=p, backend=backend, **opts)
    torch.manual_seed(11)
    seed = _attention_seed.dropout_seed()
    keep = attention.LAUNCHERS[backend].dropout_mask(B, H, L, S, p, seed, q.device)
    r = [t.detach().double().requires_grad_() for t in (q, k, v)]
    kk, vv = (t.repeat_interleave(H // HKV, 1) for t in r[1:])
    scores = (r[0] @ kk.transpose(-1, -2) / math.sqrt(E)).masked_fill(~vis, float("-inf"))
    r_w = torch.softmax(scores, -1).nan_to_num(0.0) * keep / (1 - p)
    r_out = r_w @ vv
    assert_close(w, r_w, torch.float32, reduction=S, name="weights")
    assert_close(out, r_out, torch.float32, reduction=S, name="output")
    if case.endswith("bool_mask"):
        assert not w[:, :, 2].any(), "a row with no visible key has weights"
    go = random_tensor(out.shape, torch.float32, DEVICE)
    gw = random_tensor(w.shape, torch.float32, DEVICE)
    ((out * go).sum() + (w * gw).sum()).backward()
    ((r_out * go.double()).sum() + (r_w * gw.double()).sum()).backward()
    for name, ours, leaf in zip("qkv", leaves, r):
        assert_close(ours.grad, leaf.grad, torch.float32, reduction=S * E, name=f"d{name}")


@pytest.mark.parametrize("case", ["plain", "causal_gqa", "float_mask"])
def test_naive_dropout_drops_what_flash_drops(case):
    """algo="naive" under dropout: for one seed the same output and gradients as the flash
    kernels (one keep pattern, `_dropout_keep`), forward and backward."""
    B, H, L, S, E = 2, 4, 11, 13, 16
    HKV = 2 if "gqa" in case else H
    q = random_tensor((B, H, L, E), torch.float32, DEVICE)
    k = random_tensor((B, HKV, S, E), torch.float32, DEVICE)
    v = random_tensor((B, HKV, S, E), torch.float32, DEVICE)
    opts = dict(dropout_p=0.4)
    if "causal" in case:
        opts.update(is_causal=True)
    if "gqa" in case:
        opts.update(enable_gqa=True)
    if case == "float_mask":
        opts["attn_mask"] = random_tensor((L, S), torch.float32, DEVICE)
    results = []
    for algo in ("flash", "naive"):
        torch.manual_seed(3)
        fn = functools.partial(pydl.scaled_dot_product_attention, backend="triton", algo=algo,
                               **opts)
        results.append(run_with_grad(fn, [q, k, v], results[0][1] if results else None))
    (out, _, grads), (n_out, _, n_grads) = results
    assert_close(n_out, out, torch.float32, reduction=S, name="output")
    for name, a, b in zip("qkv", n_grads, grads):
        assert_close(a, b, torch.float32, reduction=S * E, name=f"d{name}")


def test_multihead_attention_weights_under_dropout_are_torchs():
    """MultiheadAttention(dropout > 0, need_weights=True) in training returns what torch's
    does: weights with dropped entries, kept ones scaled by 1 / (1 - p), and an output that is
    those weights times the value projection (torch's need_weights path); each backend,
    torch's included. In eval mode no dropout (the drop-in test compares with torch's)."""
    E, H, N, L, S, p = 16, 2, 3, 5, 40, 0.5
    theirs = torch.nn.MultiheadAttention(E, H, dropout=p, batch_first=True).to(DEVICE)
    x = random_tensor((N, L, E), torch.float32, DEVICE)
    kv = random_tensor((N, S, E), torch.float32, DEVICE)
    for backend in ("triton", "numba", "torch"):
        ours = pydl.nn.MultiheadAttention(E, H, dropout=p, batch_first=True, device=DEVICE,
                                          backend=backend)
        ours.load_state_dict(theirs.state_dict())
        out, w = ours(x, kv, kv, average_attn_weights=False)
        ours.eval()
        _, w_eval = ours(x, kv, kv, average_attn_weights=False)
        # the value projection per head, (N, H, S, E / H)
        vp = F.linear(kv, *[t.chunk(3)[2] for t in (ours.in_proj_weight, ours.in_proj_bias)])
        vp = vp.unflatten(-1, (H, -1)).transpose(1, 2)
        expect = ours.out_proj((w @ vp).transpose(1, 2).flatten(2))
        assert_close(out, expect, torch.float32, reduction=S, name=f"{backend}: output")
        dropped = w == 0
        rate = dropped.float().mean().item()
        assert 0.35 < rate < 0.65, f"{backend}: dropped {rate:.3f} of the weights, p = {p}"
        torch.testing.assert_close(w[~dropped], w_eval[~dropped] / (1 - p),
                                   msg=f"{backend}: kept weights are not scaled by 1 / (1 - p)")
        assert w_eval.sum(-1).sub(1).abs().max() < 1e-5


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_attention_weights_are_differentiable(mask_kind):
    """A loss on the weights attention_with_weights returns (nn.MultiheadAttention's
    need_weights=True) reaches q, k (and a float mask) as in torch, alone or beside the
    output's, on each backend; GQA rows; a row with no visible key (zero weights, no
    gradient); fp16 on the numba kernels too."""
    from pydl.attention import attention_with_weights
    B, H, HKV, L, S, E = 2, 4, 2, 5, 7, 8
    q = random_tensor((B, H, L, E), torch.float32, DEVICE)
    k = random_tensor((B, HKV, S, E), torch.float32, DEVICE)
    v = random_tensor((B, HKV, S, E), torch.float32, DEVICE)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(L, S, device=DEVICE) > 0.3
        mask[:, 0] = True
        mask[3] = False
    elif mask_kind == "float":
        mask = random_tensor((L, S), torch.float32, DEVICE)
    go = random_tensor((B, H, L, E), torch.float32, DEVICE)
    gw = random_tensor((B, H, L, S), torch.float32, DEVICE)
    for losses in ("weights", "both"):
        grads = []
        for backend in ("triton", "numba", "torch"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            m = mask.clone().requires_grad_() if mask_kind == "float" else mask
            out, w = attention_with_weights(*leaves, attn_mask=m, enable_gqa=True,
                                            backend=backend)
            loss = (w * gw).sum() + ((out * go).sum() if losses == "both" else 0)
            loss.backward()
            grads.append([t.grad for t in leaves] + ([m.grad] if mask_kind == "float" else []))
        *ours, theirs = grads
        for backend, mine in zip(("triton", "numba"), ours):
            for i, (a, b) in enumerate(zip(mine, theirs)):
                if b is None:          # v: no gradient through the weights alone
                    assert a is None or not a.any(), (backend, i)
                    continue
                if mask_kind == "bool":     # torch's own ops give NaN for the empty row 3
                    b = b.nan_to_num(0.0)
                assert_close(a, b, torch.float32, reduction=S * E, tf32=TF32,
                             name=f"{backend}, {losses}: gradient {i}")
    # the numba kernels in fp16, against the float32 result (weights loss alone)
    leaves = [t.half().requires_grad_() for t in (q, k)]
    half_mask = mask.half() if mask_kind == "float" else mask
    _, w = attention_with_weights(*leaves, v.half(), attn_mask=half_mask, enable_gqa=True,
                                  backend="numba")
    (w.float() * gw).sum().backward()
    leaves32 = [t.clone().requires_grad_() for t in (q, k)]
    _, w32 = attention_with_weights(*leaves32, v, attn_mask=mask, enable_gqa=True,
                                    backend="torch")
    (w32 * gw).sum().backward()
    for a, b in zip(leaves, leaves32):
        assert_close(a.grad, b.grad.nan_to_num(0.0), torch.float16, reduction=S * E,
                     name="numba fp16")


@pytest.fixture
def split_keys(monkeypatch):
    """The split forwards for short test sequences (on a GPU too: _attention_triton.
    forced_split; Triton's attention_fwd_split on 16-key tiles, Numba's at its own tiles);
    recorded: the Triton kernels launched and the Numba split plans built, with their
    splits."""
    from pydl._attention_numba import _NumbaAttention
    launched = []
    spy_kernels(monkeypatch, kt, ("attention_fwd", "attention_fwd_split"),
                lambda name, args, kwargs: launched.append((name, kwargs.get("SPLITS"))))
    plan_split = _NumbaAttention._plan_split

    def recorded(q, k, v, o, lse, mask, options, split):
        launched.append(("numba_split", split[0]))
        return plan_split(q, k, v, o, lse, mask, options, split)
    monkeypatch.setattr(_NumbaAttention, "_plan_split", staticmethod(recorded))
    with _attention_triton.forced_split():
        yield launched


@pytest.mark.parametrize("case", [
    # (B, Hq, Hkv, L, S, E, Ev), options: decoding (one query), a few queries, GQA, causal
    # (top-left: later splits see no key), masks with rows whose keys sit in one split only
    ((2, 2, 2, 1, 70, 16, 16), {}),
    ((1, 3, 3, 5, 83, 24, 16), {}),
    ((1, 4, 2, 2, 64, 32, 32), dict(enable_gqa=True)),
    ((1, 2, 2, 9, 50, 16, 16), dict(is_causal=True)),
    ((1, 2, 2, 3, 47, 16, 16), dict(mask="bool")),
    ((2, 1, 1, 4, 40, 16, 16), dict(mask="float", scale=-0.3)),
], ids=["decode", "few_queries", "gqa", "causal", "bool_mask", "float_mask_negative_scale"])
@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_split_keys_forward(split_keys, case, backend):
    """Few query tiles and many keys: the forward splits the keys over programs and the last
    of each tile's splits combines them (Numba: a combining launch); outputs and the gradients
    (the flash backward on its lse) against torch and the float64 reference, and every
    arrival counter back at zero."""
    (B, H, HKV, L, S, E, EV), opts = case
    q, k, v = qkv(B, H, HKV, L, S, E, EV, torch.float16)
    kind = opts.pop("mask", None)
    if kind == "bool":
        mask = torch.rand(L, S, device=DEVICE) > 0.7
        mask[0] = False
        mask[0, 3] = True                          # row 0: one live key, in the first split
        mask[1] = False                            # row 1: none (zeros, as torch)
        opts["attn_mask"] = mask
    elif kind == "float":
        opts["attn_mask"] = random_tensor((L, S), torch.float16, DEVICE)
    if kind == "bool":      # torch's NaN for the fully masked row is its own test's business
        out = pydl.scaled_dot_product_attention(q, k, v, backend=backend, **opts)
        keep = opts["attn_mask"]
        want = ref.scaled_dot_product_attention(*(t.double().cpu().numpy() for t in (q, k, v)),
                                                attn_mask=keep.cpu().numpy())
        assert_close(out, torch.from_numpy(want).nan_to_num(0.0), torch.float16, reduction=S)
        assert not out[:, :, 1].any()
    else:
        check_attention(q, k, v, backend, torch.float16, **opts)
    assert {n for n, _ in split_keys} == {"attention_fwd_split" if backend == "triton"
                                          else "numba_split"}
    assert all(s >= 2 for _, s in split_keys)
    from pydl import _launch
    assert all(not c.any() for c in _launch._ARRIVALS.values())


@pytest.mark.parametrize("case", [
    # (B, Hq, Hkv, L, S, E, Ev), options: decoding, a few queries (2 and 4 rows a block), GQA,
    # causal, a bool mask, head dims that the parts do not divide (40) or that pad (24)
    ((2, 2, 2, 1, 37, 16, 16), {}),
    ((1, 2, 2, 2, 29, 40, 24), dict(is_causal=True)),
    ((1, 4, 2, 3, 21, 64, 64), dict(enable_gqa=True)),
    ((1, 1, 1, 1, 19, 128, 128), dict(mask="bool")),
], ids=["decode", "causal_two_rows", "gqa_three_rows", "bool_mask_d128"])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split_keys"])
def test_numba_forward_splits_a_score_dot(monkeypatch, case, split):
    """The Numba forward with few owned rows splits each score's dot over several of a row's
    threads (SPLIT_DOT of kernels/numba/attention.py _build_fwd; on a GPU the decoding
    tiles, in the simulator's 32 threads only at d128 unless, as here, the tiles stream
    4 keys): outputs and gradients against torch and float64, unsplit keys and split."""
    from pydl.kernels.numba import attention as kn
    tile_sizes = kn.tile_sizes

    def small_tiles(E, EV, rows=None):
        owned, streamed, BD, BDV = tile_sizes(E, EV, rows)
        return (owned, 4 if rows is not None and owned <= 4 else streamed, BD, BDV)
    monkeypatch.setattr(kn, "tile_sizes", small_tiles)
    (B, H, HKV, L, S, E, EV), opts = case
    q, k, v = qkv(B, H, HKV, L, S, E, EV, torch.float16)
    if opts.pop("mask", None):
        mask = torch.rand(L, S, device=DEVICE) > 0.5
        mask[:, 0] = True
        opts["attn_mask"] = mask
    with _attention_triton.forced_split() if split else contextlib.nullcontext():
        check_attention(q, k, v, "numba", torch.float16, **opts)


def _bf16(*shape):
    return torch.empty(*shape, dtype=torch.bfloat16)


def test_split_keys_only_where_it_pays(monkeypatch):
    """The split forward's choice: not below SPLIT_MIN_KEYS keys, not where the query tiles
    alone fill the GPU, never more than MAX_SPLITS, each split at least SPLIT_MIN_TILES key
    tiles, and no empty split."""
    monkeypatch.setattr(_attention_triton, "SPLIT_MIN_TILES", 4)
    count = _attention_triton.split_count
    monkeypatch.setattr(_attention_triton._launch, "multiprocessors", lambda device: 132)
    monkeypatch.setattr(_attention_triton._env, "INTERPRET", False)
    q = _bf16(2, 32, 1, 128)                   # a decoding step: 64 query tiles
    assert count(q, _bf16(2, 32, 500, 128))[0] == 1           # too few keys
    splits, keys, block_n = count(q, _bf16(2, 32, 8192, 128))
    assert (splits, keys, block_n) == (5, 1664, 64)                 # 320 programs on 132 SMs
    # 8 x 32 heads already make 256 programs (two waves): not split
    assert count(_bf16(8, 32, 1, 128), _bf16(8, 32, 8192, 128))[0] == 1
    splits, keys, _ = count(_bf16(1, 8, 1, 128), _bf16(1, 8, 32768, 128))
    assert (splits, keys) == (32, 1024)          # 33 wanted, 32 after rounding to tiles
    assert count(_bf16(1, 1, 1, 64), _bf16(1, 1, 1 << 20, 64))[0] == 64
    assert count(_bf16(4, 32, 1024, 128), _bf16(4, 32, 8192, 128))[0] == 1
