"""Launching the recurrent layers' kernels: what the LSTM and the GRU launchers share, once per
backend (pydl/lstm.py and pydl/gru.py add their cells' kernels; pydl/rnn.py is the layer
machinery that calls them).

A layer's recurrence kernel runs a range of time steps per launch (kernels/triton/rnn.py). A
direction's steps are launched in one of three modes (`schedule`):

    "persistent"   one launch for all steps; at most one program per SM, launched
                   cooperatively, the programs meeting at a grid barrier after every step
                   (a GPU; the Numba kernel uses grid.sync())
    "one_program"  one launch for all steps, one program owning every tile, no grid barrier
                   (a CTA barrier between steps): the persistent data flow in emulation (the
                   interpreter and the simulator run programs one after another, so a barrier
                   between them would never open)
    "steps"        one launch per step, the grid covering every tile

algo="persistent" (the default) is "persistent" on a GPU and "one_program" in emulation;
algo="steps" is "steps". Host launches per layer call then do not grow with the sequence
length except with "steps". A single step (a cell, a one-step sequence) needs no barrier and
launches plainly.

Plans (pydl/_plan.py's design): every launch here is built once per call signature - the
tile (tuned per shape on a GPU, pydl/_tune.py), the grid, the scalar arguments (sizes and
strides) and the constexprs - and then called with its tensors alone:

    recurrence   `TritonRNN.recurrence` / `NumbaRNN.recurrence`: one direction's steps,
                 rec(*tensors), None for an absent tensor (its flag is off)
    gemm_plan    a product of 2-D matrices or 3-D sequences, plan(a, b, out, bias, addend)
    bias_grad_plan, mul_plan

A plan is called with tensors of the shapes and strides it was built from; only the pointers
they carry change between calls. Two forms save a view per call: a one-step sequence
argument of a recurrence may be the 2-D step itself (the cells), and a 2-D state argument
the stack whose first matrix it is (a layer's h_n for h_n[0]). A Triton launch reads only
the pointers; a Numba one's arguments are views at the tensors' own addresses (numba_launch).

The grid barrier's two int32 counters (`barrier_counters`, pydl._launch.arrival_counters)
are zero between launches: the last program out of a persistent launch resets them
(kernels/triton/rnn.py grid_exit). So one buffer per (device, stream), allocated once, serves
every persistent launch on that stream, with no memset per call; under a CUDA graph capture
each call takes a fresh one (arrival_counters says why each case is safe).

Precision of the products (`product_precision`, kernels/triton/rnn.py `dot`): a model in
fp16/bf16 never loses precision to TF32: an fp32 gradient times a 16-bit weight or input is
"split" (the gradient as a sum of two 16-bit numbers, two 16-bit tensor-core passes), an fp32
x fp32 product in such a model (W_hh W_hr with projections) "tf32x3". The one exception is
the backward recurrence's product with a 16-bit W_rec (`TritonRNN.broadcast`): it multiplies
the gate gradients rounded to W_rec's dtype, as cuDNN does (kernels/triton/rnn.py, Precision,
says why and what it costs). An fp32 model rounds as torch would (cuDNN's TF32 setting for the
layers, the matmul one for the cells: pydl._launch.input_precision).

Backward tiles (`backward_tile`): rows x units, each product split over K so that the tiles
fill the SMs with the fewest bytes streamed per program (`step_bytes`); the split partials,
the 16-bit copy of the gate gradients and the running state share one fp32 workspace per
direction (`backward_planes`: the running buffer the layers allocated anyway, more planes),
and the splits count their arrivals on the stream's counters (`barrier_counters`).
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

from . import _env
from ._launch import (
    arrival_counters,
    cdiv,
    dot_block,
    input_precision,
    multiprocessors,
    new_output,
    next_power_of_2,
)
from ._numba_launch import DYNAMIC, NumbaLaunch, numba_blocks, numba_threads
from ._plan import GRID_YZ_MAX, Launch, launch_each
from ._tune import Tuner, aliased, bucket, gemm_candidates

F32 = torch.float32
ALGOS = ("persistent", "steps")     # algo= of the layers, the default first
# W_rec dtypes whose backward recurrence multiplies a 16-bit copy of the gate gradients
# (kernels/triton/rnn.py, Precision)
BROADCAST_DTYPES = (torch.float16, torch.bfloat16)


def product_precision(a: torch.dtype, b: torch.dtype, model: torch.dtype, cudnn: bool) -> str:
    """PRECISION of a product a @ b (operand dtypes) in a model of dtype `model`."""
    if a != F32 and b != F32:
        return "ieee"                   # 16-bit operands: tensor cores, fp32 accumulation
    if a != b:
        return "split"
    if model == F32:
        return input_precision(F32, cudnn=cudnn)
    return "tf32x3"


def tf32_key(dtype: torch.dtype, cudnn: bool) -> bool:
    """Whether an fp32 model's products round to TF32 now (torch's switch, read every call:
    it keys the plans); False for a 16-bit model, whose products never use it."""
    return dtype == F32 and input_precision(F32, cudnn=cudnn) == "tf32"


def persistent_on(device: torch.device) -> bool:
    """Whether the programs of a launch run concurrently here (a GPU), so that a grid barrier
    can open: not in emulation, where they run one after another."""
    return device.type == "cuda" and not _env.INTERPRET


def schedule(algo: str, device: torch.device) -> str:
    """The launch mode of a layer's recurrences (see the module docstring)."""
    if algo == "steps":
        return "steps"
    return "persistent" if persistent_on(device) else "one_program"


