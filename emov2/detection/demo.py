"""``emov2 detect demo``: a detection data set made offline from real pixels, and a detector trained on it.

Scenes (64x64 by default) are crops of scikit-image's bundled photographs (astronaut, coffee, cat,
rocket, microscopy, Hubble, brick, grass, gravel, ...) with 0-2 of scikit-learn's real 8x8
handwritten digits pasted on them, each upscaled to 35-80% of the scene's height, in a random colour, never
overlapping. Boxes and instance masks are exact: the mask is where the upscaled digit's ink is over
half, the box its tight bounding box. The digit scans of the validation scenes are other people's
handwriting than the training scenes' (a stratified split of sklearn's 1797 digits), and so are
the photograph crops (other positions). Written as COCO (PNGs + ``instances_*.json`` with RLE
masks), the data goes through the same :class:`~emov2.detection.data.CocoDetection`, task and
trainer as COCO itself.

The recipe is the paper's, in small: the backbone (a shallower EMOv2-1M, the classification demo's) is
first pretrained to classify the training writers' digits on photograph crops (:class:`DigitPatches`,
:func:`pretrain_backbone`), then SSDLite is fine-tuned on the scenes (:func:`demo_config`).

The report folder holds the trainer's run (``curves.png``, checkpoints), ``predictions.png`` (drawn
validation predictions next to the ground truth), ``coco_summary.json`` (COCOeval of the model and
of two trivial detectors scored the same way: the mean training box of every class at full score,
and random boxes) and ``metrics.json``.
"""
from __future__ import annotations

import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils
from skimage import data as skdata
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset

from ..train.config import load_config
from ..train.demo import DEMO_MODEL_KWARGS, demo_config as classification_config
from ..train.engine import Trainer
from .data import CocoDetection, detection_transforms
from .models import IMAGENET_MEAN, IMAGENET_STD
from .predict import draw_detections
from .task import DetectionTask, coco_evaluate

__all__ = ['make_digit_scenes', 'demo_config', 'run_detection_demo', 'baseline_results',
           'PRETRAIN_EPOCHS', 'DEMO_EPOCHS', 'DEMO_LR', 'DigitPatches', 'pretrain_backbone']

_log = logging.getLogger('emov2.train')

#: scikit-image photographs shipped with the package (no download)
PHOTOS = ('astronaut', 'coffee', 'chelsea', 'rocket', 'immunohistochemistry', 'hubble_deep_field', 'camera',
          'brick', 'grass', 'gravel', 'moon', 'coins')
#: epochs of digit classification that pretrain the detector's backbone (the paper's ImageNet pretraining)
PRETRAIN_EPOCHS = 3
#: detection fine-tuning: epochs and peak lr (AdamW, batch 16)
DEMO_EPOCHS = 10
DEMO_LR = 0.004
COLOURS = np.array([(255, 255, 255), (255, 230, 40), (60, 255, 80), (255, 80, 200), (40, 220, 255),
                    (255, 140, 20), (0, 0, 0), (30, 40, 200), (200, 20, 20)], np.float32)


def _photos() -> List[np.ndarray]:
    out = []
    for name in PHOTOS:
        img = np.asarray(getattr(skdata, name)())
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        out.append(img[..., :3].astype(np.float32))
    return out


