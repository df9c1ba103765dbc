"""GPEN's FullGenerator in plain PyTorch.

A U-shaped encoder whose feature maps are concatenated into a StyleGAN2 decoder in place of
random noise (the paper's "isconcat" generator). Module and parameter names follow the
authors' code so the released GPEN-BFR checkpoints load with ``strict=True``; the layers are
composed bottom-up in the manner of rosinality's stylegan2-pytorch ``model.py``.

Modulated convolutions scale the activations by the style and the outputs by the
demodulation factor instead of building one weight per sample; this is the same function as
the authors' grouped convolution, but stays a single dense convolution at any batch size. For a
single face, layers whose activations outnumber their weights modulate the weights instead.

Inference (no gradient recorded) overwrites intermediate tensors in place where the forward owns
them (bias + activation + gain, demodulation, the modulated input, the feature scaling), and the
encoder features are dropped as soon as the decoder has used them: the same numbers with about
a third of the peak memory. ``peak_activation_bytes`` models that peak for the batch-size cap.
In fp16 the mapping network's normalisation runs in fp32 and modulated convolutions
pre-normalise styles and weights (as StyleGAN2-ADA does), so large styles cannot overflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .align import template

BLUR_TAPS = (1.0, 3.0, 3.0, 1.0)
LEAKY_SLOPE = 0.2
LEAKY_GAIN = math.sqrt(2.0)


@dataclass(frozen=True)
class GPENConfig:
    """The constructor arguments of the authors' FullGenerator."""

    size: int
    style_dim: int = 512
    n_mlp: int = 8
    channel_multiplier: int = 2
    narrow: float = 1.0

    @property
    def log_size(self) -> int:
        return int(math.log2(self.size))

    def channels(self) -> dict[int, int]:
        """Feature width at each resolution, exactly as the authors round it."""
        cm, n = self.channel_multiplier, self.narrow
        widths = {4: 512, 8: 512, 16: 512, 32: 512, 64: 256 * cm, 128: 128 * cm, 256: 64 * cm,
                  512: 32 * cm, 1024: 16 * cm, 2048: 8 * cm}
        return {res: int(w * n) for res, w in widths.items()}


def blur_kernel(gain: float = 1.0) -> torch.Tensor:
    """Separable [1,3,3,1] binomial kernel, normalised to sum ``gain``."""
    taps = torch.tensor(BLUR_TAPS)
    kernel = taps[None, :] * taps[:, None]
    return kernel / kernel.sum() * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1,
              pad: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Upsample by zero insertion, pad, apply a 2-D FIR filter per channel, then decimate."""
    b, c, h, w = x.shape
    if up > 1:
        x = x.reshape(b, c, h, 1, w, 1)
        x = F.pad(x, (0, up - 1, 0, 0, 0, up - 1)).reshape(b, c, h * up, w * up)
    weight = kernel.flip((0, 1)).to(x.dtype).expand(c, 1, *kernel.shape)
    if pad[0] == pad[1]:  # the convolution pads with zeros itself, without a padded copy
        return F.conv2d(x, weight, stride=down, padding=pad[0], groups=c)
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    return F.conv2d(x, weight, stride=down, groups=c)


def squared_norm(weight: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Sum of squares over ``dims`` in fp32, accumulated without an fp32 copy of the weight (a
    bf16 weight's squares summed exactly, at a fifth of the cost of converting it first)."""
    return torch.linalg.vector_norm(weight, dim=dims, dtype=torch.float32).square()


def overwrite_allowed() -> bool:
    """In-place updates are only taken when no gradient is recorded (inference, no_grad), so
    autograd always sees the plain out-of-place graph."""
    return not torch.is_grad_enabled()


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Bias, leaky ReLU and the sqrt(2) gain that keeps activations at unit variance.

    ``inplace`` lets it overwrite ``x`` (a tensor the caller owns) when no gradient is recorded:
    the same three operations in the same order, so the same numbers, without two temporaries
    of the input's size.
    """
    shape = (1, -1) + (1,) * (x.ndim - 2)
    if inplace and overwrite_allowed():
        return F.leaky_relu_(x.add_(bias.view(shape)), LEAKY_SLOPE).mul_(LEAKY_GAIN)
    return F.leaky_relu(x + bias.view(shape), LEAKY_SLOPE) * LEAKY_GAIN


class PixelNorm(nn.Module):
    """Normalises the latent to unit RMS. An fp16 latent is normalised in fp32: squaring a
    large one overflows fp16's range (bf16 has fp32's range and measures closer to the authors'
    output computed natively, 48 vs 46 dB on golden_a)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float16:
            return self.forward(x.float()).half()
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    """Bias + leaky ReLU + gain; ``inplace`` when its input is always a fresh tensor (like
    ``nn.ReLU(inplace=True)``)."""

    def __init__(self, channels: int, inplace: bool = False):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias, self.inplace)


