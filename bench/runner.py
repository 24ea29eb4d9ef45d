"""Cases to result rows: inputs, the correctness gate, then (GPU only) timing and memory.

One row per (op, case, dtype, direction, variant). The steps that are timed are built here by
`make_step`, the one definition of what "fwd", "bwd" and "fwd+bwd" mean, shared with the
pytest-benchmark module:

    fwd      the forward on inputs that do not require grad (no graph is recorded; a peer
             that computes its gradient inside the forward when asked to, like Liger's
             cross-entropy, is not charged for it here)
    bwd      the backward alone: each run first calls the forward outside the timed region
             (a fresh graph per run, no retain_graph), then times torch.autograd.grad of
             the output for a fixed upstream gradient
    fwd+bwd  forward then torch.autograd.grad, both timed: the number to compare across
             implementations that split work differently between the two

On a GPU the run sets torch.backends.cudnn.benchmark = True (restored afterwards), as CNN
training scripts do: cuDNN then autotunes its algorithm per shape on the first call, which is
the gate's untimed reference call, so the torch baseline of a convolution is cuDNN's best
algorithm for that shape, the fair target. It changes nothing but cuDNN's choices.
"""
from __future__ import annotations

import functools
import sys
import time
from dataclasses import dataclass, replace

import torch

from . import gate, timing
from .suites.base import BASELINE, DIRECTIONS, Case, Suite, Variant, dtype_name, variant_selected

OK = "ok"   # passed the gate and timed (GPU)
BF16_EMULATION = ("bf16 is checked on a GPU only (NumPy has no bf16 and Triton's interpreter "
                  "mishandles it; see tests/conftest.py)")


@dataclass
class Options:
    shapes: str = "quick"
    dtypes: list[torch.dtype] | None = None       # None: each case's own dtype
    directions: tuple[str, ...] = DIRECTIONS
    variants: list[str] | None = None             # None: all; a prefix selects "<prefix>-*"
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    progress: bool = True
    seed: int = 0
    op_budget_s: float | None = None              # per op: no new case starts after this
    cases: list[str] | None = None                # None: every case of the shape set


def over_budget(seconds: float) -> str:
    return (f"not run: the op's time budget (--op-budget {seconds:g} s) was spent on its "
            "earlier cases")


def make_step(suite: Suite, fn, inputs, direction: str, copies: int,
              grad_out: torch.Tensor) -> timing.Step:
    """The work of one direction, rotating over `copies` fresh copies of `inputs`."""
    diff = suite.differentiable
    sets = [gate.clone_inputs(inputs, diff, suite) for _ in range(copies)]
    if direction == "fwd":
        def prepare(i):
            return [t.detach() for t in sets[i]]

        def run(args):
            return fn(*args)
    elif direction == "bwd":
        def prepare(i):
            args = sets[i]
            return fn(*args), gate.leaves(args, diff)

        def run(state):
            return torch.autograd.grad(state[0], state[1], grad_out)
    elif direction == "fwd+bwd":
        def prepare(i):
            return sets[i]

        def run(args):
            return torch.autograd.grad(fn(*args), gate.leaves(args, diff), grad_out)
    else:
        raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
    return timing.Step(prepare, run, copies)


class CaseRun:
    """One (suite, case, dtype): the inputs, torch's reference, and each variant's check."""

    def __init__(self, suite: Suite, case: Case, dtype: torch.dtype, device, seed: int = 0):
        self.suite, self.case, self.dtype = suite, case, dtype
        self.device = torch.device(device)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        self.options = suite.options(case)
        self.inputs = suite.make_inputs(case, dtype, self.device, gen)
        self.ref = gate.reference(suite, self.inputs, gen, self.options)
        self.checks: dict[str, gate.Check] = {}

    @property
    def input_bytes(self) -> int:
        return sum(t.nbytes for t in self.inputs)

    def check(self, variant: Variant) -> gate.Check:
        if variant.name not in self.checks:
            self.checks[variant.name] = gate.check(
                variant, self.suite, self.dtype, self.suite.reduction_lengths(self.case),
                self.inputs, self.ref, self.device, self.options,
                self.suite.unsupported(self.case, self.dtype, variant))
        return self.checks[variant.name]

    def bound(self, variant: Variant) -> Variant:
        """`variant` with the case's keyword arguments bound into its callable."""
        if variant.fn is None or not self.options:
            return variant
        return replace(variant, fn=functools.partial(variant.fn, **self.options))

    def step(self, variant: Variant, direction: str, copies: int = 1) -> timing.Step:
        return make_step(self.suite, self.bound(variant).fn, self.inputs, direction, copies,
                         self.ref.grad_out)


