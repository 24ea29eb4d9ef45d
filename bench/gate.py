"""The correctness gate every variant passes before it is timed.

Each variant runs on clones of the same inputs (so a variant that writes into its input, as
Liger's cross-entropy does, cannot disturb the next), with pydl's NaN-poisoned outputs. Its
output and its gradients (for the same upstream gradient) are judged against a float64
reference: torch's op run on the same inputs converted to float64. The measure is
pydl.testing.deviation at the case dtype's tolerance (the largest error over its bound; 1 is
the edge), with the reduction length of each comparison from the suite
(`Suite.reduction_lengths`: the row length by default; a convolution's output, grad input and
grad weight sum over different lengths) and TF32's tolerance where the suite says fp32
products round to TF32 on this device (`Suite.tf32`); `scale` is set to the largest expected
magnitude when that is below 1, so small outputs (probabilities, gradients of a mean loss) are
not passed by an absolute tolerance larger than themselves. A variant is wrong when its
deviation exceeds both 1 and TORCH_SLACK times torch's own deviation at the case's dtype (the
same measure of torch's result): what torch's own rounding does at that dtype is allowed, so a
variant more accurate than torch is never wrong for differing from it (fp16 RNN weight
gradients: torch's cuDNN path rounds its gate gradients to fp16, pydl keeps them in fp32).
NaN and infinities must stand where torch has them. When the float64 reference cannot be
computed (torch has no float64 kernel for the op on the device), the variant is compared with
torch's result at the dtype's tolerance instead, and the message says so.

Statuses: "pass", "wrong" (out of tolerance, with deviation's message), "error" (raised),
"skipped" (cannot run here, with the reason: listed as skipped by the suite, GPU only, or
`Unsupported` raised by the variant for this case). Outputs above `SAMPLE_LIMIT` elements are
compared on evenly spaced rows (first and last included) after a NaN-placement check of the
whole tensor, to keep the host-side float64 comparison small on GPU-sized cases.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from pydl.testing import deviation, poisoned_outputs

from .suites.base import Suite, Unsupported, Variant

PASS, WRONG, ERROR, SKIPPED = "pass", "wrong", "error", "skipped"
_SEVERITY = {PASS: 0, SKIPPED: 1, WRONG: 2, ERROR: 3}
SAMPLE_LIMIT = 1 << 22
MESSAGE_CHARS = 600
# A variant may deviate from float64 this many times as much as torch does at the same dtype:
# two implementations that round differently at one precision differ by about this much.
TORCH_SLACK = 1.5


@dataclass
class Check:
    fwd: str
    bwd: str
    fwd_message: str | None = None
    bwd_message: str | None = None

    def status(self, direction: str) -> tuple[str, str | None]:
        """Status of a direction: fwd -> forward check; bwd -> gradient check;
        fwd+bwd -> the worse of the two."""
        if direction == "fwd":
            return self.fwd, self.fwd_message
        if direction == "bwd":
            return self.bwd, self.bwd_message
        if _SEVERITY[self.fwd] >= _SEVERITY[self.bwd]:
            return self.fwd, self.fwd_message
        return self.bwd, self.bwd_message


@dataclass
class Reference:
    out: torch.Tensor
    grads: list[torch.Tensor]
    grad_out: torch.Tensor
    # torch's op on the inputs converted to float64: the output and gradients, sampled as the
    # comparisons sample them (`_sample`), on the host; None where torch cannot run in float64
    exact: list[torch.Tensor] | None = None
    exact_error: str | None = None


def clone_inputs(inputs, differentiable, suite: Suite | None = None) -> list[torch.Tensor]:
    """Fresh leaf copies; the differentiable ones require grad (`suite.clone_inputs` when a
    suite is given: it may keep a storage layout the plain copies would lose)."""
    if suite is not None:
        return suite.clone_inputs(inputs)
    return [t.detach().clone().requires_grad_(i in differentiable and t.is_floating_point())
            for i, t in enumerate(inputs)]


def leaves(args, differentiable) -> list[torch.Tensor]:
    return [args[i] for i in differentiable]


def reference(suite: Suite, inputs, generator: torch.Generator, options: dict | None = None
              ) -> Reference:
    """torch's output and gradients on `inputs` (`options`: the case's keyword arguments), and
    the same computed in float64."""
    args = clone_inputs(inputs, suite.differentiable, suite)
    out = suite.torch_fn()(*args, **(options or {}))
    grad_out = suite.grad_output(out, generator)
    grads = torch.autograd.grad(out, leaves(args, suite.differentiable), grad_out)
    ref = Reference(out.detach(), [g.detach() for g in grads], grad_out)
    try:
        ref.exact = exact_reference(suite, inputs, grad_out, options)
    except Exception as exc:  # noqa: BLE001  (recorded: the gate falls back to torch's result)
        ref.exact_error = error_message(exc)
    return ref


def exact_reference(suite: Suite, inputs, grad_out: torch.Tensor, options: dict | None = None
                    ) -> list[torch.Tensor]:
    """torch's output and gradients with every floating-point input (and the upstream
    gradient) converted to float64, sampled like the comparisons and moved to the host."""
    wide = [t.detach().to(torch.float64) if t.is_floating_point() else t for t in inputs]
    args = clone_inputs(wide, suite.differentiable, suite)
    out = suite.torch_fn()(*args, **(options or {}))
    grads = torch.autograd.grad(out, leaves(args, suite.differentiable),
                                grad_out.to(torch.float64))
    return [_sample(t.detach())[0].cpu() for t in (out, *grads)]


def error_message(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MESSAGE_CHARS else text[:MESSAGE_CHARS] + " ..."


def _sample(t: torch.Tensor) -> tuple[torch.Tensor, str]:
    if t.numel() <= SAMPLE_LIMIT:
        return t, ""
    v = t.reshape(t.shape[0], -1) if t.dim() >= 2 else t.reshape(-1, 1)
    rows = v.shape[0]
    step = max(1, math.ceil(t.numel() / SAMPLE_LIMIT))
    idx = sorted(set(range(0, rows, step)) | {rows - 1})
    index = torch.tensor(idx, device=t.device)
    return v.index_select(0, index), f" (compared {len(idx)} evenly spaced rows of {rows})"


def _placement(a: torch.Tensor, e: torch.Tensor, name: str) -> str | None:
    """None when NaN and infinities stand where torch has them."""
    mismatch = torch.isnan(a) != torch.isnan(e)
    if bool(mismatch.any()):
        return f"{name}: NaN where torch has none, or the reverse ({int(mismatch.sum())} elements)"
    inf = torch.isinf(e)
    if bool((a[inf] != e[inf]).any()):
        return f"{name}: infinities differ from torch's"
    return None


def compare(actual, expected: torch.Tensor, dtype: torch.dtype, reduction: int,
            name: str, tf32: bool = False, exact: torch.Tensor | None = None) -> str | None:
    """None when `actual` passes, else why not. `expected`: torch's result at `dtype`;
    `exact`: the float64 reference, sampled (`_sample`), or None to judge against `expected`."""
    if not isinstance(actual, torch.Tensor):
        return f"{name}: expected a tensor, got {type(actual).__name__}"
    if tuple(actual.shape) != tuple(expected.shape):
        return f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    a, e = actual.detach(), expected.detach()
    if a.numel() > SAMPLE_LIMIT:
        wrong = _placement(a, e, name)
        if wrong:
            return wrong
    a, note = _sample(a)
    e, _ = _sample(e)
    if exact is None:
        return _judge(a, e, None, dtype, reduction, name, tf32, note)
    wrong = _placement(a, e, name)
    if wrong:
        return wrong + note
    a, e = a.to("cpu", torch.float64), e.to("cpu", torch.float64)
    live = torch.isfinite(e) & torch.isfinite(exact)     # placement is checked: judge values
    return _judge(a[live], exact[live], e[live], dtype, reduction, name, tf32, note)


def _judge(a, exact, theirs, dtype, reduction, name, tf32, note) -> str | None:
    """Deviation of `a` from `exact`, allowed up to TORCH_SLACK times torch's (`theirs`; None:
    `exact` is torch's own result, at the dtype's tolerance)."""
    finite = exact[torch.isfinite(exact)]
    largest = float(finite.abs().max()) if finite.numel() else 0.0
    kw = dict(reduction=reduction, tf32=tf32, scale=largest if 0.0 < largest < 1.0 else None)
    ours = deviation(a, exact, dtype, name=name, **kw)
    if theirs is None:
        return None if ours.message is None else ours.message + note
    torch_ratio = deviation(theirs, exact, dtype, name=name, **kw).ratio
    allowed = max(1.0, TORCH_SLACK * torch_ratio)
    if ours.ratio <= allowed:
        return None
    return (f"{name}: {ours.ratio:.2f}x the tolerance from float64, torch {torch_ratio:.2f}x "
            f"(allowed {allowed:.2f}x): {ours.message}{note}")


def gpu_only_reason(variant: Variant) -> str:
    if variant.kind == "peer":
        return "a peer implementation: run on a GPU only, not in emulation"
    return f"{variant.name}: one of torch's CUDA kernels, run on a GPU only, not in emulation"


def check(variant: Variant, suite: Suite, dtype: torch.dtype, reduction, inputs,
          ref: Reference, device: torch.device, options: dict | None = None,
          unsupported: str | None = None) -> Check:
    """Run `variant` once forward and backward and compare with the reference.

    reduction: one length for every comparison, or one for the output then one per
    differentiable input's gradient (Suite.reduction_lengths). options: the case's keyword
    arguments. unsupported: the suite's reason this variant cannot run the case, if any."""
    if variant.skip:
        return Check(SKIPPED, SKIPPED, variant.skip, variant.skip)
    if variant.gpu_only and device.type != "cuda":
        reason = gpu_only_reason(variant)
        return Check(SKIPPED, SKIPPED, reason, reason)
    if unsupported:
        return Check(SKIPPED, SKIPPED, unsupported, unsupported)
    n = 1 + len(suite.differentiable)
    lengths = tuple(reduction) if isinstance(reduction, (tuple, list)) else (reduction,) * n
    if len(lengths) != n:
        raise ValueError(f"{suite.op}: {len(lengths)} reduction lengths for {n} comparisons")
    tf32 = suite.tf32(dtype, device)
    with poisoned_outputs():
        args = clone_inputs(inputs, suite.differentiable, suite)
        try:
            out = variant.fn(*args, **(options or {}))
        except Unsupported as exc:
            return Check(SKIPPED, SKIPPED, str(exc), str(exc))
        except Exception as exc:  # noqa: BLE001  (any failure is recorded, never raised)
            msg = "forward raised " + error_message(exc)
            return Check(ERROR, ERROR, msg, msg)
        exact = ref.exact or [None] * n
        wrong = compare(out, ref.out, dtype, lengths[0], "output", tf32, exact[0])
        fwd = (WRONG, _fallback(wrong, ref)) if wrong else (PASS, None)
        try:
            grads = torch.autograd.grad(out, leaves(args, suite.differentiable), ref.grad_out)
        except Unsupported as exc:
            return Check(fwd[0], SKIPPED, fwd[1], str(exc))
        except Exception as exc:  # noqa: BLE001
            return Check(fwd[0], ERROR, fwd[1], "backward raised " + error_message(exc))
    for i, (g, r) in enumerate(zip(grads, ref.grads)):
        wrong = compare(g, r, dtype, lengths[1 + i], f"grad of input {suite.differentiable[i]}",
                        tf32, exact[1 + i])
        if wrong:
            return Check(fwd[0], WRONG, fwd[1], _fallback(wrong, ref))
    return Check(fwd[0], PASS, fwd[1], None)


def _fallback(message: str, ref: Reference) -> str:
    if ref.exact is None and ref.exact_error:
        return f"{message} [judged against torch's result: no float64 reference: {ref.exact_error}]"
    return message
