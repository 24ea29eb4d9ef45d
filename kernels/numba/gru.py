"""Numba CUDA kernels for the GRU (torch.nn.GRUCell and torch.nn.GRU): the fused step forward
and its gate gradients. Same math, layout, flags and workspace as kernels/triton/gru.py (see
its docstring).

Both are tiled as the LSTM step (kernels/numba/lstm.py): a block of TB x TU threads owns TB
rows x TU units. The forward's x-phase (the cell) and h-phase each stage an A tile (TB x TK)
and the three gates' TK x TU weight tiles in shared memory per K step, accumulating gi and gh
separately (gh_n is needed alone: r multiplies it); a layer's step adds the precomputed xp
instead of the x-phase. The backward's prologue is the LSTM's recurrent GEMM
(recurrent_dh_device), over the 3H rows of W_hh. TB, TU, TK are compile-time constants:
`gru_step_kernel` / `gru_step_bwd_kernel` build and cache one kernel per tiling, launched
with a (tu, tb) block.
"""
from numba import cuda, float32, int64

from ._dtypes import dtype_code  # noqa: F401  (for launchers)
from .lstm import ONE, ZERO, ld1, ld2, recurrent_dh_device, sigmoid, st2, tanh

_KERNELS = {}
_BWD_KERNELS = {}


def gru_step_kernel(tb: int, tu: int, tk: int):
    """The fused GRU step for a TB x TU tile, built on first use. Arguments, in order:
    x (B, I), w_ih (3H, I), xp (B, 3H), b_ih (3H,), h (B, H), w_hh (3H, H), b_hh (3H,),
    h1 (B, H), hn (B, H), ws (B, 4H) fp32; flags has_x, has_xp, has_bih, has_bhh, has_h,
    write_hn; dtype codes of x (and the weights, biases and h), xp, h1, hn."""
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
    def gru_step(x, wih, xp, bih, h, whh, bhh, h1, hn, ws,
                 has_x, has_xp, has_bih, has_bhh, has_h, write_hn,
                 code_x, code_xp, code_h1, code_hn):
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
            gi_r = ZERO
            gi_z = ZERO
            gi_n = ZERO
            gh_r = ZERO
            gh_z = ZERO
            gh_n = ZERO
            if has_x:
                gi_r, gi_z, gi_n = gate_dots3(x, wih, row0, unit0, H, sa, sw, code_x,
                                              gi_r, gi_z, gi_n)
            if has_h:
                gh_r, gh_z, gh_n = gate_dots3(h, whh, row0, unit0, H, sa, sw, code_x,
                                              gh_r, gh_z, gh_n)
            if r < B and u < H:
                if has_xp:
                    gi_r += ld2(xp, r, u, code_xp)
                    gi_z += ld2(xp, r, u + H, code_xp)
                    gi_n += ld2(xp, r, u + 2 * H, code_xp)
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
                h_new = ng + zg * (hv - ng)
                st2(h1, r, u, h_new, code_h1)
                if write_hn:
                    st2(hn, r, u, h_new, code_hn)
                ws[r, u] = rg
                ws[r, u + H] = zg
                ws[r, u + 2 * H] = ng
                ws[r, u + 3 * H] = gh_n

    return gru_step


def gru_step_bwd_kernel(tb: int, tu: int, tk: int):
    """The GRU backward step for a TB x TU tile, built on first use. Arguments, in order:
    ws (B, 4H) fp32, h (B, H), dg_next (B, 3H) fp32, w_hh (3H, H), dha, dhb (B, H),
    dhd (B, H) fp32, dgi, dgh (B, 3H) fp32 (written), dhd_out (B, H) fp32 (written, may
    alias dhd); flags has_h, has_dgn, has_dha, has_dhb, has_dhd; dtype codes of h, w_hh,
    dha, dhb. Same formulas as the Triton kernel gru_step_bwd."""
    key = (int(tb), int(tu), int(tk))
    if key not in _BWD_KERNELS:
        _BWD_KERNELS[key] = _build_bwd(*key)
    return _BWD_KERNELS[key]


def _build_bwd(TB, TU, TK):
    recurrent_dh = recurrent_dh_device(TB, TU, TK)

    @cuda.jit
    def gru_step_bwd(ws, h, dgn, whh, dha, dhb, dhd, dgi, dgh, dhdo,
                     has_h, has_dgn, has_dha, has_dhb, has_dhd, code_h, code_w, code_dha, code_dhb):
        # One shared array per line: the simulator keys shared arrays by source line.
        sa = cuda.shared.array((TB, TK), float32)
        sw = cuda.shared.array((TK, TU), float32)
        B = ws.shape[0]
        H = dgi.shape[1] // 3
        tiles_u = (H + TU - 1) // TU
        tiles = ((B + TB - 1) // TB) * tiles_u
        for tile in range(cuda.blockIdx.x, tiles, cuda.gridDim.x):
            row0 = int64(tile // tiles_u) * TB
            unit0 = int64(tile % tiles_u) * TU
            b = row0 + cuda.threadIdx.y
            u = unit0 + cuda.threadIdx.x
            d = ZERO
            if has_dgn:
                d = recurrent_dh(dgn, whh, row0, unit0, 3 * H, H, sa, sw, code_w)
            if b < B and u < H:
                if has_dha:
                    d += ld2(dha, b, u, code_dha)
                if has_dhb:
                    d += ld2(dhb, b, u, code_dhb)
                if has_dhd:
                    d += dhd[b, u]
                r = ws[b, u]
                z = ws[b, u + H]
                n = ws[b, u + 2 * H]
                ghn = ws[b, u + 3 * H]
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
                dhdo[b, u] = d * z

    return gru_step_bwd