def base_row(suite: Suite, case: Case, dtype: torch.dtype, direction: str, variant: str,
             status: str, message: str | None) -> dict:
    return {
        "op": suite.op, "case": case.name, "shape": list(case.shape),
        "dtype": dtype_name(dtype), "direction": direction, "variant": variant,
        "status": status, "message": message,
        "median_ms": None, "min_ms": None, "reps": None, "copies": None,
        "flops": suite.flops(case, direction), "bytes": suite.bytes(case, dtype, direction),
        "peak_mem_bytes": None, "tflops": None, "gbps": None, "bound": suite.bound,
        "peak_fraction": None, "speedup_vs_torch": None,
    }


def _measure(row: dict, run: CaseRun, variant: Variant, direction: str, copies: int,
             options: Options) -> None:
    step = run.step(variant, direction, copies)
    row["peak_mem_bytes"] = timing.peak_extra_bytes(step)
    t = timing.time_step(step, warmup_ms=options.warmup_ms, rep_ms=options.rep_ms)
    row.update(status=OK, median_ms=t.median_ms, min_ms=t.min_ms, reps=t.reps, copies=copies)


# An achieved rate this far above the measured peak is not a rate of the work the row's
# FLOP/byte model counts (cache effects stay well below it)
IMPOSSIBLE_FRACTION = 2.0


def derive(rows: list[dict], peaks: dict) -> None:
    """Fill tflops, gbps, peak_fraction and speedup_vs_torch from the timed rows."""
    base = {(r["op"], r["case"], r["dtype"], r["direction"]): r["median_ms"]
            for r in rows if r["variant"] == BASELINE and r["median_ms"]}
    for r in rows:
        ms = r["median_ms"]
        if not ms:
            continue
        if r["flops"]:
            r["tflops"] = r["flops"] / (ms * 1e-3) / 1e12
        if r["bytes"]:
            r["gbps"] = r["bytes"] / (ms * 1e-3) / 1e9
        achieved, peak = ((r["gbps"], peaks.get("copy_gbps")) if r["bound"] == "memory"
                          else (r["tflops"], peaks.get("bf16_tflops")))
        if achieved and peak:
            r["peak_fraction"] = achieved / peak
            if r["peak_fraction"] > IMPOSSIBLE_FRACTION:
                r["message"] = (f"{r['direction']} would run at {r['peak_fraction']:.0f}x the "
                                f"device's peak: this variant does the work counted here in "
                                f"another direction (e.g. the gradient written by its "
                                f"training forward); compare fwd+bwd")
                r["tflops"] = r["gbps"] = r["peak_fraction"] = None
        ref = base.get((r["op"], r["case"], r["dtype"], r["direction"]))
        if ref:
            r["speedup_vs_torch"] = ref / ms


def selected_variants(suite: Suite, names: list[str] | None) -> list[Variant]:
    return [v for v in suite.variants() if variant_selected(v.name, names)]


def tasks(suites: list[Suite], options: Options) -> list[tuple[Suite, Case, torch.dtype]]:
    out = []
    for suite in suites:
        for case in suite.cases(options.shapes):
            if options.cases is not None and case.name not in options.cases:
                continue
            for dtype in options.dtypes or [case.dtype]:
                out.append((suite, case, dtype))
    return out


