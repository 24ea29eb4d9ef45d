"""conv2d: every kernel variant against the float64 reference and torch, forward and the three
gradients, every option of the signature."""
import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES
from hypothesis import given, settings
from hypothesis import strategies as st

import pydl
from pydl import reference as ref
from pydl._plan import clear_all as clear_plans
from pydl.testing import assert_close, random_tensor, run_with_grad, uses_tf32

F = torch.nn.functional
# (backend, algo) pairs with a kernel; each is tested on every case below
VARIANTS = [("triton", "implicit"), ("triton", "im2col"), ("numba", "im2col")]
variants = pytest.mark.parametrize("backend,algo", VARIANTS, ids=[f"{b}-{a}" for b, a in VARIANTS])
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)
TF32 = uses_tf32(DEVICE, cudnn=True)


def check_conv(x, w, b, backend, algo, dtype, grad_out=None, **opts):
    """Forward and grad input/weight/bias against the reference and torch, same cotangent
    (`grad_out`, any strides, or a fixed random one), at the tolerance of the precision both
    use now (TF32 products on a GPU unless torch.backends.cudnn.allow_tf32 is off)."""
    tf32 = uses_tf32(x.device, cudnn=True)
    inputs = [x, w] + ([b] if b is not None else [])
    fn = lambda x, w, b=None: pydl.conv2d(x, w, b, backend=backend, algo=algo, **opts)  # noqa: E731
    out, g, grads = run_with_grad(fn, inputs, grad_out)
    # torch's CPU kernels may sum a 16-bit convolution in 16 bits (its AVX-512 depthwise grad
    # input does: 2 ulps off the float64 answer at 7x7); cuDNN and pydl sum in fp32. On the CPU
    # torch computes from the same 16-bit values in fp32, rounded once to `dtype`.
    up = x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16)
    t_in = [t.float() for t in inputs] if up else inputs
    t_out, _, t_grads = run_with_grad(lambda x, w, b=None: F.conv2d(x, w, b, **opts), t_in,
                                      g.float() if up else g)
    if up:
        t_out, t_grads = t_out.to(dtype), [t.to(dtype) for t in t_grads]
    x64, w64 = x.double().cpu().numpy(), w.double().cpu().numpy()
    b64 = None if b is None else b.double().cpu().numpy()
    y64 = ref.conv2d(x64, w64, b64, **opts)
    r_grads = ref.conv2d_backward(g.double().cpu().numpy(), x64, w64, has_bias=b is not None,
                                  **opts)
    OC, CG, KH, KW = w.shape
    groups = opts.get("groups", 1)
    # grad input sums over (oc, kh, kw) of a group; grad weight and bias over all output pixels
    reductions = [(OC // groups) * KH * KW, out.numel() // OC, out.numel() // OC]
    assert out.shape == t_out.shape and out.dtype == x.dtype
    assert_close(out, y64, dtype, reduction=CG * KH * KW, tf32=tf32, name="forward vs reference")
    assert_close(out, t_out, dtype, reduction=CG * KH * KW, tf32=tf32, name="forward vs torch")
    names = ["grad input", "grad weight", "grad bias"]
    for i, (ours, theirs, r, red) in enumerate(zip(grads, t_grads, r_grads, reductions)):
        assert_close(ours, r, dtype, reduction=red, tf32=tf32, name=f"{names[i]} vs reference")
        assert_close(ours, theirs, dtype, reduction=red, tf32=tf32, name=f"{names[i]} vs torch")
    return out


# --- the lecture's filters --------------------------------------------------------------------

FILTERS = {
    "identity": [[0, 0, 0], [0, 1, 0], [0, 0, 0]],
    "edge_diag": [[1, 0, -1], [0, 0, 0], [-1, 0, 1]],
    "laplacian": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    "edge_all": [[-1, -1, -1], [-1, 8, -1], [-1, -1, -1]],
    "vertical_edge": [[1, 0, -1], [1, 0, -1], [1, 0, -1]],
    "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
    "box_blur": (np.ones((3, 3)) / 9).tolist(),
    "gaussian3": (np.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16).tolist(),
    "gaussian5": (np.outer([1, 4, 6, 4, 1], [1, 4, 6, 4, 1]) / 256).tolist(),
    # asymmetric: these tell cross-correlation from (flipped) convolution
    "shift_right": [[0, 0, 0], [1, 0, 0], [0, 0, 0]],
    "sobel_x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "ramp": [[1, 2, 3], [4, 5, 6], [7, 8, 9.5]],
}


@variants
@pytest.mark.parametrize("name", FILTERS)
def test_lecture_filters(backend, algo, name):
    k = torch.tensor(FILTERS[name], dtype=torch.float32, device=DEVICE)[None, None]
    img = random_tensor((1, 1, 9, 11), torch.float32, DEVICE)
    pad = k.shape[-1] // 2
    y = check_conv(img, k, None, backend, algo, torch.float32, padding=pad)
    if name == "identity":    # the image back, rounded to TF32 where the products use it
        assert_close(y, img, torch.float32, tf32=uses_tf32(img.device, cudnn=True))


@variants
def test_asymmetric_kernel_is_cross_correlation(backend, algo):
    """y[i, j] = sum x[i + p, j + q] w[p, q]: the kernel is not flipped."""
    x = torch.arange(25, dtype=torch.float32, device=DEVICE).reshape(1, 1, 5, 5)
    # picks x[i, j + 1]
    w = torch.tensor([[0., 0, 0], [0, 0, 1], [0, 0, 0]], device=DEVICE)[None, None]
    y = pydl.conv2d(x, w, backend=backend, algo=algo)
    assert_close(y, x[..., 1:4, 2:5], torch.float32)
    flipped = ref.conv2d(x.cpu().numpy(), w.flip(-1, -2).cpu().numpy())
    assert not np.allclose(y.cpu().numpy(), flipped), "result equals flipped convolution"


# --- network layers at small sizes ----------------------------------------------------------

# (input shape, weight shape, options)
LAYERS = {
    "alexnet_conv1": ((1, 3, 19, 19), (4, 3, 11, 11), dict(stride=4)),
    "alexnet_conv2": ((2, 8, 9, 9), (12, 8, 5, 5), dict(padding=2)),
    "alexnet_conv3": ((2, 12, 5, 5), (10, 12, 3, 3), dict(padding=1)),
    "vgg_3x3": ((2, 5, 8, 8), (7, 5, 3, 3), dict(padding=1)),
    "vgg_1x1": ((2, 6, 7, 7), (9, 6, 1, 1), dict()),
    "resnet_stem": ((1, 3, 10, 10), (4, 3, 7, 7), dict(stride=2, padding=3)),
    "resnet_3x3_s2": ((2, 8, 9, 9), (8, 8, 3, 3), dict(stride=2, padding=1)),
    "resnet_1x1_s2": ((2, 8, 9, 9), (16, 8, 1, 1), dict(stride=2)),
    "depthwise": ((2, 6, 8, 8), (6, 1, 3, 3), dict(padding=1, groups=6)),
    "depthwise_x2": ((1, 4, 7, 7), (8, 1, 3, 3), dict(stride=2, groups=4)),
    "grouped": ((2, 6, 7, 9), (9, 2, 3, 3), dict(padding=1, groups=3)),
    "dilated": ((1, 3, 11, 11), (4, 3, 3, 3), dict(padding=2, dilation=2)),
    "same_odd": ((1, 3, 7, 8), (4, 3, 3, 5), dict(padding="same")),
    "same_even": ((1, 3, 7, 7), (4, 3, 4, 2), dict(padding="same")),
    "same_dilated": ((1, 2, 9, 9), (3, 2, 3, 3), dict(padding="same", dilation=(2, 1))),
    "valid": ((2, 3, 6, 6), (2, 3, 3, 3), dict(padding="valid")),
    "non_square": ((1, 3, 6, 13), (5, 3, 2, 5), dict(stride=(1, 2), padding=(1, 0))),
    "single_channel_batch1": ((1, 1, 6, 6), (1, 1, 3, 3), dict()),
    "floor_last_window": ((1, 2, 8, 8), (3, 2, 3, 3), dict(stride=3)),
}


@variants
@pytest.mark.parametrize("layer", LAYERS)
def test_layers(backend, algo, layer):
    _check_layer(backend, algo, layer, bias=True)


@variants
@pytest.mark.parametrize("layer", ["vgg_1x1", "depthwise", "same_even"])
def test_layers_without_bias(backend, algo, layer):
    _check_layer(backend, algo, layer, bias=False)


def _check_layer(backend, algo, layer, bias):
    xs, ws, opts = LAYERS[layer]
    x = random_tensor(xs, torch.float32, DEVICE)
    w = random_tensor(ws, torch.float32, DEVICE, scale=0.3)
    b = random_tensor(ws[0], torch.float32, DEVICE) if bias else None
    check_conv(x, w, b, backend, algo, torch.float32, **opts)


@variants
@pytest.mark.parametrize("layer", ["vgg_3x3",
                                   pytest.param("alexnet_conv2", marks=pytest.mark.sim_heavy)])
def test_fp32_full_precision(monkeypatch, backend, algo, layer):
    """With TF32 off, fp32 is compared at fp32's tolerance on every device: an fp32 accuracy
    bug cannot hide behind TF32's (the other fp32 cases use TF32's on a GPU, as cuDNN does).
    The kernels follow the flag at each call, as torch's do."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert not uses_tf32(DEVICE, cudnn=True)
    _check_layer(backend, algo, layer, bias=True)


@pytest.mark.parametrize("k_order", ["channel_blocks", "flat"])
@pytest.mark.parametrize("layer", ["resnet_stem", "grouped", "dilated", "non_square",
                                   pytest.param("alexnet_conv2", marks=pytest.mark.sim_heavy),
                                   pytest.param("depthwise_x2", marks=pytest.mark.sim_heavy),
                                   pytest.param("same_even", marks=pytest.mark.sim_heavy),
                                   pytest.param("floor_last_window", marks=pytest.mark.sim_heavy)])
def test_implicit_forward_k_orders(monkeypatch, layer, k_order):
    """Both K orders of the implicit forward on every geometry: blocks of channels per (kh, kw)
    tap (layers with many channels), or (kh, kw, c) columns decoded one by one (few channels;
    most small test layers take this path by default)."""
    from pydl import _conv_implicit
    monkeypatch.setattr(_conv_implicit, "FLAT_K_CHANNELS",
                        0 if k_order == "channel_blocks" else 10**9)
    xs, ws, opts = LAYERS[layer]
    dtype = torch.float16 if layer in ("grouped", "resnet_stem") else torch.float32
    x = random_tensor(xs, dtype, DEVICE)
    w = random_tensor(ws, dtype, DEVICE, scale=0.3)
    check_conv(x, w, random_tensor(ws[0], dtype, DEVICE), "triton", "implicit", dtype, **opts)


@variants
@dtypes
@pytest.mark.parametrize("layer", ["vgg_3x3", "resnet_3x3_s2", "depthwise", "grouped"])
def test_dtypes(backend, algo, dtype, layer):
    xs, ws, opts = LAYERS[layer]
    x = random_tensor(xs, dtype, DEVICE)
    w = random_tensor(ws, dtype, DEVICE, scale=0.3)
    b = random_tensor(ws[0], dtype, DEVICE)
    check_conv(x, w, b, backend, algo, dtype, **opts)


@variants
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "unbatched", "weight_channels_last"])
def test_layouts(backend, algo, layout):
    x = random_tensor((2, 6, 9, 10), torch.float32, DEVICE)
    w = random_tensor((5, 6, 3, 3), torch.float32, DEVICE, scale=0.3)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, ::2, 1:, ::2]
        w = w[:, ::2]
    elif layout == "unbatched":
        x = x[0]
    else:
        w = w.to(memory_format=torch.channels_last)
    y = check_conv(x, w, random_tensor(5, torch.float32, DEVICE), backend, algo, torch.float32,
                   stride=2, padding=1)
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last), "channels_last must be kept"


@variants
@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 2), C=st.integers(1, 5), OC=st.integers(1, 5), H=st.integers(3, 9),
       W=st.integers(3, 9), K=st.integers(1, 3), S=st.integers(1, 3), P=st.integers(0, 2),
       D=st.integers(1, 2), G=st.sampled_from([1, 2]))
def test_fuzz(backend, algo, N, C, OC, H, W, K, S, P, D, G):
    C, OC = C * G, OC * G
    if H + 2 * P < D * (K - 1) + 1 or W + 2 * P < D * (K - 1) + 1:
        return
    x = random_tensor((N, C, H, W), torch.float32, DEVICE)
    w = random_tensor((OC, C // G, K, K), torch.float32, DEVICE, scale=0.5)
    check_conv(x, w, random_tensor(OC, torch.float32, DEVICE), backend, algo, torch.float32,
               stride=S, padding=P, dilation=D, groups=G)


# --- implicit GEMM: split-K of the weight gradient --------------------------------------------

@pytest.mark.parametrize("case", ["fp32_nchw", "fp16_channels_last_grouped"])
def test_implicit_grad_weight_split_k(monkeypatch, case):
    """The weight gradient summed in several pixel ranges (fp32 partials, which the last
    program of each tile to arrive sums): no split, a few, and as many as the K steps allow
    all match, the last range short; 16-bit weights are rounded once, after the sum."""
    from pydl import _conv_implicit
    dtype = torch.float16 if case.startswith("fp16") else torch.float32
    groups = 2 if case.endswith("grouped") else 1
    x = random_tensor((3, 4, 9, 7), dtype, DEVICE)           # P = 3 * 9 * 7 = 189 pixels
    w = random_tensor((6, 4 // groups, 3, 3), dtype, DEVICE, scale=0.3)
    g = random_tensor((3, 6, 9, 7), dtype, DEVICE)
    if "channels_last" in case:
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    splits = []
    real = _conv_implicit._split_k
    for sms in (0, 2, 1000):      # the device's multiprocessors, emulated or real
        monkeypatch.setattr(_conv_implicit, "SPLIT_MIN_STEPS", 1)
        monkeypatch.setattr(_conv_implicit, "_multiprocessors", lambda device, sms=sms: sms)
        monkeypatch.setattr(_conv_implicit, "_split_k",
                            lambda *a: splits.append(real(*a)) or splits[-1])
        clear_plans()                   # launch plans captured the previous setting
        check_conv(x, w, None, "triton", "implicit", dtype, grad_out=g, padding=1, groups=groups)
    counts = [s for s, _ in splits]
    assert counts[0] == 1 and 2 <= counts[1] <= counts[2] and counts[2] >= 3, splits
    assert all((s - 1) * p < 189 <= s * p for s, p in splits)


def test_implicit_grad_weight_split_waves_candidate(monkeypatch):
    """The grad weight's tuning space holds every tile also at SPLIT_WAVES = 4 (twice the
    programs a multiprocessor of the default): that candidate launches more splits than the
    default and gives the same gradient (the tuner's choice; emulation runs the default)."""
    from pydl import _conv_implicit
    tuner = _conv_implicit.IMPLICIT_TUNERS["bwd_weight"]
    x = random_tensor((3, 4, 9, 7), torch.float32, DEVICE)
    w = random_tensor((6, 4, 3, 3), torch.float32, DEVICE, scale=0.3)
    monkeypatch.setattr(_conv_implicit, "SPLIT_MIN_STEPS", 1)
    monkeypatch.setattr(_conv_implicit, "_multiprocessors", lambda device: 1)
    real = _conv_implicit._split_k

    def run(waves):
        """(the grad weight's candidates, the split of the one picked at `waves`)."""
        picked, splits = [], []
        monkeypatch.setattr(_conv_implicit, "_split_k",
                            lambda *a, **k: splits.append(real(*a, **k)) or splits[-1])
        monkeypatch.setattr(tuner, "pick", lambda key, candidates, launch, inout=(): (
            picked.append(candidates) or next(c for c in candidates
                                              if c.get("SPLIT_WAVES", 2) == waves)))
        clear_plans()
        check_conv(x, w, None, "triton", "implicit", torch.float32, padding=1)
        assert any("SPLIT_WAVES" not in c for c in picked[0])
        assert {c.get("SPLIT_WAVES", 2) for c in picked[0]} == set(_conv_implicit.SPLIT_WAVES)
        return splits[-1][0]
    default_split, more = (run(waves) for waves in _conv_implicit.SPLIT_WAVES)
    assert more > default_split >= 1, (more, default_split)
    clear_plans()


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_implicit_grad_input_col2im_route(monkeypatch, layout):
    """Few input channels (the RGB stem's FLAT taps): the grad input's tuning space also holds
    the im2col algorithm's route (dY @ W, then col2im), never as the default; taken, it gives
    torch's gradient and launches col2im. Layers with 16+ channels have no such candidate."""
    from pydl import _conv_implicit
    from pydl.kernels.triton import conv as k
    tuner = _conv_implicit.IMPLICIT_TUNERS["bwd_input"]
    offered = []

    def pick(key, candidates, launch, inout=()):
        offered.append(candidates)
        assert "ROUTE" not in candidates[0]
        return next((c for c in candidates if "ROUTE" in c), candidates[0])
    monkeypatch.setattr(tuner, "pick", pick)
    launched = []
    real = k.conv2d_col2im
    monkeypatch.setattr(k, "conv2d_col2im", type("Spy", (), {
        "__getitem__": lambda self, grid: launched.append(grid) or real[grid]})())
    clear_plans()
    x = random_tensor((2, 3, 11, 9), torch.float32, DEVICE)
    w = random_tensor((8, 3, 5, 5), torch.float32, DEVICE, scale=0.3)
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    check_conv(x, w, None, "triton", "implicit", torch.float32, stride=2, padding=2)
    assert [c["ROUTE"] for c in offered[0] if "ROUTE" in c] == ["col2im"] and launched
    offered.clear()
    clear_plans()
    x = random_tensor((2, 16, 6, 6), torch.float32, DEVICE)
    w = random_tensor((8, 16, 3, 3), torch.float32, DEVICE, scale=0.3)
    check_conv(x, w, None, "triton", "implicit", torch.float32, padding=1)
    assert offered and not any(c.get("ROUTE") == "col2im" for c in offered[0])
    clear_plans()


def _take_route(monkeypatch, route: str) -> dict:
    """Every implicit kernel's tuner made to take `route` where offered (its default
    otherwise, never a route); returns {direction: [the routes offered, per pick]}."""
    from pydl import _conv_implicit
    offered: dict = {}

    def take(direction):
        def pick(key, candidates, launch, inout=()):
            assert "ROUTE" not in candidates[0]
            offered.setdefault(direction, []).append(
                [c["ROUTE"] for c in candidates if "ROUTE" in c])
            return next((c for c in candidates if c.get("ROUTE") == route), candidates[0])
        return pick
    for direction, tuner in _conv_implicit.IMPLICIT_TUNERS.items():
        monkeypatch.setattr(tuner, "pick", take(direction))
    return offered


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_implicit_channels_last_route(monkeypatch, dtype):
    """NCHW layers: each implicit kernel's tuning space also holds the "channels_last" route
    (the kernel the channels_last layers run, on channels_last stand-ins of its NCHW tensors:
    the operands copied in, the output copied out), never as the default; taken by every
    kernel, it gives torch's forward and gradients, launches the copies, and leaves every
    result in its usual layout. No route where nothing is NCHW planes (a channels_last layer, a
    sliced input whose planes are not contiguous) or for the few-channel (FLAT) layers."""
    from pydl.kernels.triton import conv as k
    offered = _take_route(monkeypatch, "channels_last")
    copied = []
    real = k.relayout_planes
    monkeypatch.setattr(k, "relayout_planes", type("Spy", (), {
        "__getitem__": lambda self, grid: copied.append(grid) or real[grid]})())
    cases = [((2, 16, 7, 6), (24, 16, 3, 3), dict(padding=1)),
             ((1, 32, 9, 8), (16, 16, 3, 2), dict(stride=2, padding=(1, 0), groups=2)),
             ((2, 16, 8, 7), (16, 16, 3, 3), dict(dilation=2, padding=2))]
    for xs, ws, opts in cases:
        clear_plans()
        offered.clear()
        copied.clear()
        x = random_tensor(xs, dtype, DEVICE)
        w = random_tensor(ws, dtype, DEVICE, scale=0.3)
        b = random_tensor((ws[0],), dtype, DEVICE)
        out = check_conv(x, w, b, "triton", "implicit", dtype, **opts)
        assert out.is_contiguous(), out.stride()            # NCHW in, NCHW out
        # (and the weight route, where the weight is NCHW too: test_implicit_weight_route)
        assert {d: r[0] for d, r in offered.items()} == {
            "fwd": ["channels_last", "weight_channels_last"],
            "bwd_input": ["channels_last", "weight_channels_last"],
            "bwd_weight": ["channels_last"]}, offered
        # in: the forward's x and w, the grad input's dy and w, the grad weight's dy and x;
        # out: y, dx, dw
        assert len(copied) == 9, copied
        xx, ww = (t.detach().requires_grad_() for t in (x, w))
        pydl.conv2d(xx, ww, b, backend="triton", algo="implicit", **opts).sum().backward()
        assert xx.grad.is_contiguous() and ww.grad.is_contiguous()
    # conv1d's (N, C, L) input: the 2-d kernels' NCHW form, so the route too
    clear_plans()
    offered.clear()
    x = random_tensor((2, 16, 11), dtype, DEVICE)
    w = random_tensor((8, 16, 3), dtype, DEVICE, scale=0.3)
    xx, ww = (t.detach().requires_grad_() for t in (x, w))
    y = pydl.conv1d(xx, ww, padding=1, backend="triton")
    y.backward(torch.ones_like(y))
    theirs = [t.detach().float().requires_grad_() for t in (x, w)]
    t_y = torch.nn.functional.conv1d(*theirs, padding=1)
    t_y.backward(torch.ones_like(t_y))
    assert_close(y, t_y.to(dtype), dtype, reduction=48, name="conv1d forward")
    for ours, t in zip((xx, ww), theirs):
        assert_close(ours.grad, t.grad.to(dtype), dtype, reduction=8 * 11, name="conv1d grad")
    assert offered["fwd"] == [["channels_last", "weight_channels_last"]], offered
    # nothing NCHW planes, or few channels: no route offered
    for x, w in ((random_tensor((2, 16, 6, 6), dtype, DEVICE).to(
                      memory_format=torch.channels_last),
                  random_tensor((8, 16, 3, 3), dtype, DEVICE).to(
                      memory_format=torch.channels_last)),
                 (random_tensor((2, 3, 6, 6), dtype, DEVICE),
                  random_tensor((8, 3, 3, 3), dtype, DEVICE))):
        clear_plans()
        offered.clear()
        check_conv(x, w, None, "triton", "implicit", dtype, padding=1)
        assert len(offered) == 3 and not any("channels_last" in r for rs in offered.values()
                                             for r in rs), offered
    # a sliced input (its planes not contiguous), forward alone
    clear_plans()
    offered.clear()
    x = random_tensor((2, 16, 6, 9), dtype, DEVICE)[..., ::2]
    w = random_tensor((8, 16, 3, 3), dtype, DEVICE, scale=0.3)
    assert_close(pydl.conv2d(x, w, padding=1, backend="triton", algo="implicit"),
                 torch.nn.functional.conv2d(x.float(), w.float(), padding=1).to(dtype), dtype,
                 reduction=16 * 9, name="sliced input")
    assert offered == {"fwd": [["weight_channels_last"]]}, offered     # its weight is NCHW
    clear_plans()


def test_gathered_tiles(monkeypatch):
    """An NCHW layer's kernels gather their activation pixel-major: their default tile is the
    channels_last one on 8 warps (on 4 they spilled in the sm_90 compile), the grad weight's
    at most 32 deep; every alternative holds at most 32 accumulators and 16 gathered
    activation elements a thread, and the layout route runs the channels_last kernels' own
    default tile (4 warps). A channels_last layer keeps the GEMM space. Which kernels gather
    follows the layouts: x for the forward and grad weight (not FLAT taps), dy for the grad
    input."""
    from pydl import _conv_implicit as ci
    from pydl._conv_common import ConvGeometry
    seen = {}
    for direction, tuner in ci.IMPLICIT_TUNERS.items():
        monkeypatch.setattr(tuner, "pick", lambda key, candidates, launch, inout=(), d=direction:
                            seen.__setitem__(d, (key, candidates)) or candidates[0])
    g = ConvGeometry(N=32, C=128, H=56, W=56, OC=128, KH=3, KW=3, OH=28, OW=28, SH=2, SW=2,
                     PH=1, PW=1)
    nchw = torch.empty((32, 128, 56, 56), dtype=torch.bfloat16, device="meta")
    cl = nchw.to(memory_format=torch.channels_last)
    assert ci._gathered(g, nchw) and not ci._gathered(g, cl)
    assert not ci._gathered(ConvGeometry(N=1, C=3, H=8, W=8, OC=8, KH=3, KW=3, OH=6, OW=6),
                            torch.empty((1, 3, 8, 8), device="meta"))      # FLAT taps
    m = g.N * g.OH * g.OW
    for direction, n, k, deepest in (("fwd", 128, 128, 64), ("bwd_input", 128, 128, 64),
                                     ("bwd_weight", 128 * 9, m, 32)):
        cfg = ci._implicit_config(direction, g, nchw, *((m, n, k) if direction != "bwd_weight"
                                                         else (128, n, k)),
                                  None, (ci.LAYOUT_ROUTE,) if direction == "bwd_weight" else
                                  (ci.LAYOUT_ROUTE, ci.WEIGHT_ROUTE), gathered=True)
        key, candidates = seen[direction]
        tiles = [c for c in candidates if "ROUTE" not in c and "SPLIT_WAVES" not in c]
        assert cfg == tiles[0] == dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=8), cfg
        assert 2 < len(tiles) <= 1 + len(ci.GATHERED_SPACE), tiles
        for c in tiles:
            threads = 32 * c["num_warps"]
            assert c["BLOCK_M"] * c["BLOCK_N"] <= 32 * threads, c
            assert c["BLOCK_M"] * c["BLOCK_K"] <= 16 * threads, c
            assert c["BLOCK_K"] <= deepest, c
        # the layout route at the channels_last kernels' default, the weight route at this one
        routes = [c for c in candidates if "ROUTE" in c]
        assert routes == [dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64 if direction == "bwd_weight"
                               else 32, num_warps=4, ROUTE=ci.LAYOUT_ROUTE)] + (
            [] if direction == "bwd_weight" else [dict(cfg, ROUTE=ci.WEIGHT_ROUTE)]), routes
        ci._implicit_config(direction, g, nchw, m, n, k, None, gathered=False)
        assert seen[direction][0] != key             # the tuned choice is kept apart
    assert ci._implicit_config("fwd", g, cl, m, 128, 128, None) == dict(
        BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, num_warps=4)
    assert seen["fwd"][1][1:] == ci.gemm_candidates(seen["fwd"][1][0], m, 128, 128, 2)[1:]


