"""Triton kernels for the LSTM: the fused cell / time step, its gate gradients, the persistent
layer (one launch for a whole sequence), and the batched GEMM the layer's projections and
weight gradients run on.

Layout and gate order are PyTorch's: w_ih (4H, I) and w_hh (4H, H) stack the gates as rows
[i; f; g; o]; rows of x / h / c are batch rows. Every tensor comes with its strides, so the
(T, B, F) view of a batch_first input, a direction's half of a bidirectional output and
transposed weights need no copy. Offsets are computed in int64.

Forward of one step, for a tile of BLOCK_B batch rows x BLOCK_H hidden units:

    a_q = x W_ih[q]^T + h W_hh[q]^T (+ xp[:, q]) (+ b_ih[q] + b_hh[q])      q in i, f, g, o
    i, f, o = sigmoid(a_i, a_f, a_o)   g = tanh(a_g)
    c1 = f * c + i * g                 h1 = o * tanh(c1)

Each program loads the four gate blocks of the weights for the same hidden units (rows
q*H + u), so it owns whole units and the cell update needs nothing from other programs. The
gate activations (i, f, g, o) are written to an fp32 workspace for the backward, as is c1.
The backward step (lstm_step_bwd) mirrors it: the recurrent GEMM dh = dg_next W_hh is the
prologue of the elementwise gate-gradient kernel, so one launch per step each way.

With projections (torch's proj_size P) h has P columns and W_hh is (4H, P): the forward
step's recurrent product runs over K = P and h1 is the unprojected m = o * tanh(c1); the
layer projects it (h = m W_hr^T) with a GEMM. Its backward step takes W_hh W_hr (4H, H) in
place of W_hh, so the kernel is the same (see pydl/lstm.py LSTMRecurrence.backward).

Numerics: accumulation is fp32 whatever the dtype; sigmoid and tanh only ever take exp of
-|a| (no overflow for any input; NaN propagates). fp32 dots use INPUT_PRECISION ("tf32" or
"ieee", chosen by the launcher from torch's cuDNN setting, as cuDNN's LSTM would round).
"""
import triton
import triton.language as tl


@triton.jit
def _sigmoid(a):
    """1 / (1 + exp(-a)) without overflow: exp is only taken of -|a|."""
    e = tl.exp(-tl.abs(a))
    return tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _tanh(a):
    """tanh(a) = sign(a) (1 - e) / (1 + e) with e = exp(-2|a|) <= 1: no overflow."""
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a >= 0, t, -t)


