"""conv2d: the convolutions of ResNet-50 v1.5 at batch 32, training (forward and backward).

Shapes: every distinct (C_in, C_out, kernel, stride, input size) of torchvision's resnet50
(v1.5: the stride-2 of a stage's first bottleneck sits in its 3x3 conv, not its first 1x1),
ImageNet 224x224 input, batch 32 (a common per-GPU training batch), no bias (batch norm
follows every conv). 23 distinct layers make up the network's 53 convolutions; each case's
source names the layers it stands for and how often the shape occurs. Layout channels_last
(NHWC, as a mixed-precision CNN is trained) with the weight in channels_last too
(`model.to(memory_format=torch.channels_last)` converts both; cuDNN would otherwise convert
the weight on every call); bf16 is the main dtype.
    quick  6 representative layers: the stem, a 3x3 and a 1x1 expansion of layer1, the
           strided 3x3 of layer2, a 1x1 reduction of layer3 and a 3x3 of layer4
    full   all 23 layers in bf16, all 23 in fp32 (TF32 products on both sides when
           torch.backends.cudnn.allow_tf32 is on, torch's default; pydl follows the same
           flag), and the quick layers in NCHW bf16 (the layout's cost)
    tiny   emulation checks: three small layers, fp32 and fp16, NCHW and channels_last

Variants: one per pydl algorithm (pydl.conv.ALGOS): "triton-implicit" (implicit GEMM),
"triton-im2col" and "numba-im2col" (explicit im2col + GEMM); "torch" is cuDNN. The run sets
torch.backends.cudnn.benchmark = True on a GPU (bench.runner): cuDNN autotunes its algorithm
for each shape on the gate's untimed first call, so the baseline is cuDNN's best algorithm for
the shape, the fair target (without it cuDNN picks by heuristics, sometimes far from its best).

Compute-bound: judged against the measured bf16 matmul rate. FLOPs, multiply-add = 2:
    fwd      2 N OC OH OW (C / groups) KH KW
    bwd      2 x fwd: grad input and grad weight, one GEMM-sized product each (the stem's grad
             input is computed and counted too, though training never needs it)
    fwd+bwd  3 x fwd
Minimal bytes (s = element size; x, w, y as stored): fwd x + w + y; bwd read dy, x, w and
write dx, dw; fwd+bwd the sum. Informational only: the roofline is compute.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pydl.testing import uses_tf32

from .base import Case, Suite, dtype_size, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
BATCH = 32


@dataclass(frozen=True)
class ConvCase(Case):
    """shape = the input (N, C, H, W); a square kernel, no bias, groups 1."""
    out_channels: int = 0
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    channels_last: bool = True
    groups: int = 1

    @property
    def geometry(self) -> tuple[int, int, int, int, int, int, int]:
        """(N, C, OC, K, OH, OW, stride)"""
        n, c, h, w = self.shape
        oh = (h + 2 * self.padding - self.kernel) // self.stride + 1
        ow = (w + 2 * self.padding - self.kernel) // self.stride + 1
        return n, c, self.out_channels, self.kernel, oh, ow, self.stride

    @property
    def taps(self) -> int:
        """The kernel's positions: K x K."""
        return self.kernel * self.kernel

    @property
    def pixels(self) -> int:
        """The input's positions per channel and image."""
        return self.shape[2] * self.shape[3]


@dataclass(frozen=True)
class Conv1dCase(ConvCase):
    """shape = the input (N, C, L), a 1 x L image to the kernels; channels_last: laid out
    (N, L, C), a transposed (N, L, C) activation (as a sequence model's conv1d gets it)."""

    @property
    def geometry(self) -> tuple[int, int, int, int, int, int, int]:
        n, c, length = self.shape
        ol = (length + 2 * self.padding - self.kernel) // self.stride + 1
        return n, c, self.out_channels, self.kernel, 1, ol, self.stride

    @property
    def taps(self) -> int:
        return self.kernel

    @property
    def pixels(self) -> int:
        return self.shape[2]


