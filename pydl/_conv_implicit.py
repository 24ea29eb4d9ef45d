"""conv2d's "implicit" algorithm on the triton backend (pydl/conv.py lists the parts): the
implicit-GEMM launcher `_TritonImplicit` (kernels/triton/conv.py; a 1x1 layer at stride 1
without padding is the shared GEMM over pixel matrices instead), its tile configurations and
tuners, the split-K of the weight gradient; and `_TritonDepthwise`, the direct kernels it
takes for depthwise layers (kernels/triton/conv_depthwise.py).
"""
from __future__ import annotations

import math

import torch

from ._conv_common import (
    _TRITON_PLANS,
    ConvGeometry,
    _bias_matrix,
    _input_precision,
    _Launcher,
    _stride_phases,
)
from ._conv_im2col import _pixel_matrix, _TritonIm2col, _weight_matrix_plan
from ._gemm import gemm_plan_on
from ._launch import (
    arrival_counters,
    cdiv,
    dot_block,
    memory_format_of,
    multiprocessors,
    next_power_of_2,
    output_maker,
)
from ._plan import Launch
from ._tune import Tuner, bucket, gemm_candidates, unique

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


def _grad_input_routes(g: ConvGeometry) -> tuple:
    """The grad input's alternatives to the implicit kernel, for the tuner: with few channels
    (FLAT taps: the RGB stem) its output tile is CG columns padded to 16 (3 of 16 useful at the
    stem) over OC x KH x KW deep K steps; the im2col algorithm's dcols = dY @ W has the
    (kh, kw, c) columns dense (147 at the stem) and one K step of OC, then a col2im gather, at
    the price of an fp32 workspace (chunked, at most IM2COL_WORKSPACE_BYTES). Measured on a
    GPU by the tuner (bench/TUNING.md v7); never the default."""
    return ("col2im",) if _flat_taps(g) and g.groups == 1 else ()


# An NCHW layer's implicit kernels gather their operands two bytes at a time (the channels are
# a plane apart) and store their output two bytes at a time with an address per element: no
# cp.async and no 16-byte load in the sm_90 compile (ResNet-50's l2 3x3/2 layer in NCHW took
# 255 registers and spilled until v39 gave these kernels pixel-major 8-warp tiles: 127-204
# registers, a fifth of the instructions); the channels_last layers 72-157 registers, 16-byte
# async copies, no spill (bench/TUNING.md v37-v39). The "channels_last" route runs the kernel the
# channels_last layers run: each NCHW tensor of the kernel (operands and output) is given as
# a channels_last workspace, the operands copied in before and the output copied out after
# (kernels/triton/conv.py relayout_planes: one read and one write of each). A candidate of
# each implicit kernel's tuning space where the activation operand (x; dy; x or dy) is NCHW,
# never the default: a GPU's tuner measures whether the copies pay.
LAYOUT_ROUTE = "channels_last"
LAYOUT_BLOCK = (64, 64)     # the copies' [pixels, channels] tile
# The weight alone relaid: an (OC, C, KH, KW) weight copied into an (OC, KH, KW, C) workspace
# (295 KB at ResNet-50's l2 layer) for the forward and grad input, so that their weight tile
# loads along contiguous channels (16 bytes a lane, cp.async) instead of gathering 2 bytes a
# lane KH*KW apart (5 L1 lines a warp-load at 3x3: by count the forward's largest cost once
# its activation is gathered pixel-major; bench/TUNING.md v41), the activation and output
# left as they are. A candidate at the kernel's own default tile, never the default.
WEIGHT_ROUTE = "weight_channels_last"


def _nchw_planes(t: torch.Tensor) -> bool:
    """An (N, C, H, W) tensor stored as planes: each (h, w) plane contiguous, the channels not
    at unit stride (what relayout_planes reads and writes; channels_last is not)."""
    return t.numel() > 0 and t.shape[1] > 1 and t.stride(1) != 1 and t[:1, :1].is_contiguous()


