"""``emov2 generate demo``: class-conditional generation of scikit-learn's handwritten digits on CPU.

The real 8x8 digits (shipped with scikit-learn, nothing downloaded), split stratified 80/20 as in
the classification demo, are upsampled to 16x16 and scaled to [-1, 1] (pixel space). A D-EMO and a
plain DiT of similar size (small custom depth / width through the registered families' keyword
arguments) are trained one after the other by the shared :class:`~emov2.train.engine.Trainer`
with DiT's hybrid loss (learned variance), the same steps, batch and optimiser. Each model's EMA
then samples ``per_class`` digits of every class (DDPM with the learned variance, classifier-free
guidance), written as a grid PNG (one row per class).

Scores (:mod:`emov2.generation.metrics`): a classifier trained on the REAL training digits
(scikit-learn MLP on 8x8 pixels) labels the samples: its accuracy against the class asked for, and
the Fréchet distance of its hidden features to the real training digits' ("FD-digits", not FID).
The same numbers for the held-out real digits (ceiling) and for Gaussian noise (floor) are in
``metrics.json`` beside the models'.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from ..train.config import load_config
from ..train.demo import load_digits_split
from ..train.engine import Trainer
from .metrics import PixelMLPClassifier, generation_scores
from .task import GenerationTask

__all__ = ['DigitsGenerationDataset', 'DEMO_MODELS', 'demo_config', 'save_grid', 'save_images', 'sample_per_class',
           'run_generation_demo']

_log = logging.getLogger('emov2.train')

#: the two models compared: registered families with small custom sizes (params in docs/GENERATION.md)
DEMO_MODELS: Dict[str, Dict[str, Any]] = {
    'd_emov2': {'name': 'd_emov2_s_2', 'kwargs': {'hidden_size': 64, 'num_heads': 2, 'depth': 6,
                                                  'block_args': {'window_size': 4, 'exp_ratio': 2.0}}},
    'dit': {'name': 'dit_s_2', 'kwargs': {'hidden_size': 64, 'num_heads': 2, 'depth': 4}},
}


class DigitsGenerationDataset(Dataset):
    """sklearn's 8x8 digits as ``(1, size, size)`` tensors in [-1, 1] (bilinear upsampling), with labels."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], size: int = 16) -> None:
        x = torch.as_tensor(np.asarray(images), dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
        x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False).clamp(0, 1)
        self.images = x * 2.0 - 1.0
        self.labels = [int(v) for v in labels]
        self.classes = [str(i) for i in range(10)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        return self.images[index], self.labels[index]


def demo_config(out: str, model: str, epochs: int, size: int = 16, batch_size: int = 32, lr: float = 3e-3,
                warmup_epochs: int = 1, overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """DiT's recipe (AdamW, constant lr, no weight decay, hybrid loss, EMA) sized for ~1.4k digits and
    ~1.5k steps: DiT's lr 1e-4 (batch 256, 400K steps) leaves these tiny models unconditioned, so lr 3e-3
    after a one-epoch linear warm-up, and a faster EMA (0.999 with warm-up for 0.9999, whose averaging
    window would be longer than the run)."""
    spec = DEMO_MODELS[model]
    return load_config(None, [
        f'model.name={spec["name"]}', 'model.num_classes=10', f'model.kwargs={json.dumps(spec["kwargs"])}',
        f'diffusion.image_size={size}', 'diffusion.channels=1', 'diffusion.space=pixel', 'diffusion.hflip=0.0',
        'data.workers=0', f'optim.batch_size={batch_size}', f'optim.lr={lr}', 'optim.clip_grad=1.0',
        f'sched.epochs={epochs}', f'sched.warmup_epochs={warmup_epochs}',
        'ema.decay=0.999', 'ema.warmup=true', 'eval.batch_size=360',
        f'eval.every={max(1, epochs // 4)}', 'eval.precise_bn_images=512', 'train.amp=false',
        f'train.out={out}', *overrides], defaults=GenerationTask.defaults)


def save_grid(images: Tensor, rows: int, path: Path, scale: int = 3) -> None:
    """``images`` in [-1, 1] (row-major, ``rows`` rows) as one grey/RGB PNG with 1-px gaps."""
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    cols = -(-n // rows)
    grid = torch.full((c, rows * (h + 1) + 1, cols * (w + 1) + 1), 255, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[:, 1 + r * (h + 1):1 + r * (h + 1) + h, 1 + k * (w + 1):1 + k * (w + 1) + w] = x[i]
    arr = grid.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode='L' if c == 1 else 'RGB')
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)



def save_images(images: Tensor, folder: Path) -> None:
    """Each image in [-1, 1] as its own PNG (``00000.png`` ...), no border or scaling (for FID tools)."""
    folder.mkdir(parents=True, exist_ok=True)
    x = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu().permute(0, 2, 3, 1).numpy()
    for i, arr in enumerate(x):
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(folder / f'{i:05d}.png')


@torch.no_grad()
def sample_per_class(task: GenerationTask, model: torch.nn.Module, per_class: int, num_classes: int,
                     steps: int, cfg_scale: float, scheduler: str = 'ddpm', seed: int = 0,
                     batch_size: int = 500) -> tuple:
    """``(images, labels)``: ``per_class`` samples of each class, class-major, from one seed."""
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    gen = torch.Generator().manual_seed(seed)
    out = [task.sample(model, labels[i:i + batch_size], steps=steps, cfg_scale=cfg_scale, scheduler=scheduler,
                       generator=gen) for i in range(0, len(labels), batch_size)]
    return torch.cat(out).clamp(-1, 1), labels


def run_generation_demo(out: str = 'runs/generate_demo', epochs: int = 34, size: int = 16, per_class: int = 30,
                        steps: int = 50, cfg_scale: float = 4.0, scheduler: str = 'ddpm', seed: int = 0,
                        models: Sequence[str] = ('d_emov2', 'dit'), progress: bool = True,
                        overwrite: bool = False, threads: Optional[int] = None,
                        overrides: Sequence[str] = ()) -> Dict[str, Any]:
    """Train each model in ``models``, sample, score against the real / noise references; writes
    ``out/<model>/`` runs, ``samples_<model>.png``, ``real.png`` and ``metrics.json``. Times are wall
    seconds and the process's CPU seconds (with ``threads=1`` the latter is the time on one free core)."""
    if threads:
        torch.set_num_threads(threads)
    t_all, c_all = time.time(), time.process_time()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tx, ty, vx, vy = load_digits_split(seed=seed)
    train_ds, test_ds = DigitsGenerationDataset(tx, ty, size), DigitsGenerationDataset(vx, vy, size)
    clf = PixelMLPClassifier(size=8, hidden=64, seed=seed).fit(train_ds.images, train_ds.labels)
    reference = train_ds.images
    rows: Dict[str, Any] = {}
    vy = np.asarray(vy)  # held-out rows: the first per_class of each class (the same count as generated)
    held = np.concatenate([np.flatnonzero(vy == c)[:per_class] for c in range(10)])
    rows['real_heldout'] = generation_scores(clf, test_ds.images[held], vy[held].tolist(), reference,
                                             train_ds.classes)
    g = torch.Generator().manual_seed(seed + 1)
    noise_labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn((len(noise_labels), 1, size, size), generator=g).clamp(-1, 1)
    rows['noise'] = generation_scores(clf, noise, noise_labels.tolist(), reference, train_ds.classes)
    real_grid = torch.stack([test_ds.images[np.flatnonzero(vy == c)[:10]] for c in range(10)]).flatten(0, 1)
    save_grid(real_grid, 10, out_dir / 'real.png')
    timings: Dict[str, Any] = {}
    for key in models:
        cfg = demo_config(str(out_dir / key), key, epochs, size, overrides=[
            f'train.seed={seed}', f'train.progress={str(progress).lower()}',
            f'train.overwrite={str(overwrite).lower()}', *overrides])
        task = GenerationTask(cfg)
        t0, c0 = time.time(), time.process_time()
        trainer = Trainer(cfg, train_ds, test_ds, task=task)
        result = trainer.fit()
        t_train, c_train = time.time() - t0, time.process_time() - c0
        net = trainer.ema.module if trainer.ema is not None else trainer.model
        t0, c0 = time.time(), time.process_time()
        images, labels = sample_per_class(task, net, per_class, 10, steps, cfg_scale, scheduler, seed)
        t_sample, c_sample = time.time() - t0, time.process_time() - c0
        save_grid(images.view(10, per_class, *images.shape[1:])[:, :10].flatten(0, 1), 10,
                  out_dir / f'samples_{key}.png')
        scores = generation_scores(clf, images, labels.tolist(), reference, train_ds.classes)
        val = trainer.task.evaluate(net, [(test_ds.images, torch.tensor(test_ds.labels), 0)], torch.device('cpu'))
        rows[key] = {**scores, 'model': cfg['model']['name'], 'model_kwargs': cfg['model']['kwargs'],
                     'params': sum(p.numel() for p in net.parameters()),
                     'steps': result.global_step, 'val_loss_ema': val['loss'], 'val_mse_ema': val['mse'],
                     'train_seconds': round(t_train, 1), 'sample_seconds': round(t_sample, 1),
                     'train_cpu_seconds': round(c_train, 1), 'sample_cpu_seconds': round(c_sample, 1)}
        timings[key] = round(t_train + t_sample, 1)
        _log.info('%s: accuracy %.1f%%, FD-digits %.2f (%d steps, %.0f s)', key, scores['accuracy'], scores['fd'],
                  result.global_step, t_train + t_sample)
    metrics = {
        'task': f'sklearn digits, 8x8 upsampled to {size}x{size}, pixel space, 10 classes',
        'train_images': len(train_ds), 'heldout_images': len(test_ds), 'epochs': epochs,
        'sampler': scheduler, 'sample_steps': steps, 'cfg_scale': cfg_scale, 'per_class': per_class,
        'classifier': 'sklearn MLPClassifier(64 hidden) on 8x8 pooled real training digits; '
                      'FD-digits = Frechet distance of its hidden features to the real training digits (not FID)',
        'rows': rows, 'seconds_per_model': timings,
        'wall_seconds': round(time.time() - t_all, 1), 'cpu_seconds': round(time.process_time() - c_all, 1),
        'threads': torch.get_num_threads(),
    }
    (out_dir / 'metrics.json').write_text(json.dumps(metrics, indent=2))
    return metrics
