"""The flash attention's Numba launcher (kernels/numba/attention.py, and on the tensor cores
kernels/numba/attention_mma.py): plans of NumbaLaunches, and the attention weights' kernels
(the numba backend's materialising path).
"""
from __future__ import annotations

import torch

from . import _env
from ._attention_seed import _stand_in_seed
from ._attention_triton import split_keys
from ._gemm_numba import on_tensor_cores, pair_words
from ._launch import arrival_counters, cdiv, new_output, output_maker, planned_once
from ._numba_launch import (
    DYNAMIC,
    NumbaLaunch,
    Place,
    launch_numba_1d,
    launch_numba_built,
    numba_blocks,
    numba_threads,
)


def _numba_mask(mask):
    """(tensor, dtype code) of an attention mask for the Numba kernels: bool as uint8 bytes,
    float as is."""
    from .kernels.numba import attention as kn
    if mask is None:
        return None, 0
    if mask.dtype == torch.bool:
        return mask.view(torch.uint8), 0
    return mask, kn.BF16 if mask.dtype == torch.bfloat16 else 0


def _numba_dropout(dropout_p: float, seed) -> tuple:
    """(dropout, threshold, drop_scale, seed) kernel arguments: a score is dropped when its
    32-bit hash is below threshold = p * 2**32. The seed: an int, DYNAMIC (a plan's), or a
    one-element int32 device tensor the kernels read it from (CUDA graph capture)."""
    if dropout_p > 0:
        # p = 1: the threshold 2**32 is above every hash (all dropped); the scale is unused
        return (True, int(dropout_p * 4294967296.0), 1.0 / (1.0 - dropout_p) if dropout_p < 1
                else 0.0,
                seed if seed is DYNAMIC or isinstance(seed, torch.Tensor) else int(seed))
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
    from .kernels.numba import attention_mma as km  # the kernels load on first use
    if max(t.shape[3] for t in tensors) > km.MAX_HEAD_DIM:
        return None
    return [pair_words(t) for t in tensors]


