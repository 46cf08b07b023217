"""Segmentation inference: whole-image and sliding-window logits (MMSegmentation's ``whole`` / ``slide``).

Segmenters return ``{'out': logits, 'aux': ...}`` at input resolution (torchvision's convention);
a plain tensor works too. Sliding-window inference follows MMSeg's ``slide_inference``: a grid of
``crop`` windows ``stride`` apart, the last row / column moved back to end at the image border (so
no window pads the image; an image smaller than the crop is one window of its own size), each
window's logits placed into the full canvas (zero padding around it) and the canvas divided by how
many windows covered each pixel. U-EMO on HRF uses 256 crops with stride 170.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ['output_logits', 'whole_inference', 'slide_inference', 'segment_logits', 'slide_windows']

Size = Union[int, Sequence[int]]


def _pair(v: Size) -> Tuple[int, int]:
    if isinstance(v, int):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def output_logits(out: Any) -> Tensor:
    """The main logits of a segmenter's output (``out['out']`` of a dict, or the tensor itself)."""
    if isinstance(out, dict):
        return out['out']
    if isinstance(out, (tuple, list)):
        return out[0]
    return out


def whole_inference(model: nn.Module, images: Tensor) -> Tensor:
    """Logits ``(B, K, H, W)`` of the whole images in one pass (resized to the input if needed)."""
    logits = output_logits(model(images))
    if logits.shape[-2:] != images.shape[-2:]:
        logits = F.interpolate(logits.float(), size=images.shape[-2:], mode='bilinear', align_corners=False)
    return logits


def slide_windows(height: int, width: int, crop: Size, stride: Size) -> list:
    """``[(y1, y2, x1, x2), ...]``: the windows MMSeg's ``slide_inference`` visits."""
    h_crop, w_crop = _pair(crop)
    h_stride, w_stride = _pair(stride)
    if min(h_crop, w_crop, h_stride, w_stride) < 1:
        raise ValueError(f'crop {crop} and stride {stride} must be positive')
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    out = []
    for hi in range(h_grids):
        for wi in range(w_grids):
            y1, x1 = hi * h_stride, wi * w_stride
            y2, x2 = min(y1 + h_crop, height), min(x1 + w_crop, width)
            y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
            out.append((y1, y2, x1, x2))
    return out


def slide_inference(model: nn.Module, images: Tensor, crop: Size, stride: Size,
                    num_classes: Optional[int] = None) -> Tensor:
    """Logits ``(B, K, H, W)`` averaged over overlapping ``crop`` windows ``stride`` apart."""
    b, _, h, w = images.shape
    canvas: Optional[Tensor] = None
    count = images.new_zeros((1, 1, h, w), dtype=torch.float32)
    for y1, y2, x1, x2 in slide_windows(h, w, crop, stride):
        logits = whole_inference(model, images[:, :, y1:y2, x1:x2]).float()
        if canvas is None:
            k = num_classes or logits.shape[1]
            canvas = images.new_zeros((b, k, h, w), dtype=torch.float32)
        canvas += F.pad(logits, (x1, w - x2, y1, h - y2))
        count[:, :, y1:y2, x1:x2] += 1
    assert canvas is not None and bool((count > 0).all())  # the windows cover the image by construction
    return canvas / count


def segment_logits(model: nn.Module, images: Tensor, mode: str = 'whole', crop: Optional[Size] = None,
                   stride: Optional[Size] = None, out_size: Optional[Sequence[int]] = None) -> Tensor:
    """Logits by ``mode`` (``whole`` or ``slide``), resized (bilinear) to ``out_size`` when given:
    the original image size, where metrics are taken (MMSeg's test pipeline)."""
    if mode == 'whole':
        logits = whole_inference(model, images).float()
    elif mode == 'slide':
        if crop is None or stride is None:
            raise ValueError('slide inference needs crop and stride')
        logits = slide_inference(model, images, crop, stride)
    else:
        raise ValueError(f"inference mode must be 'whole' or 'slide', got {mode!r}")
    if out_size is not None and tuple(logits.shape[-2:]) != tuple(out_size):
        logits = F.interpolate(logits, size=tuple(int(s) for s in out_size), mode='bilinear', align_corners=False)
    return logits