def _background(photos: List[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """A random crop of a random photograph, resized to ``size``, contrast lowered (HxWx3 float 0-255)."""
    p = photos[rng.integers(len(photos))]
    h, w = p.shape[:2]
    side = int(rng.integers(size // 2, min(h, w, 3 * size) + 1))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = torch.from_numpy(p[y:y + side, x:x + side]).permute(2, 0, 1)[None]
    crop = F.interpolate(crop, size=(size, size), mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop * rng.uniform(0.5, 0.9) + rng.uniform(0, 40)


def _digit_alpha(digit: np.ndarray, h: int, w: int) -> np.ndarray:
    """An 8x8 sklearn digit (0-16) upscaled to ``h x w`` as ink coverage in [0, 1]."""
    x = torch.from_numpy(digit.astype(np.float32) / 16.0)[None, None]
    x = F.interpolate(x, size=(h, w), mode='bicubic', align_corners=False)[0, 0]
    return (x * 1.6).clamp(0, 1).numpy()


def _scene(photos: List[np.ndarray], digits: np.ndarray, labels: np.ndarray, size: int,
           rng: np.random.Generator, max_digits: int) -> Tuple[np.ndarray, List[Dict[str, Any]]]:
    img = _background(photos, size, rng)
    n = 0 if rng.random() < 0.05 else int(rng.integers(1, max_digits + 1))
    placed: List[Tuple[int, int, int, int]] = []
    anns: List[Dict[str, Any]] = []
    for _ in range(n):
        k = int(rng.integers(len(digits)))
        h = int(rng.integers(round(0.35 * size), round(0.8 * size) + 1))
        w = max(8, int(h * rng.uniform(0.7, 1.0)))
        for _try in range(30):
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            if all(x + w + 2 <= a or a + c + 2 <= x or y + h + 2 <= b or b + d + 2 <= y for a, b, c, d in placed):
                break
        else:
            continue
        alpha = _digit_alpha(digits[k], h, w)
        mask = np.zeros((size, size), np.uint8)
        mask[y:y + h, x:x + w] = alpha > 0.5
        if mask.sum() < 4:
            continue
        colour = COLOURS[rng.integers(len(COLOURS))]
        region = img[y:y + h, x:x + w]
        img[y:y + h, x:x + w] = region * (1 - alpha[..., None]) + colour * alpha[..., None]
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        rle = mask_utils.encode(np.asfortranarray(mask))
        anns.append({'category_id': int(labels[k]) + 1, 'bbox': [x0, y0, x1 - x0, y1 - y0],
                     'area': int(mask.sum()), 'iscrowd': 0,
                     'segmentation': {'size': [size, size], 'counts': rle['counts'].decode('ascii')}})
        placed.append((x, y, w, h))
    noise = rng.normal(0, rng.uniform(0, 8), img.shape)
    return np.clip(img + noise, 0, 255).round().astype(np.uint8), anns


def _split(seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The writers split of the scenes: ``(train_x, val_x, train_y, val_y)``, stratified 75/25."""
    d = load_digits()
    return tuple(train_test_split(d.images, d.target, test_size=0.25, stratify=d.target, random_state=seed))


class DigitPatches(Dataset):
    """Single digits on photograph crops, as the scenes draw them (random colour, 55-100% of the side,
    random place), for classification: the demo's pretraining data (the paper's ImageNet step, in small).

    ``copies`` patches per digit scan, drawn once (seeded); items are ImageNet-normalised ``3 x size x size``
    tensors (the detector's normalisation) and the digit. No flips: digits are not mirror-symmetric."""

    def __init__(self, digits: np.ndarray, labels: np.ndarray, copies: int = 4, size: int = 32, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        photos = _photos()
        n = len(digits) * copies
        out = np.empty((n, size, size, 3), np.uint8)
        self.labels = [int(labels[i % len(digits)]) for i in range(n)]
        for i in range(n):
            img = _background(photos, size, rng)
            h = int(rng.integers(round(0.55 * size), size + 1))
            w = max(4, int(h * rng.uniform(0.7, 1.0)))
            y, x = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            alpha = _digit_alpha(digits[i % len(digits)], h, w)[..., None]
            img[y:y + h, x:x + w] = img[y:y + h, x:x + w] * (1 - alpha) + COLOURS[rng.integers(len(COLOURS))] * alpha
            out[i] = np.clip(img + rng.normal(0, rng.uniform(0, 8), img.shape), 0, 255).round()
        self.images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return (self.images[index].float() / 255 - self.mean) / self.std, self.labels[index]


def pretrain_backbone(out: str | Path, backbone: str = 'emov2_1m', backbone_kwargs: Dict[str, Any] | None = None,
                      epochs: int = 3, seed: int = 0, progress: bool = True, overwrite: bool = False,
                      copies: int = 4) -> Dict[str, Any]:
    """Train ``backbone`` to classify :class:`DigitPatches` of the training writers' digits (the
    classification demo's recipe, ``emov2.train.demo.demo_config``, with ImageNet normalisation as the
    detector's); held-out: patches of the validation writers. Returns the run's final metrics and weights."""
    tx, vx, ty, vy = _split(seed)
    train_ds = DigitPatches(tx, ty, copies, seed=seed)
    test_ds = DigitPatches(vx, vy, 1, seed=seed + 1)
    cfg = classification_config(str(out), epochs, overrides=[
        f'model.name={backbone}', f'model.kwargs={json.dumps(dict(backbone_kwargs or {}))}',
        f'data.mean={list(IMAGENET_MEAN)}', f'data.std={list(IMAGENET_STD)}',
        'aug.custom="digits on photograph crops, drawn once (detection.demo.DigitPatches)"',
        f'train.seed={seed}', f'train.progress={str(progress).lower()}', f'train.overwrite={str(overwrite).lower()}'])
    result = Trainer(cfg, train_ds, test_ds, class_names=train_ds.classes).fit()
    return {'test_top1': result.last_metrics.get('val_top1'), 'train_patches': len(train_ds),
            'test_patches': len(test_ds), 'weights': str(Path(out) / 'last' / 'model.safetensors')}


def make_digit_scenes(out: str | Path, n_train: int = 1200, n_val: int = 200, size: int = 64, seed: int = 0,
                      max_digits: int = 2) -> Dict[str, Path]:
    """Write ``train/``, ``val/`` PNG scenes and ``annotations/instances_{train,val}.json`` under ``out``.

    Category ids are ``digit + 1`` (names ``'0'`` .. ``'9'``). Returns the four paths.
    """
    out = Path(out)
    tr_x, va_x, tr_y, va_y = _split(seed)
    photos = _photos()
    cats = [{'id': i + 1, 'name': str(i), 'supercategory': 'digit'} for i in range(10)]
    paths: Dict[str, Path] = {}
    for split, n, xs, ys, split_seed in (('train', n_train, tr_x, tr_y, seed), ('val', n_val, va_x, va_y, seed + 1)):
        rng = np.random.default_rng(10_007 * split_seed + (1 if split == 'val' else 0))
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for i in range(n):
            img, anns = _scene(photos, xs, ys, size, rng, max_digits)
            name = f'{i:05d}.png'
            Image.fromarray(img).save(folder / name)
            images.append({'id': i + 1, 'file_name': name, 'width': size, 'height': size})
            for a in anns:
                annotations.append({**a, 'id': len(annotations) + 1, 'image_id': i + 1})
        ann_dir = out / 'annotations'
        ann_dir.mkdir(parents=True, exist_ok=True)
        ann = ann_dir / f'instances_{split}.json'
        ann.write_text(json.dumps({'info': {'description': f'sklearn digits on skimage photographs ({split})'},
                                   'images': images, 'annotations': annotations, 'categories': cats}))
        paths[f'{split}_images'], paths[f'{split}_annotations'] = folder, ann
    return paths


def demo_config(out: str, paths: Dict[str, Path], kind: str = 'ssdlite', backbone: str = 'emov2_1m',
                epochs: int = 3, batch_size: int = 16, size: int = 64, backbone_checkpoint: str | None = None,
                lr: float = 0.002, overrides: Sequence[str] = (),
                backbone_kwargs: Dict[str, Any] | None = None) -> Dict[str, Any]:
    """The demo's recipe: the paper's optimiser (AdamW, weight decay 0.05, clip 0.1) with a higher lr
    (:data:`DEMO_LR`: tiny data, a backbone pretrained on digits rather than ImageNet) at batch 16, cosine
    with one warm-up epoch; SSD's photometric distortion and IoU crop without zoom-out (the scenes are
    small already) and without flips (digits are not mirror-symmetric). The SSDLite neck and head use
    GroupNorm (``detection.ssdlite_norm=gn``): at 64 px their last maps are 1x1, where BatchNorm on
    batches of 16 fails (docs/DETECTION.md). ``backbone_kwargs`` shape the backbone (``model.kwargs``)."""
    return load_config(None, [
        f'model.name={backbone}', f'model.kwargs={json.dumps(dict(backbone_kwargs or {}))}',
        f'detection.kind={kind}', f'detection.image_size={size}', 'detection.ssdlite_norm=gn', 'detection.hflip=false',
        *(f'detection.{k}={v}' for k, v in paths.items()), 'detection.score_thresh=0.02',
        f'detection.backbone_checkpoint={backbone_checkpoint if backbone_checkpoint else "null"}',
        'detection.detections_per_img=100', 'detection.zoom_out=1.0', f'optim.batch_size={batch_size}', f'optim.lr={lr}',
        f'sched.epochs={epochs}', 'sched.warmup_epochs=1',
        'eval.batch_size=50', 'eval.precise_bn_images=0', 'data.workers=1', 'train.amp=false', f'train.out={out}', *overrides],
        defaults=DetectionTask.defaults)


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children (data-loader workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def baseline_results(train: CocoDetection, val: CocoDetection, kind: str, seed: int = 0) -> Dict[str, List[Dict]]:
    """Detections of two trivial detectors on ``val``, in COCO's results format.

    ``mean_box``: for every image, the mean training box of each class (relative to the image size)
    at score 1 (one box per class per image). ``random``: as many random boxes per image (random
    class, random score, sizes drawn from the training boxes) as the mean box baseline gives.
    """
    rel: Dict[int, List[np.ndarray]] = {}
    for img_id, _, boxes, labels, _ in train.samples:
        info = train.coco.imgs[img_id]
        wh = np.array([info['width'], info['height']] * 2, np.float32)
        for b, lab in zip(boxes, labels):
            rel.setdefault(int(lab), []).append(b / wh)
    mean = {lab: np.mean(v, 0) for lab, v in rel.items()}
    all_rel = np.concatenate([np.stack(v) for v in rel.values()])
    rng = np.random.default_rng(seed)
    out: Dict[str, List[Dict]] = {'mean_box': [], 'random': []}
    for img_id in val.ids:
        info = val.coco.imgs[img_id]
        w, h = float(info['width']), float(info['height'])
        for lab, b in mean.items():
            x0, y0, x1, y1 = b * [w, h, w, h]
            out['mean_box'].append({'image_id': img_id, 'category_id': train.category_id(lab),
                                    'bbox': [float(x0), float(y0), float(x1 - x0), float(y1 - y0)], 'score': 1.0})
        for _ in range(len(mean)):
            rb = all_rel[rng.integers(len(all_rel))]
            bw, bh = (rb[2] - rb[0]) * w, (rb[3] - rb[1]) * h
            x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
            out['random'].append({'image_id': img_id, 'category_id': train.category_id(int(rng.integers(len(mean)))),
                                  'bbox': [float(x0), float(y0), float(bw), float(bh)], 'score': float(rng.random())})
    return out


def _draw_grid(model: torch.nn.Module, task: DetectionTask, val: CocoDetection, path: Path, count: int = 16,
               score_thresh: float | None = None) -> None:
    """Validation scenes: ground truth (left) and predictions (right), in a grid. Predictions drawn: those
    above ``score_thresh``, or (None) the image's top-scoring ones, as many as it has objects (at least one)."""
    tiles = []
    model.eval()
    names = val.classes
    for i in range(min(count, len(val))):
        img, tgt = val[i]
        out = task.predict_batch(model, [img], torch.device('cpu'))[0]
        if score_thresh is not None:
            keep = out['scores'] >= score_thresh
        else:  # detections come sorted by score
            keep = torch.arange(len(out['scores'])) < max(len(tgt['boxes']), 1)
        u8 = (img * 255).round().to(torch.uint8)
        gt = draw_detections(u8, tgt['boxes'], [names[int(lab)] for lab in tgt['labels']], scale=2)
        pred = draw_detections(u8, out['boxes'][keep],
                               [f'{names[int(lab) - task.label_offset]} {s:.2f}'
                                for lab, s in zip(out['labels'][keep], out['scores'][keep])],
                               masks=out['masks'][keep][:, 0] > 0.5 if 'masks' in out else None, scale=2)
        tiles.append(torch.cat([gt, torch.full((3, gt.shape[1], 4), 255, dtype=torch.uint8), pred], 2))
    cols = 2
    rows = [torch.cat([t for t in tiles[r * cols:(r + 1) * cols]], 2) for r in range(len(tiles) // cols)]
    sep = torch.full((3, 6, rows[0].shape[2]), 255, dtype=torch.uint8)
    grid = torch.cat([x for r in rows for x in (r, sep)][:-1], 1)
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)


def run_detection_demo(out: str = 'runs/detect_demo', kind: str = 'ssdlite', backbone: str = 'emov2_1m',
                       epochs: int = DEMO_EPOCHS, n_train: int = 1200, n_val: int = 200, size: int = 64,
                       batch_size: int = 16, seed: int = 0, progress: bool = True, overwrite: bool = False,
                       pretrain_epochs: int = PRETRAIN_EPOCHS, backbone_checkpoint: str | None = None,
                       lr: float = DEMO_LR, overrides: Sequence[str] = (),
                       backbone_kwargs: Dict[str, Any] | None = None, input_size: int | None = None) -> Dict[str, Any]:
    """Pretrain the backbone on digit classification, make the digit scenes, fine-tune the detector,
    evaluate against the trivial baselines, write the report folder.

    ``backbone_checkpoint`` (e.g. ImageNet weights, or an earlier demo's ``pretrain/last/model.safetensors``)
    skips the pretraining; ``pretrain_epochs=0`` without it trains the detector from scratch.
    ``backbone_kwargs`` (default: the classification demo's shallower EMOv2, ``DEMO_MODEL_KWARGS``) shape
    the backbone of both steps; ``input_size`` is the detector's input (default ``size``: the scenes' own)."""
    t0, c0 = time.time(), _cpu_seconds()
    out_dir = Path(out).absolute()  # the config's data paths must not depend on the working directory
    backbone_kwargs = dict(DEMO_MODEL_KWARGS if backbone_kwargs is None else backbone_kwargs)
    pre: Dict[str, Any] = {}
    checkpoint = backbone_checkpoint
    if checkpoint is None and pretrain_epochs > 0:
        # the paper's ImageNet pretraining, in small: the same backbone (with backbone_kwargs, as the
        # detector builds it) classifies the training writers' digits on photograph crops at 32 px
        pre = pretrain_backbone(out_dir / 'pretrain', backbone, backbone_kwargs, pretrain_epochs, seed, progress,
                                overwrite)
        checkpoint = pre['weights']
    t_pre, c_pre = time.time() - t0, _cpu_seconds() - c0
    paths = make_digit_scenes(out_dir / 'data', n_train, n_val, size, seed)
    cfg = demo_config(str(out_dir), paths, kind, backbone, epochs, batch_size, input_size or size, checkpoint, lr,
                      backbone_kwargs=backbone_kwargs, overrides=[
        f'train.seed={seed}', f'train.progress={str(progress).lower()}', f'train.overwrite={str(overwrite).lower()}',
        *overrides])
    task = DetectionTask(cfg)
    train_ds, val_ds = task.build_datasets(cfg)
    trainer = Trainer(cfg, train_ds, val_ds, task=task)
    t1, c1 = time.time(), _cpu_seconds()
    result = trainer.fit()
    t_train, c_train = time.time() - t1, _cpu_seconds() - c1
    model = trainer.model.eval()
    eval_val = CocoDetection(paths['val_images'], paths['val_annotations'], detection_transforms(kind, False),
                             category_ids=train_ds.category_ids)
    loader = DataLoader(eval_val, batch_size=50, collate_fn=task.collate)
    final = task.evaluate(model, loader, torch.device('cpu'))
    iou = ('bbox', 'segm') if task.masks else ('bbox',)
    base = {name: coco_evaluate(eval_val.coco, res, eval_val.ids, ('bbox',))
            for name, res in baseline_results(train_ds, eval_val, kind, seed).items()}
    summary = {'model': final, 'baseline_mean_box': base['mean_box'], 'baseline_random': base['random'],
               'iou_types': list(iou)}
    (out_dir / 'coco_summary.json').write_text(json.dumps(summary, indent=2))
    _draw_grid(model, task, eval_val, out_dir / 'predictions.png')
    metrics = {
        'task': f'sklearn digits on skimage photographs, {size}x{size}, 10 classes', 'kind': kind,
        'backbone': backbone, 'params': sum(p.numel() for p in model.parameters()),
        'train_images': len(train_ds), 'val_images': len(eval_val), 'epochs': epochs, 'batch_size': batch_size,
        'bbox_AP': final['bbox_AP'], 'bbox_AP50': final['bbox_AP50'],
        'baseline_mean_box_AP': base['mean_box']['bbox_AP'], 'baseline_mean_box_AP50': base['mean_box']['bbox_AP50'],
        'baseline_random_AP': base['random']['bbox_AP'], 'baseline_random_AP50': base['random']['bbox_AP50'],
        'bbox_AP75': final['bbox_AP75'], 'baseline_mean_box_AP75': base['mean_box']['bbox_AP75'],
        'pretrain_epochs': pretrain_epochs if backbone_checkpoint is None else 0, 'pretrain_test_top1': pre.get('test_top1'), 'backbone_checkpoint': checkpoint,
        'stopped_early': result.stopped_early, 'pretrain_seconds': round(t_pre, 1),
        'pretrain_cpu_seconds': round(c_pre, 1), 'finetune_seconds': round(t_train, 1),
        'finetune_cpu_seconds': round(c_train, 1),
        'wall_seconds': round(time.time() - t0, 1), 'threads': torch.get_num_threads(),
        # CPU time of this process (all threads): on a busy machine, cpu_seconds / threads is the wall
        # time the same run takes on that many free cores
        'cpu_seconds': round(_cpu_seconds() - c0, 1),
        'load_average_1min': round(os.getloadavg()[0], 1),
        'weights': str(out_dir / 'last' / 'model.safetensors')}
    if task.masks:
        metrics['segm_AP'] = final['segm_AP']
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics
