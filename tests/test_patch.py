"""pydl.patch / pydl.unpatch: a torch model's layers swapped in place for pydl.nn's drop-ins
give torch's outputs and gradients, keep their parameters (an optimizer built before patching
keeps training them), hooks and training flags; the report lists exactly what changed and why
the rest did not; unsupported options, subclasses, the ops= filter, bad arguments, unpatch,
patching twice, a bare module as the model.

Shapes stay tiny (emulation runs every kernel on the CPU).
"""
import copy
import inspect
import pickle

import pytest
import torch
from conftest import DEVICE, KERNEL_BACKENDS

import pydl
from pydl.patch import OPS, PatchReport
from pydl.testing import assert_close, random_tensor, uses_tf32

TF32 = uses_tf32(DEVICE, cudnn=True)
REDUCTION = 256   # longest sums: conv 3*3*3, LSTM and attention over 8, grads over the batch


class Net(torch.nn.Module):
    """conv -> max pool -> avg pool -> adaptive avg pool -> LSTM over the 3 pooled rows ->
    self-attention -> linear -> cross-entropy."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.pool = torch.nn.MaxPool2d(2)
        self.avg = torch.nn.AvgPool2d(2, stride=1)
        self.gap = torch.nn.AdaptiveAvgPool2d((3, 1))
        self.lstm = torch.nn.LSTM(4, 8, batch_first=True)
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = torch.nn.Linear(8, 5)
        self.loss = torch.nn.CrossEntropyLoss()

    def forward(self, x, target):
        y = self.pool(torch.relu(self.conv(x)))                 # (N, 4, 4, 4)
        y = self.gap(self.avg(y))                               # (N, 4, 3, 3) -> (N, 4, 3, 1)
        seq, _ = self.lstm(y.flatten(2).transpose(1, 2))        # (N, 3, 8)
        a, _ = self.attn(seq, seq, seq, need_weights=False)
        logits = self.head(a + seq).flatten(0, 1)               # (N * 3, 5)
        return logits, self.loss(logits, target)


EXPECTED = {"conv": ("torch.nn.Conv2d", "pydl.nn.Conv2d"),
            "pool": ("torch.nn.MaxPool2d", "pydl.nn.MaxPool2d"),
            "avg": ("torch.nn.AvgPool2d", "pydl.nn.AvgPool2d"),
            "gap": ("torch.nn.AdaptiveAvgPool2d", "pydl.nn.AdaptiveAvgPool2d"),
            "lstm": ("torch.nn.LSTM", "pydl.nn.LSTM"),
            "attn": ("torch.nn.MultiheadAttention", "pydl.nn.MultiheadAttention"),
            "loss": ("torch.nn.CrossEntropyLoss", "pydl.nn.CrossEntropyLoss")}


def _inputs():
    x = random_tensor((2, 3, 8, 8), torch.float32, DEVICE)
    return x, torch.randint(0, 5, (6,), device=DEVICE)


def _run(model, x, target):
    """(logits, loss, grad of x) after backpropagating loss + mean(logits^2)."""
    x = x.detach().clone().requires_grad_(True)
    logits, loss = model(x, target)
    (loss + logits.square().mean()).backward()
    return logits.detach(), loss.detach(), x.grad


def _classes(model):
    return {name: type(m) for name, m in model.named_modules()}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_patched_model_matches_torch(backend):
    ref = Net().to(DEVICE)
    ref.attn.eval()                          # a mixed training state, to see it kept
    model = copy.deepcopy(ref)
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1)    # built before patching
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    training = {n: m.training for n, m in model.named_modules()}
    state_keys = list(model.state_dict())
    calls = []
    model.conv.register_forward_hook(lambda m, args, out: calls.append(out.shape))

    report = pydl.patch(model, backend=backend)

    assert isinstance(report, PatchReport) and report.action == "patch"
    assert {s.name: (s.torch_type, s.pydl_type) for s in report.patched} == EXPECTED
    assert report.skipped == []
    for name, (_, pydl_type) in EXPECTED.items():
        m = model.get_submodule(name)
        assert f"{type(m).__module__}.{type(m).__name__}" == pydl_type
        assert m.backend == backend
        # the attributes the pydl class adds (its keyword-only constructor arguments), no more
        added = set(vars(m)) - set(vars(ref.get_submodule(name))) - {"_pydl_patch"}
        assert added == {p.name for p in inspect.signature(type(m).__init__).parameters.values()
                         if p.kind is p.KEYWORD_ONLY}
    assert model.conv.algo is None and model.lstm.algo is None
    assert type(model.head) is torch.nn.Linear and type(model) is Net
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert len(list(model.parameters())) == len(params)
    assert {n: m.training for n, m in model.named_modules()} == training
    assert list(model.state_dict()) == state_keys

    x, target = _inputs()
    logits, loss, dx = _run(model, x, target)
    r_logits, r_loss, r_dx = _run(ref, x, target)
    assert calls == [torch.Size((2, 4, 8, 8))]          # the hook survived the swap
    assert_close(logits, r_logits, torch.float32, reduction=REDUCTION, tf32=TF32, name="logits")
    assert_close(loss, r_loss, torch.float32, reduction=REDUCTION, tf32=TF32, name="loss")
    assert_close(dx, r_dx, torch.float32, reduction=REDUCTION, tf32=TF32, name="grad x")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=REDUCTION, tf32=TF32, name=name)

    before = [p.detach().clone() for p in params]
    opt.step()
    ref_opt.step()
    for (name, p), q, b in zip(model.named_parameters(), ref.parameters(), before):
        assert not torch.equal(p, b), f"{name} not updated by the optimizer"
        assert_close(p, q, torch.float32, reduction=REDUCTION, tf32=TF32, name=f"{name} after step")
    # nothing left to warn of on any backend: the numba weights are differentiable too
    assert next(s.note for s in report.patched if s.name == "attn") == ""


def _matches(model, ref, x, reduction: int, grad_reduction: int):
    """model(x) and its gradients (of x and of every parameter, after backpropagating the
    squared output) against the unpatched ref's."""
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out, r_out = model(xa), ref(xb)
    assert_close(out, r_out, torch.float32, reduction=reduction, tf32=TF32)
    out.square().sum().backward()
    r_out.square().sum().backward()
    assert_close(xa.grad, xb.grad, torch.float32, reduction=grad_reduction, tf32=TF32,
                 name="grad x")
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=grad_reduction, tf32=TF32,
                     name=name)


