"""max_pool2d, avg_pool2d and adaptive_avg_pool2d: argument checks, autograd Functions, launches.

Kernels: kernels/{triton,numba}/pool.py. The launchers here size the grid and allocate outputs
in the input's memory format (channels_last stays channels_last, as in torch); the kernels read
any strides, so no input is copied.

Max pooling's training path saves the argmax as a one-byte window offset (see the kernel
module's docstring); return_indices=True returns torch's int64 flat per-plane indices.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_tensor
from ._library import (Geometry, as_geometry, empty_like_shape, geometry_from, kernel_op,
                       memory_format)
from ._launch import (NumbaLaunch, cdiv, fresh, memory_format_of, new_output,
                      next_power_of_2, numba_launch_1d, output_maker,
                      planned_once)
from ._plan import (BatchSlices, Cache, Launch, apply, batch_launch, capturing, emulated,
                    needs_graph, plain_tensors, tensors_key)
from ._shapes import integer, pair, pool_output_size, positive_int
from ._tune import Tuner, bucket
from .backends import current_backend, dispatch, register


@dataclass(frozen=True)
class PoolGeometry(Geometry):
    """One pooling configuration on an (N, C, H, W) input."""
    N: int
    C: int
    H: int
    W: int
    OH: int
    OW: int
    KH: int
    KW: int
    SH: int
    SW: int
    PH: int = 0
    PW: int = 0
    DH: int = 1
    DW: int = 1
    ceil_mode: bool = False
    count_include_pad: bool = True
    divisor: int = 0  # divisor_override, 0 = torch's rule
    __hash__ = Geometry.__hash__


def _channels_fastest(t: torch.Tensor) -> bool:
    """Channels are the contiguous axis: tile (Triton) or order (Numba) the work c-fastest."""
    return t.stride(1) == 1 and t.shape[1] > 1


# --- Triton launch --------------------------------------------------------------------------

def _triton_tile(x: torch.Tensor, C: int, n_spatial: int, elems: int = 1024,
                 num_warps: int = 4) -> dict:
    """A wide channel block when channels are the contiguous axis, else a wide spatial block;
    about `elems` elements a program. The defaults are the first tuning candidate."""
    block_c = min(next_power_of_2(C), 64 if _channels_fastest(x) else 4)
    block_s = max(1, min(next_power_of_2(n_spatial), elems // block_c))
    return dict(BLOCK_S=block_s, BLOCK_C=block_c, num_warps=num_warps)


def _alignment(t: torch.Tensor, dim: int) -> int:
    """The largest power of two up to 16 dividing t's size along `dim` and the strides of its
    other dimensions, where `dim` has unit stride (else 1): the element offset of a multiple
    of it along `dim` is a multiple of it (the backward kernels' ALIGN)."""
    if t.stride(dim) != 1:
        return 1
    align = math.gcd(16, t.shape[dim])
    for d, stride in enumerate(t.stride()):
        if d != dim:
            align = math.gcd(align, stride)
    return align


def _planar_tile(rows: int, cols: int, elems: int = 1024, num_warps: int = 4) -> dict:
    """A BLOCK_I x BLOCK_J tile of about `elems` cells of rows x cols, up to 128 columns wide
    (the contiguous axis), for the planar pool kernels; in the max pool's backward at most 8
    cells a thread, whose gradients of every stride phase and window tiles stay in registers
    (16 x 64 cells on 4 warps: 71 registers in the sm_90 compile)."""
    block_j = min(next_power_of_2(cols), 128)
    block_i = max(1, min(next_power_of_2(rows), elems // block_j, 256 * num_warps // block_j))
    return dict(BLOCK_I=block_i, BLOCK_J=block_j, num_warps=num_warps)


def _fwd_planar_per_thread(index_mode: int) -> int:
    """The planar max-pool forward's outputs a thread: 8 without an index (the sm_90 stem
    compile: 67 SASS instructions an output, 40 registers; 4: 78), 4 with one (8 took 118
    registers and 2.4x the instructions). The average pool's takes 8."""
    return 8 if index_mode == INDEX_NONE else 4


def _global(t: torch.Tensor, g: PoolGeometry) -> bool:
    """Global average pooling (output 1x1) of an input (or grad_input) whose h and w merge
    into one position axis (NCHW, channels_last): the global kernels' case, torch's mean."""
    return g.OH == 1 and g.OW == 1 and t.stride(2) == g.W * t.stride(3)


def _global_tile(t: torch.Tensor, g: PoolGeometry, elems: int = 1024,
                 num_warps: int = 4) -> dict:
    """A BLOCK_C x BLOCK_P tile of the global kernels, about `elems` elements: wide along
    the contiguous axis (64 channels for channels_last, 64 positions otherwise), at most 16
    elements a thread."""
    elems = min(elems, 16 * 32 * num_warps)
    HW = g.H * g.W
    if _channels_fastest(t):
        block_c = min(next_power_of_2(g.C), 64)
        block_p = max(1, min(next_power_of_2(HW), elems // block_c))
    else:
        block_p = min(next_power_of_2(HW), 64)
        block_c = max(1, min(next_power_of_2(g.C), elems // block_p))
    return dict(BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps)


def _window_shifts(S: int, P: int, D: int, K: int) -> int:
    """How many window shifts q (window i + q for cell i) kernel offsets reach along one axis:
    the distinct (r + P - k D) / S over stride phases r and offsets k where it divides."""
    return len({(r + P - k * D) // S for r in range(S) for k in range(K)
                if (r + P - k * D) % S == 0})


def _cells_bwd_elems(g: PoolGeometry, elems: int, num_warps: int, tiles: int = 2) -> int:
    """A tile size of a pool's backward by cells: at most `elems`, and at most 128 values a
    thread in the window tiles (each window shift's `tiles` tiles stay in registers until
    the stores: max pooling's gradient and argmax, average pooling's scaled gradient; the
    stem max pool's 4 shifts at 16 cells a thread took 135 registers in the sm_90 compile,
    3x3 windows at stride 1 (9 shifts) at 64 spilled)."""
    shifts = _window_shifts(g.SH, g.PH, g.DH, g.KH) * _window_shifts(g.SW, g.PW, g.DW, g.KW)
    cap = max(32 * num_warps, 128 * 32 * num_warps // max(1, shifts * tiles))
    return min(elems, 1 << (cap.bit_length() - 1))


# Tuning space of the pooling kernels (memory-bound): elements per program and warps.
POOL_SPACE = ((2048, 4), (2048, 8), (4096, 8), (512, 4))
POOL_TUNERS = {name: Tuner(name) for name in (
    "max_pool2d_fwd", "max_pool2d_fwd_planar", "max_pool2d_bwd", "max_pool2d_bwd_planar",
    "avg_pool2d_fwd", "avg_pool2d_fwd_planar", "avg_pool2d_bwd", "avg_pool2d_bwd_planar",
    "adaptive_avg_pool2d_fwd", "adaptive_avg_pool2d_bwd", "global_avg_pool2d_fwd",
    "global_avg_pool2d_bwd", "global_avg_pool2d_bwd_flat")}


_LAUNCHES = Cache("pool launches")


def _launch(name: str, layout: torch.Tensor, n_spatial: int, g: PoolGeometry, tensors: tuple,
            scalars: tuple, grid=None, tile=None, **consts) -> Launch | BatchSlices:
    """The launch of pooling kernel `name` over n_spatial positions x C channels x N images:
    a Launch taking the kernel's tensors, its scalars (positional constexprs among them) and
    keyword constexprs fixed. Built once per signature; tiles autotuned (pydl/_tune.py) per
    geometry, layout and dtype, not per batch size. A kernel tiled otherwise gives grid(cfg)
    and tile(elems, num_warps) (the config of a tile of about elems elements; defaults: _grid
    and _triton_tile), functions of the key's contents."""
    key = (name, g, layout.device, tuple(t.dtype for t in tensors), scalars,
           tuple(consts.values()))
    return _LAUNCHES.get(key, _plan, name, layout, n_spatial, g, tensors, scalars, consts, grid,
                         tile)


def _plan(name: str, layout, n_spatial: int, g: PoolGeometry, tensors, scalars, consts, grid,
          tile) -> Launch | BatchSlices:
    from .kernels.triton import pool as k
    kernel = getattr(k, name)
    grid = grid or (lambda cfg: _grid(cfg, n_spatial, g))
    tile = tile or (lambda elems, warps: _triton_tile(layout, g.C, n_spatial, elems, warps))

    def launch(cfg):
        # grids of two or three axes have the batch last: in slices past CUDA's cap
        return batch_launch(lambda grid: Launch(kernel, grid, scalars, {**consts, **cfg}),
                            grid(cfg))

    candidates = [tile(1024, 4)] + [tile(elems, warps) for elems, warps in POOL_SPACE]
    key = (name, layout.dtype, _channels_fastest(layout), g.KH, g.KW, g.SH, g.SW, g.PH, g.PW,
           g.DH, g.DW, tuple(sorted(consts.items())),
           g.H // max(1, g.OH), g.W // max(1, g.OW), bucket(g.C, lo=1), bucket(n_spatial, lo=1))
    return launch(POOL_TUNERS[name].pick(key, candidates, lambda c: launch(c)(*tensors)))


def _grid(cfg: dict, n_spatial: int, g: PoolGeometry) -> tuple[int, int, int]:
    return (cdiv(n_spatial, cfg["BLOCK_S"]), cdiv(g.C, cfg["BLOCK_C"]), g.N)


class _PoolLauncher:
    """What a pooling launcher offers: max_fwd(x, y, idx, g, index_mode), max_bwd(dy, idx, dx,
    g, index_mode), avg_fwd(x, y, g), avg_bwd(dy, dx, g), adaptive_fwd(x, y, g),
    adaptive_bwd(dy, dx, g), each launching into the given output; and each as a plan,
    plan_<name>(same arguments) -> run(tensors) (pydl/_plan.py), for a caller that launches
    the same signature again: run takes the method's tensors alone (max_fwd's idx, when
    absent, as a placeholder: y): _TritonPool's are its cached Launches, _NumbaPool's
    NumbaLaunches."""

    @classmethod
    def max_fwd(cls, x, y, idx, g: PoolGeometry, index_mode: int) -> None:
        cls.plan_max_fwd(x, y, idx, g, index_mode)(x, y, y if idx is None else idx)

    @classmethod
    def max_bwd(cls, dy, idx, dx, g: PoolGeometry, index_mode: int) -> None:
        cls.plan_max_bwd(dy, idx, dx, g, index_mode)(dy, idx, dx)

    @classmethod
    def avg_fwd(cls, x, y, g: PoolGeometry) -> None:
        cls.plan_avg_fwd(x, y, g)(x, y)

    @classmethod
    def avg_bwd(cls, dy, dx, g: PoolGeometry) -> None:
        cls.plan_avg_bwd(dy, dx, g)(dy, dx)

    @classmethod
    def adaptive_fwd(cls, x, y, g: PoolGeometry) -> None:
        cls.plan_adaptive_fwd(x, y, g)(x, y)

    @classmethod
    def adaptive_bwd(cls, dy, dx, g: PoolGeometry) -> None:
        cls.plan_adaptive_bwd(dy, dx, g)(dy, dx)


def _w_contiguous(x, y) -> bool:
    """A pool's input and output whose contiguous axis is W (NCHW): the planar forward's."""
    return x.stride(3) == 1 and y.stride(3) == 1 and not _channels_fastest(x)


def _planar_fwd(name: str, x, tensors, scalars, g: PoolGeometry, per_thread: int, **consts):
    """The launch of a planar forward (kernels/triton/pool.py _pool_fwd_planar): rows (c, oh)
    of output columns, at most `per_thread` outputs a thread."""
    rows = g.C * g.OH                           # (c, oh) output rows of an image
    return _launch(name, x, g.OH * g.OW, g, tensors, scalars,
                   tile=lambda elems, warps: _planar_tile(
                       rows, g.OW, min(elems, per_thread * 32 * warps), warps),
                   grid=lambda cfg: (cdiv(rows, cfg["BLOCK_I"]), cdiv(g.OW, cfg["BLOCK_J"]),
                                     g.N), **consts)


def _plan_cells_bwd(name: str, dy, idx, dx, g: PoolGeometry, **consts):
    """The launch of a pool's backward by cells (kernels/triton/pool.py _cells_bwd): `name`
    for channels-contiguous layouts, name + "_planar" for W-contiguous ones; max pooling's
    (idx: the saved argmax) or average pooling's (idx None). Run as run(dy, idx, dx) or
    run(dy, dx) likewise."""
    # grad_out in grad_input's layout, as torch's own backward converts it: an NCHW
    # gradient of a channels_last pool would be gathered element by element
    fmt = torch.channels_last if _channels_fastest(dx) else torch.contiguous_format
    if not dy.is_contiguous(memory_format=fmt):
        launch = _plan_cells_bwd(name, dy.contiguous(memory_format=fmt), idx, dx, g, **consts)
        return lambda dy, *rest: launch(dy.contiguous(memory_format=fmt), *rest)
    # cells (i, j) of SH x SW input positions each, one per stride phase
    ni, nj = cdiv(g.H, g.SH), cdiv(g.W, g.SW)
    dim = 1 if _channels_fastest(dx) else 3             # the contiguous one
    # the window's constexprs by position, after the strides: cheaper to pass than
    # keywords on every launch that takes Triton's own path
    window = (g.KH, g.KW, g.SH, g.SW, g.PH, g.PW)
    tiles = 2 if idx is not None else 1             # register tiles a window shift
    if idx is not None:
        tensors = (dy, idx, dx)
        scalars = (g.C, g.H, g.W, g.OH, g.OW, *dy.stride(), *idx.stride(), *dx.stride(),
                   *window, g.DH, g.DW, math.gcd(_alignment(dy, dim), _alignment(idx, dim)),
                   _alignment(dx, dim))
    else:
        tensors = (dy, dx)
        scalars = (g.C, g.H, g.W, g.OH, g.OW, *dy.stride(), *dx.stride(), g.divisor, *window,
                   _alignment(dy, dim), _alignment(dx, dim))
    if dim == 1:
        return _launch(name, dx, ni * nj, g, tensors, scalars,
                       tile=lambda elems, warps: _triton_tile(
                           dx, g.C, ni * nj, _cells_bwd_elems(g, elems, warps, tiles), warps),
                       **consts)
    rows = g.C * ni                             # (c, i) cell rows of an image
    return _launch(name + "_planar", dx, ni * nj, g, tensors, scalars,
                   tile=lambda elems, warps: _planar_tile(
                       rows, nj, _cells_bwd_elems(g, elems, warps, tiles), warps),
                   grid=lambda cfg: (cdiv(rows, cfg["BLOCK_I"]), cdiv(nj, cfg["BLOCK_J"]),
                                     g.N), **consts)


class _TritonPool(_PoolLauncher):
    @staticmethod
    def plan_max_fwd(x, y, idx, g: PoolGeometry, index_mode: int) -> Launch:
        tensors = (x, y, idx if idx is not None else y)
        if _w_contiguous(x, y):
            return _planar_fwd("max_pool2d_fwd_planar", x, tensors, (
                g.C, g.H, g.W, g.OH, g.OW, *x.stride()[:3], *y.stride()[:3], g.KH, g.KW, g.SH,
                g.SW, g.PH, g.PW, g.DH, g.DW, _alignment(x, 3)), g,
                _fwd_planar_per_thread(index_mode), INDEX_MODE=index_mode)
        return _launch("max_pool2d_fwd", x, g.OH * g.OW, g, tensors,
                       (g.C, g.H, g.W, g.OH, g.OW, *x.stride(), *y.stride(), g.SH, g.SW, g.PH,
                        g.PW, g.DH, g.DW), KH=g.KH, KW=g.KW, INDEX_MODE=index_mode)

    @staticmethod
    def plan_max_bwd(dy, idx, dx, g: PoolGeometry, index_mode: int):
        return _plan_cells_bwd("max_pool2d_bwd", dy, idx, dx, g, INDEX_MODE=index_mode)

    @staticmethod
    def plan_avg_fwd(x, y, g: PoolGeometry) -> Launch:
        if _w_contiguous(x, y):
            return _planar_fwd("avg_pool2d_fwd_planar", x, (x, y), (
                g.C, g.H, g.W, g.OH, g.OW, *x.stride()[:3], *y.stride()[:3], g.divisor, g.KH,
                g.KW, g.SH, g.SW, g.PH, g.PW, _alignment(x, 3)), g, 8,
                COUNT_PAD=g.count_include_pad)
        return _launch("avg_pool2d_fwd", x, g.OH * g.OW, g, (x, y),
                       (g.C, g.H, g.W, g.OH, g.OW, *x.stride(), *y.stride(), g.SH, g.SW, g.PH,
                        g.PW, g.divisor), KH=g.KH, KW=g.KW, COUNT_PAD=g.count_include_pad)

    @staticmethod
    def plan_avg_bwd(dy, dx, g: PoolGeometry):
        return _plan_cells_bwd("avg_pool2d_bwd", dy, None, dx, g,
                               COUNT_PAD=g.count_include_pad)

    @staticmethod
    def plan_adaptive_fwd(x, y, g: PoolGeometry) -> Launch:
        if _global(x, g):
            return _launch("global_avg_pool2d_fwd", x, g.H * g.W, g, (x, y),
                           (g.C, g.H * g.W, *x.stride()[:2], x.stride(3), *y.stride()[:2]),
                           tile=lambda elems, warps: _global_tile(x, g, elems, warps),
                           grid=lambda cfg: (cdiv(g.C, cfg["BLOCK_C"]), g.N))
        return _launch("adaptive_avg_pool2d_fwd", x, g.OH * g.OW, g, (x, y),
                       (g.C, g.H, g.W, g.OH, g.OW, *x.stride(), *y.stride(),
                        cdiv(g.H, g.OH) + 1, cdiv(g.W, g.OW) + 1))

    @staticmethod
    def plan_adaptive_bwd(dy, dx, g: PoolGeometry) -> Launch:
        if _global(dx, g) and dx.is_contiguous() and not _channels_fastest(dx) \
                and dy.stride(0) == g.C * dy.stride(1):
            # NCHW: planes of HW positions (49 at the heads) tile badly; the flat dx does not
            total = dx.numel()
            return _launch("global_avg_pool2d_bwd_flat", dx, total, g, (dy, dx),
                           (total, dy.stride(1)),
                           tile=lambda elems, warps: dict(BLOCK=min(elems, 16 * 32 * warps),
                                                          num_warps=warps),
                           grid=lambda cfg: (cdiv(total, cfg["BLOCK"]),),
                           HW=g.H * g.W, WIDE=total >= 2 ** 31)
        if _global(dx, g):
            return _launch("global_avg_pool2d_bwd", dx, g.H * g.W, g, (dy, dx),
                           (g.C, g.H * g.W, *dy.stride()[:2], *dx.stride()[:2], dx.stride(3)),
                           tile=lambda elems, warps: _global_tile(dx, g, elems, warps),
                           grid=lambda cfg: (cdiv(g.C, cfg["BLOCK_C"]),
                                             cdiv(g.H * g.W, cfg["BLOCK_P"]), g.N))
        return _launch("adaptive_avg_pool2d_bwd", dx, g.H * g.W, g, (dy, dx),
                       (g.C, g.H, g.W, g.OH, g.OW, *dy.stride(), *dx.stride(),
                        g.OH // g.H + 3, g.OW // g.W + 3))


# --- Numba launch ---------------------------------------------------------------------------

class _NumbaPool(_PoolLauncher):
    """Same methods as _TritonPool, on the Numba kernels: one thread per output element
    (forward) or input element (backward), ordered in the memory order of the tensor. The
    plans are NumbaLaunches (on a GPU a repeated call writes its tensors' pointers alone)."""

    @staticmethod
    @planned_once
    def plan_max_fwd(x, y, idx, g: PoolGeometry, index_mode: int) -> NumbaLaunch:
        from .kernels.numba import pool as k
        idx = y if idx is None else idx                 # a placeholder, as run is given
        return numba_launch_1d(k.max_pool2d_fwd, y.numel(), y.device, (
            x, y, idx, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.KH, g.KW, index_mode,
            _channels_fastest(x), k.dtype_code(x.dtype)), (x, y, idx))

    @staticmethod
    @planned_once
    def plan_max_bwd(dy, idx, dx, g: PoolGeometry, index_mode: int) -> NumbaLaunch:
        from .kernels.numba import pool as k
        return numba_launch_1d(k.max_pool2d_bwd, dx.numel(), dx.device, (
            dy, idx, dx, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.KH, g.KW, index_mode,
            _channels_fastest(dx), k.dtype_code(dx.dtype)), (dy, idx, dx))

    @staticmethod
    @planned_once
    def plan_avg_fwd(x, y, g: PoolGeometry) -> NumbaLaunch:
        from .kernels.numba import pool as k
        return numba_launch_1d(k.avg_pool2d_fwd, y.numel(), y.device, (
            x, y, g.SH, g.SW, g.PH, g.PW, g.KH, g.KW, g.divisor, g.count_include_pad,
            _channels_fastest(x), k.dtype_code(x.dtype)), (x, y))

    @staticmethod
    @planned_once
    def plan_avg_bwd(dy, dx, g: PoolGeometry) -> NumbaLaunch:
        from .kernels.numba import pool as k
        return numba_launch_1d(k.avg_pool2d_bwd, dx.numel(), dx.device, (
            dy, dx, g.SH, g.SW, g.PH, g.PW, g.KH, g.KW, g.divisor, g.count_include_pad,
            _channels_fastest(dx), k.dtype_code(dx.dtype)), (dy, dx))

    @staticmethod
    @planned_once
    def plan_adaptive_fwd(x, y, g: PoolGeometry) -> NumbaLaunch:
        from .kernels.numba import pool as k
        return numba_launch_1d(k.adaptive_avg_pool2d_fwd, y.numel(), y.device, (
            x, y, _channels_fastest(x), k.dtype_code(x.dtype)), (x, y))

    @staticmethod
    @planned_once
    def plan_adaptive_bwd(dy, dx, g: PoolGeometry) -> NumbaLaunch:
        from .kernels.numba import pool as k
        return numba_launch_1d(k.adaptive_avg_pool2d_bwd, dx.numel(), dx.device, (
            dy, dx, _channels_fastest(dx), k.dtype_code(dx.dtype)), (dy, dx))


LAUNCHERS = {"triton": _TritonPool, "numba": _NumbaPool}

# index modes shared with the kernels (kernels/*/pool.py)
INDEX_NONE, INDEX_LOCAL, INDEX_FLAT = 0, 1, 2


def _local_index_dtype(g: PoolGeometry) -> torch.dtype:
    return torch.int8 if g.KH * g.KW <= 127 else torch.int32


# --- kernel ops (pydl::...) and autograd Functions ------------------------------------------

def _y_shape(g: PoolGeometry) -> tuple:
    return (g.N, g.C, g.OH, g.OW)


def _index_dtype(g: PoolGeometry, mode: int) -> torch.dtype:
    return {INDEX_FLAT: torch.int64, INDEX_LOCAL: _local_index_dtype(g)}.get(mode, torch.int8)


def _max_fwd_fake(x, geom, mode, backend):
    g, fmt = geometry_from(PoolGeometry, geom), memory_format_of(x)
    idx_shape = _y_shape(g) if mode != INDEX_NONE else (0,)
    return (empty_like_shape(x, _y_shape(g), memory_format=fmt),
            empty_like_shape(x, idx_shape, _index_dtype(g, mode),
                             memory_format=fmt if mode != INDEX_NONE else torch.contiguous_format))


@kernel_op("max_pool2d_fwd", _max_fwd_fake)
def _max_pool2d_fwd(x: Tensor, geom: list[int], mode: int, backend: str) -> tuple[Tensor, Tensor]:
    """(output, argmax in `mode`'s format; an empty tensor for INDEX_NONE)."""
    g, fmt = as_geometry(PoolGeometry, geom), memory_format_of(x)
    y = new_output(_y_shape(g), x.dtype, x.device, fmt)
    idx = (new_output(y.shape, _index_dtype(g, mode), x.device, fmt) if mode != INDEX_NONE
           else torch.empty(0, dtype=torch.int8, device=x.device))
    if y.numel():
        LAUNCHERS[backend].max_fwd(x, y, idx if mode != INDEX_NONE else None, g, mode)
    return y, idx


def _dx_fake(dy, *args):
    *_, geom, channels_last, backend = args
    g = geometry_from(PoolGeometry, geom)
    return empty_like_shape(dy, (g.N, g.C, g.H, g.W), memory_format=memory_format(channels_last))


def _new_dx(dy: Tensor, g: PoolGeometry, channels_last: bool) -> Tensor:
    return new_output((g.N, g.C, g.H, g.W), dy.dtype, dy.device, memory_format(channels_last))


@kernel_op("max_pool2d_bwd", _dx_fake)
def _max_pool2d_bwd(dy: Tensor, idx: Tensor, mode: int, geom: list[int], channels_last: bool,
                    backend: str) -> Tensor:
    g = as_geometry(PoolGeometry, geom)
    dx = _new_dx(dy, g, channels_last)
    if dx.numel():
        LAUNCHERS[backend].max_bwd(dy, idx, dx, g, mode)
    return dx


@kernel_op("avg_pool2d_fwd", lambda x, geom, adaptive, backend: empty_like_shape(
    x, _y_shape(geometry_from(PoolGeometry, geom)), memory_format=memory_format_of(x)))
def _avg_pool2d_fwd(x: Tensor, geom: list[int], adaptive: bool, backend: str) -> Tensor:
    g = as_geometry(PoolGeometry, geom)
    y = new_output(_y_shape(g), x.dtype, x.device, memory_format_of(x))
    if y.numel():
        launch = LAUNCHERS[backend]
        (launch.adaptive_fwd if adaptive else launch.avg_fwd)(x, y, g)
    return y


@kernel_op("avg_pool2d_bwd", _dx_fake)
def _avg_pool2d_bwd(dy: Tensor, adaptive: bool, geom: list[int], channels_last: bool,
                    backend: str) -> Tensor:
    g = as_geometry(PoolGeometry, geom)
    dx = _new_dx(dy, g, channels_last)
    if dx.numel():
        launch = LAUNCHERS[backend]
        (launch.adaptive_bwd if adaptive else launch.avg_bwd)(dy, dx, g)
    return dx


def _channels_last(x: Tensor) -> bool:
    return memory_format_of(x) == torch.channels_last


class PoolKernels:
    """A pooling op's kernel ops for one geometry and backend (the average pools' `adaptive`
    telling adaptive_avg_pool2d; `channels_last`: the input's layout, the gradient's): what
    the Functions run, pydl:: custom ops under torch.compile. In eager mode a call
    signature's plan (_PoolCall, a subclass) runs the same steps with its outputs' allocation
    and its launches fixed."""

    __slots__ = ("g", "backend", "adaptive", "channels_last")

    def __init__(self, g: PoolGeometry, backend: str, adaptive: bool, channels_last: bool):
        self.g, self.backend, self.adaptive, self.channels_last = (g, backend, adaptive,
                                                                   channels_last)

    def kernels(self) -> "PoolKernels":
        """The ops for tensors of any strides (the double backward's)."""
        return self

    def max_forward(self, x, mode: int):
        """(y, argmax in `mode`'s format; unused for INDEX_NONE)."""
        return _max_pool2d_fwd(x, self.g, mode, self.backend)

    def max_backward(self, dy, idx, mode: int):
        return _max_pool2d_bwd(dy, idx, mode, self.g, self.channels_last, self.backend)

    def avg_forward(self, x):
        return _avg_pool2d_fwd(x, self.g, self.adaptive, self.backend)

    def avg_backward(self, dy):
        return _avg_pool2d_bwd(dy, self.adaptive, self.g, self.channels_last, self.backend)


class MaxPool2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ops: PoolKernels, return_indices: bool):
        needs_grad = ctx.needs_input_grad[0]
        mode = INDEX_FLAT if return_indices else (INDEX_LOCAL if needs_grad else INDEX_NONE)
        y, idx = ops.max_forward(x, mode)
        ctx.ops, ctx.mode = ops, mode
        if needs_grad:
            ctx.save_for_backward(idx)
        if return_indices:
            ctx.mark_non_differentiable(idx)
            return y, idx
        return y

    @staticmethod
    def backward(ctx, dy, *unused):
        (idx,) = ctx.saved_tensors
        if torch.is_grad_enabled():      # create_graph: differentiable again
            return _MaxPool2dBackward.apply(dy, idx, ctx.ops.kernels(), ctx.mode), None, None
        return ctx.ops.max_backward(dy, idx, ctx.mode), None, None


class _MaxPool2dBackward(torch.autograd.Function):
    """max_pool2d's backward (dy sent to each window's argmax, pydl's kernel) as a Function of
    dy, for double backward. Its derivative gathers ddx at the argmax: torch.gather on the
    saved indices made flat (README: double backward); w.r.t. x it is 0 (the argmax is
    piecewise constant), as in torch, so the input gets no second-order term."""

    @staticmethod
    def forward(ctx, dy, idx, ops: PoolKernels, mode: int):
        ctx.save_for_backward(idx)
        ctx.g, ctx.mode = ops.g, mode
        return ops.max_backward(dy, idx, mode)

    @staticmethod
    def backward(ctx, ddx):
        (idx,) = ctx.saved_tensors
        flat = _flat_indices(idx, ctx.mode, ctx.g)
        N, C, OH, OW = flat.shape
        return (ddx.reshape(N, C, -1).gather(2, flat.reshape(N, C, -1)).view(N, C, OH, OW), None,
                None, None)


def _flat_indices(idx: Tensor, mode: int, g: PoolGeometry) -> Tensor:
    """The argmax as torch's flat per-plane index h * W + w (int64), from either saved format."""
    if mode == INDEX_FLAT:
        return idx
    local = idx.long()                   # kh * KW + kw
    oh = torch.arange(g.OH, device=idx.device).view(-1, 1)
    ow = torch.arange(g.OW, device=idx.device)
    h = oh * g.SH - g.PH + (local // g.KW) * g.DH
    w = ow * g.SW - g.PW + (local % g.KW) * g.DW
    return h * g.W + w


class AvgPool2dFunction(torch.autograd.Function):
    """avg_pool2d or adaptive_avg_pool2d (ops.adaptive)."""

    @staticmethod
    def forward(ctx, x, ops: PoolKernels):
        ctx.ops = ops
        return ops.avg_forward(x)

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():      # create_graph: differentiable again
            return _AvgPool2dBackward.apply(dy, ctx.ops.kernels()), None
        return ctx.ops.avg_backward(dy), None


class _AvgPool2dBackward(torch.autograd.Function):
    """The average pools' backward dx = A^T dy (A the pooling, linear, independent of x) as a
    Function of dy, for double backward: its derivative is A itself, the forward kernel, so
    gradients of any order run on pydl's kernels."""

    @staticmethod
    def forward(ctx, dy, ops: PoolKernels):
        ctx.ops = ops
        return ops.avg_backward(dy)

    @staticmethod
    def backward(ctx, ddx):
        ops = ctx.ops
        return AvgPool2dFunction.apply(ddx, PoolKernels(ops.g, ops.backend, ops.adaptive,
                                                        _channels_last(ddx))), None


# --- implementations by backend -------------------------------------------------------------

def _register(name: str):
    def max_pool(x, g, return_indices):
        ops = PoolKernels(g, name, False, _channels_last(x))
        if needs_graph(x):
            return apply(MaxPool2dFunction, x, ops, return_indices)
        y, idx = ops.max_forward(x, INDEX_FLAT if return_indices else INDEX_NONE)
        return (y, idx) if return_indices else y

    def avg_pool(adaptive):
        def impl(x, g):
            ops = PoolKernels(g, name, adaptive, _channels_last(x))
            if needs_graph(x):
                return apply(AvgPool2dFunction, x, ops)
            return ops.avg_forward(x)
        return impl

    _KERNEL_IMPLS[name] = (register("max_pool2d", name)(max_pool),
                           register("avg_pool2d", name)(avg_pool(False)),
                           register("adaptive_avg_pool2d", name)(avg_pool(True)))


# backend -> pydl's own implementations (a call plans its eager form only where they run)
_KERNEL_IMPLS: dict[str, tuple] = {}


for _name in LAUNCHERS:
    _register(_name)


@register("max_pool2d", "torch")
def _torch_max_pool2d(x, g, return_indices):
    return torch.nn.functional.max_pool2d(x, (g.KH, g.KW), (g.SH, g.SW), (g.PH, g.PW), (g.DH, g.DW),
                                          ceil_mode=g.ceil_mode, return_indices=return_indices)


@register("avg_pool2d", "torch")
def _torch_avg_pool2d(x, g):
    return torch.nn.functional.avg_pool2d(
        x, (g.KH, g.KW), (g.SH, g.SW), (g.PH, g.PW),
        ceil_mode=g.ceil_mode, count_include_pad=g.count_include_pad, divisor_override=g.divisor or None)


@register("adaptive_avg_pool2d", "torch")
def _torch_adaptive_avg_pool2d(x, g):
    return torch.nn.functional.adaptive_avg_pool2d(x, (g.OH, g.OW))


# --- argument checks and the public functions -----------------------------------------------
# Each public function checks a call signature once (pydl._plan): the result is a function of
# the input alone that batches it, runs the implementation and unbatches the output.

def _batched_shape(input, backend) -> tuple[tuple[int, int, int, int], bool]:
    check_tensor(input, "input", backend, ndims=(3, 4))
    if input.dim() == 3:
        return (1, *input.shape), True
    return tuple(input.shape), False


def _check_not_empty(shape) -> None:
    """Only the batch may be empty, as in torch (which raises for 0 channels or pixels)."""
    if 0 in shape[1:]:
        raise ValueError(f"input has an empty non-batch dimension: shape {tuple(shape)} (only "
                         f"the batch may be 0, as in torch)")


def _geometry(shape, kernel_size, stride, padding, dilation, ceil_mode, **extra) -> PoolGeometry:
    N, C, H, W = shape
    KH, KW = pair(kernel_size, "kernel_size")
    if KH <= 0 or KW <= 0:
        raise ValueError(f"kernel_size must be positive, got {kernel_size}")
    if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0):
        SH, SW = KH, KW
    else:
        SH, SW = pair(stride, "stride")
    PH, PW = pair(padding, "padding")
    DH, DW = pair(dilation, "dilation")
    _check_not_empty(shape)
    OH = pool_output_size(H, KH, SH, PH, DH, ceil_mode, name="input height")
    OW = pool_output_size(W, KW, SW, PW, DW, ceil_mode, name="input width")
    return PoolGeometry(N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, ceil_mode, **extra)


@emulated("max_forward", "max_backward", "avg_forward", "avg_backward")
class _PoolCall(PoolKernels):
    """A pooling op for one call signature (pydl._plan), checked once: the implementation and
    the geometry; called with the input alone (batched and unbatched here). On a kernel
    backend in eager mode it is also the signature's plan: the Functions run its methods,
    which allocate with arguments fixed here and launch what the first call built (the
    backward's launches per strides of the upstream gradient); the call's key fixes every
    other input of those."""

    __slots__ = ("impl", "unbatched", "indices", "max", "eager", "launcher", "new_y",
                 "new_idx", "new_dx", "no_y", "no_dx", "fwd", "bwd")

    def __init__(self, impl, name: str, g: PoolGeometry, input, unbatched: bool, max_pool: bool,
                 adaptive: bool = False, indices: bool = False):
        super().__init__(g, name, adaptive, not unbatched and _channels_last(input))
        self.impl, self.unbatched, self.max, self.indices = impl, unbatched, max_pool, indices
        self.eager = (impl in _KERNEL_IMPLS.get(name, ()) and not unbatched
                      and not torch.compiler.is_compiling() and plain_tensors(input))
        if self.eager:
            dt, dev, fmt = input.dtype, input.device, memory_format_of(input)
            self.launcher = LAUNCHERS[name]
            self.new_y = output_maker(_y_shape(g), dt, dev, fmt)
            self.new_idx = {mode: output_maker(_y_shape(g), _index_dtype(g, mode), dev, fmt)
                            for mode in (INDEX_LOCAL, INDEX_FLAT)}
            self.new_dx = output_maker(input.shape, dt, dev, memory_format(self.channels_last))
            # nothing to launch for an empty output (as the kernel ops)
            self.no_y, self.no_dx = math.prod(_y_shape(g)) == 0, input.numel() == 0
            self.fwd, self.bwd = {}, {}

    def __call__(self, input):
        if self.eager:
            graph = torch.is_grad_enabled() and input.requires_grad
            if self.max:
                if graph:
                    return apply(MaxPool2dFunction, input, self, self.indices)
                y, idx = self.max_forward(input, INDEX_FLAT if self.indices else INDEX_NONE)
                return (y, idx) if self.indices else y
            if graph:
                return apply(AvgPool2dFunction, input, self)
            return self.avg_forward(input)
        x = input.unsqueeze(0) if self.unbatched else input
        out = self.impl(x, self.g, self.indices) if self.max else self.impl(x, self.g)
        if not self.unbatched:
            return out
        if self.max and self.indices:
            return out[0].squeeze(0), out[1].squeeze(0)
        return out.squeeze(0)

    # the plan (eager, kernel backends): PoolKernels' steps with fixed arguments

    def kernels(self) -> PoolKernels:
        return PoolKernels(self.g, self.backend, self.adaptive, self.channels_last)

    def _run(self, runs: dict, key, plan, *args):
        """runs[key], else plan(*args) kept there (not under a CUDA graph capture)."""
        run = plan(*args)
        if not capturing():
            runs[key] = run
        return run

    def max_forward(self, x, mode: int):
        y = fresh(self.new_y)
        idx = fresh(self.new_idx[mode]) if mode != INDEX_NONE else None
        if not self.no_y:
            run = self.fwd.get(mode) or self._run(self.fwd, mode, self.launcher.plan_max_fwd, x,
                                                  y, idx, self.g, mode)
            run(x, y, y if idx is None else idx)
        return y, idx

    def max_backward(self, dy, idx, mode: int):
        dx = fresh(self.new_dx)
        if not self.no_dx:
            key = (dy.stride(), mode)
            run = self.bwd.get(key) or self._run(self.bwd, key, self.launcher.plan_max_bwd, dy,
                                                 idx, dx, self.g, mode)
            run(dy, idx, dx)
        return dx

    def avg_forward(self, x):
        y = fresh(self.new_y)
        if not self.no_y:
            run = self.fwd.get(0) or self._run(
                self.fwd, 0, self.launcher.plan_adaptive_fwd if self.adaptive
                else self.launcher.plan_avg_fwd, x, y, self.g)
            run(x, y)
        return y

    def avg_backward(self, dy):
        dx = fresh(self.new_dx)
        if not self.no_dx:
            key = dy.stride()
            run = self.bwd.get(key) or self._run(
                self.bwd, key, self.launcher.plan_adaptive_bwd if self.adaptive
                else self.launcher.plan_avg_bwd, dy, dx, self.g)
            run(dy, dx)
        return dx


def _key(input, *options):
    return (*tensors_key(input), current_backend() if options[-1] is None else options[-1],
            *options)


def _max_pool2d_call(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices,
                     backend):
    name, impl = dispatch("max_pool2d", backend, input)
    shape, unbatched = _batched_shape(input, name)
    g = _geometry(shape, kernel_size, stride, padding, dilation, bool(ceil_mode))
    return _PoolCall(impl, name, g, input, unbatched, True, indices=bool(return_indices))


def _avg_pool2d_call(input, kernel_size, stride, padding, ceil_mode, count_include_pad,
                     divisor_override, backend):
    name, impl = dispatch("avg_pool2d", backend, input)
    shape, unbatched = _batched_shape(input, name)
    if divisor_override is not None:
        divisor_override = positive_int(divisor_override, "divisor_override")
    g = _geometry(shape, kernel_size, stride, padding, 1, bool(ceil_mode),
                  count_include_pad=bool(count_include_pad), divisor=divisor_override or 0)
    return _PoolCall(impl, name, g, input, unbatched, False)


def _adaptive_avg_pool2d_call(input, output_size, backend):
    name, impl = dispatch("adaptive_avg_pool2d", backend, input)
    (N, C, H, W), unbatched = _batched_shape(input, name)
    if isinstance(output_size, (list, tuple)):
        sizes = [None if v is None else integer(v) for v in output_size]
        if len(sizes) != 2 or any(v is None and o is not None
                                  for v, o in zip(sizes, output_size)):
            # torch too: no one-element form here
            raise ValueError(f"output_size must be an int or a pair of ints (or None), got "
                             f"{output_size!r}")
        OH = H if sizes[0] is None else sizes[0]
        OW = W if sizes[1] is None else sizes[1]
    else:
        OH, OW = pair(output_size, "output_size")
    if OH < 0 or OW < 0:
        raise ValueError(f"output_size must be non-negative, got {output_size}")
    _check_not_empty((N, 1, H, W))      # 0 channels: an empty output, as torch gives
    return _PoolCall(impl, name, PoolGeometry(N, C, H, W, int(OH), int(OW), 1, 1, 1, 1), input,
                     unbatched, False, adaptive=True)


_CALLS = {"max": Cache("max_pool2d calls"), "avg": Cache("avg_pool2d calls"),
          "adaptive": Cache("adaptive_avg_pool2d calls")}


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
               return_indices=False, *, backend=None):
    """torch.nn.functional.max_pool2d; with return_indices, (output, int64 flat indices)."""
    return _CALLS["max"].call(_key, _max_pool2d_call, input, kernel_size, stride, padding,
                              dilation, ceil_mode, return_indices, backend)(input)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False,
               count_include_pad=True, divisor_override=None, *, backend=None):
    """torch.nn.functional.avg_pool2d."""
    return _CALLS["avg"].call(_key, _avg_pool2d_call, input, kernel_size, stride, padding,
                              ceil_mode, count_include_pad, divisor_override, backend)(input)


def adaptive_avg_pool2d(input, output_size, *, backend=None):
    """torch.nn.functional.adaptive_avg_pool2d; output_size an int, a pair, or None entries
    (keep that input dimension). output_size=1 is global average pooling."""
    return _CALLS["adaptive"].call(_key, _adaptive_avg_pool2d_call, input, output_size,
                                   backend)(input)


__all__ = ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "PoolGeometry",
           "MaxPool2dFunction", "AvgPool2dFunction"]
