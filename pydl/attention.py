"""scaled_dot_product_attention: argument checks, autograd Function, kernel launches.

Kernels: kernels/triton/attention.py (flash-style forward and backward). Semantics are
torch.nn.functional.scaled_dot_product_attention's: softmax(q k^T * scale + mask) v with scale
1/sqrt(E) by default, boolean masks (True = attend) or float masks (added) broadcast over batch
and heads, top-left causal alignment, grouped-query K/V heads (enable_gqa), dropout applied
whenever dropout_p > 0 (as torch does, with no training flag), and rows with every key masked
giving 0 (torch's safe softmax).

Inputs are (..., L, E) with up to two leading dims (batch, heads); they are viewed as
(B, H, L, E) without copies and the kernels read their strides.
"""
from __future__ import annotations

import math

from typing import Optional

import torch
from torch import Tensor

from . import _env
from . import _launch
from . import attention_hopper, attention_onepass
from . import _tune as tune
from ._autograd import without_double_backward
from ._checks import check_tensor
from ._gemm import gemm_plan_on
from ._gemm_numba import on_tensor_cores, pair_words
from ._interop import public_op
from ._library import autocast_inputs, empty_like_shape, kernel_op
from ._launch import (DYNAMIC, SIM_MAX_BLOCKS, NumbaLaunch, Place, cdiv, dot_block, fresh,
                      input_precision, launch_numba_1d, launch_numba_built, new_output,
                      next_power_of_2, numba_blocks, numba_threads, output_maker, planned_once,
                      tf32_allowed)
from ._plan import (Cache, Launch, apply, capturing, emulated, needs_graph, plain_tensors,
                    tensors_key)
from .backends import current_backend, dispatch, register, resolve_algo

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2
_NO_SEED = torch.zeros((), dtype=torch.int64)     # the seed output without dropout


def _blocks(E: int, EV: int) -> dict:
    """Emulation's tiles, and the head-dimension blocks of every config."""
    # Small tiles in emulation so that short test sequences still span several tiles.
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=max(16, next_power_of_2(E)),
                BLOCK_DV=max(16, next_power_of_2(EV)), num_warps=4)


# Tuning spaces (BLOCK_M, BLOCK_N, num_warps, num_stages) of the three flash kernels, after
# FlashAttention-2's split; on a GPU the first entry is the default (PYDL_TUNE=0). The forward
# and dQ programs own 64-128 query rows and stream keys; the dK/dV program owns 64-128 keys
# and streams queries in steps of 16-64, computing key-major tiles so that all four of its
# products have the key block as rows (wgmma). Pruned with `python -m bench resources`
# (sm_90, d = 128, bf16): 128-row query tiles need 8 warps (at 4 they spill), dK/dV tiles with
# 64 query rows spill; tiles that fail to compile for a head dimension (d = 256) are skipped
# by the tuner.
ATTENTION_SPACES = {
    "fwd": ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4),
            (64, 128, 4, 3)),
    "bwd_dkdv": ((32, 128, 8, 3), (32, 64, 4, 4), (16, 64, 4, 4), (16, 128, 8, 3),
                 (64, 64, 8, 3)),
    "bwd_dq": ((128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 4, 4)),
}
# fp32 without TF32 (torch's default for matmuls): tl.dot's IEEE products run on the CUDA
# cores, each thread holding its rows' operands along the whole head dim, so every tile above
# spills (2-17 KB a thread at d64; `python -m bench resources`, "d64-1k fp32" and
# "d128-1k fp32", sm_90). These, more warps to a smaller tile, hold the kernels within the
# registers at d64 and d128 (the forward then without TMA: through tensor descriptors every
# fp32 tile spilled): forward 80-96 registers, dK/dV 76-102 (the first; the others spill at
# one of the two), dQ 80-156.
ATTENTION_SPACES_IEEE = {
    "fwd": ((32, 64, 8, 2), (16, 64, 4, 2)),
    "bwd_dkdv": ((16, 64, 16, 2), (16, 32, 8, 2), (32, 32, 8, 2)),
    "bwd_dq": ((32, 64, 8, 2), (64, 32, 8, 2)),
}
ATTENTION_TUNERS = {name: tune.Tuner(f"attention_{name}") for name in ATTENTION_SPACES}


def _attention_config(kernel: str, q, k, v, is_causal: bool, mask_kind: int, dropout: bool,
                      launch) -> dict:
    """The launch config of one flash kernel; keyed on everything but the batch and heads,
    with the sequence lengths in coarse buckets."""
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    blocks = _blocks(E, EV)
    precision = input_precision(q.dtype)
    spaces = ATTENTION_SPACES_IEEE if _ieee_fp32(q) else ATTENTION_SPACES
    candidates = [
        dict(blocks, BLOCK_M=dot_block(L, bm), BLOCK_N=dot_block(S, bn), num_warps=warps,
             num_stages=stages)
        for bm, bn, warps, stages in spaces[kernel]]
    if _env.INTERPRET:
        candidates.insert(0, blocks)
    key = (q.dtype, precision, E, EV, is_causal, mask_kind, dropout,
           tune.bucket(L, hi=1 << 14), tune.bucket(S, hi=1 << 14), H != HKV)
    return ATTENTION_TUNERS[kernel].pick(key, candidates, launch)


def _ieee_fp32(q) -> bool:
    """fp32 inputs whose products are exact fp32 (TF32 off): tl.dot's IEEE path."""
    return q.dtype == torch.float32 and input_precision(q.dtype) == "ieee"


def _group(H: int, HKV: int) -> int:
    """Query heads per key/value head (grouped-query attention); 1 without heads (an empty
    call, no kernel reads it)."""
    return H // HKV if HKV else 1


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _forward_tma(q, k, v, o) -> bool:
    """Whether the flash forward moves q, k, v and o through TMA tensor descriptors: on a GPU
    that has TMA (and in emulation) when every (batch, head) slice allows it; else the
    pointer loads (pre-Hopper GPUs, unaligned or strided layouts)."""
    if _ieee_fp32(q):
        return False        # its FMA products spill every tile loaded through TMA
    bd, bdv = next_power_of_2(q.shape[3]), next_power_of_2(v.shape[3])   # boxes (>= 16 wide)
    use = _launch.tma_available(q.device) and _launch.tma_compatible(q, bd) and \
        _launch.tma_compatible(k, bd) and _launch.tma_compatible(v, bdv) and \
        _launch.tma_compatible(o, bdv)
    if use and not _env.INTERPRET:
        _launch.ensure_triton_allocator()
    return use


# Launches of the flash kernels, built once per signature (pydl/_plan.py): shapes, strides,
# dtypes, device, the mask's layout, the options, and (forward) whether TMA can address the
# tensors, which depends on their base alignment too. The dropout seed changes every call: it
# is each kernel's last scalar argument, passed by keyword.
_LAUNCHES = Cache("attention launches")


def _key(kernel: str, *tensors, **options) -> tuple:
    return (kernel, *[None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors],
            tensors[0].device, input_precision(tensors[0].dtype), *options.values())


def plan_delta(o, do, acc_e: int | None = None):
    """run(o, do) -> (delta, dq_acc) for tensors of these shapes and strides, the flash
    backwards' first kernel, its outputs' allocation and its launch fixed: delta (B * H, L) =
    rowsum(dO * O); with acc_e (the single-pass backward: the query's head dim, 0 included)
    dq_acc, an fp32 (B * H, L, acc_e) accumulator the same launch zeroes, else None."""
    B, H, L, _ = o.shape
    new_delta = output_maker((B * H, L), torch.float32, o.device)
    new_acc = None if acc_e is None else output_maker((B * H, L, acc_e), torch.float32,
                                                      o.device)
    launch = _LAUNCHES.get(_key("delta", o, do, acc_e=acc_e), _plan_delta, o, do, acc_e)

    def run(o, do):
        delta = fresh(new_delta)
        if new_acc is None:
            launch(o, do, delta, delta)     # the accumulator's place: not read
            return delta, None
        acc = fresh(new_acc)   # poisoned in the tests: the launch must zero every element
        launch(o, do, delta, acc)
        return delta, acc
    return run


def _plan_delta(o, do, acc_e: int | None) -> Launch:
    from .kernels.triton import attention as kt
    B, H, L, EV = o.shape
    pre = dict(_blocks(EV, EV), BLOCK_M=16 if _env.INTERPRET else 64)
    zero = {} if acc_e is None else dict(ZERO_DQ=True, BLOCK_D=max(16, next_power_of_2(acc_e)))
    return Launch(kt.attention_bwd_preprocess, (cdiv(L, pre["BLOCK_M"]) * B * H,),
                  (*o.stride(), *do.stride(), H, L, acc_e or 0, EV),
                  dict(BLOCK_M=pre["BLOCK_M"], BLOCK_DV=pre["BLOCK_DV"], **zero))


def _seeded(launch: Launch, dropout_p: float):
    """launch called as run(*tensors, seed): the seed by keyword with dropout (it changes every
    call), else not at all (0, fixed in the launch's scalars, which keeps the direct launch)."""
    if dropout_p > 0:
        return lambda *tensors: launch(*tensors[:-1], seed=tensors[-1])
    return lambda *tensors: launch(*tensors[:-1])


