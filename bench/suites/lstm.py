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
reserve for backward then.

Variants: pydl's algorithms (pydl.lstm.ALGOS): "triton-steps" and "numba-steps" (one fused
kernel per time step after one GEMM for the input projection of all steps) and
"triton-persistent" (one launch for the whole sequence; hidden <= 64 only, so skipped for
DeepBench's sizes and run on the tiny set); "torch" is torch's LSTM (cuDNN on a GPU).

Compute-bound: judged against the measured bf16 matmul rate (DeepBench's shapes are fp16/fp32:
fp16 runs at the same tensor-core rate as bf16). FLOPs count the GEMMs only, multiply-add = 2,
as DeepBench and cuDNN's RNN sample do (the gate nonlinearities, ~10 per gate element, are
left out):
    fwd      2 * 4H (I + H) * N * T           (x W_ih^T and h W_hh^T for every step)
    bwd      2 x fwd: the data gradients (dx, dh through time) and the weight gradients
             (dW_ih, dW_hh), each the size of the forward's products
    fwd+bwd  3 x fwd
No byte count: the recurrence re-reads W_hh every step, so no single-pass minimum applies.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .base import Case, Suite, randn

try:    # registers pydl's "lstm" op where pydl has it; the suite loads either way
    import pydl.lstm  # noqa: F401
except Exception:  # noqa: BLE001
    pass

F32, F16 = torch.float32, torch.float16


@dataclass(frozen=True)
class LSTMCase(Case):
    """shape = the input (T, N, I); `hidden` = H."""
    hidden: int = 0


def _case(hidden: int, batch: int, steps: int, dtype=F16, suffix="") -> LSTMCase:
    return LSTMCase(f"h{hidden}-b{batch}-t{steps}" + suffix, (steps, batch, hidden), dtype,
                    f"DeepBench LSTM training: hidden {hidden}, batch {batch}, {steps} steps, "
                    f"input {hidden}", hidden=hidden)


REQUESTED = tuple((h, n, 25) for h in (512, 1024, 2048) for n in (16, 32, 64, 128)) + \
    tuple((256, n, 150) for n in (16, 32, 64))
REST_OF_DEEPBENCH = tuple((4096, n, 25) for n in (16, 32, 64, 128)) + \
    tuple((1536, n, 50) for n in (8, 16, 32))
QUICK = ((512, 64, 25), (1024, 32, 25), (2048, 16, 25), (2048, 128, 25), (256, 32, 150))

SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        LSTMCase("tiny-h8", (4, 2, 8), F32, "emulation check: 4 steps, batch 2, hidden 8",
                 hidden=8),
        LSTMCase("tiny-h16-i12", (3, 3, 12), F16,
                 "emulation check: 3 steps, batch 3, input 12, hidden 16", hidden=16),
    ),
    "quick": tuple(_case(*s) for s in QUICK),
}
SHAPES["full"] = SHAPES["quick"] + tuple(_case(*s) for s in REQUESTED if s not in QUICK) + \
    tuple(_case(*s) for s in REST_OF_DEEPBENCH) + tuple(_case(*s, F32, "-fp32") for s in REQUESTED)


@functools.lru_cache(maxsize=None)
def weight_layout(input_size: int, hidden: int, dtype: torch.dtype, device: str
                  ) -> tuple[int, tuple[int, int, int, int]]:
    """(buffer elements, offsets of w_ih, w_hh, b_ih, b_hh) in one buffer, as torch.nn.LSTM
    lays them out after flatten_parameters() here (cuDNN's layout on a GPU); elsewhere, or
    when torch does not flatten, the four one after another."""
    sizes = (4 * hidden * input_size, 4 * hidden * hidden, 4 * hidden, 4 * hidden)
    packed = (sum(sizes), tuple(sum(sizes[:i]) for i in range(4)))
    if torch.device(device).type != "cuda":
        return packed
    with torch.no_grad():
        module = torch.nn.LSTM(input_size, hidden, dtype=dtype, device=device)
    ws = module._flat_weights
    storage = ws[0].untyped_storage()
    if any(w.untyped_storage().data_ptr() != storage.data_ptr() for w in ws):
        return packed        # torch did not flatten (cuDNN off or not acceptable): no layout
    return storage.nbytes() // ws[0].element_size(), tuple(w.storage_offset() for w in ws)


