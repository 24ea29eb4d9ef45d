"""softmax and cross-entropy's Triton launcher, _TritonLaunch: each step's launch over the
(outer, n, inner) rows (a BLOCK_R x BLOCK_N tile, autotuned per signature: pydl/_tune.py),
built once per signature in a Cache and offered both ways, a method that launches and
plan_<step> that returns the launch for a plan to keep. The tiles, tuning space and block sizes
of the reductions are module constants, read at planning time (tests lower MAX_BLOCK_N,
TILE_ELEMENTS, DENOMINATOR_BLOCK and PARTS_BLOCK here to reach the multi-block paths with small
rows). pydl/softmax_ce.py's docstring lists the family's parts.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _env
from ._launch import arrival_counters, cdiv, new_output, next_power_of_2, planned_once
from ._plan import Cache, Launch
from ._softmax_ce_common import _denominators, _prob_scale, _same_memory
from ._tune import Tuner, bucket

# as the Triton kernels number them (kernels/triton/softmax_ce.py: REDUCE_*)
REDUCTION_CODES = {"none": 0, "sum": 1, "mean": 2}

# Widest column block a Triton program loads at once; wider rows are walked with the online
# max/sum. Tests lower it to exercise the multi-block path on small rows.
MAX_BLOCK_N = 4096
# Elements per program tile (BLOCK_R rows x BLOCK_N columns): short rows are batched.
TILE_ELEMENTS = 4096


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
    def cross_entropy_fwd(x3, target, weight, ignore_index, smoothing, reduction, grad,
                          z_loss=0.0, softcap=0.0):
        """(loss: per row, or reduced, in x's dtype; per-row fp32 logsumexp; the mean's fp32
        denominator; with `grad` the reduced loss's gradient w.r.t. x3, contiguous). The sum
        and mean are finished in the kernel (its last program to arrive); a training mean
        first sums its denominator from the targets (cross_entropy_mean_denominator), since
        the forward scales the gradient by its inverse. softcap s > 0: the loss of the
        logits s tanh(x3 / s), capped as the kernel reads them (dx3 w.r.t. x3)."""
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
                                             grad, softcap=softcap, z_loss=z_loss,
                                             cap_input=softcap > 0)(*tensors)
        return loss, lse, denom, dx3

    @staticmethod
    def plan_cross_entropy_fwd(x3, target, weight, lse, loss, denom, scratch, dx3,
                               ignore_index, smoothing, reduction, grad, own_denominator=True,
                               softcap=0.0, z_loss=0.0, cap_input=False):
        """run(x3, target, weight, lse, loss, denom, scratch, dx3): the forward's launches
        (rows > 0) into loss, lse, denom and with `grad` dx3; weight and (without `grad`) dx3
        may be None, and scratch is for the reductions (cross_entropy_scratch(rows) fp32:
        the programs' partial sums, 2 each (loss, weight) in the forward, then 1 each of the
        mean denominator's kernel), None without one. x3 and target rows by pointer (any
        tensor at their address: x for its view). dx3 may be x3 itself (IN_PLACE: the kernel
        then waits for every warp's reads of the row before it writes the gradient).
        own_denominator=False: a training mean's denominator is already in denom[0] (the
        chunks of pydl.linear_cross_entropy share the whole batch's), so its kernel is not
        launched. softcap s > 0 (with grad): the logits are s tanh(u / s), and dx3 the
        gradient w.r.t. u; with cap_input x3 holds u (capped as read), else the capped
        logits themselves (the GEMM's epilogue capped them). z_loss z > 0: each counted
        row's loss gains z lse^2 (and the gradient its term)."""
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
                      CHECK_TARGETS=dev.type == "cuda",
                      IN_PLACE=grad and dx3 is not None and dx3.data_ptr() == x3.data_ptr(),
                      SOFTCAP=float(softcap), Z_LOSS=float(z_loss), CAP_INPUT=cap_input)
        if none:
            def run(x, target, weight, lse, loss, denom, scratch, dx):
                w = (weight.contiguous() if strided else weight) if has_weight else x
                fwd(x, target.contiguous() if t_strided else target, w, loss, lse, loss, denom,
                    lse, lse, dx if grad else x)
            return run
        denominator = None
        if grad and reduction == "mean" and own_denominator:
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
                          ignore_index, smoothing, z_loss=0.0, softcap=0.0):
        """dx3 = the gradient of the loss w.r.t. x3, grad_out the loss's upstream gradient (per
        row, or 0-d, read on the device); the mean's division happens in the kernel. softcap
        s > 0: the forward's, the logits s tanh(x3 / s)."""
        tensors = (x3, target, weight, lse, denom, grad_out, dx3)
        _TritonLaunch.plan_cross_entropy_bwd(*tensors, reduction, ignore_index,
                                             smoothing, softcap=softcap, z_loss=z_loss,
                                             cap_input=softcap > 0)(*tensors)

    @staticmethod
    def plan_cross_entropy_bwd(x3, target, weight, lse, denom, grad_out, dx3, reduction,
                               ignore_index, smoothing, softcap=0.0, z_loss=0.0,
                               cap_input=False):
        """run(x3, target, weight, lse, denom, grad_out, dx3): cross_entropy_bwd's launch; x3,
        target and dx3 by pointer (x for its view x3), grad_out as planned (strides). softcap
        s > 0: the logits are s tanh(u / s), and dx3 the gradient w.r.t. u; with cap_input
        x3 holds u, else the capped logits."""
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
                         MEAN=reduction == "mean", SOFTCAP=float(softcap), Z_LOSS=float(z_loss),
                         CAP_INPUT=cap_input)

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

    @staticmethod
    def cross_entropy_prob_weight_grad(x3, y3, stats, grad_out, dw, smoothing,
                                       reduction) -> None:
        """dw (fp32, (n,)): the class-probability loss's gradient w.r.t. the class weights
        (kernels/triton/softmax_ce.py cross_entropy_prob_weight_grad), one launch: a program
        per block of classes walks every row, the upstream gradient read as the backward
        reads it. Not planned: it runs only where a class weight requires grad."""
        from .kernels.triton import softmax_ce as k
        outer, n, inner = x3.shape
        rows = outer * inner
        block_n = max(16, min(128, next_power_of_2(n)))
        Launch(k.cross_entropy_prob_weight_grad, (cdiv(n, block_n),),
               (1 if reduction == "none" else 0, _prob_scale(reduction, rows, n), rows, n, inner,
                *x3.stride(), *y3.stride(), smoothing),
               dict(BLOCK_R=16 if _env.INTERPRET else 32, BLOCK_N=block_n, num_warps=4))(
            x3, y3, stats, grad_out.reshape(-1).contiguous(), dw)