def _seed_scalar(dropout_p: float) -> tuple:
    """The seed, the kernels' last scalar, fixed at 0 in a launch without dropout."""
    return () if dropout_p > 0 else (0,)


def _trial_seed(in_memory: bool, device):
    """The seed of a tuner's trial launch: 0, in memory where the kernel reads it so."""
    return torch.zeros(1, dtype=torch.int32, device=device) if in_memory else 0


def _dropout_kind(dropout_p: float, L: int, S: int, in_memory: bool = False) -> int:
    """The kernels' DROPOUT constant: off, or on with Philox counters i * S + j of 32 bits, or of
    64 where a (batch, head) plane of L x S scores would wrap a 32-bit counter; plus
    SEED_IN_MEMORY where the seed is a device tensor (`_new_seed`)."""
    from .kernels.triton import attention as kt
    if dropout_p == 0:
        return kt.DROPOUT_OFF.value
    kind = kt.DROPOUT_64 if L * S >= 2 ** 32 else kt.DROPOUT_32
    return kind.value + (kt.SEED_IN_MEMORY.value if in_memory else 0)


class _TritonAttention:
    """The flash kernels' launcher: plan_forward and plan_backward (as every launcher of
    LAUNCHERS)."""

    @staticmethod
    def plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                     in_memory=False):
        """run(q, k, v, o, lse, mask, seed) for tensors of these shapes, strides and 16-byte
        alignment (the mask, when given, at the address of the (B, H, L, S) view planned);
        in_memory: the seed is a device tensor (`_new_seed`)."""
        aligned = (q.data_ptr() | k.data_ptr() | v.data_ptr() | o.data_ptr()) % 16 == 0
        key = _key("fwd", q, k, v, mask, kind=mask_kind, causal=is_causal, scale=scale,
                   dropout=dropout_p, aligned=aligned, in_memory=in_memory)
        return _LAUNCHES.get(key, _TritonAttention._forward_run, q, k, v, o, lse, mask,
                             mask_kind, is_causal, scale, dropout_p, in_memory)

    @staticmethod
    def _forward_run(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p, in_memory):
        launch = _TritonAttention._plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal,
                                                scale, dropout_p, in_memory)
        tma = launch.consts["USE_TMA"] and not _env.INTERPRET
        seeded = dropout_p > 0

        def run(q, k, v, o, lse, mask, seed):
            if tma:
                _launch.ensure_triton_allocator()      # per thread: a ContextVar
            if seeded:
                launch(q, k, v, o, lse, q if mask is None else mask, seed=seed)
            else:
                launch(q, k, v, o, lse, q if mask is None else mask)
        return run

    @staticmethod
    def _plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                      in_memory) -> Launch:
        from .kernels.triton import attention as kt
        B, H, L, E = q.shape
        HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
        use_tma = _forward_tma(q, k, v, o)
        scalars = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), *_strides4(mask),
                   H, L, S, E, EV, _group(H, HKV), scale, dropout_p, *_seed_scalar(dropout_p))
        consts = dict(IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
                      DROPOUT=_dropout_kind(dropout_p, L, S, in_memory),
                      INPUT_PRECISION=input_precision(q.dtype), USE_TMA=use_tma,
                      SCALE_NEGATIVE=scale < 0)

        def launch(cfg):
            return Launch(kt.attention_fwd, (cdiv(L, cfg["BLOCK_M"]) * B * H,), scalars,
                          {**consts, **cfg})

        m = mask if mask is not None else q
        cfg = _attention_config("fwd", q, k, v, is_causal, mask_kind, dropout_p > 0,
                                lambda c: _seeded(launch(c), dropout_p)(
                                    q, k, v, o, lse, m, _trial_seed(in_memory, q.device)))
        return launch(cfg)

    @staticmethod
    def plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask, in_memory=False):
        """run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask): the delta, dK/dV and dQ
        launches for tensors of these shapes and strides (dmask: None, or a (B, H, L, S)
        output for the float mask's gradient dS, as planned; in_memory as plan_forward's)."""
        key = _key("bwd", q, k, v, o, do, mask, dq, dk, dv, dmask, kind=mask_kind,
                   causal=is_causal, scale=scale, dropout=dropout_p, in_memory=in_memory)
        return _LAUNCHES.get(key, _TritonAttention._backward_run, q, k, v, o, lse, do, dq, dk,
                             dv, mask, mask_kind, is_causal, scale, dropout_p, dmask, in_memory)

    @staticmethod
    def _backward_run(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask, in_memory):
        delta_of = plan_delta(o, do)
        delta, _ = delta_of(o, do)      # the tuner's trials run on the real rows
        m = mask if mask is not None else q
        options = dict(kind=mask_kind, causal=is_causal, scale=scale, dropout=dropout_p,
                       in_memory=in_memory)
        dkdv = _seeded(_LAUNCHES.get(
            _key("bwd_dkdv", q, k, v, do, mask, dk, dv, **options),
            _TritonAttention._plan_backward, "bwd_dkdv", q, k, v, do, lse, delta, m, dk, dv, mask,
            mask_kind, is_causal, scale, dropout_p, in_memory), dropout_p)
        dq_out = (dq, dmask if dmask is not None else dq)
        dq_launch = _seeded(_LAUNCHES.get(
            _key("bwd_dq", q, k, v, do, mask, dq, dmask, **options),
            _TritonAttention._plan_backward, "bwd_dq", q, k, v, do, lse, delta, m, dq_out, dmask,
            mask, mask_kind, is_causal, scale, dropout_p, in_memory), dropout_p)

        def run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask):
            delta, _ = delta_of(o, do)
            m = q if mask is None else mask
            dkdv(q, k, v, do, lse, delta, m, dk, dv, seed)
            dq_launch(q, k, v, do, lse, delta, m, dq, dq if dmask is None else dmask, seed)
        return run

    @staticmethod
    def _plan_backward(kernel, q, k, v, do, lse, delta, m, out1, out2, mask, mask_kind, is_causal,
                       scale, dropout_p, in_memory) -> Launch:
        """The dK/dV launch (out1, out2 = dk, dv) or the dQ launch (out1 = (dq, dmask or dq),
        out2 = dmask or None)."""
        from .kernels.triton import attention as kt
        B, H, L, E = q.shape
        HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
        consts = dict(IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
                      DROPOUT=_dropout_kind(dropout_p, L, S, in_memory),
                      INPUT_PRECISION=input_precision(q.dtype))
        head = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *_strides4(mask))
        seed = _seed_scalar(dropout_p)
        if kernel == "bwd_dkdv":
            dk, dv = out1, out2
            tensors = (q, k, v, do, lse, delta, m, dk, dv)

            def launch(cfg):
                return Launch(kt.attention_bwd_dkdv, (cdiv(S, cfg["BLOCK_N"]) * B * HKV,), (
                    *head, *dk.stride(), *dv.stride(), H, HKV, L, S, E, EV, _group(H, HKV), scale,
                    dropout_p, *seed), {**consts, **cfg})
        else:
            (dq, dmask_or_dq), dmask = out1, out2
            tensors = (q, k, v, do, lse, delta, m, dq, dmask_or_dq)

            def launch(cfg):
                return Launch(kt.attention_bwd_dq, (cdiv(L, cfg["BLOCK_M"]) * B * H,), (
                    *head, *dq.stride(), *_strides4(dmask), H, L, S, E, EV, _group(H, HKV), scale,
                    dropout_p, *seed), {**consts, "MASK_GRAD": dmask is not None, **cfg})

        cfg = _attention_config(kernel, q, k, v, is_causal, mask_kind, dropout_p > 0,
                                lambda c: _seeded(launch(c), dropout_p)(
                                    *tensors, _trial_seed(in_memory, q.device)))
        return launch(cfg)

    @staticmethod
    def dropout_mask(B, H, L, S, dropout_p, seed, device) -> torch.Tensor:
        """The keep mask (B, H, L, S) that forward and backward use for this seed."""
        from .kernels.triton import attention as kt
        keep = new_output((B, H, L, S), torch.int8, device)
        kt.attention_dropout_mask[(cdiv(L, 16) * B * H,)](
            keep, L, S, dropout_p, seed, DROPOUT=_dropout_kind(dropout_p, L, S), BLOCK_M=16,
            BLOCK_N=16)
        return keep.bool()


def _numba_grid(n_items: int) -> int:
    """Blocks for a Numba kernel that loops grid-stride over `n_items` work items: one each on
    a GPU; a single block in the CUDA simulator, where each block costs tens of ms to start."""
    return max(1, min(n_items, SIM_MAX_BLOCKS) if _env.INTERPRET else n_items)


def _numba_mask(mask):
    """(tensor, dtype code) of an attention mask for the Numba kernels: bool as uint8 bytes,
    float as is."""
    from .kernels.numba import attention as kn
    if mask is None:
        return None, 0
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 0
    return mask, kn.BF16 if mask.dtype == torch.bfloat16 else 0


