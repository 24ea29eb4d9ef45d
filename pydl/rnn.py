"""The recurrent layer machinery the LSTM and the GRU share: a multi-layer, bidirectional stack
over a "cell" (pydl/lstm.py LSTMRecurrence, pydl/gru.py GRURecurrence), forward and backward
through time, as one autograd Function over two kernel ops (pydl::rnn_fwd, pydl::rnn_bwd).

Per layer and direction the forward runs the input projection of every step as one GEMM,
    xp = X W_ih^T + b_ih        (T, B, G*H) fp32,
then the cell's recurrence (one launch for the whole sequence by default: pydl/_rnn_launch.py
`schedule`); a call no backward follows runs both, on a long sequence, a chunk of steps at a
time (INFERENCE_CHUNK_BYTES). Dropout multiplies each layer's output but the last on its way
to the next layer (the mask drawn by torch's generator, bernoulli_, as torch's own CPU LSTM
and GRU draw it: the same seed gives torch's mask for a padded input; a packed one draws over
the padded (T, B) rows, where torch draws over the packed rows only, so there the masks
differ; torch's CUDA layers draw with cuDNN's generator, which no other op shares).

The backward walks the layers top down; per direction the cell's backpropagation through
time gives the gradients of the pre-activations of x W_ih^T (dg_ih) and of h W_hh^T (dg_hh,
the same tensor for the LSTM), and then, over every (t, b) row at once:
    dW_ih = dg_ih^T X,   dW_hh = sum_t dg_hh_t^T h_{t-1} (h0 for the first step),
    db_ih, db_hh = column sums,   dX = dg_ih W_ih (both directions summed in fp32).
With recompute=True the forward keeps no gate activations: the backward rebuilds them one
layer and direction at a time, just before that direction's BPTT (every step's starting state
is saved, so all steps are recomputed in two launches) and frees them after.

The launch path (docs/launch-path.md): each kernel op looks its plan up once per call
signature (`_Forward`, `_Backward`, keyed by shapes, strides, options, backend, schedule and
TF32 switch); a plan holds one `Plans` per layer-direction whose launches are built on the
first call and then only launched. A repeated call allocates its outputs and launches.

The cell contract (what a Recurrence provides; each piece a `Plans` subclass made per layer
and direction as Piece(launch, (T, B, H), mode, reverse), `launch` the backend's launcher
class, the cell's subclass of pydl/_rnn_launch.py TritonRNN or NumbaRNN):

    name, gates (G: weight rows per unit), saved_gates (fp32 values saved per unit and
    step), has_cell_state
    Forward().workspace(device, keep) -> (acts, xp): where the recurrence writes the
        activations and where the input projection goes (one buffer, or two)
    Forward()(acts, xp, b_hh, h0, c0, w_hh, w_hr, out, h_n, c_n, bs, keep)
        -> (acts (T, B, saved_gates*H) fp32, cs (T, B, H) fp32 or None, m or None)
        writes out (T, B, P) (a view of the layer's output), h_n (B, P), c_n (B, H);
        keep False (a call no backward follows): acts, cs and m need only hold the running
        state, and what the launch only writes may be a buffer the plan keeps
    Recompute()(xp, b_hh, h0, c0, w_hh, out, cs) -> (acts, m)
    Backward()(acts, cs, h0, c0, out, w_hh, w_hr, d_out, d_hn, d_cn, dh0, dc0, bs)
        -> (dg_ih, dg_hh), each (T, B, G*H) fp32; writes dh0, dc0 where given
Absent tensors are None: h0/c0 (zeros), c0/c_n/cs/dc0 for a cell without a cell state, w_hr
without projections (an LSTM with proj_size: h_t = m_t W_hr^T; m (T, B, H) is saved), d_out
/ d_hn / d_cn without a gradient, bs (the active rows per step of a packed sequence, (T,)
int32 on the device) for a padded batch.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch import Tensor

from . import _env
from ._autograd import without_double_backward
from ._launch import WriteOnly, fresh, new_output, output_maker
from ._library import kernel_op
from ._plan import Cache, apply, capturing, emulated, needs_graph, plain_tensors
from ._rnn_launch import schedule, tf32_key

F32 = torch.float32


@dataclass(frozen=True)
class RNNConfig:
    """The static options of a (multi-layer) LSTM or GRU call."""
    num_layers: int
    bidirectional: bool
    bias: bool
    dropout: float
    training: bool
    algo: str | None
    recompute: bool = False
    proj: bool = False      # an LSTM with projections (torch's proj_size > 0): w_hr per direction

    @property
    def D(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def per_direction(self) -> int:
        return (4 if self.bias else 2) + self.proj

    @property
    def op_args(self) -> tuple[list[int], float, str]:
        """The config as the kernel ops' arguments (int flags, dropout, algo), made once (not
        a functools.cached_property: its lock stops torch.compile's tracing)."""
        try:
            return self.__dict__["_op_args"]
        except KeyError:
            args = _cfg_args(self)
            object.__setattr__(self, "_op_args", args)
            return args


def direction_weights(weights, cfg: RNNConfig, layer: int, d: int):
    """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction; biases None without bias,
    w_hr None without projections."""
    n = (4 if cfg.bias else 2) + cfg.proj       # per_direction, D: without properties (per call)
    base = (layer * (2 if cfg.bidirectional else 1) + d) * n
    if cfg.bias:
        return (weights[base], weights[base + 1], weights[base + 2], weights[base + 3],
                weights[base + n - 1] if cfg.proj else None)
    return weights[base], weights[base + 1], None, None, weights[base + n - 1] if cfg.proj else None


def layer_sizes(weights, cfg: RNNConfig, gates: int) -> tuple[int, int]:
    """(H, P): the hidden size and the width of h (proj_size, or H without projections)."""
    H = weights[0].shape[0] // gates
    return H, (weights[cfg.per_direction - 1].shape[0] if cfg.proj else H)


def at(t: Tensor | None, i: int):
    return t[i] if t is not None else None


