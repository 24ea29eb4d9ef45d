"""The flash attention's kernel ops (pydl:: custom ops, what torch.compile traces) and its
autograd Function, over the launchers of every backend and algo (LAUNCHERS).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import attention_hopper, attention_onepass
from ._attention_numba import _NumbaAttention
from ._attention_seed import _op_seed, _op_seed_fake, _seed_mode, _seed_of
from ._attention_triton import _TritonAttention
from ._autograd import without_double_backward
from ._launch import new_output
from ._library import empty_like_shape, kernel_op

LAUNCHERS = {"triton": _TritonAttention, "numba": _NumbaAttention}
# Triton algos with launchers of their own (each raises NotImplementedError where it cannot
# run): "flash_hopper", the Gluon forward with the flash backward; "flash_onepass", the flash
# forward with the single-pass backward; "flash_hopper_onepass", the Gluon forward with the
# Gluon single-pass backward
VARIANT_LAUNCHERS = {"flash_hopper": attention_hopper.LAUNCHER,
                     "flash_onepass": attention_onepass.LAUNCHER,
                     "flash_hopper_onepass": attention_hopper.ONEPASS_LAUNCHER}
LAUNCHERS[attention_hopper.LAUNCHER] = attention_hopper.HopperAttention
LAUNCHERS[attention_hopper.ONEPASS_LAUNCHER] = attention_hopper.HopperOnePassAttention
LAUNCHERS[attention_onepass.LAUNCHER] = attention_onepass.OnePassAttention


# --- kernel ops (pydl::...) and autograd Functions ------------------------------------------

def _attention_fwd_fake(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, backend):
    B, H, L, _ = q.shape
    return (empty_like_shape(q, (B, H, L, v.shape[3])),
            empty_like_shape(q, (B * H, L), torch.float32),
            _op_seed_fake(dropout_p, q.device))


@kernel_op("attention_fwd", _attention_fwd_fake)
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], mask_kind: int,
                   is_causal: bool, scale: float, dropout_p: float,
                   backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(output, per-row logsumexp, the dropout seed: `_op_seed`'s, a device int32 tensor).
    The seed is drawn here, inside the op, so a compiled graph holds no data-dependent
    scalar."""
    B, H, L, _ = q.shape
    seed, saved = _op_seed(dropout_p, q.device)
    o = new_output((B, H, L, v.shape[3]), q.dtype, q.device)
    lse = new_output((B * H, L), torch.float32, q.device)
    if B * H * L:
        launch_forward(backend, q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                       seed)
    return o, lse, saved


def _mask_grad_fake(q, mask, mask_grad):
    """The float mask's gradient (its (B, H, L, S) shape), or an empty placeholder in q's
    dtype: a custom op cannot return None."""
    return empty_like_shape(mask) if mask_grad else empty_like_shape(q, (0,))


@kernel_op("attention_bwd", lambda q, k, v, o, lse, do, mask, seed, mask_kind, is_causal, scale,
           dropout_p, backend, mask_grad: (empty_like_shape(q), empty_like_shape(k),
                                           empty_like_shape(v),
                                           _mask_grad_fake(q, mask, mask_grad)))
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
        """(o, per-row logsumexp, the dropout seed: a tensor the backward reads)."""
        return _attention_fwd(q, k, v, mask, self.mask_kind, self.is_causal, self.scale,
                              self.dropout_p, self.backend)

    def backward(self, q, k, v, o, lse, do, mask, seed, mask_grad: bool):
        """(dq, dk, dv, the float mask's gradient with mask_grad)."""
        return _attention_bwd(q, k, v, o, lse, do, mask, seed, self.mask_kind, self.is_causal,
                              self.scale, self.dropout_p, self.backend, mask_grad)


class _SeedKept(AttentionKernels):
    """AttentionKernels that keep the dropout seed of their last forward (a device int32
    tensor): the numba backend's weights kernel drops what the flash output dropped."""

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