def _numba_dropout(dropout_p: float, seed: int) -> tuple:
    """(dropout, threshold, drop_scale, seed) kernel arguments: a score is dropped when its
    32-bit hash is below threshold = p * 2**32. The seed may be DYNAMIC (a plan's)."""
    if dropout_p > 0:
        # p = 1: the threshold 2**32 is above every hash (all dropped); the scale is unused
        return (True, int(dropout_p * 4294967296.0), 1.0 / (1.0 - dropout_p) if dropout_p < 1
                else 0.0,
                seed if seed is DYNAMIC else int(seed))
    return False, 0, 1.0, 0


# The Numba kernels on tensor cores (kernels/numba/attention_mma.py; with pydl._gemm_numba.MMA,
# fp16 / bf16 inputs, head dims up to 128): the forward's warps a block, each owning 16 query
# rows (the backward's: attention_mma.bwd_tile). One in the simulator, where the warp's
# product is a block-wide rendezvous of Python threads (None: the GPU's, for
# `python -m bench numba-resources`).
NUMBA_MMA_WARPS, NUMBA_SIM_MMA_WARPS = 4, 1


def _mma_warps(gpu: int) -> int:
    """The warps a block of a tensor-core attention kernel: `gpu` on a GPU, the simulator's
    where it runs."""
    return NUMBA_SIM_MMA_WARPS if _env.INTERPRET and NUMBA_SIM_MMA_WARPS else gpu


def _numba_mma_words(*tensors):
    """Whether the tensor-core kernels take these (q, k, v[, dO]): None where they cannot (MMA
    off, fp32 or mixed dtypes, a head dim past their limit), else each tensor as int32 words
    of pairs, or None for one whose head dim is odd or not contiguous (the forward stages it
    element by element; the backward then keeps its CUDA-core kernels)."""
    if not on_tensor_cores(*tensors):
        return None
    from .kernels.numba import attention_mma as km       # the kernels load on first use
    if max(t.shape[3] for t in tensors) > km.MAX_HEAD_DIM:
        return None
    return [pair_words(t) for t in tensors]


class _NumbaAttention:
    """Same methods as _TritonAttention, on the Numba kernels (kernels/numba/attention.py):
    plans of NumbaLaunches (on a GPU a repeated call writes its tensors' pointers and the
    dropout seed alone). On the tensor cores (kernels/numba/attention_mma.py) the kernel's
    form depends on each operand's 4-byte alignment, so those launches are built per call."""

    @staticmethod
    def _forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p, seed):
        """(kernel, grid, threads, device, arguments, places in (q, k, v, o, lse, mask), on
        the tensor cores or not) of the forward; seed may be DYNAMIC."""
        from .kernels.numba import attention as kn
        B, H, L, E = q.shape
        m, mask_code = _numba_mask(mask)
        words = _numba_mma_words(q, k, v)
        if words is not None:   # int32 words of pairs where the head dim allows, else int16
            qkv = [t.view(torch.int16) if w is None else w for t, w in zip((q, k, v), words)]
        else:
            qkv = [q, k, v]
        args = (*qkv, o, lse, m if m is not None else qkv[0], mask_kind, mask_code,
                bool(is_causal), float(scale), *_numba_dropout(dropout_p, seed),
                kn.dtype_code(q.dtype))
        places = (0, 1, 2, 3, 4, 5 if m is not None else 0)
        if words is not None:
            from .kernels.numba import attention_mma as km
            warps = _mma_warps(NUMBA_MMA_WARPS)
            bn, BD, BDV = km.tile(E, v.shape[3])
            kernel = km.fwd_mma_kernel(warps, bn, BD, BDV, q.dtype == torch.bfloat16,
                                       *[w is not None for w in words])
            return (kernel, _numba_grid(cdiv(L, 16 * warps) * B * H), 32 * warps, q.device,
                    args, places, True)
        owned, streamed, BD, BDV = kn.tile_sizes(E, v.shape[3])
        nt = numba_threads(128)
        return (kn.fwd_kernel(owned, streamed, BD, BDV, nt), _numba_grid(cdiv(L, owned) * B * H),
                nt, q.device, args, places, False)

    @staticmethod
    @planned_once
    def plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p):
        """run(q, k, v, o, lse, mask, seed) as _TritonAttention's (the mask, when given, at
        the address of the (B, H, L, S) view planned)."""
        options = (mask_kind, is_causal, scale, dropout_p)
        *launch, places, mma = _NumbaAttention._forward(q, k, v, o, lse, mask, *options,
                                                        DYNAMIC)
        if mma:
            mask4 = _planned_view(mask)
            return lambda q, k, v, o, lse, mask, seed: launch_numba_built(
                _NumbaAttention._forward(q, k, v, o, lse, mask4(mask), *options, seed))
        planned = NumbaLaunch(*launch, (q, k, v, o, lse, mask), places)
        if dropout_p > 0:
            return lambda q, k, v, o, lse, mask, seed: planned(q, k, v, o, lse, mask,
                                                               dynamic=(int(seed),))
        return lambda q, k, v, o, lse, mask, seed: planned(q, k, v, o, lse, mask)

    @staticmethod
    def _backward(q, k, v, o, lse, do, delta, dq, dk, dv, mask, mask_kind, is_causal, scale,
                  dropout_p, seed, dmask):
        """The delta, dK/dV and dQ launches as (kernel, grid, threads, device, arguments,
        places in (q, k, v, do, lse, delta, mask, dk or dq, dv or dmask)), and whether they
        run on the tensor cores; seed may be DYNAMIC."""
        from .kernels.numba import attention as kn
        B, H, L, E = q.shape
        HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
        code = kn.dtype_code(q.dtype)
        # the tensor-core kernels take q, k, v, dO as int32 words of pairs (even head dims)
        words = _numba_mma_words(q, k, v, do)
        if words is not None and any(w is None for w in words):
            words = None
        qkvdo = words or (q, k, v, do)
        threads = numba_threads(256)
        delta_launch = (kn.delta_kernel, numba_blocks(cdiv(B * H * L, threads)), threads,
                        q.device, (o, do, delta, code), (0, 1, 2))
        m, mask_code = _numba_mask(mask)
        head = (*qkvdo, lse, delta)
        tail = (m if m is not None else qkvdo[0], mask_kind, mask_code, bool(is_causal),
                float(scale), *_numba_dropout(dropout_p, seed), code)
        dkdv_args = (*head, dk, dv, *tail)
        dq_args = (*head, dq, dmask if dmask is not None else dq, dmask is not None, *tail)
        placed = (0, 1, 2, 3, 4, 5)
        m_at = 6 if m is not None else 0
        dkdv_places = (*placed, 7, 8, m_at)
        dq_places = (*placed, 7, 8 if dmask is not None else 7, m_at)
        if words is not None:
            from .kernels.numba import attention_mma as km
            warps, bn, BD, BDV = km.bwd_tile(E, EV)
            warps = _mma_warps(warps)
            bf16 = q.dtype == torch.bfloat16
            dkdv = (km.dkdv_mma_kernel(warps, bn, BD, BDV, bf16),
                    _numba_grid(cdiv(S, 16 * warps) * B * HKV), 32 * warps)
            dq_ = (km.dq_mma_kernel(warps, bn, BD, BDV, bf16),
                   _numba_grid(cdiv(L, 16 * warps) * B * H), 32 * warps)
        else:
            owned, streamed, BD, BDV = kn.tile_sizes(E, EV)
            nt = numba_threads(128)
            dkdv = (kn.dkdv_kernel(owned, streamed, BD, BDV, nt),
                    _numba_grid(cdiv(S, owned) * B * HKV), nt)
            dq_ = (kn.dq_kernel(owned, streamed, BD, BDV, nt),
                   _numba_grid(cdiv(L, owned) * B * H), nt)
        return (delta_launch, (*dkdv, q.device, dkdv_args, dkdv_places),
                (*dq_, q.device, dq_args, dq_places), words is not None)

    @staticmethod
    @planned_once
    def plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask):
        """run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask) as _TritonAttention's: dO
        in the output's dtype (converted per call where it is not), the delta row sums into
        a buffer allocated per call, then the dK/dV and dQ kernels."""
        B, H, L, _ = q.shape
        cast, seeded = do.dtype != o.dtype, dropout_p > 0
        do = do.to(o.dtype)
        new_delta = output_maker((B * H, L), torch.float32, q.device)
        delta = new_delta()
        options = (mask_kind, is_causal, scale, dropout_p)
        *launches, mma = _NumbaAttention._backward(q, k, v, o, lse, do, delta, dq, dk, dv,
                                                   mask, *options, DYNAMIC, dmask)
        if mma:
            mask4 = _planned_view(mask)

            def per_call(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask):
                do = do.to(o.dtype)
                delta = new_delta()
                *launches, _ = _NumbaAttention._backward(q, k, v, o, lse, do, delta, dq, dk,
                                                         dv, mask4(mask), *options, seed, dmask)
                for launch in launches:
                    launch_numba_built(launch)
            return per_call
        (*dl, dl_at), (*dkdv, dkdv_at), (*dq_, dq_at) = launches
        delta_of = NumbaLaunch(*dl, (o, do, delta), dl_at)
        dkdv = NumbaLaunch(*dkdv, (q, k, v, do, lse, delta, mask, dk, dv), dkdv_at)
        dq_launch = NumbaLaunch(*dq_, (q, k, v, do, lse, delta, mask, dq, dmask), dq_at)

        def run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask):
            if cast:
                do = do.to(o.dtype)
            delta = new_delta()
            seed = (int(seed),) if seeded else ()
            delta_of(o, do, delta)
            dkdv(q, k, v, do, lse, delta, mask, dk, dv, dynamic=seed)
            dq_launch(q, k, v, do, lse, delta, mask, dq, dmask, dynamic=seed)
        return run

    @staticmethod
    @_env.emulated_launch
    def weights(q, k, mask, mask_kind, is_causal, scale, dropout_p, seed) -> torch.Tensor:
        """The attention weights (B, H, L, S) in q's dtype (kernels/numba/attention.py
        attention_weights): with the flash output, what attention_with_weights returns on
        this backend (NumbaWeightsFunction's forward); under dropout the flash kernels' keep
        pattern for `seed`, kept weights scaled by 1 / (1 - p)."""
        from .kernels.numba import attention as kn
        B, H, L, _ = q.shape
        p = new_output((B, H, L, k.shape[2]), q.dtype, q.device)
        m, mask_code = _numba_mask(mask)
        launch_numba_1d(kn.attention_weights, B * H * L, q.device, q, k,
                        m if m is not None else q, p, float(scale), mask_kind,
                        mask_code, bool(is_causal), H // k.shape[1],
                        *_numba_dropout(dropout_p, seed), kn.dtype_code(q.dtype))
        return p

    @staticmethod
    def weights_backward(q, k, mask, dw, mask_kind, is_causal, scale, dropout_p,
                         seed) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dq, dk, dS) of `weights` given dw, the gradient of the weights it returned:
        dS (B, H, L, S) fp32, the scores' gradient (a float mask's), by one thread per query
        row (attention_weights_bwd, which also writes dq), dk by one per key row."""
        from .kernels.numba import attention as kn
        B, H, L, E = q.shape
        HKV, S = k.shape[1], k.shape[2]
        ds = new_output((B, H, L, S), torch.float32, q.device)
        dq = new_output(q.shape, q.dtype, q.device)
        dk = new_output(k.shape, k.dtype, k.device)
        m, mask_code = _numba_mask(mask)
        code = kn.dtype_code(q.dtype)
        launch_numba_1d(kn.attention_weights_bwd, B * H * L, q.device, q, k,
                        m if m is not None else q, dw, ds, dq, float(scale), mask_kind,
                        mask_code, bool(is_causal), H // HKV, *_numba_dropout(dropout_p, seed),
                        code)
        launch_numba_1d(kn.attention_weights_bwd_keys, B * HKV * S, q.device, q, ds, dk,
                        float(scale), H // HKV, code)
        return dq, dk, ds

    @staticmethod
    def dropout_mask(B, H, L, S, dropout_p, seed, device) -> torch.Tensor:
        """The keep mask (B, H, L, S) that forward and backward use for this seed."""
        from .kernels.numba import attention as kn
        keep = new_output((B * H, L, S), torch.int8, device)
        _, threshold, _, seed = _numba_dropout(dropout_p, seed)
        launch_numba_1d(kn.attention_dropout_mask, B * H * L, device, keep, seed, threshold)
        return keep.view(B, H, L, S).bool()


def _planned_view(mask):
    """mask4(t): t (the mask a call passes, at the address of `mask`) viewed as `mask` was
    planned, its (B, H, L, S) broadcast view; None for no mask."""
    if mask is None:
        return lambda t: None
    place = Place(0, mask, mask, 0)
    return lambda t: place.view(t)


LAUNCHERS = {"triton": _TritonAttention, "numba": _NumbaAttention}


# --- kernel ops (pydl::...) and autograd Functions ------------------------------------------

def _attention_fwd_fake(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, backend):
    B, H, L, _ = q.shape
    return (empty_like_shape(q, (B, H, L, v.shape[3])),
            empty_like_shape(q, (B * H, L), torch.float32),
            torch.empty((), dtype=torch.int64))


@kernel_op("attention_fwd", _attention_fwd_fake)
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], mask_kind: int,
                   is_causal: bool, scale: float, dropout_p: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(output, per-row logsumexp, the dropout seed as a CPU int64 scalar). The seed is drawn
    here, inside the op, so a compiled graph holds no data-dependent scalar."""
    B, H, L, _ = q.shape
    seed = _new_seed(dropout_p, backend, q.device)
    o = new_output((B, H, L, v.shape[3]), q.dtype, q.device)
    lse = new_output((B * H, L), torch.float32, q.device)
    if B * H * L:
        launch_forward(backend, q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                       seed)
    return o, lse, _saved_seed(seed, dropout_p)


