"""LSTM and GRU cells: one fused step, pydl.lstm_cell / pydl.gru_cell against
torch.nn.LSTMCell / torch.nn.GRUCell (the torch._VF.lstm_cell / gru_cell call those modules
make), forward and backward. Two suites, "lstm_cell" and "gru_cell", one definition.

Shapes: one step at DeepBench's RNN training sizes (baidu-research/DeepBench,
code/kernels/rnn_problems.h: `training_set`, its LSTM problems' hidden sizes and batches),
input size = hidden, from a random (h, c) / h state (a step in the middle of a sequence).
    quick  hidden 512 x batch 64, 1024 x 32, 2048 x 16 and 2048 x 128, in fp16 and fp32
    full   hidden 512, 1024, 2048 at batch 16, 32, 64, 128, in fp16 and fp32
    tiny   emulation checks: batch 2 at hidden 8 (fp32), batch 3 at input 12, hidden 16 (fp16)

Inputs: x (N, I), h (N, H), for the LSTM c (N, H), and the cell's separate parameters w_ih
(GH, I), w_hh (GH, H), b_ih, b_hh (GH,) (G = 4 or 3 gates); gradients of all of them (h and c
get theirs as in backpropagation through time). The LSTM cell's output is torch.stack((h1,
c1)), so that one upstream gradient reaches both states as in training through time: the
stack (one small copy forward, views backward) is the same for every variant.

Memory-bound: one step streams the weights (G H (I + H) elements) for G H (I + H) N
multiply-adds, N <= 128 per weight: below any GPU's ridge point, so judged against the
measured copy bandwidth. Minimal bytes, at the case's element size, with W the weights and
biases, S the inputs x, h (, c) and O the outputs h1 (, c1):
    fwd      W + S + O
    bwd      2 W + 2 S + O   (read W and the inputs, write their gradients; read dO)
    fwd+bwd  the sum of the two
FLOPs, as the layer suites (_rnn.gemm_flops with T = 1): fwd 2 G H (I + H) N, bwd 2 x fwd,
fwd+bwd 3 x fwd.

fp32: pydl's cells round fp32 products to TF32 when torch.backends.cudnn.allow_tf32 (torch's
default: True), as its RNN layers do; torch's cells use cuBLAS, which rounds only when
torch.backends.cuda.matmul.allow_tf32 (default: False). The gate allows TF32's error when
either is set; the fp32 speed-ups then compare TF32 with IEEE products (fp16 rows compare
like with like).
"""
from __future__ import annotations

import torch

from pydl.testing import uses_tf32

from ._rnn import F16, F32, GATES, RNNCase, gemm_flops, init_scale
from .base import Suite, dtype_size, randn

HIDDEN = (512, 1024, 2048)
BATCH = (16, 32, 64, 128)
QUICK = ((512, 64), (1024, 32), (2048, 16), (2048, 128))
FULL = tuple((h, n) for h in HIDDEN for n in BATCH)


def _case(cell: str, hidden: int, batch: int, dtype) -> RNNCase:
    suffix = "-fp32" if dtype == F32 else ""
    return RNNCase(f"h{hidden}-b{batch}{suffix}", (batch, hidden), dtype,
                   f"DeepBench RNN training sizes (its LSTM problems): hidden {hidden}, batch "
                   f"{batch}, input {hidden}; one {cell.upper()} step", hidden=hidden)


def _shapes(cell: str) -> dict[str, tuple[RNNCase, ...]]:
    return {
        "tiny": (
            RNNCase("tiny-h8", (2, 8), F32, "emulation check: batch 2, hidden 8", hidden=8),
            RNNCase("tiny-h16-i12", (3, 12), F16,
                    "emulation check: batch 3, input 12, hidden 16", hidden=16),
        ),
        "quick": tuple(_case(cell, *s, d) for d in (F16, F32) for s in QUICK),
        "full": tuple(_case(cell, *s, d) for d in (F16, F32) for s in QUICK) +
                tuple(_case(cell, *s, d) for d in (F16, F32) for s in FULL if s not in QUICK),
    }


