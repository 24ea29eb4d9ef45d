"""GRU cell and layer kernels against the float64 reference and torch: forward, every gradient,
both backends and both ways of launching the layer's recurrence (tests/rnn_checks.py), fp16,
batch 1, sequence length 1, a hidden size that is not a block multiple, two layers,
bidirectional, batch_first, absent state and biases, dropout, the nn drop-ins, bad input.
What the LSTM and the GRU share: tests/test_rnn.py.
"""
import pytest
import torch
from conftest import DEVICE, DTYPES, KERNEL_BACKENDS
from rnn_checks import (
    TF32,
    cell_case_id,
    check_cell,
    check_dropout_between_layers,
    check_layer,
    check_module_drop_in,
)

import pydl
from pydl.testing import assert_close, random_tensor

backends = pytest.mark.parametrize("backend", KERNEL_BACKENDS)
dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=str)


# --- the cell -------------------------------------------------------------------------------

# (B, I, H, bias, with_state)
GRU_CASES = [
    (3, 7, 5, True, True),
    (1, 4, 13, False, True),      # batch 1, hidden 13, no bias
    (2, 3, 6, True, False),       # hx=None
]


@backends
@dtypes
@pytest.mark.parametrize("case", GRU_CASES, ids=cell_case_id)
def test_gru_cell(backend, dtype, case):
    check_cell("gru", backend, dtype, *case)


@backends
def test_gru_cell_module_is_drop_in(backend):
    theirs = torch.nn.GRUCell(4, 6).to(DEVICE)
    ours = pydl.nn.GRUCell(4, 6, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.GRUCell)
    x = random_tensor((2, 4), torch.float32, DEVICE)
    h = random_tensor((2, 6), torch.float32, DEVICE)
    for h_ in (h, None):
        assert_close(ours(x, h_), theirs(x, h_), torch.float32, reduction=10, tf32=TF32)
    ours(x, h).square().sum().backward()
    theirs(x, h).square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert_close(p.grad, q.grad, torch.float32, reduction=2 * 10, tf32=TF32, name=name)
    assert_close(ours(x[0], h[0]), theirs(x[0], h[0]), torch.float32, reduction=10, tf32=TF32)


@backends
def test_gru_cell_bad_input(backend):
    x = random_tensor((2, 4), torch.float32, DEVICE)
    w_ih = random_tensor((15, 4), torch.float32, DEVICE)
    w_hh = random_tensor((15, 5), torch.float32, DEVICE)
    h = random_tensor((2, 5), torch.float32, DEVICE)
    gru = lambda *a, **k: pydl.gru_cell(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match="input has size 3 .* w_ih expects input_size 4"):
        gru(x[:, :3], h, w_ih, w_hh)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(3\*hidden_size, hidden_size\)"):
        gru(x, h, w_ih, w_hh[:12])
    with pytest.raises(ValueError, match=r"hx must have shape \(2, 5\)"):
        gru(x, h[:, :4], w_ih, w_hh)
    with pytest.raises(TypeError, match="hx must be a tensor or None"):
        gru(x, (h, h), w_ih, w_hh)


# --- the layer ------------------------------------------------------------------------------

# (T, B, I, H, layers, bidirectional, batch_first, with_state, bias); the Numba simulator runs
# the marked few, and one-launch-per-step ("steps") a few more
GRU_LAYER_CASES = {
    "T3-B2-H5": (3, 2, 4, 5, 1, False, False, True, True),
    "T1-B1-H7": (1, 1, 3, 7, 1, False, False, True, True),          # one step, batch 1
    "nostate-nobias": (3, 2, 3, 6, 1, False, False, False, False),
    "2layers-bidir-batch_first": (2, 2, 3, 5, 2, True, True, True, True),
    "bidir-H13": (2, 2, 4, 13, 1, True, False, True, True),         # hidden not a block multiple
}
GRU_NUMBA_CASES = ("T1-B1-H7", "nostate-nobias", "2layers-bidir-batch_first")
GRU_STEPS_CASES = ("T3-B2-H5", "nostate-nobias", "bidir-H13")


@pytest.mark.parametrize("backend,algo,case",
                         [("triton", None, c) for c in GRU_LAYER_CASES]
                         + [("triton", "steps", c) for c in GRU_STEPS_CASES]
                         + [("numba", None, c) for c in GRU_NUMBA_CASES]
                         + [("numba", "steps", "nostate-nobias")])
