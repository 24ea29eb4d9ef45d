"""Drop-in modules: same constructor arguments and state_dict keys as the torch.nn classes they
replace (each subclasses that class), with a `backend=` keyword; forward calls pydl's ops."""
from __future__ import annotations

import torch

from . import functional as F
from .attention import attention_with_weights


class _Conv:
    """pydl.nn.Conv1d's and Conv2d's constructor (torch's, plus `backend=` and `algo=`) and
    forward: padding_mode "reflect" / "replicate" / "circular" pads the input with
    torch.nn.functional.pad first (a copy), exactly as torch's module does, then runs pydl's
    convolution with no padding."""

    _op = ""    # the pydl.functional op

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 device=None, dtype=None, *, backend: str | None = None, algo: str | None = None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        self.backend, self.algo = backend, algo

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias):
        if self.padding_mode != "zeros":
            input = torch.nn.functional.pad(input, self._reversed_padding_repeated_twice,
                                            mode=self.padding_mode)
            padding = 0
        else:
            padding = self.padding
        return getattr(F, self._op)(input, weight, bias, self.stride, padding, self.dilation,
                                    self.groups, backend=self.backend, algo=self.algo)


class Conv2d(_Conv, torch.nn.Conv2d):
    """torch.nn.Conv2d computed by pydl's kernels; `algo=` picks the kernel variant (padding
    modes: _Conv)."""

    _op = "conv2d"


class Conv1d(_Conv, torch.nn.Conv1d):
    """torch.nn.Conv1d computed by pydl's conv2d kernels (pydl.conv1d); `algo=` picks the
    kernel variant (padding modes: _Conv)."""

    _op = "conv1d"


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss computed by pydl's fused kernel (plus pydl's z_loss= and
    softcap=)."""

    def __init__(self, weight=None, size_average=None, ignore_index: int = -100, reduce=None,
                 reduction: str = "mean", label_smoothing: float = 0.0, *,
                 z_loss: float = 0.0, softcap: float | None = None,
                 backend: str | None = None):
        # the deprecated size_average / reduce set self.reduction there, as in torch
        super().__init__(weight=weight, size_average=size_average, ignore_index=ignore_index,
                         reduce=reduce, reduction=reduction, label_smoothing=label_smoothing)
        self.z_loss, self.softcap, self.backend = z_loss, softcap, backend

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(input, target, weight=self.weight, ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing,
                               z_loss=self.z_loss, softcap=self.softcap, backend=self.backend)


class LinearCrossEntropyLoss(torch.nn.Module):
    """The cross-entropy of a linear layer's output, fused (pydl.linear_cross_entropy): a
    language model's head and loss without the (tokens, vocabulary) logits. torch has no such
    module; the options are torch.nn.CrossEntropyLoss's (its class `weight` buffer included),
    and forward takes the head's weight (and bias) with the hidden states:

        head = torch.nn.Linear(H, V, bias=False)
        loss = pydl.nn.LinearCrossEntropyLoss()(hidden, head.weight, target)
        # = torch.nn.CrossEntropyLoss()(head(hidden), target)
    """

    def __init__(self, weight=None, ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, *, softcap: float | None = None,
                 z_loss: float = 0.0, chunk_rows: int | None = None,
                 backend: str | None = None):
        super().__init__()
        self.register_buffer("weight", weight)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.label_smoothing, self.chunk_rows, self.backend = label_smoothing, chunk_rows, backend
        self.softcap, self.z_loss = softcap, z_loss

    def forward(self, input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear_cross_entropy(input, weight, target, bias, class_weight=self.weight,
                                      ignore_index=self.ignore_index, reduction=self.reduction,
                                      label_smoothing=self.label_smoothing,
                                      softcap=self.softcap, z_loss=self.z_loss,
                                      chunk_rows=self.chunk_rows,
                                      backend=self.backend)


class Softmax(torch.nn.Softmax):
    """torch.nn.Softmax computed by pydl's kernel."""

    def __init__(self, dim: int | None = None, *, backend: str | None = None):
        super().__init__(dim=dim)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim, backend=self.backend)


