"""pydl: handwritten Triton and Numba CUDA kernels for the core ops of deep networks.

    import pydl
    loss = pydl.cross_entropy(logits, target)            # Triton kernel on CUDA tensors
    loss = pydl.cross_entropy(logits, target, backend="numba")
    with pydl.use_backend("torch"):                       # PyTorch's own ops, the baseline
        ...

Set PYDL_INTERPRET=1 before importing pydl to run the kernels on CPU tensors in emulation.
"""
from . import _env  # noqa: F401  (must run before triton or numba is imported)
from .backends import BACKENDS, current_backend, use_backend
from .functional import *  # noqa: F401,F403
from .functional import __all__ as _functional_all
from . import functional, nn, reference  # noqa: F401
from .patch import PatchReport, patch, unpatch  # after nn: patch maps onto its classes

__version__ = "0.1.0"
INTERPRET = _env.INTERPRET

__all__ = ["BACKENDS", "current_backend", "use_backend", "functional", "nn", "reference",
           "INTERPRET", *_functional_all]
__all__ += ["patch", "unpatch", "PatchReport"]
