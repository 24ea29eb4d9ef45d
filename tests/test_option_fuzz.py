"""A seeded differential fuzz of every op's option space against torch's own op in float64.

The option tests elsewhere walk each option on its own; here every case draws all of an op's
options at once (strides with dilation, groups, masks of every broadcast shape, layouts of the
inputs and of the upstream gradient, requires-grad patterns), runs pydl and torch on the same
values, and compares the outputs and every input's gradient. Where torch raises, pydl must
raise too. A first run of this kind found a dozen wrong answers and refusals (since fixed and
given tests of their own); it stays as a net for the combinations nobody lists.

Each test runs QUICK cases per op and backend (FULL with --full); a failure names its seed,
and PYDL_FUZZ_SEED=<seed> runs that case alone.

The cases are tiny (a tile or two of each kernel) so that many run in emulation. The same
option spaces at medium sizes (`SIZES`), whose tiles cross the kernels' block boundaries
(several query and key tiles, class counts either side of a block, split K, partial tiles of
every kind), run in `test_option_fuzz_medium`: MEDIUM_QUICK seeds per Triton variant on
every run, MEDIUM_FULL per variant, the Numba ones included, with --full (on a GPU: the
compiled kernels, bf16 too). PYDL_FUZZ_SEED=<seed> runs one there as well.
"""
import contextlib
import os

import numpy as np
import pytest
import torch
from conftest import DEVICE, DTYPES, HAS_CUDA, fuzz_seeds

import pydl
from pydl.testing import assert_close

QUICK, FULL = 8, 150
MEDIUM_QUICK, MEDIUM_FULL = 1, 40
F = torch.nn.functional

# The ranges the case makers draw sizes from ([lo, hi) as rng.integers; E, Ev: choices).
# "tiny" keeps a case within a tile or two; "medium" crosses the kernels' tile and block
# boundaries (a one-off run of 4,667 such cases found one fp32 accuracy miss: the Numba GEMM's
# running sum, since blocked).
SIZES = {
    "tiny": dict(conv_c=(1, 3), conv_dw=(1, 5), conv_oc=(1, 4), conv_hw=6, pool_k=(1, 4),
                 pool_c=(1, 5), pool_hw=(3, 9), classes=None, att_len=(1, 7), att_e=(4, 8, 16),
                 att_ev=(4, 8), rnn_i=(1, 5), rnn_h=(1, 5), rnn_t=(1, 5), rnn_b=(1, 3)),
    "medium": dict(conv_c=(9, 41), conv_dw=(17, 65), conv_oc=(9, 41), conv_hw=20,
                   pool_k=(1, 8), pool_c=(1, 71), pool_hw=(8, 41), classes=(100, 5001),
                   att_len=(17, 151), att_e=(16, 32, 40, 64, 80), att_ev=(16, 32),
                   rnn_i=(3, 41), rnn_h=(17, 71), rnn_t=(1, 7), rnn_b=(1, 6)),
}


