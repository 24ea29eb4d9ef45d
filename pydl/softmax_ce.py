"""softmax, log_softmax and cross_entropy: argument checks, autograd Functions, kernel launches.

Layers (trident's order): kernels/{triton,numba}/softmax_ce.py hold the kernels; the launchers
below size the grid and allocate outputs; the autograd Functions save what the backward needs;
the public functions at the bottom check arguments and dispatch through pydl.backends.

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
from typing import Optional

import torch
from torch import Tensor

from ._checks import check_tensor
from ._library import autocast_inputs, empty_like_shape, kernel_op
from ._launch import (NumbaLaunch, arrival_counters, cdiv, fresh, new_output,
                      next_power_of_2, numba_blocks, numba_threads, output_maker,
                      planned_once)
from ._plan import (Cache, Launch, apply, capturing, emulated, needs_graph, plain_tensors,
                    tensors_key)
from ._shapes import as_rows, integer, normalize_dim
from ._tune import Tuner, bucket
from .backends import current_backend, dispatch, register

REDUCTIONS = ("none", "mean", "sum")
# as the Triton kernels number them (kernels/triton/softmax_ce.py: REDUCE_*)
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}

# Widest column block a Triton program loads at once; wider rows are walked with the online
# max/sum. Tests lower it to exercise the multi-block path on small rows.
MAX_BLOCK_N = 4096
# Elements per program tile (BLOCK_R rows x BLOCK_N columns): short rows are batched.
TILE_ELEMENTS = 4096


# --- Triton launch ------------------------------------------------------------------------

def _triton_config(n_rows: int, n: int, tile: int | None = None, max_block_n: int | None = None,
                   num_warps: int | None = None) -> dict:
    """A BLOCK_R x BLOCK_N tile of about `tile` elements (the module's defaults when None: the
    first tuning candidate), short rows batched, rows wider than max_block_n walked in blocks."""
    tile = TILE_ELEMENTS if tile is None else tile
    block_n = min(next_power_of_2(n), MAX_BLOCK_N if max_block_n is None else max_block_n)
    block_r = max(1, min(next_power_of_2(n_rows), tile // block_n, 64))
    elems = block_r * block_n
    if num_warps is None:
        num_warps = 4 if elems <= 2048 else (8 if elems <= 4096 else 16)
    return dict(BLOCK_R=block_r, BLOCK_N=block_n, num_warps=num_warps)


# Rows per program of cross_entropy_mean_denominator (8 bytes of targets a row).
DENOMINATOR_BLOCK = 4096
# What a cross-entropy forward hands its backward besides the logsumexp: fp32 [the mean's
# denominator (the summed weights of the rows that count), the sum of the class weights (with
# weights and label smoothing: the smoothing term's W; written by the forward kernel, so the
# backward runs no reduction of its own)].
DENOM_SHAPE = (2,)


def _denominators(device) -> Tensor:
    """The DENOM_SHAPE buffer of the kernel op pydl::cross_entropy_fwd, zeroed: the kernels
    write only the elements the options use (the backward reads no other), and an op's
    outputs must not hold whatever memory was there (torch.library.opcheck compares two
    runs). The eager plans allocate it uninitialised, as nothing else sees it there."""
    return torch.zeros(DENOM_SHAPE, dtype=torch.float32, device=device)


def _prob_scale(reduction: str, rows: int, n: int) -> float:
    """The class-probability loss's factor on the rows' sum (forward) and the upstream
    gradient (backward): torch's mean divides by the number of rows (input.numel() / C),
    whatever the weights, NaN without rows or classes (0 / 0); a sum or per-row losses, 1."""
    if reduction != "mean":
        return 1.0
    return 1.0 / rows if rows and n else math.nan


def unit_stride(weight: Tensor | None) -> Tensor | None:
    """Class weights as the Triton kernels read them, at unit stride: a strided view (a slice
    of a larger tensor) copied (C values)."""
    return weight if weight is None or weight.stride(0) == 1 else weight.contiguous()


def cross_entropy_scratch(rows: int) -> int:
    """fp32 elements of a reduced cross-entropy forward's scratch (the programs' partial sums:
    2 a row in the forward kernel, 1 per block of the mean denominator's)."""
    return 2 * rows + cdiv(rows, DENOMINATOR_BLOCK)
# Partial sums the last program of a cross-entropy reduction adds at a time.
PARTS_BLOCK = 1024
# cross_entropy_scale_grad: elements per step, and at most this many programs (a grid-stride
# loop; where the upstream gradient is 1 each program only reads it).
SCALE_BLOCK = 4096
SCALE_PROGRAMS = 1024
SCALE_SUB = 256         # elements at a time where it reads each element's target


# Tuning space of the row kernels (memory-bound): (tile elements, widest column block, warps).
ROW_SPACE = ((8192, 8192, 16), (8192, 8192, 8), (4096, 4096, 4), (16384, 16384, 16),
             (2048, 2048, 4), (32768, 32768, 16), (32768, 32768, 32))
ROW_TUNERS = {name: Tuner(name) for name in (
    "softmax_fwd", "softmax_bwd", "cross_entropy_fwd", "cross_entropy_bwd",
    "cross_entropy_prob_fwd", "cross_entropy_prob_bwd")}


_LAUNCHES = Cache("softmax / cross_entropy launches")


def _launch(name: str, x3: Tensor, tensors: tuple, scalars: tuple, single: bool = False,
            **consts) -> Launch:
    """The launch of row kernel `name` over the (outer, n, inner) rows of x3: a Launch taking
    the kernel's tensors, its scalars and constexprs fixed. Built once per signature, its
    tile autotuned (pydl/_tune.py) per dtype, row length, row layout and options, not per
    batch size. single: the kernel takes SINGLE (the whole row fits one column block).
    The kernels read their tensors through the scalars' strides: a Launch may be given any
    tensor at the data pointer of the one it was planned with (x for its view x3)."""
    key = (name, x3.device, tuple(t.dtype for t in tensors), scalars, tuple(consts.values()))
    return _LAUNCHES.get(key, _plan, name, x3, tensors, scalars, single, consts)


