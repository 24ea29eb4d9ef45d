"""algo="flash_onepass": the flash forward with the single-pass backward (one kernel for dK,
dV and dQ, dQ by fp32 atomics), against the float64 reference and torch, forward and the three
gradients, on the shapes that stress its tile ranges: odd lengths, Lq != Lk with causal
(the diagonal masks), grouped-query heads (several query heads add into one dK/dV), head dims
that are not powers of two, value dim != query dim, strided layouts."""
import pytest
import torch
from conftest import DEVICE, DTYPES
from test_attention import SHAPES, check_attention, qkv
from test_tune import _each_candidate, _fake_clock, tuning  # noqa: F401  (a fixture)

import pydl
from pydl import attention_onepass
from pydl.testing import assert_close, random_tensor

ALGO = "flash_onepass"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_onepass(dtype, shape, causal):
    B, H, HKV, L, S, E, EV = SHAPES[shape]
    check_attention(*qkv(B, H, HKV, L, S, E, EV, dtype), "triton", dtype, algo=ALGO,
                    is_causal=causal)


@pytest.mark.parametrize("L,S", [(40, 17), (17, 40), (48, 48)])
def test_onepass_causal_lengths_differ(L, S):
    check_attention(*qkv(1, 2, 2, L, S, 16), "triton", torch.float32, algo=ALGO, is_causal=True)