class Progress:
    """Progress on stderr: tqdm's bar on a terminal; elsewhere (a log file, CI) one line per
    case, since a bar redrawn with carriage returns fills a log with thousands of them."""

    def __init__(self, cases: int, variants: int, enabled: bool = True, stream=None):
        self.stream = sys.stderr if stream is None else stream
        self.cases, self.done, self.t0 = cases, 0, time.perf_counter()
        self.lines = enabled and not _isatty(self.stream)
        self.bar = None
        if enabled and not self.lines:
            from tqdm import tqdm
            self.bar = tqdm(total=variants, unit="variant", dynamic_ncols=True, leave=False,
                            file=self.stream)

    def set_description(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def case_done(self, name: str, variants: int) -> None:
        self.done += 1
        if self.lines:
            print(f"[{self.done}/{self.cases}] {name}: {variants} variant(s), "
                  f"{time.perf_counter() - self.t0:.0f} s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):      # no isatty, or a closed stream
        return False


def run(suites: list[Suite], options: Options, mode: str, peaks: dict,
        device: str | None = None) -> list[dict]:
    """Every selected case and variant: checked always, timed in GPU mode. Returns rows.
    `device` defaults to cuda in GPU mode and cpu in emulation (tests override it)."""
    gpu = mode == "gpu"
    device = torch.device(device or ("cuda" if gpu else "cpu"))
    work = [(s, c, d, selected_variants(s, options.variants)) for s, c, d in tasks(suites, options)]
    rows: list[dict] = []
    l2 = timing.l2_bytes() if gpu else 0
    cudnn_benchmark = torch.backends.cudnn.benchmark
    if gpu:
        torch.backends.cudnn.benchmark = True     # cuDNN's autotuned algorithm: see the docstring
    bar = Progress(len(work), sum(len(v) for *_, v in work), options.progress)
    try:
        # (NumPy's warnings from Triton's interpreter stay inside pydl's launches: pydl._env)
        started: dict[str, float] = {}
        for suite, case, dtype, variants in work:
            now = time.perf_counter()       # an op's first case always runs
            if options.op_budget_s is not None \
                    and now - started.setdefault(suite.op, now) > options.op_budget_s:
                _skip_case(suite, case, dtype, variants, options, rows, bar,
                           over_budget(options.op_budget_s))
                continue
            _run_case(suite, case, dtype, variants, options, device, gpu, l2, rows, bar)
            bar.case_done(f"{suite.op} {case.name} {dtype_name(dtype)}", len(variants))
    finally:
        bar.close()
        torch.backends.cudnn.benchmark = cudnn_benchmark
    derive(rows, peaks)
    return rows


def _skip_case(suite, case, dtype, variants, options, rows, bar, reason: str) -> None:
    for v in variants:
        rows.extend(base_row(suite, case, dtype, d, v.name, gate.SKIPPED, reason)
                    for d in options.directions)
        bar.update()


def _run_case(suite, case, dtype, variants, options, device, gpu, l2, rows, bar) -> None:
    def emit(variant: str, statuses) -> list[dict]:
        new = [base_row(suite, case, dtype, d, variant, *statuses(d)) for d in options.directions]
        rows.extend(new)
        return new

    if not gpu and dtype == torch.bfloat16:
        for v in variants:
            emit(v.name, lambda d: (gate.SKIPPED, BF16_EMULATION))
            bar.update()
        return
    try:
        run = CaseRun(suite, case, dtype, device, options.seed)
    except Exception as exc:  # noqa: BLE001
        msg = "inputs or the torch reference raised " + gate.error_message(exc)
        if gpu:
            torch.cuda.empty_cache()
        for v in variants:
            emit(v.name, lambda d: (gate.ERROR, msg))
            bar.update()
        return
    copies = timing.rotation_copies(run.input_bytes, l2) if gpu else 1
    for v in variants:
        bar.set_description(f"{suite.op} {case.name} {dtype_name(dtype)} {v.name}")
        check = run.check(v)
        for row in emit(v.name, check.status):
            if gpu and row["status"] == gate.PASS:
                try:
                    _measure(row, run, v, row["direction"], copies, options)
                except Exception as exc:  # noqa: BLE001
                    row.update(status=gate.ERROR,
                               message="timing raised " + gate.error_message(exc))
                    torch.cuda.empty_cache()
        bar.update()
    del run
    if gpu:
        torch.cuda.empty_cache()