def _mask_grad_fake(q, mask, mask_grad):
    """The float mask's gradient (its (B, H, L, S) shape), or an empty placeholder in q's
    dtype: a custom op cannot return None."""
    return empty_like_shape(mask) if mask_grad else empty_like_shape(q, (0,))


@kernel_op("attention_bwd", lambda q, k, v, o, lse, do, mask, seed, mask_kind, is_causal, scale,
           dropout_p, backend, mask_grad: (empty_like_shape(q), empty_like_shape(k),
                                           empty_like_shape(v), _mask_grad_fake(q, mask, mask_grad)))
def _attention_bwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor,
                   mask: Optional[Tensor], seed: Tensor, mask_kind: int, is_causal: bool,
                   scale: float, dropout_p: float, backend: str,
                   mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, the float mask's gradient dS (B, H, L, S) with mask_grad, else empty)."""
    dq = new_output(q.shape, q.dtype, q.device)
    dk = new_output(k.shape, k.dtype, k.device)
    dv = new_output(v.shape, v.dtype, v.device)
    dmask = (new_output(mask.shape, mask.dtype, mask.device) if mask_grad
             else _mask_grad_fake(q, mask, False))      # the fake's placeholder
    if q.shape[0] * q.shape[1] * q.shape[2] == 0:   # no query rows: keys get no gradient
        return dq, dk.zero_(), dv.zero_(), dmask
    launch_backward(backend, q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                    dropout_p, _seed_of(seed, dropout_p), dmask if mask_grad else None)
    return dq, dk, dv, dmask


def launch_forward(backend: str, q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                   seed) -> None:
    """The forward kernels of launcher LAUNCHERS[backend] into o and lse, once: its plan for
    these tensors (pydl._plan), run."""
    LAUNCHERS[backend].plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale,
                                    dropout_p, *_seed_mode(seed))(q, k, v, o, lse, mask, seed)


def launch_backward(backend: str, q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal,
                    scale, dropout_p, seed, dmask) -> None:
    """The backward kernels of launcher LAUNCHERS[backend] into dq, dk, dv (and dmask, the
    float mask's gradient, unless None), once, as launch_forward."""
    LAUNCHERS[backend].plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind,
                                     is_causal, scale, dropout_p, dmask, *_seed_mode(seed))(
        q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask)


class AttentionKernels:
    """The flash attention's kernel ops for one set of options on one launcher (a backend, or
    an algo's own: LAUNCHERS): what AttentionFunction runs, pydl:: custom ops under
    torch.compile. In eager mode a call signature's plan (_AttentionCall, a subclass) runs the
    same steps with its outputs' allocation and its launches fixed."""

    __slots__ = ("mask_kind", "is_causal", "scale", "dropout_p", "backend")

    def __init__(self, mask_kind: int, is_causal: bool, scale: float, dropout_p: float,
                 backend: str):
        self.mask_kind, self.is_causal, self.scale = mask_kind, is_causal, scale
        self.dropout_p, self.backend = dropout_p, backend

    def forward(self, q, k, v, mask):
        """(o, per-row logsumexp, the dropout seed as a CPU int64 scalar)."""
        return _attention_fwd(q, k, v, mask, self.mask_kind, self.is_causal, self.scale,
                              self.dropout_p, self.backend)

    def backward(self, q, k, v, o, lse, do, mask, seed, mask_grad: bool):
        """(dq, dk, dv, the float mask's gradient with mask_grad)."""
        return _attention_bwd(q, k, v, o, lse, do, mask, seed, self.mask_kind, self.is_causal,
                              self.scale, self.dropout_p, self.backend, mask_grad)


class _SeedKept(AttentionKernels):
    """AttentionKernels that keep the dropout seed of their last forward (a CPU int64
    scalar): the numba backend's weights kernel drops what the flash output dropped."""

    __slots__ = ("seed",)

    def forward(self, q, k, v, mask):
        o, lse, self.seed = super().forward(q, k, v, mask)
        return o, lse, self.seed


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, ops: AttentionKernels):
        o, lse, seed = ops.forward(q, k, v, mask)
        ctx.save_for_backward(q, k, v, o, lse, mask, seed)
        ctx.ops = ops
        return o

    @staticmethod
    def backward(ctx, do):
        if torch.is_grad_enabled():      # create_graph: no double backward, say so
            return without_double_backward("scaled_dot_product_attention",
                                           AttentionFunction.backward, ctx, do)
        q, k, v, o, lse, mask, seed = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[3]      # a float mask that requires grad
        dq, dk, dv, dmask = ctx.ops.backward(q, k, v, o, lse, do, mask, seed, mask_grad)
        # dmask is (B, H, L, S); autograd's expand backward sums it over the broadcast dims
        return dq, dk, dv, (dmask if mask_grad else None), None


