"""The flash attention's Triton launcher (kernels/triton/attention.py): tuning spaces, launch
plans per call signature, the dropout's kernel arguments. pydl/attention_hopper.py and
pydl/attention_onepass.py build their launchers on this one.
"""
from __future__ import annotations

import contextlib

import torch

from . import _env, _launch
from . import _tune as tune
from ._attention_seed import _stand_in_seed
from ._launch import (
    cdiv,
    dot_block,
    fresh,
    input_precision,
    new_output,
    next_power_of_2,
    output_maker,
)
from ._plan import Cache, Launch


def _blocks(E: int, EV: int) -> dict:
    """Emulation's tiles, and the head-dimension blocks of every config."""
    # Small tiles in emulation so that short test sequences still span several tiles.
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_D=max(16, next_power_of_2(E)),
                BLOCK_DV=max(16, next_power_of_2(EV)), num_warps=4)


# Tuning spaces (BLOCK_M, BLOCK_N, num_warps, num_stages) of the three flash kernels, after
# FlashAttention-2's split; on a GPU the first entry is the default (PYDL_TUNE=0). The forward
# and dQ programs own 64-128 query rows and stream keys; the dK/dV program owns 64-128 keys
# and streams queries in steps of 16-64, computing key-major tiles so that all four of its
# products have the key block as rows (wgmma). Pruned with `python -m bench resources`
# (sm_90, d = 128, bf16): 128-row query tiles need 8 warps (at 4 they spill), dK/dV tiles with
# 64 query rows spill; tiles that fail to compile for a head dimension (d = 256) are skipped
# by the tuner.
ATTENTION_SPACES = {
    "fwd": ((128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 32, 4, 4),
            (64, 128, 4, 3)),
    "bwd_dkdv": ((32, 128, 8, 3), (32, 64, 4, 4), (16, 64, 4, 4), (16, 128, 8, 3),
                 (64, 64, 8, 3)),
    "bwd_dq": ((128, 64, 8, 3), (128, 32, 8, 3), (64, 32, 4, 4), (64, 64, 4, 4)),
}
# fp32 without TF32 (torch's default for matmuls): tl.dot's IEEE products run on the CUDA
# cores, each thread holding its rows' operands along the whole head dim, so every tile above
# spills (2-17 KB a thread at d64; `python -m bench resources`, "d64-1k fp32" and
# "d128-1k fp32", sm_90). These, more warps to a smaller tile, hold the kernels within the
# registers at d64 and d128 (the forward then without TMA: through tensor descriptors every
# fp32 tile spilled): forward 80-96 registers, dK/dV 76-102 (the first; the others spill at
# one of the two), dQ 80-156.
ATTENTION_SPACES_IEEE = {
    "fwd": ((32, 64, 8, 2), (16, 64, 4, 2)),
    "bwd_dkdv": ((16, 64, 16, 2), (16, 32, 8, 2), (32, 32, 8, 2)),
    "bwd_dq": ((32, 64, 8, 2), (64, 32, 8, 2)),
}
ATTENTION_TUNERS = {name: tune.Tuner(f"attention_{name}") for name in ATTENTION_SPACES}


def _attention_config(kernel: str, q, k, v, is_causal: bool, mask_kind: int, dropout: bool,
                      launch) -> dict:
    """The launch config of one flash kernel; keyed on everything but the batch and heads,
    with the sequence lengths in coarse buckets."""
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    blocks = _blocks(E, EV)
    precision = input_precision(q.dtype)
    spaces = ATTENTION_SPACES_IEEE if _ieee_fp32(q) else ATTENTION_SPACES
    candidates = [
        dict(blocks, BLOCK_M=dot_block(L, bm), BLOCK_N=dot_block(S, bn), num_warps=warps,
             num_stages=stages)
        for bm, bn, warps, stages in spaces[kernel]]
    if _env.INTERPRET:
        candidates.insert(0, blocks)
    key = (q.dtype, precision, E, EV, is_causal, mask_kind, dropout,
           tune.bucket(L, hi=1 << 14), tune.bucket(S, hi=1 << 14), H != HKV)
    return ATTENTION_TUNERS[kernel].pick(key, candidates, launch)


def _ieee_fp32(q) -> bool:
    """fp32 inputs whose products are exact fp32 (TF32 off): tl.dot's IEEE path."""
    return q.dtype == torch.float32 and input_precision(q.dtype) == "ieee"


def _group(H: int, HKV: int) -> int:
    """Query heads per key/value head (grouped-query attention); 1 without heads (an empty
    call, no kernel reads it)."""
    return H // HKV if HKV else 1


