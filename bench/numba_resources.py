"""`python -m bench numba-resources`: pydl's Numba kernels compiled for a GPU without one.

The CUDA simulator the emulated tests run the Numba kernels in executes them as Python: a
kernel it runs can still fail Numba's type inference or NVVM on a GPU, and it says nothing of
registers, spills or shared memory. This command compiles the Numba kernels the way a GPU
session would, per argument signature, and reports what ptxas says of each.

1. Capture (a child process, in emulation on the numba backend): the small problems of
   `python -m bench resources --all` (bench/resources.py COVERAGE: softmax, cross-entropy,
   pools, conv2d, attention, the recurrent layers and cells, packed sequences too, fp32 and
   bf16, forward and backward) run through pydl's public functions with the simulator's
   kernel call replaced by a recorder that runs nothing, and Triton's interpreted launch (a
   Triton kernel an op or a problem launches on the numba backend) by a call that runs
   nothing: those are `resources --all`'s, and the interpreter cannot run the packed case's
   grid-barrier test kernel at all (its programs run one after another, so the first waits
   forever for the others to arrive). Each launch leaves its kernel and its arguments'
   Numba types: arrays as (dtype, dimensions, layout), as a GPU's CUDA-array-interface views
   of the same tensors are typed (bf16 as int16 bit patterns), Python ints, floats and bools
   as int64, float64 and boolean.
   A kernel that a builder function makes per tiling (a closure: the GEMM, the attention
   forward and backward, the LSTM and GRU recurrences) carries the builder's tag
   (kernels/numba/_builder.py: module, builder, arguments), which the capture records so that
   the compile can make the same kernel again; the device functions a builder makes for its
   kernels are closure variables of theirs and compile with them. The launchers pick smaller
   tiles and blocks under emulation, for the simulator's speed; in the capture they pick a
   GPU's (`_gpu_launch_configs`), so the builder kernels compiled are those a GPU builds:
   the GEMM's 64 x 64 tiles of 4 x 4 per thread (and for 16-bit operands the tensor-core
   GEMM's 2 x 2 warps, and the tensor-core attention kernels' 2 or 4), the recurrences'
   8 x 32 x 32, attention's 128 threads.
2. Compile (processes without the simulator, a fresh one per kernel module, one per core at
   a time): each distinct (kernel, signature) through `numba.cuda.compile_ptx` for the
   architecture, then ptxas -v: registers per thread, spill stores, static shared memory
   (and from the PTX: device-side traps, tensor-core mma.sync instructions). A
   kernel that calls the CUDA device runtime (the recurrences' grid barrier, through
   cooperative groups) is compiled relocatable and linked with libcudadevrt by nvlink, as
   Numba links it on a GPU; its registers and shared memory are the linked kernel's. Numba
   asks the driver and NVRTC only for the device's compute capability and the toolkit's
   supported ones; both are answered here with the target architecture, so no driver is
   needed (libnvvm, libdevice and libcudadevrt come from the CUDA toolkit: CUDA_HOME or
   /usr/local/cuda).

Not covered: signatures and kernels no coverage problem launches on the numba backend (with
every family, the footer lists the kernels of kernels/numba that none launched), and the
simulator's own variants (the GEMM's `trim`, the emulation tiles). Numba's typing of the
arguments is reproduced from the simulator's arrays, not taken from a GPU's launch.

Exit status: 0; 1 when a kernel fails to compile, a capture fails or the toolchain is missing.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
FAMILIES = ("softmax", "cross_entropy", "pool", "conv", "attention", "lstm", "gru")


# --- 1. capture (in emulation) ----------------------------------------------------------------

def _arg_type(a):
    """A launch argument's Numba type, as JSON: ["array", dtype, ndim, layout] or a scalar
    type name."""
    import numpy as np
    ary = getattr(a, "_ary", a)         # the simulator's device array wraps a NumPy one
    if isinstance(ary, np.ndarray):
        layout = "C" if ary.flags.c_contiguous else "F" if ary.flags.f_contiguous else "A"
        return ["array", str(ary.dtype), ary.ndim, layout]
    if isinstance(a, (bool, np.bool_)):
        return "boolean"
    if isinstance(a, (int, np.integer)):
        return "int64"
    if isinstance(a, (float, np.floating)):
        return "float64"
    raise TypeError(f"a launch argument of type {type(a).__name__}")


def _gpu_launch_configs() -> None:
    """The launchers' GPU tiles and thread counts in place of the simulator's (in the capture
    child only): under emulation they pick small ones, for the simulator's speed
    (pydl/_gemm_numba.py SIM_TILE, SIM_MICRO, SIM_TRIM, MMA, SIM_WARPS_MMA;
    pydl/_attention_numba.py NUMBA_SIM_MMA_WARPS; pydl/_rnn_launch.py NUMBA_SIM_TILE;
    pydl/_numba_launch.py numba_threads), and the tiles and thread counts are the arguments of the
    kernel builders. Nothing runs, so the GPU's sizes cost nothing here, and each builder
    kernel is captured with the arguments a GPU launch builds it with."""
    import pydl  # noqa: F401  (every launcher module, before their names are replaced)
    from pydl import _attention_numba, _gemm_numba, _numba_launch, _rnn_launch
    _attention_numba.NUMBA_SIM_MMA_WARPS = None         # the forward's and backward's GPU warps
    _gemm_numba.SIM_TILE, _gemm_numba.SIM_MICRO = _gemm_numba.TILE, _gemm_numba.MICRO
    _gemm_numba.SIM_TRIM = False
    _gemm_numba.MMA, _gemm_numba.SIM_WARPS_MMA = True, _gemm_numba.WARPS_MMA
    _rnn_launch.NUMBA_SIM_TILE = _rnn_launch.NUMBA_TILE
    simulated = _numba_launch.numba_threads

    def gpu_threads(gpu: int) -> int:
        return gpu

    for name, module in list(sys.modules.items()):     # the launchers import it by name
        if name.startswith("pydl") and getattr(module, "numba_threads", None) is simulated:
            module.numba_threads = gpu_threads


def _capture(families: list[str], out: Path) -> int:
    from numba.cuda.simulator.kernel import FakeCUDAKernel
    from triton.runtime.interpreter import InterpretedFunction

    from bench.resources import COVERAGE
    from pydl.kernels.numba._builder import BUILT_BY
    _gpu_launch_configs()
    seen: dict[str, dict] = {}
    current = {"case": ""}

    def record(self, *args):
        fn = self.fn
        row = dict(module=fn.__module__, name=fn.__name__, sig=[_arg_type(a) for a in args],
                   case=current["case"])
        built = getattr(self, BUILT_BY, None)
        if built is not None:           # a closure: how to make it again
            row["built_by"] = list(built)
        seen.setdefault(json.dumps([row["module"], row["name"], built, row["sig"]]), row)

    FakeCUDAKernel.__call__ = record
    # Triton kernels launched on the numba backend (where an op has no Numba algo, or a
    # problem launches one directly) run nothing either: they are `python -m bench resources
    # --all`'s, and the interpreter cannot run one of them at all. The packed case ends with
    # the grid barrier's test kernel (pydl/_rnn_launch.py grid_barrier_check, a Triton
    # kernel launched cooperatively, "a GPU only"): the interpreter runs its 8 programs one
    # after another, so the first spins in kernels/triton/rnn.py grid_barrier for arrivals
    # that never come, which hung the capture. Its packed LSTM and GRU, on the Numba
    # recurrences, finish with the kernels stubbed.
    InterpretedFunction.run = lambda self, *args, **kwargs: None
    failures = []
    for family, case, run in COVERAGE:
        if family not in families:
            continue
        current["case"] = f"{family} {case}"
        try:
            run()
        except Exception as exc:  # noqa: BLE001  (reported, the others go on)
            if "is not available on the 'numba' backend" not in str(exc):  # a Triton algo's
                failures.append(f"{family} {case}: {type(exc).__name__}: {exc}")
    out.write_text(json.dumps(dict(launches=list(seen.values()), failures=failures)))
    return 0


# --- 2. compile (no simulator) ----------------------------------------------------------------

def _offline(arch: int) -> None:
    """Numba's CUDA compiler without a driver or NVRTC: the compute capability it would ask
    the device for, and the supported list it would ask NVRTC for, are the target's."""
    import types

    from numba.cuda import cuda_paths, dispatcher
    from numba.cuda.cudadrv import nvrtc
    cc = (arch // 10, arch % 10)
    nvrtc.get_supported_ccs = lambda: (cc,)
    cuda_paths._get_nvrtc_path = lambda: cuda_paths._env_path_tuple("not needed", None)
    dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=cc)


