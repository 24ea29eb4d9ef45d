"""Gluon kernels for attention on Hopper (sm_90), FlashAttention-3's structure: the forward
(`attention_fwd_hopper`, algo="flash_hopper") and a single-pass backward
(`attention_bwd_hopper`, algo="flash_hopper_onepass"; described before it below).

The `tl` forward (attention.py) leaves the schedule to Triton's pipeliner, which waits for
every QK^T right after issuing it, so the softmax never overlaps the tensor cores. Gluon
exposes Hopper's primitives directly, and the forward arranges them as FlashAttention-3 does
(Shah et al., 2024, section 3):

    work tile = 128 query rows of one (batch, head); program p takes tiles p, p + P, ...
    (P: one program per multiprocessor, persistent, or one per tile); three partitions
    (warp_specialize), each walking the program's tiles in the same order:
      producer (1 warp):  a tile's Q once both consumers are done with the last one's
                          (q_empty), then its K and V tiles by TMA into a STAGES-deep shared
                          ring that runs on across tiles (k_ready / v_ready mbarriers;
                          kv_empty when both consumers are done): the next tile's loads
                          overlap this one's last product and epilogue
      consumer c = 0, 1:  64 query rows each, one warpgroup (4 warps) each
        S_0 = Q K_0^T; softmax -> P_0
        for j = 1 ..:
            [my turn]  S_j = Q K_j^T (async);  O += P_{j-1} V_{j-1} (async)  [your turn]
            wait until one product is left (S_j ready; the PV still runs)
            softmax(S_j) on the CUDA cores while the tensor cores finish P_{j-1} V_{j-1}
            wait for the PV; release stage j-1; O *= exp2(m_old - m_new); P_j in registers
        release Q; [my turn] O += P_last V_last [your turn]; O / l stored from the registers

Two overlaps: inside a warpgroup, the next QK^T is issued before the current softmax (the
wgmma wait keeps one group outstanding); between the two warpgroups, a pair of mbarriers
passes a turn so that one issues its products while the other runs its softmax (ping-pong).

Key tiles run from the last to the first, so the tiles that need a mask (the key tail past
S, the causal diagonal) come first and the rest run unmasked, with the scale folded into the
exponent's FMA. Causal programs start longest rows first. Scores are in log2 units; the row
statistics end as lse = (m + log2 l) / log2 e, the flash backward's input.

Q, K and V are read through (batch, heads, rows, E) descriptors made once a program, so a
box never crosses into the next head and TMA's zero rows fill the tails.

Scope (the host refuses everything else, pydl/attention_hopper.py): fp16/bf16, head dims
E = Ev in {64, 128}, no attention mask, no dropout, scale >= 0, 16-byte aligned rows, no
expanded (stride-0) dims.
Gluon kernels do not run in Triton's interpreter: in emulation these run in pydl's Gluon
simulator (pydl/_gluon_sim.py: their logic, barrier protocol included, on CPU tensors), and
are compiled and checked on a GPU.
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
def _fwd_units(L, IS_CAUSAL: gl.constexpr):
    """(query tiles of a head, work units of a head): a unit is one query tile, or, causal,
    tile n_m - 1 - i with tile i (the longest rows with the shortest: every unit about
    n_m + 1 key tiles, so programs taking every P-th unit get equal work; the middle tile of
    an odd n_m alone)."""
    n_m = gl.cdiv(L, BLOCK_M)
    if IS_CAUSAL:
        return n_m, (n_m + 1) // 2
    return n_m, n_m


@gluon.jit
def _fwd_tile(u, sub, n_m, per_head, H, GROUP, S, IS_CAUSAL: gl.constexpr,
              BLOCK_N: gl.constexpr):
    """Query tile `sub` (0, or 1 for a causal pair's short tile) of work unit u: (b, h, its
    key head, b * H + h, first row m0, key tiles, masked key tiles). Causal tiles stop after
    their last row's key; the key tiles from n_tiles - n_masked on (processed first) hold
    keys past S or past the first row."""
    bh = u // per_head
    i = u % per_head
    pid_m = i
    if IS_CAUSAL:
        if sub == 0:
            pid_m = n_m - 1 - i        # the long tile first
    h = bh % H
    m0 = pid_m * BLOCK_M
    hi = S
    n_unmasked = S // BLOCK_N
    if IS_CAUSAL:
        hi = gl.minimum(S, m0 + BLOCK_M)
        n_unmasked = gl.minimum(n_unmasked, (m0 + 1) // BLOCK_N)
    n_tiles = gl.cdiv(hi, BLOCK_N)
    return bh // H, h, h // GROUP, bh, m0, n_tiles, n_tiles - gl.minimum(n_unmasked, n_tiles)


@gluon.jit
def _fwd_subs(u, n_m, per_head, IS_CAUSAL: gl.constexpr):
    """Query tiles in work unit u: 2 for a causal pair, else 1."""
    if IS_CAUSAL:
        i = u % per_head
        return 1 + (2 * i + 1 < n_m).to(gl.int32)
    return 1


@gluon.jit
def _producer(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
              v_ready, kv_empty, B, H, GROUP, L, S, IS_CAUSAL: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warp, for each query tile of the program's work units: each consumer's 64 query
    rows (once it has released the last tile's: q_empty), then key tiles n_tiles - 1 .. 0
    (K and V into the ring, whose index runs on across query tiles, once both consumers
    released the stage). TMA fills rows past L or S with zeros and still counts the whole
    box, so every expect matches; the boxes of (B, heads, rows, E) descriptors never cross
    into the next head."""
    n_m, per_head = _fwd_units(L, IS_CAUSAL)
    r = 0           # ring index of the query tile's first key tile
    it = 0          # query tiles done
    for u in range(gl.program_id(0), per_head * B * H, gl.num_programs(0)):
        for sub in range(_fwd_subs(u, n_m, per_head, IS_CAUSAL)):
            b, h, hk, bh, m0, n_tiles, n_masked = _fwd_tile(u, sub, n_m, per_head, H, GROUP, S,
                                                             IS_CAUSAL, BLOCK_N)
            for c in gl.static_range(2):
                mbarrier.wait(q_empty.index(c), (it & 1) ^ 1)
                mbarrier.expect(q_ready.index(c), q_desc.block_type.nbytes)
                tma.async_copy_global_to_shared(q_desc, [b, h, m0 + c * ROWS, 0],
                                                q_ready.index(c), q_smem.index(c))
            for t in range(n_tiles):
                _ring_put(r + t, (b, hk, (n_tiles - 1 - t) * BLOCK_N, 0), k_desc, v_desc,
                          k_smem, v_smem, k_ready, v_ready, kv_empty, STAGES)
            r += n_tiles
            it += 1