def _naive_fwd_fake(q, k, v, mask, mask_kind, is_causal, scale):
    B, H, L, _ = q.shape
    return (empty_like_shape(q, (B, H, L, v.shape[3])),
            empty_like_shape(q, (B, H, L, k.shape[2])))


def _naive_key(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, in_memory) -> tuple:
    return _key("naive_fwd", q, k, v, mask, kind=mask_kind, causal=is_causal, scale=scale,
                dropout_p=dropout_p, in_memory=in_memory)


@kernel_op("attention_naive_fwd", _naive_fwd_fake)
def _attention_naive_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], mask_kind: int,
                         is_causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """(output, attention weights P) without dropout."""
    o, p, _ = _LAUNCHES.get(_naive_key(q, k, v, mask, mask_kind, is_causal, scale, 0.0, False),
                            _plan_naive_fwd, q, k, v, mask, mask_kind, is_causal, scale, 0.0,
                            False)(q, k, v, mask, 0)
    return o, p


def _naive_dropout_fwd_fake(q, k, v, mask, mask_kind, is_causal, scale, dropout_p):
    o, w = _naive_fwd_fake(q, k, v, mask, mask_kind, is_causal, scale)
    return o, w, empty_like_shape(w), torch.empty((), dtype=torch.int64)


@kernel_op("attention_naive_dropout_fwd", _naive_dropout_fwd_fake)
def _attention_naive_dropout_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                                 mask_kind: int, is_causal: bool, scale: float,
                                 dropout_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output, the attention weights, the undropped P, the dropout seed as a CPU int64
    scalar) with dropout_p > 0: the weights are torch's, P' = P * keep / (1 - p), the output
    P' v, with the flash kernels' keep pattern for the seed; the backward's softmax gradient
    needs P itself."""
    seed = _new_seed(dropout_p, "triton", q.device)
    in_memory = isinstance(seed, torch.Tensor)
    o, weights, p = _LAUNCHES.get(
        _naive_key(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, in_memory),
        _plan_naive_fwd, q, k, v, mask, mask_kind, is_causal, scale, dropout_p, in_memory)(
        q, k, v, mask, seed)
    return o, weights, p, _saved_seed(seed, dropout_p)


def _weights_fake(q, k, mask, mask_kind, is_causal, scale, dropout_p, seed):
    B, H, L, _ = q.shape
    return empty_like_shape(q, (B, H, L, k.shape[2]))


@kernel_op("attention_weights", _weights_fake)
def _attention_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], mask_kind: int,
                       is_causal: bool, scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    """The numba backend's attention weights (B, H, L, S) in q's dtype
    (_NumbaAttention.weights): attention_with_weights' second output there, differentiable
    through NumbaWeightsFunction. Under dropout, dropped as the flash forward that drew `seed`
    (a CPU int64 scalar) dropped them."""
    return _NumbaAttention.weights(q, k, mask, mask_kind, is_causal, scale, dropout_p,
                                   int(seed) if dropout_p > 0 else 0)


@kernel_op("attention_weights_bwd", lambda q, k, mask, dw, mask_kind, is_causal, scale, dropout_p,
           seed, mask_grad: (empty_like_shape(q), empty_like_shape(k),
                             _mask_grad_fake(q, mask, mask_grad)))
def _attention_weights_bwd(q: Tensor, k: Tensor, mask: Optional[Tensor], dw: Tensor,
                           mask_kind: int, is_causal: bool, scale: float, dropout_p: float,
                           seed: Tensor, mask_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, the float mask's gradient dS with mask_grad, else empty) of the numba
    backend's weights, given dw, their gradient."""
    dq, dk, ds = _NumbaAttention.weights_backward(q, k, mask, dw, mask_kind, is_causal, scale,
                                                  dropout_p, int(seed) if dropout_p > 0 else 0)
    return dq, dk, ds.to(mask.dtype) if mask_grad else _mask_grad_fake(q, mask, False)


class NumbaWeightsFunction(torch.autograd.Function):
    """The numba backend's attention weights (attention_with_weights' second output there:
    its flash kernels give the output), differentiable as torch's: a loss on them reaches q,
    k and a float mask (kernels/numba/attention.py attention_weights_bwd and
    attention_weights_bwd_keys)."""

    @staticmethod
    def forward(ctx, q, k, mask, mask_kind, is_causal, scale, dropout_p, seed):
        ctx.save_for_backward(q, k, mask, seed)
        ctx.options = (mask_kind, is_causal, scale, dropout_p)
        return _attention_weights(q, k, mask, mask_kind, is_causal, scale, dropout_p, seed)

    @staticmethod
    def backward(ctx, dw):
        if torch.is_grad_enabled():      # create_graph: no double backward, say so
            return without_double_backward("scaled_dot_product_attention",
                                           NumbaWeightsFunction.backward, ctx, dw)
        q, k, mask, seed = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[2]
        dq, dk, dmask = _attention_weights_bwd(q, k, mask, dw, *ctx.options, seed, mask_grad)
        return dq, dk, (dmask if mask_grad else None), None, None, None, None, None


def _grouped(t: Tensor, shape: tuple):
    """(t as `shape`, whether that is a view of t): the grouped-query rows of q or dO, which
    a plan then views the same way every call (or reshapes into a copy, which is
    contiguous)."""
    g = t.reshape(shape)
    return g, g.numel() == 0 or g.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()


def _plan_naive_fwd(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, in_memory):
    """run(q, k, v, mask, seed) -> (o, weights, P) of algo="naive" for this signature: scores =
    q k^T * scale (fp32), P = the masked softmax (and under dropout the dropped weights P',
    one kernel; else the weights are P), o = weights v; GQA as (B, Hkv, G * L, .) rows.
    in_memory: the seed is a device tensor (`_new_seed`)."""
    from .kernels.triton import attention as kt
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    rows = (B, HKV, _group(H, HKV) * L)
    drop = dropout_p > 0
    qg, q_view = _grouped(q, (*rows, E))
    new_scores = output_maker((*rows, S), torch.float32, q.device)
    new_p = output_maker((B, H, L, S), q.dtype, q.device)
    new_o = output_maker((*rows, EV), q.dtype, q.device)
    scores, p, o = fresh(new_scores), fresh(new_p), fresh(new_o)
    scores_gemm = gemm_plan_on((q if q_view else qg, k, scores, None, None), qg, k, scores,
                               trans_b=True, alpha=scale)
    sc = scores.view(B, H, L, S)
    softmax = _seeded(Launch(
        kt.attention_naive_softmax, (L * B * H,),
        (*sc.stride(), *_strides4(mask), *p.stride(), H, L, S, dropout_p,
         *_seed_scalar(dropout_p)),
        dict(IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
             DROPOUT=_dropout_kind(dropout_p, L, S, in_memory), BLOCK_N=dot_block(S, 1024))),
        dropout_p)
    pv_gemm = gemm_plan_on((p, v, o, None, None), p.view(*rows, S), v, o)

    def run(q, k, v, mask, seed):
        scores, p, o = fresh(new_scores), fresh(new_p), fresh(new_o)
        weights = fresh(new_p) if drop else p       # P' under dropout (p's shape and layout)
        scores_gemm(q if q_view else q.reshape(*rows, E), k, scores, None, None)
        softmax(scores, scores if mask is None else mask, p, weights, seed)
        pv_gemm(weights, v, o, None, None)
        return o.view(B, H, L, EV), weights, p
    return run


@kernel_op("attention_naive_bwd", lambda q, k, v, w, p, do, dw, mask, seed, scale, dropout_p,
           mask_grad: (empty_like_shape(q), empty_like_shape(k), empty_like_shape(v),
                       _mask_grad_fake(q, mask, mask_grad)))
