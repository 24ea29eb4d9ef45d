"""`python -m bench resources` (bench/resources.py): one tuning candidate compiled offline for
sm_90, and the verdicts, selection and clean relaunch without compiling.

The suite runs in emulation (PYDL_INTERPRET=1, so Triton's kernels are interpreter functions
in this process): the compile runs in a subprocess with the emulation variables removed, as
the command itself does. It needs no GPU, only Triton's NVIDIA toolchain (ptxas, cuobjdump);
without it the test is skipped.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import resources

REPO = Path(__file__).resolve().parent.parent

# The default candidate of a 256^3 bf16 GEMM, captured from pydl's launcher and compiled.
SCRIPT = r"""
import json, sys
from bench import resources as R
rows = R.capture(90, [("gemm", "256^3", R.gemm_problem(256))])
row = next(r for r in rows if r["kernel"] == "gemm" and r["candidate"] == 0)
R.measure([row], workers=1)
print(json.dumps(R._json_row(row), default=str))
"""


def _clean_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in resources.EMULATION_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")   # a real compile, not a cache hit
    return env


def test_gemm_default_compiles_for_sm90_offline(tmp_path):
    why = resources.missing_toolchain()
    if why:
        pytest.skip(f"no offline Triton/CUDA toolchain: {why}")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=_clean_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["function"] == "gemm_kernel" and row["config"]["BLOCK_M"] == 128
    assert "error" not in row, row.get("error")
    assert row["regs"] > 0 and row["shared"] > 0 and row["num_warps"] == row["config"]["num_warps"]
    assert row["verdict"] == "ok" and row["hgmma"] > 0        # Hopper's wgmma, no spills
    # Triton's JIT specialization of the real arguments: bf16 pointers, the unit stride as a
    # constexpr, 256 as a 16-divisible i32
    sig = row["signature"]
    assert sig["a_ptr"] == "*bf16" and sig["M"] == "i32" and sig["sa_k"] == "constexpr"
    assert row["attrs"][str([list(sig).index("M")])] == [["tt.divisibility", 16]]


# --all's coverage problems captured (nothing compiled): every launch recorded and specialized.
COVERAGE_SCRIPT = r"""
import json, torch
import pydl
from pydl import _env, backends
from bench import resources as R
check = backends.check_device
rows = R.capture(90, (), R.COVERAGE)
try:
    pydl.softmax(torch.ones(2, 3), backend="triton")
    refused = False
except RuntimeError:
    refused = True
jobs = [r for r in rows if r.get("job") is not None]
print(json.dumps(dict(
    errors=[f"{r['case']}: {r['error']}" for r in rows if r.get("job") is None],
    launched=sorted({(r["job"]["module"], r["job"]["name"]) for r in jobs}),
    kernels=R.triton_kernels(), rows=len(jobs), distinct=len({R._job_key(r["job"]) for r in jobs}),
    tuned={r["function"]: [r["kernel"], r["candidate"]] for r in jobs
           if r["candidate"] is not None},
    dtypes=sorted({t for r in jobs for t in r["job"]["signature"].values() if t.startswith("*")}),
    restored=backends.check_device is check and refused, interpret=_env.INTERPRET)))
"""


def test_all_mode_captures_every_triton_kernel(tmp_path):
    """The coverage problems launch every kernel of every kernels/triton module through the
    public functions on CPU tensors, each distinct compile job recorded once; the CPU
    refusal of the kernel backends is back afterwards, and emulation stays off."""
    proc = subprocess.run([sys.executable, "-c", COVERAGE_SCRIPT], cwd=REPO,
                          env=_clean_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["errors"] == []
    launched = {tuple(k) for k in got["launched"]}
    kernels = {(m, n) for m, names in got["kernels"].items() for n in names}
    # the modules of kernels: every one but the helpers' (a leading underscore: _index, _split)
    modules = {p.stem for p in (REPO / "kernels" / "triton").glob("*.py")
               if not p.stem.startswith("_")}
    assert {m.rsplit(".", 1)[-1] for m, _ in kernels} == modules
    assert {"softmax_fwd", "conv2d_col2im", "attention_dropout_mask", "lstm_layer_bwd",
            "gru_layer_bwd", "grid_barrier_check", "max_pool2d_bwd_planar",
            "cross_entropy_scale_grad", "cross_entropy_mean_denominator"} <= {n for _, n in kernels}
    assert kernels <= launched, sorted(kernels - launched)
    assert got["rows"] == got["distinct"] > 300                    # one row per compile job
    assert got["tuned"]["gemm_kernel"] == ["gemm", 0]              # tuned: the default only
    assert got["tuned"]["max_pool2d_fwd"] == ["max_pool2d_fwd", 0]
    assert {"*fp32", "*bf16", "*i64", "*i8", "*u1"} <= set(got["dtypes"])
    assert got["restored"] and got["interpret"] is False


def test_verdicts():
    fits = dict(shared=96 * 1024, regs=128, num_warps=8, local=0, stack=0)
    assert resources.verdict(fits, 90) == "ok"
    assert resources.verdict(dict(fits, shared=228 * 1024), 90) == "too much shared memory"
    assert resources.verdict(dict(fits, shared=228 * 1024), 80) == "too much shared memory"
    assert resources.verdict(dict(fits, regs=255, num_warps=16), 90) == "too many registers"
    assert resources.verdict(dict(fits, stack=64), 90) == "spills"
    assert resources.verdict(dict(fits, stack=64, local_in_loops=2), 90) == "spills"
    assert resources.verdict(dict(fits, stack=64, local_in_loops=0), 90) == \
        "spills outside loops"
    assert resources.verdict(dict(fits, spill_stores=0, spill_loads=0, stack=8), 90) == "ok"


def test_findings_mark_the_default_configurations_that_spill():
    """--all's summary marks the spills of what runs untuned (a tuned kernel's first
    candidate, a kernel without a tuner): the rule is none there; a later candidate's spill
    only costs the tuner a trial."""
    def row(candidate, spill):
        return dict(kernel="gemm", case="c", candidate=candidate, constexpr_args={},
                    num_warps=4, regs=255, spill_stores=spill, stack=spill, local=0,
                    local_instrs=3, local_in_loops=1, verdict="spills" if spill else "ok")
    text = resources._findings([row(0, 8), row(None, 4), row(3, 16), row(1, 0)], set(), {})
    assert "SPILLS (3; 2 in a default configuration, marked *):" in text
    marked = [ln for ln in text.splitlines() if ln.startswith("  *")]
    assert [ln.split()[:3] for ln in marked] == [["*gemm", "[c]", "#0"], ["*gemm", "[c]", "#-"]]
    assert any(ln.startswith("   gemm [c] #3") for ln in text.splitlines())


def test_defaults_keep_what_runs_untuned():
    """--defaults: a tuned kernel's first candidate, a kernel without a tuner, a problem whose
    capture failed; not the later candidates."""
    rows = [dict(candidate=0), dict(candidate=None), dict(candidate=2),
            dict(candidate=None, job=None, error="capture failed")]
    assert resources.defaults(rows) == [rows[0], rows[1], rows[3]]
    assert resources.build_parser().parse_args(["--defaults", "gemm"]).defaults


def test_local_accesses_inside_and_outside_loops():
    """Spilled registers saved before a loop and restored after it are not in the loop; an
    access between a backward branch and its target is, nested or not."""
    sass = """
        /*0100*/   STL [R1+0xc], R206 ;
        /*0110*/   MOV R2, R3 ;
        /*0120*/   LDL.LU R4, [R1+0x4] ;
        /*0130*/   @!P4 BRA 0x0200 ;
        /*0140*/   STL.64 [R1+0x10], R8 ;
        /*0150*/   @!P4 BRA 0x0120 ;
        /*0160*/   BRA 0x0180 ;
        /*0170*/   LDL R5, [R1] ;
        /*0180*/   EXIT ;
        /*0190*/   BRA 0x0190 ;"""
    assert resources.local_accesses(sass) == dict(local_instrs=4, local_in_loops=2)
    assert resources.local_accesses(sass.replace("BRA 0x0120", "BRA 0x0300")) == \
        dict(local_instrs=4, local_in_loops=0)
    assert resources.verdict({"error": "CompilationError: at 3:4"}, 90) == \
        "compile error: CompilationError: at 3:4"


def test_load_counts():
    sass = """
        /*0100*/   LDGSTS.E.BYPASS.128 [R1], desc[UR4][R2.64] ;
        /*0110*/   LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0120*/   @P0 LDG.E.128.STRONG.GPU R8, desc[UR4][R6.64] ;
        /*0130*/   LDG.E.U16 R9, desc[UR4][R6.64] ;
        /*0140*/   LDGDEPBAR ;
        /*0150*/   STG.E.128 desc[UR4][R6.64], R4 ;"""
    assert resources.load_counts(sass) == dict(ldgsts=1, ldg=3, ldg16=2)


def test_select_by_family_or_part_of_a_name():
    rows = [dict(family="gemm", kernel="gemm"),
            dict(family="conv", kernel="conv2d_implicit_bwd_weight"),
            dict(family="conv", kernel="conv2d_implicit_fwd"),
            dict(family="attention", kernel="attention_bwd_dq")]
    assert resources.select(rows, []) == (rows, [])
    assert resources.select(rows, ["conv"]) == (rows[1:3], [])
    assert resources.select(rows, ["bwd"]) == ([rows[1], rows[3]], [])
    assert resources.select(rows, ["gemm", "nope"]) == (rows[:1], ["nope"])


def test_runs_itself_again_without_emulation(monkeypatch):
    """Here pydl is imported in emulation: main() must relaunch in a clean process."""
    seen = {}

    def call(cmd, env, cwd):
        seen.update(cmd=cmd, env=env)
        return 0
    monkeypatch.setattr(resources.subprocess, "call", call)
    monkeypatch.setenv("PYDL_INTERPRET", "1")
    assert resources.main(["gemm", "--arch", "90"]) == 0
    assert seen["cmd"][1:] == ["-m", "bench.resources", "gemm", "--arch", "90"]
    assert not set(resources.EMULATION_VARS) & set(seen["env"])
