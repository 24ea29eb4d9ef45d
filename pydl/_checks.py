"""Argument checks shared by every op family: one wording for one mistake."""
from __future__ import annotations

import torch

# dtypes the kernel backends take (they accumulate in float32)
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(x, name: str, backend: str, ndims: tuple[int, ...] | None = None) -> None:
    """`x` is a tensor of a dtype `backend` runs, with one of the allowed ranks."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if backend != "torch" and x.dtype not in KERNEL_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 for the {backend!r} backend, "
                        f"got {x.dtype} (backend='torch' handles other dtypes)")
    if ndims is not None and x.dim() not in ndims:
        want = " or ".join(f"{d}-D" for d in ndims)
        raise ValueError(f"{name} must be {want}, got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
