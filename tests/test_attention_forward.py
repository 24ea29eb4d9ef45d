"""The attention forward's two ways in: the `tl` flash kernel's TMA (tensor descriptor) and
pointer paths, the scale folded into the exponent (negative scales included), and
algo="flash_hopper" (the Gluon kernel for Hopper): where it refuses to run, and on a Hopper
GPU, its outputs and gradients against the float64 reference and torch.

The general attention semantics (masks, dropout, GQA, layouts) are tests/test_attention.py's;
the helpers come from there."""
import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import DEVICE, DTYPES
from test_attention import _mask_reference, check_attention, qkv
from test_resources import REPO, _clean_env

import pydl
from bench import resources
from pydl import _attention_triton, _env, _launch, _numba_launch, attention_hopper
from pydl import reference as ref
from pydl.testing import assert_close, random_tensor, run_with_grad

BACKENDS = ("triton", "numba")
HAS_HOPPER = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] == 9


# --- the tl forward: TMA descriptors where the layout allows, pointers elsewhere -------------

def _tma(q, k, v):
    o = torch.empty(q.shape[:3] + (v.shape[3],), dtype=q.dtype, device=q.device)
    return _attention_triton._forward_tma(q, k, v, o)


def test_forward_reads_through_tma_where_the_strides_allow():
    on = _launch.tma_available(torch.device(DEVICE))
    h = torch.float16
    q, k, v = qkv(2, 3, 3, 11, 13, 16, dtype=h)
    assert _tma(q, k, v) is on                                       # contiguous
    t = random_tensor((2, 11, 3, 16), h, DEVICE).transpose(1, 2)
    assert _tma(t, k, v) is on                                       # (B, L, H, E) memory
    assert _tma(*qkv(1, 2, 2, 9, 9, 24, 24, h)) is on                # 48-byte rows
    # rows of 17 halves (34 bytes), of 20 (40 bytes), a base 2 bytes off, a strided head dim,
    # a head dim past TMA's 256-element box: pointer loads
    assert not _tma(random_tensor((2, 3, 11, 17), h, DEVICE)[..., :16], k, v)
    assert not _tma(*qkv(1, 2, 2, 9, 9, 20, 20, h))
    assert not _tma(random_tensor((2 * 3 * 11 * 16 + 1,), h, DEVICE)[1:]
                    .view(2, 3, 11, 16), k, v)
    assert not _tma(random_tensor((2, 3, 11, 32), h, DEVICE)[..., ::2], k, v)
    assert not _tma(*qkv(1, 1, 1, 4, 4, 264, 264, h))
    # fp32 with exact (IEEE) products: pointer loads, whose tiles fit the registers (through
    # TMA every fp32 tile spilled, bench/TUNING.md); with TF32 on, TMA
    f = qkv(2, 3, 3, 11, 13, 16)
    matmul, was = torch.backends.cuda.matmul, torch.backends.cuda.matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert not _tma(*f)
        matmul.allow_tf32 = True
        assert _tma(*f) is on
    finally:
        matmul.allow_tf32 = was
    if DEVICE == "cpu":
        assert _launch.tma_available(torch.device("cpu")) is _env.INTERPRET


