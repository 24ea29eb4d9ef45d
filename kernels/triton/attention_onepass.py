"""Single-pass attention backward (algo="flash_onepass"): five products per tile, dQ by atomics.

The flash backward (attention.py) runs FlashAttention-2's split: a dK/dV kernel (S^T, dP^T,
dV, dK: four products) and a dQ kernel that recomputes S and dP (three more). Here one program
owns a K/V tile, as in the dK/dV kernel, and also forms its share of dQ from the dS tile it
already has, adding it into an fp32 accumulator with atomics (FlashAttention-2's CUDA
backward and FlashAttention-3 do the same):

    for each query head g of the K/V head's group, for each query tile:
        S^T  = K Q^T * scale (log2 units)       P^T = exp2(S^T - lse)
        dP^T = V dO^T                            dS^T = P^T * (dP^T - delta)
        dV  += P^T dO        dK += dS^T Q        dQ_acc[rows] += (dS^T)^T K * scale  (atomic)
    dQ = dQ_acc in the input dtype (`attention_dq_convert`)

Five products instead of seven; the price is L x E fp32 atomic additions per K/V tile and
head, and a dQ whose last bits depend on the order the additions land in (not
deterministic). Tiles are key-major like the dK/dV kernel's (every product but dQ's has the
key block as rows; dQ's has the query step, which must then be 64 for wgmma). Masks only on
the tiles that can hold a hidden score (causal diagonal, partial last tiles).

Scope (the host refuses the rest): no attention mask, no dropout; causal or not, grouped-
query heads, any head dims and layouts. Inputs: the forward's lse, and the preprocess's delta
and zeroed dQ accumulator (attention.py's `attention_bwd_preprocess` with ZERO_DQ).
"""
import triton
import triton.language as tl

from .attention import (
    LOG2E,
    MASK_NONE,
    _dkdv_head,
    _key_tile,
    _load_tile,
    _store_tile,
    _tile_of_plane,
)


@triton.jit
def attention_bwd_onepass(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
    sq_b, sq_h, sq_m, sq_d,
    sk_b, sk_h, sk_n, sk_d,
    sv_b, sv_h, sv_n, sv_d,
    sdo_b, sdo_h, sdo_m, sdo_d,
    sdk_b, sdk_h, sdk_n, sdk_d,        # dK strides (B, Hkv, S, E)
    sdv_b, sdv_h, sdv_n, sdv_d,        # dV strides (B, Hkv, S, Ev)
    H, HKV, L, S, E, EV, GROUP,
    scale,
    IS_CAUSAL: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Grid (cdiv(S, BLOCK_N), B * Hkv): one K/V tile of one K/V head, over the GROUP query
    heads that read it (attention.py's dK/dV kernel with its dQ share added: DQ_ATOMIC).
    dq_acc: (B * Hq, L, E) fp32, zero on entry, dQ (scaled) on exit."""
    pid_n, b, hk, cols, d, dv, k, v = _key_tile(k_ptr, v_ptr, HKV, sk_b, sk_h, sk_n, sk_d,
                                                sv_b, sv_h, sv_n, sv_d, S, E, EV, BLOCK_N,
                                                BLOCK_D, BLOCK_DV)
    scale_log2 = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = (b * H + h).to(tl.int32)
        q_base = q_ptr + b * sq_b + h * sq_h
        dk, dvacc = _dkdv_head(dk, dvacc, k, v, q_base, do_ptr + b * sdo_b + h * sdo_h,
                               q_base, dq_acc_ptr + bh.to(tl.int64) * L * E, lse_ptr,
                               delta_ptr, sq_m, sq_d, sdo_m, sdo_d, 0, 0, pid_n, cols, d, dv, L,
                               S, E, EV, scale, scale_log2, 0.0, 0, bh, IS_CAUSAL, MASK_NONE,
                               False, True, INPUT_PRECISION, BLOCK_M, BLOCK_N)
    _store_tile(dk_ptr + b * sdk_b + hk * sdk_h, cols, d, sdk_n, sdk_d, S, E, dk * scale)
    _store_tile(dv_ptr + b * sdv_b + hk * sdv_h, cols, dv, sdv_n, sdv_d, S, EV, dvacc)


@triton.jit
def attention_dq_convert(
    dq_acc_ptr, dq_ptr,
    sdq_b, sdq_h, sdq_m, sdq_d,        # dQ strides (B, Hq, L, E)
    H, L, E,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dQ[b, h, rows] = dq_acc[b * H + h, rows] in dQ's dtype. Grid (cdiv(L, BLOCK_M) * B*H,)."""
    pid_m, bh = _tile_of_plane(tl.cdiv(L, BLOCK_M))
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    acc = _load_tile(dq_acc_ptr + bh.to(tl.int64) * L * E, rows, d, E, 1, L, E)
    _store_tile(dq_ptr + b * sdq_b + h * sdq_h, rows, d, sdq_m, sdq_d, L, E, acc)
