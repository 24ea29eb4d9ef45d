"""float64 NumPy reference for scaled dot-product attention, forward and backward, written from
the math (never by calling torch), with the semantics of
torch.nn.functional.scaled_dot_product_attention.

Shapes: q (..., L, E), k (..., S, E), v (..., S, Ev); leading dimensions broadcast.
    s = scale * q k^T + bias            (..., L, S), scale defaults to 1 / sqrt(E)
    lse = logsumexp_j s                 (..., L)     (what a flash kernel's forward saves)
    p = exp(s - lse)                    softmax over the keys
    out = p v                           (..., L, Ev)
bias comes from attn_mask (bool: True = attend, False adds -inf; float: added as is, -inf allowed)
or from is_causal, which is top-left aligned like torch's tril(ones(L, S)): query i attends keys
j <= i even when L != S (so with L > S the last L - S queries see every key, and with L < S the
last S - L keys are seen by no query). Both at once is an error, as in torch.
Masks broadcast against the scores (L, S), (1, 1, L, S), (B, 1, L, S), (B, H, L, S), ...

Fully masked rows (every key -inf): torch (2.5 and later, CPU, math and flash backends alike)
returns 0 for that output row and 0 gradients from it (its "safe softmax"), not NaN. This
reference does the same and reports lse = -inf for such rows (the true log of 0). A kernel's
saved lse needs a sentinel there so that its backward's exp(s - lse) is 0, not NaN: torch's
internal CPU flash op stores 0, FlashAttention-2 stores +inf; compare only the live rows.

Grouped-query attention (enable_gqa): q has Hq heads at dim -3, k and v have Hkv heads with
Hq % Hkv == 0; query head h reads kv head h // (Hq // Hkv) (torch's repeat_interleave).

Backward, with dO the gradient of out:
    dv = p^T dO
    dp = dO v^T
    ds = p * (dp - rowsum(p * dp))      (rowsum(p * dp) = rowsum(dO * out))
    dq = scale * ds k      dk = scale * ds^T q
dk and dv are summed over the query heads sharing a kv head (GQA) and over broadcast dimensions.

Array-module generic (see _xp.py): given CuPy arrays, the same code runs on the GPU and
returns CuPy arrays.
"""
from __future__ import annotations

import math

from ._xp import array_module, errstate, f64
from .softmax_ce import logsumexp


def _sum_to(x, shape: tuple):
    """Undo broadcasting: sum x down to `shape` (the gradient of a broadcast input)."""
    lead = x.ndim - len(shape)
    if lead:
        x = x.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1)
    return x.sum(axis=axes, keepdims=True) if axes else x


def _gqa_groups(q, k, v, enable_gqa: bool) -> int:
    """How many query heads share one kv head (1 without GQA)."""
    if not enable_gqa or q.ndim < 3:
        return 1
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if hk != hv or hq % hk:
        raise ValueError(f"enable_gqa: key/value heads ({hk}, {hv}) must be equal and divide "
                         f"the query heads ({hq})")
    return hq // hk


def _expand_heads(xp, x, groups: int):
    return xp.repeat(x, groups, axis=-3) if groups > 1 else x


def _reduce_heads(dx, groups: int):
    if groups == 1:
        return dx
    shape = dx.shape[:-3] + (dx.shape[-3] // groups, groups) + dx.shape[-2:]
    return dx.reshape(shape).sum(axis=-3)


def _additive_bias(xp, attn_mask, is_causal: bool, L: int, S: int):
    if is_causal:
        if attn_mask is not None:
            raise ValueError("attn_mask and is_causal=True cannot both be given")
        attn_mask = xp.tril(xp.ones((L, S), dtype=bool))
    if attn_mask is None:
        return None
    m = xp.asarray(attn_mask)
    if m.dtype == xp.bool_:
        return xp.where(m, 0.0, -xp.inf)
    return m.astype(xp.float64)


def _probs(xp, q, k, v, attn_mask, is_causal, scale, groups):
    """Scale, expanded k and v, lse and p for the forward and the backward."""
    L, S, E = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != E or v.shape[-2] != S:
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, v {v.shape} do not fit")
    if scale is None:
        # E = 0: every score is an empty sum, 0 at any scale (1 / sqrt(0) would make it NaN;
        # torch's kernels scale the empty operands, not the scores)
        scale = 1.0 / math.sqrt(E) if E else 1.0
    scale = float(scale)
    ke, ve = _expand_heads(xp, k, groups), _expand_heads(xp, v, groups)
    s = (q @ xp.swapaxes(ke, -1, -2)) * scale
    bias = _additive_bias(xp, attn_mask, is_causal, L, S)
    if bias is not None:
        s = s + bias
    lse = logsumexp(s, axis=-1)
    dead = xp.isneginf(lse)  # every key masked: torch's safe softmax gives p = 0, not NaN
    with errstate(xp, invalid="ignore"):
        p = xp.where(dead[..., None], 0.0, xp.exp(s - lse[..., None]))
    return scale, ke, ve, lse, p


def _check_dropout(dropout_p):
    if dropout_p != 0.0:
        raise NotImplementedError("the reference has no dropout (dropout_p must be 0.0)")


def scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale=None, enable_gqa: bool = False,
                                 *, return_lse: bool = False):
    """torch.nn.functional.scaled_dot_product_attention (dropout_p must be 0).

    Returns out (..., L, Ev); with return_lse=True, (out, lse) with lse (..., L) the natural-log
    log-sum-exp of each row of the scaled, masked scores (-inf for fully masked rows).
    """
    _check_dropout(dropout_p)
    xp = array_module(q, k, v, attn_mask)
    q, k, v = f64(xp, q), f64(xp, k), f64(xp, v)
    groups = _gqa_groups(q, k, v, enable_gqa)
    _, _, ve, lse, p = _probs(xp, q, k, v, attn_mask, is_causal, scale, groups)
    out = p @ ve
    return (out, lse) if return_lse else out


def scaled_dot_product_attention_backward(grad_out, q, k, v, attn_mask=None,
                                          is_causal: bool = False, scale=None,
                                          enable_gqa: bool = False, *, dropout_p: float = 0.0):
    """Gradients (dq, dk, dv) of scaled_dot_product_attention, shaped like q, k, v."""
    _check_dropout(dropout_p)
    xp = array_module(grad_out, q, k, v, attn_mask)
    q, k, v = f64(xp, q), f64(xp, k), f64(xp, v)
    groups = _gqa_groups(q, k, v, enable_gqa)
    scale, ke, ve, _, p = _probs(xp, q, k, v, attn_mask, is_causal, scale, groups)
    do = xp.broadcast_to(f64(xp, grad_out), p.shape[:-1] + (v.shape[-1],))
    dv = xp.swapaxes(p, -1, -2) @ do
    dp = do @ xp.swapaxes(ve, -1, -2)
    ds = p * (dp - xp.sum(p * dp, axis=-1, keepdims=True))
    dq = (ds @ ke) * scale
    dk = (xp.swapaxes(ds, -1, -2) @ q) * scale
    dq = _sum_to(dq, q.shape)
    dk = _sum_to(_reduce_heads(dk, groups), k.shape)
    dv = _sum_to(_reduce_heads(dv, groups), v.shape)
    return dq, dk, dv
