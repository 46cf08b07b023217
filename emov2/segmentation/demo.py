"""``emov2 segment demo``: a segmentation task made offline from real pixels, trained on CPU in minutes.

Scenes of 96-128 px are crops of scikit-image's photographs (``skimage.data``; the validation
scenes use other photographs than training) with 2-4 of scikit-learn's handwritten digits (real
8x8 scans, train/validation digits disjoint) pasted at random positions and sizes of 24-40 px (near
the 32 px the backbone was pretrained at). Each digit's pixels are the bilinearly upscaled scan's ink
above 0.4, painted in a colour whose brightness contrasts with the photograph under it (bright on
dark, dark on bright), and exactly those pixels are labelled with its class (``1 .. 10`` for the
digits 0-9); everything else is ``background`` (0): 11 classes, where the model must both find the
digits and tell them apart.

As the paper starts its segmenters from ImageNet weights, the demo first trains the same backbone
(EMOv2-1M, depths [1, 2, 2, 1]) to classify the digits (:func:`emov2.train.demo.run_demo`, report
in ``<out>/pretrain``), each training digit painted on a piece of a training photograph as the
scenes show digits (:class:`DigitOnPhoto`; plain grey digits barely transfer: ~12 % top-1 on scene
digits vs ~90 %), and loads that checkpoint as ``segmentation.backbone_checkpoint`` through the one
loader; the segmenter then uses the classifier's normalisation (mean = std = 0.5). The background,
~90 % of the pixels, is weighted 0.3 in the cross-entropy (``segmentation.class_weight``).

The scenes are written as an image + mask folder (``<out>/data/{train,val}/{images,masks}``,
``classes.txt``), so the demo trains through the same folder dataset, MMSeg augmentation and
:class:`SegmentationTask` as any user data, and ``emov2 segment eval --checkpoint <out> --data
<out>/data`` re-scores it. The report folder gets the trainer's curves and checkpoints, the
per-class IoU/Acc table (``per_class.json``, also in ``metrics.json``), colour overlays of
validation scenes with ground truth and prediction side by side (``overlays.png``), the label PNGs
``predict`` writes for a few scenes (``predictions/``), the chance levels (majority class, uniform
random labels) and the CPU and wall seconds.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image

from ..factory import create_model
from ..train.config import load_config
from ..train.demo import AUGMENTATION, DEMO_MODEL_KWARGS, DIGIT_MEAN, DIGIT_STD, load_digits_split, run_demo
from ..train.engine import RunExistsError, Trainer, holds_run
from .data import default_palette
from .inference import segment_logits
from .metrics import ConfusionMatrix, per_class_rows
from .predict import colorize, overlay, predict_images
from .task import SegmentationTask, evaluate_segmenter

__all__ = ['DEMO_CLASSES', 'DigitOnPhoto', 'make_scenes', 'write_scene_folder', 'demo_config', 'scene_digit_top1',
           'run_segmentation_demo']

_log = logging.getLogger('emov2.train')
DEMO_CLASSES = ['background'] + [f'digit {i}' for i in range(10)]
TRAIN_PHOTOS = ('astronaut', 'brick', 'camera', 'coffee', 'coins', 'grass', 'gravel', 'hubble_deep_field',
                'immunohistochemistry', 'moon', 'retina', 'rocket')
VAL_PHOTOS = ('chelsea', 'clock', 'text')
#: the demo segmenter: SegFormer's all-MLP head on EMOv2-1M with fewer blocks per stage (as the
#: classification demo) and a 128-wide head: the cheapest of the kinds per CPU training step
DEMO_SEGMENTER = {'kind': 'segformer', 'backbone': 'emov2_1m', 'channels': 128, 'kwargs': dict(DEMO_MODEL_KWARGS)}
#: the demo's defaults (measured: docs/SEGMENTATION.md)
DEMO_LR = 4e-3
DEMO_BACKGROUND_WEIGHT = 0.3
DEMO_PER_SCENE = (2, 4)
DEMO_EPOCHS = 16
DEMO_PRETRAIN_EPOCHS = 15


def _photo(name: str) -> np.ndarray:
    img = getattr(skimage.data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = (img / max(float(img.max()), 1e-6) * 255).astype(np.uint8)
    return img


def _paint(region: np.ndarray, ink: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint the ink above 0.4 into ``region`` (float HxWx3, in place) in a colour whose brightness
    contrasts with the photo under it, so every labelled digit is visible and the label is exactly
    what is visible; returns the painted pixels."""
    colour = rng.uniform(150, 255, size=3) if float(region.mean()) < 128 else rng.uniform(0, 105, size=3)
    ink_px = ink > 0.4
    region[ink_px] = colour
    return ink_px