def _plan(name: str, x3: Tensor, tensors, scalars, single: bool, consts) -> Launch:
    from .kernels.triton import softmax_ce as k
    kernel = getattr(k, name)
    outer, n, inner = x3.shape
    rows = outer * inner

    def launch(cfg):
        extra = dict(SINGLE=n <= cfg["BLOCK_N"]) if single else {}
        return Launch(kernel, (cdiv(rows, cfg["BLOCK_R"]),), scalars, {**consts, **extra, **cfg})

    candidates = [_triton_config(rows, n)] + [
        _triton_config(rows, n, tile, block, warps) for tile, block, warps in ROW_SPACE]
    key = (name, x3.dtype, inner == 1, tuple(sorted(consts.items())),
           bucket(n, lo=1, hi=1 << 20), bucket(rows, lo=1))
    return launch(ROW_TUNERS[name].pick(key, candidates, lambda c: launch(c)(*tensors)))


class _TritonLaunch:
    @staticmethod
    def softmax_fwd(x3, y3, log: bool) -> None:
        _TritonLaunch.plan_softmax_fwd(x3, y3, log)(x3, y3)

    @staticmethod
    def plan_softmax_fwd(x3, y3, log: bool) -> Launch:
        outer, n, inner = x3.shape
        return _launch("softmax_fwd", x3, (x3, y3), (outer * inner, n, inner, *x3.stride(),
                                                     *y3.stride()), single=True, LOG=log)

    @staticmethod
    def softmax_bwd(y3, dy3, dx3, log: bool) -> None:
        _TritonLaunch.plan_softmax_bwd(y3, dy3, dx3, log)(y3, dy3, dx3)

    @staticmethod
    def plan_softmax_bwd(y3, dy3, dx3, log: bool) -> Launch:
        outer, n, inner = y3.shape
        return _launch("softmax_bwd", y3, (y3, dy3, dx3), (outer * inner, n, inner,
                                                           *y3.stride(), *dy3.stride(),
                                                           *dx3.stride()),
                       single=True, LOG=log)

    @staticmethod
    def cross_entropy_fwd(x3, target, weight, ignore_index, smoothing, reduction, grad):
        """(loss: per row, or reduced, in x's dtype; per-row fp32 logsumexp; the mean's fp32
        denominator; with `grad` the reduced loss's gradient w.r.t. x3, contiguous). The sum
        and mean are finished in the kernel (its last program to arrive); a training mean
        first sums its denominator from the targets (cross_entropy_mean_denominator), since
        the forward scales the gradient by its inverse."""
        outer, n, inner = x3.shape
        rows, dev = outer * inner, x3.device
        lse = new_output(rows, torch.float32, dev)
        loss = new_output(rows if reduction == "none" else (), x3.dtype, dev)
        denom = _denominators(dev)
        dx3 = new_output(x3.shape, x3.dtype, dev) if grad else None
        if not rows:
            if reduction != "none":
                loss.fill_(float("nan") if reduction == "mean" else 0.0)   # torch's empty mean
            return loss, lse, denom, dx3
        scratch = (torch.empty(cross_entropy_scratch(rows), dtype=torch.float32, device=dev)
                   if reduction != "none" else None)
        tensors = (x3, target, weight, lse, loss, denom, scratch, dx3)
        _TritonLaunch.plan_cross_entropy_fwd(*tensors, ignore_index, smoothing, reduction,
                                             grad)(*tensors)
        return loss, lse, denom, dx3

    @staticmethod
    def plan_cross_entropy_fwd(x3, target, weight, lse, loss, denom, scratch, dx3,
                               ignore_index, smoothing, reduction, grad):
        """run(x3, target, weight, lse, loss, denom, scratch, dx3): the forward's launches
        (rows > 0) into loss, lse, denom and with `grad` dx3; weight and (without `grad`) dx3
        may be None, and scratch is for the reductions (cross_entropy_scratch(rows) fp32:
        the programs' partial sums, 2 each (loss, weight) in the forward, then 1 each of the
        mean denominator's kernel), None without one. x3 and target rows by pointer (any
        tensor at their address: x for its view)."""
        outer, n, inner = x3.shape
        rows, dev = outer * inner, x3.device
        has_weight = weight is not None
        strided = has_weight and weight.stride(0) != 1
        weight = unit_stride(weight)
        w = weight if has_weight else x3
        dx = dx3 if grad else x3
        none = reduction == "none"
        # the kernels read the targets (rows,) at unit stride: a strided view is copied
        t_strided = target.stride(0) != 1
        target = target.contiguous()
        arrivals = lse if none else arrival_counters(dev, 1)   # placeholders without a sum
        parts = lse if none else scratch
        fwd = _launch("cross_entropy_fwd", x3, (x3, target, w, loss, lse, loss, denom, parts,
                                                arrivals, dx),
                      (rows, n, inner, *x3.stride(), *dx.stride(), ignore_index, smoothing),
                      single=True, HAS_WEIGHT=has_weight, HAS_SMOOTHING=smoothing > 0,
                      REDUCTION=REDUCTION_CODES[reduction], PARTS_BLOCK=PARTS_BLOCK, GRAD=grad,
                      CHECK_TARGETS=dev.type == "cuda")
        if none:
            def run(x, target, weight, lse, loss, denom, scratch, dx):
                w = (weight.contiguous() if strided else weight) if has_weight else x
                fwd(x, target.contiguous() if t_strided else target, w, loss, lse, loss, denom,
                    lse, lse, dx if grad else x)
            return run
        denominator = None
        if grad and reduction == "mean":
            key = ("mean_denominator", rows, n, dev, target.dtype, w.dtype, not has_weight,
                   ignore_index)
            denominator = _LAUNCHES.get(key, _TritonLaunch._plan_denominator, rows, n,
                                        ignore_index, has_weight)
        tail = 2 * rows

        def run(x, target, weight, lse, loss, denom, scratch, dx):
            w = (weight.contiguous() if strided else weight) if has_weight else x
            if t_strided:
                target = target.contiguous()
            arrivals = arrival_counters(dev, 1)
            if denominator is not None:
                denominator(target, w, denom, scratch[tail:], arrivals)
            fwd(x, target, w, loss, lse, loss, denom, scratch, arrivals, dx if grad else x)
        return run

    @staticmethod
    def _plan_denominator(rows, n, ignore_index, has_weight) -> Launch:
        from .kernels.triton import softmax_ce as k
        return Launch(k.cross_entropy_mean_denominator, (cdiv(rows, DENOMINATOR_BLOCK),),
                      (rows, n, ignore_index), dict(HAS_WEIGHT=has_weight,
                                                    BLOCK=DENOMINATOR_BLOCK,
                                                    PARTS_BLOCK=PARTS_BLOCK))

    @staticmethod
    def cross_entropy_scale_grad(dx, grad_out, target, ignore_index: int) -> None:
        """dx *= grad_out (0-d, on the device) in place, the ignored rows' zeros kept (class
        indices; target None: class probabilities); nothing is read or written where
        grad_out == 1."""
        _TritonLaunch.plan_scale_grad(dx, grad_out, target, ignore_index)(dx, grad_out, target)

    @staticmethod
    def plan_scale_grad(dx, grad_out, target, ignore_index: int):
        """run(dx, grad_out, target): cross_entropy_scale_grad's launch; dx contiguous, of the
        logits' shape, and target the rows' class indices (read only where grad_out is not
        finite; a layout that flattens to no one stride is copied then), or None."""
        n = dx.shape[0 if dx.dim() == 1 else 1]
        inner = math.prod(dx.shape[2:])
        if target is None:
            launch = _LAUNCHES.get(("scale_grad", dx.numel(), dx.dtype, grad_out.dtype,
                                    dx.device), _TritonLaunch._plan_scale, dx.numel(), n,
                                   inner, 0, 0, False)
            return lambda dx, grad_out, target: launch(dx, grad_out, dx)
        t = target.reshape(-1)
        flat = _same_memory(t, target)
        key = ("scale_grad", dx.numel(), dx.dtype, grad_out.dtype, dx.device, n, inner,
               t.stride(0), target.dtype, ignore_index)
        launch = _LAUNCHES.get(key, _TritonLaunch._plan_scale, dx.numel(), n, inner,
                               t.stride(0), ignore_index, True)
        if flat:
            return launch
        return lambda dx, grad_out, target: launch(dx, grad_out, target.reshape(-1))

    @staticmethod
    def _plan_scale(numel, n, inner, st, ignore_index, ignore: bool) -> Launch:
        from .kernels.triton import softmax_ce as k
        programs = max(1, min(cdiv(numel, SCALE_BLOCK), SCALE_PROGRAMS))
        return Launch(k.cross_entropy_scale_grad, (programs,),
                      (numel, n, inner, st, ignore_index),
                      dict(IGNORE=ignore, BLOCK=SCALE_BLOCK, SUB=SCALE_SUB))

    @staticmethod
    def cross_entropy_bwd(x3, target, weight, lse, denom, grad_out, reduction, dx3,
                          ignore_index, smoothing):
        """dx3 = the gradient of the loss w.r.t. x3, grad_out the loss's upstream gradient (per
        row, or 0-d, read on the device); the mean's division happens in the kernel."""
        tensors = (x3, target, weight, lse, denom, grad_out, dx3)
        _TritonLaunch.plan_cross_entropy_bwd(*tensors, reduction, ignore_index,
                                             smoothing)(*tensors)

    @staticmethod
    def plan_cross_entropy_bwd(x3, target, weight, lse, denom, grad_out, dx3, reduction,
                               ignore_index, smoothing):
        """run(x3, target, weight, lse, denom, grad_out, dx3): cross_entropy_bwd's launch; x3,
        target and dx3 by pointer (x for its view x3), grad_out as planned (strides)."""
        outer, n, inner = x3.shape
        if reduction == "none":
            grad = grad_out.reshape(-1)                 # a view where it can be
            stride, flat = grad.stride(0), _same_memory(grad, grad_out)
        else:
            grad, stride, flat = grad_out, 0, True
        has_weight = weight is not None
        strided = has_weight and weight.stride(0) != 1
        weight = unit_stride(weight)
        t_strided = target.stride(0) != 1               # read at unit stride: copied
        target = target.contiguous()
        tensors = (x3, target, weight if has_weight else x3, lse, grad, denom, dx3)
        launch = _launch("cross_entropy_bwd", x3, tensors,
                         (stride, outer * inner, n, inner, *x3.stride(), *dx3.stride(),
                          ignore_index, smoothing),
                         HAS_WEIGHT=has_weight, HAS_SMOOTHING=smoothing > 0,
                         MEAN=reduction == "mean")

        def run(x3, target, weight, lse, denom, grad_out, dx3):
            if strided:
                weight = weight.contiguous()
            if t_strided:
                target = target.contiguous()
            launch(x3, target, weight if has_weight else x3, lse,
                   grad_out if flat else grad_out.reshape(-1), denom, dx3)
        return run

    @staticmethod
    @planned_once
    def plan_cross_entropy_prob_fwd(x3, y3, weight, stats, loss, dx3, scratch, smoothing,
                                    reduction):
        """run(x3, y3, weight, stats, loss, dx3, scratch): class-probability targets' forward,
        one launch (rows > 0) into stats (per row lse and S, what the backward reads) and
        loss (per row for "none", else the reduced 0-d loss, which the kernel's last program
        writes from the programs' partial sums in `scratch`, fp32 (rows,)); with dx3 also the
        gradient for an upstream gradient of 1 (each row's for "none"). x3, y3, dx3 by
        pointer (x, target, dx for their views)."""
        outer, n, inner = x3.shape
        rows = outer * inner
        reduce = reduction != "none"
        scale = _prob_scale(reduction, rows, n)
        strided = weight is not None and weight.stride(0) != 1
        w = x3 if weight is None else unit_stride(weight)
        dev = x3.device
        dx = x3 if dx3 is None else dx3
        launch = _launch("cross_entropy_prob_fwd", x3,
                         (x3, y3, w, loss, stats, arrival_counters(dev, 1) if reduce else stats,
                          scratch if reduce else stats, dx),
                         (rows, n, inner, *x3.stride(), *y3.stride(), *dx.stride(), smoothing,
                          scale),
                         HAS_WEIGHT=weight is not None, REDUCE=reduce, PARTS_BLOCK=PARTS_BLOCK,
                         GRAD=dx3 is not None)

        def run(x3, y3, weight, stats, loss, dx3, scratch):
            w = x3 if weight is None else (weight.contiguous() if strided else weight)
            if reduce:
                launch(x3, y3, w, loss, stats, arrival_counters(dev, 1), scratch,
                       x3 if dx3 is None else dx3)
            else:
                launch(x3, y3, w, loss, stats, stats, stats, x3 if dx3 is None else dx3)
        return run

    @staticmethod
    @planned_once
    def plan_cross_entropy_prob_bwd(x3, y3, weight, stats, grad_out, dx3, dy3, smoothing,
                                    reduction):
        """run(x3, y3, weight, stats, grad_out, dx3, dy3): the gradients w.r.t. the logits and
        (dy3 not None) the targets, one launch; the upstream gradient read on the device
        (per row for "none", a 0-d one broadcast) and divided by the rows for a mean."""
        outer, n, inner = x3.shape
        rows = outer * inner
        grad = grad_out.reshape(-1)                     # a view where it can be
        flat = _same_memory(grad, grad_out) and grad.stride(0) == 1
        stride = 1 if reduction == "none" else 0
        scale = _prob_scale(reduction, rows, n)
        strided = weight is not None and weight.stride(0) != 1
        w = x3 if weight is None else unit_stride(weight)
        dy = dx3 if dy3 is None else dy3
        launch = _launch("cross_entropy_prob_bwd", x3,
                         (x3, y3, w, stats, grad.contiguous(), dx3, dy),
                         (stride, scale, rows, n, inner, *x3.stride(), *y3.stride(),
                          *dx3.stride(), *dy.stride(), smoothing),
                         HAS_WEIGHT=weight is not None, TARGET_GRAD=dy3 is not None)

        def run(x3, y3, weight, stats, grad_out, dx3, dy3):
            w = x3 if weight is None else (weight.contiguous() if strided else weight)
            launch(x3, y3, w, stats, grad_out if flat else grad_out.reshape(-1).contiguous(),
                   dx3, dx3 if dy3 is None else dy3)
        return run


