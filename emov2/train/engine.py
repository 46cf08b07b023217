"""The training loop: the paper's recipe on timm's building blocks, resumable to the bit.

``Trainer(cfg, ...).fit()`` builds the model, data, AdamW (no decay on the model's
``no_weight_decay()`` set and 1-D parameters), a per-iteration cosine schedule with warm-up,
label-smoothed cross-entropy (plus KD when a teacher is configured), ``ModelEmaV3``, gradient
clipping and AMP, then trains with per-epoch evaluation, logs and checkpoints.

Guarantees:

* Resume: ``last`` checkpoints hold model, EMA, optimiser, scheduler, scaler, step counters and every
  rank's RNG state; data order and augmentation are functions of (seed, epoch, index), so a run
  stopped mid-epoch and resumed ends with exactly the weights of an uninterrupted run.
* SIGTERM / SIGINT: the current step finishes, a resumable checkpoint is written, ``fit`` returns.
* A NaN/inf loss (or gradient) skips the step with a warning (BatchNorm statistics are rolled back
  too); after ``train.max_nonfinite`` in a row ``NonFiniteLossError`` is raised without writing any
  checkpoint, so the last good ``last``/``best`` files stay as they were.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .config import scaled_lrs
from .data import (ResumableSampler, SeededDataset, build_datasets, collate_skip, ignore_sigint_in_worker,
                   shard_indices)
from .distill import KDLoss, build_teacher
from .distributed import DistInfo, all_gather_object, all_reduce_min, all_reduce_sum, barrier, init_distributed, is_dist
from .evaluate import evaluate
from .modeling import build_model, model_preprocessing
from .report import MetricsLogger, plot_curves, read_log
from .state import load_state, rng_state, save_state, save_weights, set_rng_state

__all__ = ['Trainer', 'TrainResult', 'NonFiniteLossError', 'amp_dtype_for']

_log = logging.getLogger('emov2.train')


class NonFiniteLossError(RuntimeError):
    """Too many NaN/inf losses in a row: training cannot recover by skipping steps."""


@dataclass
class TrainResult:
    """What ``fit`` did: where it wrote, how far it got and the final/best metrics."""
    out_dir: Path
    epochs_done: int
    global_step: int
    stopped_early: bool
    best_top1: Optional[float]
    last_metrics: Dict[str, Any] = field(default_factory=dict)
    skipped_images: int = 0
    nonfinite_steps: int = 0
    rank_checksums: List[float] = field(default_factory=list)


def amp_dtype_for(cfg: Mapping[str, Any], device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype from ``train.amp`` / ``train.amp_dtype`` (bf16 on CPU, fp16 on CUDA by default)."""
    if not cfg['train']['amp']:
        return None
    name = cfg['train']['amp_dtype']
    if name == 'auto':
        return torch.float16 if device.type == 'cuda' else torch.bfloat16
    return getattr(torch, name)


def _checksum(model: nn.Module) -> float:
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() + p.detach().double().sum() * 1e-3
                         for p in model.parameters()))


class _StopFlag:
    """Set by SIGTERM/SIGINT; the previous handlers come back on ``restore``."""

    def __init__(self) -> None:
        self.set = False
        self._old: Dict[int, Any] = {}

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.set:
            _log.warning('received signal %d: finishing this step, saving a checkpoint and stopping', signum)
        self.set = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()


