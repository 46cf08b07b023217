"""UNet-S5-D16 (MMSegmentation's UNet) and U-EMO, the same UNet whose wide blocks are i2RMBs.

Five encoder stages of two blocks (64, 128, 256, 512, 1024 channels; 2x2 max pooling between them)
and four decoder stages, each upsampling (bilinear 2x, then 1x1 conv-BN-ReLU: MMSeg's ``InterpConv``)
to the skip's width, concatenating the skip and running two blocks. In UNet-S5-D16 a block is a
3x3 conv-BN-ReLU; in U-EMO (spec section 7, the paper's ``UNet_EMO2``) every block of a stage whose
input has at least 64 channels is the shared :class:`~emov2.layers.block.ImprovedInvertedResidualMobileBlock`
(expansion 2, LayerNorm, GELU, 5x5 DW conv, spanning window attention with 32-channel heads, window
10, LayerScale), so only the first encoder stage (3 input channels) keeps plain convs.
"""
from __future__ import annotations

from typing import Any, Dict, List, Union

import torch
from torch import Tensor, nn
from torchvision.ops import Conv2dNormActivation

from ..layers.block import ImprovedInvertedResidualMobileBlock

__all__ = ['UNet', 'UNET_CONFIGS']

#: The UNets ``create_segmenter`` builds (both with MMSeg's DeepLabv3 head for HRF).
UNET_CONFIGS: Dict[str, Dict[str, Any]] = {
    'u_emov2_5m': dict(block='i2rmb'),
    'unet_s5_d16': dict(block='conv'),
}


def _conv(in_ch: int, out_ch: int, kernel_size: int) -> Conv2dNormActivation:
    """MMSeg's ConvModule: conv (no bias) + BN + ReLU."""
    return Conv2dNormActivation(in_ch, out_ch, kernel_size, norm_layer=nn.BatchNorm2d, activation_layer=nn.ReLU)


def _stage(in_ch: int, out_ch: int, num_blocks: int, block: str, window_size: int) -> nn.Sequential:
    """``num_blocks`` blocks ``in_ch -> out_ch``: i2RMBs where ``block='i2rmb'`` and ``in_ch >= 64``
    (the paper's rule, on the stage's input width), else 3x3 conv-BN-ReLU."""
    layers: List[nn.Module] = []
    for i in range(num_blocks):
        dim = in_ch if i == 0 else out_ch
        if block == 'i2rmb' and in_ch >= 64:
            layers.append(ImprovedInvertedResidualMobileBlock(
                dim, out_ch, exp_ratio=2.0, residual=dim == out_ch, norm='ln', act_layer=nn.GELU,
                mixer='attention', dim_head=32, window_size=window_size, dw_kernel=5, layer_scale=True))
        else:
            layers.append(_conv(dim, out_ch, 3))
    return nn.Sequential(*layers)


class UpBlock(nn.Module):
    """MMSeg's UpConvBlock with InterpConv: upsample 2x, 1x1 conv to the skip's width, concatenate
    ``[skip, x]``, run the stage."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, num_blocks: int, block: str, window_size: int) -> None:
        super().__init__()
        self.upsample = nn.Sequential(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False),
                                      _conv(in_ch, skip_ch, 1))
        self.blocks = _stage(2 * skip_ch, out_ch, num_blocks, block, window_size)

    def forward(self, skip: Tensor, x: Tensor) -> Tensor:
        return self.blocks(torch.cat([skip, self.upsample(x)], dim=1))


class UNet(nn.Module):
    """The five-stage UNet (S5-D16: input sides divisible by 16). ``block`` is ``'conv'`` (UNet-S5-D16)
    or ``'i2rmb'`` (U-EMO). :meth:`forward_intermediates` returns the decoder outputs, coarsest first
    (MMSeg's order; channels in :attr:`out_channels`)."""

    def __init__(self, in_chans: int = 3, base_channels: int = 64, num_stages: int = 5, enc_blocks: int = 2,
                 dec_blocks: int = 2, block: str = 'conv', window_size: int = 10) -> None:
        super().__init__()
        if block not in ('conv', 'i2rmb'):
            raise ValueError(f"block must be 'conv' or 'i2rmb', got {block!r}")
        widths = [base_channels * 2 ** i for i in range(num_stages)]
        self.divisor = 2 ** (num_stages - 1)
        self.encoder = nn.ModuleList()
        self.decoder = nn.ModuleList()
        in_ch = in_chans
        for i, width in enumerate(widths):
            stage = _stage(in_ch, width, enc_blocks, block, window_size)
            self.encoder.append(nn.Sequential(nn.MaxPool2d(2), *stage) if i > 0 else stage)
            if i > 0:
                self.decoder.append(UpBlock(width, widths[i - 1], widths[i - 1], dec_blocks, block, window_size))
            in_ch = width
        self.out_channels = widths[::-1]

    def forward_intermediates(self, x: Tensor, intermediates_only: bool = True) -> List[Tensor]:
        """Decoder outputs at strides 16, 8, 4, 2, 1 (the bottom of the encoder first)."""
        if x.shape[-2] % self.divisor or x.shape[-1] % self.divisor:
            raise ValueError(f'UNet input sides must be divisible by {self.divisor}, got {tuple(x.shape[-2:])}')
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        outs = [x]
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](skips[i], x)
            outs.append(x)
        return outs

    def forward(self, x: Tensor) -> Union[List[Tensor], Tensor]:
        return self.forward_intermediates(x)
