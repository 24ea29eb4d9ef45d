"""algo="flash_hopper": the Gluon forward for Hopper GPUs (kernels/triton/attention_gluon.py).

Its own forward launcher beside pydl/_attention_triton.py's: the checks that say where the kernel
cannot run, its tiles and the launch. The backward is the flash backward's (the forward
writes the same output and log-sum-exp rows), so training works with either forward.

Where it cannot run the call raises NotImplementedError naming the reason and pointing to
algo="flash", which runs everywhere: emulation (Gluon kernels do not run in Triton's
interpreter), GPUs other than compute capability 9.x (wgmma is Hopper's instruction;
Blackwell has tcgen05 instead), fp32, head dims other than 64 and 128 or a value head dim
different from the query's, no keys, an attention mask, dropout, a negative scale (the kernel
scales inside the exponent after the row max), and rows a TMA descriptor cannot address (unit
column stride, 16-byte aligned base and strides). It is never chosen implicitly: the default
algo stays "flash" until a GPU run shows this one correct and faster.
"""
from __future__ import annotations

import torch

from . import _env, _launch, _plan
from . import _tune as tune

LAUNCHER = "triton:flash_hopper"      # key of pydl.attention.LAUNCHERS for this algo
HEAD_DIMS = (64, 128)
ROWS_PER_PROGRAM = 128                # two consumer warpgroups of 64 query rows
# (BLOCK_N, STAGES) per head dim, the first the default: 128-key tiles (two 64 x 128 x d
# products per consumer and tile) and as deep a K/V ring as shared memory allows beside Q:
# d = 128 takes 32 KiB of Q + 64 KiB a stage (2 stages: 160 KiB; 3: 224 of 227 KiB).
HOPPER_SPACES = {
    64: ((128, 3), (128, 4), (64, 4)),
    128: ((128, 2), (128, 3), (64, 3)),
}
TUNER = tune.Tuner("attention_fwd_hopper")


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float,
                scale: float) -> str | None:
    """Why algo="flash_hopper" cannot run these (B, H, L, E) views here; None when it can."""
    if _env.INTERPRET:
        return ("it is a Gluon kernel, which Triton's interpreter cannot run "
                "(PYDL_INTERPRET emulation)")
    cap = _launch.device_capability(q.device)
    if cap is None or cap[0] != 9:
        where = "a CPU tensor" if cap is None else f"compute capability {cap[0]}.{cap[1]}"
        return f"it needs a Hopper GPU (compute capability 9.x: wgmma and TMA), got {where}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"it takes float16 or bfloat16, got {q.dtype}"
    E, EV = q.shape[-1], v.shape[-1]
    if E != EV or E not in HEAD_DIMS:
        return (f"it takes head dims {' or '.join(map(str, HEAD_DIMS))} with value head dim "
                f"equal to the query's, got {E} and {EV}")
    if k.shape[2] == 0:
        return "it needs at least one key"
    if q.shape[0] * q.shape[1] > _plan.GRID_YZ_MAX:
        return (f"its grid has one row of programs per (batch, head), at most {_plan.GRID_YZ_MAX} "
                f"(CUDA's cap on grid axis 1), got {q.shape[0] * q.shape[1]}")
    if mask is not None:
        return "it takes no attn_mask (is_causal is supported)"
    if dropout_p > 0:
        return "it has no dropout"
    if scale < 0:
        return f"it needs scale >= 0, got {scale}"
    for t, name in ((q, "query"), (k, "key"), (v, "value")):
        if not _launch.tma_compatible(t, E):
            return (f"{name} rows are not TMA-addressable (unit last stride and 16-byte "
                    f"aligned data pointer and strides needed; got strides {tuple(t.stride())})")
    return None


def check(q, k, v, mask, dropout_p: float, scale: float) -> None:
    """Raise NotImplementedError where algo="flash_hopper" cannot run (see `unsupported`)."""
    why = unsupported(q, k, v, mask, dropout_p, scale)
    if why is not None:
        raise NotImplementedError(f"scaled_dot_product_attention: algo='flash_hopper' cannot "
                                  f"run here: {why}; use algo='flash'")


def _hopper_config(q, k, is_causal: bool, launch) -> dict:
    B, H, L, E = q.shape
    HKV, S = k.shape[1], k.shape[2]
    candidates = [dict(BLOCK_N=bn, STAGES=stages, num_warps=4)
                  for bn, stages in HOPPER_SPACES[E]]
    key = (q.dtype, E, is_causal, tune.bucket(L, hi=1 << 14), tune.bucket(S, hi=1 << 14),
           H != HKV)
    return TUNER.pick(key, candidates, launch)


class HopperAttention:
    """The launcher pydl/_attention_ops.py's kernel ops plan with (plan_forward, plan_backward:
    signatures of its _TritonAttention): the Gluon forward, the Triton flash backward."""

    @staticmethod
    def plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p):
        """run(q, k, v, o, lse, mask, seed) for tensors of these shapes and strides: the
        checks and the tile chosen once; per call only the base alignment TMA needs (the
        strides are the plan's). The launch goes through Triton's own path (JITFunction.run):
        pydl._plan.Launch's direct call is not used for a Gluon kernel, which no emulated
        test can run."""
        from .kernels.triton import attention_gluon as kg
        check(q, k, v, mask, dropout_p, scale)
        B, H, L, E = q.shape
        HKV, S = k.shape[1], k.shape[2]
        if o.numel() == 0:
            return lambda *tensors: None
        _launch.ensure_triton_allocator()          # the kernel builds its TMA descriptors
        scalars = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], H, L, S,
                   H // HKV, scale * 1.4426950408889634)    # the scale in exp2 units
        grid = (_launch.cdiv(L, ROWS_PER_PROGRAM), B * H)

        def launch(cfg, q=q, k=k, v=v, o=o, lse=lse):
            kg.attention_fwd_hopper[grid](q, k, v, o, lse, *scalars, IS_CAUSAL=is_causal,
                                          HEAD_D=E, **cfg)

        cfg = _hopper_config(q, k, is_causal, launch)

        def run(q, k, v, o, lse, mask, seed):
            if (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16:
                check(q, k, v, mask, dropout_p, scale)     # raises: not TMA-addressable
            _launch.ensure_triton_allocator()      # per thread: a ContextVar
            launch(cfg, q, k, v, o, lse)
        return run

    @staticmethod
    def plan_backward(*args):
        from ._attention_triton import _TritonAttention
        return _TritonAttention.plan_backward(*args)
