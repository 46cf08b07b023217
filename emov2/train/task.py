"""Tasks: what the training loop needs to know about a problem, and nothing else.

The :class:`~emov2.train.engine.Trainer` owns the loop (AMP, DDP, EMA, exact resume, atomic checkpoint
sets, NaN/explosion handling, precise BN, progress bars, the report folder). A :class:`Task` owns
the problem: the datasets and their batches, the model, the loss, the training counts and the
evaluation metrics, the score that picks the best checkpoint and the metadata a checkpoint needs to
be used on its own. :class:`ClassificationTask` is the first one; detection, segmentation, video and
diffusion subclass :class:`Task` and plug into the same loop.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.loss import LabelSmoothingCrossEntropy
from torch.utils.data import Dataset

from .config import ConfigError
from .data import ListDataset, build_datasets, collate_skip
from .distill import KDLoss, build_teacher
from .distributed import all_reduce_sum
from .modeling import build_model, model_preprocessing

__all__ = ['Task', 'ClassificationTask', 'accuracy_counts', 'evaluate_classifier']

Batch = Tuple[Any, Any, int]  # (inputs, targets, number of unreadable samples dropped)


class Task:
    """The problem-specific half of training. Subclasses override what differs from classification.

    ``score`` names the validation metric (higher is better) that picks the ``best`` checkpoint.
    """
    name = 'task'
    score = 'score'
    defaults: Mapping[str, Any] = {}  # the task's config defaults over train.config.DEFAULTS (load_config(defaults=))
    architecture_keys: Sequence[str] = ()  # config keys (besides model.*) a resume must not change

    def __init__(self, cfg: Mapping[str, Any]) -> None:
        self.cfg = cfg

    # data
    def build_datasets(self, cfg: Mapping[str, Any]) -> Tuple[Dataset, Optional[Dataset]]:
        """``(train, val or None)`` from the config's data section."""
        raise NotImplementedError

    def bind_data(self, train: Dataset) -> None:
        """Learn what the model needs from the training data (classes, ...), before the model is built."""

    def collate(self, samples: Sequence[Any]) -> Batch:
        """A batch from samples; ``None`` samples (unreadable files) are dropped and counted."""
        return collate_skip(samples)

    def to_device(self, inputs: Any, targets: Any, device: torch.device, channels_last: bool) -> Tuple[Any, Any]:
        inputs = inputs.to(device, non_blocking=True)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs, targets.to(device, non_blocking=True)

    @staticmethod
    def batch_size_of(inputs: Any) -> int:
        return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else len(inputs)

    # model and loss
    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        raise NotImplementedError

    def setup(self, model: nn.Module, device: torch.device) -> None:
        """Build what the loss needs once the model exists (a teacher, ...)."""

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> Tuple[torch.Tensor, Any]:
        """``(scalar loss, outputs)`` for one batch (the trainer runs this under autocast)."""
        raise NotImplementedError

    def forward_for_bn(self, model: nn.Module, inputs: Any) -> Any:
        """One forward pass in train mode on training inputs (precise BatchNorm statistics)."""
        return model(inputs)

    def train_counts(self, outputs: Any, targets: Any) -> Dict[str, float]:
        """Sums to accumulate over an epoch (summed across processes)."""
        return {}

    def train_metrics(self, counts: Mapping[str, float]) -> Dict[str, float]:
        """Epoch training metrics from the summed counts."""
        return {}

    # evaluation and checkpoints
    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        """Validation metrics (must include ``self.score``, ``n`` and ``skipped``)."""
        raise NotImplementedError

    def checkpoint_meta(self) -> Dict[str, Any]:
        """What a checkpoint must record to be used without the config."""
        return {'task': self.name}

    def state(self) -> Dict[str, Any]:
        """Task state to restore on resume (JSON-able)."""
        return {}

    def load_state(self, state: Mapping[str, Any]) -> None:
        pass


