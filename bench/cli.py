"""`python -m bench`: arguments, the run, what is printed, the exit status.

Subcommands: (none) run the suites; the others are COMMANDS (at the end of this module), the
one table that dispatches them and lists them in `--help`.
Nothing here imports pydl before bench.environment.prepare() has decided on emulation.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import environment, gemm, numba_resources, overhead, resources, rnn_steps, schema, tables

DIRECTION_CHOICES = ("fwd", "bwd", "fwd+bwd", "all")


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Check, then time (on a GPU), pydl's kernels against torch and peers.",
        epilog="other commands (`python -m bench COMMAND --help` for each):\n"
               + "\n".join(f"  {name:{width}s}  {summary}"
                           for name, (_, summary) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ops", nargs="*", help="ops to run (default: all; see `python -m bench list`)")
    p.add_argument("--variants", nargs="+", metavar="V",
                   help="variants to run (default: all): a backend (triton, numba, torch) "
                        "selects all its variants; or exact names (triton-im2col, torch-cudnn, "
                        "installed peers); see `python -m bench list`")
    p.add_argument("--shapes", choices=("tiny", "quick", "full"), default=None,
                   help="shape set (default: quick on a GPU; always tiny in emulation)")
    p.add_argument("--dtype", nargs="+", metavar="D",
                   help="run every case in these dtypes (fp32, fp16, bf16) instead of its own")
    p.add_argument("--direction", choices=DIRECTION_CHOICES, default="all")
    p.add_argument("--out", type=Path, default=None,
                   help="directory for the JSON and plots (default on a GPU: "
                        f"{schema.DEFAULT_DIR}; in emulation a JSON is written only when --out "
                        "is given)")
    p.add_argument("--results-dir", type=Path, default=schema.DEFAULT_DIR,
                   help="where recorded GPU runs are looked up (emulation mode)")
    p.add_argument("--rep-ms", type=float, default=100.0, help="timed milliseconds per row (GPU)")
    p.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up milliseconds per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", nargs="+", metavar="NAME",
                   help="only these cases of the shape set (names as `python -m bench list` "
                        "shows them); an unknown name is an error")
    p.add_argument("--op-budget", type=float, default=None, metavar="SECONDS",
                   help="per op: start no new case after this many seconds on the op (the "
                        "rest are reported as skipped); for runs that must end in time")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]][0](argv[1:])
    return cmd_run(argv)


# --- run ---------------------------------------------------------------------------------

def cmd_run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    mode, must_relaunch = environment.prepare()
    if must_relaunch:
        print("pydl was imported without PYDL_INTERPRET on a machine with no GPU: "
              "running again in a fresh process with PYDL_INTERPRET=1.", flush=True)
        return environment.relaunch(argv)

    import torch

    from . import peaks as peaks_mod
    from . import runner, suites

    gpu = mode == "gpu"
    if not gpu:
        print(environment.NO_GPU_NOTE if not torch.cuda.is_available()
              else environment.INTERPRET_NOTE)
        if args.shapes not in (None, "tiny"):
            print(f"(--shapes {args.shapes} needs a GPU: checking the tiny set instead.)")
    shapes = (args.shapes or "quick") if gpu else "tiny"
    try:
        selected = suites.select(args.ops)
        dtypes = [suites.parse_dtype(d) for d in args.dtype] if args.dtype else None
        _check_variants(selected, args.variants)
        _check_cases(selected, shapes, args.cases)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    options = runner.Options(
        shapes=shapes, dtypes=dtypes,
        directions=suites.DIRECTIONS if args.direction == "all" else (args.direction,),
        variants=args.variants, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
        progress=not args.no_progress, seed=args.seed, op_budget_s=args.op_budget,
        cases=args.cases)

    env = environment.describe(mode)
    print(f"device: {env['device']}  |  torch {env['torch']}  triton {env['triton']}  "
          f"cuda {env['cuda']}  |  shapes: {shapes}", flush=True)
    if gpu:
        print("measuring the device's peaks (1 GiB copy, 8192^3 bf16 matmul) ...", flush=True)
        peaks = peaks_mod.measure()
        print(f"copy {peaks['copy_gbps']:.0f} GB/s, bf16 matmul {peaks['bf16_tflops']:.0f} TFLOP/s",
              flush=True)
    else:
        peaks = dict(peaks_mod.NO_PEAKS)

    rows = runner.run(selected, options, mode, peaks)
    cases = {s.op: {c.name: _case_entry(c, suites.dtype_name(c.dtype)) for c in s.cases(shapes)}
             for s in selected}
    from pydl import _tune
    tuning = {"enabled": _tune.enabled(), "choices": _tune.report()}
    result = schema.new_result(env, mode, peaks, shapes, cases, rows, tuning)

    print()
    print(tables.timing_table(result) if gpu else tables.check_table(result))
    for line in tables.messages(result):
        print(line)
    counts = tables.status_counts(result)
    print("\nrows (one per case, dtype, direction and variant): "
          + ", ".join(f"{n} {s}" for s, n in counts.items()))

    out = args.out if args.out is not None else (schema.DEFAULT_DIR if gpu else None)
    if out is not None:
        path = schema.write(result, out)
        print(f"results: {path}")
        if gpu and not args.no_plots:
            from .plots import plot_result
            for png in plot_result(result, path):
                print(f"plot:    {png}")
    if not gpu:
        _print_recorded(args.results_dir, [s.op for s in selected])
    return 1 if schema.failed(result) else 0


def _case_entry(case, dtype: str) -> dict:
    entry = {"shape": list(case.shape), "dtype": dtype, "source": case.source}
    if case.params:
        entry["params"] = case.params
    return entry


def _check_cases(selected, shapes: str, names: list[str] | None) -> None:
    if names is None:
        return
    have = {c.name for s in selected for c in s.cases(shapes)}
    unknown = [n for n in names if n not in have]
    if unknown:
        raise ValueError(f"no case {', '.join(map(repr, unknown))} in the selected ops' "
                         f"{shapes!r} shapes; known: {', '.join(sorted(have))}")


def _check_variants(selected, names: list[str] | None) -> None:
    """Unknown names are an error; a known name no selected suite has (a peer that is not
    installed, an algorithm of another op) gets a note. A backend name selects all of its
    variants ("triton": "triton-implicit", "triton-im2col", ...)."""
    if not names:
        return
    from .suites import variant_selected
    have = [v.name for s in selected for v in s.variants()]
    known = {"triton", "numba", "torch"} | set(have) | {p for s in selected for p in s.peers} \
        | {n for s in _all_suites() for v in s.variants() for n in (v.name, v.backend) if n}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown variant {', '.join(map(repr, unknown))}; known: "
                         f"{', '.join(sorted(known))}")
    for n in names:
        if not any(variant_selected(v, [n]) for v in have):
            print(f"note: no selected op has a variant {n!r} here (a peer library that is not "
                  f"installed, or another op's variant), so it is not run.")


def _all_suites():
    from . import suites
    return suites.all_suites().values()


def _print_recorded(results_dir: Path, ops: list[str]) -> None:
    """Each op's newest recorded GPU timings (a run may have measured some ops only)."""
    found = schema.newest_gpu_by_op(results_dir, ops)
    print()
    if not found:
        print(f"No GPU results are recorded yet for {', '.join(ops)} (none in {results_dir}). "
              "Run `python -m bench` on a machine with a CUDA device to record some.")
        return
    for path, result, run_ops in found:
        print(f"Newest recorded GPU results for {', '.join(run_ops)} ({path.name}), measured "
              "on that device, not here:")
        for line in tables.header_lines(result):
            print("  " + line)
        print()
        print(tables.timing_table(result, ops=run_ops))
        print()


