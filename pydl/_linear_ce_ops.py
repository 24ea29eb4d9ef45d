"""linear_cross_entropy's steps: the kernel ops (pydl::linear_cross_entropy_fwd and _bwd,
with their fakes), the launches kept per call signature (_Steps), the chunks' buffers and
bookkeeping, and the autograd Function that runs them. pydl/linear_ce.py holds the public
function, its checks and the implementations registered per backend, and its docstring says
how the op works.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import _env, _softmax_ce_ops
from ._autograd import without_double_backward
from ._gemm import gemm_plan as _triton_gemm_plan
from ._gemm_numba import gemm_plan as _numba_gemm_plan
from ._launch import WriteOnly, cdiv, fresh, input_precision, output_maker
from ._library import empty_like_shape, kernel_op
from ._plan import Cache, capturing, tensors_key
from ._softmax_ce_common import DENOM_SHAPE, _denominators
from ._softmax_ce_ops import LAUNCHERS, _check_target_range
from ._softmax_ce_triton import _TritonLaunch, cross_entropy_scratch

GEMM_PLANS = {"triton": _triton_gemm_plan, "numba": _numba_gemm_plan}
# Largest chunk of logits a call keeps (bytes): 1 GiB is 4096 rows of a 128k bf16 vocabulary.
# Several chunks make a 16-bit weight's gradient go through an fp32 accumulator, read and
# written once a chunk: 8 V H bytes against the chunk's 6 c V H FLOPs, so the accumulator's
# share of a chunk's time is about 8 F / (6 c B) for a GPU of F FLOP/s and B bytes/s (H100-class:
# 240 / c, 6% at c = 4096 rows, 23% at 1024). At 1 GiB a Llama-3-8B head over 4096 tokens is one
# chunk (no accumulator); the composite keeps three N x V tensors (logits, log-probabilities,
# their gradient). `chunk_rows=` trades speed for memory.
CHUNK_BYTES = 1 << 30
F32 = torch.float32


def chunk_rows_for(n_rows: int, n_classes: int, dtype: torch.dtype) -> int:
    """Rows a chunk holds by default: as many as CHUNK_BYTES of logits take (a multiple of
    64 where that is at least 64), at least one, at most n_rows."""
    rows = max(1, CHUNK_BYTES // max(1, n_classes * dtype.itemsize))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


def _grad_in_forward(backend: str, reduction: str) -> bool:
    """The gradient-in-the-forward schedule (pydl/linear_ce.py's docstring), eager or
    compiled."""
    return backend == "triton" and reduction != "none"


# --- one chunk's steps ------------------------------------------------------------------------

class _Steps:
    """The steps of one call signature (pydl/_plan.py's design): its options, its buffers'
    allocations with their arguments fixed, and each GEMM plan and cross-entropy launch, one
    per role and chunk length, made at its first use and kept, so that a repeated call makes
    its buffers and views and launches what it kept. The kernel ops look one up by their key
    (`_steps`); an eager call's plan (pydl/linear_ce.py _LinearCrossEntropyCall) keeps its own
    (`planned`: the buffers only a kernel writes before anything reads them uninitialised, and
    those nothing reads, without a graph, kept). A launch built inside a CUDA graph capture is
    used and not kept (it could not be tuned)."""

    __slots__ = ("launcher", "gemm_plan", "kept", "softcap", "z_loss", "ignore_index",
                 "reduction", "smoothing", "grads", "chunk", "n_classes", "one",
                 "mean_from_targets", "host_check", "new_lse", "new_loss", "new_denom",
                 "new_scratch", "new_grads", "new_buffer", "unread")

    def __init__(self, backend: str, softcap: float, z_loss: float, x, w, b, target,
                 ignore_index: int, reduction: str, smoothing: float, need_x: bool,
                 need_w: bool, need_b: bool, grads: bool, chunk: int, planned: bool = False):
        self.launcher, self.gemm_plan, self.kept = LAUNCHERS[backend], GEMM_PLANS[backend], {}
        self.softcap = softcap      # > 0: the logits s tanh(. / s), made so by their GEMM
        self.z_loss = z_loss        # > 0: each counted row's loss + z lse^2
        self.ignore_index, self.reduction, self.smoothing = ignore_index, reduction, smoothing
        self.grads, self.chunk = grads, chunk   # grads: the forward writes the gradients
        n, dev = x.shape[0], x.device
        self.n_classes = w.shape[0]
        none = reduction == "none"
        n_chunks = cdiv(n, chunk)
        # One chunk (the default up to 1 GiB of logits): the kernel reduces the loss, into
        # the loss itself, and makes a mean's denominator, as pydl.cross_entropy's. Several:
        # the chunks' losses in fp32, per row or (with the gradient) each chunk's sum, divided
        # by the whole batch's denominator (taken from the targets first), summed after the
        # loop.
        self.one = one = n_chunks == 1 and not none
        self.mean_from_targets = reduction == "mean" and not one
        # read here, not imported: bench/overhead.py replaces it (a GPU's kernels check)
        self.host_check = not _softmax_ce_ops.kernel_checks_targets(x, backend)
        self.new_lse = output_maker((n,), F32, dev)
        self.new_loss = output_maker((), x.dtype, dev) if one else output_maker(
            (n if none or not grads else n_chunks,), x.dtype if none else F32, dev)
        # the denominators: an output of the kernel op, which torch.library.opcheck compares
        # between runs, zeroed there; a plan's, uninitialised where the kernels write what is
        # read (one chunk, or per-row losses: as pydl.cross_entropy's plan)
        kernel_written = planned and (one or none)
        denom = output_maker(DENOM_SHAPE, F32, dev)
        self.new_denom = functools.partial(fresh, denom) if kernel_written else \
            functools.partial(_denominators, dev)
        # the Triton forward's partial sums (and its denominator's, 2 rows + 1 a block)
        self.new_scratch = functools.partial(
            torch.empty, cross_entropy_scratch(min(chunk, n)), dtype=F32, device=dev) \
            if backend == "triton" and (grads or one) else _nothing
        self.new_grads = _gradient_makers(x, w, b, need_x, need_w, need_b, n_chunks)
        self.new_buffer = output_maker((min(chunk, n), self.n_classes), x.dtype, dev)
        # without a graph nothing reads the rows' logsumexp and the denominators the kernels
        # write (several chunks' zeroed ones: made per call)
        self.unread = (WriteOnly(self.new_lse), WriteOnly(denom) if kernel_written
                       else self.new_denom) if planned else None

    def _kept(self, key, build, *args, **kwargs):
        launch = self.kept.get(key)
        if launch is None:
            launch = build(*args, **kwargs)
            if not capturing():
                self.kept[key] = launch
        return launch

    def gemm(self, key, a, b, out, *, trans_a=False, trans_b=False, bias=None, addend=None,
             softcap=0.0):
        """pydl's gemm(a, b, out, ...) through the plan kept for `key` (`addend` may be out:
        accumulate)."""
        self._kept(key, self.gemm_plan, a, b, out, trans_a=trans_a, trans_b=trans_b,
                   bias=bias, addend=addend, softcap=softcap)(a, b, out, bias, addend)

    def loss_rows(self, x3, t, cw, lse, loss, denom, scratch, reduction):
        """The chunk's logsumexp and its losses: per row into `loss` (fp32, or the loss itself
        for "none") with reduction "none"; else reduced by the kernel into the 0-d `loss`
        (the one chunk of a call: a mean divided by its own denominator, which it writes to
        denom[0] for the backward)."""
        self._kept(("rows", x3.shape[0], reduction), self.launcher.plan_cross_entropy_fwd, x3,
                   t, cw, lse, loss, denom, scratch, None, self.ignore_index, self.smoothing,
                   reduction, False, z_loss=self.z_loss)(x3, t, cw, lse, loss, denom, scratch,
                                                         None)

    def loss_and_grad(self, x3, t, cw, lse, loss, denom, scratch, one: bool):
        """The chunk's reduced loss into `loss` (0-d; a mean divided by denom[0], the whole
        batch's) and its gradient over its logits (the triton forward with GRAD, IN_PLACE).
        `one`, the call's one chunk: the launch makes a mean's denominator itself, as
        pydl.cross_entropy's does (scratch holds its partial sums too); else denom[0] is
        the caller's."""
        self._kept(("grad", x3.shape[0], one), _TritonLaunch.plan_cross_entropy_fwd, x3, t, cw,
                   lse, loss, denom, scratch, x3, self.ignore_index, self.smoothing,
                   self.reduction, True, own_denominator=one, softcap=self.softcap,
                   z_loss=self.z_loss)(x3, t, cw, lse, loss, denom, scratch, x3)

    def grad_rows(self, x3, t, cw, lse, denom, g):
        """The chunk's logits' gradient over them, for upstream gradient g (the cross-entropy
        backward)."""
        self._kept(("bwd", x3.shape[0]), self.launcher.plan_cross_entropy_bwd, x3, t, cw, lse,
                   denom, g, x3, self.reduction, self.ignore_index, self.smoothing,
                   softcap=self.softcap, z_loss=self.z_loss)(x3, t, cw, lse, denom, g, x3)

    def logits(self, x_c: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> None:
        """out = x_c w^T + b (capped: s tanh(. / s)): the chunk's logits, in x's dtype."""
        self.gemm(("logits", x_c.shape[0]), x_c, w, out, trans_b=True, bias=b,
                  softcap=self.softcap)

    def backprop(self, dlogits: Tensor, x_c: Tensor, w: Tensor, dx_c, dw, dw_acc, db, db_acc,
                 first: bool, last: bool) -> None:
        """The chunk's share of the gradients from its logits' gradient: dx_c = dlogits w;
        dw (+)= dlogits^T x_c; db (+)= the column sums of dlogits (a product with ones). A
        gradient summed over chunks adds into its fp32 accumulator (dw_acc, db_acc: None where
        the gradient itself is fp32 or one chunk makes it), and the last chunk's product is
        rounded once, into the gradient itself."""
        rows = dlogits.shape[0]
        if dx_c is not None:
            self.gemm(("dx", rows), dlogits, w, dx_c)
        if dw is not None:
            self._summed(("dw", rows, first, last), dlogits, x_c, dw, dw_acc, first, last,
                         trans_a=True)
        if db is not None:
            self._summed(("db", rows, first, last), self.ones(dlogits).expand(1, rows), dlogits,
                         db.view(1, -1), None if db_acc is None else db_acc.view(1, -1), first,
                         last)

    def _summed(self, key, a, b, out, acc, first: bool, last: bool, trans_a=False) -> None:
        """out (+)= a b, through acc where there is one: the chunks add into acc, the last
        one's sum is rounded once, into out; without acc out itself sums them."""
        total = out if acc is None else acc
        self.gemm(key, a, b, out if acc is None or last else acc, trans_a=trans_a,
                  addend=None if first else total)

    def ones(self, x: Tensor) -> Tensor:
        """A kept 1 x 1 one of x's dtype, the bias gradient's row of ones once expanded."""
        return self._kept("ones", torch.ones, 1, 1, dtype=x.dtype, device=x.device)

    def forward(self, x, w, b, target, class_weight, unread: bool = False):
        """(loss, the rows' fp32 logsumexp, the mean's denominator buffer, and with `grads`
        the gradients of x, w and b that need one for an upstream gradient of 1, else None).
        `unread` (a plan's call without a graph): the logsumexp and denominators in the
        buffers the plan keeps."""
        if self.host_check:
            _check_target_range(target, self.n_classes, self.ignore_index)
        reduction, one, grads = self.reduction, self.one, self.grads
        none = reduction == "none"
        lse = self.unread[0]() if unread else fresh(self.new_lse)
        denom = _mean_denominator(target, class_weight, self.ignore_index, self.n_classes) \
            if self.mean_from_targets else (self.unread[1] if unread else self.new_denom)()
        loss = losses = fresh(self.new_loss)
        scratch = self.new_scratch()
        dx, dw, dw_acc, db, db_acc = self.new_grads() if grads else (None,) * 5
        buffer = fresh(self.new_buffer)
        for i, (first, last, rows, x_c, t_c, lse_c, logits) in enumerate(
                _chunks(x, target, lse, buffer, self.chunk)):
            self.logits(x_c, w, b, logits)
            x3 = logits.unsqueeze(2)
            if grads:
                # the chunk's loss, its gradient over its logits
                self.loss_and_grad(x3, t_c, class_weight, lse_c, loss if one else losses[i],
                                   denom, scratch, one)
                self.backprop(logits, x_c, w, None if dx is None else dx[rows], dw, dw_acc, db,
                              db_acc, first, last)
            else:
                self.loss_rows(x3, t_c, class_weight, lse_c, loss if one else losses[rows],
                               denom, scratch, reduction if one else "none")
        if not none and not one:   # the chunks' sums are already divided by a mean's denominator
            loss = _finish_loss(losses, denom, "sum" if grads and x.shape[0] else reduction,
                                x.dtype)
        return loss, lse, denom, dx, dw, db

    def backward(self, x, w, b, target, class_weight, lse, denom, grad_out):
        """The recompute schedule's backward: (dx, dw, db), None where not needed. Each
        chunk's logits again, their gradient over them (the cross-entropy backward kernel,
        which divides a mean by denom[0] and reads W from denom[1]), then the GEMMs."""
        dx, dw, dw_acc, db, db_acc = self.new_grads()
        none = self.reduction == "none"
        # the kernels read the upstream gradient in the logits' dtype (numba), per row for "none"
        grad = grad_out.to(x.dtype).reshape(-1) if none else grad_out.to(x.dtype)
        buffer = fresh(self.new_buffer)
        for first, last, rows, x_c, t_c, lse_c, logits in _chunks(x, target, lse, buffer,
                                                                   self.chunk):
            self.logits(x_c, w, b, logits)
            self.grad_rows(logits.unsqueeze(2), t_c, class_weight, lse_c, denom,
                           grad[rows] if none else grad)
            self.backprop(logits, x_c, w, None if dx is None else dx[rows], dw, dw_acc, db,
                          db_acc, first, last)
        return dx, dw, db


_STEPS = Cache("linear_cross_entropy launches")


def _steps(backend: str, softcap: float, z_loss: float, x, w, b, target, class_weight,
           direction, *options) -> _Steps:
    """The kernel ops' steps of a call signature: the backend, the softcap and z-loss, the
    tensors' types, shapes, strides and dtypes, the direction (the backward's also the
    upstream gradient's dtype and strides), the options (_Steps' from ignore_index on), and
    torch's TF32 switch (its GEMMs' precision)."""
    key = (backend, softcap, z_loss, input_precision(x.dtype),
           *tensors_key(x, w, b, target, class_weight), *direction, *options)
    return _STEPS.get(key, _Steps, backend, softcap, z_loss, x, w, b, target, *options)


def _nothing() -> None:
    return None


def _gradient_makers(x, w, b, need_x: bool, need_w: bool, need_b: bool, n_chunks: int):
    """new_grads() -> (dx, dw, dw_acc, db, db_acc): the gradients' buffers (None where not
    needed); an fp32 accumulator where a 16-bit gradient sums several chunks. The first chunk
    writes them all, so they start uninitialised (zeros where there is no chunk: no rows)."""
    def maker(t, dtype=None):
        shape, dtype = t.shape, dtype or t.dtype
        if not n_chunks:
            return functools.partial(torch.zeros, shape, dtype=dtype, device=t.device)
        return functools.partial(fresh, output_maker(shape, dtype, t.device))
    several = n_chunks > 1
    makers = (maker(x) if need_x else _nothing, maker(w) if need_w else _nothing,
              maker(w, F32) if need_w and several and w.dtype != F32 else _nothing,
              maker(b) if need_b else _nothing,
              maker(b, F32) if need_b and several and b.dtype != F32 else _nothing)
    return lambda: tuple([make() for make in makers])


def _chunks(x, target, lse, buffer, chunk: int):
    """(first, last, rows, x's rows, their targets, their lse, their logits' buffer) of each
    chunk of `chunk` rows in turn (the last one short); one chunk as the tensors themselves
    (no views to make)."""
    if chunk >= x.shape[0] > 0:
        return ((True, True, slice(None), x, target, lse, buffer),)
    return _chunk_views(x, target, lse, buffer, chunk)


def _chunk_views(x, target, lse, buffer, chunk: int):
    n = x.shape[0]
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        rows = slice(start, stop)
        yield (start == 0, stop == n, rows, x[rows], target[rows], lse[rows],
               buffer[:stop - start])


def _or_placeholders(x, w, dx, dw, db) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dw, db) with a fresh empty tensor for each one not computed (a custom op's outputs
    never alias each other)."""
    return (x.new_empty(0) if dx is None else dx, w.new_empty(0) if dw is None else dw,
            x.new_empty(0) if db is None else db)


def _mean_denominator(target: Tensor, class_weight: Tensor | None, ignore_index: int,
                      n_classes: int) -> Tensor:
    """The cross-entropy kernels' fp32 (2,) denominator buffer with [0] = the summed class
    weights of the rows that count (their number without weights): the mean's denominator,
    from the N targets ([1] the kernels write)."""
    denom = _denominators(target.device)
    counted = target != ignore_index
    if class_weight is None:
        denom[0] = counted.sum()
    else:
        # an out-of-range target is the kernels' error to raise (clamped here, never read)
        safe = torch.where(counted, target, 0).clamp_(0, n_classes - 1)
        denom[0] = (class_weight.to(F32)[safe] * counted).sum()
    return denom


def _finish_loss(row_losses: Tensor, denom: Tensor, reduction: str, dtype) -> Tensor:
    """The reduced loss from the rows' fp32 losses (or the chunks' sums): torch's NaN for a
    mean over a zero denominator."""
    total = row_losses.sum()
    if reduction == "mean":
        total = torch.where(denom[0] == 0, float("nan"), total / denom[0])
    return total.to(dtype)


# --- the kernel ops -------------------------------------------------------------------------

def _fwd_fake(x, w, b, target, class_weight, ignore_index, reduction, smoothing, softcap, z_loss,
              need_x, need_w, need_b, grad_in_forward, chunk, backend):
    grads = grad_in_forward and reduction != "none"
    loss = empty_like_shape(x, target.shape if reduction == "none" else ())
    return (loss, empty_like_shape(x, (target.numel(),), F32), empty_like_shape(x, (2,), F32),
            empty_like_shape(x, x.shape if grads and need_x else (0,)),
            empty_like_shape(w, w.shape if grads and need_w else (0,)),
            empty_like_shape(x, b.shape if grads and need_b and b is not None else (0,)))


@kernel_op("linear_cross_entropy_fwd", _fwd_fake)
def _linear_cross_entropy_fwd(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor,
                              class_weight: Tensor | None, ignore_index: int, reduction: str,
                              smoothing: float, softcap: float, z_loss: float, need_x: bool,
                              need_w: bool, need_b: bool, grad_in_forward: bool, chunk: int,
                              backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor,
                                                     Tensor]:
    """(loss, the rows' fp32 logsumexp, the mean's denominator buffer, and with
    grad_in_forward (the triton backend, "sum" or "mean") the gradients of x, w and b that
    need one, for an upstream gradient of 1; empty placeholders otherwise). x (N, H), w (V,
    H), b (V,) or None, target (N,)."""
    grads = grad_in_forward and reduction != "none" and (need_x or need_w or need_b)
    steps = _steps(backend, softcap, z_loss, x, w, b, target, class_weight, ("fwd",),
                   ignore_index, reduction, smoothing, need_x, need_w, need_b, grads, chunk)
    loss, lse, denom, dx, dw, db = steps.forward(x, w, b, target, class_weight)
    return (loss, lse, denom, *_or_placeholders(x, w, dx, dw, db))


def _bwd_fake(x, w, b, target, class_weight, lse, denom, grad_out, ignore_index, reduction,
              smoothing, softcap, z_loss, need_x, need_w, need_b, chunk, backend):
    return (empty_like_shape(x, x.shape if need_x else (0,)),
            empty_like_shape(w, w.shape if need_w else (0,)),
            empty_like_shape(x, b.shape if need_b and b is not None else (0,)))


@kernel_op("linear_cross_entropy_bwd", _bwd_fake)
def _linear_cross_entropy_bwd(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor,
                              class_weight: Tensor | None, lse: Tensor, denom: Tensor,
                              grad_out: Tensor, ignore_index: int, reduction: str,
                              smoothing: float, softcap: float, z_loss: float, need_x: bool,
                              need_w: bool, need_b: bool, chunk: int,
                              backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """The recompute schedule's backward (_Steps.backward): (dx, dw, db), an empty placeholder
    for one not needed."""
    steps = _steps(backend, softcap, z_loss, x, w, b, target, class_weight,
                   ("bwd", grad_out.dtype, grad_out.stride()), ignore_index, reduction,
                   smoothing, need_x, need_w, need_b, False, chunk)
    return _or_placeholders(x, w, *steps.backward(x, w, b, target, class_weight, lse, denom,
                                                  grad_out))


def _scale_in_place(t: Tensor, grad_out: Tensor) -> None:
    """t *= grad_out (0-d, read on the device; nothing written where it is 1): the triton
    cross-entropy's scale kernel, on t as one row of classes."""
    if t.numel():
        flat = t.view(1, -1)
        LAUNCHERS["triton"].cross_entropy_scale_grad(flat, grad_out, None, -100)


