"""Datasets, transforms and a resumable sampler.

* ``SafeImageFolder`` / ``ListDataset``: ImageNet-layout folders or list files. An unreadable or
  corrupt image yields ``None``; ``collate_skip`` drops it and reports how many were dropped, so
  the loop can count them (this works with worker processes, unlike a counter in the dataset).
* ``SeededDataset``: draws each sample's augmentation from a seed made of (seed, epoch, index).
  Augmentation then does not depend on worker count or on where a run was resumed, which is what
  makes a killed-and-resumed run bit-identical to an uninterrupted one.
* ``ResumableSampler``: per-epoch shuffled order shared by all ranks, sharded by rank, able to
  start part-way through an epoch.
"""
from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import create_transform
from timm.data.auto_augment import posterize as timm_posterize
from torch.utils.data import Dataset, Sampler
from torchvision.datasets import ImageFolder

__all__ = ['SafeImageFolder', 'ListDataset', 'SeededDataset', 'ResumableSampler', 'collate_skip',
           'build_transforms', 'build_datasets', 'shard_indices', 'ignore_sigint_in_worker', 'posterize',
           'class_index_by_name']

_log = logging.getLogger('emov2.train')


def _load_rgb(path: str) -> Image.Image:
    with open(path, 'rb') as f:
        img = Image.open(f)
        img.load()
        return img.convert('RGB')


def _load_sample(path: str, target: int, transform: Optional[Callable]) -> Optional[Tuple[Any, int]]:
    """``(transform(image), target)``, or None (logged) when the file cannot be read as an image."""
    try:
        img = _load_rgb(path)
    except Exception as e:  # PIL raises many types for bad files
        _log.warning('skipping unreadable image %s (%s)', path, type(e).__name__)
        return None
    if transform is not None:
        img = transform(img)
    return img, target


def class_index_by_name(folders: Sequence[str], class_names: Sequence[str], where: str = '') -> Dict[str, int]:
    """Label index of each class folder, looked up by name in ``class_names`` (a model's classes).

    A folder whose name is not one of ``class_names`` is an error, never a silent shift of labels.
    """
    index = {name: i for i, name in enumerate(class_names)}
    unknown = [f for f in folders if f not in index]
    if unknown:
        shown = ', '.join(repr(u) for u in unknown[:5]) + (f' and {len(unknown) - 5} more' if len(unknown) > 5 else '')
        known = ', '.join(repr(n) for n in list(class_names)[:8]) + (' ...' if len(class_names) > 8 else '')
        raise ValueError(f'{where or "the data"} has class folders the model does not know: {shown} '
                         f'(its {len(class_names)} classes: {known})')
    return {f: index[f] for f in folders}


class SafeImageFolder(ImageFolder):
    """ImageFolder whose unreadable images come back as ``None`` instead of raising.

    With ``class_names`` (the classes of a model, in its label order) each folder gets the label of
    its name, so a folder set that lacks classes, or is sorted differently, is still scored right.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None) -> None:
        self._class_names = list(class_names) if class_names else None
        super().__init__(root, transform=transform, loader=_load_rgb)
        if self._class_names:
            self.classes = self._class_names

    def find_classes(self, directory: str) -> Tuple[List[str], Dict[str, int]]:
        folders, by_position = super().find_classes(directory)
        if not self._class_names:
            return folders, by_position
        return folders, class_index_by_name(folders, self._class_names, where=str(directory))

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        path, target = self.samples[index]
        return _load_sample(path, target, self.transform)


class ListDataset(Dataset):
    """Images named in a list file, one ``<path relative to root> <integer label>`` per line."""

    def __init__(self, root: str, list_file: str, transform: Optional[Callable] = None,
                 class_names: Optional[Sequence[str]] = None) -> None:
        self.root = Path(root)
        self.transform = transform
        self.samples: List[Tuple[str, int]] = []
        with open(list_file) as f:
            for n, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith('#'):
                    continue
                rel, _, label = line.rpartition(' ')
                if not rel:
                    raise ValueError(f'{list_file}:{n}: expected "<path> <label>", got {line!r}')
                self.samples.append((str(self.root / rel.strip()), int(label)))
        num = max((t for _, t in self.samples), default=-1) + 1
        self.classes = list(class_names) if class_names else [str(i) for i in range(num)]
        self.targets = [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        path, target = self.samples[index]
        return _load_sample(path, target, self.transform)


class SeededDataset(Dataset):
    """Wrap a dataset so sample ``i`` of epoch ``e`` is always augmented with the same randomness.

    The global RNGs (python, numpy, torch) are seeded for the call and restored afterwards, so the
    training process's own random stream (drop path, ...) is left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose augmentation stream is used (call before each epoch)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == 'dataset':
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        s = (self.seed * 1_000_003 + self.epoch * 7_919 + int(index) * 2_654_435_761) % (2 ** 31)
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(s)
            np.random.seed(s)
            torch.manual_seed(s)
            try:
                return self.dataset[index]
            finally:
                random.setstate(py_state)
                np.random.set_state(np_state)


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Ctrl-C reaches the whole process group; only the main process
    should react (it finishes the step and saves), so workers must not die mid-epoch."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def shard_indices(n: int, rank: int, world: int) -> List[int]:
    """Indices ``rank, rank+world, ...`` of ``range(n)``: disjoint shards, no padding."""
    return list(range(rank, n, world))