def _tensor(rng, shape, dtype, layout="contig"):
    """Random values of `shape` in one of several layouts (the values do not depend on it)."""
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    t = torch.randn(shape, generator=g).to(DEVICE, dtype)
    if layout == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and t.dim() >= 1:
        wide = torch.zeros(*shape[:-1], 2 * shape[-1], device=DEVICE, dtype=dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _layout(rng):
    return str(rng.choice(["contig", "contig", "channels_last", "transposed", "sliced"]))


def _check(case, ours, theirs, inputs, dtype, out_dtype, reduction, rng, grads=True):
    """ours(*inputs) against theirs(*inputs in float64): both raise, or outputs (floating ones
    of out_dtype) and the gradients of the floating inputs (each requiring grad with
    probability 0.75) agree."""
    floating = [isinstance(t, torch.Tensor) and t.is_floating_point() for t in inputs]
    need = [f and grads and rng.random() < 0.75 for f in floating]
    leaves = [t.detach().clone().requires_grad_(n) if f else t
              for t, f, n in zip(inputs, floating, need)]
    ref_in = [t.detach().double().requires_grad_(n) if f else t
              for t, f, n in zip(inputs, floating, need)]
    try:
        want = theirs(*ref_in)
    except Exception:       # torch refuses: so must pydl
        with pytest.raises((ValueError, TypeError, RuntimeError, IndexError,
                            NotImplementedError)):
            ours(*leaves)
        return
    got = ours(*leaves)
    got, want = (list(got), list(want)) if isinstance(want, (tuple, list)) else ([got], [want])
    for i, (a, e) in enumerate(zip(got, want)):
        if e is None:
            continue
        if not e.is_floating_point():
            assert torch.equal(a.cpu(), e.cpu()), f"{case}: output {i} (indices) differ"
            continue
        assert a.shape == e.shape and a.dtype == out_dtype, \
            f"{case}: output {i} {tuple(a.shape)} {a.dtype}, expected {tuple(e.shape)} {out_dtype}"
        assert_close(a, e, dtype, reduction=reduction, name=f"{case}: output {i}")
    if not any(need):
        return
    outs = [(a, e) for a, e in zip(got, want) if e is not None and e.is_floating_point()
            and e.requires_grad]
    cot = [_tensor(rng, e.shape, torch.float32) for _, e in outs]
    torch.autograd.backward([a for a, _ in outs], [c.to(a.dtype) for (a, _), c in zip(outs, cot)])
    torch.autograd.backward([e for _, e in outs], [c.double() for c in cot])
    for i, (a, e) in enumerate(zip(leaves, ref_in)):
        if need[i]:
            assert_close(a.grad, e.grad, dtype, reduction=4 * reduction, scale=4.0,
                         name=f"{case}: grad of input {i}")


def _run(request, make, backend, algo, size="tiny", seeds=None):
    for seed in seeds if seeds is not None else fuzz_seeds(request, QUICK, FULL):
        rng = np.random.default_rng(seed)
        dtype = DTYPES[int(rng.integers(len(DTYPES)))]
        case, ours, theirs, inputs, reduction, *out_dtype = make(rng, dtype, backend, algo,
                                                                 size)
        _check(f"seed {seed} {dtype} {case}", ours, theirs, inputs, dtype,
               out_dtype[0] if out_dtype else dtype, reduction, rng)


# --- the ops' option spaces -------------------------------------------------------------------

def _conv(rng, dtype, backend, algo, size="tiny"):
    z = SIZES[size]
    groups = int(rng.choice([1, 1, 2, 3]))
    depthwise = rng.random() < 0.25
    C = groups * int(rng.integers(*z["conv_c"])) if not depthwise else \
        int(rng.integers(*z["conv_dw"]))
    groups = C if depthwise else groups
    OC = groups * int(rng.integers(*z["conv_oc"]))
    KH, KW = (int(v) for v in rng.integers(1, 5, 2))
    dil = [int(v) for v in rng.integers(1, 3, 2)]
    stride = [int(v) for v in rng.integers(1, 4, 2)]
    padding = rng.choice(["int", "pair", "same", "valid"])
    padding = {"int": int(rng.integers(0, 3)), "pair": [int(v) for v in rng.integers(0, 3, 2)],
               "same": "same", "valid": "valid"}[padding]
    if padding == "same":
        stride = 1
    H = int(rng.integers(dil[0] * (KH - 1) + 1, dil[0] * (KH - 1) + z["conv_hw"]))
    W = int(rng.integers(dil[1] * (KW - 1) + 1, dil[1] * (KW - 1) + z["conv_hw"]))
    shape = (int(rng.integers(1, 3)), C, H, W)
    if rng.random() < 0.15:
        shape = shape[1:]                   # unbatched
    x = _tensor(rng, shape, dtype, _layout(rng))
    w = _tensor(rng, (OC, C // groups, KH, KW), dtype, _layout(rng))
    b = _tensor(rng, (OC,), dtype) if rng.random() < 0.6 else None
    opts = dict(stride=stride, padding=padding, dilation=dil, groups=groups)
    if rng.random() < 0.2:      # conv1d: the case's W axis alone, options as ints or 1-tuples
        def one(v):
            v = v[1] if isinstance(v, list) else v
            return v if isinstance(v, str) or rng.random() < 0.5 else (v,)
        x, w = x[..., 0, :], w[..., 0, :]
        opts = dict(stride=one(stride), padding=one(padding), dilation=one(dil), groups=groups)
        case = f"conv1d x{tuple(x.shape)} w{tuple(w.shape)} bias={b is not None} {opts}"
        return (case, lambda x, w, b: pydl.conv1d(x, w, b, **opts, backend=backend, algo=algo),
                lambda x, w, b: F.conv1d(x, w, b, **opts), [x, w, b], C // groups * KW)
    case = f"conv2d x{tuple(shape)} w{tuple(w.shape)} bias={b is not None} {opts} algo={algo}"
    return (case, lambda x, w, b: pydl.conv2d(x, w, b, **opts, backend=backend, algo=algo),
            lambda x, w, b: F.conv2d(x, w, b, **opts), [x, w, b], C // groups * KH * KW)


def _pool(rng, dtype, backend, algo, size="tiny"):
    z = SIZES[size]
    kind = str(rng.choice(["max", "avg", "adaptive"]))
    K = [int(v) for v in rng.integers(*z["pool_k"], 2)]
    stride = None if rng.random() < 0.3 else [int(v) for v in rng.integers(1, 4, 2)]
    pad = [int(rng.integers(0, k // 2 + 1)) for k in K]
    shape = (int(rng.integers(1, 3)), int(rng.integers(*z["pool_c"])),
             int(rng.integers(*z["pool_hw"])), int(rng.integers(*z["pool_hw"])))
    if rng.random() < 0.15:
        shape = shape[1:]
    x = _tensor(rng, shape, dtype, _layout(rng))
    ceil = bool(rng.random() < 0.4)
    if kind == "max":
        dil = [int(v) for v in rng.integers(1, 3, 2)] if not any(pad) else 1  # no window in padding
        opts = dict(kernel_size=K, stride=stride, padding=pad, dilation=dil, ceil_mode=ceil,
                    return_indices=bool(rng.random() < 0.5))
        ours = lambda x: pydl.max_pool2d(x, **opts, backend=backend)  # noqa: E731
        theirs = lambda x: F.max_pool2d(x, **opts)  # noqa: E731
    elif kind == "avg":
        opts = dict(kernel_size=K, stride=stride, padding=pad, ceil_mode=ceil,
                    count_include_pad=bool(rng.random() < 0.5),
                    divisor_override=int(rng.integers(1, 7)) if rng.random() < 0.3 else None)
        ours = lambda x: pydl.avg_pool2d(x, **opts, backend=backend)  # noqa: E731
        theirs = lambda x: F.avg_pool2d(x, **opts)  # noqa: E731
    else:
        size = [int(rng.integers(1, 10)) if rng.random() < 0.85 else None for _ in range(2)]
        opts = dict(output_size=size if rng.random() < 0.7 else (size[0] or 2))
        ours = lambda x: pydl.adaptive_avg_pool2d(x, **opts, backend=backend)  # noqa: E731
        theirs = lambda x: F.adaptive_avg_pool2d(x, **opts)  # noqa: E731
    if rng.random() < 0.2:      # the 1-d pool: the case's W axis alone, options as ints
        x = x[..., 0, :]
        opts = {k: v[1] if isinstance(v, list) else v for k, v in opts.items()
                if k != "divisor_override"}
        if kind == "adaptive":
            opts["output_size"] = opts["output_size"] or 3
        name = {"max": "max_pool1d", "avg": "avg_pool1d", "adaptive": "adaptive_avg_pool1d"}[kind]
        ours = lambda x: getattr(pydl, name)(x, **opts, backend=backend)  # noqa: E731
        theirs = lambda x: getattr(F, name)(x, **opts)  # noqa: E731
        return f"{name} x{tuple(x.shape)} {opts}", ours, theirs, [x], 16
    return f"{kind}_pool x{tuple(shape)} {opts}", ours, theirs, [x], 16


def _simulated_rows(x, wide, reduced: int, backend: str):
    """x, or on the simulated Numba backend (about 20 ms a row) x narrowed along its wide
    dimension to at most 1024 rows of the reduction over dim `reduced` where the wide one is
    not that dimension (medium seeds made 20-57 thousand rows: 8-21 minutes a case)."""
    if wide is None or backend != "numba" or HAS_CUDA or wide == reduced % x.dim():
        return x
    per = x.numel() // (x.shape[reduced] * x.shape[wide])     # rows per index of `wide`
    return x.narrow(wide, 0, min(x.shape[wide], max(1, 1024 // per)))


def _z_term(logits, t, ignore_index, reduction, z):
    """The z-loss in torch ops: z lse^2 (over class dim 1, or 0 for (C,) logits) of the rows
    that count, per row or summed, a mean over their number (none counting: 0)."""
    counted = t != ignore_index
    rows = z * torch.logsumexp(logits, 0 if logits.dim() == 1 else 1).square() * counted
    if reduction == "none":
        return rows
    return rows.sum() / (counted.sum().clamp_min(1) if reduction == "mean" else 1)


def _softmax_ce(rng, dtype, backend, algo, size="tiny"):
    z = SIZES[size]
    dims = int(rng.integers(1, 5))
    shape = tuple(int(v) for v in rng.integers(1, 6, dims))
    wide = None
    if z["classes"]:            # one wide dimension: the softmax's, or the classes'
        wide = 1 if dims > 1 and rng.random() < 0.7 else 0
        shape = shape[:wide] + (int(rng.integers(*z["classes"])),) + shape[wide + 1:]
    x = _tensor(rng, shape, dtype, _layout(rng)) * 3
    if rng.random() < 0.4:
        dim = int(rng.integers(-dims, dims))
        x = _simulated_rows(x, wide, dim, backend)
        shape = tuple(x.shape)
        log = bool(rng.random() < 0.5)
        out_dtype = torch.float32 if dtype != torch.float32 and rng.random() < 0.3 else None
        op, ref = (pydl.log_softmax, F.log_softmax) if log else (pydl.softmax, F.softmax)
        case = f"{'log_' * log}softmax x{shape} dim={dim} dtype={out_dtype}"
        return (case, lambda x: op(x, dim, dtype=out_dtype, backend=backend),
                lambda x: ref(x, dim), [x], shape[dim], out_dtype or dtype)
    x = _simulated_rows(x, wide, 1 if dims > 1 else 0, backend)
    shape = tuple(x.shape)
    C = shape[1] if dims > 1 else shape[0]
    rows = (shape[0],) + shape[2:] if dims > 1 else ()
    prob = rng.random() < 0.35
    if prob:
        t = torch.softmax(_tensor(rng, shape, torch.float32), 1 if dims > 1 else 0).to(dtype)
    else:
        t = torch.from_numpy(rng.integers(0, C, rows)).to(DEVICE)
    opts = dict(reduction=str(rng.choice(["mean", "sum", "none"])),
                label_smoothing=float(rng.choice([0.0, 0.0, 0.1, 0.5])))
    if not prob and rng.random() < 0.5:
        opts["ignore_index"] = int(rng.choice([-100, 0, C - 1]))
    w = (torch.rand(C, device=DEVICE) + 0.2).to(dtype) if rng.random() < 0.4 else None
    # pydl's z-loss (class indices, no class weights), drawn last: the earlier draws as before
    z = float(rng.choice([1e-4, 0.1])) if not prob and w is None and rng.random() < 0.3 \
        else 0.0
    # and pydl's softcap (class indices), drawn after it
    cap = float(rng.choice([0.5, 2.0, 30.0])) if not prob and rng.random() < 0.3 else None
    case = (f"cross_entropy x{shape} {'probabilities' if prob else 'indices'} "
            f"w={w is not None} z_loss={z} softcap={cap} {opts}")
    # the class weight needs no gradient (pydl refuses one: semantics.md)
    w64 = None if w is None else w.double()

    def theirs(x, t):
        if cap:
            x = cap * torch.tanh(x / cap)
        loss = F.cross_entropy(x, t, w64, **opts)
        if z:
            loss = loss + _z_term(x, t, opts.get("ignore_index", -100), opts["reduction"], z)
        return loss
    return (case, lambda x, t: pydl.cross_entropy(x, t, w, **opts, z_loss=z, softcap=cap,
                                                  backend=backend),
            theirs, [x, t], C * max(1, t.numel()))


def _linear_ce(rng, dtype, backend, algo, size="tiny"):
    """linear_cross_entropy: leading dims, hidden and class counts, layouts of the hidden
    states and of the weight, a bias, class weights, every reduction, smoothing and
    ignore_index, chunks of any size (the last one short), a softcap, a z-loss (without class
    weights), against torch's composite."""
    medium = size == "medium"
    lead = tuple(int(v) for v in rng.integers(1, 9 if medium else 4, int(rng.integers(1, 4))))
    H = int(rng.integers(17, 71) if medium else rng.integers(1, 9))
    V = int(rng.integers(100, 1500) if medium else rng.integers(1, 13))
    if medium and backend == "numba" and not HAS_CUDA:
        # the simulator's rows (a block each) and GEMM tiles: at most 16 rows, 400 classes
        lead, V = lead[-2:] if np.prod(lead[-2:]) <= 16 else lead[-1:], min(V, 400)
    x = _tensor(rng, lead + (H,), dtype, str(rng.choice(["contig", "transposed", "sliced"])))
    w = _tensor(rng, (V, H), dtype, str(rng.choice(["contig", "transposed", "sliced"]))) * 0.5
    b = _tensor(rng, (V,), dtype) if rng.random() < 0.5 else None
    t = torch.from_numpy(rng.integers(0, V, lead)).to(DEVICE)
    opts = dict(reduction=str(rng.choice(["mean", "sum", "none"])),
                label_smoothing=float(rng.choice([0.0, 0.0, 0.1, 0.5])))
    if rng.random() < 0.5:
        opts["ignore_index"] = int(rng.choice([-100, 0, V - 1]))
        t = torch.where(torch.rand(lead, device=DEVICE) < 0.3, opts["ignore_index"], t)
    cw = (torch.rand(V, device=DEVICE) + 0.2).to(dtype) if rng.random() < 0.4 else None
    chunk = [None, 1, 2, 3, 5, 7][int(rng.integers(6))]
    cap = float(rng.choice([0.5, 2.0, 30.0])) if rng.random() < 0.3 else None
    z = float(rng.choice([1e-4, 0.1])) if cw is None and rng.random() < 0.3 else 0.0
    case = (f"linear_cross_entropy x{tuple(x.shape)} w{tuple(w.shape)} bias={b is not None} "
            f"class_weight={cw is not None} chunk_rows={chunk} softcap={cap} z_loss={z} {opts}")
    cw64 = None if cw is None else cw.double()

    def ours(x, w, t, b=None):
        return pydl.linear_cross_entropy(x, w, t, b, class_weight=cw, chunk_rows=chunk,
                                         softcap=cap, z_loss=z, **opts, backend=backend)

    def theirs(x, w, t, b=None):
        logits = F.linear(x, w, b)
        if cap:
            logits = cap * torch.tanh(logits / cap)
        loss = F.cross_entropy(logits.reshape(-1, V), t.reshape(-1), cw64, **opts)
        if z:
            loss = loss + _z_term(logits.reshape(-1, V), t.reshape(-1),
                                  opts.get("ignore_index", -100), opts["reduction"], z)
        return loss.view(t.shape) if opts["reduction"] == "none" else loss
    return case, ours, theirs, [x, w, t] + ([b] if b is not None else []), H * V * t.numel()


def _attention(rng, dtype, backend, algo, size="tiny"):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    z = SIZES[size]
    B, Hkv = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    G = int(rng.integers(1, 3))
    L, S = int(rng.integers(*z["att_len"])), int(rng.integers(*z["att_len"]))
    E = int(rng.choice(z["att_e"]))
    Ev = E if rng.random() < 0.7 else int(rng.choice(z["att_ev"]))
    gqa = G > 1 and rng.random() < 0.7
    q_shape, kv_shape = [B, Hkv * G, L, E], [B, Hkv, S, E]
    if not gqa:
        kv_shape[1] = q_shape[1] if rng.random() < 0.7 else 1       # shared or broadcast head
    if rng.random() < 0.2:
        kv_shape[0] = 1                                              # keys shared by the batch
    if rng.random() < 0.2:
        q_shape, kv_shape = q_shape[1:], kv_shape[1:]                # 3-D
    k_shape, v_shape = list(kv_shape), kv_shape[:-1] + [Ev]
    if kv_shape[-3] > 1 and rng.random() < 0.15:    # key and value heads broadcast (one shared)
        (k_shape if rng.random() < 0.5 else v_shape)[-3] = 1
    q = _tensor(rng, tuple(q_shape), dtype, str(rng.choice(["contig", "transposed"])))
    k = _tensor(rng, tuple(k_shape), dtype)
    v = _tensor(rng, tuple(v_shape), dtype)
    mask, causal = None, False
    kind = str(rng.choice(["none", "bool", "float", "causal"]))
    if kind == "causal":
        causal = True
    elif kind != "none":
        full = (B, q_shape[-3], L, S)[4 - len(q_shape):]
        shape = tuple(d if rng.random() < 0.6 else 1 for d in full)
        shape = shape[len(shape) - int(rng.integers(2, len(shape) + 1)):]
        # a float mask in the inputs' dtype, or float32 (which torch takes with any)
        mask = (torch.rand(shape, device=DEVICE) > 0.3) if kind == "bool" else \
            _tensor(rng, shape, dtype if rng.random() < 0.7 else torch.float32)
    scale = None if rng.random() < 0.7 else float(rng.uniform(0.1, 1.0))
    opts = dict(is_causal=causal, scale=scale, enable_gqa=gqa)

    def theirs(q, k, v, m):
        with sdpa_kernel(SDPBackend.MATH):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=m, **opts)
        return out.nan_to_num(0.0)      # a row with every key masked: pydl's 0 (semantics.md)
    case = (f"sdpa q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} mask={kind} {opts} "
            f"algo={algo}")
    split = algo == "flash_split"       # the flash forward with its keys split (decoding)

    def ours(q, k, v, m):
        from pydl._attention_triton import forced_split
        with forced_split() if split else contextlib.nullcontext():
            return pydl.scaled_dot_product_attention(q, k, v, attn_mask=m, **opts,
                                                     backend=backend,
                                                     algo="flash" if split else algo)
    return case, ours, theirs, [q, k, v, mask], S * E


def _rnn(rng, dtype, backend, algo, size="tiny"):
    z = SIZES[size]
    lstm = rng.random() < 0.5
    I, H = int(rng.integers(*z["rnn_i"])), int(rng.integers(*z["rnn_h"]))
    opts = dict(num_layers=int(rng.integers(1, 3)), bias=bool(rng.random() < 0.8),
                batch_first=bool(rng.random() < 0.3), bidirectional=bool(rng.random() < 0.4))
    if lstm and H > 1 and rng.random() < 0.3:
        opts["proj_size"] = int(rng.integers(1, H))
    module = (torch.nn.LSTM if lstm else torch.nn.GRU)(I, H, **opts).to(DEVICE)
    T, B = int(rng.integers(*z["rnn_t"])), int(rng.integers(*z["rnn_b"]))
    unbatched = rng.random() < 0.15
    shape = (T, I) if unbatched else ((B, T, I) if opts["batch_first"] else (T, B, I))
    x = _tensor(rng, shape, dtype, str(rng.choice(["contig", "transposed"])))
    LD = opts["num_layers"] * (2 if opts["bidirectional"] else 1)
    P = opts.get("proj_size", H)
    states = []
    if rng.random() < 0.6:
        states = [_tensor(rng, (LD, P) if unbatched else (LD, B, P), dtype)]
        if lstm:
            states.append(_tensor(rng, (LD, H) if unbatched else (LD, B, H), dtype))
    weights = [w.detach().to(dtype) for w in module._flat_weights]
    n_states = len(states)
    fn = pydl.lstm if lstm else pydl.gru
    layer = dict(num_layers=opts["num_layers"], bias=opts["bias"], batch_first=opts["batch_first"],
                 bidirectional=opts["bidirectional"])

    def split(args):
        x, rest = args[0], list(args[1:])
        hx = None
        if n_states:
            hx = tuple(rest[:n_states]) if lstm else rest[0]
        return x, hx, rest[n_states:]

    def ours(*args):
        x, hx, w = split(args)
        out, hn = fn(x, hx, w, **layer, backend=backend, algo=algo)
        return (out, *hn) if lstm else (out, hn)

    def theirs(*args):
        x, hx, w = split(args)
        ref = (torch.nn.LSTM if lstm else torch.nn.GRU)(I, H, **opts).to(DEVICE, torch.float64)
        out, hn = torch.func.functional_call(ref, dict(zip(module._flat_weights_names, w)),
                                             (x, hx))
        return (out, *hn) if lstm else (out, hn)
    case = f"{'lstm' if lstm else 'gru'} x{shape} {opts} states={n_states} algo={algo}"
    return case, ours, theirs, [x, *states, *weights], 4 * T * (I + H)


# op: (its case maker, the (backend, algo) variants it runs on)
OPS = {
    "conv2d": (_conv, [("triton", "implicit"), ("triton", "im2col"), ("numba", None)]),
    "pools": (_pool, [("triton", None), ("numba", None)]),
    "softmax_cross_entropy": (_softmax_ce, [("triton", None), ("numba", None)]),
    "linear_cross_entropy": (_linear_ce, [("triton", None), ("numba", None)]),
    "attention": (_attention, [("triton", "flash"), ("triton", "flash_split"),
                               ("triton", "naive"), ("numba", None), ("numba", "flash_split")]),
    "rnn": (_rnn, [("triton", "persistent"), ("triton", "steps"), ("numba", None)]),
}


@pytest.mark.parametrize("op,backend,algo", [(op, b, a) for op, (_, variants) in OPS.items()
                                             for b, a in variants])
def test_option_fuzz(request, op, backend, algo):
    _run(request, OPS[op][0], backend, algo)


@pytest.mark.parametrize("op,backend,algo", [(op, b, a) for op, (_, variants) in OPS.items()
                                             for b, a in variants])
def test_option_fuzz_medium(request, op, backend, algo):
    """The option spaces at medium sizes (SIZES): tiles that cross the kernels' block
    boundaries. Seeds from 1000 (the tiny test's are its own)."""
    if os.environ.get("PYDL_FUZZ_SEED") is None and backend == "numba" \
            and not request.config.getoption("--full"):
        pytest.skip("medium shapes on the Numba simulator take 3-45 s a case: run with --full")
    _run(request, OPS[op][0], backend, algo, size="medium",
         seeds=fuzz_seeds(request, MEDIUM_QUICK, MEDIUM_FULL, start=1000))


@pytest.mark.parametrize("route", ["channels_last", "weight_channels_last"])
def test_conv_layout_route(request, monkeypatch, route):
    """conv2d's and conv1d's option space with one of the implicit kernels' layout routes
    taken wherever a kernel offers it (the channels_last route: an NCHW operand; the weight
    route: an NCHW weight, forward and grad input; FLAT taps off, so that this file's small
    channel counts get them too): torch's answers, as the default path gives them. Seeds
    from 2000."""
    from pydl import _conv_implicit, _plan
    monkeypatch.setattr(_conv_implicit, "FLAT_K_CHANNELS", 0)
    taken = []

    def pick(key, candidates, launch, inout=()):
        route_cfg = next((c for c in candidates if c.get("ROUTE") == route), None)
        taken.append(route_cfg is not None)
        return route_cfg or candidates[0]
    for tuner in _conv_implicit.IMPLICIT_TUNERS.values():
        monkeypatch.setattr(tuner, "pick", pick)
    _plan.clear_all()          # no plan built without the route serves these calls
    try:
        _run(request, _conv, "triton", "implicit",
             seeds=fuzz_seeds(request, QUICK, FULL, start=2000))
    finally:
        _plan.clear_all()      # nor one built with it later calls
    assert any(taken) or os.environ.get("PYDL_FUZZ_SEED") is not None


if __name__ == "__main__":
    # `python tests/test_option_fuzz.py [tiny|medium] N FIRST_SEED [ops...]`: a long run outside
    # pytest, N seeds of every variant of each op (default: all), each failure printed with its
    # seed (rerun one with PYDL_FUZZ_SEED=<seed> and -k). Emulation unless a GPU is present.
    import sys
    import time
    size, n, first = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fails = 0
    for op in sys.argv[4:] or list(OPS):
        make, variants = OPS[op]
        for backend, algo in variants:
            t0, failed = time.time(), 0
            for seed in range(first, first + n):
                try:
                    _run(None, make, backend, algo, size=size, seeds=[seed])
                except Exception as exc:  # noqa: BLE001 - every failure is reported, then counted
                    failed += 1
                    print(f"FAIL {op} {backend} {algo} seed {seed}: {type(exc).__name__}: "
                          f"{str(exc)[:600]}", flush=True)
            fails += failed
            print(f"# {op} {backend} {algo}: {n} seeds from {first}, {failed} failed, "
                  f"{time.time() - t0:.0f} s", flush=True)
    sys.exit(1 if fails else 0)
