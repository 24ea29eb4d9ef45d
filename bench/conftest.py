"""pytest setup for `pytest bench/`: emulation without a GPU, decided before pydl is imported.

BENCH_SHAPES=quick|full|tiny picks the shape set on a GPU (default quick); without one the
tiny set runs in emulation, once per case, grouped as "EMULATION, not performance".
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("PYDL_INTERPRET", "1")  # pydl then switches both simulators on


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "emulation: run in emulation (PYDL_INTERPRET=1); its times are not performance")
    config.addinivalue_line("filterwarnings", r"ignore::RuntimeWarning:triton\.")