# (device, stream) -> the grid barrier's counters for the launches on that stream
def barrier_counters(device: torch.device, n: int = 2) -> torch.Tensor:
    """The arrival counters of a recurrence launch on the current stream of `device`
    (pydl._launch.arrival_counters: shared with every kernel that counts arrivals): the grid
    barrier's two, then (n > 2) one per output tile of a backward step split over K."""
    return arrival_counters(device, n)


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


def merge_steps(a, b, out, addend, trans_a: bool, trans_b: bool):
    """(a, b, out, addend) of a layer's GEMM with the time axis merged into the rows where the
    strides allow (every sequence buffer here, and a bidirectional output's half; not a
    batch_first input): a sum over T of a_t^T @ b_t becomes one product K = T*B deep, a
    product per step against one matrix one over T*B rows. One long K loop the compiler
    pipelines, or one grid, instead of T batches of B rows each. Views; the arguments
    themselves where no merge applies."""
    def rows(t):
        return t.dim() == 3 and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))

    def flat(t):
        return t.as_strided((t.shape[0] * t.shape[1], t.shape[2]), (t.stride(1), t.stride(2)))
    if out.dim() == 2 and trans_a and not trans_b and rows(a) and rows(b):
        return flat(a), flat(b), out, addend
    if (out.dim() == 3 and b.dim() == 2 and not trans_a and rows(a) and rows(out)
            and (addend is None or rows(addend))):
        return flat(a), b, flat(out), None if addend is None else flat(addend)
    return a, b, out, addend


def cell_input_grads(plans, x, h, w_ih, w_hh, dgi, dgh, need_x: bool, need_w_ih: bool,
                     need_w_hh: bool, model: torch.dtype) -> tuple:
    """(dx, dW_ih, dW_hh) of a cell step, each None where not needed, from the gradients dgi
    of x W_ih^T and dgh of h W_hh^T (one tensor for the LSTM): dx = dgi W_ih, dW_ih = dgi^T x,
    dW_hh = dgh^T h, by `plans`' GEMMs (pydl/rnn.py Plans); zeros for a zero state h (None),
    which no gradient reaches through W_hh."""
    dev = x.device
    dx = dw_ih = dw_hh = None
    if need_x:
        dx = new_output(x.shape, x.dtype, dev)
        plans.gemm("dx", dgi, w_ih, dx, model=model)
    if need_w_ih:
        dw_ih = new_output(w_ih.shape, w_ih.dtype, dev)
        plans.gemm("dw_ih", dgi, x, dw_ih, trans_a=True, model=model)
    if need_w_hh:
        if h is None:       # contiguous, as the other gradients (and the ops' fakes)
            dw_hh = torch.zeros(w_hh.shape, dtype=w_hh.dtype, device=dev)
        else:
            dw_hh = new_output(w_hh.shape, w_hh.dtype, dev)
            plans.gemm("dw_hh", dgh, h, dw_hh, trans_a=True, model=model)
    return dx, dw_ih, dw_hh


def as_4d(t: torch.Tensor, trans: bool = False) -> torch.Tensor:
    """A 2-D matrix (M, K) as (1, 1, M, K), a 3-D sequence (T, M, K) as (1, T, M, K), the
    last two axes swapped with `trans`: the batched GEMMs' operand views."""
    t4 = t[None] if t.dim() == 3 else t[None, None]
    return t4.transpose(2, 3) if trans else t4


def seq_shape(t: torch.Tensor) -> tuple[int, int, int]:
    """(T, B, N) of a sequence argument; a 2-D one is a single step."""
    return tuple(t.shape) if t.dim() == 3 else (1, *t.shape)


def seq_strides(t: torch.Tensor | None) -> tuple[int, int, int]:
    """The (time, row, column) strides of a sequence argument: a 2-D tensor is one step (its
    time stride is never used); (0, 0, 0) for an absent one."""
    if t is None:
        return (0, 0, 0)
    return tuple(t.stride()) if t.dim() == 3 else (0, *t.stride())


def strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    """The strides of an n-dimensional argument t: t's last n (t may be a stack whose first
    matrix is meant), or n zeros for an absent tensor (its kernel flag is off)."""
    return tuple(t.stride()[-n:]) if t is not None else (0,) * n


def _no_launch(*tensors) -> None:
    """The plan of a product with an empty output."""


# --- Triton -----------------------------------------------------------------------------------