@pytest.mark.parametrize("heads", [(4, 2), (6, 3), (4, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_onepass_grouped_query_heads(heads, causal):
    H, HKV = heads
    check_attention(*qkv(2, H, HKV, 21, 35, 16), "triton", torch.float32, algo=ALGO,
                    enable_gqa=True, is_causal=causal)


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_onepass_zero_head_dim(causal):
    """E = 0 (every score an empty sum): the output and dV as torch's, dQ and dK empty; the
    single pass still gets a (zero-width) dQ accumulator."""
    check_attention(*qkv(2, 2, 2, 9, 7, 0, 12), "triton", torch.float32, algo=ALGO,
                    is_causal=causal)


def test_onepass_projection_layout_and_scale():
    q, k, v = (random_tensor((2, n, 3, 24), torch.float32, DEVICE).transpose(1, 2)
               for n in (19, 33, 33))
    check_attention(q, k, v, "triton", torch.float32, algo=ALGO, is_causal=True, scale=0.3)
    check_attention(q, k, v, "triton", torch.float32, algo=ALGO, scale=-0.3)


def test_onepass_refuses_mask_and_dropout():
    q, k, v = qkv(1, 2, 2, 8, 8, 16)
    sdpa = pydl.scaled_dot_product_attention
    with pytest.raises(NotImplementedError, match="flash_onepass.*attn_mask.*algo='flash'"):
        sdpa(q, k, v, attn_mask=torch.ones(8, 8, dtype=torch.bool, device=DEVICE),
             backend="triton", algo=ALGO)
    with pytest.raises(NotImplementedError, match="flash_onepass.*dropout.*algo='flash'"):
        sdpa(q, k, v, dropout_p=0.2, backend="triton", algo=ALGO)
    with pytest.raises(ValueError, match="not available on the 'numba' backend"):
        sdpa(q, k, v, backend="numba", algo=ALGO)


def test_onepass_is_deterministic_in_deterministic_mode(monkeypatch):
    """Under torch.use_deterministic_algorithms(True) the backward is the flash backward (no
    atomics): the flash algorithm's gradients bit for bit, the single pass never planned;
    with the mode off the same call signature plans and runs the single pass, and on again
    the flash backward (the mode is in the plan's key)."""
    q, k, v = qkv(1, 2, 2, 33, 33, 16)
    g = torch.randn_like(q)

    def grads(algo, deterministic=False):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o = pydl.scaled_dot_product_attention(*leaves, is_causal=True, backend="triton",
                                              algo=algo)
        was, warn_only = (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled())
        torch.use_deterministic_algorithms(deterministic)
        try:
            return torch.autograd.grad(o, leaves, g)
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn_only)

    planned = []
    plan = attention_onepass._backward_run
    monkeypatch.setattr(attention_onepass, "_backward_run",
                        lambda *a: planned.append(1) or plan(*a))
    flash = grads("flash")
    for deterministic, plans in ((True, 0), (False, 1), (True, 1)):
        ours = grads(ALGO, deterministic)
        assert len(planned) == plans, deterministic
        for a, b, name in zip(ours, flash, "qkv"):
            if deterministic:
                assert torch.equal(a, b), name
            else:
                assert_close(a, b, torch.float32, reduction=33 * 16, name=f"d{name}")


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_onepass_sweep_point_matches_flash(causal):
    """FlashAttention's d128 point at 2k, bf16: the gradients of both algos against each other
    and torch's (the float64 reference at this size is too slow)."""
    q, k, v = qkv(2, 8, 8, 2048, 2048, 128, 128, torch.bfloat16)
    check = lambda algo: torch.autograd.grad(  # noqa: E731
        pydl.scaled_dot_product_attention(*leaves, is_causal=causal, backend="triton",
                                          algo=algo), leaves, g)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    g = torch.randn_like(q)
    ours, flash = check(ALGO), check("flash")
    theirs = torch.autograd.grad(torch.nn.functional.scaled_dot_product_attention(
        *leaves, is_causal=causal), leaves, g)
    for name, a, b, c in zip("qkv", ours, flash, theirs):
        assert_close(a, c, torch.bfloat16, reduction=2048 * 128, name=f"d{name} vs torch")
        assert_close(a, b, torch.bfloat16, reduction=2048 * 128, name=f"d{name} vs flash")


def _onepass_grads(q, k, v, g, causal):
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    o = pydl.scaled_dot_product_attention(*leaves, is_causal=causal, backend="triton", algo=ALGO)
    return (o, *torch.autograd.grad(o, leaves, g))


def _reference_grads(q, k, v, g, causal):
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    od = torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=causal)
    return (od, *torch.autograd.grad(od, (qd, kd, vd), g.double()))


@pytest.mark.parametrize("causal", [pytest.param(False, marks=pytest.mark.sim_heavy), True],
                         ids=["noncausal", "causal"])
def test_every_onepass_candidate(tuning, monkeypatch, causal):  # noqa: F811 (fixture)
    """Each tile shape of the single-pass backward's space (the tuner forced to it)."""
    q, k, v, g = (random_tensor((1, 2, 144, 32), torch.float32, DEVICE) for _ in range(4))
    want = _reference_grads(q, k, v, g, causal)

    def check(got, i):
        for out, ref in zip(got, want):
            assert_close(out, ref, torch.float32, reduction=144)
    spaces = _each_candidate(monkeypatch, lambda: _onepass_grads(q, k, v, g, causal), check)
    assert {"attention_fwd", "attention_bwd_onepass"} <= set(spaces)
    assert len(spaces["attention_bwd_onepass"]) > 1


def test_onepass_trials_do_not_add_dq_twice(tuning, monkeypatch):  # noqa: F811 (fixture)
    """Trial launches add into the fp32 dQ accumulator; the tuner restores it after each."""
    trials = []

    def bench(fn, cfg):                     # a clock that really launches, as the device's does
        fn()
        trials.append(cfg)
        return float(len(trials))
    _fake_clock(monkeypatch, lambda cfg: 1.0)      # the other kernels' tuners: not run
    monkeypatch.setattr(attention_onepass.TUNER, "bench", bench)
    q, k, v, g = (random_tensor((1, 2, 70, 16), torch.float32, DEVICE) for _ in range(4))
    got = _onepass_grads(q, k, v, g, False)
    assert len(trials) > 1
    for out, ref in zip(got, _reference_grads(q, k, v, g, False)):
        assert_close(out, ref, torch.float32, reduction=70)
