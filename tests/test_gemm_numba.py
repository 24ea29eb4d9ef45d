"""pydl._gemm_numba.gemm (the Numba tiled GEMM) against float64 torch.matmul: partial tiles on
every side, strided / transposed / broadcast operands, an output written through its strides
(including the transposed-problem path), the batch-axis reduction, addend, bias, mixed dtypes,
and the GPU's untrimmed code path run in the simulator; the tensor-core kernel for 16-bit
operands (kernels/numba/gemm_mma.py) likewise, on the GPU and in the simulator where its
warp product is emulated from the PTX fragment layouts."""
import pytest
import torch
from conftest import DEVICE, DTYPES

import pydl._gemm_numba as G
from pydl.testing import assert_close, random_tensor

HALF = [d for d in DTYPES if d != torch.float32]


def expected(a, b, out_shape, addend=None, bias=None):
    r = a.double() @ b.double()
    if out_shape[1] == 1 and r.shape[1] != 1:
        r = r.sum(1, keepdim=True)
    if addend is not None:
        r = r + addend.double()
    if bias is not None:
        r = r + bias.double().reshape(-1, 1, 1, bias.shape[-1])
    return r


@pytest.mark.parametrize("orient", ["nn", "tt"])
def test_gemm_odd_sizes_and_orientations(orient):
    """M, N, K not multiples of the tile; row- or column-major operands (both tile-load
    mappings); a row-major output and a column-major one (computed as out^T = b^T a^T), bias
    along columns and then along rows."""
    M, N, K = 37, 45, 70
    if orient == "nn":
        a = random_tensor((1, 1, M, K), torch.float32, DEVICE)
        b = random_tensor((1, 1, K, N), torch.float32, DEVICE)
        out = torch.full((1, 1, M, N), float("nan"), device=DEVICE)
    else:
        a = random_tensor((1, 1, K, M), torch.float32, DEVICE).transpose(2, 3)
        b = random_tensor((1, 1, N, K), torch.float32, DEVICE).transpose(2, 3)
        out = torch.full((1, 1, N, M), float("nan"), device=DEVICE).transpose(2, 3)
    bias = random_tensor(N, torch.float32, DEVICE)
    G.gemm(a, b, out, bias=bias)
    assert_close(out, expected(a, b, out.shape, bias=bias), torch.float32, reduction=K)


def test_gemm_long_reduction_keeps_small_products():
    """fp32 products summed over K = 4096: 1 and then 4095 products of 2^-25 (each below
    half an ulp of 1). One running sum rounds every one of them away (1.0, off by 1.2e-4:
    outside fp32's tolerance for this reduction length, as a sequential sum of the same
    products is); the kernel sums each K tile apart, then adds the tiles, and loses only the
    first tile's."""
    K = 4096
    a = torch.full((1, 1, 1, K), 2.0 ** -25, device=DEVICE)
    a[..., 0] = 1.0
    b = torch.ones((1, 1, K, 1), device=DEVICE)
    out = torch.empty((1, 1, 1, 1), device=DEVICE)
    G.gemm(a, b, out)
    assert_close(out, expected(a, b, out.shape), torch.float32, reduction=K)


def test_gemm_batches_broadcast_reduce_and_c_in():
    """(B1, B2) batches with b broadcast over B2; then the B2 axis summed into a B2c = 1
    output, added to addend; a sliced output view leaves its neighbours alone."""
    B1, B2, M, N, K = 2, 3, 9, 11, 13
    a = random_tensor((B1, B2, M, K), torch.float32, DEVICE)
    b = random_tensor((B1, 1, K, N), torch.float32, DEVICE)
    big = torch.full((B1, B2, M, 2 * N), float("nan"), device=DEVICE)
    out = big[..., ::2]
    bias = random_tensor((B1, N), torch.float32, DEVICE)
    G.gemm(a, b, out, bias=bias)
    assert_close(out, expected(a, b, out.shape, bias=bias), torch.float32, reduction=K)
    assert torch.isnan(big[..., 1::2]).all(), "wrote outside the output view"
    b2 = random_tensor((B1, B2, K, N), torch.float32, DEVICE)
    addend = random_tensor((B1, 1, M, N), torch.float32, DEVICE)
    red = torch.empty(B1, 1, M, N, device=DEVICE)
    G.gemm(a, b2, red, addend=addend)
    assert_close(red, expected(a, b2, red.shape, addend=addend), torch.float32, reduction=B2 * K)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_gemm_half_operands_fp32_accumulator(dtype):
    """16-bit operands into an fp32 output; then an fp32 addend into a 16-bit output."""
    M, N, K = 20, 7, 40
    a = random_tensor((1, 1, M, K), dtype, DEVICE)
    b = random_tensor((1, 1, K, N), dtype, DEVICE)
    acc = torch.empty(1, 1, M, N, device=DEVICE)
    G.gemm(a, b, acc)
    assert_close(acc, expected(a, b, acc.shape), torch.float32, reduction=K)
    out = torch.empty(1, 1, M, N, dtype=dtype, device=DEVICE)
    G.gemm(a, b, out, addend=acc)
    assert_close(out, 2 * expected(a, b, out.shape), dtype, reduction=K)