def test_cells_and_softmax_patched():
    """The kinds the model above lacks: LSTMCell, GRUCell, Softmax, LogSoftmax."""
    class Cells(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm_cell = torch.nn.LSTMCell(3, 4)
            self.gru_cell = torch.nn.GRUCell(4, 4, bias=False)
            self.softmax = torch.nn.Softmax(dim=1)
            self.log_softmax = torch.nn.LogSoftmax(dim=-1)

        def forward(self, x):
            h, c = self.lstm_cell(x)
            h = self.gru_cell(h + c)
            return self.softmax(h) + self.log_softmax(h)

    ref = Cells().to(DEVICE)
    model = copy.deepcopy(ref)
    report = pydl.patch(model, backend="triton")
    assert {s.name for s in report.patched} == {"lstm_cell", "gru_cell", "softmax", "log_softmax"}
    assert type(model.gru_cell) is pydl.nn.GRUCell and type(model.softmax) is pydl.nn.Softmax
    _matches(model, ref, random_tensor((2, 3), torch.float32, DEVICE), 16, 64)


def test_one_d_layers_patched():
    """Conv1d, MaxPool1d, AvgPool1d, AdaptiveAvgPool1d: swapped, and the same answers."""
    ref = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 3, padding=1, padding_mode="replicate"),
                              torch.nn.MaxPool1d(2), torch.nn.AvgPool1d(2, stride=1),
                              torch.nn.AdaptiveAvgPool1d(2)).to(DEVICE)
    model = copy.deepcopy(ref)
    report = pydl.patch(model, backend="triton")
    assert [s.pydl_type for s in report.patched] == [
        "pydl.nn.Conv1d", "pydl.nn.MaxPool1d", "pydl.nn.AvgPool1d", "pydl.nn.AdaptiveAvgPool1d"]
    assert report.skipped == []
    _matches(model, ref, random_tensor((2, 3, 9), torch.float32, DEVICE), 9, 16)
    pydl.unpatch(model)
    assert [type(m) for m in model] == [type(m) for m in ref]


