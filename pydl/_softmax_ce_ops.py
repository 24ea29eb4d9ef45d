"""softmax and cross-entropy's kernel ops and autograd Functions. Each step is a torch.library
custom op (pydl::softmax_fwd, softmax_bwd, cross_entropy_fwd, cross_entropy_bwd,
cross_entropy_prob_fwd, cross_entropy_prob_bwd, cross_entropy_prob_weight_bwd;
pydl/_library.py kernel_op, with a fake) that
allocates its outputs and launches through its backend's launcher (LAUNCHERS:
pydl/_softmax_ce_triton.py, pydl/_softmax_ce_numba.py). SoftmaxKernels and CrossEntropyKernels
hold a call's options with a method per step; the autograd Functions (SoftmaxFunction,
CrossEntropyFunction, CrossEntropyProbFunction) run them, and pydl/softmax_ce.py's per-call
plans subclass them. The double backward: _SoftmaxBackward, and cross-entropy's backward
rebuilt from differentiable pieces under create_graph. pydl/softmax_ce.py's docstring lists
the family's parts.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ._autograd import without_double_backward
from ._launch import new_output
from ._library import empty_like_shape, kernel_op
from ._shapes import as_rows
from ._softmax_ce_common import DENOM_SHAPE
from ._softmax_ce_numba import _NumbaLaunch
from ._softmax_ce_triton import _TritonLaunch

LAUNCHERS = {"triton": _TritonLaunch, "numba": _NumbaLaunch}


def _softmax_fake(x, dim, log, backend):
    return empty_like_shape(x)


@kernel_op("softmax_fwd", _softmax_fake)
def _softmax_fwd(x: Tensor, dim: int, log: bool, backend: str) -> Tensor:
    x3, outer, n, inner = as_rows(x, dim)
    y3 = new_output((outer, n, inner), x.dtype, x.device)
    if y3.numel():
        LAUNCHERS[backend].softmax_fwd(x3, y3, log)
    return y3.view(x.shape)


@kernel_op("softmax_bwd", lambda y, dy, dim, log, backend: empty_like_shape(y))
def _softmax_bwd(y: Tensor, dy: Tensor, dim: int, log: bool, backend: str) -> Tensor:
    y3, outer, n, inner = as_rows(y, dim)
    dy3 = dy.reshape(y3.shape)
    dx3 = new_output(y3.shape, y3.dtype, y3.device)
    if dx3.numel():
        LAUNCHERS[backend].softmax_bwd(y3, dy3, dx3, log)
    return dx3.view(y.shape)


class SoftmaxKernels:
    """softmax / log_softmax's kernel ops over one dim on one backend: what SoftmaxFunction
    and its double backward run, pydl:: custom ops under torch.compile. In eager mode a call
    signature's plan (_SoftmaxCall, a subclass) runs the same steps with its outputs'
    allocation and its launches fixed."""

    __slots__ = ("dim", "log", "backend")

    def __init__(self, dim: int, log: bool, backend: str):
        self.dim, self.log, self.backend = dim, log, backend

    def kernels(self) -> "SoftmaxKernels":
        """The ops for tensors of any strides (the double backward's)."""
        return self

    def forward(self, x):
        return _softmax_fwd(x, self.dim, self.log, self.backend)

    def backward(self, y, dy):
        return _softmax_bwd(y, dy, self.dim, self.log, self.backend)


class SoftmaxFunction(torch.autograd.Function):
    """softmax / log_softmax by `ops`; saves its output, which is all the backward needs."""

    @staticmethod
    def forward(ctx, x, ops: SoftmaxKernels):
        y = ops.forward(x)
        ctx.save_for_backward(y)
        ctx.ops = ops
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        if torch.is_grad_enabled():      # create_graph: differentiable again
            return _SoftmaxBackward.apply(y, dy, ctx.ops.kernels()), None
        return ctx.ops.backward(y, dy), None


class _SoftmaxBackward(torch.autograd.Function):
    """softmax / log_softmax's backward dx(y, dy) on pydl's kernel, as a Function for double
    backward. Its derivatives, with s = sum(y * dy) and sums over `dim`:
      softmax      dx = y (dy - s):        d dy = y (ddx - sum(y ddx))  (the backward kernel)
                                           d y  = ddx (dy - s) - dy sum(ddx y)
      log_softmax  dx = dy - exp(y) sum(dy): d dy = ddx - sum(ddx exp(y))
                                             d y  = -ddx exp(y) sum(dy)
    Those terms are elementwise products and row sums written in torch ops on pydl's saved
    output (README: double backward); d y then flows into the forward's backward kernel."""

    @staticmethod
    def forward(ctx, y, dy, ops: SoftmaxKernels):
        ctx.save_for_backward(y, dy)
        ctx.ops = ops
        return ops.backward(y, dy)

    @staticmethod
    def backward(ctx, ddx):
        y, dy = ctx.saved_tensors
        ops, need = ctx.ops, ctx.needs_input_grad
        dim = ops.dim
        d_y = d_dy = None
        if ops.log:
            p = y.exp()
            if need[0]:
                d_y = -ddx * p * dy.sum(dim, keepdim=True)
            if need[1]:
                d_dy = ddx - (ddx * p).sum(dim, keepdim=True)
        else:
            if need[0]:
                d_y = ddx * (dy - (y * dy).sum(dim, keepdim=True)) \
                    - dy * (ddx * y).sum(dim, keepdim=True)
            if need[1]:
                d_dy = _SoftmaxBackward.apply(y, ddx, ops)
        return d_y, d_dy, None


def kernel_checks_targets(x: Tensor, backend: str) -> bool:
    """Whether the forward kernel checks the targets itself (no host synchronisation): on a
    GPU both backends (a PTX trap, as torch's device-side assert), in emulation the Numba
    kernels (the simulator raises IndexError). Triton's interpreter runs no PTX, so in
    emulation the host checks them for Triton."""
    return backend == "numba" or (backend == "triton" and x.device.type == "cuda")


def _check_target_range(target, n_classes: int, ignore_index: int) -> None:
    """Every target a class index or ignore_index. The kernels index by target, so an
    out-of-range value would read outside the row. One small reduction and a host sync; it
    runs inside the kernel op, so a compiled graph does not break on it."""
    if target.numel():
        bad = (target != ignore_index) & ((target < 0) | (target >= n_classes))
        if bool(bad.any()):
            value = int(target[bad].reshape(-1)[0])
            raise IndexError(f"target holds {value}, out of range for {n_classes} classes "
                             f"(valid: 0..{n_classes - 1}, or ignore_index={ignore_index})")


def _cross_entropy_fake(x, target, weight, ignore_index, reduction, smoothing, z_loss, softcap,
                        grad, backend):
    rows = target.numel()
    out = empty_like_shape(x, target.shape if reduction == "none" else ())
    return (out, empty_like_shape(x, (rows,), torch.float32),
            empty_like_shape(x, DENOM_SHAPE, torch.float32),
            # the gradient only where the backend writes it in the forward (Triton)
            empty_like_shape(x, x.shape if grad and backend == "triton" else (0,)))


@kernel_op("cross_entropy_fwd", _cross_entropy_fake)
def _cross_entropy_fwd(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       reduction: str, smoothing: float, z_loss: float, softcap: float,
                       grad: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss in x's dtype, per-row logsumexp, the mean's denominator: the summed weights of
    the rows that count (a placeholder for other reductions), and with `grad` the loss's
    gradient w.r.t. x written by the forward (an empty placeholder without)). softcap s > 0:
    the loss of the logits s tanh(x / s), capped as the kernels read them.

    The forward kernel checks the targets (no host synchronisation: kernel_checks_targets),
    except Triton's in emulation, where the host checks them (a small reduction and a sync)."""
    if not kernel_checks_targets(x, backend):
        _check_target_range(target, x.shape[0 if x.dim() == 1 else 1], ignore_index)
    dim = 0 if x.dim() == 1 else 1
    x3, outer, n, inner = as_rows(x, dim)
    t = target.reshape(outer * inner)
    loss, lse, denom, dx3 = LAUNCHERS[backend].cross_entropy_fwd(x3, t, weight, ignore_index,
                                                                 smoothing, reduction, grad,
                                                                 z_loss, softcap)
    dx = dx3.view(x.shape) if dx3 is not None else new_output((0,), x.dtype, x.device)
    return (loss.view(target.shape) if reduction == "none" else loss), lse, denom, dx


@kernel_op("cross_entropy_bwd", lambda x, *rest: empty_like_shape(x))
def _cross_entropy_bwd(x: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                       denom: Tensor, grad_out: Tensor, ignore_index: int, reduction: str,
                       smoothing: float, z_loss: float, softcap: float, backend: str) -> Tensor:
    dim = 0 if x.dim() == 1 else 1
    x3, outer, n, inner = as_rows(x, dim)
    t = target.reshape(outer * inner)
    dx3 = new_output(x3.shape, x3.dtype, x3.device)
    if dx3.numel():
        LAUNCHERS[backend].cross_entropy_bwd(x3, t, weight, lse, denom, grad_out, reduction, dx3,
                                             ignore_index, smoothing, z_loss, softcap)
    return dx3.view(x.shape)


class CrossEntropyKernels:
    """Cross-entropy's kernel ops for one set of options on one backend: what
    CrossEntropyFunction (class-index targets) and CrossEntropyProbFunction (class
    probabilities) run, pydl:: custom ops under torch.compile. In eager mode a
    call signature's plan (_CrossEntropyCall, a subclass) runs the same steps with its
    outputs' allocation and its launches fixed."""

    __slots__ = ("ignore_index", "reduction", "smoothing", "backend", "z_loss", "softcap")

    def __init__(self, ignore_index: int, reduction: str, smoothing: float, backend: str,
                 z_loss: float = 0.0, softcap: float = 0.0):
        self.ignore_index, self.reduction = ignore_index, reduction
        self.smoothing, self.backend, self.z_loss = smoothing, backend, z_loss
        self.softcap = softcap

    def forward(self, x, target, weight, grad: bool):
        """(loss, per-row logsumexp, the mean's denominator, with `grad` the gradient)."""
        return _cross_entropy_fwd(x, target, weight, self.ignore_index, self.reduction,
                                  self.smoothing, self.z_loss, self.softcap, grad, self.backend)

    def backward(self, x, target, weight, lse, denom, grad_out):
        return _cross_entropy_bwd(x, target, weight, lse, denom, grad_out, self.ignore_index,
                                  self.reduction, self.smoothing, self.z_loss, self.softcap,
                                  self.backend)

    def scale_grad(self, dx, grad_out, target) -> None:
        """The forward's gradient scaled in place by the upstream gradient (the ignored rows'
        zeros kept; target None for class probabilities)."""
        LAUNCHERS[self.backend].cross_entropy_scale_grad(dx, grad_out, target, self.ignore_index)

    # class-probability targets (CrossEntropyProbFunction)

    def prob_forward(self, x, target, weight, grad: bool):
        """(loss, stats: what prob_backward reads, with `grad` the gradient for an upstream
        gradient of 1)."""
        return _cross_entropy_prob_fwd(x, target, weight, self.reduction, self.smoothing, grad,
                                       self.backend)

    def prob_backward(self, x, target, weight, stats, grad_out, target_grad: bool):
        """(the gradient w.r.t. x, w.r.t. target: an empty placeholder without target_grad)."""
        return _cross_entropy_prob_bwd(x, target, weight, stats, grad_out, self.reduction,
                                       self.smoothing, target_grad, self.backend)

    def prob_weight_backward(self, x, target, weight, stats, grad_out):
        """The gradient w.r.t. the class weights, in their dtype."""
        return _cross_entropy_prob_weight_bwd(x, target, weight, stats, grad_out,
                                              self.reduction, self.smoothing, self.backend)


class CrossEntropyFunction(torch.autograd.Function):
    """Fused log_softmax + NLL (+ weights, ignore_index, label smoothing) over class dim 1.

    With grad_in_forward the forward also writes the gradient into a buffer of its own; the
    first backward scales that buffer in place by the upstream gradient (on the device, no
    host synchronisation; nothing to do for an upstream gradient of 1) and hands it over. A
    second backward through a retained graph recomputes the gradient from the saved logits,
    and a backward under create_graph builds it from differentiable ops (double backward)."""

    @staticmethod
    def forward(ctx, x, target, weight, ops: CrossEntropyKernels, grad_in_forward: bool):
        out, lse, denom, dx = ops.forward(x, target, weight, grad_in_forward)
        ctx.save_for_backward(x, target, weight, lse, denom)
        ctx.ops = ops
        ctx.grad_from_forward = dx if grad_in_forward else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, target, weight, lse, denom = ctx.saved_tensors
        ops = ctx.ops
        if torch.is_grad_enabled():      # create_graph: differentiable again
            if ops.z_loss or ops.softcap:   # the gradient comes, differentiating it raises
                return without_double_backward("cross_entropy with z_loss or softcap",
                                               CrossEntropyFunction.backward, ctx, grad_out)
            q = _index_target_distribution(x, target, weight, ops.ignore_index, ops.smoothing)
            g = _row_cotangent(grad_out, x, ops.reduction, denom[0])
            dx = _cross_entropy_grad_graph(_log_probabilities(x, ops.backend), q, g,
                                           ops.backend)
            return dx, None, None, None, None
        dx, ctx.grad_from_forward = ctx.grad_from_forward, None
        if dx is not None:
            ops.scale_grad(dx, grad_out, target)
        else:
            dx = ops.backward(x, target, weight, lse, denom, grad_out)
        return dx, None, None, None, None


def _row_shape(x: Tensor) -> tuple[int, ...]:
    """Shape of the per-row losses of (C,) or (N, C, d1, ...) logits: () or (N, d1, ...)."""
    return () if x.dim() == 1 else (x.shape[0],) + tuple(x.shape[2:])


def _loss_dtype(x: Tensor, target: Tensor) -> torch.dtype:
    """torch's promotion of the logits' and the probabilities' dtypes, for the fp16, bf16 and
    fp32 the kernels take (one of them, or fp32 for two), without a call into the
    dispatcher."""
    return x.dtype if x.dtype == target.dtype else torch.float32


def _cross_entropy_prob_fake(x, target, weight, reduction, smoothing, grad, backend):
    rows = math.prod(_row_shape(x))
    dtype = _loss_dtype(x, target)
    out = empty_like_shape(x, _row_shape(x) if reduction == "none" else (), dtype)
    return (out, empty_like_shape(x, (2 * rows,), torch.float32),
            # the gradient only where the backend writes it in the forward (Triton)
            empty_like_shape(x, x.shape if grad and backend == "triton" else (0,)))


@kernel_op("cross_entropy_prob_fwd", _cross_entropy_prob_fake)
def _cross_entropy_prob_fwd(x: Tensor, target: Tensor, weight: Optional[Tensor], reduction: str,
                            smoothing: float, grad: bool,
                            backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """Class-probability targets (target: x's shape, floating): (loss in the promoted dtype
    of x and target, as torch; stats: one fp32 buffer, per row the logsumexp and
    S = sum_c w_c y'_c, which the backward reads; with `grad` the loss's gradient w.r.t. x
    for an upstream gradient of 1 (each row's for "none"), written by the forward on the
    triton backend (an empty placeholder without, and on the numba backend))."""
    dim = 0 if x.dim() == 1 else 1
    x3, outer, n, inner = as_rows(x, dim)
    y3 = as_rows(target, dim)[0]
    rows = outer * inner
    none = reduction == "none"
    grad = grad and backend == "triton"     # numba's: an empty placeholder, as the fake says
    stats = new_output(2 * rows, torch.float32, x.device)
    loss = new_output(_row_shape(x) if none else (), _loss_dtype(x, target), x.device)
    dx3 = new_output(x3.shape, x.dtype, x.device) if grad else None
    if rows:
        scratch = None if none else new_output(rows, torch.float32, x.device)
        tensors = (x3, y3, weight, stats, loss, dx3, scratch)
        LAUNCHERS[backend].plan_cross_entropy_prob_fwd(*tensors, smoothing, reduction)(*tensors)
    elif not none:      # torch's empty mean and sum
        loss.fill_(math.nan if reduction == "mean" else 0.0)
    dx = dx3.view(x.shape) if grad else new_output((0,), x.dtype, x.device)
    return loss, stats, dx


def _cross_entropy_prob_bwd_fake(x, target, weight, stats, grad_out, reduction, smoothing,
                                 target_grad, backend):
    return empty_like_shape(x), empty_like_shape(target, None if target_grad else (0,))


@kernel_op("cross_entropy_prob_bwd", _cross_entropy_prob_bwd_fake)
def _cross_entropy_prob_bwd(x: Tensor, target: Tensor, weight: Optional[Tensor], stats: Tensor,
                            grad_out: Tensor, reduction: str, smoothing: float,
                            target_grad: bool, backend: str) -> tuple[Tensor, Tensor]:
    """(gradient w.r.t. x; w.r.t. target when target_grad, else an empty (0,) placeholder:
    a custom op cannot return None)."""
    dim = 0 if x.dim() == 1 else 1
    x3 = as_rows(x, dim)[0]
    y3 = as_rows(target, dim)[0]
    dx3 = new_output(x3.shape, x3.dtype, x3.device)
    dy3 = new_output(y3.shape, y3.dtype, y3.device) if target_grad else None
    if dx3.numel():
        tensors = (x3, y3, weight, stats, grad_out, dx3, dy3)
        LAUNCHERS[backend].plan_cross_entropy_prob_bwd(*tensors, smoothing, reduction)(*tensors)
    dy = dy3.view(target.shape) if target_grad else new_output((0,), target.dtype, target.device)
    return dx3.view(x.shape), dy


@kernel_op("cross_entropy_prob_weight_bwd",
           lambda x, target, weight, stats, grad_out, reduction, smoothing, backend:
           empty_like_shape(weight))
def _cross_entropy_prob_weight_bwd(x: Tensor, target: Tensor, weight: Tensor, stats: Tensor,
                                   grad_out: Tensor, reduction: str, smoothing: float,
                                   backend: str) -> Tensor:
    """The class-probability loss's gradient w.r.t. the class weights (torch's: it
    differentiates them for probability targets), in the weight's dtype:
    dw_c = sum_r g_r y'_rc (lse_r - x_rc), y' the smoothed target, g the upstream gradient
    per row (the mean's 1 / rows in it)."""
    dim = 0 if x.dim() == 1 else 1
    x3 = as_rows(x, dim)[0]
    y3 = as_rows(target, dim)[0]
    dw = new_output((x3.shape[1],), torch.float32, x.device)
    if x3.shape[0] * x3.shape[2] == 0:
        dw.zero_()      # no rows: nothing depends on the weights
    elif dw.numel():
        LAUNCHERS[backend].cross_entropy_prob_weight_grad(x3, y3, stats, grad_out, dw,
                                                          smoothing, reduction)
    return dw if weight.dtype == torch.float32 else dw.to(weight.dtype)


class CrossEntropyProbFunction(torch.autograd.Function):
    """Fused log_softmax + soft-target cross-entropy (+ weights, label smoothing) over class
    dim 1; differentiable in the logits and in the target. `ops`: the options and backend
    (CrossEntropyKernels, or in eager mode the call signature's plan). With grad_in_forward
    the forward also writes the logits' gradient and the backward scales it, as
    CrossEntropyFunction does (not when the target needs a gradient: the backward kernel
    writes both)."""

    @staticmethod
    def forward(ctx, x, target, weight, ops: CrossEntropyKernels, grad_in_forward: bool):
        out, stats, dx = ops.prob_forward(x, target, weight, grad_in_forward)
        ctx.save_for_backward(x, target, weight, stats)
        ctx.ops = ops
        ctx.grad_from_forward = dx if grad_in_forward else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, target, weight, stats = ctx.saved_tensors
        ops = ctx.ops
        target_grad, weight_grad = ctx.needs_input_grad[1:3]
        if torch.is_grad_enabled():      # create_graph: differentiable again
            return _cross_entropy_prob_grad_graph(x, target, weight, grad_out, ops.reduction,
                                                  ops.smoothing, target_grad, weight_grad,
                                                  ops.backend)
        dw = (ops.prob_weight_backward(x, target, weight, stats, grad_out) if weight_grad
              else None)
        dx, ctx.grad_from_forward = ctx.grad_from_forward, None
        if dx is not None and not target_grad:
            ops.scale_grad(dx, grad_out, None)
            return dx, None, dw, None, None
        if not (ctx.needs_input_grad[0] or target_grad):     # the class weight's alone
            return None, None, dw, None, None
        dx, dy = ops.prob_backward(x, target, weight, stats, grad_out, target_grad)
        return dx, (dy if target_grad else None), dw, None, None


# --- cross-entropy's double backward ------------------------------------------------------
# Both cross-entropies are loss_row = -sum_c q_c log p_c over the class dim, with the target
# distribution q = (1 - eps) w_t onehot(t) + eps / C w (index targets; 0 on ignored rows) or
# q = w ((1 - eps) y + eps / C) (probability targets y). Their logits' gradient g (p sum(q) - q)
# is log_softmax's backward of the cotangent -g q. Under create_graph the backward is rebuilt
# from those differentiable pieces: pydl's log_softmax (SoftmaxFunction) and its backward
# kernel (_SoftmaxBackward), with q, the cotangent's broadcast and the target's gradient
# -g (1 - eps) w log p written in torch ops (README: double backward). Gradients of any order
# follow, w.r.t. the logits, grad_out and a probability target.

def _class_dim(x: Tensor) -> int:
    return 0 if x.dim() == 1 else 1


def _along_classes(weight: Tensor, x: Tensor) -> Tensor:
    """Class weights (C,) in x's dtype, shaped to broadcast along x's class dim."""
    return weight.to(x.dtype).view((-1,) + (1,) * (x.dim() - _class_dim(x) - 1))


def _row_cotangent(grad_out: Tensor, x: Tensor, reduction: str, denom) -> Tensor:
    """The loss's cotangent per row, broadcastable against x along its class dim."""
    if reduction == "none":
        return grad_out.unsqueeze(_class_dim(x))
    return grad_out if reduction == "sum" else grad_out / denom


def _index_target_distribution(x, target, weight, ignore_index: int, smoothing: float) -> Tensor:
    """q of class-index targets: (1 - eps) w_t at the target, plus eps / C w, 0 on ignored rows."""
    dim = _class_dim(x)
    valid = target != ignore_index
    t = torch.where(valid, target, 0).unsqueeze(dim)
    keep = valid.unsqueeze(dim).to(x.dtype)
    w_t = keep if weight is None else keep * weight.to(x.dtype)[t]
    q = torch.zeros_like(x).scatter(dim, t, (1.0 - smoothing) * w_t)
    if smoothing > 0:
        w = 1.0 if weight is None else _along_classes(weight, x)
        q = q + (smoothing / x.shape[dim]) * w * keep
    return q


def _log_probabilities(x: Tensor, backend: str) -> Tensor:
    return SoftmaxFunction.apply(x, SoftmaxKernels(_class_dim(x), True, backend))


def _cross_entropy_grad_graph(logp: Tensor, q: Tensor, g: Tensor, backend: str) -> Tensor:
    """g (p sum(q) - q) from log p = _log_probabilities(x), as differentiable pydl Functions."""
    return _SoftmaxBackward.apply(logp, (-(q * g)).to(logp.dtype),
                                  SoftmaxKernels(_class_dim(logp), True, backend))


def _cross_entropy_prob_grad_graph(x, target, weight, grad_out, reduction: str, smoothing: float,
                                   target_grad: bool, weight_grad: bool, backend: str):
    """CrossEntropyProbFunction's gradients (logits, target, class weights, then Nones),
    differentiable."""
    dim = _class_dim(x)
    w = 1.0 if weight is None else _along_classes(weight, x)
    g = _row_cotangent(grad_out, x, reduction, max(x.numel() // max(x.shape[dim], 1), 1))
    q = w * ((1.0 - smoothing) * target.to(x.dtype) + smoothing / x.shape[dim])
    logp = _log_probabilities(x, backend)
    dx = _cross_entropy_grad_graph(logp, q, g, backend)
    dy = dw = None
    if target_grad:
        dy = (-(g * (1.0 - smoothing)) * w * logp).to(target.dtype)
    if weight_grad:         # -sum over every dim but the classes of g y' log p
        y = (1.0 - smoothing) * target.to(x.dtype) + smoothing / x.shape[dim]
        dw = -(g * y * logp)
        if x.dim() > 1:
            dw = dw.sum([d for d in range(x.dim()) if d != dim])
        dw = dw.to(weight.dtype)
    return dx, dy, dw, None, None