if _env.INTERPRET:
    _scale_in_place = _env.emulated_launch(_scale_in_place)


class LinearCEKernels:
    """linear_cross_entropy's steps for one set of options on one backend: what
    LinearCrossEntropyFunction runs, the kernel ops (pydl::linear_cross_entropy_fwd and _bwd,
    custom ops under torch.compile). In eager mode a call signature's plan
    (pydl/linear_ce.py _LinearCrossEntropyCall, a subclass) runs the same steps (_Steps) with
    no key built per call. `in_forward`: the gradient-in-the-forward schedule (pydl/
    linear_ce.py's docstring)."""

    __slots__ = ("ignore_index", "reduction", "smoothing", "softcap", "z_loss", "chunk",
                 "backend", "in_forward")

    def __init__(self, ignore_index: int, reduction: str, smoothing: float, softcap: float,
                 z_loss: float, chunk: int, backend: str):
        self.ignore_index, self.reduction, self.smoothing = ignore_index, reduction, smoothing
        self.softcap, self.z_loss, self.chunk = softcap, z_loss, chunk
        self.backend, self.in_forward = backend, _grad_in_forward(backend, reduction)

    def forward(self, x, w, b, target, class_weight, need_x: bool, need_w: bool,
                need_b: bool):
        """(loss, lse, denom, dx, dw, db): the gradients with in_forward, for an upstream
        gradient of 1 (an empty placeholder, or None, where not made)."""
        return _linear_cross_entropy_fwd(
            x, w, b, target, class_weight, self.ignore_index, self.reduction, self.smoothing,
            self.softcap, self.z_loss, need_x, need_w, need_b, self.in_forward, self.chunk,
            self.backend)

    def backward(self, x, w, b, target, class_weight, lse, denom, grad_out, need_x: bool,
                 need_w: bool, need_b: bool):
        """(dx, dw, db) by the recompute schedule (an empty placeholder, or None, where not
        needed)."""
        return _linear_cross_entropy_bwd(
            x, w, b, target, class_weight, lse, denom, grad_out, self.ignore_index,
            self.reduction, self.smoothing, self.softcap, self.z_loss, need_x, need_w, need_b,
            self.chunk, self.backend)

    def scale(self, g, grad_out) -> None:
        """g *= grad_out in place (the gradient-in-the-forward schedule's backward)."""
        _scale_in_place(g, grad_out)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """loss = cross_entropy(x w^T + b, target) over rows of x (N, H), by chunks (module
    docstring for the two schedules), running `ops`' steps (a LinearCEKernels). The
    gradient-in-the-forward schedule's first backward scales the gradients the forward made
    and hands them over; a second one through a retained graph recomputes them."""

    @staticmethod
    def forward(ctx, x, w, b, target, class_weight, ops: LinearCEKernels):
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_b = need_b and b is not None
        loss, lse, denom, dx, dw, db = ops.forward(x, w, b, target, class_weight, need_x,
                                                   need_w, need_b)
        in_forward = ops.in_forward and ops.reduction != "none"
        # Traced by torch.compile, the forward's gradients are saved tensors, scaled out of
        # place in the backward (no state changes between backwards that a graph could not
        # replay); eager, they are handed over once, scaled in place.
        ctx.traced = in_forward and torch.compiler.is_compiling()
        ctx.save_for_backward(x, w, b, target, class_weight, lse, denom,
                              *((dx, dw, db) if ctx.traced else ()))
        ctx.ops, ctx.need = ops, (need_x, need_w, need_b)
        ctx.grad_from_forward = (dx, dw, db) if in_forward and not ctx.traced else None
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        if torch.is_grad_enabled():       # create_graph: a gradient that raises if differentiated
            return without_double_backward("linear_cross_entropy",
                                           LinearCrossEntropyFunction.backward, ctx, grad_out)
        x, w, b, target, class_weight, lse, denom, *traced = ctx.saved_tensors
        need = ctx.need
        if traced:
            # the forward's gradients for an upstream gradient of 1, times it (in fp32, one
            # rounding, as the scale kernel; the compiler fuses each into one pass)
            return (*(g.float().mul(grad_out.float()).to(g.dtype) if n else None
                      for g, n in zip(traced, need)), None, None, None)
        grads, ctx.grad_from_forward = ctx.grad_from_forward, None
        if grads is not None:
            # made by the forward for an upstream gradient of 1: scaled in place
            grads = [g if n else None for g, n in zip(grads, need)]
            for g in grads:
                if g is not None:
                    ctx.ops.scale(g, grad_out)
        else:
            grads = [g if n else None for g, n in zip(ctx.ops.backward(
                x, w, b, target, class_weight, lse, denom, grad_out, *need), need)]
        return (*grads, None, None, None)
