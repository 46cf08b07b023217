"""Top-1 / top-5 accuracy and loss over a loader, summed across ranks for distributed evaluation."""
from __future__ import annotations

import contextlib
from typing import Dict, Iterable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .distributed import all_reduce_sum

__all__ = ['accuracy_counts', 'evaluate']


def accuracy_counts(logits: torch.Tensor, target: torch.Tensor, ks=(1, 5)) -> Dict[int, int]:
    """Number of samples whose label is among the top-k predictions, for each k (k capped at classes)."""
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices
    hit = top.eq(target.view(-1, 1))
    return {k: int(hit[:, :min(k, maxk)].any(dim=1).sum()) for k in ks}


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device,
             amp_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
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
