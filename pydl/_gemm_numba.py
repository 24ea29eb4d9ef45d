"""Launcher of the Numba tiled GEMM (kernels/numba/gemm.py), for any op that needs a matmul.

`gemm(a, b, out, ...)` has pydl/_gemm.py's signature (one GEMM front door for both
backends) and takes torch views, so transposes, permutes and broadcast batch axes are free:
out[b1, b2] = op(a)[b1, b2] @ op(b)[b1, b2] (+ addend) (+ bias); see the kernel module for
the batch rules (size-1 axes broadcast; with 4-D operands, out's second axis of size 1 sums
over the operands'). Accumulation is fp32 whatever the dtypes, which may differ per array (an
fp32 workspace fed by fp16 operands, say).
"""
from __future__ import annotations

import functools
import os

import torch

from . import _env
from ._gemm import check_softcap
from ._launch import cdiv
from ._numba_launch import NumbaLaunch, Place, launch_numba
from ._plan import GRID_YZ_MAX

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
# fp16 and bf16 products on the tensor cores (kernels/numba/gemm_mma.py, and the attention
# kernels, kernels/numba/attention_mma.py: `on_tensor_cores`). The GEMM's blocks of WARPS_MMA
# (along M, N) warps of 32 x 32 outputs each, on a GPU that has mma.sync m16n8k16 (compute
# capability 8.0 or newer), when MMA is on. It is off by default (PYDL_NUMBA_MMA=1 turns it
# on) until a GPU run has shown the kernel's fragment layouts to be the hardware's: the
# simulator checks them against an emulation written from the PTX ISA, not against the
# hardware, and the CUDA-core kernel is the one a GPU has verified. In the simulator, where
# the warp's product is a block-wide rendezvous of Python threads: one warp a block, and the
# tests that turn MMA on.
WARPS_MMA = (2, 2)
SIM_WARPS_MMA = (1, 1)
MMA = os.environ.get("PYDL_NUMBA_MMA", "0").strip() == "1"
# The grid's y and z axes are capped (pydl._plan.GRID_YZ_MAX); the kernel's grid-stride loops
# cover what a capped grid leaves over.


def tile() -> tuple[int, int]:
    """(TILE, MICRO) in use: the simulator's under emulation."""
    return (SIM_TILE, SIM_MICRO) if _env.INTERPRET else (TILE, MICRO)


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, trans_a: bool = False,
         trans_b: bool = False, alpha: float = 1.0, bias: torch.Tensor | None = None,
         accumulate: bool = False, addend: torch.Tensor | None = None,
         input_precision: str | None = None, softcap: float = 0.0) -> torch.Tensor:
    """out = op(a) @ op(b) (+ bias) (+ out if accumulate, or + addend); returns out. The
    arguments of pydl/_gemm.py's gemm, with Numba's own limits and one more rule:

    a, b, out: matrices with up to two leading batch axes (op(a) = a^T under trans_a, a view);
    fewer than two are taken as size-1 batch axes. Batch axes of size 1 broadcast; with a, b
    of batch (B1, B2) an out of batch (B1, 1) sums the B2 products (a reduction axis).
    bias: (N,) or (B1, N), added to every row; addend: out's shape (any dtype; may be out).
    alpha: 1 only (the kernel has no scale). input_precision: accepted for the signature;
    fp32 operands are multiplied in fp32 exactly (no TF32 on CUDA cores).
    The dtypes may differ per array; accumulation is fp32, rounded once into out. With MMA
    on (PYDL_NUMBA_MMA=1), fp16 or bf16 operands of one dtype multiply on the tensor cores
    (kernels/numba/gemm_mma.py), the rest on the CUDA cores (kernels/numba/gemm.py).
    """
    if alpha != 1.0:
        raise NotImplementedError(f"gemm: the numba GEMM has no alpha (got {alpha}); scale an "
                                  f"operand or use pydl._gemm.gemm")
    if accumulate:
        if addend is not None:
            raise ValueError("gemm: give accumulate=True or addend=, not both")
        addend = out
    check_softcap(softcap, addend)
    launch = _arguments(*_operands(a, b, out, trans_a, trans_b, addend), bias, softcap)
    if launch is not None:
        launch_numba(*launch[:3], out.device, *launch[3])
    return out