# --- classification --------------------------------------------------------------------------------
def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = (1, 5)) -> Dict[int, int]:
    """Number of samples whose label is among the top-k predictions, for each k (k capped at classes)."""
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices
    hit = top.eq(target.view(-1, 1))
    return {k: int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader: Iterable, device: torch.device,
                        amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
    """``{'top1', 'top5', 'loss', 'n', 'skipped'}`` over the loader (each rank passes its shard)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64)  # top1, top5, loss, n, skipped
    for batch in loader:
        images, target, skipped = batch if len(batch) == 3 else (*batch, 0)
        sums[4] += skipped
        if images.numel() == 0:
            continue
        images, target = images.to(device, non_blocking=True), target.to(device, non_blocking=True)
        ctx = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        with ctx:
            logits = model(images)
        logits = logits.float()
        c = accuracy_counts(logits, target)
        sums[0] += c[1]
        sums[1] += c[5]
        sums[2] += float(F.cross_entropy(logits, target, reduction='sum'))
        sums[3] += target.numel()
    if device.type == 'cuda':
        sums = sums.to(device)
    sums = all_reduce_sum(sums).cpu()
    model.train(was_training)
    n = max(float(sums[3]), 1.0)
    return {'top1': 100.0 * float(sums[0]) / n, 'top5': 100.0 * float(sums[1]) / n,
            'loss': float(sums[2]) / n, 'n': int(sums[3]), 'skipped': int(sums[4])}


class ClassificationTask(Task):
    """Image classification: label-smoothed cross-entropy (plus KD), top-1/top-5, best by top-1.

    The head size comes from the data (``model.num_classes`` null) or is checked against it; the
    class names and preprocessing go into every checkpoint.
    """
    name = 'classification'
    score = 'top1'

    def __init__(self, cfg: Mapping[str, Any], class_names: Optional[Sequence[str]] = None) -> None:
        super().__init__(cfg)
        self.class_names: Optional[List[str]] = list(class_names) if class_names else None
        self.pre = model_preprocessing(cfg['model']['name'], cfg)
        self.criterion: Optional[nn.Module] = None
        self.teacher: Optional[nn.Module] = None

    def build_datasets(self, cfg: Mapping[str, Any]) -> Tuple[Dataset, Optional[Dataset]]:
        ds = build_datasets(cfg, self.pre['mean'], self.pre['std'])
        return ds['train'], ds.get('val')

    def bind_data(self, train: Dataset) -> None:
        self.class_names = self.class_names or list(getattr(train, 'classes', []) or []) or None
        self.cfg['model']['num_classes'] = self._num_classes(train)

    def _num_classes(self, train: Dataset) -> int:
        """The head size: ``model.num_classes`` if set (checked against the data), else the data's classes."""
        want = self.cfg['model']['num_classes']
        names = self.class_names
        if isinstance(train, ListDataset):  # labels are integers: they must fit the head
            top = max(train.targets, default=-1) + 1
            n = int(want) if want is not None else max(top, len(names or ()))
            if top > n:
                raise ValueError(f'the training list has labels up to {top - 1} but model.num_classes is {n}')
            return n
        if want is None:
            if not names:
                raise ValueError('cannot tell the number of classes from the data; set model.num_classes')
            return len(names)
        if names and len(names) != int(want):
            raise ValueError(f'the training data has {len(names)} classes ({", ".join(map(str, names[:6]))}'
                             f'{" ..." if len(names) > 6 else ""}) but model.num_classes is {want}; set '
                             f'model.num_classes={len(names)} (or leave it unset to take it from the data)')
        return int(want)

    def build_model(self, cfg: Mapping[str, Any]) -> nn.Module:
        return build_model(cfg)

    def setup(self, model: nn.Module, device: torch.device) -> None:
        o, kd = self.cfg['optim'], self.cfg['kd']
        ls = float(o['label_smoothing'])
        base = LabelSmoothingCrossEntropy(smoothing=ls) if ls > 0 else nn.CrossEntropyLoss()
        if kd['teacher']:
            self.teacher = build_teacher(kd['teacher'], kd['teacher_checkpoint'], int(self.cfg['model']['num_classes']),
                                         self.pre['mean'], self.pre['std'], kd['teacher_mean'], kd['teacher_std'],
                                         kd['teacher_size']).to(device)
            self.criterion = KDLoss(base, kd['tau'], kd['weight'])
        else:
            self.criterion = base

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Any]:
        logits = model(inputs)
        if self.teacher is not None:
            return self.criterion(logits.float(), targets, self.teacher(inputs).float()), logits
        return self.criterion(logits.float(), targets), logits

    def train_counts(self, outputs: torch.Tensor, targets: torch.Tensor) -> Dict[str, float]:
        return {'correct': float((outputs.argmax(-1) == targets).sum()), 'seen': float(targets.numel())}

    def train_metrics(self, counts: Mapping[str, float]) -> Dict[str, float]:
        return {'train_top1': 100.0 * counts.get('correct', 0.0) / max(counts.get('seen', 0.0), 1.0)}

    def evaluate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: Optional[torch.dtype] = None) -> Dict[str, Any]:
        return evaluate_classifier(model, loader, device, amp_dtype)

    def checkpoint_meta(self) -> Dict[str, Any]:
        m, d = self.cfg['model'], self.cfg['data']
        return {'task': self.name, 'variant': m['name'], 'num_classes': int(m['num_classes']),
                'class_names': self.class_names, 'window_size': int(m['window_size']),
                'model_kwargs': m.get('kwargs') or {}, 'img_size': int(d['img_size']),
                'mean': list(self.pre['mean']), 'std': list(self.pre['std']), 'crop_pct': self.pre['crop_pct'],
                'interpolation': self.pre['interpolation']}

    def state(self) -> Dict[str, Any]:
        return {'class_names': self.class_names}

    def load_state(self, state: Mapping[str, Any]) -> None:
        saved = state.get('class_names')
        if saved and self.class_names and list(saved) != list(self.class_names):
            changed = [f'{a!r} -> {b!r}' for a, b in zip(saved, self.class_names) if a != b][:3]
            raise ConfigError(f'cannot resume: the classes of the data changed ({", ".join(changed) or "count"}); '
                              'labels would be permuted. Resume with the original class folders.')
        self.class_names = self.class_names or saved
