"""`python -m bench resources`: what the compiler says each tuning candidate costs, no GPU needed.

For every candidate launch configuration of pydl's autotuned Triton kernels (pydl/_tune.py),
compiled for one GPU architecture (sm_90, H100, by default) on this machine: registers per
thread, spills (local memory and stack bytes), shared memory, and how many Hopper wgmma
(SASS HGMMA) instructions the matrix products became. A candidate that spills, needs more
shared memory than a block may have (227 KiB on Hopper) or more registers than an SM has
(65536: registers per thread x 32 x num_warps) shows up here before any device time is spent.

One source of truth: the candidates and the launch arguments are not copied from the
launchers. Each representative problem (PROBLEMS) is run through pydl's real launcher code on
CPU tensors, with `Tuner.pick` replaced by a recorder (tuner name, candidates, launch closure;
it returns the default, candidates[0]) and Triton's `JITFunction.run` replaced by a recorder
that runs nothing. Then each candidate's `launch(cfg)` is called, and every
`kernel[grid](*args, **kwargs)` it makes is specialized by Triton's own JIT binder for the
target (pointers of the tensors' dtypes with 16-byte divisibility when data_ptr % 16 == 0, ints
as i32 or i64, the int 1 as a constexpr, multiples of 16 marked divisible, floats as fp32, the
constexpr keyword arguments, num_warps and num_stages) and compiled with triton.compile for
GPUTarget("cuda", arch, 32). Registers, spills and static shared memory are read from the cubin
with cuobjdump --dump-resource-usage (Triton's shared memory is dynamic: metadata.shared, the
number Triton checks against the device's limit at launch), HGMMA counted in its SASS.

The kernels must be real `triton.jit` functions, not the interpreter's: when emulation is
asked for (PYDL_INTERPRET, TRITON_INTERPRET) or pydl is already imported, the command runs
itself again in a fresh process with those variables removed.

Kernels launched next to a tuned one without a tuner of their own (the split-K reduction
`sum_splits`, `attention_bwd_preprocess`) are reported once per problem, with "-" as the
candidate. Exit status: 0; 1 when a default configuration (what runs with PYDL_TUNE=0) does
not compile or does not fit the device, or the offline toolchain is missing; 2 on bad
arguments.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMULATION_VARS = ("PYDL_INTERPRET", "TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")

# Per-block shared memory (the opt-in maximum a launch may ask for) by compute capability; every
# listed architecture has 65536 32-bit registers per SM and at most 255 per thread.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGS_PER_SM = 65536
# Multiprocessors of the device the problems are sized for (H100 SXM): the conv weight
# gradient's split-K factor depends on it (pydl/conv.py `_split_k`).
SMS = 132
FAILING = ("compile error", "too much shared memory", "too many registers")


# --- the representative problems -------------------------------------------------------------
# Each runs pydl's launchers once on CPU tensors (never touched: nothing executes); the
# shapes are the benchmark suites' (bench/suites/), bf16.

def gemm_problem(n: int):
    """An n x n x n bf16 GEMM, c = a @ b, all row-major."""
    def run():
        import torch
        from pydl._gemm import gemm
        a, b, c = (torch.empty(n, n, dtype=torch.bfloat16) for _ in range(3))
        gemm(a, b, c)
    return run


def _conv_resnet_l1():
    """ResNet-50's layer1 3x3 conv (64 -> 64 channels, 56 x 56, padding 1), batch 32,
    channels_last input and weight: forward, grad input, grad weight."""
    import torch
    from pydl import conv
    cl, bf = torch.channels_last, torch.bfloat16
    x = torch.empty(32, 64, 56, 56, dtype=bf).contiguous(memory_format=cl)
    w = torch.empty(64, 64, 3, 3, dtype=bf).contiguous(memory_format=cl)
    g = conv.conv_geometry(tuple(x.shape), tuple(w.shape), 1, 1)
    y = torch.empty(g.N, g.OC, g.OH, g.OW, dtype=bf).contiguous(memory_format=cl)
    impl = conv.ALGOS["triton"]["implicit"]
    impl.forward(x, w, None, y, g)
    impl.backward_input(y, w, torch.empty_like(x), g)
    impl.backward_weight(y, x, torch.empty(w.shape, dtype=bf), g)


def _attention(causal: bool):
    """FlashAttention-2's sweep point d128-4k: B=4, H=16, L=S=4096, d=128, no mask or
    dropout; forward, then the backward (preprocess, dK/dV, dQ)."""
    def run():
        import math
        import torch
        from pydl import attention as att
        B, H, L, E = 4, 16, 4096, 128
        q, k, v, o, do, dq, dk, dv = (torch.empty(B, H, L, E, dtype=torch.bfloat16)
                                      for _ in range(8))
        lse = torch.empty(B * H, L, dtype=torch.float32)
        scale = 1.0 / math.sqrt(E)
        launcher = att.LAUNCHERS["triton"]
        launcher.forward(q, k, v, o, lse, None, att.MASK_NONE, causal, scale, 0.0, 0)
        launcher.backward(q, k, v, o, lse, do, dq, dk, dv, None, att.MASK_NONE, causal, scale,
                          0.0, 0)
    return run


# (family, case name, runner)
PROBLEMS = (
    ("gemm", "4096^3", gemm_problem(4096)),
    ("conv", "l1-3x3-64 n32", _conv_resnet_l1),
    ("attention", "d128-4k", _attention(False)),
    ("attention", "d128-4k-causal", _attention(True)),
)


# --- capture: the launchers' candidates and kernel calls, nothing executed --------------------

def _specializer(arch: int):
    """spec(fn, args, kwargs) -> the compile job Triton's JIT would make for this launch on
    GPUTarget("cuda", arch, 32): the binder and argument packing of JITFunction.run."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders = {}

    def spec(fn, args, kwargs) -> dict:
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, opts = binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, opts)
        return dict(module=fn.fn.__module__, name=fn.fn.__name__, signature=signature,
                    constexprs=constexprs, attrs=attrs, options=dict(options.__dict__), arch=arch)
    return spec


