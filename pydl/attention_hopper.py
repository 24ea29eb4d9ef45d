"""algo="flash_hopper" and "flash_hopper_onepass": the Gluon kernels for Hopper GPUs
(kernels/triton/attention_gluon.py).

Their launchers beside pydl/_attention_triton.py's: the checks that say where the kernels
cannot run, their tiles and launches. "flash_hopper" is the Gluon forward with the flash
backward (the forward writes the same output and log-sum-exp rows, so training works with
either forward); "flash_hopper_onepass" the same forward with the Gluon single-pass backward
(five products a tile, dQ summed in fp32 by atomics, as FlashAttention-3), where the flash
backward still runs what the Gluon one does not take: an upstream gradient TMA cannot read
(such as the stride-0 one of `out.sum().backward()`), and deterministic mode
(`torch.use_deterministic_algorithms`: the atomics' order varies).

In emulation (PYDL_INTERPRET) the Gluon kernels run in pydl/_gluon_sim.py, a CPU simulator
of the Gluon they use (Triton's interpreter cannot run Gluon), so that their logic is tested
with every other kernel; what only hardware shows (layouts, swizzles, timing) waits for a
GPU. Where they cannot run the call raises NotImplementedError naming the reason and
pointing to algo="flash", which runs everywhere: GPUs other than compute capability 9.x
(wgmma is Hopper's instruction; Blackwell has tcgen05 instead), fp32, head dims other than
64 and 128 or a value head dim different from the query's, no keys, an attention mask,
dropout, a negative scale (the kernel scales inside the exponent after the row max), and
rows a TMA descriptor cannot address (unit column stride, 16-byte aligned base and strides,
no expanded dim: the descriptors span (batch, heads, rows, E)). It is never chosen
implicitly: the default algo stays "flash" until a GPU run shows this one correct and
faster.
"""
from __future__ import annotations

import torch

from . import _env, _launch, _plan
from . import _tune as tune

LAUNCHER = "triton:flash_hopper"      # key of pydl.attention.LAUNCHERS for this algo
ONEPASS_LAUNCHER = "triton:flash_hopper_onepass"     # and for the Gluon backward's
HEAD_DIMS = (64, 128)
ROWS_PER_PROGRAM = 128                # two consumer warpgroups of 64 query rows
# (BLOCK_N, STAGES, PERSISTENT) per head dim, the first the default: 128-key tiles (two
# 64 x 128 x d products per consumer and tile) and as deep a K/V ring as shared memory allows
# beside Q (d = 128: 32 KiB of Q + 64 KiB a stage, 2 stages 160 KiB, 3 224 of 227 KiB; the
# output leaves from the registers, so no buffer of its own). PERSISTENT: one program per
# multiprocessor, each taking every P-th work unit (128 query rows of one head; causal, two
# such tiles, the longest rows with the shortest), so that the next tile's loads overlap
# this one's last product and epilogue; else one program a unit.
HOPPER_SPACES = {
    64: ((128, 3, True), (128, 3, False), (128, 4, True), (64, 4, True)),
    128: ((128, 3, True), (128, 3, False), (128, 2, True), (64, 3, True)),
}
TUNER = tune.Tuner("attention_fwd_hopper")
# The backward's ring of query tiles (STAGES; Q and dO, 64 rows each) beside K and V (128 keys),
# P and dS: d = 128 takes 64 KiB of K and V, 32 of P and dS, 32 a stage and the layout
# conversions' scratch (compiled: 192 KiB with 2 stages, 224 with 3), d = 64 128-160 KiB.
HOPPER_BWD_STAGES = {64: (3, 4, 2), 128: (2, 3)}
BWD_TUNER = tune.Tuner("attention_bwd_hopper")


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float,
                scale: float) -> str | None:
    """Why algo="flash_hopper" cannot run these (B, H, L, E) views here; None when it can."""
    cap = _launch.device_capability(q.device)
    if not _env.INTERPRET and (cap is None or cap[0] != 9):
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
    if _work_tiles(q) >= 2**31:
        return (f"it numbers its tiles of {ROWS_PER_PROGRAM} query rows with 32-bit integers, "
                f"got {_work_tiles(q)} (batch x heads x row tiles)")
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
        if _launch.descriptor_strides(t) is None:
            return (f"{name} is expanded (stride 0 in a dim of several entries: strides "
                    f"{tuple(t.stride())}), which its TMA descriptors over (batch, heads, rows) "
                    f"cannot express; for grouped-query heads pass the key heads with "
                    f"enable_gqa=True")
    return None