# --- Numba launch -------------------------------------------------------------------------

def dtype_code(dtype: torch.dtype) -> int:
    """The Numba kernels' dtype argument (imported when the Numba backend is used)."""
    from .kernels.numba._dtypes import dtype_code as code
    return code(dtype)


class _NumbaLaunch:
    """Same methods as _TritonLaunch, on the Numba kernels (one block of threads per row):
    plans of NumbaLaunches (on a GPU a repeated call writes its tensors' pointers alone), kept
    per signature (planned_once), which the kernel ops launch too. The class-probability
    steps (kernel ops only) launch per call."""

    @staticmethod
    def _row(name: str, x3, *args) -> tuple:
        """Numba row kernel `name` over the rows of x3, one block of threads per row."""
        from .kernels.numba import softmax_ce as k
        outer, n, inner = x3.shape
        threads = min(numba_threads(256), max(32, next_power_of_2(n)))
        return getattr(k, name), numba_blocks(outer * inner), threads, x3.device, args

    @staticmethod
    def _weights(weight, dummy) -> tuple:
        """(class weights, their dtype code) as the kernels read them: fp32, fp16 and bf16
        weights as they are (no copy per call), others (fp64) as fp32; without weights a
        placeholder the kernels never read."""
        if weight is None:
            return dummy, dtype_code(dummy.dtype)
        if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            weight = weight.to(torch.float32)
        return weight, dtype_code(weight.dtype)

    @staticmethod
    def softmax_fwd(x3, y3, log: bool) -> None:
        _NumbaLaunch.plan_softmax_fwd(x3, y3, log)(x3, y3)

    @staticmethod
    @planned_once
    def plan_softmax_fwd(x3, y3, log: bool) -> NumbaLaunch:
        return NumbaLaunch(*_NumbaLaunch._row("softmax_fwd", x3, x3, y3, x3.shape[2], log,
                                              dtype_code(x3.dtype)), (x3, y3))

    @staticmethod
    def softmax_bwd(y3, dy3, dx3, log: bool) -> None:
        _NumbaLaunch.plan_softmax_bwd(y3, dy3, dx3, log)(y3, dy3, dx3)

    @staticmethod
    @planned_once
    def plan_softmax_bwd(y3, dy3, dx3, log: bool) -> NumbaLaunch:
        return NumbaLaunch(*_NumbaLaunch._row("softmax_bwd", y3, y3, dy3, dx3, y3.shape[2], log,
                                              dtype_code(y3.dtype)), (y3, dy3, dx3))

    @staticmethod
    def cross_entropy_fwd(x3, target, weight, ignore_index, smoothing, reduction, grad):
        """As _TritonLaunch's, without the gradient (the backward computes it): one launch,
        per-row losses (reduction "none": in x's dtype, the loss itself), for a sum or a mean
        summed by the kernel's last block. The kernel checks the targets (a trap)."""
        outer, n, inner = x3.shape
        rows, dev = outer * inner, x3.device
        lse = new_output(rows, torch.float32, dev)
        loss = new_output(rows if reduction == "none" else (), x3.dtype, dev)
        denom = _denominators(dev)
        tensors = (x3, target, weight, lse, loss, denom, None, None)
        _NumbaLaunch.plan_cross_entropy_fwd(*tensors, ignore_index, smoothing, reduction,
                                            False)(*tensors)
        return loss, lse, denom, None

    @staticmethod
    @planned_once
    def plan_cross_entropy_fwd(x3, target, weight, lse, loss, denom, scratch, dx3,
                               ignore_index, smoothing, reduction, grad):
        """run(x3, target, weight, lse, loss, denom, scratch, dx3) as _TritonLaunch's (scratch
        and dx3 unused: no gradient in the forward): one launch of the per-row kernel into
        per-row losses (the loss itself for "none") and weights, whose last block to finish
        sums a sum or a mean (the call's arrival counter: pydl._launch.arrival_counters). The
        two fp32 per-row buffers of a reduction are allocated per call."""
        if grad:
            raise ValueError("the numba cross-entropy computes its gradient in the backward")
        outer, n, inner = x3.shape
        rows, dev = outer * inner, x3.device
        none = reduction == "none"
        new_per_row = output_maker((rows,), torch.float32, dev)
        new_row_weight = output_maker((rows,), torch.float32, dev)
        if not rows:
            def empty(x3, target, weight, lse, loss, denom, scratch=None, dx3=None):
                if not none:
                    loss.fill_(float("nan") if reduction == "mean" else 0.0)
            return empty
        per_row = loss if none else new_per_row()
        row_weight = new_row_weight()
        has_weight = weight is not None
        w, w_code = _NumbaLaunch._weights(weight, lse[:1])
        cast = has_weight and w is not weight            # fp64 weights: as fp32 per call
        arrivals = arrival_counters(dev, 1)
        # "none": the counter and the reduced loss are placeholders the kernel never touches
        out = lse[:1] if none else loss
        fwd = NumbaLaunch(*_NumbaLaunch._row(
            "cross_entropy_fwd", x3, x3, target, w, per_row.view(1, rows, 1), lse, row_weight,
            denom, inner, ignore_index, float(smoothing), has_weight, w_code,
            dtype_code(x3.dtype), dtype_code(per_row.dtype), not none, reduction == "mean",
            arrivals, out.view(1, 1, 1), dtype_code(loss.dtype)),
            (x3, target, w, per_row, lse, row_weight, denom, arrivals, loss),
            (0, 1, 2 if has_weight else 4, 3, 4, 5, 6, None if none else 7, 4 if none else 8))
        if none:
            def run(x3, target, weight, lse, loss, denom, scratch=None, dx3=None):
                w = weight.to(torch.float32) if cast else weight
                fwd(x3, target, w, loss, lse, new_row_weight(), denom, None, None)
            return run

        def run(x3, target, weight, lse, loss, denom, scratch=None, dx3=None):
            w = weight.to(torch.float32) if cast else weight
            fwd(x3, target, w, new_per_row(), lse, new_row_weight(), denom,
                arrival_counters(dev, 1), loss)
        return run

    @staticmethod
    def cross_entropy_bwd(x3, target, weight, lse, denom, grad_out, reduction, dx3,
                          ignore_index, smoothing):
        tensors = (x3, target, weight, lse, denom, grad_out, dx3)
        _NumbaLaunch.plan_cross_entropy_bwd(*tensors, reduction, ignore_index,
                                            smoothing)(*tensors)

    @staticmethod
    @planned_once
    def plan_cross_entropy_bwd(x3, target, weight, lse, denom, grad_out, dx3, reduction,
                               ignore_index, smoothing):
        """run(x3, target, weight, lse, denom, grad_out, dx3), as _TritonLaunch's. The
        upstream gradient (the loss's dtype, x's) is read as it is, per row for "none" or
        broadcast, and divided by the mean's denominator in the kernel."""
        grad = grad_out.reshape(-1)                     # a view where it can be
        flat = _same_memory(grad, grad_out)
        stride = 1 if reduction == "none" else 0        # in elements of the array (its stride)
        has_weight = weight is not None
        w, w_code = _NumbaLaunch._weights(weight, lse[:1])
        cast = has_weight and w is not weight
        launch = NumbaLaunch(*_NumbaLaunch._row(
            "cross_entropy_bwd", x3, x3, target, w, lse, grad.view(1, grad.shape[0], 1),
            stride, denom, reduction == "mean", dx3, x3.shape[2], ignore_index,
            float(smoothing), has_weight, w_code, dtype_code(x3.dtype)),
            (x3, target, w, lse, grad, denom, dx3), (0, 1, 2 if has_weight else 3, 3, 4, 5, 6))

        def run(x3, target, weight, lse, denom, grad_out, dx3):
            launch(x3, target, weight.to(torch.float32) if cast else weight, lse,
                   grad_out if flat else grad_out.reshape(-1), denom, dx3)
        return run

    @staticmethod
    @planned_once
    def plan_cross_entropy_prob_fwd(x3, y3, weight, stats, loss, dx3, scratch, smoothing,
                                    reduction):
        """run(x3, y3, weight, stats, loss, dx3, scratch), as _TritonLaunch's without the
        gradient (dx3 None: the backward computes it): one launch of the per-row kernel into
        stats (lse, S) and the rows' losses (`loss` itself for "none", else `scratch`), whose
        last block to finish sums a sum or a mean (its denominator, unused here, into an
        element allocated per call)."""
        if dx3 is not None:
            raise ValueError("the numba cross-entropy computes its gradient in the backward")
        outer, n, inner = x3.shape
        rows, dev = outer * inner, x3.device
        none = reduction == "none"
        per_row = loss.reshape(rows) if none else scratch
        w, w_code = _NumbaLaunch._weights(weight, stats[:1])
        cast = weight is not None and w is not weight      # fp64 weights: as fp32 per call
        new_sink = output_maker((1,), torch.float32, dev)
        sink, arrivals = new_sink(), arrival_counters(dev, 1)
        # "none": the counter, the reduced loss and the sink are placeholders never touched
        out = stats[:1] if none else loss
        fwd = NumbaLaunch(*_NumbaLaunch._row(
            "cross_entropy_prob_fwd", x3, x3, y3, w, per_row.view(1, rows, 1), stats[:rows],
            stats[rows:], inner, float(smoothing), weight is not None, w_code,
            dtype_code(x3.dtype), dtype_code(y3.dtype), dtype_code(per_row.dtype), not none,
            _prob_scale(reduction, rows, n) if not none else 1.0, arrivals, out.view(1, 1, 1),
            sink, dtype_code(loss.dtype)),
            (x3, y3, w, per_row, stats, arrivals, loss, sink),
            (0, 1, 2 if weight is not None else 4, 3, 4, 4, None if none else 5,
             4 if none else 6, None if none else 7))
        if none:
            def run(x3, y3, weight, stats, loss, dx3, scratch):
                fwd(x3, y3, weight.to(torch.float32) if cast else weight, loss, stats, None,
                    None, None)
            return run

        def run(x3, y3, weight, stats, loss, dx3, scratch):
            fwd(x3, y3, weight.to(torch.float32) if cast else weight, scratch, stats,
                arrival_counters(dev, 1), loss, new_sink())
        return run

    @staticmethod
    @planned_once
    def plan_cross_entropy_prob_bwd(x3, y3, weight, stats, grad_out, dx3, dy3, smoothing,
                                    reduction):
        """run(x3, y3, weight, stats, grad_out, dx3, dy3), as _TritonLaunch's: the upstream
        gradient read as it is (a view where it can be), per row or broadcast, times 1 / rows
        for a mean in the kernel."""
        outer, n, inner = x3.shape
        rows = outer * inner
        grad = grad_out.reshape(-1)
        flat = _same_memory(grad, grad_out)
        stride = 1 if reduction == "none" else 0        # in elements of the array (its stride)
        scale = _prob_scale(reduction, rows, n)
        w, w_code = _NumbaLaunch._weights(weight, stats[:1])
        cast = weight is not None and w is not weight
        dy = dx3 if dy3 is None else dy3
        launch = NumbaLaunch(*_NumbaLaunch._row(
            "cross_entropy_prob_bwd", x3, x3, y3, w, stats[:rows], stats[rows:2 * rows],
            grad.view(1, grad.shape[0], 1), stride, float(scale), dx3, dy, inner,
            float(smoothing), weight is not None, w_code, dy3 is not None,
            dtype_code(x3.dtype), dtype_code(y3.dtype), dtype_code(grad.dtype)),
            (x3, y3, w, stats, grad, dx3, dy), (0, 1, 2 if weight is not None else 3, 3, 3, 4,
                                                5, 6))

        def run(x3, y3, weight, stats, grad_out, dx3, dy3):
            launch(x3, y3, weight.to(torch.float32) if cast else weight, stats,
                   grad_out if flat else grad_out.reshape(-1), dx3, dx3 if dy3 is None else dy3)
        return run