@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", ["odd", "gqa", "long_keys"])
def test_tma_and_pointer_paths_agree(monkeypatch, case, causal):
    """The same inputs through both paths of the tl forward, each against the reference
    (forward and the gradients, which read the forward's log-sum-exp)."""
    shape = {"odd": (2, 2, 2, 37, 29, 24, 24), "gqa": (1, 4, 2, 21, 18, 32, 16),
             "long_keys": (1, 2, 2, 9, 70, 16, 16)}[case]
    h = torch.float16           # fp32 with IEEE products takes the pointer path only
    q, k, v = qkv(*shape, dtype=h)
    opts = dict(is_causal=causal, enable_gqa=shape[1] != shape[2])
    assert _tma(q, k, v) is _launch.tma_available(q.device)
    check_attention(q, k, v, "triton", h, **opts)
    with_tma = pydl.scaled_dot_product_attention(q, k, v, backend="triton", **opts)
    monkeypatch.setattr(_attention_triton, "_forward_tma", lambda *a: False)
    check_attention(q, k, v, "triton", h, **opts)
    without = pydl.scaled_dot_product_attention(q, k, v, backend="triton", **opts)
    assert_close(with_tma, without, h, reduction=shape[4], name="tma vs pointers")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_pointer_path_with_unaligned_rows(dtype, causal):
    """Head dim 20: 40-byte rows in 16-bit types, which TMA cannot address (fp32: 80 bytes,
    the descriptor path where TF32 is on; IEEE products take the pointers)."""
    q, k, v = qkv(2, 2, 2, 23, 31, 20, 20, dtype)
    assert _tma(q, k, v) is (dtype == torch.float32 and _launch.tma_available(q.device)
                             and torch.backends.cuda.matmul.allow_tf32)
    check_attention(q, k, v, "triton", dtype, is_causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [-0.3, 0.0], ids=["negative", "zero"])
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_scale_sign(backend, scale, causal):
    """The unmasked tiles take the row max of the unscaled scores (the scale is folded into
    the exponent's FMA): right only for a scale >= 0, so a negative one takes another path.
    Scores spread over hundreds, so that a row max taken from the wrong end overflows."""
    q, k, v = qkv(1, 2, 2, 35, 40, 16)
    q = q * 40
    out = pydl.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            backend=backend)
    r = ref.scaled_dot_product_attention(*(t.double().cpu().numpy() for t in (q, k, v)),
                                         scale=scale, is_causal=causal)
    # scores 40 times larger: 40 times the fp32 rounding of a score in the exponent
    assert_close(out, r, torch.float32, reduction=40, scale=40, name="forward vs reference")
    if not (causal and scale <= 0):
        # (torch 2.13's SDPA gives NaN there: it multiplies the causal mask's -inf by the scale)
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale,
                                                                  is_causal=causal)
        assert_close(out, theirs, torch.float32, reduction=40, scale=40, name="forward vs torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_scale_gradients(backend):
    check_attention(*qkv(2, 2, 2, 19, 33, 24), backend, torch.float32, scale=-0.4)


# --- algo="flash_hopper": where it refuses ----------------------------------------------------

HOPPER_ALGOS = ("flash_hopper", "flash_hopper_onepass")


# where the Gluon kernels run: a Hopper GPU, or emulation (pydl/_gluon_sim.py)
RUNS_GLUON = HAS_HOPPER or _env.INTERPRET


@pytest.mark.parametrize("algo", HOPPER_ALGOS)
def test_flash_hopper_refuses_where_it_cannot_run(algo):
    q, k, v = qkv(1, 2, 2, 16, 16, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match="not available on the 'numba' backend"):
        pydl.scaled_dot_product_attention(q, k, v, backend="numba", algo=algo)
    if RUNS_GLUON:
        pytest.skip("this machine runs it (tested below)")
    with pytest.raises(NotImplementedError, match=f"algo='{algo}'.*use algo='flash'") as e:
        pydl.scaled_dot_product_attention(q, k, v, backend="triton", algo=algo)
    assert "Hopper" in str(e.value)


def test_gluon_backward_takes_tma_rows_and_no_deterministic_mode():
    """Where algo="flash_hopper_onepass" runs its Gluon backward, and where the flash one."""
    half = torch.float16
    q, k, v = qkv(1, 4, 4, 16, 24, 64, 64, half)
    do = torch.empty_like(q)
    takes = attention_hopper.gluon_backward_takes
    assert takes(q, do)
    assert takes(q, random_tensor((1, 16, 4, 64), half, DEVICE).transpose(1, 2))  # (B, L, H, E)
    assert not takes(q, random_tensor((1, 4, 16, 128), half, DEVICE)[..., ::2])
    assert not takes(q, torch.ones((), dtype=half, device=DEVICE).expand(q.shape))
    one_head = random_tensor((1, 1, 16, 64), half, DEVICE)
    assert not takes(q, one_head.expand(q.shape))         # stride 0 across the heads only
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        assert not takes(q, do)
    finally:
        torch.use_deterministic_algorithms(was)


def test_descriptor_strides_of_size_one_and_expanded_dims():
    """The strides a (batch, heads, rows, E) TMA descriptor takes: as the tensor's, but a
    size-1 dim's (which no index multiplies, and torch leaves arbitrary) the extent inside
    it; none for a dim of several entries with stride 0."""
    half = torch.float16
    x = torch.empty(2, 3, 5, 64, dtype=half)
    assert _launch.descriptor_strides(x) == x.stride()
    assert _launch.descriptor_strides(x.transpose(1, 2)) == x.transpose(1, 2).stride()
    odd = torch.empty(80, dtype=half).as_strided((1, 1, 1, 64), (7, 3, 5, 1))
    assert _launch.descriptor_strides(odd) == (64, 64, 64, 1)
    one_head = torch.empty(2, 4, 8, 64, dtype=half)[:, 1:2]          # (2, 1, 8, 64)
    assert _launch.descriptor_strides(one_head) == (2048, 512, 64, 1)
    assert _launch.descriptor_strides(x[:, :1].expand(2, 3, 5, 64)) is None


def test_flash_hopper_grid_one_program_per_multiprocessor_or_per_unit(monkeypatch):
    """The forward's programs: one per multiprocessor when persistent (never more than the
    work units), else one per unit: a query tile of 128 rows of one (batch, head), or,
    causal, a pair of them (the longest rows with the shortest; an odd tile alone)."""
    monkeypatch.setattr(_launch, "multiprocessors", lambda device: 132)
    grid = attention_hopper._forward_grid
    q = torch.empty(2, 3, 300, 64)                  # 2 * 3 * 3 = 18 query tiles
    assert attention_hopper._work_tiles(q) == 18
    assert grid(q, False, dict(PERSISTENT=False)) == (18,)
    assert grid(q, False, dict(PERSISTENT=True)) == (18,)
    assert grid(q, True, dict(PERSISTENT=False)) == (12,)       # 2 pairs a head: (2, 0), (1)
    big = torch.empty(16, 16, 1024, 128, device="meta")
    assert grid(big, False, dict(PERSISTENT=True)) == (132,)
    assert grid(big, True, dict(PERSISTENT=True)) == (132,)
    assert grid(big, False, dict(PERSISTENT=False)) == (2048,)
    assert grid(big, True, dict(PERSISTENT=False)) == (1024,)


def test_flash_hopper_names_each_reason(monkeypatch):
    """Each limit of the kernel has its own message; the device and emulation checks are
    replaced so that the others can be reached on any machine."""
    monkeypatch.setattr(_env, "INTERPRET", False)
    monkeypatch.setattr(_launch, "device_capability", lambda device: (9, 0))
    half = torch.float16

    def why(q, k, v, mask=None, dropout_p=0.0, scale=0.125):
        return attention_hopper.unsupported(q, k, v, mask, dropout_p, scale)

    q, k, v = qkv(1, 2, 1, 16, 24, 64, 64, half)
    assert why(q, k, v) is None
    assert why(*qkv(1, 2, 2, 16, 16, 128, 128, torch.bfloat16)) is None
    assert "float16 or bfloat16" in why(*qkv(1, 2, 2, 16, 16, 64))
    assert "head dims 64 or 128" in why(*qkv(1, 2, 2, 16, 16, 80, 80, half))
    assert "head dims 64 or 128" in why(*qkv(1, 2, 2, 16, 16, 64, 128, half))
    assert "at least one key" in why(q, k[:, :, :0], v[:, :, :0])
    assert "attn_mask" in why(q, k, v, mask=torch.ones(16, 24, dtype=torch.bool))
    assert "dropout" in why(q, k, v, dropout_p=0.1)
    assert "scale >= 0" in why(q, k, v, scale=-1.0)
    many = [t.expand(65536, 32769, *t.shape[2:]) for t in qkv(1, 1, 1, 16, 24, 64, 64, half)]
    assert "32-bit" in why(*many)              # 2^31 + 2^16 tiles of 128 query rows
    strided = random_tensor((1, 2, 16, 128), half, DEVICE)[..., ::2]
    assert "query rows are not TMA-addressable" in why(strided, k, v)
    assert "key is expanded" in why(q, k.expand(1, 2, 24, 64), v.expand(1, 2, 24, 64))
    assert "query is expanded" in why(q[:, :1].expand(1, 2, 16, 64), k, v)
    monkeypatch.setattr(_launch, "device_capability", lambda device: (10, 0))
    assert "compute capability 10.0" in why(q, k, v)
    monkeypatch.setattr(_launch, "device_capability", lambda device: None)
    assert "CPU tensor" in why(q, k, v)
    monkeypatch.setattr(_env, "INTERPRET", True)       # the simulator takes CPU tensors
    assert why(q, k, v) is None
    assert "dropout" in why(q, k, v, dropout_p=0.1)


# --- algo="flash_hopper" on a Hopper GPU ------------------------------------------------------

def _hopper_case(B, H, HKV, L, S, E, dtype, layout="bhld"):
    if layout == "blhd":       # (B, L, H, E) memory, as multi-head projections produce
        q = random_tensor((B, L, H, E), dtype, DEVICE).transpose(1, 2)
        k, v = (random_tensor((B, S, HKV, E), dtype, DEVICE).transpose(1, 2) for _ in "kv")
        return q, k, v
    return qkv(B, H, HKV, L, S, E, E, dtype)


HOPPER_CASES = {
    # (B, Hq, Hkv, L, S, E, layout)
    "d128_tiles": (2, 4, 4, 512, 512, 128, "bhld"),
    "d64_tiles": (2, 4, 4, 384, 384, 64, "bhld"),
    "ragged": (1, 3, 3, 333, 1000, 128, "bhld"),          # partial query and key tiles
    "queries_past_keys": (1, 2, 2, 700, 130, 64, "bhld"),  # causal rows past S see all keys
    "keys_past_queries": (1, 2, 2, 100, 600, 128, "bhld"),
    "single_query": (1, 2, 2, 1, 257, 64, "bhld"),
    "one_key": (1, 2, 2, 65, 1, 128, "bhld"),
    "gqa": (2, 8, 2, 256, 320, 128, "bhld"),
    "projection_layout": (2, 4, 4, 200, 300, 64, "blhd"),
}


@pytest.fixture
def gluon_backwards(monkeypatch):
    """The Gluon backward plans built (a list that grows by one per plan), every cached plan
    forgotten first so that each call signature plans again."""
    from pydl import _plan
    _plan.clear_all()
    built = []
    real = attention_hopper._gluon_backward

    def spy(*args):
        built.append(args[0].shape)
        return real(*args)
    monkeypatch.setattr(attention_hopper, "_gluon_backward", spy)
    yield built
    _plan.clear_all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", HOPPER_CASES)
@pytest.mark.parametrize("algo", HOPPER_ALGOS)
def test_flash_hopper_matches_reference(algo, case, causal, dtype, gluon_backwards):
    """Forward against the float64 reference and torch, and the gradients (flash_hopper: the
    flash backward from this forward's output and log-sum-exp; flash_hopper_onepass: the
    Gluon single pass); then the same output as the default algo within the dtype's
    tolerance."""
    B, H, HKV, L, S, E, layout = HOPPER_CASES[case]
    q, k, v = _hopper_case(B, H, HKV, L, S, E, dtype, layout)
    opts = dict(is_causal=causal, enable_gqa=H != HKV)
    check_attention(q, k, v, "triton", dtype, algo=algo, **opts)
    gluon = algo == "flash_hopper_onepass"
    assert bool(gluon_backwards) == gluon, "the Gluon backward ran where it should, only there"
    ours = pydl.scaled_dot_product_attention(q, k, v, backend="triton", algo=algo, **opts)
    flash = pydl.scaled_dot_product_attention(q, k, v, backend="triton", **opts)
    assert_close(ours, flash, dtype, reduction=S, name=f"{algo} vs flash")


# The forward's schedules beside the default (tuning is off in the tests: the first
# candidate of HOPPER_SPACES runs): (BLOCK_N, STAGES, PERSISTENT) per head dim, and the
# multiprocessors a persistent grid is sized for (3: each program walks many work tiles, so
# the ring index and the Q buffer pass from tile to tile, across heads and batches).
HOPPER_SCHEDULES = {
    "one_tile_a_program": ({64: (128, 3, False), 128: (128, 3, False)}, None),
    "persistent_3_programs": (None, 3),
    "n64_persistent_5_programs": ({64: (64, 4, True), 128: (64, 3, True)}, 5),
    "two_stages_persistent_3_programs": ({64: (128, 2, True), 128: (128, 2, True)}, 3),
}
# the cases with partial tiles, rows past the keys, grouped heads and the projection layout
# (the default schedule runs every case in test_flash_hopper_matches_reference)
SCHEDULE_CASES = ("d64_tiles", "ragged", "queries_past_keys", "gqa", "projection_layout")


def _use_schedule(schedule: str, monkeypatch) -> None:
    """The forward plans only `schedule` of HOPPER_SCHEDULES from now on (cached plans
    forgotten: the caller clears them again after)."""
    from pydl import _plan
    space, sms = HOPPER_SCHEDULES[schedule]
    if space is not None:
        monkeypatch.setattr(attention_hopper, "HOPPER_SPACES",
                            {e: (c,) for e, c in space.items()})
    if sms is not None:
        monkeypatch.setattr(_launch, "multiprocessors", lambda device: sms)
    _plan.clear_all()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", SCHEDULE_CASES)
@pytest.mark.parametrize("schedule", HOPPER_SCHEDULES)
def test_flash_hopper_schedules_match_reference(schedule, case, causal, monkeypatch):
    """Every schedule the tuner may pick, forward and gradients (the flash backward from the
    forward's output and log-sum-exp) against the float64 reference and torch."""
    from pydl import _plan
    _use_schedule(schedule, monkeypatch)
    try:
        B, H, HKV, L, S, E, layout = HOPPER_CASES[case]
        q, k, v = _hopper_case(B, H, HKV, L, S, E, torch.bfloat16, layout)
        check_attention(q, k, v, "triton", torch.bfloat16, algo="flash_hopper",
                        is_causal=causal, enable_gqa=H != HKV)
    finally:
        _plan.clear_all()


# --- algo="flash_hopper" in the Gluon simulator (emulation) -----------------------------------
#
# Triton's interpreter cannot run Gluon; pydl/_gluon_sim.py runs the kernels' own source on CPU
# tensors (each partition a thread, mbarrier phases as the hardware completes them, TMA loads
# landing late and in any order, wgmma operands read when the product is waited for), so that
# their index arithmetic, masks, work order, ring and barrier protocol are tested here at small
# shapes, where every program walks several tiles. Layouts, swizzles and timing only a GPU
# shows (the tests above). fp16: the flash kernels around them run in Triton's interpreter,
# which computes bf16 wrongly.

SIM_CASES = {
    # (B, Hq, Hkv, L, S, E, layout)
    "tiles": (1, 2, 2, 256, 256, 64, "bhld"),
    "ragged": (1, 2, 2, 200, 330, 128, "bhld"),           # partial query and key tiles
    "queries_past_keys": (1, 2, 2, 300, 130, 64, "bhld"),
    "keys_past_queries": (1, 1, 1, 70, 300, 128, "bhld"),
    "single_query": (1, 1, 1, 1, 129, 64, "bhld"),
    "one_key": (2, 1, 1, 65, 1, 128, "bhld"),
    "gqa": (1, 4, 2, 130, 200, 128, "bhld"),
    "projection_layout": (2, 2, 2, 150, 140, 64, "blhd"),
}
SIM_SCHEDULE_CASES = ("ragged", "queries_past_keys", "gqa")


def _assert_forward_matches_reference(out, q, k, v, name: str, **opts):
    """An fp16 output against the float64 reference's (pydl.reference) for these inputs."""
    n = [t.detach().double().cpu().numpy() for t in (q, k, v)]
    assert_close(out, ref.scaled_dot_product_attention(*n, **opts), torch.float16,
                 reduction=k.shape[-2], name=f"{name} vs reference")


@pytest.mark.skipif(not _env.INTERPRET, reason="the simulator's (a GPU runs the kernels above)")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", SIM_CASES)
@pytest.mark.parametrize("algo", HOPPER_ALGOS)
def test_flash_hopper_simulated_matches_reference(algo, case, causal, gluon_backwards):
    """The Gluon forward (and for flash_hopper_onepass the Gluon backward), simulated: output
    (and gradients) against the float64 reference and torch, and the flash algo's output."""
    B, H, HKV, L, S, E, layout = SIM_CASES[case]
    q, k, v = _hopper_case(B, H, HKV, L, S, E, torch.float16, layout)
    opts = dict(is_causal=causal, enable_gqa=H != HKV)
    ours = pydl.scaled_dot_product_attention(q, k, v, backend="triton", algo=algo, **opts)
    if algo == "flash_hopper_onepass" or case == "ragged":
        # (flash_hopper's backward is the flash one, tested on its own: here, on one case,
        # that it takes this forward's log-sum-exp)
        check_attention(q, k, v, "triton", torch.float16, algo=algo, **opts)
        assert bool(gluon_backwards) == (algo == "flash_hopper_onepass")
    else:
        _assert_forward_matches_reference(ours, q, k, v, algo, **opts)
    flash = pydl.scaled_dot_product_attention(q, k, v, backend="triton", **opts)
    assert_close(ours, flash, torch.float16, reduction=S, name=f"{algo} vs flash")


@pytest.mark.skipif(not _env.INTERPRET, reason="the simulator's (a GPU runs the kernels above)")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", SIM_SCHEDULE_CASES)
@pytest.mark.parametrize("schedule", HOPPER_SCHEDULES)
def test_flash_hopper_simulated_schedules_match_reference(schedule, case, causal, monkeypatch):
    """Every schedule the tuner may pick, simulated (persistent grids of 3 and 5 programs:
    each walks tiles across heads and batches, the ring index and the Q buffer passed on):
    the forward's output against the float64 reference."""
    from pydl import _plan
    _use_schedule(schedule, monkeypatch)
    try:
        B, H, HKV, L, S, E, layout = SIM_CASES[case]
        q, k, v = _hopper_case(B, H, HKV, L, S, E, torch.float16, layout)
        out = pydl.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=H != HKV,
                                                backend="triton", algo="flash_hopper")
    finally:
        _plan.clear_all()
    _assert_forward_matches_reference(out, q, k, v, schedule, is_causal=causal,
                                      enable_gqa=H != HKV)


