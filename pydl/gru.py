"""GRU cell (torch.nn.GRUCell): argument checks, the autograd Function, kernel launches.

Kernels: kernels/{triton,numba}/gru.py (the fused cell forward, the gate gradients); the
backward's GEMMs and bias column sums are the LSTM's (pydl/lstm.py launchers). Forward in
ONE kernel (both products, the gates and the update), saving r, z, n and gh_n in fp32;
backward: one elementwise kernel for the pre-activation gradients dgi, dgh (B, 3H) and the
direct path dh1 * z, then dx = dgi W_ih, dh = dgh W_hh + dh1 z (the direct part enters as
the GEMM's addend), dW_ih = dgi^T x, dW_hh = dgh^T h, db_ih / db_hh = column sums.
"""
from __future__ import annotations

import torch

from . import _env
from ._checks import check_tensor
from ._launch import cdiv, new_output, next_power_of_2, numba_array, numba_threads
from .backends import dispatch, register
from .conv import _input_precision
from .lstm import (_NUMBA_SIM_STEP_TILE, _NUMBA_STEP_TILE, _check_cell_state, _check_cell_weights,
                   _dot_block, _mm, _numba_grid, _numba_launch, _NumbaLSTM, _TritonLSTM)

F32 = torch.float32


class _TritonGRU(_TritonLSTM):
    """The LSTM launcher's gemm / bias_grad plus the GRU cell kernels."""

    @staticmethod
    def cell_fwd(x, w_ih, b_ih, h, w_hh, b_hh, h1, ws) -> None:
        from .kernels.triton import gru as k
        B, H = h1.shape
        I = x.shape[1]
        cfg = dict(BLOCK_B=_dot_block(B, 32), BLOCK_H=_dot_block(H, 32),
                   BLOCK_K=_dot_block(max(I, H), 32), num_warps=4)
        d = h1
        k.gru_cell_fwd[(cdiv(B, cfg["BLOCK_B"]), cdiv(H, cfg["BLOCK_H"]))](
            x, w_ih, b_ih if b_ih is not None else d, h if h is not None else d, w_hh,
            b_hh if b_hh is not None else d, h1, ws, B, I, H,
            *x.stride(), *w_ih.stride(), *(h.stride() if h is not None else (0, 0)),
            *w_hh.stride(), *h1.stride(), *ws.stride(),
            HAS_BIH=b_ih is not None, HAS_BHH=b_hh is not None, HAS_H=h is not None,
            INPUT_PRECISION=_input_precision(x.dtype), **cfg)

    @staticmethod
    def cell_bwd(ws, h, dh1, dgi, dgh, dhd) -> None:
        from .kernels.triton import gru as k
        B, H = dh1.shape
        block_b, block_h = min(next_power_of_2(B), 16), min(next_power_of_2(H), 64)
        k.gru_cell_bwd[(cdiv(B, block_b), cdiv(H, block_h))](
            ws, h if h is not None else dh1, dh1, dgi, dgh, dhd, B, H, *ws.stride(),
            *(h.stride() if h is not None else (0, 0)), *dh1.stride(), *dgi.stride(),
            *dgh.stride(), *dhd.stride(), HAS_H=h is not None, BLOCK_B=block_b,
            BLOCK_H=block_h, num_warps=4)


class _NumbaGRU(_NumbaLSTM):
    """Same methods as _TritonGRU, on the Numba kernels."""

    @staticmethod
    def cell_fwd(x, w_ih, b_ih, h, w_hh, b_hh, h1, ws) -> None:
        from .kernels.numba import gru as k
        B, H = h1.shape
        tb, tu, tk = _NUMBA_SIM_STEP_TILE if _env.INTERPRET else _NUMBA_STEP_TILE
        blocks = 1 if _env.INTERPRET else cdiv(B, tb) * cdiv(H, tu)
        d1 = ws.reshape(-1)
        _numba_launch(
            k.gru_cell_kernel(tb, tu, tk), blocks, (tu, tb), h1.device,
            numba_array(x), numba_array(w_ih), numba_array(b_ih if b_ih is not None else d1),
            numba_array(h if h is not None else h1), numba_array(w_hh),
            numba_array(b_hh if b_hh is not None else d1), numba_array(h1), numba_array(ws),
            b_ih is not None, b_hh is not None, h is not None, k.dtype_code(x.dtype),
            k.dtype_code(h1.dtype))

    @staticmethod
    def cell_bwd(ws, h, dh1, dgi, dgh, dhd) -> None:
        from .kernels.numba import gru as k
        B, H = dh1.shape
        threads = numba_threads(256)
        _numba_launch(
            k.gru_cell_bwd, _numba_grid(B * H, threads), threads, dh1.device,
            numba_array(ws), numba_array(h if h is not None else dh1), numba_array(dh1),
            numba_array(dgi), numba_array(dgh), numba_array(dhd), h is not None,
            k.dtype_code((h if h is not None else dh1).dtype), k.dtype_code(dh1.dtype))


