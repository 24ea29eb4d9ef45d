"""What users install: the distribution's metadata, and the Numba backend against the NumPy
and Numba a user may have (NumPy without `row_stack`, no numba at all). Each runs Python in a
subprocess, so the installed modules are changed there only."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _python(code: str, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("PYDL_INTERPRET",
                                                                  "NUMBA_ENABLE_CUDASIM")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, cwd=REPO, timeout=300)


# NumPy 2.5 removed np.row_stack (name and __all__ entry); this makes the installed NumPy look so.
_NUMPY_WITHOUT_ROW_STACK = """
import numpy as np
if hasattr(np, "row_stack"):
    del np.row_stack
    np.__all__ = [n for n in np.__all__ if n != "row_stack"]
"""


def test_numba_compiles_with_a_numpy_without_row_stack():
    """numba-cuda (0.30.4) overloads np.row_stack when its array support loads, at the first
    compile of any kernel: with NumPy 2.5 that raised AttributeError for every Numba kernel.
    After importing pydl's Numba kernels, the CUDA target's typing and lowering registries
    (what the first compile loads) load, and NumPy is left without row_stack."""
    pytest.importorskip("numba.cuda")
    code = _NUMPY_WITHOUT_ROW_STACK + """
from pydl.kernels.numba import softmax_ce                    # a kernel module, compiled lazily
from numba.cuda.descriptor import cuda_target
cuda_target.typing_context.refresh()
cuda_target.target_context.refresh()
print("row_stack after:", hasattr(np, "row_stack"))
"""
    # compiled mode (no simulator): the path a GPU takes; nothing here needs a device
    res = _python(code, NUMBA_ENABLE_CUDASIM="0")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "row_stack after: False" in res.stdout


def test_numba_backend_without_numba_names_the_extra():
    """numba is an optional extra: without it the numba backend raises an ImportError saying
    what to install, and the Triton backend runs as before."""
    code = """
import sys
class NoNumba:
    def find_spec(self, name, path=None, target=None):
        if name == "numba" or name.startswith("numba."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, NoNumba())
import torch, pydl
x = torch.randn(3, 5)
assert torch.allclose(pydl.softmax(x, -1, backend="triton"), torch.softmax(x, -1), atol=1e-6)
try:
    pydl.softmax(x, -1, backend="numba")
except ImportError as exc:
    print("ImportError:", exc)
"""
    res = _python(code, PYDL_INTERPRET="1")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "ImportError:" in res.stdout and 'pip install "pydl-kernels[numba]"' in res.stdout


def test_distribution_metadata_fits_users():
    """The distribution name is not PyPI's unrelated `pydl`; numpy is uncapped for users (the
    emulated test environment's cap lives in the test setup); numba is an extra; the triton
    range admits the releases torch's CUDA wheels pin (2.11: 3.6.0, 2.13: 3.7.1); torch is at
    least the release with `enable_gqa` (2.5)."""
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    from packaging.requirements import Requirement
    from packaging.version import Version

    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = meta["project"]
    assert project["name"] == "pydl-kernels"
    assert "setuptools" in " ".join(meta["build-system"]["requires"])
    deps = {Requirement(d).name: Requirement(d) for d in project["dependencies"]}
    assert "numba" not in deps and "numba-cuda" not in deps
    assert {Requirement(d).name for d in project["optional-dependencies"]["numba"]} == {
        "numba", "numba-cuda"}
    for v in ("2.5", "2.6", "3.0"):
        assert Version(v) in deps["numpy"].specifier, f"numpy {v} refused"
    for v in ("3.6.0", "3.7.0", "3.7.1"):
        assert Version(v) in deps["triton"].specifier, f"triton {v} refused"
    assert Version("2.4.1") not in deps["torch"].specifier
    assert Version("2.13.0") in deps["torch"].specifier
    constraints = (REPO / "tests" / "constraints.txt").read_text()
    assert "numpy" in constraints    # the interpreter's cap: in the test setup, not for users
    assert "constraints.txt" in (REPO / "Makefile").read_text()