def _photo_crop(photo: np.ndarray, rng: np.random.Generator, h: int, w: int, share: float) -> np.ndarray:
    """A random crop of ``share`` of the photo's short side (aspect ``h:w``) resized to ``h x w`` (float)."""
    side = min(photo.shape[:2]) * share
    ch, cw = max(2, int(side * h / max(h, w))), max(2, int(side * w / max(h, w)))
    y, x = int(rng.integers(0, photo.shape[0] - ch + 1)), int(rng.integers(0, photo.shape[1] - cw + 1))
    crop = torch.as_tensor(photo[y:y + ch, x:x + cw]).permute(2, 0, 1)[None].float()
    return F.interpolate(crop, size=(h, w), mode='bilinear', align_corners=False)[0].permute(1, 2, 0).numpy()


class DigitOnPhoto:
    """Pretraining in the scenes' domain: render a digit classifier's training image (1 x S x S ink in
    [0, 1], after its affine warp) as a scene shows a digit: the ink above 0.4 painted in a contrasting
    colour on the piece of a photograph a digit of 24-40 px covers in a 96-128 px scene (RGB in [0, 1]).
    Passed to :func:`emov2.train.demo.run_demo` as ``compose``."""

    def __init__(self, photos: Sequence[str], seed: int = 0, size_range: Tuple[int, int] = (96, 128),
                 digit_range: Tuple[int, int] = (24, 40)) -> None:
        self.backgrounds = [_photo(p) for p in photos]
        self.rng = np.random.default_rng(seed)
        self.size_range, self.digit_range = size_range, digit_range

    def __call__(self, ink: torch.Tensor) -> torch.Tensor:
        rng, side = self.rng, int(ink.shape[-1])
        scene = rng.integers(self.size_range[0], self.size_range[1] + 1)
        digit = rng.integers(self.digit_range[0], self.digit_range[1] + 1)
        bg = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        img = _photo_crop(bg, rng, side, side, rng.uniform(0.3, 1.0) * digit / scene)
        _paint(img, ink[0].numpy(), rng)
        return torch.from_numpy(img).permute(2, 0, 1).clamp(0, 255) / 255.0