LAUNCHERS = {"triton": _TritonLaunch, "numba": _NumbaLaunch}


# --- kernel ops (pydl::...) and autograd Functions ----------------------------------------

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


def _cross_entropy_fake(x, target, weight, ignore_index, reduction, smoothing, grad, backend):
    rows = target.numel()
    out = empty_like_shape(x, target.shape if reduction == "none" else ())
    return (out, empty_like_shape(x, (rows,), torch.float32),
            empty_like_shape(x, DENOM_SHAPE, torch.float32),
            # the gradient only where the backend writes it in the forward (Triton)
            empty_like_shape(x, x.shape if grad and backend == "triton" else (0,)))


@kernel_op("cross_entropy_fwd", _cross_entropy_fake)
def _cross_entropy_fwd(x: Tensor, target: Tensor, weight: Optional[Tensor], ignore_index: int,
                       reduction: str, smoothing: float, grad: bool,
                       backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss in x's dtype, per-row logsumexp, the mean's denominator: the summed weights of
    the rows that count (a placeholder for other reductions), and with `grad` the loss's
    gradient w.r.t. x written by the forward (an empty placeholder without)).

    The forward kernel checks the targets (no host synchronisation: kernel_checks_targets),
    except Triton's in emulation, where the host checks them (a small reduction and a sync)."""
    if not kernel_checks_targets(x, backend):
        _check_target_range(target, x.shape[0 if x.dim() == 1 else 1], ignore_index)
    dim = 0 if x.dim() == 1 else 1
    x3, outer, n, inner = as_rows(x, dim)
    t = target.reshape(outer * inner)
    loss, lse, denom, dx3 = LAUNCHERS[backend].cross_entropy_fwd(x3, t, weight, ignore_index,
                                                                 smoothing, reduction, grad)
    dx = dx3.view(x.shape) if dx3 is not None else new_output((0,), x.dtype, x.device)
    return (loss.view(target.shape) if reduction == "none" else loss), lse, denom, dx


