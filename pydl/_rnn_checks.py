"""Argument checks the LSTM and GRU share (cells and layers: one wording for one mistake), the
layer's input and output layouts (batch_first, unbatched, PackedSequence) and torch's
weight names. pydl/lstm.py and pydl/gru.py call these before dispatching to a backend.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import PackedSequence

from ._checks import check_tensor
from ._launch import tf32_allowed
from ._library import autocast_inputs
from ._plan import Cache, options_key, plain_tensors, tensors_key
from ._rnn_launch import ALGOS as _LAYER_ALGOS
from ._shapes import positive_int
from .backends import current_backend, dispatch
from .rnn import RNNConfig, layer_plan

# the initial states' names in messages, by layer or cell op
_STATE_NAMES = {"lstm": ("hx[0] (h0)", "hx[1] (c0)"), "gru": ("hx (h0)",),
                "lstm_cell": ("hx[0] (h)", "hx[1] (c)"), "gru_cell": ("hx",)}


def shape_of(t) -> tuple:
    return tuple(t.shape)


def check_same(t, name: str, ref: torch.Tensor, backend: str) -> None:
    check_tensor(t, name, backend)
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but input has {ref.dtype}: all tensors "
                        f"must have one dtype")


def check_cell_weights(w_ih, w_hh, b_ih, b_hh, input, backend: str, gates: int) -> int:
    """Hidden size H from w_hh, with every weight's shape checked against it and the input."""
    for t, name in ((w_ih, "w_ih"), (w_hh, "w_hh")):
        check_same(t, name, input, backend)
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D ({gates}*hidden_size, ...), "
                             f"got shape {shape_of(t)}")
    H = w_hh.shape[1]
    if w_hh.shape[0] != gates * H:
        raise ValueError(f"w_hh must have shape ({gates}*hidden_size, hidden_size) = "
                         f"({gates * H}, {H}), got {shape_of(w_hh)}")
    if w_ih.shape[0] != gates * H:
        raise ValueError(f"w_ih has {w_ih.shape[0]} rows but hidden_size {H} (from w_hh) "
                         f"needs {gates}*{H} = {gates * H}")
    if input.shape[-1] != w_ih.shape[1]:
        raise ValueError(f"input has size {input.shape[-1]} in its last dimension but w_ih "
                         f"expects input_size {w_ih.shape[1]} (w_ih shape {shape_of(w_ih)})")
    for b, name in ((b_ih, "b_ih"), (b_hh, "b_hh")):
        if b is not None:
            check_same(b, name, input, backend)
            if shape_of(b) != (gates * H,):
                raise ValueError(f"{name} must have shape ({gates}*hidden_size,) = ({gates * H},), "
                                 f"got {shape_of(b)}")
    return H


def check_cell_state(s, name: str, input, expected: tuple, backend: str) -> None:
    if s is None:
        return
    check_same(s, name, input, backend)
    if shape_of(s) != expected:
        raise ValueError(f"{name} must have shape {expected} (batch, hidden_size), "
                         f"got {shape_of(s)}")


class CellCall:
    """pydl.lstm_cell / pydl.gru_cell for one call signature, checked once (pydl._plan):
    per call, only the unbatched input's views and the implementation,
    impl(x, *states, w_ih, w_hh, b_ih, b_hh); on a kernel backend in eager mode, for a
    batched input, the signature's plan (`plan`, the cell module's, made here: plan(backend,
    impl, input, w_hh), None where impl is not the module's own; called as impl)."""

    __slots__ = ("impl", "unbatched", "plan")

    def __init__(self, op, gates, plan, input, states, w_ih, w_hh, b_ih, b_hh, backend):
        name, self.impl = dispatch(op, backend, input, w_ih, w_hh,
                                   *[t for t in (*states, b_ih, b_hh)
                                     if isinstance(t, torch.Tensor)])
        check_tensor(input, "input", name, ndims=(1, 2))
        H = check_cell_weights(w_ih, w_hh, b_ih, b_hh, input, name, gates=gates)
        self.unbatched = input.dim() == 1
        expected = (H,) if self.unbatched else (input.shape[0], H)
        for s, n in zip(states, _STATE_NAMES[op]):
            check_cell_state(s, n, input, expected, name)
        self.plan = None
        if not self.unbatched and not torch.compiler.is_compiling() \
                and plain_tensors(input, *states, w_ih, w_hh, b_ih, b_hh):
            self.plan = plan(name, self.impl, input, w_hh)

    def __call__(self, input, states, w_ih, w_hh, b_ih, b_hh):
        if self.plan is not None:
            return self.plan(input, *states, w_ih, w_hh, b_ih, b_hh)
        if not self.unbatched:
            return self.impl(input, *states, w_ih, w_hh, b_ih, b_hh)
        out = self.impl(input.unsqueeze(0), *[None if s is None else s.unsqueeze(0)
                                              for s in states], w_ih, w_hh, b_ih, b_hh)
        return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)


def _cell_key(op, gates, plan, input, states, w_ih, w_hh, b_ih, b_hh, backend):
    """The call signature: what CellCall checks and what the cell's plans are built from (a
    non-tensor argument has no key: it is checked, and refused, every call)."""
    return (op, backend or current_backend(), *tensors_key(input, *states, w_ih, w_hh, b_ih,
                                                          b_hh), tf32_allowed(False))


_CELL_CALLS = Cache("rnn cell calls")


def cell_call(op: str, gates: int, plan, input, states, w_ih, w_hh, b_ih, b_hh, backend):
    """The checked call (CellCall) of pydl.lstm_cell's or pydl.gru_cell's signature, built
    once; states: (h, c) or (h,), None for zeros; plan: the cell's eager plan class."""
    return _CELL_CALLS.call(_cell_key, CellCall, op, gates, plan, input, states, w_ih, w_hh,
                            b_ih, b_hh, backend)


def rnn_weight_names(num_layers: int, bidirectional: bool, bias: bool,
                     proj: bool = False) -> list[str]:
    """torch.nn.LSTM's (and torch.nn.GRU's) parameter names in its flat order (per layer,
    per direction; weight_hr last with projections)."""
    from .reference.lstm import lstm_weight_names as names
    return names(num_layers, bidirectional, bias, proj)


# op -> (what to call one in a message, the torch module whose _flat_weights it takes)
_LAYER_NAMES = {"lstm": ("an LSTM", "torch.nn.LSTM"), "gru": ("a GRU", "torch.nn.GRU")}


class Packed(NamedTuple):
    """A PackedSequence input as the layer runs it: padded to (T, B) in its length-sorted
    order. bs: the active rows of each step ((T,) int32 on the device), rows: the flat (t, b)
    rows of the padded sequence that hold data, in the packed order; batch_sizes, sorted and
    unsorted indices: the PackedSequence's own."""
    bs: torch.Tensor
    rows: torch.Tensor
    batch_sizes: torch.Tensor
    sorted_indices: torch.Tensor | None
    unsorted_indices: torch.Tensor | None


class Layout(NamedTuple):
    """How the caller's input was laid out, to give outputs back the same way."""
    unbatched: bool = False
    batch_first: bool = False
    packed: Packed | None = None


def _pad(data: torch.Tensor, seq: PackedSequence) -> tuple[torch.Tensor, Packed]:
    """The packed data (N, I) as a padded (T, B, I) sequence (zeros past each sequence's end),
    one scatter whatever T, and its Packed description."""
    sizes = seq.batch_sizes.tolist()    # on the CPU, as torch keeps it
    T, B = len(sizes), sizes[0]
    rows = torch.cat([torch.arange(n) + t * B for t, n in enumerate(sizes)]).to(data.device)
    padded = data.new_zeros((T * B, data.shape[1])).index_copy(0, rows, data)
    bs = seq.batch_sizes.to(device=data.device, dtype=torch.int32)
    return padded.view(T, B, -1), Packed(bs, rows, seq.batch_sizes, seq.sorted_indices,
                                         seq.unsorted_indices)


