"""Numba CUDA kernels of the GRU: its forward and its backward through time, each running a
range of time steps per launch. Same math, arguments' meaning, flags and workspace as
kernels/triton/gru.py (see its docstring); the launch structure and the shared pieces are
kernels/numba/rnn.py's. The cell is the forward kernel over one step with has_x.
"""
from numba import cuda, float32

from ._builder import builder
from ._dtypes import dtype_code  # noqa: F401  (for launchers)
from .rnn import (
    ONE,
    ZERO,
    add_gates,
    bptt_step,
    gate_dots_device,
    ld2,
    load_gates,
    recurrent_dh_device,
    sigmoid,
    st2,
    step_time,
    store_gates,
    tanh,
    tile_origin,
)


@builder
def gru_layer_fwd_kernel(TB, TU, TK):
    """The forward kernel for a TB x TU tile, built on first use; launch it with a (tu, tb)
    block. Arguments, in order (placeholders of the same rank where a flag says absent):
    x (T, B, I), w_ih (3H, I), xp (T, B, 3H), b_ih, b_hh (3H,), h0 (B, H), w_hh (3H, H),
    out (T, B, H), ws (T, B, 4H) fp32, hn (B, H), bs (T,) int32; reverse, has_x, has_xp,
    has_bih, has_bhh, has_h0, write_hn, has_bs; dtype codes of the weights (and x), xp, the
    biases, h0, out, hn; s_begin, s_end, sync."""
    gate_dots = gate_dots_device(TB, TU, TK)

    @cuda.jit
    def fwd(x, wih, xp, bih, bhh, h0, whh, out, ws, hn, bs,
            reverse, has_x, has_xp, has_bih, has_bhh, has_h0, write_hn, has_bs,
            code_w, code_xp, code_b, code_h0, code_out, code_hn, s_begin, s_end, sync):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((4, TK, TU), float32)
        T, B, H = out.shape
        n_rb = (B + TB - 1) // TB
        tiles_u = (H + TU - 1) // TU
        grid = cuda.cg.this_grid()
        for s in range(s_begin, s_end):
            t = step_time(s, T, reverse)
            tp = step_time(s - 1, T, reverse)
            for tile in range(cuda.blockIdx.x, n_rb * tiles_u, cuda.gridDim.x):
                row0, unit0, r, u = tile_origin(tile, n_rb, TB, TU)
                gi_r = ZERO
                gi_z = ZERO
                gi_n = ZERO
                gh_r = ZERO
                gh_z = ZERO
                gh_n = ZERO
                if has_x:
                    gi_r, gi_z, gi_n, _ = gate_dots(x[t], wih, row0, unit0, H, 3, sa, sw, code_w,
                                                    code_w, gi_r, gi_z, gi_n, ZERO)
                if s == 0:
                    if has_h0:
                        gh_r, gh_z, gh_n, _ = gate_dots(h0, whh, row0, unit0, H, 3, sa, sw,
                                                        code_h0, code_w, gh_r, gh_z, gh_n, ZERO)
                else:
                    gh_r, gh_z, gh_n, _ = gate_dots(out[tp], whh, row0, unit0, H, 3, sa, sw,
                                                    code_out, code_w, gh_r, gh_z, gh_n, ZERO)
                if r < B and u < H:
                    if has_xp:
                        gi_r, gi_z, gi_n, _ = add_gates(gi_r, gi_z, gi_n, ZERO, xp[t, r], u, H, 3,
                                                        code_xp)
                    if has_bih:
                        gi_r, gi_z, gi_n, _ = add_gates(gi_r, gi_z, gi_n, ZERO, bih, u, H, 3,
                                                        code_b)
                    if has_bhh:
                        gh_r, gh_z, gh_n, _ = add_gates(gh_r, gh_z, gh_n, ZERO, bhh, u, H, 3,
                                                        code_b)
                    hv = ZERO
                    if s > 0:
                        hv = ld2(out[tp], r, u, code_out)
                    elif has_h0:
                        hv = ld2(h0, r, u, code_h0)
                    rg = sigmoid(gi_r + gh_r)
                    zg = sigmoid(gi_z + gh_z)
                    ng = tanh(gi_n + rg * gh_n)
                    h_new = ng + zg * (hv - ng)
                    if has_bs and r >= bs[t]:
                        # past this sequence's end: the state stays (packed sequences)
                        h_new = hv
                        rg = ZERO
                        zg = ZERO
                        ng = ZERO
                        gh_n = ZERO
                    st2(out[t], r, u, h_new, code_out)
                    if write_hn and s == T - 1:
                        st2(hn, r, u, h_new, code_hn)
                    store_gates(ws, t, r, u, H, rg, zg, ng, gh_n, 4)
            if sync and s + 1 < s_end:
                grid.sync()

    return fwd


