"""What a benchmark suite declares, and the generic parts every op family shares.

A suite is one op as the benchmark sees it: named shape sets (each case with the source of its
shape), the variants to compare, how to build random inputs, the FLOP and minimal-byte count
of a case per direction, and the roofline it is judged against ("memory": fraction of the
measured copy bandwidth, "compute": fraction of the measured bf16 matmul rate).

Variants, in this order:
  pydl     one per kernel backend ("triton", "numba"); where the suite lists algorithms for a
           backend in `algos` (backend -> algo names, as pydl's `algo=`), one per algorithm
           instead, named "<backend>-<algo>": "triton-implicit", "triton-im2col",
           "numba-im2col", "triton-flash", "triton-naive". An algorithm pydl has but the suite
           does not list is appended, so a new one shows up by itself; one the suite lists but
           pydl lacks (or a backend pydl has not registered) is listed as skipped, with why.
  torch    the baseline every speed-up is relative to (ATen/cuDNN through PyTorch)
  torch-*  torch's other kernels for the op, chosen by torch's own switches (`torch_backends`:
           e.g. SDPA's cuDNN and FlashAttention backends), GPU only: the best torch has
  peers    other libraries that are installed (GPU only)
A name given to --variants selects that variant and every variant named "<name>-...":
"triton" selects all of Triton's algorithms, "torch" the baseline and its torch-* siblings.

A case's non-tensor arguments (stride, padding, causal, ...) come from `options(case)` and are
passed to every variant's callable as keywords. A variant that cannot run a case (an
algorithm's size limit, a dtype a torch backend lacks) is reported "skipped" with a reason,
either up front (`unsupported`) or by raising `Unsupported` from its callable.

Adding an op family is one new module in bench/suites/ that defines `SUITES = [...]`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
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

    @property
    def params(self) -> dict:
        """The fields a suite's Case subclass adds (kernel, stride, causal, layout, ...)."""
        base = {f.name for f in fields(Case)}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in base}


@dataclass(frozen=True)
class Variant:
    """A callable to compare. kind: "pydl" (a pydl backend and algorithm), "baseline" (torch),
    "torch" (another of torch's kernels for the op, e.g. "torch-cudnn") or "peer".
    `skip` (a reason) marks a variant that is listed but cannot run here. `backend` and `algo`
    say what a pydl variant runs (`algo` None: the backend's default)."""
    name: str
    fn: Callable[..., torch.Tensor] | None
    kind: str
    gpu_only: bool = False
    skip: str | None = None
    backend: str | None = None
    algo: str | None = None


BASELINE = "torch"


class Unsupported(Exception):
    """Raised by a variant's callable for a case it cannot run (a torch backend with no kernel
    for this dtype or size): the gate records "skipped" with the message, not "error"."""


