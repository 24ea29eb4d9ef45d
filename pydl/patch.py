"""Swap a model's torch.nn layers for pydl.nn's drop-ins, in place, and back.

    report = pydl.patch(model)                                  # every kind pydl replaces
    report = pydl.patch(model, ops=["conv2d", "lstm"], backend="numba")
    print(report)                                               # what changed, what did not and why
    pydl.unpatch(model)                                         # the torch classes again

Each pydl.nn class subclasses the torch class it replaces and keeps that class's attributes,
so patching reassigns the module's class (`module.__class__`) and sets the attributes the pydl
class's constructor adds (its keyword-only arguments: `backend`, plus `algo` / `recompute`
where the class has them, at their defaults). The module object stays the same: its
parameters, buffers, hooks, training flag and state_dict keys are untouched, and an optimizer
that holds the parameters keeps training them.

Only modules whose type is exactly one of the torch classes below are swapped; a subclass (it
may override forward) and a module that already is a pydl one are left alone and reported. A
module with torch parametrizations (`torch.nn.utils.parametrizations.weight_norm`,
`spectral_norm`, `torch.nn.utils.parametrize.register_parametrization`) counts as its class
before them: torch gives such a module a class of its own deriving from that one, which holds
the parametrized tensors' properties and nothing else; patch and unpatch give it the same kind
of class over the pydl (or torch) class, so each call computes the weights through the
parametrizations as before, and `remove_parametrizations` still finds the class to return to.
Before swapping, patch asks the pydl class itself whether it takes the module's options: it
builds the pydl class on the meta device from the module's options (a pydl constructor raises
for what it does not implement, e.g. LSTM proj_size) and checks that the result holds the same
options as the module, so none is dropped silently; then the restrictions pydl's ops apply at
call time (`_call_time_limits`): the dtypes the kernels take, read from the module's own
parameters or, for layers without parameters (pooling, softmax, cross-entropy), from the whole
model's, since those layers see the model's activations. A module that fails is left unpatched
with the reason. A swapped module whose patched forward torch may bypass (a MultiheadAttention
inside a TransformerEncoderLayer: torch's fused inference fast path) says so in its note.

The original class is recorded on the module (the `_pydl_patch` attribute), so `unpatch`
also restores a model patched earlier, deep-copied or pickled.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.nn.utils import parametrize as _parametrize

from . import _env
from . import nn as _pydl_nn
from ._checks import KERNEL_DTYPES
from .backends import _check_name

_MARK = "_pydl_patch"   # module attribute: (original torch class, names of the attributes added)


@dataclass(frozen=True)
class _Kind:
    """One kind of layer pydl replaces: the op name `ops=` selects it by, the torch class, the
    name of the pydl.nn class (looked up at patch time), and the module's constructor options."""
    op: str
    torch_cls: type
    pydl_name: str
    options: Callable[[torch.nn.Module], dict]


def _rnn_options(m) -> dict:
    kw = dict(input_size=m.input_size, hidden_size=m.hidden_size, num_layers=m.num_layers,
              bias=m.bias, batch_first=m.batch_first, dropout=m.dropout,
              bidirectional=m.bidirectional, device="meta")
    if m.mode == "LSTM":
        kw["proj_size"] = m.proj_size
    return kw


def _cell_options(m) -> dict:
    return dict(input_size=m.input_size, hidden_size=m.hidden_size, bias=m.bias, device="meta")


def _conv_options(m) -> dict:
    return dict(in_channels=m.in_channels, out_channels=m.out_channels, kernel_size=m.kernel_size,
                stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                bias=m.bias is not None, padding_mode=m.padding_mode, device="meta")


def _max_pool_options(m) -> dict:
    return dict(kernel_size=m.kernel_size, stride=m.stride, padding=m.padding,
                dilation=m.dilation, return_indices=m.return_indices, ceil_mode=m.ceil_mode)


def _adaptive_options(m) -> dict:
    return dict(output_size=m.output_size)


def _mha_options(m) -> dict:
    return dict(embed_dim=m.embed_dim, num_heads=m.num_heads, dropout=m.dropout,
                bias=m.in_proj_bias is not None, add_bias_kv=m.bias_k is not None,
                add_zero_attn=m.add_zero_attn, kdim=m.kdim, vdim=m.vdim,
                batch_first=m.batch_first, device="meta")