@pytest.mark.skipif(DEVICE == "cuda", reason="the simulator's tile settings")
@pytest.mark.parametrize("tile,micro", [(8, 2), (4, 1)])
def test_gemm_untrimmed_path_other_tiles(monkeypatch, tile, micro):
    """The code path a GPU runs (no trimming: zero-filled tile edges, full loops) and other
    tile shapes, in the simulator."""
    monkeypatch.setattr(G, "SIM_TILE", tile)
    monkeypatch.setattr(G, "SIM_MICRO", micro)
    monkeypatch.setattr(G, "SIM_TRIM", False)
    M, N, K = 11, 6, 13
    a = random_tensor((2, 1, K, M), torch.float32, DEVICE).transpose(2, 3)
    b = random_tensor((1, 1, K, N), torch.float32, DEVICE)
    out = torch.empty(2, 1, N, M, device=DEVICE).transpose(2, 3)
    bias = random_tensor((2, N), torch.float32, DEVICE)
    G.gemm(a, b, out, bias=bias)
    assert_close(out, expected(a, b, out.shape, bias=bias), torch.float32, reduction=K)


class _Launched(list):
    """The modules of the kernels launched; `.made`: their builder arguments."""


@pytest.fixture
def tensor_cores(monkeypatch):
    """The 16-bit products on the tensor-core kernel (MMA on: off by default until a GPU has
    run it), in the simulator too, and a record of the kernels launched (their builder
    tags)."""
    from pydl.kernels.numba._builder import BUILT_BY
    monkeypatch.setattr(G, "MMA", True)
    launched, made = _Launched(), []
    real = G.launch_numba

    def spy(kernel, *args):
        module, _, built = getattr(kernel, BUILT_BY, ("", "", ()))
        launched.append(module.rpartition(".")[2])
        made.append(built)
        return real(kernel, *args)
    monkeypatch.setattr(G, "launch_numba", spy)
    launched.made = made
    return launched


# each dtype (the Numba simulator decodes bf16 exactly), orientation and K parity once
@pytest.mark.parametrize("dtype,orient,K", [(torch.float16, "nn", 39), (torch.bfloat16, "tt", 39),
                                            (torch.bfloat16, "tt", 40), (torch.float16, "nt", 40)],
                         ids=["fp16-nn-odd", "bf16-tt-odd", "bf16-tt-even", "fp16-nt-even"])
def test_gemm_tensor_cores_edges_and_orientations(tensor_cores, dtype, orient, K):
    """fp16 / bf16 operands on the mma.sync kernel: M, N, K past one tile and not multiples of
    the fragment (K odd: the last pair half empty), row- or column-major operands (both
    staging walks; with K even, an operand whose K axis is contiguous staged a word a pair),
    a row-major output with a bias along columns and a column-major one (the transposed
    problem, b^T a^T: bias along rows), into an fp32 and a 16-bit output. (The simulator's
    tile is 32 x 32, 32 deep.)"""
    M, N = 21, 37
    a = random_tensor((1, 1, M, K), dtype, DEVICE) if orient[0] == "n" else \
        random_tensor((1, 1, K, M), dtype, DEVICE).transpose(2, 3)
    b = random_tensor((1, 1, K, N), dtype, DEVICE) if orient[1] == "n" else \
        random_tensor((1, 1, N, K), dtype, DEVICE).transpose(2, 3)
    if orient == "tt":
        out = torch.full((1, 1, N, M), float("nan"), device=DEVICE).transpose(2, 3)
    else:
        out = torch.full((1, 1, M, N), float("nan"), device=DEVICE)
    bias = random_tensor(N, torch.float32, DEVICE)
    G.gemm(a, b, out, bias=bias)
    assert tensor_cores == ["gemm_mma"]
    # (warps, warps, bf16, A in words, B in words): with K even, the A of nn and of tt's
    # transposed problem (b^T), both of nt
    even = K % 2 == 0
    assert tensor_cores.made[0][2:] == (dtype == torch.bfloat16, even, even and orient == "nt")
    assert_close(out, expected(a, b, out.shape, bias=bias), torch.float32, reduction=K)
    low = torch.empty(1, 1, M, N, dtype=dtype, device=DEVICE)
    G.gemm(a, b, low, addend=out)
    assert_close(low, expected(a, b, low.shape, addend=out), dtype, reduction=K)


