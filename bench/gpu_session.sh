#!/usr/bin/env bash
# One GPU machine, few calls: each mode below is meant to finish well inside 10 minutes and
# leaves every log and result under OUT (a short summary is printed last).
#
#   bench/gpu_session.sh session OUT                 everything one lent GPU is for, in one call of
#                                                    at most 575 s of steps, each with a time
#                                                    limit (a slow step cannot eat the rest):
#                                                    the GPU test files (185 s, one line per
#                                                    test), the host-path table `python -m bench
#                                                    overhead` (50 s), the benchmark at its quick
#                                                    shapes with --op-budget (each op stops
#                                                    starting cases after its seconds; 305 s in
#                                                    all), `python -m bench rnn-steps` (35 s:
#                                                    where a persistent recurrence's step goes);
#                                                    logs and OUT/results.tgz (the JSON: unpack
#                                                    it into bench/results/). Seven files, under
#                                                    the eight a lent machine returns.
#   bench/gpu_session.sh overhead OUT                `python -m bench overhead` at the quick
#                                                    shapes: end to end vs kernel time per op
#   bench/gpu_session.sh verify  OUT                 the checks of the first run's faults, in one
#                                                    call: the Numba backend under the machine's
#                                                    NumPy, the test files that failed there
#                                                    (TF32 tolerances, torch's CUDA-side rules), and
#                                                    the benchmark gate on the GRU layer and LSTM
#                                                    cell backward (float64 reference)
#   bench/gpu_session.sh tests   OUT [pytest args]   the test suite on the GPU: compiled kernels,
#                                                    bf16, the --full heavy cases (> 2^31
#                                                    elements), CuPy; 4 pytest-xdist workers
#   bench/gpu_session.sh bench   OUT [bench args]    `python -m bench --shapes quick` (autotuned):
#                                                    JSON and plots in OUT/results
#   bench/gpu_session.sh untuned OUT [bench args]    the same with PYDL_TUNE=0 (default configs),
#                                                    to compare with `python -m bench compare`
#   bench/gpu_session.sh rnn     OUT [bench args]    the recurrent layers: the persistent path's
#                                                    GPU tests (grid barrier; persistent == steps
#                                                    bit for bit), then LSTM and GRU fwd+bwd on
#                                                    DeepBench's quick shapes against torch
#                                                    (cuDNN): the issue-17 targets, with peak memory,
#                                                    then `python -m bench rnn-steps --configs`
#   bench/gpu_session.sh gemm    OUT [cases]         `python -m bench gemm`: the shared GEMM's every
#                                                    tuning candidate (pointer and TMA kernels)
#                                                    against cuBLAS, results checked against it
#   bench/gpu_session.sh ncu     OUT                 Nsight Compute, one launch each, on the last
#                                                    run's kernel outliers (about two minutes)
#
# Suggested order: `verify OUT`, then `tests OUT` (add test files to split it if it runs long),
# then `bench OUT conv2d attention`, then `bench OUT cross_entropy max_pool2d softmax lstm ...`.
# Copy OUT/results/*.json (and the plots) into bench/results/ and commit them.
# Uses the machine's installed packages; installs pydl itself in place without dependencies,
# and stops (exit 3) when that install or `import pydl.kernels` fails.
set -uo pipefail
mode=${1:?usage: bench/gpu_session.sh session|overhead|verify|tests|bench|untuned|rnn|gemm|ncu OUT [args...]}
out=${2:?usage: bench/gpu_session.sh session|overhead|verify|tests|bench|untuned|rnn|gemm|ncu OUT [args...]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1; then
    echo "error: \`pip install -e . --no-deps --no-build-isolation\` failed; nothing was run." >&2
    echo "(it builds with the installed setuptools, which must be 70.1 or newer, or older with" \
         "the wheel package)" >&2
    tail -n 15 "$out/install.log" >&2
    exit 3
fi
if ! python3 -c "import pydl.kernels, pydl.kernels.triton" >"$out/import.log" 2>&1; then
    echo "error: pydl installed, but \`import pydl.kernels\` failed; nothing was run." >&2
    tail -n 15 "$out/import.log" >&2
    exit 3
fi
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__)"
    python3 -c "import numba, numba_cuda; print('numba', numba.__version__, 'numba-cuda', numba_cuda.__version__)" 2>&1 | tail -n 1
    git rev-parse HEAD 2>/dev/null
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

