"""Segmentation datasets (ADE20K, image + mask folders, HRF vessels) and MMSegmentation's augmentation.

Layouts (``segmentation.layout``):

* ``ade20k``: ``images/{training,validation}/*.jpg`` and ``annotations/{training,validation}/*.png``
  (label PNGs, 0 = "other"). With ``reduce_zero_label`` (on for ADE20K) label 0 becomes the ignore
  index and every other label drops by one (150 classes 0..149), as MMSeg does.
* ``folder``: ``<split>/images/*`` and ``<split>/masks/*`` matched by file stem (``split`` is
  ``data.train_dir`` / ``data.val_dir``, default ``train`` / ``val``); masks are single-channel
  PNGs of class indices, 255 = ignore. Class names from ``segmentation.class_names`` (a list or a
  file), else ``classes.txt`` in the root, else ``0 .. model.num_classes-1``.
* ``hrf``: the HRF fundus layout: ``images/<stem>.jpg``, vessel masks ``manual1/<stem>.tif`` (any
  value > 0 is vessel) and field-of-view masks ``mask/<stem>_mask.tif``; pixels outside the field of
  view are ignored. Split folders ``<split>/images ...`` are used when present, else the sorted
  images are split as MMSeg's converter does (first ``segmentation.hrf_train_count`` = 15 train).

A sample whose mask is missing, unreadable, not single-channel or of another size than its image
is skipped when the dataset is built and counted in ``dataset.problems`` (with a warning naming a
few); a file that fails to decode later yields ``None``, which :func:`collate_segmentation` drops
and counts. Nothing about bad files is fatal.

Augmentation (training) follows MMSeg's ADE20K pipeline, written with ``torchvision.transforms.v2``
on ``tv_tensors.Image`` / ``tv_tensors.Mask`` (masks are resized with nearest neighbours and padded
with the ignore index): random keep-ratio resize to ``scale`` times a ratio in ``[0.5, 2.0]``,
random crop (re-drawn up to 10 times while one class covers more than ``cat_max_ratio`` of it),
horizontal flip, photometric distortion, normalisation. Evaluation resizes the image only (keep
ratio, to ``scale``) and keeps the mask at its original size, where the metrics are taken.
"""
from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

__all__ = ['ADE20K_CLASSES', 'HRF_CLASSES', 'LAYOUTS', 'IMAGE_EXTENSIONS', 'default_palette', 'Sample',
           'SegmentationDataset', 'RandomRescale', 'RandomCropCatMax', 'KeepRatioResize', 'train_transform',
           'eval_transform', 'collate_segmentation', 'find_samples', 'build_segmentation_datasets',
           'read_class_names', 'keep_ratio_size']

_log = logging.getLogger('emov2.train')

LAYOUTS = ('ade20k', 'folder', 'hrf')
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
_MASK_MODES = ('L', 'P', '1', 'I', 'I;16', 'I;16B', 'I;16L')

#: ADE20K (SceneParse150) class names in label order after reduce_zero_label (MMSeg's ADE20KDataset)
ADE20K_CLASSES: Tuple[str, ...] = (
    'wall', 'building', 'sky', 'floor', 'tree', 'ceiling', 'road', 'bed', 'windowpane', 'grass', 'cabinet',
    'sidewalk', 'person', 'earth', 'door', 'table', 'mountain', 'plant', 'curtain', 'chair', 'car', 'water',
    'painting', 'sofa', 'shelf', 'house', 'sea', 'mirror', 'rug', 'field', 'armchair', 'seat', 'fence', 'desk',
    'rock', 'wardrobe', 'lamp', 'bathtub', 'railing', 'cushion', 'base', 'box', 'column', 'signboard',
    'chest of drawers', 'counter', 'sand', 'sink', 'skyscraper', 'fireplace', 'refrigerator', 'grandstand', 'path',
    'stairs', 'runway', 'case', 'pool table', 'pillow', 'screen door', 'stairway', 'river', 'bridge', 'bookcase',
    'blind', 'coffee table', 'toilet', 'flower', 'book', 'hill', 'bench', 'countertop', 'stove', 'palm',
    'kitchen island', 'computer', 'swivel chair', 'boat', 'bar', 'arcade machine', 'hovel', 'bus', 'towel',
    'light', 'truck', 'tower', 'chandelier', 'awning', 'streetlight', 'booth', 'television receiver', 'airplane',
    'dirt track', 'apparel', 'pole', 'land', 'bannister', 'escalator', 'ottoman', 'bottle', 'buffet', 'poster',
    'stage', 'van', 'ship', 'fountain', 'conveyer belt', 'canopy', 'washer', 'plaything', 'swimming pool', 'stool',
    'barrel', 'basket', 'waterfall', 'tent', 'bag', 'minibike', 'cradle', 'oven', 'ball', 'food', 'step', 'tank',
    'trade name', 'microwave', 'pot', 'animal', 'bicycle', 'lake', 'dishwasher', 'screen', 'blanket', 'sculpture',
    'hood', 'sconce', 'vase', 'traffic light', 'tray', 'ashcan', 'fan', 'pier', 'crt screen', 'plate', 'monitor',
    'bulletin board', 'shower', 'radiator', 'glass', 'clock', 'flag')
