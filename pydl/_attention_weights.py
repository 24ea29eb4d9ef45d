"""Attention that materialises its weights P: algo="naive" on the Triton kernels (scores,
softmax and, under dropout, the dropped weights P' in one kernel; the products on the shared
GEMM) and the numba backend's weights kernels, each a kernel op and an autograd Function.
What attention_with_weights (and so nn.MultiheadAttention's need_weights) returns.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._attention_numba import _NumbaAttention
from ._attention_ops import _mask_grad_fake
from ._attention_seed import _op_seed, _op_seed_fake, _seed_of
from ._attention_triton import (
    _LAUNCHES,
    _dropout_kind,
    _group,
    _key,
    _seed_scalar,
    _seeded,
    _strides4,
)
from ._autograd import without_double_backward
from ._gemm import gemm_plan_on
from ._launch import dot_block, fresh, output_maker
from ._library import empty_like_shape, kernel_op
from ._plan import Launch


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
    return o, w, empty_like_shape(w), _op_seed_fake(dropout_p, q.device)


@kernel_op("attention_naive_dropout_fwd", _naive_dropout_fwd_fake)
def _attention_naive_dropout_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor],
                                 mask_kind: int, is_causal: bool, scale: float,
                                 dropout_p: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(output, the attention weights, the undropped P, the dropout seed: a device int32
    tensor, `_op_seed`'s) with dropout_p > 0: the weights are torch's,
    P' = P * keep / (1 - p), the output P' v, with the flash kernels' keep pattern for the
    seed; the backward's softmax gradient needs P itself."""
    seed, saved = _op_seed(dropout_p, q.device)
    o, weights, p = _LAUNCHES.get(
        _naive_key(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, True),
        _plan_naive_fwd, q, k, v, mask, mask_kind, is_causal, scale, dropout_p, True)(
        q, k, v, mask, seed)
    return o, weights, p, saved


def _weights_fake(q, k, mask, mask_kind, is_causal, scale, dropout_p, seed):
    B, H, L, _ = q.shape
    return empty_like_shape(q, (B, H, L, k.shape[2]))


@kernel_op("attention_weights", _weights_fake)
def _attention_weights(q: Tensor, k: Tensor, mask: Optional[Tensor], mask_kind: int,
                       is_causal: bool, scale: float, dropout_p: float, seed: Tensor) -> Tensor:
    """The numba backend's attention weights (B, H, L, S) in q's dtype
    (_NumbaAttention.weights): attention_with_weights' second output there, differentiable
    through NumbaWeightsFunction. Under dropout, dropped as the flash forward that drew `seed`
    (`_op_seed`'s device int32 tensor, which the kernel reads) dropped them."""
    return _NumbaAttention.weights(q, k, mask, mask_kind, is_causal, scale, dropout_p,
                                   seed if dropout_p > 0 else 0)


@kernel_op("attention_weights_bwd", lambda q, k, mask, dw, mask_kind, is_causal, scale, dropout_p,
           seed, mask_grad: (empty_like_shape(q), empty_like_shape(k),
                             _mask_grad_fake(q, mask, mask_grad)))
def _attention_weights_bwd(q: Tensor, k: Tensor, mask: Optional[Tensor], dw: Tensor,
                           mask_kind: int, is_causal: bool, scale: float, dropout_p: float,
                           seed: Tensor, mask_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, the float mask's gradient dS with mask_grad, else empty) of the numba
    backend's weights, given dw, their gradient."""
    dq, dk, ds = _NumbaAttention.weights_backward(q, k, mask, dw, mask_kind, is_causal, scale,
                                                  dropout_p, seed if dropout_p > 0 else 0)
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
    from ._softmax_ce_ops import LAUNCHERS as ROW_LAUNCHERS
    from .kernels.triton import attention as kt
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
