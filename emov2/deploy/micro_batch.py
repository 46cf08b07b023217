"""Micro-batching: a stage run over batch slices whose activations stay in the CPU caches.

The early stages of a mobile backbone are memory-bound (large maps, few channels): a whole batch of
their activations fits no cache, a few images do. :class:`MicroBatched` runs the module it wraps on
such slices and concatenates the results (same values as one call on the batch); :func:`emov2.deploy`
installs it around every stage (``nn.Sequential`` of our blocks and convs) of a model tree.
"""
from pathlib import Path
from typing import List

import torch
from torch import Tensor, nn

from ..layers import ConvNormAct, FusedConv2d, ImprovedInvertedResidualMobileBlock

__all__ = ['MicroBatched', 'install_micro_batching', 'cache_budget', 'live_floats_per_pixel']

_STAGE_UNITS = (ImprovedInvertedResidualMobileBlock, ConvNormAct, FusedConv2d)


class MicroBatched(nn.Module):
    """``module`` over batch slices of at most ``budget_bytes`` of live activations each (CPU inference).

    ``floats_per_pixel`` is the module's live activation size per image pixel at its input resolution
    (:func:`live_floats_per_pixel`). Training, non-CPU devices and a zero budget run whole batches.
    """

    def __init__(self, module: nn.Module, budget_bytes: int, floats_per_pixel: float) -> None:
        super().__init__()
        self.module = module
        self.budget_bytes = int(budget_bytes)
        self.floats_per_pixel = float(floats_per_pixel)
        self.train(module.training)

    def slice_size(self, x: Tensor) -> int:
        """Images per slice for input ``x`` (at least one)."""
        pixels = 1
        for s in x.shape[2:]:
            pixels *= int(s)
        per_image = self.floats_per_pixel * pixels * x.element_size()
        return max(1, int(self.budget_bytes // max(per_image, 1.0)))

    def forward(self, x: Tensor) -> Tensor:
        if self.budget_bytes <= 0 or self.training or x.device.type != 'cpu':
            return self.module(x)
        n = self.slice_size(x)
        if n >= x.shape[0]:
            return self.module(x)
        parts: List[Tensor] = []
        for chunk in x.split(n):
            parts.append(self.module(chunk))
        return torch.cat(parts)


def live_floats_per_pixel(stage: nn.Module) -> float:
    """Floats a stage keeps live per pixel of its input, the most over its units (blocks, convs).

    A downsampling block holds its expanded map at the input resolution; a residual block holds
    input, output and two expanded maps (attention blocks: also Q/K and a third expanded map); a
    conv holds about twice its output. Each counts at its own resolution relative to the stage input.
    """
    most, area = 0.0, 1.0  # area: pixels of the current resolution per input pixel
    for unit in stage.children():
        if isinstance(unit, ImprovedInvertedResidualMobileBlock):
            if unit.stride > 1:
                live = float(unit.dim_mid)
            elif unit.has_attention:
                live = 4.0 * unit.dim_out + 3.0 * unit.dim_mid
            else:
                live = 2.0 * unit.dim_out + 2.0 * unit.dim_mid
            most = max(most, live * area)
            area /= unit.stride ** 2
        elif isinstance(unit, (ConvNormAct, FusedConv2d)):
            conv = unit.conv if isinstance(unit, ConvNormAct) else unit
            stride = int(conv.stride[0])
            area /= stride ** 2
            most = max(most, 2.0 * conv.weight.shape[0] * area)
    return most


def cache_budget() -> int:
    """Bytes of activations per slice: 60% of the largest CPU cache (16 MiB if unknown)."""
    sizes = []
    for f in Path('/sys/devices/system/cpu/cpu0/cache').glob('index*/size'):
        text = f.read_text().strip().upper()
        mult = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip('KMG')) * mult)
        except ValueError:
            continue
    return int(0.6 * max(sizes)) if sizes else 16 << 20


def _is_stage(module: nn.Module) -> bool:
    """A plain ``nn.Sequential`` of our blocks and convs (identities aside)."""
    if type(module) is not nn.Sequential:
        return False
    units = [m for m in module.children() if not isinstance(m, nn.Identity)]
    return bool(units) and all(isinstance(m, _STAGE_UNITS) for m in units)


def install_micro_batching(model: nn.Module, budget_bytes: int) -> nn.Module:
    """Wrap every stage of ``model`` (in place) in :class:`MicroBatched`; returns ``model``."""
    if _is_stage(model):
        return MicroBatched(model, budget_bytes, live_floats_per_pixel(model))
    for name, child in model.named_children():
        if isinstance(child, MicroBatched):
            continue
        setattr(model, name, install_micro_batching(child, budget_bytes))
    return model