def _job_key(job: dict) -> str:
    return repr((job["module"], job["name"], sorted(job["signature"].items()),
                 sorted(job["constexprs"].items()), sorted(job["attrs"].items()),
                 sorted(job["options"].items()), job["arch"]))


def capture(arch: int, problems=PROBLEMS) -> list[dict]:
    """Rows (without compile results) of every candidate of every tuned kernel the problems
    launch, plus the untuned kernels launched beside them; a problem whose launcher fails
    gives one row with the error."""
    import triton.runtime.jit as jit
    from pydl import _tune, conv

    spec = _specializer(arch)
    picks: list[tuple[str, list[dict], object]] = []
    sink: list[tuple] = []

    def record_pick(self, key, candidates, launch, inout=()):
        candidates = _tune.unique(candidates)
        picks.append((self.name, candidates, launch))
        return candidates[0]

    def record_run(self, *args, grid, warmup, **kwargs):
        sink.append((self, list(grid) if isinstance(grid, (tuple, list)) else None, args,
                     kwargs))
        return None

    saved = (_tune.Tuner.pick, jit.JITFunction.run, getattr(conv, "_multiprocessors", None))
    _tune.Tuner.pick, jit.JITFunction.run = record_pick, record_run
    if saved[2] is not None:
        conv._multiprocessors = lambda device: SMS
    rows: list[dict] = []
    try:
        for family, case, run in problems:
            picks.clear()
            sink.clear()
            base = dict(family=family, case=case)
            try:
                run()
                direct = list(sink)
                tuned_fns, untuned = set(), {}
                for tuner, candidates, launch in picks:
                    for i, cfg in enumerate(candidates):
                        sink.clear()
                        launch(cfg)
                        calls = list(sink)
                        if not calls:
                            raise RuntimeError(f"{tuner}: launch({cfg}) launched no kernel")
                        fn, grid, args, kwargs = calls[0]
                        tuned_fns.add(fn)
                        rows.append(dict(base, kernel=tuner, function=fn.fn.__name__,
                                         candidate=i, config=dict(cfg), grid=grid,
                                         job=spec(fn, args, kwargs)))
                        for call in calls[1:]:          # e.g. the split-K reduction
                            untuned.setdefault(call[0].fn.__name__, call)
                for call in direct:
                    if call[0] not in tuned_fns:         # e.g. attention_bwd_preprocess
                        untuned.setdefault(call[0].fn.__name__, call)
                for name, (fn, grid, args, kwargs) in untuned.items():
                    cfg = {k: v for k, v in kwargs.items() if k.isupper() and k.startswith("BLOCK")}
                    rows.append(dict(base, kernel=name, function=name, candidate=None,
                                     config=cfg, grid=grid, job=spec(fn, args, kwargs)))
            except Exception as exc:  # noqa: BLE001 - reported as the problem's row
                rows.append(dict(base, kernel=family, function=None, candidate=None, config={},
                                 grid=None, job=None,
                                 error=f"capture failed: {type(exc).__name__}: {exc}"))
    finally:
        _tune.Tuner.pick, jit.JITFunction.run = saved[:2]
        if saved[2] is not None:
            conv._multiprocessors = saved[2]
    return rows


