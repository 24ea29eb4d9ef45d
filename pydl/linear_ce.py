"""linear_cross_entropy: cross_entropy(linear(input, weight, bias), target) without the logits.

A language model's last layer projects N hidden states (N, H) onto a vocabulary of V classes
and takes the cross-entropy of the (N, V) logits. At N = 8192 tokens and V = 128k classes the
logits alone are 2 GiB in bf16, and the composite keeps them for the backward, next to its
log-softmax and their gradient. Fused here as Liger-Kernel's fused linear cross-entropy is:
the rows go in chunks; a chunk's logits are computed by the backend's GEMM (pydl/_gemm.py,
pydl/_gemm_numba.py) into one buffer reused by every chunk, their loss by the cross-entropy
kernel, and in training their gradient is written over them and multiplied into the gradients
of input, weight and bias by the GEMM before the next chunk overwrites the buffer. Extra memory:
one chunk of logits (at most CHUNK_BYTES, 1 GiB), the rows' fp32 logsumexp and, for a 16-bit
weight over several chunks, an fp32 accumulator of its gradient (a 16-bit accumulator would
round the gradient once a chunk).

Two schedules, as cross_entropy has (pydl/softmax_ce.py):

    gradient in the forward   the triton backend, reduction "sum" or "mean", something
                              requiring grad: the forward kernel writes each chunk's gradient
                              for an upstream gradient of 1 (divided by the mean's denominator
                              in the kernel), so the forward also finishes the gradients of
                              input, weight and bias; the backward multiplies them in place by
                              the upstream gradient (reading it on the device: nothing to do
                              where it is 1, the last node of a training step) and hands them
                              over. Three GEMMs a chunk, as the composite's. Under
                              torch.compile the same forward, its gradients saved and scaled
                              out of place by the compiled backward (a fused multiply each).
    recompute                 otherwise (the numba backend, whose forward kernel writes no
                              gradient; reduction "none", whose per-row upstream gradient only
                              the backward knows): the forward keeps each row's
                              logsumexp; the backward computes each chunk's logits again and
                              writes their gradient with the cross-entropy backward kernel. Four
                              GEMMs a chunk.

Both steps are torch.library custom ops (pydl::linear_cross_entropy_fwd / _bwd), so a model
using this compiles with torch.compile(fullgraph=True). One chunk (the default up to 1 GiB of
logits) is reduced by the cross-entropy kernel as pydl.cross_entropy's is (the loss in its
dtype, a mean's denominator by the kernels); over several chunks, the mean's denominator
(the summed class weights of the rows that count) is taken from the targets first and the
chunks' fp32 losses summed after, with torch reductions over the N rows (not over the N x V
logits, which only the kernels touch). Double backward is not supported: differentiating the
gradient raises (pydl/_autograd.py's rule).

The steps (kernel ops, kept launches, the Function) are in pydl/_linear_ce_ops.py.
"""
from __future__ import annotations

import torch

from ._checks import check_tensor
from ._launch import tf32_allowed
from ._library import autocast_inputs
from ._linear_ce_ops import (
    F32,
    LinearCEKernels,
    LinearCrossEntropyFunction,
    _Steps,
    chunk_rows_for,
)
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
from ._shapes import integer
from ._softmax_ce_ops import LAUNCHERS
from .backends import current_backend, dispatch, register
from .softmax_ce import check_loss_options, check_softcap, check_z_loss, z_loss_term

# --- the implementations by backend, and the public function ---------------------------------

def _kernel_linear_cross_entropy(backend: str):
    def impl(x, w, b, target, class_weight, ignore_index, reduction, smoothing, softcap,
             z_loss, chunk):
        ops = LinearCEKernels(ignore_index, reduction, smoothing, softcap, z_loss, chunk,
                              backend)
        if needs_graph(x, w, b):
            return apply(LinearCrossEntropyFunction, x, w, b, target, class_weight, ops)
        return ops.forward(x, w, b, target, class_weight, False, False, False)[0]
    return impl


_KERNEL_IMPLS = {_name: register("linear_cross_entropy", _name)(
    _kernel_linear_cross_entropy(_name)) for _name in LAUNCHERS}


@register("linear_cross_entropy", "torch")
def _torch_linear_cross_entropy(x, w, b, target, class_weight, ignore_index, reduction,
                                smoothing, softcap, z_loss, chunk):
    logits = torch.nn.functional.linear(x, w, b)
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    loss = torch.nn.functional.cross_entropy(
        logits, target, weight=class_weight, ignore_index=ignore_index, reduction=reduction,
        label_smoothing=smoothing)
    if z_loss:      # logits (N, V): class dim 1
        loss = loss + z_loss_term(logits, target, ignore_index, reduction, z_loss).to(loss.dtype)
    return loss