def test_unsupported_options_reported_not_patched():
    model = torch.nn.ModuleDict({
        "bias_kv": torch.nn.MultiheadAttention(8, 2, add_bias_kv=True),      # supported
        "zero_attn": torch.nn.MultiheadAttention(8, 2, add_zero_attn=True),  # supported
        "kdim": torch.nn.MultiheadAttention(8, 2, kdim=4, vdim=6),     # supported
        "implicit_dim": torch.nn.Softmax(),                             # supported, warns
        "proj": torch.nn.LSTM(4, 6, proj_size=3),                       # supported
        "f64": torch.nn.Conv2d(2, 2, 1).double(),
        "clash": torch.nn.MaxPool2d(2),
    })
    model["clash"].backend = "mine"
    report = pydl.patch(model, backend="triton")
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"f64", "clash"}
    assert "float64" in reasons["f64"] and "'triton'" in reasons["f64"]
    assert "backend" in reasons["clash"]
    assert [s.name for s in report.patched] == ["bias_kv", "zero_attn", "kdim", "implicit_dim",
                                                "proj"]
    # a packed input with projections runs (one layer call): no limit to report
    assert next(s.note for s in report.patched if s.name == "proj") == ""
    for name in reasons:
        assert type(model[name]).__module__.startswith("torch.")
        assert not hasattr(model[name], "_pydl_patch")
    assert model["clash"].backend == "mine"
    text = str(report)
    assert "kdim: torch.nn.MultiheadAttention -> pydl.nn." in text and "float64" in text

    # float64 is the kernels' limit only: the torch backend takes it
    report = pydl.patch(model, ops="conv2d", backend="torch")
    assert [s.name for s in report.patched] == ["f64"]


