"""`device`: the decorator of the Numba kernels' helper functions.

Compiled (on a GPU, and whenever Numba is not simulating), `device(fn)` is
`cuda.jit(device=True, inline="always")(fn)`: Numba inlines the helper's IR at every call site
before optimisation, so a kernel compiles as if the helper's body were written in it (a helper
left to NVVM's inliner can change the kernel's code: other unrolling, more registers).

In the CUDA simulator (PYDL_INTERPRET=1) each call of a `cuda.jit` device function swaps its
module's `cuda` global for the simulator's, under locks, so that `cuda.threadIdx` and the like
resolve: tens of microseconds a call, as much as a short loop of arithmetic. A helper that
never names `cuda` has nothing to swap, so there `device` returns the plain function, called at
Python's cost, and factoring a kernel into helpers does not slow the emulated tests. A helper
that names `cuda` (thread indices, local arrays) gets the `cuda.jit` device function there too.

`mma(bf16)`: the warp's tensor-core product (PTX mma.sync m16n8k16, fp32 accumulators), for
the GEMM (kernels/numba/gemm_mma.py) and the attention kernels (kernels/numba/attention_mma.py),
through `mma_into`.
Numba CUDA has no tensor-core intrinsic; the instruction is inline PTX. Its counterpart in the
simulator gathers the warp's fragments and computes the same product, so the fragment layouts
the kernel builds are checked there.

`quad_max(v)`, `quad_sum(v)`: the NaN-propagating max and the sum of v over the four lanes
4 (lane // 4) .. + 3 that hold one row of an mma accumulator (two butterfly shuffles). The
simulator has no warp shuffles: there the block's threads exchange their values through a
per-block array between two barriers, and each combines them in the butterfly's order. Like
`mma`, every thread of the block must call them the same number of times.
"""
import threading

import numpy as np
from numba import config, cuda

_LOCK = threading.Lock()


def device(fn):
    """An inlined Numba CUDA device function; fn itself in the simulator if it never names
    `cuda`."""
    if config.ENABLE_CUDASIM and "cuda" not in fn.__code__.co_names:
        return fn
    return cuda.jit(device=True, inline="always")(fn)


if config.ENABLE_CUDASIM:
    def trap(message):
        """The simulator's counterpart of the GPU's trap: the kernel's launch raises
        IndexError(message)."""
        raise IndexError(message)
else:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    @intrinsic
    def trap(typingctx, message):
        """Abort the kernel (PTX `trap`), as torch's device-side assert does: the launch fails
        and the process's CUDA context is lost, reported at the next synchronisation.
        `message` (a string literal) is what the simulator raises."""
        def codegen(context, builder, signature, args):
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), []), "trap;", "", side_effect=True)
            builder.call(asm, ())
            return context.get_dummy_value()
        return types.void(message), codegen


# --- the warp's tensor-core product -----------------------------------------------------------
#
# mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: D (16 x 8, fp32) = A (16 x 16) B (16 x 8)
# + C, computed by the 32 lanes of a warp together; each lane passes its fragments as 32-bit
# registers (two 16-bit elements each, the lower-indexed one in the low half) and gets its four
# elements of D. With g = lane // 4 and t = lane % 4 (PTX ISA, "Matrix Fragments for
# mma.m16n8k16 with floating point type"):
#   A: a0 = A[g, 2t:2t+2], a1 = A[g+8, 2t:2t+2], a2 = A[g, 2t+8:2t+10], a3 = A[g+8, 2t+8:2t+10]
#   B: b0 = B[2t:2t+2, g], b1 = B[2t+8:2t+10, g]  (pairs along K: B^T's rows)
#   C, D: c0, c1 = C[g, 2t], C[g, 2t+1]; c2, c3 = C[g+8, 2t], C[g+8, 2t+1]

def _lane_places():
    """Per lane, the (row, column) of each 16-bit element of its A and B fragments, and of
    its four accumulators, in the order above (index arrays over the 32 lanes)."""
    lane = np.arange(32)
    g, t = lane // 4, lane % 4
    pair = np.array([0, 1])
    a_rows = np.stack([g, g, g + 8, g + 8, g, g, g + 8, g + 8], 1)
    a_cols = np.concatenate([2 * t[:, None] + pair, 2 * t[:, None] + pair,
                             2 * t[:, None] + 8 + pair, 2 * t[:, None] + 8 + pair], 1)
    b_rows = np.concatenate([2 * t[:, None] + pair, 2 * t[:, None] + 8 + pair], 1)
    b_cols = np.stack([g] * 4, 1)
    c_rows = np.stack([g, g, g + 8, g + 8], 1)
    c_cols = np.stack([2 * t, 2 * t + 1, 2 * t, 2 * t + 1], 1)
    return a_rows, a_cols, b_rows, b_cols, c_rows, c_cols


def _halves(words: np.ndarray, bf16: bool) -> np.ndarray:
    """The 16-bit elements of 32-bit fragment registers (lower half first) as float64."""
    bits = np.ascontiguousarray(words, dtype=np.uint32).view(np.uint16)
    if bf16:
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return bits.view(np.float16).astype(np.float64)


def _warp_product(a_regs, b_regs, c, bf16: bool) -> np.ndarray:
    """D for one warp from its lanes' fragments: a_regs (32, 4) and b_regs (32, 2) uint32,
    c (32, 4) fp32; returns (32, 4) fp32, each lane's d0..d3."""
    a_rows, a_cols, b_rows, b_cols, c_rows, c_cols = _PLACES
    A = np.zeros((16, 16))
    A[a_rows, a_cols] = _halves(a_regs, bf16).reshape(32, 8)
    B = np.zeros((16, 8))
    B[b_rows, b_cols] = _halves(b_regs, bf16).reshape(32, 4)
    C = np.zeros((16, 8))
    C[c_rows, c_cols] = c
    return (A @ B + C)[c_rows, c_cols].astype(np.float32)


