"""Evaluating and using trained models: ``eval`` (top-1/top-5 of a model and its EMA) and ``predict``.

Project checkpoints carry their variant, classes and class names in safetensors metadata; their EMA
weights sit next to them as ``<name>_ema.safetensors``. Official checkpoints hold the EMA in the same
file (``net_E``). Either kind works here.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..checkpoint import CheckpointError, read_metadata, read_state_dict
from .data import ListDataset, SafeImageFolder, _load_rgb, collate_skip
from .evaluate import evaluate
from .modeling import create, load_pretrained

__all__ = ['ema_path_for', 'load_model', 'eval_transform', 'evaluate_checkpoint', 'predict', 'imagenet_class_names']


def ema_path_for(checkpoint: str) -> Optional[Path]:
    """Where a project checkpoint's EMA weights live (``x.safetensors`` -> ``x_ema.safetensors``), if present."""
    p = Path(checkpoint)
    cand = p.with_name(p.stem + '_ema' + p.suffix)
    return cand if p.suffix == '.safetensors' and cand.is_file() else None


def imagenet_class_names(num_classes: int = 1000) -> List[str]:
    """Human-readable ImageNet-1k class names as shipped by timm."""
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i) for i in range(num_classes)]


def load_model(checkpoint: str, model: Optional[str] = None, use_ema: bool = False,
               num_classes: Optional[int] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model a checkpoint describes (or ``model``) and load its (EMA) weights, in eval mode.

    Returns ``(model, metadata)``; metadata gains ``class_names`` (ImageNet names for 1000 classes
    when the file has none).
    """
    meta = read_metadata(checkpoint)
    name = model or meta.get('variant')
    if not name:
        raise CheckpointError(f'{checkpoint} does not say which model it holds; pass --model')
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
    import emov2
    if name in emov2.list_models():
        emov2.load_checkpoint(net, path, use_ema=use_ema and not meta)
    else:
        load_pretrained(net, path, use_ema=use_ema and not meta)
    net.eval()
    meta = dict(meta)
    names = meta.get('class_names')
    if not names:
        names = imagenet_class_names() if num_classes == 1000 else [str(i) for i in range(num_classes)]
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
    """Resize the shorter side to ``size / crop_pct`` (bicubic), centre-crop, normalise (model's mean/std)."""
    from timm.data import create_transform
    pc = dict(getattr(model, 'pretrained_cfg', None) or {})
    meta = meta or {}
    size = int(img_size or meta.get('img_size') or pc.get('input_size', (3, 224, 224))[-1])
    crop_pct = crop_pct or meta.get('crop_pct') or pc.get('crop_pct', 0.875)
    return create_transform(size, is_training=False, crop_pct=crop_pct,
                            interpolation=pc.get('interpolation', 'bicubic'),
                            mean=tuple(meta.get('mean') or pc.get('mean', (0.485, 0.456, 0.406))),
                            std=tuple(meta.get('std') or pc.get('std', (0.229, 0.224, 0.225))))


def evaluate_checkpoint(checkpoint: str, data: str, model: Optional[str] = None, batch_size: int = 128,
                        workers: int = 4, img_size: Optional[int] = None, crop_pct: Optional[float] = None,
                        list_file: Optional[str] = None, device: str = 'cpu') -> Dict[str, Any]:
    """``{'model': metrics, 'ema': metrics or None}`` on ``data`` (a folder of class folders, or
    one with a ``val/`` split, or a root for ``list_file``)."""
    dev = torch.device(device)
    results: Dict[str, Any] = {'checkpoint': str(checkpoint), 'model': None, 'ema': None}
    for key, use_ema in (('model', False), ('ema', True)):
        try:
            net, meta = load_model(checkpoint, model, use_ema=use_ema)
        except CheckpointError:
            if use_ema:
                continue
            raise
        tf = eval_transform(net, img_size, crop_pct, meta)
        root = Path(data)
        if list_file:
            ds = ListDataset(str(root), list_file, tf)
        else:
            ds = SafeImageFolder(str(root / 'val') if (root / 'val').is_dir() else str(root), tf)
            _check_classes(ds.classes, meta['class_names'])
        loader = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate_skip)
        results[key] = evaluate(net.to(dev), loader, dev)
        results['variant'] = meta['variant']
    return results


def _check_classes(folders: Sequence[str], names: Sequence[str]) -> None:
    """Folder classes map to label indices in sorted order; they must not outnumber the model's classes."""
    if len(folders) > len(names):
        raise ValueError(f'the data has {len(folders)} class folders but the model {len(names)} classes')


@torch.no_grad()
def predict(images: Sequence[str], checkpoint: str, model: Optional[str] = None, topk: int = 5,
            use_ema: bool = False, img_size: Optional[int] = None) -> List[Dict[str, Any]]:
    """Top-k ``(class name, probability)`` for each image path; unreadable images get an ``error``."""
    net, meta = load_model(checkpoint, model, use_ema=use_ema)
    tf = eval_transform(net, img_size, None, meta)
    names = meta['class_names']
    out: List[Dict[str, Any]] = []
    for path in images:
        try:
            x = tf(_load_rgb(str(path))).unsqueeze(0)
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
