"""Evaluating and using trained models: ``eval`` (top-1/top-5 of a model and its EMA) and ``predict``.

Project checkpoints carry their variant, class names and the preprocessing they were trained with
(size, crop, interpolation, mean/std) in safetensors metadata, and eval/predict use exactly that;
their EMA weights sit next to them (``ema.safetensors`` in a checkpoint set). A checkpoint argument
may be a run folder (its best set, else its last), a set folder or a file. Official checkpoints hold
the EMA in the same file (``net_E``). Either kind works here.
"""
from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageNetInfo, create_transform

from ..checkpoint import CheckpointError, read_metadata, read_state_dict
from ..factory import list_models, load_checkpoint
from .data import ListDataset, SafeImageFolder, _load_rgb, collate_skip
from .task import evaluate_classifier
from .modeling import create
from .state import EMA_FILE, MODEL_FILE, linked_set

__all__ = ['ema_path_for', 'resolve_weights', 'load_model', 'eval_transform', 'evaluate_checkpoint', 'predict',
           'imagenet_class_names', 'imagenet_wnids', 'resolve_device']


def resolve_weights(checkpoint: str) -> Path:
    """The weights file a checkpoint argument names: a file, a set folder (its ``model.safetensors``)
    or a run folder (its ``best`` set, else its ``last``)."""
    p = Path(checkpoint)
    if not p.exists():
        raise CheckpointError(f'checkpoint not found: {p}')
    if p.is_dir():
        for folder in (linked_set(p, 'best'), linked_set(p, 'last'), p):
            if folder is not None and (folder / MODEL_FILE).is_file():
                return folder / MODEL_FILE
        raise CheckpointError(f'{p} is a folder without a checkpoint (expected {MODEL_FILE}, or a run folder '
                              'with a "best" or "last" checkpoint)')
    return p


def ema_path_for(checkpoint: str) -> Optional[Path]:
    """Where a project checkpoint's EMA weights live, if present: ``ema.safetensors`` beside a set's
    ``model.safetensors`` (or ``x_ema.safetensors`` beside ``x.safetensors`` in the older layout)."""
    p = Path(checkpoint)
    if p.suffix != '.safetensors':
        return None
    cand = p.with_name(EMA_FILE) if p.name == MODEL_FILE else p.with_name(p.stem + '_ema' + p.suffix)
    return cand if cand.is_file() else None


def imagenet_class_names(num_classes: int = 1000) -> List[str]:
    """Human-readable ImageNet-1k class names as shipped by timm."""
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(num_classes)]


def imagenet_wnids() -> List[str]:
    """ImageNet-1k WordNet ids (``n01440764`` ...): the class folder names of an ImageNet val split."""
    info = ImageNetInfo()
    return [info.index_to_label_name(i) for i in range(1000)]


def resolve_device(device: str) -> torch.device:
    """``torch.device(device)``, or a clear error when it does not exist here."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f'unknown device {device!r} ({e})') from e
    if dev.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f'device {device!r}: no CUDA device here (torch.cuda.is_available() is False); '
                             'use --device cpu')
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f'device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here')
    elif dev.type not in ('cpu', 'mps'):
        raise ValueError(f'device {device!r} is not supported here; use cpu or cuda')
    return dev


def load_model(checkpoint: str, model: Optional[str] = None, use_ema: bool = False,
               num_classes: Optional[int] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model a checkpoint describes (or ``model``) and load its (EMA) weights, in eval mode.

    Returns ``(model, metadata)``; metadata gains ``class_names`` (ImageNet names for 1000 classes
    when the file has none).
    """
    checkpoint = str(resolve_weights(checkpoint))
    meta = read_metadata(checkpoint)
    name = model or meta.get('variant')
    if not name:
        raise CheckpointError(f'{checkpoint} does not say which model it holds; pass --model')
    if name not in list_models() and name not in timm.list_models():
        close = difflib.get_close_matches(name, sorted(set(list_models()) | set(timm.list_models())), n=3)
        raise ValueError(f'unknown model {name!r}' + (f'; did you mean {", ".join(close)}?' if close else '')
                         + f' (EMO models: {", ".join(list_models())})')
    path = checkpoint
    if use_ema and meta and not meta.get('ema'):
        ema = ema_path_for(checkpoint)
        if ema is None:
            raise CheckpointError(f'no EMA weights next to {checkpoint}')
        path = str(ema)
    if num_classes is None:
        num_classes = int(meta.get('num_classes') or 0) or _head_classes(path, use_ema) or 1000
    kwargs = dict(meta.get('model_kwargs') or {})
    kwargs.setdefault('window_size', int(meta.get('window_size', 7)))
    net = create(name, num_classes=num_classes, **kwargs)
    load_checkpoint(net, path, use_ema=use_ema and not meta, variant=name, head='strict')
    net.eval()
    meta = dict(meta)
    names = meta.get('class_names')
    meta['class_names_known'] = bool(names) or num_classes == 1000
    if not names:
        names = imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]
        if num_classes == 1000:  # an ImageNet model: folders are named by WordNet id
            meta['class_folders'] = imagenet_wnids()
    meta['class_names'] = list(names)
    meta.setdefault('variant', name)
    return net, meta


