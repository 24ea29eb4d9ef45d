"""Launching the recurrent layers' kernels: what the LSTM and the GRU launchers share, once per
backend (pydl/lstm.py and pydl/gru.py add their cells' kernels; pydl/rnn.py is the layer
machinery that calls them).

A layer's recurrence kernel runs a range of time steps per launch (kernels/triton/rnn.py). A
`Schedule` says how a direction's steps are launched:

    "persistent"   one launch for all steps; at most one program per SM, launched
                   cooperatively, the programs meeting at a grid barrier after every step
                   (a GPU; the Numba kernel uses grid.sync())
    "one_program"  one launch for all steps, one program owning every tile, no barrier: the
                   persistent data flow in emulation (the interpreter and the simulator run
                   programs one after another, so a barrier between them would never open)
    "steps"        one launch per step, the grid covering every tile

algo="persistent" (the default) is "persistent" on a GPU and "one_program" in emulation;
algo="steps" is "steps". Host launches per layer call then do not grow with the sequence
length except with "steps". A single step (a cell, a one-step sequence) needs no barrier and
launches plainly.

A plan (TritonPlan, NumbaPlan) is one direction's launch, built once per call: the chosen
tile (tuned per shape on a GPU, pydl/_tune.py; the candidates built once per shape,
`tile_configs`), the grid and every argument; `run(s0, s1)` launches steps [s0, s1) and
passes only the step range.

Precision of the products (`product_precision`, kernels/triton/rnn.py `dot`): a model in
fp16/bf16 never loses precision to TF32: an fp32 gradient times a 16-bit weight or input is
"split" (the gradient as a sum of two 16-bit numbers, two 16-bit tensor-core passes), an fp32
x fp32 product in such a model (W_hh W_hr with projections) "tf32x3". An fp32 model rounds as
torch would (cuDNN's TF32 setting for the layers, the matmul one for the cells:
pydl._launch.input_precision).
"""
from __future__ import annotations

import functools
from typing import Callable

import torch

from . import _env
from ._launch import (
    cdiv,
    dot_block,
    input_precision,
    next_power_of_2,
    numba_array,
    numba_blocks,
    numba_stream,
    numba_threads,
)
from ._tune import Tuner, bucket

F32 = torch.float32
ALGOS = ("persistent", "steps")     # algo= of the layers, the default first


def product_precision(a: torch.dtype, b: torch.dtype, model: torch.dtype, cudnn: bool) -> str:
    """PRECISION of a product a @ b (operand dtypes) in a model of dtype `model`."""
    if a != F32 and b != F32:
        return "ieee"                   # 16-bit operands: tensor cores, fp32 accumulation
    if a != b:
        return "split"
    if model == F32:
        return input_precision(F32, cudnn=cudnn)
    return "tf32x3"


