"""algo="flash_onepass": the flash forward with the single-pass backward (one kernel for dK,
dV and dQ, dQ by fp32 atomics), against the float64 reference and torch, forward and the three
gradients, on the shapes that stress its tile ranges: odd lengths, Lq != Lk with causal
(the diagonal masks), grouped-query heads (several query heads add into one dK/dV), head dims
that are not powers of two, value dim != query dim, strided layouts."""
import pytest
import torch

import pydl
from pydl.testing import random_tensor

from conftest import DEVICE, DTYPES
from test_attention import SHAPES, check_attention, qkv

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
    from pydl.testing import assert_close
    for name, a, b, c in zip("qkv", ours, flash, theirs):
        assert_close(a, c, torch.bfloat16, reduction=2048 * 128, name=f"d{name} vs torch")
        assert_close(a, b, torch.bfloat16, reduction=2048 * 128, name=f"d{name} vs flash")
