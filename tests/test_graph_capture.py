"""CUDA-graph capture of a whole training step built from pydl's ops (GPU only).

On a host that is slow at Python the small ops of a real model are host-bound; capturing the
step in a CUDA graph removes the host from the loop. That needs every op to run without a
host synchronisation and without allocations whose addresses change between replays: the
conv, pooling, attention and cross-entropy forward and backward, replayed on new data, must
give the eager step's loss and gradients. And inference: a recurrent cell's decoding loop in
one graph."""

import pytest
import torch
from conftest import HAS_CUDA

import pydl
from pydl.testing import assert_close

pytestmark = pytest.mark.gpu


def _step(x, t, w_conv, w_1x1, w_dw, w_out, conv_algo="implicit", attn_algo="flash",
          backend="triton"):
    """conv 3x3 -> relu -> conv 1x1 (the shared GEMM) -> depthwise 3x3 (the implicit
    algorithm's direct kernels, its weight gradient summed over pixel ranges by arrival) ->
    max-pool -> attention over the pixels -> linear -> cross-entropy, and the linear layer
    and cross-entropy fused (linear_cross_entropy)."""
    b = dict(backend=backend)
    h = torch.relu(pydl.conv2d(x, w_conv, padding=1, algo=conv_algo, **b))
    h = pydl.conv2d(h, w_1x1, algo=conv_algo, **b)
    h = pydl.conv2d(h, w_dw, padding=1, groups=h.shape[1], algo=conv_algo, **b)
    h = pydl.max_pool2d(h, 2, **b)                         # (N, C, 4, 4)
    seq = h.flatten(2).transpose(1, 2).unsqueeze(1)       # (N, 1, 16, C)
    a = pydl.scaled_dot_product_attention(seq, seq, seq, algo=attn_algo, **b)
    pooled = a.mean(2).squeeze(1)                         # (N, C)
    # the head twice: its logits' cross-entropy, and fused in chunks (two for N = 4)
    return pydl.cross_entropy(pooled @ w_out, t, **b) + 0.5 * pydl.linear_cross_entropy(
        pooled, w_out.t(), t, label_smoothing=0.1, chunk_rows=3, **b)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("conv_algo,attn_algo,backend", [
    ("implicit", "flash", "triton"), ("im2col", "naive", "triton"), ("im2col", "flash", "numba")])