class RNNCellSuite(Suite):
    """cell: "lstm" (inputs x, h, c, w_ih, w_hh, b_ih, b_hh; output stack(h1, c1)) or "gru"
    (inputs x, h, w_ih, w_hh, b_ih, b_hh; output h1)."""

    def __init__(self, cell: str):
        self.cell, self.gates = cell, GATES[cell]
        self.states = 2 if cell == "lstm" else 1          # h, c / h
        module = "LSTMCell" if cell == "lstm" else "GRUCell"
        state = "(h, c)" if cell == "lstm" else "h"
        out = "stack(h1, c1)" if cell == "lstm" else "h1"
        super().__init__(
            op=f"{cell}_cell", registry_op=f"{cell}_cell", shape_sets=_shapes(cell),
            bound="memory", differentiable=tuple(range(1 + self.states + 4)),
            notes=f"torch.nn.{module}(I, H), one step from a random {state}; output {out}; "
                  f"grads of x, {state.strip('()')} and the four weights")

    def make_inputs(self, case, dtype, device, generator):
        n, i = case.shape
        h, g = case.hidden, self.gates * case.hidden
        x = randn((n, i), dtype, device, generator)
        states = [randn((n, h), dtype, device, generator, 0.5) for _ in range(self.states)]
        weights = [randn(s, dtype, device, generator, init_scale(h))
                   for s in ((g, i), (g, h), (g,), (g,))]
        return (x, *states, *weights)

    def pydl_fn(self, backend, algo=None):
        if self.cell == "lstm":
            def op(x, h, c, w_ih, w_hh, b_ih, b_hh):
                from pydl.functional import lstm_cell
                return lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh, backend=backend)

            def fn(*args):
                return torch.stack(op(*args))
            fn.op = op      # the op alone, as `bench overhead` times it (not the stack)
        else:
            def fn(x, h, w_ih, w_hh, b_ih, b_hh):
                from pydl.functional import gru_cell
                return gru_cell(x, h, w_ih, w_hh, b_ih, b_hh, backend=backend)
        return fn

    def torch_fn(self):
        if self.cell == "lstm":
            def fn(x, h, c, w_ih, w_hh, b_ih, b_hh):
                return torch.stack(torch._VF.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh))
        else:
            def fn(x, h, w_ih, w_hh, b_ih, b_hh):
                return torch._VF.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh)
        return fn

    def tf32(self, dtype, device):
        # pydl's side follows cudnn.allow_tf32, torch's cuBLAS matmul.allow_tf32 (docstring)
        return dtype == F32 and (uses_tf32(device, cudnn=True) or uses_tf32(device, cudnn=False))

    def reduction_length(self, case):
        return case.shape[1] + case.hidden

    def reduction_lengths(self, case):
        n, i = case.shape
        g = self.gates * case.hidden
        # output: I + H; dx, dh: G H; dc (elementwise, through gates of I + H terms): I + H;
        # weight and bias grads: N rows
        return (i + case.hidden, g, g) + ((i + case.hidden,) if self.states == 2 else ()) + \
            (n,) * 4

    def flops(self, case, direction):
        n, i = case.shape
        return gemm_flops(self.gates, i, case.hidden, n, 1, direction)

    def bytes(self, case, dtype, direction):
        n, i = case.shape
        h, g = case.hidden, self.gates * case.hidden
        w = g * (i + h) + 2 * g
        s = n * (i + self.states * h)
        o = n * self.states * h
        elems = {"fwd": w + s + o, "bwd": 2 * w + 2 * s + o}
        elems["fwd+bwd"] = elems["fwd"] + elems["bwd"]
        return dtype_size(dtype) * elems[direction]


SUITES = [RNNCellSuite("lstm"), RNNCellSuite("gru")]
