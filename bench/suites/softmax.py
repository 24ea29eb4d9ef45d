"""softmax and log_softmax over the last dim: rows as LLMs produce them.

Memory-bound: judged against the measured copy bandwidth. Minimal bytes per direction
(s = element size, N x C = rows x row length):
    fwd      read x, write y                       2 N C s
    bwd      read y and dy, write dx               3 N C s
    fwd+bwd  the two passes above (the caller's code sits between them)   5 N C s
FLOPs are approximate elementwise operation counts (an exp counts as one): forward
max, subtract, exp, sum, scale = 5 per element; backward 4 per element
(softmax: dx = y * (dy - sum(y * dy)); log_softmax: dx = dy - exp(y) * sum(dy)).
"""
from __future__ import annotations

import torch

from .base import Case, Suite, dtype_size, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16

SHAPES: dict[str, tuple[Case, ...]] = {
    # Emulation (no GPU): small enough for the Triton interpreter and Numba's simulator.
    # bf16 is left to the GPU sets (tests/conftest.py: Triton's interpreter mishandles bf16).
    "tiny": (
        Case("tiny-row", (8, 100), F32, "emulation check: one column block, ragged width"),
        Case("tiny-wide", (4, 5000), F16,
             "emulation check: rows wider than pydl's 4096-column block (online max/sum path)"),
    ),
    "quick": (
        Case("attn-2k", (32 * 2048, 2048), BF16,
             "scores of eager (unfused) attention: Llama-2-7B's 32 heads x 2048 queries, "
             "key length 2048 (batch 1)"),
        Case("vocab-32k", (4096, 32000), BF16,
             "sampling softmax over LLM logits: Llama-2 vocabulary of 32000, 4096 tokens"),
        Case("vocab-128k", (2048, 128256), F32,
             "sampling softmax over Llama-3 logits (vocabulary 128256) in fp32, 2048 tokens"),
        Case("router-64", (16384, 64), F32,
             "MoE router: softmax over 64 experts (OLMoE-1B-7B), 16384 tokens; 4 MB, so "
             "inputs are rotated to exceed L2"),
    ),
}
SHAPES["full"] = SHAPES["quick"] + (
    Case("attn-4k", (32 * 4096, 4096), F16,
         "eager attention scores at 4k context: 32 heads x 4096 queries x 4096 keys"),
    Case("vocab-256k", (1024, 256000), BF16,
         "softmax over Gemma logits (vocabulary 256000), 1024 tokens"),
    Case("router-8", (65536, 8), F32,
         "MoE router: softmax over Mixtral-8x7B's 8 experts, 65536 tokens (tiny rows)"),
)

FWD_FLOPS, BWD_FLOPS = 5, 4
BYTES_PER_ELEMENT = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}   # times the element size


def _liger_softmax():
    from liger_kernel.ops.softmax import LigerSoftmaxFunction
    return lambda x: LigerSoftmaxFunction.apply(x)


class SoftmaxSuite(Suite):
    def __init__(self, log: bool):
        self.log = log
        name = "log_softmax" if log else "softmax"
        super().__init__(
            op=name, registry_op="softmax", shape_sets=SHAPES, bound="memory",
            notes=f"{name}(x, dim=-1) on a contiguous (rows, C) tensor",
            peers={} if log else {"liger": _liger_softmax})

    def make_inputs(self, case, dtype, device, generator):
        return (randn(case.shape, dtype, device, generator),)

    def pydl_fn(self, backend):
        import pydl
        f = pydl.log_softmax if self.log else pydl.softmax
        return lambda x: f(x, -1, backend=backend)

    def torch_fn(self):
        f = torch.log_softmax if self.log else torch.softmax
        return lambda x: f(x, -1)

    def flops(self, case, direction):
        per = {"fwd": FWD_FLOPS, "bwd": BWD_FLOPS, "fwd+bwd": FWD_FLOPS + BWD_FLOPS}[direction]
        return per * case.numel

    def bytes(self, case, dtype, direction):
        return BYTES_PER_ELEMENT[direction] * case.numel * dtype_size(dtype)


SUITES = [SoftmaxSuite(log=False), SoftmaxSuite(log=True)]