def _numba_type(t):
    import numpy as np
    from numba import types
    from numba.np import numpy_support
    if isinstance(t, list):
        _, dtype, ndim, layout = t
        return types.Array(numpy_support.from_dtype(np.dtype(dtype)), ndim, layout)
    return getattr(types, t)


_REGS = re.compile(r"[Uu]sed (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores")
_SMEM = re.compile(r"(\d+) bytes smem")


def _ptxas() -> str | None:
    """The ptxas of the CUDA toolkit whose libnvvm Numba compiles with (the PTX it writes is
    that toolkit's version, newer than what Triton's bundled ptxas may read)."""
    from shutil import which

    from numba.cuda import cuda_paths
    try:
        nvvm = Path(cuda_paths.get_cuda_paths()["nvvm"].info).resolve()
    except Exception:  # noqa: BLE001  (no toolkit found: PATH below)
        nvvm = None
    for parent in (nvvm.parents if nvvm else ()):
        if (parent / "bin" / "ptxas").exists():
            return str(parent / "bin" / "ptxas")
    return which("ptxas")


def kernel_of(row: dict):
    """The `cuda.jit` kernel a captured launch ran: a module-level one by its name, a builder's
    made again from its BUILT_BY tag (kernels/numba/_builder.py)."""
    import importlib

    from pydl.kernels.numba._builder import rebuild
    if "built_by" in row:
        return rebuild(*row["built_by"])
    return getattr(importlib.import_module(row["module"]), row["name"])