@pytest.mark.parametrize("layouts", ["nchw", "channels_last", "x_nchw_w_cl", "x_cl_dy_nchw_w",
                                     "x_nchw_dy_cl"])
def test_pixel_major_flags(monkeypatch, layouts):
    """Each implicit kernel loads and stores pixel-major exactly the tensors whose channels are
    not at unit stride (GATHER_PIXELS: the forward's and grad weight's x, the grad input's dy;
    STORE_PIXELS: y, dx), and runs a channel block's taps together where the weight is
    (OC, C, KH, KW) (TAPS_INNER); the results match torch in every mix of layouts."""
    from pydl.kernels.triton import conv as k
    launches = _spy_launches(monkeypatch)
    clear_plans()
    cl = torch.channels_last
    x = random_tensor((2, 16, 7, 6), torch.float32, DEVICE)
    w = random_tensor((24, 16, 3, 3), torch.float32, DEVICE, scale=0.3)
    dy = random_tensor((2, 24, 7, 6), torch.float32, DEVICE)
    x_cl, w_cl, dy_cl = {"nchw": (False, False, False), "channels_last": (True, True, True),
                         "x_nchw_w_cl": (False, True, False),
                         "x_cl_dy_nchw_w": (True, False, False),
                         "x_nchw_dy_cl": (False, False, True)}[layouts]
    x = x.to(memory_format=cl) if x_cl else x
    w = w.to(memory_format=cl) if w_cl else w
    dy = dy.to(memory_format=cl) if dy_cl else dy
    check_conv(x, w, None, "triton", "implicit", torch.float32, grad_out=dy, padding=1)
    (_, fwd), = _planned(launches, k.conv2d_implicit_fwd)
    assert (fwd["GATHER_PIXELS"], fwd["STORE_PIXELS"], fwd["TAPS_INNER"]) == (
        not x_cl, not x_cl, not w_cl), fwd          # y is allocated in x's layout
    # a channels_last layer's NCHW dy is made channels_last first (relayout_planes)
    dy_planes = not dy_cl and not x_cl
    (_, bwd_in), = _planned(launches, k.conv2d_implicit_bwd_input)
    assert (bwd_in["GATHER_PIXELS"], bwd_in["STORE_PIXELS"], bwd_in["TAPS_INNER"]) == (
        dy_planes, not x_cl, not w_cl), bwd_in
    (_, bwd_w), = _planned(launches, k.conv2d_implicit_bwd_weight)
    assert bwd_w["GATHER_PIXELS"] == (not x_cl), bwd_w
    clear_plans()


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d.itemsize == 2], ids=str)
def test_1x1_on_the_tma_gemm(monkeypatch, dtype):
    """A channels_last 16-bit 1x1 convolution (forward and grad input: the shared GEMM on the
    pixel matrix) with the GEMM's persistent TMA kernel taken where it is offered, with a
    bias and stride 1, against torch in float64."""
    from conftest import take_tma_gemm
    offered, grids = take_tma_gemm(monkeypatch)
    cl = torch.channels_last
    x = random_tensor((2, 64, 9, 7), dtype, DEVICE).contiguous(memory_format=cl)
    w = random_tensor((32, 64, 1, 1), dtype, DEVICE, scale=0.1).contiguous(memory_format=cl)
    b = random_tensor(32, dtype, DEVICE)
    out, g, grads = run_with_grad(lambda x, w, b: pydl.conv2d(x, w, b, backend="triton"),
                                  (x, w, b))
    _, _, want = run_with_grad(lambda x, w, b: torch.nn.functional.conv2d(x, w, b),
                               (x.double(), w.double(), b.double()), g.double())
    assert_close(out, torch.nn.functional.conv2d(x.double(), w.double(), b.double()), dtype,
                 reduction=64)
    for got, ref64, k in zip(grads, want, (32, 2 * 9 * 7, 2 * 9 * 7)):
        assert_close(got, ref64, dtype, reduction=k)
    assert offered[:2] == [True, True] and len(grids) == 2, (offered, grids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_implicit_weight_route(monkeypatch, dtype):
    """Where the weight is (OC, C, KH, KW) planes, the forward's and grad input's tuning
    spaces hold the weight route (never the default): taken, the weight alone is copied into
    an (OC, KH, KW, C) workspace (one relayout_planes launch a kernel), the activation and
    output stay as they are (the kernel still gathers them pixel-major), and the results
    match torch. A channels_last weight is offered none."""
    from pydl import _conv_implicit as ci
    from pydl.kernels.triton import conv as k
    offered = _take_route(monkeypatch, ci.WEIGHT_ROUTE)
    launches = _spy_launches(monkeypatch)
    for x_cl in (False, True):
        clear_plans()
        offered.clear()
        launches.clear()
        x = random_tensor((2, 16, 7, 6), dtype, DEVICE)
        x = x.to(memory_format=torch.channels_last) if x_cl else x
        w = random_tensor((24, 16, 3, 2), dtype, DEVICE, scale=0.3)
        b = random_tensor((24,), dtype, DEVICE)
        dy = random_tensor((2, 24, 4, 7), dtype, DEVICE)
        dy = dy.to(memory_format=torch.channels_last) if x_cl else dy
        out = check_conv(x, w, b, "triton", "implicit", dtype, grad_out=dy, stride=(2, 1),
                         padding=1)
        assert out.is_contiguous(memory_format=torch.channels_last if x_cl else
                                 torch.contiguous_format)
        for d in ("fwd", "bwd_input"):
            assert ci.WEIGHT_ROUTE in offered[d][0], offered
        assert ci.WEIGHT_ROUTE not in offered["bwd_weight"][0], offered
        copies = [consts for kn, _, _, consts in launches if kn is k.relayout_planes]
        assert len(copies) == 2 and not any(c["OUT"] for c in copies), copies   # w, in
        fwd, bwd = (_planned(launches, kn)[0][1] for kn in (k.conv2d_implicit_fwd,
                                                            k.conv2d_implicit_bwd_input))
        assert not fwd["TAPS_INNER"] and not bwd["TAPS_INNER"]       # a channels_last weight
        assert fwd["GATHER_PIXELS"] == bwd["GATHER_PIXELS"] == (not x_cl)
    clear_plans()
    offered.clear()
    check_conv(random_tensor((2, 16, 7, 6), dtype, DEVICE),
               random_tensor((24, 16, 3, 3), dtype, DEVICE, scale=0.3).to(
                   memory_format=torch.channels_last), None, "triton", "implicit", dtype,
               padding=1)
    assert not any(ci.WEIGHT_ROUTE in r for rs in offered.values() for r in rs), offered
    clear_plans()


def _small_tiles(monkeypatch, block=16):
    """Every implicit-GEMM tile `block` wide in M, N and K, and every layer on the (kh, kw,
    channel block) paths (no FLAT_K / FLAT_N): small test layers then have several channel
    blocks per tap, the last one partial."""
    from pydl import _conv_implicit
    monkeypatch.setattr(_conv_implicit, "FLAT_K_CHANNELS", 0)
    monkeypatch.setattr(_conv_implicit, "_gemm_tile", lambda m, n, k, block_k=32: dict(
        BLOCK_M=block, BLOCK_N=block, BLOCK_K=block, num_warps=4))


def _force_split(monkeypatch):
    from pydl import _conv_implicit
    monkeypatch.setattr(_conv_implicit, "SPLIT_MIN_STEPS", 1)
    monkeypatch.setattr(_conv_implicit, "SIM_SMS", 1000)


# (input shape, weight shape, options): every tap of the kernel in a tile of its own, 20
# channels per group = a full and a partial 16-channel block, output channels likewise; at
# least 40 output pixels, so that 16-pixel K steps split in 2 or more ranges
TAP_TILE_CASES = {
    "3x3_pad": ((2, 20, 5, 6), (20, 20, 3, 3), dict(padding=1)),
    "2x3_stride_dilation": ((2, 20, 9, 8), (18, 20, 2, 3), dict(stride=2, padding=(1, 2),
                                                                  dilation=(2, 1))),
    "grouped": ((2, 40, 4, 5), (34, 20, 3, 3), dict(padding=1, groups=2)),
    "same_even": ((2, 20, 5, 5), (6, 20, 4, 2), dict(padding="same")),
}


# every case in fp32 NCHW; fp16 channels_last on the 3x3 layer (the rest with --full)
_TAP_TILE_PARAMS = [
    pytest.param(case, dtype, layout, id=f"{case}-{name}",
                 marks=() if name == "fp32-nchw" or (case == "3x3_pad" and
                                                      name == "fp16-channels_last")
                 else pytest.mark.sim_heavy)
    for name, dtype, layout in [("fp32-nchw", torch.float32, "nchw"),
                                ("fp16-channels_last", torch.float16, "channels_last"),
                                ("fp16-nchw", torch.float16, "nchw"),
                                ("fp32-channels_last", torch.float32, "channels_last")]
    for case in TAP_TILE_CASES]


@pytest.mark.parametrize("case,dtype,layout", _TAP_TILE_PARAMS)
def test_implicit_grad_weight_tap_tiles(monkeypatch, case, dtype, layout):
    """The weight gradient tiled by (kh, kw, channel block) with split-K, on every edge: taps
    of non-square and dilated kernels, strides, asymmetric padding, groups, input and output
    channels not a multiple of the block, NCHW and channels_last, fp32 and fp16. The result is
    bitwise the same on a second run (the last-arriving program sums the partials in split
    order), and every arrival counter is back at zero."""
    from pydl import _conv_implicit, _launch
    _small_tiles(monkeypatch)
    _force_split(monkeypatch)
    splits = []
    real = _conv_implicit._split_k
    monkeypatch.setattr(_conv_implicit, "_split_k",
                        lambda *a: splits.append(real(*a)) or splits[-1])
    xs, ws, opts = TAP_TILE_CASES[case]
    x = random_tensor(xs, dtype, DEVICE)
    w = random_tensor(ws, dtype, DEVICE, scale=0.3)
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    check_conv(x, w, None, "triton", "implicit", dtype, **opts)
    xg, wg = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = pydl.conv2d(xg, wg, algo="implicit", **opts)
    dy = random_tensor(y.shape, dtype, DEVICE)
    first = torch.autograd.grad(y, wg, dy, retain_graph=True)[0]
    second = torch.autograd.grad(y, wg, dy)[0]
    assert torch.equal(first, second)
    assert splits and all(n >= 2 for n, _ in splits)
    assert _launch._ARRIVALS and all(not c.any() for c in _launch._ARRIVALS.values())


def test_implicit_grad_weight_splits_are_used(monkeypatch):
    """The tap-tiled weight gradient of a layer with 20 channels and 16-wide blocks launches
    (taps x 2 channel blocks) column tiles and several splits, so the split path above runs."""
    from pydl import _conv_implicit
    from pydl.kernels.triton import conv as k
    _small_tiles(monkeypatch)
    _force_split(monkeypatch)
    grids = []
    kernel = k.conv2d_implicit_bwd_weight
    monkeypatch.setattr(k, "conv2d_implicit_bwd_weight", type("Spy", (), {
        "__getitem__": lambda self, grid: grids.append(grid) or kernel[grid]})())
    x = random_tensor((2, 20, 5, 6), torch.float32, DEVICE)
    w = random_tensor((20, 20, 3, 3), torch.float32, DEVICE).requires_grad_()
    pydl.conv2d(x, w, padding=1, algo="implicit").sum().backward()
    (gm, gn, gz), = grids
    assert (gm, gn) == (2, 9 * 2) and gz >= 2
    assert _conv_implicit.SPLIT_MAX >= gz


# --- implicit GEMM: the grad input of a strided convolution, tiled by stride phase -----------

# (input shape, weight shape, options, dtype, layout, stride phases the grad input tiles
# apart). Odd and even sizes (a phase with fewer rows than another), padding 0 and > 0,
# kernels 1, 3, 7, groups, and pixels that no window reads (their gradient is 0): the odd
# pixels of a 1x1 at stride 2, the even ones with padding 1, phase 2 of a 3-tap kernel at
# stride 4 with padding 1 (kh0 = 3), the last row of a stride-3 layer that the floor of the
# output size drops.
STRIDE_PHASE_CASES = {
    "k3_s2_p1_odd": ((2, 5, 9, 7), (6, 5, 3, 3), dict(stride=2, padding=1),
                     torch.float32, "nchw", 4),
    "k3_s3_p0_even": ((1, 4, 10, 8), (5, 4, 3, 3), dict(stride=3),
                      torch.float16, "channels_last", 9),
    "k7_s2_p3_stem": ((2, 3, 12, 11), (8, 3, 7, 7), dict(stride=2, padding=3),
                      torch.float16, "channels_last", 4),
    "k1_s2_p0_unreached": ((2, 6, 7, 8), (4, 6, 1, 1), dict(stride=2),
                           torch.float32, "nchw", 4),
    "k1_s2_p1_unreached": ((1, 5, 6, 7), (3, 5, 1, 1), dict(stride=2, padding=1),
                           torch.float16, "channels_last", 4),
    "k3_s4_p1_phase_gaps": ((1, 3, 11, 9), (4, 3, 3, 3), dict(stride=4, padding=1),
                            torch.float32, "channels_last", 16),
    "s2x1_grouped": ((2, 6, 7, 6), (9, 2, 3, 3), dict(stride=(2, 1), padding=1, groups=3),
                     torch.float16, "channels_last", 2),
    "s1x3_grouped": ((1, 4, 5, 11), (6, 2, 3, 3), dict(stride=(1, 3), padding=(1, 2), groups=2),
                     torch.float32, "nchw", 3),
    # dilation keeps one tile of every phase (its taps per phase are not kh0 + i * SH)
    "dilated_s2": ((1, 3, 11, 10), (4, 3, 3, 3), dict(stride=2, padding=2, dilation=2),
                   torch.float32, "nchw", 1),
}


def _spy_launches(monkeypatch) -> list:
    """(kernel, grid, scalars, constexprs) of every conv2d Launch planned from now on (the
    Triton launchers' modules each look Launch up)."""
    from pydl import _conv_im2col, _conv_implicit
    seen = []

    class Spy(_conv_implicit.Launch):
        def __init__(self, kernel, grid, scalars, consts, checked=None):
            seen.append((kernel, grid, scalars, consts))
            super().__init__(kernel, grid, scalars, consts, checked)
    for module in (_conv_implicit, _conv_im2col):
        monkeypatch.setattr(module, "Launch", Spy)
    return seen


def _planned(launches: list, kernel) -> list:
    """(grid, constexprs) of the spied launches of `kernel`."""
    return [(grid, consts) for kn, grid, _, consts in launches if kn is kernel]


def _spy_grad_input_launches(monkeypatch):
    """A callable returning (grid, constexprs) of every conv2d_implicit_bwd_input launch
    planned since this call."""
    from pydl.kernels.triton import conv as k
    launches = _spy_launches(monkeypatch)
    return lambda: _planned(launches, k.conv2d_implicit_bwd_input)


# --- depthwise layers: the direct kernels ----------------------------------------------------

# (input shape, weight shape, options, dtype, layout): strides, dilation, kernels 1 to 7,
# asymmetric and "same" padding, a channel multiplier, odd sizes
DEPTHWISE_CASES = {
    "3x3_s1": ((2, 6, 7, 8), (6, 1, 3, 3), dict(padding=1, groups=6), torch.float32, "nchw"),
    "3x3_s2": ((2, 8, 9, 7), (8, 1, 3, 3), dict(stride=2, padding=1, groups=8), torch.float16,
               "channels_last"),
    "5x5_dilated": ((1, 5, 11, 10), (5, 1, 5, 5), dict(padding=4, dilation=2, groups=5),
                    torch.float32, "channels_last"),
    "7x7_convnext": ((1, 4, 9, 9), (4, 1, 7, 7), dict(padding=3, groups=4), torch.float16,
                     "nchw"),
    "multiplier3_asym": ((2, 3, 8, 6), (9, 1, 3, 2), dict(stride=(2, 1), padding=(1, 0),
                                                          groups=3),
                         torch.float32, "channels_last"),
    "same_even": ((1, 4, 6, 6), (4, 1, 4, 4), dict(padding="same", groups=4), torch.float32,
                  "nchw"),
    "1x1": ((2, 4, 5, 5), (4, 1, 1, 1), dict(groups=4), torch.float32, "channels_last"),
}


@pytest.mark.parametrize("split", ["one_range", "ranges"])
@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.sim_heavy)
                                  if c == "5x5_dilated" else c for c in DEPTHWISE_CASES])