_KINDS: tuple[_Kind, ...] = (
    _Kind("conv2d", torch.nn.Conv2d, "Conv2d", _conv_options),
    _Kind("max_pool2d", torch.nn.MaxPool2d, "MaxPool2d", _max_pool_options),
    _Kind("avg_pool2d", torch.nn.AvgPool2d, "AvgPool2d", lambda m: dict(
        kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
        count_include_pad=m.count_include_pad, divisor_override=m.divisor_override)),
    _Kind("adaptive_avg_pool2d", torch.nn.AdaptiveAvgPool2d, "AdaptiveAvgPool2d",
          _adaptive_options),
    _Kind("conv1d", torch.nn.Conv1d, "Conv1d", _conv_options),
    _Kind("max_pool1d", torch.nn.MaxPool1d, "MaxPool1d", _max_pool_options),
    _Kind("avg_pool1d", torch.nn.AvgPool1d, "AvgPool1d", lambda m: dict(
        kernel_size=m.kernel_size, stride=m.stride, padding=m.padding, ceil_mode=m.ceil_mode,
        count_include_pad=m.count_include_pad)),
    _Kind("adaptive_avg_pool1d", torch.nn.AdaptiveAvgPool1d, "AdaptiveAvgPool1d",
          _adaptive_options),
    _Kind("lstm", torch.nn.LSTM, "LSTM", _rnn_options),
    _Kind("lstm_cell", torch.nn.LSTMCell, "LSTMCell", _cell_options),
    _Kind("gru", torch.nn.GRU, "GRU", _rnn_options),
    _Kind("gru_cell", torch.nn.GRUCell, "GRUCell", _cell_options),
    _Kind("multihead_attention", torch.nn.MultiheadAttention, "MultiheadAttention", _mha_options),
    _Kind("cross_entropy", torch.nn.CrossEntropyLoss, "CrossEntropyLoss", lambda m: dict(
        weight=m.weight, ignore_index=m.ignore_index, reduction=m.reduction,
        label_smoothing=m.label_smoothing)),
    _Kind("softmax", torch.nn.Softmax, "Softmax", lambda m: dict(dim=m.dim)),
    _Kind("log_softmax", torch.nn.LogSoftmax, "LogSoftmax", lambda m: dict(dim=m.dim)),
)

OPS: tuple[str, ...] = tuple(k.op for k in _KINDS)


# --- the report -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Swapped:
    """A module whose class patch (or unpatch) changed; `note` names call-time limits."""
    name: str          # qualified name in the model ("" for the model itself)
    torch_type: str    # e.g. "torch.nn.Conv2d"
    pydl_type: str     # e.g. "pydl.nn.Conv2d"
    note: str = ""


@dataclass(frozen=True)
class Skipped:
    """A module left as it was, and why."""
    name: str
    type: str
    reason: str


@dataclass
class PatchReport:
    """What `patch` or `unpatch` did to a model.

    `changed` lists the modules swapped (patch: torch -> pydl; unpatch: pydl -> torch), with
    `patched` / `restored` as the same list under the action's name; `skipped` the modules
    of a selected kind left as they were, with the reason.
    """
    action: str                                    # "patch" or "unpatch"
    changed: list[Swapped] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    backend: str | None = None                     # patch's backend= (None: chosen per call)

    @property
    def patched(self) -> list[Swapped]:
        return self.changed if self.action == "patch" else []

    @property
    def restored(self) -> list[Swapped]:
        return self.changed if self.action == "unpatch" else []

    def summary(self) -> str:
        """One line: how many modules changed and how many were left."""
        verb = "patched" if self.action == "patch" else "restored"
        extra = f" (backend={self.backend!r})" if self.action == "patch" else ""
        return f"pydl.{self.action}: {len(self.changed)} {verb}{extra}, {len(self.skipped)} skipped"

    def __str__(self) -> str:
        lines = [self.summary()]
        for s in self.changed:
            src, dst = ((s.torch_type, s.pydl_type) if self.action == "patch"
                        else (s.pydl_type, s.torch_type))
            note = f"  [{s.note}]" if s.note else ""
            lines.append(f"  {_display(s.name)}: {src} -> {dst}{note}")
        for s in self.skipped:
            lines.append(f"  {_display(s.name)}: {s.type} left as is: {s.reason}")
        return "\n".join(lines)


def _display(name: str) -> str:
    return name or "(model)"


def _plain_type(m: torch.nn.Module) -> type:
    """m's class, or, for a module whose class torch.nn.utils.parametrize made (a class of its
    own deriving from the module's, with the parametrized tensors' properties and nothing
    else), the class it derives from."""
    cls = type(m)
    if not _parametrize.is_parametrized(m) or len(cls.__bases__) != 1:
        return cls
    own = set(vars(cls)) - {"__module__", "__doc__", "__getstate__", "__deepcopy__"}
    return cls.__bases__[0] if own <= set(m.parametrizations.keys()) else cls


