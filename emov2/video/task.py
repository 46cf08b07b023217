"""Video classification as a :class:`~emov2.train.task.Task`: V-EMO on clips, multi-view evaluation.

Training batches are clips ``(B, 3, T, H, W)``; validation batches hold every view of each video
``(B, clips * crops, 3, T, H, W)``, whose logits are averaged per video before top-1/top-5 and the
loss are counted, so the unit of the metrics is the video, not the clip (the paper's K400 protocol:
4 clips x 3 crops).

Defaults follow the paper's Kinetics recipe (AdamW, lr 1e-4 at batch 256 written as ``optim.base_lr``
2e-4 per 512, weight decay 0.05, 200 epochs with 30 of warm-up then cosine, gradient clipping 20,
160 px, 4 uniformly sampled frames: the size at which V-EMO-5M is 5.9M params / 1.3 GFLOPs).
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from ..train.config import ConfigError
from ..train.distributed import all_reduce_sum
from ..train.modeling import build_model
from ..train.task import ClassificationTask, accuracy_counts
from .data import ClipSampling, build_video_datasets

__all__ = ['VideoTask', 'VIDEO_DEFAULTS', 'evaluate_video', 'check_video_config', 'video_meta_sampling']

VIDEO_DEFAULTS: Dict[str, Any] = {
    'model': {'name': 'v_emov2_5m', 'window_size': 5},   # an int window is the spatial one: 2 x 5 x 5
    'data': {'img_size': 160, 'workers': 4},
    'aug': {'auto_augment': None, 'color_jitter': 0.0, 'scale': [0.08, 1.0], 'hflip': 0.5,
            'interpolation': 'bilinear'},
    'eval': {'crop_pct': 1.0, 'interpolation': 'bilinear', 'batch_size': 8, 'precise_bn_images': 256},
    'optim': {'batch_size': 256, 'base_lr': 2.0e-4, 'weight_decay': 0.05, 'clip_grad': 20.0},
    'sched': {'epochs': 200, 'warmup_epochs': 30},
    'train': {'channels_last': False},  # 5D clips: the trainer's channels-last is 2D only
    'video': {
        'num_frames': 4,            # frames per clip
        'sampling': 'uniform',      # uniform: one frame per segment (TSN); dense: frame_stride apart
        'frame_stride': 4,          # dense sampling only
        'clips': 4,                 # temporal views per video at evaluation
        'crops': 3,                 # spatial views per clip at evaluation (1 or 3)
        'min_frames': None,         # shorter videos are skipped and counted (None: num_frames)
        'layout': 'auto',           # auto | folders (root/train/<class>/...) | list (data.train_list)
        'grad_checkpointing': False,  # recompute stages in the backward pass (less memory)
    },
}


def check_video_config(cfg: Mapping[str, Any]) -> ClipSampling:
    """The ``video:`` section's values checked (a :class:`ConfigError` names the key); its sampling."""
    v = cfg.get('video')
    if not isinstance(v, Mapping):
        raise ConfigError('the config has no video section (load it with defaults=VideoTask.defaults)')
    if v['layout'] not in ('auto', 'folders', 'list'):
        raise ConfigError(f"video.layout must be auto, folders or list, got {v['layout']!r}")
    if not isinstance(v['grad_checkpointing'], bool):
        raise ConfigError(f"video.grad_checkpointing must be true or false, got {v['grad_checkpointing']!r}")
    if cfg['aug']['auto_augment'] or cfg['aug']['color_jitter']:
        raise ConfigError('aug.auto_augment / aug.color_jitter are image augmentations the video task does not '
                          'apply; set them to null / 0 (clips get random resized crops and flips)')
    try:
        return ClipSampling.from_config(v)
    except ValueError as e:
        raise ConfigError(str(e)) from e