def make_scenes(count: int, digits: np.ndarray, labels: np.ndarray, photos: Sequence[str], seed: int,
                size_range: Tuple[int, int] = (96, 128), digit_range: Tuple[int, int] = (24, 40),
                per_scene: Tuple[int, int] = (1, 3)) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``count`` ``(rgb uint8 HxWx3, mask uint8 HxW)`` scenes (see the module doc)."""
    rng = np.random.default_rng(seed)
    backgrounds = [_photo(p) for p in photos]
    ink = torch.as_tensor(digits, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    out = []
    for _ in range(count):
        h, w = (int(v) for v in rng.integers(size_range[0], size_range[1] + 1, size=2))
        bg = backgrounds[int(rng.integers(len(backgrounds)))]
        img = _photo_crop(bg, rng, h, w, rng.uniform(0.3, 1.0))  # 30-100 % of the photo's short side
        mask = np.zeros((h, w), np.uint8)
        for _ in range(int(rng.integers(per_scene[0], per_scene[1] + 1))):
            i = int(rng.integers(len(labels)))
            s = int(rng.integers(digit_range[0], min(digit_range[1], h, w) + 1))
            a = F.interpolate(ink[i:i + 1], size=(s, s), mode='bilinear', align_corners=False)[0, 0].clamp(0, 1).numpy()
            top, left = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
            ink_px = _paint(img[top:top + s, left:left + s], a, rng)
            mask[top:top + s, left:left + s][ink_px] = int(labels[i]) + 1
        out.append((img.clip(0, 255).astype(np.uint8), mask))
    return out


def write_scene_folder(scenes: Sequence[Tuple[np.ndarray, np.ndarray]], folder: Path) -> None:
    """Scenes as ``folder/images/NNNN.png`` and ``folder/masks/NNNN.png`` (palette label PNGs)."""
    (folder / 'images').mkdir(parents=True, exist_ok=True)
    (folder / 'masks').mkdir(parents=True, exist_ok=True)
    palette = default_palette(len(DEMO_CLASSES))
    for i, (img, mask) in enumerate(scenes):
        Image.fromarray(img).save(folder / 'images' / f'{i:04d}.png')
        colorize(mask, palette).save(folder / 'masks' / f'{i:04d}.png')


def demo_config(out: str, epochs: int, batch_size: int = 16, crop: int = 64, lr: float = DEMO_LR,
                backbone_checkpoint: Optional[str] = None, background_weight: Optional[float] = DEMO_BACKGROUND_WEIGHT,
                overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The demo recipe: the paper's optimiser shape (AdamW, cosine, warm-up); the digits classifier's
    normalisation (mean = std = 0.5) so the pretrained backbone sees inputs scaled as in its training;
    ``background_weight``: the background's weight in the cross-entropy (``segmentation.class_weight``,
    the digits 1; None: plain CE), as the background covers ~90 % of the pixels."""
    d = DEMO_SEGMENTER
    ckpt = [f'segmentation.backbone_checkpoint={json.dumps(backbone_checkpoint)}'] if backbone_checkpoint else []
    if background_weight is not None:
        ckpt.append(f'segmentation.class_weight={json.dumps([float(background_weight)] + [1.0] * 10)}')
    return load_config(None, [*ckpt, f'data.mean={list(DIGIT_MEAN)}', f'data.std={list(DIGIT_STD)}',
        f'segmentation.kind={d["kind"]}', f'segmentation.backbone={d["backbone"]}',
        f'segmentation.channels={d["channels"]}', f'model.kwargs={json.dumps(d["kwargs"])}',
        'segmentation.layout=folder', f'segmentation.crop_size=[{crop}, {crop}]', 'segmentation.scale=[96, 96]',
        'segmentation.ratio_range=[0.8, 1.25]', 'segmentation.stride=[64, 64]', 'segmentation.hflip=0.0',
        'segmentation.photometric=false',
        'model.drop_path_rate=0.0', 'data.workers=0', f'optim.batch_size={batch_size}', f'optim.lr={lr}',
        'optim.weight_decay=0.05', 'optim.clip_grad=5.0', f'sched.epochs={epochs}', 'sched.warmup_epochs=1',
        'sched.warmup_lr=1.0e-5', 'sched.min_lr=1.0e-5', 'eval.batch_size=16', f'eval.every={max(1, epochs // 4)}',
        'eval.precise_bn_images=128', 'train.amp=false', f'train.out={out}', *overrides],
        defaults=SegmentationTask.defaults)


def _chance_levels(val_masks: Sequence[np.ndarray], k: int, seed: int) -> Dict[str, float]:
    """mIoU of predicting the majority class everywhere and of uniform random labels."""
    majority, uniform = ConfusionMatrix(k), ConfusionMatrix(k)
    g = torch.Generator().manual_seed(seed)
    for m in val_masks:
        t = torch.as_tensor(m.astype(np.int64))
        majority.update(torch.zeros_like(t), t)
        uniform.update(torch.randint(0, k, t.shape, generator=g), t)
    return {'majority_mIoU': majority.metrics()['mIoU'], 'uniform_random_mIoU': uniform.metrics()['mIoU']}