def _strides4(t: torch.Tensor | None) -> tuple[int, int, int, int]:
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


def _forward_tma(q, k, v, o) -> bool:
    """Whether the flash forward moves q, k, v and o through TMA tensor descriptors: on a GPU
    that has TMA (and in emulation) when every (batch, head) slice allows it; else the
    pointer loads (pre-Hopper GPUs, unaligned or strided layouts)."""
    if _ieee_fp32(q):
        return False        # its FMA products spill every tile loaded through TMA
    bd, bdv = next_power_of_2(q.shape[3]), next_power_of_2(v.shape[3])   # boxes (>= 16 wide)
    use = _launch.tma_available(q.device) and _launch.tma_compatible(q, bd) and \
        _launch.tma_compatible(k, bd) and _launch.tma_compatible(v, bdv) and \
        _launch.tma_compatible(o, bdv)
    if use and not _env.INTERPRET:
        _launch.ensure_triton_allocator()
    return use


# Launches of the flash kernels, built once per signature (pydl/_plan.py): shapes, strides,
# dtypes, device, the mask's layout, the options, and (forward) whether TMA can address the
# tensors, which depends on their base alignment too. The dropout seed changes every call: it
# is each kernel's last scalar argument, passed by keyword.
_LAUNCHES = Cache("attention launches")


def _key(kernel: str, *tensors, **options) -> tuple:
    return (kernel, *[None if t is None else (t.shape, t.stride(), t.dtype) for t in tensors],
            tensors[0].device, input_precision(tensors[0].dtype), *options.values())


def plan_delta(o, do, acc_e: int | None = None):
    """run(o, do) -> (delta, dq_acc) for tensors of these shapes and strides, the flash
    backwards' first kernel, its outputs' allocation and its launch fixed: delta (B * H, L) =
    rowsum(dO * O); with acc_e (the single-pass backward: the query's head dim, 0 included)
    dq_acc, an fp32 (B * H, L, acc_e) accumulator the same launch zeroes, else None."""
    B, H, L, _ = o.shape
    new_delta = output_maker((B * H, L), torch.float32, o.device)
    new_acc = None if acc_e is None else output_maker((B * H, L, acc_e), torch.float32,
                                                      o.device)
    launch = _LAUNCHES.get(_key("delta", o, do, acc_e=acc_e), _plan_delta, o, do, acc_e)

    def run(o, do):
        delta = fresh(new_delta)
        if new_acc is None:
            launch(o, do, delta, delta)     # the accumulator's place: not read
            return delta, None
        acc = fresh(new_acc)   # poisoned in the tests: the launch must zero every element
        launch(o, do, delta, acc)
        return delta, acc
    return run


def _plan_delta(o, do, acc_e: int | None) -> Launch:
    from .kernels.triton import attention as kt
    B, H, L, EV = o.shape
    pre = dict(_blocks(EV, EV), BLOCK_M=16 if _env.INTERPRET else 64)
    zero = {} if acc_e is None else dict(ZERO_DQ=True, BLOCK_D=max(16, next_power_of_2(acc_e)))
    return Launch(kt.attention_bwd_preprocess, (cdiv(L, pre["BLOCK_M"]) * B * H,),
                  (*o.stride(), *do.stride(), H, L, acc_e or 0, EV),
                  dict(BLOCK_M=pre["BLOCK_M"], BLOCK_DV=pre["BLOCK_DV"], **zero))


def _seeded(launch: Launch, dropout_p: float):
    """launch called as run(*tensors, seed): the seed by keyword with dropout (it changes every
    call), else not at all (0, fixed in the launch's scalars, which keeps the direct launch)."""
    if dropout_p > 0:
        return lambda *tensors: launch(*tensors[:-1], seed=tensors[-1])
    return lambda *tensors: launch(*tensors[:-1])


def _seed_scalar(dropout_p: float) -> tuple:
    """The seed, the kernels' last scalar, fixed at 0 in a launch without dropout."""
    return () if dropout_p > 0 else (0,)


def _trial_seed(in_memory: bool, device):
    """The seed of a tuner's trial launch: 0, in memory where the kernel reads it so."""
    return _stand_in_seed(device) if in_memory else 0


def _dropout_kind(dropout_p: float, L: int, S: int, in_memory: bool = False) -> int:
    """The kernels' DROPOUT constant: off, or on with Philox counters i * S + j of 32 bits, or of
    64 where a (batch, head) plane of L x S scores would wrap a 32-bit counter; plus
    SEED_IN_MEMORY where the seed is a device tensor (`_new_seed`)."""
    from .kernels.triton import attention as kt
    if dropout_p == 0:
        return kt.DROPOUT_OFF.value
    kind = kt.DROPOUT_64 if L * S >= 2 ** 32 else kt.DROPOUT_32
    return kind.value + (kt.SEED_IN_MEMORY.value if in_memory else 0)