@functools.lru_cache(maxsize=None)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The SM count the tiles are sized for when there is no GPU (emulation, the offline compile
# report): an H100's / H200's.
DEFAULT_SMS = 132


def multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sms(device.index if device.index is not None else torch.cuda.current_device())


def persistent_on(device: torch.device) -> bool:
    """Whether the programs of a launch run concurrently here (a GPU), so that a grid barrier
    can open: not in emulation, where they run one after another."""
    return device.type == "cuda" and not _env.INTERPRET


class Schedule:
    """How one layer call launches its recurrences (see the module docstring), and the
    counters of its grid barriers: two int32 per persistent launch of more than one step,
    zeroed once per call when the first is asked for (each kernel leaves them zero again,
    so a tuner's trials can reuse them)."""

    def __init__(self, algo: str, device: torch.device, n_launches: int):
        if algo == "steps":
            self.mode = "steps"
        else:
            self.mode = "persistent" if persistent_on(device) else "one_program"
        self.device, self.n_launches = device, n_launches
        self._sync = None
        self._next = 0

    def sync_slot(self):
        """The barrier counters of the next persistent launch."""
        if self._sync is None:
            self._sync = torch.zeros(2 * self.n_launches, dtype=torch.int32, device=self.device)
        if 2 * self._next + 2 > self._sync.numel():
            raise RuntimeError("pydl: a layer call made more persistent launches than planned")
        slot = self._sync[2 * self._next:2 * self._next + 2]
        self._next += 1
        return slot


def step_tiles(B: int, H: int, sms: int, min_units: int, max_units: int, max_rows: int):
    """(BLOCK_B, BLOCK_H) of a recurrence's tiles: all batch rows in one block where they fit
    (up to max_rows), the fewest units a tile that leave no more tiles than SMs (at least
    min_units: the products' minimum width), so that one step reads W_hh once across the
    chip; then, while the tiles still fit the SMs, smaller row blocks. Powers of two."""
    bb = max(16, min(next_power_of_2(B), max_rows))
    bh = min_units
    while bh < max_units and cdiv(B, bb) * cdiv(H, bh) > sms:
        bh *= 2
    bh = min(bh, max(min_units, next_power_of_2(H)))
    while bb > 16 and cdiv(B, bb // 2) * cdiv(H, bh) <= sms:
        bb //= 2        # a small layer: more row blocks while they fit
    return bb, bh


# --- Triton -----------------------------------------------------------------------------------

class TritonPlan:
    """One direction's recurrence launch on the Triton backend (see the module docstring).

    kernel[grid](*head, sync, *mid, s_begin, s_end, *tail, GRID_SYNC=..., **flags, **cfg):
    `tiles(cfg)` is the number of tiles a step has with that config."""

    def __init__(self, kernel, tuner: Tuner, key, candidates: list[dict], head: tuple,
                 mid: tuple, tail: tuple, flags: dict, tiles: Callable[[dict], int],
                 schedule: Schedule, n_steps: int):
        self.kernel, self.head, self.mid, self.tail = kernel, head, mid, tail
        self.flags, self.tiles, self.schedule, self.n_steps = flags, tiles, schedule, n_steps
        # one step needs no barrier: a plain launch over every tile
        self.mode = "steps" if schedule.mode == "persistent" and n_steps <= 1 else schedule.mode
        self.sync = schedule.sync_slot() if self.mode == "persistent" else None
        self.sync_arg = self.sync if self.sync is not None else head[0]
        trial = (0, n_steps if self.mode != "steps" else 1)
        self.cfg = tuner.pick((key, self.mode), candidates,
                              lambda cfg: self._launch(cfg, *trial))

    def _launch(self, cfg: dict, s0: int, s1: int) -> None:
        tiles = self.tiles(cfg)
        if self.mode == "persistent":
            grid = (min(tiles, multiprocessors(self.schedule.device)),)
            extra = dict(GRID_SYNC=True, launch_cooperative_grid=True)
        else:
            grid = (1,) if self.mode == "one_program" else (tiles,)
            extra = dict(GRID_SYNC=False)
        self.kernel[grid](*self.head, self.sync_arg, *self.mid, s0, s1, *self.tail,
                          **extra, **self.flags, **cfg)

    def run(self, s0: int, s1: int) -> None:
        """Launch steps [s0, s1): once, or once per step under "steps"."""
        if s1 <= s0:
            return
        if self.mode == "steps":
            for s in range(s0, s1):
                self._launch(self.cfg, s, s + 1)
        else:
            self._launch(self.cfg, s0, s1)


# Tuning spaces (BLOCK_B rows, BLOCK_H units, BLOCK_K for 16-bit operands, warps, stages) of
# the recurrence kernels, LSTM and GRU alike. The forward's tile is 4*BLOCK_H wide
# (gate-interleaved); the backward's BLOCK_H wide. A tile decides how many SMs a step uses
# against how much of W_hh each re-reads: the default fills the chip (step_tiles), these
# trade rows for units.
FWD_SPACE = ((32, 8, 64, 4, 3), (64, 8, 64, 4, 3), (16, 16, 64, 4, 3), (32, 16, 64, 4, 3),
             (64, 16, 32, 8, 3), (32, 4, 64, 4, 4))
BWD_SPACE = ((16, 16, 64, 4, 3), (32, 16, 32, 4, 3), (16, 32, 32, 4, 3), (32, 32, 32, 8, 3),
             (64, 16, 32, 8, 3), (64, 32, 64, 8, 4))


def strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    """t's strides, or n zeros for an absent tensor (its kernel flag is off)."""
    return tuple(t.stride()) if t is not None else (0,) * n


def grid_barrier_check(device: torch.device, programs: int, rounds: int):
    """Run the grid barrier's own test (kernels/triton/rnn.py grid_barrier_check) with
    `programs` programs, launched cooperatively, for `rounds` rounds (a GPU only: the barrier
    never opens in emulation). Returns (stale reads, the counters after the launch): a
    one-element int32 tensor that must hold 0, and two that must be back to 0."""
    from .kernels.triton import rnn as k
    sync = torch.zeros(2, dtype=torch.int32, device=device)
    slots = torch.full((programs,), -1, dtype=torch.int32, device=device)
    bad = torch.zeros(1, dtype=torch.int32, device=device)
    k.grid_barrier_check[(programs,)](sync, slots, bad, rounds, launch_cooperative_grid=True)
    return bad, sync


def default_tile(B: int, H: int, K: int, itemsize: int, device: torch.device,
                 backward: bool) -> dict:
    """The launch config a recurrence kernel runs untuned: step_tiles' tile (forward: 4 to 32
    units a tile, 4 gates each; backward: 16 to 32 units; up to 64 rows, wgmma's M), a K
    depth of 64 (32 for an fp32 forward), 8 warps for the tiles whose accumulators and
    operands spill at 4 (`python -m bench resources lstm gru`). `itemsize`: of the operands'
    dtype (the backward's fp32 gradients enter its products as 16-bit hi/lo pairs in a
    16-bit model)."""
    if backward:
        bb, bh = step_tiles(B, H, multiprocessors(device), 16, 32, 64)
        big = bb * bh >= 32 * 32
    else:
        bb, bh = step_tiles(B, H, multiprocessors(device), 4, 32, 64)
        big = bb * 4 * bh > 64 * 128
    return dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=dot_block(K, 64 if itemsize <= 2 else 32),
                num_warps=8 if big else 4)


def tile_candidates(default: dict, B: int, H: int, K: int, itemsize: int, min_units: int,
                    space) -> list[dict]:
    """The default tile, then `space` ((BLOCK_B, BLOCK_H, BLOCK_K for 16-bit operands,
    warps, stages)) clipped to the problem."""
    out = [default]
    for bb, bh, bk, warps, stages in space:
        out.append(dict(BLOCK_B=dot_block(B, bb),
                        BLOCK_H=max(min_units, min(bh, next_power_of_2(H))),
                        BLOCK_K=dot_block(K, bk if itemsize <= 2 else bk // 2),
                        num_warps=warps, num_stages=stages))
    return out


@functools.lru_cache(maxsize=512)
def tile_configs(name: str, B: int, H: int, K: int, dtype: torch.dtype, flags: tuple,
                 device: torch.device, backward: bool) -> tuple[tuple, list[dict]]:
    """(tuning key, candidates) of a recurrence kernel (`flags`: its sorted constexpr
    items), built once per problem: a layer's repeated calls only look them up. The key
    holds the batch in coarse buckets (pydl/_tune.py)."""
    itemsize = dtype.itemsize
    default = default_tile(B, H, K, itemsize, device, backward)
    space, min_units = (BWD_SPACE, 16) if backward else (FWD_SPACE, 4)
    return ((name, dtype, bucket(B, hi=1 << 12), H, K, flags),
            tile_candidates(default, B, H, K, itemsize, min_units, space))


class TritonRNN:
    """The Triton launches every recurrent layer shares: the GEMMs (input projection, weight
    and input gradients), the bias column sums, dropout's product. `cudnn` says which of
    torch's TF32 settings fp32 models follow (True: the layers, as cuDNN's RNN; False: the
    cells, as a cuBLAS matmul)."""
    backend = "triton"
    cudnn = True

    @classmethod
    def precision(cls, a: torch.dtype, b: torch.dtype, model: torch.dtype) -> str:
        return product_precision(a, b, model, cls.cudnn)

    @classmethod
    def gemm(cls, a, b, out, c_in=None, bias=None, model: torch.dtype | None = None) -> None:
        """out[b1, b2] = a[b1, b2] @ b[b1, b2] (+ c_in) (+ bias[b1] per column), 4-D views;
        a size-1 batch axis of an operand broadcasts, and out's second batch axis of size 1
        sums over the operands' (the semantics of pydl/_gemm_numba.py's gemm). `model`: the
        dtype of the layer (default: out's), for the precision rule."""
        from .kernels.triton import rnn as k
        B1, B2c, M, N = out.shape
        K = a.shape[3]
        B2 = a.shape[1] if a.shape[1] != 1 else b.shape[1]
        n_red = B2 if (B2c == 1 and B2 != 1) else 1
        if out.numel() == 0:
            return
        model = model or out.dtype
        if n_red == 1 and a.dtype == b.dtype:
            # the library's shared GEMM (pydl/_gemm.py) covers same-dtype products without a
            # reduction over a batch axis: the input projection, and dx / dh in fp32
            from ._gemm import gemm
            gemm(a, b, out, addend=c_in, bias=bias,
                 input_precision=cls.precision(a.dtype, b.dtype, model)
                 if a.dtype == F32 else "ieee")
            return
        if a.dtype != F32 and b.dtype == F32:
            # the fp32 operand goes first ("split" splits the first): out^T = b^T a^T
            if bias is not None:
                raise ValueError("gemm: a bias needs the fp32 operand first")
            cls.gemm(b.transpose(2, 3), a.transpose(2, 3), out.transpose(2, 3),
                     None if c_in is None else c_in.transpose(2, 3), None, model)
            return

        def batch_strides(t):
            return (tuple(0 if t.shape[i] == 1 else t.stride(i) for i in (0, 1))
                    + tuple(t.stride()[2:]))

        cfg = dict(BLOCK_M=dot_block(M, 64), BLOCK_N=dot_block(N, 64),
                   BLOCK_K=dot_block(K, 32), num_warps=4)
        grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]), min(B1 * B2c, 65535))
        k.gemm_batched[grid](
            a, b, c_in if c_in is not None else out, out, bias if bias is not None else out,
            M, N, K, B1 * B2c, B2c, n_red,
            *batch_strides(a), *batch_strides(b),
            *(batch_strides(c_in) if c_in is not None else (0,) * 4), *out.stride(),
            *((0 if bias.shape[0] == 1 else bias.stride(0), bias.stride(1))
              if bias is not None else (0, 0)),
            ACCUMULATE=c_in is not None, HAS_BIAS=bias is not None,
            PRECISION=cls.precision(a.dtype, b.dtype, model), **cfg)

    @staticmethod
    def bias_grad(dg, db1, db2) -> None:
        """db1 (and db2) = column sums of dg (T, B, N)."""
        from .kernels.triton import rnn as k
        T, B, N = dg.shape
        block_n = min(next_power_of_2(N), 64)
        k.bias_grad[(cdiv(N, block_n),)](
            dg, db1, db2 if db2 is not None else db1, T, B, N, *dg.stride(),
            WRITE_DB2=db2 is not None, BLOCK_R=min(next_power_of_2(T * B), 32),
            BLOCK_N=block_n, num_warps=4)

    @staticmethod
    def mul(x, s, y) -> None:
        """y = x * s over 3-D tensors (y may be x)."""
        from .kernels.triton import rnn as k
        block = 1024
        k.mul_3d[(cdiv(x.numel(), block),)](x, s, y, *x.shape, *x.stride(), *s.stride(),
                                             *y.stride(), BLOCK=block, num_warps=4)