# ResNet-50 v1.5's distinct convolutions: (name, C_in, C_out, kernel, stride, input size,
# layers of torchvision's resnet50 with this shape, count in the network). 53 in all.
RESNET50 = (
    ("stem", 3, 64, 7, 2, 224, "conv1 (7x7/2, pad 3, 224 -> 112)", 1),
    ("l1-1x1-64-64", 64, 64, 1, 1, 56, "layer1.0.conv1", 1),
    ("l1-3x3-64", 64, 64, 3, 1, 56, "layer1.*.conv2", 3),
    ("l1-1x1-64-256", 64, 256, 1, 1, 56, "layer1.*.conv3 and layer1.0.downsample", 4),
    ("l1-1x1-256-64", 256, 64, 1, 1, 56, "layer1.1-2.conv1", 2),
    ("l2-1x1-256-128", 256, 128, 1, 1, 56, "layer2.0.conv1", 1),
    ("l2-3x3s2-128", 128, 128, 3, 2, 56, "layer2.0.conv2 (the stage's stride 2, 56 -> 28)", 1),
    ("l2-1x1-128-512", 128, 512, 1, 1, 28, "layer2.*.conv3", 4),
    ("l2-down-256-512", 256, 512, 1, 2, 56, "layer2.0.downsample (1x1/2 projection, 56 -> 28)", 1),
    ("l2-1x1-512-128", 512, 128, 1, 1, 28, "layer2.1-3.conv1", 3),
    ("l2-3x3-128", 128, 128, 3, 1, 28, "layer2.1-3.conv2", 3),
    ("l3-1x1-512-256", 512, 256, 1, 1, 28, "layer3.0.conv1", 1),
    ("l3-3x3s2-256", 256, 256, 3, 2, 28, "layer3.0.conv2 (stride 2, 28 -> 14)", 1),
    ("l3-1x1-256-1024", 256, 1024, 1, 1, 14, "layer3.*.conv3", 6),
    ("l3-down-512-1024", 512, 1024, 1, 2, 28,
     "layer3.0.downsample (1x1/2 projection, 28 -> 14)", 1),
    ("l3-1x1-1024-256", 1024, 256, 1, 1, 14, "layer3.1-5.conv1", 5),
    ("l3-3x3-256", 256, 256, 3, 1, 14, "layer3.1-5.conv2", 5),
    ("l4-1x1-1024-512", 1024, 512, 1, 1, 14, "layer4.0.conv1", 1),
    ("l4-3x3s2-512", 512, 512, 3, 2, 14, "layer4.0.conv2 (stride 2, 14 -> 7)", 1),
    ("l4-1x1-512-2048", 512, 2048, 1, 1, 7, "layer4.*.conv3", 3),
    ("l4-down-1024-2048", 1024, 2048, 1, 2, 14,
     "layer4.0.downsample (1x1/2 projection, 14 -> 7)", 1),
    ("l4-1x1-2048-512", 2048, 512, 1, 1, 7, "layer4.1-2.conv1", 2),
    ("l4-3x3-512", 512, 512, 3, 1, 7, "layer4.1-2.conv2", 2),
)
QUICK = ("stem", "l1-3x3-64", "l1-1x1-64-256", "l2-3x3s2-128", "l3-1x1-1024-256", "l4-3x3-512")
assert sum(row[-1] for row in RESNET50) == 53, "ResNet-50 has 53 convolutions"