# The keys split over programs (FlashDecoding; kernels/triton/attention.py attention_fwd_split)
# where one program per query tile would leave the GPU mostly idle: a call with at least
# SPLIT_MIN_KEYS keys and no more query tiles (B * H * cdiv(L, BLOCK_M)) than multiprocessors,
# split into about SPLIT_PROGRAMS programs per multiprocessor. Each split gets at least
# SPLIT_MIN_TILES key tiles, and there are at most MAX_SPLITS; the last of a query tile's
# splits to finish combines them. A decoding step of 2 sequences x 32 heads against 8k cached
# keys was 64 programs of 128 key tiles each on 132 SMs (half of them idle); split 5 ways it is
# 320 programs of 26 tiles.
SPLIT_MIN_KEYS = 1024
SPLIT_PROGRAMS = 2
SPLIT_MIN_TILES = 4
MAX_SPLITS = 64
# its tile: BLOCK_M follows the queries (16-64 rows), BLOCK_N keys a step (fp32 without TF32:
# smaller, as its products' operands sit in registers; in emulation small, so that short test
# sequences make several splits)
SPLIT_BLOCK_N, SPLIT_BLOCK_N_IEEE, SPLIT_BLOCK_N_EMULATION = 64, 32, 16
SPLIT_WARPS, SPLIT_WARPS_IEEE = 4, 8


def _split_block_m(L: int) -> int:
    return dot_block(L, 64)


def split_keys(q, k, block_m: int, block_n: int) -> tuple[int, int]:
    """(splits, keys a split owns: a multiple of block_n) of a forward whose query tiles of
    block_m rows stream k's keys block_n at a time, for q (B, H, L, E) and k (.., S, E);
    (1, S): not split. Both backends' split forwards ask it."""
    B, H, L, _ = q.shape
    S = k.shape[2]
    tiles = B * H * cdiv(L, block_m)
    sms = _launch.multiprocessors(q.device)
    if S < SPLIT_MIN_KEYS or tiles == 0 or tiles > sms:
        return 1, S
    splits = min(MAX_SPLITS, cdiv(SPLIT_PROGRAMS * sms, tiles),
                 cdiv(S, block_n * SPLIT_MIN_TILES))
    keys = cdiv(cdiv(S, splits), block_n) * block_n
    splits = cdiv(S, keys)
    return (splits, keys) if splits > 1 else (1, S)


def split_count(q, k) -> tuple[int, int, int]:
    """(splits, keys a split owns, BLOCK_N) of the Triton split forward for q (B, H, L, E)
    and k (.., S, E); splits 1: the plain forward."""
    block_n = SPLIT_BLOCK_N_EMULATION if _env.INTERPRET else \
        (SPLIT_BLOCK_N_IEEE if _ieee_fp32(q) else SPLIT_BLOCK_N)
    return (*split_keys(q, k, _split_block_m(q.shape[2]), block_n), block_n)


@contextlib.contextmanager
def forced_split(block_n: int = 16):
    """Tests and offline compiles: the split forward for every call of two key tiles or more
    (both backends), the Triton one's tiles of `block_n` keys (on a GPU too); plans built
    afresh on entry and exit (the choice is a plan's)."""
    from ._plan import clear_all
    g = globals()
    names = ("SPLIT_MIN_KEYS", "SPLIT_MIN_TILES", "SPLIT_BLOCK_N", "SPLIT_BLOCK_N_IEEE",
             "SPLIT_BLOCK_N_EMULATION")
    saved = {n: g[n] for n in names}
    g.update(SPLIT_MIN_KEYS=1, SPLIT_MIN_TILES=1, SPLIT_BLOCK_N=block_n,
             SPLIT_BLOCK_N_IEEE=block_n, SPLIT_BLOCK_N_EMULATION=block_n)
    clear_all()
    try:
        yield
    finally:
        g.update(saved)
        clear_all()


