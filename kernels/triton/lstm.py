"""Triton kernels of the LSTM: its forward and its backward through time, each running a range
of time steps per launch (one step, the whole sequence with a grid barrier between steps, or
the whole sequence in one program: kernels/triton/rnn.py describes the three ways and the
pieces shared with the GRU). The cell (torch.nn.LSTMCell) is the same forward kernel over one
step with the input product done in the step (HAS_X).

Layout and gate order are PyTorch's: w_ih (4H, I) and w_hh (4H, P) stack the gates as rows
[i; f; g; o]; sequences are (T, B, features) with any strides (a batch_first input, one
direction's half of a bidirectional output and transposed weights need no copy). Offsets are
int64.

Forward step t (run order s; t = s, or T-1-s for the reverse direction), for a tile of
BLOCK_B batch rows x BLOCK_H units:

    a = [x_t W_ih^T] + h_{t-1} W_hh^T + xp_t + b_ih + b_hh       (gate-interleaved tile)
    i, f, o = sigmoid(a_i, a_f, a_o)   g = tanh(a_g)
    c_t = f c_{t-1} + i g              h_t = o tanh(c_t)

h_{t-1} is h0 (or zero) at the first step, else the output of the step before, read whole
(every unit: the product needs them all). A program owns whole units, so c stays with it.
Written per step: h_t into `out` (rounded to its dtype: the next step reads it back), c_t
(fp32) and the four fp32 activations (the backward's inputs); h_n, c_n at the last step.
xp may be acts itself (the layers project into the activations' buffer): a tile reads its
elements of xp_t before it writes the same elements of acts_t, each written value depends on
the one read there, and no other tile reads them.

With projections (torch's proj_size P < H) W_hh is (4H, P), h_{t-1} is P wide, the cell
writes m_t = o tanh(c_t) (H wide) into `m`, and a second sub-step projects it,
h_t = m_t W_hr^T, into the output (after a barrier: every program needs all of m_t).

Packed sequences (HAS_BS): bs[t] rows are active at step t (torch's batch_sizes: sequences
sorted by length); the others keep their state (h_t = h_{t-1}, c_t = c_{t-1}, activations 0),
so h_n is each sequence's state after its own last step, and the backward lets their
gradients pass through unchanged. With projections the projection keeps h_{t-1} for them
(h0 or zeros before a reversed sequence's start) and their m is 0; the backward runs on m,
so the host takes what passes through there apart (pydl/lstm.py: dh0 of a reversed
direction from each sequence's first step, the h_n term of dW_hr from each one's last m).

Backward step (BPTT order u = 0, 1, ...: run-order step s = T-1-u first), tile of BLOCK_B rows
x BLOCK_H units (BLOCK_H >= 16: the recurrent product's width):

    dh = dg_{next} W_rec[:, units] (+ d_out_t) (+ d h_n at u = 0) (+ pass-through)
    dc_t = dc + dh o (1 - tanh(c_t)^2)
    dg = [dc_t g i (1-i), dc_t c_{t-1} f (1-f), dc_t i (1-g^2), dh tanh(c_t) o (1-o)]
    dc = dc_t f                                     (dc0 after the last step)

with dg_next the gate gradients of the step that ran after this one (all 4H columns, written
by every program: the grid barrier's reason) and W_rec = W_hh (4H, H), or W_hh W_hr with
projections (then d_out and d h_n arrive already multiplied by W_hr). The product of a tile
is split over K = 4H (SPLIT ranges, one program each; the last to finish adds the partials
and runs the cell: kernels/triton/rnn.py, "Backward tiles"). With a 16-bit W_rec (BCAST) it
multiplies a copy of dg_next rounded to W_rec's dtype, which each cell writes beside the fp32
dg (kernels/triton/rnn.py, Precision). dc (and, for packed sequences, the pass-through dh of
rows past their end) run through two (B, H) fp32 planes of the workspace indexed by step
parity, as does the 16-bit copy, so no step reads what it writes. The pseudo-step u = T
(WRITE_DH0) writes dh0 = dg_first W_hh (+ pass-through).

Numerics: fp32 accumulation whatever the dtype; sigmoid and tanh take exp of -|a| only; NaN
propagates. PRECISION as kernels/triton/rnn.py `dot` (fp32 x fp32 products in an fp32 layer,
or with projections in a 16-bit one).
"""
import triton
import triton.language as tl