@pytest.mark.skipif(not _env.INTERPRET, reason="the simulator's (a GPU runs the kernels above)")
@pytest.mark.parametrize("where", ["nan_key", "inf_value", "nan_query"])
@pytest.mark.parametrize("algo", HOPPER_ALGOS)
def test_flash_hopper_simulated_nonfinite_like_torch(algo, where):
    """A NaN or an infinity in the inputs spreads as torch's math spreads it (the kernels'
    row max ignores a NaN as a GPU's max does, the NaN reaching the output through P V)."""
    q, k, v = _hopper_case(1, 2, 2, 70, 150, 64, torch.float16)
    t = {"nan_key": k, "inf_value": v, "nan_query": q}[where]
    t[0, 1, 3, 2] = float("inf") if where == "inf_value" else float("nan")
    out, g, grads = run_with_grad(lambda *a: pydl.scaled_dot_product_attention(
        *a, backend="triton", algo=algo), [q, k, v])
    t_out, _, t_grads = run_with_grad(lambda *a: pydl.scaled_dot_product_attention(
        *a, backend="torch"), [q, k, v], g)
    assert not out.isfinite().all()
    for name, a, b in (("out", out, t_out), *zip(("dq", "dk", "dv"), grads, t_grads)):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), \
            f"{name}: a NaN or an infinity where torch has none, or none where it has"
        assert_close(a, b, torch.float16, reduction=150 * 64, name=name)