class LogSoftmax(torch.nn.LogSoftmax):
    """torch.nn.LogSoftmax computed by pydl's kernel."""

    def __init__(self, dim: int | None = None, *, backend: str | None = None):
        super().__init__(dim=dim)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim, backend=self.backend)


class _MaxPool:
    """pydl.nn.MaxPool1d's and MaxPool2d's constructor (torch's, plus `backend=`) and forward."""

    _op = ""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices: bool = False, ceil_mode: bool = False, *,
                 backend: str | None = None):
        super().__init__(kernel_size, stride, padding, dilation, return_indices, ceil_mode)
        self.backend = backend

    def forward(self, input: torch.Tensor):
        return getattr(F, self._op)(input, self.kernel_size, self.stride, self.padding,
                                    self.dilation, ceil_mode=self.ceil_mode,
                                    return_indices=self.return_indices, backend=self.backend)


class MaxPool2d(_MaxPool, torch.nn.MaxPool2d):
    """torch.nn.MaxPool2d computed by pydl's kernels."""

    _op = "max_pool2d"


class MaxPool1d(_MaxPool, torch.nn.MaxPool1d):
    """torch.nn.MaxPool1d computed by pydl's max-pool kernels (pydl.max_pool1d)."""

    _op = "max_pool1d"


class AvgPool2d(torch.nn.AvgPool2d):
    """torch.nn.AvgPool2d computed by pydl's kernels."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override=None, *,
                 backend: str | None = None):
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad,
                         divisor_override)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override, backend=self.backend)


class AvgPool1d(torch.nn.AvgPool1d):
    """torch.nn.AvgPool1d computed by pydl's average-pool kernels (pydl.avg_pool1d)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, *, backend: str | None = None):
        super().__init__(kernel_size, stride, padding, ceil_mode, count_include_pad)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.avg_pool1d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, backend=self.backend)


class _AdaptiveAvgPool:
    """pydl.nn.AdaptiveAvgPool1d's and AdaptiveAvgPool2d's constructor (torch's, plus
    `backend=`) and forward."""

    _op = ""

    def __init__(self, output_size, *, backend: str | None = None):
        super().__init__(output_size)
        self.backend = backend

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return getattr(F, self._op)(input, self.output_size, backend=self.backend)


class AdaptiveAvgPool2d(_AdaptiveAvgPool, torch.nn.AdaptiveAvgPool2d):
    """torch.nn.AdaptiveAvgPool2d computed by pydl's kernels."""

    _op = "adaptive_avg_pool2d"


class AdaptiveAvgPool1d(_AdaptiveAvgPool, torch.nn.AdaptiveAvgPool1d):
    """torch.nn.AdaptiveAvgPool1d computed by pydl's kernels (pydl.adaptive_avg_pool1d)."""

    _op = "adaptive_avg_pool1d"