# --- compile and read the cubin -----------------------------------------------------------------

def tool(name: str) -> str | None:
    """Path of a CUDA binary tool (cuobjdump): Triton's bundled copy, else one on PATH or in
    the CUDA toolkit."""
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001
        pass
    import shutil
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which(name) or shutil.which(name, path=os.path.join(home, "bin"))


def missing_toolchain() -> str | None:
    """Why this machine cannot compile offline (None when it can)."""
    try:
        from triton import knobs
        if not os.path.exists(knobs.nvidia.ptxas.path):
            return "Triton's ptxas is missing"
    except Exception as exc:  # noqa: BLE001
        return f"triton's NVIDIA backend is not usable: {exc}"
    if tool("cuobjdump") is None:
        return "cuobjdump is not found (Triton's bundled copy, PATH, CUDA_HOME/bin)"
    return None


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_job(job: dict) -> dict:
    """Compile one launch for its target; registers, spills, shared memory and MMA counts
    (or the error)."""
    import importlib
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                options=job["options"])
        cubin = kernel.asm["cubin"]
    except Exception as exc:  # noqa: BLE001 - a candidate the compiler refuses is a finding
        # Triton's compilation errors read "at L:C:", the source, then the message
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [""]
        where = f" ({lines[0].rstrip(':')} of {job['name']})" \
            if lines[0].startswith("at ") and len(lines) > 1 else ""
        return dict(error=f"{type(exc).__name__}: {lines[-1].strip()[:200]}{where}",
                    error_full=str(exc)[-4000:], compile_s=time.perf_counter() - t0)
    out = dict(shared=int(kernel.metadata.shared), compile_s=time.perf_counter() - t0,
               num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
            dump = [tool("cuobjdump"), str(path)]
            usage = subprocess.run(dump[:1] + ["--dump-resource-usage"] + dump[1:],
                                   capture_output=True, text=True, timeout=120).stdout
            sass = subprocess.run(dump[:1] + ["-sass"] + dump[1:], capture_output=True,
                                  text=True, timeout=120).stdout
    except Exception as exc:  # noqa: BLE001 - reported in the row
        out["error"] = f"cuobjdump failed: {type(exc).__name__}: {exc}"
        return out
    m = _RESOURCE.search(usage)
    if m is None:
        out["error"] = "cuobjdump gave no resource usage"
        return out
    out.update(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]),
               hgmma=len(re.findall(r"\bHGMMA\.", sass)),
               hmma=len(re.findall(r"\bHMMA\.", sass)))
    return out


