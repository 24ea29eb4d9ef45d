"""scaled_dot_product_attention: FlashAttention's benchmark sweep, training (fwd and bwd).

Shapes follow FlashAttention-2's benchmarks (Dao, 2023, section 4.1): batch x sequence = 16k
tokens, hidden size 2048, head dimension 64 or 128 (so 32 or 16 heads), sequence lengths
512, 1k, 2k, 4k, 8k and 16k, causal and not; q, k, v are (batch, heads, seq, head dim)
contiguous, self-attention (L = S), no mask, no dropout.
    quick  head dim 128 at 1k, 4k and 16k, causal and not, bf16
    full   the whole sweep: head dims 64 and 128, all six lengths, causal and not, in bf16
           and in fp16
    tiny   emulation checks: one short ragged sequence (not a multiple of the tile), fp32
           and fp16, causal and not

Variants: pydl's "triton-flash" (fused online-softmax kernels), "triton-naive" (scores
materialised: a GEMM, a softmax kernel, a GEMM), "triton-flash_hopper" (the Gluon forward
for Hopper GPUs, skipped elsewhere; its backward is triton-flash's), "triton-flash_onepass"
(the single-pass backward), "triton-flash_hopper_onepass" (the Gluon forward and the Gluon
single-pass backward, Hopper only), and the flash kernels of any other backend
pydl registers ("numba-flash"); "torch" is torch's default SDPA dispatch; "torch-flash" and
"torch-cudnn" force SDPA's FlashAttention and cuDNN backends (torch.nn.attention.sdpa_kernel),
GPU only, so the distance to the best kernel torch has is visible. Those two take fp16 and
bf16 only (skipped for fp32), and a torch build without the kernel reports "skipped".
"triton-naive" is skipped where the score matrix would reach 2^31 elements (B H L S: 8 bytes
per score across forward and backward; int32 offsets).

Compute-bound: judged against the measured bf16 matmul rate. FLOPs (FlashAttention's
convention): fwd = 4 B H L S d (two GEMMs, QK^T and PV), half of it when causal; bwd = 2.5 x
fwd (five GEMMs against the forward's two); fwd+bwd = 3.5 x fwd. Minimal bytes (s = element
size): fwd reads q, k, v and writes o; bwd reads q, k, v, o, do and writes dq, dk, dv
(the softmax statistics, 4 B H L bytes, are not counted); informational only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pydl.testing import uses_tf32

from .base import Case, Suite, Unsupported, dtype_size, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
TOKENS, HIDDEN = 16384, 2048
NAIVE_MAX_SCORES = 2 ** 31


@dataclass(frozen=True)
class AttentionCase(Case):
    """shape = (batch, heads, seq, head dim) of q, k and v (self-attention)."""
    causal: bool = False


def _label(seq: int) -> str:
    return f"{seq // 1024}k" if seq >= 1024 else str(seq)


def _case(d: int, seq: int, causal: bool, dtype=BF16, suffix="") -> AttentionCase:
    heads, batch = HIDDEN // d, TOKENS // seq
    return AttentionCase(
        f"d{d}-{_label(seq)}" + ("-causal" if causal else "") + suffix, (batch, heads, seq, d),
        dtype, f"FlashAttention-2 sweep: {TOKENS // 1024}k tokens = batch {batch} x seq {seq}, "
        f"hidden {HIDDEN} = {heads} heads x {d}" + (", causal" if causal else ""), causal=causal)


SEQS = (512, 1024, 2048, 4096, 8192, 16384)

SHAPES: dict[str, tuple[Case, ...]] = {
    # Emulation (no GPU): pydl's emulated tiles are 16 wide, so 40 spans three, one ragged.
    "tiny": (
        AttentionCase("tiny", (1, 2, 40, 16), F32,
                      "emulation check: 40 queries and keys (a ragged tile), head dim 16"),
        AttentionCase("tiny-causal", (1, 2, 40, 16), F16,
                      "emulation check: causal, ragged tile, head dim 16", causal=True),
        AttentionCase("tiny-d64-causal", (1, 2, 130, 64), F16,
                      "emulation check: causal, head dim 64 (the Gluon kernels' smallest), "
                      "two query tiles", causal=True),
    ),
    "quick": tuple(_case(128, s, c) for s in (1024, 4096, 16384) for c in (False, True)),
}
SHAPES["full"] = SHAPES["quick"] + tuple(
    _case(d, s, c) for d in (64, 128) for s in SEQS for c in (False, True)
    if not (d == 128 and s in (1024, 4096, 16384))) + tuple(
    _case(d, s, c, F16, "-fp16") for d in (64, 128) for s in SEQS for c in (False, True))


def _sdpa_backend(name: str):
    """SDPA forced onto one of torch's backends (GPU only); no kernel there -> Unsupported."""
    def fn(q, k, v, is_causal):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with sdpa_kernel(getattr(SDPBackend, name)):
            try:
                return torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                        is_causal=is_causal)
            except RuntimeError as exc:
                if "No available kernel" in str(exc):
                    raise Unsupported(f"torch's {name} SDPA backend has no kernel for this case "
                                      f"on this device and build") from exc
                raise
    return fn


