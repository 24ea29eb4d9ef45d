"""softmax, log_softmax and cross_entropy: the public functions, their argument checks and the
per-call plans.

The family's host code, one concern a module (kernels/{triton,numba}/softmax_ce.py hold the
kernels):

    pydl/softmax_ce.py          the public functions, their argument checks, the per-call
                                classes (_SoftmaxCall, _CrossEntropyCall: a call signature
                                checked once, in eager mode also its plan) and their caches,
                                and the implementations registered per backend (pydl.backends)
    pydl/_softmax_ce_ops.py     the kernel ops (pydl::... custom ops with their fakes),
                                SoftmaxKernels and CrossEntropyKernels (a call's options, a
                                method per step), the autograd Functions that run them, and the
                                double backward
    pydl/_softmax_ce_triton.py  the Triton launcher (_TritonLaunch): tiles, tuners, launch cache
    pydl/_softmax_ce_numba.py   the Numba launcher (_NumbaLaunch)
    pydl/_softmax_ce_common.py  what the launchers, the kernel ops and the calls share

Layers (trident's order), bottom up: the kernels; the launchers, which size the grid and
allocate outputs (a per-call plan in eager mode allocates its own); the kernel ops and the
autograd Functions, which save what the backward needs; the public functions, which check
arguments and dispatch through pydl.backends.

Every kernel works on the (outer, n, inner) view of its tensor (see pydl._shapes.as_rows), so
softmax over any dim and (N, C, d1, ...) cross-entropy need no transposed copy.

Cross-entropy with class indices, on the triton backend: a summed or averaged loss of logits
that need a gradient has it written by the forward kernel (which holds the softmax at that
moment: one read of a row that fits a block, two reads, the second mostly from L2, of a wider
one) into a buffer of its own, never into the caller's logits; the backward multiplies it in
place by the upstream gradient, on the device (no host synchronisation), and skips even that
when the upstream gradient is 1. The mean's denominator (the summed weights of the rows that
count) is summed from the targets by a short kernel before the forward; the sum and mean over
rows are finished in the forward kernel. Otherwise (per-row losses, no gradient, the numba
backend, torch.compile) the forward saves only the per-row logsumexp (4 bytes a row) and the
backward writes softmax - one-hot (with weights and smoothing) in one pass over the logits.

Class-probability targets (a floating target of the logits' shape) have their own kernels:
the forward saves the per-row logsumexp and S = sum_c w_c y'_c (8 bytes a row), and the
backward writes the logits' gradient, and the target's when it requires one, in one pass.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from ._checks import check_tensor
from ._launch import WriteOnly, fresh, output_maker
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
from ._shapes import as_rows, integer, normalize_dim
from ._softmax_ce_common import DENOM_SHAPE, _same_memory
from ._softmax_ce_ops import (
    LAUNCHERS,
    CrossEntropyFunction,
    CrossEntropyKernels,
    CrossEntropyProbFunction,
    SoftmaxFunction,
    SoftmaxKernels,
    _check_target_range,
    _class_dim,
    _loss_dtype,
    _row_shape,
    kernel_checks_targets,
)
from ._softmax_ce_triton import cross_entropy_scratch
from .backends import current_backend, dispatch, register

REDUCTIONS = ("none", "mean", "sum")


# --- implementations by backend -----------------------------------------------------------

def _grad_in_forward(backend: str, x: Tensor, reduction: str) -> bool:
    """Whether the forward writes the logits' gradient (module docstring): on the triton
    backend, for a summed or averaged loss of logits that will need a gradient, in eager
    mode with plain tensors (torch.compile traces the two-pass form)."""
    return (backend == "triton" and reduction != "none" and x.requires_grad
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and type(x) in (torch.Tensor, torch.nn.Parameter))


def _kernel_softmax(backend: str):
    def impl(x, dim, log):
        ops = SoftmaxKernels(dim, log, backend)
        if needs_graph(x):
            return apply(SoftmaxFunction, x, ops)
        return ops.forward(x)
    return impl


def _kernel_cross_entropy(backend: str):
    def impl(x, target, weight, ignore_index, reduction, smoothing, z_loss, softcap):
        ops = CrossEntropyKernels(ignore_index, reduction, smoothing, backend, z_loss, softcap)
        if target.dtype.is_floating_point:  # class probabilities (checked: x's shape)
            if needs_graph(x, target, weight):
                return apply(CrossEntropyProbFunction, x, target, weight, ops,
                             _grad_in_forward(backend, x, reduction) and not target.requires_grad)
            return ops.prob_forward(x, target, weight, False)[0]
        if needs_graph(x):
            return apply(CrossEntropyFunction, x, target, weight, ops,
                         _grad_in_forward(backend, x, reduction))
        return ops.forward(x, target, weight, False)[0]
    return impl


# backend -> pydl's own implementations (a call plans its eager form only where they run)
_KERNEL_IMPLS = {_name: (register("softmax", _name)(_kernel_softmax(_name)),
                         register("cross_entropy", _name)(_kernel_cross_entropy(_name)))
                 for _name in LAUNCHERS}


@register("softmax", "torch")
def _torch_softmax(x, dim, log):
    return torch.log_softmax(x, dim) if log else torch.softmax(x, dim)


@register("cross_entropy", "torch")
def _torch_cross_entropy(x, target, weight, ignore_index, reduction, smoothing, z_loss, softcap):
    if softcap:
        x = softcap * torch.tanh(x / softcap)
    loss = torch.nn.functional.cross_entropy(x, target, weight=weight, ignore_index=ignore_index,
                                             reduction=reduction, label_smoothing=smoothing)
    if z_loss:
        loss = loss + z_loss_term(x, target, ignore_index, reduction, z_loss).to(loss.dtype)
    return loss


def z_loss_term(logits, target, ignore_index: int, reduction: str, z_loss: float):
    """The composite's z-loss (class-index targets, class dim 1, or 0 for (C,) logits):
    z logsumexp(logits)^2 of each row that counts, per row, summed or averaged over the rows
    that count (none counting: 0 with no gradient; the cross-entropy's mean is NaN then)."""
    counted = target != ignore_index
    rows = z_loss * torch.logsumexp(logits.float(), 0 if logits.dim() == 1 else 1).square() \
        * counted
    if reduction == "none":
        return rows
    return rows.sum() / (counted.sum().clamp_min(1) if reduction == "mean" else 1)


# --- argument checks and the public functions ---------------------------------------------

@emulated("forward", "backward")
class _SoftmaxCall(SoftmaxKernels):
    """softmax / log_softmax for one call signature (pydl._plan), checked once; called with
    the input alone. On pydl's backends in eager mode it is also the signature's plan:
    SoftmaxFunction runs its methods, which allocate with arguments fixed here and launch what
    the first call built (the backend launcher's plan_<step>: a Launch or NumbaLaunch; the
    backward's per strides of the upstream gradient); the call's key fixes every other input
    of those."""

    __slots__ = ("impl", "eager", "planned", "launcher", "shape3", "empty", "new_y", "fwd",
                 "bwd")

    def __init__(self, impl, name: str, input, dim: int, log: bool):
        super().__init__(dim, log, name)
        self.impl = impl
        self.eager = (impl in _KERNEL_IMPLS.get(name, ()) and not torch.compiler.is_compiling()
                      and plain_tensors(input))
        x3 = as_rows(input, dim)[0] if self.eager else None
        self.planned = self.eager and _same_memory(x3, input)
        if self.planned:
            self.launcher = LAUNCHERS[name]
            self.shape3 = x3.shape
            self.new_y = output_maker(input.shape, input.dtype, input.device)
            self.empty = x3.numel() == 0
            self.fwd = _launch_nothing if self.empty else None
            self.bwd = {}

    def __call__(self, input):
        if self.eager:
            if torch.is_grad_enabled() and input.requires_grad:
                return apply(SoftmaxFunction, input, self)
            return self.forward(input)
        return self.impl(input, self.dim, self.log)

    # the plan (eager): SoftmaxKernels' steps with fixed arguments

    def kernels(self) -> SoftmaxKernels:
        return SoftmaxKernels(self.dim, self.log, self.backend)

    def forward(self, x):
        if not self.planned:
            return super().forward(x)
        y = fresh(self.new_y)
        run = self.fwd
        if run is None:
            run = self.launcher.plan_softmax_fwd(x.reshape(self.shape3), y.view(self.shape3),
                                                 self.log)
            if not capturing():
                self.fwd = run
        run(x, y)
        return y

    def backward(self, y, dy):
        if not self.planned:
            return super().backward(y, dy)
        dx = fresh(self.new_y)
        if not self.empty:
            run = self.bwd.get(dy.stride())
            if run is None:
                run = self._plan_backward(y, dy, dx)
            run(y, dy, dx)
        return dx

    def _plan_backward(self, y, dy, dx):
        shape = self.shape3
        dy3 = dy.reshape(shape)
        launch = self.launcher.plan_softmax_bwd(y.view(shape), dy3, dx.view(shape), self.log)
        run = launch if _same_memory(dy3, dy) else (
            lambda y, dy, dx: launch(y, dy.reshape(shape), dx))     # a gradient reshape copies
        if not capturing():
            self.bwd[dy.stride()] = run
        return run


def _launch_nothing(*tensors) -> None:
    pass


def _softmax_call(input, dim, log, dtype, backend):
    """softmax / log_softmax for one call signature, checked once: (input) -> output."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if dim is None:
        # torch's deprecated implicit dim (nn.Softmax() without dim relies on it), with its warning
        name = "log_softmax" if log else "softmax"
        warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                      "to include dim=X as an argument.", stacklevel=4)
        dim = 0 if input.dim() in (0, 1, 3) else 1
    name, impl = dispatch("softmax", backend, input)
    check_tensor(input, "input", name)
    return _SoftmaxCall(impl, name, input, normalize_dim(dim, input.dim()), log)


def _softmax_key(input, dim, log, dtype, backend):
    if dim is None:
        raise TypeError("implicit dim: not cached (it warns on every call)")
    return (backend or current_backend(), *tensors_key(input), *options_key(dim), log)


_SOFTMAX_CALLS = Cache("softmax calls")


def _softmax(input, dim, log, dtype, backend):
    if dtype is not None:
        input = input.to(dtype)
    elif isinstance(input, torch.Tensor):
        (input,) = autocast_inputs("log_softmax" if log else "softmax", input)
    return _SOFTMAX_CALLS.call(_softmax_key, _softmax_call, input, dim, log, dtype, backend)(input)


def softmax(input, dim=-1, *, dtype=None, backend=None):
    """softmax(input, dim) as torch.nn.functional.softmax; `dtype` casts the input first."""
    return _softmax(input, dim, False, dtype, backend)


def log_softmax(input, dim=-1, *, dtype=None, backend=None):
    """log_softmax(input, dim) as torch.nn.functional.log_softmax."""
    return _softmax(input, dim, True, dtype, backend)


def _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                         softcap, backend):
    check_tensor(input, "input", backend)
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if input.dim() == 0:
        raise ValueError("input must have at least one dimension (C,) or (N, C, d1, ...)")
    expected = () if input.dim() == 1 else (input.shape[0],) + tuple(input.shape[2:])
    probabilities = target.dtype.is_floating_point
    if probabilities:
        # class probabilities: input's shape; any floating dtype (the loss takes the promoted
        # dtype of input and target, as in torch), one the backend runs
        if tuple(target.shape) == expected:
            raise TypeError(f"target must hold int64 class indices, got {target.dtype} (a "
                            f"floating target holds class probabilities and has input's shape "
                            f"{tuple(input.shape)})")
        if target.shape != input.shape:
            raise ValueError(f"class-probability target shape {tuple(target.shape)} does not "
                             f"match input shape {tuple(input.shape)}: a floating target holds "
                             f"class probabilities and must have input's shape (or give int64 "
                             f"class indices of shape {expected})")
        check_tensor(target, "target (class probabilities)", backend)
    elif target.shape == input.shape:
        raise TypeError(f"target has input's shape {tuple(input.shape)}, so it holds class "
                        f"probabilities and must be floating point, got {target.dtype} (class "
                        f"indices have shape {expected})")
    elif target.dtype != torch.int64:
        raise TypeError(f"target must be int64 (torch.long) or uint8 class indices, got "
                        f"{target.dtype}")
    elif tuple(target.shape) != expected:
        raise ValueError(f"target shape {tuple(target.shape)} does not match input shape "
                         f"{tuple(input.shape)}: expected {expected} (batch and spatial dims "
                         f"of input)")
    if target.device != input.device:
        raise RuntimeError(f"target is on {target.device} but input is on {input.device}")
    check_loss_options(input, input.shape[0 if input.dim() == 1 else 1], weight, "weight",
                       reduction, label_smoothing, ignore_index)
    check_z_loss(z_loss, weight, "weight")
    check_softcap(softcap)
    for option, value in (("z_loss", z_loss), ("softcap", softcap)):
        if value and probabilities:
            raise ValueError(f"{option} with class-probability (floating) targets is not "
                             f"supported: give class indices")
    if probabilities and ignore_index >= 0:
        # torch's rule: a negative ignore_index (the default -100) is ignored, others raise
        raise ValueError(f"ignore_index is not supported for class-probability (floating) "
                         f"targets: it must be negative (the default -100), got {ignore_index}")


def check_z_loss(z_loss, weight, name: str) -> None:
    """A z-loss factor (cross_entropy, linear_cross_entropy): a finite number >= 0, and none
    with class weights (`name`): whether a row's z-loss should weigh by its target's class
    weight has no agreed answer."""
    if isinstance(z_loss, bool) or not isinstance(z_loss, (int, float)) \
            or not 0 <= z_loss < math.inf:
        raise ValueError(f"z_loss must be a finite number >= 0 (each counted row's loss gains "
                         f"z_loss * logsumexp(logits)^2), got {z_loss!r}")
    if z_loss and weight is not None:
        raise ValueError(f"z_loss with {name}: the z-loss has no agreed weighting (its rows by "
                         f"their targets' class weights or not); pass one of them")


def check_softcap(softcap) -> None:
    """A loss's logit cap (cross_entropy, linear_cross_entropy): None, or a positive finite
    number s (the logits become s tanh(logits / s))."""
    if softcap is not None and (isinstance(softcap, bool) or not isinstance(
            softcap, (int, float)) or not 0 < softcap < math.inf):
        raise ValueError(f"softcap must be None or a positive finite number (the logits become "
                         f"softcap * tanh(logits / softcap)), got {softcap!r}")


def check_loss_options(input, n_classes: int, weight, name: str, reduction, label_smoothing,
                       ignore_index) -> None:
    """The options cross-entropy losses share (cross_entropy, linear_cross_entropy): class
    weights (`name`) of the classes' length, floating, on input's device; the reduction,
    label smoothing and ignore_index."""
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 \
                or weight.shape[0] != n_classes:
            got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else repr(weight)
            raise ValueError(f"{name} must be a 1-D tensor of length C={n_classes}, got {got}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {weight.dtype}")
        if weight.device != input.device:
            raise RuntimeError(f"{name} is on {weight.device} but input is on {input.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if integer(ignore_index) is None:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


@emulated("forward", "backward", "scale_grad", "prob_forward", "prob_backward")
class _CrossEntropyCall(CrossEntropyKernels):
    """cross_entropy for one call signature (pydl._plan), checked once; called with (input,
    target, weight). On pydl's backends in eager mode, for class-index targets, it is also
    the signature's plan: CrossEntropyFunction (CrossEntropyProbFunction for class
    probabilities) runs its methods, which allocate with arguments fixed here and launch what
    the first call built (the backend launcher's plan_<step>); the call's key fixes every
    input of those."""

    __slots__ = ("impl", "eager", "prob", "planned", "launcher", "grad_forward", "host_check",
                 "classes", "shape3", "rows", "new_lse", "new_loss", "new_denom", "unread",
                 "new_dx", "new_scratch", "fwd", "scale", "target3", "new_stats", "new_dy")

    def __init__(self, impl, name: str, input, target, weight, ignore_index: int,
                 reduction: str, smoothing: float, z_loss: float, softcap: float):
        super().__init__(ignore_index, reduction, smoothing, name, z_loss, softcap)
        self.impl = impl
        self.prob = target.dtype.is_floating_point
        self.eager = (impl in _KERNEL_IMPLS.get(name, ()) and not torch.compiler.is_compiling()
                      and plain_tensors(input, target, weight))
        # the eager part of _grad_in_forward (the rest: a graph to record, checked per call)
        self.grad_forward = name == "triton" and reduction != "none"
        self.planned = False
        if self.eager:
            x3, _, n, _ = as_rows(input, _class_dim(input))
            t3 = as_rows(target, _class_dim(input))[0] if self.prob else target.reshape(-1)
            self.planned = _same_memory(x3, input) and _same_memory(t3, target)
        if self.planned and self.prob:
            dev = input.device
            self.launcher = LAUNCHERS[name]
            self.shape3, self.target3, self.rows = x3.shape, t3.shape, x3.shape[0] * x3.shape[2]
            none = reduction == "none"
            self.new_stats = output_maker((2 * self.rows,), torch.float32, dev)
            self.unread = (WriteOnly(self.new_stats),)   # without a graph nothing reads it
            self.new_scratch = _no_scratch if none else output_maker((self.rows,),
                                                                     torch.float32, dev)
            self.new_loss = output_maker(_row_shape(input) if none else (),
                                         _loss_dtype(input, target), dev)
            self.new_dx = output_maker(input.shape, input.dtype, dev)
            self.new_dy = output_maker(target.shape, target.dtype, dev)
            self.fwd = {}       # forward by grad, ("bwd", upstream strides, target grad)
            self.scale = {}
        elif self.planned:
            self.launcher = LAUNCHERS[name]
            dt, dev = input.dtype, input.device
            self.host_check = not kernel_checks_targets(input, name)
            self.classes, self.shape3, self.rows = n, x3.shape, target.numel()
            self.new_lse = output_maker((self.rows,), torch.float32, dev)
            self.new_loss = output_maker(target.shape if reduction == "none" else (), dt, dev)
            self.new_denom = output_maker(DENOM_SHAPE, torch.float32, dev)
            # without a graph nothing reads the rows' lse and the denominators
            self.unread = (WriteOnly(self.new_lse), WriteOnly(self.new_denom))
            self.new_dx = output_maker(input.shape, dt, dev)
            # the Triton forward's reduction scratch (the Numba one allocates its own rows)
            self.new_scratch = functools.partial(
                torch.empty, cross_entropy_scratch(self.rows), dtype=torch.float32,
                device=dev) if name == "triton" else _no_scratch
            self.fwd, self.scale = {}, {}    # fwd: by grad, and ("bwd", grad_out strides)

    def __call__(self, x, t, w):
        if w is not None and w.requires_grad and not self.prob and self.backend != "torch" \
                and torch.is_grad_enabled():
            raise NotImplementedError(
                "cross_entropy: the class weight requires grad with class-index targets, where "
                "torch does not differentiate the loss w.r.t. the class weights either (it "
                "raises: nll_loss is not differentiable with respect to argument 'weight'): "
                "pass weight.detach() (class-probability targets do differentiate it)")
        if self.eager:
            graph = torch.is_grad_enabled() and x.requires_grad
            if self.prob:
                target_graph = torch.is_grad_enabled() and (
                    t.requires_grad or (w is not None and w.requires_grad))
                if graph or target_graph:
                    return apply(CrossEntropyProbFunction, x, t, w, self,
                                 graph and self.grad_forward and not t.requires_grad)
                return self.prob_forward(x, t, w, False, unread=True)[0]
            if graph:
                return apply(CrossEntropyFunction, x, t, w, self, self.grad_forward)
            return self.forward(x, t, w, False, unread=True)[0]
        return self.impl(x, t, w, self.ignore_index, self.reduction, self.smoothing,
                         self.z_loss, self.softcap)

    # the plan (eager, class indices): CrossEntropyKernels' steps with fixed arguments

    def forward(self, x, target, weight, grad: bool, unread: bool = False):
        """(loss, lse, denom, dx): `unread`, a call without a graph: lse and denom, which
        only a backward reads, in the buffers the plan keeps."""
        if not self.planned:
            return super().forward(x, target, weight, grad)
        if self.host_check:
            _check_target_range(target, self.classes, self.ignore_index)
        loss = fresh(self.new_loss)
        if unread:
            lse, denom = self.unread[0](), self.unread[1]()
        else:
            lse, denom = fresh(self.new_lse), fresh(self.new_denom)
        dx = fresh(self.new_dx) if grad else None
        if not self.rows:
            if self.reduction != "none":
                loss.fill_(float("nan") if self.reduction == "mean" else 0.0)  # torch's empty mean
            return loss, lse, denom, dx
        scratch = self.new_scratch() if self.reduction != "none" else None
        run = self.fwd.get(grad)
        if run is None:
            run = self.launcher.plan_cross_entropy_fwd(
                x.reshape(self.shape3), target.reshape(-1), weight, lse, loss, denom, scratch,
                None if dx is None else dx.view(self.shape3), self.ignore_index,
                self.smoothing, self.reduction, grad, z_loss=self.z_loss,
                softcap=self.softcap, cap_input=self.softcap > 0)
            if not capturing():
                self.fwd[grad] = run
        run(x, target, weight, lse, loss, denom, scratch, dx)
        return loss, lse, denom, dx

    def backward(self, x, target, weight, lse, denom, grad_out):
        if not self.planned:
            return super().backward(x, target, weight, lse, denom, grad_out)
        dx = fresh(self.new_dx)
        if x.numel():
            key = ("bwd", grad_out.stride())
            run = self.fwd.get(key)
            if run is None:
                run = self.launcher.plan_cross_entropy_bwd(
                    x.reshape(self.shape3), target.reshape(-1), weight, lse, denom, grad_out,
                    dx.view(self.shape3), self.reduction, self.ignore_index, self.smoothing,
                    z_loss=self.z_loss, softcap=self.softcap, cap_input=self.softcap > 0)
                if not capturing():
                    self.fwd[key] = run
            run(x, target, weight, lse, denom, grad_out, dx)
        return dx

    def prob_forward(self, x, target, weight, grad: bool, unread: bool = False):
        """(loss, stats, dx): `unread`, a call without a graph: the rows' statistics, which
        only a backward reads, in the buffer the plan keeps."""
        if not self.planned:
            return super().prob_forward(x, target, weight, grad)
        loss = fresh(self.new_loss)
        stats = self.unread[0]() if unread else fresh(self.new_stats)
        dx = fresh(self.new_dx) if grad else None
        if not self.rows:
            if self.reduction != "none":        # torch's empty mean and sum
                loss.fill_(math.nan if self.reduction == "mean" else 0.0)
            return loss, stats, dx
        scratch = self.new_scratch()
        run = self.fwd.get(grad)
        if run is None:
            run = self.launcher.plan_cross_entropy_prob_fwd(
                x.reshape(self.shape3), target.reshape(self.target3), weight, stats, loss,
                None if dx is None else dx.view(self.shape3), scratch, self.smoothing,
                self.reduction)
            if not capturing():
                self.fwd[grad] = run
        run(x, target, weight, stats, loss, dx, scratch)
        return loss, stats, dx

    def prob_backward(self, x, target, weight, stats, grad_out, target_grad: bool):
        if not self.planned:
            return super().prob_backward(x, target, weight, stats, grad_out, target_grad)
        dx = fresh(self.new_dx)
        dy = fresh(self.new_dy) if target_grad else None
        if x.numel():
            key = ("bwd", grad_out.stride(), target_grad)
            run = self.fwd.get(key)
            if run is None:
                run = self.launcher.plan_cross_entropy_prob_bwd(
                    x.reshape(self.shape3), target.reshape(self.target3), weight, stats, grad_out,
                    dx.view(self.shape3), None if dy is None else dy.view(self.target3),
                    self.smoothing, self.reduction)
                if not capturing():
                    self.fwd[key] = run
            run(x, target, weight, stats, grad_out, dx, dy)
        return dx, dy

    def scale_grad(self, dx, grad_out, target) -> None:
        if not self.planned:
            return super().scale_grad(dx, grad_out, target)
        run = self.scale.get(grad_out.dtype)
        if run is None:
            run = self.launcher.plan_scale_grad(dx, grad_out, target, self.ignore_index)
            if not capturing():
                self.scale[grad_out.dtype] = run
        run(dx, grad_out, target)


def _no_scratch() -> None:
    return None


def _cross_entropy_call(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                        softcap, backend):
    """cross_entropy for one call signature, checked once: (input, target, weight) -> loss."""
    name, impl = dispatch("cross_entropy", backend, input, target,
                          *([weight] if isinstance(weight, torch.Tensor) else []))
    _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                         softcap, name)
    return _CrossEntropyCall(impl, name, input, target, weight, int(ignore_index), reduction,
                             float(label_smoothing), float(z_loss), float(softcap or 0.0))


def _cross_entropy_key(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                       softcap, backend):
    return (backend or current_backend(), *tensors_key(input, target, weight),
            *options_key(ignore_index, reduction, label_smoothing, z_loss, softcap))


_CROSS_ENTROPY_CALLS = Cache("cross_entropy calls")


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, z_loss=0.0, softcap=None,
                  backend=None):
    """Cross-entropy as torch.nn.functional.cross_entropy: `target` holds int64 class indices
    (shape (N, d1, ...)), or class probabilities (floating, input's shape; rows need not sum to
    1; "mean" divides by the number of rows; the gradient w.r.t. target is computed too).

    Fused: log_softmax is never materialised; the backward writes the gradient in one pass.
    The deprecated `size_average` / `reduce` arguments set the reduction as in torch (with
    its deprecation warning); uint8 class indices are taken as torch takes them (as int64).
    z_loss z (pydl's, not torch's; class indices, no class weights): z logsumexp(logits)^2
    added to each row that counts (PaLM's z-loss; a mean over the rows that count).
    softcap s (pydl's; class indices): the loss of the logits s tanh(logits / s) (Gemma-2's
    final_logit_softcapping, Liger-Kernel's `softcap`), capped as the kernels read them: no
    capped copy, and the gradient is w.r.t. the logits given.
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if isinstance(target, torch.Tensor) and target.dtype == torch.uint8:
        target = target.long()
    input, target, weight = autocast_inputs("cross_entropy", input, target, weight)
    call = _CROSS_ENTROPY_CALLS.call(_cross_entropy_key, _cross_entropy_call, input, target,
                                     weight, ignore_index, reduction, label_smoothing, z_loss,
                                     softcap, backend)
    return call(input, target, weight)


__all__ = ["softmax", "log_softmax", "cross_entropy", "SoftmaxFunction", "CrossEntropyFunction",
           "CrossEntropyProbFunction"]