def _check(input, weight, target, bias, class_weight, ignore_index, reduction,
           label_smoothing, softcap, z_loss, chunk_rows, backend):
    check_tensor(input, "input", backend)
    check_tensor(weight, "weight", backend, ndims=(2,))
    if input.dim() < 1:
        raise ValueError("input must have at least one dimension (..., in_features)")
    if input.shape[-1] != weight.shape[1]:
        raise ValueError(f"input's last dimension {input.shape[-1]} does not match weight's "
                         f"in_features {weight.shape[1]} (weight is (classes, in_features) = "
                         f"{tuple(weight.shape)}, as torch.nn.Linear's)")
    if weight.shape[0] == 0:
        raise ValueError("weight has no rows: cross-entropy needs at least one class")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight's dtype {weight.dtype} differs from input's {input.dtype}")
    if bias is not None:
        check_tensor(bias, "bias", backend, ndims=(1,))
        if bias.shape[0] != weight.shape[0] or bias.dtype != input.dtype:
            raise ValueError(f"bias must be ({weight.shape[0]},) of input's dtype "
                             f"{input.dtype}, got {tuple(bias.shape)} {bias.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype != torch.int64:
        raise TypeError(f"target must hold int64 (torch.long) or uint8 class indices, got "
                        f"{target.dtype} (class probabilities: pydl.cross_entropy on the logits)")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match input's leading "
                         f"dimensions {tuple(input.shape[:-1])}")
    for name, t in (("weight", weight), ("target", target), ("bias", bias)):
        if t is not None and t.device != input.device:
            raise RuntimeError(f"{name} is on {t.device} but input is on {input.device}")
    check_loss_options(input, weight.shape[0], class_weight, "class_weight", reduction,
                       label_smoothing, ignore_index)
    check_softcap(softcap)
    check_z_loss(z_loss, class_weight, "class_weight")
    if chunk_rows is not None and (integer(chunk_rows) is None or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")


@emulated("forward", "backward", "scale", "loss_only")
class _LinearCrossEntropyCall(LinearCEKernels):
    """linear_cross_entropy for one call signature (pydl._plan's Cache.call): dispatched and
    checked once, then called with the tensors. On pydl's backends in eager mode it is also
    the signature's plan: LinearCrossEntropyFunction runs its methods, which run the steps
    (pydl/_linear_ce_ops.py _Steps) kept here by the gradients needed (and for the backward
    the upstream gradient's dtype and strides) instead of the kernel ops, which build a key
    of every tensor per call."""

    __slots__ = ("impl", "name", "shape", "flat", "planned", "steps", "scales")

    def __init__(self, input, weight, target, bias, class_weight, ignore_index, reduction,
                 label_smoothing, softcap, z_loss, chunk_rows, backend):
        name, impl = dispatch("linear_cross_entropy", backend, input, weight, target,
                              *(t for t in (bias, class_weight) if isinstance(t, torch.Tensor)))
        _check(input, weight, target, bias, class_weight, ignore_index, reduction,
               label_smoothing, softcap, z_loss, chunk_rows, name)
        # input as rows (N, H) (-1 is ambiguous for H = 0)
        self.shape = (target.numel(), input.shape[-1])
        self.flat = input.dim() == 2 and target.dim() == 1      # rows already
        super().__init__(int(ignore_index), reduction, float(label_smoothing),
                         float(softcap or 0.0), float(z_loss),
                         int(chunk_rows) if chunk_rows is not None else
                         chunk_rows_for(self.shape[0], weight.shape[0], input.dtype), name)
        self.impl, self.name = impl, name
        self.planned = impl is _KERNEL_IMPLS.get(name) and not torch.compiler.is_compiling() \
            and plain_tensors(input, weight, target, bias, class_weight)
        self.steps, self.scales = {}, {}

    def __call__(self, input, weight, target, bias, class_weight):
        if class_weight is not None and class_weight.requires_grad and self.name != "torch" \
                and torch.is_grad_enabled():
            raise NotImplementedError(
                "linear_cross_entropy: class_weight requires grad, where torch does not "
                "differentiate the loss w.r.t. the class weights either (it raises: nll_loss "
                "is not differentiable with respect to argument 'weight'): pass "
                "class_weight.detach()")
        x, t = (input, target) if self.flat else (input.reshape(self.shape), target.reshape(-1))
        if not self.planned:
            loss = self.impl(x, weight, bias, t, class_weight, self.ignore_index,
                             self.reduction, self.smoothing, self.softcap, self.z_loss,
                             self.chunk)
        elif needs_graph(input, weight, bias):
            loss = apply(LinearCrossEntropyFunction, x, weight, bias, t, class_weight, self)
        else:
            loss = self.loss_only(x, weight, bias, t, class_weight)
        if loss.dtype != F32 and torch._C._is_any_autocast_enabled() \
                and torch.is_autocast_enabled(input.device.type):
            loss = loss.float()     # torch's cross_entropy runs in float32 under autocast
        return loss.view(target.shape) if self.reduction == "none" else loss

    # the plan (eager, pydl's backends): LinearCEKernels' steps without their keys

    def _steps(self, key, x, w, b, target, need_x, need_w, need_b, grads) -> _Steps:
        steps = self.steps.get(key)
        if steps is None:
            steps = self.steps[key] = _Steps(
                self.backend, self.softcap, self.z_loss, x, w, b, target, self.ignore_index,
                self.reduction, self.smoothing, need_x, need_w, need_b, grads, self.chunk,
                planned=True)
        return steps

    def loss_only(self, x, w, b, target, class_weight):
        """The loss of a call without a graph (what only a backward reads, in buffers kept)."""
        return self._steps((False, False, False), x, w, b, target, False, False, False,
                           False).forward(x, w, b, target, class_weight, unread=True)[0]

    def forward(self, x, w, b, target, class_weight, need_x, need_w, need_b):
        return self._steps((need_x, need_w, need_b), x, w, b, target, need_x, need_w, need_b,
                           self.in_forward and (need_x or need_w or need_b)).forward(
            x, w, b, target, class_weight)

    def backward(self, x, w, b, target, class_weight, lse, denom, grad_out, need_x, need_w,
                 need_b):
        return self._steps((need_x, need_w, need_b, grad_out.dtype, grad_out.stride()), x, w, b,
                           target, need_x, need_w, need_b, False).backward(
            x, w, b, target, class_weight, lse, denom, grad_out)

    def scale(self, g, grad_out) -> None:
        """g *= grad_out in place (0-d, read on the device): the launch kept by g's size and
        grad_out's dtype."""
        key = (g.numel(), grad_out.dtype)
        run = self.scales.get(key)
        if run is None:
            run = LAUNCHERS["triton"].plan_scale_grad(g.view(1, -1), grad_out, None, -100)
            if not capturing():
                self.scales[key] = run
        run(g, grad_out, None)


def _call_key(input, weight, target, bias, class_weight, ignore_index, reduction,
              label_smoothing, softcap, z_loss, chunk_rows, backend):
    return (backend or current_backend(), *tensors_key(input, weight, target, bias,
                                                       class_weight),
            *options_key(ignore_index, reduction, label_smoothing, softcap, z_loss, chunk_rows),
            tf32_allowed(False))


_CALLS = Cache("linear_cross_entropy calls")


def linear_cross_entropy(input, weight, target, bias=None, *, class_weight=None,
                         ignore_index=-100, reduction="mean", label_smoothing=0.0,
                         softcap=None, z_loss=0.0, chunk_rows=None, backend=None):
    """cross_entropy(linear(input, weight, bias), target, weight=class_weight, ...) without
    materialising the (N, V) logits: the loss of a language model's head.

    input (..., H) hidden states; weight (V, H) and bias (V,) as torch.nn.Linear's; target
    (...) int64 (or uint8) class indices (ignore_index for rows that do not count);
    class_weight (V,), reduction and label_smoothing as torch.nn.functional.cross_entropy's,
    the loss in input's dtype (float32 under autocast, as the composite's). softcap s: the
    logits capped as s tanh(logits / s) before the loss (Gemma-2's final_logit_softcapping,
    Liger-Kernel's `softcap`), in the GEMM's epilogue. z_loss z: z logsumexp(logits)^2 added
    to each row that counts (PaLM's z-loss, Liger's lse_square_scale; a mean divides it by the
    rows that count, as the loss; not with class_weight). The rows go in
    chunks of `chunk_rows` (default: as many as 1 GiB of logits hold); the result does not
    depend on it beyond the rounding of the summed gradients. Under torch.autocast the
    product runs in the autocast dtype, as torch.nn.functional.linear's does.
    """
    if isinstance(target, torch.Tensor) and target.dtype == torch.uint8:
        target = target.long()          # as torch's cross_entropy takes byte targets
    input, weight, bias = autocast_inputs("linear", input, weight, bias)
    call = _CALLS.call(_call_key, _LinearCrossEntropyCall, input, weight, target, bias,
                       class_weight, ignore_index, reduction, label_smoothing, softcap,
                       z_loss, chunk_rows, backend)
    return call(input, weight, target, bias, class_weight)


__all__ = ["linear_cross_entropy", "LinearCrossEntropyFunction"]