def test_gru(backend, algo, case):
    check_layer(backend, algo, torch.float32, *GRU_LAYER_CASES[case], kind="gru")


@pytest.mark.parametrize("algo", [None, "steps"])
def test_gru_many_tiles(algo):
    """Hidden 72 and batch 18: several unit blocks and two row blocks per step."""
    check_layer("triton", algo, torch.float32, 3, 18, 5, 72, 1, False, kind="gru")


@backends
def test_gru_half(backend):
    check_layer(backend, None, torch.float16, 2, 2, 3, 5, 1, True, False, True, True, kind="gru")


def test_gru_unbatched():
    check_layer("triton", None, torch.float32, 3, 1, 4, 5, 1, False, unbatched=True, kind="gru")


@backends
def test_gru_module_is_drop_in(backend):
    kw = dict(input_size=4, hidden_size=6, num_layers=2, bidirectional=True, batch_first=True)
    check_module_drop_in("GRU", backend, kw, random_tensor((2, 3, 4), torch.float32, DEVICE),
                         random_tensor((4, 2, 6), torch.float32, DEVICE))


@backends
def test_gru_dropout_between_layers(backend):
    check_dropout_between_layers("GRU", backend)


@backends
def test_gru_bad_input(backend):
    T, B, I, H = 3, 2, 4, 5
    m = torch.nn.GRU(I, H, 2).to(DEVICE)
    w = list(m._flat_weights)
    x = random_tensor((T, B, I), torch.float32, DEVICE)
    h0 = random_tensor((2, B, H), torch.float32, DEVICE)
    gru = lambda *a, **k: pydl.gru(*a, backend=backend, **k)  # noqa: E731
    with pytest.raises(ValueError, match=r"weight_ih_l0 must have shape \(3\*hidden_size, "
                                         r"input_size\) = \(15, 3\), got \(15, 4\): input has "
                                         r"size 3"):
        gru(x[..., :3], None, w, num_layers=2)
    with pytest.raises(ValueError, match="input must be 2-D or 3-D"):
        gru(x[None], None, w, num_layers=2)
    with pytest.raises(ValueError, match=r"hx \(h0\) must have shape \(2, 2, 5\)"):
        gru(x, h0[:1], w, num_layers=2)
    with pytest.raises(TypeError, match="hx must be a tensor"):
        gru(x, (h0, h0), w, num_layers=2)
    with pytest.raises(ValueError, match="weights: expected 8 tensors"):
        gru(x, None, w[:4], num_layers=2)
    with pytest.raises(ValueError, match=r"weight_hh_l1 must have shape \(3\*hidden_size"):
        gru(x, None, w[:5] + [w[5][:, :4]] + w[6:], num_layers=2)
    with pytest.raises(ValueError, match=r"weight_hh_l0 must have shape \(3\*hidden_size"):
        gru(x, None, list(torch.nn.LSTM(I, H, 2).to(DEVICE)._flat_weights), num_layers=2)
    with pytest.raises(ValueError,
                       match=r"bias_hh_l1 must have shape \(3\*hidden_size,\) = \(15,\)"):
        gru(x, None, w[:7] + [w[7][:14]], num_layers=2)
    with pytest.raises(RuntimeError, match="sequence length 0.*a GRU needs"):
        gru(x[:0], None, w, num_layers=2)
    with pytest.raises(ValueError, match="algo='flash' is not available"):
        gru(x, None, w, num_layers=2, algo="flash")
    with pytest.raises(TypeError, match="recompute must be a bool"):
        gru(x, None, w, num_layers=2, recompute="yes")
    with pytest.raises(TypeError,
                       match="weights.* has dtype torch.float16 but input has torch.float32"):
        gru(x, None, w[:1] + [w[1].half()] + w[2:], num_layers=2)
    with pytest.raises(ValueError, match="the torch backend has no recompute"):
        pydl.gru(x, None, w, num_layers=2, backend="torch", recompute=True)


def test_gru_torch_backend_matches_torch():
    """backend='torch' is torch's own GRU, the baseline, with the same signature."""
    m = torch.nn.GRU(3, 4, 2, bidirectional=True, batch_first=True).to(DEVICE)
    x = random_tensor((2, 3, 3), torch.float32, DEVICE)
    out, hn = pydl.gru(x, None, list(m._flat_weights), num_layers=2, bidirectional=True,
                       batch_first=True, backend="torch")
    t_out, t_hn = m(x)
    assert torch.equal(out, t_out) and torch.equal(hn, t_hn)
