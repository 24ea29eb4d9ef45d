"""Where the benchmark runs: GPU or emulation, decided before pydl is imported; versions.

Mode "gpu": a CUDA device and no PYDL_INTERPRET: kernels compile and are timed.
Mode "emulation": no CUDA device (or PYDL_INTERPRET=1 asked for): PYDL_INTERPRET=1 runs the
kernels on CPU tensors in the Triton interpreter and Numba's CUDA simulator; nothing is timed.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
_TRUE = {"1", "true", "yes", "on"}

NO_GPU_NOTE = (
    "No GPU: torch.cuda.is_available() is False on this machine.\n"
    "Running every variant once on tiny shapes in emulation (PYDL_INTERPRET=1: Triton's "
    "interpreter, Numba's CUDA simulator, pydl's Gluon simulator) as a correctness check "
    "against torch.\n"
    "Emulated runs are not timed: no performance numbers come from this machine.")
INTERPRET_NOTE = (
    "PYDL_INTERPRET=1 is set: the kernels run in emulation, so this run checks correctness "
    "only and reports no times.")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def prepare() -> tuple[str, bool]:
    """Decide the mode; under emulation, set PYDL_INTERPRET=1 before pydl is imported.

    Returns (mode, relaunch): relaunch is True when pydl was already imported without
    emulation on a machine with no GPU, so the caller must run itself again in a fresh process
    (see `relaunch`)."""
    gpu = has_cuda()
    if "pydl" in sys.modules:
        interpret = bool(sys.modules["pydl"].INTERPRET)
    else:
        interpret = _flag("PYDL_INTERPRET")
    if gpu and not interpret:
        return "gpu", False
    if not interpret:
        if "pydl" in sys.modules:
            return "emulation", True
        os.environ["PYDL_INTERPRET"] = "1"
    return "emulation", False


def relaunch(argv: list[str]) -> int:
    """Run `python -m bench ARGV` again with PYDL_INTERPRET=1; its exit status."""
    env = dict(os.environ, PYDL_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, "-m", "bench", *argv], env=env)


def device_name(mode: str) -> str:
    import torch
    if mode == "gpu":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, emulation)"


def git_commit() -> tuple[str | None, bool | None]:
    """(HEAD commit, whether the work tree has changes), or (None, None) outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, timeout=10)
        if head.returncode:
            return None, None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        return head.stdout.strip(), bool(dirty.stdout.strip()) if not dirty.returncode else None
    except (OSError, subprocess.SubprocessError):
        return None, None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def describe(mode: str) -> dict:
    """The header fields of a results file (see bench.schema)."""
    import torch

    import pydl
    commit, dirty = git_commit()
    return {
        "device": device_name(mode),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numba": _version("numba"),
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "dirty": dirty,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "interpret": bool(pydl.INTERPRET),
    }