def _attention_naive_bwd(q: Tensor, k: Tensor, v: Tensor, w: Tensor, p: Optional[Tensor],
                         do: Tensor, dw: Optional[Tensor], mask: Optional[Tensor],
                         seed: Optional[Tensor], scale: float, dropout_p: float,
                         mask_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dq, dk, dv, the float mask's gradient dS with mask_grad, else empty); w: the forward's
    weights; p and seed: under dropout its undropped P and seed, else None; dw: the gradient
    of the weights, or None."""
    seed = _seed_of(seed, dropout_p)
    in_memory = isinstance(seed, torch.Tensor)
    key = _key("naive_bwd", q, k, v, w, do, dw, scale=scale, dropout_p=dropout_p,
               in_memory=in_memory)
    dq, dk, dv, ds = _LAUNCHES.get(key, _plan_naive_bwd, q, k, v, w, do, dw, scale, dropout_p,
                                   in_memory)(q, k, v, w, p, do, dw, seed)
    dmask = ds.view(w.shape).to(mask.dtype) if mask_grad else _mask_grad_fake(q, mask, False)
    return dq, dk, dv, dmask


def _plan_naive_bwd(q, k, v, w, do, dw, scale, dropout_p, in_memory):
    """run(q, k, v, W, P, dO, dW, seed) -> (dq, dk, dv, dS) of algo="naive" for this
    signature, W the weights (P' = P * keep / (1 - p) under dropout, else P): dV = W^T dO,
    dW' = dO V^T (+ dW, the weights' own gradient, when given: the GEMM's addend; fp32), dS =
    P * (dP - rowsum(dP * P)) with dP = dW' (the softmax backward kernel over rows of length
    S) or under dropout keep * dW' / (1 - p) (attention_naive_dropout_bwd, its keep pattern
    recomputed from the seed), dQ = dS K * scale, dK = dS^T Q * scale; GQA as in the
    forward, so dK and dV sum over each K/V head's group inside their GEMMs. in_memory: the
    seed is a device tensor."""
    from .kernels.triton import attention as kt
    from ._softmax_ce_ops import LAUNCHERS as ROW_LAUNCHERS
    B, H, L, S = w.shape
    HKV, E, EV = k.shape[1], q.shape[3], v.shape[3]
    rows = (B, HKV, _group(H, HKV) * L)
    qg, q_view = _grouped(q, (*rows, E))
    dog, do_view = _grouped(do, (*rows, EV))
    dwg, dw_view = _grouped(dw, (*rows, S)) if dw is not None else (None, True)
    dev = q.device
    new_dv, new_dk = output_maker(v.shape, v.dtype, dev), output_maker(k.shape, k.dtype, dev)
    new_dp = output_maker((*rows, S), torch.float32, dev)
    new_ds = output_maker((B * H * L, S, 1), q.dtype, dev)
    new_dq = output_maker((*rows, E), q.dtype, dev)
    dv, dk, dp, ds, dq = (fresh(m) for m in (new_dv, new_dk, new_dp, new_ds, new_dq))
    q0, do0 = q if q_view else qg, do if do_view else dog
    dsg = ds.view(*rows, S)
    dv_gemm = gemm_plan_on((w, do0, dv, None, None), w.view(*rows, S), dog, dv, trans_a=True)
    dp_gemm = gemm_plan_on((do0, v, dp, None, dw if dw_view else dwg), dog, v, dp,
                           trans_b=True, addend=dwg)
    if dropout_p > 0:       # P, dW' and dS are contiguous (B * H * L, S) rows (made so here)
        dropped = _seeded(Launch(
            kt.attention_naive_dropout_bwd, (L * B * H,), (L, S, dropout_p),
            dict(DROPOUT=_dropout_kind(dropout_p, L, S, in_memory),
                 BLOCK_N=dot_block(S, 1024))), dropout_p)

        def softmax(w, p, dp, ds, seed):
            dropped(p, dp, ds, seed)
    else:
        row_bwd = ROW_LAUNCHERS["triton"].plan_softmax_bwd(w.view(B * H * L, S, 1),
                                                           dp.view(B * H * L, S, 1), ds, False)

        def softmax(w, p, dp, ds, seed):
            row_bwd(w, dp, ds)
    dq_gemm = gemm_plan_on((ds, k, dq, None, None), dsg, k, dq, alpha=scale)
    dk_gemm = gemm_plan_on((ds, q0, dk, None, None), dsg, qg, dk, trans_a=True, alpha=scale)

    def run(q, k, v, w, p, do, dw, seed):
        dv, dk, dp, ds, dq = (fresh(m) for m in (new_dv, new_dk, new_dp, new_ds, new_dq))
        do = do if do_view else do.reshape(*rows, EV)
        dv_gemm(w, do, dv, None, None)
        dp_gemm(do, v, dp, None, dw if dw_view else dw.reshape(*rows, S))
        softmax(w, p, dp, ds, seed)
        dq_gemm(ds, k, dq, None, None)
        dk_gemm(ds, q if q_view else q.reshape(*rows, E), dk, None, None)
        return dq.view(B, H, L, E), dk, dv, ds
    return run


class NaiveAttentionFunction(torch.autograd.Function):
    """algo="naive": materialised scores in three kernels (scores GEMM, masked softmax, P @ V
    GEMM), for comparison with the flash kernels and for callers that need the attention
    weights (nn.MultiheadAttention with need_weights=True). Returns (output, weights).

    Grouped-query heads are handled by viewing q as (B, Hkv, G * L, E): the G query heads of a
    K/V head become extra rows of one GEMM, so dK and dV sum over the group inside the GEMM.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, mask_kind, is_causal, scale, dropout_p):
        if dropout_p > 0:
            o, w, p, seed = _attention_naive_dropout_fwd(q, k, v, mask, mask_kind, is_causal,
                                                         scale, dropout_p)
        else:
            (o, w), p, seed = _attention_naive_fwd(q, k, v, mask, mask_kind, is_causal,
                                                   scale), None, None
        ctx.save_for_backward(q, k, v, w, p, mask, seed)
        ctx.scale, ctx.dropout_p = scale, dropout_p
        # the weights are differentiable, as torch's; a gradient that reaches only one of the
        # outputs leaves the other's None (materialised, the weights' would be a (B, H, L, S)
        # tensor of zeros made by the engine every backward)
        ctx.set_materialize_grads(False)
        return o, w

    @staticmethod
    def backward(ctx, do, dweights):
        if do is None and dweights is None:
            return None, None, None, None, None, None, None, None
        if torch.is_grad_enabled():      # create_graph: no double backward, say so
            return without_double_backward("scaled_dot_product_attention",
                                           NaiveAttentionFunction.backward, ctx, do, dweights)
        q, k, v, w, p, mask, seed = ctx.saved_tensors
        mask_grad = ctx.needs_input_grad[3]
        if do is None:                   # only the weights reach back: dO = 0
            do = q.new_zeros(q.shape[:3] + v.shape[3:])
        dq, dk, dv, dmask = _attention_naive_bwd(q, k, v, w, p, do, dweights, mask, seed,
                                                 ctx.scale, ctx.dropout_p, mask_grad)
        return dq, dk, dv, (dmask if mask_grad else None), None, None, None, None


ALGOS = ("flash", "naive", "flash_hopper", "flash_onepass")


def _kernel_attention(backend):
    def impl(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, algo):
        """algo: resolved by the registry (pydl.backends.resolve_algo)."""
        if algo == "naive":
            return apply(NaiveAttentionFunction, q, k, v, mask, mask_kind, is_causal, scale,
                         dropout_p)[0]
        ops = AttentionKernels(mask_kind, is_causal, scale, dropout_p,
                               VARIANT_LAUNCHERS.get(algo, backend))
        if needs_graph(q, k, v, mask):
            return apply(AttentionFunction, q, k, v, mask, ops)
        return ops.forward(q, k, v, mask)[0]
    return impl


# backend -> pydl's own implementation (a call plans its eager form only where it still runs)
_KERNEL_IMPLS = {
    "triton": register("scaled_dot_product_attention", "triton", algos=ALGOS)(
        _kernel_attention("triton")),
    "numba": register("scaled_dot_product_attention", "numba", algos=("flash",))(
        _kernel_attention("numba"))}

# Triton algos with launchers of their own (each raises NotImplementedError where it cannot
# run): "flash_hopper", the Gluon forward with the flash backward; "flash_onepass", the flash
# forward with the single-pass backward
VARIANT_LAUNCHERS = {"flash_hopper": attention_hopper.LAUNCHER,
                     "flash_onepass": attention_onepass.LAUNCHER}
LAUNCHERS[attention_hopper.LAUNCHER] = attention_hopper.HopperAttention
LAUNCHERS[attention_onepass.LAUNCHER] = attention_onepass.OnePassAttention


@register("scaled_dot_product_attention", "torch")
def _torch_attention(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, algo):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])


# --- argument checks and the public function ------------------------------------------------

_DROPOUT_IN_CAPTURE = (
    "scaled_dot_product_attention with dropout_p > 0 inside CUDA graph capture: pydl's kernels "
    "take their dropout seed from the host, so every replay of the graph would drop the same "
    "scores (torch's kernels read a generator state that each replay advances). Capture the "
    "attention with dropout_p=0, keep it with dropout out of the captured region, or run it "
    "with backend='torch'")


def _new_seed(dropout_p: float, backend: str, device):
    """A call's dropout seed as the kernels take it: 0 without dropout, else `dropout_seed()`;
    inside CUDA graph capture, on the Triton kernels, a one-element int32 tensor drawn on the
    device by torch's generator (graph-safe: each replay draws anew), which the kernels read
    from memory (SEED_IN_MEMORY); the Numba kernels take host seeds, so there it raises."""
    if dropout_p <= 0:
        return 0
    if backend == "triton" and capturing():
        return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int32)
    return dropout_seed()


def _seed_mode(seed) -> tuple:
    """The launchers' trailing plan argument for a seed: (True,), in_memory, for a device
    seed (only the Triton launchers are given one), else nothing (their default)."""
    return (True,) if isinstance(seed, torch.Tensor) else ()


