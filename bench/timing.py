"""GPU timing: CUDA events around each run, median of many; peak extra memory of one run.

A `Step` is what gets timed: `prepare(c)` builds the state of a run from input copy c
(0 <= c < copies; run i of any loop here uses copy i % copies) outside the timed region (for a
backward-only step it runs the forward), and
`run(state)` is the timed work. Each run is bracketed by its own pair of CUDA events recorded
on the current stream, so untimed work enqueued by `prepare` finishes before the start event
and is not counted. Only used with a CUDA device: emulated or CPU times are never reported.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_L2_BYTES = 50 * 2**20   # H100's L2; used when the device does not report its own
MAX_COPIES = 256


@dataclass
class Step:
    prepare: Callable[[int], Any]
    run: Callable[[Any], Any]
    copies: int = 1


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int


def l2_bytes() -> int:
    import torch
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 0) or DEFAULT_L2_BYTES)


def rotation_copies(input_bytes: int, l2: int) -> int:
    """How many input copies to rotate through so that together they exceed the L2 cache
    (1 when a single copy already does): a run never finds its inputs cached by the last."""
    if input_bytes <= 0:
        return 1
    if input_bytes > l2:
        return 1
    return min(MAX_COPIES, l2 // input_bytes + 1)


def _prepare(step: Step, i: int):
    """The state of run i: every run, timed or not, takes its inputs from copy i % copies."""
    return step.prepare(i % step.copies)


def _timed_run(step: Step, i: int):
    import torch
    state = _prepare(step, i)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step.run(state)
    end.record()
    return start, end


def time_step(step: Step, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
              min_reps: int = 10, max_reps: int = 1000) -> Timing:
    """Median time of `step.run` in ms: one untimed call (compilation, autotuning), an
    estimate from 5 runs, warm-up for `warmup_ms`, then about `rep_ms` of timed runs."""
    import torch
    step.run(_prepare(step, 0))
    torch.cuda.synchronize()
    probe = [_timed_run(step, i) for i in range(5)]
    torch.cuda.synchronize()
    estimate = max(1e-3, statistics.median(s.elapsed_time(e) for s, e in probe))
    for i in range(min(max_reps, math.ceil(warmup_ms / estimate))):
        step.run(_prepare(step, i))
    reps = max(min_reps, min(max_reps, math.ceil(rep_ms / estimate)))
    events = [_timed_run(step, i) for i in range(reps)]
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) for s, e in events]
    return Timing(statistics.median(times), min(times), reps)


def peak_extra_bytes(step: Step) -> int:
    """Peak memory one run allocates beyond what was live before it: the inputs (and for a
    backward-only step, the forward's output and saved tensors) are not counted; outputs,
    gradients and workspaces are."""
    import torch
    state = _prepare(step, 0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = step.run(state)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    del result, state
    return int(extra)


def synchronized_perf_counter() -> float:
    """A wall clock that first waits for the device: pytest-benchmark's timer on a GPU."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter()


def gpu_ms(rep_ms: int):
    """A thunk's median GPU time in ms (triton.testing.do_bench, after one untimed call): the
    clock of the GPU-only commands that time kernels apart from the benchmark (`rnn-steps`,
    `gemm`)."""
    import torch
    from triton.testing import do_bench

    def ms(fn) -> float:
        fn()
        torch.cuda.synchronize()
        return float(do_bench(fn, warmup=10, rep=rep_ms, return_mode="median"))
    return ms


def case_command(command: str, doc: str, cases: dict, defaults: tuple, argv, add_arguments,
                 measure_case, print_row) -> int:
    """The frame of a GPU-only command over named cases (`python -m bench <command> [cases]
    [--rep-ms] [--json]`): arguments parsed (`add_arguments(parser)` adds the command's own),
    unknown cases refused, emulation left (a fresh process), a refusal without a GPU (exit
    2), then `measure_case(name, args, ms)` per case (ms: gpu_ms) with `print_row(row)`,
    one case's failure recorded as its row's error; the rows as JSON with --json. Exit 0
    when every case ran."""
    import argparse
    import json
    import sys
    from pathlib import Path
    p = argparse.ArgumentParser(prog=f"python -m bench {command}", description=doc)
    p.add_argument("cases", nargs="*", default=list(defaults),
                   help=f"of {', '.join(cases)} (default: {', '.join(defaults)})")
    add_arguments(p)
    p.add_argument("--rep-ms", type=int, default=50, help="do_bench's rep per timing")
    p.add_argument("--json", type=Path, help="write the rows here")
    args = p.parse_args(argv)
    unknown = [c for c in args.cases if c not in cases]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(cases)}")
    from . import environment
    mode, relaunch = environment.prepare()
    if relaunch:
        return environment.relaunch([command, *(argv if argv is not None else sys.argv[2:])])
    if mode != "gpu":
        print(f"python -m bench {command} times kernels on a GPU; there is none here (an "
              "emulated time is no GPU time)", file=sys.stderr)
        return 2
    rows = []
    for name in args.cases:
        try:
            rows.append(measure_case(name, args, gpu_ms(args.rep_ms)))
        except Exception as exc:  # noqa: BLE001 - one case's failure leaves the others
            rows.append({"case": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"{name}: {rows[-1]['error']}", file=sys.stderr)
            continue
        print_row(rows[-1])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 0 if all("error" not in r for r in rows) else 1
