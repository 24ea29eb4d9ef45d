"""Launcher of the Triton tiled GEMM (kernels/triton/gemm.py), for any op that needs a matmul.

    gemm(a, b, out)                       out = a @ b
    gemm(a, b, out, trans_b=True)         out = a @ b^T   (b given as (..., N, K))
    gemm(a, b, out, accumulate=True)      out += a @ b
    gemm(a, b, out, addend=acc32)         out = a @ b + acc32   (acc32 may have another dtype)
    gemm(a, b, out, bias=v, alpha=s)      out = s * (a @ b) + v  (v along out's columns)

Operands are torch views with any strides: a transposed, sliced, permuted or broadcast
(stride 0) operand costs nothing, and the result is written through `out`'s strides. 2-D
matrices or batches with up to two leading batch dimensions (the kernel's two-level batch,
e.g. (batch, heads) or (images, groups)); a, b, bias and addend broadcast to out's batch shape.
Accumulation is fp32; the result is rounded once, to out's dtype.

fp32 operands enter tl.dot as `input_precision` says: "ieee" (exact fp32 products) or "tf32";
the default follows torch.backends.cuda.matmul.allow_tf32, as torch.matmul does.
"""
from __future__ import annotations

import math

import torch

from . import _env
from ._launch import (
    cdiv,
    dot_block,
    ensure_triton_allocator,
    multiprocessors,
    tma_available,
)
from ._launch import input_precision as _default_precision
from ._plan import GRID_YZ_MAX, Cache, Launch
from ._tune import Tuner, aliased, bucket, gemm_candidates

GROUP_M = 8
# Shared memory a block may take on sm_90, and a multiprocessor holds (bytes).
SMEM_PER_BLOCK = 227 * 1024
SMEM_PER_SM = 228 * 1024
GEMM_TUNER = Tuner("gemm")


def gemm_config(m: int, n: int, k: int, dtype: torch.dtype, vector_loads: bool = True) -> dict:
    """The default block sizes (and, on a GPU, the first tuning candidate; pydl/_tune.py)
    for an (m x k) @ (k x n) product: up to 128 x 128 output tiles (8 warps for
    the full tile), never below 16 (tl.dot's minimum); 16-bit operands take 64-deep K steps,
    fp32 ones 32 (the same shared-memory bytes).

    vector_loads False (an operand whose tiles load element by element: no unit-stride axis,
    or another stride not a multiple of 16 elements, as Triton specializes them; e.g. the
    im2col columns of a 7x7 stem, 147 wide): 32-deep K steps and 8 warps from 128 x 64 up.
    Each element is then its own load with its own 64-bit address in registers, (BLOCK_M +
    BLOCK_N) BLOCK_K / threads of them a step: the 128 x 64 x 64 tile on 4 warps took 255
    registers and spilled 392 bytes inside its K loop on sm_90 (`python -m bench resources
    --all gemm`); 32 deep on 8 warps, 128 registers and no spill."""
    block_m, block_n = dot_block(m, 128), dot_block(n, 128)
    if vector_loads:
        num_warps = 8 if block_m * block_n >= 128 * 128 else 4
        block_k = dot_block(k, 64 if dtype.itemsize <= 2 else 32)
    else:
        num_warps = 8 if block_m * block_n >= 128 * 64 else 4
        block_k = dot_block(k, 32)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=GROUP_M,
                num_warps=num_warps, num_stages=3)


def vector_loads(a4: torch.Tensor, b4: torch.Tensor) -> bool:
    """Whether both operands' tiles load in vectors, as Triton proves it from the integer
    arguments it specializes as multiples of 16: each (batched, 4-D) operand with a unit stride
    along one of its last two axes, every other stride a multiple of 16 (broadcast axes'
    stride 0 included), and that axis's extent too (the load masks along it are then constant
    over 16 elements). a4 (.., M, K), b4 (.., K, N). The base addresses' alignment is
    Triton's own per-call specialization."""
    for t in (a4, b4):
        strides = t.stride()
        if strides[-1] == 1:
            extent, rest = t.shape[-1], strides[:-1]
        elif strides[-2] == 1:
            extent, rest = t.shape[-2], strides[:-2] + strides[-1:]
        else:
            return False
        if extent % 16 or any(s % 16 for s in rest):
            return False
    return True