# --- list, compare, report ------------------------------------------------------------------

def _select(ops: list[str]):
    """The suites of `ops` (all when empty), after setting up the environment; None (the
    error printed) for an unknown op."""
    environment.prepare()
    from . import suites
    try:
        return suites.select(ops)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def cmd_list(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench list",
                                description="List ops, shape sets and variants.")
    p.add_argument("ops", nargs="*", help="ops to list (default: all)")
    args = p.parse_args(argv)
    selected = _select(args.ops)
    if selected is None:
        return 2
    from . import suites
    for suite in selected:
        variants = ", ".join(v.name + (f" (skipped: {v.skip})" if v.skip else "")
                             + (" (GPU only)" if v.gpu_only and not v.skip else "")
                             for v in suite.variants())
        print(f"{suite.op}: {suite.notes}; {suite.bound}-bound\n  variants: {variants}")
        missing = [p for p in suite.peers if p not in {v.name for v in suite.variants()}]
        if missing:
            print(f"  peers not installed: {', '.join(missing)}")
        shown: set[str] = set()
        for name, cases in suite.shape_sets.items():
            old = [c.name for c in cases if c.name in shown]
            print(f"  {name}:" + (f" ({', '.join(old)}, as above, and)" if old else ""))
            for c in (c for c in cases if c.name not in shown):
                shown.add(c.name)
                print(f"    {c.name:20s} {'x'.join(map(str, c.shape)):>14s} "
                      f"{suites.dtype_name(c.dtype):5s} {c.source}")
    return 0


