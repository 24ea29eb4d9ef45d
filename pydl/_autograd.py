"""Double backward: the rule for autograd Functions whose backward is not differentiable.

A pydl Function's backward runs kernels; autograd cannot see inside them. When a caller asks
for a differentiable gradient (`torch.autograd.grad(..., create_graph=True)`: gradient
penalties, second-order methods), a backward that returned plain kernel outputs would hand back
a gradient with no graph behind it, and the second derivative would silently miss this op's
share. So every Function's backward is either differentiable (written with pydl's own
differentiable Functions when grad mode is on: conv2d, the pools, softmax, cross-entropy; the
README's double-backward table) or returns its result through `without_double_backward`
below, which makes differentiating it raise (attention).

torch.autograd.function.once_differentiable is not enough here: it attaches its error only when
a grad_output requires grad, but a backward's result also depends on the tensors the forward
saved (the conv's weight, the attention's q, k, v). A gradient penalty computed from
`grad(y.sum(), x, create_graph=True)` has a constant grad_output and would still be silently
wrong. This version attaches the error whenever the backward runs under create_graph.
"""
from __future__ import annotations

import torch


class _NotDifferentiable(torch.autograd.Function):
    """Identity on the first n of `tensors` (results computed without a graph), whose own
    backward raises `message`: the error comes when (and only when) someone differentiates
    them. The other tensors are what those results depend on (an op's inputs): only their
    edges put this node on every path from a loss on the results to those inputs, so that
    `torch.autograd.grad(loss, inputs)`, which runs only the nodes on such paths, reaches
    it and raises instead of returning a gradient without this op's share."""

    @staticmethod
    def forward(ctx, message, n, *tensors):
        ctx.message = message
        return tuple(g.view_as(g) for g in tensors[:n])

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(ctx.message)


def no_double_backward_message(op: str) -> str:
    return (f"pydl.{op} has no double backward on pydl's kernel backends: its backward is a "
            f"kernel that is not itself differentiable, so its gradient cannot be differentiated "
            f"again (create_graph=True: a gradient penalty, a second-order method). Run this op "
            f"with backend='torch' (its backend= argument or pydl.use_backend('torch')) where a "
            f"second derivative must flow through it; the README lists the ops that support it")


def without_double_backward(op: str, backward, ctx, *grad_outputs):
    """Run `backward(ctx, *grad_outputs)` (a Function's backward, of pydl op `op`, its public
    name) under create_graph: under no_grad, its tensor results given a grad_fn that raises
    a RuntimeError naming the op and what to do instead. A backward calls it first thing,

        if torch.is_grad_enabled():       # create_graph
            return without_double_backward("op", MyFunction.backward, ctx, dy)

    so that without create_graph it costs one `torch.is_grad_enabled()` check, as the
    differentiable backward passes do (a decorator would add a call frame to every call)."""
    with torch.no_grad():
        grads = backward(ctx, *grad_outputs)
    single = not isinstance(grads, tuple)
    grads = (grads,) if single else grads
    slots = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not slots:
        return grads[0] if single else grads
    # what the gradients depend on: the upstream gradients and the saved tensors (the
    # Functions that call this save their inputs)
    sources = _graph_tensors(*grad_outputs, *ctx.saved_tensors)
    marked = _NotDifferentiable.apply(
        no_double_backward_message(op), len(slots),
        *[grads[i].detach().requires_grad_(grads[i].is_floating_point()) for i in slots],
        *sources)
    out = list(grads)
    for i, g in zip(slots, marked):
        out[i] = g
    return out[0] if single else tuple(out)


def _graph_tensors(*tensors) -> list:
    """Those of `tensors` (None allowed) that are part of an autograd graph."""
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


__all__ = ["without_double_backward", "no_double_backward_message"]