@gluon.jit
def _ring_put(t, coord, a_desc, b_desc, a_smem, b_smem, a_ready, b_ready, empty,
              STAGES: gl.constexpr):
    """A producer's t-th load into a STAGES-deep ring: the boxes of two descriptors at
    `coord` into stage t % STAGES (a_ready, b_ready each), once the consumers released that
    stage (`empty`; a fresh barrier counts as having completed the phase before 0, so the
    first round of the ring passes)."""
    s = t % STAGES
    mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)
    mbarrier.expect(a_ready.index(s), a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, coord, a_ready.index(s), a_smem.index(s))
    mbarrier.expect(b_ready.index(s), b_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(b_desc, coord, b_ready.index(s), b_smem.index(s))


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
def _consumer_step(t, r, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, acc,
                   m_i, l_i, p_op, rows, n_tiles, S, qk_scale, ROLE: gl.constexpr,
                   IS_CAUSAL: gl.constexpr, MASKED: gl.constexpr, BLOCK_N: gl.constexpr,
                   STAGES: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
                   p_layout: gl.constexpr):
    """Key tile t >= 1 of a work tile (ring index r): issue S_t = Q K_t^T and
    O += P_{t-1} V_{t-1} in this warpgroup's turn, run the softmax of S_t while the PV
    product runs, then rescale O."""
    st = r % STAGES
    prev = (r - 1) % STAGES
    E: gl.constexpr = q.shape[1]
    mbarrier.wait(turn.index(ROLE), turn_phase)
    mbarrier.wait(k_ready.index(st), (r // STAGES) & 1)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q, k_smem.index(st).reshape([BLOCK_N, E]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
    mbarrier.wait(v_ready.index(prev), ((r - 1) // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(prev).reshape([BLOCK_N, E]), acc, is_async=True)
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
def _consumer(o_ptr, lse_ptr, so_b, so_h, so_m, q_smem, k_smem, v_smem, q_ready, q_empty,
              k_ready, v_ready, kv_empty, turn, B, H, GROUP, L, S, qk_scale,
              ROLE: gl.constexpr, IS_CAUSAL: gl.constexpr, HEAD_D: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup, for each query tile of the program's work units: query rows
    m0 + 64 ROLE + [0, 64) against every key tile."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_D, 16])
    q = q_smem.index(ROLE).reshape([ROWS, HEAD_D])      # the (1, 1, 64, E) box's rows
    # turns alternate 0, 1, 0, ... over every product of every query tile: consumer 0 first
    # (its first wait is on the phase a fresh barrier counts as complete), each passes the
    # turn after issuing its products; both issue n_tiles + 1 turns a query tile
    turn_phase = 1 - ROLE
    r = 0           # ring index of the query tile's first key tile
    it = 0          # query tiles done
    n_m, per_head = _fwd_units(L, IS_CAUSAL)
    for u in range(gl.program_id(0), per_head * B * H, gl.num_programs(0)):
        for sub in range(_fwd_subs(u, n_m, per_head, IS_CAUSAL)):
            b, h, hk, bh, m0, n_tiles, n_masked = _fwd_tile(u, sub, n_m, per_head, H, GROUP,
                                                             S, IS_CAUSAL, BLOCK_N)
            mbarrier.wait(q_ready.index(ROLE), it & 1)
            acc, m_i, l_i, turn_phase = _consumer_tile(
                q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, r,
                m0 + ROLE * ROWS, n_tiles, n_masked, S, qk_scale, ROLE, IS_CAUSAL, BLOCK_N,
                STAGES, s_layout, o_layout)
            # every product reading Q has retired: the producer may load the next tile's
            # rows while the last PV product and the epilogue run
            mbarrier.arrive(q_empty.index(ROLE), count=1)
            acc, turn_phase = _consumer_last(acc, v_smem, v_ready, kv_empty, turn, turn_phase,
                                             r + n_tiles - 1, ROLE, STAGES)
            _store_rows(acc, m_i, l_i, o_ptr + b.to(gl.int64) * so_b + h.to(gl.int64) * so_h,
                        so_m, lse_ptr + bh.to(gl.int64) * L, m0 + ROLE * ROWS, L, o_layout)
            r += n_tiles
            it += 1


@gluon.jit
def _consumer_tile(q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, r, row0,
                   n_tiles, n_masked, S, qk_scale, ROLE: gl.constexpr, IS_CAUSAL: gl.constexpr,
                   BLOCK_N: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
                   o_layout: gl.constexpr):
    """Query rows row0 + [0, 64) against the tile's key tiles (ring indices r ..), up to
    the last PV product: (O unnormalised, without the last PV; m; l; the turn's phase)."""
    E: gl.constexpr = q.shape[1]
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows = row0 + gl.arange(0, ROWS, layout=row_s)
    acc = gl.zeros([ROWS, E], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, row_s)
    l_i = gl.zeros([ROWS], gl.float32, row_s)

    # key tile 0 (the last one): QK^T alone, masked whether or not it needs it
    st = r % STAGES
    mbarrier.wait(turn.index(ROLE), turn_phase)
    mbarrier.wait(k_ready.index(st), (r // STAGES) & 1)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q, k_smem.index(st).reshape([BLOCK_N, E]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - ROLE), count=1)
    turn_phase = turn_phase ^ 1
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s_tok,))
    m_i, l_i, p, alpha = _softmax_tile(s, m_i, l_i, rows, (n_tiles - 1) * BLOCK_N, S, qk_scale,
                                       IS_CAUSAL, True, BLOCK_N, gl.SliceLayout(0, s_layout))
    p_op = gl.convert_layout(p.to(q.dtype), p_layout)

    # the other key tiles that need a mask, then the rest without
    for t in range(1, n_masked):
        acc, m_i, l_i, p_op, turn_phase = _consumer_step(
            t, r + t, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, acc, m_i,
            l_i, p_op, rows, n_tiles, S, qk_scale, ROLE, IS_CAUSAL, True, BLOCK_N, STAGES,
            s_layout, o_layout, p_layout)
    for t in range(gl.maximum(n_masked, 1), n_tiles):
        acc, m_i, l_i, p_op, turn_phase = _consumer_step(
            t, r + t, q, k_smem, v_smem, k_ready, v_ready, kv_empty, turn, turn_phase, acc, m_i,
            l_i, p_op, rows, n_tiles, S, qk_scale, ROLE, IS_CAUSAL, False, BLOCK_N, STAGES,
            s_layout, o_layout, p_layout)
    return (acc, p_op), m_i, l_i, turn_phase


@gluon.jit
def _consumer_last(acc_p, v_smem, v_ready, kv_empty, turn, turn_phase, r,
                   ROLE: gl.constexpr, STAGES: gl.constexpr):
    """The tile's last PV product (its last key tile, ring index r), in this warpgroup's
    turn: (O unnormalised, the turn's phase)."""
    acc, p_op = acc_p
    st = r % STAGES
    E: gl.constexpr = acc.shape[1]
    mbarrier.wait(turn.index(ROLE), turn_phase)
    mbarrier.wait(v_ready.index(st), (r // STAGES) & 1)
    o_tok = warpgroup_mma(p_op, v_smem.index(st).reshape([p_op.shape[1], E]), acc,
                          is_async=True)
    mbarrier.arrive(turn.index(1 - ROLE), count=1)
    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))
    mbarrier.arrive(kv_empty.index(st), count=1)
    return acc, turn_phase ^ 1


@gluon.jit
def _store_rows(acc, m_i, l_i, o_base, so_m, lse_base, row0, L, o_layout: gl.constexpr):
    """O / l of rows row0 + [0, 64) straight from the registers (no shared memory: Q's
    buffer is already the next tile's), rows past L dropped; lse in natural-log units, +inf
    where a row saw no key."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    E: gl.constexpr = acc.shape[1]
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    out = acc / gl.expand_dims(gl.convert_layout(l_safe, row_o), 1)
    rows_o = row0 + gl.arange(0, ROWS, layout=row_o)
    cols = gl.expand_dims(gl.arange(0, E, layout=gl.SliceLayout(0, o_layout)), 0)
    offsets = gl.expand_dims(rows_o.to(gl.int64) * so_m, 1) + cols
    gl.store(o_base + offsets, out.to(o_base.dtype.element_ty),
             mask=gl.expand_dims(rows_o < L, 1) & (cols < E))
    rows = row0 + gl.arange(0, ROWS, layout=m_i.type.layout)
    lse = gl.where(empty, float("inf"), (m_i + gl.log2(l_safe)) / LOG2E)
    gl.store(lse_base + rows, lse, mask=rows < L)


@gluon.jit
def attention_fwd_hopper(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sq_m,                  # query strides (B, Hq, L, E); unit column stride
    sk_b, sk_h, sk_n,                  # key strides (B, Hkv, S, E)
    sv_b, sv_h, sv_n,                  # value strides (B, Hkv, S, E)
    so_b, so_h, so_m,                  # output strides (B, Hq, L, E)
    B, H, L, S,                        # batch, query heads, lengths
    GROUP,                             # query heads per K/V head (GQA); 1 without
    qk_scale,                          # scale * log2(e), >= 0
    IS_CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Grid (P,), num_warps=4 (consumer 0; the other two partitions add a warpgroup and a
    warp): program p runs work tiles p, p + P, ... of the cdiv(L, 128) * B * Hq (one each
    for P = all of them; persistent for P = the multiprocessors, where the producer loads the
    next tile's Q and keys while the consumers finish the last). lse: (B * Hq, L) fp32."""
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    # (B, heads, rows, E) descriptors, made once a program: a box never crosses into the
    # next head (TMA reads zeros past L and S)
    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, ROWS, HEAD_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, 1, BLOCK_N, HEAD_D],
                                                                   dtype)
    q_desc = tma.make_tensor_descriptor(q_ptr, [B, H, L, HEAD_D], [sq_b, sq_h, sq_m, 1],
                                        [1, 1, ROWS, HEAD_D], q_layout)
    k_desc = tma.make_tensor_descriptor(k_ptr, [B, H // GROUP, S, HEAD_D], [sk_b, sk_h, sk_n, 1],
                                        [1, 1, BLOCK_N, HEAD_D], kv_layout)
    v_desc = tma.make_tensor_descriptor(v_ptr, [B, H // GROUP, S, HEAD_D], [sv_b, sv_h, sv_n, 1],
                                        [1, 1, BLOCK_N, HEAD_D], kv_layout)

    q_smem = gl.allocate_shared_memory(dtype, [2, 1, 1, ROWS, HEAD_D], q_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], kv_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_N, HEAD_D], kv_layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)         # consumer i's rows
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)        # both consumers release a stage

    gl.warp_specialize([
        (_consumer, (o_ptr, lse_ptr, so_b, so_h, so_m, q_smem, k_smem, v_smem, q_ready,
                     q_empty, k_ready, v_ready, kv_empty, turn, B, H, GROUP, L, S,
                     qk_scale, 0, IS_CAUSAL, HEAD_D, BLOCK_N, STAGES)),
        (_consumer, (o_ptr, lse_ptr, so_b, so_h, so_m, q_smem, k_smem, v_smem, q_ready,
                     q_empty, k_ready, v_ready, kv_empty, turn, B, H, GROUP, L, S,
                     qk_scale, 1, IS_CAUSAL, HEAD_D, BLOCK_N, STAGES)),
        (_producer, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_ready, q_empty, k_ready,
                     v_ready, kv_empty, B, H, GROUP, L, S, IS_CAUSAL, BLOCK_N, STAGES)),
    ], [4, 1], [240, 24])


# --- the backward: one pass, FlashAttention-3's dQ by fp32 additions --------------------------
#
#   program = 128 keys of one (batch, key head), K and V resident, against each query head of
#   its group in turn (grouped-query heads; one without); partitions (warp_specialize):
#     producer (1 warp):  K, V once, then Q_i and dO_i (64 query rows each) by TMA into a
#                         STAGES-deep ring (q_ready / do_ready; qdo_empty when both consumers
#                         are done with a stage)
#     consumer c = 0, 1:  keys n0 + 64 c + [0, 64), one warpgroup each; per query tile i:
#       (1) S_c = Q_i K_c^T, dP_c = dO_i V_c^T    issued together (queries as rows: lse and
#                                                  delta are two values a thread)
#       (2) P_c = exp2(S_c c - lse_i)             while dP_c is still on the tensor cores
#       (3) dS_c = P_c (dP_c - delta_i)
#       (4) P_c, dS_c to shared memory (column half c of a 64 x 128 tile each), then
#           dV_c += P_c^T dO_i, dK_c += dS_c^T Q_i (the transposed views), issued together
#       (5) d = 128: dQ_i[:, half c] += dS K[:, half c]   once both halves of dS are there
#                                  (ds_ready): all 128 keys, half the head dim each, so each
#                                  dQ element is added once per program (fp32 atomics);
#           d = 64:  dQ_i += dS_c K_c              this warpgroup's keys, every column (two
#                                  additions an element; no slice inside a swizzle row);
#           ds_free when both are done with dS
#     then dK * scale and dV through shared memory (K's and V's buffers) by TMA stores.
#
# Five products a tile (the flash backward's two passes take seven). A causal program skips
# the query tiles wholly above its keys; only the tiles that cross the diagonal are masked.
# Query rows past L read lse = +inf (P = 0); keys past S are TMA's zero rows, whose dK and dV
# the stores clip and whose dQ share is 0 (K's row is zero).


@gluon.jit
def _bwd_producer(q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem, kv_ready,
                  q_ready, do_ready, qdo_empty, n0, h0, m_first, n_tiles, GROUP: gl.constexpr,
                  BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """One warp: K (128 rows) and V (each consumer's 64) under one barrier, then for each
    query head h0 + g of the group, query tiles m_first .. in order: the t-th tile's Q and dO
    (boxes of a (heads, rows, E) descriptor: rows past L are zeros, never the next head's)
    into stage t % STAGES once both consumers released it."""
    mbarrier.expect(kv_ready, k_desc.block_type.nbytes + 2 * v_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [n0, 0], kv_ready, k_smem)
    for c in gl.static_range(2):
        tma.async_copy_global_to_shared(v_desc, [n0 + c * ROWS, 0], kv_ready, v_smem.index(c))
    for g in range(GROUP):
        for i in range(n_tiles):
            _ring_put(g * n_tiles + i, (h0 + g, (m_first + i) * BLOCK_M, 0), q_desc, do_desc,
                      q_smem, do_smem, q_ready, do_ready, qdo_empty, STAGES)


@gluon.jit
def _bwd_tile(j, m0, dk, dv, q_smem, do_smem, k, v, dq_a, dq_b, p_half, ds_half, q_ready,
              do_ready, qdo_empty, ds_ready, ds_free, keys, dq_base, dq_offsets,
              lse_base, delta_base, L, qk_scale, scale, MASKED: gl.constexpr,
              BLOCK_M: gl.constexpr, STAGES: gl.constexpr, s_layout: gl.constexpr,
              add_l: gl.constexpr):
    """The consumer's j-th query tile (rows m0 .. of one query head, whose lse, delta and dQ
    rows start at the bases) against this warpgroup's keys: steps (1) to (5) above, dK and
    dV accumulated (returned); MASKED: the causal mask (a tile crossing the diagonal)."""
    DQ_N: gl.constexpr = dq_b.shape[1]
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, DQ_N, 16])
    dtype: gl.constexpr = v.dtype
    st = j % STAGES
    phase = (j // STAGES) & 1
    q = q_smem.index(st).reshape([BLOCK_M, k.shape[1]])   # the (1, BLOCK_M, E) box's rows
    do = do_smem.index(st).reshape([BLOCK_M, k.shape[1]])

    # (1) S and dP, both in flight
    s_zero = gl.zeros([BLOCK_M, ROWS], gl.float32, s_layout)
    mbarrier.wait(q_ready.index(st), phase)
    s_tok = warpgroup_mma(q, k.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    mbarrier.wait(do_ready.index(st), phase)
    dp_tok = warpgroup_mma(do, v.permute((1, 0)), s_zero, use_acc=False, is_async=True)
    # (2) P while dP runs: lse in log2 units, +inf past L (those rows of P are zero)
    queries = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
    lse = gl.load(lse_base + queries, mask=queries < L, other=float("inf")) * LOG2E
    s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))
    p = gl.exp2(s * qk_scale - gl.expand_dims(lse, 1))
    if MASKED:
        p = gl.where(gl.expand_dims(keys, 0) <= gl.expand_dims(queries, 1), p, 0.0)
    # (3) dS
    delta = gl.load(delta_base + queries, mask=queries < L, other=0.0)
    dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp_tok,))
    ds = (p * (dp - gl.expand_dims(delta, 1))).to(dtype)
    # (4) P and dS to shared memory (once both warpgroups are done reading the previous
    # tile's dS: a fresh barrier passes), then dV and dK from their transposed views
    mbarrier.wait(ds_free, (j & 1) ^ 1)
    p_half.store(p.to(dtype))
    ds_half.store(ds)
    fence_async_shared()
    mbarrier.arrive(ds_ready, count=1)
    dv_tok = warpgroup_mma(p_half.permute((1, 0)), do, dv, is_async=True)
    dk_tok = warpgroup_mma(ds_half.permute((1, 0)), q, dk, is_async=True)
    # (5) dQ's share: dq_a @ dq_b (see _bwd_consumer's DQ_BY_DIM)
    mbarrier.wait(ds_ready, j & 1)
    dq_zero = gl.zeros([BLOCK_M, DQ_N], gl.float32, dq_layout)
    dq_tok = warpgroup_mma(dq_a, dq_b, dq_zero, use_acc=False, is_async=True)
    dv, dk, dq = warpgroup_mma_wait(num_outstanding=0, deps=(dv_tok, dk_tok, dq_tok))
    mbarrier.arrive(qdo_empty.index(st), count=1)       # Q and dO are consumed
    mbarrier.arrive(ds_free, count=1)                   # and P, dS
    # rows clamped (their additions masked): the min() keeps the compiler from turning the
    # addresses into loop-carried 64-bit pointers, which spilled
    rows = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, add_l))
    at = gl.expand_dims(gl.minimum(rows, L - 1), 1) * dk.shape[1] + dq_offsets
    gl.atomic_add(dq_base + at, gl.convert_layout(dq * scale, add_l),
                  mask=gl.expand_dims(rows < L, 1), sem="relaxed")
    return dk, dv


