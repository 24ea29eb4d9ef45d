"""Test harness shared by every op.

- Without a CUDA device the suite runs the kernels in emulation: PYDL_INTERPRET=1 is set here,
  before anything imports pydl (and so triton or numba). With a device, kernels compile.
- Every output a launcher allocates is NaN-poisoned, so an element a kernel skips fails.
- Autotuning is off (PYDL_TUNE=0 unless set): on a GPU every new shape would otherwise time
  every candidate configuration; the tests check the default configs, and tests/test_tune.py
  forces each candidate of each tuned kernel in turn.
- `--full` enables the heavy cases (large shapes, sweeps) meant for a GPU run; `gpu` cases are
  skipped without a device; `sim_heavy` cases (slow in the simulators, their ground covered by
  lighter cases) run on a GPU, or in emulation with --full.
"""
import os
import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("PYDL_INTERPRET", "1")
os.environ.setdefault("PYDL_TUNE", "0")

import pydl  # noqa: E402, F401  (imported for its side effect: the emulation switch)
from pydl._plan import clear_all as clear_plans  # noqa: E402
from pydl.testing import poisoned_outputs  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
KERNEL_BACKENDS = ("triton", "numba")
# bf16 is broken in Triton's interpreter (the triton backend refuses it there) and NumPy has no
# bf16: the op suites test it on a GPU; tests/test_edge_cases.py tests the Numba simulator's bf16
# (it decodes the bit patterns itself) in emulation.
DTYPES = (torch.float32, torch.float16) + ((torch.bfloat16,) if HAS_CUDA else ())


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run heavy cases (large shapes, sweeps)")


def pytest_collection_modifyitems(config, items):
    skip_full = pytest.mark.skip(reason="heavy case: run with --full")
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_sim = pytest.mark.skip(
        reason="slow in emulation (covered by lighter cases): run with --full")
    for item in items:
        if "full" in item.keywords and not config.getoption("--full"):
            item.add_marker(skip_full)
        if "sim_heavy" in item.keywords and not HAS_CUDA and not config.getoption("--full"):
            item.add_marker(skip_sim)
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _poison_outputs():
    with poisoned_outputs():
        yield


@pytest.fixture(autouse=True)
def _fresh_plans():
    # Launch plans capture module-level settings (block caps, split-K limits) that tests
    # monkeypatch: each test starts and ends with none cached.
    clear_plans()
    yield
    clear_plans()


@pytest.fixture
def device():
    return DEVICE


def spy_kernels(monkeypatch, module, names, record, with_grid: bool = False) -> None:
    """Each Triton kernel `names` of `module` (kernel[grid](...) launches) replaced, for the
    test, by one that calls record(name, args, kwargs) (its tensors and scalars, its keywords:
    the constexprs; with_grid: record(name, args, kwargs, grid)) and then launches the
    kernel."""
    for name in names:
        kernel = getattr(module, name)

        class Spy:
            def __getitem__(self, grid, name=name, kernel=kernel):
                def run(*args, **kwargs):
                    record(name, args, kwargs, *((grid,) if with_grid else ()))
                    return kernel[grid](*args, **kwargs)
                return run
        monkeypatch.setattr(module, name, Spy())


def take_tma_gemm(monkeypatch, **schedule) -> tuple[list, list]:
    """The shared GEMM's tuner made to take its persistent TMA kernel wherever it is offered
    (the tuner key's last entry; on a 64 x 32 x 64 tile, as emulation's small problems clip
    the TMA tiles away) with `schedule` (FLATTEN, PER_SM), on a grid sized for two
    multiprocessors (2 or 4 programs: each loops over several tiles). Returns (whether each
    pick offered it, (grid, C_ROWS) of each launch of the TMA kernel)."""
    from pydl import _gemm
    from pydl.kernels.triton import gemm as k
    offered, grids = [], []

    def pick(key, candidates, launch, inout=()):
        offered.append(key[-1])
        assert not any(c.get("TMA") for c in candidates) or key[-1]
        return dict(candidates[0], TMA=True, BLOCK_M=64, BLOCK_N=32, BLOCK_K=64,
                    **schedule) if key[-1] else candidates[0]
    monkeypatch.setattr(_gemm.GEMM_TUNER, "pick", pick)
    monkeypatch.setattr(_gemm, "multiprocessors", lambda device: 2)
    spy_kernels(monkeypatch, k, ["gemm_tma_kernel"],
                lambda name, args, kwargs, grid: grids.append((grid, kwargs["C_ROWS"])),
                with_grid=True)
    clear_plans()
    return offered, grids


def fuzz_seeds(request, quick: int, full: int, start: int = 0):
    """The seeds a seeded fuzz test runs: PYDL_FUZZ_SEED=<seed> alone where it is set (to
    rerun the case a failure names), else `quick` from `start` (`full` with --full)."""
    one = os.environ.get("PYDL_FUZZ_SEED")
    if one is not None:
        return [int(one)]
    return range(start, start + (full if request.config.getoption("--full") else quick))


@pytest.fixture(autouse=True)
def _seed(request):
    # Fresh inputs per test, reproducible per test id.
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
