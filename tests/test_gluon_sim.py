"""pydl/_gluon_sim.py, the CPU simulator the Gluon attention kernels run in under emulation:
that it fails the kernels' own source where a barrier, a wait or an index is wrong (each
mutation below is a mistake the kernels could plausibly have, and each must end in a wrong
answer, a deadlock error or the simulator's refusal, not a pass), and the semantics of the
pieces: mbarrier phases, TMA's zero fill and clipping, out-of-bounds accesses.

The kernels' results on correct source are tests/test_attention_forward.py's (the simulated
tests there)."""
import importlib.util
import inspect
import math
import sys

import numpy as np
import pytest
import torch
from conftest import fuzz_seeds

from pydl import _gluon_sim as sim
from pydl import reference as ref
from pydl.kernels.triton import attention_gluon

LOG2E = 1.4426950408889634


def _qkv(B, H, HKV, L, S, E, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(torch.float16)
            for shape in ((B, H, L, E), (B, HKV, S, E), (B, HKV, S, E), (B, H, L, E))]


def _reference(q, k, v, do, causal):
    """Output, natural-log lse and gradients in float64 (pydl.reference)."""
    n = [t.double().numpy() for t in (q, k, v, do)]
    gqa = dict(is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    o, lse = ref.scaled_dot_product_attention(*n[:3], return_lse=True, **gqa)
    grads = ref.scaled_dot_product_attention_backward(n[3], *n[:3], **gqa)
    return [torch.from_numpy(x) for x in (o, lse, *grads)]


def forward(kg, B=1, H=2, HKV=2, L=200, S=200, E=64, causal=False, BLOCK_N=128, STAGES=3,
            programs=None, seed=0):
    """The Gluon forward simulated: max |error| of the output and of the lse."""
    q, k, v, do = _qkv(B, H, HKV, L, S, E, seed)
    o = torch.full_like(q, float("nan"))
    lse = torch.full((B * H, L), float("nan"))
    n_m = -(-L // 128)
    units = B * H * ((n_m + 1) // 2 if causal else n_m)
    sim.launch(kg.attention_fwd_hopper, (programs or units,), q, k, v, o, lse,
               *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
               B, H, L, S, H // HKV, LOG2E / math.sqrt(E), IS_CAUSAL=causal, HEAD_D=E,
               BLOCK_N=BLOCK_N, STAGES=STAGES, num_warps=4, seed=seed)
    r_o, r_lse = _reference(q, k, v, do, causal)[:2]
    return ((o.double() - r_o).abs().max().item(),
            (lse.double() - r_lse.reshape(B * H, L)).abs().max().item())


def backward(kg, B=1, H=2, HKV=2, L=200, S=200, E=64, causal=False, STAGES=2, seed=0):
    """The Gluon backward simulated: max relative error of dQ, dK, dV."""
    q, k, v, do = _qkv(B, H, HKV, L, S, E, seed)
    o, lse, *grads = _reference(q, k, v, do, causal)
    delta = (o.to(torch.float16).float() * do.float()).sum(-1).reshape(B * H, L)
    dk, dv = torch.full_like(k, float("nan")), torch.full_like(v, float("nan"))
    dq = torch.zeros(B * H, L, E)
    sim.launch(kg.attention_bwd_hopper, (-(-S // 128), B * HKV), q, k, v, do,
               lse.float().reshape(B * H, L), delta, dk, dv, dq,
               *[s for t in (q, k, v, do, dk, dv) for s in t.stride()[:3]],
               H, L, S, LOG2E / math.sqrt(E), 1 / math.sqrt(E), GROUP=H // HKV,
               IS_CAUSAL=causal, HEAD_D=E, BLOCK_M=64, STAGES=STAGES, num_warps=4, seed=seed)
    ours = (dq.reshape(q.shape), dk, dv)
    return max(((a.double() - b).abs().max() / b.abs().max()).item()
               for a, b in zip(ours, grads))


# cases where every program walks several key tiles and, persistent, several query tiles
FWD_CASES = [dict(), dict(causal=True), dict(L=300, S=130, E=128, H=4, HKV=2, programs=3),
             dict(L=513, S=513, causal=True, programs=5, STAGES=2, BLOCK_N=64)]
BWD_CASES = [dict(), dict(causal=True), dict(L=300, S=130, E=128, H=4, HKV=2),
             dict(L=257, S=257, causal=True, STAGES=3, B=2)]


def _fails(run, kg, cases, tol) -> list:
    """Per case: 'ok', 'wrong' or the error's type."""
    out = []
    for kw in cases:
        try:
            err = run(kg, **kw)
        except Exception as exc:   # noqa: BLE001 - which error is the point
            out.append(type(exc).__name__)
            continue
        errs = err if isinstance(err, tuple) else (err,)
        out.append("ok" if all(e < tol for e in errs) else "wrong")      # NaN is wrong
    return out


def test_kernels_pass_as_written():
    assert _fails(forward, attention_gluon, FWD_CASES, 5e-3) == ["ok"] * len(FWD_CASES)
    assert _fails(backward, attention_gluon, BWD_CASES, 5e-3) == ["ok"] * len(BWD_CASES)


def _mutant(tmp_path, old: str, new: str, also: tuple = ()):
    """attention_gluon's source with `old` replaced by `new` (once; `also` more pairs),
    imported as a module of its own."""
    src = inspect.getsource(attention_gluon)
    for a, b in ((old, new), *also):
        assert a in src, a
        src = src.replace(a, b, 1)
    name = f"gluon_mutant_{abs(hash((old, new, also)))}"
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


FWD_MUTANTS = {
    # the producer refills a ring stage without waiting for both consumers to release it
    "no_ring_wait": ("    mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)\n", ""),
    # a consumer never passes the turn after its products
    "turn_kept": ("""acc, is_async=True)
    mbarrier.arrive(turn.index(1 - ROLE), count=1)
    s = warpgroup_mma_wait(num_outstanding=1""", """acc, is_async=True)
    s = warpgroup_mma_wait(num_outstanding=1"""),
    # the wait that should leave only the PV product in flight leaves QK^T in flight too
    "qk_not_waited": ("s = warpgroup_mma_wait(num_outstanding=1, deps=(s_tok,))\n    n0 =",
                      "s = warpgroup_mma_wait(num_outstanding=2, deps=(s_tok,))\n    n0 ="),
    # K read before its copy is known to have landed
    "no_k_ready_wait": ("""    mbarrier.wait(turn.index(ROLE), turn_phase)
    mbarrier.wait(k_ready.index(st), (r // STAGES) & 1)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q, k_smem.index(st).reshape([BLOCK_N, E]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
    mbarrier.wait(v_ready""", """    mbarrier.wait(turn.index(ROLE), turn_phase)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    s_tok = warpgroup_mma(q, k_smem.index(st).reshape([BLOCK_N, E]).permute((1, 0)), s_zero,
                          use_acc=False, is_async=True)
    mbarrier.wait(v_ready"""),
    # a stage released before the PV product reading it retired
    "released_early": (
        "    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))\n"
        "    mbarrier.arrive(kv_empty.index(prev), count=1)",
        "    mbarrier.arrive(kv_empty.index(prev), count=1)\n"
        "    acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=(o_tok, p_op))"),
    # the causal diagonal's tiles counted one too few
    "causal_mask_short": ("n_unmasked = gl.minimum(n_unmasked, (m0 + 1) // BLOCK_N)",
                          "n_unmasked = gl.minimum(n_unmasked, (m0 + BLOCK_N) // BLOCK_N)"),
    # a consumer's ring index not carried to the next query tile
    "ring_index_reset": ("            r += n_tiles\n            it += 1\n\n\n@gluon.jit\n"
                         "def _consumer_tile", "            it += 1\n\n\n@gluon.jit\n"
                         "def _consumer_tile"),
    # O not rescaled when the row max grows
    "no_rescale": ("    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, "
                   "o_layout)), 1)\n", ""),
}


@pytest.mark.parametrize("mutant", FWD_MUTANTS)
def test_forward_mutants_fail(mutant, tmp_path):
    kg = _mutant(tmp_path, *FWD_MUTANTS[mutant])
    outcome = _fails(forward, kg, FWD_CASES, 5e-3)
    assert outcome != ["ok"] * len(FWD_CASES), f"{mutant} passed every case"


BWD_MUTANTS = {
    # K and V read before their copies landed
    "no_kv_ready_wait": ("    mbarrier.wait(kv_ready, 0)\n", ""),
    # Q and dO released while the dV and dK products still read them
    "qdo_released_early": (
        "    dv_tok = warpgroup_mma(p_half.permute((1, 0)), do, dv, is_async=True)",
        "    mbarrier.arrive(qdo_empty.index(st), count=1)\n"
        "    dv_tok = warpgroup_mma(p_half.permute((1, 0)), do, dv, is_async=True)",
        (("    mbarrier.arrive(qdo_empty.index(st), count=1)       # Q and dO are consumed\n",
          ""),)),
    # the producer refills a ring stage without waiting for both consumers to release it
    "no_ring_wait": ("    mbarrier.wait(empty.index(s), ((t // STAGES) & 1) ^ 1)\n", ""),
    # the causal tiles that cross the diagonal left unmasked
    "no_causal_mask": ("N_MASKED: gl.constexpr = 2 * ROWS // BLOCK_M if IS_CAUSAL else 0",
                       "N_MASKED: gl.constexpr = 0"),
    # d = 128: the dQ product (all 128 keys) reads dS before the other half is stored
    "no_ds_ready_wait": ("    mbarrier.wait(ds_ready, j & 1)\n", ""),
    # P and dS stored from registers, read by wgmma without the proxy fence between
    "no_fence": ("    ds_half.store(ds)\n    fence_async_shared()\n", "    ds_half.store(ds)\n"),
    # dK stored to shared memory, read by the TMA store without the proxy fence between
    "no_fence_before_tma_store": ("    v.store(dv.to(dtype))\n    fence_async_shared()\n",
                                  "    v.store(dv.to(dtype))\n"),
}


@pytest.mark.parametrize("mutant", BWD_MUTANTS)
def test_backward_mutants_fail(mutant, tmp_path):
    kg = _mutant(tmp_path, *BWD_MUTANTS[mutant])
    outcome = _fails(backward, kg, BWD_CASES, 5e-3)
    assert outcome != ["ok"] * len(BWD_CASES), f"{mutant} passed every case"


# --- a seeded fuzz of shapes and schedules -----------------------------------------------------

FUZZ_QUICK, FUZZ_FULL = 6, 60


def _fuzz_case(seed: int, kernel: str) -> dict:
    """Random shapes (lengths 1 to 700, short and long, grouped heads, both head dims),
    causal or not, and one of the kernel's schedules (the forward's persistent grids of 1
    to 7 programs)."""
    from pydl import attention_hopper as AH
    rng = np.random.default_rng(seed)
    E = int(rng.choice(AH.HEAD_DIMS))
    HKV, group, B = int(rng.integers(1, 3)), int(rng.choice([1, 2, 3])), int(rng.integers(1, 3))
    L, S = (int(rng.integers(1, 65) if rng.random() < 0.3 else rng.integers(65, 701))
            for _ in "LS")
    case = dict(B=B, H=HKV * group, HKV=HKV, L=L, S=S, E=E, causal=bool(rng.integers(2)),
                seed=seed)
    if kernel == "forward":
        block_n, stages, persistent = AH.HOPPER_SPACES[E][rng.integers(len(AH.HOPPER_SPACES[E]))]
        n_m = -(-L // 128)
        units = B * case["H"] * ((n_m + 1) // 2 if case["causal"] else n_m)
        case.update(BLOCK_N=block_n, STAGES=stages,
                    programs=min(units, int(rng.integers(1, 8))) if persistent else None)
    else:
        case.update(STAGES=int(rng.choice(AH.HOPPER_BWD_STAGES[E])))
    return case


@pytest.mark.parametrize("kernel", ["forward", "backward"])
def test_fuzzed_shapes_and_schedules_match_reference(kernel, request):
    """The kernels as written on random shapes and schedules against the float64 reference;
    a failure names its seed (PYDL_FUZZ_SEED=<seed> reruns that case alone)."""
    run = forward if kernel == "forward" else backward
    for seed in fuzz_seeds(request, FUZZ_QUICK, FUZZ_FULL):
        case = _fuzz_case(seed, kernel)
        err = run(attention_gluon, **case)
        errs = err if isinstance(err, tuple) else (err,)
        assert all(e < 5e-3 for e in errs), f"seed {seed}: {case}: error {errs}"


# --- the pieces ----------------------------------------------------------------------------------

def _run_partitions(*fns):
    """fns run as the partitions of one simulated program."""
    sim._PROGRAM[0] = sim._Program((0, 0, 0), (1, 1, 1), seed=1)
    try:
        sim._warp_specialize([(fn, ()) for fn in fns], [1] * (len(fns) - 1))
    finally:
        sim._PROGRAM[0] = None


def _barrier(count=1):
    bars = sim._allocate_shared_memory(sim.int64, [1], sim._BarrierLayout())
    sim._init(bars, count)
    return bars


def test_mbarrier_phases_as_hopper_counts_them():
    """A fresh barrier's phase of parity 1 counts as complete (a wait on it returns); the
    phase of parity 0 completes after `count` arrivals; a wait nothing can satisfy raises."""
    bar, go = _barrier(count=2), _barrier()
    seen = []

    def waiter():
        sim._wait(bar, 1)                 # passes at once
        sim._arrive(go)
        sim._wait(bar, 0)                 # needs both arrivals
        seen.append("phase 0 done")

    def arriver():
        sim._wait(go, 0)                  # (else phase 0 might complete first: then phase 1
        sim._arrive(bar)                  # would be the current one, and the waiter's first
        sim._arrive(bar)                  # wait would block, as it would on a GPU)

    _run_partitions(waiter, arriver)
    assert seen == ["phase 0 done"]
    with pytest.raises(sim.DeadlockError):
        _run_partitions(lambda: sim._wait(_barrier(), 0))
    with pytest.raises(RuntimeError, match="more arrivals"):
        lone = _barrier(count=1)
        _run_partitions(lambda: (sim._arrive(lone, count=2)))


def test_tma_box_reads_zeros_past_the_extent_and_stores_only_inside():
    """A box that crosses the tensor's end reads zeros there and still counts its whole size
    in bytes against the barrier; a store writes only the part inside."""
    x = torch.arange(6 * 16, dtype=torch.float16).reshape(6, 16)
    desc = sim.Descriptor(sim.Ptr.of(x), [6, 16], [16, 1], [4, 16])
    assert desc.block_type.nbytes == 4 * 16 * 2
    box = desc.read([4, 0])
    assert np.array_equal(box[:2], x[4:].float().numpy()) and not box[2:].any()
    y = torch.zeros(6, 16, dtype=torch.float16)
    sim.Descriptor(sim.Ptr.of(y), [6, 16], [16, 1], [4, 16]).write([4, 0], np.ones((4, 16)))
    assert y[4:].eq(1).all() and y[:4].eq(0).all()
    with pytest.raises(ValueError, match="16-byte"):
        sim.Descriptor(sim.Ptr.of(x.reshape(-1)[1:]), [5, 15], [16, 1], [4, 16])


def test_global_access_outside_the_storage_raises():
    x = torch.zeros(8)
    p = sim.Ptr.of(x) + sim.T(np.arange(10), sim.int32)
    with pytest.raises(IndexError, match="outside the tensor's storage"):
        sim.load(p)
    assert sim.load(p, mask=sim.T(np.arange(10) < 8, sim.int1)).a.shape == (10,)


def test_integer_division_truncates_as_c_does():
    a = sim.T(np.array([-7, 7]), sim.int32)
    assert list((a // 2).a) == [-3, 3] and list((a % 2).a) == [-1, 1]


def test_wgmma_and_tma_shapes_the_hardware_takes():
    """A warpgroup product's M is a multiple of 64, N of 8 up to 256, K of 16 (16-bit
    operands); a TMA box dim at most 256."""
    b = sim.SMem(np.zeros((16, 64), dtype=np.float32), sim.float16)
    out = []

    def product(m):
        out.append(sim._warpgroup_mma(sim.T(np.ones((m, 16)), sim.float16), b,
                                      sim.T(np.zeros((m, 64)), sim.float32)))
    _run_partitions(lambda: product(64))
    assert out[0].shape == [64, 64]
    with pytest.raises(ValueError, match="wgmma"):
        _run_partitions(lambda: product(32))
    x = torch.zeros(512, 16, dtype=torch.float16)
    with pytest.raises(ValueError, match="at most 256"):
        sim.Descriptor(sim.Ptr.of(x), [512, 16], [16, 1], [512, 16])
