"""Semantic segmentation as a :class:`~emov2.train.task.Task`: the trainer's loop, MMSeg's recipe.

Defaults (:attr:`SegmentationTask.defaults`) follow the EMOv2 MMSegmentation ADE20K configs
(``deeplabv3_emo2_*``, ``segformer_emo2_*``): AdamW, lr 1.2e-4, betas (0.9, 0.999), weight decay
0.05 (none on norms and biases), gradient clipping at norm 0.1 (the DeepLabv3 config), a linear
warm-up, 512x512 crops, no label smoothing, no EMA, no precise BN (MMSeg has neither). The configs
run 80k iterations (DeepLabv3; SegFormer 160k) with the lr constant for the first half and cosine to
0 over the second; the trainer's schedule is per-iteration cosine over the whole run, and it counts
epochs: 127 epochs of ADE20K's 20,210 training images at batch 32 are 80.4k iterations
(warm-up 1 epoch = 632 iterations; the configs: 500 / 1500). The batch: the configs' comment says
lr 1.2e-4 "for 4 x 8" images; we use 32.

The ``segmentation`` config section: ``kind`` (deeplabv3, fpn, segformer, pspnet, u_emov2_5m,
unet_s5_d16), ``backbone`` and ``backbone_checkpoint`` (ImageNet weights of the EMO backbone),
``window_size`` (10 for dense tasks), ``channels`` (head width, null: the paper's), ``layout``
(ade20k, folder, hrf), ``class_names``, ``crop_size``, ``scale`` (keep-ratio resize target
(long, short); null: 4 x crop by crop), ``ratio_range``, ``cat_max_ratio``, ``hflip``,
``photometric``, ``eval_scale`` (null: ``scale``), ``ignore_index``, ``reduce_zero_label`` (null:
on for ADE20K), ``aux_weight`` (0.4), ``class_weight`` (null: plain CE as the paper; a list of
per-class weights, MMSeg's ``class_weight``), ``mode`` (whole or slide), ``stride`` (slide), and
``hrf_train_count``. ``model.num_classes`` sets the classes where the data has no names;
``model.kwargs`` go to the backbone; ``model.name`` is not used.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torch.utils.data import Dataset

from ..train.config import ConfigError
from ..train.distributed import all_reduce_sum
from ..train.task import Task
from .data import (ADE20K_CLASSES, HRF_CLASSES, LAYOUTS, build_segmentation_datasets, collate_segmentation,
                   default_palette, read_class_names)
from .inference import output_logits, segment_logits
from .metrics import ConfusionMatrix, flat_per_class
from .models import create_segmenter, segmenter_names

__all__ = ['SegmentationTask', 'SEGMENTATION_DEFAULTS', 'segmentation_loss', 'evaluate_segmenter']

SEGMENTATION_DEFAULTS: Dict[str, Any] = {
    'segmentation': {
        'kind': 'deeplabv3',
        'backbone': 'emov2_5m',
        'backbone_checkpoint': None,   # ImageNet weights of the backbone (official .pth or a checkpoint set)
        'window_size': 10,             # the paper's attention window for dense tasks
        'channels': None,              # decode head width (None: the paper's for the kind)
        'layout': 'ade20k',            # ade20k | folder | hrf
        'class_names': None,           # list, or a file with one name per line (folder layout)
        'crop_size': [512, 512],
        'scale': [2048, 512],          # keep-ratio resize target (long, short); None: (4 x crop, crop)
        'ratio_range': [0.5, 2.0],
        'cat_max_ratio': 0.75,         # 1.0: plain random crop
        'hflip': 0.5,
        'photometric': True,
        'eval_scale': None,            # None: scale
        'ignore_index': 255,
        'reduce_zero_label': None,     # None: on for ade20k (label 0 -> ignore, others -1)
        'aux_weight': 0.4,
        'class_weight': None,          # None: plain CE (the paper's); else one weight per class (MMSeg's class_weight)
        'mode': 'whole',               # whole | slide (U-EMO on HRF: slide, 256 crops, stride 170)
        'stride': [341, 341],
        'hrf_train_count': 15,
    },
    'data': {'img_size': 512, 'workers': 4, 'train_dir': 'train', 'val_dir': 'val'},
    'aug': {'auto_augment': None, 'color_jitter': 0.0,
            'custom': 'MMSeg: random resize 0.5-2.0, random crop (cat_max_ratio 0.75), flip, photometric'},
    'eval': {'batch_size': 1, 'every': 13, 'precise_bn_images': 0},
    'optim': {'name': 'adamw', 'batch_size': 32, 'lr': 1.2e-4, 'betas': [0.9, 0.999], 'weight_decay': 0.05,
              'clip_grad': 0.1, 'label_smoothing': 0.0},
    'sched': {'name': 'cosine', 'epochs': 127, 'warmup_epochs': 1, 'warmup_lr': 1.0e-8, 'min_lr': 0.0},
    'ema': {'enable': False},
    'train': {'out': 'runs/segment'},
}


def segmentation_loss(outputs: Any, targets: Tensor, ignore_index: int = 255, aux_weight: float = 0.4,
                      class_weight: Optional[Tensor] = None) -> Tensor:
    """Pixel cross-entropy of the main logits (+ ``aux_weight`` x that of ``outputs['aux']``), ignored
    pixels left out; logits of another size than the targets are resized bilinearly first.
    ``class_weight`` (one per class, MMSeg's ``CrossEntropyLoss(class_weight=...)``) weights each
    pixel by its true class; the mean is then taken over the summed weights (PyTorch's weighted mean)."""
    def ce(logits: Tensor) -> Tensor:
        if logits.shape[-2:] != targets.shape[-2:]:
            logits = F.interpolate(logits, size=targets.shape[-2:], mode='bilinear', align_corners=False)
        w = class_weight.to(logits.device, torch.float32) if class_weight is not None else None
        return F.cross_entropy(logits.float(), targets, weight=w, ignore_index=ignore_index)

    loss = ce(output_logits(outputs))
    if isinstance(outputs, dict) and outputs.get('aux') is not None and aux_weight:
        loss = loss + aux_weight * ce(outputs['aux'])
    return loss


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, loader: Iterable, device: torch.device, num_classes: int,
                       class_names: Optional[List[str]] = None, ignore_index: int = 255, mode: str = 'whole',
                       crop: Optional[List[int]] = None, stride: Optional[List[int]] = None,
                       amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """mIoU, aAcc, mAcc, mDice (percent) and the per-class table over a loader of ``(images, masks,
    skipped)`` batches, each image's logits resized to its mask (the original size); summed over ranks."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes, ignore_index, device=device)
    counts = torch.zeros(2, dtype=torch.float64, device=device)  # images, skipped
    for batch in loader:
        images, masks, bad = batch if len(batch) == 3 else (*batch, 0)
        counts[1] += int(bad)
        if isinstance(images, Tensor):
            if images.numel() == 0:
                continue
            images, masks = list(images), list(masks)
        for img, mask in zip(images, masks):
            ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
            with ctx:
                logits = segment_logits(model, img.unsqueeze(0).to(device), mode, crop, stride,
                                        out_size=mask.shape[-2:])
            cm.update(logits.argmax(1)[0], mask.to(device))
            counts[0] += 1
    cm.all_reduce()
    all_reduce_sum(counts)
    model.train(was_training)
    m = cm.metrics(class_names)
    return {'mIoU': m['mIoU'], 'aAcc': m['aAcc'], 'mAcc': m['mAcc'], 'mDice': m['mDice'], **flat_per_class(m),
            'n': int(counts[0]), 'skipped': int(counts[1]), 'table': m}


class SegmentationTask(Task):
    """Pixel classification with a decode head (+ auxiliary head), scored by mIoU."""
    name = 'segmentation'
    score = 'mIoU'
    architecture_keys = ('segmentation.kind', 'segmentation.backbone', 'segmentation.channels',
                         'segmentation.window_size')
    defaults = SEGMENTATION_DEFAULTS

    def __init__(self, cfg: Mapping[str, Any], class_names: Optional[List[str]] = None,
                 palette: Optional[List[List[int]]] = None) -> None:
        super().__init__(cfg)
        s = cfg['segmentation']
        if s['kind'] not in segmenter_names():
            raise ConfigError(f'segmentation.kind must be one of {", ".join(segmenter_names())}, got {s["kind"]!r}')
        if s['layout'] not in LAYOUTS:
            raise ConfigError(f'segmentation.layout must be one of {", ".join(LAYOUTS)}, got {s["layout"]!r}')
        if s['mode'] not in ('whole', 'slide'):
            raise ConfigError(f"segmentation.mode must be 'whole' or 'slide', got {s['mode']!r}")
        for key in ('crop_size', 'stride'):
            v = s[key]
            if not (isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v)):
                raise ConfigError(f'segmentation.{key} must be two positive integers [h, w], got {v!r}')
        cw = s.get('class_weight')
        if cw is not None and not (isinstance(cw, list) and cw and all(isinstance(x, (int, float)) and x >= 0 for x in cw)
                                   and any(x > 0 for x in cw)):
            raise ConfigError(f'segmentation.class_weight must be null or a list of non-negative numbers (one per '
                              f'class), got {cw!r}')
        self.class_weight = torch.tensor(cw, dtype=torch.float32) if cw is not None else None
        self.class_names = list(class_names) if class_names else None
        self.palette = palette
        self.mean = list(cfg['data']['mean'] or IMAGENET_DEFAULT_MEAN)
        self.std = list(cfg['data']['std'] or IMAGENET_DEFAULT_STD)

    # data
    def resolve_class_names(self, root: Optional[str] = None) -> List[str]:
        """The classes: given names, else the layout's (ADE20K, HRF), the config's or ``classes.txt``,
        else ``0 .. model.num_classes-1``; checked against ``model.num_classes`` when both are set."""
        s, want = self.cfg['segmentation'], self.cfg['model']['num_classes']
        names = self.class_names or read_class_names(s['class_names'], root)
        if not names and s['layout'] == 'ade20k':
            names = list(ADE20K_CLASSES)
        if not names and s['layout'] == 'hrf':
            names = list(HRF_CLASSES)
        if not names:
            if want is None:
                raise ConfigError('the number of classes is unknown: set model.num_classes, segmentation.class_names '
                                  'or put a classes.txt (one name per line) in the data folder')
            names = [str(i) for i in range(int(want))]
        if want is not None and int(want) != len(names):
            raise ConfigError(f'model.num_classes is {want} but the data has {len(names)} classes '
                              f'({", ".join(names[:5])}{" ..." if len(names) > 5 else ""})')
        return names

    def build_datasets(self, cfg: Mapping[str, Any]) -> Tuple[Dataset, Optional[Dataset]]:
        names = self.resolve_class_names(cfg['data']['root'])
        ds = build_segmentation_datasets(cfg, self.mean, self.std, names)
        return ds['train'], ds.get('val')

    def bind_data(self, train: Dataset) -> None:
        names = getattr(train, 'classes', None)
        self.class_names = list(names) if names and not self.class_names else self.class_names
        self.class_names = self.resolve_class_names(self.cfg['data']['root'])
        self.cfg['model']['num_classes'] = len(self.class_names)
        if self.class_weight is not None and len(self.class_weight) != len(self.class_names):
            raise ConfigError(f'segmentation.class_weight has {len(self.class_weight)} weights but the data has '
                              f'{len(self.class_names)} classes')
        if self.palette is None or len(self.palette) != len(self.class_names):
            self.palette = default_palette(len(self.class_names))

    def collate(self, samples):
        return collate_segmentation(samples)

    def to_device(self, inputs: Any, targets: Any, device: torch.device, channels_last: bool) -> Tuple[Any, Any]:
        if isinstance(inputs, list):  # evaluation batches of different sizes
            return [i.to(device) for i in inputs], [t.to(device) for t in targets]
        return super().to_device(inputs, targets, device, channels_last)

    # model and loss
    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        s, m = cfg['segmentation'], cfg['model']
        kwargs = dict(m.get('kwargs') or {})
        if m.get('drop_path_rate') is not None and s['kind'] not in ('u_emov2_5m', 'unet_s5_d16'):
            kwargs['drop_path_rate'] = float(m['drop_path_rate'])
        return create_segmenter(s['kind'], s['backbone'], int(m['num_classes']), s['backbone_checkpoint'],
                                channels=s['channels'], window_size=int(s['window_size']), **kwargs)

    def loss(self, model: nn.Module, inputs: Tensor, targets: Tensor) -> Tuple[Tensor, Any]:
        s = self.cfg['segmentation']
        out = model(inputs)
        loss = segmentation_loss(out, targets, int(s['ignore_index']), float(s['aux_weight']), self.class_weight)
        return loss, output_logits(out).detach()

    def train_counts(self, outputs: Tensor, targets: Tensor) -> Dict[str, float]:
        valid = targets != int(self.cfg['segmentation']['ignore_index'])
        pred = outputs.argmax(1)
        return {'pix_correct': float(((pred == targets) & valid).sum()), 'pix_seen': float(valid.sum())}

    def train_metrics(self, counts: Mapping[str, float]) -> Dict[str, float]:
        return {'train_pixel_acc': 100.0 * counts.get('pix_correct', 0.0) / max(counts.get('pix_seen', 0.0), 1.0)}

    # evaluation and checkpoints
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        s = self.cfg['segmentation']
        r = evaluate_segmenter(model, loader, device, int(self.cfg['model']['num_classes']), self.class_names,
                               int(s['ignore_index']), s['mode'], s['crop_size'], s['stride'], amp_dtype)
        r.pop('table')
        return r

    def checkpoint_meta(self) -> Dict[str, Any]:
        s, m = self.cfg['segmentation'], self.cfg['model']
        reduce_zero = s['reduce_zero_label'] if s['reduce_zero_label'] is not None else s['layout'] == 'ade20k'
        scale = list(s['scale']) if s['scale'] else [4 * max(s['crop_size']), max(s['crop_size'])]
        return {'task': self.name, 'variant': f'{s["kind"]}_{s["backbone"]}', 'kind': s['kind'],
                'backbone': s['backbone'], 'num_classes': int(m['num_classes']), 'class_names': self.class_names,
                'palette': self.palette, 'window_size': int(s['window_size']), 'channels': s['channels'],
                'model_kwargs': m.get('kwargs') or {}, 'mean': self.mean, 'std': self.std,
                'crop_size': list(s['crop_size']), 'scale': scale, 'eval_scale': list(s['eval_scale'] or scale),
                'mode': s['mode'], 'stride': list(s['stride']), 'ignore_index': int(s['ignore_index']),
                'reduce_zero_label': bool(reduce_zero), 'layout': s['layout']}

    def state(self) -> Dict[str, Any]:
        return {'class_names': self.class_names}

    def load_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get('class_names')
        if saved and self.class_names and list(saved) != list(self.class_names):
            raise ConfigError('cannot resume: the class names changed since the checkpoint '
                              f'({len(saved)} -> {len(self.class_names)} classes, or renamed); resume with the '
                              'original classes')
        self.class_names = self.class_names or saved
