"""Triton kernels for the GRU (torch.nn.GRUCell and torch.nn.GRU): the fused step forward and
its gate gradients (with the recurrent GEMM of backpropagation through time as a prologue).

Gate order and layout are PyTorch's: w_ih (3H, I) and w_hh (3H, H) stack [r; z; n] as rows.

    gi = x W_ih^T + b_ih     gh = h W_hh^T + b_hh      (each split as [r z n])
    r = sigmoid(gi_r + gh_r)   z = sigmoid(gi_z + gh_z)   n = tanh(gi_n + r * gh_n)
    h1 = (1 - z) * n + z * h

The forward is one kernel, structured as the LSTM step (kernels/triton/lstm.py): each
program owns BLOCK_B rows x BLOCK_H hidden units and runs the h-product (and, for the cell,
the x-product; a layer passes gi for all steps precomputed by one GEMM, as xp) for the three
gate blocks of its units, then the update in registers. gi_n and gh_n stay separate (b_hh's
n part sits inside r * (...)). It saves r, z, n and gh_n (4H fp32 a row).
The backward step writes the pre-activation gradients of both products,

    dh1 = dg_next W_hh + (the incoming terms: d h_n, the output gradient, the direct part)
    da_n = dh1 (1 - z) (1 - n^2)   da_r = da_n gh_n r (1 - r)   da_z = dh1 (h - n) z (1 - z)
    dgi = [da_r, da_z, da_n]       dgh = [da_r, da_z, da_n * r]     dh_direct = dh1 * z

where dg_next is the dgh of the step that ran next (the prologue GEMM, shared with the LSTM's
backward step) and dh_direct feeds the previous step's dh1 directly (h1 = ... + z * h). The
launcher finishes with GEMMs: dx = dgi W_ih, dW_ih = dgi^T x, dW_hh = dgh^T h, the first
state's dh = dgh W_hh + dh_direct, db_ih / db_hh = column sums of dgi / dgh.
"""
import triton
import triton.language as tl

from .lstm import _recurrent_dh, _sigmoid, _tanh


