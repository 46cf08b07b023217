"""Training configuration: defaults, YAML recipes with inheritance and ``key=value`` overrides.

A recipe is a nested mapping (sections ``model``, ``data``, ``aug``, ``eval``, ``optim``, ``sched``,
``ema``, ``kd``, ``train``). A YAML file may name a parent with ``base: other.yaml`` (relative to
the file); its keys are merged on top. Overrides use dotted keys (``optim.batch_size=256``) whose
values are parsed as YAML, so ``null``, numbers, lists and booleans work. Unknown keys are errors:
a typo must never silently fall back to a default.
"""
from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional, Union

import yaml

__all__ = ['DEFAULTS', 'ConfigError', 'load_config', 'apply_overrides', 'merge', 'scaled_lrs']


class ConfigError(ValueError):
    """A recipe or override that does not fit the known keys."""


DEFAULTS: Dict[str, Any] = {
    'model': {
        'name': 'emov2_1m',
        'num_classes': 1000,
        'drop_path_rate': None,      # None: the variant's own default
        'window_size': 7,
        'pretrained': None,          # path to a checkpoint to fine-tune from (head re-initialised if shapes differ)
        'kwargs': {},                # extra keyword arguments for create_model (depths=, embed_dims=, ...)
    },
    'data': {
        'root': None,                # ImageNet layout: root/train/<class>/*.jpg, root/val/<class>/*.jpg
        'train_dir': 'train',
        'val_dir': 'val',
        'train_list': None,          # optional list file: "<relative path> <label>" per line
        'val_list': None,
        'class_names': None,         # optional file with one class name per line (for list files)
        'img_size': 224,
        'workers': 8,
        'pin_memory': True,
    },
    'aug': {
        'auto_augment': 'rand-m9-mstd0.5-inc1',
        'color_jitter': 0.4,
        'interpolation': 'random',
        'hflip': 0.5,
        'scale': [0.08, 1.0],
        'ratio': [0.75, 1.3333333333333333],
        're_prob': 0.0,
    },
    'eval': {
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'batch_size': 256,           # per process
        'every': 1,                  # evaluate every N epochs (0: never during training)
    },
    'optim': {
        'name': 'adamw',
        'batch_size': 1024,          # total over all processes
        'base_lr': 1.5e-3,           # per 512 images: lr = base_lr * batch_size / 512
        'lr': None,                  # absolute lr, overrides the scaling rule when set
        'betas': [0.9, 0.999],
        'eps': 1.0e-8,
        'weight_decay': 0.05,
        'clip_grad': 5.0,
        'label_smoothing': 0.1,
    },
    'sched': {
        'name': 'cosine',
        'epochs': 300,
        'warmup_epochs': 20,
        'warmup_lr': 5.0e-7,         # per 512 images, scaled like base_lr
        'min_lr': 5.0e-7,            # per 512 images, scaled like base_lr
    },
    'ema': {
        'enable': True,
        'decay': 0.9998,
    },
    'kd': {
        'teacher': None,             # timm name, or "tv:<name>" for a torchvision model
        'teacher_checkpoint': None,  # weights file for the teacher (nothing is downloaded)
        'tau': 1.0,
        'weight': 5.0,
        'teacher_mean': None,        # None: from the teacher's pretrained_cfg (ImageNet for torchvision)
        'teacher_std': None,
        'teacher_size': None,        # None: from the teacher's pretrained_cfg (224 for torchvision)
    },
    'train': {
        'seed': 0,
        'amp': True,
        'amp_dtype': 'auto',         # auto: bfloat16 on CPU, float16 on CUDA; or bfloat16 / float16
        'channels_last': True,       # NHWC weights and inputs (faster convs and window gathers)
        'device': 'auto',
        'sync_bn': False,
        'out': 'runs/train',
        'log_format': 'jsonl',       # jsonl or csv
        'tensorboard': False,
        'progress': True,
        'save_every_steps': 0,       # 0: checkpoint at epoch ends only
        'max_nonfinite': 5,          # consecutive NaN/inf losses tolerated before stopping
        'stop_after_steps': None,    # stop (saving a resumable checkpoint) after this many steps in total
    },
}


def merge(base: Mapping[str, Any], update: Mapping[str, Any], strict: bool = True, _path: str = '') -> Dict[str, Any]:
    """Deep-merge ``update`` into a copy of ``base``; with ``strict`` unknown keys raise ConfigError."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        where = f'{_path}{key}'
        if strict and key not in out:
            raise ConfigError(f'unknown config key: {where}')
        if isinstance(out.get(key), dict) and key != 'kwargs':
            if not isinstance(value, Mapping):
                raise ConfigError(f'config key {where} is a section, got {value!r}')
            out[key] = merge(out[key], value, strict, f'{where}.')
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path, seen: tuple = ()) -> Dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f'config inheritance loop at {path}')
    if not path.is_file():
        raise ConfigError(f'config file not found: {path}')
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f'{path} must hold a mapping')
    parent = data.pop('base', None)
    if parent is None:
        return data
    return merge(_read_yaml(path.parent / parent, seen + (path,)), data, strict=False)


def apply_overrides(cfg: Mapping[str, Any], overrides: Iterable[str]) -> Dict[str, Any]:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars or lists."""
    cfg = copy.deepcopy(dict(cfg))
    for item in overrides or ():
        if '=' not in item:
            raise ConfigError(f'override must look like key=value, got {item!r}')
        key, raw = item.split('=', 1)
        parts = key.strip().split('.')
        node = cfg
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node.get(part), dict):
                raise ConfigError(f'unknown config key: {".".join(parts[:i + 1])}')
            node = node[part]
        leaf = parts[-1]
        if leaf not in node and not (len(parts) >= 2 and parts[-2] == 'kwargs'):
            raise ConfigError(f'unknown config key: {key}')
        if isinstance(node.get(leaf), dict) and leaf != 'kwargs':
            raise ConfigError(f'{key} is a section; set one of its keys instead')
        node[leaf] = yaml.safe_load(raw) if raw.strip() else None
    return cfg


def load_config(
        path: Optional[Union[str, os.PathLike]] = None,
        overrides: Iterable[str] = (),
) -> Dict[str, Any]:
    """Defaults, then the recipe at ``path`` (if any), then ``overrides``; validated."""
    cfg = copy.deepcopy(DEFAULTS)
    if path is not None:
        cfg = merge(cfg, _read_yaml(Path(path)))
    cfg = apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


def _validate(cfg: Mapping[str, Any]) -> None:
    if cfg['train']['log_format'] not in ('jsonl', 'csv'):
        raise ConfigError('train.log_format must be jsonl or csv')
    if cfg['train']['amp_dtype'] not in ('auto', 'bfloat16', 'float16'):
        raise ConfigError('train.amp_dtype must be auto, bfloat16 or float16')
    if int(cfg['optim']['batch_size']) < 1 or int(cfg['sched']['epochs']) < 1:
        raise ConfigError('optim.batch_size and sched.epochs must be positive')
    if cfg['kd']['teacher'] and not cfg['kd']['teacher_checkpoint']:
        raise ConfigError('kd.teacher needs kd.teacher_checkpoint (teacher weights are never downloaded)')


def scaled_lrs(cfg: Mapping[str, Any]) -> Dict[str, float]:
    """Peak, warm-up start and floor learning rates after linear scaling by total batch / 512."""
    scale = float(cfg['optim']['batch_size']) / 512.0
    lr = cfg['optim']['lr']
    return {
        'lr': float(lr) if lr is not None else float(cfg['optim']['base_lr']) * scale,
        'warmup_lr': float(cfg['sched']['warmup_lr']) * scale,
        'min_lr': float(cfg['sched']['min_lr']) * scale,
    }