def test_subclasses_left_alone():
    class MyConv(torch.nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    class MyPydlConv(pydl.nn.Conv2d):
        pass

    model = torch.nn.Sequential(MyConv(2, 2, 1), MyPydlConv(2, 2, 1), pydl.nn.Conv2d(2, 2, 1),
                                torch.nn.Conv2d(2, 2, 1))
    report = pydl.patch(model)
    assert [s.name for s in report.patched] == ["3"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"0", "1", "2"}
    assert "subclass of torch.nn.Conv2d" in reasons["0"]
    assert "already a pydl module" in reasons["2"]
    assert type(model[0]) is MyConv and type(model[1]) is MyPydlConv
    assert not hasattr(model[0], "backend")
    # unpatch leaves modules built as pydl ones alone
    report = pydl.unpatch(model)
    assert [s.name for s in report.restored] == ["3"]
    assert type(model[3]) is torch.nn.Conv2d and type(model[2]) is pydl.nn.Conv2d
    assert "built as a pydl module" in {s.name: s.reason for s in report.skipped}["2"]


def test_parametrized_modules_patched_with_their_parametrizations():
    """weight_norm / spectral_norm / any register_parametrization: torch gives the module a
    class of its own over Conv2d (LSTM, MultiheadAttention); patch swaps what is under it, each
    call computes the weights through the parametrizations (gradients reach their original
    tensors), and remove_parametrizations and unpatch return to the right classes."""
    from torch.nn.utils import parametrizations, parametrize

    class Twice(torch.nn.Module):
        def forward(self, w):
            return 2 * w

    def build():
        torch.manual_seed(0)
        conv = parametrizations.weight_norm(torch.nn.Conv2d(3, 4, 3, padding=1))
        parametrize.register_parametrization(conv, "bias", Twice())
        lstm = parametrizations.weight_norm(torch.nn.LSTM(4, 5), "weight_hh_l0")
        attn = torch.nn.MultiheadAttention(5, 1)
        parametrize.register_parametrization(attn, "in_proj_weight", Twice())
        return torch.nn.ModuleDict(dict(conv=conv, lstm=lstm, attn=attn)).to(DEVICE)

    def run(m, x):
        y = m["conv"](x).mean((2, 3))[None].expand(3, -1, -1)         # (3, 2, 4)
        seq, _ = m["lstm"](y)
        out, _ = m["attn"](seq, seq, seq, need_weights=False)
        return out

    ref, model = build(), build()
    report = pydl.patch(model, backend="triton")
    assert [s.name for s in report.patched] == ["conv", "lstm", "attn"]
    assert report.skipped == []
    notes = {s.name: s.note for s in report.patched}
    assert "(weight, bias)" in notes["conv"] and "(weight_hh_l0)" in notes["lstm"]
    for name, cls in (("conv", pydl.nn.Conv2d), ("lstm", pydl.nn.LSTM),
                      ("attn", pydl.nn.MultiheadAttention)):
        assert parametrize.type_before_parametrizations(model[name]) is cls
        assert parametrize.is_parametrized(model[name])
    # patch twice: already a pydl module
    assert [s.reason for s in pydl.patch(model).skipped] == \
        ["already a pydl module (patched earlier)"] * 3

    x = random_tensor((2, 3, 6, 6), torch.float32, DEVICE)
    for step in range(2):          # the second after an update of the parametrizations' inputs
        out, r_out = run(model, x), run(ref, x)
        assert_close(out, r_out, torch.float32, reduction=64, tf32=TF32, name=f"out {step}")
        model.zero_grad()
        ref.zero_grad()
        out.square().sum().backward()
        r_out.square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, torch.float32, reduction=64, tf32=TF32, name=name)
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref.parameters()):
                p.add_(0.1 * p.grad)
                q.add_(0.1 * q.grad)

    # torch's remove_parametrizations returns the module to the class under its own: pydl's
    parametrize.remove_parametrizations(model["conv"], "bias")
    assert parametrize.type_before_parametrizations(model["conv"]) is pydl.nn.Conv2d
    restored = pydl.unpatch(model)
    assert [s.name for s in restored.restored] == ["conv", "lstm", "attn"]
    for name, cls in (("conv", torch.nn.Conv2d), ("lstm", torch.nn.LSTM),
                      ("attn", torch.nn.MultiheadAttention)):
        assert parametrize.type_before_parametrizations(model[name]) is cls
        assert parametrize.is_parametrized(model[name]) and not hasattr(model[name], "backend")
    parametrize.remove_parametrizations(model["conv"], "weight")
    assert type(model["conv"]) is torch.nn.Conv2d

    # parametrized after patching: unpatch keeps the parametrization (it dropped the class
    # holding its property, and with it the weight)
    conv = torch.nn.Conv2d(3, 4, 3).to(DEVICE)
    pydl.patch(conv, backend="triton")
    parametrizations.weight_norm(conv)
    before = conv(x)
    assert [s.name for s in pydl.unpatch(conv).restored] == [""]
    assert parametrize.type_before_parametrizations(conv) is torch.nn.Conv2d
    assert_close(conv(x), before, torch.float32, reduction=27, tf32=TF32, name="after unpatch")


def test_ops_filter():
    model = Net()
    report = pydl.patch(model, ops=["conv2d", "LSTM"])
    assert [s.name for s in report.patched] == ["conv", "lstm"]
    assert report.skipped == []
    assert type(model.conv) is pydl.nn.Conv2d and type(model.lstm) is pydl.nn.LSTM
    assert type(model.pool) is torch.nn.MaxPool2d
    assert type(model.attn) is torch.nn.MultiheadAttention
    report = pydl.patch(model, ops="max_pool2d")                 # one name as a string
    assert [s.name for s in report.patched] == ["pool"]
    assert pydl.patch(model, ops=[]).changed == []


