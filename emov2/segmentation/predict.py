"""Using trained segmenters: label PNGs and colour overlays for images, and evaluation of a checkpoint.

A segmentation checkpoint set written by the trainer records what it needs in its metadata
(:meth:`SegmentationTask.checkpoint_meta`): the segmenter (kind, backbone, width, window, backbone
arguments), class names and palette, normalisation, the test-time resize and the inference mode
(whole / slide with crop and stride). :func:`load_segmenter` rebuilds the model from it and loads the
weights through the one loader, :func:`emov2.factory.load_checkpoint` (``head='strict'``: every tensor
must fit). A checkpoint argument is a run folder (its best set, else last), a set folder or a file;
``use_ema`` takes ``ema.safetensors`` beside it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from ..checkpoint import CheckpointError, read_metadata
from ..factory import load_checkpoint
from ..train.inference import ema_path_for, resolve_device, resolve_weights
from .data import (LAYOUTS, SegmentationDataset, collate_segmentation, default_palette, eval_transform,
                   find_samples)
from .inference import segment_logits
from .models import create_segmenter
from .task import evaluate_segmenter

__all__ = ['colorize', 'overlay', 'load_segmenter', 'predict_images', 'evaluate_checkpoint']


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]]) -> Image.Image:
    """A palette ('P' mode) PNG image whose pixel values are the class indices (255, ignore, black)."""
    label = np.asarray(label)
    if label.ndim != 2 or label.size and (label.min() < 0 or label.max() > 255):
        raise ValueError(f'label map must be 2-D with values 0..255, got shape {label.shape}')
    im = Image.fromarray(label.astype(np.uint8), mode='P')
    flat = [0] * 768
    for i, rgb in enumerate(list(palette)[:255]):
        flat[3 * i:3 * i + 3] = [int(c) for c in rgb]
    im.putpalette(flat)
    return im


def overlay(image: Image.Image, label: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5,
            skip: Sequence[int] = (255,)) -> Image.Image:
    """``image`` with each labelled pixel blended ``alpha`` towards its class colour (``skip`` labels untouched)."""
    img = np.asarray(image.convert('RGB'), dtype=np.float32)
    label = np.asarray(label)
    colours = np.zeros((256, 3), np.float32)
    colours[:min(len(palette), 256)] = np.asarray(palette, np.float32)[:256]
    blend = np.full(label.shape, alpha, np.float32)
    blend[np.isin(label, list(skip))] = 0.0
    out = img * (1 - blend[..., None]) + colours[label.clip(0, 255)] * blend[..., None]
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def load_segmenter(checkpoint: str, use_ema: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model in eval mode, metadata)`` of a segmentation checkpoint written by the trainer."""
    path = resolve_weights(checkpoint)
    meta = read_metadata(path)
    if meta.get('task') != 'segmentation':
        raise CheckpointError(f'{path} is not a segmentation checkpoint (task {meta.get("task")!r}); '
                              'use a checkpoint written by emov2 segment train')
    if use_ema:
        ema = ema_path_for(str(path))
        if ema is None:
            raise CheckpointError(f'no EMA weights next to {path} (the run had ema.enable false)')
        path = ema
    model = create_segmenter(meta['kind'], meta['backbone'], int(meta['num_classes']), None,
                             channels=meta.get('channels'), window_size=int(meta.get('window_size', 10)),
                             **dict(meta.get('model_kwargs') or {}))
    load_checkpoint(model, path, variant=meta.get('variant'), head='strict')
    model.eval()
    meta = dict(meta)
    meta['class_names'] = list(meta.get('class_names') or [str(i) for i in range(int(meta['num_classes']))])
    meta['palette'] = meta.get('palette') or default_palette(int(meta['num_classes']))
    meta['weights'] = str(path)
    return model, meta


def _unpainted(class_names: Sequence[str]) -> Tuple[int, ...]:
    """Labels an overlay leaves as they are: the ignore index, and class 0 when it is 'background'."""
    return (0, 255) if class_names and str(class_names[0]).lower() == 'background' else (255,)


def _unique_name(stem: str, used: Dict[str, int]) -> str:
    n = used.get(stem, 0)
    used[stem] = n + 1
    return stem if n == 0 else f'{stem}_{n}'


@torch.no_grad()
def predict_images(images: Sequence[str], checkpoint: str, out_dir: str, use_ema: bool = False,
                   device: str = 'cpu', mode: Optional[str] = None, alpha: float = 0.5) -> List[Dict[str, Any]]:
    """For each image: ``<out>/<stem>.png`` (label PNG with the palette, values = class indices) and
    ``<out>/<stem>_overlay.png``; returns ``{'image', 'label', 'overlay', 'classes'}`` per image
    (``classes``: share of pixels per predicted class, largest first) or ``{'image', 'error'}``."""
    dev = resolve_device(device)
    model, meta = load_segmenter(checkpoint, use_ema)
    model.to(dev)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tf = eval_transform(meta.get('eval_scale'), meta['mean'], meta['std'])
    mode = mode or meta.get('mode', 'whole')
    names, palette = meta['class_names'], meta['palette']
    used: Dict[str, int] = {}
    results: List[Dict[str, Any]] = []
    for path in images:
        try:
            with Image.open(path) as im:
                rgb = im.convert('RGB')
        except Exception as e:  # PIL raises many types for bad files
            results.append({'image': str(path), 'error': f'{type(e).__name__}: {e}'})
            continue
        x = tf(tv_tensors.Image(TF.pil_to_tensor(rgb))).unsqueeze(0).to(dev)
        logits = segment_logits(model, x, mode, meta.get('crop_size'), meta.get('stride'),
                                out_size=(rgb.height, rgb.width))
        label = logits.argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = _unique_name(Path(path).stem, used)
        label_path, overlay_path = out / f'{stem}.png', out / f'{stem}_overlay.png'
        colorize(label, palette).save(label_path)
        overlay(rgb, label, palette, alpha, skip=_unpainted(names)).save(overlay_path)
        counts = np.bincount(label.reshape(-1), minlength=len(names))
        order = np.argsort(-counts)
        shares = {names[i]: round(float(counts[i]) / label.size * 100, 2) for i in order if counts[i]}
        results.append({'image': str(path), 'label': str(label_path), 'overlay': str(overlay_path), 'classes': shares})
    return results


def evaluate_checkpoint(checkpoint: str, data: str, layout: Optional[str] = None, split_dir: Optional[str] = None,
                        device: str = 'cpu', workers: int = 2, mode: Optional[str] = None,
                        include_ema: bool = True) -> Dict[str, Any]:
    """mIoU/aAcc/mAcc/mDice and the per-class table of a checkpoint (and its EMA weights, if any) on
    the validation split of ``data`` (the checkpoint's layout unless given; for the folder layout a
    folder holding ``images/`` and ``masks/`` itself works too). Bad samples are skipped and counted."""
    dev = resolve_device(device)
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f'data folder not found: {root}')
    results: Dict[str, Any] = {'checkpoint': str(checkpoint), 'data': str(root), 'model': None, 'ema': None}
    for key, use_ema in (('model', False), ('ema', True)):
        if use_ema and not include_ema:
            continue
        try:
            model, meta = load_segmenter(checkpoint, use_ema)
        except CheckpointError:
            if use_ema:
                continue
            raise
        lay = layout or meta.get('layout') or 'folder'
        if lay not in LAYOUTS:
            raise ValueError(f'layout must be one of {", ".join(LAYOUTS)}, got {lay!r}')
        val_dir = split_dir or ('.' if lay == 'folder' and (root / 'images').is_dir() else 'val')
        samples, missing = find_samples(str(root), lay, 'val', split_dirs={'train': 'train', 'val': val_dir})
        n = int(meta['num_classes'])
        ds = SegmentationDataset(samples, eval_transform(meta.get('eval_scale'), meta['mean'], meta['std']), False, n,
                                 meta['class_names'], int(meta.get('ignore_index', 255)),
                                 bool(meta.get('reduce_zero_label')), binary=lay == 'hrf', problems=missing)
        if not len(ds):
            raise ValueError(f'no usable validation samples under {root} ({lay} layout; {ds.skipped} skipped)')
        loader = DataLoader(ds, batch_size=1, num_workers=workers, collate_fn=collate_segmentation)
        r = evaluate_segmenter(model.to(dev), loader, dev, n, meta['class_names'], int(meta.get('ignore_index', 255)),
                               mode or meta.get('mode', 'whole'), meta.get('crop_size'), meta.get('stride'))
        r['skipped'] += ds.skipped
        results[key] = r
        results['variant'] = meta.get('variant')
    return results