def test_depthwise_direct_kernels(monkeypatch, case, split):
    """A depthwise layer (groups == C_in) runs the direct kernels, forward, grad input and grad
    weight (with bias), against the float64 reference and torch; "ranges" sums the weight
    gradient over several pixel ranges, whose last-arriving program adds them (the counters
    back at zero), on 16 x 4 tiles (several channel blocks, the last partial)."""
    from pydl import _conv_implicit, _launch
    from pydl.kernels.triton import conv_depthwise as kd
    launches = _spy_launches(monkeypatch)
    if split == "ranges":
        monkeypatch.setattr(_conv_implicit, "DEPTHWISE_MIN_STEPS", 1)
        monkeypatch.setattr(_conv_implicit, "DEPTHWISE_WAVES", 1000)
        monkeypatch.setattr(_conv_implicit, "_depthwise_config", lambda *a: dict(BLOCK_P=16,
                                                                           BLOCK_C=4))
    clear_plans()
    xs, ws, opts, dtype, layout = DEPTHWISE_CASES[case]
    x = random_tensor(xs, dtype, DEVICE)
    w = random_tensor(ws, dtype, DEVICE, scale=0.5)
    b = random_tensor((2 * ws[0],), dtype, DEVICE)[::2]        # a strided bias
    if layout == "channels_last":
        x, w = x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last)
    check_conv(x, w, b, "triton", "implicit", dtype, **opts)
    launched = [kn for kn, *_ in launches]
    splits = [grid[2] for grid, _ in _planned(launches, kd.conv2d_depthwise_bwd_weight)]
    assert {kd.conv2d_depthwise_fwd, kd.conv2d_depthwise_bwd_input,
            kd.conv2d_depthwise_bwd_weight} <= set(launched), launched
    # (and, for a channels_last layer, the NCHW upstream gradient's conversion)
    assert all(getattr(kn, "__name__", "").startswith(("conv2d_depthwise", "relayout_planes"))
               or "bias" in getattr(kn, "__name__", "") for kn in launched), launched
    assert splits and (splits[0] >= 2 if split == "ranges" else splits[0] == 1), splits
    assert all(not c.any() for c in _launch._ARRIVALS.values())
    clear_plans()


