"""The device's measured peaks, the yardsticks for each case's fraction of peak.

copy_gbps:   a 1 GiB device-to-device copy (torch's copy_), counting bytes read + written.
bf16_tflops: an 8192 x 8192 x 8192 bf16 matmul (torch.mm, cuBLAS), 2 n^3 FLOPs.
Both are timed like every case (bench.timing). GPU only.
"""
from __future__ import annotations

from .timing import Step, time_step

COPY_BYTES = 2**30
MATMUL_N = 8192


def copy_gbps(nbytes: int = COPY_BYTES) -> float:
    import torch
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    t = time_step(Step(lambda i: None, lambda _: dst.copy_(src)))
    return 2 * src.nbytes / (t.median_ms * 1e-3) / 1e9


def bf16_tflops(n: int = MATMUL_N) -> float:
    import torch
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    t = time_step(Step(lambda i: None, lambda _: torch.mm(a, b)))
    return 2 * n**3 / (t.median_ms * 1e-3) / 1e12


def measure() -> dict:
    import torch
    peaks = {"copy_gbps": round(copy_gbps(), 1), "bf16_tflops": round(bf16_tflops(), 1)}
    torch.cuda.empty_cache()
    return peaks


NO_PEAKS = {"copy_gbps": None, "bf16_tflops": None}