from .rnn import (
    EARLY_ELEMS,
    add_gates,
    backward_tile,
    forward_tiles,
    gate_columns,
    grid_exit,
    load_gates,
    sigmoid,
    split_gates,
    step_sync,
    step_time,
    store_gates,
    tanh,
    tile_dot,
    tile_of,
)


@triton.jit
def lstm_cell_forward(a_i, a_f, a_g, a_o, c):
    """(i, f, g, o, c1, h1) of the cell update from the four pre-activations and c."""
    i = sigmoid(a_i)
    f = sigmoid(a_f)
    g = tanh(a_g)
    o = sigmoid(a_o)
    c1 = f * c + i * g
    return i, f, g, o, c1, o * tanh(c1)


@triton.jit
def lstm_cell_backward(dh, dc, i, f, g, o, c, c1):
    """(d a_i, d a_f, d a_g, d a_o, dc_prev) from the gradients reaching h1 and c1."""
    tc = tanh(c1)
    dct = dc + dh * o * (1.0 - tc * tc)
    return (dct * g * i * (1.0 - i), dct * c * f * (1.0 - f), dct * i * (1.0 - g * g),
            dh * tc * o * (1.0 - o), dct * f)


@triton.jit
def _cell_state(c0_ptr, cs_ptr, tp, r, u, mask, sc0_b, sc0_k, scs_t, scs_b, scs_k,
                HAS_C0: tl.constexpr, FIRST: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """The cell state a step starts from, fp32: c0 (or zeros) at the first step, else the
    step before's c (time tp) from the fp32 cs."""
    c = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if FIRST:
        if HAS_C0:
            c = tl.load(c0_ptr + r * sc0_b + u * sc0_k, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.load(cs_ptr + tp * scs_t + r * scs_b + u * scs_k, mask=mask, other=0.0)
    return c


@triton.jit
def _fwd_tile(tile, s, t, tp, x_ptr, wih_ptr, xp_ptr, bih_ptr, bhh_ptr, h0_ptr, c0_ptr,
              whh_ptr, out_ptr, m_ptr, cs_ptr, acts_ptr, hn_ptr, cn_ptr, bs_ptr,
              T, B, I, H, P,
              sx_t, sx_b, sx_k, swi_r, swi_k, sbih, sbhh, sxp_t, sxp_b, sxp_k,
              sh0_b, sh0_k, sc0_b, sc0_k,
              swh_r, swh_k, so_t, so_b, so_k, sm_t, sm_b, sm_k, scs_t, scs_b, scs_k,
              sa_t, sa_b, sa_k, shn_b, shn_k, scn_b, scn_k,
              HAS_X: tl.constexpr, HAS_XP: tl.constexpr,
              HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, HAS_H0: tl.constexpr,
              HAS_C0: tl.constexpr, WRITE_HN: tl.constexpr, WRITE_CN: tl.constexpr,
              HAS_BS: tl.constexpr, PROJ: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
              FIRST: tl.constexpr):
    """Step s (time t; tp: the time of the step before) of one tile. FIRST: the step starts
    from h0 / c0 (or zeros), else from the output and cell state of the step before. PROJ:
    h1 (= m) goes to m_ptr, the projection writes the output and h_n."""
    rows, units, unit0 = tile_of(tile, B, BLOCK_B, BLOCK_H)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r = rows[:, None]
    u = units[None, :]
    if FIRST:
        h_ptr = h0_ptr
        sh_b = sh0_b
        sh_k = sh0_k
        HAS_H: tl.constexpr = HAS_H0
    else:
        h_ptr = out_ptr + tp * so_t
        sh_b = so_b
        sh_k = so_k
        HAS_H: tl.constexpr = True
    # A small tile (the latency-bound recurrences of small batches) loads the cell's step
    # operands first, so that their round trip overlaps the K loop's instead of following it;
    # a large one after it (held across the loop they would cost a large tile's registers).
    # The biases, read every step, stay cached. The sum's order is the same either way.
    EARLY: tl.constexpr = BLOCK_B * BLOCK_H <= EARLY_ELEMS
    if HAS_XP and EARLY:
        xp = load_gates(xp_ptr + t * sxp_t + r * sxp_b, u, sxp_k, H, mask, 4)
    if EARLY:
        c = _cell_state(c0_ptr, cs_ptr, tp, r, u, mask, sc0_b, sc0_k, scs_t, scs_b, scs_k,
                        HAS_C0, FIRST, BLOCK_B, BLOCK_H)
    cols, c_ok = gate_columns(unit0, H, 4, BLOCK_H)
    acc = tl.zeros([BLOCK_B, 4 * BLOCK_H], tl.float32)
    if HAS_X:
        acc = tile_dot(x_ptr + t * sx_t, sx_b, sx_k, rows, r_ok, I, wih_ptr, swi_r, swi_k,
                       cols, c_ok, acc, PRECISION, BLOCK_K)
    if HAS_H:
        acc = tile_dot(h_ptr, sh_b, sh_k, rows, r_ok, P, whh_ptr, swh_r, swh_k,
                       cols, c_ok, acc, PRECISION, BLOCK_K)
    a = split_gates(acc, BLOCK_B, BLOCK_H)
    if HAS_XP:
        if not EARLY:
            xp = load_gates(xp_ptr + t * sxp_t + r * sxp_b, u, sxp_k, H, mask, 4)
        a = add_gates(a, xp)
    if not EARLY:
        c = _cell_state(c0_ptr, cs_ptr, tp, r, u, mask, sc0_b, sc0_k, scs_t, scs_b, scs_k,
                        HAS_C0, FIRST, BLOCK_B, BLOCK_H)
    if HAS_BIH:
        a = add_gates(a, load_gates(bih_ptr, u, sbih, H, u_ok[None, :], 4))
    if HAS_BHH:
        a = add_gates(a, load_gates(bhh_ptr, u, sbhh, H, u_ok[None, :], 4))
    i, f, g, o, c1, h1 = lstm_cell_forward(*a, c)
    if HAS_BS:
        # rows past this step's batch size keep their state (packed sequences; with
        # projections h is P wide: _proj_tile keeps it, and m is 0, so that no weight
        # gradient sums it)
        live = (rows < tl.load(bs_ptr + t))[:, None]
        h = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
        if HAS_H and not PROJ:
            h = tl.load(h_ptr + r * sh_b + u * sh_k, mask=mask, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
        h1 = tl.where(live, h1, h)
        c1 = tl.where(live, c1, c)
        i = tl.where(live, i, 0.0)
        f = tl.where(live, f, 0.0)
        g = tl.where(live, g, 0.0)
        o = tl.where(live, o, 0.0)
    if PROJ:
        tl.store(m_ptr + t * sm_t + r * sm_b + u * sm_k, h1.to(m_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + t * so_t + r * so_b + u * so_k, h1.to(out_ptr.dtype.element_ty),
                 mask=mask)
    tl.store(cs_ptr + t * scs_t + r * scs_b + u * scs_k, c1, mask=mask)
    store_gates(acts_ptr + t * sa_t + r * sa_b, u, sa_k, H, mask, (i, f, g, o))
    if s == T - 1:
        if WRITE_HN:
            if not PROJ:
                tl.store(hn_ptr + r * shn_b + u * shn_k, h1.to(hn_ptr.dtype.element_ty), mask=mask)
        if WRITE_CN:
            tl.store(cn_ptr + r * scn_b + u * scn_k, c1.to(cn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _proj_tile(tile, s, t, tp, m_ptr, whr_ptr, out_ptr, hn_ptr, h0_ptr, bs_ptr, T, B, H, P,
               sm_t, sm_b, sm_k, swr_r, swr_k, so_t, so_b, so_k, shn_b, shn_k, sh0_b, sh0_k,
               WRITE_HN: tl.constexpr, HAS_H0: tl.constexpr, HAS_BS: tl.constexpr,
               PRECISION: tl.constexpr,
               BLOCK_B: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    """h_t[rows, cols] = m_t[rows, :] W_hr[cols, :]^T for one tile of the projection; HAS_BS:
    a row past its sequence's end (or before a reversed one's start) keeps h_{t-1} (h0, or
    zeros, at the first step), as the cell keeps its state."""
    rows, cols, _ = tile_of(tile, B, BLOCK_B, BLOCK_P)
    r_ok = rows < B
    c_ok = cols < P
    acc = tl.zeros([BLOCK_B, BLOCK_P], tl.float32)
    acc = tile_dot(m_ptr + t * sm_t, sm_b, sm_k, rows, r_ok, H, whr_ptr, swr_r, swr_k, cols,
                   c_ok, acc, PRECISION, BLOCK_K)
    mask = r_ok[:, None] & c_ok[None, :]
    r = rows[:, None]
    c = cols[None, :]
    if HAS_BS:
        live = (rows < tl.load(bs_ptr + t))[:, None]
        h = tl.zeros([BLOCK_B, BLOCK_P], tl.float32)
        if s > 0:
            h = tl.load(out_ptr + tp * so_t + r * so_b + c * so_k, mask=mask, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
        elif HAS_H0:
            h = tl.load(h0_ptr + r * sh0_b + c * sh0_k, mask=mask, other=0.0).to(tl.float32)
        acc = tl.where(live, acc, h)
    tl.store(out_ptr + t * so_t + r * so_b + c * so_k, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_HN:
        if s == T - 1:
            tl.store(hn_ptr + r * shn_b + c * shn_k, acc.to(hn_ptr.dtype.element_ty), mask=mask)


# the step range changes every launch of the step-by-step path: one compiled kernel for all
@triton.jit(do_not_specialize=["step_begin", "step_end"])
def lstm_layer_fwd(
    x_ptr, wih_ptr, xp_ptr, bih_ptr, bhh_ptr, h0_ptr, c0_ptr, whh_ptr, whr_ptr,
    out_ptr, m_ptr, cs_ptr, acts_ptr, hn_ptr, cn_ptr, bs_ptr, sync_ptr,
    T, B, I, H, P,
    sx_t, sx_b, sx_k,            # x (T, B, I): the cell's input (HAS_X)
    swi_r, swi_k,                # w_ih (4H, I)
    sbih, sbhh,                  # b_ih, b_hh (4H,)
    sxp_t, sxp_b, sxp_k,         # xp (T, B, 4H): x W_ih^T + b_ih of every step (HAS_XP)
    sh0_b, sh0_k, sc0_b, sc0_k,  # h0 (B, P), c0 (B, H): the state before the first step
    swh_r, swh_k,                # w_hh (4H, P)
    swr_r, swr_k,                # w_hr (P, H): the projection (PROJ)
    so_t, so_b, so_k,            # out (T, B, P): h_t
    sm_t, sm_b, sm_k,            # m (T, B, H): o_t tanh(c_t) before the projection (PROJ)
    scs_t, scs_b, scs_k,         # cs (T, B, H) fp32: c_t
    sa_t, sa_b, sa_k,            # acts (T, B, 4H) fp32: i, f, g, o
    shn_b, shn_k, scn_b, scn_k,  # h_n (B, P), c_n (B, H): the last step's h_t, c_t
    step_begin, step_end,        # this launch's sub-steps (last: they change per launch)
    REVERSE: tl.constexpr, HAS_X: tl.constexpr, HAS_XP: tl.constexpr,
    HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr,
    WRITE_HN: tl.constexpr, WRITE_CN: tl.constexpr, HAS_BS: tl.constexpr, PROJ: tl.constexpr,
    GRID_SYNC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Sub-steps step_begin <= q < step_end of one direction: q is run-order step s = q
    without projections; with them (PROJ) step s is q = 2s (the cell: m_t) and q = 2s + 1 (the
    projection h_t = m_t W_hr^T, tiles of BLOCK_B rows x 4*BLOCK_H columns of P). Grid (NP,):
    each program loops over tiles pid, pid + NP, ... (cdiv(B, BLOCK_B) x cdiv(H, BLOCK_H)
    for the cell). GRID_SYNC: the programs wait for each other after every sub-step (all
    resident; kernels/triton/rnn.py)."""
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    n_tiles = tl.cdiv(B, BLOCK_B) * tl.cdiv(H, BLOCK_H)
    n_ptiles = tl.cdiv(B, BLOCK_B) * tl.cdiv(P, 4 * BLOCK_H)
    for q in range(step_begin, step_end):
        if PROJ:
            s = q // 2
            phase = q % 2
        else:
            s = q
            phase = 0
        t = step_time(s, T, REVERSE)
        tp = step_time(s - 1, T, REVERSE)
        if phase == 1:
            for tile in range(pid, n_ptiles, NP):
                _proj_tile(tile, s, t, tp, m_ptr, whr_ptr, out_ptr, hn_ptr, h0_ptr, bs_ptr,
                           T, B, H, P, sm_t, sm_b, sm_k, swr_r, swr_k, so_t, so_b, so_k,
                           shn_b, shn_k, sh0_b, sh0_k, WRITE_HN, HAS_H0, HAS_BS, PRECISION,
                           BLOCK_B, 4 * BLOCK_H, BLOCK_K)
        else:
            forward_tiles(_fwd_tile, s, pid, NP, n_tiles,
                          (s, t, tp, x_ptr, wih_ptr, xp_ptr, bih_ptr, bhh_ptr, h0_ptr, c0_ptr,
                           whh_ptr, out_ptr, m_ptr, cs_ptr, acts_ptr, hn_ptr, cn_ptr, bs_ptr,
                           T, B, I, H, P, sx_t, sx_b, sx_k, swi_r, swi_k, sbih, sbhh,
                           sxp_t, sxp_b, sxp_k, sh0_b, sh0_k, sc0_b, sc0_k, swh_r, swh_k,
                           so_t, so_b, so_k, sm_t, sm_b, sm_k, scs_t, scs_b, scs_k,
                           sa_t, sa_b, sa_k, shn_b, shn_k, scn_b, scn_k,
                           HAS_X, HAS_XP, HAS_BIH, HAS_BHH, HAS_H0, HAS_C0, WRITE_HN, WRITE_CN,
                           HAS_BS, PROJ, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K))
        step_sync(sync_ptr, q, step_begin, step_end, NP, GRID_SYNC)
    if GRID_SYNC:
        grid_exit(sync_ptr)


@triton.jit
def _bwd_cell(rows, units, dh, bcast_ptr, u_step, t, tp, acts_ptr, cs_ptr, c0_ptr, dout_ptr,
              dhn_ptr, dcn_ptr, bs_ptr, dg_ptr, ws_ptr, pass_ptr, dh0_ptr, dc0_ptr, T, B, H, K,
              sa_t, sa_b, sa_k, scs_t, scs_b, scs_k, sc0_b, sc0_k,
              sdo_t, sdo_b, sdo_k, sdhn_b, sdhn_k, sdcn_b, sdcn_k, sdg_t, sdg_b, sdg_k,
              sws_p, sws_b, sws_k, sps_p, sps_b, sps_k, sdh0_b, sdh0_k, sdc0_b, sdc0_k,
              HAS_C0: tl.constexpr, HAS_DOUT: tl.constexpr, HAS_DHN: tl.constexpr,
              HAS_DCN: tl.constexpr, HAS_BS: tl.constexpr, WRITE_DC0: tl.constexpr,
              BCAST: tl.constexpr, IN_ACTS: tl.constexpr):
    """BPTT step u_step (< T) of the rows x units given dh = dg_next W_rec[:, units] (zero
    at u_step 0), or the pseudo-step u_step == T (dh0); bcast_ptr: the 16-bit copy of the
    gate gradients (BCAST, kernels/triton/rnn.py step_workspace). Every load is issued
    before the first branch, masked by the step (one L2 round trip, not one per branch); the
    running buffers are read through L2 (.cg): with K splits the program that finishes a
    tile changes from step to step."""
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r = rows[:, None]
    u = units[None, :]
    now = u_step % 2
    before = 1 - now
    step = mask & (u_step < T)                  # a real step (not the dh0 pseudo-step)
    first = mask & (u_step == 0)
    later = mask & (u_step > 0)
    if HAS_BS:
        dh += tl.load(pass_ptr + before * sps_p + r * sps_b + u * sps_k, mask=later,
                      other=0.0, cache_modifier=".cg")
    if HAS_DOUT:
        dh += tl.load(dout_ptr + t * sdo_t + r * sdo_b + u * sdo_k, mask=step,
                      other=0.0).to(tl.float32)
    if HAS_DHN:
        dh += tl.load(dhn_ptr + r * sdhn_b + u * sdhn_k, mask=first, other=0.0).to(tl.float32)
    dc = tl.load(ws_ptr + before * sws_p + r * sws_b + u * sws_k, mask=later & step, other=0.0,
                 cache_modifier=".cg")
    if HAS_DCN:
        dc += tl.load(dcn_ptr + r * sdcn_b + u * sdcn_k, mask=first, other=0.0).to(tl.float32)
    i, f, g, o = load_gates(acts_ptr + t * sa_t + r * sa_b, u, sa_k, H, step, 4)
    c1 = tl.load(cs_ptr + t * scs_t + r * scs_b + u * scs_k, mask=step, other=0.0)
    # c_{t-1}: c0 (or zero) at the sequence's first step (u_step T-1), else cs of the step before
    c = tl.load(cs_ptr + tp * scs_t + r * scs_b + u * scs_k, mask=step & (u_step < T - 1),
                other=0.0)
    if HAS_C0:
        c += tl.load(c0_ptr + r * sc0_b + u * sc0_k, mask=step & (u_step == T - 1),
                     other=0.0).to(tl.float32)
    if u_step == T:
        tl.store(dh0_ptr + r * sdh0_b + u * sdh0_k, dh.to(dh0_ptr.dtype.element_ty), mask=mask)
    else:
        d_i, d_f, d_g, d_o, dc_prev = lstm_cell_backward(dh, dc, i, f, g, o, c, c1)
        if HAS_BS:
            live = (rows < tl.load(bs_ptr + t))[:, None]
            d_i = tl.where(live, d_i, 0.0)
            d_f = tl.where(live, d_f, 0.0)
            d_g = tl.where(live, d_g, 0.0)
            d_o = tl.where(live, d_o, 0.0)
            dc_prev = tl.where(live, dc_prev, dc)
            tl.store(pass_ptr + now * sps_p + r * sps_b + u * sps_k, tl.where(live, 0.0, dh),
                     mask=mask)
        if IN_ACTS:
            # in place of the step's activations, which nothing reads after this cell (the
            # backward's own, recomputed: dg_ptr is acts): through the pointer they were loaded
            # from, so each store stays after its element's loads (kernels/triton/gru.py IN_WS)
            store_gates(acts_ptr + t * sa_t + r * sa_b, u, sa_k, H, mask, (d_i, d_f, d_g, d_o))
        else:
            store_gates(dg_ptr + t * sdg_t + r * sdg_b, u, sdg_k, H, mask, (d_i, d_f, d_g, d_o))
        if BCAST:
            # the copy the next step's product reads, rounded to W's dtype (rows of K = 4H
            # contiguous columns: gate q of unit u at q*H + u)
            store_gates(bcast_ptr + now * B * K + r * K + u, 0, 1, H, mask, (d_i, d_f, d_g, d_o))
        if u_step == T - 1:
            if WRITE_DC0:
                tl.store(dc0_ptr + r * sdc0_b + u * sdc0_k, dc_prev.to(dc0_ptr.dtype.element_ty),
                         mask=mask)
        else:
            tl.store(ws_ptr + now * sws_p + r * sws_b + u * sws_k, dc_prev, mask=mask)


# the step range changes every launch of the step-by-step path: one compiled kernel for all
@triton.jit(do_not_specialize=["step_begin", "step_end"])
def lstm_layer_bwd(
    acts_ptr, cs_ptr, c0_ptr, wrec_ptr, dout_ptr, dhn_ptr, dcn_ptr, bs_ptr,
    dg_ptr, ws_ptr, pass_ptr, dh0_ptr, dc0_ptr, sync_ptr,
    T, B, H, K,
    sa_t, sa_b, sa_k,            # acts (T, B, 4H) fp32 from the forward
    scs_t, scs_b, scs_k,         # cs (T, B, H) fp32: c_t
    sc0_b, sc0_k,                # c0 (B, H)
    swr_r, swr_k,                # w_rec (K = 4H, H): W_hh, or W_hh W_hr with projections
    sdo_t, sdo_b, sdo_k,         # d out (T, B, H)
    sdhn_b, sdhn_k, sdcn_b, sdcn_k,
    sdg_t, sdg_b, sdg_k,         # dg (T, B, 4H) fp32 (written)
    sws_p, sws_b, sws_k,         # workspace (planes, B, H) fp32: dc by step parity in planes
                                 # 0, 1; then the 16-bit broadcast and the split partials
                                 # (kernels/triton/rnn.py step_workspace)
    sps_p, sps_b, sps_k,         # pass-through running (2, B, H) fp32 (HAS_BS)
    sdh0_b, sdh0_k, sdc0_b, sdc0_k,
    step_begin, step_end,        # this launch's steps (last: they change per launch)
    REVERSE: tl.constexpr, HAS_C0: tl.constexpr, HAS_DOUT: tl.constexpr,
    HAS_DHN: tl.constexpr, HAS_DCN: tl.constexpr, HAS_BS: tl.constexpr,
    WRITE_DC0: tl.constexpr, GRID_SYNC: tl.constexpr, BCAST: tl.constexpr,
    PRECISION: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    IN_ACTS: tl.constexpr = False,
):
    """BPTT steps step_begin <= u < step_end (u = T: the dh0 pseudo-step) of one direction.
    Tiles of BLOCK_B rows x BLOCK_H units (no gate interleave), each product split over
    SPLIT ranges of K (cdiv(B, BLOCK_B) x cdiv(H, BLOCK_H) x SPLIT tiles; grid and loop as
    lstm_layer_fwd); sync_ptr[2 + output tile] counts the splits' arrivals (SPLIT > 1, every
    schedule). BCAST: the product reads the 16-bit copy of dg_next (the workspace's), not
    the fp32 dg. IN_ACTS: dg is acts, written in place of each step's activations (_bwd_cell)."""
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    n_tiles = tl.cdiv(B, BLOCK_B) * tl.cdiv(H, BLOCK_H) * SPLIT
    for u_step in range(step_begin, step_end):
        s = T - 1 - u_step                          # the run-order step
        t = step_time(s, T, REVERSE)
        tn = step_time(s + 1, T, REVERSE)           # the step that ran after it
        tp = step_time(s - 1, T, REVERSE)           # the step that ran before it
        for tile in range(pid, n_tiles, NP):
            backward_tile(_bwd_cell, tile, u_step, dg_ptr, tn, sdg_t, sdg_b, sdg_k, wrec_ptr,
                          swr_r, swr_k, ws_ptr, sws_p, sync_ptr, B, H, K,
                          (u_step, t, tp, acts_ptr, cs_ptr, c0_ptr, dout_ptr, dhn_ptr, dcn_ptr,
                           bs_ptr, dg_ptr, ws_ptr, pass_ptr, dh0_ptr, dc0_ptr, T, B, H, K,
                           sa_t, sa_b, sa_k, scs_t, scs_b, scs_k, sc0_b, sc0_k,
                           sdo_t, sdo_b, sdo_k, sdhn_b, sdhn_k, sdcn_b, sdcn_k,
                           sdg_t, sdg_b, sdg_k, sws_p, sws_b, sws_k, sps_p, sps_b, sps_k,
                           sdh0_b, sdh0_k, sdc0_b, sdc0_k,
                           HAS_C0, HAS_DOUT, HAS_DHN, HAS_DCN, HAS_BS, WRITE_DC0, BCAST,
                           IN_ACTS),
                          PRECISION, BCAST, SPLIT, CHUNK, BLOCK_B, BLOCK_H, BLOCK_K)
        step_sync(sync_ptr, u_step, step_begin, step_end, NP, GRID_SYNC)
    if GRID_SYNC:
        grid_exit(sync_ptr)
