"""algo="flash_onepass": the flash forward with the single-pass backward
(kernels/triton/attention_onepass.py: five products per tile instead of seven, dQ summed in
fp32 by atomics, so its last bits vary from run to run). Under
`torch.use_deterministic_algorithms(True)` the backward is the flash backward's (two passes, no
atomics: the same gradients bit for bit every run), as torch's ops with a deterministic
alternative take it there; the forward is the same kernel either way.

No attention mask and no dropout (NotImplementedError naming them, pointing to algo="flash");
causal or not, grouped-query heads, every dtype, head dim and layout the flash kernels take.
Not the default: it becomes so only after a GPU run shows it correct and faster.
"""
from __future__ import annotations

import torch

from . import _env
from . import _tune as tune
from ._launch import cdiv, dot_block, input_precision, next_power_of_2
from ._plan import Launch

LAUNCHER = "triton:flash_onepass"     # key of pydl.attention.LAUNCHERS for this algo
# (BLOCK_M, BLOCK_N, num_warps, num_stages): one program owns BLOCK_N keys (the rows of four
# of the five products) and steps through queries BLOCK_M at a time; dQ's product has the
# query step as rows, so 64 keeps it on wgmma (32: mma.sync for that one). Pruned with
# `python -m bench resources` (sm_90, d = 128, bf16): 128 x 64 tiles spill 1 KiB, 64 x 128
# ones 64-130 bytes (kept last), the rest none; see bench/TUNING.md.
ONEPASS_SPACE = ((64, 64, 8, 2), (64, 64, 8, 3), (32, 128, 8, 2), (64, 128, 8, 2))
# fp32 without TF32 multiplies on the CUDA cores (no wgmma), where 64 x 64 tiles spill tens of
# KiB at odd sizes; 32 x 64 unpipelined does not (d = 40 and 64)
ONEPASS_SPACE_FP32 = ((32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 8, 2))
TUNER = tune.Tuner("attention_bwd_onepass")


def check(mask, dropout_p: float) -> None:
    """Raise NotImplementedError for what the single-pass backward does not take."""
    what = "attn_mask" if mask is not None else "dropout" if dropout_p > 0 else None
    if what is not None:
        raise NotImplementedError(f"scaled_dot_product_attention: algo='flash_onepass' takes no "
                                  f"{what}; use algo='flash'")


def _onepass_config(q, k, v, is_causal: bool, launch, dq_acc) -> dict:
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    blocks = dict(BLOCK_D=max(16, next_power_of_2(E)), BLOCK_DV=max(16, next_power_of_2(EV)))
    cuda_cores = q.dtype == torch.float32 and input_precision(q.dtype) == "ieee"
    candidates = [dict(blocks, BLOCK_M=dot_block(L, bm), BLOCK_N=dot_block(S, bn),
                       num_warps=warps, num_stages=stages)
                  for bm, bn, warps, stages in (ONEPASS_SPACE_FP32 if cuda_cores
                                                else ONEPASS_SPACE)]
    if _env.INTERPRET:     # small tiles, so that short test sequences span several
        candidates.insert(0, dict(blocks, BLOCK_M=16, BLOCK_N=16, num_warps=4))
    key = (q.dtype, input_precision(q.dtype), E, EV, is_causal, tune.bucket(L, hi=1 << 14),
           tune.bucket(S, hi=1 << 14), H != HKV)
    return TUNER.pick(key, candidates, launch, inout=(dq_acc,))


class OnePassAttention:
    """The launcher pydl/_attention_ops.py's kernel ops plan with (plan_forward, plan_backward:
    signatures of its _TritonAttention): the flash forward, the single-pass backward."""

    @staticmethod
    def plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p):
        from ._attention_triton import _TritonAttention
        check(mask, dropout_p)
        return _TritonAttention.plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale,
                                             dropout_p)

    @staticmethod
    def plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask):
        """run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask) for tensors of these
        shapes and strides: the delta, the single pass into a zeroed fp32 dQ, its
        conversion; in deterministic mode the flash backward's run."""
        from ._attention_triton import _LAUNCHES, _key, _TritonAttention
        check(mask, dropout_p)
        if torch.are_deterministic_algorithms_enabled():
            return _TritonAttention.plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask,
                                                  mask_kind, is_causal, scale, dropout_p, dmask)
        key = _key("bwd_onepass", q, k, v, o, do, dq, dk, dv, causal=is_causal, scale=scale)
        return _LAUNCHES.get(key, _backward_run, q, k, v, o, lse, do, dq, dk, dv, is_causal,
                             scale)


def _backward_run(q, k, v, o, lse, do, dq, dk, dv, is_causal: bool, scale: float):
    from ._attention_triton import plan_delta
    from .kernels.triton import attention_onepass as k1
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    delta_of = plan_delta(o, do, acc_e=E)     # the delta and a zeroed fp32 dQ accumulator
    delta, dq_acc = delta_of(o, do)           # the tuner's trials run on the real rows
    scalars = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
               H, HKV, L, S, E, EV, H // HKV, scale)
    consts = dict(IS_CAUSAL=is_causal, INPUT_PRECISION=input_precision(q.dtype))

    def launch(cfg):
        return Launch(k1.attention_bwd_onepass, (cdiv(S, cfg["BLOCK_N"]) * B * HKV,), scalars,
                      {**consts, **cfg})

    main = launch(_onepass_config(q, k, v, is_causal, lambda c: launch(c)(
        q, k, v, do, lse, delta, dk, dv, dq_acc), dq_acc))
    block_m = 16 if _env.INTERPRET else 64
    convert = Launch(k1.attention_dq_convert, (cdiv(L, block_m) * B * H,), (*dq.stride(), H, L, E),
                     dict(BLOCK_M=block_m, BLOCK_D=max(16, next_power_of_2(E))))

    def run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask):
        delta, dq_acc = delta_of(o, do)
        main(q, k, v, do, lse, delta, dk, dv, dq_acc)
        convert(dq_acc, dq)
    return run