assert len(ADE20K_CLASSES) == 150
HRF_CLASSES: Tuple[str, ...] = ('background', 'vessel')


def default_palette(num_classes: int) -> List[List[int]]:
    """Distinct RGB colours per class: the PASCAL VOC colour map (bit-interleaved label index)."""
    out = []
    for i in range(num_classes):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


# --- transforms --------------------------------------------------------------------------------------
def keep_ratio_size(height: int, width: int, scale: Sequence[int], ratio: float = 1.0) -> Tuple[int, int]:
    """MMSeg's keep-ratio rescale: the largest size with long side <= ``scale[0] * ratio`` and short
    side <= ``scale[1] * ratio`` (``scale`` = (long, short), e.g. (2048, 512) for ADE20K)."""
    long_max, short_max = max(scale) * ratio, min(scale) * ratio
    f = min(long_max / max(height, width), short_max / min(height, width))
    return max(1, int(height * f + 0.5)), max(1, int(width * f + 0.5))


def _image_size(flat_inputs: Sequence[Any]) -> Tuple[int, int]:
    for x in flat_inputs:
        if isinstance(x, (tv_tensors.Image, tv_tensors.Mask)):
            return int(x.shape[-2]), int(x.shape[-1])
    for x in flat_inputs:  # a plain tensor is an image to torchvision.transforms.v2
        if isinstance(x, Tensor) and x.dim() >= 2:
            return int(x.shape[-2]), int(x.shape[-1])
    raise TypeError('expected an image or mask tensor among the inputs')