@kernel_op("cross_entropy_bwd", lambda x, *rest: empty_like_shape(x))
def _cross_entropy_bwd(x: Tensor, target: Tensor, weight: Optional[Tensor], lse: Tensor,
                       denom: Tensor, grad_out: Tensor, ignore_index: int, reduction: str,
                       smoothing: float, backend: str) -> Tensor:
    dim = 0 if x.dim() == 1 else 1
    x3, outer, n, inner = as_rows(x, dim)
    t = target.reshape(outer * inner)
    dx3 = new_output(x3.shape, x3.dtype, x3.device)
    if dx3.numel():
        LAUNCHERS[backend].cross_entropy_bwd(x3, t, weight, lse, denom, grad_out, reduction, dx3,
                                             ignore_index, smoothing)
    return dx3.view(x.shape)


def _grad_in_forward(backend: str, x: Tensor, reduction: str) -> bool:
    """Whether the forward writes the logits' gradient (module docstring): on the triton
    backend, for a summed or averaged loss of logits that will need a gradient, in eager
    mode with plain tensors (torch.compile traces the two-pass form)."""
    return (backend == "triton" and reduction != "none" and x.requires_grad
            and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and type(x) in (torch.Tensor, torch.nn.Parameter))


class CrossEntropyKernels:
    """Cross-entropy's kernel ops for one set of options on one backend: what
    CrossEntropyFunction (class-index targets) and CrossEntropyProbFunction (class
    probabilities) run, pydl:: custom ops under torch.compile. In eager mode a
    call signature's plan (_CrossEntropyCall, a subclass) runs the same steps with its
    outputs' allocation and its launches fixed."""

    __slots__ = ("ignore_index", "reduction", "smoothing", "backend")

    def __init__(self, ignore_index: int, reduction: str, smoothing: float, backend: str):
        self.ignore_index, self.reduction = ignore_index, reduction
        self.smoothing, self.backend = smoothing, backend

    def forward(self, x, target, weight, grad: bool):
        """(loss, per-row logsumexp, the mean's denominator, with `grad` the gradient)."""
        return _cross_entropy_fwd(x, target, weight, self.ignore_index, self.reduction,
                                  self.smoothing, grad, self.backend)

    def backward(self, x, target, weight, lse, denom, grad_out):
        return _cross_entropy_bwd(x, target, weight, lse, denom, grad_out, self.ignore_index,
                                  self.reduction, self.smoothing, self.backend)

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
        target_grad = ctx.needs_input_grad[1]
        if torch.is_grad_enabled():      # create_graph: differentiable again
            return _cross_entropy_prob_grad_graph(x, target, weight, grad_out, ops.reduction,
                                                  ops.smoothing, target_grad, ops.backend)
        dx, ctx.grad_from_forward = ctx.grad_from_forward, None
        if dx is not None and not target_grad:
            ops.scale_grad(dx, grad_out, None)
            return dx, None, None, None, None
        dx, dy = ops.prob_backward(x, target, weight, stats, grad_out, target_grad)
        return dx, (dy if target_grad else None), None, None, None


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
                                   target_grad: bool, backend: str):
    """CrossEntropyProbFunction's gradients (logits, target, then Nones), differentiable."""
    dim = _class_dim(x)
    w = 1.0 if weight is None else _along_classes(weight, x)
    g = _row_cotangent(grad_out, x, reduction, max(x.numel() // max(x.shape[dim], 1), 1))
    q = w * ((1.0 - smoothing) * target.to(x.dtype) + smoothing / x.shape[dim])
    logp = _log_probabilities(x, backend)
    dx = _cross_entropy_grad_graph(logp, q, g, backend)
    dy = None
    if target_grad:
        dy = (-(g * (1.0 - smoothing)) * w * logp).to(target.dtype)
    return dx, dy, None, None, None


# --- implementations by backend -----------------------------------------------------------

def _kernel_softmax(backend: str):
    def impl(x, dim, log):
        ops = SoftmaxKernels(dim, log, backend)
        if needs_graph(x):
            return apply(SoftmaxFunction, x, ops)
        return ops.forward(x)
    return impl


def _kernel_cross_entropy(backend: str):
    def impl(x, target, weight, ignore_index, reduction, smoothing):
        ops = CrossEntropyKernels(ignore_index, reduction, smoothing, backend)
        if target.dtype.is_floating_point:  # class probabilities (checked: x's shape)
            if needs_graph(x, target):
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
def _torch_cross_entropy(x, target, weight, ignore_index, reduction, smoothing):
    return torch.nn.functional.cross_entropy(x, target, weight=weight, ignore_index=ignore_index,
                                             reduction=reduction, label_smoothing=smoothing)


# --- argument checks and the public functions ---------------------------------------------

def _same_memory(view: Tensor, t: Tensor) -> bool:
    """Whether `view` (a reshape of t) starts at t's address: a Launch planned with the view
    may then be given t itself (pydl._plan: the kernels read through the planned strides)."""
    return view.numel() == 0 or view.data_ptr() == t.data_ptr()


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
    return (backend or current_backend(), *tensors_key(input), dim, log)


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


def _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, backend):
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
                         f"{tuple(input.shape)}: expected {expected} (batch and spatial dims of input)")
    if target.device != input.device:
        raise RuntimeError(f"target is on {target.device} but input is on {input.device}")
    n_classes = input.shape[0 if input.dim() == 1 else 1]
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 1 or weight.shape[0] != n_classes:
            raise ValueError(f"weight must be a 1-D tensor of length C={n_classes}, got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight!r}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if weight.device != input.device:
            raise RuntimeError(f"weight is on {weight.device} but input is on {input.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if integer(ignore_index) is None:
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if probabilities and ignore_index >= 0:
        # torch's rule: a negative ignore_index (the default -100) is ignored, others raise
        raise ValueError(f"ignore_index is not supported for class-probability (floating) "
                         f"targets: it must be negative (the default -100), got {ignore_index}")


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


@emulated("forward", "backward", "scale_grad", "prob_forward", "prob_backward")
class _CrossEntropyCall(CrossEntropyKernels):
    """cross_entropy for one call signature (pydl._plan), checked once; called with (input,
    target, weight). On pydl's backends in eager mode, for class-index targets, it is also
    the signature's plan: CrossEntropyFunction (CrossEntropyProbFunction for class
    probabilities) runs its methods, which allocate with arguments fixed here and launch what
    the first call built (the backend launcher's plan_<step>); the call's key fixes every
    input of those."""

    __slots__ = ("impl", "eager", "prob", "planned", "launcher", "grad_forward", "host_check",
                 "classes", "shape3", "rows", "new_lse", "new_loss", "new_denom", "new_dx",
                 "new_scratch", "fwd", "scale", "target3", "new_stats", "new_dy")

    def __init__(self, impl, name: str, input, target, weight, ignore_index: int,
                 reduction: str, smoothing: float):
        super().__init__(ignore_index, reduction, smoothing, name)
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
            self.new_dx = output_maker(input.shape, dt, dev)
            # the Triton forward's reduction scratch (the Numba one allocates its own rows)
            self.new_scratch = functools.partial(
                torch.empty, cross_entropy_scratch(self.rows), dtype=torch.float32,
                device=dev) if name == "triton" else _no_scratch
            self.fwd, self.scale = {}, {}    # fwd: by grad, and ("bwd", grad_out strides)

    def __call__(self, x, t, w):
        if w is not None and w.requires_grad and self.backend != "torch" \
                and torch.is_grad_enabled():
            raise NotImplementedError(
                "cross_entropy: the class weight requires grad, and pydl's kernels do not "
                "differentiate the loss w.r.t. the class weights (torch does for "
                "class-probability targets and raises for class indices): pass "
                "weight.detach(), or backend='torch'")
        if self.eager:
            graph = torch.is_grad_enabled() and x.requires_grad
            if self.prob:
                target_graph = torch.is_grad_enabled() and t.requires_grad
                if graph or target_graph:
                    return apply(CrossEntropyProbFunction, x, t, w, self,
                                 graph and self.grad_forward and not target_graph)
                return self.prob_forward(x, t, w, False)[0]
            if graph:
                return apply(CrossEntropyFunction, x, t, w, self, self.grad_forward)
            return self.forward(x, t, w, False)[0]
        return self.impl(x, t, w, self.ignore_index, self.reduction, self.smoothing)

    # the plan (eager, class indices): CrossEntropyKernels' steps with fixed arguments

    def forward(self, x, target, weight, grad: bool):
        if not self.planned:
            return super().forward(x, target, weight, grad)
        if self.host_check:
            _check_target_range(target, self.classes, self.ignore_index)
        lse, loss, denom = fresh(self.new_lse), fresh(self.new_loss), fresh(self.new_denom)
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
                self.smoothing, self.reduction, grad)
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
                    dx.view(self.shape3), self.reduction, self.ignore_index, self.smoothing)
                if not capturing():
                    self.fwd[key] = run
            run(x, target, weight, lse, denom, grad_out, dx)
        return dx

    def prob_forward(self, x, target, weight, grad: bool):
        if not self.planned:
            return super().prob_forward(x, target, weight, grad)
        stats, loss = fresh(self.new_stats), fresh(self.new_loss)
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