# --- Numba ------------------------------------------------------------------------------------

# Tiles (rows x units x K) of the Numba recurrence kernels: 8 x 32 x 32 (256 threads) on a GPU;
# 4 x 8 x 8 (32 threads) in the simulator, where every thread is an OS thread.
NUMBA_TILE = (8, 32, 32)
NUMBA_SIM_TILE = (4, 8, 8)


def numba_tile() -> tuple[int, int, int]:
    return NUMBA_SIM_TILE if _env.INTERPRET else NUMBA_TILE


class NumbaPlan:
    """One direction's recurrence launch on the Numba backend: kernel[blocks, (TU, TB)](
    *args, s_begin, s_end, sync): sync (grid.sync() between steps) under "persistent" and
    "one_program", once per step under "steps"."""

    def __init__(self, kernel, args: tuple, tiles: int, schedule: Schedule, device):
        tb, tu, _ = numba_tile()
        self.kernel, self.args, self.schedule, self.device = kernel, args, schedule, device
        # the kernels use grid.sync(), so Numba launches them cooperatively: at most one
        # block per SM (the blocks loop over the tiles); one in the simulator
        self.blocks = 1 if _env.INTERPRET else max(1, min(tiles, multiprocessors(device)))
        self.threads = (tu, tb)

    def _launch(self, s0: int, s1: int, sync: bool) -> None:
        self.kernel[self.blocks, self.threads, numba_stream(self.device)](
            *self.args, s0, s1, sync)

    def run(self, s0: int, s1: int) -> None:
        if s1 <= s0:
            return
        if self.schedule.mode == "steps":
            for s in range(s0, s1):
                self._launch(s, s + 1, False)
        else:
            self._launch(s0, s1, True)


