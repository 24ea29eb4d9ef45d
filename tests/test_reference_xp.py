"""The references are array-module generic (pydl/reference/_xp.py): NumPy in, NumPy out; CuPy in,
CuPy out, from the same code. Without a GPU this checks the dispatch and the helpers, that
importing the references never imports cupy, and that the references reach NumPy only through
`xp`; the GPU test runs every reference, forward and backward, on CuPy arrays and compares with
the same call on NumPy arrays.
"""
import ast
import importlib
import inspect
import os
import subprocess
import sys
import types
import warnings
import zlib

import numpy as np
import pytest

from pydl.reference import attention, conv, pool, softmax_ce
from pydl.reference._xp import add_at, array_module, errstate

# The module itself: pydl.reference re-exports its function `lstm` under the same name.
lstm_ref = importlib.import_module("pydl.reference.lstm")

GENERIC_MODULES = (softmax_ce, conv, pool, attention, lstm_ref)


def _cupy_or_skip():
    cupy = pytest.importorskip("cupy")
    if not cupy.cuda.is_available():
        pytest.skip("CuPy sees no GPU")
    return cupy


# --- array_module ---------------------------------------------------------------------------------

def test_array_module_numpy():
    x = np.ones(3)
    assert array_module(x) is np
    assert array_module(x, None, [1.0, 2.0], 3.0, np.float64(1.0)) is np
    assert array_module() is np


def test_array_module_cupy():
    cupy = _cupy_or_skip()
    x = cupy.ones(3)
    assert array_module(x) is cupy
    assert array_module(np.ones(3), None, x) is cupy  # any CuPy input decides