def test_gemm_tensor_cores_batches_and_reduction(tensor_cores):
    """Batch axes on the tensor-core kernel: b broadcast over B2 into a sliced output view
    (its neighbours untouched), then the B2 axis summed into B2c = 1 with an addend."""
    B1, B2, M, N, K = 2, 3, 9, 11, 18
    a = random_tensor((B1, B2, M, K), torch.float16, DEVICE)
    b = random_tensor((B1, 1, K, N), torch.float16, DEVICE)
    big = torch.full((B1, B2, M, 2 * N), float("nan"), device=DEVICE)
    out = big[..., ::2]
    G.gemm(a, b, out)
    assert_close(out, expected(a, b, out.shape), torch.float32, reduction=K)
    assert torch.isnan(big[..., 1::2]).all(), "wrote outside the output view"
    b2 = random_tensor((B1, B2, K, N), torch.float16, DEVICE)
    addend = random_tensor((B1, 1, M, N), torch.float32, DEVICE)
    red = torch.empty(B1, 1, M, N, device=DEVICE)
    G.gemm(a, b2, red, addend=addend)
    assert_close(red, expected(a, b2, red.shape, addend=addend), torch.float32,
                 reduction=B2 * K)


@pytest.mark.skipif(DEVICE == "cuda", reason="the simulator's warp settings")
def test_gemm_tensor_cores_several_warps(tensor_cores, monkeypatch):
    """The GPU's block of 2 x 2 warps in the simulator: each warp's fragments from its own
    32 x 32 block of the tile, the staging split over 128 threads."""
    monkeypatch.setattr(G, "SIM_WARPS_MMA", G.WARPS_MMA)
    M, N, K = 70, 40, 32
    a = random_tensor((1, 1, K, M), torch.bfloat16, DEVICE).transpose(2, 3)
    b = random_tensor((1, 1, K, N), torch.bfloat16, DEVICE)
    out = torch.full((1, 1, M, N), float("nan"), device=DEVICE)
    G.gemm(a, b, out)
    assert_close(out, expected(a, b, out.shape), torch.float32, reduction=K)


@pytest.mark.parametrize("case", ["mma-off", "mixed-dtypes"])
def test_gemm_cuda_core_cases(tensor_cores, monkeypatch, case):
    """The CUDA-core kernel (the one a GPU has verified) takes 16-bit operands without MMA
    (the default until a GPU has run the tensor-core kernel; PYDL_NUMBA_MMA=1 sets it), and
    operands of two dtypes with it (an fp32 gradient times fp16 weights: each decoded by its
    own dtype code)."""
    if case == "mma-off":
        monkeypatch.setattr(G, "MMA", False)
    a = random_tensor((1, 1, 5, 6), torch.float16 if case == "mma-off" else torch.float32,
                      DEVICE)
    b = random_tensor((1, 1, 6, 7), torch.float16, DEVICE)
    out = torch.empty(1, 1, 5, 7, device=DEVICE)
    G.gemm(a, b, out)
    assert tensor_cores == ["gemm"]
    assert_close(out, expected(a, b, out.shape), torch.float32, reduction=6)


def test_gemm_bad_shapes():
    a = torch.zeros(1, 1, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="shapes"):
        G.gemm(a, torch.zeros(1, 1, 5, 2, device=DEVICE), torch.zeros(1, 1, 3, 2, device=DEVICE))
    with pytest.raises(ValueError, match="broadcast"):
        G.gemm(a, torch.zeros(1, 2, 4, 2, device=DEVICE), torch.zeros(1, 3, 3, 2, device=DEVICE))


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_one_gemm_signature_for_both_backends(backend):
    """pydl._gemm.gemm and pydl._gemm_numba.gemm take the same arguments: 2-D and 3-D
    operands, trans_a / trans_b as views, a bias, an addend of another dtype, accumulate into
    out; both return out. The Numba one refuses a scale it cannot apply."""
    import pydl._gemm as T
    gemm = T.gemm if backend == "triton" else G.gemm
    M, N, K = 19, 21, 24
    a = random_tensor((K, M), torch.float32, DEVICE)                 # used as a^T
    b = random_tensor((3, N, K), torch.float32, DEVICE)              # used as b^T, batched
    bias = random_tensor(N, torch.float32, DEVICE)
    acc = random_tensor((3, M, N), torch.float32, DEVICE)
    out = torch.full((3, M, N), float("nan"), device=DEVICE)
    assert gemm(a, b, out, trans_a=True, trans_b=True, bias=bias, addend=acc,
                input_precision="ieee") is out
    want = a.t().double() @ b.transpose(1, 2).double() + bias.double() + acc.double()
    assert_close(out, want, torch.float32, reduction=K)
    before = out.clone()
    gemm(a.t(), b[0].t(), out[1], accumulate=True, input_precision="ieee")    # 2-D
    assert_close(out[1], before[1].double() + a.t().double() @ b[0].t().double(),
                 torch.float32, reduction=K)
    if backend == "numba":
        with pytest.raises(NotImplementedError, match="no alpha"):
            gemm(a.t(), b[0].t(), out[0], alpha=0.5)


@pytest.mark.parametrize("backend", ["triton", "numba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_softcap_epilogue_on_both_backends(backend, dtype):
    """softcap s: out = s tanh((a @ b + bias) / s) in fp32, rounded once, into a row-major and
    a column-major out (the Numba GEMM computes the latter transposed, its bias along rows);
    refused with an addend, and for a cap that is not positive and finite."""
    import pydl._gemm as T
    gemm = T.gemm if backend == "triton" else G.gemm
    M, N, K = 19, 21, 24
    a = random_tensor((M, K), dtype, DEVICE, scale=2.0)
    b = random_tensor((N, K), dtype, DEVICE)
    bias = random_tensor(N, dtype, DEVICE)
    z = a.double() @ b.double().t() + bias.double()
    want = 3.0 * torch.tanh(z / 3.0)
    assert (z.abs() > 6).any()              # some products well past the cap
    for out in (torch.empty(M, N, dtype=dtype, device=DEVICE),
                torch.empty(N, M, dtype=dtype, device=DEVICE).t()):
        gemm(a, b, out, trans_b=True, bias=bias, softcap=3.0, input_precision="ieee")
        assert_close(out, want, dtype, reduction=K)
    with pytest.raises(ValueError, match="addend"):
        gemm(a, b, out, trans_b=True, softcap=3.0, accumulate=True)
    for cap in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            gemm(a, b, out, trans_b=True, softcap=cap)


def test_conv2d_numba_on_tensor_cores(tensor_cores):
    """An op on the tensor-core GEMM: the Numba backend's im2col conv2d in fp16, forward and
    every gradient against float64, its products (forward, grad input, grad weight) all on
    the mma.sync kernel."""
    import pydl
    x = random_tensor((2, 4, 6, 5), torch.float16, DEVICE).requires_grad_()
    w = random_tensor((6, 4, 3, 3), torch.float16, DEVICE).requires_grad_()
    y = pydl.conv2d(x, w, stride=1, padding=1, backend="numba")
    dy = random_tensor(y.shape, torch.float16, DEVICE)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = torch.nn.functional.conv2d(x64, w64, padding=1)
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert set(tensor_cores) == {"gemm_mma"}
    assert_close(y, y64, torch.float16, reduction=36)
    assert_close(dx, dx64, torch.float16, reduction=54)
    assert_close(dw, dw64, torch.float16, reduction=60)


@pytest.mark.parametrize("mma", [False, True], ids=["cuda-cores", "tensor-cores"])
def test_plans_take_the_shared_gemms_arguments(monkeypatch, mma):
    """gemm_plan and gemm_plan_on have pydl._gemm's signatures: a callable (a, b, out, bias,
    addend), on the operands themselves or on the tensors they view (here a chunk of rows of
    a larger output, at an offset); each call on new tensors against float64. The tensor-core
    kernel's plan makes its views per call."""
    monkeypatch.setattr(G, "MMA", mma)
    dtype = torch.float16 if mma else torch.float32
    plan, planned = None, None
    for _ in range(3):
        a, b = random_tensor((5, 12), dtype, DEVICE), random_tensor((7, 12), dtype, DEVICE)
        big = torch.zeros(9, 7, dtype=torch.float32, device=DEVICE)
        bias, addend = random_tensor(7, dtype, DEVICE), random_tensor((5, 7), torch.float32,
                                                                        DEVICE)
        out = big[3:8]
        if plan is None:
            plan = G.gemm_plan(a, b, torch.empty(5, 7, device=DEVICE), trans_b=True,
                               bias=bias, addend=addend)
            planned = G.gemm_plan_on((a, b, big, bias, addend), a, b, out, trans_b=True,
                                     bias=bias, addend=addend)
        want = a.double() @ b.double().t() + bias.double() + addend.double()
        alone = torch.empty(5, 7, device=DEVICE)
        plan(a, b, alone, bias, addend)
        planned(a, b, big, bias, addend)
        assert_close(alone, want, dtype, reduction=12, name="gemm_plan")
        assert_close(big[3:8], want, dtype, reduction=12, name="gemm_plan_on")
        assert not big[:3].any() and not big[8:].any()
    with pytest.raises(NotImplementedError, match="alpha"):
        G.gemm_plan(a, b, alone, trans_b=True, alpha=2.0)
