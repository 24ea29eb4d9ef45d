"""Launch grids within CUDA's limits where a size passes them.

CUDA launches at most 2**31 - 1 programs (blocks) along grid axis 0 and 65535 along axes 1 and
2; a launch past them fails on a GPU ("invalid argument"), while Triton's interpreter and
Numba's simulator enforce neither. So the launches are recorded here and not run (their
outputs are not checked: the other tests do that at small sizes), at shapes whose
batch * heads passes 65535, as windowed attention gives (Swin folds its windows into the
batch): forward and backward of every attention algorithm on both backends, with dropout,
grouped heads, the weights kernel and the dropout mask; and every pool at 70000 images, both
layouts. (Found: every Triton attention kernel had (batch, head) on grid axis 1, and the
Triton pools the image on axis 2 or 1; attention takes one axis now, query tiles fastest, and
a pool's batch past the cap runs in slices, pydl._plan.BatchSlices.)
"""
from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA

import pydl
from pydl import attention

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="records emulated launches (the interpreter's "
                                                 "and the simulator's) instead of running them")

AXIS_MAX = (2 ** 31 - 1, 65535, 65535)
PLANES = 70000           # batch * heads


@pytest.fixture
def grids(monkeypatch):
    """Every kernel launch's (name, grid), not run."""
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    from triton.runtime.interpreter import InterpretedFunction

    seen = []

    def triton_run(self, *args, grid, warmup=False, **kwargs):
        g = tuple(grid(kwargs) if callable(grid) else grid)
        seen.append((self.fn.__name__, g + (1,) * (3 - len(g))))

    numba_call = FakeCUDAKernel.__call__

    def numba_run(self, *args):
        if self._device:            # a device function called from Python: not a launch
            return numba_call(self, *args)
        g = tuple(self.grid_dim)
        seen.append((self.py_func.__name__, g + (1,) * (3 - len(g))))

    monkeypatch.setattr(InterpretedFunction, "run", triton_run)
    monkeypatch.setattr(FakeCUDAKernel, "__call__", numba_run)
    return seen


CASES = [("triton", None, 0.0), ("triton", None, 0.1), ("triton", "naive", 0.0),
         ("triton", "flash_onepass", 0.0), ("numba", None, 0.0), ("numba", None, 0.1)]


@pytest.mark.parametrize("backend,algo,dropout_p", CASES,
                         ids=[f"{b}-{a or 'default'}-p{p}" for b, a, p in CASES])
@pytest.mark.parametrize("gqa", [False, True], ids=["mha", "gqa"])
def test_attention_launches_fit_the_grid(grids, backend, algo, dropout_p, gqa):
    H, HKV = (2, 1) if gqa else (1, 1)
    q = torch.randn(PLANES // H + 1, H, 2, 16, dtype=torch.float16, requires_grad=True)
    kv = torch.randn(PLANES // H + 1, HKV, 3, 16, dtype=torch.float16, requires_grad=True)
    out = pydl.scaled_dot_product_attention(q, kv, kv, dropout_p=dropout_p, enable_gqa=gqa,
                                            backend=backend, algo=algo)
    out.backward(torch.ones_like(out))
    _check(grids)


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_attention_weights_and_dropout_mask_fit_the_grid(grids, backend):
    q = torch.randn(PLANES + 1, 1, 2, 16, dtype=torch.float16)
    attention.attention_with_weights(q, q, q, backend=backend)
    attention.LAUNCHERS[backend].dropout_mask(PLANES + 1, 1, 2, 2, 0.5, 7, q.device)
    _check(grids)


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_pool_launches_fit_the_grid(grids, backend, layout):
    x = torch.randn(PLANES, 2, 2, 2, dtype=torch.float16)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    for fn in POOLS.values():
        out = fn(x) if backend == "triton" else _on_numba(fn, x)
        out.backward(torch.ones_like(out))
    _check(grids)


def _on_numba(fn, x):
    with pydl.use_backend("numba"):
        return fn(x)

def _check(grids):
    assert grids, "nothing launched"
    for name, grid in grids:
        assert all(0 < n <= m for n, m in zip(grid, AXIS_MAX)), (
            f"{name} launched with grid {grid}: CUDA takes at most {AXIS_MAX}")


POOLS = {
    "max_pool2d": lambda x: pydl.max_pool2d(x, 2, 1, 1),
    "max_pool2d_indices": lambda x: pydl.max_pool2d(x, 3, 2, 1, return_indices=True)[0],
    "avg_pool2d": lambda x: pydl.avg_pool2d(x, 3, 2, 1, count_include_pad=False),
    "adaptive_avg_pool2d": lambda x: pydl.adaptive_avg_pool2d(x, (2, 3)),
    "global_avg_pool2d": lambda x: pydl.adaptive_avg_pool2d(x, 1),
}


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", list(POOLS))
def test_pool_batches_past_the_grid_cap_run_in_slices(monkeypatch, op, layout):
    """The pooling kernels take the image from grid axis 2 (or 1): a batch past CUDA's cap
    runs in slices (pydl._plan.BatchSlices). With the cap lowered to 2, a batch of 5 runs as
    slices of 2, 2 and 1, and gives the unsliced result, forward and backward."""
    from pydl import _plan
    fn = POOLS[op]
    x = torch.randn(5, 3, 6, 7)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(fn(x))

    def run():
        xx = x.clone().requires_grad_()
        out = fn(xx)
        out.backward(g)
        return out.detach(), xx.grad

    _plan.clear_all()
    expected = run()
    monkeypatch.setattr(_plan, "GRID_YZ_MAX", 2)
    _plan.clear_all()
    sliced = []
    real = _plan.BatchSlices.__call__
    monkeypatch.setattr(_plan.BatchSlices, "__call__",
                        lambda self, *t, **d: (sliced.append(self.n), real(self, *t, **d)))
    try:
        got = run()
    finally:
        _plan.clear_all()
    assert sliced, "no launch ran in slices"
    for a, b, what in zip(got, expected, ("output", "gradient")):
        assert torch.equal(a, b), f"{what} differs in slices"