def _layout_routes(g: ConvGeometry, activation: torch.Tensor) -> tuple:
    """The layout route (LAYOUT_ROUTE) where the kernel's activation operand is NCHW planes and
    the K steps run over channel blocks (with FLAT taps, few channels, there is nothing to
    vectorise along them)."""
    return (LAYOUT_ROUTE,) if not _flat_taps(g) and _nchw_planes(activation) else ()


def _weight_routes(g: ConvGeometry, w: torch.Tensor) -> tuple:
    """The weight route (WEIGHT_ROUTE) of the forward and grad input where the weight is
    (OC, C, KH, KW) planes and the K steps run over channel blocks."""
    return (WEIGHT_ROUTE,) if not _flat_taps(g) and _nchw_planes(w) else ()


class _ChannelsLast:
    """An NCHW-planes tensor's channels_last stand-in, laid out as the planned tensor: `make`
    allocates its workspace (per call), `like` is laid out as it (for planning the kernel that
    reads or writes it), and `launch(src, dst)` copies into it (an operand) or out of it (the
    output, `out`)."""

    __slots__ = ("make", "like", "launch")

    def __init__(self, t: torch.Tensor, out: bool):
        from .kernels.triton import conv as k
        N, C, H, W = t.shape
        bp, bc = LAYOUT_BLOCK
        self.make = output_maker(t.shape, t.dtype, t.device, torch.channels_last)
        self.like = torch.empty(t.shape, dtype=t.dtype, device="meta",
                                memory_format=torch.channels_last)
        sizes = (C, H * W, t.stride(0), t.stride(1))
        align = math.gcd(16, *sizes)        # a power of two: 16's divisors are
        self.launch = Launch(k.relayout_planes, (N * cdiv(H * W, bp), cdiv(C, bc)),
                             tuple(v // align for v in sizes),
                             dict(BLOCK_P=bp, BLOCK_C=bc, OUT=out, ALIGN=align))


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A channels_last copy of t (an upstream gradient, for the kernels of a channels_last
    layer): pydl's relayout_planes kernel where t is NCHW planes (its launch kept per layout),
    torch's copy for another layout."""
    if not _nchw_planes(t):
        return t.contiguous(memory_format=torch.channels_last)
    copy = _TRITON_PLANS.get(("to_channels_last", t.shape, t.stride(), t.dtype, t.device),
                             _ChannelsLast, t, False)
    out = copy.make()
    copy.launch(t, out)
    return out


def _via_channels_last(plan, tensors: tuple, out: int, only: tuple | None = None):
    """The layout route of a kernel callable over `tensors` (its arguments: the two operands
    first, tensors[out] its output): `plan(*tensors')` plans it for the tensors laid out as
    their channels_last stand-ins (_ChannelsLast) where they are NCHW planes (of those at the
    positions `only`, when given); the callable returned takes tensors of the caller's
    layouts."""
    stand_in = {i: _ChannelsLast(tensors[i], i == out) for i in (0, 1, out)
                if (only is None or i in only) and _nchw_planes(tensors[i])}
    run = plan(*[stand_in[i].like if i in stand_in else t for i, t in enumerate(tensors)])
    operands = [(i, c) for i, c in stand_in.items() if i != out]
    result = stand_in.get(out)

    def routed(*args):
        args = list(args)
        for i, c in operands:
            t, args[i] = args[i], c.make()
            c.launch(t, args[i])
        if result is None:
            run(*args)
            return
        y, args[out] = args[out], result.make()
        run(*args)
        result.launch(args[out], y)
    return routed


def _once_per_candidate(build):
    """launch(cfg) = build(cfg), built once per candidate: the tuner times a candidate by
    calling its launch again and again (do_bench), so each call runs what the first built
    (on a GPU through the direct launch path) and the timings hold the kernels, not the
    building of their launches (a route builds copies and three launches)."""
    built: dict = {}

    def launch(cfg: dict):
        key = tuple(sorted(cfg.items()))
        run = built.get(key)
        if run is None:
            run = built[key] = build(cfg)
        return run
    return launch


def _tile(cfg: dict) -> dict:
    """A route's candidate without its ROUTE entry: the tile its kernel runs."""
    return {k: v for k, v in cfg.items() if k != "ROUTE"}


# The tiles of a kernel whose activation operand is gathered: NCHW (or conv1d's (N, C, L)),
# a channel block's elements a plane apart, loaded 2 bytes a lane with a 64-bit address each
# (pixel-major: GATHER_PIXELS), and, forward and grad input, the output stored the same way;
# not the FLAT few-channel layers. In the sm_90 compile of ResNet-50's l2 3x3/2 layer in NCHW
# (`python -m bench resources conv2d_implicit`; bench/TUNING.md v39), the channels_last
# layers' default tiles on 4 warps took 255 registers and spilled (forward 24 bytes, grad
# input 184 before the tiles were pixel-major; the grad weight's 64-deep tile 368 after), as
# did nearly every candidate of GEMM_SPACE; on 8 warps at most 32 deep, they took 127, 128
# and 204 registers, no spill, and an SM holds twice the warps to hide the gathers' latency:
# the default there. The tuner's alternatives, (BLOCK_M, BLOCK_N, BLOCK_K, num_warps),
# compiled without a spill there and at Whisper's conv1d layers (at most 32 accumulators and
# 16 gathered activation elements a thread; the forward's 64 x 128 x 64 at 254-255
# registers); the grad weight takes those at most 32 deep (its 64 x 128 x 64 took 254).
GATHERED_SPACE = ((64, 64, 32, 8), (128, 64, 32, 8), (64, 128, 64, 8), (64, 64, 32, 4))
GATHERED_WEIGHT_DEPTH = 32


def _pixel_major(t: torch.Tensor) -> bool:
    """Whether t's channels (axis 1) are not at unit stride (NCHW, conv1d's (N, C, L)): an
    activation's tiles are then loaded or stored pixel-major (the kernels' GATHER_PIXELS,
    STORE_PIXELS: a warp's lanes along the pixels; channel-major, a warp would touch one plane,
    one 32-byte sector, a lane), and for a weight (OC, C, KH, KW) the K steps run a channel
    block's taps together (TAPS_INNER)."""
    return t.stride(1) != 1


def _gathered(g: ConvGeometry, x: torch.Tensor) -> bool:
    """Whether the forward and the grad weight gather x pixel-major: its channels are not at
    unit stride, and their K steps or columns run over channel blocks (not FLAT taps). (The
    grad input's K steps run over dy's channel blocks whatever the layer: _pixel_major(dy).)"""
    return not _flat_taps(g) and _pixel_major(x)


def _gathered_candidates(default: dict, m: int, n: int, k: int,
                         max_k: int | None = None) -> list[dict]:
    """The default tile on 8 warps, then GATHERED_SPACE, clipped to an (m x k) @ (k x n)
    problem, K blocks at most max_k deep (4 warps for a clipped tile of fewer than 64 x 64
    outputs)."""
    bk = default["BLOCK_K"] if max_k is None else min(default["BLOCK_K"], dot_block(k, max_k))
    tiles = [(default["BLOCK_M"], default["BLOCK_N"], bk, 8)]
    tiles += [(dot_block(m, bm), dot_block(n, bn), dot_block(k, bk), w)
              for bm, bn, bk, w in GATHERED_SPACE if max_k is None or bk <= max_k]
    return unique([dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                        num_warps=w if bm * bn >= 64 * 64 else 4) for bm, bn, bk, w in tiles])


