"""Arrays from outside torch (pydl._interop): the functional ops take DLPack arrays and return
the caller's kind of array. CuPy on a GPU; NumPy arrays exercise the same path on the CPU in
emulation (both go through torch.from_dlpack and the library's from_dlpack)."""
import numpy as np
import pytest
import torch

import pydl
from pydl.testing import assert_close, uses_tf32

from conftest import HAS_CUDA


def _np(*shape):
    return np.random.default_rng(0).standard_normal(shape).astype(np.float32)


def test_numpy_arrays_in_numpy_arrays_out():
    if HAS_CUDA:
        pytest.skip("NumPy arrays live on the CPU, where kernels run only in emulation")
    x = _np(4, 7)
    y = pydl.softmax(x, -1)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, torch.softmax(torch.from_numpy(x), -1).numpy(), rtol=1e-6)
    # zero copy on the way in: the kernel read the caller's memory
    t = np.array([1, 0, 6, 3])
    loss = pydl.cross_entropy(x, t, reduction="none")
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction="none")
    np.testing.assert_allclose(loss, ref.numpy(), rtol=1e-5)


def test_nested_arguments_and_results_convert():
    if HAS_CUDA:
        pytest.skip("NumPy arrays live on the CPU, where kernels run only in emulation")
    x, h, c = _np(3, 2, 4), _np(1, 2, 5), _np(1, 2, 5)
    weights = [_np(20, 4), _np(20, 5)]
    out, (h_n, c_n) = pydl.lstm(x, (h, c), weights, bias=False)
    assert all(isinstance(a, np.ndarray) for a in (out, h_n, c_n))
    t_out, (t_h, t_c) = pydl.lstm(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)),
                                  [torch.from_numpy(w) for w in weights], bias=False)
    np.testing.assert_allclose(out, t_out.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_n, t_c.numpy(), rtol=1e-5, atol=1e-6)


def test_torch_callers_get_tensors():
    x = torch.randn(3, 5, device="cuda" if HAS_CUDA else "cpu")
    assert isinstance(pydl.softmax(x, -1), torch.Tensor)


@pytest.mark.gpu
def test_cupy_arrays_zero_copy():
    cp = pytest.importorskip("cupy")
    if not cp.cuda.is_available():
        pytest.skip("CuPy sees no GPU")
    x = cp.random.standard_normal((8, 3, 16, 16), dtype=cp.float32)
    w = cp.random.standard_normal((4, 3, 3, 3), dtype=cp.float32)
    y = pydl.conv2d(x, w, padding=1)
    assert isinstance(y, cp.ndarray) and y.shape == (8, 4, 16, 16)
    ref = torch.nn.functional.conv2d(torch.from_dlpack(x), torch.from_dlpack(w), padding=1)
    # both sides round fp32 products as torch.backends.cudnn.allow_tf32 says (TF32 by default)
    assert_close(torch.from_dlpack(y), ref, torch.float32, reduction=3 * 3 * 3,
                 tf32=uses_tf32(ref.device, cudnn=True))
    assert torch.from_dlpack(x).data_ptr() == x.data.ptr, "the input was copied"
    q = cp.random.standard_normal((2, 4, 64, 32), dtype=cp.float16)
    o = pydl.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert isinstance(o, cp.ndarray) and o.dtype == cp.float16
