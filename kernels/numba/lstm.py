"""Numba CUDA kernels of the LSTM: its forward and its backward through time, each running a
range of time steps per launch. Same math, arguments' meaning, flags and workspaces as
kernels/triton/lstm.py (see its docstring); the launch structure and the shared pieces are
kernels/numba/rnn.py's. The cell is the forward kernel over one step with has_x.
"""
from numba import cuda, float32, int64

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
def lstm_layer_fwd_kernel(TB, TU, TK):
    """The forward kernel for a TB x TU tile and TK-wide K steps, built on first use; launch
    it with a (tu, tb) block. Arguments, in order (placeholders of the same rank where a
    flag says absent):

    x (T, B, I), w_ih (4H, I), xp (T, B, 4H), b_ih, b_hh (4H,), h0 (B, P), c0 (B, H),
    w_hh (4H, P), w_hr (P, H), out (T, B, P), m (T, B, H), cs (T, B, H) fp32,
    acts (T, B, 4H) fp32, hn (B, P), cn (B, H), bs (T,) int32;
    reverse, has_x, has_xp, has_bih, has_bhh, has_h0, has_c0, write_hn, write_cn, has_bs,
    proj; dtype codes of the weights (and x, m), xp, the biases, h0, c0, out, hn, cn;
    q_begin, q_end (sub-steps: q = s, or 2s and 2s + 1 with proj), sync (grid.sync() between
    sub-steps).
    """
    gate_dots = gate_dots_device(TB, TU, TK)

    @cuda.jit
    def fwd(x, wih, xp, bih, bhh, h0, c0, whh, whr, out, m, cs, acts, hn, cn, bs,
            reverse, has_x, has_xp, has_bih, has_bhh, has_h0, has_c0, write_hn, write_cn,
            has_bs, proj, code_w, code_xp, code_b, code_h0, code_c0, code_out, code_hn, code_cn,
            q_begin, q_end, sync):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((4, TK, TU), float32)
        T, B, H = cs.shape
        P = out.shape[2]
        n_rb = (B + TB - 1) // TB
        tiles_u = (H + TU - 1) // TU
        tiles_p = (P + TU - 1) // TU
        nsub = 2 if proj else 1
        grid = cuda.cg.this_grid()
        for q in range(q_begin, q_end):
            s = q // nsub
            t = step_time(s, T, reverse)
            tp = step_time(s - 1, T, reverse)
            if q - s * nsub == 1:
                # the projection: h_t = m_t W_hr^T, tiles of TB rows x TU columns of P
                for tile in range(cuda.blockIdx.x, n_rb * tiles_p, cuda.gridDim.x):
                    row0 = int64(tile % n_rb) * TB
                    col0 = int64(tile // n_rb) * TU
                    acc, a1, a2, a3 = gate_dots(m[t], whr, row0, col0, P, 1, sa, sw, code_w,
                                                code_w, ZERO, ZERO, ZERO, ZERO)
                    r = row0 + cuda.threadIdx.y
                    c = col0 + cuda.threadIdx.x
                    if r < B and c < P:
                        if has_bs and r >= bs[t]:
                            # past this sequence's end (or before a reversed one's start): h
                            # stays, as the cell's state does (packed sequences)
                            acc = ZERO
                            if s > 0:
                                acc = ld2(out[tp], r, c, code_out)
                            elif has_h0:
                                acc = ld2(h0, r, c, code_h0)
                        st2(out[t], r, c, acc, code_out)
                        if write_hn and s == T - 1:
                            st2(hn, r, c, acc, code_hn)
            else:
                for tile in range(cuda.blockIdx.x, n_rb * tiles_u, cuda.gridDim.x):
                    row0, unit0, r, u = tile_origin(tile, n_rb, TB, TU)
                    a_i = ZERO
                    a_f = ZERO
                    a_g = ZERO
                    a_o = ZERO
                    if has_x:
                        a_i, a_f, a_g, a_o = gate_dots(x[t], wih, row0, unit0, H, 4, sa, sw,
                                                       code_w, code_w, a_i, a_f, a_g, a_o)
                    if s == 0:
                        if has_h0:
                            a_i, a_f, a_g, a_o = gate_dots(h0, whh, row0, unit0, H, 4, sa, sw,
                                                           code_h0, code_w, a_i, a_f, a_g, a_o)
                    else:
                        a_i, a_f, a_g, a_o = gate_dots(out[tp], whh, row0, unit0, H, 4, sa, sw,
                                                       code_out, code_w, a_i, a_f, a_g, a_o)
                    if r < B and u < H:
                        if has_xp:
                            a_i, a_f, a_g, a_o = add_gates(a_i, a_f, a_g, a_o, xp[t, r], u, H, 4,
                                                           code_xp)
                        if has_bih:
                            a_i, a_f, a_g, a_o = add_gates(a_i, a_f, a_g, a_o, bih, u, H, 4, code_b)
                        if has_bhh:
                            a_i, a_f, a_g, a_o = add_gates(a_i, a_f, a_g, a_o, bhh, u, H, 4, code_b)
                        c = ZERO
                        if s == 0:
                            if has_c0:
                                c = ld2(c0, r, u, code_c0)
                        else:
                            c = cs[tp, r, u]
                        i = sigmoid(a_i)
                        f = sigmoid(a_f)
                        g = tanh(a_g)
                        o = sigmoid(a_o)
                        c_new = f * c + i * g
                        h_new = o * tanh(c_new)
                        if has_bs and r >= bs[t]:
                            # past this sequence's end: the state stays (packed sequences;
                            # with projections h is P wide: the projection keeps it, and m
                            # is 0, so that no weight gradient sums it)
                            h_new = ZERO
                            if proj:
                                pass
                            elif s > 0:
                                h_new = ld2(out[tp], r, u, code_out)
                            elif has_h0:
                                h_new = ld2(h0, r, u, code_h0)
                            c_new = c
                            i = ZERO
                            f = ZERO
                            g = ZERO
                            o = ZERO
                        if proj:
                            st2(m[t], r, u, h_new, code_w)
                        else:
                            st2(out[t], r, u, h_new, code_out)
                        cs[t, r, u] = c_new
                        store_gates(acts, t, r, u, H, i, f, g, o, 4)
                        if s == T - 1:
                            if write_hn and not proj:
                                st2(hn, r, u, h_new, code_hn)
                            if write_cn:
                                st2(cn, r, u, c_new, code_cn)
            if sync and q + 1 < q_end:
                grid.sync()

    return fwd


@builder
def lstm_layer_bwd_kernel(TB, TU, TK):
    """The backward kernel for a TB x TU tile and TK-wide K steps, built on first use; launch
    it with a (tu, tb) block. Arguments, in order: acts (T, B, 4H), cs (T, B, H) fp32,
    c0 (B, H), w_rec (4H, H), d_out (T, B, H), d_hn, d_cn (B, H), bs (T,) int32,
    dg (T, B, 4H) fp32 (written), dc_run, pass (2, B, H) fp32 (running, by step parity),
    dh0, dc0 (B, H) (written); reverse, has_c0, has_dout, has_dhn, has_dcn, has_bs,
    write_dh0, write_dc0, in_acts; dtype codes of c0, w_rec, d_out, d_hn, d_cn, dh0, dc0;
    u_begin, u_end (BPTT steps, u = T the dh0 pseudo-step), sync.

    in_acts: dg is acts, each step's gradients stored in place of its activations by the
    thread that loaded them, through acts (kernels/triton/lstm.py IN_ACTS).
    """
    recurrent_dh = recurrent_dh_device(TB, TU, TK)

    @cuda.jit
    def bwd(acts, cs, c0, wrec, dout, dhn, dcn, bs, dg, dc_run, pas, dh0, dc0,
            reverse, has_c0, has_dout, has_dhn, has_dcn, has_bs, write_dh0, write_dc0, in_acts,
            code_c0, code_w, code_dout, code_dhn, code_dcn, code_dh0, code_dc0,
            u_begin, u_end, sync):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((TK, TU), float32)
        T, B, H = cs.shape
        K = wrec.shape[0]
        n_rb = (B + TB - 1) // TB
        tiles_u = (H + TU - 1) // TU
        grid = cuda.cg.this_grid()
        for us in range(u_begin, u_end):
            t, tn, tp, now, before = bptt_step(us, T, reverse)
            for tile in range(cuda.blockIdx.x, n_rb * tiles_u, cuda.gridDim.x):
                row0, unit0, r, u = tile_origin(tile, n_rb, TB, TU)
                dh = ZERO
                if us > 0:
                    dh = recurrent_dh(dg[tn], wrec, row0, unit0, K, H, sa, sw, code_w)
                if r < B and u < H:
                    if us > 0 and has_bs:
                        dh += pas[before, r, u]
                    if us == T:
                        st2(dh0, r, u, dh, code_dh0)
                    else:
                        if has_dout:
                            dh += ld2(dout[t], r, u, code_dout)
                        dc = ZERO
                        if us == 0:
                            if has_dhn:
                                dh += ld2(dhn, r, u, code_dhn)
                            if has_dcn:
                                dc = ld2(dcn, r, u, code_dcn)
                        else:
                            dc = dc_run[before, r, u]
                        i, f, g, o = load_gates(acts, t, r, u, H)
                        tc = tanh(cs[t, r, u])
                        c = ZERO
                        if us == T - 1:
                            if has_c0:
                                c = ld2(c0, r, u, code_c0)
                        else:
                            c = cs[tp, r, u]
                        dct = dc + dh * o * (ONE - tc * tc)
                        d_i = dct * g * i * (ONE - i)
                        d_f = dct * c * f * (ONE - f)
                        d_g = dct * i * (ONE - g * g)
                        d_o = dh * tc * o * (ONE - o)
                        dcp = dct * f
                        if has_bs:
                            if r >= bs[t]:
                                # past this sequence's end: gradients pass through
                                d_i = ZERO
                                d_f = ZERO
                                d_g = ZERO
                                d_o = ZERO
                                dcp = dc
                                pas[now, r, u] = dh
                            else:
                                pas[now, r, u] = ZERO
                        store_gates(acts if in_acts else dg, t, r, u, H, d_i, d_f, d_g, d_o,
                                    4)
                        if us == T - 1:
                            if write_dc0:
                                st2(dc0, r, u, dcp, code_dc0)
                        else:
                            dc_run[now, r, u] = dcp
            if sync and us + 1 < u_end:
                grid.sync()

    return bwd
