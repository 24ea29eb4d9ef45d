"""conv2d: argument checks, the autograd Function, and the launchers of each algorithm.

Algorithms (`algo=`), each a handwritten kernel path:
  "implicit"  Triton implicit GEMM (kernels/triton/conv.py): input patches are gathered inside
              the GEMM's K loop, never materialised; backward passes are implicit GEMMs too.
              Depthwise layers (groups == C_in, multiplier <= 4) take direct kernels instead
              (kernels/triton/conv_depthwise.py: no matrix product in them). The default for
              the triton backend.
  "im2col"    Triton explicit im2col + tiled GEMM (kernels/triton/conv.py, kernels/triton/gemm.py):
              the column matrix of a chunk of images is materialised, then multiplied by the
              weight; grad input is a GEMM then a col2im gather, grad weight a GEMM. The batch
              goes in chunks so the workspace stays under IM2COL_WORKSPACE_BYTES (256 MiB).
              On the numba backend (its only algo, so its default): the same steps as Numba
              CUDA kernels (kernels/numba/conv.py; the shared-memory tiled GEMM of
              kernels/numba/gemm.py via pydl/_gemm_numba.py), the same workspace bound.

Semantics are torch.nn.functional.conv2d's: cross-correlation, padding int / pair / "same" /
"valid", stride, dilation, groups (depthwise included), optional bias; NCHW or channels_last
input (the output keeps the input's memory format), any strides without a copy.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import _env
from ._checks import check_tensor
from ._gemm import gemm_plan_on
from ._gemm_numba import gemm_plan_on as gemm_plan_on_numba
from ._library import Geometry, as_geometry, autocast_inputs, empty_like_shape, geometry_from, kernel_op
from ._launch import (NumbaLaunch, arrival_counters, cdiv, dot_block, fresh, input_precision,
                      memory_format_of, new_output, next_power_of_2, numba_launch_1d,
                      output_maker, planned_once, tf32_allowed)
from ._plan import (GRID_YZ_MAX, Cache, Launch, apply, capturing, emulated, needs_graph,
                    plain_tensors, tensors_key)
from ._shapes import conv_output_size_padded, conv_padding, pair, positive_int
from ._tune import Tuner, bucket, gemm_candidates
from .backends import current_backend, dispatch, register, resolve_algo


@dataclass(frozen=True)
class ConvGeometry(Geometry):
    """One convolution: input (N, C, H, W), weight (OC, C / groups, KH, KW), output (N, OC, OH, OW)."""
    N: int
    C: int
    H: int
    W: int
    OC: int
    KH: int
    KW: int
    OH: int
    OW: int
    SH: int = 1
    SW: int = 1
    PH: int = 0   # top padding
    PW: int = 0   # left padding
    DH: int = 1
    DW: int = 1
    groups: int = 1
    PB: int = 0   # bottom and right padding: equal to PH, PW except for padding="same"
    PR: int = 0   # with an even kernel span (the kernels only need top and left)
    __hash__ = Geometry.__hash__

    @property
    def CG(self) -> int:
        return self.C // self.groups

    @property
    def OCG(self) -> int:
        return self.OC // self.groups


def _input_precision(dtype: torch.dtype) -> str:
    """fp32 dots round like cuDNN under the same torch setting (pydl._launch.input_precision)."""
    return input_precision(dtype, cudnn=True)


# --- Triton implicit GEMM -------------------------------------------------------------------

def _gemm_tile(m: int, n: int, k: int, block_k: int = 32) -> dict:
    """Default block sizes for an (m x k) @ (k x n) tile loop (the first tuning candidate,
    pydl/_tune.py), K steps up to block_k deep: tl.dot needs every block >= 16."""
    return dict(BLOCK_M=dot_block(m, 64), BLOCK_N=dot_block(n, 128),
                BLOCK_K=dot_block(k, block_k), num_warps=4)


# Below this many channels per group the forward's K steps and the grad weight's columns run
# over (kh, kw, c) jointly (kernels/triton/conv.py, FLAT_K and FLAT_N): a 16-deep channel
# block would be mostly padding.
FLAT_K_CHANNELS = 16


def _flat_taps(g: ConvGeometry) -> bool:
    """Whether the implicit kernels take (kh, kw, c) jointly (FLAT_K, FLAT_N)."""
    return g.CG < FLAT_K_CHANNELS and g.KH * g.KW > 1


def _stride_phases(g: ConvGeometry) -> int:
    """Stride phases the implicit grad input tiles apart (kernels/triton/conv.py,
    STRIDE_PHASES): SH * SW for a strided convolution without dilation, else 1 (one tile
    holds pixels of every phase and masks the taps that do not reach them)."""
    if (g.DH, g.DW) != (1, 1):
        return 1
    return g.SH * g.SW


def _grad_input_routes(g: ConvGeometry) -> tuple:
    """The grad input's alternatives to the implicit kernel, for the tuner: with few channels
    (FLAT taps: the RGB stem) its output tile is CG columns padded to 16 (3 of 16 useful at the
    stem) over OC x KH x KW deep K steps; the im2col algorithm's dcols = dY @ W has the
    (kh, kw, c) columns dense (147 at the stem) and one K step of OC, then a col2im gather, at
    the price of an fp32 workspace (chunked, at most IM2COL_WORKSPACE_BYTES). Measured on a
    GPU by the tuner (bench/TUNING.md v7); never the default."""
    return ("col2im",) if _flat_taps(g) and g.groups == 1 else ()


# One tuner per implicit-GEMM kernel. Keys: everything of the geometry but the batch, the
# dtype and rounding, the layout, and a coarse bucket of the GEMM's batch-dependent extent.
IMPLICIT_TUNERS = {d: Tuner(f"conv2d_implicit_{d}") for d in ("fwd", "bwd_input", "bwd_weight")}


def _implicit_config(direction: str, g: ConvGeometry, t: torch.Tensor, m: int, n: int, k: int,
                     launch, routes: tuple = ()) -> dict:
    """The launch config of one implicit-GEMM kernel: an (m x k) @ (k x n) tile loop whose K
    steps run over channels (forward, grad input) or pixels (grad weight). `routes`: other
    ways to the same result the tuner also times, as candidates {"ROUTE": name} that
    `launch` runs (never the default)."""
    flat_n = direction == "bwd_weight" and _flat_taps(g)
    # the grad weight's 16-bit tap tiles step 64 deep: 168 registers a thread at 64 x 64 on 4
    # warps in the sm_90 compile, 3 programs a multiprocessor; 32 deep took 178, 2 of them
    deep = direction == "bwd_weight" and not flat_n and t.dtype.itemsize <= 2
    default = _gemm_tile(m, n, k, 64 if deep else 32)
    if flat_n:
        # FLAT_N gathers the input operand with per-element (h, w) arithmetic over its whole
        # [BLOCK_K, BLOCK_N] tile; more than 16 gathered elements a thread spilled beside
        # the split-K reduction (the stem's 64 x 64 x 64 on 4 warps 36 bytes, 64 x 128 x 32
        # 420, in `python -m bench resources`).
        default["BLOCK_N"] = min(default["BLOCK_N"], 64)
        if t.dtype.itemsize > 2:
            default["BLOCK_K"] = dot_block(k, 16)       # fp32 at 32 deep spilled 28-88 bytes
    candidates = gemm_candidates(default, m, n, k, t.dtype.itemsize)
    if direction == "bwd_weight":
        # more than 64 accumulators a thread leave no registers for the split-K reduction
        # (128 x 256 on 8 warps spilled 1.2 KiB)
        candidates = [c for c in candidates if c is default or
                      c["BLOCK_M"] * c["BLOCK_N"] <= 64 * 32 * c.get("num_warps", 4)]
    if flat_n:
        candidates = [c for c in candidates if c is default or
                      c["BLOCK_N"] * c["BLOCK_K"] <= 16 * 32 * c.get("num_warps", 4)]
    if direction == "bwd_weight":
        # each tile also at the other split-K target (the launch reads SPLIT_WAVES)
        candidates += [dict(c, SPLIT_WAVES=w) for w in SPLIT_WAVES[1:] for c in candidates]
    candidates += [{"ROUTE": r} for r in routes]
    key = (t.dtype, _input_precision(t.dtype), g.C, g.OC, g.KH, g.KW, g.SH, g.SW, g.DH, g.DW,
           g.groups, memory_format_of(t) == torch.channels_last, bucket(m), bucket(n), bucket(k))
    return IMPLICIT_TUNERS[direction].pick(key, candidates, launch)


# Split-K of the weight gradient: enough programs to fill the GPU `waves` times over (2 by
# default; the tuner also tries 4: the 64 x 64 tiles on 4 warps take 128 registers and 48 KiB,
# so 4 fit on a multiprocessor, and at 2 the SMs' schedulers have half as many warps to hide
# the K loop's latency with), each summing at least SPLIT_MIN_STEPS K steps, at most
# SPLIT_MAX splits per 2 waves (the last program of a tile sums the tile's partials, two at a
# time, after the others: its L2 round trips end the kernel), with a workspace of at most
# SPLIT_WORKSPACE_ELEMS fp32 partials. In emulation the "GPU" has SIM_SMS multiprocessors, so
# small test shapes split too.
SPLIT_MIN_STEPS = 4
SPLIT_MAX = 32
SPLIT_WAVES = (2, 4)        # the default, then the tuner's alternative (config key SPLIT_WAVES)
SPLIT_WORKSPACE_ELEMS = 16 * 2**20
SIM_SMS = 2


def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return SIM_SMS
    return _device_multiprocessors(device)


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _reduce_rows(cfg: dict) -> int:
    """Rows of a grad-weight tile its split-K reduction sums at once: the whole tile up to 32
    fp32 values a thread (as many as its accumulator holds at 64 x 64 on 4 warps)."""
    return max(1, min(cfg["BLOCK_M"], 32 * 32 * cfg.get("num_warps", 4) // cfg["BLOCK_N"]))


def _pixel_ranges(tiles: int, P: int, block: int, device, waves: int, most: int,
                  min_steps: int) -> tuple[int, int]:
    """(ranges, pixels a range, a multiple of block) splitting a sum over P pixels for `tiles`
    output tiles: about `waves` programs a multiprocessor, at most `most` ranges, each at
    least `min_steps` blocks."""
    want = cdiv(waves * _multiprocessors(device), tiles)
    split = max(1, min(want, most, P // (min_steps * block)))
    p_split = cdiv(cdiv(P, split), block) * block
    return cdiv(P, p_split), p_split


def _split_k(tiles: int, P: int, block_k: int, numel: int, device,
             waves: int = SPLIT_WAVES[0]) -> tuple[int, int]:
    """(splits, pixels per split, a multiple of block_k) for a grad weight of `tiles` output
    tiles (`numel` elements in all, tiles padded to whole blocks) summing P pixels, aiming at
    `waves` programs a multiprocessor."""
    return _pixel_ranges(tiles, P, block_k, device, waves,
                         min(SPLIT_MAX * waves // 2, SPLIT_WORKSPACE_ELEMS // numel),
                         SPLIT_MIN_STEPS)


def _pointwise_matrices(g: ConvGeometry, *tensors):
    """A 1x1 convolution at stride 1 without padding is a matrix product over pixels: the
    (B1, groups, pixels, channels / groups) matrices (_pixel_matrix views) of `tensors`, or
    None for another convolution or when their layouts give matrices of different batch
    shapes (then the implicit kernels run)."""
    if (g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, g.PB, g.PR) != (1, 1, 1, 1, 0, 0, 0, 0):
        return None
    mats = [_pixel_matrix(t, 0, g.N, g.groups) for t in tensors]
    if any(m is None for m in mats) or len({m.shape[0] for m in mats}) > 1:
        return None
    return mats


def _bias_matrix(b: torch.Tensor | None, g: ConvGeometry) -> torch.Tensor | None:
    """The bias as (groups, OC / groups), a view (the GEMM epilogue adds it per column)."""
    if b is None:
        return None
    return b.as_strided((g.groups, g.OCG), (g.OCG * b.stride(0), b.stride(0)), b.storage_offset())


# The Triton algorithms' plans, built once per signature: the geometry, the operands' dtype,
# layout (strides) and device, bias or not, the rounding of fp32 dots (and for im2col the
# workspace bound). The kernel ops look them up here; an eager call's plan keeps its own.
_TRITON_PLANS = Cache("conv2d triton plans")


class _Launcher:
    """What a conv2d launcher offers (each algorithm's class below): plans, one per step,
    plan_forward(x, w, b, y, g), plan_backward_input(dy, w, dx, g), plan_backward_weight(dy,
    x, dw, g), plan_backward_bias(dy, db, g) -> run(tensors), for a caller that launches the
    same signature again (pydl/_plan.py): run takes the tensors alone (the forward's bias,
    when absent, as a placeholder: the weight) at the addresses of those planned, and holds
    what was built for the shapes, strides, dtypes and device it was planned with (the
    Triton launchers' cached Launches and GEMM plans, the Numba one's NumbaLaunches); and
    the same steps launched once into the given output, forward(x, w, b, y, g) and so on."""

    @classmethod
    def forward(cls, x, w, b, y, g: ConvGeometry) -> None:
        cls.plan_forward(x, w, b, y, g)(x, w, w if b is None else b, y)

    @classmethod
    def backward_input(cls, dy, w, dx, g: ConvGeometry) -> None:
        cls.plan_backward_input(dy, w, dx, g)(dy, w, dx)

    @classmethod
    def backward_weight(cls, dy, x, dw, g: ConvGeometry) -> None:
        cls.plan_backward_weight(dy, x, dw, g)(dy, x, dw)

    @classmethod
    def backward_bias(cls, dy, db, g: ConvGeometry) -> None:
        cls.plan_backward_bias(dy, db, g)(dy, db)


def _strided_bias(b) -> bool:
    """A bias the unit-stride kernels cannot read as it is: a strided view of more than one
    element (torch calls a one-element tensor contiguous whatever its stride, and
    .contiguous() keeps it: the kernels read its element 0 alone)."""
    return b is not None and b.stride(0) != 1 and b.numel() > 1


def _unit_stride_bias(plan, x, w, b, y, g: ConvGeometry):
    """plan(x, w, b, y, g)'s callable for a kernel that reads the bias at unit stride, given a
    strided bias (a view, _strided_bias): the bias copied per call."""
    launch = plan(x, w, b.contiguous(), y, g)
    return lambda x, w, b, y: launch(x, w, b.contiguous(), y)


class _TritonImplicit(_Launcher):
    @staticmethod
    def plan_forward(x, w, b, y, g: ConvGeometry):
        key = ("fwd", g, x.dtype, x.device, x.stride(), w.stride(), y.stride(),
               None if b is None else b.stride(), _input_precision(x.dtype))
        return _TRITON_PLANS.get(key, _TritonImplicit._plan_forward, x, w, b, y, g)

    @staticmethod
    def _plan_forward(x, w, b, y, g: ConvGeometry):
        """A callable (x, w, b or w, y): the implicit-GEMM kernel, or the GEMM for 1x1, or the
        direct kernel of a depthwise layer."""
        from .kernels.triton import conv as k
        if _depthwise(g):
            return _TritonDepthwise.plan_forward(x, w, b, y, g)
        mats = _pointwise_matrices(g, x, y)
        if mats is not None:                            # 1x1: the shared, tuned GEMM
            wm, w0, weight = _weight_matrix_plan(w, g)
            product = gemm_plan_on((x, w0, y, b, None), mats[0], wm, mats[1], trans_b=True,
                                   bias=_bias_matrix(b, g),
                                   input_precision=_input_precision(x.dtype))
            has_bias = b is not None

            def pointwise(x, w, b, y):
                product(x, w if weight is None else weight(w), y, b if has_bias else None, None)
            return pointwise
        if _strided_bias(b):
            return _unit_stride_bias(_TritonImplicit._plan_forward, x, w, b, y, g)
        M = g.N * g.OH * g.OW
        flat_k = _flat_taps(g)
        scalars = (g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *x.stride(), *w.stride(), *y.stride(),
                   g.SH, g.SW, g.PH, g.PW, g.DH, g.DW)
        consts = dict(KH=g.KH, KW=g.KW, CG=g.CG, OCG=g.OCG, HAS_BIAS=b is not None,
                      INPUT_PRECISION=_input_precision(x.dtype), FLAT_K=flat_k)

        def launch(cfg):
            grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(g.OCG, cfg["BLOCK_N"]), g.groups)
            return Launch(k.conv2d_implicit_fwd, grid, scalars, {**consts, **cfg})

        k_len = g.CG * g.KH * g.KW if flat_k else g.CG
        cfg = _implicit_config("fwd", g, x, M, g.OCG, k_len,
                               lambda c: launch(c)(x, w, w if b is None else b, y))
        return launch(cfg)

    @staticmethod
    def plan_backward_input(dy, w, dx, g: ConvGeometry):
        key = ("bwd_input", g, dy.dtype, dy.device, dy.stride(), w.stride(), dx.stride(),
               _input_precision(dy.dtype))
        return _TRITON_PLANS.get(key, _TritonImplicit._plan_backward_input, dy, w, dx, g)

    @staticmethod
    def _plan_backward_input(dy, w, dx, g: ConvGeometry):
        """A callable (dy, w, dx): the implicit-GEMM kernel, or the GEMM for 1x1, or the
        direct kernel of a depthwise layer."""
        from .kernels.triton import conv as k
        if _depthwise(g):
            return _TritonDepthwise.plan_backward_input(dy, w, dx, g)
        mats = _pointwise_matrices(g, dy, dx)
        if mats is not None:                            # 1x1: dX = dY @ W, the shared GEMM
            wm, w0, weight = _weight_matrix_plan(w, g)
            product = gemm_plan_on((dy, w0, dx, None, None), mats[0], wm, mats[1],
                                   input_precision=_input_precision(dy.dtype))
            if weight is None:
                return lambda dy, w, dx: product(dy, w, dx, None, None)
            return lambda dy, w, dx: product(dy, weight(w), dx, None, None)
        M = g.N * g.H * g.W
        phases = _stride_phases(g)
        scalars = (g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *dy.stride(), *w.stride(), *dx.stride(),
                   g.SH, g.SW, g.PH, g.PW, g.DH, g.DW)
        consts = dict(KH=g.KH, KW=g.KW, CG=g.CG, OCG=g.OCG, STRIDE_PHASES=phases > 1,
                      INPUT_PRECISION=_input_precision(dy.dtype))
        # with stride phases, each phase's pixels (n, h // SH, w // SW) are tiled apart
        phase_pixels = g.N * cdiv(g.H, g.SH) * cdiv(g.W, g.SW) if phases > 1 else M

        col2im = []     # the im2col algorithm's grad input, planned on first use

        def launch(cfg):
            if cfg.get("ROUTE") == "col2im":
                if not col2im:
                    col2im.append(_TritonIm2col._plan_backward_input(dy, w, dx, g))
                return col2im[0]
            grid = (phases * cdiv(phase_pixels, cfg["BLOCK_M"]), cdiv(g.CG, cfg["BLOCK_N"]),
                    g.groups)
            return Launch(k.conv2d_implicit_bwd_input, grid, scalars, {**consts, **cfg})

        cfg = _implicit_config("bwd_input", g, dy, M, g.CG, g.OCG,
                               lambda c: launch(c)(dy, w, dx), _grad_input_routes(g))
        return launch(cfg)

    @staticmethod
    def plan_backward_weight(dy, x, dw, g: ConvGeometry):
        key = ("bwd_weight", g, dy.dtype, dy.device, dy.stride(), x.stride(), dw.stride(),
               _input_precision(dy.dtype))
        return _TRITON_PLANS.get(key, _TritonImplicit._plan_backward_weight, dy, x, dw, g)

    @staticmethod
    def _plan_backward_weight(dy, x, dw, g: ConvGeometry):
        """A callable (dy, x, dw): the split-K grad-weight kernel (fp32 partials summed by each
        tile's last-arriving program), or the kernel straight into dw when one split suffices;
        the direct kernel of a depthwise layer."""
        from .kernels.triton import conv as k
        if _depthwise(g):
            return _TritonDepthwise.plan_backward_weight(dy, x, dw, g)
        P = g.N * g.OH * g.OW
        flat_n = _flat_taps(g)
        consts = dict(KH=g.KH, KW=g.KW, CG=g.CG, OCG=g.OCG, FLAT_N=flat_n,
                      INPUT_PRECISION=_input_precision(dy.dtype))

        def launch(cfg):
            cfg = dict(cfg)
            waves = cfg.pop("SPLIT_WAVES", SPLIT_WAVES[0])      # the host's, not a constexpr
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            cols = cdiv(g.CG * g.KH * g.KW, bn) if flat_n else g.KH * g.KW * cdiv(g.CG, bn)
            tiles = cdiv(g.OCG, bm) * cols * g.groups
            split, p_split = _split_k(tiles, P, cfg["BLOCK_K"], tiles * bm * bn, dw.device,
                                      waves)
            main = Launch(k.conv2d_implicit_bwd_weight, (cdiv(g.OCG, bm), cols, g.groups * split),
                          (g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *dy.stride(), *x.stride(),
                           *dw.stride(), g.SH, g.SW, g.PH, g.PW, g.DH, g.DW),
                          {**consts, "SPLIT": split, "P_SPLIT": p_split,
                           "REDUCE_ROWS": _reduce_rows(cfg), **cfg})
            if split == 1:
                return lambda dy, x, dw: main(dy, x, dw, dw, dw)   # placeholders: never read
            ws_numel = tiles * split * bm * bn

            def run(dy, x, dw):
                # fp32 partials; the tile's last-arriving program sums them in split order
                ws = torch.empty(ws_numel, dtype=torch.float32, device=dw.device)
                main(dy, x, dw, ws, arrival_counters(dw.device, tiles))
            return run

        n = g.CG * g.KH * g.KW if flat_n else g.CG
        cfg = _implicit_config("bwd_weight", g, dy, g.OCG, n, P, lambda c: launch(c)(dy, x, dw))
        return launch(cfg)

    @staticmethod
    def plan_backward_bias(dy, db, g: ConvGeometry):
        key = ("bwd_bias", g, dy.dtype, dy.device, dy.stride())
        return _TRITON_PLANS.get(key, _TritonImplicit._plan_backward_bias, dy, g)

    @staticmethod
    def _plan_backward_bias(dy, g: ConvGeometry) -> Launch:
        from .kernels.triton import conv as k
        block_c = min(16, next_power_of_2(g.OC))
        return Launch(k.conv2d_bwd_bias, (cdiv(g.OC, block_c),),
                      (g.N, g.OC, g.OH, g.OW, *dy.stride()), dict(BLOCK_C=block_c, BLOCK_P=128))


# --- Triton depthwise (direct) kernels, taken by "implicit" for depthwise layers --------------

# The largest channel multiplier (C_out / C_in) the depthwise kernels take: beyond it the
# implicit GEMM's N = multiplier columns start to fill a tensor-core tile (and the grad input's
# gather loops over the multiplier once a tap).
DEPTHWISE_MAX_MULTIPLIER = 4


def _depthwise(g: ConvGeometry) -> bool:
    """A depthwise layer: each output channel reads one input channel (groups == C_in > 1,
    a channel multiplier C_out / C_in of at most DEPTHWISE_MAX_MULTIPLIER). The implicit
    algorithm runs it on direct kernels (kernels/triton/conv_depthwise.py): its GEMM would
    be 1 useful column of 16."""
    return g.groups > 1 and g.CG == 1 and g.OCG <= DEPTHWISE_MAX_MULTIPLIER


DEPTHWISE_TUNERS = {d: Tuner(f"conv2d_depthwise_{d}") for d in ("fwd", "bwd_input", "bwd_weight")}


def _depthwise_config(direction: str, g: ConvGeometry, t: torch.Tensor, channels: int,
                      pixels: int, launch) -> dict:
    """The [pixels x channels] tile of a depthwise kernel. channels_last (channels at unit
    stride): channel vectors of up to 64 (16-byte loads of 8 16-bit values a thread), 2048
    elements a tile on 4 warps; otherwise (NCHW: pixels along a row at unit stride) 4
    channels x 256 pixels. The tuner also tries tiles twice as deep in each direction, and
    twice the pixels on the same warps (each thread's channel weights, scalar loads a tap,
    then serve twice the outputs)."""
    cl = t.stride(1) == 1
    bc = min(64, max(8, next_power_of_2(channels))) if cl else 4
    bp = max(16, 2048 // bc)
    space = [(bp, bc, 4), (2 * bp, bc, 8), (bp, 2 * bc, 8), (bp // 2, bc, 4), (2 * bp, bc, 4)] \
        if cl else [(bp, bc, 4), (2 * bp, bc, 8), (bp, 2 * bc, 8), (bp, bc // 2, 4)]
    candidates = [dict(BLOCK_P=dot_block(pixels, p), BLOCK_C=max(1, min(c, next_power_of_2(
        channels))), num_warps=w) for p, c, w in space]
    key = (t.dtype, cl, g.KH, g.KW, g.SH, g.SW, g.DH, g.DW, g.OCG, bucket(channels),
           bucket(pixels))
    return DEPTHWISE_TUNERS[direction].pick(key, candidates, launch)


# Split of the depthwise weight gradient over pixel ranges: about DEPTHWISE_WAVES programs a
# multiprocessor over all (kernel row, channel block) tiles, each range at least
# DEPTHWISE_MIN_STEPS pixel blocks, at most DEPTHWISE_SPLIT_MAX ranges: the last program of a
# tile sums its ranges' partials, DEPTHWISE_IN_FLIGHT loads at a time, so the ranges set the
# kernel's serial tail (64 ranges: 8 L2 round trips). A layer with few tiles (32 channels, 3
# kernel rows) takes narrower channel blocks instead, down to 8 channels (16 bytes of bf16).
DEPTHWISE_WAVES = 8
DEPTHWISE_MIN_STEPS = 4
DEPTHWISE_SPLIT_MAX = 64
DEPTHWISE_IN_FLIGHT = 8


def _depthwise_args(g: ConvGeometry) -> tuple:
    return (g.SH, g.SW, g.PH, g.PW, g.DH, g.DW)


def _weight_strides(w: torch.Tensor) -> tuple:
    """A depthwise weight's (OC, 1, KH, KW) strides without the unit axis."""
    return w.stride(0), w.stride(2), w.stride(3)


class _TritonDepthwise:
    """The plans _TritonImplicit returns for `_depthwise` geometries (callables taking the
    same arguments as its own)."""

    @staticmethod
    def plan_forward(x, w, b, y, g: ConvGeometry):
        from .kernels.triton import conv_depthwise as k
        if _strided_bias(b):
            return _unit_stride_bias(_TritonDepthwise.plan_forward, x, w, b, y, g)
        P = g.N * g.OH * g.OW
        scalars = (g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *x.stride(), *_weight_strides(w),
                   *y.stride(), *_depthwise_args(g))
        consts = dict(KH=g.KH, KW=g.KW, M=g.OCG, HAS_BIAS=b is not None)

        def launch(cfg):
            return Launch(k.conv2d_depthwise_fwd, (cdiv(P, cfg["BLOCK_P"]),
                                                   cdiv(g.OC, cfg["BLOCK_C"])),
                          scalars, {**consts, **cfg})
        bias = w if b is None else b
        return launch(_depthwise_config("fwd", g, x, g.OC, P,
                                        lambda c: launch(c)(x, w, bias, y)))

    @staticmethod
    def plan_backward_input(dy, w, dx, g: ConvGeometry):
        from .kernels.triton import conv_depthwise as k
        phases = _stride_phases(g)      # tiles by stride phase: only the taps that reach
        P = g.N * cdiv(g.H, g.SH) * cdiv(g.W, g.SW) if phases > 1 else g.N * g.H * g.W
        scalars = (g.N, g.C, g.H, g.W, g.OH, g.OW, *dy.stride(), *_weight_strides(w),
                   *dx.stride(), *_depthwise_args(g))
        consts = dict(KH=g.KH, KW=g.KW, M=g.OCG, STRIDE_PHASES=phases > 1)

        def launch(cfg):
            return Launch(k.conv2d_depthwise_bwd_input, (phases * cdiv(P, cfg["BLOCK_P"]),
                                                         cdiv(g.C, cfg["BLOCK_C"])),
                          scalars, {**consts, **cfg})
        return launch(_depthwise_config("bwd_input", g, dx, g.C, P,
                                        lambda c: launch(c)(dy, w, dx)))

    @staticmethod
    def plan_backward_weight(dy, x, dw, g: ConvGeometry):
        from .kernels.triton import conv_depthwise as k
        P = g.N * g.OH * g.OW
        scalars = (g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *dy.stride(), *x.stride(),
                   *_weight_strides(dw), *_depthwise_args(g))
        consts = dict(KH=g.KH, KW=g.KW, M=g.OCG)
        block_kw = next_power_of_2(g.KW)

        def launch(cfg):
            # enough (row, channel block) tiles for the ranges to fill the GPU; a kernel row's
            # taps share the tile: its pixels shrink to keep the elements
            bc = cfg["BLOCK_C"]
            while bc > 8 and g.KH * cdiv(g.OC, bc) * DEPTHWISE_SPLIT_MAX < \
                    DEPTHWISE_WAVES * _multiprocessors(dw.device):
                bc //= 2
            cfg = dict(cfg, BLOCK_KW=block_kw, BLOCK_C=bc, IN_FLIGHT=DEPTHWISE_IN_FLIGHT,
                       BLOCK_P=max(2, cfg["BLOCK_P"] * cfg["BLOCK_C"] // (bc * block_kw)))
            tiles = g.KH * cdiv(g.OC, cfg["BLOCK_C"])
            split, p_split = _pixel_ranges(tiles, P, cfg["BLOCK_P"], dw.device, DEPTHWISE_WAVES,
                                           DEPTHWISE_SPLIT_MAX, DEPTHWISE_MIN_STEPS)
            main = Launch(k.conv2d_depthwise_bwd_weight,
                          (g.KH, cdiv(g.OC, cfg["BLOCK_C"]), split), (*scalars, split, p_split),
                          {**consts, "ONE_RANGE": split == 1, **cfg})
            if split == 1:
                return lambda dy, x, dw: main(dy, x, dw, dw, dw)   # placeholders: never read
            new_parts = output_maker((tiles * split * block_kw * cfg["BLOCK_C"],),
                                     torch.float32, dw.device)

            def run(dy, x, dw):
                # fp32 partials; a tile's last-arriving program sums them in range order
                main(dy, x, dw, new_parts(), arrival_counters(dw.device, tiles))
            return run
        return launch(_depthwise_config("bwd_weight", g, dy, g.OC, P,
                                        lambda c: launch(c)(dy, x, dw)))


# --- Triton explicit im2col + GEMM -----------------------------------------------------------

# Workspace bound of the im2col algorithm, in bytes. The batch is processed in chunks of whole
# images, as many as fit: the column matrix of a chunk (N_chunk * OH * OW * C * KH * KW
# elements of the input's dtype; fp32 for its gradient in backward_input), plus a pixel-major
# copy of grad_output where its strides need one, stays under this bound. A single image whose
# columns exceed it is still processed (one image per chunk). Small fixed extras are not
# counted: a packed copy of a weight whose strides do not flatten, and an fp32 grad-weight
# accumulator when a 16-bit grad weight sums several chunks. Tests lower it to force chunks.
IM2COL_WORKSPACE_BYTES = 256 * 2 ** 20


# Elements per im2col / col2im tile: few channels (or columns) -> more pixels per program.
_TILE_ELEMS = 4096


def _merged_stride(sizes, strides) -> int | None:
    """The one stride of dims `sizes` flattened row-major, or None if they do not flatten."""
    if 0 in sizes:
        return 1
    stride = expected = None
    for size, st in reversed(list(zip(sizes, strides))):
        if size == 1:
            continue
        if stride is None:
            stride = st
        elif st != expected:
            return None
        expected = st * size
    return 1 if stride is None else stride


def _pixel_matrix(t: torch.Tensor, n0: int, nb: int, groups: int) -> torch.Tensor | None:
    """Images n0 .. n0+nb-1 of t (N, C, H, W) as (B1, groups, pixels, C / groups) matrices,
    a view: B1 = 1 and all the chunk's pixels in one matrix when (n, h, w) flatten to one
    stride (channels_last, broadcast), else B1 = nb matrices of H*W pixels, one per image
    (NCHW); None when (h, w) do not flatten either."""
    _, C, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    cg = C // groups
    off = t.storage_offset() + n0 * sn
    s = _merged_stride((nb, H, W), (sn, sh, sw))
    if s is not None:
        return t.as_strided((1, groups, nb * H * W, cg), (0, cg * sc, s, sc), off)
    s = _merged_stride((H, W), (sh, sw))
    if s is not None:
        return t.as_strided((nb, groups, H * W, cg), (sn, cg * sc, s, sc), off)
    return None


def _rows_view(ws: torch.Tensor, b1: int, rows: int) -> torch.Tensor:
    """A (groups, pixels, J) contiguous workspace viewed like a _pixel_matrix: (b1, groups,
    rows, J) with b1 * rows of its pixels."""
    G, _, J = ws.shape
    return ws.as_strided((b1, G, rows, J), (rows * J if b1 > 1 else 0, ws.stride(0), J, 1))


def _im2col_launch(src, cols, n0, nb, C, H, W, OH, OW, KH, KW, SH=1, SW=1, PH=0, PW=0, DH=1,
                   DW=1, groups=1, taps_first: bool = False):
    """launch(src, cols): cols[g, p, j] of images n0 .. n0+nb-1 of src (kernels/triton/conv.py:
    conv2d_im2col), for tensors of src's and cols' strides; j = (kh, kw, c) with taps_first,
    else (c, kh, kw)."""
    from .kernels.triton import conv as k
    J = C // groups * KH * KW
    if nb * OH * OW * J == 0:
        return _launch_nothing
    block_j = min(64, next_power_of_2(C // groups if taps_first else J))
    block_p = dot_block(nb * OH * OW, max(64, _TILE_ELEMS // block_j))
    # by tap: a program per (tap, channel block) (kernels/triton/conv.py conv2d_im2col)
    cols_grid = KH * KW * cdiv(C // groups, block_j) if taps_first else cdiv(J, block_j)
    grid = (cdiv(nb * OH * OW, block_p), cols_grid, groups)
    return Launch(k.conv2d_im2col, grid, (n0, nb, C, H, W, OH, OW, *src.stride(),
                                          cols.stride(0), cols.stride(1), SH, SW, PH, PW, DH, DW),
                  dict(KH=KH, KW=KW, CG=C // groups, BLOCK_P=block_p, BLOCK_J=block_j,
                       TAPS_FIRST=taps_first))


def _taps_first(t: torch.Tensor, g: ConvGeometry) -> bool:
    """The im2col algorithm's column order for an input or input gradient t: by tap, channels
    innermost, for channels_last (its im2col and col2im read and write contiguous channels,
    and a channels_last weight is that matrix as it lies); else by channel (NCHW: a tap row
    along W is contiguous)."""
    return g.KH * g.KW > 1 and g.CG > 1 and memory_format_of(t) == torch.channels_last


def _matrix_view(w: torch.Tensor, g: ConvGeometry, taps_first: bool):
    """A weight-shaped (OC, CG, KH, KW) tensor as (groups, OC / groups, CG*KH*KW) matrices,
    j = (kh, kw, c) with taps_first, else (c, kh, kw): a view, or None where its strides do
    not flatten in that order."""
    so, sc, sh, sw = w.stride()
    sj = _merged_stride((g.KH, g.KW, g.CG), (sh, sw, sc)) if taps_first else \
        _merged_stride((g.CG, g.KH, g.KW), (sc, sh, sw))
    if sj is None:
        return None
    return w.as_strided((g.groups, g.OCG, g.CG * g.KH * g.KW), (g.OCG * so, so, sj),
                        w.storage_offset())


def _weight_matrix_plan(w: torch.Tensor, g: ConvGeometry, taps_first: bool = False):
    """(wm, w0, weight) for a plan: wm the weight as (groups, OC / groups, CG*KH*KW) matrices,
    j = (kh, kw, c) with taps_first, else (c, kh, kw), a view of w0. When w's strides flatten
    in that order (a contiguous weight by channel, a channels_last one by tap) w0 is w and
    weight None; else w0 is a contiguous copy packed by the im2col kernel (the whole weight as
    one 'window' per output channel) and weight(w) packs a fresh one per call."""
    view = _matrix_view(w, g, taps_first)
    if view is not None:
        return view, w, None
    J = g.CG * g.KH * g.KW
    new = output_maker((1, g.OC, J), w.dtype, w.device)
    packed = fresh(new)
    pack = _im2col_launch(w, packed, 0, g.OC, g.CG, g.KH, g.KW, 1, 1, g.KH, g.KW,
                          taps_first=taps_first)

    def weight(w):
        packed = fresh(new)
        pack(w, packed)
        return packed
    return packed.view(g.groups, g.OCG, J), packed, weight


def _weight_chunks(steps, dy, x, dw, cols, dy_ws, acc) -> None:
    """The im2col algorithm's weight gradient, on either backend: per chunk of images its
    columns written into `cols`, dY packed into `dy_ws` where its strides need it, and the
    GEMM into dW (the last chunk) or into the fp32 sum `acc` (dw itself when it needs none),
    adding the sum so far. steps: (im2col, pack or None, product, summed, last) a chunk."""
    for im2col, pack, product, summed, last in steps:
        im2col(x, cols)
        if pack is not None:
            pack(dy, dy_ws)
        product(dy if pack is None else dy_ws, cols, dw if last else acc, None,
                acc if summed else None)


def _chunks(n: int, per_image_bytes: int) -> list[tuple[int, int]]:
    """(first image, image count) of each chunk, whole images, within IM2COL_WORKSPACE_BYTES."""
    step = max(1, min(n, IM2COL_WORKSPACE_BYTES // max(1, per_image_bytes)))
    return [(n0, min(step, n - n0)) for n0 in range(0, n, step)] or [(0, 0)]


class _TritonIm2col(_Launcher):
    """im2col + tiled GEMM, every step a Triton kernel, batch in chunks (IM2COL_WORKSPACE_BYTES).

    forward          cols = im2col(x chunk); Y_g = cols[g] @ W_g^T + bias (GEMM epilogue),
                     written straight into y through its strides
    backward_input   dcols[g] = dY_g @ W_g (fp32); dX = col2im(dcols) (gather, deterministic)
    backward_weight  dW_g (+)= dY_g^T @ cols[g], summed over the chunks
    backward_bias    the implicit algorithm's column-sum kernel
    All groups go in one launch per step: the GEMM's batch is (images or 1, groups).
    """

    @staticmethod
    def plan_forward(x, w, b, y, g: ConvGeometry):
        key = ("im2col fwd", g, x.dtype, x.device, x.stride(), w.stride(), y.stride(),
               None if b is None else b.stride(), _input_precision(x.dtype),
               IM2COL_WORKSPACE_BYTES)
        return _TRITON_PLANS.get(key, _TritonIm2col._plan_forward, x, w, b, y, g)

    @staticmethod
    def _plan_forward(x, w, b, y, g: ConvGeometry):
        """A callable (x, w, b or w, y): per chunk the im2col launch and the GEMM (bias in
        its epilogue) into the chunk's rows of y."""
        J, P = g.CG * g.KH * g.KW, g.OH * g.OW
        taps_first = _taps_first(x, g)
        wm, w0, weight = _weight_matrix_plan(w, g, taps_first)
        bias = _bias_matrix(b, g)
        chunks = _chunks(g.N, P * g.groups * J * x.element_size())
        new_cols = output_maker((g.groups, chunks[0][1] * P, J), x.dtype, x.device)
        cols = fresh(new_cols)
        steps = []
        for n0, nb in chunks:
            ym = _pixel_matrix(y, n0, nb, g.groups)     # y is ours: NCHW or channels_last
            steps.append((
                _im2col_launch(x, cols, n0, nb, g.C, g.H, g.W, g.OH, g.OW, g.KH, g.KW, g.SH,
                               g.SW, g.PH, g.PW, g.DH, g.DW, g.groups, taps_first),
                gemm_plan_on((cols, w0, y, b, None), _rows_view(cols, ym.shape[0], ym.shape[2]),
                             wm, ym, trans_b=True, bias=bias,
                             input_precision=_input_precision(x.dtype))))
        has_bias = b is not None

        def run(x, w, b, y):
            cols = fresh(new_cols)
            w = w if weight is None else weight(w)
            b = b if has_bias else None
            for im2col, product in steps:
                im2col(x, cols)
                product(cols, w, y, b, None)
        return run

    @staticmethod
    def _dy_matrix_plan(dy, g: ConvGeometry, n0: int, nb: int, ws, whole: bool):
        """(dY of a chunk as a _pixel_matrix view of dy, None); or, when its strides do not
        allow one (or, with `whole`, not one over the whole chunk), (a view of `ws`, the
        launch pack(dy, ws) that copies it there pixel-major: the 1x1 im2col)."""
        m = _pixel_matrix(dy, n0, nb, g.groups)
        if m is not None and (not whole or m.shape[0] == 1):
            return m, None
        P = nb * g.OH * g.OW
        return (ws.as_strided((1, g.groups, P, g.OCG), (0, g.OCG, g.OC, 1), ws.storage_offset()),
                _im2col_launch(dy, ws, n0, nb, g.OC, g.OH, g.OW, g.OH, g.OW, 1, 1))

    @staticmethod
    def _dy_needs_pack(dy, g: ConvGeometry, nb: int, whole: bool) -> bool:
        m = _pixel_matrix(dy, 0, nb, g.groups)
        return m is None or (whole and m.shape[0] != 1)

    @staticmethod
    def plan_backward_input(dy, w, dx, g: ConvGeometry):
        key = ("im2col bwd_input", g, dy.dtype, dy.device, dy.stride(), w.stride(), dx.stride(),
               _input_precision(dy.dtype), IM2COL_WORKSPACE_BYTES)
        return _TRITON_PLANS.get(key, _TritonIm2col._plan_backward_input, dy, w, dx, g)

    @staticmethod
    def _plan_backward_input(dy, w, dx, g: ConvGeometry):
        """A callable (dy, w, dx): per chunk dcols = dY @ W (fp32) and the col2im gather."""
        from .kernels.triton import conv as k
        J, P = g.CG * g.KH * g.KW, g.OH * g.OW
        taps_first = _taps_first(dx, g)
        wm, w0, weight = _weight_matrix_plan(w, g, taps_first)
        pack = _TritonIm2col._dy_needs_pack(dy, g, g.N, whole=False)
        chunks = _chunks(g.N, P * (g.groups * J * 4 + (g.OC * dy.element_size() if pack else 0)))
        nmax = chunks[0][1]
        new_dcols = output_maker((g.groups, nmax * P, J), torch.float32, dy.device)
        new_ws = output_maker((1, nmax * P, g.OC), dy.dtype, dy.device) if pack else None
        dcols, ws = fresh(new_dcols), fresh(new_ws) if pack else None
        block_c = min(32, next_power_of_2(g.CG))
        phases = _stride_phases(g)      # col2im by stride phase: only the taps that reach
        # (a phased tile keeps its taps' start and step live: 1024 x 4 pixels x channels
        # spilled 180 bytes at the stem, 256 x 4 none)
        block_m = dot_block(nmax * g.H * g.W, max(64, (_TILE_ELEMS // 4 if phases > 1 else
                                                       _TILE_ELEMS) // block_c))
        steps = []
        for n0, nb in chunks:
            dym, packing = _TritonIm2col._dy_matrix_plan(dy, g, n0, nb, ws, whole=False)
            pixels = nb * cdiv(g.H, g.SH) * cdiv(g.W, g.SW) if phases > 1 else nb * g.H * g.W
            grid = (phases * cdiv(pixels, block_m), cdiv(g.CG, block_c), g.groups)
            steps.append((
                packing,
                gemm_plan_on((dy if packing is None else ws, w0, dcols, None, None), dym, wm,
                             _rows_view(dcols, dym.shape[0], dym.shape[2]),
                             input_precision=_input_precision(dy.dtype)),
                Launch(k.conv2d_col2im, grid, (n0, nb, g.C, g.H, g.W, g.OH, g.OW,
                                               dcols.stride(0), dcols.stride(1), *dx.stride(),
                                               g.SH, g.SW, g.PH, g.PW, g.DH, g.DW),
                       dict(KH=g.KH, KW=g.KW, CG=g.CG, BLOCK_M=block_m, BLOCK_C=block_c,
                            TAPS_FIRST=taps_first, STRIDE_PHASES=phases > 1))))

        def run(dy, w, dx):
            dcols, ws = fresh(new_dcols), fresh(new_ws) if pack else None
            w = w if weight is None else weight(w)
            for packing, product, col2im in steps:
                if packing is None:
                    product(dy, w, dcols, None, None)
                else:
                    packing(dy, ws)
                    product(ws, w, dcols, None, None)
                col2im(dcols, dx)
        return run

    @staticmethod
    def plan_backward_weight(dy, x, dw, g: ConvGeometry):
        key = ("im2col bwd_weight", g, dy.dtype, dy.device, dy.stride(), x.stride(),
               dw.stride(), _input_precision(dy.dtype), IM2COL_WORKSPACE_BYTES)
        return _TRITON_PLANS.get(key, _TritonIm2col._plan_backward_weight, dy, x, dw, g)

    @staticmethod
    def _plan_backward_weight(dy, x, dw, g: ConvGeometry):
        """A callable (dy, x, dw): per chunk the im2col launch and dW_g (+)= dY_g^T @ cols[g]
        (a 16-bit dW summed over several chunks in fp32, rounded once by the last GEMM). The
        columns go in the order dw lies in (ours: the weight's layout, contiguous or
        channels_last), so that dw is their matrix."""
        J, P = g.CG * g.KH * g.KW, g.OH * g.OW
        taps_first = _taps_first(dw, g)
        dwm = _matrix_view(dw, g, taps_first)
        assert dwm is not None                          # dw is ours: contiguous or by tap
        pack = _TritonIm2col._dy_needs_pack(dy, g, g.N, whole=True)
        chunks = _chunks(g.N, P * (g.groups * J * x.element_size()
                                   + (g.OC * dy.element_size() if pack else 0)))
        nmax = chunks[0][1]
        pack = pack and _TritonIm2col._dy_needs_pack(dy, g, nmax, whole=True)  # 1 image: maybe not
        new_cols = output_maker((g.groups, nmax * P, J), x.dtype, x.device)
        new_ws = output_maker((1, nmax * P, g.OC), dy.dtype, dy.device) if pack else None
        new_acc = output_maker((g.groups, g.OCG, J), torch.float32, dw.device) \
            if len(chunks) > 1 and dw.dtype != torch.float32 else None
        cols, ws = fresh(new_cols), fresh(new_ws) if pack else None
        acc = dw if new_acc is None else fresh(new_acc)
        accm = dwm if new_acc is None else acc                # (groups, OCG, J) either way
        steps = []
        for i, (n0, nb) in enumerate(chunks):
            dym, packing = _TritonIm2col._dy_matrix_plan(dy, g, n0, nb, ws, whole=True)
            last = i == len(chunks) - 1
            steps.append((
                _im2col_launch(x, cols, n0, nb, g.C, g.H, g.W, g.OH, g.OW, g.KH, g.KW, g.SH,
                               g.SW, g.PH, g.PW, g.DH, g.DW, g.groups, taps_first),
                packing,
                gemm_plan_on((dy if packing is None else ws, cols, dw if last else acc, None,
                              acc if i else None), dym[0], cols[:, :nb * P],
                             dwm if last else accm, trans_a=True, addend=accm if i else None,
                             input_precision=_input_precision(dy.dtype)),
                i > 0, last))

        def run(dy, x, dw):
            _weight_chunks(steps, dy, x, dw, fresh(new_cols), fresh(new_ws) if pack else None,
                           dw if new_acc is None else fresh(new_acc))
        return run

    @staticmethod
    def plan_backward_bias(dy, db, g: ConvGeometry):
        return _TritonImplicit.plan_backward_bias(dy, db, g)


# --- Numba explicit im2col + GEMM ------------------------------------------------------------

def _numba_weight_matrix(w: torch.Tensor, g: ConvGeometry):
    """(c_last, W) with W the weight as a (groups, OCG, K) strided view, k = (c, kh, kw), or
    (kh, kw, c) with c_last (a channels_last weight); None when neither order flattens."""
    for c_last in (False, True):
        view = _matrix_view(w, g, c_last)
        if view is not None:
            return c_last, view
    return None


def _numba_pixel_matrix(t: torch.Tensor, n0: int, nb: int, groups: int) -> torch.Tensor | None:
    """Images n0 .. n0+nb-1 of t (N, C, H, W) as (groups, nb, H*W, C / groups) matrices, a
    view; None when (h, w) do not flatten to one stride."""
    _, C, H, W = t.shape
    sn, sc, sh, sw = t.stride()
    sp = _merged_stride((H, W), (sh, sw))
    if sp is None:
        return None
    cg = C // groups
    return t.as_strided((groups, nb, H * W, cg), (cg * sc, sn, sp, sc),
                        t.storage_offset() + n0 * sn)


class _NumbaIm2col(_Launcher):
    """im2col + tiled GEMM on the Numba backend, every step a Numba CUDA kernel
    (kernels/numba/conv.py, kernels/numba/gemm.py via pydl/_gemm_numba.py); the batch goes in
    chunks of whole images so the column workspace stays under IM2COL_WORKSPACE_BYTES.

    forward          cols = im2col(x chunk); Y[g, n] = cols[g, n] @ W_g^T + bias (GEMM
                     epilogue), written straight into y through its strides
    backward_input   dcols[g, n] = dY[g, n] @ W_g (fp32); dX = col2im(dcols), a gather
    backward_weight  dW_g (+)= sum over the chunk's images of dY[g, n]^T @ cols[g, n] (the
                     GEMM's batch reduction), summed over the chunks in fp32
    backward_bias    a per-channel tree reduction
    The GEMM's batch is (groups, images): all groups and images of a chunk in one launch.
    The column order k follows the weight's layout ((c, kh, kw) or (kh, kw, c)), so weights
    are strided views; a weight or cotangent whose strides flatten neither way is first packed
    by a Numba copy kernel. Each plan is the steps' NumbaLaunches (the GEMM's through
    gemm_plan) over the call's tensors and the workspaces it allocates per call.
    """

    @staticmethod
    def _weight(w, g: ConvGeometry):
        """(c_last, (groups, OCG, K) weight matrix, its tensor, pack): the matrix a view of w
        and pack None; or, where w has no such view, a view of a packed copy (its tensor),
        which pack(w) makes per call (a Numba copy kernel) and returns."""
        from .kernels.numba import conv as k
        got = _numba_weight_matrix(w, g)
        if got is not None:
            return (*got, w, None)
        make = functools.partial(torch.empty, w.shape, dtype=w.dtype, device=w.device)
        packed, code = make(), k.dtype_code(w.dtype)
        copy = numba_launch_1d(k.copy4, w.numel(), w.device, (w, packed, code, code), (w, packed))

        def pack(w):
            out = make()
            copy(w, out)
            return out
        return (*_numba_weight_matrix(packed, g), packed, pack)

    @staticmethod
    def _plan_im2col(x, ws, n0: int, nb: int, g: ConvGeometry, c_last: bool):
        """(im2col(x, ws): the columns of images n0 .. n0+nb-1 written at the start of ws,
        those columns (groups, nb, P, K), a view of ws)."""
        from .kernels.numba import conv as k
        P, K = g.OH * g.OW, g.CG * g.KH * g.KW
        cols = ws[:g.groups * nb * P * K].view(g.groups, nb, P, K)
        return numba_launch_1d(k.im2col, cols.numel(), x.device, (
            x, cols, n0, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.KH, g.KW, g.OW, c_last), (x, ws)), \
            cols

    @staticmethod
    def _plan_dy(dy, dy_ws, n0: int, nb: int, g: ConvGeometry):
        """(copy, dY of images n0 .. n0+nb-1 as (groups, nb, P, OCG)): a view of dy and copy
        None; or where its (oh, ow) do not flatten, a view of dy_ws, into which copy(dy, dy_ws)
        packs them (a Numba copy kernel)."""
        m = _numba_pixel_matrix(dy, n0, nb, g.groups)
        if m is not None:
            return None, m
        from .kernels.numba import conv as k
        packed = dy_ws[:nb * g.OC * g.OH * g.OW].view(nb, g.OC, g.OH, g.OW)
        code = k.dtype_code(dy.dtype)
        copy = numba_launch_1d(k.copy4, packed.numel(), dy.device,
                               (dy[n0:n0 + nb], packed, code, code), (dy, dy_ws))
        return copy, _numba_pixel_matrix(packed, 0, nb, g.groups)

    @staticmethod
    @planned_once
    def plan_forward(x, w, b, y, g: ConvGeometry):
        P, K = g.OH * g.OW, g.CG * g.KH * g.KW
        c_last, wm, w_src, pack = _NumbaIm2col._weight(w, g)
        wt = wm.unsqueeze(1).transpose(2, 3)                       # (groups, 1, K, OCG)
        bias = None if b is None else b.view(g.groups, g.OCG)
        chunks = _chunks(g.N, g.groups * P * K * x.element_size())
        new_ws = _buffer(g.groups * chunks[0][1] * P * K, x.dtype, x.device)
        ws, steps = new_ws(), []
        for n0, nb in chunks:
            im2col, cols = _NumbaIm2col._plan_im2col(x, ws, n0, nb, g, c_last)
            ym = _numba_pixel_matrix(y, n0, nb, g.groups)          # y is ours: flattens
            steps.append((im2col, gemm_plan_on_numba((ws, w_src, y, b, None), cols, wt, ym,
                                                     bias=bias)))

        def run(x, w, b, y):
            ws = new_ws()
            if pack is not None:
                w = pack(w)
            for im2col, product in steps:
                im2col(x, ws)
                product(ws, w, y, b, None)
        return run

    @staticmethod
    @planned_once
    def plan_backward_input(dy, w, dx, g: ConvGeometry):
        from .kernels.numba import conv as k
        P, K = g.OH * g.OW, g.CG * g.KH * g.KW
        c_last, wm, w_src, pack = _NumbaIm2col._weight(w, g)
        wm = wm.unsqueeze(1)                                       # (groups, 1, OCG, K)
        pack_dy = _numba_pixel_matrix(dy, 0, g.N, g.groups) is None
        chunks = _chunks(g.N, P * (g.groups * K * 4 + (g.OC * dy.element_size() if pack_dy
                                                       else 0)))
        nmax = chunks[0][1]
        new_ws = _buffer(g.groups * nmax * P * K, torch.float32, dy.device)
        new_dy_ws = _buffer(nmax * g.OC * P, dy.dtype, dy.device) if pack_dy else _no_buffer
        ws, dy_ws, steps = new_ws(), new_dy_ws(), []
        channels_last = dx.stride(1) == 1 and g.C > 1
        for n0, nb in chunks:
            dcols = ws[:g.groups * nb * P * K].view(g.groups, nb, P, K)
            copy, dym = _NumbaIm2col._plan_dy(dy, dy_ws, n0, nb, g)
            col2im = numba_launch_1d(k.col2im, nb * g.C * g.H * g.W, dx.device, (
                dcols, dx, n0, g.SH, g.SW, g.PH, g.PW, g.DH, g.DW, g.KH, g.KW, g.OH, g.OW,
                c_last, channels_last, k.dtype_code(dx.dtype)), (ws, dx))
            product = gemm_plan_on_numba((dy if copy is None else dy_ws, w_src, ws, None, None),
                                         dym, wm, dcols)
            steps.append((copy, product, col2im))

        def run(dy, w, dx):
            ws, dy_ws = new_ws(), new_dy_ws()
            if pack is not None:
                w = pack(w)
            for copy, product, col2im in steps:
                if copy is not None:
                    copy(dy, dy_ws)
                product(dy if copy is None else dy_ws, w, ws, None, None)
                col2im(ws, dx)
        return run

    @staticmethod
    @planned_once
    def plan_backward_weight(dy, x, dw, g: ConvGeometry):
        P, K = g.OH * g.OW, g.CG * g.KH * g.KW
        # dw is ours (in the weight's layout, contiguous or channels_last): a matrix view
        c_last, dwm = _numba_weight_matrix(dw, g)
        dwm = dwm.unsqueeze(1)                                     # (groups, 1, OCG, K)
        pack_dy = _numba_pixel_matrix(dy, 0, g.N, g.groups) is None
        chunks = _chunks(g.N, P * (g.groups * K * x.element_size()
                                   + (g.OC * dy.element_size() if pack_dy else 0)))
        nmax = chunks[0][1]
        new_ws = _buffer(g.groups * nmax * P * K, x.dtype, x.device)
        new_dy_ws = _buffer(nmax * g.OC * P, dy.dtype, dy.device) if pack_dy else _no_buffer
        # Sum the chunks straight into dW when it is fp32 or takes one chunk; otherwise in an
        # fp32 accumulator, the last chunk's GEMM rounding once into dW.
        split = dw.dtype != torch.float32 and len(chunks) > 1
        new_acc = functools.partial(torch.empty, dwm.shape, dtype=torch.float32,
                                    device=dw.device) if split else _no_buffer
        ws, dy_ws, steps = new_ws(), new_dy_ws(), []
        acc = new_acc() if split else dwm
        for i, (n0, nb) in enumerate(chunks):
            im2col, cols = _NumbaIm2col._plan_im2col(x, ws, n0, nb, g, c_last)
            copy, dym = _NumbaIm2col._plan_dy(dy, dy_ws, n0, nb, g)
            last = i == len(chunks) - 1
            acc_src = acc if split else dw
            product = gemm_plan_on_numba(                               # (G, nb, OCG, P) @ cols
                (dy if copy is None else dy_ws, ws, dw if last else acc_src, None,
                 acc_src if i else None),
                dym.transpose(2, 3), cols, dwm if last else acc, addend=acc if i else None)
            steps.append((im2col, copy, product, i > 0, last))

        def run(dy, x, dw):
            _weight_chunks(steps, dy, x, dw, new_ws(), new_dy_ws(), new_acc() if split else dw)
        return run

    @staticmethod
    @planned_once
    def plan_backward_bias(dy, db, g: ConvGeometry) -> NumbaLaunch:
        from .kernels.numba import conv as k
        threads = BIAS_SIM_THREADS if _env.INTERPRET else 256
        blocks = 1 if _env.INTERPRET else min(g.OC, GRID_YZ_MAX)
        return NumbaLaunch(k.bias_grad, blocks, threads, dy.device, (
            dy, db.view(1, 1, 1, g.OC), k.dtype_code(dy.dtype), k.dtype_code(db.dtype)), (dy, db))


def _buffer(numel: int, dtype: torch.dtype, device):
    """A maker of a flat per-call buffer (a plan's workspace)."""
    return functools.partial(torch.empty, numel, dtype=dtype, device=device)


def _no_buffer() -> None:
    return None


# Threads of the bias-gradient reduction in the CUDA simulator, where each syncthreads costs
# milliseconds per thread (a power of two; the kernel is correct for any).
BIAS_SIM_THREADS = 4


# backend -> algo -> launcher; the first algo listed is the backend's default
ALGOS: dict[str, dict[str, type]] = {
    "triton": {"implicit": _TritonImplicit, "im2col": _TritonIm2col},
    "numba": {"im2col": _NumbaIm2col},
}


# --- kernel ops (pydl::...) and the autograd Function ---------------------------------------
# The geometry travels as the ConvGeometry itself in eager mode and as its fields (an int list)
# through a custom op under torch.compile (pydl._library.kernel_op, as_geometry).

def _y_shape(g: ConvGeometry) -> tuple:
    return (g.N, g.OC, g.OH, g.OW)


@kernel_op("conv2d_fwd", lambda x, w, b, geom, algo, backend: empty_like_shape(
    x, _y_shape(geometry_from(ConvGeometry, geom)), memory_format=memory_format_of(x)))
def _conv2d_fwd(x: Tensor, w: Tensor, b: Optional[Tensor], geom: list[int], algo: str,
                backend: str) -> Tensor:
    g = as_geometry(ConvGeometry, geom)
    y = new_output(_y_shape(g), x.dtype, x.device, memory_format_of(x))
    if y.numel():
        ALGOS[backend][algo].forward(x, w, b, y, g)
    return y


@kernel_op("conv2d_bwd_input", lambda dy, w, x, geom, algo, backend: empty_like_shape(
    x, memory_format=memory_format_of(x)))
def _conv2d_bwd_input(dy: Tensor, w: Tensor, x: Tensor, geom: list[int], algo: str,
                      backend: str) -> Tensor:
    """dL/dx; x gives only the shape and memory format."""
    dx = new_output(x.shape, x.dtype, x.device, memory_format_of(x))
    if dx.numel():
        ALGOS[backend][algo].backward_input(dy, w, dx, as_geometry(ConvGeometry, geom))
    return dx


def _weight_grad_format(x: Tensor, w: Tensor) -> torch.memory_format:
    """The memory format of the weight's gradient: channels_last when the input or the weight
    is (torch's convolutions run in channels_last then, and return the gradient so), else
    contiguous."""
    if torch.channels_last in (memory_format_of(x), memory_format_of(w)):
        return torch.channels_last
    return torch.contiguous_format


@kernel_op("conv2d_bwd_weight", lambda dy, x, w, geom, algo, backend: empty_like_shape(
    w, memory_format=_weight_grad_format(x, w)))
def _conv2d_bwd_weight(dy: Tensor, x: Tensor, w: Tensor, geom: list[int], algo: str,
                       backend: str) -> Tensor:
    """dL/dw, laid out as torch returns it (_weight_grad_format); w gives only the shape."""
    dw = new_output(w.shape, w.dtype, w.device, _weight_grad_format(x, w))
    if x.shape[0] == 0:          # an empty batch sums nothing (split-K would divide by 0)
        return dw.zero_()
    ALGOS[backend][algo].backward_weight(dy, x, dw, as_geometry(ConvGeometry, geom))
    return dw


@kernel_op("conv2d_bwd_bias", lambda dy, geom, algo, backend: empty_like_shape(
    dy, (geometry_from(ConvGeometry, geom).OC,)))
def _conv2d_bwd_bias(dy: Tensor, geom: list[int], algo: str, backend: str) -> Tensor:
    g = as_geometry(ConvGeometry, geom)
    db = new_output((g.OC,), dy.dtype, dy.device)
    ALGOS[backend][algo].backward_bias(dy, db, g)
    return db


def _grad_output_layout(dy: Tensor, x: Tensor, algo: str) -> Tensor:
    """The upstream gradient in the input's channels_last layout for the implicit-GEMM
    kernels, converted once for both gradients. An NCHW gradient of a channels_last layer
    (e.g. one made by torch.randn) would otherwise be the grad-input and grad-weight GEMMs'
    operand with only its pixels contiguous, gathered by 2-byte loads; cuDNN converts too."""
    if algo == "implicit" and memory_format_of(x) == torch.channels_last \
            and not dy.is_contiguous(memory_format=torch.channels_last):
        return dy.contiguous(memory_format=torch.channels_last)
    return dy


class Conv2dKernels:
    """conv2d's kernel ops for one geometry, algorithm and backend: what Conv2dFunction and
    the double backward's Functions run. Each is a pydl:: custom op under torch.compile. In
    eager mode a call signature's plan (_Conv2dCall, a subclass) runs the same steps with its
    outputs' allocation and its launches fixed."""

    __slots__ = ("g", "algo", "backend")

    def __init__(self, g: ConvGeometry, algo: str, backend: str):
        self.g, self.algo, self.backend = g, algo, backend

    def kernels(self) -> "Conv2dKernels":
        """The ops for tensors of any strides (the double backward's operands)."""
        return self

    def forward(self, x, w, b):
        return _conv2d_fwd(x, w, b, self.g, self.algo, self.backend)

    def grad_output(self, dy, x):
        return _grad_output_layout(dy, x, self.algo)

    def backward_input(self, dy, w, x):
        return _conv2d_bwd_input(dy, w, x, self.g, self.algo, self.backend)

    def backward_weight(self, dy, x, w):
        return _conv2d_bwd_weight(dy, x, w, self.g, self.algo, self.backend)

    def backward_bias(self, dy):
        return _conv2d_bwd_bias(dy, self.g, self.algo, self.backend)


class Conv2dFunction(torch.autograd.Function):
    """y = conv2d(x, w, b) by `ops` (Conv2dKernels, or a call signature's plan)."""

    @staticmethod
    def forward(ctx, x, w, b, ops: Conv2dKernels):
        y = ops.forward(x, w, b)
        ctx.save_for_backward(x, w)
        ctx.ops, ctx.has_bias = ops, b is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        ops = ctx.ops
        dy = ops.grad_output(dy, x)
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph: the same kernels, through Functions that are differentiable again
            k = ops.kernels()
            dx = _Conv2dInputGrad.apply(dy, w, x, k) if need[0] else None
            dw = _Conv2dWeightGrad.apply(dy, x, w, k) if need[1] else None
            db = _Conv2dBiasGrad.apply(dy, k) if ctx.has_bias and need[2] else None
            return dx, dw, db, None
        dx = ops.backward_input(dy, w, x) if need[0] else None
        dw = ops.backward_weight(dy, x, w) if need[1] else None
        db = ops.backward_bias(dy) if ctx.has_bias and need[2] else None
        return dx, dw, db, None


# --- double backward ------------------------------------------------------------------------
# conv2d's gradients are bilinear in (dy, w) and (dy, x), and their derivatives are the three
# kernels again: for y = conv(x, w), dx = conv_input_grad(dy, w) and dw = conv_weight_grad(dy,
# x), so d<ddx, dx>/d dy = conv(ddx, w), d<ddx, dx>/d w = conv_weight_grad(dy, ddx),
# d<ddw, dw>/d dy = conv(x, ddw), d<ddw, dw>/d x = conv_input_grad(dy, ddw). The three Functions
# below are closed under differentiation, so gradients of any order run on pydl's kernels.

class _Conv2dInputGrad(torch.autograd.Function):
    """dx of conv2d as a function of (dy, w); x gives only the shape and memory format."""

    @staticmethod
    def forward(ctx, dy, w, x, ops: Conv2dKernels):
        ctx.save_for_backward(dy, w)
        ctx.ops = ops
        return ops.backward_input(dy, w, x)

    @staticmethod
    def backward(ctx, ddx):
        dy, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_dy = Conv2dFunction.apply(ddx, w, None, ctx.ops) if need[0] else None
        d_w = _Conv2dWeightGrad.apply(dy, ddx, w, ctx.ops) if need[1] else None
        return d_dy, d_w, None, None


class _Conv2dWeightGrad(torch.autograd.Function):
    """dw of conv2d as a function of (dy, x); w gives only the shape."""

    @staticmethod
    def forward(ctx, dy, x, w, ops: Conv2dKernels):
        ctx.save_for_backward(dy, x)
        ctx.ops = ops
        return ops.backward_weight(dy, x, w)

    @staticmethod
    def backward(ctx, ddw):
        dy, x = ctx.saved_tensors
        need = ctx.needs_input_grad
        d_dy = Conv2dFunction.apply(x, ddw, None, ctx.ops) if need[0] else None
        d_x = _Conv2dInputGrad.apply(dy, ddw, x, ctx.ops) if need[1] else None
        return d_dy, d_x, None, None


class _Conv2dBiasGrad(torch.autograd.Function):
    """db = dy summed over (N, OH, OW); its derivative broadcasts ddb back (a view)."""

    @staticmethod
    def forward(ctx, dy, ops: Conv2dKernels):
        ctx.shape = dy.shape
        return ops.backward_bias(dy)

    @staticmethod
    def backward(ctx, ddb):
        return ddb.view(1, -1, 1, 1).expand(ctx.shape), None


# --- implementations by backend -------------------------------------------------------------

def _kernel_conv2d(backend: str):
    def impl(x, w, b, g, algo):
        ops = Conv2dKernels(g, algo, backend)
        if needs_graph(x, w, b):
            return apply(Conv2dFunction, x, w, b, ops)
        return ops.forward(x, w, b)     # no graph to record
    return impl


# backend -> pydl's own implementation (a call plans its eager form only where it still runs)
_KERNEL_IMPLS = {_backend: register("conv2d", _backend, algos=tuple(_algos))(
    _kernel_conv2d(_backend)) for _backend, _algos in ALGOS.items()}


@register("conv2d", "torch")
def _torch_conv2d(x, w, b, g, algo):
    if (g.PB, g.PR) == (g.PH, g.PW):
        return torch.nn.functional.conv2d(x, w, b, (g.SH, g.SW), (g.PH, g.PW), (g.DH, g.DW), g.groups)
    return torch.nn.functional.conv2d(x, w, b, (g.SH, g.SW), "same", (g.DH, g.DW), g.groups)


# --- argument checks and the public function ------------------------------------------------

def conv_geometry(x_shape, w_shape, stride=1, padding=0, dilation=1, groups=1) -> ConvGeometry:
    """Validate a conv2d configuration and resolve its output size (the one shared formula)."""
    N, C, H, W = x_shape
    OC, CG, KH, KW = w_shape
    groups = positive_int(groups, "groups")
    if C % groups:
        raise ValueError(f"input channels ({C}) must be divisible by groups ({groups})")
    if OC % groups:
        raise ValueError(f"out channels of weight ({OC}) must be divisible by groups ({groups})")
    if CG * groups != C:
        raise ValueError(f"input has {C} channels but weight expects {CG} x groups={groups} = "
                         f"{CG * groups}: weight shape {tuple(w_shape)}")
    if KH <= 0 or KW <= 0:
        raise ValueError(f"kernel size must be positive, got weight shape {tuple(w_shape)}")
    if OC == 0:
        raise ValueError(f"weight has 0 output channels (shape {tuple(w_shape)}); torch's conv2d "
                         f"rejects it too")
    if H == 0 or W == 0:
        raise ValueError(f"input has an empty spatial dimension: shape {tuple(x_shape)} (only the "
                         f"batch or the channels may be 0, as in torch)")
    SH, SW = pair(stride, "stride")
    DH, DW = pair(dilation, "dilation")
    if SH <= 0 or SW <= 0:
        raise ValueError(f"stride must be positive, got {stride!r}")
    if DH <= 0 or DW <= 0:
        raise ValueError(f"dilation must be positive, got {dilation!r}")
    top, bottom, left, right = conv_padding(padding, (KH, KW), (SH, SW), (DH, DW))
    OH = conv_output_size_padded(H, KH, SH, top, bottom, DH, name="input height")
    OW = conv_output_size_padded(W, KW, SW, left, right, DW, name="input width")
    return ConvGeometry(N, C, H, W, OC, KH, KW, OH, OW, SH, SW, top, left, DH, DW, groups,
                        bottom, right)


@emulated("forward", "backward_input", "backward_weight", "backward_bias")
class _Conv2dCall(Conv2dKernels):
    """conv2d for one call signature (pydl._plan), checked once: the implementation, the
    geometry and the algorithm. On a kernel backend in eager mode it is also the signature's
    plan: Conv2dFunction runs its methods, which allocate with arguments fixed here and launch
    what the first call built (the backward's launches per strides of the upstream gradient
    and, in fp32, per TF32 switch); the call's key fixes every other input of those."""

    __slots__ = ("impl", "unbatched", "eager", "launcher", "fp32", "grad_layout", "new_y",
                 "new_dx", "new_dw", "new_db", "fwd", "bwd")

    def __init__(self, input, weight, bias, stride, padding, dilation, groups, backend, algo):
        name, self.impl = dispatch("conv2d", backend, input, weight,
                                   *([bias] if isinstance(bias, torch.Tensor) else []))
        algo = resolve_algo("conv2d", name, algo)
        check_tensor(input, "input", name, ndims=(3, 4))
        check_tensor(weight, "weight", name, ndims=(4,))
        if weight.dtype != input.dtype:
            raise TypeError(f"input ({input.dtype}) and weight ({weight.dtype}) must have the "
                            "same dtype")
        if bias is not None:
            check_tensor(bias, "bias", name, ndims=(1,))
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"bias must have {weight.shape[0]} elements (out channels), "
                                 f"got {bias.shape[0]}")
            if bias.dtype != input.dtype:
                raise TypeError(f"bias ({bias.dtype}) and input ({input.dtype}) must have the "
                                "same dtype")
        self.unbatched = input.dim() == 3
        x_shape = (1, *input.shape) if self.unbatched else tuple(input.shape)
        g = conv_geometry(x_shape, tuple(weight.shape), stride, padding, dilation, groups)
        if g.C == 0 and name != "torch":
            # torch returns an (N, 0, OH, OW) tensor here, dropping the bias's out channels: no
            # answer to match, so the kernel backends refuse the case
            raise ValueError(f"input has 0 channels (shape {x_shape}): the kernel backends do "
                             f"not run a convolution over no channels (torch returns an (N, 0, "
                             f"OH, OW) tensor for it); use backend='torch' for torch's result")
        if name == "triton" and g.groups > GRID_YZ_MAX and not _depthwise(g):
            raise NotImplementedError(
                f"conv2d: {g.groups} groups on the triton backend, whose grouped kernels run one "
                f"grid row per group, at most {GRID_YZ_MAX} (CUDA's cap on grid axes 1 and 2); "
                f"use backend='numba' or backend='torch'")
        super().__init__(g, algo, name)
        self.eager = (self.impl is _KERNEL_IMPLS.get(name) and not self.unbatched
                      and not torch.compiler.is_compiling() and plain_tensors(input, weight, bias))
        if self.eager:
            dt, dev, fmt = input.dtype, input.device, memory_format_of(input)
            self.launcher = ALGOS[name][algo]
            self.fp32 = dt == torch.float32
            self.grad_layout = algo == "implicit" and fmt == torch.channels_last
            self.new_y = output_maker(_y_shape(g), dt, dev, fmt)
            self.new_dx = output_maker(input.shape, dt, dev, fmt)
            self.new_dw = output_maker(weight.shape, dt, dev, _weight_grad_format(input, weight))
            self.new_db = output_maker((g.OC,), dt, dev)
            # nothing to launch for an empty output
            self.fwd = None if math.prod(_y_shape(g)) else _launch_nothing
            self.bwd = {}

    def __call__(self, input, weight, bias):
        if self.eager:
            if torch.is_grad_enabled() and (input.requires_grad or weight.requires_grad or (
                    bias is not None and bias.requires_grad)):
                return apply(Conv2dFunction, input, weight, bias, self)
            return self.forward(input, weight, bias)
        if self.unbatched:
            return self.impl(input.unsqueeze(0), weight, bias, self.g, self.algo).squeeze(0)
        return self.impl(input, weight, bias, self.g, self.algo)

    # the plan (eager, kernel backends): Conv2dKernels' steps with fixed arguments

    def kernels(self) -> Conv2dKernels:
        return Conv2dKernels(self.g, self.algo, self.backend)

    def forward(self, x, w, b):
        y = fresh(self.new_y)
        run = self.fwd
        if run is None:
            run = self.launcher.plan_forward(x, w, b, y, self.g)
            if not capturing():
                self.fwd = run
        run(x, w, w if b is None else b, y)
        return y

    def grad_output(self, dy, x):
        if self.grad_layout and not dy.is_contiguous(memory_format=torch.channels_last):
            return dy.contiguous(memory_format=torch.channels_last)
        return dy

    def _backward_run(self, which: int, plan, dy, *tensors):
        """The backward's launch `which` (0 input, 1 weight, 2 bias), planned on first use, for
        an upstream gradient of dy's strides (and, in fp32, the TF32 switch now)."""
        key = (dy.stride(), tf32_allowed(True)) if self.fp32 else dy.stride()
        runs = self.bwd.get(key)
        if runs is None:
            runs = [None, None, None]
            if not capturing():
                self.bwd[key] = runs
        run = runs[which]
        if run is None:
            run = runs[which] = plan(dy, *tensors, self.g)
        return run

    def backward_input(self, dy, w, x):
        dx = fresh(self.new_dx)
        if dx.numel():
            self._backward_run(0, self.launcher.plan_backward_input, dy, w, dx)(dy, w, dx)
        return dx

    def backward_weight(self, dy, x, w):
        dw = fresh(self.new_dw)
        if self.g.N == 0:            # an empty batch sums nothing (as _conv2d_bwd_weight)
            return dw.zero_()
        self._backward_run(1, self.launcher.plan_backward_weight, dy, x, dw)(dy, x, dw)
        return dw

    def backward_bias(self, dy):
        db = fresh(self.new_db)
        self._backward_run(2, self.launcher.plan_backward_bias, dy, db)(dy, db)
        return db


def _launch_nothing(*tensors) -> None:
    pass


_CALLS = Cache("conv2d calls")


def _call_key(input, weight, bias, stride, padding, dilation, groups, backend, algo):
    return (backend or current_backend(), algo, *tensors_key(input, weight, bias), stride,
            padding, dilation, groups, tf32_allowed(True))


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1, *,
           backend=None, algo=None):
    """torch.nn.functional.conv2d (cross-correlation) on pydl's kernels.

    algo: on the triton backend "implicit" (implicit GEMM, the default) or "im2col" (explicit
    im2col + GEMM, batch in chunks bounded by IM2COL_WORKSPACE_BYTES); on the numba backend
    "im2col" (the default and only one: Numba im2col, tiled GEMM and col2im kernels).
    """
    input, weight, bias = autocast_inputs("conv2d", input, weight, bias)
    call = _CALLS.call(_call_key, _Conv2dCall, input, weight, bias, stride, padding, dilation,
                       groups, backend, algo)
    return call(input, weight, bias)


__all__ = ["conv2d", "conv_geometry", "ConvGeometry", "Conv2dFunction", "Conv2dKernels", "ALGOS"]