def gemm_plan(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, trans_a: bool = False,
              trans_b: bool = False, alpha: float = 1.0, bias: torch.Tensor | None = None,
              addend: torch.Tensor | None = None, input_precision: str | None = None,
              softcap: float = 0.0):
    """pydl._gemm.gemm_plan's signature on this GEMM: gemm(...) planned once for tensors of
    these shapes, strides and dtypes, a callable (a, b, out, bias, addend) that launches it on
    tensors at the addresses of those planned (bias and addend None where they were): a
    NumbaLaunch, which on a GPU writes their pointers alone."""
    return gemm_plan_on((a, b, out, bias, addend), a, b, out, trans_a=trans_a,
                        trans_b=trans_b, alpha=alpha, bias=bias, addend=addend,
                        input_precision=input_precision, softcap=softcap)


def gemm_plan_on(bases: tuple, a, b, out, *, trans_a: bool = False, trans_b: bool = False,
                 alpha: float = 1.0, bias=None, addend=None, input_precision=None,
                 softcap: float = 0.0):
    """pydl._gemm.gemm_plan_on's: gemm_plan for operands that are views of the tensors `bases`
    (a, b, out, bias, addend: what each views, None where absent; a chunk of a batch, say),
    made the same way every call of the caller's plan: a callable on the bases themselves
    (a, b, out, bias, addend), each operand at its view's byte offset in its base. The
    tensor-core kernel is not planned (which of its forms runs depends on the operands'
    4-byte alignment, per call): there the callable runs gemm on the views, made per call."""
    if alpha != 1.0:
        raise NotImplementedError(f"gemm: the numba GEMM has no alpha (got {alpha}); scale an "
                                  f"operand or use pydl._gemm.gemm")
    del input_precision             # fp32 products are exact fp32 here (no TF32)
    check_softcap(softcap, addend)
    operands = (a, b, out, bias, addend)
    if on_tensor_cores(a, b):
        places = [None if t is None else Place(i, t, base, i)
                  for i, (t, base) in enumerate(zip(operands, bases))]

        def per_call(*tensors):
            a, b, out, bias, addend = (None if p is None else p.view(t)
                                       for p, t in zip(places, tensors))
            gemm(a, b, out, trans_a=trans_a, trans_b=trans_b, bias=bias, addend=addend,
                 softcap=softcap)
        return per_call
    launch = _arguments(*_operands(a, b, out, trans_a, trans_b, addend), bias, softcap)
    if launch is None:
        return lambda *tensors: None
    kernel, grid, threads, args, places = launch
    return NumbaLaunch(kernel, grid, threads, out.device, args, bases, places)