def _views(buf: torch.Tensor, input_size: int, hidden: int, offsets) -> list[torch.Tensor]:
    shapes = ((4 * hidden, input_size), (4 * hidden, hidden), (4 * hidden,), (4 * hidden,))
    return [buf[o:o + math.prod(s)].view(s) for o, s in zip(offsets, shapes)]


def _torch_lstm(x, w_ih, w_hh, b_ih, b_hh):
    """torch.nn.LSTM's forward on these weights (the same torch._VF.lstm call it makes)."""
    h0 = x.new_zeros(1, x.shape[1], w_hh.shape[1])
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, w_ih, w_hh, b_ih, b_hh))
    out, _, _ = torch._VF.lstm(x, (h0, h0), [w_ih, w_hh, b_ih, b_hh], True, 1, 0.0, train,
                               False, False)
    return out


class LSTMSuite(Suite):
    def __init__(self):
        super().__init__(
            op="lstm", registry_op="lstm", shape_sets=SHAPES, bound="compute",
            differentiable=(0, 1, 2, 3, 4),
            notes="one-layer torch.nn.LSTM(I, H) over (T, N, I), zero state; output h of "
                  "every step; grads of x and the four weights",
            algos={"triton": ("steps", "persistent"), "numba": ("steps",)})

    def pydl_algos(self, backend):
        try:
            from pydl.lstm import ALGOS
        except Exception:  # noqa: BLE001
            return None
        return tuple(ALGOS.get(backend, ()))

    def unsupported(self, case, dtype, variant):
        if variant.algo == "persistent":
            try:
                from pydl.lstm import PERSISTENT_MAX_HIDDEN as limit
            except Exception:  # noqa: BLE001
                limit = 64
            if case.hidden > limit:
                return (f"algo='persistent' keeps W_hh in registers: hidden <= {limit}, "
                        f"this case has {case.hidden}")
        return None

    def make_inputs(self, case, dtype, device, generator):
        steps, n, i = case.shape
        h = case.hidden
        total, offsets = weight_layout(i, h, dtype, str(device))
        buf = torch.zeros(total, dtype=dtype, device=device)
        scale = 1.0 / math.sqrt(h)        # torch's init range: gates stay unsaturated
        for v in _views(buf, i, h, offsets):
            v.copy_(randn(v.shape, dtype, device, generator, scale))
        x = randn((steps, n, i), dtype, device, generator)
        return (x, *_views(buf, i, h, offsets))

    def clone_inputs(self, inputs):
        x, w_ih, w_hh = inputs[:3]
        i, h = w_ih.shape[1], w_hh.shape[1]
        total, offsets = weight_layout(i, h, w_ih.dtype, str(w_ih.device))
        buf = torch.zeros(total, dtype=w_ih.dtype, device=w_ih.device)
        weights = _views(buf, i, h, offsets)
        for v, src in zip(weights, inputs[1:]):
            v.copy_(src.detach())
        # leaves that share one storage, as an nn.LSTM's flattened parameters do
        return [x.detach().clone().requires_grad_(True),
                *(v.detach().requires_grad_(True) for v in weights)]

    def pydl_fn(self, backend, algo=None):
        def fn(x, w_ih, w_hh, b_ih, b_hh):
            from pydl.functional import lstm
            return lstm(x, None, [w_ih, w_hh, b_ih, b_hh], backend=backend, algo=algo)[0]
        return fn

    def torch_fn(self):
        return _torch_lstm

    def tf32(self, dtype, device):
        # pydl's LSTM GEMMs follow cudnn.allow_tf32, as cuDNN's RNN math does
        return dtype == F32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32

    def reduction_length(self, case):
        return case.shape[2] + case.hidden

    def reduction_lengths(self, case):
        steps, n, i = case.shape
        h = case.hidden
        # output: I + H per step; dx: 4H; weight and bias grads: N T rows
        return (i + h, 4 * h, n * steps, n * steps, n * steps, n * steps)

    def flops(self, case, direction):
        steps, n, i = case.shape
        fwd = 2 * 4 * case.hidden * (i + case.hidden) * n * steps
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[direction]


SUITES = [LSTMSuite()]
