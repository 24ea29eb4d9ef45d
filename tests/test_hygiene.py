"""The project's hygiene: its license, the linter CI runs, the contributor's guide, imports
that name what exists (on GPU-only paths too), and what emulation leaves of the process (the
GIL switch interval, NumPy's error state, the warning filters) outside pydl's own kernel
launches."""

import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import pydl

REPO = Path(__file__).resolve().parent.parent


# --- license, linter, CI, contributor's guide -------------------------------------------------


def test_license_is_mit_in_the_file_and_the_metadata():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License\n") and "WITHOUT WARRANTY OF ANY KIND" in text
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]


def _pinned_ruff() -> str:
    pins = re.findall(r"^ruff==(\S+)$", (REPO / "tests" / "constraints.txt").read_text(), re.M)
    assert len(pins) == 1, "tests/constraints.txt pins one ruff"
    return pins[0]


def test_ruff_passes_on_the_tree_with_the_pinned_version():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed (`make install` installs the lint extra)")
    version = subprocess.run([ruff, "--version"], capture_output=True, text=True).stdout
    assert version.split() == ["ruff", _pinned_ruff()], version
    check = subprocess.run(
        [ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_ci_lints_then_runs_the_readme_test_command():
    commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line.strip().startswith("make")
    ]
    assert commands == ["make lint", "make test"]
    assert "make test" in (REPO / "README.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    lint = makefile.split("\nlint:", 1)[1].split("\n\n", 1)[0]
    assert "ruff check ." in lint and "ruff format --check $(FORMATTED)" in lint
    assert ",lint]" in makefile  # the install brings the linter


def test_contributing_links_resolve():
    guide = (REPO / "CONTRIBUTING.md").read_text()
    links = re.findall(r"\]\(([^)#]+)(?:#([^)]+))?\)", guide)
    assert ("docs/launch-path.md", "where-a-new-op-plugs-in") in links
    for path, anchor in links:
        target = REPO / path
        assert target.exists(), path
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            slugs = {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}
            assert anchor in slugs, (path, anchor, slugs)
    for place in (
        "kernels/triton/",
        "kernels/numba/",
        "pydl/reference/",
        "pydl.backends.register",
        "autograd.Function",
        "tests/test_<op>.py",
        "bench/suites/<op>.py",
        "README",
    ):
        assert place in guide, place


def _imported_from(node, path: Path) -> str:
    """The module an ImportFrom node of file `path` (in REPO) names, relative ones resolved."""
    if not node.level:
        return node.module or ""
    package = list(path.relative_to(REPO).with_suffix("").parts[:-1])
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def test_every_from_import_names_something_that_exists():
    """Every `from pydl... import name` and `from bench... import name` in pydl/, bench/ and
    tests/, the ones inside functions included, names an attribute (or submodule) that
    exists. Many of those imports sit on paths only a GPU takes (the direct launch, TMA, the
    Hopper and cooperative kernels), so after code moves between modules a stale one would
    fail there alone; ruff checks bare names, not what an import names."""
    import ast
    import importlib

    missing, checked = [], 0
    files = [*REPO.glob("pydl/**/*.py"), *REPO.glob("bench/**/*.py"), *REPO.glob("tests/*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            name = _imported_from(node, path)
            if name.split(".")[0] not in ("pydl", "bench"):
                continue
            module = importlib.import_module(name)
            for alias in node.names:
                checked += 1
                if alias.name == "*" or hasattr(module, alias.name):
                    continue
                try:
                    importlib.import_module(f"{name}.{alias.name}")
                except ImportError:
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno} {name}.{alias.name}")
    assert checked > 500 and not missing, missing


# --- emulation leaves the process as it found it ---------------------------------------------

_PROCESS_STATE = """
import json, sys, warnings
import numpy as np, torch, triton, numba.cuda  # their own warning filters are not pydl's

def state():
    filters = [[str(getattr(f, "pattern", f)) for f in entry] for entry in warnings.filters]
    return [sys.getswitchinterval(), filters, np.geterr()]

before = state()
import pydl
assert pydl.INTERPRET
from numba.cuda.simulator import kernel as simulator
during = set()
real_call = simulator.FakeCUDAKernel.__call__
def spy(self, *args):
    during.add(sys.getswitchinterval())
    return real_call(self, *args)
simulator.FakeCUDAKernel.__call__ = spy
after_import = state()
x = torch.randn(3, 17, requires_grad=True)
t = torch.randint(0, 17, (3,))
for backend in ("numba", "triton"):
    pydl.cross_entropy(x, t, backend=backend).backward()
    pydl.softmax(x, -1, backend=backend).sum().backward()
print(json.dumps([before, after_import, state(), sorted(during)]))
"""


def test_emulation_leaves_the_process_as_it_found_it():
    """Importing pydl with PYDL_INTERPRET=1 and running its kernels leaves the GIL switch
    interval (during the Numba simulator's launches too: its barriers wake their block, so no
    shorter interval is needed), the warning filters and NumPy's error state as they were (in
    a fresh process: the test session has imported pydl already)."""
    # the emulation switches set beforehand, so numba.cuda may load before pydl
    env = dict(os.environ, PYDL_INTERPRET="1", NUMBA_ENABLE_CUDASIM="1", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-c", _PROCESS_STATE],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    before, after_import, after_ops, during = json.loads(proc.stdout.strip().splitlines()[-1])
    assert after_import == before
    assert after_ops == before
    assert during == [before[0]]


emulation_only = pytest.mark.skipif(not pydl.INTERPRET, reason="Triton's interpreter only")


@emulation_only
def test_interpreter_warnings_do_not_reach_users():
    """Triton's interpreter computes masked-off lanes too (-inf - -inf, log(0) in the
    cross-entropy and softmax kernels); NumPy's RuntimeWarnings about them stay inside pydl's
    launch, and the user's own NumPy warnings still arrive."""
    x = torch.randn(5, 37, requires_grad=True)
    t = torch.randint(0, 37, (5,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # over pytest.ini's filters
        pydl.cross_entropy(x, t, backend="triton").backward()
        pydl.softmax(x, -1, backend="triton").sum().backward()
        assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [
            f"{w.filename}:{w.lineno}: {w.message}" for w in caught
        ]
        np.log(np.zeros(1))  # the user's own: not silenced by pydl
    assert [str(w.message) for w in caught] == ["divide by zero encountered in log"]


@emulation_only
def test_a_users_numpy_error_state_does_not_break_the_kernels():
    x = torch.randn(4, 19, requires_grad=True)
    t = torch.randint(0, 19, (4,))
    with np.errstate(all="raise"):
        loss = pydl.cross_entropy(x, t, backend="triton")
        loss.backward()
        assert np.geterr()["invalid"] == "raise"
    expected = torch.nn.functional.cross_entropy(x.detach(), t)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
