"""Image folders for class-conditional generation: ``root/<class>/*.png`` (or ``root/train/<class>``
and ``root/val/<class>``), images resized and centre-cropped to a square, scaled to [-1, 1].

Unreadable files come back as ``None`` (the shared :class:`~emov2.train.data.SafeImageFolder`) and
are dropped and counted by the collate function, as in classification. DiT's only augmentation
is a random horizontal flip (off for digits and text-like data).
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

import torch
from torchvision.transforms import v2

from ..train.data import SafeImageFolder

__all__ = ['generation_transform', 'GenerationImageFolder', 'find_splits']


def generation_transform(image_size: int, channels: int, hflip: float = 0.0) -> v2.Compose:
    """PIL RGB image -> ``(channels, size, size)`` float tensor in [-1, 1] (grey when ``channels == 1``)."""
    if channels not in (1, 3):
        raise ValueError(f'images must have 1 or 3 channels, got {channels}')
    ops = [v2.PILToTensor()]
    if channels == 1:
        ops.append(v2.Grayscale(1))
    ops += [v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size)]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * channels, [0.5] * channels)]
    return v2.Compose(ops)


class GenerationImageFolder(SafeImageFolder):
    """Class folders of images for generation; ``dataset[i]`` is ``(image in [-1, 1], label)`` or ``None``."""

    def __init__(self, root: str | Path, image_size: int, channels: int = 3, hflip: float = 0.0,
                 class_names: Optional[Sequence[str]] = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f'image folder not found: {root}')
        try:
            super().__init__(str(root), transform=generation_transform(image_size, channels, hflip),
                             class_names=class_names)
        except FileNotFoundError as e:  # torchvision: no class folders / no images
            raise FileNotFoundError(f'{root}: expected one sub-folder of images per class ({e})') from e
        self.image_size, self.channels = image_size, channels


def find_splits(cfg: Mapping) -> Tuple[Path, Optional[Path]]:
    """``(train folder, val folder or None)`` for ``data.root``: ``root/train`` (+ ``root/val``) when
    present, else ``root`` itself holds the class folders (no validation split)."""
    root = cfg['data']['root']
    if not root:
        raise ValueError('no training images: set data.root (a folder of class folders) or pass --data')
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'data.root not found: {root}')
    train = root / cfg['data']['train_dir']
    if train.is_dir():
        val = root / cfg['data']['val_dir']
        return train, (val if val.is_dir() else None)
    return root, None