def test_depthwise_grad_weight_narrows_channel_blocks(monkeypatch):
    """On a GPU of many multiprocessors a depthwise layer with few (row, channel block) tiles
    takes 8-channel blocks for its weight gradient (the range count is capped), and still
    gives torch's gradient."""
    from pydl import _conv_implicit
    from pydl.kernels.triton import conv_depthwise as kd
    launches = _spy_launches(monkeypatch)
    monkeypatch.setattr(_conv_implicit, "_multiprocessors", lambda device: 1000)
    clear_plans()
    x = random_tensor((1, 32, 6, 6), torch.float32, DEVICE).to(memory_format=torch.channels_last)
    w = random_tensor((32, 1, 3, 3), torch.float32, DEVICE, scale=0.5)
    check_conv(x, w, None, "triton", "implicit", torch.float32, padding=1, groups=32)
    (grid, consts), = _planned(launches, kd.conv2d_depthwise_bwd_weight)
    assert consts["BLOCK_C"] == 8 and grid[:2] == (3, 4), (grid, consts)
    assert grid[2] <= _conv_implicit.DEPTHWISE_SPLIT_MAX
    clear_plans()


def test_depthwise_large_multiplier_takes_the_implicit_gemm(monkeypatch):
    """A channel multiplier above DEPTHWISE_MAX_MULTIPLIER runs the implicit GEMM (its N =
    multiplier columns), and gives torch's result."""
    from pydl import _conv_implicit
    from pydl.kernels.triton import conv as k
    launches = _spy_launches(monkeypatch)
    clear_plans()
    m = _conv_implicit.DEPTHWISE_MAX_MULTIPLIER + 1
    x = random_tensor((1, 2, 5, 5), torch.float32, DEVICE)
    w = random_tensor((2 * m, 1, 3, 3), torch.float32, DEVICE, scale=0.5)
    check_conv(x, w, None, "triton", "implicit", torch.float32, padding=1, groups=2)
    assert {k.conv2d_implicit_fwd, k.conv2d_implicit_bwd_input,
            k.conv2d_implicit_bwd_weight} <= {kn for kn, *_ in launches}, launches
    clear_plans()


