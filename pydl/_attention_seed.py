"""The attention dropout's seed: drawn per call, saved for the backward, passed to the kernels.

A host seed (an int from torch's default generator, `dropout_seed`) on the eager plan outside
CUDA graph capture; inside capture, and always in the kernel ops (what torch.compile traces,
and the numba backend's attention weights), a one-element int32 tensor drawn on the device,
which the kernels read from memory (the Triton kernels' SEED_IN_MEMORY, the Numba kernels'
array seed: kernels/numba/attention.py `seed_word`), so each replay of a graph draws anew and a
compiled graph holds no tensor on the host.
"""
from __future__ import annotations

import torch

from ._plan import capturing

_NO_SEED = torch.zeros((), dtype=torch.int64)     # the seed output without dropout


_DROPOUT_IN_CAPTURE = (
    "scaled_dot_product_attention with dropout_p > 0: a backward inside CUDA graph capture "
    "for a forward run outside it, whose dropout seed was drawn on the host, so every "
    "replay of the graph would drop the same scores (torch's kernels read a generator state "
    "that each replay advances). Capture the forward and backward together, keep the "
    "attention with dropout out of the captured region, or run it with backend='torch'")


def _new_seed(dropout_p: float, device):
    """A call's dropout seed as the eager plan's kernels take it: 0 without dropout, else
    `dropout_seed()`; inside CUDA graph capture a one-element int32 tensor drawn on the device
    by torch's generator (graph-safe: each replay draws anew), which the kernels of either
    backend read from memory."""
    if dropout_p <= 0:
        return 0
    if capturing():
        return _device_seed(device)
    return dropout_seed()


def _device_seed(device) -> torch.Tensor:
    """A seed drawn on `device` by torch's generator, as the kernels read it from memory: a
    one-element int32 tensor (graph-safe inside capture: each replay draws anew)."""
    return torch.randint(0, 2 ** 31 - 1, (1,), device=device, dtype=torch.int32)


def _stand_in_seed(device) -> torch.Tensor:
    """A device seed's stand-in (0, in memory) for a launch planned or timed before a call's
    seed exists: its dtype, shape and device are what the kernels are built for."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def _op_seed(dropout_p: float, device) -> tuple:
    """(the seed to launch with, the seed the kernel op returns and the backward reads) of a
    kernel op's call, on either backend: both an int32 tensor on the inputs' device, (1,),
    drawn there by torch's generator (graph-safe; on the CPU it is the value `dropout_seed`
    would draw) with dropout, else (0,) and a launch seed of 0. So a compiled graph's
    attention nodes are all on the device, as CUDA graphs (mode="reduce-overhead") need, and
    its output matches the op's fake in every mode, capture included."""
    if dropout_p <= 0:
        return 0, torch.empty((0,), dtype=torch.int32, device=device)
    seed = _device_seed(device)
    return seed, seed


def _op_seed_fake(dropout_p: float, device) -> torch.Tensor:
    """The seed output of `_op_seed`, for a kernel op's fake implementation."""
    return torch.empty((1 if dropout_p > 0 else 0,), dtype=torch.int32, device=device)


def _seed_mode(seed) -> tuple:
    """The launchers' trailing plan argument for a seed: (True,), in_memory, for a device
    seed, else nothing (their default)."""
    return (True,) if isinstance(seed, torch.Tensor) else ()


def _saved_seed(seed, dropout_p: float) -> torch.Tensor:
    """The seed saved for the backward: a host seed as a CPU int64 scalar, a device one as
    it is."""
    if dropout_p <= 0:
        return _NO_SEED
    return seed if isinstance(seed, torch.Tensor) else torch.tensor(seed, dtype=torch.int64)


def _seed_of(saved: torch.Tensor, dropout_p: float):
    """The kernels' seed from a saved one: the host's as an int (refused inside CUDA graph
    capture, where it would be replayed), the device's tensor as it is."""
    if dropout_p <= 0:
        return 0
    if saved.dtype == torch.int32:          # drawn on the device (`_new_seed`, `_op_seed`)
        return saved
    if capturing():
        raise RuntimeError(_DROPOUT_IN_CAPTURE)
    return int(saved)


def dropout_seed() -> int:
    """The dropout seed of the next call: drawn from torch's default generator, so
    torch.manual_seed makes dropout reproducible. Inside CUDA graph capture it raises: a seed
    drawn once would be replayed with the graph, the same mask every step."""
    if capturing():
        raise RuntimeError(_DROPOUT_IN_CAPTURE)
    return int(torch.randint(0, 2 ** 31 - 1, (1,)).item())
