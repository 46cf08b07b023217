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
        'num_classes': None,         # None: the number of class folders / names of the training data
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
        'mean': None,                # None: the model's own (ImageNet for EMO); recorded in every checkpoint
        'std': None,
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
        'custom': None,              # description of augmentation a dataset passed in code applies itself
    },
    'eval': {
        'crop_pct': 0.875,
        'interpolation': 'bicubic',
        'batch_size': 256,           # per process
        'every': 1,                  # evaluate every N epochs (0: never during training)
        'precise_bn_images': 1024,   # BatchNorm statistics recomputed on this many training images before
                                     # each evaluation / epoch checkpoint (model and EMA); 0: off
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
        'warmup': True,              # decay ramps up as 1 - (1 + step)^-power (timm ModelEmaV3), capped at decay
        'warmup_power': 0.75,
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
        'max_nonfinite': 5,          # consecutive bad steps (NaN/inf loss, exploding update) before stopping
        'max_update_ratio': 1.0,     # a step changing the weights by more than this x their norm is undone
        'overwrite': False,          # a new run may replace a run already in train.out
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
        defaults: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """Defaults, then the recipe at ``path`` (if any), then ``overrides``; validated.

    ``defaults`` is a task's own defaults merged over :data:`DEFAULTS` (it may add sections, such
    as ``detection``, and change values, such as the optimiser's); the recipe and the overrides
    may then only set keys that exist.
    """
    cfg = copy.deepcopy(DEFAULTS)
    if defaults:
        cfg = merge(cfg, defaults, strict=False)
    if path is not None:
        cfg = merge(cfg, _read_yaml(Path(path)))
    cfg = apply_overrides(cfg, overrides)
    _validate(cfg)
    return cfg


_INTEGERS = {  # key: smallest allowed value
    'optim.batch_size': 1, 'sched.epochs': 1, 'sched.warmup_epochs': 0, 'data.img_size': 32, 'data.workers': 0,
    'eval.batch_size': 1, 'eval.every': 0, 'eval.precise_bn_images': 0, 'train.seed': 0,
    'train.save_every_steps': 0, 'train.max_nonfinite': 1, 'model.window_size': 1,
}
_NUMBERS = ('optim.lr', 'optim.base_lr', 'optim.weight_decay', 'optim.eps', 'optim.clip_grad',
            'optim.label_smoothing', 'sched.warmup_lr', 'sched.min_lr', 'ema.decay', 'ema.warmup_power',
            'train.max_update_ratio', 'model.drop_path_rate', 'eval.crop_pct')


def _get(cfg: Mapping[str, Any], key: str) -> Any:
    section, leaf = key.split('.')
    return cfg[section][leaf]


def _validate(cfg: Dict[str, Any]) -> None:
    """Types and ranges, each failure naming its key (``optim.batch_size=abc`` must not reach training)."""
    for key, low in _INTEGERS.items():
        v = _get(cfg, key)
        if v is None and key in ('train.save_every_steps',):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ConfigError(f'{key} must be an integer >= {low}, got {v!r}')
    for key in _NUMBERS:
        v = _get(cfg, key)
        if isinstance(v, str):  # YAML 1.1 reads "1e9" (no dot) as a string
            try:
                section, leaf = key.split('.')
                cfg[section][leaf] = v = float(v)
            except ValueError:
                pass
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f'{key} must be a number, got {v!r}')
    ratio = cfg['train']['max_update_ratio']
    if ratio is not None and not ratio > 0:
        raise ConfigError(f'train.max_update_ratio must be positive (or null: no update check), got {ratio!r}')
    n = cfg['model']['num_classes']
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f'model.num_classes must be a positive integer (or null: from the data), got {n!r}')
    for key in ('data.mean', 'data.std'):
        v = _get(cfg, key)
        if v is not None and (not isinstance(v, list) or len(v) != 3
                              or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
            raise ConfigError(f'{key} must be a list of 3 numbers (or null), got {v!r}')
    if cfg['data']['std'] and any(x <= 0 for x in cfg['data']['std']):
        raise ConfigError(f'data.std must be positive, got {cfg["data"]["std"]!r}')
    if cfg['train']['log_format'] not in ('jsonl', 'csv'):
        raise ConfigError('train.log_format must be jsonl or csv')
    if cfg['train']['amp_dtype'] not in ('auto', 'bfloat16', 'float16'):
        raise ConfigError('train.amp_dtype must be auto, bfloat16 or float16')
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