workers() {   # $1 workers when pytest-xdist is installed
    python3 -c "import xdist" 2>/dev/null && echo "-n $1"
}

per_test() {   # a per-test time limit when pytest-timeout is installed
    python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout $1 --timeout-method thread"
}

bench_op() {   # bench_op SECONDS OP_SECONDS OPS...: a group of ops, each within OP_SECONDS
    local limit=$1 per_op=$2; shift 2
    timeout -k 5 "$limit" python3 -m bench "$@" --shapes quick --no-plots --op-budget "$per_op" \
        --rep-ms 30 --warmup-ms 10 --out "$out/results" >>"$out/bench.log" 2>&1
    echo "bench $* exit status $? (124: stopped by its time limit)"
}

case $mode in
    session)
        # the Numba tensor-core kernels (the GEMM, the attention forward), off by default until
        # a GPU has run them: on for the whole session (their tests, the Numba benchmark rows)
        export PYDL_NUMBA_MMA=1
        # 1. the GPU test files (not the CPU-only ones: packaging, the bench CLI, offline
        #    compiles), one line per test in the log so that a stopped run still shows what ran;
        #    the Numba backend's cases apart (its compiles are slower), so each gets its time
        #    (Numba: 60 s; each tensor-core attention kernel takes 4-5 s to PTX on the CPU
        #    machines, 15-20 s on this host, about 13 builds in its tests)
        # (the files a GPU has not run yet first: xdist hands tests out in this order; the
        # direct Numba launch's (it must engage, and agree with torch on a second call) and the
        # Numba tensor-core kernels' first, whose fragment layouts only hardware can confirm;
        # tests/test_rnn.py before the cells' files: its recompute tests check the recurrent
        # backward's in-place gradients (IN_WS, IN_ACTS) against the saved-activation path)
        gpu_tests="tests/test_numba_direct.py tests/test_plan_replay.py tests/test_gemm_numba.py tests/test_attention_forward.py tests/test_graph_capture.py tests/test_plans.py tests/test_rnn_persistent.py tests/test_rnn.py tests/test_lstm.py tests/test_gru.py
            tests/test_double_backward.py tests/test_edge_cases.py
            tests/test_gemm.py tests/test_overhead.py tests/test_backends.py
            tests/test_testing.py tests/test_interop.py tests/test_softmax_ce.py
            tests/test_conv.py tests/test_attention.py tests/test_attention_onepass.py tests/test_pool.py
            tests/test_option_fuzz.py tests/test_linear_cross_entropy.py"
        for part in "125 not numba" "60 numba"; do
            # shellcheck disable=SC2046,SC2086
            timeout -k 5 "${part%% *}" python3 -m pytest -v -p no:cacheprovider $(workers 14) \
                $(per_test 60) --maxfail 40 --tb short --durations 10 -k "${part#* }" \
                $gpu_tests >>"$out/tests.log" 2>&1
            echo "pytest -k '${part#* }' exit status $? (124: stopped by its time limit)"
        done
        grep -cE " PASSED " "$out/tests.log" | sed 's/^/passed: /'
        grep -E "^(FAILED|ERROR)| FAILED | ERROR " "$out/tests.log" | head -30
        grep -E "^=+ .* in [0-9.]+s" "$out/tests.log"
        # 2. the host path: end to end against kernel time per op
        #    (default configs: the host path does not depend on them, and tuning takes time)
        PYDL_TUNE=0 timeout -k 5 30 python3 -m bench overhead conv2d attention lstm gru \
            --variants triton-implicit triton-flash triton-persistent torch --calls 50 \
            --json "$out/overhead.json" >"$out/overhead.log" 2>&1
        echo "overhead exit status $?"
        PYDL_TUNE=0 timeout -k 5 20 python3 -m bench overhead cross_entropy cross_entropy_soft \
            softmax max_pool2d avg_pool2d lstm_cell gru_cell --variants triton torch --calls 50 \
            --json "$out/overhead2.json" >>"$out/overhead.log" 2>&1
        echo "overhead exit status $?"
        cat "$out/overhead.log"
        # 3. the benchmark, each op within its budget (later cases are recorded as skipped)
        bench_op 175 44 conv2d attention lstm gru \
            --variants triton-implicit triton-flash triton-persistent torch \
            --cases l1-3x3-64 l2-3x3s2-128 l3-1x1-1024-256 l4-3x3-512 stem \
                d128-1k d128-4k d128-16k-causal h1024-b32-t25 h2048-b128-t25 h256-b32-t150 \
                h1536-b32-t187 h512-b32-t1 h1024-b64-t1500
        # the single-pass attention backward (bench/TUNING.md v1) and the Gluon kernels
        # (v21, v23: the persistent forward, the single-pass backward), these only once their
        # GPU tests passed (a kernel that hangs here would cost the rest of the step)
        gated=triton-flash_onepass
        tests_passed() {   # tests_passed PATTERN: a test id matching it passed, none failed
            # (pytest -v lines: "... PASSED tests/...[...]" under xdist, the outcome after
            # the name without it)
            grep -qE "PASSED .*$1|$1.* PASSED" "$out/tests.log" \
                && ! grep -qE "(FAILED|ERROR) .*$1|$1.* (FAILED|ERROR)" "$out/tests.log"
        }
        if tests_passed "test_flash_hopper_(matches_reference\[flash_hopper-|schedules)"; then
            gated="$gated triton-flash_hopper"
        fi
        if tests_passed "flash_hopper_onepass"; then
            gated="$gated triton-flash_hopper_onepass"
        fi
        # shellcheck disable=SC2086
        bench_op 45 40 attention --variants $gated --cases d128-1k d128-1k-causal d128-4k \
            d128-16k-causal
        bench_op 55 8 cross_entropy cross_entropy_soft max_pool2d avg_pool2d \
            adaptive_avg_pool2d softmax conv2d_depthwise --variants triton numba torch
        # the Numba conv2d on its tensor-core GEMM and the Numba attention on its tensor-core
        # forward (bench/TUNING.md v10, v11; PYDL_NUMBA_MMA above), beside the triton rows of
        # the first group
        bench_op 30 13 conv2d attention --variants numba-im2col numba-flash \
            --cases l1-3x3-64 l3-1x1-1024-256 d128-1k
        tail -n 70 "$out/bench.log"
        # 4. where a persistent recurrence's step goes (bench/rnn_steps.py): per-step slopes,
        #    tile latency against barrier, each forward candidate forced; the benchmark above
        #    compiled and tuned these kernels, so this is timing only
        timeout -k 5 35 python3 -m bench rnn-steps lstm-h1024-b32 gru-h1536-b32 --configs \
            --rep-ms 30 --json "$out/results/rnn_steps.json" >"$out/rnn_steps.log" 2>&1
        echo "rnn-steps exit status $?"
        cat "$out/rnn_steps.log" | tee -a "$out/bench.log" && rm "$out/rnn_steps.log"
        # at most 8 files come back from a lent machine: one archive of the results' JSON
        tar czf "$out/results.tgz" -C "$out" results && rm -r "$out/results"
        rm -f "$out/install.log" "$out/import.log"  # 7 files left
        ls "$out"
        ;;
    overhead)
        timeout 240 python3 -m bench overhead --json "$out/overhead.json" "$@" \
            >"$out/overhead.log" 2>&1
        echo "overhead exit status $?"
        cat "$out/overhead.log"
        ;;
    verify)
        # 1. the tests: the Numba backend (item: NumPy without row_stack), and every test file
        #    with a failure in the first run, without --full
        # shellcheck disable=SC2046
        timeout 420 python3 -m pytest -q -p no:cacheprovider $(workers 12) --durations=15 \
            --junitxml="$out/junit.xml" \
            tests/test_packaging.py tests/test_testing.py tests/test_conv.py \
            tests/test_interop.py tests/test_lstm.py tests/test_attention.py \
            tests/test_softmax_ce.py tests/test_pool.py tests/test_gemm_numba.py \
            tests/test_compile.py >"$out/tests.log" 2>&1
        tests_rc=$?
        echo "pytest exit status $tests_rc (124: stopped by its time limit)"
        grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
        tail -n 3 "$out/tests.log"
        # 2. the gate on the rows it rejected: GRU layer and LSTM cell, fp16, quick shapes
        timeout 150 python3 -m bench gru lstm_cell --variants triton torch --direction bwd \
            --rep-ms 5 --warmup-ms 1 --no-plots --no-progress --out "$out/results" \
            >"$out/bench.log" 2>&1
        bench_rc=$?
        echo "bench (gate) exit status $bench_rc"
        grep -E "wrong|error" "$out/bench.log" | head -20
        tail -n 30 "$out/bench.log"
        [ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
        exit $?
        ;;
    tests)
        # shellcheck disable=SC2046
        timeout 540 python3 -m pytest -q -p no:cacheprovider --full $(workers 4) \
            --durations=30 --junitxml="$out/junit.xml" "$@" >"$out/tests.log" 2>&1
        echo "pytest exit status $?"   # 4 workers: the > 2^31-element cases need ~16 GB each
        grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -40
        tail -n 5 "$out/tests.log"
        ;;
    bench | untuned)
        [ "$mode" = untuned ] && export PYDL_TUNE=0
        timeout 540 python3 -m bench --shapes quick --no-progress --out "$out/results" "$@" \
            >"$out/bench.log" 2>&1
        echo "bench exit status $?"
        tail -n 80 "$out/bench.log"
        ;;
    rnn)
        timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_rnn_persistent.py \
            >"$out/rnn_tests.log" 2>&1
        echo "pytest exit status $?"
        tail -n 15 "$out/rnn_tests.log"
        # (recompute: the GRU's backward then writes its gradients in place: its peak memory)
        timeout 300 python3 -m bench lstm gru --shapes quick --direction fwd+bwd \
            --variants triton-persistent triton-persistent-recompute torch --no-progress \
            --out "$out/results" "$@" \
            >"$out/bench.log" 2>&1
        echo "bench exit status $?"
        tail -n 40 "$out/bench.log"
        timeout 90 python3 -m bench rnn-steps lstm-h1024-b32 lstm-h256-b32 gru-h1536-b32 \
            --configs --json "$out/results/rnn_steps.json" >"$out/rnn_steps.log" 2>&1
        echo "rnn-steps exit status $?"
        cat "$out/rnn_steps.log"
        ;;
    gemm)
        # the shared GEMM alone against cuBLAS: every tuning candidate (the TMA kernel's among
        # them) at the head's, the 1x1 layers' and a square product (about three minutes)
        timeout 400 python3 -m bench gemm --json "$out/results/gemm.json" "$@" \
            >"$out/gemm.log" 2>&1
        echo "bench gemm exit status $?"
        cat "$out/gemm.log"
        ;;
    ncu)
        # Nsight Compute on the kernel-level outliers of the last run, one launch each, at
        # default configs (PYDL_TUNE=0): the max-pool NCHW backward (1.9 ms for ~0.5 GB), the
        # stem's grad input (3.0 ms), the GRU backward recurrence (98 us a step at hidden
        # 2560) and the softmax backward (53% of copy where the forward reaches 97%, and
        # not issue-bound: 0.41 warp-instructions an element), and the shared GEMM of a 1x1
        # layer at 64 channels (one K step; 0.072 ms for ~40 MB: the first launch of the
        # backward run is its forward's); about four minutes
        for spec in "max_pool2d_bwd_planar max_pool2d r50-stem-nchw triton" \
                    "conv2d_implicit_bwd_input conv2d stem triton-implicit" \
                    "gemm_kernel conv2d l1-1x1-64-256 triton-implicit" \
                    "gru_layer_bwd gru h2560-b32-t187 triton-persistent" \
                    "softmax_bwd softmax attn-2k triton"; do
            set -- $spec
            PYDL_TUNE=0 timeout -k 5 60 ncu --set detailed -k "regex:$1" -c 1 \
                python3 -m bench "$2" --cases "$3" --variants "$4" \
                --direction bwd --rep-ms 1 --warmup-ms 1 --no-plots --no-progress \
                --out "$out/ncu_bench" >"$out/ncu_$1.txt" 2>&1
            echo "ncu $1 exit status $?"
            grep -E "Duration|Memory Throughput|DRAM Throughput|Compute \(SM\) Throughput|Registers Per|Achieved Occupancy|L2 Hit|Warp Cycles Per Issued" \
                "$out/ncu_$1.txt" | head -n 12
        done
        rm -rf "$out/ncu_bench"
        ;;
    *)
        echo "unknown mode $mode: session, overhead, verify, tests, bench, untuned, rnn or ncu" >&2
        exit 2
        ;;
esac
