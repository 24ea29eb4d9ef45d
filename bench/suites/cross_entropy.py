"""cross_entropy(logits, target) with reduction="mean": the loss at an LLM's vocabulary.

Shapes are (tokens, vocabulary) at the vocabulary sizes of current tokenizers: 32k
(Llama-2, Mistral-7B: 32000), 128k (Llama-3: 128256) and 256k (Gemma: 256000), plus the
round sizes 32768 / 131072 / 262144 in the quick set. Targets are uniform random class
indices; the upstream gradient is 1 (the loss is the last node of a training step). One
case caps the logits as Gemma-2 does (softcap 30: 30 tanh(logits / 30), pydl's and
Liger-Kernel's `softcap`; torch's variant is the composite a model runs: the capped logits
materialised, then the loss), every variant with it.

Memory-bound: judged against the measured copy bandwidth. Minimal bytes per direction
(s = element size of the logits, N tokens, C classes, int64 targets):
    fwd      read logits and targets               N C s + 8 N
    bwd      read logits and targets, write grad   2 N C s + 8 N
    fwd+bwd  the same: one pass can write the gradient while computing the loss (as Liger
             does), so the minimum is               2 N C s + 8 N
FLOPs are approximate elementwise counts: forward max, subtract, exp, sum = 4 per element;
backward exp, subtract, scale = 3 per element.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import Case, Suite, dtype_size, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class CECase(Case):
    """shape = (tokens, vocabulary); softcap: the logits capped as s tanh(. / s)."""
    softcap: float | None = None


SHAPES: dict[str, tuple[Case, ...]] = {
    # Emulation (no GPU); bf16 only on a GPU (see tests/conftest.py).
    "tiny": (
        Case("tiny-1k", (8, 1000), F32, "emulation check: one column block"),
        Case("tiny-5k", (4, 5000), F16,
             "emulation check: vocabulary wider than pydl's 4096-column block (online path)"),
        CECase("tiny-cap-1k", (8, 1000), F32, "emulation check: logits capped (softcap 2)",
               softcap=2.0),
    ),
    "quick": (
        Case("v32k", (8192, 32768), BF16,
             "32k vocabulary (round size); 8192 tokens (batch 4 x sequence 2048)"),
        Case("v128k", (4096, 131072), F32,
             "128k vocabulary (round size), fp32 logits; 4096 tokens (batch 2 x sequence 2048)"),
        Case("v256k", (2048, 262144), BF16,
             "256k vocabulary (round size); 2048 tokens (batch 1 x sequence 2048)"),
        CECase("gemma2-256000-cap30", (4096, 256000), BF16,
               "Gemma-2 vocabulary 256000, final_logit_softcapping 30; 4096 tokens",
               softcap=30.0),
    ),
}
SHAPES["full"] = SHAPES["quick"] + (
    Case("llama2-32000", (8192, 32000), BF16,
         "Llama-2 / Mistral-7B vocabulary 32000; 8192 tokens (batch 2 x sequence 4096)"),
    Case("llama3-128256", (8192, 128256), BF16,
         "Llama-3 vocabulary 128256; 8192 tokens (one 8k-context sequence)"),
    Case("llama3-128256-fp32", (4096, 128256), F32,
         "Llama-3 vocabulary 128256, fp32 logits; 4096 tokens"),
    Case("gemma-256000", (4096, 256000), BF16, "Gemma vocabulary 256000; 4096 tokens"),
)

FWD_FLOPS, BWD_FLOPS = 4, 3


def _liger_cross_entropy():
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    losses = {}         # one module per softcap; reduction="mean", as the other variants

    def run(x, t, softcap=None):
        loss = losses.get(softcap)
        if loss is None:
            loss = losses[softcap] = LigerCrossEntropyLoss(softcap=softcap)
        return loss(x, t)
    return run


class CrossEntropySuite(Suite):
    def __init__(self):
        super().__init__(
            op="cross_entropy", registry_op="cross_entropy", shape_sets=SHAPES, bound="memory",
            differentiable=(0,), notes="cross_entropy(logits (N, C), target (N,)), mean",
            peers={"liger": _liger_cross_entropy})

    def make_inputs(self, case, dtype, device, generator):
        n, c = case.shape
        logits = randn((n, c), dtype, device, generator)
        target = torch.randint(0, c, (n,), device=device, generator=generator)
        return logits, target

    def options(self, case):
        return {"softcap": case.softcap} if getattr(case, "softcap", None) else {}

    def pydl_fn(self, backend):
        import pydl
        return lambda x, t, softcap=None: pydl.cross_entropy(x, t, softcap=softcap,
                                                             backend=backend)

    def torch_fn(self):
        def composite(x, t, softcap=None):
            if softcap:
                x = softcap * torch.tanh(x / softcap)
            return torch.nn.functional.cross_entropy(x, t)
        return composite

    def grad_output(self, out, generator):
        return torch.ones_like(out)

    def flops(self, case, direction):
        per = {"fwd": FWD_FLOPS, "bwd": BWD_FLOPS, "fwd+bwd": FWD_FLOPS + BWD_FLOPS}[direction]
        return per * case.numel

    def bytes(self, case, dtype, direction):
        n, c = case.shape
        passes = 1 if direction == "fwd" else 2
        return passes * n * c * dtype_size(dtype) + 8 * n


# Class-probability ("soft") targets: a classifier trained with mixup / CutMix (the ImageNet
# recipes of torchvision and timm give CrossEntropyLoss the mixed one-hot targets) and
# distillation against a teacher's probabilities at an LLM's vocabulary.
SOFT_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        Case("tiny-soft-1k", (8, 1000), F32, "emulation check: soft targets, one column block"),
        Case("tiny-soft-5k", (4, 5000), F16,
             "emulation check: soft targets wider than pydl's 4096-column block"),
    ),
    "quick": (
        Case("imagenet-mixup", (256, 1000), BF16,
             "ImageNet classifier head, mixup / CutMix targets; batch 256 (host-bound)"),
        Case("distill-v32k", (8192, 32768), BF16,
             "distillation at a 32k vocabulary, the teacher's probabilities; 8192 tokens"),
    ),
}
SOFT_SHAPES["full"] = SOFT_SHAPES["quick"] + (
    Case("imagenet-mixup-1024", (1024, 1000), BF16, "ImageNet head, mixup targets; batch 1024"),
    Case("distill-v128k", (4096, 131072), BF16,
         "distillation at a 128k vocabulary (Llama-3 size, round); 4096 tokens"),
)
SOFT_FWD_FLOPS, SOFT_BWD_FLOPS = 6, 4


class SoftCrossEntropySuite(CrossEntropySuite):
    """cross_entropy(logits, probabilities) with reduction="mean": pydl's class-probability
    kernels against torch's (log_softmax and a product). Targets are rows of a softmax in the
    logits' dtype, fixed (no gradient: a mixed label or a detached teacher). Minimal bytes
    (s = element size, targets of the logits' dtype): forward reads both, N C 2s; backward
    and fwd+bwd also write the gradient, N C 3s. Liger-Kernel's loss takes class indices
    only: no peer."""

    def __init__(self):
        Suite.__init__(
            self, op="cross_entropy_soft", registry_op="cross_entropy", shape_sets=SOFT_SHAPES,
            bound="memory", differentiable=(0,),
            notes="cross_entropy(logits (N, C), probabilities (N, C)), mean")

    def make_inputs(self, case, dtype, device, generator):
        n, c = case.shape
        logits = randn((n, c), dtype, device, generator)
        target = torch.softmax(randn((n, c), torch.float32, device, generator), 1).to(dtype)
        return logits, target

    def flops(self, case, direction):
        per = {"fwd": SOFT_FWD_FLOPS, "bwd": SOFT_BWD_FLOPS,
               "fwd+bwd": SOFT_FWD_FLOPS + SOFT_BWD_FLOPS}[direction]
        return per * case.numel

    def bytes(self, case, dtype, direction):
        n, c = case.shape
        return (2 if direction == "fwd" else 3) * n * c * dtype_size(dtype)


SUITES = [CrossEntropySuite(), SoftCrossEntropySuite()]