def _batched(t: torch.Tensor, batch: tuple[int, ...], tail: tuple[int, ...], name: str):
    """t broadcast to batch + tail, then given exactly two (possibly size-1) batch dims."""
    try:
        t = t.expand(*batch, *tail)
    except RuntimeError:
        raise ValueError(f"gemm: {name} of shape {tuple(t.shape)} does not broadcast to "
                         f"{batch + tail}") from None
    while t.dim() < 2 + len(tail):
        t = t.unsqueeze(0)
    return t


_PLANS = Cache("gemm launches")


def gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, trans_a: bool = False,
         trans_b: bool = False, alpha: float = 1.0, bias: torch.Tensor | None = None,
         accumulate: bool = False, addend: torch.Tensor | None = None,
         input_precision: str | None = None, softcap: float = 0.0) -> torch.Tensor:
    """out = alpha * op(a) @ op(b) (+ bias) (+ out if accumulate, or + addend); returns out.

    a:      (..., M, K), or (..., K, M) with trans_a (op(a) = a^T, a stride swap, no copy)
    b:      (..., K, N), or (..., N, K) with trans_b
    out:    (..., M, N), written in place through its strides; its dtype is the result's
    bias:   (..., N) or (N,): added to every row of the product (after alpha)
    accumulate: add out's previous contents (beta = 1)
    addend: (..., M, N) tensor added instead of out's contents (any dtype; may be out itself)
    input_precision: "ieee" or "tf32" for fp32 operands (default: torch's matmul setting)
    softcap: s > 0: out = s tanh((alpha op(a) @ op(b) + bias) / s) (capped logits; no addend)
    Leading batch dims (at most two) follow out; the others broadcast to them. a and b must
    share a dtype. Checks, views and the launch config are worked out once per signature
    (shapes, strides, dtypes, options) and cached (pydl/_plan.py).
    """
    if accumulate:
        if addend is not None:
            raise ValueError("gemm: give accumulate=True or addend=, not both")
        addend = out
    gemm_plan(a, b, out, trans_a=trans_a, trans_b=trans_b, alpha=alpha, bias=bias,
              addend=addend, input_precision=input_precision, softcap=softcap)(
        a, b, out, bias, addend)
    return out


def gemm_plan(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, trans_a: bool = False,
              trans_b: bool = False, alpha: float = 1.0, bias: torch.Tensor | None = None,
              addend: torch.Tensor | None = None, input_precision: str | None = None,
              softcap: float = 0.0):
    """gemm's plan for this signature, built once (checks, views' strides, the config): a
    callable (a, b, out, bias, addend) that launches it on tensors of the same signature. A
    caller that runs one signature many times (a layer's plan) keeps it and skips the key.
    softcap s > 0: out = s tanh((alpha op(a) @ op(b) + bias) / s) (capped logits; no addend)."""
    precision = input_precision or _default_precision(a.dtype)
    key = (a.shape, a.stride(), a.dtype, b.shape, b.stride(), b.dtype, out.shape, out.stride(),
           out.dtype, out.device, trans_a, trans_b, alpha, precision,
           None if bias is None else (bias.shape, bias.stride(), bias.dtype),
           None if addend is None else (addend is out, addend.shape, addend.stride(),
                                        addend.dtype), softcap)
    return _PLANS.get(key, _plan, a, b, out, trans_a, trans_b, alpha, bias, addend, precision,
                      softcap)


def check_softcap(softcap: float, addend) -> None:
    """A GEMM's softcap (both backends): 0 (none) or positive and finite, without an addend."""
    if not (softcap == 0.0 or 0.0 < softcap < math.inf):
        raise ValueError(f"gemm: softcap must be 0 (none) or positive and finite, got {softcap}")
    if softcap and addend is not None:
        raise ValueError("gemm: softcap caps the product itself: no addend / accumulate")