class RandomRescale(v2.Transform):
    """Keep-ratio resize to ``scale`` times a ratio drawn uniformly from ``ratio_range`` (MMSeg's
    ``RandomResize(scale, ratio_range, keep_ratio=True)``); masks use nearest neighbours."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0)) -> None:
        super().__init__()
        self.scale, self.ratio_range = tuple(int(s) for s in scale), (float(ratio_range[0]), float(ratio_range[1]))

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _image_size(flat_inputs)
        lo, hi = self.ratio_range
        r = lo + float(torch.rand(())) * (hi - lo)
        return {'size': list(keep_ratio_size(h, w, self.scale, r))}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        return TF.resize(inpt, params['size'], antialias=True)


class KeepRatioResize(RandomRescale):
    """Keep-ratio resize to ``scale`` (MMSeg's test-time ``Resize(scale, keep_ratio=True)``)."""

    def __init__(self, scale: Sequence[int]) -> None:
        super().__init__(scale, (1.0, 1.0))


class RandomCropCatMax(v2.Transform):
    """Random ``crop`` (pads bottom/right first where the image is smaller: 0 for images, the ignore
    index for masks). With ``cat_max_ratio < 1`` the crop is re-drawn (up to 10 times, MMSeg's
    ``RandomCrop``) while a single class covers more than that share of its labelled pixels."""

    def __init__(self, crop: Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = 255) -> None:
        super().__init__()
        self.crop = (int(crop[0]), int(crop[1]))
        self.cat_max_ratio, self.ignore_index = float(cat_max_ratio), int(ignore_index)

    def make_params(self, flat_inputs: List[Any]) -> Dict[str, Any]:
        h, w = _image_size(flat_inputs)
        ch, cw = self.crop
        mask = next((x for x in flat_inputs if isinstance(x, tv_tensors.Mask)), None)

        def draw() -> Tuple[int, int]:
            return (int(torch.randint(0, max(h - ch, 0) + 1, ())), int(torch.randint(0, max(w - cw, 0) + 1, ())))

        top, left = draw()
        if mask is not None and self.cat_max_ratio < 1.0:
            for _ in range(10):
                region = mask[..., top:top + ch, left:left + cw].reshape(-1)
                region = region[region != self.ignore_index]
                counts = torch.bincount(region.long()) if region.numel() else region.new_zeros(0)
                counts = counts[counts > 0]
                if counts.numel() > 1 and float(counts.max()) / float(counts.sum()) < self.cat_max_ratio:
                    break
                top, left = draw()
        return {'top': top, 'left': left, 'pad': [0, 0, max(cw - w, 0), max(ch - h, 0)]}

    def transform(self, inpt: Any, params: Dict[str, Any]) -> Any:
        if any(params['pad']):
            inpt = TF.pad(inpt, params['pad'], fill=self.ignore_index if isinstance(inpt, tv_tensors.Mask) else 0)
        return TF.crop(inpt, params['top'], params['left'], *self.crop)


def train_transform(crop: Sequence[int], scale: Sequence[int], mean: Sequence[float], std: Sequence[float],
                    ratio_range: Sequence[float] = (0.5, 2.0), cat_max_ratio: float = 0.75, hflip: float = 0.5,
                    photometric: bool = True, ignore_index: int = 255) -> Callable:
    """MMSeg's training pipeline on ``(Image, Mask)`` pairs -> ``(float image, int64 mask)``.

    Photometric distortion is MMSeg's ``PhotoMetricDistortion`` from torchvision's ``ColorJitter``
    ops, each applied with probability 0.5 in MMSeg's order and ranges: brightness, contrast 0.5-1.5,
    saturation 0.5-1.5, hue +-18/180 of the colour circle. Differences: brightness is multiplicative
    0.875-1.125 (MMSeg adds +-32 of 255), and contrast always comes second (MMSeg puts it second or
    last at random). torchvision's ``RandomPhotometricDistort`` is not used: it also permutes the
    colour channels, which MMSeg does not.
    """
    steps: List[Any] = [RandomRescale(scale, ratio_range), RandomCropCatMax(crop, cat_max_ratio, ignore_index)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if photometric:
        steps += [v2.RandomApply([v2.ColorJitter(**{k: r})], p=0.5) for k, r in (
            ('brightness', (0.875, 1.125)), ('contrast', (0.5, 1.5)), ('saturation', (0.5, 1.5)), ('hue', (-0.1, 0.1)))]
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64, 'others': None}, scale=True),
              v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


def eval_transform(scale: Optional[Sequence[int]], mean: Sequence[float], std: Sequence[float]) -> Callable:
    """Test-time image transform: keep-ratio resize to ``scale`` (None: original size), normalise."""
    steps: List[Any] = [KeepRatioResize(scale)] if scale else []
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(steps)


# --- samples -----------------------------------------------------------------------------------------
class Sample(NamedTuple):
    """An image, its label mask and (HRF) its field-of-view mask."""
    image: str
    mask: str
    fov: Optional[str] = None


def _images_in(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def _by_stem(folder: Path, suffix: str = '') -> Dict[str, Path]:
    if not folder.is_dir():
        return {}
    out: Dict[str, Path] = {}
    for p in _images_in(folder):
        stem = p.stem[:-len(suffix)] if suffix and p.stem.endswith(suffix) else p.stem
        out.setdefault(stem, p)
    return out


def _require_dir(folder: Path, what: str) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f'{what} folder not found: {folder}')
    return folder