def _plot_overlays(model: torch.nn.Module, scenes: Sequence[Tuple[np.ndarray, np.ndarray]], val_dataset: Any,
                   palette: Sequence[Sequence[int]], path: Path, rows: int = 6) -> None:
    """Image, ground truth and prediction (the evaluation's own preprocessing) for the first scenes."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    model.eval()
    fig, axes = plt.subplots(rows, 3, figsize=(7.5, 2.6 * rows))
    for r, (img, mask) in enumerate(scenes[:rows]):
        x, _ = val_dataset[r]
        with torch.no_grad():
            pred = segment_logits(model, x[None], out_size=mask.shape).argmax(1)[0].numpy().astype(np.uint8)
        for c, (title, im) in enumerate((('image', Image.fromarray(img)),
                                         ('ground truth', overlay(Image.fromarray(img), mask, palette, 0.6, (0, 255))),
                                         ('prediction', overlay(Image.fromarray(img), pred, palette, 0.6, (0, 255))))):
            ax = axes[r, c]
            ax.imshow(im)
            ax.axis('off')
            if r == 0:
                ax.set_title(title)
        for c, lab in ((1, mask), (2, pred)):
            present = sorted(set(np.unique(lab).tolist()) - {0, 255})
            axes[r, c].text(2, img.shape[0] - 3, ' '.join(str(p - 1) for p in present) or '-', color='white',
                            fontsize=8, bbox=dict(facecolor='black', alpha=0.6, pad=1))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


@torch.no_grad()
def scene_digit_top1(checkpoint: str, digits: np.ndarray, labels: np.ndarray, photos: Sequence[str], seed: int,
                     count: int = 200) -> float:
    """Top-1 (%) of the pretrained digit classifier on ``count`` digits as the scenes show them (one
    digit per scene, the square around it resized to 32 px): how much of the pretraining carries over."""
    model = create_model('emov2_1m', checkpoint, num_classes=10, **DEMO_MODEL_KWARGS).eval()
    crops, truth = [], []
    for img, mask in make_scenes(count, digits, labels, photos, seed, per_scene=(1, 1)):
        ys, xs = np.nonzero(mask)
        if not len(ys):
            continue
        half = max(ys.max() - ys.min(), xs.max() - xs.min()) // 2 + 3
        cy, cx = (ys.min() + ys.max()) // 2 + half, (xs.min() + xs.max()) // 2 + half
        crop = np.pad(img, ((half, half), (half, half), (0, 0)), mode='edge')[cy - half:cy + half, cx - half:cx + half]
        x = F.interpolate(torch.as_tensor(crop).permute(2, 0, 1)[None].float() / 255.0, size=(32, 32),
                          mode='bilinear', align_corners=False)[0]
        crops.append((x - torch.tensor(DIGIT_MEAN)[:, None, None]) / torch.tensor(DIGIT_STD)[:, None, None])
        truth.append(int(mask.max()) - 1)
    pred = model(torch.stack(crops)).argmax(1)
    return float((pred == torch.tensor(truth)).float().mean() * 100)


def run_segmentation_demo(out: str = 'runs/segment_demo', epochs: int = DEMO_EPOCHS, train_scenes: int = 800,
                          val_scenes: int = 160, seed: int = 0, progress: bool = True, overwrite: bool = False,
                          overrides: Sequence[str] = (), pretrain_epochs: int = DEMO_PRETRAIN_EPOCHS,
                          batch_size: int = 16, lr: float = DEMO_LR, per_scene: Tuple[int, int] = DEMO_PER_SCENE,
                          background_weight: Optional[float] = DEMO_BACKGROUND_WEIGHT,
                          pretrain_on_photos: bool = True) -> Dict[str, Any]:
    """Pretrain the backbone on digit classification, make the scenes, train the segmenter from that
    backbone, evaluate, write the report folder; returns the metrics (``pretrain_epochs=0``: from scratch).

    ``pretrain_on_photos``: the pretraining digits are painted on pieces of the training photographs
    as the scenes show them (:class:`DigitOnPhoto`); False: plain grey digits (``emov2 demo``'s)."""
    t0, c0 = time.time(), time.process_time()
    out_dir = Path(out)
    tx, ty, vx, vy = load_digits_split(seed=seed)
    train = make_scenes(train_scenes, tx, ty, TRAIN_PHOTOS, seed, per_scene=tuple(per_scene))
    val = make_scenes(val_scenes, vx, vy, VAL_PHOTOS, seed + 1, per_scene=tuple(per_scene))
    if holds_run(out_dir) and not overwrite:  # before the scenes are rewritten
        raise RunExistsError(f'{out_dir} already holds a run; pass --overwrite or choose another --out')
    pretrain: Dict[str, Any] = {}
    backbone_checkpoint = None
    if pretrain_epochs > 0:  # the analogue of the paper's ImageNet pretraining: the same backbone classifies digits
        tp, cp = time.time(), time.process_time()
        compose = DigitOnPhoto(TRAIN_PHOTOS, seed) if pretrain_on_photos else None
        custom = [f'aug.custom={json.dumps(AUGMENTATION + ", painted on training photographs (DigitOnPhoto)")}'] \
            if compose else []
        m = run_demo(str(out_dir / 'pretrain'), epochs=pretrain_epochs, seed=seed, progress=progress, overwrite=True,
                     compose=compose, overrides=custom)
        backbone_checkpoint = str(out_dir / 'pretrain' / 'best' / 'model.safetensors')
        pretrain = {'pretrain_epochs': pretrain_epochs, 'pretrain_on_photos': pretrain_on_photos,
                    'pretrain_test_top1': m.get('test_top1'),
                    'pretrain_val_scene_digit_top1': scene_digit_top1(backbone_checkpoint, vx, vy, VAL_PHOTOS, seed + 2),
                    'pretrain_wall_seconds': round(time.time() - tp, 1),
                    'pretrain_cpu_seconds': round(time.process_time() - cp, 1), 'backbone_checkpoint': backbone_checkpoint}
    cfg = demo_config(str(out_dir), epochs, batch_size=batch_size, lr=lr, backbone_checkpoint=backbone_checkpoint,
                      background_weight=background_weight, overrides=[f'train.seed={seed}', f'train.progress={str(progress).lower()}',
                                 f'train.overwrite={str(overwrite).lower()}', *overrides])
    data_root = out_dir / 'data'
    write_scene_folder(train, data_root / 'train')
    write_scene_folder(val, data_root / 'val')
    (data_root / 'classes.txt').write_text('\n'.join(DEMO_CLASSES) + '\n')
    cfg['data']['root'] = str(data_root)
    task = SegmentationTask(cfg)
    t_train = time.time()
    trainer = Trainer(cfg, task=task)
    result = trainer.fit()
    train_seconds = time.time() - t_train
    # final weights reported (no choice made on the validation scenes)
    r = evaluate_segmenter(trainer.model, trainer.val_loader, torch.device('cpu'), len(DEMO_CLASSES), DEMO_CLASSES,
                           255, 'whole')
    table = r['table']
    chance = _chance_levels([m for _, m in val], len(DEMO_CLASSES), seed)
    _plot_overlays(trainer.model, val, trainer.val_dataset, task.palette, out_dir / 'overlays.png')
    pred_dir = out_dir / 'predictions'
    sample_paths = [str(data_root / 'val' / 'images' / f'{i:04d}.png') for i in range(4)]
    predict_images(sample_paths, str(out_dir), str(pred_dir))
    rows = per_class_rows(table)
    (out_dir / 'per_class.json').write_text(json.dumps(rows, indent=2))
    metrics = {
        'task': 'sklearn digits pasted on skimage photographs, 96-128 px scenes, 11 classes (background + 10 digits)',
        **{k: cfg['segmentation'][k] for k in ('kind', 'backbone', 'channels', 'crop_size')},
        'model_kwargs': cfg['model']['kwargs'], 'params': sum(p.numel() for p in trainer.model.parameters()),
        'train_scenes': len(train), 'val_scenes': len(val), 'epochs': epochs, 'steps': result.global_step,
        'val_mIoU': r['mIoU'], 'val_aAcc': r['aAcc'], 'val_mAcc': r['mAcc'], 'val_mDice': r['mDice'], **chance,
        'per_class': rows, 'stopped_early': result.stopped_early,
        **pretrain, 'lr': lr, 'batch_size': batch_size, 'digits_per_scene': list(per_scene),
        'class_weight': cfg['segmentation']['class_weight'],
        'train_seconds': round(train_seconds, 1), 'wall_seconds': round(time.time() - t0, 1),
        'cpu_seconds': round(time.process_time() - c0, 1),
        'threads': torch.get_num_threads(), 'data': str(data_root), 'weights': str(out_dir / 'last' / 'model.safetensors'),
    }
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics
