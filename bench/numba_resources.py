"""`python -m bench numba-resources`: pydl's Numba kernels compiled for a GPU without one.

The CUDA simulator the emulated tests run the Numba kernels in executes them as Python: a
kernel it runs can still fail Numba's type inference or NVVM on a GPU, and it says nothing of
registers, spills or shared memory. This command compiles every Numba kernel the way a GPU
session would, per argument signature, and reports what ptxas says of each.

1. Capture (a child process, in emulation on the numba backend): the small problems of
   `python -m bench resources --all` (bench/resources.py COVERAGE: softmax, cross-entropy,
   pools, conv2d, attention, the recurrent layers and cells, fp32 and bf16, forward and
   backward) run through pydl's public functions with the simulator's kernel call replaced
   by a recorder that runs nothing. Each launch leaves its kernel and its arguments' Numba
   types: arrays as (dtype, dimensions, layout), as a GPU's CUDA-array-interface views of
   the same tensors are typed (bf16 as int16 bit patterns), Python ints, floats and bools
   as int64, float64 and boolean.
2. Compile (this process, no simulator): each distinct (kernel, signature) through
   `numba.cuda.compile_ptx` for the architecture, then ptxas -v: registers per thread,
   spill stores, static shared memory. Numba asks the driver and NVRTC only for the
   device's compute capability and the toolkit's supported ones; both are answered here
   with the target architecture, so no driver is needed (libnvvm and libdevice come from
   the CUDA toolkit: CUDA_HOME or /usr/local/cuda).

Exit status: 0; 1 when a kernel fails to compile, a capture fails or the toolchain is missing.
"""
from __future__ import annotations

import argparse
import json
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


def _capture(families: list[str], out: Path) -> int:
    from numba.cuda.simulator.kernel import FakeCUDAKernel

    from bench.resources import COVERAGE
    seen: dict[str, dict] = {}
    current = {"case": ""}

    def record(self, *args):
        fn = self.fn
        sig = [_arg_type(a) for a in args]
        key = json.dumps([fn.__module__, fn.__name__, sig])
        seen.setdefault(key, dict(module=fn.__module__, name=fn.__name__, sig=sig,
                                  case=current["case"]))

    FakeCUDAKernel.__call__ = record
    failures = []
    for family, case, run in COVERAGE:
        if family not in families or case.endswith("packed"):
            # the packed-sequence problem does not finish when its kernels do not run (not
            # investigated): its Numba kernels are the padded ones' with batch sizes
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


_PTXAS = re.compile(r"Used (\d+) registers")
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


def _compile(row: dict, arch: int, ptxas: str, tmp: Path) -> dict:
    import importlib

    from numba import cuda
    kernel = getattr(importlib.import_module(row["module"]), row["name"], None)
    if kernel is None or not hasattr(kernel, "py_func"):
        # a kernel a builder function makes per tiling (kernels/numba/gemm.py, rnn.py): a
        # closure this process cannot name from the capture's
        return dict(row, skipped="made by a builder function, not a module-level kernel")
    sig = tuple(_numba_type(t) for t in row["sig"])
    try:
        ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(arch // 10, arch % 10))
    except Exception as exc:  # noqa: BLE001
        return dict(row, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
    src = tmp / f"{row['name']}.ptx"
    src.write_text(ptx)
    done = subprocess.run([ptxas, f"-arch=sm_{arch}", "-v", str(src), "-o", str(tmp / "k.cubin")],
                          capture_output=True, text=True)
    if done.returncode:
        return dict(row, error="ptxas: " + done.stderr.strip().splitlines()[-1][:200])
    info = done.stderr
    grab = lambda rx: int(m.group(1)) if (m := rx.search(info)) else 0  # noqa: E731
    return dict(row, regs=grab(_PTXAS), spill=grab(_SPILL), smem=grab(_SMEM),
                traps=ptx.count("trap;"))


def _summary(sig: list) -> str:
    """The signature in short: each array's dtype (bf16 data are int16 arrays) and layout."""
    arrays = [f"{t[1].replace('float', 'f').replace('int', 'i')}{t[2]}{t[3]}" for t in sig
              if isinstance(t, list)]
    return " ".join(sorted(set(arrays)))


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
        captured = Path(tmp) / "launches.json"
        env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM",)}
        env.update(PYDL_INTERPRET="1", NUMBA_ENABLE_CUDASIM="1", TRITON_INTERPRET="1",
                   PYDL_BACKEND="numba", PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])))
        child = subprocess.run([sys.executable, "-m", "bench.numba_resources", *args.families,
                                "--capture", str(captured)], env=env, cwd=str(REPO_ROOT))
        if child.returncode or not captured.exists():
            print("error: the capture failed", file=sys.stderr)
            return 1
        found = json.loads(captured.read_text())
        rows = [_compile(r, args.arch, ptxas, Path(tmp)) for r in found["launches"]]
    rows.sort(key=lambda r: (r["module"], r["name"], _summary(r["sig"])))
    width = max([len(r["name"]) for r in rows] + [6])
    print(f"{'kernel':<{width}}  regs  spill  smem   trap  arrays (dtype, dims, layout)")
    for r in rows:
        if "skipped" in r:
            continue
        if "error" in r:
            print(f"{r['name']:<{width}}  FAILED ({r['case']}): {r['error']}")
        else:
            print(f"{r['name']:<{width}}  {r['regs']:<4}  {r['spill']:<5}  {r['smem']:<5}  "
                  f"{r['traps']:<4}  {_summary(r['sig'])}")
    failed = [r for r in rows if "error" in r]
    rows = [r for r in rows if "skipped" not in r] + [r for r in rows if "skipped" in r]
    done = [r for r in rows if "skipped" not in r]
    print(f"\n{len(done)} signatures of {len({r['name'] for r in done})} kernels compiled for "
          f"sm_{args.arch}: {len(failed)} failed; spills in "
          f"{sum(r.get('spill', 0) > 0 for r in rows)}. regs: per thread; spill: bytes of "
          f"spill stores; smem: static shared bytes per block; trap: PTX traps (device-side "
          f"checks).")
    built = sorted({r["name"] for r in rows if "skipped" in r})
    if built:
        print(f"not compiled (kernels made by builder functions, per tiling): "
              f"{', '.join(built)}")
    for f in found["failures"]:
        print(f"capture failed: {f}")
    return 1 if failed or found["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