def _set_class(m: torch.nn.Module, base: type) -> None:
    """Give m the class `base`, or, where its class is a parametrized one (_plain_type), a
    parametrized class of `base` holding the same properties, made as torch makes one."""
    if _plain_type(m) is type(m):
        m.__class__ = base
        return
    own = {k: v for k, v in vars(type(m)).items() if k not in ("__dict__", "__weakref__")}
    m.__class__ = type(f"Parametrized{base.__name__}", (base,), own)


def _type_name(cls: type) -> str:
    mod = "torch.nn" if cls.__module__.startswith("torch.nn.modules.") else cls.__module__
    return f"{mod}.{cls.__qualname__}"


# --- what pydl takes --------------------------------------------------------------------------

def _pydl_attributes(pydl_cls: type) -> dict[str, object]:
    """The attributes a pydl.nn class adds to its torch base: its constructor's keyword-only
    arguments (`backend`, `algo`, `recompute`), each with its default."""
    params = inspect.signature(pydl_cls.__init__).parameters.values()
    out = {}
    for p in params:
        if p.kind is inspect.Parameter.KEYWORD_ONLY:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{_type_name(pydl_cls)} has a required keyword-only argument "
                                f"{p.name!r}; patch cannot supply it")
            out[p.name] = p.default
    return out


def _options(m: torch.nn.Module) -> dict[str, object]:
    """A module's plain (non-tensor, public) attributes: the options its constructor stored."""
    return {k: v for k, v in vars(m).items()
            if not k.startswith("_") and k != "training" and not isinstance(v, torch.Tensor)}


def _ask_pydl(kind: _Kind, pydl_cls: type, m: torch.nn.Module, added: Iterable[str]) -> str | None:
    """Build `pydl_cls` on the meta device with `m`'s options: the reason it refuses them, or
    the options it would hold differently, or None when it takes them as they are."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            probe = pydl_cls(**kind.options(m))
    except Exception as e:  # the pydl class's own verdict, whatever it raises
        return f"{_type_name(pydl_cls)} rejects its options: {e}"
    mine = _options(m)
    differ = [k for k, v in _options(probe).items()
              if k not in added and (k not in mine or not _same(mine[k], v))]
    if differ:
        return (f"{_type_name(pydl_cls)} built with the module's options holds them "
                f"differently: " + ", ".join(
                    f"{k} (module: {mine[k]!r}, pydl: {getattr(probe, k)!r})" if k in mine
                    else f"{k} (module: missing, pydl: {getattr(probe, k)!r})" for k in differ))
    return None


def _same(a, b) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except Exception:
        return False


def _model_dtypes(model: torch.nn.Module) -> set[torch.dtype]:
    """The floating dtypes of a model's parameters and buffers: what its activations are."""
    return {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}


def _refused_dtypes(dtypes: set[torch.dtype], backend: str | None) -> str | None:
    """Why `backend`'s kernels (None: any kernel backend, chosen per call) would refuse
    tensors of these dtypes when called, or None."""
    if backend == "torch":
        return None
    where = "the default backend" if backend is None else f"the {backend!r} backend"
    bad = sorted(str(d).replace("torch.", "") for d in dtypes if d not in KERNEL_DTYPES)
    if bad:
        return (f"{', '.join(bad)}: {where}'s kernels take float16, bfloat16 and float32 "
                f"(convert the model, or patch with backend='torch')")
    if torch.bfloat16 in dtypes and _env.INTERPRET and backend in (None, "triton"):
        return (f"bfloat16: in emulation {where} may be 'triton', whose interpreter computes "
                f"bfloat16 wrongly and refuses it (patch with backend='numba' or 'torch', or "
                f"run on a GPU)")
    return None


def _call_time_limits(kind: _Kind, m: torch.nn.Module, backend: str | None,
                      model_dtypes: set[torch.dtype]) -> str | None:
    """Options pydl's constructors accept but its ops reject when the module is called. A
    layer without parameters sees the model's activations: when every floating parameter and
    buffer of the model has a dtype the kernels refuse, so would its inputs."""
    own = {p.dtype for p in m.parameters(recurse=True)}
    if own:
        reason = _refused_dtypes(own, backend)
        return None if reason is None else f"parameters of {reason}"
    reason = _refused_dtypes(model_dtypes, backend)
    if reason is None or _accepted_dtypes(model_dtypes, backend):
        return None
    return (f"the model's parameters are of {reason}; this layer has none and would get the "
            f"model's activations")


