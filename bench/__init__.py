"""bench: pydl's benchmark suite, run as `python -m bench`.

    python -m bench [OPS ...] [--variants V ...] [--shapes tiny|quick|full] [--dtype D ...]
                    [--direction fwd|bwd|fwd+bwd|all] [--out DIR] [--no-plots] [--no-progress]
    python -m bench list [OPS ...]        # op families, shape sets (with sources), variants
    python -m bench compare A.json B.json # per-row time ratio B/A of two runs; with
                                          # --fail-above R, status 1 when a row's B/A > R
    python -m bench report [FILE]         # markdown table of FILE or of the newest GPU run

OPS are suite names (softmax, log_softmax, cross_entropy, conv2d, max_pool2d, avg_pool2d,
adaptive_avg_pool2d, attention, lstm; default: all). Variants are pydl's backends ("triton",
"numba"), one per algorithm where an op has several ("triton-implicit", "triton-im2col",
"numba-im2col"; "triton-flash", "triton-naive"), "torch" (the ATen/cuDNN baseline), torch's
other kernels for the op on a GPU ("torch-cudnn", "torch-flash" for attention) and peers that
are installed (e.g. "liger"); --variants triton selects every "triton-..." variant. Every
variant first passes a correctness gate against "torch" on the same inputs
(pydl.testing.assert_close); a wrong or failing variant is recorded, never timed.

With a CUDA device: the device's copy bandwidth and bf16 matmul rate are measured first, then
each case is timed per direction (median of many runs, CUDA events, inputs rotated to defeat
L2), with its peak extra memory; results go to bench/results/<time>_<device>.json (or --out)
with one PNG plot per op. Without one: every variant runs once on tiny shapes in emulation
(PYDL_INTERPRET=1) as a correctness check, no times are reported, and the newest recorded GPU
results are shown. The exit status is 1 when any variant is wrong or raises.

Layout: cli (arguments, printing), environment (device mode, versions), suites/ (one module
per op family: shapes with sources, variants, FLOP/byte counts, inputs), gate (correctness),
runner (cases -> rows; the fwd/bwd steps shared with pytest), timing, peaks, schema (JSON),
tables (text/markdown, compare, report), plots. `pytest bench/` runs the same cases through
pytest-benchmark. bench imports pydl; pydl never imports bench.
"""