class AttentionSuite(Suite):
    def __init__(self):
        super().__init__(
            op="attention", registry_op="scaled_dot_product_attention", shape_sets=SHAPES,
            bound="compute", differentiable=(0, 1, 2),
            notes="scaled_dot_product_attention(q, k, v, is_causal), q k v (B, H, L, d); "
                  "grads of q, k, v",
            algos={"triton": ("flash", "naive"), "numba": ("flash",)})

    def pydl_algos(self, backend):
        from pydl import attention
        algos = attention.ALGOS
        if isinstance(algos, dict):
            return tuple(algos.get(backend, ()))
        # a flat tuple: the triton backend's algorithms; other backends: unknown here
        return tuple(algos) if backend == "triton" else None

    def options(self, case):
        return {"is_causal": case.causal}

    def make_inputs(self, case, dtype, device, generator):
        return tuple(randn(case.shape, dtype, device, generator) for _ in range(3))

    def pydl_fn(self, backend, algo=None):
        import pydl
        return lambda q, k, v, is_causal: pydl.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal, backend=backend, algo=algo)

    def torch_fn(self):
        return lambda q, k, v, is_causal: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=is_causal)

    def torch_backends(self):
        return {"torch-flash": _sdpa_backend("FLASH_ATTENTION"),
                "torch-cudnn": _sdpa_backend("CUDNN_ATTENTION")}

    def unsupported(self, case, dtype, variant):
        b, h, seq, d = case.shape
        if variant.name in ("torch-flash", "torch-cudnn") and dtype not in (F16, BF16):
            return f"{variant.name}: torch's kernel takes fp16 and bf16 only"
        if variant.algo in ("flash_hopper", "flash_hopper_onepass"):
            # pydl's own reasons (device, dtype, head dim), asked of a one-row stand-in
            from pydl import attention_hopper
            q = torch.empty(1, 1, 1, d, dtype=dtype,
                            device="cuda" if torch.cuda.is_available() else "cpu")
            why = attention_hopper.unsupported(q, q, q, None, 0.0, 1.0)
            if why is not None:
                return f"algo={variant.algo!r}: {why}"
        if variant.algo == "naive" and b * h * seq * seq >= NAIVE_MAX_SCORES:
            return (f"the naive algorithm materialises {b}x{h}x{seq}x{seq} scores "
                    f"(>= 2^31 elements; 8 bytes each across fwd+bwd)")
        return None

    def tf32(self, dtype, device):
        return dtype == F32 and uses_tf32(device, cudnn=False)

    def reduction_length(self, case):
        return case.shape[2]

    def reduction_lengths(self, case):
        seq = case.shape[2]
        return (seq, seq, seq, seq)     # o, dq: over keys; dk, dv: over queries

    def flops(self, case, direction):
        b, h, seq, d = case.shape
        fwd = 4 * b * h * seq * seq * d // (2 if case.causal else 1)
        return {"fwd": fwd, "bwd": 5 * fwd // 2, "fwd+bwd": 7 * fwd // 2}[direction]

    def bytes(self, case, dtype, direction):
        per = case.numel * dtype_size(dtype)      # one of q, k, v, o
        return {"fwd": 4 * per, "bwd": 8 * per, "fwd+bwd": 12 * per}[direction]


SUITES = [AttentionSuite()]
