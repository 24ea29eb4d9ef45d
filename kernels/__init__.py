"""pydl.kernels: the GPU kernels and nothing else (no autograd, no argument parsing).

`triton/` and `numba/` hold one module per op family with the same names. Nothing here reads
environment variables: emulation is switched on by `pydl` (PYDL_INTERPRET) before either
framework is imported.
"""
