"""conv2d on the numba backend (pydl/conv.py lists the parts): `_NumbaIm2col`, im2col + tiled
GEMM as Numba CUDA kernels (kernels/numba/conv.py; the shared GEMM of kernels/numba/gemm.py
via pydl/_gemm_numba.py), the batch in chunks under IM2COL_WORKSPACE_BYTES with the matrix
views and the chunked weight gradient of pydl/_conv_im2col.py.
"""
from __future__ import annotations

import functools

import torch

from . import _env
from ._conv_common import ConvGeometry, _Launcher
from ._conv_im2col import _chunks, _matrix_view, _merged_stride, _weight_chunks
from ._gemm_numba import gemm_plan_on as gemm_plan_on_numba
from ._launch import planned_once
from ._numba_launch import NumbaLaunch, numba_launch_1d
from ._plan import GRID_YZ_MAX

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
