#!/usr/bin/env bash
# One GPU machine, few calls: each mode below is meant to finish well inside 10 minutes and
# leaves every log and result under OUT (a short summary is printed last).
#
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
#                                                    (cuDNN): the issue-17 targets, with peak memory
#
# Suggested order: `tests OUT` (add test files to split it if it runs long), then
# `bench OUT conv2d attention`, then `bench OUT cross_entropy max_pool2d softmax lstm ...`.
# Copy OUT/results/*.json (and the plots) into bench/results/ and commit them.
# Uses the machine's installed packages; installs pydl itself in place without dependencies.
set -uo pipefail
mode=${1:?usage: bench/gpu_session.sh tests|bench|untuned|rnn OUT [args...]}
out=${2:?usage: bench/gpu_session.sh tests|bench|untuned|rnn OUT [args...]}
shift 2
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q -e . --no-deps --no-build-isolation >"$out/install.log" 2>&1 \
    || echo "pip install -e . failed (see install.log)"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, numpy, numba; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numpy', numpy.__version__, 'numba', numba.__version__)"
    git rev-parse HEAD 2>/dev/null
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

case $mode in
    tests)
        workers=()
        python3 -c "import xdist" 2>/dev/null && workers=(-n 4)   # 4: the > 2^31-element cases need ~16 GB each
        timeout 540 python3 -m pytest -q -p no:cacheprovider --full "${workers[@]}" \
            --durations=30 --junitxml="$out/junit.xml" "$@" >"$out/tests.log" 2>&1
        echo "pytest exit status $?"
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
        timeout 380 python3 -m bench lstm gru --shapes quick --direction fwd+bwd \
            --variants triton-persistent torch --no-progress --out "$out/results" "$@" \
            >"$out/bench.log" 2>&1
        echo "bench exit status $?"
        tail -n 40 "$out/bench.log"
        ;;
    *)
        echo "unknown mode $mode: tests, bench, untuned or rnn" >&2
        exit 2
        ;;
esac