def _operands(a, b, out, trans_a, trans_b, addend):
    """gemm's arguments as the kernels take them: 4-D a, b, out and addend (views)."""
    if min(a.dim(), b.dim(), out.dim()) < 2 or max(a.dim(), b.dim(), out.dim()) > 4:
        raise ValueError(f"gemm: needs matrices with at most two batch dims, got "
                         f"{tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
    return (_as4d(a.transpose(-1, -2) if trans_a else a),
            _as4d(b.transpose(-1, -2) if trans_b else b), _as4d(out),
            None if addend is None else _as4d(addend))


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _arguments(a, b, out, addend, bias, softcap: float = 0.0):
    """The launch of the kernel on 4-D a, b, out and addend: (kernel, grid, threads, args,
    places), places naming for each tensor argument which of (a, b, out, bias, addend) it
    lies in (NumbaLaunch); None when out is empty."""
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
    if addend is not None and addend.shape != out.shape:
        raise ValueError(f"gemm: addend {tuple(addend.shape)} != out {tuple(out.shape)}")
    if out.numel() == 0:
        return None
    bias_mode = k.BIAS_NONE
    if bias is not None:
        bias = bias.reshape(-1 if bias.dim() == 2 else 1, 1, 1, bias.shape[-1])  # a view
        if bias.shape[0] not in (1, B1) or bias.shape[3] != N:
            raise ValueError(f"gemm: bias of {bias.shape[0]} x {bias.shape[3]} for out "
                             f"{tuple(out.shape)}")
        bias_mode = k.BIAS_COLS
    ia, ib = 0, 1
    if out.stride(2) < out.stride(3):
        # Columns would store with a stride: compute out^T = b^T @ a^T, whose columns are
        # out's contiguous rows (transposed views cost nothing).
        a, b = b.transpose(2, 3), a.transpose(2, 3)
        ia, ib = 1, 0
        out = out.transpose(2, 3)
        addend = None if addend is None else addend.transpose(2, 3)
        if bias is not None:
            bias_mode = k.BIAS_ROWS
        M, N = N, M
    code = k.dtype_code
    # placeholders the kernel does not read: out
    addend_, i_addend = (addend, 4) if addend is not None else (out, 2)
    bias_, i_bias = (bias, 3) if bias is not None else (out, 2)
    flags = (addend is not None, bias_mode, float(softcap), a.stride(3) <= a.stride(2),
             b.stride(3) <= b.stride(2))
    places = (ia, ib, i_addend, 2, i_bias)
    if on_tensor_cores(a, b):
        from .kernels.numba.gemm_mma import gemm_mma_kernel
        wm, wn = SIM_WARPS_MMA if _env.INTERPRET else WARPS_MMA
        bt = b.transpose(2, 3)                          # B^T (.., N, K), as the kernel takes B
        a_words, b_words = pair_words(a), pair_words(bt)
        kernel = gemm_mma_kernel(wm, wn, a.dtype == torch.bfloat16, a_words is not None,
                                 b_words is not None)
        return (kernel, _grid(M, N, B1 * B2c, 32 * wm, 32 * wn), 32 * wm * wn,
                (a.view(torch.int16) if a_words is None else a_words,
                 bt.view(torch.int16) if b_words is None else b_words, addend_, out, bias_,
                 *flags, code(addend_.dtype), code(out.dtype), code(bias_.dtype)), places)
    T, R = tile()
    kernel = k.gemm_kernel(T, R, trim=_env.INTERPRET and SIM_TRIM)
    return (kernel, _grid(M, N, B1 * B2c, T, T), (T // R, T // R),
            (a, b, addend_, out, bias_, *flags, code(a.dtype), code(b.dtype),
             code(addend_.dtype), code(out.dtype), code(bias_.dtype)), places)


def _grid(M: int, N: int, batches: int, rows: int, cols: int) -> tuple[int, int, int]:
    """Blocks along N, M and the batches for tiles of rows x cols (the kernels' grid-stride
    loops cover the rest); one block in the simulator, where starting blocks is slow."""
    if _env.INTERPRET:
        return (1, 1, 1)
    return (cdiv(N, cols), min(cdiv(M, rows), GRID_YZ_MAX), min(batches, GRID_YZ_MAX))


def pair_words(t: torch.Tensor) -> torch.Tensor | None:
    """A 16-bit operand (.., lines, K) as int32 words of K-consecutive pairs (.., lines, K / 2)
    where its K axis is contiguous and even and every pair 4-byte aligned (the tensor-core
    kernel then loads a pair at once); None elsewhere."""
    if t.shape[3] % 2 or t.shape[3] and t.stride(3) != 1 or t.data_ptr() % 4:
        return None
    try:
        return t.view(torch.int32)      # torch checks that the offset and the strides are even
    except RuntimeError:                # an odd stride, maybe of a size-1 axis (any will do)
        pass
    strides = [st if n > 1 else 0 for st, n in zip(t.stride(), t.shape)]
    if t.storage_offset() % 2 or any(st % 2 for st in strides[:3]):
        return None
    return t.as_strided(t.shape, strides[:3] + [1]).view(torch.int32)


def on_tensor_cores(a: torch.Tensor, *others: torch.Tensor) -> bool:
    """The products of a Numba kernel on these operands go to the tensor cores (the GEMM's,
    kernels/numba/gemm_mma.py; the attention's, kernels/numba/attention_mma.py): MMA
    on, fp16 or bf16 operands of one dtype, on a GPU with mma.sync m16n8k16 (or in the
    simulator)."""
    if not MMA or a.dtype not in (torch.float16, torch.bfloat16) \
            or any(t.dtype != a.dtype for t in others):
        return False
    if _env.INTERPRET:
        return True
    return _has_mma(a.device.index if a.device.index is not None else
                    torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _has_mma(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (8, 0)
