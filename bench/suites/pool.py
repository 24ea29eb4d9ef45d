"""Pooling: max_pool2d, avg_pool2d and adaptive_avg_pool2d at the stages of common CNNs.

Shapes (input (N, C, H, W); bf16 channels_last is the main set, NCHW alongside):
  max_pool2d    ResNet-50's stem pool, 3x3/2 pad 1 on 64x112x112 at batch 256 (the usual
                ImageNet training batch); VGG-16's 2x2/2 pools after each stage at batch 64
                (64x224x224, 128x112x112, 256x56x56, 512x28x28, 512x14x14); AlexNet's
                overlapping 3x3/2 pools (torchvision's alexnet: 64x55x55, 192x27x27,
                256x13x13) at its paper's batch 128
  avg_pool2d    DenseNet-121's transition pools, 2x2/2 on 128x56x56, 256x28x28, 512x14x14 at
                batch 64; Inception-v3's 3x3/1 pad 1 branch pool (InceptionA, 192x35x35 at
                Mixed_5b) at batch 64; ResNet-D's 2x2/2 average-pool shortcut on 256x56x56 at
                batch 256 (Bag of Tricks, He et al. 2019)
  adaptive_avg_pool2d   global average pooling of classifier heads: ResNet-50 (2048x7x7) at
                batch 256, Inception-v3 (2048x8x8), MobileNetV2 / EfficientNet-B0 (1280x7x7)
  tiny          emulation checks: small fp32 / fp16 inputs, NCHW and channels_last
  max_pool1d, avg_pool1d, adaptive_avg_pool1d (pydl's 1-d pools: the 2-d kernels on a 1 x L
                image; input (N, C, L), or an (N, L, C) sequence transposed, as a sequence
                model's activation arrives): M5's first pool, 4/4 over 128 channels of 7981
                samples (Dai et al. 2017, raw-waveform CNNs: 4 s at 8 kHz after its 80/4 conv)
                at batch 64; Funnel-Transformer's sequence pooling, 2/2 mean over 512 tokens
                of a BERT-base-wide (768) activation at batch 32 (Dai et al. 2020); the global
                average over the 1500 frames of a Whisper-base encoder output (512 wide), an
                audio classification head's pooling, at batch 64

Memory-bound: judged against the measured copy bandwidth. Minimal bytes (s = element size,
X input elements, Y output elements):
    fwd      read x, write y                         (X + Y) s
             (the inference forward: no indices. torch's CUDA max pool writes int64 indices
             even then; pydl writes none. Neither is counted.)
    bwd      read dy, write dx                       (X + Y) s
             max pool also reads the argmax: + 1 byte per output, the least an index can
             take (a window offset < 256; pydl saves exactly that, torch saves 8 bytes)
    fwd+bwd  the two above; max pool's training forward also writes that 1-byte index
                                                     2 (X + Y) s (+ 2 Y for max pool)
FLOPs are approximate: one compare or add per window element per output, forward and
backward (KH KW Y each way; global pooling: X).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import Case, Suite, dtype_size, randn

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
INDEX_BYTES = 1     # the minimal argmax: a window offset (max pool's windows are < 256)


@dataclass(frozen=True)
class PoolCase(Case):
    """shape = the input (N, C, H, W). kernel 0: global (adaptive to 1x1) pooling."""
    kernel: int = 0
    stride: int = 0
    padding: int = 0
    channels_last: bool = True

    @property
    def out_hw(self) -> tuple[int, int]:
        _, _, h, w = self.shape
        if self.kernel == 0:
            return 1, 1
        return ((h + 2 * self.padding - self.kernel) // self.stride + 1,
                (w + 2 * self.padding - self.kernel) // self.stride + 1)

    @property
    def out_numel(self) -> int:
        oh, ow = self.out_hw
        return self.shape[0] * self.shape[1] * oh * ow


@dataclass(frozen=True)
class Pool1dCase(PoolCase):
    """shape = the input (N, C, L); channels_last: laid out (N, L, C) (a transposed sequence)."""

    @property
    def out_hw(self) -> tuple[int, int]:
        length = self.shape[2]
        if self.kernel == 0:
            return 1, 1
        return 1, (length + 2 * self.padding - self.kernel) // self.stride + 1


def _case1d(name, n, c, length, k, s, p, source, dtype=BF16, channels_last=False) -> Pool1dCase:
    layout = "(N, L, C)" if channels_last else "(N, C, L)"
    window = f"{k}/{s}" + (f" pad {p}" if p else "") if k else "global (length 1 output)"
    return Pool1dCase(name, (n, c, length), dtype, f"{source}: {window} on {c} x {length}, "
                      f"batch {n}, {layout}", kernel=k, stride=s, padding=p,
                      channels_last=channels_last)


def _case(name, n, c, h, k, s, p, source, dtype=BF16, channels_last=True) -> PoolCase:
    layout = "channels_last" if channels_last else "NCHW"
    window = f"{k}x{k}/{s}" + (f" pad {p}" if p else "") if k else "global (1x1 output)"
    return PoolCase(name, (n, c, h, h), dtype, f"{source}: {window} on {c}x{h}x{h}, batch {n}, "
                    f"{layout}", kernel=k, stride=s, padding=p, channels_last=channels_last)


MAX_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        _case("tiny-3x3s2", 2, 8, 9, 3, 2, 1, "emulation check: overlapping windows with "
              "padding (ResNet's stem pool), ragged 9x9", F32),
        _case("tiny-2x2s2", 1, 4, 8, 2, 2, 0, "emulation check: VGG's 2x2/2", F16,
              channels_last=False),
    ),
    "quick": (
        _case("r50-stem", 256, 64, 112, 3, 2, 1, "ResNet-50 stem pool (maxpool after conv1)"),
        _case("r50-stem-nchw", 256, 64, 112, 3, 2, 1, "ResNet-50 stem pool", channels_last=False),
        _case("vgg-224", 64, 64, 224, 2, 2, 0, "VGG-16 pool1"),
        _case("vgg-28", 64, 512, 28, 2, 2, 0, "VGG-16 pool4"),
        _case("alexnet-55", 128, 64, 55, 3, 2, 0, "AlexNet pool1 (torchvision alexnet)"),
    ),
}
MAX_SHAPES["full"] = MAX_SHAPES["quick"] + (
    _case("vgg-224-nchw", 64, 64, 224, 2, 2, 0, "VGG-16 pool1", channels_last=False),
    _case("vgg-112", 64, 128, 112, 2, 2, 0, "VGG-16 pool2"),
    _case("vgg-56", 64, 256, 56, 2, 2, 0, "VGG-16 pool3"),
    _case("vgg-14", 64, 512, 14, 2, 2, 0, "VGG-16 pool5"),
    _case("alexnet-27", 128, 192, 27, 3, 2, 0, "AlexNet pool2"),
    _case("alexnet-13", 128, 256, 13, 3, 2, 0, "AlexNet pool5"),
    _case("r50-stem-fp32", 256, 64, 112, 3, 2, 1, "ResNet-50 stem pool, fp32", F32),
)

AVG_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        _case("tiny-2x2s2", 2, 8, 8, 2, 2, 0, "emulation check: DenseNet's transition pool", F32),
        _case("tiny-3x3s1", 1, 4, 7, 3, 1, 1, "emulation check: Inception's 3x3/1 pad 1 "
              "(padding counted in the divisor, torch's default)", F16, channels_last=False),
    ),
    "quick": (
        _case("densenet-56", 64, 128, 56, 2, 2, 0, "DenseNet-121 transition1"),
        _case("densenet-56-nchw", 64, 128, 56, 2, 2, 0, "DenseNet-121 transition1",
              channels_last=False),
        _case("densenet-14", 64, 512, 14, 2, 2, 0, "DenseNet-121 transition3"),
        _case("inception-35", 64, 192, 35, 3, 1, 1, "Inception-v3 Mixed_5b branch_pool"),
    ),
}
AVG_SHAPES["full"] = AVG_SHAPES["quick"] + (
    _case("densenet-28", 64, 256, 28, 2, 2, 0, "DenseNet-121 transition2"),
    _case("resnet-d-56", 256, 256, 56, 2, 2, 0,
          "ResNet-50-D layer2 shortcut average pool (Bag of Tricks)"),
    _case("inception-35-nchw", 64, 192, 35, 3, 1, 1, "Inception-v3 Mixed_5b branch_pool",
          channels_last=False),
    _case("densenet-56-fp32", 64, 128, 56, 2, 2, 0, "DenseNet-121 transition1, fp32", F32),
)

ADAPTIVE_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        _case("tiny-global", 2, 16, 5, 0, 0, 0, "emulation check: global pooling", F16),
        _case("tiny-global-nchw", 2, 8, 6, 0, 0, 0, "emulation check: global pooling", F32,
              channels_last=False),
    ),
    "quick": (
        _case("r50-head", 256, 2048, 7, 0, 0, 0, "ResNet-50 avgpool before fc"),
        _case("r50-head-nchw", 256, 2048, 7, 0, 0, 0, "ResNet-50 avgpool before fc",
              channels_last=False),
    ),
}
ADAPTIVE_SHAPES["full"] = ADAPTIVE_SHAPES["quick"] + (
    _case("inception-head", 256, 2048, 8, 0, 0, 0, "Inception-v3 avgpool before fc"),
    _case("mobilenet-head", 256, 1280, 7, 0, 0, 0, "MobileNetV2 / EfficientNet-B0 head pool"),
    _case("r50-head-fp32", 256, 2048, 7, 0, 0, 0, "ResNet-50 avgpool before fc, fp32", F32),
)


MAX1D_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        _case1d("tiny-1d-3s2", 2, 8, 37, 3, 2, 1, "emulation check: overlapping windows with "
                "padding, ragged length", F32),
        _case1d("tiny-1d-4s4-nlc", 1, 4, 16, 4, 4, 0, "emulation check: M5's 4/4", F16,
                channels_last=True),
    ),
    "quick": (
        _case1d("m5-pool1", 64, 128, 7981, 4, 4, 0, "M5 raw-waveform CNN pool1"),
    ),
}
MAX1D_SHAPES["full"] = MAX1D_SHAPES["quick"] + (
    _case1d("m5-pool1-nlc", 64, 128, 7981, 4, 4, 0, "M5 raw-waveform CNN pool1",
            channels_last=True),)
AVG1D_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        _case1d("tiny-1d-2s2-nlc", 2, 6, 17, 2, 2, 0, "emulation check: Funnel's 2/2 on a "
                "ragged length", F32, channels_last=True),
        _case1d("tiny-1d-3s1", 1, 4, 9, 3, 1, 1, "emulation check: 3/1 pad 1 (padding "
                "counted in the divisor)", F16),
    ),
    "quick": (
        _case1d("funnel-512", 32, 768, 512, 2, 2, 0, "Funnel-Transformer sequence pooling",
                channels_last=True),
    ),
}
AVG1D_SHAPES["full"] = AVG1D_SHAPES["quick"] + (
    _case1d("funnel-512-ncl", 32, 768, 512, 2, 2, 0, "Funnel-Transformer sequence pooling"),)
ADAPTIVE1D_SHAPES: dict[str, tuple[Case, ...]] = {
    "tiny": (
        _case1d("tiny-1d-global-nlc", 2, 8, 15, 0, 0, 0, "emulation check: global pooling",
                F16, channels_last=True),
    ),
    "quick": (
        _case1d("whisper-base-mean", 64, 512, 1500, 0, 0, 0, "Whisper-base encoder output, "
                "an audio classification head's mean over time", channels_last=True),
    ),
}
ADAPTIVE1D_SHAPES["full"] = ADAPTIVE1D_SHAPES["quick"]


class PoolSuite(Suite):
    """kind: "max", "avg" or "adaptive" (global average); dims 2 (the 2-d pools) or 1
    (pydl's 1-d pools on the same kernels)."""

    def __init__(self, kind: str, dims: int = 2):
        self.kind, self.dims = kind, dims
        op = {"max": "max_pool", "avg": "avg_pool", "adaptive": "adaptive_avg_pool"}[kind] + \
            f"{dims}d"
        shapes = ({"max": MAX_SHAPES, "avg": AVG_SHAPES, "adaptive": ADAPTIVE_SHAPES} if dims == 2
                  else {"max": MAX1D_SHAPES, "avg": AVG1D_SHAPES,
                        "adaptive": ADAPTIVE1D_SHAPES})[kind]
        notes = (f"{op}(x, output_size=1): global average pooling" if kind == "adaptive" else
                 f"{op}(x, kernel_size, stride, padding)")
        # the 1-d pools run the 2-d kernels (a 1 x L image): the registry's 2-d entry
        super().__init__(op=op, registry_op=op[:-2] + "2d", shape_sets=shapes, bound="memory",
                         notes=notes)

    def options(self, case):
        if self.kind == "adaptive":
            return {}
        return {"kernel_size": case.kernel, "stride": case.stride, "padding": case.padding}

    def make_inputs(self, case, dtype, device, generator):
        if self.dims == 1:
            n, c, length = case.shape
            x = randn((n, length, c) if case.channels_last else case.shape, dtype, device,
                      generator)
            return (x.transpose(1, 2) if case.channels_last else x,)
        fmt = torch.channels_last if case.channels_last else torch.contiguous_format
        return (randn(case.shape, dtype, device, generator).contiguous(memory_format=fmt),)

    def _fn(self, module):
        """The op of this kind and dims in `module` (pydl or torch.nn.functional)."""
        return getattr(module, self.op)

    def pydl_fn(self, backend, algo=None):
        import pydl
        f = self._fn(pydl)
        if self.kind == "adaptive":
            return lambda x: f(x, 1, backend=backend)
        return lambda x, kernel_size, stride, padding: f(x, kernel_size, stride, padding,
                                                          backend=backend)

    def torch_fn(self):
        f = self._fn(torch.nn.functional)
        if self.kind == "adaptive":
            return lambda x: f(x, 1)
        return lambda x, kernel_size, stride, padding: f(x, kernel_size, stride, padding)

    def reduction_length(self, case):
        """Input elements a window covers (the whole image or signal for global pooling)."""
        if self.kind == "adaptive":
            return math.prod(case.shape[2:])
        return case.kernel ** self.dims

    def reduction_lengths(self, case):
        k = self.reduction_length(case)
        if self.kind == "adaptive":
            return (k, 1)          # each input's gradient is one output's gradient, scaled
        overlap = -(-case.kernel // case.stride) ** self.dims   # windows over one input element
        return (k, overlap)

    def flops(self, case, direction):
        per = case.numel if self.kind == "adaptive" else self.reduction_length(case) * \
            case.out_numel
        return per * (2 if direction == "fwd+bwd" else 1)

    def bytes(self, case, dtype, direction):
        x, y = case.numel, case.out_numel
        data = (x + y) * dtype_size(dtype)
        index = INDEX_BYTES * y if self.kind == "max" else 0
        return {"fwd": data, "bwd": data + index, "fwd+bwd": 2 * data + 2 * index}[direction]


SUITES = [PoolSuite("max"), PoolSuite("avg"), PoolSuite("adaptive"),
          PoolSuite("max", 1), PoolSuite("avg", 1), PoolSuite("adaptive", 1)]