def prepare_layer(op: str, gates: int, input, states, weights, *, num_layers, bias, batch_first,
                  dropout, training, bidirectional, backend, algo, recompute):
    """The argument checks pydl.lstm and pydl.gru share (`gates` = 4 or 3 per hidden unit).

    input: (T, B, I), (B, T, I) with batch_first, unbatched (T, I), or a PackedSequence.
    states: ((tensor or None, its name in messages), ...), the initial states, h first.
    An LSTM's weights may hold one more per layer and direction, w_hr (P, H): an LSTM with
    projections (torch's proj_size P < H), where h0 is (L*D, B, P) and c0 (L*D, B, H).
    Returns (backend name, impl, x (T, B, I), the states as (L*D, B, P or H) or None, cfg,
    layout); call impl(x, *states, weights, cfg, layout.packed).
    """
    a_op, module = _LAYER_NAMES[op]
    num_layers = positive_int(num_layers, "num_layers")
    if not 0.0 <= float(dropout) <= 1.0:
        raise ValueError(f"dropout must be in [0, 1], got {dropout}")
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be a bool, got {type(recompute).__name__}")
    D = 2 if bidirectional else 1
    per = 4 if bias else 2
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights must be a list of tensors ({module}'s _flat_weights), "
                        f"got {type(weights).__name__}")
    names = rnn_weight_names(num_layers, bidirectional, bias)
    proj_names = rnn_weight_names(num_layers, bidirectional, bias, proj=True)
    proj = op == "lstm" and len(weights) == len(proj_names)
    if proj:
        names, per = proj_names, per + 1
    elif len(weights) != len(names):
        with_proj = (f", or {len(proj_names)} with projections (proj_size > 0: "
                     f"{', '.join(proj_names[:per + 1])}, ...)") if op == "lstm" else ""
        raise ValueError(f"weights: expected {len(names)} tensors for num_layers={num_layers}, "
                         f"bidirectional={bidirectional}, bias={bias} "
                         f"({', '.join(names[:per])}, ...)"
                         f"{with_proj}, got {len(weights)}")
    packed = isinstance(input, PackedSequence)
    data = input.data if packed else input
    cast = autocast_inputs(op, data, *weights, *[t for t, _ in states])
    data, weights = cast[0], list(cast[1:1 + len(weights)])
    states = tuple((t, n) for t, (_, n) in zip(cast[1 + len(weights):], states))
    name, impl = dispatch(op, backend, data, *weights,
                          *[s for s, _ in states if isinstance(s, torch.Tensor)])
    if name == "torch" and algo is not None:
        raise ValueError(f"{op}: the torch backend has no algo= choice")
    if name == "torch" and recompute:
        raise ValueError(f"{op}: the torch backend has no recompute= option (it is pydl's "
                         f"kernels' memory saving; torch keeps its own workspace)")
    if packed:
        check_tensor(data, "input (PackedSequence data)", name, ndims=(2,))
        x, rows = _pad(data, input)
        layout = Layout(packed=rows)
        unbatched = False
    else:
        check_tensor(data, "input", name, ndims=(2, 3))
        unbatched = data.dim() == 2
        x = data.unsqueeze(1) if unbatched else (data.transpose(0, 1) if batch_first else data)
        layout = Layout(unbatched=unbatched, batch_first=batch_first)
    T, B, I = x.shape
    if T == 0:
        # torch: "Expected sequence length to be larger than 0 in RNN"
        raise RuntimeError(f"input has sequence length 0 (shape {shape_of(data)}); {a_op} needs "
                           "at least one time step (torch: expected sequence length to be "
                           "larger than 0 in RNN)")
    G = gates
    H = P = None
    # h's width: hidden_size, or proj_size with projections (w_hh is then (G*H, P))
    p_name = "proj_size" if proj else "hidden_size"
    for layer in range(num_layers):
        for d in range(D):
            base = (layer * D + d) * per
            w = weights[base:base + per]
            wn = names[base:base + per]
            for t, n in zip(w, wn):
                check_same(t, f"weights[{names.index(n)}] ({n})", data, name)
            w_ih, w_hh = w[0], w[1]
            if w_hh.dim() != 2:
                raise ValueError(f"{wn[1]} must be 2-D ({G}*hidden_size, {p_name}), "
                                 f"got {shape_of(w_hh)}")
            if H is None:
                P = w_hh.shape[1]
                H = w_hh.shape[0] // G if proj else P
            if shape_of(w_hh) != (G * H, P):
                raise ValueError(f"{wn[1]} must have shape ({G}*hidden_size, {p_name}) = "
                                 f"({G * H}, {P}), got {shape_of(w_hh)}")
            in_size = I if layer == 0 else D * P
            if shape_of(w_ih) != (G * H, in_size):
                what = "input_size" if layer == 0 else f"{D}*{p_name} (the layer below's output)"
                raise ValueError(f"{wn[0]} must have shape ({G}*hidden_size, {what}) = "
                                 f"({G * H}, {in_size}), got {shape_of(w_ih)}"
                                 + (f": input has size {I} in its last dimension"
                                    if layer == 0 else ""))
            for t, n in zip(w[2:4] if bias else (), wn[2:4] if bias else ()):
                if shape_of(t) != (G * H,):
                    raise ValueError(f"{n} must have shape ({G}*hidden_size,) = ({G * H},), "
                                     f"got {shape_of(t)}")
            if proj:
                if shape_of(w[-1]) != (P, H):
                    raise ValueError(f"{wn[-1]} must have shape (proj_size, hidden_size) = "
                                     f"({P}, {H}) ({wn[1]} is ({G}*hidden_size, proj_size) = "
                                     f"{shape_of(w_hh)}), got {shape_of(w[-1])}")
                if P >= H:
                    raise ValueError(f"projections need proj_size < hidden_size (as "
                                     f"torch.nn.LSTM), got proj_size {P} (the columns of {wn[1]}) "
                                     f"and hidden_size {H}")
    out_states = []
    for k, (s, n) in enumerate(states):
        if s is not None:
            width, what = (P, p_name) if k == 0 else (H, "hidden_size")
            expected = (num_layers * D, width) if unbatched else (num_layers * D, B, width)
            check_same(s, n, data, name)
            if packed and s.dim() == 3 and torch.compiler.is_compiling():
                # B, the packed batch, is data (batch_sizes[0]), an unbacked size under
                # torch.compile: the state's batch tells it (no guard on data)
                torch._check(s.shape[1] == B)
            if shape_of(s) != expected:
                raise ValueError(f"{n} must have shape {expected} (num_layers * num_directions, "
                                 f"{'' if unbatched else 'batch, '}{what}), got {shape_of(s)}")
            if unbatched:
                s = s.unsqueeze(1)
            elif packed and input.sorted_indices is not None:
                # the caller's batch order -> the packed (length-sorted) order, as torch.nn.LSTM
                s = s.index_select(1, input.sorted_indices)
        out_states.append(s)
    cfg = RNNConfig(num_layers, bool(bidirectional), bool(bias), float(dropout), bool(training),
                    algo, recompute, proj=proj)
    return name, impl, x, out_states, cfg, layout