def test_array_module_fake_cupy(monkeypatch):
    """Dispatch on a stand-in cupy module (CPU): an array whose type comes from cupy selects
    it; NumPy inputs never try to import cupy."""
    fake = types.ModuleType("cupy")

    class ndarray:  # noqa: N801 - cupy's name
        pass

    ndarray.__module__ = "cupy._core.core"
    fake.ndarray = ndarray
    monkeypatch.setitem(sys.modules, "cupy", fake)
    assert array_module(np.ones(2), ndarray()) is fake
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` would now raise
    assert array_module(np.ones(2), [1.0], None) is np


# --- helpers --------------------------------------------------------------------------------------

def test_errstate_numpy_silences_floating_point_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with errstate(np, divide="ignore", invalid="ignore"):
            out = np.array([1.0, 0.0]) / np.array([0.0, 0.0])
    assert out[0] == np.inf and np.isnan(out[1])


def test_errstate_other_module_is_a_no_op():
    with errstate(types.ModuleType("cupy"), divide="ignore") as ctx:
        assert ctx is None


def test_add_at_numpy_accumulates_repeated_indices():
    a = np.zeros((2, 4))
    add_at(np, a, (..., np.array([1, 1, 3])), np.array([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]]))
    np.testing.assert_array_equal(a, [[0, 3, 0, 4], [0, 24, 0, 32]])


# --- no cupy at import, no NumPy behind xp's back -------------------------------------------------

def test_importing_the_references_does_not_import_cupy():
    code = ("import sys, numpy as np, pydl.reference as ref\n"
            "ref.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 2, 2)))\n"
            "ref.max_pool2d_backward(np.ones((1, 1, 1, 1)), np.zeros((1, 1, 1, 1), int),\n"
            "                        (1, 1, 2, 2))\n"
            "ref.lstm_cell(np.ones(3), w_ih=np.ones((8, 3)), w_hh=np.ones((8, 2)))\n"
            "assert 'cupy' not in sys.modules, 'cupy was imported'\n"
            "assert 'cupyx' not in sys.modules, 'cupyx was imported'\n")
    env = dict(os.environ, PYDL_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("module", GENERIC_MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_references_use_numpy_only_through_xp(module):
    """The generic modules neither import numpy nor name `np`: every array operation goes through
    the module array_module picked (NumPy-only features through a helper in _xp.py)."""
    tree = ast.parse(inspect.getsource(module))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert not any(a.name.split(".")[0] in ("numpy", "cupy") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert (node.module or "").split(".")[0] not in ("numpy", "cupy")
        elif isinstance(node, ast.Name):
            assert node.id not in ("np", "numpy", "cupy", "cp"), f"line {node.lineno}"


# --- every reference on CuPy arrays ---------------------------------------------------------------

def _special(rng, x, count=3):
    """x with `count` entries set to inf, -inf or NaN."""
    x = x.copy()
    flat = x.reshape(-1)
    at = rng.choice(flat.size, size=count, replace=False)
    flat[at] = rng.choice([np.inf, -np.inf, np.nan], size=count)
    return x


def _softmax_args(rng):
    x = rng.standard_normal((4, 9))
    x[1] = -np.inf  # a fully masked row
    x[2, 3] = np.inf
    return (x, 1), {}


def _softmax_backward_args(fn):
    def make(rng):
        x = rng.standard_normal((3, 5, 7))
        return (rng.standard_normal(x.shape), fn(x, 1), 1), {}
    return make


def _ce_args(backward, reduction, **kw):
    def make(rng):
        x = rng.standard_normal((6, 5, 3, 2))
        t = rng.integers(0, 5, size=(6, 3, 2))
        t[0, 0, 0] = -100  # ignored
        kwargs = dict(reduction=reduction, weight=rng.random(5), **kw)
        if not backward:
            return (x, t), kwargs
        g = rng.standard_normal(t.shape) if reduction == "none" else np.asarray(1.7)
        return (g, x, t), kwargs
    return make


def _ce_prob_args(reduction, **kw):
    """(grad_loss, x, class-probability target) for cross_entropy_target_backward and
    cross_entropy_weight_backward."""
    def make(rng):
        x = rng.standard_normal((6, 5, 3))
        t = rng.random((6, 5, 3))
        g = rng.standard_normal((6, 3)) if reduction == "none" else np.asarray(0.6)
        return (g, x, t / t.sum(axis=1, keepdims=True)), dict(reduction=reduction,
                                                               weight=rng.random(5), **kw)
    return make


def _pad_args(backward, mode):
    pads = (2, 1, 0, 3)

    def make(rng):
        x = rng.standard_normal((2, 3, 5, 6))
        if not backward:
            return (x, pads, mode), {}
        return (rng.standard_normal((2, 3, 8, 9)), x.shape, pads, mode), {}
    return make


_CONV = dict(stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2, padding_mode="reflect")


def _conv_args(backward):
    def make(rng):
        x, w = rng.standard_normal((2, 4, 9, 10)), rng.standard_normal((6, 2, 3, 3))
        if not backward:
            return (x, w, rng.standard_normal(6)), dict(_CONV)
        g = rng.standard_normal(conv.conv2d(x, w, **_CONV).shape)
        return (g, x, w), dict(_CONV, has_bias=True)
    return make


def _pool_input(rng):
    x = np.round(rng.standard_normal((2, 3, 9, 8)), 1)  # rounding makes ties
    x[0, 0] = -np.inf
    return _special(rng, x, count=4)


_MAX = dict(kernel_size=3, stride=2, padding=1, dilation=(1, 2), ceil_mode=True)
_AVG = dict(kernel_size=(3, 2), stride=2, padding=1, ceil_mode=True, count_include_pad=False)


def _max_pool_backward_args(rng):
    x = _pool_input(rng)
    out, idx = pool.max_pool2d(x, **_MAX)
    return (rng.standard_normal(out.shape), idx, x.shape), {}


def _avg_pool_backward_args(rng):
    shape = (2, 3, 9, 8)
    g = rng.standard_normal(pool.avg_pool2d(np.zeros(shape), **_AVG).shape)
    return (g, shape), dict(_AVG)


def _sdpa_args(backward, **kw):
    def make(rng):
        q = rng.standard_normal((2, 4, 6, 8))
        k, v = rng.standard_normal((2, 2, 5, 8)), rng.standard_normal((2, 2, 5, 3))
        mask = rng.random((2, 1, 6, 5)) > 0.3
        mask[1, 0, 2] = False  # a fully masked row: output and gradients 0
        kwargs = dict(attn_mask=mask, enable_gqa=True, **kw)
        if not backward:
            return (q, k, v), dict(kwargs, return_lse=True)
        return (rng.standard_normal((2, 4, 6, 3)), q, k, v), kwargs
    return make


def _sigmoid_args(rng):
    x = rng.standard_normal((5, 7)) * 10
    x[0, :4] = [800.0, -800.0, 0.0, -0.0]  # exp would overflow for the naive form
    return (_special(rng, x),), {}


def _cell_args(gates, batched, state, bias):
    """Inputs of lstm_cell (gates=4) or gru_cell (gates=3): x, h[, c], w_ih, w_hh, b_ih, b_hh."""
    B, I, H = 3, 5, 4

    def make(rng):
        lead = (B,) if batched else ()
        x = rng.standard_normal(lead + (I,))
        states = tuple(rng.standard_normal(lead + (H,)) if state else None
                       for _ in range(gates - 2))  # (h, c) for the LSTM, (h,) for the GRU
        w = (rng.standard_normal((gates * H, I)), rng.standard_normal((gates * H, H)))
        b = tuple(rng.standard_normal(gates * H) if on else None for on in bias)
        return (x,) + states + w + b, {}
    return make


def _cell_backward_args(forward, batched, grads):
    """(dh1[, dc1], cache) for lstm_cell_backward / gru_cell_backward, the cache from the NumPy
    forward (converted array by array for the CuPy run); grads says which gradients are given."""
    gates = 4 if forward is lstm_ref.lstm_cell else 3

    def make(rng):
        args, _ = _cell_args(gates, batched, True, (True, False))(rng)
        *_, cache = forward(*args)
        shape = cache["h"].shape[1:] if cache["unbatched"] else cache["h"].shape
        return tuple(rng.standard_normal(shape) if g else None for g in grads) + (cache,), {}
    return make


def _rnn_weights(rng, gates, I, H, num_layers, D, bias):
    """Weights keyed by torch's state_dict names (lstm_weight_names order)."""
    names = lstm_ref.lstm_weight_names(num_layers, D == 2, bias)
    shapes = {"weight_ih": lambda layer: (gates * H, I if layer == 0 else D * H),
              "weight_hh": lambda layer: (gates * H, H),
              "bias_ih": lambda layer: (gates * H,), "bias_hh": lambda layer: (gates * H,)}
    weights = {}
    for name in names:
        kind, _, rest = name.rpartition("_l")
        weights[name] = rng.standard_normal(shapes[kind](int(rest.split("_")[0])))
    return weights


_RNN = dict(T=4, B=3, I=5, H=3)


def _rnn_args(gates, num_layers=2, bidirectional=True, batch_first=False, state=True,
              bias=True, unbatched=False):
    """(x, h0[, c0], weights) and the layer options for lstm (gates=4) or gru (gates=3)."""
    T, B, I, H = (_RNN[k] for k in "TBIH")
    D = 2 if bidirectional else 1

    def make(rng):
        x = rng.standard_normal((T, I) if unbatched else (B, T, I) if batch_first else (T, B, I))
        sshape = (num_layers * D, H) if unbatched else (num_layers * D, B, H)
        states = tuple(rng.standard_normal(sshape) if state else None for _ in range(gates - 2))
        w = _rnn_weights(rng, gates, I, H, num_layers, D, bias)
        return (x,) + states + (w,), dict(num_layers=num_layers, bidirectional=bidirectional,
                                          batch_first=batch_first, return_cache=True)
    return make


def _rnn_backward_args(forward, grads, **kw):
    """(grad_output, grad_hn[, grad_cn], cache) for lstm_backward / gru_backward, the cache from
    the NumPy forward; grads says which incoming gradients are given."""
    gates = 4 if forward is lstm_ref.lstm else 3

    def make(rng):
        args, kwargs = _rnn_args(gates, **kw)(rng)
        out, final, cache = forward(*args, **kwargs)
        final = final if gates == 4 else (final,)
        shapes = (out.shape,) + tuple(f.shape for f in final)
        return tuple(rng.standard_normal(s) if g else None for s, g in zip(shapes, grads)) + (
            cache,), {}
    return make


# (id, reference function, inputs builder: rng -> (args, kwargs))
CASES = [
    ("logsumexp", softmax_ce.logsumexp, lambda rng: _softmax_args(rng)),
    ("softmax", softmax_ce.softmax, _softmax_args),
    ("log_softmax", softmax_ce.log_softmax, _softmax_args),
    ("softmax_backward", softmax_ce.softmax_backward, _softmax_backward_args(softmax_ce.softmax)),
    ("log_softmax_backward", softmax_ce.log_softmax_backward,
     _softmax_backward_args(softmax_ce.log_softmax)),
    ("cross_entropy-mean", softmax_ce.cross_entropy, _ce_args(False, "mean", label_smoothing=0.1)),
    ("cross_entropy-none", softmax_ce.cross_entropy, _ce_args(False, "none")),
    ("cross_entropy_backward-mean", softmax_ce.cross_entropy_backward,
     _ce_args(True, "mean", label_smoothing=0.1)),
    ("cross_entropy_backward-sum", softmax_ce.cross_entropy_backward, _ce_args(True, "sum")),
    ("cross_entropy_backward-none", softmax_ce.cross_entropy_backward,
     _ce_args(True, "none", label_smoothing=0.2)),
    ("cross_entropy_target_backward-mean", softmax_ce.cross_entropy_target_backward,
     _ce_prob_args("mean", label_smoothing=0.1)),
    ("cross_entropy_target_backward-none", softmax_ce.cross_entropy_target_backward,
     _ce_prob_args("none")),
    ("cross_entropy_weight_backward-sum", softmax_ce.cross_entropy_weight_backward,
     _ce_prob_args("sum", label_smoothing=0.2)),
    ("cross_entropy_weight_backward-none", softmax_ce.cross_entropy_weight_backward,
     _ce_prob_args("none")),
    ("pad2d-reflect", conv.pad2d, _pad_args(False, "reflect")),
    ("pad2d-zeros", conv.pad2d, _pad_args(False, "zeros")),
    ("pad2d_backward-circular", conv.pad2d_backward, _pad_args(True, "circular")),
    ("pad2d_backward-replicate", conv.pad2d_backward, _pad_args(True, "replicate")),
    ("conv2d", conv.conv2d, _conv_args(False)),
    ("conv2d_backward", conv.conv2d_backward, _conv_args(True)),
    ("max_pool2d", pool.max_pool2d, lambda rng: ((_pool_input(rng),), dict(_MAX))),
    ("max_pool2d_backward", pool.max_pool2d_backward, _max_pool_backward_args),
    ("avg_pool2d", pool.avg_pool2d, lambda rng: ((rng.standard_normal((2, 3, 9, 8)),), dict(_AVG))),
    ("avg_pool2d_backward", pool.avg_pool2d_backward, _avg_pool_backward_args),
    ("adaptive_avg_pool2d", pool.adaptive_avg_pool2d,
     lambda rng: ((rng.standard_normal((3, 10, 7)), (4, 3)), {})),
    ("adaptive_avg_pool2d_backward", pool.adaptive_avg_pool2d_backward,
     lambda rng: ((rng.standard_normal((2, 3, 4, 3)), (2, 3, 10, 7)), {})),
    ("scaled_dot_product_attention", attention.scaled_dot_product_attention,
     _sdpa_args(False, scale=0.4)),
    ("scaled_dot_product_attention-causal", attention.scaled_dot_product_attention,
     lambda rng: ((rng.standard_normal((3, 7, 4)),) * 3, dict(is_causal=True))),
    ("scaled_dot_product_attention_backward", attention.scaled_dot_product_attention_backward,
     _sdpa_args(True)),
    ("sigmoid", lstm_ref.sigmoid, _sigmoid_args),
    ("lstm_cell", lstm_ref.lstm_cell, _cell_args(4, True, True, (True, True))),
    ("lstm_cell-unbatched-zero_state", lstm_ref.lstm_cell, _cell_args(4, False, False,
                                                                       (False, True))),
    ("lstm_cell_backward", lstm_ref.lstm_cell_backward,
     _cell_backward_args(lstm_ref.lstm_cell, True, (True, True))),
    ("lstm_cell_backward-unbatched-dc_only", lstm_ref.lstm_cell_backward,
     _cell_backward_args(lstm_ref.lstm_cell, False, (False, True))),
    ("gru_cell", lstm_ref.gru_cell, _cell_args(3, True, True, (True, True))),
    ("gru_cell-unbatched-zero_state", lstm_ref.gru_cell, _cell_args(3, False, False,
                                                                     (True, False))),
    ("gru_cell_backward", lstm_ref.gru_cell_backward,
     _cell_backward_args(lstm_ref.gru_cell, True, (True,))),
    ("gru_cell_backward-no_grad", lstm_ref.gru_cell_backward,  # module from the cache alone
     _cell_backward_args(lstm_ref.gru_cell, False, (False,))),
    ("lstm_weight_names", lstm_ref.lstm_weight_names,
     lambda rng: ((), dict(num_layers=2, bidirectional=True, bias=False))),
    ("lstm-bidirectional-2layers", lstm_ref.lstm, _rnn_args(4)),
    ("lstm-batch_first-zero_state-no_bias", lstm_ref.lstm,
     _rnn_args(4, num_layers=1, bidirectional=False, batch_first=True, state=False, bias=False)),
    ("lstm-unbatched", lstm_ref.lstm, _rnn_args(4, num_layers=3, unbatched=True)),
    ("lstm_backward", lstm_ref.lstm_backward,
     _rnn_backward_args(lstm_ref.lstm, (True, True, True), batch_first=True)),
    ("lstm_backward-grad_cn_only-unbatched", lstm_ref.lstm_backward,
     _rnn_backward_args(lstm_ref.lstm, (False, False, True), unbatched=True, state=False)),
    ("lstm_backward-no_grads", lstm_ref.lstm_backward,  # module from the cache alone
     _rnn_backward_args(lstm_ref.lstm, (False, False, False), bidirectional=False)),
    ("gru-bidirectional-2layers", lstm_ref.gru, _rnn_args(3)),
    ("gru-batch_first-zero_state-no_bias", lstm_ref.gru,
     _rnn_args(3, num_layers=3, batch_first=True, state=False, bias=False)),
    ("gru_backward", lstm_ref.gru_backward, _rnn_backward_args(lstm_ref.gru, (True, True))),
    ("gru_backward-grad_output_only-unbatched", lstm_ref.gru_backward,
     _rnn_backward_args(lstm_ref.gru, (True, False), unbatched=True, num_layers=1)),
]


def test_cases_cover_every_reference_function():
    public = {f for m in GENERIC_MODULES for name, f in vars(m).items()
              if inspect.isfunction(f) and f.__module__ == m.__name__ and not name.startswith("_")}
    assert public == {fn for _, fn, _ in CASES}


def _convert(xp, tree):
    """Every NumPy array in args/kwargs (nested in tuples, lists and dicts, as in the RNN
    references' caches) as an array of module xp."""
    if isinstance(tree, np.ndarray):
        return xp.asarray(tree)
    if isinstance(tree, (tuple, list)):
        return type(tree)(_convert(xp, t) for t in tree)
    if isinstance(tree, dict):
        return {k: _convert(xp, v) for k, v in tree.items()}
    return tree


def _assert_agree(xp, got, expected, where="out"):
    if isinstance(expected, (tuple, list)):
        assert type(got) is type(expected) and len(got) == len(expected), where
        for i, (g, e) in enumerate(zip(got, expected)):
            _assert_agree(xp, g, e, f"{where}[{i}]")
        return
    if isinstance(expected, dict):  # the RNN references' weight gradients and caches
        assert isinstance(got, dict) and got.keys() == expected.keys(), where
        for k, e in expected.items():
            _assert_agree(xp, got[k], e, f"{where}[{k!r}]")
        return
    if not isinstance(expected, np.ndarray):  # None, flags, sizes, names
        assert type(got) is type(expected) and got == expected, where
        return
    assert isinstance(got, xp.ndarray), f"{where}: {type(got)} is not {xp.__name__}.ndarray"
    assert got.dtype == expected.dtype and got.shape == expected.shape, where
    got = got.get() if xp is not np else got
    if expected.dtype.kind == "f":
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12, equal_nan=True,
                                   err_msg=where)
    else:
        np.testing.assert_array_equal(got, expected, err_msg=where)


def _check_case(xp, case):
    name, fn, make = case
    args, kwargs = make(np.random.default_rng(zlib.crc32(name.encode())))
    with np.errstate(all="ignore"):
        expected = fn(*args, **kwargs)
    got = fn(*_convert(xp, args), **_convert(xp, kwargs))
    _assert_agree(xp, got, expected)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_cases_on_numpy(case):
    """The case table itself, on CPU: NumPy in, NumPy out, deterministic."""
    _check_case(np, case)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_reference_on_cupy_matches_numpy(case):
    cupy = _cupy_or_skip()
    _check_case(cupy, case)