def _unreached_pixels(H, W, KH, KW, opts) -> torch.Tensor:
    """(H, W) bool: the input pixels that no output window reads (dilation 1)."""
    SH, SW = torch.nn.modules.utils._pair(opts.get("stride", 1))
    PH, PW = torch.nn.modules.utils._pair(opts.get("padding", 0))
    OH, OW = (H + 2 * PH - KH) // SH + 1, (W + 2 * PW - KW) // SW + 1
    read = torch.zeros(H + 2 * PH, W + 2 * PW, dtype=torch.bool)
    for oh in range(OH):
        for ow in range(OW):
            read[oh * SH:oh * SH + KH, ow * SW:ow * SW + KW] = True
    return ~read[PH:PH + H, PW:PW + W]


@pytest.mark.parametrize("case", STRIDE_PHASE_CASES)
def test_implicit_grad_input_stride_phases(monkeypatch, case):
    """The grad input of a strided convolution, each program on the pixels of one stride phase
    (h % SH, w % SW) and only the taps that reach them, against the float64 reference and
    torch: every pixel written once, zeros where no window reads a pixel (the outputs are
    NaN-poisoned). The launch has SH * SW phases (1 with dilation: every tap, masked)."""
    planned = _spy_grad_input_launches(monkeypatch)
    xs, ws, opts, dtype, layout, phases = STRIDE_PHASE_CASES[case]
    x = random_tensor(xs, dtype, DEVICE)
    w = random_tensor(ws, dtype, DEVICE, scale=0.3)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    check_conv(x, w, None, "triton", "implicit", dtype, **opts)
    (grid, consts), = planned()
    assert consts["STRIDE_PHASES"] == (phases > 1)
    N, _, H, W = xs
    SH, SW = torch.nn.modules.utils._pair(opts["stride"])
    pixels = N * -(-H // SH) * -(-W // SW) if phases > 1 else N * H * W
    assert grid[0] == phases * -(-pixels // consts["BLOCK_M"])
    if "dilation" not in opts:
        unreached = _unreached_pixels(H, W, *ws[2:], opts)
        assert unreached.any() == ("unreached" in case or "gaps" in case or "s3_p0" in case)
        xg = x.clone().requires_grad_()
        y = pydl.conv2d(xg, w, algo="implicit", **opts)
        dx, = torch.autograd.grad(y, xg, random_tensor(y.shape, dtype, DEVICE))
        assert (dx[..., unreached] == 0).all() and not dx.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_implicit_grad_input_stride_phases_channel_blocks(monkeypatch, dtype):
    """Stride phases with 16-wide tiles: 20 input channels in two column tiles, 20 output
    channels in two K blocks per tap (the last partial), several pixel tiles per phase."""
    _small_tiles(monkeypatch)
    planned = _spy_grad_input_launches(monkeypatch)
    x = random_tensor((2, 20, 9, 8), dtype, DEVICE).to(memory_format=torch.channels_last)
    w = random_tensor((20, 20, 3, 3), dtype, DEVICE, scale=0.3)
    check_conv(x, w, None, "triton", "implicit", dtype, stride=2, padding=1)
    (grid, consts), = planned()
    assert consts["STRIDE_PHASES"] and grid[:2] == (4 * 3, 2)   # 40 pixels a phase: 3 tiles


@pytest.mark.parametrize("dy_layout", ["nchw", "channels_last"])
def test_implicit_backward_gets_grad_output_in_input_layout(monkeypatch, dy_layout):
    """A channels_last layer given an NCHW upstream gradient: both backward kernels receive it
    converted to channels_last (converted once, by pydl's relayout kernel), and the gradients
    are right."""
    from pydl import _conv_implicit
    from pydl.kernels.triton import conv as k
    copied = []
    real_copy = k.relayout_planes
    monkeypatch.setattr(k, "relayout_planes", type("Spy", (), {
        "__getitem__": lambda self, grid: copied.append(grid) or real_copy[grid]})())
    clear_plans()
    seen = []
    impl = _conv_implicit._TritonImplicit
    for name in ("plan_backward_input", "plan_backward_weight"):
        real = getattr(impl, name)

        def plan(dy, *a, real=real):
            run = real(dy, *a)
            return lambda dy, *tensors: seen.append(dy) or run(dy, *tensors)
        monkeypatch.setattr(impl, name, staticmethod(plan))
    x = random_tensor((2, 6, 7, 5), torch.float32, DEVICE).to(memory_format=torch.channels_last)
    w = random_tensor((8, 6, 3, 3), torch.float32, DEVICE, scale=0.3)
    g = random_tensor((2, 8, 7, 5), torch.float32, DEVICE)
    if dy_layout == "channels_last":
        g = g.to(memory_format=torch.channels_last)
    check_conv(x, w, None, "triton", "implicit", torch.float32, grad_out=g, padding=1)
    assert len(seen) == 2 and seen[0] is seen[1]
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert len(copied) == (dy_layout == "nchw")
    clear_plans()


# 1x1 layers at stride 1 without padding are matrix products: (input, weight, options, layout)
POINTWISE = {
    "nchw": ((2, 24, 5, 7), (20, 24, 1, 1), dict(), "nchw"),
    "channels_last": ((3, 24, 5, 4), (40, 24, 1, 1), dict(), "channels_last"),
    "grouped": ((2, 12, 3, 5), (9, 4, 1, 1), dict(groups=3), "channels_last"),
    "batch1_dilated": ((1, 5, 6, 6), (7, 5, 1, 1), dict(dilation=2), "nchw"),
}


def _spy_gemm_plans(monkeypatch) -> list:
    """The GEMM plans the Triton conv2d launchers build (each of an eager call's steps plans
    once; their modules each look gemm_plan_on up)."""
    from pydl import _conv_im2col, _conv_implicit
    calls = []
    real = _conv_implicit.gemm_plan_on
    for module in (_conv_implicit, _conv_im2col):
        monkeypatch.setattr(module, "gemm_plan_on",
                            lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("case", POINTWISE)
def test_pointwise_conv_runs_the_shared_gemm(monkeypatch, case, dtype):
    """The implicit algorithm's 1x1 forward and grad input are the shared GEMM (pydl._gemm,
    planned once each); the weight gradient stays the split-K implicit kernel; all three
    match."""
    calls = _spy_gemm_plans(monkeypatch)
    xs, ws, opts, layout = POINTWISE[case]
    x = random_tensor(xs, dtype, DEVICE)
    w = random_tensor(ws, dtype, DEVICE, scale=0.3)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    y = check_conv(x, w, random_tensor(ws[0], dtype, DEVICE), "triton", "implicit", dtype, **opts)
    assert len(calls) == 2                                  # forward, grad input
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.gpu
def test_split_k_grad_weight_is_deterministic_on_gpu():
    """Hundreds of programs arriving in whatever order the GPU runs them: the last-arrival
    reduction gives bitwise the same weight gradient every time (a missing release or acquire
    between a program's partial store and its arrival would show as a changed or stale tile)."""
    x = torch.randn(16, 64, 28, 28, device="cuda", dtype=torch.bfloat16)
    x = x.to(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.bfloat16)
    w = w.to(memory_format=torch.channels_last).requires_grad_()
    dy = torch.randn(16, 64, 28, 28, device="cuda", dtype=torch.bfloat16)
    grads = []
    for _ in range(20):
        y = pydl.conv2d(x, w, padding=1, algo="implicit")
        grads.append(torch.autograd.grad(y, w, dy)[0])
    assert all(torch.equal(grads[0], g) for g in grads[1:])
    want = torch.nn.grad.conv2d_weight(x.float(), w.shape, dy.float(), padding=1)
    assert_close(grads[0], want, torch.bfloat16, reduction=16 * 28 * 28)


@pytest.mark.parametrize("case", ["strided", "padded", "transposed_grad"])
def test_pointwise_conv_falls_back_to_implicit(monkeypatch, case):
    """1x1 layers that are not one GEMM over pixel matrices keep the implicit kernels: stride
    2, padding, and an upstream gradient whose (h, w) do not flatten (the forward still is)."""
    calls = _spy_gemm_plans(monkeypatch)
    x = random_tensor((2, 6, 5, 5), torch.float32, DEVICE)
    w = random_tensor((4, 6, 1, 1), torch.float32, DEVICE)
    opts = dict(stride=2) if case == "strided" else dict(padding=1) if case == "padded" else {}
    g = None
    if case == "transposed_grad":
        g = random_tensor((2, 4, 5, 5), torch.float32, DEVICE).transpose(2, 3)
    check_conv(x, w, None, "triton", "implicit", torch.float32, grad_out=g, **opts)
    assert len(calls) == (1 if case == "transposed_grad" else 0)


def test_split_k_choice():
    from pydl._conv_implicit import _split_k
    cpu = torch.device("cpu")
    assert _split_k(100, 10 ** 6 + 1, 64, 1000, cpu) == (1, 15626 * 64)   # enough tiles
    s, p = _split_k(1, 32 * 56 * 56, 64, 64 * 576, cpu)        # SIM_SMS = 2: 4 programs
    assert s == 4 and p % 64 == 0 and (s - 1) * p < 32 * 56 * 56 <= s * p
    assert _split_k(1, 100, 64, 10, cpu)[0] == 1               # too few K steps to split


# --- im2col: the column order follows the layout ---------------------------------------------

@pytest.mark.parametrize("w_layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("x_layout", ["nchw", "channels_last"])
def test_im2col_column_order(monkeypatch, x_layout, w_layout):
    """The im2col algorithm orders a row's columns by tap (channels innermost) for a
    channels_last input, by channel for NCHW: im2col and col2im read and write along the
    contiguous axis. The weight is viewed as that matrix where its strides allow (a contiguous
    weight by channel, a channels_last one by tap) and packed per call where they do not; the
    weight gradient's columns go in the order of its dw, laid out as torch's (channels_last
    when the input or the weight is). Strided, dilated, grouped, fp16; against the float64
    reference and torch."""
    from pydl.kernels.triton import conv as k
    launches = _spy_launches(monkeypatch)
    clear_plans()
    x = random_tensor((2, 6, 9, 8), torch.float16, DEVICE)
    w = random_tensor((4, 3, 3, 2), torch.float16, DEVICE, scale=0.5)
    if x_layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    if w_layout == "channels_last":
        w = w.to(memory_format=torch.channels_last)
    check_conv(x, w, None, "triton", "im2col", torch.float16, stride=2, padding=(1, 2),
               dilation=(2, 1), groups=2)
    orders, packs = {}, []
    for kernel, _, scalars, consts in launches:
        if kernel is k.conv2d_im2col and consts["KH"] * consts["KW"] > 1:    # not dY's pack
            if scalars[5:7] == (1, 1):          # OH = OW = 1: the weight as one window
                packs.append(consts["TAPS_FIRST"])
            else:
                orders.setdefault("im2col", []).append(consts["TAPS_FIRST"])
        elif kernel is k.conv2d_col2im:
            orders.setdefault("col2im", []).append(consts["TAPS_FIRST"])
    by_tap = x_layout == "channels_last"
    # forward im2col by the input's layout, then the weight gradient's by dw's: channels_last
    # (by tap) when the input or the weight is, as torch lays the gradient out
    assert orders["im2col"] == [by_tap, by_tap or w_layout == "channels_last"], orders
    assert orders["col2im"] == [by_tap], orders
    same = by_tap == (w_layout == "channels_last")
    assert packs == ([] if same else [by_tap, by_tap]), packs    # forward and grad input
    clear_plans()


@pytest.mark.parametrize("backend,algo", [("triton", "implicit"), ("triton", "im2col"),
                                          ("numba", "im2col")])
@pytest.mark.parametrize("layouts", ["nchw-contiguous", "nchw-channels_last",
                                     "channels_last-contiguous", "channels_last-channels_last"])
def test_weight_gradient_laid_out_as_torch(backend, algo, layouts):
    """The weight's gradient comes in the memory format torch returns it in (channels_last
    when the input or the weight is: no restriding copy when autograd accumulates it into a
    channels_last model's .grad), with torch's values."""
    x_fmt, w_fmt = (torch.channels_last if f == "channels_last" else torch.contiguous_format
                    for f in layouts.split("-"))
    x = random_tensor((2, 4, 6, 5), torch.float32, DEVICE).contiguous(memory_format=x_fmt)
    w = random_tensor((6, 4, 3, 3), torch.float32, DEVICE).contiguous(memory_format=w_fmt)
    g = random_tensor((2, 6, 6, 5), torch.float32, DEVICE)
    grads = []
    for fn in (lambda x, w: pydl.conv2d(x, w, padding=1, backend=backend, algo=algo),
               lambda x, w: F.conv2d(x, w, padding=1)):
        wg = w.detach().clone(memory_format=torch.preserve_format).requires_grad_()
        # the gradient as the op returns it (.grad would be restrided to the leaf's layout by
        # autograd's accumulation, one more copy a step when they differ)
        grads.append(torch.autograd.grad(fn(x, wg), wg, g)[0])
    ours, torch_grad = grads
    assert ours.stride() == torch_grad.stride(), (ours.stride(), torch_grad.stride())
    assert_close(ours, torch_grad.double(), torch.float32, reduction=2 * 6 * 5,
                 tf32=uses_tf32(x.device, cudnn=True), name="grad weight vs torch")


# --- im2col: the batch in workspace-bounded chunks --------------------------------------------

@pytest.mark.parametrize("case", ["nchw", "channels_last", "grouped_fp16", "transposed_grad"])
def test_im2col_workspace_chunks(monkeypatch, case):
    """A workspace budget of two images' columns: a batch of 5 goes in several chunks (the last
    one short) in every pass, and all still match. Covers one GEMM per image (NCHW), one GEMM
    over the whole chunk (channels_last input and cotangent), the fp32 sum of a 16-bit grad
    weight over chunks, and a cotangent whose strides need the pixel-major copy."""
    from pydl import _conv_im2col
    dtype = torch.float16 if case == "grouped_fp16" else torch.float32
    groups = 2 if case == "grouped_fp16" else 1
    N, C, H, W, OC = 5, 4, 6, 5, 6
    x = random_tensor((N, C, H, W), dtype, DEVICE)
    w = random_tensor((OC, C // groups, 3, 3), dtype, DEVICE, scale=0.3)
    b = random_tensor(OC, dtype, DEVICE)
    g = random_tensor((N, OC, H, W), dtype, DEVICE)          # padding=1 keeps H x W
    if case == "channels_last":
        x, g = x.to(memory_format=torch.channels_last), g.to(memory_format=torch.channels_last)
    elif case == "transposed_grad":
        g = random_tensor((N, OC, W, H), dtype, DEVICE).transpose(2, 3)
    # forward's columns of two images (the backward workspaces are larger: one image each)
    monkeypatch.setattr(_conv_im2col, "IM2COL_WORKSPACE_BYTES",
                        2 * H * W * C * 9 * x.element_size())
    seen = []
    chunks = _conv_im2col._chunks
    monkeypatch.setattr(_conv_im2col, "_chunks",
                        lambda n, per: seen.append(chunks(n, per)) or seen[-1])
    y = check_conv(x, w, b, "triton", "im2col", dtype, grad_out=g, padding=1, groups=groups)
    assert len(seen) == 3 and all(len(c) >= 3 for c in seen), seen
    assert seen[0] == [(0, 2), (2, 2), (4, 1)]
    if case == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    # the same signature on other values, the upstream gradient one image further into its
    # buffer: the plans are reused (nothing chunked again) and view these tensors
    x2 = torch.empty_like(x).copy_(random_tensor(x.shape, dtype, DEVICE))
    g2 = g.new_empty((g.shape[0] + 1) * g.stride(0)).as_strided(g.shape, g.stride(), g.stride(0))
    g2.copy_(random_tensor(g.shape, dtype, DEVICE))
    check_conv(x2, w, b, "triton", "im2col", dtype, grad_out=g2, padding=1, groups=groups)
    assert len(seen) == 3


@pytest.mark.parametrize("case", ["grouped_fp16", "channels_last_transposed_grad"])
def test_numba_im2col_workspace_chunks(monkeypatch, case):
    """The numba im2col path with a workspace of two images' columns: a batch of 3 in several
    chunks in every pass. Covers the fp32 sum of a 16-bit grad weight over chunks (rounded once
    by the last GEMM), (kh, kw, c) columns for a channels_last weight, and a cotangent whose
    (oh, ow) strides do not flatten (packed per chunk by the copy kernel)."""
    from pydl import _conv_im2col, _conv_numba
    dtype = torch.float16 if case == "grouped_fp16" else torch.float32
    groups = 2 if case == "grouped_fp16" else 1
    N, C, H, W, OC = 3, 4, 5, 4, 6
    x = random_tensor((N, C, H, W), dtype, DEVICE)
    w = random_tensor((OC, C // groups, 3, 3), dtype, DEVICE, scale=0.3)
    b = random_tensor(OC, dtype, DEVICE)
    g = random_tensor((N, OC, H, W), dtype, DEVICE)          # padding=1 keeps H x W
    if case != "grouped_fp16":
        x = x.to(memory_format=torch.channels_last)
        w = w.to(memory_format=torch.channels_last)
        g = random_tensor((N, OC, W, H), dtype, DEVICE).transpose(2, 3)
    # the bound is read where _chunks is defined; the numba launcher calls _chunks by its own name
    monkeypatch.setattr(_conv_im2col, "IM2COL_WORKSPACE_BYTES",
                        2 * H * W * C * 9 * x.element_size())
    seen = []
    chunks = _conv_numba._chunks
    monkeypatch.setattr(_conv_numba, "_chunks",
                        lambda n, per: seen.append(chunks(n, per)) or seen[-1])
    y = check_conv(x, w, b, "numba", "im2col", dtype, grad_out=g, padding=1, groups=groups)
    assert len(seen) == 3 and all(len(c) >= 2 for c in seen), seen
    assert seen[0] == [(0, 2), (2, 1)]
    if case != "grouped_fp16":
        assert y.is_contiguous(memory_format=torch.channels_last)


# --- conv1d: conv2d's kernels on a 1 x L image -----------------------------------------------

# (input shape, out channels, kernel, options)
CONV1D = {
    "plain": ((2, 4, 11), 6, 3, {}),
    "strided": ((2, 4, 13), 6, 3, dict(stride=2, padding=1)),
    "same_dilated": ((1, 4, 12), 4, 3, dict(padding="same", dilation=2)),
    "causal_depthwise": ((2, 8, 10), 8, 4, dict(padding=3, groups=8)),   # Mamba's mixer conv
    "pointwise_strided": ((2, 8, 9), 6, 1, dict(stride=2)),       # the shared GEMM's route
    "one_int_tuples": ((2, 4, 9), 6, 2, dict(stride=(2,), padding=(1,), dilation=(2,),
                                             groups=2)),
}


def _options_2d(opts: dict) -> dict:
    """conv1d's options as conv2d's on a 1 x L image, for the float64 reference."""
    def one(v):
        return v[0] if isinstance(v, tuple) else v
    padding = opts.get("padding", 0)
    return dict(stride=(1, one(opts.get("stride", 1))), dilation=(1, one(opts.get("dilation", 1))),
                padding=padding if isinstance(padding, str) else (0, one(padding)),
                groups=opts.get("groups", 1))


@variants
@pytest.mark.parametrize("layout", ["ncl", "nlc"])
@pytest.mark.parametrize("case", CONV1D)
def test_conv1d(backend, algo, case, layout):
    """conv1d forward and its three gradients against torch's conv1d and the float64 reference
    (a 1 x L conv2d); an (N, L, C) activation seen as (N, C, L) keeps its layout, uncopied."""
    (N, C, L), OC, K, opts = CONV1D[case]
    groups = opts.get("groups", 1)
    x = random_tensor((N, C, L) if layout == "ncl" else (N, L, C), torch.float32, DEVICE)
    x = x if layout == "ncl" else x.transpose(1, 2)
    w = random_tensor((OC, C // groups, K), torch.float32, DEVICE)
    b = random_tensor((OC,), torch.float32, DEVICE)
    out, g, grads = run_with_grad(
        lambda x, w, b: pydl.conv1d(x, w, b, backend=backend, algo=algo, **opts), [x, w, b])
    t_out, _, t_grads = run_with_grad(lambda x, w, b: F.conv1d(x, w, b, **opts), [x, w, b], g)
    x64, w64 = x.double().cpu().numpy()[:, :, None], w.double().cpu().numpy()[:, :, None]
    o2 = _options_2d(opts)
    y64 = ref.conv2d(x64, w64, b.double().cpu().numpy(), **o2)[:, :, 0]
    r_grads = ref.conv2d_backward(g.double().cpu().numpy()[:, :, None], x64, w64, has_bias=True,
                                  **o2)
    r_grads = [r_grads[0][:, :, 0], r_grads[1][:, :, 0], r_grads[2]]
    assert out.shape == t_out.shape == y64.shape
    if layout == "nlc" and backend == "triton":     # the output in the input's layout
        assert out.transpose(1, 2).is_contiguous()
    reductions = [C // groups * K, OC // groups * K, out.numel() // OC, out.numel() // OC]
    assert_close(out, y64, torch.float32, reduction=reductions[0], tf32=TF32, name="forward")
    assert_close(out, t_out, torch.float32, reduction=reductions[0], tf32=TF32,
                 name="forward vs torch")
    for name, ours, theirs, r, red in zip(("grad input", "grad weight", "grad bias"), grads,
                                          t_grads, r_grads, reductions[1:]):
        assert_close(ours, r, torch.float32, reduction=red, tf32=TF32, name=name)
        assert_close(ours, theirs, torch.float32, reduction=red, tf32=TF32,
                     name=f"{name} vs torch")


@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_conv1d_output_takes_in_place_ops(backend):
    """The planned conv1d makes its output in its 1-d shape (not a view of a 1 x L image, which
    autograd would refuse to modify in place inside a custom Function's output)."""
    x = random_tensor((2, 4, 9), torch.float32, DEVICE).requires_grad_()
    w = random_tensor((6, 4, 3), torch.float32, DEVICE).requires_grad_()
    y = pydl.conv1d(x, w, padding=1, backend=backend)
    assert y._base is None
    y.relu_().sum().backward()
    xt, wt = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    F.conv1d(xt, wt, padding=1).relu_().sum().backward()
    assert_close(x.grad, xt.grad, torch.float32, reduction=18, tf32=TF32)
    assert_close(w.grad, wt.grad, torch.float32, reduction=18, tf32=TF32)


def test_conv1d_unbatched_and_refusals():
    backend, algo = VARIANTS[0]
    x = random_tensor((4, 9), torch.float32, DEVICE)
    w = random_tensor((6, 4, 3), torch.float32, DEVICE)
    conv = lambda *a, **k: pydl.conv1d(*a, backend=backend, algo=algo, **k)  # noqa: E731
    assert_close(conv(x, w, padding=1), F.conv1d(x, w, padding=1), torch.float32, reduction=12,
                 tf32=TF32)
    for option, value in (("stride", (2, 2)), ("stride", 2.0), ("padding", (1, 1)),
                          ("dilation", True), ("stride", [])):
        with pytest.raises(TypeError, match=f"{option} must be an int or a sequence of one int"):
            conv(x, w, **{option: value})
    with pytest.raises(ValueError, match="2-D or 3-D"):
        conv(x[0], w)
    with pytest.raises(ValueError, match="weight must be 3-D"):
        conv(x, w[..., None])
    with pytest.raises(ValueError, match="padding must be"):
        conv(x, w, padding="full")
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        conv(x.double(), w.double())


@pytest.mark.parametrize("padding_mode", ["zeros", "circular"])
def test_conv1d_module_is_drop_in(padding_mode):
    theirs = torch.nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2,
                             padding_mode=padding_mode).to(DEVICE)
    ours = pydl.nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode,
                          device=DEVICE, backend="triton")
    assert isinstance(ours, torch.nn.Conv1d) and repr(ours) == repr(theirs)
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor((2, 4, 11), torch.float32, DEVICE)
    out, g, (dx,) = run_with_grad(lambda x: ours(x), [x])
    t_out, _, (t_dx,) = run_with_grad(lambda x: theirs(x), [x], g)
    assert_close(out, t_out, torch.float32, reduction=6, tf32=TF32)
    assert_close(dx, t_dx, torch.float32, reduction=9, tf32=TF32)
    assert_close(ours.weight.grad, theirs.weight.grad, torch.float32, reduction=12, tf32=TF32)


# --- bad input ------------------------------------------------------------------------------

@variants
def test_bad_input(backend, algo):
    x = random_tensor((1, 4, 6, 6), torch.float32, DEVICE)
    w = random_tensor((2, 4, 3, 3), torch.float32, DEVICE)
    conv = lambda *a, **k: pydl.conv2d(*a, backend=backend, algo=algo, **k)  # noqa: E731
    with pytest.raises(ValueError, match="weight expects 2 x groups=1"):
        conv(x, w[:, :2])
    with pytest.raises(ValueError, match="divisible by groups"):
        conv(x, w[:, :1], groups=3)
    with pytest.raises(ValueError, match="larger than the padded"):
        conv(x[..., :2, :2], w)
    with pytest.raises(ValueError, match="stride must be positive"):
        conv(x, w, stride=0)
    with pytest.raises(ValueError, match="stride must be positive"):
        conv(x, w, stride=-1)
    with pytest.raises(ValueError, match="3-D or 4-D"):
        conv(x[0, 0], w)
    with pytest.raises(ValueError, match="4-D"):
        conv(x, w[0])
    with pytest.raises(TypeError, match="same dtype"):
        conv(x, w.half())
    with pytest.raises(ValueError, match="bias"):
        conv(x, w, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="not supported for strided"):
        conv(x, w, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be"):
        conv(x, w, padding="full")
    with pytest.raises(ValueError, match="algo"):
        pydl.conv2d(x, w, backend=backend, algo="winograd")
    for empty in (x[:, :, :0], x[..., :0]):     # torch refuses a 0-pixel side, padded or not
        with pytest.raises(ValueError, match="empty spatial dimension"):
            conv(empty, w, padding=2)


@pytest.mark.gpu
@pytest.mark.full
def test_conv2d_beyond_int32_offsets():
    """More than 2**31 input elements: offsets must be computed in int64."""
    x = torch.randn(2 ** 11 + 1, 16, 256, 256, device="cuda", dtype=torch.float16)
    w = torch.randn(8, 16, 3, 3, device="cuda", dtype=torch.float16)
    y = pydl.conv2d(x, w, padding=1)
    assert_close(y[-1:], F.conv2d(x[-1:], w, padding=1), torch.float16, reduction=144)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
def test_conv2d_module_is_drop_in(padding_mode):
    backend, algo = VARIANTS[0]
    theirs = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2,
                             padding_mode=padding_mode).to(DEVICE)
    ours = pydl.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, padding_mode=padding_mode,
                          device=DEVICE, backend=backend, algo=algo)
    assert isinstance(ours, torch.nn.Conv2d)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = random_tensor((2, 4, 7, 8), torch.float32, DEVICE)
    out, g, grads = run_with_grad(lambda x: ours(x), [x])
    t_out, _, t_grads = run_with_grad(lambda x: theirs(x), [x], g)
    assert_close(out, t_out, torch.float32, reduction=18, tf32=TF32)
    assert_close(grads[0], t_grads[0], torch.float32, reduction=27, tf32=TF32)
    ours.zero_grad()
    ours(x).sum().backward()
    theirs.zero_grad()
    theirs(x).sum().backward()
    assert_close(ours.weight.grad, theirs.weight.grad, torch.float32, reduction=32, tf32=TF32)
    assert_close(ours.bias.grad, theirs.bias.grad, torch.float32, reduction=32, tf32=TF32)


@pytest.mark.gpu
@pytest.mark.full
def test_conv2d_im2col_beyond_int32_offsets():
    """The im2col path on more than 2**31 input elements (many workspace chunks)."""
    x = torch.randn(2 ** 11 + 1, 16, 256, 256, device="cuda", dtype=torch.float16)
    w = torch.randn(8, 16, 3, 3, device="cuda", dtype=torch.float16)
    y = pydl.conv2d(x, w, padding=1, algo="im2col")
    assert_close(y[-1:], F.conv2d(x[-1:], w, padding=1), torch.float16, reduction=144)
