"""pydl._gemm.gemm (the Triton tiled GEMM every op shares) against torch.matmul in float64:
odd sizes (partial tiles on every side), transposed / strided / broadcast operands, batches,
alpha, bias, accumulate and a separate addend."""
import pytest
import torch
from conftest import DEVICE, DTYPES, fuzz_seeds, take_tma_gemm

from pydl._gemm import gemm, gemm_config
from pydl._plan import clear_all as clear_plans
from pydl.testing import assert_close, random_tensor, uses_tf32

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)
TF32 = uses_tf32(DEVICE, cudnn=False)


def expected(a, b, trans_a=False, trans_b=False):
    a, b = a.double(), b.double()
    return (a.mT if trans_a else a) @ (b.mT if trans_b else b)


@dtypes
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("mnk", [(1, 1, 1), (37, 29, 45), (130, 17, 70)], ids=str)
def test_gemm_2d(dtype, trans_a, trans_b, mnk):
    M, N, K = mnk
    a = random_tensor((K, M) if trans_a else (M, K), dtype, DEVICE)
    b = random_tensor((N, K) if trans_b else (K, N), dtype, DEVICE)
    out = torch.empty(M, N, dtype=dtype, device=DEVICE)
    assert gemm(a, b, out, trans_a=trans_a, trans_b=trans_b) is out
    assert_close(out, expected(a, b, trans_a, trans_b), dtype, reduction=K, tf32=TF32)


def test_gemm_strided_operands_and_output():
    """Sliced, transposed and broadcast views, and an output written through its strides."""
    M, N, K = 23, 19, 33
    a = random_tensor((2 * M, K + 5), torch.float32, DEVICE)[::2, 3:3 + K]   # row stride 2*(K+5)
    b = random_tensor((N, K), torch.float32, DEVICE).t()                    # column-major
    big = torch.full((N, 2 * M), float("nan"), device=DEVICE)
    out = big.t()[::2]                                                     # (M, N), strides (2, 2M)
    gemm(a, b, out)
    assert_close(out, expected(a, b), torch.float32, reduction=K)
    assert torch.isnan(big[:, 1::2]).all(), "wrote outside the output view"


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float16], ids=str)
def test_gemm_batched_alpha_bias_accumulate(acc_dtype):
    """Two batch dims, b broadcast over the first (stride 0), alpha, a per-batch bias, then
    accumulate into the result, then an fp32 addend into a 16-bit output."""
    B1, B2, M, N, K = 2, 3, 21, 18, 40
    a = random_tensor((B1, B2, M, K), acc_dtype, DEVICE)
    b = random_tensor((B2, N, K), acc_dtype, DEVICE)
    bias = random_tensor((B2, N), acc_dtype, DEVICE)
    out = torch.empty(B1, B2, M, N, dtype=acc_dtype, device=DEVICE)
    gemm(a, b, out, trans_b=True, alpha=0.5, bias=bias)
    want = 0.5 * expected(a, b, trans_b=True) + bias.double()[:, None, :]
    assert_close(out, want, acc_dtype, reduction=K)
    c = random_tensor((M, K), acc_dtype, DEVICE)
    gemm(c, b, out, trans_b=True, accumulate=True)                     # a broadcast over B1, B2
    want = want + expected(c, b, trans_b=True)
    assert_close(out, want, acc_dtype, reduction=2 * K)
    d = random_tensor((B1, B2, M, N), torch.float32, DEVICE)
    gemm(a, b, out, trans_b=True, addend=d)
    assert_close(out, expected(a, b, trans_b=True) + d.double(), acc_dtype, reduction=K)


def test_gemm_empty_reduction_writes_bias_or_zeros():
    out = torch.full((5, 7), float("nan"), device=DEVICE)
    gemm(torch.empty(5, 0, device=DEVICE), torch.empty(0, 7, device=DEVICE), out)
    assert (out == 0).all()
    bias = random_tensor(7, torch.float32, DEVICE)
    gemm(torch.empty(5, 0, device=DEVICE), torch.empty(0, 7, device=DEVICE), out, bias=bias)
    assert_close(out, bias.expand(5, 7), torch.float32)