@pytest.mark.full
@pytest.mark.skipif(not _env.INTERPRET, reason="the simulator's (a GPU runs the kernels above)")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("case", HOPPER_CASES)
def test_flash_hopper_simulated_at_the_gpu_cases(case, causal, gluon_backwards):
    """The GPU tests' cases (up to 1000 keys, many tiles a program), simulated: the Gluon
    forward and single-pass backward's output and gradients against the float64 reference
    and torch (fp16)."""
    B, H, HKV, L, S, E, layout = HOPPER_CASES[case]
    q, k, v = _hopper_case(B, H, HKV, L, S, E, torch.float16, layout)
    check_attention(q, k, v, "triton", torch.float16, algo="flash_hopper_onepass",
                    is_causal=causal, enable_gqa=H != HKV)
    assert gluon_backwards


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
def test_flash_hopper_onepass_sweep_point_matches_flash(causal, gluon_backwards):
    """FlashAttention's d128 4k point (many query tiles per program, dQ added by 32 key
    tiles): the Gluon backward's gradients against the flash backward's (no float64 copy of
    that size), and in deterministic mode the flash backward itself."""
    q, k, v = qkv(1, 16, 16, 4096, 4096, 128, 128, torch.bfloat16)
    do = random_tensor(q.shape, torch.bfloat16, DEVICE)

    def grads(algo):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = pydl.scaled_dot_product_attention(*leaves, is_causal=causal, scale=0.05,
                                                backend="triton", algo=algo)
        out.backward(do)
        return [t.grad for t in leaves]
    for ours, flash, name in zip(grads("flash_hopper_onepass"), grads("flash"), "qkv"):
        assert_close(ours, flash, torch.bfloat16, reduction=4096, scale=4.0,
                     name=f"d{name} causal={causal}")
    assert len(gluon_backwards) == 1
    was = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        a, b = grads("flash_hopper_onepass"), grads("flash")
    finally:
        torch.use_deterministic_algorithms(was)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(gluon_backwards) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