class _NumbaAttention:
    """Same methods as _TritonAttention, on the Numba kernels (kernels/numba/attention.py):
    plans of NumbaLaunches (on a GPU a repeated call writes its tensors' pointers and the
    dropout seed alone). On the tensor cores (kernels/numba/attention_mma.py) the kernel's
    form depends on each operand's 4-byte alignment, so those launches are built per call."""

    @staticmethod
    def _forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p, seed,
                 part=None, arrivals=None, split=None):
        """(kernel, grid, threads, device, arguments, places in (q, k, v, o, lse, mask, part,
        arrivals), on the tensor cores or not) of the forward; seed may be DYNAMIC. split:
        (splits, keys) of the CUDA-core forward (_split), part its partials and arrivals its
        tiles' counters; None: unsplit (placeholders the plan keeps in their places)."""
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
            return (kernel, numba_blocks(cdiv(L, 16 * warps) * B * H), 32 * warps, q.device,
                    args, places, True)
        owned, streamed, BD, BDV = kn.tile_sizes(E, v.shape[3], L)
        nt = numba_threads(128)
        splits, keys = split or (1, k.shape[2])
        if split is None:
            part = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=q.device)
            arrivals = torch.zeros(1, dtype=torch.int32, device=q.device)
        return (kn.fwd_kernel(owned, streamed, BD, BDV, nt),
                numba_blocks(cdiv(L, owned) * B * H * splits), nt, q.device,
                (*args, part, splits, keys, arrivals),
                (*places, *((6, 7) if split else (None, None))), False)

    @staticmethod
    def _split(q, k, v, dropout_p) -> tuple[int, int] | None:
        """(splits, keys a split owns) where the CUDA-core forward splits the keys over blocks
        (pydl._attention_triton.split_keys, the Triton split forward's rule, at this kernel's
        tiles: few query tiles, many keys; not under dropout), else None."""
        from .kernels.numba import attention as kn
        if dropout_p > 0 or _numba_mma_words(q, k, v) is not None:
            return None
        owned, streamed, _, _ = kn.tile_sizes(q.shape[3], v.shape[3], q.shape[2])
        splits, keys = split_keys(q, k, owned, streamed)
        return (splits, keys) if splits > 1 else None

    @staticmethod
    @planned_once
    def plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                     in_memory: bool = False):
        """run(q, k, v, o, lse, mask, seed) as _TritonAttention's (the mask, when given, at
        the address of the (B, H, L, S) view planned). in_memory: the seed is a one-element
        int32 device tensor the kernels read (drawn on the device: CUDA graph capture, the
        kernel ops), one more source of the plan."""
        options = (mask_kind, is_causal, scale, dropout_p)
        seed = _stand_in_seed(q.device) if in_memory else DYNAMIC
        split = _NumbaAttention._split(q, k, v, dropout_p)
        if split is not None:
            return _NumbaAttention._plan_split(q, k, v, o, lse, mask, options, split)
        *launch, places, mma = _NumbaAttention._forward(q, k, v, o, lse, mask, *options, seed)
        if mma:
            mask4 = _planned_view(mask)
            return lambda q, k, v, o, lse, mask, seed: launch_numba_built(
                _NumbaAttention._forward(q, k, v, o, lse, mask4(mask), *options, seed))
        if in_memory:           # the seed tensor a source of the plan, as the others
            # its place before the kept placeholder of the partials (the arguments' order)
            planned = NumbaLaunch(*launch, (q, k, v, o, lse, mask, seed),
                                  (*places[:6], 6, *places[6:]))
            return lambda q, k, v, o, lse, mask, seed: planned(q, k, v, o, lse, mask, seed)
        planned = NumbaLaunch(*launch, (q, k, v, o, lse, mask), places)
        if dropout_p > 0:
            return lambda q, k, v, o, lse, mask, seed: planned(q, k, v, o, lse, mask,
                                                               dynamic=(int(seed),))
        return lambda q, k, v, o, lse, mask, seed: planned(q, k, v, o, lse, mask)

    @staticmethod
    def _plan_split(q, k, v, o, lse, mask, options, split):
        """run(q, k, v, o, lse, mask, seed) of the split forward, one launch: the partials
        (fp32, B*H x splits x L rows of EV + 2) allocated per call, the query tiles' arrival
        counters the stream's (pydl._launch.arrival_counters); no dropout, so no seed."""
        from .kernels.numba import attention as kn
        B, H, L, _ = q.shape
        tiles = cdiv(L, kn.tile_sizes(q.shape[3], v.shape[3], L)[0]) * B * H
        new_part = output_maker((B * H, split[0], L, v.shape[3] + 2), torch.float32, q.device)
        device = q.device
        part, arrivals = new_part(), arrival_counters(device, tiles)
        *launch, places, _ = _NumbaAttention._forward(q, k, v, o, lse, mask, *options, 0, part,
                                                      arrivals, split)
        forward = NumbaLaunch(*launch, (q, k, v, o, lse, mask, part, arrivals), places)

        def run(q, k, v, o, lse, mask, seed):
            forward(q, k, v, o, lse, mask, new_part(), arrival_counters(device, tiles))
        return run

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
                    numba_blocks(cdiv(S, 16 * warps) * B * HKV), 32 * warps)
            dq_ = (km.dq_mma_kernel(warps, bn, BD, BDV, bf16),
                   numba_blocks(cdiv(L, 16 * warps) * B * H), 32 * warps)
        else:
            owned, streamed, BD, BDV = kn.tile_sizes(E, EV)
            nt = numba_threads(128)
            dkdv = (kn.dkdv_kernel(owned, streamed, BD, BDV, nt),
                    numba_blocks(cdiv(S, owned) * B * HKV), nt)
            dq_ = (kn.dq_kernel(owned, streamed, BD, BDV, nt),
                   numba_blocks(cdiv(L, owned) * B * H), nt)
        return (delta_launch, (*dkdv, q.device, dkdv_args, dkdv_places),
                (*dq_, q.device, dq_args, dq_places), words is not None)

    @staticmethod
    @planned_once
    def plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask, in_memory: bool = False):
        """run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask) as _TritonAttention's: dO
        in the output's dtype (converted per call where it is not), the delta row sums into
        a buffer allocated per call, then the dK/dV and dQ kernels (a device seed, in_memory,
        one more source of theirs, as plan_forward's)."""
        B, H, L, _ = q.shape
        cast, seeded = do.dtype != o.dtype, dropout_p > 0
        do = do.to(o.dtype)
        new_delta = output_maker((B * H, L), torch.float32, q.device)
        delta = new_delta()
        options = (mask_kind, is_causal, scale, dropout_p)
        planned_seed = _stand_in_seed(q.device) if in_memory else DYNAMIC
        *launches, mma = _NumbaAttention._backward(q, k, v, o, lse, do, delta, dq, dk, dv,
                                                   mask, *options, planned_seed, dmask)
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
        extra, at = ((planned_seed,), (9,)) if in_memory else ((), ())   # the seed's source
        dkdv = NumbaLaunch(*dkdv, (q, k, v, do, lse, delta, mask, dk, dv, *extra),
                           (*dkdv_at, *at))
        dq_launch = NumbaLaunch(*dq_, (q, k, v, do, lse, delta, mask, dq, dmask, *extra),
                                (*dq_at, *at))

        def run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask):
            if cast:
                do = do.to(o.dtype)
            delta = new_delta()
            delta_of(o, do, delta)
            if in_memory:
                dkdv(q, k, v, do, lse, delta, mask, dk, dv, seed)
                dq_launch(q, k, v, do, lse, delta, mask, dq, dmask, seed)
                return
            seed = (int(seed),) if seeded else ()
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