@triton.jit
def _gate_dots3(a_ptr, w_ptr, rows, r_ok, units, u_ok, K, H, sa_b, sa_k, sw_r, sw_k,
                acc_r, acc_z, acc_n, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc_q += A[rows, :] @ W[q*H + units, :]^T for the three gates q, one A tile per K step."""
    for k0 in range(0, K, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * sa_b + k[None, :] * sa_k,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & u_ok[None, :]
        w_col = w_ptr + k[:, None] * sw_k
        w = tl.load(w_col + units[None, :] * sw_r, mask=w_mask, other=0.0)
        acc_r = tl.dot(a, w, acc_r, input_precision=INPUT_PRECISION)
        w = tl.load(w_col + (units + H)[None, :] * sw_r, mask=w_mask, other=0.0)
        acc_z = tl.dot(a, w, acc_z, input_precision=INPUT_PRECISION)
        w = tl.load(w_col + (units + 2 * H)[None, :] * sw_r, mask=w_mask, other=0.0)
        acc_n = tl.dot(a, w, acc_n, input_precision=INPUT_PRECISION)
    return acc_r, acc_z, acc_n


@triton.jit
def gru_step_fwd(
    x_ptr, wih_ptr, xp_ptr, bih_ptr, h_ptr, whh_ptr, bhh_ptr, h1_ptr, hn_ptr, ws_ptr,
    B, I, H,
    sx_b, sx_k, swi_r, swi_k,    # x (B, I), w_ih (3H, I)
    sxp_b, sxp_k,                # xp (B, 3H): precomputed input part (x W_ih^T + b_ih)
    sh_b, sh_k, swh_r, swh_k,    # h (B, H), w_hh (3H, H)
    sh1_b, sh1_k,                # h1 (B, H)
    shn_b, shn_k,                # hn (B, H): a second copy of h1 (h_n of a layer)
    sws_b, sws_k,                # workspace (B, 4H) fp32: r, z, n, gh_n
    HAS_X: tl.constexpr,         # compute x @ W_ih^T here (the cell)
    HAS_XP: tl.constexpr,        # add the precomputed xp (a layer's time step)
    HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr,
    HAS_H: tl.constexpr,         # False: a zero initial state (never read)
    WRITE_HN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One fused GRU step; grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H))."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    units = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    gi_r = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    gi_z = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    gi_n = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    gh_r = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    gh_z = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    gh_n = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if HAS_X:
        gi_r, gi_z, gi_n = _gate_dots3(x_ptr, wih_ptr, rows, r_ok, units, u_ok, I, H, sx_b, sx_k,
                                       swi_r, swi_k, gi_r, gi_z, gi_n, INPUT_PRECISION, BLOCK_K)
    if HAS_H:
        gh_r, gh_z, gh_n = _gate_dots3(h_ptr, whh_ptr, rows, r_ok, units, u_ok, H, H, sh_b, sh_k,
                                       swh_r, swh_k, gh_r, gh_z, gh_n, INPUT_PRECISION, BLOCK_K)
    if HAS_XP:
        xp = xp_ptr + rows[:, None] * sxp_b
        gi_r += tl.load(xp + units[None, :] * sxp_k, mask=mask, other=0.0).to(tl.float32)
        gi_z += tl.load(xp + (units + H)[None, :] * sxp_k, mask=mask, other=0.0).to(tl.float32)
        gi_n += tl.load(xp + (units + 2 * H)[None, :] * sxp_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIH:
        gi_r += tl.load(bih_ptr + units, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        gi_z += tl.load(bih_ptr + units + H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        gi_n += tl.load(bih_ptr + units + 2 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BHH:
        gh_r += tl.load(bhh_ptr + units, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        gh_z += tl.load(bhh_ptr + units + H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        gh_n += tl.load(bhh_ptr + units + 2 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    r = _sigmoid(gi_r + gh_r)
    z = _sigmoid(gi_z + gh_z)
    n = _tanh(gi_n + r * gh_n)
    if HAS_H:
        h = tl.load(h_ptr + rows[:, None] * sh_b + units[None, :] * sh_k, mask=mask,
                    other=0.0).to(tl.float32)
        h1 = n + z * (h - n)
    else:
        h1 = n - z * n
    tl.store(h1_ptr + rows[:, None] * sh1_b + units[None, :] * sh1_k,
             h1.to(h1_ptr.dtype.element_ty), mask=mask)
    if WRITE_HN:
        tl.store(hn_ptr + rows[:, None] * shn_b + units[None, :] * shn_k,
                 h1.to(hn_ptr.dtype.element_ty), mask=mask)
    wp = ws_ptr + rows[:, None] * sws_b
    tl.store(wp + units[None, :] * sws_k, r, mask=mask)
    tl.store(wp + (units + H)[None, :] * sws_k, z, mask=mask)
    tl.store(wp + (units + 2 * H)[None, :] * sws_k, n, mask=mask)
    tl.store(wp + (units + 3 * H)[None, :] * sws_k, gh_n, mask=mask)


@triton.jit
def gru_step_bwd(
    ws_ptr, h_ptr, dgn_ptr, whh_ptr, dha_ptr, dhb_ptr, dhd_ptr, dgi_ptr, dgh_ptr, dhdo_ptr,
    B, H,
    sws_b, sws_k,                # workspace (B, 4H) fp32 from the forward: r, z, n, gh_n
    sh_b, sh_k,                  # h (B, H): the state the step started from
    sdgn_b, sdgn_k,              # dgh of the step that ran next (B, 3H) fp32
    swh_r, swh_k,                # w_hh (3H, H)
    sda_b, sda_k, sdb_b, sdb_k,  # addends of dh1 (dh1 of the cell; d h_n, the output gradient)
    sdd_b, sdd_k,                # dh_direct of the step that ran next (B, H) fp32
    sgi_b, sgi_k, sgh_b, sgh_k,  # dgi, dgh (B, 3H) fp32 (written)
    sddo_b, sddo_k,              # this step's dh_direct = dh1 * z (B, H) fp32 (written; may alias)
    HAS_H: tl.constexpr, HAS_DGN: tl.constexpr, HAS_DHA: tl.constexpr,
    HAS_DHB: tl.constexpr, HAS_DHD: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Gate gradients of one GRU step, after dh1 = dg_next W_hh (+ dha + dhb + dh_direct);
    grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)). Each program owns whole hidden units, as in
    the forward; without dg_next (the cell, the last step of a sequence) it is elementwise.
    Every element of dh_direct is read and then written by the same program, so the
    backward keeps one running buffer (dhd and dhdo alias)."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    units = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r_ = rows[:, None]
    u = units[None, :]
    dh1 = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if HAS_DGN:
        dh1 = _recurrent_dh(dgn_ptr, whh_ptr, rows, r_ok, units, u_ok, 3 * H, sdgn_b, sdgn_k,
                            swh_r, swh_k, dh1, INPUT_PRECISION, BLOCK_K)
    if HAS_DHA:
        dh1 += tl.load(dha_ptr + r_ * sda_b + u * sda_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_DHB:
        dh1 += tl.load(dhb_ptr + r_ * sdb_b + u * sdb_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_DHD:
        dh1 += tl.load(dhd_ptr + r_ * sdd_b + u * sdd_k, mask=mask, other=0.0)
    wp = ws_ptr + r_ * sws_b
    r = tl.load(wp + u * sws_k, mask=mask, other=0.0)
    z = tl.load(wp + (u + H) * sws_k, mask=mask, other=0.0)
    n = tl.load(wp + (u + 2 * H) * sws_k, mask=mask, other=0.0)
    ghn = tl.load(wp + (u + 3 * H) * sws_k, mask=mask, other=0.0)
    if HAS_H:
        h = tl.load(h_ptr + r_ * sh_b + u * sh_k, mask=mask, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    dan = dh1 * (1.0 - z) * (1.0 - n * n)
    dar = dan * ghn * r * (1.0 - r)
    daz = dh1 * (h - n) * z * (1.0 - z)
    gi = dgi_ptr + r_ * sgi_b
    tl.store(gi + u * sgi_k, dar, mask=mask)
    tl.store(gi + (u + H) * sgi_k, daz, mask=mask)
    tl.store(gi + (u + 2 * H) * sgi_k, dan, mask=mask)
    gh = dgh_ptr + r_ * sgh_b
    tl.store(gh + u * sgh_k, dar, mask=mask)
    tl.store(gh + (u + H) * sgh_k, daz, mask=mask)
    tl.store(gh + (u + 2 * H) * sgh_k, dan * r, mask=mask)
    tl.store(dhdo_ptr + r_ * sddo_b + u * sddo_k, dh1 * z, mask=mask)