class LayerCall:
    """pydl.lstm / pydl.gru for one call signature of a padded (not packed) input, checked
    once by prepare_layer (pydl._plan): per call, only the layout's views and the layer (on a
    kernel backend in eager mode the signature's plan, pydl.rnn.LayerPlan)."""

    __slots__ = ("impl", "cfg", "layout", "n_states", "plan")

    def __init__(self, op, gates, input, states, weights, options):
        named = tuple(zip(states, _STATE_NAMES[op]))
        name, self.impl, _, _, cfg, self.layout = prepare_layer(op, gates, input, named, weights,
                                                                **options)
        # the kernel backends' default algorithm, resolved once (the torch backend has none)
        self.cfg = cfg if cfg.algo is not None else replace(cfg, algo=_LAYER_ALGOS[0])
        self.n_states = len(states)
        self.plan = None
        if not torch.compiler.is_compiling() and plain_tensors(input, *states, *weights):
            self.plan = layer_plan(op, name, self.impl, self.cfg, input.dtype)

    def __call__(self, input, states, weights):
        layout = self.layout
        if layout.unbatched:
            x = input.unsqueeze(1)
            states = [None if s is None else s.unsqueeze(1) for s in states]
        else:
            x = input.transpose(0, 1) if layout.batch_first else input
        h0, c0 = (states[0], states[1]) if self.n_states == 2 else (states[0], None)
        if self.plan is not None:
            out, h_n, c_n = self.plan(x, h0, c0, weights)
        else:
            out, h_n, c_n = self.impl(x, h0, c0, tuple(weights), self.cfg, None)
        return layer_output(out, (h_n, c_n)[:self.n_states], layout)