class ResumableSampler(Sampler[int]):
    """Shuffled (or sequential) indices for one rank that can start at a given batch of the epoch.

    All ranks share the permutation for an epoch (seeded by ``seed + epoch``); each takes every
    ``world``-th index. With ``drop_last`` the epoch is cut so every rank has the same number of
    full batches (needed for DDP); otherwise shards may differ by one sample.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world: int = 1, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = True) -> None:
        self.size, self.batch_size, self.rank, self.world = size, batch_size, rank, world
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's order and the first batch to yield (non-zero when resuming)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def batches_per_epoch(self) -> int:
        """Number of batches each rank sees in a full epoch."""
        per_rank = self.size // self.world
        if self.drop_last:
            return per_rank // self.batch_size
        return -(-((self.size - self.rank + self.world - 1) // self.world) // self.batch_size)

    def _indices(self) -> List[int]:
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        mine = order[self.rank::self.world]
        if self.drop_last:
            mine = mine[:self.batches_per_epoch() * self.batch_size]
        return mine[self.start_batch * self.batch_size:]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        return len(self._indices())


def collate_skip(batch: Sequence[Optional[Tuple[torch.Tensor, int]]]) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Stack the readable samples; return ``(images, targets, number skipped)``."""
    good = [b for b in batch if b is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images = torch.stack([torch.as_tensor(b[0]) for b in good])
    targets = torch.as_tensor([int(b[1]) for b in good], dtype=torch.long)
    return images, targets, skipped


def posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize, also for 0 bits: RandAugment's ``inc1`` policy reaches 0 at magnitude 10,
    which Pillow >= 13 rejects; keeping 0 bits gives the black image older Pillow returned."""
    if bits_to_keep <= 0:
        return ImageOps.posterize(img, 1).point(lambda _: 0)
    return timm_posterize(img, bits_to_keep, **kwargs)


def _safe_rand_augment(transform: Any) -> Any:
    """Swap timm's posterize for :func:`posterize` in every augmentation policy of a composed transform
    (RandAugment, AugMix and AutoAugment hold their ops in ``ops`` or ``policy``)."""
    for t in getattr(transform, 'transforms', ()):
        ops = list(getattr(t, 'ops', ()) or ())
        for sub in getattr(t, 'policy', ()) or ():
            ops += list(sub)
        for op in ops:
            if getattr(op, 'aug_fn', None) is timm_posterize:
                op.aug_fn = posterize
    return transform


def build_transforms(cfg: Mapping[str, Any], mean: Sequence[float], std: Sequence[float]) -> Tuple[Callable, Callable]:
    """Training transform (timm: random-resized crop, flip, RandAugment, colour jitter) and eval
    transform (resize shorter side to size / crop_pct, centre crop)."""
    size = int(cfg['data']['img_size'])
    aug = cfg['aug']
    train_tf = create_transform(
        size, is_training=True, auto_augment=aug['auto_augment'] or None, color_jitter=aug['color_jitter'],
        interpolation=aug['interpolation'], hflip=aug['hflip'], scale=tuple(aug['scale']),
        ratio=tuple(aug['ratio']), re_prob=aug['re_prob'], mean=tuple(mean), std=tuple(std))
    _safe_rand_augment(train_tf)
    eval_tf = create_transform(
        size, is_training=False, crop_pct=cfg['eval']['crop_pct'], interpolation=cfg['eval']['interpolation'],
        mean=tuple(mean), std=tuple(std))
    return train_tf, eval_tf


def _read_class_names(path: Optional[str]) -> Optional[List[str]]:
    if not path:
        return None
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def build_datasets(cfg: Mapping[str, Any], mean: Sequence[float], std: Sequence[float],
                   root: Optional[str] = None) -> Dict[str, Dataset]:
    """``{'train': ..., 'val': ...}`` from ``data.root`` (folders or list files); missing splits omitted."""
    root = root or cfg['data']['root']
    if not root:
        raise ValueError('no data: pass --data DIR or set data.root')
    train_tf, eval_tf = build_transforms(cfg, mean, std)
    names = _read_class_names(cfg['data']['class_names'])
    out: Dict[str, Dataset] = {}
    for split, tf in (('train', train_tf), ('val', eval_tf)):
        list_file = cfg['data'][f'{split}_list']
        if list_file:
            out[split] = ListDataset(root, list_file, tf, names)
            continue
        folder = Path(root) / cfg['data'][f'{split}_dir']
        if folder.is_dir():  # validation folders take the training classes' labels by name
            train_names = getattr(out.get('train'), 'classes', None)
            out[split] = SafeImageFolder(str(folder), tf, class_names=train_names if split == 'val' else None)
    if 'train' not in out:
        raise ValueError(f'no training data under {root} (expected {cfg["data"]["train_dir"]}/<class>/ or a list file)')
    return out
