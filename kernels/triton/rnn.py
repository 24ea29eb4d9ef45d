"""Triton pieces every recurrent layer shares (kernels/triton/lstm.py and gru.py build on them):
the gate nonlinearities, the tile product with its precision rule, the gate-interleaved tile
of a step, the gate-stacked loads and stores, a forward step's tile loop and a backward
step's product tile (`forward_tiles`, `backward_tile`: the layer passes its own cell step),
the grid-wide barrier of the persistent layers, and the layer's other kernels (the batched
GEMM of its weight gradients, the bias column sums, dropout's product).

A recurrent layer's kernels run a range [s_begin, s_end) of time steps in one launch. Each
program owns tiles of (batch rows x hidden units) and loops over them (tile = pid, pid + NP,
...); a step's tiles need all of the previous step's h (or, backward, all of the next step's
gate gradients), which other programs wrote. So:

  * launched once per step (GRID_SYNC=False, the grid covering every tile): the launch
    boundary orders the steps. This is the step-by-step path and what emulation runs (Triton's
    interpreter runs programs one after another: a barrier between them would never open);
  * launched once for the whole sequence (GRID_SYNC=True, at most one program per SM,
    launched cooperatively so that all are resident at once): the programs meet at
    `grid_barrier` after every step. This is the persistent path;
  * one program owning every tile (grid (1,)), GRID_SYNC=False, all steps in one launch: the
    persistent data flow without a grid barrier (its warps meet at a CTA barrier between
    steps, `step_sync`), which emulation tests.

The step arithmetic lives in @triton.jit functions that all three paths call, so the tests
that run in emulation check the arithmetic of the persistent path too; only `grid_barrier`
and `grid_exit` are GPU-only, and they are small enough to reason about on their own (below).

Gate-interleaved tiles: a forward step computes, for BLOCK_H hidden units, all G gates (4 for
the LSTM, 3 for the GRU padded to 4) as ONE product h[rows, :] @ W[cols, :]^T whose column
j = u*4 + q is gate q of unit u (W row q*H + u). One product of width 4*BLOCK_H keeps the MMA
wide when BLOCK_H is small (8 units a program spread a 1024-unit layer over 128 SMs), and
`split_gates` takes the four gates apart afterwards.

Backward tiles: a backward step's product dh[rows, units] = dg_next[rows, :] W_rec[:, units]
is K = G*H deep, and every tile reads all of dg_next's rows' K columns whatever its units: at
few units a tile those copies are most of a step's bytes (a 2560-unit GRU at 32 units a tile:
80 tiles each read 32 x 7680 gradients for 32 x 7680 of W). So the product is also split
over K (`split_tile_of`: SPLIT ranges of whole BLOCK_K blocks, the splits of one output tile
on consecutive programs), with more units a tile, until the tiles fill the SMs. Each split
stores its partial product in the workspace (`step_workspace`, `store_partial`) and counts
its arrival on the output tile's counter; the last to arrive sums the partials in split order
(kernels/triton/_split.py; deterministic, whichever program it is) and runs the cell, CHUNK
rows at a time (`backward_tile`). No program waits for another, so the schedules need
nothing more.

Precision (`dot`): operands of one 16-bit dtype multiply on the tensor cores with fp32
accumulation. fp32 x fp32 products round as the launcher says ("tf32", "tf32x3" or "ieee").
"split" is for an fp32 operand `a` (a gradient kept in fp32) times a 16-bit `b`: `a` is split
into hi = a rounded to b's dtype and lo = a - hi (exact in fp32) rounded again, and the two
16-bit products hi @ b + lo @ b are summed in fp32. That is 22 significant bits of `a` for fp16
(16 for bf16) at two passes of the 16-bit tensor cores, against the 11 that TF32 keeps (the
tensor cores read the top 19 bits of an fp32 register: round toward zero, no `cvt.rna`, which
is what made the GRU backward twice as inexact as it needs to be) at two passes' worth of TF32
time for one. With fp16 the split keeps its accuracy for |a| >= 2^-14 * 2^11 (below, lo is
subnormal and the error grows toward fp16's own rounding, which is where torch's fp16 RNNs,
rounding these gradients to fp16, are everywhere); an |a| beyond fp16's range overflows to
inf, as it does there. The split serves the weight-gradient GEMMs (`gemm_batched`).

The backward recurrence's own product (dh = dg_next W_rec inside every step) with a 16-bit
W_rec does not split: it multiplies a copy of dg_next rounded to nearest in W_rec's dtype (11
significant bits for fp16, 8 for bf16), written by the cells beside the fp32 gradients (BCAST
in kernels/triton/lstm.py, gru.py): one 16-bit pass over half the bytes, the operand every
program of a step reads whole. That is cuDNN's rounding (its fp16 RNNs keep the gate gradients
in fp16); the fp32 gradients still feed the weight-gradient GEMMs. The rounding enters dh once
a step and is damped with the gradient through time: in a float64 model of the kernels'
roundings at the DeepBench shapes and full sequence lengths, the fp32 gate gradients stay
within 8e-5 (fp16) and 6e-4 (bf16) of their exact values relative to the largest, below the
gradients' final rounding to the layer's dtype (2^-12, 2^-9), and the benchmark gate's
deviation from float64 grows by at most 0.07 (fp16) and 0.02 (bf16) of the tolerance (bench/
TUNING.md). So both 16-bit dtypes take the copy. Gradients beyond fp16's range become inf in
it, and below 2^-24 zero, as in torch's fp16 RNNs. fp32 layers, and an LSTM's fp32 W_hh W_hr
with projections, multiply the fp32 gradients ("tf32", "tf32x3", "ieee" as above).
"""
import triton
import triton.language as tl