def variant_selected(name: str, wanted: list[str] | None) -> bool:
    """Whether --variants `wanted` selects variant `name`: by its name, or by a prefix that
    ends at a "-" ("triton" selects "triton-implicit", "torch" selects "torch-cudnn")."""
    if wanted is None:
        return True
    return any(name == w or name.startswith(w + "-") for w in wanted)


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
    algos: dict[str, tuple[str, ...]] = field(default_factory=dict)  # backend -> algos to run

    # --- to override -----------------------------------------------------------------
    def make_inputs(self, case: Case, dtype: torch.dtype, device,
                    generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def pydl_fn(self, backend: str, algo: str | None = None) -> Callable:
        """pydl's op on `backend` (with `algo` for a backend listed in `algos`)."""
        raise NotImplementedError

    def torch_fn(self) -> Callable:
        raise NotImplementedError

    def torch_backends(self) -> dict[str, Callable]:
        """torch's other kernels for the op, name ("torch-...") -> callable; run on a GPU only."""
        return {}

    def pydl_algos(self, backend: str) -> tuple[str, ...] | None:
        """The algorithms pydl has on `backend` now (None: unknown, trust `algos`)."""
        return None

    def options(self, case: Case) -> dict:
        """Keyword arguments every variant's callable gets for `case` (the op's non-tensor
        arguments: stride, padding, is_causal, ...)."""
        return {}

    def unsupported(self, case: Case, dtype: torch.dtype, variant: Variant) -> str | None:
        """Why `variant` cannot run `case` in `dtype` (reported as skipped), or None."""
        return None

    def cpu_case(self, case: Case, max_input_bytes: int) -> Case:
        """`case` shrunk for a host-path measurement on a CPU (bench/overhead.py): its first
        dimension halved until its fp32 elements take at most max_input_bytes. A suite whose
        shape is not one tensor's (a product's sizes) overrides it."""
        shape = list(case.shape)
        while math.prod(shape) * 4 > max_input_bytes and shape[0] > 1:
            shape[0] = max(1, shape[0] // 2)
        return replace(case, shape=tuple(shape))

    def tf32(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether fp32 products round to TF32 on both sides here (the gate's tolerance)."""
        return False

    def flops(self, case: Case, direction: str) -> int | None:
        return None

    def bytes(self, case: Case, dtype: torch.dtype, direction: str) -> int | None:
        return None

    def reduction_length(self, case: Case) -> int:
        """Terms each output element sums over (sets the gate's tolerance)."""
        return case.shape[-1]

    def reduction_lengths(self, case: Case) -> tuple[int, ...]:
        """Terms summed per element of the output, then of each differentiable input's
        gradient (in `differentiable` order): the gate's tolerance for each comparison."""
        return (self.reduction_length(case),) * (1 + len(self.differentiable))

    def clone_inputs(self, inputs) -> list[torch.Tensor]:
        """Fresh leaf copies of `inputs`, one set per run; the differentiable ones require
        grad. A suite whose inputs must share storage (an LSTM's weights in one buffer, as
        cuDNN wants them) overrides this to keep that layout in the copies."""
        return [t.detach().clone().requires_grad_(i in self.differentiable
                                                  and t.is_floating_point())
                for i, t in enumerate(inputs)]

    def grad_output(self, out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The upstream gradient used for backward: normal random like the output, in the
        output's memory layout (what the layer after sends back: a channels_last image's, or an
        (N, L, C) sequence's transposed view; a contiguous gradient would make every
        implementation convert it first)."""
        g = randn(out.shape, out.dtype, out.device, generator)
        return g if out.is_contiguous() else torch.empty_like(out).copy_(g)

    # --- generic ---------------------------------------------------------------------
    def cases(self, shape_set: str) -> tuple[Case, ...]:
        if shape_set not in self.shape_sets:
            raise ValueError(f"{self.op}: no shape set {shape_set!r}; "
                             f"have {', '.join(self.shape_sets)}")
        return self.shape_sets[shape_set]

    def variants(self) -> list[Variant]:
        """pydl's kernel backends (one per algorithm where `algos` lists them), the torch
        baseline, torch's other backends (GPU only), then the peers that import."""
        from pydl.backends import KERNEL_BACKENDS, implementations
        have = implementations(self.registry_op)
        out = []
        for b in KERNEL_BACKENDS:
            missing = None if b in have else \
                f"pydl has no {b!r} implementation of {self.registry_op}"
            if b not in self.algos:
                out.append(Variant(b, None if missing else self.pydl_fn(b), "pydl",
                                   skip=missing, backend=b))
                continue
            available = None if missing else self.pydl_algos(b)
            names = list(self.algos[b]) + [a for a in available or () if a not in self.algos[b]]
            for a in names:
                skip = missing
                if skip is None and available is not None and a not in available:
                    skip = (f"pydl's {b!r} backend has no algo={a!r} for {self.registry_op} "
                            f"(it has: {', '.join(available) or 'none'})")
                out.append(Variant(f"{b}-{a}", None if skip else self.pydl_fn(b, a), "pydl",
                                   skip=skip, backend=b, algo=a))
        out.append(Variant(BASELINE, self.torch_fn(), "baseline", backend=BASELINE))
        for name, fn in self.torch_backends().items():
            out.append(Variant(name, fn, "torch", gpu_only=True, backend=BASELINE))
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