class Blur(nn.Module):
    """FIR low-pass used before strided convs and after transposed convs."""

    def __init__(self, pad: tuple[int, int], gain: float = 1.0):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(gain))
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, pad=self.pad)


class Upsample(nn.Module):
    """2x FIR upsampling of the to-RGB skip path."""

    def __init__(self, factor: int = 2):
        super().__init__()
        self.register_buffer("kernel", blur_kernel(factor**2))
        self.factor = factor
        p = self.kernel.shape[0] - factor
        self.pad = ((p + 1) // 2 + factor - 1, p // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upfirdn2d(x, self.kernel, up=self.factor, pad=self.pad)


class EqualConv2d(nn.Module):
    """Conv with weights scaled at run time (equalized learning rate)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.stride = stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight * self.scale, stride=self.stride, padding=self.padding)


class EqualLinear(nn.Module):
    """Linear layer with equalized learning rate and an optional fused leaky ReLU."""

    def __init__(self, in_dim: int, out_dim: int, bias_init: float = 0.0, lr_mul: float = 1.0,
                 activate: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_dim, in_dim) / lr_mul)
        self.bias = nn.Parameter(torch.full((out_dim,), float(bias_init)))
        self.scale = lr_mul / math.sqrt(in_dim)
        self.lr_mul = lr_mul
        self.activate = activate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activate:
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul,
                                    inplace=True)
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ConvLayer(nn.Sequential):
    """Encoder block: (blur + stride-2) conv, then bias and leaky ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, downsample: bool = False):
        layers: list[nn.Module] = []
        if downsample:
            p = (len(BLUR_TAPS) - 2) + (kernel_size - 1)
            layers.append(Blur(pad=((p + 1) // 2, p // 2)))
            layers.append(EqualConv2d(in_ch, out_ch, kernel_size, stride=2))
        else:
            layers.append(EqualConv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2))
        layers.append(FusedLeakyReLU(out_ch, inplace=True))
        super().__init__(*layers)


class ModulatedConv2d(nn.Module):
    """StyleGAN2 modulated convolution, optionally a 2x transposed (upsampling) one."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, style_dim: int,
                 demodulate: bool = True, upsample: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, out_ch, in_ch, kernel_size, kernel_size))
        self.modulation = EqualLinear(style_dim, in_ch, bias_init=1.0)
        self.scale = 1 / math.sqrt(in_ch * kernel_size**2)
        self.padding = kernel_size // 2
        self.demodulate = demodulate
        self.upsample = upsample
        if upsample:
            p = (len(BLUR_TAPS) - 2) - (kernel_size - 1)
            self.blur = Blur(pad=((p + 1) // 2 + 1, p // 2 + 1), gain=4.0)

    def forward(self, x: torch.Tensor, w: torch.Tensor, consume_input: bool = False) -> torch.Tensor:
        """``consume_input``: the caller no longer needs ``x``, so it may be modulated in place."""
        # The equalized-learning-rate scale rides on the style, so the convolution reads the
        # weight as stored instead of a scaled copy made on every call.
        style = self.modulation(w) * self.scale
        weight = self.weight[0]
        if self.demodulate and x.dtype == torch.float16:
            # StyleGAN2-ADA's fp16 guard: bring styles and weights to at most 1 (weights to
            # 1/sqrt(fan-in)) before they touch the activations. Demodulation divides both
            # factors out again, so only the overflow goes away.
            tiny = torch.finfo(x.dtype).tiny
            largest_weight = weight.abs().amax(dim=(1, 2, 3), keepdim=True).clamp_min(tiny)
            weight = weight * (self.scale / largest_weight)
            style = style / style.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
        if x.shape[0] == 1 and weight.numel() < x[0].numel():
            # One face whose activations outnumber the weights: modulate and demodulate the
            # weights instead (the authors' formulation), sparing two passes over the activations.
            weight = weight * style[0, None, :, None, None].to(weight.dtype)
            if self.demodulate:
                energy = squared_norm(weight, (1, 2, 3))
                demod = torch.rsqrt(energy + 1e-8).to(weight.dtype)[:, None, None, None]
                weight = weight.mul_(demod) if overwrite_allowed() else weight * demod
            return self._convolve(x, weight)
        style_map = style.to(x.dtype)[:, :, None, None]
        x = x.mul_(style_map) if consume_input and overwrite_allowed() else x * style_map
        out = self._convolve(x, weight)
        if self.demodulate:
            energy = style.float().square() @ squared_norm(weight, (2, 3)).t()
            demod = torch.rsqrt(energy + 1e-8).to(out.dtype)[:, :, None, None]
            out = out.mul_(demod) if overwrite_allowed() else out * demod
        return out

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            return self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        return F.conv2d(x, weight, padding=self.padding)


class NoiseInjection(nn.Module):
    """GPEN's "noise": the encoder feature map, scaled and concatenated to the activations."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, feature: torch.Tensor,
                into: torch.Tensor | None = None) -> torch.Tensor:
        """``into``: a dead tensor of the result's shape to write the result into."""
        if overwrite_allowed():  # scale the copy inside the concatenation, not a third tensor
            out = torch.cat((x, feature), dim=1, out=into)
            out[:, x.shape[1]:].mul_(self.weight)
            return out
        return torch.cat((x, self.weight * feature), dim=1)


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch * 2, inplace=True)

    def forward(self, x: torch.Tensor, w: torch.Tensor, feature: torch.Tensor,
                consume_input: bool = False) -> torch.Tensor:
        out = self.conv(x, w, consume_input)
        # Without upsampling the input has the output's shape: once convolved it can hold it.
        reuse = consume_input and overwrite_allowed() and not self.conv.upsample
        return self.activate(self.noise(out, feature, into=x if reuse else None))


