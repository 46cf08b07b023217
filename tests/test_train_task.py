"""The loop is task-agnostic: a task that is not classification trains, evaluates, picks its best
checkpoint by its own score and resumes exactly, through the same Trainer."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from emov2.checkpoint import read_metadata, read_state_dict
from emov2.train import Trainer
from emov2.train.config import ConfigError
from emov2.train.task import ClassificationTask, Task
from emov2.train.testing import RandomImages, tiny_config


class Brightness(Dataset):
    """Images whose target is their mean brightness (a regression problem)."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 3, 16, 16, generator=g) * torch.rand(n, 1, 1, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.x[i].mean().reshape(1)


class BrightnessTask(Task):
    name, score = 'brightness', 'neg_mse'

    def collate(self, samples):
        return torch.stack([x for x, _ in samples]), torch.stack([y for _, y in samples]), 0

    def build_model(self, cfg):
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1))

    def loss(self, model, inputs, targets):
        out = model(inputs)
        return F.mse_loss(out.float(), targets), out

    def train_counts(self, outputs, targets):
        return {'sq_err': float(((outputs.float() - targets) ** 2).sum()), 'seen': float(targets.numel())}

    def train_metrics(self, counts):
        return {'train_mse': counts['sq_err'] / counts['seen']}

    @torch.no_grad()
    def evaluate(self, model, loader, device, amp_dtype=None):
        model.eval()
        err, n = 0.0, 0
        for x, y, _ in loader:
            err += float(((model(x).float() - y) ** 2).sum())
            n += len(y)
        return {'neg_mse': -err / n, 'n': n, 'skipped': 0}


def _fit(out, resume=None, overrides=()):
    cfg = tiny_config(out, overrides=['optim.lr=0.01', 'ema.enable=false', 'train.channels_last=false', *overrides])
    return Trainer(cfg, Brightness(64, 0), Brightness(32, 1), task=BrightnessTask(cfg), resume=resume).fit()


def test_a_regression_task_uses_the_same_loop(tmp_path):
    r = _fit(tmp_path / 'full')
    assert r.global_step == 16 and r.score_name == 'neg_mse'
    log = [json.loads(x) for x in (tmp_path / 'full' / 'log.jsonl').read_text().splitlines()]
    assert {'train_mse', 'val_neg_mse', 'best_neg_mse'} <= set(log[-1]) and 'train_top1' not in log[-1]
    assert r.best_score == max(x['val_neg_mse'] for x in log)
    meta = read_metadata(tmp_path / 'full' / 'best' / 'model.safetensors')
    assert meta['task'] == 'brightness' and meta['neg_mse'] == r.best_score
    # stopped after 5 steps, resumed: the same final weights (BatchNorm statistics included)
    _fit(tmp_path / 'cut', overrides=['train.stop_after_steps=5'])
    _fit(tmp_path / 'cut', resume='auto')
    a, _ = read_state_dict(tmp_path / 'full' / 'last' / 'model.safetensors')
    b, _ = read_state_dict(tmp_path / 'cut' / 'last' / 'model.safetensors')
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_task_names_its_own_architecture_keys_that_a_resume_must_keep(tmp_path):
    """Task.architecture_keys join model.* in the resume check (a segmentation head's width, ...)."""
    class Wider(ClassificationTask):
        architecture_keys = ('eval.crop_pct',)  # stands in for a task section's head width

    cfg = tiny_config(tmp_path / 'run', overrides=['sched.epochs=1', 'train.stop_after_steps=2'])
    Trainer(cfg, RandomImages(48), task=Wider(cfg)).fit()
    cfg2 = tiny_config(tmp_path / 'run', overrides=['sched.epochs=1', 'eval.crop_pct=0.9'])
    with pytest.raises(ConfigError, match='eval.crop_pct'):
        Trainer(cfg2, RandomImages(48), task=Wider(cfg2), resume=str(tmp_path / 'run')).fit()


def test_constant_schedule_warms_up_then_holds_the_peak(tmp_path):
    """sched.name=constant (DiT's recipe) works on every timm version: linear warm-up, then the peak lr."""
    cfg = tiny_config(tmp_path / 'run', overrides=['sched.name=constant', 'sched.warmup_epochs=1',
                                                    'optim.lr=0.002', 'sched.epochs=2'])
    seen = []
    Trainer(cfg, RandomImages(48), step_callback=lambda t, s: seen.append(t.optimizer.param_groups[0]['lr'])).fit()
    warm = 6  # one epoch of 48 images at batch 8
    assert seen[0] < seen[warm - 2] < 0.002 and all(abs(lr - 0.002) < 1e-12 for lr in seen[warm:])