def _saved_seed(seed, dropout_p: float) -> torch.Tensor:
    """The seed saved for the backward: a host seed as a CPU int64 scalar, a device one as
    it is."""
    if dropout_p <= 0:
        return _NO_SEED
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


def _seed_of(saved: torch.Tensor, dropout_p: float):
    """The kernels' seed from a saved one: the host's as an int (refused inside CUDA graph
    capture, where it would be replayed), the device's tensor as it is."""
    if dropout_p <= 0:
        return 0
    if saved.dtype == torch.int32:          # drawn on the device (`_new_seed`)
        return saved
    if capturing():
        raise RuntimeError(_DROPOUT_IN_CAPTURE)
    return int(saved)


def dropout_seed() -> int:
    """The dropout seed of the next call: drawn from torch's default generator, so
    torch.manual_seed makes dropout reproducible. Inside CUDA graph capture it raises: a seed
    drawn once would be replayed with the graph, the same mask every step."""
    if capturing():
        raise RuntimeError(_DROPOUT_IN_CAPTURE)
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())


def _as4d(t: torch.Tensor) -> torch.Tensor:
    while t.dim() < 4:
        t = t.unsqueeze(0)
    return t


def _prepare(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend):
    """Checks shared by the public entry points; returns (backend name, implementation, the
    Broadcast of the inputs' shapes, the mask as (B, Hq, L, S) or None, its kind, scale)."""
    tensors = [t for t in (query, key, value, attn_mask) if isinstance(t, torch.Tensor)]
    name, impl = dispatch("scaled_dot_product_attention", backend, *tensors)
    for t, nm in ((query, "query"), (key, "key"), (value, "value")):
        check_tensor(t, nm, name)
        if t.dim() < 2:
            raise ValueError(f"{nm} must have at least 2 dims (..., length, head dim), got "
                             f"shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must have one dtype, got {query.dtype}, "
                        f"{key.dtype}, {value.dtype}")
    shapes = Broadcast(query, key, value, enable_gqa)
    E = shapes.fours[0][3]
    if not 0.0 <= float(dropout_p) <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if scale is None:
        # E = 0: every score is an empty sum, 0 at any scale (torch's 1 / sqrt(0) = inf would
        # make the kernels' 0 * inf a NaN)
        scale = 1.0 / math.sqrt(E) if E else 1.0
    mask, mask_kind = None, MASK_NONE
    if attn_mask is not None:
        if is_causal:
            raise ValueError("attn_mask and is_causal cannot both be set (as in torch)")
        if not isinstance(attn_mask, torch.Tensor):
            raise TypeError(f"attn_mask must be a tensor, got {type(attn_mask).__name__}")
        if attn_mask.dim() > len(shapes.scores):
            # more dims than the query: the broadcast scores would have more dims than the
            # output (torch raises on it too)
            raise ValueError(f"attn_mask has {attn_mask.dim()} dims, more than the query's "
                             f"{query.dim()}")
        try:
            torch.broadcast_shapes(attn_mask.shape, shapes.scores)
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"the scores' shape {shapes.scores}") from None
        mask = shapes.mask(attn_mask)
        if attn_mask.dtype == torch.bool:
            mask_kind = MASK_BOOL
        elif attn_mask.dtype in (torch.float32, query.dtype):     # torch's rule
            mask_kind = MASK_FLOAT
        else:
            raise TypeError(f"attn_mask must be bool, float32 or of the query's dtype "
                            f"({query.dtype}), got {attn_mask.dtype} (as torch requires)")
    return name, impl, shapes, mask, mask_kind, float(scale)


class Broadcast:
    """torch's broadcasting of query (..., Hq, L, E), key (..., Hkv, S, E) and value
    (..., Hkv, S, Ev), resolved once per call signature into the (B, H, len, dim) views the
    kernels take: the dims before the heads broadcast and merge into B (a view where the
    strides allow, else a copy); the heads broadcast too (a key/value head shared by every
    query head without enable_gqa), or with enable_gqa stay grouped (Hq a multiple of Hkv,
    which the kernels read per group), and key and value heads broadcast against each other
    (one key head for every value head, or the reverse); inputs of 2 or 3 dims have heads and
    batch of 1.
    `plain`: q, k and v are already such views (4-D, no broadcast), the planned path's case.
    Autograd sums the gradients of broadcast dims back (the expand's backward)."""

    __slots__ = ("pads", "expanded", "fours", "scores", "out_shape", "plain")

    def __init__(self, query, key, value, enable_gqa: bool):
        rank = max(query.dim(), key.dim(), value.dim())
        nd = max(rank, 4)
        pads = [(1,) * (nd - t.dim()) + tuple(t.shape) for t in (query, key, value)]
        (*q_lead, Hq, L, E), (*k_lead, Hk, S, Ek), (*v_lead, Hv, Sv, Ev) = pads
        if E != Ek:
            raise ValueError(f"query head dim {E} does not match key head dim {Ek}")
        if S != Sv:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree "
                             f"in sequence length")
        if Hk != Hv:
            if 1 not in (Hk, Hv):
                raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} have "
                                 f"heads that do not broadcast")
            Hk = 0 if 0 in (Hk, Hv) else max(Hk, Hv)    # one head shared by the other's heads
        if enable_gqa and Hk not in (Hq, 1):
            if Hk == 0:
                raise ValueError(f"query has {Hq} heads but key/value have none")
            if Hq % Hk:
                raise ValueError(f"grouped-query attention needs query heads ({Hq}) divisible "
                                 f"by key/value heads ({Hk})")
            Hq_out, Hk_out = Hq, Hk
        elif Hq == Hk or 1 in (Hq, Hk):
            Hq_out = Hk_out = max(Hq, Hk) if 0 not in (Hq, Hk) else 0
        else:
            raise ValueError(f"query has {Hq} heads but key/value have {Hk}: pass "
                             f"enable_gqa=True for grouped-query attention")
        try:
            lead = tuple(torch.broadcast_shapes(tuple(q_lead), tuple(k_lead), tuple(v_lead)))
        except RuntimeError:
            raise ValueError(f"the batch dims of query {tuple(query.shape)}, key "
                             f"{tuple(key.shape)} and value {tuple(value.shape)} do not "
                             f"broadcast") from None
        B = math.prod(lead)
        self.pads = pads
        self.expanded = [lead + (Hq_out, L, E), lead + (Hk_out, S, E), lead + (Hk_out, S, Ev)]
        self.fours = [(B, Hq_out, L, E), (B, Hk_out, S, E), (B, Hk_out, S, Ev)]
        self.scores = (lead + (Hq_out, L, S))[nd - max(rank, 2):]
        self.out_shape = (lead + (Hq_out, L, Ev))[nd - rank:]
        self.plain = (query.dim() == key.dim() == value.dim() == 4
                      and all(tuple(t.shape) == e for t, e in zip((query, key, value),
                                                                  self.expanded)))

    def views(self, query, key, value):
        """q, k, v as (B, H, len, dim) tensors."""
        if self.plain:
            return query, key, value
        return tuple(t.reshape(pad).expand(exp).reshape(four) for t, pad, exp, four in
                     zip((query, key, value), self.pads, self.expanded, self.fours))

    def mask(self, attn_mask):
        """The mask as a (B, Hq, L, S) tensor: its broadcast view (stride 0 on broadcast
        dims, no copy) where the batch dims need no merging."""
        B, H, L, _ = self.fours[0]
        S = self.fours[1][2]
        full = self.expanded[0][:-2] + (L, S)
        m = attn_mask.reshape((1,) * (len(full) - attn_mask.dim()) + tuple(attn_mask.shape))
        return m.expand(full).reshape(B, H, L, S)


