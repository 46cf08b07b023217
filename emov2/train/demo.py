"""``emov2 demo``: train an EMOv2 model on scikit-learn's bundled handwritten digits, on CPU, in minutes.

The data (1797 real 8x8 scans of the digits 0-9, shipped inside scikit-learn, nothing downloaded) is
upscaled to 32x32 (the model's smallest input), split stratified into train/test, lightly augmented
(small random affine warps) and fed to the same :class:`~emov2.train.engine.Trainer` as ImageNet
runs. The report folder gets training curves, a confusion matrix, a grid of test predictions,
``metrics.json``, the trained weights (``last/model.safetensors``, which record the demo's
preprocessing) and the held-out digits as PNG class folders (``test_images/``), so that
``emov2 eval --checkpoint runs/demo/last --data runs/demo/test_images`` scores what the demo reports.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import train_test_split
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .config import load_config
from .engine import Trainer
from .report import plot_confusion, plot_samples

__all__ = ['DigitsDataset', 'load_digits_split', 'demo_config', 'run_demo']

_log = logging.getLogger('emov2.train')
DIGIT_MEAN = (0.5, 0.5, 0.5)
DIGIT_STD = (0.5, 0.5, 0.5)
#: the demo model: EMOv2-1M's widths, heads and block design with fewer blocks per stage,
#: so that training fits in a few CPU minutes
DEMO_MODEL_KWARGS: Dict[str, Any] = {'depths': [1, 2, 2, 1]}


#: what DigitsDataset does to training images (recorded in the run's config.json)
AUGMENTATION = 'RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), shear=5), 8x8 -> 32x32 bilinear'


class DigitsDataset(Dataset):
    """8x8 digit images as normalised 3x32x32 tensors; ``train=True`` adds a small random affine warp.

    ``compose`` (optional, training only) turns the warped ink (1 x size x size in [0, 1]) into the
    RGB image (3 x size x size in [0, 1]) the model sees, e.g. the digit painted on a photograph."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, train: bool, size: int = 32,
                 compose: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> None:
        x = torch.as_tensor(images, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        self.images = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False).clamp(0, 1)
        self.labels = [int(v) for v in labels]
        self.train = train
        self.compose = compose if train else None
        self.classes = [str(i) for i in range(10)]
        if train:
            self.aug = v2.RandomAffine(degrees=10, translate=(0.08, 0.08), scale=(0.9, 1.1), shear=5)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = self.images[index]
        if self.train:
            img = self.aug(img)
        img = self.compose(img) if self.compose is not None else img.expand(3, -1, -1)
        img = (img - 0.5) / 0.5
        return img, self.labels[index]


def load_digits_split(test_fraction: float = 0.2, seed: int = 0, subset: Optional[int] = None):
    """``(train_x, train_y, test_x, test_y)``: a stratified split of sklearn's digits (optionally a subset)."""
    d = load_digits()
    x, y = d.images, d.target
    if subset is not None and subset < len(y):
        x, _, y, _ = train_test_split(x, y, train_size=subset, stratify=y, random_state=seed)
    return tuple(train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=seed)[i] for i in (0, 2, 1, 3))


def demo_config(out: str, epochs: int, batch_size: int = 64, model: str = 'emov2_1m',
                overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """The demo's recipe: the paper's optimiser and schedule shapes, sized for ~1.4k images."""
    return load_config(None, [
        f'model.name={model}', 'model.num_classes=10', 'model.drop_path_rate=0.0',
        f'model.kwargs={json.dumps(DEMO_MODEL_KWARGS)}',
        'data.img_size=32', f'data.mean={list(DIGIT_MEAN)}', f'data.std={list(DIGIT_STD)}', 'data.workers=0',
        'aug.auto_augment=null', 'aug.color_jitter=0.0', 'aug.hflip=0.0', 'aug.interpolation=bilinear',
        f'aug.custom={json.dumps(AUGMENTATION)}', 'eval.interpolation=bilinear', f'optim.batch_size={batch_size}', 'optim.lr=0.004',
        'optim.weight_decay=0.05', 'optim.label_smoothing=0.1', f'sched.epochs={epochs}',
        f'sched.warmup_epochs={min(2, max(epochs - 1, 0))}', 'sched.warmup_lr=1.0e-5', 'sched.min_lr=1.0e-5',
        'ema.decay=0.9', 'eval.batch_size=256', 'eval.crop_pct=1.0', 'eval.precise_bn_images=512', 'train.amp=false', f'train.out={out}', *overrides])


@torch.no_grad()
@torch.no_grad()
def _predict_all(model: torch.nn.Module, ds: DigitsDataset):
    """Class probabilities of every image, on the device the trained model is on (a GPU when there is one)."""
    model.eval()
    device = next(model.parameters()).device
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    prob = torch.cat([model(x[i:i + 256].to(device)).softmax(-1).cpu() for i in range(0, len(x), 256)])
    return prob.numpy()


def write_image_folder(ds: DigitsDataset, folder: Path) -> None:
    """The dataset's 32x32 images as grey PNGs in one folder per class (what ``emov2 eval`` reads)."""
    for i in range(len(ds)):
        d = folder / ds.classes[ds.labels[i]]
        d.mkdir(parents=True, exist_ok=True)
        pixels = (ds.images[i, 0].numpy() * 255.0).round().astype(np.uint8)
        Image.fromarray(pixels, mode='L').save(d / f'{i:04d}.png')


def run_demo(out: str = 'runs/demo', epochs: int = 12, subset: Optional[int] = None, seed: int = 0,
             batch_size: int = 64, progress: bool = True, overrides: Sequence[str] = (),
             overwrite: bool = False, compose: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
             ) -> Dict[str, Any]:
    """Train, evaluate on the held-out digits, write the report folder; returns the metrics.

    ``compose`` (optional) renders each training digit (see :class:`DigitsDataset`); the held-out
    digits stay plain, so the reported top-1 is always on the same test images."""
    t0 = time.time()
    out_dir = Path(out)
    tx, ty, vx, vy = load_digits_split(seed=seed, subset=subset)
    train_ds, test_ds = DigitsDataset(tx, ty, train=True, compose=compose), DigitsDataset(vx, vy, train=False)
    cfg = demo_config(str(out_dir), epochs, batch_size, overrides=[
        f'train.seed={seed}', f'train.progress={str(progress).lower()}', f'train.overwrite={str(overwrite).lower()}',
        *overrides])
    trainer = Trainer(cfg, train_ds, test_ds, class_names=train_ds.classes)
    result = trainer.fit()
    write_image_folder(test_ds, out_dir / 'test_images')
    # the final weights are reported (no choice made on the test set); the EMA's score is reported next to them
    prob = _predict_all(trainer.model, test_ds)
    pred = prob.argmax(1)
    acc = float((pred == np.asarray(vy)).mean() * 100)
    ema_acc = None
    if trainer.ema is not None:
        ema_acc = float((_predict_all(trainer.ema.module, test_ds).argmax(1) == np.asarray(vy)).mean() * 100)
    cm = confusion_matrix(vy, pred, labels=list(range(10)))
    names = train_ds.classes
    plot_confusion(cm, names, out_dir / 'confusion_matrix.png',
                   title=f'held-out digits: {acc:.1f}% top-1 ({len(vy)} images)')
    rng = np.random.default_rng(seed)
    wrong = np.flatnonzero(pred != np.asarray(vy))
    pick = np.concatenate([wrong[:8], rng.choice(np.flatnonzero(pred == np.asarray(vy)),
                                                 size=min(32 - min(len(wrong), 8), int((pred == vy).sum())),
                                                 replace=False)])
    plot_samples(np.asarray(vx)[pick] / 16.0, pred[pick].tolist(), np.asarray(vy)[pick].tolist(), names,
                 out_dir / 'samples.png', probs=prob[pick, pred[pick]].tolist())
    metrics = {
        'task': 'sklearn digits (8x8 upscaled to 32x32), 10 classes',
        'model': cfg['model']['name'], 'model_kwargs': cfg['model']['kwargs'],
        'params': sum(p.numel() for p in trainer.model.parameters()),
        'train_images': len(train_ds), 'test_images': len(test_ds), 'epochs': epochs,
        'test_top1': acc, 'test_top1_ema': ema_acc, 'stopped_early': result.stopped_early,
        'per_class_accuracy': {names[i]: float(cm[i, i] / max(cm[i].sum(), 1) * 100) for i in range(10)},
        'wall_seconds': round(time.time() - t0, 1), 'threads': torch.get_num_threads(),
        'weights': str(out_dir / 'last' / 'model.safetensors'),
        'test_image_folder': str(out_dir / 'test_images'),
    }
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics
