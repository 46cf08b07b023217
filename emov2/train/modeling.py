"""Building the student: ``emov2.create_model`` (or timm's) plus fine-tuning from a checkpoint with a new head."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..factory import create_model, list_models, load_checkpoint

__all__ = ['create', 'build_model', 'model_preprocessing']


def create(name: str, **kwargs: Any) -> nn.Module:
    """``emov2.create_model`` for this package's models; any other timm model name goes to timm."""
    if name in list_models():
        return create_model(name, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != 'window_size'}
    return timm.create_model(name, pretrained=False, **kwargs)


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """The student described by ``cfg['model']``, initialised from ``model.pretrained`` if set (through
    the one loader: official files converted, a head of another size re-initialised)."""
    m = cfg['model']
    kwargs = dict(num_classes=int(m['num_classes']), window_size=int(m['window_size']),
                  drop_path_rate=m['drop_path_rate'], **dict(m.get('kwargs') or {}))
    model = create(m['name'], **kwargs)
    if m.get('pretrained'):
        load_checkpoint(model, m['pretrained'], variant=m['name'])
    return model


def model_preprocessing(name: str, cfg: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """How images are prepared for model ``name``: ``data.mean`` / ``data.std`` / ``eval.*`` of ``cfg``
    where set, else the model's pretrained config (ImageNet's for EMO models)."""
    pc = timm.models.get_pretrained_cfg(name)
    pc = pc.to_dict() if pc is not None else {}
    data, ev = (cfg or {}).get('data', {}), (cfg or {}).get('eval', {})
    return {
        'mean': tuple(data.get('mean') or pc.get('mean', IMAGENET_DEFAULT_MEAN)),
        'std': tuple(data.get('std') or pc.get('std', IMAGENET_DEFAULT_STD)),
        'interpolation': ev.get('interpolation') or pc.get('interpolation', 'bicubic'),
        'crop_pct': float(ev.get('crop_pct') or pc.get('crop_pct', 0.875)),
    }