def _split_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale):
    """run(q, k, v, o, lse, mask, seed) of the split forward, or None where it does not pay
    (split_count). The partials (fp32, B*H x splits x L rows of EV + 2) are allocated per
    call; the arrival counters are the stream's (pydl._launch.arrival_counters)."""
    from .kernels.triton import attention as kt
    splits, keys, block_n = split_count(q, k)
    if splits == 1:
        return None
    B, H, L, E = q.shape
    HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
    block_m = _split_block_m(L)
    tiles = B * H * cdiv(L, block_m)
    scalars = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), *_strides4(mask),
               H, L, S, E, EV, _group(H, HKV), scale, keys)
    blocks = _blocks(E, EV)
    consts = dict(IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
                  INPUT_PRECISION=input_precision(q.dtype), SCALE_NEGATIVE=scale < 0,
                  SPLITS=splits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=blocks["BLOCK_D"],
                  BLOCK_DV=blocks["BLOCK_DV"],
                  num_warps=SPLIT_WARPS_IEEE if _ieee_fp32(q) else SPLIT_WARPS, num_stages=3)
    launch = Launch(kt.attention_fwd_split, (splits * tiles,), scalars, consts)
    new_part = output_maker((B * H * splits * L * (EV + 2),), torch.float32, q.device)
    device = q.device

    def run(q, k, v, o, lse, mask, seed):
        launch(q, k, v, o, lse, q if mask is None else mask, new_part(),
               _launch.arrival_counters(device, tiles))
    return run