def test_gemm_grouped_ordering_covers_every_tile():
    """More tile rows than GROUP_M and a ragged last group: every tile is computed once."""
    N, K = 265, 16
    cfg = gemm_config(1024, N, K, torch.float32)
    M = cfg["BLOCK_M"] * (cfg["GROUP_M"] + 3) - 5        # 11 tile rows: a group of 8, one of 3
    assert gemm_config(M, N, K, torch.float32) == cfg and N > 2 * cfg["BLOCK_N"]
    a = random_tensor((M, K), torch.float32, DEVICE)
    b = random_tensor((K, N), torch.float32, DEVICE)
    out = torch.full((M, N), float("nan"), device=DEVICE)
    gemm(a, b, out)
    assert_close(out, expected(a, b), torch.float32, reduction=K)


def _nan_padded(shape, dtype):
    """A random matrix viewed in a larger one whose other elements are NaN (8 more along each
    axis: its row pitch stays a multiple of 16 bytes): a kernel reading past its edges along
    K gives NaN, as a zero fill would not."""
    big = torch.full((shape[0] + 8, shape[1] + 8), float("nan"), dtype=dtype, device=DEVICE)
    view = big[:shape[0], :shape[1]]
    view.copy_(random_tensor(shape, dtype, DEVICE))
    return view


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=str)
@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("tma_out", [True, False], ids=["c-tma", "c-ptr"])
@pytest.mark.parametrize("flatten", [True, False], ids=["flat", "per-tile"])
def test_gemm_tma_kernel(monkeypatch, dtype, trans_a, trans_b, tma_out, flatten):
    """The persistent TMA kernel (a 16-bit matrix product whose operands TMA can address) on
    each stored layout of A and B (read along either axis through its descriptor), its output
    written by TMA stores (rows 16 bytes apart) or by pointer stores (rows 8 bytes apart),
    ragged edges on every side (the descriptors' bounds: NaN lies past A's and B's, and C's
    must stay), several tiles a program, with alpha and a bias, accumulating, with an fp32
    addend and capped; each tile's pipeline flattened into one per program (one program a
    multiprocessor) or drained per tile (two); and where a base is not 16-byte aligned, the
    pointer kernel (a descriptor could not address it)."""
    offered, grids = take_tma_gemm(monkeypatch, FLATTEN=flatten, PER_SM=1 if flatten else 2)
    programs = 2 if flatten else 4
    M, N, K = 136, 72, 88       # 3 x 3 tiles, each ragged last; K in two steps, one partial
    a = _nan_padded((K, M) if trans_a else (M, K), dtype)
    b = _nan_padded((N, K) if trans_b else (K, N), dtype)
    bias = random_tensor(N, dtype, DEVICE)
    c_big = torch.full((M + 8, N + (8 if tma_out else 4)), float("nan"), dtype=dtype,
                       device=DEVICE)
    out = c_big[:M, :N]
    product = expected(a, b, trans_a, trans_b)
    gemm(a, b, out, trans_a=trans_a, trans_b=trans_b, alpha=0.5, bias=bias)
    assert offered == [True] and grids == [((programs,), tma_out)], (offered, grids)
    want = 0.5 * product + bias.double()
    assert_close(out, want, dtype, reduction=K)
    gemm(a, b, out, trans_a=trans_a, trans_b=trans_b, accumulate=True)
    assert_close(out, want + product, dtype, reduction=2 * K)
    acc = random_tensor((M, N), torch.float32, DEVICE)
    gemm(a, b, out, trans_a=trans_a, trans_b=trans_b, addend=acc)
    assert_close(out, product + acc.double(), dtype, reduction=K)
    gemm(a, b, out, trans_a=trans_a, trans_b=trans_b, softcap=4.0)
    assert_close(out, 4.0 * torch.tanh(product / 4.0), dtype, reduction=K)
    assert len(grids) == 4
    assert torch.isnan(c_big[M:]).all() and torch.isnan(c_big[:, N:]).all(), \
        "wrote outside the output"
    # A's base one element into a row (its row pitch still 16-byte), then C's: the pointer
    # kernel
    big = random_tensor((K, M + 8) if trans_a else (M, K + 8), dtype, DEVICE)
    shifted = big[:, 1:1 + M] if trans_a else big[:, 1:1 + K]
    clear_plans()
    grids.clear()
    gemm(shifted, b, out, trans_a=trans_a, trans_b=trans_b)
    assert grids == [] and offered[-1]
    assert_close(out, expected(shifted, b, trans_a, trans_b), dtype, reduction=K)
    if tma_out:         # an output starting one element into its storage (pitch kept)
        shifted_out = c_big.view(-1)[1:1 + M * (N + 8)].view(M, N + 8)[:, :N]
        gemm(a, b, shifted_out, trans_a=trans_a, trans_b=trans_b)
        assert grids == []
        assert_close(shifted_out, product, dtype, reduction=K)


