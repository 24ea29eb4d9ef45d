"""pydl's direct Numba launch (pydl/_numba_launch.py _NumbaDirect) against Numba's own argument
marshalling, without a GPU: run as a script in a process without the CUDA simulator
(tests/test_numba_direct.py does), it prints "ok" or raises.

For each call below, the way a GPU launch takes it: each tensor through pydl's numba_view
and Numba's real as_cuda_array (torch's own __cuda_array_interface__, read through a
subclass that reports CUDA; Numba's driver calls that need a device replaced), typed by
Numba's real typeof, marshalled by Numba's real _Kernel._prepare_args. The direct path is
built from a first call, then must give, for a second call of the same signature with other
tensors and scalar values, exactly the parameter list Numba makes for it.
"""
import contextlib
import functools
import os
import sys

assert os.environ.get("NUMBA_ENABLE_CUDASIM", "").strip() not in ("1", "true"), \
    "run without the CUDA simulator"

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pydl import _numba_launch  # noqa: E402
from pydl.kernels import numba as kernels  # noqa: E402  (Numba made usable as pydl uses it)

assert kernels.EXTRA        # Numba's own modules after that (NumPy 2.5 lacks a name they use)
from numba import cuda  # noqa: E402
from numba.cuda import api  # noqa: E402
from numba.cuda.cudadrv import devices  # noqa: E402
from numba.cuda.dispatcher import _Kernel  # noqa: E402
from numba.cuda.typing.typeof import Purpose, typeof  # noqa: E402

# Numba's device-only steps: no context here
devices._runtime.ensure_context = contextlib.nullcontext
api.current_context = lambda: None
devices.get_context = lambda: None


class _ReportsCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def as_numba(t):
    """What pydl._numba_launch.numba_array makes of a CUDA tensor, from this CPU tensor."""
    return cuda.as_cuda_array(_numba_launch.numba_view(t).as_subclass(_ReportsCuda))


class Overload:
    """A compiled kernel as the direct path reads it, typed for `arrays` as Numba types them,
    marshalling with Numba's own _prepare_args."""
    extensions, debug, cooperative = (), False, False

    def __init__(self, arrays):
        self.argument_types = [typeof(a, Purpose.argument) for a in arrays]
        self._prepare_args = functools.partial(_Kernel._prepare_args, self)


def numba_params(overload, arrays):
    params, written_back = [], []
    for ty, a in zip(overload.argument_types, arrays):
        overload._prepare_args(ty, a, 0, written_back, params)
    assert not written_back
    return params


def arrays_of(args):
    return [as_numba(a) if isinstance(a, torch.Tensor) else a for a in args]