def find_samples(root: str, layout: str, split: str, hrf_train_count: int = 15,
                 split_dirs: Mapping[str, str] = None) -> Tuple[List[Sample], List[Tuple[str, str]]]:
    """``(samples, unmatched)`` of one split (``train`` / ``val``); ``unmatched`` lists
    ``(image, reason)`` for images without a mask. Missing layout folders raise ``FileNotFoundError``."""
    base = Path(root)
    if not base.is_dir():
        raise FileNotFoundError(f'data folder not found: {base}')
    if layout not in LAYOUTS:
        raise ValueError(f'segmentation.layout must be one of {", ".join(LAYOUTS)}, got {layout!r}')
    split_dirs = dict(split_dirs or {'train': 'train', 'val': 'val'})
    missing: List[Tuple[str, str]] = []
    samples: List[Sample] = []
    if layout == 'ade20k':
        sub = {'train': 'training', 'val': 'validation'}[split]
        images = _images_in(_require_dir(base / 'images' / sub, 'ADE20K images'))
        masks = _by_stem(_require_dir(base / 'annotations' / sub, 'ADE20K annotations'))
    elif layout == 'folder':
        folder = base / split_dirs[split]
        images = _images_in(_require_dir(folder / 'images', f'{split} images'))
        masks = _by_stem(_require_dir(folder / 'masks', f'{split} masks'))
    else:  # hrf
        split_folder = base / split_dirs[split]
        folder = split_folder if (split_folder / 'images').is_dir() else base
        images = _images_in(_require_dir(folder / 'images', 'HRF images'))
        if folder is base:
            images = images[:hrf_train_count] if split == 'train' else images[hrf_train_count:]
        masks = _by_stem(_require_dir(folder / 'manual1', 'HRF vessel masks (manual1)'))
        fovs = _by_stem(folder / 'mask', suffix='_mask')
    for img in images:
        m = masks.get(img.stem)
        if m is None:
            missing.append((str(img), 'no mask'))
            continue
        fov = None
        if layout == 'hrf':
            fov_path = fovs.get(img.stem)
            if fov_path is None:
                missing.append((str(img), 'no field-of-view mask'))
                continue
            fov = str(fov_path)
        samples.append(Sample(str(img), str(m), fov))
    return samples, missing


def _header(path: str) -> Tuple[Tuple[int, int], str]:
    with Image.open(path) as im:
        return im.size, im.mode


def check_samples(samples: Sequence[Sample]) -> Tuple[List[Sample], List[Tuple[str, str]]]:
    """Keep samples whose files open and whose masks are single-channel and of the image's size
    (file headers only); ``(good, [(file, reason), ...])``."""
    good: List[Sample] = []
    bad: List[Tuple[str, str]] = []
    for s in samples:
        try:
            size, _ = _header(s.image)
        except Exception as e:
            bad.append((s.image, f'unreadable image: {type(e).__name__}'))
            continue
        reason = ''
        for path in (s.mask, s.fov):
            if path is None:
                continue
            try:
                msize, mode = _header(path)
            except Exception as e:
                reason = f'unreadable mask: {path} ({type(e).__name__})'
                break
            if msize != size:
                reason = f'size mismatch: mask {path} is {msize[0]}x{msize[1]}, the image {size[0]}x{size[1]}'
                break
            if mode not in _MASK_MODES and path == s.mask:
                reason = f'mask not single-channel: {path} has mode {mode} (masks hold class indices)'
                break
        if reason:
            bad.append((s.image, reason))
        else:
            good.append(s)
    return good, bad


class SegmentationDataset(Dataset):
    """``(image, mask)`` pairs of class-index masks; ``None`` for a sample that fails to decode.

    ``train=True``: ``transform`` takes and returns ``(Image, Mask)`` (random crops of one size);
    else ``transform`` takes the image only and the mask stays at the original size. Labels outside
    ``0 .. num_classes-1`` (other than the ignore index) are set to the ignore index.
    """

    def __init__(self, samples: Sequence[Sample], transform: Optional[Callable], train: bool, num_classes: int,
                 class_names: Optional[Sequence[str]] = None, ignore_index: int = 255,
                 reduce_zero_label: bool = False, binary: bool = False, check: bool = True,
                 problems: Sequence[Tuple[str, str]] = ()) -> None:
        self.problems: List[Tuple[str, str]] = list(problems)
        if check:
            samples, bad = check_samples(samples)
            self.problems += bad
        self.samples = list(samples)
        self.transform, self.train = transform, train
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self.classes = list(class_names) if class_names else [str(i) for i in range(num_classes)]
        self.reduce_zero_label, self.binary = bool(reduce_zero_label), bool(binary)
        if self.problems:
            reasons = collections.Counter(r.split(':')[0] for _, r in self.problems)
            shown = '; '.join(f'{f}: {r}' for f, r in self.problems[:3])
            _log.warning('skipping %d of %d samples (%s; e.g. %s)', len(self.problems),
                         len(self.problems) + len(self.samples),
                         ', '.join(f'{n} {k}' for k, n in reasons.most_common(4)), shown)

    @property
    def skipped(self) -> int:
        """Samples left out when the dataset was built (missing / mismatched / unreadable files)."""
        return len(self.problems)

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, sample: Sample) -> np.ndarray:
        """The mask as int64 class indices (reduce_zero_label, binarisation, field of view applied)."""
        with Image.open(sample.mask) as im:
            im.load()
            label = np.asarray(im, dtype=np.int64)
        if label.ndim != 2:
            raise ValueError(f'mask {sample.mask} is not single-channel')
        if self.binary:
            label = (label > 0).astype(np.int64)
        if self.reduce_zero_label:
            label = np.where(label == 0, self.ignore_index, label - 1)
            label[label == self.ignore_index - 1] = self.ignore_index
        if sample.fov is not None:
            with Image.open(sample.fov) as im:
                fov = np.asarray(im.convert('L'))
            label = np.where(fov > 0, label, self.ignore_index)
        label[(label != self.ignore_index) & ((label < 0) | (label >= self.num_classes))] = self.ignore_index
        return label

    def __getitem__(self, index: int) -> Optional[Tuple[Tensor, Tensor]]:
        s = self.samples[index]
        try:
            with Image.open(s.image) as im:
                img = tv_tensors.Image(torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1))
            label = self.read_label(s)
        except Exception as e:  # PIL raises many types for bad files
            _log.warning('skipping unreadable sample %s (%s: %s)', s.image, type(e).__name__, str(e)[:120])
            return None
        if label.shape != tuple(img.shape[-2:]):
            _log.warning('skipping %s: mask %s does not match the image %s', s.image, label.shape, tuple(img.shape[-2:]))
            return None
        if self.train:
            img, mask = self.transform(img, tv_tensors.Mask(torch.from_numpy(label)))
            return img.as_subclass(Tensor), mask.as_subclass(Tensor).long()
        if self.transform is not None:
            img = self.transform(img)
        return img.as_subclass(Tensor), torch.from_numpy(label)


