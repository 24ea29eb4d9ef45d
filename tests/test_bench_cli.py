"""The benchmark tool on CPU: the CLI end to end on tiny shapes in emulation, the JSON schema,
the correctness gate, `compare`, `report`, and the GPU timing path driven by a fake CUDA
clock (its numbers mean nothing; the test checks the plumbing, never a speed)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import pydl
from bench import cli, gate, runner, schema, tables, timing
from bench.suites import all_suites
from bench.suites import base as suites_base
from bench.suites.base import Variant

REPO = Path(__file__).resolve().parent.parent
EMULATION = pydl.INTERPRET or not torch.cuda.is_available()


def _run(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([*argv, "--no-progress"])
    return rc, capsys.readouterr().out


def _only_json(out_dir: Path) -> dict:
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


# --- synthetic results ------------------------------------------------------------------

def _row(op="cross_entropy", case="v32k", dtype="bf16", direction="fwd", variant="triton",
         status="ok", ms=1.0, **extra):
    row = dict.fromkeys(schema.ROW_KEYS)
    row.update(op=op, case=case, shape=[8192, 32768], dtype=dtype, direction=direction,
               variant=variant, status=status, median_ms=ms, bound="memory", **extra)
    return row


def _result(rows, created="2025-01-01T00:00:00+00:00", mode="gpu", device="NVIDIA H100"):
    env = {"device": device, "torch": "2.13.0", "triton": "3.6.0", "numba": "0.68.1",
           "cuda": "12.8" if mode == "gpu" else None, "python": "3.11", "commit": "abc123",
           "dirty": False, "created": created, "interpret": mode != "gpu"}
    peaks = {"copy_gbps": 3000.0, "bf16_tflops": 700.0} if mode == "gpu" else \
        {"copy_gbps": None, "bf16_tflops": None}
    cases = {"cross_entropy": {"v32k": {"shape": [8192, 32768], "dtype": "bf16",
                                        "source": "32k vocabulary"}}}
    return schema.new_result(env, mode, peaks, "quick", cases, rows)


# --- the CLI in emulation -----------------------------------------------------------------

@pytest.mark.skipif(not EMULATION, reason="checks the CPU (emulation) behaviour")
def test_run_writes_json_with_schema(tmp_path, capsys):
    out = tmp_path / "out"
    rc, text = _run(capsys, "softmax", "--variants", "triton", "torch", "--out", str(out),
                    "--results-dir", str(tmp_path / "none"))
    assert rc == 0, text
    assert "No GPU" in text or "PYDL_INTERPRET=1" in text
    assert "No GPU results are recorded yet" in text
    result = _only_json(out)
    for key in ("device", "torch", "triton", "cuda", "commit", "created", "peaks", "interpret",
                "rows"):
        assert key in result
    assert result["interpret"] is True and result["mode"] == "emulation"
    assert result["peaks"] == {"copy_gbps": None, "bf16_tflops": None}
    assert result["shapes"] == "tiny"
    rows = result["rows"]
    n_cases = len(all_suites()["softmax"].cases("tiny"))
    assert len(rows) == n_cases * 3 * 2
    assert {r["direction"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    assert {r["variant"] for r in rows} == {"triton", "torch"}
    for r in rows:
        assert set(schema.ROW_KEYS) <= set(r)
        assert r["op"] == "softmax" and r["status"] == "pass", r
        assert r["flops"] > 0 and r["bytes"] > 0
        # nothing emulated is ever reported as a time
        for k in schema.TIMED_KEYS:
            assert r[k] is None
    assert "forward" in text and "gradient" in text and "median" not in text


@pytest.mark.skipif(not EMULATION, reason="checks the CPU (emulation) behaviour")
def test_wrong_and_raising_variants_are_recorded(tmp_path, capsys, monkeypatch):
    suite = all_suites()["softmax"]
    real = suite.variants

    def broken(x):
        return torch.softmax(x, -1) * 1.1

    def raises(x):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(suite, "variants", lambda: real() + [
        Variant("broken", broken, "peer"), Variant("raises", raises, "peer")])
    rc, text = _run(capsys, "softmax", "--variants", "torch", "broken", "raises",
                    "--out", str(tmp_path), "--results-dir", str(tmp_path))
    assert rc == 1
    rows = _only_json(tmp_path)["rows"]
    by = {(r["variant"], r["direction"]): r for r in rows if r["case"] == "tiny-row"}
    assert by[("broken", "fwd")]["status"] == "wrong"
    assert "out of tolerance" in by[("broken", "fwd")]["message"]
    assert by[("broken", "bwd")]["status"] == "wrong"
    assert by[("raises", "fwd")]["status"] == "error"
    assert "kernel exploded" in by[("raises", "fwd+bwd")]["message"]
    assert by[("torch", "fwd")]["status"] == "pass"
    assert "kernel exploded" in text


@pytest.mark.skipif(not EMULATION, reason="checks the CPU (emulation) behaviour")
def test_emulation_shows_newest_recorded_gpu_results(tmp_path, capsys):
    old = _result([_row(ms=2.0)], created="2024-01-01T00:00:00+00:00", device="Old GPU")
    new = _result([_row(ms=1.0)], created="2025-06-01T00:00:00+00:00", device="New GPU")
    emu = _result([_row(status="pass", ms=None)], created="2026-01-01T00:00:00+00:00",
                  mode="emulation", device="cpu")
    for r in (old, new, emu):
        schema.write(r, tmp_path)
    rc, text = _run(capsys, "cross_entropy", "--variants", "torch", "--results-dir", str(tmp_path))
    assert rc == 0
    assert "Newest recorded GPU results" in text and "New GPU" in text and "2025-06-01" in text
    assert "Old GPU" not in text


def test_emulation_shows_each_ops_newest_gpu_run(tmp_path, capsys):
    """Runs that measured some ops only: each op's timings come from the newest run that has
    them."""
    a = _result([_row(op="softmax", case="attn-2k", ms=2.0)], created="2025-01-01T00:00:00+00:00",
                device="GPU A")
    b = _result([_row(ms=1.0)], created="2025-06-01T00:00:00+00:00", device="GPU B")
    for r in (a, b):
        schema.write(r, tmp_path)
    rc, text = _run(capsys, "cross_entropy", "softmax", "--variants", "torch",
                    "--results-dir", str(tmp_path))
    assert rc == 0
    assert "results for cross_entropy (" in text and "GPU B" in text
    assert "results for softmax (" in text and "GPU A" in text
    assert text.index("GPU B") < text.index("GPU A")          # newest first


def test_bad_arguments(capsys):
    assert cli.main(["no_such_op", "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        cli.main(["--direction", "sideways"])


def test_list(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert "cross_entropy" in out and "32768" in out and "Llama-3" in out


def test_relaunches_when_pydl_was_imported_without_emulation(monkeypatch, capsys):
    """No GPU and pydl already imported without PYDL_INTERPRET: the run goes to a fresh
    process with PYDL_INTERPRET=1 (the subprocess call is intercepted here)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(pydl, "INTERPRET", False)
    monkeypatch.delenv("PYDL_INTERPRET", raising=False)
    monkeypatch.setattr(subprocess, "call", lambda cmd, env: calls.append((cmd, env)) or 7)
    assert cli.main(["softmax", "--variants", "torch"]) == 7
    (cmd, env), = calls
    assert cmd == [sys.executable, "-m", "bench", "softmax", "--variants", "torch"]
    assert env["PYDL_INTERPRET"] == "1" and str(REPO) in env["PYTHONPATH"]
    assert "running again in a fresh process" in capsys.readouterr().out