def _run(cmd: list[str]) -> tuple[str | None, str]:
    """(None, the tool's messages), or (the last line of its errors, the messages)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as exc:          # the tool is missing
        return f"{Path(cmd[0]).name}: {exc}", ""
    text = done.stdout + done.stderr
    if done.returncode:
        return f"{Path(cmd[0]).name}: " + (text.strip().splitlines() or ["failed"])[-1][:200], text
    return None, text


def _compile(row: dict, arch: int, ptxas: str, tmp: str, index: int) -> dict:
    """One captured (kernel, signature) through Numba for `arch`, then ptxas (and nvlink):
    the row with regs, spill, smem, traps and mma (tensor-core instructions), or with
    error."""
    from numba import cuda
    from numba.cuda.cudadrv.libs import get_cudalib
    sig = tuple(_numba_type(t) for t in row["sig"])
    try:
        kernel = kernel_of(row)
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(arch // 10, arch % 10))
    except Exception as exc:  # noqa: BLE001
        return dict(row, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    src, obj = Path(tmp) / f"k{index}.ptx", Path(tmp) / f"k{index}.o"
    src.write_text(ptx)
    # A kernel that calls into the CUDA device runtime (the recurrences' grid.sync(): the
    # cooperative-groups functions of libcudadevrt, which Numba links on a GPU) is compiled
    # relocatable and linked with that library, as Numba does; its registers and shared
    # memory are the linked kernel's (nvlink's report of the entry), its spills ptxas's.
    linked = ".extern .func" in ptx
    error, info = _run([ptxas, f"-arch=sm_{arch}", "-v", *(["-c"] if linked else []), str(src),
                        "-o", str(obj)])
    usage = info
    if not error and linked:
        entry = re.search(r"\.entry\s+([\w$]+)", ptx).group(1)
        error, text = _run([str(Path(ptxas).with_name("nvlink")), f"-arch=sm_{arch}", "-v",
                            str(obj), get_cudalib("cudadevrt", static=True), "-o",
                            str(obj.with_suffix(".cubin"))])
        usage = text.partition(f"Function properties for '{entry}':")[2]
    if error:
        return dict(row, error=error)
    grab = lambda rx, text: int(m.group(1)) if (m := rx.search(text)) else 0  # noqa: E731
    return dict(row, regs=grab(_REGS, usage), spill=grab(_SPILL, info),
                smem=grab(_SMEM, usage), traps=ptx.count("trap;"), mma=ptx.count("mma.sync"))


def _compile_module(rows: list[dict], arch: int, ptxas: str, tmp: str, first: int) -> list:
    return [_compile(r, arch, ptxas, tmp, first + i) for i, r in enumerate(rows)]


def _compile_all(rows: list[dict], arch: int, ptxas: str, tmp: str) -> list[dict]:
    """_compile of every row: a kernel module's rows in one job, in order, in a fresh process
    (Numba types and compiles the device functions they share once per process; a process
    kept for the next module compiled slower), one process per core at a time.

    The figures of a kernel can differ by a few registers from one process to the next,
    here as in GPU sessions: the order of the module-level declarations in the PTX Numba
    writes (its shared arrays, the environments of the device functions it links) varies
    between processes, and ptxas's allocation with it (softmax_ce.cross_entropy_prob_fwd: 64
    or 70 registers)."""
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["module"], []).append(i)
    out: list = [None] * len(rows)
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1, initializer=_offline,
                                                   initargs=(arch,), maxtasksperchild=1) as pool:
        jobs = [(idx, pool.apply_async(_compile_module, ([rows[i] for i in idx], arch, ptxas,
                                                         tmp, idx[0])))
                for idx in sorted(groups.values(), key=len, reverse=True)]
        for idx, job in jobs:
            for i, row in zip(idx, job.get()):
                out[i] = row
    return out


def _summary(sig: list) -> str:
    """The signature in short: each array's dtype (bf16 data are int16 arrays) and layout."""
    arrays = [f"{t[1].replace('float', 'f').replace('int', 'i')}{t[2]}{t[3]}" for t in sig
              if isinstance(t, list)]
    return " ".join(sorted(set(arrays)))


