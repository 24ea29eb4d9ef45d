"""What the recurrent suites share (lstm, gru, lstm_cell, gru_cell): the case type, the GEMM
FLOP count per gate count, the one-buffer weight layout of a torch RNN layer, and the layer
suite itself (the lstm and gru modules only declare their shapes and what differs).

Not a suite module (it defines no SUITES). One cell kind is "lstm" (4 gates: i, f, g, o) or
"gru" (3 gates: r, z, n), as torch.nn.LSTM / torch.nn.GRU.

FLOPs count the GEMMs only, multiply-add = 2, as DeepBench and cuDNN's RNN sample do (the
gate nonlinearities, ~10 per gate element, are left out), for G gates:
    fwd      2 * G H (I + H) * N * T      (x W_ih^T and h W_hh^T for every step; T = 1: a cell)
    bwd      2 x fwd: the data gradients (dx, dh through time) and the weight gradients
             (dW_ih, dW_hh), each the size of the forward's products
    fwd+bwd  3 x fwd
"""
from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass

import torch

from pydl.testing import uses_tf32

from .base import Case, Suite, Variant, randn

try:    # registers pydl's lstm, gru, lstm_cell and gru_cell ops; the suites load either way
    import pydl.gru  # noqa: F401
    import pydl.lstm  # noqa: F401
except Exception:  # noqa: BLE001
    pass

F32, F16 = torch.float32, torch.float16
GATES = {"lstm": 4, "gru": 3}
_MODULES = {"lstm": "LSTM", "gru": "GRU"}           # torch.nn's layer class per cell kind
_DIRECTION_FACTOR = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


@dataclass(frozen=True)
class RNNCase(Case):
    """shape = the input: (T, N, I) for a layer, (N, I) for one cell step; `hidden` = H."""
    hidden: int = 0


def gemm_flops(gates: int, input_size: int, hidden: int, batch: int, steps: int,
               direction: str) -> int:
    """The GEMM FLOPs of `steps` steps of a G-gate cell (see the module docstring)."""
    fwd = 2 * gates * hidden * (input_size + hidden) * batch * steps
    return _DIRECTION_FACTOR[direction] * fwd


def init_scale(hidden: int) -> float:
    """torch's RNN init range 1/sqrt(H), used as the weights' std: gates stay unsaturated."""
    return 1.0 / math.sqrt(hidden)


# --- one layer's weights in one buffer --------------------------------------------------------

def weight_shapes(cell: str, input_size: int, hidden: int) -> tuple[tuple[int, ...], ...]:
    """w_ih (GH, I), w_hh (GH, H), b_ih, b_hh (GH,): torch's _flat_weights of one layer."""
    g = GATES[cell] * hidden
    return (g, input_size), (g, hidden), (g,), (g,)


@functools.lru_cache(maxsize=None)
def weight_layout(cell: str, input_size: int, hidden: int, dtype: torch.dtype, device: str
                  ) -> tuple[int, tuple[int, ...]]:
    """(buffer elements, offsets of w_ih, w_hh, b_ih, b_hh) in one buffer, as
    torch.nn.LSTM / torch.nn.GRU lays them out after flatten_parameters() here (cuDNN's layout
    on a GPU); elsewhere, or when torch does not flatten, the four one after another."""
    sizes = [math.prod(s) for s in weight_shapes(cell, input_size, hidden)]
    packed = (sum(sizes), tuple(sum(sizes[:i]) for i in range(4)))
    if torch.device(device).type != "cuda":
        return packed
    with torch.no_grad():
        module = getattr(torch.nn, _MODULES[cell])(input_size, hidden, dtype=dtype, device=device)
    ws = module._flat_weights
    storage = ws[0].untyped_storage()
    if any(w.untyped_storage().data_ptr() != storage.data_ptr() for w in ws):
        return packed        # torch did not flatten (cuDNN off or not acceptable): no layout
    return storage.nbytes() // ws[0].element_size(), tuple(w.storage_offset() for w in ws)


def flat_weights(cell: str, input_size: int, hidden: int, dtype: torch.dtype, device
                 ) -> list[torch.Tensor]:
    """w_ih, w_hh, b_ih, b_hh as views of one new zeroed buffer in `weight_layout`."""
    total, offsets = weight_layout(cell, input_size, hidden, dtype, str(device))
    buf = torch.zeros(total, dtype=dtype, device=device)
    return [buf[o:o + math.prod(s)].view(s)
            for o, s in zip(offsets, weight_shapes(cell, input_size, hidden))]


# --- shapes -------------------------------------------------------------------------------

def layer_case(cell: str, hidden: int, batch: int, steps: int, dtype=F16,
               suffix: str = "") -> RNNCase:
    """A DeepBench training problem (hidden, batch, steps), input size = hidden."""
    return RNNCase(f"h{hidden}-b{batch}-t{steps}" + suffix, (steps, batch, hidden), dtype,
                   f"DeepBench {cell.upper()} training: hidden {hidden}, batch {batch}, "
                   f"{steps} step{'s' if steps != 1 else ''}, input {hidden}", hidden=hidden)


