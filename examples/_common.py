"""What the digits examples share: where they run, the data, training, evaluation, the loss plot
and the command line. Each example adds only its model.

Import this module before pydl: on a machine with no CUDA device it sets PYDL_INTERPRET=1, so
that pydl's Triton and Numba kernels run in emulation on the CPU (slow; for trying the examples
out, never a performance measurement).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "pydl" not in sys.modules:
    os.environ["PYDL_INTERPRET"] = "1"   # read once, when pydl is imported (next line)

import pydl  # noqa: E402

if pydl.INTERPRET:
    # Triton's interpreter evaluates masked-off lanes too (-inf - -inf, log(0)); the kernels
    # discard those lanes, so NumPy's warnings about them are noise (as in pytest.ini).
    for _message in ("invalid value encountered", "divide by zero encountered",
                     "overflow encountered"):
        warnings.filterwarnings("ignore", message=_message, category=RuntimeWarning)

NUM_CLASSES = 10
KERNEL_BACKENDS = ("triton", "numba")


def device() -> torch.device:
    """CUDA when there is a device and pydl compiles its kernels; the CPU otherwise."""
    return torch.device("cuda" if HAS_CUDA and not pydl.INTERPRET else "cpu")


def describe_run(backend: str) -> str:
    """One line saying where `backend` runs."""
    if device().type == "cuda":
        return f"backend {backend} on {torch.cuda.get_device_name()}"
    why = "" if HAS_CUDA else "no CUDA device: "
    if backend in KERNEL_BACKENDS:
        if not pydl.INTERPRET:
            raise RuntimeError("no CUDA device and pydl was imported without PYDL_INTERPRET=1: "
                               "import examples._common before pydl, or set PYDL_INTERPRET=1")
        return (f"{why}pydl's {backend} kernels run in emulation on the CPU (PYDL_INTERPRET=1), "
                f"which is slow; its times are not GPU performance")
    return f"{why}backend {backend} runs PyTorch's own ops on the CPU"


# --- data --------------------------------------------------------------------------------------

@dataclass
class Digits:
    """scikit-learn's 8x8 digits as (N, 8, 8) float32 images, standardised with the training
    images' mean and standard deviation, and int64 labels."""
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(dev: torch.device | str = "cpu", limit: int | None = None,
                test_limit: int | None = None, test_fraction: float = 0.2,
                split_seed: int = 0) -> Digits:
    """The 1,797 digits split into train and test (stratified, fixed by `split_seed` so that runs
    with different `--seed`s see the same split); `limit` and `test_limit` keep the first images
    of each set only."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    data = sk_load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.images.astype("float32"), data.target.astype("int64"), test_size=test_fraction,
        random_state=split_seed, stratify=data.target)
    if limit is not None:
        x_tr, y_tr = x_tr[:limit], y_tr[:limit]
    if test_limit is not None:
        x_te, y_te = x_te[:test_limit], y_te[:test_limit]
    # one mean and one std over all training pixels: keeps each image's spatial structure
    mean, std = float(x_tr.mean()), float(x_tr.std())
    t = lambda a: torch.from_numpy(a).to(dev)  # noqa: E731
    return Digits(t((x_tr - mean) / std), t(y_tr), t((x_te - mean) / std), t(y_te))


# --- training ----------------------------------------------------------------------------------

def loss_function(backend: str | None) -> torch.nn.Module:
    return pydl.nn.CrossEntropyLoss(backend=backend)


def train_step(model: torch.nn.Module, loss_fn: torch.nn.Module,
               optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimisation step on the batch (x, y); the batch's loss before the step."""
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
             batch_size: int = 512) -> float:
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(x), batch_size))
    return correct / len(x)


@dataclass
class History:
    step_losses: list[float] = field(default_factory=list)
    epoch_losses: list[float] = field(default_factory=list)   # mean over the epoch's steps
    steps_per_epoch: int = 0
    seconds: float = 0.0


def train(model: torch.nn.Module, data: Digits, *, backend: str | None, epochs: int,
          batch_size: int, lr: float, seed: int, log: Callable[[str], None] = print) -> History:
    """Adam on shuffled mini-batches; logs the mean training loss of each epoch. (The test set
    is evaluated once, at the end: in emulation one pass over it takes up to minutes.)"""
    loss_fn = loss_function(backend)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order = torch.Generator().manual_seed(seed)
    n = len(data.x_train)
    hist = History(steps_per_epoch=-(-n // batch_size))
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = torch.randperm(n, generator=order).to(data.x_train.device)
        losses = [train_step(model, loss_fn, optimizer, data.x_train[idx], data.y_train[idx])
                  for idx in perm.split(batch_size)]
        hist.step_losses += losses
        hist.epoch_losses.append(sum(losses) / len(losses))
        log(f"epoch {epoch:3d}/{epochs}  train loss {hist.epoch_losses[-1]:.4f}  "
            f"({time.perf_counter() - start:.1f} s)")
    hist.seconds = time.perf_counter() - start
    return hist


# --- plot --------------------------------------------------------------------------------------

def plot_losses(hist: History, path: str, title: str) -> bool:
    """Training loss per step and per epoch into `path` (PNG); False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    per_step = [(i + 1) / hist.steps_per_epoch for i in range(len(hist.step_losses))]
    ax.plot(per_step, hist.step_losses, lw=0.8, alpha=0.5, label="per step")
    ax.plot([e + 0.5 for e in range(len(hist.epoch_losses))], hist.epoch_losses, "o-",
            label="epoch mean")
    ax.set(xlabel="epoch", ylabel="cross-entropy (train)", yscale="log", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# --- command line ------------------------------------------------------------------------------

def parse_args(name: str, argv: Sequence[str] | None, *, epochs: int, lr: float,
               batch_size: int) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"python examples/{name}.py",
                                description=f"{name}: train on scikit-learn's 8x8 digits with pydl")
    p.add_argument("--backend", choices=pydl.BACKENDS, default="triton",
                   help="pydl's triton or numba kernels, or torch (PyTorch's own ops, the "
                        "baseline) for the same model (default: triton)")
    p.add_argument("--epochs", type=int, default=epochs, help=f"default: {epochs}")
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling (default: 0)")
    p.add_argument("--lr", type=float, default=lr, help=f"Adam's learning rate (default: {lr})")
    p.add_argument("--batch-size", type=int, default=batch_size, help=f"default: {batch_size}")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="train on the first N training images only (quick runs in emulation)")
    p.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="evaluate on the first N test images only (default: all 360)")
    p.add_argument("--plot", default=f"{name}_loss.png", metavar="PATH",
                   help=f"loss-curve PNG (default: {name}_loss.png); '' for none")
    return p.parse_args(argv)


@dataclass
class Result:
    test_accuracy: float
    history: History
    model: torch.nn.Module


def run(name: str, build_model: Callable[..., torch.nn.Module], argv: Sequence[str] | None = None,
        *, epochs: int, lr: float, batch_size: int = 64) -> Result:
    """The whole example: parse `argv`, load the data, build the model with the chosen backend,
    train, report the test accuracy and plot the loss."""
    args = parse_args(name, argv, epochs=epochs, lr=lr, batch_size=batch_size)
    print(f"{name}: {describe_run(args.backend)}", flush=True)
    data = load_digits(device(), limit=args.limit, test_limit=args.test_limit)
    torch.manual_seed(args.seed)
    model = build_model(args.backend).to(device())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{len(data.x_train)} training and {len(data.x_test)} test images; "
          f"{n_params:,} parameters", flush=True)
    hist = train(model, data, backend=args.backend, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                 log=lambda line: print(line, flush=True))
    start = time.perf_counter()
    acc = accuracy(model, data.x_test, data.y_test)
    print(f"final test accuracy: {acc:.2%} ({args.backend}, {args.epochs} epochs; "
          f"{hist.seconds:.1f} s training, {time.perf_counter() - start:.1f} s evaluation)")
    if args.plot and hist.step_losses:
        if plot_losses(hist, args.plot, f"{name} ({args.backend})"):
            print(f"loss curve: {args.plot}")
        else:
            print("matplotlib is not installed: no loss plot (pip install matplotlib)")
    return Result(acc, hist, model)
