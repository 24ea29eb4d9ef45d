"""LSTM: DeepBench's LSTM training problems, a one-layer unidirectional torch.nn.LSTM layer,
forward and backward through time.

Shapes are DeepBench's RNN training set (baidu-research/DeepBench, code/kernels/rnn_problems.h:
`training_set`, type "lstm"), given as (hidden, batch, time steps), with input size = hidden
(DeepBench's cuDNN runs skip the input projection; here the layer has its W_ih, as
torch.nn.LSTM(hidden, hidden) does), zero initial state, batch-second (T, N, I) input.
    quick  hidden 512 x batch 64, 1024 x 32, 2048 x 16 and 2048 x 128 at 25 steps, and
           256 x 32 at 150 steps; fp16 (DeepBench's training precisions are fp32 and fp16;
           fp16 is also the half type every cuDNN RNN takes)
    full   hidden 512, 1024, 2048 at batch 16, 32, 64, 128 and 25 steps, hidden 256 at batch
           16, 32, 64 and 150 steps, in fp16 and fp32; plus the rest of DeepBench's LSTM
           training set in fp16 (hidden 4096 at 25 steps, hidden 1536 at 50 steps)
    tiny   emulation checks: a few steps of small layers, fp32 and fp16 (input != hidden in
           one of them)

Inputs: x (T, N, I) and the layer's weights w_ih (4H, I), w_hh (4H, H), b_ih, b_hh (4H,),
which are views of ONE buffer laid out as torch.nn.LSTM keeps them after flatten_parameters()
(on a GPU, the layout torch._cudnn_rnn_flatten_weight gives; copies keep it), so cuDNN runs
on them in place as in a real nn.LSTM, without copying the weights every call. Gradients:
x and all four weights. The "fwd" step runs torch in inference mode (no grad): cuDNN keeps no
reserve for backward then. (The layout, inputs and torch call are shared with the gru suite:
bench/suites/_rnn.py.)

Variants: pydl's algorithms (pydl.lstm.ALGOS) on both kernel backends: "triton-persistent"
and "numba-persistent" (the default: one GEMM for the input projection of all steps, then ONE
launch for the recurrence of the whole sequence, its programs splitting the hidden units and
meeting at a grid barrier between steps; on a GPU a cooperative launch), "triton-steps" and
"numba-steps" (the same kernel launched once per time step); "triton-persistent-recompute" is
triton-persistent with recompute=True (the backward regenerates the gate activations instead
of keeping them: compare its peak_mem_bytes and time with triton-persistent's); "torch" is
torch's LSTM (cuDNN on a GPU: its persistent kernel for fp16 with hidden <= 1024).

Compute-bound: judged against the measured bf16 matmul rate (DeepBench's shapes are fp16/fp32:
fp16 runs at the same tensor-core rate as bf16). FLOPs count the GEMMs only (_rnn.gemm_flops
with 4 gates):
    fwd      2 * 4H (I + H) * N * T           (x W_ih^T and h W_hh^T for every step)
    bwd      2 x fwd: the data gradients (dx, dh through time) and the weight gradients
             (dW_ih, dW_hh), each the size of the forward's products
    fwd+bwd  3 x fwd
No byte count: the recurrence re-reads W_hh every step, so no single-pass minimum applies.
"""
from __future__ import annotations

from ._rnn import F32, TINY_LAYERS, RNNLayerSuite, layer_case

REQUESTED = tuple((h, n, 25) for h in (512, 1024, 2048) for n in (16, 32, 64, 128)) + \
    tuple((256, n, 150) for n in (16, 32, 64))
REST_OF_DEEPBENCH = tuple((4096, n, 25) for n in (16, 32, 64, 128)) + \
    tuple((1536, n, 50) for n in (8, 16, 32))
QUICK = ((512, 64, 25), (1024, 32, 25), (2048, 16, 25), (2048, 128, 25), (256, 32, 150))


def _case(*shape, **kw):
    return layer_case("lstm", *shape, **kw)


SHAPES = {"tiny": TINY_LAYERS, "quick": tuple(_case(*s) for s in QUICK)}
SHAPES["full"] = SHAPES["quick"] + tuple(_case(*s) for s in REQUESTED if s not in QUICK) + \
    tuple(_case(*s) for s in REST_OF_DEEPBENCH) + \
    tuple(_case(*s, dtype=F32, suffix="-fp32") for s in REQUESTED)


class LSTMSuite(RNNLayerSuite):
    def __init__(self):
        super().__init__("lstm", SHAPES)


SUITES = [LSTMSuite()]
