"""`python -m bench numba-resources` (bench/numba_resources.py): the capture names every Numba
kernel it records so that a process without the simulator can make it again, the closures
that builder functions make included, at a GPU's tiles; and one such kernel compiled for
sm_90 offline (skipped without the CUDA toolkit's libnvvm, ptxas and nvlink).

The suite runs in emulation, so this process's Numba is the simulator: the capture runs in
its own child, as the command runs it, and the compile in a subprocess without emulation.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import numba_resources as NR
from pydl import _gemm_numba, _rnn_launch
from pydl.kernels.numba._builder import BUILT_BY

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gru_launches(tmp_path_factory) -> list[dict]:
    """The gru family's launches (its packed case included, which must finish)."""
    found = NR.capture(["gru"], tmp_path_factory.mktemp("capture") / "launches.json")
    assert found is not None and found["failures"] == []
    return found["launches"]


def test_capture_names_builder_kernels_so_they_can_be_made_again(gru_launches):
    built = {}
    for row in gru_launches:
        kernel = NR.kernel_of(row)
        fn = kernel.py_func
        assert (fn.__module__, fn.__name__) == (row["module"], row["name"])
        if "built_by" in row:
            module, builder, args = row["built_by"]
            assert getattr(kernel, BUILT_BY) == (module, builder, tuple(args))
            assert fn.__qualname__.startswith(f"{builder}.<locals>.")
            built.setdefault(row["name"], set()).add(tuple(args))
        else:                                   # a module-level kernel, found by its name
            assert "<locals>" not in fn.__qualname__
    # the recurrences and the GEMMs they call, at a GPU's tiles (not the simulator's): the
    # bf16 products on the tensor cores (the input projections, and those of the packed
    # case's LSTM with proj_size) (operands staged as words where their K axis is contiguous and
    # even, element by element elsewhere), the mixed-dtype products on the CUDA cores
    assert built == {"fwd": {_rnn_launch.NUMBA_TILE}, "bwd": {_rnn_launch.NUMBA_TILE},
                     "gemm": {(_gemm_numba.TILE, _gemm_numba.MICRO, False)},
                     "gemm_mma": {(*_gemm_numba.WARPS_MMA, True, True, True),
                                  (*_gemm_numba.WARPS_MMA, True, True, False),
                                  (*_gemm_numba.WARPS_MMA, True, False, False)}}
    # the packed sequences' batch sizes (int32) reach the recurrences
    assert any(["array", "int32", 1, "C"] in r["sig"] for r in gru_launches
               if r["name"] == "fwd")


SCRIPT = r"""
import json, sys
from bench import numba_resources as NR
NR._offline(90)
ptxas = NR._ptxas()
if ptxas is None:
    sys.exit("no toolkit: ptxas")
row = json.loads(sys.stdin.read())
print(json.dumps(NR._compile(row, 90, ptxas, sys.argv[1], 0)))
"""


def _compile_offline(row: dict, tmp_path) -> dict:
    """One captured row compiled for sm_90 in a process without emulation (skips the test
    without the CUDA toolkit)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYDL_INTERPRET", "NUMBA_ENABLE_CUDASIM", "TRITON_INTERPRET")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], input=json.dumps(row),
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    if "no toolkit" in proc.stderr or "libNVVM" in proc.stdout + proc.stderr:
        pytest.skip("no CUDA toolkit (libnvvm, ptxas)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, out["error"]
    return out


def test_a_builder_kernel_compiles_for_sm90_offline(gru_launches, tmp_path):
    """The GRU's forward recurrence made again from its tag, compiled and linked with the
    device runtime (its grid barrier), as on a GPU."""
    out = _compile_offline(next(r for r in gru_launches if r["name"] == "fwd"
                                and "built_by" in r), tmp_path)
    assert 0 < out["regs"] <= 255 and out["smem"] > 0 and out["mma"] == 0


def test_tensor_core_gemm_compiles_to_mma_offline(gru_launches, tmp_path):
    """The bf16 input projection's GEMM (kernels/numba/gemm_mma.py, both operands staged as
    words) compiles with its inline PTX: the 16 mma.sync of a K step (2 row tiles x 4 column
    tiles x 2 halves of the 32-deep step, unrolled), no spill."""
    out = _compile_offline(next(r for r in gru_launches if r["name"] == "gemm_mma"
                                and r["built_by"][2][3:] == [True, True]), tmp_path)
    assert out["mma"] == 16 and out["spill"] == 0 and 0 < out["regs"] <= 255


@pytest.mark.parametrize("kernel", ["dkdv", "dq"])
def test_tensor_core_attention_backward_compiles_offline_at_d64(tmp_path, kernel):
    """The backward's kernels as a GPU builds them at head dim 64 bf16 (4 warps, 64 rows
    streamed): mma.sync in every product, no spill (bench/TUNING.md v11: at d128 they do)."""
    from pydl.kernels.numba import attention_mma
    words, bits = ["array", "int32", 4, "A"], ["array", "int16", 4, "A"]
    rows = ["array", "float32", 2, "C"]
    flags = ["int64", "int64", "boolean", "float64", "boolean", "int64", "float64", "int64",
             "int64"]           # mask_kind ... code
    outputs = [bits, bits] if kernel == "dkdv" else [bits, bits, "boolean"]  # dq: dmask, grad
    row = dict(module="pydl.kernels.numba.attention_mma", name=f"attention_bwd_{kernel}_mma",
               built_by=["pydl.kernels.numba.attention_mma", f"_build_{kernel}",
                         [*attention_mma.bwd_tile(64, 64), True]],
               sig=[words] * 4 + [rows, rows] + outputs + [words] + flags)
    out = _compile_offline(row, tmp_path)
    assert out["mma"] > 0 and out["spill"] == 0 and 0 < out["regs"] <= 255


# the device seed (CUDA graph capture's) with --full: 9 s of compilation on two cores
@pytest.mark.parametrize("seed", ["int64", pytest.param(["array", "int32", 1, "C"],
                                                        marks=pytest.mark.sim_heavy)],
                         ids=["host_seed", "device_seed"])
def test_tensor_core_attention_compiles_to_mma_offline(tmp_path, seed):
    """The Numba attention forward on tensor cores (kernels/numba/attention_mma.py) as the
    benchmark's d128 bf16 case builds it on a GPU (4 warps, 32 keys a tile, q, k and v staged
    as words), compiled with its inline PTX: mma.sync in both products, no spill, its shared
    memory (Q, K and V^T slabs of padded 32-bit rows) within the 48 KiB static limit; with
    the dropout seed an int (drawn on the host) or a one-element device array (drawn on the
    device inside CUDA graph capture: `seed_word`'s overload; the seed loaded once and held
    in a register there, where the int is read from the parameter bank: 4 bytes of spill at
    this kernel's 255 registers, in the captured graph's kernels only)."""
    from pydl import _attention_numba
    words = ["array", "int32", 4, "A"]
    bits = ["array", "int16", 4, "A"]
    row = dict(module="pydl.kernels.numba.attention_mma", name="attention_fwd_mma",
               built_by=["pydl.kernels.numba.attention_mma", "_build",
                         [_attention_numba.NUMBA_MMA_WARPS, 32, 128, 128, True, True, True, True]],
               sig=[words, words, words, bits, ["array", "float32", 2, "C"], bits, "int64",
                    "int64", "boolean", "float64", "boolean", "int64", "float64", seed,
                    "int64"])
    out = _compile_offline(row, tmp_path)
    assert out["mma"] > 0 and out["spill"] <= (0 if seed == "int64" else 8)
    assert 0 < out["regs"] <= 255
    assert out["smem"] == 4 * (64 * 68 + 32 * 68 + 128 * 20)


@pytest.mark.parametrize("kernel", ["cross_entropy_fwd", "cross_entropy_prob_fwd"])
def test_cross_entropy_forward_compiles_offline(tmp_path, kernel):
    """The cross-entropy forward kernels, whose last block sums the loss (inlined device
    functions: the same kernel calling the non-inlined _block_sum both itself and through a
    non-inlined helper is invalid NVVM IR, which no simulated test shows), compile for sm_90
    with their device-side target check."""
    f3, f1 = ["array", "float32", 3, "A"], ["array", "float32", 1, "A"]
    i1, i64 = ["array", "int32", 1, "A"], ["array", "int64", 1, "A"]
    if kernel == "cross_entropy_fwd":   # x target weight loss lse row_weight denom, scalars
        sig = [f3, i64, f1, f3, f1, f1, f1, "int64", "int64", "float64", "float64", "float64",
               "boolean", "int64", "int64", "int64", "boolean", "boolean", i1, f3,
               "int64"]                 # smoothing, z_loss, softcap
    else:                               # x target weight loss lse mass, scalars
        sig = [f3, f3, f1, f3, f1, f1, "int64", "float64", "boolean", "int64", "int64",
               "int64", "int64", "boolean", "float64", i1, f3, f1, "int64"]
    out = _compile_offline(dict(module="pydl.kernels.numba.softmax_ce", name=kernel, sig=sig),
                           tmp_path)
    assert out["spill"] == 0 and 0 < out["regs"] <= 255
    assert out["traps"] == (1 if kernel == "cross_entropy_fwd" else 0)