class Trainer:
    """Train one model from a config (see :mod:`emov2.train.config`).

    ``train_dataset`` / ``val_dataset`` replace the datasets built from ``data.root`` (the demo and
    tests pass in-memory data); they must return ``(tensor image, int label)`` or ``None`` for a
    sample to skip. ``step_callback(trainer, global_step)`` runs after every step (tests use it to
    deliver a signal or inject a fault). ``resume`` is a checkpoint folder or ``*_state.pt`` file.
    """

    def __init__(self, cfg: Mapping[str, Any], train_dataset: Optional[Dataset] = None,
                 val_dataset: Optional[Dataset] = None, class_names: Optional[Sequence[str]] = None,
                 resume: Optional[str] = None, step_callback: Optional[Callable[['Trainer', int], None]] = None,
                 out_dir: Optional[str] = None) -> None:
        self.cfg = json.loads(json.dumps(cfg))  # private, JSON-able copy
        self.out_dir = Path(out_dir or self.cfg['train']['out'])
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.class_names = list(class_names) if class_names else None
        self.resume = resume
        self.step_callback = step_callback
        self.stop = _StopFlag()
        self.global_step = 0

    # -- setup --------------------------------------------------------------------------------------
    def _seed(self, seed: int) -> None:
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        torch.manual_seed(seed)

    def _setup(self) -> None:
        cfg = self.cfg
        self.dist: DistInfo = init_distributed(cfg['train']['device'])
        dev = self.dist.device
        seed = int(cfg['train']['seed'])
        self._seed(seed)  # same initial weights on every rank
        model = build_model(cfg)
        self.pre = model_preprocessing(model)
        if self.train_dataset is None:
            ds = build_datasets(cfg, self.pre['mean'], self.pre['std'])
            self.train_dataset, self.val_dataset = ds['train'], ds.get('val')
            self.class_names = self.class_names or list(getattr(ds['train'], 'classes', []) or []) or None
        self.train_seeded = SeededDataset(self.train_dataset, seed)

        world = self.dist.world
        total_bs = int(cfg['optim']['batch_size'])
        if total_bs % world:
            raise ValueError(f'optim.batch_size {total_bs} is not divisible by the {world} processes')
        self.batch_size = total_bs // world
        self.sampler = ResumableSampler(len(self.train_seeded), self.batch_size, self.dist.rank, world,
                                        shuffle=True, seed=seed, drop_last=True)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch < 1:
            raise ValueError(f'{len(self.train_seeded)} training images are fewer than one batch of '
                             f'{self.batch_size} per process; lower optim.batch_size')
        workers = int(cfg['data']['workers'])
        pin = bool(cfg['data']['pin_memory']) and dev.type == 'cuda'
        self.train_loader = DataLoader(self.train_seeded, batch_size=self.batch_size, sampler=self.sampler,
                                       num_workers=workers, collate_fn=collate_skip, pin_memory=pin,
                                       generator=torch.Generator(), persistent_workers=False,
                                       worker_init_fn=ignore_sigint_in_worker)
        self.val_loader = None
        if self.val_dataset is not None and len(self.val_dataset) > 0:
            shard = Subset(self.val_dataset, shard_indices(len(self.val_dataset), self.dist.rank, world))
            self.val_loader = DataLoader(shard, batch_size=int(cfg['eval']['batch_size']), shuffle=False,
                                         num_workers=workers, collate_fn=collate_skip, pin_memory=pin,
                                         worker_init_fn=ignore_sigint_in_worker)

        model.to(dev)
        self.channels_last = bool(cfg['train']['channels_last'])
        if self.channels_last:  # NHWC convs and window gathers: about 1.5-2x a CPU training step
            model.to(memory_format=torch.channels_last)
        if world > 1 and cfg['train']['sync_bn']:
            if dev.type == 'cuda':
                model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            elif self.dist.main:
                _log.warning('train.sync_bn ignored: PyTorch SyncBatchNorm needs CUDA')
        self.model = model
        self.ddp = None
        if world > 1:
            ids = [dev.index] if dev.type == 'cuda' else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2
        self.lrs = scaled_lrs(cfg)
        o, s = cfg['optim'], cfg['sched']
        self.optimizer = create_optimizer_v2(model, o['name'], lr=self.lrs['lr'], weight_decay=float(o['weight_decay']),
                                             betas=tuple(o['betas']), eps=float(o['eps']), filter_bias_and_bn=True)
        self.epochs = int(s['epochs'])
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=s['name'], num_epochs=self.epochs, warmup_epochs=int(s['warmup_epochs']),
            warmup_lr=self.lrs['warmup_lr'], min_lr=self.lrs['min_lr'], step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)

        self.ema = None
        if cfg['ema']['enable']:
            from timm.utils import ModelEmaV3
            self.ema = ModelEmaV3(model, decay=float(cfg['ema']['decay']))

        from timm.loss import LabelSmoothingCrossEntropy
        ls = float(o['label_smoothing'])
        base = LabelSmoothingCrossEntropy(smoothing=ls) if ls > 0 else nn.CrossEntropyLoss()
        self.teacher = None
        kd = cfg['kd']
        if kd['teacher']:
            self.teacher = build_teacher(kd['teacher'], kd['teacher_checkpoint'], int(cfg['model']['num_classes']),
                                         self.pre['mean'], self.pre['std'], kd['teacher_mean'], kd['teacher_std'],
                                         kd['teacher_size']).to(dev)
            self.criterion: nn.Module = KDLoss(base, kd['tau'], kd['weight'])
        else:
            self.criterion = base

        self.amp_dtype = amp_dtype_for(cfg, dev)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp_dtype == torch.float16 and dev.type == 'cuda')
        self.logger = MetricsLogger(self.out_dir, cfg['train']['log_format'],
                                    cfg['train']['tensorboard']) if self.dist.main else None

        # counters (restored on resume)
        self.start_epoch, self.start_batch = 0, 0
        self.best_top1: Optional[float] = None
        self.best_epoch = -1
        self.skipped_images = 0
        self.nonfinite_total = 0
        self.epoch_sums = [0.0, 0, 0, 0]  # loss sum, finite steps, correct, seen
        self._rng_to_restore = None
        if self.resume:
            self._load_resume(self.resume)
        else:
            self._seed(seed + 1000 * self.dist.rank)  # per-rank stream for drop path etc.

    def _meta(self) -> Dict[str, Any]:
        m = self.cfg['model']
        return {'variant': m['name'], 'num_classes': int(m['num_classes']), 'class_names': self.class_names,
                'window_size': int(m['window_size']), 'model_kwargs': m.get('kwargs') or {},
                'img_size': int(self.cfg['data']['img_size']), 'mean': list(self.pre['mean']),
                'std': list(self.pre['std']), 'crop_pct': float(self.cfg['eval']['crop_pct']),
                'step': self.global_step}

    def _load_resume(self, path: str) -> None:
        state, sd, ema_sd = load_state(Path(path))
        if int(state['world']) != self.dist.world:
            raise ValueError(f'checkpoint was written by {state["world"]} processes, this run has {self.dist.world}; '
                             'exact resumption needs the same number')
        self.model.load_state_dict(sd)
        if self.ema is not None:
            if ema_sd is None:
                raise ValueError('the checkpoint has no EMA weights but ema.enable is true')
            self.ema.module.load_state_dict(ema_sd)
        self.optimizer.load_state_dict(state['optimizer'])
        self.scheduler.load_state_dict(state['scheduler'])
        self.scaler.load_state_dict(state['scaler'])
        self.global_step = int(state['global_step'])
        self.start_epoch, self.start_batch = int(state['epoch']), int(state['batch_in_epoch'])
        self.best_top1, self.best_epoch = state['best_top1'], int(state['best_epoch'])
        self.skipped_images, self.nonfinite_total = int(state['skipped_images']), int(state['nonfinite_total'])
        self.epoch_sums = list(state['epoch_sums'])
        self.class_names = self.class_names or state.get('class_names')
        set_rng_state(state['rng'][self.dist.rank])
        if self.dist.main:
            _log.info('resumed from %s at epoch %d, batch %d (step %d)', path, self.start_epoch,
                      self.start_batch, self.global_step)

    # -- checkpoints ---------------------------------------------------------------------------------
    def _save_last(self, epoch: int, batch_in_epoch: int) -> None:
        rngs = all_gather_object(rng_state())
        if self.dist.main:
            save_weights(self.out_dir, 'last', self.model, self.ema.module if self.ema else None, self._meta())
            save_state(self.out_dir, 'last', {
                'epoch': epoch, 'batch_in_epoch': batch_in_epoch, 'global_step': self.global_step,
                'optimizer': self.optimizer.state_dict(), 'scheduler': self.scheduler.state_dict(),
                'scaler': self.scaler.state_dict(), 'rng': rngs, 'world': self.dist.world,
                'best_top1': self.best_top1, 'best_epoch': self.best_epoch,
                'skipped_images': self.skipped_images, 'nonfinite_total': self.nonfinite_total,
                'epoch_sums': list(self.epoch_sums), 'class_names': self.class_names,
                'config': json.dumps(self.cfg)})
        barrier()

    def _save_best(self, metrics: Mapping[str, Any]) -> None:
        if self.dist.main:
            save_weights(self.out_dir, 'best', self.model, self.ema.module if self.ema else None,
                         {**self._meta(), 'top1': metrics.get('best_top1')})
            (self.out_dir / 'best.json').write_text(json.dumps(dict(metrics), indent=2))
        barrier()

    # -- loop ----------------------------------------------------------------------------------------
    def _progress(self, total: int, start: int, epoch: int):
        if not (self.dist.main and self.cfg['train']['progress']):
            return None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        prog = Progress(TextColumn(f'epoch {epoch + 1}/{self.epochs}'), BarColumn(), MofNCompleteColumn(),
                        TimeRemainingColumn(), TextColumn('{task.fields[info]}'), transient=True)
        prog.start()
        prog.add_task('train', total=total, completed=start, info='')
        return prog

    def _stop_agreed(self) -> bool:
        """True when any rank was asked to stop (all ranks must leave the loop at the same step)."""
        flag = torch.tensor([1.0 if self.stop.set else 0.0], device=self.dist.device)
        if is_dist():
            all_reduce_sum(flag)
        self.stop.set = bool(flag.item() > 0)
        return self.stop.set

    def _train_step(self, images: torch.Tensor, target: torch.Tensor) -> Optional[float]:
        """One optimisation step; returns the loss, or None when the step was skipped as non-finite."""
        dev = self.dist.device
        images, target = images.to(dev, non_blocking=True), target.to(dev, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        net = self.ddp or self.model
        buffers = [b.detach().clone() for b in self.model.buffers()]
        ctx = torch.autocast(dev.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            logits = net(images)
            if self.teacher is not None:
                loss = self.criterion(logits.float(), target, self.teacher(images).float())
            else:
                loss = self.criterion(logits.float(), target)
        finite = all_reduce_min(torch.isfinite(loss.detach()).float().reshape(1).to(dev))
        ok = bool(finite.item() > 0)
        if ok:
            self.scaler.scale(loss).backward()
            clip = self.cfg['optim']['clip_grad']
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), float(clip) if clip else math.inf)
            if not self.scaler.is_enabled() and not torch.isfinite(norm):
                ok = False
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if not ok:
            with torch.no_grad():
                for b, saved in zip(self.model.buffers(), buffers):
                    b.copy_(saved)
            return None
        if self.ema is not None:
            self.ema.update(self.model, step=self.global_step + 1)
        with torch.no_grad():
            self.epoch_sums[2] += int((logits.argmax(-1) == target).sum())
            self.epoch_sums[3] += int(target.numel())
        return float(loss.detach())

    def _evaluate(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        if self.val_loader is None:
            return out
        for prefix, net in (('', self.model), ('ema_', self.ema.module if self.ema else None)):
            if net is None:
                continue
            r = evaluate(net, self.val_loader, self.dist.device, self.amp_dtype)
            out.update({f'{prefix}val_top1': r['top1'], f'{prefix}val_top5': r['top5'],
                        f'{prefix}val_loss': r['loss']})
            if not prefix:
                out['val_images'], out['val_skipped'] = r['n'], r['skipped']
        return out

    def fit(self) -> TrainResult:
        """Train to ``sched.epochs`` (or until stopped); returns what happened."""
        self._setup()
        cfg = self.cfg
        if self.dist.main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / 'config.json').write_text(json.dumps(cfg, indent=2))
            if self.logger is not None and (self.start_epoch or self.start_batch):
                self.logger.truncate_after(self.start_epoch)
        self.stop.install()
        max_bad, consecutive_bad = int(cfg['train']['max_nonfinite']), 0
        stop_after = cfg['train']['stop_after_steps']
        save_every = int(cfg['train']['save_every_steps'] or 0)
        stopped, last_metrics = False, {}
        epoch = self.start_epoch
        try:
            self.scheduler.step_update(num_updates=self.global_step)
            for epoch in range(self.start_epoch, self.epochs):
                start_batch = self.start_batch if epoch == self.start_epoch else 0
                if start_batch == 0:
                    self.epoch_sums = [0.0, 0, 0, 0]
                self.sampler.set_epoch(epoch, start_batch)
                self.train_seeded.set_epoch(epoch)
                self.model.train()
                t0 = time.time()
                prog = self._progress(self.steps_per_epoch, start_batch, epoch)
                batch_idx = start_batch
                try:
                    for images, target, skipped in self.train_loader:
                        if self._stop_agreed():
                            stopped = True
                            break
                        self.skipped_images += int(skipped)
                        loss = self._train_step(images, target) if images.numel() else None
                        batch_idx += 1
                        self.global_step += 1
                        self.scheduler.step_update(num_updates=self.global_step)
                        if images.numel() and loss is None:
                            consecutive_bad += 1
                            self.nonfinite_total += 1
                            _log.warning('non-finite loss at step %d: step skipped (%d in a row, limit %d)',
                                         self.global_step, consecutive_bad, max_bad)
                            if consecutive_bad >= max_bad:
                                raise NonFiniteLossError(
                                    f'{consecutive_bad} non-finite losses in a row (last at step {self.global_step}); '
                                    'stopping without writing a checkpoint. Lower the learning rate or check the data; '
                                    f'resume from {self.out_dir / "last_state.pt"}')
                        elif loss is not None:
                            consecutive_bad = 0
                            self.epoch_sums[0] += loss
                            self.epoch_sums[1] += 1
                        if prog is not None:
                            prog.update(prog.task_ids[0], advance=1,
                                        info=f'loss {loss:.4f} lr {self.optimizer.param_groups[0]["lr"]:.2e}'
                                        if loss is not None else 'skipped')
                        if self.step_callback is not None:
                            self.step_callback(self, self.global_step)
                        if stop_after is not None and self.global_step >= int(stop_after):
                            self.stop.set = True
                        if save_every and self.global_step % save_every == 0 and batch_idx < self.steps_per_epoch:
                            self._save_last(epoch, batch_idx)
                finally:
                    if prog is not None:
                        prog.stop()
                if stopped or (self.stop.set and batch_idx < self.steps_per_epoch):
                    stopped = True
                    self._save_last(epoch, batch_idx)
                    break
                last_metrics = self._end_epoch(epoch, time.time() - t0)
                if self._stop_agreed():
                    stopped = True
                    break
        finally:
            self.stop.restore()
            if self.logger is not None:
                self.logger.close()
        if self.dist.main and not stopped:
            self._final_plot()
        checks = [float(c) for c in all_gather_object(_checksum(self.model))]
        result = TrainResult(self.out_dir, epoch + (0 if stopped else 1), self.global_step, stopped, self.best_top1,
                             last_metrics, self.skipped_images, self.nonfinite_total, checks)
        if self.dist.main:
            summary = {k: (str(v) if isinstance(v, Path) else v) for k, v in result.__dict__.items()}
            (self.out_dir / 'summary.json').write_text(json.dumps(summary, indent=2))
        return result

    def _end_epoch(self, epoch: int, seconds: float) -> Dict[str, Any]:
        every = int(self.cfg['eval']['every'])
        last = epoch == self.epochs - 1
        metrics: Dict[str, Any] = {}
        if every and ((epoch + 1) % every == 0 or last):
            metrics = self._evaluate()
        sums = all_reduce_sum(torch.tensor(self.epoch_sums[:] + [self.skipped_images], dtype=torch.float64,
                                           device=self.dist.device)).cpu()
        record: Dict[str, Any] = {
            'epoch': epoch, 'step': self.global_step, 'lr': self.optimizer.param_groups[0]['lr'],
            'train_loss': float(sums[0] / max(float(sums[1]), 1.0)),
            'train_top1': 100.0 * float(sums[2]) / max(float(sums[3]), 1.0),
            'nonfinite_steps': self.nonfinite_total, 'skipped_images': int(sums[4]),
            'epoch_seconds': round(seconds, 2), **metrics}
        top = max([metrics[k] for k in ('val_top1', 'ema_val_top1') if k in metrics], default=None)
        improved = top is not None and (self.best_top1 is None or top > self.best_top1)
        if improved:
            self.best_top1, self.best_epoch = top, epoch
        record['best_top1'] = self.best_top1
        self._save_last(epoch + 1, 0)
        if improved:
            self._save_best(record)
        if self.dist.main:
            self.logger.log(record)
            shown = ', '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in record.items())
            _log.info('%s', shown)
        return record

    def _final_plot(self) -> None:
        log = self.out_dir / f'log.{self.cfg["train"]["log_format"]}'
        if log.exists():
            records = read_log(log)
            if records:
                plot_curves(records, self.out_dir / 'curves.png')
