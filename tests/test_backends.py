"""Backend registry and selection, the emulation switch, and the errors users see."""
import os
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE

import pydl
from pydl import _env, backends


def test_registry_lists_every_backend_for_softmax_ce():
    for op in ("softmax", "cross_entropy"):
        assert set(backends.implementations(op)) == set(pydl.BACKENDS)


def test_selection_order(monkeypatch):
    monkeypatch.delenv("PYDL_BACKEND", raising=False)
    assert pydl.current_backend() == "triton"
    monkeypatch.setenv("PYDL_BACKEND", "numba")
    assert pydl.current_backend() == "numba"
    with pydl.use_backend("torch"):
        assert pydl.current_backend() == "torch"
        with pydl.use_backend("triton"):
            assert pydl.current_backend() == "triton"
        assert pydl.current_backend() == "torch"
    assert pydl.current_backend() == "numba"


def test_backend_keyword_wins_over_context(monkeypatch):
    x = torch.randn(3, 5, device=DEVICE)
    calls = []
    impls = dict(backends._registry["softmax"])
    impls["triton"] = lambda *a: calls.append("triton") or torch.softmax(a[0], a[1])
    monkeypatch.setitem(backends._registry, "softmax", impls)
    with pydl.use_backend("torch"):
        pydl.softmax(x, 1, backend="triton")
    assert calls == ["triton"]


def test_unknown_backend_names_fail_clearly(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        pydl.softmax(torch.randn(2, 2), 1, backend="cudnn")
    with pytest.raises(ValueError, match="unknown backend"):
        with pydl.use_backend("jax"):
            pass
    monkeypatch.setenv("PYDL_BACKEND", "nope")
    with pytest.raises(ValueError, match="PYDL_BACKEND"):
        pydl.current_backend()


def test_missing_implementation_is_not_a_silent_fallback(monkeypatch):
    monkeypatch.setitem(backends._registry, "only_torch_op", {"torch": lambda x: x})
    with pytest.raises(NotImplementedError, match="no 'triton' implementation"):
        backends.dispatch("only_torch_op", "triton", torch.zeros(1))


def test_cpu_tensor_without_emulation_says_what_to_do(monkeypatch):
    monkeypatch.setattr(_env, "INTERPRET", False)
    with pytest.raises(RuntimeError, match="PYDL_INTERPRET=1"):
        pydl.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="triton")
    # the torch baseline runs anywhere
    pydl.cross_entropy(torch.randn(2, 3), torch.tensor([0, 1]), backend="torch")


def test_mixed_devices_rejected():
    if DEVICE == "cpu":
        pytest.skip("needs two devices")
    with pytest.raises(RuntimeError, match="device"):
        pydl.cross_entropy(torch.randn(2, 3, device=DEVICE), torch.tensor([0, 1]), backend="triton")


def test_interpret_switch_sets_framework_variables_before_import():
    code = ("import os, pydl; print(pydl.INTERPRET, os.environ.get('TRITON_INTERPRET'), "
            "os.environ.get('NUMBA_ENABLE_CUDASIM'))")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")}
    env["PYDL_INTERPRET"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["True", "1", "1"]
    env["PYDL_INTERPRET"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == ["False", "None", "None"]


def test_kernels_package_is_installed_under_pydl():
    import pydl.kernels.triton.softmax_ce as k
    assert hasattr(k, "cross_entropy_fwd")
