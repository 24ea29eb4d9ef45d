"""Triton kernels of the GRU: its forward and its backward through time, each running a range
of time steps per launch, built as the LSTM's (kernels/triton/lstm.py; the ways to launch them
and the shared pieces: kernels/triton/rnn.py). The cell (torch.nn.GRUCell) is the forward
kernel over one step with the input product done in the step (HAS_X).

Gate order and layout are PyTorch's: w_ih (3H, I) and w_hh (3H, H) stack [r; z; n] as rows.

    gi = x W_ih^T + b_ih     gh = h W_hh^T + b_hh      (each split as [r z n])
    r = sigmoid(gi_r + gh_r)   z = sigmoid(gi_z + gh_z)   n = tanh(gi_n + r * gh_n)
    h1 = (1 - z) * n + z * h

A forward tile computes gh for its units as one gate-interleaved product (the three gates
padded to four columns a unit) and, for the cell, gi likewise (a layer passes gi of every
step precomputed by one GEMM, as xp); gi_n and gh_n stay apart (b_hh's n part sits inside
r * (...)). It saves r, z, n and gh_n (4H fp32 a row) for the backward. A layer's xp is the
first 3H columns of that workspace itself: a tile reads its elements of gi before it writes
r, z, n over them, each from the one read there, and no other tile reads them.

Backward step (BPTT order u; the running direct part dhd by step parity, as the LSTM's dc):

    dh1 = dgh_next W_hh[:, units] + d_out_t (+ d h_n at u = 0) + dhd
    da_n = dh1 (1 - z) (1 - n^2)   da_r = da_n gh_n r (1 - r)   da_z = dh1 (h - n) z (1 - z)
    dgi = [da_r, da_z, da_n]       dgh = [da_r, da_z, da_n r]     dhd = dh1 z

dgh_next is the dgh of the step that ran next (every program wrote part of it: the grid
barrier's reason), multiplied as the LSTM's dg_next (split over K = 3H; with a 16-bit W_hh
its copy rounded to W_hh's dtype, which each cell writes beside the fp32 dgi, dgh); dhd
carries h1's direct dependence on h (h1 = ... + z h) to the step before. The pseudo-step
u = T (WRITE_DH0) writes dh0 = dgh_first W_hh + dhd. Packed sequences (HAS_BS): inactive
rows keep their state; backward, their dgi = dgh = 0 and dhd carries all of dh1.
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
def gru_cell_forward(gi_r, gi_z, gi_n, gh_r, gh_z, gh_n, h):
    """(r, z, n, h1) of the GRU update (gh_n includes b_hh's n part)."""
    r = sigmoid(gi_r + gh_r)
    z = sigmoid(gi_z + gh_z)
    n = tanh(gi_n + r * gh_n)
    return r, z, n, n + z * (h - n)


@triton.jit
def gru_cell_backward(dh1, r, z, n, ghn, h):
    """(da_r, da_z, da_n, dh1 * z): the pre-activation gradients and the direct part."""
    dan = dh1 * (1.0 - z) * (1.0 - n * n)
    return dan * ghn * r * (1.0 - r), dh1 * (h - n) * z * (1.0 - z), dan, dh1 * z


@triton.jit
def _fwd_tile(tile, s, t, tp, x_ptr, wih_ptr, xp_ptr, bih_ptr, bhh_ptr, h0_ptr, whh_ptr,
              out_ptr, ws_ptr, hn_ptr, bs_ptr, T, B, I, H,
              sx_t, sx_b, sx_k, swi_r, swi_k, sbih, sbhh, sxp_t, sxp_b, sxp_k,
              sh0_b, sh0_k,
              swh_r, swh_k, so_t, so_b, so_k, sw_t, sw_b, sw_k, shn_b, shn_k,
              HAS_X: tl.constexpr, HAS_XP: tl.constexpr,
              HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, HAS_H0: tl.constexpr,
              WRITE_HN: tl.constexpr, HAS_BS: tl.constexpr, PRECISION: tl.constexpr,
              BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
              FIRST: tl.constexpr):
    """Step s (time t) of one tile; FIRST: it starts from h0 (or zeros)."""
    rows, units, unit0 = tile_of(tile, B, BLOCK_B, BLOCK_H)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r_ = rows[:, None]
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
    # A small tile loads the cell's step operands before its K loop (their round trip then
    # overlaps the loop's), a large one after it (kernels/triton/rnn.py EARLY_ELEMS); the
    # biases, read every step, stay cached. The sums' order is the same either way.
    EARLY: tl.constexpr = BLOCK_B * BLOCK_H <= EARLY_ELEMS
    h = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if HAS_H and EARLY:
        h = tl.load(h_ptr + r_ * sh_b + u * sh_k, mask=mask, other=0.0,
                    cache_modifier=".cg").to(tl.float32)
    if HAS_XP and EARLY:
        xp = load_gates(xp_ptr + t * sxp_t + r_ * sxp_b, u, sxp_k, H, mask, 3)
    cols, c_ok = gate_columns(unit0, H, 3, BLOCK_H)
    gh = tl.zeros([BLOCK_B, 4 * BLOCK_H], tl.float32)
    if HAS_H:
        gh = tile_dot(h_ptr, sh_b, sh_k, rows, r_ok, H, whh_ptr, swh_r, swh_k, cols, c_ok, gh,
                      PRECISION, BLOCK_K)
        if not EARLY:
            h = tl.load(h_ptr + r_ * sh_b + u * sh_k, mask=mask, other=0.0,
                        cache_modifier=".cg").to(tl.float32)
    gh_r, gh_z, gh_n, _ = split_gates(gh, BLOCK_B, BLOCK_H)
    gi_r = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    gi_z = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    gi_n = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if HAS_X:
        gi = tl.zeros([BLOCK_B, 4 * BLOCK_H], tl.float32)
        gi = tile_dot(x_ptr + t * sx_t, sx_b, sx_k, rows, r_ok, I, wih_ptr, swi_r, swi_k, cols,
                      c_ok, gi, PRECISION, BLOCK_K)
        gi_r, gi_z, gi_n, _ = split_gates(gi, BLOCK_B, BLOCK_H)
    if HAS_XP:
        if not EARLY:
            xp = load_gates(xp_ptr + t * sxp_t + r_ * sxp_b, u, sxp_k, H, mask, 3)
        gi_r, gi_z, gi_n = add_gates((gi_r, gi_z, gi_n), xp)
    if HAS_BIH:
        gi_r, gi_z, gi_n = add_gates((gi_r, gi_z, gi_n),
                                     load_gates(bih_ptr, u, sbih, H, u_ok[None, :], 3))
    if HAS_BHH:
        gh_r, gh_z, gh_n = add_gates((gh_r, gh_z, gh_n),
                                     load_gates(bhh_ptr, u, sbhh, H, u_ok[None, :], 3))
    r, z, n, h1 = gru_cell_forward(gi_r, gi_z, gi_n, gh_r, gh_z, gh_n, h)
    if HAS_BS:
        live = (rows < tl.load(bs_ptr + t))[:, None]
        h1 = tl.where(live, h1, h)
        r = tl.where(live, r, 0.0)
        z = tl.where(live, z, 0.0)
        n = tl.where(live, n, 0.0)
        gh_n = tl.where(live, gh_n, 0.0)
    tl.store(out_ptr + t * so_t + r_ * so_b + u * so_k, h1.to(out_ptr.dtype.element_ty), mask=mask)
    store_gates(ws_ptr + t * sw_t + r_ * sw_b, u, sw_k, H, mask, (r, z, n, gh_n))
    if WRITE_HN:
        if s == T - 1:
            tl.store(hn_ptr + r_ * shn_b + u * shn_k, h1.to(hn_ptr.dtype.element_ty), mask=mask)


# the step range changes every launch of the step-by-step path: one compiled kernel for all
@triton.jit(do_not_specialize=["step_begin", "step_end"])
def gru_layer_fwd(
    x_ptr, wih_ptr, xp_ptr, bih_ptr, bhh_ptr, h0_ptr, whh_ptr, out_ptr, ws_ptr, hn_ptr, bs_ptr,
    sync_ptr,
    T, B, I, H,
    sx_t, sx_b, sx_k,            # x (T, B, I): the cell's input (HAS_X)
    swi_r, swi_k,                # w_ih (3H, I)
    sbih, sbhh,                  # b_ih, b_hh (3H,)
    sxp_t, sxp_b, sxp_k,         # xp (T, B, 3H): x W_ih^T + b_ih of every step (HAS_XP)
    sh0_b, sh0_k,                # h0 (B, H)
    swh_r, swh_k,                # w_hh (3H, H)
    so_t, so_b, so_k,            # out (T, B, H): h_t
    sw_t, sw_b, sw_k,            # ws (T, B, 4H) fp32: r, z, n, gh_n
    shn_b, shn_k,                # h_n (B, H)
    step_begin, step_end,        # this launch's steps (last: they change per launch)
    REVERSE: tl.constexpr, HAS_X: tl.constexpr, HAS_XP: tl.constexpr,
    HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr, HAS_H0: tl.constexpr,
    WRITE_HN: tl.constexpr, HAS_BS: tl.constexpr, GRID_SYNC: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Run-order steps step_begin <= s < step_end of one direction; grid and tiles as
    kernels/triton/lstm.py lstm_layer_fwd."""
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    n_tiles = tl.cdiv(B, BLOCK_B) * tl.cdiv(H, BLOCK_H)
    for s in range(step_begin, step_end):
        t = step_time(s, T, REVERSE)
        tp = step_time(s - 1, T, REVERSE)
        forward_tiles(_fwd_tile, s, pid, NP, n_tiles,
                      (s, t, tp, x_ptr, wih_ptr, xp_ptr, bih_ptr, bhh_ptr, h0_ptr, whh_ptr,
                       out_ptr, ws_ptr, hn_ptr, bs_ptr, T, B, I, H,
                       sx_t, sx_b, sx_k, swi_r, swi_k, sbih, sbhh, sxp_t, sxp_b, sxp_k,
                       sh0_b, sh0_k, swh_r, swh_k, so_t, so_b, so_k, sw_t, sw_b, sw_k,
                       shn_b, shn_k, HAS_X, HAS_XP, HAS_BIH, HAS_BHH, HAS_H0, WRITE_HN,
                       HAS_BS, PRECISION, BLOCK_B, BLOCK_H, BLOCK_K))
        step_sync(sync_ptr, s, step_begin, step_end, NP, GRID_SYNC)
    if GRID_SYNC:
        grid_exit(sync_ptr)


@triton.jit
def _bwd_cell(rows, units, dh1, bcast_ptr, u_step, t, tp, ws_ptr, out_ptr, h0_ptr, dout_ptr,
              dhn_ptr, bs_ptr, dgi_ptr, dgh_ptr, run_ptr, dh0_ptr,
              T, B, H, sw_t, sw_b, sw_k, so_t, so_b, so_k, sh0_b, sh0_k,
              sdo_t, sdo_b, sdo_k, sdhn_b, sdhn_k, sgi_t, sgi_b, sgi_k, sgh_t, sgh_b, sgh_k,
              srn_p, srn_b, srn_k, sdh0_b, sdh0_k,
              HAS_H0: tl.constexpr, HAS_DOUT: tl.constexpr, HAS_DHN: tl.constexpr,
              HAS_BS: tl.constexpr, BCAST: tl.constexpr, IN_WS: tl.constexpr):
    """BPTT step u_step (< T) of the rows x units given dh1 = dgh_next W_hh[:, units] (zero
    at u_step 0), or the pseudo-step u_step == T (dh0); bcast_ptr: the 16-bit copy of dgh
    (BCAST, kernels/triton/rnn.py step_workspace). Every load is issued before the
    first branch, masked by the step; the running direct part is read through L2 (.cg):
    with K splits the program that finishes a tile changes from step to step.

    IN_WS: the gradients go to the step's own workspace columns, in place of the activations
    they were computed from (nothing reads a step's r, z, n, gh_n after its cell): dgh's r, z,
    n gates in the first 3H (so dgh is ws[:, :, :3H], what the next step's product reads:
    dgh_ptr is ws) and dgi's n gate in gh_n's place (dgi's r, z are dgh's). One program loads
    and stores a tile's elements, through the one pointer, so each store stays after its
    element's loads. dgi_ptr is then unused."""
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r_ = rows[:, None]
    u = units[None, :]
    now = u_step % 2
    before = 1 - now
    step = mask & (u_step < T)                  # a real step (not the dh0 pseudo-step)
    dh1 += tl.load(run_ptr + before * srn_p + r_ * srn_b + u * srn_k, mask=mask & (u_step > 0),
                   other=0.0, cache_modifier=".cg")
    dh_in = tl.zeros(dh1.shape, tl.float32)     # what reaches h1 from outside: d_out (d h_n)
    if HAS_DOUT:
        dh_in += tl.load(dout_ptr + t * sdo_t + r_ * sdo_b + u * sdo_k, mask=step,
                         other=0.0).to(tl.float32)
    if HAS_DHN:
        dh_in += tl.load(dhn_ptr + r_ * sdhn_b + u * sdhn_k, mask=mask & (u_step == 0),
                         other=0.0).to(tl.float32)
    r, z, n, ghn = load_gates(ws_ptr + t * sw_t + r_ * sw_b, u, sw_k, H, step, 4)
    # the state the step started from: h0 (or zero) at the sequence's first step, else the
    # output of the step before
    h = tl.load(out_ptr + tp * so_t + r_ * so_b + u * so_k, mask=step & (u_step < T - 1),
                other=0.0).to(tl.float32)
    if HAS_H0:
        h += tl.load(h0_ptr + r_ * sh0_b + u * sh0_k, mask=step & (u_step == T - 1),
                     other=0.0).to(tl.float32)
    if u_step == T:
        tl.store(dh0_ptr + r_ * sdh0_b + u * sdh0_k, dh1.to(dh0_ptr.dtype.element_ty), mask=mask)
    else:
        dh1 += dh_in
        dar, daz, dan, dhd = gru_cell_backward(dh1, r, z, n, ghn, h)
        if HAS_BS:
            live = (rows < tl.load(bs_ptr + t))[:, None]
            dar = tl.where(live, dar, 0.0)
            daz = tl.where(live, daz, 0.0)
            dan = tl.where(live, dan, 0.0)
            dhd = tl.where(live, dhd, dh1)
        if IN_WS:
            store_gates(ws_ptr + t * sw_t + r_ * sw_b, u, sw_k, H, mask,
                        (dar, daz, dan * r, dan))
        else:
            store_gates(dgi_ptr + t * sgi_t + r_ * sgi_b, u, sgi_k, H, mask, (dar, daz, dan))
            store_gates(dgh_ptr + t * sgh_t + r_ * sgh_b, u, sgh_k, H, mask,
                        (dar, daz, dan * r))
        if BCAST:
            # the copy of dgh the next step's product reads, rounded to W_hh's dtype (rows of
            # K = 3H contiguous columns: gate q of unit u at q*H + u)
            store_gates(bcast_ptr + now * B * (3 * H) + r_ * (3 * H) + u, 0, 1, H, mask,
                        (dar, daz, dan * r))
        tl.store(run_ptr + now * srn_p + r_ * srn_b + u * srn_k, dhd, mask=mask)


# the step range changes every launch of the step-by-step path: one compiled kernel for all
@triton.jit(do_not_specialize=["step_begin", "step_end"])
def gru_layer_bwd(
    ws_ptr, out_ptr, h0_ptr, whh_ptr, dout_ptr, dhn_ptr, bs_ptr, dgi_ptr, dgh_ptr, run_ptr,
    dh0_ptr, sync_ptr,
    T, B, H,
    sw_t, sw_b, sw_k,            # ws (T, B, 4H) fp32 from the forward: r, z, n, gh_n
    so_t, so_b, so_k,            # out (T, B, H): h_t (the state each step started from)
    sh0_b, sh0_k,                # h0 (B, H)
    swh_r, swh_k,                # w_hh (3H, H)
    sdo_t, sdo_b, sdo_k,         # d out (T, B, H)
    sdhn_b, sdhn_k,              # d h_n (B, H)
    sgi_t, sgi_b, sgi_k,         # dgi (T, B, 3H) fp32 (written)
    sgh_t, sgh_b, sgh_k,         # dgh (T, B, 3H) fp32 (written)
    srn_p, srn_b, srn_k,         # workspace (planes, B, H) fp32: the direct part dhd by step
                                 # parity in planes 0, 1; then the 16-bit broadcast and the
                                 # split partials (kernels/triton/rnn.py step_workspace)
    sdh0_b, sdh0_k,              # dh0 (B, H) (the pseudo-step u = T)
    step_begin, step_end,        # this launch's steps (last: they change per launch)
    REVERSE: tl.constexpr, HAS_H0: tl.constexpr, HAS_DOUT: tl.constexpr,
    HAS_DHN: tl.constexpr, HAS_BS: tl.constexpr, GRID_SYNC: tl.constexpr,
    BCAST: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
    IN_WS: tl.constexpr = False,
):
    """BPTT steps step_begin <= u < step_end (u = T: the dh0 pseudo-step) of one direction;
    tiles, K splits, grid and BCAST as kernels/triton/lstm.py lstm_layer_bwd; IN_WS: the
    gradients in place of the activations (_bwd_cell)."""
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    n_tiles = tl.cdiv(B, BLOCK_B) * tl.cdiv(H, BLOCK_H) * SPLIT
    for u_step in range(step_begin, step_end):
        s = T - 1 - u_step
        t = step_time(s, T, REVERSE)
        tn = step_time(s + 1, T, REVERSE)
        tp = step_time(s - 1, T, REVERSE)
        for tile in range(pid, n_tiles, NP):
            backward_tile(_bwd_cell, tile, u_step, dgh_ptr, tn, sgh_t, sgh_b, sgh_k, whh_ptr,
                          swh_r, swh_k, run_ptr, srn_p, sync_ptr, B, H, 3 * H,
                          (u_step, t, tp, ws_ptr, out_ptr, h0_ptr, dout_ptr, dhn_ptr, bs_ptr,
                           dgi_ptr, dgh_ptr, run_ptr, dh0_ptr, T, B, H, sw_t, sw_b, sw_k,
                           so_t, so_b, so_k, sh0_b, sh0_k, sdo_t, sdo_b, sdo_k, sdhn_b, sdhn_k,
                           sgi_t, sgi_b, sgi_k, sgh_t, sgh_b, sgh_k, srn_p, srn_b, srn_k,
                           sdh0_b, sdh0_k, HAS_H0, HAS_DOUT, HAS_DHN, HAS_BS, BCAST, IN_WS),
                          PRECISION, BCAST, SPLIT, CHUNK, BLOCK_B, BLOCK_H, BLOCK_K)
        step_sync(sync_ptr, u_step, step_begin, step_end, NP, GRID_SYNC)
    if GRID_SYNC:
        grid_exit(sync_ptr)
