"""Semantic segmentation metrics from one confusion matrix (MMSegmentation's ``IoUMetric`` definitions).

Pixels whose ground truth is the ignore index are left out. Per class ``c`` with ``I`` the
intersection (pixels of ``c`` predicted as ``c``), ``G`` the ground-truth area and ``P`` the
predicted area (both over the valid pixels):

* ``IoU = I / (G + P - I)``, ``Acc = I / G``, ``Dice = 2 I / (G + P)``;
* a class that is neither in the ground truth nor predicted has ``0 / 0``: NaN, and the means
  (``mIoU``, ``mAcc``, ``mDice``) leave it out (``nanmean``), as MMSeg does; a class predicted but
  absent from the ground truth has IoU 0 (a false positive costs) and Acc NaN;
* ``aAcc`` = all intersections / all valid pixels.

Values are percentages. The matrix is summed over DDP ranks before the metrics are taken, so every
rank reports the metrics of the whole validation set.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import torch

from ..train.distributed import all_reduce_sum

__all__ = ['ConfusionMatrix', 'segmentation_metrics', 'per_class_rows', 'flat_per_class']


class ConfusionMatrix:
    """A ``K x K`` matrix (rows: ground truth, columns: prediction) accumulated with ``torch.bincount``."""

    def __init__(self, num_classes: int, ignore_index: int = 255, device: Optional[torch.device] = None) -> None:
        if num_classes < 1:
            raise ValueError(f'num_classes must be positive, got {num_classes}')
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add predicted and ground-truth label maps of the same shape (any leading dimensions)."""
        if pred.shape != target.shape:
            raise ValueError(f'prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape')
        k = self.num_classes
        target = target.to(self.matrix.device, torch.int64).reshape(-1)
        pred = pred.to(self.matrix.device, torch.int64).reshape(-1)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        bad = (target < 0) | (target >= k)
        if bool(bad.any()):
            found = sorted(set(target[bad].unique().tolist()))[:5]
            raise ValueError(f'ground-truth labels {found} are outside 0..{k - 1} and not the ignore index '
                             f'{self.ignore_index}')
        self.matrix += torch.bincount(target * k + pred.clamp(0, k - 1), minlength=k * k).reshape(k, k)

    def all_reduce(self) -> 'ConfusionMatrix':
        """Sum the matrix over DDP ranks in place (no-op when single-process)."""
        all_reduce_sum(self.matrix)
        return self

    def metrics(self, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        return segmentation_metrics(self.matrix, class_names)


def _nanmean(values: torch.Tensor) -> float:
    v = values[~torch.isnan(values)]
    return float(v.mean()) if v.numel() else float('nan')


def segmentation_metrics(matrix: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """``{'aAcc', 'mIoU', 'mAcc', 'mDice', 'IoU', 'Acc', 'Dice', 'class_names', 'pixels'}`` (percentages;
    the per-class lists hold NaN for classes without ground truth and prediction, see the module doc)."""
    m = matrix.detach().to('cpu', torch.float64)
    k = m.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    if len(names) != k:
        raise ValueError(f'{len(names)} class names for a {k}-class confusion matrix')
    inter = m.diag()
    gt, pred = m.sum(1), m.sum(0)
    union = gt + pred - inter
    iou = inter / union * 100          # 0/0 -> NaN
    acc = inter / gt * 100
    dice = 2 * inter / (gt + pred) * 100
    total = float(gt.sum())
    return {
        'aAcc': float(inter.sum()) / total * 100 if total else float('nan'),
        'mIoU': _nanmean(iou), 'mAcc': _nanmean(acc), 'mDice': _nanmean(dice),
        'IoU': iou.tolist(), 'Acc': acc.tolist(), 'Dice': dice.tolist(),
        'class_names': names, 'pixels': int(total),
    }


def per_class_rows(metrics: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One ``{'class', 'IoU', 'Acc', 'Dice'}`` row per class (for tables)."""
    return [{'class': n, 'IoU': i, 'Acc': a, 'Dice': d}
            for n, i, a, d in zip(metrics['class_names'], metrics['IoU'], metrics['Acc'], metrics['Dice'])]


def flat_per_class(metrics: Dict[str, Any]) -> Dict[str, float]:
    """``{'IoU.<class>': v, 'Acc.<class>': v}`` (MMSeg's log names): the per-class table as scalars, so
    the trainer writes it into ``metrics.json`` and the log next to mIoU. Absent classes stay NaN."""
    out: Dict[str, float] = {}
    for row in per_class_rows(metrics):
        for key in ('IoU', 'Acc'):
            out[f'{key}.{row["class"]}'] = float(row[key])
    return out
