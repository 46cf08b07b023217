"""Small building blocks shared by the 1D, 2D and 3D EMO blocks: conv/norm types by dimension,
ConvNormAct, channel LayerNorm, LayerScale."""

import math
from typing import List, Type

import torch
from torch import Tensor, nn
from timm.layers import register_notrace_function
from torchvision.ops import DeformConv2d

from .fused import DeployOptions, FusedConv2d, cpu_autocast_bf16, fold_conv_norm

__all__ = ['spec_padding', 'conv_nd', 'norm_nd', 'cpu_autocast_bf16', 'ConvNormAct', 'DeformConvNormAct',
           'LayerNormChannels', 'LayerScale']

NORM_EPS = 1e-6


def spec_padding(kernel_size: int, stride: int = 1, dilation: int = 1) -> int:
    """Padding of the official ConvNormAct: ceil(((k - 1) * d + 1 - s) / 2)."""
    return max(0, math.ceil(((kernel_size - 1) * dilation + 1 - stride) / 2))


def channels_last_order(ndim: int) -> List[int]:
    """permute() order (B, C, *S) -> (B, *S, C) (a plain permute: some exporters lack movedim)."""
    return [0] + list(range(2, ndim)) + [1]


def channels_first_order(ndim: int) -> List[int]:
    """permute() order (B, *S, C) -> (B, C, *S)."""
    return [0, ndim - 1] + list(range(1, ndim - 1))


class LayerNormChannels(nn.LayerNorm):
    """LayerNorm over the channel axis of a ``(B, C, *spatial)`` tensor (LayerNorm "2d"/"3d")."""

    def __init__(self, num_channels: int, eps: float = NORM_EPS) -> None:
        super().__init__(num_channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        x = nn.functional.layer_norm(_channels_to_last(x), self.normalized_shape, self.weight, self.bias, self.eps)
        return _channels_to_first(x)


@register_notrace_function
def _channels_to_last(x: Tensor) -> Tensor:
    """(B, C, *S) -> (B, *S, C) as a permute (Core ML's converter has no movedim; fx sees one call)."""
    return x.permute(channels_last_order(x.dim()))


@register_notrace_function
def _channels_to_first(x: Tensor) -> Tensor:
    return x.permute(channels_first_order(x.dim()))


torch.fx.wrap('_channels_to_last')
torch.fx.wrap('_channels_to_first')


class LayerScale(nn.Module):
    """Per-channel learnable scale ``gamma`` (init 1e-6) on a ``(B, C, *spatial)`` tensor."""

    def __init__(self, dim: int, init_value: float = 1e-6) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma.view([-1] + [1] * (x.ndim - 2))


def conv_nd(spatial_dims: int) -> Type[nn.modules.conv._ConvNd]:
    """nn.Conv1d, nn.Conv2d or nn.Conv3d."""
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f'spatial_dims must be 1, 2 or 3, got {spatial_dims}')
    return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[spatial_dims - 1]


def norm_nd(kind: str, channels: int, spatial_dims: int) -> nn.Module:
    """``'bn'`` (BatchNorm1d/2d/3d), ``'ln'`` (LayerNorm over channels) or ``'none'``, eps 1e-6."""
    if spatial_dims not in (1, 2, 3):
        raise ValueError(f'spatial_dims must be 1, 2 or 3, got {spatial_dims}')
    if kind == 'bn':
        return {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[spatial_dims](channels, eps=NORM_EPS)
    if kind == 'ln':
        return LayerNormChannels(channels)
    if kind == 'none':
        return nn.Identity()
    raise ValueError(f"norm must be 'bn', 'ln' or 'none', got {kind!r}")


class ConvNormAct(nn.Module):
    """Conv (spec padding) -> norm -> activation, for 1, 2 or 3 spatial axes.

    A depthwise conv on CPU stays in float32 under bf16 autocast: oneDNN's bf16 depthwise
    backward is slower than its float32 one (250 vs 180 ms for 64x96x56x56, 5x5, channels-last),
    while the pointwise convs around it gain about 2x from bf16.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            kernel_size: int = 1,
            stride: int = 1,
            dilation: int = 1,
            groups: int = 1,
            bias: bool = False,
            norm: str = 'bn',
            act_layer: type = nn.Identity,
            spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        padding = spec_padding(kernel_size, stride, dilation)
        self.conv = conv_nd(spatial_dims)(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation,
                                          groups=groups, bias=bias)
        self.norm = norm_nd(norm, out_chs, spatial_dims)
        self.act = act_layer()
        self.depthwise = groups > 1 and groups == in_chs

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting() and self.depthwise and cpu_autocast_bf16() and x.device.type == 'cpu':
            with torch.autocast('cpu', enabled=False):
                return self.act(self.norm(self.conv(x.float())))
        return self.act(self.norm(self.conv(x)))

    def deploy_form(self, options: DeployOptions) -> nn.Module:
        """BatchNorm folded into the conv; then conv and activation as one :class:`FusedConv2d` (2D)."""
        self.conv, self.norm = fold_conv_norm(self.conv, self.norm)
        if options.onednn and isinstance(self.norm, nn.Identity) and FusedConv2d.can_fuse(self.conv, self.act):
            return FusedConv2d(self.conv, self.act, options.compiled_kernels)
        return self


class DeformConvNormAct(nn.Module):
    """Depthwise modulated deformable conv (DCNv2, torchvision.ops) -> BN -> activation.

    A depthwise-separable conv predicts one set of offsets and modulation masks (a dense k x k
    predictor would cost more than the rest of the block); it starts at zero, so the layer begins
    as an ordinary depthwise conv with a 0.5 modulation.
    """

    def __init__(self, channels: int, kernel_size: int = 5, stride: int = 1, dilation: int = 1,
                 act_layer: type = nn.SiLU) -> None:
        super().__init__()
        pad = spec_padding(kernel_size, stride, dilation)
        taps = kernel_size * kernel_size
        self.offset = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, stride, pad, dilation=dilation, groups=channels),
            nn.Conv2d(channels, 3 * taps, 1),
        )
        nn.init.zeros_(self.offset[1].weight)
        nn.init.zeros_(self.offset[1].bias)
        self.conv = DeformConv2d(channels, channels, kernel_size, stride, pad, dilation=dilation,
                                 groups=channels, bias=False)
        self.norm = nn.BatchNorm2d(channels, eps=NORM_EPS)
        self.act = act_layer()
        self.taps = taps

    def forward(self, x: Tensor) -> Tensor:
        offset, mask = self.offset(x).split([2 * self.taps, self.taps], dim=1)
        return self.act(self.norm(self.conv(x, offset, mask.sigmoid())))
