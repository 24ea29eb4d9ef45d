"""Gluon kernel for the attention forward on Hopper (sm_90): FlashAttention-3's structure.

The `tl` forward (attention.py) leaves the schedule to Triton's pipeliner, which waits for
every QK^T right after issuing it, so the softmax never overlaps the tensor cores. Gluon
exposes Hopper's primitives directly, and this kernel arranges them as FlashAttention-3 does
(Shah et al., 2024, section 3):

    program = 128 query rows of one (batch, head); three partitions (warp_specialize):
      producer (1 warp):  Q once, then K and V tiles by TMA into a STAGES-deep shared ring
                          (k_ready / v_ready mbarriers; kv_empty when both consumers are done)
      consumer c = 0, 1:  64 query rows each, one warpgroup (4 warps) each
        S_0 = Q K_0^T; softmax -> P_0
        for j = 1 ..:
            [my turn]  S_j = Q K_j^T (async);  O += P_{j-1} V_{j-1} (async)  [your turn]
            wait until one product is left (S_j ready; the PV still runs)
            softmax(S_j) on the CUDA cores while the tensor cores finish P_{j-1} V_{j-1}
            wait for the PV; release stage j-1; O *= exp2(m_old - m_new); P_j in registers
        [my turn] O += P_last V_last [your turn]; O / l -> shared (Q's buffer) -> TMA store

Two overlaps: inside a warpgroup, the next QK^T is issued before the current softmax (the
wgmma wait keeps one group outstanding); between the two warpgroups, a pair of mbarriers
passes a turn so that one issues its products while the other runs its softmax (ping-pong).

Key tiles run from the last to the first, so the tiles that need a mask (the key tail past
S, the causal diagonal) come first and the rest run unmasked, with the scale folded into the
exponent's FMA. Causal programs start longest rows first. Scores are in log2 units; the row
statistics end as lse = (m + log2 l) / log2 e, the flash backward's input.

Scope (the host refuses everything else, pydl/attention_hopper.py): fp16/bf16, head dims
E = Ev in {64, 128}, no attention mask, no dropout, scale >= 0, 16-byte aligned rows.
Gluon kernels do not run in Triton's interpreter: this one is compiled and checked on a GPU.
"""
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LOG2E = gl.constexpr(1.4426950408889634)
ROWS = gl.constexpr(64)          # query rows per consumer warpgroup: one wgmma M of 4 warps
BLOCK_M = gl.constexpr(128)      # query rows per program: two consumers


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
              kv_empty, m0, n_tiles, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp: each consumer's 64 query rows, then key tiles n_tiles - 1 .. 0 (K and V of
    tile t into stage t % STAGES once both consumers released it). TMA fills rows past L or
    S with zeros and still counts the whole box, so every expect matches."""
    for c in gl.static_range(2):
        mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [m0 + c * ROWS, 0], q_ready.index(c),
                                        q_smem.index(c))
    for t in range(n_tiles):
        s = t % STAGES
        n0 = (n_tiles - 1 - t) * BLOCK_N
        # a fresh barrier counts as having completed the phase before 0: the first round
        # of the ring passes
        mbarrier.wait(kv_empty.index(s), ((t // STAGES) & 1) ^ 1)
        mbarrier.expect(k_ready.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [n0, 0], k_ready.index(s), k_smem.index(s))
        mbarrier.expect(v_ready.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [n0, 0], v_ready.index(s), v_smem.index(s))


@gluon.jit
def _softmax_tile(s, m_i, l_i, rows, n0, S, qk_scale, IS_CAUSAL: gl.constexpr,
                  MASKED: gl.constexpr, BLOCK_N: gl.constexpr, col_layout: gl.constexpr):
    """Online softmax of one score tile s = Q K^T (unscaled, fp32): (m_new, l_new, P,
    alpha = exp2(m_old - m_new)), in log2 units. MASKED: keys past S and, causal, keys past
    the row hidden (-inf), with guards for rows that have seen no key yet; unmasked tiles
    scale inside the exponent's FMA (qk_scale >= 0, so max(s) * scale = max(s * scale))."""
    if MASKED:
        cols = n0 + gl.arange(0, BLOCK_N, layout=col_layout)
        keep = gl.expand_dims(cols < S, 0)
        if IS_CAUSAL:
            keep = keep & (gl.expand_dims(cols, 0) <= gl.expand_dims(rows, 1))
        s = gl.where(keep, s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        seen = m_new != float("-inf")
        m_safe = gl.where(seen, m_new, 0.0)
        alpha = gl.where(seen, gl.exp2(m_i - m_safe), 1.0)
        p = gl.exp2(s - gl.expand_dims(m_safe, 1))
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s * qk_scale - gl.expand_dims(m_new, 1))
    l_i = l_i * alpha + gl.sum(p, 1)
    return m_new, l_i, p, alpha