def collate_segmentation(samples: Sequence[Optional[Tuple[Tensor, Tensor]]]) -> Tuple[Any, Any, int]:
    """``(images, masks, skipped)``: stacked tensors when all samples share a size (training crops),
    else lists (evaluation at each image's own size); ``None`` samples are dropped and counted."""
    good = [s for s in samples if s is not None]
    skipped = len(samples) - len(good)
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
    images, masks = [g[0] for g in good], [g[1] for g in good]
    if len({tuple(i.shape) for i in images}) == 1 and len({tuple(m.shape) for m in masks}) == 1:
        return torch.stack(images), torch.stack(masks), skipped
    return images, masks, skipped


def read_class_names(spec: Any, root: Optional[str] = None) -> Optional[List[str]]:
    """Class names from a list, a file (one name per line) or ``<root>/classes.txt``; None if none."""
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    path = Path(spec) if spec else (Path(root) / 'classes.txt' if root else None)
    if path is None or not path.is_file():
        if spec:
            raise FileNotFoundError(f'class names file not found: {path}')
        return None
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def build_segmentation_datasets(cfg: Mapping[str, Any], mean: Sequence[float], std: Sequence[float],
                                class_names: Sequence[str], root: Optional[str] = None,
                                splits: Sequence[str] = ('train', 'val')) -> Dict[str, SegmentationDataset]:
    """The splits of ``data.root`` in ``segmentation.layout`` with the config's transforms; a split
    without images is left out (validation may be absent), except training."""
    s, d = cfg['segmentation'], cfg['data']
    root = root or d['root']
    if not root:
        raise ValueError('no data: pass --data DIR or set data.root')
    layout = s['layout']
    reduce_zero = s['reduce_zero_label'] if s['reduce_zero_label'] is not None else layout == 'ade20k'
    crop = tuple(s['crop_size'])
    scale = tuple(s['scale']) if s['scale'] else (4 * max(crop), max(crop))
    out: Dict[str, SegmentationDataset] = {}
    for split in splits:
        try:
            samples, missing = find_samples(root, layout, split, int(s['hrf_train_count']),
                                            {'train': d['train_dir'], 'val': d['val_dir']})
        except FileNotFoundError:
            if split == 'train':
                raise
            continue
        if split == 'train':
            tf = train_transform(crop, scale, mean, std, s['ratio_range'], float(s['cat_max_ratio']),
                                 float(s['hflip']), bool(s['photometric']), int(s['ignore_index']))
        else:
            tf = eval_transform(tuple(s['eval_scale']) if s['eval_scale'] else scale, mean, std)
        out[split] = SegmentationDataset(samples, tf, split == 'train', len(class_names), class_names,
                                         int(s['ignore_index']), reduce_zero, binary=layout == 'hrf', problems=missing)
    if not len(out['train']):
        raise ValueError(f'no usable training samples under {root} ({layout} layout); '
                         f'{out["train"].skipped} skipped')
    return out