def test_bad_arguments():
    model = Net()
    with pytest.raises(ValueError, match="unknown op name.*'conv3d'") as e:
        pydl.patch(model, ops=["conv2d", "conv3d"])
    for op in OPS:
        assert op in str(e.value)
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        pydl.patch(model, backend="cuda")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pydl.patch(lambda x: x)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        pydl.unpatch(None)
    assert _classes(model) == _classes(Net())                     # nothing half-done


def test_unpatch_restores_classes_and_outputs():
    ref = Net().to(DEVICE)
    model = copy.deepcopy(ref)
    pydl.patch(model, backend="triton")
    # a model patched earlier: the record of the original class travels with the model
    for revived in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        report = pydl.unpatch(revived)
        assert report.action == "unpatch" and report.patched == []
        assert {s.name: (s.torch_type, s.pydl_type) for s in report.restored} == EXPECTED
        assert _classes(revived) == _classes(ref)
        for name in EXPECTED:
            m = revived.get_submodule(name)
            assert not {"backend", "algo", "_pydl_patch"} & set(vars(m))
            assert set(vars(m)) == set(vars(ref.get_submodule(name)))
        x, target = _inputs()
        for a, b in zip(_run(revived, x, target), _run(ref, x, target)):
            assert torch.equal(a, b)                             # torch's own ops again
        assert pydl.unpatch(revived).changed == []
    params = list(model.parameters())
    pydl.unpatch(model)
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert _classes(model) == _classes(ref)


def test_patch_twice_is_idempotent():
    model = Net()
    first = pydl.patch(model, backend="numba")
    snapshot = {n: (type(m), dict(vars(m))) for n, m in model.named_modules()}
    second = pydl.patch(model, backend="triton")
    assert second.changed == []
    assert {s.name for s in second.skipped} == {s.name for s in first.patched}
    assert all("already a pydl module (patched earlier)" in s.reason for s in second.skipped)
    assert {n: (type(m), dict(vars(m))) for n, m in model.named_modules()} == snapshot
    assert model.conv.backend == "numba"
    pydl.unpatch(model)
    assert type(model.conv) is torch.nn.Conv2d


def test_model_that_is_itself_a_layer():
    conv = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").to(DEVICE)
    ref = copy.deepcopy(conv)
    report = pydl.patch(conv, backend="triton")
    assert [(s.name, s.pydl_type) for s in report.patched] == [("", "pydl.nn.Conv2d")]
    assert type(conv) is pydl.nn.Conv2d and "(model)" in str(report)
    x = random_tensor((1, 3, 5, 5), torch.float32, DEVICE)
    assert_close(conv(x), ref(x), torch.float32, reduction=27, tf32=TF32)
    assert [s.name for s in pydl.unpatch(conv).restored] == [""]
    assert type(conv) is torch.nn.Conv2d


def test_backend_none_follows_the_call():
    sm = torch.nn.LogSoftmax(dim=-1)
    report = pydl.patch(sm)
    assert report.backend is None and sm.backend is None
    assert "backend=None" in report.summary()
    x = random_tensor((2, 5), torch.float32, DEVICE)
    with pydl.use_backend("torch"):
        assert torch.equal(sm(x), torch.log_softmax(x, -1))


def test_gru_mapping(monkeypatch):
    """pydl.nn.GRU is mapped by name: reported as missing while pydl has none."""
    if hasattr(pydl.nn, "GRU"):
        gru = torch.nn.GRU(3, 4, batch_first=True).to(DEVICE)
        ref = copy.deepcopy(gru)
        report = pydl.patch(gru, backend="triton")
        assert [s.pydl_type for s in report.patched] == ["pydl.nn.GRU"]
        assert type(gru) is pydl.nn.GRU and gru.backend == "triton"
        x = random_tensor((2, 2, 3), torch.float32, DEVICE)
        (out, h_n), (r_out, r_h_n) = gru(x), ref(x)
        assert_close(out, r_out, torch.float32, reduction=16, tf32=TF32, name="output")
        assert_close(h_n, r_h_n, torch.float32, reduction=16, tf32=TF32, name="h_n")
        pydl.unpatch(gru)
        assert type(gru) is torch.nn.GRU
        monkeypatch.delattr(pydl.nn, "GRU")
    gru = torch.nn.GRU(3, 4)
    report = pydl.patch(gru)
    assert report.changed == []
    assert [s.reason for s in report.skipped] == ["pydl has no GRU layer yet (pydl.nn.GRU)"]
    assert type(gru) is torch.nn.GRU