class TritonRecurrence:
    """One direction's recurrence launch on the Triton backend (see the module docstring):
    kernel[grid](*tensors, sync, *scalars, step_begin, step_end, GRID_SYNC=..., **flags, **cfg),
    built once (a Launch per step under "steps"); `rec(*tensors)` launches every step.
    None stands for an absent tensor (its flag is off; the kernel never reads it). `sync`
    is the stream's arrival counters (`barrier_counters`) where the launch counts arrivals:
    at the grid barrier ("persistent") or at its K-split tiles (a backward tile with
    SPLIT > 1, every mode); elsewhere a present tensor, never read."""

    __slots__ = ("launch", "mode", "n_steps", "each", "device", "args", "counters", "slots",
                 "fill")

    def __init__(self, kernel, tuner: Tuner, key, candidates: list[dict], tensors: tuple,
                 scalars: tuple, flags: dict, tiles: Callable[[dict], int], mode: str,
                 n_steps: int, device: torch.device, inout: tuple = ()):
        # one step needs no barrier: a plain launch over every tile
        self.mode = "steps" if mode == "persistent" and n_steps <= 1 else mode
        self.n_steps, self.device = n_steps, device
        self.each = self.mode == "steps" and n_steps > 1     # a Launch per step
        # the kernel's tensor arguments from a call's: an absent one is a present one
        self.fill = next(i for i, t in enumerate(tensors) if t is not None)
        self.slots = [self.fill if t is None else i for i, t in enumerate(tensors)]

        def plan(cfg: dict):
            """The launch (a Launch per step under "steps": no per-call scalar)."""
            n = tiles(cfg)
            split = cfg.get("SPLIT", 1)
            # how many counters the launch counts on (0: none, the fill tensor instead)
            self.counters = 2 + n // split if self.mode == "persistent" or split > 1 else 0
            self.args = operator.itemgetter(*self.slots,
                                            *(() if self.counters else (self.fill,)))
            if self.mode == "persistent":
                grid = (min(n, multiprocessors(device)),)
                extra = dict(GRID_SYNC=True, launch_cooperative_grid=True)
            else:
                grid = (1,) if self.mode == "one_program" else (n,)
                extra = dict(GRID_SYNC=False)
            consts = {**extra, **flags, **cfg}
            # the alignment checked of each distinct tensor once (not of the placeholders
            # repeating one, nor of the counters)
            checked = tuple({t: i for i, t in reversed(list(enumerate(self.slots)))}.values())
            if self.each:
                return [Launch(kernel, grid, (*scalars, s, s + 1), consts, checked)
                        for s in range(n_steps)]
            return Launch(kernel, grid, (*scalars, 0, n_steps), consts, checked)

        def trial(cfg: dict) -> None:
            self.launch = plan(cfg)
            self(*tensors)

        self.launch = plan(tuner.pick((key, self.mode), candidates, trial, inout=inout))

    def __call__(self, *tensors) -> None:
        args = self.args(tensors)
        if self.counters:
            args += (barrier_counters(self.device, self.counters),)
        if self.each:
            launch_each(self.launch, args)      # the direct path's checks once a sequence
        else:
            self.launch(*args)                  # one launch (a cell's step, a persistent one)


# Tuning spaces of the recurrence kernels, LSTM and GRU alike. Forward: (BLOCK_B rows,
# BLOCK_H units, BLOCK_K for 16-bit operands, warps, stages); its tile is 4*BLOCK_H wide
# (gate-interleaved). A tile decides how many SMs a step uses against how much of W_hh each
# re-reads: the default fills the chip (step_tiles), these trade rows for units. Backward:
# the same plus the most K splits (None: as many as fill the SMs; `k_splits`); its tile is
# BLOCK_H wide, its product split over K so that the tiles fill the chip (`backward_tile`).
FWD_SPACE = ((32, 8, 64, 4, 3), (64, 8, 64, 4, 3), (16, 16, 64, 4, 3), (32, 16, 64, 4, 3),
             (64, 16, 32, 8, 3), (32, 4, 64, 4, 4), (32, 8, 128, 4, 4), (16, 16, 128, 4, 4))
BWD_SPACE = ((32, 32, 128, 8, 4, None), (32, 64, 64, 8, 4, None), (32, 64, 128, 8, 5, None),
             (64, 64, 128, 8, 4, None), (16, 64, 128, 4, 4, None), (32, 128, 128, 8, 4, None),
             (32, 32, 64, 8, 4, 1))


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


def default_tile(B: int, H: int, K: int, itemsize: int, device: torch.device) -> dict:
    """The launch config a forward recurrence kernel runs untuned: step_tiles' tile (4 to 32
    units a tile, 4 gates each; up to 64 rows, wgmma's M), a K depth of 64 (32 for fp32
    operands), 8 warps for the tiles whose accumulators and operands spill at 4
    (`python -m bench resources lstm gru`). `itemsize`: of the operands' dtype."""
    bb, bh = step_tiles(B, H, multiprocessors(device), 4, 32, 64)
    big = bb * 4 * bh > 64 * 128
    return dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=dot_block(K, 64 if itemsize <= 2 else 32),
                num_warps=8 if big else 4)