@torch.no_grad()
def evaluate_video(model: nn.Module, loader: Iterable, device: torch.device,
                   amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """``{'top1', 'top5', 'loss', 'n', 'skipped', 'views'}`` with logits averaged over each video's
    views (batches ``(B, V, 3, T, H, W)``; plain clips ``(B, 3, T, H, W)`` count as one view)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # top1, top5, loss, videos, skipped
    views = 0
    for batch in loader:
        clips, target, skipped = batch if len(batch) == 3 else (*batch, 0)
        sums[4] += skipped
        if clips.numel() == 0:
            continue
        if clips.dim() == 5:
            clips = clips.unsqueeze(1)
        b, views = clips.shape[:2]
        clips, target = clips.to(device, non_blocking=True), target.to(device, non_blocking=True)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            logits = model(clips.flatten(0, 1))
        logits = logits.float().view(b, views, -1).mean(1)
        c = accuracy_counts(logits, target)
        sums[0] += c[1]
        sums[1] += c[5]
        sums[2] += float(F.cross_entropy(logits, target, reduction='sum'))
        sums[3] += b
    if device.type == 'cuda':
        sums = sums.to(device)
    sums = all_reduce_sum(sums).cpu()
    model.train(was_training)
    n = max(float(sums[3]), 1.0)
    return {'top1': 100.0 * float(sums[0]) / n, 'top5': 100.0 * float(sums[1]) / n, 'loss': float(sums[2]) / n,
            'n': int(sums[3]), 'skipped': int(sums[4]), 'views': int(views)}


class VideoTask(ClassificationTask):
    """Video classification with V-EMO on the shared trainer (loss, training counts, class binding and
    resume checks as for images; clip data, multi-view evaluation and the model differ).

    ``model.pretrained`` may name a 2D EMOv2 checkpoint (official ``.pth`` or ours): the one loader
    (:func:`emov2.factory.load_checkpoint`) inflates it along time and re-initialises the head.
    """
    name = 'video'
    score = 'top1'
    defaults = VIDEO_DEFAULTS

    def __init__(self, cfg: Mapping[str, Any], class_names: Optional[Sequence[str]] = None) -> None:
        if cfg['kd']['teacher']:
            raise ConfigError('knowledge distillation is not supported for video (kd.teacher must be null)')
        self.sampling = check_video_config(cfg)
        super().__init__(cfg, class_names)

    def build_datasets(self, cfg: Mapping[str, Any]) -> Tuple[Dataset, Optional[Dataset]]:
        return build_video_datasets(cfg, self.pre['mean'], self.pre['std'])

    def bind_data(self, train: Dataset) -> None:
        self.class_names = self.class_names or list(getattr(train, 'classes', []) or []) or None
        want, names = self.cfg['model']['num_classes'], self.class_names
        if want is None:
            if not names:
                raise ValueError('cannot tell the number of classes from the data; set model.num_classes')
            self.cfg['model']['num_classes'] = len(names)
        elif names and len(names) != int(want):
            raise ValueError(f'the training videos have {len(names)} classes but model.num_classes is {want}; '
                             f'set model.num_classes={len(names)} (or leave it unset)')
        top = max(getattr(train, 'targets', []) or [-1]) + 1
        if top > int(self.cfg['model']['num_classes']):
            raise ValueError(f'labels go up to {top - 1} but model.num_classes is {self.cfg["model"]["num_classes"]}')

    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        model = build_model(cfg)  # create_model + the one loader for model.pretrained (2D checkpoints inflate)
        if not hasattr(model, 'set_grad_checkpointing'):
            raise ConfigError(f'model {cfg["model"]["name"]} cannot take clips; use v_emov2_1m/2m/5m')
        model.set_grad_checkpointing(bool(cfg['video']['grad_checkpointing']))
        return model

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        return evaluate_video(model, loader, device, amp_dtype)

    def checkpoint_meta(self) -> Dict[str, Any]:
        meta = super().checkpoint_meta()
        meta.update(task=self.name, video=self.sampling.as_dict())
        return meta


def video_meta_sampling(meta: Mapping[str, Any], clips: Optional[int] = None, crops: Optional[int] = None
                        ) -> ClipSampling:
    """The sampling a checkpoint records, with evaluation views optionally overridden."""
    v: Dict[str, Any] = dict(meta.get('video') or {})
    if not v:
        v = dict(VIDEO_DEFAULTS['video'])
    if clips is not None:
        v['clips'] = clips
    if crops is not None:
        v['crops'] = crops
    return ClipSampling.from_config(v)