# --- schema, compare, report ------------------------------------------------------------

def test_schema_round_trip_and_validation(tmp_path):
    result = _result([_row()])
    path = schema.write(result, tmp_path)
    assert path.name.startswith("20250101-000000_nvidia-h100")
    assert schema.load(path) == result
    assert schema.write(result, tmp_path) != path       # same second: a new name
    bad = dict(result, rows=[{"op": "x"}])
    with pytest.raises(ValueError, match="lacks"):
        schema.validate(bad)
    with pytest.raises(ValueError, match="must not record times"):
        _result([_row(ms=1.0)], mode="emulation")


def test_compare(tmp_path, capsys):
    a = _result([_row(ms=2.0), _row(variant="torch", ms=4.0), _row(direction="bwd", ms=1.0)])
    b = _result([_row(ms=1.0), _row(variant="torch", ms=4.0),
                 _row(variant="numba", ms=3.0)], created="2025-02-01T00:00:00+00:00")
    pa, pb = schema.write(a, tmp_path / "a"), schema.write(b, tmp_path / "b")
    assert cli.main(["compare", str(pa), str(pb)]) == 0
    out = capsys.readouterr().out
    lines = {tuple(l.split()[:5]): l.split() for l in out.splitlines() if l.startswith("cross")}
    assert lines[("cross_entropy", "v32k", "bf16", "fwd", "triton")][-1] == "0.500"
    assert lines[("cross_entropy", "v32k", "bf16", "fwd", "torch")][-1] == "1.000"
    assert lines[("cross_entropy", "v32k", "bf16", "bwd", "triton")][-2:] == ["-", "-"]
    assert lines[("cross_entropy", "v32k", "bf16", "fwd", "numba")][-1] == "-"
    assert "geometric mean of B/A over 2 rows" in out and "0.707" in out
    assert cli.main(["compare", str(pa), str(tmp_path / "missing.json")]) == 2


