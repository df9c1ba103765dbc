"""GPEN's FullGenerator in plain PyTorch.

A U-shaped encoder whose feature maps are concatenated into a StyleGAN2 decoder in place of
random noise (the paper's "isconcat" generator). Module and parameter names follow the
authors' code so the released GPEN-BFR checkpoints load with ``strict=True``; the layers are
composed bottom-up in the manner of rosinality's stylegan2-pytorch ``model.py``.

Modulated convolutions scale the activations by the style and the outputs by the
demodulation factor instead of building one weight per sample; this is the same function as
the authors' grouped convolution, but stays a single dense convolution at any batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    x = F.pad(x, (pad[0], pad[1], pad[0], pad[1]))
    weight = kernel.flip((0, 1)).to(x.dtype).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weight, stride=down, groups=c)


def fused_leaky_relu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Bias, leaky ReLU and the sqrt(2) gain that keeps activations at unit variance."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return F.leaky_relu(x + bias.view(shape), LEAKY_SLOPE) * LEAKY_GAIN


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + 1e-8)


class FusedLeakyReLU(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_leaky_relu(x, self.bias)


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
            return fused_leaky_relu(F.linear(x, self.weight * self.scale), self.bias * self.lr_mul)
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
        layers.append(FusedLeakyReLU(out_ch))
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

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        style = self.modulation(w)
        weight = self.weight[0] * self.scale
        x = x * style[:, :, None, None]
        if self.upsample:
            out = self.blur(F.conv_transpose2d(x, weight.transpose(0, 1), stride=2))
        else:
            out = F.conv2d(x, weight, padding=self.padding)
        if self.demodulate:
            energy = style.float().square() @ weight.float().square().sum((2, 3)).t()
            out = out * torch.rsqrt(energy + 1e-8).to(out.dtype)[:, :, None, None]
        return out


class NoiseInjection(nn.Module):
    """GPEN's "noise": the encoder feature map, scaled and concatenated to the activations."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return torch.cat((x, self.weight * feature), dim=1)


class StyledConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, style_dim: int, upsample: bool = False):
        super().__init__()
        self.conv = ModulatedConv2d(in_ch, out_ch, 3, style_dim, upsample=upsample)
        self.noise = NoiseInjection()
        self.activate = FusedLeakyReLU(out_ch * 2)

    def forward(self, x: torch.Tensor, w: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
        return self.activate(self.noise(self.conv(x, w), feature))


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
        """``features`` run coarse to fine: one 4x4 map, then one per resolution up to S."""
        w = self.style(latent)
        out = self.conv1(self.input(latent.shape[0]), w, features[0])
        skip = self.to_rgb1(out, w)
        for up_conv, conv, to_rgb, feature in zip(self.convs[::2], self.convs[1::2], self.to_rgbs,
                                                  features[1:]):
            out = conv(up_conv(out, w, feature), w, feature)
            skip = to_rgb(out, w, skip)
        return skip


class FullGenerator(nn.Module):
    """GPEN: encoder -> latent + multi-scale features -> StyleGAN2 decoder.

    ``forward`` maps a ``[B,3,S,S]`` face in [-1,1] to the restored ``[B,3,S,S]`` face (not
    clipped, as in the authors' model).
    """

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
        return self.generator(latent, features[::-1])
