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


# every public op, with NumPy arrays in every tensor argument (a keyword one too): the ops
# refuse a non-tensor before doing anything, and the wrapper converts only then
NUMPY_CALLS = {
    "conv2d": (lambda F, a: F.conv2d(a[0], a[1], bias=a[2], padding=1),
               ((2, 3, 6, 5), (4, 3, 3, 3), (4,))),
    "max_pool2d": (lambda F, a: F.max_pool2d(a[0], 2), ((2, 3, 6, 5),)),
    "avg_pool2d": (lambda F, a: F.avg_pool2d(a[0], 2), ((2, 3, 6, 5),)),
    "adaptive_avg_pool2d": (lambda F, a: F.adaptive_avg_pool2d(a[0], 2), ((2, 3, 6, 5),)),
    "log_softmax": (lambda F, a: F.log_softmax(a[0], 1), ((3, 7),)),
    "cross_entropy": (lambda F, a: F.cross_entropy(a[0], a[1], weight=a[2]),
                      ((3, 7), (3, 7), (7,))),
    "scaled_dot_product_attention": (lambda F, a: F.scaled_dot_product_attention(
        a[0], a[1], a[1], attn_mask=a[2]), ((1, 2, 5, 8), (1, 2, 6, 8), (5, 6))),
    "lstm_cell": (lambda F, a: F.lstm_cell(a[0], (a[1], a[1]), a[2], a[3])[1],
                  ((2, 3), (2, 4), (16, 3), (16, 4))),
    "gru_cell": (lambda F, a: F.gru_cell(a[0], a[1], a[2], a[3]), ((2, 3), (2, 4), (12, 3), (12, 4))),
    "gru": (lambda F, a: F.gru(a[0], a[1], [a[2], a[3]], bias=False)[1],
            ((3, 2, 3), (1, 2, 4), (12, 3), (12, 4))),
}


@pytest.mark.parametrize("op", sorted(NUMPY_CALLS))
def test_every_op_takes_numpy_arrays(op):
    if HAS_CUDA:
        pytest.skip("NumPy arrays live on the CPU, where kernels run only in emulation")
    call, shapes = NUMPY_CALLS[op]
    arrays = [_np(*s) for s in shapes]
    if op == "cross_entropy":          # soft targets, positive weights
        arrays[1] = np.abs(arrays[1])
        arrays[2] = np.abs(arrays[2])
    out = call(pydl, arrays)
    assert isinstance(out, np.ndarray), type(out)
    ref = call(pydl, [torch.from_numpy(a) for a in arrays])
    np.testing.assert_allclose(out, ref.numpy(), rtol=1e-6, atol=1e-6)