def like(t, seed):
    """A tensor of t's dtype, shape and strides elsewhere in memory (other values)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(t.untyped_storage().nbytes() // max(t.element_size(), 1) + 8,
                       generator=g).to(t.dtype)
    return base.as_strided(t.shape, t.stride(), 3)


def check(first, second, refills=True):
    assert _numba_launch._numba_signature(first) == _numba_launch._numba_signature(second)
    arrays = arrays_of(first)
    overload = Overload(arrays)
    direct = _numba_launch._NumbaDirect(overload, first, arrays, 0, None)
    got = direct.fill(second)
    if not refills:
        assert got is None, "a scalar past the first call's type was refilled"
        return
    again = arrays_of(second)
    assert [typeof(a, Purpose.argument) for a in again] == overload.argument_types
    want = _numba_launch._numba_params(numba_params(overload, again))
    assert _numba_launch._numba_params(got) == want, (got, want)
    assert any(p != w for p, w in zip(_numba_launch._numba_params(got),
                                       _numba_launch._numba_params(direct.template))) or \
        all(not isinstance(a, torch.Tensor) or a.numel() == 0 for a in first)


def numba_fields(t):
    """What Numba makes of tensor t but its data pointer: its type and array fields."""
    a = as_numba(t)
    params = numba_params(Overload([a]), [a])
    params[_numba_launch._DATA_FIELD] = None
    return typeof(a, Purpose.argument), params


def signature_decides(tensors):
    """Tensors of one pydl signature are tensors Numba makes the same overload and fields of
    (a signature that left out what Numba reads would refill a list made for another)."""
    seen = {}
    for t in tensors:
        fields = numba_fields(t)
        assert seen.setdefault(_numba_launch._numba_signature([t]), fields) == fields, t.stride()


def launches_as_numba():
    """What _NumbaRuntime reads of Numba is what Numba's own launch does (numba-cuda 0.30):
    its launch configuration records the overload launched through pre_launch_callbacks and
    holds the cuda.core stream; _Kernel.launch marshals each argument, builds a LaunchConfig
    of the grid, block, shared memory and the overload's cooperative flag, and calls
    cuda.core's launch with the overload's cufunc.kernel. A Numba that does otherwise fails
    here (on a GPU the direct path would then refuse, or worse, launch differently)."""
    import inspect

    from numba.cuda import dispatcher
    config = inspect.getsource(dispatcher._LaunchConfiguration.__init__)
    assert "self.stream = driver._to_core_stream(stream)" in config
    assert "self.pre_launch_callbacks = []" in config
    call = inspect.getsource(dispatcher.CUDADispatcher.call)
    assert "callback(kernel, launch_config)" in call
    assert "kernel.launch(args, griddim, blockdim, stream, sharedmem)" in call
    launch = inspect.getsource(dispatcher._Kernel.launch)
    for step in ("cufunc = self._codelibrary.get_cufunc()",
                 "self._prepare_args(t, v, stream, retr, kernelargs)",
                 "shmem_size=sharedmem", "is_cooperative=self.cooperative",
                 "kernel = cufunc.kernel", "launch(stream, config, kernel, *kernelargs)"):
        assert step in launch, step
    made = _numba_launch._NumbaRuntime.config(4, (32, 2), False)   # (a cooperative one asks a GPU)
    assert (made.grid, made.block, made.shmem_size, made.is_cooperative) == \
        ((4, 1, 1), (32, 2, 1), 0, False), made


def main():
    launches_as_numba()
    x = torch.randn(6, 10)
    tensors = {                 # by what each is
        "0-d": torch.tensor(2.5),
        "1-d": torch.randn(7),
        "2-d": torch.randn(3, 4),
        "4-d": torch.randn(2, 3, 4, 5),
        "transposed": x.t(),
        "sliced": x[1:5, ::3],
        "offset row": x[2],
        "broadcast": torch.randn(4, 1).expand(4, 6),
        "size-1 dims, odd strides": torch.randn(5, 6).as_strided((1, 5, 1, 6), (7, 6, 3, 1)),
        "channels_last": torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last),
        "empty": torch.empty(0, 4),
        "empty, strided": torch.randn(4, 6)[:, :0],
    }
    dtypes = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8,
              torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool]
    for t in tensors.values():
        for dtype in dtypes:
            a = t.to(dtype) if t.is_contiguous() or t.numel() == 0 else \
                like(t.to(dtype), 0)
            check([a, like(a, 5), 3], [like(a, 1), like(a, 2), -9])
    # (3, 4) and (1, 5, 1, 6) tensors of every layout at hand, and broadcasts
    y = torch.randn(8, 8)
    signature_decides([y[:3, :4], y[:3, :4].contiguous(), y[:4, :3].t(), y[:6:2, :8:2],
                       y[:3, :1].expand(3, 4), y[:1, :4].expand(3, 4), y[0, 0].expand(3, 4),
                       y.flatten()[:30].as_strided((1, 5, 1, 6), (7, 6, 3, 1)),
                       y.flatten()[:30].as_strided((1, 5, 1, 6), (30, 6, 6, 1)),
                       y.flatten()[:30].as_strided((1, 5, 1, 6), (1, 1, 1, 5)),
                       y[:0, :4], y[:0, :4].contiguous(),
                       *[y[:3, :4].to(dtype) for dtype in (torch.float16, torch.bfloat16,
                                                           torch.int32, torch.uint8)]])
    # random layouts: 0-4 dims of 0-4 elements, permuted, stepped, broadcast and offset
    # views of one buffer, each refilled for another buffer of its layout
    g = torch.Generator().manual_seed(0)
    buffer = torch.randn(4096, generator=g)
    randoms = []
    for _ in range(300):
        ndim = int(torch.randint(0, 5, (1,), generator=g))
        shape = [int(v) for v in torch.randint(0, 5, (ndim,), generator=g)]
        strides = [0 if int(torch.randint(0, 4, (1,), generator=g)) == 0 else int(v)
                   for v in torch.randint(1, 40, (ndim,), generator=g)]
        t = buffer.as_strided(shape, strides, int(torch.randint(0, 64, (1,), generator=g)))
        randoms.append(t)
        check([t, 1], [like(t, 7), 2])
    signature_decides(randoms)
    # scalars of every kind Numba types (a Python int as int64, a float as float64, NumPy
    # scalars by their dtype), between tensors
    first = [torch.randn(3, 2), 5, True, 1.5, np.float32(0.25), np.int32(7), np.bool_(False),
             np.uint8(3), np.int64(-4), torch.randn(2, 2, 2).to(torch.bfloat16), -2 ** 40]
    second = [like(first[0], 3), -2 ** 62, False, -0.1, np.float32(3.5), np.int32(-2 ** 31),
              np.bool_(True), np.uint8(255), np.int64(2 ** 62), like(first[9], 4), 0]
    check(first, second)
    # a Python int past int64 (Numba types it uint64): not refilled, Numba types the call
    check([torch.randn(2), 1], [torch.randn(2), 2 ** 63], refills=False)
    print("ok")


if __name__ == "__main__":
    sys.exit(main())
