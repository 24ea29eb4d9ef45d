"""Launcher of the Numba tiled GEMM (kernels/numba/gemm.py), for any op that needs a matmul.

`gemm(a, b, out, ...)` takes torch views, so transposes, permutes and broadcast batch axes
are free: out[b1, b2] = a[b1, b2] @ b[b1, b2] (+ c_in) (+ bias), all 4-D; see the kernel
module for the batch rules (size-1 axes broadcast; out's second axis of size 1 sums over the
operands'). Accumulation is fp32 whatever the dtypes, which may differ per array (an fp32
workspace fed by fp16 operands, say).
"""
from __future__ import annotations


import torch

from . import _env
from ._launch import cdiv, launch_numba

# (TILE, MICRO): a TILE x TILE output tile per block of (TILE / MICRO)^2 threads, each
# computing MICRO x MICRO outputs. On a GPU 64 x 64 tiles with 256 threads (4 x 4 each, 33 KiB
# of shared memory). In the CUDA simulator, where each thread is an OS thread and a
# syncthreads costs milliseconds, 32 x 32 tiles with 4 threads (16 x 16 each): the fastest of
# the configurations tried, 1 to 16 threads a block. The kernel is correct for any powers of
# two; tests run other tiles too.
TILE, MICRO = 64, 4
SIM_TILE, SIM_MICRO = 32, 16
# Under emulation the kernel skips the multiply-adds and loads outside the matrices (see
# kernels/numba/gemm.py: trim); tests turn this off to run the GPU's code path in the simulator.
SIM_TRIM = True
# Grid limits on the y and z axes (x goes to 2^31 - 1); the kernel's grid-stride loops cover
# what a capped grid leaves over.
_MAX_GRID_YZ = 65535


def tile() -> tuple[int, int]:
    """(TILE, MICRO) in use: the simulator's under emulation."""
    return (SIM_TILE, SIM_MICRO) if _env.INTERPRET else (TILE, MICRO)


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *,
         c_in: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> None:
    """out[b1, b2] = a[b1, b2] @ b[b1, b2] (+ c_in[b1, b2]) (+ bias[b1] added to every row).

    a: (B1 or 1, B2 or 1, M, K), b: (B1 or 1, B2 or 1, K, N), out and c_in: (B1, B2c, M, N)
    with B2c = B2, or B2c = 1 to sum over the operands' B2 axis; bias: (B1 or 1, N) or (N,).
    Any strides (size-1 axes broadcast), float32 / float16 / bfloat16 each, accumulated in
    fp32 and rounded once into out. c_in may be `out` itself.
    """
    from .kernels.numba import gemm as k
    B1, B2c, M, N = out.shape
    if a.dim() != 4 or b.dim() != 4 or a.shape[2] != M or b.shape[3] != N \
            or a.shape[3] != b.shape[2]:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
    B2 = a.shape[1] if a.shape[1] != 1 else b.shape[1]
    if a.shape[0] not in (1, B1) or b.shape[0] not in (1, B1) or b.shape[1] not in (1, B2) \
            or B2c not in (1, B2):
        raise ValueError(f"gemm: batch axes of {tuple(a.shape)} @ {tuple(b.shape)} do not "
                         f"broadcast to {tuple(out.shape)}")
    if c_in is not None and c_in.shape != out.shape:
        raise ValueError(f"gemm: c_in {tuple(c_in.shape)} != out {tuple(out.shape)}")
    if out.numel() == 0:
        return
    bias_mode = k.BIAS_NONE
    if bias is not None:
        bias = bias.reshape(-1 if bias.dim() == 2 else 1, 1, 1, bias.shape[-1])  # a view
        if bias.shape[0] not in (1, B1) or bias.shape[3] != N:
            raise ValueError(f"gemm: bias of {bias.shape[0]} x {bias.shape[3]} for out "
                             f"{tuple(out.shape)}")
        bias_mode = k.BIAS_COLS
    if out.stride(2) < out.stride(3):
        # Columns would store with a stride: compute out^T = b^T @ a^T, whose columns are
        # out's contiguous rows (transposed views cost nothing).
        a, b = b.transpose(2, 3), a.transpose(2, 3)
        out = out.transpose(2, 3)
        c_in = None if c_in is None else c_in.transpose(2, 3)
        if bias is not None:
            bias_mode = k.BIAS_ROWS
        M, N = N, M
    T, R = tile()
    grid = (cdiv(N, T), min(cdiv(M, T), _MAX_GRID_YZ), min(B1 * B2c, _MAX_GRID_YZ))
    if _env.INTERPRET:
        grid = (1, 1, 1)  # one block loops over every tile: starting simulated blocks is slow
    kernel = k.gemm_kernel(T, R, trim=_env.INTERPRET and SIM_TRIM)
    code = k.dtype_code
    c_in_ = c_in if c_in is not None else out     # placeholders the kernel does not read
    bias_ = bias if bias is not None else out
    launch_numba(kernel, grid, (T // R, T // R), out.device, a, b, c_in_, out, bias_,
                 c_in is not None, bias_mode, a.stride(3) <= a.stride(2),
                 b.stride(3) <= b.stride(2), code(a.dtype), code(b.dtype), code(c_in_.dtype),
                 code(out.dtype), code(bias_.dtype))
