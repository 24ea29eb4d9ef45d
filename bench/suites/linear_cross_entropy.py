"""linear_cross_entropy(hidden, weight, target): a language model's head and loss, fused.

Shapes are (tokens N, hidden H, vocabulary V) of current models' last layers: the logits
(N, V) that the composite torch.nn.functional.cross_entropy(linear(hidden, weight), target)
materialises are what the fused op never holds (one chunk at a time). Targets are uniform
random class indices, the upstream gradient 1 (the loss ends a training step), reduction
"mean"; the hidden states and the head's weight get gradients. Gemma-2's head caps its logits
(softcap 30: 30 tanh(logits / 30)), every variant with it.

Compute-bound: three products of N x V x H (the logits; their gradient times the weight for
the hidden states, times the hidden states for the weight), 2 N V H FLOPs each. The
directions: pydl's triton backend makes the gradients in its forward pass (the backward scales
them), so compare fwd+bwd; its "fwd" row is the forward of a training step, not the loss alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Case, Suite, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

@dataclass(frozen=True)
class LinearCECase(Case):
    """shape = (tokens, hidden, vocabulary); softcap: the logits capped as s tanh(. / s)."""
    softcap: float | None = None


SHAPES: dict[str, tuple[Case, ...]] = {
    # Emulation (no GPU); bf16 only on a GPU (see tests/conftest.py).
    "tiny": (
        LinearCECase("tiny-n24-v1000", (24, 32, 1000), F32, "emulation check: one chunk"),
        LinearCECase("tiny-n8-v5000", (8, 16, 5000), F16,
                     "emulation check: a vocabulary wider than the cross-entropy's column "
                     "block", softcap=2.0),
    ),
    "quick": (
        LinearCECase("llama3-8b", (4096, 4096, 128256), BF16,
                     "Llama-3-8B head (hidden 4096, vocabulary 128256); 4096 tokens (2 x 2048)"),
        LinearCECase("llama2-7b", (8192, 4096, 32000), BF16,
                     "Llama-2-7B / Mistral-7B head (hidden 4096, vocabulary 32000); 8192 "
                     "tokens"),
        LinearCECase("gemma2-2b", (8192, 2304, 256000), BF16,
                     "Gemma-2-2B head (hidden 2304, vocabulary 256000, final_logit_softcapping "
                     "30); 8192 tokens", softcap=30.0),
    ),
}
SHAPES["full"] = SHAPES["quick"] + (
    LinearCECase("llama3-8b-16k", (16384, 4096, 128256), BF16,
                 "Llama-3-8B head; 16384 tokens (the composite's logits alone take 4 GiB)"),
)


def _liger_fused_linear_cross_entropy():
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )
    losses = {}         # one module per softcap; reduction="mean", as the other variants

    def run(x, w, t, softcap=None):
        loss = losses.get(softcap)
        if loss is None:
            loss = losses[softcap] = LigerFusedLinearCrossEntropyLoss(softcap=softcap)
        return loss(w, x, t)
    return run


class LinearCrossEntropySuite(Suite):
    def __init__(self):
        super().__init__(
            op="linear_cross_entropy", registry_op="linear_cross_entropy", shape_sets=SHAPES,
            bound="compute", differentiable=(0, 1),
            notes="cross_entropy(hidden (N, H) @ weight (V, H)^T, target (N,)), mean",
            peers={"liger": _liger_fused_linear_cross_entropy})

    def make_inputs(self, case, dtype, device, generator):
        n, h, v = case.shape
        hidden = randn((n, h), dtype, device, generator)
        weight = randn((v, h), dtype, device, generator, scale=h ** -0.5)
        target = torch.randint(0, v, (n,), device=device, generator=generator)
        return hidden, weight, target

    def options(self, case):
        return {"softcap": case.softcap} if case.softcap else {}

    def pydl_fn(self, backend):
        import pydl
        return lambda x, w, t, softcap=None: pydl.linear_cross_entropy(
            x, w, t, softcap=softcap, backend=backend)

    def torch_fn(self):
        f = torch.nn.functional

        def composite(x, w, t, softcap=None):
            logits = f.linear(x, w)
            if softcap:
                logits = softcap * torch.tanh(logits / softcap)
            return f.cross_entropy(logits, t)
        return composite

    def grad_output(self, out, generator):
        return torch.ones_like(out)

    def tf32(self, dtype, device):
        return dtype == F32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32

    def flops(self, case, direction):
        per = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[direction]
        return per * 2 * math.prod(case.shape)

    def reduction_lengths(self, case):
        n, h, v = case.shape
        # the loss sums N V terms of H-long products; dx sums V terms, dw N terms
        return (n * v, v, n)

    def cpu_case(self, case, max_input_bytes):
        """Tokens and vocabulary halved (the hidden size kept) until the hidden states and
        the weight take at most max_input_bytes in fp32."""
        n, h, v = case.shape
        while (n + v) * h * 4 > max_input_bytes and (n > 1 or v > 1):
            n, v = max(1, n // 2), max(1, v // 2)
        return super().cpu_case(LinearCECase(case.name, (n, h, v), case.dtype, case.source,
                                             case.softcap), max_input_bytes=1 << 62)


SUITES = [LinearCrossEntropySuite()]