def check(q, k, v, mask, dropout_p: float, scale: float, algo: str = "flash_hopper") -> None:
    """Raise NotImplementedError where `algo` (one of the Gluon forward's) cannot run (see
    `unsupported`)."""
    why = unsupported(q, k, v, mask, dropout_p, scale)
    if why is not None:
        raise NotImplementedError(f"scaled_dot_product_attention: algo={algo!r} cannot "
                                  f"run here: {why}; use algo='flash'")


def _work_tiles(q) -> int:
    """The forward's query tiles: 128 rows of one (batch, head) each."""
    B, H, L, _ = q.shape
    return B * H * _launch.cdiv(L, ROWS_PER_PROGRAM)


def _work_units(q, is_causal: bool) -> int:
    """What the forward's programs take in turn: a query tile, or, causal, a pair of them
    (the longest rows with the shortest, so that units are of about equal work)."""
    B, H, L, _ = q.shape
    per_head = _launch.cdiv(L, ROWS_PER_PROGRAM)
    return B * H * (_launch.cdiv(per_head, 2) if is_causal else per_head)


def _forward_grid(q, is_causal: bool, cfg: dict) -> tuple[int]:
    """The programs a configuration launches: one per multiprocessor (PERSISTENT), at most
    one per work unit."""
    n = _work_units(q, is_causal)
    return (min(n, _launch.multiprocessors(q.device)) if cfg["PERSISTENT"] else n,)


def _hopper_config(q, k, is_causal: bool, launch) -> dict:
    B, H, L, E = q.shape
    HKV, S = k.shape[1], k.shape[2]
    candidates = [dict(BLOCK_N=bn, STAGES=stages, PERSISTENT=persistent, num_warps=4)
                  for bn, stages, persistent in HOPPER_SPACES[E]]
    key = (q.dtype, E, is_causal, tune.bucket(L, hi=1 << 14), tune.bucket(S, hi=1 << 14),
           H != HKV)
    return TUNER.pick(key, candidates, launch)


class HopperAttention:
    """The launcher pydl/_attention_ops.py's kernel ops plan with (plan_forward, plan_backward:
    signatures of its _TritonAttention): the Gluon forward, the Triton flash backward."""

    ALGO = "flash_hopper"

    @classmethod
    def plan_forward(cls, q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p):
        """run(q, k, v, o, lse, mask, seed) for tensors of these shapes and strides: the
        checks and the tile chosen once; per call only the base alignment TMA needs (the
        strides are the plan's) and the launch (pydl._plan.Launch: on a GPU its direct path
        after the first, in emulation the Gluon simulator)."""
        from .kernels.triton import attention_gluon as kg
        algo = cls.ALGO
        check(q, k, v, mask, dropout_p, scale, algo)
        B, H, L, E = q.shape
        HKV, S = k.shape[1], k.shape[2]
        if o.numel() == 0:
            return lambda *tensors: None
        _launch.ensure_triton_allocator()          # the kernel builds its TMA descriptors
        strides = [_launch.descriptor_strides(t)[:3] for t in (q, k, v)]
        scalars = (*strides[0], *strides[1], *strides[2], *o.stride()[:3], B, H, L, S, H // HKV,
                   scale * 1.4426950408889634)    # the scale in exp2 units

        def make(cfg):
            consts = {n: c for n, c in cfg.items() if n != "PERSISTENT"}   # a grid, not code
            return _plan.Launch(kg.attention_fwd_hopper, _forward_grid(q, is_causal, cfg),
                                scalars, dict(IS_CAUSAL=is_causal, HEAD_D=E, **consts))

        fwd = make(_hopper_config(q, k, is_causal, lambda c: make(c)(q, k, v, o, lse)))

        def run(q, k, v, o, lse, mask, seed):
            if (q.data_ptr() | k.data_ptr() | v.data_ptr()) % 16:
                check(q, k, v, mask, dropout_p, scale, algo)   # raises: not TMA-addressable
            _launch.ensure_triton_allocator()      # per thread: a ContextVar
            fwd(q, k, v, o, lse)
        return run

    @staticmethod
    def plan_backward(*args):
        from ._attention_triton import _TritonAttention
        return _TritonAttention.plan_backward(*args)


