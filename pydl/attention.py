"""scaled_dot_product_attention and attention_with_weights: the public functions, their
argument checks, the implementations by backend and the per-signature call (the eager plan).

The op's other parts, one concern each:

    pydl/_attention_ops.py       the flash kernel ops (pydl:: custom ops), AttentionKernels,
                                 AttentionFunction, LAUNCHERS (backend or algo -> launcher)
    pydl/_attention_triton.py    the Triton flash launcher: tuning spaces, plans
    pydl/_attention_numba.py     the Numba launcher (CUDA cores and tensor cores) and its
                                 weights kernels
    pydl/_attention_weights.py   the materialising path: algo="naive" and the numba weights,
                                 their kernel ops and Functions (attention_with_weights)
    pydl/_attention_seed.py      the dropout seed: drawn, saved, passed (graph capture too)
    pydl/attention_hopper.py, pydl/attention_onepass.py   the launchers of two Triton algos

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

import torch

from ._attention_ops import (
    LAUNCHERS,
    VARIANT_LAUNCHERS,
    AttentionFunction,
    AttentionKernels,
    _SeedKept,
)
from ._attention_seed import _NO_SEED, _new_seed, _saved_seed, _seed_mode, _seed_of
from ._attention_weights import NaiveAttentionFunction, NumbaWeightsFunction, _attention_weights
from ._checks import check_tensor
from ._interop import public_op
from ._launch import WriteOnly, fresh, output_maker, tf32_allowed
from ._library import autocast_inputs
from ._plan import (
    Cache,
    apply,
    capturing,
    emulated,
    needs_graph,
    options_key,
    plain_tensors,
    tensors_key,
)
from .backends import current_backend, dispatch, register, resolve_algo

MASK_NONE, MASK_BOOL, MASK_FLOAT = 0, 1, 2


ALGOS = ("flash", "naive", "flash_hopper", "flash_onepass", "flash_hopper_onepass")


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



@register("scaled_dot_product_attention", "torch")
def _torch_attention(q, k, v, mask, mask_kind, is_causal, scale, dropout_p, algo):
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
        enable_gqa=q.shape[1] != k.shape[1])

# --- argument checks and the public function ------------------------------------------------

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
                 "no_rows", "new_o", "new_lse", "unread_lse", "new_dq", "new_dk", "new_dv",
                 "new_dmask", "fwd", "bwd")

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
            self.unread_lse = WriteOnly(self.new_lse)    # without a graph nothing reads it
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
            return self.forward(query, key, value, mask, self.unread_lse())[0]
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

    def forward(self, q, k, v, mask, lse=None):
        """(o, lse, the saved seed); lse: where the kernel writes the rows' log-sum-exp (a
        fresh tensor, which the backward reads, when None)."""
        if not self.planned:
            return super().forward(q, k, v, mask)
        seed = _new_seed(self.dropout_p, q.device)
        o = fresh(self.new_o)
        if lse is None:
            lse = fresh(self.new_lse)
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
            *options_key(dropout_p, is_causal, scale, enable_gqa), tf32_allowed(False))


_CALLS = Cache("scaled_dot_product_attention calls")


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False, *, backend=None,
                                 algo=None):
    """torch.nn.functional.scaled_dot_product_attention on pydl's flash-attention kernels.

    algo: "flash" (default), "naive" (triton: materialised scores, three kernels),
    "flash_hopper" (triton: the Gluon forward for Hopper GPUs; pydl/attention_hopper.py),
    "flash_onepass" (triton: the single-pass backward; pydl/attention_onepass.py) or
    "flash_hopper_onepass" (triton: the Gluon forward and the Gluon single-pass backward).
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