def test_a_captured_training_step_replays_like_eager(conv_algo, attn_algo, backend):
    """The default algorithms, the planned im2col convolution and materialising attention
    (views made per call, several launches a step), and the Numba backend (its plans'
    launches on the capturing stream, their workspaces from torch's allocator)."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    w_conv = (torch.randn(16, 3, 3, 3, device=dev) * 0.3).requires_grad_()
    w_1x1 = (torch.randn(16, 16, 1, 1, device=dev) * 0.3).requires_grad_()
    w_dw = (torch.randn(16, 1, 3, 3, device=dev) * 0.3).requires_grad_()
    w_out = (torch.randn(16, 10, device=dev) * 0.3).requires_grad_()
    params = (w_conv, w_1x1, w_dw, w_out)
    algos = dict(conv_algo=conv_algo, attn_algo=attn_algo, backend=backend)
    static_x = torch.randn(4, 3, 8, 8, device=dev)
    static_t = torch.randint(0, 10, (4,), device=dev)

    side = torch.cuda.Stream()                  # warm-up (compiles, tunes) off the default stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            _step(static_x, static_t, *params, **algos).backward()
    torch.cuda.current_stream().wait_stream(side)

    graph = torch.cuda.CUDAGraph()
    for p in params:
        p.grad = None
    with torch.cuda.graph(graph):
        static_loss = _step(static_x, static_t, *params, **algos)
        static_loss.backward()

    for seed in (1, 2):
        gen = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(4, 3, 8, 8, device=dev, generator=gen)
        t = torch.randint(0, 10, (4,), device=dev, generator=gen)
        static_x.copy_(x)
        static_t.copy_(t)
        graph.replay()
        torch.cuda.synchronize()
        replayed = [static_loss.clone()] + [p.grad.clone() for p in params]

        eager = [q.detach().clone().requires_grad_() for q in params]
        loss = _step(x, t, *eager, **algos)
        loss.backward()
        assert_close(replayed[0], loss.detach(), torch.float32, reduction=64, tf32=True,
                     name="loss")
        for got, want in zip(replayed[1:], eager):
            assert_close(got, want.grad, torch.float32, reduction=64, tf32=True,
                         name="gradient")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_a_captured_decoding_loop_replays_like_eager(kind, backend):
    """Inference with a recurrent cell, several steps in one graph (the host-bound case capture
    is for): no autograd graph, the gate activations in the buffers the cells' plans kept
    from the warm-up (pydl._launch.WriteOnly); replays on new inputs give eager's states."""
    if backend == "numba":
        pytest.importorskip("numba")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    B, I, H, T = 4, 8, 16, 5
    G = 4 if kind == "lstm" else 3
    w = [torch.randn(s, device=dev) * 0.3 for s in ((G * H, I), (G * H, H), (G * H,), (G * H,))]
    static = [torch.randn(s, device=dev) for s in ((T, B, I), (B, H), (B, H))]

    def decode(x, h, c):
        for t in range(T):
            if kind == "lstm":
                h, c = pydl.lstm_cell(x[t], (h, c), *w, backend=backend)
            else:
                h = pydl.gru_cell(x[t], h, *w, backend=backend)
        return h, c

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                decode(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_h, static_c = decode(*static)
        for seed in (1, 2):
            gen = torch.Generator(device=dev).manual_seed(seed)
            new = [torch.randn(t.shape, device=dev, generator=gen) for t in static]
            for s, n in zip(static, new):
                s.copy_(n)
            graph.replay()
            torch.cuda.synchronize()
            want_h, want_c = decode(*new)
            assert_close(static_h, want_h, torch.float32, reduction=I + H, tf32=True, name="h")
            assert_close(static_c, want_c, torch.float32, reduction=I + H, tf32=True, name="c")


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_captured_attention_dropout_draws_anew_each_replay(backend):
    """Inside capture the flash kernels of either backend read a seed the device draws
    (torch's generator, whose state each replay advances): two replays of one graph on the
    same inputs drop different scores (a host seed would be baked in: the same output every
    replay), and the backward runs in the graph. (The device-seed kernels compile during the
    capture: the warm-up runs the host-seed ones.)"""
    if backend == "numba":
        pytest.importorskip("numba")
    torch.manual_seed(0)
    dev = torch.device("cuda")
    q = torch.randn(2, 2, 64, 32, device=dev, requires_grad=True)

    def step():
        out = pydl.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend=backend)
        out.sum().backward()
        return out

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            q.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    q.grad = None
    with torch.cuda.graph(graph):
        static_out = step()
    outs, grads = [], []
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        outs.append(static_out.clone())
        grads.append(q.grad.clone())
    assert not torch.equal(outs[0], outs[1]), "two replays dropped the same scores"
    assert not torch.equal(grads[0], grads[1])
    assert all(torch.isfinite(t).all() for t in outs + grads)


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
def test_compiled_reduce_overhead_keeps_the_step_in_one_graph_each_way():
    """torch.compile(mode="reduce-overhead") on the training step: inductor runs each compiled
    graph (the forward, the backward) as CUDA graphs, split wherever a node cannot be
    captured (with graph partition, torch 2.13's default, a node on the CPU is run outside).
    pydl's kernel ops must not split it: one partition a graph, no graph skipped, and the
    replayed step equals the eager one. (The attention ops' dropout seed, which the backward
    reads, is a device tensor for this reason: pydl/_attention_seed.py `_op_seed`.)"""
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    dev = torch.device("cuda")
    params = [(torch.randn(*shape, device=dev) * 0.3).requires_grad_()
              for shape in ((16, 3, 3, 3), (16, 16, 1, 1), (16, 1, 3, 3), (16, 10))]
    compiled = torch.compile(_step, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    for seed in (1, 2, 3, 4):
        gen = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(4, 3, 8, 8, device=dev, generator=gen)
        t = torch.randint(0, 10, (4,), device=dev, generator=gen)
        for p in params:
            p.grad = None
        loss = compiled(x, t, *params)
        loss.backward()
        got = [loss.detach().clone()] + [p.grad.clone() for p in params]
        eager = [p.detach().clone().requires_grad_() for p in params]
        want = _step(x, t, *eager)
        want.backward()
        assert_close(got[0], want.detach(), torch.float32, reduction=64, tf32=True, name="loss")
        for g, w in zip(got[1:], eager):
            assert_close(g, w.grad, torch.float32, reduction=64, tf32=True, name="gradient")
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    # counted only where a graph is split (more than one partition)
    assert counters["inductor"]["cudagraph_partitions"] == 0, dict(counters["inductor"])


@pytest.mark.skipif(not HAS_CUDA, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("backend", ["triton", "numba"])
def test_compiled_reduce_overhead_attention_dropout_draws_anew(backend):
    """Attention with dropout under torch.compile(mode="reduce-overhead"): the kernel op's
    seed is drawn on the device inside the graph, so two calls on the same inputs drop
    different scores (a seed baked into the recorded graph would repeat one mask), gradients
    flow, and no CPU node splits or skips the graphs."""
    from torch._dynamo.utils import counters
    if backend == "numba":
        pytest.importorskip("numba")
    torch.manual_seed(0)
    dev = torch.device("cuda")

    def attend(q):
        return pydl.scaled_dot_product_attention(q, q, q, dropout_p=0.5, backend=backend)

    compiled = torch.compile(attend, mode="reduce-overhead", fullgraph=True)
    torch._dynamo.reset()
    counters.clear()
    q = torch.randn(2, 2, 64, 32, device=dev, requires_grad=True)
    outs = []
    for _ in range(4):
        q.grad = None
        out = compiled(q)
        out.sum().backward()
        outs.append(out.detach().clone())
        assert q.grad is not None and torch.isfinite(q.grad).all()
    assert not torch.equal(outs[-1], outs[-2]), "two replays dropped the same scores"
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
    assert counters["inductor"]["cudagraph_partitions"] == 0, dict(counters["inductor"])