from ._split import arrive_last, sum_partials

# A forward tile of at most this many (row, unit) elements loads its step's operands before
# its K loop (the projected input's gates, the state the cell starts from; held across the
# loop: at 4 warps about G * EARLY_ELEMS / 128 registers a thread), a larger one after it.
EARLY_ELEMS = tl.constexpr(512)


@triton.jit
def sigmoid(a):
    """1 / (1 + exp(-a)) without overflow: exp is only taken of -|a|; NaN propagates."""
    e = tl.exp(-tl.abs(a))
    return tl.where(a >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def tanh(a):
    """tanh(a) = sign(a) (1 - e) / (1 + e) with e = exp(-2|a|) <= 1: no overflow."""
    e = tl.exp(-2.0 * tl.abs(a))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(a >= 0, t, -t)


@triton.jit
def dot(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b. PRECISION "split": a is fp32 and b 16-bit (see the module docstring);
    otherwise tl.dot's input_precision (used by fp32 x fp32 products only; 16-bit operands
    of one dtype multiply as they are)."""
    if PRECISION == "split":
        a = a.to(tl.float32)
        hi = a.to(b.dtype)
        hi32 = hi.to(tl.float32)
        # lo = a - hi is exact in fp32; 0 where hi overflowed or is inf (no inf - inf = NaN)
        lo = tl.where(tl.abs(hi32) < 3.0e38, a - hi32, 0.0).to(b.dtype)
        acc = tl.dot(hi, b, acc)
        acc = tl.dot(lo, b, acc)
    else:
        if a.dtype != b.dtype:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def tile_dot(a_ptr, sa_b, sa_k, rows, r_ok, K, w_ptr, sw_n, sw_k, cols, c_ok, acc,
             PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc[r, j] += sum over k < K of A[rows[r], k] * W[cols[j], k], where A[i, k] is at
    a_ptr + i*sa_b + k*sa_k and W[n, k] at w_ptr + n*sw_n + k*sw_k (any strides: a
    transposed W is the same call with the strides swapped). rows and cols are int64.
    A is read through L2 only (.cg): in the persistent layer it is what other programs wrote
    in the step before (h, or the gate gradients), and an SM's L1 is not coherent."""
    for k0 in range(0, K, BLOCK_K):
        k = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * sa_b + k[None, :] * sa_k,
                    mask=r_ok[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + k[:, None] * sw_k + cols[None, :] * sw_n,
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = dot(a, w, acc, PRECISION)
    return acc


@triton.jit
def gate_columns(unit0, H, G: tl.constexpr, BLOCK_H: tl.constexpr):
    """(W rows, valid) of a gate-interleaved tile of BLOCK_H units from unit0: column
    j = u*4 + q is gate q of unit unit0 + u, W row q*H + unit0 + u; gates q >= G (the GRU's
    fourth) and units >= H are invalid (their columns stay zero)."""
    j = tl.arange(0, 4 * BLOCK_H)
    u = unit0 + j // 4
    q = j % 4
    return (q * H + u).to(tl.int64), (u < H) & (q < G)


@triton.jit
def split_gates(acc, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """The four [BLOCK_B, BLOCK_H] gates of a gate-interleaved [BLOCK_B, 4*BLOCK_H] tile."""
    # column u*4 + 2a + b -> [.., u, a, b]; tl.split takes the last axis (b) apart
    ab = tl.reshape(acc, [BLOCK_B, BLOCK_H, 2, 2])
    even, odd = tl.split(ab)                 # b = 0: gates 0, 2; b = 1: gates 1, 3
    g0, g2 = tl.split(even)
    g1, g3 = tl.split(odd)
    return g0, g1, g2, g3


@triton.jit
def load_gates(ptr, u, stride, H, mask, G: tl.constexpr):
    """The G (3 or 4) gate slices, in fp32, of units u of a gate-stacked vector or row (gates
    [0; 1; ...] of H each, PyTorch's layout: gate q at ptr + (q*H + u)*stride)."""
    g0 = tl.load(ptr + u * stride, mask=mask, other=0.0).to(tl.float32)
    g1 = tl.load(ptr + (u + H) * stride, mask=mask, other=0.0).to(tl.float32)
    g2 = tl.load(ptr + (u + 2 * H) * stride, mask=mask, other=0.0).to(tl.float32)
    if G == 3:
        gates = (g0, g1, g2)
    else:
        gates = (g0, g1, g2, tl.load(ptr + (u + 3 * H) * stride, mask=mask,
                                     other=0.0).to(tl.float32))
    return gates


@triton.jit
def add_gates(acc, gates):
    """acc's gate slices plus gates', gate by gate (tuples of 3 or 4 slices)."""
    if len(gates) == 3:
        out = (acc[0] + gates[0], acc[1] + gates[1], acc[2] + gates[2])
    else:
        out = (acc[0] + gates[0], acc[1] + gates[1], acc[2] + gates[2], acc[3] + gates[3])
    return out


@triton.jit
def store_gates(ptr, u, stride, H, mask, gates):
    """Store gates (a tuple of 3 or 4 slices, rounded to ptr's dtype) at units u of a
    gate-stacked row: gate q at ptr + (q*H + u)*stride."""
    tl.store(ptr + u * stride, gates[0], mask=mask)
    tl.store(ptr + (u + H) * stride, gates[1], mask=mask)
    tl.store(ptr + (u + 2 * H) * stride, gates[2], mask=mask)
    if len(gates) == 4:
        tl.store(ptr + (u + 3 * H) * stride, gates[3], mask=mask)


@triton.jit
def tile_of(tile, B, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr):
    """(rows, units, first unit) of tile number `tile`, int64: row blocks vary fastest, so
    consecutive programs share a unit block (and its slice of W)."""
    n_rb = tl.cdiv(B, BLOCK_B)
    unit0 = ((tile // n_rb) * BLOCK_H).to(tl.int64)
    rows = ((tile % n_rb) * BLOCK_B + tl.arange(0, BLOCK_B)).to(tl.int64)
    return rows, unit0 + tl.arange(0, BLOCK_H), unit0


@triton.jit
def split_tile_of(tile, B, K, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
                  BLOCK_K: tl.constexpr, SPLIT: tl.constexpr):
    """A backward step's product tile `tile`: (first row, rows, units, k_begin, k_len, split
    s, output tile), the output tile (row block, unit block, as `tile_of`) tile // SPLIT and
    its K range [k_begin, k_begin + k_len), split s = tile % SPLIT of cdiv(K, SPLIT) rounded
    up to BLOCK_K (the launcher makes every split non-empty). The splits of an output tile
    are consecutive tiles, so consecutive programs."""
    out_tile = tile // SPLIT
    s = tile % SPLIT
    rows, units, _ = tile_of(out_tile, B, BLOCK_B, BLOCK_H)
    row0 = ((out_tile % tl.cdiv(B, BLOCK_B)) * BLOCK_B).to(tl.int64)
    kc = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    k0 = tl.multiple_of(s * kc, BLOCK_K)
    return row0, rows, units, k0, tl.minimum(kc, K - k0), s, out_tile


@triton.jit
def step_time(s, T, REVERSE: tl.constexpr):
    """The time index (int64) of run-order step s of a direction."""
    if REVERSE:
        t = T - 1 - s
    else:
        t = s + 0
    return t.to(tl.int64)


@triton.jit
def forward_tiles(tile_fn, s, pid, NP, n_tiles, args):
    """tile_fn(tile, *args, FIRST=s == 0) for this program's tiles (pid, pid + NP, ...) of
    forward step s. FIRST is a constexpr (the first step starts from h0, or zeros: its own
    specialization), decided once a step."""
    if s == 0:
        for tile in range(pid, n_tiles, NP):
            tile_fn(tile, *args, FIRST=True)
    else:
        for tile in range(pid, n_tiles, NP):
            tile_fn(tile, *args, FIRST=False)


@triton.jit
def step_workspace(ws_ptr, plane, B, K, w_ptr, BCAST: tl.constexpr):
    """(the 16-bit gate-gradient broadcast, the split partials) in a backward step's fp32
    workspace of planes of `plane` elements: planes 0 and 1 hold the cell's running state
    by step parity (dc, or the GRU's direct part), then (BCAST) the 16-bit copies of two
    steps' gate gradients, (2, B, K) in W's dtype by step parity, from plane 2, then the
    split partials (from plane 2 + cdiv(B*K, plane) with BCAST, else 2) in output-tile
    order, each a BLOCK_B x BLOCK_H fp32 tile per split. pydl/_rnn_launch.py sizes it."""
    bcast = (ws_ptr + 2 * plane).to(tl.pointer_type(w_ptr.dtype.element_ty))
    first = 2
    if BCAST:
        first += tl.cdiv(B * K, plane)
    return bcast, ws_ptr + first.to(tl.int64) * plane


@triton.jit
def next_step_product(u_step, bcast, g_ptr, sg_b, sg_k, w_ptr, sw_r, sw_k, rows, units, B, H,
                      K, k0, kc, PRECISION: tl.constexpr, BCAST: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """A backward tile's share of dh = g_next W[:, units] over this split's k in [k0, k0 + kc)
    (zeros at u_step 0, the first BPTT step, which has no next step): W (K, H) read
    transposed, (unit, k) -> W[k, unit]; g_next is the 16-bit copy of the previous step's
    gate gradients (BCAST, by step parity: `step_workspace`) or the fp32 ones at g_ptr
    (the next step's row of the gradients, strides sg_b, sg_k)."""
    acc = tl.zeros([BLOCK_B, BLOCK_H], tl.float32)
    if u_step > 0:
        if BCAST:
            a_ptr = bcast + (1 - u_step % 2) * B * K + k0
            sa_b = K
            sa_k = 1
        else:
            a_ptr = g_ptr + k0 * sg_k
            sa_b = sg_b
            sa_k = sg_k
        acc = tile_dot(a_ptr, sa_b, sa_k, rows, rows < B, kc, w_ptr + k0 * sw_r, sw_k, sw_r,
                       units, units < H, acc, PRECISION, BLOCK_K)
    return acc


@triton.jit
def store_partial(parts, out_tile, s, acc, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr,
                  BLOCK_H: tl.constexpr):
    """Store split s's partial product of output tile `out_tile` (a whole BLOCK_B x BLOCK_H
    tile, no mask: the workspace holds whole tiles)."""
    r = tl.arange(0, BLOCK_B)
    c = tl.arange(0, BLOCK_H)
    tl.store(parts + (out_tile * SPLIT + s).to(tl.int64) * (BLOCK_B * BLOCK_H)
             + (r[:, None] * BLOCK_H + c[None, :]), acc)


@triton.jit
def chunk_partials(parts, out_tile, r0, SPLIT: tl.constexpr, BLOCK_B: tl.constexpr,
                   BLOCK_H: tl.constexpr, ROWS: tl.constexpr):
    """Rows r0 .. r0 + ROWS of output tile `out_tile`'s product: its SPLIT partials summed
    in split order, all loaded at once (kernels/triton/_split.py; one L2 round trip, with
    the cell's own loads, which do not wait for the sum)."""
    r = r0 + tl.arange(0, ROWS)
    c = tl.arange(0, BLOCK_H)
    tile = parts + out_tile.to(tl.int64) * SPLIT * (BLOCK_B * BLOCK_H)
    return sum_partials(tile + (r[:, None] * BLOCK_H + c[None, :]), SPLIT, BLOCK_B * BLOCK_H,
                        SPLIT)


@triton.jit
def backward_tile(cell, tile, u_step, g_ptr, tn, sg_t, sg_b, sg_k, w_ptr, sw_r, sw_k, ws_ptr,
                  plane, sync_ptr, B, H, K, cell_args, PRECISION: tl.constexpr,
                  BCAST: tl.constexpr, SPLIT: tl.constexpr, CHUNK: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    """Product tile `tile` of BPTT step u_step (`split_tile_of`): its share of
    dh = g_next W[:, units] (`next_step_product`; g_next the gate gradients at time tn, the
    step that ran after this one, of g (T, B, K); the workspace of `plane`-element planes at
    ws_ptr, `step_workspace`), then the layer's cell step cell(rows, units, dh, bcast,
    *cell_args): at once without K splits; else by the split that finishes the output tile
    last, CHUNK rows at a time."""
    row0, rows, units, k0, kc, s, out_tile = split_tile_of(tile, B, K, BLOCK_B, BLOCK_H,
                                                           BLOCK_K, SPLIT)
    bcast, parts = step_workspace(ws_ptr, plane, B, K, w_ptr, BCAST)
    dh = next_step_product(u_step, bcast, g_ptr + tn * sg_t, sg_b, sg_k, w_ptr, sw_r, sw_k,
                           rows, units, B, H, K, k0, kc, PRECISION, BCAST, BLOCK_B, BLOCK_H,
                           BLOCK_K)
    if SPLIT == 1:
        cell(rows, units, dh, bcast, *cell_args)
    else:
        finish = s == 0         # the first step has no product: split 0 runs the cell
        if u_step > 0:
            store_partial(parts, out_tile, s, dh, SPLIT, BLOCK_B, BLOCK_H)
            finish = arrive_last(sync_ptr + 2 + out_tile, SPLIT)
        if finish:
            for r0 in tl.static_range(0, BLOCK_B, CHUNK):
                dh_rows = tl.zeros([CHUNK, BLOCK_H], tl.float32)
                if u_step > 0:
                    dh_rows = chunk_partials(parts, out_tile, r0, SPLIT, BLOCK_B, BLOCK_H, CHUNK)
                cell(row0 + r0 + tl.arange(0, CHUNK), units, dh_rows, bcast, *cell_args)


# --- the grid barrier (GPU only: GRID_SYNC=True) ----------------------------------------------
#
# sync_ptr points at two int32 counters, zero when the launch starts: [0] arrivals, [1] exits.
# Barrier k of a launch (k = 0, 1, ...) waits until arrivals reach (k + 1) * NP. The counter
# only grows within a launch, so a program that reaches barrier k + 1 early cannot release a
# program still waiting at barrier k too soon, and none needs resetting between barriers.
#
# Ordering: the CTA barrier makes every thread's stores of the step happen before the
# arrival; the arrival is a release RMW by one thread (Triton runs a scalar atomic on thread
# 0); the waiter's exit read is an acquire, which reads the value of the last arrival and so
# synchronises with every arrival (all are RMWs on one location: a release sequence); a CTA
# barrier then orders all its threads' following loads after it. An SM's L1 is not coherent
# with the others', so those loads must not hit lines cached before the writes: the acquire
# invalidates the SM's L1 (what CUDA's cooperative-groups grid.sync() relies on too: thread 0
# fences and counts, the block waits at a CTA barrier), and tile_dot asks for L2 loads (.cg)
# besides, which the aligned operands get (16-byte cp.async.cg in the sm_90 compile). The spin
# reads are plain volatile loads (no atomic traffic on the line while waiting); an acquire
# confirms (the compiler makes the RMW of 0 an ld.acquire.gpu). All programs must be resident
# at once or the barrier never opens: the launcher launches at most one program per SM and
# asks for a cooperative launch (launch_cooperative_grid=True), which fails instead of
# deadlocking when the grid cannot be co-resident.
#
# grid_exit: after its last barrier each program counts itself out; the last one resets both
# counters, so the same counters serve the next launch (the tuner's trials, a CUDA graph's
# replays). No program reads them after counting out, so the reset cannot release anyone.

@triton.jit
def grid_barrier(sync_ptr, target):
    """Wait until `target` arrivals have been counted, this program's included."""
    tl.debug_barrier()
    seen = tl.atomic_add(sync_ptr, 1, sem="acq_rel", scope="gpu") + 1
    while seen < target:
        while tl.load(sync_ptr, volatile=True) < target:
            pass
        seen = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def step_sync(sync_ptr, q, step_begin, step_end, NP, GRID_SYNC: tl.constexpr):
    """Between sub-steps q and q + 1 of a launch that runs several: every program waits for
    all (GRID_SYNC, `grid_barrier`); otherwise the launch is the one-program schedule, whose
    one program's threads wait for each other (a CTA barrier): the next step's loads of h (or
    of the gate gradients) read what other threads of the program stored in this one, and
    without the barrier a warp could load before another warp's store. Emulation runs a
    program's tensor ops in order, so only a GPU needs it."""
    if q + 1 < step_end:
        if GRID_SYNC:
            grid_barrier(sync_ptr, (q - step_begin + 1) * NP)
        else:
            tl.debug_barrier()


@triton.jit
def grid_exit(sync_ptr):
    """Count this program out of the launch; the last one out zeroes the counters."""
    tl.debug_barrier()
    done = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel", scope="gpu") + 1
    if done == tl.num_programs(0):
        tl.atomic_xchg(sync_ptr, 0, sem="relaxed", scope="gpu")
        tl.atomic_xchg(sync_ptr + 1, 0, sem="relaxed", scope="gpu")


@triton.jit
def grid_barrier_check(sync_ptr, slots_ptr, bad_ptr, n_rounds):
    """A test of the barrier alone (tests/test_rnn_persistent.py, GPU only): in every round
    each program writes its slot, waits, and counts the slots that do not hold this round's
    value yet (into bad_ptr: must stay 0), then waits again before the next round overwrites
    them. grid (NP,), cooperative; slots (NP,) int32."""
    pid = tl.program_id(0)
    NP = tl.num_programs(0)
    for r in range(n_rounds):
        tl.store(slots_ptr + pid, r * NP + pid)
        grid_barrier(sync_ptr, (2 * r + 1) * NP)
        bad = 0
        for j in range(0, NP):
            v = tl.load(slots_ptr + j, cache_modifier=".cg")
            bad += (v != r * NP + j).to(tl.int32)
        if bad > 0:
            tl.atomic_add(bad_ptr, bad)
        grid_barrier(sync_ptr, (2 * r + 2) * NP)
    grid_exit(sync_ptr)


# --- the layer's other kernels ----------------------------------------------------------------

@triton.jit
def gemm_batched(
    a_ptr, b_ptr, cin_ptr, out_ptr, bias_ptr,
    M, N, K, BATCH, B2C, N_RED,
    sa_1, sa_2, sa_m, sa_k,      # A (B1, B2, M, K); a broadcast batch axis has stride 0
    sb_1, sb_2, sb_k, sb_n,      # B (B1, B2, K, N)
    sc_1, sc_2, sc_m, sc_n,      # c_in (B1, B2C, M, N), read when ACCUMULATE
    so_1, so_2, so_m, so_n,      # out (B1, B2C, M, N)
    sbias_1, sbias_n,            # bias (B1 or 1, N)
    ACCUMULATE: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[b1, b2] = A[b1, b2] @ B[b1, b2] (+ c_in[b1, b2]) (+ bias[b1] on every row).

    BATCH = B1 * B2C output matrices. When N_RED > 1 (B2C = 1) the B2 axis of the operands is
    summed into the one output: C[b1] = sum_b2 A[b1, b2] @ B[b1, b2] -- the weight gradients
    of a layer, summed over time steps whose (t, b) rows need not merge into one stride.
    Grid (tiles of M x tiles of N, min(BATCH, 65535)); axis 1 loops over the batches.
    PRECISION as `dot`: "split" when A is an fp32 gradient and B 16-bit.
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
                a = tl.load(a_base + k[None, :] * sa_k, mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)
                b = tl.load(b_base + k[:, None] * sb_k, mask=k_ok[:, None] & n_ok[None, :],
                            other=0.0)
                acc = dot(a, b, acc, PRECISION)
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