class _TritonAttention:
    """The flash kernels' launcher: plan_forward and plan_backward (as every launcher of
    LAUNCHERS)."""

    @staticmethod
    def plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                     in_memory=False):
        """run(q, k, v, o, lse, mask, seed) for tensors of these shapes, strides and 16-byte
        alignment (the mask, when given, at the address of the (B, H, L, S) view planned);
        in_memory: the seed is a device tensor (`_new_seed`)."""
        aligned = (q.data_ptr() | k.data_ptr() | v.data_ptr() | o.data_ptr()) % 16 == 0
        key = _key("fwd", q, k, v, mask, kind=mask_kind, causal=is_causal, scale=scale,
                   dropout=dropout_p, aligned=aligned, in_memory=in_memory)
        return _LAUNCHES.get(key, _TritonAttention._forward_run, q, k, v, o, lse, mask,
                             mask_kind, is_causal, scale, dropout_p, in_memory)

    @staticmethod
    def _forward_run(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p, in_memory):
        split = None if dropout_p > 0 else _split_forward(q, k, v, o, lse, mask, mask_kind,
                                                           is_causal, scale)
        if split is not None:
            return split
        launch = _TritonAttention._plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal,
                                                scale, dropout_p, in_memory)
        tma = launch.consts["USE_TMA"] and not _env.INTERPRET
        seeded = dropout_p > 0

        def run(q, k, v, o, lse, mask, seed):
            if tma:
                _launch.ensure_triton_allocator()      # per thread: a ContextVar
            if seeded:
                launch(q, k, v, o, lse, q if mask is None else mask, seed=seed)
            else:
                launch(q, k, v, o, lse, q if mask is None else mask)
        return run

    @staticmethod
    def _plan_forward(q, k, v, o, lse, mask, mask_kind, is_causal, scale, dropout_p,
                      in_memory) -> Launch:
        from .kernels.triton import attention as kt
        B, H, L, E = q.shape
        HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
        use_tma = _forward_tma(q, k, v, o)
        scalars = (*q.stride(), *k.stride(), *v.stride(), *o.stride(), *_strides4(mask),
                   H, L, S, E, EV, _group(H, HKV), scale, dropout_p, *_seed_scalar(dropout_p))
        consts = dict(IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
                      DROPOUT=_dropout_kind(dropout_p, L, S, in_memory),
                      INPUT_PRECISION=input_precision(q.dtype), USE_TMA=use_tma,
                      SCALE_NEGATIVE=scale < 0)

        def launch(cfg):
            return Launch(kt.attention_fwd, (cdiv(L, cfg["BLOCK_M"]) * B * H,), scalars,
                          {**consts, **cfg})

        m = mask if mask is not None else q
        cfg = _attention_config("fwd", q, k, v, is_causal, mask_kind, dropout_p > 0,
                                lambda c: _seeded(launch(c), dropout_p)(
                                    q, k, v, o, lse, m, _trial_seed(in_memory, q.device)))
        return launch(cfg)

    @staticmethod
    def plan_backward(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask, in_memory=False):
        """run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask): the delta, dK/dV and dQ
        launches for tensors of these shapes and strides (dmask: None, or a (B, H, L, S)
        output for the float mask's gradient dS, as planned; in_memory as plan_forward's)."""
        key = _key("bwd", q, k, v, o, do, mask, dq, dk, dv, dmask, kind=mask_kind,
                   causal=is_causal, scale=scale, dropout=dropout_p, in_memory=in_memory)
        return _LAUNCHES.get(key, _TritonAttention._backward_run, q, k, v, o, lse, do, dq, dk,
                             dv, mask, mask_kind, is_causal, scale, dropout_p, dmask, in_memory)

    @staticmethod
    def _backward_run(q, k, v, o, lse, do, dq, dk, dv, mask, mask_kind, is_causal, scale,
                      dropout_p, dmask, in_memory):
        delta_of = plan_delta(o, do)
        delta, _ = delta_of(o, do)      # the tuner's trials run on the real rows
        m = mask if mask is not None else q
        options = dict(kind=mask_kind, causal=is_causal, scale=scale, dropout=dropout_p,
                       in_memory=in_memory)
        dkdv = _seeded(_LAUNCHES.get(
            _key("bwd_dkdv", q, k, v, do, mask, dk, dv, **options),
            _TritonAttention._plan_backward, "bwd_dkdv", q, k, v, do, lse, delta, m, dk, dv, mask,
            mask_kind, is_causal, scale, dropout_p, in_memory), dropout_p)
        dq_out = (dq, dmask if dmask is not None else dq)
        dq_launch = _seeded(_LAUNCHES.get(
            _key("bwd_dq", q, k, v, do, mask, dq, dmask, **options),
            _TritonAttention._plan_backward, "bwd_dq", q, k, v, do, lse, delta, m, dq_out, dmask,
            mask, mask_kind, is_causal, scale, dropout_p, in_memory), dropout_p)

        def run(q, k, v, o, lse, do, dq, dk, dv, mask, seed, dmask):
            delta, _ = delta_of(o, do)
            m = q if mask is None else mask
            dkdv(q, k, v, do, lse, delta, m, dk, dv, seed)
            dq_launch(q, k, v, do, lse, delta, m, dq, dq if dmask is None else dmask, seed)
        return run

    @staticmethod
    def _plan_backward(kernel, q, k, v, do, lse, delta, m, out1, out2, mask, mask_kind, is_causal,
                       scale, dropout_p, in_memory) -> Launch:
        """The dK/dV launch (out1, out2 = dk, dv) or the dQ launch (out1 = (dq, dmask or dq),
        out2 = dmask or None)."""
        from .kernels.triton import attention as kt
        B, H, L, E = q.shape
        HKV, S, EV = k.shape[1], k.shape[2], v.shape[3]
        consts = dict(IS_CAUSAL=is_causal, MASK_KIND=mask_kind,
                      DROPOUT=_dropout_kind(dropout_p, L, S, in_memory),
                      INPUT_PRECISION=input_precision(q.dtype))
        head = (*q.stride(), *k.stride(), *v.stride(), *do.stride(), *_strides4(mask))
        seed = _seed_scalar(dropout_p)
        if kernel == "bwd_dkdv":
            dk, dv = out1, out2
            tensors = (q, k, v, do, lse, delta, m, dk, dv)

            def launch(cfg):
                return Launch(kt.attention_bwd_dkdv, (cdiv(S, cfg["BLOCK_N"]) * B * HKV,), (
                    *head, *dk.stride(), *dv.stride(), H, HKV, L, S, E, EV, _group(H, HKV), scale,
                    dropout_p, *seed), {**consts, **cfg})
        else:
            (dq, dmask_or_dq), dmask = out1, out2
            tensors = (q, k, v, do, lse, delta, m, dq, dmask_or_dq)

            def launch(cfg):
                return Launch(kt.attention_bwd_dq, (cdiv(L, cfg["BLOCK_M"]) * B * H,), (
                    *head, *dq.stride(), *_strides4(dmask), H, L, S, E, EV, _group(H, HKV), scale,
                    dropout_p, *seed), {**consts, "MASK_GRAD": dmask is not None, **cfg})

        cfg = _attention_config(kernel, q, k, v, is_causal, mask_kind, dropout_p > 0,
                                lambda c: _seeded(launch(c), dropout_p)(
                                    *tensors, _trial_seed(in_memory, q.device)))
        return launch(cfg)

    @staticmethod
    def dropout_mask(B, H, L, S, dropout_p, seed, device) -> torch.Tensor:
        """The keep mask (B, H, L, S) that forward and backward use for this seed."""
        from .kernels.triton import attention as kt
        keep = new_output((B, H, L, S), torch.int8, device)
        kt.attention_dropout_mask[(cdiv(L, 16) * B * H,)](
            keep, L, S, dropout_p, seed, DROPOUT=_dropout_kind(dropout_p, L, S), BLOCK_M=16,
            BLOCK_N=16)
        return keep.bool()