# One tuner per implicit-GEMM kernel. Keys: everything of the geometry but the batch, the
# dtype and rounding, the layout, and a coarse bucket of the GEMM's batch-dependent extent.
IMPLICIT_TUNERS = {d: Tuner(f"conv2d_implicit_{d}") for d in ("fwd", "bwd_input", "bwd_weight")}


def _implicit_config(direction: str, g: ConvGeometry, t: torch.Tensor, m: int, n: int, k: int,
                     launch, routes: tuple = (), gathered: bool = False) -> dict:
    """The launch config of one implicit-GEMM kernel: an (m x k) @ (k x n) tile loop whose K
    steps run over channels (forward, grad input) or pixels (grad weight). `routes`: other
    ways to the same result the tuner also times, as candidates {"ROUTE": name} (with the
    default tile, for a route that runs the kernel) that `launch` runs (never the default).
    gathered: the kernel gathers its activation operand pixel-major (`_gathered`)."""
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
    tile = default      # the channels_last kernels' default: a layout route's tile
    if gathered:
        candidates = _gathered_candidates(default, m, n, k, GATHERED_WEIGHT_DEPTH
                                          if direction == "bwd_weight" else None)
        default = candidates[0]
    else:
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
    # a route at the default tile: the channels_last kernels' for the layout route, the
    # kernel's own (gathered: 8 warps) for the weight route
    candidates += [dict(default if r == WEIGHT_ROUTE else tile, ROUTE=r) for r in routes]
    key = (t.dtype, _input_precision(t.dtype), g.C, g.OC, g.KH, g.KW, g.SH, g.SW, g.DH, g.DW,
           g.groups, memory_format_of(t) == torch.channels_last, gathered, routes, bucket(m),
           bucket(n), bucket(k))
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
    return multiprocessors(device)


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
        consts = dict(KH=g.KH, KW=g.KW, CG=g.CG, OCG=g.OCG, HAS_BIAS=b is not None,
                      INPUT_PRECISION=_input_precision(x.dtype), FLAT_K=flat_k)

        def kernel(cfg, x, w, b, y):    # the kernel on tensors laid out as these
            grid = (cdiv(M, cfg["BLOCK_M"]), cdiv(g.OCG, cfg["BLOCK_N"]), g.groups)
            return Launch(k.conv2d_implicit_fwd, grid, (
                g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *x.stride(), *w.stride(), *y.stride(),
                g.SH, g.SW, g.PH, g.PW, g.DH, g.DW), {
                    **consts, **cfg, "GATHER_PIXELS": _pixel_major(x),  # FLAT_K's too
                    "STORE_PIXELS": _pixel_major(y), "TAPS_INNER": _pixel_major(w)})

        @_once_per_candidate
        def launch(cfg):
            if "ROUTE" in cfg:
                return _via_channels_last(lambda *t: kernel(_tile(cfg), *t), (x, w, b, y), 3,
                                          (1,) if cfg["ROUTE"] == WEIGHT_ROUTE else None)
            return kernel(cfg, x, w, b, y)

        k_len = g.CG * g.KH * g.KW if flat_k else g.CG
        cfg = _implicit_config("fwd", g, x, M, g.OCG, k_len,
                               lambda c: launch(c)(x, w, w if b is None else b, y),
                               _layout_routes(g, x) + _weight_routes(g, w), _gathered(g, x))
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
        consts = dict(KH=g.KH, KW=g.KW, CG=g.CG, OCG=g.OCG, STRIDE_PHASES=phases > 1,
                      INPUT_PRECISION=_input_precision(dy.dtype))
        # with stride phases, each phase's pixels (n, h // SH, w // SW) are tiled apart
        phase_pixels = g.N * cdiv(g.H, g.SH) * cdiv(g.W, g.SW) if phases > 1 else M

        def kernel(cfg, dy, w, dx):     # the kernel on tensors laid out as these
            grid = (phases * cdiv(phase_pixels, cfg["BLOCK_M"]), cdiv(g.CG, cfg["BLOCK_N"]),
                    g.groups)
            return Launch(k.conv2d_implicit_bwd_input, grid, (
                g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *dy.stride(), *w.stride(), *dx.stride(),
                g.SH, g.SW, g.PH, g.PW, g.DH, g.DW), {
                    **consts, **cfg, "GATHER_PIXELS": _pixel_major(dy),
                    "STORE_PIXELS": _pixel_major(dx), "TAPS_INNER": _pixel_major(w)})

        @_once_per_candidate
        def launch(cfg):
            if cfg.get("ROUTE") == "col2im":     # the im2col algorithm's grad input
                return _TritonIm2col._plan_backward_input(dy, w, dx, g)
            if "ROUTE" in cfg:
                return _via_channels_last(lambda *t: kernel(_tile(cfg), *t), (dy, w, dx), 2,
                                          (1,) if cfg["ROUTE"] == WEIGHT_ROUTE else None)
            return kernel(cfg, dy, w, dx)

        cfg = _implicit_config("bwd_input", g, dy, M, g.CG, g.OCG,
                               lambda c: launch(c)(dy, w, dx),
                               _grad_input_routes(g) + _layout_routes(g, dy)
                               + _weight_routes(g, w),
                               _pixel_major(dy))     # its K steps: output-channel blocks
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
        device = dw.device      # not the planned tensors': a route's stand-ins are on "meta"

        def kernel(cfg, dy, x, dw):     # the kernel on tensors laid out as these
            cfg = dict(cfg)
            waves = cfg.pop("SPLIT_WAVES", SPLIT_WAVES[0])      # the host's, not a constexpr
            bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
            cols = cdiv(g.CG * g.KH * g.KW, bn) if flat_n else g.KH * g.KW * cdiv(g.CG, bn)
            tiles = cdiv(g.OCG, bm) * cols * g.groups
            split, p_split = _split_k(tiles, P, cfg["BLOCK_K"], tiles * bm * bn, device, waves)
            main = Launch(k.conv2d_implicit_bwd_weight, (cdiv(g.OCG, bm), cols, g.groups * split),
                          (g.N, g.C, g.H, g.W, g.OC, g.OH, g.OW, *dy.stride(), *x.stride(),
                           *dw.stride(), g.SH, g.SW, g.PH, g.PW, g.DH, g.DW),
                          {**consts, "SPLIT": split, "P_SPLIT": p_split,
                           "REDUCE_ROWS": _reduce_rows(cfg),
                           "GATHER_PIXELS": _gathered(g, x), **cfg})
            if split == 1:
                return lambda dy, x, dw: main(dy, x, dw, dw, dw)   # placeholders: never read
            ws_numel = tiles * split * bm * bn

            def run(dy, x, dw):
                # fp32 partials; the tile's last-arriving program sums them in split order
                ws = torch.empty(ws_numel, dtype=torch.float32, device=device)
                main(dy, x, dw, ws, arrival_counters(device, tiles))
            return run

        @_once_per_candidate
        def launch(cfg):
            if cfg.get("ROUTE") == LAYOUT_ROUTE:
                return _via_channels_last(lambda *t: kernel(_tile(cfg), *t), (dy, x, dw), 2)
            return kernel(cfg, dy, x, dw)

        n = g.CG * g.KH * g.KW if flat_n else g.CG
        cfg = _implicit_config("bwd_weight", g, dy, g.OCG, n, P, lambda c: launch(c)(dy, x, dw),
                               _layout_routes(g, x) or _layout_routes(g, dy), _gathered(g, x))
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
    cl = not _pixel_major(t)
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
        consts = dict(KH=g.KH, KW=g.KW, M=g.OCG, HAS_BIAS=b is not None,
                      PIXEL_MAJOR=_pixel_major(x))

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
        consts = dict(KH=g.KH, KW=g.KW, M=g.OCG, STRIDE_PHASES=phases > 1,
                      PIXEL_MAJOR=_pixel_major(dx))

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
        consts = dict(KH=g.KH, KW=g.KW, M=g.OCG, PIXEL_MAJOR=_pixel_major(dy))
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