def test_flash_hopper_sweep_point_and_scale():
    """FlashAttention's d128 4k point at batch 1 (many tiles per program), causal, with a
    non-default scale, against torch's own kernel (no float64 copy of that size)."""
    q, k, v = qkv(1, 16, 16, 4096, 4096, 128, 128, torch.bfloat16)
    for causal in (False, True):
        ours = pydl.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.05,
                                                 backend="triton", algo="flash_hopper")
        theirs = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                  scale=0.05)
        assert_close(ours, theirs, torch.bfloat16, reduction=4096, name=f"causal={causal}")


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_HOPPER, reason="needs a Hopper GPU (compute capability 9.x)")
def test_flash_hopper_default_scale_matches_explicit():
    q, k, v = qkv(1, 2, 2, 130, 130, 64, 64, torch.float16)
    a = pydl.scaled_dot_product_attention(q, k, v, backend="triton", algo="flash_hopper")
    b = pydl.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(64), backend="triton",
                                          algo="flash_hopper")
    assert torch.equal(a, b)


def test_benchmark_lists_flash_hopper_and_says_why_it_skips():
    from bench.suites.attention import SHAPES, AttentionSuite
    suite = AttentionSuite()
    variants = {v.name: v for v in suite.variants()}
    v = variants["triton-flash_hopper"]
    assert v.skip is None and v.algo == "flash_hopper"
    case = next(c for c in SHAPES["quick"] if c.shape[3] == 128)
    why = suite.unsupported(case, torch.bfloat16, v)
    if RUNS_GLUON:
        assert why is None
    else:
        assert why.startswith("algo='flash_hopper': it ")
    if HAS_HOPPER:
        assert "float16 or bfloat16" in suite.unsupported(case, torch.float32, v)


