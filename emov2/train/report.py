"""Per-epoch metric logs (JSON lines or CSV, optional TensorBoard) and report figures."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

__all__ = ['MetricsLogger', 'read_log', 'plot_curves', 'plot_confusion', 'plot_samples']


class MetricsLogger:
    """Append one record per epoch to ``log.jsonl`` or ``log.csv`` (and TensorBoard if asked)."""

    def __init__(self, out_dir: os.PathLike, fmt: str = 'jsonl', tensorboard: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.fmt = fmt
        self.path = self.out_dir / f'log.{fmt}'
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(self.out_dir / 'tensorboard'))

    def truncate_after(self, epoch: int) -> None:
        """Drop records of epochs >= ``epoch`` (a resumed run rewrites them)."""
        if not self.path.exists():
            return
        keep = [r for r in read_log(self.path) if int(r.get('epoch', -1)) < epoch]
        tmp = self.path.with_name(f'.{self.path.name}.rewrite')
        tmp.unlink(missing_ok=True)
        self.path, final = tmp, self.path
        try:
            for r in keep:
                self.log(r, tb=False)
        finally:
            self.path = final
        if tmp.exists():
            os.replace(tmp, final)  # one step: a kill here keeps the old log or the new one, whole
        else:
            final.unlink()

    def log(self, record: Mapping[str, Any], tb: bool = True) -> None:
        """Write a record (flat mapping of numbers/strings)."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.fmt == 'jsonl':
            with open(self.path, 'a') as f:
                f.write(json.dumps(dict(record)) + '\n')
        else:
            new = not self.path.exists()
            with open(self.path, 'a', newline='') as f:
                w = csv.DictWriter(f, fieldnames=list(record.keys()))
                if new:
                    w.writeheader()
                w.writerow(dict(record))
        if tb and self.writer is not None:
            step = int(record.get('epoch', 0))
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != 'epoch':
                    self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def close(self) -> None:
        """Flush TensorBoard."""
        if self.writer is not None:
            self.writer.close()


def read_log(path: os.PathLike) -> List[Dict[str, Any]]:
    """Records of a ``log.jsonl`` or ``log.csv`` file."""
    path = Path(path)
    if path.suffix == '.csv':
        with open(path, newline='') as f:
            rows = list(csv.DictReader(f))
        return [{k: _num(v) for k, v in r.items()} for r in rows]
    records = []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # a line cut short by a kill: that record is written again on resume
                break
            raise ValueError(f'{path}:{i + 1} is not a JSON record') from None
    return records


def _num(v: str) -> Any:
    try:
        return float(v) if any(c in v for c in '.eEn') else int(v)
    except (TypeError, ValueError):
        return v


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def plot_curves(records: Sequence[Mapping[str, Any]], path: os.PathLike, score: str = 'top1',
                score_label: str = 'accuracy (%)') -> Path:
    """Loss and the task's score against epoch (training, validation and EMA validation)."""
    plt = _plt()
    ep = [r['epoch'] + 1 for r in records]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    series = (('train', 'train', 'C2'), ('val', 'val', 'C0'), ('ema_val', 'EMA val', 'C1'))
    for ax, metric, name in ((ax1, 'loss', 'loss'), (ax2, score, score.replace('top1', 'top-1'))):
        for prefix, label, colour in series:  # one colour per series in both panels
            key = f'{prefix}_{metric}'
            pts = [(e, r[key]) for e, r in zip(ep, records) if isinstance(r.get(key), (int, float))]
            if pts:
                ax.plot(*zip(*pts), label=f'{label} {name}', marker='.', color=colour)
    ax1.set_xlabel('epoch'), ax1.set_ylabel('loss'), ax1.legend(), ax1.grid(alpha=0.3)
    ax2.set_xlabel('epoch'), ax2.set_ylabel(score_label), ax2.grid(alpha=0.3)
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: os.PathLike, title: str = '') -> Path:
    """Confusion matrix (rows: true class, columns: predicted) with counts in the cells."""
    plt = _plt()
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(1 + 0.55 * n, 1 + 0.5 * n))
    ax.imshow(cm, cmap='Blues')
    ax.set_xticks(range(n), class_names, rotation=45 if n > 10 else 0)
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel('predicted'), ax.set_ylabel('true')
    thresh = cm.max() / 2 if cm.size else 0
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(cm[i, j]), ha='center', va='center', fontsize=8,
                    color='white' if cm[i, j] > thresh else 'black')
    if title:
        ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_samples(images: np.ndarray, preds: Sequence[int], targets: Sequence[int], class_names: Sequence[str],
                 path: os.PathLike, probs: Optional[Sequence[float]] = None, cols: int = 8) -> Path:
    """Grid of images titled ``pred (p)`` in green when right, red with the true label when wrong."""
    plt = _plt()
    n = len(images)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.5 * cols, 1.7 * rows))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis('off')
        if i >= n:
            continue
        img = images[i]
        ax.imshow(img.squeeze(), cmap='gray' if img.ndim == 2 or img.shape[-1] == 1 else None)
        ok = preds[i] == targets[i]
        text = str(class_names[preds[i]])
        if probs is not None:
            text += f' ({probs[i]:.2f})'
        if not ok:
            text += f'\ntrue {class_names[targets[i]]}'
        ax.set_title(text, fontsize=8, color='green' if ok else 'red')
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
