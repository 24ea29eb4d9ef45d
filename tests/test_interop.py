"""The public ops' wrapper (pydl._interop): each op runs on its tensors' CUDA device; the
functional ops take DLPack arrays and return the caller's kind of array. CuPy on a GPU; NumPy
arrays exercise the same path on the CPU in emulation (both go through torch.from_dlpack and the
library's from_dlpack)."""
import numpy as np
import pytest
import torch
from conftest import HAS_CUDA

import pydl
from pydl.testing import assert_close, uses_tf32


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
    ref = torch.nn.functional.cross_entropy(torch.from_numpy(x), torch.from_numpy(t),
                                            reduction="none")
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
    "gru_cell": (lambda F, a: F.gru_cell(a[0], a[1], a[2], a[3]),
                 ((2, 3), (2, 4), (12, 3), (12, 4))),
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


# --- the tensors' device ------------------------------------------------------------------------

class _OnDevice1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (no second GPU needed to test the guard)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def _guard_spy(monkeypatch, current: int):
    """The devices the wrapper made current, in order, with `current` the current one."""
    import contextlib

    import pydl._interop as interop
    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield
    monkeypatch.setattr(interop, "_CURRENT_DEVICE", lambda: current)
    monkeypatch.setattr(torch.cuda, "device", device)
    return entered


def test_an_op_runs_under_its_tensors_device(monkeypatch):
    """A kernel launches on the current device: an op on tensors of another one runs under a
    guard of theirs (as torch's ops do), where it is not current already, and only on CUDA."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from pydl._interop import public_op
    ran = []
    op = public_op(lambda *args, **kwargs: ran.append(len(entered)) or "out")
    x = torch.Tensor._make_subclass(_OnDevice1, torch.zeros(3, 2, 4))
    entered = _guard_spy(monkeypatch, current=0)
    assert op(x, 1) == "out" and entered == [1] and ran == [1]
    assert op(input=x) == "out" and entered == [1, 1]
    packed = pack_padded_sequence(torch.zeros(3, 2, 4), [3, 2])
    packed = packed._replace(data=torch.Tensor._make_subclass(_OnDevice1, packed.data))
    op(packed, None)
    assert entered == [1, 1, 1]
    op(torch.zeros(3))                          # a CPU tensor: no guard
    assert entered == [1, 1, 1]
    entered = _guard_spy(monkeypatch, current=1)
    op(x)                                       # already current: none
    assert entered == []
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    entered = _guard_spy(monkeypatch, current=0)
    op(x)                                       # a compiled graph takes its own
    assert entered == []


def test_attention_with_weights_is_guarded_too():
    """nn.MultiheadAttention's need_weights path calls attention_with_weights, not a
    functional op: it takes the same wrapper."""
    from pydl.attention import attention_with_weights
    assert attention_with_weights.__wrapped__.__name__ == "attention_with_weights"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_ops_on_a_device_that_is_not_current(backend):
    """Tensors on cuda:1 while cuda:0 is current: every family's forward and backward match
    torch's (a kernel launched on the current device would fault or race)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    if backend == "numba":
        pytest.importorskip("numba")
    torch.cuda.set_device(0)
    dev = torch.device("cuda", 1)
    g = torch.Generator(device=dev).manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, device=dev, generator=g, requires_grad=True)

    x, w = leaf(2, 3, 9, 9), leaf(4, 3, 3, 3)
    logits, target = leaf(6, 11), torch.randint(0, 11, (6,), device=dev, generator=g)
    q, k, v = leaf(1, 2, 16, 32), leaf(1, 2, 16, 32), leaf(1, 2, 16, 32)
    seq, lstm_w = leaf(5, 2, 4), [leaf(24, 4), leaf(24, 6), leaf(24), leaf(24)]
    F = torch.nn.functional
    cases = [
        (lambda m: m.conv2d(x, w, padding=1), (x, w)),
        (lambda m: m.max_pool2d(x, 3, 2), (x,)),
        (lambda m: m.cross_entropy(logits, target), (logits,)),
        (lambda m: m.softmax(logits, -1), (logits,)),
        (lambda m: m.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v)),
    ]
    with torch.backends.cudnn.flags(allow_tf32=False):
        for fn, leaves in cases:
            got = fn(_Backend(pydl.functional, backend))
            want = fn(F)
            gy = torch.randn_like(want)
            assert got.device == dev
            assert_close(got, want, atol=1e-4, rtol=1e-4)
            for a, b in zip(torch.autograd.grad(got, leaves, gy),
                            torch.autograd.grad(want, leaves, gy)):
                assert_close(a, b, atol=1e-4, rtol=1e-4)
        out, _ = pydl.lstm(seq, None, lstm_w, backend=backend)
        want, _ = torch._VF.lstm(seq, (seq.new_zeros(1, 2, 6),) * 2, lstm_w, True, 1, 0.0,
                                 True, False, False)
        assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert torch.cuda.current_device() == 0


class _Backend:
    """pydl.functional with backend= fixed (torch's names for the same calls)."""

    def __init__(self, module, backend):
        self.module, self.backend = module, backend

    def __getattr__(self, name):
        fn = getattr(self.module, name)
        return lambda *args, **kwargs: fn(*args, backend=self.backend, **kwargs)


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_forward_ad_and_torch_func_refused_by_name(backend):
    """A dual tensor's tangent or a torch.func transform reaches no kernel (no jvp, no
    batching rule): refused with the op's name, where the eager path would have dropped the
    tangent silently; backend='torch' runs them."""
    import torch.autograd.forward_ad as fwAD
    x = torch.randn(3, 5)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError, match="pydl.softmax does not support "
                                                      "forward-mode AD"):
            pydl.softmax(dual, -1, backend=backend)
        pydl.softmax(x, -1, backend=backend)        # no tangent among its inputs: runs
        out = pydl.softmax(dual, -1, backend="torch")
        assert fwAD.unpack_dual(out).tangent is not None
    for transform in (torch.func.grad, torch.func.vmap):
        f = (lambda t: pydl.softmax(t, -1, backend=backend).sum()) if transform is \
            torch.func.grad else (lambda t: pydl.softmax(t, -1, backend=backend))
        with pytest.raises(NotImplementedError, match="torch.func transforms"):
            transform(f)(x)
    torch.func.grad(lambda t: pydl.softmax(t, -1, backend="torch")[0, 0])(x)