@triton.jit
def _gate_dots(a_ptr, w_ptr, rows, r_ok, units, u_ok, K, H, sa_b, sa_k, sw_r, sw_k,
               acc_i, acc_f, acc_g, acc_o,
               INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc_q += A[rows, :] @ W[q*H + units, :]^T for the four gates q: one A tile per K step,
    shared by the four dots."""
    for k0 in range(0, K, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * sa_b + k[None, :] * sa_k,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & u_ok[None, :]
        w_col = w_ptr + k[:, None] * sw_k
        w = tl.load(w_col + units[None, :] * sw_r, mask=w_mask, other=0.0)
        acc_i = tl.dot(a, w, acc_i, input_precision=INPUT_PRECISION)
        w = tl.load(w_col + (units + H)[None, :] * sw_r, mask=w_mask, other=0.0)
        acc_f = tl.dot(a, w, acc_f, input_precision=INPUT_PRECISION)
        w = tl.load(w_col + (units + 2 * H)[None, :] * sw_r, mask=w_mask, other=0.0)
        acc_g = tl.dot(a, w, acc_g, input_precision=INPUT_PRECISION)
        w = tl.load(w_col + (units + 3 * H)[None, :] * sw_r, mask=w_mask, other=0.0)
        acc_o = tl.dot(a, w, acc_o, input_precision=INPUT_PRECISION)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _recurrent_dh(dgn_ptr, whh_ptr, rows, r_ok, units, u_ok, K, sdgn_b, sdgn_k, swh_r, swh_k,
                  dh, INPUT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """dh += dg_next[rows, :] @ W_hh[:, units] over the K = gates*H rows of W_hh: the gradient
    reaching h from the step that ran next (the recurrent GEMM of backpropagation through
    time, used as the prologue of the gate-gradient kernels). dg_next is fp32, so W_hh is
    widened to fp32 and the product runs at INPUT_PRECISION."""
    for k0 in range(0, K, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = k < K
        a = tl.load(dgn_ptr + rows[:, None] * sdgn_b + k[None, :] * sdgn_k,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(whh_ptr + k[:, None] * swh_r + units[None, :] * swh_k,
                    mask=k_ok[:, None] & u_ok[None, :], other=0.0).to(tl.float32)
        dh = tl.dot(a, w, dh, input_precision=INPUT_PRECISION)
    return dh


@triton.jit
def lstm_step_fwd(
    x_ptr, wih_ptr, xp_ptr, bih_ptr, bhh_ptr, h_ptr, c_ptr, whh_ptr,
    h1_ptr, c1_ptr, hn_ptr, cn_ptr, gates_ptr,
    B, I, H, P,                  # P: the width of h (H, or proj_size with projections)
    sx_b, sx_k,                  # x (B, I)
    swi_r, swi_k,                # w_ih (4H, I)
    sxp_b, sxp_k,                # xp (B, 4H): precomputed input part (x W_ih^T + b_ih)
    sh_b, sh_k, sc_b, sc_k,      # h (B, P), c (B, H): previous state
    swh_r, swh_k,                # w_hh (4H, P)
    sh1_b, sh1_k, sc1_b, sc1_k,  # h1, c1 (B, H): new state (c1 is the fp32 workspace copy)
    shn_b, shn_k, scn_b, scn_k,  # hn, cn (B, H): second copies of h1 / c1 (other dtype/place)
    sg_b, sg_k,                  # gates (B, 4H): fp32 activations i, f, g, o
    HAS_X: tl.constexpr,         # compute x @ W_ih^T here (the cell)
    HAS_XP: tl.constexpr,        # add the precomputed xp (a layer's time step)
    HAS_BIH: tl.constexpr, HAS_BHH: tl.constexpr,
    HAS_H: tl.constexpr, HAS_C: tl.constexpr,   # False: a zero initial state (never read)
    WRITE_HN: tl.constexpr, WRITE_CN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One fused LSTM step; grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H))."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    units = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if HAS_X:
        acc_i, acc_f, acc_g, acc_o = _gate_dots(
            x_ptr, wih_ptr, rows, r_ok, units, u_ok, I, H, sx_b, sx_k, swi_r, swi_k,
            acc_i, acc_f, acc_g, acc_o, INPUT_PRECISION, BLOCK_K)
    if HAS_H:
        acc_i, acc_f, acc_g, acc_o = _gate_dots(
            h_ptr, whh_ptr, rows, r_ok, units, u_ok, P, H, sh_b, sh_k, swh_r, swh_k,
            acc_i, acc_f, acc_g, acc_o, INPUT_PRECISION, BLOCK_K)
    if HAS_XP:
        xp = xp_ptr + rows[:, None] * sxp_b
        acc_i += tl.load(xp + units[None, :] * sxp_k, mask=mask, other=0.0).to(tl.float32)
        acc_f += tl.load(xp + (units + H)[None, :] * sxp_k, mask=mask, other=0.0).to(tl.float32)
        acc_g += tl.load(xp + (units + 2 * H)[None, :] * sxp_k, mask=mask, other=0.0).to(tl.float32)
        acc_o += tl.load(xp + (units + 3 * H)[None, :] * sxp_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIH:
        acc_i += tl.load(bih_ptr + units, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        acc_f += tl.load(bih_ptr + units + H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(bih_ptr + units + 2 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        acc_o += tl.load(bih_ptr + units + 3 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BHH:
        acc_i += tl.load(bhh_ptr + units, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        acc_f += tl.load(bhh_ptr + units + H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(bhh_ptr + units + 2 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
        acc_o += tl.load(bhh_ptr + units + 3 * H, mask=u_ok, other=0.0).to(tl.float32)[None, :]
    i = _sigmoid(acc_i)
    f = _sigmoid(acc_f)
    g = _tanh(acc_g)
    o = _sigmoid(acc_o)
    if HAS_C:
        c = tl.load(c_ptr + rows[:, None] * sc_b + units[None, :] * sc_k, mask=mask,
                    other=0.0).to(tl.float32)
        c1 = f * c + i * g
    else:
        c1 = i * g
    h1 = o * _tanh(c1)
    tl.store(h1_ptr + rows[:, None] * sh1_b + units[None, :] * sh1_k,
             h1.to(h1_ptr.dtype.element_ty), mask=mask)
    tl.store(c1_ptr + rows[:, None] * sc1_b + units[None, :] * sc1_k,
             c1.to(c1_ptr.dtype.element_ty), mask=mask)
    if WRITE_HN:
        tl.store(hn_ptr + rows[:, None] * shn_b + units[None, :] * shn_k,
                 h1.to(hn_ptr.dtype.element_ty), mask=mask)
    if WRITE_CN:
        tl.store(cn_ptr + rows[:, None] * scn_b + units[None, :] * scn_k,
                 c1.to(cn_ptr.dtype.element_ty), mask=mask)
    gp = gates_ptr + rows[:, None] * sg_b
    tl.store(gp + units[None, :] * sg_k, i, mask=mask)
    tl.store(gp + (units + H)[None, :] * sg_k, f, mask=mask)
    tl.store(gp + (units + 2 * H)[None, :] * sg_k, g, mask=mask)
    tl.store(gp + (units + 3 * H)[None, :] * sg_k, o, mask=mask)


@triton.jit
def lstm_step_bwd(
    gates_ptr, cprev_ptr, c1_ptr, dgn_ptr, whh_ptr, dha_ptr, dhb_ptr, dc_ptr, dg_ptr, dcprev_ptr,
    B, H,
    sg_b, sg_k,                  # gates (B, 4H) fp32: i, f, g, o saved by the forward
    scp_b, scp_k,                # c (B, H): the state the step started from
    sc1_b, sc1_k,                # c1 (B, H): the state it produced (fp32 workspace)
    sdgn_b, sdgn_k,              # dg of the step that ran next (B, 4H) fp32
    swh_r, swh_k,                # w_hh (4H, H)
    sda_b, sda_k, sdb_b, sdb_k,  # two more addends of dh1 (d h_n, the output gradient)
    sdc_b, sdc_k,                # dc1 (B, H): gradient reaching c1 from the next step
    sdg_b, sdg_k,                # dg (B, 4H): gradient of the pre-activations (written)
    sdcp_b, sdcp_k,              # dc (B, H): gradient of c (written; may alias dc1)
    HAS_CPREV: tl.constexpr, HAS_DGN: tl.constexpr, HAS_DHA: tl.constexpr,
    HAS_DHB: tl.constexpr, HAS_DC: tl.constexpr, WRITE_DCPREV: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One step of backpropagation through time, fused; grid (cdiv(B, BLOCK_B), cdiv(H, BLOCK_H)).

        dh1 = dg_next W_hh (+ dha) (+ dhb)          the recurrent part: a GEMM prologue
        dc_tot = dc1 + dh1 * o * (1 - tanh(c1)^2)
        da_i = dc_tot g i (1 - i)   da_f = dc_tot c f (1 - f)
        da_g = dc_tot i (1 - g^2)   da_o = dh1 tanh(c1) o (1 - o)      dc = dc_tot f

    Each program owns whole hidden units (all four gates of them), as in the forward: its
    dh1 columns need every gate of dg_next (all of it was written by the previous launch)
    and W_hh's columns of its units. dg_next is fp32, so the product runs in fp32
    (INPUT_PRECISION). Without dg_next (the cell, or the last step of a sequence) this is a
    purely elementwise kernel. Every element of dc is read and then written by the same
    program, so dc may alias dc1 (the backward keeps one running dc buffer).
    """
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    units = (tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)).to(tl.int64)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r = rows[:, None]
    u = units[None, :]
    dh = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if HAS_DGN:
        dh = _recurrent_dh(dgn_ptr, whh_ptr, rows, r_ok, units, u_ok, 4 * H, sdgn_b, sdgn_k,
                           swh_r, swh_k, dh, INPUT_PRECISION, BLOCK_K)
    if HAS_DHA:
        dh += tl.load(dha_ptr + r * sda_b + u * sda_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_DHB:
        dh += tl.load(dhb_ptr + r * sdb_b + u * sdb_k, mask=mask, other=0.0).to(tl.float32)
    gp = gates_ptr + r * sg_b
    i = tl.load(gp + u * sg_k, mask=mask, other=0.0)
    f = tl.load(gp + (u + H) * sg_k, mask=mask, other=0.0)
    g = tl.load(gp + (u + 2 * H) * sg_k, mask=mask, other=0.0)
    o = tl.load(gp + (u + 3 * H) * sg_k, mask=mask, other=0.0)
    tc = _tanh(tl.load(c1_ptr + r * sc1_b + u * sc1_k, mask=mask, other=0.0).to(tl.float32))
    dct = dh * o * (1.0 - tc * tc)
    if HAS_DC:
        dct += tl.load(dc_ptr + r * sdc_b + u * sdc_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_CPREV:
        c = tl.load(cprev_ptr + r * scp_b + u * scp_k, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    dgp = dg_ptr + r * sdg_b
    ty = dg_ptr.dtype.element_ty
    tl.store(dgp + u * sdg_k, (dct * g * i * (1.0 - i)).to(ty), mask=mask)
    tl.store(dgp + (u + H) * sdg_k, (dct * c * f * (1.0 - f)).to(ty), mask=mask)
    tl.store(dgp + (u + 2 * H) * sdg_k, (dct * i * (1.0 - g * g)).to(ty), mask=mask)
    tl.store(dgp + (u + 3 * H) * sdg_k, (dh * tc * o * (1.0 - o)).to(ty), mask=mask)
    if WRITE_DCPREV:
        tl.store(dcprev_ptr + r * sdcp_b + u * sdcp_k,
                 (dct * f).to(dcprev_ptr.dtype.element_ty), mask=mask)


# --- persistent layer: one launch loops over time ------------------------------------------

@triton.jit
def lstm_persistent_fwd(
    xp_ptr, bhh_ptr, h0_ptr, c0_ptr, whh_ptr, out_ptr, cs_ptr, gates_ptr, hn_ptr, cn_ptr,
    T, B, H,
    sxp_t, sxp_b, sxp_k,         # xp (T, B, 4H): x_t W_ih^T + b_ih for every step
    sh0_b, sh0_k, sc0_b, sc0_k,  # h0, c0 (B, H)
    swh_r, swh_k,                # w_hh (4H, H)
    so_t, so_b, so_k,            # out (T, B, H): this direction's h_t
    scs_t, scs_b, scs_k,         # cs (T, B, H) fp32: c_t
    sg_t, sg_b, sg_k,            # gates (T, B, 4H) fp32
    shn_b, shn_k, scn_b, scn_k,  # h_n, c_n (B, H)
    REVERSE: tl.constexpr, HAS_BHH: tl.constexpr, HAS_H0: tl.constexpr, HAS_C0: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """A whole direction of a layer in one launch; grid (cdiv(B, BLOCK_B),).

    Batch rows are independent through time, so each program owns BLOCK_B rows and ALL
    hidden units (BLOCK_H >= H): no program ever needs another's h_t, and no grid-wide
    synchronisation is needed between steps. W_hh (four BLOCK_H x BLOCK_H tiles), h and c
    stay in registers for the whole sequence; only xp[t] is read and out/cs/gates written per
    step. This is why H is capped (the launcher allows BLOCK_H <= 64). h is rounded to the
    output dtype before it feeds the next step, exactly as the per-step path, which reads it
    back from the output.
    """
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    units = tl.arange(0, BLOCK_H).to(tl.int64)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r = rows[:, None]
    u = units[None, :]
    k = units[:, None]                       # the reduction index of h @ W^T
    w_mask = u_ok[:, None] & u_ok[None, :]
    w_i = tl.load(whh_ptr + k * swh_k + u * swh_r, mask=w_mask, other=0.0)
    w_f = tl.load(whh_ptr + k * swh_k + (u + H) * swh_r, mask=w_mask, other=0.0)
    w_g = tl.load(whh_ptr + k * swh_k + (u + 2 * H) * swh_r, mask=w_mask, other=0.0)
    w_o = tl.load(whh_ptr + k * swh_k + (u + 3 * H) * swh_r, mask=w_mask, other=0.0)
    b_i = tl.zeros([1, BLOCK_H], tl.float32)
    b_f = tl.zeros([1, BLOCK_H], tl.float32)
    b_g = tl.zeros([1, BLOCK_H], tl.float32)
    b_o = tl.zeros([1, BLOCK_H], tl.float32)
    if HAS_BHH:
        b_i += tl.load(bhh_ptr + u, mask=u_ok[None, :], other=0.0).to(tl.float32)
        b_f += tl.load(bhh_ptr + u + H, mask=u_ok[None, :], other=0.0).to(tl.float32)
        b_g += tl.load(bhh_ptr + u + 2 * H, mask=u_ok[None, :], other=0.0).to(tl.float32)
        b_o += tl.load(bhh_ptr + u + 3 * H, mask=u_ok[None, :], other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + r * sh0_b + u * sh0_k, mask=mask, other=0.0).to(out_ptr.dtype.element_ty)
    else:
        h = tl.zeros([BLOCK_B, BLOCK_H], out_ptr.dtype.element_ty)
    if HAS_C0:
        c = tl.load(c0_ptr + r * sc0_b + u * sc0_k, mask=mask, other=0.0).to(tl.float32)
    else:
        c = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    for s in range(T):
        if REVERSE:
            t = tl.cast(T - 1 - s, tl.int64)
        else:
            t = tl.cast(s, tl.int64)
        xp = xp_ptr + t * sxp_t + r * sxp_b
        a_i = tl.load(xp + u * sxp_k, mask=mask, other=0.0).to(tl.float32) + b_i
        a_f = tl.load(xp + (u + H) * sxp_k, mask=mask, other=0.0).to(tl.float32) + b_f
        a_g = tl.load(xp + (u + 2 * H) * sxp_k, mask=mask, other=0.0).to(tl.float32) + b_g
        a_o = tl.load(xp + (u + 3 * H) * sxp_k, mask=mask, other=0.0).to(tl.float32) + b_o
        a_i = tl.dot(h, w_i, a_i, input_precision=INPUT_PRECISION)
        a_f = tl.dot(h, w_f, a_f, input_precision=INPUT_PRECISION)
        a_g = tl.dot(h, w_g, a_g, input_precision=INPUT_PRECISION)
        a_o = tl.dot(h, w_o, a_o, input_precision=INPUT_PRECISION)
        i = _sigmoid(a_i)
        f = _sigmoid(a_f)
        g = _tanh(a_g)
        o = _sigmoid(a_o)
        c = f * c + i * g
        c = tl.where(mask, c, 0.0)          # padded units stay exactly zero
        h = tl.where(mask, o * _tanh(c), 0.0).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + t * so_t + r * so_b + u * so_k, h, mask=mask)
        tl.store(cs_ptr + t * scs_t + r * scs_b + u * scs_k, c, mask=mask)
        gp = gates_ptr + t * sg_t + r * sg_b
        tl.store(gp + u * sg_k, i, mask=mask)
        tl.store(gp + (u + H) * sg_k, f, mask=mask)
        tl.store(gp + (u + 2 * H) * sg_k, g, mask=mask)
        tl.store(gp + (u + 3 * H) * sg_k, o, mask=mask)
    tl.store(hn_ptr + r * shn_b + u * shn_k, h.to(hn_ptr.dtype.element_ty), mask=mask)
    tl.store(cn_ptr + r * scn_b + u * scn_k, c.to(cn_ptr.dtype.element_ty), mask=mask)


@triton.jit
def lstm_persistent_bwd(
    gates_ptr, cs_ptr, c0_ptr, whh_ptr, dout_ptr, dhn_ptr, dcn_ptr, dg_ptr, dh0_ptr, dc0_ptr,
    T, B, H,
    sg_t, sg_b, sg_k,            # gates (T, B, 4H) fp32 from the forward
    scs_t, scs_b, scs_k,         # cs (T, B, H) fp32: c_t
    sc0_b, sc0_k,                # c0 (B, H)
    swh_r, swh_k,                # w_hh (4H, H)
    sdo_t, sdo_b, sdo_k,         # d out (T, B, H): this direction's output gradient
    sdhn_b, sdhn_k, sdcn_b, sdcn_k,
    sdg_t, sdg_b, sdg_k,         # dg (T, B, 4H) fp32 (written)
    sdh0_b, sdh0_k, sdc0_b, sdc0_k,
    REVERSE: tl.constexpr, HAS_C0: tl.constexpr, HAS_DOUT: tl.constexpr,
    HAS_DHN: tl.constexpr, HAS_DCN: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Backward through time of one direction in one launch (grid as the forward): walks the
    steps in the reverse of the order they ran, dh and dc in registers, dh = dg @ W_hh with
    W_hh in registers (in fp32: dg is fp32). Writes dg for every step (the weight gradients
    are GEMMs over it afterwards) and dh0, dc0."""
    rows = (tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    units = tl.arange(0, BLOCK_H).to(tl.int64)
    r_ok = rows < B
    u_ok = units < H
    mask = r_ok[:, None] & u_ok[None, :]
    r = rows[:, None]
    u = units[None, :]
    j = units[:, None]                       # dh[b, k] = sum_q sum_j dg_q[b, j] W[qH + j, k]
    w_mask = u_ok[:, None] & u_ok[None, :]
    w_i = tl.load(whh_ptr + j * swh_r + u * swh_k, mask=w_mask, other=0.0).to(tl.float32)
    w_f = tl.load(whh_ptr + (j + H) * swh_r + u * swh_k, mask=w_mask, other=0.0).to(tl.float32)
    w_g = tl.load(whh_ptr + (j + 2 * H) * swh_r + u * swh_k, mask=w_mask, other=0.0).to(tl.float32)
    w_o = tl.load(whh_ptr + (j + 3 * H) * swh_r + u * swh_k, mask=w_mask, other=0.0).to(tl.float32)
    dh = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    dc = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if HAS_DHN:
        dh += tl.load(dhn_ptr + r * sdhn_b + u * sdhn_k, mask=mask, other=0.0).to(tl.float32)
    if HAS_DCN:
        dc += tl.load(dcn_ptr + r * sdcn_b + u * sdcn_k, mask=mask, other=0.0).to(tl.float32)
    for s in range(T):
        # the step that ran last comes first
        if REVERSE:
            t = tl.cast(s, tl.int64)
            tp = t + 1                       # the step before it in run order
        else:
            t = tl.cast(T - 1 - s, tl.int64)
            tp = t - 1
        if HAS_DOUT:
            dh += tl.load(dout_ptr + t * sdo_t + r * sdo_b + u * sdo_k, mask=mask,
                          other=0.0).to(tl.float32)
        gp = gates_ptr + t * sg_t + r * sg_b
        i = tl.load(gp + u * sg_k, mask=mask, other=0.0)
        f = tl.load(gp + (u + H) * sg_k, mask=mask, other=0.0)
        g = tl.load(gp + (u + 2 * H) * sg_k, mask=mask, other=0.0)
        o = tl.load(gp + (u + 3 * H) * sg_k, mask=mask, other=0.0)
        tc = _tanh(tl.load(cs_ptr + t * scs_t + r * scs_b + u * scs_k, mask=mask, other=0.0))
        if s == T - 1:
            if HAS_C0:
                c = tl.load(c0_ptr + r * sc0_b + u * sc0_k, mask=mask, other=0.0).to(tl.float32)
            else:
                c = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
        else:
            c = tl.load(cs_ptr + tp * scs_t + r * scs_b + u * scs_k, mask=mask, other=0.0)
        dct = dc + dh * o * (1.0 - tc * tc)
        d_i = tl.where(mask, dct * g * i * (1.0 - i), 0.0)
        d_f = tl.where(mask, dct * c * f * (1.0 - f), 0.0)
        d_g = tl.where(mask, dct * i * (1.0 - g * g), 0.0)
        d_o = tl.where(mask, dh * tc * o * (1.0 - o), 0.0)
        dgp = dg_ptr + t * sdg_t + r * sdg_b
        tl.store(dgp + u * sdg_k, d_i, mask=mask)
        tl.store(dgp + (u + H) * sdg_k, d_f, mask=mask)
        tl.store(dgp + (u + 2 * H) * sdg_k, d_g, mask=mask)
        tl.store(dgp + (u + 3 * H) * sdg_k, d_o, mask=mask)
        dc = dct * f
        dh = tl.dot(d_i, w_i, input_precision=INPUT_PRECISION)
        dh = tl.dot(d_f, w_f, dh, input_precision=INPUT_PRECISION)
        dh = tl.dot(d_g, w_g, dh, input_precision=INPUT_PRECISION)
        dh = tl.dot(d_o, w_o, dh, input_precision=INPUT_PRECISION)
    tl.store(dh0_ptr + r * sdh0_b + u * sdh0_k, dh.to(dh0_ptr.dtype.element_ty), mask=mask)
    tl.store(dc0_ptr + r * sdc0_b + u * sdc0_k, dc.to(dc0_ptr.dtype.element_ty), mask=mask)


# --- GEMM, bias gradient, elementwise product ----------------------------------------------

@triton.jit
def gemm_batched(
    a_ptr, b_ptr, cin_ptr, out_ptr, bias_ptr,
    M, N, K, BATCH, B2C, N_RED,
    sa_1, sa_2, sa_m, sa_k,      # A (B1, B2, M, K); a broadcast batch axis has stride 0
    sb_1, sb_2, sb_k, sb_n,      # B (B1, B2, K, N)
    sc_1, sc_2, sc_m, sc_n,      # c_in (B1, B2C, M, N), read when ACCUMULATE
    so_1, so_2, so_m, so_n,      # out (B1, B2C, M, N)
    sbias_1, sbias_n,            # bias (B1 or 1, N)
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b1, b2] = A[b1, b2] @ B[b1, b2] (+ c_in[b1, b2]) (+ bias[b1] on every row).

    BATCH = B1 * B2C output matrices. When N_RED > 1 (B2C = 1) the B2 axis of the operands is
    summed into the one output: C[b1] = sum_b2 A[b1, b2] @ B[b1, b2] -- the weight gradients
    of a layer, summed over time steps whose (t, b) rows need not merge into one stride.
    Grid (tiles of M x tiles of N, min(BATCH, 65535)); axis 1 loops over the batches.
    DOT_F32: operands of different dtypes (an fp32 gradient times fp16 weights) or fp32 ones
    are multiplied in fp32 (INPUT_PRECISION); two fp16/bf16 operands use the tensor cores.
    """
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    m = ((pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    n = ((pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = m < M
    n_ok = n < N
    for z in range(tl.program_id(1), BATCH, tl.num_programs(1)):
        b1 = (z // B2C).to(tl.int64)
        b2c = (z % B2C).to(tl.int64)
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for red in range(N_RED):
            b2 = b2c + red
            a_base = a_ptr + b1 * sa_1 + b2 * sa_2 + m[:, None] * sa_m
            b_base = b_ptr + b1 * sb_1 + b2 * sb_2 + n[None, :] * sb_n
            for k0 in range(0, K, BLOCK_K):
                k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
                k_ok = k < K
                a = tl.load(a_base + k[None, :] * sa_k, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_base + k[:, None] * sb_k, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                if DOT_F32:
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        mask = m_ok[:, None] & n_ok[None, :]
        if ACCUMULATE:
            acc += tl.load(cin_ptr + b1 * sc_1 + b2c * sc_2 + m[:, None] * sc_m + n[None, :] * sc_n,
                           mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + b1 * sbias_1 + n * sbias_n, mask=n_ok,
                           other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + b1 * so_1 + b2c * so_2 + m[:, None] * so_m + n[None, :] * so_n,
                 acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def bias_grad(
    dg_ptr, db1_ptr, db2_ptr, T, B, N,
    sdg_t, sdg_b, sdg_n,         # dg (T, B, N)
    WRITE_DB2: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """db[n] = sum over (t, b) of dg[t, b, n], written to db1 (and db2: b_ih and b_hh get the
    same gradient); grid (cdiv(N, BLOCK_N),)."""
    n = (tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    n_ok = n < N
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for r0 in range(0, T * B, BLOCK_R):
        rr = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        off = (rr // B) * sdg_t + (rr % B) * sdg_b
        acc += tl.load(dg_ptr + off[:, None] + n[None, :] * sdg_n,
                       mask=(rr < T * B)[:, None] & n_ok[None, :], other=0.0).to(tl.float32)
    db = tl.sum(acc, 0)
    tl.store(db1_ptr + n, db.to(db1_ptr.dtype.element_ty), mask=n_ok)
    if WRITE_DB2:
        tl.store(db2_ptr + n, db.to(db2_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def mul_3d(
    x_ptr, s_ptr, y_ptr, D0, D1, D2,
    sx_0, sx_1, sx_2, ss_0, ss_1, ss_2, sy_0, sy_1, sy_2,
    BLOCK: tl.constexpr,
):
    """y = x * s elementwise over (D0, D1, D2) arrays of any strides (dropout with a drawn
    mask of 0 and 1/(1-p)); y may alias x. Grid (cdiv(D0 * D1 * D2, BLOCK),)."""
    e = (tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK))
    ok = e < D0 * D1 * D2
    i0 = e // (D1 * D2)
    i1 = (e // D2) % D1
    i2 = e % D2
    x = tl.load(x_ptr + i0 * sx_0 + i1 * sx_1 + i2 * sx_2, mask=ok, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + i0 * ss_0 + i1 * ss_1 + i2 * ss_2, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + i0 * sy_0 + i1 * sy_1 + i2 * sy_2, (x * s).to(y_ptr.dtype.element_ty), mask=ok)
