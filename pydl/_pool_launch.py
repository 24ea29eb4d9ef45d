"""The pooling launchers (kernels/triton/pool.py, kernels/numba/pool.py): one pooling's
geometry (PoolGeometry), the Triton launches (tiles, tuning, plans) and the Numba ones, each a
launcher with a method and a plan per step (LAUNCHERS).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._launch import cdiv, image_view, next_power_of_2, planned_once
from ._library import Geometry
from ._numba_launch import NumbaLaunch, numba_launch_1d
from ._plan import BatchSlices, Cache, Launch, batch_launch
from ._tune import Tuner, bucket


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
        # (a 1-d pool's plan passes its (N, C, L) gradient: as its 1 x L image)
        return lambda dy, *rest: launch(image_view(dy).contiguous(memory_format=fmt), *rest)
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