@builder
def gru_layer_bwd_kernel(TB, TU, TK):
    """The backward kernel for a TB x TU tile, built on first use; launch it with a (tu, tb)
    block. Arguments, in order: ws (T, B, 4H) fp32, out (T, B, H), h0 (B, H), w_hh (3H, H),
    d_out (T, B, H), d_hn (B, H), bs (T,) int32, dgi, dgh (T, B, 3H) fp32 (written), dhd
    (2, B, H) fp32 (running, by step parity), dh0 (B, H) (written); reverse, has_h0,
    has_dout, has_dhn, has_bs, write_dh0, in_ws; dtype codes of out, h0, w_hh, d_out, d_hn,
    dh0; u_begin, u_end (u = T: the dh0 pseudo-step), sync.

    in_ws: dgh is ws[..., :3H] and the gradients go into ws in place of the activations
    (kernels/triton/gru.py IN_WS): [dr, dz, r dn, dn], by the thread that loaded them, through
    the array it loaded them from; dgi is then unused."""
    recurrent_dh = recurrent_dh_device(TB, TU, TK)

    @cuda.jit
    def bwd(ws, out, h0, whh, dout, dhn, bs, dgi, dgh, dhd, dh0,
            reverse, has_h0, has_dout, has_dhn, has_bs, write_dh0, in_ws,
            code_out, code_h0, code_w, code_dout, code_dhn, code_dh0, u_begin, u_end, sync):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((TK, TU), float32)
        T, B, H = out.shape
        n_rb = (B + TB - 1) // TB
        tiles_u = (H + TU - 1) // TU
        grid = cuda.cg.this_grid()
        for us in range(u_begin, u_end):
            t, tn, tp, now, before = bptt_step(us, T, reverse)
            for tile in range(cuda.blockIdx.x, n_rb * tiles_u, cuda.gridDim.x):
                row0, unit0, b, u = tile_origin(tile, n_rb, TB, TU)
                d = ZERO
                if us > 0:
                    d = recurrent_dh(dgh[tn], whh, row0, unit0, 3 * H, H, sa, sw, code_w)
                if b < B and u < H:
                    if us > 0:
                        d += dhd[before, b, u]
                    if us == T:
                        st2(dh0, b, u, d, code_dh0)
                    else:
                        if has_dout:
                            d += ld2(dout[t], b, u, code_dout)
                        if has_dhn and us == 0:
                            d += ld2(dhn, b, u, code_dhn)
                        r, z, n, ghn = load_gates(ws, t, b, u, H)
                        hv = ZERO
                        if us == T - 1:
                            if has_h0:
                                hv = ld2(h0, b, u, code_h0)
                        else:
                            hv = ld2(out[tp], b, u, code_out)
                        dan = d * (ONE - z) * (ONE - n * n)
                        dar = dan * ghn * r * (ONE - r)
                        daz = d * (hv - n) * z * (ONE - z)
                        direct = d * z
                        if has_bs and b >= bs[t]:
                            # past this sequence's end: the gradient passes through
                            dar = ZERO
                            daz = ZERO
                            dan = ZERO
                            direct = d
                        if in_ws:
                            store_gates(ws, t, b, u, H, dar, daz, dan * r, dan, 4)
                        else:
                            store_gates(dgi, t, b, u, H, dar, daz, dan, ZERO, 3)
                            store_gates(dgh, t, b, u, H, dar, daz, dan * r, ZERO, 3)
                        dhd[now, b, u] = direct
            if sync and us + 1 < u_end:
                grid.sync()

    return bwd