class MultiheadAttention(torch.nn.MultiheadAttention):
    """torch.nn.MultiheadAttention whose attention runs on pydl's kernels.

    Same constructor arguments and state_dict. The input and output projections are torch's
    linear layers, as in torch's module; the attention itself is pydl.scaled_dot_product_attention
    (the flash kernels; need_weights=True uses algo="naive", which materialises the weights;
    on the numba backend the flash output and a weights kernel).
    Masks keep torch.nn.MultiheadAttention's convention: a True in a boolean attn_mask or
    key_padding_mask means "do not attend". add_bias_kv appends the learned bias_k, bias_v as
    one more key and value, add_zero_attn a zero key and value (after the bias), as torch
    does; every mask then attends to them.
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
                 add_zero_attn=False, kdim=None, vdim=None, batch_first=False, device=None,
                 dtype=None, *, backend: str | None = None):
        super().__init__(embed_dim, num_heads, dropout, bias, add_bias_kv, add_zero_attn, kdim,
                         vdim, batch_first, device, dtype)
        self.backend = backend

    def _projections(self):
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return (w_q, b[0]), (w_k, b[1]), (w_v, b[2])

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        batched = _check_mha_inputs(query, key, value, key_padding_mask, attn_mask,
                                    self.num_heads, self.batch_first)
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as in torch)")
        N, L, _ = query.shape
        S, H = key.shape[1], self.num_heads
        q, k, v = (torch.nn.functional.linear(x, w, b)
                   for x, (w, b) in zip((query, key, value), self._projections()))
        extra = 0       # keys appended: torch's order, the learned bias, then a zero key
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, -1)], 1)
            v = torch.cat([v, self.bias_v.expand(N, 1, -1)], 1)
            extra += 1
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, 1, k.shape[2])], 1)
            v = torch.cat([v, v.new_zeros(N, 1, v.shape[2])], 1)
            extra += 1
        # (N, len, E) -> (N, H, len, head_dim) as a strided view: the kernels read its strides
        q, k, v = (x.unflatten(-1, (H, -1)).transpose(1, 2) for x in (q, k, v))
        mask = _merge_masks(attn_mask, key_padding_mask, N, H, L, S, q.dtype, extra)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:        # under dropout torch returns the dropped weights: so do we
            out, weights = attention_with_weights(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                  backend=self.backend)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).flatten(2))
        if not batched:
            return out.squeeze(0), (weights.squeeze(0) if weights is not None else None)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def _check_mha_inputs(query, key, value, key_padding_mask, attn_mask, num_heads: int,
                      batch_first: bool) -> bool:
    """torch.nn.MultiheadAttention's checks of its inputs' ranks, the masks' shapes and
    dtypes (bool, or floating of the query's dtype); returns whether the call is batched."""
    if query.dim() not in (2, 3):
        raise ValueError(f"query must be unbatched 2-D (L, E) or batched 3-D, got a "
                         f"{query.dim()}-D tensor of shape {tuple(query.shape)}")
    batched = query.dim() == 3
    for name, t in (("key", key), ("value", value)):
        if t.dim() != query.dim():
            raise ValueError(f"{name} must be {query.dim()}-D as the query is, got shape "
                             f"{tuple(t.shape)}")
    seq = 1 if batched and batch_first else 0       # the sequence axis
    L, S = query.shape[seq], key.shape[seq]
    N = query.shape[1 - seq] if batched else 1
    if value.shape[seq] != S:
        raise ValueError(f"key and value must have one sequence length, got key "
                         f"{tuple(key.shape)} and value {tuple(value.shape)}")
    if batched:
        for name, t in (("key", key), ("value", value)):
            if t.shape[1 - seq] != N:
                # the attention would broadcast a batch of 1: torch's module raises
                raise ValueError(f"{name} has batch size {t.shape[1 - seq]} but the query has "
                                 f"{N} (shapes {tuple(query.shape)} and {tuple(t.shape)}, "
                                 f"batch_first={batch_first})")
    for name, m in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if m is None:
            continue
        if m.dtype != torch.bool and m.dtype != query.dtype:
            raise TypeError(f"{name} must be bool or of the query's dtype ({query.dtype}), got "
                            f"{m.dtype}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != ((N, S) if batched
                                                                           else (S,)):
        raise ValueError(f"key_padding_mask must be {'(N, S)' if batched else '(S,)'} = "
                         f"{(N, S) if batched else (S,)} for a "
                         f"{'batched' if batched else 'unbatched'} query, got shape "
                         f"{tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        want = {2: (L, S), 3: (N * num_heads, L, S)}.get(attn_mask.dim())
        if want is None or tuple(attn_mask.shape) != want:
            raise ValueError(f"attn_mask must be (L, S) = {(L, S)} or (N * num_heads, L, S) = "
                             f"{(N * num_heads, L, S)}, got shape {tuple(attn_mask.shape)}")
    return batched


def _merge_masks(attn_mask, key_padding_mask, N, H, L, S, dtype, extra: int = 0):
    """torch.nn.MultiheadAttention's masks (True = do not attend, or float added) as one
    scaled_dot_product_attention mask (True = attend, or float added), broadcast to
    (N, H, L, S + extra): the `extra` keys appended after the S given (add_bias_kv,
    add_zero_attn) attended by every query, as torch pads its masks for them."""
    masks = []
    if attn_mask is not None:
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(N, H, L, S)
        masks.append(m)
    if key_padding_mask is not None:
        masks.append(key_padding_mask.view(N, 1, 1, S))
    if not masks:
        return None
    if extra:       # False (attend) or 0.0 for the appended keys
        masks = [torch.nn.functional.pad(m, (0, extra)) for m in masks]
    if all(m.dtype == torch.bool for m in masks):
        keep = ~masks[0]
        for m in masks[1:]:
            keep = keep & ~m
        return keep
    total = None
    for m in masks:
        add = (torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
               if m.dtype == torch.bool else m.to(dtype))
        total = add if total is None else total + add
    return total


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell computed by pydl's fused cell kernel (forward in one launch)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str | None = None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor, hx=None):
        return F.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                           backend=self.backend)


class _RNNLayer:
    """What pydl.nn.LSTM and pydl.nn.GRU share: the pydl keywords, and a forward that hands
    torch's flat weights to pydl.lstm / pydl.gru (the subclass's `_op`)."""
    _op: str

    def __init__(self, *args, backend: str | None = None, algo: str | None = None,
                 recompute: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.backend, self.algo, self.recompute = backend, algo, recompute

    def forward(self, input, hx=None):
        # as torch's forward: weights swapped since the last call (torch.func.functional_call,
        # a parametrization's recomputed weight) replace the flat list's
        self._update_flat_weights()
        return getattr(F, self._op)(
            input, hx, self._flat_weights, num_layers=self.num_layers, bias=self.bias,
            batch_first=self.batch_first, dropout=self.dropout, training=self.training,
            bidirectional=self.bidirectional, backend=self.backend, algo=self.algo,
            recompute=self.recompute)


class LSTM(_RNNLayer, torch.nn.LSTM):
    """torch.nn.LSTM on pydl's kernels: the input projection of all steps as one GEMM, then
    the recurrence in one launch per layer and direction (its programs meeting at a grid
    barrier between steps; algo="steps": one launch per step); backward through time from the
    saved gate activations, or with recompute=True from activations recomputed one layer and
    direction at a time (less memory: the forward keeps none).

    Same constructor arguments (proj_size included: h_t = W_hr (o_t * tanh(c_t))), inputs
    (PackedSequence included) and state_dict as torch.nn.LSTM, plus `backend=`, `algo=` and
    `recompute=`.
    """

    _op = "lstm"


class GRUCell(torch.nn.GRUCell):
    """torch.nn.GRUCell computed by pydl's fused GRU cell kernel."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None,
                 dtype=None, *, backend: str | None = None):
        super().__init__(input_size, hidden_size, bias, device=device, dtype=dtype)
        self.backend = backend

    def forward(self, input: torch.Tensor, hx=None) -> torch.Tensor:
        return F.gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh,
                          backend=self.backend)


class GRU(_RNNLayer, torch.nn.GRU):
    """torch.nn.GRU on pydl's kernels: the input projection of all steps as one GEMM, then the
    recurrence in one launch per layer and direction (algo="steps": one per step); backward
    through time from the saved gate activations (or, with recompute=True, from activations
    recomputed one layer and direction at a time).

    Same constructor arguments, inputs (PackedSequence included) and state_dict as
    torch.nn.GRU, plus `backend=`, `algo=` ("persistent", "steps") and `recompute=`.
    """

    _op = "gru"


__all__ = ["Conv2d", "CrossEntropyLoss", "LinearCrossEntropyLoss", "Softmax", "LogSoftmax",
           "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d", "MultiheadAttention", "LSTMCell",
           "LSTM", "GRUCell", "GRU"]