class ToRGB(nn.Module):
    def __init__(self, in_ch: int, style_dim: int, upsample: bool = True):
        super().__init__()
        if upsample:
            self.upsample = Upsample()
        self.conv = ModulatedConv2d(in_ch, 3, 1, style_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(1, 3, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        out = self.conv(x, w) + self.bias
        if skip is not None:
            out = out + self.upsample(skip)
        return out


class ConstantInput(nn.Module):
    def __init__(self, channels: int, size: int = 4):
        super().__init__()
        self.input = nn.Parameter(torch.randn(1, channels, size, size))

    def forward(self, batch: int) -> torch.Tensor:
        return self.input.expand(batch, -1, -1, -1)


class StyleDecoder(nn.Module):
    """The StyleGAN2 synthesis network with concatenated encoder features as its noise."""

    def __init__(self, config: GPENConfig, lr_mlp: float = 0.01):
        super().__init__()
        ch = config.channels()
        dim = config.style_dim
        self.style = nn.Sequential(
            PixelNorm(),
            *(EqualLinear(dim, dim, lr_mul=lr_mlp, activate=True) for _ in range(config.n_mlp)),
        )
        self.input = ConstantInput(ch[4])
        self.conv1 = StyledConv(ch[4], ch[4], dim)
        self.to_rgb1 = ToRGB(ch[4] * 2, dim, upsample=False)
        self.convs = nn.ModuleList()
        self.to_rgbs = nn.ModuleList()
        in_ch = ch[4]
        for log_res in range(3, config.log_size + 1):
            out_ch = ch[2**log_res]
            self.convs.append(StyledConv(in_ch * 2, out_ch, dim, upsample=True))
            self.convs.append(StyledConv(out_ch * 2, out_ch, dim))
            self.to_rgbs.append(ToRGB(out_ch * 2, dim))
            in_ch = out_ch

    def forward(self, latent: torch.Tensor, features: list[torch.Tensor]) -> torch.Tensor:
        """``features`` run fine to coarse (the encoder's order, S down to 4x4) and are taken
        off the list as they are used, so each map is freed as early as possible."""
        w = self.style(latent)
        feature = features.pop()
        out = self.conv1(self.input(latent.shape[0]), w, feature)
        skip = self.to_rgb1(out, w)
        for up_conv, conv, to_rgb in zip(self.convs[::2], self.convs[1::2], self.to_rgbs):
            feature = features.pop()
            # Each level's input is read by nothing else (to_rgb has already used it), and
            # rebinding ``out`` at once frees the previous level's activations.
            out = up_conv(out, w, feature, consume_input=True)
            out = conv(out, w, feature, consume_input=True)
            feature = None
            skip = to_rgb(out, w, skip)
        return skip


class FullGenerator(nn.Module):
    """GPEN: encoder -> latent + multi-scale features -> StyleGAN2 decoder.

    ``forward`` maps a ``[B,3,S,S]`` face in [-1,1] to the restored ``[B,3,S,S]`` face (not
    clipped, as in the authors' model). The class attributes are what every face restorer
    declares (``gpen.restorers.FaceModel``).
    """

    name = "GPEN"
    input_range = (-1.0, 1.0)
    supports_fp16 = True
    supports_bf16 = True
    has_fidelity = False

    def __init__(self, config: GPENConfig):
        super().__init__()
        self.config = config
        ch = config.channels()
        self.generator = StyleDecoder(config)
        self.ecd0 = nn.Sequential(ConvLayer(3, ch[config.size], 1))
        in_ch = ch[config.size]
        for index, log_res in enumerate(range(config.log_size, 2, -1), start=1):
            out_ch = ch[2 ** (log_res - 1)]
            setattr(self, f"ecd{index}", nn.Sequential(ConvLayer(in_ch, out_ch, 3, downsample=True)))
            in_ch = out_ch
        self.final_linear = nn.Sequential(EqualLinear(ch[4] * 16, config.style_dim, activate=True))

    @property
    def size(self) -> int:
        return self.config.size

    @property
    def template(self) -> np.ndarray:
        """GPEN's own five-point template at this model's size."""
        return template(self.config.size)

    def to_channels_last(self) -> FullGenerator:
        """NHWC layout for the 4-D weights (Tensor Core friendly); inputs should follow."""
        for tensor in (*self.parameters(), *self.buffers()):
            if tensor.dim() == 4:
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
        return self

    def encoders(self) -> list[nn.Module]:
        return [getattr(self, f"ecd{i}") for i in range(self.config.log_size - 1)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        for encoder in self.encoders():
            x = encoder(x)
            features.append(x)
        latent = self.final_linear(x.flatten(1))
        del x
        return self.generator(latent, features)


def peak_activation_bytes(config: GPENConfig, dtype: torch.dtype, batch: int = 1) -> int:
    """Peak bytes of live tensors in one inference forward of ``batch`` faces, input included.

    Follows the forward's allocations phase by phase (weights excluded): at each decoder level
    the previous level's output, the (transposed) convolution's output, the concatenation with
    the encoder feature, and every encoder feature not used yet. The full-resolution level
    dominates (about five feature planes per channel at S x S), so memory grows linearly with S.
    Checked against the measured peak by ``python -m gpen.bench --memory`` and the tests.
    """
    ch = config.channels()
    feature = {r: ch[r] * r * r for r in (2**k for k in range(2, config.log_size + 1))}
    unused = sum(feature.values())  # every encoder feature is alive when the decoder starts
    # The encoder's first blur copies the full-resolution feature; counting every feature
    # beside it bounds the encoder from above.
    peak = unused + feature[config.size]
    unused -= feature[4]  # used by conv1 (4x4), which is small next to what follows
    for log_res in range(3, config.log_size + 1):
        r, c = 2**log_res, ch[2**log_res]
        previous = 2 * ch[r // 2] * (r // 2) ** 2  # last level's output: consumed, still alive
        upsampled = c * (r + 1) ** 2 + c * r * r  # transposed convolution, then its blur
        concatenated = c * r * r + 2 * c * r * r  # convolution output + concatenation
        peak = max(peak, unused + previous + max(upsampled, concatenated),
                   unused + 2 * c * r * r + c * r * r)  # second convolution (writes into its input)
        unused -= feature[r]
        peak = max(peak, unused + 4 * c * r * r)  # to_rgb modulates a copy of the output
    small = 9 * config.size**2  # the input face, the RGB skip and its upsampled copy
    return (peak + small) * batch * torch.finfo(dtype).bits // 8
