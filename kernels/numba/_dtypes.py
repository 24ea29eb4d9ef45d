"""Element types of Numba kernel arrays, and their fp32 load/store.

fp32 and fp16 tensors reach a kernel as arrays of their own type. NumPy and the CUDA array
interface have no bfloat16, so bf16 tensors arrive as int16 arrays holding the bit patterns
(pydl._numba_launch.numba_array); a kernel gets a `dtype_code` argument saying which, and calls
`load_f32` / `store_f32`, which decode and encode bf16 when the code says so. The branch is
uniform across a launch, so it costs next to nothing on the GPU. `load_f32` / `store_f32` are
`device` functions (see _device.py): inlined when compiled, plain calls in the CUDA simulator.

The bit casts go through a one-element local array viewed as the other type: NVVM turns that
into a plain register move (mov.b32), and the CUDA simulator, where local arrays are NumPy
arrays, runs the same code, so the bf16 path is tested under emulation too.
"""
import numpy as np
import torch
from numba import cuda, float32, int32, int64

from ._device import device

FP32 = 0
FP16 = 1
BF16 = 2

_CODES = {torch.float32: FP32, torch.float16: FP16, torch.bfloat16: BF16}


def dtype_code(torch_dtype: torch.dtype) -> int:
    """The `dtype_code` kernel argument for tensors of `torch_dtype`."""
    try:
        return _CODES[torch_dtype]
    except KeyError:
        raise TypeError("Numba kernels take float32, float16 or bfloat16, "
                        f"got {torch_dtype}") from None


@cuda.jit(device=True)
def bf16_bits_to_f32(bits):
    """fp32 value of bf16 bits held in an int16: they are the high half of the fp32 word."""
    word = cuda.local.array(1, np.int32)
    # int16 -> int32 sign-extends; the shift drops those bits again, and the result stays in
    # int32 range (|bits| * 2^16 <= 2^31), so nothing overflows in NumPy either.
    word[0] = int32(bits) << 16
    return word.view(np.float32)[0]


@cuda.jit(device=True)
def f32_to_bf16_bits(value):
    """bf16 bits of an fp32 value, rounded to nearest even, as a signed int16 value."""
    word = cuda.local.array(1, np.float32)
    word[0] = value
    u = int64(word.view(np.uint32)[0])
    if (u & 0x7FFFFFFF) > 0x7F800000:
        # NaN: keep the sign and top payload bits and force the quiet bit, since rounding
        # could carry a NaN whose payload sits in the low half into infinity.
        high = (u >> 16) | 0x40
    else:
        # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate.
        # Overflow of the largest finite values rounds correctly into infinity.
        high = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    if high >= 0x8000:  # int16 storage holds the pattern as a signed value
        high -= 0x10000
    return high


@device
def load_f32(a, o, c, i, code):
    """a[o, c, i] as fp32; `code` is the dtype_code of the tensor behind `a`."""
    v = a[o, c, i]
    if code == BF16:
        return bf16_bits_to_f32(v)
    return float32(v)


@device
def store_f32(a, o, c, i, value, code):
    """a[o, c, i] = value (fp32), rounded to the tensor's dtype given by `code`."""
    if code == BF16:
        a[o, c, i] = f32_to_bf16_bits(value)
    else:
        a[o, c, i] = value


@cuda.jit(device=True)
def load4_f32(a, n, c, h, w, code):
    """a[n, c, h, w] as fp32, for 4-D (N, C, H, W) arrays; see load_f32."""
    v = a[n, c, h, w]
    if code == BF16:
        return bf16_bits_to_f32(v)
    return float32(v)


@cuda.jit(device=True)
def store4_f32(a, n, c, h, w, value, code):
    """a[n, c, h, w] = value (fp32), rounded to the tensor's dtype; see store_f32."""
    if code == BF16:
        a[n, c, h, w] = f32_to_bf16_bits(value)
    else:
        a[n, c, h, w] = value
