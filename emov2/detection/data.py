"""COCO-format detection data: an images folder and an ``instances`` JSON, read with pycocotools.

:class:`CocoDetection` yields ``(image, target)`` where ``image`` is a float ``3xHxW`` tensor in
``[0, 1]`` (the detectors normalise and resize it themselves) and ``target`` holds ``boxes``
(``xyxy`` pixels), ``labels`` (contiguous ``0 .. K-1``; :attr:`CocoDetection.category_ids` maps them
back to the JSON's category ids), ``image_id`` and, with ``masks=True``, ``masks`` (``N x H x W``
uint8 from polygons or RLE via pycocotools).

What bad data does (never fatal; every case is counted in :attr:`CocoDetection.stats`):

* an image file that does not exist is left out of the index (``missing_images``); one that exists
  but cannot be decoded yields ``None``, which :func:`collate_detection` drops and counts (this works
  with worker processes);
* boxes are clipped to the image; boxes with no area after clipping, and annotations of unknown
  categories, are dropped (``degenerate_boxes``, ``unknown_category``);
* crowd annotations (``iscrowd=1``) are not training targets (as in torchvision's references and
  Detectron2); COCOeval still uses them to ignore detections on crowds, as COCO does;
* an image without any usable annotation is a negative (``keep_empty=True``, the torchvision
  detectors take empty targets) or is left out (``empty_images``).

Augmentation (:func:`detection_transforms`) is torchvision's ``transforms.v2`` on
``tv_tensors.BoundingBoxes`` / ``Mask``, as torchvision's detection references do it.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

__all__ = ['CocoDetection', 'collate_detection', 'detection_transforms', 'load_coco', 'read_image',
           'IfBoxes', 'AUGMENTATION']

_log = logging.getLogger('emov2.train')

#: what each detector kind's training augmentation is (recorded in the run's config as aug.custom)
AUGMENTATION = {
    'ssdlite': 'SSD: RandomPhotometricDistort, RandomZoomOut(fill=mean, side 1-4x (detection.zoom_out), p=0.5), RandomIoUCrop '
               '(images with boxes), RandomHorizontalFlip, SanitizeBoundingBoxes; the model resizes to its fixed size',
    'retinanet': 'RandomHorizontalFlip, SanitizeBoundingBoxes; multi-scale by the detector\'s own resize '
                 '(detection.train_scales: shorter side drawn per image)',
    'maskrcnn': 'RandomHorizontalFlip (boxes and masks), SanitizeBoundingBoxes; multi-scale by the detector\'s '
                'own resize (detection.train_scales)',
}


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """A pycocotools ``COCO`` index of ``ann_file``, with clear errors for a missing or malformed file.

    Annotations without ``area`` get the box area and those without ``iscrowd`` get 0, so that
    COCOeval (which needs both) works on minimal user files.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f'annotation file not found: {path}')
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f'{path} is not a JSON file ({e})') from e
    if not isinstance(data, dict) or not isinstance(data.get('images'), list) \
            or not isinstance(data.get('categories'), list):
        raise ValueError(f'{path} is not a COCO instances file (expected "images", "annotations", "categories")')
    data.setdefault('annotations', [])
    for a in data['annotations']:
        if 'bbox' not in a or 'image_id' not in a or 'category_id' not in a:
            raise ValueError(f'{path}: annotation {a.get("id")} lacks bbox, image_id or category_id')
        a.setdefault('iscrowd', 0)
        if 'area' not in a:
            a['area'] = float(a['bbox'][2]) * float(a['bbox'][3])
    for i, a in enumerate(data['annotations']):
        a.setdefault('id', i + 1)
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        coco.createIndex()
    return coco


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An RGB image file as a ``uint8 3xHxW`` tensor (PIL decodes; raises on unreadable files)."""
    with open(path, 'rb') as f:
        img = Image.open(f)
        img.load()
        img = img.convert('RGB')
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


class CocoDetection(Dataset):
    """A COCO-format detection dataset with bad data skipped and counted (see the module docstring).

    ``category_ids`` fixes the label order (the ids of a model's classes, when evaluating a trained
    model on other data); by default it is the JSON's category ids, sorted.
    """

    def __init__(self, image_dir: str | os.PathLike, ann_file: str | os.PathLike,
                 transform: Optional[Callable] = None, masks: bool = False, keep_empty: bool = True,
                 category_ids: Optional[Sequence[int]] = None) -> None:
        self.image_dir = Path(image_dir)
        self.coco = load_coco(ann_file)
        if not self.image_dir.is_dir():
            raise FileNotFoundError(f'image folder not found: {self.image_dir} (named with {ann_file})')
        self.ann_file = str(ann_file)
        self.transform = transform
        self.masks = bool(masks)
        cats = {int(c['id']): str(c.get('name', c['id'])) for c in self.coco.dataset['categories']}
        self.category_ids: List[int] = [int(c) for c in category_ids] if category_ids else sorted(cats)
        unknown = [c for c in self.category_ids if c not in cats]
        if category_ids and unknown:
            _log.warning('%s lacks categories %s of the model', ann_file, unknown[:5])
        self.classes: List[str] = [cats.get(c, str(c)) for c in self.category_ids]
        self.label_of: Dict[int, int] = {c: i for i, c in enumerate(self.category_ids)}
        self.stats = {'images': 0, 'missing_images': 0, 'empty_images': 0, 'degenerate_boxes': 0,
                      'crowd_boxes': 0, 'unknown_category': 0, 'boxes': 0}
        self.samples: List[Tuple[int, str, np.ndarray, np.ndarray, List[int]]] = []
        for img_id in sorted(self.coco.imgs):
            self._index(img_id, keep_empty)
        self.ids = [s[0] for s in self.samples]
        if self.stats['missing_images']:
            _log.warning('%s: %d image files named in %s do not exist (left out)', self.image_dir,
                         self.stats['missing_images'], ann_file)

    def _index(self, img_id: int, keep_empty: bool) -> None:
        info = self.coco.imgs[img_id]
        path = self.image_dir / str(info.get('file_name', ''))
        if not info.get('file_name') or not path.is_file():
            self.stats['missing_images'] += 1
            return
        w, h = float(info.get('width', 0) or 0), float(info.get('height', 0) or 0)
        boxes, labels, ann_ids = [], [], []
        for ann in self.coco.imgToAnns.get(img_id, []):
            if ann.get('iscrowd', 0):
                self.stats['crowd_boxes'] += 1
                continue
            if int(ann['category_id']) not in self.label_of:
                self.stats['unknown_category'] += 1
                continue
            x, y, bw, bh = (float(v) for v in ann['bbox'])
            x0, y0, x1, y1 = x, y, x + bw, y + bh
            if w > 0 and h > 0:  # clip to the image (sizes from the JSON; checked against the file when read)
                x0, x1 = min(max(x0, 0.0), w), min(max(x1, 0.0), w)
                y0, y1 = min(max(y0, 0.0), h), min(max(y1, 0.0), h)
            if not (x1 > x0 and y1 > y0) or not np.isfinite([x0, y0, x1, y1]).all():
                self.stats['degenerate_boxes'] += 1
                continue
            boxes.append((x0, y0, x1, y1))
            labels.append(self.label_of[int(ann['category_id'])])
            ann_ids.append(int(ann['id']))
        if not boxes and not keep_empty:
            self.stats['empty_images'] += 1
            return
        self.stats['images'] += 1
        self.stats['boxes'] += len(boxes)
        self.samples.append((img_id, str(path), np.asarray(boxes, np.float32).reshape(-1, 4),
                             np.asarray(labels, np.int64), ann_ids))

    def __len__(self) -> int:
        return len(self.samples)

    def category_id(self, label: int) -> int:
        """The JSON category id of contiguous label ``label``."""
        return self.category_ids[int(label)]

    def _masks(self, ann_ids: List[int], h: int, w: int) -> torch.Tensor:
        out = np.zeros((len(ann_ids), h, w), np.uint8)
        for i, a in enumerate(ann_ids):
            ann = self.coco.anns[a]
            seg = ann.get('segmentation')
            if not seg:  # no outline: the box is the mask
                x, y, bw, bh = (int(round(float(v))) for v in ann['bbox'])
                out[i, max(y, 0):max(y + bh, 0), max(x, 0):max(x + bw, 0)] = 1
                continue
            if isinstance(seg, list):  # polygons
                rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w))
            elif isinstance(seg.get('counts'), list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(seg, h, w)
            else:
                rle = seg
            m = mask_utils.decode(rle)
            out[i, :m.shape[0], :m.shape[1]] = m[:h, :w]
        return torch.from_numpy(out)

    def __getitem__(self, index: int) -> Optional[Tuple[Any, Dict[str, Any]]]:
        img_id, path, boxes, labels, ann_ids = self.samples[index]
        try:
            img = read_image(path)
        except Exception as e:  # PIL raises many types for bad files
            _log.warning('skipping unreadable image %s (%s)', path, type(e).__name__)
            return None
        h, w = int(img.shape[-2]), int(img.shape[-1])
        b = torch.from_numpy(boxes.copy())
        b[:, 0::2] = b[:, 0::2].clamp(0, w)  # the file may differ from the JSON's size
        b[:, 1::2] = b[:, 1::2].clamp(0, h)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        target: Dict[str, Any] = {
            'boxes': tv_tensors.BoundingBoxes(b[keep], format='XYXY', canvas_size=(h, w)),
            'labels': torch.from_numpy(labels.copy())[keep], 'image_id': int(img_id)}
        if self.masks:
            target['masks'] = tv_tensors.Mask(self._masks(ann_ids, h, w)[keep])
        image = tv_tensors.Image(img)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


class IfBoxes(v2.Transform):
    """Apply ``transform`` only to samples that have at least one box (SSD's IoU crop needs boxes)."""

    def __init__(self, transform: Callable) -> None:
        super().__init__()
        self.inner = transform

    def forward(self, *inputs: Any) -> Any:
        sample = inputs if len(inputs) > 1 else inputs[0]
        target = sample[1] if isinstance(sample, (tuple, list)) and len(sample) > 1 else None
        if isinstance(target, dict) and len(target.get('boxes', ())) == 0:
            return sample
        return self.inner(*inputs)


def detection_transforms(kind: str, train: bool, mean: Sequence[float] = (0.485, 0.456, 0.406),
                         zoom_out: float = 4.0, hflip: bool = True) -> Callable:
    """torchvision's detection augmentation for ``kind`` (see :data:`AUGMENTATION`), ending in float [0, 1].

    ``zoom_out``: SSD's largest zoom-out (canvas side / image side; 1 turns it off). ``hflip=False``
    leaves out the horizontal flip (for objects that are not mirror-symmetric, such as digits).

    Evaluation only converts: the detectors resize internally and map boxes back to the input size,
    so predictions come out in the original image's pixels, as COCOeval needs.
    """
    to_float = v2.ToDtype(torch.float32, scale=True)
    if not train:
        return v2.Compose([v2.ToImage(), to_float])
    if kind == 'ssdlite':
        ops = [v2.ToImage(), v2.RandomPhotometricDistort(p=0.5)]
        if zoom_out > 1.0:
            ops.append(v2.RandomZoomOut(fill={tv_tensors.Image: [int(255 * m) for m in mean], 'others': 0},
                                        side_range=(1.0, float(zoom_out)), p=0.5))
        ops += [IfBoxes(v2.RandomIoUCrop())]
    else:
        ops = [v2.ToImage()]
    if hflip:
        ops.append(v2.RandomHorizontalFlip(0.5))
    return v2.Compose(ops + [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=1.0), to_float])


def collate_detection(samples: Sequence[Optional[Tuple[Any, Dict[str, Any]]]]
                      ) -> Tuple[List[torch.Tensor], List[Dict[str, Any]], int]:
    """``(images, targets, number skipped)``: lists (images differ in size), ``None`` samples dropped.

    tv_tensors become plain tensors here, which is what torchvision's detectors expect.
    """
    images: List[torch.Tensor] = []
    targets: List[Dict[str, Any]] = []
    for s in samples:
        if s is None:
            continue
        img, tgt = s
        images.append(torch.as_tensor(img).as_subclass(torch.Tensor))
        targets.append({k: (v.as_subclass(torch.Tensor) if isinstance(v, torch.Tensor) else v)
                        for k, v in tgt.items()})
    return images, targets, len(samples) - len(images)