# H100 SXM peaks measured on the lent machine (a 1 GiB copy; an 8192^3 bf16 cuBLAS matmul);
# fp32 GEMMs run as TF32 at half the bf16 rate (their torch baselines do too, by default).
FLOOR_COPY_GBPS = 3000.0
FLOOR_BF16_TFLOPS = 790.0


def floor_rows(suites_: list, shapes: str, copy_gbps: float, bf16_tflops: float) -> list[dict]:
    """Per case and direction: FLOPs, the fewest bytes, and the two times they give at the
    peaks; the larger is the floor no implementation beats (the METHOD's two numbers)."""
    from .suites import DIRECTIONS, dtype_name
    rows = []
    for suite in suites_:
        for case in suite.cases(shapes):
            tflops = bf16_tflops * (0.5 if case.dtype.itemsize == 4 else 1.0)
            for d in DIRECTIONS:
                flops, nbytes = suite.flops(case, d), suite.bytes(case, case.dtype, d)
                t_math = flops / (tflops * 1e12) * 1e6 if flops else 0.0
                t_mem = nbytes / (copy_gbps * 1e9) * 1e6 if nbytes else 0.0
                rows.append({"op": suite.op, "case": case.name, "dtype": dtype_name(case.dtype),
                             "direction": d, "gflop": (flops or 0) / 1e9,
                             "mbytes": (nbytes or 0) / 1e6, "math_us": t_math, "mem_us": t_mem,
                             "floor_us": max(t_math, t_mem),
                             "limit": "math" if t_math >= t_mem else "memory"})
    return rows


def cmd_floors(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench floors",
        description="The lower bound of each case from its FLOPs and fewest bytes at the "
                    "device's peaks (no GPU needed): what each measured time is compared with.")
    p.add_argument("ops", nargs="*")
    p.add_argument("--shapes", choices=("tiny", "quick", "full"), default="quick")
    p.add_argument("--copy-gbps", type=float, default=FLOOR_COPY_GBPS)
    p.add_argument("--bf16-tflops", type=float, default=FLOOR_BF16_TFLOPS)
    args = p.parse_args(argv)
    selected = _select(args.ops)
    if selected is None:
        return 2
    print(f"peaks: copy {args.copy_gbps:.0f} GB/s, bf16 {args.bf16_tflops:.0f} TFLOP/s "
          f"(fp32 as TF32: half)")
    print(f"{'op':19s} {'case':18s} {'dtype':5s} {'dir':8s} {'GFLOP':>9s} {'MB':>9s} "
          f"{'math us':>9s} {'mem us':>9s}  limit")
    for r in floor_rows(selected, args.shapes, args.copy_gbps, args.bf16_tflops):
        print(f"{r['op']:19s} {r['case']:18s} {r['dtype']:5s} {r['direction']:8s} "
              f"{r['gflop']:9.2f} {r['mbytes']:9.1f} {r['math_us']:9.1f} {r['mem_us']:9.1f}  "
              f"{r['limit']}")
    return 0


def cmd_compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench compare",
        description="Per-row median-time ratios B/A of two GPU runs (below 1: B is faster).")
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--fail-above", type=float, metavar="RATIO",
                   help="exit with status 1 when a row timed in A is slower in B by more than "
                        "RATIO (B/A > RATIO, e.g. 1.10), or is wrong or raises in B")
    args = p.parse_args(argv)
    if args.fail_above is not None and not args.fail_above > 0:
        p.error(f"--fail-above must be a positive ratio (like 1.10), not {args.fail_above}")
    try:
        results = [schema.load(path) for path in (args.a, args.b)]
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, result in zip((args.a, args.b), results):
        if not schema.is_gpu_result(result):
            print(_emulation_error(path), file=sys.stderr)
            return 2
    a, b = results
    print(tables.compare(a, b, markdown=args.markdown))
    if args.fail_above is None:
        return 0
    timed = tables.compare_ratios(a, b)
    if not timed:
        print(f"error: no row was timed in both runs, so --fail-above {args.fail_above} "
              "checks nothing", file=sys.stderr)
        return 2
    slower = tables.regressions(a, b, args.fail_above)
    if not slower:
        print(f"\nno row is slower than {args.fail_above:g} x A or failing in B")
        return 0
    print(f"\n{len(slower)} row(s) slower than {args.fail_above:g} x A, or failing in B:")
    for line in slower:
        print("  " + line)
    return 1


def _emulation_error(path: Path) -> str:
    return f"error: {path} is an emulation run: it holds correctness checks, no times"


def cmd_report(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench report",
                                description="Markdown results table of FILE, or of the newest "
                                            "GPU run in the results directory.")
    p.add_argument("file", nargs="?", type=Path)
    p.add_argument("--results-dir", type=Path, default=schema.DEFAULT_DIR)
    args = p.parse_args(argv)
    try:
        if args.file is not None:
            path, result = args.file, schema.load(args.file)
        else:
            found = schema.newest_gpu(args.results_dir)
            if found is None:
                print(f"No GPU results are recorded yet in {args.results_dir}.", file=sys.stderr)
                return 1
            path, result = found
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not schema.is_gpu_result(result):
        print(_emulation_error(path), file=sys.stderr)
        return 2
    print(tables.report(result, path), end="")
    return 0


# --- the commands besides the run: the dispatch and the list in `--help` ----------------------

COMMANDS = {
    "list": (cmd_list, "ops, their shape sets (with sources) and variants: list [OPS ...]"),
    "compare": (cmd_compare, "per-row time ratios B/A of two GPU runs: compare A.json B.json "
                             "[--fail-above R]"),
    "report": (cmd_report, "markdown tables of a GPU run (default: the newest recorded one)"),
    "floors": (cmd_floors, "each case's lower bound from its FLOPs and bytes at the peaks"),
    "resources": (resources.main, "registers, spills, shared memory and wgmma of each tuning "
                                  "candidate, compiled offline"),
    "numba-resources": (numba_resources.main, "registers, spills and shared memory of each "
                                              "Numba kernel signature, compiled offline"),
    "overhead": (overhead.main, "host microseconds, launches and syncs per call (kernels "
                                "stubbed)"),
    "rnn-steps": (rnn_steps.main, "where a persistent LSTM/GRU time step goes: per-step "
                                  "slopes, tile latency, barrier (GPU)"),
    "gemm": (gemm.main, "the shared GEMM's every tuning candidate against cuBLAS at the "
                        "products pydl's ops run (GPU)"),
}
