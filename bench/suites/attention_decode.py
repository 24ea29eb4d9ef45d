"""scaled_dot_product_attention at decoding: a query per head against a long key/value cache.

A language model generating text runs attention with one new query per sequence and head
against every cached key: q (B, H, 1, d), k and v (B, H, S, d), no mask (the cache holds only
the past), no dropout. The work is a read of the cache, so the case is memory-bound, and one
query tile per (batch, head) leaves most of the GPU idle unless the keys are split over
programs (pydl's split forward, FlashDecoding's scheme: kernels/triton/attention.py
attention_fwd_split).
    quick  2 sequences x 32 heads (Llama-2-7B's) against 8k and 32k keys, head dim 128, bf16
    full   and a batch of 16 at 4k (already 512 query tiles: no split), fp16 as well
    tiny   emulation checks: one query against 1100 and 1500 keys (split), fp32 and fp16

Directions: fwd is what decoding runs; bwd and fwd+bwd are measured as for every suite (the
backward is the flash one on the forward's log-sum-exp) and mean little here. Minimal bytes:
q, k, v read and o written once; FLOPs 4 B H S d.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pydl.testing import uses_tf32

from .base import Case, Suite, dtype_size, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16


@dataclass(frozen=True)
class DecodeCase(Case):
    """shape = (batch, heads, keys, head dim); one query per (batch, head)."""


def _case(batch: int, heads: int, keys: int, dtype=BF16, suffix: str = "") -> DecodeCase:
    return DecodeCase(f"b{batch}-h{heads}-{keys // 1024}k" + suffix, (batch, heads, keys, 128),
                      dtype, f"decoding: {batch} sequences x {heads} heads (head dim 128), one "
                      f"new query each against {keys} cached keys")


SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        DecodeCase("tiny-decode", (2, 2, 1100, 16), F32,
                   "emulation check: one query, 1100 keys (split over programs)"),
        DecodeCase("tiny-decode-fp16", (1, 3, 1500, 32), F16,
                   "emulation check: one query, 1500 keys (split; a ragged last tile)"),
    ),
    "quick": (_case(2, 32, 8192), _case(2, 32, 32768)),
}
SHAPES["full"] = SHAPES["quick"] + (_case(16, 32, 4096), _case(2, 32, 8192, F16, "-fp16"),
                                    _case(1, 8, 131072))


class AttentionDecodeSuite(Suite):
    def __init__(self):
        super().__init__(
            op="attention_decode", registry_op="scaled_dot_product_attention",
            shape_sets=SHAPES, bound="memory", differentiable=(0, 1, 2),
            notes="scaled_dot_product_attention(q (B, H, 1, d), k, v (B, H, S, d))",
            algos={"triton": ("flash",), "numba": ("flash",)})

    def make_inputs(self, case, dtype, device, generator):
        b, h, s, d = case.shape
        return (randn((b, h, 1, d), dtype, device, generator),
                randn((b, h, s, d), dtype, device, generator),
                randn((b, h, s, d), dtype, device, generator))

    def pydl_fn(self, backend, algo=None):
        import pydl
        return lambda q, k, v: pydl.scaled_dot_product_attention(q, k, v, backend=backend,
                                                                 algo=algo)

    def torch_fn(self):
        return lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v)

    def tf32(self, dtype, device):
        return dtype == F32 and uses_tf32(device, cudnn=False)

    def reduction_lengths(self, case):
        s = case.shape[2]
        return (s, s, 1, 1)     # o and dq sum over the keys; dk, dv over one query

    def flops(self, case, direction):
        b, h, s, d = case.shape
        fwd = 4 * b * h * s * d
        return {"fwd": fwd, "bwd": 5 * fwd // 2, "fwd+bwd": 7 * fwd // 2}[direction]

    def bytes(self, case, dtype, direction):
        b, h, s, d = case.shape
        kv = 2 * b * h * s * d * dtype_size(dtype)
        qo = 2 * b * h * d * dtype_size(dtype)
        return {"fwd": kv + qo, "bwd": 2 * kv + 3 * qo, "fwd+bwd": 2 * kv + 3 * qo}[direction]


SUITES = [AttentionDecodeSuite()]