def _accepted_dtypes(dtypes: set[torch.dtype], backend: str | None) -> set[torch.dtype]:
    return {d for d in dtypes if _refused_dtypes({d}, backend) is None}


def _dtype_note(m: torch.nn.Module, backend: str | None, model_dtypes: set[torch.dtype]) -> str:
    """For a layer without parameters in a model that mixes dtypes the kernels take with
    others: which inputs will raise."""
    if any(True for _ in m.parameters(recurse=True)):
        return ""
    refused = sorted(str(d).replace("torch.", "") for d in model_dtypes - _accepted_dtypes(
        model_dtypes, backend))
    if not refused:
        return ""
    return (f"the model also holds {', '.join(refused)} parameters: {', '.join(refused)} "
            f"inputs to this layer raise TypeError on the kernel backends")


def _fast_path_parent(parent: torch.nn.Module | None) -> bool:
    """torch.nn.TransformerEncoderLayer's own forward: in eval mode without autograd it runs
    its fused fast path, which reads self_attn's weights and never calls self_attn."""
    return (parent is not None and isinstance(parent, torch.nn.TransformerEncoderLayer)
            and type(parent).forward is torch.nn.TransformerEncoderLayer.forward)


def _parametrized_note(m: torch.nn.Module) -> str:
    if _plain_type(m) is type(m):
        return ""
    return ("its parametrized tensors (" + ", ".join(m.parametrizations.keys()) + ") are "
            "computed by their parametrizations each call, as before")


def _note(kind: _Kind, parent_name: str | None = None,
          parent: torch.nn.Module | None = None) -> str:
    """Where torch may not call the patched module at all."""
    if kind.op == "multihead_attention" and _fast_path_parent(parent):
        return (f"its parent {_display(parent_name)} is a torch.nn.TransformerEncoderLayer, "
                f"whose fused fast path (eval mode with grad disabled, under torch's further "
                f"conditions) computes the layer without calling this module: pydl does not "
                f"run there; it does in training, with grad enabled, or after "
                f"torch.backends.mha.set_fastpath_enabled(False)")
    return ""


# --- patch and unpatch -------------------------------------------------------------------------

def _select(ops) -> list[_Kind]:
    if ops is None:
        return list(_KINDS)
    names = [ops] if isinstance(ops, str) else list(ops)
    by_op = {k.op: k for k in _KINDS}
    unknown = [n for n in names if not isinstance(n, str) or n.lower() not in by_op]
    if unknown:
        raise ValueError(f"patch: unknown op name(s) {', '.join(map(repr, unknown))}; "
                         f"expected some of {', '.join(OPS)}")
    wanted = {n.lower() for n in names}
    return [k for k in _KINDS if k.op in wanted]


def _pydl_classes() -> dict[type, type]:
    """pydl class -> the torch class it replaces, for the pydl.nn classes that exist now."""
    out = {}
    for k in _KINDS:
        cls = getattr(_pydl_nn, k.pydl_name, None)
        if isinstance(cls, type) and issubclass(cls, k.torch_cls):
            out[cls] = k.torch_cls
    return out


