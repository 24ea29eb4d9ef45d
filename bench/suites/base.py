"""What a benchmark suite declares, and the generic parts every op family shares.

A suite is one op as the benchmark sees it: named shape sets (each case with the source of its
shape), the variants to compare, how to build random inputs, the FLOP and minimal-byte count
of a case per direction, and the roofline it is judged against ("memory": fraction of the
measured copy bandwidth, "compute": fraction of the measured bf16 matmul rate).

Adding an op family is one new module in bench/suites/ that defines `SUITES = [...]`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

DIRECTIONS: tuple[str, ...] = ("fwd", "bwd", "fwd+bwd")
SHAPE_SETS: tuple[str, ...] = ("tiny", "quick", "full")

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
}
_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
            "bfloat16": "bf16"}


def dtype_name(dtype: torch.dtype) -> str:
    for name, d in DTYPES.items():
        if d == dtype:
            return name
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str) -> torch.dtype:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; expected one of {', '.join(DTYPES)}")
    return DTYPES[key]


@dataclass(frozen=True)
class Case:
    """One shape. `source` says where the shape comes from (a model, a paper, a test need)."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Variant:
    """A callable to compare. kind: "pydl" (a pydl backend), "baseline" (torch) or "peer".
    `skip` (a reason) marks a variant that is listed but cannot run here."""
    name: str
    fn: Callable[..., torch.Tensor] | None
    kind: str
    gpu_only: bool = False
    skip: str | None = None


BASELINE = "torch"


def randn(shape, dtype: torch.dtype, device, generator: torch.Generator,
          scale: float = 1.0) -> torch.Tensor:
    """Normal random values (never zeros), drawn in fp32 on `device` and rounded to `dtype`."""
    t = torch.randn(shape, dtype=torch.float32, device=device, generator=generator)
    if scale != 1.0:
        t.mul_(scale)
    return t.to(dtype)


@dataclass
class Suite:
    """Base class; an op family subclasses it (or instantiates it with its callables)."""
    op: str                               # name on the command line and in results
    registry_op: str                      # name in pydl.backends' registry
    shape_sets: dict[str, tuple[Case, ...]]
    bound: str = "memory"                 # "memory" or "compute"
    differentiable: tuple[int, ...] = (0,)  # which inputs get gradients
    notes: str = ""
    peers: dict[str, Callable[[], Callable | None]] = field(default_factory=dict)

    # --- to override -----------------------------------------------------------------
    def make_inputs(self, case: Case, dtype: torch.dtype, device,
                    generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def pydl_fn(self, backend: str) -> Callable:
        raise NotImplementedError

    def torch_fn(self) -> Callable:
        raise NotImplementedError

    def flops(self, case: Case, direction: str) -> int | None:
        return None

    def bytes(self, case: Case, dtype: torch.dtype, direction: str) -> int | None:
        return None

    def reduction_length(self, case: Case) -> int:
        """Terms each output element sums over (sets the gate's tolerance)."""
        return case.shape[-1]

    def grad_output(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The upstream gradient used for backward: normal random like the output."""
        return randn(out.shape, out.dtype, out.device, generator)

    # --- generic ---------------------------------------------------------------------
    def cases(self, shape_set: str) -> tuple[Case, ...]:
        if shape_set not in self.shape_sets:
            raise ValueError(f"{self.op}: no shape set {shape_set!r}; "
                             f"have {', '.join(self.shape_sets)}")
        return self.shape_sets[shape_set]

    def variants(self) -> list[Variant]:
        """pydl's kernel backends, the torch baseline, then the peers that import."""
        from pydl.backends import KERNEL_BACKENDS, implementations
        have = implementations(self.registry_op)
        out = []
        for b in KERNEL_BACKENDS:
            if b in have:
                out.append(Variant(b, self.pydl_fn(b), "pydl"))
            else:
                out.append(Variant(b, None, "pydl",
                                   skip=f"pydl has no {b!r} implementation of {self.registry_op}"))
        out.append(Variant(BASELINE, self.torch_fn(), "baseline"))
        for name, load in self.peers.items():
            try:
                fn = load()
            except Exception:  # noqa: BLE001  (a peer that does not import is simply absent)
                fn = None
            if fn is not None:
                out.append(Variant(name, fn, "peer", gpu_only=True))
        return out


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
