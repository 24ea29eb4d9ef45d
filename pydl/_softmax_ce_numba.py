"""softmax and cross-entropy's Numba launcher, _NumbaLaunch: the steps of
pydl/_softmax_ce_triton.py's _TritonLaunch on the Numba kernels (one block of threads per
row), as NumbaLaunch plans kept per signature. pydl/softmax_ce.py's docstring lists the
family's parts.
"""
from __future__ import annotations

import torch

from ._launch import (
    arrival_counters,
    new_output,
    next_power_of_2,
    output_maker,
    planned_once,
)
from ._numba_launch import NumbaLaunch, launch_numba_1d, numba_blocks, numba_threads
from ._softmax_ce_common import _denominators, _prob_scale, _same_memory


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
    def cross_entropy_fwd(x3, target, weight, ignore_index, smoothing, reduction, grad,
                          z_loss=0.0, softcap=0.0):
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
                                            False, z_loss=z_loss, softcap=softcap,
                                            cap_input=softcap > 0)(*tensors)
        return loss, lse, denom, None

    @staticmethod
    @planned_once
    def plan_cross_entropy_fwd(x3, target, weight, lse, loss, denom, scratch, dx3,
                               ignore_index, smoothing, reduction, grad, z_loss=0.0,
                               softcap=0.0, cap_input=False):
        """run(x3, target, weight, lse, loss, denom, scratch, dx3) as _TritonLaunch's (scratch
        and dx3 unused: no gradient in the forward; softcap with cap_input: the loss of
        s tanh(x3 / s), capped as read; without, x3 is capped already): one launch of the
        per-row kernel into per-row losses (the loss itself for "none") and weights, whose last
        block to finish sums a sum or a mean (the call's arrival counter:
        pydl._launch.arrival_counters). The two fp32 per-row buffers of a reduction are
        allocated per call."""
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
            denom, inner, ignore_index, float(smoothing), float(z_loss),
            float(softcap) if cap_input else 0.0, has_weight, w_code,
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
                          ignore_index, smoothing, z_loss=0.0, softcap=0.0):
        tensors = (x3, target, weight, lse, denom, grad_out, dx3)
        _NumbaLaunch.plan_cross_entropy_bwd(*tensors, reduction, ignore_index,
                                            smoothing, softcap=softcap, z_loss=z_loss,
                                            cap_input=softcap > 0)(*tensors)

    @staticmethod
    @planned_once
    def plan_cross_entropy_bwd(x3, target, weight, lse, denom, grad_out, dx3, reduction,
                               ignore_index, smoothing, softcap=0.0, z_loss=0.0,
                               cap_input=False):
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
            float(smoothing), float(softcap), float(z_loss), cap_input, has_weight, w_code,
            dtype_code(x3.dtype)),
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

    @staticmethod
    def cross_entropy_prob_weight_grad(x3, y3, stats, grad_out, dw, smoothing,
                                       reduction) -> None:
        """As _TritonLaunch's: a thread per class walks every row. Not planned (it runs only
        where a class weight requires grad)."""
        from .kernels.numba import softmax_ce as k
        outer, n, inner = x3.shape
        rows = outer * inner
        grad = grad_out.reshape(-1)
        launch_numba_1d(k.cross_entropy_prob_weight_grad, n, x3.device, x3, y3, stats[:rows],
                        grad.view(1, grad.shape[0], 1), 1 if reduction == "none" else 0,
                        float(_prob_scale(reduction, rows, n)), dw.view(1, n, 1), inner,
                        float(smoothing), dtype_code(x3.dtype), dtype_code(y3.dtype),
                        dtype_code(grad.dtype))
