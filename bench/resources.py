"""`python -m bench resources`: what the compiler says each tuning candidate costs, no GPU needed.

For every candidate launch configuration of pydl's autotuned Triton kernels (pydl/_tune.py),
compiled for one GPU architecture (sm_90, H100, by default) on this machine: registers per
thread, spills (local memory and stack bytes), shared memory, and how many Hopper wgmma
(SASS HGMMA) instructions the matrix products became. A candidate that spills, needs more
shared memory than a block may have (227 KiB on Hopper) or more registers than an SM has
(65536: registers per thread x 32 x num_warps) shows up here before any device time is spent,
and so does a kernel whose loads the compiler could not vectorize: the report counts cp.async
copies and 16-byte loads against all global loads in the SASS.

One source of truth: the candidates and the launch arguments are not copied from the
launchers. Each representative problem (PROBLEMS) is run through pydl's real launcher code on
CPU tensors, with `Tuner.pick` replaced by a recorder (tuner name, candidates, launch closure;
it returns the default, candidates[0]) and Triton's `JITFunction.run` replaced by a recorder
that runs nothing. Then each candidate's `launch(cfg)` is called, and every
`kernel[grid](*args, **kwargs)` it makes is specialized by Triton's own JIT binder for the
target (pointers of the tensors' dtypes with 16-byte divisibility when data_ptr % 16 == 0, ints
as i32 or i64, the int 1 as a constexpr, multiples of 16 marked divisible, floats as fp32, the
constexpr keyword arguments, num_warps and num_stages) and compiled with triton.compile for
GPUTarget("cuda", arch, 32). Registers, spills and static shared memory are read from the cubin
with cuobjdump --dump-resource-usage (Triton's shared memory is dynamic: metadata.shared, the
number Triton checks against the device's limit at launch), HGMMA counted in its SASS. Where a
kernel spills, the SASS also tells where: a verdict "spills outside loops" means no local-memory
access (STL, LDL) lies inside a loop (registers saved before the loops and restored after
them: a few accesses a program), "spills" that some do, every iteration.

The kernels must be real `triton.jit` functions, not the interpreter's: when emulation is
asked for (PYDL_INTERPRET, TRITON_INTERPRET) or pydl is already imported, the command runs
itself again in a fresh process with those variables removed.

Kernels launched next to a tuned one without a tuner of their own (cross-entropy's
`cross_entropy_mean_denominator` and `cross_entropy_scale_grad`, `attention_bwd_preprocess`)
are reported once per problem, with "-" as the candidate.

--all: every Triton kernel, not only the tuned ones. A kernel that runs in Triton's
interpreter can still fail to compile for a GPU (a plain Python float as a module global read
inside a kernel did), and each distinct specialization is its own compile. So the small
COVERAGE problems call pydl's public functions (softmax, log_softmax, cross_entropy in its
variants, the pools, conv2d with both algos, scaled_dot_product_attention flash and naive,
lstm / gru (packed too) and their cells; the shared GEMM's options, the attention dropout-mask
kernel and the recurrent layers' grid-barrier test kernel
directly) on the triton backend, forward and backward (torch.autograd.grad against random
cotangents), in fp32 and bf16, on sizes that are multiples of 16 and sizes that are not (Triton
specializes on 16-divisibility). Inputs hold real values, since the host reads some (target
range checks, the dropout seed); kernel outputs are uninitialised memory, as nothing runs.
pydl.backends.check_device refuses CPU tensors on the kernel backends outside emulation: the
capture relaxes it for the triton backend only and restores it afterwards; emulation stays
off (the launchers pick their tiles by it). Every launch is specialized as above and the rows
are deduplicated by compile job (kernel, signature, constexprs, divisibility attributes,
options), so each distinct specialization is compiled and reported once; a tuned kernel's
launch there is its default candidate (what runs untuned; its other candidates are compiled
for the PROBLEMS), and a kernel only a candidate launches (a layout route's, the GEMM's TMA
kernel) is launched once too. The table's last column says what distinguishes a row (its
constexprs and a signature summary: pointer dtypes, 16-divisible integer arguments, integers
specialized to 1); after it come the failures with their errors, the spills, and any kernel of
kernels/triton (a @triton.jit function no other one calls) that no problem launched.

Exit status: 0; 1 when a default configuration (what runs with PYDL_TUNE=0) or an untuned
kernel does not compile or does not fit the device, a problem's capture fails, --all leaves a
kernel of kernels/triton unlaunched, or the offline toolchain is missing; 2 on bad arguments.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
EMULATION_VARS = ("PYDL_INTERPRET", "TRITON_INTERPRET", "NUMBA_ENABLE_CUDASIM")

# Per-block shared memory (the opt-in maximum a launch may ask for) by compute capability; every
# listed architecture has 65536 32-bit registers per SM and at most 255 per thread.
MAX_SHARED = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGS_PER_SM = 65536
# Multiprocessors of the device the problems are sized for (H100 SXM): the conv weight
# gradient's split-K factor depends on it (pydl/_conv_implicit.py `_split_k`).
SMS = 132
FAILING = ("compile error", "too much shared memory", "too many registers")


# --- the representative problems -------------------------------------------------------------
# Each runs pydl's launchers once on CPU tensors (never touched: nothing executes); the
# shapes are the benchmark suites' (bench/suites/), bf16.

def gemm_problem(n: int):
    """An n x n x n bf16 GEMM, c = a @ b, all row-major."""
    def run():
        import torch

        from pydl._gemm import gemm
        a, b, c = (torch.empty(n, n, dtype=torch.bfloat16) for _ in range(3))
        gemm(a, b, c)
    return run


def gemm_head_problem(tokens: int, hidden: int, vocab: int):
    """A language model head's three bf16 GEMMs, as pydl.linear_cross_entropy's one chunk runs
    them: the logits x W^T (W stored (vocab, hidden)), the grad input G W and the grad weight
    G^T x (G the (tokens, vocab) logits' gradient, read along its rows as A^T)."""
    def run():
        import torch

        from pydl._gemm import gemm
        bf = torch.bfloat16
        x, w = torch.empty(tokens, hidden, dtype=bf), torch.empty(vocab, hidden, dtype=bf)
        g = torch.empty(tokens, vocab, dtype=bf)
        gemm(x, w, g, trans_b=True)
        gemm(g, w, torch.empty_like(x))
        gemm(g, x, torch.empty_like(w), trans_a=True)
    return run


def _conv_resnet_l1():
    """ResNet-50's layer1 3x3 conv (64 -> 64 channels, 56 x 56, padding 1), batch 32,
    channels_last input and weight: forward, grad input, grad weight."""
    import torch

    from pydl import conv
    cl, bf = torch.channels_last, torch.bfloat16
    x = torch.empty(32, 64, 56, 56, dtype=bf).contiguous(memory_format=cl)
    w = torch.empty(64, 64, 3, 3, dtype=bf).contiguous(memory_format=cl)
    g = conv.conv_geometry(tuple(x.shape), tuple(w.shape), 1, 1)
    y = torch.empty(g.N, g.OC, g.OH, g.OW, dtype=bf).contiguous(memory_format=cl)
    impl = conv.ALGOS["triton"]["implicit"]
    impl.forward(x, w, None, y, g)
    impl.backward_input(y, w, torch.empty_like(x), g)
    impl.backward_weight(y, x, torch.empty(w.shape, dtype=bf), g)


def _attention(causal: bool, dtype: str = "bfloat16", L: int = 4096, E: int = 128,
               tf32: bool = False):
    """FlashAttention-2's sweep point d128-4k (or another sequence length, head dim and
    dtype; fp32 with `tf32` as torch.backends.cuda.matmul.allow_tf32 = True runs it): B=4,
    H=16, L=S, no mask or dropout; forward, then the backward (preprocess, dK/dV, dQ)."""
    def run():
        import math

        import torch

        from pydl import _attention_ops as ops
        from pydl import attention as att
        B, H = 4, 16
        q, k, v, o, do, dq, dk, dv = (torch.empty(B, H, L, E, dtype=getattr(torch, dtype))
                                      for _ in range(8))
        lse = torch.empty(B * H, L, dtype=torch.float32)
        scale = 1.0 / math.sqrt(E)
        was = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            ops.launch_forward("triton", q, k, v, o, lse, None, att.MASK_NONE, causal, scale,
                               0.0, 0)
            ops.launch_backward("triton", q, k, v, o, lse, do, dq, dk, dv, None,
                                att.MASK_NONE, causal, scale, 0.0, 0, None)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = was
    return run


def _attention_hopper(causal: bool, E: int = 128, HKV: int = 16):
    """The same sweep point through algo="flash_hopper"'s forward (the Gluon kernel for
    Hopper, kernels/triton/attention_gluon.py; its backward is the flash backward above);
    HKV < 16 key heads: grouped-query attention."""
    def run():
        import math

        import torch

        from pydl import _attention_ops as ops
        from pydl import attention as att
        from pydl import attention_hopper
        B, H, L = 4, 16, 4096
        q, o = (torch.empty(B, H, L, E, dtype=torch.bfloat16) for _ in range(2))
        k, v = (torch.empty(B, HKV, L, E, dtype=torch.bfloat16) for _ in range(2))
        lse = torch.empty(B * H, L, dtype=torch.float32)
        ops.launch_forward(attention_hopper.LAUNCHER, q, k, v, o, lse, None, att.MASK_NONE,
                           causal, 1.0 / math.sqrt(E), 0.0, 0)
    return run


def _attention_onepass(causal: bool, launcher: str = "triton:flash_onepass", E: int = 128,
                       HKV: int = 16):
    """The same sweep point's backward through algo="flash_onepass" (the single-pass
    kernel, kernels/triton/attention_onepass.py, and its dQ conversion), or another
    launcher's (algo="flash_hopper_onepass": the Gluon single-pass backward); HKV < 16 key
    heads: grouped-query heads."""
    def run():
        import math

        import torch

        from pydl import _attention_ops as ops
        from pydl import attention as att
        B, H, L = 4, 16, 4096
        q, o, do, dq = (torch.empty(B, H, L, E, dtype=torch.bfloat16) for _ in range(4))
        k, v, dk, dv = (torch.empty(B, HKV, L, E, dtype=torch.bfloat16) for _ in range(4))
        lse = torch.empty(B * H, L, dtype=torch.float32)
        ops.launch_backward(launcher, q, k, v, o, lse, do, dq, dk, dv, None, att.MASK_NONE,
                            causal, 1.0 / math.sqrt(E), 0.0, 0, None)
    return run


def _images(C: int, H: int, channels_last: bool):
    """A pooling problem's input: 32 images of C x H x H, bf16, channels_last or NCHW (no
    data: the launches are captured, not run)."""
    import torch
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(32, C, H, H, dtype=torch.bfloat16).contiguous(memory_format=fmt)


def _max_pool(C: int, H: int, kernel: int, stride: int, padding: int, channels_last: bool,
              training: bool = True):
    """A max pool of the benchmark's suite (bench/suites/pool.py) on its C x H x H bf16 input
    at batch 32, channels_last or NCHW: the training forward (one-byte window argmax) and its
    backward, or (training=False) the inference forward the benchmark's forward row times (no
    index: another specialization)."""
    def run():
        import torch

        from pydl import _pool_ops as ops
        from pydl import pool
        from pydl._library import geometry_args
        x = _images(C, H, channels_last)
        g = pool._geometry(x.shape, kernel, stride, padding, 1, False)
        geom = geometry_args(g)
        if not training:
            ops._max_pool2d_fwd(x, geom, ops.INDEX_NONE, "triton")
            return
        y, idx = ops._max_pool2d_fwd(x, geom, ops.INDEX_LOCAL, "triton")
        ops._max_pool2d_bwd(torch.empty_like(y), idx, ops.INDEX_LOCAL, geom, channels_last,
                            "triton")
    return run


def _global_pool(C: int, H: int, channels_last: bool):
    """Global average pooling (adaptive_avg_pool2d to 1x1) of a C x H x H bf16 input at batch
    32, forward and backward: the classifier heads of bench/suites/pool.py."""
    def run():
        from pydl import pool
        x = _images(C, H, channels_last).requires_grad_()
        _grad([pool.adaptive_avg_pool2d(x, 1, backend="triton")], [x])
    return run


def _avg_pool(C: int, H: int, kernel: int, stride: int, padding: int, channels_last: bool):
    """An average pool of bench/suites/pool.py on its C x H x H bf16 input at batch 32,
    forward and backward (count_include_pad, torch's default)."""
    def run():
        from pydl import pool
        x = _images(C, H, channels_last).requires_grad_()
        _grad([pool.avg_pool2d(x, kernel, stride, padding, backend="triton")], [x])
    return run


def _rnn_layer(kind: str, hidden: int, batch: int, algo: str | None = None,
               recompute: bool = False):
    """One fp16 torch.nn.LSTM / GRU layer of the DeepBench suites (input = hidden), forward and
    backward through time on the GPU's schedule (the persistent recurrence, one cooperative
    launch per direction; or algo="steps"); 4 steps, as the step count changes no kernel.
    recompute: the activations recomputed in the backward (whose gradients then go in their
    place: the GRU's IN_WS, the LSTM's IN_ACTS)."""
    def run():
        import torch

        import pydl
        G = 4 if kind == "lstm" else 3
        f16 = torch.float16
        x = torch.randn(4, batch, hidden, dtype=f16, requires_grad=True)
        w = [torch.randn(*s, dtype=f16, requires_grad=True)
             for s in ((G * hidden, hidden), (G * hidden, hidden), (G * hidden,), (G * hidden,))]
        out = getattr(pydl, kind)(x, None, w, algo=algo, recompute=recompute)[0]
        torch.autograd.grad(out, [x, *w], torch.randn_like(out))
    return run


def _conv_layer(C: int, OC: int, K: int, S: int, H: int, x_grad: bool = True,
                groups: int = 1, algo: str | None = None, channels_last: bool = True):
    """A ResNet-50 convolution at batch 32 (bench/suites/conv.py), bf16, input and weight
    channels_last (else NCHW, the full set's "-nchw" layers), through pydl.conv2d forward and
    backward as the benchmark runs it: its upstream gradient comes from torch.randn, so it is
    NCHW. groups = C: a depthwise layer (MobileNetV2, ConvNeXt) at the same batch."""
    def run():
        import torch

        import pydl
        cl = torch.channels_last if channels_last else torch.contiguous_format
        bf = torch.bfloat16
        x = torch.empty(32, C, H, H, dtype=bf).contiguous(memory_format=cl)
        w = torch.empty(OC, C // groups, K, K, dtype=bf).contiguous(
            memory_format=cl).requires_grad_()
        y = pydl.conv2d(x.requires_grad_(x_grad), w, None, S, K // 2, groups=groups, algo=algo)
        torch.autograd.grad(y, [x, w] if x_grad else [w], torch.empty(y.shape, dtype=bf))
    return run


def _conv1d_layer(N: int, C: int, OC: int, K: int, S: int, L: int, padding: int,
                  groups: int = 1, channels_last: bool = False):
    """A conv1d of bench/suites/conv.py (Whisper's stem, Mamba's mixer conv), bf16, through
    pydl.conv1d forward and backward as the benchmark runs it: channels_last an (N, L, C)
    input transposed, with its upstream gradient in the output's layout."""
    def run():
        import torch

        import pydl
        bf = torch.bfloat16
        x = (torch.empty(N, L, C, dtype=bf).transpose(1, 2) if channels_last
             else torch.empty(N, C, L, dtype=bf)).requires_grad_()
        w = torch.empty(OC, C // groups, K, dtype=bf, requires_grad=True)
        y = pydl.conv1d(x, w, None, S, padding, groups=groups)
        torch.autograd.grad(y, [x, w], torch.empty_like(y))
    return run


def _cross_entropy_vocab(n: int, c: int):
    """cross_entropy(logits (n, c) bf16, class indices), mean, as the benchmark runs it:
    training (forward and backward, upstream gradient 1) and the inference forward."""
    def run():
        import torch

        import pydl
        x = torch.empty(n, c, dtype=torch.bfloat16, requires_grad=True)
        t = torch.randint(0, c, (n,))
        pydl.cross_entropy(x, t).backward()
        with torch.no_grad():
            pydl.cross_entropy(x, t)
    return run


def _cross_entropy_soft(n: int, c: int):
    """cross_entropy(logits (n, c) bf16, class probabilities), mean, as the soft suite runs
    it: training (the gradient written by the forward, scaled by the backward) and the
    inference forward."""
    def run():
        import torch

        import pydl
        x = torch.empty(n, c, dtype=torch.bfloat16, requires_grad=True)
        y = torch.empty(n, c, dtype=torch.bfloat16)
        pydl.cross_entropy(x, y).backward()
        with torch.no_grad():
            pydl.cross_entropy(x, y)
    return run


def _softmax_rows(rows: int, n: int):
    """softmax over the last dim of a (rows, n) bf16 input, forward and backward, as the
    benchmark's softmax suite runs it (attention scores, vocabularies)."""
    def run():
        import torch

        import pydl
        x = torch.empty(rows, n, dtype=torch.bfloat16, requires_grad=True)
        _grad([pydl.softmax(x, -1)], [x])
    return run


# (family, case name, runner)
PROBLEMS = (
    ("gemm", "4096^3", gemm_problem(4096)),
    ("gemm", "llama3-8b head", gemm_head_problem(4096, 4096, 128256)),
    ("conv", "l1-3x3-64 n32", _conv_resnet_l1),
    ("conv", "l1-3x3-64 bench", _conv_layer(64, 64, 3, 1, 56)),
    ("conv", "l3-1x1-1024-256", _conv_layer(1024, 256, 1, 1, 14)),
    ("conv", "l1-1x1-64-256", _conv_layer(64, 256, 1, 1, 56)),      # one K step (K = 64)
    ("conv", "stem 7x7/2", _conv_layer(3, 64, 7, 2, 224, x_grad=False)),
    ("conv", "stem 7x7/2 +dx", _conv_layer(3, 64, 7, 2, 224)),
    ("conv", "stem 7x7/2 nchw", _conv_layer(3, 64, 7, 2, 224, x_grad=False,
                                            channels_last=False)),
    ("conv", "l2-3x3s2-128", _conv_layer(128, 128, 3, 2, 56)),
    ("conv", "l2-3x3s2-128 nchw", _conv_layer(128, 128, 3, 2, 56, channels_last=False)),
    ("conv", "l1-3x3-64 im2col", _conv_layer(64, 64, 3, 1, 56, algo="im2col")),
    ("conv", "mbv2 dw 3x3 32 112^2", _conv_layer(32, 32, 3, 1, 112, groups=32)),
    ("conv", "mbv2 dw 3x3 32 112^2 nchw", _conv_layer(32, 32, 3, 1, 112, groups=32,
                                                     channels_last=False)),
    ("conv", "mbv2 dw 3x3/2 144 56^2", _conv_layer(144, 144, 3, 2, 56, groups=144)),
    ("conv", "convnext dw 7x7 96 56^2", _conv_layer(96, 96, 7, 1, 56, groups=96)),
    ("conv", "conv1d whisper-base-conv1", _conv1d_layer(16, 80, 512, 3, 1, 3000, 1)),
    ("conv", "conv1d whisper-base-conv2", _conv1d_layer(16, 512, 512, 3, 2, 3000, 1)),
    ("conv", "conv1d mamba-1.4b dw k4", _conv1d_layer(8, 4096, 4096, 4, 1, 2048, 3,
                                                      groups=4096, channels_last=True)),
    ("cross_entropy", "v32k bf16", _cross_entropy_vocab(8192, 32768)),
    ("cross_entropy", "distill-v32k soft bf16", _cross_entropy_soft(8192, 32768)),
    ("softmax", "attn-2k bf16", _softmax_rows(32 * 2048, 2048)),
    ("softmax", "vocab-32k bf16", _softmax_rows(8192, 32768)),
    ("attention", "d128-4k", _attention(False)),
    ("attention", "d128-4k-causal", _attention(True)),
    # fp32 without TF32 (torch's default for matmuls): tl.dot's IEEE products on the CUDA
    # cores, whose register needs set the fp32 tiles
    ("attention", "d64-1k fp32", _attention(False, "float32", 1024, 64)),
    ("attention", "d64-1k fp32 tf32", _attention(False, "float32", 1024, 64, tf32=True)),
    ("attention", "d128-1k fp32", _attention(False, "float32", 1024, 128)),
    ("attention", "d128-4k hopper", _attention_hopper(False)),
    ("attention", "d128-4k-causal hopper", _attention_hopper(True)),
    ("attention", "d64-4k hopper", _attention_hopper(False, E=64)),
    ("attention", "d128-4k-causal gqa4 hopper", _attention_hopper(True, HKV=4)),
    ("attention", "d128-4k onepass", _attention_onepass(False)),
    ("attention", "d128-4k-causal onepass", _attention_onepass(True)),
    ("attention", "d128-4k hopper_onepass",
     _attention_onepass(False, "triton:flash_hopper_onepass")),
    ("attention", "d128-4k-causal hopper_onepass",
     _attention_onepass(True, "triton:flash_hopper_onepass")),
    ("attention", "d64-4k hopper_onepass",
     _attention_onepass(False, "triton:flash_hopper_onepass", E=64)),
    ("attention", "d128-4k-causal gqa4 hopper_onepass",
     _attention_onepass(True, "triton:flash_hopper_onepass", HKV=4)),
    ("pool", "stem3x3s2 cl", _max_pool(64, 112, 3, 2, 1, True)),       # ResNet-50's stem pool
    ("pool", "stem3x3s2 nchw", _max_pool(64, 112, 3, 2, 1, False)),
    ("pool", "vgg224 2x2s2 cl", _max_pool(64, 224, 2, 2, 0, True)),     # VGG-16 pool1
    ("pool", "vgg28 2x2s2 cl", _max_pool(512, 28, 2, 2, 0, True)),      # VGG-16 pool4
    ("pool", "alexnet55 3x3s2 cl", _max_pool(64, 55, 3, 2, 0, True)),   # AlexNet pool1
    ("pool", "stem infer cl", _max_pool(64, 112, 3, 2, 1, True, training=False)),
    ("pool", "stem infer nchw", _max_pool(64, 112, 3, 2, 1, False, training=False)),
    ("pool", "r50 head cl", _global_pool(2048, 7, True)),         # ResNet-50's global pool
    ("pool", "densenet56 2x2s2 cl", _avg_pool(128, 56, 2, 2, 0, True)),     # transition1
    ("pool", "densenet56 2x2s2 nchw", _avg_pool(128, 56, 2, 2, 0, False)),
    ("pool", "inception35 3x3s1 cl", _avg_pool(192, 35, 3, 1, 1, True)),   # Mixed_5b pool
    ("pool", "r50 head nchw", _global_pool(2048, 7, False)),
    ("lstm", "h1024-b32", _rnn_layer("lstm", 1024, 32)),
    ("lstm", "h1024-b32 recompute", _rnn_layer("lstm", 1024, 32, recompute=True)),
    ("lstm", "h512-b64", _rnn_layer("lstm", 512, 64)),
    ("lstm", "h2048-b16", _rnn_layer("lstm", 2048, 16)),
    ("lstm", "h2048-b128", _rnn_layer("lstm", 2048, 128)),
    ("lstm", "h256-b32 steps", _rnn_layer("lstm", 256, 32, "steps")),
    ("gru", "h1536-b32", _rnn_layer("gru", 1536, 32)),
    ("gru", "h1536-b32 recompute", _rnn_layer("gru", 1536, 32, recompute=True)),
    ("gru", "h2048-b32", _rnn_layer("gru", 2048, 32)),
    ("gru", "h2560-b32", _rnn_layer("gru", 2560, 32)),
    ("gru", "h1024-b64", _rnn_layer("gru", 1024, 64)),
)


# --- coverage (--all): every Triton kernel through the public functions ------------------------
# Small problems that together launch every kernel of kernels/triton/*.py, forward and backward,
# in fp32 and bf16, through pydl's public functions on the triton backend (a few internal
# entry points where there is no public one: the shared GEMM's options, the dropout-mask test
# kernel). Each distinct compile job (constexprs, dtypes, 16-divisibility) is compiled once.
# Shapes come in two kinds: "16" (every size a multiple of 16) and "odd" (none), since Triton
# specializes integer arguments and pointers on 16-divisibility. Inputs hold real values (the
# host reads some: cross-entropy checks its targets, attention its dropout seed); what the
# kernels would write is uninitialised memory, as nothing runs.

COVERAGE_DTYPES = ("fp32", "bf16")


def _dtype(name: str):
    import torch
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def _rand(*shape, dtype, grad=False, channels_last=False):
    import torch
    t = torch.randn(*shape).to(_dtype(dtype))
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)


def _grad(outputs, inputs) -> None:
    """torch.autograd.grad of the outputs that require one, against random cotangents of
    their shapes and layouts, for the inputs that require one."""
    import torch
    outs = [o for o in (outputs if isinstance(outputs, (tuple, list)) else (outputs,))
            if isinstance(o, torch.Tensor) and o.requires_grad]
    ins = [i for i in inputs if isinstance(i, torch.Tensor) and i.requires_grad]
    torch.autograd.grad(outs, ins, [torch.randn_like(o) for o in outs], allow_unused=True)


def _cov_softmax(dtype: str, shape: tuple, dim: int):
    """softmax and log_softmax over `dim`, forward and backward."""
    def run():
        import pydl
        for fn in (pydl.softmax, pydl.log_softmax):
            x = _rand(*shape, dtype=dtype, grad=True)
            _grad(fn(x, dim), [x])
    return run


def _cov_cross_entropy(dtype: str, shape: tuple):
    """cross_entropy on (N, C, ...) logits: class indices (mean; weights, ignore_index and
    label smoothing summed; per-row losses), class probabilities (weights and smoothing, the
    target's gradient too; a sum trained with the gradient from the forward; plain per-row
    losses; a learned class weight), logits capped as read (softcap: a trained mean with a
    z-loss, per-row losses), forward and backward."""
    def run():
        import torch

        import pydl
        N, C = shape[0], shape[1]
        rest = tuple(shape[2:])
        x = _rand(*shape, dtype=dtype, grad=True)
        t = torch.randint(0, C, (N, *rest))
        w = torch.rand(C).to(_dtype(dtype))
        pydl.cross_entropy(x, t).backward()
        t_ign = t.clone()
        t_ign.view(-1)[::3] = 1                       # ignore_index=1 rows
        pydl.cross_entropy(x, t_ign, weight=w, ignore_index=1, reduction="sum",
                           label_smoothing=0.1).backward()
        _grad(pydl.cross_entropy(x, t, reduction="none"), [x])
        pydl.cross_entropy(x, t, softcap=30.0, z_loss=1e-4).backward()
        _grad(pydl.cross_entropy(x, t, reduction="none", softcap=30.0), [x])
        y = torch.softmax(torch.randn(*shape), 1).to(_dtype(dtype)).requires_grad_(True)
        pydl.cross_entropy(x, y, weight=w, label_smoothing=0.2).backward()
        pydl.cross_entropy(x, y.detach(), reduction="sum").backward()
        _grad(pydl.cross_entropy(x, y.detach(), reduction="none"), [x])
        learned = w.clone().requires_grad_(True)        # the class weights' gradient kernel
        _grad(pydl.cross_entropy(x, y.detach(), weight=learned, reduction="none"), [x, learned])
    return run


def _cov_linear_cross_entropy(dtype: str, n: int, h: int, v: int):
    """linear_cross_entropy in chunks: a trained mean with a bias (the cross-entropy forward
    writing its gradient over the chunk's logits, IN_PLACE; the shared GEMMs of the logits,
    dh, dW through its fp32 accumulator, db), and per-row losses (the recompute backward);
    capped logits (softcap: the GEMM's tanh epilogue, the gradient kernels' factor) in one
    chunk (the forward's own mean denominator) and per row (with a z-loss)."""
    def run():
        import torch

        import pydl
        x = _rand(n, h, dtype=dtype, grad=True)
        w = _rand(v, h, dtype=dtype, grad=True)
        b = _rand(v, dtype=dtype, grad=True)
        t = torch.randint(0, v, (n,))
        pydl.linear_cross_entropy(x, w, t, b, label_smoothing=0.1, chunk_rows=n // 3 + 1) \
            .backward()
        _grad(pydl.linear_cross_entropy(x, w, t, reduction="none", chunk_rows=n // 2), [x, w])
        pydl.linear_cross_entropy(x, w, t, b, softcap=30.0).backward()
        _grad(pydl.linear_cross_entropy(x, w, t, reduction="none", softcap=30.0, z_loss=1e-4),
              [x, w])
    return run


def _cov_pool(dtype: str, shape: tuple, channels_last: bool):
    """max_pool2d (training: window argmax; return_indices with ceil_mode; inference without
    indices; dilation), avg_pool2d (plain; ceil_mode without the padding in the count;
    divisor_override) and adaptive_avg_pool2d (global, and an output that does not divide
    the input), forward and backward."""
    def run():
        import torch

        import pydl
        x = _rand(*shape, dtype=dtype, grad=True, channels_last=channels_last)
        _grad(pydl.max_pool2d(x, 3, 2, 1), [x])
        y, _ = pydl.max_pool2d(x, 2, 2, ceil_mode=True, return_indices=True)
        _grad(y, [x])
        with torch.no_grad():
            pydl.max_pool2d(x, 3, 2, 1)
        _grad(pydl.max_pool2d(x, 3, 1, 1, dilation=2), [x])
        _grad(pydl.avg_pool2d(x, 2), [x])
        _grad(pydl.avg_pool2d(x, 3, 2, 1, ceil_mode=True, count_include_pad=False), [x])
        _grad(pydl.avg_pool2d(x, 3, 1, 1, divisor_override=4), [x])
        _grad(pydl.adaptive_avg_pool2d(x, 1), [x])
        _grad(pydl.adaptive_avg_pool2d(x, (3, 5)), [x])
    return run


def _cov_conv(dtype: str, algo: str, x_shape: tuple, w_shape: tuple, stride=1, padding=0,
              groups=1, bias=True, channels_last=False, x_grad=True, workspace=None):
    """conv2d with `algo`, forward and backward (input, weight, bias). channels_last: input
    and weight. workspace: IM2COL_WORKSPACE_BYTES for this call (small: the batch in chunks,
    the weight gradient summed over them)."""
    def run():
        import pydl
        from pydl import _conv_im2col
        x = _rand(*x_shape, dtype=dtype, grad=x_grad, channels_last=channels_last)
        w = _rand(*w_shape, dtype=dtype, grad=True, channels_last=channels_last)
        b = _rand(w_shape[0], dtype=dtype, grad=True) if bias else None
        saved = _conv_im2col.IM2COL_WORKSPACE_BYTES
        if workspace is not None:
            _conv_im2col.IM2COL_WORKSPACE_BYTES = workspace
        try:
            y = pydl.conv2d(x, w, b, stride, padding, 1, groups, algo=algo)
            _grad(y, [x, w, b])
        finally:
            _conv_im2col.IM2COL_WORKSPACE_BYTES = saved
    return run


def _cov_gemm(dtype: str, m: int, n: int, k: int):
    """The shared GEMM's options (pydl/_gemm.py; no public function): bias and alpha,
    accumulate into the output, an addend of another dtype, transposed operands, TF32,
    batches."""
    def run():
        import torch

        from pydl._gemm import gemm
        dt = _dtype(dtype)
        a, b = _rand(m, k, dtype=dtype), _rand(k, n, dtype=dtype)
        out = torch.empty(m, n, dtype=dt)
        gemm(a, b, out, bias=_rand(n, dtype=dtype), alpha=0.5)
        gemm(a, b, out, accumulate=True)
        gemm(a, b, out, addend=torch.empty(m, n))
        gemm(a.t().contiguous(), b.t().contiguous(), out, trans_a=True, trans_b=True)
        gemm(a, b.t().contiguous(), out, trans_b=True, input_precision="tf32")   # x W^T in TF32
        # a batch (B per batch: a batch by one broadcast B folds into one matrix)
        gemm(_rand(3, 2, m, k, dtype=dtype), _rand(3, 2, k, n, dtype=dtype),
             torch.empty(3, 2, m, n, dtype=dt))
    return run


def _cov_attention_split(dtype: str, L: int, E: int, HKV: int):
    """The split-keys forward (attention_fwd_split) at the GPU's key tile: a query or a few
    per head against 4 tiles of keys split 4 ways (no mask, causal, bool and float masks,
    grouped heads when HKV < 2), under no_grad and with the backward on its lse."""
    def run():
        import torch

        import pydl
        from pydl import _attention_triton as at
        block = at.SPLIT_BLOCK_N_IEEE if dtype == "fp32" else at.SPLIT_BLOCK_N
        with at.forced_split(block):
            S = 4 * block
            for kw in (dict(), dict(is_causal=True), dict(attn_mask=torch.rand(L, S) > 0.3),
                       dict(attn_mask=_rand(1, 1, L, S, dtype=dtype))):
                q = _rand(1, 2, L, E, dtype=dtype, grad=True)
                k, v = (_rand(1, HKV, S, E, dtype=dtype, grad=True) for _ in range(2))
                _grad(pydl.scaled_dot_product_attention(q, k, v, enable_gqa=HKV < 2, **kw),
                      [q, k, v])
    return run


def _cov_attention(dtype: str, B: int, H: int, L: int, S: int, E: int, EV: int, HKV: int):
    """scaled_dot_product_attention, forward and backward: flash (no mask, causal, a bool
    mask broadcast over batch and heads, a float mask per batch, one that requires grad,
    dropout, with the seed in memory as inside CUDA graph capture, grouped-query heads when
    HKV < H), naive (no mask, causal, bool and float masks,
    one that requires grad), flash_onepass (no mask, causal, grouped-query heads),
    flash_hopper and flash_hopper_onepass where they run (the same), each where the current
    backend has it; the weights
    MultiheadAttention(need_weights=True) returns (no mask, bool and float masks, dropout)
    with their gradient;
    and the dropout-mask kernel the tests compare against."""
    def run():
        import torch

        import pydl
        from pydl import attention, attention_hopper
        from pydl.backends import algorithms, current_backend
        has = algorithms("scaled_dot_product_attention", current_backend())

        def qkv(hkv):
            return (_rand(B, H, L, E, dtype=dtype, grad=True),
                    _rand(B, hkv, S, E, dtype=dtype, grad=True),
                    _rand(B, hkv, S, EV, dtype=dtype, grad=True))

        sdpa = pydl.scaled_dot_product_attention
        bool_mask = torch.rand(L, S) > 0.3
        float_mask = _rand(B, 1, L, S, dtype=dtype)
        for kw in (dict(), dict(attn_mask=bool_mask), dict(attn_mask=float_mask),
                   dict(dropout_p=0.1)):        # the weights and their backward too
            q, k, v = qkv(H)
            _grad(attention.attention_with_weights(q, k, v, **kw), [q, k, v])
        for algo in [a for a in ("flash", "naive") if a in has]:
            for kw in (dict(), dict(is_causal=True), dict(attn_mask=bool_mask),
                       dict(attn_mask=float_mask)):
                q, k, v = qkv(H)
                _grad(sdpa(q, k, v, algo=algo, **kw), [q, k, v])
            q, k, v = qkv(H)
            learned_bias = _rand(B, 1, L, S, dtype=dtype, grad=True)     # its gradient: dS
            _grad(sdpa(q, k, v, attn_mask=learned_bias, algo=algo), [q, k, v, learned_bias])
        q, k, v = qkv(H)
        _grad(sdpa(q, k, v, dropout_p=0.1), [q, k, v])
        if current_backend() == "triton":       # inside CUDA graph capture: a device seed
            from unittest import mock

            from pydl import _attention_seed
            with mock.patch.object(attention, "capturing", lambda: True), \
                    mock.patch.object(_attention_seed, "capturing", lambda: True):
                q, k, v = qkv(H)
                _grad(sdpa(q, k, v, dropout_p=0.1), [q, k, v])
                q, k, v = qkv(H)
                _grad(attention.attention_with_weights(q, k, v, dropout_p=0.1), [q, k, v])
        algos = tuple(a for a in ("flash", "naive", "flash_onepass") if a in has)
        for kw in (dict(), dict(is_causal=True)) if "flash_onepass" in has else ():
            q, k, v = qkv(H)
            _grad(sdpa(q, k, v, algo="flash_onepass", **kw), [q, k, v])
        if "flash_hopper" in has and attention_hopper.unsupported(q, k, v, None, 0.0, 1.0) is None:
            # bf16, head dims 64 / 128 (the target is sm_90); flash_hopper_onepass's backward
            # is the Gluon one with a key head per query head, the flash one with fewer
            hopper = ("flash_hopper", "flash_hopper_onepass")
            algos += hopper
            for algo in hopper:
                for kw in (dict(), dict(is_causal=True)):
                    q, k, v = qkv(H)
                    _grad(sdpa(q, k, v, algo=algo, **kw), [q, k, v])
        if HKV != H:
            for algo in algos:
                q, k, v = qkv(HKV)
                _grad(sdpa(q, k, v, is_causal=True, enable_gqa=True, algo=algo), [q, k, v])
        attention.LAUNCHERS[current_backend()].dropout_mask(B, H, L, S, 0.1, 1234, q.device)
    return run


def _rnn_weights(gates: int, I: int, H: int, layers: int, D: int, bias: bool, dtype: str,
                 proj: int = 0) -> list:
    """torch.nn.LSTM / GRU's flat weights (per layer and direction: w_ih, w_hh, b_ih, b_hh,
    then w_hr (proj, H) with projections), requiring gradients."""
    P = proj or H
    out = []
    for layer in range(layers):
        for _ in range(D):
            out += [_rand(gates * H, I if layer == 0 else D * P, dtype=dtype, grad=True),
                    _rand(gates * H, P, dtype=dtype, grad=True)]
            if bias:
                out += [_rand(gates * H, dtype=dtype, grad=True) for _ in range(2)]
            if proj:
                out.append(_rand(proj, H, dtype=dtype, grad=True))
    return out


def _cov_lstm(dtype: str, T: int, B: int, I: int, H: int, steps_only: bool = False):
    """lstm, forward and backward: one layer from given states; two bidirectional layers,
    batch first, with dropout between them; projections (proj_size H / 2); recompute (all on
    the GPU's default, the persistent recurrence); algo="steps" (one launch per step) with
    and without states; lstm_cell with and without states and biases. steps_only: the
    algo="steps" cases only."""
    def run():
        import pydl
        x = _rand(T, B, I, dtype=dtype, grad=True)
        if steps_only:
            return steps(x)
        h0, c0 = _rand(1, B, H, dtype=dtype, grad=True), _rand(1, B, H, dtype=dtype, grad=True)
        w = _rnn_weights(4, I, H, 1, 1, True, dtype)
        out, (hn, cn) = pydl.lstm(x, (h0, c0), w)
        _grad((out, hn, cn), [x, h0, c0, *w])
        w = _rnn_weights(4, I, H, 2, 2, True, dtype)
        xb = _rand(B, T, I, dtype=dtype, grad=True)
        out, (hn, cn) = pydl.lstm(xb, None, w, num_layers=2, bidirectional=True,
                                  batch_first=True, dropout=0.5, training=True)
        _grad((out, hn), [xb, *w])
        P = max(1, H // 2)
        w = _rnn_weights(4, I, H, 1, 1, True, dtype, proj=P)
        h0p = _rand(1, B, P, dtype=dtype, grad=True)
        out, (hn, cn) = pydl.lstm(x, (h0p, c0), w)
        _grad((out, hn, cn), [x, h0p, c0, *w])
        w = _rnn_weights(4, I, H, 1, 1, False, dtype)
        out, (hn, cn) = pydl.lstm(x, (h0, c0), w, bias=False, recompute=True)
        _grad((out, hn, cn), [x, h0, c0, *w])
        steps(x)
        w_ih, w_hh, b_ih, b_hh = _rnn_weights(4, I, H, 1, 1, True, dtype)
        xc = _rand(B, I, dtype=dtype, grad=True)
        hc, cc = _rand(B, H, dtype=dtype, grad=True), _rand(B, H, dtype=dtype, grad=True)
        _grad(pydl.lstm_cell(xc, (hc, cc), w_ih, w_hh, b_ih, b_hh), [xc, hc, cc, w_ih, w_hh,
                                                                   b_ih, b_hh])
        _grad(pydl.lstm_cell(xc, None, w_ih, w_hh), [xc, w_ih, w_hh])

    def steps(x):
        import pydl
        w = _rnn_weights(4, I, H, 1, 2, True, dtype)
        h0, c0 = _rand(2, B, H, dtype=dtype, grad=True), _rand(2, B, H, dtype=dtype, grad=True)
        out, (hn, cn) = pydl.lstm(x, (h0, c0), w, bidirectional=True, algo="steps")
        _grad((out, hn, cn), [x, h0, c0, *w])
        w = _rnn_weights(4, I, H, 1, 1, True, dtype)
        _grad(pydl.lstm(x, None, w, algo="steps")[0], [x, *w])
    return run


def _cov_rnn_packed(dtype: str):
    """lstm (with and without projections) and gru on a PackedSequence (the packed
    recurrence: rows past a sequence's end keep their state), bidirectional, forward and
    backward; and the grid barrier's own test kernel (tests/test_rnn_persistent.py)."""
    def run():
        import torch
        from torch.nn.utils.rnn import pack_padded_sequence

        import pydl
        from pydl import _rnn_launch
        for kind, G, proj in (("lstm", 4, 0), ("lstm", 4, 8), ("gru", 3, 0)):
            x = _rand(5, 3, 8, dtype=dtype, grad=True)
            seq = pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
            w = _rnn_weights(G, 8, 16, 1, 2, True, dtype, proj)
            out = getattr(pydl, kind)(seq, None, w, bidirectional=True)[0]
            _grad(out.data, [x, *w])
        _rnn_launch.grid_barrier_check(torch.device("cpu"), 8, 2)
    return run


def _cov_gru(dtype: str, T: int, B: int, I: int, H: int):
    """gru, forward and backward: one layer from a given state; two bidirectional layers,
    batch first, with dropout; recompute without biases; gru_cell with and without a state
    and biases."""
    def run():
        import pydl
        x = _rand(T, B, I, dtype=dtype, grad=True)
        h0 = _rand(1, B, H, dtype=dtype, grad=True)
        w = _rnn_weights(3, I, H, 1, 1, True, dtype)
        _grad(pydl.gru(x, h0, w), [x, h0, *w])
        w = _rnn_weights(3, I, H, 2, 2, True, dtype)
        xb = _rand(B, T, I, dtype=dtype, grad=True)
        _grad(pydl.gru(xb, None, w, num_layers=2, bidirectional=True, batch_first=True,
                       dropout=0.5, training=True), [xb, *w])
        w = _rnn_weights(3, I, H, 1, 1, False, dtype)
        _grad(pydl.gru(x, h0, w, bias=False, recompute=True), [x, h0, *w])
        w_ih, w_hh, b_ih, b_hh = _rnn_weights(3, I, H, 1, 1, True, dtype)
        xc, hc = _rand(B, I, dtype=dtype, grad=True), _rand(B, H, dtype=dtype, grad=True)
        _grad(pydl.gru_cell(xc, hc, w_ih, w_hh, b_ih, b_hh), [xc, hc, w_ih, w_hh, b_ih, b_hh])
        _grad(pydl.gru_cell(xc, None, w_ih, w_hh), [xc, w_ih, w_hh])
    return run


def _coverage() -> tuple:
    """(family, case, runner) of every coverage problem, each in COVERAGE_DTYPES."""
    out = []
    for dt in COVERAGE_DTYPES:
        out += [
            ("softmax", f"{dt} 32x64", _cov_softmax(dt, (32, 64), -1)),
            ("softmax", f"{dt} 7x33", _cov_softmax(dt, (7, 33), -1)),
            ("softmax", f"{dt} 4x33x5 dim1", _cov_softmax(dt, (4, 33, 5), 1)),
            ("softmax", f"{dt} 3x5000", _cov_softmax(dt, (3, 5000), -1)),
            ("cross_entropy", f"{dt} 32x64", _cov_cross_entropy(dt, (32, 64))),
            ("cross_entropy", f"{dt} 6x10x7", _cov_cross_entropy(dt, (6, 10, 7))),
            ("cross_entropy", f"{dt} 3x5000", _cov_cross_entropy(dt, (3, 5000))),
            ("cross_entropy", f"{dt} linear 24x32>300",
             _cov_linear_cross_entropy(dt, 24, 32, 300)),
            ("pool", f"{dt} 2x32x16x16", _cov_pool(dt, (2, 32, 16, 16), False)),
            ("pool", f"{dt} 2x32x16x16 cl", _cov_pool(dt, (2, 32, 16, 16), True)),
            ("pool", f"{dt} 3x5x17x13", _cov_pool(dt, (3, 5, 17, 13), False)),
            ("pool", f"{dt} 3x5x17x13 cl", _cov_pool(dt, (3, 5, 17, 13), True)),
            ("gemm", f"{dt} 64x48x32", _cov_gemm(dt, 64, 48, 32)),
            ("gemm", f"{dt} 33x17x50", _cov_gemm(dt, 33, 17, 50)),
            ("gemm", f"{dt} 256x256x128", _cov_gemm(dt, 256, 256, 128)),   # TMA tiles (bf16)
        ]
        for algo in ("implicit", "im2col"):
            a = algo[:3]
            out += [
                ("conv", f"{dt} {a} 3x3 32>64 16^2",
                 _cov_conv(dt, algo, (2, 32, 16, 16), (64, 32, 3, 3), 1, 1)),
                ("conv", f"{dt} {a} 3x3 32>64 16^2 cl",
                 _cov_conv(dt, algo, (2, 32, 16, 16), (64, 32, 3, 3), 1, 1,
                           channels_last=True)),
                ("conv", f"{dt} {a} 3x3/2 24>20 13x11",
                 _cov_conv(dt, algo, (3, 24, 13, 11), (20, 24, 3, 3), 2, 1)),
                ("conv", f"{dt} {a} stem 7x7/2 3>64",
                 _cov_conv(dt, algo, (2, 3, 32, 32), (64, 3, 7, 7), 2, 3, bias=False,
                           x_grad=False)),
                ("conv", f"{dt} {a} stem 7x7/2 3>64 cl",
                 _cov_conv(dt, algo, (2, 3, 32, 32), (64, 3, 7, 7), 2, 3, bias=False,
                           channels_last=True, x_grad=False)),
                ("conv", f"{dt} {a} dw 3x3 32 cl",
                 _cov_conv(dt, algo, (2, 32, 16, 16), (32, 1, 3, 3), 1, 1, groups=32,
                           channels_last=True)),
                ("conv", f"{dt} {a} dw 3x3/2 x2 12 nchw",
                 _cov_conv(dt, algo, (2, 12, 15, 13), (24, 1, 3, 3), 2, 1, groups=12)),
                ("conv", f"{dt} {a} 1x1 64>32 odd",
                 _cov_conv(dt, algo, (3, 64, 9, 7), (32, 64, 1, 1), bias=False)),
            ]
        out += [
            ("conv", f"{dt} im2 3x3 chunks",
             _cov_conv(dt, "im2col", (3, 16, 8, 8), (32, 16, 3, 3), 1, 1,
                       workspace=8 * 8 * 16 * 9 * 4)),
            ("attention", f"{dt} 2x4x64 d64 gqa", _cov_attention(dt, 2, 4, 64, 64, 64, 64, 2)),
            ("attention", f"{dt} split 1x2 L1 d128", _cov_attention_split(dt, 1, 128, 2)),
            ("attention", f"{dt} split 1x2 L5 d64 gqa", _cov_attention_split(dt, 5, 64, 1)),
            ("attention", f"{dt} 2x3x33x47 d40/24",
             _cov_attention(dt, 2, 3, 33, 47, 40, 24, 3)),
            ("lstm", f"{dt} T4 B16 I32 H32", _cov_lstm(dt, 4, 16, 32, 32)),
            ("lstm", f"{dt} T3 B5 I7 H20", _cov_lstm(dt, 3, 5, 7, 20)),
            ("lstm", f"{dt} T2 B3 I5 H64 steps", _cov_lstm(dt, 2, 3, 5, 64, True)),
            ("gru", f"{dt} T4 B16 I32 H32", _cov_gru(dt, 4, 16, 32, 32)),
            ("gru", f"{dt} T3 B5 I7 H20", _cov_gru(dt, 3, 5, 7, 20)),
            ("gru", f"{dt} packed", _cov_rnn_packed(dt)),
        ]
    return tuple(out)


COVERAGE = _coverage()


def triton_kernels() -> dict[str, list[str]]:
    """module -> the launchable @triton.jit kernels of kernels/triton/*.py: every JIT
    function defined there that no other JIT function calls (those are helpers)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    import pydl.kernels.triton as pkg
    jits = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{pkg.__name__}.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.fn.__module__ == mod.__name__:
                jits[(mod.__name__, name)] = obj
    out: dict[str, list[str]] = {}
    for (module, name), _fn in sorted(jits.items()):
        # called, or handed to gl.warp_specialize as a partition: `(name, (args...))`
        call = re.compile(rf"\b{re.escape(name)}\s*[(,]")
        if not any(call.search(other.src) for key, other in jits.items() if key[1] != name):
            out.setdefault(module, []).append(name)
    return out


# --- capture: the launchers' candidates and kernel calls, nothing executed --------------------

def _specializer(arch: int):
    """spec(fn, args, kwargs) -> the compile job Triton's JIT would make for this launch on
    GPUTarget("cuda", arch, 32): the binder and argument packing of JITFunction.run."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binders = {}

    def spec(fn, args, kwargs) -> dict:
        kwargs = dict(kwargs)
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        if fn not in binders:
            binders[fn] = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, opts = binders[fn](*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                              specialization, opts)
        return dict(module=fn.fn.__module__, name=fn.fn.__name__, signature=signature,
                    constexprs=constexprs, attrs=attrs, options=dict(options.__dict__), arch=arch)
    return spec


def _job_key(job: dict) -> str:
    return repr((job["module"], job["name"], sorted(job["signature"].items()),
                 sorted(job["constexprs"].items()), sorted(job["attrs"].items()),
                 sorted(job["options"].items()), job["arch"]))


def _constexpr_values(fn, kwargs: dict) -> dict:
    """The launch's values of the kernel's tl.constexpr parameters (given as keywords)."""
    return {p.name: kwargs[p.name] for p in fn.params if p.is_constexpr and p.name in kwargs}


def _signature_text(fn, job: dict) -> str:
    """A short summary of what Triton specialized besides the constexprs: the pointers'
    dtypes, how many integer arguments are 16-divisible (of those passed as values), how
    many became the constant 1, i64 when any is 64-bit, and how many pointers are not
    16-byte aligned."""
    declared = {p.name for p in fn.params if p.is_constexpr}
    dtypes, ints, div, ones, wide, ptrs, aligned = [], 0, 0, 0, False, 0, 0
    for i, (name, ty) in enumerate(job["signature"].items()):
        divisible = any(a[0] == "tt.divisibility" for a in job["attrs"].get((i,), []))
        if ty.startswith("*"):
            ptrs += 1
            aligned += divisible
            if ty[1:] not in dtypes:
                dtypes.append(ty[1:])
        elif ty in ("i32", "i64", "u64", "i1"):
            ints += 1
            div += divisible
            wide |= ty == "i64"
        elif ty == "constexpr" and name not in declared and job["constexprs"].get((i,)) == 1:
            ones += 1
    out = f"{'+'.join(dtypes)} d16={div}/{ints}" + (f" one={ones}" if ones else "")
    if wide:
        out += " i64"
    if aligned < ptrs:
        out += f" unaligned={ptrs - aligned}"
    return out


@contextlib.contextmanager
def _triton_backend_on_cpu():
    """pydl's kernel backends take CPU tensors while capturing (pydl.backends.check_device
    refuses them outside emulation), the triton backend only; emulation stays off."""
    from pydl import _env, backends
    if _env.INTERPRET:
        raise RuntimeError("pydl is in emulation (PYDL_INTERPRET): the launchers would pick "
                           "the emulator's tiles")
    original = backends.check_device

    def check_device(backend, *tensors):
        if backend == "numba":
            raise RuntimeError("the resources capture runs the triton backend only")
        return original("torch" if backend == "triton" else backend, *tensors)

    backends.check_device = check_device
    try:
        with backends.use_backend("triton"):
            yield
    finally:
        backends.check_device = original


def capture(arch: int, problems=PROBLEMS, coverage=(), by_job: bool | None = None) -> list[dict]:
    """Rows (without compile results) of every candidate of every tuned kernel the problems
    launch, plus the untuned kernels launched beside them; then of every launch the coverage
    problems make (tuned kernels with their default candidate only). Untuned launches are
    kept once per kernel name and problem, or with `by_job` (default: when there is
    coverage) once per distinct compile job over all problems. A problem whose launcher fails
    gives one row with the error."""
    import triton.runtime.jit as jit

    from pydl import _conv_implicit, _launch, _tune

    by_job = bool(coverage) if by_job is None else by_job
    spec = _specializer(arch)
    picks: list[tuple[str, list[dict], object, int]] = []
    sink: list[tuple] = []

    def record_pick(self, key, candidates, launch, inout=()):
        candidates = _tune.unique(candidates)
        picks.append((self.name, candidates, launch, len(sink)))
        return candidates[0]

    def record_run(self, *args, grid, warmup, **kwargs):
        sink.append((self, list(grid) if isinstance(grid, (tuple, list)) else None, args,
                     kwargs))
        return None

    def row(base, kernel, fn, candidate, config, grid, args, kwargs):
        job = spec(fn, args, kwargs)
        return dict(base, kernel=kernel, function=fn.fn.__name__, candidate=candidate,
                    config=config, constexpr_args=_constexpr_values(fn, kwargs),
                    signature_text=_signature_text(fn, job), grid=grid, job=job)

    from pydl import _rnn_launch
    saved = (_tune.Tuner.pick, jit.JITFunction.run,
             getattr(_conv_implicit, "_multiprocessors", None), _launch.device_capability,
             _rnn_launch.persistent_on)
    _tune.Tuner.pick, jit.JITFunction.run = record_pick, record_run
    # the CPU tensors stand for tensors on the target: the launchers choose TMA paths and
    # Hopper kernels by its compute capability
    _launch.device_capability = lambda device: (arch // 10, arch % 10)
    if saved[2] is not None:
        _conv_implicit._multiprocessors = lambda device: SMS
    # the recurrent layers launch as on a GPU: one cooperative launch per direction
    _rnn_launch.persistent_on = lambda device: True
    rows: list[dict] = []
    seen: set[str] = set()          # by_job: the compile jobs of the rows so far

    def add_once(r: dict) -> None:
        key = _job_key(r["job"])
        if key not in seen:
            seen.add(key)
            rows.append(r)

    def add_candidate(base, tuner, i, cfg, fn, grid, args, kwargs) -> None:
        """The row of a tuner's candidate i: the blocks the kernel got (a launcher may adapt
        a candidate's: the depthwise grad weight narrows its channel block)."""
        shown = {**cfg, **{k: v for k, v in kwargs.items() if k.startswith("BLOCK_")}}
        r = row(base, tuner, fn, i, shown, grid, args, kwargs)
        rows.append(r)
        seen.add(_job_key(r["job"]))

    try:
        with _triton_backend_on_cpu():
            for replay, (family, case, run) in [(True, p) for p in problems] + \
                    [(False, p) for p in coverage]:
                picks.clear()
                sink.clear()
                base = dict(family=family, case=case)
                try:
                    run()
                    direct = list(sink)
                    if not replay:
                        # the launch right after each pick is its tuned kernel's default
                        tuner_of = {direct[pos][0]: name for name, _, _, pos in picks
                                    if pos < len(direct)}
                        for fn, grid, args, kwargs in direct:
                            name = tuner_of.get(fn)
                            cfg = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")
                                   or k in ("num_warps", "num_stages")}
                            add_once(row(base, name or fn.fn.__name__, fn,
                                         None if name is None else 0, cfg, grid, args, kwargs))
                        # the kernels only a route reaches (a tuner's candidate, never the
                        # default: the layout route's copies), each route launched once, and
                        # the GEMM's TMA kernel (its first candidate)
                        for _, candidates, launch, _ in list(picks):
                            tma = [c for c in candidates if c.get("TMA")][:1]
                            for cfg in candidates:
                                if "ROUTE" not in cfg and cfg not in tma:
                                    continue
                                sink.clear()
                                launch(cfg)
                                for fn, grid, args, kwargs in list(sink):
                                    shown = {k: v for k, v in kwargs.items()
                                             if k.startswith("BLOCK")
                                             or k in ("num_warps", "num_stages")}
                                    add_once(row(base, fn.fn.__name__, fn, None, shown, grid,
                                                 args, kwargs))
                        continue
                    tuned_fns, untuned, routed = set(), {}, []
                    for tuner, candidates, launch, _ in picks:    # grows: a route's own picks
                        for i, cfg in enumerate(candidates):
                            sink.clear()
                            launch(cfg)
                            calls = list(sink)
                            if not calls:
                                raise RuntimeError(f"{tuner}: launch({cfg}) launched no kernel")
                            if "ROUTE" in cfg:
                                # the route's kernels: the tuned kernel's own a row of the
                                # candidate (as the route launches it: the layout route's on
                                # its copies), another algorithm's and the copies' by their names
                                for call in calls:
                                    if call[0] in tuned_fns:
                                        add_candidate(base, tuner, i, cfg, *call)
                                    else:
                                        routed.append(call)
                                continue
                            tuned_fns.add(calls[0][0])
                            add_candidate(base, tuner, i, cfg, *calls[0])
                            for call in calls[1:]:          # e.g. the split-K reduction
                                untuned.setdefault(call[0].fn.__name__, []).append(call)
                    for call in direct + routed:
                        if call[0] not in tuned_fns:         # e.g. attention_bwd_preprocess
                            untuned.setdefault(call[0].fn.__name__, []).append(call)
                    for name, calls in untuned.items():
                        for fn, grid, args, kwargs in (calls if by_job else calls[:1]):
                            cfg = {k: v for k, v in kwargs.items()
                                   if k.isupper() and k.startswith("BLOCK")}
                            r = row(base, name, fn, None, cfg, grid, args, kwargs)
                            if by_job:
                                add_once(r)
                            else:
                                rows.append(r)
                except Exception as exc:  # noqa: BLE001 - reported as the problem's row
                    rows.append(dict(base, kernel=family, function=None, candidate=None,
                                     config={}, grid=None, job=None,
                                     error=f"capture failed: {type(exc).__name__}: {exc}"))
    finally:
        _tune.Tuner.pick, jit.JITFunction.run = saved[:2]
        _launch.device_capability = saved[3]
        if saved[2] is not None:
            _conv_implicit._multiprocessors = saved[2]
        _rnn_launch.persistent_on = saved[4]
    return rows


# --- compile and read the cubin -----------------------------------------------------------------

def tool(name: str) -> str | None:
    """Path of a CUDA binary tool (cuobjdump): Triton's bundled copy, else one on PATH or in
    the CUDA toolkit."""
    try:
        from triton import knobs
        path = getattr(knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001
        pass
    import shutil
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    return shutil.which(name) or shutil.which(name, path=os.path.join(home, "bin"))


def missing_toolchain() -> str | None:
    """Why this machine cannot compile offline (None when it can)."""
    try:
        from triton import knobs
        if not os.path.exists(knobs.nvidia.ptxas.path):
            return "Triton's ptxas is missing"
    except Exception as exc:  # noqa: BLE001
        return f"triton's NVIDIA backend is not usable: {exc}"
    if tool("cuobjdump") is None:
        return "cuobjdump is not found (Triton's bundled copy, PATH, CUDA_HOME/bin)"
    return None


_RESOURCE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def compile_job(job: dict, keep_sass: bool = False) -> dict:
    """Compile one launch for its target; registers, spills, shared memory, instruction and
    MMA counts (or the error); with keep_sass, the SASS text too."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    t0 = time.perf_counter()
    try:
        fn = getattr(importlib.import_module(job["module"]), job["name"])
        source = ASTSource
        if fn.is_gluon():       # Gluon kernels are lowered from their own AST source
            from triton.experimental.gluon._runtime import GluonASTSource as source
        src = source(fn, job["signature"], job["constexprs"], job["attrs"])
        kernel = triton.compile(src, target=GPUTarget("cuda", job["arch"], 32),
                                options=job["options"])
        cubin = kernel.asm["cubin"]
    except Exception as exc:  # noqa: BLE001 - a candidate the compiler refuses is a finding
        # Triton's compilation errors read "at L:C:", the source, then the message
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()] or [""]
        where = f" ({lines[0].rstrip(':')} of {job['name']})" \
            if lines[0].startswith("at ") and len(lines) > 1 else ""
        return dict(error=f"{type(exc).__name__}: {lines[-1].strip()[:200]}{where}",
                    error_full=str(exc)[-4000:], compile_s=time.perf_counter() - t0)
    out = dict(shared=int(kernel.metadata.shared), compile_s=time.perf_counter() - t0,
               num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "k.cubin"
            path.write_bytes(cubin)
            dump = [tool("cuobjdump"), str(path)]
            usage = subprocess.run(dump[:1] + ["--dump-resource-usage"] + dump[1:],
                                   capture_output=True, text=True, timeout=120).stdout
            sass = subprocess.run(dump[:1] + ["-sass"] + dump[1:], capture_output=True,
                                  text=True, timeout=120).stdout
    except Exception as exc:  # noqa: BLE001 - reported in the row
        out["error"] = f"cuobjdump failed: {type(exc).__name__}: {exc}"
        return out
    m = _RESOURCE.search(usage)
    if m is None:
        out["error"] = "cuobjdump gave no resource usage"
        return out
    out.update(regs=int(m[1]), stack=int(m[2]), static_shared=int(m[3]), local=int(m[4]),
               hgmma=len(re.findall(r"\bHGMMA\.", sass)),
               hmma=len(re.findall(r"\bHMMA\.", sass)),
               tma=len(re.findall(r"\bUTMA(?:LDG|STG)\b", sass)), **load_counts(sass),
               instrs=instruction_count(sass), **local_accesses(sass))
    if keep_sass:
        out["sass"] = sass
    # warp-specialized kernels move registers between partitions (setmaxnreg): "regs" is
    # the launch's budget, these the per-thread limits the partitions switch to
    setmaxnreg = sorted({int(n) for n in re.findall(
        r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", kernel.asm["ptx"])})
    if setmaxnreg:
        out["setmaxnreg"] = setmaxnreg
    if out["stack"] or out["local"]:
        out.update(_ptxas_spills(kernel.asm["ptx"], job))
    return out


def load_counts(sass: str) -> dict:
    """Global-load instructions in the SASS: cp.async copies (LDGSTS, straight to shared
    memory, what the software pipeliner issues ahead), and plain loads (LDG) in all and of
    16 bytes (LDG.*.128, one vector load of 8 16-bit elements). Many narrow LDG in a
    kernel that streams contiguous data mean the compiler could not prove its contiguity
    or alignment (scalar gathers)."""
    ldg = re.findall(r"\bLDG(?=[.\s])(?:\.[A-Z0-9_]+)*", sass)
    return dict(ldgsts=len(re.findall(r"\bLDGSTS\b", sass)), ldg=len(ldg),
                ldg16=sum("128" in x.split(".") for x in ldg))


_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_ADDRESSED = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);",
                        re.M)


def local_accesses(sass: str) -> dict:
    """Local-memory instructions (STL, LDL: spilled registers, or a stack frame's arrays) in
    the SASS, and how many of them lie inside a loop: between a backward branch (a BRA to a
    lower address) and its target. Where a spill is: registers saved before the loops and
    restored after them cost a few accesses a program; one inside a loop costs them every
    iteration."""
    loops, local = [], []
    for m in _ADDRESSED.finditer(sass):
        at, op = int(m[1], 16), m[2]
        if op.startswith(("STL", "LDL")):
            local.append(at)
        elif op.startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", m[3])
            if target and int(target[1], 16) < at:
                loops.append((int(target[1], 16), at))
    return dict(local_instrs=len(local),
                local_in_loops=sum(any(a <= x <= b for a, b in loops) for x in local))


def instruction_count(sass: str) -> int:
    """SASS instructions in the kernel, NOPs (alignment padding) not counted: static, so a
    loop's body counts once. For a kernel without loops (the pools' unrolled windows) it is
    the work a thread issues, the measure of an issue-bound kernel."""
    return sum(not m.startswith("NOP") for m in _INSTRUCTION.findall(sass))


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _ptxas_spills(ptx: str, job: dict) -> dict:
    """Spill stores and loads in bytes, from ptxas -v on the kernel's PTX with Triton's own
    flags (cuobjdump gives the stack frame, which holds spills but is not only spills);
    {} when ptxas cannot say. Run only for a kernel with a stack frame or local memory."""
    from triton import knobs
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        cmd = [knobs.nvidia.ptxas.path, "-lineinfo", "-v",
               *([] if job["options"].get("enable_fp_fusion", True) else ["--fmad=false"]),
               *(job["options"].get("ptx_options") or "").split(),
               f"--gpu-name=sm_{job['arch']}{'a' if job['arch'] >= 90 else ''}", str(src),
               "-o", str(Path(tmp) / "k.cubin")]
        try:
            log = subprocess.run(cmd, capture_output=True, text=True, timeout=600).stderr
        except Exception:  # noqa: BLE001 - the cuobjdump numbers stand
            return {}
    m = _SPILLS.search(log)
    return dict(spill_stores=int(m[1]), spill_loads=int(m[2])) if m else {}


def _compile_all(jobs: list[dict], workers: int, keep_sass: bool = False) -> list[dict]:
    """compile_job over jobs in a pool of `workers` processes; a job whose worker died is
    retried once alone."""
    if workers <= 1:
        return [compile_job(j, keep_sass) for j in jobs]
    ctx = multiprocessing.get_context("spawn")
    results: list[dict | None] = [None] * len(jobs)
    retry = []
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(compile_job, j, keep_sass): i for i, j in enumerate(jobs)}
        for fut in cf.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception:  # noqa: BLE001 - a crashed worker breaks the pool
                retry.append(i)
    for i in retry:
        with cf.ProcessPoolExecutor(1, mp_context=ctx) as pool:
            try:
                results[i] = pool.submit(compile_job, jobs[i], keep_sass).result()
            except Exception as exc:  # noqa: BLE001
                results[i] = dict(error=f"the compiler process died ({type(exc).__name__})")
    return results


def verdict(row: dict, arch: int) -> str:
    if row.get("error"):
        return "compile error: " + row["error"] if not row["error"].startswith("capture") \
            else row["error"]
    issues = []
    if row["shared"] > MAX_SHARED[arch]:
        issues.append("too much shared memory")
    if row["regs"] * 32 * row["num_warps"] > REGS_PER_SM:
        issues.append("too many registers")
    spills = (row["spill_stores"] or row["spill_loads"]) if "spill_stores" in row \
        else row["local"] or row["stack"]
    if spills:      # where the SASS shows no local access inside a loop, say so
        issues.append("spills" if row.get("local_in_loops", 1) else "spills outside loops")
    return ", ".join(issues) or "ok"


def measure(rows: list[dict], workers: int, keep_sass: bool = False) -> list[dict]:
    """Compile every row's job (identical jobs once) and fill in its results and verdict
    (with keep_sass, each row's SASS text under "sass")."""
    keys, jobs = {}, []
    for r in rows:
        if r.get("job") is not None:
            k = _job_key(r["job"])
            if k not in keys:
                keys[k] = len(jobs)
                jobs.append(r["job"])
    results = _compile_all(jobs, workers, keep_sass)
    first: dict[tuple, int] = {}
    for r in rows:
        if r.get("job") is not None:
            r.update(results[keys[_job_key(r["job"])]])
        r["verdict"] = verdict(r, r["job"]["arch"] if r.get("job") else 90)
        if r.get("job") is not None and r["candidate"] is not None:
            same = first.setdefault((r["kernel"], r["case"], _job_key(r["job"])), r["candidate"])
            if same != r["candidate"]:
                r["same_as"] = same
                r["verdict"] += f" (the same kernel as #{same})"
    return rows


# --- output ------------------------------------------------------------------------------------

def _config_text(cfg: dict) -> str:
    short = {"STAGES": "STAGES", "SPLIT_WAVES": "waves"}      # e.g. M64 N64 K64 waves4
    return " ".join(f"{k[6:] if k.startswith('BLOCK_') else short.get(k, k)}{v}"
                    for k, v in cfg.items() if k.startswith("BLOCK") or k in short)


def _spill_bytes(r: dict) -> int:
    """Spill stores per thread as ptxas counts them; local + stack bytes where it was not
    asked (both 0: nothing to spill)."""
    return r["spill_stores"] if "spill_stores" in r else r["local"] + r["stack"]


def _local_text(r: dict) -> str:
    """Where a row's local-memory accesses are, from its SASS."""
    if "local_instrs" not in r:
        return "local accesses not counted"
    return f"{r['local_instrs']} local accesses, {r['local_in_loops']} in loops"


def _cell(r: dict, key: str) -> str:
    if key in r:
        return str(r[key])
    job = r.get("job")
    return str(job["options"][key]) if job and key in ("num_warps", "num_stages") else ""


def _constexpr_text(consts: dict) -> str:
    """A launch's constexprs, short: blocks as M64, flags by name when set (omitted when
    not), strings by value (ieee, tf32), other values as NAME=value."""
    out = []
    for k, v in consts.items():
        if k.startswith("BLOCK_"):
            out.append(f"{k[6:]}{v}")
        elif isinstance(v, bool):
            if v:
                out.append(k)
        elif isinstance(v, str):
            out.append(v)
        else:
            out.append(f"{k}={v}")
    return " ".join(out)


def _short_verdict(r: dict) -> str:
    v = r["verdict"]
    if v.startswith("compile error"):
        return "COMPILE ERROR"
    if v.startswith("capture failed"):
        return "CAPTURE FAILED"
    return v.replace(" (the same kernel as #", " =#").rstrip(")") if "same kernel" in v else v


def _loads(r: dict) -> str:
    return f"{r['ldg16']}/{r['ldg']}" if "ldg" in r else ""


def table(rows: list[dict], detail: bool = False) -> str:
    """One line per row. detail (--all): the verdict short (errors are listed after the
    table) and a last column with what distinguishes the specialization: its constexprs,
    then (after |) the signature summary of _signature_text."""
    if detail:
        head = (f"{'kernel':26s} {'case':26s} {'#':>2s} {'w':>2s} {'st':>2s} {'grid':>9s} "
                f"{'regs':>4s} {'spill':>5s} {'smem':>4s} {'wgmma':>7s} {'mma':>4s} "
                f"{'tma':>3s} {'cp.as':>5s} {'ldg16/all':>9s} {'instr':>6s}  "
                f"{'verdict':20s} specialization (constexprs | pointer dtypes, ints)")
    else:
        head = (f"{'kernel':26s} {'case':22s} {'#':>2s} {'config':21s} {'w':>2s} {'st':>2s} "
                f"{'grid':>9s} {'regs':>4s} {'spill':>5s} {'smem':>4s} {'wgmma':>7s} "
                f"{'mma':>4s} {'tma':>3s} {'cp.as':>5s} {'ldg16/all':>9s} {'instr':>6s}  verdict")
    lines = [head, "-" * (len(head) + 20)]
    for r in rows:
        c = r["candidate"]
        cand = "-" if c is None else f"{c}*" if c == 0 else str(c)
        grid = "x".join(map(str, r["grid"])) if r.get("grid") else ""
        has = "regs" in r
        spill = str(_spill_bytes(r)) if has else ""
        smem = str(round(r["shared"] / 1024)) if "shared" in r else ""
        wgmma = (f"yes {r['hgmma']:>3d}" if r["hgmma"] else "no") if has else ""
        nums = (f"{_cell(r, 'num_warps'):>2s} {_cell(r, 'num_stages'):>2s} {grid:>9s} "
                f"{_cell(r, 'regs'):>4s} {spill:>5s} {smem:>4s} {wgmma:>7s} "
                f"{_cell(r, 'hmma') if has else '':>4s} {_cell(r, 'tma') if has else '':>3s} "
                f"{_cell(r, 'ldgsts') if has else '':>5s} {_loads(r) if has else '':>9s} "
                f"{_cell(r, 'instrs') if has else '':>6s}")
        if detail:
            spec = _constexpr_text(r.get("constexpr_args", {}))
            if r.get("signature_text"):
                spec += " | " + r["signature_text"]
            lines.append(f"{r['kernel']:26s} {r['case']:26s} {cand:>2s} {nums}  "
                         f"{_short_verdict(r):20s} {spec}")
        else:
            regs = f" (setmaxnreg {'/'.join(map(str, r['setmaxnreg']))})" \
                if r.get("setmaxnreg") else ""
            lines.append(f"{r['kernel']:26s} {r['case']:22s} {cand:>2s} "
                         f"{_config_text(r['config']):21s} {nums}  {r['verdict']}{regs}")
    return "\n".join(lines)


def _findings(rows: list[dict], launched: set, kernels: dict[str, list[str]]) -> str:
    """--all's summary after the table: the failures with their errors, the spills, and the
    kernels of kernels/triton that no problem launched."""
    def name(r: dict) -> str:
        c = "-" if r["candidate"] is None else r["candidate"]
        spec = _constexpr_text(r.get("constexpr_args", {}))
        sig = f" | {r['signature_text']}" if r.get("signature_text") else ""
        return f"{r['kernel']} [{r['case']}] #{c} w{_cell(r, 'num_warps')} {spec}{sig}"

    out = []
    failed = [r for r in rows if r["verdict"].startswith(FAILING + ("capture",))]
    out.append(f"\nFAILED ({len(failed)}):" if failed else "\nFAILED: none")
    for r in failed:
        out.append(f"  {name(r)}\n    {r['verdict']}")
    spills = [r for r in rows if "spills" in r["verdict"]]
    # what runs untuned (emulation, PYDL_TUNE=0, a key with one candidate): the first
    # candidate of a tuned kernel, or a kernel without a tuner; the rule is no spill there
    defaults = sum(r["candidate"] in (0, None) for r in spills)
    out.append(f"SPILLS ({len(spills)}; {defaults} in a default configuration, marked *):"
               if spills else "SPILLS: none")
    for r in spills:
        mark = "*" if r["candidate"] in (0, None) else " "
        out.append(f"  {mark}{name(r)}: {_spill_bytes(r)} bytes spilled, {r['regs']} "
                   f"registers, {_local_text(r)}")
    frames = [r for r in rows if "regs" in r and (r["stack"] or r["local"])
              and "spills" not in r["verdict"]]
    if frames:
        out.append(f"(a stack frame without spills, not counted: {len(frames)} kernels)")
    missing = [f"{m.rsplit('.', 1)[-1]}.{n}" for m, names in kernels.items() for n in names
               if (m, n) not in launched]
    out.append(f"NOT LAUNCHED by any problem ({len(missing)}): {', '.join(missing)}"
               if missing else f"every kernel of kernels/triton launched "
               f"({sum(map(len, kernels.values()))} kernels in {len(kernels)} modules)")
    return "\n".join(out)


def _json_row(r: dict) -> dict:
    out = {k: v for k, v in r.items() if k != "job"}
    if r.get("job") is not None:
        out["signature"] = r["job"]["signature"]
        out["constexprs"] = {str(list(k)): v for k, v in r["job"]["constexprs"].items()}
        out["attrs"] = {str(list(k)): v for k, v in r["job"]["attrs"].items() if v}
    return out


def defaults(rows: list[dict]) -> list[dict]:
    """The rows of what runs untuned: a tuned kernel's first candidate, a kernel without a
    tuner (candidate None), and a problem whose launcher failed (no job: reported as such)."""
    return [r for r in rows if r.get("candidate") in (0, None)]


def select(rows: list[dict], names: list[str]) -> tuple[list[dict], list[str]]:
    """Rows whose family is one of names or whose kernel name contains one; unknown names."""
    if not names:
        return rows, []
    keep = [r for r in rows if any(n == r["family"] or n in r["kernel"] for n in names)]
    unknown = [n for n in names if not any(n == r["family"] or n in r["kernel"] for r in rows)]
    return keep, unknown


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench resources",
        description="Compile every tuning candidate of pydl's autotuned Triton kernels (with "
                    "--all: every specialization of every Triton kernel) for a GPU "
                    "architecture without a GPU; report registers, spills, shared memory and "
                    "wgmma use per candidate.")
    p.add_argument("kernels", nargs="*",
                   help="families (gemm, conv, attention, pool, cross_entropy, lstm, gru; with "
                        "--all also softmax) or kernel names, or parts of them (bwd, "
                        "attention_fwd, conv2d_implicit_bwd_weight); default: all")
    p.add_argument("--arch", type=int, default=90, choices=sorted(MAX_SHARED),
                   help="compute capability to compile for (default 90: H100)")
    p.add_argument("--json", type=Path, default=None, metavar="FILE",
                   help="also write the rows as JSON to FILE")
    p.add_argument("--all", action="store_true",
                   help="also compile every distinct specialization of every Triton kernel in "
                        "kernels/triton, as launched by small fp32 and bf16 problems through "
                        "pydl's public functions (COVERAGE), forward and backward")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                   help="compiler processes (default: the CPUs, at most 4)")
    p.add_argument("--sass", type=Path, default=None, metavar="DIR",
                   help="also write each compiled kernel's SASS to DIR/<kernel>-<case>-<#>.sass")
    p.add_argument("--defaults", action="store_true",
                   help="compile only what runs untuned (each tuned kernel's first candidate, "
                        "the kernels without a tuner): the no-spill rule's check (with --all "
                        "about 1400 of its 2300 compiles)")
    return p


def _needs_clean_process() -> bool:
    flags = any(os.environ.get(v, "").strip().lower() not in ("", "0", "false", "no", "off")
                for v in EMULATION_VARS)
    return flags or "pydl" in sys.modules


def _relaunch(argv: list[str]) -> int:
    env = {k: v for k, v in os.environ.items() if k not in EMULATION_VARS}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return subprocess.call([sys.executable, "-m", "bench.resources", *argv], env=env,
                           cwd=str(REPO_ROOT))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if _needs_clean_process():
        return _relaunch(argv)
    why = missing_toolchain()
    if why:
        print(f"error: cannot compile offline: {why}", file=sys.stderr)
        return 1
    import triton
    from triton import knobs
    t0 = time.perf_counter()
    rows = capture(args.arch, PROBLEMS, COVERAGE if args.all else ())
    names = sorted({r["family"] for r in rows} | {r["kernel"] for r in rows})
    launched = {(r["job"]["module"], r["job"]["name"]) for r in rows if r.get("job") is not None}
    rows, unknown = select(rows, args.kernels)
    if args.defaults:
        rows = defaults(rows)
    if unknown:
        print(f"error: no kernel matches {', '.join(map(repr, unknown))}; known: "
              f"{', '.join(names)}", file=sys.stderr)
        return 2
    n = sum(r.get("job") is not None for r in rows)
    distinct = len({_job_key(r["job"]) for r in rows if r.get("job") is not None})
    print(f"compiling {n} launch configurations ({distinct} distinct kernels) for "
          f"sm_{args.arch} (triton {triton.__version__}, ptxas {knobs.nvidia.ptxas.version}) in "
          f"{args.jobs} process(es) ...", flush=True)
    measure(rows, args.jobs, keep_sass=args.sass is not None)
    if args.sass is not None:
        args.sass.mkdir(parents=True, exist_ok=True)
        for r in rows:
            sass = r.pop("sass", None)
            if sass is not None:
                name = f"{r['kernel']}-{r['case']}-{r['candidate']}"
                (args.sass / (re.sub(r"[^\w.-]+", "_", name) + ".sass")).write_text(sass)
    print(table(rows, detail=args.all))
    limit = MAX_SHARED[args.arch]
    print(f"\n#: candidate (* the default, what runs untuned; - a kernel without a tuner). "
          f"w, st: num_warps, num_stages. regs: per thread. spill: bytes of spill stores "
          f"per thread (ptxas -v). smem: KiB of shared memory per block (limit "
          f"{limit // 1024} KiB on sm_{args.arch}). wgmma, mma: HGMMA and HMMA (mma.sync) "
          f"instructions in the SASS; tma: TMA copies (UTMALDG, UTMASTG) in the SASS; "
          f"setmaxnreg: the per-thread register limits a warp-specialized kernel's "
          f"partitions switch to (regs is then the launch's budget); cp.as: cp.async copies "
          f"(LDGSTS); ldg16/all: global loads of 16 bytes / all plain global loads (LDG), in "
          f"the SASS; instr: SASS instructions (static, NOPs not counted). "
          + ("specialization: the constexprs (flags named when set), then the pointers' "
             "dtypes, d16 = integer arguments divisible by 16 / integer arguments, one = "
             "integers specialized to the constant 1, i64 when one is 64-bit, unaligned = "
             "pointers not 16-byte aligned. " if args.all else "")
          + f"{time.perf_counter() - t0:.0f} s.")
    counts: dict[str, int] = {}
    for r in rows:
        v = r["verdict"].split(":")[0].split(" (the same")[0]
        counts[v] = counts.get(v, 0) + 1
    print("verdicts: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    missing = False
    if args.all:
        kernels = triton_kernels()
        print(_findings(rows, launched, kernels))
        print(f"compiled {distinct} distinct kernels ({n} launch configurations).")
        missing = any((m, k) not in launched for m, ks in kernels.items() for k in ks)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(
            {"arch": args.arch, "triton": triton.__version__,
             "ptxas": knobs.nvidia.ptxas.version, "max_shared": limit,
             "regs_per_sm": REGS_PER_SM, "sms": SMS,
             "rows": [_json_row(r) for r in rows]}, indent=1, default=str))
        print(f"json: {args.json}")
    bad_default = [r for r in rows if r["candidate"] in (0, None) and r.get("job") is not None
                   and r["verdict"].startswith(FAILING)]
    return 1 if bad_default or missing or any(r.get("job") is None for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
