"""A general tiled GEMM in Triton, shared by every op that needs a plain matrix product.

    C[b] = alpha * A[b] @ B[b]  (+ bias[b] broadcast over rows)  (+ D[b] if ACCUMULATE)

or, with SOFTCAP = s > 0 (a language model's capped logits, Gemma-2's final layer),
C[b] = s tanh((alpha A[b] @ B[b] + bias[b]) / s), in fp32 before the one rounding to C's dtype.

for every batch index b = (b1, b2) of a two-level batch, each operand addressed through its
own strides, so transposed, sliced, broadcast (stride 0) and channels_last operands need no
copy: op(A) = A^T is just A's two matrix strides swapped. D is usually C itself (accumulate
into the output); it may be another tensor of C's shape (e.g. an fp32 running sum while C is
fp16), read before C is written by the same program.

Tiling: one program computes a BLOCK_M x BLOCK_N tile of C, looping over K in BLOCK_K steps
with an fp32 accumulator (`tl.dot`; fp32 operands round as INPUT_PRECISION says: "ieee" or
"tf32"). The tile index is swizzled in groups of GROUP_M tile rows (the Triton matmul
tutorial's L2-friendly ordering): consecutive programs sweep GROUP_M rows of A against a few
columns of B, so both stay in L2 instead of streaming all of B per row of tiles.

Grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), 1, B1 * B2). program_id(2) = b1 * B2 + b2.
Every load and store is masked, so M, N, K need not be multiples of the blocks; all offsets
are computed in int64, so operands may exceed 2**31 elements. The result is cast to C's dtype.

gemm_tma_kernel is the same product for one matrix whose operands TMA can address (Hopper):
persistent, its operands through tensor descriptors; the launcher (pydl/_gemm.py) offers it
to the tuner beside gemm_kernel's tiles.
"""
import triton
import triton.language as tl


@triton.jit
def gemm_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr,
    M, N, K,                            # C is M x N, the reduction is K long
    B2,                                 # size of the inner batch level (program_id(2) = b1*B2 + b2)
    sa_b1, sa_b2, sa_m, sa_k,           # A strides: outer batch, inner batch, row, reduction
    sb_b1, sb_b2, sb_k, sb_n,           # B strides: outer batch, inner batch, reduction, column
    sc_b1, sc_b2, sc_m, sc_n,           # C (output) strides
    sd_b1, sd_b2, sd_m, sd_n,           # D (addend) strides; read only if ACCUMULATE
    sbias_b1, sbias_b2, sbias_n,        # bias strides (a vector along N per batch); if HAS_BIAS
    alpha,                              # scale of the product (not of the bias or D)
    ACCUMULATE: tl.constexpr,           # add D (loaded in its dtype, summed in fp32)
    HAS_BIAS: tl.constexpr,             # add bias[b, n] to every row
    INPUT_PRECISION: tl.constexpr,      # "ieee" or "tf32": how fp32 operands enter tl.dot
    GROUP_M: tl.constexpr,              # tile rows per swizzle group (L2 reuse)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,   # each >= 16
    SOFTCAP: tl.constexpr = 0.0,        # > 0: s tanh(. / s) of the product and bias (no D)
):
    z = tl.program_id(2)
    b1 = (z // B2).to(tl.int64)
    b2 = (z % B2).to(tl.int64)
    pid_m, pid_n = _tile(tl.program_id(0), M, N, GROUP_M, BLOCK_M, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    rm64 = rm.to(tl.int64)
    rn64 = rn.to(tl.int64)
    a_rows = a_ptr + b1 * sa_b1 + b2 * sa_b2 + rm64 * sa_m
    b_cols = b_ptr + b1 * sb_b1 + b2 * sb_b2 + rn64 * sb_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        k64 = k.to(tl.int64)
        a = tl.load(a_rows[:, None] + k64[None, :] * sa_k, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_cols[None, :] + k64[:, None] * sb_k, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    _epilogue(acc, rm64, rn64, m_ok, n_ok, c_ptr + b1 * sc_b1 + b2 * sc_b2, sc_m, sc_n,
              d_ptr + b1 * sd_b1 + b2 * sd_b2, sd_m, sd_n,
              bias_ptr + b1 * sbias_b1 + b2 * sbias_b2, sbias_n, alpha, ACCUMULATE, HAS_BIAS,
              SOFTCAP)


@triton.jit
def gemm_tma_kernel(
    a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr,
    M, N, K,
    sa_m, sa_k, sb_k, sb_n, sc_m, sc_n, sd_m, sd_n, sbias_n,    # as gemm_kernel's (no batch)
    alpha,
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    A_ROWS: tl.constexpr,               # A is stored with unit stride along K (else along M)
    B_ROWS: tl.constexpr,               # B is stored with unit stride along N (else along K)
    C_ROWS: tl.constexpr,               # C is TMA-addressable rows (else stored by pointers)
    FLATTEN: tl.constexpr = True,       # one pipeline across a program's tiles (else per tile)
    SOFTCAP: tl.constexpr = 0.0,
):
    """gemm_kernel's product for one matrix (no batch) whose operands TMA can address (Hopper
    and newer): each operand read through a tensor descriptor over its stored layout (a
    16-byte aligned base, unit stride along one of its two axes, the other a multiple of 16
    bytes: checked by the launcher), so its tiles arrive in shared memory by TMA copies with
    no address arithmetic or load masks in the threads (the descriptor zero-fills past the
    edges); an operand stored along the other axis (A^T, B^T) is read in boxes of its own
    layout and transposed in shared memory, which wgmma reads either way for 16-bit types.
    Persistent: a grid of one or two programs per multiprocessor (the launcher's choice),
    each taking every num_programs-th tile in gemm_kernel's swizzled order; with FLATTEN the
    K loops of its tiles are flattened into one software pipeline (the next tile's first
    loads issue under this tile's last products and its epilogue), without it each tile's
    pipeline drains before its epilogue (with two programs on a multiprocessor, the other's
    products fill the tensor cores meanwhile). The epilogue is gemm_kernel's; with C_ROWS
    its tile leaves by a TMA store (one bulk copy from shared memory, clipped at C's edges by
    the descriptor) instead of masked stores from every thread."""
    if A_ROWS:
        a_desc = tl.make_tensor_descriptor(a_ptr, [M, K], [sa_m, 1], [BLOCK_M, BLOCK_K])
    else:
        a_desc = tl.make_tensor_descriptor(a_ptr, [K, M], [sa_k, 1], [BLOCK_K, BLOCK_M])
    if B_ROWS:
        b_desc = tl.make_tensor_descriptor(b_ptr, [K, N], [sb_k, 1], [BLOCK_K, BLOCK_N])
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, [N, K], [sb_n, 1], [BLOCK_N, BLOCK_K])
    if C_ROWS:
        c_desc = tl.make_tensor_descriptor(c_ptr, [M, N], [sc_m, 1], [BLOCK_M, BLOCK_N])
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=FLATTEN):
        pid_m, pid_n = _tile(tile, M, N, GROUP_M, BLOCK_M, BLOCK_N)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            if A_ROWS:
                a = a_desc.load([off_m, k0])
            else:
                a = a_desc.load([k0, off_m]).T
            if B_ROWS:
                b = b_desc.load([k0, off_n])
            else:
                b = b_desc.load([off_n, k0]).T
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        rm = off_m + tl.arange(0, BLOCK_M)
        rn = off_n + tl.arange(0, BLOCK_N)
        if C_ROWS:
            out = _result(acc, rm.to(tl.int64), rn.to(tl.int64), rm < M, rn < N, d_ptr, sd_m,
                          sd_n, bias_ptr, sbias_n, alpha, ACCUMULATE, HAS_BIAS, SOFTCAP)
            c_desc.store([off_m, off_n], out.to(c_desc.dtype))
        else:
            _epilogue(acc, rm.to(tl.int64), rn.to(tl.int64), rm < M, rn < N, c_ptr, sc_m, sc_n,
                      d_ptr, sd_m, sd_n, bias_ptr, sbias_n, alpha, ACCUMULATE, HAS_BIAS,
                      SOFTCAP)


@triton.jit
def _tile(pid, M, N, GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(tile row, tile column) of tile `pid` in the grouped order: GROUP_M tile rows are swept
    column by column."""
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n


@triton.jit
def _epilogue(acc, rm64, rn64, m_ok, n_ok, c_base, sc_m, sc_n, d_base, sd_m, sd_n, bias_base,
              sbias_n, alpha, ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr,
              SOFTCAP: tl.constexpr):
    """C's tile (rows rm64, columns rn64) = _result(acc, ...) rounded once to C's dtype; the
    bases are the batch's."""
    acc = _result(acc, rm64, rn64, m_ok, n_ok, d_base, sd_m, sd_n, bias_base, sbias_n, alpha,
                  ACCUMULATE, HAS_BIAS, SOFTCAP)
    mask = m_ok[:, None] & n_ok[None, :]
    c_off = rm64[:, None] * sc_m + rn64[None, :] * sc_n
    tl.store(c_base + c_off, acc.to(c_base.dtype.element_ty), mask=mask)


@triton.jit
def _result(acc, rm64, rn64, m_ok, n_ok, d_base, sd_m, sd_n, bias_base, sbias_n, alpha,
            ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr):
    """C's tile in fp32 before its rounding: alpha acc (+ bias) (capped) (+ D)."""
    acc = acc * alpha
    if HAS_BIAS:
        bias = tl.load(bias_base + rn64 * sbias_n, mask=n_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if SOFTCAP > 0.0:
        acc = SOFTCAP * _tanh(acc * (1.0 / SOFTCAP))
    if ACCUMULATE:
        d_off = rm64[:, None] * sd_m + rn64[None, :] * sd_n
        acc += tl.load(d_base + d_off, mask=m_ok[:, None] & n_ok[None, :],
                       other=0.0).to(tl.float32)
    return acc


@triton.jit
def _tanh(y):
    """tanh(y) = sign(y) (1 - e) / (1 + e), e = exp(-2 |y|) <= 1 (no overflow at any y; an
    absolute error of about 1e-7 near 0)."""
    e = tl.exp(-2.0 * tl.abs(y))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(y < 0.0, -t, t)