@emulated("forward", "backward")
class _AttentionCall(AttentionKernels):
    """scaled_dot_product_attention for one call signature (pydl._plan), checked once: the
    implementation, the algorithm, the scale, the mask's kind and the 4-D views' shapes. For
    4-D inputs on pydl's backends in eager mode (every algo but "naive", whose Function
    plans its own steps) it is also the signature's plan: AttentionFunction runs its methods,
    which allocate with arguments fixed here and launch what the algo's launcher
    (LAUNCHERS) built on the first call (the forward's per 16-byte alignment of the
    tensors, the backward's per strides of the upstream gradient); the call's key fixes every
    other input of those. A mask that needs no gradient goes to the kernels as it is, read
    through the strides of its broadcast view."""

    __slots__ = ("name", "impl", "algo", "views", "mask_shape", "out_shape", "planned", "fp32",
                 "no_rows", "new_o", "new_lse", "new_dq", "new_dk", "new_dv", "new_dmask",
                 "fwd", "bwd")

    def __init__(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                 backend, algo):
        name, self.impl, shapes, mask, mask_kind, scale = _prepare(
            query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend)
        self.name = name
        self.algo = resolve_algo("scaled_dot_product_attention", name, algo)
        super().__init__(mask_kind, bool(is_causal), scale, float(dropout_p),
                         VARIANT_LAUNCHERS.get(self.algo, name))
        # None: 4-D q, k, v as the kernels take them; else how to view them so (Broadcast)
        self.views = None if shapes.plain else shapes
        self.mask_shape = None if mask is None else mask.shape
        self.out_shape = None if shapes.plain else shapes.out_shape
        self.planned = (self.impl in _KERNEL_IMPLS.values() and self.algo != "naive"
                        and self.views is None
                        and not torch.compiler.is_compiling()
                        and plain_tensors(query, key, value, attn_mask))
        if self.planned:            # 4-D inputs as the kernels take them (shapes.plain)
            B, H, L, E = query.shape
            dt, dev = query.dtype, query.device
            self.fp32 = dt == torch.float32
            self.no_rows = B * H * L == 0
            self.new_o = output_maker((B, H, L, value.shape[3]), dt, dev)
            self.new_lse = output_maker((B * H, L), torch.float32, dev)
            self.new_dq = output_maker(query.shape, dt, dev)
            self.new_dk = output_maker(key.shape, dt, dev)
            self.new_dv = output_maker(value.shape, dt, dev)
            self.new_dmask = None if mask is None else output_maker(mask.shape, mask.dtype, dev)
            self.fwd, self.bwd = {}, {}

    def __call__(self, query, key, value, attn_mask):
        if self.planned:
            mask = attn_mask
            if mask is not None and mask.requires_grad:
                # its gradient (B, H, L, S), summed over the broadcast dims by autograd
                mask = _as4d(attn_mask).expand(self.mask_shape)
            if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or
                                            value.requires_grad or
                                            (mask is not None and mask.requires_grad)):
                return apply(AttentionFunction, query, key, value, mask, self)
            return self.forward(query, key, value, mask)[0]
        q, k, v, mask = self._views(query, key, value, attn_mask)
        out = self.impl(q, k, v, mask, self.mask_kind, self.is_causal, self.scale,
                        self.dropout_p, self.algo)
        return out if self.out_shape is None else out.view(self.out_shape)

    def _views(self, query, key, value, attn_mask):
        """q, k, v as (B, H, L, E) views and the mask as its (B, Hq, L, S) broadcast view."""
        if self.views is None:
            mask = None if attn_mask is None else _as4d(attn_mask).expand(self.mask_shape)
            return query, key, value, mask
        return (*self.views.views(query, key, value),
                None if attn_mask is None else self.views.mask(attn_mask))

    def with_weights(self, query, key, value, attn_mask):
        """(output, attention weights (B, Hq, L, S)) for attention_with_weights: the triton
        backend's naive kernels (its launches planned per signature), the numba backend's
        flash output and weights kernel, torch's ops on the torch backend. Under dropout the
        weights are the dropped ones, P * keep / (1 - p), and the output is theirs (torch's
        MultiheadAttention)."""
        q, k, v, mask = self._views(query, key, value, attn_mask)
        if self.name == "triton":
            out, weights = apply(NaiveAttentionFunction, q, k, v, mask, self.mask_kind,
                                 self.is_causal, self.scale, self.dropout_p)
        elif self.name == "torch":
            G = q.shape[1] // k.shape[1]
            kk, vv = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
            s = (q @ kk.transpose(-1, -2)) * self.scale
            if self.is_causal:
                s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool,
                                              device=s.device).tril(), float("-inf"))
            if mask is not None:
                s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
            weights = torch.softmax(s, -1).nan_to_num(0.0)
            if self.dropout_p > 0:
                weights = torch.nn.functional.dropout(weights, self.dropout_p)
            out = weights @ vv
        elif self.name == "numba":      # the flash output, the weights by a kernel of their own
            if self.dropout_p > 0:      # the weights drop what the output's kernels dropped
                ops = _SeedKept(self.mask_kind, self.is_causal, self.scale, self.dropout_p,
                                "numba")
                out = (apply(AttentionFunction, q, k, v, mask, ops) if needs_graph(q, k, v, mask)
                       else ops.forward(q, k, v, mask)[0])
                seed = ops.seed
            else:
                out = self.impl(q, k, v, mask, self.mask_kind, self.is_causal, self.scale, 0.0,
                                self.algo)
                seed = _NO_SEED
            weights = (apply(NumbaWeightsFunction, q, k, mask, self.mask_kind, self.is_causal,
                             self.scale, self.dropout_p, seed) if needs_graph(q, k, mask)
                       else _attention_weights(q, k, mask, self.mask_kind, self.is_causal,
                                               self.scale, self.dropout_p, seed))
        else:
            raise NotImplementedError(f"attention weights need a materialising kernel, which "
                                      f"the {self.name!r} backend does not have; use "
                                      f"backend='triton'")
        return out if self.out_shape is None else out.view(self.out_shape), weights

    # the plan (eager, flash, 4-D): AttentionKernels' steps with fixed arguments

    def _mask4(self, mask):
        return None if mask is None else _as4d(mask).expand(self.mask_shape)

    def forward(self, q, k, v, mask):
        if not self.planned:
            return super().forward(q, k, v, mask)
        seed = _new_seed(self.dropout_p, self.backend, q.device)
        o, lse = fresh(self.new_o), fresh(self.new_lse)
        if not self.no_rows:
            aligned = (q.data_ptr() | k.data_ptr() | v.data_ptr() | o.data_ptr()) % 16 == 0
            mode = _seed_mode(seed)
            run = self.fwd.get((aligned, mode))
            if run is None:
                run = LAUNCHERS[self.backend].plan_forward(
                    q, k, v, o, lse, self._mask4(mask), self.mask_kind, self.is_causal,
                    self.scale, self.dropout_p, *mode)
                if not capturing():
                    self.fwd[aligned, mode] = run
            run(q, k, v, o, lse, mask, seed)
        return o, lse, _saved_seed(seed, self.dropout_p)

    def backward(self, q, k, v, o, lse, do, mask, seed, mask_grad: bool):
        if not self.planned:
            return super().backward(q, k, v, o, lse, do, mask, seed, mask_grad)
        dq, dk, dv = fresh(self.new_dq), fresh(self.new_dk), fresh(self.new_dv)
        dmask = fresh(self.new_dmask) if mask_grad else None
        if self.no_rows:                # no query rows: keys get no gradient
            return dq, dk.zero_(), dv.zero_(), dmask
        seed = _seed_of(seed, self.dropout_p)
        mode = _seed_mode(seed)
        # the TF32 switch (fp32) and deterministic mode (flash_onepass) choose the kernels
        key = (do.stride(), mask_grad, tf32_allowed(False) if self.fp32 else None,
               torch.are_deterministic_algorithms_enabled(), mode)
        run = self.bwd.get(key)
        if run is None:
            run = LAUNCHERS[self.backend].plan_backward(
                q, k, v, o, lse, do, dq, dk, dv, self._mask4(mask), self.mask_kind,
                self.is_causal, self.scale, self.dropout_p, dmask, *mode)
            if not capturing():
                self.bwd[key] = run
        run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask)
        return dq, dk, dv, dmask


def _call_key(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend,
              algo):
    return (backend or current_backend(), algo, *tensors_key(query, key, value, attn_mask),
            dropout_p, is_causal, scale, enable_gqa, tf32_allowed(False))


_CALLS = Cache("scaled_dot_product_attention calls")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *, backend=None,
                                 algo=None):
    """torch.nn.functional.scaled_dot_product_attention on pydl's flash-attention kernels.

    algo: "flash" (default), "naive" (triton: materialised scores, three kernels),
    "flash_hopper" (triton: the Gluon forward for Hopper GPUs; pydl/attention_hopper.py) or
    "flash_onepass" (triton: the single-pass backward; pydl/attention_onepass.py).
    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev), any rank from 2-D,
    their batch and head dims broadcast as torch's math backend broadcasts them (Hq a multiple
    of Hkv with enable_gqa); attn_mask bool (True = attend) or float (added), broadcastable
    to the scores (..., Hq, L, S).
    """
    query, key, value, attn_mask = autocast_inputs("scaled_dot_product_attention", query, key,
                                                   value, attn_mask)
    call = _CALLS.call(_call_key, _AttentionCall, query, key, value, attn_mask, dropout_p,
                       is_causal, scale, enable_gqa, backend, algo)
    return call(query, key, value, attn_mask)


@public_op
def attention_with_weights(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                           scale=None, enable_gqa=False, *, backend=None):
    """(output, attention weights (B, Hq, L, S)), scaled_dot_product_attention's arguments,
    for callers that need the weights (nn.MultiheadAttention's need_weights=True): the triton
    backend's naive variant, the numba backend's flash output and a weights kernel, or torch's
    own ops on the "torch" backend. With dropout_p the weights are the dropped ones, P * keep
    / (1 - p), and the output is theirs, as torch's MultiheadAttention returns them (the keep
    pattern is the flash kernels' for the call's seed). The weights are differentiable, as
    torch's, on every backend."""
    query, key, value, attn_mask = autocast_inputs("scaled_dot_product_attention", query, key,
                                                   value, attn_mask)
    call = _CALLS.call(_call_key, _AttentionCall, query, key, value, attn_mask, dropout_p,
                       bool(is_causal), scale, enable_gqa, backend, None)
    return call.with_weights(query, key, value, attn_mask)


__all__ = ["scaled_dot_product_attention", "attention_with_weights", "AttentionFunction",
           "NaiveAttentionFunction", "NumbaWeightsFunction"]