def first(t: Tensor | None, i: int):
    """t[i] as a recurrence launch takes it: t itself for i == 0, a stack whose first matrix
    is meant (no view per call; pydl/_rnn_launch.py)."""
    if t is None or i == 0:
        return t
    return t[i]


def seq_rows(t: Tensor) -> Tensor:
    """(T, B, N) as (T*B, N) rows, a view: the sequence buffers here (outputs, workspaces) all
    have a time stride of B times the batch stride."""
    return t.view(t.shape[0] * t.shape[1], t.shape[2])


def steps_after_first(T: int, reverse: bool):
    """For recomputation: (t of the first step in run order, the slice of the other steps,
    the slice of the steps that ran just before each of them)."""
    if reverse:
        return T - 1, slice(0, T - 1), slice(1, T)
    return 0, slice(1, T), slice(0, T - 1)


def cell_grads_fake(x, h, c, w_ih, w_hh, need, gates: int):
    """Fake gradients of a cell's (x, h, c, w_ih, w_hh, b_ih, b_hh): those `need`ed."""
    bias = x.new_empty((gates * w_hh.shape[1],), dtype=w_ih.dtype)
    likes = (x, h, c, w_ih, w_hh, bias, bias)
    return [t.new_empty(t.shape) for t, n in zip(likes, need) if n]


def needed(grads, need) -> list:
    """A backward kernel op's result back in its inputs' order: the gradients it returns are
    the `need`ed ones only (custom ops return tensors, and an empty placeholder per input
    without one costs an allocation a call), None for the others."""
    it = iter(grads)
    return [next(it) if n else None for n in need]


def sig(t: Tensor | None):
    """What a plan's key holds of a tensor argument whose dtype and device the call's checks
    fixed: its shape and strides (None when absent)."""
    return None if t is None else (t.shape, t.stride())


class Plans:
    """Launches built on their first use, by name, then only launched: the pieces of a layer
    plan (one direction's recurrence, a GEMM) and of a cell's plan. Each builds from the first
    call's tensors, whose shapes and strides the enclosing plan's key fixes (pydl/_plan.py);
    `launch` is the backend's launcher class (pydl/_rnn_launch.py TritonRNN, NumbaRNN and the
    cells' subclasses), `dims` the (T, B, H) of a direction, `mode` its schedule."""

    __slots__ = ("launch", "dims", "mode", "reverse", "built")

    def __init__(self, launch, dims: tuple = (), mode: str = "steps", reverse: bool = False):
        self.launch, self.dims, self.mode, self.reverse = launch, dims, mode, reverse
        self.built: dict = {}

    def new(self, name, shape, dtype: torch.dtype, device, stride=None) -> Tensor:
        """A fresh output, its allocation's arguments fixed on first use (`name` says which:
        the shapes are the plan's); `shape` may be a callable, called then only; `stride`:
        output_maker's."""
        make = self.built.get(name)
        if make is None:
            make = self.built[name] = output_maker(shape() if callable(shape) else shape,
                                                   dtype, device, stride=stride)
        return fresh(make)

    def unread(self, name, shape, dtype: torch.dtype, device, stride=None) -> Tensor:
        """A buffer the launch only writes, on a call no backward follows (the gate
        activations then): one the plan keeps (pydl._launch.WriteOnly), not one a call."""
        kept = self.built.get(name)
        if kept is None:
            kept = self.built[name] = WriteOnly(output_maker(shape, dtype, device, stride=stride))
        return kept()

    def _layout(self, name, tensors, first: bool) -> None:
        """Emulation only (where the tests run): a named launch keeps the layout of the
        tensors it was built for (their strides are its arguments, and which of them share a
        buffer its flags: an in-place backward), so a later call under that name with tensors
        laid out otherwise would be read as the first's: fail it here, loudly, where a GPU
        would read the wrong elements."""
        ptrs = [None if t is None else t.untyped_storage().data_ptr() for t in tensors]
        got = tuple(None if t is None else (t.shape, t.stride(), t.dtype, ptrs.index(p))
                    for t, p in zip(tensors, ptrs))     # ptrs.index: which buffer it shares
        if first:
            self.built[("layout", name)] = got
        elif self.built[("layout", name)] != got:
            raise AssertionError(f"rnn plan {name!r} was built for tensors laid out as "
                                 f"{self.built[('layout', name)]}, called with {got}")

    def forward(self, name, *tensors, mode: str | None = None, reverse: bool | None = None):
        """The cell's forward recurrence kernel over `tensors` (its launcher's forward_plan)."""
        rec = self.built.get(name)
        if _env.CHECK_PLANS:
            self._layout(name, tensors, rec is None)
        if rec is None:
            rec = self.built[name] = self.launch.forward_plan(
                mode or self.mode, *tensors, self.reverse if reverse is None else reverse)
        rec(*tensors)

    def backward(self, name, *tensors, model: torch.dtype, mode: str | None = None,
                 reverse: bool | None = None):
        """The cell's backward recurrence kernel (backward_plan)."""
        rec = self.built.get(name)
        if _env.CHECK_PLANS:
            self._layout(name, tensors, rec is None)
        if rec is None:
            rec = self.built[name] = self.launch.backward_plan(
                mode or self.mode, *tensors, self.reverse if reverse is None else reverse, model)
        rec(*tensors)

    def gemm(self, name, a, b, out, addend=None, bias=None, **how):
        """out = op(a) @ op(b) (+ addend) (+ bias) (pydl/_rnn_launch.py TritonRNN.gemm_plan)."""
        plan = self.built.get(name)
        if _env.CHECK_PLANS:
            self._layout(name, (a, b, out, addend, bias), plan is None)
        if plan is None:
            plan = self.built[name] = self.launch.gemm_plan(a, b, out, bias, addend, **how)
        plan(a, b, out, bias, addend)

    def bias_grad(self, name, dg, db1, db2=None):
        """db1 (and db2) = the column sums of dg."""
        plan = self.built.get(name)
        if _env.CHECK_PLANS:
            self._layout(name, (dg, db1, db2), plan is None)
        if plan is None:
            plan = self.built[name] = self.launch.bias_grad_plan(dg, db1, db2)
        plan(dg, db1, db2)

    def mul(self, name, x, s, y):
        """y = x * s (3-D; y may be x)."""
        plan = self.built.get(name)
        if _env.CHECK_PLANS:
            self._layout(name, (x, s, y), plan is None)
        if plan is None:
            plan = self.built[name] = self.launch.mul_plan(x, s, y)
        plan(x, s, y)


