"""GRU: DeepBench's GRU training problems, a one-layer unidirectional torch.nn.GRU layer,
forward and backward through time.

Shapes are DeepBench's RNN training set (baidu-research/DeepBench, code/kernels/rnn_problems.h:
`training_set`, type "gru"), given as (hidden, batch, time steps), with input size = hidden
(DeepBench's cuDNN runs skip the input projection; here the layer has its W_ih, as
torch.nn.GRU(hidden, hidden) does), zero initial state, batch-second (T, N, I) input. Its
eighteen GRU problems: hidden 1536, 2048, 2560 at batch 32 and 1500, 750, 375, 187 steps;
hidden 2816 at batch 32 and 750, 375, 187 steps (its 1500-step entry is commented out there,
and left out here); hidden 512 at batch 32 and ONE step; hidden 1024 at batch 32 and 64 and
1500 steps.
    quick  hidden 1536, 2560 and 2816 at 187 steps, 2048 at 375 steps (all batch 32), 1024 x
           batch 64 at 1500 steps and the one-step 512 x 32; fp16 (DeepBench's training
           precisions are fp32 and fp16; fp16 is also the half type every cuDNN RNN takes)
    full   all eighteen in fp16; the 187-step ones and the one-step one also in fp32
    tiny   emulation checks: a few steps of small layers, fp32 and fp16 (input != hidden in
           one of them); the lstm suite's tiny layers

Inputs, as the lstm suite's (bench/suites/_rnn.py, shared): x (T, N, I) and the layer's
weights w_ih (3H, I), w_hh (3H, H), b_ih, b_hh (3H,), views of ONE buffer laid out as
torch.nn.GRU keeps them after flatten_parameters() (cuDNN's layout on a GPU; copies keep it),
so cuDNN runs on them in place. Gradients: x and all four weights. The "fwd" step runs torch
in inference mode (no grad).

Variants: pydl's algorithms (pydl.gru.ALGOS) on both kernel backends, as the lstm suite's:
"triton-persistent" and "numba-persistent" (one launch for the recurrence of the whole
sequence: h W_hh^T, the gates and the update of every step, the programs meeting at a grid
barrier between steps), "triton-steps" and "numba-steps" (one launch per step);
"triton-persistent-recompute", triton-persistent with recompute=True (the backward
regenerates r, z, n and W_hn h instead of keeping them: compare its peak_mem_bytes and time
with triton-persistent's); "torch" is torch's GRU (cuDNN on a GPU; cuDNN has no persistent
GRU).

Compute-bound, as the lstm suite. FLOPs count the GEMMs only (_rnn.gemm_flops with 3 gates):
    fwd      2 * 3H (I + H) * N * T           (x W_ih^T and h W_hh^T for every step)
    bwd      2 x fwd;  fwd+bwd  3 x fwd
No byte count: the recurrence re-reads W_hh every step, so no single-pass minimum applies.
"""
from __future__ import annotations

from ._rnn import F32, TINY_LAYERS, RNNLayerSuite, layer_case

# DeepBench's GRU training_set, in its order (hidden, batch, steps)
DEEPBENCH = tuple((2816, 32, t) for t in (750, 375, 187)) + \
    tuple((h, 32, t) for h in (2048, 1536, 2560) for t in (1500, 750, 375, 187)) + \
    ((512, 32, 1), (1024, 32, 1500), (1024, 64, 1500))
QUICK = ((1536, 32, 187), (2048, 32, 375), (2560, 32, 187), (2816, 32, 187), (1024, 64, 1500),
         (512, 32, 1))
FP32 = tuple(s for s in DEEPBENCH if s[2] in (187, 1))


def _case(*shape, **kw):
    return layer_case("gru", *shape, **kw)


SHAPES = {"tiny": TINY_LAYERS, "quick": tuple(_case(*s) for s in QUICK)}
SHAPES["full"] = SHAPES["quick"] + tuple(_case(*s) for s in DEEPBENCH if s not in QUICK) + \
    tuple(_case(*s, dtype=F32, suffix="-fp32") for s in FP32)


class GRUSuite(RNNLayerSuite):
    def __init__(self):
        super().__init__("gru", SHAPES)


SUITES = [GRUSuite()]