def _cross_entropy_call(input, target, weight, ignore_index, reduction, label_smoothing, backend):
    """cross_entropy for one call signature, checked once: (input, target, weight) -> loss."""
    name, impl = dispatch("cross_entropy", backend, input, target,
                          *([weight] if isinstance(weight, torch.Tensor) else []))
    _check_cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, name)
    return _CrossEntropyCall(impl, name, input, target, weight, int(ignore_index), reduction,
                             float(label_smoothing))


def _cross_entropy_key(input, target, weight, ignore_index, reduction, label_smoothing, backend):
    return (backend or current_backend(), *tensors_key(input, target, weight), ignore_index,
            reduction, label_smoothing)


_CROSS_ENTROPY_CALLS = Cache("cross_entropy calls")


def cross_entropy(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                  reduction="mean", label_smoothing=0.0, *, backend=None):
    """Cross-entropy as torch.nn.functional.cross_entropy: `target` holds int64 class indices
    (shape (N, d1, ...)), or class probabilities (floating, input's shape; rows need not sum to
    1; "mean" divides by the number of rows; the gradient w.r.t. target is computed too).

    Fused: log_softmax is never materialised; the backward writes the gradient in one pass.
    The deprecated `size_average` / `reduce` arguments set the reduction as in torch (with
    its deprecation warning); uint8 class indices are taken as torch takes them (as int64).
    """
    if size_average is not None or reduce is not None:
        reduction = torch.nn._reduction.legacy_get_string(size_average, reduce)
    if isinstance(target, torch.Tensor) and target.dtype == torch.uint8:
        target = target.long()
    input, target, weight = autocast_inputs("cross_entropy", input, target, weight)
    call = _CROSS_ENTROPY_CALLS.call(_cross_entropy_key, _cross_entropy_call, input, target,
                                     weight, ignore_index, reduction, label_smoothing, backend)
    return call(input, target, weight)


__all__ = ["softmax", "log_softmax", "cross_entropy", "SoftmaxFunction", "CrossEntropyFunction",
           "CrossEntropyProbFunction"]
