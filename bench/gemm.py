"""pydl's shared GEMM against cuBLAS (GPU only): `python -m bench gemm`.

Every large product pydl runs goes through one launcher (pydl/_gemm.py): a language model
head's three per chunk (`linear_cross_entropy`), the 1x1 convolutions, the recurrent layers'
input projections. The op benchmarks time those products inside their ops; this times the
GEMM alone at the same shapes and operand layouts, every tuning candidate of the kernel (the
pointer kernel's tiles and the persistent TMA kernel's, `TMA=True`: bench/TUNING.md v42) by
the same timer as torch.matmul (cuBLAS) on the same tensors, so each row says how far the
tuner's best is from cuBLAS and which kernel got there. Each candidate's result is also
checked against cuBLAS's (`max_err`: the largest difference over the largest magnitude of
cuBLAS's product; a wrong kernel shows there before it shows in an op).

Layouts: "nt" is a @ b^T with b stored (n, k) (a weight as torch.nn.Linear keeps it), "tn"
a^T @ b with a stored (k, m) (a gradient's rows read as columns). Times: do_bench medians
(ms); TFLOP/s = 2 m n k / time.
"""
from __future__ import annotations

import json

from .timing import case_command

# name: (m, n, k, layout of (a, b): "n" as stored, "t" transposed)
CASES = {
    "4096^3": (4096, 4096, 4096, "nn"),
    "llama3-8b-logits": (4096, 128256, 4096, "nt"),     # x W^T, W (vocab, hidden)
    "llama3-8b-dx": (4096, 4096, 128256, "nn"),         # G W
    "llama3-8b-dw": (128256, 4096, 4096, "tn"),         # G^T x
    "r50-1x1-64-256": (100352, 256, 64, "nt"),          # ResNet-50 layer1 1x1 forward, batch 32
    "r50-1x1-256-64": (100352, 64, 256, "nt"),
    "lstm-h1024-proj": (800, 4096, 1024, "nt"),         # 25 steps x 32 rows against W_ih
}
DEFAULT_CASES = ("4096^3", "llama3-8b-logits", "llama3-8b-dx", "llama3-8b-dw",
                 "r50-1x1-64-256", "lstm-h1024-proj")


def operands(m: int, n: int, k: int, layout: str, dtype, device, generator):
    """(a, b, trans_a, trans_b): a stored (k, m) where layout[0] is "t", else (m, k); b
    stored (n, k) where layout[1] is "t", else (k, n); random normal values."""
    import torch

    def make(rows, cols):
        return torch.randn(rows, cols, generator=generator, device=device).to(dtype)
    trans_a, trans_b = layout[0] == "t", layout[1] == "t"
    return (make(k, m) if trans_a else make(m, k), make(n, k) if trans_b else make(k, n),
            trans_a, trans_b)


def measure(name: str, m: int, n: int, k: int, layout: str, ms, device: str = "cuda",
            dtype=None) -> dict:
    """The row of one case; `ms(fn)` times a thunk in ms. Every candidate is timed by the
    GEMM's tuner with `ms` as its clock (its choice: the fastest), cuBLAS by `ms` too."""
    import torch

    from pydl import _gemm, _tune
    from pydl._plan import clear_all
    dtype = dtype or torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    a, b, trans_a, trans_b = operands(m, n, k, layout, dtype, device, gen)
    op_a, op_b = (a.t() if trans_a else a), (b.t() if trans_b else b)
    want = torch.matmul(op_a, op_b).float()
    scale = float(want.abs().max()) or 1.0
    out = torch.empty(m, n, dtype=dtype, device=device)
    results = []

    def timed(fn, cfg):
        t = ms(fn)
        results.append((cfg, float((out.float() - want).abs().max()) / scale))
        return t
    _tune.reset()
    clear_all()
    tuner = _gemm.GEMM_TUNER
    original = tuner.bench
    tuner.bench = timed
    try:
        _gemm.gemm(a, b, out, trans_a=trans_a, trans_b=trans_b)
    finally:
        tuner.bench = original
    trials = next(iter(tuner.trials.values()), [])
    errors = {json.dumps(c, sort_keys=True): e for c, e in results}
    flop = 2.0 * m * n * k
    cublas = ms(lambda: torch.matmul(op_a, op_b))
    rows = [{"config": c, "ms": t, "tflops": flop / t / 1e9 if t else None,
             "vs_cublas": cublas / t if t else None,
             "max_err": errors.get(json.dumps(c, sort_keys=True)), "error": err}
            for c, t, err in trials]
    chosen = next(iter(tuner.chosen.values()), None)
    return {"case": name, "m": m, "n": n, "k": k, "layout": layout, "dtype": str(dtype),
            "cublas_ms": cublas, "cublas_tflops": flop / cublas / 1e9, "chosen": chosen,
            "candidates": rows}


def _print(row: dict) -> None:
    print(f"{row['case']:18} {row['m']}x{row['n']}x{row['k']} {row['layout']}  cuBLAS "
          f"{row['cublas_ms']:.3f} ms ({row['cublas_tflops']:.0f} TFLOP/s)")
    for i, r in enumerate(row["candidates"]):
        c = r["config"]
        name = (f"{'TMA ' if c.get('TMA') else ''}M{c.get('BLOCK_M')} N{c.get('BLOCK_N')} "
                f"K{c.get('BLOCK_K')} w{c.get('num_warps')} s{c.get('num_stages')}"
                + (" 2/SM per-tile" if c.get("FLATTEN") is False else "")
                + (" (default)" if i == 0 else ""))
        mark = "*" if c == row["chosen"] else " "
        if r["ms"] is None:
            print(f"  {mark} {name:42} {r['error'][:90]}")
            continue
        print(f"  {mark} {name:42} {r['ms']:.3f} ms {r['tflops']:6.0f} TFLOP/s "
              f"{r['vs_cublas']:.2f}x cuBLAS  max_err {r['max_err']:.1e}")


def main(argv: list[str] | None = None) -> int:
    def arguments(p):
        p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")

    def case(name, args, ms):
        import torch
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        return measure(name, *CASES[name], ms, dtype=dtype)
    return case_command("gemm", __doc__.split("\n\n")[0], CASES, DEFAULT_CASES, argv,
                        arguments, case, _print)
