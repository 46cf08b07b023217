"""Tiny models and data for fast checks of the training stack (used by the test suite)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import load_config

__all__ = ['TINY_MODEL_KWARGS', 'tiny_config', 'RandomImages', 'make_image_folder']

#: EMOv2-1M's design at a fraction of the size: narrow stages, one block each except stage 3
#: (two, so drop path and window attention are exercised)
TINY_MODEL_KWARGS: Dict[str, Any] = {'depths': [1, 1, 2, 1], 'embed_dims': [16, 16, 32, 32],
                                     'dim_heads': [16, 16, 16, 16]}


def tiny_config(out: os.PathLike, num_classes: int = 4, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """A complete recipe for a tiny EMOv2 on 32x32 images: batch 8, 2 epochs, CPU, no AMP."""
    import json
    return load_config(None, [
        'model.name=emov2_1m', f'model.num_classes={num_classes}', 'model.drop_path_rate=0.1',
        f'model.kwargs={json.dumps(TINY_MODEL_KWARGS)}', 'data.img_size=32', 'data.workers=0',
        'optim.batch_size=8', 'optim.lr=0.002', 'sched.epochs=2', 'sched.warmup_epochs=1',
        'ema.decay=0.9', 'eval.batch_size=16', 'train.amp=false', 'train.progress=false',
        'train.device=cpu', f'train.out={out}', *overrides])


class RandomImages(Dataset):
    """``n`` fixed random 3x32x32 images with labels; training samples get a random flip and noise
    drawn from the global RNGs (so resumption must reproduce augmentation randomness)."""

    def __init__(self, n: int = 48, num_classes: int = 4, seed: int = 0, augment: bool = True) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, num_classes, (n,), generator=g)
        base = torch.randn(num_classes, 3, 32, 32, generator=g)
        self.x = base[self.y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
        self.augment = augment
        self.classes = [f'class{i}' for i in range(num_classes)]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        x = self.x[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            x = x + 0.05 * float(np.random.randn()) + 0.01 * torch.randn_like(x)
        return x, int(self.y[i])


def make_image_folder(root: os.PathLike, classes: Sequence[str] = ('a', 'b'), per_class: int = 6,
                      size: int = 40, corrupt: Sequence[str] = (), seed: int = 0) -> List[Path]:
    """Write PNGs under ``root/<class>/``; each class has its own colour so it can be learned.
    ``corrupt`` lists class names that get one extra unreadable ``.png`` file. Returns the bad files."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    root = Path(root)
    bad: List[Path] = []
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        colour = np.array([(37 * c) % 256, (91 * c + 50) % 256, (153 * c + 100) % 256], dtype=np.float32)
        for i in range(per_class):
            arr = np.clip(colour + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f'{i:03d}.png')
        if name in corrupt:
            p = d / 'zzz_corrupt.png'
            p.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really an image' * 10)
            bad.append(p)
    return bad