def numba_arg(t, like):
    """A Numba view of t, or of `like` (a placeholder of the right rank, never read)."""
    return numba_array(t if t is not None else like)


def numba_code(t) -> int:
    """The dtype code (kernels/numba/_dtypes.py) of t, 0 for an absent tensor."""
    from .kernels.numba.rnn import dtype_code
    return dtype_code(t.dtype) if t is not None else 0


class NumbaRNN:
    """The Numba launches every recurrent layer shares (same methods as TritonRNN)."""
    backend = "numba"
    cudnn = True

    @classmethod
    def precision(cls, a, b, model) -> str:
        return "ieee"       # the Numba kernels multiply in fp32 on the FMA units

    @staticmethod
    def gemm(a, b, out, c_in=None, bias=None, model=None) -> None:
        from ._gemm_numba import gemm
        gemm(a, b, out, c_in=c_in, bias=bias)

    @staticmethod
    def bias_grad(dg, db1, db2) -> None:
        from .kernels.numba import rnn as k
        N = dg.shape[2]
        threads = numba_threads(128)
        k.bias_grad[numba_blocks(cdiv(N, threads)), threads, numba_stream(dg.device)](
            numba_array(dg), numba_array(db1), numba_array(db2 if db2 is not None else db1),
            db2 is not None, k.dtype_code(db1.dtype))

    @staticmethod
    def mul(x, s, y) -> None:
        from .kernels.numba import rnn as k
        threads = numba_threads(256)
        k.mul_3d[numba_blocks(cdiv(x.numel(), threads)), threads, numba_stream(x.device)](
            numba_array(x), numba_array(s), numba_array(y), k.dtype_code(x.dtype),
            k.dtype_code(s.dtype), k.dtype_code(y.dtype))


__all__ = ["ALGOS", "FWD_SPACE", "BWD_SPACE", "Schedule", "TritonPlan", "NumbaPlan",
           "TritonRNN", "NumbaRNN", "product_precision", "multiprocessors", "step_tiles",
           "tile_candidates", "tile_configs", "numba_tile", "numba_arg", "numba_code", "strides",
           "grid_barrier_check", "persistent_on", "default_tile"]
