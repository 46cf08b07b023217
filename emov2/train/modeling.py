"""Building the student: ``emov2.create_model`` plus fine-tuning from a checkpoint with a new head."""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Mapping, Optional, Tuple

import timm
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..checkpoint import CheckpointError, read_state_dict

__all__ = ['create', 'build_model', 'load_pretrained', 'model_preprocessing']

_log = logging.getLogger('emov2.train')


def create(name: str, **kwargs: Any) -> nn.Module:
    """``emov2.create_model`` for EMOv2/EMO names; any other timm model name goes to timm."""
    import timm
    import emov2
    if name in emov2.list_models():
        return emov2.create_model(name, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if v is not None and k != 'window_size'}
    return timm.create_model(name, pretrained=False, **kwargs)


def load_pretrained(model: nn.Module, path: str, use_ema: bool = False) -> Tuple[List[str], Dict[str, Any]]:
    """Load weights for fine-tuning; tensors whose shape differs (the old head) are left initialised.

    Returns the names that were not loaded and the checkpoint's metadata. Fails if anything other
    than mismatched tensors is missing: a checkpoint for another architecture is an error.
    """
    sd, meta = read_state_dict(path, use_ema=use_ema)
    own = model.state_dict()
    skipped = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    sd = {k: v for k, v in sd.items() if k not in skipped}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in skipped]
    if missing or unexpected:
        raise CheckpointError(f'{path} does not fit the model: missing {missing[:5]}, unexpected {list(unexpected)[:5]}')
    if skipped:
        _log.info('fine-tuning: re-initialised %s (shape differs from %s)', ', '.join(skipped), path)
    return skipped, meta


def build_model(cfg: Mapping[str, Any]) -> nn.Module:
    """The student described by ``cfg['model']`` (optionally initialised from ``model.pretrained``)."""
    m = cfg['model']
    kwargs = dict(num_classes=int(m['num_classes']), window_size=int(m['window_size']),
                  drop_path_rate=m['drop_path_rate'], **dict(m.get('kwargs') or {}))
    import emov2
    if m.get('pretrained') and m['name'] in emov2.list_models():
        # the project's loader converts official files and re-initialises a head of another size
        return emov2.create_model(m['name'], checkpoint=m['pretrained'], **kwargs)
    model = create(m['name'], **kwargs)
    if m.get('pretrained'):
        load_pretrained(model, m['pretrained'])
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