def patch(model: torch.nn.Module, ops: str | Iterable[str] | None = None,
          backend: str | None = None) -> PatchReport:
    """Swap, in place, the modules of `model` (the model itself included) whose type is exactly
    a torch class pydl replaces for the pydl.nn class; returns a PatchReport.

    ops:     op names selecting the kinds to swap (see `OPS`: "conv2d", "max_pool2d",
             "avg_pool2d", "adaptive_avg_pool2d", "conv1d", "max_pool1d", "avg_pool1d",
             "adaptive_avg_pool1d", "lstm", "lstm_cell", "gru", "gru_cell",
             "multihead_attention", "cross_entropy", "softmax", "log_softmax"); None = all.
    backend: the `backend=` the swapped modules get: a name in pydl.BACKENDS, or None to let
             each call choose (pydl.use_backend, PYDL_BACKEND, then "triton").

    Parameters, buffers, hooks and the training flag are the module's own and stay. Modules
    already patched are left alone, so patching twice changes nothing; to change the backend
    of a patched model set `module.backend`, or unpatch and patch again.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"patch: model must be a torch.nn.Module, got {type(model).__name__}")
    kinds = _select(ops)
    if backend is not None:
        backend = _check_name(backend, "patch(backend=...)")
    report = PatchReport("patch", backend=backend)
    pydl_classes = _pydl_classes()
    model_dtypes = _model_dtypes(model)
    parents = {f"{name}.{child}" if name else child: (name, m)
               for name, m in model.named_modules() for child, _ in m.named_children()}
    for name, m in model.named_modules():
        cls = _plain_type(m)
        if cls in pydl_classes:
            if any(k.torch_cls is pydl_classes[cls] for k in kinds):
                how = "patched earlier" if _MARK in vars(m) else "built as one"
                report.skipped.append(Skipped(name, _type_name(cls),
                                              f"already a pydl module ({how})"))
            continue
        kind = next((k for k in kinds if cls is k.torch_cls), None)
        if kind is None:
            base = next((k for k in kinds if isinstance(m, k.torch_cls)), None)
            if base is not None and not isinstance(m, tuple(pydl_classes)):
                report.skipped.append(Skipped(
                    name, _type_name(cls), f"a subclass of {_type_name(base.torch_cls)} (it may "
                    f"override forward); patch swaps exact {_type_name(base.torch_cls)} only"))
            elif base is not None:
                report.skipped.append(Skipped(name, _type_name(cls),
                                              "a subclass of a pydl module; left alone"))
            continue
        reason = _patch_one(kind, m, backend, pydl_classes, model_dtypes,
                            *parents.get(name, (None, None)))
        if isinstance(reason, Swapped):
            report.changed.append(Swapped(name, reason.torch_type, reason.pydl_type, reason.note))
        else:
            report.skipped.append(Skipped(name, _type_name(cls), reason))
    return report


def _patch_one(kind: _Kind, m: torch.nn.Module, backend: str | None,
               pydl_classes: dict[type, type], model_dtypes: set[torch.dtype],
               parent_name: str | None, parent: torch.nn.Module | None) -> Swapped | str:
    """Swap one module of exactly `kind.torch_cls`: a Swapped entry, or the reason it was not."""
    pydl_cls = getattr(_pydl_nn, kind.pydl_name, None)
    if pydl_cls is None:
        return f"pydl has no {kind.pydl_name} layer yet (pydl.nn.{kind.pydl_name})"
    if pydl_cls not in pydl_classes:
        return (f"pydl.nn.{kind.pydl_name} does not subclass {_type_name(kind.torch_cls)}, so "
                f"the module's class cannot be swapped in place")
    try:
        added = _pydl_attributes(pydl_cls)
    except TypeError as e:
        return str(e)
    clash = [a for a in added if hasattr(m, a)]
    if clash:
        return (f"the module already has attribute(s) {', '.join(clash)} that "
                f"{_type_name(pydl_cls)} would overwrite")
    reason = _ask_pydl(kind, pydl_cls, m, added) or _call_time_limits(kind, m, backend,
                                                                      model_dtypes)
    if reason:
        return reason
    if "backend" in added:
        added["backend"] = backend
    _set_class(m, pydl_cls)
    for a, v in added.items():
        setattr(m, a, v)
    setattr(m, _MARK, (kind.torch_cls, tuple(added)))
    note = "; ".join(n for n in (_note(kind, parent_name, parent),
                                 _dtype_note(m, backend, model_dtypes), _parametrized_note(m))
                     if n)
    return Swapped("", _type_name(kind.torch_cls), _type_name(pydl_cls), note)


def unpatch(model: torch.nn.Module) -> PatchReport:
    """Restore, in place, every module of `model` that `patch` swapped (in this process or
    before the model was copied or pickled): its torch class back, the pydl-only attributes
    (`backend`, `algo`, ...) removed. pydl.nn modules built as such are left alone and reported.
    Returns a PatchReport (action "unpatch")."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    report = PatchReport("unpatch")
    pydl_classes = _pydl_classes()
    for name, m in model.named_modules():
        mark = vars(m).get(_MARK)
        if mark is None:
            if _plain_type(m) in pydl_classes:
                report.skipped.append(Skipped(name, _type_name(_plain_type(m)),
                                              "built as a pydl module, not by pydl.patch"))
            continue
        torch_cls, added = mark
        pydl_type = _type_name(_plain_type(m))
        _set_class(m, torch_cls)
        for a in added:
            vars(m).pop(a, None)
        del vars(m)[_MARK]
        report.changed.append(Swapped(name, _type_name(torch_cls), pydl_type))
    return report


__all__ = ["patch", "unpatch", "PatchReport", "Swapped", "Skipped", "OPS"]
