"""linear_cross_entropy(hidden, weight, target): a language model's head and loss, fused.

Shapes are (tokens N, hidden H, vocabulary V) of current models' last layers: the logits
(N, V) that the composite torch.nn.functional.cross_entropy(linear(hidden, weight), target)
materialises are what the fused op never holds (one chunk at a time). Targets are uniform
random class indices, the upstream gradient 1 (the loss ends a training step), reduction
"mean"; the hidden states and the head's weight get gradients.

Compute-bound: three products of N x V x H (the logits; their gradient times the weight for
the hidden states, times the hidden states for the weight), 2 N V H FLOPs each. The
directions: pydl's triton backend makes the gradients in its forward pass (the backward scales
them), so compare fwd+bwd; its "fwd" row is the forward of a training step, not the loss alone.
"""
from __future__ import annotations

import math

import torch

from .base import Case, Suite, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

SHAPES: dict[str, tuple[Case, ...]] = {
    # Emulation (no GPU); bf16 only on a GPU (see tests/conftest.py).
    "tiny": (
        Case("tiny-n24-v1000", (24, 32, 1000), F32, "emulation check: one chunk"),
        Case("tiny-n8-v5000", (8, 16, 5000), F16,
             "emulation check: a vocabulary wider than the cross-entropy's column block"),
    ),
    "quick": (
        Case("llama3-8b", (4096, 4096, 128256), BF16,
             "Llama-3-8B head (hidden 4096, vocabulary 128256); 4096 tokens (2 x 2048)"),
        Case("llama2-7b", (8192, 4096, 32000), BF16,
             "Llama-2-7B / Mistral-7B head (hidden 4096, vocabulary 32000); 8192 tokens"),
    ),
}
SHAPES["full"] = SHAPES["quick"] + (
    Case("gemma2-2b", (8192, 2304, 256000), BF16,
         "Gemma-2-2B head (hidden 2304, vocabulary 256000); 8192 tokens"),
    Case("llama3-8b-16k", (16384, 4096, 128256), BF16,
         "Llama-3-8B head; 16384 tokens (the composite's logits alone take 4 GiB)"),
)


def _liger_fused_linear_cross_entropy():
    from liger_kernel.transformers.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyLoss,
    )
    loss = LigerFusedLinearCrossEntropyLoss()     # reduction="mean", as the other variants
    return lambda x, w, t: loss(w, x, t)


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

    def pydl_fn(self, backend):
        import pydl
        return lambda x, w, t: pydl.linear_cross_entropy(x, w, t, backend=backend)

    def torch_fn(self):
        f = torch.nn.functional
        return lambda x, w, t: f.cross_entropy(f.linear(x, w), t)

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
        return super().cpu_case(Case(case.name, (n, h, v), case.dtype, case.source),
                                max_input_bytes=1 << 62)


SUITES = [LinearCrossEntropySuite()]
