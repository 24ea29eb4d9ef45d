"""The digits examples (examples/): each model trained a few steps on pydl's kernels follows, step
for step, the same model trained on backend "torch" (PyTorch's own ops) from the same
initialisation, and its loss goes down; one example runs end to end from its command line.

Kept small for emulation: a batch of 8 digits (4 for the CNN), tiny models, 3 Adam steps.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch

pytest.importorskip("sklearn")

from examples import _common, digits_attention, digits_cnn, digits_lstm  # noqa: E402

STEPS = 3
BATCH = {"cnn": 4}   # images per batch, 8 unless named (the CNN is the slowest in emulation)
LR = 1e-2
# Observed in emulation: 1 ulp (2.4e-7) apart after 3 steps; 1e-5 leaves 40x of room. On a GPU
# cuDNN picks its own algorithms (Winograd, FFT, split-K) for the torch side, hence more room.
TOLERANCE = (dict(rtol=1e-4, atol=1e-5) if _common.device().type == "cuda"
             else dict(rtol=1e-5, atol=1e-6))
# Tiny versions of the examples' models (their defaults are larger).
MODELS = {
    "cnn": (digits_cnn.build_model, dict(channels=(8, 16))),
    "lstm": (digits_lstm.build_model, dict(hidden_size=16)),
    "lstm-persistent": (digits_lstm.build_model, dict(hidden_size=16, algo="persistent")),
    "attention": (digits_attention.build_model, dict(dim=16, heads=2)),
}
CASES = [
    ("cnn", "triton"),
    ("lstm", "triton"),
    ("lstm-persistent", "triton"),
    ("attention", "triton"),
    ("attention", "numba"),
    pytest.param("cnn", "numba", marks=pytest.mark.sim_heavy),
    pytest.param("lstm", "numba", marks=pytest.mark.sim_heavy),
]


@pytest.fixture(scope="module")
def digits():
    return _common.load_digits(_common.device())


@pytest.fixture(autouse=True)
def _no_tf32():
    # fp32 in IEEE on both sides on a GPU (pydl follows these flags, as torch does)
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _losses(model_name: str, backend: str, x, y) -> list[float]:
    build, kwargs = MODELS[model_name]
    if backend == "torch":
        kwargs = {k: v for k, v in kwargs.items() if k != "algo"}   # torch has no algo= choice
    torch.manual_seed(0)
    model = build(backend, **kwargs).to(x.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = _common.loss_function(backend)
    return [_common.train_step(model, loss_fn, optimizer, x, y) for _ in range(STEPS)]


@pytest.mark.parametrize("model_name,backend", CASES)
def test_training_matches_torch(model_name, backend, digits):
    n = BATCH.get(model_name, 8)
    x, y = digits.x_train[:n], digits.y_train[:n]
    got = _losses(model_name, backend, x, y)
    want = _losses(model_name, "torch", x, y)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), **TOLERANCE,
                               msg=lambda m: f"{model_name} on {backend}: losses {got} vs "
                                             f"torch {want}\n{m}")
    assert all(b < a for a, b in zip(got, got[1:])), f"loss did not decrease: {got}"


def test_example_runs_end_to_end(capsys, tmp_path):
    plot = tmp_path / "loss.png"
    result = digits_lstm.main(["--epochs", "1", "--limit", "16", "--batch-size", "16",
                               "--test-limit", "16", "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "epoch   1/1" in out and "final test accuracy" in out
    assert 0.0 <= result.test_accuracy <= 1.0 and len(result.history.step_losses) == 1
    if _common.device().type == "cpu":
        assert "emulation" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert plot.stat().st_size > 0