def test_gemm_tma_kernel_tf32(monkeypatch):
    """fp32 operands multiplied as TF32 take the TMA kernel where both are stored along K
    (wgmma's TF32 reads K-major operands only): x W^T with W (N, K), as a linear layer keeps
    it; not x W with W (K, N), nor as exact fp32 ("ieee": not the tensor cores)."""
    offered, grids = take_tma_gemm(monkeypatch)
    M, N, K = 72, 40, 48
    x = random_tensor((M, K), torch.float32, DEVICE)
    w = random_tensor((N, K), torch.float32, DEVICE)
    out = torch.empty(M, N, device=DEVICE)
    gemm(x, w, out, trans_b=True, input_precision="tf32")
    assert offered == [True] and len(grids) == 1
    assert_close(out, expected(x, w, trans_b=True), torch.float32, reduction=K, tf32=True)
    gemm(x, w.t().contiguous(), out, input_precision="tf32")
    gemm(x, w, out, trans_b=True, input_precision="ieee")
    assert offered == [True, False, False] and len(grids) == 1
    assert_close(out, expected(x, w, trans_b=True), torch.float32, reduction=K)


def test_gemm_tma_fuzz(request, monkeypatch):
    """Random 16-bit products with the TMA kernel taken wherever offered: sizes (multiples of
    8 or not: descriptors or the pointer kernel), each operand stored either way, sometimes a
    view into wider rows, maybe one element in (an unaligned base: the fallback), outputs with
    padded rows or a column-major one, a batch by one broadcast B (folded), alpha and a bias,
    accumulate, an fp32 addend or output, softcap; both schedules. Each against float64.
    PYDL_FUZZ_SEED=<seed> reruns one case."""
    for seed in fuzz_seeds(request, 6, 150):
        _tma_fuzz_case(monkeypatch, seed)
        clear_plans()


def _tma_fuzz_case(monkeypatch, seed: int) -> None:
    import numpy as np
    rng = np.random.default_rng(5000 + seed)
    dtypes = [d for d in DTYPES if d.itemsize == 2]
    flatten = bool(rng.random() < 0.5)
    offered, grids = take_tma_gemm(monkeypatch, FLATTEN=flatten, PER_SM=1 if flatten else 2)

    def size():
        return int(rng.choice([8, 16, 24, 40, 72, 80, 136])) if rng.random() < 0.7 \
            else int(rng.integers(1, 90))
    M, N, K = size(), size(), size()
    T = int(rng.integers(2, 4)) if rng.random() < 0.25 else 0      # a batch by one B
    dtype = dtypes[int(rng.integers(len(dtypes)))]
    trans_a = not T and bool(rng.random() < 0.5)
    trans_b = bool(rng.random() < 0.5)

    def operand(*shape):
        if rng.random() < 0.3:              # a view into wider rows, maybe one element in
            start = int(rng.integers(0, 2))
            big = random_tensor((*shape[:-1], shape[-1] + 8), dtype, DEVICE)
            return big[..., start:start + shape[-1]]
        return random_tensor(shape, dtype, DEVICE)
    a = operand(K, M) if trans_a else operand(*((T,) if T else ()), M, K)
    b = operand(N, K) if trans_b else operand(K, N)
    out_dtype = torch.float32 if rng.random() < 0.2 else dtype
    if rng.random() < 0.2 and not T:
        out = torch.empty(N, M, dtype=out_dtype, device=DEVICE).t()        # column-major
    else:
        out = torch.empty(*((T,) if T else ()), M, N + int(rng.choice([0, 4, 8])),
                          dtype=out_dtype, device=DEVICE)[..., :N]
    kind = str(rng.choice(["plain", "bias", "accumulate", "addend", "softcap"]))
    want = expected(a, b, trans_a, trans_b)
    kw = {}
    if kind == "bias":
        bias = random_tensor(N, dtype, DEVICE)
        kw, want = dict(bias=bias, alpha=0.5), 0.5 * want + bias.double()
    elif kind == "accumulate":
        out.copy_(random_tensor(out.shape, out_dtype, DEVICE))
        kw, want = dict(accumulate=True), want + out.double()
    elif kind == "addend":
        addend = random_tensor(out.shape, torch.float32, DEVICE)
        kw, want = dict(addend=addend), want + addend.double()
    elif kind == "softcap":
        kw, want = dict(softcap=3.0), 3.0 * torch.tanh(want / 3.0)
    gemm(a, b, out, trans_a=trans_a, trans_b=trans_b, **kw)
    case = (seed, M, N, K, T, dtype, trans_a, trans_b, kind, out_dtype, flatten, offered, grids)
    # the tolerance of the operands' dtype: an fp32 output holds a 16-bit product
    assert_close(out, want, dtype, reduction=2 * max(K, 1), name=str(case))