def _compile_all(jobs: list[dict], workers: int) -> list[dict]:
    """compile_job over jobs in a pool of `workers` processes; a job whose worker died is
    retried once alone."""
    if workers <= 1:
        return [compile_job(j) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    results: list[dict | None] = [None] * len(jobs)
    retry = []
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(compile_job, j): i for i, j in enumerate(jobs)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception:  # noqa: BLE001 - a crashed worker breaks the pool
                retry.append(i)
    for i in retry:
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                results[i] = pool.submit(compile_job, jobs[i]).result()
            except Exception as exc:  # noqa: BLE001
                results[i] = dict(error=f"the compiler process died ({type(exc).__name__})")
    return results


def verdict(row: dict, arch: int) -> str:
    if row.get("error"):
        return "compile error: " + row["error"] if not row["error"].startswith("capture") \
            else row["error"]
    issues = []
    if row["shared"] > MAX_SHARED[arch]:
        issues.append("too much shared memory")
    if row["regs"] * 32 * row["num_warps"] > REGS_PER_SM:
        issues.append("too many registers")
    if row["local"] or row["stack"]:
        issues.append("spills")
    return ", ".join(issues) or "ok"


def measure(rows: list[dict], workers: int) -> list[dict]:
    """Compile every row's job (identical jobs once) and fill in its results and verdict."""
    keys, jobs = {}, []
    for r in rows:
        if r.get("job") is not None:
            k = _job_key(r["job"])
            if k not in keys:
                keys[k] = len(jobs)
                jobs.append(r["job"])
    results = _compile_all(jobs, workers)
    first: dict[tuple, int] = {}
    for r in rows:
        if r.get("job") is not None:
            r.update(results[keys[_job_key(r["job"])]])
        r["verdict"] = verdict(r, r["job"]["arch"] if r.get("job") else 90)
        if r.get("job") is not None and r["candidate"] is not None:
            same = first.setdefault((r["kernel"], r["case"], _job_key(r["job"])), r["candidate"])
            if same != r["candidate"]:
                r["same_as"] = same
                r["verdict"] += f" (the same kernel as #{same})"
    return rows


# --- output ------------------------------------------------------------------------------------

def _config_text(cfg: dict) -> str:
    return " ".join(f"{k[6:] if k.startswith('BLOCK_') else k}{v}" for k, v in cfg.items()
                    if k.startswith("BLOCK"))


def _cell(r: dict, key: str) -> str:
    if key in r:
        return str(r[key])
    job = r.get("job")
    return str(job["options"][key]) if job and key in ("num_warps", "num_stages") else ""


def table(rows: list[dict]) -> str:
    head = (f"{'kernel':26s} {'case':16s} {'#':>2s} {'config':21s} {'w':>2s} {'st':>2s} "
            f"{'grid':>9s} {'regs':>4s} {'spill':>5s} {'smem':>4s} {'wgmma':>7s} {'mma':>4s}  "
            f"verdict")
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        c = r["candidate"]
        cand = "-" if c is None else f"{c}*" if c == 0 else str(c)
        grid = "x".join(map(str, r["grid"])) if r.get("grid") else ""
        has = "regs" in r
        spill = str(r["local"] + r["stack"]) if has else ""
        smem = str(round(r["shared"] / 1024)) if "shared" in r else ""
        wgmma = (f"yes {r['hgmma']:>3d}" if r["hgmma"] else "no") if has else ""
        lines.append(
            f"{r['kernel']:26s} {r['case']:16s} {cand:>2s} {_config_text(r['config']):21s} "
            f"{_cell(r, 'num_warps'):>2s} {_cell(r, 'num_stages'):>2s} {grid:>9s} "
            f"{_cell(r, 'regs'):>4s} {spill:>5s} {smem:>4s} {wgmma:>7s} "
            f"{_cell(r, 'hmma') if has else '':>4s}  {r['verdict']}")
    return "\n".join(lines)


def _json_row(r: dict) -> dict:
    out = {k: v for k, v in r.items() if k != "job"}
    if r.get("job") is not None:
        out["signature"] = r["job"]["signature"]
        out["constexprs"] = {str(list(k)): v for k, v in r["job"]["constexprs"].items()}
        out["attrs"] = {str(list(k)): v for k, v in r["job"]["attrs"].items() if v}
    return out


def select(rows: list[dict], names: list[str]) -> tuple[list[dict], list[str]]:
    """Rows whose family is one of names or whose kernel name contains one; unknown names."""
    if not names:
        return rows, []
    keep = [r for r in rows if any(n == r["family"] or n in r["kernel"] for n in names)]
    unknown = [n for n in names if not any(n == r["family"] or n in r["kernel"] for r in rows)]
    return keep, unknown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench resources",
        description="Compile every tuning candidate of pydl's autotuned Triton kernels for a GPU "
                    "architecture without a GPU; report registers, spills, shared memory and "
                    "wgmma use per candidate.")
    p.add_argument("kernels", nargs="*",
                   help="families (gemm, conv, attention) or kernel names, or parts of them "
                        "(bwd, attention_fwd, conv2d_implicit_bwd_weight); default: all")
    p.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED),
                   help="compute capability to compile for (default 90: H100)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the rows as JSON to FILE")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="compiler processes (default: the CPUs, at most 4)")
    return p