def gluon_backward_takes(q, do) -> bool:
    """Whether the Gluon backward runs for the upstream gradient `do` of these (B, H, L, E)
    queries (the forward's checks passed): TMA-addressable rows, and not in deterministic
    mode; elsewhere algo="flash_hopper_onepass" takes the flash backward."""
    return (_launch.tma_compatible(do, q.shape[-1])
            and _launch.descriptor_strides(do) is not None
            and not torch.are_deterministic_algorithms_enabled())


class HopperOnePassAttention(HopperAttention):
    """algo="flash_hopper_onepass"'s launcher: the Gluon forward (HopperAttention's), the
    Gluon single-pass backward where `gluon_backward_takes`, the flash backward elsewhere."""

    ALGO = "flash_hopper_onepass"

    @staticmethod
    def plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask):
        """run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask) for tensors of these shapes
        and strides: the delta with a zeroed fp32 dQ accumulator, the single pass, dQ's
        conversion."""
        from ._attention_triton import _TritonAttention
        check(q, k, v, mask, dropout_p, scale, HopperOnePassAttention.ALGO)
        if not gluon_backward_takes(q, do):
            return _TritonAttention.plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask,
                                                  mask_kind, is_causal, scale, dropout_p, dmask)
        return _gluon_backward(q, k, v, o, lse, do, dq, dk, dv, is_causal, scale)


def _gluon_backward(q, k, v, o, lse, do, dq, dk, dv, is_causal: bool, scale: float):
    from ._attention_triton import plan_delta
    from .kernels.triton import attention_gluon as kg
    from .kernels.triton import attention_onepass as k1
    B, H, L, E = q.shape
    HKV, S = k.shape[1], k.shape[2]
    if B * H * L == 0:
        return lambda *tensors: None
    _launch.ensure_triton_allocator()
    delta_of = plan_delta(o, do, acc_e=E)       # the delta and a zeroed fp32 dQ accumulator
    strides = [_launch.descriptor_strides(t)[:3] for t in (q, k, v, do, dk, dv)]
    scalars = (*[s for st in strides for s in st], H, L, S, scale * 1.4426950408889634, scale)
    grid = (_launch.cdiv(S, ROWS_PER_PROGRAM), B * HKV)

    def make(cfg):
        return _plan.Launch(kg.attention_bwd_hopper, grid, scalars,
                            dict(GROUP=H // HKV, IS_CAUSAL=is_causal, HEAD_D=E, BLOCK_M=64,
                                 **cfg))

    delta, dq_acc = delta_of(o, do)             # the tuner's trials run on the real rows
    candidates = [dict(STAGES=stages, num_warps=4) for stages in HOPPER_BWD_STAGES[E]]
    key = (q.dtype, E, is_causal, tune.bucket(L, hi=1 << 14), tune.bucket(S, hi=1 << 14),
           H != HKV)
    bwd = make(BWD_TUNER.pick(key, candidates, lambda c: make(c)(q, k, v, do, lse, delta, dk,
                                                                dv, dq_acc), inout=(dq_acc,)))
    convert = _plan.Launch(k1.attention_dq_convert, (_launch.cdiv(L, 64) * B * H,),
                           (*dq.stride(), H, L, E), dict(BLOCK_M=64, BLOCK_D=E))

    def run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask):
        if (q.data_ptr() | k.data_ptr() | v.data_ptr() | do.data_ptr()) % 16:
            # not TMA-addressable this call (the plan's strides are): the flash backward
            from ._attention_triton import _TritonAttention
            from .attention import MASK_NONE
            _TritonAttention.plan_backward(q, k, v, o, lse, do, dq, dk, dv, None, MASK_NONE,
                                           is_causal, scale, 0.0, None)(
                q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask)
            return
        delta, dq_acc = delta_of(o, do)
        _launch.ensure_triton_allocator()      # per thread: a ContextVar
        bwd(q, k, v, do, lse, delta, dk, dv, dq_acc)
        convert(dq_acc, dq)
    return run