_PLACES = _lane_places()


def mma_into(bf16: bool):
    """acc_into(acc, e, a0, a1, a2, a3, b0, b1): acc[e:e + 4] += A B, the warp's m16n8k16
    product (`mma`) into a lane's four accumulators of one 16 x 8 tile, kept in a local
    array (e a constant once the caller's loops unroll, so the array stays in registers)."""
    product = mma(bf16)

    @device
    def acc_into(acc, e, a0, a1, a2, a3, b0, b1):
        d = product(a0, a1, a2, a3, b0, b1, acc[e], acc[e + 1], acc[e + 2], acc[e + 3])
        acc[e] = d[0]
        acc[e + 1] = d[1]
        acc[e + 2] = d[2]
        acc[e + 3] = d[3]
    return acc_into


# --- reductions over the four lanes of an accumulator row ---------------------------------------

_FULL_MASK = 0xFFFFFFFF


def nanmax(a, b):
    """max(a, b), NaN if either is (Python's and C's max drop a NaN in one order)."""
    return a if a > b or a != a else b


if config.ENABLE_CUDASIM:
    def _block_scratch(name: str, make):
        """(this simulated thread, its block's thread count, the block's scratch arrays
        `name`, made by make(threads) once per block): where the simulator's stand-ins for
        warp-wide instructions (`mma`, the quad reductions) meet."""
        me = threading.current_thread()
        block = me._manager                 # the simulator's BlockManager of this block
        lanes = int(np.prod(block._block_dim))
        with _LOCK:
            state = block.__dict__.get(name)
            if state is None or state[0].shape[0] != lanes:
                state = make(lanes)
                setattr(block, name, state)
        return me, lanes, state

    def _quad_values(v):
        """The values the four lanes of this thread's quad passed (the simulator's shuffle)."""
        me, _, (x,) = _block_scratch("pydl_quad", lambda n: (np.zeros(n, np.float32),))
        i = me.thread_id
        x[i] = v
        me.syncthreads()
        q = x[i & ~3:(i & ~3) + 4].copy()
        me.syncthreads()
        return q, i & 3

    def quad_max(v):
        q, t = _quad_values(v)
        a = [nanmax(q[j], q[j ^ 1]) for j in range(4)]      # after the xor-1 shuffle
        return np.float32(nanmax(a[t], a[t ^ 2]))

    def quad_sum(v):
        q, t = _quad_values(v)
        a = [np.float32(q[j] + q[j ^ 1]) for j in range(4)]
        return np.float32(a[t] + a[t ^ 2])
else:
    nanmax = device(nanmax)

    @device
    def quad_max(v):
        """The NaN-propagating max of v over this lane's quad."""
        v = nanmax(v, cuda.shfl_xor_sync(_FULL_MASK, v, 1))
        return nanmax(v, cuda.shfl_xor_sync(_FULL_MASK, v, 2))

    @device
    def quad_sum(v):
        """The sum of v over this lane's quad."""
        v += cuda.shfl_xor_sync(_FULL_MASK, v, 1)
        return v + cuda.shfl_xor_sync(_FULL_MASK, v, 2)

if config.ENABLE_CUDASIM:
    def mma(bf16: bool):
        """The simulator's mma.sync: every thread of the block calls it the same number of
        times (a block-wide barrier stands for the warp's); the block's first thread computes
        each warp's product from the fragments the lanes left."""
        def product(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            me, lanes, (a, b, c, d) = _block_scratch("pydl_mma", lambda n: (
                np.zeros((n, 4), np.uint32), np.zeros((n, 2), np.uint32),
                np.zeros((n, 4), np.float32), np.zeros((n, 4), np.float32)))
            i = me.thread_id
            a[i] = (a0, a1, a2, a3)
            b[i] = (b0, b1)
            c[i] = (c0, c1, c2, c3)
            me.syncthreads()
            if i == 0:
                for w in range(0, lanes, 32):
                    d[w:w + 32] = _warp_product(a[w:w + 32], b[w:w + 32], c[w:w + 32], bf16)
            me.syncthreads()
            return d[i, 0], d[i, 1], d[i, 2], d[i, 3]
        return product

else:
    def mma(bf16: bool):
        """mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.f32 as a Numba intrinsic:
        product(a0, a1, a2, a3, b0, b1, c0, c1, c2, c3) -> (d0, d1, d2, d3) (uint32 fragment
        registers, fp32 accumulators; layouts above)."""
        return _MMA[bool(bf16)]

    def _mma_intrinsic(kind: str):
        from llvmlite import ir
        from numba import types
        from numba.core.extending import intrinsic
        text = (f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 "
                "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
        formal = (types.uint32,) * 6 + (types.float32,) * 4

        @intrinsic
        def product(typingctx, a0, a1, a2, a3, b0, b1, c0, c1, c2, c3):
            sig = types.UniTuple(types.float32, 4)(*formal)

            def codegen(context, builder, signature, args):
                f32, i32 = ir.FloatType(), ir.IntType(32)
                fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [i32] * 6 + [f32] * 4)
                asm = ir.InlineAsm(fnty, text, "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f")
                out = builder.call(asm, args)
                return context.make_tuple(builder, signature.return_type,
                                          [builder.extract_value(out, j) for j in range(4)])
            return sig, codegen
        return product

    _MMA = {False: _mma_intrinsic("f16"), True: _mma_intrinsic("bf16")}