def _resnet_case(row, dtype=BF16, channels_last=True, suffix="") -> ConvCase:
    name, cin, cout, k, s, h, layers, count = row
    layout = "channels_last" if channels_last else "NCHW"
    return ConvCase(
        name + suffix, (BATCH, cin, h, h), dtype,
        f"ResNet-50 v1.5 {layers}: {k}x{k}/{s} conv {cin}->{cout} at {h}x{h}, pad {k // 2}; "
        f"{count}x in the network; batch {BATCH}, {layout}",
        out_channels=cout, kernel=k, stride=s, padding=k // 2, channels_last=channels_last)


_BY_NAME = {row[0]: row for row in RESNET50}

SHAPES: dict[str, tuple[Case, ...]] = {
    # Emulation (no GPU): small enough for Triton's interpreter and Numba's simulator.
    "tiny": (
        ConvCase("tiny-3x3", (1, 4, 6, 6), F32,
                 "emulation check: 3x3/1 pad 1, 4->8 channels, NCHW",
                 out_channels=8, kernel=3, stride=1, padding=1, channels_last=False),
        ConvCase("tiny-3x3s2", (2, 8, 7, 7), F16,
                 "emulation check: 3x3/2 pad 1 (ResNet v1.5's strided 3x3, ragged 7x7 input), "
                 "8->8 channels, channels_last", out_channels=8, kernel=3, stride=2, padding=1),
        ConvCase("tiny-1x1s2", (2, 16, 7, 7), F16,
                 "emulation check: 1x1/2 projection (ResNet's downsample), 16->8 channels, "
                 "channels_last", out_channels=8, kernel=1, stride=2, padding=0),
    ),
    "quick": tuple(_resnet_case(_BY_NAME[n]) for n in QUICK),
}
SHAPES["full"] = SHAPES["quick"] + tuple(
    _resnet_case(row) for row in RESNET50 if row[0] not in QUICK) + tuple(
    _resnet_case(row, F32, suffix="-fp32") for row in RESNET50) + tuple(
    _resnet_case(_BY_NAME[n], channels_last=False, suffix="-nchw") for n in QUICK)


class Conv2dSuite(Suite):
    def __init__(self):
        super().__init__(
            op="conv2d", registry_op="conv2d", shape_sets=SHAPES, bound="compute",
            differentiable=(0, 1),
            notes="conv2d(x, w, stride, padding), no bias; grads of x and w",
            algos={"triton": ("implicit", "im2col"), "numba": ("im2col",)})

    def pydl_algos(self, backend):
        from pydl.conv import ALGOS
        return tuple(ALGOS.get(backend, ()))

    def options(self, case):
        return {"stride": case.stride, "padding": case.padding, "groups": case.groups}

    def make_inputs(self, case, dtype, device, generator):
        n, c, h, w = case.shape
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        # unit-variance weights: each output is a sum of C*K*K unit terms, as the gate's
        # tolerance model assumes (values grow like sqrt(C*K*K), far from fp16's range)
        x = randn((n, c, h, w), dtype, device, generator).contiguous(memory_format=fmt)
        wt = randn((case.out_channels, c // case.groups, case.kernel, case.kernel), dtype, device,
                   generator)
        return x, wt.contiguous(memory_format=fmt)

    fn = "conv2d"       # the op's name in pydl and in torch.nn.functional

    def pydl_fn(self, backend, algo=None):
        import pydl
        op = getattr(pydl, self.fn)
        return lambda x, w, stride, padding, groups: op(
            x, w, None, stride, padding, groups=groups, backend=backend, algo=algo)

    def torch_fn(self):
        op = getattr(torch.nn.functional, self.fn)
        return lambda x, w, stride, padding, groups: op(x, w, None, stride, padding,
                                                        groups=groups)

    def tf32(self, dtype, device):
        return dtype == F32 and uses_tf32(device, cudnn=True)

    def reduction_length(self, case):
        return case.shape[1] // case.groups * case.taps

    def reduction_lengths(self, case):
        n, c, oc, _, oh, ow, _ = case.geometry
        # output: C K K terms a group; grad input: at most OC K K a group; grad weight: N OH OW
        return (c // case.groups * case.taps, oc // case.groups * case.taps, n * oh * ow)

    def flops(self, case, direction):
        n, c, oc, _, oh, ow, _ = case.geometry
        fwd = 2 * n * oc * oh * ow * (c // case.groups) * case.taps
        return {"fwd": fwd, "bwd": 2 * fwd, "fwd+bwd": 3 * fwd}[direction]

    def bytes(self, case, dtype, direction):
        n, c, oc, _, oh, ow, _ = case.geometry
        x, wt, y = n * c * case.pixels, oc * (c // case.groups) * case.taps, n * oc * oh * ow
        fwd = x + wt + y
        bwd = y + x + wt + x + wt          # read dy, x, w; write dx, dw
        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[direction] * dtype_size(dtype)


# Depthwise convolutions (groups = channels): MobileNetV2's 3x3 and ConvNeXt-T's 7x7 (pad 3)
# at batch 32, 224 x 224 input, bf16 channels_last: (name, channels, kernel, stride, input
# size, where in the network). Memory-bound (2 * K * K FLOPs a 2-byte input element at most).
DEPTHWISE = (
    ("mbv2-dw-32", 32, 3, 1, 112, "MobileNetV2 features.1 (t=1, 112x112)"),
    ("mbv2-dw-96s2", 96, 3, 2, 112, "MobileNetV2 features.2 (stride 2, 112 -> 56)"),
    ("mbv2-dw-144", 144, 3, 1, 56, "MobileNetV2 features.3"),
    ("mbv2-dw-144s2", 144, 3, 2, 56, "MobileNetV2 features.4 (stride 2, 56 -> 28)"),
    ("mbv2-dw-192", 192, 3, 1, 28, "MobileNetV2 features.5-6"),
    ("mbv2-dw-384", 384, 3, 1, 14, "MobileNetV2 features.8-10"),
    ("mbv2-dw-576", 576, 3, 1, 14, "MobileNetV2 features.12-13"),
    ("mbv2-dw-960", 960, 3, 1, 7, "MobileNetV2 features.15-16"),
    ("convnext-dw7-96", 96, 7, 1, 56, "ConvNeXt-T stage 1 (7x7, pad 3)"),
    ("convnext-dw7-192", 192, 7, 1, 28, "ConvNeXt-T stage 2"),
    ("convnext-dw7-384", 384, 7, 1, 14, "ConvNeXt-T stage 3"),
    ("convnext-dw7-768", 768, 7, 1, 7, "ConvNeXt-T stage 4"),
)
DEPTHWISE_QUICK = ("mbv2-dw-32", "mbv2-dw-96s2", "mbv2-dw-576", "convnext-dw7-96",
                   "convnext-dw7-384")


def _depthwise_case(row, channels_last=True, suffix="") -> ConvCase:
    name, c, k, s, h, where = row
    return ConvCase(name + suffix, (BATCH, c, h, h), BF16,
                    f"{where}: depthwise {k}x{k}/{s}, {c} channels at {h}x{h}, pad {k // 2}; "
                    f"batch {BATCH}, {'channels_last' if channels_last else 'NCHW'}",
                    out_channels=c, kernel=k, stride=s, padding=k // 2,
                    channels_last=channels_last, groups=c)


_DW_BY_NAME = {row[0]: row for row in DEPTHWISE}
DEPTHWISE_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        ConvCase("tiny-dw3x3", (2, 8, 7, 6), F32, "emulation check: depthwise 3x3/1 pad 1, 8 "
                 "channels, NCHW", out_channels=8, kernel=3, stride=1, padding=1,
                 channels_last=False, groups=8),
        ConvCase("tiny-dw3x3s2", (2, 16, 9, 9), F16, "emulation check: depthwise 3x3/2 pad 1, "
                 "16 channels, channels_last", out_channels=16, kernel=3, stride=2, padding=1,
                 groups=16),
    ),
    "quick": tuple(_depthwise_case(_DW_BY_NAME[n]) for n in DEPTHWISE_QUICK),
}
DEPTHWISE_SHAPES["full"] = DEPTHWISE_SHAPES["quick"] + tuple(
    _depthwise_case(row) for row in DEPTHWISE if row[0] not in DEPTHWISE_QUICK) + tuple(
    _depthwise_case(_DW_BY_NAME[n], channels_last=False, suffix="-nchw")
    for n in DEPTHWISE_QUICK)


class DepthwiseConv2dSuite(Conv2dSuite):
    """conv2d with groups = channels (pydl's implicit algorithm runs these on its direct
    depthwise kernels), against cuDNN / ATen's depthwise kernels; memory-bound."""

    def __init__(self):
        Suite.__init__(
            self, op="conv2d_depthwise", registry_op="conv2d", shape_sets=DEPTHWISE_SHAPES,
            bound="memory", differentiable=(0, 1),
            notes="conv2d(x, w, stride, padding, groups=C), no bias; grads of x and w",
            algos={"triton": ("implicit", "im2col"), "numba": ("im2col",)})


# conv1d: the convolutions of sequence models, on conv2d's kernels (pydl.conv1d): Whisper's
# audio stem (two 3-wide convs over 3000 log-mel frames, the second strided; the mel features
# arrive (N, 80, 3000) contiguous), and Mamba's causal depthwise mixer conv (4 taps, padding 3,
# the first L outputs kept; its input is the in-projection's (N, L, D) output transposed, so
# channels are contiguous). bf16.
CONV1D = {
    "tiny": (
        Conv1dCase("tiny-1d-k3", (2, 4, 11), F32, "emulation check: conv1d k3/1 pad 1, 4->6 "
                   "channels, (N, C, L)", out_channels=6, kernel=3, padding=1,
                   channels_last=False),
        Conv1dCase("tiny-1d-k3s2", (2, 8, 13), F16, "emulation check: conv1d k3/2 pad 1, 8->8 "
                   "channels, (N, L, C) layout", out_channels=8, kernel=3, stride=2, padding=1),
    ),
    "quick": (
        Conv1dCase("whisper-base-conv1", (16, 80, 3000), BF16,
                   "Whisper base encoder conv1: 80 mel bins -> 512, k3/1 pad 1, 3000 frames; "
                   "batch 16, (N, C, L)", out_channels=512, kernel=3, padding=1,
                   channels_last=False),
        Conv1dCase("whisper-base-conv2", (16, 512, 3000), BF16,
                   "Whisper base encoder conv2: 512 -> 512, k3/2 pad 1, 3000 -> 1500 frames; "
                   "batch 16, (N, C, L)", out_channels=512, kernel=3, stride=2, padding=1,
                   channels_last=False),
    ),
}
CONV1D["full"] = CONV1D["quick"] + (
    Conv1dCase("whisper-large-conv2", (16, 1280, 3000), BF16,
               "Whisper large encoder conv2: 1280 -> 1280, k3/2 pad 1, 3000 -> 1500 frames; "
               "batch 16, (N, C, L)", out_channels=1280, kernel=3, stride=2, padding=1,
               channels_last=False),
    # the quick cases in the (N, L, C) layout: what the (N, C, L) one costs (bench/TUNING.md
    # v37: the NCHW-form kernels against the channels-last ones)
    Conv1dCase("whisper-base-conv1-nlc", (16, 80, 3000), BF16,
               "Whisper base encoder conv1 on an (N, L, C) input", out_channels=512, kernel=3,
               padding=1),
    Conv1dCase("whisper-base-conv2-nlc", (16, 512, 3000), BF16,
               "Whisper base encoder conv2 on an (N, L, C) input", out_channels=512, kernel=3,
               stride=2, padding=1),
)
DEPTHWISE_CONV1D = {
    "tiny": (
        Conv1dCase("tiny-1d-causal-dw4", (2, 8, 10), F32, "emulation check: depthwise conv1d "
                   "k4 pad 3 (causal), 8 channels, (N, L, C) layout", out_channels=8, kernel=4,
                   padding=3, groups=8),
    ),
    "quick": (
        Conv1dCase("mamba-1.4b-conv", (8, 4096, 2048), BF16,
                   "Mamba-1.4B mixer conv1d: depthwise k4 pad 3 (causal), d_inner 4096, 2048 "
                   "tokens; batch 8, (N, L, C) layout", out_channels=4096, kernel=4,
                   padding=3, groups=4096),
    ),
}
DEPTHWISE_CONV1D["full"] = DEPTHWISE_CONV1D["quick"] + (
    Conv1dCase("mamba-130m-conv", (16, 1536, 2048), BF16,
               "Mamba-130M mixer conv1d: depthwise k4 pad 3 (causal), d_inner 1536, 2048 "
               "tokens; batch 16, (N, L, C) layout", out_channels=1536, kernel=4, padding=3,
               groups=1536),)


class Conv1dSuite(Conv2dSuite):
    """conv1d (pydl.conv1d: conv2d's kernels on a 1 x L image) against torch's conv1d
    (cuDNN's, which runs it as a 1 x L conv2d too)."""

    fn = "conv1d"

    def __init__(self, op="conv1d", shape_sets=CONV1D, bound="compute"):
        Suite.__init__(
            self, op=op, registry_op="conv2d", shape_sets=shape_sets, bound=bound,
            differentiable=(0, 1),
            notes="conv1d(x, w, stride, padding, groups), no bias; grads of x and w",
            algos={"triton": ("implicit", "im2col"), "numba": ("im2col",)})

    def make_inputs(self, case, dtype, device, generator):
        n, c, length = case.shape
        x = randn((n, length, c) if case.channels_last else (n, c, length), dtype, device,
                  generator)
        wt = randn((case.out_channels, c // case.groups, case.kernel), dtype, device, generator)
        return (x.transpose(1, 2) if case.channels_last else x), wt


SUITES = [Conv2dSuite(), DepthwiseConv2dSuite(), Conv1dSuite(),
          Conv1dSuite("conv1d_depthwise", DEPTHWISE_CONV1D, "memory")]
