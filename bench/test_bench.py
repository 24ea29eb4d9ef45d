"""The benchmark cases through pytest-benchmark: `pytest bench/` (see bench/conftest.py).

Each test is one (op, case, variant, direction). It first passes the same correctness gate as
`python -m bench` (wrong or error: the test fails; cannot run here: skipped), then times the
same step (bench.runner.make_step) with pytest-benchmark. On a GPU the timer synchronises the
device before each reading, so a round covers the GPU work of `run` only; the untimed setup
(input rotation, the forward of a backward-only step) is waited for before the clock starts.
Without a GPU the tiny cases run once each in emulation, in groups named "EMULATION, not
performance" and marked `emulation`: those times are the emulator's, not the kernels'.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

import pydl
from bench import gate, runner, timing
from bench.suites import DIRECTIONS, all_suites, dtype_name

GPU = torch.cuda.is_available() and not pydl.INTERPRET
if not GPU and not pydl.INTERPRET:
    pytest.skip("no GPU, and pydl was imported without PYDL_INTERPRET=1",
                allow_module_level=True)
SHAPES = os.environ.get("BENCH_SHAPES", "quick") if GPU else "tiny"
if GPU:
    torch.backends.cudnn.benchmark = True   # cuDNN's autotuned algorithm, as bench.runner does
DEVICE = "cuda" if GPU else "cpu"
ROUNDS, WARMUP_ROUNDS = 50, 5

pytestmark = [pytest.mark.benchmark(timer=timing.synchronized_perf_counter)]
if not GPU:
    pytestmark.append(pytest.mark.emulation)


def _params():
    for suite in all_suites().values():
        for case in suite.cases(SHAPES):
            if not GPU and case.dtype == torch.bfloat16:
                continue
            for variant in suite.variants():
                for direction in DIRECTIONS:
                    yield pytest.param(
                        suite.op, case.name, variant.name, direction,
                        id=f"{suite.op}-{case.name}-{dtype_name(case.dtype)}-{variant.name}-{direction}")


_current: dict[tuple[str, str], runner.CaseRun] = {}   # one case's inputs at a time


def _case_run(op: str, case_name: str) -> runner.CaseRun:
    key = (op, case_name)
    if key not in _current:
        _current.clear()
        if GPU:
            torch.cuda.empty_cache()
        suite = all_suites()[op]
        case = next(c for c in suite.cases(SHAPES) if c.name == case_name)
        _current[key] = runner.CaseRun(suite, case, case.dtype, DEVICE)
    return _current[key]


@pytest.mark.parametrize("op,case_name,variant_name,direction", list(_params()))
def test_bench(benchmark, op, case_name, variant_name, direction):
    run = _case_run(op, case_name)
    variant = next(v for v in run.suite.variants() if v.name == variant_name)
    status, message = run.check(variant).status(direction)
    if status == gate.SKIPPED:
        pytest.skip(message)
    if status != gate.PASS:
        pytest.fail(f"{variant_name} is {status}: {message}")

    copies = timing.rotation_copies(run.input_bytes, timing.l2_bytes()) if GPU else 1
    step = run.step(variant, direction, copies)
    counter = itertools.count()

    def setup():
        return (step.prepare(next(counter) % copies),), {}

    dtype = dtype_name(run.dtype)
    benchmark.extra_info.update(
        op=op, case=case_name, shape=list(run.case.shape), dtype=dtype, direction=direction,
        variant=variant_name, flops=run.suite.flops(run.case, direction),
        bytes=run.suite.bytes(run.case, run.dtype, direction), copies=copies, emulation=not GPU)
    if GPU:
        benchmark.group = f"{op} {case_name} {dtype} {direction}"
        benchmark.pedantic(step.run, setup=setup, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    else:
        benchmark.group = f"EMULATION, not performance: {op} {case_name} {dtype} {direction}"
        benchmark.pedantic(step.run, setup=setup, rounds=1, warmup_rounds=0)