def _needs_clean_process() -> bool:
    flags = any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off")
                for v in EMULATION_VARS)
    return flags or "pydl" in sys.modules


def _relaunch(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k not in EMULATION_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, "-m", "bench.resources", *argv], env=env,
                           cwd=str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if _needs_clean_process():
        return _relaunch(argv)
    why = missing_toolchain()
    if why:
        print(f"error: cannot compile offline: {why}", file=sys.stderr)
        return 1
    import triton
    from triton import knobs
    t0 = time.perf_counter()
    rows = capture(args.arch)
    names = sorted({r["family"] for r in rows} | {r["kernel"] for r in rows})
    rows, unknown = select(rows, args.kernels)
    if unknown:
        print(f"error: no kernel matches {', '.join(map(repr, unknown))}; known: "
              f"{', '.join(names)}", file=sys.stderr)
        return 2
    n = sum(r.get("job") is not None for r in rows)
    distinct = len({_job_key(r["job"]) for r in rows if r.get("job") is not None})
    print(f"compiling {n} launch configurations ({distinct} distinct kernels) for "
          f"sm_{args.arch} (triton {triton.__version__}, ptxas {knobs.nvidia.ptxas.version}) in "
          f"{args.jobs} process(es) ...", flush=True)
    measure(rows, args.jobs)
    print(table(rows))
    limit = MAX_SHARED[args.arch]
    print(f"\n#: candidate (* the default, what runs untuned; - a kernel without a tuner). "
          f"w, st: num_warps, num_stages. regs: per thread. spill: local + stack bytes per "
          f"thread. smem: KiB of shared memory per block (limit {limit // 1024} KiB on "
          f"sm_{args.arch}). wgmma, mma: HGMMA and HMMA (mma.sync) instructions in the SASS. "
          f"{time.perf_counter() - t0:.0f} s.")
    counts: dict[str, int] = {}
    for r in rows:
        v = r["verdict"].split(":")[0].split(" (the same")[0]
        counts[v] = counts.get(v, 0) + 1
    print("verdicts: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"arch": args.arch, "triton": triton.__version__,
             "ptxas": knobs.nvidia.ptxas.version, "max_shared": limit,
             "regs_per_sm": REGS_PER_SM, "sms": SMS,
             "rows": [_json_row(r) for r in rows]}, indent=1, default=str))
        print(f"json: {args.json}")
    bad_default = [r for r in rows if r["candidate"] in (0, None) and r.get("job") is not None
                   and r["verdict"].startswith(FAILING)]
    return 1 if bad_default or any(r.get("job") is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