def tile_candidates(default: dict, B: int, H: int, K: int, itemsize: int, min_units: int,
                    space) -> list[dict]:
    """The default forward tile, then `space` ((BLOCK_B, BLOCK_H, BLOCK_K for 16-bit
    operands, warps, stages)) clipped to the problem."""
    out = [default]
    for bb, bh, bk, warps, stages in space:
        out.append(dict(BLOCK_B=dot_block(B, bb),
                        BLOCK_H=max(min_units, min(bh, next_power_of_2(H))),
                        BLOCK_K=dot_block(K, bk if itemsize <= 2 else bk // 2),
                        num_warps=warps, num_stages=stages))
    return out


# --- backward tiles -------------------------------------------------------------------------
# A backward step's product dh[rows, units] = dg_next[rows, :] W_rec[:, units] (K = G*H deep)
# is split over K (kernels/triton/rnn.py split_tile_of): every program streams its share of
# dg_next (rows x k) and of W_rec (k x units) from L2 every step, and per step the time is
# about the bytes one program streams (the SMs stream in parallel), so the tiles are chosen
# to fill the SMs with the fewest bytes each. Without splits a program reads all K of
# dg_next, however few units it owns: the fewer units a tile, the more of the step's bytes
# are those copies. A split adds a round trip (partials stored, the arrival, the last
# program's loads) and the partials the last program sums.

# bytes a program streams in about one L2 round trip (~1 us at ~50 GB/s an SM)
ROUND_TRIP_BYTES = 48 * 1024


def k_splits(B: int, H: int, K: int, bb: int, bh: int, bk: int, sms: int,
             most: int | None = None) -> int:
    """How many K ranges a backward product tile splits into: enough that the tiles fill
    `sms` (cdiv(B, bb) x cdiv(H, bh) x splits <= sms, or 1), each a whole number of K blocks,
    none empty, at most `most`."""
    s = max(1, min(sms // (cdiv(B, bb) * cdiv(H, bh)), cdiv(K, bk), most or K))
    return cdiv(K, cdiv(cdiv(K, s), bk) * bk)


def chunk_rows(bb: int, bh: int, warps: int) -> int:
    """Rows of a split tile's cell the last program runs at once: 8 elements a thread (the
    LSTM's cell holds about 16 such tiles live), at most the tile's."""
    return max(1, min(bb, 8 * 32 * warps // bh))


def step_bytes(B: int, H: int, K: int, cfg: dict, a_bytes: int, w_bytes: int,
               sms: int) -> int:
    """The cost model of a backward tile: the bytes one program streams per step (its
    tiles' operands), plus for split tiles the partials the last program reads and a round
    trip per chunk of its cell and for the arrival, as bytes (ROUND_TRIP_BYTES)."""
    bb, bh, bk, split = cfg["BLOCK_B"], cfg["BLOCK_H"], cfg["BLOCK_K"], cfg["SPLIT"]
    waves = cdiv(cdiv(B, bb) * cdiv(H, bh) * split, sms)
    kc = cdiv(cdiv(K, split), bk) * bk
    cost = waves * kc * (bb * a_bytes + bh * w_bytes)
    if split > 1:
        cost += split * bb * bh * 4 + (1 + cdiv(bb, cfg["CHUNK"])) * ROUND_TRIP_BYTES
    return cost


def backward_config(B: int, H: int, K: int, bb: int, bh: int, bk: int, warps: int,
                    stages: int, sms: int, most: int | None = None) -> dict:
    """A backward launch config: tile, K depth, splits, cell chunk, warps, stages."""
    split = k_splits(B, H, K, bb, bh, bk, sms, most)
    return dict(BLOCK_B=bb, BLOCK_H=bh, BLOCK_K=bk, SPLIT=split,
                CHUNK=bb if split == 1 else chunk_rows(bb, bh, warps),
                num_warps=warps, num_stages=stages)


def backward_tile(B: int, H: int, K: int, a_bytes: int, w_bytes: int, sms: int) -> dict:
    """The launch config a backward recurrence kernel runs untuned: every batch row in one
    row block (up to 64), the units a tile (16 to 128) and the K splits with the fewest
    step_bytes; 8 warps from 32 x 32 tiles, a K depth of 128 (64 for fp32 W), 4 stages for
    16-bit operands (3 tiles in flight, 72 KB at 32 x 64: L2's latency hidden). An unsplit
    tile runs its cell at once, so it stays within 2048 elements (more spills); a split one
    runs it CHUNK rows at a time."""
    bb = max(16, min(next_power_of_2(B), 64))
    bk = dot_block(K, 128 if w_bytes <= 2 else 64)
    best, best_cost = None, None
    for bh in (16, 32, 64, 128):
        if bh > max(16, next_power_of_2(H)):
            break
        warps = 8 if bb * bh >= 32 * 32 else 4
        cfg = backward_config(B, H, K, bb, bh, bk, warps, 4 if a_bytes <= 2 else 3, sms)
        if cfg["SPLIT"] == 1 and bb * bh > 2048 and best is not None:
            continue
        cost = step_bytes(B, H, K, cfg, a_bytes, w_bytes, sms)
        if best_cost is None or cost < best_cost:
            best, best_cost = cfg, cost
    return best


def backward_candidates(B: int, H: int, K: int, a_bytes: int, w_bytes: int,
                        device: torch.device) -> list[dict]:
    """The default backward config, then BWD_SPACE clipped to the problem. a_bytes, w_bytes:
    the product's operand sizes (dg_next: 2 for the 16-bit broadcast, 4 for fp32; W_rec)."""
    sms = multiprocessors(device)
    out = [backward_tile(B, H, K, a_bytes, w_bytes, sms)]
    for bb, bh, bk, warps, stages, most in BWD_SPACE:
        out.append(backward_config(B, H, K, dot_block(B, bb),
                                   max(16, min(bh, next_power_of_2(H))),
                                   dot_block(K, bk if w_bytes <= 2 else bk // 2), warps,
                                   stages, sms, most))
    return out


def backward_planes(B: int, H: int, K: int, a_bytes: int, w_bytes: int,
                    device: torch.device, bcast: bool) -> int:
    """(B, H) fp32 planes of a backward recurrence's workspace (kernels/triton/rnn.py
    step_workspace) for any of its candidates: the running state's two, the 16-bit
    broadcast's (bcast), the split partials'."""
    plane = max(1, B * H)
    parts = max((cdiv(B, c["BLOCK_B"]) * cdiv(H, c["BLOCK_H"]) * c["SPLIT"] * c["BLOCK_B"]
                 * c["BLOCK_H"] for c in backward_candidates(B, H, K, a_bytes, w_bytes, device)
                 if c["SPLIT"] > 1), default=0)
    return 2 + (cdiv(B * K, plane) if bcast else 0) + cdiv(parts, plane)


def check_workspace(ws: torch.Tensor, planes: int, B: int, H: int) -> None:
    """A backward recurrence's workspace must be contiguous fp32 (planes, B, H) or more
    planes: the kernel lays its regions out from the plane size (step_workspace)."""
    if (ws.dtype != F32 or ws.dim() != 3 or tuple(ws.shape[1:]) != (B, H)
            or ws.shape[0] < planes or not ws.is_contiguous()):
        raise ValueError(f"the backward recurrence's workspace must be a contiguous float32 "
                         f"({planes}, {B}, {H}) tensor (backward_planes), got "
                         f"{ws.dtype} {tuple(ws.shape)}")


def tile_configs(name: str, B: int, H: int, K: int, dtype: torch.dtype, flags: tuple,
                 device: torch.device, operands: tuple[int, int] | None = None
                 ) -> tuple[tuple, list[dict]]:
    """(tuning key, candidates) of a recurrence kernel (`flags`: its sorted constexpr
    items); `operands`: a backward's (a_bytes, w_bytes), None for a forward. The key holds
    the batch in coarse buckets (pydl/_tune.py)."""
    key = (name, dtype, bucket(B, hi=1 << 12), H, K, flags)
    if operands is not None:
        return key, backward_candidates(B, H, K, *operands, device)
    itemsize = dtype.itemsize
    return key, tile_candidates(default_tile(B, H, K, itemsize, device), B, H, K, itemsize, 4,
                                FWD_SPACE)


# The recurrent layers' own GEMMs (kernels/triton/rnn.py gemm_batched: the weight gradients
# summed over time and the input gradient, an fp32 gate gradient times a 16-bit weight or
# input by the "split" rule, and a batch of products that the shared GEMM does not fold),
# tuned over the shared GEMM's tiles after their own default.
RNN_GEMM_TUNER = Tuner("rnn_gemm")


def rnn_gemm_candidates(M: int, N: int, K: int, itemsize: int) -> list[dict]:
    """gemm_batched's default, then the shared GEMM's tiles (pydl/_tune.py GEMM_SPACE) clipped
    to the product, as deep as for `itemsize` (the first operand's: an fp32 gate gradient's
    tile is twice a 16-bit one's bytes), those of at most 128 rows and columns, the 128 x 128
    one on 8 warps only: a "split" product holds both 16-bit halves of its fp32 operand, and
    the wider tiles, or 128 x 128 on 4 warps, spilled 48-256 bytes on sm_90 (`python -m bench
    resources rnn_gemm`). The default: 128 x 128 x 32 on 8 warps for the big products (a
    layer's weight and input gradients over all T*B rows, K >= 512: each operand re-read from
    L2 half as often as at 64 x 64), 64 x 64 x 32 on 4 below."""
    big = M >= 128 and N >= 128 and K >= 512
    side = 128 if big else 64
    default = dict(BLOCK_M=dot_block(M, side), BLOCK_N=dot_block(N, side),
                   BLOCK_K=dot_block(K, 32), num_warps=8 if big else 4)
    return [c for c in gemm_candidates(default, M, N, K, itemsize)
            if max(c["BLOCK_M"], c["BLOCK_N"]) <= 128
            and (c["BLOCK_M"] * c["BLOCK_N"] < 128 * 128 or c["num_warps"] == 8)]


class TritonRNN:
    """The Triton launches every recurrent layer shares: the recurrence launch, the GEMMs
    (input projection, weight and input gradients), the bias column sums, dropout's product.
    `cudnn` says which of torch's TF32 settings fp32 models follow (True: the layers, as
    cuDNN's RNN; False: the cells, as a cuBLAS matmul)."""
    backend = "triton"
    cudnn = True

    @classmethod
    def precision(cls, a: torch.dtype, b: torch.dtype, model: torch.dtype) -> str:
        return product_precision(a, b, model, cls.cudnn)

    @classmethod
    def broadcast(cls, w_rec: torch.dtype) -> bool:
        """Whether a backward recurrence over W_rec of this dtype multiplies a 16-bit copy of
        the gate gradients (kernels/triton/rnn.py, Precision): a 16-bit W_rec."""
        return w_rec in BROADCAST_DTYPES

    @classmethod
    def backward_operands(cls, w_rec: torch.dtype) -> tuple[int, int]:
        """(bytes of a dg_next element, of a W_rec element) in a backward product."""
        return (2 if cls.broadcast(w_rec) else 4), w_rec.itemsize

    @classmethod
    def backward_planes(cls, B: int, H: int, K: int, w_rec: torch.dtype,
                        device: torch.device) -> int:
        """(B, H) fp32 planes of a backward recurrence's workspace (the running state by step
        parity, then the 16-bit broadcast and the K-split partials)."""
        return backward_planes(B, H, K, *cls.backward_operands(w_rec), device,
                               cls.broadcast(w_rec))

    @staticmethod
    def recurrence(kernel, tuner: Tuner, name: str, mode: str, tensors: tuple, ranks: tuple,
                   scalars: tuple, flags: dict, B: int, H: int, K: int, dtype: torch.dtype,
                   n_steps: int, device: torch.device, operands: tuple[int, int] | None,
                   inout: tuple = ()) -> TritonRecurrence:
        """The launch of a recurrence kernel (see TritonRecurrence) over tiles of BLOCK_B rows
        x BLOCK_H of H units (a backward's split SPLIT ways over K); `operands`: a
        backward's (a_bytes, w_bytes), None for a forward; `inout`: tensors it reads and
        then overwrites (restored after the tuner's trials); `ranks` (the Numba launcher's)
        is not needed here."""
        key, candidates = tile_configs(name, B, H, K, dtype, tuple(sorted(flags.items())),
                                       device, operands)
        return TritonRecurrence(
            kernel, tuner, key, candidates, tensors, scalars, flags,
            lambda cfg: cdiv(B, cfg["BLOCK_B"]) * cdiv(H, cfg["BLOCK_H"]) * cfg.get("SPLIT", 1),
            mode, n_steps, device, inout)

    @classmethod
    def gemm_plan(cls, a, b, out, bias=None, addend=None, *, trans_a: bool = False,
                  trans_b: bool = False, model: torch.dtype | None = None) -> Callable:
        """out = op(a) @ op(b) (+ bias) (+ addend), planned: plan(a, b, out, bias, addend) (the
        order of pydl/_gemm.py's plans).

        a, b: 2-D matrices or 3-D sequences (T, ., .), op(t) = t with its last two axes
        swapped under trans_*; out and addend: (M, N), or (T, M, N) for a product per step. A
        2-D out over 3-D operands sums over T (a layer's weight gradients); a 2-D operand
        broadcasts over T. bias: (N,). fp32 accumulation; `model` (the layer's dtype; default
        out's) sets the precision rule."""
        model = model or out.dtype
        a4, b4, out4 = as_4d(a, trans_a), as_4d(b, trans_b), as_4d(out)
        c4 = as_4d(addend) if addend is not None else None
        B2c = out4.shape[1]
        if out.numel() == 0:
            return _no_launch
        if a.dtype == b.dtype and out.dim() >= max(a.dim(), b.dim()) and B2c <= GRID_YZ_MAX:
            # the library's shared GEMM (pydl/_gemm.py, one launch) covers same-dtype products
            # without a reduction over time: the input projection, and dx / dh in fp32
            from ._gemm import gemm_plan
            return gemm_plan(a, b, out, trans_a=trans_a, trans_b=trans_b, bias=bias, addend=addend,
                             input_precision=cls.precision(a.dtype, b.dtype, model)
                             if a.dtype == F32 else "ieee")
        a4, b4, out4, c4 = (as_4d(t, tr) if t is not None else None for t, tr in zip(
            merge_steps(a, b, out, addend, trans_a, trans_b), (trans_a, trans_b, False, False)))
        if a.dtype != F32 and b.dtype == F32:
            # the fp32 operand goes first ("split" splits the first): out^T = b^T a^T
            if bias is not None:
                raise ValueError("gemm: a bias needs the fp32 operand first")
            tensors = (b, a, out if addend is None else addend, out, out)
            launch = cls._batched(b4.transpose(2, 3), a4.transpose(2, 3), out4.transpose(2, 3),
                                  None if c4 is None else c4.transpose(2, 3), None, model,
                                  tensors)
            return lambda a, b, out, bias, addend: launch(
                b, a, out if addend is None else addend, out, out)
        tensors = (a, b, out if addend is None else addend, out, out if bias is None else bias)
        launch = cls._batched(a4, b4, out4, c4, bias, model, tensors)
        return lambda a, b, out, bias, addend: launch(
            a, b, out if addend is None else addend, out, out if bias is None else bias)

    @classmethod
    def _batched(cls, a, b, out, addend, bias, model, tensors) -> Launch:
        """The Launch of kernels/triton/rnn.py gemm_batched for 4-D views (out's second batch
        axis of size 1 sums over the operands'): tensors (a, b, addend, out, bias), `tensors`
        the call's own in that order (the tuner's trials launch on them; out restored where
        the addend is out)."""
        from .kernels.triton import rnn as k
        B1, B2c, M, N = out.shape
        K = a.shape[3]
        B2 = a.shape[1] if a.shape[1] != 1 else b.shape[1]
        n_red = B2 if (B2c == 1 and B2 != 1) else 1

        def batch_strides(t):
            return (tuple(0 if t.shape[i] == 1 else t.stride(i) for i in (0, 1))
                    + tuple(t.stride()[2:]))

        scalars = (M, N, K, B1 * B2c, B2c, n_red, *batch_strides(a), *batch_strides(b),
                   *(batch_strides(addend) if addend is not None else (0,) * 4), *out.stride(),
                   *((0, bias.stride(0)) if bias is not None else (0, 0)))
        precision = cls.precision(a.dtype, b.dtype, model)
        flags = dict(ACCUMULATE=addend is not None, HAS_BIAS=bias is not None,
                     PRECISION=precision)

        def make(cfg: dict) -> Launch:
            grid = (cdiv(M, cfg["BLOCK_M"]) * cdiv(N, cfg["BLOCK_N"]),
                    min(B1 * B2c, GRID_YZ_MAX))
            return Launch(k.gemm_batched, grid, scalars, dict(flags, **cfg))

        key = ("gemm_batched", a.dtype, b.dtype, out.dtype, precision, bucket(M), bucket(N),
               bucket(K), bucket(B1 * B2c, lo=1, hi=1 << 10), n_red > 1, addend is not None,
               bias is not None, a.stride(3) == 1, b.stride(2) == 1)
        cfg = RNN_GEMM_TUNER.pick(key, rnn_gemm_candidates(M, N, K, a.element_size()),
                                  lambda c: make(c)(*tensors),
                                  inout=() if addend is None else aliased((tensors[3],),
                                                                          (tensors[2],)))
        return make(cfg)

    @staticmethod
    def bias_grad_plan(dg, db1, db2) -> Callable:
        """plan(dg, db1, db2): db1 (and db2 when given) = column sums of dg, a (T, B, N)
        sequence or a (B, N) matrix."""
        from .kernels.triton import rnn as k
        T, B, N = (1, *dg.shape) if dg.dim() == 2 else dg.shape
        block_n = min(next_power_of_2(N), 64)
        launch = Launch(k.bias_grad, (cdiv(N, block_n),), (T, B, N, *seq_strides(dg)),
                        dict(WRITE_DB2=db2 is not None, BLOCK_R=min(next_power_of_2(T * B), 32),
                             BLOCK_N=block_n, num_warps=4))
        return lambda dg, db1, db2=None: launch(dg, db1, db1 if db2 is None else db2)

    @staticmethod
    def mul_plan(x, s, y) -> Launch:
        """plan(x, s, y): y = x * s over 3-D tensors (y may be x)."""
        from .kernels.triton import rnn as k
        block = 1024
        return Launch(k.mul_3d, (cdiv(x.numel(), block),),
                      (*x.shape, *x.stride(), *s.stride(), *y.stride()),
                      dict(BLOCK=block, num_warps=4))


# --- Numba ------------------------------------------------------------------------------------

# Tiles (rows x units x K) of the Numba recurrence kernels: 8 x 32 x 32 (256 threads) on a GPU;
# 4 x 8 x 8 (32 threads) in the simulator, where every thread is an OS thread.
NUMBA_TILE = (8, 32, 32)
NUMBA_SIM_TILE = (4, 8, 8)


def numba_tile() -> tuple[int, int, int]:
    return NUMBA_SIM_TILE if _env.INTERPRET else NUMBA_TILE


def numba_code(t) -> int:
    """The dtype code (kernels/numba/_dtypes.py) of t, 0 for an absent tensor."""
    from .kernels.numba.rnn import dtype_code
    return dtype_code(t.dtype) if t is not None else 0


def numba_launch(kernel, grid, threads, device: torch.device, tensors: tuple, ranks: tuple,
                 scalars: tuple) -> NumbaLaunch:
    """The NumbaLaunch (pydl._numba_launch) of kernel(*tensors, *scalars), each tensor argument in
    its kernel rank: a 2-D step for a 3-D sequence argument is that one step, a stack for a
    2-D one its first matrix (views at the tensor's own address, so a call may pass either
    form). An absent tensor (None; its flag is off) is a one-element placeholder of its rank,
    made once and kept by the launch."""
    args, places = [], []
    for i, (t, rank) in enumerate(zip(tensors, ranks)):
        if t is None:
            args.append(torch.empty((1,) * rank, dtype=F32, device=device))
            places.append(None)
            continue
        if t.dim() < rank:
            t = t.as_strided((1, *t.shape), (0, *t.stride()))
        elif t.dim() > rank:
            t = t.as_strided(t.shape[t.dim() - rank:], t.stride()[t.dim() - rank:])
        args.append(t)
        places.append(i)
    return NumbaLaunch(kernel, grid, threads, device, (*args, *scalars), tensors, tuple(places))


class NumbaRecurrence:
    """One direction's recurrence launch on the Numba backend: kernel[blocks, (TU, TB)](
    *tensors, *scalars, s_begin, s_end, sync), sync (grid.sync() between steps) under
    "persistent" and "one_program", once per step under "steps"; `rec(*tensors)` as
    TritonRecurrence."""

    __slots__ = ("launch", "mode", "n_steps", "whole")

    def __init__(self, kernel, tensors: tuple, ranks: tuple, scalars: tuple, tiles: int,
                 mode: str, n_steps: int, device: torch.device):
        tb, tu, _ = numba_tile()
        # the kernels use grid.sync(), so Numba launches them cooperatively: at most one
        # block per SM (the blocks loop over the tiles); one in the simulator
        blocks = 1 if _env.INTERPRET else max(1, min(tiles, multiprocessors(device)))
        self.launch = numba_launch(kernel, blocks, (tu, tb), device, tensors, ranks,
                                   (*scalars, DYNAMIC, DYNAMIC, DYNAMIC))   # steps, sync
        self.mode, self.n_steps = mode, n_steps
        # (s_begin, s_end, sync) of one launch over every step (one step needs no sync)
        self.whole = (0, n_steps, mode != "steps") if mode != "steps" or n_steps == 1 else None

    def __call__(self, *tensors) -> None:
        launch = self.launch
        if self.whole is not None:
            launch(*tensors, dynamic=self.whole)
            return
        # one launch per step, the pointers written once
        launch.each(tensors, [(s, s + 1, False) for s in range(self.n_steps)])


class NumbaRNN:
    """The Numba launches every recurrent layer shares (same methods as TritonRNN)."""
    backend = "numba"
    cudnn = True

    @classmethod
    def precision(cls, a, b, model) -> str:
        return "ieee"       # the Numba kernels multiply in fp32 on the FMA units

    @classmethod
    def backward_planes(cls, B, H, K, w_rec, device) -> int:
        """The running state's two (B, H) planes (by step parity)."""
        return 2

    @staticmethod
    def recurrence(build, mode, tensors, ranks, scalars, B, H, n_steps,
                   device) -> NumbaRecurrence:
        """The launch of the recurrence kernel build(*numba_tile()) (a kernels/numba kernel
        builder) over B rows x H units; the rest as TritonRNN.recurrence's."""
        tb, tu, tk = numba_tile()
        return NumbaRecurrence(build(tb, tu, tk), tensors, ranks, scalars,
                               cdiv(B, tb) * cdiv(H, tu), mode, n_steps, device)

    @staticmethod
    def gemm_plan(a, b, out, bias=None, addend=None, *, trans_a: bool = False,
                  trans_b: bool = False, model=None) -> Callable:
        """As TritonRNN.gemm_plan, on pydl/_gemm_numba.py's GEMM planned once (its
        NumbaLaunch: a call passes its tensors' pointers)."""
        from ._gemm_numba import gemm_plan
        return gemm_plan(as_4d(a, trans_a), as_4d(b, trans_b), as_4d(out), bias=bias,
                         addend=None if addend is None else as_4d(addend))

    @staticmethod
    def bias_grad_plan(dg, db1, db2) -> Callable:
        from .kernels.numba import rnn as k
        N = dg.shape[-1]
        threads = numba_threads(128)
        launch = numba_launch(k.bias_grad, numba_blocks(cdiv(N, threads)), threads, dg.device,
                             (dg, db1, db1), (3, 1, 1),
                             (db2 is not None, k.dtype_code(db1.dtype)))
        return lambda dg, db1, db2=None: launch(dg, db1, db1 if db2 is None else db2)

    @staticmethod
    def mul_plan(x, s, y) -> NumbaLaunch:
        from .kernels.numba import rnn as k
        threads = numba_threads(256)
        return numba_launch(k.mul_3d, numba_blocks(cdiv(x.numel(), threads)), threads, x.device,
                           (x, s, y), (3, 3, 3), (k.dtype_code(x.dtype), k.dtype_code(s.dtype),
                                                  k.dtype_code(y.dtype)))


__all__ = ["ALGOS", "FWD_SPACE", "BWD_SPACE", "schedule", "barrier_counters", "TritonRecurrence",
           "NumbaRecurrence", "numba_launch", "TritonRNN", "NumbaRNN", "product_precision",
           "tf32_key", "multiprocessors", "step_tiles", "tile_candidates", "tile_configs",
           "numba_tile", "numba_code", "strides", "seq_shape", "seq_strides", "as_4d",
           "cell_input_grads", "grid_barrier_check",
           "persistent_on", "default_tile", "backward_tile", "backward_candidates",
           "backward_planes", "k_splits", "step_bytes", "check_workspace", "merge_steps"]
