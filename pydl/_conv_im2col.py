"""conv2d's "im2col" algorithm (pydl/conv.py lists the parts): the triton backend's launcher
`_TritonIm2col` (the im2col and col2im kernels of kernels/triton/conv.py, the shared GEMM of
pydl/_gemm.py), and what the numba backend's launcher (pydl/_conv_numba.py) shares with it:
the workspace bound IM2COL_WORKSPACE_BYTES and the chunks of whole images it allows
(`_chunks`), the matrix views of images and weights, and the weight gradient summed over the
chunks (`_weight_chunks`). The implicit algorithm (pydl/_conv_implicit.py) takes a 1x1
layer's pixel and weight matrices from here, and its grad input's col2im route.
"""
from __future__ import annotations

import torch

from ._conv_common import (
    _TRITON_PLANS,
    ConvGeometry,
    _bias_matrix,
    _input_precision,
    _launch_nothing,
    _Launcher,
    _stride_phases,
)
from ._gemm import gemm_plan_on
from ._launch import cdiv, dot_block, fresh, memory_format_of, next_power_of_2, output_maker
from ._plan import Launch

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
        from ._conv_implicit import _TritonImplicit  # here: that module imports this one
        return _TritonImplicit.plan_backward_bias(dy, db, g)