TINY_LAYERS: tuple[RNNCase, ...] = (
    RNNCase("tiny-h8", (4, 2, 8), F32, "emulation check: 4 steps, batch 2, hidden 8", hidden=8),
    RNNCase("tiny-h16-i12", (3, 3, 12), F16,
            "emulation check: 3 steps, batch 3, input 12, hidden 16", hidden=16),
)


# --- the layer suite ----------------------------------------------------------------------------

RECOMPUTE = "-recompute"


class RNNLayerSuite(Suite):
    """A one-layer unidirectional torch.nn.LSTM / torch.nn.GRU layer over (T, N, I), zero
    initial state, output h of every step; inputs x and the layer's four weights, views of
    ONE buffer (`flat_weights`) kept by the copies too, so cuDNN runs on them in place as in a
    real module. Gradients: x and all four weights.

    `recompute` names variants ("triton-persistent") that get a sibling "<name>-recompute":
    the same backend and algo with recompute=True (no gate activations kept between forward
    and backward; its memory saving shows in the rows' peak_mem_bytes, recorded for every
    variant), listed right after it, skipped with it."""

    def __init__(self, cell: str, shape_sets, algos=None, recompute=("triton-persistent",),
                 notes=""):
        # pydl's algorithms (pydl._rnn_launch.ALGOS) on both kernel backends: "persistent",
        # one launch per layer and direction, and "steps", one per time step
        algos = algos or {"triton": ("persistent", "steps"), "numba": ("persistent", "steps")}
        self.cell, self.gates, self.recompute = cell, GATES[cell], tuple(recompute)
        super().__init__(
            op=cell, registry_op=cell, shape_sets=shape_sets, bound="compute",
            differentiable=(0, 1, 2, 3, 4), algos=algos,
            notes=notes or f"one-layer torch.nn.{_MODULES[cell]}(I, H) over (T, N, I), zero "
                           "state; output h of every step; grads of x and the four weights")

    def pydl_algos(self, backend):
        try:
            module = importlib.import_module(f"pydl.{self.cell}")     # pydl.lstm / pydl.gru
            return tuple(module.ALGOS.get(backend, ()))
        except Exception:  # noqa: BLE001
            return None

    def variants(self) -> list[Variant]:
        out = []
        for v in super().variants():
            out.append(v)
            if v.name in self.recompute:
                fn = None if v.skip else self.pydl_fn(v.backend, v.algo, recompute=True)
                out.append(Variant(v.name + RECOMPUTE, fn, v.kind, skip=v.skip,
                                   backend=v.backend, algo=v.algo))
        return out

    def make_inputs(self, case, dtype, device, generator):
        steps, n, i = case.shape
        h = case.hidden
        weights = flat_weights(self.cell, i, h, dtype, device)
        for v in weights:
            v.copy_(randn(v.shape, dtype, device, generator, init_scale(h)))
        x = randn((steps, n, i), dtype, device, generator)
        return (x, *weights)

    def clone_inputs(self, inputs):
        x, w_ih, w_hh = inputs[:3]
        weights = flat_weights(self.cell, w_ih.shape[1], w_hh.shape[1], w_ih.dtype, w_ih.device)
        for v, src in zip(weights, inputs[1:]):
            v.copy_(src.detach())
        # leaves that share one storage, as a torch RNN module's flattened parameters do
        return [x.detach().clone().requires_grad_(True),
                *(v.detach().requires_grad_(True) for v in weights)]

    def pydl_fn(self, backend, algo=None, recompute=False):
        import pydl.functional as F
        layer = getattr(F, self.cell)         # looked up once, as the other suites do

        def fn(x, w_ih, w_hh, b_ih, b_hh):
            return layer(x, None, [w_ih, w_hh, b_ih, b_hh], backend=backend, algo=algo,
                         recompute=recompute)[0]
        return fn

    def torch_fn(self):
        lstm = self.cell == "lstm"

        def fn(x, w_ih, w_hh, b_ih, b_hh):
            """torch.nn.LSTM / GRU's forward on these weights (the torch._VF call it makes);
            in inference mode (cuDNN keeps no reserve) when nothing needs a gradient."""
            h0 = x.new_zeros(1, x.shape[1], w_hh.shape[1])
            ws = [w_ih, w_hh, b_ih, b_hh]
            train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *ws))
            if lstm:
                return torch._VF.lstm(x, (h0, h0), ws, True, 1, 0.0, train, False, False)[0]
            return torch._VF.gru(x, h0, ws, True, 1, 0.0, train, False, False)[0]
        return fn

    def tf32(self, dtype, device):
        # cuDNN's RNN math follows cudnn.allow_tf32
        return dtype == F32 and uses_tf32(device, cudnn=True)

    def reduction_length(self, case):
        return case.shape[2] + case.hidden

    def reduction_lengths(self, case):
        steps, n, i = case.shape
        # output: I + H per step; dx: G H; weight and bias grads: N T rows
        return (i + case.hidden, self.gates * case.hidden) + (n * steps,) * 4

    def flops(self, case, direction):
        steps, n, i = case.shape
        return gemm_flops(self.gates, i, case.hidden, n, steps, direction)