LAUNCHERS = {"triton": _TritonGRU, "numba": _NumbaGRU}


class GRUCellFunction(torch.autograd.Function):
    """h1 of one GRU step for x (B, I) and h (B, H) or None (zeros)."""

    @staticmethod
    def forward(ctx, x, h, w_ih, w_hh, b_ih, b_hh, launch):
        B, H = x.shape[0], w_hh.shape[1]
        h1 = new_output((B, H), x.dtype, x.device)
        ws = new_output((B, 4 * H), F32, x.device)
        if B and H:
            launch.cell_fwd(x, w_ih, b_ih, h, w_hh, b_hh, h1, ws)
        ctx.save_for_backward(x, h, w_ih, w_hh, ws)
        ctx.launch = launch
        ctx.has_bias = (b_ih is not None, b_hh is not None)
        return h1

    @staticmethod
    def backward(ctx, dh1):
        x, h, w_ih, w_hh, ws = ctx.saved_tensors
        launch, need = ctx.launch, ctx.needs_input_grad
        B, H = dh1.shape
        dev = x.device
        dgi = new_output((B, 3 * H), F32, dev)
        dgh = new_output((B, 3 * H), F32, dev)
        dhd = new_output((B, H), F32, dev)
        if B and H:
            launch.cell_bwd(ws, h, dh1, dgi, dgh, dhd)
        dx = dh = dw_ih = dw_hh = db_ih = db_hh = None
        if need[0]:
            dx = new_output(x.shape, x.dtype, dev)
            _mm(launch, dgi, w_ih, dx)
        if h is not None and need[1]:
            dh = new_output(h.shape, h.dtype, dev)
            _mm(launch, dgh, w_hh, dh, c_in=dhd)
        if need[2]:
            dw_ih = new_output(w_ih.shape, w_ih.dtype, dev)
            _mm(launch, dgi.t(), x, dw_ih)
        if need[3]:
            if h is None:   # zero state: no gradient reaches W_hh
                dw_hh = torch.zeros_like(w_hh)
            else:
                dw_hh = new_output(w_hh.shape, w_hh.dtype, dev)
                _mm(launch, dgh.t(), h, dw_hh)
        if ctx.has_bias[0] and need[4]:
            db_ih = new_output((3 * H,), w_ih.dtype, dev)
            launch.bias_grad(dgi[None], db_ih, None)
        if ctx.has_bias[1] and need[5]:
            db_hh = new_output((3 * H,), w_hh.dtype, dev)
            launch.bias_grad(dgh[None], db_hh, None)
        return dx, dh, dw_ih, dw_hh, db_ih, db_hh, None


def _kernel_gru_cell(launch):
    def impl(x, h, w_ih, w_hh, b_ih, b_hh):
        return GRUCellFunction.apply(x, h, w_ih, w_hh, b_ih, b_hh, launch)
    return impl


for _name, _launch in LAUNCHERS.items():
    register("gru_cell", _name)(_kernel_gru_cell(_launch))


@register("gru_cell", "torch")
def _torch_gru_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    h = x.new_zeros(x.shape[0], w_hh.shape[1]) if h is None else h
    return torch._VF.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)


def gru_cell(input, hx, w_ih, w_hh, b_ih=None, b_hh=None, *, backend=None):
    """One GRU step, as torch.nn.GRUCell: returns h1.

    input (B, I) or unbatched (I,); hx (B, H) (or (H,)) or None for zeros; w_ih (3H, I),
    w_hh (3H, H), b_ih / b_hh (3H,) or None; gate order r, z, n (torch's).
    """
    if hx is not None and not isinstance(hx, torch.Tensor):
        raise TypeError(f"hx must be a tensor or None, got {type(hx).__name__}")
    name, impl = dispatch("gru_cell", backend, input, w_ih, w_hh,
                          *[t for t in (hx, b_ih, b_hh) if isinstance(t, torch.Tensor)])
    check_tensor(input, "input", name, ndims=(1, 2))
    H = _check_cell_weights(w_ih, w_hh, b_ih, b_hh, input, name, gates=3)
    unbatched = input.dim() == 1
    x = input.unsqueeze(0) if unbatched else input
    _check_cell_state(hx, "hx", input, (H,) if unbatched else (x.shape[0], H), name)
    h = hx.unsqueeze(0) if unbatched and hx is not None else hx
    h1 = impl(x, h, w_ih, w_hh, b_ih, b_hh)
    return h1.squeeze(0) if unbatched else h1


__all__ = ["gru_cell", "GRUCellFunction"]