def _label(row: dict) -> str:
    """module.kernel, and a builder kernel's builder arguments: lstm.fwd(8,32,32)."""
    name = f"{row['module'].rsplit('.', 1)[-1]}.{row['name']}"
    if "built_by" in row:
        name += "(" + ",".join(map(str, row["built_by"][2])) + ")"
    return name


def _unlaunched(rows: list[dict]) -> list[str]:
    """The kernels of kernels/numba (module-level `cuda.jit` kernels, and builders that made
    no device function for a launched kernel) that no captured launch ran."""
    import importlib
    import pkgutil

    from numba.cuda.dispatcher import CUDADispatcher

    import pydl.kernels.numba as pkg
    from pydl.kernels.numba._builder import MADE
    for r in rows:
        if "built_by" in r:
            kernel_of(r)        # and so the device functions its builder makes
    ran = {tuple(r["built_by"][:2]) if "built_by" in r else (r["module"], r["name"])
           for r in rows}
    out = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(module).items():
            if isinstance(obj, CUDADispatcher):
                if obj.targetoptions.get("device") or obj.py_func.__module__ != module.__name__:
                    continue
            elif not isinstance(getattr(obj, MADE, None), dict) \
                    or obj.__module__ != module.__name__ or getattr(obj, MADE):
                continue
            if (module.__name__, name) not in ran:
                out.append(f"{info.name}.{name}")
    return sorted(out)


def capture(families: list[str], out: Path) -> dict | None:
    """The launches of the coverage problems of `families` (step 1, in a child process in
    emulation), as written to `out`: {"launches": rows, "failures": messages}; None when the
    child fails."""
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM",)}
    env.update(PYDL_INTERPRET="1", NUMBA_ENABLE_CUDASIM="1", TRITON_INTERPRET="1",
               PYDL_BACKEND="numba", PYTHONPATH=os.pathsep.join(
        filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
    child = subprocess.run([sys.executable, "-m", "bench.numba_resources", *families,
                            "--capture", str(out)], env=env, cwd=str(REPO_ROOT))
    if child.returncode or not out.exists():
        return None
    return json.loads(out.read_text())


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench numba-resources",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("families", nargs="*", default=list(FAMILIES),
                   help=f"problem families (default: all of {', '.join(FAMILIES)})")
    p.add_argument("--arch", type=int, default=90, help="compute capability (default 90)")
    p.add_argument("--capture", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        print(f"error: unknown families {unknown}; known: {', '.join(FAMILIES)}",
              file=sys.stderr)
        return 2
    if args.capture is not None:
        return _capture(args.families, args.capture)
    _offline(args.arch)
    ptxas = _ptxas()
    if ptxas is None:
        print("error: ptxas is not found (CUDA_HOME/bin, /usr/local/cuda/bin, PATH)",
              file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        found = capture(args.families, Path(tmp) / "launches.json")
        if found is None:
            print("error: the capture failed", file=sys.stderr)
            return 1
        rows = sorted(found["launches"], key=lambda r: (
            r["module"], r["name"], json.dumps(r.get("built_by")), _summary(r["sig"]),
            json.dumps(r["sig"])))
        rows = _compile_all(rows, args.arch, ptxas, tmp)
    labels = [_label(r) for r in rows]
    width = max(map(len, labels + ["kernel"]))
    print(f"{'kernel':<{width}}  regs  spill  smem   trap  mma  arrays (dtype, dims, layout)")
    for r, label in zip(rows, labels):
        if "error" in r:
            print(f"{label:<{width}}  FAILED ({r['case']}): {r['error']}")
        else:
            print(f"{label:<{width}}  {r['regs']:<4}  {r['spill']:<5}  {r['smem']:<5}  "
                  f"{r['traps']:<4}  {r['mma']:<3}  {_summary(r['sig'])}")
    failed = [r for r in rows if "error" in r]
    built = {_label(r) for r in rows if "built_by" in r}
    print(f"\n{len(rows)} signatures of {len(set(labels))} kernels compiled for sm_{args.arch} "
          f"({len(built)} of them made by builder functions, at a GPU's tiles and thread "
          f"counts, not emulation's): "
          f"{len(failed)} failed; spills in {sum(r.get('spill', 0) > 0 for r in rows)}. regs: "
          f"per thread; spill: bytes of spill stores; smem: static shared bytes per block; "
          f"trap: PTX traps (device-side checks); mma: PTX mma.sync (tensor-core) "
          f"instructions.")
    missing = _unlaunched(rows) if set(args.families) == set(FAMILIES) else []
    if missing:
        print(f"not launched by any problem on the numba backend (not compiled): "
              f"{', '.join(missing)}")
    for f in found["failures"]:
        print(f"capture failed: {f}")
    return 1 if failed or found["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
