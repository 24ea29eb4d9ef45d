"""The results file: one JSON per run, its keys, validation, and where runs are kept.

    {
      "schema": 1,
      "device": "NVIDIA H100 80GB HBM3" | "cpu (..., emulation)",
      "torch": "2.13.0", "triton": "3.6.0", "numba": "0.68.1", "cuda": "12.8" | null,
      "python": "3.12.3",
      "commit": "<git rev-parse HEAD>" | null, "dirty": bool | null,
      "created": "2025-01-31T12:00:00+00:00",
      "interpret": false,              # PYDL_INTERPRET: kernels emulated, nothing timed
      "mode": "gpu" | "emulation",
      "peaks": {"copy_gbps": float | null, "bf16_tflops": float | null},
      "shapes": "quick",
      "cases": {op: {case: {"shape": [...], "dtype": "bf16", "source": "...",
                            "params": {...}}}},   # params: the case's geometry beyond its
                                                  # shape (kernel, stride, causal, ...), if any
      "rows": [ROW, ...],
      "tuning": {"enabled": bool, "choices": {kernel: [{"key", "config", "ms",
                                                        "candidates"}]}}   # optional
    }

A ROW is one measurement: op, case, shape, dtype, direction ("fwd", "bwd", "fwd+bwd"),
variant, status ("ok": checked and timed; "pass": checked, not timed (emulation); "wrong";
"error"; "skipped"), message (why, for the last three), median_ms, min_ms, reps, copies
(input sets rotated through), flops, bytes (minimal), peak_mem_bytes (extra over the
inputs), tflops, gbps, bound ("memory" | "compute"), peak_fraction (of the measured peak the
bound names) and speedup_vs_torch (torch's median / this median). Untimed fields are null.
An emulation run never carries times: `validate` rejects one that does.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

SCHEMA_VERSION = 1
DEFAULT_DIR = Path(__file__).resolve().parent / "results"

HEADER_KEYS = ("schema", "device", "torch", "triton", "numba", "cuda", "python", "commit",
               "dirty", "created", "interpret", "mode", "peaks", "shapes", "cases", "rows")
PEAK_KEYS = ("copy_gbps", "bf16_tflops")
ROW_KEYS = ("op", "case", "shape", "dtype", "direction", "variant", "status", "message",
            "median_ms", "min_ms", "reps", "copies", "flops", "bytes", "peak_mem_bytes",
            "tflops", "gbps", "bound", "peak_fraction", "speedup_vs_torch")
STATUSES = ("ok", "pass", "wrong", "error", "skipped")
FAILED = ("wrong", "error")
OPTIONAL_KEYS = ("tuning",)   # the autotuner's choices (pydl/_tune.py); absent in older files
TIMED_KEYS = ("median_ms", "min_ms", "tflops", "gbps", "peak_fraction", "speedup_vs_torch")


def new_result(env: dict, mode: str, peaks: dict, shapes: str, cases: dict,
               rows: list[dict], tuning: dict | None = None) -> dict:
    result = {"schema": SCHEMA_VERSION, **env, "mode": mode, "peaks": dict(peaks),
              "shapes": shapes, "cases": cases, "rows": rows}
    if tuning is not None:
        result["tuning"] = tuning
    validate(result)
    return {k: result[k] for k in HEADER_KEYS + OPTIONAL_KEYS if k in result}


def validate(result: dict) -> None:
    """Raise ValueError when `result` is not a results file of this schema."""
    if not isinstance(result, dict):
        raise ValueError("a results file holds a JSON object")
    missing = [k for k in HEADER_KEYS if k not in result]
    if missing:
        raise ValueError(f"results file lacks {', '.join(missing)}")
    if not isinstance(result["peaks"], dict) or any(k not in result["peaks"] for k in PEAK_KEYS):
        raise ValueError(f"peaks must hold {', '.join(PEAK_KEYS)}")
    if not isinstance(result["rows"], list):
        raise ValueError("rows must be a list")
    timed_ok = result["mode"] == "gpu" and not result["interpret"]
    for i, row in enumerate(result["rows"]):
        lacking = [k for k in ROW_KEYS if k not in row]
        if lacking:
            raise ValueError(f"row {i} lacks {', '.join(lacking)}")
        if row["status"] not in STATUSES:
            raise ValueError(f"row {i}: unknown status {row['status']!r}")
        if not timed_ok and any(row[k] is not None for k in TIMED_KEYS):
            raise ValueError(f"row {i}: an emulation run must not record times")


def is_gpu_result(result: dict) -> bool:
    return result.get("mode") == "gpu" and not result.get("interpret")


def failed(result: dict) -> list[dict]:
    return [r for r in result["rows"] if r["status"] in FAILED]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "device"


def write(result: dict, out_dir: Path | str) -> Path:
    """Write `result` as <YYYYmmdd-HHMMSS>_<device>.json in `out_dir`; the path."""
    validate(result)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = re.sub(r"[^0-9T]", "", result["created"][:19]).replace("T", "-")
    stem = f"{stamp}_{_slug(result['device'])}"
    path, n = out_dir / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = out_dir / f"{stem}_{n}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def load(path: Path | str) -> dict:
    result = json.loads(Path(path).read_text(encoding="utf-8"))
    validate(result)
    return result


def gpu_runs(results_dir: Path | str = DEFAULT_DIR) -> list[tuple[Path, dict]]:
    """The GPU (not emulated) runs in `results_dir`, newest first."""
    runs = []
    for path in Path(results_dir).glob("*.json"):
        try:
            result = load(path)
        except (OSError, ValueError):
            continue
        if is_gpu_result(result):
            runs.append((path, result))
    return sorted(runs, key=lambda run: run[1]["created"], reverse=True)


def newest_gpu(results_dir: Path | str = DEFAULT_DIR) -> tuple[Path, dict] | None:
    """The most recently created GPU (not emulated) run in `results_dir`, or None."""
    runs = gpu_runs(results_dir)
    return runs[0] if runs else None


def newest_gpu_by_op(results_dir: Path | str, ops: list[str]) -> list[tuple[Path, dict, list]]:
    """For each op, the newest GPU run with a timed row of it, grouped by run (newest first):
    [(path, result, the ops it is the newest for)]. A run may hold some ops only."""
    chosen: dict[Path, tuple[dict, list]] = {}
    runs = gpu_runs(results_dir)
    for op in ops:
        for path, result in runs:
            if any(r["op"] == op and r.get("median_ms") for r in result["rows"]):
                chosen.setdefault(path, (result, []))[1].append(op)
                break
    return [(path, result, found) for path, result in runs if path in chosen
            for found in [chosen[path][1]]]