@gluon.jit
def _bwd_consumer(dk_desc, dv_desc, lse_ptr, delta_ptr, dq_acc_ptr, q_smem, k_smem, v_smem,
                  do_smem, p_smem, ds_smem, kv_ready, q_ready, do_ready, qdo_empty, ds_ready,
                  ds_free, n0, bh0, m_first, n_tiles, GROUP: gl.constexpr, L, qk_scale,
                  scale, ROLE: gl.constexpr, IS_CAUSAL: gl.constexpr, HEAD_D: gl.constexpr,
                  BLOCK_M: gl.constexpr, STAGES: gl.constexpr):
    """One warpgroup: keys n0 + 64 ROLE + [0, 64) against query tiles m_first .. of each
    query head bh0 + g of the group (causal: the first two cross the diagonal).
    dQ at d = 128 (DQ_BY_DIM): columns ROLE * 64 + [0, 64) of every query tile, over all 128
    keys (one addition an element a program); at d = 64: every column over this warpgroup's
    64 keys (two additions an element), which reads whole 128-byte swizzle rows of K where a
    half of the head dim would be a 32-column slice inside one."""
    DQ_BY_DIM: gl.constexpr = HEAD_D >= 128
    DQ_N: gl.constexpr = HEAD_D // 2 if DQ_BY_DIM else HEAD_D
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, ROWS, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, HEAD_D, 16])
    key_l: gl.constexpr = gl.SliceLayout(0, s_layout)
    # dQ's additions four contiguous columns a thread (vector reductions; the accumulator's
    # own layout holds pairs, twice the addresses)
    add_l: gl.constexpr = gl.BlockedLayout([1, 4], [32 * 4 // DQ_N, DQ_N // 4], [4, 1],
                                           [1, 0])
    k = k_smem.slice(ROLE * ROWS, ROWS)                 # this warpgroup's keys
    v = v_smem.index(ROLE)
    p_half = p_smem.slice(ROLE * ROWS, ROWS, dim=1)     # P_c, dS_c: BLOCK_M x 64 each
    ds_half = ds_smem.slice(ROLE * ROWS, ROWS, dim=1)
    if DQ_BY_DIM:       # dS (all 128 keys) @ K[:, this half of the dims]
        dq_a = ds_smem
        dq_b = k_smem.slice(ROLE * DQ_N, DQ_N, dim=1)
    else:               # dS[:, this warpgroup's keys] @ K[its keys, :]
        dq_a = ds_half
        dq_b = k
    dtype: gl.constexpr = v.dtype
    keys = n0 + ROLE * ROWS + gl.arange(0, ROWS, layout=key_l)
    dk = gl.zeros([ROWS, HEAD_D], gl.float32, acc_layout)
    dv = gl.zeros([ROWS, HEAD_D], gl.float32, acc_layout)
    dq_cols = (ROLE * DQ_N if DQ_BY_DIM else 0) + gl.arange(0, DQ_N,
                                                            layout=gl.SliceLayout(0, add_l))
    dq_offsets = gl.expand_dims(dq_cols, 0)         # of a row's dQ (B * H, L, E) elements
    mbarrier.wait(kv_ready, 0)

    # per query head of the group: the tiles that cross the causal diagonal (the first
    # N_MASKED: n0 is a multiple of BLOCK_M), then the rest without a mask
    N_MASKED: gl.constexpr = 2 * ROWS // BLOCK_M if IS_CAUSAL else 0
    for g in range(GROUP):
        bh = (bh0 + g).to(gl.int64)
        dq_base = dq_acc_ptr + bh * L * HEAD_D
        lse_base = lse_ptr + bh * L
        delta_base = delta_ptr + bh * L
        for i in gl.static_range(N_MASKED):
            if i < n_tiles:
                dk, dv = _bwd_tile(g * n_tiles + i, (m_first + i) * BLOCK_M, dk, dv, q_smem,
                                   do_smem, k, v, dq_a, dq_b, p_half, ds_half, q_ready,
                                   do_ready, qdo_empty, ds_ready, ds_free, keys, dq_base,
                                   dq_offsets, lse_base, delta_base, L, qk_scale, scale, True,
                                   BLOCK_M, STAGES, s_layout, add_l)
        for i in range(N_MASKED, n_tiles):
            dk, dv = _bwd_tile(g * n_tiles + i, (m_first + i) * BLOCK_M, dk, dv, q_smem,
                               do_smem, k, v, dq_a, dq_b, p_half, ds_half, q_ready,
                               do_ready, qdo_empty, ds_ready, ds_free, keys, dq_base,
                               dq_offsets, lse_base, delta_base, L, qk_scale, scale, False,
                               BLOCK_M, STAGES, s_layout, add_l)

    # dK (scaled) and dV through K's and V's buffers, once the other warpgroup's last dQ
    # product (which reads every key) has retired
    n_all = GROUP * n_tiles
    if n_all > 0:
        mbarrier.wait(ds_free, (n_all - 1) & 1)
    k.store((dk * scale).to(dtype))
    v.store(dv.to(dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [n0 + ROLE * ROWS, 0], k)
    tma.async_copy_shared_to_global(dv_desc, [n0 + ROLE * ROWS, 0], v)
    tma.store_wait(pendings=0)


@gluon.jit
def attention_bwd_hopper(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr,
    sq_b, sq_h, sq_m,                  # query strides (B, H, L, E); unit column stride
    sk_b, sk_h, sk_n,                  # key strides (B, HKV, S, E)
    sv_b, sv_h, sv_n,                  # value strides (B, HKV, S, E)
    sdo_b, sdo_h, sdo_m,               # upstream gradient strides (B, H, L, E)
    sdk_b, sdk_h, sdk_n,               # dK strides (B, HKV, S, E)
    sdv_b, sdv_h, sdv_n,               # dV strides (B, HKV, S, E)
    H, L, S,
    qk_scale,                          # scale * log2(e), >= 0
    scale,
    GROUP: gl.constexpr,               # query heads per key head (GQA); 1 without
    IS_CAUSAL: gl.constexpr, HEAD_D: gl.constexpr, BLOCK_M: gl.constexpr,
    STAGES: gl.constexpr,
):
    """Grid (cdiv(S, 128), B * HKV), num_warps=4 (consumer 0; the other partitions add a
    warpgroup and a warp): 128 keys of one key head, against the GROUP query heads that read
    it. lse, delta: (B * H, L) fp32 (natural-log lse); dq_acc: (B * H, L, E) fp32, zero on
    entry, dQ on exit (scaled)."""
    pid_n = gl.program_id(0)
    bkv = gl.program_id(1)
    HKV = H // GROUP
    b = (bkv // HKV).to(gl.int64)
    hk = (bkv % HKV).to(gl.int64)
    h0 = (bkv % HKV) * GROUP                # the group's first query head
    n0 = pid_n * (2 * ROWS)
    dtype: gl.constexpr = q_ptr.dtype.element_ty

    q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([1, BLOCK_M, HEAD_D], dtype)
    kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([ROWS, HEAD_D], dtype)
    k_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * ROWS, HEAD_D], dtype)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 2 * ROWS], dtype)
    # Q and dO of every query head of this batch: (H, L, E), rows past L zero-filled per head
    q_desc = tma.make_tensor_descriptor(q_ptr + b * sq_b, [H, L, HEAD_D], [sq_h, sq_m, 1],
                                        [1, BLOCK_M, HEAD_D], q_layout)
    do_desc = tma.make_tensor_descriptor(do_ptr + b * sdo_b, [H, L, HEAD_D], [sdo_h, sdo_m, 1],
                                         [1, BLOCK_M, HEAD_D], q_layout)
    k_desc = tma.make_tensor_descriptor(k_ptr + b * sk_b + hk * sk_h, [S, HEAD_D], [sk_n, 1],
                                        [2 * ROWS, HEAD_D], k_layout)
    v_desc = tma.make_tensor_descriptor(v_ptr + b * sv_b + hk * sv_h, [S, HEAD_D], [sv_n, 1],
                                        [ROWS, HEAD_D], kv_layout)
    dk_desc = tma.make_tensor_descriptor(dk_ptr + b * sdk_b + hk * sdk_h, [S, HEAD_D],
                                         [sdk_n, 1], [ROWS, HEAD_D], kv_layout)
    dv_desc = tma.make_tensor_descriptor(dv_ptr + b * sdv_b + hk * sdv_h, [S, HEAD_D],
                                         [sdv_n, 1], [ROWS, HEAD_D], kv_layout)

    k_smem = gl.allocate_shared_memory(dtype, [2 * ROWS, HEAD_D], k_layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, ROWS, HEAD_D], kv_layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_D], q_layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, BLOCK_M, HEAD_D], q_layout)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, 2 * ROWS], ds_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, 2 * ROWS], ds_layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ds_free = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    do_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    qdo_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    mbarrier.init(ds_ready, count=2)        # both halves of dS stored
    mbarrier.init(ds_free, count=2)         # both dQ products that read dS retired
    for i in gl.static_range(STAGES):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(do_ready.index(i), count=1)
        mbarrier.init(qdo_empty.index(i), count=2)       # both consumers release a stage

    # query tiles (per query head): a causal program starts at the tile of its first key
    # (the rows above see none of its keys)
    m_first = 0
    if IS_CAUSAL:
        m_first = n0 // BLOCK_M
    n_tiles = gl.maximum(gl.cdiv(L, BLOCK_M) - m_first, 0)
    bh0 = (bkv // HKV) * H + h0

    gl.warp_specialize([
        (_bwd_consumer, (dk_desc, dv_desc, lse_ptr, delta_ptr, dq_acc_ptr, q_smem, k_smem,
                         v_smem, do_smem, p_smem, ds_smem, kv_ready, q_ready, do_ready,
                         qdo_empty, ds_ready, ds_free, n0, bh0, m_first, n_tiles, GROUP, L,
                         qk_scale, scale, 0, IS_CAUSAL, HEAD_D, BLOCK_M, STAGES)),
        (_bwd_consumer, (dk_desc, dv_desc, lse_ptr, delta_ptr, dq_acc_ptr, q_smem, k_smem,
                         v_smem, do_smem, p_smem, ds_smem, kv_ready, q_ready, do_ready,
                         qdo_empty, ds_ready, ds_free, n0, bh0, m_first, n_tiles, GROUP, L,
                         qk_scale, scale, 1, IS_CAUSAL, HEAD_D, BLOCK_M, STAGES)),
        (_bwd_producer, (q_desc, k_desc, v_desc, do_desc, q_smem, k_smem, v_smem, do_smem,
                         kv_ready, q_ready, do_ready, qdo_empty, n0, h0, m_first, n_tiles,
                         GROUP, BLOCK_M, STAGES)),
    ], [4, 1], [240, 24])