def test_gemm_tma_kernel_not_offered(monkeypatch):
    """No TMA kernel where a descriptor could not address an operand or the product is not one
    16-bit matrix: a row pitch not a multiple of 16 bytes, fp32, a batch, K = 0."""
    offered, grids = take_tma_gemm(monkeypatch)
    h = torch.float16

    def rand(*shape, dtype=h):
        return random_tensor(shape, dtype, DEVICE)
    cases = [(rand(40, 36), rand(36, 24)),                  # A's rows 72 bytes apart
             (rand(40, 32), rand(32, 20)),                  # B's rows 40 bytes apart
             (rand(40, 32, dtype=torch.float32), rand(32, 24, dtype=torch.float32)),
             (rand(2, 40, 32), rand(2, 32, 24)),             # a batch of products
             (rand(40, 8)[:, :0], rand(8, 24)[:0])]         # K = 0: a descriptor needs K
    for a, b in cases:
        out = torch.empty(*a.shape[:-1], b.shape[-1], dtype=a.dtype, device=DEVICE)
        gemm(a, b, out)
        assert_close(out, a.double() @ b.double(), a.dtype, reduction=max(1, a.shape[-1]),
                     tf32=TF32)
    assert offered == [False] * len(cases) and grids == []


def test_gemm_tma_candidates_fit_shared_memory(monkeypatch):
    """A TMA candidate is offered only where its operands' ring and its output tile's staging
    fit a block's shared memory, and two of them a multiprocessor's where it runs two: a
    16-bit product's 128 x 256 tiles and two-a-multiprocessor 128 x 128 ones into a 16-bit
    output, not into an fp32 one (272 KiB; 2 x 128 KiB); the one-a-multiprocessor 128 x 128
    tile fits either way."""
    from pydl import _gemm
    seen = {}

    def pick(key, candidates, launch, inout=()):
        seen[key[1]] = {(c["BLOCK_M"], c["BLOCK_N"], c.get("PER_SM", 1)) for c in candidates
                        if c.get("TMA")}
        return candidates[0]
    monkeypatch.setattr(_gemm.GEMM_TUNER, "pick", pick)
    a = random_tensor((256, 64), torch.float16, DEVICE)
    b = random_tensor((64, 512), torch.float16, DEVICE)
    for dtype in (torch.float16, torch.float32):
        gemm(a, b, torch.empty(256, 512, dtype=dtype, device=DEVICE))
    assert seen[torch.float16] == {(128, 128, 1), (128, 128, 2), (128, 256, 1), (256, 128, 1)}
    assert seen[torch.float32] == {(128, 128, 1)}


def test_gemm_plan_holds_no_operand():
    """A kept plan holds none of the tensors it was built on, nor a reference cycle that would
    until the next collection (a recurrent layer frees its input projection as soon as its
    recurrence is launched): the TMA kernel's signature and the pointer kernel's."""
    import gc
    import weakref
    gc.disable()
    try:
        for dtype in (torch.float16, torch.float32):
            clear_plans()
            a, b = random_tensor((40, 32), dtype, DEVICE), random_tensor((24, 32), dtype, DEVICE)
            out = torch.empty(40, 24, dtype=dtype, device=DEVICE)
            refs = [weakref.ref(t) for t in (a, b, out)]
            gemm(a, b, out, trans_b=True)
            del a, b, out
            assert [r() for r in refs] == [None] * 3, dtype
    finally:
        gc.enable()