def test_report(tmp_path, capsys):
    rows = [_row(ms=1.0), _row(variant="torch", ms=2.0)]
    runner.derive(rows, {"copy_gbps": 3000.0, "bf16_tflops": 700.0})
    assert rows[0]["speedup_vs_torch"] == pytest.approx(2.0)
    assert rows[1]["speedup_vs_torch"] == pytest.approx(1.0)
    result = _result(rows)
    md = tables.report(result)
    assert "### cross_entropy" in md and "NVIDIA H100" in md and "2.00x" in md
    assert "| v32k (8192x32768) | bf16" in md and "32k vocabulary" in md
    path = schema.write(result, tmp_path)
    assert cli.main(["report", "--results-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out == tables.report(result, path)
    assert cli.main(["report", "--results-dir", str(tmp_path / "empty")]) == 1
    emu = schema.write(_result([_row(status="pass", ms=None)], mode="emulation"), tmp_path / "e")
    assert cli.main(["report", str(emu)]) == 2


def test_derive_rates_and_peak_fraction():
    rows = [_row(ms=2.0, bytes=6 * 10**9, flops=2 * 10**12)]
    runner.derive(rows, {"copy_gbps": 3000.0, "bf16_tflops": 700.0})
    r = rows[0]
    assert r["gbps"] == pytest.approx(3000.0) and r["tflops"] == pytest.approx(1000.0)
    assert r["peak_fraction"] == pytest.approx(1.0)          # memory-bound: vs copy bandwidth
    assert r["speedup_vs_torch"] is None                       # no torch row


def test_derive_drops_rates_above_the_peak():
    """A backward that only scales a gradient its training forward wrote (cross-entropy) runs
    far faster than the bytes a backward is counted for: no rate, a message saying why."""
    rows = [_row(ms=0.004, bytes=10**9, direction="bwd")]
    runner.derive(rows, {"copy_gbps": 4000.0, "bf16_tflops": 700.0})
    r = rows[0]
    assert r["gbps"] is None and r["peak_fraction"] is None
    assert "compare fwd+bwd" in r["message"] and r["median_ms"] == 0.004


def test_rotation_copies():
    l2 = 50 * 2**20
    assert timing.rotation_copies(4 * 2**20, l2) == 13          # 13 x 4 MiB > 50 MiB
    assert timing.rotation_copies(100 * 2**20, l2) == 1
    assert timing.rotation_copies(1, l2) == timing.MAX_COPIES


# --- the GPU path, on a fake CUDA clock ------------------------------------------------------

class _FakeEvent:
    def __init__(self, enable_timing=False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


def test_gpu_path_with_fake_cuda_clock(monkeypatch, tmp_path):
    """Drive runner.run in GPU mode on CPU tensors with CUDA's clock and memory counters faked:
    rows of passing variants are timed, a wrong one is not. The numbers mean nothing."""
    for name, fn in {"Event": _FakeEvent, "synchronize": lambda *a: None,
                     "reset_peak_memory_stats": lambda *a: None,
                     "memory_allocated": lambda *a: 100, "max_memory_allocated": lambda *a: 164,
                     "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(timing, "l2_bytes", lambda: 50 * 2**20)
    suite = all_suites()["softmax"]
    real = suite.variants
    monkeypatch.setattr(suite, "variants", lambda: real() + [
        Variant("broken", lambda x: torch.softmax(x, -1) + 0.5, "peer")])
    options = runner.Options(shapes="tiny", variants=["torch", "broken"], warmup_ms=0.0,
                             rep_ms=0.0, progress=False)
    rows = runner.run([suite], options, "gpu", {"copy_gbps": 100.0, "bf16_tflops": 10.0},
                      device="cpu")
    torch_rows = [r for r in rows if r["variant"] == "torch"]
    assert torch_rows and all(r["status"] == "ok" for r in torch_rows)
    for r in torch_rows:
        assert r["median_ms"] > 0 and r["reps"] >= 10 and r["peak_mem_bytes"] == 64
        assert r["copies"] > 1                                  # tiny inputs are rotated
        assert r["gbps"] > 0 and r["peak_fraction"] is not None
        assert r["speedup_vs_torch"] == pytest.approx(1.0)
    # +0.5 breaks the output, not the gradient: fwd and fwd+bwd are wrong and untimed,
    # the backward alone is correct and timed.
    broken = [r for r in rows if r["variant"] == "broken"]
    assert broken
    for r in broken:
        if r["direction"] == "bwd":
            assert r["status"] == "ok" and r["median_ms"] > 0
        else:
            assert r["status"] == "wrong" and r["median_ms"] is None, r

    env = {"device": "Fake GPU", "torch": torch.__version__, "triton": None, "numba": None,
           "cuda": None, "python": "3", "commit": None, "dirty": None,
           "created": "2025-01-01T00:00:00+00:00", "interpret": False}
    result = schema.new_result(env, "gpu", {"copy_gbps": 100.0, "bf16_tflops": 10.0}, "tiny",
                               {}, rows)
    text = tables.timing_table(result)
    assert "GB/s" in text and "1.00x" in text and "wrong" in text
    from bench.plots import plot_result
    pngs = plot_result(result, schema.write(result, tmp_path))
    assert [p.name.endswith("_softmax.png") and p.stat().st_size > 0 for p in pngs] == [True]


# --- suites with algorithm variants, torch's other backends, case options -------------------

def test_list_shows_every_suite_and_algorithm_variants(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for op in ("conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "attention", "lstm",
               "gru", "lstm_cell", "gru_cell", "softmax", "cross_entropy", "max_pool1d",
               "avg_pool1d", "adaptive_avg_pool1d"):
        assert f"\n{op}: " in "\n" + out, op
    for name in ("triton-implicit", "triton-im2col", "numba-im2col", "triton-flash",
                 "triton-naive", "torch-cudnn (GPU only)", "torch-flash (GPU only)",
                 "triton-steps", "triton-persistent", "triton-persistent-recompute"):
        assert name in out, name
    assert "ResNet-50 v1.5" in out and "FlashAttention-2 sweep" in out and "DeepBench" in out


def _names(op):
    return [v.name for v in all_suites()[op].variants()]


def test_variants_of_the_new_suites():
    conv = {v.name: v for v in all_suites()["conv2d"].variants()}
    # the declared algorithms, in order (one pydl adds later is appended after its backend's)
    assert [n for n in conv if n in ("triton-implicit", "triton-im2col", "numba-im2col",
                                     "torch")] == [
        "triton-implicit", "triton-im2col", "numba-im2col", "torch"]
    assert [(conv[n].backend, conv[n].algo) for n in ("triton-implicit", "numba-im2col")] == [
        ("triton", "implicit"), ("numba", "im2col")]
    assert all(v.skip is None and v.fn is not None for v in conv.values())
    attn = {v.name: v for v in all_suites()["attention"].variants()}
    assert {"triton-flash", "triton-naive", "torch", "torch-flash", "torch-cudnn"} <= set(attn)
    assert _names("attention")[:2] == ["triton-flash", "triton-naive"]
    for name in ("torch-flash", "torch-cudnn"):
        assert attn[name].gpu_only and attn[name].kind == "torch" and attn[name].backend == "torch"
    assert attn["torch"].kind == "baseline" and not attn["torch"].gpu_only
    for op in ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "max_pool1d", "avg_pool1d",
               "adaptive_avg_pool1d"):
        assert _names(op) == ["triton", "numba", "torch"]
    for op in ("lstm", "gru"):
        assert _names(op) == ["triton-persistent", "triton-persistent-recompute", "triton-steps",
                              "numba-persistent", "numba-steps", "torch"]
    for op in ("lstm_cell", "gru_cell"):
        assert _names(op) == ["triton", "numba", "torch"]
    gru = {v.name: v for v in all_suites()["gru"].variants()}
    assert (gru["triton-persistent-recompute"].backend,
            gru["triton-persistent-recompute"].algo) == ("triton", "persistent")
    assert all(v.skip is None and v.fn is not None for v in gru.values())


class _AlgoSuite(suites_base.Suite):
    """Listing only: declares algos a, b on triton; 'pydl' has a and c."""

    def __init__(self, registry_op="softmax"):
        super().__init__(op="fake", registry_op=registry_op, shape_sets={}, algos={
            "triton": ("a", "b")})
        self.built = []

    def pydl_algos(self, backend):
        return ("a", "c") if backend == "triton" else None

    def pydl_fn(self, backend, algo=None):
        self.built.append((backend, algo))
        return lambda x: x

    def torch_fn(self):
        return lambda x: x


def test_variants_from_algos_listing_only():
    suite = _AlgoSuite()
    vs = {v.name: v for v in suite.variants()}
    assert list(vs) == ["triton-a", "triton-b", "triton-c", "numba", "torch"]
    assert vs["triton-a"].fn is not None and vs["triton-a"].algo == "a"
    assert vs["triton-b"].fn is None and "no algo='b'" in vs["triton-b"].skip     # listed, absent
    assert vs["triton-c"].skip is None                    # pydl has it: appended by itself
    assert vs["numba"].algo is None and vs["numba"].backend == "numba"
    assert ("triton", "b") not in suite.built             # a skipped variant builds nothing
    missing = _AlgoSuite(registry_op="no_such_op")
    vs = {v.name: v for v in missing.variants()}
    assert all("pydl has no 'triton' implementation" in vs[n].skip
               for n in ("triton-a", "triton-b"))
    assert missing.built == []


def test_variant_selection_by_name_or_prefix():
    from bench.suites import variant_selected
    assert variant_selected("triton-im2col", ["triton"])
    assert variant_selected("torch-cudnn", ["torch"]) and variant_selected("torch", ["torch"])
    assert variant_selected("triton-im2col", ["triton-im2col"])
    assert not variant_selected("triton-im2col", ["triton-implicit"])
    assert not variant_selected("tritonx", ["triton"])
    assert variant_selected("anything", None)
    conv = all_suites()["conv2d"]
    assert [v.name for v in runner.selected_variants(conv, ["triton"])] == [
        "triton-implicit", "triton-im2col"]
    assert [v.name for v in runner.selected_variants(conv, ["numba-im2col", "torch"])] == [
        "numba-im2col", "torch"]


def test_unknown_variant_is_an_error_and_another_ops_variant_a_note(capsys):
    assert cli.main(["conv2d", "--variants", "triton-bogus", "--no-progress"]) == 2
    assert "unknown variant 'triton-bogus'" in capsys.readouterr().err
    cli._check_variants([all_suites()["softmax"]], ["triton-im2col", "triton"])
    out = capsys.readouterr().out
    assert "'triton-im2col'" in out and "'triton'" not in out


def test_case_names_are_unique_and_sets_are_declared():
    for suite in all_suites().values():
        assert set(suite.shape_sets) == {"tiny", "quick", "full"}, suite.op
        for name, cases in suite.shape_sets.items():
            names = [c.name for c in cases]
            assert len(names) == len(set(names)), (suite.op, name)
            assert all(c.source for c in cases)
        # every quick case is in full; the tiny set runs in emulation: no bf16-only tiny set
        assert {c.name for c in suite.cases("quick")} <= {c.name for c in suite.cases("full")}
        assert any(c.dtype != torch.bfloat16 for c in suite.cases("tiny"))


def test_flop_and_byte_conventions():
    s = all_suites()
    conv = s["conv2d"]
    stem = next(c for c in conv.cases("quick") if c.name == "stem")
    fwd = 2 * 32 * 64 * 112 * 112 * 3 * 7 * 7
    assert [conv.flops(stem, d) for d in ("fwd", "bwd", "fwd+bwd")] == [fwd, 2 * fwd, 3 * fwd]
    assert conv.options(stem) == {"stride": 2, "padding": 3, "groups": 1}
    # the 23 distinct layers of ResNet-50 in bf16, then in fp32, then the quick ones in NCHW
    assert len(conv.cases("full")) == 23 + 23 + 6
    attn = s["attention"]
    full = {c.name: c for c in attn.cases("full")}
    plain, causal = full["d64-2k"], full["d64-2k-causal"]
    assert plain.shape == (8, 32, 2048, 64)          # 16k tokens, 32 heads x 64 = 2048
    f = 4 * 8 * 32 * 2048 * 2048 * 64
    assert attn.flops(plain, "fwd") == f and attn.flops(causal, "fwd") == f // 2
    assert attn.flops(plain, "bwd") == 5 * f // 2 and attn.flops(plain, "fwd+bwd") == 7 * f // 2
    assert len(full) == 2 * 6 * 2 * 2                 # head dims x lengths x causal x dtypes
    lstm = s["lstm"]
    case = next(c for c in lstm.cases("quick") if c.name == "h1024-b32-t25")
    f = 2 * 4 * 1024 * (1024 + 1024) * 32 * 25
    assert [lstm.flops(case, d) for d in ("fwd", "bwd", "fwd+bwd")] == [f, 2 * f, 3 * f]
    gru = s["gru"]
    case = next(c for c in gru.cases("quick") if c.name == "h2048-b32-t375")
    f = 2 * 3 * 2048 * (2048 + 2048) * 32 * 375
    assert [gru.flops(case, d) for d in ("fwd", "bwd", "fwd+bwd")] == [f, 2 * f, 3 * f]
    assert gru.bytes(case, torch.float16, "fwd") is None and gru.bound == "compute"
    for op, gates, states in (("lstm_cell", 4, 2), ("gru_cell", 3, 1)):
        cell = s[op]
        case = next(c for c in cell.cases("quick") if c.name == "h1024-b32")
        assert case.shape == (32, 1024) and case.hidden == 1024 and cell.bound == "memory"
        f = 2 * gates * 1024 * 2048 * 32
        assert [cell.flops(case, d) for d in ("fwd", "bwd", "fwd+bwd")] == [f, 2 * f, 3 * f]
        w, x, o = gates * 1024 * 2048 + 2 * gates * 1024, 32 * 1024 * (1 + states), \
            32 * 1024 * states
        assert cell.bytes(case, torch.float16, "fwd") == 2 * (w + x + o)
        assert cell.bytes(case, torch.float32, "bwd") == 4 * (2 * w + 2 * x + o)
        assert cell.bytes(case, torch.float16, "fwd+bwd") == 2 * (3 * w + 3 * x + 2 * o)
        # DeepBench's hidden 512..2048 x batch 16..128, one step, fp16 and fp32
        assert {(c.hidden, c.shape[0], c.dtype) for c in cell.cases("full")} == {
            (h, n, d) for h in (512, 1024, 2048) for n in (16, 32, 64, 128)
            for d in (torch.float16, torch.float32)}
    mp = s["max_pool2d"]
    stem_pool = next(c for c in mp.cases("quick") if c.name == "r50-stem")
    x, y = 256 * 64 * 112 * 112, 256 * 64 * 56 * 56
    assert mp.bytes(stem_pool, torch.bfloat16, "fwd") == 2 * (x + y)
    assert mp.bytes(stem_pool, torch.bfloat16, "bwd") == 2 * (x + y) + y     # + 1-byte argmax
    assert mp.bytes(stem_pool, torch.bfloat16, "fwd+bwd") == 4 * (x + y) + 2 * y
    ap = s["avg_pool2d"]
    case = ap.cases("quick")[0]
    assert ap.bytes(case, torch.float32, "bwd") == 4 * (case.numel + case.out_numel)
    head = s["adaptive_avg_pool2d"].cases("quick")[0]
    assert head.shape == (256, 2048, 7, 7) and head.out_numel == 256 * 2048
    # the 1-d pools: an (N, C, L) signal, its windows along L only
    mp1 = s["max_pool1d"]
    m5 = mp1.cases("quick")[0]
    x, y = 64 * 128 * 7981, 64 * 128 * 1995
    assert m5.out_numel == y and mp1.bytes(m5, torch.bfloat16, "bwd") == 2 * (x + y) + y
    assert mp1.reduction_lengths(m5) == (4, 1) and mp1.flops(m5, "fwd") == 4 * y
    funnel = s["avg_pool1d"].cases("quick")[0]
    assert s["avg_pool1d"].reduction_lengths(funnel) == (2, 1) and funnel.out_numel == \
        32 * 768 * 256
    mean = s["adaptive_avg_pool1d"].cases("quick")[0]
    assert s["adaptive_avg_pool1d"].reduction_lengths(mean) == (1500, 1) and \
        mean.out_numel == 64 * 512
    (xt,) = mp1.make_inputs(mp1.cases("full")[-1], torch.float32, "cpu",
                            torch.Generator().manual_seed(0))
    assert xt.shape == (64, 128, 7981) and xt.stride() == (128 * 7981, 1, 128)  # (N, L, C)


def test_skips_for_algorithm_limits_and_torch_backend_dtypes():
    s = all_suites()
    attn = s["attention"]
    v = {x.name: x for x in attn.variants()}
    full = {c.name: c for c in attn.cases("full")}
    assert attn.unsupported(full["d128-16k"], torch.bfloat16, v["triton-naive"])
    assert attn.unsupported(full["d128-4k"], torch.bfloat16, v["triton-naive"]) is None
    assert attn.unsupported(full["d128-4k"], torch.bfloat16, v["triton-flash"]) is None
    assert "fp16 and bf16 only" in attn.unsupported(full["d128-4k"], torch.float32,
                                                    v["torch-cudnn"])
    lstm = s["lstm"]
    v = {x.name: x for x in lstm.variants()}
    big, tiny = lstm.cases("quick")[0], lstm.cases("tiny")[0]
    for name in ("triton-persistent", "triton-steps"):      # no size limit on either
        assert lstm.unsupported(big, torch.float16, v[name]) is None
        assert lstm.unsupported(tiny, torch.float32, v[name]) is None


@pytest.mark.parametrize("op,gates", [("lstm", 4), ("gru", 3)])
def test_rnn_copies_keep_the_weights_in_one_buffer(op, gates):
    suite = all_suites()[op]
    case = suite.cases("tiny")[1]
    gen = torch.Generator().manual_seed(0)
    inputs = suite.make_inputs(case, torch.float32, torch.device("cpu"), gen)
    x, w_ih, w_hh, b_ih, b_hh = inputs
    assert x.shape == case.shape and w_ih.shape == (gates * 16, 12)
    assert w_hh.shape == (gates * 16, 16) and b_hh.shape == (gates * 16,)
    copies = suite.clone_inputs(inputs)
    assert all(t.is_leaf and t.requires_grad for t in copies)
    ptr = copies[1].untyped_storage().data_ptr()
    assert all(t.untyped_storage().data_ptr() == ptr for t in copies[1:])
    assert copies[1].untyped_storage().data_ptr() != w_ih.untyped_storage().data_ptr()
    for a, b in zip(copies, inputs):
        assert torch.equal(a.detach(), b)


class _OptionSuite(suites_base.Suite):
    """torch-only callables: case options reach every callable; skips by the suite and by
    an Unsupported raised from a variant; per-comparison reduction lengths."""

    def __init__(self):
        case = suites_base.Case("c", (4, 8), torch.float32, "test")
        super().__init__(op="opt", registry_op="no_such_op", shape_sets={"tiny": (case,)},
                         differentiable=(0,))
        self.seen = []

    def options(self, case):
        return {"factor": 3.0}

    def make_inputs(self, case, dtype, device, generator):
        return (suites_base.randn(case.shape, dtype, device, generator),)

    def torch_fn(self):
        def fn(x, factor):
            self.seen.append(factor)
            return x * factor
        return fn

    def reduction_lengths(self, case):
        return (8, 1)

    def unsupported(self, case, dtype, variant):
        return "too big for it" if variant.name == "limited" else None

    def variants(self):
        def unsupported(x, factor):
            raise suites_base.Unsupported("no kernel for this")
        return [Variant("torch", self.torch_fn(), "baseline"),
                Variant("same", lambda x, factor: x * factor, "peer"),
                Variant("limited", lambda x, factor: x * factor, "peer"),
                Variant("nokernel", unsupported, "peer"),
                Variant("wrong", lambda x, factor: x * (factor + 1), "peer")]


def test_case_options_unsupported_and_skips_through_the_runner():
    suite = _OptionSuite()
    rows = runner.run([suite], runner.Options(shapes="tiny", progress=False), "emulation",
                      {"copy_gbps": None, "bf16_tflops": None}, device="cpu")
    by = {(r["variant"], r["direction"]): r for r in rows}
    assert suite.seen and set(suite.seen) == {3.0}
    assert by[("torch", "fwd")]["status"] == "pass" and by[("same", "fwd+bwd")]["status"] == "pass"
    assert by[("limited", "fwd")]["status"] == "skipped"
    assert by[("limited", "bwd")]["message"] == "too big for it"
    assert by[("nokernel", "fwd+bwd")]["status"] == "skipped"
    assert by[("nokernel", "fwd")]["message"] == "no kernel for this"
    assert by[("wrong", "fwd")]["status"] == "wrong" and by[("wrong", "bwd")]["status"] == "wrong"
    assert not [r for r in rows if r["status"] == "error"]


def test_gpu_path_binds_case_options_and_sets_cudnn_benchmark(monkeypatch):
    """The fake-clock GPU path on a conv case (torch only: no kernels emulated): the case's
    stride and padding reach the timed step; cudnn.benchmark is on during the run only."""
    for name, fn in {"Event": _FakeEvent, "synchronize": lambda *a: None,
                     "reset_peak_memory_stats": lambda *a: None,
                     "memory_allocated": lambda *a: 0, "max_memory_allocated": lambda *a: 0,
                     "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(timing, "l2_bytes", lambda: 1 << 16)
    conv = all_suites()["conv2d"]
    seen = []
    real_torch_fn = conv.torch_fn

    def spy():
        fn = real_torch_fn()

        def wrapped(x, w, stride, padding, groups):
            seen.append((stride, padding, torch.backends.cudnn.benchmark))
            return fn(x, w, stride, padding, groups)
        return wrapped

    monkeypatch.setattr(conv, "torch_fn", spy)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    options = runner.Options(shapes="tiny", variants=["torch"], warmup_ms=0.0, rep_ms=0.0,
                             progress=False)
    rows = runner.run([conv], options, "gpu", {"copy_gbps": 100.0, "bf16_tflops": 10.0},
                      device="cpu")
    assert rows and all(r["status"] == "ok" and r["median_ms"] > 0 for r in rows), rows
    assert all(r["tflops"] > 0 for r in rows)
    assert {(s, p) for s, p, _ in seen} == {(1, 1), (2, 1), (2, 0)}   # the three tiny layers
    assert all(bench for *_, bench in seen)
    assert torch.backends.cudnn.benchmark is False                     # restored


# --- the recurrent suites: GRU layer, LSTM / GRU cells, recompute variants ---------------------

# baidu-research/DeepBench code/kernels/rnn_problems.h, training_set, type "gru" (hidden, batch,
# steps); its (2816, 32, 1500) entry is commented out there
DEEPBENCH_GRU = {(2816, 32, 750), (2816, 32, 375), (2816, 32, 187),
                 (2048, 32, 1500), (2048, 32, 750), (2048, 32, 375), (2048, 32, 187),
                 (1536, 32, 1500), (1536, 32, 750), (1536, 32, 375), (1536, 32, 187),
                 (2560, 32, 1500), (2560, 32, 750), (2560, 32, 375), (2560, 32, 187),
                 (512, 32, 1), (1024, 32, 1500), (1024, 64, 1500)}


def test_gru_shapes_are_deepbenchs_gru_training_set():
    gru = all_suites()["gru"]
    full = gru.cases("full")
    half = {(c.hidden, c.shape[1], c.shape[0]) for c in full if c.dtype == torch.float16}
    assert half == DEEPBENCH_GRU and len(full) == len(DEEPBENCH_GRU) + 5
    for c in full:
        assert c.shape[2] == c.hidden and "DeepBench GRU training" in c.source
        assert (c.hidden, c.shape[1], c.shape[0]) in DEEPBENCH_GRU
    assert {c.dtype for c in gru.cases("quick")} == {torch.float16}


def test_recompute_variants_pass_recompute_and_skip_with_their_base(monkeypatch):
    import pydl.functional
    seen = []

    def fake_gru(x, hx, weights, **kw):
        seen.append(kw)
        return x, None

    monkeypatch.setattr(pydl.functional, "gru", fake_gru)
    variants = {v.name: v for v in all_suites()["gru"].variants()}
    x = torch.ones(2, 1, 3)
    for name in ("triton-persistent", "triton-persistent-recompute", "triton-steps"):
        variants[name].fn(x, *[None] * 4)
    assert seen == [dict(backend="triton", algo="persistent", recompute=False),
                    dict(backend="triton", algo="persistent", recompute=True),
                    dict(backend="triton", algo="steps", recompute=False)]

    from bench.suites._rnn import TINY_LAYERS, RNNLayerSuite
    suite = RNNLayerSuite("gru", {"tiny": TINY_LAYERS}, algos={"triton": ("steps", "nope")},
                          recompute=("triton-nope",))
    vs = {v.name: v for v in suite.variants()}
    assert list(vs) == ["triton-steps", "triton-nope", "triton-nope-recompute",
                        "triton-persistent", "numba", "torch"]
    assert vs["triton-nope-recompute"].fn is None
    assert vs["triton-nope-recompute"].skip == vs["triton-nope"].skip and "no algo='nope'" in \
        vs["triton-nope"].skip


@pytest.mark.skipif(not EMULATION, reason="checks the CPU (emulation) behaviour")
def test_gru_and_cell_suites_pass_the_gate_in_emulation(tmp_path, capsys):
    rc, text = _run(capsys, "gru", "lstm_cell", "--variants", "triton", "torch",
                    "--out", str(tmp_path), "--results-dir", str(tmp_path / "none"))
    assert rc == 0, text
    rows = _only_json(tmp_path)["rows"]
    assert {(r["op"], r["variant"]) for r in rows} == {
        ("gru", "triton-persistent"), ("gru", "triton-persistent-recompute"),
        ("gru", "triton-steps"), ("gru", "torch"), ("lstm_cell", "triton"), ("lstm_cell", "torch")}
    assert len(rows) == (4 + 2) * 2 * 3                   # variants x tiny cases x directions
    for r in rows:
        assert r["status"] == "pass", r
        assert r["flops"] > 0 and (r["bytes"] is None) == (r["op"] == "gru")


def test_recompute_rows_record_peak_memory_on_the_gpu_path(monkeypatch):
    """The fake-clock GPU path (see test_gpu_path_with_fake_cuda_clock) on the lstm suite, with
    pydl.functional.lstm replaced by torch's layer (so nothing is emulated): the recompute
    variant is checked and timed like the others, with recompute=True, and its rows carry
    peak_mem_bytes. The numbers mean nothing."""
    import pydl.functional
    for name, fn in {"Event": _FakeEvent, "synchronize": lambda *a: None,
                     "reset_peak_memory_stats": lambda *a: None,
                     "memory_allocated": lambda *a: 100, "max_memory_allocated": lambda *a: 132,
                     "empty_cache": lambda: None}.items():
        monkeypatch.setattr(torch.cuda, name, fn)
    monkeypatch.setattr(timing, "l2_bytes", lambda: 1 << 10)
    lstm = all_suites()["lstm"]
    flags = []

    def fake_lstm(x, hx, weights, *, backend, algo, recompute):
        flags.append(recompute)
        return lstm.torch_fn()(x, *weights), None

    monkeypatch.setattr(pydl.functional, "lstm", fake_lstm)
    # one case (torch's CPU LSTM in fp32 takes oneDNN's slower path: leave it out)
    monkeypatch.setitem(lstm.shape_sets, "tiny", tuple(
        c for c in lstm.cases("tiny") if c.dtype == torch.float16)[:1])
    options = runner.Options(shapes="tiny", variants=["triton-persistent", "torch"],
                             directions=("fwd+bwd",), warmup_ms=0.0, rep_ms=0.0, progress=False)
    rows = runner.run([lstm], options, "gpu", {"copy_gbps": 100.0, "bf16_tflops": 10.0},
                      device="cpu")
    assert sorted(r["variant"] for r in rows) == ["torch", "triton-persistent",
                                                  "triton-persistent-recompute"]
    for r in rows:
        assert r["status"] == "ok" and r["median_ms"] > 0 and r["peak_mem_bytes"] == 32, r
        assert r["tflops"] > 0 and r["speedup_vs_torch"] is not None
    assert True in flags and False in flags


def test_floors_are_the_larger_of_math_and_memory_time(capsys):
    from bench import cli
    from bench.suites import all_suites
    rows = cli.floor_rows([all_suites()["conv2d"]], "quick", 3000.0, 790.0)
    assert rows and all(r["floor_us"] == max(r["math_us"], r["mem_us"]) for r in rows)
    stem = next(r for r in rows if r["case"] == "stem" and r["direction"] == "fwd")
    assert stem["math_us"] == pytest.approx(stem["gflop"] * 1e9 / 790e12 * 1e6)
    assert cli.main(["floors", "conv2d", "--shapes", "tiny"]) == 0
    assert "conv2d" in capsys.readouterr().out
    assert cli.main(["floors", "nonsense"]) == 2


class _VirtualClock:
    """A GPU clock for the timing loop on the CPU: each run of a step takes `run_ms` of virtual
    time, and CUDA events read that time."""

    def __init__(self, run_ms: float):
        self.now, self.run_ms = 0.0, run_ms
        clock = self

        class Event:
            def __init__(self, enable_timing=False):
                self.t = None

            def record(self, stream=None):
                self.t = clock.now

            def elapsed_time(self, end):
                return end.t - self.t
        self.Event = Event


def test_time_step_warms_up_past_the_number_of_input_copies(monkeypatch):
    """The warm-up runs more often than there are input copies (25 ms of 0.25 ms runs over 3
    copies): every run takes a copy in rotation, and the median is the run's (virtual) time."""
    clock = _VirtualClock(run_ms=0.25)
    monkeypatch.setattr(torch.cuda, "Event", clock.Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    copies = ["copy0", "copy1", "copy2"]
    used = []

    def prepare(c):
        used.append(c)
        return copies[c]                       # IndexError for a copy that does not exist

    def run(state):
        clock.now += clock.run_ms

    t = timing.time_step(timing.Step(prepare, run, len(copies)), warmup_ms=25.0, rep_ms=5.0)
    assert t.median_ms == 0.25 and t.min_ms == 0.25 and t.reps == 20   # rep_ms / run time
    # one untimed call, 5 probes, 100 warm-up runs, 20 timed runs, each on copy i % 3
    assert len(used) == 1 + 5 + 100 + 20
    assert used[6:106] == [i % 3 for i in range(100)]


# --- the gate judges against float64 --------------------------------------------------------

def _gate_case(suite_name="softmax", case_name="tiny-wide"):
    from bench import gate
    suite = all_suites()[suite_name]
    case = next(c for c in suite.cases("tiny") if c.name == case_name)
    gen = torch.Generator().manual_seed(0)
    inputs = suite.make_inputs(case, case.dtype, torch.device("cpu"), gen)
    return gate, suite, case, inputs, gen


def _check(gate, suite, case, inputs, ref, fn):
    return gate.check(Variant("candidate", fn, "peer"), suite, case.dtype,
                      suite.reduction_lengths(case), inputs, ref, torch.device("cpu"))


def test_gate_accepts_a_variant_more_accurate_than_torch(monkeypatch):
    """torch's fp16 result carries its own rounding; a variant closer to float64 than torch is
    must pass even where it differs from torch by more than the fp16 tolerance (the GPU's fp16
    GRU and LSTM-cell gradients). Here torch's fp16 softmax is made coarser than fp16's
    tolerance (a bf16 round trip) and the variant is float64 rounded to fp16."""
    gate, suite, case, inputs, gen = _gate_case()
    real = suite.torch_fn()

    def coarse_torch(x, *args, **kw):
        y = real(x, *args, **kw)
        return y if y.dtype == torch.float64 else y.to(torch.bfloat16).to(y.dtype)

    monkeypatch.setattr(suite, "torch_fn", lambda: coarse_torch)
    ref = gate.reference(suite, inputs, gen)
    assert ref.exact is not None and ref.exact[0].dtype == torch.float64

    def exact_then_rounded(x, *args, **kw):
        return real(x.double(), *args, **kw).to(x.dtype)

    c = _check(gate, suite, case, inputs, ref, exact_then_rounded)
    assert (c.fwd, c.bwd) == ("pass", "pass"), (c.fwd_message, c.bwd_message)
    # and torch's own result is not wrong either: it sets the allowance
    c = _check(gate, suite, case, inputs, ref, coarse_torch)
    assert (c.fwd, c.bwd) == ("pass", "pass"), (c.fwd_message, c.bwd_message)


def test_gate_rejects_what_torch_does_not_do():
    """Against float64: a variant out of tolerance where torch is within it is wrong, the
    message gives both deviations; and a variant much worse than an inexact torch is wrong."""
    gate, suite, case, inputs, gen = _gate_case()
    ref = gate.reference(suite, inputs, gen)
    real = suite.torch_fn()

    def off(x, *args, **kw):
        y = real(x, *args, **kw)
        return y + 0.5 * y.detach().abs().max()

    c = _check(gate, suite, case, inputs, ref, off)
    assert c.fwd == "wrong" and "from float64" in c.fwd_message and "torch" in c.fwd_message
    assert c.bwd == "pass"        # a constant shift leaves the softmax's gradient unchanged

    def nan_row(x, *args, **kw):
        y = real(x, *args, **kw).clone()
        y[1, 3] = float("nan")
        return y

    c = _check(gate, suite, case, inputs, ref, nan_row)
    assert c.fwd == "wrong" and "NaN" in c.fwd_message


def test_gate_falls_back_to_torch_without_a_float64_reference(monkeypatch):
    gate, suite, case, inputs, gen = _gate_case()
    real = suite.torch_fn()

    def no_double(x, *args, **kw):
        if x.dtype == torch.float64:
            raise RuntimeError("no float64 kernel")
        return real(x, *args, **kw)

    monkeypatch.setattr(suite, "torch_fn", lambda: no_double)
    ref = gate.reference(suite, inputs, gen)
    assert ref.exact is None and "no float64 kernel" in ref.exact_error
    c = _check(gate, suite, case, inputs, ref, lambda x, *a, **k: real(x, *a, **k) * 1.1)
    assert c.fwd == "wrong" and "no float64 reference" in c.fwd_message
    c = _check(gate, suite, case, inputs, ref, real)
    assert (c.fwd, c.bwd) == ("pass", "pass")


# --- the CLI's edges: help, list filter, closed pipes, compare gate, progress in logs ------------

def test_help_lists_every_command_from_the_dispatch_table(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert set(cli.COMMANDS) == {"list", "compare", "report", "floors", "resources",
                                 "numba-resources", "overhead", "rnn-steps", "gemm"}
    for name, (_, summary) in cli.COMMANDS.items():
        line = next((ln for ln in out.splitlines() if ln.split()[:1] == [name]), None)
        assert line is not None and summary[:30] in line, (name, out)
        with pytest.raises(SystemExit) as exit_:                  # each has its own --help
            cli.main([name, "--help"])
        assert exit_.value.code == 0
        assert f"python -m bench {name}" in capsys.readouterr().out


def test_list_takes_an_op_filter(capsys):
    assert cli.main(["list", "softmax", "max_pool2d"]) == 0
    listed = [ln.split(":")[0] for ln in capsys.readouterr().out.splitlines()
              if ln and not ln.startswith(" ")]
    assert listed == ["softmax", "max_pool2d"]
    assert cli.main(["list", "softmax", "no_such_op"]) == 2
    err = capsys.readouterr().err
    assert "unknown op 'no_such_op'" in err and "cross_entropy" in err


def test_output_into_a_closed_pipe_ends_quietly():
    """`python -m bench list | head`: the reader is gone before the first write here (its end
    of the pipe is closed at once), so the write fails with EPIPE: no traceback, the status a
    process killed by SIGPIPE has."""
    env = dict(os.environ, PYDL_INTERPRET="1")
    proc = subprocess.Popen([sys.executable, "-m", "bench", "list"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_compare_rejects_emulation_runs_as_report_does(tmp_path, capsys):
    gpu = schema.write(_result([_row(ms=1.0)]), tmp_path / "gpu")
    emu = schema.write(_result([_row(status="pass", ms=None)], mode="emulation"), tmp_path / "e")
    for a, b in ((emu, emu), (gpu, emu), (emu, gpu)):
        assert cli.main(["compare", str(a), str(b)]) == 2
        captured = capsys.readouterr()
        assert "is an emulation run: it holds correctness checks, no times" in captured.err
        assert "B/A" not in captured.out                          # no table of dashes
    assert cli.main(["report", str(emu)]) == 2
    assert "is an emulation run" in capsys.readouterr().err


def test_compare_fails_above_a_ratio(tmp_path, capsys):
    a = _result([_row(ms=1.0), _row(variant="torch", ms=2.0), _row(direction="bwd", ms=1.0)])
    b = _result([_row(ms=1.2), _row(variant="torch", ms=1.0), _row(direction="bwd", ms=1.05)],
                created="2025-02-01T00:00:00+00:00")
    pa, pb = schema.write(a, tmp_path / "a"), schema.write(b, tmp_path / "b")

    assert cli.main(["compare", str(pa), str(pb)]) == 0              # no threshold: a report
    capsys.readouterr()
    assert cli.main(["compare", str(pa), str(pb), "--fail-above", "1.10"]) == 1
    out = capsys.readouterr().out
    assert "1 row(s) slower than 1.1 x A" in out
    assert "cross_entropy v32k bf16 fwd triton: 1.000 -> 1.200 ms, B/A 1.200" in out
    assert "bwd triton:" not in out.split("slower than")[1]           # 1.05 is within 1.10
    assert cli.main(["compare", str(pa), str(pb), "--fail-above", "1.25"]) == 0
    assert "no row is slower than 1.25 x A" in capsys.readouterr().out

    # a row timed in A that is wrong in B fails the gate too
    wrong = _result([_row(ms=1.0), _row(variant="torch", status="wrong", ms=None,
                                        message="out of tolerance")],
                    created="2025-03-01T00:00:00+00:00")
    pw = schema.write(wrong, tmp_path / "w")
    assert cli.main(["compare", str(pa), str(pw), "--fail-above", "1.5"]) == 1
    assert "fwd torch: wrong in B (out of tolerance)" in capsys.readouterr().out

    # nothing timed in both: the gate checked nothing, which is an error, not a pass
    other = _result([_row(case="v128k", ms=1.0)], created="2025-04-01T00:00:00+00:00")
    po = schema.write(other, tmp_path / "o")
    assert cli.main(["compare", str(pa), str(po), "--fail-above", "1.1"]) == 2
    assert "no row was timed in both runs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", str(pa), str(pb), "--fail-above", "0"])


def _two_case_suite():
    suite = _OptionSuite()
    suite.shape_sets = {"tiny": (suites_base.Case("c", (4, 8), torch.float32, "test"),
                                 suites_base.Case("d", (3, 5), torch.float32, "test"))}
    return suite


def test_progress_in_a_log_is_one_line_per_case(capsys):
    """stderr is not a terminal (a log, CI): no bar redrawn with carriage returns, one line
    per case."""
    runner.run([_two_case_suite()], runner.Options(shapes="tiny", variants=["torch", "same"]),
               "emulation", {"copy_gbps": None, "bf16_tflops": None}, device="cpu")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("[1/2] opt c fp32: 2 variant(s), ")
    assert lines[1].startswith("[2/2] opt d fp32: 2 variant(s), ")


def test_op_budget_skips_the_cases_after_it_is_spent(capsys):
    """--op-budget: an op's first case runs, later ones start only within the budget; the
    rest are rows with status skipped that say why (a budgeted GPU session keeps its data)."""
    options = runner.Options(shapes="tiny", variants=["torch"], progress=False, op_budget_s=0.0)
    rows = runner.run([_two_case_suite()], options, "emulation",
                      {"copy_gbps": None, "bf16_tflops": None}, device="cpu")
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], set()).add(r["status"])
    assert by_case["c"] == {gate.PASS}
    assert by_case["d"] == {gate.SKIPPED}
    assert all("time budget" in r["message"] for r in rows if r["case"] == "d")
    options = replace(options, op_budget_s=3600.0)
    rows = runner.run([_two_case_suite()], options, "emulation",
                      {"copy_gbps": None, "bf16_tflops": None}, device="cpu")
    assert {r["status"] for r in rows} == {gate.PASS}


def test_cases_select_rows_and_unknown_names_are_an_error(capsys):
    options = runner.Options(shapes="tiny", variants=["torch"], progress=False, cases=["d"])
    rows = runner.run([_two_case_suite()], options, "emulation",
                      {"copy_gbps": None, "bf16_tflops": None}, device="cpu")
    assert {r["case"] for r in rows} == {"d"}
    assert cli.main(["softmax", "--cases", "no-such-case"]) == 2
    assert "no case 'no-such-case'" in capsys.readouterr().err


def test_progress_on_a_terminal_is_a_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = runner.Progress(cases=1, variants=2, stream=stream)
    bar.set_description("opt c fp32 torch")
    bar.update()
    bar.update()
    bar.case_done("opt c fp32", 2)
    bar.close()
    assert "\r" in stream.getvalue() and "opt c fp32 torch" in stream.getvalue()
    assert "[1/1]" not in stream.getvalue()
    quiet = io.StringIO()
    bar = runner.Progress(cases=1, variants=1, enabled=False, stream=quiet)
    bar.update()
    bar.case_done("opt c fp32", 1)
    bar.close()
    assert quiet.getvalue() == ""


def _counting_clock():
    """(ms, calls): a stand-in for a GPU command's clock that runs the thunk and returns how
    many it has timed so far (each later timing slower)."""
    calls = []

    def ms(fn):
        fn()
        calls.append(1)
        return float(len(calls))
    return ms, calls


def test_rnn_steps_plumbing(monkeypatch):
    """`python -m bench rnn-steps` (GPU only) in emulation, its timer and the tuner's clock
    faked: every mode runs the layer, the one-program schedule runs with the persistent step's
    config, and each forced forward candidate is the one the tuner took (the measurement
    checks it); without a GPU the command refuses."""
    from bench import rnn_steps
    from pydl import _tune
    monkeypatch.setattr(_tune, "enabled", lambda: True)
    clock = lambda fn, cfg: float(sum(v for v in cfg.values() if isinstance(v, int)))  # noqa: E731
    monkeypatch.setattr(_tune, "_device_bench", clock)
    for tuner in _tune.Tuner.all.values():
        monkeypatch.setattr(tuner, "bench", clock)
    schedules = []
    original = rnn_steps._layer

    def layer(kind, H, B, T, train, device):
        from pydl import _rnn_launch
        schedules.append(_rnn_launch.schedule("persistent", torch.device("cuda")))
        return original(kind, H, B, T, train, device)
    monkeypatch.setattr(rnn_steps, "_layer", layer)
    ms, _ = _counting_clock()
    try:
        row = rnn_steps.measure("tiny", "lstm", 12, 3, 2, True, ms, device="cpu")
    finally:
        _tune.reset()
    assert row["config"] is not None and row["tiles"] >= 1
    assert {"tile_us", "barrier_and_skew_us", "one_program_fwd_us"} <= set(row)
    assert len(row["by_config"]) >= 2
    assert all("fwd_us" in entry for entry in row["by_config"]), row["by_config"]
    assert "one_program" in schedules
    assert rnn_steps.split_step(10.0, 64.0, 16) == {"tile_us": 4.0, "barrier_and_skew_us": 6.0}
    assert cli.main(["rnn-steps", "lstm-h1024-b32"]) == 2


def test_gemm_plumbing(monkeypatch, capsys):
    """`python -m bench gemm` (GPU only) in emulation with a faked timer: every candidate of
    the shared GEMM is timed by it (the persistent TMA kernel's among them, at a layout TMA
    addresses), checked against torch's product, the fastest is the tuner's choice; cuBLAS
    is timed by the same timer; without a GPU the command refuses."""
    from bench import gemm as gemm_bench
    from pydl import _tune
    monkeypatch.setattr(_tune, "enabled", lambda: True)
    ms, calls = _counting_clock()
    try:
        row = gemm_bench.measure("tiny", 40, 48, 64, "nt", ms, device="cpu",
                                 dtype=torch.float16)
    finally:
        _tune.reset()
    rows = row["candidates"]
    assert len(rows) >= 4 and all(r["error"] is None for r in rows), rows
    assert any(r["config"].get("TMA") for r in rows)
    assert all(r["max_err"] < 1e-2 for r in rows), [r["max_err"] for r in rows]
    assert row["chosen"] == min(rows, key=lambda r: r["ms"])["config"]
    assert row["cublas_ms"] == float(len(calls))          # timed last, by the same clock
    gemm_bench._print(row)
    printed = capsys.readouterr().out
    assert "(default)" in printed and "TMA M" in printed and "x cuBLAS" in printed
    assert cli.main(["gemm", "4096^3"]) == 2