# --- the report promises only what the forward runs ----------------------------------------

def _cnn():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.MaxPool2d(2),
                               torch.nn.AvgPool2d(2), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.LogSoftmax(-1))


@pytest.mark.parametrize("backend", [None, "triton", "numba"])
def test_float64_model_layers_without_parameters_are_not_promised(backend):
    """A float64 model: its pooling and softmax layers see float64 activations, which the
    kernels refuse; they stay torch's (before, they were reported patched and the first
    forward raised TypeError)."""
    model = _cnn().double().to(DEVICE)
    ref = copy.deepcopy(model)
    report = pydl.patch(model, backend=backend)
    assert report.patched == []
    reasons = {s.name: s.reason for s in report.skipped}
    assert set(reasons) == {"0", "1", "2", "3", "5"}
    for name in ("1", "2", "3", "5"):
        assert "float64" in reasons[name] and "this layer has none" in reasons[name]
    x = random_tensor((2, 3, 8, 8), torch.float64, DEVICE)
    assert torch.equal(model(x), ref(x))
    # the torch backend takes float64: everything is swapped
    assert len(pydl.patch(model, backend="torch").patched) == 5


def test_mixed_dtype_model_notes_the_refused_inputs():
    model = torch.nn.Sequential(_cnn(), torch.nn.Linear(4, 2).double())
    report = pydl.patch(model, backend="triton")
    notes = {s.name: s.note for s in report.patched}
    assert set(notes) == {"0.0", "0.1", "0.2", "0.3", "0.5"}
    assert notes["0.0"] == ""                       # the conv's own parameters are float32
    assert "float64 inputs to this layer raise TypeError" in notes["0.1"]
    assert [s.name for s in report.skipped] == []


@pytest.mark.skipif(DEVICE == "cuda", reason="emulation only: on a GPU bf16 is compiled")
def test_bf16_model_in_emulation_not_promised_to_the_triton_interpreter():
    model = _cnn().bfloat16()
    report = pydl.patch(model, backend="triton")
    assert report.patched == [] and len(report.skipped) == 5
    assert all("interpreter computes bfloat16 wrongly" in s.reason for s in report.skipped)
    report = pydl.patch(model, backend="numba")      # the Numba simulator computes bf16
    assert len(report.patched) == 5
    x = random_tensor((2, 3, 8, 8), torch.bfloat16, DEVICE)
    ours = model(x)
    pydl.unpatch(model)
    assert_close(ours, model(x), torch.bfloat16, reduction=27)


def test_transformer_encoder_layer_fast_path_is_reported(monkeypatch):
    """torch's TransformerEncoderLayer runs a fused fast path in eval mode without autograd,
    which never calls its self_attn: the report says so, and it is true."""
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(DEVICE)
    model = torch.nn.ModuleDict({"enc": layer, "mha": torch.nn.MultiheadAttention(8, 2)})
    report = pydl.patch(model, backend="triton")
    notes = {s.name: s.note for s in report.patched}
    note = notes["enc.self_attn"]
    assert "fast path" in note and "set_fastpath_enabled(False)" in note
    assert "fast path" not in notes["mha"]
    assert "enc.self_attn" in str(report) and "fast path" in str(report)

    calls = []
    forward = pydl.nn.MultiheadAttention.forward
    monkeypatch.setattr(pydl.nn.MultiheadAttention, "forward",
                        lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    x = random_tensor((2, 5, 8), torch.float32, DEVICE)
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert calls == [], "the fast path ran: pydl was not called, as the report says"
    layer(x)                                           # grad enabled: the module runs
    assert calls == [1]
    monkeypatch.setattr(torch.backends.mha, "get_fastpath_enabled", lambda: False)
    with torch.no_grad():
        layer(x)
    assert calls == [1, 1]