def _head_classes(path: str, use_ema: bool) -> Optional[int]:
    sd, _ = read_state_dict(path, use_ema=use_ema)
    for key in ('head.weight', 'head.fc.weight', 'fc.weight', 'classifier.weight'):
        if key in sd:
            return int(sd[key].shape[0])
    return None


def eval_transform(model: nn.Module, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                   meta: Optional[Dict[str, Any]] = None):
    """Resize the shorter side to ``size / crop_pct``, centre-crop, normalise: the preprocessing the
    checkpoint records (``meta``), else the model's pretrained config; arguments override both."""
    pc = dict(getattr(model, 'pretrained_cfg', None) or {})
    meta = meta or {}
    size = int(img_size or meta.get('img_size') or pc.get('input_size', (3, 224, 224))[-1])
    crop_pct = crop_pct or meta.get('crop_pct') or pc.get('crop_pct', 0.875)
    return create_transform(size, is_training=False, crop_pct=crop_pct,
                            interpolation=meta.get('interpolation') or pc.get('interpolation', 'bicubic'),
                            mean=tuple(meta.get('mean') or pc.get('mean', IMAGENET_DEFAULT_MEAN)),
                            std=tuple(meta.get('std') or pc.get('std', IMAGENET_DEFAULT_STD)))


def evaluate_checkpoint(checkpoint: str, data: str, model: Optional[str] = None, batch_size: int = 128,
                        workers: int = 4, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                        list_file: Optional[str] = None, device: str = 'cpu') -> Dict[str, Any]:
    """``{'model': metrics, 'ema': metrics or None}`` on ``data`` (a folder of class folders, or
    one with a ``val/`` split, or a root for ``list_file``)."""
    dev = resolve_device(device)
    root = Path(data)
    if not root.is_dir():
        raise ValueError(f'data folder not found: {root}')
    results: Dict[str, Any] = {'checkpoint': str(checkpoint), 'model': None, 'ema': None}
    for key, use_ema in (('model', False), ('ema', True)):
        try:
            net, meta = load_model(checkpoint, model, use_ema=use_ema)
        except CheckpointError:
            if use_ema:
                continue
            raise
        tf = eval_transform(net, img_size, crop_pct, meta)
        if list_file:
            ds = ListDataset(str(root), list_file, tf)
        else:
            folder = str(root / 'val') if (root / 'val').is_dir() else str(root)
            if meta['class_names_known']:  # labels by class name, never by folder position
                ds = SafeImageFolder(folder, tf, class_names=meta.get('class_folders') or meta['class_names'])
            else:
                ds = SafeImageFolder(folder, tf)
                _check_classes(ds.classes, meta['class_names'], checkpoint)
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip)
        results[key] = evaluate_classifier(net.to(dev), loader, dev)
        results['variant'] = meta['variant']
    return results


def _check_classes(folders: Sequence[str], names: Sequence[str], checkpoint: str) -> None:
    """For checkpoints without class names only: folders map to labels in sorted order, so their
    number must equal the model's classes (a missing folder would shift every label after it)."""
    if len(folders) != len(names):
        raise ValueError(f'{checkpoint} does not record class names, so class folders are matched by sorted '
                         f'position, which needs exactly {len(names)} folders; the data has {len(folders)}')


@torch.no_grad()
def predict(images: Sequence[str], checkpoint: str, model: Optional[str] = None, topk: int = 5,
            use_ema: bool = False, img_size: Optional[int] = None, device: str = 'cpu') -> List[Dict[str, Any]]:
    """Top-k ``(class name, probability)`` for each image path; unreadable images get an ``error``."""
    if topk < 1:
        raise ValueError(f'topk must be at least 1, got {topk}')
    dev = resolve_device(device)
    net, meta = load_model(checkpoint, model, use_ema=use_ema)
    net.to(dev)
    tf = eval_transform(net, img_size, None, meta)
    names = meta['class_names']
    out: List[Dict[str, Any]] = []
    for path in images:
        try:
            x = tf(_load_rgb(str(path))).unsqueeze(0).to(dev)
        except Exception as e:
            out.append({'image': str(path), 'error': f'{type(e).__name__}: {e}'})
            continue
        prob = net(x).float().softmax(-1)[0]
        p, idx = prob.topk(min(topk, prob.numel()))
        out.append({'image': str(path), 'top': [(names[int(i)], float(v)) for v, i in zip(p, idx)]})
    return out


def dump(obj: Any) -> str:
    """JSON text of a result (for ``--json``)."""
    return json.dumps(obj, indent=2)
