"""Tables of results: the end-of-run table, the correctness summary, compare, report.

One renderer (`render`) makes both plain-text and markdown tables.
"""
from __future__ import annotations

import math
from pathlib import Path

from . import schema

KEY = ("op", "case", "dtype", "direction", "variant")


# --- rendering ------------------------------------------------------------------------

def render(headers: list[str], rows: list[list[str]], markdown: bool = False,
           right: set[int] | None = None) -> str:
    """A table; columns in `right` are right-aligned (numbers)."""
    right = right or set()
    cells = [[str(c) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values):
        padded = [v.rjust(w) if i in right else v.ljust(w)
                  for i, (v, w) in enumerate(zip(values, widths))]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded).rstrip()

    if markdown:
        rule = "|" + "|".join(("-" * (w + 1) + ":") if i in right else "-" * (w + 2)
                              for i, w in enumerate(widths)) + "|"
    else:
        rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule] + [line(r) for r in cells])


def fmt(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "ms":
        return f"{value:.4f}" if value < 0.1 else f"{value:.3f}"
    if kind == "x":
        return f"{value:.2f}x"
    if kind == "pct":
        return f"{100 * value:.0f}%"
    if kind == "bytes":
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if abs(value) >= size:
                return f"{value / size:.1f} {unit}"
        return f"{int(value)} B"
    return str(value)


def achieved(row: dict) -> str:
    """The rate that matters for the row's bound: GB/s or TFLOP/s."""
    if row["bound"] == "memory":
        return "-" if row["gbps"] is None else f"{row['gbps']:.0f} GB/s"
    return "-" if row["tflops"] is None else f"{row['tflops']:.1f} TFLOP/s"


def header_lines(result: dict) -> list[str]:
    peaks = result["peaks"]
    commit = ((result["commit"] or "unknown")[:12]
              + (" (uncommitted changes)" if result.get("dirty") else ""))
    lines = [f"device: {result['device']}", f"date: {result['created']}", f"commit: {commit}",
             f"torch {result['torch']}, triton {result['triton']}, cuda {result['cuda']}"]
    if peaks.get("copy_gbps"):
        lines.append(f"measured peaks: copy {peaks['copy_gbps']:.0f} GB/s, "
                     f"bf16 matmul {peaks['bf16_tflops']:.0f} TFLOP/s")
    return lines + [launch_configs(result), coverage(result)]


def launch_configs(result: dict) -> str:
    tuning = result.get("tuning")
    if not tuning:
        return "launch configs: not recorded"
    if not tuning.get("enabled"):
        return "launch configs: each launcher's default (PYDL_TUNE=0, no autotuning)"
    n = sum(len(v) for v in tuning.get("choices", {}).values())
    return (f"launch configs: autotuned on the device ({n} choices, with every candidate's "
            "kernel time, in the file's `tuning`)")


def coverage(result: dict) -> str:
    """Which cases of the run's shape set it holds: the whole set, or which subset."""
    shapes = result.get("shapes")
    ran: dict[str, set[str]] = {}
    for r in result["rows"]:
        ran.setdefault(r["op"], set()).add(r["case"])
    try:
        from .suites import all_suites
        declared = {op: [c.name for c in s.cases(shapes)] for op, s in all_suites().items()
                    if shapes in s.shape_sets}
    except Exception:  # noqa: BLE001  (the suites cannot load here: say what ran)
        return f"cases: {sum(map(len, ran.values()))} of the {shapes} shapes"
    parts, missing = [], [op for op in declared if op not in ran]
    for op, names in declared.items():
        if op in ran and not set(names) <= ran[op]:
            parts.append(f"{op} {len(ran[op] & set(names))} of {len(names)} "
                         f"({', '.join(n for n in names if n in ran[op])})")
    if not parts and not missing:
        return f"cases: all of the {shapes} shapes"
    text = f"cases: a subset of the {shapes} shapes"
    if parts:
        text += ": " + "; ".join(parts)
    if missing:
        text += f"; not run: {', '.join(missing)}"
    return text


# --- a run's tables ---------------------------------------------------------------------

def timing_table(result: dict, ops: list[str] | None = None, markdown: bool = False) -> str:
    headers = ["op", "case", "dtype", "dir", "variant", "status", "median ms", "achieved",
               "of peak", "vs torch", "extra mem"]
    rows = [[r["op"], r["case"], r["dtype"], r["direction"], r["variant"], r["status"],
             fmt(r["median_ms"], "ms"), achieved(r), fmt(r["peak_fraction"], "pct"),
             fmt(r["speedup_vs_torch"], "x"), fmt(r["peak_mem_bytes"], "bytes")]
            for r in result["rows"] if ops is None or r["op"] in ops]
    return render(headers, rows, markdown, right={6, 7, 8, 9, 10})


def check_table(result: dict) -> str:
    """One line per (op, case, dtype, variant): the forward and the gradient check."""
    by: dict[tuple, dict[str, dict]] = {}
    for r in result["rows"]:
        by.setdefault((r["op"], r["case"], r["dtype"], r["variant"]), {})[r["direction"]] = r
    rows = []
    for (op, case, dtype, variant), d in by.items():
        fwd, bwd = d.get("fwd"), d.get("bwd") or d.get("fwd+bwd")
        shape = "x".join(map(str, (fwd or bwd)["shape"]))
        note = next((x["message"] for x in (fwd, bwd)
                     if x and x["status"] != "pass" and x["message"]), "")
        rows.append([op, case, shape, dtype, variant, fwd["status"] if fwd else "-",
                     bwd["status"] if bwd else "-", note])
    return render(["op", "case", "shape", "dtype", "variant", "forward", "gradient", "note"], rows)


def messages(result: dict) -> list[str]:
    """Why rows are wrong or errored, once per (op, case, dtype, variant, message)."""
    seen, out = set(), []
    for r in result["rows"]:
        if r["status"] in schema.FAILED and r["message"]:
            key = (r["op"], r["case"], r["dtype"], r["variant"], r["message"])
            if key not in seen:
                seen.add(key)
                out.append(f"{r['op']} {r['case']} {r['dtype']} {r['variant']} "
                           f"[{r['status']}]: {r['message']}")
    return out


def status_counts(result: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in result["rows"]:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    return counts


# --- compare and report ----------------------------------------------------------------

def _paired(a: dict, b: dict) -> list[tuple[tuple, dict, dict]]:
    """(key, row of A or {}, row of B or {}) for every row of either run, A's order first."""
    rows_a = {tuple(r[k] for k in KEY): r for r in a["rows"]}
    rows_b = {tuple(r[k] for k in KEY): r for r in b["rows"]}
    keys = list(rows_a) + [k for k in rows_b if k not in rows_a]
    return [(k, rows_a.get(k, {}), rows_b.get(k, {})) for k in keys]


def compare_ratios(a: dict, b: dict) -> dict[tuple, float]:
    """B/A of the median times of the rows timed in both runs, by KEY."""
    return {k: rb["median_ms"] / ra["median_ms"] for k, ra, rb in _paired(a, b)
            if ra.get("median_ms") and rb.get("median_ms")}


def compare(a: dict, b: dict, markdown: bool = False) -> str:
    """Per-row median times of two runs and their ratio B/A (< 1: B is faster)."""
    ratios = compare_ratios(a, b)
    out = [[*k, fmt(ra.get("median_ms"), "ms"), fmt(rb.get("median_ms"), "ms"),
            f"{ratios[k]:.3f}" if k in ratios else "-"] for k, ra, rb in _paired(a, b)]
    table = render(["op", "case", "dtype", "dir", "variant", "A ms", "B ms", "B/A"], out,
                   markdown, right={5, 6, 7})
    lines = [f"A: {a['device']}, {a['created']}", f"B: {b['device']}, {b['created']}", "", table,
             "", "B/A is the ratio of median times: below 1, B is faster."]
    if ratios:
        geo = math.exp(sum(map(math.log, ratios.values())) / len(ratios))
        lines.append(f"geometric mean of B/A over {len(ratios)} rows timed in both: {geo:.3f}")
    else:
        lines.append("no row was timed in both runs")
    return "\n".join(lines)


def regressions(a: dict, b: dict, fail_above: float) -> list[str]:
    """The rows timed in A that B runs more than `fail_above` times slower, or that are wrong
    or raise in B: one line each."""
    ratios = compare_ratios(a, b)
    out = []
    for k, ra, rb in _paired(a, b):
        name = " ".join(map(str, k))
        if k in ratios and ratios[k] > fail_above:
            out.append(f"{name}: {fmt(ra['median_ms'], 'ms')} -> {fmt(rb['median_ms'], 'ms')} "
                       f"ms, B/A {ratios[k]:.3f}")
        elif ra.get("median_ms") and rb.get("status") in schema.FAILED:
            out.append(f"{name}: {rb['status']} in B" + (f" ({rb['message']})"
                                                          if rb.get("message") else ""))
    return out


def report(result: dict, path: Path | str | None = None) -> str:
    """A markdown section for the README: run header, then one table per op."""
    lines = ["Measured with `python -m bench`" + (f" (`{Path(path).name}`)" if path else "") + ".",
             ""]
    lines += [f"- {line}" for line in header_lines(result)]
    lines += ["", "Median of many runs (CUDA events, inputs rotated past L2). *of peak*: achieved "
              "bandwidth over the measured copy bandwidth (memory-bound ops) or FLOP rate over "
              "the measured bf16 matmul rate (compute-bound ops). *vs torch*: torch's time / "
              "this time. *extra mem*: peak memory beyond the inputs."]
    cases = result.get("cases", {})
    for op in dict.fromkeys(r["op"] for r in result["rows"]):
        lines += ["", f"### {op}", ""]
        rows = []
        for r in (r for r in result["rows"] if r["op"] == op):
            shape = "x".join(map(str, r["shape"]))
            status = "" if r["status"] == "ok" else f" ({r['status']})"
            rows.append([f"{r['case']} ({shape})", r["dtype"], r["direction"],
                         r["variant"] + status, fmt(r["median_ms"], "ms"), achieved(r),
                         fmt(r["peak_fraction"], "pct"), fmt(r["speedup_vs_torch"], "x"),
                         fmt(r["peak_mem_bytes"], "bytes")])
        lines.append(render(["case", "dtype", "dir", "variant", "ms", "achieved", "of peak",
                             "vs torch", "extra mem"], rows, markdown=True,
                            right={4, 5, 6, 7, 8}))
        sources = cases.get(op, {})
        if sources:
            lines += [""] + [f"- {name}: {info['source']}" for name, info in sources.items()]
    return "\n".join(lines) + "\n"