def test_gemm_broadcast_batch_is_one_matrix(monkeypatch):
    """A batch of products by one B (broadcast over the batch, as a recurrent layer projects
    every time step by one weight), with A's and C's batches one after another, runs as one
    product of every batch's rows: one tile grid (no batch axis), full-height tiles; with a
    bias too. A's batches apart (a strided view), or B per batch, keep the batch."""
    from conftest import spy_kernels

    from pydl.kernels.triton import gemm as k
    grids = []
    spy_kernels(monkeypatch, k, ["gemm_kernel"],
                lambda name, args, kwargs, grid: grids.append((grid, args[5])), with_grid=True)
    T, B, K, N = 5, 6, 24, 20
    w = random_tensor((N, K), torch.float32, DEVICE)
    bias = random_tensor(N, torch.float32, DEVICE)
    x = random_tensor((T, B, K), torch.float32, DEVICE)
    out = torch.empty(T, B, N, device=DEVICE)
    gemm(x, w, out, trans_b=True, bias=bias)
    assert_close(out, expected(x, w, trans_b=True) + bias.double(), torch.float32, reduction=K,
                 tf32=TF32)
    cfg = gemm_config(T * B, N, K, torch.float32)
    tiles = -(-T * B // cfg["BLOCK_M"]) * -(-N // cfg["BLOCK_N"])
    assert grids == [((tiles, 1, 1), T * B)]        # one grid over the T B rows (M, 6th arg)
    for a, b in ((random_tensor((T, 2 * B, K), torch.float32, DEVICE)[:, :B], w.t()),
                 (x, random_tensor((T, K, N), torch.float32, DEVICE))):
        grids.clear()
        gemm(a, b, out)
        assert_close(out, expected(a, b), torch.float32, reduction=K, tf32=TF32)
        assert [g[0][2] for g in grids] == [T]      # the batch kept: T programs deep


def test_gemm_default_for_element_loads(monkeypatch):
    """Operands that Triton cannot load in vectors (an extent or a stride not a multiple of
    16: the 147-wide im2col columns of a 7x7 stem) take a default tile of 32-deep K steps on 8
    warps from 128 x 64 up, one that compiles without spills for sm_90 (gemm_config); aligned
    ones keep the 64-deep 16-bit steps on 4 warps. The default is the tuner's first candidate,
    and the tuning key says which kind the operands are."""
    from pydl import _gemm, _plan
    from pydl._gemm import vector_loads
    picked = []

    def pick(key, candidates, launch, inout=()):
        picked.append((key, candidates[0]))
        return candidates[0]
    monkeypatch.setattr(_gemm.GEMM_TUNER, "pick", pick)
    _plan.clear_all()
    try:
        for K, vectors in ((147, False), (160, True)):
            a = random_tensor((128, K), torch.float16, DEVICE)
            w = random_tensor((64, K), torch.float16, DEVICE)
            out = torch.empty(128, 64, dtype=torch.float16, device=DEVICE)
            gemm(a, w, out, trans_b=True)
            assert_close(out, expected(a, w, trans_b=True), torch.float16, reduction=K)
            key, cfg = picked[-1]
            assert key[-2] is vectors
            assert (cfg["BLOCK_K"], cfg["num_warps"]) == ((64, 4) if vectors else (32, 8)), K
    finally:
        _plan.clear_all()
    m = torch.empty(64, 48)
    assert vector_loads(m[None, None], m.t()[None, None])           # unit stride either way
    assert not vector_loads(m[None, None, :, :40], m[None, None])   # a 40-element extent
    assert not vector_loads(torch.empty(64, 50)[None, None, :, :48], m[None, None])  # stride 50
    assert not vector_loads(m[None, None, :, ::2], m[None, None])   # no unit stride
    assert vector_loads(m.expand(3, 64, 48)[None], m[None, None])   # broadcast: stride 0


def test_gemm_bad_arguments():
    a = torch.zeros(4, 5, device=DEVICE)
    with pytest.raises(ValueError, match="shapes"):
        gemm(a, torch.zeros(4, 3, device=DEVICE), torch.empty(4, 3, device=DEVICE))
    with pytest.raises(TypeError, match="dtype"):
        gemm(a, torch.zeros(5, 3, device=DEVICE).half(), torch.empty(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="not both"):
        out = torch.empty(4, 3, device=DEVICE)
        gemm(a, torch.zeros(5, 3, device=DEVICE), out, accumulate=True, addend=out)
    with pytest.raises(ValueError, match="broadcast"):
        gemm(torch.zeros(2, 4, 5, device=DEVICE), torch.zeros(3, 5, 3, device=DEVICE),
             torch.empty(2, 4, 3, device=DEVICE))


@pytest.mark.gpu
@pytest.mark.full
def test_gemm_beyond_int32_offsets():
    """An operand of more than 2**31 elements: offsets must be computed in int64."""
    M, N, K = 2 ** 16 + 3, 16, 2 ** 15
    a = torch.randn(M, K, device="cuda", dtype=torch.float16)
    b = torch.randn(K, N, device="cuda", dtype=torch.float16)
    out = torch.empty(M, N, device="cuda", dtype=torch.float16)
    gemm(a, b, out)
    assert_close(out[-5:], expected(a[-5:], b), torch.float16, reduction=K)