@gluon.jit
def _consumer_step(t, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, acc,
                   m_i, l_i, p_op, rows, n_tiles, S, qk_scale, ROLE: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                   p_layout: gl.constexpr):
    """Key tile t >= 1: issue S_t = Q K_t^T and O += P_{t-1} V_{t-1} in this warpgroup's
    turn, run the softmax of S_t while the PV product runs, then rescale O."""
    st = t % STAGES
    prev = (t - 1) % STAGES
    mbarrier.wait(turn.index(ROLE), turn_phase)
    mbarrier.wait(k_ready.index(st), (t // STAGES) & 1)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q, k_smem.index(st).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
    mbarrier.wait(v_ready.index(prev), ((t - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - ROLE), count=1)
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
    n0 = (n_tiles - 1 - t) * BLOCK_N
    m_i, l_i, p, alpha = _softmax_tile(s, m_i, l_i, rows, n0, S, qk_scale, IS_CAUSAL, MASKED,
                                       BLOCK_N, gl.SliceLayout(0, s_layout))
    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
    mbarrier.arrive(kv_empty.index(prev), count=1)       # K_{t-1} and V_{t-1} are consumed
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)
    return acc, m_i, l_i, p_op, turn_phase ^ 1


@gluon.jit
def _consumer(o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready, kv_empty,
              turn, m0, bh, n_tiles, n_masked, L, S, qk_scale, ROLE: gl.constexpr,
              IS_CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
              STAGES: gl.constexpr):
    """One warpgroup: query rows m0 + 64 ROLE + [0, 64) against every key tile."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row0 = m0 + ROLE * ROWS
    rows = row0 + gl.arange(0, ROWS, layout=row_s)
    q = q_smem.index(ROLE)
    acc = gl.zeros([ROWS, HEAD_D], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)
    # turns alternate 0, 1, 0, ...: consumer 0 first (its first wait is on the phase a fresh
    # barrier counts as complete), each passes the turn after issuing its products
    turn_phase = 1 - ROLE
    mbarrier.wait(q_ready.index(ROLE), 0)

    # tile 0 (the last key tile): QK^T alone, masked whether or not it needs it
    mbarrier.wait(turn.index(ROLE), turn_phase)
    mbarrier.wait(k_ready.index(0), 0)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                          is_async=True)
    mbarrier.arrive(turn.index(1 - ROLE), count=1)
    turn_phase = turn_phase ^ 1
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    m_i, l_i, p, alpha = _softmax_tile(s, m_i, l_i, rows, (n_tiles - 1) * BLOCK_N, S, qk_scale,
                                       IS_CAUSAL, True, BLOCK_N, gl.SliceLayout(0, s_layout))
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)

    # the other tiles that need a mask, then the rest without
    for t in range(1, n_masked):
        acc, m_i, l_i, p_op, turn_phase = _consumer_step(
            t, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, acc, m_i, l_i,
            p_op, rows, n_tiles, S, qk_scale, ROLE, IS_CAUSAL, True, BLOCK_N, STAGES,
            s_layout, o_layout, p_layout)
    for t in range(gl.maximum(n_masked, 1), n_tiles):
        acc, m_i, l_i, p_op, turn_phase = _consumer_step(
            t, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, acc, m_i, l_i,
            p_op, rows, n_tiles, S, qk_scale, ROLE, IS_CAUSAL, False, BLOCK_N, STAGES,
            s_layout, o_layout, p_layout)

    # the last PV product
    last = (n_tiles - 1) % STAGES
    mbarrier.wait(turn.index(ROLE), turn_phase)
    mbarrier.wait(v_ready.index(last), ((n_tiles - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - ROLE), count=1)
    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
    mbarrier.arrive(kv_empty.index(last), count=1)

    # O / l through Q's buffer (every product reading it has retired) and a TMA store, which
    # drops rows past L; lse in natural-log units, +inf where a row saw no key
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, gl.SliceLayout(1, o_layout)), 1)
    q.store(out.to(q.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [row0, 0], q)
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(l_safe)) / LOG2E)
    gl.store(lse_ptr + bh.to(gl.int64) * L + rows, lse, mask=rows < L)
    tma.store_wait(pendings=0)


@gluon.jit
def attention_fwd_hopper(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sq_m,                  # query strides (B, Hq, L, E); unit column stride
    sk_b, sk_h, sk_n,                  # key strides (B, Hkv, S, E)
    sv_b, sv_h, sv_n,                  # value strides (B, Hkv, S, E)
    so_b, so_h, so_m,                  # output strides (B, Hq, L, E)
    H, L, S,                           # query heads, lengths
    GROUP,                             # query heads per K/V head (GQA); 1 without
    qk_scale,                          # scale * log2(e), >= 0
    IS_CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Grid (cdiv(L, 128), B * Hq), num_warps=4 (consumer 0; the other two partitions add
    a warpgroup and a warp). lse: (B * Hq, L) fp32."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    if IS_CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m      # longest rows first
    b = (bh // H).to(gl.int64)
    h = bh % H
    hk = (h // GROUP).to(gl.int64)
    h = h.to(gl.int64)
    m0 = pid_m * BLOCK_M
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    # one 2-D descriptor per (batch, head) slice: boxes never cross into the next head
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_D], dtype)
    q_desc = tma.make_tensor_descriptor(q_ptr + b * sq_b + h * sq_h, [L, HEAD_D], [sq_m, 1],
                                        [ROWS, HEAD_D], q_layout)
    k_desc = tma.make_tensor_descriptor(k_ptr + b * sk_b + hk * sk_h, [S, HEAD_D], [sk_n, 1],
                                        [BLOCK_N, HEAD_D], kv_layout)
    v_desc = tma.make_tensor_descriptor(v_ptr + b * sv_b + hk * sv_h, [S, HEAD_D], [sv_n, 1],
                                        [BLOCK_N, HEAD_D], kv_layout)
    o_desc = tma.make_tensor_descriptor(o_ptr + b * so_b + h * so_h, [L, HEAD_D], [so_m, 1],
                                        [ROWS, HEAD_D], q_layout)

    q_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_D], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)        # both consumers release a stage

    # key tiles: causal programs stop after their last row's key; the tiles from
    # n_tiles - n_masked on (processed first) hold keys past S or past the first row
    hi = S
    n_unmasked = S // BLOCK_N
    if IS_CAUSAL:
        hi = gl.minimum(S, m0 + BLOCK_M)
        n_unmasked = gl.minimum(n_unmasked, (m0 + 1) // BLOCK_N)
    n_tiles = gl.cdiv(hi, BLOCK_N)
    n_masked = n_tiles - gl.minimum(n_unmasked, n_tiles)

    gl.warp_specialize([
        (_consumer, (o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
                     kv_empty, turn, m0, bh, n_tiles, n_masked, L, S, qk_scale, 0, IS_CAUSAL,
                     HEAD_D, BLOCK_N, STAGES)),
        (_consumer, (o_desc, lse_ptr, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
                     kv_empty, turn, m0, bh, n_tiles, n_masked, L, S, qk_scale, 1, IS_CAUSAL,
                     HEAD_D, BLOCK_N, STAGES)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, k_ready, v_ready,
                     kv_empty, m0, n_tiles, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])
