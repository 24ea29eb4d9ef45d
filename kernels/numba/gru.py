"""Numba CUDA kernels for the GRU cell (torch.nn.GRUCell): the fused forward and the gate
gradients. Same math, layout and workspace as kernels/triton/gru.py (see its docstring).

The forward is tiled as the LSTM step (kernels/numba/lstm.py): a block of TB x TU threads
owns TB rows x TU units; the x-phase and the h-phase each stage an A tile (TB x TK) and the
three gates' TK x TU weight tiles in shared memory per K step, accumulating gi and gh
separately (gh_n is needed alone: r multiplies it). TB, TU, TK are compile-time constants:
`gru_cell_kernel` builds and caches one kernel per tiling, launched with a (tu, tb) block.
"""
from numba import cuda, float32, int64

from ._dtypes import dtype_code  # noqa: F401  (for launchers)
from ._grid import grid_threads, thread_index
from .lstm import ONE, ZERO, ld1, ld2, sigmoid, st2, tanh

_KERNELS = {}


def gru_cell_kernel(tb: int, tu: int, tk: int):
    """The fused GRU cell kernel for a TB x TU tile, built on first use. Arguments: x (B, I),
    w_ih (3H, I), b_ih (3H,), h (B, H), w_hh (3H, H), b_hh (3H,), h1 (B, H), ws (B, 4H) fp32;
    flags has_bih, has_bhh, has_h; dtype codes of x (and the weights), h1."""
    key = (int(tb), int(tu), int(tk))
    if key not in _KERNELS:
        _KERNELS[key] = _build(*key)
    return _KERNELS[key]


def _build(TB, TU, TK):
    NT = TB * TU

    @cuda.jit(device=True)
    def gate_dots3(a, w, row0, unit0, H, sa, sw, code, acc_r, acc_z, acc_n):
        tx = cuda.threadIdx.x
        ty = cuda.threadIdx.y
        tid = ty * TU + tx
        B = a.shape[0]
        K = a.shape[1]
        for k0 in range(0, K, TK):
            for e in range(tid, TB * TK, NT):
                i = e // TK
                kk = e - i * TK
                v = ZERO
                if row0 + i < B and k0 + kk < K:
                    v = ld2(a, row0 + i, k0 + kk, code)
                sa[i, kk] = v
            for e in range(tid, 3 * TU * TK, NT):
                q = e // (TU * TK)
                rem = e - q * (TU * TK)
                j = rem // TK
                kk = rem - j * TK
                v = ZERO
                if unit0 + j < H and k0 + kk < K:
                    v = ld2(w, int64(q) * H + unit0 + j, k0 + kk, code)
                sw[q, kk, j] = v
            cuda.syncthreads()
            for kk in range(TK):
                av = sa[ty, kk]
                acc_r += av * sw[0, kk, tx]
                acc_z += av * sw[1, kk, tx]
                acc_n += av * sw[2, kk, tx]
            cuda.syncthreads()
        return acc_r, acc_z, acc_n

    @cuda.jit
    def gru_cell(x, wih, bih, h, whh, bhh, h1, ws, has_bih, has_bhh, has_h, code_x, code_h1):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((3, TK, TU), float32)
        B = h1.shape[0]
        H = h1.shape[1]
        tiles_u = (H + TU - 1) // TU
        tiles = ((B + TB - 1) // TB) * tiles_u
        for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
            row0 = int64(tile // tiles_u) * TB
            unit0 = int64(tile % tiles_u) * TU
            r = row0 + cuda.threadIdx.y
            u = unit0 + cuda.threadIdx.x
            gi_r, gi_z, gi_n = gate_dots3(x, wih, row0, unit0, H, sa, sw, code_x, ZERO, ZERO, ZERO)
            gh_r = ZERO
            gh_z = ZERO
            gh_n = ZERO
            if has_h:
                gh_r, gh_z, gh_n = gate_dots3(h, whh, row0, unit0, H, sa, sw, code_x,
                                              gh_r, gh_z, gh_n)
            if r < B and u < H:
                if has_bih:
                    gi_r += ld1(bih, u, code_x)
                    gi_z += ld1(bih, u + H, code_x)
                    gi_n += ld1(bih, u + 2 * H, code_x)
                if has_bhh:
                    gh_r += ld1(bhh, u, code_x)
                    gh_z += ld1(bhh, u + H, code_x)
                    gh_n += ld1(bhh, u + 2 * H, code_x)
                rg = sigmoid(gi_r + gh_r)
                zg = sigmoid(gi_z + gh_z)
                ng = tanh(gi_n + rg * gh_n)
                hv = ZERO
                if has_h:
                    hv = ld2(h, r, u, code_x)
                st2(h1, r, u, ng + zg * (hv - ng), code_h1)
                ws[r, u] = rg
                ws[r, u + H] = zg
                ws[r, u + 2 * H] = ng
                ws[r, u + 3 * H] = gh_n

    return gru_cell


@cuda.jit
def gru_cell_bwd(ws, h, dh1, dgi, dgh, dhd, has_h, code_h, code_dh1):
    """Gate gradients of one GRU step, one thread per (row, unit), grid-stride; same formulas
    and arguments as the Triton kernel (ws, dgi, dgh, dhd fp32)."""
    B = dh1.shape[0]
    H = dh1.shape[1]
    for e in range(thread_index(), int64(B) * H, grid_threads()):
        b = e // H
        u = e - b * H
        r = ws[b, u]
        z = ws[b, u + H]
        n = ws[b, u + 2 * H]
        ghn = ws[b, u + 3 * H]
        d = ld2(dh1, b, u, code_dh1)
        hv = ZERO
        if has_h:
            hv = ld2(h, b, u, code_h)
        dan = d * (ONE - z) * (ONE - n * n)
        dar = dan * ghn * r * (ONE - r)
        daz = d * (hv - n) * z * (ONE - z)
        dgi[b, u] = dar
        dgi[b, u + H] = daz
        dgi[b, u + 2 * H] = dan
        dgh[b, u] = dar
        dgh[b, u + H] = daz
        dgh[b, u + 2 * H] = dan * r
        dhd[b, u] = d * z

