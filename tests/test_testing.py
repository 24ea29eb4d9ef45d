"""pydl.testing's rule for fp32 ops: which precision an op's products use, and TF32's
tolerance, calibrated on emulated TF32 products (the GPU's first run compared TF32 convolutions
at a tolerance a correct TF32 result exceeds 5-fold)."""
import numpy as np
import pytest
import torch

from pydl.testing import assert_close, deviation, uses_tf32


def _tf32(x: np.ndarray, rounding: str) -> np.ndarray:
    """fp32 values with the 13 low mantissa bits dropped: TF32 as Triton feeds it to the tensor
    cores ("truncate") or as cuDNN converts it ("nearest")."""
    bits = x.astype(np.float32).view(np.int32)
    if rounding == "nearest":
        bits = bits + np.int32(1 << 12)
    return (bits & np.int32(~0x1FFF)).view(np.float32)


def _bf16(x: np.ndarray) -> np.ndarray:
    return torch.from_numpy(x.astype(np.float32)).bfloat16().float().numpy()


def _products(K: int, cast) -> tuple[np.ndarray, np.ndarray]:
    """A (256 x K) @ (K x 64) product with operands rounded by `cast`, summed exactly, and
    the float64 product of the unrounded operands."""
    rng = np.random.default_rng(K)
    a = rng.standard_normal((256, K)).astype(np.float32)
    b = rng.standard_normal((K, 64)).astype(np.float32)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    return (cast(a).astype(np.float64) @ cast(b).astype(np.float64)).astype(np.float32), exact


@pytest.mark.parametrize("K", [9, 27, 144, 1024])
def test_tf32_tolerance_fits_tf32_products(K):
    """Products with TF32 operands (both roundings) pass against float64 and against each other
    (pydl's Triton kernels truncate, cuDNN rounds); with bf16 operands (3 fewer bits) they do
    not; and a TF32 result fails fp32's tolerance, so TF32 is needed exactly where it is used."""
    trunc, exact = _products(K, lambda x: _tf32(x, "truncate"))
    near, _ = _products(K, lambda x: _tf32(x, "nearest"))
    coarse, _ = _products(K, _bf16)
    f32 = torch.float32
    assert_close(trunc, exact, f32, reduction=K, tf32=True, name="truncated vs float64")
    assert_close(near, exact, f32, reduction=K, tf32=True, name="rounded vs float64")
    assert_close(trunc, near, f32, reduction=K, tf32=True, name="truncated vs rounded")
    assert deviation(coarse, exact, f32, reduction=K, tf32=True).ratio > 2
    assert deviation(trunc, exact, f32, reduction=K).ratio > 10


def test_uses_tf32_follows_torchs_flags_on_cuda_only():
    """TF32 on a CUDA device when torch allows it for the kind of op (cuDNN's flag for
    convolutions and RNNs, the matmul flag for matmuls and attention); never in emulation."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = cudnn.allow_tf32, matmul.allow_tf32
    try:
        cudnn.allow_tf32, matmul.allow_tf32 = True, False
        assert uses_tf32("cuda", cudnn=True) and not uses_tf32("cuda", cudnn=False)
        assert not uses_tf32("cpu", cudnn=True) and not uses_tf32(torch.device("cpu"), cudnn=False)
        cudnn.allow_tf32, matmul.allow_tf32 = False, True
        assert not uses_tf32("cuda:0", cudnn=True) and uses_tf32("cuda:0", cudnn=False)
    finally:
        cudnn.allow_tf32, matmul.allow_tf32 = saved


def test_deviation_is_assert_closes_measure():
    e = np.linspace(-2.0, 2.0, 11)
    d = deviation(e + 5e-7, e, torch.float32)
    assert d.message is None and 0.3 < d.ratio < 1.0
    d = deviation(e + 1e-4, e, torch.float32, name="y")
    assert d.ratio > 1 and d.message.startswith("y: 11 of 11 elements out of tolerance")
    with pytest.raises(AssertionError, match="y: 11 of 11"):
        assert_close(e + 1e-4, e, torch.float32, name="y")
    nan = e.copy()
    nan[3] = np.nan
    assert deviation(nan, e, torch.float32).ratio == np.inf
    assert "NaN mismatch" in deviation(nan, e, torch.float32).message