# --- the stack as two kernel ops ---------------------------------------------------------------
# Everything the backward reads travels between them as one flat list of tensors ("saved"),
# laid out by _saved_layout, which the real op and the fake one share.

_KINDS: dict[tuple[str, str], tuple[object, object]] = {}   # (op, backend) -> (cell, launcher)

# A call no backward follows projects a direction's input at most this many bytes of fp32 xp
# at a time (chunk_steps, _Forward._chunked): the layer then holds one chunk, not (T, B, G*H).
INFERENCE_CHUNK_BYTES = 128 << 20


def chunk_steps(T: int, B: int, width: int) -> int:
    """The steps a chunk of an inference call's input projection holds: all T unless their
    fp32 (T, B, width) exceeds INFERENCE_CHUNK_BYTES."""
    return max(1, min(T, INFERENCE_CHUNK_BYTES // max(1, 4 * B * width)))


def _cfg_args(cfg: RNNConfig) -> tuple[list[int], float, str]:
    """RNNConfig as custom-op arguments: (int flags, dropout, algo)."""
    return ([cfg.num_layers, int(cfg.bidirectional), int(cfg.bias), int(cfg.training),
             int(cfg.recompute)], float(cfg.dropout), cfg.algo)


def _cfg_from(flags: list[int], dropout: float, algo: str, n_weights: int) -> RNNConfig:
    """The config back from the op's arguments; projections are told by the weight count (one
    more weight per layer and direction: w_hr), as pydl.lstm tells them."""
    L, bidirectional, bias, training, recompute = flags
    per = (4 if bias else 2) * L * (2 if bidirectional else 1)
    return RNNConfig(L, bool(bidirectional), bool(bias), dropout, bool(training), algo,
                     bool(recompute), proj=n_weights != per)


def _dropout_on(cfg: RNNConfig) -> bool:
    return cfg.num_layers > 1 and cfg.dropout > 0 and cfg.training


def _saved_layout(cfg: RNNConfig, cell, T: int, B: int, H: int, P: int, dt: torch.dtype):
    """(shape, dtype) of each tensor the forward passes to the backward, in order: per inner
    layer its output (and with dropout its noise and the dropped output the next layer
    read), then per layer and direction the gate activations (unless recomputed), the
    cell states (LSTM) and, with projections, the unprojected m (unless recomputed)."""
    D = cfg.D
    seq = ((T, B, D * P), dt)
    items = []
    for _ in range(cfg.num_layers - 1):
        items += [seq, seq, seq] if _dropout_on(cfg) else [seq]
    for _ in range(cfg.num_layers * D):
        if not cfg.recompute:
            items.append(((T, B, cell.saved_gates * H), F32))
        if cell.has_cell_state:
            items.append(((T, B, H), F32))
        if cfg.proj and not cfg.recompute:
            items.append(((T, B, H), dt))
    return items


def _unpack(x, last_out, saved, cfg: RNNConfig, cell):
    """The flat saved list back as (inputs, outs, masks, [(acts, cs, m)] per
    layer-direction)."""
    it = iter(saved)
    inputs, outs, masks = [x], [], []
    for _ in range(cfg.num_layers - 1):
        out = next(it)
        outs.append(out)
        if _dropout_on(cfg):
            masks.append(next(it))
            inputs.append(next(it))
        else:
            masks.append(None)
            inputs.append(out)
    outs.append(last_out)
    masks.append(None)
    keep = not cfg.recompute
    per_dir = [(next(it) if keep else None, next(it) if cell.has_cell_state else None,
                next(it) if keep and cfg.proj else None)
               for _ in range(cfg.num_layers * cfg.D)]
    return inputs, outs, masks, per_dir


def _rnn_fwd_fake(x, h0, c0, weights, bs, flags, dropout, algo, op, backend, keep=True):
    cfg, (cell, _) = _cfg_from(flags, dropout, algo, len(weights)), _KINDS[(op, backend)]
    T, B, _ = x.shape
    (H, P), LD = layer_sizes(weights, cfg, cell.gates), cfg.num_layers * cfg.D
    finals = [x.new_empty((LD, B, P))] + ([x.new_empty((LD, B, H))] if cell.has_cell_state else [])
    return (x.new_empty((T, B, cfg.D * P)), finals,
            [x.new_empty(shape, dtype=dtype)
             for shape, dtype in _saved_layout(cfg, cell, T, B, H, P, x.dtype)] if keep else [])


class _Forward:
    """A stack's forward for one call signature (the key of `_rnn_fwd`): per layer and
    direction the input projection's GEMM and the cell's recurrence (pydl/_plan.py's design:
    built on the first call, then only allocations and launches)."""

    def __init__(self, x, weights, flags, dropout, algo, op, backend):
        self.cfg = cfg = _cfg_from(flags, dropout, algo, len(weights))
        self.cell, launch = _KINDS[(op, backend)]
        T, B, _ = x.shape
        self.H, self.P = layer_sizes(weights, cfg, self.cell.gates)
        self.L, self.D = cfg.num_layers, cfg.D
        mode = schedule(cfg.algo, x.device)
        self.dirs = [self.cell.Forward(launch, (T, B, self.H), mode, d == 1)
                     for _ in range(self.L) for d in range(self.D)]
        # a call keeping nothing: the steps of a chunk (T: one), and the chunks' recurrences
        # by (layer-direction, steps, first, last), built on first use
        self.chunk = chunk_steps(T, B, self.cell.gates * self.H)
        self.chunks: dict = {}
        self.launch, self.mode = launch, mode
        # the input projections (by layer-direction; LD + that, a call keeping nothing), dropout
        self.sites = Plans(launch)
        self.dropout = _dropout_on(cfg)
        # what the backward gets of each direction: acts unless recomputed, cs, m (LSTMP)
        self.keep_acts = not cfg.recompute
        self.keep_m = cfg.proj and not cfg.recompute
        LD, dt, dev = self.L * self.D, x.dtype, x.device
        self.new_h_n = output_maker((LD, B, self.P), dt, dev)
        self.new_c_n = output_maker((LD, B, self.H), dt, dev) if self.cell.has_cell_state \
            else None
        self.new_out = output_maker((T, B, self.D * self.P), dt, dev)

    def __call__(self, x, h0, c0, weights, bs, keep: bool = True):
        """(out, finals, saved); keep False (a call no backward follows: LayerPlan's without a
        graph): saved is empty, and each direction's buffers are let go once its recurrence
        is launched, so that the next direction's allocation may reuse them (the caching
        allocator orders the reuse on the stream), and hold only the running state where
        they can (the cell's Forward)."""
        cfg, sites = self.cfg, self.sites
        L, D, P = self.L, self.D, self.P
        LD = L * D
        dt, dev = x.dtype, x.device
        h_n = fresh(self.new_h_n)
        c_n = fresh(self.new_c_n) if self.new_c_n is not None else None
        flat, per_dir = [], []
        inp = x
        for layer in range(L):
            out = fresh(self.new_out)
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh, w_hr = direction_weights(weights, cfg, layer, d)
                idx = layer * D + d
                out_d = out if D == 1 else out[:, :, d * P:(d + 1) * P]
                if not keep and self.chunk < x.shape[0]:
                    self._chunked(idx, inp, w_ih, b_ih, b_hh, first(h0, idx), first(c0, idx),
                                  w_hh, w_hr, out_d, first(h_n, idx), first(c_n, idx), bs)
                    continue
                rec = self.dirs[idx]
                ws, xp = rec.workspace(dev, keep)
                # the projection's plan by xp's layout: index idx, LD + idx without keep
                sites.gemm(idx if keep else LD + idx, inp, w_ih, xp, None, b_ih, trans_b=True,
                           model=dt)
                acts, cs, m = rec(ws, xp, b_hh, first(h0, idx), first(c0, idx), w_hh, w_hr,
                                  out_d, first(h_n, idx), first(c_n, idx), bs, keep)
                if keep:
                    if self.keep_acts:
                        per_dir.append(acts)
                    if cs is not None:
                        per_dir.append(cs)
                    if self.keep_m:
                        per_dir.append(m)
                del ws, xp, acts, cs, m
            if layer == L - 1:
                break
            if keep:
                flat.append(out)
            if self.dropout:
                # torch's CPU dropout: noise = empty_like(out).bernoulli_(1 - p) / (1 - p);
                # p = 1 zeros, drawing nothing (bernoulli(0) / 0 would be NaN)
                noise = (torch.zeros_like(out) if cfg.dropout == 1 else
                         torch.empty_like(out).bernoulli_(1 - cfg.dropout).div_(1 - cfg.dropout))
                dropped = new_output(out.shape, dt, dev)
                sites.mul(-1 - layer, out, noise, dropped)
                if keep:
                    flat += [noise, dropped]
                inp = dropped
            else:
                inp = out
        return out, [h_n] if c_n is None else [h_n, c_n], flat + per_dir

    def _chunked(self, idx, inp, w_ih, b_ih, b_hh, h0, c0, w_hh, w_hr, out, h_n, c_n, bs):
        """One direction of a call keeping nothing whose fp32 input projection would exceed
        INFERENCE_CHUNK_BYTES: the projection and the recurrence a chunk of self.chunk steps
        at a time, in the direction's order, each chunk starting from the state the one before
        ended in (its last output row, and the LSTM's cell state plane), as a step of the
        whole sequence reads them (a packed input's ended rows carry theirs there too): the
        same outputs (bitwise where a chunk's projection GEMM takes the whole one's tile; a
        GPU's tuner may pick another for its rows). Two launches a chunk, each chunk at least
        INFERENCE_CHUNK_BYTES of projection."""
        T, n, dt, dev = inp.shape[0], self.chunk, inp.dtype, inp.device
        reverse = idx % self.D == 1
        starts = range(0, T, n)
        if reverse:
            starts = reversed(starts)
        ws = xp = cs = None
        for k, t0 in enumerate(starts):
            t1 = min(T, t0 + n)
            steps, last = t1 - t0, t1 == T if not reverse else t0 == 0
            key = (idx, steps, k == 0, last)       # the launches' layouts differ by these
            rec = self.chunks.get(key)
            if rec is None:
                rec = self.chunks[key] = self.cell.Forward(
                    self.launch, (steps, out.shape[1], self.H), self.mode, reverse)
            if k:       # where the chunk before ended: its last step's output and cell state
                h0 = out[t0 - 1] if not reverse else out[t1]
                c0 = None if cs is None else cs[0]
            ws = xp = None          # the chunk before's projection goes before this one's
            ws, xp = rec.workspace(dev, False)
            self.sites.gemm(("chunk", idx, steps), inp[t0:t1], w_ih, xp, None, b_ih,
                            trans_b=True, model=dt)
            cs = rec(ws, xp, b_hh, h0, c0, w_hh, w_hr, out[t0:t1], h_n if last else None,
                     c_n if last else None, None if bs is None else bs[t0:t1],
                     False)[1]      # m goes now


_FORWARDS = Cache("rnn layer forward launches")


def _layer_key(x, h0, c0, weights, bs, flags, dropout, algo, op, backend):
    """What a layer plan is built from: the call's shapes and strides, options, backend,
    schedule and TF32 switch. The public op's checks fixed the rest: every tensor has x's
    dtype and device, and x's input size, w_hh's shape and the options give every weight's
    shape."""
    return (op, backend, tuple(flags), dropout, algo, schedule(algo, x.device),
            tf32_key(x.dtype, True), x.shape, x.stride(), x.dtype, x.device, sig(h0), sig(c0),
            bs is None, weights[1].shape, *[w.stride() for w in weights])


@kernel_op("rnn_fwd", _rnn_fwd_fake)
def _rnn_fwd(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], weights: list[Tensor],
             bs: Optional[Tensor], flags: list[int], dropout: float, algo: str, op: str,
             backend: str, keep: bool = True) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """(out, [h_n, c_n] ([h_n] without a cell state), saved) of a whole stack; keep False (a
    call no backward follows): saved is empty, and the stack holds only what it runs on
    (_Forward's keep)."""
    key = _layer_key(x, h0, c0, weights, bs, flags, dropout, algo, op, backend)
    return _FORWARDS.get(key, _Forward, x, weights, flags, dropout, algo, op, backend)(
        x, h0, c0, weights, bs, keep)


def _rnn_bwd_fake(x, h0, c0, last_out, weights, saved, bs, d_out, d_hn, d_cn, need, *rest):
    return [x.new_empty(t.shape, dtype=t.dtype) for t, n in zip((x, h0, c0, *weights), need) if n]


class _Backward:
    """A stack's backward for one call signature (the key of `_rnn_bwd`): the layers top
    down; per direction the cell's BPTT (and first, with recompute, its activations again),
    then the weight, bias and input gradients over every (t, b) row."""

    def __init__(self, x, weights, flags, dropout, algo, op, backend):
        self.cfg = cfg = _cfg_from(flags, dropout, algo, len(weights))
        self.cell, launch = _KINDS[(op, backend)]
        T, B, _ = x.shape
        self.H, self.P = layer_sizes(weights, cfg, self.cell.gates)
        mode = schedule(cfg.algo, x.device)
        dims = (T, B, self.H)
        LD = cfg.num_layers * cfg.D
        self.dirs = [self.cell.Backward(launch, dims, mode, idx % cfg.D == 1)
                     for idx in range(LD)]
        # recomputation of a direction's activations, built on first use: always with
        # recompute, else for a backward after one that overwrote them (retain_graph)
        self.recompute = [None] * LD
        self.launch, self.dims = launch, dims
        self.sites = [Plans(launch, dims, mode, idx % cfg.D == 1) for idx in range(LD)]
        self.layer_sites = Plans(launch)

    def __call__(self, x, h0, c0, last_out, weights, saved, bs, d_out, d_hn, d_cn, need,
                 overwrite: bool = False, gone: bool = False):
        """The `need`ed gradients. overwrite: the saved activations may take the gate
        gradients in their place (nothing reads them after this backward: LayerPlan's eager
        first backward); gone: an earlier backward did that, so they are recomputed first."""
        cfg, cell = self.cfg, self.cell
        inputs, outs, masks, saved = _unpack(x, last_out, saved, cfg, cell)
        L, D, G, H, P = cfg.num_layers, cfg.D, cell.gates, self.H, self.P
        dt, dev = x.dtype, x.device
        dh0 = new_output(h0.shape, h0.dtype, dev) if h0 is not None and need[1] else None
        dc0 = new_output(c0.shape, c0.dtype, dev) if c0 is not None and need[2] else None
        dweights = [None] * len(weights)
        need_w = need[3:]
        for layer in range(L - 1, -1, -1):
            inp, out = inputs[layer], outs[layer]
            # gradient of this layer's input: fp32 below the top, x's dtype for layer 0
            if layer > 0:
                d_in = new_output(inp.shape, F32, dev)
            elif need[0]:
                d_in = new_output(x.shape, dt, dev)
            else:
                d_in = None
            acc = new_output(inp.shape, F32, dev) if d_in is not None and D == 2 else None
            for d in range(D):
                w_ih, w_hh, b_ih, b_hh, w_hr = direction_weights(weights, cfg, layer, d)
                idx = layer * D + d
                sites = self.sites[idx]
                base = idx * cfg.per_direction
                h0_, c0_ = at(h0, idx), at(c0, idx)
                out_d = out if D == 1 else out[:, :, d * P:(d + 1) * P]
                d_out_d = d_out if D == 1 or d_out is None else d_out[:, :, d * P:(d + 1) * P]
                acts, cs, m = saved[idx]
                if gone:
                    acts = None
                own = acts is None
                if own:             # recompute: this layer-direction's activations only
                    redo = self.recompute[idx]
                    if redo is None:
                        redo = self.recompute[idx] = cell.Recompute(
                            self.launch, self.dims, "steps", idx % D == 1)
                    acts, xp = redo.workspace(dev)
                    sites.gemm("xp", inp, w_ih, xp, None, b_ih, trans_b=True, model=dt)
                    acts, m = redo(acts, xp, b_hh, h0_, c0_, w_hh, out_d, cs)
                    del xp
                    if bs is not None and w_hr is not None:
                        # m of the rows a step keeps as they are: 0, as the forward wrote it
                        rows = torch.arange(m.shape[1], device=dev)
                        m.masked_fill_((rows >= bs.unsqueeze(1)).unsqueeze(2), 0)
                # dg_ih: a tensor, or its column blocks ((tensor, first gate row), ...) where
                # the cell wrote the gradients in place of activations that are its own
                dg_ih, dg_hh = self.dirs[idx](
                    acts, cs, h0_, c0_, out_d, w_hh, w_hr, d_out_d, at(d_hn, idx),
                    at(d_cn, idx), at(dh0, idx), at(dc0, idx), bs, in_place=own or overwrite)
                del acts
                if w_hr is not None and need_w[base + cfg.per_direction - 1]:
                    dweights[base + cfg.per_direction - 1] = _grad_w_hr(
                        sites, dg_hh, m, d_out_d, at(d_hn, idx), w_hh, w_hr, bs)
                del m
                # weight gradients: sums over every (t, b) row
                parts = _column_blocks(dg_ih)
                if need_w[base]:
                    dw = new_output(w_ih.shape, w_ih.dtype, dev)
                    for j, (dg, r0) in enumerate(parts):
                        sites.gemm(("dw_ih", j), dg, inp, _rows(dw, r0, dg, parts),
                                   trans_a=True, model=dt)
                    dweights[base] = dw
                if need_w[base + 1]:
                    dweights[base + 1] = _sum_of_products(
                        sites, "dw_hh", _recurrent_terms(dg_hh, out_d, h0_, sites.reverse),
                        w_hh.shape, w_hh.dtype, dev, w_hh.dtype)
                if cfg.bias:
                    _grad_biases(sites, dg_ih, dg_hh, need_w[base + 2], need_w[base + 3],
                                 dweights, base, G * H, b_ih.dtype, dev)
                if d_in is not None:
                    # d_in = sum over directions (and column blocks) of dg_ih W_ih, the sum
                    # in fp32 (acc, or a buffer of its own) until the last product
                    into, addend = d_in if d == D - 1 else acc, None if d == 0 else acc
                    for j, (dg, r0) in enumerate(parts):
                        out_j = into
                        if j < len(parts) - 1:
                            out_j = acc if acc is not None else (
                                d_in if d_in.dtype == F32 else new_output(d_in.shape, F32, dev))
                        sites.gemm(("d_in", j), dg, _rows(w_ih, r0, dg, parts), out_j, addend,
                                   model=dt)
                        addend = out_j
            if layer > 0 and masks[layer - 1] is not None:
                self.layer_sites.mul(layer, d_in, masks[layer - 1], d_in)
            d_out = d_in    # the output gradient of the layer below
        return [t for t, n in zip((d_out, dh0, dc0, *dweights), need) if n]


_BACKWARDS = Cache("rnn layer backward launches")


@kernel_op("rnn_bwd", _rnn_bwd_fake)
def _rnn_bwd(x: Tensor, h0: Optional[Tensor], c0: Optional[Tensor], last_out: Tensor,
             weights: list[Tensor], saved: list[Tensor], bs: Optional[Tensor],
             d_out: Optional[Tensor], d_hn: Optional[Tensor], d_cn: Optional[Tensor],
             need: list[bool], flags: list[int], dropout: float, algo: str, op: str,
             backend: str) -> list[Tensor]:
    """The `need`ed ones of [dx, dh0, dc0, *dweights] (rnn.needed maps them back); d_out,
    d_hn, d_cn None where no gradient reaches that output."""
    key = (_layer_key(x, h0, c0, weights, bs, flags, dropout, algo, op, backend), tuple(need),
           sig(d_out), sig(d_hn), sig(d_cn))
    return _BACKWARDS.get(key, _Backward, x, weights, flags, dropout, algo, op, backend)(
        x, h0, c0, last_out, weights, saved, bs, d_out, d_hn, d_cn, need)


def _column_blocks(dg) -> tuple:
    """A gate gradient as ((tensor, first gate row), ...): its column blocks (the GRU's dgi
    written in place, pydl/gru.py), or the one tensor."""
    return dg if isinstance(dg, tuple) else ((dg, 0),)


def _rows(t, r0: int, dg, parts) -> Tensor:
    """The gate rows of t (a weight, its gradient, a bias gradient) that column block dg,
    starting at gate row r0, multiplies: t itself for a gradient in one block."""
    return t if len(parts) == 1 else t[r0:r0 + dg.shape[2]]


def _grad_biases(sites, dg_ih, dg_hh, need_ih, need_hh, dweights, base, n, dtype, dev):
    """db_ih, db_hh into dweights[base + 2], [base + 3]: column sums of dg_ih (its column
    blocks, _column_blocks) and dg_hh (one pass writes both when they are one tensor, as for
    the LSTM)."""
    dbs = [new_output((n,), dtype, dev) if need else None for need in (need_ih, need_hh)]
    if dg_ih is dg_hh:
        if dbs[0] is not None or dbs[1] is not None:
            first = dbs[0] if dbs[0] is not None else dbs[1]
            sites.bias_grad("db", dg_ih, first, dbs[1] if dbs[0] is not None else None)
    else:
        if dbs[0] is not None:
            parts = _column_blocks(dg_ih)
            for j, (dg, r0) in enumerate(parts):
                sites.bias_grad(("db_ih", j), dg, _rows(dbs[0], r0, dg, parts))
        if dbs[1] is not None:
            sites.bias_grad("db_hh", dg_hh, dbs[1])
    dweights[base + 2], dweights[base + 3] = dbs


class LayerKernels:
    """A stack's kernel ops (pydl::rnn_fwd, pydl::rnn_bwd) for one config on one backend: what
    RNNFunction runs, custom ops under torch.compile. In eager mode a call signature's plan
    (LayerPlan, a subclass) runs the same plans (_Forward, _Backward) without looking them
    up."""

    __slots__ = ("cfg", "op", "backend")

    def __init__(self, cfg: RNNConfig, op: str, backend: str):
        self.cfg, self.op, self.backend = cfg, op, backend

    def forward(self, x, h0, c0, weights, bs, keep: bool = True):
        """(out, [h_n, c_n] ([h_n] without a cell state), saved); keep False: a call no
        backward follows (saved empty)."""
        return _rnn_fwd(x, h0, c0, list(weights), bs, *self.cfg.op_args, self.op, self.backend,
                        keep)

    def backward(self, x, h0, c0, out, weights, saved, bs, d_out, d_hn, d_cn, need, ctx=None):
        """The `need`ed ones of [dx, dh0, dc0, *dweights]; the saved tensors are left as they
        are (the kernel op does not mutate its inputs; `ctx`, the autograd node, is for
        LayerPlan)."""
        return _rnn_bwd(x, h0, c0, out, list(weights), list(saved), bs, d_out, d_hn, d_cn,
                        need, *self.cfg.op_args, self.op, self.backend)


class RNNFunction(torch.autograd.Function):
    """A whole LSTM or GRU stack (ops.op "lstm" or "gru"): x (T, B, I) ->
    (out (T, B, D*H), h_n (L*D, B, H), c_n (L*D, B, H), None for a cell without one).

    h0, c0: (L*D, B, H) or None (zeros). bs: a packed sequence's active rows per step ((T,)
    int32 on x's device) or None. weights: torch's flat order (per layer, per direction:
    w_ih, w_hh[, b_ih, b_hh][, w_hr (P, H): an LSTM with projections, whose out, h0 and h_n
    are P wide instead of H]). Its backward is not differentiable (pydl._autograd); an
    output no gradient reaches gets None there, not zeros (no kernel to make them)."""

    @staticmethod
    def forward(ctx, x, h0, c0, bs, ops: LayerKernels, *weights):
        out, finals, saved = ops.forward(x, h0, c0, weights, bs)
        ctx.save_for_backward(x, h0, c0, bs, out, *weights, *saved)
        ctx.n_weights, ctx.ops = len(weights), ops
        ctx.acts_gone = False       # whether a backward overwrote the saved activations
        ctx.set_materialize_grads(False)
        return out, finals[0], finals[1] if len(finals) == 2 else None

    @staticmethod
    def backward(ctx, d_out, d_hn, d_cn):
        if torch.is_grad_enabled():     # create_graph: the kernels' result is not differentiable
            return without_double_backward(ctx.ops.op, _rnn_backward, ctx, d_out, d_hn, d_cn)
        return _rnn_backward(ctx, d_out, d_hn, d_cn)


def _rnn_backward(ctx, d_out, d_hn, d_cn):
    x, h0, c0, bs, out, *rest = ctx.saved_tensors
    weights, saved = rest[:ctx.n_weights], rest[ctx.n_weights:]
    need = ctx.needs_input_grad
    need = [need[0], need[1] and h0 is not None, need[2] and c0 is not None, *need[5:]]
    grads = ctx.ops.backward(x, h0, c0, out, weights, saved, bs, d_out, d_hn, d_cn, need, ctx)
    dx, dh0, dc0, *dw = needed(grads, need)
    return (dx, dh0, dc0, None, None, *dw)


@emulated("forward", "backward")
class LayerPlan(LayerKernels):
    """A layer call signature's plan (pydl._plan; eager mode, a kernel backend, a padded
    input): its _Forward taken once, its _Backward per need and upstream gradients' strides
    (and, in fp32, TF32 switch). The call's key (pydl/_rnn_checks.py) fixes everything else a
    plan is built from: shapes, strides, dtypes, device, options, the forward's TF32 switch."""

    __slots__ = ("fp32", "fwd", "bwd")

    def __init__(self, cfg: RNNConfig, op: str, backend: str, dtype: torch.dtype):
        super().__init__(cfg, op, backend)
        self.fp32 = dtype == F32
        self.fwd, self.bwd = None, {}

    def __call__(self, x, h0, c0, weights):
        """The layer on x (T, B, I): (out, h_n, c_n or None)."""
        if needs_graph(x, h0, c0, *weights):
            return apply(RNNFunction, x, h0, c0, None, self, *weights)
        out, finals, _ = self.forward(x, h0, c0, weights, None, keep=False)
        return out, finals[0], finals[1] if len(finals) == 2 else None

    def forward(self, x, h0, c0, weights, bs, keep: bool = True):
        plan = self.fwd
        if plan is None:
            args = (*self.cfg.op_args, self.op, self.backend)
            plan = _FORWARDS.get(_layer_key(x, h0, c0, weights, bs, *args), _Forward, x,
                                 weights, *args)
            if not capturing():
                self.fwd = plan
        return plan(x, h0, c0, weights, bs, keep)

    def backward(self, x, h0, c0, out, weights, saved, bs, d_out, d_hn, d_cn, need, ctx):
        """The `need`ed gradients. Without recompute the first backward of a forward (`ctx`,
        its RNNFunction node) writes the gate gradients in place of the saved activations,
        which its BPTT reads last (no gradient buffers: the GRU's dgi and dgh, (T, B, 3H) fp32
        each, the LSTM's dg, (T, B, 4H)); a later one, through a retained graph, finds them
        gone and recomputes them first, as recompute=True always does. (The kernel op,
        LayerKernels', which torch.compile runs, leaves its inputs as they are.) Not while a
        CUDA graph is captured: a captured backward may be replayed on the same saved
        tensors, where the recomputation a later call would add is not in the graph."""
        overwrite, gone = not self.cfg.recompute and not capturing(), False
        if overwrite:
            gone, ctx.acts_gone = ctx.acts_gone, True
        key = (*need, sig(d_out), sig(d_hn), sig(d_cn), overwrite)
        if self.fp32:
            key += (tf32_key(F32, True),)
        plan = self.bwd.get(key)
        if plan is None:
            args = (*self.cfg.op_args, self.op, self.backend)
            # a plan per overwrite (its launches write elsewhere), neither the kernel op's
            plan = _BACKWARDS.get((_layer_key(x, h0, c0, weights, bs, *args), tuple(need),
                                   sig(d_out), sig(d_hn), sig(d_cn), overwrite), _Backward, x,
                                  weights, *args)
            if not capturing():
                self.bwd[key] = plan
        return plan(x, h0, c0, out, weights, saved, bs, d_out, d_hn, d_cn, need, overwrite, gone)


# --- weight gradients summed over time -------------------------------------------------------

def _recurrent_terms(dg, prev, h0, reverse: bool):
    """The (a, b) pairs of sum_t dg_t^T prev(t), prev(t) the sequence `prev` one step earlier
    in run order (prev[t-1], or prev[t+1] in reverse), h0 for the first step (no term if
    None); a (n, B, G) or (B, G) (transposed in the product), b (n, B, N) or (B, N)."""
    T = dg.shape[0]
    terms = []
    if T > 1:
        terms.append((dg[:-1], prev[1:], True) if reverse else (dg[1:], prev[:-1], True))
    if h0 is not None:
        terms.append((dg[T - 1 if reverse else 0], h0, True))
    return terms


def _sum_of_products(sites, name, terms, shape, dtype, dev, model):
    """sum over the terms (a, b, trans_a) of op(a) @ b (summed over the time axis of 3-D
    operands): a new (M, N) tensor of `dtype` (zeros without terms), the terms accumulated
    in fp32, one GEMM each."""
    if not terms:
        return torch.zeros(shape, dtype=dtype, device=dev)
    out = new_output(shape, dtype, dev)
    acc = new_output(shape, F32, dev) if len(terms) > 1 else None
    last = len(terms) - 1
    for j, (a, b, trans_a) in enumerate(terms):
        sites.gemm((name, j), a, b, out if j == last else acc, None if j == 0 else acc,
                   trans_a=trans_a, model=model)
    return out


def at_own_ends(seq: Tensor, bs: Tensor) -> Tensor:
    """seq[L_b - 1, b] for each row b of a packed batch's (T, B, ...) sequence, L_b the row's
    length (the steps whose batch size bs[t] exceeds b): (B, ...), gathered on the device
    (no synchronisation). A sequence's last step, or a reversed direction's first."""
    rows = torch.arange(seq.shape[1], device=seq.device)
    return seq[(bs.unsqueeze(1) > rows).sum(0) - 1, rows]


def _grad_w_hr(sites, dg, m, d_out, d_hn, w_hh, w_hr, bs):
    """dW_hr = sum_t dh_t^T m_t for h_t = m_t W_hr^T, where dh_t = d_out[t] (+ d_hn at the
    last step) + dg_next(t) W_hh (not at the last step). Summed over every (t, b) row without
    building dh: d_out^T M + d_hn^T m_last + W_hh^T Y, Y = sum_t dg_next(t)^T m_t (4H, H)
    fp32, which is dW_hh's sum with m in place of the outputs. A packed batch (bs): m is 0
    past a sequence's end and before a reversed one's start (h is kept there, not
    projected), and m_last is each sequence's own."""
    T = m.shape[0]
    dev, model = m.device, w_hr.dtype
    terms = []
    y_terms = _recurrent_terms(dg, m, None, sites.reverse)
    if y_terms:
        y = _sum_of_products(sites, "y", y_terms, (dg.shape[2], m.shape[2]), F32, dev, model)
        terms.append((w_hh, y, True))
    if d_out is not None:
        terms.append((d_out, m, True))
    if d_hn is not None:
        last = m[0] if sites.reverse else m[T - 1] if bs is None else at_own_ends(m, bs)
        terms.append((d_hn, last, True))
    return _sum_of_products(sites, "dw_hr", terms, w_hr.shape, w_hr.dtype, dev, model)


# --- the layer op on a backend -----------------------------------------------------------------

def layer_impl(op: str, cell, backend: str, launch, algos: tuple[str, ...]):
    """The kernel implementation of a layer op ("lstm", "gru") on `backend`, for the
    registry: impl(x, h0, c0, weights, cfg, packed) -> (out, h_n, c_n or None); packed: None
    or a PackedSequence input's pydl._rnn_checks.Packed (x is then padded). Without a
    gradient to record (pydl._plan.needs_graph) the forward kernel op runs directly."""
    _KINDS[(op, backend)] = (cell, launch)
    _LAYER_ALGOS[(op, backend)] = algos
    has_c = cell.has_cell_state

    def impl(x, h0, c0, weights, cfg: RNNConfig, packed=None):
        bs = packed.bs if packed is not None else None
        cfg = layer_config(op, backend, cfg)
        # eager (a packed input's call): a LayerPlan made for the call, as a padded input's
        eager = not torch.compiler.is_compiling() and plain_tensors(x, h0, c0, *weights)
        ops = LayerPlan(cfg, op, backend, x.dtype) if eager else LayerKernels(cfg, op, backend)
        if needs_graph(x, h0, c0, *weights):
            return apply(RNNFunction, x, h0, c0, bs, ops, *weights)
        out, finals, _ = ops.forward(x, h0, c0, weights, bs, keep=False)  # nothing kept
        return out, finals[0], finals[1] if has_c else None
    _LAYER_IMPLS[(op, backend)] = impl
    return impl


_LAYER_ALGOS: dict[tuple[str, str], tuple[str, ...]] = {}   # (op, backend) -> algorithms
_LAYER_IMPLS: dict[tuple[str, str], object] = {}            # (op, backend) -> layer_impl's


def layer_config(op: str, backend: str, cfg: RNNConfig) -> RNNConfig:
    """cfg with its algorithm resolved on `backend` (the default for None), or ValueError."""
    algos = _LAYER_ALGOS[(op, backend)]
    algo = cfg.algo or algos[0]
    if algo not in algos:
        raise ValueError(f"{op}: algo={cfg.algo!r} is not available on the {backend!r} "
                         f"backend (available: {', '.join(algos)})")
    return cfg if algo == cfg.algo else replace(cfg, algo=algo)


def layer_plan(op: str, backend: str, impl, cfg: RNNConfig, dtype: torch.dtype):
    """The eager plan of a layer call signature (pydl/_rnn_checks.py), where `impl`, the
    registry's implementation, is layer_impl's; None elsewhere (the torch backend, one
    registered in its place)."""
    if impl is not _LAYER_IMPLS.get((op, backend)):
        return None
    return LayerPlan(layer_config(op, backend, cfg), op, backend, dtype)


__all__ = ["RNNConfig", "RNNFunction", "LayerKernels", "LayerPlan", "Plans", "layer_impl",
           "layer_config", "layer_plan", "direction_weights",
           "layer_sizes", "seq_rows", "steps_after_first", "at", "first", "sig",
           "cell_grads_fake", "needed", "at_own_ends"]
