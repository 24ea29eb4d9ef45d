"""Autotuning of Triton launch configurations: block sizes, warps and pipeline stages.

Each tuned kernel has a `Tuner` and a small candidate space written for Hopper (a handful of
configurations, not a grid search). A launcher asks `tuner.pick(key, candidates, launch)`:

  * the first candidate is the launcher's heuristic default. It is what runs in emulation
    (Triton's interpreter ignores warps and stages and has no clock), when PYDL_TUNE=0, and
    when only one candidate is left after clipping the tiles to the problem;
  * otherwise, on the first launch for a key, every candidate is run and timed on the device
    (median of CUDA-event timings, triton.testing.do_bench), the fastest is kept, and every
    later launch with that key reuses it. A candidate that does not compile for the device
    (shared memory, registers) is skipped.

Keys are chosen by the launchers so that a new batch size does not re-tune: they hold what
changes the best tile (dtype, channel counts, head dimension, kernel geometry) and a coarse
power-of-two bucket of the large dimension, capped, so that every batch of a real model falls
in one or two buckets.

Trial launches write the outputs of the real launch; tensors that a kernel reads and writes in
place (`inout`, e.g. a GEMM that accumulates into its output) are restored after the trials.
Tuning runs eagerly, on the first call, per device. During a CUDA graph capture nothing is
timed (it would synchronise): the choice of an earlier call is used, else the default, so warm
a model up before capturing it (torch.compile's "reduce-overhead" mode does).
`report()` lists the choices made so far (the benchmark records them with its results).
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Hashable, Sequence

from . import _env
from ._launch import dot_block, next_power_of_2

_LOCK = threading.Lock()
TUNE_WARMUP_MS = 5.0
TUNE_REP_MS = 20.0


def enabled() -> bool:
    """Whether launches autotune: on a GPU unless PYDL_TUNE=0; never in emulation."""
    return not _env.INTERPRET and os.environ.get("PYDL_TUNE", "1").strip() != "0"


def bucket(n: int, lo: int = 16, hi: int = 1 << 16) -> int:
    """A coarse tuning key for a size that varies with the batch: the next power of two,
    clamped to [lo, hi] (every size above hi shares one bucket)."""
    return max(lo, min(hi, next_power_of_2(max(1, n))))


# Triton's launch defaults: a config that omits them means these values.
LAUNCH_DEFAULTS = {"num_warps": 4, "num_stages": 3}


def unique(configs: Sequence[dict]) -> list[dict]:
    """The configs without repeats (clipping makes several candidates equal; a config that
    omits num_warps / num_stages equals one that gives Triton's defaults), order kept."""
    seen, out = set(), []
    for c in configs:
        k = tuple(sorted({**LAUNCH_DEFAULTS, **c}.items()))
        if k not in seen:
            seen.add(k)
            out.append(c)
    return out


# Hopper GEMM tiles, shared by the plain GEMM and the implicit-GEMM convolutions:
# (BLOCK_M, BLOCK_N, BLOCK_K for 16-bit operands, num_warps, num_stages). fp32 operands take
# half the K depth (the same shared-memory bytes per stage). The largest tiles keep 128 to 256
# fp32 accumulators per thread at 8 warps; 3 stages of 128 x 64 + 64 x 256 bf16 need 144 KiB
# of shared memory (Hopper allows 227 KiB a block).
GEMM_SPACE = (
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (64, 64, 64, 4, 3),
)
# The tiles also tried on the persistent TMA kernel (kernels/triton/gemm.py gemm_tma_kernel):
# the large ones, where the pointer kernel's per-thread address arithmetic and masks for
# 24-36 cp.async copies a K step cost the most issue slots (`python -m bench resources gemm`),
# each as one program a multiprocessor with one pipeline across its tiles ({}: the kernel's
# defaults) and with the schedules listed: the 128 x 128 tile also as two programs a
# multiprocessor (2 stages: 96 KiB each) whose pipelines drain per tile, so one's products
# fill the tensor cores while the other runs its epilogue (Triton's own persistent Hopper
# matmul found this faster than the flattened pipeline on an H200).
GEMM_TMA_SPACE = {
    (128, 128, 64): ({}, dict(FLATTEN=False, PER_SM=2, num_stages=2)),
    (128, 256, 64): ({},),
    (256, 128, 64): ({},),
}


def gemm_candidates(default: dict, m: int, n: int, k: int, itemsize: int,
                    extra: dict | None = None, tma: bool = False,
                    vector_loads: bool = True) -> list[dict]:
    """The launcher's default followed by GEMM_SPACE clipped to an (m x k) @ (k x n) problem:
    no block larger than its extent needs, 4 warps for tiles of at most 64 x 64. A tile whose
    K block covers all of k (one step: a 1x1 convolution over 64 channels) is also tried at
    one stage: nothing to prefetch, a third of the shared memory, more programs an SM.
    `tma` (the plain GEMM of one matrix whose operands TMA can address): the pipelined tiles
    of GEMM_TMA_SPACE are also tried as TMA=True, the persistent TMA kernel's (at one K step
    too: its pipeline runs across a program's tiles, loading the next ones under this one's
    products and stores). `vector_loads` False (operands loaded element by element, an
    address a register each: pydl/_gemm.py gemm_config): the pointer kernel's tiles up to
    128 x 128, at most 32 deep, 8 warps from 128 x 64 up; deeper, wider or on fewer warps
    they spilled inside the K loop on sm_90 (the 7x7 stem's im2col products)."""
    out = [default]
    for bm0, bn0, bk0, warps, stages in GEMM_SPACE:
        bm, bn = dot_block(m, bm0), dot_block(n, bn0)
        bk = dot_block(k, bk0 if itemsize <= 2 else bk0 // 2)
        tile = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, **(extra or {}),
                    num_warps=warps if bm * bn > 64 * 64 else 4, num_stages=stages)
        pointer = tile if vector_loads else None if bm * bn > 128 * 128 else dict(
            tile, BLOCK_K=min(bk, dot_block(k, 32)), num_warps=8 if bm * bn >= 128 * 64 else 4)
        if pointer is not None:
            out.append(pointer)
            if k <= pointer["BLOCK_K"]:
                out.append(dict(pointer, num_stages=1))
        if tma:                     # the schedules of the tile, as clipped to the problem
            out += [dict(tile, TMA=True, **schedule)
                    for schedule in GEMM_TMA_SPACE.get((bm0, bn0, bk0), ())]
    return unique(out)


def aliased(outputs: Sequence, inputs: Sequence) -> tuple:
    """The outputs (not None) that share storage with an input (not None): a kernel that reads
    and then overwrites them in place; the tuner must restore them after its trials."""
    ptrs = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    return tuple(t for t in outputs if t is not None and t.untyped_storage().data_ptr() in ptrs)


def _device_bench(fn: Callable[[], None], config: dict) -> float:
    from triton.testing import do_bench
    return float(do_bench(fn, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, return_mode="median"))


class Tuner:
    """The tuned configurations of one kernel, by key. `bench(fn, config)` times the thunk fn
    (which launches with config) in ms; tests replace it."""

    all: dict[str, "Tuner"] = {}

    def __init__(self, name: str):
        self.name = name
        self.chosen: dict[Hashable, dict] = {}
        self.trials: dict[Hashable, list[tuple[dict, float | None, str | None]]] = {}
        self.bench: Callable[[Callable[[], None], dict], float] = _device_bench
        Tuner.all[name] = self

    def pick(self, key: Hashable, candidates: Sequence[dict], launch: Callable[[dict], None],
             inout: Sequence = ()) -> dict:
        """The configuration to launch with. `launch(cfg)` runs the kernel with cfg (it is
        called once per candidate while tuning); `inout` are tensors the kernel both reads
        and writes, restored after the trials."""
        candidates = unique(candidates)
        if len(candidates) == 1 or not enabled():
            return candidates[0]
        import torch
        gpu = torch.cuda.is_available()
        key = (key, torch.cuda.current_device() if gpu else -1)   # devices may differ in kind
        if gpu and torch.cuda.is_current_stream_capturing():
            # timing needs synchronisation, which a CUDA graph capture forbids: a choice
            # made before (a warm-up call) is used, else the default
            with _LOCK:
                return self.chosen.get(key, candidates[0])
        with _LOCK:
            cfg = self.chosen.get(key)
        if cfg is not None:
            return cfg
        saved = [t.clone() for t in inout]
        trials: list[tuple[dict, float | None, str | None]] = []
        for c in candidates:
            try:
                ms = self.bench(lambda c=c: launch(c), c)
                trials.append((c, ms, None))
            except Exception as exc:  # noqa: BLE001 - a config the device cannot run is skipped
                trials.append((c, None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                               if str(exc) else type(exc).__name__))
            for t, s in zip(inout, saved):
                t.copy_(s)
        timed = [(ms, i) for i, (_, ms, _) in enumerate(trials) if ms is not None]
        if not timed:
            raise RuntimeError(f"pydl: no configuration of {self.name} runs for {key!r}: "
                               + "; ".join(f"{c}: {err}" for c, _, err in trials))
        best = trials[min(timed)[1]][0]
        with _LOCK:
            self.chosen[key] = best
            self.trials[key] = trials
        return best


def report() -> dict[str, list[dict]]:
    """Every choice made so far: {kernel: [{"key", "config", "ms", "candidates"}]} (JSON-able)."""
    out: dict[str, list[dict]] = {}
    with _LOCK:
        for name, tuner in sorted(Tuner.all.items()):
            rows = []
            for key, cfg in tuner.chosen.items():
                trials = tuner.trials.get(key, [])
                rows.append({"key": repr(key), "config": dict(cfg),
                             "ms": next((ms for c, ms, _ in trials if c == cfg), None),
                             "candidates": [{"config": dict(c), "ms": ms, "error": err}
                                            for c, ms, err in trials]})
            if rows:
                out[name] = rows
    return out


def reset() -> None:
    """Forget every choice, and the launch plans built from them (tests)."""
    from . import _plan
    with _LOCK:
        for tuner in Tuner.all.values():
            tuner.chosen.clear()
            tuner.trials.clear()
    _plan.clear_all()