# --- algo="flash_hopper" compiled for sm_90 without a GPU ---------------------------------------

HOPPER_COMPILE = r"""
import json
from bench import resources as R
rows = R.capture(90, [("attention", "hopper", R._attention_hopper(True))])
row = next(r for r in rows if r["kernel"] == "attention_fwd_hopper" and r["candidate"] == 0)
R.measure([row], workers=1)
print(json.dumps(R._json_row(row), default=str))
"""


def test_flash_hopper_compiles_for_sm90_offline(tmp_path):
    """The default configuration, captured from the launcher (d128 bf16, causal) and compiled
    by `bench resources`: wgmma, TMA loads, the producer's and consumers' register budgets,
    no spills, within Hopper's shared memory, one program per multiprocessor."""
    why = resources.missing_toolchain()
    if why:
        pytest.skip(f"no offline Triton/CUDA toolchain: {why}")
    proc = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], cwd=REPO,
                          env=_clean_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in row, row.get("error")
    assert row["config"] == dict(BLOCK_N=128, STAGES=3, PERSISTENT=True, num_warps=4)
    assert row["verdict"] == "ok"                 # no spills, fits the shared memory
    assert row["num_warps"] == 12                 # 2 consumer warpgroups + the producer's
    assert row["hgmma"] > 0 and row["hmma"] == 0 and row["tma"] > 0
    assert row["grid"] == [132]                   # persistent: one program a multiprocessor
    assert {24, 240} <= set(row["setmaxnreg"])    # producer and consumers' budgets


HOPPER_BWD_COMPILE = r"""
import json, sys
from bench import resources as R
E, causal, HKV = int(sys.argv[1]), sys.argv[2] == "causal", int(sys.argv[3])
rows = R.capture(90, [("attention", "hopper_onepass",
                       R._attention_onepass(causal, "triton:flash_hopper_onepass", E=E,
                                            HKV=HKV))])
row = next(r for r in rows if r["kernel"] == "attention_bwd_hopper" and r["candidate"] == 0)
R.measure([row], workers=1)
print(json.dumps(R._json_row(row), default=str))
"""