def _plan(a, b, out, trans_a, trans_b, alpha, bias, addend, precision, softcap=0.0):
    """A callable (a, b, out, bias, addend) for this signature: checks done, the batched views'
    strides and the config (autotuned on a GPU) fixed."""
    check_softcap(softcap, addend)
    from .kernels.triton import gemm as k
    if a.dim() < 2 or b.dim() < 2 or out.dim() < 2 or out.dim() > 4:
        raise ValueError(f"gemm: needs matrices with at most two batch dims, got "
                         f"{tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
    if trans_a:
        a = a.transpose(-1, -2)
    if trans_b:
        b = b.transpose(-1, -2)
    M, N = out.shape[-2:]
    K = a.shape[-1]
    if a.shape[-2] != M or b.shape[-1] != N or b.shape[-2] != K:
        raise ValueError(f"gemm: shapes {tuple(a.shape)} @ {tuple(b.shape)} -> {tuple(out.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"gemm: operands must share a dtype, got {a.dtype} and {b.dtype}")
    batch = tuple(out.shape[:-2])
    a4 = _batched(a, batch, (M, K), "a")
    b4 = _batched(b, batch, (K, N), "b")
    c4 = _batched(out, batch, (M, N), "out")
    d4 = _batched(addend, batch, (M, N), "addend") if addend is not None else c4
    bias4 = _batched(bias, batch, (N,), "bias") if bias is not None else None
    if out.numel() == 0:
        return _by_pointer(lambda *tensors: None)
    folded = _fold_batch(a4, b4, c4, d4, bias4)
    if folded is not None:          # one matrix of every batch's rows
        a4, b4, c4, d4, bias4 = folded
        M = c4.shape[2]
    B1, B2 = c4.shape[0], c4.shape[1]
    consts = dict(ACCUMULATE=addend is not None, HAS_BIAS=bias4 is not None,
                  INPUT_PRECISION=precision)
    if softcap:
        consts["SOFTCAP"] = float(softcap)
    # slices of the batch that fit the grid's z dimension (one launch when B1 * B2 <= 65535)
    step2 = min(B2, GRID_YZ_MAX)
    step1 = max(1, GRID_YZ_MAX // step2)
    single = B1 <= step1 and B2 <= step2

    layouts = _tma_layouts(a4, b4, c4, B1 * B2, precision)    # None: no TMA kernel

    def launches(cfg: dict):
        """[(launch, (i1, i2) batch slice start)], one per slice of the batch."""
        if cfg.get("TMA"):
            tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
            launch = _tma_launch(k, cfg, consts, layouts, tiles, c4.device, M, N, K, a4, b4,
                                 c4, d4, bias4, alpha)
            return [(_aligned_or(launch, pointer_launches(cfg0)[0][0], layouts[2]),
                     (slice(None), slice(None)))]
        return pointer_launches(cfg)

    def pointer_launches(cfg: dict):
        """launches(cfg) of the pointer kernel (not a call of launches: a closure that called
        itself would be a reference cycle holding the operands until the next collection)."""
        tiles = cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"])
        out_ = []
        for i1 in range(0, B1, step1):
            for i2 in range(0, B2, step2):
                s1, s2 = slice(i1, i1 + step1), slice(i2, i2 + step2)
                aa, bb, cc, dd = a4[s1, s2], b4[s1, s2], c4[s1, s2], d4[s1, s2]
                vv = bias4[s1, s2] if bias4 is not None else cc
                out_.append((Launch(k.gemm_kernel, (tiles, 1, cc.shape[0] * cc.shape[1]), (
                    M, N, K, cc.shape[1], *aa.stride(), *bb.stride(), *cc.stride(), *dd.stride(),
                    *(vv.stride() if bias4 is not None else (0, 0, 0)), float(alpha)),
                    {**consts, **cfg}), (s1, s2)))
        return out_

    def views(a, b, out, bias, addend):
        """The 4-D views the launches index: (a, b, out, addend, bias)."""
        a = a.transpose(-1, -2) if trans_a else a
        b = b.transpose(-1, -2) if trans_b else b
        c = _batched(out, batch, (M, N), "out")
        return (_batched(a, batch, (M, K), "a"), _batched(b, batch, (K, N), "b"), c,
                _batched(addend, batch, (M, N), "addend") if addend is not None else c,
                _batched(bias, batch, (N,), "bias") if bias is not None else c)

    def run(slices, a, b, out, bias, addend):
        if single:      # the batched views share their tensors' data pointers: no views
            slices[0][0](a, b, out, out if addend is None else addend,
                         out if bias is None else bias)
            return
        a4_, b4_, c4_, d4_, v4_ = views(a, b, out, bias, addend)
        for launch, (s1, s2) in slices:
            launch(a4_[s1, s2], b4_[s1, s2], c4_[s1, s2], d4_[s1, s2], v4_[s1, s2])

    # The tuning key: what changes the best tile, not the batch (sizes in coarse buckets);
    # which operand is contiguous along K changes the loads, so it is part of the key.
    a0 = a.transpose(-1, -2) if trans_a else a      # the caller's tensors again
    b0 = b.transpose(-1, -2) if trans_b else b
    # Whether the operands load in vectors changes the default (gemm_config) and the best
    # tile. The key's last entry: whether the persistent TMA kernel is among the candidates.
    vectors = vector_loads(a4, b4)
    tune_key = (a.dtype, out.dtype, precision, bucket(M), bucket(N), bucket(K), addend is not None,
                bias4 is not None, a4.stride(-1) == 1, b4.stride(-2) == 1, bool(softcap),
                vectors, layouts is not None)
    cfg0 = gemm_config(M, N, K, a.dtype, vectors)
    candidates = [c for c in gemm_candidates(cfg0, M, N, K, a.dtype.itemsize,
                                             {"GROUP_M": GROUP_M}, layouts is not None,
                                             vectors)
                  if not c.get("TMA") or _tma_fits(c, a.element_size(), out.element_size())]
    cfg = GEMM_TUNER.pick(tune_key, candidates,
                          lambda c: run(launches(c), a0, b0, out, bias, addend),
                          inout=aliased((out,), (addend,)))
    chosen = launches(cfg)
    if single:      # one launch on the callers' tensors: no frame in between (TMA: the TMA
        launch = chosen[0][0]       # launch, or for an unaligned base the default tile's)
        return _by_pointer(lambda a, b, out, bias, addend: launch(
            a, b, out, out if addend is None else addend, out if bias is None else bias))
    return lambda a, b, out, bias, addend: run(chosen, a, b, out, bias, addend)


def _fold_batch(a4, b4, c4, d4, bias4):
    """(a4, b4, c4, d4, bias4) as one product of B1 B2 M rows where B and the bias are the same
    for every batch (broadcast: stride 0) and the batches of A, C and D lie one after another
    (their rows viewable as one matrix): a recurrent layer's projection of every time step by
    one weight, x (T, B, I) W^T. One matrix takes full-height tiles, reads B once per row of
    tiles instead of once per batch, and is one the TMA kernel can read. None where the
    batch does not fold (or there is none)."""
    if a4.shape[0] * a4.shape[1] == 1:
        return None
    for t in (b4, bias4):
        if t is not None and any(s for n, s in zip(t.shape[:2], t.stride()[:2]) if n > 1):
            return None
    try:
        a, c, d = (t.view(1, 1, -1, t.shape[-1]) for t in (a4, c4, d4))
    except RuntimeError:            # a batch stride that is not its rows' extent
        return None
    return a, b4[:1, :1], c, d, None if bias4 is None else bias4[:1, :1]


def _tma_layouts(a4, b4, c4, batch: int, precision: str) -> tuple[bool, bool, bool] | None:
    """(A_ROWS, B_ROWS, C_ROWS) where the persistent TMA kernel can read this product's
    operands, else None: one matrix (no batch), on a device with TMA (Hopper and newer;
    emulation), each operand with unit stride along one axis and a multiple of 16 bytes along
    the other (a descriptor's row pitch); 16-bit operands (wgmma reads them from shared memory
    along either axis), or fp32 ones multiplied as TF32 with both stored along K (wgmma's
    TF32 reads K-major operands only: x W^T, as a linear layer or a recurrent projection
    stores them). C_ROWS: the output too, as rows (unit stride along N), is written by TMA
    stores. The bases' alignment is checked per call."""
    if batch != 1 or not tma_available(a4.device) or a4.shape[-1] == 0:   # (K = 0: none)
        return None
    layouts = [_rows(a4[0, 0]), _rows(b4[0, 0])]
    if None in layouts:
        return None
    if a4.dtype not in (torch.float16, torch.bfloat16) and not (
            a4.dtype == torch.float32 and precision == "tf32" and layouts == [True, False]):
        return None
    return (*layouts, _rows(c4[0, 0]) is True)


def _rows(t: torch.Tensor) -> bool | None:
    """True where the matrix t is TMA-addressable as stored rows (unit stride along its
    columns, its rows a multiple of 16 bytes apart and not overlapping), False where as stored
    columns, None where neither."""
    rows, cols = t.stride()
    size = t.element_size()
    if cols == 1 and rows * size % 16 == 0 and rows >= t.shape[1]:
        return True
    if rows == 1 and cols * size % 16 == 0 and cols >= t.shape[0]:
        return False
    return None


def _tma_fits(cfg: dict, operand_size: int, out_size: int) -> bool:
    """Whether a TMA candidate's shared memory fits: its operands' ring and C's tile (its
    epilogue's staging, which the persistent pipeline cannot lay over the ring: the next
    tile's loads are in flight there) in a block (an fp32 output of a 128 x 256 tile takes
    272 KiB), and PER_SM of them in a multiprocessor (two 128 x 128 programs with an fp32
    output: 256 KiB)."""
    ring = cfg["num_stages"] * (cfg["BLOCK_M"] + cfg["BLOCK_N"]) * cfg["BLOCK_K"] * operand_size
    block = ring + cfg["BLOCK_M"] * cfg["BLOCK_N"] * out_size
    return block <= SMEM_PER_BLOCK and cfg.get("PER_SM", 1) * block <= SMEM_PER_SM


def _aligned_or(tma, fallback, out_too: bool):
    """A launch (a, b, out, addend, bias) by `tma`, the TMA kernel's, where A's and B's bases
    (with `out_too` C's) are 16-byte aligned (what a descriptor addresses: the usual case),
    else by `fallback`, the pointer kernel's default tile (a view starting mid-row)."""
    per_thread = not _env.INTERPRET

    def run(a, b, out, addend, bias):
        if (a.data_ptr() | b.data_ptr() | (out.data_ptr() if out_too else 0)) & 15:
            fallback(a, b, out, addend, bias)
            return
        if per_thread:
            ensure_triton_allocator()       # a ContextVar: set per thread
        tma(a, b, out, addend, bias)
    return run


def _tma_launch(k, cfg: dict, consts: dict, layouts: tuple, tiles: int, device, M, N, K, a4,
                b4, c4, d4, bias4, alpha: float):
    """The persistent TMA kernel's launch on one matrix: cfg["PER_SM"] programs per
    multiprocessor (default one: a 3-stage pipeline takes 128-208 KiB of shared memory at
    sm_90), each taking every grid-th tile. Its tensors: (a, b, c, d, bias) as
    gemm_kernel's (data pointers read only)."""
    programs = min(tiles, multiprocessors(device) * cfg.get("PER_SM", 1))
    cfg = {n: v for n, v in cfg.items() if n not in ("TMA", "PER_SM")}
    vv = bias4[0, 0] if bias4 is not None else None
    return Launch(k.gemm_tma_kernel, (programs,), (
        M, N, K, *a4[0, 0].stride(), *b4[0, 0].stride(), *c4[0, 0].stride(),
        *d4[0, 0].stride(), vv.stride(0) if vv is not None else 0, float(alpha)),
        {**consts, **cfg, "A_ROWS": layouts[0], "B_ROWS": layouts[1], "C_ROWS": layouts[2]})


def _by_pointer(plan):
    """Mark a plan that reads only its tensors' data pointers (one launch, every stride fixed
    in it, or none): it runs the same on any tensor that starts where its operand does."""
    plan.by_pointer = True
    return plan


def gemm_plan_on(bases: tuple, a, b, out, *, bias=None, addend=None, **how):
    """gemm_plan(a, b, out, bias=, addend=, **how) for operands that are views of the tensors
    `bases` (a, b, out, bias, addend: what each views, None where absent), made the same way
    every call of the caller's plan: a callable on the bases themselves, (a, b, out, bias,
    addend), that views them so and launches. Each view keeps its shape, strides and offset
    from its base's start; a plan reading only data pointers (one launch) is given the base
    itself where its view starts there (no view per call: about 1 us each here)."""
    views = (a, b, out, bias, addend)
    plan = gemm_plan(a, b, out, bias=bias, addend=addend, **how)
    pointer = getattr(plan, "by_pointer", False)
    makers = [None if v is None or (pointer and v.data_ptr() == t.data_ptr())
              else _view_maker(t, v) for t, v in zip(bases, views)]
    if not any(makers):
        return plan
    makers = [m or _same for m in makers]
    return lambda *tensors: plan(*[m(t) for m, t in zip(makers, tensors)])


def _same(t):
    return t


def _view_maker(base: torch.Tensor, view: torch.Tensor):
    """t -> t viewed as `view` views `base` (its shape, strides and offset from base's start)."""
    shape, stride = tuple(view.shape), view.stride()
    delta = view.storage_offset() - base.storage_offset()
    return lambda t: t.as_strided(shape, stride, t.storage_offset() + delta)


__all__ = ["gemm", "gemm_plan", "gemm_plan_on", "gemm_config"]