def _layer_key(op, gates, input, states, weights, options):
    """The call signature: what prepare_layer checks and what the layer's plans are built
    from (a PackedSequence input has no .shape: no key, checked every call)."""
    return (op, options["backend"] or current_backend(), *tensors_key(input, *states, *weights),
            *options_key(*options.values()), tf32_allowed(True))


_LAYER_CALLS = Cache("rnn layer calls")


def run_layer(op: str, gates: int, input, states, weights, **options):
    """prepare_layer, the layer, layer_output: pydl.lstm's and pydl.gru's body, the checks done
    once per call signature. states: the initial states (h0[, c0]), None for zeros."""
    if isinstance(input, PackedSequence):       # padded afresh every call: nothing to keep
        named = tuple(zip(states, _STATE_NAMES[op]))
        name, impl, x, states, cfg, layout = prepare_layer(op, gates, input, named, weights,
                                                           **options)
        h0, c0 = (states[0], states[1]) if len(states) == 2 else (states[0], None)
        out, h_n, c_n = impl(x, h0, c0, tuple(weights), cfg, layout.packed)
        return layer_output(out, (h_n, c_n)[:len(states)], layout)
    if isinstance(weights, tuple):
        weights = list(weights)
    if torch._C._is_any_autocast_enabled() and isinstance(input, torch.Tensor) \
            and isinstance(weights, list):
        input, *cast = autocast_inputs(op, input, *weights, *states)
        weights, states = cast[:len(weights)], tuple(cast[len(weights):])
    call = _LAYER_CALLS.call(_layer_key, LayerCall, op, gates, input, states, weights, options)
    return call(input, states, weights)


def layer_output(out, states, layout: Layout):
    """The layer's output (T, B, D*H) and final states (L*D, B, H) in the caller's layout."""
    p = layout.packed
    if p is not None:
        data = out.reshape(-1, out.shape[2]).index_select(0, p.rows)
        if p.unsorted_indices is not None:
            states = [s.index_select(1, p.unsorted_indices) for s in states]
        return (PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices),
                list(states))
    if layout.unbatched:
        return out.squeeze(1), [s.squeeze(1) for s in states]
    return (out.transpose(0, 1) if layout.batch_first else out), list(states)


__all__ = ["prepare_layer", "layer_output", "run_layer", "LayerCall", "cell_call", "CellCall",
           "check_cell_weights",
           "check_cell_state", "check_same", "rnn_weight_names", "Layout", "Packed"]