@pytest.mark.parametrize("E,causal,HKV,spill", [(64, "causal", 16, 0), (128, "noncausal", 16, 256),
                                               (128, "causal", 4, 768)])
def test_flash_hopper_onepass_backward_compiles_for_sm90_offline(tmp_path, E, causal, HKV,
                                                                 spill):
    """The Gluon backward's default configuration, captured from the launcher (bf16) and
    compiled by `bench resources`: wgmma, TMA copies both ways, the partitions' register
    budgets, within Hopper's shared memory; no spills at d = 64, at d = 128 at most the
    bytes bench/TUNING.md reports (the consumers keep dK and dV, 128 fp32 registers a thread,
    beside the two score tiles); grouped-query heads (16 on 4) compile too."""
    why = resources.missing_toolchain()
    if why:
        pytest.skip(f"no offline Triton/CUDA toolchain: {why}")
    proc = subprocess.run([sys.executable, "-c", HOPPER_BWD_COMPILE, str(E), causal, str(HKV)],
                          cwd=REPO, env=_clean_env(tmp_path), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in row, row.get("error")
    assert row["verdict"] in ("ok", "spills") and row["shared"] <= 227 * 1024
    assert row.get("spill_stores", 0) <= spill, row
    assert row["num_warps"] == 12                 # 2 consumer warpgroups + the producer's
    assert row["hgmma"] > 0 and row["hmma"] == 0 and row["tma"] > 0
    assert {24, 240} <= set(row["setmaxnreg"])


# --- the Numba attention on tensor cores (kernels/numba/attention_mma.py) -------------------

@pytest.fixture
def numba_mma(monkeypatch):
    """MMA on (off by default until a GPU has run the mma.sync kernels) and a record of the
    Numba attention kernels launched: their builder tags (module, builder, arguments)."""
    from pydl import _gemm_numba
    from pydl.kernels.numba._builder import BUILT_BY
    monkeypatch.setattr(_gemm_numba, "MMA", True)
    launched = []
    real = _numba_launch.launch_numba

    def spy(kernel, *args):
        launched.append(getattr(kernel, BUILT_BY, None))
        return real(kernel, *args)
    monkeypatch.setattr(_numba_launch, "launch_numba", spy)     # every Numba launch of pydl's
    return launched


def _mma_launched(launched) -> dict:
    """The tensor-core kernels launched: builder name ("_build": the forward, "_build_dkdv",
    "_build_dq") -> the arguments of each launch."""
    found = {}
    for tag in launched:
        if tag and tag[0].endswith("attention_mma"):
            found.setdefault(tag[1], []).append(tag[2])
    return found


# (B, Hq, Hkv, L, S, E, Ev): two query items (16 rows each in the simulator), several key
# tiles (64 keys at head dims up to 64 wide, else 32), the last part full, head dims not
# multiples of 16, GQA (dK and dV summed over a group's query heads), E != Ev; bf16 too
# (the simulator computes it exactly)
@pytest.mark.parametrize("causal", [False, True], ids=["noncausal", "causal"])
@pytest.mark.parametrize("shape,dtype", [((1, 2, 2, 21, 70, 24, 40), torch.float16),
                                         ((1, 2, 1, 18, 75, 32, 16), torch.bfloat16),
                                         ((1, 4, 2, 18, 37, 80, 16), torch.float16)],
                         ids=["keys32-fp16", "keys64-gqa-bf16", "keys32-gqa-d80-fp16"])
def test_numba_attention_on_tensor_cores(numba_mma, shape, causal, dtype):
    """Forward and gradients, all three products of the backward's two kernels on tensor
    cores too, against the float64 reference and torch."""
    from pydl.kernels.numba import attention_mma
    q, k, v = qkv(*shape, dtype=dtype)
    check_attention(q, k, v, "numba", dtype, is_causal=causal, enable_gqa=shape[1] != shape[2])
    E, EV, bf16 = shape[5], shape[6], dtype == torch.bfloat16
    BN, BD, BDV = attention_mma.tile(E, EV)
    assert BN == (64 if max(E, EV) <= 32 else 32)
    _, streamed, _, _ = attention_mma.bwd_tile(E, EV)
    assert _mma_launched(numba_mma) == {
        "_build": [(1, BN, BD, BDV, bf16, True, True, True)],
        "_build_dkdv": [(1, streamed, BD, BDV, bf16)], "_build_dq": [(1, streamed, BD, BDV, bf16)]}


@pytest.mark.parametrize("kind", ["bool", "float", "dropout"])
def test_numba_tensor_cores_masks_and_dropout(numba_mma, monkeypatch, kind):
    """A boolean mask with a fully masked row (output 0, lse +inf, gradients 0 there), a
    float mask that requires grad (dS written by the dQ kernel), and dropout (the same keep
    bits as the CUDA-core kernels: the same output and gradients within fp16 rounding)."""
    B, H, L, S, E = 1, 2, 19, 35, 24
    q, k, v = qkv(B, H, H, L, S, E, dtype=torch.float16)
    if kind == "dropout":
        from pydl import _gemm_numba
        p = 0.3
        runs = []
        for on in (True, False):
            monkeypatch.setattr(_gemm_numba, "MMA", on)
            torch.manual_seed(5)
            runs.append(run_with_grad(lambda q, k, v: pydl.scaled_dot_product_attention(
                q, k, v, dropout_p=p, backend="numba"), [q, k, v], None if on else runs[0][1]))
        (out, _, grads), (c_out, _, c_grads) = runs
        assert_close(out, c_out, torch.float16, reduction=S, name="mma vs cuda cores")
        for name, ours, theirs in zip("qkv", grads, c_grads):
            assert_close(ours, theirs, torch.float16, reduction=S * E, name=f"d{name}")
    elif kind == "bool":
        mask = torch.rand(L, S, device=DEVICE) > 0.4
        mask[3] = False                                  # row 3 sees nothing
        check_attention(q, k, v, "numba", torch.float16, attn_mask=mask)
        out, _, grads = run_with_grad(lambda q, k, v: pydl.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, backend="numba"), [q, k, v])
        assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
        assert torch.equal(grads[0][:, :, 3], torch.zeros_like(grads[0][:, :, 3]))
    else:
        mask = random_tensor((1, H, L, S), torch.float16, DEVICE)
        mask[:, :, :, 7] = float("-inf")
        fn = lambda q, k, v, m: pydl.scaled_dot_product_attention(  # noqa: E731
            q, k, v, attn_mask=m, backend="numba")
        out, g, grads = run_with_grad(fn, [q, k, v, mask])
        r_out, leaves = _mask_reference(q, k, v, mask.float())
        r_out.backward(g.double())
        assert_close(out, r_out, torch.float16, reduction=S, name="forward")
        for name, ours, leaf in zip(["q", "k", "v", "mask"], grads, leaves):
            assert_close(ours, leaf.grad, torch.float16, reduction=S * E, name=f"d{name}")
        assert torch.all(grads[3][..., 7] == 0)
    assert set(_mma_launched(numba_mma)) == {"_build", "_build_dkdv", "_build_dq"}


def test_numba_tensor_cores_stage_elements_where_words_cannot(numba_mma):
    """An odd head dim and a strided q: the forward stages them element by element; the
    backward, which takes words only, keeps its CUDA-core kernels."""
    B, H, L, S, E = 1, 2, 19, 35, 21
    q = random_tensor((B, L, H, E), torch.float16, DEVICE).transpose(1, 2)   # (B, H, L, E) view
    k, v = (random_tensor((B, H, S, E), torch.float16, DEVICE) for _ in range(2))
    check_attention(q, k, v, "numba", torch.float16, is_causal=True)
    assert _mma_launched(numba_mma) == {"_build": [(1, 64, 32, 32, False, False, False, False)]}


def test_numba_tensor_cores_nan_and_routing(numba_mma):
    """A NaN in q makes its row NaN (as torch), and only its row; fp32 inputs and head dims
    past 128 keep the CUDA-core kernel, as does everything with MMA off."""
    q, k, v = qkv(1, 1, 1, 5, 9, 16, dtype=torch.float16)
    q[0, 0, 2, 3] = float("nan")
    out = pydl.scaled_dot_product_attention(q, k, v, backend="numba")
    assert out[0, 0, 2].isnan().all() and not out[0, 0, [0, 1, 3, 4]].isnan().any()
    assert len(_mma_launched(numba_mma)) == 1
    pydl.scaled_dot_product_attention(*qkv(1, 1, 1, 5, 9, 16), backend="numba")
    pydl.scaled_dot_product_attention(*qkv(1, 1, 1, 3, 4, 136, dtype=torch.float16),
                                      backend="numba")
    assert len(_mma_launched(numba_mma)) == 1


def test_numba_attention_keeps_cuda_cores_without_mma(monkeypatch):
    from pydl import _gemm_numba
    assert not _gemm_numba.MMA or pytest.skip("PYDL_NUMBA_MMA=1 in this environment")
    from pydl.kernels.numba._builder import BUILT_BY
    launched, launch = [], _numba_launch.launch_numba
    spy = lambda kernel, *a: (launched.append(kernel), launch(kernel, *a))  # noqa: E731
    monkeypatch.setattr(_numba_launch, "launch_numba", spy)   # every Numba launch of pydl's
    out, _, grads = run_with_grad(lambda q, k, v: pydl.scaled_dot_product_attention(
        q, k, v, backend="numba"), list(qkv(1, 1, 1, 5, 9, 16, dtype=torch.float16)))
    made_by = [getattr(k, BUILT_BY, (k.__module__,))[0] for k in launched]
    assert out.isfinite().all() and all(g.isfinite().all() for g in grads)
    # forward, delta, dK/dV, dQ
    assert len(made_by) == 4 and not any(m.endswith("attention_mma") for m in made_by), made_by
